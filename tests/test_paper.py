"""The paper-exact network options, the paper repo's schedules, and loading the paper repo's own files."""
import math

import pytest
import torch
from torch import nn

from model import CDSVAE
from train_cdsvae import lr_lambda
from utils import load_model, save_atomic

SIZES = dict(f_dim=8, z_dim=4, g_dim=16, rnn_size=16, nf=8)


def test_f_heads_end_in_leaky_relu_when_asked():
    torch.manual_seed(0)
    model = CDSVAE(**SIZES, f_head_leaky=True)
    h = torch.randn(5, 32)
    for head in (model.f_mean, model.f_logvar):
        linear = head[0]
        assert isinstance(linear, nn.Linear) and len(head) == 2
        assert torch.allclose(head(h), nn.functional.leaky_relu(linear(h), 0.2))
    assert isinstance(CDSVAE(**SIZES).f_mean, nn.Linear)  # the default: the checkpoints written before


def test_paper_init_leaves_transposed_convs_at_pytorch_default():
    torch.manual_seed(0)
    paper, ours = CDSVAE(**SIZES, deconv_normal=False), CDSVAE(**SIZES)
    deconvs = lambda m: [d for d in m.modules() if isinstance(d, nn.ConvTranspose2d)]
    assert all((d.bias != 0).any() for d in deconvs(paper))  # PyTorch draws biases from a uniform
    assert all((d.bias == 0).all() for d in deconvs(ours))
    for d in deconvs(paper):  # PyTorch's bound for weights: 1/sqrt(fan_in), fan_in = out channels x kernel area
        assert d.weight.abs().max() <= 1 / math.sqrt(d.weight.shape[1] * 16) + 1e-7
    for model in (paper, ours):
        others = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert all((m.bias == 0).all() for m in others)
        assert abs(torch.cat([m.weight.flatten() for m in others]).std().item() - 0.01) < 0.001


def test_old_checkpoint_without_the_new_args_loads_as_before(tmp_path):
    torch.manual_seed(0)
    model = CDSVAE(**SIZES).eval()
    args = dict(SIZES, frames=8, z_input="bilstm", f_mirror=False, f_film=False)  # model_args before this change
    save_atomic({"model": model.state_dict(), "model_args": args}, str(tmp_path / "old.pt"))
    loaded = load_model(str(tmp_path / "old.pt"))
    x = torch.rand(2, 8, 3, 64, 64)
    assert isinstance(loaded.f_mean, nn.Linear)
    assert torch.equal(loaded.encode(x, random=False)["f_mean"], model.encode(x, random=False)["f_mean"])


def test_schedules_match_the_paper_repos_per_epoch_schedulers():
    steps_per_epoch, n_epoch, lr = 3, 9, 1e-3
    for sche, make in (("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
                           o, eta_min=2e-4, T_0=(n_epoch + 1) // 2, T_mult=1)),
                       ("step", lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=n_epoch // 2, gamma=0.5))):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        paper, factor = make(optimizer), lr_lambda(sche, n_epoch, steps_per_epoch, lr)
        for epoch in range(n_epoch):
            if epoch:
                optimizer.step()  # no gradient: changes nothing, and keeps the scheduler's order warning away
                paper.step()  # the paper repo steps at the start of every epoch but the first
            for s in range(steps_per_epoch):
                assert math.isclose(lr * factor(epoch * steps_per_epoch + s), optimizer.param_groups[0]["lr"],
                                    rel_tol=1e-9), (sche, epoch)
    to_zero = lr_lambda("cosine_to_zero", n_epoch, steps_per_epoch, lr)
    assert to_zero(0) == 1 and abs(to_zero(n_epoch * steps_per_epoch)) < 1e-12
