"""A run that is stopped, killed, resumed or fed bad input: exit codes, a record that stays true, one-line errors."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import dataloader
import train_cdsvae
import utils
from utils import CheckpointError, read_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--f_dim", "8", "--z_dim", "4", "--g_dim", "16", "--rnn_size", "16", "--nf", "8", "--batch_size", "16",
        "--threads", "1", "--device", "cpu", "--evl_interval", "0"]  # 54 tiny videos: 3 steps an epoch
ENV = dict(os.environ, OMP_NUM_THREADS="1", PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])


def run(args, script="train_cdsvae.py", **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=ENV, **kw)


def one_line(text):
    return text.strip() != "" and "\n" not in text.strip() and "Traceback" not in text


def params(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


def assert_identical(a, b, where="checkpoint"):
    """Two nested state dicts alike, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_identical(u, v, f"{where}[{i}]")
    else:
        assert a == b, where


def rows(log_dir, timing=False):
    """metrics.jsonl's rows, without the wall-clock fields unless asked for."""
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items()
                 if timing or k not in ("seconds", "overhead_s")} for line in f]


# ---- stops ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_writes_a_checkpoint_and_exits_128_plus_its_number(tiny_data, tmp_path, signum):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_cdsvae.py"), *TINY, "--data_root", tiny_data,
                             "--nEpoch", "1000", "--log_dir", str(tmp_path)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (tmp_path / "model.pt").exists() and time.time() < deadline:  # written after the first epoch
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-2000:]  # 130, 143, 129: a script's `set -e` stops there
    # said when asked, before the step ends, then once more when stopped
    assert f"{signum.name}: stopping after this step (the checkpoint is written, then the run exits " \
           f"{128 + signum})" in err
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    stop_line = open(tmp_path / "log.txt").read().splitlines()[-1]
    assert stop_line.startswith(f"stopped by {signum.name} ") and f"step {ckpt['step']};" in stop_line
    assert ckpt["step"] >= 3 and ckpt["epoch"] * 3 + ckpt["batches_done"] == ckpt["step"]


@pytest.mark.parametrize("max_steps", [1, 3, 4])  # 3 steps an epoch: in epoch 1, at its end, in epoch 2
def test_mid_epoch_resume_writes_the_same_record_as_an_uninterrupted_run(tiny_data, tmp_path, max_steps):
    """--sche cosine_to_zero --amp, as the shipped recipe: parameters, optimizer, scheduler and metrics rows all alike."""
    common = TINY + ["--data_root", tiny_data, "--nEpoch", "2", "--sche", "cosine_to_zero", "--amp"]
    whole = train_cdsvae.main(common + ["--log_dir", str(tmp_path / "a")])
    train_cdsvae.main(common + ["--log_dir", str(tmp_path / "b"), "--max_steps", str(max_steps)])
    assert torch.load(tmp_path / "b" / "model.pt", weights_only=True)["step"] == max_steps  # not one more
    # as if killed between the two writes of an epoch's end in some earlier version: a row the checkpoint lacks
    (tmp_path / "b" / "metrics.jsonl").write_text('{"epoch": 1, "loss": 0}\n' * 2)
    resumed = train_cdsvae.main(common + ["--log_dir", str(tmp_path / "b"), "--resume"])
    torch.testing.assert_close(params(resumed), params(whole), rtol=0, atol=0)
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in "ab")
    for key in ("model", "optimizer", "scheduler", "step", "epoch"):
        assert_identical(a[key], b[key], key)
    assert rows(tmp_path / "b") == rows(tmp_path / "a") and [r["epoch"] for r in rows(tmp_path / "a")] == [1, 2]
    assert [r["epoch"] for r in a["history"]] == [1, 2] and len(b["history"]) == 2
    # the resumed epoch's time is the sum of its two parts, not the part after the resume only
    assert all(r["seconds"] > 0 for r in rows(tmp_path / "b", timing=True))


def test_resume_makes_only_the_batches_left_and_the_bar_starts_where_it_stopped(tiny_data, tmp_path, monkeypatch,
                                                                                capsys):
    common = TINY + ["--data_root", tiny_data, "--nEpoch", "2", "--log_dir", str(tmp_path)]
    train_cdsvae.main(common + ["--max_steps", "4"])  # stops in epoch 2 after batch 1 of 3
    made, make_batch = [], dataloader._make_batch
    monkeypatch.setattr(dataloader, "_make_batch", lambda *a, **kw: made.append(1) or make_batch(*a, **kw))
    monkeypatch.setattr(utils, "PLAIN_PROGRESS_EVERY_S", 0.0)  # off a terminal: a line at every update
    capsys.readouterr()
    train_cdsvae.main(common + ["--resume"])
    err = capsys.readouterr().err
    assert len(made) == 2
    lines = [line for line in err.splitlines() if line.startswith("epoch 2/2: ")]
    assert lines[0].startswith("epoch 2/2: 1/3 steps, ") and "epoch 2/2: 0/3" not in err
    assert lines[-1].startswith("epoch 2/2: 3/3 steps, ") and " step/s, " in lines[-1]
    assert all(" elapsed, ETA " in line for line in lines[1:]) and "loss=" in lines[-1]
    log = open(tmp_path / "log.txt").read()
    assert "stopped by --max_steps 4 in epoch 2 after batch 1/3, step 4;" in log
    assert "resumed " in log and " in epoch 2 after batch 1/3, step 4" in log


# ---- the two-stage recipe ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stop_at", [2, 5])  # MI weight 1 for steps 0-3, 10 from step 4 on: stopped in stage 1, 2
def test_the_mi_weight_schedule_resumes_in_the_stage_of_the_checkpoint(tiny_data, tmp_path, stop_at):
    common = TINY + ["--data_root", tiny_data, "--nEpoch", "3", "--weight_mi", "1"]
    staged = common + ["--weight_mi_after", "4", "10"]
    whole = train_cdsvae.main(staged + ["--log_dir", str(tmp_path / "a")])
    one_stage = train_cdsvae.main(common + ["--log_dir", str(tmp_path / "c")])
    assert not torch.equal(params(whole), params(one_stage))  # the second stage changes the training
    train_cdsvae.main(staged + ["--log_dir", str(tmp_path / "b"), "--max_steps", str(stop_at)])
    resumed = train_cdsvae.main(staged + ["--log_dir", str(tmp_path / "b"), "--resume"])
    torch.testing.assert_close(params(resumed), params(whole), rtol=0, atol=0)
    assert rows(tmp_path / "b") == rows(tmp_path / "a")


def test_the_cpu_recipe_script_stopped_in_stage_2_resumes_there(tiny_data, tmp_path):
    """run_cdsvae_cpu.sh with a tiny network: stopped at step 5, then --resume, equals one uninterrupted run."""
    tiny = TINY + ["--nEpoch", "2", "--weight_mi_after", "4", "10"]

    def recipe(log_dir, *extra):
        return subprocess.run(["bash", os.path.join(ROOT, "run_cdsvae_cpu.sh"), *tiny, *extra], capture_output=True,
                              text=True, timeout=600, env=dict(ENV, DATA=tiny_data, LOG_DIR=str(log_dir)))

    for r in (recipe(tmp_path / "a"), recipe(tmp_path / "b", "--max_steps", "5"), recipe(tmp_path / "b", "--resume")):
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in "ab")
    assert a["args"]["f_mirror"] and a["args"]["weight_mi_after"] == [4, 10.0] and b["step"] == a["step"] == 6
    assert a["args"]["weight_mi_critic"] == 10.0 and sorted(os.listdir(tmp_path / "a")).count("epoch_2.pt") == 1
    assert_identical(a["model"], b["model"], "model")
    assert_identical(a["critic"], b["critic"], "critic")
    assert rows(tmp_path / "b") == rows(tmp_path / "a")


# ---- what a run leaves behind -----------------------------------------------------------------------------
def test_stale_temporary_files_of_killed_writers_are_removed_on_start(tiny_data, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    stale = [f"model.pt.tmp{dead}", f"metrics.jsonl.tmp{dead}", f"epoch_3.pt.tmp{dead}"]
    kept = ["notes.tmp123", "model.pt.tmpx"]  # not write_atomic's: kept (the folder is held, so no writer is alive)
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x" * 100)
    train_cdsvae.main(TINY + ["--data_root", tiny_data, "--nEpoch", "1", "--log_dir", str(tmp_path)])
    left = set(os.listdir(tmp_path))
    assert not left & set(stale) and set(kept) <= left and "model.pt" in left


def test_a_fresh_run_does_not_append_to_another_runs_metrics(tiny_data, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    r = run(TINY + ["--data_root", tiny_data, "--nEpoch", "1", "--log_dir", str(tmp_path)])
    assert r.returncode == 1 and one_line(r.stderr) and "--resume" in r.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1}\n'


def test_non_finite_loss_before_any_checkpoint_says_none_is_kept(tiny_data, tmp_path):
    # a learning rate this large sends the weights to inf in one step: the second step's loss is NaN
    r = run(TINY + ["--data_root", tiny_data, "--nEpoch", "1", "--lr", "1e30", "--log_dir", str(tmp_path)])
    assert r.returncode == 1 and "non-finite loss" in r.stdout
    assert "no checkpoint was written yet" in r.stdout and "is kept" not in r.stdout
    assert not (tmp_path / "model.pt").exists()


# ---- messages ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [["--lr", "nan"], ["--lr", "-1"], ["--lr", "0"], ["--threads", "-1"],
                                 ["--subset", "-5"], ["--batch_size", "1"], ["--weight_mi_after", "1.5", "10"],
                                 ["--temperature", "inf"], ["--device", "tpu"], ["--batch_size", "0"],
                                 ["--weight_mi_critic", "-1"], ["--weight_mi_critic", "nan"],
                                 ["--weight_rec", "nan"], ["--f_film"], ["--weight_swap", "1"]])
def test_bad_flags_are_refused_in_one_line(bad, capsys):
    with pytest.raises(SystemExit) as stop:
        train_cdsvae.get_args(bad)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and one_line(err) and err.startswith("error: ") and bad[0] in err


@pytest.mark.xdist_group("ddp")  # process groups one at a time (ports)
def test_batch_of_one_video_per_process_is_refused(tiny_data, tmp_path):
    """Two processes and --batch_size 2: one video each, no negatives for the InfoNCE terms."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
                        os.path.join(ROOT, "train_cdsvae.py"), *TINY, "--data_root", tiny_data, "--batch_size", "2",
                        "--log_dir", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env=ENV)
    assert r.returncode != 0 and "at least 2 videos each" in r.stderr
    assert not (tmp_path / "run").exists()


class _RunsShell:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("kind", ["random bytes", "torch.save of code", "pickle of code", "truncated"])
def test_a_bad_checkpoint_is_named_in_one_line_that_never_advises_weights_only_false(tmp_path, kind):
    path, target = tmp_path / "model.pt", tmp_path / "pwned"
    if kind == "random bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "torch.save of code":
        torch.save({"model": _RunsShell(str(target))}, path)
    elif kind == "pickle of code":
        path.write_bytes(pickle.dumps({"model": _RunsShell(str(target))}, protocol=4))
    else:
        torch.save({"model": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(str(path))
    why = ("it holds posix.system, not only tensors and plain containers" if kind == "torch.save of code" else
           "it is not a complete torch.save file (empty, truncated or another kind of file)")
    assert str(e.value) == f"{path} is not a PyTorch checkpoint that can be loaded safely: {why}"
    assert not target.exists()


def test_a_model_checkpoint_given_as_judge_is_refused_before_any_folder_is_made(tiny_data, tmp_path):
    train_cdsvae.main(TINY + ["--data_root", tiny_data, "--nEpoch", "1", "--log_dir", str(tmp_path / "model")])
    args = TINY + ["--data_root", tiny_data, "--judge", str(tmp_path / "model" / "model.pt"),
                   "--log_dir", str(tmp_path / "run")]
    args[args.index("--evl_interval") + 1] = "1"
    r = run(args)
    assert r.returncode == 1 and one_line(r.stderr) and "--judge" in r.stderr and "not a judge" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_missing_judge_turns_periodic_scoring_off_once_in_the_log(tiny_data, tmp_path):
    args = TINY + ["--data_root", tiny_data, "--nEpoch", "2", "--judge", str(tmp_path / "none.pt"),
                   "--log_dir", str(tmp_path / "run")]
    args[args.index("--evl_interval") + 1] = "1"
    train_cdsvae.main(args)
    log = open(tmp_path / "run" / "log.txt").read()
    assert log.count("periodic scoring is off") == 1 and str(tmp_path / "none.pt") in log
    assert not any(k.startswith("eval_") for r in rows(tmp_path / "run") for k in r)


def test_a_data_folder_is_met_with_advice_that_works(tmp_path):
    r = run(TINY + ["--data_root", str(tmp_path), "--log_dir", str(tmp_path / "run")])
    advised = os.path.join(str(tmp_path), "data.pkl")
    assert r.returncode == 1 and one_line(r.stderr) and f"make_sprites.py --out {advised}`" in r.stderr
    r = run(["--out", str(tmp_path)], script="make_sprites.py")  # the advice as first given, with a folder, is refused
    assert r.returncode == 1 and one_line(r.stderr) and f"--out {advised}" in r.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what is said where no GPU is visible")
def test_the_gpu_recipe_says_first_that_it_is_one_and_names_the_cpu_recipe(tiny_data, tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "run_cdsvae.sh"), *TINY, "--max_steps", "1",
                        "--log_dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env=dict(ENV, DATA=tiny_data))
    assert r.returncode == 0, r.stderr[-2000:]
    first = r.stdout.splitlines()[0]
    assert "GPU recipe" in first and "./run_cdsvae_cpu.sh" in first
