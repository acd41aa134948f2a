"""Oracle tests of GRPO and KL-regularised policy gradient (baselines.grpo_update, baselines.kl_pg_update).

Oracles: a Monte-Carlo estimate of the per-step KL; PPO's ratio 1 on-policy; the exact zero of the update
at θ = ♯ with a constant reward; and a one-step Gaussian problem, P^♯ = N(μ0, σ²I) with a linear log-reward
r = w·x, whose tilted target p^♯ e^{βr} is N(μ0 + βσ²w, σ²I) in closed form: KL-PG's expected loss
gradient there is exactly (θ − θ*)/σ², checked at the target (zero) and off it, within Monte-Carlo error.
The last tests run both rungs end to end with a tiny budget.
"""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

import baselines as bl
import nabla_gfn as ng

ROOT = Path(__file__).resolve().parents[1]
PG_METHODS = ("grpo", "kl-pg")


class TinyEps(nn.Module):
    """(x, τ) → ε̂, a two-layer MLP on (x, τ/1000)."""

    def __init__(self, seed: int, dim: int = 2, hidden: int = 16):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, t[:, None].to(x.dtype) / 1000], 1))


def ddim(num_steps: int) -> ng.StepSchedule:
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return ng.ddim_schedule(scheduler, num_steps)


def trainee(policy: nn.Module, reference: nn.Module, schedule: ng.StepSchedule, log_reward, lr: float = 0.1) -> bl.Trainee:
    eps = lambda net: (lambda x, t, traj: net(x, t))
    params = [p for p in policy.parameters() if p.requires_grad]
    return bl.Trainee(eps(policy), eps(reference), log_reward, schedule, lambda n, g: torch.randn(n, 2, generator=g),
                      {"policy": params}, torch.optim.Adam(params, lr=lr))


def hp(**kw) -> bl.MethodConfig:
    return bl.MethodConfig(**{"beta": 0.5, "batch_size": 8, "fraction": 1.0, "grad_clip": 1e9, "ppo_epochs": 1,
                              "ppo_minibatches": 1, **kw})


# ---- the pieces ----------------------------------------------------------------------------------


def test_step_kl_matches_a_monte_carlo_estimate():
    gen = torch.Generator().manual_seed(0)
    mean, mean_ref = torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    x = mean + sigma[:, None] * torch.randn(200_000, 3, 4, generator=gen, dtype=torch.float64)  # x ~ N(μ, σ²I)
    log_ratio = (ng.gaussian_log_prob(x.flatten(0, 1), mean.repeat(200_000, 1), sigma.repeat(200_000))
                 - ng.gaussian_log_prob(x.flatten(0, 1), mean_ref.repeat(200_000, 1), sigma.repeat(200_000))).view(200_000, 3)
    estimate, standard_error = log_ratio.mean(0), log_ratio.std(0) / 200_000 ** 0.5
    exact = bl.step_kl(mean, mean_ref, sigma)
    assert ((estimate - exact).abs() < 4 * standard_error).all(), (estimate, exact, standard_error)
    assert (exact > 0.1).all()


def test_kl_to_go_and_the_group_baselines():
    kls = torch.tensor([[1.0, 2.0, 4.0], [0.5, 0.0, 8.0]])
    assert torch.equal(bl.kl_to_go(kls), torch.tensor([[6.0, 4.0, 0.0], [8.0, 8.0, 0.0]]))
    group = torch.tensor([0, 1, 0, 0, 2])
    reward = torch.tensor([1.0, 5.0, 2.0, 6.0, 7.0])
    # leave-one-out: each row minus the mean of the other rows of its group; a group of one keeps its value
    torch.testing.assert_close(bl.minus_others_mean(reward, group), torch.tensor([1 - 4.0, 5.0, 2 - 3.5, 6 - 1.5, 7.0]))
    adv = bl.group_relative_advantages(reward, group, clip=5.0)
    g0 = reward[[0, 2, 3]]
    torch.testing.assert_close(adv[[0, 2, 3]], (g0 - g0.mean()) / (g0.std(unbiased=False) + 1e-4))
    assert adv[1] == adv[4] == 0.0  # a group of one: no relative advantage
    assert bl.group_relative_advantages(torch.full((6,), 3.7), torch.zeros(6, dtype=torch.long), 5.0).eq(0).all()


def test_ratio_is_one_on_policy_and_the_clipped_gradient_equals_the_unclipped():
    schedule = ddim(4)
    policy, reference = TinyEps(0), TinyEps(1).requires_grad_(False)
    t = trainee(policy, reference, schedule, lambda x0, traj: -x0.pow(2).sum(1))
    batch, reward, reference_mean, step_kls = bl.sample_for_pg(t, hp(), torch.Generator().manual_seed(1))
    old_log_prob = ng.gaussian_log_prob(batch.x_next, bl.step_mean_of(batch.eps_old, batch), batch.sigma)
    log_prob = ng.gaussian_log_prob(batch.x_next, bl.step_mean_of(policy(batch.x, batch.t), batch), batch.sigma)
    advantages = bl.kl_pg_advantages(0.5 * reward, step_kls, torch.zeros(8, dtype=torch.long))[batch.traj, batch.step]
    loss, stats = bl.ppo_clip_loss(log_prob, old_log_prob, advantages, clip=1e-4)
    torch.testing.assert_close(stats["ratio"], torch.ones(len(batch)), rtol=0, atol=1e-5)  # ε̂ recomputed: a few ulp
    assert float(stats["clip_fraction"]) == 0.0
    params = list(policy.parameters())
    clipped = torch.autograd.grad(loss, params, retain_graph=True)
    plain = torch.autograd.grad((-advantages * torch.exp(log_prob - old_log_prob)).mean(), params)
    for a, b in zip(clipped, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in clipped)
    assert (step_kls > 0).all() and step_kls.shape == (8, 4)


@pytest.mark.parametrize("method", PG_METHODS)
def test_constant_reward_at_the_reference_leaves_the_policy_unchanged(method):
    # θ = ♯: every KL and its gradient is exactly 0; r constant: every advantage is exactly 0 (β r = 0.75,
    # eight equal rows average exactly). Adam with a zero gradient does not move; a varying reward does.
    schedule = ddim(4)
    reference = TinyEps(0).requires_grad_(False)
    for reward, moves in ((lambda x0, traj: torch.full((len(x0),), 1.5), False), (lambda x0, traj: x0[:, 0], True)):
        policy = copy.deepcopy(reference).requires_grad_(True)
        before = [p.detach().clone() for p in policy.parameters()]
        logs = bl.METHODS[method].update(trainee(policy, reference, schedule, reward), hp(ppo_minibatches=2),
                                         torch.Generator().manual_seed(0))
        changed = any(not torch.equal(p, q) for p, q in zip(policy.parameters(), before))
        assert changed == moves, (method, logs)
        assert (logs["grad_norm_policy"] > 0) == moves


# ---- the one-step Gaussian problem: KL-PG's fixed point is the tilted target ------------------------


class Constant(nn.Module):
    """ε̂(x, τ) = θ: with the one-step schedule below, the policy is N(θ, σ²I)."""

    def __init__(self, value):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(value, dtype=torch.float64).clone())

    def forward(self, x, t):
        return self.theta.expand_as(x)


def one_step_schedule(sigma: float) -> ng.StepSchedule:
    """One step x_T → x_0 with μ = 0·x + 1·ε̂ and std σ: P_F(x_0) = N(ε̂, σ²I), whatever x_T."""
    one, f64 = torch.ones(1, dtype=torch.float64), torch.float64
    coef = torch.tensor([[0.0, 1.0]], dtype=f64)
    return ng.StepSchedule(timesteps=torch.tensor([999]), next_timesteps=torch.tensor([0]), alpha_bar=0.5 * one,
                           alpha_bar_next=one, sigma=sigma * one, mean_coef=coef, x0_coef=coef, x0_coef_next=coef)


def kl_pg_gradient(theta, mu0, sigma, beta, w, batch: int, seed: int) -> torch.Tensor:
    """The loss gradient of one KL-PG update at policy N(θ, σ²I) (one minibatch: on-policy)."""
    policy, reference = Constant(theta), Constant(mu0).requires_grad_(False)
    t = trainee(policy, reference, one_step_schedule(sigma), lambda x0, traj: x0 @ w, lr=0.0)
    t.x_T = lambda n, g: torch.zeros(n, 2, dtype=torch.float64)
    t.optimizer = torch.optim.SGD([policy.theta], lr=0.0)
    bl.kl_pg_update(t, hp(beta=beta, batch_size=batch), torch.Generator().manual_seed(seed))
    return policy.theta.grad.clone()


def test_kl_pg_fixed_point_is_the_tilted_target_on_a_one_step_gaussian():
    # J(θ) = E[β w·x] − KL(N(θ, σ²) ‖ N(μ0, σ²)) has ∇J = βw − (θ − μ0)/σ² = −(θ − θ*)/σ², θ* = μ0 + βσ²w:
    # the loss gradient (−∇J) is unbiased for (θ − θ*)/σ², 0 at the tilted target
    mu0, w = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    sigma, beta = 0.7, 1.5
    target = mu0 + beta * sigma**2 * w
    for theta in (target, target + torch.tensor([0.3, -0.2], dtype=torch.float64)):
        grads = torch.stack([kl_pg_gradient(theta, mu0, sigma, beta, w, batch=4096, seed=s) for s in range(16)])
        mean, standard_error = grads.mean(0), grads.std(0) / 16 ** 0.5
        expected = (theta - target) / sigma**2
        assert ((mean - expected).abs() < 4 * standard_error + 1e-12).all(), (mean, expected, standard_error)
    assert (expected.abs() > 10 * standard_error).all()  # off the target the gradient is resolved, and points back
    # with the std division (GRPO) the same problem's gradient at the target is not zero
    policy, reference = Constant(target), Constant(mu0).requires_grad_(False)
    t = trainee(policy, reference, one_step_schedule(sigma), lambda x0, traj: x0 @ w)
    t.x_T, t.optimizer = (lambda n, g: torch.zeros(n, 2, dtype=torch.float64)), torch.optim.SGD([policy.theta], lr=0.0)
    bl.grpo_update(t, hp(beta=beta, batch_size=4096, kl_coef=1 / beta), torch.Generator().manual_seed(0))
    assert policy.theta.grad.norm() > 10 * standard_error.norm()


# ---- both rungs run them end to end ------------------------------------------------------------------


@pytest.mark.parametrize("method", PG_METHODS)
def test_toy_2d_runs_the_method_end_to_end(method, tmp_path):
    out = tmp_path / method
    proc = subprocess.run([sys.executable, str(ROOT / "toy_2d.py"), "--method", method, "--pretrain-iters", "30",
                           "--updates", "2", "--batch-size", "8", "--num-steps", "4", "--eval-samples", "64",
                           "--eval-every", "1", "--hidden", "16", "--no-figure", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "metrics.json").is_file()


def test_toy_digits_runs_both_end_to_end(tmp_path):
    out = tmp_path / "digits"
    proc = subprocess.run([sys.executable, str(ROOT / "toy_digits.py"), "--preset", "smoke", "--method", ",".join(PG_METHODS),
                           "--out", str(out), "--cache", str(tmp_path / "cache")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for method in PG_METHODS:
        assert (out / method / "samples.npy").is_file()
