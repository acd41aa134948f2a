"""The rectified-flow toy (`toy_2d.py --model flow`): gmm.py's exact marginals and velocity on the flow path,
the exact-flow oracle, the pretraining pairs, an end-to-end run and experiments/flow_matching.py."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

import gmm
import nabla_gfn as ng
import toy_2d as T
import toy_models
from experiments import toy_diagnostics as D

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
TIMES = [1.0, 0.999, 0.9, 0.5, 0.1, 1e-3]


def flow_marginal(prior: gmm.GMM, t: float) -> MixtureSameFamily:
    """x_t = (1 − t) x_0 + t ε for x_0 ~ prior: components N((1 − t) m_k, ((1 − t)² s² + t²) I), by torch."""
    std = math.sqrt((1 - t) ** 2 * prior.std**2 + t**2)
    return MixtureSameFamily(Categorical(prior.weights), Independent(Normal((1 - t) * prior.means, std), 1))


@pytest.mark.parametrize("t", TIMES)
def test_flow_marginal_score_and_velocity_against_torch_and_autograd(t):
    """log p_t on the flow path against torch's mixture; the score against autograd of it; the velocity against
    v = −(x + t s)/(1 − t) with s by autograd (the score ↔ velocity identity) and against the per-component
    posterior means E[ε − x_0 | x, k] = (t − (1 − t) s²)/V (x − (1 − t) m_k) − m_k, weighted by responsibilities."""
    prior = gmm.parse_prior("ring8")
    x = 3 * torch.randn(256, 2, dtype=F64)
    a = torch.full((256,), (1 - t) ** 2 / ((1 - t) ** 2 + t**2), dtype=F64)  # the ᾱ of equal signal-to-noise ratio
    marginal = flow_marginal(prior, t)
    torch.testing.assert_close(prior.log_prob(x, a, "flow"), marginal.log_prob(x))
    xg = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(marginal.log_prob(xg).sum(), xg)
    torch.testing.assert_close(prior.score(x, a, "flow"), score)
    velocity = gmm.exact_velocity(prior, x, torch.tensor(t, dtype=F64))
    if t < 1:
        torch.testing.assert_close(velocity, -(x + t * score) / (1 - t), rtol=1e-9, atol=1e-9)
    V = (1 - t) ** 2 * prior.std**2 + t**2
    resp = (marginal.component_distribution.log_prob(x[:, None]) + prior.weights.log()).softmax(-1)  # (N, K)
    centred = x[:, None] - (1 - t) * prior.means  # (N, K, D)
    per_component = (t - (1 - t) * prior.std**2) / V * centred - prior.means
    torch.testing.assert_close(velocity, (resp[..., None] * per_component).sum(1), rtol=1e-9, atol=1e-9)


def test_exact_velocity_is_differentiable_at_the_noise_end():
    """At t = 1 the limit v = x − E[x_0] (x_1 ⟂ x_0), with a finite Jacobian (the identity), as the lean adjoint needs."""
    prior = gmm.parse_prior("ring8", 4)
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    v = gmm.exact_velocity(prior, x, torch.ones(5, dtype=F64))
    torch.testing.assert_close(v, x - prior.weights @ prior.means)
    (grad,) = torch.autograd.grad(v.sum(), x)
    torch.testing.assert_close(grad, torch.ones_like(x))


def test_training_pairs_of_both_families():
    """flow: x_t = (1 − t) x_0 + t ε, target v = ε − x_0 (so x_t − t v = x_0), τ = 1000 t; ddpm: the draws and
    arithmetic of the denoising regression as toy_2d.py always made them (cached models stay valid)."""
    x0 = torch.randn(64, 2)
    x_t, tau, v = toy_models.training_pair("flow", None, x0, torch.Generator().manual_seed(0))
    t = tau[:, None] / 1000
    assert 0 <= tau.min() and tau.max() <= 1000
    torch.testing.assert_close(x_t - t * v, x0, rtol=1e-5, atol=1e-5)
    scheduler, gen = T.sd_scheduler(), torch.Generator().manual_seed(0)
    x_t, tau, eps = toy_models.training_pair("ddpm", scheduler, x0, gen)
    gen = torch.Generator().manual_seed(0)
    tau_old = torch.randint(0, 1000, (64,), generator=gen)
    eps_old = torch.randn(x0.shape, generator=gen)
    a = scheduler.alphas_cumprod.float()[tau_old][:, None]
    assert torch.equal(tau, tau_old) and torch.equal(eps, eps_old)
    assert torch.equal(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps_old)


def oracle_setup(noise_level, num_steps=50):
    task = T.build_task(T.ToyConfig(model="flow"))
    _, schedule = toy_models.make_sampler("flow", num_steps, noise_level)
    velocity = D.analytic_velocity(task.prior)
    return task, schedule, velocity, D.oracle_eps(task, velocity, schedule)


def test_memoryless_oracle_samples_the_target_and_the_untilted_chain_does_not(one_torch_thread):
    """The exact prior velocity's flow-SDE step at a = √2, shifted by the closed-form flow, lands on the target's
    mode weights (4000 samples: the metric's floor is ~0.02); the untilted chain stays on the prior's."""
    task, schedule, velocity, oracle = oracle_setup(math.sqrt(2))
    gen = torch.Generator().manual_seed(0)
    tilted = T.sample(oracle, schedule, 4000, gen).final
    untilted = T.sample(velocity, schedule, 4000, gen).final
    assert T.metrics(task, tilted)["mode_tv"] < 0.04
    assert T.metrics(task, untilted)["mode_tv"] > 0.4


class AnalyticVelocityNet(torch.nn.Module):
    """The prior's exact velocity with the toy's network interface net(x, τ), τ = 1000 t."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior

    def forward(self, x, tau):
        return gmm.exact_velocity(self.prior, x, tau.to(F64) / 1000)


def test_flow_errors_on_the_flow_schedule_vanish_at_the_data_end(one_torch_thread):
    """Per-step errors of the diagnostics on the flow chain, with the exact prior velocity as policy and reference.
    At t = 1 the closed-form flow is 0 (memoryless: F̃(x_1) is constant) and so is the guess (γ = 1 − t = 0);
    at the last step (t = 0.001) x̂_0 = x − t v ≈ x, and the guess and the lean adjoint (one Jacobian from
    β∇r(x_0)) match the closed-form flow to O(t) (measured 1e-3, 4e-4); the bootstrapped target of a policy
    equal to its reference is 0 (relative error 1 wherever the flow is not 0)."""
    task = T.build_task(T.ToyConfig(model="flow"))
    cfg = T.ToyConfig(model="flow")
    _, schedule = toy_models.make_sampler("flow", 50, math.sqrt(2))
    net = AnalyticVelocityNet(task.prior)
    trajectory = T.sample(T.as_eps_fn(net), schedule, 500, torch.Generator().manual_seed(0))
    x_1 = trajectory.states[:, 0]
    assert gmm.exact_flow_score(task.prior, task.target, x_1, schedule.alpha_bar[0], "flow").abs().max() < 1e-12
    err = D.flow_errors(task, net, None, trajectory, schedule, cfg, net)
    assert err["guess"][0] < 1e-6  # 0/0 guarded by the 1e-8 clamp of the relative error
    assert err["guess"][-1] < 0.01 and err["adjoint_target"][-1] < 0.01, (err["guess"][-3:], err["adjoint_target"][-3:])
    assert err["guess"][-1] < err["guess"][25] / 10
    assert err["bootstrap_target"][1:] == pytest.approx([1.0] * 49, abs=1e-6)  # float32 states: a few eps32


def run_cli(script, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_flow_model_pretrains_finetunes_and_evaluates_end_to_end(tmp_path):
    out = run_cli("toy_2d.py", "--model", "flow", "--noise-level", "0.7", "--updates", "3", "--batch-size", "16",
                  "--num-steps", "8", "--pretrain-iters", "60", "--eval-samples", "300", "--eval-every", "1",
                  "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"] == "flow" and config["noise_level"] == 0.7
    assert all(0 <= metrics[k]["mode_tv"] <= 1 for k in ("finetuned", "pretrained")) and len(metrics["history"]) == 3
    assert [p.name[:5] for p in (tmp_path / "cache" / "toy_2d").iterdir()] == ["flow_"]  # its own cache entry
    assert (tmp_path / "run" / "figure.png").exists()


@pytest.mark.parametrize("args, needle", [(["--model", "dit"], "--model"), (["--noise-level", "0"], "--noise-level")])
def test_bad_model_flags_are_one_line_errors(args, needle):
    out = run_cli("toy_2d.py", *args, "--updates", "1")
    assert out.returncode != 0 and needle in out.stderr and "Traceback" not in out.stderr


def test_flow_matching_experiment_quick(tmp_path):
    out = run_cli("experiments/flow_matching.py", "--quick", "--jobs", "1", "--out", str(tmp_path / "exp"),
                  "--cache-dir", str(tmp_path / "cache"))
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "exp" / "table.md").read_text()
    assert "ring8/linear" in table and "memoryless" in table and "exact start bias" in table
