"""Stochastic Moving MNIST (Denton & Fergus, 2018): the frame geometry, and a digit's position read
from pixels, which scores motion without a judge.

A digit's position, (row, col) in pixels with pixel i's centre at i, is the point of its 32x32 box
where MNIST puts every digit's centre of mass (pixel 14, 14 of the 28x28 field, scaled): it does not
depend on the digit's shape, so a video whose digit was swapped for another keeps it, and the centre
of mass of a one-digit frame reads it up to that digit's own shape.
"""
import torch

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
