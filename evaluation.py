"""A sequential VAE scored on a benchmark's test split: the protocols' videos (A, B, swaps), each
decoded once and shown to every judge; each judge's figures, their agreement, the latent probes.
On Moving MNIST also the motion without a judge: each generated frame's centre of mass against the
positions of the video whose z it was given.
"""
import math

import torch

from benchmarks import BENCHMARKS
from dataloader import ATTRIBUTES, DIRECTIONS, factor_labels, to_float
from model import fixed_content, fixed_motion, swapped
from probes import probe_table
from smmnist import centre_of_mass
from utils import RefusedInput, autocast, progress


class NotFiniteError(RefusedInput):
    """A model or judge whose outputs hold NaN or inf: there is nothing to score. `judge`: the
    judge whose outputs they are (None: the model's), so that the right file is blamed."""

    def __init__(self, message, judge=None):
        super().__init__(message)
        self.judge = judge


def _refuse_not_finite(finite, what, judge=None):
    """NotFiniteError unless `finite` (read on the host) holds."""
    if not finite:
        use = "a sound judge file" if judge else "an earlier checkpoint"
        raise NotFiniteError(f"{what} hold NaN or inf values (diverged weights, or an overflow "
                             f"under --amp?): nothing is scored; use {use}", judge)


# ---- metrics -------------------------------------------------------------------------------------
def entropy(p, dim=-1):
    """Shannon entropy in nats of the probability vectors p along `dim` (0 log 0 = 0)."""
    p = p.double()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim)


def inception_score(probs):
    """IS = exp(E_x KL(p(y|x) || p(y))) of probabilities probs (N, K), p(y) their mean: 1 to K."""
    probs = probs.double()
    marginal = probs.mean(0, keepdim=True)
    kl = (probs * (torch.log(probs.clamp_min(1e-30)) - torch.log(marginal.clamp_min(1e-30)))).sum(1)
    return math.exp(kl.mean().item())


def conditional_entropy(probs):
    """H(y|x) = E_x H(p(y|x)) in nats: 0 when the judge is certain."""
    return entropy(probs).mean().item()


def marginal_entropy(probs):
    """H(y) = H(E_x p(y|x)) in nats (ln K for balanced classes; log IS = H(y) - H(y|x))."""
    return entropy(probs.double().mean(0)).item()


def kl_marginals(probs_p, probs_q):
    """KL(p(y) || q(y)) in nats between the mean predictions of two sets of videos."""
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
    """(mean, sample standard deviation) of a list of numbers; the std is None for one value."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# ---- one pass over the videos --------------------------------------------------------------------
def _cat(parts):
    """Concatenate, along the videos, a list of (nested dicts of) tensors."""
    if isinstance(parts[0], dict):
        return {k: _cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def judge_all(judges, videos, amp, what="the videos"):
    """{judge: {head: probabilities}} on a batch, in one read to the host; refuses NaN or inf."""
    heads, parts = [], []
    for name, judge in judges.items():
        with autocast(videos.device, amp):
            logits = judge(videos)
        for k, v in logits.items():
            heads.append((name, k, v.shape[1]))
            parts.append(v.float().softmax(-1))
    finite = torch.isfinite(videos).flatten(1).all(1, keepdim=True)
    host = torch.cat(parts + [finite.float()], dim=1).cpu()  # the batch's one read-back
    _refuse_not_finite(bool(host[:, -1].all()), what)
    out, column = {}, 0
    for name, k, classes in heads:
        out.setdefault(name, {})[k] = host[:, column:column + classes]
        column += classes
    for name, probs in out.items():
        _refuse_not_finite(all(bool(torch.isfinite(p).all()) for p in probs.values()),
                           f"the outputs of judge {name}", judge=name)
    return out


@torch.inference_mode()
def encode_videos(model, X, device, batch_size=256, amp=False, judges=None, decode=True,
                  desc="encode"):
    """Of every video of X (uint8), in one pass: posterior means 'z', 'f' (and 'z_logvar',
    'f_logvar') on `device`; with decode 'se', the squared error of decode(z_mean, f_mean); with
    judges 'probs', {judge: {head: probabilities}} on the real videos."""
    parts = []
    with progress(total=len(X), desc=desc, unit="video", leave=False) as bar:
        for s in range(0, len(X), batch_size):
            x = to_float(X[s:s + batch_size].to(device, non_blocking=True))
            with autocast(device, amp):
                post = model.encode(x, random=False)
                recon = model.decode(post["z_mean"], post["f_mean"]) if decode else None
            part = {"z": post["z_mean"].float(), "f": post["f_mean"].float(),
                    **{k: post[k].float() for k in ("z_logvar", "f_logvar") if k in post}}
            if decode:
                part["se"] = ((recon.float() - x) ** 2).flatten(1).sum(1, dtype=torch.float64)
            if judges:
                part["probs"] = judge_all(judges, x, amp)
            parts.append(part)
            bar.update(len(x))
    out = _cat(parts)
    if decode:
        out["se"] = out["se"].cpu()
        _refuse_not_finite(bool(torch.isfinite(out["se"]).all()), "the model's reconstructions")
    return out


@torch.inference_mode()
def run_latents(model, post, seed, type_gt="all", sampled_b=False, prior_means=True):
    """The (z, f) that run `seed` decodes for each protocol ('A', 'B' unless not prior_means, 'Bs'
    with sampled_b, 'swap'), with the draws of model.generate_* after manual_seed(seed), and the
    swap's pairing perm."""
    out = {}
    device = post["f"].device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        if type_gt in ("action", "all"):
            torch.manual_seed(seed)
            out["A"] = fixed_motion(post["z"], post["f"])
        if type_gt in ("static", "all"):
            torch.manual_seed(seed)
            means, sampled = fixed_content(model, post["z"], post["f"])
            if prior_means:
                out["B"] = means
            if sampled_b:
                out["Bs"] = sampled
    perm = derangement(len(post["f"]), torch.Generator().manual_seed(seed))
    out["swap"] = swapped(post["z"], post["f"], perm.to(device))
    return out, perm


@torch.inference_mode()
def decode_and_judge(model, judges, z, f, batch_size=256, amp=False, desc="decode",
                     positions=False):
    """{judge: {head: probabilities}} on decode(z, f): each video decoded once for every judge;
    with positions also 'com': each frame's centre of mass (N, T, 2) on the host."""
    parts = []
    for s in progress(range(0, len(z), batch_size), desc=desc, unit="batch", leave=False):
        with autocast(z.device, amp):
            videos = model.decode(z[s:s + batch_size], f[s:s + batch_size])
        part = judge_all(judges, videos, amp, "the model's generated videos")
        if positions:
            part["com"] = centre_of_mass(videos[:, :, 0].float()).cpu()
        parts.append(part)
    return _cat(parts)


# ---- the figures of one judge --------------------------------------------------------------------
def _action_scores(prefix, probs, D, real_action_probs):
    return {f"{prefix}_n": len(probs), f"{prefix}_action_acc": accuracy(probs, D),
            f"{prefix}_IS": inception_score(probs),
            f"{prefix}_H_y_given_x": conditional_entropy(probs),
            f"{prefix}_H_y": marginal_entropy(probs),
            f"{prefix}_KL_gen_vs_real_marginal": kl_marginals(probs, real_action_probs)}


def motion_parts(prefix, probs, sources):
    """For each source of labels, the share of predicted action types and directions of it."""
    pred = probs.argmax(1)
    out = {}
    n = len(DIRECTIONS)
    for name, D in sources.items():
        D = D.to(pred.device)
        out[f"{prefix}_type_from_{name}"] = (pred // n == D // n).double().mean().item()
        out[f"{prefix}_direction_from_{name}"] = (pred % n == D % n).double().mean().item()
    return out


def _attribute_scores(prefix, probs, A):
    accs = {f"{prefix}_{a}_acc": accuracy(probs[a], A[:, i]) for i, a in enumerate(ATTRIBUTES)}
    return {f"{prefix}_n": len(probs["skin"]), **accs,
            f"{prefix}_attr_mean_acc": sum(accs.values()) / len(accs)}


def real_scores(probs, A, D):
    """One judge's figures on the real test videos: accuracies, IS and entropies."""
    accs = {f"real_{k}_acc": accuracy(probs[k], y) for k, y in factor_labels(A, D).items()}
    return {"real_n": len(D), **accs,
            "real_attr_mean_acc": sum(accs[f"real_{a}_acc"] for a in ATTRIBUTES) / len(ATTRIBUTES),
            "real_IS": inception_score(probs["action"]),
            "real_H_y_given_x": conditional_entropy(probs["action"]),
            "real_H_y": marginal_entropy(probs["action"])}


def generated_scores(gen, real_probs, A, D, perm):
    """One judge's figures on one run's videos gen = {'A' / 'B' / 'Bs' / 'swap': {head: probs}}."""
    row = {}
    if "A" in gen:
        row.update(_action_scores("A", gen["A"]["action"], D, real_probs["action"]))
        row.update(motion_parts("A", gen["A"]["action"], {"z": D}))
    for kind in ("B", "Bs"):
        if kind in gen:
            row.update(_attribute_scores(kind, gen[kind], A))
    row.update(_attribute_scores("swap", gen["swap"], A),
               swap_action_acc=accuracy(gen["swap"]["action"], D[perm]))
    row.update(motion_parts("swap", gen["swap"]["action"], {"z": D[perm], "f": D}))
    return row


# ---- Moving MNIST: the digit judged, the motion measured ----------------------------------------
def trajectory_error(com, P):
    """Mean distance in px a frame between centres of mass com (N, T, 2) and the first digit's
    positions P (N, T, K, 2)."""
    return (com.double() - P[:, :, 0].double()).norm(dim=-1).mean().item()


def _digit_scores(prefix, probs, y):
    return {f"{prefix}_n": len(probs), f"{prefix}_digit_acc": accuracy(probs, y),
            f"{prefix}_IS": inception_score(probs),
            f"{prefix}_H_y_given_x": conditional_entropy(probs),
            f"{prefix}_H_y": marginal_entropy(probs)}


def digit_scores(gen, real_probs, Y, perm):
    """One judge's figures on Moving MNIST: fixed content (f kept, z a prior path's samples: the
    digit should stay), fixed motion (z kept, f ~ N(0, I): any digit, a sharp one), swaps (the
    digit of f's video), the real test videos."""
    y = Y[:, 0]
    row = {}
    for kind, prefix in (("Bs", "fixed_content"), ("A", "fixed_motion")):
        if kind in gen:
            row.update(_digit_scores(prefix, gen[kind]["digit"], y))
    return {**row, "swap_digit_acc": accuracy(gen["swap"]["digit"], y),
            **_digit_scores("real", real_probs["digit"], y)}


def trajectory_errors(gen, P, perm, seed):
    """Px a frame: fixed motion's frames against their z's video, the swap's against their z's
    video (perm) and, as chance, against another video's (a seeded derangement of perm)."""
    other = perm[derangement(len(perm), torch.Generator().manual_seed(seed + 1))]
    fixed = {"fixed_motion": trajectory_error(gen["A"]["com"], P)} if "A" in gen else {}
    return {"seed": seed, **fixed, "swap": trajectory_error(gen["swap"]["com"], P[perm]),
            "chance": trajectory_error(gen["swap"]["com"], P[other])}


def position_floor(X, P, batch_size=256):
    """Px a frame between the real videos' centres of mass and their positions: every motion
    figure's floor."""
    com = torch.cat([centre_of_mass(X[s:s + batch_size, ..., 0]) for s in range(0, len(X),
                                                                                batch_size)])
    return trajectory_error(com, P)


def agreement(probs_a, probs_b):
    """{head: share of videos on which two judges' predictions (argmax) are the same}."""
    return {k: (probs_a[k].argmax(1) == probs_b[k].argmax(1)).double().mean().item()
            for k in probs_a}


def _summary(runs):
    stats = {k: mean_std([r[k] for r in runs]) for k in runs[0] if k != "seed"}
    return {"runs": runs, "mean": {k: v[0] for k, v in stats.items()},
            "std": {k: v[1] for k, v in stats.items()}}


def judge_pairs(names):
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def _probe_figures(model, probe_train, real, test, device, batch_size, amp, seed, bench):
    """probes.probe_table fitted on probe_train (X, A, D), scored on the encoded test videos."""
    X, A, D = probe_train
    train_post = encode_videos(model, X, device, batch_size, amp, decode=False,
                               desc="encode, probes' train videos")
    out = probe_table(train_post, real, bench.probe_labels(A, D), bench.probe_labels(*test[1:]),
                      seed, bench.probe_factors, bench.probe_targets(A, D),
                      bench.probe_targets(*test[1:]))
    out["probes_n"] = {"train": len(X), "test": len(test[0])}
    return out


def evaluate(model, judges, test, device, seeds=(0,), amp=False, batch_size=256, type_gt="all",
             sampled_b=False, probe_train=None, probe_seed=0, bench=None):
    """{'judges': {name: {'runs': [{figure: value}], 'mean', 'std'}}, 'agreement': {'a vs b': ...},
    'recon_mse_per_pixel'} over `seeds`, and with probe_train the probes. Figures on Sprites (the
    default bench): A_*, B_*, Bs_*, swap_*, real_*; on Moving MNIST those of digit_scores, and
    'trajectory_error'. `model` needs encode(x, random=False) -> {'f_mean', 'z_mean'} ('f_logvar',
    'z_logvar' for the sampled probes), decode(z, f) and sample_z_prior(N, T, like=)."""
    bench = bench or BENCHMARKS["sprites"]
    X, A, D = test
    model.eval()
    for judge in judges.values():
        judge.eval()
    real = encode_videos(model, X, device, batch_size, amp, judges, desc="encode, test videos")
    names = list(judges)
    runs = {name: [] for name in names}
    agree = {f"{a} vs {b}": [] for a, b in judge_pairs(names)}
    paths = []
    for seed in progress(seeds, desc="runs", unit="run"):
        # Moving MNIST's fixed content decodes the prior's samples (S3VAE's protocol), not means
        latents, perm = run_latents(model, real, seed, type_gt, sampled_b or bench.positions,
                                    prior_means=not bench.positions)
        gen = {k: decode_and_judge(model, judges, z, f, batch_size, amp, desc=f"decode {k}",
                                   positions=bench.positions)
               for k, (z, f) in latents.items()}
        for name in names:
            runs[name].append({"seed": seed, **judge_figures(
                {k: g[name] for k, g in gen.items()}, real["probs"][name], A, D, perm, bench)})
        if bench.positions:
            paths.append(trajectory_errors(gen, D, perm, seed))
        kinds = {**gen, "real": real["probs"]}
        for a, b in judge_pairs(names):
            agree[f"{a} vs {b}"].append({"seed": seed, **{
                f"{kind}_{head}": v for kind, p in kinds.items()
                for head, v in agreement(p[a], p[b]).items()}})
    result = {"judges": {name: _summary(r) for name, r in runs.items()},
              "agreement": {pair: _summary(r) for pair, r in agree.items()},
              "recon_mse_per_pixel": real["se"].sum().item() / X[:1].numel() / len(X)}
    if bench.positions:
        summary = _summary(paths)
        result["trajectory_error"] = {**summary["mean"], "floor": position_floor(X, D),
                                      "std": summary["std"], "runs": paths}
    if probe_train is not None:
        result.update(_probe_figures(model, probe_train, real, test, device, batch_size, amp,
                                     probe_seed, bench))
    return result


def judge_figures(gen, real_probs, A, D, perm, bench):
    """One judge's figures of one run, by what the benchmark's D holds."""
    if bench.positions:
        return digit_scores(gen, real_probs, A, perm)
    return {**generated_scores(gen, real_probs, A, D, perm), **real_scores(real_probs, A, D)}
