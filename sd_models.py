"""The Stable Diffusion side of `nabla_gfn`'s callables: pipeline, LoRA policy, g_φ, guided ε̂, reward of
latents, the lean-adjoint sweep and sampling. sd_finetune.py trains with them; the notebooks and
benchmarks call them directly.

Two model families, told apart by the loaded pipeline's class (`FAMILIES`): Stable Diffusion 1.x/2.x
(`StableDiffusionPipeline`: a UNet predicting ε, sampled by DDIM(η = 1)) and Stable Diffusion 3 / 3.5
(`StableDiffusion3Pipeline`: an MMDiT transformer predicting the velocity v of the rectified flow
x_t = (1 − t) x_0 + t ε, sampled by the flow SDE with the marginals of its ODE, `flow_schedule`). Both steps
are Gaussian and affine in the model's output, so the loss, the sampler and the adjoint are the same
functions; only the model call (`denoise`), the prompt encoding and the schedule differ. `Models.unet` is
the denoiser of either family (SD3: the transformer); "ε̂" below is the model's output (SD3: v̂).

The policy P_F^θ is the pipeline's UNet with a LoRA on its attention projections; the reference P_F♯ is
the same UNet with the adapters switched off (`lora_disabled`), so no second copy of SD is held. Every
callable routes row n to its own trajectory's prompt through `traj` (the row's trajectory index), which
is how a batch of shuffled transitions from many prompts is scored. `cfg` arguments are sd_finetune's
Config (only the fields named are read).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

# Importing the SD pipeline touches CLIPImageProcessor, whose torchvision backend is missing here and
# unused (we preprocess in torch): drop only that notice, so that errors stay one line.
logging.getLogger("transformers.utils.import_utils").addFilter(lambda r: "torchvision" not in r.getMessage())

from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, SD3Transformer2DModel, StableDiffusion3Pipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from tqdm.auto import tqdm

import baselines
import nabla_gfn
from nabla_gfn import StepSchedule, Trajectory
from cli import UsageError
from sd_rewards import TINY, ClipEmbedder, MissingWeights, quiet_library_logs

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD35_HUB_ID = "stabilityai/stable-diffusion-3.5-medium"
TINY_SD3 = "tiny-sd3"
TINY_PIPELINES = {TINY: "model", TINY_SD3: "model_sd3"}  # --model value → its tiny build (tiny_models.TINY_WEIGHTS)
TINY_MODELS = tuple(TINY_PIPELINES)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# SD3's joint attention: the image stream's projections (as SD-1.5's) plus the text stream's
# add_{q,k,v}_proj and its output to_add_out, as Flow-GRPO's SD3.5 LoRA (yifan123/flow_grpo, train_sd3.py).
SD3_LORA_TARGETS = LORA_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass(frozen=True)
class Family:
    """What differs between the model families this rung trains (keyed by the pipeline's class name)."""

    pipeline: type
    flow: bool  # velocity model sampled by the flow SDE (`is_flow`), else ε-model sampled by DDIM(η = 1)
    hub_id: str  # the usual checkpoint, named in the missing-weights error
    load_kwargs: Tuple[Tuple[str, object], ...] = ()  # from_pretrained's extra arguments


FAMILIES = {
    "StableDiffusionPipeline": Family(StableDiffusionPipeline, False, SD15_HUB_ID,
                                      (("safety_checker", None), ("requires_safety_checker", False))),
    "StableDiffusion3Pipeline": Family(StableDiffusion3Pipeline, True, SD35_HUB_ID),
}
# SD3.5-Medium as Flow-GRPO trains it (yifan123/flow_grpo, config/grpo.py, e.g. pickscore_sd3; sde_step_with_logprob):
# 512², 10 sampling steps for training (40 for its evaluation), guidance 4.5, noise level a = 0.7, LoRA rank 32,
# alpha 64. β and λ of ∇-DB on SD3 have no published value: the SD-1.5 aesthetic run's are kept (a guess).
SD35_PRESET = dict(model=SD35_HUB_ID, resolution=512, steps=10, guidance_scale=4.5, noise_level=0.7, lora_rank=32,
                   lora_alpha=64.0, out="runs/sd3")


# ----------------------------------------------------------------------------------------------
# Models: pipeline, LoRA policy (P_F^θ), reference (P_F♯: adapters off), flow correction g_φ
# ----------------------------------------------------------------------------------------------


@dataclass
class Models:
    """Everything the loop runs. The policy P_F^θ is pipe.unet with its LoRA; P_F♯ the same, adapters off."""

    pipe: StableDiffusionPipeline
    lora: LoraConfig
    flow: Optional[UNet2DConditionModel]  # g_φ, None for --no-flow
    embedder: ClipEmbedder
    reward: nn.Module
    uncond: Tensor  # (1, L, D) embedding of the empty negative prompt (SD3: packed, `encode_prompts`)
    fast_dtype: Optional[torch.dtype] = None  # autocast dtype of sampling and the adjoint sweep (`unet_dtypes`)
    reward_chunk: int = 0  # rows per decode + score on the reward-gradient path (`latent_log_reward`); 0 = all

    @property
    def unet(self) -> nn.Module:
        """The denoiser the LoRA adapts: SD's UNet, SD3's transformer."""
        return denoiser(self.pipe)


def is_flow(pipe) -> bool:
    """Whether the pipeline's model is a rectified flow (SD3: velocity, flow SDE) rather than ε-prediction."""
    return isinstance(pipe, StableDiffusion3Pipeline)


def denoiser(pipe) -> nn.Module:
    return pipe.transformer if is_flow(pipe) else pipe.unet


def text_encoders(pipe) -> List[nn.Module]:
    """The pipeline's text encoders that are loaded (SD3 without T5: the two CLIPs)."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None]


def resolution_multiple(pipe) -> int:
    """--resolution must be a multiple of this: the VAE's downsampling times the UNet's (SD3: the patch size)."""
    net = denoiser(pipe)
    inner = net.config.patch_size if is_flow(pipe) else 2 ** (len(net.config.block_out_channels) - 1)
    return pipe.vae_scale_factor * inner


# ----------------------------------------------------------------------------------------------
# Device and precision
# ----------------------------------------------------------------------------------------------

# Linux driver each CUDA major's torch build needs (NVIDIA's CUDA release notes: 13.0 GA ≥ 580.65.06,
# 12.0 GA ≥ 525.60.13; later minor versions of the same major run on these through minor-version compatibility).
CUDA_MIN_DRIVER = {"13": "580.65.06", "12": "525.60.13"}


def no_gpu_reason() -> Optional[str]:
    """None when a CUDA (or MPS) device is usable; else one line saying why not and what to do."""
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return None
    cuda = torch.version.cuda
    if cuda is None:
        cause = f"the installed torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)"
    else:
        driver = CUDA_MIN_DRIVER.get(cuda.split(".")[0], f"the one CUDA {cuda} requires")
        cause = (f"the installed torch {torch.__version__} is a CUDA {cuda} build, which needs an NVIDIA driver "
                 f">= {driver} (nvidia-smi shows yours), or this machine has no NVIDIA GPU")
    return (f"no CUDA device found: {cause}; real Stable Diffusion on the CPU takes days, so this stops here: "
            f"pass --allow-cpu to run anyway, or --model tiny for a smoke run")


def weight_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def unet_dtypes(cfg, device: torch.device) -> Tuple[torch.dtype, Optional[torch.dtype]]:
    """(dtype the UNet's weights are held in, autocast dtype of sampling and the adjoint sweep or None).

    Why (docs/stable_diffusion.md, 'Numerics'): the forward residual (μ_θ − μ♯)/σ² is the difference of two UNet passes
    over σ² (down to ~4e-4); computed in bf16, each pass's rounding (~2⁻⁹ relative, on every layer) is
    larger than what a small LoRA changes, so the residual is rounding noise (tiny pipeline, bf16: the
    forward term at update 2 was 23.9 against 0.31 in fp32). With --residual-precision fp32/tf32 the
    loss's passes run on float32 weights without autocast; sampling, which takes no differences, keeps
    the cheaper --precision through autocast.
    """
    weights = weight_dtype(cfg.precision, device)
    if cfg.residual_precision == "same" or weights == torch.float32:
        return weights, None
    return torch.float32, weights


def set_float32_matmul(residual_precision: str) -> None:
    """IEEE float32 (fp32) or TF32 (tf32) matmuls and convolutions on CUDA; cuDNN's default is TF32.

    Set through `allow_tf32`, which in torch 2.14 also sets the per-backend `fp32_precision` of matmul,
    cuDNN conv and cuDNN RNN alike; setting `cudnn.conv.fp32_precision` alone leaves conv and RNN
    different, after which reading `torch.backends.cudnn.allow_tf32` raises (as any library may do).
    """
    if residual_precision != "same":
        torch.backends.cuda.matmul.allow_tf32 = residual_precision == "tf32"
        torch.backends.cudnn.allow_tf32 = residual_precision == "tf32"


def tiny_weight(name: str, cache_dir: str) -> str:
    """The local folder or file of Config field `name`'s tiny random build (tiny_models.py, built once)."""
    import tiny_models  # only --model tiny / 'tiny' weights need the builders

    return str(tiny_models.TINY_WEIGHTS[name](cache_dir))


def _missing_pipeline(cfg, err: Exception, family: Optional[Family]) -> MissingWeights:
    hub_id = family.hub_id if family else (SD35_HUB_ID if "diffusion-3" in cfg.model else SD15_HUB_ID)
    gated = " (gated: accept its licence on the hub page, then `hf auth login`)" if hub_id == SD35_HUB_ID else ""
    return MissingWeights(
        f"cannot load the Stable Diffusion pipeline {cfg.model!r} ({type(err).__name__}): pass --model with a local "
        f"diffusers folder or set NABLA_GFN_MODEL, or download the hub id {hub_id!r}{gated} while online "
        f"(HF_HUB_OFFLINE=1 forbids it); --model tiny (SD-1.5) or tiny-sd3 builds a random pipeline for smoke tests")


def load_pipeline(cfg, dtype: torch.dtype):
    """The diffusers pipeline of --model, its family read from its model_index.json (`FAMILIES`), frozen.

    SD: a DDIM scheduler of its config. SD3: its own FlowMatchEulerDiscreteScheduler (shifted timesteps),
    without T5 (text_encoder_3 = None, the pipeline's zero T5 tokens) with --no-t5. Reads cfg.model,
    cfg.cache_dir and cfg.t5.
    """
    source = tiny_weight(TINY_PIPELINES[cfg.model], cfg.cache_dir) if cfg.model in TINY_PIPELINES else cfg.model
    try:
        with quiet_library_logs(), warnings.catch_warnings():  # diffusers passes hf_hub a deprecated argument
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
            name = DiffusionPipeline.load_config(source)["_class_name"]
    except (OSError, ValueError) as err:
        raise _missing_pipeline(cfg, err, None) from None
    if name not in FAMILIES:
        raise UsageError(f"--model {cfg.model!r} is a {name}; accepted: {', '.join(FAMILIES)}")
    family = FAMILIES[name]
    no_t5 = family.flow and not cfg.t5
    try:
        with quiet_library_logs():
            pipe = family.pipeline.from_pretrained(source, dtype=dtype, **dict(family.load_kwargs), **(
                dict(text_encoder_3=None, tokenizer_3=None) if no_t5 else {}))
    except (OSError, ValueError) as err:
        raise _missing_pipeline(cfg, err, family) from None
    if not is_flow(pipe):  # DDIM(η=1) steps are Gaussian only without sample clipping; SD never clips its latents.
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    for module in (denoiser(pipe), pipe.vae, *text_encoders(pipe)):
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------
# The step: DDIM(η = 1) for SD, the flow SDE for SD3
# ----------------------------------------------------------------------------------------------


def flow_schedule(scheduler, num_steps: int, noise_level: float) -> StepSchedule:
    """`nabla_gfn.flow_schedule` on a diffusers FlowMatchEulerDiscreteScheduler with a static shift (SD3.5's 3)."""
    if scheduler.config.get("use_dynamic_shifting") or scheduler.config.get("invert_sigmas"):
        raise ValueError("flow_schedule takes a static shift (SD3's); dynamic shifting / inverted sigmas are not supported")
    return nabla_gfn.flow_schedule(scheduler, num_steps, noise_level)


def step_schedule(pipe, num_steps: int, noise_level: float) -> StepSchedule:
    """The Gaussian step of the pipeline's family: SD's DDIM(η = 1), SD3's flow SDE with noise level a."""
    if is_flow(pipe):
        return flow_schedule(pipe.scheduler, num_steps, noise_level)
    return nabla_gfn.ddim_schedule(pipe.scheduler, num_steps)


def add_lora(unet: nn.Module, rank: int, alpha: float) -> LoraConfig:
    """LoRA on the attention projections (peft, Gaussian init: A ~ N(0, 1/r), B = 0, so the policy
    starts exactly at the pretrained model): LORA_TARGETS of SD's UNet, SD3_LORA_TARGETS of SD3's
    transformer. LoRA weights are float32 whatever the denoiser's dtype."""
    targets = SD3_LORA_TARGETS if isinstance(unet, SD3Transformer2DModel) else LORA_TARGETS
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    unet.add_adapter(config)
    cast_training_params(unet, dtype=torch.float32)
    return config


def lora_parameters(unet: UNet2DConditionModel) -> List[nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def lora_layers(unet: UNet2DConditionModel) -> List[BaseTunerLayer]:
    return [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]


def parameter_groups(models: Models) -> Dict[str, List[nn.Parameter]]:
    groups = {"policy": lora_parameters(models.unet)}
    if models.flow is not None:
        groups["flow"] = list(models.flow.parameters())
    return groups


@contextmanager
def lora_disabled(layers: Sequence[BaseTunerLayer]):
    """The reference P_F♯: the same UNet with its adapters switched off. This is the loop of
    `unet.disable_adapters()` / `enable_adapters()`, over LoRA layers found once: their walk over
    all ~2000 modules of SD's UNet took ~15 ms of CPU per reference call here."""
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextmanager
def adapter_states(layers: Sequence[BaseTunerLayer], disabled: Sequence[bool]):
    """Each LoRA layer switched off (True) or on (False) as `disabled` says, restored after."""
    before = [layer.disable_adapters for layer in layers]
    for layer, off in zip(layers, disabled):
        layer.enable_adapters(not off)
    try:
        yield
    finally:
        for layer, off in zip(layers, before):
            layer.enable_adapters(not off)


_BLOCK_LORA_LAYERS: "weakref.WeakKeyDictionary[nn.Module, List[BaseTunerLayer]]" = weakref.WeakKeyDictionary()


def checkpoint_block(block: nn.Module, *args):
    """diffusers' `_gradient_checkpointing_func`: torch.utils.checkpoint, non-reentrant (so gradients with
    respect to the input x, which the guess, the reverse term and the lean adjoint take, still flow), whose
    recomputation in backward runs under the LoRA state of the forward. Why: the reference P_F♯ is the
    policy's UNet inside `lora_disabled`, which has exited when backward recomputes the block; diffusers'
    own function would recompute the reference's block with the adapters on (wrong gradients)."""
    if block not in _BLOCK_LORA_LAYERS:
        _BLOCK_LORA_LAYERS[block] = lora_layers(block)
    layers = _BLOCK_LORA_LAYERS[block]
    disabled = [layer.disable_adapters for layer in layers]
    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False,
                                             context_fn=lambda: (nullcontext(), _Reentering(layers, disabled)))


class _Reentering:
    """`adapter_states` as a context manager that may be entered again: backward with retain_graph
    (the reverse term's) recomputes a block once per pass."""

    def __init__(self, layers, disabled):
        self.layers, self.disabled, self.active = layers, disabled, []

    def __enter__(self):
        self.active.append(adapter_states(self.layers, self.disabled))
        self.active[-1].__enter__()

    def __exit__(self, *exc):
        return self.active.pop().__exit__(*exc)


def enable_gradient_checkpointing(models: "Models") -> None:
    """--gradient-checkpointing: the UNet (policy and reference), g_φ and the VAE decoder keep only their
    blocks' inputs in the forward and recompute each block in backward (`checkpoint_block`): activation
    memory of a block instead of the whole network, for about one more forward pass. Same numbers."""
    for module in (models.unet, models.flow, models.pipe.vae):
        if module is not None:
            module.enable_gradient_checkpointing(checkpoint_block)


def build_flow_net(unet: nn.Module, widths: Sequence[int]) -> UNet2DConditionModel:
    """g_φ(x, τ, prompt): a small conditional UNet over latents, output layer zeroed (g_φ ≡ 0 at init).

    Our architecture (the official one is not specified in the paper): one level per width, self- and
    cross-attention on all but the full-resolution level, timestep embedding as in SD. For SD3 it
    cross-attends to the packed prompt tokens (`encode_prompts`: the pooled embedding is one more token).
    """
    config = unet.config
    net = UNet2DConditionModel(
        sample_size=config.sample_size, in_channels=config.in_channels,
        out_channels=config.out_channels, block_out_channels=tuple(widths), layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(widths) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(widths) - 1) + ("UpBlock2D",),
        cross_attention_dim=config.get("cross_attention_dim") or config.joint_attention_dim, attention_head_dim=8,
    )
    return nabla_gfn.zero_output_layer(net, net.conv_out)


# ----------------------------------------------------------------------------------------------
# The callables nabla_gfn takes: ε̂ with guidance, reward of latents, g_φ — all routed by `traj`
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> Tensor:
    """(P, L, D) text-encoder embeddings, in the text encoder's dtype. SD3: its encode_prompt's tokens
    (CLIP-L and CLIP-G, then T5 or zeros) and pooled (P, D') embedding packed into one tensor (P, L + 1, D),
    the pooled one zero-padded as the last token (`unpack_sd3`), so that one row index selects both."""
    if not is_flow(pipe):
        return pipe.encode_prompt(list(prompts), pipe.device, 1, False)[0]
    tokens, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, pipe.device, 1, False)
    if pooled.shape[-1] > tokens.shape[-1]:
        raise ValueError(f"SD3 pooled embedding ({pooled.shape[-1]}) wider than its tokens ({tokens.shape[-1]})")
    return torch.cat([tokens, nn.functional.pad(pooled, (0, tokens.shape[-1] - pooled.shape[-1]))[:, None]], 1)


def unpack_sd3(context: Tensor, pooled_dim: int) -> Tuple[Tensor, Tensor]:
    """`encode_prompts`' SD3 packing undone: (N, L + 1, D) → tokens (N, L, D), pooled (N, pooled_dim)."""
    return context[:, :-1], context[:, -1, :pooled_dim]


def denoiser_dtype(unet: nn.Module) -> torch.dtype:
    """The dtype of the frozen denoiser's weights (LoRA weights are float32)."""
    return (unet.pos_embed.proj if isinstance(unet, SD3Transformer2DModel) else unet.conv_in).weight.dtype


def denoise(unet: nn.Module, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
    """One call of the denoiser on rows x (N, C, h, w) at timesteps t (N,) with context (N, L, D) from
    `encode_prompts`: SD's UNet ε̂; SD3's transformer v̂ (t = 1000·σ, the scheduler's timesteps)."""
    if isinstance(unet, SD3Transformer2DModel):
        tokens, pooled = unpack_sd3(context, unet.config.pooled_projection_dim)
        return unet(hidden_states=x, timestep=t, encoder_hidden_states=tokens, pooled_projections=pooled).sample
    return unet(x, t, encoder_hidden_states=context).sample


def unet_autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast to `dtype` (sampling, adjoint sweep) or nothing (None: the loss's passes, `unet_dtypes`)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def guided_eps(unet: nn.Module, cond: Tensor, uncond: Tensor, scale: float, lora: bool = True,
               autocast: Optional[torch.dtype] = None):
    """EpsFn of the guided policy (lora=True) or reference (lora=False) for rows whose prompt embedding
    is cond[traj]: one UNet call on [uncond; cond] rows, then ε̂ = ε_u + w (ε_c − ε_u), in float32.
    SD3 guides its velocity the same way (v̂ = v_u + w (v_c − v_u), its pipeline's CFG, the empty
    negative prompt's tokens and pooled embedding as uncond).
    The UNet runs in its weights' dtype, or under autocast to `autocast` when given."""
    dtype, layers = denoiser_dtype(unet), [] if lora else lora_layers(unet)

    def eps_fn(x: Tensor, t: Tensor, traj: Tensor) -> Tensor:
        context = torch.cat([uncond.expand(len(x), -1, -1), cond[traj]]).to(dtype)
        with lora_disabled(layers), unet_autocast(x.device, autocast):
            eps = denoise(unet, torch.cat([x, x]).to(dtype), torch.cat([t, t]), context)
        eps_uncond, eps_cond = eps.float().chunk(2)
        return nabla_gfn.classifier_free_guidance(eps_uncond, eps_cond, scale)

    return eps_fn


def conditional_eps(unet: nn.Module, cond: Tensor, autocast: Optional[torch.dtype] = None):
    """EpsFn of the unguided reference ε_c(x, prompt) (adapters off): one UNet call on N rows, float32."""
    dtype, layers = denoiser_dtype(unet), lora_layers(unet)

    def eps_fn(x: Tensor, t: Tensor, traj: Tensor) -> Tensor:
        with lora_disabled(layers), unet_autocast(x.device, autocast):
            return denoise(unet, x.to(dtype), t, cond[traj].to(dtype)).float()

    return eps_fn


def decode_latents(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """Latents (N, C, h, w) → images (N, 3, H, W) in [-1, 1], float32 (differentiable). SD3's VAE also
    has a shift: z / scaling_factor + shift_factor, as its pipeline decodes."""
    shift = vae.config.get("shift_factor") or 0.0
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample.float()


def latent_log_reward(vae: AutoencoderKL, reward: nn.Module, prompts: Sequence[str], chunk: int = 0):
    """LogRewardFn: decode, then score each row with the prompt of its own trajectory, prompts[traj].

    The reward path runs in the VAE's dtype (--vae-precision): float32 (the paper's), or the decoder in
    bf16 and the reward model under bf16 autocast. chunk > 0 (--reward-chunk): rows in chunks of `chunk`,
    each checkpointed while a gradient is being built, so that backward recomputes and holds one chunk's
    decoder and reward graph at a time (at 512² the decoder's graph is ~5.6 GiB per image in float32).
    Same numbers; one more forward of the decoder and reward model per chunk.
    """
    autocast = None if vae.dtype == torch.float32 else vae.dtype

    def score(x0: Tensor, traj: Tensor) -> Tensor:
        with unet_autocast(x0.device, autocast):
            return reward(decode_latents(vae, x0), [prompts[i] for i in traj.tolist()]).float()

    def log_reward(x0: Tensor, traj: Tensor) -> Tensor:
        if chunk <= 0 or len(x0) <= chunk or not (torch.is_grad_enabled() and x0.requires_grad):
            return score(x0, traj)
        return torch.cat([torch.utils.checkpoint.checkpoint(score, x0[rows], traj[rows], use_reentrant=False)
                          for rows in torch.arange(len(x0), device=x0.device).split(chunk)])

    return log_reward


def flow_score(flow: UNet2DConditionModel, cond: Tensor):
    """FlowFn g_φ(x, τ) conditioned on the row's prompt embedding cond[traj], float32."""
    return lambda x, t, traj: flow(x, t, encoder_hidden_states=cond[traj].float()).sample


def loss_callables(models: Models, cond: Tensor, prompts: Sequence[str], guidance: float):
    """(policy_eps, reference_eps, log_reward, flow) for trajectories with embeddings cond, texts prompts."""
    return (
        guided_eps(models.unet, cond, models.uncond, guidance, lora=True),
        guided_eps(models.unet, cond, models.uncond, guidance, lora=False),
        latent_log_reward(models.pipe.vae, models.reward, prompts, models.reward_chunk),
        None if models.flow is None else flow_score(models.flow, cond),
    )


def method_trainee(models: Models, schedule: StepSchedule, cond: Tensor, prompts: Sequence[str], groups: Tensor, cfg,
                   optimizer: torch.optim.Optimizer, backward) -> baselines.Trainee:
    """The registry's `Trainee` for a batch of B trajectories whose row b has prompt embedding cond[b], text
    prompts[b] and group id groups[b] (its prompt's index: GRPO's and KL-PG's groups): guided ε̂ of the
    policy and the reference, decode + reward, latent noise x_T, the LoRA group, the run's optimiser and
    `backward` (the run's: accelerate's, then the gradient all-reduce). float32 UNet passes (no autocast):
    the same ε̂ samples and trains, so PPO's π_old is the sampler's step exactly."""
    policy, reference, log_reward, _ = loss_callables(models, cond, prompts, cfg.guidance_scale)
    x_T = lambda n, gen: torch.randn(latent_shape(models, n, cfg.resolution), generator=gen, device=gen.device)
    group_of = lambda traj: groups.to(cond.device)[traj.to(cond.device)]
    return baselines.Trainee(policy, reference, log_reward, schedule, x_T, parameter_groups(models), optimizer,
                             backward=backward, group_of=group_of)


@torch.no_grad()
def recorded_eps(policy_eps, transitions, batch: int) -> Tensor:
    """ε̂_θ(x) of the sampling policy (the LoRA before this epoch's first update) in the loss's arithmetic.

    Why: trajectories sampled under bf16 autocast record a bf16 ε̂_old; the trust region λ‖ε̂_θ − ε̂_old‖²
    with ε̂_θ in float32 would then start at λ·(rounding)² instead of 0 (tiny pipeline: 0.47, twice the
    forward term) and pull the LoRA towards rounding noise. One no-grad pass per trained transition.
    """
    rows = torch.arange(len(transitions), device=transitions.x.device)
    return torch.cat([policy_eps(transitions.x[r], transitions.t[r], transitions.traj[r]) for r in rows.split(batch)])


def adjoint_sweep(models: Models, schedule: StepSchedule, trajectory: Trajectory, cond: Tensor,
                  prompts: Sequence[str], cfg) -> Optional[Tensor]:
    """The lean adjoint (B, T+1, *S) of this epoch's trajectories, or None when the flow target needs none.

    One sweep per trajectory, before training on its transitions: `nabla_gfn.lean_adjoint` through the
    frozen reference (adapters off, guided or unguided by --adjoint-jacobian), in chunks of
    --sample-batch-size trajectories (memory of one step of one chunk), detached. Row b of the result
    belongs to trajectory b, whose prompt is cond[b] / prompts[b]: the transitions find it by (traj, step).
    """
    if not cfg.needs_adjoint:
        return None
    if cfg.adjoint_jacobian == "guided":
        reference = guided_eps(models.unet, cond, models.uncond, cfg.guidance_scale, lora=False,
                               autocast=models.fast_dtype)
    else:
        reference = conditional_eps(models.unet, cond, models.fast_dtype)
    log_reward = latent_log_reward(models.pipe.vae, models.reward, prompts, models.reward_chunk)
    rows = torch.arange(len(trajectory.states), device=trajectory.states.device)
    chunks = [nabla_gfn.lean_adjoint(reference, schedule, Trajectory(trajectory.states[r], trajectory.eps[r]),
                                     log_reward, cfg.beta, traj=r)[0] for r in rows.split(cfg.sample_batch_size)]
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------------------
# Optimiser and processes (`cfg`: sd_finetune's Config)
# ----------------------------------------------------------------------------------------------


def make_accelerator(cfg) -> Accelerator:
    """accelerate, with the --report-to tracker (its files under --out) when one is asked for."""
    handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))]
    if cfg.report_to == "none":
        return Accelerator(kwargs_handlers=handlers)
    if importlib.util.find_spec("wandb" if cfg.report_to == "wandb" else "tensorboard") is None:
        raise UsageError(f"--report-to {cfg.report_to} needs the {cfg.report_to} package: pip install {cfg.report_to}")
    return Accelerator(log_with=cfg.report_to, project_dir=cfg.out, kwargs_handlers=handlers)


@dataclass(frozen=True)
class Plan:
    """Per-process sizes derived from the config and the number of processes."""

    trajectories: int  # sampled per epoch by this process
    transitions_per_trajectory: int  # terminal + subsampled
    grad_accum: int  # micro-batches of train_batch_size per update
    updates_per_epoch: int


def make_plan(cfg, num_processes: int) -> Plan:
    """The ∇-DB methods' sizes; another method makes one update per epoch on all this process's trajectories
    (--transitions-per-update does not apply: Plan(trajectories, steps, 1, 1); its forwards with a graph take
    --train-batch-size rows each, its sampling --sample-batch-size, `method_config`)."""
    if cfg.trajectories_per_epoch % num_processes:
        raise UsageError(f"--trajectories-per-epoch must be divisible by the {num_processes} processes "
                         f"(got {cfg.trajectories_per_epoch})")
    trajectories = cfg.trajectories_per_epoch // num_processes
    if baselines.METHODS[cfg.method].update is not baselines.nabla_db_update:
        if trajectories % cfg.images_per_prompt:
            raise UsageError(f"--images-per-prompt must divide the {trajectories} trajectories each process samples "
                             f"per epoch (got {cfg.images_per_prompt})")
        return Plan(trajectories, cfg.steps, 1, 1)
    if cfg.transitions_per_update % (cfg.train_batch_size * num_processes):
        raise UsageError(f"--transitions-per-update must be a multiple of --train-batch-size × processes = "
                         f"{cfg.train_batch_size * num_processes} (got {cfg.transitions_per_update})")
    per_trajectory = nabla_gfn.subsample_steps(cfg.steps, cfg.subsample_fraction, 1, torch.Generator()).shape[1]
    grad_accum = cfg.transitions_per_update // (cfg.train_batch_size * num_processes)
    updates = trajectories * per_trajectory // (cfg.train_batch_size * grad_accum)
    if updates < 1:
        raise UsageError(f"--transitions-per-update must be at most the {cfg.trajectories_per_epoch * per_trajectory} "
                         f"transitions an epoch yields (got {cfg.transitions_per_update})")
    return Plan(trajectories, per_trajectory, grad_accum, updates)


def make_optimizer(models: Models, cfg) -> torch.optim.AdamW:
    groups = [dict(params=lora_parameters(models.unet), lr=cfg.lr, weight_decay=cfg.weight_decay)]
    if models.flow is not None:
        groups.append(dict(params=list(models.flow.parameters()), lr=cfg.flow_lr, weight_decay=cfg.flow_weight_decay))
    return torch.optim.AdamW(groups, betas=(0.9, cfg.adam_beta2))


def average_gradients(params: Sequence[nn.Parameter], accelerator: Accelerator) -> None:
    """Mean of the gradients over processes, as one flat all-reduce (we do not wrap in DDP: the loss
    runs the UNet several times and takes input gradients of some runs)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def optimizer_step(optimizer, models: Models, cfg, accelerator: Accelerator) -> Dict[str, float]:
    """Average over processes, clip each group separately, ONE AdamW step (official code: two)."""
    groups = parameter_groups(models)
    average_gradients([p for ps in groups.values() for p in ps], accelerator)
    norms = nabla_gfn.clip_grad_norms(groups, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {f"grad_norm_{name}": value for name, value in norms.items()}


def assert_replicas_in_sync(models: Models, accelerator: Accelerator) -> None:
    """Every process must hold the same trainable weights (synchronised gradients, same init)."""
    params = [p for ps in parameter_groups(models).values() for p in ps]
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    sums = accelerator.gather(checksum)
    if not torch.all(sums == sums[0]):
        raise RuntimeError(f"processes hold different weights (checksums {sums.tolist()})")


def method_config(cfg, batch_size: int) -> baselines.MethodConfig:
    """This rung's fields → the registry's hyper-parameters (the method's loss overrides applied)."""
    return baselines.MethodConfig(
        beta=cfg.beta, batch_size=batch_size, fraction=cfg.subsample_fraction, grad_clip=cfg.max_grad_norm,
        loss=cfg.loss_config(), draft_k=cfg.draft_k, draft_kl=cfg.draft_kl, refl_start=cfg.refl_start,
        ppo_clip=cfg.ppo_clip, ppo_epochs=cfg.ppo_epochs, ppo_minibatches=cfg.ppo_minibatches,
        ppo_adv_clip=cfg.ppo_adv_clip, kl_coef=cfg.grpo_kl, micro_batch=cfg.train_batch_size,
        sample_batch=cfg.sample_batch_size)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def latent_shape(models: Models, n: int, resolution: int) -> Tuple[int, ...]:
    size = resolution // models.pipe.vae_scale_factor
    return (n, models.unet.config.in_channels, size, size)


@torch.no_grad()
def sample_trajectories(models: Models, schedule: StepSchedule, cond: Tensor, cfg,
                        generator: torch.Generator, lora: bool = True, desc: Optional[str] = None,
                        ) -> Trajectory:
    """B trajectories (B = len(cond)) of the policy (or reference), in batches of --sample-batch-size."""
    parts = []
    chunks = torch.arange(len(cond)).split(cfg.sample_batch_size)
    for rows in tqdm(chunks, desc=desc, disable=desc is None, leave=False):
        eps_fn = guided_eps(models.unet, cond[rows], models.uncond, cfg.guidance_scale, lora, models.fast_dtype)
        x_T = torch.randn(latent_shape(models, len(rows), cfg.resolution), generator=generator,
                          device=generator.device)
        parts.append(nabla_gfn.sample_trajectory(eps_fn, schedule, x_T, generator))
    return Trajectory(states=torch.cat([p.states for p in parts]), eps=torch.cat([p.eps for p in parts]))


@torch.no_grad()
def score_samples(models: Models, latents: Tensor, prompts: Sequence[str], batch: int) -> Tensor:
    """r(x_0) of each final latent with its own prompt, no gradient. (B,) float32."""
    log_reward = latent_log_reward(models.pipe.vae, models.reward, prompts)
    rows = torch.arange(len(latents), device=latents.device)
    return torch.cat([log_reward(latents[r], r) for r in rows.split(batch)])


@torch.no_grad()
def sample_images(models: Models, schedule: StepSchedule, prompts: Sequence[str], n: int, seed: int,
                  cfg, lora: bool = True) -> Tensor:
    """n images per prompt with fixed noise (seed + prompt index): (P, n, 3, H, W) in [-1, 1]."""
    images = []
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(models.pipe.device).manual_seed(seed + i)
        cond = encode_prompts(models.pipe, [prompt]).expand(n, -1, -1)
        final = sample_trajectories(models, schedule, cond, cfg, generator, lora).final
        images.append(torch.cat([decode_latents(models.pipe.vae, x) for x in final.split(cfg.sample_batch_size)]))
    return torch.stack(images)
