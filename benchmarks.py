"""The benchmarks, each said once: its frames and channels, its factors and judge heads, its motion
views, its data file and the script that builds it, its shipped judges. Every script takes one by
--dataset (add_dataset_flag) and reads the rest from here.

A split is (X, A, D): X uint8 videos (N, T, 64, 64, C); A the content labels (N, ...); D the
motion: Sprites' action class (N,), Moving MNIST's digit positions a frame (N, T, K, 2) in px.
"""
from dataclasses import dataclass
from typing import Callable

import torch

import probes
import smmnist
from dataloader import FACTORS, character_id, factor_labels, load_sprites


@dataclass(frozen=True)
class Benchmark:
    name: str
    title: str
    frames: int
    channels: int
    heads: dict  # the judges' heads {factor: classes}
    motion_views: dict  # {name: view (None: Sprites' colour change)}; the first is the default
    data_root: str  # where the scripts look for the data file by default
    builder: str  # the script that builds it
    judges: tuple  # the shipped judge files
    load: Callable  # path -> {'train': (X, A, D), 'test': (X, A, D)}, checked
    labels: Callable  # (A, D) -> {judge head: labels (N,)}
    groups: Callable  # A -> the id of each video's unit that a validation split holds out whole
    judge_val: int  # the units a judge's training holds out to choose its epoch
    judge_warp: Callable  # (x, D, generator, p) -> a judge's training videos reshaped, or None
    judge_p_warp: float  # the share of a judge's training videos it reshapes by default
    judge_crop: int  # the window about each frame's centre of mass a judge reads, px (0: none)
    # (train digits, held-out mask, frames, batch size, seed, device) -> a judge's training
    # batches made anew (None: the train split's stored videos, SpriteBatches)
    judge_videos: Callable
    positions: bool  # D holds positions: motion is measured without a judge (trajectory errors)
    probe_factors: dict  # the probes' classifiers {factor: classes}
    probe_labels: Callable  # (A, D) -> {factor: labels (N,)}
    probe_targets: Callable  # (A, D) -> {name: values (N, ...)} for the R² probes ({}: none)
    probe_units: int  # the probes' train units (characters, videos) by default
    quality: tuple  # (the judges' figure time_to_quality.py follows, what it is)

    def motion_view(self, name=None):
        """The view called `name` (None: the default), refused in one line if not this set's."""
        name = name or next(iter(self.motion_views))
        if name not in self.motion_views:
            raise ValueError(f"--motion_view {name} is not a view of {self.title}: choose one of "
                             f"{', '.join(self.motion_views)}")
        return self.motion_views[name]


def _each_video(A):
    return torch.arange(len(A))  # Moving MNIST has no characters: a video is its own unit


BENCHMARKS = {
    "sprites": Benchmark(
        "sprites", "Sprites", frames=8, channels=3, heads=dict(FACTORS),
        motion_views={"colour": None}, data_root="data/Sprite/data.pkl",
        builder="make_sprites.py", judges=("judges/sprite_judge.pt", "judges/clip_judge.pt"),
        load=load_sprites, labels=factor_labels, groups=character_id, judge_val=20,
        judge_warp=None, judge_p_warp=0.0, judge_crop=0, judge_videos=None,
        positions=False, probe_factors=probes.PROBE_FACTORS, probe_labels=probes.probe_labels,
        probe_targets=lambda A, D: {}, probe_units=300,
        quality=("A_action_acc", "protocol A action accuracy")),
    "smmnist": Benchmark(
        "smmnist", "Stochastic Moving MNIST", frames=8, channels=1,
        heads={"digit": smmnist.DIGITS}, motion_views=smmnist.MOTION_VIEWS,
        data_root="data/smmnist/data.pkl", builder="make_smmnist.py",
        judges=("judges/smmnist_lstm_judge.pt", "judges/smmnist_clip_judge.pt"),
        load=smmnist.load_smmnist, labels=smmnist.digit_labels, groups=_each_video,
        judge_val=250, judge_warp=smmnist.warp_digits, judge_p_warp=0.8, judge_crop=40,
        judge_videos=smmnist.judge_videos,
        positions=True,
        probe_factors={"digit": smmnist.DIGITS},
        probe_labels=smmnist.digit_labels, probe_targets=lambda A, D: {"positions": D},
        probe_units=2700, quality=("swap_digit_acc", "swaps: digit accuracy")),
}


def add_dataset_flag(arg, data_root=True):
    """--dataset, and (with data_root) --data_root defaulting to the data set's own file."""
    arg("--dataset", choices=tuple(BENCHMARKS), default="sprites",
        help="the benchmark: sprites or smmnist, Stochastic Moving MNIST (default sprites)")
    if data_root:
        arg("--data_root", default=None, help="its data file (default: data/Sprite/data.pkl of "
            "make_sprites.py, or data/smmnist/data.pkl of make_smmnist.py)")


def benchmark_of(args):
    """The Benchmark of args.dataset, with args.data_root set to its file if not given."""
    bench = BENCHMARKS[args.dataset]
    if hasattr(args, "data_root"):
        args.data_root = args.data_root or bench.data_root
    return bench
