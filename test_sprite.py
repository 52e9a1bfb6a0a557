"""Score a C-DSVAE checkpoint on every test video of Sprites (or, with --dataset smmnist, Stochastic
Moving MNIST) under one or more judges (default: the data set's two shipped ones), and report how
far the judges agree.

    python test_sprite.py --model_dir checkpoints/cdsvae_sprites_cpu.pt [--niter 5] [--amp]
    python test_sprite.py --model_dir ... --judge judges/sprite_judge.pt --judge my_judge.pt

Protocol A (the paper's Table 1): each video's z (posterior mean) with f ~ N(0, I); the judge's
    action accuracy, IS, H(y|x), H(y) and KL(p_gen(y) || p_real(y)) of the mean predictions.
Protocol B: each video's f with a path of the learned prior, decoding its per-step means as the
    paper does (Bs, --sampled_b: its samples); the judge's accuracy on skin, pant, top, hair.
Swaps: f of video i with z of video j (a seeded derangement); accuracy on i's attributes and j's
    action, and how often the predicted action type and direction are j's (z) or i's (f).
Sanity: the reconstruction MSE per pixel, and the judge on the real test videos.
Agreement: for each pair of judges, kind of video and head, the share of equal predictions.
Latent probes (--no-probes: off): linear classifiers fitted on the posteriors of
    --probe_characters train characters, scored on the test videos, from f and z to each factor.

Moving MNIST (--dataset smmnist): fixed content (f kept, z a prior path's samples: the judges'
    digit accuracy, IS, H(y|x), H(y)); fixed motion (z kept, f ~ N(0, I): the trajectory error, px
    a frame between each generated frame's centre of mass and the source video's positions, and
    the digits' IS); swaps (the digit of f's video; the trajectory error against z's video, and
    against another video's as chance); the floor (the real videos' own error); probes f / z ->
    digit (accuracy) and -> positions (R²).

Run i uses seed i; every figure is the mean +- sample std over --niter runs, printed as a table
laid out like the paper's and written with every run to a JSON file (--out).
"""
import argparse
import os
import sys
import time

import torch

from dataloader import (ACTIONS, ATTRIBUTES, DIRECTIONS, FACTORS, DataError, character_id,
                        validation_split)
from evaluation import NotFiniteError, evaluate
from benchmarks import BENCHMARKS, add_dataset_flag, benchmark_of
from judges.networks import judge_name, load_judge
from utils import (CheckpointError, OneLineErrors, add_amp_flag, amp_dtype, check_writable,
                   dtype_name, for_inference, git_revision, held_lock, model_from_checkpoint,
                   pick_device, precision_note, read_checkpoint, read_model_checkpoint,
                   refuse_overwriting, run_main, write_json)
# Protocol A on Sprites as the paper reports it (Bai et al. 2021, Table 1): Acc %, IS, H(y|x), H(y)
PAPER_ROW = ("C-DSVAE, paper (Table 1)", "99.99", "8.871", "0.014", "2.197")


# ---- report ------------------------------------------------------------------------------------
W = 44  # the width of a table's label column


def _pm(stats, k, pct=False, digits=3):
    """'mean ± std' of figure k of {'mean', 'std'}, in % with pct; '-' when absent."""
    m, s = stats["mean"], stats["std"]
    if k not in m:
        return "-"
    f, d = (100, 2) if pct else (1, digits)
    return f"{m[k] * f:.{d}f}" + ("" if s[k] is None else f" ± {s[k] * f:.{d}f}")


def _row(label, cells):
    return f"{label:<{W}} " + " ".join(f"{c:>16}" for c in cells)


def _protocol_a_rows(per_judge):
    lines = [_row("", ("Acc (%)", "IS", "H(y|x)", "H(y)")), _row(PAPER_ROW[0], PAPER_ROW[1:])]
    for name, st in per_judge.items():
        for label, p in (("this checkpoint", "A"), ("real test videos", "real")):
            if f"{p}_IS" in st["mean"]:
                lines.append(_row(f"{label}, {name}", [_pm(st, f"{p}_action_acc", True)] + [
                    _pm(st, f"{p}_{k}") for k in ("IS", "H_y_given_x", "H_y")]))
    return lines


def _accuracy_rows(per_judge):
    lines = ["", _row("judge accuracy (%)", ("action",) + ATTRIBUTES + ("attr. mean",))]
    rows = (("protocol B: fix f, z = prior means", "B", None),
            ("protocol Bs: fix f, z ~ prior", "Bs", None),
            ("swap: f of i, z of j", "swap", "swap_action_acc"),
            ("real test videos", "real", "real_action_acc"))
    for label, prefix, action_key in rows:
        for name, st in per_judge.items():
            if f"{prefix}_skin_acc" in st["mean"]:
                action = _pm(st, action_key, True) if action_key else "-"
                lines.append(_row(f"{label}, {name}", [action] + [
                    _pm(st, f"{prefix}_{a}_acc", True) for a in ATTRIBUTES + ("attr_mean",)]))
    lines.append("  (swaps: attributes of i, action of j)")
    return lines


def _motion_part_rows(per_judge):
    lines = []
    for name, st in per_judge.items():
        protocol_a = (f"; protocol A: type {_pm(st, 'A_type_from_z', True)}%, direction "
                      f"{_pm(st, 'A_direction_from_z', True)}%" if "A_type_from_z" in st["mean"]
                      else "")
        lines.append(f"  {name}: the swap's motion in parts ({'/'.join(ACTIONS)} x "
                     f"{'/'.join(DIRECTIONS)}): action type of j "
                     f"{_pm(st, 'swap_type_from_z', True)}%, of i "
                     f"{_pm(st, 'swap_type_from_f', True)}%; direction of j "
                     f"{_pm(st, 'swap_direction_from_z', True)}%, of i "
                     f"{_pm(st, 'swap_direction_from_f', True)}%" + protocol_a)
    return lines


SPRITES_KINDS = {"A": "protocol A", "B": "protocol B", "Bs": "protocol Bs", "swap": "swaps",
                 "real": "real test videos"}
SMMNIST_KINDS = {"A": "fixed motion", "Bs": "fixed content", "swap": "swaps",
                 "real": "real test videos"}


def _agreement_rows(agreement, heads=tuple(FACTORS), kinds=SPRITES_KINDS):
    lines = []
    for pair, st in agreement.items():
        lines += ["", f"agreement of the judges {pair} (% of videos with the same prediction)",
                  _row("", heads)]
        for kind, label in kinds.items():
            if f"{kind}_{heads[0]}" in st["mean"]:
                lines.append(_row(label, [_pm(st, f"{kind}_{h}", True) for h in heads]))
    return lines


def format_table(result):
    """The figures as text, a row per judge: protocol A laid out like the paper's Table 1, the
    accuracies per head, the motion's parts, the judges' agreement."""
    per_judge = result["judges"]
    first = next(iter(per_judge.values()))
    n, runs = result.get("n_test", first["mean"].get("real_n")), len(first["runs"])
    lines = [f"Sprites test split: {n} videos, each scored in each of {runs} run(s) by "
             f"{len(per_judge)} judge(s); mean ± sample std over runs",
             "", "Protocol A: fix motion (posterior mean z), sample content f ~ N(0, I); judge's "
             "action prediction"]
    lines += (_protocol_a_rows(per_judge) + _accuracy_rows(per_judge)
              + _motion_part_rows(per_judge) + _agreement_rows(result["agreement"]))
    lines += ["", f"reconstruction MSE per pixel, decode(z_mean, f_mean), pixels in [0, 1]: "
              f"{result['recon_mse_per_pixel']:.6f}"]
    return "\n".join(lines)


def format_smmnist_table(result):
    """Moving MNIST's figures as text: a row per judge and kind of video, the trajectory errors."""
    per_judge = result["judges"]
    first = next(iter(per_judge.values()))
    lines = [f"Stochastic Moving MNIST test split: {first['mean']['real_n']} videos, each scored "
             f"in each of {len(first['runs'])} run(s) by {len(per_judge)} judge(s); mean ± "
             f"sample std over runs", "",
             _row("digit judged", ("Acc (%)", "IS", "H(y|x)", "H(y)"))]
    for label, prefix in (("fixed content: f kept, z ~ prior", "fixed_content"),
                          ("fixed motion: z kept, f ~ N(0, I)", "fixed_motion"),
                          ("real test videos", "real")):
        for name, st in per_judge.items():
            lines.append(_row(f"{label}, {name}", [_pm(st, f"{prefix}_digit_acc", True)] + [
                _pm(st, f"{prefix}_{k}") for k in ("IS", "H_y_given_x", "H_y")]))
    for name, st in per_judge.items():
        lines.append(_row(f"swap: the digit of f's video, {name}",
                          [_pm(st, "swap_digit_acc", True)]))
    paths = result["trajectory_error"]
    lines += ["", "trajectory error (px a frame, centre of mass against the positions of z's "
                  "video)",
              _row("", ("fixed motion", "swap", "chance", "floor"))]
    stats = {"mean": paths, "std": paths["std"]}
    cells = [_pm(stats, k) for k in ("fixed_motion", "swap", "chance")]
    lines.append(_row("", cells + [f"{paths['floor']:.3f}"]))
    lines += _agreement_rows(result["agreement"], ("digit",), SMMNIST_KINDS)
    lines += ["", f"reconstruction MSE per pixel, decode(z_mean, f_mean), pixels in [0, 1]: "
              f"{result['recon_mse_per_pixel']:.6f}"]
    return "\n".join(lines)


def format_probes(result):
    """The latent probes as text: a row per latent and posterior, a column per factor, in %."""
    w, factors = 28, list(result["probes_chance"])
    n = result["probes_n"]
    lines = [f"latent probes: linear softmax classifiers fitted on the posteriors of {n['train']} "
             f"train videos, accuracy (%) on the {n['test']} test videos",
             f"{'':<{w}}" + "".join(f"{k:>12}" for k in factors)]
    for key, posterior in (("probes", "means"), ("probes_sampled", "samples")):
        for latent in ("f", "z"):
            if key in result:
                row = result[key][latent]
                lines.append(f"{latent + ', posterior ' + posterior:<{w}}"
                             + "".join(f"{100 * row[k]:>12.2f}" for k in factors))
    lines.append(f"{'chance':<{w}}"
                 + "".join(f"{100 * result['probes_chance'][k]:>12.2f}" for k in factors))
    if "probes_sampled" not in result:
        lines.append("  (no posterior samples: the model gives no f_logvar / z_logvar)")
    for latent, row in result.get("probes_r2", {}).items():
        lines.append(f"{latent + ', posterior means':<{w}}" + "".join(
            f"  R² of {k} {v:.3f} (linear ridge)" for k, v in row.items()))
    return "\n".join(lines)


def parse_args(argv=None):
    p = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    arg("--model_dir", required=True, help="checkpoint of train_cdsvae.py or of the paper repo")
    arg("--judge", action="append", default=None,
        help="judge file, ours or the paper repo's; repeatable (default: the shipped judges)")
    add_dataset_flag(arg)
    arg("--type_gt", choices=("action", "static", "all"), default="all",
        help="action: protocol A; static: protocol B; all: both (default); swaps always")
    arg("--sampled_b", action="store_true", help="also protocol Bs: decode the prior's samples")
    arg("--test_stride", type=int, default=1, help="score every N-th test video only (default 1)")
    arg("--no-probes", dest="probes", action="store_false", help="skip the latent probes")
    arg("--probe_characters", type=int, default=None, help="train characters (Moving MNIST: "
        "videos) the probes are fitted on (default 300 characters, 2700 videos: their encoding "
        "and the probes take about a minute on a 2-core CPU)")
    arg("--niter", type=_niter, default=5,
        help="runs, with seeds 0..niter-1 (default 5); auto: 5 where --amp finds a native half "
             "precision, else 1 (five fp32 runs take over 5 min on 2 AVX2 cores)")
    arg("--batch_size", type=int, default=256, help="videos per forward pass (default 256)")
    arg("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if any")
    add_amp_flag(arg)
    arg("--threads", type=int, default=0, help="CPU threads (default 0: torch's choice)")
    arg("--out", default=None, help="the JSON of every run (default <model_dir>.results.json)")
    for k in ("f_dim", "z_dim", "g_dim", "rnn_size"):
        arg(f"--{k}", type=int, default=None, help=f"refuse a checkpoint whose {k} is not this")
    args = p.parse_args(argv)
    bench = benchmark_of(args)
    args.judge = args.judge or list(bench.judges)
    if args.probe_characters is None:
        args.probe_characters = bench.probe_units
    if min(args.niter if args.niter != "auto" else 1, args.batch_size, args.test_stride,
           args.probe_characters) < 1:
        p.error("--niter, --batch_size, --test_stride and --probe_characters must be positive")
    if args.threads < 0:
        p.error(f"--threads {args.threads} must be 0 or more")
    return args


def _niter(text):
    """--niter's value: a count, or 'auto' (resolved by resolve_niter once the device is known)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor auto") from None


def resolve_niter(niter, device, amp):
    """The runs to make: niter, or for 'auto' 5 where `amp` gives a half precision, else 1."""
    if niter != "auto":
        return niter
    return 5 if amp_dtype(device, amp) is not None else 1


def probe_videos(train, n_characters, groups=character_id):
    """The videos of n_characters train characters (all their motions; `groups` names a video's
    unit), a fixed random choice; the whole split when it has no more units than that."""
    if n_characters >= len(torch.unique(groups(train[1]))):
        return train
    return validation_split(*train, n_characters, groups=groups)[1]


def load(args, device):
    """The model, {judge name: judge}, the test split (strided), the probes' train videos (None
    without probes) and what the JSON records of the files, each file read once, before any
    scoring; a missing or wrong file ends the script with a one-line error naming it."""
    bench = BENCHMARKS[args.dataset]
    judge_paths = {judge_name(path): path for path in args.judge}
    if len(judge_paths) < len(args.judge):
        sys.exit(f"error: judges are named by their file names, and two of --judge "
                 f"{' '.join(args.judge)} share one; give each judge once, under its own name")
    try:
        ckpt = read_model_checkpoint(args.model_dir)
        model = model_from_checkpoint(ckpt, args.model_dir, device, f_dim=args.f_dim,
                                      z_dim=args.z_dim, g_dim=args.g_dim, rnn_size=args.rnn_size)
        judges = {name: for_inference(load_judge(path, device, bench.heads))
                  for name, path in judge_paths.items()}
        files = {"model_args": ckpt["model_args"], "judge_files": {
            name: {"path": path, **{k: read_checkpoint(path, what="judge file").get(k)
                                    for k in ("arch", "test_accuracy", "robustness")}}
            for name, path in judge_paths.items()}}
        data = bench.load(args.data_root)
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    test = tuple(t[::args.test_stride] for t in data["test"])
    if len(test[0]) < 2:
        sys.exit(f"error: {args.data_root}: the test split has {len(test[0])} video(s); swaps need "
                 "at least 2")
    probe_train = (probe_videos(data["train"], args.probe_characters, bench.groups)
                   if args.probes else None)
    return for_inference(model), judges, judge_paths, test, probe_train, files


def record(result, args, files, test, device, seconds):
    """result with what was scored and how: the test split's size and balance, the files, the
    options, the time, the code's revision."""
    bench = BENCHMARKS[args.dataset]
    head = next(iter(bench.heads))  # Sprites' action, Moving MNIST's digit
    counts = torch.bincount(bench.labels(*test[1:])[head], minlength=bench.heads[head]).tolist()
    result.update(n_test=len(test[0]), **{f"{head}_counts": counts},
                  class_balanced=len(set(counts)) == 1, dataset=args.dataset,
                  model_dir=args.model_dir, **files, data_root=args.data_root,
                  test_stride=args.test_stride,
                  type_gt=args.type_gt, sampled_b=args.sampled_b, niter=args.niter, amp=args.amp,
                  precision=dtype_name(amp_dtype(device, args.amp)),
                  batch_size=args.batch_size, probe_characters=args.probe_characters if args.probes
                  else None, device=str(device), threads=torch.get_num_threads(),
                  seconds=round(seconds, 1), git_revision=git_revision())
    return result


def main(argv=None):
    args = parse_args(argv)
    out = args.out or args.model_dir + ".results.json"
    if os.path.isdir(out):
        sys.exit(f"error: --out {out} is a folder; give the path of the JSON file to write")
    refuse_overwriting([("--out", out)], [("--model_dir", args.model_dir),
                                          ("--data_root", args.data_root)]
                       + [("--judge", path) for path in args.judge])
    with held_lock(out + ".lock", f"{out} is being written by {{holder}}, another test_sprite.py; "
                                  f"wait for it to end, or choose another --out"):
        check_writable(out, "--out")  # before minutes of scoring
        return score(args, out)


def score(args, out):
    """Score the checkpoint of args.model_dir, write the JSON `out`, print the tables."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    args.niter = resolve_niter(args.niter, device, args.amp)
    model, judges, judge_paths, test, probe_train, files = load(args, device)
    t0 = time.time()
    try:
        result = evaluate(model, judges, test, device, seeds=range(args.niter), amp=args.amp,
                          batch_size=args.batch_size, type_gt=args.type_gt,
                          sampled_b=args.sampled_b, probe_train=probe_train,
                          bench=BENCHMARKS[args.dataset])
    except NotFiniteError as e:  # the judge's file when its outputs are the ones at fault
        blamed = f"judge file {judge_paths[e.judge]}" if e.judge else args.model_dir
        sys.exit(f"error: {blamed}: {e}")
    result = record(result, args, files, test, device, time.time() - t0)
    try:  # the JSON first: a closed terminal or pipe cannot lose the scores
        write_json(result, out)
    finally:  # and the tables, even when the JSON cannot be written
        print_report(result, args, len(test[0]), device)
    print(f"wrote {out}")
    return result


def print_report(result, args, n_test, device):
    """The tables, the probes and a line of what was scored, where and how fast."""
    print(format_smmnist_table(result) if "trajectory_error" in result else format_table(result))
    if "probes" in result:
        print("\n" + format_probes(result))
    balance = "balanced" if result["class_balanced"] else "NOT balanced"
    head = next(iter(BENCHMARKS[args.dataset].heads))
    print(f"\n{args.niter} run(s) x {n_test} test videos ({head}s {balance}: "
          f"{result[head + '_counts']}) in {result['seconds']:.1f} s on {device}, "
          f"{torch.get_num_threads()} thread(s), {precision_note(device, args.amp)}")


if __name__ == "__main__":
    run_main(main)
