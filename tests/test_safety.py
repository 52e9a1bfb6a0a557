"""Files written so that a crash never leaves half of one, and checkpoints that would run code refused at every
script that reads one."""
import ast
import io
import json
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch

import make_sprites
import utils
from judges.networks import SpriteJudge
from model import CDSVAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = dict(f_dim=8, z_dim=4, g_dim=16, rnn_size=16, nf=8)
TINY_JUDGE = dict(g_dim=16, rnn_size=16, hidden=16, nf=8)


# ---- atomic writes ----------------------------------------------------------------------------------------
# the writer, the file it writes, and the serialiser it calls (module, name) to make the file's bytes
WRITERS = {"utils.save_atomic": (utils.save_atomic, "model.pt", torch, "save"),
           "utils.write_json": (utils.write_json, "results.json", json, "dump"),
           "make_sprites' data.pkl": (lambda obj, path: utils.write_atomic(
               path, lambda tmp: make_sprites.write_pickle(obj, tmp)), "data.pkl", pickle, "dump")}


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("fails", ["writing", "renaming"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch, writer, fails, error):
    write, name, module, serialiser = WRITERS[writer]
    path = tmp_path / name
    write({"epoch": 1}, str(path))
    before = path.read_bytes()

    def half_written(obj, f, *args, **kwargs):  # a part of the file reaches the disk, then the write fails
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as fh:
                fh.write(before[:len(before) // 2])
        else:
            f.write("{\"epo" if isinstance(f, io.TextIOBase) else before[:len(before) // 2])
        raise error

    def refused(src, dst):
        raise error

    if fails == "writing":
        monkeypatch.setattr(module, serialiser, half_written)
    else:
        monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(type(error)):
        write({"epoch": 2}, str(path))
    with pytest.raises(type(error)):
        write({"epoch": 2}, str(tmp_path / "new" / name))  # no previous file: none is left either
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted([name, "new"]) and os.listdir(tmp_path / "new") == []


# ---- checkpoints that would run code ----------------------------------------------------------------------
class RunsCode:
    """Unpickled by plain pickle (torch.load(weights_only=False)), this runs a shell command: it makes `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def doors(tiny_data, tmp_path_factory):
    """A payload checkpoint, a good tiny model and judge, and the command line of each script that reads a checkpoint
    with the payload given through its door ({evil}: the payload's path, {dir}: a folder for outputs)."""
    d = tmp_path_factory.mktemp("doors")
    marker = d / "ran"
    torch.save({"model": RunsCode(marker), "model_args": TINY_MODEL, "judge_args": TINY_JUDGE}, d / "evil.pt")
    torch.save({"model": CDSVAE(**TINY_MODEL).state_dict(), "model_args": TINY_MODEL}, d / "model.pt")
    torch.save({"model": SpriteJudge(**TINY_JUDGE).state_dict(), "judge_args": TINY_JUDGE}, d / "judge.pt")
    tiny = ["--f_dim", "8", "--z_dim", "4", "--g_dim", "16", "--rnn_size", "16", "--nf", "8", "--batch_size", "16",
            "--threads", "1", "--device", "cpu", "--data_root", tiny_data]
    judge = ["--nf", "8", "--g_dim", "16", "--rnn_size", "16", "--hidden", "16", "--val_chars", "2", "--threads", "1",
             "--batch_size", "16", "--device", "cpu", "--data_root", tiny_data]
    return d, marker, {
        "train_cdsvae.py --resume": ["train_cdsvae.py", *tiny, "--evl_interval", "0", "--log_dir", "{dir}",
                                     "--resume"],
        "train_cdsvae.py --judge": ["train_cdsvae.py", *tiny, "--evl_interval", "1", "--log_dir", "{dir}",
                                    "--judge", "{evil}"],
        "test_sprite.py --model_dir": ["test_sprite.py", "--model_dir", "{evil}", "--judge", str(d / "judge.pt"),
                                       "--data_root", tiny_data, "--device", "cpu", "--out", "{dir}/r.json"],
        "test_sprite.py --judge": ["test_sprite.py", "--model_dir", str(d / "model.pt"), "--judge", "{evil}",
                                   "--data_root", tiny_data, "--device", "cpu", "--out", "{dir}/r.json"],
        "make_figs.py --model_dir": ["make_figs.py", "--model_dir", "{evil}", "--data_root", tiny_data,
                                     "--device", "cpu", "--out", "{dir}"],
        "export_checkpoint.py": ["export_checkpoint.py", "{evil}", "{dir}/ship.pt"],
        "judges/train_judge.py --resume": ["judges/train_judge.py", *judge, "--nEpoch", "1", "--ckpt", "{evil}",
                                           "--out", "{dir}/judge.pt", "--resume"],
        "judges/train_judge.py --card_only": ["judges/train_judge.py", *judge, "--out", "{evil}", "--card_only"],
    }


@pytest.mark.parametrize("door", ["train_cdsvae.py --resume", "train_cdsvae.py --judge", "test_sprite.py --model_dir",
                                  "test_sprite.py --judge", "make_figs.py --model_dir", "export_checkpoint.py",
                                  "judges/train_judge.py --resume", "judges/train_judge.py --card_only"])
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line_by_every_script(doors, tmp_path, door):
    d, marker, argv = doors
    evil = tmp_path / ("model.pt" if door == "train_cdsvae.py --resume" else "evil.pt")
    evil.write_bytes((d / "evil.pt").read_bytes())
    r = subprocess.run([sys.executable, *(a.format(dir=tmp_path, evil=evil) for a in argv[door])], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert f"{evil} is not a PyTorch checkpoint that can be loaded safely: it holds posix.system" in r.stderr, r.stderr
    assert not marker.exists() and os.listdir(tmp_path) == [evil.name]  # nothing ran, nothing was written


def test_every_script_reads_checkpoints_through_read_checkpoint():
    """So what read_checkpoint refuses, every door refuses: no other call of torch.load or pickle.load."""
    scripts = [f for f in os.listdir(ROOT) if f.endswith(".py")] + [os.path.join("judges", "train_judge.py")]
    calls = {}
    for f in scripts:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, f)).read())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "pickle")):
                calls.setdefault(f, []).append(node.func.value.id)
    assert calls == {"utils.py": ["torch"]}


def test_a_plain_pickle_that_would_run_code_is_refused_in_one_line_without_warnings(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"model": RunsCode(tmp_path / "ran")}, f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's multi-line warning about the protocol would reach the user's terminal
        with pytest.raises(utils.CheckpointError) as e:
            utils.read_checkpoint(str(tmp_path / "evil.pt"))
    assert str(e.value).startswith(f"{tmp_path / 'evil.pt'} is not a PyTorch checkpoint that can be loaded safely")
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
    assert not (tmp_path / "ran").exists()


def test_the_payload_runs_under_plain_unpickling(tmp_path):
    """What the doors refuse is a real threat: torch.load without weights_only runs it."""
    torch.save({"model": RunsCode(tmp_path / "ran")}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "ran").exists()
