"""Time C-DSVAE training on any device and print one JSON line, speeds in videos per second.

step_per_s: the training step (forward, cdsvae_loss with the paper's weights, backward, Adam; the
critic's step too with --weight_mi_critic) on one batch already on the device; loader_per_s:
SpriteBatches' batches, the video, its motion view and content order, made on the device;
end_to_end_per_s: both in sequence, as train_cdsvae.py runs them. Timed by CUDA events on a GPU,
else perf_counter, on random bytes (the speed does not depend on them). Also the device's bf16 (fp32
without --amp; TF32 where the convolutions run it) matmul peak, measured in the same run, the share
of it the step's convolutions reach, peak memory, the device, host CPU and torch version.

ops_per_step: the operations one training step dispatches (forward, loss, backward, Adam), counted
as a GPU launches them: every aten op that reaches the device's kernels, seen by a TorchDispatchMode
below autograd and autocast (composite ops split into theirs), views and allocations left out
(they launch nothing); the step in the form a GPU runs it (eager, the prior in one LSTM call, Adam
fused) whatever the device. On a CPU each LSTM layer is one oneDNN op each way and the RNN runs
frame by frame, where cuDNN makes each one call: there the count is an upper bound of a GPU's.
--compile_mode reduce-overhead captures the compiled encoder and decoder in CUDA graphs (a GPU
only).
"""
import argparse
import collections
import contextlib
import itertools
import json
import platform
import resource
import subprocess
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import BENCHMARKS, add_dataset_flag
from dataloader import SpriteBatches, content_augment
from model import CDSVAE, FZCritic, cdsvae_loss, critic_loss
from smmnist import MASS_CENTRE
from utils import (OneLineErrors, adam_fused, add_amp_flag, add_compile_flags, amp_dtype, autocast,
                   check_compile_flags, compile_model, dtype_name, grad_scaler,
                   pick_device, prepare_for_device, run_main)

TRAIN_VIDEOS = 9000  # the Sprites train split: the MI estimate's dataset size
WARMUP = 2  # untimed calls before each timing (the first also compiles, with --compile)


def get_args(argv=None):
    p = OneLineErrors(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    arg("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if any")
    arg("--batch_size", type=int, default=32, help="videos per step (default 32)")
    arg("--steps", type=int, default=3, help=f"timed calls, after {WARMUP} untimed (default 3)")
    add_amp_flag(arg)
    add_compile_flags(arg)
    arg("--nf", type=int, default=64, help="conv width (default 64, the paper's)")
    arg("--z_input", choices=("bilstm", "frame_delta", "full"), default="bilstm",
        help="what q(z|x) reads (default bilstm, the paper's)")
    arg("--f_mirror", action="store_true", help="q(f|x) reads the mirrored video too")
    arg("--weight_mi_critic", type=float, default=0.0,
        help="weight of the critic's I(f; z) estimate; the critic is trained too (default 0: off)")
    arg("--threads", type=int, default=0, help="CPU threads (default 0: torch's choice)")
    add_dataset_flag(arg, data_root=False)
    arg("--profile", action="store_true",
        help="also each op's share of two steps' self time (torch.profiler), the largest first")
    arg("--paper_step", action="store_true", help="also time the paper repo's step (fp32, the "
        "video and both views each through the whole model) on the batch, and our speed-up")
    args = p.parse_args(argv)
    if args.batch_size < 2 or args.steps < 1 or args.nf < 1 or args.threads < 0:
        p.error("--batch_size must be at least 2, --steps and --nf positive, --threads 0 or more")
    if not args.weight_mi_critic >= 0:
        p.error(f"--weight_mi_critic must be 0 (off) or positive, got {args.weight_mi_critic}")
    check_compile_flags(p, args)
    return args


# ---- what is measured ----------------------------------------------------------------------------
def host_cpu_model():
    """lscpu's 'Model name' (ARM's /proc/cpuinfo has none), else /proc/cpuinfo's, else the arch."""
    text = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        text += "\n" + f.read()
    for key, _, value in (line.partition(":") for line in text.splitlines()):
        if key.strip().lower() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def seconds_per_call(work, n, device):
    """Mean seconds of n calls after WARMUP untimed ones, on a GPU by its clock (CUDA events)."""
    for _ in range(WARMUP):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(n):
            work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / n
    t = time.perf_counter()
    for _ in range(n):
        work()
    return (time.perf_counter() - t) / n


def matmul_peak(device, dtype):
    """FLOP/s of square matmuls large enough to fill the device: 8192 on a GPU, 2048 on a CPU's
    cores, 1024 on one (as full, 8x fewer FLOPs)."""
    n, reps = (8192, 20) if device.type == "cuda" else (
        2048 if torch.get_num_threads() > 1 else 1024, 10)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    # fp32 convolutions run in TF32 on a GPU (cudnn's default): the peak is TF32's too
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    try:
        return 2 * n ** 3 / seconds_per_call(lambda: a @ b, reps, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def conv_flops_per_video(model, device):
    """A training step's conv FLOPs per video: the encoder on the video, its motion view and its
    mirror with f_mirror (the content view reuses the video's), the decoder; backward 2x forward."""
    model.eval()  # batches of one frame, which BatchNorm refuses in training
    with torch.no_grad(), FlopCounterMode(display=False) as enc:
        model.encoder(torch.zeros(1, 1, model.decoder.channels, 64, 64, device=device))
    with torch.no_grad(), FlopCounterMode(display=False) as dec:
        model.decode(torch.zeros(1, 1, model.z_dim, device=device),
                     torch.zeros(1, model.f_dim, device=device))
    model.train()
    enc, dec = (c.get_flop_counts()["Global"][torch.ops.aten.convolution] for c in (enc, dec))
    return 3 * model.frames * ((3 if model.f_mirror else 2) * enc + dec)


# ---- the loader and the step ---------------------------------------------------------------------
def batch_stream(args, device, frames):
    """Endless batches, made on `device` as training makes them, of 8 batches of random bytes (and
    random digit positions on Moving MNIST, which its motion view reads)."""
    g = torch.Generator().manual_seed(0)
    n, bench = 8 * args.batch_size, BENCHMARKS[args.dataset]
    X = torch.randint(0, 256, (n, frames, 64, 64, bench.channels), dtype=torch.uint8, generator=g)
    A = torch.zeros(n, 4, dtype=torch.long)
    D = (MASS_CENTRE + torch.randint(0, 32, (n, frames, 1, 2), generator=g).float()
         if bench.positions else torch.zeros(n, dtype=torch.long))
    loader = SpriteBatches(X, A, D, args.batch_size, shuffle=True, augment=True, seed=0,
                           drop_last=True, content_view=False, device=device,
                           motion_view=bench.motion_view())
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def build_step(args, device, as_on_a_gpu=False):
    """(the model, step(batch) as train_cdsvae.py's, its conv FLOPs per video before compiling);
    as_on_a_gpu: the step eager, in the form a GPU runs it on any device (ops_per_step)."""
    torch.manual_seed(0)
    model = prepare_for_device(CDSVAE(nf=args.nf, z_input=args.z_input, f_mirror=args.f_mirror,
                                      channels=BENCHMARKS[args.dataset].channels).to(device),
                               device)
    flops = conv_flops_per_video(model, device)
    graphs = args.compile_mode == "reduce-overhead" and not as_on_a_gpu
    if as_on_a_gpu:
        model.prior_one_call = True
    elif args.compile:
        model = compile_model(model, args.compile_mode)
    fused = adam_fused(torch.device("cuda") if as_on_a_gpu else device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    critic = critic_optimizer = None
    if args.weight_mi_critic:
        critic = FZCritic(model.f_dim, model.z_dim, model.frames).to(device)
        critic_optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3, betas=(0.5, 0.9),
                                            fused=fused)
    scaler = grad_scaler(device, args.amp)

    def step(batch):
        if graphs:  # a new step: the graphs' outputs of the step before may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, args.amp):
            out = model(batch["x"], m_aug=batch["m_aug"], c_aug_order=batch["c_aug_order"])
        loss, _ = cdsvae_loss(out, batch["x"], TRAIN_VIDEOS, critic=critic,
                              weight_critic=args.weight_mi_critic)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if critic is not None:
            critic_optimizer.zero_grad(set_to_none=True)
            critic_loss(critic, out["f"].detach().float(), out["z"].detach().float()).backward()
            critic_optimizer.step()
    return model, step, flops


# aten ops that launch no kernel besides the views (OpOverload.is_view): allocations, aliases
NO_KERNEL = {getattr(torch.ops.aten, name) for name in (
    "_unsafe_view", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
    "unsafe_split", "unsafe_split_with_sizes", "lift_fresh")}


class OpCounter(TorchDispatchMode):
    """Counts by name the aten ops that reach a device's kernels, views and allocations left out."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and not func.is_view and func.overloadpacket not in NO_KERNEL:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(args, device, batch):
    """{op: times} in one training step in the form a GPU runs it, after an uncounted one (the
    first makes Adam's state)."""
    _, step, _ = build_step(args, device, as_on_a_gpu=True)
    step(batch)
    with OpCounter() as counter:
        step(batch)
    return counter.counts


def share_of_peak(achieved, peak):
    """achieved / peak in 3 significant digits: a fast GPU's tiny share is not rounded to 0."""
    return float(f"{achieved / peak:.3g}")


def paper_step(args, batch, device):
    """The paper repo's train() step: fp32, default memory layout, model(x), model(c_aug) and
    model(m_aug) each a whole forward pass (the views decoded though no loss reads them)."""
    torch.manual_seed(0)
    model = CDSVAE(nf=args.nf, f_head_leaky=True, deconv_normal=False).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, m_aug = batch["x"], batch["m_aug"]
    c_aug = content_augment(x, order=batch["c_aug_order"])

    def step():
        out, c_out, m_out = model(x), model(c_aug), model(m_aug)
        loss, _ = cdsvae_loss({**out, "c_post": c_out, "m_post": m_out}, x, TRAIN_VIDEOS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def profile_step(step, batch, device):
    """{op: share of two steps' self time (the device's on CUDA)}, the 12 largest."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step(batch)
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, key) for e in events)
    ranked = sorted(events, key=lambda e: -getattr(e, key))[:12]
    return {e.key: round(getattr(e, key) / total, 3) for e in ranked}


# ---- the run -------------------------------------------------------------------------------------
def measure(args, device):
    """{figure: value}: the speeds, the peak memory, the matmul peak and the convs' share of it."""
    cuda, B = device.type == "cuda", args.batch_size
    model, step, flops = build_step(args, device)
    batches = batch_stream(args, device, model.frames)
    batch = next(batches)
    t = time.perf_counter()
    step(batch)  # the first step: compiles with --compile, searches cudnn's algorithms on CUDA
    if cuda:
        torch.cuda.synchronize(device)
    first_step_s = time.perf_counter() - t
    step_s = seconds_per_call(lambda: step(batch), args.steps, device)
    loader_s = seconds_per_call(lambda: next(batches), args.steps, device)
    end_to_end_s = seconds_per_call(lambda: step(next(batches)), args.steps, device)
    result = {"step_per_s": round(B / step_s, 2), "loader_per_s": round(B / loader_s, 2),
              "end_to_end_per_s": round(B / end_to_end_s, 2),
              "ms_per_step": round(1000 * step_s, 2), "first_step_s": round(first_step_s, 2)}
    if args.compile_mode == "reduce-overhead":  # 0: every compiled graph was captured
        from torch._dynamo.utils import counters
        result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    ops = count_ops(args, device, batch)
    result["ops_per_step"] = sum(ops.values())
    if args.profile:
        result["profile"] = profile_step(step, batch, device)
        result["ops_by_name"] = dict(ops.most_common(12))
    if args.paper_step:
        paper_s = seconds_per_call(paper_step(args, batch, device), args.steps, device)
        result.update(paper_sequences_per_s=round(B / paper_s, 2),
                      paper_ms_per_step=round(1000 * paper_s, 2),
                      speedup_over_paper_step=round(paper_s / step_s, 2))
    # the most bytes the run held, before the matmuls' large operands (ru_maxrss is in KiB)
    peak_mem = (torch.cuda.max_memory_allocated(device) if cuda else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 2 ** 10)
    dtype = amp_dtype(device, args.amp) or torch.float32  # the convolutions' own dtype
    peak, achieved = matmul_peak(device, dtype), flops * B / step_s
    return {**result, "matmul_dtype": str(dtype).removeprefix("torch."),
            "matmul_peak_gflops": round(peak / 1e9, 1),
            "conv_gflops_achieved": round(achieved / 1e9, 1),
            "share_of_matmul_peak": share_of_peak(achieved, peak),
            "peak_mem_gb": round(peak_mem / 2 ** 30, 2),
            "peak_mem_of": "cuda_max_allocated" if cuda else "host_max_rss"}


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    figures = measure(args, device)
    host = host_cpu_model()
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else host,
        "host_cpu": host, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "amp": args.amp,
        "precision": dtype_name(amp_dtype(device, args.amp)),
        **{k: getattr(args, k) for k in ("dataset", "compile", "compile_mode", "nf", "batch_size",
                                         "z_input", "f_mirror", "weight_mi_critic", "steps")},
        **figures}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    run_main(main)
