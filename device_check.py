#!/usr/bin/env python3
"""The one-command device check, for a machine with a CUDA GPU: ./device_check.py

Each stage runs under its own time limit, whatever the others did: the data (made if missing), the
tests that read TEST_DEVICE (with TEST_DEVICE=cuda), bench.py at the paper's sizes with and without
--compile and at the CPU recipe's, then ./run_cdsvae.sh (the paper's recipe) and ./run_cdsvae_cpu.sh
--device cuda, each for as many epochs as fit in BUDGET_S seconds (default 570) at the speed
bench.py measured (EPOCHS_PAPER / EPOCHS_CPU choose), each scored by ./run_test_sprite.sh on the
GPU. Logs and the summary device_check.json (each stage's exit code, seconds and figures) go to
runs/device_check/, the summary to $OUT too. --tiny runs every stage on the CPU at tiny sizes, on
the data of DATA, to check the script itself.
"""
import argparse
import contextlib
import glob
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

from utils import OneLineErrors, run_main, write_json

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN_VIDEOS = 9000  # the Sprites train split: 70 steps of 128 or 140 of 64 an epoch
# each recipe's script, full length (epochs, batch size) and the variable that sets its epochs
RECIPES = {"paper": ("./run_cdsvae.sh", 100, 128, "EPOCHS_PAPER"),
           "cpu_recipe": ("./run_cdsvae_cpu.sh", 28, 64, "EPOCHS_CPU")}
EPOCH_OVERHEAD_S = 2.0  # a GPU epoch's checkpoint, metrics, curves, periodic judge scores
START_S = 25.0  # a training or scoring process's start: torch, the data, the judges
SCORE_S = 60.0  # one ./run_test_sprite.sh on a GPU: 5 runs x 2664 videos x 2 judges, and its start
TINY_MODEL = ("--device", "cpu", "--threads", "1", "--nf", "4", "--batch_size", "8", "--f_dim",
              "8", "--z_dim", "4", "--g_dim", "8", "--rnn_size", "8", "--evl_interval", "0")


def get_args(argv=None):
    p = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="every stage on the CPU at tiny sizes, on $DATA, in about a minute "
                        "(--compile's stage with TORCHDYNAMO_DISABLE=1: compiling is tested apart)")
    p.add_argument("--folder", default=os.path.join(ROOT, "runs", "device_check"),
                   help="where every stage writes (default runs/device_check)")
    args = p.parse_args(argv)
    args.folder = os.path.abspath(args.folder)
    args.data = os.path.abspath(os.environ.get("DATA", os.path.join(ROOT, "data/Sprite/data.pkl")))
    if args.tiny and not os.path.isfile(args.data):
        p.error(f"--tiny runs on a small data set of make_sprites.py: set DATA to one "
                f"({args.data} does not exist)")
    try:
        args.budget_s = float(os.environ.get("BUDGET_S", "570"))
    except ValueError as e:
        p.error(str(e))
    args.epochs = {}  # {recipe: epochs asked, or None: as many as fit}
    for name, (_, _, _, var) in RECIPES.items():
        value = os.environ.get(var, "auto")
        if value != "auto" and not (value.isdigit() and int(value) >= 1):
            p.error(f"{var} must be 'auto' or a positive whole number, got {value!r}")
        args.epochs[name] = None if value == "auto" else int(value)
    return args


def run_stage(check, name, command, limit_s, env=None, reserve_s=0.0):
    """Run `command` in its own process group under a limit, cut so that reserve_s is left before
    the deadline (SIGTERM at the limit, which a training run answers with a checkpoint, SIGKILL
    20 s later), its output to <name>.log; record and return {rc, seconds, limit_s, log}."""
    log = os.path.join(check["folder"], f"{name}.log")
    limit_s = max(10.0, min(limit_s, check["deadline"] - time.time() - reserve_s))
    t = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:  # at the limit, or when this script is stopped: its stage is stopped too
            if proc.poll() is None:
                end_stage(proc)
    stage = {"rc": rc, "seconds": round(time.time() - t, 1), "limit_s": round(limit_s), "log": log}
    if rc != 0:
        stage["tail"] = read(log)[-600:]
    check["stages"][name] = stage
    print(f"{name}: rc {rc}, {stage['seconds']} s", flush=True)
    return stage


def end_stage(proc):
    """SIGTERM to a stage's process group (a training writes its checkpoint), SIGKILL 20 s on."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def read(path):
    return pathlib.Path(path).read_text(errors="replace")


def skip(check, name, why):
    check["stages"][name] = {"rc": None, "skipped": why}
    print(f"{name}: skipped, {why}", flush=True)


def last_json_line(path):
    """The last line of a log that is a JSON object, or {}."""
    for line in reversed(read(path).splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return {}


def benches(check, tiny):
    """bench.py at the paper's sizes (fp32 as its recipe), with --compile, and at the CPU recipe's
    sizes; their JSON lines go into the summary."""
    gpu = ("--device", "cuda", "--steps", "50")
    paper, cpu = gpu + ("--batch_size", "128"), gpu + ("--nf", "32", "--batch_size", "64")
    if tiny:
        paper = cpu = ("--device", "cpu", "--steps", "1", "--threads", "1", "--nf", "4",
                       "--batch_size", "4")
    cpu = ("--amp", "--z_input", "frame_delta", "--f_mirror", "--weight_mi_critic", "10") + cpu
    for name, flags, limit_s, env in (
            ("bench_paper", paper, 90, {}),
            ("bench_paper_compile", paper + ("--compile",), 180,
             {"TORCHDYNAMO_DISABLE": "1"} if tiny else {}),  # compiling on a CPU takes minutes
            ("bench_cpu_recipe", cpu, 60, {})):
        stage = run_stage(check, name, [sys.executable, "bench.py", *flags], limit_s, env)
        stage["figures"] = last_json_line(stage["log"])


def plan_epochs(check, args):
    """{recipe: (epochs, estimated seconds of its training)}: epochs as asked, else all if both
    recipes fit the time left (less their scoring), else the same share of each, at the
    end-to-end speed bench.py measured, plus EPOCH_OVERHEAD_S an epoch."""
    if args.tiny:
        return {name: (1, 60.0) for name in RECIPES}
    left = check["deadline"] - time.time() - 2 * (START_S + SCORE_S)
    epoch_s = {}
    for name, (_, _, batch, _) in RECIPES.items():
        speed = check["stages"][f"bench_{name}"].get("figures", {}).get("end_to_end_per_s")
        speed = speed or 1000.0  # no figure: a guess of a few GPU ms a step with a CPU loader
        epoch_s[name] = TRAIN_VIDEOS // batch * batch / speed + EPOCH_OVERHEAD_S
    full_s = {name: RECIPES[name][1] * s for name, s in epoch_s.items()}
    share = min(1.0, max(0.0, left) / sum(full_s.values()))
    epochs = {name: args.epochs[name] or max(1, int(share * RECIPES[name][1])) for name in RECIPES}
    check["plan"] = {"seconds_left_for_training": round(left), "full_run_s": {
        k: round(v) for k, v in full_s.items()}, "share": round(share, 3), "epochs": epochs}
    return {name: (n, n * epoch_s[name]) for name, n in epochs.items()}


def train_and_score(check, args, name, epochs, estimate_s, later_s):
    """Train one recipe for `epochs` (estimated to take estimate_s, with later_s to leave to the
    stages after), then score its last checkpoint (a run cut short by its limit has one from its
    last complete epoch): protocol A's and B's accuracies and A's IS under each judge."""
    log_dir = os.path.join(check["folder"], name)
    shutil.rmtree(log_dir, ignore_errors=True)
    flags = TINY_MODEL if args.tiny else ("--device", "cuda")
    stage = run_stage(check, f"train_{name}", [RECIPES[name][0], *flags, "--nEpoch", str(epochs),
                                               "--log_dir", log_dir],
                      START_S + 1.5 * estimate_s, {"DATA": args.data, "LOG_DIR": log_dir},
                      reserve_s=SCORE_S + later_s)
    stage["epochs"] = epochs
    rows = []
    with contextlib.suppress(FileNotFoundError), open(f"{log_dir}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if rows:
        stage["last_epoch"] = {k: rows[-1][k] for k in ("epoch", "step", "loss", "recon", "kld_z",
                                                        "mi_fz", "con_f", "con_z") if k in rows[-1]}
        stage["train_seconds"] = round(sum(r["seconds"] for r in rows), 1)
    model = os.path.join(log_dir, "model.pt")
    if not os.path.isfile(model):
        return skip(check, f"score_{name}", f"no checkpoint {model}")
    out = os.path.join(check["folder"], f"score_{name}.json")
    flags = (("--device", "cpu", "--threads", "1", "--niter", "1", "--batch_size", "16")
             if args.tiny else ("--device", "cuda"))
    score = run_stage(check, f"score_{name}", ["./run_test_sprite.sh", *flags], 2 * SCORE_S,
                      {"MODEL": model, "OUT": out, "DATA": args.data}, reserve_s=later_s)
    if score["rc"] == 0:
        with open(out) as f:
            result = json.load(f)
        score["figures"] = {judge: {k: round(v, 2) for k, v in figures["mean"].items()
                                    if k.startswith(("A_", "B_")) and k.endswith(("_acc", "_IS"))}
                            for judge, figures in result["judges"].items()}
        score["figures"].update({k: result.get(k) for k in ("recon_mse_per_pixel", "seconds")})


def main(argv=None):
    args = get_args(argv)
    os.makedirs(args.folder, exist_ok=True)
    os.chdir(ROOT)
    start = time.time()
    check = {"tiny": args.tiny, "budget_s": args.budget_s, "deadline": start + args.budget_s,
             "data": args.data, "folder": args.folder, "stages": {}}
    if not os.path.isfile(args.data):
        run_stage(check, "data", [sys.executable, "make_sprites.py", "--out", args.data], 300)
    if args.tiny:
        skip(check, "tests", "--tiny (the tests run this script)")
    else:  # the test files that read TEST_DEVICE
        files = [f for f in sorted(glob.glob("tests/test_*.py")) if "TEST_DEVICE" in read(f)]
        stage = run_stage(check, "tests", [sys.executable, "-m", "pytest", "-q", *files], 120,
                          {"TEST_DEVICE": "cuda"})
        stage.update(files=files, result=(read(stage["log"]).strip().splitlines() or [""])[-1])
    benches(check, args.tiny)
    plan = plan_epochs(check, args)
    later_s = sum(START_S + seconds + SCORE_S for _, seconds in plan.values())
    for name, (epochs, seconds) in plan.items():
        later_s -= START_S + seconds + SCORE_S  # what the recipes after this one take
        train_and_score(check, args, name, epochs, seconds, later_s)
    del check["deadline"]
    check["seconds"] = round(time.time() - start, 1)
    check["ok"] = all(s["rc"] in (0, None) for s in check["stages"].values())
    write_json(check, os.path.join(args.folder, "device_check.json"))
    if os.path.isdir(os.environ.get("OUT", "")):
        write_json(check, os.path.join(os.environ["OUT"], "device_check.json"))
    print(json.dumps(check))
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    run_main(main)
