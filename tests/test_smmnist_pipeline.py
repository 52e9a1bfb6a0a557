"""Stochastic Moving MNIST through the shared code: its data file loaded and checked (refusals in one
line), the motion views (the digit swap drawn exactly, the stroke view's known answer, batches that
resume), a tiny C-DSVAE training on it, the judges trained and loaded with its heads, and the scoring
path's known answers with stub models (the digit judged; trajectories measured without a judge; the
R² probe against an independent least-squares fit)."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluation as ev
import make_smmnist as mm
import stubs
from benchmarks import BENCHMARKS
from dataloader import DataError, SpriteBatches, held_out_rows
from judges.networks import MassCrop, load_judge
from probes import probe_r2
from smmnist import (DIGIT, MASS_CENTRE, DigitSwap, Stroke, box_corners, centre_of_mass,
                     judge_videos, load_smmnist, warp_digits)
from test_smmnist import write_mnist

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMMNIST = BENCHMARKS["smmnist"]


@pytest.fixture(scope="module")
def tiny_smmnist(tmp_path_factory):
    """make_smmnist's file of 48 train and 16 test videos, from random 28x28 'digits'."""
    folder = tmp_path_factory.mktemp("mnist")
    write_mnist(folder, n_train=40, n_test=20)
    data = mm.build(str(folder), train_videos=48, test_videos=16)
    path = folder / "data.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path), data


def test_loads_what_make_smmnist_wrote(tiny_smmnist):
    path, data = tiny_smmnist
    loaded = load_smmnist(path)
    for split in ("train", "test"):
        X, Y, P = loaded[split]
        assert X.dtype == torch.uint8 and X.shape[1:] == (8, 64, 64, 1)
        assert torch.equal(X, torch.from_numpy(data[f"X_{split}"]))
        assert torch.equal(Y, torch.from_numpy(data[f"Y_{split}"]))
        assert torch.equal(P, torch.from_numpy(data[f"P_{split}"]))
    digits, labels, I = loaded["train_digits"]
    assert digits.shape == (40, DIGIT, DIGIT) and labels.shape == (40,) and I.shape == (48, 1)
    assert torch.equal(digits, torch.from_numpy(data["digits_train"]))
    assert torch.equal(labels[I], loaded["train"][1])


def _spoiled(data, key, change):
    out = dict(data)
    out[key] = change(np.array(data[key]))
    return out


BAD = [
    ("Y_train", lambda a: a + 10, "Y_train[0, 0] is 1"),
    ("Y_test", lambda a: a.astype(np.float32), "Y_test is float32"),
    ("P_train", lambda a: a - 20, "outside the"),
    ("P_test", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a), "is nan"),
    ("P_train", lambda a: a[::-1].copy(), "do not belong together"),
    ("X_test", lambda a: a[:, :, :32], "expected videos"),
    ("P_test", lambda a: a[:, :4], "expected positions"),
    ("digits_train", lambda a: a[::-1].copy(), "do not belong together"),
    ("digits_train", lambda a: a[:, :28], "expected the train split's digits"),
    ("I_train", lambda a: a + 40, "I_train[0, 0] is not the index of that video's digit"),
    ("digit_labels_train", lambda a: (a + 1) % 10, "is not the index of that video's digit"),
]


@pytest.mark.parametrize("key, change, message", BAD)
def test_refuses_spoiled_files_in_one_line(tiny_smmnist, tmp_path, key, change, message):
    path = tmp_path / "bad.pkl"
    spoiled = _spoiled(tiny_smmnist[1], key, change)
    if key == "Y_train":  # a label out of 0..9 where the first is 1 + 10
        spoiled[key][0, 0] = 11
        message = "Y_train[0, 0] is 11"
    with open(path, "wb") as f:
        pickle.dump(spoiled, f)
    with pytest.raises(DataError) as e:
        load_smmnist(str(path))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "make_smmnist.py" in str(e.value) or message.startswith("expected")


def test_judge_videos_show_every_train_digit_not_held_out_once_an_epoch(tiny_smmnist):
    """Each epoch one new video of each pooled digit, drawn where its positions say, labelled with
    it; the held-out videos' digits never; the same videos for the same (seed, epoch) only."""
    loaded = load_smmnist(tiny_smmnist[0])
    digits, labels, I = loaded["train_digits"]
    held = held_out_rows(loaded["train"][1], 8, 0, SMMNIST.groups)
    pool = sorted(set(range(40)) - set(I[held].flatten().tolist()))

    def epoch(e, seed=0):
        loader = judge_videos(loaded["train_digits"], held, 8, 1, seed, torch.device("cpu"))
        loader.set_epoch(e)
        assert loader.videos == len(loader) == len(pool)
        return list(loader)

    shown = []
    for batch in epoch(0):
        x, P = (batch["x"][0, :, 0] * 255).round().to(torch.uint8), batch["D"][0, :, 0]
        corners = box_corners(P).tolist()
        r, c = corners[0]
        # the fixture's digits are random pixels: one digit of all 40 matches
        match = [j for j in range(40) if torch.equal(x[0, r:r + DIGIT, c:c + DIGIT], digits[j])]
        assert len(match) == 1 and batch["A"][0, 0] == labels[match[0]]
        expected = torch.zeros_like(x)
        for t, (r, c) in enumerate(corners):
            expected[t, r:r + DIGIT, c:c + DIGIT] = digits[match[0]]
        assert torch.equal(x, expected)
        shown += match
    assert sorted(shown) == pool and len(pool) < 40
    again, later, other = epoch(0), epoch(1), epoch(0, seed=1)
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(epoch(0), again))
    assert not all(torch.equal(a["x"], b["x"]) for a, b in zip(again, later))
    assert not all(torch.equal(a["x"], b["x"]) for a, b in zip(again, other))


def test_judges_refuse_a_file_without_the_train_digits_in_one_line(tiny_smmnist, tmp_path):
    path = tmp_path / "old.pkl"
    with open(path, "wb") as f:
        pickle.dump({k: v for k, v in tiny_smmnist[1].items()
                     if k not in ("digits_train", "digit_labels_train")}, f)
    assert "train_digits" not in load_smmnist(str(path))  # the models train on it as before
    r = _run("judges/train_judge.py", "--dataset", "smmnist", "--data_root", str(path),
             "--val_chars", "8", "--out", str(tmp_path / "j.pt"), "--ckpt",
             str(tmp_path / "last.pt"))
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: {path} does not store the train digits, from which the judges make their "
        f"videos; rebuild the file with `python make_smmnist.py --out {path}`"]


def test_refuses_a_missing_file_and_a_sprites_file_naming_the_builder(tmp_path):
    with pytest.raises(DataError, match="python make_smmnist.py --out"):
        load_smmnist(str(tmp_path / "none.pkl"))
    path = tmp_path / "sprites.pkl"
    with open(path, "wb") as f:
        pickle.dump({"X_train": np.zeros((2, 8, 64, 64, 3), np.uint8)}, f)
    with pytest.raises(DataError, match="X_train is uint8 .2, 8, 64, 64, 3., expected videos"):
        load_smmnist(str(path))


def test_digit_swap_draws_the_donor_digit_on_the_video_path(tiny_smmnist):
    X, Y, P = load_smmnist(tiny_smmnist[0])["train"]
    x = X[:12].permute(0, 1, 4, 2, 3).float() / 255
    view = DigitSwap()
    donor = view.draws(12, torch.Generator().manual_seed(0))
    assert not torch.equal(donor, torch.arange(12)) and (donor != torch.arange(12)).all()
    out = view.apply(x, donor, P[:12])
    corners = box_corners(P[:12])
    for i in range(12):
        r0, c0 = corners[donor[i], 0, 0].tolist()
        digit = x[donor[i], 0, 0, r0:r0 + DIGIT, c0:c0 + DIGIT]
        for t in range(8):
            want = torch.zeros(64, 64)
            r, c = corners[i, t, 0].tolist()
            want[r:r + DIGIT, c:c + DIGIT] = digit
            assert torch.equal(out[i, t, 0], want), (i, t)
    assert torch.equal(donor, view.draws(12, torch.Generator().manual_seed(0)))


def test_stroke_view_known_answer():
    x = torch.zeros(2, 3, 1, 64, 64)
    x[:, :, 0, 30, 30] = 1.0
    # video 0 thicker at full level, no blur; video 1 thinner (a lone pixel vanishes) at level 0.5
    draws = torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.5, 0.0]])
    out = Stroke().apply(x, draws)
    want = torch.zeros(64, 64)
    want[29:32, 29:32] = 1.0
    assert torch.equal(out[0, 1, 0], want) and torch.equal(out[1, 2, 0], torch.zeros(64, 64))


def test_warp_reshapes_each_video_s_digit_alike_in_every_frame_and_p_0_is_the_identity(tiny_smmnist):
    X, Y, P = load_smmnist(tiny_smmnist[0])["train"]
    digit = X[0, 0, ..., 0].float() / 255
    r0, c0 = box_corners(P[0, 0, 0]).tolist()
    digit = digit[r0:r0 + DIGIT, c0:c0 + DIGIT]
    # the same digit at three places, in four videos: each video's map follows its digit
    corners = torch.tensor([[8, 8], [20, 12], [24, 24]])  # 8 px from the edges: nothing cut
    x = torch.zeros(4, 3, 1, 64, 64)
    for t, (r, c) in enumerate(corners.tolist()):
        x[:, t, 0, r:r + DIGIT, c:c + DIGIT] = digit
    positions = (corners.float() + MASS_CENTRE)[None, :, None].expand(4, 3, 1, 2)
    assert torch.equal(warp_digits(x, positions, torch.Generator().manual_seed(0), p=0.0), x)
    out = warp_digits(x, positions, torch.Generator().manual_seed(0))
    pad = torch.nn.functional.pad(out, (8, 8, 8, 8))  # the warped digit can leave its box a little
    for i in range(4):
        crops = [pad[i, t, 0, r:r + DIGIT + 16, c:c + DIGIT + 16] for t, (r, c) in enumerate(corners.tolist())]
        assert torch.allclose(crops[0], crops[1], atol=1e-4) and torch.allclose(crops[0], crops[2], atol=1e-4)
        assert crops[0].sum() > 0.999 * out[i, 0].sum()
        assert not torch.allclose(crops[0][8:-8, 8:-8], digit, atol=0.05)  # reshaped
    assert not torch.allclose(out[0], out[1], atol=0.05)  # another map for another video
    assert torch.equal(out, warp_digits(x, positions, torch.Generator().manual_seed(0)))
    # its centre of mass stays near the digit's position, and it keeps most of its ink
    com = centre_of_mass(out[:, 0, 0])
    assert (com - positions[:, 0, 0].double()).norm(dim=-1).max() < 3
    assert ((out.sum((2, 3, 4)) / x.sum((2, 3, 4))) - 1).abs().max() < 0.35


def test_mass_crop_centres_and_enlarges_a_square_wherever_it_is_even_in_noise():
    x = torch.zeros(3, 2, 1, 64, 64)
    x[0, :, 0, 5:15, 40:50] = 1  # a 10 px square, centre (9.5, 44.5)
    x[1, :, 0, 0:10, 54:64] = 1  # in a corner: the window reaches beyond the frame
    x[2, :, 0, 30:40, 10:20] = 1
    x[2, 1, 0] = (x[2, 1, 0] + 0.1 * torch.randn(64, 64, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    out = MassCrop(40)(x)
    assert out.shape == x.shape
    assert torch.allclose(centre_of_mass(out[:2, :, 0]), torch.tensor(31.5, dtype=torch.float64), atol=0.05)
    assert torch.allclose(out[:2].sum((2, 3, 4)), torch.tensor(100 * (64 / 40) ** 2), rtol=0.01)  # 16 px a side
    square = out[0, 0, 0, 25:38, 25:38]  # the 16 px square's inside, away from its interpolated edge
    assert torch.equal(square, torch.ones_like(square))
    noisy = centre_of_mass((out[2, 1, 0] > 0.5).float())
    assert (noisy - 31.5).abs().max() < 1.0  # noise does not pull the window: only mass above half the peak counts
    assert torch.equal(MassCrop(40)(torch.zeros(1, 1, 1, 64, 64)), torch.zeros(1, 1, 1, 64, 64))  # black: no NaN


@pytest.mark.parametrize("view", ["digit", "stroke"])
def test_batches_with_a_motion_view_resume_where_they_stopped(tiny_smmnist, view):
    X, Y, P = load_smmnist(tiny_smmnist[0])["train"]

    def batches(start):
        loader = SpriteBatches(X, Y, P, 8, shuffle=True, augment=True, seed=3,
                               content_view=False, motion_view=SMMNIST.motion_view(view))
        loader.set_epoch(1, start)
        return list(loader)

    whole, resumed = batches(0), batches(3)
    assert len(resumed) == len(whole) - 3
    for a, b in zip(whole[3:], resumed):
        assert all(torch.equal(a[k], b[k]) for k in ("x", "m_aug", "c_aug_order", "index"))
    x, m = whole[0]["x"], whole[0]["m_aug"]
    assert m.shape == x.shape == (8, 8, 1, 64, 64) and not torch.equal(m, x)
    if view == "digit":  # the path is kept: the view's centres of mass are the positions
        error = (centre_of_mass(m[:, :, 0]) - whole[0]["D"][:, :, 0].double()).norm(dim=-1)
        assert error.max() < 2.0


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module")
def tiny_run(tiny_smmnist, tmp_path_factory):
    """A tiny C-DSVAE trained 2 epochs on the tiny file (a snapshot each epoch), and a tiny judge of
    each family: {'run': folder, 'judges': [paths], 'train': the CompletedProcess}."""
    folder = tmp_path_factory.mktemp("smmnist_run")
    train = _run("train_cdsvae.py", "--dataset", "smmnist", "--data_root", tiny_smmnist[0],
                 "--nf", "4", "--g_dim", "8", "--rnn_size", "8", "--f_dim", "8", "--z_dim", "4",
                 "--batch_size", "16", "--nEpoch", "2", "--threads", "1", "--snapshot_every", "1",
                 "--log_dir", str(folder / "run"), "--motion_view", "digit")
    judges = []
    for arch, extra in (("bilstm", ["--g_dim", "8", "--rnn_size", "8"]), ("conv3d", [])):
        out = folder / f"{arch}.pt"
        r = _run("judges/train_judge.py", "--dataset", "smmnist", "--data_root", tiny_smmnist[0],
                 "--arch", arch, "--nf", "4", "--hidden", "8", "--nEpoch", "1", "--batch_size",
                 "16", "--val_chars", "8", "--threads", "1", "--out", str(out), "--ckpt",
                 str(folder / f"{arch}_last.pt"), *extra)
        assert r.returncode == 0, r.stderr
        judges.append(str(out))
    return {"run": folder / "run", "judges": judges, "train": train}


def test_a_tiny_cdsvae_trains_on_smmnist_with_one_channel(tiny_run):
    assert tiny_run["train"].returncode == 0, tiny_run["train"].stderr
    assert "periodic scoring runs on Sprites only for now" in tiny_run["train"].stdout
    rows = [json.loads(line) for line in open(tiny_run["run"] / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [3, 6]
    ckpt = torch.load(tiny_run["run"] / "model.pt", weights_only=True)
    assert ckpt["model_args"]["channels"] == 1 and ckpt["args"]["dataset"] == "smmnist"
    assert ckpt["model"]["encoder.net.0.0.weight"].shape[1] == 1


@pytest.mark.parametrize("script, model", [("run_cdsvae_smmnist.sh", "cdsvae"), ("run_dsvae_smmnist.sh", "dsvae")])
def test_the_smmnist_recipes_train_on_the_data_set_they_name(tiny_smmnist, tmp_path, script, model):
    tiny = ["--nf", "4", "--g_dim", "8", "--rnn_size", "8", "--f_dim", "8", "--z_dim", "4", "--batch_size", "16",
            "--threads", "1", "--max_steps", "2"]
    r = subprocess.run(["bash", os.path.join(ROOT, script), *tiny], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, DATA=tiny_smmnist[0], LOG_DIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-2000:]
    args = torch.load(tmp_path / "model.pt", weights_only=True)["args"]
    assert (args["dataset"], args["model"], args["f_mirror"], args["amp"]) == ("smmnist", model, False, "auto")
    assert args["motion_view"] == ("digit" if model == "cdsvae" else None)


def test_a_view_of_another_data_set_is_refused_in_one_line(tiny_smmnist):
    r = _run("train_cdsvae.py", "--dataset", "smmnist", "--data_root", tiny_smmnist[0],
             "--motion_view", "colour")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --motion_view colour is not a view of Stochastic Moving MNIST: choose one of "
        "digit, stroke (see --help)"]


def test_judges_train_on_smmnist_and_load_only_with_its_heads(tiny_run):
    for path in tiny_run["judges"]:
        saved = torch.load(path, weights_only=True)
        assert saved["heads"] == {"digit": 10} and saved["judge_args"]["channels"] == 1
        assert saved["judge_args"]["crop"] == 40  # the default window, rebuilt by load_judge
        assert saved["dataset"] == "smmnist" and set(saved["robustness"]) >= {"sharp", "blur_1.0"}
        judge = load_judge(path, heads=SMMNIST.heads)
        assert judge(torch.rand(2, 8, 1, 64, 64))["digit"].shape == (2, 10)
        with pytest.raises(Exception, match="a judge of another data set"):
            load_judge(path)  # Sprites' heads


def test_run_test_smmnist_sh_writes_the_figures_the_issue_names(tiny_smmnist, tiny_run, tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, MODEL=str(tiny_run["run"] / "model.pt"), DATA=tiny_smmnist[0],
               OUT=str(out), NITER="2", OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", os.path.join(ROOT, "run_test_smmnist.sh"), "--judge",
                        tiny_run["judges"][0], "--judge", tiny_run["judges"][1], "--threads", "1",
                        "--probe_characters", "24"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "trajectory error" in r.stdout and "R² of positions" in r.stdout
    saved = json.load(open(out))
    assert saved["dataset"] == "smmnist" and saved["niter"] == 2 and len(saved["digit_counts"]) == 10
    for name in ("bilstm", "conv3d"):
        mean = saved["judges"][name]["mean"]
        assert 0 <= mean["fixed_content_digit_acc"] <= 1 and 0 <= mean["swap_digit_acc"] <= 1
        assert len(saved["judges"][name]["runs"]) == 2
    paths = saved["trajectory_error"]
    assert set(paths) >= {"fixed_motion", "swap", "floor", "chance"}
    assert 0 < paths["floor"] < 1 and len(paths["runs"]) == 2
    assert set(saved["probes_r2"]["z"]) == {"positions"} and saved["probes_n"]["train"] == 24


def test_figures_time_to_quality_and_bench_take_smmnist(tiny_smmnist, tiny_run, tmp_path):
    figs = _run("make_figs.py", "--dataset", "smmnist", "--data_root", tiny_smmnist[0],
                "--model_dir", str(tiny_run["run"]), "--out", str(tmp_path / "figs"), "--n_proj",
                "16")
    assert figs.returncode == 0, figs.stderr
    assert "same digit, another path" in open(tmp_path / "figs" / "cosine_similarity.md").read()
    ttq = _run("time_to_quality.py", "--dataset", "smmnist", "--data_root", tiny_smmnist[0],
               "--run", str(tiny_run["run"]), "--out", str(tmp_path / "ttq.png"), "--test_stride",
               "1", "--threads", "1", *[a for j in tiny_run["judges"] for a in ("--judge", j)])
    assert ttq.returncode == 0, ttq.stderr
    curves = json.load(open(tmp_path / "ttq.json"))["curves"]
    assert [len(points) for points in curves.values()] == [2, 2]
    bench = _run("bench.py", "--dataset", "smmnist", "--device", "cpu", "--nf", "4",
                 "--batch_size", "4", "--steps", "1", "--threads", "1")
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout.strip().splitlines()[-1])["dataset"] == "smmnist"


def test_scoring_known_answers_with_stub_models():
    X, Y, P = stubs.painted_smmnist(n=24)
    result = ev.evaluate(stubs.DigitPainter(), {"a": stubs.DigitReader(), "b": stubs.DigitReader()},
                         (X, Y, P), torch.device("cpu"), seeds=(0, 1), batch_size=10, bench=SMMNIST,
                         probe_train=stubs.painted_smmnist(n=40, seed=1))
    for name in ("a", "b"):
        mean = result["judges"][name]["mean"]
        assert mean["real_digit_acc"] == mean["fixed_content_digit_acc"] == 1.0
        assert mean["swap_digit_acc"] == 1.0
    paths = result["trajectory_error"]
    assert paths["fixed_motion"] == paths["swap"] == paths["floor"] == 0.0
    # chance: the swap's paths (those of perm) against another video's, computed on its own
    chance = []
    for seed in (0, 1):
        perm = ev.derangement(24, torch.Generator().manual_seed(seed))
        other = perm[ev.derangement(24, torch.Generator().manual_seed(seed + 1))]
        chance.append((P[perm, :, 0] - P[other, :, 0]).double().norm(dim=-1).mean().item())
    assert paths["chance"] == pytest.approx(sum(chance) / 2, rel=1e-9) and paths["chance"] > 10
    assert [r["seed"] for r in paths["runs"]] == [0, 1]
    assert result["agreement"]["a vs b"]["mean"]["swap_digit"] == 1.0
    assert result["probes"]["f"]["digit"] == 1.0
    assert result["probes_r2"]["z"]["positions"] > 0.99 > 0.1 > result["probes_r2"]["f"]["positions"]


def test_r2_probe_against_an_independent_least_squares_fit():
    g = torch.Generator().manual_seed(0)
    x, x_test = torch.randn(200, 5, generator=g), torch.randn(50, 5, generator=g)
    w = torch.randn(5, 3, generator=g)
    y = x @ w + 0.5 * torch.randn(200, 3, generator=g) + 7
    y_test = x_test @ w + 0.5 * torch.randn(50, 3, generator=g) + 7
    # numpy's least squares on standardised features with an intercept column
    mean, std = x.double().mean(0), x.double().std(0)
    design = np.c_[((x.double() - mean) / std).numpy(), np.ones(200)]
    coef = np.linalg.lstsq(design, y.double().numpy(), rcond=None)[0]
    pred = np.c_[((x_test.double() - mean) / std).numpy(), np.ones(50)] @ coef
    want = 1 - ((pred - y_test.numpy()) ** 2).sum() / ((y_test.numpy() - y_test.numpy().mean(0))
                                                      ** 2).sum()
    assert probe_r2(x, y, x_test, y_test, l2=0.0) == pytest.approx(want, abs=1e-9)
    assert probe_r2(x, torch.randn(200, 2, generator=g), x_test, torch.randn(50, 2, generator=g)) < 0.1


def test_the_positions_are_where_mnist_centres_a_digit():
    assert box_corners(torch.tensor([[MASS_CENTRE, 31 + MASS_CENTRE]])).tolist() == [[0, 31]]
