"""Rung 1: ∇-GFlowNet on 2-D Gaussian mixtures, judged against the exactly computed target.

    python toy_2d.py                                   # ring8 prior, "bump" reward, ~1 min on a laptop CPU
    python toy_2d.py --prior grid25 --reward bump
    python toy_2d.py --reward '{"type": "linear", "w": [0.7, 0.3]}' --beta 1
    python toy_2d.py --prior '{"means": [[-2, 0], [2, 0]], "weights": [0.5, 0.5], "std": 0.4}'
    python toy_2d.py --dim 32                          # ring8 in the first two of 32 coordinates (see --dim)
    python toy_2d.py --dim 32 --reward bump-all        # a bump that reads all 32 coordinates

A small MLP ε-network is pretrained on samples of a Gaussian mixture prior p^♯ and frozen as
P_F^♯. The finetuned policy P_F^θ starts as an exact copy and is trained with
`nabla_gfn.nabla_db_loss` towards p*(x_0) ∝ p^♯(x_0) R(x_0)^β. For a GMM prior and a Gaussian or
linear log-reward the target is again a GMM, computed in closed form, and so is the residual flow
score ∇ log F̃_τ(x) = ∇ log p*_τ(x) − ∇ log p^♯_τ(x) at every noise level (both sides are GMMs
noised by the forward process). That gives three things no image model can: exact metrics, an
oracle sampler (the pretrained step shifted by the exact residual flow: the best a Gaussian-step
policy can do), and a direct check of the learned flow (guess + g_φ) against the exact one.

`--dim D` keeps all of this exact in D dimensions: the preset's modes stay in the first two
coordinates and get one fixed offset each (norm 2) in the other D − 2, all components share a
diagonal covariance (a reward on the first two coordinates makes the target anisotropic), mode TV
counts the nearest mean in all D coordinates, and the figures show the first two coordinates.

Outputs (in --out): samples.npy, metrics.json, config.json, figure.png.
The sampler uses diffusers' DDIMScheduler with Stable Diffusion's scaled-linear betas, so this rung
runs the same code path as sd_finetune.py.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import baselines as bl
import nabla_gfn as ng

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

PRIOR_PRESETS = {
    # 8 equal modes on a circle of radius 3.
    "ring8": {
        "means": [[3 * math.cos(2 * math.pi * k / 8), 3 * math.sin(2 * math.pi * k / 8)] for k in range(8)],
        "weights": [1 / 8] * 8,
        "std": 0.3,
    },
    # The 5×5 grid of the RTB posterior benchmark (means {-10,…,10}², std 1), scaled by 0.3 so
    # that it sits inside SD's noise schedule (√ᾱ_T ≈ 0.07 leaves the corners barely visible at x_T).
    "grid25": {
        "means": [[3.0 * i, 3.0 * j] for i in (-1, -0.5, 0, 0.5, 1) for j in (-1, -0.5, 0, 0.5, 1)],
        "weights": [1 / 25] * 25,
        "std": 0.3,
    },
}

REWARD_PRESETS = {
    # A broad Gaussian bump centred on the ring's mode at angle 0 (and on grid25's (3, 0) mode).
    "bump": {"type": "gaussian", "center": [3.0, 0.0], "std": 2.0},
    # A linear log-reward: tilts mass towards +x (and a little +y).
    "linear": {"type": "linear", "w": [0.5, 0.25]},
    # "bump" on all D coordinates: its centre extended by the offsets of the mode it sits on (D = 2: "bump").
    "bump-all": {"type": "gaussian", "center": [3.0, 0.0], "std": 2.0, "extend": "nearest-mode"},
}


LR_SCHEDULES = ("constant", "cosine")


@dataclass
class ToyConfig:
    prior: str = field(default="ring8", metadata={"help": f"prior preset {sorted(PRIOR_PRESETS)} or GMM JSON"})
    reward: str = field(default="bump", metadata={"help": f"reward preset {sorted(REWARD_PRESETS)} or JSON"})
    dim: int = field(default=2, metadata={"help": "dimension D ≥ 2: the prior's modes in the first two coordinates, plus fixed per-mode offsets (norm 2) in the others; ε-network and g_φ widths max(hidden, 2·D)"})
    beta: float = field(default=1.0, metadata={"help": "reward scale β: target p♯·R^β"})
    num_steps: int = field(default=50, metadata={"help": "DDIM(η=1) sampling steps"})
    # pretraining of the ε-network (cached on disk, keyed by these fields and the prior)
    pretrain_iters: int = field(default=3000, metadata={"help": "pretraining iterations"})
    pretrain_batch: int = field(default=512, metadata={"help": "pretraining batch size"})
    pretrain_lr: float = field(default=2e-3, metadata={"help": "pretraining learning rate"})
    hidden: int = field(default=128, metadata={"help": "hidden width of the ε-network"})
    # finetuning
    method: str = field(default="nabla-db", metadata={"help": "finetuning method"})
    updates: int = field(default=300, metadata={"help": "finetuning updates (one optimiser step each)"})
    batch_size: int = field(default=128, metadata={"help": "trajectories sampled per update"})
    fraction: float = field(default=0.1, metadata={"help": "fraction of non-terminal transitions trained on"})
    lr: float = field(default=2e-3, metadata={"help": "policy learning rate (AdamW)"})
    flow_lr: float = field(default=2e-3, metadata={"help": "g_φ learning rate (AdamW)"})
    flow_hidden: int = field(default=128, metadata={"help": "hidden width of g_φ"})
    trust_region: float = field(default=0.0, metadata={"help": "λ, weight of ‖ε̂_θ − ε̂_old‖²"})
    reverse_weight: float = field(default=1.0, metadata={"help": "w_B, weight of the reverse term"})
    gamma: str = field(default="sqrt_alpha_bar", metadata={"help": f"γ_τ choice {ng.GAMMA_CHOICES} (toy default √ᾱ: measured better here; nabla_gfn default ᾱ)"})
    guess_from: str = field(default="reference", metadata={"help": f"whose x̂_0 the guess uses {ng.GUESS_CHOICES} (paper: policy; toy default reference: the policy's guess runs away on sharp rewards)"})
    weighting: str = field(default="kl", metadata={"help": f"transition weighting {ng.WEIGHTING_CHOICES} (paper: plain)"})
    flow_target: str = field(default="adjoint", metadata={"help": f"what trains g_φ {ng.FLOW_TARGET_CHOICES} (toy default adjoint): bootstrap = the paper's L_F g-line + L_B; adjoint = g_φ(x') fit to the lean adjoint a_{{i+1}}; mixed = L_B on (1−λ)·bootstrap + λ·a_i"})
    adjoint_lambda: float = field(default=0.5, metadata={"help": "λ ∈ (0, 1] of --flow-target mixed"})
    lr_schedule: str = field(default="cosine", metadata={"help": "learning rates over the updates: constant, or cosine decay to 0 (all groups)"})
    grad_clip: float = field(default=1.0, metadata={"help": "max grad norm, per parameter group"})
    # baselines (baselines.py); the policy lr is --lr for every method
    draft_k: int = field(default=1, metadata={"help": "DRaFT-K: last sampling steps the reward gradient flows through (1 = DRaFT-1)"})
    draft_kl: float = field(default=0.0, metadata={"help": "DRaFT-K: weight of the per-step KL to P_F♯ on those K steps (0 = off, as in the paper)"})
    refl_start: float = field(default=0.75, metadata={"help": "ReFL: stop at a uniform step in [refl_start·T, T−1] (ImageReward: 30–39 of 40)"})
    ppo_clip: float = field(default=0.1, metadata={"help": "DDPO: PPO clip range ε of the per-step ratio"})
    ppo_epochs: int = field(default=2, metadata={"help": "DDPO: inner epochs over each sampled batch"})
    ppo_minibatches: int = field(default=4, metadata={"help": "DDPO: minibatches per inner epoch (one optimiser step each)"})
    ppo_adv_clip: float = field(default=5.0, metadata={"help": "DDPO: clip of the normalised advantages"})
    rtb_logz_lr: float = field(default=0.1, metadata={"help": "RTB: learning rate of the scalar log Z"})
    # evaluation and bookkeeping
    eval_samples: int = field(default=4000, metadata={"help": "samples for the final metrics"})
    eval_every: int = field(default=25, metadata={"help": "updates between metric-curve points"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    out: str = field(default="", metadata={"help": "output folder (default runs/toy_2d/<prior>_<reward>_<method>)"})
    cache_dir: str = field(default="", metadata={"help": "pretrained-model cache (default $NABLA_GFN_CACHE or ~/.cache/nabla-gfn)"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads (tiny MLPs run fastest on one)"})
    no_figure: bool = field(default=False, metadata={"help": "skip figure.png"})

    @property
    def loss_config(self) -> ng.LossConfig:
        """The configured ∇-DB loss with the method's fixed fields (no-flow, adjoint-matching) applied."""
        base = ng.LossConfig(
            beta=self.beta, trust_region=self.trust_region, reverse_weight=self.reverse_weight, gamma=self.gamma,
            weighting=self.weighting, use_flow=True, guess_from=self.guess_from, flow_target=self.flow_target,
            adjoint_lambda=self.adjoint_lambda,
        )
        return bl.METHODS[self.method].loss_config(base) if self.method in bl.METHODS else base


# Every --method comes from the one registry (baselines.METHODS); "exact-flow" is this rung's own
# diagnostic (it needs the closed-form target), dispatched in `method_update`.
METHOD_NAMES = (*bl.METHODS, "exact-flow")


def method_config(cfg: ToyConfig) -> bl.MethodConfig:
    """This rung's config fields → the registry's method hyper-parameters."""
    return bl.MethodConfig(
        beta=cfg.beta, batch_size=cfg.batch_size, fraction=cfg.fraction, grad_clip=cfg.grad_clip,
        loss=cfg.loss_config, draft_k=cfg.draft_k, draft_kl=cfg.draft_kl, refl_start=cfg.refl_start,
        ppo_clip=cfg.ppo_clip, ppo_epochs=cfg.ppo_epochs, ppo_minibatches=cfg.ppo_minibatches,
        ppo_adv_clip=cfg.ppo_adv_clip,
    )


class RewardGradCounter:
    """Wraps r(x) and counts the rows it scores with a graph to x: each costs one reward gradient."""

    def __init__(self, reward: Callable[[Tensor], Tensor]):
        self.reward, self.rows = reward, 0

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.rows += len(x)
        return self.reward(x)


class NetworkVJPCounter:
    """Counts network rows evaluated with an autograd graph (ε̂_θ, ε̂♯ with x requiring grad, g_φ).

    Each such row is backpropagated once by the loss or by the adjoint sweep: the cost unit
    "network VJPs" of compare_toy.py. Sampling under no_grad is not counted. Remove when done.
    """

    def __init__(self, modules: List[nn.Module]):
        self.rows = 0
        self.handles = [m.register_forward_hook(self._count) for m in modules if m is not None]

    def _count(self, module, inputs, output):
        if torch.is_grad_enabled() and output.requires_grad:
            self.rows += len(inputs[0])

    def remove(self):
        for handle in self.handles:
            handle.remove()


def sd_scheduler():
    """A DDIMScheduler with Stable Diffusion v1.5's config (scaled-linear betas, 1000 steps)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )


# ----------------------------------------------------------------------------------------------
# Exact Gaussian-mixture math: prior, tilted target, noised marginals, residual flow
# ----------------------------------------------------------------------------------------------


@dataclass
class GMM:
    """Gaussian mixture with a covariance shared by all components: Σ_k w_k N(m_k, diag(s²)).

    std is a float (isotropic, s² I: every prior, and every target of an isotropic tilt) or a (D,)
    tensor of per-coordinate stds (diagonal: the target of a reward that reads only some coordinates,
    e.g. the bump on the first two coordinates of a D-dimensional prior).
    """

    means: Tensor  # (K, D)
    weights: Tensor  # (K,)
    std: Union[float, Tensor]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def variances(self) -> Tensor:
        """Per-coordinate variance s_d² of every component. (D,) float64."""
        return (torch.as_tensor(self.std, dtype=torch.float64) ** 2).expand(self.dim).clone()

    def marginal(self, coords: int) -> "GMM":
        """The mixture of the first `coords` coordinates (for figures): same weights, sliced means and stds."""
        std = self.std if not isinstance(self.std, Tensor) else self.std[:coords]
        return GMM(self.means[:, :coords], self.weights, std)

    def noised(self, alpha_bar: Tensor) -> Tuple[Tensor, Tensor]:
        """Marginal under x_τ = √ᾱ x_0 + √(1−ᾱ) ε, per row: means (N, K, D) and variance (N,), or (N, D) if diagonal."""
        a = alpha_bar.to(self.means.dtype)
        if isinstance(self.std, Tensor):
            return a.sqrt()[:, None, None] * self.means, a[:, None] * self.std.to(a) ** 2 + (1 - a)[:, None]
        return a.sqrt()[:, None, None] * self.means, a * self.std**2 + (1 - a)

    def _log_resp_terms(self, x: Tensor, alpha_bar: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        means, var = self.noised(alpha_bar)
        diff = x[:, None, :] - means  # (N, K, D)
        if var.ndim == 2:  # diagonal: var (N, D)
            log_comp = (self.weights.log() - 0.5 * (diff.pow(2) / var[:, None, :]).sum(-1)
                        - 0.5 * torch.log(2 * math.pi * var).sum(-1)[:, None])
            return log_comp, diff, var
        # isotropic: for D = 2 these are exactly the original 2-D operations (0.5·D = 1)
        log_comp = self.weights.log() - 0.5 * diff.pow(2).sum(-1) / var[:, None] - 0.5 * self.dim * torch.log(2 * math.pi * var)[:, None]
        return log_comp, diff, var[:, None]

    def log_prob(self, x: Tensor, alpha_bar: Optional[Tensor] = None) -> Tensor:
        alpha_bar = torch.ones(len(x), dtype=x.dtype) if alpha_bar is None else alpha_bar
        return self._log_resp_terms(x, alpha_bar)[0].logsumexp(-1)

    def score(self, x: Tensor, alpha_bar: Tensor) -> Tensor:
        """∇_x log p_τ(x) in closed form: Σ_k resp_k(x) · (−(x − √ᾱ m_k)/v_τ), v_τ per coordinate. (N, D)."""
        log_comp, diff, var = self._log_resp_terms(x, alpha_bar)
        resp = log_comp.softmax(-1)
        return -(resp[..., None] * diff).sum(1) / var

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        std = self.std.to(self.means.dtype) if isinstance(self.std, Tensor) else self.std
        return self.means[k] + std * torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)


class GaussianReward:
    """r(x) = −‖x_{:n} − c‖² / (2 s²) on the first n = len(c) coordinates: R^β is a Gaussian bump with variance s²/β.

    Coordinates beyond n are not read: a 2-D centre on a D-dimensional prior is a bump on the first
    two coordinates (whose tilted target is then diagonal, not isotropic).
    """

    def __init__(self, center, std):
        self.center, self.std = torch.tensor(center, dtype=torch.float64), float(std)

    def __call__(self, x: Tensor) -> Tensor:
        return -(x[..., : len(self.center)] - self.center.to(x)).pow(2).sum(-1) / (2 * self.std**2)

    def tilt(self, prior: GMM, beta: float) -> GMM:
        """p♯·R^β: per component a Gaussian product. On the read coordinates precision 1/s_d² + β/s_r² and
        mean (m/s_d² + βc/s_r²)/precision, the others as in the prior; weight w_k Π_{d<n} N(m_kd; c_d, s_d² + s_r²/β)."""
        n = len(self.center)
        isotropic = not isinstance(prior.std, Tensor)
        s2 = prior.std**2 if isotropic else prior.variances()[:n]
        prec = 1 / s2 + beta / self.std**2
        read = (prior.means[:, :n] / s2 + beta * self.center / self.std**2) / prec
        v = s2 + self.std**2 / beta
        sq = (prior.means[:, :n] - self.center).pow(2)
        log_w = prior.weights.log() - (0.5 * sq.sum(-1) / v if isotropic else 0.5 * (sq / v).sum(-1))
        if isotropic and n == prior.dim:  # an isotropic tilt (the 2-D toy, a bump on all D coordinates)
            return GMM(read, log_w.softmax(0), prec**-0.5)
        std = torch.cat([torch.as_tensor(prec, dtype=torch.float64).expand(n) ** -0.5, prior.variances()[n:].sqrt()])
        return GMM(torch.cat([read, prior.means[:, n:]], 1), log_w.softmax(0), std)

    def expectation(self, gmm: GMM) -> float:
        """E_gmm[r] = −Σ_k w_k (‖m_k − c‖² + Σ_{d<n} s_d²) / (2 s_r²), over the read coordinates."""
        n = len(self.center)
        spread = n * gmm.std**2 if not isinstance(gmm.std, Tensor) else gmm.variances()[:n].sum()
        sq = (gmm.means[:, :n] - self.center).pow(2).sum(-1) + spread
        return float(-(gmm.weights * sq).sum() / (2 * self.std**2))


class LinearReward:
    """r(x) = w·x_{:n} on the first n = len(w) coordinates: R^β tilts each component's mean by β s² w."""

    def __init__(self, w):
        self.w = torch.tensor(w, dtype=torch.float64)

    def __call__(self, x: Tensor) -> Tensor:
        return x[..., : len(self.w)] @ self.w.to(x)

    def tilt(self, prior: GMM, beta: float) -> GMM:
        """Weight w_k exp(β w·m_k + β² Σ_d s_d² w_d²/2), mean m_k + β s² w (w zero-padded to D), same std."""
        n = len(self.w)
        w_full = torch.cat([self.w, self.w.new_zeros(prior.dim - n)])
        if not isinstance(prior.std, Tensor):  # the 2-D toy's operations, in their order
            spread = 0.5 * beta**2 * prior.std**2 * self.w.pow(2).sum()
            shift = beta * prior.std**2 * w_full
        else:
            spread = 0.5 * beta**2 * (prior.variances()[:n] * self.w.pow(2)).sum()
            shift = beta * prior.variances() * w_full
        log_w = prior.weights.log() + beta * prior.means[:, :n] @ self.w + spread
        return GMM(prior.means + shift, log_w.softmax(0), prior.std)

    def expectation(self, gmm: GMM) -> float:
        return float(gmm.weights @ (gmm.means[:, : len(self.w)] @ self.w))


def _json_or_preset(text: str, presets: Dict[str, dict], flag: str) -> dict:
    if text in presets:
        return presets[text]
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f"error: {flag}: invalid JSON ({err.msg} at char {err.pos}): {text}")
    raise SystemExit(f"error: {flag}: unknown preset {text!r}; use one of {sorted(presets)} or a JSON object")


# D > 2: the preset's 2-D means are extended by one fixed offset per mode in coordinates 3 … D, of norm
# OFFSET_NORM (directions of N(0, I) draws from a generator seeded OFFSET_SEED, independent of --seed), so
# that the modes are separated in every coordinate, not only in the plane.
OFFSET_NORM, OFFSET_SEED = 2.0, 0


def mode_offsets(num_modes: int, extra_dims: int) -> Tensor:
    """(K, D − 2) per-mode offsets of norm OFFSET_NORM for the coordinates beyond the first two."""
    draws = torch.randn(num_modes, extra_dims, generator=torch.Generator().manual_seed(OFFSET_SEED), dtype=torch.float64)
    return OFFSET_NORM * draws / draws.norm(dim=1, keepdim=True)


def parse_prior(text: str, dim: int = 2) -> GMM:
    """A preset or JSON GMM in `dim` dimensions: K×2 means are extended by `mode_offsets`, K×dim taken as given."""
    spec = _json_or_preset(text, PRIOR_PRESETS, "--prior")
    try:
        means = torch.tensor(spec["means"], dtype=torch.float64)
        k = len(means)
        weights = torch.tensor(spec.get("weights", [1 / k] * k), dtype=torch.float64)
        std = float(spec["std"])
    except (KeyError, TypeError, ValueError) as err:
        raise SystemExit(f'error: --prior: expected {{"means": [[x, y], ...], "weights": [...], "std": s}}, got {text} ({err})')
    if means.ndim != 2 or means.shape[1] not in (2, dim) or weights.shape != (k,) or std <= 0 or (weights < 0).any():
        raise SystemExit(f"error: --prior: means must be K×2 (or K×{dim} for --dim {dim}), weights K non-negative numbers, std > 0")
    if means.shape[1] < dim:
        means = torch.cat([means, mode_offsets(k, dim - 2)], 1)
    return GMM(means, weights / weights.sum(), std)


def parse_reward(text: str, prior: Optional[GMM] = None):
    """A preset or JSON reward on the first len(center) / len(w) coordinates of `prior` (default: the 2-D plane).

    "extend": "nearest-mode" (gaussian only) appends to the centre the other coordinates of the prior
    mode nearest to it in the given ones: a bump on all D coordinates ("bump-all"; at D = 2 it is "bump").
    """
    spec = _json_or_preset(text, REWARD_PRESETS, "--reward")
    kind, dim = spec.get("type"), 2 if prior is None else prior.dim
    try:
        if kind == "gaussian":
            center = torch.tensor(spec["center"], dtype=torch.float64)
            if spec.get("extend") == "nearest-mode" and prior is not None and len(center) < dim:
                nearest = (prior.means[:, : len(center)] - center).norm(dim=1).argmin()
                center = torch.cat([center, prior.means[nearest, len(center):]])
            reward = GaussianReward(center.tolist(), spec["std"])
            size = len(center)
        elif kind == "linear":
            reward = LinearReward(spec["w"])
            size = len(reward.w)
        else:
            raise SystemExit(f'error: --reward: "type" must be "gaussian" (center, std) or "linear" (w), got {kind!r}')
    except KeyError as err:
        raise SystemExit(f"error: --reward: missing field {err} for type {kind!r}")
    if not 1 <= size <= dim:
        raise SystemExit(f"error: --reward: center / w must have 1 … {dim} coordinates (--dim {dim}), got {size}")
    return reward


def exact_flow_score(prior: GMM, target: GMM, x: Tensor, alpha_bar: Tensor) -> Tensor:
    """Exact ∇ log F̃_τ(x) = ∇ log E♯[R(x_0)^β | x_τ = x] = ∇ log p*_τ(x) − ∇ log p♯_τ(x).

    The tilted path measure p♯(x_{0:T}) R(x_0)^β / Z has marginal p*_τ ∝ p♯_τ · E♯[R^β | x_τ], and
    p*_τ is the target GMM noised by the same forward process. At ᾱ = 1 this is β∇r (tested).
    """
    x64 = x.double()
    a = alpha_bar.double().expand(len(x))
    return (target.score(x64, a) - prior.score(x64, a)).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


class TimeMLP(nn.Module):
    """(x, τ) → vector shaped like x. Sinusoidal embedding of τ/1000, three SiLU layers."""

    def __init__(self, hidden: int = 128, dim: int = 2, freqs: int = 8):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(1000), freqs)), persistent=False)
        self.net = nn.Sequential(
            nn.Linear(dim + 2 * freqs, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        angle = (t.to(x.dtype) / 1000)[:, None] * self.freqs
        return self.net(torch.cat([x, angle.sin(), angle.cos()], -1))


def network_width(hidden: int, dim: int) -> int:
    """Hidden width of the ε-network and g_φ in D dimensions: max(hidden, 2·D) (128 up to D = 64, 256 at D = 128).

    A layer must stay wider than its D-dimensional output; the prior's score needs only ~K mode
    features, so growing the width faster (4·D was tried) buys nothing the toy measures and costs CPU.
    """
    return max(hidden, 2 * dim)


def as_eps_fn(net: nn.Module) -> ng.EpsFn:
    """Adapt a (x, τ) network to nabla_gfn's eps_fn(x, t, traj) (the toy is unconditional)."""
    return lambda x, t, traj: net(x, t)


# ----------------------------------------------------------------------------------------------
# Pretraining P_F^♯ (cached)
# ----------------------------------------------------------------------------------------------


def cache_root(cfg: ToyConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("NABLA_GFN_CACHE") or Path.home() / ".cache" / "nabla-gfn")


def pretrain(cfg: ToyConfig, prior: GMM, scheduler, quiet: bool = False) -> TimeMLP:
    """Denoising score matching on prior samples: E‖ε − ε̂(√ᾱ x_0 + √(1−ᾱ) ε, τ)‖². Cached on disk."""
    width = network_width(cfg.hidden, prior.dim)
    key = {"prior": [prior.means.tolist(), prior.weights.tolist(), prior.std], "hidden": width,
           "iters": cfg.pretrain_iters, "batch": cfg.pretrain_batch, "lr": cfg.pretrain_lr, "seed": cfg.seed}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_root(cfg) / "toy_2d" / f"eps_{digest}.pt"
    net = TimeMLP(width, prior.dim)
    if path.exists():
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return net.requires_grad_(False).eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.pretrain_iters)
    for _ in tqdm(range(cfg.pretrain_iters), desc="pretrain P_F♯", disable=quiet, leave=False):
        x0 = prior.sample(cfg.pretrain_batch, gen).float()
        t = torch.randint(0, len(alphas_cumprod), (cfg.pretrain_batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t][:, None]
        loss = (net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return net.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------
# Metrics against the exact target
# ----------------------------------------------------------------------------------------------


def mode_weights(samples: Tensor, means: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Fraction of (optionally weighted) samples whose nearest component mean is each m_k."""
    nearest = torch.cdist(samples.double(), means.double()).argmin(1)
    w = torch.ones(len(samples), dtype=torch.float64) if weights is None else weights.double()
    return torch.zeros(len(means), dtype=torch.float64).index_add_(0, nearest, w) / w.sum()


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 128, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size sample sets (exact per projection)."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(projections, a.shape[1], generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=1, keepdim=True)
    pa, pb = (a.double() @ theta.T).sort(0).values, (b.double() @ theta.T).sort(0).values
    return float((pa - pb).abs().mean())


@dataclass
class Task:
    """Everything exact about one prior/reward/β: the pieces metrics and the oracle need."""

    prior: GMM
    reward: Callable[[Tensor], Tensor]
    beta: float
    target: Optional[GMM]  # None for a user-supplied reward without a closed form

    @property
    def dim(self) -> int:
        return self.prior.means.shape[1]

    def log_reward(self, x0: Tensor, traj: Tensor) -> Tensor:
        return self.reward(x0)


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
    else:  # self-normalised importance weights of pretrained samples
        logw = task.beta * task.reward(reference.double())
        w = (logw - logw.max()).exp()
        means, target_w = task.prior.means, mode_weights(reference, task.prior.means, w)
        exact_reward = float((w * task.reward(reference.double())).sum() / w.sum())
        idx = torch.multinomial(w / w.sum(), len(samples), replacement=True, generator=torch.Generator().manual_seed(seed))
        target_samples = reference.double()[idx]
    # Non-finite samples (a diverged sampler) belong to no mode: their mass counts fully against TV.
    finite = torch.isfinite(samples).all(1)
    weights = mode_weights(samples[finite], means) * finite.double().mean() if finite.any() else torch.zeros_like(target_w)
    tv = 0.5 * (float((weights - target_w).abs().sum()) + float(1 - finite.double().mean()))
    return {
        "mode_tv": tv,
        "nonfinite_fraction": float(1 - finite.double().mean()),
        "mean_log_reward": float(task.reward(samples).mean()),
        "exact_mean_log_reward": exact_reward,
        "sliced_w1": sliced_wasserstein(samples, target_samples, seed=seed),
    }


# ----------------------------------------------------------------------------------------------
# Samplers: learned policy, pretrained, and the exact-flow oracle
# ----------------------------------------------------------------------------------------------


def sample(eps_fn: ng.EpsFn, schedule: ng.StepSchedule, n: int, gen: torch.Generator, dim: int = 2) -> ng.Trajectory:
    return ng.sample_trajectory(eps_fn, schedule, torch.randn(n, dim, generator=gen), generator=gen)


def analytic_eps(prior: GMM, alphas_cumprod: Tensor) -> ng.EpsFn:
    """The exact ε-model of the prior: ε̂(x, τ) = −√(1−ᾱ_τ) ∇ log p♯_τ(x), as an eps_fn (float64 math).

    A pretrained network with zero error; alphas_cumprod: the scheduler's (1000,) tensor.
    """

    def eps_fn(x: Tensor, t: Tensor, traj: Tensor) -> Tensor:
        a = alphas_cumprod.to(torch.float64)[t.cpu()].to(x.device)
        return (-(1 - a).sqrt()[:, None] * prior.score(x.double(), a)).to(x.dtype)

    return eps_fn


def step_index(schedule: ng.StepSchedule, t: Tensor) -> Tensor:
    """The step i of each row's timestep τ_i: (N,) long."""
    return (schedule.timesteps.to(t.device)[None, :] == t[:, None]).long().argmax(1)


def oracle_eps(task: Task, reference_eps: ng.EpsFn, schedule: ng.StepSchedule) -> ng.EpsFn:
    """ε̂ whose step mean is μ♯(x) + σ_τ² ∇ log F̃_τ'(μ♯(x)): the pretrained step tilted by the exact flow.

    The optimal policy is P_F♯(x'|x) F̃(x') / F̃(x); linearising log F̃ around μ♯ gives this Gaussian
    (the best a Gaussian-step policy can do). step_mean is affine in ε̂, so the ε̂ that shifts the mean
    by δ is ε̂♯ + δ / slope. Needs a closed-form target.
    """

    def eps_fn(x: Tensor, t: Tensor, traj: Tensor) -> Tensor:
        i = step_index(schedule, t)
        coef = schedule.alpha_bar[i], schedule.alpha_bar_next[i], schedule.sigma[i]
        eps_sharp = reference_eps(x, t, traj)
        mean_sharp = ng.step_mean(x, eps_sharp, *coef)
        shift = coef[2].to(x.dtype)[:, None] ** 2 * exact_flow_score(task.prior, task.target, mean_sharp, coef[1])
        slope = ng.step_mean(x, torch.ones_like(x), *coef) - ng.step_mean(x, torch.zeros_like(x), *coef)
        return eps_sharp + shift / slope

    return eps_fn


@torch.no_grad()
def sample_oracle(task: Task, reference: nn.Module, schedule: ng.StepSchedule, n: int, gen: torch.Generator) -> Tensor:
    """Final samples of the exact-flow oracle policy (`oracle_eps`)."""
    return sample(oracle_eps(task, as_eps_fn(reference), schedule), schedule, n, gen, task.dim).final


def _relative_error(estimate: Tensor, exact: Tensor) -> float:
    return float((estimate - exact).norm(dim=1).mean() / exact.norm(dim=1).mean().clamp(min=1e-8))


def _projection(estimate: Tensor, exact: Tensor) -> float:
    """Σ⟨estimate, exact⟩ / Σ‖exact‖²: 1 for an unbiased estimate, < 1 when it shrinks the flow."""
    return float((estimate * exact).sum() / exact.pow(2).sum().clamp(min=1e-12))


def bootstrap_flow_target(policy: nn.Module, reference: nn.Module, trajectory: ng.Trajectory,
                          schedule: ng.StepSchedule, i: int) -> Tensor:
    """The paper's one-sample reverse target for ∇ log F̃(x_i): −∇_x[log P_F^θ − log P_F^♯](x_{i+1}|x_i).

    (guess + g_φ at x is pulled towards it by L_B.) Its mean is J♯ᵀ(μ_θ − μ♯)/σ² — the policy's own
    learned residual carried one link back: the TD(0) chain. (N, 2), detached.
    """
    x = trajectory.states[:, i].detach().requires_grad_(True)
    x_next, n = trajectory.states[:, i + 1], len(x)
    coef = schedule.alpha_bar[i].expand(n), schedule.alpha_bar_next[i].expand(n), schedule.sigma[i].expand(n)
    t = schedule.timesteps[i].expand(n)
    log_ratio = (ng.gaussian_log_prob(x_next, ng.step_mean(x, policy(x, t), *coef), coef[2])
                 - ng.gaussian_log_prob(x_next, ng.step_mean(x, reference(x, t), *coef), coef[2]))
    return -torch.autograd.grad(log_ratio.sum(), x)[0]


def flow_errors(task: Task, policy: nn.Module, flow: Optional[nn.Module], trajectory: ng.Trajectory,
                schedule: ng.StepSchedule, cfg: ToyConfig, reference: Optional[nn.Module] = None) -> Dict[str, List[float]]:
    """Per step (0 = x_T), on the policy's own states, against the exact ∇ log F̃:

    relative error ‖· − exact‖ / ‖exact‖ (mean over samples) of the learned flow (forward-looking
    guess, guess + g_φ) and of the two one-sample targets g_φ can be trained on (the lean adjoint
    a_i, the bootstrapped reverse target), and each one's projection Σ⟨·, exact⟩ / Σ‖exact‖²
    (1 = unbiased on average; the targets' noise averages out of it, their shrinkage does not).
    The targets need the frozen `reference`; without it only the learned flow is scored.
    """
    out = {k: [] for k in ("guess", "guess_plus_flow", "adjoint_target", "bootstrap_target",
                           "projection_guess_plus_flow", "projection_adjoint_target", "projection_bootstrap_target")}
    if reference is not None:
        adjoint, _ = ng.lean_adjoint(as_eps_fn(reference), schedule, trajectory, task.log_reward, cfg.beta)
    for i in range(schedule.num_steps):
        x = trajectory.states[:, i]
        n = len(x)
        t, a = schedule.timesteps[i].expand(n), schedule.alpha_bar[i].expand(n)
        guess, _ = ng.forward_looking_score(as_eps_fn(policy), task.log_reward, x, t, a, torch.arange(n), cfg.beta, cfg.gamma)
        exact = exact_flow_score(task.prior, task.target, x, a)
        estimates = {"guess": guess.detach()}
        if reference is not None:
            estimates["adjoint_target"] = adjoint[:, i]
            estimates["bootstrap_target"] = bootstrap_flow_target(policy, reference, trajectory, schedule, i)
        if flow is not None:
            with torch.no_grad():
                estimates["guess_plus_flow"] = guess.detach() + flow(x, t)
        for key, estimate in estimates.items():
            out[key].append(_relative_error(estimate, exact))
            if f"projection_{key}" in out:
                out[f"projection_{key}"].append(_projection(estimate, exact))
    return out


# ----------------------------------------------------------------------------------------------
# Finetuning
# ----------------------------------------------------------------------------------------------


def make_flow(cfg: ToyConfig) -> TimeMLP:
    """g_φ: a TimeMLP whose output layer is zeroed, so ∇ log F̃ starts at the forward-looking guess."""
    return ng.zero_output_layer(TimeMLP(network_width(cfg.flow_hidden, cfg.dim), cfg.dim))


def exact_flow_update(task: Task) -> Callable[[bl.Trainee, bl.MethodConfig, torch.Generator], Dict[str, float]]:
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
        mean_policy = ng.step_mean(b.x, trainee.policy_eps(b.x, b.t, b.traj), b.alpha_bar, b.alpha_bar_next, b.sigma)
        with torch.no_grad():
            mean_reference = ng.step_mean(b.x, trainee.reference_eps(b.x, b.t, b.traj), b.alpha_bar, b.alpha_bar_next, b.sigma)
            target = exact_flow_score(task.prior, task.target, b.x_next, b.alpha_bar_next)
        weight, _ = ng.transition_weights(b.sigma, hp.loss.weighting)
        loss = (weight * (ng.forward_residual(mean_policy, mean_reference, b.sigma) - target).pow(2).mean(1)).mean()
        logs = bl.optimizer_step(trainee, loss, hp.grad_clip)
        logs.update(loss=loss.item(), reward=float(task.reward(trajectory.final).mean()))
        return logs

    return update


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


def finetune(cfg: ToyConfig, task: Task, reference: nn.Module, schedule: ng.StepSchedule, quiet: bool = False):
    """Finetune a copy of the pretrained ε-network. Returns (policy, flow or None, history)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    torch.manual_seed(cfg.seed + 1)
    policy = copy.deepcopy(reference).requires_grad_(True).train()
    method = bl.METHODS.get(cfg.method)
    update_fn = method.update if method is not None else exact_flow_update(task)
    counter = RewardGradCounter(task.reward)
    trainee, flow = make_trainee(cfg, dataclasses.replace(task, reward=counter), policy, reference, schedule,
                                 method and method.module)
    hp, optimizer = method_config(cfg), trainee.optimizer
    decay = (lambda u: 0.5 * (1 + math.cos(math.pi * u / cfg.updates))) if cfg.lr_schedule == "cosine" else (lambda u: 1.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)  # stepped once per update
    vjps = NetworkVJPCounter([policy, reference, flow])
    train_time, history, eval_gen = 0.0, [], torch.Generator().manual_seed(cfg.seed + 2)
    bar = tqdm(range(cfg.updates), desc=f"finetune ({cfg.method})", disable=quiet)
    for update in bar:
        start = time.perf_counter()
        stats = update_fn(trainee, hp, gen)
        stats["lr"] = optimizer.param_groups[0]["lr"]  # the policy's rate used by this update
        lr_schedule.step()
        train_time += time.perf_counter() - start
        stats.update(reward_grad_calls=counter.rows, network_vjps=vjps.rows, train_time_s=train_time)  # cumulative
        if (update + 1) % cfg.eval_every == 0 or update == 0:
            with torch.no_grad():
                x0 = sample(as_eps_fn(policy), schedule, 1000, eval_gen, task.dim).final
            stats.update({f"eval_{k}": v for k, v in metrics(task, x0, seed=update).items()})
            bar.set_postfix(tv=f"{stats['eval_mode_tv']:.3f}", loss=f"{stats['loss']:.3g}")
        history.append({"update": update + 1, **stats})
    vjps.remove()
    return policy.eval(), flow, history


# ----------------------------------------------------------------------------------------------
# Evaluation, figure
# ----------------------------------------------------------------------------------------------


def evaluate(cfg: ToyConfig, task: Task, reference: nn.Module, policy: nn.Module, flow, schedule) -> Tuple[dict, dict]:
    """Final metrics for the finetuned, pretrained and oracle samplers. Returns (metrics, samples)."""
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    n = cfg.eval_samples
    finetuned = sample(as_eps_fn(policy), schedule, n, gen, task.dim)
    pretrained = sample(as_eps_fn(reference), schedule, n, gen, task.dim).final
    samples = {"finetuned": finetuned.final, "pretrained": pretrained}
    result = {"finetuned": metrics(task, finetuned.final, pretrained), "pretrained": metrics(task, pretrained, pretrained)}
    if task.target is not None:
        samples["oracle"] = sample_oracle(task, reference, schedule, n, gen)
        samples["target"] = task.target.sample(n, gen).float()
        result["oracle"] = metrics(task, samples["oracle"])
        result["exact_target_samples"] = metrics(task, samples["target"], seed=cfg.seed + 7)
        sub = ng.Trajectory(finetuned.states[:500], finetuned.eps[:500])
        result["flow_relative_error"] = flow_errors(task, policy, flow, sub, schedule, cfg, reference)
        result["prior_mode_tv"] = 0.5 * float((mode_weights(pretrained, task.prior.means) - task.prior.weights).abs().sum())
    return result, samples


def make_figure(path: Path, task: Task, samples: Dict[str, Tensor], result: dict, history: List[dict], cfg: ToyConfig):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = torch.cat(list(samples.values())).double()
    lo, hi = pts.quantile(0.005, 0).numpy() - 0.5, pts.quantile(0.995, 0).numpy() + 0.5
    fig, axes = plt.subplots(1, 6, figsize=(25, 4.6))
    if task.target is not None:
        gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
        grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1))
        dens = task.target.marginal(2).log_prob(grid).exp().reshape(200, 200).numpy()
        axes[0].contourf(gx, gy, dens, levels=30, cmap="viridis")
        axes[0].set_title("exact target p♯·R^β" + (f"\n(D = {task.dim}: first two coordinates)" if task.dim > 2 else ""))
    panels = [("pretrained", "pretrained P_F♯"), ("finetuned", f"finetuned ({cfg.method})"), ("oracle", "oracle (exact flow)")]
    for ax, (key, title) in zip(axes[1:4], panels):
        if key in samples:
            s = samples[key].numpy()
            ax.scatter(s[:, 0], s[:, 1], s=1, alpha=0.4)
            tv = result.get(key, {}).get("mode_tv")
            ax.set_title(title + (f"\nmode TV {tv:.3f}" if tv is not None else ""))
    for ax in axes[:4]:
        ax.set_xlim(lo[0], hi[0]), ax.set_ylim(lo[1], hi[1]), ax.set_aspect("equal")
    if "flow_relative_error" in result:
        err = result["flow_relative_error"]
        axes[4].plot(err["guess"], label="guess β γ ∇r(x̂₀)")
        if err["guess_plus_flow"]:
            axes[4].plot(err["guess_plus_flow"], label=f"guess + g_φ ({cfg.flow_target})")
        for key, color, name in (("adjoint_target", "C3", "lean adjoint a_i"), ("bootstrap_target", "C4", "bootstrapped")):
            if err[key]:
                axes[4].plot(err[key], ":", c=color, label=f"one-sample target: {name}")
        axes[4].set_yscale("log"), axes[4].set_xlabel("step (0 = noise)"), axes[4].legend()
        axes[4].set_title("‖learned − exact ∇log F̃‖ / ‖exact‖")
    evals = [h for h in history if "eval_mode_tv" in h]
    axes[5].plot([h["update"] for h in evals], [h["eval_mode_tv"] for h in evals], "o-", label="finetuned")
    for key, style in (("pretrained", "--"), ("oracle", ":")):
        if key in result:
            axes[5].axhline(result[key]["mode_tv"], ls=style, c="gray", label=key)
    axes[5].set_xlabel("update"), axes[5].set_ylabel("mode-weight TV to exact target"), axes[5].legend()
    axes[5].set_title("TV vs updates")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def build_task(cfg: ToyConfig, log_reward: Optional[Callable[[Tensor], Tensor]] = None) -> Task:
    """Prior and reward from the config; a user callable `log_reward` replaces --reward (no exact target)."""
    prior = parse_prior(cfg.prior, cfg.dim)
    if log_reward is not None:
        return Task(prior, log_reward, cfg.beta, None)
    reward = parse_reward(cfg.reward, prior)
    return Task(prior, reward, cfg.beta, reward.tilt(prior, cfg.beta))


def validate(cfg: ToyConfig):
    checks = [
        (cfg.method in METHOD_NAMES, f"--method must be one of {METHOD_NAMES}, got {cfg.method!r}"),
        (cfg.gamma in ng.GAMMA_CHOICES, f"--gamma must be one of {ng.GAMMA_CHOICES}, got {cfg.gamma!r}"),
        (cfg.weighting in ng.WEIGHTING_CHOICES, f"--weighting must be one of {ng.WEIGHTING_CHOICES}, got {cfg.weighting!r}"),
        (cfg.flow_target in ng.FLOW_TARGET_CHOICES, f"--flow-target must be one of {ng.FLOW_TARGET_CHOICES}, got {cfg.flow_target!r}"),
        (cfg.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}"),
        (0 < cfg.adjoint_lambda <= 1, f"--adjoint-lambda must be in (0, 1], got {cfg.adjoint_lambda}"),
        (0 <= cfg.fraction <= 1, f"--fraction must be in [0, 1], got {cfg.fraction}"),
        (cfg.beta > 0, f"--beta must be > 0, got {cfg.beta}"),
        (cfg.dim >= 2, f"--dim must be an integer ≥ 2 (the modes sit in the first two coordinates), got {cfg.dim}"),
        (cfg.num_steps >= 1 and cfg.updates >= 1 and cfg.batch_size >= 1, "--num-steps, --updates, --batch-size must be ≥ 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit(f"error: {message}")


def run(cfg: ToyConfig, log_reward: Optional[Callable[[Tensor], Tensor]] = None, quiet: bool = False) -> dict:
    """Pretrain (cached), finetune, evaluate, write outputs. Returns the metrics dict."""
    validate(cfg)
    start = time.time()
    torch.manual_seed(cfg.seed)
    task = build_task(cfg, log_reward)
    scheduler = sd_scheduler()
    schedule = ng.ddim_schedule(scheduler, cfg.num_steps)
    reference = pretrain(cfg, task.prior, scheduler, quiet)
    pretrain_done = time.time()
    policy, flow, history = finetune(cfg, task, reference, schedule, quiet)
    result, samples = evaluate(cfg, task, reference, policy, flow, schedule)
    result["time_s"] = {"pretrain_or_load": pretrain_done - start, "total": time.time() - start}
    out = Path(cfg.out or f"runs/toy_2d/{Path(cfg.prior).stem if cfg.prior in PRIOR_PRESETS else 'custom'}_"
               f"{cfg.reward if cfg.reward in REWARD_PRESETS else 'custom'}_{cfg.method}" + (f"_d{cfg.dim}" if cfg.dim != 2 else ""))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", samples["finetuned"].numpy())
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    (out / "metrics.json").write_text(json.dumps({**result, "history": history}, indent=2))
    if not cfg.no_figure:
        make_figure(out / "figure.png", task, samples, result, history, cfg)
    result["out"] = str(out)
    return result


def dataclass_parser(cls, description: str, choices: Optional[Dict[str, tuple]] = None) -> argparse.ArgumentParser:
    """One --flag per field of a config dataclass, with its default, help string and choices."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=f.default, choices=(choices or {}).get(f.name), help=f.metadata["help"])
    return parser


def parse_args(argv=None) -> ToyConfig:
    choices = {"method": METHOD_NAMES, "gamma": ng.GAMMA_CHOICES, "weighting": ng.WEIGHTING_CHOICES,
               "guess_from": ng.GUESS_CHOICES, "flow_target": ng.FLOW_TARGET_CHOICES,
               "lr_schedule": LR_SCHEDULES}
    parser = dataclass_parser(ToyConfig, __doc__.split("\n\n")[0], choices)
    return ToyConfig(**vars(parser.parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    result = run(cfg)
    fin, pre = result["finetuned"], result["pretrained"]
    print(f"mode-weight TV to exact target: finetuned {fin['mode_tv']:.3f} | pretrained {pre['mode_tv']:.3f}"
          + (f" | oracle {result['oracle']['mode_tv']:.3f}" if "oracle" in result else ""))
    print(f"mean log-reward: finetuned {fin['mean_log_reward']:.3f} | exact {fin['exact_mean_log_reward']:.3f}")
    print(f"sliced W1 to target: finetuned {fin['sliced_w1']:.3f} | pretrained {pre['sliced_w1']:.3f}")
    print(f"wall time {result['time_s']['total']:.1f} s; outputs in {result['out']}")


if __name__ == "__main__":
    main()
