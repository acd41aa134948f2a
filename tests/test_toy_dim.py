"""Oracle tests of toy_2d.py --dim D: the D-dimensional tilted GMM, its scores and flow, D = 2 unchanged, a D = 8 run.

    pytest -x -q tests/test_toy_dim.py     # ≈ 1 min on one core
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nabla_gfn as ng
import toy_2d as T

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def rewards_for(dim):
    """Rewards on the first two coordinates and on all of them (by preset, JSON-like spec, and explicitly)."""
    prior = T.parse_prior("ring8", dim)
    return {
        "bump": T.parse_reward("bump", prior),
        "bump-all": T.parse_reward("bump-all", prior),
        "narrow-bump": T.GaussianReward([-1.0, 2.0], 0.7),
        "linear": T.parse_reward("linear", prior),
        "linear-all": T.LinearReward((0.3 * torch.linspace(-1, 1, dim, dtype=F64)).tolist()),
    }


# ----------------------------------------------------------------------------------------------
# The D-dimensional prior and its tilted target
# ----------------------------------------------------------------------------------------------


def test_offsets_separate_the_modes_in_the_other_coordinates():
    prior = T.parse_prior("grid25", 16)
    offsets = prior.means[:, 2:]
    torch.testing.assert_close(offsets.norm(dim=1), torch.full((25,), T.OFFSET_NORM, dtype=F64))
    torch.testing.assert_close(prior.means[:, :2], T.parse_prior("grid25").means)  # the plane is the 2-D preset
    assert torch.cdist(offsets, offsets).add(torch.eye(25) * 10).min() > 0.5  # no two modes share their offsets
    torch.testing.assert_close(T.parse_prior("grid25", 16).means, prior.means)  # fixed, not seeded by --seed


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_plane_marginal_of_the_tilted_target_matches_numerical_integration(beta):
    """A reward on the first two coordinates: the target's (x1, x2) marginal is p♯'s plane marginal
    times R^β, normalised on a grid (the offsets integrate out); the diagonal target must agree."""
    prior = T.parse_prior("ring8", 8)
    reward = T.parse_reward("bump", prior)
    target = reward.tilt(prior, beta)
    assert isinstance(target.std, torch.Tensor) and target.std[0] < target.std[2]  # anisotropic
    xs = torch.linspace(-7, 7, 401, dtype=F64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    x, cell = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), float(xs[1] - xs[0]) ** 2
    unnorm = (prior.marginal(2).log_prob(x) + beta * reward(x)).exp()
    numeric = unnorm / (unnorm.sum() * cell)
    closed = target.marginal(2).log_prob(x).exp()
    assert float((numeric - closed).abs().sum() * cell) < 2e-3  # L1 distance of the densities


@pytest.mark.parametrize("dim", [3, 8, 32])
@pytest.mark.parametrize("name", ["bump", "bump-all", "narrow-bump", "linear", "linear-all"])
def test_tilted_gmm_matches_importance_weighted_prior_samples(dim, name):
    """All D coordinates: p♯ samples weighted by R^β (self-normalised) against the closed-form target:
    mode weights, per-coordinate means and variances within each mode, and E[r]."""
    beta = 1.0
    prior = T.parse_prior("ring8", dim)
    reward = rewards_for(dim)[name]
    target = reward.tilt(prior, beta)
    gen = torch.Generator().manual_seed(0)
    k = torch.multinomial(prior.weights, 200_000, replacement=True, generator=gen)
    x = prior.means[k] + prior.std * torch.randn(len(k), dim, generator=gen, dtype=F64)
    w = (beta * reward(x)).sub((beta * reward(x)).max()).exp()
    w = w / w.sum()
    mode_w = torch.zeros(8, dtype=F64).index_add_(0, k, w)
    # seeded self-normalised importance sampling with 200000 draws: statistical, not rounding, tolerances below
    torch.testing.assert_close(mode_w, target.weights, atol=0.01, rtol=0)
    target_var = target.variances()
    for mode in torch.argsort(target.weights, descending=True)[:2]:  # the well-sampled modes
        wm = w * (k == mode)
        mean = (wm[:, None] * x).sum(0) / wm.sum()
        var = (wm[:, None] * (x - mean).pow(2)).sum(0) / wm.sum()
        torch.testing.assert_close(mean, target.means[mode], atol=0.02, rtol=0)
        torch.testing.assert_close(var, target_var, atol=0.01, rtol=0)
    assert reward.expectation(target) == pytest.approx(float((w * reward(x)).sum()), abs=0.02)


@pytest.mark.parametrize("dim", [8, 32])
@pytest.mark.parametrize("alpha_bar", [0.003, 0.1, 0.5, 0.97, 1.0])
def test_diagonal_gmm_score_matches_autograd_of_noised_log_density(dim, alpha_bar):
    target = T.parse_reward("bump", T.parse_prior("grid25", dim)).tilt(T.parse_prior("grid25", dim), 1.5)
    x = torch.randn(64, dim, dtype=F64, generator=torch.Generator().manual_seed(1)) * 3
    a = torch.full((64,), alpha_bar, dtype=F64)
    xg = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(target.log_prob(xg, a).sum(), xg)
    torch.testing.assert_close(target.score(x, a), auto)


def test_diagonal_gmm_equals_the_isotropic_one_when_its_stds_agree():
    iso = T.parse_prior("ring8", 3)
    diag = T.GMM(iso.means, iso.weights, torch.full((3,), iso.std, dtype=F64))
    x = torch.randn(100, 3, dtype=F64) * 3
    a = torch.rand(100, dtype=F64)
    torch.testing.assert_close(diag.log_prob(x, a), iso.log_prob(x, a))
    torch.testing.assert_close(diag.score(x, a), iso.score(x, a))


@pytest.mark.parametrize("name", ["bump", "bump-all", "narrow-bump", "linear", "linear-all"])
def test_exact_flow_at_data_end_is_beta_grad_reward_in_d_dimensions(name):
    """Terminal condition ∇ log F̃(x_0) = β ∇r(x_0) for the exact flow at ᾱ = 1, D = 8."""
    dim, beta = 8, 1.7
    prior, reward = T.parse_prior("grid25", dim), rewards_for(dim)[name]
    target = reward.tilt(prior, beta)
    x = (torch.randn(200, dim, dtype=F64) * 3).requires_grad_(True)
    (grad_r,) = torch.autograd.grad(reward(x).sum(), x)
    flow = T.exact_flow_score(prior, target, x.detach(), torch.ones(1, dtype=F64))
    torch.testing.assert_close(flow, beta * grad_r)


def test_oracle_with_the_exact_prior_model_samples_the_target_at_d8():
    """The pretrained step of the exact prior ε-model, tilted by the exact flow, lands on the target's
    mode weights (the untilted prior sampler does not): the D-dimensional flow is right at every step."""
    cfg = T.ToyConfig(dim=8)
    task = T.build_task(cfg)
    scheduler = T.sd_scheduler()
    schedule = ng.ddim_schedule(scheduler, cfg.num_steps)
    prior_eps = T.analytic_eps(task.prior, scheduler.alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    oracle = T.sample(T.oracle_eps(task, prior_eps, schedule), schedule, 3000, gen, 8).final
    untilted = T.sample(prior_eps, schedule, 3000, gen, 8).final
    assert T.metrics(task, oracle)["mode_tv"] < 0.05
    assert T.metrics(task, untilted)["mode_tv"] > 0.4


# ----------------------------------------------------------------------------------------------
# D = 2 is the original toy, operation for operation
# ----------------------------------------------------------------------------------------------


def original_2d_tilts(prior, center, std_r, w, beta):
    """The 2-D toy's closed forms as they were written before --dim (isotropic, shared std)."""
    s = prior.std
    prec = 1 / s**2 + beta / std_r**2
    g_means = (prior.means / s**2 + beta * center / std_r**2) / prec
    v = s**2 + std_r**2 / beta
    g_logw = prior.weights.log() - 0.5 * (prior.means - center).pow(2).sum(-1) / v
    l_logw = prior.weights.log() + beta * prior.means @ w + 0.5 * beta**2 * s**2 * w.pow(2).sum()
    return (g_means, g_logw.softmax(0), prec**-0.5), (prior.means + beta * s**2 * w, l_logw.softmax(0), s)


def original_2d_log_prob_and_score(gmm, x, alpha_bar):
    a = alpha_bar
    means, var = a.sqrt()[:, None, None] * gmm.means, a * gmm.std**2 + (1 - a)
    diff = x[:, None, :] - means
    log_comp = gmm.weights.log() - 0.5 * diff.pow(2).sum(-1) / var[:, None] - torch.log(2 * math.pi * var)[:, None]
    resp = log_comp.softmax(-1)
    return log_comp.logsumexp(-1), -(resp[..., None] * diff).sum(1) / var[:, None]


@pytest.mark.parametrize("prior_name", ["ring8", "grid25"])
def test_dim2_reproduces_the_original_2d_classes_exactly(prior_name):
    prior = T.parse_prior(prior_name, 2)
    assert prior.means.shape == (len(prior.weights), 2) and isinstance(prior.std, float)
    center, std_r, w, beta = torch.tensor([3.0, 0.0], dtype=F64), 2.0, torch.tensor([0.5, 0.25], dtype=F64), 1.3
    gauss, lin = original_2d_tilts(prior, center, std_r, w, beta)
    for reward, (means, weights, std) in ((T.parse_reward("bump", prior), gauss), (T.GaussianReward([3.0, 0.0], 2.0), gauss),
                                          (T.parse_reward("bump-all", prior), gauss), (T.parse_reward("linear", prior), lin)):
        target = reward.tilt(prior, beta)
        assert torch.equal(target.means, means) and torch.equal(target.weights, weights) and target.std == std
        x = torch.randn(300, 2, dtype=F64) * 3
        a = torch.rand(300, dtype=F64).clamp(min=1e-3)
        log_prob, score = original_2d_log_prob_and_score(target, x, a)
        assert torch.equal(target.log_prob(x, a), log_prob) and torch.equal(target.score(x, a), score)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    k = torch.multinomial(prior.weights, 50, replacement=True, generator=gen_b)
    assert torch.equal(prior.sample(50, gen_a), prior.means[k] + prior.std * torch.randn(50, 2, generator=gen_b, dtype=F64))
    assert T.network_width(T.ToyConfig.hidden, 2) == T.ToyConfig.hidden and T.make_flow(T.ToyConfig()).net[0].in_features == 18


# ----------------------------------------------------------------------------------------------
# CLI: bad values, an end-to-end run at D = 8
# ----------------------------------------------------------------------------------------------


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "toy_2d.py"), *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--dim", "1"], "--dim must be an integer ≥ 2"),
        (["--dim", "-4"], "--dim must be an integer ≥ 2"),
        (["--dim", "eight"], "argument --dim: invalid int value"),
        (["--dim", "3", "--reward", '{"type": "linear", "w": [1, 2, 3, 4]}'], "--reward: center / w must have 1 … 3 coordinates"),
        (["--dim", "8", "--prior", '{"means": [[0, 0, 1]], "std": 1}'], "--prior: means must be K×2 (or K×8 for --dim 8)"),
    ],
)
def test_bad_dim_values_give_one_line_errors(args, needle):
    out = run_cli(*args, "--updates", "1")
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.startswith(("error", "toy_2d.py: error"))]) == 1


def test_end_to_end_tiny_run_at_d8(tmp_path):
    out = run_cli("--dim", "8", "--updates", "4", "--batch-size", "16", "--num-steps", "10", "--pretrain-iters", "100",
                  "--eval-samples", "300", "--eval-every", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.load(tmp_path / "run" / "samples.npy").shape == (300, 8)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dim"] == 8
    for key in ("finetuned", "pretrained", "oracle"):
        assert 0 <= metrics[key]["mode_tv"] <= 1 and math.isfinite(metrics[key]["sliced_w1"])
    assert len(metrics["flow_relative_error"]["guess_plus_flow"]) == 10
    assert (tmp_path / "run" / "figure.png").stat().st_size > 10_000


def test_dim_sweep_quick_writes_its_table_and_figure(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_dim_sweep.py"), "--quick", "--jobs", "1",
                          "--out", str(tmp_path / "sweep"), "--cache-dir", str(tmp_path / "cache")],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "sweep" / "table.md").read_text()
    for dim in (2, 3):
        for label in ("∇-GFlowNet", "Adjoint Matching", "RTB", "DDPO"):
            assert any(line.startswith(f"| {dim} | {label}") for line in table.splitlines()), (dim, label)
    summary = json.loads((tmp_path / "sweep" / "table.json").read_text())
    assert {r["dim"] for r in summary["rows"]} == {2, 3} and all(len(r["final_tv"]) == 1 for r in summary["rows"])
    assert json.loads((tmp_path / "sweep" / "runs" / "d3" / "rtb" / "seed0" / "config.json").read_text())["dim"] == 3
    assert (tmp_path / "sweep" / "toy_dim_sweep.png").stat().st_size > 10_000


def test_held_crossing_is_the_start_of_the_final_run_below_the_threshold(tmp_path):
    from experiments import toy_dim_sweep

    history = [{"update": u, "train_time_s": 0.5 * u} for u in range(1, 61)]
    (tmp_path / "metrics.json").write_text(json.dumps({"history": history}))
    cfg = T.ToyConfig(out=str(tmp_path), updates=60)
    run = {"diverged_at": None, "curve": [(10, 0.3), (20, 0.05), (30, 0.2), (40, 0.09), (50, 0.1), (60, 0.08)]}
    assert toy_dim_sweep.held_crossing(cfg, run, 0.1) == (40, 20.0)  # the swing at update 20 does not count
    assert toy_dim_sweep.held_crossing(cfg, {**run, "curve": run["curve"][:3]}, 0.1) == (None, None)  # ends above
    assert toy_dim_sweep.held_crossing(cfg, {**run, "diverged_at": 60}, 0.1) == (None, None)
