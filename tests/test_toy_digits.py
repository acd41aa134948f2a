"""Tests for toy_digits.py: the importance-reweighted reference, the rewards, the LoRA/g_φ wiring
into nabla_gfn's loss, the metrics, and a tiny end-to-end run in a subprocess."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nabla_gfn as ng
import toy_digits as td

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_denoiser() -> td.DigitDenoiser:
    return td.DigitDenoiser(hidden=32, depth=1)


def tiny_classifier() -> td.DigitClassifier:
    return td.DigitClassifier(width=32, feature_dim=16).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# The reference: self-normalised importance weights and their effective sample size
# ----------------------------------------------------------------------------------------------


def test_ess_of_known_weights():
    # Kish: (Σw)²/Σw². [2, 1, 1] → 16 / 6; scale-free; one-hot → 1.
    assert td.effective_sample_size(torch.tensor([2.0, 1.0, 1.0])) == pytest.approx(16 / 6)
    assert td.effective_sample_size(torch.tensor([0.5, 0.25, 0.25])) == pytest.approx(16 / 6)
    assert td.effective_sample_size(torch.tensor([0.0, 1.0, 0.0, 0.0])) == pytest.approx(1.0)


def test_importance_weights_self_normalise_and_tilt_by_reward():
    r = torch.randn(1000) * 3
    w = td.importance_weights(r, beta=0.7)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    # w_i ∝ exp(β r_i): log-weight differences equal β times reward differences
    log_w = w.log()
    assert torch.allclose(log_w - log_w[0], 0.7 * (r.double() - r[0].double()), atol=1e-8)


def test_beta_zero_gives_uniform_weights_and_full_ess():
    w = td.importance_weights(torch.randn(257) * 10, beta=0.0)
    assert torch.allclose(w, torch.full_like(w, 1 / 257))
    assert td.effective_sample_size(w) == pytest.approx(257)


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------


def test_class_reward_is_log_softmax():
    clf, x = tiny_classifier(), torch.randn(16, 1, 8, 8)
    traj = torch.arange(16)
    probs = torch.stack([td.classifier_log_reward(clf, k)(x, traj).exp() for k in range(10)], 1)
    assert torch.allclose(probs.sum(1), torch.ones(16), atol=1e-6)  # float32: 10 exp'd log-softmax terms, ≲ 10·eps32
    assert (probs > 0).all()


def test_class_reward_is_differentiable_and_ink_counts_dark_pixels():
    x = torch.randn(4, 1, 8, 8).clamp(-0.9, 0.9).requires_grad_(True)
    (grad,) = torch.autograd.grad(td.classifier_log_reward(tiny_classifier(), 3)(x, torch.arange(4)).sum(), x)
    assert grad.abs().sum() > 0
    full, empty = torch.ones(1, 1, 8, 8), -torch.ones(1, 1, 8, 8)
    assert float(td.ink_log_reward(full, torch.arange(1))) == 64.0
    assert float(td.ink_log_reward(empty, torch.arange(1))) == 0.0


def test_bad_reward_and_method_specs_are_rejected():
    for spec in ("class:10", "class:", "ink:3", "digits"):
        with pytest.raises(ValueError, match="--reward"):
            td.parse_reward(spec)
    for spec in ("nabla-db,ppo", "draft,draft", ""):
        with pytest.raises(ValueError, match="--method"):
            td.parse_methods(spec)
    assert td.parse_methods("draft, nabla-db,rtb") == ["draft", "nabla-db", "rtb"]


# ----------------------------------------------------------------------------------------------
# Wiring into nabla_gfn: P_F^θ (LoRA on), P_F^♯ (LoRA off), g_φ
# ----------------------------------------------------------------------------------------------


def finetuner(method: str = "nabla-db") -> td.Finetuner:
    cfg = td.Config(lora_rank=4, flow_hidden=16)
    return td.make_finetuner(cfg, tiny_denoiser().eval(), method)


def test_policy_equals_reference_at_init_and_adapters_switch():
    ft = finetuner()
    x, t, traj = torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,)), torch.arange(8)
    policy, reference = td.policy_eps_fn(ft.model), td.reference_eps_fn(ft.model)
    with torch.no_grad():
        before = reference(x, t, traj)
        assert torch.equal(policy(x, t, traj), before)
        for p in ft.lora_params:  # move the adapters: the policy moves, the reference must not
            p.add_(0.1 * torch.randn_like(p))
        assert not torch.allclose(policy(x, t, traj), before)
        assert torch.equal(reference(x, t, traj), before)
        assert not torch.allclose(policy(x, t, traj), before)  # adapters are back on after the reference call
    assert all(p.requires_grad for p in ft.lora_params)
    assert not any(p.requires_grad for n, p in ft.model.named_parameters() if "lora" not in n)


def test_flow_correction_is_zero_at_init_but_trainable():
    flow = td.FlowCorrection(hidden=16)
    x, t = torch.randn(5, 1, 8, 8), torch.randint(0, 1000, (5,))
    out = flow(x, t, torch.arange(5))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))
    (out * torch.randn_like(x)).sum().backward()  # the zeroed layer still receives a gradient
    assert flow.net[-1].weight.grad.abs().sum() > 0


def _transitions(ft: td.Finetuner, steps: int = 4, batch: int = 6):
    schedule = ng.ddim_schedule(td.make_scheduler(), steps)
    trajectory = ng.sample_trajectory(td.policy_eps_fn(ft.model), schedule, torch.randn(batch, 1, 8, 8))
    return ng.gather_transitions(trajectory, schedule, ng.subsample_steps(steps, 1.0, batch))


def test_loss_is_zero_at_init_for_a_constant_reward():
    # θ = ♯ and ∇r = 0 make every residual vanish: forward, reverse, terminal and trust region.
    ft = finetuner()
    batch = _transitions(ft)
    constant = lambda x0, traj: 0.0 * x0.flatten(1).sum(1) + 1.5
    loss, parts = ng.nabla_db_loss(
        batch, td.policy_eps_fn(ft.model), td.reference_eps_fn(ft.model), constant, ft.flow,
        ng.LossConfig(beta=1.0, trust_region=1.0, weighting="kl"),
    )
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-10)


def test_loss_trains_lora_and_flow_but_not_the_pretrained_weights():
    ft = finetuner()
    batch = _transitions(ft)
    reward = td.classifier_log_reward(tiny_classifier(), 3)
    loss, _ = ng.nabla_db_loss(batch, td.policy_eps_fn(ft.model), td.reference_eps_fn(ft.model), reward, ft.flow, ng.LossConfig())
    assert float(loss.detach()) > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ft.lora_params)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ft.flow.parameters())
    assert all(p.grad is None for n, p in ft.model.named_parameters() if "lora" not in n)


def test_draft_update_moves_only_the_adapters():
    cfg = td.Config(lora_rank=4, batch=4, num_steps=3, draft_k=2, draft_lr=1e-2)
    ft = td.make_finetuner(cfg, tiny_denoiser().eval(), "draft")
    frozen = {n: p.clone() for n, p in ft.model.named_parameters() if "lora" not in n}
    lora = [p.clone() for p in ft.lora_params]
    schedule = ng.ddim_schedule(td.make_scheduler(), cfg.num_steps)
    logs = td.method_update(cfg, "draft", ft, schedule, td.classifier_log_reward(tiny_classifier(), 3), torch.Generator().manual_seed(0))
    assert math.isfinite(logs["reward"])
    assert all(torch.equal(p, frozen[n]) for n, p in ft.model.named_parameters() if "lora" not in n)
    assert any(not torch.equal(a, b) for a, b in zip(lora, ft.lora_params))


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def test_weighted_metrics_reduce_to_plain_statistics_for_uniform_weights():
    # 100 > 64 samples: a full-rank covariance (κ ≈ 60). With fewer, sqrtm(Σ²) takes √ of the null space's
    # rounding (~√eps64·‖Σ‖ per eigenvalue), and FD(Σ, Σ) came out at −9e-7 for 40 samples.
    x = torch.randn(100, 1, 8, 8)
    w = td.uniform(100)
    # float64; cdist's ‖a‖² + ‖b‖² − 2a·b leaves d_ii ≈ √(eps64·‖x‖²) ≈ 1e-7 on the diagonal: ~1e-9 relative ≪ 1e-6.
    assert td.weighted_mean_pairwise_distance(x, w) == pytest.approx(float(torch.pdist(x.flatten(1).double()).mean()))
    mu, cov = td.weighted_gaussian(x.flatten(1), w)
    assert np.allclose(cov, np.cov(x.flatten(1).double().numpy(), rowvar=False))
    assert td.frechet_distance((mu, cov), (mu, cov)) == pytest.approx(0.0, abs=1e-9)  # float64: ~κ²·eps64·tr Σ ≈ 1e-10


def test_expected_distinct_nearest_digits():
    train = torch.eye(4).reshape(4, 1, 2, 2) * 10
    x = train[[0, 0, 1, 2]] + 0.1  # nearest digits 0, 0, 1, 2
    # all weight on one training digit → exactly one distinct; spread evenly on two → 2 − 2·(1/2)^n
    assert td.expected_distinct_nearest(x, torch.tensor([0.5, 0.5, 0.0, 0.0]), train, n=7) == pytest.approx(1.0)
    assert td.expected_distinct_nearest(x, torch.tensor([0.0, 0.5, 0.5, 0.0]), train, n=3) == pytest.approx(2 - 2 * 0.5**3)
    assert td.distinct_nearest(x, train) == 3


# ----------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------


def _run(args, tmp_path):
    cmd = [sys.executable, str(ROOT / "toy_digits.py"), *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_end_to_end_smoke_run_writes_every_output(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    methods = ",".join(td.METHOD_NAMES)
    proc = _run(["--preset", "smoke", "--method", methods, "--out", str(out), "--cache", str(cache), "--threads", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("config.json", "metrics.json", "figure.png", "pretrained_samples.npy", "reference_samples.npy"):
        assert (out / name).is_file(), name
    for method in td.METHOD_NAMES:
        assert (out / method / "samples.npy").is_file() and (out / method / "history.json").is_file(), method
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == methods and config["cache"] == str(cache)
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("reference", "pretrained", *td.METHOD_NAMES):
        assert {"mean_reward", "diversity_l2", "distinct_nearest_digits", "frac_class", "frechet_to_reference"} <= set(metrics[key])
    for method in td.METHOD_NAMES:
        assert {"diverged", "diversity_ratio", "train_seconds"} <= set(metrics[method])  # costs: test_digits_diagnostics
    assert 1 <= metrics["reference_ess"] <= config["reference_pool"]
    samples = np.load(out / "nabla-db" / "samples.npy")
    assert samples.shape == (config["eval_samples"], 1, 8, 8) and np.isfinite(samples).all()
    assert len(list(cache.iterdir())) == 2  # the denoiser and the classifier, cached by config


@pytest.mark.parametrize(
    "args, flag",
    [(["--reward", "class:12"], "--reward"), (["--method", "ppo"], "--method"), (["--gamma", "one"], "--gamma"),
     (["--preset", "huge"], "--preset"), (["--beta", "-1"], "--beta"), (["--draft-k", "0", "--method", "draft"], "--draft-k"),
     (["--flow-target", "td"], "--flow-target"), (["--adjoint-lambda", "0"], "--adjoint-lambda"),
     (["--guess-from", "oracle"], "--guess-from"), (["--flow-target", "mixed", "--no-use-flow"], "--flow-target"),
     (["--ppo-clip", "0"], "--ppo-clip"), (["--refl-start", "2"], "--refl-start"), (["--rtb-lr", "-1"], "--rtb-lr")],
)
def test_bad_flags_fail_with_one_line_naming_the_flag(args, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        td.parse_args(args)
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("toy_digits.py: error:") and flag in last


# ----------------------------------------------------------------------------------------------
# Every method: one update on a tiny config, its loss at its known zero (its cost: test_digits_diagnostics.py)
# ----------------------------------------------------------------------------------------------

TINY = dict(lora_rank=4, flow_hidden=16, batch=4, num_steps=3, subsample=1.0, draft_k=2)
CONSTANT = 1.5


def constant_reward(x0, traj):
    return 0.0 * x0.flatten(1).sum(1) + CONSTANT


def one_update(method: str, log_reward, **overrides):
    """A fresh tiny finetuner and one update of `method`; returns (cfg, finetuner, logs, LoRA before)."""
    cfg = td.Config(**{**TINY, **overrides})
    ft = td.make_finetuner(cfg, tiny_denoiser().eval(), method)
    before = [p.detach().clone() for p in ft.lora_params]
    schedule = ng.ddim_schedule(td.make_scheduler(), cfg.num_steps)
    logs = td.method_update(cfg, method, ft, schedule, log_reward, torch.Generator().manual_seed(0))
    return cfg, ft, logs, before


ALL_VARIANTS = [("nabla-db", {"flow_target": t}) for t in ng.FLOW_TARGET_CHOICES] + [
    ("nabla-db", {"flow_target": "bootstrap", "guess_from": "policy"})] + [(m, {}) for m in td.METHOD_NAMES[1:]]


@pytest.mark.parametrize("method, overrides", ALL_VARIANTS)
def test_each_method_moves_only_the_adapters_on_the_classifier_reward(method, overrides):
    _, ft, logs, before = one_update(method, td.classifier_log_reward(tiny_classifier(), 3), **overrides)
    assert math.isfinite(logs["reward"]) and logs["grad_norm_policy"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, ft.lora_params))
    assert all(p.grad is None or "lora" in n for n, p in ft.model.named_parameters())


@pytest.mark.parametrize("method, overrides", ALL_VARIANTS)
def test_each_method_has_zero_gradient_at_init_for_a_constant_reward(method, overrides):
    # θ = ♯ (LoRA B = 0) and a constant reward are every method's fixed point or stationary point:
    # ∇-DB / adjoint matching: every residual and target is 0; RTB: log Z starts at log-mean-exp β r = β c
    # and Σ log P_F^θ = Σ log P_F♯, so each trajectory's residual is 0; DDPO: all advantages are 0, so the
    # PPO loss and its gradient vanish at ratio 1; DRaFT, ReFL: ∇r = 0.
    _, ft, logs, before = one_update(method, constant_reward, **overrides)
    assert logs["grad_norm_policy"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, ft.lora_params))  # AdamW's step on a zero gradient is 0
    if method in ("nabla-db", "adjoint-matching", "rtb", "ddpo"):
        assert logs["loss"] == pytest.approx(0.0, abs=1e-12)  # RTB: (log Z − βc)² ≲ (5e-7)², see below; the others: 0 by construction
    if method == "rtb":
        assert logs["log_z"] == pytest.approx(CONSTANT, abs=1e-6)  # float32 logsumexp, then − log B: ≲ 2 ulps of 2.9
    if method == "ddpo":
        assert logs["clip_fraction"] == 0.0


def test_rtb_learns_log_z_and_ddpo_clips_after_the_first_minibatch():
    # limits that must move: RTB's log Z follows the residual; DDPO's ratio leaves [1 − ε, 1 + ε] once θ moves
    reward = td.classifier_log_reward(tiny_classifier(), 3)
    _, _, logs, _ = one_update("rtb", reward)
    assert math.isfinite(logs["log_z"]) and logs["loss"] > 0
    _, _, logs, _ = one_update("ddpo", reward, ppo_minibatches=3, ddpo_lr=1e-2)
    assert 0.0 < logs["clip_fraction"] < 1.0


def test_divergence_is_relative_to_the_pretrained_samples():
    pretrained = torch.rand(10, 1, 8, 8) * 2 - 1
    assert not td.diverged(pretrained.clone(), pretrained)
    assert td.diverged(pretrained * 100, pretrained)
    assert td.diverged(torch.full_like(pretrained, float("nan")), pretrained)


def test_presets_paper_and_bootstrap_restore_the_papers_flow():
    paper = td.parse_args(["--preset", "paper"])
    assert (paper.flow_target, paper.guess_from, paper.weighting, paper.gamma, paper.reverse_weight) == (
        "bootstrap", "policy", "plain", "alpha_bar", 1.0)
    default = td.parse_args([])
    assert (default.flow_target, default.guess_from, default.flow_lr, default.method) == ("adjoint", "reference", 5e-4, "nabla-db")
    # θ fits guess + g_φ here (the control variate, the toy's default, costs digits the learned flow's lead)
    assert not td.method_config(default, "nabla-db").loss.control_variate
    assert td.method_config(td.parse_args(["--control-variate"]), "nabla-db").loss.control_variate
    assert not td.method_config(td.parse_args(["--preset", "paper", "--control-variate"]), "nabla-db").loss.control_variate


def test_config_validates_on_construction_and_flags_override_the_preset():
    # the same checks as the flags (cli.validate + the cross-field ones) hold for a Config built in code
    for fields, flag in (({"method": "draft", "draft_k": 0}, "--draft-k"), ({"beta": -1.0}, "--beta"),
                         ({"flow_target": "mixed", "use_flow": False}, "--flow-target"), ({"gamma": "one"}, "--gamma")):
        with pytest.raises(ValueError, match=flag):
            td.Config(**fields)
    smoke = td.parse_args(["--preset", "smoke", "--updates", "3"])
    assert (smoke.preset, smoke.updates, smoke.batch, smoke.hidden) == ("smoke", 3, 4, 64)
    assert td.parse_args([]) == td.Config()
