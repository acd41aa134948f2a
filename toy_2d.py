"""Rung 1: ∇-GFlowNet on 2-D Gaussian mixtures, judged against the exactly computed target.

    python toy_2d.py                                   # ring8 prior, "bump" reward, ~1 min on a laptop CPU
    python toy_2d.py --prior grid25 --reward bump
    python toy_2d.py --reward '{"type": "linear", "w": [0.7, 0.3]}' --beta 1
    python toy_2d.py --prior '{"means": [[-2, 0], [2, 0]], "weights": [0.5, 0.5], "std": 0.4}'
    python toy_2d.py --dim 32 --reward bump-all        # ring8 in 32 coordinates, a bump that reads all of them
    python toy_2d.py --method kl-pg                    # any method of baselines.METHODS (rtb, grpo, kl-pg, …)
    python toy_2d.py --model flow                      # a rectified-flow velocity network, the flow SDE (toy_models.py)
    python experiments/toy_diagnostics.py              # + exact-flow oracle, flow errors, cost counters (the
                                                       #   README's figure: its figure.png at these defaults)

A small MLP ε-network is pretrained on samples of a Gaussian-mixture prior p♯ and frozen as P_F♯; the
policy P_F^θ starts as an exact copy and is finetuned towards p*(x_0) ∝ p♯(x_0) R(x_0)^β. For a GMM
prior and a Gaussian or linear log-reward the target is again a GMM, and the residual flow score
∇ log F̃_τ = ∇ log p*_τ − ∇ log p♯_τ is exact at every noise level (gmm.py): exact metrics, and an exact
check of the learned flow (experiments/toy_diagnostics.py). `--dim D` keeps all of this exact in D
dimensions (the modes get one fixed offset each in the other D − 2 coordinates; the figure shows two).

Outputs (in --out): samples.npy, metrics.json, config.json, figure.png. The sampler is diffusers'
DDIMScheduler with Stable Diffusion's scaled-linear betas: the code path of sd_finetune.py.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import baselines as bl
import cli
import nabla_gfn as ng
from cli import opt
from gmm import (GMM, PRIOR_PRESETS, REWARD_PRESETS, mode_tv, mode_weights, parse_prior, parse_reward,
                 sliced_wasserstein)
from toy_models import MODELS, make_sampler, sd_scheduler, training_pair


# ---------------------------------------------------------------------------------------------- config, task

METHOD_NAMES = tuple(bl.METHODS)  # every --method comes from the one registry
AT_LEAST_1 = (lambda v: v >= 1, "must be ≥ 1")
# --preset: named settings applied before the flags; "paper" is the paper's ∇-DB loss, defined here once
PRESETS = {"default": {}, "paper": {"flow_target": "bootstrap", "weighting": "plain", "gamma": "alpha_bar", "guess_from": "policy"}}


@dataclass
class ToyConfig:
    """Every setting of a run, one --flag each (cli.py; a bad value is one line), saved as config.json."""

    preset: str = opt("default", "named settings applied before the flags: default, or paper (the paper's ∇-DB)",
                      choices=tuple(PRESETS))
    prior: str = opt("ring8", f"prior preset {sorted(PRIOR_PRESETS)} or GMM JSON (gmm.py)")
    reward: str = opt("bump", f"reward preset {sorted(REWARD_PRESETS)} or JSON (gmm.py)")
    dim: int = opt(2, "dimension D: the prior's modes in the first two coordinates, fixed offsets in the others",
                   check=(lambda v: v >= 2, "must be an integer ≥ 2 (the modes sit in the first two coordinates)"))
    beta: float = opt(1.0, "reward scale β: target p♯·R^β", check=cli.POSITIVE)
    num_steps: int = opt(50, "sampling steps", check=AT_LEAST_1)
    model: str = opt("ddpm", "ddpm (ε-network, DDIM(η=1)) or flow (rectified-flow velocity, flow SDE)", choices=MODELS)
    noise_level: float = opt(math.sqrt(2), "--model flow: a in the SDE's σ_t = a√(t/(1−t)); √2 is memoryless",
                             check=cli.POSITIVE)
    # pretraining of the ε-network (cached on disk, keyed by these fields and the prior)
    pretrain_iters: int = opt(3000, "pretraining iterations")
    pretrain_batch: int = opt(512, "pretraining batch size")
    pretrain_lr: float = opt(2e-3, "pretraining learning rate")
    hidden: int = opt(128, "hidden width of the ε-network (max(hidden, 2·D) in D dimensions)")
    # finetuning
    method: str = opt("nabla-db", f"one of {', '.join(METHOD_NAMES)} (exact-flow: experiments/toy_diagnostics.py)")
    updates: int = opt(300, "finetuning updates (one optimiser step each)", check=AT_LEAST_1)
    batch_size: int = opt(128, "trajectories sampled per update", check=AT_LEAST_1)
    fraction: float = opt(0.1, "fraction of non-terminal transitions trained on", check=cli.FRACTION)
    lr: float = opt(2e-3, "policy learning rate (AdamW)")
    flow_lr: float = opt(2e-3, "g_φ learning rate (AdamW)")
    flow_hidden: int = opt(128, "hidden width of g_φ (max(flow_hidden, 2·D) in D dimensions)")
    trust_region: float = opt(0.0, "λ, weight of ‖ε̂_θ − ε̂_old‖²")
    reverse_weight: float = opt(1.0, "w_B, weight of the reverse term")
    gamma: str = opt("sqrt_alpha_bar", "γ_τ (toy: √ᾱ, measured better here; nabla_gfn default ᾱ)",
                     choices=ng.GAMMA_CHOICES)
    guess_from: str = opt("reference", "whose x̂_0 the guess uses (paper: policy, whose guess runs away on sharp rewards)",
                          choices=ng.GUESS_CHOICES)
    weighting: str = opt("kl", "transition weighting (paper: plain)", choices=ng.WEIGHTING_CHOICES)
    flow_target: str = opt("adjoint", "what trains g_φ: bootstrap (the paper's L_F + L_B), adjoint (the lean adjoint "
                           "a_{i+1}), mixed (L_B on (1−λ)·bootstrap + λ·a_i)", choices=ng.FLOW_TARGET_CHOICES)
    adjoint_lambda: float = opt(0.5, "λ of --flow-target mixed", check=(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    control_variate: bool = opt(True, "θ fits a_{i+1} with guess + g_φ as its antithetic control variate (adjoint target)")
    lr_schedule: str = opt("cosine", "every learning rate constant, or cosine-decayed to 0", choices=("constant", "cosine"))
    grad_clip: float = opt(1.0, "max grad norm, per parameter group")
    # baselines (baselines.py); the policy lr is --lr for every method
    draft_k: int = opt(1, "DRaFT-K: last sampling steps the reward gradient flows through (1 = DRaFT-1)")
    draft_kl: float = opt(0.0, "DRaFT-K: weight of the per-step KL to P_F♯ on those K steps (0 = off, as in the paper)")
    refl_start: float = opt(0.75, "ReFL: stop at a uniform step in [refl_start·T, T−1] (ImageReward: 30–39 of 40)")
    ppo_clip: float = opt(0.1, "DDPO, GRPO, KL-PG: PPO clip range ε of the per-step ratio (Flow-GRPO: 1e-4)")
    ppo_epochs: int = opt(2, "DDPO, GRPO, KL-PG: inner epochs over each sampled batch")
    ppo_minibatches: int = opt(4, "DDPO, GRPO, KL-PG: minibatches per inner epoch (one optimiser step each)")
    ppo_adv_clip: float = opt(5.0, "DDPO, GRPO: clip of the normalised advantages")
    grpo_kl: float = opt(0.04, "GRPO: weight of the per-step KL to P_F♯ (Flow-GRPO's default on SD3.5 GenEval/OCR: 0.04)")
    rtb_logz_lr: float = opt(0.1, "RTB: learning rate of the scalar log Z")
    # evaluation and bookkeeping
    eval_samples: int = opt(4000, "samples for the final metrics")
    eval_every: int = opt(25, "updates between metric-curve points")
    seed: int = opt(0, "random seed")
    out: str = opt("", "output folder (default runs/toy_2d/<prior>_<reward>_<method>)")
    cache_dir: str = opt("", "pretrained-model cache (default $NABLA_GFN_CACHE or ~/.cache/nabla-gfn)")
    threads: int = opt(1, "torch CPU threads (tiny MLPs run fastest on one)")
    no_figure: bool = opt(False, "skip figure.png")

    def __post_init__(self):
        cli.validate(self)

    @property
    def loss_config(self) -> ng.LossConfig:
        """The configured ∇-DB loss with the method's fixed fields (no-flow, adjoint-matching) applied."""
        base = ng.LossConfig(beta=self.beta, trust_region=self.trust_region, reverse_weight=self.reverse_weight,
                             gamma=self.gamma, weighting=self.weighting, use_flow=True, guess_from=self.guess_from,
                             flow_target=self.flow_target, adjoint_lambda=self.adjoint_lambda,
                             control_variate=self.control_variate and self.flow_target == "adjoint")
        return bl.METHODS[self.method].loss_config(base) if self.method in bl.METHODS else base


def method_config(cfg: ToyConfig) -> bl.MethodConfig:
    """This rung's config fields → the registry's method hyper-parameters."""
    return bl.MethodConfig(beta=cfg.beta, batch_size=cfg.batch_size, fraction=cfg.fraction, grad_clip=cfg.grad_clip,
                           loss=cfg.loss_config, draft_k=cfg.draft_k, draft_kl=cfg.draft_kl, refl_start=cfg.refl_start,
                           ppo_clip=cfg.ppo_clip, ppo_epochs=cfg.ppo_epochs, ppo_minibatches=cfg.ppo_minibatches,
                           ppo_adv_clip=cfg.ppo_adv_clip, kl_coef=cfg.grpo_kl)


@dataclass
class Task:
    """One prior, reward and β, and the exact target p♯·R^β (None for a user reward without a closed form)."""

    prior: GMM
    reward: Callable[[Tensor], Tensor]
    beta: float
    target: Optional[GMM]
    model: str = "ddpm"  # the pretrained family, and so the forward path of the exact marginals (gmm.PATHS)

    dim = property(lambda self: self.prior.dim)  # D

    def log_reward(self, x0: Tensor, traj: Tensor) -> Tensor:
        return self.reward(x0)


def build_task(cfg: ToyConfig, log_reward: Optional[Callable[[Tensor], Tensor]] = None) -> Task:
    """Prior and reward from the config; a user callable `log_reward` replaces --reward (no exact target)."""
    prior = parse_prior(cfg.prior, cfg.dim)
    if log_reward is not None:
        return Task(prior, log_reward, cfg.beta, None, cfg.model)
    reward = parse_reward(cfg.reward, prior)
    return Task(prior, reward, cfg.beta, reward.tilt(prior, cfg.beta), cfg.model)


# ---------------------------------------------------------------------------------------------- networks, pretraining P_F♯

class TimeMLP(nn.Module):
    """(x, τ) → vector shaped like x. Sinusoidal embedding of τ/1000, three SiLU layers."""

    def __init__(self, hidden: int = 128, dim: int = 2, freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000), freqs)), persistent=False)
        self.net = nn.Sequential(nn.Linear(dim + 2 * freqs, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        angle = (t.to(x.dtype) / 1000)[:, None] * self.freqs
        return self.net(torch.cat([x, angle.sin(), angle.cos()], -1))


def network_width(hidden: int, dim: int) -> int:
    """Width of the ε-network and g_φ in D dimensions: max(hidden, 2·D). A layer must stay wider than its
    D-dimensional output; the prior's score needs only ~K mode features (4·D was tried: no gain, more CPU)."""
    return max(hidden, 2 * dim)


def as_eps_fn(net: nn.Module) -> ng.EpsFn:
    """Adapt a (x, τ) network to nabla_gfn's eps_fn(x, t, traj) (the toy is unconditional)."""
    return lambda x, t, traj: net(x, t)


def sample(eps_fn: ng.EpsFn, schedule: ng.StepSchedule, n: int, gen: torch.Generator, dim: int = 2) -> ng.Trajectory:
    """n trajectories of the shared sampler from x_T ~ N(0, I) (states, ε̂ and the final x_0)."""
    return ng.sample_trajectory(eps_fn, schedule, torch.randn(n, dim, generator=gen), generator=gen)


def make_flow(cfg: ToyConfig) -> TimeMLP:
    """g_φ: a TimeMLP whose output layer is zeroed, so ∇ log F̃ starts at the forward-looking guess."""
    return ng.zero_output_layer(TimeMLP(network_width(cfg.flow_hidden, cfg.dim), cfg.dim))


def pretrain(cfg: ToyConfig, prior: GMM, scheduler, quiet: bool = False) -> TimeMLP:
    """Regression on prior samples, E‖target − net(x_τ, τ)‖² (`toy_models.training_pair`: ε for ddpm, ε − x_0 for
    flow), cached under --cache-dir (else $NABLA_GFN_CACHE, else ~/.cache/nabla-gfn), keyed by the prior, the model
    family and the pretraining fields."""
    width = network_width(cfg.hidden, prior.dim)
    key = {"prior": [prior.means.tolist(), prior.weights.tolist(), prior.std], "hidden": width,
           "iters": cfg.pretrain_iters, "batch": cfg.pretrain_batch, "lr": cfg.pretrain_lr, "seed": cfg.seed}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.cache_dir or os.environ.get("NABLA_GFN_CACHE") or Path.home() / ".cache" / "nabla-gfn")
    path, net = root / "toy_2d" / f"{'eps' if cfg.model == 'ddpm' else cfg.model}_{digest}.pt", TimeMLP(width, prior.dim)
    if path.exists():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.pretrain_iters)
    for _ in tqdm(range(cfg.pretrain_iters), desc="pretrain P_F♯", disable=quiet, leave=False):
        x0 = prior.sample(cfg.pretrain_batch, gen).float()
        x_t, t, target = training_pair(cfg.model, scheduler, x0, gen)
        loss = (net(x_t, t) - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------- finetuning

@dataclass
class Hooks:
    """Optional extension points of `run`, `finetune` and `evaluate`. experiments/toy_diagnostics.py fills
    them (oracle, flow errors, cost counters); the rung needs none and imports nothing from experiments/.

    methods: extra --method names → update factory(task), for diagnostics outside baselines.METHODS.
    counters(trainee, modules): a context manager around the training loop; the function it yields
        returns extra (cumulative) logs for every update.
    evaluate(cfg, task, reference, policy, flow, schedule, finetuned, gen, result, samples): adds final
        metrics and samples, drawing from the evaluation generator `gen`.
    panels: extra figure panels panel(ax, result, cfg), drawn before the TV curve.
    """

    methods: Dict[str, Callable[[Task], Callable]] = field(default_factory=dict)
    counters: Callable[..., ContextManager[Callable[[], dict]]] = lambda trainee, modules: contextlib.nullcontext(dict)
    evaluate: Optional[Callable[..., None]] = None
    panels: List[Callable[..., None]] = field(default_factory=list)


def make_trainee(cfg: ToyConfig, task: Task, policy: nn.Module, reference: nn.Module, schedule: ng.StepSchedule,
                 module: Optional[str]) -> Tuple[bl.Trainee, Optional[TimeMLP]]:
    """The common interface of every update: this rung's networks as eps_fns, + g_φ or log Z when the
    method needs one. Returns (trainee, g_φ or None)."""
    flow = make_flow(cfg) if module == "flow" else None
    log_z = bl.LogPartition() if module == "log_z" else None
    groups = {"policy": list(policy.parameters())}
    param_groups = [{"params": groups["policy"], "lr": cfg.lr}]
    if flow is not None:
        groups["flow"] = list(flow.parameters())
        param_groups.append({"params": groups["flow"], "lr": cfg.flow_lr, "weight_decay": 1e-2})
    if log_z is not None:
        param_groups.append({"params": list(log_z.parameters()), "lr": cfg.rtb_logz_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(param_groups, weight_decay=0.0)
    x_T = lambda n, gen: torch.randn(n, task.dim, generator=gen)
    trainee = bl.Trainee(as_eps_fn(policy), as_eps_fn(reference), task.log_reward, schedule, x_T, groups, optimizer,
                         None if flow is None else as_eps_fn(flow), log_z)
    return trainee, flow


def finetune(cfg: ToyConfig, task: Task, reference: nn.Module, schedule: ng.StepSchedule, quiet: bool = False,
             hooks: Optional[Hooks] = None):
    """Finetune a copy of the pretrained ε-network, one `cfg.method` update per step, with metric-curve
    points every eval_every updates. Returns (policy, g_φ or None, history)."""
    hooks = hooks or Hooks()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    method = bl.METHODS.get(cfg.method)
    update_fn = method.update if method is not None else hooks.methods[cfg.method](task)
    trainee, flow = make_trainee(cfg, task, policy, reference, schedule, method and method.module)
    hp, optimizer = method_config(cfg), trainee.optimizer
    decay = (lambda u: 0.5 * (1 + math.cos(math.pi * u / cfg.updates))) if cfg.lr_schedule == "cosine" else (lambda u: 1.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)  # stepped once per update
    # without an exact target, metrics reweight pretrained samples (own generator: the run's draws are unchanged)
    pretrained = None if task.target is not None else sample(
        as_eps_fn(reference), schedule, cfg.eval_samples, torch.Generator().manual_seed(cfg.seed + 4), task.dim).final
    train_time, history, eval_gen = 0.0, [], torch.Generator().manual_seed(cfg.seed + 2)
    bar = tqdm(range(cfg.updates), desc=f"finetune ({cfg.method})", disable=quiet)
    with hooks.counters(trainee, [policy, reference, flow]) as counts:
        for update in bar:
            start = time.perf_counter()
            stats = update_fn(trainee, hp, gen)
            stats["lr"] = optimizer.param_groups[0]["lr"]  # the policy's rate used by this update
            lr_schedule.step()
            train_time += time.perf_counter() - start
            stats.update(counts(), train_time_s=train_time)
            if (update + 1) % cfg.eval_every == 0 or update == 0:
                with torch.no_grad():
                    x0 = sample(as_eps_fn(policy), schedule, 1000, eval_gen, task.dim).final
                stats.update({f"eval_{k}": v for k, v in metrics(task, x0, pretrained, seed=update).items()})
                bar.set_postfix(tv=f"{stats['eval_mode_tv']:.3f}", loss=f"{stats['loss']:.3g}")
            history.append({"update": update + 1, **stats})
    return policy.eval(), flow, history


# ---------------------------------------------------------------------------------------------- metrics, evaluation, figure

def metrics(task: Task, samples: Tensor, reference: Optional[Tensor] = None, seed: int = 0) -> Dict[str, float]:
    """Mode-weight TV to the exact target, mean log-reward vs its exact expectation, sliced W1.

    With no closed-form target, `reference` (pretrained samples) is importance-reweighted by R^β.
    """
    samples = samples.double()
    if task.target is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        means, target_w = task.target.means, task.target.weights
        exact_reward = task.reward.expectation(task.target)
        target_samples = task.target.sample(len(samples), gen)
    elif reference is None:
        raise ValueError("metrics: a reward without a closed-form target needs pretrained `reference` samples")
    else:  # self-normalised importance weights of pretrained samples
        logw = task.beta * task.reward(reference.double())
        w = (logw - logw.max()).exp()
        means, target_w = task.prior.means, mode_weights(reference, task.prior.means, w)
        exact_reward = float((w * task.reward(reference.double())).sum() / w.sum())
        gen = torch.Generator().manual_seed(seed)
        idx = torch.multinomial(w / w.sum(), len(samples), replacement=True, generator=gen)
        target_samples = reference.double()[idx]
    tv, nonfinite = mode_tv(samples, means, target_w)
    return {"mode_tv": tv, "nonfinite_fraction": nonfinite,
            "mean_log_reward": float(task.reward(samples).mean()), "exact_mean_log_reward": exact_reward,
            "sliced_w1": sliced_wasserstein(samples, target_samples, seed=seed)}


def evaluate(cfg: ToyConfig, task: Task, reference: nn.Module, policy: nn.Module, flow, schedule,
             hooks: Optional[Hooks] = None) -> Tuple[dict, dict]:
    """Final metrics of the finetuned and pretrained samplers (+ the hooks'). Returns (metrics, samples)."""
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    finetuned = sample(as_eps_fn(policy), schedule, cfg.eval_samples, gen, task.dim)
    pretrained = sample(as_eps_fn(reference), schedule, cfg.eval_samples, gen, task.dim).final
    samples = {"finetuned": finetuned.final, "pretrained": pretrained}
    result = {"finetuned": metrics(task, finetuned.final, pretrained), "pretrained": metrics(task, pretrained, pretrained)}
    if hooks is not None and hooks.evaluate is not None:
        hooks.evaluate(cfg, task, reference, policy, flow, schedule, finetuned, gen, result, samples)
    return result, samples


def make_figure(path: Path, task: Task, samples: Dict[str, Tensor], result: dict, history: List[dict], cfg: ToyConfig,
                panels: List[Callable[..., None]] = ()):
    """Exact target density | one scatter per sampler | the hooks' panels | mode TV vs updates."""
    import matplotlib
    matplotlib.use("Agg")  # imported here: a notebook that imports toy_2d keeps its own backend
    import matplotlib.pyplot as plt

    titles = {"pretrained": "pretrained P_F♯", "finetuned": f"finetuned ({cfg.method})", "oracle": "oracle (exact flow)"}
    scatters = [key for key in titles if key in samples]
    pts = torch.cat(list(samples.values())).double()
    lo, hi = pts.quantile(0.005, 0).numpy() - 0.5, pts.quantile(0.995, 0).numpy() + 0.5
    fig, axes = plt.subplots(1, 2 + len(scatters) + len(panels), figsize=(4.2 * (2 + len(scatters) + len(panels)), 4.6))
    if task.target is not None:
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
        dens = task.target.marginal(2).log_prob(torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1))).exp()
        axes[0].contourf(gx, gy, dens.reshape(200, 200).numpy(), levels=30, cmap="viridis")
        axes[0].set_title("exact target p♯·R^β" + (f"\n(D = {task.dim}: first two coordinates)" if task.dim > 2 else ""))
    for ax, key in zip(axes[1:], scatters):
        s = samples[key].numpy()
        ax.scatter(s[:, 0], s[:, 1], s=1, alpha=0.4)
        ax.set_title(titles[key] + f"\nmode TV {result[key]['mode_tv']:.3f}")
    for ax in axes[: 1 + len(scatters)]:
        ax.set_xlim(lo[0], hi[0]), ax.set_ylim(lo[1], hi[1]), ax.set_aspect("equal")
    for ax, panel in zip(axes[1 + len(scatters):], panels):
        panel(ax, result, cfg)
    evals = [h for h in history if "eval_mode_tv" in h]
    axes[-1].plot([h["update"] for h in evals], [h["eval_mode_tv"] for h in evals], "o-", label="finetuned")
    for key, style in (("pretrained", "--"), ("oracle", ":")):
        if key in result:
            axes[-1].axhline(result[key]["mode_tv"], ls=style, c="gray", label=key)
    axes[-1].set_xlabel("update"), axes[-1].set_ylabel("mode-weight TV to exact target"), axes[-1].legend()
    axes[-1].set_title("TV vs updates")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main

def check_method(cfg: ToyConfig, methods: Tuple[str, ...] = METHOD_NAMES) -> ToyConfig:
    """--method must name a registry method (or one of the hooks'): raise cli.UsageError otherwise."""
    if cfg.method not in methods:
        raise cli.UsageError(f"--method: must be one of {', '.join(methods)} (got {cfg.method!r})")
    return cfg


def run(cfg: ToyConfig, log_reward: Optional[Callable[[Tensor], Tensor]] = None, quiet: bool = False,
        hooks: Optional[Hooks] = None) -> dict:
    """Pretrain (cached), finetune, evaluate, write outputs. Returns the metrics dict."""
    hooks = hooks or Hooks()
    check_method(cfg, (*METHOD_NAMES, *hooks.methods))
    start = time.time()
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, log_reward)
    scheduler, schedule = make_sampler(cfg.model, cfg.num_steps, cfg.noise_level)
    reference = pretrain(cfg, task.prior, scheduler, quiet)
    pretrain_done = time.time()
    policy, flow, history = finetune(cfg, task, reference, schedule, quiet, hooks)
    result, samples = evaluate(cfg, task, reference, policy, flow, schedule, hooks)
    result["time_s"] = {"pretrain_or_load": pretrain_done - start, "total": time.time() - start}
    prior = cfg.prior if cfg.prior in PRIOR_PRESETS else "custom"
    reward = cfg.reward if cfg.reward in REWARD_PRESETS else "custom"
    suffix = (f"_d{cfg.dim}" if cfg.dim != 2 else "") + ("_flow" if cfg.model == "flow" else "")
    out = Path(cfg.out or f"runs/toy_2d/{prior}_{reward}_{cfg.method}{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", samples["finetuned"].numpy())
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    (out / "metrics.json").write_text(json.dumps({**result, "history": history}, indent=2))
    if not cfg.no_figure:
        make_figure(out / "figure.png", task, samples, result, history, cfg, hooks.panels)
    result["out"] = str(out)
    return result


def parse_args(argv=None, methods: Tuple[str, ...] = METHOD_NAMES) -> ToyConfig:
    """argv → a checked ToyConfig; a bad flag exits with one line `prog: error: --flag: ...`."""
    try:
        return check_method(cli.parse(ToyConfig, argv, presets=PRESETS, description=__doc__.split("\n\n")[0]), methods)
    except cli.UsageError as err:
        cli.OneLineParser().error(str(err))


def main(argv=None, hooks: Optional[Hooks] = None):
    hooks = hooks or Hooks()
    cfg = parse_args(argv, (*METHOD_NAMES, *hooks.methods))
    torch.set_num_threads(cfg.threads)
    result = run(cfg, hooks=hooks)
    fin, pre = result["finetuned"], result["pretrained"]
    print(f"mode-weight TV to exact target: finetuned {fin['mode_tv']:.3f} | pretrained {pre['mode_tv']:.3f}"
          + (f" | oracle {result['oracle']['mode_tv']:.3f}" if "oracle" in result else ""))
    print(f"mean log-reward: finetuned {fin['mean_log_reward']:.3f} | exact {fin['exact_mean_log_reward']:.3f}")
    print(f"sliced W1 to target: finetuned {fin['sliced_w1']:.3f} | pretrained {pre['sliced_w1']:.3f}")
    print(f"wall time {result['time_s']['total']:.1f} s; outputs in {result['out']}")


if __name__ == "__main__":
    main()
