"""Latent probes: what a model's latents hold, without a judge. A linear softmax classifier per
factor, fitted on train videos' f or z (the whole path) and scored on the test videos; for a
benchmark with continuous targets (Moving MNIST's digit positions), a linear ridge regression per
target scored by R². In a disentangled model f holds the appearance and not the motion, z the
motion and not the appearance.
"""
import torch
import torch.nn.functional as F

from dataloader import ACTIONS, ATTRIBUTES, DIRECTIONS, FACTORS, factor_labels
from utils import progress

# the factors probed and their classes: the action (D = 3 * type + direction) also in its two parts
PROBE_FACTORS = {"action": FACTORS["action"], "action_type": len(ACTIONS),
                 "direction": len(DIRECTIONS), **{a: FACTORS[a] for a in ATTRIBUTES}}
PROBE_L2 = 1e-3     # weight of 0.5 * ||W||^2 beside the mean cross-entropy (standardised features)
PROBE_STEPS = 50    # L-BFGS iterations per classifier (at most)
RIDGE_L2 = 1e-3     # the regressions' weight of ||W||^2 beside the mean squared error, per video


def probe_labels(A, D):
    """{factor of PROBE_FACTORS: labels (N,)} of attributes A (N, 4) and motions D (N,)."""
    labels = factor_labels(A, D)
    n = len(DIRECTIONS)
    return {"action": D, "action_type": D // n, "direction": D % n,
            **{a: labels[a] for a in ATTRIBUTES}}


def standardise(train, test):
    """train and test features scaled by the train mean and std (a constant one: centred only)."""
    mean, std = train.mean(0), train.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (train - mean) / std, (test - mean) / std


def probe_accuracy(x_train, y_train, x_test, y_test, classes, l2=PROBE_L2, steps=PROBE_STEPS):
    """Test accuracy of a linear softmax classifier fitted on (x_train, y_train): standardised
    features, float64, zero initial weights, full-batch L-BFGS (deterministic)."""
    with torch.inference_mode(False), torch.enable_grad():
        x_train, x_test = standardise(x_train.cpu().double(), x_test.cpu().double())
        y_train, y_test = y_train.cpu(), y_test.cpu()
        weight = torch.zeros(x_train.shape[1], classes, dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], max_iter=steps, history_size=20,
                                tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def loss():
            opt.zero_grad()
            value = (F.cross_entropy(x_train @ weight + bias, y_train)
                     + 0.5 * l2 * (weight ** 2).sum())
            value.backward()
            return value

        opt.step(loss)
        with torch.no_grad():
            return ((x_test @ weight + bias).argmax(1) == y_test).double().mean().item()


def posterior_sample(post, generator):
    """One sample {'f', 'z'} of each posterior, the noise drawn on the CPU for all videos at once
    (so it depends on the generator only, not on the batch size or the device)."""
    out = {}
    for k in ("f", "z"):
        mean, logvar = post[k].cpu().float(), post[f"{k}_logvar"].cpu().float()
        out[k] = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    return out


def probe_r2(x_train, y_train, x_test, y_test, l2=RIDGE_L2):
    """Test R² (1 - residual / total sum of squares, over every target column) of a linear ridge
    regression fitted on (x_train, y_train (N, d)): standardised features, float64, closed form."""
    x_train, x_test = standardise(x_train.cpu().double(), x_test.cpu().double())
    y_train, y_test = y_train.cpu().double().flatten(1), y_test.cpu().double().flatten(1)
    bias = y_train.mean(0)  # the features are centred: the intercept is the mean, unpenalised
    eye = torch.eye(x_train.shape[1], dtype=x_train.dtype)
    weight = torch.linalg.solve(x_train.T @ x_train + l2 * len(x_train) * eye,
                                x_train.T @ (y_train - bias))
    residual = ((x_test @ weight + bias - y_test) ** 2).sum()
    return 1 - (residual / ((y_test - y_test.mean(0)) ** 2).sum()).item()


def latent_probes(train, test, train_labels, test_labels, factors=PROBE_FACTORS, desc="probes"):
    """{'f': {factor: test accuracy}, 'z': {...}} of the probes fitted on the train latents."""
    jobs = [(latent, factor) for latent in ("f", "z") for factor in factors]
    out = {"f": {}, "z": {}}
    for latent, factor in progress(jobs, desc=desc, unit="probe", leave=False):
        out[latent][factor] = probe_accuracy(
            train[latent].flatten(1), train_labels[factor], test[latent].flatten(1),
            test_labels[factor], factors[factor])
    return out


def probe_table(train_post, test_post, train_labels, test_labels, seed=0, factors=PROBE_FACTORS,
                train_targets=None, test_targets=None):
    """'probes' from the posterior means, 'probes_sampled' from one sample per video (seeded;
    where there are log-variances), 'probes_chance' {factor: 1 / classes}; with targets
    {name: (N, ...)} also 'probes_r2' {'f' / 'z': {name: R²}} from the means."""
    out = {"probes": latent_probes(train_post, test_post, train_labels, test_labels, factors,
                                   desc="probes, means")}
    if all(f"{k}_logvar" in p for k in ("f", "z") for p in (train_post, test_post)):
        generator = torch.Generator().manual_seed(seed)
        train_sample = posterior_sample(train_post, generator)
        test_sample = posterior_sample(test_post, generator)
        out["probes_sampled"] = latent_probes(train_sample, test_sample, train_labels,
                                              test_labels, factors, desc="probes, samples")
    out["probes_chance"] = {k: 1 / n for k, n in factors.items()}
    if train_targets:
        out["probes_r2"] = {latent: {name: probe_r2(
            train_post[latent].flatten(1), train_targets[name], test_post[latent].flatten(1),
            test_targets[name]) for name in train_targets} for latent in ("f", "z")}
    return out
