"""Stand-ins with known answers for evaluation.evaluate and the latent probes, and an initialisation
that makes tiny models' outputs depend on their inputs.

Each label of a video (action D, then skin, pant, top, hair) is painted as the intensity (label + 1)
/ LEVELS of its own BLOCK x BLOCK square of the red channel in every frame. LabelPainter encodes a
painted video into z = its action and f = its attributes, and decodes z and f by painting them
again (LabelCoder likewise, in one-hot codes); LabelReader, the judge, reads the squares back. So a
decoded video shows the action of the z it was given and the attributes of its f.
"""
import math

import torch
from torch import nn

from dataloader import FACTORS

JUDGE_HEADS = FACTORS
HEADS = tuple(JUDGE_HEADS)  # action, skin, pant, top, hair: the order of the painted squares
BLOCK, LEVELS = 8, 17       # 255 = 15 * 17: every painted intensity is a whole uint8 value
FRAMES, Z_DIM, F_DIM = 8, 3, 6


def paint(labels, frames=FRAMES):
    """Videos (B, frames, 3, 64, 64) in [0, 1] showing labels (B, 5) (columns in the order of HEADS)."""
    video = torch.zeros(len(labels), frames, 3, 64, 64, device=labels.device)
    for k in range(len(HEADS)):
        video[:, :, 0, :BLOCK, k * BLOCK:(k + 1) * BLOCK] = ((labels[:, k].float() + 1) / LEVELS)[:, None, None, None]
    return video


def read(videos):
    """The labels (B, 5) painted in videos (B, T, 3, 64, 64), each clamped to its head's classes."""
    cols = [videos[:, :, 0, :BLOCK, k * BLOCK:(k + 1) * BLOCK].float().mean((1, 2, 3)) * LEVELS - 1
            for k in range(len(HEADS))]
    return torch.stack([c.round().clamp(0, JUDGE_HEADS[h] - 1).long() for c, h in zip(cols, HEADS)], 1)


def painted_videos(A, D):
    """X uint8 (N, 8, 64, 64, 3) painted with attributes A (N, 4) and actions D (N,), stored as
    make_sprites stores a split. One value of each video (frame 0, the bottom-right pixel's blue) is
    255, where LabelPainter draws 0: the squared reconstruction error is 1 per video (up to
    rounding)."""
    X = (paint(torch.cat([D[:, None], A], 1)) * 255).round().to(torch.uint8)
    X = X.permute(0, 1, 3, 4, 2).contiguous()
    X[:, 0, 63, 63, 2] = 255
    return X


def painted_test_set(n_characters=4, seed=0):
    """(X uint8 (N, 8, 64, 64, 3), A (N, 4), D (N,)) laid out as make_sprites stores a split: every
    character (random attributes) in all 9 motions (painted_videos)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(0, 6, (n_characters, 4), generator=g).repeat_interleave(9, 0)
    D = torch.arange(9).repeat(n_characters)
    return painted_videos(A, D), A, D


def balanced_test_set():
    """A painted split of 36 characters, each attribute's 6 values on 6 characters each (skin i,
    pant j, top (i + j) % 6, hair (i + 2j) % 6), every character in all 9 motions: a classifier that
    sees only the motion (or only the character) scores exactly 1/6 on each attribute (1/9 on the
    action, 1/3 on its type and direction)."""
    i, j = torch.arange(6).repeat_interleave(6), torch.arange(6).repeat(6)
    A = torch.stack([i, j, (i + j) % 6, (i + 2 * j) % 6], 1).repeat_interleave(9, 0)
    D = torch.arange(9).repeat(36)
    return painted_videos(A, D), A, D


class LabelPainter(nn.Module):
    """The interface of model.CDSVAE that evaluation.evaluate uses, with z_t = (action, 0, 0) in every
    frame and f = (skin, pant, top, hair, 0, 0) read from a painted video, decode(z, f) painting the
    action of z and the attributes of f, and a prior path of N(0, 4 I) means and N(means, I)
    samples."""

    def encode(self, x, random=False):
        labels = read(x).float()
        z = torch.zeros(len(x), x.shape[1], Z_DIM, device=x.device)
        z[:, :, 0] = labels[:, :1]
        f = torch.zeros(len(x), F_DIM, device=x.device)
        f[:, :4] = labels[:, 1:]
        return {"z_mean": z, "z_logvar": torch.zeros_like(z), "z": z,
                "f_mean": f, "f_logvar": torch.zeros_like(f), "f": f}

    def decode(self, z, f):
        labels = torch.cat([z[:, :, :1].mean(1), f[:, :4]], 1).round().clamp(0, LEVELS - 2).long()
        return paint(labels, frames=z.shape[1])

    def sample_z_prior(self, B, T=None, random=True, like=None):
        means = 2 * torch.randn(B, T or FRAMES, Z_DIM, dtype=like.dtype, device=like.device)
        return means, means + torch.randn_like(means)


class LabelCoder(nn.Module):
    """LabelPainter with one-hot codes, so that each factor a latent carries is a linear function of
    it: z_t = one_hot(action) in every frame, f = the one-hot codes of skin, pant, top and hair, each
    of posterior variance e^LOGVAR (nearly 0); decode(z, f) paints the class of each code (its
    argmax)."""
    LOGVAR = -30.0

    def encode(self, x, random=False):
        labels = read(x)
        z = nn.functional.one_hot(labels[:, 0], JUDGE_HEADS["action"]).float()
        z = z[:, None].expand(-1, x.shape[1], -1).contiguous()
        f = torch.cat([nn.functional.one_hot(labels[:, k], JUDGE_HEADS[h])
                       for k, h in enumerate(HEADS) if k], 1).float()
        return {"z_mean": z, "z_logvar": torch.full_like(z, self.LOGVAR), "z": z,
                "f_mean": f, "f_logvar": torch.full_like(f, self.LOGVAR), "f": f}

    def decode(self, z, f):
        codes = f.split([JUDGE_HEADS[h] for h in HEADS[1:]], 1)
        labels = torch.stack([z.mean(1).argmax(1)] + [c.argmax(1) for c in codes], 1)
        return paint(labels, frames=z.shape[1])

    def sample_z_prior(self, B, T=None, random=True, like=None):
        means = 2 * torch.randn(B, T or FRAMES, like.shape[-1], dtype=like.dtype, device=like.device)
        return means, means + torch.randn_like(means)


class TopOnlyInMean(LabelCoder):
    """LabelCoder whose f carries the top in its mean only: the top code's posterior standard
    deviation is 1000 (its values are 0 and 1), so a posterior sample of f has lost the top."""

    def encode(self, x, random=False):
        post = super().encode(x, random)
        post["f_logvar"][:, 12:18] = 2 * math.log(1000.0)  # the third code: skin, pant, top
        return post


class LabelReader(nn.Module):
    """A judge that reads the painted labels: logits 50 on the painted class of each head, 0 elsewhere."""

    def forward(self, x):
        labels = read(x)
        return {h: 50 * nn.functional.one_hot(labels[:, k], JUDGE_HEADS[h]).float() for k, h in enumerate(HEADS)}


def spread_init(model, seed=0):
    """`model` in eval mode with He-normal conv / linear weights in place of the paper's N(0, 0.01) ones, under which
    every output is nearly the same whatever the input (~1e-6 apart), and BatchNorm statistics of one training-mode
    pass over random videos: a tiny model whose outputs differ clearly (~0.1) from input to input. The caller's
    random state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, a=0.2, nonlinearity="leaky_relu")
        norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))]
        for m in norms:
            m.momentum = None  # the statistics of the one pass, not a running average towards them
        with torch.no_grad():
            model.train()(torch.rand(8, FRAMES, 3, 64, 64))
        for m in norms:
            m.momentum = 0.1
    return model.eval()


# ---- Moving MNIST stand-ins: a digit painted as the level of a 4x4 block where the video's digit is
SQUARE = 4  # its centre of mass is its centre, corner + 1.5: positions read back exactly


def paint_digits(digits, positions):
    """Videos (B, T, 1, 64, 64): a SQUARE x SQUARE block of level (digit + 1) / LEVELS centred at
    each frame's position (B, T, 2), which must be a whole number + 1.5 inside the frame."""
    B, T = positions.shape[:2]
    video = torch.zeros(B, T, 1, 64, 64)
    corner = (positions - 1.5).round().long().clamp(0, 64 - SQUARE)
    level = (digits.float() + 1) / LEVELS
    for b in range(B):
        for t in range(T):
            r, c = corner[b, t].tolist()
            video[b, t, 0, r:r + SQUARE, c:c + SQUARE] = level[b]
    return video


def painted_smmnist(n=24, frames=FRAMES, seed=0):
    """(X uint8 (n, frames, 64, 64, 1), Y digits (n, 1), P positions (n, frames, 1, 2)) laid out as
    make_smmnist stores a split: random digits on random walks, each position a whole number + 1.5."""
    g = torch.Generator().manual_seed(seed)
    Y = torch.randint(0, 10, (n, 1), generator=g)
    P = torch.randint(0, 61, (n, frames, 1, 2), generator=g).float() + 1.5
    X = (paint_digits(Y[:, 0], P[:, :, 0]) * 255).round().to(torch.uint8).permute(0, 1, 3, 4, 2)
    return X.contiguous(), Y, P


class DigitPainter(nn.Module):
    """The model interface of evaluation.evaluate on Moving MNIST: z_t = the block's centre in frame
    t (read as its centre of mass), f = the one-hot code of the digit read from the block's level;
    decode(z, f) paints the digit of f's argmax along the path of z; the prior's means and samples
    are positions in the frame."""

    def encode(self, x, random=False):
        from smmnist import centre_of_mass
        z = centre_of_mass(x[:, :, 0]).float()
        digit = (x.flatten(1).amax(1) * LEVELS - 1).round().clamp(0, 9).long()
        f = nn.functional.one_hot(digit, 10).float()
        return {"z_mean": z, "z_logvar": torch.zeros_like(z), "z": z,
                "f_mean": f, "f_logvar": torch.zeros_like(f), "f": f}

    def decode(self, z, f):
        return paint_digits(f.argmax(1), (z - 1.5).round() + 1.5)

    def sample_z_prior(self, B, T=None, random=True, like=None):
        means = torch.full((B, T or FRAMES, 2), 31.5, dtype=like.dtype, device=like.device)
        return means, (means + 8 * torch.randn_like(means)).round() + 0.5


class DigitReader(nn.Module):
    """A Moving MNIST judge that reads the painted digit: logits 50 on it, 0 elsewhere."""

    def forward(self, x):
        digit = (x.flatten(1).amax(1) * LEVELS - 1).round().clamp(0, 9).long()
        return {"digit": 50 * nn.functional.one_hot(digit, 10).float()}
