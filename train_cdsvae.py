"""Train C-DSVAE on Sprites or, with --dataset smmnist, Stochastic Moving MNIST (with --model dsvae,
the DSVAE baseline).

    python train_cdsvae.py --data_root data/Sprite/data.pkl --log_dir runs/paper   # one process
    python train_cdsvae.py --dataset smmnist --log_dir runs/smmnist                # Moving MNIST
    torchrun --nproc_per_node=2 train_cdsvae.py ...                                # DDP
    python train_cdsvae.py --log_dir runs/paper --resume                           # continue a run

Writes log.txt, metrics.jsonl (a row per epoch), TensorBoard events and, at the run's end or
stop, loss_curves.png to --log_dir, the resumable checkpoint model.pt to --model_dir. SIGINT /
SIGTERM / SIGHUP write a checkpoint and exit with 130 / 143 / 129. Read top to bottom: arguments,
set-up, one epoch, the end of an epoch, main.
"""
import argparse
import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from benchmarks import add_dataset_flag, benchmark_of
from dataloader import DataError, SpriteBatches, validation_split
from evaluation import evaluate
from judges.networks import SHIPPED_JUDGES, judge_name, load_judge
from model import CDSVAE, FZCritic, cdsvae_loss, critic_loss
from utils import (MODEL_ARGS, REMOVED_AT, REMOVED_TRAIN_ARGS, CheckpointError, OneLineErrors,
                   add_amp_flag, add_compile_flags, append_text, autocast, check_compile_flags,
                   cuda_asked, grad_scaler, load_adam_state, precision_note, progress,
                   check_sizes, compile_model, folders_held, git_revision, half_precision,
                   make_adam, mismatched_model_args, pick_device, plot_loss_curves,
                   prepare_for_device, read_resumable_checkpoint, run_main, save_atomic,
                   write_text)


# ---- arguments -----------------------------------------------------------------------------------
def get_args(argv=None):
    p = OneLineErrors(description="Train C-DSVAE on Sprites or Stochastic Moving MNIST. Each "
                      "option's reasoning: README.md.")
    arg = p.add_argument
    # optimisation
    arg("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    arg("--batch_size", type=int, default=128, help="videos a step, all processes (default 128)")
    arg("--nEpoch", type=int, default=100, help="epochs to train in all (default 100)")
    arg("--sche", choices=("const", "cosine", "step", "cosine_to_zero"), default="const",
        help="learning-rate schedule; cosine and step are the paper repo's (default const)")
    arg("--sche_epochs", type=int, default=0,
        help="epochs the schedule spans; more than --nEpoch stops the run part of the way along it "
             "(the AVX2 recipe: 16 of 28) (default 0: --nEpoch)")
    arg("--seed", type=int, default=1, help="random seed (default 1)")
    arg("--max_steps", type=int, default=0, help="stop after this many steps (default 0: none)")
    # the network
    arg("--model", choices=("cdsvae", "dsvae"), default="cdsvae",
        help="the paper's objective, or the DSVAE baseline without views (default cdsvae)")
    arg("--f_dim", type=int, default=256, help="size of the static latent f (default 256)")
    arg("--z_dim", type=int, default=32, help="size of each dynamic latent z_t (default 32)")
    arg("--g_dim", type=int, default=128, help="size of the per-frame feature (default 128)")
    arg("--rnn_size", type=int, default=256, help="hidden size of the LSTMs and RNN (default 256)")
    arg("--nf", type=int, default=64, help="conv width: nf, 2nf, 4nf, 8nf channels (default 64)")
    arg("--z_input", choices=("bilstm", "frame_delta", "full"), default="bilstm",
        help="what q(z|x) reads (default bilstm, the paper's)")
    arg("--f_mirror", action=argparse.BooleanOptionalAction, default=False,
        help="q(f|x) reads the video and its mirror image alike (default off)")
    arg("--f_head_leaky", action="store_true", help="q(f|x)'s heads end in LeakyReLU (paper)")
    arg("--deconv_init", choices=("normal", "default"), default="normal",
        help="ConvTranspose2d init: N(0, 0.01) (normal) or PyTorch's (default, the paper's)")
    # the loss
    arg("--weight_rec", type=float, default=1.0, help="weight of the reconstruction (default 1)")
    arg("--weight_f", type=float, default=1.0, help="weight of KL(q(f|x) || N(0, I)) (default 1)")
    arg("--weight_z", type=float, default=1.0, help="weight of KL(q(z|x) || p(z)) (default 1)")
    arg("--weight_mi", type=float, default=1.0, help="weight of the MI(f; z) penalty (default 1)")
    arg("--weight_mi_after", nargs=2, type=float, metavar=("STEP", "WEIGHT"), default=None,
        help="from step STEP of the run on, the MI weight is WEIGHT (default: none)")
    arg("--weight_mi_critic", type=float, default=0.0,
        help="weight of a density-ratio critic's I(f; z) estimate (default 0: off)")
    arg("--lr_critic", type=float, default=1e-3, help="Adam learning rate of the critic (1e-3)")
    arg("--weight_c_aug", type=float, default=10.0, help="weight of the content InfoNCE (10)")
    arg("--weight_m_aug", type=float, default=10.0, help="weight of the motion InfoNCE (10)")
    arg("--temperature", type=float, default=0.5, help="NT-Xent temperature (default 0.5)")
    # data and outputs
    add_dataset_flag(arg)
    arg("--motion_view", default=None, help="C-DSVAE's motion view: colour on sprites (its only "
        "one); digit (the default: another digit on the same path) or stroke on smmnist")
    arg("--subset", type=int, default=0, help="the first N train videos only (default 0: all)")
    arg("--val_chars", type=int, default=0, help="train characters held out, logged as val_* (0)")
    arg("--log_dir", default="runs/cdsvae", help="folder of logs and curves (default runs/cdsvae)")
    arg("--model_dir", default=None, help="folder of the checkpoint model.pt (default: --log_dir)")
    arg("--log_every", type=int, default=0,
        help="steps between host reads of the loss (default 0: 1 on a CPU, 25 on a GPU)")
    arg("--snapshot_every", type=int, default=0,
        help="keep a half-precision epoch_<N>.pt every this many epochs (default 0: none)")
    arg("--resume", action="store_true", help="continue from model_dir/model.pt")
    # periodic scoring
    arg("--evl_interval", type=int, default=10,
        help="score with the judges every this many epochs (default 10; 0: never)")
    arg("--judge", action="append", default=None,
        help="judge file, repeatable (default: the shipped judges that exist)")
    # hardware
    arg("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if any")
    add_amp_flag(arg)
    arg("--threads", type=int, default=0, help="CPU threads per process (default 0: torch's)")
    arg("--sync_bn", action="store_true",
        help="SyncBatchNorm across processes under torchrun (GPUs only)")
    add_compile_flags(arg)
    arg("--data_on_host", action="store_true", help="keep the split in pinned host memory and copy "
        "each batch's rows, as where the device cannot hold it (a check of that path)")
    arg("--sync_debug", choices=("off", "warn", "error"), default="off",
        help="run the steps between two reads of the loss under torch.cuda.set_sync_debug_mode: "
             "warn or fail at any wait for the GPU (a GPU only; default off)")
    args = p.parse_args(argv)
    check_args(p, args)
    check_data_args(p, args)
    args.model_dir = args.model_dir or args.log_dir
    return args


def check_data_args(p, args):
    """The data set's file and motion view, each refused in one line if not the data set's."""
    bench = benchmark_of(args)
    try:
        bench.motion_view(args.motion_view)
    except ValueError as e:
        p.error(str(e))


def check_args(p, args):
    """Refuse, in one line, numbers the run cannot mean."""
    rules = ((("nEpoch", "f_dim", "z_dim", "g_dim", "rnn_size", "nf"), "positive", lambda v: v > 0),
             (("batch_size",), "at least 2 (InfoNCE contrasts the videos of a batch)",
              lambda v: v >= 2),
             (("threads", "subset", "val_chars", "max_steps", "evl_interval", "snapshot_every",
               "log_every", "sche_epochs"), "0 or more", lambda v: v >= 0),
             (("lr", "temperature", "lr_critic"), "a positive number",
              lambda v: math.isfinite(v) and v > 0),
             (("weight_rec", "weight_f", "weight_z", "weight_mi", "weight_c_aug", "weight_m_aug"),
              "a finite number", math.isfinite),
             (("weight_mi_critic",), "0 (off) or positive", lambda v: math.isfinite(v) and v >= 0))
    for names, what, ok in rules:
        for name in names:
            if not ok(getattr(args, name)):
                p.error(f"--{name} must be {what}, got {getattr(args, name)}")
    if args.model == "dsvae" and (args.weight_mi_after or args.weight_mi_critic):
        p.error("--model dsvae has no augmented views, InfoNCE or MI terms: "
                "--weight_mi_after and --weight_mi_critic do not apply")
    check_device_flags(p, args)
    if args.weight_mi_after:
        after, weight = args.weight_mi_after
        if not (after >= 0 and after.is_integer() and math.isfinite(weight)):
            p.error(f"--weight_mi_after takes a step (a whole number, 0 or more) and a weight, "
                    f"got {after:g} {weight:g}")
        args.weight_mi_after = [int(after), weight]


def check_device_flags(p, args):
    """Refuse, in one line and before anything starts, what only a GPU runs: under torchrun the
    first process says why, the others exit with it."""
    check_compile_flags(p, args)
    gpu = cuda_asked(args.device)
    for flag, needs in ((args.sync_bn, "--sync_bn: SyncBatchNorm runs on CUDA GPUs only; on CPUs "
                         "drop it (each process then normalises by its own share of the batch)"),
                        (args.sync_debug != "off", "--sync_debug watches the waits for a GPU; "
                         "there is none here: drop it")):
        if flag and not gpu:
            if int(os.environ.get("RANK", "0")):
                sys.exit(2)
            p.error(needs)


def lr_lambda(sche, n_epoch, steps_per_epoch, lr):
    """The learning rate's factor at each step (the paper repo steps its schedulers each epoch)."""
    total = max(1, n_epoch * steps_per_epoch)
    if sche == "cosine_to_zero":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if sche == "cosine":  # CosineAnnealingWarmRestarts(T_0=(nEpoch+1)//2, eta_min=2e-4)
        period, floor = max(1, (n_epoch + 1) // 2), 2e-4 / lr
        return lambda step: floor + (1 - floor) * 0.5 * (
            1 + math.cos(math.pi * (step // steps_per_epoch % period) / period))
    if sche == "step":  # StepLR(step_size=nEpoch//2, gamma=0.5)
        return lambda step: 0.5 ** (step // steps_per_epoch // max(1, n_epoch // 2))
    return lambda step: 1.0


def schedule_epochs(args):
    """The epochs a run's schedule spans (--sche_epochs, 0 or absent meaning --nEpoch)."""
    return args.get("sche_epochs") or args["nEpoch"]


def loss_weights(args, step):
    """cdsvae_loss's weights at a step; DSVAE has no MI penalty (its estimate is still logged)."""
    after = args.weight_mi_after
    weight_mi = after[1] if after and step >= after[0] else args.weight_mi
    return {"weight_rec": args.weight_rec, "weight_f": args.weight_f, "weight_z": args.weight_z,
            "weight_mi": 0.0 if args.model == "dsvae" else weight_mi,
            "weight_c_aug": args.weight_c_aug, "weight_m_aug": args.weight_m_aug,
            "weight_critic": args.weight_mi_critic, "temperature": args.temperature}


# ---- set-up --------------------------------------------------------------------------------------
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop:
    """A signal of SIGNALS: finish the step, write a checkpoint, exit with 128 + the signal."""
    signum, before = 0, {}

    @classmethod
    def install(cls):
        cls.signum = 0
        cls.before = {s: signal.signal(s, cls.request) for s in SIGNALS}

    @classmethod
    def uninstall(cls):
        """The handlers of before the loop (utils.run_main's: a signal from here on ends the
        process in one line, torchrun's included)."""
        for s, handler in cls.before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        cls.before = {}

    @classmethod
    def request(cls, signum, frame):
        """Said at once: a step can take seconds, and silence looks like a hang."""
        if not cls.signum and int(os.environ.get("RANK", "0")) == 0:
            print(f"\n{signal.Signals(signum).name}: stopping after this step (the checkpoint is "
                  f"written, then the run exits {128 + signum})", file=sys.stderr, flush=True)
        cls.signum = cls.signum or signum


def setup_processes(args):
    """(device, rank, world): one process, or one of torchrun's (NCCL on GPUs, gloo on CPUs)."""
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def gather_rows(t):
    """The whole batch's rows of t in rank order; the gradient reaches each process's own rows."""
    return torch.cat(dist_nn.all_gather(t.contiguous()))


def load_judges(args, device):
    """({name: judge} for periodic scoring, [paths of judge files that do not exist])."""
    judges, missing = {}, []
    for path in args.judge or SHIPPED_JUDGES:
        if not os.path.isfile(path):
            missing.append(path)
            continue
        try:
            judges[judge_name(path)] = load_judge(path, device)
        except CheckpointError as e:
            sys.exit(f"error: --judge: {e}")
    return judges, missing


def load_data(run):
    """The train split (or --subset) less --val_chars characters, its loaders, the test split."""
    args = run.args
    bench = benchmark_of(args)
    try:
        data = bench.load(args.data_root)
    except DataError as e:
        sys.exit(f"error: {e}")
    X, A, D = data["train"]
    if args.subset:
        X, A, D = X[:args.subset], A[:args.subset], D[:args.subset]
    try:
        (X, A, D), val = validation_split(X, A, D, args.val_chars, seed=args.seed,
                                          groups=bench.groups)
    except ValueError as e:
        sys.exit(f"error: --val_chars {args.val_chars}: {e}; hold out fewer")
    if len(X) < args.batch_size:
        sys.exit(f"error: {len(X)} training videos are fewer than --batch_size {args.batch_size}")
    if run.judges and len(data["test"][0]) < 2:  # found now, not after an epoch of training
        sys.exit(f"error: {args.data_root}: the test split has {len(data['test'][0])} video(s); "
                 f"periodic scoring's swaps need 2: use --evl_interval 0, or other data")
    augment = args.model == "cdsvae"
    # the model shuffles x's frame features for the content view, so its tensor is not made
    view = bench.motion_view(args.motion_view)
    run.loader = SpriteBatches(X, A, D, args.batch_size // run.world, shuffle=True, augment=augment,
                               seed=args.seed, drop_last=True, rank=run.rank, world_size=run.world,
                               content_view=False, device=run.device, on_host=args.data_on_host,
                               motion_view=view)
    run.val_loader = (SpriteBatches(*val, args.batch_size, augment=augment, seed=args.seed,
                                    content_view=False, device=run.device, motion_view=view)
                      if args.val_chars else None)
    run.n_train, run.frames, run.test = len(X), X.shape[1], data["test"]
    run.channels = X.shape[-1]


def build_networks(run):
    """The model, its optimizer, schedule and grad scaler; the critic and its optimizer."""
    args, device = run.args, run.device
    torch.manual_seed(args.seed)  # the critic is trained on the whole batch in every process
    run.critic = (FZCritic(args.f_dim, args.z_dim, run.frames).to(device)
                  if args.weight_mi_critic else None)
    run.critic_optimizer = (make_adam(run.critic.parameters(), device, lr=args.lr_critic,
                                      betas=(0.5, 0.9)) if run.critic is not None else None)
    torch.manual_seed(args.seed + run.rank)
    run.model_args = {k: getattr(args, k) for k in MODEL_ARGS if hasattr(args, k)}
    run.model_args.update(frames=run.frames, channels=run.channels,
                          deconv_normal=args.deconv_init == "normal")
    model = prepare_for_device(CDSVAE(**run.model_args).to(device), device)
    if args.compile:
        compile_model(model, args.compile_mode)
    run.raw_model = run.model = model
    run.optimizer = make_adam(model.parameters(), device, lr=args.lr, betas=(0.9, 0.999))
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, lr_lambda(args.sche, schedule_epochs(vars(args)), len(run.loader), args.lr))
    run.scaler = grad_scaler(device, args.amp)


def resume_mismatch(ckpt, args, world):
    """What differs from the checkpoint's run (batches, schedule), as one phrase, or None."""
    saved = {"model": "cdsvae", "dataset": "sprites", "motion_view": None, **ckpt.get("args", {})}
    changed = [f"--{k} {saved[k]} (removed after its experiment lost: resume with the code of "
               f"commit {REMOVED_AT})"
               for k, off in REMOVED_TRAIN_ARGS.items() if saved.get(k, off) != off]
    for k in ("model", "dataset", "motion_view", "batch_size", "sche"):
        if saved.get(k) != getattr(args, k):
            changed.append(f"--{k} {getattr(args, k)} (checkpoint: {saved.get(k)})")
    if args.sche != "const" and schedule_epochs(saved) != schedule_epochs(vars(args)):
        changed.append(f"a schedule over {schedule_epochs(vars(args))} epochs (checkpoint: "
                       f"{schedule_epochs(saved)}; --nEpoch, --sche_epochs)")
    if ckpt.get("world_size") != world:
        changed.append(f"{world} process(es) (checkpoint: {ckpt.get('world_size')})")
    return "; ".join(changed) or None


def read_resumable(run):
    """The checkpoint to continue, refused in one line if it is another run's."""
    args, path = run.args, run.ckpt_path
    try:
        ckpt = read_resumable_checkpoint(path)
        check_sizes(run.model, ckpt["model"], path)
        changed = mismatched_model_args(ckpt, run.model_args, f"resumable checkpoint {path}")
        if changed:
            raise CheckpointError(f"{path} was trained with other settings: "
                                  f"{', '.join(changed.values())}; pass its "
                                  f"{' '.join('--' + k for k in changed)} or start a new --log_dir")
        other_run = resume_mismatch(ckpt, args, run.world)
        if other_run:
            raise CheckpointError(f"{path} was trained as another run: {other_run}; resume with "
                                  f"its settings or start a new --log_dir")
    except CheckpointError as e:
        sys.exit(f"error: cannot resume: {e}")
    return ckpt


def resume(run):
    """Continue from model_dir/model.pt: weights, optimizers, random state, the epoch's sums."""
    ckpt = read_resumable(run)
    run.model.load_state_dict(ckpt["model"])
    load_adam_state(run.optimizer, ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.scaler.load_state_dict(ckpt["scaler"])
    if run.critic is not None and "critic" in ckpt:
        run.critic.load_state_dict(ckpt["critic"])
        load_adam_state(run.critic_optimizer, ckpt["critic_optimizer"])
    elif run.critic is not None:
        log(run, f"{run.ckpt_path} has no critic: the --weight_mi_critic critic starts anew")
    run.epoch, run.step, run.skip_batches = ckpt["epoch"], ckpt["step"], ckpt["batches_done"]
    torch.set_rng_state(ckpt["rng_cpu"][run.rank])
    if run.device.type == "cuda" and ckpt["rng_cuda"]:
        torch.cuda.set_rng_state(ckpt["rng_cuda"][run.rank], run.device)
    run.history = [dict(row) for row in ckpt["history"]]
    keep_overheads(run)
    run.sums, run.n_batches = dict(ckpt["epoch_sums"]), ckpt["epoch_batches"]
    run.seconds_before = ckpt["epoch_seconds"]
    if run.main_proc:  # the checkpoint is the record: a row written after it, before a kill, goes
        write_metrics(run)
    where = (f"in epoch {run.epoch + 1} after batch {run.skip_batches}/{len(run.loader)}"
             if run.skip_batches else f"after epoch {run.epoch}")
    log(run, f"resumed {run.ckpt_path} {where}, step {run.step}")


def keep_overheads(run):
    """The last epoch's overhead_s is measured after its checkpoint: taken from metrics.jsonl, where
    that row is the checkpoint's own (same epoch and step), so a resume does not drop it."""
    with contextlib.suppress(OSError, ValueError):
        with open(run.metrics_path) as f:
            written = {(r.get("epoch"), r.get("step")): r for r in map(json.loads, f)
                       if isinstance(r, dict)}
        for row in run.history:
            seconds = written.get((row.get("epoch"), row.get("step")), {}).get("overhead_s")
            if "overhead_s" not in row and isinstance(seconds, (int, float)):
                row["overhead_s"] = seconds


def setup(args):
    """Everything a run needs, in one namespace: processes, judges, data, networks, its progress."""
    run = SimpleNamespace(args=args)
    run.device, run.rank, run.world = setup_processes(args)
    run.distributed, run.main_proc = run.world > 1, run.rank == 0
    run.log_every = args.log_every or (1 if run.device.type == "cpu" else 25)
    if args.batch_size % run.world or args.batch_size // run.world < 2:
        sys.exit(f"error: --batch_size {args.batch_size} must be a multiple of the {run.world} "
                 f"processes with at least 2 videos each (the InfoNCE terms contrast each video "
                 f"with the others of its batch)")
    scored = args.evl_interval and run.main_proc and args.dataset == "sprites"
    run.judges, missing = load_judges(args, run.device) if scored else ({}, [])
    load_data(run)
    build_networks(run)
    run.ckpt_path = os.path.join(args.model_dir, "model.pt")
    run.metrics_path = os.path.join(args.log_dir, "metrics.jsonl")
    if not args.resume:
        for path in (run.ckpt_path, run.metrics_path):
            if os.path.exists(path):
                sys.exit(f"error: {path} exists, of another run; pass --resume to continue it or "
                         f"choose another --log_dir / --model_dir")
    if run.main_proc:
        for folder in (args.log_dir, args.model_dir):
            os.makedirs(folder, exist_ok=True)
            for stale in filter(TEMPORARY.fullmatch, os.listdir(folder)):
                os.remove(os.path.join(folder, stale))
    run.epoch, run.step, run.skip_batches, run.history = 0, 0, 0, []
    run.sums, run.n_batches, run.seconds_before, run.stop = {}, 0, 0.0, None
    run.last_step_end, run.asked_s, run.steps_audited, run.sync_audit_on = None, 0.0, 0, False
    if args.resume:
        try:  # a field of the right type whose content does not fit (checked with its type first)
            resume(run)
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            sys.exit(f"error: cannot resume: resumable checkpoint {run.ckpt_path} does not fit "
                     f"this run ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})")
    # a resumed run's points from its checkpoint's step on replace those written after it
    run.tensorboard = (SummaryWriter(args.log_dir, purge_step=run.step if args.resume else None)
                       if run.main_proc else None)
    if run.distributed:
        if args.sync_bn:
            run.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(run.model)
        run.model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[run.device] if run.device.type == "cuda" else None)
    log(run, f"training on {run.device} x{run.world}: {run.n_train} videos, {len(run.loader)} "
             f"steps/epoch, args {json.dumps(vars(args))}")
    log(run, precision_note(run.device, args.amp))
    log(run, "progress: the bar (plain lines when the output is not a terminal) counts the steps "
             "done, and shows each term's mean over the epoch so far, read every --log_every "
             "steps; TensorBoard's train/* points are the means since the read before")
    if args.evl_interval and args.dataset != "sprites":
        log(run, f"periodic scoring runs on Sprites only for now: off on {args.dataset}")
    if missing:
        log(run, f"no judge file at {', '.join(missing)} (--judge): " + (
            f"periodic scoring uses {', '.join(run.judges)} only" if run.judges else
            "periodic scoring is off; score the checkpoint with test_sprite.py afterwards"))
    return run


# ---- files ---------------------------------------------------------------------------------------
def log(run, msg):
    if run.main_proc:
        tqdm.write(msg)
        append_text(msg + "\n", os.path.join(run.args.log_dir, "log.txt"))


def write_metrics(run):
    """metrics.jsonl, rewritten whole: it never holds half a row, nor a row twice."""
    write_text("".join(json.dumps(row) + "\n" for row in run.history), run.metrics_path)


# write_atomic's temporaries, <file>.tmp<PID>: in a folder this run holds, they are a killed run's
TEMPORARY = re.compile(r"(model\.pt|epoch_\d+\.pt|metrics\.jsonl|loss_curves\.png)\.tmp\d+")


def save_checkpoint(run, epoch, batches_done, seconds):
    """model.pt: everything a resumed run needs to go on as if it had not stopped."""
    rng, rng_cuda = [torch.get_rng_state()], []
    if run.device.type == "cuda":
        rng_cuda = [torch.cuda.get_rng_state(run.device)]
    if run.distributed:
        gathered = [None] * run.world
        dist.all_gather_object(gathered, (rng[0], rng_cuda))
        rng, rng_cuda = [r for r, _ in gathered], [c[0] for _, c in gathered if c]
    if not run.main_proc:
        return
    extra = {}
    if run.critic is not None:
        extra = {"critic": run.critic.state_dict(),
                 "critic_optimizer": run.critic_optimizer.state_dict()}
    save_atomic({"model": run.raw_model.state_dict(), "model_args": run.model_args,
                 "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict(), "epoch": epoch, "batches_done": batches_done,
                 "step": run.step, "epoch_sums": run.sums, "epoch_batches": run.n_batches,
                 "epoch_seconds": seconds, "args": vars(run.args), "rng_cpu": rng,
                 "rng_cuda": rng_cuda, "world_size": run.world, "history": run.history,
                 "git": git_revision(), **extra}, run.ckpt_path)


# ---- one epoch -----------------------------------------------------------------------------------
def train_critic(run, out):
    """One step of the critic on the whole batch's (f, z), held fixed; the shift is the step's."""
    f, z = (out[k].detach().float() for k in ("f", "z"))
    if run.distributed:
        f, z = gather_rows(f), gather_rows(z)
    run.critic_optimizer.zero_grad(set_to_none=True)
    loss = critic_loss(run.critic, f, z, shift=1 + run.step % (len(f) - 1))
    loss.backward()
    run.critic_optimizer.step()
    return loss.detach()


def forward_and_loss(run, model, batch, step, gather=None):
    """CDSVAE.forward on a batch and its views, and cdsvae_loss: (outputs, loss, {term: value})."""
    x = batch["x"]
    views = {}
    if run.args.model == "cdsvae":
        views = {"m_aug": batch["m_aug"], "c_aug_order": batch["c_aug_order"]}
    with autocast(run.device, run.args.amp):
        out = model(x, **views)
    loss, terms = cdsvae_loss(out, x, run.n_train, **loss_weights(run.args, step), gather=gather,
                              critic=run.critic)
    return out, loss, terms


def train_step(run, batch):
    """One step of the model (and the critic): the terms in one device tensor, nothing read to the
    host; under DDP the whole batch's, and the stop signal's sum and count as two more."""
    gather = gather_rows if run.distributed else None
    if run.args.compile_mode == "reduce-overhead":  # the CUDA graphs' outputs of the step before
        torch.compiler.cudagraph_mark_step_begin()  # may be overwritten from here on
    out, loss, terms = forward_and_loss(run, run.model, batch, run.step, gather)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    if run.critic is not None:
        terms["critic_bce"] = train_critic(run, out)
    run.keys = list(terms)
    values = torch.stack([v.detach() for v in terms.values()])
    if run.distributed:  # one collective: the terms, and whether any process was asked to stop
        signum = values.new_full((2,), float(Stop.signum))  # a fill, not a copy from the host
        signum[1] = float(Stop.signum > 0)
        values = torch.cat([values, signum])
        dist.all_reduce(values)
        values[:-2] /= run.world
    return values


def accumulate(run, values):
    """run.progress (on the device, float64 as Python sums): [each term's sum over the epoch, the
    first non-finite step (-1: none), signal sum, signal count]."""
    n = len(run.keys)
    terms = values[:n].double()
    if run.progress is None:
        start = [run.sums.get(k, 0.0) for k in run.keys] + [-1.0, 0.0, 0.0]
        run.progress = torch.tensor(start, dtype=torch.float64, device=values.device)
        run.bad_terms = terms.clone()
    bad = ~torch.isfinite(terms).all() & (run.progress[n] < 0)
    run.progress[n] = torch.where(bad, run.step, run.progress[n])
    run.bad_terms = torch.where(bad, terms, run.bad_terms)
    run.progress[:n] += terms
    if run.distributed:
        run.progress[n + 1:] = values[n:].double()


def read_progress(run):
    """The host read: the sums, a non-finite term (ends the run, no checkpoint), the signal."""
    *sums, first_bad, signal_sum, signal_count = run.progress.tolist()
    before, run.sums = run.sums, dict(zip(run.keys, sums))
    if first_bad >= 0:
        kept = (f"the last good checkpoint {run.ckpt_path} is kept" if os.path.exists(run.ckpt_path)
                else "no checkpoint was written yet")
        log(run, f"error: non-finite loss at epoch {run.epoch + 1}, step {int(first_bad)} "
                 f"({dict(zip(run.keys, run.bad_terms.tolist()))}); {kept}; "
                 f"try a lower --lr or --amp off")
        sys.exit(1)
    steps = run.n_batches - run.batches_read
    if run.tensorboard is not None and steps:  # each term's mean over the steps since the last read
        for k, v in run.sums.items():
            run.tensorboard.add_scalar(f"train/{k}", (v - before.get(k, 0.0)) / steps, run.step)
        run.tensorboard.add_scalar("train/lr", run.scheduler.get_last_lr()[0], run.step)
    run.batches_read = run.n_batches
    return round(signal_sum / signal_count) if signal_count else Stop.signum


def train_one_epoch(run, epoch):
    """The epoch's steps from run.skip_batches on; True when a stop inside it wrote a checkpoint."""
    args, loader = run.args, run.loader
    loader.set_epoch(epoch, start=run.skip_batches)  # a resumed epoch's done batches are not made
    run.model.train()
    run.epoch, run.t0, run.progress = epoch, time.time() - run.seconds_before, None
    run.batches_read = run.n_batches
    bar = progress(total=len(loader), initial=run.skip_batches, leave=False, unit="step",
                   desc=f"epoch {epoch + 1}/{args.nEpoch}", disable=not run.main_proc)
    note_overhead(run)
    for b, batch in enumerate(loader, start=run.skip_batches):
        accumulate(run, train_step(run, batch))
        run.step += 1
        run.n_batches += 1
        bar.update()  # counts the steps done, this one included
        if args.weight_mi_after and run.step == args.weight_mi_after[0]:
            log(run, f"step {run.step}: the MI penalty's weight goes from {args.weight_mi:g} to "
                     f"{args.weight_mi_after[1]:g}")
        at_max = args.max_steps and run.step >= args.max_steps
        # every process reads at the same steps, so under DDP all agree on when to stop
        if not (run.step % run.log_every == 0 or b + 1 == len(loader) or at_max
                or (Stop.signum and not run.distributed)):
            continue
        audit_syncs(run, False)  # a read waits for the GPU by design
        signum = read_progress(run)
        shown = ("loss", "recon", "kld_z", "con_f", "con_z", "mi_critic")
        bar.set_postfix({k: f"{run.sums[k] / run.n_batches:.3g}" for k in shown if k in run.sums})
        if signum or at_max:
            run.stop = signum
            bar.close()
            if b + 1 < len(loader):
                save_checkpoint(run, epoch, b + 1, time.time() - run.t0)
                stopped(run, f"in epoch {epoch + 1} after batch {b + 1}/{len(loader)}")
                return True
            break
        audit_syncs(run, b + 1 < len(loader))  # the steps up to the next read of this epoch
    bar.close()
    run.last_step_end = time.time()
    return False


def note_overhead(run):
    """The last row's overhead_s, when its epoch ran in this process: the seconds from its last
    step to now (the next epoch's first step, or the run's end), less the validation and judge
    scoring the flags asked for; to TensorBoard too."""
    if run.last_step_end is not None and run.history and "overhead_s" not in run.history[-1]:
        seconds = round(time.time() - run.last_step_end - run.asked_s, 3)
        run.history[-1]["overhead_s"] = seconds
        if run.tensorboard is not None:
            run.tensorboard.add_scalar("epoch/overhead_s", seconds, run.history[-1]["epoch"])
    run.last_step_end = None


def audit_syncs(run, on):
    """--sync_debug: the mode on (or off) from here; counts the steps that ran under it."""
    if run.args.sync_debug == "off":
        return
    if run.sync_audit_on:
        run.steps_audited += run.n_batches - run.batches_read
    torch.cuda.set_sync_debug_mode(run.args.sync_debug if on else "default")
    run.sync_audit_on = on


def stopped(run, where):
    """Log why the run stopped; a signal ends the process with 128 + its number."""
    why = signal.Signals(run.stop).name if run.stop else f"--max_steps {run.args.max_steps}"
    log(run, f"stopped by {why} {where}, step {run.step}; checkpoint {run.ckpt_path} "
             f"(continue with --resume)")
    if run.stop:
        end_of_run(run)
        sys.exit(128 + run.stop)


# ---- the end of an epoch -------------------------------------------------------------------------
@torch.no_grad()
def validation_terms(run):
    """Each term's mean on the held-out videos, with the same views and noise every epoch."""
    model, loader, device = run.raw_model, run.val_loader, run.device
    was_training = model.training
    model.eval()
    sums, n = {}, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(run.args.seed)
        loader.set_epoch(0)
        for batch in loader:
            _, _, terms = forward_and_loss(run, model, batch, run.step)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(batch["x"])
            n += len(batch["x"])
    model.train(was_training)
    return {f"val_{k}": v / n for k, v in sums.items()}


def end_of_epoch(run, epoch):
    """The epoch's row; the snapshot, then the checkpoint, then metrics.jsonl (the curves are drawn
    at the run's end: redrawn each epoch, they took longer than a GPU's epoch)."""
    args = run.args
    row = {"epoch": epoch + 1, "step": run.step, "lr": run.scheduler.get_last_lr()[0],
           "seconds": round(time.time() - run.t0, 1),
           **{k: v / max(1, run.n_batches) for k, v in run.sums.items()}}
    run.skip_batches, run.sums, run.n_batches, run.seconds_before = 0, {}, 0, 0.0
    asked_from = time.time()  # validation and scoring are what the flags ask for, not overhead
    if run.val_loader is not None and run.main_proc:
        row.update(validation_terms(run))
    if run.judges and (epoch + 1) % args.evl_interval == 0:
        scores = evaluate(run.raw_model, run.judges, run.test, run.device, seeds=[0],
                          amp=args.amp)["judges"]
        row.update({f"eval_{name}_{k}": v for name, s in scores.items()
                    for k, v in s["mean"].items()
                    if k.startswith(("A_", "B_", "Bs_", "swap_")) and not k.endswith("_n")})
    run.asked_s = time.time() - asked_from
    run.history.append(row)
    save_snapshot(run, epoch)  # first: a kill before model.pt then redoes this epoch, snapshot too
    save_checkpoint(run, epoch + 1, 0, 0.0)  # metrics.jsonl is its history, written again on resume
    if not run.main_proc:
        return
    write_metrics(run)
    for k, v in row.items():
        if k not in ("epoch", "step") and isinstance(v, (int, float)):
            run.tensorboard.add_scalar(f"epoch/{k}", v, epoch + 1)
    run.tensorboard.flush()
    log(run, " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in row.items()))


def save_snapshot(run, epoch):
    """epoch_<N>.pt every --snapshot_every epochs: the weights in half precision, for
    time_to_quality.py."""
    args = run.args
    if run.main_proc and args.snapshot_every and (epoch + 1) % args.snapshot_every == 0:
        save_atomic({"model": half_precision(run.raw_model.state_dict()),
                     "model_args": run.model_args, "epoch": epoch + 1, "step": run.step,
                     "args": vars(args), "history": run.history, "git": git_revision()},
                    os.path.join(args.model_dir, f"epoch_{epoch + 1}.pt"))


def end_of_run(run):
    """The last epoch's overhead_s (its end-of-epoch work), metrics.jsonl with it, the curves."""
    if not run.main_proc:
        return
    note_overhead(run)
    if run.args.sync_debug != "off":
        log(run, f"--sync_debug {run.args.sync_debug}: {run.steps_audited} steps between reads "
                 f"ran under it")
    write_metrics(run)
    plot_loss_curves(run.history, os.path.join(run.args.log_dir, "loss_curves.png"))


def main(argv=None):
    args = get_args(argv)
    first = int(os.environ.get("RANK", "0")) == 0  # a run's first process holds its folders
    with folders_held((args.log_dir, args.model_dir)) if first else contextlib.nullcontext():
        return train(args)


def train(args):
    run = None
    try:
        run = setup(args)  # a signal here ends the script at once (utils.run_main): nothing to keep
        Stop.install()
        for epoch in range(run.epoch, args.nEpoch):
            if train_one_epoch(run, epoch):
                break
            end_of_epoch(run, epoch)
            if run.stop is not None:  # the stop came at the last batch: the epoch is complete
                stopped(run, f"after epoch {epoch + 1}")
                break
        end_of_run(run)
        if run.distributed:  # the processes end together: one gone early can abort another's exit
            dist.barrier()
        return run.raw_model
    finally:  # however the run ends
        Stop.uninstall()
        if getattr(run, "tensorboard", None) is not None:
            run.tensorboard.close()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
