"""Tests of sd_finetune.py on the tiny random pipeline (`--model tiny`), CPU only, offline.

Subprocess runs check what a user sees (outputs, resume, accelerate, one-line errors); in-process
tests check the wiring against nabla_gfn with independently written callables.
"""

import copy
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nabla_gfn
from conftest import assert_lora_moves_unet, shuffled_transitions
import sd_finetune as sd
import sd_models as sdm

ROOT = Path(__file__).resolve().parents[1]  # conftest.py puts it on sys.path and sets HF_HUB_OFFLINE=1

SCRIPT = str(ROOT / "sd_finetune.py")
TIME_KEYS = ("update_seconds", "elapsed_seconds")
MEMORY_FLAGS = ("--gradient-checkpointing", "--reward-chunk", "1")  # the default run's, off in --preset smoke


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def cache(tiny_sd_cache):
    return tiny_sd_cache  # conftest.py: built once for both SD test files


@pytest.fixture(scope="module")
def env(cache):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NABLA_GFN_CACHE": str(cache),
            "PYTHONPATH": str(ROOT)}


def run_script(args, env, launcher=(), timeout=300):
    return subprocess.run([sys.executable, *launcher, SCRIPT, *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path, drop=TIME_KEYS):
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in Path(path).read_text().splitlines()]


def smoke_config(cache, out, *flags):
    return sd.parse_config(["--preset", "smoke", "--cache-dir", str(cache), "--out", str(out), *flags])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, env):
    """`--preset smoke --eval`: one epoch (2 updates) of the tiny pipeline, then evaluation, with the
    default run's memory settings (the smoke preset turns them off)."""
    out = tmp_path_factory.mktemp("runs") / "smoke"
    result = run_script(["--preset", "smoke", "--eval", "--out", out, *MEMORY_FLAGS], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


# ----------------------------------------------------------------------------------------------
# End to end (subprocesses)
# ----------------------------------------------------------------------------------------------


def test_one_epoch_writes_every_output(smoke_run, cache):
    out, result = smoke_run
    assert "tiny randomly initialised pipeline for smoke tests" in result.stdout

    saved = json.loads((out / "config.json").read_text())
    assert saved["config"]["model"] == "tiny" and saved["config"]["reward"] == "aesthetic"
    assert saved["config"]["gradient_checkpointing"] and saved["config"]["reward_chunk"] == 1  # MEMORY_FLAGS
    assert saved["derived"] == {"trajectories": 4, "transitions_per_trajectory": 2, "grad_accum": 2,
                                "updates_per_epoch": 2, "processes": 1, "weight_dtype": "torch.float32",
                                "sampling_autocast": "none"}

    metrics = read_jsonl(out / "metrics.jsonl", drop=())
    assert [m["update"] for m in metrics] == [1, 2]
    expected = {"update", "epoch", "reward_mean", "reward_std", "loss", "forward", "reverse", "terminal",
                "trust_region", "reward_next", "grad_norm_policy", "grad_norm_flow", *TIME_KEYS}
    for m in metrics:
        assert expected <= set(m), expected - set(m)
        assert all(torch.isfinite(torch.tensor(float(v))) for v in m.values())
    assert metrics[0]["forward"] > 0 and metrics[0]["grad_norm_policy"] > 0

    samples = read_jsonl(out / "trajectories.jsonl")
    assert len(samples) == 4 and all(s["prompt"] in sd.ANIMALS for s in samples)

    from PIL import Image

    for name in ("epoch_0000.png", "epoch_0001.png"):
        assert Image.open(out / "samples" / name).size == (2 * 32, 2 * 32)  # 2 prompts × 2 seeds of 32²

    checkpoint = out / "checkpoints" / "epoch_0001"
    for name in ("pytorch_lora_weights.safetensors", "flow/config.json", "flow/diffusion_pytorch_model.safetensors",
                 "training_state.pt"):
        assert (checkpoint / name).is_file(), name
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert (state["epoch"], state["update"], state["num_processes"]) == (1, 2, 1)
    assert state["optimizer"]["state"] and len(state["rng"]) == 1

    check_eval_json(out / "eval.json")


def check_eval_json(path):
    """Every metric present and finite (the tiny builds use the DreamSim and FID stand-ins)."""
    evaluation = json.loads(path.read_text())
    for key in ("reward_mean", "reward_std", "reward_mean_pretrained", "dreamsim_diversity",
                "dreamsim_diversity_pretrained", "prior_fid", "clip_diversity", "clip_diversity_pretrained",
                "clip_prior_frechet"):
        assert torch.isfinite(torch.tensor(evaluation[key])), key
    assert evaluation["unavailable"] == {} and "stand-in" in evaluation["metric_models"]["dreamsim"]
    assert evaluation["prompts"] == len(sd.EVAL_ANIMALS) == len(evaluation["per_prompt"])
    assert evaluation["samples_per_prompt"] == 2
    return evaluation


def test_resume_after_interruption_reproduces_the_uninterrupted_run(smoke_run, env, tmp_path):
    interrupted = tmp_path / "interrupted"
    shutil.copytree(smoke_run[0], interrupted)  # stopped after epoch 1's checkpoint
    with open(interrupted / "metrics.jsonl", "a") as f:  # an update logged after the checkpoint, then lost
        f.write(json.dumps({"update": 3, "epoch": 1, "loss": 123.0}) + "\n")
    resumed = run_script(["--resume", interrupted, "--epochs", 2], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_script(["--preset", "smoke", "--epochs", 2, "--out", tmp_path / "straight", *MEMORY_FLAGS], env)
    assert straight.returncode == 0, straight.stderr[-3000:]

    metrics = read_jsonl(interrupted / "metrics.jsonl")
    assert [m["update"] for m in metrics] == [1, 2, 3, 4]
    assert metrics == read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    assert read_jsonl(interrupted / "trajectories.jsonl") == read_jsonl(tmp_path / "straight" / "trajectories.jsonl")
    from safetensors.torch import load_file

    lora = [load_file(d / "checkpoints" / "epoch_0002" / "pytorch_lora_weights.safetensors")
            for d in (interrupted, tmp_path / "straight")]
    assert lora[0].keys() == lora[1].keys() and all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])


def test_two_process_accelerate_run(env, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--main_process_port", str(port))
    out = tmp_path / "two"
    result = run_script(["--preset", "smoke", "--out", out], {**env, "ACCELERATE_USE_CPU": "1"}, launcher)
    assert result.returncode == 0, result.stderr[-3000:]

    assert json.loads((out / "config.json").read_text())["derived"]["processes"] == 2
    assert len(read_jsonl(out / "metrics.jsonl")) == 2  # one writer: each update logged once
    samples = read_jsonl(out / "trajectories.jsonl")
    per_rank = {r: [(s["prompt"], s["reward"]) for s in samples if s["rank"] == r] for r in (0, 1)}
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert per_rank[0] != per_rank[1]  # seed + rank: each process samples its own trajectories
    # save_checkpoint checks that both processes hold identical weights (synchronised gradients)
    assert (out / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("reward", ["hpsv2", "pickscore", "imagereward", "clip-score"])
def test_smoke_eval_runs_with_every_reward(reward, cache, tmp_path, capsys):
    """`--preset smoke --reward R --eval` on the tiny builds of each reward (aesthetic: smoke_run)."""
    sd.main(["--preset", "smoke", "--reward", reward, "--eval", "--cache-dir", str(cache), "--out", str(tmp_path / "run")])
    assert "eval: reward_mean=" in capsys.readouterr().out
    evaluation = check_eval_json(tmp_path / "run" / "eval.json")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["reward"] == reward
    assert evaluation["reward_mean"] != evaluation["reward_mean_pretrained"]  # the 2 updates moved the samples


def test_report_to_tensorboard_writes_the_loss_parts_and_reward(cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    sd.main(["--preset", "smoke", "--report-to", "tensorboard", "--cache-dir", str(cache), "--out", str(out)])
    events = list((out / "sd_finetune").glob("events.out.tfevents.*"))
    assert events, list(out.iterdir())
    accumulator = EventAccumulator(str(out / "sd_finetune"))
    accumulator.Reload()
    metrics = read_jsonl(out / "metrics.jsonl")
    for tag in ("loss", "forward", "reverse", "terminal", "trust_region", "reward_mean", "grad_norm_policy"):
        logged = accumulator.Scalars(tag)
        assert [e.step for e in logged] == [1, 2], tag
        # TensorBoard stores float32: one rounding, 2⁻²⁴ ≈ 6e-8 relative, well inside 1e-5.
        assert [e.value for e in logged] == pytest.approx([m[tag] for m in metrics], rel=1e-5), tag


def test_missing_hub_weights_offline_give_one_line(env, tmp_path):
    result = run_script(["--out", tmp_path / "run", "--allow-cpu"], {**env, "NABLA_GFN_MODEL": sd.SD15_HUB_ID})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert sd.SD15_HUB_ID in lines[0] and "--model" in lines[0] and "NABLA_GFN_MODEL" in lines[0]


def test_bad_flag_gives_one_line_without_traceback(env):
    result = run_script(["--reward", "nope"], env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sd_finetune.py: error: argument --reward: invalid choice: 'nope' (choose from 'aesthetic', 'hpsv2', "
        "'pickscore', 'imagereward', 'clip-score')"
    ]


# ----------------------------------------------------------------------------------------------
# Errors (in process)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, names", [
    (["--beta", "-1"], ["--beta", "> 0"]),
    (["--beta", "inf"], ["--beta", "finite"]),
    (["--precision", "fp8"], ["--precision", "bf16", "fp32"]),
    (["--gamma", "ones"], ["--gamma", "alpha_bar", "sqrt_alpha_bar"]),
    (["--subsample-fraction", "1.5"], ["--subsample-fraction", "[0, 1]"]),
    (["--flow-channels", "48,x"], ["--flow-channels", "multiples of 32"]),
    (["--steps", "two"], ["--steps", "invalid int"]),
    (["--adam-beta2", "1"], ["--adam-beta2", "(0, 1)"]),
    (["--prompts", "/no/such/file.txt"], ["--prompts", "no such file"]),
    (["--resume", "/no/such/run"], ["--resume", "no config.json"]),
    (["--flow-target", "td"], ["--flow-target", "bootstrap", "adjoint", "mixed"]),
    (["--adjoint-lambda", "0"], ["--adjoint-lambda", "(0, 1]"]),
    (["--adjoint-lambda", "1.5"], ["--adjoint-lambda", "(0, 1]"]),
    (["--adjoint-jacobian", "full"], ["--adjoint-jacobian", "guided", "unguided"]),
    (["--guess-from", "prior"], ["--guess-from", "policy", "reference"]),
    (["--no-flow", "--flow-target", "mixed"], ["--flow-target mixed", "--no-flow", "bootstrap", "adjoint"]),
])
def test_bad_flag_values_give_one_line_naming_the_flag(flags, names, capsys):
    with pytest.raises(SystemExit) as exit_:
        sd.main(flags)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sd_finetune.py: error:")
    assert all(name in err[0] for name in names), err[0]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_report_to_wandb_without_the_package_gives_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        sd.main(["--preset", "smoke", "--report-to", "wandb", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sd_finetune.py: error: --report-to wandb needs the wandb package: pip install wandb"]


@pytest.mark.parametrize("flags, names", [
    (["--model", "/no/such/pipeline"], ["/no/such/pipeline", "--model", "NABLA_GFN_MODEL"]),
    (["--aesthetic-head", "/no/such/head.pth"], ["/no/such/head.pth", "--aesthetic-head", "NABLA_GFN_AESTHETIC_HEAD"]),
    (["--reward", "clip-score", "--clip-model", "/no/such/clip"], ["/no/such/clip", "--clip-model", "NABLA_GFN_CLIP"]),
])
def test_missing_weights_give_one_line_naming_the_remedy(flags, names, cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        sd.main(["--preset", "smoke", "--cache-dir", str(cache), "--out", str(tmp_path / "run"), "--allow-cpu", *flags])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(name in err[0] for name in names), err


def test_nonfinite_reward_stops_the_run_after_saving(cache, tmp_path, capsys, monkeypatch):
    class NanReward(torch.nn.Module):
        def forward(self, images, prompts):
            return images.mean((1, 2, 3)) * float("nan")

    monkeypatch.setattr(sd, "build_reward", lambda cfg, embedder: NanReward())
    with pytest.raises(SystemExit) as exit_:
        sd.main(["--preset", "smoke", "--cache-dir", str(cache), "--out", str(tmp_path / "run")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]  # after the sampling bar
    assert len(errors) == 1 and "Traceback" not in err
    assert "non-finite reward" in errors[0] and "stopped_update_000001" in errors[0]
    assert (tmp_path / "run" / "checkpoints" / "stopped_update_000001" / "pytorch_lora_weights.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# Wiring against nabla_gfn (in process)
# ----------------------------------------------------------------------------------------------


def perturbed_models(cfg, seed=0):
    """Tiny models with a non-zero LoRA and g_φ, so that every loss term is non-trivial."""
    models = sd.load_models(cfg, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sd.lora_parameters(models.unet):
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
        if models.flow is not None:
            models.flow.conv_out.weight.copy_(0.05 * torch.randn(models.flow.conv_out.weight.shape, generator=generator))
    return models


def pretrained_unet(cache):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(Path(cache) / "tiny-v1" / "pipeline", subfolder="unet").requires_grad_(False)


def test_transition_loss_equals_nabla_gfn_with_independent_callables(cache, tmp_path):
    """The driver's callables (one batched UNet call for guidance, adapters disabled for P_F♯, rows
    routed to their own prompt) give exactly nabla_gfn's loss with plainly written callables: separate
    conditional/unconditional UNet calls, a separately loaded pretrained UNet, prompts looked up by hand."""
    cfg = smoke_config(cache, tmp_path, "--reward", "clip-score", "--trust-region", "10")
    models = perturbed_models(cfg)
    reference_unet = pretrained_unet(cache)
    prompts = ["cat", "owl", "zebra"]
    batch, cond = shuffled_transitions(models, cfg, prompts)
    w, uncond = cfg.guidance_scale, models.uncond

    def plain_eps(unet):
        def eps(x, t, traj):
            e_u = unet(x, t, encoder_hidden_states=uncond.expand(len(x), -1, -1)).sample
            e_c = unet(x, t, encoder_hidden_states=cond[traj]).sample
            return e_u + w * (e_c - e_u)
        return eps

    def plain_reward(x0, traj):
        images = models.pipe.vae.decode(x0 / models.pipe.vae.config.scaling_factor).sample
        return models.reward(images, [prompts[i] for i in traj.tolist()])

    def plain_flow(x, t, traj):
        return models.flow(x, t, encoder_hidden_states=cond[traj]).sample

    oracle = (plain_eps(models.unet), plain_eps(reference_unet), plain_reward, plain_flow)
    driver = sd.loss_callables(models, cond, prompts, w)
    for rows in [torch.arange(len(batch)), *torch.arange(len(batch))[:, None]]:  # the batch, then each transition
        loss, parts = nabla_gfn.nabla_db_loss(batch.select(rows), *driver, cfg.loss_config())
        expected, expected_parts = nabla_gfn.nabla_db_loss(batch.select(rows), *oracle, cfg.loss_config())
        # float32 UNet in other batch shapes (guidance batched vs separate calls): ~eps32 per layer, through the squares.
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=0)
        for key in parts:
            torch.testing.assert_close(parts[key], expected_parts[key], rtol=1e-4, atol=1e-7)
    assert all(parts[k] > 0 for k in ("forward", "reverse", "trust_region")) and batch.is_terminal.any()


def test_guess_from_reaches_the_loss(cache, tmp_path):
    """--guess-from (default policy, the paper's) is passed to nabla_gfn's LossConfig: with a non-zero LoRA
    the forward term differs between the policy's and the frozen reference's x̂_0."""
    cfg = smoke_config(cache, tmp_path, "--reward", "clip-score")
    ref = smoke_config(cache, tmp_path, "--reward", "clip-score", "--guess-from", "reference")
    assert (cfg.loss_config().guess_from, ref.loss_config().guess_from) == ("policy", "reference")
    models = perturbed_models(cfg)
    batch, cond = shuffled_transitions(models, cfg, ["cat", "owl"])
    callables = sd.loss_callables(models, cond, ["cat", "owl"], cfg.guidance_scale)
    parts = [nabla_gfn.nabla_db_loss(batch, *callables, c.loss_config())[1] for c in (cfg, ref)]
    assert parts[0]["forward"] != parts[1]["forward"]
    assert parts[0]["trust_region"] == parts[1]["trust_region"]  # only the guess changed


def test_each_trajectory_reward_gets_its_own_prompt(cache, tmp_path):
    """Every reward call nabla_db_loss makes (terminal rows, forward-looking guesses on subsets of
    rows) receives, row by row, the prompt of that row's trajectory. (One reward call per log-reward
    call: --reward-chunk 0; chunks route alike, test_sd_memory_flags.py.)"""
    cfg = smoke_config(cache, tmp_path, "--reward", "clip-score", "--reward-chunk", "0")
    models = perturbed_models(cfg)
    prompts = ["cat", "owl", "zebra", "frog"]
    batch, cond = shuffled_transitions(models, cfg, prompts)
    seen_prompts, seen_traj, clip_score = [], [], models.reward

    class RecordingReward(torch.nn.Module):
        def forward(self, images, row_prompts):
            seen_prompts.append(list(row_prompts))
            return clip_score(images, row_prompts)

    models.reward = RecordingReward()
    policy_eps, reference_eps, log_reward, flow = sd.loss_callables(models, cond, prompts, cfg.guidance_scale)

    def recording_log_reward(x0, traj):
        seen_traj.append(traj.tolist())
        return log_reward(x0, traj)

    nabla_gfn.nabla_db_loss(batch, policy_eps, reference_eps, recording_log_reward, flow, cfg.loss_config())
    assert len(seen_prompts) == len(seen_traj) >= 3  # guess at x, terminal rows, guesses at x'
    for row_prompts, traj in zip(seen_prompts, seen_traj):
        assert row_prompts == [prompts[i] for i in traj]
    assert any(len(set(p)) > 1 and len(p) < len(batch) for p in seen_prompts)  # mixed subsets were scored


def test_saved_lora_loads_into_a_pipeline_and_reproduces_the_unet(cache, tmp_path):
    """save_checkpoint's LoRA, loaded with pipe.load_lora_weights(dir), gives the finetuned UNet's
    outputs (alpha ≠ rank so that a lost scale would show), and not the pretrained ones."""
    from diffusers import StableDiffusionPipeline

    cfg = smoke_config(cache, tmp_path, "--lora-alpha", "16")
    models = perturbed_models(cfg)
    optimizer = sd.make_optimizer(models, cfg)
    path = sd.save_checkpoint(tmp_path / "ckpt", models, optimizer, [torch.Generator()], 0, 0, sd.Accelerator())

    pipe = StableDiffusionPipeline.from_pretrained(Path(cache) / "tiny-v1" / "pipeline")
    pretrained = copy.deepcopy(pipe.unet)
    pipe.load_lora_weights(path)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 4, 4, generator=generator)
    t = torch.tensor([900, 500, 20])
    context = torch.randn(3, 77, 32, generator=generator)
    with torch.no_grad():
        finetuned, loaded, base = (unet(x, t, encoder_hidden_states=context).sample
                                   for unet in (models.unet, pipe.unet, pretrained))
    # float32 UNet; diffusers' loader may apply the alpha/rank scale in another order: a few eps32 per LoRA layer.
    torch.testing.assert_close(loaded, finetuned, rtol=1e-5, atol=1e-5)
    assert (finetuned - base).abs().max() > 1e-2


def test_reference_policy_is_the_pretrained_unet(cache, tmp_path):
    """P_F♯ (adapters disabled) equals the UNet as loaded; P_F^θ differs once the LoRA is non-zero;
    and the adapters are back on afterwards."""
    cfg = smoke_config(cache, tmp_path)
    models = perturbed_models(cfg)
    cond = sd.encode_prompts(models.pipe, ["cat", "dog"])
    x, t, traj = torch.randn(2, 4, 4, 4), torch.tensor([700, 100]), torch.tensor([1, 0])
    with torch.no_grad():
        reference = sdm.guided_eps(models.unet, cond, models.uncond, 5.0, lora=False)(x, t, traj)
        policy = sdm.guided_eps(models.unet, cond, models.uncond, 5.0, lora=True)(x, t, traj)
        expected = sdm.guided_eps(pretrained_unet(cache), cond, models.uncond, 5.0)(x, t, traj)
    # float32, the same weights through peft's disabled-adapter path vs the plain module: a few eps32 at most.
    torch.testing.assert_close(reference, expected, rtol=1e-5, atol=1e-6)
    assert (policy - reference).abs().max() > 1e-2
    with torch.no_grad():
        again = sdm.guided_eps(models.unet, cond, models.uncond, 5.0, lora=True)(x, t, traj)
    torch.testing.assert_close(again, policy)


# ----------------------------------------------------------------------------------------------
# Flow targets (issue 9's other rungs): the lean-adjoint sweep and each target end to end
# ----------------------------------------------------------------------------------------------

FLOW_TARGET_FLAGS = {
    "bootstrap": [],
    "adjoint": ["--flow-target", "adjoint"],
    "mixed": ["--flow-target", "mixed", "--adjoint-lambda", "0.3"],
    "adjoint-matching": ["--no-flow", "--flow-target", "adjoint"],
    "adjoint-unguided-jacobian": ["--flow-target", "adjoint", "--adjoint-jacobian", "unguided"],
}


@pytest.mark.parametrize("name", FLOW_TARGET_FLAGS)
def test_each_flow_target_runs_and_trains_the_lora(name, cache, tmp_path):
    """One smoke epoch per target: finite loss parts, the LoRA's B (zero at init) moved, the terms each
    target has (no L_B with the adjoint target, no reward call in the loss for adjoint matching)."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    sd.main(["--preset", "smoke", "--cache-dir", str(cache), "--out", str(out), *FLOW_TARGET_FLAGS[name]])
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["update"] for m in metrics] == [1, 2]
    assert all(math.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))
    assert all(m["forward"] > 0 for m in metrics)
    lora = load_file(out / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors")
    up = [v for k, v in lora.items() if "lora.up" in k or "lora_B" in k]
    assert up and any(v.abs().max() > 0 for v in up)  # B = 0 at init
    reverse = [m["reverse"] for m in metrics]
    if name in ("bootstrap", "mixed"):
        assert all(r > 0 for r in reverse)
    else:
        assert reverse == [0.0, 0.0]
    assert ("reward_next" in metrics[0]) == (name != "adjoint-matching")
    assert (out / "checkpoints" / "epoch_0001" / "flow").is_dir() == (name != "adjoint-matching")


@pytest.mark.parametrize("jacobian", ["guided", "unguided"])
def test_adjoint_sweep_is_lean_adjoint_through_the_pretrained_unet(jacobian, cache, tmp_path):
    """adjoint_sweep (chunks of --sample-batch-size, adapters off, rows routed to their prompts) equals one
    nabla_gfn.lean_adjoint over all trajectories with plainly written callables on a separately loaded
    pretrained UNet: guided ε_u + w(ε_c − ε_u), or ε_c alone."""
    cfg = smoke_config(cache, tmp_path, "--reward", "clip-score", "--flow-target", "adjoint", "--sample-batch-size", "2",
                       "--adjoint-jacobian", jacobian, "--beta", "3")
    models = perturbed_models(cfg)
    reference_unet = pretrained_unet(cache)
    prompts = ["cat", "owl", "zebra"]
    cond = sd.encode_prompts(models.pipe, prompts)
    schedule = nabla_gfn.ddim_schedule(models.pipe.scheduler, cfg.steps)
    trajectory = sd.sample_trajectories(models, schedule, cond, cfg, torch.Generator().manual_seed(0))
    w, uncond = (cfg.guidance_scale if jacobian == "guided" else 1.0), models.uncond

    def plain_eps(x, t, traj):
        e_c = reference_unet(x, t, encoder_hidden_states=cond[traj]).sample
        if jacobian == "unguided":
            return e_c
        e_u = reference_unet(x, t, encoder_hidden_states=uncond.expand(len(x), -1, -1)).sample
        return e_u + w * (e_c - e_u)

    def plain_reward(x0, traj):
        images = models.pipe.vae.decode(x0 / models.pipe.vae.config.scaling_factor).sample
        return models.reward(images, [prompts[i] for i in traj.tolist()])

    adjoint = sd.adjoint_sweep(models, schedule, trajectory, cond, prompts, cfg)
    expected, _ = nabla_gfn.lean_adjoint(plain_eps, schedule, trajectory, plain_reward, cfg.beta)
    assert adjoint.shape == trajectory.states.shape and not adjoint.requires_grad
    # float32 UNet VJPs in other batch shapes, over the steps; atol ≈ 160·eps32·max|a| (max|a| ≈ 0.05; errors seen ≈ 20·eps32·max|a|).
    torch.testing.assert_close(adjoint, expected, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in sd.lora_parameters(models.unet))
    other = "unguided" if jacobian == "guided" else "guided"
    flipped = sd.adjoint_sweep(models, schedule, trajectory, cond, prompts, dataclasses.replace(cfg, adjoint_jacobian=other))
    assert (flipped[:, 0] - adjoint[:, 0]).abs().max() > 1e-3 * adjoint[:, 0].abs().max()  # the flag matters


# ----------------------------------------------------------------------------------------------
# Crash safety: SIGKILL at several moments, then --resume
# ----------------------------------------------------------------------------------------------


def run_outputs(out):
    """What a finished run must reproduce bit for bit: metrics, trajectories, LoRA and g_φ of each kept checkpoint."""
    from safetensors.torch import load_file

    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    weights = {name: {**load_file(out / "checkpoints" / name / "pytorch_lora_weights.safetensors"),
                      **load_file(out / "checkpoints" / name / "flow" / "diffusion_pytorch_model.safetensors")}
               for name in checkpoints}
    return read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "trajectories.jsonl"), checkpoints, weights


@pytest.fixture(scope="module")
def three_epoch_run(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("runs") / "straight"
    result = run_script(["--preset", "smoke", "--epochs", 3, "--keep-checkpoints", 2, "--out", out], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def logged_updates(out):
    """Updates whose metrics line is complete in out/metrics.jsonl (a line being written is not one)."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    return text.count("\n")


def run_and_kill(args, env, out, moment, timeout=300):
    """Start the script, poll its run folder, SIGKILL it from outside once `moment(out)` holds.
    Returns the return code (-9 when killed) and what `moment` saw."""
    process = subprocess.Popen([sys.executable, SCRIPT, *map(str, args)], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if moment(out):
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.001)
    process.communicate(timeout=60)
    return process.returncode


def partial_save(name):
    """The moment a save is under way: its staging folder holds the LoRA (training state not yet renamed in)."""
    return lambda out: (out / "checkpoints" / f".partial-{name}" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("moment, resumes_from", [("update:3", "epoch_0001"), ("update:5", "epoch_0002"),
                                                  ("save:epoch_0002", None)])
def test_sigkilled_run_resumes_bit_for_bit(moment, resumes_from, three_epoch_run, env, tmp_path):
    """A run SIGKILLed from outside mid-epoch (once update 3 or 5 of 6 is logged) or during epoch 2's save
    (once its staging folder holds the LoRA) resumes from its last complete checkpoint and ends with exactly
    the uninterrupted run's metrics, trajectories, kept checkpoints (--keep-checkpoints 2) and weights.
    A kill during a save may land before the rename (epoch_0002 absent, resume from epoch_0001) or just
    after it (epoch_0002 complete): both must resume exactly."""
    out = tmp_path / "killed"
    args = ["--preset", "smoke", "--epochs", 3, "--keep-checkpoints", 2, "--out", out]
    kind, _, arg = moment.partition(":")
    seen = (lambda o: logged_updates(o) >= int(arg)) if kind == "update" else partial_save(arg)
    assert run_and_kill(args, env, out, seen) == -9  # SIGKILL
    if kind == "save":
        staged = (out / "checkpoints" / ".partial-epoch_0002").is_dir()
        assert staged != (out / "checkpoints" / "epoch_0002" / "training_state.pt").is_file()
        resumes_from = "epoch_0001" if staged else "epoch_0002"
    assert sd.latest_checkpoint(out).name == resumes_from
    resumed = run_script(["--resume", out], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / resumes_from}" in resumed.stdout

    metrics, trajectories, checkpoints, weights = run_outputs(out)
    expected = run_outputs(three_epoch_run)
    assert [m["update"] for m in metrics] == list(range(1, 7))
    assert (metrics, trajectories, checkpoints) == expected[:3]
    assert checkpoints == ["epoch_0002", "epoch_0003"]  # no temporary folder left, the oldest pruned
    for name in checkpoints:
        assert weights[name].keys() == expected[3][name].keys()
        assert all(torch.equal(weights[name][k], expected[3][name][k]) for k in weights[name]), name


def test_run_killed_before_its_first_complete_save_has_no_checkpoint_to_resume(env, tmp_path):
    """Killed mid-epoch 1; a staging folder cut short and an in-place folder without the training state
    (as an older version wrote them) are not checkpoints: --resume says there is none, in one line."""
    out = tmp_path / "killed"
    assert run_and_kill(["--preset", "smoke", "--out", out], env, out, lambda o: logged_updates(o) >= 1) == -9
    for name in (".partial-epoch_0001", "epoch_0001"):
        (out / "checkpoints" / name).mkdir(parents=True, exist_ok=True)
        (out / "checkpoints" / name / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert sd.latest_checkpoint(out) is None
    resumed = run_script(["--resume", out], env)
    assert resumed.returncode == 2
    assert resumed.stderr.strip().splitlines()[-1] == f"sd_finetune.py: error: --resume: {str(out)!r} has no checkpoint yet"


def test_kept_checkpoint_loads_into_a_pipeline(three_epoch_run, cache):
    """The renamed-into-place folder is a plain diffusers LoRA folder: pipe.load_lora_weights(dir) works."""
    assert_lora_moves_unet(cache, three_epoch_run / "checkpoints" / "epoch_0003")


# ----------------------------------------------------------------------------------------------
# Numerics: the residual's precision (README "Numerics")
# ----------------------------------------------------------------------------------------------


def forward_residuals(models, cfg, prompts=("cat", "owl")):
    """(μ_θ − μ♯)/σ² of every transition of two sampled trajectories, with the driver's loss callables."""
    batch, cond = shuffled_transitions(models, cfg, list(prompts))
    policy_eps, reference_eps, _, _ = sd.loss_callables(models, cond, list(prompts), cfg.guidance_scale)
    coef = (batch.alpha_bar, batch.alpha_bar_next, batch.sigma)
    with torch.no_grad():
        means = [nabla_gfn.step_mean(batch.x, eps(batch.x, batch.t, batch.traj), *coef) for eps in (policy_eps, reference_eps)]
    return nabla_gfn.forward_residual(*means, batch.sigma)


@pytest.mark.parametrize("flags", [["--precision", "bf16", "--residual-precision", "same"], ["--precision", "bf16"],
                                   ["--precision", "fp16", "--residual-precision", "same"]])
def test_forward_residual_is_exactly_zero_at_init(flags, cache, tmp_path):
    """LoRA at init (B = 0): ε̂_θ and ε̂♯ are bitwise equal in every precision, all-bf16 (the official
    code's), bf16 sampling with the float32 residual (the default) and all-fp16."""
    cfg = smoke_config(cache, tmp_path, *flags)
    models = sd.load_models(cfg, torch.device("cpu"), sd.weight_dtype(cfg.precision, torch.device("cpu")))
    residual = forward_residuals(models, cfg)
    assert residual.numel() > 0 and torch.equal(residual, torch.zeros_like(residual))


def test_bf16_sampling_keeps_the_float32_residual_and_a_zero_trust_region(cache, tmp_path):
    """Default --residual-precision fp32 with --precision bf16: the residual of a non-zero LoRA is bitwise
    the all-fp32 one (the UNet is held in float32), while all-bf16 (--residual-precision same) makes it
    mostly rounding noise, the cause of the tiny run's bf16 blow-up; and the trust region starts at 0."""
    residual = {}
    for name, flags in {"fp32": ["--precision", "fp32"], "bf16-sampling": ["--precision", "bf16"],
                        "all-bf16": ["--precision", "bf16", "--residual-precision", "same"]}.items():
        cfg = smoke_config(cache, tmp_path, *flags)
        torch.manual_seed(0)  # the same LoRA init
        models = sd.load_models(cfg, torch.device("cpu"), sd.weight_dtype(cfg.precision, torch.device("cpu")))
        with torch.no_grad():
            for p in sd.lora_parameters(models.unet):
                p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        if name == "fp32":  # the same transitions and text embeddings for each: the float32 models'
            batch, cond = shuffled_transitions(models, cfg, ["cat", "owl"])
            uncond = models.uncond
        models.uncond = uncond
        policy_eps, reference_eps, _, _ = sd.loss_callables(models, cond, ["cat", "owl"], cfg.guidance_scale)
        coef = (batch.alpha_bar, batch.alpha_bar_next, batch.sigma)
        with torch.no_grad():
            means = [nabla_gfn.step_mean(batch.x, e(batch.x, batch.t, batch.traj), *coef) for e in (policy_eps, reference_eps)]
        residual[name] = nabla_gfn.forward_residual(*means, batch.sigma)
    assert torch.equal(residual["bf16-sampling"], residual["fp32"])
    noise = (residual["all-bf16"] - residual["fp32"]).norm() / residual["fp32"].norm()
    assert noise > 0.5, noise

    out = tmp_path / "run"
    sd.main(["--preset", "smoke", "--precision", "bf16", "--trust-region", "2000", "--cache-dir", str(cache), "--out", str(out)])
    assert read_jsonl(out / "metrics.jsonl")[0]["trust_region"] == 0.0  # ε̂_old recomputed in float32
