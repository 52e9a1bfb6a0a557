"""The judge's label map, the metric functions of test_sprite.py against hand-computed values, and both
protocols plus the swaps end to end on a tiny checkpoint, a tiny judge and a tiny real-looking data set."""
import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluation as ev
import make_sprites
import stubs
import test_sprite as ts
from dataloader import (ACTIONS, ATTRIBUTES, DIRECTIONS, FACTORS, character_attributes, character_id,
                        factor_labels, load_sprites, to_float)
from judges.networks import SpriteJudge, load_judge
from model import CDSVAE
from utils import amp_dtype, dtype_name, for_inference, load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = dict(f_dim=8, z_dim=4, g_dim=16, rnn_size=16, nf=8)
TINY_JUDGE = dict(g_dim=16, rnn_size=16, hidden=16, nf=8)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def files(tiny_data, tmp_path_factory):
    """A tiny train_cdsvae.py checkpoint (whose outputs differ from input to input) and a tiny judge file in the
    format of train_judge.py."""
    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    m = stubs.spread_init(CDSVAE(**TINY_MODEL))
    model_path = str(d / "model.pt")
    torch.save({"model": m.state_dict(), "model_args": dict(TINY_MODEL, frames=8, z_input="bilstm")}, model_path)
    j = SpriteJudge(**TINY_JUDGE)
    judge_path = str(d / "judge.pt")
    torch.save({"model": {k: v.half() if v.is_floating_point() else v for k, v in j.state_dict().items()},
                "judge_args": TINY_JUDGE, "heads": dict(FACTORS), "test_accuracy": None}, judge_path)
    return {"model": model_path, "judge": judge_path, "data": tiny_data, "dir": d}


# ---- the label map ----------------------------------------------------------------------------------------
def test_judge_heads_match_the_data_labels(tiny_data):
    assert list(FACTORS) == ["action", "skin", "pant", "top", "hair"]
    # action = D = 3 * action + direction over the 9 motions; skin, pant, top, hair = A's columns, 6 values each,
    # the layers body, bottomwear, topwear, hair in that order
    assert FACTORS["action"] == len(make_sprites.MOTIONS) == len(make_sprites.ACTIONS) * len(make_sprites.DIRECTIONS)
    assert make_sprites.LAYERS == ("body", "bottomwear", "topwear", "hair")
    assert all(FACTORS[a] == 6 for a in ATTRIBUTES)
    assert tuple(int(v) for v in character_attributes(character_id(torch.tensor([1, 2, 3, 4])))) == (1, 2, 3, 4)
    _, A, D = load_sprites(tiny_data)["test"]
    assert sorted(D.unique().tolist()) == list(range(FACTORS["action"]))
    assert int(A.max()) < 6 and int(A.min()) >= 0
    targets = factor_labels(A, D)  # the one label map, of the judges and their trainer alike
    assert list(targets) == list(FACTORS)
    assert torch.equal(targets["action"], D)
    for i, a in enumerate(ATTRIBUTES):
        assert torch.equal(targets[a], A[:, i])
    # logits of the judge have the sizes of the heads
    out = SpriteJudge(**TINY_JUDGE).eval()(torch.rand(2, 8, 3, 64, 64))
    assert {k: v.shape for k, v in out.items()} == {k: (2, n) for k, n in FACTORS.items()}


# ---- metrics ----------------------------------------------------------------------------------------------
def test_inception_score_and_entropies_by_hand():
    K = 9
    uniform = torch.full((36, K), 1 / K)
    assert ev.inception_score(uniform) == pytest.approx(1.0)
    assert ev.conditional_entropy(uniform) == pytest.approx(math.log(K))
    assert ev.marginal_entropy(uniform) == pytest.approx(math.log(K))
    onehot = torch.eye(K).repeat(4, 1)  # balanced, confident
    assert ev.inception_score(onehot) == pytest.approx(K)
    assert ev.conditional_entropy(onehot) == pytest.approx(0.0)
    assert ev.marginal_entropy(onehot) == pytest.approx(math.log(K))
    constant = torch.eye(K)[[3] * 10]  # always the same confident answer
    assert ev.inception_score(constant) == pytest.approx(1.0)
    assert ev.marginal_entropy(constant) == pytest.approx(0.0)
    # two predictions over 2 classes: (0.5, 0.5) and (1, 0) -> p(y) = (0.75, 0.25)
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    h_cond = (math.log(2) + 0) / 2
    h_marg = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert ev.conditional_entropy(p) == pytest.approx(h_cond)
    assert ev.marginal_entropy(p) == pytest.approx(h_marg)
    kl = (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25) + 1.0 * math.log(1 / 0.75)) / 2
    assert ev.inception_score(p) == pytest.approx(math.exp(kl))
    assert math.log(ev.inception_score(p)) == pytest.approx(h_marg - h_cond)  # log IS = H(y) - H(y|x)
    assert ev.entropy(torch.tensor([0.25] * 4)).item() == pytest.approx(math.log(4))


def test_kl_of_marginals_accuracy_mean_std_derangement():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])          # marginal (0.5, 0.5)
    b = torch.tensor([[0.9, 0.1], [0.7, 0.3]])          # marginal (0.8, 0.2)
    assert ev.kl_marginals(a, b) == pytest.approx(0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2))
    assert ev.kl_marginals(b, b) == pytest.approx(0.0)
    assert ev.accuracy(b, torch.tensor([0, 1])) == 0.5
    m, s = ev.mean_std([1.0, 2.0, 3.0])
    assert (m, s) == (pytest.approx(2.0), pytest.approx(1.0))
    assert ev.mean_std([4.0]) == (4.0, None)
    for n in (2, 3, 100):
        perm = ev.derangement(n, torch.Generator().manual_seed(n))
        assert sorted(perm.tolist()) == list(range(n)) and not (perm == torch.arange(n)).any()
    assert torch.equal(ev.derangement(50, torch.Generator().manual_seed(1)),
                       ev.derangement(50, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError):
        ev.derangement(1, torch.Generator())


def test_motion_parts_split_type_and_direction():
    # labels D = 3 * action + direction; predictions: 4 (spellcard left), 2 (walk right), 8 (slash right)
    probs = torch.nn.functional.one_hot(torch.tensor([4, 2, 8]), 9).double()
    z_src, f_src = torch.tensor([5, 1, 2]), torch.tensor([1, 0, 2])
    parts = ev.motion_parts("swap", probs, {"z": z_src, "f": f_src})
    assert parts == {"swap_type_from_z": pytest.approx(2 / 3), "swap_direction_from_z": pytest.approx(1 / 3),
                     "swap_type_from_f": pytest.approx(1 / 3), "swap_direction_from_f": pytest.approx(2 / 3)}
    assert (ACTIONS, DIRECTIONS) == (("walk", "spellcard", "slash"), ("front", "left", "right"))


# ---- the protocols ----------------------------------------------------------------------------------------
def test_known_answers_with_a_model_and_judge_that_paint_and_read_the_labels():
    """stubs.LabelPainter decodes z's action and f's attributes exactly, and stubs.LabelReader reads them back: every
    protocol scores 1, the swap's action is its partner's, and what the swap shares with f's video is chance."""
    X, A, D = stubs.painted_test_set(n_characters=4)
    N = len(D)
    result = ev.evaluate(stubs.LabelPainter(), {"stub": stubs.LabelReader()}, (X, A, D), torch.device("cpu"),
                         seeds=(0, 1), batch_size=10, sampled_b=True)  # 36 videos: a last, partial batch
    assert result["recon_mse_per_pixel"] == pytest.approx(1 / (8 * 3 * 64 * 64), rel=1e-9)  # one wrong value a video
    for run in result["judges"]["stub"]["runs"]:
        perm = ev.derangement(N, torch.Generator().manual_seed(run["seed"])).tolist()
        assert any(D[perm[i]] != D[i] for i in range(N)) and any((A[perm[i]] != A[i]).any() for i in range(N))
        perfect = ["A_action_acc", "A_type_from_z", "A_direction_from_z", "swap_action_acc", "swap_type_from_z",
                   "swap_direction_from_z", "real_action_acc", "real_attr_mean_acc", "B_attr_mean_acc",
                   "swap_attr_mean_acc"] + [f"{p}_{a}_acc" for p in ("B", "Bs", "swap", "real") for a in ATTRIBUTES]
        assert {k: run[k] for k in perfect} == {k: 1.0 for k in perfect}
        # the swap's motion is all z's (video perm[i]'s); what it shares with f's video i is what the pairing gives
        same_direction = sum(int(D[perm[i]]) % 3 == int(D[i]) % 3 for i in range(N)) / N
        same_type = sum(int(D[perm[i]]) // 3 == int(D[i]) // 3 for i in range(N)) / N
        assert run["swap_direction_from_f"] == pytest.approx(same_direction, abs=1e-12) and same_direction < 1
        assert run["swap_type_from_f"] == pytest.approx(same_type, abs=1e-12) and same_type < 1
        # one confident, right answer per video over 9 balanced actions
        assert run["A_IS"] == pytest.approx(9) and run["A_H_y"] == pytest.approx(math.log(9))
        assert run["A_H_y_given_x"] == pytest.approx(0, abs=1e-9)
        assert run["A_KL_gen_vs_real_marginal"] == pytest.approx(0, abs=1e-9)
        assert run["A_n"] == run["B_n"] == run["swap_n"] == run["real_n"] == N


class ActionShiftedOnFirstSkin(stubs.LabelReader):
    """A second stub judge: reads the labels too, but names the next action for videos painted with skin 0."""

    def forward(self, x):
        logits = super().forward(x)
        skin0 = stubs.read(x)[:, 1] == 0
        logits["action"] = torch.where(skin0[:, None], logits["action"].roll(1, dims=1), logits["action"])
        return logits


def test_known_agreement_of_two_judges():
    """Two stub judges that differ exactly on the action of videos with skin 0: their agreement on the swaps and the
    real videos (whose skin is f's video's, i.e. A[:, 0]) is the share of other skins; on every attribute it is 1."""
    X, A, D = stubs.painted_test_set(n_characters=6, seed=3)
    judges = {"reader": stubs.LabelReader(), "shifted": ActionShiftedOnFirstSkin()}
    result = ev.evaluate(stubs.LabelPainter(), judges, (X, A, D), torch.device("cpu"), seeds=(0,), batch_size=16)
    agree = result["agreement"]["reader vs shifted"]["mean"]
    other_skins = (A[:, 0] != 0).double().mean().item()
    assert 0 < other_skins < 1
    assert agree["real_action"] == pytest.approx(other_skins) and agree["swap_action"] == pytest.approx(other_skins)
    assert all(agree[f"{kind}_{a}"] == 1 for kind in ("A", "B", "swap", "real") for a in ATTRIBUTES)
    # each judge's own figures: the shifted one is wrong exactly where it disagrees
    shifted = result["judges"]["shifted"]["mean"]
    assert shifted["swap_action_acc"] == pytest.approx(other_skins) and shifted["real_action_acc"] == pytest.approx(other_skins)
    assert result["judges"]["reader"]["mean"]["swap_action_acc"] == 1


def test_latents_are_the_models_generators(files):
    """What evaluate decodes is what generate_fixed_motion, generate_fixed_content and swap make."""
    model = load_model(files["model"])
    judge = load_judge(files["judge"])
    X = load_sprites(files["data"])["test"][0][:5]
    x = to_float(X)
    post = ev.encode_videos(model, X, torch.device("cpu"), 2, False, {"judge": judge})
    state = torch.get_rng_state()
    latents, perm = ev.run_latents(model, post, seed=3, sampled_b=True)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert set(latents) == {"A", "B", "Bs", "swap"}
    assert set(ev.run_latents(model, post, seed=3)[0]) == {"A", "B", "swap"}  # Bs only when asked
    assert not (perm == torch.arange(5)).any()
    with torch.inference_mode():
        torch.manual_seed(3)
        ref_a = model.generate_fixed_motion(x)
        torch.manual_seed(3)
        ref_b = model.generate_fixed_content(x)
        ref_swap = model.swap(x, x[perm])[0]
        for key, ref in (("A", ref_a), ("B", ref_b), ("swap", ref_swap)):
            torch.testing.assert_close(model.decode(*latents[key]), ref, atol=1e-5, rtol=1e-4)
        # B decodes the prior's means along the path whose samples Bs decodes (the paper's protocol B)
        torch.testing.assert_close(model.prior(latents["Bs"][0])[0], latents["B"][0], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(latents["Bs"][0], latents["B"][0]) and torch.equal(latents["Bs"][1], latents["B"][1])
    other, perm1 = ev.run_latents(model, post, seed=4)  # another run: new f, new prior z, new pairing
    assert not torch.equal(other["A"][1], latents["A"][1]) and not torch.equal(other["B"][0], latents["B"][0])
    assert not torch.equal(perm, perm1) and torch.equal(ev.run_latents(model, post, seed=3)[1], perm)
    assert set(ev.run_latents(model, post, 0, "action")[0]) == {"A", "swap"}
    assert set(ev.run_latents(model, post, 0, "static", sampled_b=True)[0]) == {"B", "Bs", "swap"}


def test_for_inference_changes_no_output():
    """Folding BatchNorm into the convolutions (with running statistics of a trained model) keeps the outputs."""
    torch.manual_seed(0)
    model, judge = CDSVAE(**TINY_MODEL), SpriteJudge(**TINY_JUDGE)
    for m in list(model.modules()) + list(judge.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    model.eval(), judge.eval()
    x, z, f = torch.rand(3, 8, 3, 64, 64), torch.randn(3, 8, 4), torch.randn(3, 8)
    with torch.inference_mode():
        ref = model.decode(z, f), model.encode(x, random=False)["f_mean"], judge(x)
        fast_model, fast_judge = for_inference(copy.deepcopy(model)), for_inference(copy.deepcopy(judge))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast_model.decoder.modules())
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast_judge.modules())
        got = fast_model.decode(z, f), fast_model.encode(x, random=False)["f_mean"], fast_judge(x)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-4)
    for k in FACTORS:
        torch.testing.assert_close(got[2][k], ref[2][k], atol=1e-5, rtol=1e-4)


def test_cli_end_to_end_every_video_scored(files, capsys):
    out = str(files["dir"] / "res.json")
    N = len(load_sprites(files["data"])["test"][0])
    batch = 7
    assert N % batch  # a last, partial batch
    result = ts.main(["--model_dir", files["model"], "--judge", files["judge"], "--data_root", files["data"],
                      "--niter", "2", "--batch_size", str(batch), "--device", "cpu", "--out", out,
                      "--f_dim", "8", "--z_dim", "4", "--sampled_b"])
    text = capsys.readouterr().out
    for word in ("Protocol A", "Acc (%)", "IS", "H(y|x)", "H(y)", "C-DSVAE, paper", "protocol B", "protocol Bs", "swap",
                 "reconstruction MSE", "the swap's motion in parts"):
        assert word in text
    assert list(result["judges"]) == ["judge"] and result["agreement"] == {}  # one judge: no pair to agree
    assert result["recon_mse_per_pixel"] > 0
    result = {**result, **result["judges"]["judge"]}
    assert result["n_test"] == N and len(result["runs"]) == 2
    for run in result["runs"]:
        assert run["A_n"] == run["B_n"] == run["Bs_n"] == run["swap_n"] == run["real_n"] == N
        assert 1.0 - 1e-9 <= run["A_IS"] <= 9 + 1e-9
        assert 0 <= run["A_H_y_given_x"] <= math.log(9) + 1e-9 and 0 <= run["A_H_y"] <= math.log(9) + 1e-9
        assert run["A_KL_gen_vs_real_marginal"] >= -1e-12
        for k, v in run.items():
            if k.endswith("_acc"):
                assert 0 <= v <= 1
        assert run["B_attr_mean_acc"] == pytest.approx(np.mean([run[f"B_{a}_acc"] for a in ATTRIBUTES]))
        for k in ("A_type_from_z", "A_direction_from_z", "swap_type_from_z", "swap_direction_from_f"):
            assert 0 <= run[k] <= 1
        assert run["A_type_from_z"] >= run["A_action_acc"] and run["A_direction_from_z"] >= run["A_action_acc"]
    assert [r["seed"] for r in result["runs"]] == [0, 1]
    assert result["std"]["real_action_acc"] == 0  # the real videos do not depend on the seed
    saved = json.load(open(out))["judges"]["judge"]
    assert saved["mean"]["A_IS"] == pytest.approx(np.mean([r["A_IS"] for r in result["runs"]]))
    assert saved["std"]["A_IS"] == pytest.approx(np.std([r["A_IS"] for r in result["runs"]], ddof=1))
    # one protocol at a time
    only_b = ts.main(["--model_dir", files["model"], "--judge", files["judge"], "--data_root", files["data"],
                      "--niter", "1", "--type_gt", "static", "--device", "cpu", "--out", out])["judges"]["judge"]
    assert "B_skin_acc" in only_b["mean"] and "A_IS" not in only_b["mean"] and only_b["std"]["B_skin_acc"] is None
    capsys.readouterr()


def test_missing_or_wrong_files_are_one_line_errors(files, tmp_path):
    base = ["--judge", files["judge"], "--data_root", files["data"], "--device", "cpu", "--out", str(tmp_path / "r.json")]
    cases = [
        (["--model_dir", str(tmp_path / "nope.pt")] + base, "no checkpoint at"),
        (["--model_dir", files["model"], "--f_dim", "16"] + base, "f_dim=16 asked for but 8"),
        (["--model_dir", files["model"]] + base + ["--judge", str(tmp_path / "nojudge.pt")], "no checkpoint at"),
        (["--model_dir", files["model"]] + base + ["--judge", files["model"]], "is not a judge"),
        (["--model_dir", files["model"]] + base + ["--data_root", str(tmp_path / "no.pkl")], "no data file at"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            ts.main(argv)
        assert str(e.value.code).startswith("error: ") and message in str(e.value.code), e.value.code
        assert "\n" not in str(e.value.code)


def test_script_exits_nonzero_on_a_missing_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "test_sprite.py"), "--model_dir", str(tmp_path / "x.pt")],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"error: no checkpoint at {tmp_path / 'x.pt'}"]


def test_run_test_sprite_sh_passes_arguments_through(files, tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, MODEL=files["model"], DATA=files["data"], OUT=str(out), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", os.path.join(ROOT, "run_test_sprite.sh"), "--judge", files["judge"], "--niter", "1",
                        "--device", "cpu", "--threads", "1"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "Protocol A" in r.stdout
    saved = json.load(open(out))
    # the arguments given override the script's own (--niter 5, the shipped judge); the others stay in effect
    assert (saved["niter"], len(saved["judges"]["judge"]["runs"]), saved["threads"]) == (1, 1, 1)
    assert {name: f["path"] for name, f in saved["judge_files"].items()} == {"judge": files["judge"]}
    assert (saved["amp"], saved["type_gt"], saved["batch_size"]) == ("auto", "all", 256)
    assert saved["precision"] == dtype_name(amp_dtype(torch.device("cpu"), "auto"))
    assert saved["model_dir"] == files["model"]


SHIPPED = os.path.join(ROOT, "judges", "sprite_judge.pt")


@pytest.mark.skipif(not os.path.isfile(SHIPPED), reason="no shipped judge")
def test_shipped_judge_loads_and_met_the_bar(tiny_data):
    assert os.path.getsize(SHIPPED) <= 25e6
    ckpt = torch.load(SHIPPED, weights_only=True)
    assert all(v.dtype == torch.float16 for v in ckpt["model"].values() if v.is_floating_point())
    assert set(ckpt["test_accuracy"]) == set(FACTORS)
    assert min(ckpt["test_accuracy"].values()) >= 0.999  # as measured on the 2664 real test videos
    judge = load_judge(SHIPPED)
    X, A, D = load_sprites(tiny_data)["test"]  # 18 real test videos
    with torch.inference_mode():
        out = judge(to_float(X))
    assert {k: v.shape[1] for k, v in out.items()} == FACTORS
    for k, y in factor_labels(A, D).items():
        assert torch.equal(out[k].argmax(1), y), k


@pytest.mark.parametrize("niter_env", [None, "2"])
def test_run_test_sprite_sh_runs_five_times_only_where_a_half_precision_is_native(files, tmp_path, niter_env):
    """Five runs where --amp finds a native half precision, one in fp32 (an AVX2 CPU); NITER wins."""
    out = tmp_path / "r.json"
    env = dict(os.environ, MODEL=files["model"], DATA=files["data"], OUT=str(out), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="")
    env.pop("NITER", None)
    if niter_env:
        env["NITER"] = niter_env
    r = subprocess.run(["bash", os.path.join(ROOT, "run_test_sprite.sh"), "--judge", files["judge"], "--no-probes",
                        "--threads", "1"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    expected = int(niter_env) if niter_env else 5 if amp_dtype(torch.device("cpu"), "auto") else 1
    assert json.load(open(out))["niter"] == expected


@pytest.mark.parametrize("ratio, amp, niter, runs", [
    (0.6, "auto", "auto", 5), (6.0, "auto", "auto", 1), (6.0, "bf16", "auto", 5),
    (0.6, "off", "auto", 1), (6.0, "auto", 3, 3)])
def test_niter_auto_makes_five_runs_only_in_a_half_precision(monkeypatch, ratio, amp, niter, runs):
    import utils
    monkeypatch.setattr(utils, "cpu_bf16_ratio", lambda: ratio)  # bf16 native below 2x fp32's time
    assert ts.resolve_niter(niter, torch.device("cpu"), amp) == runs


@pytest.mark.parametrize("niter", ["0", "five", "-1"])
def test_niter_refuses_what_is_neither_a_count_nor_auto(niter, capsys):
    with pytest.raises(SystemExit) as e:
        ts.parse_args(["--model_dir", "m.pt", "--niter", niter])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--niter" in err[0], err
