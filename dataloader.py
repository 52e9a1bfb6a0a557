"""Sprites: its factors and label maps, a safe loader of uint8 videos, and the batches.

A batch holds float videos in [0, 1] (B, 8, 3, 64, 64): `x`, its content view `c_aug` (frames
shuffled: same character, no motion; their order `c_aug_order`) and its motion view `m_aug` (one
colour / blur change per video: same motion, new look); and labels `A` (B, 4), `D` (B,).
"""
import importlib
import math
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

from utils import RefusedInput, os_error_line

# ---- the factors of a Sprites video -------------------------------------------------------------
ATTRIBUTES = ("skin", "pant", "top", "hair")  # the columns of A, 6 values each
ACTIONS = ("walk", "spellcard", "slash")
DIRECTIONS = ("front", "left", "right")
MOTION_NAMES = tuple(f"{a}-{d}" for a in ACTIONS for d in DIRECTIONS)  # D = 3 * action + direction
FACTORS = {"action": len(MOTION_NAMES), **{a: 6 for a in ATTRIBUTES}}  # classes of each factor


def character_id(A):
    """The id 0..1295 of the character of attributes A (..., 4): skin, pant, top, hair in base 6."""
    return A[..., 0] * 216 + A[..., 1] * 36 + A[..., 2] * 6 + A[..., 3]


def character_attributes(c):
    """(skin, pant, top, hair) of character id c."""
    return c // 216, c // 36 % 6, c // 6 % 6, c % 6


def factor_labels(A, D):
    """The label of each factor: action is D; skin, pant, top, hair are the columns of A."""
    return {"action": D, **{a: A[:, i] for i, a in enumerate(ATTRIBUTES)}}


# Globals a data.pkl of numpy arrays may name; anything else is refused before it can run.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class DataError(RefusedInput):
    """A data file that is missing, unsafe, truncated or of the wrong shape."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that finds only the globals of _ALLOWED."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise DataError(f"refusing to load {module}.{name}: a Sprites data file holds only "
                            f"numpy arrays")
        if module.startswith("numpy.core."):  # numpy 1.x's name of what numpy 2 calls numpy._core
            module = "numpy._core." + module[len("numpy.core."):]
        return getattr(importlib.import_module(module), name)


def safe_load_pickle(path, builder="make_sprites.py", what="Sprites"):
    """Unpickle a file that may hold only numpy arrays, dtypes, scalars and plain containers;
    `builder` is the script that makes such a file, `what` the data set, for the messages."""
    if os.path.isdir(path):
        file = os.path.join(path, "data.pkl")
        raise DataError(f"{path} is a folder; --data_root takes the data file itself, e.g. "
                        f"{file} (build it with `python {builder} --out {file}`)")
    if not os.path.exists(path):
        raise DataError(f"no data file at {path}: build it with "
                        f"`python {builder} --out {path}`")
    if not os.path.isfile(path):  # reading a fifo or a device would block or never end
        raise DataError(f"{path} is not a regular file (a fifo, socket or device); --data_root "
                        f"takes the data file of {builder}")
    try:
        with open(path, "rb") as f:
            return _NumpyOnlyUnpickler(f).load()
    except DataError:
        raise
    except OSError as e:  # EIO, EACCES: the file is there but cannot be read
        raise DataError(os_error_line(e, f"data file {path}", "read")) from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            IndexError) as e:  # what a truncated or foreign pickle raises
        raise DataError(f"{path} is not a readable {what} pickle ({type(e).__name__}: {e}); "
                        f"rebuild it with `python {builder} --out {path}`") from None


def first_index(bad):
    """'i, j, ...': the index of the first True of a boolean array, for an error message."""
    return ", ".join(str(int(i)) for i in np.unravel_index(np.argmax(bad), bad.shape))


def rebuild_hint(path, builder="make_sprites.py"):
    return f"rebuild the file with `python {builder} --out {path}`"


def _one_hot_indices(L, key, path):
    """The class indices of the paper repo's one-hot labels L (..., classes): 0s and one 1 a row."""
    bad = ((L != 0) & (L != 1)).any(-1) | (L.sum(-1) != 1)
    if bad.any():
        raise DataError(f"{path}: {key}[{first_index(bad)}] is not one-hot (0s and a single 1); "
                        f"{rebuild_hint(path)}")
    return L.argmax(-1)


def _label_indices(L, key, path, classes, row_dims):
    """Integer labels, from ours or the paper repo's one-hot ones (per video or per frame)."""
    L = np.asarray(L)
    one_hot = L.ndim - 1 - row_dims  # 1: one-hot; 2: one-hot per frame
    if L.dtype.kind not in ("iuf" if one_hot in (1, 2) else "iu"):
        raise DataError(f"{path}: {key} holds {L.dtype} labels; labels are integers (attributes "
                        f"0..5, actions 0..8): store them so, e.g. {key}.astype(np.int64)")
    if one_hot in (1, 2):
        if L.shape[-1] != classes:
            raise DataError(f"{path}: {key} has shape {L.shape}; its one-hot rows need {classes} "
                            f"classes; {rebuild_hint(path)}")
        L = _one_hot_indices(L, key, path)
        if one_hot == 2:
            differs = (L != L[:, :1]).reshape(len(L), -1).any(1)
            if differs.any():
                raise DataError(f"{path}: the frames of video {first_index(differs)} of {key} have "
                                f"different labels; {rebuild_hint(path)}")
            L = L[:, 0]
    return L


def _labels(A, D, n, path, split):
    """Attribute (n, 4) and action (n,) labels, checked, from ours or the paper repo's one-hot."""
    A = _label_indices(A, f"A_{split}", path, FACTORS["skin"], 1)
    D = _label_indices(D, f"D_{split}", path, FACTORS["action"], 0)
    if A.shape != (n, 4) or D.shape != (n,):
        raise DataError(f"{path}: labels of split {split} have shapes {A.shape} and {D.shape}, "
                        f"expected ({n}, 4) and ({n},)")
    for key, L, classes in ((f"A_{split}", A, FACTORS["skin"]),
                            (f"D_{split}", D, FACTORS["action"])):
        bad = (L < 0) | (L >= classes)
        if bad.any():
            raise DataError(f"{path}: {key}[{first_index(bad)}] is {L[bad][0]}, out of range "
                            f"(attributes 0..5, actions 0..8); {rebuild_hint(path)}")
    return torch.from_numpy(A.astype(np.int64)), torch.from_numpy(D.astype(np.int64))


# Float images are checked and converted this many videos at a time: a float32 X_train is 3.5 GB,
# and a temporary of its whole size would double that.
_CHECK_VIDEOS = 256


def checked_images(X, path, split, builder="make_sprites.py"):
    """X as uint8, refused unless uint8 or floats in [0, 1] (never rescaled), and not all 0 / 1."""
    key = f"X_{split}"
    if len(X) == 0:
        raise DataError(f"{path}: {key} holds no videos; {rebuild_hint(path, builder)}")
    if X.dtype.kind == "f":  # the paper repo's floats in [0, 1]; 8-bit source art: this is lossless
        out = np.empty(X.shape, np.uint8)
        for s in range(0, len(X), _CHECK_VIDEOS):
            chunk = X[s:s + _CHECK_VIDEOS]
            bad = ~((chunk >= 0) & (chunk <= 1))  # NaN compares false, so it is caught too
            if bad.any():
                i = np.unravel_index(np.argmax(bad), bad.shape)
                raise DataError(f"{path}: {key}[{s + i[0]}, {', '.join(map(str, i[1:]))}] is "
                                f"{chunk[i]}; float images must be finite and in [0, 1] (they "
                                f"are not rescaled): divide 0..255 values by 255, or store uint8")
            out[s:s + _CHECK_VIDEOS] = np.rint(chunk * 255).astype(np.uint8)
        X = out
    elif X.dtype != np.uint8:
        raise DataError(f"{path}: {key} holds {X.dtype} images; we read uint8 (0..255) or floats "
                        f"in [0, 1]; {rebuild_hint(path, builder)}")
    if X.max() <= 1:  # floats in [0, 1] cast to uint8 without * 255, or divided by 255 twice
        raise DataError(f"{path}: every pixel of {key} is 0 or 1 out of 255, a conversion gone "
                        f"wrong; store uint8 0..255 or floats in [0, 1]")
    return X


def load_sprites(path):
    """{'train': (X, A, D), 'test': (X, A, D)}, X uint8 (N, 8, 64, 64, 3); ours or the paper's."""
    data = safe_load_pickle(path)
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, expected a dict with X_train, "
                        f"A_train, D_train, ...")
    out = {}
    for split in ("train", "test"):
        missing = [k for k in (f"X_{split}", f"A_{split}", f"D_{split}") if k not in data]
        if missing:
            raise DataError(f"{path} lacks {', '.join(missing)}: rebuild it with "
                            f"`python make_sprites.py`")
        X = data[f"X_{split}"]
        if not isinstance(X, np.ndarray) or X.ndim != 5 or X.shape[1:] != (8, 64, 64, 3):
            raise DataError(f"{path}: X_{split} has shape {getattr(X, 'shape', None)}, "
                            f"expected (N, 8, 64, 64, 3)")
        X = checked_images(X, path, split)
        A, D = _labels(data[f"A_{split}"], data[f"D_{split}"], len(X), path, split)
        out[split] = (torch.from_numpy(X), A, D)
    return out


def validation_split(X, A, D, n_characters, seed=0, groups=character_id):
    """Hold out every video of `n_characters` train characters (a seeded choice); `groups` maps A
    to each video's unit (Sprites' character; a Moving MNIST video is its own)."""
    if n_characters <= 0:
        return (X, A, D), None
    val = held_out_rows(A, n_characters, seed, groups)
    return (X[~val], A[~val], D[~val]), (X[val], A[val], D[val])


def held_out_rows(A, n_characters, seed=0, groups=character_id):
    """The bool mask (N,) of the sequences validation_split holds out."""
    character = groups(A)
    ids = torch.unique(character)
    if n_characters >= len(ids):
        raise ValueError(f"cannot hold out {n_characters} of only {len(ids)} train characters")
    g = torch.Generator().manual_seed(seed)
    held = ids[torch.randperm(len(ids), generator=g)[:n_characters]]
    return torch.isin(character, held)


# Batches are made `chunk` sequences at a time: on the CPU a few, so that every intermediate stays
# in cache and the big outputs are written once (4 sequences of float frames are 1.5 MB); on an
# accelerator the whole batch at once, a few large kernels.
_CHUNK = 4


def _chunk_size(device, B):
    """Sequences made at a time on the device, for a batch of B."""
    return _CHUNK if device.type == "cpu" else max(B, 1)


def _empty(shape, device=None):
    """A fresh float tensor; on the CPU numpy's, in huge pages (~40x fewer page faults)."""
    if device is not None and device.type != "cpu":
        return torch.empty(tuple(shape), device=device)
    return torch.from_numpy(np.empty(tuple(shape), np.float32))


def _to_float_into(out, x_uint8, scratch=None):
    """out (n, T, C, H, W) <- x_uint8 (n, T, H, W, C) / 255, the bytes de-interleaved first."""
    if scratch is None:
        scratch = torch.empty(out.shape, dtype=torch.uint8, device=out.device)
    scratch = scratch[:len(out)].copy_(x_uint8.permute(0, 1, 4, 2, 3))
    out.copy_(scratch).mul_(1 / 255)


def to_float(x_uint8):
    """(B, T, 64, 64, C) uint8 -> (B, T, C, 64, 64) float in [0, 1], on x_uint8's device."""
    B, T, H, W, C = x_uint8.shape
    device = x_uint8.device
    n = _chunk_size(device, B)
    out = _empty((B, T, C, H, W), device)
    scratch = torch.empty((min(B, n), T, C, H, W), dtype=torch.uint8, device=device)
    for s in range(0, B, n):
        _to_float_into(out[s:s + n], x_uint8[s:s + n], scratch)
    return out


def content_order(B, T, generator=None):
    """(B, T): a random frame order of its own for each sequence."""
    return torch.argsort(torch.rand(B, T, generator=generator), dim=1)


def content_augment(x, generator=None, order=None):
    """Each sequence's frames in a random order of its own: keeps the character, not the motion."""
    order = content_order(*x.shape[:2], generator) if order is None else order
    return x[torch.arange(x.shape[0], device=x.device)[:, None], order.to(x.device)]


_GREY = torch.tensor([0.299, 0.587, 0.114])


def _colour_maps_linear(B, generator, strength=0.8, hue=0.2, p_jitter=0.8, p_grey=0.2):
    """Per-sequence colour maps x -> M x + P m + q, m the sequence's channel means: brightness,
    contrast, saturation (x 1 +- strength) and hue (+- hue turns in YIQ) in a random order with
    probability p_jitter, then greyscale with p_grey. Each step is affine in RGB (contrast blends
    to its input's mean grey, linear in m), so the whole change is one affine map."""
    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(B, generator=generator)

    eye = torch.eye(3).expand(B, 3, 3)
    grey = _GREY.expand(3, 3)  # every output channel gets the luma
    bright, contrast, sat = (uniform(1 - strength, 1 + strength)[:, None, None] for _ in range(3))
    theta = uniform(-hue, hue) * 2 * math.pi
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    rot = torch.zeros(B, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = theta.cos(), -theta.sin()
    rot[:, 2, 1], rot[:, 2, 2] = theta.sin(), theta.cos()
    hue_map = torch.linalg.inv(yiq) @ rot @ yiq
    jitter = (torch.rand(B, generator=generator) < p_jitter)[:, None, None]
    order = torch.argsort(torch.rand(B, 4, generator=generator), dim=1)
    M, P, q = eye.clone(), torch.zeros(B, 3, 3), torch.zeros(B, 3)
    for k in range(4):
        step = order[:, k][:, None, None]
        # mean grey level of this step's input M m + P m + q: r . m + s
        r, s = _GREY @ (M + P), q @ _GREY
        S = torch.where(step == 0, bright * eye, torch.where(step == 1, contrast * eye, torch.where(
            step == 2, sat * eye + (1 - sat) * grey, hue_map)))
        S = torch.where(jitter, S, eye)
        alpha = torch.where((step[:, 0, 0] == 1) & jitter[:, 0, 0], 1 - contrast[:, 0, 0], 0.0)
        M, P, q = (S @ M, S @ P + alpha[:, None, None] * r[:, None, :],
                   (S @ q[..., None])[..., 0] + (alpha * s)[:, None])
    greyscale = (torch.rand(B, generator=generator) < p_grey)[:, None, None]
    G = torch.where(greyscale, grey, eye)
    return G @ M, G @ P, (G @ q[..., None])[..., 0]


def _motion_params(B, generator):
    """The draws of B motion views: colour maps M, P, q and the blur's side weight c (0: none); the
    Gaussian's divisor (1 + 2c)^2 is folded into the (linear) colour map."""
    M, P, q = _colour_maps_linear(B, generator)
    sigma = 0.1 + 1.9 * torch.rand(B, generator=generator)
    blur = torch.rand(B, generator=generator) < 0.5
    c = torch.where(blur, torch.exp(-1 / (2 * sigma ** 2)), 0.0)
    scale = (1 + 2 * c) ** -2
    return M * scale[:, None, None], P * scale[:, None, None], q * scale[:, None], c


def _blur_unnormalised_(y, c, h):
    """y <- y filtered by [c, 1, c] x [c, 1, c], c (n,) per sequence, reflect padding, h: scratch;
    with c = exp(-1 / (2 sigma^2)) and divided by (1 + 2c)^2, the 3x3 Gaussian of sigma."""
    c = c.view((-1,) + (1,) * (y.dim() - 1))
    src, dst = y, h
    for dim in (-1, -2):
        n = y.shape[dim]
        torch.addcmul(src.narrow(dim, 1, n - 2), src.narrow(dim, 0, n - 2), c,
                      out=dst.narrow(dim, 1, n - 2)).addcmul_(src.narrow(dim, 2, n - 2), c)
        # reflect padding: both neighbours of an edge pixel are the pixel next to it
        for edge, inner in ((0, 1), (n - 1, n - 2)):
            torch.addcmul(src.narrow(dim, edge, 1), src.narrow(dim, inner, 1), 2 * c,
                          out=dst.narrow(dim, edge, 1))
        src, dst = dst, src


def _motion_into(x, out, M, P, q, c, h):
    """out = clamp(blur_c(M x + P mean(x) + q), 0, 1) for sequences x, on x's device; h: scratch."""
    n, T = x.shape[:2]
    v = torch.baddbmm(q[..., None], P, x.mean(dim=(1, 3, 4))[..., None])
    torch.baddbmm(v.repeat_interleave(T, 0), M.repeat_interleave(T, 0), x.view(n * T, 3, -1),
                  out=out.view(n * T, 3, -1))
    _blur_unnormalised_(out, c, h[:n])
    out.clamp_(0, 1)


def motion_augment(x, generator=None):
    """One look change per sequence, alike in its frames: colour jitter (brightness, contrast,
    saturation +-0.8, hue +-0.2; p 0.8), greyscale (p 0.2), 3x3 blur (sigma 0.1..2; p 0.5)."""
    x = x.contiguous()
    B, device = x.shape[0], x.device
    M, P, q, c = (t.to(device) for t in _motion_params(B, generator))
    n = _chunk_size(device, B)
    out, h = _empty(x.shape, device), torch.empty((min(n, B),) + x.shape[1:], device=device)
    for s in range(0, B, n):
        e = s + n
        _motion_into(x[s:e], out[s:e], M[s:e], P[s:e], q[s:e], c[s:e], h)
    return out


def _augmentation_draws(B, T, generator, motion_view=None):
    """Every random draw of a batch's views: the content order, then the motion view's draws
    (motion_view.draws; None: Sprites' colour and blur change, _motion_params)."""
    order = content_order(B, T, generator)
    return order, (_motion_params(B, generator) if motion_view is None
                   else motion_view.draws(B, generator))


def _device_draws(B, T, generator, device):
    """A batch's draws (frame order; M, P, q, c), sent to the device in one copy."""
    order, (M, P, q, c) = _augmentation_draws(B, T, generator)
    draws = torch.cat([order.float(), M.reshape(B, 9), P.reshape(B, 9), q, c[:, None]], 1)
    if device.type == "cuda":
        draws = draws.pin_memory()
    order, M, P, q, c = draws.to(device, non_blocking=True).split([T, 9, 9, 3, 1], 1)
    return order.long(), M.reshape(B, 3, 3), P.reshape(B, 3, 3), q, c[:, 0]


def _make_batch(X, i, generator=None, content_view=True, chunk=None, motion_view=None, D=None):
    """x = to_float(X[i]) and, with a generator, its views as content_augment and motion_augment
    (or motion_view.apply, given the batch's labels D) make them, on X's device, `chunk` sequences
    at a time, nothing read back to the host; content_view=False leaves out c_aug (a model
    shuffles x's features in that order instead)."""
    device, B, T, H, W, C = X.device, len(i), *X.shape[1:]
    n = chunk or _chunk_size(device, B)
    x = _empty((B, T, C, H, W), device)
    u8 = torch.empty((min(n, B),) + tuple(X.shape[1:]), dtype=torch.uint8, device=device)
    u8t = torch.empty((min(n, B), T, C, H, W), dtype=torch.uint8, device=device)
    batch = {"x": x}
    if generator is not None:
        if motion_view is None:
            order, M, P, q, c = _device_draws(B, T, generator, device)
            batch.update(c_aug_order=order, m_aug=_empty(x.shape, device))
            h = torch.empty(u8t.shape, device=device)
        else:
            order, view_draws = _augmentation_draws(B, T, generator, motion_view)
            batch["c_aug_order"] = order = order.to(device)
        if content_view:
            batch["c_aug"] = _empty(x.shape, device)
            frames = (order + T * torch.arange(B, device=device)[:, None]).view(-1)
            x_frames, c_frames = x.view(B * T, -1), batch["c_aug"].view(B * T, -1)
    for s in range(0, B, n):
        e = min(s + n, B)
        _to_float_into(x[s:e], torch.index_select(X, 0, i[s:e], out=u8[:e - s]), u8t)
        if generator is None:
            continue
        if content_view:
            torch.index_select(x_frames, 0, frames[s * T:e * T], out=c_frames[s * T:e * T])
        if motion_view is None:
            _motion_into(x[s:e], batch["m_aug"][s:e], M[s:e], P[s:e], q[s:e], c[s:e], h)
    if generator is not None and motion_view is not None:
        batch["m_aug"] = motion_view.apply(x, view_draws, D)
    return batch


def _store_on(X, device, on_host=False):
    """X on the device if it fits in half its free memory and on_host is not asked, else X in
    host memory."""
    if device.type == "cpu" or on_host:
        return X
    if device.type == "cuda" and X.nbytes > torch.cuda.mem_get_info(device)[0] // 2:
        return X
    try:
        return X.to(device)
    except torch.OutOfMemoryError:
        return X


class SpriteBatches:
    """Batches of one split: `for batch in SpriteBatches(X, A, D, 128, shuffle=True)`.

    Order and views depend only on (seed, epoch), so a resumed run sees the same batches, and
    set_epoch(epoch, start) skips making the first `start`. With rank / world_size each process gets
    a strided share (as DistributedSampler). The views are made on `device`, from the uint8 split
    moved there once where it fits (and on_host is not asked), else from pinned host rows; A, D
    and index stay on the CPU. The motion view is Sprites' colour change, or motion_view's (an
    object with draws(B, generator) and apply(x, draws, D), as smmnist.DigitSwap)."""

    def __init__(self, X, A, D, batch_size, shuffle=False, augment=False, seed=0, drop_last=False,
                 rank=0, world_size=1, content_view=True, device=None, on_host=False,
                 motion_view=None):
        self.X, self.A, self.D, self.content_view = X, A, D, content_view
        self.motion_view = motion_view
        self.batch_size, self.shuffle, self.augment, self.seed = batch_size, shuffle, augment, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch, self.start = 0, 0
        self.device = torch.device(device if device is not None else "cpu")
        self.store, self.chunk = _store_on(X, self.device, on_host), None

    @property
    def videos(self):
        return len(self.X)  # the sequences an epoch makes its batches of

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def _indices(self):
        n = len(self.X)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        # padded to a multiple of world_size (as DistributedSampler does): every rank, as many steps
        if self.world_size > 1:
            idx = torch.cat([idx, idx[: (-n) % self.world_size]])[self.rank::self.world_size]
        return idx

    def __len__(self):
        n = math.ceil(len(self.X) / self.world_size)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _make(self, i, generator, D=None):
        """The batch of the sequences store[i] (i on the store's device) on self.device."""
        if self.store.device.type == self.device.type:
            return _make_batch(self.store, i, generator, self.content_view, self.chunk,
                               self.motion_view, D)
        rows = torch.empty((len(i),) + tuple(self.store.shape[1:]), dtype=torch.uint8,
                           pin_memory=self.device.type == "cuda")
        rows = torch.index_select(self.store, 0, i, out=rows).to(self.device, non_blocking=True)
        every = torch.arange(len(i), device=self.device)
        return _make_batch(rows, every, generator, self.content_view, self.chunk,
                           self.motion_view, D)

    def __iter__(self):
        idx = self._indices()
        idx_store = idx.to(self.store.device)  # one copy an epoch
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch * 7919 + self.rank + 1)
        for b in range(len(self)):
            span = slice(b * self.batch_size, (b + 1) * self.batch_size)
            i = idx[span]
            # skipped: only its random draws are made, so the batches after it get theirs
            if b < self.start:
                if self.augment:
                    _augmentation_draws(len(i), self.X.shape[1], g, self.motion_view)
                continue
            batch = self._make(idx_store[span], g if self.augment else None, self.D[i])
            batch.update({"A": self.A[i], "D": self.D[i], "index": i})
            yield batch


def _blur_kernels(sigma):
    """(radius, (B, 2 radius + 1) Gaussian kernels summing to 1) for sigmas (B,) px, 0: none."""
    radius = max(1, math.ceil(3 * sigma.max().item()))
    offsets = torch.arange(-radius, radius + 1, dtype=sigma.dtype, device=sigma.device)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma[:, None].clamp_min(1e-6) ** 2))
    return radius, kernel / kernel.sum(1, keepdim=True)  # sigma 0 gives a unit impulse


def _blur_with(x, kernel, radius):
    """Each video of x (B, T, 3, H, W) filtered by its own separable kernel (B, 2 radius + 1)."""
    B, T, C, H, W = x.shape
    # one grouped convolution blurs every video with its own kernel: its channels are a group
    y = x.transpose(0, 1).reshape(T, B * C, H, W)
    k = kernel.repeat_interleave(C, 0)[:, None]  # (B * C, 1, K)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, :, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, :, :, None], groups=B * C)
    return y.reshape(T, B, C, H, W).transpose(0, 1)


def gaussian_blur(x, sigma):
    """Each video of x (B, T, 3, H, W) blurred by a Gaussian of its own sigma (B,) px (0: none)."""
    radius, kernel = _blur_kernels(torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
                                   .expand(x.shape[0]))
    return _blur_with(x, kernel, radius)


def judge_corrupt(x, generator=None, p_blur=0.5, max_sigma=2.0, p_noise=0.5, max_noise=0.1,
                  noise_generator=None):
    """A judge's training videos, so that it reads the factors, not the sharpness: blur (p_blur,
    sigma up to max_sigma px), then pixel noise (p_noise, std up to max_noise), clamped. The
    per-video draws come from `generator` (a CPU one), then the noise: from it too on the CPU, else
    (off the CPU, or given a noise_generator) on x's device from noise_generator, the kernels
    going there in one copy and nothing read back."""
    B = x.shape[0]
    sigma = (torch.rand(B, generator=generator) * max_sigma
             * (torch.rand(B, generator=generator) < p_blur))
    std = (torch.rand(B, generator=generator) * max_noise
           * (torch.rand(B, generator=generator) < p_noise))
    if x.device.type == "cpu" and noise_generator is None:
        noise = torch.randn(x.shape, generator=generator) * std[:, None, None, None, None]
        return (gaussian_blur(x, sigma) + noise).clamp_(0, 1)
    radius, kernel = _blur_kernels(sigma)  # on the CPU: the radius is known without a read
    draws = torch.cat([kernel.flatten(), std])
    if x.is_cuda:
        draws = draws.pin_memory()
    kernel, std = draws.to(x.device, non_blocking=True).split([kernel.numel(), B])
    noise = torch.randn(x.shape, generator=noise_generator, device=x.device)
    return (_blur_with(x, kernel.view(B, -1), radius) + noise * std[:, None, None, None, None]
            ).clamp_(0, 1)
