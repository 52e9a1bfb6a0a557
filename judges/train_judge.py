"""Train a Sprites judge (heads action, skin, pant, top, hair), fully supervised on the train split.

    python judges/train_judge.py --arch bilstm --amp --threads 1 [--nEpoch 6] [--out FILE]
    python judges/train_judge.py --arch conv3d --amp --threads 1 --nEpoch 8 --out FILE
    python judges/train_judge.py --card_only --out judges/sprite_judge.pt  # card of a judge file

--arch bilstm: judges.networks.SpriteJudge, a frame encoder like the model's (g_dim 128), a BiLSTM
(256) and one MLP head (hidden 256) per factor. --arch conv3d: judges.networks.ClipJudge, 3D
convolutions over the whole clip and the same heads. Heads (dataloader.factor_labels): action = the
D label (9 classes); skin, pant, top, hair = the columns of A (6 classes each).
Training videos are blurred and noised at random (dataloader.judge_corrupt; --p_blur, --p_noise), so
that the judge reads the factors and not the sharpness of what it is shown.
A few train characters (--val_chars, all their motions) are held out to choose the epoch (the best
worst head); the test split is scored once, at the end, on every one of its sequences, sharp and
corrupted (the robustness card: blurred at sigma 0.7, 1.0, 1.5 px, and with pixel noise of std 0.05
and 0.1). The chosen weights are written atomically in half precision with the network's name and
arguments, the test accuracies and the card (a dict loadable with torch.load(weights_only=True)).
A checkpoint is written after every epoch (--ckpt); --resume continues from it.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

# run as a script, this file sees judges/ first; the modules it imports live one folder up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataloader import (FACTORS, DataError, SpriteBatches, factor_labels,  # noqa: E402
                        gaussian_blur, judge_corrupt, load_sprites, validation_split)
from judges.networks import JUDGES, load_judge  # noqa: E402
from utils import (CheckpointError, autocast, grad_scaler, half_precision,  # noqa: E402
                   pick_device, read_checkpoint, save_atomic)

def noisy(x, g, std):
    """x with Gaussian pixel noise of `std` (drawn from generator g), clamped to [0, 1]."""
    return (x + std * torch.randn(x.shape, generator=g)).clamp_(0, 1)


# the robustness card: name -> what is done to the real test videos before the judge sees them
CARD = {"sharp": lambda x, g: x,
        **{f"blur_{s}": (lambda x, g, s=s: gaussian_blur(x, s)) for s in (0.7, 1.0, 1.5)},
        **{f"noise_{n}": (lambda x, g, n=n: noisy(x, g, n)) for n in (0.05, 0.1)}}


# ---- scoring -------------------------------------------------------------------------------------
@torch.no_grad()
def errors(judge, X, A, D, device, amp, batch_size=256, corrupt=None):
    """Wrongly classified sequences per head, over every sequence of X (after corrupt(x, g))."""
    judge.eval()
    wrong = dict.fromkeys(FACTORS, 0)
    g = torch.Generator().manual_seed(0)
    for batch in SpriteBatches(X, A, D, batch_size):
        x = batch["x"] if corrupt is None else corrupt(batch["x"], g)
        with autocast(device, amp):
            logits = judge(x.to(device))
        for k, y in factor_labels(batch["A"], batch["D"]).items():
            wrong[k] += (logits[k].argmax(1).cpu() != y).sum().item()
    return wrong


def accuracies(wrong, n):
    """{head: accuracy} from {head: wrong} of n sequences."""
    return {k: 1 - w / n for k, w in wrong.items()}


def robustness_card(judge, X, A, D, device, amp):
    """{condition: {head: accuracy}} of the judge on every video of X, sharp and under each
    corruption of CARD."""
    return {name: accuracies(errors(judge, X, A, D, device, amp, corrupt=corrupt), len(X))
            for name, corrupt in CARD.items()}


def print_card(card):
    print(f"{'real test videos':<18}" + "".join(f"{k:>9}" for k in FACTORS))
    for name, accs in card.items():
        print(f"{name:<18}" + "".join(f"{100 * accs[k]:>8.2f}%" for k in FACTORS))


def card_only(args, data, device):
    """Add the robustness card to an existing judge file (its weights unchanged), print it."""
    try:
        ckpt, judge = read_checkpoint(args.out), load_judge(args.out, device)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    ckpt["robustness"] = robustness_card(judge, *data["test"], device, args.amp)
    save_atomic(ckpt, args.out)
    print_card(ckpt["robustness"])
    print(f"wrote the card into {args.out}")


# ---- the command line ----------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default="data/Sprite/data.pkl",
                   help="the data pickle of make_sprites.py (default data/Sprite/data.pkl)")
    p.add_argument("--out", default="judges/sprite_judge.pt",
                   help="where to write the judge (default judges/sprite_judge.pt)")
    p.add_argument("--ckpt", default="runs/judge/last.pt",
                   help="checkpoint written after every epoch (default runs/judge/last.pt)")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt when it exists")
    p.add_argument("--arch", choices=tuple(JUDGES), default="bilstm",
                   help="bilstm: frame encoder + BiLSTM (SpriteJudge); conv3d: 3D convolutions "
                        "over the clip (ClipJudge) (default bilstm)")
    p.add_argument("--p_blur", type=float, default=0.5,
                   help="probability that a training video is blurred, sigma uniform in [0, 2] px "
                        "(default 0.5)")
    p.add_argument("--p_noise", type=float, default=0.5,
                   help="probability of Gaussian pixel noise, std uniform in [0, 0.1] "
                        "(default 0.5)")
    p.add_argument("--card_only", action="store_true",
                   help="train nothing: add the robustness card to the judge file --out and "
                        "print it")
    p.add_argument("--nEpoch", type=int, default=6, help="epochs (default 6)")
    p.add_argument("--batch_size", type=int, default=64, help="videos per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="peak Adam learning rate of a one-cycle schedule (default 1e-3)")
    p.add_argument("--nf", type=int, default=32,
                   help="conv width of the judge (default 32; the model's is 64)")
    p.add_argument("--g_dim", type=int, default=128,
                   help="frame feature size, bilstm only (default 128)")
    p.add_argument("--rnn_size", type=int, default=256,
                   help="BiLSTM size, bilstm only (default 256)")
    p.add_argument("--hidden", type=int, default=256,
                   help="hidden units of each head (default 256)")
    p.add_argument("--val_chars", type=int, default=20,
                   help="train characters held out to pick the epoch (default 20)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default 0: torch's choice)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when a GPU is visible, else cpu (default auto)")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bf16 on the CPU and on GPUs with native bf16, else fp16 "
                        "(default off: fp32)")
    return p.parse_args(argv)


def check_training_args(args):
    """A one-line error for a setting no training run can use."""
    if not (0 <= args.p_blur <= 1 and 0 <= args.p_noise <= 1):
        sys.exit(f"error: --p_blur {args.p_blur} and --p_noise {args.p_noise} must be "
                 f"probabilities in [0, 1]")
    for name in ("nEpoch", "batch_size", "val_chars"):
        if getattr(args, name) < 1:
            sys.exit(f"error: --{name} {getattr(args, name)} must be at least 1")


# ---- training ------------------------------------------------------------------------------------
def build_judge(args, device):
    """(the network of --arch with the sizes asked for, on `device`; its arguments)."""
    judge_args = {"hidden": args.hidden, "nf": args.nf}
    if args.arch == "bilstm":
        judge_args.update(g_dim=args.g_dim, rnn_size=args.rnn_size)
    judge = JUDGES[args.arch](**judge_args).to(device)
    if device.type == "cpu":  # channels-last convolutions are the faster ones on the CPU
        fmt = torch.channels_last_3d if args.arch == "conv3d" else torch.channels_last
        judge = judge.to(memory_format=fmt)
    return judge, judge_args


def set_up(args, train, device):
    """Everything a run changes as it trains: the training and held-out sequences, the judge and its
    arguments, and the optimizer, schedule, gradient scaler and corruption generator."""
    try:
        (X, A, D), held_out = validation_split(*train, args.val_chars, seed=args.seed)
    except ValueError as e:
        sys.exit(f"error: --val_chars {args.val_chars}: {e}")
    judge, judge_args = build_judge(args, device)
    loader = SpriteBatches(X, A, D, args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    if len(loader) == 0:
        sys.exit(f"error: --batch_size {args.batch_size} is more than the {len(X)} training "
                 f"sequences; a smaller batch makes at least one step")
    run = {"judge": judge, "optimizer": torch.optim.Adam(judge.parameters(), lr=args.lr),
           "corrupt_g": torch.Generator().manual_seed(args.seed + 1),
           "scaler": grad_scaler(device, args.amp)}
    run["sched"] = torch.optim.lr_scheduler.OneCycleLR(run["optimizer"], args.lr,
                                                       total_steps=args.nEpoch * len(loader))
    return loader, held_out, judge_args, run


def resume(path, run):
    """Load checkpoint `path` into the run; -> (best worst-head accuracy, its weights, epochs done,
    seconds spent)."""
    try:
        # read on the CPU: the generator's state must stay a CPU ByteTensor, and load_state_dict
        # puts the weights and the optimizer's state on the judge's device
        ckpt = read_checkpoint(path, map_location="cpu")
        run["judge"].load_state_dict(ckpt["model"])
        run["optimizer"].load_state_dict(ckpt["optimizer"])
        run["sched"].load_state_dict(ckpt["sched"])
        if "scaler" in ckpt:  # checkpoints written before fp16 loss scaling have none
            run["scaler"].load_state_dict(ckpt["scaler"])
        run["corrupt_g"].set_state(ckpt["corrupt_rng"])
        return ckpt["best"], ckpt["best_state"], ckpt["epoch"], ckpt["seconds"]
    except CheckpointError as e:
        sys.exit(f"error: cannot resume: {e}")
    except (KeyError, TypeError, RuntimeError) as e:
        sys.exit(f"error: cannot resume: {path} is not a checkpoint of this train_judge.py run "
                 f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")


def train_epoch(run, loader, args, device, desc):
    """One pass over the training batches, each video corrupted at random; -> the last batch's
    loss."""
    judge, optimizer, scaler = run["judge"], run["optimizer"], run["scaler"]
    judge.train()
    for batch in tqdm(loader, desc=desc, leave=False, mininterval=30):
        x = judge_corrupt(batch["x"], run["corrupt_g"], p_blur=args.p_blur, p_noise=args.p_noise)
        with autocast(device, args.amp):
            logits = judge(x.to(device))
        loss = sum(F.cross_entropy(logits[k].float(), y.to(device))
                   for k, y in factor_labels(batch["A"], batch["D"]).items())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        run["sched"].step()
    return loss.item()


def checkpoint(run, epoch, best, best_state, seconds):
    """What --resume needs to continue exactly after `epoch` epochs."""
    return {"model": run["judge"].state_dict(), "optimizer": run["optimizer"].state_dict(),
            "sched": run["sched"].state_dict(), "scaler": run["scaler"].state_dict(),
            "corrupt_rng": run["corrupt_g"].get_state(), "epoch": epoch, "best": best,
            "best_state": best_state, "seconds": seconds}


# ---- the end: test scores, robustness card, the judge file ---------------------------------------
def finish(args, judge, judge_args, best_state, test, device, t0):
    """Score the chosen weights on every test sequence, sharp and corrupted, and write them in half
    precision with what was measured."""
    judge.load_state_dict(best_state)
    train_seconds = time.time() - t0
    wrong = errors(judge, *test, device, args.amp)
    n = len(test[0])
    accuracy = accuracies(wrong, n)
    print(f"test accuracy ({n} sequences): "
          + ", ".join(f"{k} {v:.4%} ({wrong[k]} wrong)" for k, v in accuracy.items()))
    card = robustness_card(judge, *test, device, args.amp)
    print_card(card)
    save_atomic({"model": half_precision(best_state), "arch": args.arch, "judge_args": judge_args,
                 "heads": dict(FACTORS), "test_accuracy": accuracy, "test_wrong": wrong,
                 "robustness": card, "n_test": n, "train_seconds": round(train_seconds),
                 "args": vars(args)}, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB); trained in "
          f"{train_seconds:.0f} s, {time.time() - t0:.0f} s with the test scoring")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    try:
        data = load_sprites(args.data_root)
    except DataError as e:
        sys.exit(f"error: {e}")
    if args.card_only:
        return card_only(args, data, device)
    check_training_args(args)
    torch.manual_seed(args.seed)
    loader, held_out, judge_args, run = set_up(args, data["train"], device)
    best, best_state, start, spent = -1.0, None, 0, 0.0
    if args.resume and os.path.isfile(args.ckpt):
        best, best_state, start, spent = resume(args.ckpt, run)
        print(f"resumed from {args.ckpt} after epoch {start}", flush=True)
    print(f"{len(loader.X)} train sequences, {len(held_out[0])} held out ({args.val_chars} "
          f"characters), judge {judge_args}, {sum(q.numel() for q in run['judge'].parameters())} "
          f"parameters, {torch.get_num_threads()} thread(s)", flush=True)
    t0 = time.time() - spent
    for epoch in range(start, args.nEpoch):
        loader.set_epoch(epoch)
        loss = train_epoch(run, loader, args, device, desc=f"epoch {epoch + 1}/{args.nEpoch}")
        val = accuracies(errors(run["judge"], *held_out, device, args.amp), len(held_out[0]))
        print(f"epoch {epoch + 1}: loss {loss:.4f}, held-out train characters "
              + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
              + f" ({time.time() - t0:.0f} s)", flush=True)
        if min(val.values()) >= best:  # ties go to the later epoch
            # kept on the CPU, so that the checkpoint and the judge file load on any machine
            best, best_state = min(val.values()), {k: v.detach().to("cpu", copy=True)
                                                   for k, v in run["judge"].state_dict().items()}
        save_atomic(checkpoint(run, epoch + 1, best, best_state, time.time() - t0), args.ckpt)
    finish(args, run["judge"], judge_args, best_state, data["test"], device, t0)


if __name__ == "__main__":
    main()
