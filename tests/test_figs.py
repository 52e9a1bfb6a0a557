"""make_figs.py end to end on a tiny checkpoint and the 18 test videos of the tiny data set; its
helpers."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import make_figs
import stubs
from dataloader import character_id, load_sprites, to_float
from model import CDSVAE
from utils import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = dict(f_dim=8, z_dim=4, g_dim=16, rnn_size=16, nf=8)
FILES = ("swap_grid.png", "swap.gif", "fixed_content.png", "fixed_motion.png",
         "cosine_similarity.md", "cosine_similarity.png", "proj_f.png", "proj_z.png",
         "loss_curves.png")


def run(args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "make_figs.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # not the paper's initialisation: outputs that differ from video to video
    m = stubs.spread_init(CDSVAE(**ARGS))
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    model_args = dict(ARGS, frames=8, z_input="bilstm")
    torch.save({"model": m.state_dict(), "model_args": model_args}, path)
    with open(path.parent / "metrics.jsonl", "w") as f:
        for e in range(1, 4):
            f.write(json.dumps({"epoch": e, "step": 10 * e, "recon": 1000.0 / e, "kld_f": 5.0 + e,
                                "kld_z": 2.0, "mi_fz": 0.5, "con_f": 3.0 - 0.1 * e, "con_z": 3.0,
                                "loss": 1100.0 / e}) + "\n")
        f.write('{"epoch": 4, "rec')  # a line being written by a running training
    return str(path)


@pytest.fixture(scope="module")
def figs(checkpoint, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    metrics = os.path.join(os.path.dirname(checkpoint), "metrics.jsonl")
    r = run(["--model_dir", checkpoint, "--data_root", tiny_data, "--out", str(out), "--seed", "3",
             "--device", "cpu", "--metrics", metrics])
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_every_file_is_written_with_its_layout(figs):
    out, _ = figs
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    # a 120 px label margin, cells of 64 px 2 px apart, 8 px between groups, a 16 px column header
    # 4 pairs of 4 rows, 8 frames; 3 videos of original + reconstruction + 4 samples
    assert Image.open(out / "swap_grid.png").size == (120 + 8 * 66 + 2, 16 * 66 + 2 + 3 * 8)
    for name in ("fixed_content.png", "fixed_motion.png"):
        assert Image.open(out / name).size == (120 + 8 * 66 + 2, 18 * 66 + 2 + 2 * 8), name
    gif = Image.open(out / "swap.gif")
    assert gif.n_frames == 8
    assert gif.size == (120 + 4 * 130 + 2, 16 + 3 * 130 + 2)  # 3 pairs, cells 2x
    for name in ("proj_f.png", "proj_z.png", "cosine_similarity.png", "loss_curves.png"):
        w, h = Image.open(out / name).size
        assert w > 200 and h > 100, name


def test_cosine_table_holds_the_cosines_of_each_pairs_posterior_means(figs, checkpoint, tiny_data):
    """Each row's cos f and cos z, recomputed here from the two videos' posterior means, and each
    category's mean; each pair fits its category."""
    out, stdout = figs
    text = (out / "cosine_similarity.md").read_text()
    assert text.splitlines()[0] in stdout and "Fewer than" not in text
    X, A, D = load_sprites(tiny_data)["test"]
    model = load_model(checkpoint)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if re.match(r"\| \d+ \|", line)]
    assert [row[1] for row in rows] == [name for name, _ in make_figs.PAIR_CATEGORIES
                                        for _ in range(3)]

    def same_character(i, j):
        return bool((A[i] == A[j]).all())

    def same_action(i, j):
        return D[i] // 3 == D[j] // 3

    fits = {"same appearance, different action":
            lambda i, j: same_character(i, j) and not same_action(i, j),
            "different appearance, same motion":
            lambda i, j: not same_character(i, j) and D[i] == D[j],
            "different appearance, different action":
            lambda i, j: not same_character(i, j) and not same_action(i, j),
            "same appearance & action, different direction":
            lambda i, j: same_character(i, j) and same_action(i, j) and D[i] != D[j]}
    by_category = {}
    for _, name, video_a, video_b, cos_f, cos_z in rows:
        i, j = int(video_a.split()[0][1:]), int(video_b.split()[0][1:])
        assert fits[name](i, j), (name, i, j)
        with torch.no_grad():
            post = model.encode(to_float(X[[i, j]]), random=False)
        want = [torch.nn.functional.cosine_similarity(*(v.double().flatten(1)), dim=0).item()
                for v in (post["f_mean"], post["z_mean"])]
        assert [float(cos_f), float(cos_z)] == pytest.approx(want, abs=5e-4 + 1e-6), (name, i, j)
        by_category.setdefault(name, []).append(want)
    assert len({cell for row in rows for cell in row[4:]}) > 12  # the cosines tell the pairs apart
    summary = [line.strip("|").split("|") for line in text.splitlines()
               if re.match(r"\| [a-z].* \| 3 \|", line)]
    assert len(summary) == len(make_figs.PAIR_CATEGORIES)
    for name, _, mean_f, mean_z in summary:
        want = np.mean(by_category[name.strip()], axis=0)
        assert [float(mean_f), float(mean_z)] == pytest.approx(want, abs=5e-4 + 1e-6), name


def test_same_seed_same_figures_and_another_seed_other_pairs(figs, checkpoint, tiny_data, tmp_path):
    out, _ = figs
    assert make_figs.main(["--model_dir", os.path.dirname(checkpoint), "--data_root", tiny_data,
                           "--out", str(tmp_path), "--seed", "3", "--device", "cpu",
                           "--n_proj", "900"]) == 0
    for name in FILES[:5]:  # the images and the table made from the videos
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    # the metrics.jsonl beside the checkpoint, by default
    assert (tmp_path / "loss_curves.png").read_bytes() == (out / "loss_curves.png").read_bytes()


def test_cosine_helper():
    torch.manual_seed(0)
    f, z = torch.randn(8), torch.randn(8, 4)
    assert make_figs.cosine(f, f) == pytest.approx(1.0, abs=1e-12)
    assert make_figs.cosine(z, z.clone()) == pytest.approx(1.0, abs=1e-12)
    assert make_figs.cosine(f, -f) == pytest.approx(-1.0, abs=1e-12)
    assert make_figs.cosine(f, 3 * f) == pytest.approx(1.0, abs=1e-12)
    e = torch.eye(2)
    assert make_figs.cosine(e[0], e[1]) == pytest.approx(0.0, abs=1e-12)
    assert -1 <= make_figs.cosine(torch.randn(100), torch.randn(100)) <= 1


def test_pair_choices_follow_their_categories():
    # 3 characters x 9 motions, stored as make_sprites stores them
    A = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 4], [5, 5, 5, 5]]).repeat_interleave(9, 0)
    D = torch.arange(9).repeat(3)
    c = character_id(A)
    pairs = make_figs.similarity_pairs(A, D, 3, torch.Generator().manual_seed(0))
    checks = [lambda i, j: c[i] == c[j] and D[i] // 3 != D[j] // 3,
              lambda i, j: c[i] != c[j] and D[i] == D[j],
              lambda i, j: c[i] != c[j] and D[i] // 3 != D[j] // 3,
              lambda i, j: c[i] == c[j] and D[i] // 3 == D[j] // 3 and D[i] != D[j]]
    for (name, _), check in zip(make_figs.PAIR_CATEGORIES, checks):
        assert len(pairs[name]) == 3 and len(set(pairs[name])) == 3
        assert all(i < j and check(i, j) for i, j in pairs[name]), name
    swaps = make_figs.pick_pairs(A, D, 4, torch.Generator().manual_seed(0))
    assert len(swaps) == 4 and len({v for p in swaps for v in p}) == 8
    assert all(c[i] != c[j] and D[i] // 3 != D[j] // 3 for i, j in swaps)
    # one character only: no different-appearance pairs, the others still come, swaps fall back
    one = make_figs.similarity_pairs(A[:9], D[:9], 3, torch.Generator().manual_seed(0))
    assert one["different appearance, same motion"] == []
    assert len(one["same appearance, different action"]) == 3
    assert len(make_figs.pick_pairs(A[:2], D[:2], 4, torch.Generator())) == 1


def test_pca_is_deterministic_and_finds_the_main_axis():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=g) * torch.tensor([10.0, 3.0, 0.1, 0.1, 0.1])
    scores, ratios = make_figs.pca_2d(X)
    assert scores.shape == (200, 2) and ratios[0] > ratios[1] > 0
    assert torch.corrcoef(torch.stack([scores[:, 0], X[:, 0]]))[0, 1].abs() > 0.99
    again, _ = make_figs.pca_2d(X.clone())
    torch.testing.assert_close(scores, again)
    assert make_figs.pca_2d(torch.ones(3, 4))[0].abs().sum() == 0


def test_image_grid_places_cells_and_labels():
    a, b = torch.zeros(2, 3, 64, 64), torch.ones(2, 3, 64, 64)
    im = make_figs.image_grid([a, b], ["row a", "row b"], group_size=1)
    assert im.size == (120 + 2 * 66 + 2, 2 * 66 + 2 + 8)
    px = torch.from_numpy(np.array(im))
    x0, pad = make_figs.LABEL_W, make_figs.PAD
    assert px[pad:pad + 64, x0 + pad:x0 + pad + 64].max() == 0  # row a, black
    y1 = pad + 66 + make_figs.GROUP_GAP
    assert px[y1:y1 + 64, x0 + pad:x0 + pad + 64].min() == 255  # row b, white
    assert px[:, :x0].min() < 128  # some label text was drawn
    big = make_figs.image_grid([a], col_labels=["x", "y"], scale=2)
    assert big.size == (2 * 130 + 2, 16 + 130 + 2)  # no label margin, a column header


def test_missing_checkpoint_or_data_is_a_one_line_error(checkpoint, tiny_data, tmp_path):
    for model_dir, data_root in ((str(tmp_path / "none.pt"), tiny_data),
                                 (checkpoint, str(tmp_path / "none.pkl"))):
        r = run(["--model_dir", model_dir, "--data_root", data_root, "--out", str(tmp_path)])
        assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert not (tmp_path / "swap_grid.png").exists()


def test_metrics_default_to_the_file_beside_the_checkpoint(tmp_path):
    """A shipped X.pt has X.metrics.jsonl; a run's model.pt has metrics.jsonl; --metrics wins."""
    def args(*extra):
        return make_figs.get_args(["--model_dir", "x", *extra])

    shipped, run = tmp_path / "cdsvae.pt", tmp_path / "model.pt"
    assert make_figs.metrics_path(args(), str(shipped)) is None
    (tmp_path / "metrics.jsonl").write_text("")
    assert make_figs.metrics_path(args(), str(run)) == str(tmp_path / "metrics.jsonl")
    (tmp_path / "cdsvae.metrics.jsonl").write_text("")
    assert make_figs.metrics_path(args(), str(shipped)) == str(tmp_path / "cdsvae.metrics.jsonl")
    assert make_figs.metrics_path(args("--metrics", "m.jsonl"), str(shipped)) == "m.jsonl"


def test_loss_curves_skip_a_half_written_line_and_plot_the_last_row_of_each_epoch(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 2, "recon": 5.0}\n{"epoch": 1, "recon": 9.0}\nnot json\n'
                    '{"epoch": 1, "recon": 7.0}\n{"epoch": 3, "rec')
    assert make_figs.read_metrics(path) == [{"epoch": 1, "recon": 7.0}, {"epoch": 2, "recon": 5.0}]
    assert make_figs.fig_loss_curves(path, tmp_path) == 2
    assert Image.open(tmp_path / "loss_curves.png").size[0] > 100
    path.write_text("")
    assert make_figs.fig_loss_curves(path, tmp_path / "none") == 0
    assert not (tmp_path / "none").exists()
