"""Diagnostics of rung 1 (toy_2d.py) that need its closed-form target, and the cost counters.

    python experiments/toy_diagnostics.py                       # toy_2d.py's default run + everything below
    python experiments/toy_diagnostics.py --method exact-flow   # the policy trained on the exact flow
    python experiments/toy_diagnostics.py --dim 8 --updates 100 # any toy_2d.py flag

Each command is `toy_2d.run` with `toy_2d.Hooks` filled in, so the finetuned and pretrained numbers are
toy_2d.py's own (same seed, same draws). It adds, in metrics.json and figure.png:
  * the oracle: the pretrained step shifted by the exact residual flow, μ♯ + σ² ∇ log F̃(μ♯), the best
    a Gaussian-step policy can do ("oracle"), and exact target samples scored like a sampler (the
    metrics' floor, "exact_target_samples"), the pretrained sampler's TV to the prior ("prior_mode_tv");
  * per-step relative errors of the learned flow (forward-looking guess, guess + g_φ) and of the two
    one-sample targets g_φ can be trained on, against the exact ∇ log F̃ ("flow_relative_error", and
    a figure panel);
  * cost counters in every history row: reward calls ("reward_calls"), reward gradients
    ("reward_grad_calls") and network VJPs ("network_vjps"), cumulative;
  * `--method exact-flow`: the forward residual regressed on the exact ∇ log F̃ (no guess, no g_φ).
The README's hero figure assets/toy_2d.png is this script's figure.png at toy_2d.py's defaults:
    python experiments/toy_diagnostics.py --out runs/toy_2d/hero && cp runs/toy_2d/hero/figure.png assets/toy_2d.png
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the rungs live at the repository root

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import baselines as bl  # noqa: E402
import gmm  # noqa: E402
import nabla_gfn as ng  # noqa: E402
import toy_2d as T  # noqa: E402

# ---------------------------------------------------------------------------------------------- cost counters


class RewardGradCounter:
    """Wraps r(x, ...) and counts the rows it scores (`calls`, with or without a graph, as digits' CostMeter)
    and those scored with a graph to x (`rows`: each costs one reward gradient)."""

    def __init__(self, reward: Callable[..., Tensor]):
        self.reward, self.rows, self.calls = reward, 0, 0

    def __call__(self, x: Tensor, *args) -> Tensor:
        self.calls += len(x)
        if torch.is_grad_enabled() and x.requires_grad:
            self.rows += len(x)
        return self.reward(x, *args)


class NetworkVJPCounter:
    """Counts network rows evaluated with an autograd graph (ε̂_θ, ε̂♯ with x requiring grad, g_φ).

    Each such row is backpropagated once by the loss or by the adjoint sweep: the cost unit "network
    VJPs" of the comparisons. Sampling under no_grad is not counted. Remove when done.
    """

    def __init__(self, modules: List[Optional[nn.Module]]):
        self.rows = 0
        self.handles = [m.register_forward_hook(self._count) for m in modules if m is not None]

    def _count(self, module, inputs, output):
        if torch.is_grad_enabled() and output.requires_grad:
            self.rows += len(inputs[0])

    def remove(self):
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def cost_counters(trainee: bl.Trainee, modules: List[Optional[nn.Module]]):
    """toy_2d.Hooks.counters: count reward calls and gradients and network VJPs while `finetune` trains; yields
    a function giving the cumulative counts {"reward_calls", "reward_grad_calls", "network_vjps"}."""
    rewards = RewardGradCounter(trainee.log_reward)
    trainee.log_reward = rewards
    vjps = NetworkVJPCounter(modules)
    try:
        yield lambda: {"reward_calls": rewards.calls, "reward_grad_calls": rewards.rows, "network_vjps": vjps.rows}
    finally:
        vjps.remove()


# ---------------------------------------------------------------------------------------------- the exact-flow oracle


def analytic_eps(prior: T.GMM, alphas_cumprod: Tensor) -> ng.EpsFn:
    """The exact ε-model of the prior: ε̂(x, τ) = −√(1−ᾱ_τ) ∇ log p♯_τ(x), as an eps_fn (float64 math).

    A pretrained network with zero error; alphas_cumprod: the scheduler's (1000,) tensor.
    """

    def eps_fn(x: Tensor, t: Tensor, traj: Tensor) -> Tensor:
        a = alphas_cumprod.to(torch.float64)[t.cpu()].to(x.device)
        return (-(1 - a).sqrt()[:, None] * prior.score(x.double(), a)).to(x.dtype)

    return eps_fn


def analytic_velocity(prior: T.GMM) -> ng.EpsFn:
    """The exact velocity model of the prior on the rectified-flow path (`gmm.exact_velocity`), τ = 1000 t."""
    return lambda x, t, traj: gmm.exact_velocity(prior, x, t.to(torch.float64).cpu().to(x.device) / 1000)


def step_index(schedule: ng.StepSchedule, t: Tensor) -> Tensor:
    """The step i of each row's timestep τ_i: (N,) long."""
    return (schedule.timesteps.to(t.device)[None, :] == t[:, None]).long().argmax(1)


def oracle_eps(task: T.Task, reference_eps: ng.EpsFn, schedule: ng.StepSchedule) -> ng.EpsFn:
    """ε̂ whose step mean is μ♯(x) + σ_τ² ∇ log F̃_τ'(μ♯(x)): the pretrained step tilted by the exact flow.

    The optimal policy is P_F♯(x'|x) F̃(x') / F̃(x); linearising log F̃ around μ♯ gives this Gaussian
    (the best a Gaussian-step policy can do). step_mean is affine in ε̂, so the ε̂ that shifts the mean
    by δ is ε̂♯ + δ / b, with μ = a x + b ε̂. Needs a closed-form target (for --model flow: exact at the
    memoryless noise level only, `gmm.exact_flow_score`).
    """

    def eps_fn(x: Tensor, t: Tensor, traj: Tensor) -> Tensor:
        i = step_index(schedule, t)
        mean_coef, sigma = schedule.mean_coef[i], schedule.sigma[i].to(x.dtype)[:, None]
        eps_sharp = reference_eps(x, t, traj)
        mean_sharp = ng.affine(mean_coef, x, eps_sharp)
        flow = gmm.exact_flow_score(task.prior, task.target, mean_sharp, schedule.alpha_bar_next[i], task.model)
        return eps_sharp + sigma**2 * flow / mean_coef[:, 1:].to(x.dtype)

    return eps_fn


@torch.no_grad()
def sample_oracle(task: T.Task, reference: nn.Module, schedule: ng.StepSchedule, n: int, gen: torch.Generator) -> Tensor:
    """Final samples of the exact-flow oracle policy (`oracle_eps`)."""
    return T.sample(oracle_eps(task, T.as_eps_fn(reference), schedule), schedule, n, gen, task.dim).final


# ---------------------------------------------------------------------------------------------- the learned flow against the exact one


def _relative_error(estimate: Tensor, exact: Tensor) -> float:
    return float((estimate - exact).norm(dim=1).mean() / exact.norm(dim=1).mean().clamp(min=1e-8))


def _projection(estimate: Tensor, exact: Tensor) -> float:
    """Σ⟨estimate, exact⟩ / Σ‖exact‖²: 1 for an unbiased estimate, < 1 when it shrinks the flow."""
    return float((estimate * exact).sum() / exact.pow(2).sum().clamp(min=1e-12))


def bootstrap_flow_target(policy: nn.Module, reference: nn.Module, trajectory: ng.Trajectory,
                          schedule: ng.StepSchedule, i: int) -> Tensor:
    """The paper's one-sample reverse target for ∇ log F̃(x_i): −∇_x[log P_F^θ − log P_F^♯](x_{i+1}|x_i).

    (guess + g_φ at x is pulled towards it by L_B.) Its mean is J♯ᵀ(μ_θ − μ♯)/σ² — the policy's own
    learned residual carried one link back: the TD(0) chain. (N, D), detached.
    """
    x = trajectory.states[:, i].detach().requires_grad_(True)
    x_next, n = trajectory.states[:, i + 1], len(x)
    mean_coef, sigma, t = schedule.mean_coef[i].expand(n, 2), schedule.sigma[i].expand(n), schedule.timesteps[i].expand(n)
    log_ratio = (ng.gaussian_log_prob(x_next, ng.affine(mean_coef, x, policy(x, t)), sigma)
                 - ng.gaussian_log_prob(x_next, ng.affine(mean_coef, x, reference(x, t)), sigma))
    return -torch.autograd.grad(log_ratio.sum(), x)[0]


def flow_errors(task: T.Task, policy: nn.Module, flow: Optional[nn.Module], trajectory: ng.Trajectory,
                schedule: ng.StepSchedule, cfg: T.ToyConfig, reference: Optional[nn.Module] = None) -> Dict[str, List[float]]:
    """Per step (0 = x_T), on the policy's own states, against the exact ∇ log F̃:

    relative error ‖· − exact‖ / ‖exact‖ (mean over samples) of the learned flow (forward-looking
    guess, guess + g_φ), of the two one-sample targets g_φ can be trained on (the lean adjoint
    a_i, the bootstrapped reverse target) and of θ's target under --control-variate,
    a_i − ½[h(x_i) − h(x̃_i)] with h = guess + g_φ and x̃_i = 2 μ_θ(x_{i−1}) − x_i (None at step 0),
    and each one's projection Σ⟨·, exact⟩ / Σ‖exact‖² (1 = unbiased on average; the targets' noise
    averages out of it, their shrinkage does not). The targets need the frozen `reference`; without
    it only the learned flow is scored.
    """
    keys = ("guess", "guess_plus_flow", "adjoint_target", "bootstrap_target", "control_variate_target")
    out = {**{k: [] for k in keys}, **{f"projection_{k}": [] for k in keys[1:]}}
    if reference is not None:
        adjoint, _ = ng.lean_adjoint(T.as_eps_fn(reference), schedule, trajectory, task.log_reward, cfg.beta)
    guess_net = T.as_eps_fn(reference if cfg.guess_from == "reference" and reference is not None else policy)
    for i in range(schedule.num_steps):
        x = trajectory.states[:, i]
        n = len(x)
        t, a = schedule.timesteps[i].expand(n), schedule.alpha_bar[i].expand(n)
        h = lambda y: ng.forward_looking_score(guess_net, task.log_reward, y, t, a, torch.arange(n), cfg.beta, cfg.gamma,
                                               schedule.x0_coef[i].expand(n, 2))[0]
        guess = h(x)
        exact = gmm.exact_flow_score(task.prior, task.target, x, a, task.model)
        estimates = {"guess": guess.detach()}
        if reference is not None:
            estimates["adjoint_target"] = adjoint[:, i]
            estimates["bootstrap_target"] = bootstrap_flow_target(policy, reference, trajectory, schedule, i)
        if flow is not None:
            with torch.no_grad():
                estimates["guess_plus_flow"] = guess.detach() + flow(x, t)
            if reference is not None and i > 0:  # θ's control-variate target at x_i, from its parent's step
                mean_old = ng.affine(schedule.mean_coef[i - 1].expand(n, 2), trajectory.states[:, i - 1], trajectory.eps[:, i - 1])
                mirror = 2 * mean_old - x
                with torch.no_grad():
                    h_mirror = h(mirror) + flow(mirror, t)
                estimates["control_variate_target"] = adjoint[:, i] - 0.5 * (estimates["guess_plus_flow"] - h_mirror)
            elif reference is not None:
                out["control_variate_target"].append(None), out["projection_control_variate_target"].append(None)
        for key, estimate in estimates.items():
            out[key].append(_relative_error(estimate, exact))
            if f"projection_{key}" in out:
                out[f"projection_{key}"].append(_projection(estimate, exact))
    return out


# ---------------------------------------------------------------------------------------------- --method exact-flow


def exact_flow_update(task: T.Task) -> Callable[[bl.Trainee, bl.MethodConfig, torch.Generator], Dict[str, float]]:
    """Diagnostic update: the forward residual regressed on the *exact* ∇ log F̃(x') (no guess, no g_φ).

    Shows how fast the policy side alone converges; the gap to nabla-db is the cost of having to
    learn the flow. Needs a closed-form target.
    """
    if task.target is None:
        raise SystemExit("error: --method exact-flow needs a closed-form target (a --reward preset or JSON)")

    def update(trainee: bl.Trainee, hp: bl.MethodConfig, gen: torch.Generator) -> Dict[str, float]:
        trajectory = bl.sample_policy(trainee, hp.batch_size, gen)
        steps = ng.subsample_steps(trainee.schedule.num_steps, hp.fraction, hp.batch_size, gen)
        b = ng.gather_transitions(trajectory, trainee.schedule, steps)
        mean_policy = bl.step_mean_of(trainee.policy_eps(b.x, b.t, b.traj), b)
        with torch.no_grad():
            mean_reference = bl.step_mean_of(trainee.reference_eps(b.x, b.t, b.traj), b)
            target = gmm.exact_flow_score(task.prior, task.target, b.x_next, b.alpha_bar_next, task.model)
        weight, _ = ng.transition_weights(b.sigma, hp.loss.weighting)
        loss = (weight * (ng.forward_residual(mean_policy, mean_reference, b.sigma) - target).pow(2).mean(1)).mean()
        logs = bl.optimizer_step(trainee, loss, hp.grad_clip)
        logs.update(loss=loss.item(), reward=float(task.reward(trajectory.final).mean()))
        return logs

    return update


# ---------------------------------------------------------------------------------------------- hooks into toy_2d.run


def add_oracle_and_flow_errors(cfg: T.ToyConfig, task: T.Task, reference: nn.Module, policy: nn.Module,
                               flow: Optional[nn.Module], schedule: ng.StepSchedule, finetuned: ng.Trajectory,
                               gen: torch.Generator, result: dict, samples: dict):
    """toy_2d.Hooks.evaluate: the oracle and exact-target samples (drawn on from the evaluation generator),
    the prior's TV, and the flow errors on 500 of the finetuned policy's evaluation trajectories."""
    if task.target is None:
        return
    n = cfg.eval_samples
    samples["oracle"] = sample_oracle(task, reference, schedule, n, gen)
    samples["target"] = task.target.sample(n, gen).float()
    result["oracle"] = T.metrics(task, samples["oracle"])
    result["exact_target_samples"] = T.metrics(task, samples["target"], seed=cfg.seed + 7)
    sub = ng.Trajectory(finetuned.states[:500], finetuned.eps[:500])
    result["flow_relative_error"] = flow_errors(task, policy, flow, sub, schedule, cfg, reference)
    prior_weights = T.mode_weights(samples["pretrained"], task.prior.means)
    result["prior_mode_tv"] = 0.5 * float((prior_weights - task.prior.weights).abs().sum())


def flow_error_panel(ax, result: dict, cfg: T.ToyConfig):
    """toy_2d.Hooks.panels: the per-step relative errors of `flow_errors` (log scale)."""
    if "flow_relative_error" not in result:
        return ax.set_title("no exact flow (no closed-form target)")
    err = result["flow_relative_error"]
    ax.plot(err["guess"], label="guess β γ ∇r(x̂₀)")
    if err["guess_plus_flow"]:
        ax.plot(err["guess_plus_flow"], label=f"guess + g_φ ({cfg.flow_target})")
    for key, color, name in (("adjoint_target", "C3", "lean adjoint a_i"), ("bootstrap_target", "C4", "bootstrapped"),
                             ("control_variate_target", "C2", "θ's with the control variate")):
        if err.get(key):
            ax.plot(np.array(err[key], dtype=float), ":", c=color, label=f"one-sample target: {name}")
    ax.set_yscale("log"), ax.set_xlabel("step (0 = noise)"), ax.legend()
    ax.set_title("‖learned − exact ∇log F̃‖ / ‖exact‖")


HOOKS = T.Hooks(methods={"exact-flow": exact_flow_update}, counters=cost_counters,
                evaluate=add_oracle_and_flow_errors, panels=[flow_error_panel])
METHOD_NAMES = (*T.METHOD_NAMES, *HOOKS.methods)  # toy_2d's methods + exact-flow


def validate(cfg: T.ToyConfig) -> T.ToyConfig:
    """toy_2d.check_method with --method exact-flow allowed (the other fields are checked by ToyConfig itself)."""
    return T.check_method(cfg, METHOD_NAMES)


def finetune(cfg: T.ToyConfig, task: T.Task, reference: nn.Module, schedule: ng.StepSchedule, quiet: bool = False):
    """toy_2d.finetune with the cost counters (and exact-flow). Returns (policy, g_φ or None, history)."""
    return T.finetune(cfg, task, reference, schedule, quiet, HOOKS)


def evaluate(cfg: T.ToyConfig, task: T.Task, reference: nn.Module, policy: nn.Module, flow, schedule) -> tuple:
    """toy_2d.evaluate + the oracle, exact target samples and flow errors. Returns (metrics, samples)."""
    return T.evaluate(cfg, task, reference, policy, flow, schedule, HOOKS)


def run(cfg: T.ToyConfig, log_reward=None, quiet: bool = False) -> dict:
    """toy_2d.run with every diagnostic: what the experiments (comparisons, D-sweep, ablations) call."""
    return T.run(cfg, log_reward, quiet, HOOKS)


def main(argv=None):
    T.main(argv, HOOKS)


if __name__ == "__main__":
    main()
