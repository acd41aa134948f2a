"""∇-GFlowNet: residual ∇-DB with a forward-looking flow, as pure functions.

Paper: Liu, Xiao, Liu, Bengio, Zhang, "Efficient Diversity-Preserving Diffusion Alignment via
Gradient-Informed GFlowNets", ICLR 2025, arXiv:2412.07775. Equation numbers are the paper's.

Goal: finetune a pretrained sampler P_F^♯, diffusion (ε-prediction) or flow matching (velocity), both one Gaussian
step affine in the model's output (`StepSchedule`), into P_F^θ sampling the tilted target p*(x_0) ∝ p^♯(x_0)
R(x_0)^β = p^♯(x_0) exp(β r(x_0)), r = log R (reweight, do not collapse).

Derivation. Detailed balance of the finetuned and of the pretrained model, divided, with the residual
flow F̃ = F / F^♯:  F̃(x) P_F^θ(x'|x) / P_F^♯(x'|x) = F̃(x'),  F̃(x_0) = R(x_0)^β. ∇ of the log in x'
and in x removes the flow at the other state and every normaliser:

    forward ∇-DB:  ∇_{x'}[log P_F^θ − log P_F^♯](x'|x) =  ∇ log F̃(x')          (eqs. 9/10)
    reverse ∇-DB:  ∇_x  [log P_F^θ − log P_F^♯](x'|x) = −∇ log F̃(x)           (eq. 11)
    terminal:      ∇ log F̃(x_0) = β ∇r(x_0)
    flow:          ∇ log F̃(x) = β γ_τ ∇_x r(x̂_0(x)) + g_φ(x, τ),  g_φ(x_0) = 0  (eq. 12)

The paper fits g_φ by bootstrapping (L_B, L_F: a TD(0) chain of T links). The reverse condition
solved along each trajectory is the lean adjoint a_i ≈ ∇ log F̃(x_i) (`lean_adjoint`); `flow_target`
"adjoint" fits g_φ to it, "mixed" blends (TD(λ)-like); with no g_φ, "adjoint" is adjoint matching.

Notation (code name → paper symbol). Time runs as in diffusers, from noise x_T (step 0) to the clean
x_0 (step T); the paper's x_0 is the noise.

    x, x_next; t, t_next   x_t, x_{t+1} (noisier, cleaner); their timesteps τ, τ'
    alpha_bar; sigma       ᾱ_τ (diffusers `alphas_cumprod`); σ_τ, std of P_F(x'|x) = N(x'; μ(x), σ² I)
    eps (out)              the model's output (ε̂; v̂ for velocity models); policy_eps ε̂_θ, reference_eps ε̂^♯
    mean_coef, x0_coef     (a, b), (c, d) in μ = a x + b out, x̂_0 = c x + d out (`StepSchedule`)
    log_reward; beta       r = log R; β
    gamma; flow            γ_τ, damping of the forward-looking guess; g_φ(x, τ)
    residual               δ = (μ_θ(x) − μ^♯(x))/σ² = ∇_{x'}[log P_F^θ − log P_F^♯](x'|x)
    trust_region           λ, weight of ‖ε̂_θ − ε̂_old‖² (the paper's λ; not adjoint_lambda)
    step; adjoint          i with x = x_i, x' = x_{i+1}; a_i, the lean adjoint (not in the paper)

Callables (`traj` names each row's trajectory: a driver conditions the row with `cond[traj]`):
    eps_fn(x, t, traj) -> out     x: (N, *S), t: (N,) timesteps (long; flow: float), traj: (N,) long
    log_reward(x0, traj) -> r     x0: (N, *S), r: (N,)
    flow(x, t, traj) -> g         g: (N, *S)

Implemented: the steps of diffusers' DDIMScheduler (ε-prediction, DDIM(η=1): `ddim_schedule`) and
FlowMatchEulerDiscreteScheduler (velocity, the flow SDE, not in the paper: `flow_schedule`); sampling, subsampling,
the forward-looking guess, the lean adjoint, the loss with its no-flow variant, three weightings, two guess sources,
three flow targets, the antithetic control variate. Not implemented: model loading, optimisers, logging (the rungs);
other samplers; other parametrisations (x_0-, v-prediction: each a `StepSchedule` constructor). Deliberate
differences from the official code: g_φ's output layer is zero-initialised in weights *and* bias (official: bias
only); subsampling works for any step count and fraction (official: asserts divisibility); every callable receives
`traj` (official: the reward saw the last batch's prompts). Options not in the paper (defaults are the paper's):
`weighting` "kl"/"kl-shift", `guess_from` "reference", `flow_target` "adjoint"/"mixed", `control_variate`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]
LogRewardFn = Callable[[Tensor, Tensor], Tensor]
FlowFn = Callable[[Tensor, Tensor, Tensor], Tensor]


# ---- Schedule and Gaussian-step helpers -----------------------------------------------------------


def _per_row(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-row vector (N,) to broadcast against `like` (N, *S), in like's dtype."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def affine(coef: Tensor, x: Tensor, out: Tensor) -> Tensor:
    """coef[:, 0] x + coef[:, 1] out, row by row: a step mean or x̂_0. coef (N, 2); x, out (N, *S)."""
    return _per_row(coef[:, 0], x) * x + _per_row(coef[:, 1], x) * out


def ddim_x0_coef(alpha_bar: Tensor) -> Tensor:
    """(c, d) of x̂_0 = (x − √(1−ᾱ) ε̂)/√ᾱ (Tweedie's formula for ε-models). (N,) → (N, 2) float64."""
    a = alpha_bar.double()
    return torch.stack([1 / a.sqrt(), -(1 - a).sqrt() / a.sqrt()], -1)


def ddim_coefficients(alpha_bar: Tensor, alpha_bar_next: Tensor, sigma: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """DDIM(η=1) with ε-prediction (DDIM paper eq. 12 with η = 1: the DDPM posterior mean) as affine
    coefficients (mean_coef, x0_coef, x0_coef_next), (N, 2) each, computed in float64."""
    x0_coef, a_next = ddim_x0_coef(alpha_bar), alpha_bar_next.double()
    # μ = √ᾱ' x̂_0 + √(1 − ᾱ' − σ²) ε̂ = √ᾱ' c x + (√ᾱ' d + √(1 − ᾱ' − σ²)) ε̂, with x̂_0 = c x + d ε̂
    noise_coef = (1 - a_next - sigma.double() ** 2).clamp(min=0).sqrt()
    mean_coef = torch.stack([a_next.sqrt() * x0_coef[:, 0], a_next.sqrt() * x0_coef[:, 1] + noise_coef], -1)
    return mean_coef, x0_coef, ddim_x0_coef(alpha_bar_next)  # x̂_0 at x' uses ᾱ'


def _fill_ddim_coefficients(obj) -> None:
    """Coefficients left as None (StepSchedule, Transitions) default to DDIM(η=1) with ε-prediction."""
    if obj.mean_coef is None:
        for name, value in zip(("mean_coef", "x0_coef", "x0_coef_next"),
                               ddim_coefficients(obj.alpha_bar, obj.alpha_bar_next, obj.sigma)):
            object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class StepSchedule:
    """Per-step constants of a T-step Gaussian sampler P_F(x'|x) = N(x'; μ(x), σ² I), step i: τ_i → τ'_i.

    μ = a x + b out and x̂_0 = c x + d out are affine in the state and the model's output, so nothing
    downstream knows the parametrisation: each is a constructor filling the coefficients (`ddim_schedule`,
    ε-prediction: the default when they are None; `flow_schedule`, velocity).
    timesteps        (T,) τ_i, decreasing (noisy → clean): long; flow: floats, the scheduler's 1000·t
    next_timesteps   (T,) τ'_i = τ_{i+1}; 0 labels the clean sample after the last step
    alpha_bar(_next) (T,) ᾱ at τ_i (sets γ_τ) and at τ'_i (`final_alpha_cumprod` after the last step);
                     flow: the equal-SNR ᾱ = (1 − t)²/((1 − t)² + t²)
    sigma            (T,) σ_i; DDIM η = 1: √((1−ᾱ')/(1−ᾱ) · (1 − ᾱ/ᾱ')), the DDPM posterior std
    mean_coef, x0_coef(_next)  (T, 2) float64: (a, b) of μ(x); (c, d) of x̂_0(x), and of x̂_0(x') for the guess at x'
    """

    timesteps: Tensor
    next_timesteps: Tensor
    alpha_bar: Tensor
    alpha_bar_next: Tensor
    sigma: Tensor
    mean_coef: Optional[Tensor] = None
    x0_coef: Optional[Tensor] = None
    x0_coef_next: Optional[Tensor] = None

    __post_init__ = _fill_ddim_coefficients
    num_steps = property(lambda self: int(self.timesteps.shape[0]))
    to = lambda self, device: StepSchedule(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def ddim_schedule(scheduler, num_steps: int) -> StepSchedule:
    """The DDIM(η=1) ε-prediction schedule of a diffusers `DDIMScheduler`, from its public state only.

    The previous timestep is τ − num_train_timesteps // num_steps, as in `DDIMScheduler.step`, so the sampler
    reproduces `scheduler.step(..., eta=1.0)` (tested). Sets the scheduler's own timesteps."""
    cfg = scheduler.config
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"only epsilon-prediction schedulers are supported, got {cfg.prediction_type!r}")
    if cfg.get("clip_sample", False) or cfg.get("thresholding", False):
        raise ValueError("clip_sample/thresholding make the step non-Gaussian; disable them in the scheduler config")
    scheduler.set_timesteps(num_steps)
    timesteps, alphas_cumprod = scheduler.timesteps.long().cpu(), scheduler.alphas_cumprod.double().cpu()
    prev = timesteps - cfg.num_train_timesteps // num_steps
    alpha_bar = alphas_cumprod[timesteps]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)  # ᾱ' after the last step
    alpha_bar_next = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
    # σ² = (1−ᾱ')/(1−ᾱ) · (1 − ᾱ/ᾱ'): the DDPM posterior variance
    variance = (1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)
    return StepSchedule(timesteps=timesteps, next_timesteps=prev.clamp(min=0), alpha_bar=alpha_bar.float(),
                        alpha_bar_next=alpha_bar_next.float(), sigma=variance.clamp(min=0).sqrt().float())


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


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """ε̂ = ε_u + w (ε_c − ε_u). Defines both P_F^θ and P_F^♯ when guidance is on."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def x0_prediction(x: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """x̂_0 = (x − √(1−ᾱ) ε̂)/√ᾱ for ε-models. x, eps: (N, *S); alpha_bar: (N,). Differentiable."""
    return affine(ddim_x0_coef(alpha_bar), x, eps)


def step_mean(x: Tensor, eps: Tensor, alpha_bar: Tensor, alpha_bar_next: Tensor, sigma: Tensor) -> Tensor:
    """μ(x) of the DDIM(η=1) step for ε-models, μ = √ᾱ' x̂_0 + √(1 − ᾱ' − σ²) ε̂. Schedule terms (N,)."""
    return affine(ddim_coefficients(alpha_bar, alpha_bar_next, sigma)[0], x, eps)


def gaussian_log_prob(x_next: Tensor, mean: Tensor, sigma: Tensor) -> Tensor:
    """log N(x'; μ, σ² I), summed over all but the batch dimension. Returns (N,)."""
    d = x_next[0].numel()
    sq = ((x_next - mean) / _per_row(sigma, x_next)).pow(2).flatten(1).sum(1)
    return -0.5 * sq - d * torch.log(sigma.to(x_next.dtype)) - 0.5 * d * math.log(2 * math.pi)


GAMMAS = {"alpha_bar": lambda a: a, "sqrt_alpha_bar": torch.sqrt}
GAMMA_CHOICES = tuple(GAMMAS)


def gamma_weight(alpha_bar: Tensor, kind: str = "alpha_bar") -> Tensor:
    """γ_τ, the damping of the forward-looking guess at high noise (eq. 12; the text leaves it open):
    "alpha_bar" (γ = ᾱ_τ, the official code's default) or "sqrt_alpha_bar" (γ = √ᾱ_τ)."""
    if kind not in GAMMAS:
        raise ValueError(f"gamma must be one of {GAMMA_CHOICES}, got {kind!r}")
    return GAMMAS[kind](alpha_bar)


# ---- Sampling trajectories and choosing transitions -----------------------------------------------


@dataclass
class Trajectory:
    """B sampled chains. states: (B, T+1, *S) from x_T to x_0; eps: (B, T, *S), the outputs ε̂_old used."""

    states: Tensor
    eps: Tensor

    final = property(lambda self: self.states[:, -1])  # (B, *S) the clean samples x_0


@torch.no_grad()
def sample_trajectory(eps_fn: EpsFn, schedule: StepSchedule, x_T: Tensor, generator: Optional[torch.Generator] = None) -> Trajectory:
    """Run x' = μ(x) + σ z, z ~ N(0, I), for all T steps from x_T (B, *S), without gradients, recording
    every state and model output (the trust region's old policy). eps_fn gets traj = arange(B)."""
    B, sched = x_T.shape[0], schedule.to(x_T.device)
    traj, x, states, outs = torch.arange(B, device=x_T.device), x_T, [x_T], []
    for i in range(schedule.num_steps):
        out = eps_fn(x, sched.timesteps[i].expand(B), traj)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # x' = a x + b out + σ z
        x = affine(sched.mean_coef[i].expand(B, 2), x, out) + sched.sigma[i].to(x) * noise
        states.append(x)
        outs.append(out)
    return Trajectory(states=torch.stack(states, 1), eps=torch.stack(outs, 1))


def subsample_steps(num_steps: int, fraction: float, batch_size: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Low-variance choice of transitions to train on, per trajectory. Returns (B, K) step indices. The terminal
    step T−1 is always included (its target β∇r(x_0) is exact). The other T−1 steps are cut into
    n = max(1, round(fraction · (T−1))) contiguous chunks of (nearly) equal size, and one step is drawn uniformly
    from each, per trajectory (fraction 1: every step; 0: the terminal only)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    terminal = torch.full((batch_size, 1), num_steps - 1, dtype=torch.long)
    others = num_steps - 1
    if others == 0 or fraction == 0.0:
        return terminal
    n = min(others, max(1, round(fraction * others)))
    edges = torch.linspace(0, others, n + 1).floor().long()  # chunk j = [edges[j], edges[j+1])
    width = (edges[1:] - edges[:-1]).clamp(min=1)
    u = torch.rand(batch_size, n, generator=generator)
    picks = edges[:-1] + (u * width).floor().long().clamp(max=width - 1)
    return torch.cat([picks, terminal], 1)


@dataclass
class Transitions:
    """A flat batch of N transitions (x, τ) → (x', τ') gathered from trajectories."""

    x: Tensor  # (N, *S) noisier state
    x_next: Tensor  # (N, *S) cleaner state
    t: Tensor  # (N,) timestep of x
    t_next: Tensor  # (N,) timestep of x_next (0 for the clean sample)
    alpha_bar: Tensor  # (N,)
    alpha_bar_next: Tensor  # (N,)
    sigma: Tensor  # (N,)
    eps_old: Tensor  # (N, *S) model output recorded at sampling time
    is_terminal: Tensor  # (N,) bool, x_next is the final sample x_0
    traj: Tensor  # (N,) long, index of the trajectory in the sampling batch
    step: Tensor  # (N,) long, step index i of x in its trajectory: x = states[traj, i]
    mean_coef: Optional[Tensor] = None  # (N, 2) as in StepSchedule; None: DDIM with ε-prediction
    x0_coef: Optional[Tensor] = None  # (N, 2)
    x0_coef_next: Optional[Tensor] = None  # (N, 2)

    __post_init__ = _fill_ddim_coefficients
    __len__ = lambda self: int(self.x.shape[0])
    select = lambda self, rows: Transitions(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def gather_transitions(trajectory: Trajectory, schedule: StepSchedule, steps: Tensor) -> Transitions:
    """Gather the transitions `steps` (B, K) of each trajectory into one flat batch of N = B·K."""
    (B, K), device = steps.shape, trajectory.states.device
    traj = torch.arange(B, device=device)[:, None].expand(B, K).reshape(-1)
    idx, sched = steps.to(device).reshape(-1), schedule.to(device)
    return Transitions(x=trajectory.states[traj, idx], x_next=trajectory.states[traj, idx + 1],
                       t=sched.timesteps[idx], t_next=sched.next_timesteps[idx],
                       alpha_bar=sched.alpha_bar[idx], alpha_bar_next=sched.alpha_bar_next[idx], sigma=sched.sigma[idx],
                       eps_old=trajectory.eps[traj, idx], is_terminal=idx == schedule.num_steps - 1, traj=traj, step=idx,
                       mean_coef=sched.mean_coef[idx], x0_coef=sched.x0_coef[idx], x0_coef_next=sched.x0_coef_next[idx])


# ---- Detailed-balance residuals and the forward-looking flow --------------------------------------


def forward_residual(mean_policy: Tensor, mean_reference: Tensor, sigma: Tensor) -> Tensor:
    """δ = ∇_{x'}[log P_F^θ(x'|x) − log P_F^♯(x'|x)], the left side of the forward ∇-DB (eq. 10).
    ∇_{x'} log N(x'; μ, σ²) = −(x' − μ)/σ²: for a shared σ, x' cancels. (N, *S) → (N, *S); gradient
    flows into both means (callers detach μ^♯)."""
    return (mean_policy - mean_reference) / _per_row(sigma, mean_policy) ** 2


def reward_gradient(log_reward: LogRewardFn, x0: Tensor, traj: Tensor) -> Tuple[Tensor, Tensor]:
    """∇r(x0) and r(x0) per row, detached: (N, *S) → ((N, *S), (N,)). The reward's graph (SD: decoder
    and reward model) is built and freed inside this call."""
    with torch.enable_grad():
        x0 = x0.detach().requires_grad_(True)
        r = log_reward(x0, traj)
        (grad,) = torch.autograd.grad(r.sum(), x0)
    return grad.detach(), r.detach()


def forward_looking_score(eps_fn: EpsFn, log_reward: LogRewardFn, x: Tensor, t: Tensor, alpha_bar: Tensor, traj: Tensor,
                          beta: float, gamma: str = "alpha_bar", x0_coef: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The forward-looking guess β γ_τ ∇_x r(x̂_0(x)) of ∇ log F̃(x) (eq. 12), detached.
    x̂_0 = c x + d eps_fn(x), x0_coef (N, 2) (default: DDIM ε-prediction's at alpha_bar). The gradient runs
    through the model to x, then is detached: a target, never a path for parameter gradients. x: (N, *S).
    Returns (guess (N, *S), r(x̂_0) (N,))."""
    x0_coef = ddim_x0_coef(alpha_bar) if x0_coef is None else x0_coef
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        x0_hat = affine(x0_coef, x, eps_fn(x, t, traj))
        r_grad, r_hat = reward_gradient(log_reward, x0_hat, traj)
        # ∇_x r(x̂_0(x)) = (∂x̂_0/∂x)ᵀ ∇r(x̂_0): one vector–Jacobian product through the model
        (score,) = torch.autograd.grad(x0_hat, x, grad_outputs=r_grad)
    return _per_row(beta * gamma_weight(alpha_bar, gamma), score) * score.detach(), r_hat


def guess_next(guess_eps: EpsFn, log_reward: LogRewardFn, batch: Transitions, beta: float, gamma: str) -> Tuple[Tensor, Tensor]:
    """target(x'), the detached estimate of ∇ log F̃(x') without g_φ: on terminal rows the exact
    β∇r(x_0) (γ = 1, no x̂_0), elsewhere the guess β γ_{τ'} ∇_{x'} r(x̂_0(x')) (eq. 12) of `guess_eps`.
    Returns (target (N, *S), r at x_0 or x̂_0(x') (N,))."""
    target, r_next = torch.zeros_like(batch.x_next), torch.zeros(len(batch), device=batch.x.device)
    term = batch.is_terminal
    if term.any():
        rows = batch.select(term)
        grad, r = reward_gradient(log_reward, rows.x_next, rows.traj)
        target[term], r_next[term] = beta * grad, r.to(r_next.dtype)
    if (~term).any():
        rows = batch.select(~term)
        guess, r = forward_looking_score(guess_eps, log_reward, rows.x_next, rows.t_next, rows.alpha_bar_next,
                                         rows.traj, beta, gamma, rows.x0_coef_next)
        target[~term], r_next[~term] = guess, r.to(r_next.dtype)
    return target, r_next


# ---- The reverse condition solved along the trajectory: the lean adjoint --------------------------


def _step_mean_vjp(eps_fn: EpsFn, schedule: StepSchedule, i: int, x: Tensor, traj: Tensor, v: Tensor) -> Tensor:
    """J(x)ᵀ v with J = ∂μ(x)/∂x the Jacobian of step i's mean: one VJP through the model. (N, *S)."""
    t, mean_coef = schedule.timesteps[i].to(x.device), schedule.mean_coef[i].to(x.device)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        mean = affine(mean_coef.expand(len(x), 2), x, eps_fn(x, t.expand(len(x)), traj))
        (vjp,) = torch.autograd.grad(mean, x, grad_outputs=v.to(mean.dtype))
    return vjp.detach()


def lean_adjoint(reference_eps: EpsFn, schedule: StepSchedule, trajectory: Trajectory, log_reward: LogRewardFn, beta: float,
                 traj: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Monte-Carlo estimates a_i of ∇ log F̃(x_i) along each sampled trajectory (not in the paper).

    Residual DB summed over x': F̃(x) = E_{P_F^♯(x'|x)}[F̃(x')]. With x' = μ^♯(x) + σ ξ (σ free of x),
    J^♯ = ∂μ^♯/∂x and P* = P_F^♯ F̃(x')/F̃(x) the optimal policy, ∇ log F̃(x) = E_{P*}[J^♯(x)ᵀ ∇ log F̃(x')]:
    the reverse ∇-DB in expectation. Unrolled from the terminal condition:

        a_T = β ∇r(x_0),        a_i = J^♯(x_i)ᵀ a_{i+1},        i = T−1, …, 0.

    E[a_i | x_i] = ∇ log F̃(x_i) along paths of P* (induction on i); along the policy's it is biased (early on
    it averages ∇r over pretrained continuations), a bias that vanishes as the policy nears P*; it is
    heavy-tailed (a product of Jacobians). Adjoint Matching's recursion (Domingo-Enrich et al., ICLR 2025); the
    paper's L_B is its one-link bootstrap. `reference_eps` defines J^♯: the guided reference (exact for the
    guided target) or the unguided one (Adjoint Matching's choice). trajectory.states: (B, T+1, *S); traj: (B,)
    ids for the callables (default arange(B)). Returns (adjoint (B, T+1, *S), r(x_0) (B,)), detached: one VJP
    through the frozen step mean per step, no graph across steps, no parameter gradient."""
    states = trajectory.states
    traj = torch.arange(states.shape[0], device=states.device) if traj is None else traj
    reward_grad, r0 = reward_gradient(log_reward, trajectory.final, traj)
    # a_T = β ∇r(x_0)
    adjoints = [beta * reward_grad.to(states.dtype)]
    for i in reversed(range(schedule.num_steps)):
        # a_i = J^♯(x_i)ᵀ a_{i+1}
        adjoints.append(_step_mean_vjp(reference_eps, schedule, i, states[:, i], traj, adjoints[-1]))
    return torch.stack(adjoints[::-1], 1), r0


def adjoint_rows(adjoint: Tensor, batch: Transitions, offset: int) -> Tensor:
    """a_{i+offset} of each transition from adjoint (B, T+1, *S): offset 1 at x', 0 at x. (N, *S)."""
    return adjoint[batch.traj, batch.step + offset].to(batch.x.dtype)


# ---- The residual ∇-DB loss -----------------------------------------------------------------------


TRANSITION_WEIGHTS = {"plain": lambda sigma: (torch.ones_like(sigma), torch.ones_like(sigma)),
                      "kl": lambda sigma: (sigma**2, sigma**2), "kl-shift": lambda sigma: (sigma**2, sigma**4)}
WEIGHTING_CHOICES = tuple(TRANSITION_WEIGHTS)
GUESS_CHOICES = ("policy", "reference")  # whose x̂_0 the guess uses: ε̂_θ (paper) or ε̂^♯


def transition_weights(sigma: Tensor, weighting: str) -> Tuple[Tensor, Tensor]:
    """Per-transition weights (w_θ, w_φ) of the residuals that train θ and g_φ, from sigma (N,):
    "plain"     (1, 1): the paper's unweighted residuals.
    "kl"        (σ², σ²): σ² ‖(μ_θ − μ^♯)/σ² − s‖² = ‖μ_θ − (μ^♯ + σ² s)‖²/σ² = 2 KL(P_F^θ ‖ N(μ^♯ + σ² s, σ²)):
                same minimiser, but high-noise (mode-choosing) steps are no longer down-weighted.
    "kl-shift"  (σ², σ⁴): θ as in "kl"; g_φ's residuals as the mean shift they imply, ‖σ² δ‖². At low noise a
                tiny error in μ_θ is a huge one in its score, g_φ's bootstrapped target; σ⁴ keeps these
                1/σ²-amplified errors from dominating g_φ's loss (README: measured on the toy)."""
    if weighting not in TRANSITION_WEIGHTS:
        raise ValueError(f"weighting must be one of {WEIGHTING_CHOICES}, got {weighting!r}")
    return TRANSITION_WEIGHTS[weighting](sigma)


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the residual ∇-DB loss:
    beta, trust_region, reverse_weight   β (target p^♯ · R^β); λ of ‖ε̂_θ − ε̂_old‖²; w_B of L_B
    gamma           γ_τ: "alpha_bar" (official default) or "sqrt_alpha_bar" (`gamma_weight`)
    weighting       "plain" (paper), "kl" or "kl-shift" (`transition_weights`)
    use_flow        False: no g_φ, no L_B, no control variate; θ fits the guess alone ("no flow", flow_target
                    "bootstrap") or a_{i+1} (adjoint matching, flow_target "adjoint")
    guess_from      whose x̂_0 the guess uses: "policy" (ε̂_θ, the paper) or "reference" (ε̂^♯: with "policy" the
                    guess shrinks as x̂_0 looks rewarded, and g_φ must make up the rest)
    flow_target     what g_φ fits (`FLOW_TARGETS`): "bootstrap" (the paper), "adjoint", "mixed"; the latter two
                    need `nabla_db_loss(..., adjoint=lean_adjoint(...))`
    adjoint_lambda  λ ∈ (0, 1] of "mixed" (1: L_B fits a_i alone)
    control_variate with g_φ ("adjoint" only): θ fits a_{i+1} with guess + g_φ as its antithetic control variate
                    (`antithetic_target`); False: θ fits guess + g_φ itself (the paper)"""

    beta: float = 1.0
    trust_region: float = 0.0
    reverse_weight: float = 1.0
    gamma: str = "alpha_bar"
    weighting: str = "plain"
    use_flow: bool = True
    guess_from: str = "policy"
    flow_target: str = "bootstrap"
    adjoint_lambda: float = 0.5
    control_variate: bool = False

    def __post_init__(self):
        menus = {"guess_from": GUESS_CHOICES, "gamma": GAMMA_CHOICES, "weighting": WEIGHTING_CHOICES, "flow_target": FLOW_TARGET_CHOICES}
        for name, choices in menus.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if not 0.0 < self.adjoint_lambda <= 1.0:
            raise ValueError(f"adjoint_lambda must be in (0, 1], got {self.adjoint_lambda}")
        if self.control_variate and self.use_flow and self.flow_target != "adjoint":
            raise ValueError(f"control_variate needs flow_target 'adjoint' (a_{{i+1}}), got {self.flow_target!r}")
        if self.flow_target == "mixed" and not self.use_flow:
            raise ValueError("flow_target 'mixed' blends L_B's target and needs g_φ (use_flow=True); "
                             "without g_φ use 'bootstrap' (guess alone) or 'adjoint' (adjoint matching)")

    trains_reverse = property(lambda self: self.use_flow and self.flow_target != "adjoint")  # L_B in the loss (graph to x)


class StepAtX(NamedTuple):
    """Both models' step at a batch's states x, built once and shared by every term. (N, *S) each."""
    x: Tensor  # batch.x; requires grad iff L_B is trained
    out: Dict[str, Tensor]  # {"policy": ε̂_θ(x) (graph to θ), "reference": ε̂^♯(x)}
    mean: Dict[str, Tensor]  # {"policy": μ_θ(x), "reference": μ^♯(x)}
    reward_grad: Optional[Tensor] = None  # ∇r(x̂_0(x)) of cfg.guess_from's x̂_0, when L_B is trained


def reverse_target(batch: Transitions, step: StepAtX, cfg: LossConfig, bootstrap_weight: float = 1.0) -> Tensor:
    """v(x), detached, with L_B = w_φ ‖v(x) + g_φ(x, τ)‖²: the reverse residual ∇-DB (eq. 11). As
    guess(x) + g_φ(x) = ∇ log F̃(x) = −∇_x[log P_F^θ − log P_F^♯](x'|x), with w = bootstrap_weight:
        v = w sg[∇_x(log P_F^θ − log P_F^♯)(x'|x)] + sg[β γ_τ ∇_x r(x̂_0(x))].
    No second-order gradients (official code): L_B trains only g_φ. One backward pass through both models' graphs
    to x, the guess riding on its x̂_0's (∇r there: step.reward_grad); θ's kept for L_F. (N, *S)"""
    x0_hat = affine(batch.x0_coef, step.x, step.out[cfg.guess_from])
    guess_grad = _per_row(cfg.beta * gamma_weight(batch.alpha_bar, cfg.gamma), step.x) * step.reward_grad
    log_ratio = (gaussian_log_prob(batch.x_next, step.mean["policy"], batch.sigma)
                 - gaussian_log_prob(batch.x_next, step.mean["reference"], batch.sigma))
    # ∇_x[w log-ratio] + (∂x̂_0/∂x)ᵀ β γ_τ ∇r(x̂_0)
    (v,) = torch.autograd.grad([bootstrap_weight * log_ratio.sum(), x0_hat], step.x,
                               grad_outputs=[None, guess_grad], retain_graph=True)
    return v.detach()


# A flow target says what g_φ fits: (fit(x'), v(x)), the targets of g_φ's terms in `flow_losses`.
def bootstrap_targets(batch, step, residual, log_reward, cfg, adjoint) -> Tuple[Tensor, Optional[Tensor]]:
    """The paper: g_φ(x') fits θ's own residual sg[δ] (L_F seen from g_φ, a one-link bootstrap), and
    L_B fits g_φ(x) to the reverse ∇-DB at x (`reverse_target`)."""
    return residual.detach(), reverse_target(batch, step, cfg)


def adjoint_targets(batch, step, residual, log_reward, cfg, adjoint) -> Tuple[Tensor, Optional[Tensor]]:
    """target(x') + g_φ(x') fits the lean adjoint a_{i+1}, the Monte-Carlo estimate of ∇ log F̃(x'); no L_B."""
    return adjoint_rows(adjoint, batch, 1), None


def mixed_targets(batch, step, residual, log_reward, cfg, adjoint) -> Tuple[Tensor, Optional[Tensor]]:
    """As "bootstrap", with L_B's target blended TD(λ)-like: guess(x) + g_φ(x) fits (1−λ)·(the
    bootstrapped estimate) + λ a_i, i.e. v = (1−λ) sg[∇_x log-ratio] + guess(x) − λ a_i."""
    reverse = reverse_target(batch, step, cfg, bootstrap_weight=1.0 - cfg.adjoint_lambda)
    return residual.detach(), reverse - cfg.adjoint_lambda * adjoint_rows(adjoint, batch, 0)


FLOW_TARGETS = {"bootstrap": bootstrap_targets, "adjoint": adjoint_targets, "mixed": mixed_targets}
FLOW_TARGET_CHOICES = tuple(FLOW_TARGETS)


def _sq(v: Tensor) -> Tensor:
    """Mean of squares over all but the batch dimension: (N, *S) → (N,). Dimension-free scale."""
    return v.pow(2).flatten(1).mean(1)


def _residuals_at_x(batch, models, log_reward, cfg, use_flow, adjoint):
    """ε̂_θ(x), θ's forward residual δ and, with g_φ, the flow target's (fit(x'), v(x)). One forward of each
    model at x (ε̂^♯: no graph to its weights, one to x only for L_B), after the guess at x' (nabla_db_loss);
    the guess's model first, then L_B's ∇r(x̂_0(x)): a reward graph never sits beside two model graphs."""
    graph_to_x = use_flow and cfg.trains_reverse
    x = batch.x.detach().requires_grad_(graph_to_x)
    out, reward_grad = {}, None
    for name in sorted(models, key=lambda n: n != cfg.guess_from):  # the guess's model first
        with nullcontext() if graph_to_x or name == "policy" else torch.no_grad():
            out[name] = models[name](x, batch.t, batch.traj)
        if graph_to_x and reward_grad is None:  # L_B's ∇r(x̂_0(x)), its graph freed before the other model's
            reward_grad = reward_gradient(log_reward, affine(batch.x0_coef, x, out[name]), batch.traj)[0]
    step = StepAtX(x, out, {name: affine(batch.mean_coef, x, o) for name, o in out.items()}, reward_grad)
    # δ = (μ_θ(x) − sg[μ^♯(x)]) / σ²
    residual = forward_residual(step.mean["policy"], step.mean["reference"].detach(), batch.sigma)
    flow_fit = FLOW_TARGETS[cfg.flow_target](batch, step, residual, log_reward, cfg, adjoint) if use_flow else None
    return step.out["policy"], residual, flow_fit


def flow_losses(batch: Transitions, flow: FlowFn, fit_next: Tensor, target_next: Tensor,
                reverse: Optional[Tensor], weight_flow: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
    """g_φ's terms of the loss. Returns (sg[g_φ(x')], zero on terminal rows; the three losses):
        forward_flow  w_φ ‖ fit(x') − target(x') − g_φ(x', τ') ‖²     (g_φ's line of L_F; g_φ(x_0) := 0)
        reverse       w_φ ‖ v(x) + g_φ(x, τ) ‖²                       (L_B; zero when v is None)
        terminal      ‖ g_φ(x_0, 0) ‖², over terminal rows            (L_T)"""
    zero, term = batch.x.new_zeros(()), batch.is_terminal
    flow_next = flow(batch.x_next, batch.t_next, batch.traj)
    loss_terminal = _sq(flow_next[term]).mean() if term.any() else zero
    flow_next = _per_row((~term).to(flow_next.dtype), flow_next) * flow_next  # no g_φ at x_0
    loss_forward_flow = (weight_flow * _sq(fit_next - target_next - flow_next)).mean()
    loss_reverse = zero if reverse is None else (weight_flow * _sq(reverse + flow(batch.x.detach(), batch.t, batch.traj))).mean()
    return flow_next.detach(), {"forward_flow": loss_forward_flow, "reverse": loss_reverse, "terminal": loss_terminal}


def antithetic_target(batch: Transitions, guess_eps: EpsFn, log_reward: LogRewardFn, flow: FlowFn, cfg: LossConfig,
                      adjoint: Tensor, flow_score_next: Tensor) -> Tensor:
    """θ's target with the learned flow as a control variate of the lean adjoint (not in the paper):
        y = a_{i+1} − ½ [h(x') − h(x̃')],   h = guess + g_φ (flow_score_next = h(x')),   x̃' = 2 μ_old(x) − x'.
    x' = μ_old(x) + σξ was drawn by the sampling policy (μ_old from eps_old), and its mirror x̃' = μ_old(x) − σξ
    has the same law given x: E[h(x') − h(x̃') | x] = 0 for any h, so E[y | x] = E[a_{i+1} | x], adjoint
    matching's target, however biased h is, while the part of a_{i+1} that h explains through ξ cancels.
    (θ fitting h itself inherits g_φ's bias: regressed on the heavy-tailed a_{i+1}, g_φ comes out shrunk.)
    Terminal rows: y = ½ β(∇r(x_0) + ∇r(x̃_0)). Costs one more guess and g_φ call, at x̃'. Detached, (N, *S)."""
    mirror = replace(batch, x_next=2 * affine(batch.mean_coef, batch.x, batch.eps_old) - batch.x_next)
    guess_mirror, _ = guess_next(guess_eps, log_reward, mirror, cfg.beta, cfg.gamma)
    with torch.no_grad():  # g_φ(x̃'), none at x_0
        flow_mirror = flow(mirror.x_next, mirror.t_next, mirror.traj) * _per_row(~batch.is_terminal, batch.x_next)
    return (adjoint_rows(adjoint, batch, 1) - 0.5 * (flow_score_next - guess_mirror - flow_mirror)).detach()


def nabla_db_loss(batch: Transitions, policy_eps: EpsFn, reference_eps: EpsFn, log_reward: LogRewardFn, flow: Optional[FlowFn],
                  cfg: LossConfig, adjoint: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Residual ∇-DB loss on a batch of transitions (eqs. 10–13, Alg. 1). Returns (loss, parts). sg[·] is stop-
    gradient, norms are means over dimensions, (w_θ, w_φ) from `transition_weights` (1 in the paper), target(x')
    from `guess_next` (β∇r(x_0) on terminal rows, else the guess at x'):

      L_F = w_θ ‖ δ − sg[target(x')] − sg[g_φ(x', τ')] ‖²,   δ = (μ_θ(x) − sg[μ^♯(x)])/σ²     trains θ
          + g_φ's line (`flow_losses`: the same residual seen from g_φ, or the flow target's fit)
      L_B = w_φ ‖ v(x) + g_φ(x, τ) ‖²       (v from the flow target, `FLOW_TARGETS`)
      L_T = ‖ g_φ(x_0, 0) ‖²                (terminal rows);    L_λ = λ ‖ ε̂_θ(x) − ε̂_old(x) ‖²
      loss = L_F + w_B L_B + L_T + L_λ, each averaged over its rows
    With "bootstrap", for w_θ = w_φ, L_F's two lines have the gradients of the paper's single term w ‖δ − target −
    g_φ(x')‖² (tested). With cfg.control_variate θ's target is `antithetic_target`'s instead of target(x') +
    g_φ(x'). Without g_φ (use_flow False or flow None) L_B = L_T = 0 and θ fits as `LossConfig.use_flow` says
    (adjoint matching: no reward call). As in the official code L_F trains θ through μ_θ(x), μ^♯ and every target
    are detached, and L_B trains only g_φ. adjoint: (B, T+1, *S) from `lean_adjoint` over the batch's trajectories,
    rows found by (traj, step); required unless flow_target is "bootstrap". parts: detached scalars "loss",
    "forward" (θ's line of L_F), "forward_flow", "reverse", "terminal", "trust_region" and "reward_next" (mean r at
    x_0 or x̂_0(x'); absent for adjoint matching)."""
    use_flow = cfg.use_flow and flow is not None
    if cfg.flow_target != "bootstrap" and adjoint is None:
        raise ValueError(f"flow_target {cfg.flow_target!r} needs adjoint=lean_adjoint(...) of the batch's trajectories")
    if cfg.flow_target == "mixed" and not use_flow:
        raise ValueError("flow_target 'mixed' needs g_φ: pass a flow callable")
    models = {"policy": policy_eps, "reference": reference_eps}
    weight_policy, weight_flow = transition_weights(batch.sigma, cfg.weighting)
    parts: Dict[str, Tensor] = {}
    if use_flow or cfg.flow_target == "bootstrap":
        target_next, reward_next = guess_next(models[cfg.guess_from], log_reward, batch, cfg.beta, cfg.gamma)
        parts["reward_next"] = reward_next.mean()
    else:  # adjoint matching: θ's target is the lean adjoint a_{i+1} itself
        target_next = adjoint_rows(adjoint, batch, 1)
    eps_policy, residual, flow_fit = _residuals_at_x(batch, models, log_reward, cfg, use_flow, adjoint)
    flow_parts = dict.fromkeys(("forward_flow", "reverse", "terminal"), batch.x.new_zeros(()))
    if use_flow:
        fit_next, reverse = flow_fit
        flow_next, flow_parts = flow_losses(batch, flow, fit_next, target_next, reverse, weight_flow)
        # ∇ log F̃(x') = target(x') + g_φ(x')   (eq. 12)
        target_next = target_next + flow_next
        if cfg.control_variate:  # θ fits a_{i+1} − ½[h(x') − h(x̃')]
            target_next = antithetic_target(batch, models[cfg.guess_from], log_reward, flow, cfg, adjoint, target_next)
    # L_F (θ's line) = w_θ ‖δ − sg[target(x') + g_φ(x')]‖²
    loss_forward = (weight_policy * _sq(residual - target_next)).mean()
    # L_λ = λ ‖ε̂_θ(x) − ε̂_old(x)‖²
    loss_trust = cfg.trust_region * _sq(eps_policy - batch.eps_old).mean()
    loss = loss_forward + flow_parts["forward_flow"] + cfg.reverse_weight * flow_parts["reverse"] + flow_parts["terminal"] + loss_trust
    parts.update(forward=loss_forward, trust_region=loss_trust, **flow_parts)
    return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}


# ---- Training-step helpers ------------------------------------------------------------------------


def zero_output_layer(module: nn.Module, layer: Optional[nn.Module] = None) -> nn.Module:
    """Zero the weights and bias of g_φ's output layer (official code: bias only), so training starts
    exactly at the forward-looking guess. `layer` defaults to the last submodule owning parameters
    (an MLP's output layer, a diffusers UNet's `conv_out`). Returns `module`."""
    if layer is None:
        owners = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
        if not owners:
            raise ValueError("module has no parameters to zero")
        layer = owners[-1]
    for p in layer.parameters(recurse=False):
        nn.init.zeros_(p)  # in place, without autograd
    return module


def clip_grad_norms(groups: Dict[str, Iterable[nn.Parameter]], max_norm: float) -> Dict[str, float]:
    """Clip each group's gradient norm separately (policy and g_φ, as in the paper); returns the pre-clip norms."""
    norms = {}
    for name, params in groups.items():
        params = [p for p in params if p.grad is not None]
        norms[name] = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    return norms
