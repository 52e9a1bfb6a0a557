"""The DSVAE baseline: its posterior, its training (no views, no InfoNCE, no MI weight), its recipe script, and the
same evaluation on its checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

import train_cdsvae
from dataloader import load_sprites
from evaluation import evaluate
from judges.networks import SpriteJudge
from model import CDSVAE
from utils import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = dict(f_dim=8, z_dim=4, g_dim=16, rnn_size=16, nf=8)
TINY = ["--f_dim", "8", "--z_dim", "4", "--g_dim", "16", "--rnn_size", "16", "--nf", "8", "--batch_size", "6",
        "--device", "cpu", "--evl_interval", "0", "--threads", "1"]


def test_full_posterior_of_z_reads_f():
    """q(z_t | x, f): another sample of f gives another z; the paper's q(z|x) does not see f."""
    x = torch.rand(2, 8, 3, 64, 64)
    for z_input, sees_f in (("full", True), ("bilstm", False)):
        torch.manual_seed(0)
        model = CDSVAE(**SIZES, z_input=z_input).eval()
        with torch.no_grad():
            first, second = model.encode(x), model.encode(x)
        assert not torch.equal(first["f"], second["f"])
        assert torch.equal(first["z_mean"], second["z_mean"]) != sees_f, z_input


def test_dsvae_trains_without_views_or_contrastive_terms(tiny_data, tmp_path, monkeypatch):
    seen = []
    forward = CDSVAE.forward

    def recording(self, x, **views):
        seen.append({k for k, v in views.items() if v is not None and v is not False})
        return forward(self, x, **views)
    monkeypatch.setattr(CDSVAE, "forward", recording)
    model = train_cdsvae.main(TINY + ["--data_root", tiny_data, "--nEpoch", "1", "--model", "dsvae", "--z_input", "full",
                                      "--log_dir", str(tmp_path)])
    assert seen and all(not s for s in seen)  # x alone: no augmented view made or encoded
    row = json.loads(open(tmp_path / "metrics.jsonl").readline())
    assert "con_f" not in row and "con_z" not in row
    assert abs(row["loss"] - (row["recon"] + row["kld_f"] + row["kld_z"])) < 1e-3 * row["loss"]  # MI weighs 0
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ckpt["args"]["model"] == "dsvae" and ckpt["model_args"]["z_input"] == "full"
    # the same evaluation on its checkpoint
    loaded = load_model(str(tmp_path / "model.pt"))
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b.float())
    X, A, D = load_sprites(tiny_data)["test"]
    judges = {"j": SpriteJudge(g_dim=16, rnn_size=16, hidden=16, nf=8).eval()}
    result = evaluate(loaded, judges, (X[:6], A[:6], D[:6]), torch.device("cpu"), sampled_b=True)
    assert {"A_action_acc", "B_attr_mean_acc", "Bs_attr_mean_acc", "swap_action_acc"} <= set(result["judges"]["j"]["mean"])


def test_dsvae_refuses_the_cdsvae_only_flags_and_a_cdsvae_checkpoint(tiny_data, tmp_path):
    for flag in (["--weight_mi_after", "1", "1"], ["--weight_mi_critic", "1"]):
        r = subprocess.run([sys.executable, "train_cdsvae.py", "--model", "dsvae", *flag], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 2 and "--model dsvae" in r.stderr and r.stderr.strip().count("\n") == 0
    common = TINY + ["--data_root", tiny_data, "--nEpoch", "2", "--log_dir", str(tmp_path), "--max_steps", "1"]
    train_cdsvae.main(common)
    assert "--model dsvae" in train_cdsvae.resume_mismatch(torch.load(tmp_path / "model.pt", weights_only=True),
                                                           train_cdsvae.get_args(common + ["--model", "dsvae"]), 1)


def test_run_dsvae_script_trains_the_baseline(tiny_data, tmp_path):
    r = subprocess.run(["bash", os.path.join(ROOT, "run_dsvae.sh"), *TINY, "--nEpoch", "1", "--max_steps", "2"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1", DATA=tiny_data, LOG_DIR=str(tmp_path)))
    assert r.returncode == 0, r.stderr[-2000:]
    args = torch.load(tmp_path / "model.pt", weights_only=True)["args"]
    assert (args["model"], args["z_input"], args["amp"], args["sche"]) == ("dsvae", "full", "auto", "cosine_to_zero")


SPRITE_JUDGES, DIGIT_JUDGES = {"sprite_judge", "clip_judge"}, {"smmnist_lstm_judge", "smmnist_clip_judge"}


@pytest.mark.parametrize("name, z_input, judges", [
    ("cdsvae_sprites_cpu", "frame_delta", SPRITE_JUDGES), ("dsvae_sprites_cpu", "full", SPRITE_JUDGES),
    ("cdsvae_smmnist_cpu", "frame_delta", DIGIT_JUDGES), ("dsvae_smmnist_cpu", "full", DIGIT_JUDGES)])
def test_shipped_checkpoints_load_fit_25_mb_and_name_the_file_scored(name, z_input, judges):
    """Each shipped checkpoint is half precision, at most 25 MB, loads as the network its recipe trains, and its
    results file scored a network of the same sizes and options, 5 runs on the whole test split under both judges."""
    path = os.path.join(ROOT, "checkpoints", f"{name}.pt")
    assert os.path.getsize(path) <= 25 * 2 ** 20
    ckpt = torch.load(path, weights_only=True)
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    model = load_model(path)
    assert model.z_input == z_input and not model.training
    results = json.load(open(os.path.join(ROOT, "checkpoints", f"{name}.results.json")))
    assert results["model_args"] == ckpt["model_args"]
    assert results["niter"] == 5 and results["n_test"] == 2664 and set(results["judges"]) == judges
    for judge, scored in results["judge_files"].items():  # scored by the judge shipped today
        shipped = torch.load(os.path.join(ROOT, scored["path"]), weights_only=True)
        assert (scored["path"], scored["test_accuracy"]) == (f"judges/{judge}.pt", shipped["test_accuracy"])
