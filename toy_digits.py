"""∇-GFlowNet on a real image diffusion model, small enough for a laptop CPU: the 8×8 scikit-learn digits.

Rung 2 of 3; results and the measured reasons for each default in docs/digits.md, docs/findings.md.
A small ε-MLP (digits_models.py: the data, the networks and their cached pretraining) is pretrained on
`sklearn.datasets.load_digits` with Stable Diffusion's DDIM schedule, then finetuned towards
p*(x) ∝ p♯(x) R(x)^β: LoRA on = P_F^θ, LoRA off = P_F^♯, g_φ a zero-initialised MLP; each method's update
comes from `baselines.METHODS`. The reference (how a run is judged) is many pretrained samples weighted
by R^β. experiments/compare_digits.py runs every method × seeds × rewards (update costs counted by
experiments/digits_diagnostics.py).

    python toy_digits.py                                  # ∇-GFlowNet (adjoint flow target), class:3, β = 1
    python toy_digits.py --preset paper                   # the paper's ∇-GFlowNet: every loss setting as published
    python toy_digits.py --method nabla-db,adjoint-matching,rtb,ddpo,refl,draft,grpo,kl-pg   # every method, one budget
    python toy_digits.py --preset ink                     # tilt towards thicker strokes, no classifier
    python toy_digits.py --preset smoke --out /tmp/d      # seconds: checks that everything runs

Writes to --out: config.json, metrics.json, figure.png, pretrained_samples.npy, reference_samples.npy,
<method>/samples.npy + history.json. The pretrained models are cached under --cache, keyed by config.
Rewards: class:K, r = log p(K | clip(x)) of a temperature-calibrated classifier (β = 1: p♯(x | K));
ink, r = Σ_pixels (clip(x, −1, 1) + 1) / 2. Default ≠ paper (each measured): --flow-target adjoint
--flow-lr 5e-4 --guess-from reference --weighting kl --gamma sqrt_alpha_bar --reverse-weight 5
--subsample 0.3; `--preset paper` restores the paper. Only RTB, KL-PG and ∇-DB have p* as optimum.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from peft import LoraConfig
from torch import Tensor, nn
from tqdm.auto import tqdm

import baselines as bl  # every method's update and the one method registry, shared with the other rungs
import cli
import nabla_gfn as ng
from sd_models import lora_disabled, lora_layers
from cli import FRACTION, NON_NEGATIVE, POSITIVE, UsageError, opt
from digits_models import (IMAGE_SHAPE, LORA_TARGETS, DigitClassifier, DigitDenoiser, FlowCorrection,  # noqa: F401
                           distinct_nearest, expected_distinct_nearest, frechet_distance, load_digits_tensor, make_scheduler,
                           load_or_pretrain_denoiser, load_or_train_classifier, uniform, weighted_gaussian, weighted_mean_pairwise_distance)

# The methods this rung runs (all from baselines.METHODS), and the Config field of each one's policy lr.
LR_FIELDS = {"nabla-db": "lr", "adjoint-matching": "am_lr", "rtb": "rtb_lr", "ddpo": "ddpo_lr", "refl": "refl_lr", "draft": "draft_lr",
             "grpo": "grpo_lr", "kl-pg": "klpg_lr"}
METHOD_NAMES = tuple(LR_FIELDS)

# ---- Config and presets ---------------------------------------------------------------------------

AT_LEAST_ONE: cli.Check = (lambda v: v >= 1, "must be >= 1")
PAIRS: cli.Check = (lambda v: v >= 2, "must be >= 2 (diversity needs pairs)")
HALF_OPEN_UNIT: cli.Check = (lambda v: 0 < v <= 1, "must be in (0, 1]")

@dataclass
class Config:
    """Everything a run depends on. Each field is a command-line flag (`--name-with-dashes`)."""

    preset: str = opt("default", "named settings, applied before the other flags: default, paper, bootstrap, ink, smoke")
    # run
    out: str = opt("runs/digits", "output folder")
    cache: str = opt("", "cache folder for the pretrained models ('' = $NABLA_GFN_CACHE or ~/.cache/nabla-gfn)")
    seed: int = opt(0, "seed of finetuning, sampling and evaluation")
    threads: int = opt(1, "torch CPU threads, 0 = torch's default (small matrices: on 2 shared cores, 2 threads ran "
                          "3-4x slower than 1)", check=NON_NEGATIVE)
    # target
    reward: str = opt("class:3", "reward: 'class:K' (log p(K|x) under the classifier, K in 0..9) or 'ink'")
    beta: float = opt(1.0, "β, reward scale of the target p♯(x)·R(x)^β", check=NON_NEGATIVE)
    method: str = opt("nabla-db", "comma-separated methods to run on the same budget: " + ", ".join(METHOD_NAMES))
    # diffusion model (pretraining; cached by these fields)
    hidden: int = opt(256, "denoiser MLP width", check=AT_LEAST_ONE)
    depth: int = opt(3, "denoiser MLP residual blocks", check=AT_LEAST_ONE)
    pretrain_steps: int = opt(2500, "denoiser pretraining steps", check=AT_LEAST_ONE)
    pretrain_batch: int = opt(256, "denoiser pretraining batch size")
    pretrain_lr: float = opt(2e-3, "denoiser pretraining peak learning rate (cosine decay)")
    pretrain_seed: int = opt(0, "seed of pretraining (kept apart from --seed so the cache is reused)")
    classifier_steps: int = opt(1500, "classifier training steps (full batch)", check=AT_LEAST_ONE)
    classifier_noise: float = opt(0.1, "classifier augmentation: Gaussian pixel noise, std drawn uniformly up to this")
    num_steps: int = opt(25, "DDIM(η=1) sampling steps", check=AT_LEAST_ONE)
    # finetuning
    updates: int = opt(200, "finetuning updates (one batch of fresh trajectories each)", check=AT_LEAST_ONE)
    batch: int = opt(32, "trajectories sampled per update", check=AT_LEAST_ONE)
    subsample: float = opt(0.3, "fraction of non-terminal transitions trained on per trajectory (+ the terminal one; "
                                "paper preset 0.1)", check=FRACTION)
    lora_rank: int = opt(8, "LoRA rank (alpha = rank)", check=AT_LEAST_ONE)
    lr: float = opt(3e-3, "nabla-db: policy (LoRA) learning rate", check=POSITIVE)
    flow_lr: float = opt(5e-4, "g_φ learning rate (paper preset: 1e-3; with the adjoint target 1e-3 swings more)", check=POSITIVE)
    flow_hidden: int = opt(128, "g_φ MLP width")
    trust_region: float = opt(0.0, "λ, weight of ‖ε̂_θ − ε̂_old‖²")
    reverse_weight: float = opt(5.0, "w_B, weight of the reverse ∇-DB term (paper: 1)")
    gamma: str = opt("sqrt_alpha_bar", "γ_τ of the forward-looking guess: alpha_bar (official default) or sqrt_alpha_bar",
                     choices=ng.GAMMA_CHOICES)
    weighting: str = opt("kl", "timestep weighting of the loss: plain (paper) or kl (σ²)", choices=ng.WEIGHTING_CHOICES)
    use_flow: bool = opt(True, "learn g_φ (--no-use-flow = the 'no flow' variant)")
    flow_target: str = opt("adjoint", "what trains g_φ: bootstrap (the paper: L_F's g-line + L_B), adjoint (guess + g_φ at x′ "
                           "on the lean adjoint a_{i+1}), mixed (L_B's target (1−λ)·bootstrap + λ·a_i)", choices=ng.FLOW_TARGET_CHOICES)
    adjoint_lambda: float = opt(0.5, "λ ∈ (0, 1] of --flow-target mixed", check=HALF_OPEN_UNIT)
    control_variate: bool = opt(False, "θ fits a_{i+1} with guess + g_φ as its antithetic control variate (toy default; here "
                                "it costs the learned flow's lead: frac 0.82 vs 0.86, docs/findings.md)")
    guess_from: str = opt("reference", "whose x̂_0 the forward-looking guess uses: policy (paper, official code) or reference",
                          choices=ng.GUESS_CHOICES)
    max_grad_norm: float = opt(1.0, "gradient-norm clip, applied to the policy and g_φ separately")
    draft_k: int = opt(1, "DRaFT-K: sampling steps the reward is backpropagated through (1..--num-steps)")
    draft_lr: float = opt(3e-4, "DRaFT-K learning rate (its own: at --lr it leaves the data range within a few updates)", check=POSITIVE)
    draft_kl: float = opt(0.0, "DRaFT-K: weight of the per-step KL to P_F♯ on those K steps (0 = off, as in the paper)", check=NON_NEGATIVE)
    am_lr: float = opt(3e-3, "adjoint-matching learning rate", check=POSITIVE)
    rtb_lr: float = opt(3e-4, "RTB policy learning rate", check=POSITIVE)
    rtb_logz_lr: float = opt(1e-1, "RTB: learning rate of log Z", check=POSITIVE)
    ddpo_lr: float = opt(3e-4, "DDPO learning rate", check=POSITIVE)
    ppo_clip: float = opt(1e-4, "DDPO: PPO clip range of the per-step ratio (DDPO's default 1e-4)", check=POSITIVE)
    ppo_epochs: int = opt(1, "DDPO: inner epochs over each sampled batch (DDPO's default 1)", check=AT_LEAST_ONE)
    ppo_minibatches: int = opt(4, "DDPO: minibatches per inner epoch, one optimiser step each", check=AT_LEAST_ONE)
    ppo_adv_clip: float = opt(5.0, "DDPO: clip of the batch-normalised advantages (DDPO's default 5)", check=POSITIVE)
    refl_lr: float = opt(3e-4, "ReFL learning rate", check=POSITIVE)
    grpo_lr: float = opt(3e-3, "GRPO learning rate (sweep 1e-4..3e-3, 100 updates, seed 0: best Fréchet at 3e-3)", check=POSITIVE)
    grpo_kl: float = opt(0.04, "GRPO: weight of the per-step KL to P_F♯ (Flow-GRPO's default on SD3.5 GenEval/OCR: 0.04); "
                               "GRPO shares --ppo-clip, --ppo-epochs, --ppo-minibatches, --ppo-adv-clip with DDPO", check=NON_NEGATIVE)
    klpg_lr: float = opt(3e-3, "KL-PG learning rate (sweep as --grpo-lr: best at 3e-3); its KL weight 1/β is fixed by the target",
                         check=POSITIVE)
    refl_start: float = opt(0.75, "ReFL: stop at a uniform step in [refl_start·T, T−1] (ImageReward: 30–39 of 40)", check=FRACTION)
    # evaluation
    reference_pool: int = opt(4000, "pretrained samples importance-reweighted into the reference", check=AT_LEAST_ONE)
    eval_samples: int = opt(500, "samples per model for the final metrics", check=PAIRS)
    curve_every: int = opt(20, "updates between points of the metric curves", check=AT_LEAST_ONE)
    curve_samples: int = opt(256, "samples per point of the metric curves", check=PAIRS)

    def __post_init__(self):
        validate(self)

PRESETS: Dict[str, Dict] = {
    "default": {},
    # the loss exactly as the paper and the official code set it (docs/digits.md: why not the default)
    "paper": {"weighting": "plain", "gamma": "alpha_bar", "reverse_weight": 1.0, "flow_target": "bootstrap",
              "guess_from": "policy", "flow_lr": 1e-3, "subsample": 0.1, "out": "runs/digits-paper"},
    # the previous default: the paper's bootstrapped g_φ and guess, with kl weighting, γ = √ᾱ, w_B = 5
    "bootstrap": {"flow_target": "bootstrap", "guess_from": "policy", "flow_lr": 1e-3, "subsample": 0.1,
                  "out": "runs/digits-bootstrap"},
    "ink": {"reward": "ink", "beta": 0.5, "out": "runs/digits-ink"},
    # seconds, for tests and a first check: tiny pretraining, a handful of updates
    "smoke": {"pretrain_steps": 30, "classifier_steps": 30, "hidden": 64, "depth": 1, "num_steps": 5, "updates": 2,
              "batch": 4, "reference_pool": 64, "eval_samples": 16, "curve_every": 1, "curve_samples": 8,
              "out": "runs/digits-smoke"},
}

def validate(cfg: Config) -> Config:
    """Each field's choices and check (cli.validate), then what spans fields; a bad value raises
    cli.UsageError ('--flag: what it accepts (got …)'), which parse_args prints as one line."""
    cli.validate(cfg)
    parse_reward(cfg.reward)
    if "draft" in parse_methods(cfg.method) and not 1 <= cfg.draft_k <= cfg.num_steps:
        raise UsageError(f"--draft-k: must be in 1..--num-steps ({cfg.num_steps}) (got {cfg.draft_k})")
    if cfg.flow_target == "mixed" and not cfg.use_flow:
        raise UsageError("--flow-target: mixed needs g_φ; drop --no-use-flow, or use bootstrap or adjoint")
    return cfg

def parse_reward(spec: str) -> Tuple[str, Optional[int]]:
    """'class:K' → ('class', K); 'ink' → ('ink', None)."""
    kind, _, k = spec.partition(":")
    if spec == "ink" or (kind == "class" and k.isdigit() and 0 <= int(k) <= 9):
        return kind, (None if spec == "ink" else int(k))
    raise UsageError(f"--reward: must be 'class:K' with K in 0..9, or 'ink' (got {spec!r})")

def parse_methods(spec: str) -> List[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    if not methods or set(methods) - set(METHOD_NAMES) or len(set(methods)) != len(methods):
        raise UsageError(f"--method: must be a comma-separated list of distinct {', '.join(METHOD_NAMES)} (got {spec!r})")
    return methods

def parse_args(argv: Optional[List[str]] = None) -> Config:
    """Flags → Config (cli.parse): the field defaults, then the named preset's values, then the flags given."""
    return cli.parse(Config, argv, prog="toy_digits.py", presets=PRESETS, description=__doc__.split("\n\n")[0])

# ---- Rewards, the two policies, sampling ----------------------------------------------------------

def classifier_log_reward(classifier: DigitClassifier, k: int) -> ng.LogRewardFn:
    """r(x) = log p(K | clip(x, −1, 1)), differentiable in x; the clip stops a reward maximiser from inventing
    out-of-range pixels that the classifier extrapolates to absurd confidence."""
    return lambda x0, traj: torch.log_softmax(classifier(x0.clamp(-1, 1)), dim=1)[:, k]

def ink_log_reward(x0: Tensor, traj: Tensor) -> Tensor:
    """r(x) = Σ_pixels (clip(x, −1, 1) + 1) / 2, the total ink in units of fully dark pixels."""
    return ((x0.clamp(-1, 1) + 1) / 2).flatten(1).sum(1)

def make_log_reward(spec: str, classifier: DigitClassifier) -> ng.LogRewardFn:
    kind, k = parse_reward(spec)
    return classifier_log_reward(classifier, k) if kind == "class" else ink_log_reward

@torch.no_grad()
def score(log_reward: ng.LogRewardFn, x: Tensor) -> Tensor:
    return log_reward(x, torch.arange(len(x)))

def adapters_disabled(model: DigitDenoiser):
    """P_F^♯: the same network, LoRA off — the SD rung's switch (`sd_models.lora_disabled`), which flips each
    peft layer directly: diffusers' `disable_adapters` looks up peft's version on every call, 40 % of an update here."""
    return lora_disabled(lora_layers(model))


def policy_eps_fn(model: DigitDenoiser) -> ng.EpsFn:
    return lambda x, t, traj: model(x, t)

def reference_eps_fn(model: DigitDenoiser) -> ng.EpsFn:
    def reference_eps(x: Tensor, t: Tensor, traj: Tensor) -> Tensor:
        with adapters_disabled(model):
            return model(x, t)
    return reference_eps

def sample(eps_fn: ng.EpsFn, schedule: ng.StepSchedule, n: int, generator: torch.Generator, chunk: int = 1000) -> Tensor:
    """n clean samples x_0 (n, 1, 8, 8) from the DDIM(η=1) sampler, in chunks."""
    out = []
    for start in range(0, n, chunk):
        x_T = torch.randn((min(chunk, n - start), *IMAGE_SHAPE), generator=generator)
        out.append(ng.sample_trajectory(eps_fn, schedule, x_T, generator).final)
    return torch.cat(out)

# ---- The reference: pretrained samples importance-weighted by R^β ---------------------------------

def importance_weights(log_reward: Tensor, beta: float) -> Tensor:
    """Self-normalised weights w_i ∝ R(x_i)^β = exp(β r_i) of samples x_i ~ p^♯; sum to 1. (M,) → (M,)."""
    return torch.softmax(beta * log_reward.double(), dim=0)

def effective_sample_size(weights: Tensor) -> float:
    """Kish's ESS = (Σ w)² / Σ w²: M for uniform weights, 1 when one sample holds all the weight."""
    w = weights.double()
    return float(w.sum() ** 2 / w.pow(2).sum())

@dataclass
class Reference:
    """Pretrained pool x_i ~ p^♯ (M, 1, 8, 8), its rewards (M,), weights (M,) targeting p* ∝ p^♯ R^β, their ESS."""

    samples: Tensor
    log_reward: Tensor
    weights: Tensor
    ess: float

    def resample(self, n: int, generator: torch.Generator) -> Tensor:
        return self.samples[torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)]

def build_reference(pool: Tensor, log_reward: ng.LogRewardFn, beta: float) -> Reference:
    r = score(log_reward, pool)
    w = importance_weights(r, beta)
    return Reference(samples=pool, log_reward=r, weights=w, ess=effective_sample_size(w))

# ---- Finetuning: every method from baselines.METHODS, one loop -----------------------------------

@dataclass
class Finetuner:
    """The trainable pieces of one run: LoRA'd model, its LoRA parameters, g_φ (nabla-db), log Z (RTB)."""

    model: DigitDenoiser
    lora_params: List[nn.Parameter]
    flow: Optional[FlowCorrection]
    optimizer: torch.optim.Optimizer
    log_z: Optional[nn.Module] = None

def method_lr(cfg: Config, method: str) -> float:
    return getattr(cfg, LR_FIELDS[method])

def make_finetuner(cfg: Config, pretrained: DigitDenoiser, method: str) -> Finetuner:
    """A frozen copy of the pretrained denoiser with LoRA (Gaussian init, B = 0: P_F^θ = P_F^♯ at the start) at the
    method's learning rate, + g_φ or log Z."""
    model = DigitDenoiser.from_config(pretrained.config)
    model.load_state_dict(pretrained.state_dict())
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    lora_params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": lora_params, "lr": method_lr(cfg, method), "weight_decay": 0.0}]
    flow, log_z, module = None, None, bl.METHODS[method].module
    if module == "flow" and cfg.use_flow:
        flow = FlowCorrection(cfg.flow_hidden)
        groups.append({"params": list(flow.parameters()), "lr": cfg.flow_lr, "weight_decay": 1e-2})
    if module == "log_z":
        log_z = bl.LogPartition()
        groups.append({"params": list(log_z.parameters()), "lr": cfg.rtb_logz_lr, "weight_decay": 0.0})
    return Finetuner(model, lora_params, flow, torch.optim.AdamW(groups, betas=(0.9, 0.999)), log_z)

def method_config(cfg: Config, method: str) -> bl.MethodConfig:
    """This rung's fields → the registry's hyper-parameters, with the method's fixed loss fields applied."""
    loss = ng.LossConfig(beta=cfg.beta, trust_region=cfg.trust_region, reverse_weight=cfg.reverse_weight, gamma=cfg.gamma,
                         weighting=cfg.weighting, use_flow=cfg.use_flow, guess_from=cfg.guess_from,
                         flow_target=cfg.flow_target, adjoint_lambda=cfg.adjoint_lambda,
                         control_variate=cfg.control_variate and cfg.flow_target == "adjoint")
    return bl.MethodConfig(
        beta=cfg.beta, batch_size=cfg.batch, fraction=cfg.subsample, grad_clip=cfg.max_grad_norm,
        loss=bl.METHODS[method].loss_config(loss), draft_k=cfg.draft_k, draft_kl=cfg.draft_kl, refl_start=cfg.refl_start,
        ppo_clip=cfg.ppo_clip, ppo_epochs=cfg.ppo_epochs, ppo_minibatches=cfg.ppo_minibatches, ppo_adv_clip=cfg.ppo_adv_clip,
        kl_coef=cfg.grpo_kl)

def method_update(cfg: Config, method: str, ft: Finetuner, schedule: ng.StepSchedule, log_reward: ng.LogRewardFn,
                  gen: torch.Generator) -> Dict[str, float]:
    """One update of `method` (baselines.METHODS) on this finetuner: LoRA on = P_F^θ, LoRA off = P_F^♯."""
    groups = {"policy": ft.lora_params, **({"flow": list(ft.flow.parameters())} if ft.flow is not None else {})}
    x_T = lambda n, g: torch.randn((n, *IMAGE_SHAPE), generator=g)
    trainee = bl.Trainee(policy_eps_fn(ft.model), reference_eps_fn(ft.model), log_reward, schedule, x_T, groups,
                         ft.optimizer, ft.flow, ft.log_z)
    return bl.METHODS[method].update(trainee, method_config(cfg, method), gen)

def finetune(cfg: Config, method: str, pretrained: DigitDenoiser, schedule: ng.StepSchedule, log_reward: ng.LogRewardFn,
             curve_metrics: Callable, progress: bool = True, meter=None) -> Tuple[Finetuner, List[Dict[str, float]]]:
    """cfg.updates updates of `method`; every cfg.curve_every, a history point: the update's logs,
    curve_metrics(model) and "seconds" (training time so far). An optional `meter`
    (experiments/digits_diagnostics.CostMeter) wraps the reward; its counts go into each point."""
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    ft = make_finetuner(cfg, pretrained, method)
    log_reward = log_reward if meter is None else meter.attach(ft.model, log_reward)
    history, train_seconds = [{"update": 0, "seconds": 0.0, **curve_metrics(ft.model)}], 0.0
    bar = tqdm(range(1, cfg.updates + 1), desc=f"finetune {method}", disable=not progress)
    for update in bar:
        start = time.time()
        logs = method_update(cfg, method, ft, schedule, log_reward, gen)
        train_seconds += time.time() - start
        cost = {} if meter is None else meter.take()
        bar.set_postfix(reward=f"{logs['reward']:.3f}")
        if update % cfg.curve_every == 0 or update == cfg.updates:
            history.append({"update": update, "seconds": train_seconds, **logs, **cost, **curve_metrics(ft.model)})
    return ft, history

# ---- Evaluate: the metrics, the setup every method shares, one method's run -----------------------

@torch.no_grad()
def evaluate(x: Tensor, classifier: DigitClassifier, log_reward: ng.LogRewardFn, train: Tensor, reward_class: Optional[int],
             reference_gaussian: Optional[Tuple] = None, weights: Optional[Tensor] = None, n: Optional[int] = None) -> Dict:
    """Metrics of samples x (weights None) or of the weighted set Σ w_i δ(x_i), measured as n draws from it
    would be. Every metric sees x clipped to [−1, 1], as displayed and as the rewards see it."""
    w = uniform(len(x)) if weights is None else weights.double()
    shown = x.clamp(-1, 1)
    metrics = {"mean_reward": float(w @ score(log_reward, shown).double()),
               "diversity_l2": weighted_mean_pairwise_distance(shown, w),
               "distinct_nearest_digits": float(distinct_nearest(shown, train) if weights is None
                                                else expected_distinct_nearest(shown, w, train, n))}
    if reward_class is not None:
        metrics["frac_class"] = float(w @ (classifier(shown).argmax(1) == reward_class).double())
    if reference_gaussian is not None:
        metrics["frechet_to_reference"] = frechet_distance(weighted_gaussian(classifier.features(shown), w), reference_gaussian)
    return metrics

@dataclass
class Setup:
    """What every method of one run shares: models, reward, schedule, the reference and its metrics."""

    cfg: Config
    images: Tensor
    classifier: DigitClassifier
    pretrained: DigitDenoiser
    schedule: ng.StepSchedule
    log_reward: ng.LogRewardFn
    reward_class: Optional[int]
    reference: Reference
    reference_gaussian: Tuple[np.ndarray, np.ndarray]
    metrics: Dict  # the reference's and the pretrained model's metrics, the classifier's accuracy, …
    samples: Dict[str, Tensor]  # "pretrained", "reference" (a resample of it)

    def evaluate(self, x: Tensor, **kw) -> Dict[str, float]:
        return evaluate(x, self.classifier, self.log_reward, self.images, self.reward_class, self.reference_gaussian, **kw)

    def curve_metrics(self, model: DigitDenoiser) -> Dict[str, float]:
        gen = torch.Generator().manual_seed(self.cfg.seed + 1)  # the same noise at every point: curves move with the model
        return self.evaluate(sample(policy_eps_fn(model), self.schedule, self.cfg.curve_samples, gen))

def prepare(cfg: Config) -> Setup:
    """Load (or pretrain) the denoiser and classifier; build the reference; measure it and p♯."""
    t_start = time.time()
    (images, labels), scheduler = load_digits_tensor(), make_scheduler()
    pretrained = load_or_pretrain_denoiser(cfg, images, scheduler)
    classifier, accuracy = load_or_train_classifier(cfg, images, labels)
    log_reward, schedule = make_log_reward(cfg.reward, classifier), ng.ddim_schedule(scheduler, cfg.num_steps)
    t_pretrained = time.time() - t_start
    gen = torch.Generator().manual_seed(cfg.seed)
    reference = build_reference(sample(policy_eps_fn(pretrained), schedule, cfg.reference_pool, gen), log_reward, cfg.beta)
    gaussian = weighted_gaussian(classifier.features(reference.samples.clamp(-1, 1)), reference.weights)
    setup = Setup(cfg, images, classifier, pretrained, schedule, log_reward, parse_reward(cfg.reward)[1], reference,
                  gaussian, {}, {})
    setup.metrics = {"classifier_held_out_accuracy": accuracy, "reference_ess": reference.ess, "reference_pool": cfg.reference_pool,
                     "reference": setup.evaluate(reference.samples, weights=reference.weights, n=cfg.eval_samples)}
    setup.samples["reference"] = reference.resample(cfg.eval_samples, gen)  # its Fréchet: the finite-sample floor
    setup.metrics["reference_resample_frechet"] = setup.evaluate(setup.samples["reference"])["frechet_to_reference"]
    setup.samples["pretrained"] = sample(policy_eps_fn(pretrained), schedule, cfg.eval_samples, gen)
    setup.metrics.update(pretrained=setup.evaluate(setup.samples["pretrained"]), pretrain_seconds=t_pretrained)
    return setup

def diverged(x: Tensor, pretrained: Tensor) -> bool:
    """Samples not finite, or their RMS over 3× the pretrained samples' (DRaFT at too high a rate: pixels at ±100)."""
    return bool(not torch.isfinite(x).all() or x.pow(2).mean().sqrt() > 3 * pretrained.pow(2).mean().sqrt())

def run_method(setup: Setup, method: str, progress: bool = True, meter=None) -> Tuple[Dict, Tensor, List[Dict]]:
    """Finetune one method; return (its final metrics, its eval samples, its history)."""
    cfg, ref, t_method = setup.cfg, setup.metrics["reference"], time.time()
    ft, history = finetune(cfg, method, setup.pretrained, setup.schedule, setup.log_reward, setup.curve_metrics, progress, meter)
    x = sample(policy_eps_fn(ft.model), setup.schedule, cfg.eval_samples, torch.Generator().manual_seed(cfg.seed + 2))
    result = {**setup.evaluate(x.nan_to_num(0.0)), "diverged": diverged(x, setup.samples["pretrained"])}
    result["diversity_ratio"] = result["diversity_l2"] / ref["diversity_l2"]
    result["distinct_nearest_ratio"] = result["distinct_nearest_digits"] / ref["distinct_nearest_digits"]
    result["finetune_seconds"], result["train_seconds"] = time.time() - t_method, history[-1]["seconds"]
    return result, x, history

# ---- Figure ---------------------------------------------------------------------------------------

def image_grid(x: Tensor, cols: int = 8) -> np.ndarray:
    """(n, 1, 8, 8) in [−1, 1] → one (rows·9−1, cols·9−1) image with 1-pixel gaps (NaN), ink dark."""
    x = x[: (len(x) // cols) * cols].clamp(-1, 1).squeeze(1).numpy()
    grid = np.full(((len(x) // cols) * 9 - 1, cols * 9 - 1), np.nan)
    for i, img in enumerate(x):
        r, c = divmod(i, cols)
        grid[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = img
    return grid

def display_name(method: str, cfg: Config) -> str:
    if method == "nabla-db":
        return f"∇-GFlowNet ({cfg.flow_target})" if cfg.use_flow else f"∇-GFlowNet (no g_φ, {cfg.flow_target})"
    return f"DRaFT-{cfg.draft_k}" if method == "draft" else bl.METHODS[method].label

def make_figure(path: Path, grids: Dict[str, Tensor], histories: Dict[str, List[Dict]], reference: Dict, pretrained: Dict, title: str):
    """Top row: 64-sample grids. Bottom row: metric curves against the reference (dashed) and p♯ (dotted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = {"frac_class": "fraction classified as K", "mean_reward": "mean reward r",
              "diversity_l2": "diversity (mean pairwise L2)", "frechet_to_reference": "Fréchet to reference"}
    curve_keys = [k for k in labels if k in reference]
    cols = max(len(grids), len(curve_keys))
    fig, axes = plt.subplots(2, cols, figsize=(2.9 * cols, 6.2), gridspec_kw={"height_ratios": [1.15, 1]}, squeeze=False)
    cmap = plt.get_cmap("gray_r").copy()
    cmap.set_bad("white")
    for ax in [*axes[0], *axes[1, len(curve_keys):]]:
        ax.axis("off")
    for ax, (name, x) in zip(axes[0], grids.items()):
        ax.imshow(image_grid(x), cmap=cmap, vmin=-1, vmax=1)
        ax.set_title(name, fontsize=10)
    for ax, key in zip(axes[1], curve_keys):
        for method, hist in histories.items():
            ax.plot([h["update"] for h in hist], [h[key] for h in hist], label=method)
        if key != "frechet_to_reference":
            ax.axhline(reference[key], color="k", ls="--", lw=1, label="reference (target)")
        ax.axhline(pretrained[key], color="gray", ls=":", lw=1, label="pretrained")
        ax.set(xlabel="update", yscale="log" if key == "frechet_to_reference" else "linear")
        ax.set_title(labels[key], fontsize=10)
    axes[1, 0].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

# ---- main -----------------------------------------------------------------------------------------

def run(cfg: Config, progress: bool = True) -> Dict:
    """The whole experiment; returns the metrics dict that is also written to metrics.json."""
    validate(cfg)
    t_start = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    setup = prepare(cfg)
    metrics, histories = dict(setup.metrics), {}
    grids = {"pretrained p♯": setup.samples["pretrained"][:64],
             f"reference p♯·R^β (ESS {setup.reference.ess:.0f})": setup.samples["reference"][:64]}
    np.save(out / "pretrained_samples.npy", setup.samples["pretrained"].numpy())
    np.save(out / "reference_samples.npy", setup.samples["reference"].numpy())
    for method in parse_methods(cfg.method):
        metrics[method], x, history = run_method(setup, method, progress)
        (out / method).mkdir(exist_ok=True)
        np.save(out / method / "samples.npy", x.numpy())
        (out / method / "history.json").write_text(json.dumps(history, indent=1))
        grids[display_name(method, cfg)], histories[display_name(method, cfg)] = x[:64], history
    metrics["total_seconds"] = time.time() - t_start
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    make_figure(out / "figure.png", grids, histories, metrics["reference"], metrics["pretrained"],
                f"8×8 digits, reward {cfg.reward}, β = {cfg.beta}, {cfg.updates} updates × {cfg.batch} trajectories")
    return metrics

def main(argv: Optional[List[str]] = None) -> None:
    cfg = parse_args(argv)
    metrics = run(cfg)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=1))
    for name in ("reference", "pretrained", *parse_methods(cfg.method)):
        print(f"{name:>10}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics[name].items() if isinstance(v, (int, float))))
    print(f"wrote {cfg.out}")

if __name__ == "__main__":
    main()
