#!/usr/bin/env python3
"""The one-command device check, for a machine with a CUDA GPU: ./device_check.py

Every stage runs in its own process under its own time limit, whatever the others did, and is named
in the summary with its status: passed, failed, timeout or "skipped: why". In order:
  alone (speeds): data (make_sprites.py, if missing); bench_eager, bench_compiled, bench_graphed
    (bench.py at the paper's sizes: eager, --compile, --compile_mode reduce-overhead);
    train_paper and train_cpu_recipe (./run_cdsvae.sh, ./run_cdsvae_cpu.sh --device cuda), each for
    as many epochs as fit in BUDGET_S at the speed bench_eager measured (EPOCHS_PAPER / EPOCHS_CPU
    choose);
  then together (checks): tests (those that read TEST_DEVICE, with TEST_DEVICE=cuda), score_paper
    and score_cpu_recipe (./run_test_sprite.sh), fp16 (a few steps, fp16 autocast and loss
    scaling forced), lstm_dtype (the dtype the recurrent layers compute in under bf16 autocast:
    not fp16), sync_audit (steps between two reads under torch.cuda.set_sync_debug_mode("error"):
    none may wait for the GPU), cpu_vs_device (one step's loss terms and gradients on the CPU and
    the GPU, same weights, batch and noise, TF32 off), resume (a run stopped by SIGTERM and resumed
    against the same run uninterrupted), pinned_fallback (--data_on_host: the split in pinned host
    memory, as where it does not fit), compile_train (a few steps with --compile, periodic judge
    scoring included), judge_train (judges/train_judge.py), ddp (torchrun, 2 processes, where there
    are 2 GPUs).
Each limit is at least 1.5x the stage's estimate on one H100-class GPU (its start, scoring and
drawing included); the estimates add up to BUDGET_S (default 540 s: 9 minutes), the data build
included, the recipes' epochs taking what is left. ok is true only when no stage failed or timed
out. Logs and the summary device_check.json go to runs/device_check/, the summary to $OUT too.

--tiny runs every stage that can run on the CPU, at tiny sizes on the data of $DATA, one at a time
and with no time limit (on a CPU a stage passes or fails on what it checks, not on the clock); the
others are skipped, saying why. --stage NAME runs one of the checks done here in-process
(lstm_dtype, cpu_vs_device, resume) and prints its JSON line: the stages run it so.
"""
import argparse
import contextlib
import glob
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
import time

import torch
from torch.overrides import TorchFunctionMode

import model as network
from dataloader import SpriteBatches
from utils import (OneLineErrors, autocast, prepare_for_device, read_checkpoint, run_main,
                   write_json)

ROOT = os.path.dirname(os.path.abspath(__file__))
TRAIN_VIDEOS = 9000  # the Sprites train split: 70 steps of 128 or 140 of 64 an epoch
# each recipe's script, full length (epochs, batch size, periodic scoring every) and its variable
RECIPES = {"paper": ("./run_cdsvae.sh", 100, 128, 10, "EPOCHS_PAPER"),
           "cpu_recipe": ("./run_cdsvae_cpu.sh", 28, 64, 0, "EPOCHS_CPU")}
LIMIT_FACTOR = 1.5  # a stage's limit: at least this times its estimate
# estimated seconds on one H100-class GPU with 16 CPU cores, each stage's process start included;
# guesses until a GPU run measures them (the summary has each stage's seconds beside its limit)
START_S = 15.0  # a training or scoring process's start: torch, CUDA, the data, the judges
EPOCH_OVERHEAD_S = 1.0  # a GPU epoch's end: its checkpoint, metrics (the curves wait for the end)
PLOT_S = 15.0  # the curves a run draws at its end
EVAL_S = 20.0  # one periodic judge scoring on the GPU (2664 videos, 2 judges)
ESTIMATE_S = {"data": 60, "bench_eager": 25, "bench_compiled": 90, "bench_graphed": 60,
              "tests": 90, "score": 60, "fp16": 30, "lstm_dtype": 15, "sync_audit": 30,
              "cpu_vs_device": 30, "resume": 75, "pinned_fallback": 30, "compile_train": 150,
              "judge_train": 60, "ddp": 45}
TOGETHER_S = 150.0  # the checks run together: the longest of them, with some contention
GPU_STEPS = ("--device", "cuda", "--subset", "640", "--batch_size", "64", "--evl_interval", "0")
TINY_MODEL = ("--device", "cpu", "--threads", "1", "--nf", "4", "--batch_size", "8", "--f_dim",
              "8", "--z_dim", "4", "--g_dim", "8", "--rnn_size", "8", "--evl_interval", "0")
TINY_JUDGE = ("--device", "cpu", "--threads", "1", "--nf", "4", "--g_dim", "8", "--rnn_size", "8",
              "--hidden", "8", "--batch_size", "8", "--val_chars", "2")
# the stated tolerances: cuDNN is not bitwise, nor are the CPU's and the GPU's orders of sums
RESUME_REL_L2 = 1e-2  # the weights of a resumed run against the uninterrupted one
TERMS_RTOL = 1e-4  # each loss term, CPU against GPU (TF32 off)
GRAD_REL_L2 = 1e-3  # each parameter's gradient, CPU against GPU


def get_args(argv=None):
    p = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="every stage that can run on the CPU, at tiny sizes on $DATA, no limits "
                        "(--compile's with TORCHDYNAMO_DISABLE=1: compiling is tested apart)")
    p.add_argument("--folder", default=os.path.join(ROOT, "runs", "device_check"),
                   help="where every stage writes (default runs/device_check)")
    p.add_argument("--stage", choices=("lstm_dtype", "cpu_vs_device", "resume"),
                   help="run this check in-process and print its JSON line")
    args = p.parse_args(argv)
    args.folder = os.path.abspath(args.folder)
    args.data = os.path.abspath(os.environ.get("DATA", os.path.join(ROOT, "data/Sprite/data.pkl")))
    if args.tiny and not os.path.isfile(args.data):
        p.error(f"--tiny runs on a small data set of make_sprites.py: set DATA to one "
                f"({args.data} does not exist)")
    try:
        args.budget_s = float(os.environ.get("BUDGET_S", "540"))
    except ValueError as e:
        p.error(str(e))
    args.epochs = {}  # {recipe: epochs asked, or None: as many as fit}
    for name, recipe in RECIPES.items():
        value = os.environ.get(recipe[-1], "auto")
        if value != "auto" and not (value.isdigit() and int(value) >= 1):
            p.error(f"{recipe[-1]} must be 'auto' or a positive whole number, got {value!r}")
        args.epochs[name] = None if value == "auto" else int(value)
    return args


# ---- running stages ------------------------------------------------------------------------------
def read(path):
    return pathlib.Path(path).read_text(errors="replace")


def last_json_line(path):
    """The last line of a log that is a JSON object, or {}."""
    for line in reversed(read(path).splitlines()):
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    return {}


def skip(check, name, why):
    check["stages"][name] = {"status": f"skipped: {why}"}
    print(f"{name}: skipped: {why}", flush=True)


def limit_for(check, estimate_s):
    """At least LIMIT_FACTOR x the estimate; none in --tiny (a CPU's time says nothing)."""
    return None if check["tiny"] else round(LIMIT_FACTOR * estimate_s)


def children_cpu_s():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start(check, name, command, estimate_s, env=None):
    """The stage's process, in its own process group, its output to <name>.log."""
    log = os.path.join(check["folder"], f"{name}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    check["stages"][name] = {"status": "running", "estimate_s": estimate_s,
                             "limit_s": limit_for(check, estimate_s), "log": log}
    return proc, time.time()


def stop(proc):
    """SIGTERM to the stage's process group (a training run writes its checkpoint), SIGKILL 20 s
    later."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_stages(check, specs, together=False):
    """Run the stages of specs [(name, command, estimate_s, env, then)] one at a time, or together
    (not in --tiny: one CPU), and record each: status, exit code, seconds; then(check, stage)
    adds its figures and may fail it."""
    batches = [specs] if together and not check["tiny"] else [[spec] for spec in specs]
    for batch in batches:
        cpu = children_cpu_s()
        # together, a dozen processes share the CPU cores
        threads = {"OMP_NUM_THREADS": "4"} if len(batch) > 1 else {}
        running = {name: (start(check, name, command, estimate_s, {**threads, **env}), then)
                   for name, command, estimate_s, env, then in batch}
        try:
            wait_for(check, running)
        finally:  # when this script is stopped, its stages are stopped too
            for (proc, _), _ in running.values():
                if proc.poll() is None:
                    stop(proc)
        if len(batch) == 1:  # alone: the CPU seconds its processes took are its own
            check["stages"][batch[0][0]]["cpu_s"] = round(children_cpu_s() - cpu, 1)


def wait_for(check, running):
    """Until every stage of running {name: ((proc, start), then)} ends or passes its limit."""
    while running:
        time.sleep(0.2)
        for name, ((proc, t), then) in list(running.items()):
            stage = check["stages"][name]
            late = stage["limit_s"] is not None and time.time() - t > stage["limit_s"]
            if proc.poll() is None and not late:
                continue
            if late:
                stop(proc)
            del running[name]
            finish(check, name, proc.returncode, time.time() - t, late, then)


def finish(check, name, rc, seconds, late, then):
    """Record a stage's end; then(check, stage), where it ran to its end, adds its figures and
    returns why it failed, if it did."""
    stage = check["stages"][name]
    stage.update(rc=rc, seconds=round(seconds, 1),
                 status="timeout" if late else "passed" if rc == 0 else "failed")
    try:
        why = then(check, stage) if then is not None and not late else None
    except Exception as e:  # a stage's figures missing or odd fails that stage, not the check
        why = f"its figures: {type(e).__name__}: {e}"
    if why and stage["status"] == "passed":
        stage.update(status="failed", why=why)
    if stage["status"] != "passed":
        stage["tail"] = read(stage["log"])[-600:]
    print(f"{name}: {stage['status']}, {stage['seconds']} s", flush=True)


def json_figures(check, stage):
    """The stage's JSON line as its figures; a stage that prints none failed."""
    stage["figures"] = last_json_line(stage["log"])
    return None if stage["figures"] else "no JSON line in its log"


def training_figures(folder):
    """A training's last metrics row, its checkpoint's step and scaler: what there is of them."""
    figures, rows = {}, []
    with contextlib.suppress(FileNotFoundError), open(f"{folder}/metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if rows:
        figures["last_epoch"] = {k: rows[-1][k] for k in (
            "epoch", "step", "loss", "recon", "kld_z", "mi_fz", "con_f", "con_z", "seconds",
            "overhead_s") if k in rows[-1]}
        figures["train_seconds"] = round(sum(r["seconds"] for r in rows), 1)
        figures["judge_scores"] = sum(k.startswith("eval_") for k in rows[-1])  # periodic ones
    with contextlib.suppress(FileNotFoundError):
        ckpt = read_checkpoint(f"{folder}/model.pt")
        figures.update(step=ckpt["step"], scaler=ckpt["scaler"])
    return figures


# ---- the stages ----------------------------------------------------------------------------------
def bench_specs(tiny):
    """bench.py at the paper's sizes (fp32, as its recipe): eager, compiled, CUDA graphs."""
    flags = ("--device", "cuda", "--steps", "50", "--batch_size", "128")
    if tiny:
        flags = ("--device", "cpu", "--steps", "1", "--threads", "1", "--nf", "4",
                 "--batch_size", "4")
    # compiling on a CPU takes minutes: the tiny check runs the compiled stage's code eagerly
    compiled_env = {"TORCHDYNAMO_DISABLE": "1"} if tiny else {}
    return [(f"bench_{name}", [sys.executable, "bench.py", *flags, *extra],
             ESTIMATE_S[f"bench_{name}"], env, json_figures)
            for name, extra, env in (("eager", ("--profile",), {}),
                                     ("compiled", ("--compile",), compiled_env),
                                     ("graphed", ("--compile_mode", "reduce-overhead"), {}))]


def speeds_vs_eager(check):
    """The compiled and the graphed step's speed over the eager one's, where both were measured."""
    speed = {name: check["stages"][f"bench_{name}"].get("figures", {}).get("step_per_s")
             for name in ("eager", "compiled", "graphed")}
    return {name: round(speed[name] / speed["eager"], 3) for name in ("compiled", "graphed")
            if speed[name] and speed["eager"]}


def plan_epochs(check, args):
    """{recipe: (epochs, estimated seconds of its training)}: epochs as asked, else all if both
    recipes fit the time left (less the checks run together after them), else the same share of
    each, at the end-to-end speed bench_eager measured (the CPU recipe, cheaper a video, planned
    at the paper's speed)."""
    if args.tiny:
        return {name: (1, 60.0) for name in RECIPES}
    speed = check["stages"]["bench_eager"].get("figures", {}).get("end_to_end_per_s") or 1000.0
    left = check["deadline"] - time.time() - TOGETHER_S - len(RECIPES) * (START_S + PLOT_S)
    epoch_s = {name: TRAIN_VIDEOS // batch * batch / speed + EPOCH_OVERHEAD_S
               + (EVAL_S / every if every else 0.0)
               for name, (_, _, batch, every, _) in RECIPES.items()}
    full_s = {name: RECIPES[name][1] * s for name, s in epoch_s.items()}
    share = min(1.0, max(0.0, left) / sum(full_s.values()))
    epochs = {name: args.epochs[name] or max(1, int(share * RECIPES[name][1])) for name in RECIPES}
    check["plan"] = {"seconds_left_for_training": round(left), "full_run_s": {
        k: round(v) for k, v in full_s.items()}, "share": round(share, 3), "epochs": epochs}
    return {name: (n, START_S + PLOT_S + n * epoch_s[name]) for name, n in epochs.items()}


def train_recipes(check, args):
    """Each recipe trained for its planned epochs, one after the other (their speeds are figures);
    -> the scoring stages of those that left a checkpoint."""
    scores = []
    for name, (epochs, estimate_s) in plan_epochs(check, args).items():
        log_dir = os.path.join(check["folder"], name)
        shutil.rmtree(log_dir, ignore_errors=True)
        flags = TINY_MODEL if args.tiny else ("--device", "cuda")
        run_stages(check, [(f"train_{name}", [RECIPES[name][0], *flags, "--nEpoch", str(epochs),
                                              "--log_dir", log_dir], estimate_s,
                            {"DATA": args.data, "LOG_DIR": log_dir},
                            lambda c, stage, d=log_dir: stage.update(training_figures(d)))])
        model = os.path.join(log_dir, "model.pt")
        if not os.path.isfile(model):
            skip(check, f"score_{name}", f"no checkpoint {model}")
            continue
        out = os.path.join(check["folder"], f"score_{name}.json")
        flags = (("--device", "cpu", "--threads", "1", "--niter", "1", "--batch_size", "16")
                 if args.tiny else ("--device", "cuda"))
        scores.append((f"score_{name}", ["./run_test_sprite.sh", *flags], ESTIMATE_S["score"],
                       {"MODEL": model, "OUT": out, "DATA": args.data},
                       lambda c, stage, out=out: stage.update(figures=score_figures(out))))
    return scores


def score_figures(path):
    """Protocol A's and B's accuracies and A's IS under each judge, the reconstruction, seconds."""
    with open(path) as f:
        result = json.load(f)
    figures = {judge: {k: round(v, 2) for k, v in figures["mean"].items()
                       if k.startswith(("A_", "B_")) and k.endswith(("_acc", "_IS"))}
               for judge, figures in result["judges"].items()}
    figures.update({k: result.get(k) for k in ("recon_mse_per_pixel", "seconds")})
    return figures


def check_specs(check, args, gpus):
    """The checks no CPU test reaches, as stage specs; those that cannot run here are skipped."""
    folder, py = check["folder"], sys.executable
    steps = TINY_MODEL if args.tiny else GPU_STEPS
    data = ("--data_root", args.data)
    here = ("--tiny",) if args.tiny else ()

    def train(name, *flags, then=None, env=None):
        log_dir = os.path.join(folder, name)
        shutil.rmtree(log_dir, ignore_errors=True)
        return (name, [py, "train_cdsvae.py", *steps, *data, *flags, "--log_dir", log_dir],
                ESTIMATE_S[name], env or {}, then or (lambda c, stage: stage.update(
                    training_figures(log_dir))))

    def in_process(name):
        return (name, [py, "device_check.py", "--stage", name, "--folder", folder, *here],
                ESTIMATE_S[name], {"DATA": args.data}, json_figures)
    specs = [train("fp16", "--amp", "fp16", "--max_steps", "4", then=loss_scaled),
             in_process("lstm_dtype"), in_process("resume"),
             # one epoch, scored (its eval graphs compiled too); on a GPU the bench's batch, whose
             # graphs inductor has cached; compiling on a CPU takes minutes: eager in --tiny
             train("compile_train", "--compile", "--evl_interval", "1", "--nEpoch", "1",
                   *(() if args.tiny else ("--subset", "512", "--batch_size", "128")),
                   env={"TORCHDYNAMO_DISABLE": "1"} if args.tiny else None),
             ("judge_train", [py, "judges/train_judge.py", *data, "--nEpoch", "1",
                              "--out", os.path.join(folder, "judge.pt"),
                              "--ckpt", os.path.join(folder, "judge_last.pt"),
                              *(TINY_JUDGE if args.tiny else ("--device", "cuda"))],
              ESTIMATE_S["judge_train"], {}, None)]
    if args.tiny:
        for name, why in (("tests", "--tiny (the tests run this script)"),
                          ("sync_audit", "set_sync_debug_mode watches a GPU; none here"),
                          ("cpu_vs_device", "no device but the CPU"),
                          ("pinned_fallback", "on a CPU the split is always in host memory")):
            skip(check, name, why)
    else:
        files = [f for f in sorted(glob.glob("tests/test_*.py")) if "TEST_DEVICE" in read(f)]
        specs += [("tests", [py, "-m", "pytest", "-q", *files, "-k", "not device_check_tiny"],
                   ESTIMATE_S["tests"], {"TEST_DEVICE": "cuda"},
                   lambda c, stage: stage.update(files=files, result=(
                       read(stage["log"]).strip().splitlines() or [""])[-1])),
                  train("sync_audit", "--sync_debug", "error", "--log_every", "3",
                        "--max_steps", "10", then=audited_steps),
                  in_process("cpu_vs_device"),
                  train("pinned_fallback", "--data_on_host", "--max_steps", "10")]
    if gpus >= 2:
        log_dir = os.path.join(folder, "ddp")
        shutil.rmtree(log_dir, ignore_errors=True)
        specs.append(("ddp", [py, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2", "train_cdsvae.py", *steps, *data,
                              "--max_steps", "6", "--sync_bn", "--log_dir", log_dir],
                      ESTIMATE_S["ddp"], {}, lambda c, stage: stage.update(
                          training_figures(log_dir))))
    else:
        skip(check, "ddp", f"{gpus} GPU(s) here: its 2 processes need 2 (the CPU's "
                           f"2-process training is in the tests)")
    return specs


def loss_scaled(check, stage):
    """fp16: the run kept a loss scale (GradScaler on), its loss finite (else it exits 1)."""
    stage.update(training_figures(os.path.join(check["folder"], "fp16")))
    return None if stage.get("scaler", {}).get("scale") else "no loss scale in its checkpoint"


def audited_steps(check, stage):
    """sync_audit: how many steps ran under the mode, which fails a run at the first wait."""
    said = [line for line in read(os.path.join(check["folder"], "sync_audit", "log.txt"))
            .splitlines() if line.startswith("--sync_debug")]
    stage["figures"] = {"steps_audited": int(said[-1].split()[2]) if said else 0}
    return None if stage["figures"]["steps_audited"] else "no step ran under the mode"



# ---- the checks run in-process (--stage NAME) ----------------------------------------------------
class RecurrentDtypes(TorchFunctionMode):
    """{recurrent call (lstm, rnn_tanh, lstm_cell): the dtype of what it returns}."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if "rnn" in name or "lstm" in name:
            self.seen[name] = str((out[0] if isinstance(out, tuple) else out).dtype)[6:]
        return out


def stage_lstm_dtype(device, tiny):
    """The dtype the recurrent layers compute in under bf16 autocast on `device`, as training
    runs them; fp16 fails (a bf16 run scales no loss)."""
    torch.manual_seed(0)
    sizes = dict(f_dim=8, z_dim=4, g_dim=8, rnn_size=8, nf=4) if tiny else {}
    model = prepare_for_device(network.CDSVAE(**sizes).to(device), device)
    x = torch.rand(4, 8, 3, 64, 64, device=device)
    with RecurrentDtypes() as recurrent, autocast(device, "bf16"):
        model(x, m_aug=x, c_aug_order=torch.arange(8, device=device).expand(4, 8))
    return {"device": str(device), "prior_one_call": model.prior_one_call,
            "recurrent_dtypes": recurrent.seen}, (
        bool(recurrent.seen) and "float16" not in recurrent.seen.values())


@contextlib.contextmanager
def noise_from_the_cpu(seed):
    """model.reparameterize drawing its noise from one seeded CPU generator (then moved to the
    device), so that two devices sample alike."""
    g, plain = torch.Generator().manual_seed(seed), network.reparameterize

    def sample(mean, logvar, random=True):
        if not random:
            return mean
        eps = torch.randn(mean.shape, generator=g).to(mean.device)
        return mean.float() + eps * torch.exp(0.5 * logvar.float())
    network.reparameterize = sample
    try:
        yield
    finally:
        network.reparameterize = plain


def one_step(device, batch):
    """({term: value}, {parameter: gradient}) of one training step of the paper's model (its
    weights seeded alike) on `batch`, on `device`, fp32, the noise drawn on the CPU."""
    torch.manual_seed(0)
    model = prepare_for_device(network.CDSVAE().to(device), device)
    batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    with noise_from_the_cpu(1):
        out = model(batch["x"], m_aug=batch["m_aug"], c_aug_order=batch["c_aug_order"])
    loss, terms = network.cdsvae_loss(out, batch["x"], TRAIN_VIDEOS)
    loss.backward()
    return ({k: v.item() for k, v in terms.items()},
            {k: p.grad.cpu() for k, p in model.named_parameters() if p.grad is not None})


def stage_cpu_vs_device():
    """One step on the CPU and on the GPU, TF32 off: the loss terms within TERMS_RTOL, each
    gradient within GRAD_REL_L2 (relative L2 error)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    X = torch.randint(0, 256, (8, 8, 64, 64, 3), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(8, 4, dtype=torch.long), torch.zeros(8, dtype=torch.long)
    batch = next(iter(SpriteBatches(X, *labels, 8, augment=True, content_view=False)))
    (cpu_terms, cpu_grads), (gpu_terms, gpu_grads) = (
        one_step(torch.device(d), batch) for d in ("cpu", "cuda"))
    terms = {k: abs(gpu_terms[k] - v) / max(abs(v), 1e-6) for k, v in cpu_terms.items()}
    grads = {k: ((gpu_grads[k] - g).norm() / g.norm().clamp_min(1e-12)).item()
             for k, g in cpu_grads.items()}
    worst = max(grads, key=grads.get)
    figures = {"terms_rtol": TERMS_RTOL, "grad_rel_l2": GRAD_REL_L2, "cpu_terms": cpu_terms,
               "terms_rel_diff": {k: float(f"{v:.3g}") for k, v in terms.items()},
               "worst_grad": worst, "worst_grad_rel_l2": float(f"{grads[worst]:.3g}")}
    return figures, max(terms.values()) <= TERMS_RTOL and grads[worst] <= GRAD_REL_L2


def stage_resume(args):
    """A run stopped by SIGTERM in its second (last) epoch, then resumed, against the same run
    uninterrupted: the weights within RESUME_REL_L2 (relative L2 error; 0 on a CPU)."""
    folder = os.path.join(args.folder, "resume")
    shutil.rmtree(folder, ignore_errors=True)
    train = [sys.executable, "train_cdsvae.py", *(TINY_MODEL if args.tiny else GPU_STEPS),
             "--data_root", args.data, "--nEpoch", "2", "--log_dir"]
    whole, cut = os.path.join(folder, "whole"), os.path.join(folder, "cut")
    if subprocess.run(train + [whole], cwd=ROOT).returncode:
        return {"why": "the uninterrupted run failed"}, False
    proc = subprocess.Popen(train + [cut], cwd=ROOT)
    while proc.poll() is None and not os.path.exists(os.path.join(cut, "metrics.jsonl")):
        time.sleep(0.05)  # the first epoch's row: the stop lands in the second
    proc.send_signal(signal.SIGTERM)
    stopped = proc.wait() == 128 + signal.SIGTERM
    stop_line = [line for line in read(os.path.join(cut, "log.txt")).splitlines()
                 if line.startswith("stopped by")]
    if not stopped or subprocess.run(train + [cut, "--resume"], cwd=ROOT).returncode:
        return {"why": "no stop by SIGTERM, or the resumed run failed"}, False
    a, b = (read_checkpoint(os.path.join(d, "model.pt")) for d in (whole, cut))
    weights = [k for k, v in a["model"].items() if v.is_floating_point()]
    flat = [torch.cat([d["model"][k].flatten().double() for k in weights]) for d in (a, b)]
    rel = ((flat[1] - flat[0]).norm() / flat[0].norm()).item()
    return {"stopped": stop_line[-1] if stop_line else None, "tolerance": RESUME_REL_L2,
            "weights_rel_l2": float(f"{rel:.3g}"), "step": [a["step"], b["step"]],
            "last_loss": [a["history"][-1]["loss"], b["history"][-1]["loss"]]}, (
        rel <= RESUME_REL_L2 and a["step"] == b["step"])


def run_in_process(args):
    """--stage NAME: one check in this process, its JSON line; exit 0 when it holds."""
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.stage == "resume":
        figures, ok = stage_resume(args)
    elif args.stage == "lstm_dtype":
        figures, ok = stage_lstm_dtype(device, args.tiny)
    else:
        figures, ok = stage_cpu_vs_device()
    print(json.dumps({**figures, "ok": ok}), flush=True)
    return 0 if ok else 1


def main(argv=None):
    args = get_args(argv)
    if args.stage:
        return run_in_process(args)
    os.makedirs(args.folder, exist_ok=True)
    os.chdir(ROOT)
    t0 = time.time()
    check = {"tiny": args.tiny, "budget_s": args.budget_s, "deadline": t0 + args.budget_s,
             "data": args.data, "folder": args.folder, "stages": {}}
    if os.path.isfile(args.data):
        skip(check, "data", f"{args.data} exists")
    else:
        run_stages(check, [("data", [sys.executable, "make_sprites.py", "--out", args.data],
                            ESTIMATE_S["data"], {}, None)])
    benches = bench_specs(args.tiny)
    if args.tiny:
        skip(check, "bench_graphed", "CUDA graphs need a GPU")
        benches = benches[:2]
    run_stages(check, benches)  # alone: speeds
    check["step_speed_vs_eager"] = speeds_vs_eager(check)
    scores = train_recipes(check, args)  # alone: their speed is a figure too
    run_stages(check, scores + check_specs(check, args, torch.cuda.device_count()), together=True)
    del check["deadline"]
    check["seconds"] = round(time.time() - t0, 1)
    check["ok"] = all(s["status"] == "passed" or s["status"].startswith("skipped")
                      for s in check["stages"].values())
    write_json(check, os.path.join(args.folder, "device_check.json"))
    if os.path.isdir(os.environ.get("OUT", "")):
        write_json(check, os.path.join(os.environ["OUT"], "device_check.json"))
    print(json.dumps(check))
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    run_main(main)
