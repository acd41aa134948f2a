"""Every finetuning method beside the ∇-GFlowNet loss, and the one method registry every rung uses.

    python toy_2d.py --method draft --draft-k 1     # DRaFT-K (K = 1: DRaFT-1); --draft-kl adds the per-step KL
    python toy_2d.py --method refl                  # ReFL
    python toy_2d.py --method ddpo                  # DDPO (PPO-clip)
    python toy_2d.py --method rtb                   # relative trajectory balance
    python toy_2d.py --method grpo                  # GRPO as Flow-GRPO runs it (--grpo-kl: its KL weight)
    python toy_2d.py --method kl-pg                 # KL-regularised policy gradient (optimum: exactly p*)
    python toy_digits.py --method nabla-db,adjoint-matching,rtb,ddpo,refl,draft,grpo,kl-pg

Each method is one update `update(trainee, hp, gen) -> logs` on nabla_gfn's callables only: the
rung hands over a `Trainee` (policy and reference ε-functions eps_fn(x, t, traj), the log-reward
log_reward(x0, traj), the step schedule, a noise sampler x_T(n, gen), the trainable parameter
groups, the optimiser and the extra module g_φ or log Z) and a `MethodConfig` (β, batch size, the
∇-DB LossConfig and each baseline's hyper-parameters). Nothing here knows a state's shape: toy
vectors (B, D), digit images (B, 1, 8, 8) and SD latents (B, 4, h, w) all pass through. This module
imports only nabla_gfn. One update = one batch of `batch_size` trajectories sampled from the current
policy. r = log R; the target is p*(x_0) ∝ p^♯(x_0) exp(β r(x_0)).

  ∇-DB      nabla-db, no-flow, adjoint-matching: sample → lean adjoint (when the flow target needs
            it) → subsample transitions → nabla_gfn.nabla_db_loss → step (`nabla_db_update`).
            Adjoint matching (Domingo-Enrich et al., ICLR 2025) is its use_flow=False, "adjoint" case.
  DRaFT-K   (Clark et al., ICLR 2024) max E[β r(x_0)]: sample with the policy, keep the graph of the
            last K steps only, backpropagate −β r(x_0) through them. Optional per-step KL to P_F^♯ on
            those K steps (draft_kl, 0 = off, as in the paper).
  ReFL      (Xu et al., NeurIPS 2023, ImageReward) sample without gradients to a random late step i
            (uniform in [refl_start·T, T−1]: ImageReward uses 30–39 of 40), ascend β r(x̂_0(x_i)).
  DDPO      (Black et al., ICLR 2024) PPO-clip on the per-step Gaussian log-probability ratios with
            the whole trajectory's advantage, β r(x_0) normalised over the batch and clipped.
  GRPO      (Flow-GRPO, Liu et al., 2025) PPO-clip with each trajectory's advantage normalised within
            its group (the whole batch on an unconditional rung), + kl_coef · the per-step KL to P_F^♯.
  KL-PG     (DPOK-like, Fan et al., NeurIPS 2023) the exact gradient of E[β r] − KL(P^θ ‖ P^♯) over
            trajectories: advantage β r − KL-to-go (group baseline, no std), PPO-clip, + 1 · per-step KL.
  RTB       (Venkatraman et al., NeurIPS 2024) (log Z + Σ log P_F^θ − Σ log P_F^♯ − β r(x_0))² with a
            learned scalar log Z. log Z starts, on every rung, at the first batch's log-mean-exp of
            β r: its value at θ = ♯ (a Jensen lower bound of the true log Z), so the policy does not
            absorb the offset while Adam walks log Z there from 0 (with the digits' ink reward
            β r ≈ 10, that took ~100 updates). Needs every transition's log-probability.

Only RTB, KL-PG and the ∇-DB methods have p* as their optimum; DRaFT, ReFL and DDPO maximise the
reward and, unregularised, drift towards its maximum; GRPO's std division moves its optimum.
Deliberate simplifications, one line each:
  * ReFL without its interleaved pretraining loss and with r itself, not ImageReward's ReLU-shifted reward.
  * DDPO: advantages normalised over the batch (no per-prompt tracker); minibatches mix timesteps.
  * GRPO: the exact per-step KL and full log-probabilities (Flow-GRPO: per-element means; see grpo_update).
  * RTB: on-policy only (no off-policy exploration or replay buffer).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

import nabla_gfn as ng

# ----------------------------------------------------------------------------------------------
# The common interface: what a rung hands every update
# ----------------------------------------------------------------------------------------------


@dataclass
class MethodConfig:
    """Hyper-parameters of every method (each rung maps its own config fields onto these)."""

    beta: float  # β of the target p♯·R^β
    batch_size: int  # trajectories sampled per update
    fraction: float  # ∇-DB: fraction of non-terminal transitions trained on
    grad_clip: float  # max grad norm, per parameter group
    loss: ng.LossConfig = field(default_factory=ng.LossConfig)  # ∇-DB loss (the method's overrides applied)
    draft_k: int = 1  # DRaFT-K: last steps the reward gradient flows through
    draft_kl: float = 0.0  # DRaFT-K: weight of the per-step KL to P_F♯ on those steps
    refl_start: float = 0.75  # ReFL: stop at a uniform step in [refl_start·T, T−1]
    ppo_clip: float = 0.1  # DDPO, GRPO, KL-PG: clip range of the per-step ratio
    ppo_epochs: int = 1  # DDPO, GRPO, KL-PG: inner epochs per sampled batch
    ppo_minibatches: int = 4  # DDPO, GRPO, KL-PG: minibatches per epoch (one optimiser step each)
    ppo_adv_clip: float = 5.0  # DDPO, GRPO: clip of the normalised advantages
    kl_coef: float = 0.04  # GRPO: weight of the per-step KL to P_F♯ (Flow-GRPO's default on SD3.5 GenEval/OCR)
    # memory (every method but ∇-DB and RTB; same gradients, `accumulated_step`): rows per forward/backward with a
    # graph, gradients accumulated into the one optimiser step; rows per no-grad sampling/scoring pass. 0 = all
    micro_batch: int = 0
    sample_batch: int = 0


@dataclass
class Trainee:
    """What a rung hands an update: nabla_gfn's callables, the trainable groups and the optimiser.

    groups: {name: parameter list}, each clipped separately ("policy", and "flow" when g_φ is
    trained; log Z is not clipped). flow: g_φ as an eps_fn-shaped callable, or None. log_z: RTB's
    `LogPartition`, or None. backward: how a loss is backpropagated (a multi-process rung passes
    accelerate's `accelerator.backward`).
    """

    policy_eps: ng.EpsFn
    reference_eps: ng.EpsFn
    log_reward: ng.LogRewardFn
    schedule: ng.StepSchedule
    x_T: Callable[[int, torch.Generator], Tensor]  # x_T(n, gen): n noise states of the rung's shape
    groups: Dict[str, List[nn.Parameter]]
    optimizer: torch.optim.Optimizer
    flow: Optional[ng.EpsFn] = None
    log_z: Optional["LogPartition"] = None
    backward: Callable[[Tensor], None] = Tensor.backward
    # GRPO, KL-PG: trajectory index (B,) → group id (e.g. the prompt's); None: the batch is one group
    group_of: Optional[Callable[[Tensor], Tensor]] = None


def optimizer_step(trainee: Trainee, loss: Tensor, max_norm: float) -> Dict[str, float]:
    """zero_grad, backward, clip each group's norm separately, step. Returns {grad_norm_<group>: pre-clip norm}."""
    trainee.optimizer.zero_grad(set_to_none=True)
    trainee.backward(loss)
    norms = ng.clip_grad_norms(trainee.groups, max_norm)
    trainee.optimizer.step()
    return {f"grad_norm_{k}": v for k, v in norms.items()}


def score(log_reward: ng.LogRewardFn, x0: Tensor, chunk: int = 0) -> Tensor:
    """r(x_0) without a graph, for logging and for the methods that need no reward gradient, `chunk` rows at
    a time (0 = all). (B,)."""
    with torch.no_grad():
        return torch.cat([log_reward(x0[rows], rows) for rows in row_chunks(len(x0), chunk, x0.device)])


def row_chunks(n: int, size: int, device=None) -> Tuple[Tensor, ...]:
    """arange(n) in chunks of `size` rows (0: one chunk of all n)."""
    return torch.arange(n, device=device).split(size if size > 0 else max(n, 1))


def accumulated_step(trainee: Trainee, hp: MethodConfig, rows: Tensor,
                     loss_of: Callable[[Tensor], Tuple[Tensor, Dict[str, Tensor]]]) -> Dict[str, float]:
    """ONE optimiser step on the mean over `rows` of a per-row loss, in micro-batches of hp.micro_batch rows
    (0 = all at once): loss_of(micro) → (its mean over micro, {stat: its mean}); each is backpropagated with
    weight len(micro)/len(rows), so the accumulated gradient is the whole mean's while one micro-batch's
    graph is held. Returns the pre-clip norms and the weighted means of loss and stats."""
    trainee.optimizer.zero_grad(set_to_none=True)
    logs: Dict[str, float] = {}
    for micro in rows.split(hp.micro_batch if hp.micro_batch > 0 else max(len(rows), 1)):
        loss, stats = loss_of(micro)
        weight = len(micro) / len(rows)
        trainee.backward(loss * weight)
        for key, value in {"loss": loss, **stats}.items():
            logs[key] = logs.get(key, 0.0) + weight * float(value.detach())
    norms = ng.clip_grad_norms(trainee.groups, hp.grad_clip)
    trainee.optimizer.step()
    return {**logs, **{f"grad_norm_{k}": v for k, v in norms.items()}}


def per_row(v: Tensor, x: Tensor) -> Tensor:
    """A (B,) tensor shaped to broadcast against a state x of any shape (B, ...)."""
    return v.view(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------------------------
# Sampler helpers
# ----------------------------------------------------------------------------------------------


def prefix_schedule(schedule: ng.StepSchedule, num_steps: int) -> ng.StepSchedule:
    """The first `num_steps` steps of a schedule, so that the shared sampler can stop early."""
    return ng.StepSchedule(*(getattr(schedule, f)[:num_steps] for f in schedule.__dataclass_fields__))


def sample_chunks(eps_fn: ng.EpsFn, schedule: ng.StepSchedule, x_T: Tensor, gen: torch.Generator,
                  chunk: int = 0) -> ng.Trajectory:
    """`nabla_gfn.sample_trajectory` on `chunk` rows of x_T at a time (0 = all), each chunk's rows keeping
    their trajectory index in the whole batch (the rung's prompt of row b)."""
    if chunk <= 0 or chunk >= len(x_T):
        return ng.sample_trajectory(eps_fn, schedule, x_T, generator=gen)
    parts = [ng.sample_trajectory(lambda x, t, traj, rows=rows: eps_fn(x, t, rows[traj]), schedule, x_T[rows],
                                  generator=gen) for rows in row_chunks(len(x_T), chunk, x_T.device)]
    return ng.Trajectory(torch.cat([p.states for p in parts]), torch.cat([p.eps for p in parts]))


def sample_prefix(eps_fn: ng.EpsFn, schedule: ng.StepSchedule, x_T: Tensor, num_steps: int,
                  gen: torch.Generator, chunk: int = 0) -> Tensor:
    """The state after the first `num_steps` steps of the shared sampler (no_grad, `chunk` rows at a time);
    x_T itself if 0."""
    if num_steps == 0:
        return x_T
    return sample_chunks(eps_fn, prefix_schedule(schedule, num_steps), x_T, gen, chunk).final


def step_coefficients(schedule: ng.StepSchedule, i: int, n: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(ᾱ, ᾱ', σ) of step i, each expanded to (n,)."""
    return tuple(getattr(schedule, f)[i].expand(n) for f in ("alpha_bar", "alpha_bar_next", "sigma"))


def all_transitions(trajectory: ng.Trajectory, schedule: ng.StepSchedule) -> ng.Transitions:
    """Every transition of every trajectory, as one flat batch of B·T rows ordered trajectory-major."""
    B, T = trajectory.states.shape[0], schedule.num_steps
    return ng.gather_transitions(trajectory, schedule, torch.arange(T).expand(B, T))


def transition_log_prob(eps_fn: ng.EpsFn, batch: ng.Transitions) -> Tensor:
    """log P_F(x'|x) = log N(x'; μ(x), σ²) of each transition under the policy `eps_fn`. (N,)."""
    eps = eps_fn(batch.x, batch.t, batch.traj)
    return ng.gaussian_log_prob(batch.x_next, step_mean_of(eps, batch), batch.sigma)


def trajectory_log_prob(eps_fn: ng.EpsFn, batch: ng.Transitions, num_trajectories: int) -> Tensor:
    """Σ_i log P_F(x_{i+1}|x_i) per trajectory: (N,) transitions → (B,)."""
    log_prob = transition_log_prob(eps_fn, batch)
    return log_prob.new_zeros(num_trajectories).index_add(0, batch.traj, log_prob)


def sample_policy(trainee: Trainee, n: int, gen: torch.Generator, chunk: int = 0) -> ng.Trajectory:
    """n on-policy trajectories of the shared sampler (no_grad, `chunk` trajectories at a time, 0 = all)."""
    return sample_chunks(trainee.policy_eps, trainee.schedule, trainee.x_T(n, gen), gen, chunk)


# ----------------------------------------------------------------------------------------------
# ∇-DB: nabla-db, no-flow, adjoint matching (the loss is nabla_gfn's)
# ----------------------------------------------------------------------------------------------


def nabla_db_update(trainee: Trainee, hp: MethodConfig, gen: torch.Generator) -> Dict[str, float]:
    """Sample on-policy trajectories, sweep the lean adjoint when hp.loss.flow_target needs it (one VJP
    through the frozen reference per step), train once on a subsample of their transitions."""
    trajectory = sample_policy(trainee, hp.batch_size, gen)
    steps = ng.subsample_steps(trainee.schedule.num_steps, hp.fraction, hp.batch_size, gen)
    batch = ng.gather_transitions(trajectory, trainee.schedule, steps)
    adjoint = None
    if hp.loss.flow_target != "bootstrap":
        adjoint, _ = ng.lean_adjoint(trainee.reference_eps, trainee.schedule, trajectory, trainee.log_reward, hp.beta)
    loss, parts = ng.nabla_db_loss(batch, trainee.policy_eps, trainee.reference_eps, trainee.log_reward,
                                   trainee.flow, hp.loss, adjoint=adjoint)
    logs = {k: float(v) for k, v in parts.items()}
    logs.update(optimizer_step(trainee, loss, hp.grad_clip))
    logs["reward"] = float(score(trainee.log_reward, trajectory.final).mean())
    if adjoint is not None:
        logs["adjoint_rms"] = float(adjoint.pow(2).mean().sqrt())
    return logs


# ----------------------------------------------------------------------------------------------
# DRaFT-K: reward backpropagation through the last K sampling steps
# ----------------------------------------------------------------------------------------------


def grad_tail_start(policy_eps: ng.EpsFn, schedule: ng.StepSchedule, x_T: Tensor, k: int, gen: torch.Generator,
                    chunk: int = 0) -> Tuple[Tensor, List[Tensor]]:
    """DRaFT's sample up to the graph: the state x_{T−k} (no_grad, `chunk` rows at a time) and the noise of
    each of the last k steps (drawn for the whole batch, in the shared sampler's order)."""
    T = schedule.num_steps
    k = max(1, min(k, T))
    start = sample_prefix(policy_eps, schedule, x_T, T - k, gen, chunk)
    return start, [torch.randn(start.shape, generator=gen, device=start.device, dtype=start.dtype) for _ in range(k)]


def grad_tail(policy_eps: ng.EpsFn, reference_eps: ng.EpsFn, schedule: ng.StepSchedule, start: Tensor,
              noises: List[Tensor], rows: Tensor, with_kl: bool = False) -> Tuple[Tensor, Tensor]:
    """The last k = len(noises) steps x' = μ_θ(x) + σ z of trajectories `rows`, from start[rows], graph kept:
    (x_0 (R, ...), Σ over the k steps of KL(P_F^θ(·|x) ‖ P_F^♯(·|x)) per row (R,), zero unless with_kl)."""
    T, R = schedule.num_steps, len(rows)
    x, kl = start[rows], start.new_zeros(R)
    for j, i in enumerate(range(T - len(noises), T)):
        t = schedule.timesteps[i].expand(R)
        sigma, mean_coef = step_coefficients(schedule, i, R)[2], schedule.mean_coef[i].expand(R, 2)
        mean = ng.affine(mean_coef, x, policy_eps(x, t, rows))
        if with_kl:  # KL of two Gaussians with the same σ: ‖μ_θ − μ^♯‖² / (2σ²)
            with torch.no_grad():
                mean_ref = ng.affine(mean_coef, x, reference_eps(x, t, rows))
            kl = kl + (mean - mean_ref).pow(2).flatten(1).sum(1) / (2 * sigma**2)
        x = mean + per_row(sigma, x) * noises[j][rows]
    return x, kl


def sample_with_grad_tail(
    policy_eps: ng.EpsFn, reference_eps: ng.EpsFn, schedule: ng.StepSchedule, x_T: Tensor, k: int,
    gen: torch.Generator, with_kl: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sample like `nabla_gfn.sample_trajectory`, keeping the autograd graph of the last k steps only.

    Steps 0 … T−k−1 run through the shared sampler under no_grad; the last k steps repeat its update
    x' = μ_θ(x) + σ z with the graph kept, so ∂x_0/∂θ flows through exactly the last k ε̂_θ calls
    (and through the states between them). Returns (x_0 (B, ...) with graph, the state x_{T−k} where
    the graph starts (B, ...), Σ over the k steps of KL(P_F^θ(·|x) ‖ P_F^♯(·|x)) per row (B,), zero
    unless with_kl).
    """
    start, noises = grad_tail_start(policy_eps, schedule, x_T, k, gen)
    x0, kl = grad_tail(policy_eps, reference_eps, schedule, start, noises, torch.arange(len(x_T), device=x_T.device),
                       with_kl)
    return x0, start, kl


def draft_update(trainee: Trainee, hp: MethodConfig, gen: torch.Generator) -> Dict[str, float]:
    """DRaFT-K: minimise −β r(x_0) (+ draft_kl · Σ_last-K KL) through the last K steps (in micro-batches)."""
    start, noises = grad_tail_start(trainee.policy_eps, trainee.schedule, trainee.x_T(hp.batch_size, gen),
                                    hp.draft_k, gen, hp.sample_batch)

    def loss_of(rows: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        x0, kl = grad_tail(trainee.policy_eps, trainee.reference_eps, trainee.schedule, start, noises, rows,
                           hp.draft_kl > 0)
        reward = trainee.log_reward(x0, rows)
        return -(hp.beta * reward).mean() + hp.draft_kl * kl.mean(), dict(reward=reward.mean(), kl_last_k=kl.mean())

    return accumulated_step(trainee, hp, torch.arange(hp.batch_size, device=start.device), loss_of)


# ----------------------------------------------------------------------------------------------
# ReFL: one-step clean prediction at a random late step
# ----------------------------------------------------------------------------------------------


def refl_step_index(num_steps: int, start_fraction: float, gen: torch.Generator) -> int:
    """A uniform random step in [⌊start_fraction·T⌋, T−1] (ImageReward: 30–39 of 40 steps)."""
    lo = min(int(start_fraction * num_steps), num_steps - 1)
    return int(torch.randint(lo, num_steps, (1,), generator=gen, device=gen.device))


def refl_prediction(policy_eps: ng.EpsFn, schedule: ng.StepSchedule, x_T: Tensor, stop: int,
                    gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Sample without gradients to the state x_stop, then x̂_0(x_stop) with one ε̂_θ call (graph kept).

    Returns (x̂_0 (B, ...) whose only path to θ is that one ε̂_θ call, x_stop (B, ...) detached).
    """
    x = sample_prefix(policy_eps, schedule, x_T, stop, gen)
    return x0_prediction(policy_eps, schedule, x, stop, torch.arange(len(x), device=x.device)), x


def x0_prediction(policy_eps: ng.EpsFn, schedule: ng.StepSchedule, x: Tensor, step: int, rows: Tensor) -> Tensor:
    """x̂_0(x_step) of trajectories `rows` of the states x (B, ...), one ε̂_θ call with graph. (R, ...)."""
    t = schedule.timesteps[step].expand(len(rows))
    return ng.affine(schedule.x0_coef[step].expand(len(rows), 2), x[rows], policy_eps(x[rows], t, rows))


def refl_update(trainee: Trainee, hp: MethodConfig, gen: torch.Generator) -> Dict[str, float]:
    """ReFL: minimise −β r(x̂_0(x_i)) at a random late step i (in micro-batches)."""
    stop = refl_step_index(trainee.schedule.num_steps, hp.refl_start, gen)
    x = sample_prefix(trainee.policy_eps, trainee.schedule, trainee.x_T(hp.batch_size, gen), stop, gen, hp.sample_batch)

    def loss_of(rows: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        reward = trainee.log_reward(x0_prediction(trainee.policy_eps, trainee.schedule, x, stop, rows), rows)
        return -(hp.beta * reward).mean(), dict(reward=reward.mean())

    logs = accumulated_step(trainee, hp, torch.arange(hp.batch_size, device=x.device), loss_of)
    return {**logs, "refl_step": stop}


# ----------------------------------------------------------------------------------------------
# DDPO: PPO-clip on per-step log-probability ratios
# ----------------------------------------------------------------------------------------------


def normalised_advantages(reward: Tensor, clip: float) -> Tensor:
    """(r − mean) / std over the batch, clipped to ±clip (DDPO's adv_clip_max). (B,) → (B,)."""
    adv = (reward - reward.mean()) / (reward.std(unbiased=False) + 1e-8)
    return adv.clamp(-clip, clip)


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip: float) -> Tuple[Tensor, Dict[str, Tensor]]:
    """PPO-clip: mean over rows of max(−A ρ, −A clip(ρ, 1−ε, 1+ε)), ρ = exp(log π_θ − log π_old).

    All inputs (N,); old_log_prob is treated as a constant. On-policy (ρ = 1) the clipped and the
    unclipped objectives coincide in value and gradient (tested). Returns (loss, detached stats).
    """
    ratio = torch.exp(log_prob - old_log_prob.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = torch.maximum(unclipped, clipped).mean()
    stats = {
        "ratio": ratio.detach(),
        "clip_fraction": ((ratio - 1).abs() > clip).float().mean().detach(),
        "approx_kl": (0.5 * (log_prob - old_log_prob).pow(2)).mean().detach(),
    }
    return loss, stats


def ddpo_update(trainee: Trainee, hp: MethodConfig, gen: torch.Generator) -> Dict[str, float]:
    """DDPO: sample a batch, then ppo_epochs × ppo_minibatches PPO-clip steps on all its transitions."""
    trajectory = sample_policy(trainee, hp.batch_size, gen, hp.sample_batch)
    reward = score(trainee.log_reward, trajectory.final, hp.sample_batch)
    batch = all_transitions(trajectory, trainee.schedule)
    row_advantages = normalised_advantages(hp.beta * reward, hp.ppo_adv_clip)[batch.traj]
    # π_old: the Gaussian step the sampler actually took, from the ε̂ it recorded.
    old_log_prob = ng.gaussian_log_prob(batch.x_next, step_mean_of(batch.eps_old, batch), batch.sigma)

    def loss_of(rows: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        log_prob = transition_log_prob(trainee.policy_eps, batch.select(rows))
        loss, stats = ppo_clip_loss(log_prob, old_log_prob[rows], row_advantages[rows], hp.ppo_clip)
        return loss, dict(clip_fraction=stats["clip_fraction"], approx_kl=stats["approx_kl"])

    logs = ppo_steps(trainee, hp, gen, len(batch), loss_of, ("loss", "clip_fraction"), last=("approx_kl",))
    return {**logs, "reward": float(reward.mean())}


def ppo_steps(trainee: Trainee, hp: MethodConfig, gen: torch.Generator, n: int,
              loss_of: Callable[[Tensor], Tuple[Tensor, Dict[str, Tensor]]], mean: Tuple[str, ...],
              last: Tuple[str, ...] = ()) -> Dict[str, float]:
    """ppo_epochs × ppo_minibatches optimiser steps (`accumulated_step`) on random minibatches of the n rows.
    Logs: each group's largest pre-clip norm, the `mean` keys averaged over the steps, the `last` keys of the
    last step, and the number of steps."""
    steps = [accumulated_step(trainee, hp, rows, loss_of) for _ in range(hp.ppo_epochs)
             for rows in torch.randperm(n, generator=gen, device=gen.device).chunk(hp.ppo_minibatches)]
    logs = {k: max(step[k] for step in steps) for k in steps[0] if k.startswith("grad_norm_")}
    logs.update({k: sum(step[k] for step in steps) / len(steps) for k in mean}, **{k: steps[-1][k] for k in last})
    return {**logs, "optimizer_steps": len(steps)}


# ----------------------------------------------------------------------------------------------
# GRPO and KL-regularised policy gradient: PPO-clip with a per-step KL to P_F^♯
# ----------------------------------------------------------------------------------------------


def trajectory_groups(trainee: Trainee, n: int) -> Tensor:
    """Group id of each of n trajectories (n,): trainee.group_of(0..n−1), or one group when it is None."""
    traj = torch.arange(n)
    return torch.zeros(n, dtype=torch.long) if trainee.group_of is None else trainee.group_of(traj).long()


def group_mean(values: Tensor, group: Tensor) -> Tensor:
    """The mean of `values` (B, ...) over the rows of each row's group, one row per row. (B, ...)."""
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    sums = values.new_zeros((len(counts), *values.shape[1:])).index_add(0, inverse, values)
    return (sums / per_row(counts.to(values.dtype), sums))[inverse]


def minus_others_mean(values: Tensor, group: Tensor) -> Tensor:
    """values − the mean of the *other* rows of the group (a leave-one-out baseline, independent of the
    row's own action: unbiased) = (values − group mean)·n/(n−1); a group of one keeps its values. (B, ...)."""
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    n = counts[inverse].to(values.dtype)
    scale = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
    centred = torch.where(per_row(n > 1, values), values - group_mean(values, group), values)
    return centred * per_row(scale, values)


def group_relative_advantages(reward: Tensor, group: Tensor, clip: float) -> Tensor:
    """GRPO's advantage (r − mean_g r) / (std_g r + 1e-4) over each trajectory's group g, clipped to ±clip.

    std is the population std of the group (Flow-GRPO's PerPromptStatTracker: np.std + 1e-4; its SD3.5
    configs set global_std, the std of the whole batch, equal to this on an unconditional rung where the
    batch is the one group). A constant reward gives advantages exactly 0. (B,) → (B,).
    """
    centred = reward - group_mean(reward, group)
    std = group_mean(centred.pow(2), group).sqrt()
    return (centred / (std + 1e-4)).clamp(-clip, clip)


def step_mean_of(eps: Tensor, batch: ng.Transitions) -> Tensor:
    """μ(x) = a x + b ε̂ of each transition's Gaussian step, from the model output ε̂. (N, ...)."""
    return ng.affine(batch.mean_coef, batch.x, eps)


def step_kl(mean: Tensor, reference_mean: Tensor, sigma: Tensor) -> Tensor:
    """KL(N(μ, σ²I) ‖ N(μ^♯, σ²I)) = ‖μ − μ^♯‖² / (2σ²): two Gaussians with the same σ. (N, ...) → (N,)."""
    return (mean - reference_mean).pow(2).flatten(1).sum(1) / (2 * sigma.to(mean.dtype) ** 2)


def kl_to_go(step_kls: Tensor) -> Tensor:
    """Σ_{j>i} KL_j at each step i: the KL still to come after step i's action. (B, T) → (B, T)."""
    return step_kls.flip(1).cumsum(1).flip(1) - step_kls


def kl_pg_advantages(beta_reward: Tensor, step_kls: Tensor, group: Tensor) -> Tensor:
    """A_i = β r(x_0) − Σ_{j>i} KL_j(x_j), minus its mean over the group's other trajectories at the same
    step i. (B,), (B, T) → (B, T)."""
    return minus_others_mean(beta_reward[:, None] - kl_to_go(step_kls), group)


def clipped_pg_steps(trainee: Trainee, hp: MethodConfig, gen: torch.Generator, batch: ng.Transitions,
                     advantages: Tensor, reference_mean: Tensor, kl_coef: float) -> Dict[str, float]:
    """ppo_epochs × ppo_minibatches optimiser steps on PPO-clip(ρ_i, A_i) + kl_coef · KL_i(x_i), KL_i pathwise
    (each step in micro-batches, `accumulated_step`).

    π_old is the Gaussian step the sampler took (its recorded ε̂); μ^♯ is precomputed, without graph.
    Returns the update's logs (largest pre-clip norm, mean loss, clip fraction, mean step KL).
    """
    old_log_prob = ng.gaussian_log_prob(batch.x_next, step_mean_of(batch.eps_old, batch), batch.sigma)

    def loss_of(rows: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        part = batch.select(rows)
        mean = step_mean_of(trainee.policy_eps(part.x, part.t, part.traj), part)
        log_prob = ng.gaussian_log_prob(part.x_next, mean, part.sigma)
        surrogate, stats = ppo_clip_loss(log_prob, old_log_prob[rows], advantages[rows], hp.ppo_clip)
        kl = step_kl(mean, reference_mean[rows], part.sigma).mean()
        return surrogate + kl_coef * kl, dict(clip_fraction=stats["clip_fraction"], step_kl=kl)

    return ppo_steps(trainee, hp, gen, len(batch), loss_of, ("loss", "clip_fraction", "step_kl"))


def sample_for_pg(trainee: Trainee, hp: MethodConfig,
                  gen: torch.Generator) -> Tuple[ng.Transitions, Tensor, Tensor, Tensor]:
    """One on-policy batch for GRPO / KL-PG: (every transition, r(x_0) (B,), μ^♯ at every transition (no
    graph, hp.sample_batch·T transitions per pass), the sampling policy's per-step KL_i(x_i) (B, T))."""
    trajectory = sample_policy(trainee, hp.batch_size, gen, hp.sample_batch)
    reward = score(trainee.log_reward, trajectory.final, hp.sample_batch)
    batch = all_transitions(trajectory, trainee.schedule)
    chunk = hp.sample_batch * trainee.schedule.num_steps
    with torch.no_grad():
        reference_mean = torch.cat([step_mean_of(trainee.reference_eps(part.x, part.t, part.traj), part)
                                    for part in map(batch.select, row_chunks(len(batch), chunk, batch.x.device))])
        step_kls = step_kl(step_mean_of(batch.eps_old, batch), reference_mean, batch.sigma)
    return batch, reward, reference_mean, step_kls.view(hp.batch_size, -1)


def grpo_update(trainee: Trainee, hp: MethodConfig, gen: torch.Generator) -> Dict[str, float]:
    """GRPO as Flow-GRPO (Liu et al., 2025, arXiv 2505.05470) runs it: the group-normalised advantage
    (r − mean_g)/std_g, clipped to ±ppo_adv_clip, for every step of the trajectory; PPO-clip on the
    per-step ratios; + kl_coef · KL_i(x_i) pathwise; no KL in the advantage.

    Flow-GRPO's settings (yifan123/flow_grpo: config/base.py, config/grpo.py, flow_grpo/stat_tracking.py):
      * KL coefficient: Flow-GRPO's default on SD3.5 GenEval and OCR: train.beta = 0.04 (PickScore 0.01,
        base and the "fast" configs 0) → kl_coef = 0.04.
      * clip range: Flow-GRPO's default: train.clip_range = 1e-4 → the rung's ppo_clip (shared with DDPO).
      * advantage clip: Flow-GRPO's default: train.adv_clip_max = 5 → ppo_adv_clip; std + 1e-4, population std.
      * Flow-GRPO's default: num_inner_epochs = 1 and timestep_fraction 0.99 → the rung's ppo_epochs; every step.
      * Its log-probability and its KL are both means over latent elements (1/d of the sums here): the
        same balance of the two terms, an overall 1/d gradient scale that Adam absorbs, but its clip acts
        on the per-element ratio ρ^{1/d}. Its KL divides by the SDE's σ_t² without the step's dt; here the
        exact per-step KL.
      * Not applicable here: per-prompt groups on an unconditional rung (the batch is the one group;
        trainee.group_of lets a conditional rung pass prompt ids), CFG, its SDE noise_level (the shared
        sampler is DDIM η = 1), EMA.
    Why it is not KL-PG: dividing by std_g rescales r by a factor that moves with the policy, and the
    per-step KL without its KL-to-go is not the trajectory KL's gradient, so p* is not its fixed point.
    """
    batch, reward, reference_mean, step_kls = sample_for_pg(trainee, hp, gen)
    group = trajectory_groups(trainee, hp.batch_size)
    advantages = group_relative_advantages(reward, group, hp.ppo_adv_clip)[batch.traj]
    logs = clipped_pg_steps(trainee, hp, gen, batch, advantages, reference_mean, hp.kl_coef)
    logs.update(reward=float(reward.mean()), trajectory_kl=float(step_kls.sum(1).mean()))
    return logs


def kl_pg_update(trainee: Trainee, hp: MethodConfig, gen: torch.Generator) -> Dict[str, float]:
    """KL-regularised policy gradient (DPOK-like): the gradient of the trajectory-level objective

        J(θ) = E_{τ~P^θ}[β r(x_0)] − KL(P^θ(τ) ‖ P^♯(τ)) = log Z − KL(P^θ(τ) ‖ P^♯(τ) e^{β r(x_0)} / Z),

    β × (E[r] − α KL) at α = 1/β. Its maximiser is P^θ(τ) ∝ P^♯(τ) e^{β r(x_0)}, whose x_0-marginal is
    p^♯ e^{βr} / Z = p*: the tilted target exactly (where the Gaussian-step family holds it; otherwise
    its best approximation, as for RTB and ∇-DB). The chain rule of KL over the T steps gives
    KL(P^θ ‖ P^♯) = E Σ_i KL_i(x_i), KL_i(x) = ‖μ_θ(x) − μ^♯(x)‖² / (2σ_i²). With
    f_θ(τ) = β r − Σ_i KL_i(x_i), ∇J = E[Σ_i ∇ log P^θ(x_{i+1}|x_i) · f_θ(τ)] + E[∇_θ f_θ(τ)]; in step i's
    score term the KL_j with j ≤ i are fixed before its action (E[∇ log P^θ(x_{i+1}|x_i) | x_{≤i}] = 0), so

        ∇J = E[Σ_i ∇ log P^θ(x_{i+1}|x_i) · A_i] − E[Σ_i ∇_θ KL_i(x_i)|_{x_i fixed}],
        A_i = β r(x_0) − Σ_{j>i} KL_j(x_j) − b_i    (detached).

    b_i: the mean of A_i over the other trajectories of its group at step i (leave-one-out: a batch mean
    that included the row would scale the score term by 1 − 1/B but not the KL term, and move the
    fixed point by O(1/B)). The first term is the gradient of ρ_i·A_i at ρ_i = 1 (PPO-clip: the same
    on-policy, tested), the second the pathwise KL at coefficient 1; both are averaged over the B·T
    transitions (∇J / T). No std division, no advantage clip: either would rescale βr against the KL
    and move the optimum.
    """
    batch, reward, reference_mean, step_kls = sample_for_pg(trainee, hp, gen)
    group = trajectory_groups(trainee, hp.batch_size)
    advantages = kl_pg_advantages(hp.beta * reward, step_kls, group)[batch.traj, batch.step]
    logs = clipped_pg_steps(trainee, hp, gen, batch, advantages, reference_mean, 1.0)
    logs.update(reward=float(reward.mean()), trajectory_kl=float(step_kls.sum(1).mean()))
    return logs


# ----------------------------------------------------------------------------------------------
# RTB: relative trajectory balance with a learned log Z
# ----------------------------------------------------------------------------------------------


class LogPartition(nn.Module):
    """The scalar log Z of relative trajectory balance (Z = ∫ p^♯ R^β).

    `rtb_update` sets it once, before the first step, to the first batch's log-mean-exp(β r)
    (`initial_log_z`); the `started` buffer records that (and travels with the state dict).
    """

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    def forward(self) -> Tensor:
        return self.value


def initial_log_z(reward: Tensor, beta: float) -> float:
    """log (1/B) Σ_b exp(β r_b): log Z at θ = ♯ estimated on one batch (a Jensen lower bound of it)."""
    return float(torch.logsumexp(beta * reward, 0) - math.log(len(reward)))


def rtb_loss(log_z: Tensor, log_pf_policy: Tensor, log_pf_reference: Tensor, log_reward: Tensor, beta: float) -> Tensor:
    """Relative trajectory balance: mean over trajectories of (log Z + Σ log P_F^θ − Σ log P_F^♯ − β r(x_0))².

    log_pf_*: (B,) per-trajectory sums; log_reward: (B,). Zero at policy = reference, β r = 0 and
    log Z = 0 (tested); its minimiser over policies is p^♯ R^β / Z, the target. Gradients reach the
    policy through log_pf_policy and log Z; pass the reference and the reward detached.
    """
    residual = log_z + log_pf_policy - log_pf_reference - beta * log_reward
    return residual.pow(2).mean()


def rtb_update(trainee: Trainee, hp: MethodConfig, gen: torch.Generator) -> Dict[str, float]:
    """RTB on on-policy trajectories: one optimiser step on θ and log Z per batch."""
    trajectory = sample_policy(trainee, hp.batch_size, gen)
    batch = all_transitions(trajectory, trainee.schedule)
    log_pf_policy = trajectory_log_prob(trainee.policy_eps, batch, hp.batch_size)
    with torch.no_grad():
        log_pf_reference = trajectory_log_prob(trainee.reference_eps, batch, hp.batch_size)
        reward = score(trainee.log_reward, trajectory.final)
        if not trainee.log_z.started:
            trainee.log_z.value.fill_(initial_log_z(reward, hp.beta))
            trainee.log_z.started.fill_(True)
    loss = rtb_loss(trainee.log_z(), log_pf_policy, log_pf_reference, reward, hp.beta)
    logs = optimizer_step(trainee, loss, hp.grad_clip)
    logs.update(loss=loss.item(), reward=float(reward.mean()), log_z=trainee.log_z().item())
    return logs


# ----------------------------------------------------------------------------------------------
# The registry: --method name → Method, for every rung
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One --method.

    update(trainee, hp, gen) → logs (with "loss", "reward", "grad_norm_policy"). module: the extra
    trainable module the rung must build and put in the Trainee: "flow" (g_φ), "log_z" (RTB's
    `LogPartition`) or None. loss_overrides: LossConfig fields this method fixes (∇-DB methods).
    full_trajectories: the update needs every transition's log-probability (not SD's subsample).
    """

    update: Callable[[Trainee, MethodConfig, torch.Generator], Dict[str, float]]
    label: str
    summary: str
    module: Optional[str] = None
    loss_overrides: Dict[str, object] = field(default_factory=dict)
    full_trajectories: bool = False

    def loss_config(self, base: ng.LossConfig) -> ng.LossConfig:
        """The rung's configured ∇-DB LossConfig with this method's fixed fields applied."""
        return dataclasses.replace(base, **self.loss_overrides)


METHODS: Dict[str, Method] = {
    "nabla-db": Method(nabla_db_update, "∇-GFlowNet", "∇-GFlowNet: residual ∇-DB with forward-looking flow", module="flow"),
    "no-flow": Method(nabla_db_update, "∇-GFlowNet (no g_φ)", "∇-GFlowNet without g_φ (forward-looking guess alone)",
                      loss_overrides={"use_flow": False, "flow_target": "bootstrap"}),
    "adjoint-matching": Method(nabla_db_update, "adjoint matching",
                               "Adjoint Matching: forward residual regressed on the lean adjoint (no guess, no g_φ)",
                               loss_overrides={"use_flow": False, "flow_target": "adjoint"}),
    "draft": Method(draft_update, "DRaFT-K", "DRaFT-K: reward backprop through the last K steps"),
    "refl": Method(refl_update, "ReFL", "ReFL: reward of the one-step x̂_0 at a random late step"),
    "ddpo": Method(ddpo_update, "DDPO", "DDPO: PPO-clip on per-step log-probability ratios"),
    "grpo": Method(grpo_update, "GRPO", "GRPO (Flow-GRPO): group-normalised advantages, PPO-clip, per-step KL",
                   full_trajectories=True),
    "kl-pg": Method(kl_pg_update, "KL-PG", "KL-regularised policy gradient: β r − KL-to-go, PPO-clip, exact tilted optimum",
                    full_trajectories=True),
    "rtb": Method(rtb_update, "RTB", "RTB: relative trajectory balance with a learned log Z", module="log_z",
                  full_trajectories=True),
}


def fixed_fields(methods: str) -> List[Tuple[str, str, object]]:
    """(method, field, value) of each LossConfig field that a method of `methods` (one registry name or a
    comma-separated list; other names fix nothing) fixes through its loss_overrides. cli.parse refuses a
    flag given for such a field with another value (e.g. --method no-flow --flow-target adjoint)."""
    return [(name, key, value) for name in methods.split(",") if name in METHODS
            for key, value in METHODS[name].loss_overrides.items()]
