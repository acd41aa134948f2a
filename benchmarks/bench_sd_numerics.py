"""How precise are the residuals ∇-GFlowNet trains on, in bf16, fp16, TF32 and float32, on SD's UNet?

The forward residual (μ_θ − μ♯)/σ² is the difference of two guided UNet passes (LoRA on, LoRA off)
divided by σ² (down to ~4e-4 at the last steps), so each pass's rounding becomes part of it. For a
few timesteps of SD's 50-step DDIM(η=1) chain this prints, per precision, the relative error
‖q − q_ref‖ / ‖q_ref‖ against the reference arithmetic (--reference) of

    forward   (μ_θ − μ♯)/σ²                                    the forward residual (L_F)
    reverse   ∇_x[log P_F^θ − log P_F♯](x'|x)                  the reverse target's score part (L_B)
    adjoint   J♯(x)ᵀ a   (one step of the lean-adjoint sweep)   the adjoint target
    eps       ε̂_θ                                               (what the trust region compares)

with the LoRA perturbed to ‖ε̂_θ − ε̂♯‖/‖ε̂♯‖ ≈ --lora-size at the first timestep (the realistic case),
and max|forward| with the LoRA at init (B = 0), which must be exactly 0 in every precision.

Precisions: fp32 = IEEE float32 (on CUDA with TF32 off); tf32 = TF32 matmuls/convolutions (on CPU
emulated: the inputs of every matmul, convolution and attention rounded to TF32's 10-bit mantissa,
float32 accumulation, as tensor cores do); bf16, fp16 = the UNet's weights and activations in that
dtype (the LoRA in float32, as sd_finetune.py --residual-precision same holds it). The chosen default
of sd_finetune.py is fp32 (--residual-precision fp32): with --reference fp32 its row is 0 by
construction; --reference fp64 measures it too.

Run:
    python benchmarks/bench_sd_numerics.py --quick                   # tiny pipeline, all targets, seconds
    nice -n 5 python benchmarks/bench_sd_numerics.py --size sd15 --batch 1 --timesteps 981,501,21,1 \
        --targets forward --precisions bf16,fp16,tf32             # SD-1.5 size on CPU (~1 h on 1 thread)
    python benchmarks/bench_sd_numerics.py --size sd15 --batch 2 --reference fp64 --device cuda   # GPU
    nice python benchmarks/bench_sd_numerics.py --reward-gradient --resolution 256 --batch 2  # VAE bf16?
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nabla_gfn  # noqa: E402
import sd_finetune as sd  # noqa: E402
import sd_models as sdm  # noqa: E402
from diffusers.training_utils import cast_training_params  # noqa: E402
import tiny_models  # noqa: E402
from sd_rewards import quiet_library_logs  # noqa: E402

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
TARGETS = ("forward", "reverse", "adjoint")
SD_TIMESTEPS = "981,501,21,1"

# ----------------------------------------------------------------------------------------------
# TF32 on CPU: round the inputs of matmuls and convolutions to a 10-bit mantissa
# ----------------------------------------------------------------------------------------------


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 → nearest TF32 value (1 sign, 8 exponent, 10 mantissa bits; ties to even), as float32."""
    if x.dtype != torch.float32:
        return x
    bits = x.detach().contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    rounded = ((bits + 0x0FFF + lsb) & ~0x1FFF).view(torch.float32)
    return x + (rounded - x).detach()  # straight-through: rounded values, float32 gradients


class EmulatedTF32(TorchFunctionMode):
    """Inside this mode, matmuls, convolutions and attention see TF32-rounded float32 inputs."""

    OPS = {F.linear, F.conv2d, torch.matmul, torch.bmm, torch.baddbmm, torch.Tensor.matmul,
           F.scaled_dot_product_attention}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.OPS:
            args = tuple(round_to_tf32(a) if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: round_to_tf32(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


def arithmetic(name: str, device: torch.device):
    """Context for the UNet passes of precision `name`: TF32 (real on CUDA, emulated on CPU) or IEEE."""
    if device.type == "cuda":
        mode = "tf32" if name == "tf32" else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
        return torch.autocast("cuda", enabled=False)
    return EmulatedTF32() if name == "tf32" else torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def build_unet(size: str, cache_dir: str, seed: int):
    """SD-1.5-sized UNet (random weights, 64×64 latents) or the tiny pipeline's UNet, with LoRA r = 8."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if size == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    else:
        unet = UNet2DConditionModel.from_pretrained(tiny_models.tiny_assets(cache_dir) / "pipeline", subfolder="unet")
    unet.requires_grad_(False)
    sd.add_lora(unet, 8, 8.0)
    return unet


def set_lora_b(unet, scale: float, seed: int) -> None:
    """LoRA B ← scale · N(0, 1) (B = 0 is the init); A keeps peft's Gaussian init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=generator))


class Passes:
    """The guided policy/reference passes and their step means at one timestep, in one precision."""

    def __init__(self, unet, name: str, device, cond, uncond, guidance: float, copies: dict):
        self.name, self.device = name, device
        dtype = DTYPES[name]
        if dtype not in copies:  # one module per dtype (fp32 and tf32 share the original): memory
            with quiet_library_logs():
                copies[dtype] = unet.to(device) if dtype == torch.float32 else copy.deepcopy(unet).to(device, dtype)
            cast_training_params(copies[dtype], dtype=torch.float32)  # LoRA float32, as sd_finetune holds it
        self.unet = copies[dtype]
        self.cond, self.uncond, self.guidance = cond.to(device), uncond.to(device), guidance

    def load_lora(self, unet) -> None:
        with torch.no_grad():
            for (_, p), (_, q) in zip(self.unet.named_parameters(), unet.named_parameters()):
                if p.requires_grad and p is not q:
                    p.copy_(q)

    def eps_fn(self, lora: bool):
        return sdm.guided_eps(self.unet, self.cond, self.uncond, self.guidance, lora=lora)

    def mean(self, lora: bool, x, step: int, schedule, grad: bool = False):
        """(μ(x), x with grad or None) in float32 for rows (B, 4, h, w) at step index `step`."""
        n = len(x)
        x = x.to(self.device, torch.float64 if self.name == "fp64" else torch.float32).requires_grad_(grad)
        coef = [getattr(schedule, f)[step].to(x).expand(n) for f in ("alpha_bar", "alpha_bar_next", "sigma")]
        traj = torch.zeros(n, dtype=torch.long, device=self.device)
        with torch.set_grad_enabled(grad), arithmetic(self.name, self.device):
            eps = self.eps_fn(lora)(x, schedule.timesteps[step].to(self.device).expand(n), traj)
            if not lora:
                self.last_eps_reference = eps.detach()
            return nabla_gfn.step_mean(x, eps.to(x.dtype), *coef), eps, x


def targets(passes: Passes, x, x_next, adjoint_next, step: int, schedule, which) -> Dict[str, torch.Tensor]:
    """forward residual, reverse score part, one adjoint VJP and ε̂_θ at (x, x'), as float64 on CPU."""
    sigma = schedule.sigma[step].item()
    grad = "reverse" in which or "adjoint" in which
    mean_policy, eps_policy, x_policy = passes.mean(True, x, step, schedule, grad)
    mean_reference, _, x_reference = passes.mean(False, x, step, schedule, grad)
    out = {"forward": (mean_policy - mean_reference).detach() / sigma**2, "eps": eps_policy.detach(),
           "eps_reference": passes.last_eps_reference}
    x_next, adjoint_next = x_next.to(mean_policy), adjoint_next.to(mean_policy)
    if "adjoint" in which:
        (out["adjoint"],) = torch.autograd.grad(mean_reference, x_reference, adjoint_next, retain_graph=True)
    if "reverse" in which:  # ∇_x log N(x'; μ(x), σ²) = J(x)ᵀ (x' − μ(x)) / σ²
        (policy,) = torch.autograd.grad(mean_policy, x_policy, (x_next - mean_policy).detach() / sigma**2)
        (reference,) = torch.autograd.grad(mean_reference, x_reference, (x_next - mean_reference).detach() / sigma**2)
        out["reverse"] = policy - reference
    return {k: v.detach().double().cpu() for k, v in out.items()}


def relative_error(q: torch.Tensor, ref: torch.Tensor) -> float:
    return float((q - ref).norm() / ref.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------------------------
# The measurement
# ----------------------------------------------------------------------------------------------


def measure(args) -> dict:
    device = torch.device(args.device)
    unet = build_unet(args.size, args.cache_dir, args.seed)
    schedule = nabla_gfn.ddim_schedule(tiny_models.sd_scheduler(), 50)
    timesteps = [int(t) for t in args.timesteps.split(",")]
    steps = [int((schedule.timesteps == t).nonzero()) for t in timesteps]
    g = torch.Generator().manual_seed(args.seed)
    channels, size, width = 4, unet.config.sample_size, unet.config.cross_attention_dim
    cond, uncond = torch.randn(1, 77, width, generator=g), torch.randn(1, 77, width, generator=g)
    x = {s: torch.randn(args.batch, channels, size, size, generator=g) for s in steps}
    noise = {s: torch.randn(args.batch, channels, size, size, generator=g) for s in steps}
    adjoint_next = {s: torch.randn(args.batch, channels, size, size, generator=g) for s in steps}
    which = args.targets.split(",")
    names = [args.reference] + [p for p in args.precisions.split(",") if p != args.reference]
    copies: dict = {}
    passes = {name: Passes(unet, name, device, cond, uncond, args.guidance, copies) for name in names}
    started, result = time.time(), {"config": vars(args), "timesteps": timesteps, "init": {}, "perturbed": {}}

    # At init (B = 0): the forward residual must be exactly 0 in every precision.
    for name, p in passes.items():
        result["init"][name] = max(float(targets(p, x[s], x[s], x[s], s, schedule, ["forward"])["forward"].abs().max())
                                   for s in steps[: args.init_timesteps]) if args.init_timesteps else None
    # Perturb the LoRA to ‖ε̂_θ − ε̂♯‖/‖ε̂♯‖ ≈ lora_size at the first timestep (ε̂ is linear in B when small).
    ref, s0 = passes[args.reference], steps[0]
    set_lora_b(unet, 1e-3, args.seed + 1)
    ref.load_lora(unet)
    with torch.no_grad(), arithmetic(args.reference, device):
        eps = {lora: ref.eps_fn(lora)(x[s0].to(device, DTYPES[args.reference]),
                                      schedule.timesteps[s0].to(device).expand(args.batch),
                                      torch.zeros(args.batch, dtype=torch.long, device=device)) for lora in (True, False)}
    scale = 1e-3 * args.lora_size / relative_error(eps[True].double().cpu(), eps[False].double().cpu())
    set_lora_b(unet, scale, args.seed + 1)
    for p in passes.values():
        p.load_lora(unet)
    for s, t in zip(steps, timesteps):
        sigma = schedule.sigma[s].item()
        with torch.no_grad():
            mean_policy = ref.mean(True, x[s], s, schedule)[0].cpu().float()
        x_next = mean_policy + sigma * noise[s]
        row = {"sigma2": sigma**2}
        reference = targets(ref, x[s], x_next, adjoint_next[s], s, schedule, which)
        row["lora_size"] = relative_error(reference["eps"], reference["eps_reference"])  # ‖ε̂_θ − ε̂♯‖/‖ε̂♯‖
        row["norms"] = {k: float(v.norm() / v.numel() ** 0.5) for k, v in reference.items()}
        for name in names[1:]:
            q = targets(passes[name], x[s], x_next, adjoint_next[s], s, schedule, which)
            row[name] = {k: relative_error(q[k], reference[k]) for k in q}
            print(f"t={t} {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in row[name].items())
                  + f"  ({time.time() - started:.0f} s)", flush=True)
        result["perturbed"][t] = row
    result["lora_scale"], result["seconds"] = scale, time.time() - started
    return result


# ----------------------------------------------------------------------------------------------
# The reward gradient: VAE decoder and reward model in bf16 vs float32 (--reward-gradient)
# ----------------------------------------------------------------------------------------------

REWARD_PRECISIONS = {  # name → (VAE decoder dtype, reward model under bf16 autocast); fp32 is the reference
    "fp32": (torch.float32, False), "vae bf16": (torch.bfloat16, False), "vae + reward bf16": (torch.bfloat16, True)}


def reward_gradient_errors(args) -> dict:
    """∇_x r(decode(x)) of the aesthetic reward (CLIP ViT-L/14 + MLP, random weights) through SD-1.5's
    VAE decoder (random weights) at --resolution, per precision of REWARD_PRECISIONS: relative error
    and cosine of the gradient, and the relative error of r, against float32 (no float64 reference: the
    reward's preprocessing casts images to float32). x ~ N(0, 1) latents (SD's latents are scaled to
    unit variance before decoding)."""
    import bench_sd_transition
    from sd_rewards import AestheticHead, AestheticReward, ClipEmbedder

    torch.manual_seed(args.seed)
    vae, clip = bench_sd_transition.sd15_vae(), bench_sd_transition.sd15_clip()
    head = AestheticHead(768)
    tokenizer = tiny_models.build_tiny_tokenizer(Path(args.cache_dir) / "bench-vocab")
    latent = args.resolution // 8
    x = torch.randn(args.batch, 4, latent, latent, generator=torch.Generator().manual_seed(args.seed))
    reward = AestheticReward(ClipEmbedder(clip, tokenizer), head).to(args.device)  # float32
    results, started = {}, time.time()
    for name, (vae_dtype, reward_bf16) in REWARD_PRECISIONS.items():
        with quiet_library_logs():
            vae.to(args.device, vae_dtype).requires_grad_(False)
        xi = x.to(args.device).requires_grad_(True)
        with torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=reward_bf16):
            r = reward(sdm.decode_latents(vae, xi), ["cat"] * args.batch)
        (grad,) = torch.autograd.grad(r.sum(), xi)
        results[name] = (grad.detach().double().cpu(), r.detach().double().cpu())
        print(f"reward gradient, {name}: {time.time() - started:.0f} s", flush=True)
    ref_grad, ref_r = results["fp32"]
    return {name: dict(gradient=relative_error(g, ref_grad),
                       cosine=float(F.cosine_similarity(g.flatten(), ref_grad.flatten(), dim=0)),
                       reward=relative_error(r, ref_r)) for name, (g, r) in results.items() if name != "fp32"}


def print_tables(result: dict) -> None:
    """Markdown: the init check, then one table per target (rows timesteps, columns precisions)."""
    cfg, names = result["config"], [n for n in result["perturbed"][result["timesteps"][0]] if n in DTYPES]
    print(f"\n{cfg['size']} UNet, batch {cfg['batch']}, guidance {cfg['guidance']}, reference {cfg['reference']}, "
          f"{cfg['device']}, {result['seconds']:.0f} s")
    print("LoRA at init, max |forward residual| (first " f"{cfg['init_timesteps']} timestep(s)): "
          + ", ".join(f"{n} {v:.3g}" for n, v in result["init"].items() if v is not None))
    for target in [t for t in ("forward", "reverse", "adjoint", "eps") if t in cfg["targets"].split(",") + ["eps"]]:
        print(f"\nrelative error of {target} vs {cfg['reference']} (LoRA perturbed):")
        print("| t | σ² | ‖ε̂_θ − ε̂♯‖/‖ε̂♯‖ | " + " | ".join(names) + " |")
        print("|---|---|---|" + "---|" * len(names))
        for t in result["timesteps"]:
            row = result["perturbed"][t]
            print(f"| {t} | {row['sigma2']:.3g} | {row['lora_size']:.3g} | "
                  + " | ".join(f"{100 * row[n][target]:.3g} %" for n in names) + " |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny pipeline, every target, fp64 reference: "
                        "seconds on a CPU (the tests run it)")
    parser.add_argument("--size", choices=("tiny", "sd15"), default="sd15", help="UNet: the tiny pipeline's or SD-1.5-sized")
    parser.add_argument("--batch", type=int, default=1, help="latents per pass (each a guided pair of UNet rows)")
    parser.add_argument("--timesteps", default=SD_TIMESTEPS, help="comma-separated, from SD's 50-step DDIM timesteps")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {TARGETS}")
    parser.add_argument("--precisions", default="fp32,tf32,bf16,fp16", help="compared against --reference")
    parser.add_argument("--reference", choices=("fp32", "fp64"), default="fp32", help="the 'exact' arithmetic")
    parser.add_argument("--lora-size", type=float, default=1e-2, help="‖ε̂_θ − ε̂♯‖/‖ε̂♯‖ at the first timestep")
    parser.add_argument("--init-timesteps", type=int, default=1, help="timesteps of the init (B = 0) check")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance w")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=sd.Config.__dataclass_fields__["cache_dir"].default_factory())
    parser.add_argument("--json", default="", help="also write the result to this file")
    parser.add_argument("--reward-gradient", action="store_true", help="instead: error of ∇_x r(decode(x)) with "
                        "the VAE decoder (and the reward model) in bf16, SD-1.5-sized, at --resolution")
    parser.add_argument("--resolution", type=int, default=256, help="image size of --reward-gradient")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.reference, args.batch, args.init_timesteps = "tiny", "fp64", 2, 99
        args.timesteps = "981,741,501,261,101,21,1"
    for t in args.targets.split(","):
        if t not in TARGETS:
            parser.error(f"--targets: {t!r} is not one of {', '.join(TARGETS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.reward_gradient:
        result = {"config": vars(args), "reward_gradient": reward_gradient_errors(args)}
        print(f"\nreward gradient ∇_x r(decode(x)), SD-1.5 VAE + CLIP ViT-L/14 aesthetic (random weights), "
              f"{args.resolution}², batch {args.batch}, vs fp32:")
        print("| precision | ‖∇ − ∇_ref‖/‖∇_ref‖ | cosine | ‖r − r_ref‖/‖r_ref‖ |\n|---|---|---|---|")
        for name, row in result["reward_gradient"].items():
            print(f"| {name} | {row['gradient']:.3g} | {row['cosine']:.6f} | {row['reward']:.3g} |")
    else:
        result = measure(args)
        print_tables(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
