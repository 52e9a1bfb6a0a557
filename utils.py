"""What the training, evaluation and figure scripts share: devices, checkpoints, model loading."""
import inspect
import os
import pickle
import subprocess
import warnings

import torch

from model import CDSVAE

MODEL_ARGS = ("f_dim", "z_dim", "g_dim", "rnn_size", "nf", "frames", "z_input", "f_mirror", "f_film")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of other sizes than asked for."""


def pick_device(name="auto"):
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def git_revision():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, then rename: a crash never leaves half a checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True) with one-line errors for a missing or unreadable file, and for one holding
    more than tensors, numbers and plain containers (a pickle that could run code), refused before any of it runs."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns over several lines about the pickle protocol of a plain pickle
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only refuses to build; its message advises weights_only=False
        named = [f" ({line.strip()[:200]})" for line in str(e).splitlines() if "GLOBAL" in line]
        raise CheckpointError(f"refusing to load {path}: it holds more than tensors, numbers and plain containers, "
                              f"and such a pickle could run code{(named or [''])[0]}") from None
    except Exception as e:  # torch raises many types for a bad file; all mean the same to the user
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {first[:200]})") from None


def read_model_checkpoint(path):
    """A checkpoint of train_cdsvae.py (or its exported copy): a dict with 'model' and 'model_args'."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of train_cdsvae.py (no 'model' / 'model_args')")
    return ckpt


def saved_model_args(ckpt):
    """A checkpoint's model_args, with CDSVAE's defaults for the arguments added after it was written."""
    defaults = {k: p.default for k, p in inspect.signature(CDSVAE).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **ckpt["model_args"]}


def mismatched_model_args(ckpt, asked):
    """{name: 'name=asked asked for but saved in the checkpoint'} for each of `asked` (None: any) that differs."""
    saved = saved_model_args(ckpt)
    return {k: f"{k}={v} asked for but {saved.get(k)} in the checkpoint"
            for k, v in asked.items() if v is not None and saved.get(k) != v}


def check_sizes(model, state_dict, path):
    """Name every parameter whose shape differs between the checkpoint and the model asked for."""
    own = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} in the checkpoint vs {tuple(own[k].shape)} asked for"
           for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state_dict]
    if bad or missing:
        raise CheckpointError(f"{path} was trained with other sizes: {'; '.join(bad[:4]) or ''}"
                              f"{' missing ' + ', '.join(missing[:4]) if missing else ''}")


def load_model(path, device="cpu", **overrides):
    """The CDSVAE of a checkpoint of train_cdsvae.py, in fp32, in eval mode.

    `overrides` (f_dim=..., z_dim=...) are sizes the caller asks for; a checkpoint of other sizes is refused
    with a message naming them."""
    ckpt = read_model_checkpoint(path)
    mismatched = mismatched_model_args(ckpt, overrides)
    if mismatched:
        raise CheckpointError(f"{path} was trained with other sizes: {', '.join(mismatched.values())}")
    model = CDSVAE(**saved_model_args(ckpt))
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    check_sizes(model, state, path)
    model.load_state_dict(state)
    return model.to(device).eval()
