"""Tests of sd_metrics.py: the Fréchet distances against scipy on known Gaussians, DreamSim's
diversity through a stand-in embedder, and that a metric whose model cannot load is reported while
the others still run. CPU only, offline."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg
from torchmetrics.image.fid import FrechetInceptionDistance

import sd_finetune as sd
import sd_metrics as sdm
from sd_rewards import Source

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


class Features(torch.nn.Module):
    """torchmetrics' `feature=` module that returns its input: the FID of given feature vectors."""

    def __init__(self, dim):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def scipy_frechet(a, b):
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), np.cov(a.T), np.cov(b.T)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))


def known_gaussians(n, seed=0):
    """Samples of N(0, A Aᵀ) and N(1, 0.25 I) in 6 dimensions, and their exact Fréchet distance."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    a = torch.randn(n, 6, generator=generator, dtype=torch.float64) @ mix.T
    b = torch.randn(n, 6, generator=generator, dtype=torch.float64) * 0.5 + 1.0
    cov_a, cov_b = (mix @ mix.T).numpy(), 0.25 * np.eye(6)
    exact = 6.0 + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real)
    return a, b, float(exact)


def test_torchmetrics_fid_matches_scipy_on_known_gaussians():
    a, b, exact = known_gaussians(20000)
    metric = FrechetInceptionDistance(feature=Features(6))
    metric.update(a, real=True)
    metric.update(b, real=False)
    fid = float(metric.compute())
    # float64 on both sides, full-rank 6-D covariances, FID ≈ 31 ≫ its cancelling traces' rounding: agree to ~1e-15.
    assert fid == pytest.approx(scipy_frechet(a.numpy(), b.numpy()), rel=1e-6)
    assert fid == pytest.approx(exact, rel=0.03)  # sampling error of 20000 samples
    assert sdm.frechet_distance(a, b) == pytest.approx(fid, rel=1e-6)


def test_frechet_distance_matches_scipy_and_is_zero_on_itself():
    a, b, _ = known_gaussians(200)
    assert sdm.frechet_distance(a, b) == pytest.approx(scipy_frechet(a.numpy(), b.numpy()), rel=1e-6)
    assert sdm.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)  # float64: tr C ≈ 20, rounding ~1e-13


def test_prompt_fid_uses_torchmetrics_with_the_stand_in_features():
    metric = sdm.load_fid(Source("tiny", "--fid-weights", "NABLA_GFN_FID_WEIGHTS"), "cpu")
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.rand(6, 3, 32, 32, generator=generator) * 2 - 1 for _ in range(2))
    features = lambda images: metric.inception(sdm.to_unit_range(images)).double().numpy()
    # float64 on the same float32 features; 6 samples in 16-D leave ~11 zero eigenvalues whose rounding (~eps64·‖C‖²,
    # ‖C‖ ≈ 4e-3) enters through √: ~1e-10 each, ~1e-7 relative to FID ≈ 0.01.
    assert sdm.fid(metric, x, y) == pytest.approx(scipy_frechet(features(x), features(y)), rel=1e-4, abs=1e-7)
    assert sdm.fid(metric, x, x) == pytest.approx(0.0, abs=1e-5)  # √-rounding as above, ~1e-9; reset between prompts: only this pair counts


def test_mean_pairwise_distance_of_unit_vectors():
    assert sdm.mean_pairwise_distance(torch.eye(3)) == pytest.approx(1.0)  # orthogonal: every pair at distance 1
    assert sdm.mean_pairwise_distance(torch.ones(4, 1)) == pytest.approx(0.0)
    assert sdm.mean_pairwise_distance(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(2.0)  # scale-free


def test_dreamsim_diversity_is_the_mean_pairwise_dreamsim_distance():
    """diversity = mean over pairs of DreamSim's distance, 1 − cos(embed(a), embed(b)) on 224² images in
    [0, 1] (the package's forward), here with the stand-in embedder in DreamSim's place."""
    distance = sdm.load_dreamsim(Source("tiny", "--dreamsim", "NABLA_GFN_DREAMSIM"), "unused", "cpu")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    unit = F.interpolate((images + 1) / 2, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    embeds = distance.embedder.embed(unit)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    embeds = embeds.double()  # 1 − cos ≈ 0.006 cancels ~2.5 of float32's ~7 digits: the oracle is float64
    expected = sum(float(1 - F.cosine_similarity(embeds[i : i + 1], embeds[j : j + 1])) for i, j in pairs) / len(pairs)
    # Same float32 embeddings, float64 sums in another order: error ≲ κ·eps64 with κ = Σ|terms|/|result| ≈ 2/0.006.
    assert distance.diversity(images) == pytest.approx(expected, rel=1e-10)
    # Equal rows: 0 up to float64 rounding (a float32 difference δ between rows would enter as δ²/2 ≲ 1e-13).
    assert distance.diversity(images[:1].expand(3, -1, -1, -1)) == pytest.approx(0.0, abs=1e-12)


def test_a_metric_that_cannot_load_is_unavailable_and_the_others_still_run(tmp_path):
    clip = sd.load_clip(sd.parse_config(["--preset", "smoke", "--cache-dir", str(tmp_path)]), "cpu")
    evaluator = sdm.load_evaluator(clip, Source(str(tmp_path / "no-dreamsim"), "--dreamsim", "NABLA_GFN_DREAMSIM"),
                                   Source("/no/such/inception.pth", "--fid-weights", "NABLA_GFN_FID_WEIGHTS"),
                                   str(tmp_path), "cpu")
    assert set(evaluator.unavailable) == {"dreamsim", "prior_fid"}
    assert "--dreamsim" in evaluator.unavailable["dreamsim"] and "NABLA_GFN_DREAMSIM" in evaluator.unavailable["dreamsim"]
    assert "/no/such/inception.pth" in evaluator.unavailable["prior_fid"]
    assert all(len(reason.splitlines()) == 1 for reason in evaluator.unavailable.values())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    row = evaluator.prompt_metrics(images, images.flip(0))
    assert row["dreamsim_diversity"] is None and row["prior_fid"] is None
    # The same two embeddings in the other order, float64 Fréchet: √ of the rank-1 covariance's rounding, ~1e-8 ≪ 1e-6.
    assert row["clip_diversity"] > 0 and row["clip_prior_frechet"] == pytest.approx(0.0, abs=1e-6)


def test_average_rows_means_over_prompts_and_keeps_unavailable_as_none():
    rows = [{"prompt": "cat", "a": 1.0, "b": None}, {"prompt": "dog", "a": 3.0, "b": None}]
    assert sdm.average_rows(rows) == {"a": 2.0, "b": None}


def test_smoke_eval_reports_an_unavailable_metric_in_eval_json_and_the_log(tmp_path, capsys):
    out = tmp_path / "run"
    sd.main(["--preset", "smoke", "--eval", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
             "--dreamsim", str(tmp_path / "no-dreamsim")])
    log = capsys.readouterr().out
    assert "eval: dreamsim unavailable: DreamSim weights not in" in log
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["dreamsim_diversity"] is None and "dreamsim" in evaluation["unavailable"]
    assert evaluation["prior_fid"] >= 0 and evaluation["clip_diversity"] >= 0  # the others still ran
    assert len(evaluation["per_prompt"]) == evaluation["prompts"] == len(sd.EVAL_ANIMALS)
