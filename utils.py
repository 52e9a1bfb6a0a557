"""What the scripts share: devices, precision, atomic writes, checkpoints, locks, the curves."""
import contextlib
import fcntl
import functools
import argparse
import inspect
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm import tqdm

from model import CDSVAE

MODEL_ARGS = ("f_dim", "z_dim", "g_dim", "rnn_size", "nf", "frames", "z_input", "f_mirror",
              "f_head_leaky", "deconv_normal")
# options removed after their experiments lost (EXPERIMENTS.md): a checkpoint that needs one names
# the commit
REMOVED_AT = "7544b94"
REMOVED_MODEL_ARGS = {"f_film": False}
REMOVED_TRAIN_ARGS = {"f_film": False, "c_aug_flip": False, "weight_cyc": 0.0, "recon_m_aug": False,
                      "weight_swap": 0.0}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of other sizes than asked for."""


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag is one line on stderr, not the usage of every flag followed by it."""
    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


# ---- devices and precision -----------------------------------------------------------------------
def pick_device(name="auto"):
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA GPU is visible; "
                         "use --device cpu or auto")
    return torch.device(name)


AMP_CHOICES = ("off", "auto", "bf16", "fp16")
AMP_HELP = ("mixed precision: auto (the flag alone) = bf16 where the device runs it natively, else "
            "fp16 on a GPU and fp32 on a CPU; bf16 or fp16 force it; off (default) = fp32")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
BF16_NATIVE_MAX_RATIO = 2.0  # emulated bf16 convolutions run 3-20x slower than fp32; native faster


def cuda_asked(device_flag):
    """Whether --device (auto, cpu or cuda) resolves to a GPU."""
    return device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())


def add_amp_flag(arg):
    """--amp [auto|bf16|fp16|off], the same in every script."""
    arg("--amp", nargs="?", const="auto", default="off", choices=AMP_CHOICES, help=AMP_HELP)


def cpu_flags():
    """The CPU's bf16 features that /proc/cpuinfo lists (empty where there is none)."""
    wanted = {"avx512_bf16", "amx_bf16", "bf16"}  # x86's two; ARM's Features line says bf16
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        return sorted(wanted & set(f.read().split()))
    return []


@functools.cache
def cpu_bf16_ratio():
    """Seconds of a bf16 convolution over an fp32 one on this CPU, measured (~0.1 s): bf16 as
    torch and oneDNN run it here, after any ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA limit."""
    def best(dtype):
        conv = nn.Conv2d(64, 128, 4, 2, 1).to(dtype=dtype, memory_format=torch.channels_last)
        x = torch.randn(16, 64, 16, 16).to(dtype=dtype, memory_format=torch.channels_last)
        times = []
        with torch.no_grad():
            for _ in range(7):  # the first call sets oneDNN up: the best of the rest
                t = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - t)
        return min(times[1:])
    with torch.random.fork_rng(devices=[]):  # a run's random numbers do not depend on the probe
        return best(torch.bfloat16) / best(torch.float32)


def cpu_has_native_bf16():
    return cpu_bf16_ratio() <= BF16_NATIVE_MAX_RATIO


def amp_dtype(device, amp="auto"):
    """The autocast dtype that --amp asks for on `device`, or None for fp32. auto: bf16 where it
    is native (a CPU with AVX-512 BF16 or AMX, a GPU from Ampere on), else fp16 on a GPU (with
    loss scaling) and fp32 on a CPU (emulated bf16 is 12-200x slower than fp32)."""
    amp = {True: "auto", False: "off", None: "off"}.get(amp, amp)
    if amp in HALF:
        return HALF[amp]
    if amp != "auto":
        return None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float16


def dtype_name(dtype):
    return "fp32" if dtype is None else {v: k for k, v in HALF.items()}[dtype]


def precision_note(device, amp):
    """One line: the precision --amp gives on `device`, and why."""
    dtype = amp_dtype(device, amp)
    amp = {True: "auto", False: "off", None: "off"}.get(amp, amp)
    if amp != "auto":
        return f"precision: {dtype_name(dtype)} (--amp {amp})"
    if device.type == "cuda":
        why = "bf16 is native here" if dtype == torch.bfloat16 else "no native bf16 on this GPU"
        return f"precision: {dtype_name(dtype)} autocast (--amp auto: {why})"
    flags = ", ".join(cpu_flags()) or "none of avx512_bf16 / amx_bf16 / bf16"
    where = (f"this CPU ({torch.backends.cpu.get_cpu_capability()}; cpuinfo bf16 flags: {flags}) "
             f"ran a bf16 convolution {cpu_bf16_ratio():.1f}x as long as fp32")
    why = "native" if dtype is not None else "emulated: fp32 is faster (--amp bf16 forces it)"
    return f"precision: {dtype_name(dtype)} (--amp auto: {where}, so bf16 is {why})"


def grad_scaler(device, amp):
    """Loss scaling where --amp means fp16, whose small gradients underflow; bf16 needs none."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype(device, amp) == torch.float16)


def autocast(device, amp):
    """Mixed precision on `device` in the dtype --amp gives there (amp_dtype); none for fp32."""
    dtype = amp_dtype(device, amp)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def for_inference(module):
    """`module` in eval mode, the same up to rounding and ~25% faster (2-core CPU, bf16): BatchNorms
    folded into the convolutions before them, LeakyReLUs in place, convolutions channels-last."""
    module.eval()
    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if (isinstance(conv, nn.modules.conv._ConvNd)
                    and isinstance(bn, nn.modules.batchnorm._BatchNorm)):
                transpose = isinstance(conv, nn.modules.conv._ConvTransposeNd)
                seq._modules[a] = fuse_conv_bn_eval(conv, bn, transpose=transpose)
                seq._modules[b] = nn.Identity()
    for m in module.modules():
        if isinstance(m, nn.LeakyReLU):
            m.inplace = True
        elif isinstance(m, nn.modules.conv._ConvNd):
            m.to(memory_format=torch.channels_last_3d if m.weight.dim() == 5
                 else torch.channels_last)
    return module


# ---- progress ------------------------------------------------------------------------------------
PLAIN_PROGRESS_EVERY_S = 30.0  # off a terminal, a progress line this often


class PlainProgress(tqdm):
    """tqdm for a file, a pipe or CI, where a redrawn bar shows nothing: a plain line every
    PLAIN_PROGRESS_EVERY_S seconds, with what, how far, the rate and the time left."""

    def __init__(self, *args, **kwargs):
        self.last_line = None
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        now = self._time()
        if self.last_line is None:
            self.last_line = now  # the start; the first line comes one interval later
        if now - self.last_line < PLAIN_PROGRESS_EVERY_S or msg is not None:
            return True
        self.last_line = now
        d = self.format_dict
        rate = d["rate"] or (d["n"] - d["initial"]) / max(d["elapsed"], 1e-9)
        left = ((d["total"] - d["n"]) / rate) if rate and d["total"] else None
        line = (f"{d['prefix'] or 'progress'}: {d['n']}/{d['total'] or '?'} {d['unit']}s, "
                f"{rate:.3g} {d['unit']}/s, {self.format_interval(d['elapsed'])} elapsed"
                + (f", ETA {self.format_interval(left)}" if left is not None else "")
                + (f", {d['postfix']}" if d["postfix"] else ""))
        print(line, file=sys.stderr, flush=True)
        return True


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal, plain progress lines elsewhere (PlainProgress)."""
    return (tqdm if sys.stderr.isatty() else PlainProgress)(iterable, **kwargs)


# ---- files ---------------------------------------------------------------------------------------
@functools.cache  # the code a process runs does not change; a checkpoint an epoch need not ask
def git_revision():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_atomic(path, write):
    """write(temporary path) beside `path`, then rename: a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def save_atomic(obj, path):
    """torch.save, atomically."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def write_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomic(path, write)


def half_precision(state):
    """A state_dict with its floating-point tensors in fp16: the shipped form of weights."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def read_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True), refusing in one line a missing, unsafe or non-finite file
    (torch's own message advises weights_only=False, which would run the code a file holds)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        # a plain pickle draws a multi-line warning on its protocol before the refusal
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same to the user
        other = re.search(r"GLOBAL ([\w.]+)", str(e))
        if other and other[1].rsplit(".", 1)[-1][:1].isupper() and not other[1].startswith("numpy"):
            why = (f"it pickles a whole object of class {other[1]} (as the paper repo's older "
                   f"'ds_vae' checkpoints pickle the whole network), and unpickling it would run "
                   f"that class's code; save its state_dict() as {{'model': ...}} with the code "
                   f"that made it, and load that")
        else:
            why = (f"it holds {other[1]}, not only tensors and plain containers" if other else
                   "it is not a complete torch.save file (empty, truncated or another kind of "
                   "file)")
        raise CheckpointError(f"{path} is not a PyTorch checkpoint that can be loaded safely: "
                              f"{why}") from None
    key = first_not_finite(ckpt)  # weights, optimizer state...
    if key is not None:
        raise CheckpointError(f"{path} holds NaN or infinite values in {key}: the run that wrote "
                              f"it diverged or the file is damaged; use an earlier checkpoint")
    return ckpt


def paper_encoder_names(state):
    """The paper repo's encoder names -> ours: its c1..c4 are our net.0..3, its c5 our net.4, 5."""
    out = {}
    for k, v in state.items():
        block = re.fullmatch(r"encoder\.c([1-4])\.main\.(.+)", k)
        last = re.fullmatch(r"encoder\.c5\.(\d)\.(.+)", k)
        if block:
            k = f"encoder.net.{int(block[1]) - 1}.{block[2]}"
        elif last:
            k = f"encoder.net.{4 + int(last[1])}.{last[2]}"
        out[k] = v
    return out


def paper_model_checkpoint(state, path):
    """The paper repo's CDSVAE state_dict as our checkpoint, its sizes read from its shapes."""
    renamed = {}
    for k, v in paper_encoder_names(state).items():
        m = re.fullmatch(r"decoder\.upc([1-5])\.(?:main\.)?(\d)\.(.+)", k)
        # upc1 is a plain Sequential (conv 0, BN 1), upc2..4 are 'main' blocks, upc5's conv is 0
        if m:
            k = {"1": f"decoder.net.{m[2]}.{m[3]}", "5": f"decoder.net.6.{m[3]}"}.get(
                m[1], f"decoder.net.{int(m[1]) + 1}.{m[2]}.{m[3]}")
        k = re.sub(r"^z_prior_lstm_ly([12])\.", r"z_prior_lstm_\1.", k)
        renamed[re.sub(r"^f_(mean|logvar)\.model\.0\.", r"f_\1.0.", k)] = v
    try:
        model_args = dict(f_dim=state["f_mean.model.0.weight"].shape[0],
                          z_dim=state["z_mean.weight"].shape[0],
                          g_dim=state["z_lstm.weight_ih_l0"].shape[1],
                          rnn_size=state["z_lstm.weight_hh_l0"].shape[1],
                          nf=state["encoder.c1.main.0.weight"].shape[0], frames=8,
                          f_head_leaky=True, deconv_normal=False)
    except KeyError as e:
        raise CheckpointError(f"{path} looks like the paper repo's checkpoint but has no "
                              f"{e}") from None
    return {"model": renamed, "model_args": model_args, "source": "the paper repo's checkpoint"}


def read_model_checkpoint(path):
    """A checkpoint of train_cdsvae.py or its export ('model', 'model_args') or the paper's."""
    ckpt = read_checkpoint(path)
    if (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)
            and "encoder.c1.main.0.weight" in ckpt["model"]):
        return paper_model_checkpoint(ckpt["model"], path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of train_cdsvae.py (no 'model' / "
                              f"'model_args') nor of the paper repo (no 'model' with its "
                              f"parameter names)")
    return ckpt


def saved_model_args(ckpt, path="the checkpoint"):
    """A checkpoint's model_args with CDSVAE's defaults added; one that needs a removed option is
    refused."""
    args = dict(ckpt["model_args"])
    for k, off in REMOVED_MODEL_ARGS.items():
        if args.pop(k, off) != off:
            raise CheckpointError(f"{path} needs --{k}, which was removed after its experiment "
                                  f"lost; load it with the code of commit {REMOVED_AT}")
    defaults = {k: p.default for k, p in inspect.signature(CDSVAE).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **args}


def mismatched_model_args(ckpt, asked):
    """{name: phrase} for each of `asked` (None: any) that differs from the checkpoint's."""
    saved = saved_model_args(ckpt)
    return {k: f"{k}={v} asked for but {saved.get(k)} in the checkpoint"
            for k, v in asked.items() if v is not None and saved.get(k) != v}


def check_sizes(model, state_dict, path):
    """Refuse a state_dict whose names or shapes are not the model's, naming the first few."""
    own = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} in the checkpoint vs {tuple(own[k].shape)} asked for"
           for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    bad += [f"{k} missing" for k in own if k not in state_dict]
    bad += [f"{k} not in this network" for k in state_dict if k not in own]
    if bad:
        raise CheckpointError(f"{path} was trained with other sizes: {'; '.join(bad[:4])}")


def load_model(path, device="cpu", **overrides):
    """The CDSVAE of a checkpoint in fp32, eval mode; refused if not of the sizes in `overrides`."""
    ckpt = read_model_checkpoint(path)
    mismatched = mismatched_model_args(ckpt, overrides)
    if mismatched:
        raise CheckpointError(f"{path} was trained with other sizes: "
                              f"{', '.join(mismatched.values())}")
    model = CDSVAE(**saved_model_args(ckpt, path))
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    check_sizes(model, state, path)
    model.load_state_dict(state)
    return model.to(device).eval()


# ---- the loss curves -----------------------------------------------------------------------------
LOSS_TERMS = ("recon", "kld_f", "kld_z", "mi_fz", "mi_critic", "con_f", "con_z", "loss")
NOT_LOSSES = ("epoch", "step", "lr", "seconds", "overhead_s")


def plot_loss_curves(rows, path):
    """Every numeric term of metrics rows against the epoch, a panel each, to the PNG `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    present = {k for r in rows for k, v in r.items()
               if isinstance(v, (int, float)) and k not in NOT_LOSSES}
    keys = [k for k in LOSS_TERMS if k in present] + sorted(present - set(LOSS_TERMS))
    if not keys:
        return
    cols = min(4, len(keys))
    nr = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nr, cols, figsize=(3.2 * cols, 2.6 * nr), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["epoch"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None, ms=3)
        ax.set_title(k)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if k in ("recon", "loss") and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


# ---- content checks ------------------------------------------------------------------------------
def first_not_finite(obj, key=""):
    """The dotted key ('model.encoder.net.0.weight') of obj's first non-finite tensor, or None."""
    if isinstance(obj, torch.Tensor):
        return key if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    if isinstance(obj, (list, tuple)):
        obj = dict(enumerate(obj))
    for k, v in (obj.items() if isinstance(obj, dict) else ()):
        found = first_not_finite(v, f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


# ---- one process per output ----------------------------------------------------------------------
@contextlib.contextmanager
def held_lock(lock, busy):
    """Hold the file `lock` (flock'ed, our PID in it), or exit with busy.format(holder=...); it dies
    with its process. On release it is removed, with the folders it made, if empty."""
    folder = os.path.dirname(os.path.abspath(lock))
    made, d = [], folder
    while not os.path.isdir(d):  # the folders the lock makes, deepest first
        made.append(d)
        d = os.path.dirname(d)
    fd = _take_lock(lock, folder, busy)
    try:
        yield
    finally:
        os.remove(lock)  # while still held: one that opened this file then opens the path again
        os.close(fd)
        for d in made:
            try:
                os.rmdir(d)
            except OSError:  # not empty: kept, and so are the folders above it
                break


def _take_lock(lock, folder, busy):
    """The descriptor of the file `lock`, flock'ed by us, holding our PID (see held_lock)."""
    while True:
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SystemExit(f"error: cannot write in {folder}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            holder = f"process {pid}" if pid.isdigit() else "another process"
            raise SystemExit(f"error: {busy.format(holder=holder)}") from None
        if os.path.exists(lock) and os.path.samestat(os.fstat(fd), os.stat(lock)):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # its holder removed that file as we opened it: take the one at the path now


@contextlib.contextmanager
def folders_held(folders, flags="--log_dir / --model_dir"):
    """Hold <folder>/.lock of each folder for the life of the `with`: one run writes in a folder."""
    with contextlib.ExitStack() as stack:
        for folder in {os.path.realpath(f): f for f in folders}.values():
            stack.enter_context(held_lock(os.path.join(folder, ".lock"),
                                          f"{folder} is in use by {{holder}}, a run writing there; "
                                          f"wait for it to end, or choose another {flags}"))
        yield


# ---- the device's fast paths: training and bench.py ---------------------------------------------
def prepare_for_device(model, device):
    """`model` channels-last (bf16 convs ~2x faster on the CPU; the tensor cores' layout), and on
    CUDA cudnn.benchmark (a run's shapes do not change) and the prior in one LSTM call (a CDSVAE's
    prior_one_call: one cuDNN kernel, not a launch per cell and frame)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model.prior_one_call = device.type == "cuda"
    return model.to(memory_format=torch.channels_last)


def adam_fused(device):
    """Adam's `fused` on `device`: one kernel for all tensors on CUDA; torch's default elsewhere."""
    return True if device.type == "cuda" else None


def make_adam(params, device, **kwargs):
    """torch.optim.Adam over `params`, fused on CUDA (one kernel for every tensor)."""
    return torch.optim.Adam(params, fused=adam_fused(device), **kwargs)


def load_adam_state(optimizer, state):
    """optimizer.load_state_dict(state), each group fused as make_adam makes it on this device
    (the saved groups' flag would win: a CPU run's None would drop fused Adam on a GPU); set
    before loading, so that torch puts the step counts where that flag needs them."""
    groups = [{**saved, "fused": own["fused"]}
              for saved, own in zip(state["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**state, "param_groups": groups})


COMPILE_MODES = ("default", "reduce-overhead")


def add_compile_flags(arg):
    """--compile and --compile_mode, the same in every script."""
    arg("--compile", action="store_true", help="torch.compile the frame encoder and decoder")
    arg("--compile_mode", choices=COMPILE_MODES, default=None,
        help="torch.compile's mode, implies --compile: default, or reduce-overhead, which also "
             "captures the compiled parts in CUDA graphs (a GPU only)")


def check_compile_flags(p, args):
    """--compile_mode implies --compile; CUDA graphs are refused in one line without a GPU."""
    args.compile = args.compile or args.compile_mode is not None
    args.compile_mode = args.compile_mode or "default"
    if args.compile_mode == "reduce-overhead" and not cuda_asked(args.device):
        p.error("--compile_mode reduce-overhead captures CUDA graphs, which need a GPU; on a CPU "
                "use --compile")


def compile_model(model, mode="default"):
    """A CDSVAE's convolutions compiled in place (most of the step); the sequential LSTMs stay
    eager. mode reduce-overhead also captures them in CUDA graphs (a GPU only). The state_dict's
    keys do not change."""
    model.encoder.compile(mode=mode)
    model.decoder.compile(mode=mode)
    return model
