"""Train a Sprites judge (heads action, skin, pant, top, hair) with full supervision on the train split.

    python judges/train_judge.py --arch bilstm --amp --threads 1 [--nEpoch 6] [--out judges/sprite_judge.pt]
    python judges/train_judge.py --arch conv3d --amp --threads 1 --nEpoch 8 --out judges/clip_judge.pt
    python judges/train_judge.py --card_only --out judges/sprite_judge.pt     # robustness card of a judge file

--arch bilstm: model.SpriteJudge, a frame encoder like the model's (g_dim 128), a BiLSTM (256) and one MLP head
(hidden 256) per factor. --arch conv3d: model.ClipJudge, 3D convolutions over the whole clip and the same heads.
Heads: action = the D label (9 classes); skin, pant, top, hair = the columns of A (6 classes each).
Training videos are blurred and noised at random (dataloader.judge_corrupt; --p_blur, --p_noise), so that the
judge reads the factors and not the sharpness of what it is shown.
A few train characters (--val_chars, all their motions) are held out to choose the epoch (the best worst head);
the test split is scored once, at the end, on every one of its sequences, sharp and corrupted (the robustness
card: blurred at sigma 0.7, 1.0, 1.5 px, and with pixel noise of std 0.05 and 0.1). The chosen weights are
written atomically in half precision with the network's name and arguments, the test accuracies and the card
(a dict loadable with torch.load(weights_only=True)). A checkpoint is written after every epoch (--ckpt); --resume continues from it.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataloader import DataError, SpriteBatches, gaussian_blur, judge_corrupt, load_sprites, validation_split  # noqa: E402,E501
from judges.networks import JUDGES, load_judge  # noqa: E402
from utils import CheckpointError, pick_device, read_checkpoint, save_atomic  # noqa: E402


def targets(A, D):
    """The label of each judge head: action is D; skin, pant, top, hair are the columns of A."""
    return {"action": D, "skin": A[:, 0], "pant": A[:, 1], "top": A[:, 2], "hair": A[:, 3]}


# the robustness card: name -> what is done to the real test videos before the judge sees them
CARD = {"sharp": lambda x, g: x,
        **{f"blur_{s}": (lambda x, g, s=s: gaussian_blur(x, s)) for s in (0.7, 1.0, 1.5)},
        **{f"noise_{n}": (lambda x, g, n=n: (x + n * torch.randn(x.shape, generator=g)).clamp_(0, 1))
           for n in (0.05, 0.1)}}


@torch.no_grad()
def errors(judge, X, A, D, device, amp, batch_size=256, corrupt=None):
    """Number of wrongly classified sequences per head, over every sequence of X (after `corrupt(x, generator)`)."""
    judge.eval()
    wrong = {k: 0 for k in JUDGE_HEADS}
    g = torch.Generator().manual_seed(0)
    for batch in SpriteBatches(X, A, D, batch_size):
        x = batch["x"] if corrupt is None else corrupt(batch["x"], g)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = judge(x.to(device))
        for k, y in targets(batch["A"], batch["D"]).items():
            wrong[k] += (logits[k].argmax(1).cpu() != y).sum().item()
    return wrong


def robustness_card(judge, X, A, D, device, amp):
    """{condition: {head: accuracy}} of the judge on every video of X, sharp and under each corruption of CARD."""
    return {name: {k: 1 - w / len(X) for k, w in errors(judge, X, A, D, device, amp, corrupt=corrupt).items()}
            for name, corrupt in CARD.items()}


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


def print_card(card):
    print(f"{'real test videos':<18}" + "".join(f"{k:>9}" for k in JUDGE_HEADS))
    for name, accs in card.items():
        print(f"{name:<18}" + "".join(f"{100 * accs[k]:>8.2f}%" for k in JUDGE_HEADS))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_root", default="data/Sprite/data.pkl", help="the data pickle (make_sprites.py)")
    p.add_argument("--out", default="judges/sprite_judge.pt", help="where to write the weights")
    p.add_argument("--ckpt", default="runs/judge/last.pt", help="checkpoint written after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --ckpt")
    p.add_argument("--arch", choices=tuple(JUDGES), default="bilstm",
                   help="bilstm: frame encoder + BiLSTM (model.SpriteJudge); conv3d: 3D convs over the clip (ClipJudge)")
    p.add_argument("--p_blur", type=float, default=0.5,
                   help="probability that a training video is blurred, sigma uniform in [0, 2] px (default 0.5)")
    p.add_argument("--p_noise", type=float, default=0.5,
                   help="probability of Gaussian pixel noise, std uniform in [0, 0.1] (default 0.5)")
    p.add_argument("--card_only", action="store_true",
                   help="train nothing: add the robustness card to the judge file --out and print it")
    p.add_argument("--nEpoch", type=int, default=6, help="epochs (default 6)")
    p.add_argument("--batch_size", type=int, default=64, help="videos per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate of a one-cycle schedule")
    p.add_argument("--nf", type=int, default=32, help="conv width of the frame encoder (default 32; the model's 64)")
    p.add_argument("--g_dim", type=int, default=128, help="frame feature size, bilstm only (default 128)")
    p.add_argument("--rnn_size", type=int, default=256, help="BiLSTM size, bilstm only (default 256)")
    p.add_argument("--hidden", type=int, default=256, help="hidden units of each head (default 256)")
    p.add_argument("--val_chars", type=int, default=20, help="train characters held out to pick the epoch")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's choice)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    try:
        data = load_sprites(args.data_root)
    except DataError as e:
        sys.exit(f"error: {e}")
    if args.card_only:
        return card_only(args, data, device)
    if not (0 <= args.p_blur <= 1 and 0 <= args.p_noise <= 1):
        sys.exit(f"error: --p_blur {args.p_blur} and --p_noise {args.p_noise} must be probabilities in [0, 1]")
    torch.manual_seed(args.seed)
    (X, A, D), (Xv, Av, Dv) = validation_split(*data["train"], args.val_chars, seed=args.seed)
    judge_args = {"hidden": args.hidden, "nf": args.nf}
    if args.arch == "bilstm":
        judge_args.update(g_dim=args.g_dim, rnn_size=args.rnn_size)
    judge = JUDGES[args.arch](**judge_args).to(device)
    if device.type == "cpu":
        judge = judge.to(memory_format=torch.channels_last_3d if args.arch == "conv3d" else torch.channels_last)
    corrupt_g = torch.Generator().manual_seed(args.seed + 1)
    optimizer = torch.optim.Adam(judge.parameters(), lr=args.lr)
    loader = SpriteBatches(X, A, D, args.batch_size, shuffle=True, seed=args.seed, drop_last=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.nEpoch * len(loader))
    best, best_state, start, spent = -1.0, None, 0, 0.0
    if args.resume and os.path.isfile(args.ckpt):
        try:
            ck = read_checkpoint(args.ckpt, map_location=device)
            judge.load_state_dict(ck["model"])
            optimizer.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["sched"])
            corrupt_g.set_state(ck["corrupt_rng"])
            best, best_state, start, spent = ck["best"], ck["best_state"], ck["epoch"], ck["seconds"]
        except CheckpointError as e:
            sys.exit(f"error: cannot resume: {e}")
        except (KeyError, TypeError, RuntimeError) as e:
            sys.exit(f"error: cannot resume: {args.ckpt} is not a checkpoint of this train_judge.py run "
                     f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
        print(f"resumed from {args.ckpt} after epoch {start}", flush=True)
    print(f"{len(X)} train sequences, {len(Xv)} held out ({args.val_chars} characters), judge {judge_args}, "
          f"{sum(q.numel() for q in judge.parameters())} parameters, {torch.get_num_threads()} thread(s)", flush=True)
    t0 = time.time() - spent
    for epoch in range(start, args.nEpoch):
        loader.set_epoch(epoch)
        judge.train()
        for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{args.nEpoch}", leave=False, mininterval=30):
            x = judge_corrupt(batch["x"], corrupt_g, p_blur=args.p_blur, p_noise=args.p_noise)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                logits = judge(x.to(device))
            loss = sum(F.cross_entropy(logits[k].float(), y.to(device))
                       for k, y in targets(batch["A"], batch["D"]).items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
        val = {k: 1 - w / len(Xv) for k, w in errors(judge, Xv, Av, Dv, device, args.amp).items()}
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out train characters "
              + ", ".join(f"{k} {v:.4f}" for k, v in val.items()) + f" ({time.time() - t0:.0f} s)", flush=True)
        if min(val.values()) >= best:
            best, best_state = min(val.values()), {k: v.detach().clone() for k, v in judge.state_dict().items()}
        save_atomic({"model": judge.state_dict(), "optimizer": optimizer.state_dict(), "sched": sched.state_dict(),
                     "corrupt_rng": corrupt_g.get_state(), "epoch": epoch + 1, "best": best, "best_state": best_state,
                     "seconds": time.time() - t0}, args.ckpt)
    judge.load_state_dict(best_state)
    train_seconds = time.time() - t0
    wrong = errors(judge, *data["test"], device, args.amp)
    n = len(data["test"][0])
    test = {k: 1 - w / n for k, w in wrong.items()}
    print(f"test accuracy ({n} sequences): " + ", ".join(f"{k} {v:.4%} ({wrong[k]} wrong)" for k, v in test.items()))
    card = robustness_card(judge, *data["test"], device, args.amp)
    print_card(card)
    save_atomic({"model": {k: v.half() if v.is_floating_point() else v for k, v in best_state.items()},
                 "arch": args.arch, "judge_args": judge_args, "heads": dict(JUDGE_HEADS), "test_accuracy": test,
                 "test_wrong": wrong, "robustness": card, "n_test": n, "train_seconds": round(train_seconds),
                 "args": vars(args)}, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB); trained in {train_seconds:.0f} s, "
          f"{time.time() - t0:.0f} s with the test scoring")


if __name__ == "__main__":
    main()
