"""The network's shapes and every loss term against an independent computation."""
import math

import pytest
import torch

import stubs
from model import (CDSVAE, FZCritic, cdsvae_loss, critic_loss, kl_gaussians, log_density_gaussian, mutual_information,
                   nt_xent)

SIZES = dict(f_dim=8, z_dim=4, g_dim=16, rnn_size=16, nf=8)


@pytest.fixture
def model():
    """A tiny model in training mode whose outputs differ clearly from input to input (stubs.spread_init)."""
    torch.manual_seed(0)
    return stubs.spread_init(CDSVAE(**SIZES)).train()


def test_shapes_of_every_output(model):
    B, T = 3, 8
    x = torch.rand(B, T, 3, 64, 64)
    out = model(x, m_aug=1 - x, c_aug_order=torch.arange(T).flip(0).expand(B, T))
    expect = {"f_mean": (B, 8), "f_logvar": (B, 8), "f": (B, 8), "z_mean": (B, T, 4), "z_logvar": (B, T, 4),
              "z": (B, T, 4), "z_prior_mean": (B, T, 4), "z_prior_logvar": (B, T, 4), "recon": (B, T, 3, 64, 64)}
    for k, shape in expect.items():
        assert out[k].shape == shape, k
    for view in ("c_post", "m_post"):
        assert out[view]["f_mean"].shape == (B, 8) and out[view]["z_mean"].shape == (B, T, 4)
    assert 0 <= out["recon"].min() and out["recon"].max() <= 1
    model.eval()
    assert [z.shape for z in model.sample_z_prior(5, 6)] == [(5, 6, 4), (5, 6, 4)]
    assert model.generate_fixed_motion(x).shape == x.shape
    assert model.generate_fixed_content(x).shape == x.shape
    a, b = model.swap(x, x.flip(0))
    assert a.shape == b.shape == x.shape


def test_paper_initialisation():
    model = CDSVAE(**SIZES)
    w = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))])
    assert abs(w.std().item() - 0.01) < 0.001
    assert all((m.bias == 0).all() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_content_view_from_shuffled_features_equals_encoding_it(model):
    """In training mode BatchNorm sees the same frames either way, so the shortcut is exact."""
    x = torch.rand(4, 8, 3, 64, 64)
    order = torch.argsort(torch.rand(4, 8), dim=1)
    c_aug = x[torch.arange(4)[:, None], order]
    torch.manual_seed(1)
    shortcut = model(x, c_aug_order=order)["c_post"]
    torch.manual_seed(1)
    direct = model.encode(c_aug)
    for k in ("f_mean", "f_logvar", "z_mean", "z_logvar"):
        torch.testing.assert_close(shortcut[k], direct[k], rtol=1e-4, atol=1e-5)


def test_frame_delta_posterior_ignores_what_is_constant_over_the_video():
    torch.manual_seed(0)
    model = CDSVAE(**SIZES, z_input="frame_delta")
    g = torch.randn(2, 8, 16)
    shifted = g + torch.randn(2, 1, 16)  # the same offset on every frame
    a, b = model.encode_features(g, random=False), model.encode_features(shifted, random=False)
    torch.testing.assert_close(a["z_mean"], b["z_mean"])
    assert not torch.allclose(a["f_mean"], b["f_mean"])


def test_prior_teacher_forcing(model):
    """Step t of the prior sees z_1..z_{t-1} only; step 1 sees z_0 = 0."""
    z = torch.randn(2, 8, 4)
    mean, logvar = model.prior(z)
    z2 = z.clone()
    z2[:, 3] += 1.0
    mean2, _ = model.prior(z2)
    torch.testing.assert_close(mean[:, :4], mean2[:, :4])
    assert not torch.allclose(mean[:, 4], mean2[:, 4])
    first, _, _ = model._prior_step(torch.zeros(2, 4), model._prior_state(2, z))
    torch.testing.assert_close(mean[:, 0], first)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_prior_in_one_lstm_call_equals_the_cell_loop_values_and_gradients(model, dtype, tol):
    """prior_one_call (a GPU's form) computes what the cell-by-cell loop does, forward and backward,
    with the cells' own weights: no new weight, the same state_dict keys. float32 takes oneDNN's
    LSTM on this CPU, float64 torch's own."""
    model = model.to(dtype)
    keys = list(model.state_dict())
    z = torch.randn(3, 8, 4, dtype=dtype, requires_grad=True)
    mixing = torch.randn(3, 8, 4, dtype=dtype)

    def prior(one_call):
        model.prior_one_call, z.grad = one_call, None
        model.zero_grad()
        mean, logvar = model.prior(z)
        ((mean * mixing).sum() + logvar.square().sum()).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return mean.detach(), logvar.detach(), grads, z.grad.clone()

    loop, one_call = prior(False), prior(True)
    torch.testing.assert_close(one_call[:2], loop[:2], rtol=tol, atol=tol)
    assert set(one_call[2]) == set(loop[2]) and any("z_prior_lstm_1" in k for k in loop[2])
    for k, g in loop[2].items():
        assert g.abs().max() > 0, k
        torch.testing.assert_close(one_call[2][k], g, rtol=tol, atol=tol, msg=k)
    torch.testing.assert_close(one_call[3], loop[3], rtol=tol, atol=tol)
    assert list(model.state_dict()) == keys


def test_closed_form_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mq, lq, mp, lp = torch.randn(4), torch.randn(4) * 0.5, torch.randn(4), torch.randn(4) * 0.5
    q, p = torch.distributions.Normal(mq, (0.5 * lq).exp()), torch.distributions.Normal(mp, (0.5 * lp).exp())
    s = q.sample((400000,))
    mc = (q.log_prob(s) - p.log_prob(s)).mean(0)
    torch.testing.assert_close(kl_gaussians(mq, lq, mp, lp), mc, atol=0.02, rtol=0.02)
    torch.testing.assert_close(log_density_gaussian(s[:3], mq, lq), q.log_prob(s[:3]))


def test_nt_xent_matches_a_direct_loop():
    torch.manual_seed(0)
    B, tau = 5, 0.5
    a, b = torch.randn(B, 3, 2), torch.randn(B, 3, 2)
    views = [v.flatten() for v in a] + [v.flatten() for v in b]
    total = 0.0
    for i in range(2 * B):
        pos = (i + B) % (2 * B)
        sims = {j: torch.dot(views[i], views[j]).item() / (views[i].norm() * views[j].norm()).item() / tau
                for j in range(2 * B) if j != i}
        total += -sims[pos] + math.log(sum(math.exp(s) for s in sims.values()))
    assert abs(nt_xent(a, b, tau).item() - total / (2 * B)) < 1e-5


def test_mutual_information_matches_a_hand_computation():
    torch.manual_seed(0)
    B, T, N = 3, 2, 50
    f, fm, fl = torch.randn(B, 2), torch.randn(B, 2), torch.randn(B, 2) * 0.3
    z, zm, zl = torch.randn(B, T, 1), torch.randn(B, T, 1), torch.randn(B, T, 1) * 0.3

    def logn(x, m, lv):  # log density of a diagonal Gaussian, summed over dimensions
        return sum(-0.5 * (math.log(2 * math.pi) + lv[d] + (x[d] - m[d]) ** 2 / math.exp(lv[d])) for d in range(len(x)))

    def lse(v):
        top = max(v)
        return top + math.log(sum(math.exp(u - top) for u in v))

    f_, fm_, fl_, z_, zm_, zl_ = (t.tolist() for t in (f, fm, fl, z, zm, zl))
    vals = []
    for i in range(B):
        for t in range(T):
            lf = [logn(f_[i], fm_[j], fl_[j]) for j in range(B)]
            lz = [logn(z_[i][t], zm_[j][t], zl_[j][t]) for j in range(B)]
            joint = lse([a + b for a, b in zip(lf, lz)]) - math.log(B * N)
            vals.append(max(0.0, joint - (lse(lf) - math.log(B * N)) - (lse(lz) - math.log(B * N))))
    assert abs(mutual_information(f, fm, fl, z, zm, zl, N).item() - sum(vals) / len(vals)) < 1e-5


def test_loss_terms_add_up(model):
    x = torch.rand(4, 8, 3, 64, 64)
    out = model(x, m_aug=1 - x, c_aug_order=torch.argsort(torch.rand(4, 8), dim=1))
    w = dict(weight_f=2.0, weight_z=3.0, weight_c_aug=4.0, weight_m_aug=5.0, weight_mi=6.0, weight_rec=0.5)
    total, t = cdsvae_loss(out, x, 100, **w)
    expect = (0.5 * t["recon"] + 2 * t["kld_f"] + 3 * t["kld_z"] + 4 * t["con_f"] + 5 * t["con_z"] + 6 * t["mi_fz"])
    torch.testing.assert_close(total, expect)
    torch.testing.assert_close(t["recon"], ((out["recon"] - x) ** 2).sum() / 4)


def test_f_mirror_makes_f_exactly_invariant_to_mirroring():
    torch.manual_seed(0)
    x = 0.2 * torch.rand(4, 8, 3, 64, 64)
    for t in range(8):  # a bright bar moving left to right; mirrored, it moves right to left
        x[:, t, :, :, 8 * t:8 * t + 8] = 1
    mirrored = stubs.spread_init(CDSVAE(**SIZES, z_input="frame_delta", f_mirror=True))
    a, b = mirrored.encode(x, random=False), mirrored.encode(x.flip(-1), random=False)
    torch.testing.assert_close(a["f_mean"], b["f_mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["f_logvar"], b["f_logvar"], rtol=1e-5, atol=1e-6)

    def differ(u, v):  # relative to the scale of the outputs
        return ((u - v).abs().max() > 1e-3 * u.abs().max()).item()

    plain = CDSVAE(**SIZES, z_input="frame_delta").eval()
    plain.load_state_dict(mirrored.state_dict())  # same weights, no mirror: f differs
    assert differ(plain.encode(x, random=False)["f_mean"], plain.encode(x.flip(-1), random=False)["f_mean"])
    # in training, the content view from shuffled features (mirrored ones too) still equals encoding it
    mirrored.train()
    order = torch.argsort(torch.rand(4, 8), dim=1)
    shortcut = mirrored(x, c_aug_order=order)["c_post"]
    direct = mirrored.encode(x[torch.arange(4)[:, None], order])
    torch.testing.assert_close(shortcut["f_mean"], direct["f_mean"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dependent, mi", [(True, math.log(3)), (False, 0.0)])
def test_critic_estimates_the_information_f_and_z_share(dependent, mi):
    """f and z each hold a 3-valued variable plus noise; when it is the same variable, I(f; z) = log 3 nats (the
    variable is read without error from either), otherwise 0. The trained critic's mean logit on own pairs finds both."""
    torch.manual_seed(0)

    def pairs(n):
        d = torch.randint(0, 3, (n,)).float()
        f, z = 0.3 * torch.randn(n, 8), 0.3 * torch.randn(n, 3, 4)
        f[:, 0] += 2 * d
        z[:, :, 0] += 2 * (d if dependent else torch.randint(0, 3, (n,)).float())[:, None]
        return f, z

    critic = FZCritic(8, 4, 3, hidden=64)
    optimizer = torch.optim.Adam(critic.parameters(), 1e-3, betas=(0.5, 0.9))
    for step in range(600):
        optimizer.zero_grad()
        critic_loss(critic, *pairs(128), shift=1 + step % 127).backward()
        optimizer.step()
    with torch.no_grad():
        assert critic(*pairs(4096)).mean().item() == pytest.approx(mi, abs=0.15)

