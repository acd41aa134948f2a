"""Stable Diffusion LoRA finetuning with ∇-GFlowNet: the driver around `nabla_gfn.py`.

Paper: Liu et al., "Efficient Diversity-Preserving Diffusion Alignment via Gradient-Informed
GFlowNets", ICLR 2025, arXiv:2412.07775. The math and the loss live in `nabla_gfn.py` and are used
unchanged; this script holds the config, the loop, logging and evaluation. Beside it: `sd_models.py`
(pipeline, LoRA, g_φ and the callables the loss takes), `sd_checkpoint.py` (crash-safe checkpoints and
logs), `sd_rewards.py` (the rewards), `sd_metrics.py` (eval metrics), `tiny_models.py` (the tiny random
builds of `--model tiny`), `cli.py` (flags from the Config dataclass). The defaults are the paper's aesthetic-reward run
(β = 1e4, λ = 2e3, 50 DDIM steps, guidance 5, LoRA rank 8, 200 updates of 64 transitions);
--preset aesthetic|hpsv2|imagereward names the paper's three runs. --model takes any StableDiffusion3Pipeline
too (SD3.5: --preset sd3, the flow SDE instead of DDIM; docs/stable_diffusion.md 'Stable Diffusion 3.5').

Run:
    python sd_finetune.py --reward aesthetic --out runs/aesthetic          # the paper's run, one GPU
    python sd_finetune.py --preset hpsv2 --eval --out runs/hpsv2           # its HPSv2 run, then DreamSim / FID
    accelerate launch --num_processes 8 sd_finetune.py --out runs/aesthetic-8gpu
    python sd_finetune.py --preset smoke --out runs/smoke                  # tiny random pipeline, CPU
    python sd_finetune.py --preset smoke --reward imagereward --eval       # any reward, tiny random builds
    python sd_finetune.py --resume runs/aesthetic --epochs 40              # continue exactly, extend
    python sd_finetune.py --resume runs/aesthetic --eval                   # evaluate the last checkpoint
    python sd_finetune.py --guess-from reference --out runs/ref-guess      # guess x̂_0 from the frozen model
    python sd_finetune.py --flow-target adjoint --out runs/adjoint         # g_φ fitted to the lean adjoint
    python sd_finetune.py --flow-target mixed --adjoint-lambda 0.5         # L_B's target blended with it
    python sd_finetune.py --method adjoint-matching --out runs/am          # = --no-flow --flow-target adjoint
    python sd_finetune.py --method ddpo --out runs/ddpo                    # or draft, refl, grpo, kl-pg, no-flow
Offline: --model DIR --clip-model DIR --aesthetic-head FILE (and --hpsv2-checkpoint, --pickscore-model,
--pickscore-processor, --imagereward-model, --imagereward-tokenizer, --dreamsim, --fid-weights), or the
variables named in --help (NABLA_GFN_MODEL, NABLA_GFN_CLIP, ...; NABLA_GFN_CACHE for the cache folder).
Use the result:  pipe.load_lora_weights("runs/aesthetic/checkpoints/epoch_0034").
Memory: the defaults (--gradient-checkpointing, --train-batch-size 2 with accumulation to 64, --reward-chunk 1)
aim at 20 GiB for aesthetic, 40 GiB for HPSv2/PickScore; on a large GPU --no-gradient-checkpointing
--train-batch-size 8 --reward-chunk 0 runs faster. Before `accelerate launch`, fetch once: --download-only.

One epoch: sample trajectories of the LoRA policy (each with a prompt drawn from the training
list), then train on a subsample of their transitions (the terminal one plus ~10%, one per equal
chunk of the chain) with `nabla_gfn.nabla_db_loss`, in updates of one AdamW step each. The other --method's
(baselines.py): one epoch = one update of the registry's, which samples its batch of the epoch's trajectories.

Deliberate differences from the authors' released code, each also flagged where it lives:
  * one optimiser step per update (theirs: two, with a GradScaler);
  * every reward call gets each row's own prompt, routed by `traj` (theirs: the last sampling batch's);
  * rank r samples with seed + r (theirs: every rank the same trajectories);
  * gradients are averaged across processes by one all-reduce per update instead of DDP, because
    the loss runs the UNet several times and differentiates some runs with respect to the input;
  * resume restores LoRA, g_φ, optimiser, RNG states and the step;
  * g_φ's architecture is ours (a 2-level conditional UNet, width set by --flow-channels).
Not in the paper: --guess-from reference, --weighting other than plain, and the flow targets adjoint
and mixed (and adjoint matching), which need one lean-adjoint sweep per trajectory (`adjoint_sweep`,
see nabla_gfn.lean_adjoint). Not implemented: other samplers than DDIM(η=1) / the flow SDE, text-encoder LoRA.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import accelerate
import baselines
import diffusers
import peft
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor, nn
from tqdm.auto import tqdm

import cli
import nabla_gfn
import sd_metrics
import sd_rewards
from cli import FRACTION, NON_NEGATIVE, OPEN_UNIT, POSITIVE, UsageError, opt
from nabla_gfn import LossConfig, StepSchedule, Trajectory
from sd_checkpoint import RunFolder, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from sd_models import (SD15_HUB_ID, SD35_PRESET, TINY_MODELS, Models, Plan, add_lora, adjoint_sweep,
                       assert_replicas_in_sync, average_gradients, build_flow_net, denoiser, denoiser_dtype,
                       enable_gradient_checkpointing, encode_prompts, load_pipeline, lora_parameters, loss_callables,
                       make_accelerator, make_optimizer, make_plan, method_config, method_trainee, no_gpu_reason,
                       optimizer_step, parameter_groups, recorded_eps, resolution_multiple, sample_images,
                       sample_trajectories, score_samples, set_float32_matmul, step_schedule, text_encoders,
                       tiny_weight, unet_dtypes, weight_dtype)
from sd_rewards import AESTHETIC_HEAD_URL, CLIP_HUB_ID, TINY, ClipEmbedder, MissingWeights, Source, quiet_library_logs

PROG = "sd_finetune.py"

# The 45 simple animals of DDPO and the official code; eval prompts are animals not among them.
ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf "
    "lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken "
    "duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()
EVAL_ANIMALS = "elephant giraffe panda penguin owl koala octopus crab".split()
# --method: the registry's methods but RTB, whose learned log Z sd_checkpoint does not save (resume would lose it).
METHODS = tuple(name for name in baselines.METHODS if name != "rtb")
NABLA_DB_METHODS = tuple(n for n in METHODS if baselines.METHODS[n].update is baselines.nabla_db_update)


class NonFinite(Exception):
    """NaN/Inf in the loss or the reward: the run saves its state and stops, exit status 1."""


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def _channels_ok(text: str) -> bool:
    try:
        return all(int(c) > 0 and int(c) % 32 == 0 for c in text.split(","))
    except ValueError:
        return False


@dataclass
class Config:
    """Every flag of the script; the defaults are the paper's aesthetic-reward run."""

    # run
    preset: str = opt("paper", "named settings applied before the other flags: 'paper' = 'aesthetic' = the "
                      "defaults below (the paper's aesthetic run); 'hpsv2', 'imagereward' = its other two runs "
                      "(reward, β, λ; see PRESETS); 'sd3' = SD3.5-Medium as Flow-GRPO trains it; 'smoke' = --model tiny at "
                      "32x32, 4 steps, 1 epoch (a CPU smoke run of seconds; with any --reward, or --model tiny-sd3)",
                      choices=("paper", "aesthetic", "hpsv2", "imagereward", "sd3", "smoke"))
    out: str = opt("runs/sd", "run folder: config.json, metrics.jsonl, trajectories.jsonl, samples/, "
                   "checkpoints/, eval.json")
    resume: str = opt("", "continue the run in this folder from its last checkpoint (flags given now "
                      "override its saved config, e.g. --epochs to extend it)")
    seed: int = opt(0, "seed of everything; process r samples with seed + r")
    eval: bool = opt(False, "after training, evaluate on the eval prompts (finetuned vs pretrained samples of "
                     "the same seeds): reward mean, DreamSim diversity, per-prompt FID to the pretrained samples, "
                     "CLIP-embedding diversity and Fréchet distance; writes eval.json (see sd_metrics.py)")
    download_only: bool = opt(False, "fetch every weight these flags need (pipeline, CLIP, the reward's, and the eval "
                              "models with --eval) into the caches, then exit: run it once, online, before a "
                              "multi-GPU launch (no GPU needed)")
    allow_cpu: bool = opt(False, "train a real (non-tiny) model without a CUDA device (slow: days); without it such "
                          "a run stops before loading anything")
    ddp_timeout: int = opt(7200, "seconds a process waits for the others in a collective (accelerate's "
                           "InitProcessGroupKwargs; NCCL's default of 600 s can fire while rank 0 loads or runs --eval)",
                           check=POSITIVE)
    report_to: str = opt("none", "also log each update's metrics to TensorBoard (under --out) or Weights & Biases "
                         "(pip install wandb), through accelerate's trackers", choices=("none", "tensorboard", "wandb"))
    # models
    model: str = opt(SD15_HUB_ID, "diffusers hub id or local folder of a Stable Diffusion (1.x/2.x) or Stable Diffusion 3 "
                     "pipeline, e.g. stabilityai/stable-diffusion-3.5-medium ($NABLA_GFN_MODEL overrides the default); "
                     "'tiny' / 'tiny-sd3' build a random tiny SD / SD3 pipeline for smoke tests", env="NABLA_GFN_MODEL")
    t5: bool = opt(True, "SD3: load the T5 text encoder; --no-t5 loads text_encoder_3=None (T5-XXL is most of the "
                   "weights' memory; the pipeline then feeds zeros for its tokens)")
    # Weights: a hub id, a local folder or file; $NABLA_GFN_... overrides each default; 'tiny' (implied by
    # --model tiny) = a tiny random build of the same architecture, or a random stand-in for the eval models.
    clip_model: str = opt(CLIP_HUB_ID, "CLIP ViT-L/14 of the aesthetic and clip-score rewards and the CLIP eval "
                          "metrics: hub id or local folder ($NABLA_GFN_CLIP)", env="NABLA_GFN_CLIP")
    aesthetic_head: str = opt(AESTHETIC_HEAD_URL, "LAION aesthetic MLP sac+logos+ava1-l14-linearMSE.pth: URL or "
                              "local file ($NABLA_GFN_AESTHETIC_HEAD)", env="NABLA_GFN_AESTHETIC_HEAD")
    hpsv2_checkpoint: str = opt(sd_rewards.HPSV2_HUB_ID, f"HPSv2.1 weights {sd_rewards.HPSV2_FILE}: hub id, "
                                "folder or file ($NABLA_GFN_HPSV2)", env="NABLA_GFN_HPSV2")
    pickscore_model: str = opt(sd_rewards.PICKSCORE_HUB_ID, "PickScore CLIPModel: hub id or folder "
                               "($NABLA_GFN_PICKSCORE)", env="NABLA_GFN_PICKSCORE")
    pickscore_processor: str = opt(sd_rewards.PICKSCORE_PROCESSOR_HUB_ID, "PickScore's CLIPProcessor (tokenizer and "
                                   "image settings): hub id or folder ($NABLA_GFN_PICKSCORE_PROCESSOR)",
                                   env="NABLA_GFN_PICKSCORE_PROCESSOR")
    imagereward_model: str = opt(sd_rewards.IMAGEREWARD_HUB_ID, "ImageReward v1.0 (ImageReward.pt and "
                                 "med_config.json): hub id or folder ($NABLA_GFN_IMAGEREWARD)", env="NABLA_GFN_IMAGEREWARD")
    imagereward_tokenizer: str = opt(sd_rewards.IMAGEREWARD_TOKENIZER_HUB_ID, "ImageReward's BERT tokenizer: hub "
                                     "id or folder ($NABLA_GFN_IMAGEREWARD_TOKENIZER)", env="NABLA_GFN_IMAGEREWARD_TOKENIZER")
    dreamsim: str = opt("", "DreamSim's weights folder for --eval, as dreamsim(cache_dir=DIR) fills it when online; "
                        "empty = CACHE_DIR/dreamsim ($NABLA_GFN_DREAMSIM)", env="NABLA_GFN_DREAMSIM")
    fid_weights: str = opt("", f"Inception weights {sd_metrics.FID_WEIGHTS_FILE} of the FID for --eval; empty = "
                           "torch-fidelity's download into torch.hub's cache ($NABLA_GFN_FID_WEIGHTS)",
                           env="NABLA_GFN_FID_WEIGHTS")
    trust_pickle: bool = opt(False, "load a reward checkpoint that torch.load(weights_only=True) refuses with "
                             "weights_only=False, i.e. run the code a pickle may carry: only for files you trust")
    cache_dir: str = opt(str(Path.home() / ".cache" / "nabla-gfn"), "cache for the tiny builds, the downloaded "
                         "aesthetic head and DreamSim ($NABLA_GFN_CACHE)", env="NABLA_GFN_CACHE")
    precision: str = opt("auto", "dtype of the frozen UNet, VAE and text encoder (LoRA, g_φ and the reward are "
                         "always float32): auto = bf16 on GPU, fp32 on CPU. fp16 has no loss scaling. With the "
                         "default --residual-precision fp32 the UNet's weights are held in float32 and this dtype is "
                         "the autocast dtype of sampling and of the lean-adjoint sweep", choices=("auto", "bf16", "fp16", "fp32"))
    residual_precision: str = opt("fp32", "arithmetic of the loss's UNet passes (ε̂_θ and ε̂♯, whose difference over "
                                  "σ² is the forward residual, and their VJPs): fp32 = IEEE float32, TF32 off (the "
                                  "default: bf16/fp16/TF32 turn the residual into rounding noise, docs/stable_diffusion.md 'Numerics'); "
                                  "tf32; same = the --precision dtype (the official code's all-bf16)",
                                  choices=("fp32", "tf32", "same"))
    vae_precision: str = opt("fp32", "dtype of the VAE decoder and the reward model on the reward path (its gradient "
                             "is the loss's target): fp32 (the paper's) or bf16 (decoder in bf16, reward under bf16 "
                             "autocast; less memory)", choices=("fp32", "bf16"))
    gradient_checkpointing: bool = opt(True, "recompute the UNet's, g_φ's and the VAE decoder's blocks in backward "
                                       "instead of storing their activations (about one more forward; same numbers)")
    reward_chunk: int = opt(1, "images decoded and scored at once on the reward-gradient path, each chunk "
                            "recomputed in backward (0 = all rows of the batch at once)", check=NON_NEGATIVE)
    # sampler
    resolution: int = opt(512, "image height and width in pixels", check=(lambda v: v > 0 and v % 8 == 0,
                                                                        "must be a positive multiple of 8"))
    steps: int = opt(50, "denoising steps T (DDIM(η=1); SD3: flow-SDE steps on the scheduler's shifted grid)", check=POSITIVE)
    noise_level: float = opt(0.7, "SD3: a of the flow SDE's σ_t = a√(t/(1−t)) (Flow-GRPO's 0.7)", check=POSITIVE)
    guidance_scale: float = opt(5.0, "classifier-free guidance w (empty negative prompt) of policy and reference",
                                check=NON_NEGATIVE)
    method: str = opt("nabla-db", "finetuning method (baselines.METHODS): nabla-db (the paper's), no-flow (= --no-flow), "
                      "adjoint-matching (= --no-flow --flow-target adjoint), draft, refl, ddpo, grpo, kl-pg; the last five "
                      "sample one batch of --trajectories-per-epoch per epoch and make one update of it (rtb: not here, "
                      "its log Z is not checkpointed). docs/stable_diffusion.md 'Baselines'", choices=METHODS)
    # reward and target
    reward: str = opt("aesthetic", "reward r = log R (sd_rewards.py): aesthetic (LAION predictor on CLIP ViT-L/14, "
                      "the paper's), hpsv2 (HPSv2.1), pickscore (PickScore v1), imagereward (ImageReward v1.0), "
                      "clip-score (cosine of CLIP image and prompt embeddings)", choices=sd_rewards.REWARDS)
    beta: float = opt(1e4, "β, reward scale of the target p♯·R^β (1e4 is the paper's value for aesthetic)",
                      check=(lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0"))
    trust_region: float = opt(2e3, "λ, weight of ‖ε̂_θ − ε̂_old‖² (2e3 is the paper's value for aesthetic)",
                              check=NON_NEGATIVE)
    gamma: str = opt("alpha_bar", "γ_τ damping of the forward-looking guess", choices=nabla_gfn.GAMMA_CHOICES)
    weighting: str = opt("plain", "per-transition weighting of the residuals, see "
                         "nabla_gfn.transition_weight(s); plain is the paper's", choices=nabla_gfn.WEIGHTING_CHOICES)
    guess_from: str = opt("policy", "whose x̂_0 the forward-looking guess β γ_τ ∇r(x̂_0) uses: policy (ε̂_θ, the "
                         "paper's) or reference (the frozen pretrained ε̂♯; not in the paper, the toys' better choice)",
                         choices=nabla_gfn.GUESS_CHOICES)
    reverse_weight: float = opt(1.0, "w_B, weight of the reverse term L_B", check=NON_NEGATIVE)
    no_flow: bool = opt(False, "the 'no flow' variant: no g_φ, no L_B (forward loss with the guess alone; with "
                        "--flow-target adjoint: adjoint matching, the policy's residual fitted to the lean adjoint)")
    flow_target: str = opt("bootstrap", "what the flow estimate is trained on (nabla_gfn.LossConfig.flow_target): "
                           "bootstrap = the paper (g_φ by L_F's g-line and L_B); adjoint = guess + g_φ at x' fitted to "
                           "the lean adjoint a_{i+1}, no L_B; mixed = L_B's target (1-λ)·bootstrap + λ·a_i. With "
                           "--no-flow, adjoint = adjoint matching (Domingo-Enrich et al. 2025). adjoint and mixed "
                           "sweep the lean adjoint once per trajectory through the frozen reference UNet",
                           choices=nabla_gfn.FLOW_TARGET_CHOICES)
    adjoint_lambda: float = opt(0.5, "λ of --flow-target mixed: weight of the lean adjoint in L_B's target",
                                check=(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    adjoint_jacobian: str = opt("guided", "reference whose step-mean Jacobian the lean-adjoint sweep uses: guided "
                                "(ε_u + w(ε_c − ε_u), exact for the guided target) or unguided (ε_c alone, one UNet "
                                "call on N rows: Adjoint Matching's choice)", choices=("guided", "unguided"))
    # the other methods (baselines.py); defaults from each paper's SD runs
    images_per_prompt: int = opt(4, "draft, refl, ddpo, grpo, kl-pg: trajectories sampled per drawn prompt (GRPO's and "
                                 "KL-PG's groups; ours: Flow-GRPO's groups are larger)", check=POSITIVE)
    draft_k: int = opt(1, "DRaFT-K: last sampling steps the reward gradient flows through (DRaFT-1, Clark et al.)",
                       check=POSITIVE)
    draft_kl: float = opt(0.0, "DRaFT-K: weight of the per-step KL to P_F♯ on those steps (0 = off, as in DRaFT)",
                          check=NON_NEGATIVE)
    refl_start: float = opt(0.75, "ReFL: stop at a uniform step in [refl_start·T, T−1] (ImageReward: 30–39 of 40)",
                            check=FRACTION)
    ppo_clip: float = opt(1e-4, "DDPO, GRPO, KL-PG: PPO clip range of the per-step ratio (DDPO's and Flow-GRPO's 1e-4)",
                          check=POSITIVE)
    ppo_epochs: int = opt(1, "DDPO, GRPO, KL-PG: inner epochs over each sampled batch (DDPO's 1)", check=POSITIVE)
    ppo_minibatches: int = opt(4, "DDPO, GRPO, KL-PG: minibatches of the batch's transitions per inner epoch, one "
                               "optimiser step each, in forwards of --train-batch-size (docs/stable_diffusion.md)", check=POSITIVE)
    ppo_adv_clip: float = opt(5.0, "DDPO, GRPO: clip of the normalised advantages (DDPO's and Flow-GRPO's 5)",
                              check=POSITIVE)
    grpo_kl: float = opt(0.04, "GRPO: weight of the per-step KL to P_F♯ (Flow-GRPO's default on SD3.5)", check=NON_NEGATIVE)
    # policy
    lora_rank: int = opt(8, "LoRA rank on to_q, to_k, to_v, to_out.0 of the UNet", check=POSITIVE)
    lora_alpha: float = opt(8.0, "LoRA alpha (scale = alpha / rank)", check=POSITIVE)
    lr: float = opt(1e-3, "AdamW learning rate of the LoRA", check=POSITIVE)
    adam_beta2: float = opt(0.999, "AdamW β2 of both groups; the authors advise 0.95 for stability", check=OPEN_UNIT)
    weight_decay: float = opt(1e-4, "AdamW weight decay of the LoRA (diffusers' training default)",
                              check=NON_NEGATIVE)
    max_grad_norm: float = opt(1.0, "gradient-norm clip, applied separately to the LoRA and to g_φ", check=POSITIVE)
    # flow correction g_φ
    flow_channels: str = opt("128,256", "g_φ's UNet widths per level, comma-separated multiples of 32",
                             check=(_channels_ok, "must be comma-separated positive multiples of 32"))
    flow_lr: float = opt(1e-3, "AdamW learning rate of g_φ", check=POSITIVE)
    flow_weight_decay: float = opt(1e-2, "AdamW weight decay of g_φ", check=NON_NEGATIVE)
    # loop
    epochs: int = opt(34, "epochs of sample-then-train (34 × 6 updates ≈ the paper's 200 updates)",
                      check=NON_NEGATIVE)
    trajectories_per_epoch: int = opt(64, "trajectories sampled per epoch, over all processes", check=POSITIVE)
    sample_batch_size: int = opt(8, "trajectories per sampling batch, per process", check=POSITIVE)
    subsample_fraction: float = opt(0.1, "fraction of non-terminal transitions trained on (the terminal one "
                                    "always is)", check=FRACTION)
    transitions_per_update: int = opt(64, "transitions per optimiser step, over all processes and "
                                      "accumulation steps", check=POSITIVE)
    train_batch_size: int = opt(2, "transitions (∇-DB; other methods: rows) per forward/backward, per process, "
                                "gradients accumulated (∇-DB: transitions_per_update / (train_batch_size · processes) "
                                "micro-batches); 2 with checkpointing fits the default run in 20 GiB", check=POSITIVE)
    # data
    prompts: str = opt("", "text file with one training prompt per line; empty = the 45 simple animals")
    eval_prompts: str = opt("", "text file of held-out prompts for sample grids and --eval; "
                            "empty = 8 animals not in the training list")
    # outputs
    grid_every: int = opt(5, "write a sample grid every this many epochs (and after the last)", check=POSITIVE)
    grid_prompts: int = opt(4, "eval prompts in each sample grid (rows)", check=POSITIVE)
    grid_seeds: int = opt(4, "fixed seeds per prompt in each sample grid (columns)", check=POSITIVE)
    save_every: int = opt(5, "checkpoint every this many epochs (and after the last)", check=POSITIVE)
    keep_checkpoints: int = opt(0, "keep only the last K epoch checkpoints (0 = keep all); older ones are deleted "
                                "after each complete save", check=NON_NEGATIVE)
    eval_samples_per_prompt: int = opt(8, "samples per eval prompt for --eval", check=(lambda v: v >= 2,
                                                                                       "must be >= 2"))
    eval_seed: int = opt(1234, "seed of the fixed eval and grid noise")

    def __post_init__(self):
        cli.validate(self)
        if self.no_flow and self.flow_target == "mixed":
            raise UsageError("--flow-target mixed blends L_B's target and needs g_φ: drop --no-flow, or use --no-flow "
                             "with --flow-target bootstrap (guess alone) or adjoint (adjoint matching)")
        if self.no_flow and self.method == "nabla-db":  # the older spelling of the two ∇-DB methods without g_φ
            self.method = "adjoint-matching" if self.flow_target == "adjoint" else "no-flow"
        method = baselines.METHODS[self.method]  # its loss_overrides say what no-flow / adjoint-matching mean
        self.no_flow = method.module != "flow"
        self.flow_target = method.loss_overrides.get("flow_target", self.flow_target)
        if self.draft_k > self.steps:
            raise UsageError(f"--draft-k: must be in 1..--steps ({self.steps}) (got {self.draft_k})")
        for name in ("prompts", "eval_prompts"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise UsageError(f"{cli.flag(name)}: no such file {getattr(self, name)!r}")

    @property
    def flow_widths(self) -> Tuple[int, ...]:
        return tuple(int(c) for c in self.flow_channels.split(","))

    def loss_config(self) -> LossConfig:
        return baselines.METHODS[self.method].loss_config(LossConfig(
            beta=self.beta, trust_region=self.trust_region, reverse_weight=self.reverse_weight, gamma=self.gamma,
            weighting=self.weighting, guess_from=self.guess_from, flow_target=self.flow_target,
            adjoint_lambda=self.adjoint_lambda))

    @property
    def needs_adjoint(self) -> bool:
        """Whether the loss needs the lean adjoint of each trajectory (every target but the paper's)."""
        return self.method in NABLA_DB_METHODS and self.flow_target != "bootstrap"


# The paper's three runs, as deltas of the defaults. aesthetic: β and λ as the paper states them (the
# authors' released default config has 1e3 and 1e3). hpsv2: β = 1e4, λ = 1e2 from the official config/hpsv2.py; it trains on HPDv2's
# photo + painting benchmark prompts, which this repository does not ship: pass them with --prompts FILE.
# imagereward: the released code has no config for it and we found no published β, λ or prompt list, so
# the aesthetic run's values are used (the authors' later VGG-Flow trains ImageReward on DrawBench).
PRESETS: Dict[str, dict] = {
    "paper": {},
    "aesthetic": dict(reward="aesthetic", beta=1e4, trust_region=2e3, out="runs/aesthetic"),
    "hpsv2": dict(reward="hpsv2", beta=1e4, trust_region=1e2, out="runs/hpsv2"),
    "imagereward": dict(reward="imagereward", beta=1e4, trust_region=2e3, out="runs/imagereward"),
    "smoke": dict(model=TINY, out="runs/smoke", resolution=32, steps=4, epochs=1, trajectories_per_epoch=4,
                  sample_batch_size=4, transitions_per_update=4, train_batch_size=2, flow_channels="32,32",
                  grid_every=1, grid_prompts=2, grid_seeds=2, save_every=1, eval_samples_per_prompt=2,
                  gradient_checkpointing=False, reward_chunk=0,  # same numbers without recomputation (tested)
                  images_per_prompt=2),
    "sd3": SD35_PRESET,  # sources and guesses: sd_models.SD35_PRESET
}


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
    """Flags → Config: dataclass defaults, then the preset, then the flags given (or, with --resume,
    the run's saved config, then the flags given). --model tiny implies 'tiny' for every weight."""
    given = cli.given_flags(Config, argv, PROG, __doc__.split("\n\n")[0])
    if "resume" in given:
        saved = Path(given["resume"]) / "config.json"
        if not saved.is_file():
            raise UsageError(f"--resume: {given['resume']!r} holds no run (no config.json)")
        if given.get("out", given["resume"]) != given["resume"]:
            raise UsageError("--out: a resumed run writes into its own folder; drop --out or make it equal --resume")
        values = {**json.loads(saved.read_text())["config"], **given, "out": given["resume"]}
    else:
        values = cli.with_preset(Config, PRESETS, given)
        if values["model"] in TINY_MODELS:
            values.update({k: TINY for k in WEIGHT_FIELDS if k not in given})
    cli.refuse_fixed(values, given)
    return Config(**values)


# ----------------------------------------------------------------------------------------------
# Models and rewards (the models' callables live in sd_models.py)
# ----------------------------------------------------------------------------------------------


WEIGHT_FIELDS = ("clip_model", "aesthetic_head", "hpsv2_checkpoint", "pickscore_model", "pickscore_processor",
                 "imagereward_model", "imagereward_tokenizer", "dreamsim", "fid_weights")
# The weights each reward loads (besides the CLIP every run loads for the CLIP eval metrics).
REWARD_WEIGHTS = {"aesthetic": ("aesthetic_head",), "clip-score": (), "hpsv2": ("hpsv2_checkpoint",),
                  "pickscore": ("pickscore_model", "pickscore_processor"),
                  "imagereward": ("imagereward_model", "imagereward_tokenizer")}


def weight_source(cfg: Config, name: str) -> Source:
    """Config field `name` as a sd_rewards.Source (its value, flag and variable); 'tiny' resolved to its
    tiny build (the eval stand-ins of --dreamsim / --fid-weights stay 'tiny': sd_metrics makes them)."""
    value = getattr(cfg, name)
    if value == TINY and name not in ("dreamsim", "fid_weights"):
        value = tiny_weight(name, cfg.cache_dir)
    env = next(f.metadata["env"] for f in dataclasses.fields(Config) if f.name == name)
    return Source(value, cli.flag(name), env, cfg.trust_pickle)


def load_clip(cfg: Config, device) -> ClipEmbedder:
    return sd_rewards.load_clip(weight_source(cfg, "clip_model"), device)


def build_reward(cfg: Config, embedder: ClipEmbedder) -> nn.Module:
    """reward(images in [-1, 1] (N, 3, H, W), prompts (N,)) → r (N,), float32."""
    sources = {name: weight_source(cfg, name) for name in REWARD_WEIGHTS[cfg.reward]}
    with quiet_library_logs():
        return sd_rewards.load_reward(cfg.reward, sources, embedder, cfg.cache_dir)


def load_models(cfg: Config, device, dtype: torch.dtype) -> Models:
    """Pipeline (frozen, `dtype`; its UNet in float32 when `unet_dtypes` says so, its VAE in
    --vae-precision), LoRA (float32), g_φ (float32), CLIP and reward (float32)."""
    unet_dtype, fast_dtype = unet_dtypes(cfg, torch.device(device))
    pipe = load_pipeline(cfg, unet_dtype)
    with quiet_library_logs():
        pipe.vae.to(weight_dtype(cfg.vae_precision, device)), [encoder.to(dtype) for encoder in text_encoders(pipe)]
    pipe.to(device)
    multiple = resolution_multiple(pipe)
    if cfg.resolution % multiple:
        raise UsageError(f"--resolution must be a multiple of {multiple} for this model (VAE × UNet downsampling; "
                         f"got {cfg.resolution})")
    embedder = load_clip(cfg, device)
    reward = build_reward(cfg, embedder)
    lora = add_lora(denoiser(pipe), cfg.lora_rank, cfg.lora_alpha)
    flow = None if cfg.no_flow else build_flow_net(denoiser(pipe), cfg.flow_widths).to(device)
    models = Models(pipe, lora, flow, embedder, reward, encode_prompts(pipe, [""]), fast_dtype, cfg.reward_chunk)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(models)
    return models


def download_weights(cfg: Config) -> None:
    """--download-only: load (so fetch into the caches) every weight the flags need, on the CPU, and exit."""
    pipe = load_pipeline(cfg, torch.bfloat16)
    embedder = load_clip(cfg, "cpu")
    build_reward(cfg, embedder)
    if cfg.eval:
        evaluator = sd_metrics.load_evaluator(embedder, weight_source(cfg, "dreamsim"), weight_source(cfg, "fid_weights"),
                                              cfg.cache_dir, "cpu")
        if evaluator.unavailable:
            raise MissingWeights("; ".join(f"eval: {k} unavailable: {v}" for k, v in evaluator.unavailable.items()))
    print(f"--download-only: {cfg.model} ({type(pipe).__name__}), {cfg.clip_model} and the {cfg.reward} reward's "
          f"weights{' and the eval models' if cfg.eval else ''} are cached")


# ----------------------------------------------------------------------------------------------
# Session: what one run holds (its Plan, optimiser and processes: sd_models.py; checkpoints and the run
# folder: sd_checkpoint.py)
# ----------------------------------------------------------------------------------------------


def read_prompts(path: str, default: Sequence[str]) -> List[str]:
    if not path:
        return list(default)
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"prompt file {path!r} is empty")
    return prompts


@dataclass
class Session:
    """What one run holds: config, accelerate, models, optimiser, RNGs, prompts, outputs and progress."""

    cfg: Config
    accelerator: Accelerator
    plan: Plan
    models: Models
    schedule: StepSchedule
    optimizer: torch.optim.AdamW
    noise_gen: torch.Generator  # initial noise and step noise (a CUDA generator on GPU)
    index_gen: torch.Generator  # prompts, subsamples, shuffles (the same generator on CPU)
    train_prompts: List[str]
    prompt_embeds: Tensor  # (P, L, D) of train_prompts
    eval_prompts: List[str]
    folder: RunFolder
    epoch: int = 0  # epochs done
    update: int = 0  # updates done

    @property
    def generators(self) -> List[torch.Generator]:
        return [self.noise_gen] if self.index_gen is self.noise_gen else [self.noise_gen, self.index_gen]

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def start_session(cfg: Config) -> Session:
    """Load everything, resume from the last checkpoint with --resume, write config.json, start trackers."""
    if cfg.model not in TINY_MODELS and not cfg.allow_cpu and no_gpu_reason():
        raise UsageError(no_gpu_reason())
    accelerator = make_accelerator(cfg)
    plan = make_plan(cfg, accelerator.num_processes)
    if not cfg.resume and (Path(cfg.out) / "config.json").exists():
        raise UsageError(f"--out {cfg.out!r} already holds a run: pass --resume {cfg.out} to continue it, "
                         f"or choose another --out")
    train_prompts = read_prompts(cfg.prompts, ANIMALS)
    eval_prompts = read_prompts(cfg.eval_prompts, EVAL_ANIMALS)
    device = accelerator.device
    torch.manual_seed(cfg.seed)  # same on every process: identical LoRA and g_φ initialisation
    with accelerator.main_process_first():  # the tiny builds and downloads are made once
        models = load_models(cfg, device, weight_dtype(cfg.precision, device))
    set_float32_matmul(cfg.residual_precision)
    if cfg.model in TINY_MODELS and accelerator.is_main_process:
        print(f"--model {cfg.model}: a tiny randomly initialised pipeline for smoke tests, not a real model "
              f"(cached in {cfg.cache_dir})")
    # Process r draws noise, prompts, subsamples and shuffles from seed + r. On CPU one generator
    # serves both; on GPU the noise comes from a CUDA generator.
    noise_gen = torch.Generator(device).manual_seed(cfg.seed + accelerator.process_index)
    index_gen = noise_gen if device.type == "cpu" else torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    session = Session(cfg, accelerator, plan, models, step_schedule(models.pipe, cfg.steps, cfg.noise_level),
                      make_optimizer(models, cfg), noise_gen, index_gen, train_prompts,
                      encode_prompts(models.pipe, train_prompts), eval_prompts,
                      RunFolder(Path(cfg.out), accelerator.is_main_process))
    if cfg.resume:
        resume(session)
    if session.is_main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
    derived = {**dataclasses.asdict(plan), "processes": accelerator.num_processes,
               "weight_dtype": str(denoiser_dtype(models.unet)),
               "sampling_autocast": str(models.fast_dtype) if models.fast_dtype else "none"}
    session.folder.write_json("config.json", {"config": dataclasses.asdict(cfg), "derived": derived,
                                              "command": sys.argv, "versions": _versions()})
    if cfg.report_to != "none":
        accelerator.init_trackers("sd_finetune", config=dataclasses.asdict(cfg),
                                  init_kwargs={"wandb": {"dir": cfg.out}} if cfg.report_to == "wandb" else {})
    return session


def resume(session: Session) -> None:
    checkpoint = latest_checkpoint(Path(session.cfg.out))
    if checkpoint is None:
        raise UsageError(f"--resume: {session.cfg.resume!r} has no checkpoint yet")
    session.epoch, session.update = load_checkpoint(checkpoint, session.models, session.optimizer,
                                                    session.generators, session.accelerator)
    session.folder.truncate("metrics.jsonl", "update", session.update)
    session.folder.truncate("trajectories.jsonl", "epoch", session.epoch - 1)  # epochs 0 .. epoch-1 are done
    if session.is_main:
        print(f"resumed from {checkpoint} (epoch {session.epoch}, update {session.update})")


def save_grid(session: Session, epoch: int) -> None:
    cfg = session.cfg
    if session.is_main and (epoch % cfg.grid_every == 0 or epoch == cfg.epochs):
        images = sample_images(session.models, session.schedule, session.eval_prompts[: cfg.grid_prompts],
                               cfg.grid_seeds, cfg.eval_seed, cfg)
        session.folder.save_grid(f"epoch_{epoch:04d}.png", images, session.models.pipe)


def checkpoint(session: Session, name: str, epoch: int) -> Path:
    assert_replicas_in_sync(session.models, session.accelerator)
    return save_checkpoint(Path(session.cfg.out) / "checkpoints" / name, session.models, session.optimizer,
                           session.generators, epoch, session.update, session.accelerator)


def log_update(session: Session, record: dict) -> None:
    """One update's line of metrics.jsonl, and the same numbers to the --report-to tracker."""
    session.folder.append("metrics.jsonl", [record])
    if session.cfg.report_to != "none":
        session.accelerator.log({k: v for k, v in record.items() if k not in ("update", "epoch")}, step=record["update"])


# ----------------------------------------------------------------------------------------------
# Training: one epoch = sample, then updates on the subsampled transitions
# ----------------------------------------------------------------------------------------------


def sample_epoch(s: Session, epoch: int) -> Tuple[Trajectory, Tensor, List[str], Dict[str, float]]:
    """This process's trajectories of one epoch, each with a prompt drawn from the training list.

    Returns the trajectories, their prompt embeddings (B, L, D) and texts (the conditioning the loss
    routes by `traj`) and the reward mean/std over all processes; logs one row per trajectory.
    """
    prompt_ids = torch.randint(len(s.train_prompts), (s.plan.trajectories,), generator=s.index_gen)
    cond = s.prompt_embeds[prompt_ids.to(s.prompt_embeds.device)]
    prompts = [s.train_prompts[i] for i in prompt_ids]
    trajectory = sample_trajectories(s.models, s.schedule, cond, s.cfg, s.noise_gen,
                                     desc=f"sample epoch {epoch}" if s.is_main else None)
    rewards = score_samples(s.models, trajectory.final, prompts, s.cfg.sample_batch_size)
    rows = gather_object([dict(epoch=epoch, rank=s.accelerator.process_index, trajectory=i, prompt=p, reward=float(r))
                          for i, (p, r) in enumerate(zip(prompts, rewards))])
    s.folder.append("trajectories.jsonl", rows)
    all_rewards = torch.tensor([r["reward"] for r in rows])
    if not torch.isfinite(all_rewards).all():
        raise NonFinite("non-finite reward of a sampled trajectory")
    return trajectory, cond, prompts, dict(reward_mean=float(all_rewards.mean()),
                                           reward_std=float(all_rewards.std(correction=0)))


def epoch_transitions(s: Session, trajectory: Trajectory, cond: Tensor, prompts: Sequence[str]):
    """What this epoch's updates train on: (transitions, shuffled row order, loss callables, lean adjoint).

    Transitions of all trajectories are shuffled together; each row keeps its trajectory index, which
    the callables use to look up its prompt (and its step index, which finds its row of the adjoint).
    """
    adjoint = adjoint_sweep(s.models, s.schedule, trajectory, cond, prompts, s.cfg)
    steps = nabla_gfn.subsample_steps(s.cfg.steps, s.cfg.subsample_fraction, len(trajectory.states), s.index_gen)
    transitions = nabla_gfn.gather_transitions(trajectory, s.schedule, steps)
    order = torch.randperm(len(transitions), generator=s.index_gen)
    callables = loss_callables(s.models, cond, prompts, s.cfg.guidance_scale)
    if s.models.fast_dtype is not None:  # sampled under autocast: ε_old again in the loss's arithmetic
        transitions.eps_old = recorded_eps(callables[0], transitions, s.cfg.train_batch_size)
    return transitions, order, callables, adjoint


def update(s: Session, transitions, rows: Tensor, callables, adjoint: Optional[Tensor]) -> Dict[str, float]:
    """ONE optimiser step on `rows` (micro-batches of --train-batch-size, gradients accumulated), the
    loss parts averaged over processes. Raises NonFinite before stepping on a NaN/Inf loss."""
    parts_sum: Dict[str, Tensor] = {}
    for micro in rows.split(s.cfg.train_batch_size):
        batch = transitions.select(micro.to(transitions.x.device))
        loss, parts = nabla_gfn.nabla_db_loss(batch, *callables, s.cfg.loss_config(), adjoint=adjoint)
        (loss / s.plan.grad_accum).backward()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0.0) + v / s.plan.grad_accum
    names = sorted(parts_sum)
    record = dict(zip(names, s.accelerator.reduce(torch.stack([parts_sum[k] for k in names]), reduction="mean").tolist()))
    if not all(math.isfinite(v) for v in record.values()):
        s.optimizer.zero_grad(set_to_none=True)
        raise NonFinite(f"non-finite loss ({', '.join(f'{k}={v}' for k, v in record.items())})")
    return {**record, **optimizer_step(s.optimizer, s.models, s.cfg, s.accelerator)}


def nabla_db_updates(s: Session, trajectory: Trajectory, cond: Tensor, prompts: Sequence[str]):
    """The ∇-DB methods' epoch: updates on the subsampled transitions of its trajectories (yields each record)."""
    per_update = s.cfg.train_batch_size * s.plan.grad_accum
    transitions, order, callables, adjoint = epoch_transitions(s, trajectory, cond, prompts)
    for u in range(s.plan.updates_per_epoch):
        yield update(s, transitions, order[u * per_update: (u + 1) * per_update], callables, adjoint)


def method_updates(s: Session):
    """Any other method's epoch: ONE registry update (it samples its batch itself) on this process's
    trajectories, --images-per-prompt of each drawn prompt (group id = the prompt's index); yields its logs,
    averaged over processes. Each backward first checks the loss (NonFinite before stepping), then
    all-reduces the gradients (`average_gradients`)."""
    n, k = s.plan.trajectories, s.cfg.images_per_prompt
    prompt_ids = torch.randint(len(s.train_prompts), (n // k,), generator=s.index_gen).repeat_interleave(k)
    params = [p for ps in parameter_groups(s.models).values() for p in ps]

    def backward(loss: Tensor) -> None:
        if not math.isfinite(float(s.accelerator.reduce(loss.detach().reshape(1), reduction="mean"))):
            raise NonFinite(f"non-finite {s.cfg.method} loss ({float(loss)})")
        s.accelerator.backward(loss)
        average_gradients(params, s.accelerator)

    trainee = method_trainee(s.models, s.schedule, s.prompt_embeds[prompt_ids.to(s.prompt_embeds.device)],
                             [s.train_prompts[i] for i in prompt_ids], prompt_ids, s.cfg, s.optimizer, backward)
    logs = baselines.METHODS[s.cfg.method].update(trainee, method_config(s.cfg, n), s.noise_gen)
    names = sorted(logs)
    values = s.accelerator.reduce(torch.tensor([float(logs[k]) for k in names], device=s.accelerator.device), "mean")
    record = dict(zip(names, values.tolist()))
    if not all(math.isfinite(v) for v in record.values()):
        raise NonFinite(f"non-finite {s.cfg.method} update ({', '.join(f'{k}={v}' for k, v in record.items())})")
    yield record


def train(s: Session) -> None:
    """Epochs from the one resumed at to --epochs, with grids, logs and checkpoints; NaN/Inf saves and stops."""
    cfg, start_epoch, started = s.cfg, s.epoch, time.time()
    epoch, nabla_db = start_epoch, cfg.method in NABLA_DB_METHODS
    try:
        for epoch in range(start_epoch, cfg.epochs):
            save_grid(s, epoch)
            if nabla_db:  # sample this epoch's trajectories, then updates on their transitions
                trajectory, cond, prompts, reward_stats = sample_epoch(s, epoch)
                updates = nabla_db_updates(s, trajectory, cond, prompts)
            else:  # one update that samples its own batch
                reward_stats, updates = {}, method_updates(s)
            last = time.time()  # update_seconds: training time (∇-DB: sampling excluded, adjoint sweep included)
            for record in tqdm(updates, total=s.plan.updates_per_epoch if nabla_db else 1, desc=f"train epoch {epoch}",
                               disable=not s.is_main, leave=False):
                s.update, now = s.update + 1, time.time()
                log_update(s, dict(update=s.update, epoch=epoch, **reward_stats, **record,
                                   update_seconds=round(now - last, 3), elapsed_seconds=round(now - started, 3)))
                last = now
            s.epoch = epoch + 1
            if s.epoch % cfg.save_every == 0 or s.epoch == cfg.epochs:
                checkpoint(s, f"epoch_{s.epoch:04d}", s.epoch)
                if s.is_main:
                    prune_checkpoints(Path(cfg.out), cfg.keep_checkpoints)
        save_grid(s, max(cfg.epochs, start_epoch))
    except NonFinite as err:
        saved = checkpoint(s, f"stopped_update_{s.update + 1:06d}", epoch)
        raise NonFinite(f"{err} at update {s.update + 1} (epoch {epoch}); saved the state before it to {saved}; "
                        f"try a smaller --beta or --lr, or --adam-beta2 0.95") from None


# ----------------------------------------------------------------------------------------------
# Evaluation and main
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(models: Models, schedule: StepSchedule, prompts: Sequence[str], cfg: Config,
             evaluator: sd_metrics.Evaluator) -> dict:
    """Reward and the metrics of sd_metrics, per prompt on fixed seeds, averaged over prompts (the paper's).

    Finetuned (LoRA on) and pretrained (LoRA off) samples of a prompt use the same noise, so the prior
    metrics measure only what finetuning moved.
    """
    n, rows, rewards = cfg.eval_samples_per_prompt, [], {"finetuned": [], "pretrained": []}
    for i, prompt in enumerate(tqdm(prompts, desc="eval", leave=False)):
        images = {name: sample_images(models, schedule, [prompt], n, cfg.eval_seed + i, cfg, lora)[0]
                  for name, lora in (("finetuned", True), ("pretrained", False))}
        for name, x in images.items():
            rewards[name].append(models.reward(x, [prompt] * n).float())
        rows.append({"prompt": prompt, "reward_mean": float(rewards["finetuned"][-1].mean()),
                     "reward_mean_pretrained": float(rewards["pretrained"][-1].mean()),
                     **evaluator.prompt_metrics(images["finetuned"], images["pretrained"])})
    averaged = sd_metrics.average_rows(rows)
    return {"reward_mean": averaged.pop("reward_mean"), "reward_std": float(torch.cat(rewards["finetuned"]).std()),
            **averaged, "unavailable": evaluator.unavailable, "metric_models": evaluator.models,
            "prompts": len(prompts), "samples_per_prompt": n, "per_prompt": rows}


def evaluate_session(session: Session) -> None:
    """--eval: eval.json and one log line by the main process (metrics that cannot load are named)."""
    s, cfg = session, session.cfg
    if s.is_main:
        evaluator = sd_metrics.load_evaluator(s.models.embedder, weight_source(cfg, "dreamsim"),
                                              weight_source(cfg, "fid_weights"), cfg.cache_dir, s.accelerator.device)
        for name, reason in evaluator.unavailable.items():
            print(f"eval: {name} unavailable: {reason}")
        metrics = evaluate(s.models, s.schedule, s.eval_prompts, cfg, evaluator)
        s.folder.write_json("eval.json", metrics)
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        print("eval: " + ", ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
        if cfg.report_to != "none":
            s.accelerator.log({f"eval/{k}": v for k, v in scalars.items()}, step=s.update)
    s.accelerator.wait_for_everyone()


def _versions() -> Dict[str, str]:
    versions = {m.__name__: m.__version__ for m in (torch, diffusers, peft, transformers, accelerate)}
    return {**versions, **{name: importlib.metadata.version(name) for name in ("open_clip_torch", "torchmetrics", "dreamsim")}}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse, load (or resume), train, optionally evaluate; a bad input or NaN stops with one line."""
    diffusers.utils.logging.disable_progress_bar()  # our bars are sampling, training and eval
    transformers.utils.logging.disable_progress_bar()
    try:
        cfg = parse_config(argv)
        if cfg.download_only:
            return download_weights(cfg)
        session = start_session(cfg)
        train(session)
        if cfg.eval:
            evaluate_session(session)
        session.accelerator.end_training()
    except (UsageError, MissingWeights, NonFinite) as err:
        if int(os.environ.get("RANK", "0")) == 0:  # every process fails alike; one says why
            print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2 if isinstance(err, UsageError) else 1)


if __name__ == "__main__":
    main()
