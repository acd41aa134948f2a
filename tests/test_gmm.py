"""Oracle tests of gmm.py: the closed-form tilted target, scores and exact residual flow against numerical
integration, autograd and Monte Carlo, in 2 and D dimensions; D = 2 is the original 2-D toy, operation for
operation; the sample metrics.

    pytest -x -q tests/test_gmm.py
"""

import math

import pytest
import torch

import gmm

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# The 2-D mixture, its tilts and the exact flow
# ----------------------------------------------------------------------------------------------


def grid(lo=-7.0, hi=7.0, n=401):
    xs = torch.linspace(lo, hi, n, dtype=F64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    return torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), float(xs[1] - xs[0]) ** 2


REWARDS = [
    gmm.GaussianReward([3.0, 0.0], 2.0),
    gmm.GaussianReward([-1.0, 2.0], 0.7),
    gmm.LinearReward([0.5, 0.25]),
    gmm.LinearReward([-1.0, 0.3]),
]


@pytest.mark.parametrize("prior_name", ["ring8", "grid25"])
@pytest.mark.parametrize("reward", REWARDS, ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_tilted_gmm_matches_numerical_integration(prior_name, reward, beta):
    """p*(x) = p♯(x) R(x)^β / Z on a fine grid equals the closed-form tilted GMM's density."""
    prior = gmm.parse_prior(prior_name)
    target = reward.tilt(prior, beta)
    x, cell = grid()
    unnorm = (prior.log_prob(x) + beta * reward(x)).exp()
    numeric = unnorm / (unnorm.sum() * cell)
    closed = target.log_prob(x).exp()
    assert float((closed.sum() * cell)) == pytest.approx(1.0, abs=1e-3)  # Riemann sum on the grid (mass off the grid)
    assert float((numeric - closed).abs().sum() * cell) < 2e-3  # L1 distance of the densities
    # the exact expected log-reward agrees with the grid too
    assert reward.expectation(target) == pytest.approx(float((numeric * reward(x)).sum() * cell), abs=2e-3)  # as the L1 above


@pytest.mark.parametrize("alpha_bar", [0.003, 0.1, 0.5, 0.97, 1.0])
def test_gmm_score_matches_autograd_of_noised_log_density(alpha_bar):
    prior = gmm.parse_prior("ring8")
    x = torch.randn(64, 2, dtype=F64) * 3
    a = torch.full((64,), alpha_bar, dtype=F64)
    xg = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(prior.log_prob(xg, a).sum(), xg)
    torch.testing.assert_close(prior.score(x, a), auto)


@pytest.mark.parametrize("reward", REWARDS, ids=lambda r: type(r).__name__)
def test_exact_flow_at_data_end_is_beta_grad_reward(reward):
    """Terminal condition ∇ log F̃(x_0) = β ∇r(x_0), for the exact flow at ᾱ = 1."""
    prior, beta = gmm.parse_prior("grid25"), 1.7
    target = reward.tilt(prior, beta)
    x = (torch.randn(200, 2, dtype=F64) * 3).requires_grad_(True)
    (grad_r,) = torch.autograd.grad(reward(x).sum(), x)
    flow = gmm.exact_flow_score(prior, target, x.detach(), torch.ones(1, dtype=F64))
    torch.testing.assert_close(flow, beta * grad_r)


def test_exact_flow_is_gradient_of_log_conditional_expectation():
    """∇ log E♯[R(x_0)^β | x_τ = x] by Monte Carlo over the GMM posterior vs the closed form.

    Posterior of x_0 given x_τ: a GMM whose components are Gaussian posteriors; we estimate
    log E[R^β | x_τ] on a small stencil and take central differences."""
    prior, reward, beta, alpha = gmm.parse_prior("ring8"), gmm.GaussianReward([3.0, 0.0], 2.0), 1.0, 0.3
    target = reward.tilt(prior, beta)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(400_000, 2, generator=gen, dtype=F64)

    def log_expected_reward(x):
        # p(x_0 | x_τ) ∝ p♯(x_0) N(x_τ; √α x_0, (1−α) I): per component a Gaussian posterior
        s2, v = prior.std**2, alpha * prior.std**2 + 1 - alpha
        log_resp = prior.weights.log() - ((x - math.sqrt(alpha) * prior.means) ** 2).sum(1) / (2 * v)
        resp = log_resp.softmax(0)
        post_var = s2 * (1 - alpha) / v
        post_mean = prior.means + (math.sqrt(alpha) * s2 / v) * (x - math.sqrt(alpha) * prior.means)
        comp = torch.multinomial(resp, len(z), replacement=True, generator=torch.Generator().manual_seed(1))
        x0 = post_mean[comp] + math.sqrt(post_var) * z
        return torch.logsumexp(beta * reward(x0), 0) - math.log(len(z))

    x, h = torch.tensor([1.0, 1.5], dtype=F64), 0.05
    fd = torch.stack([(log_expected_reward(x + h * e) - log_expected_reward(x - h * e)) / (2 * h) for e in torch.eye(2, dtype=F64)])
    exact = gmm.exact_flow_score(prior, target, x[None], torch.tensor([alpha], dtype=F64))[0]
    torch.testing.assert_close(fd, exact, atol=0.02, rtol=0.02)  # O(h²) central difference of a seeded Monte Carlo estimate


# ----------------------------------------------------------------------------------------------
# The D-dimensional prior and its tilted target
# ----------------------------------------------------------------------------------------------


def rewards_for(dim):
    """Rewards on the first two coordinates and on all of them (by preset, JSON-like spec, and explicitly)."""
    prior = gmm.parse_prior("ring8", dim)
    return {
        "bump": gmm.parse_reward("bump", prior),
        "bump-all": gmm.parse_reward("bump-all", prior),
        "narrow-bump": gmm.GaussianReward([-1.0, 2.0], 0.7),
        "linear": gmm.parse_reward("linear", prior),
        "linear-all": gmm.LinearReward((0.3 * torch.linspace(-1, 1, dim, dtype=F64)).tolist()),
    }


def test_offsets_separate_the_modes_in_the_other_coordinates():
    prior = gmm.parse_prior("grid25", 16)
    offsets = prior.means[:, 2:]
    torch.testing.assert_close(offsets.norm(dim=1), torch.full((25,), gmm.OFFSET_NORM, dtype=F64))
    torch.testing.assert_close(prior.means[:, :2], gmm.parse_prior("grid25").means)  # the plane is the 2-D preset
    assert torch.cdist(offsets, offsets).add(torch.eye(25) * 10).min() > 0.5  # no two modes share their offsets
    torch.testing.assert_close(gmm.parse_prior("grid25", 16).means, prior.means)  # fixed, not seeded by --seed


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_plane_marginal_of_the_tilted_target_matches_numerical_integration(beta):
    """A reward on the first two coordinates: the target's (x1, x2) marginal is p♯'s plane marginal
    times R^β, normalised on a grid (the offsets integrate out); the diagonal target must agree."""
    prior = gmm.parse_prior("ring8", 8)
    reward = gmm.parse_reward("bump", prior)
    target = reward.tilt(prior, beta)
    assert isinstance(target.std, torch.Tensor) and target.std[0] < target.std[2]  # anisotropic
    xs = torch.linspace(-7, 7, 401, dtype=F64)
    gx, gy = torch.meshgrid(xs, xs, indexing="xy")
    x, cell = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), float(xs[1] - xs[0]) ** 2
    unnorm = (prior.marginal(2).log_prob(x) + beta * reward(x)).exp()
    numeric = unnorm / (unnorm.sum() * cell)
    closed = target.marginal(2).log_prob(x).exp()
    assert float((numeric - closed).abs().sum() * cell) < 2e-3  # L1 distance of the densities


@pytest.mark.parametrize("dim", [3, 8, 32])
@pytest.mark.parametrize("name", ["bump", "bump-all", "narrow-bump", "linear", "linear-all"])
def test_tilted_gmm_matches_importance_weighted_prior_samples(dim, name):
    """All D coordinates: p♯ samples weighted by R^β (self-normalised) against the closed-form target:
    mode weights, per-coordinate means and variances within each mode, and E[r]."""
    beta = 1.0
    prior = gmm.parse_prior("ring8", dim)
    reward = rewards_for(dim)[name]
    target = reward.tilt(prior, beta)
    gen = torch.Generator().manual_seed(0)
    k = torch.multinomial(prior.weights, 200_000, replacement=True, generator=gen)
    x = prior.means[k] + prior.std * torch.randn(len(k), dim, generator=gen, dtype=F64)
    w = (beta * reward(x)).sub((beta * reward(x)).max()).exp()
    w = w / w.sum()
    mode_w = torch.zeros(8, dtype=F64).index_add_(0, k, w)
    # seeded self-normalised importance sampling with 200000 draws: statistical, not rounding, tolerances below
    torch.testing.assert_close(mode_w, target.weights, atol=0.01, rtol=0)
    target_var = target.variances()
    for mode in torch.argsort(target.weights, descending=True)[:2]:  # the well-sampled modes
        wm = w * (k == mode)
        mean = (wm[:, None] * x).sum(0) / wm.sum()
        var = (wm[:, None] * (x - mean).pow(2)).sum(0) / wm.sum()
        torch.testing.assert_close(mean, target.means[mode], atol=0.02, rtol=0)
        torch.testing.assert_close(var, target_var, atol=0.01, rtol=0)
    assert reward.expectation(target) == pytest.approx(float((w * reward(x)).sum()), abs=0.02)


@pytest.mark.parametrize("dim", [8, 32])
@pytest.mark.parametrize("alpha_bar", [0.003, 0.1, 0.5, 0.97, 1.0])
def test_diagonal_gmm_score_matches_autograd_of_noised_log_density(dim, alpha_bar):
    target = gmm.parse_reward("bump", gmm.parse_prior("grid25", dim)).tilt(gmm.parse_prior("grid25", dim), 1.5)
    x = torch.randn(64, dim, dtype=F64, generator=torch.Generator().manual_seed(1)) * 3
    a = torch.full((64,), alpha_bar, dtype=F64)
    xg = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(target.log_prob(xg, a).sum(), xg)
    torch.testing.assert_close(target.score(x, a), auto)


def test_diagonal_gmm_equals_the_isotropic_one_when_its_stds_agree():
    iso = gmm.parse_prior("ring8", 3)
    diag = gmm.GMM(iso.means, iso.weights, torch.full((3,), iso.std, dtype=F64))
    x = torch.randn(100, 3, dtype=F64) * 3
    a = torch.rand(100, dtype=F64)
    torch.testing.assert_close(diag.log_prob(x, a), iso.log_prob(x, a))
    torch.testing.assert_close(diag.score(x, a), iso.score(x, a))


@pytest.mark.parametrize("name", ["bump", "bump-all", "narrow-bump", "linear", "linear-all"])
def test_exact_flow_at_data_end_is_beta_grad_reward_in_d_dimensions(name):
    """Terminal condition ∇ log F̃(x_0) = β ∇r(x_0) for the exact flow at ᾱ = 1, D = 8."""
    dim, beta = 8, 1.7
    prior, reward = gmm.parse_prior("grid25", dim), rewards_for(dim)[name]
    target = reward.tilt(prior, beta)
    x = (torch.randn(200, dim, dtype=F64) * 3).requires_grad_(True)
    (grad_r,) = torch.autograd.grad(reward(x).sum(), x)
    flow = gmm.exact_flow_score(prior, target, x.detach(), torch.ones(1, dtype=F64))
    torch.testing.assert_close(flow, beta * grad_r)


# ----------------------------------------------------------------------------------------------
# D = 2 is the original toy, operation for operation
# ----------------------------------------------------------------------------------------------


def original_2d_tilts(prior, center, std_r, w, beta):
    """The 2-D toy's closed forms as they were written before --dim (isotropic, shared std)."""
    s = prior.std
    prec = 1 / s**2 + beta / std_r**2
    g_means = (prior.means / s**2 + beta * center / std_r**2) / prec
    v = s**2 + std_r**2 / beta
    g_logw = prior.weights.log() - 0.5 * (prior.means - center).pow(2).sum(-1) / v
    l_logw = prior.weights.log() + beta * prior.means @ w + 0.5 * beta**2 * s**2 * w.pow(2).sum()
    return (g_means, g_logw.softmax(0), prec**-0.5), (prior.means + beta * s**2 * w, l_logw.softmax(0), s)


def original_2d_log_prob_and_score(mixture, x, alpha_bar):
    a = alpha_bar
    means, var = a.sqrt()[:, None, None] * mixture.means, a * mixture.std**2 + (1 - a)
    diff = x[:, None, :] - means
    log_comp = mixture.weights.log() - 0.5 * diff.pow(2).sum(-1) / var[:, None] - torch.log(2 * math.pi * var)[:, None]
    resp = log_comp.softmax(-1)
    return log_comp.logsumexp(-1), -(resp[..., None] * diff).sum(1) / var[:, None]


@pytest.mark.parametrize("prior_name", ["ring8", "grid25"])
def test_dim2_reproduces_the_original_2d_classes_exactly(prior_name):
    prior = gmm.parse_prior(prior_name, 2)
    assert prior.means.shape == (len(prior.weights), 2) and isinstance(prior.std, float)
    center, std_r, w, beta = torch.tensor([3.0, 0.0], dtype=F64), 2.0, torch.tensor([0.5, 0.25], dtype=F64), 1.3
    gauss, lin = original_2d_tilts(prior, center, std_r, w, beta)
    for reward, (means, weights, std) in ((gmm.parse_reward("bump", prior), gauss), (gmm.GaussianReward([3.0, 0.0], 2.0), gauss),
                                          (gmm.parse_reward("bump-all", prior), gauss), (gmm.parse_reward("linear", prior), lin)):
        target = reward.tilt(prior, beta)
        assert torch.equal(target.means, means) and torch.equal(target.weights, weights) and target.std == std
        x = torch.randn(300, 2, dtype=F64) * 3
        a = torch.rand(300, dtype=F64).clamp(min=1e-3)
        log_prob, score = original_2d_log_prob_and_score(target, x, a)
        assert torch.equal(target.log_prob(x, a), log_prob) and torch.equal(target.score(x, a), score)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    k = torch.multinomial(prior.weights, 50, replacement=True, generator=gen_b)
    assert torch.equal(prior.sample(50, gen_a), prior.means[k] + prior.std * torch.randn(50, 2, generator=gen_b, dtype=F64))


# ----------------------------------------------------------------------------------------------
# Sample metrics
# ----------------------------------------------------------------------------------------------


def test_mode_weights_and_tv():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=F64)
    samples = torch.tensor([[0.1, 0.0], [9.0, 1.0], [10.5, 0.0], [11.0, 0.0]], dtype=F64)
    torch.testing.assert_close(gmm.mode_weights(samples, means), torch.tensor([0.25, 0.75], dtype=F64))
    weighted = gmm.mode_weights(samples, means, torch.tensor([3.0, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(weighted, torch.tensor([0.5, 0.5], dtype=F64))


def test_sliced_wasserstein_separates_shifted_sets():
    a = torch.randn(5000, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    b = torch.randn(5000, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    same, shifted = gmm.sliced_wasserstein(a, b), gmm.sliced_wasserstein(a, b + torch.tensor([1.0, 0.0], dtype=F64))
    assert same < 0.05 and shifted > 0.5  # E|⟨θ, shift⟩| = 2/π for a unit shift


def test_mode_tv_counts_nonfinite_samples_fully_against_the_target():
    means, target = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=F64), torch.tensor([0.5, 0.5], dtype=F64)
    samples = torch.tensor([[0.1, 0.0], [9.0, 1.0], [10.5, 0.0], [float("nan"), 0.0]], dtype=F64)
    tv, nonfinite = gmm.mode_tv(samples, means, target)  # mode weights (1/4, 2/4), 1/4 in no mode
    assert nonfinite == 0.25 and tv == pytest.approx(0.5 * (0.25 + 0.0 + 0.25))
    assert gmm.mode_tv(torch.full((3, 2), float("inf"), dtype=F64), means, target) == (1.0, 1.0)
    assert gmm.mode_tv(torch.tensor([[0.0, 1.0], [10.0, 0.0]], dtype=F64), means, target) == (0.0, 0.0)
