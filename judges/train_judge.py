"""Train a judge of a benchmark's heads (Sprites: action, skin, pant, top, hair; Moving MNIST: the
digit), fully supervised on the train split, on videos blurred and noised at random
(dataloader.judge_corrupt) so that it reads the factors and not the sharpness of what it is shown;
on Moving MNIST each epoch is a new video of every train digit (smmnist.JudgeVideos).
The epoch is chosen on --val_chars held-out train characters (Moving MNIST: videos; the best worst
head); the test split is scored once, at the end, sharp and corrupted (the robustness card). The
judge file is written atomically in half precision with the network's name and arguments, its data
set and heads, the test accuracies and the card (judges/README.md); --resume continues a run from
its last epoch's --ckpt.

    python judges/train_judge.py --arch bilstm --amp --threads 1 [--nEpoch 6] [--out FILE]
    python judges/train_judge.py --arch conv3d --amp --threads 1 --nEpoch 8 --out FILE
    python judges/train_judge.py --card_only --out judges/sprite_judge.pt  # card of a judge file
    python judges/train_judge.py --dataset smmnist --arch conv3d ...  # judges/smmnist_clip_judge.pt
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

# run as a script, this file sees judges/ first; the modules it imports live one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import BENCHMARKS, add_dataset_flag, benchmark_of  # noqa: E402
from dataloader import (DataError, SpriteBatches, gaussian_blur, held_out_rows,  # noqa: E402
                        judge_corrupt, rebuild_hint, validation_split)
from judges.networks import JUDGES, load_judge  # noqa: E402
from utils import (STATE_DICT, CheckpointError, add_amp_flag, autocast, check_fields,  # noqa: E402
                   check_writable, grad_scaler, half_precision, held_lock, load_adam_state,
                   make_adam, pick_device, precision_note, progress, read_checkpoint,
                   refuse_overwriting, run_main, save_atomic)

# the robustness card: name -> what is done to the real test videos before the judge sees them
CARD = {"sharp": lambda x, g: x,
        **{f"blur_{s}": lambda x, g, s=s: gaussian_blur(x, s) for s in (0.7, 1.0, 1.5)},
        **{f"noise_{n}": lambda x, g, n=n: (x + n * torch.randn(x.shape, generator=g)).clamp_(0, 1)
           for n in (0.05, 0.1)}}


@torch.no_grad()
def accuracy(judge, bench, X, A, D, device, amp, corrupt=CARD["sharp"]):
    """({head: accuracy}, {head: wrong}) over every sequence of X, each seen as corrupt(x, g)."""
    judge.eval()
    wrong = dict.fromkeys(bench.heads, 0)
    g = torch.Generator().manual_seed(0)
    for batch in SpriteBatches(X, A, D, 256):
        with autocast(device, amp):
            logits = judge(corrupt(batch["x"], g).to(device))
        for k, y in bench.labels(batch["A"], batch["D"]).items():
            wrong[k] += (logits[k].argmax(1).cpu() != y).sum().item()
    return {k: 1 - w / len(X) for k, w in wrong.items()}, wrong


def robustness_card(judge, bench, test, device, amp):
    return {name: accuracy(judge, bench, *test, device, amp, c)[0] for name, c in CARD.items()}


def print_card(card):
    heads = list(next(iter(card.values())))
    print(f"{'real test videos':<18}" + "".join(f"{k:>9}" for k in heads))
    for name, accs in card.items():
        print(f"{name:<18}" + "".join(f"{100 * accs[k]:>8.2f}%" for k in heads))


def card_only(args, bench, test, device):
    """Add the robustness card to the judge file --out (its weights unchanged), print it."""
    try:
        ckpt, judge = read_checkpoint(args.out), load_judge(args.out, device, bench.heads)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    ckpt["robustness"] = robustness_card(judge, bench, test, device, args.amp)
    save_atomic(ckpt, args.out)
    print_card(ckpt["robustness"])
    print(f"wrote the card into {args.out}")


class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and each flag's default after its help."""


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    arg = p.add_argument
    add_dataset_flag(arg)
    arg("--out", default=None, help="where to write the judge (default: the data set's shipped "
        "judge of --arch: judges/sprite_judge.pt or clip_judge.pt, judges/smmnist_*_judge.pt)")
    arg("--ckpt", default="runs/judge/last.pt", help="checkpoint written after every epoch")
    arg("--resume", action="store_true", help="continue from --ckpt when it exists")
    arg("--arch", choices=tuple(JUDGES), default="bilstm", help="bilstm: frame encoder + "
        "BiLSTM (SpriteJudge); conv3d: 3D convolutions over the clip (ClipJudge)")
    arg("--p_blur", type=float, default=0.5,
        help="probability that a training video is blurred, sigma uniform in [0, 2] px")
    arg("--p_noise", type=float, default=0.5,
        help="probability of Gaussian pixel noise, std uniform in [0, 0.1]")
    arg("--p_warp", type=float, default=None,
        help="probability that a training video's digit is rotated, scaled, sheared and "
             "elastically distorted (smmnist.warp_digits; default 0.8 on smmnist, 0 on Sprites, "
             "which has no such augmentation)")
    arg("--crop", type=int, default=None,
        help="the window about each frame's centre of mass the judge reads, resampled to the "
             "frame's size, px (judges.networks.MassCrop; default 40 on smmnist, 0: none, Sprites)")
    arg("--card_only", action="store_true",
        help="train nothing: add the robustness card to the judge file --out and print it")
    arg("--nEpoch", type=int, default=6, help="epochs")
    arg("--batch_size", type=int, default=64, help="videos per step")
    arg("--lr", type=float, default=1e-3, help="peak Adam learning rate of a one-cycle schedule")
    arg("--nf", type=int, default=32, help="conv width of the judge (the model's is 64)")
    arg("--g_dim", type=int, default=128, help="frame feature size, bilstm only")
    arg("--rnn_size", type=int, default=256, help="BiLSTM size, bilstm only")
    arg("--hidden", type=int, default=256, help="hidden units of each head")
    arg("--val_chars", type=int, default=None, help="train characters (Moving MNIST: videos) held "
        "out to pick the epoch (default: 20 characters; 250 videos, whose digits no epoch shows; "
        "0: none held out, the last epoch is the judge)")
    arg("--seed", type=int, default=0, help="random seed")
    arg("--threads", type=int, default=0, help="CPU threads (0: torch's choice)")
    arg("--device", default="auto", choices=("auto", "cpu", "cuda"),
        help="auto: cuda when a GPU is visible, else cpu")
    add_amp_flag(arg)
    args = p.parse_args(argv)
    bench = benchmark_of(args)
    args.out = args.out or bench.judges[tuple(JUDGES).index(args.arch)]
    args.val_chars = bench.judge_val if args.val_chars is None else args.val_chars
    args.p_warp = bench.judge_p_warp if args.p_warp is None else args.p_warp
    args.crop = bench.judge_crop if args.crop is None else args.crop
    if args.p_warp and bench.judge_warp is None:
        p.error(f"--p_warp {args.p_warp}: {bench.title} has no warp augmentation; drop it")
    return args


def set_up(args, bench, data, device):
    """(the training batches, the held-out sequences, the judge's arguments, the run: the judge of
    --arch and its optimizer, schedule, gradient scaler and corruption generator)."""
    if not (0 <= args.p_blur <= 1 and 0 <= args.p_noise <= 1 and 0 <= args.p_warp <= 1):
        sys.exit(f"error: --p_blur {args.p_blur}, --p_noise {args.p_noise} and --p_warp "
                 f"{args.p_warp} must be probabilities in [0, 1]")
    for name in ("nEpoch", "batch_size"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name} {getattr(args, name)} must be at least 1")
    if args.val_chars < 0:
        sys.exit(f"error: --val_chars {args.val_chars} must be 0 (the last epoch is the judge) "
                 f"or more")
    if not 0 <= args.crop <= 64:  # no wider than the 64 px frame
        sys.exit(f"error: --crop {args.crop} must be a window of 1..64 px, or 0 for none")
    torch.manual_seed(args.seed)
    try:
        (X, A, D), held_out = validation_split(*data["train"], args.val_chars, seed=args.seed,
                                               groups=bench.groups)
    except ValueError as e:
        sys.exit(f"error: --val_chars {args.val_chars}: {e}")
    if bench.judge_videos is not None and "train_digits" not in data:
        sys.exit(f"error: {args.data_root} does not store the train digits, from which the "
                 f"judges make their videos; {rebuild_hint(args.data_root, bench.builder)}")
    judge_args = {"hidden": args.hidden, "nf": args.nf}
    if bench.channels != 3:  # Sprites' judge files name no channels: 3, the default
        judge_args["channels"] = bench.channels
    if args.arch == "bilstm":
        judge_args.update(g_dim=args.g_dim, rnn_size=args.rnn_size)
    if args.crop:  # Sprites' judge files name no crop: 0, the default
        judge_args["crop"] = args.crop
    judge = JUDGES[args.arch](**judge_args, heads=bench.heads).to(device)
    if device.type == "cpu":  # channels-last convolutions are the faster ones on the CPU
        judge = judge.to(memory_format=torch.channels_last_3d if args.arch == "conv3d"
                         else torch.channels_last)
    # on a GPU the split, the batches, their blur and noise stay there (judge_corrupt)
    if bench.judge_videos is None:
        loader = SpriteBatches(X, A, D, args.batch_size, shuffle=True, seed=args.seed,
                               drop_last=True, device=device)
    else:  # Moving MNIST: every epoch a new video of each train digit not held out
        held = held_out_rows(data["train"][1], args.val_chars, args.seed, bench.groups)
        loader = bench.judge_videos(data["train_digits"], held, X.shape[1], args.batch_size,
                                    args.seed, device)
    if len(loader) == 0:
        sys.exit(f"error: --batch_size {args.batch_size} is more than the {loader.videos} "
                 f"training sequences; a smaller batch makes at least one step")
    optimizer = make_adam(judge.parameters(), device, lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr,
                                                total_steps=args.nEpoch * len(loader))
    return loader, held_out, judge_args, {
        "judge": judge, "optimizer": optimizer, "sched": sched,
        "scaler": grad_scaler(device, args.amp),
        "corrupt_g": torch.Generator().manual_seed(args.seed + 1),
        "warp_g": torch.Generator().manual_seed(args.seed + 3),
        "noise_g": (torch.Generator(device).manual_seed(args.seed + 2)
                    if device.type != "cpu" else None)}


def checkpoint(run, epoch, best, best_state, seconds):
    """What --resume needs to continue exactly after `epoch` epochs."""
    noise = {"noise_rng": run["noise_g"].get_state()} if run.get("noise_g") is not None else {}
    return {"model": run["judge"].state_dict(), "optimizer": run["optimizer"].state_dict(),
            "sched": run["sched"].state_dict(), "scaler": run["scaler"].state_dict(),
            "corrupt_rng": run["corrupt_g"].get_state(), "warp_rng": run["warp_g"].get_state(),
            "epoch": epoch, "best": best,
            "best_state": best_state, "seconds": seconds, **noise}


GENERATOR_STATE = (lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8,
                   "a generator's state (a uint8 tensor)")  # each of the run's CPU generators

# every field resume reads, with what it must be ('scaler', 'warp_rng' only in checkpoints with one)
RESUME_FIELDS = {
    "model": STATE_DICT, "optimizer": (lambda v: isinstance(v, dict), "an optimizer's state"),
    "sched": (lambda v: isinstance(v, dict), "a scheduler's state"),
    "scaler": (lambda v: isinstance(v, dict), "a grad scaler's state"),
    "corrupt_rng": GENERATOR_STATE, "warp_rng": GENERATOR_STATE,
    "epoch": (lambda v: type(v) is int and v >= 0, "a whole number of epochs"),
    "best": (lambda v: type(v) in (int, float) and -1 <= v <= 1, "an accuracy"),
    "best_state": STATE_DICT,
    "seconds": (lambda v: type(v) in (int, float) and 0 <= v < float("inf"), "seconds")}


def resume(path, run):
    """Load checkpoint `path` into the run; -> (best worst-head accuracy, its weights, epochs done,
    seconds spent)."""
    try:
        # read on the CPU: the generator's state must stay a CPU ByteTensor, and load_state_dict
        # puts the weights and the optimizer's state on the judge's device
        ckpt = read_checkpoint(path, map_location="cpu", what="judge training checkpoint")
        check_fields(ckpt, f"{path} is not a checkpoint of this train_judge.py run: it",
                     RESUME_FIELDS, optional=("scaler", "warp_rng"))
        run["judge"].load_state_dict(ckpt["model"])
        load_adam_state(run["optimizer"], ckpt["optimizer"])
        run["sched"].load_state_dict(ckpt["sched"])
        if "scaler" in ckpt:  # checkpoints written before fp16 loss scaling have none
            run["scaler"].load_state_dict(ckpt["scaler"])
        run["corrupt_g"].set_state(ckpt["corrupt_rng"])
        if "warp_rng" in ckpt:  # checkpoints written before the warp augmentation have none
            run["warp_g"].set_state(ckpt["warp_rng"])
        if run.get("noise_g") is not None and "noise_rng" in ckpt:  # a run off the CPU
            run["noise_g"].set_state(ckpt["noise_rng"])
        return ckpt["best"], ckpt["best_state"], ckpt["epoch"], ckpt["seconds"]
    except CheckpointError as e:
        sys.exit(f"error: cannot resume: {e}")
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        sys.exit(f"error: cannot resume: {path} is not a checkpoint of this train_judge.py run "
                 f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")


def train_one_epoch(run, bench, loader, epoch, args, device):
    """One pass over the training batches, each video corrupted at random: the last batch's loss."""
    judge, optimizer, scaler = run["judge"], run["optimizer"], run["scaler"]
    loader.set_epoch(epoch)
    judge.train()
    for batch in progress(loader, desc=f"epoch {epoch + 1}/{args.nEpoch}", leave=False,
                          mininterval=30):
        x = batch["x"]
        if args.p_warp:  # the reshaped digit, then blur and noise as for every judge
            x = bench.judge_warp(x, batch["D"], run["warp_g"], p=args.p_warp)
        x = judge_corrupt(x, run["corrupt_g"], p_blur=args.p_blur, p_noise=args.p_noise,
                          noise_generator=run["noise_g"])
        with autocast(device, args.amp):
            logits = judge(x)
        labels = labels_on(bench.labels(batch["A"], batch["D"]), device)
        loss = sum(F.cross_entropy(logits[k].float(), y) for k, y in labels.items())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        run["sched"].step()
    return loss.item()


def labels_on(labels, device):
    """{head: labels} on `device` in one copy, asynchronous from pinned memory on a GPU."""
    if device.type == "cpu":
        return labels
    stacked = torch.stack(list(labels.values()))
    if device.type == "cuda":
        stacked = stacked.pin_memory()
    return dict(zip(labels, stacked.to(device, non_blocking=True)))


def finish(args, bench, judge, judge_args, best_state, test, device, t0):
    """Score the chosen weights on every test sequence, sharp and corrupted, and write them in half
    precision with what was measured."""
    judge.load_state_dict(best_state)
    train_seconds = time.time() - t0
    acc, wrong = accuracy(judge, bench, *test, device, args.amp)
    print(f"test accuracy ({len(test[0])} sequences): "
          + ", ".join(f"{k} {v:.4%} ({wrong[k]} wrong)" for k, v in acc.items()))
    card = robustness_card(judge, bench, test, device, args.amp)
    print_card(card)
    save_atomic({"model": half_precision(best_state), "arch": args.arch, "judge_args": judge_args,
                 "heads": dict(bench.heads), "dataset": bench.name, "test_accuracy": acc,
                 "test_wrong": wrong,
                 "robustness": card, "n_test": len(test[0]), "train_seconds": round(train_seconds),
                 "args": vars(args)}, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB); trained in "
          f"{train_seconds:.0f} s, {time.time() - t0:.0f} s with the test scoring")


def main(argv=None):
    args = parse_args(argv)
    refuse_overwriting([("--out", args.out)], [("--ckpt", args.ckpt),
                                              ("--data_root", args.data_root)])
    refuse_overwriting([("--ckpt", args.ckpt)], [("--data_root", args.data_root)])
    with held_lock(args.out + ".lock", f"{args.out} is being written by {{holder}}, another "
                                       f"train_judge.py; wait for it, or choose another --out"):
        check_writable(args.out, "--out")  # before the training, not after it
        if not args.card_only:
            check_writable(args.ckpt, "--ckpt")
        return train(args)


def train(args):
    """Train the judge --arch (or, with --card_only, card the judge file --out) as args ask."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    bench = BENCHMARKS[args.dataset]
    try:
        data = bench.load(args.data_root)
    except DataError as e:
        sys.exit(f"error: {e}")
    if args.card_only:
        return card_only(args, bench, data["test"], device)
    loader, held_out, judge_args, run = set_up(args, bench, data, device)
    judge = run["judge"]
    best, best_state, start, spent = -1.0, None, 0, 0.0
    if args.resume and os.path.isfile(args.ckpt):
        best, best_state, start, spent = resume(args.ckpt, run)
        print(f"resumed from {args.ckpt} after epoch {start}", flush=True)
    unit = "characters" if args.dataset == "sprites" else "videos"  # what --val_chars counts
    n_held = 0 if held_out is None else len(held_out[0])
    print(f"{loader.videos} train sequences an epoch, {n_held} held out ({args.val_chars} "
          f"{unit}), judge {judge_args}, "
          f"{sum(q.numel() for q in judge.parameters())} "
          f"parameters, {torch.get_num_threads()} thread(s), {precision_note(device, args.amp)}",
          flush=True)
    t0 = time.time() - spent
    for epoch in range(start, args.nEpoch):
        loss = train_one_epoch(run, bench, loader, epoch, args, device)
        if held_out is None:  # every epoch ties at 1, and ties go to the later epoch: the last wins
            val, said = dict.fromkeys(bench.heads, 1.0), "none held out"
        else:
            val = accuracy(judge, bench, *held_out, device, args.amp)[0]
            said = f"held-out train {unit} " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
        print(f"epoch {epoch + 1}: loss {loss:.4f}, {said} ({time.time() - t0:.0f} s)", flush=True)
        if min(val.values()) >= best:  # ties go to the later epoch
            # kept on the CPU, so that the checkpoint and the judge file load on any machine
            best, best_state = min(val.values()), {k: v.detach().to("cpu", copy=True)
                                                   for k, v in judge.state_dict().items()}
        save_atomic(checkpoint(run, epoch + 1, best, best_state, time.time() - t0), args.ckpt)
    finish(args, bench, judge, judge_args, best_state, data["test"], device, t0)


if __name__ == "__main__":
    run_main(main)
