"""Stochastic Moving MNIST (Denton & Fergus, 2018): the frame geometry, a digit's position read
from pixels (which scores motion without a judge), the checked loading of make_smmnist.py's file,
and the motion views of C-DSVAE on it.

A digit's position, (row, col) in pixels with pixel i's centre at i, is the point of its 32x32 box
where MNIST puts every digit's centre of mass (pixel 14, 14 of the 28x28 field, scaled): it does not
depend on the digit's shape, so a video whose digit was swapped for another keeps it, and the centre
of mass of a one-digit frame reads it up to that digit's own shape.
"""
import numpy as np
import torch
import torch.nn.functional as F

from dataloader import (DataError, SpriteBatches, checked_images, first_index, gaussian_blur,
                        rebuild_hint, safe_load_pickle)

SIZE = 64  # frames are SIZE x SIZE, one channel
DIGIT = 32  # an MNIST digit (28 x 28) is scaled to DIGIT x DIGIT
# the position of a digit whose box has its top-left corner at 0, 0: MNIST's (14, 14), scaled
MASS_CENTRE = (14 + 0.5) * DIGIT / 28 - 0.5


def centre_of_mass(frames):
    """(..., 2) float64: the (row, col) centre of mass of frames (..., H, W) of non-negative mass,
    the position of the digit of a one-digit frame on black up to the digit's own shape; a black
    frame has none, and gets the frame's centre."""
    x = torch.as_tensor(frames).to(torch.float64)
    H, W = x.shape[-2:]
    rows = torch.arange(H, dtype=x.dtype, device=x.device)
    cols = torch.arange(W, dtype=x.dtype, device=x.device)
    mass = x.sum((-2, -1))
    centre = torch.stack([(x.sum(-1) * rows).sum(-1), (x.sum(-2) * cols).sum(-1)], -1)
    middle = torch.tensor([(H - 1) / 2, (W - 1) / 2], dtype=x.dtype, device=x.device)
    return torch.where(mass[..., None] > 0, centre / mass.clamp_min(1e-12)[..., None], middle)


# ---- the generator (SVG's data/moving_mnist.py) -------------------------------------------------
MAX_SPEED = 4  # px a frame on each axis


def trajectory(rng, frames):
    """Top-left corners (frames, 2) of a digit's box and the velocities (frames, 2) that move it
    on after each frame, (row, col), by SVG's stochastic rule and in its order of draws."""
    limit = SIZE - DIGIT  # corners 0..limit-1 keep the box inside, as in SVG
    sx, sy = rng.randint(limit), rng.randint(limit)
    dx, dy = rng.randint(-MAX_SPEED, MAX_SPEED + 1), rng.randint(-MAX_SPEED, MAX_SPEED + 1)
    corners, velocities = np.empty((frames, 2), np.int64), np.empty((frames, 2), np.int64)
    for t in range(frames):
        if sy < 0:
            sy, dy, dx = 0, rng.randint(1, MAX_SPEED + 1), rng.randint(-MAX_SPEED, MAX_SPEED + 1)
        elif sy >= limit:
            sy, dy, dx = limit - 1, rng.randint(-MAX_SPEED, 0), rng.randint(-MAX_SPEED,
                                                                             MAX_SPEED + 1)
        if sx < 0:
            sx, dx, dy = 0, rng.randint(1, MAX_SPEED + 1), rng.randint(-MAX_SPEED, MAX_SPEED + 1)
        elif sx >= limit:
            sx, dx, dy = limit - 1, rng.randint(-MAX_SPEED, 0), rng.randint(-MAX_SPEED,
                                                                             MAX_SPEED + 1)
        corners[t], velocities[t] = (sy, sx), (dy, dx)
        sy, sx = sy + dy, sx + dx
    return corners, velocities


def make_videos(rng, digits, n, frames, k, order=None):
    """n videos of k of `digits` (m, 32, 32) uint8 each: X (n, frames, 64, 64, 1) uint8, the
    digits' indices I (n, k) and positions P (n, frames, k, 2) float32 (box centres). The digits
    are drawn at random, or taken in turn from `order` (n * k indices) where it is given."""
    X = np.empty((n, frames, SIZE, SIZE, 1), np.uint8)
    I = np.empty((n, k), np.int64)
    corners = np.empty((n, frames, k, 2), np.int64)
    canvas = np.empty((frames, SIZE, SIZE), np.uint16)  # sums of up to 2 digits exceed 255
    for v in range(n):
        canvas[:] = 0
        for j in range(k):
            # SVG draws the digit, then its motion
            I[v, j] = rng.randint(len(digits)) if order is None else order[v * k + j]
            corners[v, :, j], _ = trajectory(rng, frames)
            for t, (r, c) in enumerate(corners[v, :, j]):
                canvas[t, r:r + DIGIT, c:c + DIGIT] += digits[I[v, j]]
        X[v, ..., 0] = np.minimum(canvas, 255)
    return X, I, (corners + MASS_CENTRE).astype(np.float32)


# ---- the data file -------------------------------------------------------------------------------
BUILDER = "make_smmnist.py"
DIGITS = 10
CHECK_VIDEOS = 64  # videos whose centres of mass are checked against their stored positions
CHECK_PX = 2.0  # the largest distance allowed there: the floor is at most 0.86 px on real data


def _array(data, key, path, dtype_kinds, shape, what):
    """data[key] as a numpy array of one of `dtype_kinds` and `shape` (None: any size there)."""
    value = data.get(key)
    if not isinstance(value, np.ndarray) or value.dtype.kind not in dtype_kinds or \
            value.ndim != len(shape) or any(s is not None and s != v
                                            for s, v in zip(shape, value.shape)):
        found = (f"{value.dtype} {value.shape}" if isinstance(value, np.ndarray)
                 else type(value).__name__)
        raise DataError(f"{path}: {key} is {found}, expected {what}; {rebuild_hint(path, BUILDER)}")
    return value


def _split(data, path, split, frames=None, k=None):
    """(X uint8 (N, T, 64, 64, 1), Y digits (N, K) int64, P positions (N, T, K, 2) float32)."""
    X = _array(data, f"X_{split}", path, "uf", (None, frames, SIZE, SIZE, 1),
               f"videos (N, T, {SIZE}, {SIZE}, 1)")
    X = checked_images(X, path, split, BUILDER)
    n, frames = X.shape[:2]
    Y = _array(data, f"Y_{split}", path, "iu", (n, k), f"digit labels ({n}, K) of 0..9")
    k = Y.shape[1]
    P = _array(data, f"P_{split}", path, "f", (n, frames, k, 2),
               f"positions ({n}, {frames}, {k}, 2) in px")
    bad = (Y < 0) | (Y >= DIGITS)
    if bad.any():
        raise DataError(f"{path}: Y_{split}[{first_index(bad)}] is {Y[bad][0]}, digits are 0..9; "
                        f"{rebuild_hint(path, BUILDER)}")
    low, high = MASS_CENTRE, SIZE - DIGIT - 1 + MASS_CENTRE  # box corners 0..31
    bad = ~((P >= low - 1e-3) & (P <= high + 1e-3))  # NaN compares false, so it is caught too
    if bad.any():
        raise DataError(f"{path}: P_{split}[{first_index(bad)}] is {P[bad][0]}, outside the "
                        f"{low:.3f}..{high:.3f} px a digit's position takes; "
                        f"{rebuild_hint(path, BUILDER)}")
    if k == 1:  # the file's own pixels must put each digit where its positions say
        sample = slice(0, CHECK_VIDEOS)
        error = np.linalg.norm(centre_of_mass(X[sample, ..., 0]).numpy() - P[sample, :, 0], axis=-1)
        if error.max() > CHECK_PX:
            i = np.unravel_index(np.argmax(error), error.shape)
            raise DataError(f"{path}: frame {i[1]} of video {i[0]} of X_{split} has its digit "
                            f"{error[i]:.1f} px from P_{split}'s position (the data's own floor "
                            f"is under 1 px): videos and positions do not belong together; "
                            f"{rebuild_hint(path, BUILDER)}")
    return torch.from_numpy(X), torch.from_numpy(Y.astype(np.int64)), torch.from_numpy(
        P.astype(np.float32))


def _train_digits(data, path, X, Y, P):
    """(digits uint8 (m, 32, 32), their labels (m,), each train video's digits' indices I (N, K)),
    checked against the train videos; None for a file made before they were stored."""
    if "digits_train" not in data:
        return None
    digits = _array(data, "digits_train", path, "u", (None, DIGIT, DIGIT),
                    f"the train split's digits (m, {DIGIT}, {DIGIT}) uint8")
    m = len(digits)
    labels = _array(data, "digit_labels_train", path, "iu", (m,), f"their labels ({m},)")
    I = _array(data, "I_train", path, "iu", tuple(Y.shape), f"digit indices {tuple(Y.shape)}")
    bad = (I < 0) | (I >= m)
    if not bad.any():
        bad = labels[I] != Y.numpy()
    if bad.any():
        raise DataError(f"{path}: I_train[{first_index(bad)}] is not the index of that video's "
                        f"digit among the {m} of digits_train; {rebuild_hint(path, BUILDER)}")
    if Y.shape[1] == 1:  # each checked video's first frame shows its digit where P says
        for v in range(min(CHECK_VIDEOS, len(X))):
            r, c = box_corners(P[v, 0, 0]).tolist()
            if not torch.equal(X[v, 0, r:r + DIGIT, c:c + DIGIT, 0],
                               torch.from_numpy(digits[I[v, 0]])):
                raise DataError(f"{path}: train video {v} does not show digits_train[{I[v, 0]}] "
                                f"where P_train puts it: the digits and the videos do not belong "
                                f"together; {rebuild_hint(path, BUILDER)}")
    return torch.from_numpy(digits), torch.from_numpy(labels.astype(np.int64)), \
        torch.from_numpy(I.astype(np.int64))


def load_smmnist(path):
    """{'train': (X, Y, P), 'test': (X, Y, P)} of make_smmnist.py's file, checked: X uint8 (N, T,
    64, 64, 1), Y each video's digits (N, K), P their positions a frame (N, T, K, 2); and
    'train_digits' (_train_digits) where the file stores them."""
    data = safe_load_pickle(path, BUILDER, "Stochastic Moving MNIST")
    if not isinstance(data, dict):
        raise DataError(f"{path} holds a {type(data).__name__}, expected the dict of "
                        f"{BUILDER} (X_train, Y_train, P_train, ...)")
    train = _split(data, path, "train")
    test = _split(data, path, "test", frames=train[0].shape[1], k=train[1].shape[1])
    digits = _train_digits(data, path, *train)
    return {"train": train, "test": test, **({"train_digits": digits} if digits else {})}


def digit_labels(Y, P=None):
    """{'digit': the first digit of each video}: the judges' one head (one digit a video)."""
    return {"digit": Y[:, 0]}


# ---- motion views: the same path, another look ---------------------------------------------------
def box_corners(P):
    """The top-left corners (..., 2) int64 of the digit boxes at positions P (..., 2)."""
    return torch.round(P - MASS_CENTRE).long()


class DigitSwap:
    """The motion view that keeps every digit's path and changes what moves along it: each video's
    digits are replaced by those of another video of the batch (a random one, never itself),
    cut from its first frame, and drawn at this video's positions, overlaps clipped to 1."""
    name = "digit"

    def draws(self, B, generator):
        """The donor of each video, (i + shift) mod B with shift 1..B-1 (B = 1: itself)."""
        shift = torch.randint(1, max(B, 2), (B,), generator=generator)
        return (torch.arange(B) + shift) % max(B, 1)

    def apply(self, x, donor, P):
        """x (B, T, C, 64, 64) with digits at positions P (B, T, K, 2) -> the view."""
        B, T, C = x.shape[:3]
        device = x.device
        corners = box_corners(P).to(device)
        donor = donor.to(device)
        d = torch.arange(DIGIT, device=device)
        b = torch.arange(B, device=device)
        out = torch.zeros_like(x)
        for k in range(corners.shape[2]):
            first = corners[donor, 0, k]  # (B, 2): each donor's box in its first frame
            rows, cols = first[:, 0, None] + d, first[:, 1, None] + d
            digit = x[donor[:, None, None], 0, :, rows[:, :, None], cols[:, None, :]]  # B,32,32,C
            at = corners[:, :, k]  # (B, T, 2): where this video's digit k is each frame
            r = (at[..., 0, None] + d)[:, :, :, None, None]
            c = (at[..., 1, None] + d)[:, :, None, :, None]
            out.index_put_((b[:, None, None, None, None], torch.arange(T, device=device)[
                None, :, None, None, None], torch.arange(C, device=device), r, c),
                digit[:, None].expand(B, T, DIGIT, DIGIT, C), accumulate=True)
        return out.clamp_(0, 1)


class Stroke:
    """The alternative motion view, a look change of the digit itself: each video's strokes made
    thinner or thicker (a 3x3 min or max filter, or none, a third each), its intensity scaled by
    0.4..1, and blurred (sigma 0.1..2 px, p 0.5); the digit stays the same digit."""
    name = "stroke"

    def draws(self, B, generator):
        return torch.stack([torch.randint(-1, 2, (B,), generator=generator).float(),
                            0.4 + 0.6 * torch.rand(B, generator=generator),
                            (0.1 + 1.9 * torch.rand(B, generator=generator))
                            * (torch.rand(B, generator=generator) < 0.5)], 1)

    def apply(self, x, draws, P=None):
        B, T, C, H, W = x.shape
        thick, gain, sigma = draws.to(x.device).unbind(1)
        frames = x.reshape(B * T, C, H, W)
        grown = F.max_pool2d(frames, 3, 1, 1).view_as(x)
        shrunk = -F.max_pool2d(-frames, 3, 1, 1).view_as(x)
        pick = thick.view(B, 1, 1, 1, 1)
        y = torch.where(pick > 0, grown, torch.where(pick < 0, shrunk, x))
        return gaussian_blur(y * gain.view(B, 1, 1, 1, 1), sigma).clamp_(0, 1)


MOTION_VIEWS = {"digit": DigitSwap(), "stroke": Stroke()}


# ---- the judges' training videos -----------------------------------------------------------------
class JudgeVideos:
    """A judge's training batches on Moving MNIST: each epoch one new video of every digit of
    `pool` (indices into `digits`, uint8 (m, 32, 32), labelled `labels`), made by the data set's
    generator in a random order; videos and order depend only on (seed, epoch). The stored train
    videos draw their digits with replacement and so hold only about 2 in 3 of them (5415 of
    8000): a judge trained on them alone sees a third of the train digits never."""

    def __init__(self, digits, labels, pool, frames, batch_size, seed=0, device=None):
        self.digits, self.labels, self.pool = digits.numpy(), labels.numpy(), pool.numpy()
        self.frames, self.batch_size, self.seed, self.device = frames, batch_size, seed, device
        self.epoch = 0

    @property
    def videos(self):
        return len(self.pool)  # the videos an epoch makes its batches of

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.pool) // self.batch_size

    def __iter__(self):
        rng = np.random.RandomState((self.seed * 100003 + self.epoch) % 2 ** 32)
        order = rng.permutation(self.pool)
        # a batch at a time: an epoch of full MNIST's 60000 train digits is 2 GB of frames
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            X, I, P = make_videos(rng, self.digits, self.batch_size, self.frames, 1,
                                  order=order[start:start + self.batch_size])
            yield next(iter(SpriteBatches(torch.from_numpy(X), torch.from_numpy(self.labels[I]),
                                          torch.from_numpy(P), self.batch_size,
                                          device=self.device)))


def judge_videos(train_digits, held_out, frames, batch_size, seed, device):
    """JudgeVideos of every train digit but those of the held-out train videos (a bool mask)."""
    digits, labels, I = train_digits
    pool = torch.ones(len(digits), dtype=torch.bool)
    pool[I[held_out].flatten()] = False
    return JudgeVideos(digits, labels, pool.nonzero()[:, 0], frames, batch_size, seed, device)


# ---- the judges' augmentation --------------------------------------------------------------------
def warp_digits(x, P, generator, p=1.0, degrees=15.0, scale=0.15, shear=0.2, elastic_px=1.0):
    """A judge's training videos x (B, T, C, 64, 64) with their digits reshaped as handwriting
    varies, so that 8000 digits teach more than 8000 shapes: with probability p a video gets one
    random map about its digit (rotation up to `degrees`, scale 1 +- `scale`, shear up to
    `shear`) and a smooth random displacement of the digit's box (Simard et al.'s elastic
    distortion, about `elastic_px` px), the same in every frame; each frame is warped about its
    digits' mean position P (B, T, K, 2). The draws come from `generator`, a CPU one."""
    B, T, C, H, W = x.shape
    warped = torch.rand(B, generator=generator) < p
    angle = torch.deg2rad((2 * torch.rand(B, generator=generator) - 1) * degrees)
    zoom = 1 + (2 * torch.rand(B, generator=generator) - 1) * scale
    tilt = (2 * torch.rand(B, generator=generator) - 1) * shear
    grid_noise = torch.randn(B, 2, 5, 5, generator=generator) * elastic_px
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # output -> source: the inverse map
    A = torch.stack([torch.stack([cos, -sin + tilt * cos], -1),
                     torch.stack([sin, cos + tilt * sin], -1)], -2)  # (B, 2, 2), acting on (x, y)
    eye = torch.eye(2).expand(B, 2, 2)
    A = torch.where(warped[:, None, None], A, eye).to(x.device)
    grid_noise = (grid_noise * warped[:, None, None, None]).to(x.device)
    # pixel coordinates (x = column, y = row) of every output pixel, relative to the frame's digit
    centre = P.to(x.device, torch.float32).mean(2).flip(-1)  # (B, T, 2) as (x, y)
    rows, cols = torch.meshgrid(torch.arange(H, device=x.device, dtype=torch.float32),
                                torch.arange(W, device=x.device, dtype=torch.float32),
                                indexing="ij")
    rel = torch.stack([cols, rows], -1) - centre[:, :, None, None, :]  # (B, T, H, W, 2)
    source = torch.einsum("bij,bthwj->bthwi", A, rel)
    # the displacement field over the digit's box (+-DIGIT/2 px about its position), smooth
    field = F.interpolate(grid_noise, size=(DIGIT, DIGIT), mode="bicubic", align_corners=True)
    inside = (rel / (DIGIT / 2)).reshape(B, T * H, W, 2)
    shift = F.grid_sample(field, inside, align_corners=True, padding_mode="zeros")
    source = source + shift.permute(0, 2, 3, 1).reshape(B, T, H, W, 2)
    source = source + centre[:, :, None, None, :]
    grid = (2 * source + 1) / torch.tensor([W, H], device=x.device) - 1  # pixel centres
    out = F.grid_sample(x.reshape(B * T, C, H, W), grid.reshape(B * T, H, W, 2),
                        mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.view_as(x).clamp_(0, 1)
