"""Bad content is refused, not only bad form: data values, weights that are not finite, a model
whose outputs are not finite, a folder or results file already in use, and numbers and side files
that parse but mean nothing. Each refusal: one line, non-zero exit, no traceback, nothing
written."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import dataloader
import test_sprite
import time_to_quality
import train_cdsvae
import utils
from dataloader import DataError, load_sprites
from judges.networks import SpriteJudge
from model import CDSVAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(f_dim=8, z_dim=4, g_dim=16, rnn_size=16, nf=8)
TINY_JUDGE = dict(g_dim=16, rnn_size=16, hidden=16, nf=8)
TINY_FLAGS = ["--f_dim", "8", "--z_dim", "4", "--g_dim", "16", "--rnn_size", "16", "--nf", "8",
              "--batch_size", "2", "--threads", "1", "--device", "cpu", "--evl_interval", "0"]
TWO_EPOCHS = '{"epoch": 1, "seconds": 60}\n{"epoch": 2, "seconds": 60}\n'  # a metrics.jsonl


def our_data(n=4, seed=0):
    """A data set of our format, n random videos a split."""
    g = np.random.default_rng(seed)
    return {f"{k}_{s}": v for s in ("train", "test") for k, v in (
        ("X", g.integers(0, 256, (n, 8, 64, 64, 3), dtype=np.uint8)),
        ("A", g.integers(0, 6, (n, 4))), ("D", g.integers(0, 9, n)))}


def paper_data(n=4):
    """The same videos in the paper repo's format: floats in [0, 1], one-hot labels per frame."""
    ours, paper = our_data(n), {}
    for s in ("train", "test"):
        paper[f"X_{s}"] = ours[f"X_{s}"].astype(np.float32) / 255
        paper[f"A_{s}"] = np.repeat(np.eye(6, dtype=np.float32)[ours[f"A_{s}"]][:, None], 8, axis=1)
        paper[f"D_{s}"] = np.repeat(np.eye(9, dtype=np.float32)[ours[f"D_{s}"]][:, None], 8, axis=1)
    return paper


def dump(data, path):
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return str(path)


def refused_in_one_line(r, *words):
    """r, a finished CLI, refused: non-zero, one line on stderr starting 'error: ', no traceback."""
    assert r.returncode != 0, r.stdout[-2000:]
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-3000:]
    for w in words:
        assert w in r.stderr, r.stderr


def run(*argv):
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good tiny model, judge and data file; a judge with an inf weight; a model of finite weights
    whose outputs are NaN (a decoder BatchNorm's running variance below 0)."""
    d = tmp_path_factory.mktemp("content")
    torch.manual_seed(0)
    model = CDSVAE(**TINY_MODEL)
    torch.save({"model": model.state_dict(), "model_args": TINY_MODEL}, d / "model.pt")
    judge = SpriteJudge(**TINY_JUDGE).state_dict()
    torch.save({"model": judge, "judge_args": TINY_JUDGE}, d / "judge.pt")
    judge["heads.pant.2.bias"][3] = float("inf")
    torch.save({"model": judge, "judge_args": TINY_JUDGE}, d / "inf_judge.pt")
    state = model.state_dict()
    state["decoder.net.1.running_var"][:] = -1.0
    assert utils.first_not_finite(state) is None
    torch.save({"model": state, "model_args": TINY_MODEL}, d / "nan_outputs.pt")
    return {"data": dump(our_data(), d / "data.pkl"), "model": d / "model.pt",
            "judge": d / "judge.pt", "inf_judge": d / "inf_judge.pt",
            "nan_outputs": d / "nan_outputs.pt"}


# ---- data content --------------------------------------------------------------------------------
def spoil(data, kind):
    """data with one kind of bad content; the words its refusal must hold."""
    X, A = data["X_train"], data["A_train"]
    if kind == "int64 images":
        data["X_train"] = X.astype(np.int64) * 4
        return "X_train holds int64 images"
    if kind == "floats of 0..255":
        data["X_train"] = X.astype(np.float32)
        return "X_train[0, 0, 0, 0, "
    if kind == "a NaN pixel":
        data["X_test"] = data["X_test"].astype(np.float32) / 255
        data["X_test"][2, 5, 6, 7, 1] = np.nan
        return "X_test[2, 5, 6, 7, 1] is nan"
    if kind == "an inf pixel":
        data["X_train"] = X.astype(np.float64) / 255
        data["X_train"][3, 0, 0, 1, 2] = -np.inf
        return "X_train[3, 0, 0, 1, 2] is -inf"
    if kind == "uint8 of 0/1":
        data["X_train"] = (X > 127).astype(np.uint8)
        return "every pixel of X_train is 0 or 1"
    if kind == "floats divided twice":
        data["X_train"] = X.astype(np.float32) / 255 / 255
        return "every pixel of X_train is 0 or 1"
    if kind == "no videos":
        for k in ("X", "A", "D"):
            data[f"{k}_test"] = data[f"{k}_test"][:0]
        return "X_test holds no videos"
    if kind == "float labels":
        data["A_train"] = A + 0.5
        return "A_train holds float64 labels"
    if kind == "a label out of range":
        data["A_test"][1, 2] = 6
        return "A_test[1, 2] is 6, out of range"
    if kind == "a negative action":
        data["D_train"][3] = -1
        return "D_train[3] is -1, out of range"
    paper = paper_data()
    data.update(paper)
    if kind == "one-hot of 0.5s":
        paper["D_test"][1, 4] = 0.5
        return "D_test[1, 4] is not one-hot"
    if kind == "one-hot of two 1s":
        paper["A_train"][2, 0, 3] = 1
        return "A_train[2, 0, 3] is not one-hot"
    if kind == "frames that disagree":
        paper["D_train"][1, 6] = np.roll(paper["D_train"][1, 6], 1)
        return "the frames of video 1 of D_train have different labels"
    assert kind == "one-hot of 7 classes"
    data["A_test"] = np.concatenate([paper["A_test"], np.zeros((4, 8, 4, 1), np.float32)], -1)
    return "A_test has shape (4, 8, 4, 7)"


BAD_DATA = ["int64 images", "floats of 0..255", "a NaN pixel", "an inf pixel", "uint8 of 0/1",
            "floats divided twice", "no videos", "float labels", "a label out of range",
            "a negative action", "one-hot of 0.5s", "one-hot of two 1s", "frames that disagree",
            "one-hot of 7 classes"]


@pytest.mark.parametrize("kind", BAD_DATA)
def test_data_of_bad_content_is_refused_in_one_line_naming_where(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(dataloader, "_CHECK_VIDEOS", 2)  # video 3's bad pixel: in the 2nd chunk
    data = our_data()
    words = spoil(data, kind)
    path = dump(data, tmp_path / "data.pkl")
    with pytest.raises(DataError) as e:
        load_sprites(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message


def test_the_paper_format_in_chunks_is_our_format_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setattr(dataloader, "_CHECK_VIDEOS", 3)  # 4 videos: a whole chunk and a part of one
    ours = load_sprites(dump(our_data(), tmp_path / "ours.pkl"))
    paper = load_sprites(dump(paper_data(), tmp_path / "paper.pkl"))
    for split in ("train", "test"):
        for a, b in zip(ours[split], paper[split]):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("script", ["train_cdsvae.py", "test_sprite.py"])
def test_a_script_refuses_bad_data_and_writes_nothing(files, tmp_path, script):
    data = our_data()
    data["X_test"] = data["X_test"].astype(np.float32)  # a /255 forgotten
    bad = dump(data, tmp_path / "data.pkl")
    if script == "train_cdsvae.py":
        r = run(script, *TINY_FLAGS, "--data_root", bad, "--log_dir", tmp_path / "run")
    else:
        r = run(script, "--model_dir", files["model"], "--judge", files["judge"], "--data_root",
                bad, "--device", "cpu", "--out", tmp_path / "out" / "r.json")
    refused_in_one_line(r, bad, "X_test[0, 0, 0, 0, ", "must be finite and in [0, 1]")
    assert os.listdir(tmp_path) == ["data.pkl"]


# ---- weights content -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_read_checkpoint_names_the_first_tensor_that_is_not_finite(tmp_path, dtype):
    good = {"model": {"w": torch.ones(3, dtype=dtype), "n": torch.tensor([2 ** 40])},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0),
                                        "exp_avg": torch.zeros(3, dtype=dtype)}}},
            "rng_cpu": [torch.zeros(8, dtype=torch.uint8)], "history": [{"loss": 1.0}]}
    torch.save(good, tmp_path / "good.pt")
    assert utils.read_checkpoint(str(tmp_path / "good.pt"))["history"] == [{"loss": 1.0}]
    good["optimizer"]["state"][0]["exp_avg"][1] = float("nan")
    torch.save(good, tmp_path / "bad.pt")
    with pytest.raises(utils.CheckpointError) as e:
        utils.read_checkpoint(str(tmp_path / "bad.pt"))
    assert str(e.value) == (f"{tmp_path / 'bad.pt'} holds NaN or infinite values in "
                            f"optimizer.state.0.exp_avg: the run that wrote it diverged or the "
                            f"file is damaged; use an earlier checkpoint")


def nan_in(path, out, key="model"):
    """A copy of checkpoint `path` at `out`, a NaN in the first float tensor of ckpt[key]."""
    ckpt = torch.load(path, weights_only=True)
    name = next(k for k, v in ckpt[key].items() if v.is_floating_point())
    ckpt[key][name].view(-1)[0] = float("nan")
    torch.save(ckpt, out)
    return f"{key}.{name}"


@pytest.mark.parametrize("door", ["test_sprite.py --model_dir", "test_sprite.py --judge",
                                  "export_checkpoint.py"])
def test_weights_that_are_not_finite_are_refused_at_every_door(files, tmp_path, door):
    bad = tmp_path / "bad.pt"
    if door == "test_sprite.py --judge":
        bad.write_bytes(files["inf_judge"].read_bytes())
        key = "model.heads.pant.2.bias"
        argv = ["test_sprite.py", "--model_dir", files["model"], "--judge", bad]
    else:
        key = nan_in(files["model"], bad)
        argv = (["test_sprite.py", "--model_dir", bad, "--judge", files["judge"]]
                if "test_sprite" in door else ["export_checkpoint.py", bad, tmp_path / "ship.pt"])
    if argv[0] == "test_sprite.py":
        argv += ["--data_root", files["data"], "--device", "cpu", "--out", tmp_path / "r.json"]
    refused_in_one_line(run(*argv), f"{bad} holds NaN or infinite values in {key}")
    assert os.listdir(tmp_path) == ["bad.pt"]


def test_resume_refuses_a_checkpoint_whose_optimizer_state_is_not_finite(files, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = CDSVAE(**TINY_MODEL)
    optimizer = torch.optim.Adam(model.parameters())
    state = {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2),
                 "exp_avg_sq": torch.full((2,), np.inf)}}
    torch.save({"model": model.state_dict(), "model_args": TINY_MODEL,
                "optimizer": {"state": state,
                              "param_groups": optimizer.state_dict()["param_groups"]}},
               run_dir / "model.pt")
    before = (run_dir / "model.pt").read_bytes()
    r = run("train_cdsvae.py", *TINY_FLAGS, "--data_root", files["data"], "--log_dir", run_dir,
            "--resume")
    refused_in_one_line(r, "cannot resume", "optimizer.state.0.exp_avg_sq")
    assert os.listdir(run_dir) == ["model.pt"] and (run_dir / "model.pt").read_bytes() == before


# ---- generated content ---------------------------------------------------------------------------
def test_a_model_whose_outputs_are_not_finite_is_not_scored(files, tmp_path):
    out = tmp_path / "r.json"
    r = run("test_sprite.py", "--model_dir", files["nan_outputs"], "--judge", files["judge"],
            "--data_root", files["data"], "--device", "cpu", "--niter", "1", "--out", out)
    refused_in_one_line(r, f"{files['nan_outputs']}: the model's reconstructions hold NaN or inf")
    assert os.listdir(tmp_path) == []


def test_time_to_quality_refuses_a_snapshot_whose_videos_are_not_finite(files, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "epoch_2.pt").write_bytes(files["nan_outputs"].read_bytes())
    (run_dir / "metrics.jsonl").write_text(TWO_EPOCHS)
    with pytest.raises(SystemExit) as e:
        time_to_quality.main(["--run", str(run_dir), "--judge", str(files["judge"]), "--data_root",
                              files["data"], "--test_stride", "1", "--device", "cpu",
                              "--out", str(tmp_path / "figs" / "t.png")])
    assert str(e.value).startswith(f"error: {run_dir / 'epoch_2.pt'}: the model's reconstructions")
    assert sorted(os.listdir(tmp_path)) == ["run"]


# ---- one run per folder, one writer per results file ---------------------------------------------
def test_a_lock_is_refused_while_held_and_released_on_every_exit(tmp_path):
    lock = tmp_path / "a" / "b" / ".lock"
    with utils.held_lock(str(lock), "busy: {holder}"):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(SystemExit) as e:  # a second holder, even in this process, is refused
            with utils.held_lock(str(lock), "busy: {holder}"):
                pass
        assert str(e.value) == f"error: busy: process {os.getpid()}"
    assert not (tmp_path / "a").exists()  # the folders it made, empty, went with it
    with pytest.raises(KeyError):
        with utils.held_lock(str(lock), "busy: {holder}"):
            (lock.parent / "kept").write_text("x")
            raise KeyError
    assert os.listdir(lock.parent) == ["kept"]


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    lock = tmp_path / ".lock"
    lock.write_text(dead.stdout)  # a run killed with SIGKILL leaves its file, but not its flock
    with utils.held_lock(str(lock), "busy: {holder}"):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert os.listdir(tmp_path) == []


def test_a_second_training_into_a_folder_in_use_is_refused_naming_the_holder(files, tmp_path):
    logs, models = tmp_path / "logs", tmp_path / "models"
    with utils.folders_held([str(models)]):
        r = run("train_cdsvae.py", *TINY_FLAGS, "--data_root", files["data"], "--log_dir", logs,
                "--model_dir", models)
        refused_in_one_line(r, f"{models} is in use by process {os.getpid()}", "--model_dir")
        assert os.listdir(tmp_path) == ["models"] and os.listdir(models) == [".lock"]


def test_a_second_test_sprite_onto_the_same_results_file_is_refused(files, tmp_path):
    out = tmp_path / "r.json"
    with utils.held_lock(f"{out}.lock", "busy"):
        r = run("test_sprite.py", "--model_dir", files["model"], "--judge", files["judge"],
                "--data_root", files["data"], "--device", "cpu", "--out", out)
    refused_in_one_line(r, f"{out} is being written by process {os.getpid()}", "--out")
    assert os.listdir(tmp_path) == []


def test_training_and_scoring_hold_their_lock_for_the_whole_run(files, tmp_path, monkeypatch):
    seen = []

    def holds(lock):
        def check(args, *rest):
            with pytest.raises(SystemExit) as e:
                with utils.held_lock(str(lock), "{holder}"):
                    pass
            seen.append(str(e.value))
        return check

    monkeypatch.setattr(train_cdsvae, "train", holds(tmp_path / "run" / ".lock"))
    train_cdsvae.main(["--log_dir", str(tmp_path / "run"), "--data_root", files["data"]])
    monkeypatch.setattr(test_sprite, "score", holds(tmp_path / "r.json.lock"))
    test_sprite.main(["--model_dir", str(files["model"]), "--out", str(tmp_path / "r.json")])
    assert seen == [f"error: process {os.getpid()}"] * 2 and os.listdir(tmp_path) == []


# ---- numbers and side files that parse but mean nothing ------------------------------------------
@pytest.mark.parametrize("flag", [["--weight_f", "nan"], ["--weight_c_aug", "inf"],
                                  ["--temperature", "inf"], ["--lr", "nan"]])
def test_training_refuses_numbers_that_are_not_finite(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as e:
        train_cdsvae.main(["--log_dir", str(tmp_path / "run"), *flag])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {flag[0]} must be"), err
    assert err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, words", [(["--threads", "-1"], "--threads -1 must be 0 or more"),
                                         (["--out", "{tmp}"], "is a folder")])
def test_test_sprite_refuses_a_bad_number_or_out_before_scoring(files, tmp_path, capsys, argv,
                                                               words):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        test_sprite.main(["--model_dir", str(files["model"]), "--judge", str(files["judge"]),
                          *argv])
    said = str(e.value) if isinstance(e.value.code, str) else capsys.readouterr().err
    assert said.startswith("error: ") and words in said and said.strip().count("\n") == 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("metrics, reference, words", [
    ("not json\n", None, "metrics.jsonl, line 1, is not a row of train_cdsvae.py"),
    ('{"epoch": 1, "seconds": 60}\n{"epoch": 2, "seconds": NaN}\n', None, "line 2, is not a row"),
    ('{"epoch": 1, "seconds": 60}\n["epoch", 2]\n', None, "line 2, is not a row"),
    ('{"epoch": 1, "seconds": 60}\n', None, "has no row of epoch(s) [2]"),
    (TWO_EPOCHS, {"points": [[1, 0.5]]}, "not a reference"),
    (TWO_EPOCHS, {"label": "x", "points": [[1, 95]]}, "not a reference"),
    (TWO_EPOCHS, [[1, 0.5]], "not a reference")])
def test_time_to_quality_refuses_garbage_metrics_or_reference_before_scoring(
        files, tmp_path, monkeypatch, metrics, reference, words):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for e in (1, 2):
        (run_dir / f"epoch_{e}.pt").write_bytes(b"")  # never read: the refusal comes first
    (run_dir / "metrics.jsonl").write_text(metrics)
    argv = ["--run", str(run_dir), "--judge", str(files["judge"]), "--data_root", files["data"],
            "--device", "cpu", "--out", str(tmp_path / "figs" / "t.png")]
    if reference is not None:
        (tmp_path / "ref.json").write_text(json.dumps(reference))
        argv += ["--reference", str(tmp_path / "ref.json")]
    monkeypatch.setattr(time_to_quality, "evaluate", None)  # scoring would fail loudly
    with pytest.raises(SystemExit) as e:
        time_to_quality.main(argv)
    assert str(e.value).startswith("error: ") and words in str(e.value) and "\n" not in str(e.value)
    assert "figs" not in os.listdir(tmp_path)
