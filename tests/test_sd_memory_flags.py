"""The memory and machine flags of sd_finetune.py: gradient checkpointing and reward chunking change no
number, TF32 flags read back, and the guards (no GPU, --download-only, pickled checkpoints) stop or act
as they say. In process on the tiny builds, or the CLI in a subprocess where a guard must act before
anything loads."""

import collections
import dataclasses
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import baselines
import nabla_gfn
from conftest import shuffled_transitions
import sd_finetune as sd
import sd_models as sdm
import sd_rewards

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def cache(tiny_sd_cache):
    return tiny_sd_cache  # conftest.py: built once for the SD test files


def smoke_config(cache, out, *flags):
    return sd.parse_config(["--preset", "smoke", "--cache-dir", str(cache), "--out", str(out), *flags])


def perturbed_models(cfg, seed=0):
    """Tiny models (without checkpointing) with a non-zero LoRA and g_φ: the reference differs from the policy."""
    torch.manual_seed(seed)
    models = sd.load_models(cfg, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sd.lora_parameters(models.unet):
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
        models.flow.conv_out.weight.copy_(0.05 * torch.randn(models.flow.conv_out.weight.shape, generator=generator))
    return models


def saved_bytes(fn):
    """(fn's result, bytes of the tensors autograd saved for backward while fn ran)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def loss_and_gradients(models, batch, cond, prompts, cfg):
    """The loss parts, every trainable parameter's gradient, and the input gradients the loss takes
    (VJPs of the policy's and the reference's ε̂ and of the reward, with respect to x)."""
    policy, reference, log_reward, flow = sd.loss_callables(models, cond, prompts, cfg.guidance_scale)
    (loss, parts), graph_bytes = saved_bytes(lambda: nabla_gfn.nabla_db_loss(batch, policy, reference, log_reward,
                                                                             flow, cfg.loss_config()))
    loss.backward()
    params = [p for ps in sdm.parameter_groups(models).values() for p in ps]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    v = torch.randn(batch.x.shape, generator=torch.Generator().manual_seed(1))
    input_grads = {}
    for name, fn in (("policy", policy), ("reference", reference),
                     ("reward", lambda x, t, traj: log_reward(x, traj)[:, None, None, None] * v)):
        x = batch.x.clone().requires_grad_(True)
        (input_grads[name],) = torch.autograd.grad((fn(x, batch.t, batch.traj) * v).sum(), x)
    return parts, grads, input_grads, graph_bytes


def test_checkpointing_and_reward_chunks_change_no_number(cache, tmp_path):
    """Loss, parameter gradients and the input gradients (∂/∂x, which the guess, L_B and the lean adjoint
    take) are bitwise those without --gradient-checkpointing and --reward-chunk, while the graph kept
    for backward is smaller. The reference recomputes with its adapters off: under diffusers' own checkpoint
    function it would recompute with the LoRA on (the state in backward), which torch refuses."""
    cfg = smoke_config(cache, tmp_path, "--reward", "clip-score", "--trust-region", "10", "--no-gradient-checkpointing",
                       "--reward-chunk", "0")
    models = perturbed_models(cfg)
    prompts = ["cat", "owl"]
    batch, cond = shuffled_transitions(models, cfg, prompts)
    plain = loss_and_gradients(models, batch, cond, prompts, cfg)
    sdm.enable_gradient_checkpointing(models)
    checkpointed = loss_and_gradients(models, batch, cond, prompts, cfg)
    for key in plain[0]:  # the same operations on the same shapes: bitwise
        assert torch.equal(plain[0][key], checkpointed[0][key]), key
    assert all(torch.equal(a, b) for a, b in zip(plain[1], checkpointed[1]))
    for name in plain[2]:
        assert torch.equal(plain[2][name], checkpointed[2][name]), name
    assert checkpointed[3] < 0.5 * plain[3], (checkpointed[3], plain[3])
    assert all(plain[0][k] > 0 for k in ("forward", "reverse", "trust_region"))
    assert not torch.equal(plain[2]["policy"], plain[2]["reference"])  # the LoRA is non-trivial

    models.reward_chunk = 1
    chunked = loss_and_gradients(models, batch, cond, prompts, cfg)
    # The decoder and reward on batches of 1 instead of N: float32 GEMMs of other shapes round differently
    # (a few ulps, ~1e-7 relative), carried through β·∇r into squared residuals; nothing else changes.
    close = dict(rtol=1e-5, atol=1e-6)
    for key in plain[0]:
        torch.testing.assert_close(chunked[0][key], plain[0][key], **close)
    # As whole vectors (elements near 0 carry the rounding at large relative size):
    flat = [torch.cat([g.flatten() for g in grads]) for grads in (chunked[1], plain[1])]
    assert (flat[0] - flat[1]).norm() <= 1e-5 * flat[1].norm(), ((flat[0] - flat[1]).norm(), flat[1].norm())
    for name in plain[2]:
        a, b = chunked[2][name], plain[2][name]
        assert (a - b).norm() <= 1e-5 * b.norm(), (name, (a - b).norm(), b.norm())
    assert chunked[3] < checkpointed[3]

    models.unet.enable_gradient_checkpointing()  # diffusers' default function: adapters' state not kept
    with pytest.raises(torch.utils.checkpoint.CheckpointError):  # recomputed with the LoRA on: other tensors
        loss_and_gradients(models, batch, cond, prompts, cfg)


def test_reward_chunks_score_as_one_batch_and_hold_one_chunk(cache, tmp_path):
    """latent_log_reward in chunks: bitwise the unchunked callable run on each chunk's rows (r and ∇r),
    within float32 rounding of the whole batch at once; the graph kept for backward is one chunk's inputs."""
    cfg = smoke_config(cache, tmp_path, "--no-gradient-checkpointing")
    models = perturbed_models(cfg)
    prompts = ["cat", "owl", "zebra", "fox"]
    x0 = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    traj = torch.tensor([2, 0, 3, 1])
    whole = sdm.latent_log_reward(models.pipe.vae, models.reward, prompts)

    def reward_and_grad(log_reward, rows):
        x = x0[rows].clone().requires_grad_(True)
        r, graph = saved_bytes(lambda: log_reward(x, traj[rows]))
        return r.detach(), torch.autograd.grad(r.sum(), x)[0], graph

    everything = torch.arange(4)
    r_all, grad_all, graph_all = reward_and_grad(whole, everything)
    for chunk in (1, 3):
        r, grad, graph = reward_and_grad(sdm.latent_log_reward(models.pipe.vae, models.reward, prompts, chunk),
                                         everything)
        parts = [reward_and_grad(whole, rows) for rows in everything.split(chunk)]
        assert torch.equal(r, torch.cat([p[0] for p in parts])) and torch.equal(grad, torch.cat([p[1] for p in parts]))
        torch.testing.assert_close(r, r_all, rtol=1e-5, atol=0)  # other GEMM shapes: a few float32 ulps
        assert (grad - grad_all).norm() <= 1e-5 * grad_all.norm()
        assert graph < 0.1 * graph_all


@pytest.mark.parametrize("precision, tf32", [("fp32", False), ("tf32", True)])
def test_tf32_flags_read_back_through_old_and_new_apis(precision, tf32):
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        sdm.set_float32_matmul(precision)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
        assert torch.backends.cuda.matmul.fp32_precision == ("tf32" if tf32 else "ieee")
        assert (torch.backends.cudnn.conv.fp32_precision == "tf32") is tf32
        assert (torch.backends.cudnn.rnn.fp32_precision == "tf32") is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run_cli(args, env, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "sd_finetune.py"), *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cpu_env(cache):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "NABLA_GFN_CACHE": str(cache),
            "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


def test_real_model_without_gpu_stops_before_loading(cpu_env, tmp_path):
    """A non-tiny model on a machine without CUDA: one line naming the cause and --allow-cpu, nothing
    loaded (the id does not exist: loading it would fail otherwise), no run folder; --allow-cpu passes
    the guard and reaches the loader."""
    out = tmp_path / "run"
    started = time.time()
    result = run_cli(["--model", "no-such-org/no-such-model", "--out", out], cpu_env)
    assert time.time() - started < 60
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sd_finetune.py: error: no CUDA device found")
    assert "--allow-cpu" in lines[0] and "driver" in lines[0] and not out.exists()
    result = run_cli(["--model", "no-such-org/no-such-model", "--out", out, "--allow-cpu"], cpu_env)
    assert result.returncode == 1 and "cannot load the Stable Diffusion pipeline" in result.stderr


def test_download_only_fetches_every_weight_and_trains_nothing(cpu_env, tmp_path):
    """--download-only with --eval against the tiny builds: they land in an empty cache, no run starts."""
    fresh, out = tmp_path / "cache", tmp_path / "run"
    result = run_cli(["--preset", "smoke", "--reward", "hpsv2", "--eval", "--download-only", "--cache-dir", fresh,
                      "--out", out], cpu_env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--download-only" in result.stdout and not out.exists()
    assert {"pipeline", "clip"} <= {p.name for p in (fresh / "tiny-v1").iterdir()}
    assert any((fresh / "tiny-rewards-v1" / "hpsv2").iterdir())


def test_pickled_checkpoint_stops_with_one_line_naming_trust_pickle(cache, tmp_path):
    """A reward checkpoint torch.load(weights_only=True) refuses: one line naming --trust-pickle, never a
    silent fallback; with --trust-pickle it loads."""
    head = Path(sdm.tiny_weight("aesthetic_head", str(cache)))
    pickled = tmp_path / "head.pth"
    torch.save(collections.defaultdict(list, torch.load(head, weights_only=True)), pickled)
    cfg = smoke_config(cache, tmp_path, "--aesthetic-head", str(pickled))
    embedder = sd.load_clip(cfg, "cpu")
    with pytest.raises(sd_rewards.MissingWeights, match="weights_only=True.*--trust-pickle") as err:
        sd.build_reward(cfg, embedder)
    assert "\n" not in str(err.value) and "defaultdict" in str(err.value)
    trusted = smoke_config(cache, tmp_path, "--aesthetic-head", str(pickled), "--trust-pickle")
    images = torch.zeros(1, 3, 32, 32)
    assert torch.equal(sd.build_reward(trusted, embedder)(images, ["cat"]),
                       sd.build_reward(smoke_config(cache, tmp_path), embedder)(images, ["cat"]))


@pytest.mark.parametrize("method", ["draft", "refl", "ddpo", "grpo", "kl-pg"])
def test_other_methods_in_micro_batches_take_the_same_gradient(method, cache, tmp_path):
    """The registry's other methods honour the rung's memory flags: --train-batch-size rows per forward with a
    graph (gradients accumulated into the one step: `baselines.accumulated_step`), --sample-batch-size rows
    per sampling and scoring pass. Micro-batches of 1 and the whole batch at once: the same sample, logs and
    LoRA gradient up to float32 rounding of other GEMM shapes, while the graph held at once is smaller."""
    cfg = smoke_config(cache, tmp_path, "--method", method, "--steps", "2", "--draft-k", "2", "--draft-kl", "0.1",
                       "--refl-start", "0", "--ppo-clip", "10", "--ppo-minibatches", "1", "--reward", "clip-score",
                       "--max-grad-norm", "1e9")
    models = sd.load_models(cfg, torch.device("cpu"), torch.float32)
    models.unet.to(torch.float64)  # PPO's ∇ log P_F carries (x' − μ_θ)/σ²: float32 UNet rounding at other batch
    # shapes (~1e-7 of ε̂) over a small σ moved the gradient by ~5e-4 relative; in float64 it is ~1e-14
    generator = torch.Generator().manual_seed(0)
    params = sd.lora_parameters(models.unet)
    with torch.no_grad():  # a non-zero LoRA: policy ≠ reference, so the KL terms are not zero
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    prompts = ["cat", "owl", "cat", "owl"]
    schedule = sdm.step_schedule(models.pipe, cfg.steps, cfg.noise_level)
    results = []
    for micro in (0, 1):
        held, peak = [0], [0]

        def pack(t):
            held[0] += t.numel() * t.element_size()
            return t

        def backward(loss):  # the graph of one micro-batch: what autograd saved since the last backward
            peak[0], held[0] = max(peak[0], held[0]), 0
            loss.backward()

        trainee = sd.method_trainee(models, schedule, sd.encode_prompts(models.pipe, prompts), prompts,
                                    torch.tensor([0, 1, 0, 1]), cfg, torch.optim.SGD(params, lr=0.0), backward)
        hp = dataclasses.replace(sd.method_config(cfg, 4), micro_batch=micro, sample_batch=2)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logs = baselines.METHODS[method].update(trainee, hp, torch.Generator().manual_seed(1))
        results.append((logs, torch.cat([p.grad.flatten() for p in params]), peak[0]))
    (whole, g_whole, peak_whole), (chunked, g_chunked, peak_chunked) = results
    assert g_whole.norm() > 0 and peak_chunked < 0.5 * peak_whole, (peak_chunked, peak_whole)
    # DRaFT, ReFL: ∇r through the float32 decoder and reward at other batch shapes, a few ulps (as the reward
    # chunks above); the PPO family: the float64 UNet's rounding
    tolerance = 1e-5 if method in ("draft", "refl") else 1e-12
    assert (g_chunked - g_whole).norm() <= tolerance * g_whole.norm(), ((g_chunked - g_whole).norm(), g_whole.norm())
    for key in whole:
        assert math.isclose(chunked[key], whole[key], rel_tol=1e-5, abs_tol=1e-6), (key, chunked[key], whole[key])
