"""Train C-DSVAE on Sprites (or, with --model dsvae, the DSVAE baseline).

    python train_cdsvae.py --data_root data/Sprite/data.pkl --log_dir runs/paper          # one process
    torchrun --nproc_per_node=2 train_cdsvae.py ...                                       # DDP
    python train_cdsvae.py --log_dir runs/paper --resume                                  # continue a run

Writes to --log_dir: log.txt, metrics.jsonl (one JSON line of every loss term per epoch, rewritten whole from
the checkpoint's history), loss_curves.png; to --model_dir (default: --log_dir): model.pt, the latest checkpoint
(atomic; resumable). SIGINT, SIGTERM and SIGHUP finish the step, write a checkpoint and exit with 128 + the
signal's number (130, 143, 129).
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

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from tqdm import tqdm

from dataloader import DataError, SpriteBatches, content_augment, load_sprites, validation_split
from model import CDSVAE, FZCritic, cdsvae_loss, critic_loss
from utils import (MODEL_ARGS, CheckpointError, amp_dtype, check_sizes, folders_held, git_revision,
                   mismatched_model_args, pick_device, read_checkpoint, save_atomic)


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag is one line on stderr, not the usage of every flag followed by it."""
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def get_args(argv=None):
    p = OneLineErrors(description="Train C-DSVAE on Sprites")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--batch_size", type=int, default=128,
                   help="videos per step, over all processes, at least 2 per process (default 128)")
    p.add_argument("--nEpoch", type=int, default=100, help="epochs to train in all (default 100)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--evl_interval", type=int, default=10,
                   help="score with the judge every this many epochs, when the judge file exists "
                        "(default 10; 0: never)")
    p.add_argument("--f_dim", type=int, default=256, help="size of the static latent f (default 256)")
    p.add_argument("--z_dim", type=int, default=32, help="size of each dynamic latent z_t (default 32)")
    p.add_argument("--g_dim", type=int, default=128, help="size of the per-frame encoder feature (default 128)")
    p.add_argument("--rnn_size", type=int, default=256, help="hidden size of the LSTMs / RNN (default 256)")
    p.add_argument("--nf", type=int, default=64,
                   help="conv width: the encoder has nf, 2nf, 4nf, 8nf channels (default 64, the paper's)")
    p.add_argument("--model", choices=("cdsvae", "dsvae"), default="cdsvae",
                   help="cdsvae (default): the paper's objective; dsvae: the DSVAE baseline (Li & Mandt 2018), the "
                        "same network without augmented views, InfoNCE or MI terms (MI is still logged, weight 0)")
    p.add_argument("--z_input", choices=("bilstm", "frame_delta", "full"), default="bilstm",
                   help="what q(z|x) reads: the BiLSTM outputs (default, the paper), frame features minus the video's "
                        "mean (frame_delta), or DSVAE's full q(z_t | x, f), a BiLSTM over [frame features; f] (full)")
    p.add_argument("--f_mirror", action=argparse.BooleanOptionalAction, default=False,
                   help="q(f|x) reads the video and its left-right mirror image alike, so f cannot keep the facing "
                        "direction (one more encoder pass per step; default off, as in the paper; the last of "
                        "--f_mirror / --no-f_mirror given wins, so a recipe's choice can be overridden)")
    p.add_argument("--f_film", action="store_true",
                   help="decode with f only as a per-channel scale and shift of the feature maps, so that the frame's "
                        "layout (pose, facing) comes from z alone (default off: the paper's decoder of [z_t; f])")
    p.add_argument("--f_head_leaky", action="store_true",
                   help="q(f|x)'s mean and log-variance heads end in LeakyReLU(0.2), as the paper's "
                        "LinearUnit(..., batchnorm=False) (default off: plain Linear, as our earlier checkpoints)")
    p.add_argument("--deconv_init", choices=("normal", "default"), default="normal",
                   help="initial ConvTranspose2d weights: normal, N(0, 0.01) as the other layers (default, ours), or "
                        "default, PyTorch's own initialisation (the paper's)")
    p.add_argument("--c_aug_flip", action="store_true",
                   help="content view also mirrored left-right, so f cannot keep the facing direction "
                        "(one more encoder pass per step; default off, the paper's shuffled frames only)")
    p.add_argument("--weight_cyc", type=float, default=0.0,
                   help="weight of the cycle InfoNCE: decode z with a new f, encode again, match the original z "
                        "(one more decoder and encoder pass per step; default 0: off, as in the paper)")
    p.add_argument("--recon_m_aug", action="store_true",
                   help="reconstruct half of each batch (the even rows) from f of the video and z of its motion view, "
                        "whose colours are changed, so that the decoder takes the colours from f alone (no extra pass; "
                        "default off, as in the paper)")
    p.add_argument("--weight_swap", type=float, default=0.0,
                   help="weight of the swap reconstruction: every 4th video of a batch is decoded from its f mean and "
                        "a z not its own (a prior path, or another video's), f is read from that video and decoded "
                        "with the video's own z, which must give the video back, so the decoder must draw f's content "
                        "whatever the z (two decoder passes and one encoder pass more on a quarter of the batch; "
                        "default 0: off, as in the paper)")
    p.add_argument("--weight_rec", type=float, default=1.0, help="weight of the summed reconstruction (default 1)")
    p.add_argument("--weight_f", type=float, default=1.0, help="weight of KL(q(f|x) || N(0, I)) (default 1)")
    p.add_argument("--weight_z", type=float, default=1.0, help="weight of KL(q(z|x) || p(z)) (default 1)")
    p.add_argument("--weight_mi", type=float, default=1.0, help="weight of the MI(f; z) penalty (default 1)")
    p.add_argument("--weight_mi_critic", type=float, default=0.0,
                   help="weight of a second I(f; z) penalty, the estimate of a density-ratio critic trained beside the "
                        "model to tell own (f, z) pairs from shuffled ones; it does not saturate as the minibatch "
                        "estimate does (default 0: off, as in the paper)")
    p.add_argument("--lr_critic", type=float, default=1e-3,
                   help="Adam learning rate of that critic, betas (0.5, 0.9) as FactorVAE's (default 1e-3)")
    p.add_argument("--weight_mi_after", nargs=2, type=float, metavar=("STEP", "WEIGHT"), default=None,
                   help="from step STEP on (steps of the whole run, counted from 0), the MI penalty's weight is WEIGHT "
                        "instead of --weight_mi; a resumed run takes the weight of its checkpoint's step "
                        "(default: none, --weight_mi throughout)")
    p.add_argument("--weight_c_aug", type=float, default=10.0, help="weight of the content InfoNCE (default 10)")
    p.add_argument("--weight_m_aug", type=float, default=10.0, help="weight of the motion InfoNCE (default 10)")
    p.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature (default 0.5)")
    p.add_argument("--sche", choices=("const", "cosine", "step", "cosine_to_zero"), default="const",
                   help="learning-rate schedule (default const). cosine and step are the paper repo's, changed once "
                        "an epoch: cosine with warm restarts every (nEpoch+1)//2 epochs down to 2e-4, and x0.5 every "
                        "nEpoch//2 epochs; cosine_to_zero (ours, the CPU recipe's) is cosine to 0 over the run, "
                        "changed every step")
    p.add_argument("--data_root", default="data/Sprite/data.pkl", help="the data pickle (make_sprites.py)")
    p.add_argument("--log_dir", default="runs/cdsvae", help="folder of logs and curves (default runs/cdsvae)")
    p.add_argument("--model_dir", default=None, help="folder of the checkpoint model.pt (default: --log_dir)")
    p.add_argument("--judge", action="append", default=None,
                   help="judge weights for periodic scoring; repeatable (default: both shipped judges, "
                        "judges/sprite_judge.pt and judges/clip_judge.pt; a missing file is left out, and scoring "
                        "is off without any)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto: cuda if any")
    p.add_argument("--amp", action="store_true", help="mixed precision: bf16 autocast on CPU, bf16/fp16 on CUDA")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per process (default 0: torch's choice)")
    p.add_argument("--resume", action="store_true", help="continue from model_dir/model.pt")
    p.add_argument("--subset", type=int, default=0,
                   help="train on the first N train videos only, for smoke runs (default 0: all)")
    p.add_argument("--val_chars", type=int, default=0,
                   help="hold out this many train characters for validation, and log every loss term on their "
                        "videos after each epoch as val_* in metrics.jsonl (default 0: none)")
    p.add_argument("--sync_bn", action="store_true", help="SyncBatchNorm across processes under torchrun")
    p.add_argument("--snapshot_every", type=int, default=0,
                   help="also keep a half-precision copy of the model every this many epochs, as "
                        "model_dir/epoch_<N>.pt, for scoring along the run afterwards (default 0: none)")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps in all (0: no limit)")
    args = p.parse_args(argv)
    args.model_dir = args.model_dir or args.log_dir
    for name in ("batch_size", "nEpoch", "f_dim", "z_dim", "g_dim", "rnn_size", "nf"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("threads", "subset", "val_chars", "max_steps", "evl_interval", "snapshot_every"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be 0 or more, got {getattr(args, name)}")
    for name in ("lr", "temperature", "lr_critic"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            p.error(f"--{name} must be a positive number, got {getattr(args, name)}")
    for name in ("weight_rec", "weight_f", "weight_z", "weight_mi", "weight_c_aug", "weight_m_aug",
                 "weight_cyc"):
        if not math.isfinite(getattr(args, name)):
            p.error(f"--{name} must be a finite number, got {getattr(args, name)}")
    if args.model == "dsvae" and (args.c_aug_flip or args.weight_cyc or args.weight_mi_after or args.weight_mi_critic
                                  or args.recon_m_aug or args.weight_swap):
        p.error("--model dsvae has no augmented views, InfoNCE or MI terms: --c_aug_flip, --weight_cyc, "
                "--weight_mi_after, --weight_mi_critic, --recon_m_aug and --weight_swap do not apply")
    for name in ("weight_mi_critic", "weight_swap"):  # off at 0; a negative or NaN weight would be ignored silently
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            p.error(f"--{name} must be 0 (off) or a positive number, got {getattr(args, name)}")
    if args.batch_size < 2:
        p.error(f"--batch_size must be at least 2, got {args.batch_size}: the InfoNCE terms contrast each video "
                f"with the others of its batch")
    if args.weight_mi_after:
        after, weight = args.weight_mi_after
        if not (after >= 0 and after.is_integer() and math.isfinite(weight)):
            p.error(f"--weight_mi_after takes a step (a whole number, 0 or more) and a weight, "
                    f"got {after:g} {weight:g}")
        args.weight_mi_after = [int(after), weight]
    return args


def lr_lambda(sche, n_epoch, steps_per_epoch, lr):
    """The learning rate's factor at each step for --sche (the paper repo steps its schedulers once an epoch)."""
    total = max(1, n_epoch * steps_per_epoch)
    if sche == "cosine_to_zero":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    if sche == "cosine":  # CosineAnnealingWarmRestarts(T_0=(nEpoch+1)//2, eta_min=2e-4)
        period, floor = max(1, (n_epoch + 1) // 2), 2e-4 / lr
        return lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (step // steps_per_epoch % period) / period))
    if sche == "step":  # StepLR(step_size=nEpoch//2, gamma=0.5)
        return lambda step: 0.5 ** (step // steps_per_epoch // max(1, n_epoch // 2))
    return lambda step: 1.0


def plot_curves(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in ("recon", "kld_f", "kld_z", "mi_fz", "mi_critic", "con_f", "con_z") if k in rows[-1]]
    fig, axes = plt.subplots(1, len(keys), figsize=(3 * len(keys), 2.6))
    for ax, k in zip(axes, keys):
        ax.plot([r["epoch"] for r in rows], [r[k] for r in rows])
        ax.set_title(k)
        ax.set_xlabel("epoch")
        if k == "recon":
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_metrics(rows, path):
    """metrics.jsonl, rewritten whole through a temporary file: it never holds half a row, nor a row twice."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)


# the temporary files of save_atomic and write_metrics, named <file>.tmp<PID of the writer>
TEMPORARY = re.compile(r"(model\.pt|epoch_\d+\.pt|metrics\.jsonl)\.tmp(\d+)")


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:  # it exists, and belongs to another user
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def remove_stale_temporaries(folder):
    """Delete the temporary files in `folder` of writes whose process is gone (killed while writing)."""
    for entry in os.listdir(folder):
        match = TEMPORARY.fullmatch(entry)
        if match and not process_alive(int(match[2])):
            os.remove(os.path.join(folder, entry))


def mi_weight(args, step):
    """The MI penalty's weight at a step of the run (--weight_mi, then --weight_mi_after's; 0 for DSVAE)."""
    if args.model == "dsvae":
        return 0.0
    return args.weight_mi_after[1] if args.weight_mi_after and step >= args.weight_mi_after[0] else args.weight_mi


def augmented_views(batch, x, args, device):
    """The forward pass's augmented views of a batch: the motion view and the content view (x's frame features
    shuffled, or with --c_aug_flip its own mirrored video); none for DSVAE."""
    if args.model == "dsvae":
        return {}
    if args.c_aug_flip:
        content = {"c_aug": content_augment(x, order=batch["c_aug_order"], mirror=True)}
    else:
        content = {"c_aug_order": batch["c_aug_order"].to(device)}
    return {"m_aug": batch["m_aug"].to(device), **content}


def gather_rows(t):
    """The whole batch's rows of t, all processes' in rank order; the gradient reaches each process's own rows
    (summed over the processes' losses, which DDP's averaging then divides by their number)."""
    return torch.cat(dist_nn.all_gather(t.contiguous()))


def train_critic(critic, optimizer, out, step, distributed):
    """One step of the --weight_mi_critic critic on the whole batch's (f, z) samples, held fixed; the shuffled
    pairs pair each video with the one `shift` places on, a shift that every process takes from the step."""
    f, z = (out[k].detach().float() for k in ("f", "z"))
    if distributed:
        f, z = gather_rows(f), gather_rows(z)
    optimizer.zero_grad(set_to_none=True)
    loss = critic_loss(critic, f, z, shift=1 + step % (len(f) - 1))
    loss.backward()
    optimizer.step()
    return loss.detach()


# checkpoints written before --sche cosine and step became the paper repo's named ours so
OLD_SCHEDULES = {"cosine": "cosine_to_zero", "step": "x0.5 every nEpoch/4 epochs (no longer offered)"}


def resume_mismatch(ckpt, args, world):
    """What of the run's shape differs between the checkpoint and this invocation (a resumed run would train on
    another schedule or other batches), as one phrase; None when nothing does."""
    saved = ckpt.get("args", {})
    saved_sche = ckpt.get("schedule") or OLD_SCHEDULES.get(saved.get("sche"), saved.get("sche"))
    saved_world = ckpt.get("world_size", len(ckpt.get("rng_cpu", [None])))
    changed = []
    if saved.get("model", "cdsvae") != args.model:
        changed.append(f"--model {args.model} (checkpoint: {saved.get('model', 'cdsvae')})")
    if saved.get("batch_size") != args.batch_size:
        changed.append(f"--batch_size {args.batch_size} (checkpoint: {saved.get('batch_size')})")
    if saved_world != world:
        changed.append(f"{world} process(es) (checkpoint: {saved_world})")
    if saved_sche != args.sche:
        changed.append(f"--sche {args.sche} (checkpoint: {saved_sche})")
    if args.sche != "const" and saved.get("nEpoch") != args.nEpoch:  # the schedule's length
        changed.append(f"--nEpoch {args.nEpoch} with --sche {args.sche} (checkpoint: {saved.get('nEpoch')})")
    return "; ".join(changed) or None


@torch.no_grad()
def validation_terms(model, loader, dataset_size, device, amp, args, weight_mi, critic=None):
    """Every loss term on the held-out videos (eval mode, the same augmentations and noise every epoch), the mean
    over videos; the training run's random state is left as it was."""
    was_training = model.training
    model.eval()
    sums, n = {}, 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        loader.set_epoch(0)
        for batch in loader:
            x = batch["x"].to(device)
            with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp):
                out = model(x, cycle=args.weight_cyc > 0, recon_m_aug=args.recon_m_aug, swap=args.weight_swap > 0,
                            **augmented_views(batch, x, args, device))
            _, terms = cdsvae_loss(out, x, dataset_size, args.weight_f, args.weight_z, args.weight_c_aug,
                                   args.weight_m_aug, weight_mi, args.weight_rec, args.temperature, args.weight_cyc,
                                   critic=critic, weight_critic=args.weight_mi_critic, weight_swap=args.weight_swap)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() * len(x)
            n += len(x)
    model.train(was_training)
    return {f"val_{k}": v / n for k, v in sums.items()}


class Stop:
    """SIGINT / SIGTERM / SIGHUP: finish the step, write a checkpoint, exit with 128 + the signal's number."""
    signum = 0

    @classmethod
    def install(cls):
        def handler(signum, frame):
            cls.signum = signum
        cls.signum = 0
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, handler)


def main(argv=None):
    args = get_args(argv)
    first = int(os.environ.get("RANK", "0")) == 0  # a run's first process holds its folders
    with folders_held((args.log_dir, args.model_dir)) if first else contextlib.nullcontext():
        return train(args)


def train(args):
    Stop.install()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = pick_device(args.device)
    rank, world = 0, 1
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size % world or args.batch_size // world < 2:
        sys.exit(f"error: --batch_size {args.batch_size} must be a multiple of the {world} processes with at least 2 "
                 f"videos each (the InfoNCE terms contrast each video with the others of its batch)")
    main_proc = rank == 0

    def log(msg):
        if main_proc:
            tqdm.write(msg)
            with open(os.path.join(args.log_dir, "log.txt"), "a") as f:
                f.write(msg + "\n")

    judges, missing_judges = {}, []
    if args.evl_interval and main_proc:
        from test_sprite import SHIPPED_JUDGES, judge_name, load_judge
        for path in args.judge or SHIPPED_JUDGES:
            if not os.path.isfile(path):
                missing_judges.append(path)
                continue
            try:
                judges[judge_name(path)] = load_judge(path, device)
            except CheckpointError as e:
                sys.exit(f"error: --judge: {e}")
    try:
        data = load_sprites(args.data_root)
    except DataError as e:
        sys.exit(f"error: {e}")
    X, A, D = data["train"]
    if args.subset:
        X, A, D = X[:args.subset], A[:args.subset], D[:args.subset]
    (X, A, D), val = validation_split(X, A, D, args.val_chars, seed=args.seed)
    local_batch = args.batch_size // world
    if len(X) < args.batch_size:
        sys.exit(f"error: {len(X)} training videos are fewer than --batch_size {args.batch_size}")
    augment = args.model == "cdsvae"  # DSVAE makes no augmented views
    loader = SpriteBatches(X, A, D, local_batch, shuffle=True, augment=augment, seed=args.seed, drop_last=True,
                           rank=rank, world_size=world, content_view=False)  # the model shuffles x's features
    val_loader = (SpriteBatches(*val, args.batch_size, augment=augment, seed=args.seed, content_view=False)
                  if args.val_chars else None)

    torch.manual_seed(args.seed)  # the critic is trained on the whole batch in every process: one initialisation
    critic = FZCritic(args.f_dim, args.z_dim, X.shape[1]).to(device) if args.weight_mi_critic else None
    critic_optimizer = (torch.optim.Adam(critic.parameters(), lr=args.lr_critic, betas=(0.5, 0.9))
                        if critic is not None else None)
    torch.manual_seed(args.seed + rank)
    model_args = {k: getattr(args, k) for k in MODEL_ARGS if hasattr(args, k)}
    model_args["frames"] = X.shape[1]
    model_args["deconv_normal"] = args.deconv_init == "normal"
    model = CDSVAE(**model_args).to(device)
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)  # oneDNN's bf16 convs are ~2x faster channels-last
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.sche, args.nEpoch, len(loader), args.lr))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp and amp_dtype(device) == torch.float16)

    ckpt_path = os.path.join(args.model_dir, "model.pt")
    metrics_path = os.path.join(args.log_dir, "metrics.jsonl")
    if args.resume:
        try:
            ckpt = read_checkpoint(ckpt_path)
            check_sizes(model, ckpt["model"], ckpt_path)
            changed = mismatched_model_args(ckpt, model_args)
            if changed:
                raise CheckpointError(f"{ckpt_path} was trained with other settings: {', '.join(changed.values())}; "
                                      f"pass its {' '.join('--' + k for k in changed)} or start a new --log_dir")
            other_run = resume_mismatch(ckpt, args, world)
            if other_run:
                raise CheckpointError(f"{ckpt_path} was trained as another run: {other_run}; resume with its "
                                      f"settings or start a new --log_dir")
        except CheckpointError as e:
            sys.exit(f"error: cannot resume: {e}")
    elif os.path.exists(ckpt_path):
        sys.exit(f"error: {ckpt_path} exists; pass --resume to continue it or choose another --model_dir")
    elif os.path.exists(metrics_path):
        sys.exit(f"error: {metrics_path} exists, of another run; pass --resume to continue it "
                 f"or choose another --log_dir")
    if main_proc:
        for folder in (args.log_dir, args.model_dir):
            os.makedirs(folder, exist_ok=True)
            remove_stale_temporaries(folder)

    # the running sums of the epoch in progress travel with the checkpoint, so a resumed epoch's row is whole
    start_epoch, step, skip_batches, history, sums, n_batches, seconds_before = 0, 0, 0, [], {}, 0, 0.0
    if args.resume:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        if critic is not None and "critic" in ckpt:
            critic.load_state_dict(ckpt["critic"])
            critic_optimizer.load_state_dict(ckpt["critic_optimizer"])
        elif critic is not None:
            log(f"{ckpt_path} has no critic: the --weight_mi_critic critic starts anew")
        start_epoch, step, skip_batches = ckpt["epoch"], ckpt["step"], ckpt["batches_done"]
        torch.set_rng_state(ckpt["rng_cpu"][rank])
        if device.type == "cuda" and ckpt.get("rng_cuda"):
            torch.cuda.set_rng_state(ckpt["rng_cuda"][rank], device)
        history = list(ckpt.get("history", []))
        # checkpoints older than these keys: the resumed epoch's row averages the batches after the resume only
        sums, n_batches = dict(ckpt.get("epoch_sums", {})), ckpt.get("epoch_batches", 0)
        seconds_before = ckpt.get("epoch_seconds", 0.0)
        if main_proc:  # the checkpoint is the record: a row written after it, before a kill, is dropped
            write_metrics(history, metrics_path)
        where = (f"in epoch {start_epoch + 1} after batch {skip_batches}/{len(loader)}" if skip_batches
                 else f"after epoch {start_epoch}")
        log(f"resumed {ckpt_path} {where}, step {step}")

    if distributed:
        if args.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    raw_model = model.module if distributed else model

    def save(epoch, batches_done, seconds):
        rng = [torch.get_rng_state()]
        rng_cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
        if distributed:
            gathered = [None] * world
            dist.all_gather_object(gathered, (rng[0], rng_cuda))
            rng, rng_cuda = [r for r, _ in gathered], [c[0] for _, c in gathered if c]
        if not main_proc:
            return
        save_atomic({"model": raw_model.state_dict(), "model_args": model_args, "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                     "batches_done": batches_done, "step": step, "epoch_sums": sums, "epoch_batches": n_batches,
                     "epoch_seconds": seconds, "args": vars(args), "rng_cpu": rng, "rng_cuda": rng_cuda,
                     "world_size": world, "schedule": args.sche, "history": history, "git": git_revision(),
                     **({"critic": critic.state_dict(), "critic_optimizer": critic_optimizer.state_dict()}
                        if critic is not None else {})}, ckpt_path)

    def stop_signal():
        """The signal that asked to stop (0: none), the same in every process so that all stop at one step."""
        if not distributed:
            return Stop.signum
        signum = torch.tensor([Stop.signum], device=device)
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return int(signum)

    def stopped(where, signum):
        why = signal.Signals(signum).name if signum else f"--max_steps {args.max_steps}"
        log(f"stopped by {why} {where}, step {step}; checkpoint {ckpt_path} (continue with --resume)")
        if signum:
            sys.exit(128 + signum)
        return raw_model

    log(f"training on {device} x{world}: {len(X)} videos, {len(loader)} steps/epoch, args {json.dumps(vars(args))}")
    if missing_judges:
        log(f"no judge file at {', '.join(missing_judges)} (--judge): "
            + ("periodic scoring is off; score the checkpoint with test_sprite.py afterwards" if not judges
               else f"periodic scoring uses {', '.join(judges)} only"))
    if Stop.signum:  # asked to stop while loading: nothing trained, nothing to keep
        sys.exit(128 + Stop.signum)
    for epoch in range(start_epoch, args.nEpoch):
        loader.set_epoch(epoch, start=skip_batches)  # resuming mid-epoch: the batches done are not made again
        model.train()
        t0 = time.time() - seconds_before
        bar = tqdm(loader, total=len(loader), initial=skip_batches, desc=f"epoch {epoch + 1}/{args.nEpoch}",
                   disable=not main_proc, leave=False)
        for b, batch in enumerate(bar, start=skip_batches):
            weight_mi = mi_weight(args, step)
            x = batch["x"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype(device), enabled=args.amp):
                out = model(x, cycle=args.weight_cyc > 0, recon_m_aug=args.recon_m_aug, swap=args.weight_swap > 0,
                            **augmented_views(batch, x, args, device))
            loss, terms = cdsvae_loss(out, x, len(X), args.weight_f, args.weight_z, args.weight_c_aug,
                                      args.weight_m_aug, weight_mi, args.weight_rec, args.temperature, args.weight_cyc,
                                      gather=gather_rows if distributed else None, critic=critic,
                                      weight_critic=args.weight_mi_critic, weight_swap=args.weight_swap)
            if distributed:  # the terms of the whole batch, the same in every process: a non-finite one stops all
                values = torch.stack([v.detach() for v in terms.values()])
                dist.all_reduce(values)
                terms = dict(zip(terms, values / world))
            if not all(torch.isfinite(v) for v in terms.values()):
                kept = (f"the last good checkpoint {ckpt_path} is kept" if os.path.exists(ckpt_path)
                        else "no checkpoint was written yet")
                log(f"error: non-finite loss at epoch {epoch + 1}, step {step} ({ {k: v.item() for k, v in terms.items()} }); "
                    f"{kept}; try a lower --lr or --amp off")
                sys.exit(1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if critic is not None:
                terms["critic_bce"] = train_critic(critic, critic_optimizer, out, step, distributed)
            step += 1
            n_batches += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            bar.set_postfix({k: f"{sums[k] / n_batches:.3g}" for k in ("loss", "recon", "kld_z", "con_f", "con_z", "con_cyc",
                                                                        "mi_critic", "swap_rec")
                             if k in sums})
            if args.weight_mi_after and step == args.weight_mi_after[0]:
                log(f"step {step}: the MI penalty's weight goes from {args.weight_mi:g} to {args.weight_mi_after[1]:g}")
            signum = stop_signal()
            stop = signum or (args.max_steps and step >= args.max_steps)
            if stop and b + 1 < len(loader):
                save(epoch, b + 1, time.time() - t0)
                return stopped(f"in epoch {epoch + 1} after batch {b + 1}/{len(loader)}", signum)
        row = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - t0, 1),
               **{k: v / max(1, n_batches) for k, v in sums.items()}}
        skip_batches, sums, n_batches, seconds_before = 0, {}, 0, 0.0
        if val_loader is not None and main_proc:
            row.update(validation_terms(raw_model, val_loader, len(X), device, args.amp, args, mi_weight(args, step),
                                        critic))
        if judges and (epoch + 1) % args.evl_interval == 0:
            from test_sprite import evaluate
            scores = evaluate(raw_model, judges, data["test"], device, seeds=[0], amp=args.amp)["judges"]
            row.update({f"eval_{name}_{k}": v for name, s in scores.items() for k, v in s["mean"].items()
                        if k.startswith(("A_", "B_", "Bs_", "swap_")) and not k.endswith("_n")})
        history.append(row)
        save(epoch + 1, 0, 0.0)  # the checkpoint first: metrics.jsonl is its history, written again on resume
        if main_proc:
            write_metrics(history, metrics_path)
            plot_curves(history, os.path.join(args.log_dir, "loss_curves.png"))
            log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        if main_proc and args.snapshot_every and (epoch + 1) % args.snapshot_every == 0:
            save_atomic({"model": {k: v.half() if v.is_floating_point() else v for k, v in raw_model.state_dict().items()},
                         "model_args": model_args, "epoch": epoch + 1, "step": step, "args": vars(args),
                         "history": history, "git": git_revision()},
                        os.path.join(args.model_dir, f"epoch_{epoch + 1}.pt"))
        if stop:  # the stop came at the last batch of the epoch: the epoch is complete and logged
            return stopped(f"after epoch {epoch + 1}", signum)
    return raw_model


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()
