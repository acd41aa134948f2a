"""Oracle tests of nabla_gfn.py: every identity stated in its docstrings, checked against an
independent computation (diffusers' own DDIM step, torch.distributions, torch.autograd), never
against a copy of the code under test.

Oracles used throughout:
  * the Gaussian step P_F(x'|x) = N(x'; μ(x), σ²) is built from `DDIMScheduler.step(..., eta=1)`
    with zero noise (its mean) and its `pred_original_sample` (x̂_0); σ is the schedule's, itself
    checked against the scheduler in the first test;
  * log-densities come from torch.distributions.Normal and scores from torch.autograd.

All networks are tiny float64 MLPs (2-D states, one set of tests on image-shaped (N, 4, 8, 8)
states), every random draw is seeded; the file runs in a few seconds on a CPU.
"""

import copy
import math
import weakref

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from torch import nn
from torch.distributions import Normal

import nabla_gfn
from nabla_gfn import (
    LossConfig,
    StepSchedule,
    Transitions,
    adjoint_rows,
    antithetic_target,
    affine,
    clip_grad_norms,
    ddim_schedule,
    forward_looking_score,
    forward_residual,
    gamma_weight,
    gather_transitions,
    gaussian_log_prob,
    lean_adjoint,
    nabla_db_loss,
    sample_trajectory,
    step_mean,
    subsample_steps,
    transition_weights,
    x0_prediction,
    zero_output_layer,
)

# SD v1.5's scheduler settings (its config has no timestep_spacing, i.e. diffusers' "leading").
SD_SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
NUM_STEPS = 7  # deliberately not a divisor of 1000
IMAGE_SHAPE = (4, 8, 8)
F64 = torch.float64
# diffusers' `step` works with float32 scalars (at the last step its σ² = (1−ᾱ')/(1−ᾱ)(1 − ᾱ/ᾱ')
# loses ~1e-4 relative to cancellation); the module derives the same constants in float64. Oracles
# that go through diffusers' step therefore agree to ~1e-5 relative, far below any real error.
RTOL_DIFFUSERS = 1e-4


# ----------------------------------------------------------------------------------------------
# Fixtures and small helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Everything here is tiny: intra-op threads only add contention on a shared CPU (10-100× slower).
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def scheduler():
    return DDIMScheduler(**SD_SCHEDULER_CONFIG)


@pytest.fixture
def schedule(scheduler):
    # Also leaves `scheduler` set to NUM_STEPS, so its `step` can serve as an oracle.
    return ddim_schedule(scheduler, NUM_STEPS)


class TinyNet(nn.Module):
    """ε̂(x, t, traj) or g_φ(x, t, traj): an MLP on the flattened state, a time feature and, with
    num_traj > 0, a per-trajectory embedding (a stand-in for a prompt). Output shaped like x."""

    def __init__(self, shape=(2,), hidden=16, num_traj=0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        cond_dim = 3 if num_traj else 0
        self.cond = nn.Embedding(num_traj, cond_dim) if num_traj else None
        dim = math.prod(shape)
        self.net = nn.Sequential(nn.Linear(dim + 2 + cond_dim, hidden), nn.Tanh(), nn.Linear(hidden, dim))
        self.double()

    def forward(self, x, t, traj):
        tau = t.to(x.dtype)[:, None] / 1000
        features = [x.flatten(1), torch.sin(3 * tau), torch.cos(3 * tau)]
        if self.cond is not None:
            features.append(self.cond(traj))
        return self.net(torch.cat(features, 1)).view_as(x)


# The rewards below compute in the states' dtype (float64) and return r in float32, as the SD
# reward model does. ∇r stays exact float64 (the cast's backward is the identity). A reward that
# returns float64 is covered by test_loss_accepts_any_reward_dtype.


class LinearReward(nn.Module):
    """r(x0) = tanh(w·x0 + b): a reward with its own parameters."""

    def __init__(self, shape=(2,)):
        super().__init__()
        self.linear = nn.Linear(math.prod(shape), 1).double()

    def forward(self, x0, traj):
        return torch.tanh(self.linear(x0.flatten(1))).squeeze(1).float()


class CentreReward:
    """r(x0, traj) = −‖x0 − c[traj]‖²: each trajectory has its own target (its "prompt")."""

    def __init__(self, centres):
        self.centres = centres

    def __call__(self, x0, traj):
        return -(x0 - self.centres[traj]).pow(2).flatten(1).sum(1).float()


def smooth_reward_f64(x0, traj):
    return torch.sin(2 * x0).flatten(1).sum(1) - 0.5 * x0.pow(2).flatten(1).sum(1)


def smooth_reward(x0, traj):
    return smooth_reward_f64(x0, traj).float()


def constant_reward(x0, traj):
    return 0 * x0.flatten(1).sum(1).float()  # constant, but still a function of x0 for autograd


def rows(v, like):
    """(N,) → (N, 1, …) to broadcast against `like` (N, *S)."""
    return v.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def mean_sq(v):
    return v.pow(2).flatten(1).mean(1)


def grad_of(fn, x):
    """∇_x Σ_n fn(x)_n by autograd at a detached copy of x; rows are independent, so row n of the
    result is ∇ of fn's row n."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad


def diffusers_step(scheduler, eps_fn, x, t, traj):
    """One DDIM(η=1) step taken by diffusers itself, row by row: (mean μ(x), x̂_0(x)), with graph."""
    means, x0s = [], []
    for i in range(len(x)):
        xi = x[i : i + 1]
        eps = eps_fn(xi, t[i : i + 1], traj[i : i + 1])
        out = scheduler.step(eps, int(t[i]), xi, eta=1.0, variance_noise=torch.zeros_like(xi))
        means.append(out.prev_sample)
        x0s.append(out.pred_original_sample)
    return torch.cat(means), torch.cat(x0s)


def step_log_prob(x_next, mean, sigma):
    """log N(x'; μ, σ² I) by torch.distributions, summed over all but the batch dimension."""
    return Normal(mean, rows(sigma, mean)).log_prob(x_next).flatten(1).sum(1)


def oracle_reverse_residual(scheduler, policy, reference, batch):
    """∇_x[log P_F^θ(x'|x) − log P_F^♯(x'|x)] at fixed x', by autograd through diffusers' step."""

    def log_ratio(x):
        mean_policy, _ = diffusers_step(scheduler, policy, x, batch.t, batch.traj)
        mean_reference, _ = diffusers_step(scheduler, reference, x, batch.t, batch.traj)
        return step_log_prob(batch.x_next, mean_policy, batch.sigma) - step_log_prob(
            batch.x_next, mean_reference, batch.sigma
        )

    return grad_of(log_ratio, batch.x)


def oracle_guess(scheduler, policy, log_reward, x, t, traj, beta, gamma):
    """β γ_τ ∇_x r(x̂_0(x)), with x̂_0 from diffusers' step and γ from `alphas_cumprod[τ]`."""
    reward_score = grad_of(lambda x_: log_reward(diffusers_step(scheduler, policy, x_, t, traj)[1], traj), x)
    alpha_bar = scheduler.alphas_cumprod[t].to(F64)
    gamma_t = {"alpha_bar": alpha_bar, "sqrt_alpha_bar": alpha_bar.sqrt()}[gamma]
    return beta * rows(gamma_t, x) * reward_score


def sample_batch(policy, schedule, shape=(2,), batch_size=4, fraction=0.5, seed=0):
    """Sample trajectories with `policy`, subsample transitions, gather them: a realistic batch."""
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch_size, *shape, generator=generator, dtype=F64)
    trajectory = sample_trajectory(policy, schedule, x_T, generator=generator)
    steps = subsample_steps(schedule.num_steps, fraction, batch_size, generator=generator)
    return gather_transitions(trajectory, schedule, steps)


def grads(module):
    return [p.grad.clone() for p in module.parameters()]


# ----------------------------------------------------------------------------------------------
# Schedule and Gaussian-step helpers
# ----------------------------------------------------------------------------------------------


# (1000 steps is out: with steps_offset=1 diffusers itself indexes timestep 1000 and fails.)
@pytest.mark.parametrize("num_steps", [1, 7, 20, 50, 333])
def test_step_mean_and_sigma_reproduce_ddim_eta1_step(scheduler, num_steps):
    schedule = ddim_schedule(scheduler, num_steps)
    assert torch.equal(schedule.timesteps, scheduler.timesteps.long())
    assert torch.equal(schedule.next_timesteps[:-1], schedule.timesteps[1:])
    assert schedule.next_timesteps[-1] == 0
    generator = torch.Generator().manual_seed(num_steps)
    for i, t in enumerate(scheduler.timesteps):
        x, eps, z = torch.randn(3, 5, 2, generator=generator)
        expected = scheduler.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        coefs = [getattr(schedule, f)[i].expand(5) for f in ("alpha_bar", "alpha_bar_next", "sigma")]
        got = step_mean(x, eps, *coefs) + schedule.sigma[i] * z
        # float32 x, ε, z through diffusers' float32 scalars vs float64 coefficients: a few eps32 of |x| + |ε| ≈ 1e-6.
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"step {i} (t={int(t)})")


@pytest.mark.parametrize("num_steps", [1, 7, 50, 333])
def test_schedule_describes_the_ddim_eta1_step_as_affine_in_state_and_output(scheduler, num_steps):
    """μ = a x + b ε̂ and x̂_0 = c x + d ε̂ with the schedule's per-step coefficients reproduce diffusers'
    own step (prev_sample, pred_original_sample); x̂_0 at x' uses the next step's coefficients (after
    the last step: ᾱ' = final_alpha_cumprod); a schedule or batch built without coefficients gets
    the same DDIM ones, and gathered rows carry their step's."""
    schedule = ddim_schedule(scheduler, num_steps)
    for field in ("mean_coef", "x0_coef", "x0_coef_next"):
        assert getattr(schedule, field).shape == (num_steps, 2) and getattr(schedule, field).dtype == F64
    generator = torch.Generator().manual_seed(num_steps)
    for i, t in enumerate(scheduler.timesteps):
        x, eps = torch.randn(2, 5, *IMAGE_SHAPE, generator=generator, dtype=F64)
        out = scheduler.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x))
        mean_coef, x0_coef = schedule.mean_coef[i].expand(5, 2), schedule.x0_coef[i].expand(5, 2)
        torch.testing.assert_close(affine(mean_coef, x, eps), out.prev_sample, rtol=RTOL_DIFFUSERS, atol=1e-6)
        torch.testing.assert_close(affine(x0_coef, x, eps), out.pred_original_sample, rtol=RTOL_DIFFUSERS, atol=1e-6)
    torch.testing.assert_close(schedule.x0_coef_next[:-1], schedule.x0_coef[1:], rtol=1e-12, atol=0)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=F64)
    expected_last = torch.stack([1 / final.sqrt(), -(1 - final).sqrt() / final.sqrt()])
    torch.testing.assert_close(schedule.x0_coef_next[-1], expected_last.to(F64), rtol=1e-6, atol=0)
    plain = StepSchedule(schedule.timesteps, schedule.next_timesteps, schedule.alpha_bar, schedule.alpha_bar_next,
                         schedule.sigma)
    sliced = StepSchedule(*(getattr(schedule, f)[: max(1, num_steps // 2)] for f in schedule.__dataclass_fields__))
    for field in ("mean_coef", "x0_coef", "x0_coef_next"):
        assert torch.equal(getattr(plain, field), getattr(schedule, field))
        assert torch.equal(getattr(sliced, field), getattr(schedule, field)[: max(1, num_steps // 2)])
    trajectory = sample_trajectory(TinyNet(IMAGE_SHAPE, seed=1), schedule, torch.randn(3, *IMAGE_SHAPE, dtype=F64))
    batch = gather_transitions(trajectory, schedule, subsample_steps(num_steps, 0.5, 3, generator=generator))
    for field in ("mean_coef", "x0_coef", "x0_coef_next"):
        assert torch.equal(getattr(batch, field), getattr(schedule, field)[batch.step])
    rebuilt = Transitions(*(getattr(batch, f) for f in list(Transitions.__dataclass_fields__)[:-3]))
    assert all(torch.equal(getattr(rebuilt, f), getattr(batch, f)) for f in ("mean_coef", "x0_coef", "x0_coef_next"))


@pytest.mark.parametrize(
    "bad", [dict(prediction_type="v_prediction"), dict(clip_sample=True), dict(thresholding=True)]
)
def test_ddim_schedule_rejects_non_gaussian_or_non_epsilon_configs(bad):
    with pytest.raises(ValueError):
        ddim_schedule(DDIMScheduler(**{**SD_SCHEDULER_CONFIG, **bad}), 10)


def test_x0_prediction_inverts_forward_noising(schedule):
    alpha_bar = schedule.alpha_bar.to(F64)
    x0, eps = torch.randn(2, NUM_STEPS, *IMAGE_SHAPE, dtype=F64)
    x_t = rows(alpha_bar.sqrt(), x0) * x0 + rows((1 - alpha_bar).sqrt(), x0) * eps
    torch.testing.assert_close(x0_prediction(x_t, eps, alpha_bar), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(2,), IMAGE_SHAPE])
def test_gaussian_log_prob_matches_torch_normal(shape):
    x_next, mean = torch.randn(2, 6, *shape, dtype=F64)
    sigma = torch.rand(6, dtype=F64) + 0.05
    torch.testing.assert_close(gaussian_log_prob(x_next, mean, sigma), step_log_prob(x_next, mean, sigma))


@pytest.mark.parametrize("shape", [(2,), IMAGE_SHAPE])
def test_forward_residual_is_autograd_score_difference(shape):
    mean_policy, mean_reference, x_next = torch.randn(3, 6, *shape, dtype=F64)
    sigma = torch.rand(6, dtype=F64) + 0.05
    expected = grad_of(
        lambda x_: step_log_prob(x_, mean_policy, sigma) - step_log_prob(x_, mean_reference, sigma), x_next
    )
    torch.testing.assert_close(forward_residual(mean_policy, mean_reference, sigma), expected)


# ----------------------------------------------------------------------------------------------
# Sampling trajectories and choosing transitions
# ----------------------------------------------------------------------------------------------


def test_sample_trajectory_reproduces_scheduler_loop(scheduler, schedule):
    policy, B = TinyNet(seed=1), 3
    calls = []

    def recording_policy(x, t, traj):
        calls.append((t.clone(), traj.clone()))
        return policy(x, t, traj)

    x_T = torch.randn(B, 2, dtype=F64)
    trajectory = sample_trajectory(recording_policy, schedule, x_T, generator=torch.Generator().manual_seed(5))
    assert trajectory.states.shape == (B, NUM_STEPS + 1, 2) and trajectory.eps.shape == (B, NUM_STEPS, 2)

    generator, x = torch.Generator().manual_seed(5), x_T
    assert torch.equal(trajectory.states[:, 0], x_T)
    for i, t in enumerate(scheduler.timesteps):
        assert torch.equal(calls[i][0], t.expand(B)) and torch.equal(calls[i][1], torch.arange(B))
        eps = policy(x, t.expand(B), torch.arange(B))
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(trajectory.eps[:, i], eps)
        # diffusers' float32 scalars (≈ eps32 relative each; see RTOL_DIFFUSERS) compounded over NUM_STEPS steps.
        torch.testing.assert_close(trajectory.states[:, i + 1], x, rtol=1e-5, atol=1e-5)
    assert len(calls) == NUM_STEPS
    assert torch.equal(trajectory.final, trajectory.states[:, -1])


@pytest.mark.parametrize("num_steps", [1, 2, 7, 50, 51, 1000])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.33, 1.0])
def test_subsample_steps_low_variance_chunks(num_steps, fraction):
    draws = 2000
    steps = subsample_steps(num_steps, fraction, draws, generator=torch.Generator().manual_seed(0))
    others = num_steps - 1
    n_chunks = 0 if others == 0 or fraction == 0 else min(others, max(1, round(fraction * others)))
    assert steps.shape == (draws, n_chunks + 1) and steps.dtype == torch.long
    assert (steps[:, -1] == num_steps - 1).all(), "terminal step missing"
    if fraction == 1.0:
        assert (steps == torch.arange(num_steps)).all(), "fraction 1 must take every step once"
    # Column j is chunk j: its support must be a contiguous run of steps, the runs must tile
    # 0 … T−2 in order with sizes differing by at most one, and each run must be hit uniformly.
    expected_lo, sizes = 0, []
    for j in range(n_chunks):
        support, counts = steps[:, j].unique(return_counts=True)
        lo, hi = int(support[0]), int(support[-1])
        assert lo == expected_lo, f"chunk {j} starts at {lo}, expected {expected_lo}"
        assert torch.equal(support, torch.arange(lo, hi + 1)), f"chunk {j} is not contiguous / fully covered"
        expected_count = draws / len(support)
        assert (counts - expected_count).abs().max() < 6 * math.sqrt(expected_count), f"chunk {j} not uniform"
        expected_lo, sizes = hi + 1, sizes + [len(support)]
    if n_chunks:
        assert expected_lo == others, "chunks do not reach step T−2"
        assert max(sizes) - min(sizes) <= 1, f"chunk sizes not nearly equal: {sizes}"


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_subsample_steps_rejects_fraction_out_of_range(fraction):
    with pytest.raises(ValueError):
        subsample_steps(10, fraction, 2)


def test_gather_transitions_rows_match_trajectory(scheduler, schedule):
    policy, B = TinyNet(seed=1), 3
    trajectory = sample_trajectory(policy, schedule, torch.randn(B, 2, dtype=F64))
    steps = subsample_steps(NUM_STEPS, 0.5, B, generator=torch.Generator().manual_seed(1))
    batch = gather_transitions(trajectory, schedule, steps)
    assert len(batch) == steps.numel()
    timesteps = scheduler.timesteps.tolist() + [0]  # the clean sample after the last step: label 0
    for n in range(len(batch)):
        b, i = n // steps.shape[1], int(steps.reshape(-1)[n])
        assert torch.equal(batch.x[n], trajectory.states[b, i])
        assert torch.equal(batch.x_next[n], trajectory.states[b, i + 1])
        assert torch.equal(batch.eps_old[n], trajectory.eps[b, i])
        assert int(batch.traj[n]) == b and int(batch.step[n]) == i
        assert bool(batch.is_terminal[n]) == (i == NUM_STEPS - 1)
        assert int(batch.t[n]) == timesteps[i] and int(batch.t_next[n]) == timesteps[i + 1]
        assert batch.alpha_bar[n] == scheduler.alphas_cumprod[timesteps[i]]
        expected_next = scheduler.alphas_cumprod[timesteps[i + 1]] if i < NUM_STEPS - 1 else scheduler.final_alpha_cumprod
        torch.testing.assert_close(batch.alpha_bar_next[n], expected_next)
        assert batch.sigma[n] == schedule.sigma[i]


# ----------------------------------------------------------------------------------------------
# The forward-looking flow
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", ["alpha_bar", "sqrt_alpha_bar"])
@pytest.mark.parametrize("shape", [(2,), IMAGE_SHAPE])
def test_forward_looking_score_is_autograd_of_reward_at_x0_hat(scheduler, schedule, gamma, shape):
    policy = TinyNet(shape, seed=1)
    idx = torch.arange(NUM_STEPS)
    x = torch.randn(NUM_STEPS, *shape, dtype=F64, requires_grad=True)
    t, alpha_bar, traj = schedule.timesteps[idx], schedule.alpha_bar[idx], torch.zeros(NUM_STEPS, dtype=torch.long)
    score, r_hat = forward_looking_score(policy, smooth_reward, x, t, alpha_bar, traj, beta=1.5, gamma=gamma)
    expected = oracle_guess(scheduler, policy, smooth_reward, x, t, traj, 1.5, gamma)
    torch.testing.assert_close(score, expected, rtol=RTOL_DIFFUSERS, atol=1e-8)
    with torch.no_grad():
        expected_r = smooth_reward(diffusers_step(scheduler, policy, x, t, traj)[1], traj)
    # float32 rewards of x̂_0 from float64 vs diffusers' float32-scalar coefficients: a few eps32 of r's terms.
    torch.testing.assert_close(r_hat.double(), expected_r.double(), rtol=1e-5, atol=1e-6)
    assert not score.requires_grad and not r_hat.requires_grad
    assert all(p.grad is None for p in policy.parameters()), "the guess must not leave parameter gradients"


def test_unknown_gamma_or_weighting_names_are_rejected():
    with pytest.raises(ValueError, match=r"alpha_bar.*sqrt_alpha_bar"):
        gamma_weight(torch.ones(2), "bogus")
    with pytest.raises(ValueError, match=r"alpha_bar.*sqrt_alpha_bar"):
        LossConfig(gamma="bogus")
    with pytest.raises(ValueError, match=r"plain.*kl"):
        LossConfig(weighting="bogus")
    with pytest.raises(ValueError, match="reference"):
        LossConfig(guess_from="bogus")
    with pytest.raises(ValueError, match=r"plain.*kl"):
        transition_weights(torch.ones(2), "bogus")


def test_zero_output_layer_mlp():
    torch.manual_seed(3)
    mlp = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(5, 2)
    assert mlp(x).abs().sum() > 0
    first_layer = mlp[0].weight.detach().clone()
    assert zero_output_layer(mlp) is mlp
    out = mlp(x)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(mlp[0].weight, first_layer), "only the output layer may change"
    (out * torch.randn_like(out)).sum().backward()
    assert mlp[2].weight.grad.abs().sum() > 0 and mlp[2].bias.grad.abs().sum() > 0


def test_zero_output_layer_unet():
    torch.manual_seed(3)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    x, t = torch.randn(2, *IMAGE_SHAPE), torch.tensor([10, 500])
    assert unet(x, t).sample.abs().sum() > 0
    conv_in = unet.conv_in.weight.detach().clone()
    zero_output_layer(unet)
    out = unet(x, t).sample
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(unet.conv_in.weight, conv_in), "only conv_out may change"
    (out * torch.randn_like(out)).sum().backward()
    assert unet.conv_out.weight.grad.abs().sum() > 0


def test_zero_output_layer_rejects_parameterless_module():
    with pytest.raises(ValueError):
        zero_output_layer(nn.Tanh())


# ----------------------------------------------------------------------------------------------
# The residual ∇-DB loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_flow", [True, False])
@pytest.mark.parametrize("weighting", ["plain", "kl"])
def test_loss_is_exactly_zero_at_the_reference_with_constant_reward(schedule, use_flow, weighting):
    policy = TinyNet(seed=1)
    reference = copy.deepcopy(policy)
    flow = zero_output_layer(TinyNet(seed=2))
    batch = sample_batch(policy, schedule)
    cfg = LossConfig(beta=3.0, trust_region=5.0, weighting=weighting, use_flow=use_flow)
    loss, parts = nabla_db_loss(batch, policy, reference, constant_reward, flow, cfg)
    assert loss.item() == 0.0, parts
    for name in ("forward", "reverse", "terminal", "trust_region"):
        assert parts[name].item() == 0.0, (name, parts)
    # The same set-up with a perturbed policy is not at the optimum: the check above can fail.
    with torch.no_grad():
        policy.net[2].bias.add_(0.01)
    loss, parts = nabla_db_loss(batch, policy, reference, constant_reward, flow, cfg)
    assert parts["forward"] > 0 and parts["trust_region"] > 0 and (parts["reverse"] > 0) == use_flow


@pytest.mark.parametrize("weighting", ["plain", "kl", "kl-shift"])
@pytest.mark.parametrize("shape", [(2,), IMAGE_SHAPE])
def test_reverse_term_is_autograd_reverse_residual(scheduler, schedule, weighting, shape):
    # Constant reward (guess 0) and g_φ ≡ 0: L_B is the squared reverse residual alone.
    policy, reference = TinyNet(shape, seed=1), TinyNet(shape, seed=2)
    flow = zero_output_layer(TinyNet(shape, seed=3))
    batch = sample_batch(policy, schedule, shape)
    cfg = LossConfig(trust_region=0.0, weighting=weighting, use_flow=True)
    _, parts = nabla_db_loss(batch, policy, reference, constant_reward, flow, cfg)
    weight = oracle_weights(batch.sigma, weighting)[1]  # L_B trains g_φ: w_φ
    expected = (weight * mean_sq(oracle_reverse_residual(scheduler, policy, reference, batch))).mean()
    assert expected > 0
    torch.testing.assert_close(parts["reverse"], expected, rtol=RTOL_DIFFUSERS, atol=0)


@pytest.mark.parametrize("weighting", ["plain", "kl"])
@pytest.mark.parametrize("flow_is_zero", [True, False])
def test_terminal_rows_use_exact_reward_gradient(schedule, weighting, flow_is_zero):
    policy, B, beta = TinyNet(seed=1), 4, 2.0
    reference, flow = copy.deepcopy(policy), TinyNet(seed=3)
    if flow_is_zero:
        zero_output_layer(flow)
    trajectory = sample_trajectory(policy, schedule, torch.randn(B, 2, dtype=F64))
    batch = gather_transitions(trajectory, schedule, torch.full((B, 1), NUM_STEPS - 1))
    cfg = LossConfig(beta=beta, weighting=weighting)
    _, parts = nabla_db_loss(batch, policy, reference, smooth_reward, flow, cfg)
    x0 = trajectory.final
    weight = batch.sigma.to(F64) ** 2 if weighting == "kl" else 1.0
    # Target exact β∇r(x_0) (no x̂_0, γ = 1); g_φ is not in L_F at x_0, only in L_T.
    expected_forward = (weight * mean_sq(beta * grad_of(lambda x_: smooth_reward(x_, None), x0))).mean()
    expected_terminal = mean_sq(flow(x0, torch.zeros(B, dtype=torch.long), torch.arange(B))).mean()
    torch.testing.assert_close(parts["forward"], expected_forward)
    torch.testing.assert_close(parts["terminal"], expected_terminal.detach())
    r = smooth_reward(x0, None)  # float32, as reward models give; the loss averages it in float32, the oracle in float64:
    # rounding ≤ B·eps32·mean|r| (a sum's error bound; relative to mean|r| since the mean may cancel).
    torch.testing.assert_close(parts["reward_next"].double(), r.double().mean(), rtol=0,
                               atol=B * torch.finfo(torch.float32).eps * float(r.abs().mean()))


def test_gradients_reach_only_what_each_term_trains(schedule):
    policy, reference, flow = TinyNet(seed=1), TinyNet(seed=2), TinyNet(seed=3)
    reward = LinearReward()
    for p in reference.parameters():
        p.requires_grad_(True)  # deliberately trainable-looking: the loss must still not touch it
    batch = sample_batch(policy, schedule)

    def backward(reverse_weight, use_flow=True, flow_=flow):
        for module in (policy, reference, flow, reward):
            module.zero_grad(set_to_none=True)
        cfg = LossConfig(beta=2.0, trust_region=0.5, reverse_weight=reverse_weight, use_flow=use_flow)
        loss, parts = nabla_db_loss(batch, policy, reference, reward, flow_, cfg)
        loss.backward()
        return parts

    parts = backward(1.0)
    assert parts["reverse"] > 0
    policy_grads, flow_grads = grads(policy), grads(flow)
    assert all(p.grad is None for p in reference.parameters()), "reference received a gradient"
    assert all(p.grad is None for p in reward.parameters()), "reward model received a gradient"

    backward(0.0)  # L_B off: the policy's gradient must not change, g_φ's must
    for got, expected in zip(grads(policy), policy_grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    assert any(not torch.allclose(got, expected) for got, expected in zip(grads(flow), flow_grads))

    # "No flow": g_φ is ignored entirely, same as passing no flow at all.
    no_flow_parts = backward(1.0, use_flow=False)
    assert all(p.grad is None for p in flow.parameters())
    no_flow_policy_grads = grads(policy)
    assert backward(1.0, use_flow=True, flow_=None)["loss"] == no_flow_parts["loss"]
    for got, expected in zip(grads(policy), no_flow_policy_grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def oracle_weights(sigma, weighting):
    """(w_θ, w_φ) per transition, as the docstring of transition_weights states them."""
    s2 = sigma.to(F64) ** 2
    one = torch.ones_like(s2)
    return {"plain": (one, one), "kl": (s2, s2), "kl-shift": (s2, s2**2)}[weighting]


def oracle_loss(scheduler, batch, policy, reference, log_reward, flow, cfg, joint=False, adjoint=None):
    """nabla_db_loss's docstring formula, built independently: means and x̂_0 from diffusers' step,
    scores by autograd of torch.distributions log-densities, targets detached by construction.
    Returns (loss, parts) with a graph to the policy's and g_φ's parameters. joint=True writes L_F
    as the paper's single term w_θ ‖(μ_θ − μ♯)/σ² − target − g_φ‖² (no stop-gradients inside).
    adjoint (B, T+1, *S): the flow targets of cfg.flow_target, rows found from each row's timestep."""
    weight_policy, weight_flow = oracle_weights(batch.sigma, cfg.weighting)
    term = rows(batch.is_terminal, batch.x).bool()
    x, x_next = batch.x.detach().requires_grad_(True), batch.x_next.detach().requires_grad_(True)
    mean_policy, _ = diffusers_step(scheduler, policy, x, batch.t, batch.traj)
    mean_reference, _ = diffusers_step(scheduler, reference, x, batch.t, batch.traj)
    log_ratio = step_log_prob(x_next, mean_policy, batch.sigma) - step_log_prob(x_next, mean_reference, batch.sigma)
    (reverse_residual,) = torch.autograd.grad(log_ratio.sum(), x, retain_graph=True)
    (forward_res,) = torch.autograd.grad(log_ratio.sum(), x_next, create_graph=True)  # keeps θ's graph

    reward_score_x0 = grad_of(lambda x_: log_reward(x_, batch.traj), batch.x_next)
    guess_model = policy if cfg.guess_from == "policy" else reference
    guess_next = oracle_guess(scheduler, guess_model, log_reward, batch.x_next, batch.t_next, batch.traj, cfg.beta, cfg.gamma)
    target_next = torch.where(term, cfg.beta * reward_score_x0, guess_next)
    matching = not cfg.use_flow and cfg.flow_target == "adjoint"  # adjoint matching: θ's target is a_{i+1}
    if cfg.flow_target != "bootstrap":
        a_next, a_here = (oracle_adjoint_rows(scheduler, adjoint, batch, k) for k in (1, 0))
        target_next = a_next if matching else target_next

    zero = torch.zeros((), dtype=F64)
    loss_reverse, loss_terminal, loss_forward_flow, flow_next = zero, zero, zero, torch.zeros_like(batch.x_next)
    if cfg.use_flow:
        flow_next = flow(batch.x_next, batch.t_next, batch.traj)
        loss_terminal = mean_sq(flow_next[batch.is_terminal]).mean()
        guess_here = oracle_guess(scheduler, guess_model, log_reward, batch.x, batch.t, batch.traj, cfg.beta, cfg.gamma)
        flow_here = flow(batch.x, batch.t, batch.traj)
        if cfg.flow_target == "bootstrap":
            loss_reverse = (weight_flow * mean_sq(reverse_residual + guess_here + flow_here)).mean()
        elif cfg.flow_target == "mixed":  # guess + g_φ at x fitted to (1−λ)·(−reverse residual) + λ·a_i
            lam = cfg.adjoint_lambda
            flow_target_here = -(1 - lam) * reverse_residual + lam * a_here
            loss_reverse = (weight_flow * mean_sq(guess_here + flow_here - flow_target_here)).mean()
    flow_next = torch.where(term, torch.zeros_like(flow_next), flow_next)
    if joint:
        loss_forward = (weight_policy * mean_sq(forward_res - target_next - flow_next)).mean()
    else:
        if cfg.use_flow:  # g_φ's view of the forward residual (policy side detached), or its fit to a_{i+1}
            fit_next = a_next if cfg.flow_target == "adjoint" else forward_res.detach()
            loss_forward_flow = (weight_flow * mean_sq(fit_next - target_next - flow_next)).mean()
        loss_forward = (weight_policy * mean_sq(forward_res - target_next - flow_next.detach())).mean()
    loss_trust = cfg.trust_region * mean_sq(policy(batch.x, batch.t, batch.traj) - batch.eps_old).mean()
    loss = loss_forward + loss_forward_flow + cfg.reverse_weight * loss_reverse + loss_terminal + loss_trust
    with torch.no_grad():
        _, x0_hat_next = diffusers_step(scheduler, guess_model, batch.x_next, batch.t_next, batch.traj)
        reward_next = torch.where(
            batch.is_terminal, log_reward(batch.x_next, batch.traj), log_reward(x0_hat_next, batch.traj)
        )
    parts = dict(
        forward=loss_forward,
        forward_flow=loss_forward_flow,
        reverse=loss_reverse,
        terminal=loss_terminal,
        trust_region=loss_trust,
    )
    if not matching:
        parts["reward_next"] = reward_next.mean()
    return loss, parts


class Recorder:
    """Wraps a callable f(x, …, traj), recording (x, traj) of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x, *rest):
        self.calls.append((x.detach().clone(), rest[-1].clone()))
        return self.fn(x, *rest)


def assert_routed_by_traj(recorder: Recorder, batch: Transitions, require_match: bool):
    """Every recorded row that is one of the batch's states must carry that state's traj."""
    states = torch.cat([batch.x, batch.x_next]).flatten(1)
    owners = torch.cat([batch.traj, batch.traj])
    assert recorder.calls, "callable never called"
    for x, traj in recorder.calls:
        assert traj.shape == (len(x),)
        for row, row_traj in zip(x.flatten(1), traj):
            match = (states == row).all(1)
            if require_match:
                assert match.any(), "called on a state that is not in the batch"
            if match.any():
                assert (owners[match] == row_traj).all(), "row evaluated with another trajectory's conditioning"


@pytest.mark.parametrize(
    "use_flow, weighting, gamma, guess_from",
    [(True, "plain", "alpha_bar", "policy"), (True, "kl", "sqrt_alpha_bar", "policy"),
     (True, "kl-shift", "sqrt_alpha_bar", "policy"), (True, "plain", "alpha_bar", "reference"),
     (False, "plain", "alpha_bar", "policy"), (False, "kl", "alpha_bar", "reference")],
)
def test_loss_matches_independent_oracle_and_routes_conditioning_by_traj(
    scheduler, schedule, use_flow, weighting, gamma, guess_from
):
    B = 4
    old_policy = TinyNet(num_traj=B, seed=0)
    policy, reference, flow = (TinyNet(num_traj=B, seed=s) for s in (1, 2, 3))
    reward = CentreReward(torch.randn(B, 2, dtype=F64))
    batch = sample_batch(old_policy, schedule, batch_size=B)  # ε̂_old from an older policy
    batch = batch.select(torch.randperm(len(batch)))  # interleave trajectories and terminal rows
    assert batch.is_terminal.any() and (~batch.is_terminal).any()
    cfg = LossConfig(beta=1.5, trust_region=0.5, reverse_weight=0.7, gamma=gamma, weighting=weighting, use_flow=use_flow,
                     guess_from=guess_from)

    rec_policy, rec_reference, rec_flow, rec_reward = Recorder(policy), Recorder(reference), Recorder(flow), Recorder(reward)
    loss, parts = nabla_db_loss(batch, rec_policy, rec_reference, rec_reward, rec_flow, cfg)
    for rec in (rec_policy, rec_reference) + ((rec_flow,) if use_flow else ()):
        assert_routed_by_traj(rec, batch, require_match=True)
    assert_routed_by_traj(rec_reward, batch, require_match=False)  # x̂_0 rows: checked by value below
    assert use_flow or not rec_flow.calls, "the no-flow variant must not call g_φ"

    expected_loss, expected_parts = oracle_loss(scheduler, batch, policy, reference, reward, flow, cfg)
    for name, expected in expected_parts.items():
        got = parts[name].double()
        torch.testing.assert_close(got, expected.detach().double(), rtol=RTOL_DIFFUSERS, atol=1e-12, msg=name)
    torch.testing.assert_close(loss, expected_loss, rtol=RTOL_DIFFUSERS, atol=1e-12)

    params = list(policy.parameters()) + (list(flow.parameters()) if use_flow else [])
    got = torch.autograd.grad(loss, params)
    expected = torch.autograd.grad(expected_loss, params)
    for g, e in zip(got, expected):
        # atol: diffusers' float32 σ² (RTOL_DIFFUSERS) on gradient entries of size ~1e-4 gives ~1e-8
        # absolute differences; a wrong gradient path is off by orders of magnitude more.
        torch.testing.assert_close(g, e, rtol=RTOL_DIFFUSERS, atol=1e-7)


@pytest.mark.parametrize("weighting, same", [("plain", True), ("kl", True), ("kl-shift", False)])
def test_split_forward_term_has_the_papers_joint_gradients_when_weights_are_equal(scheduler, schedule, weighting, same):
    """nabla_db_loss writes L_F as two stop-gradient lines (θ's and g_φ's); with w_θ = w_φ their
    gradients equal those of the paper's single joint term, for θ and for g_φ alike."""
    policy, reference, flow = TinyNet(seed=1), TinyNet(seed=2), TinyNet(seed=3)
    batch = sample_batch(TinyNet(seed=0), schedule, batch_size=4)
    cfg = LossConfig(beta=1.5, trust_region=0.5, reverse_weight=0.7, weighting=weighting)
    loss, _ = nabla_db_loss(batch, policy, reference, smooth_reward, flow, cfg)
    joint_loss, _ = oracle_loss(scheduler, batch, policy, reference, smooth_reward, flow, cfg, joint=True)
    params = list(policy.parameters()) + list(flow.parameters())
    got, expected = torch.autograd.grad(loss, params), torch.autograd.grad(joint_loss, params)
    close = all(torch.allclose(g, e, rtol=RTOL_DIFFUSERS, atol=1e-8) for g, e in zip(got, expected))
    assert close == same


@pytest.mark.parametrize("reward_dtype", [torch.float64, torch.bfloat16])
def test_loss_accepts_any_reward_dtype(scheduler, schedule, reward_dtype):
    """The reward's dtype is the caller's (a float64 toy, a bf16 reward model): the loss must run and
    log the mean reward (regression test: masked assignment into a float32 buffer used to fail)."""
    policy = TinyNet(seed=1)
    batch = sample_batch(policy, schedule)

    def reward(x0, traj):
        return smooth_reward_f64(x0, traj).to(reward_dtype)

    loss, parts = nabla_db_loss(batch, policy, copy.deepcopy(policy), reward, TinyNet(seed=3), LossConfig())
    assert torch.isfinite(loss)
    with torch.no_grad():
        _, x0_hat_next = diffusers_step(scheduler, policy, batch.x_next, batch.t_next, batch.traj)
        r = torch.where(batch.is_terminal, smooth_reward_f64(batch.x_next, None), smooth_reward_f64(x0_hat_next, None))
    torch.testing.assert_close(parts["reward_next"].double(), r.mean(), rtol=2e-2, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# The lean adjoint
# ----------------------------------------------------------------------------------------------


class GaussianPriorEps:
    """The exact ε-model of a single-Gaussian prior N(m, s² I), an eps_fn in float64:

        ε̂(x, τ) = −√(1−ᾱ) ∇ log p_τ(x) = √(1−ᾱ) (x − √ᾱ m) / (ᾱ s² + 1 − ᾱ).

    Its DDIM(η=1) step mean is the true reverse process's E[x'|x], affine in x, so the whole chain is
    linear-Gaussian."""

    def __init__(self, scheduler, mean, std):
        self.alphas_cumprod, self.mean, self.std = scheduler.alphas_cumprod.to(F64), mean, std

    def __call__(self, x, t, traj):
        a = rows(self.alphas_cumprod[t], x)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mean) / (a * self.std**2 + 1 - a)


def linear_gaussian_flow_scale(alpha_bar, alpha_bar_final, std):
    """k with ∇ log F̃(x_τ) = β k w exactly, for Gaussian data N(m, s² I) and r(x_f) = w·x_f.

    x_f (the chain's last state, noise level ᾱ_f) has variance v_f = ᾱ_f s² + 1 − ᾱ_f, and
    x_τ = √(ᾱ/ᾱ_f) x_f + noise, so E[x_f | x_τ] is affine with slope k = √(ᾱ/ᾱ_f) v_f / v_τ.
    The chain's step means are the true conditional expectations, so (tower property) the chain
    has the same slope, and log E[exp(β w·x_f) | x_τ] = β w·E[x_f | x_τ] + const."""
    v_final = alpha_bar_final * std**2 + 1 - alpha_bar_final
    return (alpha_bar / alpha_bar_final).sqrt() * v_final / (alpha_bar * std**2 + 1 - alpha_bar)


def linear_gaussian_adjoint_error(num_steps=7, shape=(2,), seed=0):
    """Max relative error of lean_adjoint against the exact linear-Gaussian flow score, all steps."""
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    schedule = ddim_schedule(scheduler, num_steps)
    generator = torch.Generator().manual_seed(seed)
    m, std, beta = torch.randn(*shape, generator=generator, dtype=F64), 0.7, 1.3
    w = torch.randn(*shape, generator=generator, dtype=F64)
    reference = GaussianPriorEps(scheduler, m, std)
    # Any paths will do (the Jacobians are constant): sample them with an unrelated network.
    x_T = torch.randn(3, *shape, generator=generator, dtype=F64)
    trajectory = sample_trajectory(TinyNet(shape, seed=seed + 1), schedule, x_T, generator=generator)
    adjoint, _ = lean_adjoint(reference, schedule, trajectory, lambda x0, traj: (x0 * w).flatten(1).sum(1), beta)
    assert adjoint.shape == (3, num_steps + 1, *shape)
    alpha_bar = torch.cat([schedule.alpha_bar, schedule.alpha_bar_next[-1:]]).to(F64)
    k = linear_gaussian_flow_scale(alpha_bar, alpha_bar[-1], std)  # (T+1,): step T is the final state
    expected = beta * k.reshape(1, -1, *([1] * len(shape))) * w
    return float(((adjoint - expected).abs() / expected.abs().clamp(min=1e-12)).max())


@pytest.mark.parametrize("num_steps", [1, 7, 50])
@pytest.mark.parametrize("shape", [(2,), IMAGE_SHAPE])
def test_lean_adjoint_is_the_exact_flow_score_of_a_linear_gaussian_model(num_steps, shape):
    """Gaussian prior with its exact ε-model, linear reward: a_i = ∇ log F̃(x_i) on every path, at
    every step (not only in expectation), against the closed form above. Tolerance: StepSchedule
    holds its constants in float32, so σ² and ᾱ are consistent to ~1e-7 only (measured 6e-8)."""
    assert linear_gaussian_adjoint_error(num_steps, shape) < 1e-6


_REAL_VJP = nabla_gfn._step_mean_vjp


def _x0_jacobian(eps_fn, schedule, i, x, traj, v):
    """A plausible mistake: the Jacobian of x̂_0 instead of the step mean's."""
    x = x.detach().requires_grad_(True)
    t, a = schedule.timesteps[i].expand(len(x)), schedule.alpha_bar[i].expand(len(x))
    (vjp,) = torch.autograd.grad(x0_prediction(x, eps_fn(x, t, traj), a), x, grad_outputs=v)
    return vjp


BROKEN_SWEEPS = {
    "step-1": lambda eps_fn, s, i, x, traj, v: _REAL_VJP(eps_fn, s, max(i - 1, 0), x, traj, v),
    "step+1": lambda eps_fn, s, i, x, traj, v: _REAL_VJP(eps_fn, s, min(i + 1, s.num_steps - 1), x, traj, v),
    "x0-jacobian": _x0_jacobian,
    "sign": lambda eps_fn, s, i, x, traj, v: -_REAL_VJP(eps_fn, s, i, x, traj, v),
    "identity-jacobian": lambda eps_fn, s, i, x, traj, v: v,
}


@pytest.mark.parametrize("broken", list(BROKEN_SWEEPS))
def test_lean_adjoint_oracle_catches_broken_sweeps(monkeypatch, broken):
    """The linear-Gaussian oracle is sharp: a wrong step index, a wrong Jacobian or a wrong sign in
    the sweep each make it fail by orders of magnitude more than its tolerance."""
    monkeypatch.setattr(nabla_gfn, "_step_mean_vjp", BROKEN_SWEEPS[broken])
    assert linear_gaussian_adjoint_error(7) > 1e-3


def test_lean_adjoint_terminal_and_steps_match_autograd_through_diffusers(scheduler, schedule):
    """a_T = β ∇r(x_0) exactly; a_i = J♯(x_i)ᵀ a_{i+1} with J♯ by autograd through diffusers' own
    step; r(x_0) returned; conditioning routed by the given traj ids (here offset: a slice of an
    epoch's trajectories)."""
    B, beta = 3, 1.7
    reference = TinyNet(num_traj=B + 2, seed=2)
    centres = torch.randn(B + 2, 2, dtype=F64)
    reward = CentreReward(centres)
    trajectory = sample_trajectory(TinyNet(seed=1), schedule, torch.randn(B, 2, dtype=F64))
    traj = torch.arange(B) + 2
    rec_reference, rec_reward = Recorder(reference), Recorder(reward)
    adjoint, r0 = lean_adjoint(rec_reference, schedule, trajectory, rec_reward, beta, traj=traj)
    x0 = trajectory.final
    torch.testing.assert_close(adjoint[:, -1], beta * grad_of(lambda x_: reward(x_, traj), x0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r0.double(), reward(x0, traj).double())
    for i, t in enumerate(scheduler.timesteps):
        x = trajectory.states[:, i]
        t_rows = t.expand(B)

        def projected_mean(x_, i=i):
            return (diffusers_step(scheduler, reference, x_, t_rows, traj)[0] * adjoint[:, i + 1]).flatten(1).sum(1)

        torch.testing.assert_close(adjoint[:, i], grad_of(projected_mean, x), rtol=RTOL_DIFFUSERS, atol=1e-10, msg=f"step {i}")
    assert all(torch.equal(call_traj, traj) for _, call_traj in rec_reference.calls + rec_reward.calls)
    assert len(rec_reference.calls) == NUM_STEPS


def test_lean_adjoint_is_detached_and_leaves_no_parameter_gradients(schedule):
    reference, reward = TinyNet(seed=2), LinearReward()
    assert all(p.requires_grad for p in reference.parameters())  # trainable-looking, like a LoRA UNet
    trajectory = sample_trajectory(TinyNet(seed=1), schedule, torch.randn(4, 2, dtype=F64))
    adjoint, r0 = lean_adjoint(reference, schedule, trajectory, reward, 2.0)
    assert not adjoint.requires_grad and not r0.requires_grad and adjoint.grad_fn is None
    assert all(p.grad is None for p in reference.parameters()) and all(p.grad is None for p in reward.parameters())
    assert adjoint.abs().sum() > 0 and torch.isfinite(adjoint).all()


def test_lean_adjoint_is_unbiased_along_oracle_paths_and_biased_along_pretrained_ones():
    """GMM task (grid25, bump reward) with the prior's exact ε-model: averaged over paths of the
    exact-flow oracle, a_i − ∇log F̃(x_i) projected on ∇log F̃(x_i) is ≈ 0 at every step; along the
    pretrained model's own paths it over-estimates at high noise (the bias `lean_adjoint` states).

    The oracle is itself the Gaussian linearisation of P* on a 50-step chain, so it carries a small
    bias of its own (measured +0.04…+0.06 of E‖∇log F̃‖², ~2 standard errors): the bound is
    0.12, against +0.89 for pretrained paths at step 0."""
    import gmm
    import toy_2d
    from experiments import toy_diagnostics

    torch.set_num_threads(1)
    cfg = toy_2d.ToyConfig(prior="grid25", reward="bump")
    task, scheduler = toy_2d.build_task(cfg), toy_2d.sd_scheduler()
    schedule = ddim_schedule(scheduler, 50)
    reference = toy_diagnostics.analytic_eps(task.prior, scheduler.alphas_cumprod)
    oracle = toy_diagnostics.oracle_eps(task, reference, schedule)
    generator, n = torch.Generator().manual_seed(0), 4000
    bias = {}
    for name, policy in (("oracle", oracle), ("pretrained", reference)):
        trajectory = sample_trajectory(policy, schedule, torch.randn(n, 2, generator=generator, dtype=F64), generator)
        adjoint, _ = lean_adjoint(reference, schedule, trajectory, task.log_reward, cfg.beta)
        bias[name] = []
        for i in range(0, 50, 5):
            exact = gmm.exact_flow_score(task.prior, task.target, trajectory.states[:, i], schedule.alpha_bar[i].expand(n))
            projected = ((adjoint[:, i] - exact) * exact).sum(1) / exact.pow(2).sum(1).mean()
            bias[name].append(float(projected.mean()))
    assert max(abs(b) for b in bias["oracle"]) < 0.12, bias
    assert bias["pretrained"][0] > 0.5, bias


# ----------------------------------------------------------------------------------------------
# The flow targets: adjoint, mixed, adjoint matching
# ----------------------------------------------------------------------------------------------


def sample_batch_with_adjoint(policy, reference, log_reward, schedule, beta, batch_size=4, fraction=0.5, seed=0):
    """A realistic batch and the lean adjoint of the trajectories it was gathered from."""
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch_size, 2, generator=generator, dtype=F64)
    trajectory = sample_trajectory(policy, schedule, x_T, generator=generator)
    steps = subsample_steps(schedule.num_steps, fraction, batch_size, generator=generator)
    adjoint, _ = lean_adjoint(reference, schedule, trajectory, log_reward, beta)
    return gather_transitions(trajectory, schedule, steps), adjoint


def oracle_adjoint_rows(scheduler, adjoint, batch, offset):
    """a_{i+offset} per row, the step found from the row's timestep (not from batch.step)."""
    timesteps = scheduler.timesteps.tolist()
    return torch.stack([adjoint[int(b), timesteps.index(int(t)) + offset] for b, t in zip(batch.traj, batch.t)])


def test_adjoint_rows_find_each_rows_step(scheduler, schedule):
    policy = TinyNet(seed=1)
    batch, adjoint = sample_batch_with_adjoint(policy, policy, smooth_reward, schedule, 1.0)
    batch = batch.select(torch.randperm(len(batch)))
    for offset in (0, 1):
        assert torch.equal(adjoint_rows(adjoint, batch, offset), oracle_adjoint_rows(scheduler, adjoint, batch, offset))


def row_shifted_policy(reference, batch, shift):
    """An ε-model that, at each of the batch's states x (matched exactly), moves the step mean by
    shift[row]: step_mean is affine in ε̂, so ε̂ = ε̂♯ + shift / slope, slope = ∂μ/∂ε̂ (per row)."""
    slope = step_mean(torch.zeros_like(batch.x), torch.ones_like(batch.x), batch.alpha_bar, batch.alpha_bar_next, batch.sigma)
    slope = slope - step_mean(torch.zeros_like(batch.x), torch.zeros_like(batch.x), batch.alpha_bar, batch.alpha_bar_next, batch.sigma)

    def eps_fn(x, t, traj):
        row = (x.detach()[:, None] == batch.x[None]).flatten(2).all(2).long().argmax(1)
        return reference(x, t, traj) + shift[row] / slope[row]

    return eps_fn


@pytest.mark.parametrize("weighting", ["plain", "kl"])
def test_adjoint_matching_loss_is_zero_when_the_policy_shift_is_sigma2_times_the_adjoint(schedule, weighting):
    """Adjoint matching (no g_φ, flow_target "adjoint"): θ's target is a_{i+1} itself, so the loss
    vanishes (to float64 rounding) when μ_θ − μ♯ = σ² a_{i+1} row by row, and only then."""
    reference = TinyNet(seed=2)
    batch, adjoint = sample_batch_with_adjoint(TinyNet(seed=1), reference, smooth_reward, schedule, 2.0)
    cfg = LossConfig(beta=2.0, weighting=weighting, use_flow=False, flow_target="adjoint")
    calls = Recorder(smooth_reward)
    shift = rows(batch.sigma, batch.x) ** 2 * adjoint[batch.traj, batch.step + 1]
    loss, parts = nabla_db_loss(batch, row_shifted_policy(reference, batch, shift), reference, calls, None, cfg, adjoint=adjoint)
    at_reference, _ = nabla_db_loss(batch, reference, reference, calls, None, cfg, adjoint=adjoint)
    assert at_reference > 1e-3 and loss < 1e-20 * at_reference, (float(loss), float(at_reference))
    assert not calls.calls and "reward_next" not in parts, "adjoint matching must not score the reward"
    wrong_rows = shift[torch.roll(torch.arange(len(batch)), 1)]  # each row given another row's shift
    wrong, _ = nabla_db_loss(batch, row_shifted_policy(reference, batch, wrong_rows), reference, calls, None, cfg, adjoint=adjoint)
    assert wrong > 1e-3 * at_reference


def test_flow_targets_fit_their_stated_targets_and_mixed_interpolates(scheduler, schedule):
    """Each flow target's (fit(x'), v(x)) with L_B = w_φ ‖v + g_φ(x)‖². "bootstrap" and "mixed" fit g_φ(x')
    to θ's detached residual, "adjoint" to a_{i+1} with no L_B. "mixed" with λ → 0 gives the
    bootstrapped v; with λ = 1 it fits guess(x) + g_φ(x) to a_i alone: v = guess(x) − a_i (guess and
    adjoint rows by independent oracles)."""
    policy, reference = TinyNet(seed=1), TinyNet(seed=2)
    batch, adjoint = sample_batch_with_adjoint(policy, reference, smooth_reward, schedule, 1.5)
    a_here, a_next = (oracle_adjoint_rows(scheduler, adjoint, batch, k) for k in (0, 1))
    common = dict(beta=1.5, gamma="sqrt_alpha_bar")
    models = {"policy": policy, "reference": reference}

    def targets(**kw):  # (θ's residual δ, (fit(x'), v(x))) from the loss's own pass at x
        return nabla_gfn._residuals_at_x(batch, models, smooth_reward, LossConfig(**common, **kw), True, adjoint)[1:]

    residual, (fit_boot, v_boot) = targets()
    _, (fit_tiny, v_tiny) = targets(flow_target="mixed", adjoint_lambda=1e-12)
    _, (fit_one, v_one) = targets(flow_target="mixed", adjoint_lambda=1.0)
    _, (fit_adjoint, v_adjoint) = targets(flow_target="adjoint")
    torch.testing.assert_close(v_tiny, v_boot, rtol=1e-9, atol=1e-9)
    guess = oracle_guess(scheduler, policy, smooth_reward, batch.x, batch.t, batch.traj, 1.5, "sqrt_alpha_bar")
    # v = guess − a cancels; the oracle's error (RTOL_DIFFUSERS) is relative to guess, so compare v + a (a is shared).
    torch.testing.assert_close(v_one + a_here, guess, rtol=RTOL_DIFFUSERS, atol=1e-8)
    assert not v_one.requires_grad and (v_boot - v_one).abs().max() > 1e-3
    for fit in (fit_boot, fit_tiny, fit_one):
        assert torch.equal(fit, residual.detach()) and not fit.requires_grad
    assert v_adjoint is None and torch.equal(fit_adjoint, a_next)


@pytest.mark.parametrize(
    "use_flow, weighting, guess_from, flow_target",
    [(True, "kl", "policy", "adjoint"), (True, "plain", "reference", "adjoint"), (True, "kl-shift", "policy", "mixed"),
     (True, "kl", "reference", "mixed"), (False, "kl", "policy", "adjoint"), (False, "plain", "policy", "adjoint")],
)
def test_flow_target_losses_match_independent_oracle(scheduler, schedule, use_flow, weighting, guess_from, flow_target):
    B = 4
    policy, reference, flow = (TinyNet(num_traj=B, seed=s) for s in (1, 2, 3))
    reward = CentreReward(torch.randn(B, 2, dtype=F64))
    batch, adjoint = sample_batch_with_adjoint(TinyNet(num_traj=B, seed=0), reference, reward, schedule, 1.5, batch_size=B)
    batch = batch.select(torch.randperm(len(batch)))
    assert batch.is_terminal.any() and (~batch.is_terminal).any()
    cfg = LossConfig(beta=1.5, trust_region=0.5, reverse_weight=0.7, gamma="sqrt_alpha_bar", weighting=weighting,
                     use_flow=use_flow, guess_from=guess_from, flow_target=flow_target, adjoint_lambda=0.3)
    rec_policy, rec_reference, rec_flow = Recorder(policy), Recorder(reference), Recorder(flow)
    loss, parts = nabla_db_loss(batch, rec_policy, rec_reference, reward, rec_flow, cfg, adjoint=adjoint)
    for rec in (rec_policy, rec_reference) + ((rec_flow,) if use_flow else ()):
        assert_routed_by_traj(rec, batch, require_match=True)
    expected_loss, expected_parts = oracle_loss(scheduler, batch, policy, reference, reward, flow, cfg, adjoint=adjoint)
    for name, expected in expected_parts.items():
        torch.testing.assert_close(parts[name].double(), expected.detach().double(), rtol=RTOL_DIFFUSERS, atol=1e-12, msg=name)
    torch.testing.assert_close(loss, expected_loss, rtol=RTOL_DIFFUSERS, atol=1e-12)
    params = list(policy.parameters()) + (list(flow.parameters()) if use_flow else [])
    for g, e in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected_loss, params)):
        torch.testing.assert_close(g, e, rtol=RTOL_DIFFUSERS, atol=1e-7)
    if flow_target == "adjoint":
        assert parts["reverse"] == 0 and all(not x.requires_grad for x, _ in rec_policy.calls), "no L_B, no graph to x"


class X0Model:
    """The ε-model `eps_fn` re-expressed as a model that predicts x̂_0 = (x − √(1−ᾱ) ε̂)/√ᾱ itself."""

    def __init__(self, eps_fn, scheduler):
        self.eps_fn, self.alphas_cumprod = eps_fn, scheduler.alphas_cumprod.to(F64)

    def __call__(self, x, t, traj):
        a = rows(self.alphas_cumprod[t], x)
        return (x - (1 - a).sqrt() * self.eps_fn(x, t, traj)) / a.sqrt()


def x0_parametrised(schedule):
    """The same sampler for an x̂_0-model, as a new StepSchedule constructor would build it: out = x̂_0 =
    c x + d ε̂ gives ε̂ = (out − c x)/d, so μ = a x + b ε̂ = (a − b c/d) x + (b/d) out, x̂_0 = 0 x + 1 out."""
    (a, b), (c, d) = schedule.mean_coef.unbind(-1), schedule.x0_coef.unbind(-1)
    identity = torch.tensor([0.0, 1.0], dtype=F64).expand(schedule.num_steps, 2)
    return StepSchedule(schedule.timesteps, schedule.next_timesteps, schedule.alpha_bar, schedule.alpha_bar_next,
                        schedule.sigma, torch.stack([a - b * c / d, b / d], -1), identity, identity)


@pytest.mark.parametrize(
    "use_flow, flow_target, guess_from, weighting",
    [(True, "bootstrap", "policy", "plain"), (True, "bootstrap", "reference", "kl"), (True, "mixed", "policy", "kl-shift"),
     (True, "adjoint", "reference", "kl"), (False, "bootstrap", "policy", "plain"), (False, "adjoint", "policy", "kl")],
)
def test_sampler_adjoint_and_loss_do_not_depend_on_the_output_parametrisation(
    scheduler, schedule, use_flow, flow_target, guess_from, weighting
):
    """Only μ and x̂_0 enter the algorithm: the ε-models with the DDIM schedule and the same models
    re-expressed as x̂_0-predictors with the coefficients of `x0_parametrised` give the same
    trajectories, lean adjoint, loss parts and gradients (trust region off: it compares raw outputs).
    A code path that read the output as ε̂ (e.g. x̂_0 from ᾱ alone) would fail this by O(1)."""
    B, beta = 4, 1.5
    policy, reference, flow, sampler = (TinyNet(num_traj=B, seed=s) for s in (1, 2, 3, 0))
    reward = CentreReward(torch.randn(B, 2, dtype=F64))
    cfg = LossConfig(beta=beta, reverse_weight=0.7, gamma="sqrt_alpha_bar", weighting=weighting, use_flow=use_flow,
                     guess_from=guess_from, flow_target=flow_target, adjoint_lambda=0.3)
    variants = ((lambda m: m, schedule), (lambda m: X0Model(m, scheduler), x0_parametrised(schedule)))
    assert_parametrisations_agree(variants, (policy, reference, flow, sampler), reward, cfg, B)


def assert_parametrisations_agree(variants, models, reward, cfg: LossConfig, B: int) -> None:
    """Run sampler → lean adjoint → ∇-DB loss under each (wrap, schedule) variant (float64, fixed seeds) and check
    that trajectories, adjoint, loss parts and gradients agree (float64 sums in another order only)."""
    policy, reference, flow, sampler = models
    steps = subsample_steps(variants[0][1].num_steps, 0.5, B, generator=torch.Generator().manual_seed(1))
    x_T, results = torch.randn(B, 2, dtype=F64), []
    for wrap, sched in variants:
        trajectory = sample_trajectory(wrap(sampler), sched, x_T, generator=torch.Generator().manual_seed(2))
        adjoint, _ = lean_adjoint(wrap(reference), sched, trajectory, reward, cfg.beta)
        batch = gather_transitions(trajectory, sched, steps)
        loss, parts = nabla_db_loss(batch, wrap(policy), wrap(reference), reward, flow, cfg, adjoint=adjoint)
        params = list(policy.parameters()) + (list(flow.parameters()) if cfg.use_flow else [])
        results.append((trajectory.states, adjoint, parts, torch.autograd.grad(loss, params)))
    (states, adjoint, parts, grads), (states_x0, adjoint_x0, parts_x0, grads_x0) = results
    torch.testing.assert_close(states_x0, states, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(adjoint_x0, adjoint, rtol=1e-7, atol=1e-9)
    assert parts.keys() == parts_x0.keys() and parts["loss"] > 0
    for name in parts:
        torch.testing.assert_close(parts_x0[name], parts[name], rtol=1e-7, atol=1e-12, msg=name)
    for got, expected in zip(grads_x0, grads):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("wrong_offset", [0, 2])
def test_flow_target_oracle_catches_a_wrong_adjoint_row(scheduler, schedule, monkeypatch, wrong_offset):
    """A loss that reads a_i (or a_{i+2}) where it should read a_{i+1} fails the oracle comparison."""
    real = nabla_gfn.adjoint_rows

    def broken(adjoint, batch, offset):
        if offset != 1:
            return real(adjoint, batch, offset)
        step = (batch.step + wrong_offset).clamp(max=adjoint.shape[1] - 1)
        return adjoint[batch.traj, step].to(batch.x.dtype)

    policy, reference, flow = TinyNet(seed=1), TinyNet(seed=2), TinyNet(seed=3)
    batch, adjoint = sample_batch_with_adjoint(policy, reference, smooth_reward, schedule, 1.5)
    for use_flow in (True, False):
        cfg = LossConfig(beta=1.5, weighting="kl", use_flow=use_flow, flow_target="adjoint")
        expected, _ = oracle_loss(scheduler, batch, policy, reference, smooth_reward, flow, cfg, adjoint=adjoint)
        loss, _ = nabla_db_loss(batch, policy, reference, smooth_reward, flow, cfg, adjoint=adjoint)
        torch.testing.assert_close(loss, expected, rtol=RTOL_DIFFUSERS, atol=1e-12)
        monkeypatch.setattr(nabla_gfn, "adjoint_rows", broken)
        loss, _ = nabla_db_loss(batch, policy, reference, smooth_reward, flow, cfg, adjoint=adjoint)
        monkeypatch.setattr(nabla_gfn, "adjoint_rows", real)
        assert not torch.allclose(loss, expected, rtol=1e-3), use_flow


def test_adjoint_target_trains_the_policy_exactly_as_bootstrap_and_g_phi_differently(schedule):
    """θ's line of L_F is the same for every flow target (L_B never trains θ), so θ's gradient is
    the same with "bootstrap" and "adjoint"; g_φ's is not. Reference and reward get none."""
    policy, reference, flow, reward = TinyNet(seed=1), TinyNet(seed=2), TinyNet(seed=3), LinearReward()
    for p in reference.parameters():
        p.requires_grad_(True)
    batch, adjoint = sample_batch_with_adjoint(TinyNet(seed=0), reference, reward, schedule, 2.0)
    got = {}
    for target in ("bootstrap", "adjoint", "mixed"):
        for module in (policy, reference, flow, reward):
            module.zero_grad(set_to_none=True)
        cfg = LossConfig(beta=2.0, trust_region=0.5, weighting="kl", flow_target=target)
        loss, _ = nabla_db_loss(batch, policy, reference, reward, flow, cfg, adjoint=adjoint)
        loss.backward()
        assert all(p.grad is None for p in reference.parameters()) and all(p.grad is None for p in reward.parameters())
        got[target] = (grads(policy), grads(flow))
    for target in ("adjoint", "mixed"):
        for g, e in zip(got[target][0], got["bootstrap"][0]):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)
        assert any(not torch.allclose(g, e) for g, e in zip(got[target][1], got["bootstrap"][1]))


def test_flow_target_config_errors_are_one_line_value_errors(schedule):
    with pytest.raises(ValueError, match=r"flow_target must be one of \('bootstrap', 'adjoint', 'mixed'\)"):
        LossConfig(flow_target="td")
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match=r"adjoint_lambda must be in \(0, 1\]"):
            LossConfig(flow_target="mixed", adjoint_lambda=bad)
    with pytest.raises(ValueError, match="needs g_φ"):
        LossConfig(flow_target="mixed", use_flow=False)
    policy = TinyNet(seed=1)
    batch = sample_batch(policy, schedule)
    for target in ("adjoint", "mixed"):
        with pytest.raises(ValueError, match="needs adjoint=lean_adjoint"):
            nabla_db_loss(batch, policy, policy, smooth_reward, TinyNet(seed=3), LossConfig(flow_target=target))
    _, adjoint = sample_batch_with_adjoint(policy, policy, smooth_reward, schedule, 1.0)
    with pytest.raises(ValueError, match="needs g_φ"):
        nabla_db_loss(batch, policy, policy, smooth_reward, None, LossConfig(flow_target="mixed"), adjoint=adjoint)


# ----------------------------------------------------------------------------------------------
# Training-step helpers
# ----------------------------------------------------------------------------------------------


def test_clip_grad_norms_clips_each_group_separately():
    a1, a2, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(4))
    a1.grad, a2.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 12.0]), torch.tensor([0.3, 0.4])
    norms = clip_grad_norms({"policy": [a1, a2], "flow": iter([b]), "unused": [c]}, max_norm=1.0)
    assert norms["policy"] == pytest.approx(13.0) and norms["flow"] == pytest.approx(0.5) and norms["unused"] == 0.0
    clipped = torch.cat([a1.grad, a2.grad]).norm()
    assert clipped == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(a1.grad, torch.tensor([3.0, 4.0]) / 13, rtol=1e-4, atol=0)
    assert torch.equal(b.grad, torch.tensor([0.3, 0.4])), "a group under the limit must be left alone"


@pytest.mark.parametrize("use_flow", [False, True])
def test_policy_graph_at_x_is_built_after_the_guess_graphs_are_freed(schedule, use_flow):
    """Memory order of nabla_db_loss: the guess at x' (a model graph and the reward's) is built and freed
    before θ's graph at x, which the loss keeps until backward; so a model call never starts while
    another model's graph is alive, except the reference's (beside θ's, for L_B's ∇_x). SD: one UNet graph
    (~3 GiB per transition at 512² without checkpointing) fewer at the guess."""
    policy, reference, flow = TinyNet(seed=1), TinyNet(seed=2), TinyNet(seed=3)
    batch = sample_batch(policy, schedule)
    alive, calls = set(), []

    def tracked(name, module):
        def eps(x, t, traj):
            calls.append((name, len(alive)))
            return module(x, t, traj)
        return eps

    class Holder:
        def __init__(self, t):
            self.t = t

    def pack(t):
        holder = Holder(t)
        alive.add(id(holder))
        weakref.finalize(holder, alive.discard, id(holder))
        return holder

    cfg = LossConfig(beta=2.0, trust_region=0.5, use_flow=use_flow)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.t):
        loss, _ = nabla_db_loss(batch, tracked("policy", policy), tracked("reference", reference), LinearReward(),
                                flow, cfg)
    assert [name for name, _ in calls] == ["policy", "policy", "reference"]  # the guess at x', then at x
    assert all(n == 0 for name, n in calls if name == "policy"), calls
    loss.backward()


# ----------------------------------------------------------------------------------------------
# The learned flow as an antithetic control variate of the lean adjoint (control_variate)
# ----------------------------------------------------------------------------------------------


def oracle_mirror_next(scheduler, batch):
    """x̃' = 2 μ_old(x) − x', μ_old from diffusers' own step with the recorded output eps_old."""
    recorded = iter(batch.eps_old.split(1))  # diffusers_step calls the model row by row, in order
    mean_old, _ = diffusers_step(scheduler, lambda x, t, traj: next(recorded), batch.x, batch.t, batch.traj)
    return 2 * mean_old - batch.x_next


@pytest.mark.parametrize("guess_from", ["policy", "reference"])
def test_antithetic_target_is_the_adjoint_minus_half_the_flow_difference_at_the_mirrored_state(scheduler, schedule, guess_from):
    """y = a_{i+1} − ½ [h(x') − h(x̃')] with h = guess + g_φ (β∇r at x_0, no g_φ there), every piece
    from an independent oracle: the mirror from diffusers' step, the guess from `oracle_guess`."""
    policy, reference, flow = TinyNet(seed=1), TinyNet(seed=2), TinyNet(seed=3)
    batch, adjoint = sample_batch_with_adjoint(policy, reference, smooth_reward, schedule, 2.0)
    cfg = LossConfig(beta=2.0, gamma="sqrt_alpha_bar", guess_from=guess_from, flow_target="adjoint", control_variate=True)
    model = {"policy": policy, "reference": reference}[guess_from]

    def h(x_next):  # guess + g_φ at x' (exact β∇r and no g_φ on terminal rows)
        term = batch.is_terminal
        guess = oracle_guess(scheduler, model, smooth_reward, x_next, batch.t_next, batch.traj, 2.0, "sqrt_alpha_bar")
        terminal = 2.0 * grad_of(lambda x0: smooth_reward(x0, batch.traj), x_next)
        with torch.no_grad():
            return torch.where(term[:, None], terminal, guess + flow(x_next, batch.t_next, batch.traj))

    assert batch.is_terminal.any() and (~batch.is_terminal).any()
    expected = oracle_adjoint_rows(scheduler, adjoint, batch, 1) - 0.5 * (h(batch.x_next) - h(oracle_mirror_next(scheduler, batch)))
    got = antithetic_target(batch, model, smooth_reward, flow, cfg, adjoint, h(batch.x_next))
    torch.testing.assert_close(got, expected, rtol=RTOL_DIFFUSERS, atol=RTOL_DIFFUSERS * float(expected.abs().max()))
    assert not got.requires_grad


def test_antithetic_target_is_unbiased_for_any_flow_and_removes_a_linear_flows_noise(schedule):
    """The control variate's two identities. (1) Over a mirrored pair of draws x' = μ_old ± σξ the flow
    terms cancel exactly: Σ y = Σ a_{i+1} whatever g_φ is (so E[y | x] = E[a_{i+1} | x]). (2) If a_{i+1} is
    itself h(x') with h linear in x', y = h(μ_old(x)) for both draws: the step's noise is gone."""
    policy, reference = TinyNet(seed=1), TinyNet(seed=2)
    batch = sample_batch(policy, schedule, batch_size=6)
    batch = batch.select(~batch.is_terminal)
    fields = {f: torch.cat([getattr(batch, f)] * 2) for f in batch.__dataclass_fields__}
    fields["x_next"] = torch.cat([batch.x_next, oracle_mirror_next_affine(batch)])  # each draw and its mirror
    pair = Transitions(**fields)
    adjoint = torch.zeros(int(pair.traj.max()) + 1, schedule.num_steps + 1, 2, dtype=F64)
    for nonlinear in (TinyNet(seed=3), None):
        A = torch.tensor([[0.7, -0.2], [0.3, 1.1]], dtype=F64)
        flow = nonlinear or (lambda x, t, traj: x @ A.T)
        cfg = LossConfig(beta=1.0, guess_from="reference", flow_target="adjoint", control_variate=True)
        with torch.no_grad():
            h_next = flow(pair.x_next, pair.t_next, pair.traj)  # constant reward: guess 0, h = g_φ
        noise = torch.randn(len(pair), 2, dtype=F64)
        a_next = h_next if nonlinear is None else noise
        targets = []
        for half in (slice(0, len(batch)), slice(len(batch), len(pair))):  # each draw's own (traj, step) rows
            rows_ = pair.select(torch.arange(len(pair))[half])
            adjoint[rows_.traj, rows_.step + 1] = a_next[half]
            targets.append(antithetic_target(rows_, reference, constant_reward, flow, cfg, adjoint, h_next[half]))
        y = torch.cat(targets)
        torch.testing.assert_close(y.sum(0), a_next.sum(0), rtol=1e-12, atol=1e-12)
        if nonlinear is None:
            mean_old = affine(batch.mean_coef, batch.x, batch.eps_old)
            torch.testing.assert_close(y, torch.cat([mean_old @ A.T] * 2), rtol=1e-12, atol=1e-12)


def oracle_mirror_next_affine(batch):
    """x̃' = 2 μ_old − x' with μ_old = step_mean(x, eps_old) (the scheduler-free helper, float64)."""
    return 2 * step_mean(batch.x, batch.eps_old, batch.alpha_bar, batch.alpha_bar_next, batch.sigma) - batch.x_next


def test_loss_with_control_variate_fits_theta_to_the_antithetic_target_and_leaves_g_phi_alone(schedule):
    """control_variate changes only θ's line of L_F (its target becomes `antithetic_target`'s): the loss
    vanishes when μ_θ − μ♯ = σ² y row by row, and g_φ's terms are those of control_variate False."""
    reference, flow = TinyNet(seed=2), TinyNet(seed=3)
    batch, adjoint = sample_batch_with_adjoint(TinyNet(seed=1), reference, smooth_reward, schedule, 2.0)
    on = LossConfig(beta=2.0, weighting="kl", guess_from="reference", flow_target="adjoint", control_variate=True)
    off = LossConfig(**{**on.__dict__, "control_variate": False})
    h_next, _ = nabla_gfn.guess_next(reference, smooth_reward, batch, 2.0, on.gamma)
    with torch.no_grad():
        h_next = h_next + rows(~batch.is_terminal, batch.x) * flow(batch.x_next, batch.t_next, batch.traj)
    y = antithetic_target(batch, reference, smooth_reward, flow, on, adjoint, h_next)
    policy = row_shifted_policy(reference, batch, rows(batch.sigma, batch.x) ** 2 * y)
    _, parts_on = nabla_db_loss(batch, policy, reference, smooth_reward, flow, on, adjoint=adjoint)
    _, parts_off = nabla_db_loss(batch, policy, reference, smooth_reward, flow, off, adjoint=adjoint)
    assert parts_on["forward"] < 1e-20 and parts_off["forward"] > 1e-6, (parts_on["forward"], parts_off["forward"])
    for key in ("forward_flow", "reverse", "terminal"):
        torch.testing.assert_close(parts_on[key], parts_off[key])


def test_control_variate_needs_the_adjoint_flow_target_and_is_ignored_without_g_phi():
    with pytest.raises(ValueError, match="control_variate"):
        LossConfig(flow_target="bootstrap", control_variate=True)
    with pytest.raises(ValueError, match="control_variate"):
        LossConfig(flow_target="mixed", control_variate=True)
    LossConfig(use_flow=False, flow_target="adjoint", control_variate=True)  # adjoint matching: nothing to vary
    assert LossConfig().control_variate is False  # nabla_gfn's own default stays the paper's
