"""Score a C-DSVAE checkpoint on the whole Sprites test split with one or more judges (default: both shipped ones,
judges/sprite_judge.pt and judges/clip_judge.pt), and report how far the judges agree.

    python test_sprite.py --model_dir checkpoints/cdsvae_sprites_cpu.pt [--niter 5] [--type_gt all] [--amp]
    python test_sprite.py --model_dir ... --judge judges/sprite_judge.pt --judge my_judge.pt

Every test video is scored in every run; none is dropped, whatever the batch size.

Protocol A (the paper's Table 1; --type_gt action): keep each video's dynamics (posterior mean of z), draw
    f ~ N(0, I), decode (model.generate_fixed_motion). The judge's action accuracy against the true action,
    and from its action softmax: IS = exp(E_x KL(p(y|x) || p(y))), H(y|x), H(y), and
    KL(p_gen(y) || p_real(y)), the KL between its mean prediction on these generated videos and on the real
    test videos. The test split is class-balanced (296 characters x 9 actions), so the whole split is the
    class-balanced set these scores ask for.
Protocol B (--type_gt static): keep each video's content (posterior mean of f), draw a path of the learned prior
    and decode its per-step means, as the paper does (model.generate_fixed_content). The judge's accuracy on skin,
    pant, top, hair and their mean. 'Bs' (not the paper's figure; --sampled_b): the same, decoding the path's
    samples.
Swaps (always): pair each video i with another video j = perm[i] (a seeded derangement: never itself), decode
    f of i with z of j (model.swap); the judge's accuracy on i's four attributes and on j's action. As a
    diagnosis, the predicted action in its two parts, action type and facing direction: how often each is j's
    (carried by z) and how often i's (leaked through f); for protocol A, how often each is the video's own.
Sanity rows (always): the mean squared error per pixel of decode(z_mean, f_mean) against the video, and the
    judge's accuracy (and IS, entropies) on the real test videos.
Agreement (two judges or more): for each pair of judges, each kind of video (protocol A, B, Bs, swaps, real) and each
    head, the share of videos on which the two judges predict the same class. Every generated video is decoded
    once and shown to every judge. A judge file's robustness card (judges/train_judge.py) is copied to the JSON.

Run i uses seed i (the f ~ N(0, I) of protocol A, the prior samples of protocol B, the swap pairing); every
figure is reported as the mean +- sample standard deviation over --niter runs, on stdout as a table laid out
like the paper's and, with every run, in a JSON file (--out).

Time on the 2-core CPU of the README: see its Speed table.
"""
import argparse
import json
import math
import os
import re
import sys
import time

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from dataloader import DataError, load_sprites, to_float
from make_sprites import ACTIONS, DIRECTIONS
from model import JUDGE_HEADS, JUDGES
from utils import (CheckpointError, amp_dtype, git_revision, load_model, paper_encoder_names, pick_device,
                   read_checkpoint, read_model_checkpoint)

ATTRIBUTES = ("skin", "pant", "top", "hair")  # the columns of A, in order
SHIPPED_JUDGES = ("judges/sprite_judge.pt", "judges/clip_judge.pt")
# Protocol A on Sprites as the paper reports it (Bai et al. 2021, Table 1): Acc %, IS, H(y|x), H(y)
PAPER_ROW = ("C-DSVAE, paper (Table 1)", "99.99", "8.871", "0.014", "2.197")


# ---- metrics ----------------------------------------------------------------------------------------------
def entropy(p, dim=-1):
    """Shannon entropy in nats of the probability vectors p along `dim` (0 log 0 = 0)."""
    p = p.double()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim)


def inception_score(probs):
    """IS = exp(E_x KL(p(y|x) || p(y))) of class probabilities probs (N, K), with p(y) the mean of probs over x.

    1 when every prediction is the same; K when each prediction is one-hot and the classes are balanced."""
    probs = probs.double()
    marginal = probs.mean(0, keepdim=True)
    kl = (probs * (torch.log(probs.clamp_min(1e-30)) - torch.log(marginal.clamp_min(1e-30)))).sum(1)
    return math.exp(kl.mean().item())


def conditional_entropy(probs):
    """H(y|x) = E_x H(p(y|x)) in nats: the mean entropy of each prediction (0 when the judge is certain)."""
    return entropy(probs).mean().item()


def marginal_entropy(probs):
    """H(y) = H(E_x p(y|x)) in nats: the entropy of the mean prediction (ln K for balanced classes).

    log IS = H(y) - H(y|x)."""
    return entropy(probs.double().mean(0)).item()


def kl_marginals(probs_p, probs_q):
    """KL(p(y) || q(y)) in nats between the mean predictions p(y) = E probs_p and q(y) = E probs_q: how far the
    class mix of one set of videos is from that of another (0 when they are the same)."""
    p, q = probs_p.double().mean(0), probs_q.double().mean(0)
    return (p * (torch.log(p.clamp_min(1e-30)) - torch.log(q.clamp_min(1e-30)))).sum().item()


def accuracy(probs, labels):
    """Fraction of rows of probs (N, K) whose argmax is the label (N,)."""
    return (probs.argmax(1) == labels).double().mean().item()


def derangement(n, generator):
    """A uniformly random permutation of 0..n-1 without a fixed point (n >= 2), from `generator`."""
    if n < 2:
        raise ValueError("a derangement needs n >= 2")
    while True:  # about e tries on average
        perm = torch.randperm(n, generator=generator)
        if not (perm == torch.arange(n)).any():
            return perm


def mean_std(values):
    """(mean, sample standard deviation) of a list of numbers; the std is None for a single value."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ---- the judge --------------------------------------------------------------------------------------------
def judge_targets(A, D):
    """The label of each judge head: action is D; skin, pant, top, hair are the columns of A."""
    return {"action": D, **{a: A[:, i] for i, a in enumerate(ATTRIBUTES)}}


def judge_name(path):
    """A judge's name in tables and in the JSON: its file name without the extension."""
    return os.path.splitext(os.path.basename(path))[0]


def paper_judge(state, path):
    """The paper repo's judge (the state_dict of its classifier_Sprite_all, in judges/Sprite/sprite_judge.tar) as a
    judge file of ours: the same network as SpriteJudge (frame encoder, BiLSTM, a Linear-ReLU-Linear head per
    factor, fed the forward state at the last frame and the backward state at the first), names mapped."""
    renamed = {}
    for k, v in paper_encoder_names(state).items():
        head = re.fullmatch(r"cls_(\w+?)\.(\d\..+)", k)
        renamed[f"heads.{head[1]}.{head[2]}" if head else re.sub(r"^bilstm\.", "lstm.", k)] = v
    try:
        judge_args = dict(g_dim=state["bilstm.weight_ih_l0"].shape[1], rnn_size=state["bilstm.weight_hh_l0"].shape[1],
                          hidden=state["cls_action.0.weight"].shape[0], nf=state["encoder.c1.main.0.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"{path} looks like the paper repo's judge but has no {e}") from None
    return {"model": renamed, "judge_args": judge_args, "arch": "bilstm", "source": "the paper repo's judge"}


def load_judge(path, device="cpu"):
    """The judge network (model.JUDGES[its 'arch']) of a file of judges/train_judge.py or the paper repo's
    judge file, in fp32, in eval mode; CheckpointError if it is neither."""
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict) and "cls_action.0.weight" in ckpt["state_dict"]:
        ckpt = paper_judge(ckpt["state_dict"], path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "judge_args" not in ckpt:
        raise CheckpointError(f"{path} is not a judge of judges/train_judge.py (no 'model' / 'judge_args') nor the "
                              f"paper repo's (no 'state_dict' of its classifier_Sprite_all)")
    heads = ckpt.get("heads", JUDGE_HEADS)
    if dict(heads) != JUDGE_HEADS:
        raise CheckpointError(f"{path} has judge heads {dict(heads)}, expected {JUDGE_HEADS}")
    arch = ckpt.get("arch", "bilstm")  # judge files written before the second judge are all bilstm
    if arch not in JUDGES:
        raise CheckpointError(f"{path} is a judge of network {arch!r}, which this code does not know ({', '.join(JUDGES)})")
    try:
        judge = JUDGES[arch](**ckpt["judge_args"])
        judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()})
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not fit {JUDGES[arch].__name__} ({str(e).splitlines()[0][:200]})") from None
    return judge.to(device).eval()


# ---- evaluation -------------------------------------------------------------------------------------------
def for_inference(module):
    """`module` (in eval mode) made faster to run and the same up to rounding, in place: each BatchNorm that
    follows a convolution in an nn.Sequential is folded into it (its running statistics and affine map are
    one per-channel affine map), LeakyReLUs work in place, and convolution weights are channels-last. About 25%
    less time per video for the C-DSVAE decoder and the judges on this CPU (bf16, oneDNN)."""
    module.eval()
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.modules.conv._ConvNd) and isinstance(bn, nn.modules.batchnorm._BatchNorm):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn, transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd))
                seq._modules[b] = nn.Identity()
    for m in module.modules():
        if isinstance(m, nn.LeakyReLU):
            m.inplace = True
        elif isinstance(m, nn.modules.conv._ConvNd):
            m.to(memory_format=torch.channels_last_3d if m.weight.dim() == 5 else torch.channels_last)
    return module


def _autocast(device, amp):
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp)


def _judge_probs(judge, videos, amp):
    with _autocast(videos.device, amp):
        logits = judge(videos)
    return {k: v.float().softmax(-1).cpu() for k, v in logits.items()}


def _cat(parts):
    """Concatenate, along the videos, a list of (nested dicts of) tensors."""
    if isinstance(parts[0], dict):
        return {k: _cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _judge_all(judges, videos, amp):
    return {name: _judge_probs(judge, videos, amp) for name, judge in judges.items()}


@torch.inference_mode()
def encode_split(model, judges, X, device, batch_size=256, amp=False):
    """Of every video of X (N, T, 64, 64, 3) uint8: posterior means 'z' (N, T, z_dim) and 'f' (N, f_dim) on
    `device`, 'se' the summed squared error of decode(z_mean, f_mean), and 'probs': {judge name: {head: the
    judge's probabilities}} on the real videos."""
    parts = []
    for s in range(0, len(X), batch_size):
        x = to_float(X[s:s + batch_size]).to(device)
        with _autocast(device, amp):
            post = model.encode(x, random=False)
            recon = model.decode(post["z_mean"], post["f_mean"])
        parts.append({"z": post["z_mean"].float(), "f": post["f_mean"].float(),
                      "se": ((recon.float() - x) ** 2).flatten(1).sum(1, dtype=torch.float64).cpu(),
                      "probs": _judge_all(judges, x, amp)})
    return _cat(parts)


@torch.inference_mode()
def run_latents(model, post, seed, type_gt="all", sampled_b=False):
    """The (z, f) to decode in run `seed` for each protocol, and the swap pairing perm (video i gets the z of
    video perm[i]). From the posterior means post['z'], post['f'] of encode_split:

    'A' (type_gt action/all): (z_mean, f ~ N(0, I)): model.generate_fixed_motion(x) after torch.manual_seed(seed)
    'B' (type_gt static/all): (prior means along a sampled path, f_mean): model.generate_fixed_content(x) after
        torch.manual_seed(seed), the paper's protocol B
    'Bs' (type_gt static/all, and sampled_b): (that path's samples, f_mean)
    'swap': (z_mean[perm], f_mean): model.swap(x, x[perm])[0]
    (computed from the posteriors once, instead of encoding the videos again for each protocol)."""
    N, T = post["z"].shape[:2]
    out = {}
    device = post["f"].device
    # the caller's random state (a training run's, say) is left as it was
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        if type_gt in ("action", "all"):
            torch.manual_seed(seed)
            out["A"] = (post["z"], torch.randn_like(post["f"]))
        if type_gt in ("static", "all"):
            torch.manual_seed(seed)
            prior_means, prior_samples = model.sample_z_prior(N, T, like=post["f"])
            out["B"] = (prior_means, post["f"])
            if sampled_b:
                out["Bs"] = (prior_samples, post["f"])
    perm = derangement(N, torch.Generator().manual_seed(seed))
    out["swap"] = (post["z"][perm.to(post["z"].device)], post["f"])
    return out, perm


@torch.inference_mode()
def decode_and_judge(model, judges, z, f, batch_size=256, amp=False):
    """{judge name: {head: probabilities (CPU)}} on decode(z, f), batch by batch: each video is decoded once and
    shown to every judge."""
    parts = []
    for s in range(0, len(z), batch_size):
        with _autocast(z.device, amp):
            videos = model.decode(z[s:s + batch_size], f[s:s + batch_size])
        parts.append(_judge_all(judges, videos, amp))
    return _cat(parts)


def _action_scores(prefix, probs, D, real_action_probs):
    return {f"{prefix}_n": len(probs), f"{prefix}_action_acc": accuracy(probs, D),
            f"{prefix}_IS": inception_score(probs), f"{prefix}_H_y_given_x": conditional_entropy(probs),
            f"{prefix}_H_y": marginal_entropy(probs),
            f"{prefix}_KL_gen_vs_real_marginal": kl_marginals(probs, real_action_probs)}


def motion_parts(prefix, probs, sources):
    """Which video the judged motion came from, split into its parts (labels D = 3 * action + direction): for
    each source name and its labels, the fraction of videos whose predicted action type and facing direction
    equal that source's."""
    pred = probs.argmax(1)
    out = {}
    for name, D in sources.items():
        D = D.to(pred.device)
        out[f"{prefix}_type_from_{name}"] = (pred // len(DIRECTIONS) == D // len(DIRECTIONS)).double().mean().item()
        out[f"{prefix}_direction_from_{name}"] = (pred % len(DIRECTIONS) == D % len(DIRECTIONS)).double().mean().item()
    return out


def _attribute_scores(prefix, probs, A):
    accs = {f"{prefix}_{a}_acc": accuracy(probs[a], A[:, i]) for i, a in enumerate(ATTRIBUTES)}
    return {f"{prefix}_n": len(probs["skin"]), **accs, f"{prefix}_attr_mean_acc": sum(accs.values()) / len(accs)}


def real_scores(probs, A, D):
    """One judge's figures on the real test videos: accuracy per head, the attributes' mean, and the entropies."""
    return {"real_n": len(D), **{f"real_{k}_acc": accuracy(probs[k], y) for k, y in judge_targets(A, D).items()},
            "real_attr_mean_acc": sum(accuracy(probs[a], A[:, i]) for i, a in enumerate(ATTRIBUTES)) / len(ATTRIBUTES),
            "real_IS": inception_score(probs["action"]), "real_H_y_given_x": conditional_entropy(probs["action"]),
            "real_H_y": marginal_entropy(probs["action"])}


def generated_scores(gen, real_probs, A, D, perm):
    """One judge's figures on one run's generated videos gen = {'A' / 'B' / 'Bs' / 'swap': {head: probabilities}}."""
    row = {}
    if "A" in gen:
        row.update(_action_scores("A", gen["A"]["action"], D, real_probs["action"]))
        row.update(motion_parts("A", gen["A"]["action"], {"z": D}))
    for kind in ("B", "Bs"):
        if kind in gen:
            row.update(_attribute_scores(kind, gen[kind], A))
    row.update(_attribute_scores("swap", gen["swap"], A), swap_action_acc=accuracy(gen["swap"]["action"], D[perm]))
    row.update(motion_parts("swap", gen["swap"]["action"], {"z": D[perm], "f": D}))
    return row


def agreement(probs_a, probs_b):
    """{head: share of videos on which two judges' predictions (argmax) are the same}."""
    return {k: (probs_a[k].argmax(1) == probs_b[k].argmax(1)).double().mean().item() for k in probs_a}


def _summary(runs):
    stats = {k: mean_std([r[k] for r in runs]) for k in runs[0] if k != "seed"}
    return {"runs": runs, "mean": {k: v[0] for k, v in stats.items()}, "std": {k: v[1] for k, v in stats.items()}}


def judge_pairs(names):
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def evaluate(model, judges, test, device, seeds=(0,), amp=False, batch_size=256, type_gt="all", sampled_b=False):
    """Every figure of the module docstring, for each seed and each judge of `judges` ({name: judge network}):

    {'judges': {name: {'runs': [{figure: value}], 'mean': {...}, 'std': {...}}},
     'agreement': {'a vs b': {'runs', 'mean', 'std'}} for each pair of judges, 'recon_mse_per_pixel': float}.
    Figure keys: A_* (protocol A), B_* (protocol B, the prior's means), Bs_* (protocol B, its samples; only with
    sampled_b), swap_*,
    real_* (the judge on the real videos); *_n is the number of videos scored. Agreement keys:
    <A|B|Bs|swap|real>_<head>, the share of videos on which the pair's
    predictions for that head match. Every generated video is decoded once and shown to every judge."""
    X, A, D = test
    model.eval()
    for judge in judges.values():
        judge.eval()
    real = encode_split(model, judges, X, device, batch_size, amp)
    names = list(judges)
    runs, agree = {name: [] for name in names}, {f"{a} vs {b}": [] for a, b in judge_pairs(names)}
    for seed in seeds:
        latents, perm = run_latents(model, real, seed, type_gt, sampled_b)
        gen = {k: decode_and_judge(model, judges, z, f, batch_size, amp) for k, (z, f) in latents.items()}
        for name in names:
            runs[name].append({"seed": seed, **generated_scores({k: g[name] for k, g in gen.items()},
                                                                real["probs"][name], A, D, perm),
                               **real_scores(real["probs"][name], A, D)})
        for a, b in judge_pairs(names):
            kinds = {**gen, "real": real["probs"]}
            agree[f"{a} vs {b}"].append({"seed": seed, **{f"{kind}_{head}": v for kind, p in kinds.items()
                                                          for head, v in agreement(p[a], p[b]).items()}})
    return {"judges": {name: _summary(r) for name, r in runs.items()},
            "agreement": {pair: _summary(r) for pair, r in agree.items()},
            "recon_mse_per_pixel": real["se"].sum().item() / X[:1].numel() / len(X)}


# ---- report -----------------------------------------------------------------------------------------------
def _pm(stats, k, pct=False, digits=3):
    """'mean ± std' of figure k of {'mean', 'std'}, in % with pct; '-' when absent."""
    m, s = stats["mean"], stats["std"]
    if k not in m:
        return "-"
    f, d = (100, 2) if pct else (1, digits)
    return f"{m[k] * f:.{d}f}" + ("" if s[k] is None else f" ± {s[k] * f:.{d}f}")


def format_table(result):
    """The figures as text, one row per judge: protocol A laid out like the paper's Table 1 (Acc, IS, H(y|x),
    H(y)), then accuracies per head for protocol B, the swaps and the real videos, then the judges' agreement."""
    w = 44
    per_judge = result["judges"]
    first = next(iter(per_judge.values()))
    n, runs = result.get("n_test", first["mean"].get("real_n")), len(first["runs"])
    lines = [f"Sprites test split: {n} videos, each scored in each of {runs} run(s) by {len(per_judge)} judge(s); "
             "mean ± sample std over runs",
             "", "Protocol A: fix motion (posterior mean z), sample content f ~ N(0, I); judge's action prediction",
             f"{'':<{w}} {'Acc (%)':>16} {'IS':>16} {'H(y|x)':>16} {'H(y)':>16}",
             f"{PAPER_ROW[0]:<{w}} " + " ".join(f"{v:>16}" for v in PAPER_ROW[1:])]
    for name, st in per_judge.items():
        for label, p in (("this checkpoint", "A"), ("real test videos", "real")):
            if f"{p}_IS" in st["mean"]:
                lines.append(f"{label + ', ' + name:<{w}} {_pm(st, f'{p}_action_acc', True):>16} "
                             f"{_pm(st, f'{p}_IS'):>16} {_pm(st, f'{p}_H_y_given_x'):>16} {_pm(st, f'{p}_H_y'):>16}")
    lines += ["", f"{'judge accuracy (%)':<{w}} {'action':>16} " + " ".join(f"{a:>16}" for a in ATTRIBUTES)
              + f" {'attr. mean':>16}"]
    rows = (("protocol B: fix f, z = prior means", "B", None), ("protocol Bs: fix f, z ~ prior", "Bs", None),
            ("swap: f of i, z of j", "swap", "swap_action_acc"),
            ("real test videos", "real", "real_action_acc"))
    for label, prefix, action_key in rows:
        for name, st in per_judge.items():
            if f"{prefix}_skin_acc" in st["mean"]:
                lines.append(f"{label + ', ' + name:<{w}} {_pm(st, action_key, True) if action_key else '-':>16} "
                             + " ".join(f"{_pm(st, f'{prefix}_{a}_acc', True):>16}" for a in ATTRIBUTES)
                             + f" {_pm(st, f'{prefix}_attr_mean_acc', True):>16}")
    lines.append("  (swaps: attributes of i, action of j)")
    for name, st in per_judge.items():
        lines.append(f"  {name}: the swap's motion in parts ({'/'.join(ACTIONS)} x {'/'.join(DIRECTIONS)}): action "
                     f"type of j {_pm(st, 'swap_type_from_z', True)}%, of i {_pm(st, 'swap_type_from_f', True)}%; "
                     f"direction of j {_pm(st, 'swap_direction_from_z', True)}%, of i "
                     f"{_pm(st, 'swap_direction_from_f', True)}%"
                     + (f"; protocol A: type {_pm(st, 'A_type_from_z', True)}%, direction "
                        f"{_pm(st, 'A_direction_from_z', True)}%" if "A_type_from_z" in st["mean"] else ""))
    for pair, st in result["agreement"].items():
        lines += ["", f"agreement of the judges {pair} (% of videos with the same prediction)",
                  f"{'':<{w}} " + " ".join(f"{h:>16}" for h in JUDGE_HEADS)]
        for kind, label in (("A", "protocol A"), ("B", "protocol B"), ("Bs", "protocol Bs"), ("swap", "swaps"),
                            ("real", "real test videos")):
            if f"{kind}_action" in st["mean"]:
                lines.append(f"{label:<{w}} " + " ".join(f"{_pm(st, f'{kind}_{h}', True):>16}" for h in JUDGE_HEADS))
    lines += ["", f"reconstruction MSE per pixel, decode(z_mean, f_mean), pixels in [0, 1]: "
              f"{result['recon_mse_per_pixel']:.6f}"]
    return "\n".join(lines)


def write_json(obj, path):
    """JSON to a temporary file beside `path`, then rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True,
                   help="checkpoint of train_cdsvae.py (a .pt file), or the paper repo's (a dict with 'model')")
    p.add_argument("--judge", action="append", default=None,
                   help="judge weights, ours or the paper repo's judges/Sprite/sprite_judge.tar; repeat for several "
                        "judges, each named by its file name (default: both shipped "
                        f"judges, {' and '.join(SHIPPED_JUDGES)})")
    p.add_argument("--data_root", default="data/Sprite/data.pkl", help="the data pickle of make_sprites.py")
    p.add_argument("--type_gt", choices=("action", "static", "all"), default="all",
                   help="action: protocol A; static: protocol B; all: both (default). Swaps are always scored")
    p.add_argument("--sampled_b", action="store_true",
                   help="also score protocol Bs: decode the prior path's samples instead of its means (not the "
                        "paper's figure; one more decode per run; default off)")
    p.add_argument("--test_stride", type=int, default=1,
                   help="score every this-many-th test video only, for quick probes (default 1: the whole split)")
    p.add_argument("--niter", type=int, default=5, help="runs, with seeds 0..niter-1 (default 5)")
    p.add_argument("--batch_size", type=int, default=256, help="videos per forward pass (default 256)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", action="store_true",
                   help="autocast: bf16 on the CPU and on bf16-capable GPUs, else fp16 (default off: fp32)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's choice)")
    p.add_argument("--out", default=None, help="JSON of every run and the mean/std (default <model_dir>.results.json)")
    for k in ("f_dim", "z_dim", "g_dim", "rnn_size"):
        p.add_argument(f"--{k}", type=int, default=None, help=f"refuse a checkpoint whose {k} is not this")
    args = p.parse_args(argv)
    if args.niter < 1 or args.batch_size < 1 or args.test_stride < 1:
        p.error("--niter, --batch_size and --test_stride must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    judge_paths = {judge_name(path): path for path in args.judge or SHIPPED_JUDGES}
    if len(judge_paths) < len(args.judge or SHIPPED_JUDGES):
        sys.exit(f"error: judges are named by their file names, and two of --judge {' '.join(args.judge)} share one; "
                 f"give each judge once, under its own name")
    try:
        model = load_model(args.model_dir, device, f_dim=args.f_dim, z_dim=args.z_dim, g_dim=args.g_dim,
                           rnn_size=args.rnn_size)
        judges = {name: for_inference(load_judge(path, device)) for name, path in judge_paths.items()}
        test = tuple(t[::args.test_stride] for t in load_sprites(args.data_root)["test"])
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    model = for_inference(model)
    X, A, D = test
    if len(X) < 2:
        sys.exit(f"error: {args.data_root}: the test split has {len(X)} video(s); swaps need at least 2")
    t0 = time.time()
    result = evaluate(model, judges, test, device, seeds=range(args.niter), amp=args.amp,
                      batch_size=args.batch_size, type_gt=args.type_gt, sampled_b=args.sampled_b)
    seconds = time.time() - t0
    counts = torch.bincount(D, minlength=JUDGE_HEADS["action"]).tolist()
    judge_files = {name: {k: read_checkpoint(path).get(k) for k in ("arch", "test_accuracy", "robustness")}
                   for name, path in judge_paths.items()}
    result.update(n_test=len(X), action_counts=counts, class_balanced=len(set(counts)) == 1,
                  model_dir=args.model_dir, model_args=read_model_checkpoint(args.model_dir)["model_args"],
                  judge_files={name: {"path": judge_paths[name], **info} for name, info in judge_files.items()},
                  data_root=args.data_root, test_stride=args.test_stride,
                  type_gt=args.type_gt, sampled_b=args.sampled_b, niter=args.niter, amp=args.amp, batch_size=args.batch_size,
                  device=str(device), threads=torch.get_num_threads(), seconds=round(seconds, 1),
                  git_revision=git_revision())
    print(format_table(result))
    print(f"\n{args.niter} run(s) x {len(X)} test videos (actions {'balanced' if result['class_balanced'] else 'NOT balanced'}"
          f": {counts}) in {seconds:.1f} s on {device}, {torch.get_num_threads()} thread(s)"
          f"{', bf16 autocast' if args.amp else ''}")
    out = args.out or args.model_dir + ".results.json"
    try:
        write_json(result, out)
    except OSError as e:
        sys.exit(f"error: cannot write {out}: {e}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
