"""Tests for experiments/digits_diagnostics.py: the cost counter (network VJPs, reward calls and reward
gradients per update, against hand counts for every method) and the comparison's run_method record."""

import math

import pytest
import torch

import nabla_gfn as ng
import toy_digits as td
from experiments import digits_diagnostics as dd

TINY = dict(lora_rank=4, flow_hidden=16, batch=4, num_steps=3, subsample=1.0, draft_k=2)


def tiny_classifier() -> td.DigitClassifier:
    return td.DigitClassifier(width=32, feature_dim=16).eval().requires_grad_(False)


# batch 4, 3 steps, every transition (12 rows, 8 non-terminal), DDPO/GRPO/KL-PG: toy_digits' 1 inner epoch.
# (network VJPs, reward calls, ∇r) per update. Reward calls: rows passed to r with or without a graph; every ∇r
# row is also a call, and most methods score the batch's 4 final samples once more without a graph for their logs.
EXPECTED_COST = {
    # lean adjoint 12 VJPs + 4 ∇r; θ's loss 12 rows; guess at the 8 non-terminal x′ through ε̂♯: 8 VJPs + 8 ∇r; 4 terminal ∇r;
    # + the logging score of the 4 final samples
    ("nabla-db", "adjoint"): (12 + 12 + 8, 4 + 8 + 4 + 4, 4 + 8 + 4),
    # reverse target: through ε̂_θ's and ε̂♯'s graphs at x (12 + 12), guess at x 12 ∇r; loss 12; guess at x′ 8 + 8 ∇r;
    # terminal 4 ∇r; + the logging score
    ("nabla-db", "bootstrap"): (12 + 12 + 12 + 8, 12 + 8 + 4 + 4, 12 + 8 + 4),
    ("adjoint-matching", None): (12 + 12, 4 + 4, 4),  # lean adjoint + θ's loss; no reward call in the loss; logging score
    # every transition once through ε̂_θ (RTB: one loss; DDPO: 4 minibatches of 3 rows, 1 epoch); r once, no ∇r
    ("rtb", None): (12, 4, 0), ("ddpo", None): (12, 4, 0),
    # GRPO and KL-PG: r(x_0) of the 4 trajectories once without a graph (sample_for_pg), ε̂♯ at all 12 transitions
    # under no_grad (μ♯ for the KL: no VJP), then 1 epoch × 4 minibatches of 3 rows through ε̂_θ with a graph: 12 VJPs
    ("grpo", None): (1 * 12, 4, 0), ("kl-pg", None): (1 * 12, 4, 0),
    # ReFL: one ε̂_θ call; DRaFT-2: the last 2 steps; both: r with a graph on the 4 outputs, whose value is also logged
    ("refl", None): (4, 4, 4), ("draft", None): (2 * 4, 4, 4),
}


@pytest.mark.parametrize("method, flow_target", list(EXPECTED_COST))
def test_cost_meter_counts_network_vjps_reward_calls_and_gradients(method, flow_target):
    torch.manual_seed(0)
    overrides = {"flow_target": flow_target, "guess_from": "policy" if flow_target == "bootstrap" else "reference"} if flow_target else {}
    cfg = td.Config(**{**TINY, **overrides})
    ft = td.make_finetuner(cfg, td.DigitDenoiser(hidden=32, depth=1).eval(), method)
    meter = dd.CostMeter()
    log_reward = meter.attach(ft.model, td.classifier_log_reward(tiny_classifier(), 3))
    schedule = ng.ddim_schedule(td.make_scheduler(), cfg.num_steps)
    logs = td.method_update(cfg, method, ft, schedule, log_reward, torch.Generator().manual_seed(0))
    assert math.isfinite(logs["reward"])
    counts = meter.take()
    assert (counts["network_vjps"], counts["reward_calls"], counts["reward_grads"]) == EXPECTED_COST[(method, flow_target)]
    assert meter.take() == {"network_vjps": 0, "reward_calls": 0, "reward_grads": 0}


def test_run_method_records_costs_and_time_to_bar_and_matches_toy_digits(tmp_path):
    # the smoke preset, every method: the record holds the costs and the time to the bar, and counting
    # changes nothing else (the same metrics and curves as toy_digits.run_method, bit for bit)
    cfg = td.Config(**{**td.PRESETS["smoke"], "cache": str(tmp_path), "method": ",".join(td.METHOD_NAMES), "threads": 1})
    setup = td.prepare(cfg)
    key, threshold = dd.progress_bar(setup)
    assert key == "frac_class" and threshold == pytest.approx(setup.metrics["reference"]["frac_class"] - 0.1)
    timing = {"seconds", "finetune_seconds", "train_seconds"}
    for method in td.METHOD_NAMES:
        result, x, history = dd.run_method(setup, method, progress=False)
        assert {"network_vjps_per_update", "reward_calls_per_update", "reward_grads_per_update", "seconds_per_update",
                "updates_to_bar", "seconds_to_bar", "diverged"} <= set(result)
        assert result["network_vjps_per_update"] > 0 and result["reward_calls_per_update"] >= max(1, result["reward_grads_per_update"])
        assert all({"network_vjps", "reward_calls", "reward_grads"} <= set(h) for h in history[1:])
        hit = next((h["update"] for h in history if h[key] >= threshold), None)
        assert result["updates_to_bar"] == hit
        plain, plain_x, plain_history = td.run_method(setup, method, progress=False)
        assert torch.equal(x, plain_x)
        assert {k: v for k, v in plain.items() if k not in timing} == {k: v for k, v in result.items() if k in plain and k not in timing}
        strip = lambda h: {k: v for k, v in h.items() if k not in timing | {"network_vjps", "reward_calls", "reward_grads"}}
        assert [strip(h) for h in history] == [strip(h) for h in plain_history]
