"""Faults at every door: a failed write or read, a signal, a damaged or odd file, a malformed field, a
command aimed at its own input and a kill at any moment. Each ends in one line on stderr, training's exit
code (1, or 130 / 143 / 129), no traceback, nothing lost, no temporary or lock file left."""
import errno
import fcntl
import json
import os
import pickle
import random
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
import zipfile

import pytest
import torch

import export_checkpoint
import make_figs
import test_sprite as ts
import time_to_quality
import train_cdsvae
import utils
from dataloader import DataError, load_sprites
from judges.networks import SpriteJudge, load_judge

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "judges"))
import train_judge  # noqa: E402

TINY = ["--f_dim", "8", "--z_dim", "4", "--g_dim", "16", "--rnn_size", "16", "--nf", "8", "--batch_size", "16",
        "--threads", "1", "--device", "cpu", "--evl_interval", "0"]  # 54 tiny videos: 3 steps an epoch
TINY_JUDGE = dict(g_dim=16, rnn_size=16, hidden=16, nf=8)
ENV = dict(os.environ, OMP_NUM_THREADS="1")
LEFT_BEHIND = re.compile(r".*\.tmp\d+|.*\.lock")  # write_atomic's temporaries, lock files

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny models run fastest on one thread


def run(script, *args, file_size_limit=None, **kw):
    """A script run as a user runs it; under a file-size limit (`ulimit -f`) if asked."""
    limit = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit,) * 2)) if file_size_limit else None
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env=ENV, preexec_fn=limit, **kw)


def one_line_error(stderr, code, returncode, *words):
    """stderr ends in one 'error: ' line holding `words`, after nothing but blank lines; no traceback."""
    assert returncode == code and "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for w in words:
        assert str(w) in lines[0], lines[0]


def left_behind(folder):
    return [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if LEFT_BEHIND.fullmatch(f)]


def refusal(main, argv):
    """The one-line message with which main(argv), in this process, refuses: a SystemExit's, or a
    RefusedInput's / OSError's that utils.run_main turns into one."""
    with pytest.raises((SystemExit, utils.RefusedInput, OSError)) as e:
        main(argv)
    said = str(e.value.code) if isinstance(e.value, SystemExit) else f"error: {e.value}"
    assert said.startswith("error: ") and "\n" not in said, said
    return said


def flip_a_byte(path, out):
    """A copy of the torch zip `path` at `out` with one byte changed inside its largest member's data: the
    damage a failing disk or a bad copy does, which torch.load does not notice."""
    with zipfile.ZipFile(path) as z:
        member = max(z.infolist(), key=lambda i: i.compress_size)
    data = bytearray(open(path, "rb").read())
    name_len, extra_len = int.from_bytes(data[member.header_offset + 26:member.header_offset + 28], "little"), \
        int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
    at = member.header_offset + 30 + name_len + extra_len + member.compress_size // 2
    data[at] ^= 0x10
    open(out, "wb").write(bytes(data))
    return member.filename


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    """A one-epoch tiny run (model.pt, epoch_1.pt, metrics.jsonl), its export and a tiny judge."""
    d = tmp_path_factory.mktemp("faults")
    train_cdsvae.main(TINY + ["--data_root", tiny_data, "--nEpoch", "1", "--snapshot_every", "1",
                              "--log_dir", str(d / "run")])
    ckpt = torch.load(d / "run" / "model.pt", weights_only=True)
    torch.save({"model": ckpt["model"], "model_args": ckpt["model_args"], "epoch": 1}, d / "export.pt")
    torch.manual_seed(0)
    torch.save({"model": SpriteJudge(**TINY_JUDGE).state_dict(), "judge_args": TINY_JUDGE}, d / "judge.pt")
    return d


def a_copy_of_the_run(trained, tmp_path):
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run"


def scoring(trained, tiny_data, out, *extra):
    return ["--model_dir", trained / "run" / "model.pt", "--judge", trained / "judge.pt", "--data_root", tiny_data,
            "--device", "cpu", "--threads", "1", "--no-probes", "--out", out, *extra]


# ---- writes that fail ---------------------------------------------------------------------------------------
def test_a_file_size_limit_met_by_training_keeps_the_last_checkpoint_and_snapshot_whole(trained, tiny_data,
                                                                                         tmp_path):
    """`ulimit -f` (what a full disk does too) at epoch 2's snapshot: one line, exit 1; epoch 1's record whole."""
    run_dir = a_copy_of_the_run(trained, tmp_path)
    before = {f: (run_dir / f).read_bytes() for f in ("model.pt", "epoch_1.pt", "metrics.jsonl")}
    r = run("train_cdsvae.py", *TINY, "--data_root", tiny_data, "--nEpoch", "2", "--snapshot_every", "1",
            "--log_dir", run_dir, "--resume", file_size_limit=64 << 10)
    one_line_error(r.stderr, 1, r.returncode, f"cannot write {run_dir / 'epoch_2.pt'}", "file-size limit")
    assert {f: (run_dir / f).read_bytes() for f in before} == before and not left_behind(run_dir)


def test_a_results_file_that_cannot_be_written_keeps_the_old_one_and_still_prints_the_scores(trained, tiny_data,
                                                                                           tmp_path):
    out = tmp_path / "r.json"
    out.write_text("previous")
    r = run("test_sprite.py", *scoring(trained, tiny_data, out, "--niter", "1"), file_size_limit=2048)
    one_line_error(r.stderr, 1, r.returncode, f"cannot write {out}", "file-size limit")
    assert out.read_text() == "previous" and "Protocol A" in r.stdout and not left_behind(tmp_path)


def test_an_export_that_cannot_be_written_says_why_torch_did_not(trained, tmp_path):
    """torch.save's own error ('unexpected pos ...') hides the OS error; save_atomic finds it."""
    dst = tmp_path / "ship.pt"
    dst.write_text("previous")
    r = run("export_checkpoint.py", trained / "run" / "model.pt", dst, file_size_limit=64 << 10)
    one_line_error(r.stderr, 1, r.returncode, f"cannot write {dst}", "file-size limit")
    assert dst.read_text() == "previous" and os.listdir(tmp_path) == ["ship.pt"]


def test_a_full_disk_is_named_as_such_and_the_previous_file_kept(tmp_path):
    path = tmp_path / "results.json"
    utils.write_json({"epoch": 1}, str(path))

    def onto_a_full_disk(tmp):  # /dev/full: every write fails with ENOSPC, as on a full disk
        with open(tmp, "w"), open("/dev/full", "w") as full:
            full.write("x" * 100_000)

    with pytest.raises(OSError) as e:
        utils.write_atomic(str(path), onto_a_full_disk)
    assert e.value.errno == errno.ENOSPC and str(e.value) == (f"cannot write {path}: the disk is full: free space, "
                                                              f"or choose a place on another disk")
    assert json.loads(path.read_text()) == {"epoch": 1} and os.listdir(tmp_path) == ["results.json"]


def test_make_sprites_refuses_an_output_it_could_not_write_before_building(sheets, tmp_path):
    """The build takes ~30 s and 1.1 GB; a file-size limit (or a full disk) below that is said at once."""
    t = time.time()
    r = run("make_sprites.py", "--sheets", sheets, "--out", tmp_path / "data.pkl", file_size_limit=1 << 20)
    one_line_error(r.stderr, 1, r.returncode, f"cannot write {tmp_path / 'data.pkl'}", "file-size limit")
    assert time.time() - t < 20 and os.listdir(tmp_path) == []


@pytest.mark.parametrize("door", ["test_sprite.py", "make_figs.py", "time_to_quality.py", "train_judge.py",
                                  "train_cdsvae.py"])
def test_an_output_under_a_regular_file_is_refused_before_any_work(trained, tiny_data, tmp_path, door):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    where = blocker / "sub"
    main, argv = {
        "test_sprite.py": (ts.main, scoring(trained, tiny_data, where / "r.json")),
        "make_figs.py": (make_figs.main, ["--model_dir", trained / "run" / "model.pt", "--data_root", tiny_data,
                                          "--out", where]),
        "time_to_quality.py": (time_to_quality.main, ["--run", trained / "run", "--judge", trained / "judge.pt",
                                                      "--data_root", tiny_data, "--out", where / "t.png"]),
        "train_judge.py": (train_judge.main, ["--data_root", tiny_data, "--out", where / "j.pt",
                                              "--ckpt", tmp_path / "last.pt"]),
        "train_cdsvae.py": (train_cdsvae.main, TINY + ["--data_root", tiny_data, "--log_dir", where])}[door]
    assert "a part of its path is a file" in refusal(main, list(map(str, argv)))
    assert os.listdir(tmp_path) == ["a_file"]


# ---- reads that fail ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["a folder", "a fifo", "an I/O error", "no permission"])
def test_a_file_that_cannot_be_read_is_named_with_the_reason(trained, tmp_path, monkeypatch, kind):
    path = tmp_path / "x"
    if kind == "a folder":
        path.mkdir()
        words = "is a folder"
    elif kind == "a fifo":
        os.mkfifo(path)  # reading it would block for ever
        words = "is not a regular file"
    elif kind == "an I/O error":
        path = "/proc/self/mem"  # reading its first page fails with EIO: the kernel's, not a stand-in's
        words = "an input/output error"
    else:
        path.write_bytes((trained / "judge.pt").read_bytes())
        real_open = open

        def denied(file, *args, **kwargs):  # root reads through chmod; this is what others meet
            if str(file) == str(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr("builtins.open", denied)
        words = "permission denied"
    with pytest.raises(utils.CheckpointError) as e:
        load_judge(str(path))
    assert str(e.value).startswith(("judge file ", "cannot read judge file ")) and words in str(e.value)
    with pytest.raises(DataError) as e:
        load_sprites(str(path))
    assert words in str(e.value) or (kind == "a folder" and "--data_root takes the data file" in str(e.value))


@pytest.mark.parametrize("door", ["test_sprite.py --model_dir", "test_sprite.py --judge", "train_cdsvae.py --resume",
                                  "time_to_quality.py", "export_checkpoint.py"])
def test_bytes_damaged_on_disk_are_refused_naming_the_file_and_its_kind(trained, tiny_data, tmp_path, door):
    """One byte changed inside a tensor: torch.load reads it without a word; every door refuses it by its CRC."""
    run_dir = a_copy_of_the_run(trained, tmp_path)
    source = {"test_sprite.py --judge": trained / "judge.pt", "time_to_quality.py": run_dir / "epoch_1.pt"}.get(
        door, run_dir / "model.pt")
    bad = run_dir / ("epoch_2.pt" if door == "time_to_quality.py" else "model.pt")
    if door == "test_sprite.py --judge":
        bad = tmp_path / "judge.pt"
    member = flip_a_byte(source, bad)
    torch.load(bad, weights_only=True)  # what the check is for: torch notices nothing
    score = scoring(trained, tiny_data, tmp_path / "r.json")
    if door.startswith("test_sprite.py"):
        score[score.index(door.split()[-1]) + 1] = bad
    kind, main, argv = {
        "test_sprite.py --model_dir": ("model checkpoint", ts.main, score),
        "test_sprite.py --judge": ("judge file", ts.main, score),
        "train_cdsvae.py --resume": ("checkpoint to resume", train_cdsvae.main,
                                     TINY + ["--data_root", tiny_data, "--log_dir", run_dir, "--resume"]),
        "time_to_quality.py": ("model checkpoint", time_to_quality.main,
                               ["--run", run_dir, "--judge", trained / "judge.pt", "--data_root", tiny_data,
                                "--test_stride", "1", "--out", tmp_path / "t.png"]),
        "export_checkpoint.py": ("model checkpoint", export_checkpoint.main, [bad, tmp_path / "ship.pt"])}[door]
    if door == "time_to_quality.py":  # epoch 2's row, so that only the damage is wrong
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"epoch": 2, "seconds": 1.0}) + "\n")
    said = refusal(main, list(map(str, argv)))
    assert f"{kind} {bad} is damaged: the bytes of its member {member} do not match their CRC-32" in said, said
    assert not left_behind(tmp_path) and not (tmp_path / "r.json").exists() and not (tmp_path / "t.png").exists()


def test_the_crc_check_costs_little_on_the_shipped_checkpoint():
    """Every load checks every member's CRC: on the 10 MB shipped checkpoint, a few ms (a load is ~20-50)."""
    data = open(os.path.join(ROOT, "checkpoints", "cdsvae_sprites_cpu.pt"), "rb").read()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        assert utils.zip_damage(data) == ""
        times.append(time.perf_counter() - t)
    assert min(times) < 0.1


# ---- signals outside training's loop ------------------------------------------------------------------------
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_scoring_ends_in_one_line_with_its_code_and_leaves_no_lock(trained, tiny_data, tmp_path,
                                                                                  signum):
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "test_sprite.py", *map(str, scoring(trained, tiny_data, out,
                                                                                 "--niter", "1000"))],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "r.json.lock").exists() and time.time() < deadline:  # taken before loading
        time.sleep(0.05)
    time.sleep(2.5)  # loading the tiny files takes well under a second: it is scoring now
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    one_line_error(err, 128 + signum, proc.returncode, f"stopped by {signum.name} before the end")
    assert os.listdir(tmp_path) == []


def test_a_signal_while_training_loads_ends_it_at_once_in_one_line(tiny_data, tmp_path):
    """Before the loop (a data file read for a minute, here a stand-in that sleeps) a signal does not wait."""
    slow = ("import sys, time, train_cdsvae, utils; load = train_cdsvae.load_data; "
            "train_cdsvae.load_data = lambda run: (time.sleep(60), load(run)); "
            f"utils.run_main(lambda: train_cdsvae.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", slow, *TINY, "--data_root", tiny_data, "--log_dir",
                             str(tmp_path / "run")], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "run" / "log.txt").exists() and not (tmp_path / "run" / ".lock").exists() \
            and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    t = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    one_line_error(err, 143, proc.returncode, "stopped by SIGTERM")
    assert time.time() - t < 30 and not os.path.exists(tmp_path / "run")


def test_closing_the_terminal_of_a_training_writes_its_checkpoint_and_exits_129(tiny_data, tmp_path):
    """The terminal goes: SIGHUP, then every write to it fails with EIO, which must not stop the checkpoint."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "train_cdsvae.py", *TINY, "--data_root", tiny_data, "--nEpoch", "1000",
                             "--log_dir", str(tmp_path)], cwd=ROOT, env=ENV, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
    os.close(slave)
    deadline = time.time() + 120
    while not (tmp_path / "model.pt").exists() and time.time() < deadline:  # an epoch done
        if select.select([master], [], [], 0.1)[0]:  # what it writes is read, as a terminal shows it
            os.read(master, 1 << 16)
    os.close(master)  # the terminal is closed
    assert proc.wait(timeout=120) == 129
    assert open(tmp_path / "log.txt").read().splitlines()[-1].startswith("stopped by SIGHUP ")
    assert torch.load(tmp_path / "model.pt", weights_only=True)["step"] >= 3 and not left_behind(tmp_path)


# ---- checkpoints read on trust no more ----------------------------------------------------------------------
def spoil(ckpt, how, trained):
    """ckpt (a resumable checkpoint's dict) spoiled as `how`; the words its refusal must hold."""
    if how == "no optimizer":
        del ckpt["optimizer"]
        return "has no 'optimizer'"
    if how == "a step that is a string":
        ckpt["step"] = "3"
        return "'step' that is str '3', not a whole number"
    if how == "a tensor in its history":
        ckpt["history"][0]["loss"] = torch.ones(2)
        return "'history' that is a list, not a list of metrics rows"
    if how == "a random state that is not a list":
        ckpt["rng_cpu"] = ckpt["rng_cpu"][0]
        return "'rng_cpu' that is a Tensor"
    if how == "an unknown model argument":
        ckpt["model_args"]["f_dims"] = 8
        return "f_dims=8 (not an argument of CDSVAE)"
    if how == "an optimizer of another network":
        ckpt["optimizer"]["param_groups"][0]["params"] = ckpt["optimizer"]["param_groups"][0]["params"][:3]
        return "does not fit this run (ValueError"
    assert how == "an export"
    ckpt.clear()
    ckpt.update(torch.load(trained / "export.pt", weights_only=True))
    return "is an exported checkpoint: weights for inference only, with no optimizer"


@pytest.mark.parametrize("how", ["no optimizer", "a step that is a string", "a tensor in its history",
                                 "a random state that is not a list", "an unknown model argument",
                                 "an optimizer of another network", "an export"])
def test_resume_refuses_a_malformed_checkpoint_naming_the_field_and_changes_nothing(trained, tiny_data,
                                                                                   tmp_path, how):
    run_dir = a_copy_of_the_run(trained, tmp_path)
    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    words = spoil(ckpt, how, trained)
    torch.save(ckpt, run_dir / "model.pt")
    before = {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)}
    said = refusal(train_cdsvae.main, TINY + ["--data_root", tiny_data, "--nEpoch", "2", "--log_dir", str(run_dir),
                                              "--resume"])
    assert said.startswith("error: cannot resume: ") and words in said, said
    assert {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)} == before


def test_resume_with_a_precision_whose_loss_scaler_the_checkpoint_lacks_is_one_line(trained, tiny_data, tmp_path):
    """An fp32 run resumed with --amp fp16: the grad scaler's state is empty; refused, not a RuntimeError."""
    run_dir = a_copy_of_the_run(trained, tmp_path)
    said = refusal(train_cdsvae.main, TINY + ["--data_root", tiny_data, "--nEpoch", "2", "--log_dir", str(run_dir),
                                              "--resume", "--amp", "fp16"])
    assert said.startswith("error: cannot resume: resumable checkpoint") and "does not fit this run" in said


@pytest.mark.parametrize("args, words", [
    ({"f_dims": 8}, "f_dims=8 (not an argument of CDSVAE)"), ({"f_dim": "8"}, "f_dim='8' (not whole in 1..65536)"),
    ({"f_dim": 2 ** 40}, "f_dim=1099511627776 (not whole in"), ({"f_mirror": 1}, "f_mirror=1 (not a boolean)"),
    ({"z_input": "lstm"}, "z_input must be 'bilstm', 'frame_delta' or 'full'"), ("f_dim=8", "'model_args' that is")])
def test_model_args_a_network_cannot_take_are_refused_naming_them(trained, tmp_path, args, words):
    ckpt = torch.load(trained / "export.pt", weights_only=True)
    ckpt["model_args"] = {**ckpt["model_args"], **args} if isinstance(args, dict) else args
    torch.save(ckpt, tmp_path / "x.pt")
    with pytest.raises(utils.CheckpointError) as e:
        utils.load_model(str(tmp_path / "x.pt"))
    assert str(e.value).startswith(f"exported checkpoint {tmp_path / 'x.pt'} has ") and words in str(e.value)


@pytest.mark.parametrize("change, words", [
    ({"heads": ["action"]}, "has judge heads ['action']"), ({"arch": ["bilstm"]}, "judge of network \"['bilstm']\""),
    ({"judge_args": dict(TINY_JUDGE, depth=2)}, "depth=2 (not an argument of SpriteJudge)"),
    ({"judge_args": dict(TINY_JUDGE, nf=8.0)}, "nf=8.0 (not whole"), ({"model": [1, 2]}, "'model' that is a list")])
def test_judge_fields_are_checked_before_use_and_the_judge_file_is_named(trained, tmp_path, change, words):
    ckpt = torch.load(trained / "judge.pt", weights_only=True)
    torch.save({**ckpt, **change}, tmp_path / "j.pt")
    with pytest.raises(utils.CheckpointError) as e:
        load_judge(str(tmp_path / "j.pt"))
    assert str(e.value).startswith(f"judge file {tmp_path / 'j.pt'} ") and words in str(e.value), str(e.value)


def test_a_judge_whose_outputs_are_not_finite_is_blamed_not_the_model(trained, tiny_data, tmp_path):
    judge = SpriteJudge(**TINY_JUDGE)
    state = judge.state_dict()
    state["encoder.net.1.1.running_var"][:] = -1.0  # finite weights, NaN outputs
    torch.save({"model": state, "judge_args": TINY_JUDGE}, tmp_path / "nan_judge.pt")
    argv = scoring(trained, tiny_data, tmp_path / "r.json", "--niter", "1")
    argv[argv.index("--judge") + 1] = tmp_path / "nan_judge.pt"
    said = refusal(ts.main, list(map(str, argv)))
    assert said.startswith(f"error: judge file {tmp_path / 'nan_judge.pt'}: the outputs of judge nan_judge") and \
        str(trained / "run") not in said
    assert os.listdir(tmp_path) == ["nan_judge.pt"]


# ---- commands that would destroy their input or write where another process does --------------------------
def test_export_refuses_its_own_input_as_output_and_a_folder_a_training_holds(trained, tmp_path):
    src = tmp_path / "model.pt"
    src.write_bytes((trained / "run" / "model.pt").read_bytes())
    os.symlink(src, tmp_path / "link.pt")
    for dst in (src, tmp_path / "link.pt"):
        assert f"dst {dst} is the file src reads" in refusal(export_checkpoint.main, [str(src), str(dst)])
    held = tmp_path / "held"
    with utils.folders_held([str(held)]):  # as a running training holds its --model_dir
        said = refusal(export_checkpoint.main, [str(src), str(held / "ship.pt")])
        assert f"{held} is in use by process {os.getpid()}" in said and os.listdir(held) == [".lock"]
    assert src.read_bytes() == (trained / "run" / "model.pt").read_bytes()
    assert utils.checkpoint_kind(torch.load(src, weights_only=True), str(src)) == "resumable checkpoint"


@pytest.mark.parametrize("door", ["test_sprite --out = --model_dir", "test_sprite --out = --judge",
                                  "make_figs --metrics = a figure", "time_to_quality JSON = --reference"])
def test_an_output_that_is_an_input_is_refused_before_any_work(trained, tiny_data, tmp_path, door):
    run_dir = a_copy_of_the_run(trained, tmp_path)
    before = {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)}
    if door.startswith("test_sprite"):
        flag = door.split()[-1]
        argv = scoring(trained, tiny_data, "x")
        argv[argv.index("--out") + 1] = argv[argv.index(flag) + 1]
        said = refusal(ts.main, list(map(str, argv)))
    elif door.startswith("make_figs"):
        said = refusal(make_figs.main, list(map(str, ["--model_dir", run_dir, "--data_root", tiny_data,
                                                      "--out", run_dir, "--metrics", run_dir / "loss_curves.png"])))
    else:
        said = refusal(time_to_quality.main, list(map(str, [
            "--run", run_dir, "--judge", trained / "judge.pt", "--data_root", tiny_data, "--out",
            run_dir / "loss_curves.png", "--reference", run_dir / "loss_curves.json"])))
    assert "reads: writing it would destroy that input" in said, said
    assert {f: (run_dir / f).read_bytes() for f in os.listdir(run_dir)} == before


# ---- flags checked against the data at the start ------------------------------------------------------------
def test_flags_the_data_cannot_serve_are_refused_before_an_epoch(trained, tiny_data, tmp_path):
    said = refusal(train_cdsvae.main, TINY + ["--data_root", tiny_data, "--val_chars", "6", "--log_dir",
                                              str(tmp_path / "a")])
    assert "--val_chars 6: cannot hold out 6 of only 6 train characters" in said
    data = {k: v.numpy() for k, v in zip(("X_train", "A_train", "D_train"), load_sprites(tiny_data)["train"])}
    data.update({k: v[:1] for k, v in zip(("X_test", "A_test", "D_test"), (data["X_train"], data["A_train"],
                                                                            data["D_train"]))})
    with open(tmp_path / "one_test_video.pkl", "wb") as f:
        pickle.dump(data, f)
    argv = TINY + ["--data_root", str(tmp_path / "one_test_video.pkl"), "--log_dir", str(tmp_path / "b"),
                   "--judge", str(trained / "judge.pt")]
    argv[argv.index("--evl_interval") + 1] = "1"
    said = refusal(train_cdsvae.main, argv)
    assert "the test split has 1 video(s); periodic scoring's swaps need 2" in said
    assert sorted(os.listdir(tmp_path)) == ["one_test_video.pkl"]


# ---- no record lost to a kill -------------------------------------------------------------------------------
def test_each_snapshot_is_on_disk_before_the_checkpoint_that_passed_its_epoch(tiny_data, tmp_path, monkeypatch):
    landed, replace = [], os.replace

    def noted(src, dst):
        replace(src, dst)
        if os.path.basename(dst) == "model.pt":
            ckpt = torch.load(dst, weights_only=True)
            landed.append((ckpt["epoch"], sorted(f for f in os.listdir(tmp_path) if f.startswith("epoch_"))))

    monkeypatch.setattr(os, "replace", noted)
    train_cdsvae.main(TINY + ["--data_root", tiny_data, "--nEpoch", "1", "--snapshot_every", "1",
                              "--log_dir", str(tmp_path)])
    assert landed == [(1, ["epoch_1.pt"])]


def test_kills_at_random_moments_then_a_resume_leave_a_complete_record(tiny_data, tmp_path):
    """SIGKILL (nothing runs after it) three times at random moments, then the same command to the end: every
    epoch's metrics row and snapshot, the last checkpoint, nothing half-written and no lock left."""
    epochs, rng = 3, random.Random(27)
    argv = [sys.executable, "train_cdsvae.py", *TINY, "--data_root", tiny_data, "--nEpoch", str(epochs),
            "--snapshot_every", "1", "--log_dir", str(tmp_path)]
    lock = tmp_path / ".lock"  # a killed run's stays, with its PID: the next one writes its own
    for _ in range(3):
        resume = ["--resume"] if (tmp_path / "model.pt").exists() else []
        proc = subprocess.Popen(argv + resume, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not (lock.exists() and lock.read_text().strip() == str(proc.pid)):
            time.sleep(0.02)  # its imports done: it loads, trains, writes from now on
        time.sleep(rng.uniform(0.0, 2.5))
        proc.kill()
        proc.wait()
    resume = ["--resume"] if (tmp_path / "model.pt").exists() else []
    done = subprocess.run(argv + resume, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    assert torch.load(tmp_path / "model.pt", weights_only=True)["epoch"] == epochs
    for e in range(1, epochs + 1):
        snapshot = utils.read_checkpoint(str(tmp_path / f"epoch_{e}.pt"))
        assert snapshot["epoch"] == e and [r["epoch"] for r in snapshot["history"]] == list(range(1, e + 1))
    assert not left_behind(tmp_path)
