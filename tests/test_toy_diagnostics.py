"""Tests of experiments/toy_diagnostics.py: the exact-flow oracle, the flow errors, the cost counters,
--method exact-flow, and that the diagnostics leave toy_2d.py's own numbers unchanged."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import baselines as bl
import nabla_gfn as ng
import toy_2d as T
from experiments import toy_diagnostics as D

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS, BATCH = 6, 8



def test_adjoint_matching_costs_one_sweep_and_one_reward_gradient_per_trajectory(small):
    """Per update: B·T reference VJPs (the sweep) + one policy row per trained transition; B ∇r calls."""
    schedule, reference, cfg, task = small
    cfg = dataclasses.replace(cfg, method="adjoint-matching", updates=2)
    policy, flow, history = D.finetune(cfg, task, reference, schedule, quiet=True)
    rows = BATCH * ng.subsample_steps(NUM_STEPS, cfg.fraction, 1).shape[1]
    assert flow is None and cfg.loss_config.flow_target == "adjoint" and not cfg.loss_config.use_flow
    assert [h["reward_grad_calls"] for h in history] == [BATCH, 2 * BATCH]
    assert [h["network_vjps"] for h in history] == [BATCH * NUM_STEPS + rows, 2 * (BATCH * NUM_STEPS + rows)]
    assert not reference._forward_hooks  # the VJP counter removed its hooks from the shared reference


def test_counters_change_no_number_of_the_run(small):
    """The same finetune with and without the diagnostics' hooks: identical logs but for the counts and time."""
    schedule, reference, cfg, task = small
    cfg = dataclasses.replace(cfg, updates=2, eval_every=1)
    plain = T.finetune(cfg, task, reference, schedule, quiet=True)[2]
    counted = D.finetune(cfg, task, reference, schedule, quiet=True)[2]
    drop = lambda h, keys: [{k: v for k, v in row.items() if k not in keys} for row in h]
    assert drop(counted, ("reward_calls", "reward_grad_calls", "network_vjps", "train_time_s")) == drop(plain, ("train_time_s",))
    assert counted[-1]["reward_calls"] >= counted[-1]["reward_grad_calls"] > 0 and counted[-1]["network_vjps"] > 0


def test_flow_diagnostics_score_the_bootstrap_target_zero_at_the_reference(small):
    """With policy = reference the bootstrapped target −∇_x[log P_θ − log P♯] is exactly 0 (error 1,
    projection 0); the lean adjoint of the same paths ends at β∇r(x_0) = the exact flow at step T."""
    schedule, reference, cfg, task = small
    traj = T.sample(T.as_eps_fn(reference), schedule, 64, torch.Generator().manual_seed(0))
    err = D.flow_errors(task, reference, None, traj, schedule, cfg, reference)
    assert err["bootstrap_target"] == pytest.approx([1.0] * NUM_STEPS, abs=1e-6)  # mean of ‖e‖/‖e‖: a few eps32
    assert err["projection_bootstrap_target"] == pytest.approx([0.0] * NUM_STEPS, abs=1e-6)  # float32 rounding
    assert len(err["adjoint_target"]) == NUM_STEPS and err["guess_plus_flow"] == []
    assert D.flow_errors(task, reference, None, traj, schedule, cfg)["adjoint_target"] == []


def test_exact_flow_method_trains_the_policy_and_costs_no_reward_gradient(small):
    schedule, reference, cfg, task = small
    cfg = dataclasses.replace(cfg, method="exact-flow", updates=2)
    policy, flow, history = D.finetune(cfg, task, reference, schedule, quiet=True)
    assert flow is None and [h["reward_grad_calls"] for h in history] == [0, 0]
    assert any((p - q).abs().sum() > 0 for p, q in zip(policy.parameters(), reference.parameters()))
    with pytest.raises(SystemExit, match="exact-flow needs a closed-form target"):
        D.finetune(cfg, T.build_task(cfg, log_reward=lambda x: x[..., 0]), reference, schedule, quiet=True)


def test_oracle_with_the_exact_prior_model_samples_the_target_at_d8():
    """The pretrained step of the exact prior ε-model, tilted by the exact flow, lands on the target's
    mode weights (the untilted prior sampler does not): the D-dimensional flow is right at every step."""
    cfg = T.ToyConfig(dim=8)
    task = T.build_task(cfg)
    scheduler = T.sd_scheduler()
    schedule = ng.ddim_schedule(scheduler, cfg.num_steps)
    prior_eps = D.analytic_eps(task.prior, scheduler.alphas_cumprod)
    gen = torch.Generator().manual_seed(0)
    oracle = T.sample(D.oracle_eps(task, prior_eps, schedule), schedule, 3000, gen, 8).final
    untilted = T.sample(prior_eps, schedule, 3000, gen, 8).final
    assert T.metrics(task, oracle)["mode_tv"] < 0.05
    assert T.metrics(task, untilted)["mode_tv"] > 0.4


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_diagnostics.py"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)


def test_end_to_end_tiny_run_at_d8_adds_the_oracle_and_flow_errors_to_the_rungs_numbers(tmp_path, one_torch_thread):
    common = ["--dim", "8", "--updates", "4", "--batch-size", "16", "--num-steps", "10", "--pretrain-iters", "100",
              "--eval-samples", "300", "--eval-every", "2", "--cache-dir", str(tmp_path / "cache")]
    out = run_cli(*common, "--out", str(tmp_path / "diag"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| oracle " in out.stdout
    metrics = json.loads((tmp_path / "diag" / "metrics.json").read_text())
    for key in ("finetuned", "pretrained", "oracle", "exact_target_samples"):
        assert 0 <= metrics[key]["mode_tv"] <= 1 and math.isfinite(metrics[key]["sliced_w1"])
    assert len(metrics["flow_relative_error"]["guess_plus_flow"]) == 10 and 0 <= metrics["prior_mode_tv"] <= 1
    assert all(h["network_vjps"] > 0 for h in metrics["history"])
    assert (tmp_path / "diag" / "figure.png").stat().st_size > 10_000
    rung = T.run(T.ToyConfig(**{**json.loads((tmp_path / "diag" / "config.json").read_text()),
                                "out": str(tmp_path / "rung"), "no_figure": True}), quiet=True)
    assert rung["finetuned"] == metrics["finetuned"] and rung["pretrained"] == metrics["pretrained"]
    assert np.array_equal(np.load(tmp_path / "rung" / "samples.npy"), np.load(tmp_path / "diag" / "samples.npy"))


def test_exact_flow_is_a_method_of_the_diagnostics_cli_only(tmp_path):
    out = run_cli("--method", "exact-flow", "--updates", "2", "--batch-size", "8", "--num-steps", "5",
                  "--pretrain-iters", "50", "--eval-samples", "200", "--no-figure", "--cache-dir", str(tmp_path / "cache"),
                  "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["method"] == "exact-flow"
    bad = run_cli("--method", "not-a-method", "--updates", "1")
    accepted = ", ".join((*bl.METHODS, "exact-flow"))  # the registry's methods, then the diagnostic
    assert bad.returncode != 0 and f"--method: must be one of {accepted} (got 'not-a-method')" in bad.stderr and "Traceback" not in bad.stderr


def test_flow_diagnostics_score_the_control_variate_target_from_the_parent_step(small):
    """θ's --control-variate target a_i − ½[h(x_i) − h(x̃_i)] is scored from step 1 on (step 0 has no
    parent); with a zero g_φ and policy = reference it differs from the adjoint by the guess's odd part."""
    schedule, reference, cfg, task = small
    traj = T.sample(T.as_eps_fn(reference), schedule, 64, torch.Generator().manual_seed(0))
    flow = T.make_flow(cfg)  # zero output layer: h = the guess
    err = D.flow_errors(task, reference, flow, traj, schedule, cfg, reference)
    cv, adjoint = err["control_variate_target"], err["adjoint_target"]
    assert cv[0] is None and len(cv) == NUM_STEPS and all(math.isfinite(v) for v in cv[1:])
    assert cv[1:] != adjoint[1:]  # the guess moved the target (a constant guess would cancel exactly)


def test_flow_bias_quick_writes_its_table_and_figure(tmp_path):
    from experiments import flow_bias
    flow_bias.main(["--quick", "--out", str(tmp_path)])
    table = (tmp_path / "flow_bias.md").read_text()
    assert (tmp_path / "flow_bias.png").exists() and table.count("| F: 2 modes / linear |") == 5
