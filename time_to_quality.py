"""Time to quality of a run: protocol-A action accuracy (Moving MNIST, --dataset smmnist: the swap's
digit accuracy) under each judge against training minutes.

    python train_cdsvae.py ... --snapshot_every 1          # keeps model_dir/epoch_<N>.pt
    python time_to_quality.py --run runs/cdsvae_cpu --out figs/time_to_quality.png [--test_stride 4]

Scores each snapshot epoch_<N>.pt of --run in protocol A and swaps (one seed) with each judge, at
the training minutes of epoch N's end (summed from the run's metrics.jsonl), and writes the curve
(PNG), its figures (JSON beside it) and the minutes at which each judge first saw 90%, 95% and
99%.
"""
import argparse
import glob
import io
import json
import math
import os
import re
import sys

import torch
from tqdm import tqdm

from benchmarks import BENCHMARKS, add_dataset_flag, benchmark_of
from dataloader import DataError
from evaluation import NotFiniteError, evaluate
from judges.networks import judge_name, load_judge
from utils import (CheckpointError, check_writable, for_inference, held_lock, load_model,
                   pick_device, progress, read_text, refuse_overwriting, run_main, same_file,
                   write_atomic, write_json)

LEVELS = (0.90, 0.95, 0.99)


def snapshots(run):
    """[(epoch, path)] of the run's epoch_<N>.pt files, in epoch order."""
    names = (os.path.basename(p) for p in glob.glob(os.path.join(run, "epoch_*.pt")))
    matches = (re.fullmatch(r"epoch_(\d+)\.pt", name) for name in names)
    return sorted((int(m[1]), os.path.join(run, m[0])) for m in matches if m)


def epoch_minutes(metrics_path):
    """{epoch: training minutes at its end}, from the per-epoch 'seconds' of metrics.jsonl;
    ValueError, in one line, at a line that is not such a row."""
    minutes, total = {}, 0.0
    for n, line in enumerate(io.StringIO(read_text(metrics_path)), 1):  # as a file's lines
        try:
            row = json.loads(line)
            epoch, seconds = row["epoch"], row["seconds"]
        except (ValueError, KeyError, TypeError):
            epoch = seconds = None
        if not (type(epoch) is int and type(seconds) in (int, float)
                and 0 <= seconds < math.inf):
            raise ValueError(f"{metrics_path}, line {n}, is not a row of train_cdsvae.py (an "
                             f"integer 'epoch', 'seconds' 0 or more); give a run's own")
        total += seconds / 60
        minutes[epoch] = total
    return minutes


def read_reference(path):
    """The --reference curve; ValueError, in one line, unless it is {'label': text, 'points':
    [[minutes, accuracy], ...]} with finite minutes and accuracies in [0, 1]."""
    try:
        ref = json.loads(read_text(path))
    except json.JSONDecodeError:
        ref = None
    points = ref.get("points") if isinstance(ref, dict) else None
    good = isinstance(points, list) and points and isinstance(ref.get("label"), str) and all(
        isinstance(p, list) and len(p) == 2 and all(type(v) in (int, float) for v in p)
        and math.isfinite(p[0]) and 0 <= p[1] <= 1 for p in points)
    if not good:
        raise ValueError(f"{path} is not a reference curve: JSON {{'label': text, 'points': "
                         f"[[minutes, accuracy], ...]}} with finite minutes, accuracies in [0, 1]")
    return ref


def first_reaching(points, level):
    """The minutes of the first (minutes, accuracy) point at or above `level`, or None."""
    return next((m for m, acc in points if acc >= level), None)


def plot(curves, reference, out, label="protocol A action accuracy"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, points in curves.items():
        ax.plot(*zip(*points), marker="o", ms=3, label=f"this run, judge {name}")
    if reference:
        ax.plot(*zip(*reference["points"]), ls="--", color="grey", label=reference["label"])
    for level in LEVELS:
        ax.axhline(level, color="black", lw=0.5, ls=":")
    ax.set_xlabel("training minutes (2-core CPU)")
    ax.set_ylabel(label)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="model_dir of a run trained with --snapshot_every")
    p.add_argument("--out", default="figs/time_to_quality.png",
                   help="the curve's PNG; its JSON goes beside it (default %(default)s)")
    p.add_argument("--judge", action="append", help="judge file; repeatable (default both shipped)")
    add_dataset_flag(p.add_argument)
    p.add_argument("--test_stride", type=int, default=4,
                   help="score every this-many-th test video (default 4)")
    p.add_argument("--reference", help="JSON {'label': str, 'points': [[minutes, accuracy], ...]} "
                                       "drawn dashed beside the run")
    p.add_argument("--epochs", type=int, nargs="+",
                   help="score only the snapshots of these epochs (default: every snapshot)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="default auto: cuda when there is one")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's choice)")
    args = p.parse_args(argv)
    args.judge = args.judge or list(benchmark_of(args).judges)
    if args.test_stride < 1 or args.threads < 0:
        p.error("--test_stride must be positive, and --threads 0 or more")
    return args


def chosen_snapshots(args):
    """[(epoch, path)] of the snapshots to score, and the run's metrics.jsonl; refused in one line
    if either is missing or an asked epoch has no snapshot."""
    snaps = snapshots(args.run)
    metrics = os.path.join(args.run, "metrics.jsonl")
    if not snaps or not os.path.isfile(metrics):
        sys.exit(f"error: {args.run} has no epoch_<N>.pt snapshots or no metrics.jsonl; "
                 f"train with --snapshot_every 1")
    available = [e for e, _ in snaps]
    missing = sorted(set(args.epochs or ()) - set(available))
    if missing:
        sys.exit(f"error: {args.run} has no snapshot of epoch(s) {missing}; pick from {available}")
    return [(e, path) for e, path in snaps if not args.epochs or e in args.epochs], metrics


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    snaps, metrics = chosen_snapshots(args)
    json_out = os.path.splitext(args.out)[0] + ".json"
    if same_file(args.out, json_out):
        sys.exit(f"error: --out {args.out} names the curve's PNG; its JSON goes beside it")
    inputs = ([("--run", path) for _, path in snaps] + [("--run", metrics)]
              + [("--judge", j) for j in args.judge]
              + [("--data_root", args.data_root), ("--reference", args.reference)])
    refuse_overwriting([("--out", args.out), ("--out", json_out)], inputs)
    with held_lock(args.out + ".lock", f"{args.out} is being written by {{holder}}, another "
                                       f"time_to_quality.py; wait for it, or choose another --out"):
        for path in (args.out, json_out):  # before minutes of scoring
            check_writable(path, "--out")
        return score_snapshots(args, device, snaps, metrics, json_out)


def score_snapshots(args, device, snaps, metrics, json_out):
    """Score each snapshot, draw the curve and write its figures; every file is checked first."""
    bench = BENCHMARKS[args.dataset]
    try:
        judges = {judge_name(j): for_inference(load_judge(j, device, bench.heads))
                  for j in args.judge}
        test = tuple(t[::args.test_stride] for t in bench.load(args.data_root)["test"])
        reference = read_reference(args.reference) if args.reference else None
        minutes = epoch_minutes(metrics)
        unlogged = [e for e, _ in snaps if e not in minutes]
        if unlogged:
            raise DataError(f"{metrics} has no row of epoch(s) {unlogged}: it is not the metrics "
                            f"of these snapshots; give the --run folder that holds both")
        if len(test[0]) < 2:
            raise DataError(f"{args.data_root}: --test_stride {args.test_stride} leaves "
                            f"{len(test[0])} test video(s); protocol A's swaps need 2")
        for _, path in snaps:  # a damaged snapshot is found now, not after the others' scoring
            load_model(path)
    except (CheckpointError, DataError, OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    curves = {name: [] for name in judges}
    for epoch, path in progress(snaps, desc="snapshots", unit="snapshot", leave=False):
        try:
            model = for_inference(load_model(path, device))
            result = evaluate(model, judges, test, device, seeds=[0], amp=True, type_gt="action",
                              bench=bench)
        except CheckpointError as e:
            sys.exit(f"error: {e}")
        except NotFiniteError as e:  # the judge's file when its outputs are the ones at fault
            judge = dict(zip(judges, args.judge)).get(e.judge)
            sys.exit(f"error: {f'judge file {judge}' if e.judge else path}: {e}")
        for name in judges:
            curves[name].append((minutes[epoch], result["judges"][name]["mean"][bench.quality[0]]))
        tqdm.write(f"epoch {epoch} ({minutes[epoch]:.1f} min): " + ", ".join(
            f"{name} {pts[-1][1]:.2%}" for name, pts in curves.items()))
    write_curves(args, curves, reference, len(test[0]), json_out)


def write_curves(args, curves, reference, n_test, json_out):
    """The curve's PNG and JSON, and the minutes at which each judge reached each level."""
    reached = {name: {f"{level:.0%}": first_reaching(pts, level) for level in LEVELS}
               for name, pts in curves.items()}
    write_json({"run": args.run, "test_stride": args.test_stride, "n_test": n_test,
                "curves": curves, "minutes_to": reached, "reference": reference}, json_out)
    plot(curves, reference, args.out, BENCHMARKS[args.dataset].quality[1])
    for name, r in reached.items():
        print(f"{name}: minutes to " + ", ".join(
            f"{k} {'not reached' if v is None else f'{v:.1f}'}" for k, v in r.items()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
