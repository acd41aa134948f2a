# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · The Stable Diffusion rung, piece by piece
#
# `sd_finetune.py` finetunes Stable Diffusion v1.5 with a LoRA and the same `nabla_gfn` loss as
# the toy. This notebook takes its pieces apart on `--model tiny`: a randomly initialised
# pipeline with SD's component classes and scheduler config (and a tiny random CLIP and aesthetic
# head for the reward), built once under `$NABLA_GFN_CACHE` with no download. Its images are
# noise — what it shows is the wiring, the shapes and where the gradients go. The commands for
# a real run on a GPU are at the end.

# %%
import sys
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "nabla_gfn.py").is_file())
sys.path.insert(0, str(ROOT))  # nabla_gfn.py, toy_2d.py, sd_finetune.py live in the repository root

import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook bars want ipywidgets
# %matplotlib inline
plt.rcParams.update({"figure.dpi": 70, "font.size": 9, "axes.titlesize": 9, "legend.fontsize": 8})

import dataclasses
import tempfile

import accelerate
import diffusers
import nabla_gfn as ng
import sd_finetune as sd
import sd_models as sdm

torch.set_num_threads(1)                        # the tiny models run fastest on one thread
import transformers

diffusers.utils.logging.disable_progress_bar()   # as sd_finetune.main does: no weight-loading bars
transformers.utils.logging.disable_progress_bar()
cfg = sd.parse_config(["--preset", "smoke", "--steps", "10"])   # the smoke preset, 10 steps for a longer strip
paper = sd.parse_config([])
print("smoke preset vs the paper's defaults:")
for f in dataclasses.fields(cfg):
    if getattr(cfg, f.name) != getattr(paper, f.name) and f.name != "out":
        print(f"  {f.name:>24}: {getattr(cfg, f.name)!r:<12} (paper {getattr(paper, f.name)!r})")

# %% [markdown]
# ## 1 · Loading: the pipeline, the policy, the flow and the reward
#
# `sd.load_models` loads the pipeline with `StableDiffusionPipeline.from_pretrained` (frozen; a
# DDIM scheduler of its config), adds the LoRA (`peft.LoraConfig` + `unet.add_adapter`, rank 8
# on `to_q, to_k, to_v, to_out.0`, Gaussian init: $B = 0$), builds $g_\phi$ (a small conditional
# UNet over latents with a zeroed output layer) and the reward (aesthetic MLP on CLIP image
# embeddings, float32, differentiable).

# %%
device = torch.device("cpu")
torch.manual_seed(cfg.seed)                       # the LoRA's Gaussian init and g_φ's, as in sd.start_session
models = sd.load_models(cfg, device, sd.weight_dtype(cfg.precision, device))
count = lambda params: sum(p.numel() for p in params)
print(f"UNet {count(models.unet.parameters()):,} parameters, of which LoRA {count(sd.lora_parameters(models.unet)):,} trainable "
      f"in {len(sdm.lora_layers(models.unet))} adapted layers")
print(f"g_φ  {count(models.flow.parameters()):,} parameters; its output layer is zero: {bool((models.flow.conv_out.weight == 0).all())}")
print(f"VAE  {count(models.pipe.vae.parameters()):,}, text encoder {count(models.pipe.text_encoder.parameters()):,}, "
      f"reward {type(models.reward).__name__} on CLIP {count(models.embedder.parameters()):,}")
schedule = ng.ddim_schedule(models.pipe.scheduler, cfg.steps)
print("timesteps τ:", schedule.timesteps.tolist())
print("σ_τ:        ", [round(s, 3) for s in schedule.sigma.tolist()])

# %% [markdown]
# ## 2 · $P_F^\theta$ is the UNet with its LoRA; $P_F^\sharp$ is the same UNet with the adapters off
#
# No second copy of the UNet: `sdm.guided_eps(..., lora=False)` runs it inside
# `sdm.lora_disabled`, which switches the adapters off and back on. Both apply classifier-free
# guidance, $\hat\epsilon = \epsilon_u + w(\epsilon_c - \epsilon_u)$, with the empty negative
# prompt. `sd.loss_callables` returns the four callables `nabla_gfn` takes — policy ε, reference
# ε, log-reward of latents, $g_\phi$ — each routed by the row's trajectory index `traj`, so every
# row is scored with its own prompt. At initialisation $B = 0$, so the two policies agree exactly.

# %%
prompts = list(sd.ANIMALS[:4])
cond = sd.encode_prompts(models.pipe, prompts)              # (4, 77, 32) text embeddings
policy_eps, reference_eps, log_reward, flow = sd.loss_callables(models, cond, prompts, cfg.guidance_scale)

gen = torch.Generator().manual_seed(cfg.seed)
x = torch.randn(sdm.latent_shape(models, len(prompts), cfg.resolution), generator=gen)
t, traj = schedule.timesteps[3].expand(len(prompts)), torch.arange(len(prompts))
with torch.no_grad():
    gap = (policy_eps(x, t, traj) - reference_eps(x, t, traj)).abs().max()
print(f"latents {tuple(x.shape)}; at initialisation max |ε̂_θ − ε̂♯| = {float(gap):.1e}")

# %% [markdown]
# ## 3 · One trajectory
#
# `sd.sample_trajectories` runs `ng.sample_trajectory` (DDIM with $\eta = 1$, the Gaussian policy
# of `01_derivation.ipynb`) on latents, recording every state and $\hat\epsilon_{\text{old}}$. Below:
# each state of one trajectory decoded by the VAE, and its one-step clean prediction
# $\hat x_0(x_\tau)$. (Random weights: the images are noise, not a cat.)

# %%
trajectory = sd.sample_trajectories(models, schedule, cond, cfg, gen)
print(f"states {tuple(trajectory.states.shape)} (trajectories, T+1, latent), ε̂_old {tuple(trajectory.eps.shape)}")

with torch.no_grad():
    states = trajectory.states[0]                                       # (T+1, 4, h, w)
    x0_hat = ng.x0_prediction(states[:-1], trajectory.eps[0], schedule.alpha_bar)
    rows = [sdm.decode_latents(models.pipe.vae, states), sdm.decode_latents(models.pipe.vae, torch.cat([x0_hat, states[-1:]]))]
fig, axes = plt.subplots(2, cfg.steps + 1, figsize=(1.2 * (cfg.steps + 1), 2.8))
for r, (images, name) in enumerate(zip(rows, ("x_τ", "x̂₀(x_τ)"))):
    for k, ax in enumerate(axes[r]):
        ax.imshow(((images[k].permute(1, 2, 0) + 1) / 2).clamp(0, 1).numpy())
        ax.set(xticks=[], yticks=[])
        if r == 0:
            ax.set_title(f"τ={int(schedule.timesteps[k])}" if k < cfg.steps else "x_0", fontsize=7)
    axes[r, 0].set_ylabel(name)
plt.show()

# %% [markdown]
# ## 4 · The reward gradient through the VAE and the reward model
#
# The loss needs $\nabla r$ with respect to the *latent*: `sdm.latent_log_reward` decodes with the
# VAE, then CLIP-embeds (resize, normalise — plain torch, differentiable) and applies the
# aesthetic MLP. `ng.reward_gradient` builds that graph, takes the gradient and frees it at
# once. The reward and its gradient run in float32 (the authors found bf16 gives large errors).
#
# **Check:** the gradient against a central finite difference along a random direction.
# Then the forward-looking guess $\beta\gamma_\tau\nabla_x r(\hat x_0(x))$ at a noisy state, whose
# gradient also runs back through the UNet.

# %%
x0 = trajectory.final
grad, r = ng.reward_gradient(log_reward, x0, traj)
print(f"r(x_0) = {r.numpy().round(4)};  ∇r has shape {tuple(grad.shape)} (the latent's)")
h = 1e-2
for name, direction in (("along ∇r", grad), ("random", torch.randn(x0.shape, generator=gen))):
    direction = direction / direction.flatten(1).norm(dim=1)[:, None, None, None]
    with torch.no_grad():
        finite_diff = (log_reward(x0 + h * direction, traj) - log_reward(x0 - h * direction, traj)) / (2 * h)
    analytic = (grad * direction).flatten(1).sum(1)
    show = lambda v: np.array2string(v.numpy(), formatter={"float_kind": "{:+.3e}".format})
    print(f"directional derivative {name:>8}: autograd {show(analytic)}, finite difference {show(finite_diff)}")

i = cfg.steps // 2
x_mid = trajectory.states[:, i]
guess, r_hat = ng.forward_looking_score(policy_eps, log_reward, x_mid, schedule.timesteps[i].expand(len(prompts)),
                                        schedule.alpha_bar[i].expand(len(prompts)), traj, cfg.beta, cfg.gamma)
print(f"step {i}: forward-looking guess β·γ·∇r(x̂_0), β = {cfg.beta:g}, γ = {cfg.gamma}: norms {guess.flatten(1).norm(dim=1).numpy().round(3)}")

# %% [markdown]
# ## 5 · One ∇-DB update
#
# The training step of `sd.train` (`sd.update`), written out once: subsample the transitions (the
# terminal one of each trajectory plus ~10% of the others), evaluate `ng.nabla_db_loss` with the
# four callables, backpropagate, then `sd.optimizer_step` (gradients averaged over processes,
# norms clipped separately for the LoRA and for $g_\phi$, **one** AdamW step — the official code
# takes two). Gradients reach the LoRA and $g_\phi$ only; the UNet's own weights are frozen.

# %%
steps = ng.subsample_steps(cfg.steps, cfg.subsample_fraction, len(prompts), gen)
batch = ng.gather_transitions(trajectory, schedule, steps)
print(f"trained steps per trajectory: {steps.tolist()} → {len(batch)} transitions")

optimizer = sd.make_optimizer(models, cfg)
loss, parts = ng.nabla_db_loss(batch, policy_eps, reference_eps, log_reward, flow, cfg.loss_config())
loss.backward()
print("loss parts:", {k: f"{float(v):.3g}" for k, v in parts.items()})
frozen = [p for p in models.unet.parameters() if not p.requires_grad]
print(f"gradients: LoRA {sum(p.grad is not None for p in sd.lora_parameters(models.unet))}/{len(sd.lora_parameters(models.unet))} tensors, "
      f"g_φ {sum(p.grad is not None for p in models.flow.parameters())}/{len(list(models.flow.parameters()))}, "
      f"frozen UNet weights {sum(p.grad is not None for p in frozen)}/{len(frozen)}")

accelerator = accelerate.Accelerator(cpu=True)
print("pre-clipping gradient norms:", sd.optimizer_step(optimizer, models, cfg, accelerator))
with torch.no_grad():
    gap = (policy_eps(batch.x, batch.t, batch.traj) - reference_eps(batch.x, batch.t, batch.traj)).abs().max()
_, after = ng.nabla_db_loss(batch, policy_eps, reference_eps, log_reward, flow, cfg.loss_config())
print(f"after the update: max |ε̂_θ − ε̂♯| = {float(gap):.2e}; trust-region term λ‖ε̂_θ − ε̂_old‖² = {float(after['trust_region']):.3g}")

# %% [markdown]
# ### 5b · The other flow targets: `--flow-target adjoint`, `mixed`, and adjoint matching
#
# The paper trains $g_\phi$ by bootstrapping (the default above). With `--flow-target adjoint` the
# driver first sweeps each trajectory once through the frozen reference (`sd.adjoint_sweep`, which
# calls `ng.lean_adjoint`: $a_T = \beta\nabla r(x_0)$, $a_i = J^\sharp(x_i)^\top a_{i+1}$, one VJP
# through the guided reference UNet per step, detached), and $g_\phi(x')$ + the guess is regressed on
# $a_{i+1}$ (no $L_B$); `--no-flow --flow-target adjoint` is adjoint matching (no guess, no
# $g_\phi$). Same batch, same callables, only the config changes.
#
# **Check:** the adjoint's terminal row is $\beta\nabla r(x_0)$ exactly, and only the paper's target
# has a reverse term.

# %%
for name, flags in (("adjoint", ["--flow-target", "adjoint"]), ("mixed λ=0.5", ["--flow-target", "mixed", "--adjoint-lambda", "0.5"]),
                    ("adjoint matching", ["--no-flow", "--flow-target", "adjoint"])):
    cfg_target = sd.parse_config(["--preset", "smoke", "--steps", "10", *flags])
    adjoint = sd.adjoint_sweep(models, schedule, trajectory, cond, prompts, cfg_target)
    _, parts_target = ng.nabla_db_loss(batch, policy_eps, reference_eps, log_reward,
                                       None if cfg_target.no_flow else flow, cfg_target.loss_config(), adjoint=adjoint)
    terminal_ok = torch.allclose(adjoint[:, -1], cfg.beta * ng.reward_gradient(log_reward, trajectory.final, traj)[0], atol=1e-6)
    print(f"{name:>16}: adjoint {tuple(adjoint.shape)}, a_T = β∇r(x_0): {terminal_ok}; "
          + ", ".join(f"{k} {float(v):.3g}" for k, v in parts_target.items()))

# %% [markdown]
# ## 6 · Save the LoRA, load it with `pipe.load_lora_weights`
#
# `sd.save_checkpoint` writes the LoRA in diffusers' format (plus $g_\phi$, the optimiser and the
# RNG states, for `--resume`). Any diffusers pipeline of the same base model loads it with
# `pipe.load_lora_weights(folder)`; the loaded UNet reproduces the finetuned one.

# %%
pipe = sd.load_pipeline(cfg, torch.float32)          # a fresh copy of the pretrained pipeline
with tempfile.TemporaryDirectory() as folder:
    checkpoint = Path(folder) / "epoch_0001"
    sd.save_checkpoint(checkpoint, models, optimizer, [gen], epoch=1, update=1, accelerator=accelerator)
    print("checkpoint:", sorted(p.name for p in checkpoint.iterdir()))
    with sd.quiet_library_logs():                    # (silences "no LoRA keys for the text encoder")
        pipe.load_lora_weights(checkpoint)
with torch.no_grad():
    loaded = pipe.unet(batch.x, batch.t, encoder_hidden_states=cond[batch.traj]).sample
    finetuned = models.unet(batch.x, batch.t, encoder_hidden_states=cond[batch.traj]).sample
print(f"max |loaded UNet − finetuned UNet| = {float((loaded - finetuned).abs().max()):.1e}")
image = pipe(prompts[0], guidance_scale=cfg.guidance_scale, eta=1.0, num_inference_steps=cfg.steps,
             height=cfg.resolution, width=cfg.resolution, generator=torch.Generator().manual_seed(0)).images[0]
print(f"pipe({prompts[0]!r}) → {image.size} image (noise: random tiny weights)")

# %% [markdown]
# ## 7 · The real run
#
# The loop above, repeated: `sd.train` samples 64 trajectories per epoch (prompts drawn from 45
# simple animals), trains on their subsampled transitions in updates of 64, checkpoints, writes
# sample grids and metrics. Defaults are the paper's aesthetic-reward run (SD v1.5, 50 DDIM(η=1)
# steps, guidance 5, 512², LoRA rank 8, β = 1e4, λ = 2e3, ~200 updates); the frozen weights run
# in bf16 on a GPU, the LoRA, $g_\phi$ and the reward in float32.
#
# ```bash
# # CPU smoke run (tiny pipeline, seconds)
# python sd_finetune.py --preset smoke --eval --out runs/smoke
#
# # one GPU; downloads SD v1.5, CLIP ViT-L/14 and the aesthetic MLP on first use
# python sd_finetune.py --reward aesthetic --out runs/aesthetic
# python sd_finetune.py --reward aesthetic --no-flow --out runs/aesthetic-noflow   # the "no flow" variant
# python sd_finetune.py --resume runs/aesthetic --eval                              # evaluate the last checkpoint
#
# # N GPUs
# accelerate launch --multi_gpu --num_processes 8 sd_finetune.py --reward aesthetic --out runs/aesthetic-8gpu
#
# # offline, with local copies of the three inputs
# export HF_HUB_OFFLINE=1 NABLA_GFN_MODEL=/data/sd15 NABLA_GFN_CLIP=/data/clip-l14 \
#        NABLA_GFN_AESTHETIC_HEAD=/data/sac+logos+ava1-l14-linearMSE.pth
# python sd_finetune.py --out runs/aesthetic
# ```
#
# If memory runs out, lower `--train-batch-size` and `--sample-batch-size` (gradient
# accumulation keeps 64 transitions per update). Every flag: `python sd_finetune.py --help`.
#
# **Use the result** — the LoRA of the last epoch (34 epochs × 6 updates by default):
#
# ```python
# from diffusers import DDIMScheduler, StableDiffusionPipeline
# pipe = StableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5").to("cuda")
# pipe.load_lora_weights("runs/aesthetic/checkpoints/epoch_0034")
# pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # the sampler it was trained for
# image = pipe("cat", guidance_scale=5.0, eta=1.0, num_inference_steps=50).images[0]
# ```
