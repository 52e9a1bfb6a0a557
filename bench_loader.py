"""Time the Sprites loader and print one JSON line.

    python bench_loader.py [--device cpu] [--batch_size 128] [--batches 30] [--repeats 3]
                           [--no_augment] [--no_c_aug] [--chunk N] [--synthetic N]

Sequences/s of `SpriteBatches` over the train split of data/Sprite/data.pkl (or N random sequences
with --synthetic N), with both augmentations (content and motion) unless --no_augment, every batch
made on --device (the uint8 split moved there first, untimed): best and median of `--repeats` timed
passes of `--batches` batches each, after one warm-up batch. On CUDA a pass is timed from a
synchronised start to the end of its last batch's kernels (torch.cuda.synchronize).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

import torch  # noqa: E402

from dataloader import DataError, SpriteBatches, load_sprites  # noqa: E402
from utils import pick_device  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/Sprite/data.pkl",
                   help="the data pickle of make_sprites.py (default %(default)s)")
    p.add_argument("--synthetic", type=int, default=0,
                   help="use N random sequences instead of --data (default 0: off)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                   help="where the batches are made (default cpu; auto: cuda when available)")
    p.add_argument("--batch_size", type=int, default=128, help="sequences per batch (default 128)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per pass (default 30)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--chunk", type=int, default=0,
                   help="sequences made at a time (default 0: 4 on the CPU, the whole batch on "
                        "CUDA; --chunk N times the whole-batch way on the CPU)")
    p.add_argument("--no_augment", action="store_true", help="time the plain batches only")
    p.add_argument("--no_c_aug", action="store_true",
                   help="leave out the c_aug tensor (its frame order is still made), as "
                        "train_cdsvae.py does")
    args = p.parse_args()
    for name in ("batch_size", "batches", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.exit(2, f"error: --{name} must be at least 1, got {getattr(args, name)}\n")
    if args.chunk < 0 or args.synthetic < 0:
        p.exit(2, "error: --chunk and --synthetic take a count of 0 or more\n")
    return args


def synchronize(device):
    """Wait for the device's queued kernels, so that a clock read after it counts them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pass_rate(loader, batches):
    """Sequences/s of one pass of `batches` batches, after one warm-up batch."""
    it = iter(loader)
    next(it)
    synchronize(loader.device)
    n, t0 = 0, time.perf_counter()
    for _, batch in zip(range(batches), it):
        n += len(batch["x"])
    synchronize(loader.device)
    return n / (time.perf_counter() - t0)


def sequences(args):
    """(X, A, D, what they are) of --synthetic or --data."""
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        n = args.synthetic
        X = torch.randint(0, 256, (n, 8, 64, 64, 3), dtype=torch.uint8, generator=g)
        A, D = torch.randint(0, 6, (n, 4), generator=g), torch.randint(0, 9, (n,), generator=g)
        return X, A, D, f"synthetic {n}"
    try:
        return (*load_sprites(args.data)["train"], args.data)
    except DataError as e:
        sys.exit(f"error: {e}")


def main():
    args = get_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    X, A, D, source = sequences(args)
    if len(X) < args.batch_size * (args.batches + 1):
        sys.exit(f"error: {len(X)} sequences make fewer than --batches {args.batches} + 1 "
                 f"batches of {args.batch_size}; lower --batches or --batch_size")
    loader = SpriteBatches(X, A, D, args.batch_size, shuffle=True, augment=not args.no_augment,
                           seed=0, content_view=not args.no_c_aug, device=device)
    loader.chunk = args.chunk or None
    rates = []
    for r in range(args.repeats):
        loader.set_epoch(r)
        rates.append(pass_rate(loader, args.batches))
    print(json.dumps({
        "sequences_per_s": round(max(rates), 1),
        "sequences_per_s_median": round(statistics.median(rates), 1),
        "ms_per_batch": round(1000 * args.batch_size / max(rates), 1),
        "batch_size": args.batch_size, "augment": not args.no_augment, "c_aug": not args.no_c_aug,
        "device": str(device), "store": str(loader.store.device), "chunk": args.chunk or "auto",
        "threads": torch.get_num_threads(), "data": source, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
    }))


if __name__ == "__main__":
    main()
