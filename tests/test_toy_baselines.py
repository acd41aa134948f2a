"""Oracle tests of the toy baselines (toy_baselines.py) and their hook in toy_2d.py.

Oracles: the shared sampler `nabla_gfn.sample_trajectory` (DRaFT and ReFL must reproduce its states
with the same generator), torch.distributions.Normal for log-probabilities, PPO's and RTB's values
where they are known in closed form (ratio 1 on-policy, zero loss at policy = reference), and hooks
on the ε-network that record which calls carry a graph. Tiny MLPs, 6 sampling steps; the last test
runs the comparison script end to end with --quick (≈ 20 s).
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal

import nabla_gfn as ng
import toy_2d
import toy_baselines as tb
from experiments import compare_toy, runner

NUM_STEPS = 6
BATCH = 8
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def schedule():
    return ng.ddim_schedule(toy_2d.sd_scheduler(), NUM_STEPS)


def tiny_net(seed: int) -> toy_2d.TimeMLP:
    torch.manual_seed(seed)
    return toy_2d.TimeMLP(hidden=16)


class RecordingEps:
    """ε-network wrapper that records, per call, the timestep and whether the call builds a graph."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x, t, traj):
        eps = self.net(x, t)
        self.calls.append({"t": int(t[0]), "graph": eps.requires_grad, "x": x})
        return eps


def config(**overrides) -> toy_2d.ToyConfig:
    return toy_2d.ToyConfig(**{"batch_size": BATCH, "num_steps": NUM_STEPS, **overrides})


# ----------------------------------------------------------------------------------------------
# DDPO
# ----------------------------------------------------------------------------------------------


def test_ddpo_ratio_is_one_on_policy_and_clip_does_not_change_the_gradient(schedule):
    policy = tiny_net(0).requires_grad_(True)
    eps_fn = toy_2d.as_eps_fn(policy)
    trajectory = toy_2d.sample(eps_fn, schedule, BATCH, torch.Generator().manual_seed(1))
    batch = tb.all_transitions(trajectory, schedule)
    with torch.no_grad():
        old = tb.transition_log_prob(eps_fn, batch)
    new = tb.transition_log_prob(eps_fn, batch)
    advantages = torch.randn(len(batch), generator=torch.Generator().manual_seed(2))

    loss, stats = tb.ppo_clip_loss(new, old, advantages, clip=0.1)
    assert torch.equal(stats["ratio"], torch.ones(len(batch)))
    assert float(stats["clip_fraction"]) == 0.0
    grad_clipped = torch.autograd.grad(loss, list(policy.parameters()), retain_graph=True)
    grad_plain = torch.autograd.grad((-advantages * torch.exp(new - old)).mean(), list(policy.parameters()))
    for a, b in zip(grad_clipped, grad_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(g.abs().sum() > 0 for g in grad_clipped)

    # the sampler's own record of π_old (its ε̂) gives the same log-probability up to float rounding,
    # and the Gaussian step's log-density agrees with torch.distributions
    old_mean = ng.step_mean(batch.x, batch.eps_old, batch.alpha_bar, batch.alpha_bar_next, batch.sigma)
    normal = Normal(old_mean, batch.sigma[:, None]).log_prob(batch.x_next).sum(-1)
    torch.testing.assert_close(old, normal, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ng.gaussian_log_prob(batch.x_next, old_mean, batch.sigma), old, rtol=1e-5, atol=1e-4)


def test_ppo_clip_loss_closed_form_off_policy():
    # ρ = 1.5 and 0.5 with ε = 0.2: for A > 0 the objective is capped at (1+ε)A and its gradient is 0
    # above the cap; for A < 0 it is capped at (1−ε)A below.
    log_prob = torch.log(torch.tensor([1.5, 0.5, 1.05])).requires_grad_(True)
    old = torch.zeros(3)
    adv = torch.tensor([2.0, -1.0, 3.0])
    loss, stats = tb.ppo_clip_loss(log_prob, old, adv, clip=0.2)
    expected = (-(2.0 * 1.2) - (-1.0 * 0.8) - 3.0 * 1.05) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, -3.0 * 1.05 / 3]))
    assert float(stats["clip_fraction"]) == pytest.approx(2 / 3)


def test_normalised_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    adv = tb.normalised_advantages(r, clip=1.5)
    assert adv.max() == 1.5 and adv.min() >= -1.5
    unclipped = tb.normalised_advantages(r, clip=1e9)
    torch.testing.assert_close(unclipped.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(unclipped.std(unbiased=False), torch.tensor(1.0))


# ----------------------------------------------------------------------------------------------
# RTB
# ----------------------------------------------------------------------------------------------


def test_rtb_loss_is_zero_at_policy_equal_reference(schedule):
    reference = tiny_net(0).requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    trajectory = toy_2d.sample(toy_2d.as_eps_fn(policy), schedule, BATCH, torch.Generator().manual_seed(3))
    batch = tb.all_transitions(trajectory, schedule)
    log_pf = tb.trajectory_log_prob(toy_2d.as_eps_fn(policy), batch, BATCH)
    log_pf_ref = tb.trajectory_log_prob(toy_2d.as_eps_fn(reference), batch, BATCH)
    reward = -trajectory.final.pow(2).sum(-1)
    log_z = tb.LogPartition()()
    assert tb.rtb_loss(log_z, log_pf, log_pf_ref, reward, beta=0.0).item() == 0.0

    # per-trajectory sums agree with torch.distributions, step by step
    by_hand = torch.zeros(BATCH)
    for i in range(NUM_STEPS):
        x, t = trajectory.states[:, i], schedule.timesteps[i].expand(BATCH)
        mean = ng.step_mean(x, reference(x, t), *tb.step_coefficients(schedule, i, BATCH))
        by_hand += Normal(mean, schedule.sigma[i]).log_prob(trajectory.states[:, i + 1]).sum(-1)
    torch.testing.assert_close(log_pf_ref, by_hand, rtol=1e-5, atol=1e-3)

    # with a reward, the best log Z at policy = reference is mean(β r) and the loss is then Var(β r)
    beta = 0.7
    best = (beta * reward).mean()
    loss = tb.rtb_loss(best, log_pf, log_pf_ref, reward, beta)
    torch.testing.assert_close(loss, (beta * reward).var(unbiased=False), rtol=1e-5, atol=1e-6)
    # the policy receives a gradient once the reward is on, the reference does not take part
    grads = torch.autograd.grad(tb.rtb_loss(log_z, log_pf, log_pf_ref, reward, beta), list(policy.parameters()))
    assert any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------------------------
# DRaFT-K and ReFL: where the gradient flows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, NUM_STEPS])
def test_draft_gradient_reaches_only_the_last_k_steps(schedule, k):
    net = tiny_net(0).requires_grad_(True)
    eps = RecordingEps(net)
    x_T = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    x0, start, _ = tb.sample_with_grad_tail(eps, eps, schedule, x_T, k, torch.Generator().manual_seed(5))

    # the same sampler and noise stream: x_0 equals nabla_gfn.sample_trajectory's
    oracle = ng.sample_trajectory(toy_2d.as_eps_fn(net), schedule, x_T.detach(), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(x0.detach(), oracle.final)
    torch.testing.assert_close(start, oracle.states[:, NUM_STEPS - k])

    graph_steps = [c["t"] for c in eps.calls if c["graph"]]
    assert graph_steps == schedule.timesteps[NUM_STEPS - k:].tolist()
    assert len(eps.calls) == NUM_STEPS
    # states before the K differentiated steps are not on the graph
    (grad_x_T,) = torch.autograd.grad(x0.sum(), x_T, retain_graph=True, allow_unused=True)
    if k < NUM_STEPS:
        assert grad_x_T is None and not start.requires_grad
    else:
        assert grad_x_T is not None and grad_x_T.abs().sum() > 0
    # and the parameters receive the gradient through exactly those calls
    grads = torch.autograd.grad(x0.sum(), list(net.parameters()))
    assert any(g.abs().sum() > 0 for g in grads)


def test_draft_kl_term_is_the_gaussian_kl(schedule):
    reference = tiny_net(0).requires_grad_(False)
    policy = tiny_net(1).requires_grad_(True)
    x_T = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(6))
    _, _, kl = tb.sample_with_grad_tail(toy_2d.as_eps_fn(policy), toy_2d.as_eps_fn(reference), schedule, x_T, 2,
                                        torch.Generator().manual_seed(7), with_kl=True)
    oracle = ng.sample_trajectory(toy_2d.as_eps_fn(policy), schedule, x_T, generator=torch.Generator().manual_seed(7))
    expected = torch.zeros(BATCH)
    for i in (NUM_STEPS - 2, NUM_STEPS - 1):
        x, t = oracle.states[:, i], schedule.timesteps[i].expand(BATCH)
        coef = tb.step_coefficients(schedule, i, BATCH)
        p = Normal(ng.step_mean(x, policy(x, t), *coef), schedule.sigma[i])
        q = Normal(ng.step_mean(x, reference(x, t), *coef), schedule.sigma[i])
        expected += torch.distributions.kl_divergence(p, q).sum(-1)
    torch.testing.assert_close(kl.detach(), expected.detach(), rtol=1e-4, atol=1e-5)


def test_refl_gradient_passes_through_exactly_one_eps_call(schedule):
    net = tiny_net(0).requires_grad_(True)
    eps = RecordingEps(net)
    stop = 4
    x_T = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    x0_hat, x_stop = tb.refl_prediction(eps, schedule, x_T, stop, torch.Generator().manual_seed(9))

    graph_calls = [c for c in eps.calls if c["graph"]]
    assert len(graph_calls) == 1 and graph_calls[0]["t"] == int(schedule.timesteps[stop])
    assert len(eps.calls) == stop + 1
    oracle = ng.sample_trajectory(toy_2d.as_eps_fn(net), schedule, x_T.detach(), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(x_stop, oracle.states[:, stop])
    t = schedule.timesteps[stop].expand(BATCH)
    expected = ng.x0_prediction(x_stop, net(x_stop, t), schedule.alpha_bar[stop].expand(BATCH))
    torch.testing.assert_close(x0_hat.detach(), expected.detach())
    (grad_x_T,) = torch.autograd.grad(x0_hat.sum(), x_T, retain_graph=True, allow_unused=True)
    assert grad_x_T is None
    assert any(g.abs().sum() > 0 for g in torch.autograd.grad(x0_hat.sum(), list(net.parameters())))

    gen = torch.Generator().manual_seed(10)
    picks = {tb.refl_step_index(40, 0.75, gen) for _ in range(400)}
    assert picks == set(range(30, 40))  # ImageReward's 30–39 of 40


# ----------------------------------------------------------------------------------------------
# The hook in toy_2d: registry, dispatch, reward-gradient accounting
# ----------------------------------------------------------------------------------------------


def test_every_method_trains_through_finetune_and_counts_reward_gradients(schedule):
    task = toy_2d.build_task(config())
    reference = tiny_net(0).requires_grad_(False).eval()
    k = ng.subsample_steps(NUM_STEPS, config().fraction, 1).shape[1]  # transitions per trajectory for ∇-DB
    # nabla-db (toy default flow target "adjoint"): the sweep's β∇r(x_0) per trajectory + one ∇r per
    # trained transition at x' (guess or terminal); no L_B, so no guess at x
    expected_per_update = {"nabla-db": BATCH + BATCH * k, "no-flow": BATCH * k, "exact-flow": 0,
                           "adjoint-matching": BATCH,  # the adjoint's terminal condition β∇r(x_0) only
                           "draft": BATCH, "refl": BATCH, "ddpo": 0, "rtb": 0}
    assert set(toy_2d.method_registry()) == set(expected_per_update)
    for method, per_update in expected_per_update.items():
        cfg = config(method=method, updates=2, eval_every=100, hidden=16, flow_hidden=16)
        policy, flow, history = toy_2d.finetune(cfg, task, reference, schedule, quiet=True)
        assert [h["reward_grad_calls"] for h in history] == [per_update, 2 * per_update], method
        assert all(key in history[-1] for key in ("loss", "reward", "grad_norm_policy", "train_time_s")), method
        assert (flow is not None) == (method == "nabla-db")
        assert any((p - q).abs().sum() > 0 for p, q in zip(policy.parameters(), reference.parameters())), method
    assert history[-1]["log_z"] != 0.0  # RTB's log Z is trained
    with pytest.raises(SystemExit):
        toy_2d.parse_args(["--method", "not-a-method"])
    assert toy_2d.parse_args(["--method", "ddpo", "--ppo-clip", "0.3"]).ppo_clip == 0.3


def test_quick_comparison_writes_the_table(tmp_path):
    out = tmp_path / "compare"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "experiments" / "compare_toy.py"), "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "table.md").read_text()
    summary = json.loads((out / "table.json").read_text())
    ids = [row["id"] for row in summary["rows"]]
    assert ids == list(compare_toy.variants(toy_2d.ToyConfig()))
    assert {"nabla-db", "no-flow", "draft", "refl", "ddpo", "rtb"} <= set(ids)
    for row in summary["rows"]:
        assert row["method"] in table
        assert 0.0 <= row["final_tv"][0] <= 1.0
    assert (out / "compare_toy.png").stat().st_size > 10_000
    assert not (tmp_path / "README.md").exists() and not (tmp_path / "docs").exists()


def test_comparison_reports_divergence_only_for_a_broken_tail(tmp_path):
    # fabricated run folders: a transient outlier that training recovers from is not a divergence;
    # a tail of NaN / far-flung evaluations is, from its first evaluation on.
    import numpy as np

    cfg = config(updates=40, eval_every=10)
    target = toy_2d.build_task(cfg).target
    good = target.sample(200, torch.Generator().manual_seed(0)).float().numpy()

    def write(name, w1s, final_w1, samples):
        out = tmp_path / name
        out.mkdir()
        history = [{"update": u, "reward": -1.0, "loss": 0.1, "reward_grad_calls": 0, "train_time_s": 0.1 * u,
                    "eval_mode_tv": 0.3, "eval_mean_log_reward": -1.0, "eval_sliced_w1": w1}
                   for u, w1 in zip((1, 10, 20, 30, 40), w1s)]
        metrics = {"finetuned": {"mode_tv": 0.3, "mean_log_reward": -1.0, "exact_mean_log_reward": -0.6, "sliced_w1": final_w1},
                   "pretrained": {"mode_tv": 0.5, "mean_log_reward": -2.0, "sliced_w1": 1.0}, "history": history}
        (out / "metrics.json").write_text(json.dumps(metrics))
        np.save(out / "samples.npy", samples)
        return runner.read_run(toy_2d.ToyConfig(**{**vars(cfg), "out": str(out)}), threshold=0.1)

    transient = write("transient", [1.0, 1e7, 1.0, 1.0, 1.0], 1.0, good)
    assert transient["diverged_at"] is None and transient["final_tv"] == 0.3 and len(transient["curve"]) == 5
    nan_samples = np.full_like(good, np.nan)
    broken = write("broken", [1.0, 1e7, 1.0, 1e3, float("nan")], float("nan"), nan_samples)
    assert broken["diverged_at"] == 30 and broken["final_tv"] is None and broken["entropy"] is None
    assert [u for u, _ in broken["curve"]] == [1, 10, 20]
