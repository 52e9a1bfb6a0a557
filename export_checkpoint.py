"""Write the shippable form of a training checkpoint: the model's weights in half precision, its
sizes, and where it came from (no optimizer state). utils.load_model reads both forms.

    python export_checkpoint.py runs/cdsvae_cpu/model.pt checkpoints/cdsvae_sprites_cpu.pt
"""
import argparse
import os
import sys

from utils import (CheckpointError, OneLineErrors, folders_held, half_precision,
                   model_from_checkpoint, read_model_checkpoint, refuse_overwriting, run_main,
                   save_atomic)

PROVENANCE = ("epoch", "step", "args", "history", "git")  # kept beside the weights


def main(argv=None):
    p = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a model.pt of train_cdsvae.py")
    p.add_argument("dst", help="where to write the half-precision copy")
    args = p.parse_args(argv)
    if os.path.isdir(args.dst):
        sys.exit(f"error: {args.dst} is a folder; name the file to write")
    refuse_overwriting([("dst", args.dst)], [("src", args.src)])
    try:  # all that load_model checks: the copy is refused where the source would be
        ckpt = read_model_checkpoint(args.src)
        model_from_checkpoint(ckpt, args.src)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    # a training that holds dst's folder is refused, and none starts there while this writes
    with folders_held([os.path.dirname(os.path.abspath(args.dst))], flags="dst"):
        save_atomic({"model": half_precision(ckpt["model"]), "model_args": ckpt["model_args"],
                     **{k: ckpt.get(k) for k in PROVENANCE}}, args.dst)
    print(f"wrote {args.dst} (epoch {ckpt.get('epoch')}, step {ckpt.get('step')})")


if __name__ == "__main__":
    run_main(main)
