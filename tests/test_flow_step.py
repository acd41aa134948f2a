"""Oracle tests of the flow-SDE step (`nabla_gfn.flow_schedule`): the step against diffusers'
`FlowMatchEulerDiscreteScheduler` and an Euler–Maruyama reference written out here, and the derivation's
identities that test_nabla_gfn.py checks for DDIM(η=1), parametrised over both schedules.

Oracles: diffusers' own Euler step; the reverse SDE dx = [v − σ_t²/2 ∇log p_t] dt + σ_t dW̄ stepped by hand
with the *exact* velocity and score of a Gaussian mixture (gmm.py, independent of the step's algebra);
closed-form linear-Gaussian chains; torch.autograd and torch.distributions.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

import gmm
from nabla_gfn import (LossConfig, affine, ddim_schedule, flow_schedule, forward_looking_score, forward_residual,
                       gaussian_log_prob, lean_adjoint, nabla_db_loss, sample_trajectory, zero_output_layer)
from test_nabla_gfn import (F64, IMAGE_SHAPE, SD_SCHEDULER_CONFIG, CentreReward, TinyNet, assert_parametrisations_agree,
                            constant_reward, grad_of, rows, sample_batch, smooth_reward, x0_parametrised)

NUM_STEPS = 7
SQRT2 = math.sqrt(2)


@pytest.fixture(autouse=True)
def _one_thread_and_seed(one_torch_thread):
    torch.manual_seed(0)


def make_schedule(kind, num_steps=NUM_STEPS, noise_level=SQRT2, shift=1.0):
    if kind == "ddim":
        return ddim_schedule(DDIMScheduler(**SD_SCHEDULER_CONFIG), num_steps)
    return flow_schedule(FlowMatchEulerDiscreteScheduler(shift=shift), num_steps, noise_level)


def snr_alpha_bar(t):
    """The ᾱ of equal signal-to-noise ratio: ᾱ/(1 − ᾱ) = (1 − t)²/t²."""
    return (1 - t) ** 2 / ((1 - t) ** 2 + t**2)


def flow_time(timesteps):
    """t ∈ [0, 1] of the flow schedule's timesteps (t · 1000)."""
    return timesteps.to(F64) / 1000


def sigma_t(grid, i, a):
    """Flow-GRPO's σ_t = a √(t/(1 − t)), with 1 − t_1 for 1 − t at t = 1."""
    t = grid[i]
    return a * math.sqrt(t / (1 - (grid[1] if t == 1 else t)))


# ---------------------------------------------------------------------------------------------- the step


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("num_steps", [1, 7, 50])
def test_flow_step_at_vanishing_noise_is_the_schedulers_euler_step(num_steps, shift):
    """a → 0: μ = x + Δt v, diffusers' `FlowMatchEulerDiscreteScheduler.step`, its (shifted) grid and timesteps."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = flow_schedule(scheduler, num_steps, noise_level=1e-9)
    assert torch.equal(schedule.timesteps, scheduler.timesteps) and schedule.next_timesteps[-1] == 0
    assert torch.equal(schedule.next_timesteps[:-1], schedule.timesteps[1:])
    generator = torch.Generator().manual_seed(num_steps)
    for i, t in enumerate(scheduler.timesteps):
        x, v = torch.randn(2, 5, 2, generator=generator)
        expected = scheduler.step(v, t, x).prev_sample
        # float32 x, v through diffusers' float32 σ's vs float64 coefficients: a few eps32 of |x| + |v|
        torch.testing.assert_close(affine(schedule.mean_coef[i].expand(5, 2), x, v), expected, rtol=1e-5, atol=1e-5)
    assert schedule.sigma.max() < 1e-7


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0, SQRT2])
def test_flow_step_is_the_euler_maruyama_step_of_the_reverse_sde(noise_level, shift):
    """x' = x + [v − σ_t²/2 ∇log p_t(x)] Δt + σ_t √|Δt| z with the exact v and ∇log p_t of a Gaussian mixture."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    schedule = flow_schedule(scheduler, 20, noise_level)
    grid, prior = scheduler.sigmas.to(F64), gmm.parse_prior("ring8")
    generator = torch.Generator().manual_seed(0)
    for i in range(20):
        t, dt = grid[i], grid[i + 1] - grid[i]
        x, z = 2 * torch.randn(2, 64, 2, generator=generator, dtype=F64)
        v = gmm.exact_velocity(prior, x, t)
        score = prior.score(x, snr_alpha_bar(t).expand(64), "flow")
        s_t = sigma_t(grid, i, noise_level)
        expected = x + (v - s_t**2 / 2 * score) * dt + s_t * (-dt).sqrt() * z
        got = affine(schedule.mean_coef[i].expand(64, 2), x, v) + schedule.sigma[i].to(F64) * z
        # StepSchedule keeps σ in float32 (relative 6e-8) and the grid is float32: ~1e-7 of |σ z| ≲ 10
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=2e-6, msg=f"step {i}")
        torch.testing.assert_close(schedule.sigma[i].double(), s_t * (-dt).sqrt(), rtol=1e-6, atol=0)


def test_flow_schedule_rejects_a_noise_level_that_is_not_positive():
    with pytest.raises(ValueError, match="noise_level"):
        flow_schedule(FlowMatchEulerDiscreteScheduler(), 10, 0.0)


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_x0_coefficients_invert_the_forward_path(kind):
    """x̂_0 = c x + d out recovers x_0 from x_τ and the exact output (ε, or v = ε − x_0 on x_t = (1 − t) x_0 + t ε)
    at τ_i (x0_coef) and at τ'_i (x0_coef_next); the flow's ᾱ has the path's signal-to-noise ratio."""
    schedule = make_schedule(kind, shift=3.0)
    x0, eps = torch.randn(2, NUM_STEPS, *IMAGE_SHAPE, dtype=F64)
    for timesteps, alpha_bar, coef in ((schedule.timesteps, schedule.alpha_bar, schedule.x0_coef),
                                       (schedule.next_timesteps, schedule.alpha_bar_next, schedule.x0_coef_next)):
        if kind == "ddim":
            a = alpha_bar.to(F64)
            x_t, out = rows(a.sqrt(), x0) * x0 + rows((1 - a).sqrt(), x0) * eps, eps
        else:
            t = flow_time(timesteps)
            x_t, out = rows(1 - t, x0) * x0 + rows(t, x0) * eps, eps - x0
            torch.testing.assert_close(alpha_bar.to(F64), snr_alpha_bar(t), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(affine(coef, x_t, out), x0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_gaussian_log_prob_and_forward_residual_of_the_step(kind):
    """log P_F(x'|x) = log N(x'; μ, σ²) (torch.distributions) on sampled transitions, and δ = (μ_θ − μ♯)/σ² is
    ∇_{x'} of the log-ratio by autograd, down to the flow step's last, smallest σ."""
    schedule = make_schedule(kind)
    policy, reference = TinyNet(seed=1), TinyNet(seed=2)
    batch = sample_batch(policy, schedule, batch_size=6, fraction=1.0)
    mean_p = affine(batch.mean_coef, batch.x, policy(batch.x, batch.t, batch.traj))
    mean_r = affine(batch.mean_coef, batch.x, reference(batch.x, batch.t, batch.traj))
    normal = lambda mean: Normal(mean, rows(batch.sigma.to(F64), mean))
    torch.testing.assert_close(gaussian_log_prob(batch.x_next, mean_p, batch.sigma),
                               normal(mean_p).log_prob(batch.x_next).sum(1))
    auto = grad_of(lambda x_: normal(mean_p).log_prob(x_).sum(1) - normal(mean_r).log_prob(x_).sum(1), batch.x_next)
    torch.testing.assert_close(forward_residual(mean_p, mean_r, batch.sigma), auto, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------- the lean adjoint


class GaussianVelocity:
    """The exact velocity of Gaussian data N(m, s² I) on x_t = (1 − t) x_0 + t ε: with V = (1 − t)² s² + t²,
    E[ε | x] − E[x_0 | x] = (t − (1 − t) s²)/V · (x − (1 − t) m) − m: affine in x, slope k_t."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def slope(self, t):
        return (t - (1 - t) * self.std**2) / ((1 - t) ** 2 * self.std**2 + t**2)

    def __call__(self, x, timesteps, traj):
        t = rows(flow_time(timesteps), x)
        return self.slope(t) * (x - (1 - t) * self.mean) - self.mean


@pytest.mark.parametrize("noise_level", [0.7, SQRT2])
@pytest.mark.parametrize("num_steps", [1, 7, 50])
@pytest.mark.parametrize("shape", [(2,), IMAGE_SHAPE])
def test_lean_adjoint_is_the_exact_flow_of_a_linear_gaussian_flow_chain(num_steps, shape, noise_level):
    """With the exact Gaussian velocity the chain is x' = A_i x + c_i + σ_i z, A_i = a_i + b_i k_{t_i}; for
    r = w·x_0, log F̃(x_i) = β w·E[x_0 | x_i] + const, so ∇log F̃(x_i) = β (A_{T−1} ⋯ A_i) w on every path."""
    schedule = make_schedule("flow", num_steps, noise_level, shift=3.0)
    generator = torch.Generator().manual_seed(num_steps)
    m, w, beta = torch.randn(2, *shape, generator=generator, dtype=F64).unbind(0) + (1.3,)
    model = GaussianVelocity(m, 0.7)
    trajectory = sample_trajectory(TinyNet(shape, seed=1), schedule, torch.randn(3, *shape, dtype=F64), generator)
    adjoint, _ = lean_adjoint(model, schedule, trajectory, lambda x0, traj: (x0 * w).flatten(1).sum(1), beta)
    t = flow_time(schedule.timesteps)
    A = schedule.mean_coef[:, 0] + schedule.mean_coef[:, 1] * model.slope(t)
    k = torch.cat([A.flip(0).cumprod(0).flip(0), torch.ones(1, dtype=F64)])  # (T+1,) ∏_{j ≥ i} A_j
    expected = beta * k.reshape(1, -1, *([1] * len(shape))) * w
    torch.testing.assert_close(adjoint, expected.expand_as(adjoint), rtol=1e-10, atol=1e-12)


def test_memoryless_chain_converges_to_the_paths_own_flow():
    """At a = √2 the SDE's forward kernel is the path's N((1 − t) x_0, t² I), so as Δt → 0 the chain's
    ∇log F̃(x_t) tends to β w (1 − t) s²/V_t (the slope of E[x_0 | x_t] on the path); the Euler–Maruyama
    error is first order: 8× more steps, ≳ 4× smaller (measured 7.6×); a = 0.7 converges elsewhere."""
    errors = {}
    for a, num_steps in ((SQRT2, 50), (SQRT2, 400), (0.7, 400)):
        schedule = make_schedule("flow", num_steps, a)
        model, t = GaussianVelocity(torch.zeros(1, dtype=F64), 0.7), flow_time(schedule.timesteps)
        A = schedule.mean_coef[:, 0] + schedule.mean_coef[:, 1] * model.slope(t)
        chain = A.flip(0).cumprod(0).flip(0)
        path = (1 - t) * 0.49 / ((1 - t) ** 2 * 0.49 + t**2)
        errors[a, num_steps] = float((chain - path).abs().max())
    assert errors[SQRT2, 400] < errors[SQRT2, 50] / 4 and errors[SQRT2, 400] < 0.01, errors
    assert errors[0.7, 400] > 0.05, errors


# ---------------------------------------------------------------------------------------------- the loss on both schedules


@pytest.mark.parametrize("kind", ["ddim", "flow"])
@pytest.mark.parametrize("use_flow", [True, False])
def test_loss_is_exactly_zero_at_the_reference_with_constant_reward(kind, use_flow):
    schedule = make_schedule(kind)
    policy = TinyNet(seed=1)
    reference, flow = TinyNet(seed=1), zero_output_layer(TinyNet(seed=2))
    batch = sample_batch(policy, schedule)
    cfg = LossConfig(beta=3.0, trust_region=5.0, weighting="kl", use_flow=use_flow, flow_target="bootstrap")
    loss, parts = nabla_db_loss(batch, policy, reference, constant_reward, flow, cfg)
    assert loss.item() == 0.0, parts
    with torch.no_grad():
        policy.net[2].bias.add_(0.01)
    loss, parts = nabla_db_loss(batch, policy, reference, constant_reward, flow, cfg)
    assert parts["forward"] > 0 and parts["trust_region"] > 0 and (parts["reverse"] > 0) == use_flow


@pytest.mark.parametrize("gamma", ["alpha_bar", "sqrt_alpha_bar"])
def test_forward_looking_score_of_a_velocity_model(gamma):
    """β γ_t ∇_x r(x − t v(x)), γ = ᾱ or √ᾱ at the equal-SNR ᾱ, by autograd with t read off the timesteps."""
    schedule, policy = make_schedule("flow"), TinyNet(seed=1)
    x, traj = torch.randn(NUM_STEPS, 2, dtype=F64), torch.zeros(NUM_STEPS, dtype=torch.long)
    t = flow_time(schedule.timesteps)
    guess, _ = forward_looking_score(policy, smooth_reward, x, schedule.timesteps, schedule.alpha_bar, traj, 1.5, gamma,
                                     schedule.x0_coef)
    auto = grad_of(lambda x_: smooth_reward(x_ - rows(t, x_) * policy(x_, schedule.timesteps, traj), traj), x)
    gamma_t = snr_alpha_bar(t) if gamma == "alpha_bar" else snr_alpha_bar(t).sqrt()
    torch.testing.assert_close(guess, 1.5 * rows(gamma_t, x) * auto, rtol=1e-6, atol=1e-8)  # ᾱ is float32


class X0FromVelocity:
    """The velocity model re-expressed as an x̂_0-predictor, x̂_0 = x − t v, with the schedule's own t (its float64
    grid: t read back from the float32 timesteps differs by ~1e-8, which the comparison below would see)."""

    def __init__(self, velocity, schedule):
        self.velocity, self.schedule = velocity, schedule

    def __call__(self, x, timesteps, traj):
        step = (self.schedule.timesteps[None, :] == timesteps[:, None]).long().argmax(1)
        return x + rows(self.schedule.x0_coef[step, 1], x) * self.velocity(x, timesteps, traj)


@pytest.mark.parametrize("use_flow, flow_target", [(True, "bootstrap"), (True, "adjoint"), (False, "adjoint")])
def test_flow_sampler_adjoint_and_loss_do_not_depend_on_the_output_parametrisation(use_flow, flow_target):
    """Velocity models on `flow_schedule` and the same models as x̂_0-predictors (`x0_parametrised`): same
    trajectories, lean adjoint, loss parts and gradients. A path that read the output as ε̂ would fail by O(1)."""
    B, beta = 4, 1.5
    schedule = make_schedule("flow", shift=3.0)
    policy, reference, flow, sampler = (TinyNet(num_traj=B, seed=s) for s in (1, 2, 3, 0))
    reward = CentreReward(torch.randn(B, 2, dtype=F64))
    cfg = LossConfig(beta=beta, gamma="sqrt_alpha_bar", weighting="kl", use_flow=use_flow, guess_from="reference",
                     flow_target=flow_target)
    variants = ((lambda m: m, schedule), (lambda m: X0FromVelocity(m, schedule), x0_parametrised(schedule)))
    assert_parametrisations_agree(variants, (policy, reference, flow, sampler), reward, cfg, B)
