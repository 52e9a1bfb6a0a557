"""bench.py's figures, the device helpers of utils.py, and device_check.py's stages at tiny sizes.
Speeds are not asserted (they are benchmarks). TEST_DEVICE=cuda runs the device tests on a GPU
(device_check.py does)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import bench
from model import CDSVAE
import utils
from utils import (adam_fused, amp_dtype, compile_model, dtype_name, grad_scaler, load_adam_state,
                   make_adam, precision_note, prepare_for_device)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = torch.device(os.environ.get("TEST_DEVICE", "cpu"))
TINY = ["--device", DEVICE.type, "--nf", "4", "--batch_size", "4", "--steps", "2",
        "--threads", "1"]


def test_bench_prints_one_json_line_of_sane_figures(capsys):
    result = bench.main(TINY + ["--amp", "--f_mirror", "--weight_mi_critic", "10"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == result
    speeds = [result[k] for k in ("step_per_s", "loader_per_s", "end_to_end_per_s")]
    for value in speeds + [result[k] for k in ("matmul_peak_gflops", "conv_gflops_achieved",
                                                 "peak_mem_gb", "ms_per_step")]:
        assert math.isfinite(value) and value > 0
    assert abs(result["ms_per_step"] - 1000 * 4 / speeds[0]) <= 0.01 * result["ms_per_step"] + 0.05
    assert result["share_of_matmul_peak"] > 0
    assert isinstance(result["ops_per_step"], int) and result["ops_per_step"] > 100
    assert result["device"].startswith(DEVICE.type) and result["torch"] == torch.__version__
    precision = dtype_name(amp_dtype(DEVICE, "auto"))
    assert result["host_cpu"] and result["device_name"] and result["precision"] == precision
    assert result["matmul_dtype"] == {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[
        precision] and result["f_mirror"] and not result["compile"]


def test_a_tiny_share_of_a_fast_peak_is_kept_in_3_significant_digits():
    """Issue 26 item 1: a tiny bench on a GPU of 700 TFLOP/s reaches about 1e-4 of its peak."""
    peak = 7e14
    assert bench.share_of_peak(1.23456e-4 * peak, peak) == 1.23e-4
    assert bench.share_of_peak(3.3e-9 * peak, peak) == 3.3e-9 > 0
    assert bench.share_of_peak(0.62349 * peak, peak) == 0.623


def test_op_counter_counts_kernels_not_views_or_allocations():
    x = torch.randn(4, 6, requires_grad=True)
    with bench.OpCounter() as counter:
        y = (x.view(6, 4).t() + 1).sum()  # a view, a transpose (views), an add and a sum
        torch.empty(3)
    assert counter.counts == {"add": 1, "sum": 1}
    with bench.OpCounter() as counter:
        y.backward()  # backward's own kernels are counted too
    assert sum(counter.counts.values()) >= 2 and x.grad is not None


def test_the_prior_in_one_call_dispatches_fewer_ops_than_the_cell_loop():
    model = tiny_model()
    z = torch.randn(4, 8, 4, device=DEVICE, requires_grad=True)
    counts = []
    for one_call in (False, True):
        model.prior_one_call = one_call
        with bench.OpCounter() as counter:
            torch.stack(model.prior(z)).sum().backward()
        counts.append(sum(counter.counts.values()))
    assert counts[1] < counts[0] / 3, counts


def expected_conv_flops(nf, g_dim, in_dim, frames, encoder_passes):
    """The conv FLOPs of a training step per video, by hand: 2 x c_in x c_out x 16 per output
    pixel of a conv, per input pixel of a transposed conv; backward twice the forward."""
    enc = sum(2 * c_in * c_out * 16 * size ** 2 for c_in, c_out, size in (
        (3, nf, 32), (nf, 2 * nf, 16), (2 * nf, 4 * nf, 8), (4 * nf, 8 * nf, 4),
        (8 * nf, g_dim, 1)))
    dec = sum(2 * c_in * c_out * 16 * size ** 2 for c_in, c_out, size in (
        (in_dim, 8 * nf, 1), (8 * nf, 4 * nf, 4), (4 * nf, 2 * nf, 8), (2 * nf, nf, 16),
        (nf, 3, 32)))
    return 3 * frames * (encoder_passes * enc + dec)


@pytest.mark.parametrize("f_mirror", [False, True])
def test_conv_flops_are_counted_on_the_device_as_by_hand(f_mirror):
    model = prepare_for_device(CDSVAE(nf=4, f_mirror=f_mirror).to(DEVICE), DEVICE)
    counted = bench.conv_flops_per_video(model, DEVICE)
    assert counted == expected_conv_flops(4, 128, 32 + 256, 8, 3 if f_mirror else 2)
    assert model.training


def test_device_settings():
    model = prepare_for_device(CDSVAE(nf=4).to(DEVICE), DEVICE)
    assert model.encoder.net[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model.prior_one_call is (DEVICE.type == "cuda")  # the CPU keeps its order of sums
    adam = make_adam(model.parameters(), DEVICE, lr=1e-3)
    # fused on CUDA; on the CPU torch's default Adam, as training had it
    assert adam.defaults["fused"] is (True if DEVICE.type == "cuda" else None)
    if DEVICE.type == "cuda":
        assert torch.backends.cudnn.benchmark


def adam_after_a_step(fused):
    """An Adam (fused as asked) over one CPU parameter, after a step: its state_dict."""
    weight = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([weight], lr=1e-3, fused=fused)
    weight.grad = torch.full((3,), 0.5)
    adam.step()
    return adam.state_dict()


@pytest.mark.parametrize("saved_fused", [None, True])
def test_a_resumed_adam_is_fused_as_this_device_makes_it_not_as_the_checkpoint_says(saved_fused):
    """Issue 26 item 6: torch's load_state_dict keeps the saved groups' flag (a CPU run's None
    would drop fused Adam on a GPU); load_adam_state keeps make_adam's for this device."""
    state = adam_after_a_step(saved_fused)
    plain = make_adam([torch.nn.Parameter(torch.zeros(3, device=DEVICE))], DEVICE, lr=1e-3)
    plain.load_state_dict(state)
    assert plain.param_groups[0]["fused"] is saved_fused  # the trouble
    weight = torch.nn.Parameter(torch.zeros(3, device=DEVICE))
    here = make_adam([weight], DEVICE, lr=1e-3)
    load_adam_state(here, state)
    assert here.param_groups[0]["fused"] is adam_fused(DEVICE)
    # a device whose rule is fused (a GPU's; the CPU runs fused Adam too): the step count is put
    # where fused Adam keeps it, and a step runs
    weight = torch.nn.Parameter(torch.zeros(3, device=DEVICE))
    fused = torch.optim.Adam([weight], lr=1e-3, fused=True)
    load_adam_state(fused, state)
    step = fused.state[weight]["step"]
    assert fused.param_groups[0]["fused"] is True and step.device == weight.device
    assert step.dtype == torch.float32 and step.item() == 1
    weight.grad = torch.ones(3, device=DEVICE)
    fused.step()
    assert fused.state[weight]["step"].item() == 2 and (weight < 0).all()


def tiny_model():
    torch.manual_seed(0)
    return CDSVAE(f_dim=8, z_dim=4, g_dim=8, rnn_size=8, nf=2).to(DEVICE)


def test_compiled_encoder_trains_as_the_eager_one_and_the_state_dict_keeps_its_keys():
    # the encoder only: compiling its forward and backward takes ~30 s on a 2-core CPU, the
    # decoder's as long again; compile_model wraps both alike
    eager, compiled = tiny_model(), compile_model(tiny_model())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert compiled.decoder._compiled_call_impl is not None  # nn.Module.compile's wrapper
    assert eager.decoder._compiled_call_impl is None
    x = torch.rand(3, 8, 3, 64, 64, device=DEVICE)
    g = [model.encoder(x) for model in (eager, compiled)]
    torch.testing.assert_close(g[1], g[0], rtol=1e-4, atol=1e-5)
    for features in g:
        features.square().sum().backward()
    torch.testing.assert_close(compiled.encoder.net[0][0].weight.grad,
                               eager.encoder.net[0][0].weight.grad, rtol=1e-3, atol=1e-5)


def run(script, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, words", [(["--batch_size", "1"], "--batch_size"),
                                         (["--weight_mi_critic", "nan"], "--weight_mi_critic"),
                                         (["--device", "tpu"], "--device"),
                                         (["--device", "cpu", "--compile_mode", "reduce-overhead"],
                                          "CUDA graphs")])
def test_bad_bench_flags_are_one_line(args, words):
    r = run("bench.py", *args)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and words in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_bench_on_cuda_without_a_gpu_is_one_line():
    r = run("bench.py", "--device", "cuda")
    assert r.returncode != 0 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


# every stage of the device check, by the name its summary gives it
STAGES = {"data", "bench_eager", "bench_compiled", "bench_graphed", "train_paper",
          "train_cpu_recipe", "score_paper", "score_cpu_recipe", "tests", "fp16", "lstm_dtype",
          "sync_audit", "cpu_vs_device", "resume", "pinned_fallback", "compile_train",
          "judge_train", "ddp"}
# what a CPU cannot run, said in the summary
CPU_SKIPS = {"bench_graphed": "CUDA graphs", "tests": "the tests run this script",
             "sync_audit": "GPU", "cpu_vs_device": "no device but the CPU",
             "pinned_fallback": "host memory", "ddp": "2 processes need 2"}


# about 95 s of CPU on a 2-core host (about 20 processes, ~5 s each to start): in a group of its
# own, one worker runs it while the other runs the rest of the suite
@pytest.mark.xdist_group("device_check")
def test_device_check_tiny_runs_every_stage_a_cpu_can_and_says_why_it_skips_the_rest(tiny_data,
                                                                                     tmp_path):
    """Issue 26: every stage is named with its status; no limit on the clock (limit_s null), so
    a busy CPU cannot fail it; the CPU's resume is exact."""
    folder, out = tmp_path / "check", tmp_path / "out"
    out.mkdir()
    r = run("device_check.py", "--tiny", "--folder", str(folder),
            env={"DATA": tiny_data, "OUT": str(out)})
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((out / "device_check.json").read_text())
    assert summary == json.loads((folder / "device_check.json").read_text())
    assert summary["ok"] and json.loads(r.stdout.strip().splitlines()[-1]) == summary
    stages = summary["stages"]
    assert set(stages) == STAGES
    for name, stage in stages.items():
        if name in CPU_SKIPS:
            assert stage["status"].startswith("skipped: ") and CPU_SKIPS[name] in stage["status"]
        elif name != "data":  # DATA exists: the data stage is skipped, saying so
            assert stage["status"] == "passed" and stage["limit_s"] is None, (name, stage)
            assert stage["seconds"] > 0 and stage["estimate_s"] > 0 and os.path.isfile(stage["log"])
    assert stages["bench_compiled"]["figures"]["compile"]
    assert stages["bench_eager"]["figures"]["ops_per_step"] > 0
    for recipe in ("paper", "cpu_recipe"):
        assert stages[f"train_{recipe}"]["last_epoch"]["epoch"] == 1
        assert stages[f"train_{recipe}"]["last_epoch"]["overhead_s"] >= 0
        assert (folder / recipe / "model.pt").is_file()
        figures = stages[f"score_{recipe}"]["figures"]
        assert set(figures) >= {"sprite_judge", "clip_judge", "recon_mse_per_pixel"}
        assert 0 <= figures["sprite_judge"]["A_action_acc"] <= 1
    assert stages["fp16"]["scaler"]["scale"] > 0 and stages["fp16"]["step"] == 4
    resume = stages["resume"]["figures"]
    assert resume["weights_rel_l2"] == 0 and resume["stopped"].startswith("stopped by SIGTERM")
    assert "float16" not in stages["lstm_dtype"]["figures"]["recurrent_dtypes"].values()
    assert stages["compile_train"]["last_epoch"]["epoch"] == 1
    assert stages["compile_train"]["judge_scores"] > 0  # its periodic scoring ran


def test_device_check_refuses_bad_epochs_in_one_line(tmp_path):
    r = run("device_check.py", "--folder", str(tmp_path), env={"EPOCHS_PAPER": "-3"})
    assert r.returncode == 2 and r.stderr.startswith("error: EPOCHS_PAPER")
    assert r.stderr.count("\n") == 1 and not os.listdir(tmp_path)


def test_amp_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    """--amp picks fp16 (with loss scaling) on a GPU whose bf16 is emulated (V100, T4)."""
    asked = []

    def bf16(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # emulated bf16 only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16)
    assert amp_dtype(torch.device("cuda")) == torch.float16 and asked == [False]
    assert "no native bf16" in precision_note(torch.device("cuda"), "auto")


@pytest.mark.parametrize("ratio, auto", [(0.6, torch.bfloat16), (1.9, torch.bfloat16),
                                         (3.3, None), (15.0, None), (190.0, None)])
def test_amp_on_a_cpu_is_bf16_only_where_it_is_native(monkeypatch, ratio, auto):
    """A CPU whose bf16 convolution runs `ratio` times as long as fp32: AVX-512 BF16 and AMX about
    as fast or faster, AVX2 3-20x slower (emulated). auto follows; a forced dtype is kept."""
    monkeypatch.setattr(utils, "cpu_bf16_ratio", lambda: ratio)
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, "auto") == auto and amp_dtype(cpu, True) == auto
    assert amp_dtype(cpu, "off") is None and amp_dtype(cpu, False) is None
    assert amp_dtype(cpu, "bf16") == torch.bfloat16 and amp_dtype(cpu, "fp16") == torch.float16
    with utils.autocast(cpu, "auto"):
        y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    assert y.dtype == (auto or torch.float32)
    assert not grad_scaler(cpu, "auto").is_enabled() and grad_scaler(cpu, "fp16").is_enabled()
    note = precision_note(cpu, "auto")
    assert note.startswith(f"precision: {dtype_name(auto)} ") and f"{ratio:.1f}x" in note
    assert ("emulated" in note) == (auto is None)


def test_the_bf16_probe_measures_this_cpu_and_leaves_the_random_state_alone():
    """The probe times real convolutions: a positive ratio, the same within one process; a run's
    random numbers are the same whether or not it ran (so --amp keeps runs bit for bit)."""
    utils.cpu_bf16_ratio.cache_clear()
    state = torch.get_rng_state()
    ratio = utils.cpu_bf16_ratio()
    assert torch.equal(torch.get_rng_state(), state)
    assert math.isfinite(ratio) and ratio > 0 and utils.cpu_bf16_ratio() == ratio
