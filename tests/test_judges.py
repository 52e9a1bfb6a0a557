"""The second judge (model.ClipJudge), the corruptions judges are trained and carded with, several judges in
test_sprite.py and their agreement against a hand computation."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import evaluation as ev
import judges.networks as networks
import test_sprite as ts
from dataloader import FACTORS, factor_labels, gaussian_blur, judge_corrupt, load_sprites, to_float
from judges.networks import JUDGES, SHIPPED_JUDGES, ClipJudge, load_judge
from model import CDSVAE
from utils import for_inference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "judges"))
import train_judge  # noqa: E402

TINY_MODEL = dict(f_dim=8, z_dim=4, g_dim=16, rnn_size=16, nf=8)
TINY_CLIP = dict(nf=4, hidden=16)
TINY_BILSTM = dict(g_dim=16, rnn_size=16, hidden=16, nf=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny models run fastest on one thread


def save_judge(path, arch, args, seed):
    torch.manual_seed(seed)
    judge = JUDGES[arch](**args)
    torch.save({"model": {k: v.half() for k, v in judge.state_dict().items() if v.is_floating_point()}
                | {k: v for k, v in judge.state_dict().items() if not v.is_floating_point()},
                "arch": arch, "judge_args": args, "heads": dict(FACTORS)}, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tiny_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("judges")
    torch.manual_seed(0)
    model_path = str(d / "model.pt")
    torch.save({"model": CDSVAE(**TINY_MODEL).state_dict(), "model_args": dict(TINY_MODEL, frames=8)}, model_path)
    return {"model": model_path, "data": tiny_data, "dir": d,
            "bilstm": save_judge(d / "first.pt", "bilstm", TINY_BILSTM, 1),
            "conv3d": save_judge(d / "second.pt", "conv3d", TINY_CLIP, 2)}


def test_clip_judge_shapes_and_family():
    judge = ClipJudge(nf=8, hidden=32).eval()
    out = judge(torch.rand(3, 8, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (3, n) for k, n in FACTORS.items()}
    # another family than SpriteJudge: 3D convolutions over the clip, no recurrence, no per-frame encoder
    kinds = {type(m) for m in judge.modules()}
    assert torch.nn.Conv3d in kinds and not kinds & {torch.nn.LSTM, torch.nn.RNN, torch.nn.Conv2d}
    # it sees time: reversing the frames changes its output (a per-frame average would not)
    x = torch.rand(2, 8, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(judge(x)["action"], judge(x.flip(1))["action"], atol=1e-4)


def test_gaussian_blur_against_a_direct_2d_convolution():
    torch.manual_seed(0)
    x = torch.rand(3, 2, 3, 20, 20)
    sigma = torch.tensor([0.0, 0.7, 1.5])
    got = gaussian_blur(x, sigma)
    assert torch.equal(got[0], x[0])  # sigma 0: unchanged
    radius = math.ceil(3 * 1.5)  # the kernel is cut at 3 sigma of the largest
    for i in (1, 2):
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k1 = torch.exp(-t ** 2 / (2 * sigma[i] ** 2))
        k2 = (k1[:, None] * k1[None]) / k1.sum() ** 2
        ref = F.conv2d(F.pad(x[i].reshape(-1, 1, 20, 20), (radius,) * 4, mode="reflect"), k2[None, None])
        torch.testing.assert_close(got[i], ref.view_as(x[i]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.mean(dim=(-1, -2)), x.mean(dim=(-1, -2)), atol=0.02, rtol=0)


def test_judge_corrupt_blurs_and_noises_some_videos_only():
    x = torch.rand(64, 2, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    y = judge_corrupt(x, g)
    changed = (y - x).flatten(1).abs().amax(1) > 0
    assert 0.5 < changed.float().mean() < 0.95  # 1 - 0.5 * 0.5 of the videos are touched on average
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(judge_corrupt(x, g, p_blur=0, p_noise=0), x)


def test_agreement_against_a_hand_computation():
    a = {"action": torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]]),
         "skin": torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])}
    b = {"action": torch.tensor([[0.7, 0.3], [0.9, 0.1], [0.1, 0.9], [0.4, 0.6]]),
         "skin": torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])}
    # action: predictions 0,1,0,1 vs 0,0,1,1 -> 2 of 4 match; skin: 0,0,0,0 vs 0,1,0,1 -> 2 of 4
    assert ev.agreement(a, b) == {"action": 0.5, "skin": 0.5}
    assert ev.agreement(a, a) == {"action": 1.0, "skin": 1.0}
    assert ev.judge_pairs(["x", "y", "z"]) == [("x", "y"), ("x", "z"), ("y", "z")]


def test_two_judges_scored_and_their_agreement(files, tmp_path, capsys):
    """Every figure under each judge, and the agreement equal to what the two judges say on the same videos."""
    out = tmp_path / "r.json"
    result = ts.main(["--model_dir", files["model"], "--judge", files["bilstm"], "--judge", files["conv3d"],
                      "--data_root", files["data"], "--niter", "2", "--device", "cpu", "--out", str(out)])
    text = capsys.readouterr().out
    assert "agreement of the judges first vs second" in text
    assert list(result["judges"]) == ["first", "second"] and list(result["agreement"]) == ["first vs second"]
    for name in ("first", "second"):
        assert {"A_action_acc", "B_attr_mean_acc", "swap_action_acc", "real_action_acc"} <= set(result["judges"][name]["mean"])
    agree = result["agreement"]["first vs second"]
    assert {f"{kind}_{h}" for kind in ("A", "B", "swap", "real") for h in FACTORS} == set(agree["mean"])  # no Bs
    # the real videos' agreement recomputed from the two judges directly
    X = load_sprites(files["data"])["test"][0]
    j1, j2 = load_judge(files["bilstm"]), load_judge(files["conv3d"])
    with torch.inference_mode():
        p1, p2 = j1(to_float(X)), j2(to_float(X))
    for h in FACTORS:
        want = (p1[h].argmax(1) == p2[h].argmax(1)).double().mean().item()
        assert agree["mean"][f"real_{h}"] == pytest.approx(want)
    saved = json.loads(out.read_text())
    assert saved["judge_files"]["second"]["arch"] == "conv3d" and saved["judge_files"]["first"]["arch"] == "bilstm"


def test_both_shipped_judges_are_the_default(files, monkeypatch):
    seen = []
    real_load = networks.load_judge
    monkeypatch.setattr(ts, "load_judge", lambda path, device="cpu", heads=None: seen.append(path) or real_load(files["conv3d"], device, heads))
    ts.main(["--model_dir", files["model"], "--data_root", files["data"], "--niter", "1", "--device", "cpu",
             "--type_gt", "action", "--out", str(files["dir"] / "d.json")])
    assert seen == list(SHIPPED_JUDGES) == ["judges/sprite_judge.pt", "judges/clip_judge.pt"]


def test_a_wrong_or_missing_second_judge_is_one_line(files, tmp_path):
    bad_arch = tmp_path / "alien.pt"
    torch.save({"model": {}, "arch": "transformer", "judge_args": {}, "heads": dict(FACTORS)}, bad_arch)
    misfit = tmp_path / "misfit.pt"  # conv3d weights saved as if they were a BiLSTM judge
    ck = torch.load(files["conv3d"], weights_only=True)
    torch.save({**ck, "arch": "bilstm", "judge_args": TINY_BILSTM}, misfit)
    base = ["--model_dir", files["model"], "--data_root", files["data"], "--device", "cpu",
            "--out", str(tmp_path / "r.json"), "--judge", files["bilstm"]]
    cases = [(str(tmp_path / "none.pt"), "no checkpoint at"), (files["model"], "is not a judge"),
             (str(bad_arch), "which this code does not know"), (str(misfit), "does not fit SpriteJudge"),
             (files["bilstm"], "share one")]
    for second, message in cases:
        with pytest.raises(SystemExit) as e:
            ts.main(base + ["--judge", second])
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code), e.value.code
        assert "\n" not in str(e.value.code)


def test_train_judge_conv3d_writes_its_arch_and_robustness_card(files, tmp_path):
    out = str(tmp_path / "clip.pt")
    train_judge.main(["--arch", "conv3d", "--data_root", files["data"], "--out", out, "--nEpoch", "1",
                      "--batch_size", "16", "--nf", "4", "--hidden", "16", "--val_chars", "2", "--threads", "1",
                      "--ckpt", str(tmp_path / "last.pt")])
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["arch"] == "conv3d" and ckpt["judge_args"] == TINY_CLIP
    assert isinstance(load_judge(out), ClipJudge)
    card = ckpt["robustness"]
    assert list(card) == ["sharp", "blur_0.7", "blur_1.0", "blur_1.5", "noise_0.05", "noise_0.1"]
    assert all(set(v) == set(FACTORS) and all(0 <= a <= 1 for a in v.values()) for v in card.values())
    assert card["sharp"] == ckpt["test_accuracy"]  # the card's sharp row is the test accuracy, measured alike
    # --card_only recomputes the same card into a judge file that had none, weights untouched
    bare = str(tmp_path / "bare.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "robustness"}, bare)
    train_judge.main(["--card_only", "--out", bare, "--data_root", files["data"], "--threads", "1"])
    again = torch.load(bare, weights_only=True)
    assert again["robustness"] == card
    assert all(torch.equal(again["model"][k], v) for k, v in ckpt["model"].items())


@pytest.mark.parametrize("path", SHIPPED_JUDGES)
def test_shipped_judges_are_right_on_real_videos_and_carded(path, tiny_data):
    path = os.path.join(ROOT, path)
    assert os.path.getsize(path) <= 25e6
    ckpt = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    assert min(ckpt["test_accuracy"].values()) >= 0.999
    assert set(ckpt["robustness"]) >= {"blur_0.7", "blur_1.0", "blur_1.5", "noise_0.05", "noise_0.1"}
    judge = load_judge(path)
    X, A, D = load_sprites(tiny_data)["test"]
    with torch.inference_mode():
        out = judge(to_float(X))
    for k, y in factor_labels(A, D).items():
        assert torch.equal(out[k].argmax(1), y), k


def test_for_inference_keeps_the_clip_judge_outputs():
    torch.manual_seed(0)
    judge = ClipJudge(**TINY_CLIP)
    for m in judge.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    judge.eval()
    x = torch.rand(2, 8, 3, 64, 64)
    with torch.inference_mode():
        ref = judge(x)
        fast = for_inference(judge)
        assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fast.modules())
        got = fast(x)
    for k in FACTORS:
        torch.testing.assert_close(got[k], ref[k], atol=1e-4, rtol=1e-3)


def test_time_to_quality_scores_each_snapshot_at_its_minutes(files, tmp_path, capsys):
    import time_to_quality as ttq
    run = tmp_path / "run"
    run.mkdir()
    for epoch in (1, 2, 10):
        torch.save(torch.load(files["model"], weights_only=True), run / f"epoch_{epoch}.pt")
    (run / "epoch_x.pt").write_bytes(b"")  # not a snapshot name: ignored
    with open(run / "metrics.jsonl", "w") as f:
        for epoch in range(1, 11):
            f.write(json.dumps({"epoch": epoch, "seconds": 30.0 * epoch}) + "\n")
    assert [e for e, _ in ttq.snapshots(str(run))] == [1, 2, 10]
    assert ttq.epoch_minutes(run / "metrics.jsonl")[2] == pytest.approx(1.5)  # (30 + 60) s
    assert ttq.first_reaching([(1, 0.5), (2, 0.96), (3, 0.94)], 0.95) == 2
    assert ttq.first_reaching([(1, 0.5)], 0.9) is None
    ttq.main(["--run", str(run), "--out", str(tmp_path / "ttq.png"), "--judge", files["bilstm"], "--judge",
              files["conv3d"], "--data_root", files["data"], "--test_stride", "2", "--device", "cpu"])
    saved = json.loads((tmp_path / "ttq.json").read_text())
    assert (tmp_path / "ttq.png").stat().st_size > 0
    assert saved["n_test"] == 9  # 18 test videos, every 2nd
    assert [m for m, _ in saved["curves"]["first"]] == pytest.approx([0.5, 1.5, 27.5])
    # the same snapshot scores the same under a judge, whatever its epoch
    accs = [a for _, a in saved["curves"]["second"]]
    assert accs[0] == accs[1] == accs[2]
    ttq.main(["--run", str(run), "--out", str(tmp_path / "some.png"), "--judge", files["bilstm"], "--data_root",
              files["data"], "--test_stride", "2", "--device", "cpu", "--epochs", "10", "1"])
    some = json.loads((tmp_path / "some.json").read_text())
    assert [m for m, _ in some["curves"]["first"]] == pytest.approx([0.5, 27.5])  # epochs 1 and 10, in order
    with pytest.raises(SystemExit) as e:
        ttq.main(["--run", str(run), "--data_root", files["data"], "--epochs", "3"])
    assert "no snapshot of epoch(s) [3]" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        ttq.main(["--run", str(tmp_path), "--data_root", files["data"]])
    assert "no epoch_<N>.pt snapshots" in str(e.value.code)
