"""The latent probes (probes.py) against known answers: the stub model whose f carries only the
attributes and z only the action, mix-ups of f and z, of train and test, of means and samples; a model
that is not CDSVAE scored by the same evaluation; and the probe table of test_sprite.py."""
import json
import math
import pickle

import pytest
import torch
from torch import nn

import stubs
import test_sprite as ts
from dataloader import character_id
from evaluation import evaluate
from judges.networks import JUDGES
from model import CDSVAE
from probes import PROBE_FACTORS, probe_accuracy, probe_labels, probe_table

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny problems

ATTRIBUTES = ("skin", "pant", "top", "hair")
MOTION = ("action", "action_type", "direction")
CPU = torch.device("cpu")
# Where a latent does not carry a factor, a probe of the balanced test set scores its chance exactly
# (stubs.balanced_test_set); where the reading is a random draw (posterior samples), within this much
# of it: about 2.5 standard deviations of an accuracy over 36 characters.
SAMPLED_CHANCE_TOLERANCE = 0.15


def chance(factor):
    return 1 / PROBE_FACTORS[factor]


@pytest.fixture(scope="module")
def train_set():
    """40 painted characters of random attributes, every attribute value among them."""
    X, A, D = stubs.painted_test_set(n_characters=40, seed=1)
    assert all(len(A[:, i].unique()) == 6 for i in range(4))
    return X, A, D


def probes_of(model, train, test):
    return evaluate(model, {"reader": stubs.LabelReader()}, test, CPU, seeds=(0,), batch_size=50,
                    probe_train=train)


def test_a_linear_probe_is_fitted_on_train_and_scored_on_test():
    """A rule that holds on the train features and is reversed on the test features reads 0%; fitted
    on the test set or scored on the train set, it would read 100%."""
    g = torch.Generator().manual_seed(0)
    x_train, x_test = torch.randn(200, 3, generator=g), torch.randn(120, 3, generator=g)
    x_train[:, 0] += x_train[:, 0].sign()  # the sign of feature 0, 1 away from the boundary
    x_test[:, 0] += x_test[:, 0].sign()
    y_train, y_test = (x_train[:, 0] > 0).long(), (x_test[:, 0] > 0).long()
    assert probe_accuracy(x_train, y_train, x_test, y_test, 2) == 1.0
    assert probe_accuracy(x_train, y_train, x_test, 1 - y_test, 2) == 0.0
    assert probe_accuracy(x_train, 1 - y_train, x_test, y_test, 2) == 0.0
    # deterministic, and blind to a constant feature
    x_const = torch.cat([x_train, torch.full((200, 1), 7.0)], 1)
    x_const_test = torch.cat([x_test, torch.full((120, 1), -3.0)], 1)
    assert probe_accuracy(x_const, y_train, x_const_test, y_test, 2) == 1.0


def test_probe_labels_split_the_action():
    A = torch.tensor([[0, 1, 2, 3], [5, 4, 3, 2]])
    D = torch.tensor([4, 8])  # spellcard-left, slash-right
    labels = probe_labels(A, D)
    assert list(labels) == list(PROBE_FACTORS)
    assert labels["action_type"].tolist() == [1, 2] and labels["direction"].tolist() == [1, 2]
    assert labels["action"].tolist() == [4, 8] and labels["pant"].tolist() == [1, 4]
    assert PROBE_FACTORS == {"action": 9, "action_type": 3, "direction": 3, "skin": 6, "pant": 6,
                             "top": 6, "hair": 6}


def test_probes_read_what_each_latent_carries(train_set):
    """stubs.LabelCoder: f holds the attributes only, z the action only. Every carried factor reads
    100%, every other one exactly its chance, from the means and from the samples (a tiny
    variance) alike; a mix-up of f and z would swap the rows."""
    result = probes_of(stubs.LabelCoder(), train_set, stubs.balanced_test_set())
    assert result["probes_chance"] == {k: pytest.approx(chance(k)) for k in PROBE_FACTORS}
    assert result["probes_n"] == {"train": 360, "test": 324}
    for key in ("probes", "probes_sampled"):
        f, z = result[key]["f"], result[key]["z"]
        assert list(f) == list(z) == list(PROBE_FACTORS)
        assert {k: f[k] for k in ATTRIBUTES} == {k: 1.0 for k in ATTRIBUTES}, key
        assert {k: z[k] for k in MOTION} == {k: 1.0 for k in MOTION}, key
        assert {k: f[k] for k in MOTION} == {k: pytest.approx(chance(k), abs=1e-12) for k in MOTION}
        assert {k: z[k] for k in ATTRIBUTES} == {k: pytest.approx(chance(k), abs=1e-12)
                                                 for k in ATTRIBUTES}
    # the judge's figures are as without the probes
    assert result["judges"]["reader"]["mean"]["swap_attr_mean_acc"] == 1.0


def test_probes_are_fitted_on_the_train_videos_and_scored_on_the_test_videos(train_set):
    """Train videos whose hair label is reversed (5 - the hair they show): the probe learns the
    reversed rule, which is wrong on every test video. Fitted on the test videos, or scored on the
    train videos, it would read 100%."""
    X, A, D = train_set
    reversed_hair = A.clone()
    reversed_hair[:, 3] = 5 - A[:, 3]
    result = probes_of(stubs.LabelCoder(), (X, reversed_hair, D), stubs.balanced_test_set())
    for key in ("probes", "probes_sampled"):
        assert result[key]["f"]["hair"] == 0.0
        assert result[key]["f"]["skin"] == 1.0 and result[key]["z"]["action"] == 1.0


def test_samples_lose_what_only_the_mean_carries(train_set):
    """stubs.TopOnlyInMean: the top is in f's mean under a standard deviation of 1000. The means
    read it (100%), one sample per video does not (chance, within SAMPLED_CHANCE_TOLERANCE); the
    other attributes, of tiny variance, read 100% from both."""
    result = probes_of(stubs.TopOnlyInMean(), train_set, stubs.balanced_test_set())
    assert result["probes"]["f"]["top"] == 1.0
    assert abs(result["probes_sampled"]["f"]["top"] - chance("top")) <= SAMPLED_CHANCE_TOLERANCE
    for a in ("skin", "pant", "hair"):
        assert result["probes"]["f"][a] == result["probes_sampled"]["f"][a] == 1.0
    again = probes_of(stubs.TopOnlyInMean(), train_set, stubs.balanced_test_set())
    assert again["probes_sampled"] == result["probes_sampled"]  # one sample, a fixed seed


class BlockAverages(nn.Module):
    """A model that is not CDSVAE, with only the interface evaluation.evaluate needs: f is the 8 x
    8-pixel block averages of the video's second frame, z_t each frame's block averages minus f,
    decode(z, f) paints each block with f + z_t; its prior path is N(0, I). Log-variances (of the
    posterior, of variance 0, for the sampled probes) only with_logvar."""

    def __init__(self, with_logvar=False):
        super().__init__()
        self.with_logvar = with_logvar

    def encode(self, x, random=False):
        blocks = nn.functional.avg_pool2d(x.flatten(0, 1), 8).view(len(x), x.shape[1], -1)
        f = blocks[:, 1]
        post = {"f_mean": f, "z_mean": blocks - f[:, None]}
        if self.with_logvar:
            post.update(f_logvar=torch.full_like(f, -math.inf), z_logvar=torch.full_like(blocks, -math.inf))
        return post

    def decode(self, z, f):
        blocks = (z + f[:, None]).view(len(z), z.shape[1], 3, 8, 8)
        return nn.functional.interpolate(blocks.flatten(0, 1), scale_factor=8).view(
            len(z), z.shape[1], 3, 64, 64)

    def sample_z_prior(self, n, frames=None, like=None):
        means = torch.zeros(n, frames, like.shape[-1], dtype=like.dtype, device=like.device)
        return means, torch.randn_like(means)


@pytest.mark.parametrize("with_logvar", [False, True])
def test_any_model_is_scored_by_the_same_evaluation(train_set, with_logvar):
    """BlockAverages keeps the painted (still) videos whole in f and nothing in z: the judge reads
    every real video and every swap's attributes right, the probes read every factor from f well
    above chance and exactly chance from z; without log-variances there are no sampled probes."""
    model = BlockAverages(with_logvar)
    assert not isinstance(model, CDSVAE)
    result = evaluate(model, {"reader": stubs.LabelReader()}, stubs.balanced_test_set(), CPU,
                      seeds=(0, 1), batch_size=64, sampled_b=True, probe_train=train_set)
    mean = result["judges"]["reader"]["mean"]
    assert mean["real_action_acc"] == mean["real_attr_mean_acc"] == mean["swap_attr_mean_acc"] == 1
    assert 0 < result["recon_mse_per_pixel"] < 1e-3  # the one bright pixel of each video, averaged
    # each label is one block's intensity in f, which a linear probe separates only in part
    assert all(result["probes"]["f"][k] > chance(k) + 0.2 for k in PROBE_FACTORS)
    assert result["probes"]["z"] == {k: pytest.approx(chance(k), abs=1e-12) for k in PROBE_FACTORS}
    # a posterior of no variance: its samples are its means
    assert result.get("probes_sampled") == (result["probes"] if with_logvar else None)


def test_probe_table_without_log_variances_has_no_samples():
    post = {"f": torch.randn(20, 4), "z": torch.randn(20, 8, 2)}
    labels = probe_labels(torch.randint(0, 6, (20, 4)), torch.arange(20) % 9)
    table = probe_table(post, post, labels, labels)
    assert set(table) == {"probes", "probes_chance"}


# ---- test_sprite.py ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(train_set, tmp_path_factory):
    """A painted data.pkl (40 train, 36 test characters), a tiny CDSVAE checkpoint and a tiny judge."""
    d = tmp_path_factory.mktemp("probes")
    test = stubs.balanced_test_set()
    data = {f"{k}_{split}": v.numpy() for split, s in (("train", train_set), ("test", test))
            for k, v in zip("XAD", s)}
    with open(d / "data.pkl", "wb") as fh:
        pickle.dump(data, fh)
    torch.manual_seed(0)
    sizes = dict(f_dim=8, z_dim=4, g_dim=16, rnn_size=16, nf=8)
    model = stubs.spread_init(CDSVAE(**sizes))
    torch.save({"model": model.state_dict(), "model_args": dict(sizes, frames=8)}, d / "model.pt")
    judge_args = dict(g_dim=16, rnn_size=16, hidden=16, nf=8)
    judge = JUDGES["bilstm"](**judge_args)
    torch.save({"model": judge.state_dict(), "arch": "bilstm", "judge_args": judge_args,
                "heads": dict(stubs.JUDGE_HEADS)}, d / "judge.pt")
    return d


def test_test_sprite_prints_and_writes_the_probes(files, train_set, capsys):
    argv = ["--model_dir", str(files / "model.pt"), "--judge", str(files / "judge.pt"),
            "--data_root", str(files / "data.pkl"), "--niter", "1", "--device", "cpu",
            "--test_stride", "2", "--probe_characters", "20", "--out", str(files / "r.json")]
    result = ts.main(argv)
    text = capsys.readouterr().out
    assert "latent probes" in text and "z, posterior samples" in text
    saved = json.loads((files / "r.json").read_text())
    chosen = ts.probe_videos(train_set, 20)  # the videos of 20 of the 40 train characters' ids
    assert len(torch.unique(character_id(chosen[1]))) == 20 and len(chosen[0]) < len(train_set[0])
    assert result["probes_n"] == saved["probes_n"] == {"train": len(chosen[0]), "test": 162}
    for key in ("probes", "probes_sampled"):
        assert saved[key] == result[key]  # floats round-trip through JSON exactly
        assert set(saved[key]) == {"f", "z"} and set(saved[key]["f"]) == set(PROBE_FACTORS)
        assert all(0 <= v <= 1 for row in saved[key].values() for v in row.values())
    assert saved["probe_characters"] == 20
    again = ts.main(argv)
    capsys.readouterr()
    assert again["probes"] == result["probes"] and again["probes_sampled"] == result["probes_sampled"]
    off = ts.main(argv + ["--no-probes"])
    assert not {"probes", "probes_sampled", "probes_chance"} & set(off)
    assert "latent probes" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        ts.main(argv[:-2] + ["--probe_characters", "0", "--out", str(files / "r.json")])
    assert str(e.value.code).startswith("error: ") or e.value.code == 2
