"""Oracle tests of the baselines and the one method registry (baselines.py), and their hooks in the rungs.

Oracles: the shared sampler `nabla_gfn.sample_trajectory` (DRaFT and ReFL must reproduce its states
with the same generator), torch.distributions.Normal for log-probabilities, PPO's and RTB's values
where they are known in closed form (ratio 1 on-policy, zero loss at policy = reference), and hooks
on the ε-network that record which calls carry a graph. Tiny MLPs, 6 sampling steps; the last test
runs the comparison script end to end with --quick (≈ 20 s). The last section checks that the rungs
share one code path: the same update and hyper-parameters for the same settings, the same RTB log Z
start, and no method registered or baseline update defined anywhere but baselines.py.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal

import cli
import nabla_gfn as ng
import toy_2d
import baselines as bl
from experiments import compare_toy, runner, toy_diagnostics

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
    batch = bl.all_transitions(trajectory, schedule)
    with torch.no_grad():
        old = bl.transition_log_prob(eps_fn, batch)
    new = bl.transition_log_prob(eps_fn, batch)
    advantages = torch.randn(len(batch), generator=torch.Generator().manual_seed(2))

    loss, stats = bl.ppo_clip_loss(new, old, advantages, clip=0.1)
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
    # float32, ε recomputed in another batch shape (a few ulp) enters as (x'−μ)/σ²·dμ; atol for the large log σ terms.
    torch.testing.assert_close(old, normal, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ng.gaussian_log_prob(batch.x_next, old_mean, batch.sigma), old, rtol=1e-5, atol=1e-4)


def test_ppo_clip_loss_closed_form_off_policy():
    # ρ = 1.5 and 0.5 with ε = 0.2: for A > 0 the objective is capped at (1+ε)A and its gradient is 0
    # above the cap; for A < 0 it is capped at (1−ε)A below.
    log_prob = torch.log(torch.tensor([1.5, 0.5, 1.05])).requires_grad_(True)
    old = torch.zeros(3)
    adv = torch.tensor([2.0, -1.0, 3.0])
    loss, stats = bl.ppo_clip_loss(log_prob, old, adv, clip=0.2)
    expected = (-(2.0 * 1.2) - (-1.0 * 0.8) - 3.0 * 1.05) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, -3.0 * 1.05 / 3]))
    assert float(stats["clip_fraction"]) == pytest.approx(2 / 3)


def test_normalised_advantages():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    adv = bl.normalised_advantages(r, clip=1.5)
    assert adv.max() == 1.5 and adv.min() >= -1.5
    unclipped = bl.normalised_advantages(r, clip=1e9)
    torch.testing.assert_close(unclipped.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)  # float32: 5 terms |a| ≤ 2, ≲ 2·eps32
    torch.testing.assert_close(unclipped.std(unbiased=False), torch.tensor(1.0))


# ----------------------------------------------------------------------------------------------
# RTB
# ----------------------------------------------------------------------------------------------


def test_rtb_loss_is_zero_at_policy_equal_reference(schedule):
    reference = tiny_net(0).requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    trajectory = toy_2d.sample(toy_2d.as_eps_fn(policy), schedule, BATCH, torch.Generator().manual_seed(3))
    batch = bl.all_transitions(trajectory, schedule)
    log_pf = bl.trajectory_log_prob(toy_2d.as_eps_fn(policy), batch, BATCH)
    log_pf_ref = bl.trajectory_log_prob(toy_2d.as_eps_fn(reference), batch, BATCH)
    reward = -trajectory.final.pow(2).sum(-1)
    log_z = bl.LogPartition()()
    assert bl.rtb_loss(log_z, log_pf, log_pf_ref, reward, beta=0.0).item() == 0.0

    # per-trajectory sums agree with torch.distributions, step by step
    by_hand = torch.zeros(BATCH)
    for i in range(NUM_STEPS):
        x, t = trajectory.states[:, i], schedule.timesteps[i].expand(BATCH)
        mean = ng.step_mean(x, reference(x, t), *bl.step_coefficients(schedule, i, BATCH))
        by_hand += Normal(mean, schedule.sigma[i]).log_prob(trajectory.states[:, i + 1]).sum(-1)
    # float32 sums of NUM_STEPS log-densities (|log σ| terms up to ~10) in another order and batch shape: ~1e-5 abs.
    torch.testing.assert_close(log_pf_ref, by_hand, rtol=1e-5, atol=1e-3)

    # with a reward, the best log Z at policy = reference is mean(β r) and the loss is then Var(β r)
    beta = 0.7
    best = (beta * reward).mean()
    loss = bl.rtb_loss(best, log_pf, log_pf_ref, reward, beta)
    # float32: both square the same deviations from the same mean (κ = 1); only the reduction order may differ.
    torch.testing.assert_close(loss, (beta * reward).var(unbiased=False), rtol=1e-5, atol=1e-6)
    # the policy receives a gradient once the reward is on, the reference does not take part
    grads = torch.autograd.grad(bl.rtb_loss(log_z, log_pf, log_pf_ref, reward, beta), list(policy.parameters()))
    assert any(g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------------------------
# DRaFT-K and ReFL: where the gradient flows
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, NUM_STEPS])
def test_draft_gradient_reaches_only_the_last_k_steps(schedule, k):
    net = tiny_net(0).requires_grad_(True)
    eps = RecordingEps(net)
    x_T = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    x0, start, _ = bl.sample_with_grad_tail(eps, eps, schedule, x_T, k, torch.Generator().manual_seed(5))

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
    _, _, kl = bl.sample_with_grad_tail(toy_2d.as_eps_fn(policy), toy_2d.as_eps_fn(reference), schedule, x_T, 2,
                                        torch.Generator().manual_seed(7), with_kl=True)
    oracle = ng.sample_trajectory(toy_2d.as_eps_fn(policy), schedule, x_T, generator=torch.Generator().manual_seed(7))
    expected = torch.zeros(BATCH)
    for i in (NUM_STEPS - 2, NUM_STEPS - 1):
        x, t = oracle.states[:, i], schedule.timesteps[i].expand(BATCH)
        coef = bl.step_coefficients(schedule, i, BATCH)
        p = Normal(ng.step_mean(x, policy(x, t), *coef), schedule.sigma[i])
        q = Normal(ng.step_mean(x, reference(x, t), *coef), schedule.sigma[i])
        expected += torch.distributions.kl_divergence(p, q).sum(-1)
    # float32: ‖Δμ‖²/2σ² with Δμ a difference of step means ≈ x, so rounding is amplified by κ = 2|μ|/|Δμ|.
    torch.testing.assert_close(kl.detach(), expected.detach(), rtol=1e-4, atol=1e-5)


def test_refl_gradient_passes_through_exactly_one_eps_call(schedule):
    net = tiny_net(0).requires_grad_(True)
    eps = RecordingEps(net)
    stop = 4
    x_T = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(8)).requires_grad_(True)
    x0_hat, x_stop = bl.refl_prediction(eps, schedule, x_T, stop, torch.Generator().manual_seed(9))

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
    picks = {bl.refl_step_index(40, 0.75, gen) for _ in range(400)}
    assert picks == set(range(30, 40))  # ImageReward's 30–39 of 40


# ----------------------------------------------------------------------------------------------
# The hook in toy_2d: registry, dispatch, reward-gradient accounting
# ----------------------------------------------------------------------------------------------


def test_every_method_trains_through_finetune_and_counts_reward_gradients(schedule):
    task = toy_2d.build_task(config())
    reference = tiny_net(0).requires_grad_(False).eval()
    k = ng.subsample_steps(NUM_STEPS, config().fraction, 1).shape[1]  # transitions per trajectory for ∇-DB
    # nabla-db (toy default: flow target "adjoint", control variate on): the sweep's β∇r(x_0) per trajectory
    # + two ∇r per trained transition, at x' and at its mirror x̃' (guess, or β∇r on terminal rows); no L_B,
    # so no guess at x
    expected_per_update = {"nabla-db": BATCH + 2 * BATCH * k, "no-flow": BATCH * k, "exact-flow": 0,
                           "adjoint-matching": BATCH,  # the adjoint's terminal condition β∇r(x_0) only
                           "draft": BATCH, "refl": BATCH, "ddpo": 0, "grpo": 0, "kl-pg": 0, "rtb": 0}  # rtb last: log Z below
    assert set(toy_diagnostics.METHOD_NAMES) == set(expected_per_update) == set(bl.METHODS) | {"exact-flow"}
    # reward calls (rows r scores, graph or not): the ∇-DB family also scores each x_0 once without a graph
    # (the sweep's and the guesses' calls carry graphs); DRaFT/ReFL log the reward of their graph call;
    # DDPO, GRPO, KL-PG and RTB score each x_0 once, without a graph; exact-flow never calls r
    extra_calls = {"nabla-db": BATCH, "no-flow": BATCH, "adjoint-matching": BATCH, "ddpo": BATCH, "grpo": BATCH,
                   "kl-pg": BATCH, "rtb": BATCH}
    for method, per_update in expected_per_update.items():  # the counters are experiments/toy_diagnostics.py's
        cfg = config(method=method, updates=2, eval_every=100, hidden=16, flow_hidden=16)
        policy, flow, history = toy_diagnostics.finetune(cfg, task, reference, schedule, quiet=True)
        assert [h["reward_grad_calls"] for h in history] == [per_update, 2 * per_update], method
        calls = per_update + extra_calls.get(method, 0)
        assert [h["reward_calls"] for h in history] == [calls, 2 * calls], method
        assert all(key in history[-1] for key in ("loss", "reward", "grad_norm_policy", "train_time_s")), method
        assert (flow is not None) == (method == "nabla-db")
        assert any((p - q).abs().sum() > 0 for p, q in zip(policy.parameters(), reference.parameters())), method
    assert history[-1]["log_z"] != 0.0 and history[-1]["log_z"] != history[0]["log_z"]  # RTB's log Z is trained
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


# ----------------------------------------------------------------------------------------------
# One code path on every rung: the registry, the hyper-parameters, RTB's log Z start
# ----------------------------------------------------------------------------------------------

import dataclasses
import re

import toy_digits as td

DIGITS_TINY = dict(lora_rank=4, flow_hidden=16, batch=4, num_steps=3, subsample=1.0)


def constant_reward(value: float):
    return lambda x0, traj=None: 0.0 * x0.flatten(1).sum(1) + value


def test_draft_tail_and_kl_work_on_image_shaped_states():
    # the same tail on (B, 1, 8, 8) states as on vectors: x_0 equals the shared sampler's, and the
    # KL is the Gaussian KL summed over every pixel
    schedule = ng.ddim_schedule(td.make_scheduler(), 4)
    torch.manual_seed(0)
    reference = td.DigitDenoiser(hidden=32, depth=1).eval().requires_grad_(False)
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        policy.proj_out.bias.add_(0.1)
    eps = lambda net: (lambda x, t, traj: net(x, t))
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x0, start, kl = bl.sample_with_grad_tail(eps(policy), eps(reference), schedule, x_T, 2,
                                             torch.Generator().manual_seed(2), with_kl=True)
    oracle = ng.sample_trajectory(eps(policy), schedule, x_T, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(x0, oracle.final)
    torch.testing.assert_close(start, oracle.states[:, 2])
    expected = torch.zeros(3)
    for i in (2, 3):
        x, t = oracle.states[:, i], schedule.timesteps[i].expand(3)
        coef = bl.step_coefficients(schedule, i, 3)
        p = Normal(ng.step_mean(x, policy(x, t), *coef), schedule.sigma[i])
        q = Normal(ng.step_mean(x, reference(x, t), *coef), schedule.sigma[i])
        expected += torch.distributions.kl_divergence(p, q).flatten(1).sum(1)
    assert expected.min() > 0
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-6)


def test_initial_log_z_is_the_log_mean_exp_and_is_set_once(schedule):
    reward = torch.tensor([0.0, 1.0, 3.0, -2.0])
    assert bl.initial_log_z(reward, 0.5) == pytest.approx(float(torch.log(torch.exp(0.5 * reward).mean())), rel=1e-6)
    log_z = bl.LogPartition()
    assert not log_z.started and "started" in log_z.state_dict()
    reference = tiny_net(0).requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    trainee = bl.Trainee(toy_2d.as_eps_fn(policy), toy_2d.as_eps_fn(reference), lambda x0, traj: -x0.pow(2).sum(-1),
                         schedule, lambda n, gen: torch.randn(n, 2, generator=gen), {"policy": list(policy.parameters())},
                         torch.optim.SGD([{"params": policy.parameters(), "lr": 0.0}, {"params": log_z.parameters(), "lr": 0.0}]),
                         log_z=log_z)
    hp = bl.MethodConfig(beta=0.7, batch_size=BATCH, fraction=0.1, grad_clip=1.0)
    gen = torch.Generator().manual_seed(3)
    oracle_gen = torch.Generator().manual_seed(3)  # the same stream: x_T, then the sampler's noise
    x_T = torch.randn(BATCH, 2, generator=oracle_gen)
    first = ng.sample_trajectory(toy_2d.as_eps_fn(policy), schedule, x_T, generator=oracle_gen).final
    logs = bl.rtb_update(trainee, hp, gen)  # lr 0: log Z stays where the first batch put it
    assert log_z.started and logs["log_z"] == pytest.approx(bl.initial_log_z(-first.pow(2).sum(-1), 0.7), rel=1e-6)
    log_z.value.data.fill_(5.0)
    assert bl.rtb_update(trainee, hp, gen)["log_z"] == 5.0  # not re-initialised on later batches


def toy_hp_and_update(method: str, **fields):
    cfg = toy_2d.ToyConfig(method=method, **fields)
    return toy_2d.method_config(cfg), bl.METHODS[method].update


def digits_hp_and_update(method: str, **fields):
    cfg = td.Config(method=method, **fields)
    return td.method_config(cfg, method), bl.METHODS[method].update


SHARED = dict(beta=0.5, draft_k=3, draft_kl=0.2, refl_start=0.6, ppo_clip=0.2, ppo_epochs=2, ppo_minibatches=3, ppo_adv_clip=4.0, grpo_kl=0.3,
              trust_region=0.1, reverse_weight=2.0, gamma="sqrt_alpha_bar", weighting="kl", guess_from="policy",
              flow_target="mixed", adjoint_lambda=0.3)


@pytest.mark.parametrize("method", td.METHOD_NAMES)
def test_both_rungs_resolve_to_the_same_update_and_hyper_parameters(method):
    # the rungs' differently named fields (batch_size/batch, fraction/subsample, grad_clip/max_grad_norm)
    # map onto the same MethodConfig; everything else, DRaFT's K and KL and the LossConfig included, is equal
    toy_hp, _ = toy_hp_and_update(method, batch_size=6, fraction=0.4, grad_clip=0.7, **SHARED)
    digits_hp, _ = digits_hp_and_update(method, batch=6, subsample=0.4, max_grad_norm=0.7, **SHARED)
    assert toy_hp == digits_hp
    assert toy_hp.loss == bl.METHODS[method].loss_config(toy_hp.loss)  # the method's overrides are applied
    if method == "adjoint-matching":
        assert not toy_hp.loss.use_flow and toy_hp.loss.flow_target == "adjoint"


@pytest.mark.parametrize("method", ["draft", "rtb", "nabla-db"])
def test_both_rungs_dispatch_through_the_registry(method, monkeypatch, schedule):
    # replace the registered update: both rungs must call it (and nothing of their own)
    calls = []

    def recording(trainee, hp, gen):
        calls.append((type(trainee), hp))
        return {"loss": 0.0, "reward": 0.0, "grad_norm_policy": 0.0}

    monkeypatch.setitem(bl.METHODS, method, dataclasses.replace(bl.METHODS[method], update=recording))
    cfg = config(method=method, updates=1, eval_every=100, hidden=16, flow_hidden=16, draft_kl=0.3)
    toy_2d.finetune(cfg, toy_2d.build_task(cfg), tiny_net(0).requires_grad_(False).eval(), schedule, quiet=True)
    dcfg = td.Config(**DIGITS_TINY, draft_kl=0.3)
    ft = td.make_finetuner(dcfg, td.DigitDenoiser(hidden=32, depth=1).eval(), method)
    td.method_update(dcfg, method, ft, ng.ddim_schedule(td.make_scheduler(), 3), constant_reward(1.0),
                     torch.Generator().manual_seed(0))
    assert [c[0] for c in calls] == [bl.Trainee, bl.Trainee]
    assert calls[0][1].draft_kl == calls[1][1].draft_kl == 0.3


def test_rtb_log_z_starts_at_the_same_value_on_both_rungs(schedule):
    # θ = ♯ and a constant reward c: every trajectory's residual is log Z − β c, so with log Z at the
    # first batch's log-mean-exp(β r) = β c the gradient is 0 and log Z stays at β c after the update,
    # on the toy (vectors) and on the digits (images) alike
    beta, c = 0.5, 1.5
    cfg = config(method="rtb", updates=1, eval_every=100, hidden=16, beta=beta)
    task = dataclasses.replace(toy_2d.build_task(cfg), reward=constant_reward(c))
    reference = tiny_net(0).requires_grad_(False).eval()
    policy = copy.deepcopy(reference).requires_grad_(True)
    trainee, _ = toy_2d.make_trainee(cfg, task, policy, reference, schedule, bl.METHODS["rtb"].module)  # as finetune builds it
    toy_logs = bl.METHODS["rtb"].update(trainee, toy_2d.method_config(cfg), torch.Generator().manual_seed(0))
    dcfg = td.Config(**DIGITS_TINY, beta=beta)
    ft = td.make_finetuner(dcfg, td.DigitDenoiser(hidden=32, depth=1).eval(), "rtb")
    logs = td.method_update(dcfg, "rtb", ft, ng.ddim_schedule(td.make_scheduler(), 3), constant_reward(c),
                            torch.Generator().manual_seed(0))
    assert toy_logs["log_z"] == pytest.approx(beta * c, abs=1e-6)
    assert logs["log_z"] == pytest.approx(beta * c, abs=1e-6)
    assert toy_logs["grad_norm_policy"] == logs["grad_norm_policy"] == 0.0


BASELINE_DEFINITIONS = re.compile(
    r"^\s*(class Method\b|class LogPartition\b|class MethodConfig\b|class Trainee\b|"
    r"def (draft|refl|ddpo|rtb|nabla_db|adjoint_matching|residual_db)_update\b|def (ppo_clip_loss|rtb_loss|"
    r"sample_with_grad_tail|refl_prediction|normalised_advantages|method_registry)\b|"
    r"(METHODS|BASELINES)\s*(:[^=]*)?=\s*\{)", re.M)


def test_no_method_is_registered_and_no_baseline_defined_anywhere_else():
    # every module of the project (rungs, experiments, notebooks), not the tests
    found = {}
    for path in sorted(REPO_ROOT.rglob("*.py")):
        rel = path.relative_to(REPO_ROOT)
        if rel.parts[0] in ("tests", ".venv") or rel.name == "baselines.py" or "site-packages" in rel.parts:
            continue
        hits = [m.group(0).strip() for m in BASELINE_DEFINITIONS.finditer(path.read_text())]
        # a plain {name: label} dict of a sweep script is not a registry: only dicts of Method(...) count
        hits = [h for h in hits if not h.startswith("METHODS") or "Method(" in path.read_text()]
        if hits:
            found[str(rel)] = hits
    assert found == {}
    assert not (REPO_ROOT / "toy_baselines.py").exists()
    # the ∇-DB update exists once: neither toy calls the loss itself
    for rung in ("toy_2d.py", "toy_digits.py"):
        assert "nabla_db_loss(" not in (REPO_ROOT / rung).read_text(), rung
    assert set(td.METHOD_NAMES) <= set(bl.METHODS) and set(toy_2d.METHOD_NAMES) == set(bl.METHODS)
    assert set(toy_diagnostics.METHOD_NAMES) - set(bl.METHODS) == {"exact-flow"}


@pytest.mark.parametrize("rung", ["toy_2d", "toy_digits", "sd_finetune"])
def test_a_flag_the_method_fixes_is_refused_in_one_line(rung, capsys):
    """--method adjoint-matching fixes flow_target to adjoint (its loss_overrides): --flow-target bootstrap
    or mixed with it is refused by cli.parse, one line naming the flag and the method, on every rung; the
    method's own value, or the flag left out, is accepted (the override is then what runs)."""
    import importlib

    module = importlib.import_module(rung)
    parse = getattr(module, "parse_args", None)
    if rung == "sd_finetune":  # its parse_config raises UsageError, which main prints as one line

        def parse(argv):
            try:
                return module.parse_config(argv)
            except cli.UsageError as err:
                cli.OneLineParser(prog="sd_finetune.py").error(str(err))

    for target in ("bootstrap", "mixed"):
        with pytest.raises(SystemExit) as exit_:
            parse(["--method", "adjoint-matching", "--flow-target", target])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1, err
        assert f"--flow-target {target}" in err[0] and "--method adjoint-matching" in err[0], err
    for argv in (["--method", "adjoint-matching", "--flow-target", "adjoint"], ["--method", "adjoint-matching"]):
        assert parse(argv).flow_target in ("adjoint", "bootstrap")  # accepted; toy_2d keeps its own field
    if rung != "toy_digits":  # toy_digits has no no-flow method
        with pytest.raises(SystemExit):
            parse(["--method", "no-flow", "--flow-target", "adjoint"])
        assert "--method no-flow" in capsys.readouterr().err
        loss = parse(["--method", "no-flow"]).loss_config
        assert (loss() if callable(loss) else loss).flow_target == "bootstrap"
    assert [f for _, f, _ in bl.fixed_fields("nabla-db,no-flow,draft")] == ["use_flow", "flow_target"]
