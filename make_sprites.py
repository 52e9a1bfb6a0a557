"""Build the standard Sprites set (Li & Mandt, 2018) from the open LPC sprite sheets: 1296
characters (skin, pant, top, hair in 0..5) x 9 motions (3 actions x 3 directions) x 8 frames of
64x64 RGB, split 1000/296 characters = 9000/2664 sequences, stored as uint8 in one pickle."""
import argparse
import hashlib
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dataloader import ACTIONS, DIRECTIONS, character_attributes
from utils import check_writable, run_main, write_atomic

SPLIT_SEED = 423
LAYERS = ("body", "bottomwear", "topwear", "hair")  # indexed by skin, pant, top, hair
# sheet rows per action for the directions (front, left, right); LPC rows run up/left/down/right
ACTION_ROWS = {"walk": (10, 9, 11), "spellcard": (2, 1, 3), "slash": (14, 13, 15)}
ACTION_COLUMNS = {"walk": (8, 1, 2, 3, 4, 5, 6, 7), "spellcard": (0, 1, 2, 3, 4, 5, 4, 6),
                  "slash": (0, 1, 2, 3, 4, 5, 4, 0)}
# (row, columns) of the 9 motions in label order D = 3 * action + direction
MOTIONS = [(ACTION_ROWS[a][d], ACTION_COLUMNS[a]) for a in ACTIONS for d in range(len(DIRECTIONS))]


def split_characters():
    """Character ids of the train and test split, in the order their sequences are stored."""
    perm = np.random.RandomState(SPLIT_SEED).permutation(6 ** 4)
    return perm[:1000], perm[1000:]


def sheet_paths(sheets):
    paths = [os.path.join(sheets, layer, f"{i}.png") for layer in LAYERS for i in range(6)]
    return paths + [os.path.join(sheets, "shoes", "1.png")]


def find_sheets(sheets=None):
    """The first of --sheets, $SPRITES_SHEETS, ./data/sprites-lpc and ../shared/sprites-lpc that
    holds every sheet."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [sheets] if sheets else [os.environ.get("SPRITES_SHEETS"),
                                          os.path.join(here, "data", "sprites-lpc"),
                                          os.path.join(here, "..", "shared", "sprites-lpc")]
    candidates = [c for c in candidates if c]
    for c in candidates:
        if all(os.path.isfile(p) for p in sheet_paths(c)):
            return c
    raise FileNotFoundError(f"no Sprites sheets in {', '.join(candidates)}; the sheets come from "
                            f"the public repository YingzhenLi/Sprites (folders body, bottomwear, "
                            f"topwear, hair, shoes): clone it and pass --sheets DIR")


def motion_strip(path):
    """The 72 tiles a layer contributes (9 motions x 8 frames) as one RGBA image of 9*64 x 8*64."""
    sheet = np.asarray(Image.open(path).convert("RGBA"))
    if sheet.shape[:2] != (1344, 832):
        raise ValueError(f"{path} is {sheet.shape[1]}x{sheet.shape[0]}, expected an 832x1344 sheet")
    tiles = sheet.reshape(21, 64, 13, 64, 4)  # (row, y, column, x, RGBA)
    strip = np.stack([tiles[row][:, list(columns)] for row, columns in MOTIONS])  # 9, 64, 8, 64, 4
    return Image.fromarray(strip.reshape(9 * 64, 8 * 64, 4), "RGBA")


def render_characters(sheets, characters):
    """uint8 array (len(characters), 9, 8, 64, 64, 3) of every motion of each character (alpha
    compositing is per pixel, so compositing the strips of tiles equals compositing the sheets)."""
    strips = {p: motion_strip(p) for p in sheet_paths(sheets)}
    shoes = strips[os.path.join(sheets, "shoes", "1.png")]
    out = np.empty((len(characters), 9, 8, 64, 64, 3), np.uint8)
    for i, c in enumerate(characters):
        canvas = Image.new("RGBA", shoes.size, (0, 0, 0, 255))
        for layer, a in zip(LAYERS, character_attributes(int(c))):
            canvas = Image.alpha_composite(canvas, strips[os.path.join(sheets, layer, f"{a}.png")])
        canvas = np.asarray(Image.alpha_composite(canvas, shoes))[..., :3]
        out[i] = canvas.reshape(9, 64, 8, 64, 3).transpose(0, 2, 1, 3, 4)
    return out


def build(sheets, characters_train, characters_test):
    """The data set dict of the paper repo's keys, plus meta."""
    data = {}
    for name, chars in (("train", characters_train), ("test", characters_test)):
        data[f"X_{name}"] = render_characters(sheets, chars).reshape(-1, 8, 64, 64, 3)
        A = np.array([character_attributes(int(c)) for c in chars], np.int64)
        data[f"A_{name}"] = np.repeat(A, 9, axis=0)
        data[f"D_{name}"] = np.tile(np.arange(9, dtype=np.int64), len(chars))
    sha256 = {os.path.relpath(p, sheets): hashlib.sha256(Path(p).read_bytes()).hexdigest()
              for p in sheet_paths(sheets)}
    data["meta"] = {"format_version": 1, "split_seed": SPLIT_SEED, "sheets_sha256": sha256}
    return data


def write_pickle(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sheets", help="folder of the LPC sheets (default: the first of "
                   "$SPRITES_SHEETS, ./data/sprites-lpc, ../shared/sprites-lpc that has them)")
    p.add_argument("--out", default="data/Sprite/data.pkl",
                   help="output pickle (default %(default)s)")
    args = p.parse_args()
    t0 = time.time()
    try:
        sheets = find_sheets(args.sheets)
        # before the build's half minute: every video's bytes, uint8
        check_writable(args.out, "--out", needs_bytes=6 ** 4 * len(MOTIONS) * 8 * 64 * 64 * 3,
                       example="data.pkl")
        data = build(sheets, *split_characters())  # refuses a sheet of the wrong size or format
        write_atomic(args.out, lambda tmp: write_pickle(data, tmp))
    except (ValueError, OSError) as e:  # FileNotFoundError (no sheets) is an OSError
        sys.exit(f"error: {e}")
    print(f"wrote {args.out}: {len(data['X_train'])} train and {len(data['X_test'])} test "
          f"sequences, {os.path.getsize(args.out) / 1e9:.2f} GB, in {time.time() - t0:.1f} s "
          f"(sheets from {sheets})")


if __name__ == "__main__":
    run_main(main)
