"""What the training, evaluation and figure scripts share: devices, checkpoints, model loading."""
import inspect
import os
import re
import subprocess
import warnings

import torch

from model import CDSVAE

MODEL_ARGS = ("f_dim", "z_dim", "g_dim", "rnn_size", "nf", "frames", "z_input", "f_mirror", "f_film", "f_head_leaky",
              "deconv_normal")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or of other sizes than asked for."""


def pick_device(name="auto"):
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def amp_dtype(device):
    """The autocast dtype that fits the device: bf16 on the CPU and on CUDA GPUs that support it, else fp16."""
    return torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16


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
    """torch.load(weights_only=True) with one-line errors for a missing or unreadable file.

    torch's own message is not passed on: it advises weights_only=False, which would run the code such a file holds."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # a plain pickle draws a multi-line warning on its protocol before the refusal
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a bad file; all mean the same to the user
        other = re.search(r"GLOBAL ([\w.]+)", str(e))
        if other and other[1].rsplit(".", 1)[-1][:1].isupper() and not other[1].startswith("numpy"):
            why = (f"it pickles a whole object of class {other[1]} (as the paper repo's older 'ds_vae' checkpoints "
                   f"pickle the whole network), and unpickling it would run that class's code; save its state_dict() "
                   f"as {{'model': ...}} with the code that made it, and load that")
        else:
            why = (f"it holds {other[1]}, not only tensors and plain containers" if other else
                   "it is not a complete torch.save file (empty, truncated or another kind of file)")
        raise CheckpointError(f"{path} is not a PyTorch checkpoint that can be loaded safely: {why}") from None


def paper_encoder_names(state):
    """The paper repo's frame encoder names -> ours (FrameEncoder.net): its blocks c1..c4 ('main': conv 0, BN 1)
    are our net.0..3, and its c5 (conv 0, BN 1) our net.4 and net.5."""
    out = {}
    for k, v in state.items():
        block, last = re.fullmatch(r"encoder\.c([1-4])\.main\.(.+)", k), re.fullmatch(r"encoder\.c5\.(\d)\.(.+)", k)
        if block:
            k = f"encoder.net.{int(block[1]) - 1}.{block[2]}"
        elif last:
            k = f"encoder.net.{4 + int(last[1])}.{last[2]}"
        out[k] = v
    return out


def paper_model_checkpoint(state, path):
    """The paper repo's CDSVAE state_dict (its sample checkpoint's 'model') as a checkpoint of ours: its names
    mapped onto our networks, its sizes read from its shapes, its network (f heads with LeakyReLU)."""
    renamed = {}
    for k, v in paper_encoder_names(state).items():
        m = re.fullmatch(r"decoder\.upc([1-5])\.(?:main\.)?(\d)\.(.+)", k)
        if m:  # upc1 is a plain Sequential (conv 0, BN 1), upc2..4 are 'main' blocks, upc5's conv is 0
            k = {"1": f"decoder.net.{m[2]}.{m[3]}", "5": f"decoder.net.6.{m[3]}"}.get(
                m[1], f"decoder.net.{int(m[1]) + 1}.{m[2]}.{m[3]}")
        k = re.sub(r"^z_prior_lstm_ly([12])\.", r"z_prior_lstm_\1.", k)
        renamed[re.sub(r"^f_(mean|logvar)\.model\.0\.", r"f_\1.0.", k)] = v
    try:
        model_args = dict(f_dim=state["f_mean.model.0.weight"].shape[0], z_dim=state["z_mean.weight"].shape[0],
                          g_dim=state["z_lstm.weight_ih_l0"].shape[1], rnn_size=state["z_lstm.weight_hh_l0"].shape[1],
                          nf=state["encoder.c1.main.0.weight"].shape[0], frames=8, f_head_leaky=True,
                          deconv_normal=False)
    except KeyError as e:
        raise CheckpointError(f"{path} looks like the paper repo's checkpoint but has no {e}") from None
    return {"model": renamed, "model_args": model_args, "source": "the paper repo's checkpoint"}


def read_model_checkpoint(path):
    """A checkpoint of train_cdsvae.py (or its exported copy): a dict with 'model' and 'model_args'; or the paper
    repo's (a dict with 'model', the state_dict of its CDSVAE), mapped onto ours."""
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and "encoder.c1.main.0.weight" in ckpt["model"]:
        return paper_model_checkpoint(ckpt["model"], path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of train_cdsvae.py (no 'model' / 'model_args') "
                              f"nor of the paper repo (no 'model' with its parameter names)")
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
    unknown = [k for k in state if k not in model.state_dict()]
    if unknown:
        raise CheckpointError(f"{path} has parameters this network does not: {', '.join(unknown[:4])}")
    model.load_state_dict(state)
    return model.to(device).eval()
