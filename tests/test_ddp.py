"""k processes at global batch B optimise what one process does at batch B; resumes that would change the run
are refused; the validation loss is logged."""
import json
import os
import subprocess
import sys

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_cdsvae
from dataloader import load_sprites
from model import FZCritic, cdsvae_loss

# the tests that start process groups run one at a time (one xdist worker): ports are not shared
pytestmark = pytest.mark.xdist_group("ddp")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, N = 6, 3, 100  # global batch, frames, dataset size
KEYS = ("f", "f_mean", "f_logvar", "z", "z_mean", "z_logvar", "z_prior_mean", "z_prior_logvar", "recon")
TINY = ["--f_dim", "8", "--z_dim", "4", "--g_dim", "16", "--rnn_size", "16", "--nf", "8", "--batch_size", "6",
        "--device", "cpu", "--evl_interval", "0", "--threads", "1"]


def batch_tensors():
    """The outputs of a forward pass over B videos (small frames: the loss does not care), as leaves."""
    g = torch.Generator().manual_seed(0)
    out = {k: torch.randn(B, 5, generator=g) for k in ("f", "f_mean", "f_logvar")}
    out.update({k: torch.randn(B, T, 4, generator=g) for k in ("z", "z_mean", "z_logvar", "z_prior_mean",
                                                                "z_prior_logvar")})
    out["recon"] = torch.rand(B, T, 3, 4, 4, generator=g)
    views = {"c_post": {"f_mean": torch.randn(B, 5, generator=g)},
             "m_post": {"z_mean": torch.randn(B, T, 4, generator=g)}}
    return out, views, torch.rand(B, T, 3, 4, 4, generator=g)


def loss_and_grads(out, views, x, rows, gather):
    leaves = {k: out[k][rows].clone().requires_grad_() for k in KEYS}
    view_leaves = {v: {k: t[rows].clone().requires_grad_() for k, t in d.items()} for v, d in views.items()}
    torch.manual_seed(0)  # the same critic in every process
    total, terms = cdsvae_loss({**leaves, **view_leaves}, x[rows], N, weight_mi=2.0, gather=gather,
                               critic=FZCritic(5, 4, T, hidden=8), weight_critic=4.0)
    total.backward()
    grads = {k: t.grad for k, t in leaves.items()}
    grads.update({f"{v}.{k}": t.grad for v, d in view_leaves.items() for k, t in d.items()})
    return {k: v.detach() for k, v in terms.items()}, grads


def _rank(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out, views, x = batch_tensors()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    terms, grads = loss_and_grads(out, views, x, rows, train_cdsvae.gather_rows)
    torch.save({"terms": terms, "grads": grads}, os.path.join(result_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_compute_the_loss_and_gradients_of_one(tmp_path):
    world = 2
    mp.spawn(_rank, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    out, views, x = batch_tensors()
    one_terms, one_grads = loss_and_grads(out, views, x, slice(None), None)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(world)]
    for k in ("mi_fz", "con_f", "con_z", "mi_critic"):  # batch-wide terms: every process has the whole batch's
        for r in ranks:
            torch.testing.assert_close(r["terms"][k], one_terms[k])
    for k in ("recon", "kld_f", "kld_z", "loss"):  # per-video terms: local means, whose mean is the whole batch's
        torch.testing.assert_close(sum(r["terms"][k] for r in ranks) / world, one_terms[k])
    # DDP averages the processes' gradients: each process's gradient of its rows, / world, is one process's
    for k, g in one_grads.items():
        torch.testing.assert_close(torch.cat([r["grads"][k] for r in ranks]) / world, g, rtol=1e-5, atol=1e-7)
    # without the gathering, the two processes would optimise another objective (half the negatives)
    half_terms, _ = loss_and_grads(out, views, x, slice(0, B // world), None)
    assert not torch.allclose(half_terms["con_f"], one_terms["con_f"])


@pytest.mark.parametrize("change, word", [(["--batch_size", "4"], "--batch_size 4"),
                                          (["--sche", "cosine_to_zero"], "--sche cosine_to_zero")])
def test_resume_refuses_another_batch_size_or_schedule(tiny_data, tmp_path, change, word, capsys):
    common = TINY + ["--data_root", tiny_data, "--log_dir", str(tmp_path), "--nEpoch", "2"]
    train_cdsvae.main(common + ["--max_steps", "1"])
    with pytest.raises(SystemExit) as e:
        train_cdsvae.main(common + change + ["--resume"])
    assert str(e.value).startswith("error: cannot resume") and word in str(e.value) and "\n" not in str(e.value)


def test_resume_refuses_another_schedule_length_but_not_a_longer_constant_run(tiny_data, tmp_path):
    common = TINY + ["--data_root", tiny_data, "--max_steps", "1"]
    train_cdsvae.main(common + ["--log_dir", str(tmp_path / "a"), "--nEpoch", "2", "--sche", "cosine"])
    with pytest.raises(SystemExit, match=r"a schedule over 3 epochs \(checkpoint: 2;"):
        train_cdsvae.main(common + ["--log_dir", str(tmp_path / "a"), "--nEpoch", "3", "--sche", "cosine", "--resume"])
    train_cdsvae.main(common + ["--log_dir", str(tmp_path / "b"), "--nEpoch", "2"])
    train_cdsvae.main(common + ["--log_dir", str(tmp_path / "b"), "--nEpoch", "3", "--resume", "--max_steps", "2"])


def test_a_run_stopped_along_a_longer_schedule_is_that_schedule_s_first_epochs(tiny_data, tmp_path):
    common = TINY + ["--data_root", tiny_data, "--subset", "24", "--sche", "cosine_to_zero"]
    train_cdsvae.main(common + ["--log_dir", str(tmp_path / "full"), "--nEpoch", "3"])
    train_cdsvae.main(common + ["--log_dir", str(tmp_path / "part"), "--nEpoch", "2", "--sche_epochs", "3"])
    rows = {k: [{m: v for m, v in json.loads(line).items() if m not in ("seconds", "overhead_s")}
                for line in open(tmp_path / k / "metrics.jsonl")] for k in ("full", "part")}
    assert len(rows["part"]) == 2 and rows["part"] == rows["full"][:2]
    assert rows["part"][-1]["lr"] > 0  # stopped before the cosine's end
    # it continues along the same schedule: epoch 3 of 3 is the full run's
    train_cdsvae.main(common + ["--log_dir", str(tmp_path / "part"), "--nEpoch", "3", "--sche_epochs", "3",
                                "--resume"])
    last = json.loads(open(tmp_path / "part" / "metrics.jsonl").read().splitlines()[-1])
    assert {m: v for m, v in last.items() if m not in ("seconds", "overhead_s")} == rows["full"][2]


def test_another_schedule_process_count_or_a_removed_option_is_refused(tiny_data, tmp_path):
    common = TINY + ["--data_root", tiny_data, "--log_dir", str(tmp_path), "--nEpoch", "2", "--max_steps", "1"]
    train_cdsvae.main(common + ["--sche", "cosine_to_zero"])
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    get_args = train_cdsvae.get_args
    assert train_cdsvae.resume_mismatch(ckpt, get_args(common + ["--sche", "cosine_to_zero"]), 1) is None
    assert "--sche cosine " in train_cdsvae.resume_mismatch(ckpt, get_args(common + ["--sche", "cosine"]), 1)
    assert "2 process(es) (checkpoint: 1)" in train_cdsvae.resume_mismatch(ckpt, get_args(common), 2)
    # a run of a removed option (at its off value, the key is accepted) names the commit that had it
    for k, v in (("weight_swap", 0.0), ("recon_m_aug", False)):
        assert train_cdsvae.resume_mismatch({**ckpt, "args": {**ckpt["args"], k: v}},
                                            get_args(common + ["--sche", "cosine_to_zero"]), 1) is None
    swapped = {**ckpt, "args": {**ckpt["args"], "weight_swap": 1.0}}
    said = train_cdsvae.resume_mismatch(swapped, get_args(common + ["--sche", "cosine_to_zero"]), 1)
    assert "--weight_swap 1.0" in said and "commit 7544b94" in said


def test_validation_terms_are_logged_each_epoch_and_leave_training_as_it_was(tiny_data, tmp_path):
    common = TINY + ["--data_root", tiny_data, "--nEpoch", "1"]
    with_val = train_cdsvae.main(common + ["--val_chars", "1", "--log_dir", str(tmp_path / "a")])
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert {"val_recon", "val_kld_f", "val_kld_z", "val_mi_fz", "val_con_f", "val_con_z", "val_loss"} <= set(rows[0])
    assert all(v > 0 for k, v in rows[0].items() if k in ("val_recon", "val_kld_z", "val_con_f"))
    assert rows[0]["val_loss"] != rows[0]["loss"]
    # the validation pass draws no number from the training run's random stream
    torch.manual_seed(0)
    state = torch.get_rng_state()
    loader = train_cdsvae.SpriteBatches(*load_sprites(tiny_data)["test"], 4, augment=True,
                                        content_view=False)
    run = SimpleNamespace(args=train_cdsvae.get_args(common), raw_model=with_val, val_loader=loader,
                          n_train=100, device=torch.device("cpu"), step=0, critic=None)
    terms = train_cdsvae.validation_terms(run)
    assert torch.equal(torch.get_rng_state(), state) and with_val.training
    assert terms == train_cdsvae.validation_terms(run)


@pytest.mark.parametrize("trouble, code, said", [("nan", 1, "non-finite loss at epoch 1, step 1"),
                                                 ("sigterm", 143, "stopped by SIGTERM in epoch 1 after batch 2/9, step 2")])
def test_trouble_seen_by_one_rank_stops_both_together(tiny_data, tmp_path, trouble, code, said):
    """Rank 1 alone gets a non-finite loss (the second step is not taken), or a SIGTERM (the second step is
    finished and saved) at its second step: both ranks stop there, no hang."""
    script = tmp_path / "one_rank.py"
    script.write_text(f"""
import os, signal, sys
sys.path.insert(0, {ROOT!r})
import train_cdsvae
loss, calls = train_cdsvae.cdsvae_loss, []
def troubled(*a, **k):
    total, terms = loss(*a, **k)
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        if {trouble!r} == "nan":
            terms["recon"] = terms["recon"] * float("nan")
        else:
            os.kill(os.getpid(), signal.SIGTERM)
    return total, terms
train_cdsvae.cdsvae_loss = troubled
train_cdsvae.main(sys.argv[1:])
""")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523",
                        str(script), *TINY, "--data_root", tiny_data, "--nEpoch", "2", "--log_dir", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert f"exitcode  : {code}" in r.stderr, r.stderr[-2000:]
    log = open(tmp_path / "run" / "log.txt").read()
    assert said in log, log
    assert (trouble == "sigterm") == os.path.exists(tmp_path / "run" / "model.pt")


def test_sync_bn_on_cpus_is_refused_in_one_line_before_anything_starts(tiny_data, tmp_path):
    """Issue 26 item 7: SyncBatchNorm has no CPU kernel; under torchrun the first process says so
    in one line, before any folder, process group or data, and every process exits 2."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train_cdsvae.py", *TINY, "--sync_bn", "--data_root", tiny_data,
                        "--log_dir", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    said = [line for line in r.stderr.splitlines() if "--sync_bn" in line]
    assert r.returncode != 0 and said == [said[0]] and said[0].startswith("error: --sync_bn"), r.stderr
    assert "ValueError" not in r.stderr and not (tmp_path / "run").exists()
    assert "exitcode  : 2" in r.stderr


def test_sync_bn_on_a_cpu_is_refused_in_one_line_in_one_process_too(capsys):
    with pytest.raises(SystemExit) as stop:
        train_cdsvae.get_args(TINY + ["--sync_bn"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: --sync_bn") and err.count("\n") == 1
