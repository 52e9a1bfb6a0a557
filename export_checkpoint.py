"""Write the shippable form of a training checkpoint: the model's weights in half precision, its sizes, and
where it came from (no optimizer state). utils.load_model reads both forms.

    python export_checkpoint.py runs/cdsvae_cpu/model.pt checkpoints/cdsvae_sprites_cpu.pt
"""
import argparse
import sys

from utils import CheckpointError, read_model_checkpoint, save_atomic


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a model.pt of train_cdsvae.py")
    p.add_argument("dst", help="where to write the half-precision copy")
    args = p.parse_args()
    try:
        ckpt = read_model_checkpoint(args.src)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    save_atomic({"model": {k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()},
                 "model_args": ckpt["model_args"], "epoch": ckpt.get("epoch"), "step": ckpt.get("step"),
                 "args": ckpt.get("args"), "history": ckpt.get("history"), "git": ckpt.get("git")}, args.dst)
    print(f"wrote {args.dst} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')})")


if __name__ == "__main__":
    main()
