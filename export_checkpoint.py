"""Write the shippable form of a training checkpoint: the model's weights in half precision, its
sizes, and where it came from (no optimizer state). utils.load_model reads both forms.

    python export_checkpoint.py runs/cdsvae_cpu/model.pt checkpoints/cdsvae_sprites_cpu.pt
"""
import argparse
import sys

from utils import CheckpointError, half_precision, read_model_checkpoint, save_atomic

PROVENANCE = ("epoch", "step", "args", "history", "git")  # kept beside the weights


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a model.pt of train_cdsvae.py")
    p.add_argument("dst", help="where to write the half-precision copy")
    args = p.parse_args()
    try:
        ckpt = read_model_checkpoint(args.src)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    save_atomic({"model": half_precision(ckpt["model"]), "model_args": ckpt["model_args"],
                 **{k: ckpt.get(k) for k in PROVENANCE}}, args.dst)
    print(f"wrote {args.dst} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')})")


if __name__ == "__main__":
    main()
