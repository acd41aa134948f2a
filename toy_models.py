"""Rung 1's two model families (`python toy_2d.py --model ddpm|flow`): what differs between them, in one place.

    ddpm   x_τ = √ᾱ x_0 + √(1−ᾱ) ε, τ ∈ {0, …, 999};  the network predicts ε;      sampler: DDIM(η=1) on
           Stable Diffusion v1.5's schedule (`nabla_gfn.ddim_schedule`)
    flow   x_t = (1 − t) x_0 + t ε, t ∈ [0, 1], fed as τ = 1000 t (SD3's convention: t = 1 is noise);
           the network predicts v = ε − x_0 (rectified flow);  sampler: the flow SDE at noise level a
           (`nabla_gfn.flow_schedule`; a = √2 is memoryless), on diffusers' FlowMatchEulerDiscreteScheduler grid

Both samplers are Gaussian steps affine in the state and the network's output (`nabla_gfn.StepSchedule`),
so the loss, the lean adjoint and the metrics are shared. Measurements: docs/flow_matching.md.
"""

from __future__ import annotations

from typing import Tuple

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor

import nabla_gfn as ng

MODELS = ("ddpm", "flow")


def sd_scheduler() -> DDIMScheduler:
    """A DDIMScheduler with Stable Diffusion v1.5's config (scaled-linear betas, 1000 steps)."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Rectified flow's uniform grid t = 1 → 0 (shift 1: SD3 shifts by 3 for its resolution; the toy has none)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def make_sampler(model: str, num_steps: int, noise_level: float):
    """(diffusers scheduler, the sampler's StepSchedule) of a model family."""
    if model == "flow":
        scheduler = flow_scheduler()
        return scheduler, ng.flow_schedule(scheduler, num_steps, noise_level)
    scheduler = sd_scheduler()
    return scheduler, ng.ddim_schedule(scheduler, num_steps)


def training_pair(model: str, scheduler, x0: Tensor, gen: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    """One pretraining regression (x_τ, τ, target): ε for ddpm (denoising score matching, τ uniform over the
    scheduler's 1000 steps), ε − x_0 for flow (rectified flow, t ~ U(0, 1)). (N, D), (N,), (N, D)."""
    if model == "flow":
        t, eps = torch.rand(len(x0), 1, generator=gen), torch.randn(x0.shape, generator=gen)
        return (1 - t) * x0 + t * eps, 1000 * t[:, 0], eps - x0
    alphas_cumprod = scheduler.alphas_cumprod.float()
    tau = torch.randint(0, len(alphas_cumprod), (len(x0),), generator=gen)
    eps, a = torch.randn(x0.shape, generator=gen), alphas_cumprod[tau][:, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, tau, eps
