"""Score a C-DSVAE checkpoint on the whole Sprites test split with one or more judges (default: both
shipped ones, judges/sprite_judge.pt and judges/clip_judge.pt), and report how far the judges agree.

    python test_sprite.py --model_dir checkpoints/cdsvae_sprites_cpu.pt [--niter 5] [--amp]
    python test_sprite.py --model_dir ... --judge judges/sprite_judge.pt --judge my_judge.pt

Every test video is scored in every run; none is dropped, whatever the batch size.

Protocol A (the paper's Table 1; --type_gt action): keep each video's dynamics (posterior mean of
    z), draw f ~ N(0, I), decode (model.generate_fixed_motion). The judge's action accuracy against
    the true action, and from its action softmax: IS = exp(E_x KL(p(y|x) || p(y))), H(y|x), H(y),
    and KL(p_gen(y) || p_real(y)), the KL between its mean prediction on these generated videos and
    on the real test videos. The test split is class-balanced (296 characters x 9 actions), so the
    whole split is the class-balanced set these scores ask for.
Protocol B (--type_gt static): keep each video's content (posterior mean of f), draw a path of the
    learned prior and decode its per-step means, as the paper does (model.generate_fixed_content).
    The judge's accuracy on skin, pant, top, hair and their mean. 'Bs' (not the paper's figure;
    --sampled_b): the same, decoding the path's samples.
Swaps (always): pair each video i with another video j = perm[i] (a seeded derangement: never
    itself), decode f of i with z of j (model.swap); the judge's accuracy on i's four attributes and
    on j's action. As a diagnosis, the predicted action in its two parts, action type and facing
    direction: how often each is j's (carried by z) and how often i's (leaked through f); for
    protocol A, how often each is the video's own.
Sanity rows (always): the mean squared error per pixel of decode(z_mean, f_mean) against the video,
    and the judge's accuracy (and IS, entropies) on the real test videos.
Agreement (two judges or more): for each pair of judges, each kind of video (protocol A, B, Bs,
    swaps, real) and each head, the share of videos on which the two judges predict the same class.
    Every generated video is decoded once and shown to every judge. A judge file's robustness card
    (judges/train_judge.py) is copied to the JSON.

Latent probes (on unless --no-probes; probes.py): linear softmax classifiers fitted on the
    posteriors of the train videos of --probe_characters train characters and scored on the test
    videos, from f and from z (the whole path) to each factor: action (9), action type (3),
    direction (3), skin, pant, top, hair (6 each); from the posterior means and from one posterior
    sample per video (seed 0). What the latents hold, read without a judge.

Run i uses seed i (the f ~ N(0, I) of protocol A, the prior samples of protocol B, the swap
pairing); every figure is reported as the mean +- sample standard deviation over --niter runs, on
stdout as a table laid out like the paper's and, with every run, in a JSON file (--out).

Time on the 2-core CPU of the README: see its Speed table.
"""
import argparse
import os
import sys
import time

import torch

from dataloader import (ACTIONS, ATTRIBUTES, DIRECTIONS, FACTORS, DataError, character_id,
                        load_sprites, validation_split)
from evaluation import NotFiniteError, evaluate
from judges.networks import SHIPPED_JUDGES, judge_name, load_judge
from utils import (CheckpointError, OneLineErrors, for_inference, git_revision, held_lock,
                   load_model, pick_device, read_checkpoint, read_model_checkpoint, write_json)
# Protocol A on Sprites as the paper reports it (Bai et al. 2021, Table 1): Acc %, IS, H(y|x), H(y)
PAPER_ROW = ("C-DSVAE, paper (Table 1)", "99.99", "8.871", "0.014", "2.197")
# the probes' train characters by default: their encoding fits the probes in ~60 s on a 2-core CPU
PROBE_CHARACTERS = 300


# ---- report ------------------------------------------------------------------------------------
W = 44  # the width of a table's label column


def _pm(stats, k, pct=False, digits=3):
    """'mean ± std' of figure k of {'mean', 'std'}, in % with pct; '-' when absent."""
    m, s = stats["mean"], stats["std"]
    if k not in m:
        return "-"
    f, d = (100, 2) if pct else (1, digits)
    return f"{m[k] * f:.{d}f}" + ("" if s[k] is None else f" ± {s[k] * f:.{d}f}")


def _protocol_a_rows(per_judge):
    lines = [f"{'':<{W}} {'Acc (%)':>16} {'IS':>16} {'H(y|x)':>16} {'H(y)':>16}",
             f"{PAPER_ROW[0]:<{W}} " + " ".join(f"{v:>16}" for v in PAPER_ROW[1:])]
    for name, st in per_judge.items():
        for label, p in (("this checkpoint", "A"), ("real test videos", "real")):
            if f"{p}_IS" in st["mean"]:
                lines.append(f"{label + ', ' + name:<{W}} {_pm(st, f'{p}_action_acc', True):>16} "
                             f"{_pm(st, f'{p}_IS'):>16} {_pm(st, f'{p}_H_y_given_x'):>16} "
                             f"{_pm(st, f'{p}_H_y'):>16}")
    return lines


def _accuracy_rows(per_judge):
    lines = ["", f"{'judge accuracy (%)':<{W}} {'action':>16} "
             + " ".join(f"{a:>16}" for a in ATTRIBUTES) + f" {'attr. mean':>16}"]
    rows = (("protocol B: fix f, z = prior means", "B", None),
            ("protocol Bs: fix f, z ~ prior", "Bs", None),
            ("swap: f of i, z of j", "swap", "swap_action_acc"),
            ("real test videos", "real", "real_action_acc"))
    for label, prefix, action_key in rows:
        for name, st in per_judge.items():
            if f"{prefix}_skin_acc" in st["mean"]:
                action = _pm(st, action_key, True) if action_key else "-"
                lines.append(f"{label + ', ' + name:<{W}} {action:>16} "
                             + " ".join(f"{_pm(st, f'{prefix}_{a}_acc', True):>16}"
                                        for a in ATTRIBUTES)
                             + f" {_pm(st, f'{prefix}_attr_mean_acc', True):>16}")
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


def _agreement_rows(agreement):
    lines = []
    for pair, st in agreement.items():
        lines += ["", f"agreement of the judges {pair} (% of videos with the same prediction)",
                  f"{'':<{W}} " + " ".join(f"{h:>16}" for h in FACTORS)]
        for kind, label in (("A", "protocol A"), ("B", "protocol B"), ("Bs", "protocol Bs"),
                            ("swap", "swaps"), ("real", "real test videos")):
            if f"{kind}_action" in st["mean"]:
                lines.append(f"{label:<{W}} " + " ".join(f"{_pm(st, f'{kind}_{h}', True):>16}"
                                                         for h in FACTORS))
    return lines


def format_table(result):
    """The figures as text, one row per judge: protocol A laid out like the paper's Table 1 (Acc,
    IS, H(y|x), H(y)), then accuracies per head for protocol B, the swaps and the real videos, then
    the judges' agreement."""
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


def format_probes(result):
    """The latent probes as text: one row per latent (f, z) and posterior (means, samples), one
    column per factor, accuracy in %; then each factor's chance."""
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
    return "\n".join(lines)


def parse_args(argv=None):
    p = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True,
                   help="checkpoint of train_cdsvae.py (a .pt file), or the paper repo's (a dict "
                        "with 'model')")
    p.add_argument("--judge", action="append", default=None,
                   help="judge weights, ours or the paper repo's judges/Sprite/sprite_judge.tar; "
                        "repeat for several judges, each named by its file name (default: both "
                        f"shipped judges, {' and '.join(SHIPPED_JUDGES)})")
    p.add_argument("--data_root", default="data/Sprite/data.pkl",
                   help="the data pickle of make_sprites.py (default data/Sprite/data.pkl)")
    p.add_argument("--type_gt", choices=("action", "static", "all"), default="all",
                   help="action: protocol A; static: protocol B; all: both (default). Swaps are "
                        "always scored")
    p.add_argument("--sampled_b", action="store_true",
                   help="also score protocol Bs: decode the prior path's samples instead of its "
                        "means (not the paper's figure; one more decode per run; default off)")
    p.add_argument("--test_stride", type=int, default=1,
                   help="score every this-many-th test video only, for quick probes (default 1: "
                        "the whole split)")
    p.add_argument("--no-probes", dest="probes", action="store_false",
                   help="skip the latent probes (default: on)")
    p.add_argument("--probe_characters", type=int, default=PROBE_CHARACTERS,
                   help="the probes are fitted on all 9 motions of this many train characters, a "
                        f"fixed random choice (default {PROBE_CHARACTERS}; more than the train "
                        "split has: all of them)")
    p.add_argument("--niter", type=int, default=5, help="runs, with seeds 0..niter-1 (default 5)")
    p.add_argument("--batch_size", type=int, default=256,
                   help="videos per forward pass (default 256)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="default auto: cuda where there is one")
    p.add_argument("--amp", action="store_true",
                   help="autocast: bf16 on the CPU and on bf16-capable GPUs, else fp16 (default "
                        "off: fp32)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: torch's choice)")
    p.add_argument("--out", default=None,
                   help="JSON of every run and the mean/std (default <model_dir>.results.json)")
    for k in ("f_dim", "z_dim", "g_dim", "rnn_size"):
        p.add_argument(f"--{k}", type=int, default=None,
                       help=f"refuse a checkpoint whose {k} is not this")
    args = p.parse_args(argv)
    if min(args.niter, args.batch_size, args.test_stride, args.probe_characters) < 1:
        p.error("--niter, --batch_size, --test_stride and --probe_characters must be positive")
    if args.threads < 0:
        p.error(f"--threads {args.threads} must be 0 or more")
    return args


def probe_videos(train, n_characters):
    """The videos of n_characters train characters (all their motions), a fixed random choice; the
    whole split when it has no more characters than that."""
    if n_characters >= len(torch.unique(character_id(train[1]))):
        return train
    return validation_split(*train, n_characters)[1]


def load(args, device):
    """The model, {judge name: judge}, the test split (strided) and the probes' train videos (None
    without probes); a missing or wrong file ends the script with a one-line error."""
    judge_paths = {judge_name(path): path for path in args.judge or SHIPPED_JUDGES}
    if len(judge_paths) < len(args.judge or SHIPPED_JUDGES):
        sys.exit(f"error: judges are named by their file names, and two of --judge "
                 f"{' '.join(args.judge)} share one; give each judge once, under its own name")
    try:
        model = load_model(args.model_dir, device, f_dim=args.f_dim, z_dim=args.z_dim,
                           g_dim=args.g_dim, rnn_size=args.rnn_size)
        judges = {name: for_inference(load_judge(path, device))
                  for name, path in judge_paths.items()}
        data = load_sprites(args.data_root)
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    test = tuple(t[::args.test_stride] for t in data["test"])
    if len(test[0]) < 2:
        sys.exit(f"error: {args.data_root}: the test split has {len(test[0])} video(s); swaps need "
                 "at least 2")
    probe_train = probe_videos(data["train"], args.probe_characters) if args.probes else None
    return for_inference(model), judges, judge_paths, test, probe_train


def record(result, args, judge_paths, test, device, seconds):
    """result with what was scored and how: the test split's size and balance, the files, the
    options, the time, the code's revision."""
    counts = torch.bincount(test[2], minlength=FACTORS["action"]).tolist()
    judge_files = {name: {"path": path, **{k: read_checkpoint(path).get(k)
                                           for k in ("arch", "test_accuracy", "robustness")}}
                   for name, path in judge_paths.items()}
    result.update(n_test=len(test[0]), action_counts=counts, class_balanced=len(set(counts)) == 1,
                  model_dir=args.model_dir,
                  model_args=read_model_checkpoint(args.model_dir)["model_args"],
                  judge_files=judge_files, data_root=args.data_root, test_stride=args.test_stride,
                  type_gt=args.type_gt, sampled_b=args.sampled_b, niter=args.niter, amp=args.amp,
                  batch_size=args.batch_size, probe_characters=args.probe_characters if args.probes
                  else None, device=str(device), threads=torch.get_num_threads(),
                  seconds=round(seconds, 1), git_revision=git_revision())
    return result


def main(argv=None):
    args = parse_args(argv)
    out = args.out or args.model_dir + ".results.json"
    if os.path.isdir(out):
        sys.exit(f"error: --out {out} is a folder; give the path of the JSON file to write")
    with held_lock(out + ".lock", f"{out} is being written by {{holder}}, another test_sprite.py; "
                                  f"wait for it to end, or choose another --out"):
        return score(args, out)


def score(args, out):
    """Score the checkpoint of args.model_dir, print the tables and write the JSON `out`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model, judges, judge_paths, test, probe_train = load(args, device)
    t0 = time.time()
    try:
        result = evaluate(model, judges, test, device, seeds=range(args.niter), amp=args.amp,
                          batch_size=args.batch_size, type_gt=args.type_gt,
                          sampled_b=args.sampled_b, probe_train=probe_train)
    except NotFiniteError as e:
        sys.exit(f"error: {args.model_dir}: {e}")
    result = record(result, args, judge_paths, test, device, time.time() - t0)
    print(format_table(result))
    if "probes" in result:
        print("\n" + format_probes(result))
    balance = "balanced" if result["class_balanced"] else "NOT balanced"
    print(f"\n{args.niter} run(s) x {len(test[0])} test videos (actions {balance}: "
          f"{result['action_counts']}) in {result['seconds']:.1f} s on {device}, "
          f"{torch.get_num_threads()} thread(s){', bf16 autocast' if args.amp else ''}")
    try:
        write_json(result, out)
    except OSError as e:
        sys.exit(f"error: cannot write {out}: {e}")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
