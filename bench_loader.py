"""Time the Sprites loader on one CPU thread and print one JSON line.

    python bench_loader.py [--batch_size 128] [--batches 30] [--repeats 3] [--no_augment]
                           [--synthetic N]

Sequences/s of `SpriteBatches` over the train split of data/Sprite/data.pkl (or N random sequences
with --synthetic N), with both augmentations (content and motion) unless --no_augment: best and
median of `--repeats` timed passes of `--batches` batches each, after one warm-up batch.
"""
import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its thread pool

import torch  # noqa: E402

from dataloader import SpriteBatches, load_sprites  # noqa: E402


def get_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/Sprite/data.pkl",
                   help="the data pickle of make_sprites.py (default %(default)s)")
    p.add_argument("--synthetic", type=int, default=0,
                   help="use N random sequences instead of --data (default 0: off)")
    p.add_argument("--batch_size", type=int, default=128, help="sequences per batch (default 128)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per pass (default 30)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no_augment", action="store_true", help="time the plain batches only")
    return p.parse_args()


def pass_rate(loader, batches):
    """Sequences/s of one pass of `batches` batches, after one warm-up batch."""
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    for _, batch in zip(range(batches), it):
        n += len(batch["x"])
    return n / (time.perf_counter() - t0)


def main():
    args = get_args()
    torch.set_num_threads(args.threads)
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        n = args.synthetic
        X = torch.randint(0, 256, (n, 8, 64, 64, 3), dtype=torch.uint8, generator=g)
        A, D = torch.randint(0, 6, (n, 4), generator=g), torch.randint(0, 9, (n,), generator=g)
        source = f"synthetic {n}"
    else:
        X, A, D = load_sprites(args.data)["train"]
        source = args.data
    loader = SpriteBatches(X, A, D, args.batch_size, shuffle=True, augment=not args.no_augment,
                           seed=0)
    rates = []
    for r in range(args.repeats):
        loader.set_epoch(r)
        rates.append(pass_rate(loader, args.batches))
    print(json.dumps({
        "sequences_per_s": round(max(rates), 1),
        "sequences_per_s_median": round(statistics.median(rates), 1),
        "ms_per_batch": round(1000 * args.batch_size / max(rates), 1),
        "batch_size": args.batch_size, "augment": not args.no_augment,
        "threads": torch.get_num_threads(), "data": source, "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
    }))


if __name__ == "__main__":
    main()
