"""Batches made on the training device: the whole-batch way (what an accelerator runs) equals the
CPU's few-sequences-at-a-time way and the batches of before, resume included, and it reads nothing
back to the host (run on the meta device, where any such read raises)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dataloader
from dataloader import SpriteBatches, _augmentation_draws, motion_augment, to_float

torch.set_num_threads(1)


def synthetic(n, seed, size=64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, 256, (n, 8, size, size, 3), dtype=torch.uint8, generator=g)
    return X, torch.randint(0, 6, (n, 4), generator=g), torch.randint(0, 9, (n,), generator=g)


def blur_weights(loader):
    """The blur weight c of every sequence of the loader's epoch, drawn as the loader draws it."""
    g = torch.Generator().manual_seed(loader.seed * 100003 + loader.epoch * 7919 + 1)
    return torch.cat([_augmentation_draws(len(b), 8, g)[1][3]
                      for b in loader._indices().split(loader.batch_size)])


def is_grey(m_aug):
    """(B,): whether every frame of a motion view has its three channels equal."""
    r, g, b = m_aug.unbind(2)
    return ((r == g) & (g == b)).flatten(1).all(1)


def test_whole_batch_way_equals_the_chunked_way_resume_included():
    X, A, D = synthetic(30, seed=1)
    chunked = SpriteBatches(X, A, D, 8, shuffle=True, augment=True, seed=2, device="cpu")
    chunked.set_epoch(2)
    expected = list(chunked)
    c = blur_weights(chunked)
    grey = torch.cat([is_grey(b["m_aug"]) for b in expected])
    assert len(expected) == 4 and (c > 0).any() and (c == 0).any(), c
    assert grey.any() and (grey & (c > 0)).any(), "no greyscale (and blurred) sequence drawn"
    whole = SpriteBatches(X, A, D, 8, shuffle=True, augment=True, seed=2, device="cpu")
    whole.chunk = 8  # the whole batch at once, as on an accelerator
    whole.set_epoch(2, start=1)
    got = list(whole)
    assert len(got) == 3
    for e, b in zip(expected[1:], got):
        assert e.keys() == b.keys()
        for k in ("x", "c_aug", "c_aug_order", "A", "D", "index"):
            assert torch.equal(e[k], b[k]), k
        torch.testing.assert_close(b["m_aug"], e["m_aug"], atol=1e-6, rtol=0)


# Per-sequence mean and mean square of m_aug over epoch 1 of synthetic(12, seed=20, size=16),
# batches of 5, seed 3, as the loader made them before batches could be made on a device
# (commit f36dadb); sequences 1, 6 and 9 are greyscale, 1 of them blurred too.
BEFORE_MEAN = [0.6923161, 0.4473532, 0.7380284, 0.4967869, 0.703728, 0.6223582, 0.679677,
               0.1164366, 0.3299738, 0.1479194, 0.7670451, 0.2765134]
BEFORE_SQUARE = [0.5075953, 0.2086089, 0.6184068, 0.2592244, 0.5327083, 0.561061, 0.4733607,
                 0.0140475, 0.1468185, 0.0221074, 0.6107333, 0.0780148]


@pytest.mark.parametrize("chunk", [None, 5])
def test_batches_are_those_of_before(chunk):
    X, A, D = synthetic(12, seed=20, size=16)
    loader = SpriteBatches(X, A, D, 5, shuffle=True, augment=True, seed=3, device="cpu")
    loader.chunk = chunk
    loader.set_epoch(1)
    batches = list(loader)
    m = torch.cat([b["m_aug"] for b in batches]).double()
    grey = torch.cat([is_grey(b["m_aug"]) for b in batches])
    assert grey.nonzero().view(-1).tolist() == [1, 6, 9]
    torch.testing.assert_close(m.mean(dim=(1, 2, 3, 4)), torch.tensor(BEFORE_MEAN).double(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close((m ** 2).mean(dim=(1, 2, 3, 4)),
                               torch.tensor(BEFORE_SQUARE).double(), atol=1e-6, rtol=0)


class HostToMeta(TorchDispatchMode):
    """Counts the copies of CPU tensors to the meta device."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            dst = out if func is torch.ops.aten._to_copy.default else args[0]
            src = tensors[-1]
            self.copies += src.device.type == "cpu" and dst.device.type == "meta"
        return out


def check_on_meta(batches, sizes):
    for b, n in zip(batches, sizes, strict=True):
        for k in ("x", "m_aug", "c_aug"):
            assert b[k].device.type == "meta" and b[k].shape == (n, 8, 3, 16, 16), k
            assert b[k].dtype == torch.float32, k
        assert b["c_aug_order"].device.type == "meta" and b["c_aug_order"].dtype == torch.int64
        assert b["c_aug_order"].shape == (n, 8)
        for k in ("A", "D", "index"):
            assert b[k].device.type == "cpu" and len(b[k]) == n, k


def test_device_path_reads_nothing_back_and_copies_once_a_batch():
    """Meta tensors hold no values: a host read of one (item, tolist, bool, a copy to the CPU)
    raises, so making every batch there shows the device path makes none."""
    X, A, D = synthetic(12, seed=4, size=16)
    loader = SpriteBatches(X, A, D, 5, shuffle=True, augment=True, seed=1, device="meta")
    assert loader.store.device.type == "meta"
    loader.set_epoch(3, start=1)
    with HostToMeta() as mode:
        batches = list(loader)
    check_on_meta(batches, [5, 2])
    assert mode.copies == 1 + 2  # the epoch's order, then each batch's draws in one copy
    plain = SpriteBatches(X, A, D, 5, device="meta")
    with HostToMeta() as mode:
        assert [b["x"].device.type for b in plain] == ["meta"] * 3
    assert mode.copies == 1
    assert to_float(X[:3].to("meta")).shape == (3, 8, 3, 16, 16)
    assert motion_augment(torch.empty(3, 8, 3, 16, 16, device="meta")).device.type == "meta"


def test_a_split_that_does_not_fit_stays_on_the_host(monkeypatch):
    X, A, D = synthetic(12, seed=5, size=16)
    to = torch.Tensor.to

    def out_of_memory(self, *args, **kwargs):
        if self is X:
            raise torch.OutOfMemoryError("no room for the split")
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", out_of_memory)
    loader = SpriteBatches(X, A, D, 5, shuffle=True, augment=True, device="meta")
    monkeypatch.undo()
    assert loader.store is X
    with HostToMeta() as mode:
        batches = list(loader)
    check_on_meta(batches, [5, 5, 2])
    assert mode.copies == 2 * 3  # each batch's uint8 rows and its draws
    assert dataloader._store_on(X, torch.device("cpu")) is X



def test_the_host_path_is_taken_when_asked_for_as_device_check_forces_it():
    """on_host (train_cdsvae.py --data_on_host): the path of a split that does not fit, forced."""
    X, A, D = synthetic(12, seed=5, size=16)
    loader = SpriteBatches(X, A, D, 5, shuffle=True, augment=True, device="meta", on_host=True)
    assert loader.store is X
    with HostToMeta() as mode:
        batches = list(loader)
    check_on_meta(batches, [5, 5, 2])
    assert mode.copies == 2 * 3  # each batch's uint8 rows and its draws


def test_judge_corruption_off_the_cpu_makes_the_same_videos_and_reads_nothing_back():
    """Issue 26 item 5: train_judge.py on a GPU blurs and noises there. Given the noise the CPU
    way draws, the device way makes the same videos bit for bit; on the meta device (any host
    read raises) its kernels and noise levels go there in one copy."""
    x = torch.rand(6, 8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cpu_way = dataloader.judge_corrupt(x, torch.Generator().manual_seed(3), p_blur=0.8, p_noise=0.8)
    draws = torch.Generator().manual_seed(3)
    for _ in range(4):  # the per-video draws: blur or not, sigma, noise or not, std
        torch.rand(6, generator=draws)
    noise = torch.Generator().set_state(draws.get_state())
    device_way = dataloader.judge_corrupt(x, torch.Generator().manual_seed(3), p_blur=0.8,
                                          p_noise=0.8, noise_generator=noise)
    assert torch.equal(device_way, cpu_way) and not torch.equal(cpu_way, x)
    x = x.to("meta")
    with HostToMeta() as mode:
        on_meta = dataloader.judge_corrupt(x, torch.Generator().manual_seed(3))
    assert on_meta.device.type == "meta" and on_meta.shape == x.shape and mode.copies == 1
