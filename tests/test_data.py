"""The Sprites set built from the open LPC sheets, the safe pickle loader and the on-the-fly
augmentations.

Tests that need the sheets find them with make_sprites.find_sheets() ($SPRITES_SHEETS,
./data/sprites-lpc or ../shared/sprites-lpc; the `sheets` fixture of conftest.py, which skips them
where there are none); they only render the few characters they check, never the whole set.
"""
import builtins
import collections
import hashlib
import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import make_sprites
from dataloader import (ACTIONS, DIRECTIONS, DataError, SpriteBatches, _make_batch,
                        character_attributes, character_id, content_augment, content_order,
                        load_sprites, motion_augment, to_float, validation_split)

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# sha256 of render_characters(sheets, [c])[0].tobytes(), i.e. (9 motions, 8 frames, 64, 64, 3)
# uint8, recorded from the build that wrote data/Sprite/data.pkl (its X_train[:9] is 1116,
# X_test[:9] is 884)
CHARACTER_SHA256 = {
    1116: "0d34d6995e1bfb08c3db5e13cdcb8f1ff3c1c8d9b47e08d724519674be544fcf",
    884: "83700bbb615e61b446a4218f725bd36d3e3c50906d2be5784278a8cb6afdb88d",
    0: "6b29bea11bde0ca9e921407998f788589d364f38d2b75118371f3280a05d286f",
    1295: "cf7531aa88f37343affdf16a4bea25101c957999834a1112dddddb58e0c150a1",
}

# the spec, written out independently of make_sprites: LPC sheet rows of (left, front, right) per
# action, the sheet columns of the 8 frames, and the label order D = 3 * action + direction with
# directions (front, left, right)
SPEC_ROWS = {"walk": {"left": 9, "front": 10, "right": 11},
             "spellcard": {"left": 1, "front": 2, "right": 3},
             "slash": {"left": 13, "front": 14, "right": 15}}
SPEC_COLUMNS = {"walk": [8, 1, 2, 3, 4, 5, 6, 7], "spellcard": [0, 1, 2, 3, 4, 5, 4, 6],
                "slash": [0, 1, 2, 3, 4, 5, 4, 0]}
SPEC_D = [(a, d) for a in ("walk", "spellcard", "slash") for d in ("front", "left", "right")]


@pytest.fixture(scope="module")
def rendered(sheets):
    ids = list(CHARACTER_SHA256)
    return dict(zip(ids, make_sprites.render_characters(sheets, ids)))


def synthetic(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 256, (n, 8, 64, 64, 3), dtype=torch.uint8, generator=g)
    return X, torch.randint(0, 6, (n, 4), generator=g), torch.randint(0, 9, (n,), generator=g)


# ---------------------------------------------------------------- the built set

def test_rendered_characters_are_pixel_exact(rendered):
    for c, sha in CHARACTER_SHA256.items():
        x = rendered[c]
        assert x.shape == (9, 8, 64, 64, 3) and x.dtype == np.uint8
        assert hashlib.sha256(x.tobytes()).hexdigest() == sha, f"character {c} differs"


def full_sheet_composite(sheets, skin, pant, top, hair):
    """Straightforward build: composite the whole 832x1344 sheets, then cut the 64x64 tiles of the
    spec."""
    canvas = Image.new("RGBA", (832, 1344), (0, 0, 0, 255))
    for layer in (f"body/{skin}", f"bottomwear/{pant}", f"topwear/{top}", f"hair/{hair}",
                  "shoes/1"):
        sheet = Image.open(os.path.join(sheets, layer + ".png")).convert("RGBA")
        canvas = Image.alpha_composite(canvas, sheet)
    sheet = np.asarray(canvas)
    assert sheet.shape == (1344, 832, 4) and (sheet[..., 3] == 255).all()
    out = np.empty((9, 8, 64, 64, 3), np.uint8)
    for D, (action, direction) in enumerate(SPEC_D):
        r = SPEC_ROWS[action][direction]
        for t, k in enumerate(SPEC_COLUMNS[action]):
            out[D, t] = sheet[64 * r:64 * r + 64, 64 * k:64 * k + 64, :3]
    return out


@pytest.mark.parametrize("c, attributes", [(1116, (5, 1, 0, 0)), (1295, (5, 5, 5, 5))])
def test_strip_shortcut_equals_full_sheet_composite(sheets, rendered, c, attributes):
    assert character_id(torch.tensor(attributes)) == c
    np.testing.assert_array_equal(rendered[c], full_sheet_composite(sheets, *attributes))


def test_label_map():
    assert ACTIONS == ("walk", "spellcard", "slash")
    assert DIRECTIONS == ("front", "left", "right")
    assert make_sprites.MOTIONS == [(SPEC_ROWS[a][d], tuple(SPEC_COLUMNS[a])) for a, d in SPEC_D]
    assert make_sprites.LAYERS == ("body", "bottomwear", "topwear", "hair")
    ids = [int(character_id(torch.tensor(character_attributes(c)))) for c in range(1296)]
    assert ids == list(range(1296))
    assert character_id(torch.tensor([1, 2, 3, 4])) == 216 + 2 * 36 + 3 * 6 + 4
    every = torch.tensor([character_attributes(c) for c in range(1296)])
    assert character_id(every).tolist() == ids  # all rows at once, as one row at a time
    assert character_attributes(1116) == (5, 1, 0, 0)
    assert {character_attributes(c) for c in range(1296)} == {
        (s, p, t, h) for s in range(6) for p in range(6) for t in range(6) for h in range(6)}


def test_split():
    train, test = make_sprites.split_characters()
    np.testing.assert_array_equal(np.concatenate([train, test]),
                                  np.random.RandomState(423).permutation(1296))
    assert len(train) == 1000 and len(test) == 296
    assert 9 * len(train) == 9000 and 9 * len(test) == 2664
    assert train[0] == 1116 and test[0] == 884
    assert not set(train.tolist()) & set(test.tolist())
    assert set(train.tolist()) | set(test.tolist()) == set(range(1296))


def test_build_layout_and_labels(sheets, rendered):
    """Sequence 9k + D of a split is motion D of its k-th character; A its (skin, pant, top,
    hair)."""
    data = make_sprites.build(sheets, np.array([1116, 0]), np.array([884]))
    assert data["X_train"].shape == (18, 8, 64, 64, 3) and data["X_test"].shape == (9, 8, 64, 64, 3)
    np.testing.assert_array_equal(data["X_train"][:9], rendered[1116])
    np.testing.assert_array_equal(data["X_train"][9:], rendered[0])
    np.testing.assert_array_equal(data["X_test"], rendered[884])
    np.testing.assert_array_equal(data["A_train"], [(5, 1, 0, 0)] * 9 + [(0, 0, 0, 0)] * 9)
    np.testing.assert_array_equal(data["D_train"], list(range(9)) * 2)
    np.testing.assert_array_equal(data["D_test"], list(range(9)))
    assert data["meta"]["split_seed"] == 423 and len(data["meta"]["sheets_sha256"]) == 25


def test_missing_sheets_message(tmp_path):
    out = tmp_path / "data.pkl"
    p = subprocess.run([sys.executable, "make_sprites.py", "--sheets", "/nonexistent",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "/nonexistent" in lines[0] and "YingzhenLi/Sprites" in lines[0]
    assert not out.exists()


# ---------------------------------------------------------------- augmentations

def test_content_augment_keeps_each_sequences_frames():
    X, A, D = synthetic(20)
    for batch in SpriteBatches(X, A, D, 8, shuffle=True, augment=True, seed=3):
        x, c = batch["x"], batch["c_aug"]
        assert c.shape == x.shape and c.dtype == x.dtype
        for b in range(len(x)):
            frames = collections.Counter(f.numpy().tobytes() for f in x[b])
            assert collections.Counter(f.numpy().tobytes() for f in c[b]) == frames
        order = batch["c_aug_order"]
        assert (order.sort(1).values == torch.arange(8)).all()
        assert torch.equal(c, x[torch.arange(len(x))[:, None], order])
    # and on its own
    order = content_order(20, 8, torch.Generator().manual_seed(0))
    y = content_augment(X, order=order)
    def frames(v):
        return sorted(f.numpy().tobytes() for f in v)

    assert all(frames(y[b]) == frames(X[b]) for b in range(20))
    assert (order != torch.arange(8)).any(1).all()


def test_a_mirrored_left_facing_video_is_the_right_facing_one(tiny_data):
    """The LPC sheets draw right-facing rows as (nearly) mirrored left-facing ones, which --f_mirror
    relies on: the mirror keeps the character and turns left into right (D = 3 * action +
    direction)."""
    X, A, D = load_sprites(tiny_data)["train"]
    x = to_float(X)
    pairs = 0
    for i in torch.nonzero(D % 3 == 1).flatten().tolist():  # left-facing
        right = torch.nonzero((A == A[i]).all(1) & (D == D[i] + 1)).flatten()
        # a few layers (some hair, some tops) are drawn asymmetrically: near, not equal (on the
        # whole train split the mirrored mean absolute difference is at most 0.014, the
        # unmirrored one at least 0.040)
        mirrored = min((x[i].flip(-1) - x[j]).abs().mean().item() for j in right.tolist())
        unmirrored = min((x[i] - x[j]).abs().mean().item() for j in right.tolist())
        assert mirrored < 0.02 and mirrored < unmirrored / 2, (i, mirrored, unmirrored)
        pairs += 1
    assert pairs == 3 * 6


def test_motion_augment_one_transform_per_sequence():
    X, A, D = synthetic(24, seed=1)
    X[:, 5] = X[:, 2]  # two identical frames in every sequence
    batches = list(SpriteBatches(X, A, D, 12, shuffle=True, augment=True, seed=4))
    for batch in batches:
        m = batch["m_aug"]
        assert torch.equal(m[:, 5], m[:, 2])
    # permuting a sequence's frames permutes its augmented frames: the transform does not depend
    # on the frame
    x = to_float(X)
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    m = motion_augment(x, torch.Generator().manual_seed(9))
    m_perm = motion_augment(x[:, perm], torch.Generator().manual_seed(9))
    torch.testing.assert_close(m_perm, m[:, perm], atol=1e-5, rtol=0)
    # it changes the look of most sequences
    changed = (m - x).abs().flatten(1).max(1).values > 0.02
    assert changed.float().mean() > 0.75
    assert 0 <= m.min() and m.max() <= 1


def reference_motion_augment(x, g):
    """The motion augmentation done the plain way, step by step on the images of each sequence in
    float64, drawing its random numbers in the documented order (colour jitter: brightness,
    contrast, saturation, hue, whether to jitter, the order of the 4 steps; greyscale; blur sigma;
    whether to blur)."""
    B = x.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(B, generator=g)

    bright, contrast, sat = uniform(0.2, 1.8), uniform(0.2, 1.8), uniform(0.2, 1.8)
    theta = uniform(-0.2, 0.2) * 2 * math.pi
    jitter = torch.rand(B, generator=g) < 0.8
    order = torch.argsort(torch.rand(B, 4, generator=g), dim=1)
    greyscale = torch.rand(B, generator=g) < 0.2
    sigma = 0.1 + 1.9 * torch.rand(B, generator=g)
    blur = torch.rand(B, generator=g) < 0.5
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       dtype=torch.float64)

    def luma(y):  # (T, 3, H, W) -> (T, 1, H, W)
        return (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2])[:, None]

    out = torch.empty_like(x)
    for b in range(B):
        y = x[b].double()
        if jitter[b]:
            for step in order[b].tolist():
                if step == 0:
                    y = bright[b].item() * y
                elif step == 1:  # towards the mean grey level of the whole sequence
                    y = contrast[b].item() * y + (1 - contrast[b].item()) * luma(y).mean()
                elif step == 2:
                    y = sat[b].item() * y + (1 - sat[b].item()) * luma(y)
                else:  # rotate the chroma (I, Q) of YIQ
                    c, s = math.cos(theta[b].item()), math.sin(theta[b].item())
                    t = torch.einsum("kc,tchw->tkhw", yiq, y)
                    i, q = t[:, 1], t[:, 2]
                    t = torch.stack([t[:, 0], c * i - s * q, s * i + c * q], 1)
                    y = torch.einsum("kc,tchw->tkhw", torch.linalg.inv(yiq), t)
        if greyscale[b]:
            y = luma(y).expand(-1, 3, -1, -1)
        if blur[b]:
            offsets = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
            k = torch.exp(-offsets / (2 * sigma[b].item() ** 2))
            k = k / k.sum()
            kernel = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
            y = F.conv2d(F.pad(y, (1, 1, 1, 1), mode="reflect"), kernel, groups=3)
        out[b] = y.clamp(0, 1).float()
    return out


def test_motion_augment_matches_plain_reference():
    x = to_float(synthetic(40, seed=2)[0])
    fast = motion_augment(x, torch.Generator().manual_seed(5))
    plain = reference_motion_augment(x, torch.Generator().manual_seed(5))
    torch.testing.assert_close(fast, plain, atol=2e-5, rtol=0)


def test_batch_views_match_the_public_functions():
    """A batch's c_aug / m_aug are content_augment / motion_augment of its x with the batch's
    generator."""
    X = synthetic(10, seed=3)[0]
    i = torch.tensor([7, 2, 2, 9, 0, 5, 1])
    batch = _make_batch(X, i, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    x = to_float(X[i])
    order = content_order(7, 8, g)
    assert torch.equal(batch["x"], x)
    assert torch.equal(batch["c_aug_order"], order)
    assert torch.equal(batch["c_aug"], content_augment(x, order=order))
    torch.testing.assert_close(batch["m_aug"], motion_augment(x, g), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- batches

def test_batch_shapes_dtypes_ranges():
    X, A, D = synthetic(19)
    loader = SpriteBatches(X, A, D, 8, shuffle=True, augment=True, seed=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for batch in batches:
        B = len(batch["index"])
        for k in ("x", "c_aug", "m_aug"):
            assert batch[k].shape == (B, 8, 3, 64, 64) and batch[k].dtype == torch.float32, k
            assert batch[k].is_contiguous() and 0 <= batch[k].min() and batch[k].max() <= 1, k
        assert batch["A"].shape == (B, 4) and batch["A"].dtype == torch.int64
        assert batch["D"].shape == (B,) and batch["D"].dtype == torch.int64
        i = batch["index"]
        assert torch.equal(batch["A"], A[i]) and torch.equal(batch["D"], D[i])
        # x is the stored sequence, exactly
        assert torch.equal((batch["x"] * 255).round().to(torch.uint8), X[i].permute(0, 1, 4, 2, 3))
        torch.testing.assert_close(batch["x"], X[i].permute(0, 1, 4, 2, 3).float() / 255,
                                   atol=1e-7, rtol=0)
    plain = next(iter(SpriteBatches(X, A, D, 8)))
    assert set(plain) == {"x", "A", "D", "index"}
    assert torch.equal(plain["index"], torch.arange(8))


def test_batches_are_deterministic_given_seed_and_epoch():
    X, A, D = synthetic(20)

    def epoch(seed, e):
        loader = SpriteBatches(X, A, D, 8, shuffle=True, augment=True, seed=seed)
        loader.set_epoch(e)
        return list(loader)

    a, b = epoch(1, 0), epoch(1, 0)
    for p, q in zip(a, b):
        assert p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p)
    assert not torch.equal(a[0]["index"], epoch(1, 1)[0]["index"])
    assert not torch.equal(a[0]["m_aug"], epoch(2, 0)[0]["m_aug"])


@pytest.mark.parametrize("n, batch_size", [(37, 8), (16, 8), (5, 8)])
def test_no_sample_dropped_without_drop_last(n, batch_size):
    X, A, D = synthetic(n)
    loader = SpriteBatches(X, A, D, batch_size, shuffle=True, augment=True, seed=2, drop_last=False)
    idx = torch.cat([b["index"] for b in loader])
    assert sorted(idx.tolist()) == list(range(n))
    assert len(loader) == math.ceil(n / batch_size)
    full = list(SpriteBatches(X, A, D, batch_size, shuffle=True, seed=2, drop_last=True))
    assert len(full) == n // batch_size and all(len(b["index"]) == batch_size for b in full)


@pytest.mark.parametrize("n, world", [(36, 2), (37, 2), (37, 3)])
def test_rank_shares_are_disjoint_and_cover_the_epoch(n, world):
    """Each rank's share of an epoch: as many videos and batches on every rank (DDP steps in
    lockstep), no video on two ranks but the padding to a multiple of the ranks, every video on
    some rank."""
    X, A, D = synthetic(n)
    shares = []
    for rank in range(world):
        loader = SpriteBatches(X, A, D, 4, shuffle=True, augment=False, seed=5, rank=rank,
                               world_size=world)
        loader.set_epoch(3)
        batches = list(loader)
        shares.append(torch.cat([b["index"] for b in batches]).tolist())
        assert len(shares[-1]) == math.ceil(n / world)
        assert len(batches) == len(loader) == math.ceil(n / world / 4)
        dropping = SpriteBatches(X, A, D, 4, shuffle=True, seed=5, rank=rank, world_size=world,
                                 drop_last=True)
        assert len(list(dropping)) == len(dropping) == math.ceil(n / world) // 4
    every = [i for share in shares for i in share]
    assert set(every) == set(range(n)) and len(every) - len(set(every)) == (-n) % world
    assert all(len(set(share)) == len(share) for share in shares)


def test_validation_split_holds_out_whole_characters():
    train, _ = make_sprites.split_characters()
    chars = train[:12]
    A = torch.tensor([character_attributes(int(c)) for c in chars]).repeat_interleave(9, 0)
    D = torch.arange(9).repeat(12)
    perm = torch.randperm(len(A), generator=torch.Generator().manual_seed(0))
    A0, D0 = A, D
    X, A, D = perm, A[perm], D[perm]  # X: the row of (A0, D0) that each row came from

    def ids(A):
        return set(character_id(A).tolist())

    (Xt, At, Dt), (Xv, Av, Dv) = validation_split(X, A, D, 4, seed=1)
    assert len(ids(Av)) == 4 and len(Xv) == 36 and len(Xt) == 72
    assert not ids(At) & ids(Av) and ids(At) | ids(Av) == set(chars.tolist())
    for c in ids(Av):  # every motion of a held-out character is held out
        assert sorted(Dv[character_id(Av) == c].tolist()) == list(range(9))
    assert sorted(torch.cat([Xt, Xv]).tolist()) == list(range(108))
    assert torch.equal(A0[Xv], Av) and torch.equal(D0[Xt], Dt) and torch.equal(A0[Xt], At)
    assert validation_split(X, A, D, 0)[1] is None
    with pytest.raises(ValueError):
        validation_split(X, A, D, 12)


# ---------------------------------------------------------------- the loader's refusals

def our_format(n=3, seed=0):
    X, A, D = synthetic(n, seed)
    return {"X_train": X.numpy(), "A_train": A.numpy(), "D_train": D.numpy(),
            "X_test": X.numpy()[:2], "A_test": A.numpy()[:2], "D_test": D.numpy()[:2],
            "meta": {"format_version": 1}}


def dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return str(path)


def assert_one_line_error(path, *words):
    with pytest.raises(DataError) as e:
        load_sprites(str(path))
    message = str(e.value)
    assert "\n" not in message and message, message
    assert e.value.__cause__ is None
    assert e.value.__context__ is None or e.value.__suppress_context__
    for w in words:
        assert w in message, message
    return message


def test_round_trip_of_our_format(tmp_path):
    data = our_format()
    out = load_sprites(dump(data, tmp_path / "data.pkl"))
    for split, n in (("train", 3), ("test", 2)):
        X, A, D = out[split]
        assert X.dtype == torch.uint8 and A.dtype == D.dtype == torch.int64
        np.testing.assert_array_equal(X.numpy(), data[f"X_{split}"][:n])
        np.testing.assert_array_equal(A.numpy(), data[f"A_{split}"][:n])
        np.testing.assert_array_equal(D.numpy(), data[f"D_{split}"][:n])


def test_paper_format_loads_to_the_same_data(tmp_path):
    ours = our_format()
    paper = {}
    for split in ("train", "test"):
        X, A, D = ours[f"X_{split}"], ours[f"A_{split}"], ours[f"D_{split}"]
        paper[f"X_{split}"] = X.astype(np.float32) / 255
        one_hot_a, one_hot_d = np.eye(6, dtype=np.float32)[A], np.eye(9, dtype=np.float32)[D]
        paper[f"A_{split}"] = np.repeat(one_hot_a[:, None], 8, axis=1)  # (N, 8, 4, 6)
        paper[f"D_{split}"] = np.repeat(one_hot_d[:, None], 8, axis=1)  # (N, 8, 9)
        paper[f"c_augs_{split}"] = np.zeros((len(X), 8, 8, 64, 64, 3), np.float32)
        paper[f"m_augs_{split}"] = np.ones((len(X), 8, 8, 64, 64, 3), np.float32)
    assert paper["A_train"].shape == (3, 8, 4, 6) and paper["D_train"].shape == (3, 8, 9)
    assert paper["X_train"].min() >= 0 and paper["X_train"].max() <= 1
    a = load_sprites(dump(ours, tmp_path / "ours.pkl"))
    b = load_sprites(dump(paper, tmp_path / "paper.pkl"))
    for split in ("train", "test"):
        for u, v in zip(a[split], b[split]):
            assert u.dtype == v.dtype and torch.equal(u, v)


class _OpensFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


class _RunsShell:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("payload", [_OpensFile, _RunsShell])
def test_refuses_a_pickle_that_runs_code(tmp_path, payload):
    target = tmp_path / "pwned"
    data = our_format()
    data["X_train"] = payload(str(target))
    path = dump(data, tmp_path / "evil.pkl")
    assert_one_line_error(path, "refusing")
    assert not target.exists()
    # the payload does run under plain pickle: the test pickle is a real threat
    with open(path, "rb") as f:
        obj = pickle.load(f)
    if isinstance(obj["X_train"], int):  # os.system's exit status
        assert target.exists()
    else:
        obj["X_train"].close()
        assert target.exists()


def test_refuses_truncated_file(tmp_path):
    good = tmp_path / "good.pkl"
    dump(our_format(), good)
    raw = good.read_bytes()
    for cut in (len(raw) // 2, 40, 1):
        path = tmp_path / f"cut{cut}.pkl"
        path.write_bytes(raw[:cut])
        assert_one_line_error(path, str(path), "make_sprites.py")
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    assert_one_line_error(empty, str(empty))


def test_refuses_wrong_shapes_and_contents(tmp_path):
    data = our_format()
    data["X_train"] = np.zeros((3, 8, 32, 32, 3), np.uint8)
    assert_one_line_error(dump(data, tmp_path / "small.pkl"), "X_train", "(N, 8, 64, 64, 3)")
    data = our_format()
    data["A_test"] = data["A_test"][:1]
    assert_one_line_error(dump(data, tmp_path / "labels.pkl"), "labels of split test")
    data = our_format()
    data["D_train"] = data["D_train"] + 9
    assert_one_line_error(dump(data, tmp_path / "range.pkl"), "out of range")
    data = our_format()
    del data["D_test"]
    assert_one_line_error(dump(data, tmp_path / "keys.pkl"), "D_test")
    assert_one_line_error(dump([1, 2], tmp_path / "list.pkl"), "list")


def test_refuses_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nothing" / "data.pkl", "no data file", "make_sprites.py")


def test_a_sheet_of_the_wrong_size_is_one_line_and_writes_nothing(sheets, tmp_path):
    for path in make_sprites.sheet_paths(sheets):
        link = tmp_path / "sheets" / os.path.relpath(path, sheets)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    bad = tmp_path / "sheets" / "hair" / "3.png"
    bad.unlink()
    Image.new("RGBA", (100, 100)).save(bad)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "make_sprites.py"),
                        "--sheets", str(tmp_path / "sheets"), "--out", str(tmp_path / "data.pkl")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "832x1344" in r.stderr
    assert not (tmp_path / "data.pkl").exists()


def test_leaving_out_the_content_view_changes_nothing_else():
    X = torch.randint(0, 256, (10, 8, 64, 64, 3), dtype=torch.uint8)
    A, D = torch.zeros(10, 4, dtype=torch.long), torch.zeros(10, dtype=torch.long)
    full = list(SpriteBatches(X, A, D, 4, shuffle=True, augment=True, seed=3))
    lean = list(SpriteBatches(X, A, D, 4, shuffle=True, augment=True, seed=3, content_view=False))
    for f, l in zip(full, lean):
        assert "c_aug" not in l
        for k in ("x", "m_aug", "c_aug_order", "index"):
            assert torch.equal(f[k], l[k]), k
