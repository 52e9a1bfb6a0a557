"""The paper-exact network options, the paper repo's schedules, and loading the paper repo's own files."""
import math

import pytest
import torch
from torch import nn

from judges.networks import load_judge
from model import CDSVAE
from train_cdsvae import lr_lambda
from utils import CheckpointError, load_model, save_atomic

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
    args = dict(SIZES, frames=8, z_input="bilstm", f_mirror=False, f_film=False)  # f_film: removed, off
    save_atomic({"model": model.state_dict(), "model_args": args}, str(tmp_path / "old.pt"))
    loaded = load_model(str(tmp_path / "old.pt"))
    x = torch.rand(2, 8, 3, 64, 64)
    assert isinstance(loaded.f_mean, nn.Linear)
    assert torch.equal(loaded.encode(x, random=False)["f_mean"], model.encode(x, random=False)["f_mean"])


def test_a_checkpoint_that_needs_a_removed_option_is_refused_naming_its_commit(tmp_path):
    args = dict(SIZES, frames=8, z_input="bilstm", f_film=True)
    save_atomic({"model": CDSVAE(**SIZES).state_dict(), "model_args": args}, str(tmp_path / "film.pt"))
    with pytest.raises(CheckpointError, match="needs --f_film, which was removed.*commit 7544b94"):
        load_model(str(tmp_path / "film.pt"))


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


# ---- the paper repo's files -------------------------------------------------------------------------------
# A replica of the paper repo's modules (model.py of JunwenBai/C-DSVAE), written here from reading it: only their
# names and shapes matter to the files, and their forward passes check that the mapped weights compute the same.
class PaperEncoder(nn.Module):
    def __init__(self, g_dim, nf):
        super().__init__()
        for i, (a, b) in enumerate(((3, nf), (nf, 2 * nf), (2 * nf, 4 * nf), (4 * nf, 8 * nf)), 1):
            block = nn.Module()
            block.main = nn.Sequential(nn.Conv2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2))
            setattr(self, f"c{i}", block)
        self.c5 = nn.Sequential(nn.Conv2d(8 * nf, g_dim, 4, 1, 0), nn.BatchNorm2d(g_dim), nn.Tanh())

    def forward(self, x):
        B, T = x.shape[:2]
        h = x.reshape(B * T, *x.shape[2:])
        for i in range(1, 5):
            h = getattr(self, f"c{i}").main(h)
        return self.c5(h).view(B, T, -1)


class PaperDecoder(nn.Module):
    def __init__(self, dim, nf):
        super().__init__()
        self.upc1 = nn.Sequential(nn.ConvTranspose2d(dim, 8 * nf, 4, 1, 0), nn.BatchNorm2d(8 * nf), nn.LeakyReLU(0.2))
        for i, (a, b) in enumerate(((8 * nf, 4 * nf), (4 * nf, 2 * nf), (2 * nf, nf)), 2):
            block = nn.Module()
            block.main = nn.Sequential(nn.ConvTranspose2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2))
            setattr(self, f"upc{i}", block)
        self.upc5 = nn.Sequential(nn.ConvTranspose2d(nf, 3, 4, 2, 1), nn.Sigmoid())

    def forward(self, h):
        B, T = h.shape[:2]
        h = self.upc1(h.reshape(B * T, -1, 1, 1))
        for i in range(2, 5):
            h = getattr(self, f"upc{i}").main(h)
        return self.upc5(h).view(B, T, 3, 64, 64)


class PaperCDSVAE(nn.Module):
    def __init__(self, f_dim=8, z_dim=4, g_dim=16, rnn_size=16, nf=8):
        super().__init__()
        self.encoder, self.decoder = PaperEncoder(g_dim, nf), PaperDecoder(z_dim + f_dim, nf)
        self.z_prior_lstm_ly1, self.z_prior_lstm_ly2 = nn.LSTMCell(z_dim, rnn_size), nn.LSTMCell(rnn_size, rnn_size)
        self.z_prior_mean, self.z_prior_logvar = nn.Linear(rnn_size, z_dim), nn.Linear(rnn_size, z_dim)
        self.z_lstm = nn.LSTM(g_dim, rnn_size, 1, bidirectional=True, batch_first=True)
        for name in ("f_mean", "f_logvar"):  # LinearUnit(..., batchnorm=False)
            unit = nn.Module()
            unit.model = nn.Sequential(nn.Linear(2 * rnn_size, f_dim), nn.LeakyReLU(0.2))
            setattr(self, name, unit)
        self.z_rnn = nn.RNN(2 * rnn_size, rnn_size, batch_first=True)
        self.z_mean, self.z_logvar = nn.Linear(rnn_size, z_dim), nn.Linear(rnn_size, z_dim)
        self.rnn_size = rnn_size

    def posterior_means(self, x):
        out, _ = self.z_lstm(self.encoder(x))
        f_in = torch.cat([out[:, -1, :self.rnn_size], out[:, 0, self.rnn_size:]], 1)
        return self.f_mean.model(f_in), self.z_mean(self.z_rnn(out)[0])


class PaperJudge(nn.Module):  # classifier_Sprite_all
    def __init__(self, g_dim=16, rnn_size=16, nf=8):
        super().__init__()
        self.encoder = PaperEncoder(g_dim, nf)
        self.bilstm = nn.LSTM(g_dim, rnn_size, 1, bidirectional=True, batch_first=True)
        for head, n in (("skin", 6), ("top", 6), ("pant", 6), ("hair", 6), ("action", 9)):
            setattr(self, f"cls_{head}", nn.Sequential(nn.Linear(2 * rnn_size, rnn_size), nn.ReLU(True),
                                                       nn.Linear(rnn_size, n)))
        self.rnn_size = rnn_size

    def forward(self, x):
        out, _ = self.bilstm(self.encoder(x))
        h = torch.cat([out[:, -1, :self.rnn_size], out[:, 0, self.rnn_size:]], 1)
        return {k: getattr(self, f"cls_{k}")(h) for k in ("action", "skin", "pant", "top", "hair")}


def randomise_batchnorm(module):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    return module.eval()


def test_the_paper_repos_sample_checkpoint_loads_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    paper = randomise_batchnorm(PaperCDSVAE())
    torch.save({"model": paper.state_dict(), "optimizer": {}}, tmp_path / "model99.pth")
    ours = load_model(str(tmp_path / "model99.pth"))
    x, z, f = torch.rand(2, 8, 3, 64, 64), torch.randn(2, 8, 4), torch.randn(2, 8)
    with torch.no_grad():
        post = ours.encode(x, random=False)
        f_mean, z_mean = paper.posterior_means(x)
        torch.testing.assert_close(post["f_mean"], f_mean)
        torch.testing.assert_close(post["z_mean"], z_mean)
        torch.testing.assert_close(ours.decode(z, f), paper.decoder(torch.cat([z, f[:, None].expand(-1, 8, -1)], 2)))
        s1 = paper.z_prior_lstm_ly1(torch.zeros_like(z[:, 0]))  # the paper's prior: step 0 fed zeros, step 1 z_0
        s2 = paper.z_prior_lstm_ly2(s1[0])
        s1 = paper.z_prior_lstm_ly1(z[:, 0], s1)
        s2 = paper.z_prior_lstm_ly2(s1[0], s2)
        torch.testing.assert_close(ours.prior(z)[0][:, 1], paper.z_prior_mean(s2[0]))


def test_the_paper_repos_judge_loads_and_computes_the_same(tmp_path):
    torch.manual_seed(0)
    paper = randomise_batchnorm(PaperJudge())
    torch.save({"state_dict": paper.state_dict(), "epoch": 3}, tmp_path / "sprite_judge.tar")
    ours = load_judge(str(tmp_path / "sprite_judge.tar"))
    x = torch.rand(3, 8, 3, 64, 64)
    with torch.no_grad():
        want, got = paper(x), ours(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_files_that_do_not_fit_are_refused_in_one_line(tmp_path):
    from utils import CheckpointError
    torch.manual_seed(0)
    state = PaperCDSVAE().state_dict()
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("z_mean")}}, tmp_path / "cut.pth")
    torch.save({"model": {**state, "extra.weight": torch.zeros(1)}}, tmp_path / "extra.pth")
    torch.save({"ds_vae": PaperCDSVAE()}, tmp_path / "old_form.pth")  # a whole module pickled
    judge = PaperJudge().state_dict()
    judge["cls_skin.2.weight"] = torch.zeros(7, 16)  # 7 classes: not the Sprites judge
    torch.save({"state_dict": judge}, tmp_path / "judge7.tar")
    for name, loader, words in (("cut.pth", load_model, "z_mean"), ("extra.pth", load_model, "extra.weight"),
                                ("old_form.pth", load_model, "pickles a whole object of class test_paper.PaperCDSVAE"),
                                ("judge7.tar", load_judge, "does not fit")):
        with pytest.raises(CheckpointError) as e:
            loader(str(tmp_path / name))
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bench_times_the_paper_step_beside_ours(capsys, monkeypatch):
    import bench
    monkeypatch.setattr(bench, "matmul_peak", lambda device, dtype: 1e9)  # not what this test is about, and slow
    result = bench.main(["--batch_size", "2", "--steps", "1", "--nf", "4", "--device", "cpu", "--threads", "1",
                         "--paper_step"])
    assert result["paper_ms_per_step"] > 0 and result["ms_per_step"] > 0
    ratio = result["paper_ms_per_step"] / result["ms_per_step"]
    assert abs(result["speedup_over_paper_step"] - ratio) < 0.01 * ratio + 0.01
    assert '"speedup_over_paper_step"' in capsys.readouterr().out
