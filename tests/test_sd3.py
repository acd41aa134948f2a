"""Stable Diffusion 3 in the SD rung (`--model tiny-sd3`, a tiny random StableDiffusion3Pipeline), CPU, offline.

The flow SDE's step against the scheduler's Euler step (its noiseless limit) and against the exact
marginals of a Gaussian; the driver's guided velocity and sampler against the diffusers pipeline; the
saved LoRA through `StableDiffusion3Pipeline.load_lora_weights`; the CLI end to end.
"""

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nabla_gfn
import sd_finetune as sd
import sd_models as sdm
import tiny_models

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "sd_finetune.py")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def cache(tiny_sd_cache):
    tiny_models.tiny_sd3_assets(str(tiny_sd_cache))
    return tiny_sd_cache


@pytest.fixture(scope="module")
def env(cache):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NABLA_GFN_CACHE": str(cache),
            "PYTHONPATH": str(ROOT)}


def run_script(args, env, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def sd3_config(cache, out, *flags):
    return sd.parse_config(["--preset", "smoke", "--model", "tiny-sd3", "--cache-dir", str(cache), "--out", str(out),
                            *flags])


def tiny_sd3_pipeline(cache, **kwargs):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(Path(cache) / "tiny-sd3-v1" / "pipeline", **kwargs)


# ----------------------------------------------------------------------------------------------
# The flow SDE's step (nabla_gfn.flow_schedule through sd_models.flow_schedule)
# ----------------------------------------------------------------------------------------------


def test_noiseless_flow_step_is_the_schedulers_euler_step():
    """a → 0 (a = 1e-9: the module takes a > 0): μ = x + Δt v + O(a²), σ = O(a), on the shifted grid, equals
    FlowMatchEulerDiscreteScheduler.step up to float32 rounding of the same sum."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = sdm.flow_schedule(scheduler, 8, noise_level=1e-9)
    assert schedule.sigma.max() < 1e-8
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=generator)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=generator)
        expected = scheduler.step(v, t, x).prev_sample
        x = nabla_gfn.affine(schedule.mean_coef[i].expand(2, 2), x, v)
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(schedule.timesteps, scheduler.timesteps)


def test_x0_guess_of_the_exact_conditional_velocity_is_the_clean_sample():
    """x_t = (1 − t) x_0 + t ε has velocity v = ε − x_0; x̂_0 = x − t v recovers x_0 at x and at x'."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = sdm.flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0), 6, noise_level=0.7)
    x0, eps = torch.randn(2, 5, dtype=torch.float64).unbind()
    for i in range(6):
        for coef, t in ((schedule.x0_coef[i], schedule.timesteps[i]), (schedule.x0_coef_next[i], schedule.next_timesteps[i])):
            t = t.double() / 1000
            x_t = (1 - t) * x0 + t * eps
            torch.testing.assert_close(nabla_gfn.affine(coef[None], x_t[None], (eps - x0)[None])[0], x0)


def _gaussian_marginal_error(num_steps: int, noise_level: float, mean: float = 0.8, var: float = 0.09):
    """Run the flow SDE with the exact velocity of data N(mean, var) from N(0, 1) at t = 1, propagating the
    Gaussian's mean and variance exactly through each affine step; return (mean error, variance error) at t = 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = sdm.flow_schedule(scheduler, num_steps, noise_level)
    m, v = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for i, t in enumerate(scheduler.sigmas[:-1].double()):
        var_t = (1 - t) ** 2 * var + t**2  # x_t = (1 − t) x_0 + t ε
        gain_eps, gain_x0 = t / var_t, (1 - t) * var / var_t  # E[ε|x], E[x_0|x] = … + gain · (x − (1 − t) mean)
        slope = gain_eps - gain_x0  # v(x) = E[ε − x_0 | x] = slope · x + offset
        offset = -gain_eps * (1 - t) * mean - mean + gain_x0 * (1 - t) * mean
        a, b = schedule.mean_coef[i]
        m, v = (a + b * slope) * m + b * offset, (a + b * slope) ** 2 * v + schedule.sigma[i].double() ** 2
    return float(m - mean), float(v - var)


@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0])
def test_flow_sde_keeps_the_marginals_of_the_flow(noise_level):
    """The drift correction σ_t²/(2t)·(x + (1 − t) v) makes the SDE's marginals those of the flow: with the
    exact velocity of a Gaussian, the end marginal converges to the data's at Euler–Maruyama's first order
    (measured: variance error 2.7e-3 at 160 steps, 6.1e-4 at 640 for a = 0.7)."""
    errors = [_gaussian_marginal_error(n, noise_level) for n in (160, 640)]
    assert all(abs(mean_error) < 1e-12 for mean_error, _ in errors)
    assert abs(errors[1][1]) < 2e-3
    assert abs(errors[0][1]) / abs(errors[1][1]) > 3.0  # first order: 4× the steps, ~4× smaller error


def _start_end_correlation(num_steps: int, noise_level: float, var: float = 0.09) -> float:
    """corr(x_T, x_0) of the flow SDE with the exact velocity of data N(0.8, var), propagated exactly."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = sdm.flow_schedule(scheduler, num_steps, noise_level)
    cov, v = torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for i, t in enumerate(scheduler.sigmas[:-1].double()):
        var_t = (1 - t) ** 2 * var + t**2
        slope = t / var_t - (1 - t) * var / var_t  # ∂v/∂x of the exact velocity
        gain = schedule.mean_coef[i, 0] + schedule.mean_coef[i, 1] * slope
        cov, v = gain * cov, gain**2 * v + schedule.sigma[i].double() ** 2
    return float(cov / v.sqrt())


def test_noise_level_sqrt2_is_memoryless():
    """a = √2 (σ_t² = 2t/(1 − t)) forgets the start: x_0 is uncorrelated with x_T (Adjoint Matching's
    memoryless condition, under which the tilted target is the fixed point); Flow-GRPO's a = 0.7 is not
    (measured: corr −1.4e-7 against 0.070 at 10 steps, 5e-8 against 0.107 at 100)."""
    for steps in (10, 100):
        assert abs(_start_end_correlation(steps, 2**0.5)) < 1e-3
        assert _start_end_correlation(steps, 0.7) > 0.03


def test_flow_step_noise_is_flow_grpos_at_the_first_step():
    """σ_t = a√(t/(1 − t)) with t = 1's denominator taken at the next grid point; std = σ_t √|Δt|."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    schedule = sdm.flow_schedule(scheduler, 10, noise_level=0.7)
    t = scheduler.sigmas.double()
    assert t[0] == 1
    expected = 0.7 * torch.sqrt(t[:-1] / (1 - torch.cat([t[1:2], t[1:-1]]))) * torch.sqrt(t[:-1] - t[1:])
    torch.testing.assert_close(schedule.sigma, expected.float())


# ----------------------------------------------------------------------------------------------
# The driver against the diffusers SD3 pipeline
# ----------------------------------------------------------------------------------------------


def test_guided_velocity_is_the_pipelines(cache, tmp_path):
    """guided_eps on the packed prompt embedding = the pipeline's CFG: v_u + w (v_c − v_u) from its own
    encode_prompt (empty negative prompt, pooled embeddings) and transformer call."""
    models = sd.load_models(sd3_config(cache, tmp_path), torch.device("cpu"), torch.float32)
    pipe = models.pipe
    prompts = ["cat", "owl"]
    cond = sd.encode_prompts(pipe, prompts)
    x, t = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([1000.0, 300.0])
    with torch.no_grad():
        ours = sdm.guided_eps(models.unet, cond, models.uncond, 4.5)(x, t, torch.tensor([0, 1]))
        tokens, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, None, None, "cpu", 1, True)
        out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                               encoder_hidden_states=torch.cat([negative, tokens]),
                               pooled_projections=torch.cat([negative_pooled, pooled])).sample
    uncond, conditional = out.chunk(2)
    torch.testing.assert_close(ours, uncond + 4.5 * (conditional - uncond), rtol=1e-5, atol=1e-5)


def test_noiseless_sampler_reproduces_the_pipelines_latents(cache, tmp_path):
    """The driver's sampler with a → 0 (1e-9: the ODE up to O(a)) from the same x_T = StableDiffusion3Pipeline's own
    sampling (shifted timesteps, guidance, Euler steps): float32 sums in another order only."""
    cfg = sd3_config(cache, tmp_path, "--steps", "5", "--guidance-scale", "4.5")
    models = sd.load_models(cfg, torch.device("cpu"), torch.float32)
    schedule = sdm.flow_schedule(models.pipe.scheduler, cfg.steps, noise_level=1e-9)
    x_T = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    eps_fn = sdm.guided_eps(models.unet, sd.encode_prompts(models.pipe, ["owl"]), models.uncond, 4.5, lora=False)
    ours = nabla_gfn.sample_trajectory(eps_fn, schedule, x_T).final
    pipe = tiny_sd3_pipeline(cache)
    call = dict(num_inference_steps=5, guidance_scale=4.5, height=32, width=32)
    theirs = pipe("owl", latents=x_T.clone(), output_type="latent", **call).images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    images = pipe("owl", latents=x_T.clone(), output_type="pt", **call).images  # decoded with SD3's VAE shift, in [0, 1]
    with torch.no_grad():
        decoded = sdm.decode_latents(models.pipe.vae, ours)
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), images, rtol=1e-5, atol=1e-5)


def test_no_t5_loads_without_the_third_text_encoder(cache, tmp_path):
    """--no-t5: text_encoder_3 = None; the prompt tokens keep their length (the pipeline's zero T5 tokens)."""
    with_t5 = sd.load_models(sd3_config(cache, tmp_path), torch.device("cpu"), torch.float32)
    without = sd.load_models(sd3_config(cache, tmp_path, "--no-t5"), torch.device("cpu"), torch.float32)
    assert with_t5.pipe.text_encoder_3 is not None and without.pipe.text_encoder_3 is None
    cond, cond_no_t5 = (sd.encode_prompts(m.pipe, ["cat"]) for m in (with_t5, without))
    assert cond.shape == cond_no_t5.shape == (1, 77 + 256 + 1, 64)
    assert torch.equal(cond_no_t5[:, 77:-1], torch.zeros_like(cond_no_t5[:, 77:-1]))
    assert not torch.equal(cond[:, 77:-1], cond_no_t5[:, 77:-1])
    torch.testing.assert_close(cond[:, :77], cond_no_t5[:, :77])  # the CLIP tokens, and the pooled row
    torch.testing.assert_close(cond[:, -1], cond_no_t5[:, -1])


def test_lora_targets_cover_both_attention_streams(cache, tmp_path):
    models = sd.load_models(sd3_config(cache, tmp_path), torch.device("cpu"), torch.float32)
    names = {name.rsplit(".", 1)[-1] if not name.endswith("to_out.0") else "to_out.0"
             for name, module in models.unet.named_modules() if module in sdm.lora_layers(models.unet)}
    assert names == set(sdm.SD3_LORA_TARGETS)
    assert all(p.dtype == torch.float32 for p in sd.lora_parameters(models.unet))


def test_saved_lora_loads_into_the_sd3_pipeline_and_reproduces_the_transformer(cache, tmp_path):
    """save_checkpoint's LoRA through StableDiffusion3Pipeline.load_lora_weights gives the finetuned
    transformer's outputs (alpha ≠ rank, so a lost scale would show) and not the pretrained ones;
    sd_checkpoint.load_lora restores it exactly."""
    cfg = sd3_config(cache, tmp_path, "--lora-alpha", "16")
    models = sd.load_models(cfg, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sd.lora_parameters(models.unet):
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    path = sd.save_checkpoint(tmp_path / "ckpt", models, sd.make_optimizer(models, cfg), [torch.Generator()], 0, 0,
                              sd.Accelerator())
    pipe = tiny_sd3_pipeline(cache)
    pretrained = copy.deepcopy(pipe.transformer)
    pipe.load_lora_weights(path)
    x, t = torch.randn(3, 16, 4, 4, generator=generator), torch.tensor([1000.0, 500.0, 20.0])
    context = torch.randn(3, 10, 64, generator=generator)
    with torch.no_grad():
        finetuned, loaded, base = (sdm.denoise(net, x, t, context) for net in (models.unet, pipe.transformer, pretrained))
    # float32; diffusers' loader may apply the alpha/rank scale in another order: a few eps32 per LoRA layer.
    torch.testing.assert_close(loaded, finetuned, rtol=1e-5, atol=1e-5)
    assert (finetuned - base).abs().max() > 1e-2
    fresh = sd.load_models(cfg, torch.device("cpu"), torch.float32)
    from sd_checkpoint import load_lora

    load_lora(fresh.unet, path)
    assert all(torch.equal(p, q) for p, q in zip(sd.lora_parameters(fresh.unet), sd.lora_parameters(models.unet)))


def test_checkpointing_changes_no_number_on_sd3(cache, tmp_path):
    """--gradient-checkpointing on the transformer (sd_models.checkpoint_block through its blocks): the ∇-DB
    loss and every trainable gradient are bitwise those without it, with a non-zero LoRA and g_φ, while the
    graph kept for backward is smaller."""
    cfg = sd3_config(cache, tmp_path, "--reward", "clip-score", "--trust-region", "10", "--no-gradient-checkpointing")
    models = sd.load_models(cfg, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sd.lora_parameters(models.unet):
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
        models.flow.conv_out.weight.copy_(0.05 * torch.randn(models.flow.conv_out.weight.shape, generator=generator))
    schedule = sdm.step_schedule(models.pipe, cfg.steps, cfg.noise_level)
    prompts = ["cat", "owl"]
    cond = sd.encode_prompts(models.pipe, prompts)
    trajectory = sd.sample_trajectories(models, schedule, cond, cfg, generator)
    batch = nabla_gfn.gather_transitions(trajectory, schedule, nabla_gfn.subsample_steps(cfg.steps, 1.0, 2, generator))
    params = [p for ps in sdm.parameter_groups(models).values() for p in ps]

    def loss_and_gradients():
        saved = [0]

        def pack(tensor):
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss, parts = nabla_gfn.nabla_db_loss(batch, *sd.loss_callables(models, cond, prompts, cfg.guidance_scale),
                                                  cfg.loss_config())
        return parts, torch.autograd.grad(loss, params), saved[0]

    plain = loss_and_gradients()
    sdm.enable_gradient_checkpointing(models)
    checkpointed = loss_and_gradients()
    assert all(torch.equal(plain[0][k], checkpointed[0][k]) for k in plain[0])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], checkpointed[1]))
    assert all(plain[0][k] > 0 for k in ("forward", "reverse", "trust_region"))
    assert checkpointed[2] < 0.5 * plain[2], (checkpointed[2], plain[2])


# ----------------------------------------------------------------------------------------------
# The CLI end to end
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, env):
    """The bar's command: `--model tiny-sd3 --preset smoke --eval --out D`, offline on a CPU."""
    out = tmp_path_factory.mktemp("runs") / "smoke-sd3"
    result = run_script(["--model", "tiny-sd3", "--preset", "smoke", "--eval", "--out", out], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_smoke_eval_run_writes_lora_grids_and_eval(smoke_run, cache):
    """The bar: the smoke run writes grids, metrics, eval.json and a LoRA that loads into the tiny SD3
    pipeline through load_lora_weights."""
    out = smoke_run
    assert {p.name for p in (out / "samples").iterdir()} == {"epoch_0000.png", "epoch_0001.png"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in metrics] == [1, 2] and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["prompts"] == 8 and evaluation["reward_mean"] == evaluation["reward_mean"]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["model"] == "tiny-sd3" and config["config"]["noise_level"] == 0.7
    from safetensors.torch import load_file

    saved = load_file(out / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors")
    pipe = tiny_sd3_pipeline(cache)
    pipe.load_lora_weights(out / "checkpoints" / "epoch_0001")
    assert len(sdm.lora_layers(pipe.transformer)) == sum(k.endswith("lora_A.weight") for k in saved) > 0


def test_resumed_sd3_run_reproduces_the_uninterrupted_run(smoke_run, env, tmp_path):
    """--resume of the one-epoch smoke run to --epochs 2 = a straight two-epoch run: metrics and LoRA bit for bit."""
    from safetensors.torch import load_file

    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    shutil.copytree(smoke_run, resumed)
    assert run_script(["--resume", resumed, "--epochs", 2], env).returncode == 0
    result = run_script(["--model", "tiny-sd3", "--preset", "smoke", "--epochs", 2, "--out", straight], env)
    assert result.returncode == 0, result.stderr[-3000:]
    drop = ("update_seconds", "elapsed_seconds")
    metrics = [[{k: v for k, v in json.loads(line).items() if k not in drop}
                for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (resumed, straight)]
    assert metrics[0] == metrics[1] and len(metrics[0]) == 4
    lora = [load_file(run / "checkpoints" / "epoch_0002" / "pytorch_lora_weights.safetensors") for run in (resumed, straight)]
    assert lora[0].keys() == lora[1].keys() and all(torch.equal(lora[0][k], lora[1][k]) for k in lora[0])


@pytest.mark.parametrize("method", [m for m in sd.METHODS if m != "nabla-db"])  # nabla-db: smoke_run above
def test_every_method_runs_on_sd3(method, cache, tmp_path):
    """Every --method on the tiny SD3 pipeline (the bar's `--preset smoke --method M`, in process): the
    registry's updates go through the schedule's affine coefficients, so the flow SDE's step serves them all.
    Finite logs with a loss, and the saved LoRA's B (0 at init) moved."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    sd.main(["--model", "tiny-sd3", "--preset", "smoke", "--cache-dir", str(cache), "--method", method, "--out", str(out)])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == (2 if method in sd.NABLA_DB_METHODS else 1)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm_policy"]) for m in metrics)
    lora = load_file(out / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors")
    up = [v for k, v in lora.items() if "lora.up" in k or "lora_B" in k]
    assert up and any(v.abs().max() > 0 for v in up)


def test_missing_sd35_weights_offline_give_one_line(env, tmp_path):
    result = run_script(["--preset", "sd3", "--out", tmp_path / "run", "--allow-cpu"], env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert sdm.SD35_HUB_ID in lines[0] and "--model" in lines[0] and "licence" in lines[0]


def test_sd3_preset_is_flow_grpos_settings():
    cfg = sd.parse_config(["--preset", "sd3"])
    assert (cfg.model, cfg.resolution, cfg.steps, cfg.guidance_scale, cfg.noise_level) == (
        sdm.SD35_HUB_ID, 512, 10, 4.5, 0.7)
    assert (cfg.lora_rank, cfg.lora_alpha) == (32, 64.0)
