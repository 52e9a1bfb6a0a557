"""What the scripts share: devices, precision, faults, atomic writes, checkpoints, locks, the
curves."""
import argparse
import contextlib
import errno
import fcntl
import functools
import inspect
import io
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
import warnings
import zipfile
import zlib

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from tqdm import tqdm

from model import CDSVAE

MODEL_ARGS = ("f_dim", "z_dim", "g_dim", "rnn_size", "nf", "frames", "z_input", "f_mirror",
              "f_head_leaky", "deconv_normal", "channels")
# options removed after their experiments lost (EXPERIMENTS.md): a checkpoint that needs one names
# the commit
REMOVED_AT = "7544b94"
REMOVED_MODEL_ARGS = {"f_film": False}
REMOVED_TRAIN_ARGS = {"f_film": False, "c_aug_flip": False, "weight_cyc": 0.0, "recon_m_aug": False,
                      "weight_swap": 0.0}


class RefusedInput(ValueError):
    """A file or setting refused in one line that says what was wrong and what to do (exit 1)."""


class CheckpointError(RefusedInput):
    """A checkpoint that is missing, unreadable, damaged, malformed or of other sizes than asked."""


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

    def clear(self, nolock=False):
        """Nothing to clear: no bar was drawn (tqdm.write calls this before each line it writes)."""

    def close(self):
        """tqdm's close, less the '\\r' or '\\n' that would clear or end a drawn bar: off a
        terminal nothing but the plain lines is written (a fault's one line stays one line)."""
        if not hasattr(self, "fp"):  # disabled (a process of DDP but the first): nothing drawn
            return super().close()
        self.fp, drawn_to = io.StringIO(), self.fp
        try:
            super().close()
        finally:
            self.fp = drawn_to


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal, plain progress lines elsewhere (PlainProgress)."""
    return (tqdm if sys.stderr.isatty() else PlainProgress)(iterable, **kwargs)


# ---- faults: one line and training's exit codes, in every script ---------------------------------
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# what an OSError means to the user, and what to do
OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space, or choose a place on another disk",
    errno.EDQUOT: "the disk quota is used up: free space, or choose a place on another disk",
    errno.EFBIG: "the file would pass the file-size limit (`ulimit -f`): raise it, or write less",
    errno.EROFS: "the file system is read-only: choose a writable place",
    errno.EACCES: "permission denied: fix the permissions, or choose another path",
    errno.EPERM: "operation not permitted: fix the permissions, or choose another path",
    errno.ENOTDIR: "a part of its path is a file, not a folder: choose another path",
    errno.EISDIR: "it is a folder: name a file",
    errno.ENOENT: "it, or a folder of its path, does not exist",
    errno.EIO: "an input/output error: the disk or network file system is failing; check it "
               "(dmesg), or use a copy on a sound disk",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
}


def os_error_line(error, path=None, doing=None):
    """One line for an OSError: which file, what failed, why in words and what to do."""
    path = path or error.filename
    why = OS_ADVICE.get(error.errno) or error.strerror or str(error)
    what = f"cannot {doing} {path}" if doing and path else (path or "a file operation failed")
    return f"{what}: {why}"


class FileFault(OSError):
    """A read or write of a named file that failed; its text says which, why and what to do."""

    def __init__(self, error, path, doing):
        super().__init__(error.errno, error.strerror, path)
        self.line = os_error_line(error, path, doing)

    def __str__(self):
        return self.line


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP where training's own stop (a checkpoint) does not apply: the
    script unwinds (locks released, temporaries removed) and exits 128 + the signal's number."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class _Stop:
    """The first stop signal (0: none yet), and whether it waits for a block's end to be raised."""
    signum, deferring, pending = 0, 0, False


def _on_stop_signal(signum, frame):
    """Interrupted where the script is, or at the end of a signals_deferred() block. A later
    signal is ignored: an impatient second Ctrl-C must not cut the first one's clean-up short."""
    if _Stop.signum:
        return
    _Stop.signum = signum
    if _Stop.deferring:
        _Stop.pending = True
    else:
        raise Interrupted(signum)


@contextlib.contextmanager
def signals_deferred():
    """A block a stop signal does not cut (taking or releasing a lock, removing a temporary
    file): the signal's Interrupted comes at its end."""
    _Stop.deferring += 1
    try:
        yield
    finally:
        _Stop.deferring -= 1
        if _Stop.pending and not _Stop.deferring:
            _Stop.pending = False
            raise Interrupted(_Stop.signum)


class _Console:
    """sys.stdout / sys.stderr that never raise: a closed terminal (SIGHUP, then EIO) or a closed
    pipe (`| head`) must not end a run before its checkpoint or results are written. After a
    failed write the stream goes to /dev/null."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except OSError:
            self._to_null()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except OSError:
            self._to_null()

    def _to_null(self):
        with contextlib.suppress(OSError, ValueError):
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def run_main(main):
    """Run a script's main() (an int it returns is the exit code): a fault ends in one line on
    stderr, `error: ...` (what was wrong, what to do), and training's exit codes: 1, or 128 + the
    signal (130 / 143 / 129) after SIGINT / SIGTERM / SIGHUP, no lock or temporary file left."""
    sys.stdout, sys.stderr = _Console(sys.stdout), _Console(sys.stderr)
    for s in STOP_SIGNALS:
        signal.signal(s, _on_stop_signal)
    line = None
    try:
        code = main()
        code = code if isinstance(code, int) else 0
    except (Interrupted, KeyboardInterrupt) as e:
        code = 128 + getattr(e, "signum", signal.SIGINT)
        line = (f"stopped by {signal.Signals(code - 128).name} before the end; no file is left "
                f"half-written and no lock is left: run the command again to finish")
    except RefusedInput as e:
        code, line = 1, str(e)
    except OSError as e:
        code, line = 1, str(e) if isinstance(e, FileFault) else os_error_line(e)
    except (MemoryError, torch.OutOfMemoryError) as e:
        code, line = 1, (f"out of memory ({(str(e).splitlines() or [''])[0][:120]}): free memory, "
                         f"or use a smaller --batch_size where the script takes one")
    if line is not None:
        print(f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(code)


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


def make_folder(folder):
    """os.makedirs, saying ENOTDIR where a part of the path is a file (makedirs says EEXIST)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), folder)
    os.makedirs(folder, exist_ok=True)


def temporary_beside(path):
    """The temporary file of this process beside `path`: <path>.tmp<PID>."""
    return f"{path}.tmp{os.getpid()}"


def remove_temporary(tmp, folders=()):
    """Remove `tmp` if it is there, then the empty `folders`, whatever signal comes meanwhile."""
    with signals_deferred(), contextlib.suppress(OSError):
        if os.path.exists(tmp):
            os.remove(tmp)
        for folder in folders:
            os.rmdir(folder)


def write_atomic(path, write):
    """write(temporary path) beside `path`, then rename: a crash never leaves half a file. A failed
    write is a FileFault naming `path`; the temporary is removed, a previous file kept whole."""
    tmp = temporary_beside(path)
    try:
        make_folder(os.path.dirname(os.path.abspath(path)))
        write(tmp)
        os.replace(tmp, path)
    except FileFault:
        raise
    except OSError as e:
        raise FileFault(e, path, "write") from None
    finally:
        remove_temporary(tmp)


def read_text(path):
    """A text file's content, refused in one line if it is not a regular file (reading a fifo
    would block) or cannot be read (a FileFault naming it)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise RefusedInput(f"{path} is not a regular file (a folder, fifo or device); give a file")
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise FileFault(e, path, "read") from None


def append_text(text, path):
    """Append to a log; a failed write (a full disk) is a FileFault naming the file."""
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        raise FileFault(e, path, "write") from None


def write_text(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def save_atomic(obj, path):
    """torch.save, atomically; a failed write says why, which torch's own message hides."""
    def save(tmp):
        try:
            torch.save(obj, tmp)
        except RuntimeError:
            _reproduce_write_error(tmp)
            raise
    write_atomic(path, save)


def _reproduce_write_error(tmp):
    """Raise the OSError behind a failed torch.save to `tmp` by writing 1 MiB there again (enough
    to pass a size limit or to meet a full disk); return if that works (torch's error stands)."""
    with open(tmp, "ab") as f:
        f.write(bytes(1 << 20))
        f.flush()
        os.fsync(f.fileno())


def write_json(obj, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    write_atomic(path, write)


def check_writable(path, flag, needs_bytes=0, example=None):
    """Refuse, before any work, an output that cannot be written: a folder (advising
    <folder>/<example> where given), a path under a file, a read-only or unwritable place (a probe
    file is made there and removed, with the folders made for it), or, for needs_bytes, too little
    free space or too low a file-size limit."""
    if os.path.isdir(path):
        advice = f", e.g. {flag} {os.path.join(path, example)}" if example else ""
        raise RefusedInput(f"{flag} {path} is a folder; name the file to write{advice}")
    folder = os.path.dirname(os.path.abspath(path))
    made, d = [], folder
    while not os.path.lexists(d):  # the folders the probe makes, deepest first
        made.append(d)
        d = os.path.dirname(d)
    probe = temporary_beside(path)
    try:
        make_folder(folder)
        with open(probe, "wb"):
            pass
        disk = os.statvfs(folder)
    except OSError as e:
        raise FileFault(e, path, "write") from None
    finally:
        remove_temporary(probe, made)
    limit, free = resource.getrlimit(resource.RLIMIT_FSIZE)[0], disk.f_bavail * disk.f_frsize
    if limit != resource.RLIM_INFINITY and needs_bytes > limit:
        raise RefusedInput(f"cannot write {path}: it takes about {needs_bytes / 1e6:.0f} MB, more "
                           f"than the file-size limit of {limit / 1e6:.1f} MB (`ulimit -f`); "
                           f"raise the limit")
    if needs_bytes > free:
        raise RefusedInput(f"cannot write {path}: it takes about {needs_bytes / 1e6:.0f} MB and "
                           f"its disk has {free / 1e6:.0f} MB free; free space or choose "
                           f"another {flag}")


def same_file(a, b):
    """Whether paths a and b name one file: the same path, a symbolic or a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist yet
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting(outputs, inputs):
    """Refuse, before any work, an output ((flag, path), ...) that is one of the inputs a command
    reads ((flag, path), ...; None paths skipped): writing it would destroy what it reads."""
    for out_flag, out in outputs:
        for in_flag, source in inputs:
            if source and same_file(out, source):
                raise RefusedInput(f"{out_flag} {out} is the file {in_flag} reads: writing it "
                                   f"would destroy that input; choose another {out_flag}")


def half_precision(state):
    """A state_dict with its floating-point tensors in fp16: the shipped form of weights."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def _read_bytes(path, name):
    """The bytes of file `path` (called `name` in refusals), read once: refused in one line if it
    is missing, a folder, not a regular file (reading a fifo would block) or unreadable."""
    if os.path.isdir(path):
        raise CheckpointError(f"{name} is a folder, not a checkpoint file; give the file itself")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{name} is not a regular file (a fifo, socket or device); give a "
                              f"checkpoint file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:  # EIO, EACCES...: not "truncated", which torch would say
        raise CheckpointError(os_error_line(e, name, "read")) from None


def zip_damage(data):
    """Why the torch.save zip `data` is damaged, or '' (also for torch's legacy format, which has
    no checksums): a member whose CRC-32 fails, or a broken directory. torch checks neither."""
    buffer = io.BytesIO(data)
    if not zipfile.is_zipfile(buffer):
        return ""
    try:
        with zipfile.ZipFile(buffer) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError, RuntimeError,
            zlib.error) as e:
        return f"its zip directory is broken ({e})"
    return (f"the bytes of its member {bad} do not match their CRC-32 (they changed after it was "
            f"written)" if bad else "")


def read_checkpoint(path, map_location="cpu", what=None):
    """torch.load(weights_only=True) of the file's bytes, read once, refused in one line if it is
    missing or unreadable, damaged (zip_damage), unsafe (torch's own message advises
    weights_only=False, which would run the code a file holds) or not finite. `what`, the kind of
    file the caller expects ('judge file'...), leads each refusal."""
    name = f"{what} {path}" if what else path
    data = _read_bytes(path, name)
    damage = zip_damage(data)
    if damage:
        raise CheckpointError(f"{name} is damaged: {damage}; use another copy or an earlier "
                              f"checkpoint")
    try:
        # a plain pickle draws a multi-line warning on its protocol before the refusal
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
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
        raise CheckpointError(f"{name} is not a PyTorch checkpoint that can be loaded safely: "
                              f"{why}") from None
    key = first_not_finite(ckpt)  # weights, optimizer state...
    if key is not None:
        raise CheckpointError(f"{name} holds NaN or infinite values in {key}: the run that wrote "
                              f"it diverged or the file is damaged; use an earlier checkpoint")
    return ckpt


# ---- what a checkpoint holds, checked before use -------------------------------------------------
# keys that only train_cdsvae.py's resumable model.pt has, not its export or snapshots
TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "rng_cpu", "batches_done", "epoch_sums")
MAX_WIDTH = 1 << 16  # wider than any layer here: a damaged size is refused, not allocated


def checkpoint_kind(ckpt, path):
    """What a loaded file is, for refusals: 'resumable checkpoint', 'exported checkpoint',
    'snapshot', 'judge file', 'judge training checkpoint', the paper repo's files, or another."""
    if not isinstance(ckpt, dict):
        return "file of another kind"
    if isinstance(ckpt.get("source"), str):  # a paper file already read as ours
        return ckpt["source"]
    model, state = ckpt.get("model"), ckpt.get("state_dict")
    if isinstance(state, dict) and "cls_action.0.weight" in state:
        return "the paper repo's judge"
    if isinstance(model, dict) and "encoder.c1.main.0.weight" in model:
        return "the paper repo's checkpoint"
    if "judge_args" in ckpt:
        return "judge file"
    if "corrupt_rng" in ckpt:
        return "judge training checkpoint"
    if "model_args" not in ckpt:
        return "file of another kind"
    if any(k in ckpt for k in TRAINING_ONLY):
        return "resumable checkpoint"
    return ("snapshot" if re.fullmatch(r"epoch_\d+\.pt", os.path.basename(path))
            else "exported checkpoint")


def a_kind(kind):
    """'a judge file', 'an exported checkpoint', 'the paper repo's checkpoint'."""
    return kind if kind.startswith("the ") else ("an " if kind[0] in "aeiou" else "a ") + kind


def _short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _shown(value):
    """A field's value in a refusal: 'str '3'', 'a list'."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return f"{type(value).__name__} {_short(value)}" if value is not None else "None"
    return a_kind(type(value).__name__)


def _whole(value):
    return type(value) is int and value >= 0


def _finite(value):
    return type(value) in (int, float) and math.isfinite(value)


def _state_dict(value):
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


def _optimizer_state(value):
    return (isinstance(value, dict) and isinstance(value.get("state"), dict)
            and isinstance(value.get("param_groups"), list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in value["param_groups"]))


def _rng_states(value):
    return isinstance(value, list) and all(
        isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1 for t in value)


def _history(value):
    """A list of metrics rows, each a dict with a whole 'epoch', that metrics.jsonl can hold."""
    if not (isinstance(value, list)
            and all(isinstance(r, dict) and _whole(r.get("epoch")) for r in value)):
        return False
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _is_dict(value):
    return isinstance(value, dict)


STATE_DICT = (_state_dict, "a state_dict (names to tensors)")
ARGS_DICT = (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
             "a dict of the network's arguments")
OPTIMIZER = (_optimizer_state, "an optimizer's state_dict ('state', 'param_groups')")
# every field train_cdsvae.resume reads, with what it must be; the critic's only with the critic
RESUMABLE_FIELDS = {
    "model": STATE_DICT, "model_args": ARGS_DICT, "optimizer": OPTIMIZER,
    "scheduler": (_is_dict, "a scheduler's state_dict"),
    "scaler": (_is_dict, "a grad scaler's state_dict"),
    **dict.fromkeys(("epoch", "step", "batches_done", "epoch_batches"),
                    (_whole, "a whole number, 0 or more")),
    "epoch_seconds": (lambda v: _finite(v) and v >= 0, "a finite number of seconds, 0 or more"),
    "epoch_sums": (lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and _finite(x) for k, x in v.items()), "a dict of terms to finite sums"),
    "history": (_history, "a list of metrics rows (dicts with a whole 'epoch', JSON values)"),
    "rng_cpu": (lambda v: _rng_states(v) and len(v) > 0,
                "a list of each process's random state (uint8 tensors)"),
    "rng_cuda": (_rng_states, "a list of each process's CUDA random state (uint8 tensors)"),
    "world_size": (lambda v: type(v) is int and v >= 1, "a whole number of processes"),
    "args": (_is_dict, "a dict of the run's flags"),
    "critic": STATE_DICT, "critic_optimizer": OPTIMIZER}


def check_fields(ckpt, name, fields, optional=()):
    """Refuse ckpt (called `name`), naming each bad field, unless every field of `fields` ({key:
    (test, what it must be)}) is there and passes its test; those of `optional` only if there."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{name} holds {_shown(ckpt)}, not a dict of fields")
    bad = [f"no '{k}'" if k not in ckpt else f"'{k}' that is {_shown(ckpt[k])}, not {what}"
           for k, (ok, what) in fields.items()
           if (k in ckpt and not ok(ckpt[k])) or (k not in ckpt and k not in optional)]
    if bad:
        raise CheckpointError(f"{name} has {'; '.join(bad)}: it is damaged or was written by "
                              f"other code; use another copy or an earlier checkpoint")


def read_resumable_checkpoint(path):
    """model.pt of train_cdsvae.py for --resume, each field resume reads checked with its type;
    an export, a snapshot, a judge or a paper file is refused saying what it is and what to do."""
    if not os.path.lexists(path):
        raise CheckpointError(f"no checkpoint at {path} to resume: the run wrote none yet (it was "
                              f"stopped before its first); start it again without --resume")
    ckpt = read_checkpoint(path, what="checkpoint to resume")
    kind = checkpoint_kind(ckpt, path)
    if kind in ("exported checkpoint", "snapshot"):
        raise CheckpointError(f"{path} is {a_kind(kind)}: weights for inference only, with no "
                              f"optimizer, schedule or random state, so no run can continue from "
                              f"it; resume from the run's own model.pt, or start a new --log_dir")
    if kind != "resumable checkpoint":
        raise CheckpointError(f"{path} is {a_kind(kind)}, not a checkpoint of train_cdsvae.py; "
                              f"resume from a run's model.pt")
    name = f"resumable checkpoint {path}"
    check_fields(ckpt, name, RESUMABLE_FIELDS, optional=("critic", "critic_optimizer"))
    if len(ckpt["rng_cpu"]) != ckpt["world_size"]:
        raise CheckpointError(f"{name} holds {len(ckpt['rng_cpu'])} random states for "
                              f"{ckpt['world_size']} processes: it is damaged; use another copy")
    return ckpt


def bad_constructor_args(cls, args):
    """'name=value (why)' for each of `args` that cls does not take, or whose type is not that of
    its default (a whole number 1..MAX_WIDTH, a boolean, a string)."""
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    bad = []
    for k, v in args.items():
        default = defaults.get(k, inspect.Parameter.empty)
        if default is inspect.Parameter.empty:
            why = f"not an argument of {cls.__name__}"
        elif isinstance(default, bool):
            why = None if type(v) is bool else "not a boolean"
        elif isinstance(default, int):
            why = None if _whole(v) and 1 <= v <= MAX_WIDTH else f"not whole in 1..{MAX_WIDTH}"
        else:
            why = None if isinstance(v, type(default)) else f"not a {type(default).__name__}"
        if why:
            bad.append(f"{k}={_short(v)} ({why})")
    return bad


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
    """A checkpoint of train_cdsvae.py, its export or snapshot ('model', 'model_args'), or the
    paper repo's; its weights checked to be a state_dict (names to tensors)."""
    ckpt = read_checkpoint(path, what="model checkpoint")
    kind = checkpoint_kind(ckpt, path)
    if kind == "the paper repo's checkpoint":
        check_fields(ckpt, f"{kind} {path}", {"model": STATE_DICT})
        return paper_model_checkpoint(ckpt["model"], path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is {a_kind(kind)}, not a checkpoint of train_cdsvae.py (no "
                              f"'model' / 'model_args') nor of the paper repo (no 'model' with "
                              f"its parameter names)")
    check_fields(ckpt, f"{kind} {path}", {"model": STATE_DICT, "model_args": ARGS_DICT})
    return ckpt


def saved_model_args(ckpt, path="the checkpoint"):
    """A checkpoint's model_args with CDSVAE's defaults added; one that needs a removed option,
    or that CDSVAE does not take (an unknown name, another type), is refused naming them."""
    args = dict(ckpt["model_args"])
    for k, off in REMOVED_MODEL_ARGS.items():
        if args.pop(k, off) != off:
            raise CheckpointError(f"{path} needs --{k}, which was removed after its experiment "
                                  f"lost; load it with the code of commit {REMOVED_AT}")
    bad = bad_constructor_args(CDSVAE, args)
    if bad:
        raise CheckpointError(f"{path} has model_args that no CDSVAE takes: {'; '.join(bad)}; "
                              f"the file is damaged or of other code")
    defaults = {k: p.default for k, p in inspect.signature(CDSVAE).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **args}


def mismatched_model_args(ckpt, asked, path="the checkpoint"):
    """{name: phrase} for each of `asked` (None: any) that differs from the checkpoint's."""
    saved = saved_model_args(ckpt, path)
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


def model_from_checkpoint(ckpt, path, device="cpu", **overrides):
    """The CDSVAE of a read_model_checkpoint in fp32, eval mode; refused if not of the sizes in
    `overrides`, or if its model_args do not build the network its weights are of."""
    name = f"{checkpoint_kind(ckpt, path)} {path}"
    mismatched = mismatched_model_args(ckpt, overrides, name)
    if mismatched:
        raise CheckpointError(f"{name} was trained with other sizes: "
                              f"{', '.join(mismatched.values())}")
    args = saved_model_args(ckpt, name)
    try:
        model = CDSVAE(**args)
    except (ValueError, TypeError) as e:  # a value CDSVAE refuses (z_input)
        raise CheckpointError(f"{name} has model_args that no CDSVAE takes: {e}") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    check_sizes(model, state, name)
    model.load_state_dict(state)
    return model.to(device).eval()


def load_model(path, device="cpu", **overrides):
    """The CDSVAE of a checkpoint in fp32, eval mode; refused if not of the sizes in `overrides`."""
    return model_from_checkpoint(read_model_checkpoint(path), path, device, **overrides)


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
    with its process. On release it is removed, with the folders it made, if empty. A stop signal
    waits while it is taken or released, so that none is left behind."""
    folder = os.path.dirname(os.path.abspath(lock))
    made, d = [], folder
    while not os.path.isdir(d):  # the folders the lock makes, deepest first
        made.append(d)
        d = os.path.dirname(d)
    fd = None
    try:
        with signals_deferred():
            fd = _take_lock(lock, folder, busy)
        yield
    finally:
        with signals_deferred():
            if fd is not None:
                os.remove(lock)  # while still held: one that opened this file opens the path again
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
            make_folder(folder)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SystemExit(f"error: {os_error_line(e, lock, 'write')}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            holder = f"process {pid}" if pid.isdigit() else "another process"
            raise SystemExit(f"error: {busy.format(holder=holder)}") from None
        if os.path.exists(lock) and os.path.samestat(os.fstat(fd), os.stat(lock)):
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError as e:  # a full disk: no lock file left behind
                os.remove(lock)
                os.close(fd)
                raise SystemExit(f"error: {os_error_line(e, lock, 'write')}") from None
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
