"""Build Stochastic Moving MNIST (Denton & Fergus, 2018; the generator of edenton/svg's
data/moving_mnist.py) from a folder of MNIST files: 64x64 one-channel videos of one digit (two
with --digits 2) scaled from 28 to 32 px, starting at a uniform position (the box's top-left
corner in 0..31) with a uniform integer velocity in -4..4 on each axis; a digit that would cross
a wall stops at it and draws a new velocity, 1..4 away from that wall on its axis and -4..4 on the
other. Overlaps are clipped to 255.

8 frames, as Sprites, not SVG's 15 (5 seen + 10 predicted): the same network, its 8-step prior and
the 2-hour CPU budget carry over, and in 8 frames a digit moving up to 4 px a frame across a 32 px
range already changes velocity at a wall in 3 videos of 4 (0.94 changes a video; 1.8 in 15
frames), so the stochastic rule is in the data.
9000 train videos from train digits and 2664 test videos from test digits, as many as Sprites,
each made from a random digit of its split by its own seeded stream (the test videos do not depend
on the train set's size), stored as uint8 (N, T, 64, 64, 1) with Sprites' channel-last layout,
with each video's digit labels, the digits' indices in their MNIST file and their positions per
frame (where MNIST centres a digit's mass, in its 32x32 box: smmnist.py says why); and every train
digit at 32x32 with its label, from which the judges make new videos (smmnist.JudgeVideos)."""
import argparse
import gzip
import hashlib
import os
import pickle
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from smmnist import DIGIT, SIZE, centre_of_mass, make_videos
from utils import OneLineErrors, check_writable, run_main, write_atomic

SEED = 2018
SPLITS = {"train": "train", "test": "t10k"}  # our split -> MNIST's file prefix
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # IDX: unsigned bytes, 3 dims / 1 dim
MNIST_NAMES = [f"{p}-{kind}" for p in SPLITS.values()
               for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
_CHUNK = 4096  # digits resized / videos located at a time: full MNIST in float64 is 0.5 GB


class MnistError(ValueError):
    """An MNIST file that is missing, corrupt, truncated or inconsistent."""


def mnist_paths(folder):
    """{name: path} of the four MNIST files in folder, raw or gzipped (raw first), or None."""
    paths = {}
    for name in MNIST_NAMES:
        found = [p for p in (os.path.join(folder, name), os.path.join(folder, name + ".gz"))
                 if os.path.isfile(p)]
        paths[name] = found[0] if found else None
    return paths


def find_mnist(mnist=None):
    """The first of --mnist, $MNIST_DIR, ./data/mnist and ../shared/mnist-10k that holds all four
    MNIST files."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [mnist] if mnist else [os.environ.get("MNIST_DIR"),
                                        os.path.join(here, "data", "mnist"),
                                        os.path.join(here, "..", "shared", "mnist-10k")]
    lacks = []
    for c in filter(None, candidates):
        missing = [n for n, p in mnist_paths(c).items() if p is None]
        if not missing:
            return c
        lacks.append(f"{c} has none" if len(missing) == 4 else f"{c} lacks {', '.join(missing)}")
    raise FileNotFoundError(f"no MNIST files: {'; '.join(lacks)}. A folder needs "
                            f"{', '.join(MNIST_NAMES)} (each raw or .gz), the files every MNIST "
                            f"loader downloads: pass --mnist DIR or set $MNIST_DIR")


def read_idx(path, magic):
    """The uint8 array of an IDX file, gzipped or not, refused unless its magic number is
    `magic` and its bytes are exactly what its header says."""
    redo = f"replace it with an intact copy of MNIST's {os.path.basename(path)}"
    try:
        raw = Path(path).read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip's own magic: decide by content, not by name
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # unreadable, bad or cut gzip stream
        raise MnistError(f"{path} cannot be read ({e}); {redo}") from None
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise MnistError(f"{path} starts with magic number {found}, not {magic} (an IDX file of "
                         f"{'images' if magic == IMAGES_MAGIC else 'labels'}); {redo}")
    header = 4 + 4 * raw[3]  # the magic's last byte counts the dimensions
    if len(raw) < header:
        raise MnistError(f"{path} holds {len(raw)} bytes, too few for its header: it is "
                         f"truncated; {redo}")
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4"))
    if len(raw) - header != np.prod(dims):
        raise MnistError(f"{path} holds {len(raw) - header} bytes after its header, which says "
                         f"{dims} = {int(np.prod(dims))}: it is truncated or damaged; {redo}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_mnist(folder, prefix):
    """Images (n, 28, 28) uint8 and labels (n,) int64 of the MNIST files `prefix`-* in folder."""
    paths = mnist_paths(folder)
    images_path, labels_path = (paths[f"{prefix}-{kind}"]
                                for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    if images_path is None or labels_path is None:
        raise MnistError(f"{folder} lacks {prefix}-images-idx3-ubyte or {prefix}-labels-idx1-"
                         f"ubyte (raw or .gz); put MNIST's files there")
    images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise MnistError(f"{images_path} holds images of {images.shape[1:]}, MNIST's are 28x28; "
                         f"replace it with MNIST's file")
    if len(labels) != len(images):
        raise MnistError(f"{labels_path} holds {len(labels)} labels for the {len(images)} images "
                         f"of {images_path}; use the two files of one MNIST copy")
    if len(labels) and labels.max() > 9:
        i = int(np.argmax(labels > 9))
        raise MnistError(f"{labels_path}: label {i} is {labels[i]}, digits are 0..9; replace "
                         f"it with MNIST's file")
    return images, labels.astype(np.int64)


def resize_digits(images):
    """(n, 28, 28) uint8 -> (n, 32, 32) uint8 by bilinear interpolation of PIL's kind (what SVG's
    torchvision Scale did), in float64 so that every machine rounds alike."""
    out = np.empty((len(images), DIGIT, DIGIT), np.uint8)
    for s in range(0, len(images), _CHUNK):
        x = torch.from_numpy(images[s:s + _CHUNK].astype(np.float64))[:, None]
        y = F.interpolate(x, size=(DIGIT, DIGIT), mode="bilinear", align_corners=False,
                          antialias=True)
        out[s:s + _CHUNK] = y[:, 0].clamp(0, 255).round().to(torch.uint8).numpy()
    return out


def position_floor(X, P):
    """Mean and largest distance in px a frame between the centre of mass of one-digit frames
    X (n, T, H, W, 1) and their digits' positions P (n, T, 1, 2): what reading positions from
    pixels gets wrong on real videos."""
    errors = np.concatenate([
        np.linalg.norm(centre_of_mass(X[s:s + _CHUNK, ..., 0]).numpy() - P[s:s + _CHUNK, :, 0],
                       axis=-1).ravel() for s in range(0, len(X), _CHUNK)])
    return float(errors.mean()), float(errors.max())


def build(mnist, train_videos=9000, test_videos=2664, frames=8, digits=1, seed=SEED):
    """The data set dict: X_, Y_ (digit labels), I_ (digit indices), P_ of each split, the train
    split's digits (32x32) and their labels, and meta."""
    data, sizes = {}, {}
    for i, (split, prefix) in enumerate(SPLITS.items()):
        images, labels = read_mnist(mnist, prefix)
        n = train_videos if split == "train" else test_videos
        resized = resize_digits(images)
        X, I, P = make_videos(np.random.RandomState(seed + i), resized, n, frames, digits)
        data.update({f"X_{split}": X, f"Y_{split}": labels[I], f"I_{split}": I,
                     f"P_{split}": P})
        if split == "train":  # the judges make new videos of every one of them (smmnist.py)
            data.update(digits_train=resized, digit_labels_train=labels)
        sizes[split] = len(images)
    floor = position_floor(data["X_test"], data["P_test"]) if digits == 1 else (None, None)
    sha256 = {os.path.basename(p): hashlib.sha256(Path(p).read_bytes()).hexdigest()
              for p in mnist_paths(mnist).values()}
    data["meta"] = {"format_version": 1, "seed": seed, "frames": frames, "digits": digits,
                    "mnist_digits": sizes, "mnist_sha256": sha256,
                    "position": "MNIST's centre of mass (14, 14) in the digit's box, scaled; "
                                "(row, col) in px",
                    "position_floor_px": floor[0], "position_floor_max_px": floor[1]}
    return data


def write_pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def main():
    p = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", help="folder of the MNIST files, raw or .gz (default: the first of "
                   "$MNIST_DIR, ./data/mnist, ../shared/mnist-10k that has them)")
    p.add_argument("--out", default="data/smmnist/data.pkl",
                   help="output pickle (default %(default)s)")
    p.add_argument("--frames", type=int, default=8, help="frames a video (default %(default)s)")
    p.add_argument("--digits", type=int, default=1, choices=(1, 2),
                   help="digits a video (default %(default)s)")
    p.add_argument("--train_videos", type=int, default=9000,
                   help="videos made from the train digits (default %(default)s)")
    p.add_argument("--test_videos", type=int, default=2664,
                   help="videos made from the test digits (default %(default)s)")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the train videos; the test "
                   "videos use seed + 1 (default %(default)s)")
    args = p.parse_args()
    if min(args.frames, args.train_videos, args.test_videos) < 1:
        p.error("--frames, --train_videos and --test_videos take positive counts")
    t0 = time.time()
    try:
        mnist = find_mnist(args.mnist)
        check_writable(args.out, "--out", needs_bytes=(args.train_videos + args.test_videos)
                       * args.frames * SIZE * SIZE, example="data.pkl")  # before they are made
        data = build(mnist, args.train_videos, args.test_videos, args.frames, args.digits,
                     args.seed)
        write_atomic(args.out, lambda tmp: write_pickle(data, tmp))
    except (ValueError, OSError) as e:  # MnistError is a ValueError, FileNotFoundError an OSError
        sys.exit(f"error: {e}")
    floor = data["meta"]["position_floor_px"]
    print(f"wrote {args.out}: {len(data['X_train'])} train and {len(data['X_test'])} test videos "
          f"of {args.frames} frames, {os.path.getsize(args.out) / 1e6:.0f} MB, in "
          f"{time.time() - t0:.1f} s (MNIST from {mnist}); centre of mass against the positions "
          f"on the test videos: " + (f"{floor:.3f} px a frame on average, at most "
                                     f"{data['meta']['position_floor_max_px']:.3f}"
                                     if floor is not None else "not defined for two digits"))


if __name__ == "__main__":
    run_main(main)
