"""∇-GFlowNet: residual ∇-DB with a forward-looking flow, as pure functions.

Paper: Liu, Xiao, Liu, Bengio, Zhang, "Efficient Diversity-Preserving Diffusion Alignment via
Gradient-Informed GFlowNets", ICLR 2025, arXiv:2412.07775.

Goal. Finetune a pretrained diffusion sampler P_F^♯ into P_F^θ whose samples follow the
reward-tilted target

    p*(x_0) ∝ p^♯(x_0) · R(x_0)^β = p^♯(x_0) · exp(β r(x_0)),      r = log R,

i.e. reweight the pretrained distribution instead of collapsing onto the reward's maximum.

Derivation in four lines (details in each function's docstring). Detailed balance of the
finetuned and of the pretrained model, divided, with the residual flow F̃ = F / F^♯:

    F̃(x) · P_F^θ(x'|x) / P_F^♯(x'|x) = F̃(x'),          F̃(x_0) = R(x_0)^β.

Taking ∇ of the log in x' and in x removes the flow at the other state and every normaliser:

    forward  ∇-DB:  ∇_{x'}[log P_F^θ − log P_F^♯](x'|x) =  ∇ log F̃(x')       (paper eq. 9/10)
    reverse  ∇-DB:  ∇_{x} [log P_F^θ − log P_F^♯](x'|x) = −∇ log F̃(x)
    terminal:       ∇ log F̃(x_0) = β ∇r(x_0)

and the residual flow score is a forward-looking guess plus a learned correction g_φ:

    ∇ log F̃(x) = β γ_τ ∇_x r(x̂_0(x)) + g_φ(x, τ),       g_φ(x_0) = 0.          (paper eq. 12)

How g_φ learns ∇ log F̃ (`LossConfig.flow_target`). The paper bootstraps: the reverse ∇-DB ties the
flow at x to the policy's step at x, which L_F ties to the flow one link further, at x' — a TD(0)
chain of T links, which carries fit errors made at low noise up to the mode-choosing steps. The
reverse condition can instead be solved along each sampled trajectory. Reparametrising
x' = μ^♯(x) + σ ξ in F̃(x) = E_{P_F^♯(x'|x)}[F̃(x')] gives ∇ log F̃(x) = E_{P*(x'|x)}[J^♯(x)ᵀ ∇ log F̃(x')],
J^♯ = ∂μ^♯/∂x, and unrolled from the terminal condition this is the lean adjoint

    a_T = β ∇r(x_0),        a_i = J^♯(x_i)ᵀ a_{i+1}                          (`lean_adjoint`)

a Monte-Carlo estimate of ∇ log F̃(x_i), unbiased along paths of the optimal policy P* (Adjoint
Matching, Domingo-Enrich et al., ICLR 2025, uses the same recursion). "adjoint" regresses the flow
estimate at x' on a_{i+1}; "mixed" blends L_B's target, (1−λ)·bootstrap + λ·a_i (TD(λ)-like).

Time index. We follow diffusers: a trajectory runs from noise x_T (step index 0) to the clean
sample x_0 (step index T); `x` is the noisier state at timestep τ and `x_next` the cleaner one at
τ'. The paper indexes the other way (its x_0 is the noise). Equation numbers refer to the paper.

Notation (code name → paper symbol):

    x, x_next             x_t, x_{t+1} in the paper (here: noisier, cleaner)
    t, t_next             diffusion timesteps τ, τ' of x and x_next
    alpha_bar             ᾱ_τ (diffusers `alphas_cumprod`)
    sigma                 σ_τ, std of the Gaussian step P_F(x'|x) (DDPM posterior, DDIM η = 1)
    eps                   ε̂(x, τ), the (guided) noise prediction
    x0_pred               x̂_0(x) = (x − √(1−ᾱ) ε̂) / √ᾱ, the one-step clean prediction
    step_mean             μ(x) of P_F(x'|x)
    policy_eps            ε̂_θ (finetuned, P_F^θ)
    reference_eps         ε̂^♯ (frozen pretrained, P_F^♯)
    log_reward            r = log R
    beta                  β, reward scale (target p^♯ R^β)
    gamma                 γ_τ, damping of the forward-looking guess (ᾱ_τ or √ᾱ_τ)
    flow                  g_φ(x, τ), learned correction of the residual flow score
    forward_residual      (μ_θ(x) − μ^♯(x)) / σ² = ∇_{x'}[log P_F^θ − log P_F^♯](x'|x)
    reverse_residual      ∇_x[log P_F^θ − log P_F^♯](x'|x)
    trust_region          λ, weight of ‖ε̂_θ − ε̂_old‖² (the paper's λ; not adjoint_lambda)
    step                  i, index of x in its trajectory (x = x_i, x_next = x_{i+1}; x_T is step 0)
    adjoint               a_i, the lean adjoint: a Monte-Carlo estimate of ∇ log F̃(x_i) (not in the paper)
    adjoint_lambda        λ of the "mixed" flow target (TD(λ)-like blend; not in the paper)

Callables. Model-specific pieces come in as callables that share one signature style:

    eps_fn(x, t, traj) -> eps          x: (N, *S), t: (N,) long timesteps, traj: (N,) long
    log_reward(x0, traj) -> r          x0: (N, *S), r: (N,)
    flow(x, t, traj) -> g              g: (N, *S)

`traj` says which sampled trajectory each row belongs to, so a driver can look up that row's
conditioning (prompt embedding, prompt text) with `cond[traj]`. Transitions of many trajectories
are mixed in one batch and sometimes evaluated on a subset of rows; routing by `traj` makes it
impossible to score a row with another row's prompt.

Implemented: DDIM(η=1) Gaussian steps from any diffusers scheduler's public tensors; trajectory
sampling; low-variance transition subsampling; the forward-looking reward score; the lean adjoint;
the residual ∇-DB loss (forward, reverse, terminal, trust region), its "no flow" variant, three
timestep weightings and three ways to train g_φ (bootstrap = the paper, adjoint, mixed); with no
g_φ and the adjoint target it is adjoint matching, the peer baseline, in ∇-DB form.
Not here: model loading, optimisers, logging (see toy_2d.py, sd_finetune.py); DPM-Solver or other
samplers; v-prediction models (ε-prediction only).

Deliberate differences from the official code:
  * g_φ's output layer is zero-initialised in weights *and* bias (official: bias only), so training
    starts exactly at the forward-looking guess.
  * Subsampling works for any step count and fraction (official: asserts divisibility).
  * `weighting="kl"` (optional) weights each transition by σ_τ², making the forward term twice the
    per-step KL to the target step; the paper/official code use the plain residual ("plain").
  * Every callable receives `traj`, so conditioning is always the row's own (official: the reward
    was called with the last sampling batch's prompts).
  * `weighting="kl-shift"`, `guess_from="reference"` and `flow_target="adjoint"|"mixed"` are
    options that are not in the paper (defaults stay the paper's: "plain", "policy", "bootstrap").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

EpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]
LogRewardFn = Callable[[Tensor, Tensor], Tensor]
FlowFn = Callable[[Tensor, Tensor, Tensor], Tensor]

GAMMA_CHOICES = ("alpha_bar", "sqrt_alpha_bar")
WEIGHTING_CHOICES = ("plain", "kl", "kl-shift")
GUESS_CHOICES = ("policy", "reference")
FLOW_TARGET_CHOICES = ("bootstrap", "adjoint", "mixed")


# ----------------------------------------------------------------------------------------------
# Schedule and Gaussian-step helpers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSchedule:
    """Per-step constants of a T-step DDIM(η=1) sampler, indexed by step i = 0 … T−1.

    Step i maps x (timestep `timesteps[i]`) to x_next (timestep `next_timesteps[i]`).
    All fields are 1-D tensors of length T.

    timesteps        τ_i, long, decreasing (noisy → clean)
    next_timesteps   τ'_i = τ_{i+1}; after the last step the label 0 stands for the clean sample
    alpha_bar        ᾱ at τ_i
    alpha_bar_next   ᾱ at τ'_i (the scheduler's `final_alpha_cumprod` after the last step)
    sigma            σ_i = √((1−ᾱ')/(1−ᾱ) · (1 − ᾱ/ᾱ')), the DDPM posterior std (DDIM η = 1)
    """

    timesteps: Tensor
    next_timesteps: Tensor
    alpha_bar: Tensor
    alpha_bar_next: Tensor
    sigma: Tensor

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def to(self, device) -> "StepSchedule":
        return StepSchedule(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def ddim_schedule(scheduler, num_steps: int) -> StepSchedule:
    """Read the DDIM(η=1) step constants off a diffusers `DDIMScheduler`.

    Uses only the scheduler's public state: `set_timesteps`, `timesteps`, `alphas_cumprod`,
    `final_alpha_cumprod` and `config.num_train_timesteps`. The previous timestep is
    τ − num_train_timesteps // num_steps, exactly as `DDIMScheduler.step` computes it, so a
    sampler built from these constants reproduces `scheduler.step(..., eta=1.0)` (tested).
    Note: calls `scheduler.set_timesteps(num_steps)`, which sets the scheduler's own timesteps.
    """
    cfg = scheduler.config
    if cfg.get("prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"only epsilon-prediction schedulers are supported, got {cfg.prediction_type!r}")
    if cfg.get("clip_sample", False) or cfg.get("thresholding", False):
        raise ValueError("clip_sample/thresholding make the step non-Gaussian; disable them in the scheduler config")
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.long().cpu()
    alphas_cumprod = scheduler.alphas_cumprod.double().cpu()
    prev = timesteps - cfg.num_train_timesteps // num_steps
    alpha_bar = alphas_cumprod[timesteps]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    alpha_bar_next = torch.where(prev >= 0, alphas_cumprod[prev.clamp(min=0)], final)
    variance = (1 - alpha_bar_next) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_next)
    return StepSchedule(
        timesteps=timesteps,
        next_timesteps=prev.clamp(min=0),
        alpha_bar=alpha_bar.float(),
        alpha_bar_next=alpha_bar_next.float(),
        sigma=variance.clamp(min=0).sqrt().float(),
    )


def _per_row(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-row vector (N,) to broadcast against `like` (N, *S)."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """ε̂ = ε_u + w (ε_c − ε_u). Defines both P_F^θ and P_F^♯ when guidance is on."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def x0_prediction(x: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """One-step clean prediction x̂_0 = (x − √(1−ᾱ) ε̂) / √ᾱ (Tweedie's formula for ε-models).

    x, eps: (N, *S); alpha_bar: (N,). Returns (N, *S). Differentiable in x and eps.
    """
    a = _per_row(alpha_bar, x)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def step_mean(x: Tensor, eps: Tensor, alpha_bar: Tensor, alpha_bar_next: Tensor, sigma: Tensor) -> Tensor:
    """Mean μ(x) of the DDIM(η=1) step P_F(x'|x) = N(x'; μ(x), σ² I).

    μ = √ᾱ' x̂_0 + √(1 − ᾱ' − σ²) ε̂   (DDIM paper eq. 12 with η = 1, i.e. the DDPM posterior mean).
    x, eps: (N, *S); the schedule terms: (N,). Returns (N, *S).
    """
    a_next, s = _per_row(alpha_bar_next, x), _per_row(sigma, x)
    return a_next.sqrt() * x0_prediction(x, eps, alpha_bar) + (1 - a_next - s**2).clamp(min=0).sqrt() * eps


def gaussian_log_prob(x_next: Tensor, mean: Tensor, sigma: Tensor) -> Tensor:
    """log N(x'; μ, σ² I), summed over all but the batch dimension. Returns (N,)."""
    s = _per_row(sigma, x_next)
    d = x_next[0].numel()
    sq = ((x_next - mean) / s).pow(2).flatten(1).sum(1)
    return -0.5 * sq - d * torch.log(sigma.to(x_next.dtype)) - 0.5 * d * math.log(2 * math.pi)


def gamma_weight(alpha_bar: Tensor, kind: str = "alpha_bar") -> Tensor:
    """γ_τ, the damping of the forward-looking guess at high noise.

    "alpha_bar" (γ = ᾱ_τ) is the official code's default; "sqrt_alpha_bar" (γ = √ᾱ_τ) its
    alternative. The paper's text does not pin it down.
    """
    if kind == "alpha_bar":
        return alpha_bar
    if kind == "sqrt_alpha_bar":
        return alpha_bar.sqrt()
    raise ValueError(f"gamma must be one of {GAMMA_CHOICES}, got {kind!r}")


# ----------------------------------------------------------------------------------------------
# Sampling trajectories and choosing transitions
# ----------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """A batch of B sampled chains. states: (B, T+1, *S) from x_T to x_0; eps: (B, T, *S) = ε̂_old."""

    states: Tensor
    eps: Tensor

    @property
    def final(self) -> Tensor:
        return self.states[:, -1]


@torch.no_grad()
def sample_trajectory(
    eps_fn: EpsFn, schedule: StepSchedule, x_T: Tensor, generator: Optional[torch.Generator] = None
) -> Trajectory:
    """Run the Gaussian policy x' = μ(x) + σ z, z ~ N(0, I) for all T steps, without gradients.

    Records every state and the ε̂ used at each step (the "old policy" of the trust region).
    x_T: (B, *S) starting noise. eps_fn is called as eps_fn(x, t, traj) with traj = arange(B).
    """
    B = x_T.shape[0]
    traj = torch.arange(B, device=x_T.device)
    x, states, eps_all = x_T, [x_T], []
    for i in range(schedule.num_steps):
        t = schedule.timesteps[i].to(x.device).expand(B)
        eps = eps_fn(x, t, traj)
        coef = [getattr(schedule, f)[i].to(x.device).expand(B) for f in ("alpha_bar", "alpha_bar_next", "sigma")]
        mean = step_mean(x, eps, *coef)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = mean + _per_row(coef[2], x) * noise
        states.append(x)
        eps_all.append(eps)
    return Trajectory(states=torch.stack(states, 1), eps=torch.stack(eps_all, 1))


def subsample_steps(
    num_steps: int, fraction: float, batch_size: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Low-variance choice of transitions to train on, per trajectory. Returns (B, K) step indices.

    The terminal step T−1 is always included (its target β∇r(x_0) is exact). The other T−1 steps
    are cut into n = max(1, round(fraction · (T−1))) contiguous chunks of (nearly) equal size and
    one step is drawn uniformly from each chunk, independently per trajectory. fraction = 1 takes
    every step. Works for any T ≥ 1 and fraction in [0, 1]; fraction = 0 keeps only the terminal.
    """
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
    eps_old: Tensor  # (N, *S) ε̂ recorded at sampling time
    is_terminal: Tensor  # (N,) bool, x_next is the final sample x_0
    traj: Tensor  # (N,) long, index of the trajectory in the sampling batch
    step: Tensor  # (N,) long, step index i of x in its trajectory: x = states[traj, i]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def select(self, rows: Tensor) -> "Transitions":
        return Transitions(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


def gather_transitions(trajectory: Trajectory, schedule: StepSchedule, steps: Tensor) -> Transitions:
    """Gather the transitions `steps` (B, K) of each trajectory into one flat batch of N = B·K."""
    B, K = steps.shape
    device = trajectory.states.device
    steps = steps.to(device)
    traj = torch.arange(B, device=device)[:, None].expand(B, K).reshape(-1)
    idx = steps.reshape(-1)
    sched = schedule.to(device)
    return Transitions(
        x=trajectory.states[traj, idx],
        x_next=trajectory.states[traj, idx + 1],
        t=sched.timesteps[idx],
        t_next=sched.next_timesteps[idx],
        alpha_bar=sched.alpha_bar[idx],
        alpha_bar_next=sched.alpha_bar_next[idx],
        sigma=sched.sigma[idx],
        eps_old=trajectory.eps[traj, idx],
        is_terminal=idx == schedule.num_steps - 1,
        traj=traj,
        step=idx,
    )


# ----------------------------------------------------------------------------------------------
# Detailed-balance residuals
# ----------------------------------------------------------------------------------------------


def forward_residual(mean_policy: Tensor, mean_reference: Tensor, sigma: Tensor) -> Tensor:
    """∇_{x'}[log P_F^θ(x'|x) − log P_F^♯(x'|x)] for Gaussian steps with a shared σ.

    ∇_{x'} log N(x'; μ, σ²) = −(x' − μ)/σ², so the difference is (μ_θ − μ^♯)/σ²: x' cancels.
    Left side of the forward residual ∇-DB (paper eq. 10). Shapes (N, *S) → (N, *S).
    Gradient flows into both means; callers pass a detached reference mean.
    """
    return (mean_policy - mean_reference) / _per_row(sigma, mean_policy) ** 2


def reward_gradient(log_reward: LogRewardFn, x0: Tensor, traj: Tensor) -> Tuple[Tensor, Tensor]:
    """∇r(x0) and r(x0) for each row, both detached. x0: (N, *S) → ((N, *S), (N,)).

    The reward's graph (for SD: VAE decoder and reward model) is built and freed inside this call,
    so it never stays alive in a larger graph.
    """
    with torch.enable_grad():
        x0 = x0.detach().requires_grad_(True)
        r = log_reward(x0, traj)
        (grad,) = torch.autograd.grad(r.sum(), x0)
    return grad.detach(), r.detach()


def _pullback_through_x0(x: Tensor, x0_hat: Tensor, reward_grad: Tensor, **grad_kwargs) -> Tensor:
    """Chain rule ∇_x r(x̂_0(x)) = (∂x̂_0/∂x)ᵀ ∇r(x̂_0): one vector–Jacobian product through ε̂."""
    (grad,) = torch.autograd.grad(x0_hat, x, grad_outputs=reward_grad, **grad_kwargs)
    return grad


def _score_plus_guess(x: Tensor, log_prob: Tensor, x0_hat: Optional[Tensor], guess_grad: Tensor, **grad_kwargs) -> Tensor:
    """∇_x Σ log_prob, plus (∂x̂_0/∂x)ᵀ guess_grad when x0_hat (same graph) is given: one backward pass."""
    outputs, grads = [log_prob.sum()], [None]
    if x0_hat is not None:
        outputs.append(x0_hat)
        grads.append(guess_grad)
    (grad,) = torch.autograd.grad(outputs, [x], grad_outputs=grads, **grad_kwargs)
    return grad


def forward_looking_score(
    eps_fn: EpsFn,
    log_reward: LogRewardFn,
    x: Tensor,
    t: Tensor,
    alpha_bar: Tensor,
    traj: Tensor,
    beta: float,
    gamma: str = "alpha_bar",
) -> Tuple[Tensor, Tensor]:
    """The forward-looking guess β γ_τ ∇_x r(x̂_0(x)) of ∇ log F̃(x) (paper eq. 12), detached.

    x̂_0 uses the *finetuned* ε̂_θ; the gradient runs through ε̂_θ (and, for SD, the decoder and the
    reward model) to x and is then detached: it is a regression target, never a path for
    parameter gradients. Returns (score (N, *S), r(x̂_0) (N,)).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        x0_hat = x0_prediction(x, eps_fn(x, t, traj), alpha_bar)
        r_grad, r_hat = reward_gradient(log_reward, x0_hat, traj)
        score = _pullback_through_x0(x, x0_hat, r_grad)
    scale = beta * gamma_weight(alpha_bar, gamma)
    return _per_row(scale, score) * score.detach(), r_hat


def flow_target_next(
    policy_eps: EpsFn, log_reward: LogRewardFn, batch: Transitions, beta: float, gamma: str
) -> Tuple[Tensor, Tensor]:
    """Detached guess of ∇ log F̃(x') at each transition's cleaner state.

    Terminal rows (x' = x_0): the exact β∇r(x_0) (terminal condition, γ = 1, no x̂_0).
    Other rows: the forward-looking guess β γ_{τ'} ∇_{x'} r(x̂_0(x')).
    Returns (target (N, *S), r at x' or x̂_0(x') (N,)).
    """
    target = torch.zeros_like(batch.x_next)
    r_next = torch.zeros(len(batch), device=batch.x.device)
    term = batch.is_terminal
    if term.any():
        rows = batch.select(term)
        grad, r = reward_gradient(log_reward, rows.x_next, rows.traj)
        target[term], r_next[term] = beta * grad, r.to(r_next.dtype)
    if (~term).any():
        rows = batch.select(~term)
        guess, r = forward_looking_score(
            policy_eps, log_reward, rows.x_next, rows.t_next, rows.alpha_bar_next, rows.traj, beta, gamma
        )
        target[~term], r_next[~term] = guess, r.to(r_next.dtype)
    return target, r_next


# ----------------------------------------------------------------------------------------------
# The reverse condition solved along the trajectory: the lean adjoint
# ----------------------------------------------------------------------------------------------


def _step_mean_vjp(eps_fn: EpsFn, schedule: StepSchedule, i: int, x: Tensor, traj: Tensor, v: Tensor) -> Tensor:
    """J(x)ᵀ v with J = ∂μ(x)/∂x the Jacobian of step i's mean: one VJP through ε̂, graph freed. (N, *S)."""
    n = len(x)
    coef = [getattr(schedule, f)[i].to(x.device).expand(n) for f in ("alpha_bar", "alpha_bar_next", "sigma")]
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        mean = step_mean(x, eps_fn(x, schedule.timesteps[i].to(x.device).expand(n), traj), *coef)
        (vjp,) = torch.autograd.grad(mean, x, grad_outputs=v.to(mean.dtype))
    return vjp.detach()


def lean_adjoint(
    reference_eps: EpsFn,
    schedule: StepSchedule,
    trajectory: Trajectory,
    log_reward: LogRewardFn,
    beta: float,
    traj: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Monte-Carlo estimates a_i of ∇ log F̃(x_i) along each sampled trajectory (not in the paper).

    Derivation. The residual flow obeys F̃(x) = E_{P_F^♯(x'|x)}[F̃(x')] (residual DB summed over x').
    With x' = μ^♯(x) + σ ξ, ξ ~ N(0, I), and σ independent of x:

        ∇ log F̃(x) = E_ξ[J^♯(x)ᵀ ∇F̃(x')] / F̃(x) = E_{x' ~ P*(·|x)}[J^♯(x)ᵀ ∇ log F̃(x')],

    J^♯ = ∂μ^♯/∂x, P*(x'|x) = P_F^♯(x'|x) F̃(x')/F̃(x) the optimal policy. This is the reverse residual
    ∇-DB taken in expectation and solved for ∇ log F̃(x). Unrolled from the terminal condition:

        a_T = β ∇r(x_0),        a_i = J^♯(x_i)ᵀ a_{i+1},        i = T−1, …, 0,

    one vector–Jacobian product through the frozen reference step mean per step.

    Where it is exact. E[a_i | x_i] = ∇ log F̃(x_i) when x_{i+1:T} follow P* (by induction on i). Along
    other paths (the current policy's) it is biased: at the start of finetuning it averages the
    reward's gradient over the pretrained model's continuations instead of the tilted ones (at high
    noise this over-weights far, low-reward modes); the bias vanishes as the policy approaches P*,
    so the fixed point is right. It is the recursion of Adjoint Matching (Domingo-Enrich et al., ICLR
    2025, the "lean adjoint" of its memoryless noise schedule, which DDPM/DDIM(η=1) is).

    Relation to the paper. The paper's reverse term fits g_φ(x) to the policy's reverse residual,
    whose target is the policy's forward residual at x', itself fitted to the flow at x': a one-link
    bootstrap (TD(0)). a_i is the Monte-Carlo return of the same recursion; blending the two is
    TD(λ) (`LossConfig(flow_target="mixed")`).

    Guidance. `reference_eps` defines J^♯. Pass the guided reference (ε_u + w (ε_c − ε_u)) for what is
    exact for the guided target (the default a driver should use), or the unguided one for
    Adjoint Matching's choice (its code reports that full-CFG adjoints grow large in norm).

    trajectory: states (B, T+1, *S) from x_T (step 0) to x_0 (step T). traj: (B,) trajectory ids given
    to reference_eps and log_reward (default arange(B); pass offsets when sweeping a slice of an
    epoch's trajectories). Returns (adjoint (B, T+1, *S), r(x_0) (B,)), both detached; memory of
    one step: no graph is kept across steps, and no parameter receives a gradient.
    """
    states = trajectory.states
    B, T = states.shape[0], schedule.num_steps
    traj = torch.arange(B, device=states.device) if traj is None else traj
    reward_grad, r0 = reward_gradient(log_reward, trajectory.final, traj)
    adjoints = [beta * reward_grad.to(states.dtype)]  # a_T
    for i in reversed(range(T)):
        adjoints.append(_step_mean_vjp(reference_eps, schedule, i, states[:, i], traj, adjoints[-1]))
    return torch.stack(adjoints[::-1], 1), r0


# ----------------------------------------------------------------------------------------------
# The flow correction g_φ
# ----------------------------------------------------------------------------------------------


def zero_output_layer(module: nn.Module, layer: Optional[nn.Module] = None) -> nn.Module:
    """Zero the weights and bias of g_φ's output layer so that g_φ ≡ 0 at initialisation.

    `layer` defaults to the last submodule (in registration order) that owns parameters, which is
    the output layer of an `nn.Sequential` MLP and `conv_out` of a diffusers UNet. Training then
    starts exactly at the forward-looking guess (official code: bias only). Returns `module`.
    """
    if layer is None:
        owners = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
        if not owners:
            raise ValueError("module has no parameters to zero")
        layer = owners[-1]
    with torch.no_grad():
        for p in layer.parameters(recurse=False):
            p.zero_()
    return module


# ----------------------------------------------------------------------------------------------
# The residual ∇-DB loss
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the residual ∇-DB loss.

    beta            β, reward scale of the target p^♯ · R^β
    trust_region    λ, weight of ‖ε̂_θ − ε̂_old‖²
    reverse_weight  w_B, weight of the reverse term L_B
    gamma           γ_τ choice: "alpha_bar" (official default) or "sqrt_alpha_bar"
    weighting       "plain" (paper), "kl" or "kl-shift" (see `transition_weights`)
    use_flow        False = no g_φ and no L_B: the policy's forward residual is fitted to the guess
                    alone ("no flow", flow_target "bootstrap") or to a_{i+1} (adjoint matching,
                    flow_target "adjoint")
    guess_from      whose x̂_0 the forward-looking guess uses: "policy" (ε̂_θ, paper and official
                    code) or "reference" (ε̂^♯). Optional, not the paper's: with "policy" the guess
                    shrinks as x̂_0 already looks rewarded and g_φ must make up the rest.
    flow_target     what g_φ is trained on (module docstring; not in the paper except "bootstrap"):
                    "bootstrap"  the paper: L_F's g_φ-line and L_B (one-link, TD(0)-like);
                    "adjoint"    guess(x') + g_φ(x') regressed on the lean adjoint a_{i+1}; no L_B;
                    "mixed"      as "bootstrap", with L_B's target (1−λ)·bootstrap + λ·a_i.
                    "adjoint" and "mixed" need `nabla_db_loss(..., adjoint=lean_adjoint(...))`.
    adjoint_lambda  λ ∈ (0, 1] of "mixed" (1: L_B fits a_i alone)
    """

    beta: float = 1.0
    trust_region: float = 0.0
    reverse_weight: float = 1.0
    gamma: str = "alpha_bar"
    weighting: str = "plain"
    use_flow: bool = True
    guess_from: str = "policy"
    flow_target: str = "bootstrap"
    adjoint_lambda: float = 0.5

    def __post_init__(self):
        if self.guess_from not in GUESS_CHOICES:
            raise ValueError(f"guess_from must be one of {GUESS_CHOICES}, got {self.guess_from!r}")
        gamma_weight(torch.ones(1), self.gamma)  # validates the name
        if self.weighting not in WEIGHTING_CHOICES:
            raise ValueError(f"weighting must be one of {WEIGHTING_CHOICES}, got {self.weighting!r}")
        if self.flow_target not in FLOW_TARGET_CHOICES:
            raise ValueError(f"flow_target must be one of {FLOW_TARGET_CHOICES}, got {self.flow_target!r}")
        if not 0.0 < self.adjoint_lambda <= 1.0:
            raise ValueError(f"adjoint_lambda must be in (0, 1], got {self.adjoint_lambda}")
        if self.flow_target == "mixed" and not self.use_flow:
            raise ValueError("flow_target 'mixed' blends L_B's target and needs g_φ (use_flow=True); "
                             "without g_φ use 'bootstrap' (guess alone) or 'adjoint' (adjoint matching)")

    @property
    def trains_reverse(self) -> bool:
        """Whether L_B is part of the loss (it needs a graph from ε̂ to x)."""
        return self.use_flow and self.flow_target != "adjoint"


def transition_weights(sigma: Tensor, weighting: str) -> Tuple[Tensor, Tensor]:
    """Per-transition weights (w_policy, w_flow) of the residuals that train θ and g_φ.

    "plain"     (1, 1): the paper's unweighted residuals.
    "kl"        (σ², σ²): σ² ‖(μ_θ − μ^♯)/σ² − s‖² = ‖μ_θ − (μ^♯ + σ² s)‖² / σ² = 2 KL(P_F^θ ‖ the
                target step N(μ^♯ + σ² s, σ²)). Same minimiser as "plain", but high-noise
                (mode-choosing) steps are no longer down-weighted by 1/σ⁴ relative to the mean
                shift they need.
    "kl-shift"  (σ², σ⁴): the policy as in "kl"; g_φ's residuals measured as the mean shift they
                imply, ‖σ² δ‖². Why: at low noise a tiny error in μ_θ is a huge error in the score
                (μ_θ − μ^♯)/σ², and with the bootstrapped target that score is g_φ's regression
                target in both L_F and L_B; weight σ⁴ keeps those 1/σ²-amplified errors from
                dominating g_φ's loss (README: measured on the toy).
    """
    if weighting == "plain":
        one = torch.ones_like(sigma)
        return one, one
    if weighting == "kl":
        return sigma**2, sigma**2
    if weighting == "kl-shift":
        return sigma**2, sigma**4
    raise ValueError(f"weighting must be one of {WEIGHTING_CHOICES}, got {weighting!r}")


def _sq(v: Tensor) -> Tensor:
    """Mean of squares over all but the batch dimension: (N, *S) → (N,). Dimension-free scale."""
    return v.pow(2).flatten(1).mean(1)


def adjoint_rows(adjoint: Tensor, batch: Transitions, offset: int) -> Tensor:
    """a_{i+offset} of each transition: adjoint (B, T+1, *S) indexed by the row's (traj, step + offset).

    offset 1 gives the adjoint at x' (forward targets), offset 0 at x (the "mixed" reverse target).
    Returns (N, *S) in the states' dtype.
    """
    return adjoint[batch.traj, batch.step + offset].to(batch.x.dtype)


def reverse_target(
    batch: Transitions,
    x: Tensor,
    eps_policy: Tensor,
    mean_policy: Tensor,
    reference_eps: EpsFn,
    log_reward: LogRewardFn,
    cfg: LossConfig,
    adjoint_here: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The detached vector v(x) with L_B = w_φ ‖ v(x) + g_φ(x, τ) ‖² (reverse residual ∇-DB, eq. 11).

    The reverse ∇-DB says guess(x) + g_φ(x) = ∇ log F̃(x) = −∇_x[log P_F^θ − log P_F^♯](x'|x), so

        "bootstrap":  v = sg[∇_x(log P_F^θ − log P_F^♯)(x'|x)] + sg[β γ_τ ∇_x r(x̂_0(x))]
        "mixed":      v = (1−λ) sg[∇_x(log P_F^θ − log P_F^♯)(x'|x)] + sg[β γ_τ ∇_x r(x̂_0(x))] − λ a_i

    i.e. g_φ(x) is fitted to (1−λ)·(the bootstrapped estimate) + λ·(the lean adjoint) minus the guess.
    The policy score is taken without second-order gradients (official code), so L_B trains only g_φ.
    x: batch.x with requires_grad, the graph of eps_policy = ε̂_θ(x) and mean_policy = μ_θ(x) to it
    is kept for L_F. One ε̂^♯(x) forward; one VJP per graph, with the guess's pullback riding on the
    graph its x̂_0 came from (ε̂_θ's or ε̂^♯'s, cfg.guess_from). Returns (v (N, *S), μ^♯(x) detached).
    """
    sigma = batch.sigma
    bootstrap_weight = 1.0 - cfg.adjoint_lambda if cfg.flow_target == "mixed" else 1.0
    eps_reference = reference_eps(x, batch.t, batch.traj)  # graph to x only (frozen weights)
    mean_reference = step_mean(x, eps_reference, batch.alpha_bar, batch.alpha_bar_next, sigma)
    on_policy = cfg.guess_from == "policy"
    x0_hat = x0_prediction(x, eps_policy if on_policy else eps_reference, batch.alpha_bar)
    r_grad, _ = reward_gradient(log_reward, x0_hat, batch.traj)  # the reward's graph is freed here
    guess_grad = _per_row(cfg.beta * gamma_weight(batch.alpha_bar, cfg.gamma), x) * r_grad
    # (1−λ)∇_x log P_F^θ(x'|x) − (1−λ)∇_x log P_F^♯(x'|x) + β γ_τ ∇_x r(x̂_0(x)).
    log_p_policy = bootstrap_weight * gaussian_log_prob(batch.x_next, mean_policy, sigma)
    log_p_reference = bootstrap_weight * gaussian_log_prob(batch.x_next, mean_reference, sigma)
    policy_part = _score_plus_guess(x, log_p_policy, x0_hat if on_policy else None, guess_grad, retain_graph=True)
    reference_part = _score_plus_guess(x, -log_p_reference, None if on_policy else x0_hat, guess_grad)
    target = (policy_part + reference_part).detach()
    if cfg.flow_target == "mixed":
        target = target - cfg.adjoint_lambda * adjoint_here
    return target, mean_reference.detach()


def flow_losses(
    batch: Transitions,
    flow: FlowFn,
    residual: Tensor,
    target_next: Tensor,
    reverse: Optional[Tensor],
    adjoint_next: Optional[Tensor],
    weight_flow: Tensor,
    cfg: LossConfig,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """g_φ's losses: L_F's g_φ-line (or the adjoint fit), L_B and L_T. Returns (sg[g_φ(x')], losses).

    With δ = the policy's forward residual (μ_θ − μ^♯)/σ² at (x, x') and target(x') its detached guess:
      "bootstrap", "mixed":  w_φ ‖ sg[δ] − target(x') − g_φ(x') ‖²      (g_φ's view of L_F)
      "adjoint":             w_φ ‖ a_{i+1} − target(x') − g_φ(x') ‖²    (flow estimate at x' on a_{i+1})
    both on non-terminal rows only (g_φ(x_0) is pinned by L_T = ‖g_φ(x_0)‖² instead); L_B as in
    `reverse_target` when `reverse` is given. The returned g_φ(x') is zero on terminal rows.
    """
    zero = batch.x.new_zeros(())
    flow_next = flow(batch.x_next, batch.t_next, batch.traj)
    term = batch.is_terminal
    loss_terminal = _sq(flow_next[term]).mean() if term.any() else zero
    flow_next = _per_row((~term).to(flow_next.dtype), flow_next) * flow_next  # no g_φ at x_0
    fit_next = adjoint_next if cfg.flow_target == "adjoint" else residual.detach()
    loss_forward_flow = (weight_flow * _sq(fit_next - target_next - flow_next)).mean()
    loss_reverse = zero
    if reverse is not None:
        loss_reverse = (weight_flow * _sq(reverse + flow(batch.x.detach(), batch.t, batch.traj))).mean()
    return flow_next.detach(), {"forward_flow": loss_forward_flow, "reverse": loss_reverse, "terminal": loss_terminal}


def _policy_residuals(
    batch: Transitions,
    policy_eps: EpsFn,
    reference_eps: EpsFn,
    log_reward: LogRewardFn,
    cfg: LossConfig,
    trains_reverse: bool,
    adjoint: Optional[Tensor],
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """ε̂_θ(x) (graph to θ), the forward residual (μ_θ − μ^♯)/σ² (graph to θ only) and, when L_B is
    trained, its detached target v(x) (`reverse_target`; graph from ε̂ to x only then). (N, *S) each."""
    x = batch.x.detach().requires_grad_(trains_reverse)
    eps_policy = policy_eps(x, batch.t, batch.traj)
    mean_policy = step_mean(x, eps_policy, batch.alpha_bar, batch.alpha_bar_next, batch.sigma)
    reverse = None
    if trains_reverse:
        adjoint_here = adjoint_rows(adjoint, batch, 0) if cfg.flow_target == "mixed" else None
        reverse, mean_reference = reverse_target(batch, x, eps_policy, mean_policy, reference_eps, log_reward, cfg, adjoint_here)
    else:
        with torch.no_grad():
            eps_reference = reference_eps(x, batch.t, batch.traj)
            mean_reference = step_mean(x, eps_reference, batch.alpha_bar, batch.alpha_bar_next, batch.sigma)
    return eps_policy, forward_residual(mean_policy, mean_reference, batch.sigma), reverse


def nabla_db_loss(
    batch: Transitions,
    policy_eps: EpsFn,
    reference_eps: EpsFn,
    log_reward: LogRewardFn,
    flow: Optional[FlowFn],
    cfg: LossConfig,
    adjoint: Optional[Tensor] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Residual ∇-DB loss on a batch of transitions (paper eqs. 10–13, Alg. 1). Returns (loss, parts).

    With sg[·] = stop-gradient, norms means over dimensions, weights (w_θ, w_φ) from
    `transition_weights` (both 1 in the paper) and target(x') = β∇r(x_0) on terminal rows, the
    forward-looking guess β γ_{τ'} ∇r(x̂_0(x')) otherwise (x̂_0 from ε̂_θ, or ε̂^♯ with guess_from):

      L_F = w_θ ‖ (μ_θ(x) − μ^♯(x))/σ² − sg[target(x')] − sg[g_φ(x', τ')] ‖²        trains θ
          + g_φ's line (`flow_losses`: the same residual seen from g_φ, or its fit to a_{i+1})
      L_B = w_φ ‖ v(x) + g_φ(x, τ) ‖²          (`reverse_target`; not with flow_target "adjoint")
      L_T = ‖ g_φ(x_0, 0) ‖²                                                   (terminal rows)
      L_λ = λ ‖ ε̂_θ(x) − ε̂_old(x) ‖²
      loss = mean(L_F) + w_B mean(L_B) + mean_terminal(L_T) + mean(L_λ)

    With "bootstrap" the two lines of L_F are one residual seen from each side: for w_θ = w_φ their
    gradients are exactly those of the paper's single term w ‖ … − g_φ(x', τ') ‖² (tested).
    Without g_φ (cfg.use_flow False or flow None) L_B and L_T are zero and θ's target is target(x')
    ("no flow") or, with flow_target "adjoint", a_{i+1} (adjoint matching: no reward call at all).

    Gradients (as in the official code): L_F trains θ through μ_θ(x); μ^♯, every target and the
    adjoint are detached; L_B trains only g_φ. One ε̂_θ(x) forward serves μ_θ, the reverse score and
    (by default) the guess at x; one ε̂^♯(x) forward serves μ^♯ and the reference score.
    adjoint: (B, T+1, *S) from `lean_adjoint` over the trajectories `batch` was gathered from (rows
    found by (traj, step)); required unless flow_target is "bootstrap".

    parts: detached scalars "loss", "forward" (θ's line of L_F), "forward_flow" (g_φ's line),
    "reverse", "terminal", "trust_region", and "reward_next" (mean r at x_0 or x̂_0(x'); absent for
    adjoint matching, which scores no reward here).
    """
    use_flow = cfg.use_flow and flow is not None
    if cfg.flow_target != "bootstrap" and adjoint is None:
        raise ValueError(f"flow_target {cfg.flow_target!r} needs adjoint=lean_adjoint(...) of the batch's trajectories")
    if cfg.flow_target == "mixed" and not use_flow:
        raise ValueError("flow_target 'mixed' needs g_φ: pass a flow callable")
    weight_policy, weight_flow = transition_weights(batch.sigma, cfg.weighting)
    adjoint_next = None if adjoint is None else adjoint_rows(adjoint, batch, 1)
    eps_policy, residual, reverse = _policy_residuals(batch, policy_eps, reference_eps, log_reward, cfg,
                                                      use_flow and cfg.trains_reverse, adjoint)
    parts: Dict[str, Tensor] = {}
    if use_flow or cfg.flow_target == "bootstrap":
        guess_eps = policy_eps if cfg.guess_from == "policy" else reference_eps
        target_next, reward_next = flow_target_next(guess_eps, log_reward, batch, cfg.beta, cfg.gamma)
        parts["reward_next"] = reward_next.mean()
    else:  # adjoint matching: the lean adjoint is θ's target itself
        target_next = adjoint_next
    zero = batch.x.new_zeros(())
    flow_parts = {"forward_flow": zero, "reverse": zero, "terminal": zero}
    if use_flow:
        flow_next, flow_parts = flow_losses(batch, flow, residual, target_next, reverse, adjoint_next, weight_flow, cfg)
        target_next = target_next + flow_next

    loss_forward = (weight_policy * _sq(residual - target_next)).mean()
    loss_trust = cfg.trust_region * _sq(eps_policy - batch.eps_old).mean()
    loss = loss_forward + flow_parts["forward_flow"] + cfg.reverse_weight * flow_parts["reverse"]
    loss = loss + flow_parts["terminal"] + loss_trust
    parts.update(forward=loss_forward, trust_region=loss_trust, **flow_parts)
    return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()}}


# ----------------------------------------------------------------------------------------------
# Training-step helpers
# ----------------------------------------------------------------------------------------------


def clip_grad_norms(groups: Dict[str, Iterable[nn.Parameter]], max_norm: float) -> Dict[str, float]:
    """Clip each parameter group's gradient norm separately (policy and g_φ, as in the paper).

    Returns the pre-clipping norm of each group, for logging.
    """
    norms = {}
    for name, params in groups.items():
        params = [p for p in params if p.grad is not None]
        norms[name] = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
    return norms
