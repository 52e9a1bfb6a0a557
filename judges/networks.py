"""The two families of judges, (B, T, C, 64, 64) in [0, 1] -> {head: logits (B, classes)}, the heads
of a benchmark (Sprites' dataloader.FACTORS by default), and the loading of a judge file (ours or
the paper repo's)."""
import os
import re

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import BENCHMARKS
from dataloader import FACTORS
from model import FrameEncoder
from smmnist import centre_of_mass
from utils import (STATE_DICT, CheckpointError, a_kind, bad_constructor_args, check_fields,
                   checkpoint_kind, paper_encoder_names, read_checkpoint)

SHIPPED_JUDGES = BENCHMARKS["sprites"].judges


def factor_heads(n_in, hidden, heads):
    return nn.ModuleDict({k: nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n))
                          for k, n in heads.items()})


class MassCrop(nn.Module):
    """Each frame (B, T, C, H, W) resampled to H x W from the `window` px square about its centre
    of mass, so that a judge reads a small digit where it is and larger. The mass is what lies
    above half the frame's peak: pixel noise and a generated frame's haze do not pull it."""

    def __init__(self, window):
        super().__init__()
        self.window = window

    def forward(self, x):
        B, T, C, H, W = x.shape
        frames = x.reshape(B * T, C, H, W).float()
        grey = frames.mean(1)
        mass = (grey - 0.5 * grey.amax((1, 2), keepdim=True)).clamp_min(0)
        row, col = centre_of_mass(mass).to(frames.dtype).unbind(-1)
        theta = torch.zeros(B * T, 2, 3, dtype=frames.dtype, device=frames.device)
        theta[:, 0, 0], theta[:, 1, 1] = self.window / W, self.window / H
        theta[:, 0, 2], theta[:, 1, 2] = (2 * col + 1) / W - 1, (2 * row + 1) / H - 1
        grid = F.affine_grid(theta, frames.shape, align_corners=False)
        crops = F.grid_sample(frames, grid, align_corners=False)  # zeros beyond the frame
        return crops.reshape(B, T, C, H, W)


def frame_crop(crop):
    """The judges' first layer: MassCrop(crop), or nothing for crop 0 (Sprites' judges)."""
    return MassCrop(crop) if crop else nn.Identity()


class SpriteJudge(nn.Module):
    """Frame encoder, BiLSTM, one MLP head per factor: the paper's classifier_Sprite_all design;
    with crop > 0, each frame is first cropped about its centre of mass (MassCrop)."""

    def __init__(self, g_dim=128, rnn_size=256, hidden=256, nf=64, channels=3, heads=None,
                 crop=0):
        super().__init__()
        self.crop = frame_crop(crop)
        self.encoder = FrameEncoder(g_dim, nf, channels)
        self.lstm = nn.LSTM(g_dim, rnn_size, batch_first=True, bidirectional=True)
        self.rnn_size = rnn_size
        self.heads = factor_heads(2 * rnn_size, hidden, heads or FACTORS)

    def forward(self, x):
        # read out: the last step forward, the first backward
        out, _ = self.lstm(self.encoder(self.crop(x)))
        h = torch.cat([out[:, -1, :self.rnn_size], out[:, 0, self.rnn_size:]], dim=1)
        return {k: head(h) for k, head in self.heads.items()}


class ClipJudge(nn.Module):
    """3D convolutions over the whole clip (space and time mixed from the first layer, no
    recurrence), average-pooled to 2x2x2 cells of (time, height, width), one MLP head per factor;
    with crop > 0, each frame is first cropped about its centre of mass (MassCrop)."""

    def __init__(self, nf=32, hidden=256, channels=3, heads=None, crop=0):
        super().__init__()
        self.crop = frame_crop(crop)

        def block(c_in, c_out, kernel, stride, padding):
            return [nn.Conv3d(c_in, c_out, kernel, stride, padding, bias=False),
                    nn.BatchNorm3d(c_out), nn.ReLU()]

        self.net = nn.Sequential(
            *block(channels, nf, (3, 5, 5), (1, 2, 2), (1, 2, 2)),  # 8 x 32 x 32
            *block(nf, 2 * nf, 3, (1, 2, 2), 1),              # 8 x 16 x 16
            *block(2 * nf, 4 * nf, 3, 2, 1),                  # 4 x 8 x 8
            *block(4 * nf, 8 * nf, 3, 2, 1),                  # 2 x 4 x 4
            nn.AdaptiveAvgPool3d(2), nn.Flatten())
        self.heads = factor_heads(64 * nf, hidden, heads or FACTORS)

    def forward(self, x):
        h = self.net(self.crop(x).transpose(1, 2))
        return {k: head(h) for k, head in self.heads.items()}


JUDGES = {"bilstm": SpriteJudge, "conv3d": ClipJudge}  # a judge file's 'arch' names its network


def judge_name(path):
    """A judge's name in tables and in the JSON: its file name without the extension."""
    return os.path.splitext(os.path.basename(path))[0]


def paper_judge(state, path):
    """The paper repo's judge (its classifier_Sprite_all's state_dict) as a judge file of ours."""
    renamed = {}
    for k, v in paper_encoder_names(state).items():
        head = re.fullmatch(r"cls_(\w+?)\.(\d\..+)", k)
        renamed[f"heads.{head[1]}.{head[2]}" if head else re.sub(r"^bilstm\.", "lstm.", k)] = v
    try:
        judge_args = dict(g_dim=state["bilstm.weight_ih_l0"].shape[1],
                          rnn_size=state["bilstm.weight_hh_l0"].shape[1],
                          hidden=state["cls_action.0.weight"].shape[0],
                          nf=state["encoder.c1.main.0.weight"].shape[0])
    except KeyError as e:
        raise CheckpointError(f"{path} looks like the paper repo's judge but has no {e}") from None
    return {"model": renamed, "judge_args": judge_args, "arch": "bilstm"}


def load_judge(path, device="cpu", heads=None):
    """The judge network of a file of judges/train_judge.py or of the paper repo, in fp32, in eval
    mode; CheckpointError, naming the judge file, if it is neither, if a field is malformed, or if
    its heads are not `heads` (default: Sprites' FACTORS)."""
    heads = heads or FACTORS
    ckpt = read_checkpoint(path, what="judge file")
    kind = checkpoint_kind(ckpt, path)
    if kind == "the paper repo's judge":
        check_fields(ckpt, f"{kind} {path}", {"state_dict": STATE_DICT})
        ckpt = paper_judge(ckpt["state_dict"], path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "judge_args" not in ckpt:
        raise CheckpointError(f"{path} is not a judge of judges/train_judge.py (no 'model' / "
                              f"'judge_args') nor the paper repo's (no 'state_dict' of its "
                              f"classifier_Sprite_all): it is {a_kind(kind)}")
    name = f"judge file {path}"
    check_fields(ckpt, name, {"model": STATE_DICT, "judge_args": (
        lambda v: isinstance(v, dict), "a dict of the judge network's arguments")})
    found = ckpt.get("heads", FACTORS)
    if not isinstance(found, dict) or found != heads:
        raise CheckpointError(f"{name} has judge heads {str(found)[:200]}, expected {heads}: a "
                              f"judge of another data set?")
    arch = ckpt.get("arch", "bilstm")  # judge files that name no arch are of the first network
    if not isinstance(arch, str) or arch not in JUDGES:
        raise CheckpointError(f"{name} is a judge of network {str(arch)[:60]!r}, which this code "
                              f"does not know ({', '.join(JUDGES)})")
    bad = bad_constructor_args(JUDGES[arch], ckpt["judge_args"])
    if bad:
        raise CheckpointError(f"{name} has judge_args that no {JUDGES[arch].__name__} takes: "
                              f"{'; '.join(bad)}; the file is damaged or of other code")
    try:
        judge = JUDGES[arch](**ckpt["judge_args"], heads=heads)
        judge.load_state_dict(ckpt["model"])  # copied into the fp32 parameters
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"{name} does not fit {JUDGES[arch].__name__} "
                              f"({str(e).splitlines()[0][:200]})") from None
    return judge.to(device).eval()
