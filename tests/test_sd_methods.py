"""Every --method of sd_finetune.py (the registry's, baselines.METHODS) on the tiny random pipeline, CPU, offline.

One in-process smoke run per method listed in --help (2 trajectories of 2 steps: seconds each); the
∇-DB methods' numbers are pinned by tests/test_sd_finetune.py, which runs the default nabla-db.
"""

import dataclasses
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import baselines
import nabla_gfn
import sd_finetune as sd
from cli import UsageError
from conftest import assert_lora_moves_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py

FAST = ["--steps", "2", "--trajectories-per-epoch", "2", "--sample-batch-size", "2", "--transitions-per-update", "2",
        "--ppo-minibatches", "2", "--grid-prompts", "1", "--grid-seeds", "1"]


@pytest.fixture(scope="module")
def cache(tiny_sd_cache):
    return tiny_sd_cache  # conftest.py: built once for every SD test file


def help_methods(capsys):
    """The --method choices as --help prints them."""
    with pytest.raises(SystemExit):
        sd.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    return re.search(r"--method \{([^}]*)\}", text).group(1).split(",")


def test_help_lists_every_registry_method_but_rtb(capsys):
    """rtb is left out (its learned log Z is not checkpointed); the rest are the registry's, default nabla-db."""
    assert help_methods(capsys) == [m for m in baselines.METHODS if m != "rtb"] == list(sd.METHODS)
    assert sd.Config.__dataclass_fields__["method"].default == "nabla-db"
    with pytest.raises(SystemExit):  # argparse's one-line "invalid choice"
        sd.parse_config(["--method", "rtb"])


def test_the_documented_command_runs_offline(cache, tmp_path):
    """The bar, as a user types it: `python sd_finetune.py --preset smoke --method M --out D` (here M = grpo)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NABLA_GFN_CACHE": str(cache)}
    done = subprocess.run([sys.executable, str(root / "sd_finetune.py"), "--preset", "smoke", "--method", "grpo",
                           "--out", str(tmp_path / "grpo")], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]) and rows[0]["optimizer_steps"] == 4
    assert (tmp_path / "grpo" / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors").is_file()


def test_two_process_baseline_keeps_the_replicas_in_sync(cache, tmp_path):
    """accelerate, 2 CPU processes, GRPO: the run's backward all-reduces the gradients inside each of the
    registry's optimiser steps, so the checkpoint's replica check (identical weights) passes; one log line."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NABLA_GFN_CACHE": str(cache),
           "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(root)}
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", str(port)]
    out = tmp_path / "two"
    done = subprocess.run([sys.executable, *launcher, str(root / "sd_finetune.py"), "--preset", "smoke", "--method", "grpo",
                           "--out", str(out)], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["derived"]["processes"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors").is_file()


def run_method(method, cache, out, monkeypatch, *flags):
    """sd.main on --preset smoke with FAST sizes; returns (metrics rows, the Trainees the run built)."""
    trainees = []

    def spy(*args, **kwargs):
        trainees.append((args, sd_method_trainee(*args, **kwargs)))
        return trainees[-1][1]

    sd_method_trainee = sd.method_trainee
    monkeypatch.setattr(sd, "method_trainee", spy)
    sd.main(["--preset", "smoke", "--cache-dir", str(cache), "--out", str(out), "--method", method, *FAST, *flags])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, trainees


@pytest.mark.parametrize("method", sd.METHODS)
def test_every_method_trains_the_lora(method, cache, tmp_path, monkeypatch):
    """The run finishes, logs finite numbers with a loss, saves a checkpoint whose LoRA B (0 at init) moved;
    the other methods build one Trainee per epoch, without g_φ."""
    from safetensors.torch import load_file

    out = tmp_path / method
    rows, trainees = run_method(method, cache, out, monkeypatch)
    assert rows and all(r["epoch"] == 0 for r in rows)
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert all("loss" in r and "grad_norm_policy" in r for r in rows)
    lora = load_file(out / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors")
    up = [v for k, v in lora.items() if "lora.up" in k or "lora_B" in k]
    assert up and any(v.abs().max() > 0 for v in up)
    assert (out / "checkpoints" / "epoch_0001" / "flow").is_dir() == (method == "nabla-db")
    saved = json.loads((out / "config.json").read_text())["config"]
    assert saved["method"] == method and saved["no_flow"] == (method != "nabla-db")
    if method in sd.NABLA_DB_METHODS:
        assert trainees == []
    else:
        assert len(trainees) == 1 and set(trainees[0][1].groups) == {"policy"}


def test_grpo_groups_are_the_prompts(cache, tmp_path, monkeypatch):
    """GRPO's batch: --images-per-prompt trajectories of each drawn prompt; row b's prompt embedding, text
    and group id (the prompt's index) agree, and baselines.trajectory_groups sees those groups."""
    rows, trainees = run_method("grpo", cache, tmp_path / "grpo", monkeypatch, "--trajectories-per-epoch", "4")
    (models, schedule, cond, prompts, groups, *_), trainee = trainees[0]
    assert groups.tolist() == [groups[0].item()] * 2 + [groups[2].item()] * 2
    assert prompts == [sd.ANIMALS[i] for i in groups.tolist()]
    torch.testing.assert_close(cond, sd.encode_prompts(models.pipe, prompts), rtol=0, atol=0)
    assert baselines.trajectory_groups(trainee, 4).tolist() == groups.tolist()
    assert trainee.group_of(torch.tensor([3, 0])).tolist() == [groups[3].item(), groups[0].item()]
    assert rows[0]["optimizer_steps"] == 2  # --ppo-epochs 1 × --ppo-minibatches 2


def test_lora_of_a_baseline_loads_into_a_pipeline(cache, tmp_path, monkeypatch):
    """A DRaFT-K run's checkpoint is a plain diffusers LoRA folder: pipe.load_lora_weights moves the UNet."""
    out = tmp_path / "draft"
    run_method("draft", cache, out, monkeypatch, "--draft-k", "2", "--draft-kl", "0.1")
    assert_lora_moves_unet(cache, out / "checkpoints" / "epoch_0001")


def test_old_flags_are_the_registry_methods():
    """--no-flow [--flow-target adjoint] is --method no-flow / adjoint-matching, whose meaning is the registry's
    loss_overrides; the default stays the paper's ∇-DB loss with g_φ."""
    default = sd.parse_config([])
    assert default.method == "nabla-db" and not default.no_flow and not default.needs_adjoint
    assert default.loss_config() == nabla_gfn.LossConfig(beta=1e4, trust_region=2e3)
    for old, method in ((["--no-flow"], "no-flow"), (["--no-flow", "--flow-target", "adjoint"], "adjoint-matching")):
        cfg, new = sd.parse_config(old), sd.parse_config(["--method", method])
        assert cfg == new and cfg.method == method and cfg.no_flow
        overrides = baselines.METHODS[method].loss_overrides
        assert {k: getattr(cfg.loss_config(), k) for k in overrides} == overrides
        assert cfg.needs_adjoint == (method == "adjoint-matching")
    assert sd.parse_config(["--flow-target", "adjoint"]).loss_config().use_flow  # ∇-DB with the adjoint target
    ddpo = sd.parse_config(["--method", "ddpo", "--flow-target", "adjoint"])
    assert ddpo.no_flow and not ddpo.needs_adjoint  # no g_φ, no sweep for the other methods


def test_method_config_maps_every_hyper_parameter():
    cfg = sd.parse_config(["--method", "grpo", "--draft-k", "3", "--draft-kl", "0.5", "--refl-start", "0.5",
                           "--ppo-clip", "0.2", "--ppo-epochs", "2", "--ppo-minibatches", "8", "--ppo-adv-clip", "3",
                           "--grpo-kl", "0.01", "--beta", "7", "--max-grad-norm", "0.5"])
    hp = sd.method_config(cfg, 16)
    assert dataclasses.asdict(hp) == dataclasses.asdict(baselines.MethodConfig(
        beta=7.0, batch_size=16, fraction=0.1, grad_clip=0.5, loss=cfg.loss_config(), draft_k=3, draft_kl=0.5,
        refl_start=0.5, ppo_clip=0.2, ppo_epochs=2, ppo_minibatches=8, ppo_adv_clip=3.0, kl_coef=0.01,
        micro_batch=2, sample_batch=8))  # --train-batch-size, --sample-batch-size
    defaults = sd.method_config(sd.parse_config([]), 1)  # the SD papers' settings (docs/stable_diffusion.md)
    assert (defaults.draft_k, defaults.draft_kl, defaults.refl_start) == (1, 0.0, 0.75)
    assert (defaults.ppo_clip, defaults.ppo_epochs, defaults.ppo_adv_clip, defaults.kl_coef) == (1e-4, 1, 5.0, 0.04)


def test_bad_method_sizes_fail_in_one_line():
    with pytest.raises(UsageError, match="--draft-k"):
        sd.parse_config(["--steps", "4", "--draft-k", "5"])
    cfg = sd.parse_config(["--method", "grpo", "--trajectories-per-epoch", "6", "--images-per-prompt", "4"])
    with pytest.raises(UsageError, match="--images-per-prompt"):
        sd.make_plan(cfg, 1)
    # One update per epoch on all its trajectories: ∇-DB's --transitions-per-update (64 > 6·6) does not apply.
    assert sd.make_plan(dataclasses.replace(cfg, images_per_prompt=3), 2) == sd.Plan(3, 50, 1, 1)
    with pytest.raises(UsageError, match="--transitions-per-update"):
        sd.make_plan(dataclasses.replace(cfg, method="nabla-db"), 1)
    sd.make_plan(dataclasses.replace(cfg, method="nabla-db", transitions_per_update=6), 1)  # no --images-per-prompt


@pytest.mark.parametrize("method", ["ddpo", "grpo"])
def test_a_resumed_baseline_run_equals_the_uninterrupted_one(method, cache, tmp_path):
    """Two epochs straight vs one epoch then --resume --epochs 2: the same metrics and LoRA bit for bit (the
    baselines' state is the LoRA, AdamW and the generators, which checkpoints hold)."""
    from safetensors.torch import load_file

    flags = ["--preset", "smoke", "--cache-dir", str(cache), "--method", method, *FAST, "--grid-every", "5"]
    sd.main([*flags, "--out", str(tmp_path / "straight"), "--epochs", "2"])
    sd.main([*flags, "--out", str(tmp_path / "split"), "--epochs", "1"])
    sd.main(["--resume", str(tmp_path / "split"), "--epochs", "2"])
    logs = [[{k: v for k, v in json.loads(line).items() if not k.endswith("_seconds")}
             for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("straight", "split")]
    assert logs[0] == logs[1] and [r["update"] for r in logs[0]] == [1, 2]
    weights = [load_file(tmp_path / run / "checkpoints" / "epoch_0002" / "pytorch_lora_weights.safetensors")
               for run in ("straight", "split")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
