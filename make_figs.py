"""Qualitative figures of one C-DSVAE checkpoint on the test videos of Sprites (or, with --dataset
smmnist, of Stochastic Moving MNIST).

    python make_figs.py --model_dir runs/e1/model.pt [--metrics runs/e1/metrics.jsonl] [--out figs]

Writes to --out (the same files for the same checkpoint, data and --seed):
  swap_grid.png          pairs of videos: A, B, f(A)+z(B), f(B)+z(A), 8 frames each
  swap.gif               the same for a few pairs, animated (8 frames, 2x nearest)
  fixed_content.png      f of a few videos kept, z drawn from the learned prior
  fixed_motion.png       z of a few videos kept, f ~ N(0, I)
  cosine_similarity.md   cosine similarity of f_mean and of flattened z_mean, 4 categories x 3 pairs
  cosine_similarity.png  the same table as an image
  proj_f.png             2-D PCA of f_mean, coloured by skin, pant, top, hair (Moving MNIST: digit)
  proj_z.png             2-D PCA of flattened z_mean, coloured by motion (action-direction; Moving
                         MNIST: where the digit starts, left to right, and its digit)
On Moving MNIST the similarity table's categories are same / different digit, other paths.
  loss_curves.png        every loss term per epoch, from --metrics
"""
import argparse
import io
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from benchmarks import BENCHMARKS, add_dataset_flag, benchmark_of
from dataloader import ATTRIBUTES, MOTION_NAMES, DataError, character_id, to_float
from evaluation import encode_videos
from utils import (CheckpointError, check_writable, folders_held, load_model, pick_device,
                   plot_loss_curves, read_text, refuse_overwriting, run_main, write_atomic,
                   write_text)

ENCODE_BATCH = 32  # videos per encoder pass
FIGURES = ("swap_grid.png", "swap.gif", "fixed_content.png", "fixed_motion.png",
           "cosine_similarity.md", "cosine_similarity.png", "proj_f.png", "proj_z.png",
           "loss_curves.png")
PER_CATEGORY = 3  # pairs of each category in the similarity table
SPRITES = BENCHMARKS["sprites"]


# ---- image grids: cells of 64x64 (times scale), 2 px apart, row labels in a 120 px left margin ---
PAD, GROUP_GAP, LABEL_W, HEADER_H, CELL = 2, 8, 120, 16, 64
FONT = ImageFont.load_default()


def image_grid(rows, row_labels=None, col_labels=None, group_size=None, scale=1):
    """A PIL image of rows of (n_cols, 3, 64, 64) images in [0, 1]: a (multi-line) label left of
    each row, one above each column, an extra gap every group_size rows, cells upscaled `scale`x."""
    group_size, cell = group_size or len(rows), CELL * scale
    x0, y0 = LABEL_W if row_labels is not None else 0, HEADER_H if col_labels is not None else 0
    tops = [y0 + PAD + i * (cell + PAD) + GROUP_GAP * (i // group_size) for i in range(len(rows))]
    lefts = [x0 + PAD + j * (cell + PAD) for j in range(max(len(r) for r in rows))]
    canvas = np.full((tops[-1] + cell + PAD, lefts[-1] + cell + PAD, 3), 255, np.uint8)
    for y, row in zip(tops, rows):
        for x, img in zip(lefts, row):
            a = (img.cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            canvas[y:y + cell, x:x + cell] = a.repeat(scale, 0).repeat(scale, 1)
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    for y, text in zip(tops, row_labels or ()):
        draw.multiline_text((3, y + 2), text, fill=(0, 0, 0), font=FONT, spacing=2)
    for x, text in zip(lefts, col_labels or ()):
        draw.text((x + 2, 2), text, fill=(0, 0, 0), font=FONT)
    return im


def save_image(im, path, **kwargs):
    """PIL save, atomically: an interrupted run leaves the previous figure whole."""
    fmt = os.path.splitext(path)[1][1:].upper()
    write_atomic(path, lambda tmp: im.save(tmp, format=fmt, **kwargs))


def save_figure(fig, path, **kwargs):
    import matplotlib.pyplot as plt
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", **kwargs))
    plt.close(fig)


# ---- data and model helpers ----------------------------------------------------------------------
def describe(i, A, D, bench=SPRITES):
    """'#12 s1 p0 t3 h5 walk-left': index, attributes and motion of a test video (Moving MNIST:
    '#12 digit 7 from (30, 41)', where its digit starts)."""
    if bench.positions:
        return f"#{i} digit {int(A[i, 0])} from ({D[i, 0, 0, 0]:.0f}, {D[i, 0, 0, 1]:.0f})"
    s, p, t, h = (int(v) for v in A[i])
    return f"#{i} s{s} p{p} t{t} h{h} {MOTION_NAMES[int(D[i])]}"


def label(i, A, D, prefix="", bench=SPRITES):
    """Two-line row label of a test video: '<prefix>#12 walk-left' / 's1 p0 t3 h5'."""
    if bench.positions:
        return prefix + describe(i, A, D, bench).replace(" from", "\nfrom")
    s, p, t, h = (int(v) for v in A[i])
    return f"{prefix}#{i} {MOTION_NAMES[int(D[i])]}\ns{s} p{p} t{t} h{h}"


def figure_keys(A, D, bench=SPRITES):
    """(appearance, action, motion) id of each test video: Sprites' character, action type and
    motion; Moving MNIST's digit, and the video itself for both (each path is its own)."""
    if bench.positions:
        own = torch.arange(len(A))
        return A[:, 0], own, own
    return character_id(A), D // 3, D


def videos(X, idx, device):
    """Float videos (B, 8, C, 64, 64) of the test indices idx (a list)."""
    return to_float(X[idx]).to(device)


def posterior_means(model, X, idx, device):
    """f_mean (n, f_dim) and z_mean (n, T, z_dim) of the videos X[idx], on the CPU."""
    post = encode_videos(model, X[idx], device, ENCODE_BATCH)
    return post["f"].cpu(), post["z"].cpu()


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float(F.cosine_similarity(a[None], b[None], eps=1e-12).clamp(-1, 1))


def pick_pairs(A, D, n, generator, bench=SPRITES):
    """Up to n pairs (i, j) of test videos, no video twice where the data allow: of different
    characters (digits) and actions, else of a different character or motion, else any."""
    perm = torch.randperm(len(D), generator=generator).tolist()
    c, act, d = (key.tolist() for key in figure_keys(A, D, bench))
    conditions = (lambda i, j: c[i] != c[j] and act[i] != act[j],
                  lambda i, j: c[i] != c[j] or d[i] != d[j],
                  lambda i, j: True)
    pairs, used = [], set()
    for cond in conditions:
        for reuse in (False, True):
            for a in perm:
                for b in perm:
                    if len(pairs) >= n:
                        return pairs
                    if a == b or (a, b) in pairs or (b, a) in pairs or not cond(a, b):
                        continue
                    if reuse or (a not in used and b not in used):
                        pairs.append((a, b))
                        used.update((a, b))
                        break
    return pairs


def pick_videos(A, D, n, generator, bench=SPRITES):
    """Up to n test videos, of different characters (digits) and motions where possible."""
    perm = torch.randperm(len(D), generator=generator).tolist()
    c, _, d = (key.tolist() for key in figure_keys(A, D, bench))
    chosen = []
    for strict in (True, False):
        for i in perm:
            if len(chosen) >= n:
                return chosen
            if i in chosen or (strict and any(c[i] == c[k] or d[i] == d[k] for k in chosen)):
                continue
            chosen.append(i)
    return chosen


# The 4 categories of the similarity table: (name, condition on same character / action / motion).
# 'motion' is the D label (action and direction); 'different action' implies a different motion.
PAIR_CATEGORIES = (
    ("same appearance, different action", lambda sc, sa, sm: sc & ~sa),
    ("different appearance, same motion", lambda sc, sa, sm: ~sc & sm),
    ("different appearance, different action", lambda sc, sa, sm: ~sc & ~sa),
    ("same appearance & action, different direction", lambda sc, sa, sm: sc & sa & ~sm),
)
DIGIT_PAIR_CATEGORIES = (  # Moving MNIST's: every path is a video's own
    ("same digit, another path", lambda sc, sa, sm: sc & ~sm),
    ("different digit, another path", lambda sc, sa, sm: ~sc & ~sm),
)


def pair_categories(bench):
    return DIGIT_PAIR_CATEGORIES if bench.positions else PAIR_CATEGORIES


def similarity_pairs(A, D, per_category, generator, bench=SPRITES):
    """{category: [(i, j), ...]}, up to `per_category` random pairs i < j of test videos each."""
    c, act, m = figure_keys(A, D, bench)
    same_c, same_a, same_m = c[:, None] == c[None], act[:, None] == act[None], m[:, None] == m[None]
    upper = torch.ones(len(D), len(D), dtype=torch.bool).triu(1)
    out = {}
    for name, cond in pair_categories(bench):
        cand = torch.nonzero(cond(same_c, same_a, same_m) & upper)
        order = torch.randperm(len(cand), generator=generator)[:per_category]
        out[name] = [tuple(int(v) for v in cand[k]) for k in order]
    return out


def pca_2d(X):
    """Scores (n, 2) of the rows of X on their first two principal components, each signed so that
    its largest loading is positive, and the components' explained-variance ratios."""
    X = X.double().flatten(1)
    Xc = X - X.mean(0, keepdim=True)
    if len(X) < 2 or float(Xc.abs().max()) == 0.0:
        return torch.zeros(len(X), 2), [0.0, 0.0]
    _, S, Vh = torch.linalg.svd(Xc, full_matrices=False)
    Vh = Vh[:2]
    Vh = Vh * torch.sign(Vh.gather(1, Vh.abs().argmax(1, keepdim=True)))
    pad = (0, 2 - len(Vh))  # one component only where X has one column
    return F.pad(Xc @ Vh.t(), pad).float(), F.pad(S[:2] ** 2 / (S ** 2).sum(), pad).tolist()


# ---- the figures ---------------------------------------------------------------------------------
def fig_swaps(model, X, A, D, device, out, seed, n_grid=4, n_gif=3, bench=SPRITES):
    pairs = pick_pairs(A, D, max(n_grid, n_gif), torch.Generator().manual_seed(seed), bench)
    i, j = map(list, zip(*pairs))
    xa, xb = videos(X, i, device), videos(X, j, device)
    ab, ba = model.swap(xa, xb)  # f(A)+z(B), f(B)+z(A)
    rows, labels = [], []
    for k in range(min(n_grid, len(pairs))):
        rows += [xa[k], xb[k], ab[k], ba[k]]
        labels += [label(i[k], A, D, "A ", bench), label(j[k], A, D, "B ", bench), "f(A) + z(B)",
                   "f(B) + z(A)"]
    save_image(image_grid(rows, labels, group_size=4), os.path.join(out, "swap_grid.png"))
    n = min(n_gif, len(pairs))
    frames = [image_grid([torch.stack([xa[k, t], xb[k, t], ab[k, t], ba[k, t]]) for k in range(n)],
                         [f"pair {k + 1}\n#{i[k]} / #{j[k]}" for k in range(n)],
                         ["A", "B", "f(A) + z(B)", "f(B) + z(A)"], scale=2)
              for t in range(X.shape[1])]
    frames = [f.convert("P", palette=Image.Palette.ADAPTIVE, colors=255) for f in frames]
    save_image(frames[0], os.path.join(out, "swap.gif"), save_all=True, append_images=frames[1:],
               duration=200, loop=0, optimize=False, disposal=1)
    return pairs


def fig_fixed(model, X, A, D, device, out, seed, n_videos=3, n_samples=4, bench=SPRITES):
    idx = pick_videos(A, D, n_videos, torch.Generator().manual_seed(seed + 1), bench)
    x = videos(X, idx, device)
    post = model.encode(x, random=False)
    recon = model.decode(post["z_mean"], post["f_mean"])
    xr = x.repeat_interleave(n_samples, 0)
    torch.manual_seed(seed + 2)
    content = model.generate_fixed_content(xr)
    torch.manual_seed(seed + 3)
    motion = model.generate_fixed_motion(xr)
    for name, gen, what in (("fixed_content", content, "z: prior means"),
                            ("fixed_motion", motion, "f ~ N(0,I)")):
        rows, labels = [], []
        for k, i in enumerate(idx):
            rows += [x[k], recon[k], *gen[k * n_samples:(k + 1) * n_samples]]
            labels += [label(i, A, D, bench=bench), "reconstruction"]
            labels += [f"{what} #{s + 1}" for s in range(n_samples)]
        grid = image_grid(rows, labels, group_size=2 + n_samples)
        save_image(grid, os.path.join(out, f"{name}.png"))
    return idx


def similarity_table(model, X, A, D, device, seed, bench=SPRITES):
    """Rows (category, i, j, cos f, cos z) of the similarity table, and the categories short of
    pairs."""
    pairs = similarity_pairs(A, D, PER_CATEGORY, torch.Generator().manual_seed(seed + 4), bench)
    idx = sorted({v for ps in pairs.values() for p in ps for v in p})
    rows = []
    if idx:
        f, z = posterior_means(model, X, idx, device)
        pos = {v: k for k, v in enumerate(idx)}
        rows = [(name, i, j, cosine(f[pos[i]], f[pos[j]]), cosine(z[pos[i]], z[pos[j]]))
                for name, ps in pairs.items() for i, j in ps]
    return rows, [name for name, ps in pairs.items() if len(ps) < PER_CATEGORY]


def _fmt(v):
    return f"{round(v, 3) + 0.0:.3f}"  # + 0.0: no '-0.000'


def _md_row(cells):
    return "| " + " | ".join(cells) + " |"


def similarity_cells(rows, A, D, bench=SPRITES):
    """The similarity table's text: its header, then one row of cells per pair."""
    return [["#", "category", "video A", "video B", "cos f", "cos z"]] + [
        [str(k + 1), name, describe(i, A, D, bench), describe(j, A, D, bench), _fmt(cf), _fmt(cz)]
        for k, (name, i, j, cf, cz) in enumerate(rows)]


def similarity_markdown(rows, cells, missing, bench=SPRITES):
    """The similarity table, each category's means and a legend, as markdown."""
    lines = [_md_row(cells[0]), "|---" * 6 + "|", *map(_md_row, cells[1:]), "",
             _md_row(["category", "pairs", "mean cos f", "mean cos z"]), "|---" * 4 + "|"]
    for name, _ in pair_categories(bench):
        sel = [r for r in rows if r[0] == name]
        means = [_fmt(np.mean([r[k] for r in sel])) for k in (3, 4)] if sel else ["n/a", "n/a"]
        lines.append(_md_row([name, str(len(sel)), *means]))
    if missing:
        lines += ["", f"Fewer than {PER_CATEGORY} pairs in the test set for: {', '.join(missing)}."]
    video = ("the digit, and where it starts (row, col) in px" if bench.positions
             else "skin / pant / top / hair, action-direction")
    lines += ["", "f: posterior mean of the static factor; z: posterior means of the 8 dynamic "
              f"factors, flattened. Video: test index, {video}."]
    return "\n".join(lines) + "\n"


def plot_similarity(rows, cells, path):
    """The similarity table as an image, the cosines shaded from blue (-1) to red (1)."""
    import matplotlib.pyplot as plt
    body = cells[1:] or [["", "no pairs", "", "", "", ""]]
    fig, ax = plt.subplots(figsize=(11, 0.3 * len(body) + 0.8))
    ax.axis("off")
    table = ax.table(cellText=body, colLabels=cells[0], loc="center", cellLoc="left",
                     colWidths=[0.04, 0.34, 0.22, 0.22, 0.08, 0.08])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    for (r, c), cell in table.get_celld().items():
        if r > 0 and c in (4, 5) and rows:
            cell.set_facecolor(plt.cm.RdBu_r(0.5 + 0.4 * rows[r - 1][c - 1]))
    ax.set_title("Cosine similarity of posterior means", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=110, bbox_inches="tight")


def pca_panel(ax, scores, ratios, labels, names, size, markers="ooo"):
    """A scatter of PCA scores (n, 2), one colour per label value (named in names)."""
    import matplotlib.pyplot as plt
    colours = plt.cm.tab10.colors
    for v, name in enumerate(names):
        m = labels == v
        if m.any():
            ax.scatter(scores[m, 0], scores[m, 1], s=size, color=colours[v], marker=markers[v // 3],
                       label=name)
    ax.set_xlabel(f"PC1 ({100 * ratios[0]:.0f}%)")
    ax.set_ylabel(f"PC2 ({100 * ratios[1]:.0f}%)")


def fig_projections(model, X, A, D, device, out, seed, n=900, bench=SPRITES):
    g = torch.Generator().manual_seed(seed + 5)
    idx = torch.randperm(len(X), generator=g)[:n].sort().values.tolist()
    f, z = posterior_means(model, X, idx, device)
    if bench.positions:
        return fig_digit_projections(f, z, A[idx], D[idx], out)
    import matplotlib.pyplot as plt
    pf = pca_2d(f)
    fig, axes = plt.subplots(2, 2, figsize=(9, 8))
    for k, (ax, name) in enumerate(zip(axes.flat, ATTRIBUTES)):
        pca_panel(ax, *pf, A[idx][:, k], [f"{name} {v}" for v in range(6)], 6)
        ax.set_title(f"f_mean coloured by {name}")
        ax.legend(fontsize=6, markerscale=2, loc="best")
    fig.suptitle(f"PCA of f_mean, {len(idx)} test videos")
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "proj_f.png"), dpi=100)
    fig, ax = plt.subplots(figsize=(7, 6))
    pca_panel(ax, *pca_2d(z), D[idx], MOTION_NAMES, 8, markers="o^s")  # a marker per action
    ax.set_title(f"PCA of flattened z_mean, {len(idx)} test videos, coloured by motion")
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "proj_z.png"), dpi=100)
    return len(idx)


def fig_digit_projections(f, z, Y, P, out):
    """Moving MNIST's projections: f by digit; z by where the digit starts (5 bands of columns,
    left to right) and by digit, which a z without the digit scatters evenly."""
    import matplotlib.pyplot as plt
    digits = [f"digit {v}" for v in range(10)]
    fig, ax = plt.subplots(figsize=(7, 6))
    pca_panel(ax, *pca_2d(f), Y[:, 0], digits, 8, markers="oooo")
    ax.set_title(f"PCA of f_mean, {len(f)} test videos, coloured by digit")
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "proj_f.png"), dpi=100)
    band = (P[:, 0, 0, 1] - P[:, 0, 0, 1].min()).div(32 / 5).floor().clamp(0, 4).long()
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    pz = pca_2d(z)
    pca_panel(axes[0], *pz, band, [f"starts in column band {v + 1} of 5" for v in range(5)], 8)
    pca_panel(axes[1], *pz, Y[:, 0], digits, 8, markers="oooo")
    for ax, what in zip(axes, ("where the digit starts", "digit")):
        ax.set_title(f"PCA of flattened z_mean, coloured by {what}")
        ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "proj_z.png"), dpi=100)
    return len(f)


def read_metrics(path):
    """Rows of a metrics.jsonl, the last one per epoch, in epoch order; unreadable lines (one being
    written by a running training) are skipped."""
    rows = {}
    for line in io.StringIO(read_text(path)):  # as a file's lines
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "epoch" in r:
            rows[r["epoch"]] = r
    return [rows[e] for e in sorted(rows)]


def fig_loss_curves(path, out):
    """loss_curves.png from the metrics.jsonl at `path`; the number of epochs it holds."""
    rows = read_metrics(path)
    if rows:
        plot_loss_curves(rows, os.path.join(out, "loss_curves.png"))
    return len(rows)


# ---- the script ----------------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True, help="model.pt of train_cdsvae.py, or its folder")
    add_dataset_flag(p.add_argument)  # --dataset, --data_root: its test split is used
    p.add_argument("--metrics", help="metrics.jsonl for loss_curves.png (default: "
                   "<checkpoint>.metrics.jsonl or metrics.jsonl beside the checkpoint, if any)")
    p.add_argument("--out", default="figs", help="output folder (default figs)")
    p.add_argument("--seed", type=int, default=0, help="seed of all picks and samples (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument("--n_proj", type=int, default=900,
                   help="test videos in the PCA projections (default 900)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    benchmark_of(args)
    return args


def metrics_path(args, ckpt):
    """--metrics, else the metrics file beside the checkpoint (X.metrics.jsonl of a shipped X.pt,
    metrics.jsonl of a run's model.pt), else None."""
    beside = (os.path.splitext(ckpt)[0] + ".metrics.jsonl",
              os.path.join(os.path.dirname(os.path.abspath(ckpt)), "metrics.jsonl"))
    return args.metrics or next((p for p in beside if os.path.isfile(p)), None)


def main(argv=None):
    args = get_args(argv)
    ckpt = args.model_dir
    if os.path.isdir(ckpt):
        ckpt = os.path.join(ckpt, "model.pt")
    metrics = metrics_path(args, ckpt)
    refuse_overwriting([("--out", os.path.join(args.out, name)) for name in FIGURES],
                       [("--model_dir", ckpt), ("--data_root", args.data_root),
                        ("--metrics", metrics)])
    # one writer in --out: a training's folder, or another make_figs's, is refused
    with folders_held([args.out], flags="--out"):
        check_writable(os.path.join(args.out, FIGURES[0]), "--out")
        return make_figures(args, ckpt, metrics)


@torch.no_grad()
def make_figures(args, ckpt, metrics):
    torch.set_num_threads(max(1, args.threads))
    import matplotlib
    matplotlib.use("Agg")
    try:
        device = pick_device(args.device)
        model = load_model(ckpt, device)
        bench = BENCHMARKS[args.dataset]
        X, A, D = bench.load(args.data_root)["test"]
        if len(X) < 2:
            raise DataError(f"{args.data_root} has {len(X)} test videos; the figures need at "
                            f"least 2")
    except (CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    pairs = fig_swaps(model, X, A, D, device, args.out, args.seed, bench=bench)
    print(f"swap_grid.png, swap.gif: {len(pairs)} pairs")
    idx = fig_fixed(model, X, A, D, device, args.out, args.seed, bench=bench)
    print(f"fixed_content.png, fixed_motion.png: videos {idx}")
    rows, missing = similarity_table(model, X, A, D, device, args.seed, bench)
    cells = similarity_cells(rows, A, D, bench)
    text = similarity_markdown(rows, cells, missing, bench)
    write_text(text, os.path.join(args.out, "cosine_similarity.md"))
    plot_similarity(rows, cells, os.path.join(args.out, "cosine_similarity.png"))
    print(text)
    n = fig_projections(model, X, A, D, device, args.out, args.seed, args.n_proj, bench)
    print(f"proj_f.png, proj_z.png: {n} test videos")
    if metrics and os.path.isfile(metrics):
        print(f"loss_curves.png: {fig_loss_curves(metrics, args.out)} epochs from {metrics}")
    else:
        print(f"no metrics file {metrics or 'beside ' + ckpt}: loss_curves.png not made")
    print(f"figures in {args.out}")
    return 0


if __name__ == "__main__":
    run_main(main)
