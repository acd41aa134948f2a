"""The digits rung's models: the data, the ε-network, the classifier behind the class reward, g_φ, their
pretraining (cached on disk by config), and the weighted sample statistics its metrics are made of.
`toy_digits.py` is the script that uses them (as nanoGPT's train.py uses model.py); the pretraining
functions take toy_digits' Config and read only its pretraining fields.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Tuple

import numpy as np
import torch
from diffusers import ConfigMixin, DDIMScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders.peft import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn
from tqdm.auto import tqdm

import nabla_gfn as ng
from toy_2d import sd_scheduler as make_scheduler  # DDIM with SD's noise schedule: the SD rung's step constants

IMAGE_SHAPE = (1, 8, 8)
Config = Any  # toy_digits.Config (not imported: toy_digits imports this module)


# ---- Data, denoiser, classifier, g_φ --------------------------------------------------------------

def load_digits_tensor() -> Tuple[Tensor, Tensor]:
    """The 1,797 sklearn digits in [−1, 1]: ((1797, 1, 8, 8) float, (1797,) long labels)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, *IMAGE_SHAPE) / 8.0 - 1.0  # 0..16 → [−1, 1]
    return images, torch.tensor(digits.target, dtype=torch.long)

class ResidualBlock(nn.Module):
    """Pre-norm MLP block with the time embedding as a scale and shift (FiLM)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm, self.film = nn.LayerNorm(width), nn.Linear(width, 2 * width)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        scale, shift = self.film(temb).chunk(2, dim=-1)
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))

class DigitDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """ε-prediction MLP: (N, 1, 8, 8), (N,) timesteps → (N, 1, 8, 8). An MLP rather than a UNet2DModel (10×
    the pretraining steps per second here, better digits); a diffusers model, so LoRA reads as on SD's UNet."""

    @register_to_config
    def __init__(self, sample_size: int = 8, hidden: int = 256, depth: int = 3, time_channels: int = 64):
        super().__init__()
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channels, hidden)
        self.proj_in = nn.Linear(sample_size * sample_size, hidden)
        self.blocks = nn.ModuleList([ResidualBlock(hidden) for _ in range(depth)])
        self.norm_out, self.proj_out = nn.LayerNorm(hidden), nn.Linear(hidden, sample_size * sample_size)

    def forward(self, sample: Tensor, timestep: Tensor) -> Tensor:
        temb = nn.functional.silu(self.time_embedding(self.time_proj(timestep).to(sample.dtype)))
        h = self.proj_in(sample.flatten(1))
        for block in self.blocks:
            h = block(h, temb)
        return self.proj_out(self.norm_out(h)).view_as(sample)

LORA_TARGETS = ["proj_in", "film", "fc1", "fc2", "proj_out"]

class DigitClassifier(nn.Module):
    """SiLU MLP: images (N, 1, 8, 8) → logits (N, 10) divided by a temperature fitted on held-out digits,
    so p(K|x), and with it the target, is calibrated; `features` (N, 64) for the Fréchet distance."""

    def __init__(self, width: int = 256, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.SiLU(), nn.Linear(width, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, 10)
        self.register_buffer("temperature", torch.ones(()))

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x)) / self.temperature

class FlowCorrection(nn.Module):
    """g_φ(x, τ): a vector field shaped like x, zero at initialisation (nabla_gfn.zero_output_layer)."""

    def __init__(self, hidden: int = 128, time_channels: int = 32):
        super().__init__()
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.net = nn.Sequential(nn.Linear(64 + time_channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 64))
        ng.zero_output_layer(self.net)

    def forward(self, x: Tensor, t: Tensor, traj: Tensor) -> Tensor:
        return self.net(torch.cat([x.flatten(1), self.time_proj(t).to(x.dtype)], dim=1)).view_as(x)


# ---- Pretraining, cached on disk by config --------------------------------------------------------

def cached(cfg: Config, kind: str, fields: Dict, build: Callable, save: Callable, load: Callable):
    """load(folder) if (kind, fields) is cached; else build(), save(value, tmp) and publish tmp atomically."""
    blob = json.dumps({"kind": kind, "format": 1, **fields}, sort_keys=True)
    root = Path(cfg.cache or os.environ.get("NABLA_GFN_CACHE") or Path.home() / ".cache" / "nabla-gfn")
    path = root / f"digits-{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if path.exists():
        return load(path)
    value = build()
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save(value, tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # a concurrent run got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return value

def pretrain_denoiser(cfg: Config, images: Tensor, scheduler: DDIMScheduler, progress: bool = True) -> DigitDenoiser:
    """Standard ε-prediction training (uniform timesteps, MSE), AdamW with cosine decay, EMA weights."""
    gen = torch.Generator().manual_seed(cfg.pretrain_seed)
    torch.manual_seed(cfg.pretrain_seed)
    model = DigitDenoiser(hidden=cfg.hidden, depth=cfg.depth)
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.pretrain_steps)
    bar = tqdm(range(cfg.pretrain_steps), desc="pretrain denoiser", disable=not progress)
    for step in bar:
        x0 = images[torch.randint(len(images), (cfg.pretrain_batch,), generator=gen)]
        t = torch.randint(scheduler.config.num_train_timesteps, (cfg.pretrain_batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        loss = (model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t) - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_schedule.step()
        with torch.no_grad():  # EMA with warm-up
            for p_ema, p in zip(ema, model.parameters()):
                p_ema.lerp_(p.detach(), 1 - min(0.999, (1 + step) / (10 + step)))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    with torch.no_grad():
        for p_ema, p in zip(ema, model.parameters()):
            p.copy_(p_ema)
    return model.eval()

def load_or_pretrain_denoiser(cfg: Config, images: Tensor, scheduler: DDIMScheduler) -> DigitDenoiser:
    fields = {k: getattr(cfg, k) for k in ("hidden", "depth", "pretrain_steps", "pretrain_batch", "pretrain_lr", "pretrain_seed")}
    return cached(cfg, "denoiser", fields, lambda: pretrain_denoiser(cfg, images, scheduler),
                  lambda model, folder: model.save_pretrained(folder), lambda folder: DigitDenoiser.from_pretrained(folder).eval())

def train_classifier(cfg: Config, images: Tensor, labels: Tensor) -> Tuple[DigitClassifier, float]:
    """Train on a fixed 80% split (full batch, AdamW, noise augmentation), then temperature scaling (Guo et al.
    2017: the T minimising held-out NLL of softmax(logits / T)); return (classifier, held-out accuracy)."""
    gen = torch.Generator().manual_seed(cfg.pretrain_seed)
    torch.manual_seed(cfg.pretrain_seed)
    perm = torch.randperm(len(images), generator=gen)
    n_train = int(0.8 * len(images))
    train, held_out = perm[:n_train], perm[n_train:]
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in tqdm(range(cfg.classifier_steps), desc="train classifier", leave=False):
        # noise augmentation keeps the classifier (and its gradient, the reward) smooth off the data
        std = cfg.classifier_noise * torch.rand((n_train, 1, 1, 1), generator=gen)
        loss = nn.functional.cross_entropy(clf(images[train] + std * torch.randn(images[train].shape, generator=gen)), labels[train])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    logits = clf.eval().requires_grad_(False).head(clf.features(images[held_out]))
    log_t = torch.zeros((), requires_grad=True)
    lbfgs = torch.optim.LBFGS([log_t], max_iter=100)

    def nll():
        lbfgs.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), labels[held_out])
        loss.backward()
        return loss

    lbfgs.step(nll)
    clf.temperature.fill_(float(log_t.detach().exp()))
    with torch.no_grad():
        return clf, (clf(images[held_out]).argmax(1) == labels[held_out]).float().mean().item()

def load_or_train_classifier(cfg: Config, images: Tensor, labels: Tensor) -> Tuple[DigitClassifier, float]:
    def save(value, folder: Path):
        torch.save(value[0].state_dict(), folder / "model.pt")
        (folder / "meta.json").write_text(json.dumps({"held_out_accuracy": value[1]}))

    def load(folder: Path):
        clf = DigitClassifier()
        clf.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
        return clf.eval().requires_grad_(False), json.loads((folder / "meta.json").read_text())["held_out_accuracy"]

    fields = {"steps": cfg.classifier_steps, "noise": cfg.classifier_noise, "seed": cfg.pretrain_seed}
    return cached(cfg, "classifier", fields, lambda: train_classifier(cfg, images, labels), save, load)

# ---- Sample statistics, of weighted sets (the reference; finetuned samples have uniform weights) --

def uniform(n: int) -> Tensor:
    return torch.full((n,), 1.0 / n, dtype=torch.float64)

def weighted_mean_pairwise_distance(x: Tensor, w: Tensor, chunk: int = 1024) -> float:
    """E ‖x − x'‖ for two distinct draws: Σ_{i≠j} w_i w_j d_ij / Σ_{i≠j} w_i w_j."""
    flat, w = x.flatten(1).double(), w.double()
    total = sum(w[s : s + chunk] @ torch.cdist(flat[s : s + chunk], flat) @ w for s in range(0, len(flat), chunk))
    return float(total / (1 - w.pow(2).sum()))

def expected_distinct_nearest(x: Tensor, w: Tensor, train: Tensor, n: int) -> float:
    """Expected number of distinct nearest training digits among n draws from Σ w_i δ(x_i): with p_j the
    weight of the samples whose nearest training digit is j, Σ_j 1 − (1 − p_j)^n."""
    nearest = torch.cdist(x.flatten(1), train.flatten(1)).argmin(1)
    p = torch.zeros(len(train), dtype=torch.float64).index_add_(0, nearest, w.double())
    return float((1 - (1 - p).pow(n)).sum())

def distinct_nearest(x: Tensor, train: Tensor) -> int:
    return int(torch.cdist(x.flatten(1), train.flatten(1)).argmin(1).unique().numel())

def weighted_gaussian(features: Tensor, w: Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """Weighted mean and (reliability-weighted, unbiased) covariance of (M, D) features."""
    f, w = features.double(), w.double()
    mu = w @ f
    centred = f - mu
    return mu.numpy(), ((centred * w[:, None]).T @ centred / (1 - w.pow(2).sum())).numpy()

def frechet_distance(a: Tuple[np.ndarray, np.ndarray], b: Tuple[np.ndarray, np.ndarray]) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between two Gaussians (as in FID)."""
    from scipy import linalg

    (mu_a, cov_a), (mu_b, cov_b) = a, b
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(linalg.sqrtm(cov_a @ cov_b))))
