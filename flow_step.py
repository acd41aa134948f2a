"""STAGING for nabla_gfn.py (issue 21): `flow_schedule` below moves verbatim into nabla_gfn.py's
"Schedule and Gaussian-step helpers" section, after `ddim_schedule`, once the loss branch has landed;
then this file goes and `from flow_step import flow_schedule` becomes `nabla_gfn.flow_schedule`."""

from __future__ import annotations

import math

import torch

from nabla_gfn import StepSchedule


def flow_schedule(scheduler, num_steps: int, noise_level: float = math.sqrt(2)) -> StepSchedule:
    """The flow-SDE step of a velocity model (Flow-GRPO's SDE; not in the paper) on the time grid of a
    diffusers `FlowMatchEulerDiscreteScheduler` (SD3's, its shift included), as affine coefficients.

    Path x_t = (1 − t) x_0 + t ε (t = 1 noise), out = v̂ ≈ E[ε − x_0 | x_t]: x̂_0 = x − t v̂, ε̂ = x + (1 − t) v̂
    and the score s = −ε̂/t. Reverse-time SDE with the ODE's marginals and diffusion σ_t, one
    Euler–Maruyama step Δt = t' − t < 0:  x' = x + [v̂ − σ_t²/2 · s] Δt + σ_t √|Δt| z, so

        μ = (1 + σ_t² Δt/(2t)) x + (1 + σ_t² (1 − t)/(2t)) Δt v̂,     std σ_t √|Δt|,     σ_t = a √(t/(1 − t)).

    a → 0 is the scheduler's Euler step; a = √2 is memoryless (σ_t² = 2t/(1 − t) makes the SDE's forward
    kernel the path's own N((1 − t) x_0, t² I), so x_1 ⟂ x_0 and the untilted start N(0, I) is exact).
    At t = 1, 1 − t in σ_t is 1 − t_1, the grid's second point (Flow-GRPO). `alpha_bar` is the ᾱ of equal
    signal-to-noise ratio, ᾱ/(1 − ᾱ) = (1 − t)²/t², so γ_τ means at t what it means for DDPM at that noise
    level (measured better on the toy than ᾱ = (1 − t)²); `timesteps` are the scheduler's floats t·1000.
    """
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 (the step needs σ > 0), got {noise_level}")
    scheduler.set_timesteps(num_steps)
    grid = scheduler.sigmas.double().cpu()  # (T+1,) t_0 = 1 (shifted, if so configured) … t_T = 0
    t, t_next = grid[:-1], grid[1:]
    dt = t_next - t
    sigma_t = noise_level * (t / (1 - torch.where(t == 1, grid[1], t))).sqrt()
    drift = sigma_t**2 / (2 * t)  # −σ_t²/2 · s = σ_t²/(2t) · (x + (1 − t) v̂)
    mean_coef = torch.stack([1 + drift * dt, (1 + drift * (1 - t)) * dt], -1)
    # x̂_0 = x − t v̂ at x (t) and at x' (t')
    x0_coef, x0_coef_next = (torch.stack([torch.ones_like(s), -s], -1) for s in (t, t_next))
    alpha_bar = lambda s: ((1 - s) ** 2 / ((1 - s) ** 2 + s**2)).float()
    timesteps = scheduler.timesteps.float().cpu()  # t · num_train_timesteps, what the model is fed
    return StepSchedule(timesteps=timesteps, next_timesteps=torch.cat([timesteps[1:], timesteps.new_zeros(1)]),
                        alpha_bar=alpha_bar(t), alpha_bar_next=alpha_bar(t_next),
                        sigma=(sigma_t * dt.abs().sqrt()).float(), mean_coef=mean_coef, x0_coef=x0_coef,
                        x0_coef_next=x0_coef_next)
