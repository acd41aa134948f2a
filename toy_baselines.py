"""Baselines for the 2-D toy: DRaFT-K, ReFL, DDPO and RTB beside ∇-GFlowNet, on the same sampler.

    python toy_2d.py --method draft --draft-k 1     # DRaFT-K (K = 1: DRaFT-1)
    python toy_2d.py --method refl                  # ReFL
    python toy_2d.py --method ddpo                  # DDPO (PPO-clip)
    python toy_2d.py --method rtb                   # relative trajectory balance
    python compare_toy.py                           # every method, 3 seeds: table + figure

Each baseline is a train step with `toy_2d.train_step`'s signature, listed in `BASELINES` and
registered by `toy_2d.method_registry()` (toy_2d owns the registry and imports this module; this
module imports only nabla_gfn). All of them share toy_2d's finetuning loop, its sampler
(`nabla_gfn.sample_trajectory`), the frozen pretrained ε-network P_F^♯ (the
policy starts as its copy) and the unit of progress: one update = one batch of `cfg.batch_size`
trajectories sampled from the current policy. None of this lives in nabla_gfn.py, which stays the
paper's method. r = log R; the target is p*(x_0) ∝ p^♯(x_0) exp(β r(x_0)).

  DRaFT-K  (Clark et al., ICLR 2024) max E[β r(x_0)]: sample with the policy, keep the graph of the
           last K steps only (earlier steps under no_grad), backpropagate −β r(x_0) through them.
           Optional per-step KL to P_F^♯ on those K steps (`--draft-kl`, off as in the paper).
  ReFL     (Xu et al., NeurIPS 2023, ImageReward) sample without gradients to a random late step i
           (one per batch, uniform in [refl_start·T, T−1]: ImageReward uses 30–39 of 40), predict
           x̂_0(x_i) with one ε̂_θ call and ascend β r(x̂_0).
  DDPO     (Black et al., ICLR 2024) PPO-clip on the per-step Gaussian log-probability ratios
           π_θ(x'|x) / π_old(x'|x) with the advantage of the whole trajectory, β r(x_0) normalised
           over the batch and clipped; several inner epochs of minibatches per sampled batch.
  RTB      (Venkatraman et al., NeurIPS 2024) relative trajectory balance,
           (log Z + Σ_i log P_F^θ(x_{i+1}|x_i) − Σ_i log P_F^♯(x_{i+1}|x_i) − β r(x_0))²,
           with a learned scalar log Z; on-policy trajectories; needs no reward gradient.

Only RTB and ∇-GFlowNet have p* as their optimum. DRaFT, ReFL and DDPO maximise the reward and,
unregularised, drift towards its maximum: that is what the comparison measures (compare_toy.py).

Deliberate simplifications, one line each:
  * ReFL without its interleaved pretraining (denoising) loss and with r itself, not ImageReward's
    ReLU-shifted reward; DRaFT without its LoRA/low-variance tricks (the toy trains the whole MLP).
  * DDPO: unconditional task, so advantages are normalised over the batch (no per-prompt tracker);
    minibatches mix transitions of different trajectories and timesteps.
  * RTB: on-policy only (no off-policy exploration or replay buffer).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor, nn

import nabla_gfn as ng

# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def prefix_schedule(schedule: ng.StepSchedule, num_steps: int) -> ng.StepSchedule:
    """The first `num_steps` steps of a schedule, so that the shared sampler can stop early."""
    return ng.StepSchedule(*(getattr(schedule, f)[:num_steps] for f in schedule.__dataclass_fields__))


def sample_prefix(eps_fn: ng.EpsFn, schedule: ng.StepSchedule, x_T: Tensor, num_steps: int,
                  gen: torch.Generator) -> Tensor:
    """The state after the first `num_steps` steps of the shared sampler (no_grad); x_T itself if 0."""
    if num_steps == 0:
        return x_T
    return ng.sample_trajectory(eps_fn, prefix_schedule(schedule, num_steps), x_T, generator=gen).final


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
    mean = ng.step_mean(batch.x, eps, batch.alpha_bar, batch.alpha_bar_next, batch.sigma)
    return ng.gaussian_log_prob(batch.x_next, mean, batch.sigma)


def trajectory_log_prob(eps_fn: ng.EpsFn, batch: ng.Transitions, num_trajectories: int) -> Tensor:
    """Σ_i log P_F(x_{i+1}|x_i) per trajectory: (N,) transitions → (B,)."""
    log_prob = transition_log_prob(eps_fn, batch)
    return log_prob.new_zeros(num_trajectories).index_add(0, batch.traj, log_prob)


def eps_fn_of(net: nn.Module) -> ng.EpsFn:
    """A (x, τ) network as nabla_gfn's eps_fn(x, t, traj) (the toy is unconditional)."""
    return lambda x, t, traj: net(x, t)


def sample_policy(eps_fn: ng.EpsFn, task, schedule: ng.StepSchedule, n: int, gen: torch.Generator) -> ng.Trajectory:
    """n trajectories of the shared sampler from x_T ~ N(0, I) in the task's dimension."""
    return ng.sample_trajectory(eps_fn, schedule, torch.randn(n, task.dim, generator=gen), generator=gen)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: Tensor, policy: nn.Module, cfg) -> float:
    """zero_grad, backward, clip the policy's gradient norm, step. Returns the pre-clip norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = ng.clip_grad_norms({"policy": policy.parameters()}, cfg.grad_clip)["policy"]
    optimizer.step()
    return norm


# ----------------------------------------------------------------------------------------------
# DRaFT-K: reward backpropagation through the last K sampling steps
# ----------------------------------------------------------------------------------------------


def sample_with_grad_tail(
    policy_eps: ng.EpsFn, reference_eps: ng.EpsFn, schedule: ng.StepSchedule, x_T: Tensor, k: int,
    gen: torch.Generator, with_kl: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Sample like `nabla_gfn.sample_trajectory`, keeping the autograd graph of the last k steps only.

    Steps 0 … T−k−1 run through the shared sampler under no_grad; the last k steps repeat its update
    x' = μ_θ(x) + σ z with the graph kept, so ∂x_0/∂θ flows through exactly the last k ε̂_θ calls
    (and through the states between them). Returns (x_0 (B, D) with graph, the state x_{T−k} where
    the graph starts (B, D), Σ over the k steps of KL(P_F^θ(·|x) ‖ P_F^♯(·|x)) per row (B,), zero
    unless with_kl).
    """
    T = schedule.num_steps
    k = max(1, min(k, T))
    start = sample_prefix(policy_eps, schedule, x_T, T - k, gen)
    B = len(x_T)
    traj = torch.arange(B)
    x, kl = start, x_T.new_zeros(B)
    for i in range(T - k, T):
        t = schedule.timesteps[i].expand(B)
        a, a_next, sigma = step_coefficients(schedule, i, B)
        mean = ng.step_mean(x, policy_eps(x, t, traj), a, a_next, sigma)
        if with_kl:  # KL of two Gaussians with the same σ: ‖μ_θ − μ^♯‖² / (2σ²)
            with torch.no_grad():
                mean_ref = ng.step_mean(x, reference_eps(x, t, traj), a, a_next, sigma)
            kl = kl + (mean - mean_ref).pow(2).sum(-1) / (2 * sigma**2)
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        x = mean + sigma[:, None] * noise
    return x, start, kl


def draft_train_step(task, policy, reference, aux, optimizer, schedule, cfg, gen) -> Dict[str, float]:
    """DRaFT-K: minimise −β r(x_0) (+ draft_kl · Σ_last-K KL) through the last K steps."""
    x_T = torch.randn(cfg.batch_size, task.dim, generator=gen)
    x0, _, kl = sample_with_grad_tail(eps_fn_of(policy), eps_fn_of(reference), schedule, x_T,
                                      cfg.draft_k, gen, with_kl=cfg.draft_kl > 0)
    reward = task.log_reward(x0, torch.arange(len(x0)))
    loss = -(cfg.beta * reward).mean() + cfg.draft_kl * kl.mean()
    norm = optimizer_step(optimizer, loss, policy, cfg)
    return {"loss": loss.item(), "reward": reward.mean().item(), "grad_norm_policy": norm, "kl_last_k": kl.mean().item()}


# ----------------------------------------------------------------------------------------------
# ReFL: one-step clean prediction at a random late step
# ----------------------------------------------------------------------------------------------


def refl_step_index(num_steps: int, start_fraction: float, gen: torch.Generator) -> int:
    """A uniform random step in [⌊start_fraction·T⌋, T−1] (ImageReward: 30–39 of 40 steps)."""
    lo = min(int(start_fraction * num_steps), num_steps - 1)
    return int(torch.randint(lo, num_steps, (1,), generator=gen))


def refl_prediction(policy_eps: ng.EpsFn, schedule: ng.StepSchedule, x_T: Tensor, stop: int,
                    gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Sample without gradients to the state x_stop, then x̂_0(x_stop) with one ε̂_θ call (graph kept).

    Returns (x̂_0 (B, D) whose only path to θ is that one ε̂_θ call, x_stop (B, D) detached).
    """
    x = sample_prefix(policy_eps, schedule, x_T, stop, gen)
    B = len(x)
    t = schedule.timesteps[stop].expand(B)
    x0_hat = ng.x0_prediction(x, policy_eps(x, t, torch.arange(B)), schedule.alpha_bar[stop].expand(B))
    return x0_hat, x


def refl_train_step(task, policy, reference, aux, optimizer, schedule, cfg, gen) -> Dict[str, float]:
    """ReFL: minimise −β r(x̂_0(x_i)) at a random late step i."""
    stop = refl_step_index(schedule.num_steps, cfg.refl_start, gen)
    x_T = torch.randn(cfg.batch_size, task.dim, generator=gen)
    x0_hat, _ = refl_prediction(eps_fn_of(policy), schedule, x_T, stop, gen)
    reward = task.log_reward(x0_hat, torch.arange(len(x0_hat)))
    loss = -(cfg.beta * reward).mean()
    norm = optimizer_step(optimizer, loss, policy, cfg)
    return {"loss": loss.item(), "reward": reward.mean().item(), "grad_norm_policy": norm, "refl_step": stop}


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


def ddpo_train_step(task, policy, reference, aux, optimizer, schedule, cfg, gen) -> Dict[str, float]:
    """DDPO: sample a batch, then ppo_epochs × ppo_minibatches PPO-clip steps on all its transitions."""
    policy_eps = eps_fn_of(policy)
    trajectory = sample_policy(policy_eps, task, schedule, cfg.batch_size, gen)
    reward = task.reward(trajectory.final)
    advantages = normalised_advantages(cfg.beta * reward, cfg.ppo_adv_clip)
    batch = all_transitions(trajectory, schedule)
    # π_old: the Gaussian step the sampler actually took, from the ε̂ it recorded.
    old_mean = ng.step_mean(batch.x, batch.eps_old, batch.alpha_bar, batch.alpha_bar_next, batch.sigma)
    old_log_prob = ng.gaussian_log_prob(batch.x_next, old_mean, batch.sigma)
    row_advantages = advantages[batch.traj]
    losses, norms, clip_fracs, kls = [], [], [], []
    for _ in range(cfg.ppo_epochs):
        for rows in torch.randperm(len(batch), generator=gen).chunk(cfg.ppo_minibatches):
            minibatch = batch.select(rows)
            loss, stats = ppo_clip_loss(transition_log_prob(policy_eps, minibatch), old_log_prob[rows],
                                        row_advantages[rows], cfg.ppo_clip)
            norms.append(optimizer_step(optimizer, loss, policy, cfg))
            losses.append(loss.item()), clip_fracs.append(float(stats["clip_fraction"])), kls.append(float(stats["approx_kl"]))
    return {"loss": sum(losses) / len(losses), "reward": float(reward.mean()), "grad_norm_policy": max(norms),
            "clip_fraction": sum(clip_fracs) / len(clip_fracs), "approx_kl": kls[-1], "optimizer_steps": len(losses)}


# ----------------------------------------------------------------------------------------------
# RTB: relative trajectory balance with a learned log Z
# ----------------------------------------------------------------------------------------------


class LogPartition(nn.Module):
    """The scalar log Z of relative trajectory balance (Z = ∫ p^♯ R^β), initialised at 0."""

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(torch.zeros(()))

    def forward(self) -> Tensor:
        return self.value


def rtb_loss(log_z: Tensor, log_pf_policy: Tensor, log_pf_reference: Tensor, log_reward: Tensor, beta: float) -> Tensor:
    """Relative trajectory balance: mean over trajectories of (log Z + Σ log P_F^θ − Σ log P_F^♯ − β r(x_0))².

    log_pf_*: (B,) per-trajectory sums; log_reward: (B,). Zero at policy = reference, β r = 0 and
    log Z = 0 (tested); its minimiser over policies is p^♯ R^β / Z, the target. Gradients reach the
    policy through log_pf_policy and log Z; pass the reference and the reward detached.
    """
    residual = log_z + log_pf_policy - log_pf_reference - beta * log_reward
    return residual.pow(2).mean()


def rtb_train_step(task, policy, reference, aux, optimizer, schedule, cfg, gen) -> Dict[str, float]:
    """RTB on on-policy trajectories: one optimiser step on θ and log Z per batch."""
    policy_eps = eps_fn_of(policy)
    trajectory = sample_policy(policy_eps, task, schedule, cfg.batch_size, gen)
    batch = all_transitions(trajectory, schedule)
    log_pf_policy = trajectory_log_prob(policy_eps, batch, cfg.batch_size)
    with torch.no_grad():
        log_pf_reference = trajectory_log_prob(eps_fn_of(reference), batch, cfg.batch_size)
        reward = task.reward(trajectory.final)
    loss = rtb_loss(aux(), log_pf_policy, log_pf_reference, reward, cfg.beta)
    norm = optimizer_step(optimizer, loss, policy, cfg)
    return {"loss": loss.item(), "reward": reward.mean().item(), "grad_norm_policy": norm, "log_z": aux().item()}


# ----------------------------------------------------------------------------------------------
# The baselines, as toy_2d registers them
# ----------------------------------------------------------------------------------------------

# --method name → (train step, one-line summary); RTB's extra trainable module is `LogPartition`.
BASELINES = {
    "draft": (draft_train_step, "DRaFT-K: reward backprop through the last K steps"),
    "refl": (refl_train_step, "ReFL: reward of the one-step x̂_0 at a random late step"),
    "ddpo": (ddpo_train_step, "DDPO: PPO-clip on per-step log-probability ratios"),
    "rtb": (rtb_train_step, "RTB: relative trajectory balance with a learned log Z"),
}
