"""Sprites loading: a restricted unpickler, in-memory uint8 storage, and augmentations made per batch.

A batch is a dict of float tensors in [0, 1] of shape (B, 8, 3, 64, 64): `x`, its content-augmented view
`c_aug` (frames shuffled: same character, motion destroyed) and its motion-augmented view `m_aug` (one colour
/ blur change for the whole sequence: same motion, new appearance); plus `A` (B, 4) and `D` (B,) labels and
`c_aug_order` (B, 8), the frame order of `c_aug`.
"""
import importlib
import math
import os
import pickle

import numpy as np
import torch

# Globals a data.pkl of numpy arrays may name; anything else is refused before it can run.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class DataError(ValueError):
    """A data file that is missing, unsafe, truncated or of the wrong shape."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise DataError(f"refusing to load {module}.{name}: a Sprites data file holds only numpy arrays")
        if module.startswith("numpy.core."):  # files written by numpy 1.x
            module = "numpy._core." + module[len("numpy.core."):]
        return getattr(importlib.import_module(module), name)


def safe_load_pickle(path):
    """Unpickle a file that may hold only numpy arrays, dtypes, scalars and plain containers."""
    if not os.path.isfile(path):
        raise DataError(f"no data file at {path}: build it with `python make_sprites.py --out {path}`")
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f).load()
    except DataError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{path} is not a readable Sprites pickle ({type(e).__name__}: {e}); "
                        f"rebuild it with `python make_sprites.py --out {path}`") from None


def _labels(A, D, n, path, split):
    """Attribute (n, 4) and action (n,) int labels from ours or the paper repo's one-hot (n, 8, 4, 6) / (n, 8, 9)."""
    A, D = np.asarray(A), np.asarray(D)
    if A.ndim == 4:
        A = A[:, 0]
    if A.ndim == 3:
        A = A.argmax(-1)
    if D.ndim == 3:
        D = D[:, 0]
    if D.ndim == 2:
        D = D.argmax(-1)
    if A.shape != (n, 4) or D.shape != (n,):
        raise DataError(f"{path}: labels of split {split} have shapes {A.shape} and {D.shape}, expected ({n}, 4) "
                        f"and ({n},)")
    if A.min() < 0 or A.max() > 5 or D.min() < 0 or D.max() > 8:
        raise DataError(f"{path}: labels of split {split} are out of range (attributes 0..5, actions 0..8)")
    return torch.from_numpy(A.astype(np.int64)), torch.from_numpy(D.astype(np.int64))


def load_sprites(path):
    """{'train': (X, A, D), 'test': (X, A, D)} with X a uint8 tensor (N, 8, 64, 64, 3).

    Reads our data.pkl and the paper repo's (float images in [0, 1]; its stored augmentations are ignored,
    ours are made on the fly).
    """
    data = safe_load_pickle(path)
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, expected a dict with X_train, A_train, D_train, ...")
    out = {}
    for split in ("train", "test"):
        missing = [k for k in (f"X_{split}", f"A_{split}", f"D_{split}") if k not in data]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)}: rebuild it with `python make_sprites.py`")
        X = data[f"X_{split}"]
        if not isinstance(X, np.ndarray) or X.ndim != 5 or X.shape[1:] != (8, 64, 64, 3):
            raise DataError(f"{path}: X_{split} has shape {getattr(X, 'shape', None)}, expected (N, 8, 64, 64, 3)")
        if X.dtype != np.uint8:  # the paper repo's floats in [0, 1]; the source art is 8-bit, so this is lossless
            X = np.rint(np.clip(X, 0, 1) * 255).astype(np.uint8)
        A, D = _labels(data[f"A_{split}"], data[f"D_{split}"], len(X), path, split)
        out[split] = (torch.from_numpy(X), A, D)
    return out


def validation_split(X, A, D, n_characters, seed=0):
    """Hold out every sequence of `n_characters` train characters (all their motions) for model selection."""
    if n_characters <= 0:
        return (X, A, D), None
    character = A[:, 0] * 216 + A[:, 1] * 36 + A[:, 2] * 6 + A[:, 3]
    ids = torch.unique(character)
    if n_characters >= len(ids):
        raise ValueError(f"cannot hold out {n_characters} of only {len(ids)} train characters")
    g = torch.Generator().manual_seed(seed)
    held = ids[torch.randperm(len(ids), generator=g)[:n_characters]]
    val = torch.isin(character, held)
    return (X[~val], A[~val], D[~val]), (X[val], A[val], D[val])


def to_float(x_uint8):
    """(B, 8, 64, 64, 3) uint8 -> (B, 8, 3, 64, 64) float in [0, 1]."""
    return torch.empty(x_uint8.shape[:2] + (3, 64, 64)).copy_(x_uint8.permute(0, 1, 4, 2, 3)).mul_(1 / 255)


def content_order(B, T, generator=None):
    """(B, T): a random frame order of its own for each sequence."""
    return torch.argsort(torch.rand(B, T, generator=generator), dim=1)


def content_augment(x, generator=None, order=None):
    """Each sequence's frames in a random order of its own: keeps the character, destroys the motion."""
    order = content_order(*x.shape[:2], generator) if order is None else order
    return x[torch.arange(x.shape[0])[:, None], order]


_GREY = torch.tensor([0.299, 0.587, 0.114])


def _colour_maps(channel_mean, generator, strength=0.8, hue=0.2, p_jitter=0.8, p_grey=0.2):
    """Per-sequence affine colour maps x -> M x + v for sequences of channel means `channel_mean` (B, 3).

    Brightness, contrast, saturation (factors in 1 +- strength) and hue (rotation by up to +-hue turns
    in YIQ space) in a random order per sequence, with probability p_jitter; then greyscale with
    probability p_grey. Each step is affine in RGB (contrast blends towards the mean grey of its input,
    which an affine map carries exactly), so the whole change is one M (B, 3, 3) and v (B, 3).
    """
    B = channel_mean.shape[0]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(B, generator=generator)

    eye = torch.eye(3).expand(B, 3, 3)
    grey = _GREY.expand(3, 3)  # every output channel gets the luma
    bright, contrast, sat = (uniform(1 - strength, 1 + strength)[:, None, None] for _ in range(3))
    theta = uniform(-hue, hue) * 2 * math.pi
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = torch.zeros(B, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = theta.cos(), -theta.sin(), theta.sin(), theta.cos()
    hue_map = torch.linalg.inv(yiq) @ rot @ yiq
    jitter = (torch.rand(B, generator=generator) < p_jitter)[:, None, None]
    order = torch.argsort(torch.rand(B, 4, generator=generator), dim=1)
    M, v = eye.clone(), torch.zeros(B, 3)
    for k in range(4):
        step = order[:, k][:, None, None]
        mean_grey = ((M @ channel_mean[..., None])[..., 0] + v) @ _GREY  # mean grey level of this step's input
        S = torch.where(step == 0, bright * eye, torch.where(step == 1, contrast * eye, torch.where(
            step == 2, sat * eye + (1 - sat) * grey, hue_map)))
        S = torch.where(jitter, S, eye)
        shift = torch.where((step[:, 0, 0] == 1) & jitter[:, 0, 0], (1 - contrast[:, 0, 0]) * mean_grey, 0.0)
        M, v = S @ M, (S @ v[..., None])[..., 0] + shift[:, None]
    greyscale = (torch.rand(B, generator=generator) < p_grey)[:, None, None]
    G = torch.where(greyscale, grey, eye)
    return G @ M, (G @ v[..., None])[..., 0]


def _shift(x, dim, step):
    """x shifted by one pixel along `dim` (step +1: x[i+1], -1: x[i-1]) with reflect padding."""
    n = x.shape[dim]
    idx = list(range(1, n)) + [n - 2] if step > 0 else [1] + list(range(n - 1))
    return x.index_select(dim, torch.tensor(idx))


def motion_augment(x, generator=None):
    """One random appearance change per sequence, applied alike to all its frames: colour jitter
    (brightness, contrast, saturation +-0.8, hue +-0.2; p 0.8), greyscale (p 0.2), 3x3 Gaussian blur
    (sigma in [0.1, 2]; p 0.5). Keeps the motion, changes the look."""
    B = x.shape[0]
    M, v = _colour_maps(x.mean(dim=(1, 3, 4)), generator)
    out = torch.bmm(M, x.transpose(1, 2).reshape(B, 3, -1)).view(B, 3, *x.shape[1:2], *x.shape[3:])
    out = out.transpose(1, 2).add_(v[:, None, :, None, None])
    # separable 3x3 Gaussian with reflect padding, on the sequences drawn for it
    sigma = 0.1 + 1.9 * torch.rand(B, generator=generator)
    blur = torch.rand(B, generator=generator) < 0.5
    if blur.any():
        side = torch.exp(-1 / (2 * sigma[blur] ** 2))
        w_side = (side / (1 + 2 * side))[:, None, None, None, None]
        y = out[blur]
        for dim in (-1, -2):
            y = (_shift(y, dim, 1) + _shift(y, dim, -1)).mul_(w_side).add_(y * (1 - 2 * w_side))
        out[blur] = y
    return out.clamp_(0, 1)


class SpriteBatches:
    """Batches of one split, in memory: `for batch in SpriteBatches(X, A, D, 128, shuffle=True, seed=1)`.

    The order and the augmentations depend only on (seed, epoch), so a resumed run sees the same batches.
    With `rank`/`world_size`, each process gets its own strided share of every epoch (DistributedSampler-like).
    """

    def __init__(self, X, A, D, batch_size, shuffle=False, augment=False, seed=0, drop_last=False,
                 rank=0, world_size=1):
        self.X, self.A, self.D = X, A, D
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _indices(self):
        n = len(self.X)
        if self.shuffle:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            idx = torch.arange(n)
        if self.world_size > 1:  # pad to a multiple of world_size, as DistributedSampler does
            idx = torch.cat([idx, idx[: (-n) % self.world_size]])[self.rank::self.world_size]
        return idx

    def __len__(self):
        n = math.ceil(len(self.X) / self.world_size)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        idx = self._indices()
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch * 7919 + self.rank + 1)
        for b in range(len(self)):
            i = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x_uint8 = self.X.index_select(0, i)
            x = to_float(x_uint8)
            batch = {"x": x, "A": self.A[i], "D": self.D[i], "index": i}
            if self.augment:
                # the order travels with the view: a model can shuffle x's frame features instead of re-encoding
                batch["c_aug_order"] = content_order(*x.shape[:2], g)
                batch["c_aug"] = to_float(content_augment(x_uint8, order=batch["c_aug_order"]))
                batch["m_aug"] = motion_augment(x, g)
            yield batch
