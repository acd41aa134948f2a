"""Exact Gaussian mixtures: the tilted target and the residual flow in closed form.

For a Gaussian-mixture prior p♯ = Σ_k w_k N(m_k, diag(s²)) and a Gaussian or linear log-reward r, the
tilted target p*(x_0) ∝ p♯(x_0) R(x_0)^β is again a mixture (`GaussianReward.tilt`, `LinearReward.tilt`),
both are Gaussian mixtures at every noise level of x_τ = √ᾱ x_0 + √(1−ᾱ) ε (`GMM.noised`), and so the
residual flow score ∇ log F̃_τ = ∇ log p*_τ − ∇ log p♯_τ is exact (`exact_flow_score`). The same holds on
the rectified-flow path x_t = (1 − t) x_0 + t ε (`path="flow"`, keyed by the ᾱ of equal signal-to-noise
ratio), with the exact velocity
(`exact_velocity`). toy_2d.py uses this as its prior, target and metrics; experiments/toy_diagnostics.py
as an oracle for the learned flow.

Priors and rewards are named presets or JSON (`parse_prior`, `parse_reward`). In D > 2 dimensions a
preset's modes stay in the first two coordinates and get one fixed offset each in the others (`mode_offsets`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor


# ---------------------------------------------------------------------------------------------- presets

PRIOR_PRESETS = {
    # 8 equal modes on a circle of radius 3.
    "ring8": {"means": [[3 * math.cos(2 * math.pi * k / 8), 3 * math.sin(2 * math.pi * k / 8)] for k in range(8)],
              "weights": [1 / 8] * 8, "std": 0.3},
    # The 5×5 grid of the RTB posterior benchmark (means {-10,…,10}², std 1), scaled by 0.3 so
    # that it sits inside SD's noise schedule (√ᾱ_T ≈ 0.07 leaves the corners barely visible at x_T).
    "grid25": {"means": [[3.0 * i, 3.0 * j] for i in (-1, -0.5, 0, 0.5, 1) for j in (-1, -0.5, 0, 0.5, 1)],
               "weights": [1 / 25] * 25, "std": 0.3},
}
REWARD_PRESETS = {
    # A broad Gaussian bump centred on the ring's mode at angle 0 (and on grid25's (3, 0) mode).
    "bump": {"type": "gaussian", "center": [3.0, 0.0], "std": 2.0},
    # A linear log-reward: tilts mass towards +x (and a little +y).
    "linear": {"type": "linear", "w": [0.5, 0.25]},
    # "bump" on all D coordinates: its centre extended by the offsets of the mode it sits on (D = 2: "bump").
    "bump-all": {"type": "gaussian", "center": [3.0, 0.0], "std": 2.0, "extend": "nearest-mode"},
}

# D > 2: the preset's 2-D means get one fixed offset per mode in coordinates 3 … D, of norm OFFSET_NORM
# (directions of N(0, I) draws seeded OFFSET_SEED, independent of --seed): modes apart in every coordinate.
OFFSET_NORM, OFFSET_SEED = 2.0, 0


# ---------------------------------------------------------------------------------------------- GMM, rewards, exact flow

# The forward path x_τ = c x_0 + √ν ε as (c, c², ν) from the noise level ᾱ. "ddpm": variance-preserving, c = √ᾱ,
# ν = 1 − ᾱ; "flow": rectified flow x_t = (1 − t) x_0 + t ε at the ᾱ of the same signal-to-noise ratio,
# ᾱ/(1 − ᾱ) = (1 − t)²/t², i.e. t = √(1−ᾱ)/(√ᾱ + √(1−ᾱ)) (`flow_alpha_bar`; the flow schedule's ᾱ).
def _flow_path(a: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    t = (1 - a).sqrt() / (a.sqrt() + (1 - a).sqrt())
    return 1 - t, (1 - t) ** 2, t**2


PATHS = {"ddpm": lambda a: (a.sqrt(), a, 1 - a), "flow": _flow_path}


def flow_alpha_bar(t: Tensor) -> Tensor:
    """The ᾱ that keys time t of the flow path: (1 − t)² / ((1 − t)² + t²)."""
    return (1 - t) ** 2 / ((1 - t) ** 2 + t**2)

@dataclass
class GMM:
    """Σ_k w_k N(m_k, diag(s²)), one covariance for all components. std: a float (isotropic: every prior and
    isotropic tilt) or a (D,) tensor (diagonal: the target of a reward that reads only some coordinates)."""

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
        """The mixture of the first `coords` coordinates (for figures)."""
        std = self.std[:coords] if isinstance(self.std, Tensor) else self.std
        return GMM(self.means[:, :coords], self.weights, std)

    def noised(self, alpha_bar: Tensor, path: str = "ddpm") -> Tuple[Tensor, Tensor]:
        """Marginal under x_τ = c x_0 + √ν ε (`PATHS[path]`), per row: means (N, K, D), variance (N,) or (N, D)
        if diagonal."""
        scale, scale2, noise = PATHS[path](alpha_bar.to(self.means.dtype))
        if isinstance(self.std, Tensor):
            return scale[:, None, None] * self.means, scale2[:, None] * self.std.to(scale) ** 2 + noise[:, None]
        return scale[:, None, None] * self.means, scale2 * self.std**2 + noise

    def _log_resp_terms(self, x: Tensor, alpha_bar: Tensor, path: str = "ddpm") -> Tuple[Tensor, Tensor, Tensor]:
        means, var = self.noised(alpha_bar, path)
        diff = x[:, None, :] - means  # (N, K, D)
        if var.ndim == 2:  # diagonal: var (N, D)
            log_comp = (self.weights.log() - 0.5 * (diff.pow(2) / var[:, None, :]).sum(-1)
                        - 0.5 * torch.log(2 * math.pi * var).sum(-1)[:, None])
            return log_comp, diff, var
        # isotropic: for D = 2 exactly the original 2-D operations (0.5·D = 1)
        log_comp = (self.weights.log() - 0.5 * diff.pow(2).sum(-1) / var[:, None]
                    - 0.5 * self.dim * torch.log(2 * math.pi * var)[:, None])
        return log_comp, diff, var[:, None]

    def log_prob(self, x: Tensor, alpha_bar: Optional[Tensor] = None, path: str = "ddpm") -> Tensor:
        alpha_bar = torch.ones(len(x), dtype=x.dtype) if alpha_bar is None else alpha_bar
        return self._log_resp_terms(x, alpha_bar, path)[0].logsumexp(-1)

    def score(self, x: Tensor, alpha_bar: Tensor, path: str = "ddpm") -> Tensor:
        """∇_x log p_τ(x) in closed form: Σ_k resp_k(x) · (−(x − √ᾱ m_k)/v_τ), v_τ per coordinate. (N, D)."""
        log_comp, diff, var = self._log_resp_terms(x, alpha_bar, path)
        return -(log_comp.softmax(-1)[..., None] * diff).sum(1) / var

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        std = self.std.to(self.means.dtype) if isinstance(self.std, Tensor) else self.std
        return self.means[k] + std * torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)


class GaussianReward:
    """r(x) = −‖x_{:n} − c‖² / (2 s²) on the first n = len(c) coordinates: R^β is a Gaussian bump with
    variance s²/β. A 2-D centre on a D-dimensional prior reads two coordinates (a diagonal target)."""

    def __init__(self, center, std):
        self.center, self.std = torch.tensor(center, dtype=torch.float64), float(std)

    def __call__(self, x: Tensor) -> Tensor:
        return -(x[..., : len(self.center)] - self.center.to(x)).pow(2).sum(-1) / (2 * self.std**2)

    def tilt(self, prior: GMM, beta: float) -> GMM:
        """p♯·R^β: per component a Gaussian product. On the read coordinates precision 1/s_d² + β/s_r² and
        mean (m/s_d² + βc/s_r²)/precision, the others as in the prior; weight
        w_k Π_{d<n} N(m_kd; c_d, s_d² + s_r²/β)."""
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


def exact_flow_score(prior: GMM, target: GMM, x: Tensor, alpha_bar: Tensor, path: str = "ddpm") -> Tensor:
    """Exact ∇ log F̃_τ(x) = ∇ log E♯[R(x_0)^β | x_τ = x] = ∇ log p*_τ(x) − ∇ log p♯_τ(x).

    The tilted path measure p♯(x_{0:T}) R(x_0)^β / Z has marginal p*_τ ∝ p♯_τ · E♯[R^β | x_τ], and
    p*_τ is the target GMM noised by the same forward process. At ᾱ = 1 this is β∇r (tested). float64 inside.
    "flow": exact for the memoryless flow SDE only (a = √2, whose forward kernel is the path's; at other
    noise levels x_τ | x_0 under the sampler is not N(√ᾱ x_0, ν I) and F̃ has no closed form).
    """
    x64, a = x.double(), alpha_bar.double().expand(len(x))
    return (target.score(x64, a, path) - prior.score(x64, a, path)).to(x.dtype)


def exact_velocity(gmm: GMM, x: Tensor, t: Tensor) -> Tensor:
    """E[ε − x_0 | x_t = x] on the path x_t = (1 − t) x_0 + t ε, t (N,) in (0, 1): with the score s,
    x̂_0 = (x + t² s)/(1 − t) (Tweedie) and ε̂ = −t s, so v = ε̂ − x̂_0 = −(x + t s)/(1 − t). At t = 1,
    x_1 ⟂ x_0 and v = x − E[x_0] (the limit). t in [0, 1], (N,) or a scalar. float64 inside, differentiable."""
    x64, t64 = x.double(), t.double().expand(len(x))[:, None]
    v = -(x64 + t64 * gmm.score(x64, flow_alpha_bar(t64[:, 0]), "flow")) / (1 - t64).clamp(min=1e-12)
    return torch.where(t64 == 1, x64 - gmm.weights @ gmm.means, v).to(x.dtype)


# ---------------------------------------------------------------------------------------------- parsing

def _json_or_preset(text: str, presets: Dict[str, dict], flag: str) -> dict:
    if text in presets:
        return presets[text]
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise SystemExit(f"error: {flag}: invalid JSON ({err.msg} at char {err.pos}): {text}")
    raise SystemExit(f"error: {flag}: unknown preset {text!r}; use one of {sorted(presets)} or a JSON object")


def mode_offsets(num_modes: int, extra_dims: int) -> Tensor:
    """(K, D − 2) per-mode offsets of norm OFFSET_NORM for the coordinates beyond the first two."""
    gen = torch.Generator().manual_seed(OFFSET_SEED)
    draws = torch.randn(num_modes, extra_dims, generator=gen, dtype=torch.float64)
    return OFFSET_NORM * draws / draws.norm(dim=1, keepdim=True)


def parse_prior(text: str, dim: int = 2) -> GMM:
    """A preset or JSON GMM in `dim` dimensions: K×2 means extended by `mode_offsets`, K×dim taken as given."""
    spec = _json_or_preset(text, PRIOR_PRESETS, "--prior")
    try:
        means = torch.tensor(spec["means"], dtype=torch.float64)
        k = len(means)
        weights, std = torch.tensor(spec.get("weights", [1 / k] * k), dtype=torch.float64), float(spec["std"])
    except (KeyError, TypeError, ValueError) as err:
        raise SystemExit(f'error: --prior: expected {{"means": [[x, y], ...], "weights": [...], "std": s}}, '
                         f'got {text} ({err})')
    if means.ndim != 2 or means.shape[1] not in (2, dim) or weights.shape != (k,) or std <= 0 or (weights < 0).any():
        raise SystemExit(f"error: --prior: means must be K×2 (or K×{dim} for --dim {dim}), "
                         "weights K non-negative numbers, std > 0")
    if means.shape[1] < dim:
        means = torch.cat([means, mode_offsets(k, dim - 2)], 1)
    return GMM(means, weights / weights.sum(), std)


def parse_reward(text: str, prior: Optional[GMM] = None):
    """A preset or JSON reward on the first len(center) / len(w) coordinates of `prior` (default: the plane).
    "extend": "nearest-mode" (gaussian) appends the other coordinates of the prior mode nearest the centre."""
    spec = _json_or_preset(text, REWARD_PRESETS, "--reward")
    kind, dim = spec.get("type"), 2 if prior is None else prior.dim
    try:
        if kind == "gaussian":
            center = torch.tensor(spec["center"], dtype=torch.float64)
            if spec.get("extend") == "nearest-mode" and prior is not None and len(center) < dim:
                nearest = (prior.means[:, : len(center)] - center).norm(dim=1).argmin()
                center = torch.cat([center, prior.means[nearest, len(center):]])
            reward, size = GaussianReward(center.tolist(), spec["std"]), len(center)
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


# ---------------------------------------------------------------------------------------------- sample metrics

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


def mode_tv(samples: Tensor, means: Tensor, target_weights: Tensor) -> Tuple[float, float]:
    """Total variation between the nearest-mode weights of `samples` and `target_weights`, and the fraction of
    non-finite samples: those (a diverged sampler) belong to no mode, so their mass counts fully against TV."""
    finite = torch.isfinite(samples).all(1)
    zeros = torch.zeros_like(target_weights)
    weights = mode_weights(samples[finite], means) * finite.double().mean() if finite.any() else zeros
    nonfinite = float(1 - finite.double().mean())
    return 0.5 * (float((weights - target_weights).abs().sum()) + nonfinite), nonfinite

