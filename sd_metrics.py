"""Evaluation metrics of the Stable Diffusion rung, per prompt and averaged over prompts (as the paper).

For each eval prompt, n finetuned and n pretrained samples share their seeds (same initial noise), so
the prior metrics measure only what finetuning moved:

| eval.json key                    | what                                                                  |
|----------------------------------|-----------------------------------------------------------------------|
| `dreamsim_diversity`(`_pretrained`) | mean pairwise DreamSim distance among one prompt's samples (the paper's diversity) |
| `prior_fid`                      | FID between one prompt's finetuned and pretrained samples (the paper's prior preservation), torchmetrics' `FrechetInceptionDistance` on torch-fidelity's standard Inception-v3 |
| `clip_diversity`(`_pretrained`)  | mean pairwise cosine distance of CLIP ViT-L/14 image embeddings (cheap, always available) |
| `clip_prior_frechet`             | Fréchet distance of the CLIP embeddings, finetuned vs pretrained       |

A metric whose model cannot be loaded is reported as null with its reason under `unavailable` (and in
the log); the others still run. With few samples per prompt (8 by default) against 2048 Inception
features, each per-prompt FID is dominated by its small-sample bias (as in the paper, whose per-prompt
FIDs are in the hundreds): compare runs at equal sample counts only.

Stand-ins for smoke tests (`--dreamsim tiny`, `--fid-weights tiny`, implied by `--model tiny`): a small
random embedder in DreamSim's place and a small random feature network as torchmetrics' `feature=`
module; the same code computes the metrics from them. Their values mean nothing.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sd_rewards import TINY, ClipEmbedder, Source, offline

DREAMSIM_TYPE = "ensemble"  # DreamSim's default: DINO ViT-B/16 + CLIP ViT-B/16 + OpenCLIP ViT-B/16, LoRA-tuned
DREAMSIM_SIZE = 224
FID_FEATURES = 2048
FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's port of the TF FID Inception


class MetricUnavailable(Exception):
    """A metric's model cannot be loaded: the metric is reported as unavailable, the run goes on."""


# ----------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------


def mean_pairwise_distance(embeds: Tensor) -> float:
    """Mean cosine distance 1 − cos(e_i, e_j) over pairs i < j of embeddings (n, D)."""
    embeds = F.normalize(embeds.double(), dim=-1)
    n = len(embeds)
    return float((1 - embeds @ embeds.T).triu(1).sum() / (n * (n - 1) / 2))


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """‖μ_a − μ_b‖² + tr(C_a + C_b − 2 (C_a C_b)^½) between Gaussians fitted to rows of a and b.

    tr (C_a C_b)^½ = Σ √eig(C_a^½ C_b C_a^½), computed with symmetric eigendecompositions (stable
    when few samples make the covariances singular).
    """
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def to_unit_range(images: Tensor) -> Tensor:
    return ((images.float() + 1) / 2).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# DreamSim
# ----------------------------------------------------------------------------------------------


class DreamSimDistance:
    """Distances of DreamSim's embeddings: `embedder.embed(x)` on (N, 3, 224, 224) images in [0, 1], as
    the dreamsim package's model (its own preprocessing: a bicubic resize to 224 × 224, no crop), and
    distance 1 − cos (its forward)."""

    def __init__(self, embedder: nn.Module):
        self.embedder = embedder

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:  # images in [-1, 1] → (N, D)
        x = F.interpolate(to_unit_range(images), size=(DREAMSIM_SIZE, DREAMSIM_SIZE), mode="bicubic",
                          align_corners=False, antialias=True).clamp(0, 1)
        return self.embedder.embed(x).reshape(len(x), -1)

    def diversity(self, images: Tensor) -> float:
        return mean_pairwise_distance(self.embed(images))


class RandomEmbedder(nn.Module):
    """DreamSim's stand-in for smoke tests: a fixed random conv net with DreamSim's `embed` interface."""

    def __init__(self, dim: int = 32, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                     nn.Linear(128, dim))
        self.requires_grad_(False)

    def embed(self, images: Tensor) -> Tensor:
        return self.net(images)


@contextlib.contextmanager
def torch_hub_dir_kept():
    """dreamsim points torch.hub at its cache folder (for DINO); restore the previous one afterwards
    (torch-fidelity's Inception weights are cached under torch.hub's folder)."""
    previous = torch.hub.get_dir()
    try:
        yield
    finally:
        torch.hub.set_dir(previous)


def load_dreamsim(source: Source, cache_dir: str, device) -> DreamSimDistance:
    """DreamSim from its cache folder (the folder `dreamsim(cache_dir=...)` fills on first use when
    online; '' = cache_dir/dreamsim), or the tiny stand-in."""
    if source.value == TINY:
        return DreamSimDistance(RandomEmbedder().to(device))
    folder = source.value or str(Path(cache_dir) / "dreamsim")
    if offline() and not (Path(folder) / f"{DREAMSIM_TYPE}_lora" / "adapter_config.json").is_file():
        raise MetricUnavailable(f"DreamSim weights not in {folder!r} and HF_HUB_OFFLINE is set: {source.hint()} with "
                                f"a folder that dreamsim.dreamsim(cache_dir=DIR) filled while online")
    try:
        from dreamsim import dreamsim

        Path(folder).mkdir(parents=True, exist_ok=True)  # dreamsim makes only the last level itself
        with torch_hub_dir_kept(), contextlib.redirect_stdout(io.StringIO()):  # its "Using cached ..." prints
            model, _ = dreamsim(pretrained=True, device=str(device), cache_dir=folder, dreamsim_type=DREAMSIM_TYPE)
    except Exception as err:  # any failure of the package's loading makes the metric unavailable, not the run
        raise MetricUnavailable(f"DreamSim did not load from {folder!r} ({type(err).__name__}: {err})".splitlines()[0]) from None
    return DreamSimDistance(model)


# ----------------------------------------------------------------------------------------------
# FID (torchmetrics)
# ----------------------------------------------------------------------------------------------


class RandomFeatures(nn.Module):
    """The FID's stand-in feature network for smoke tests (torchmetrics' `feature=` module): images in
    [0, 1] → 16 fixed random features."""

    num_features = 16

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                     nn.Linear(32, self.num_features))
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images.float())


def load_fid(source: Source, device):
    """torchmetrics' FrechetInceptionDistance: 2048 pool features of torch-fidelity's FID Inception-v3.

    source.value: '' = the standard weights, downloaded once into torch hub's cache
    (checkpoints/weights-inception-2015-12-05-6726825d.pth); a path to that file; or 'tiny'.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if source.value == TINY:
        return FrechetInceptionDistance(feature=RandomFeatures(), normalize=True).to(device)
    path = source.value or str(Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE)
    if source.value and not Path(path).is_file():
        raise MetricUnavailable(f"FID Inception weights {path!r} not found: {source.hint()} with the file {FID_WEIGHTS_FILE}")
    if not Path(path).is_file() and offline():
        raise MetricUnavailable(f"FID Inception weights not cached ({path}) and HF_HUB_OFFLINE is set: {source.hint()} "
                                f"with the file {FID_WEIGHTS_FILE} (torch-fidelity's release assets)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return FrechetInceptionDistance(feature=FID_FEATURES, normalize=True,
                                            feature_extractor_weights_path=source.value or None).to(device)
    except Exception as err:  # a failed download or a bad file makes the metric unavailable, not the run
        raise MetricUnavailable(f"FID Inception did not load ({type(err).__name__}: {err})".splitlines()[0]) from None


def fid(metric, finetuned: Tensor, pretrained: Tensor) -> float:
    """FID of one prompt: pretrained samples as the 'real' set, finetuned as the generated one."""
    metric.reset()
    metric.update(to_unit_range(pretrained), real=True)
    metric.update(to_unit_range(finetuned), real=False)
    return float(metric.compute())


# ----------------------------------------------------------------------------------------------
# Per prompt, then averaged
# ----------------------------------------------------------------------------------------------


@dataclass
class Evaluator:
    """The metric models of an eval; dreamsim or fid is None when unavailable (the reason kept)."""

    clip: ClipEmbedder
    dreamsim: Optional[DreamSimDistance]
    fid: Optional[nn.Module]  # torchmetrics' FrechetInceptionDistance
    unavailable: Dict[str, str] = field(default_factory=dict)  # metric → why it could not load
    models: Dict[str, str] = field(default_factory=dict)  # metric → what computed it

    @torch.no_grad()
    def prompt_metrics(self, finetuned: Tensor, pretrained: Tensor) -> Dict[str, Optional[float]]:
        """Every metric of one prompt: finetuned and pretrained images (n, 3, H, W) in [-1, 1], same seeds."""
        e_ft, e_pre = self.clip.image_embeds(finetuned), self.clip.image_embeds(pretrained)
        row = {"clip_diversity": mean_pairwise_distance(e_ft), "clip_diversity_pretrained": mean_pairwise_distance(e_pre),
               "clip_prior_frechet": frechet_distance(e_ft, e_pre),
               "dreamsim_diversity": None, "dreamsim_diversity_pretrained": None, "prior_fid": None}
        if self.dreamsim is not None:
            row.update(dreamsim_diversity=self.dreamsim.diversity(finetuned),
                       dreamsim_diversity_pretrained=self.dreamsim.diversity(pretrained))
        if self.fid is not None:
            row["prior_fid"] = fid(self.fid, finetuned, pretrained)
        return row


def load_evaluator(clip: ClipEmbedder, dreamsim: Source, fid_weights: Source, cache_dir: str, device) -> Evaluator:
    """The eval's metric models; one that cannot load is recorded in `unavailable`, the others still load."""
    stand_in = "random stand-in (smoke tests only: its values mean nothing)"
    evaluator = Evaluator(clip, None, None, models={"clip": "CLIP image embeddings of the reward's CLIP model"})
    try:
        evaluator.dreamsim = load_dreamsim(dreamsim, cache_dir, device)
        evaluator.models["dreamsim"] = stand_in if dreamsim.value == TINY else f"dreamsim {DREAMSIM_TYPE}"
    except MetricUnavailable as err:
        evaluator.unavailable["dreamsim"] = str(err)
    try:
        evaluator.fid = load_fid(fid_weights, device)
        evaluator.models["prior_fid"] = stand_in if fid_weights.value == TINY else \
            f"torchmetrics FrechetInceptionDistance, {FID_FEATURES} Inception-v3 features (torch-fidelity weights)"
    except MetricUnavailable as err:
        evaluator.unavailable["prior_fid"] = str(err)
    return evaluator


def average_rows(rows: Sequence[Dict[str, Optional[float]]]) -> Dict[str, Optional[float]]:
    """Mean over prompts of each metric (None where a metric was unavailable)."""
    keys: List[str] = [k for k, v in rows[0].items() if v is None or isinstance(v, float)]
    return {k: None if rows[0][k] is None else sum(r[k] for r in rows) / len(rows) for k in keys}
