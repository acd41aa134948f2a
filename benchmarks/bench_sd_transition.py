"""Cost of one trained ∇-GFlowNet transition on Stable Diffusion, in guided-ε evaluations.

Unit: one guided ε evaluation = what one sampling step costs: a single no-grad UNet call on 2N rows
(unconditional and conditional, classifier-free guidance) for a batch of N transitions. The script
reports, for the same batch, on one device and in one run,

    ratio = cost(nabla_gfn.nabla_db_loss + backward) / cost(one guided ε evaluation)

with the flow correction g_φ (full loss) and without it (--no-flow variant), for non-terminal and
terminal transitions and for the paper's training mix (1 terminal + 5 others per trajectory at 50
steps). Goal (issue 3): ≤ 13 with the full loss, ≤ 7 without g_φ. The VAE decoder and the reward
model run inside the loss (the reward gradient), so their cost is part of the ratio.

Two measures:
  --measure time   wall-clock, each loss timed right after a guided ε evaluation and the median of the
                   paired ratios kept (robust to load drifting on a shared machine); peak memory.
  --measure flops  matmul/conv/attention FLOPs (torch.utils.flop_counter), machine-independent. With
                   --size tiny the real loss is counted; with --size sd15 the models live on the meta
                   device (no memory, no compute; nabla_db_loss branches on data so it cannot run
                   there) and the loss is composed from measured parts in nabla_db_loss's call order —
                   the composition is checked against the real count on the tiny pipeline.

Run:
    OMP_NUM_THREADS=1 python benchmarks/bench_sd_transition.py                       # tiny, CPU, time
    OMP_NUM_THREADS=1 python benchmarks/bench_sd_transition.py --measure flops       # tiny, FLOPs
    python benchmarks/bench_sd_transition.py --size sd15 --measure flops             # SD-1.5 at 512², any CPU
    python benchmarks/bench_sd_transition.py --size sd15 --batch 4                   # SD-1.5 at 512², GPU time

--size sd15 builds SD-1.5-sized components with random weights (UNet 860M, VAE, CLIP text encoder,
CLIP ViT-L/14 + aesthetic MLP): real shapes and timings without downloads. Time it on a GPU only.
Peak memory (time mode): on CUDA the peak allocated bytes of each phase; on CPU the process's peak
RSS so far (monotone; phases run from cheapest to dearest).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nabla_gfn  # noqa: E402
import sd_finetune as sd  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel  # noqa: E402

MIX = nabla_gfn.subsample_steps(50, 0.1, 1, torch.Generator()).shape[1]  # paper: terminal + 5 per trajectory

# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def sd15_text_config() -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=512, eos_token_id=513, pad_token_id=513)


def sd15_random_models(cfg: sd.Config, device: torch.device, dtype: torch.dtype) -> sd.Models:
    """SD-1.5-sized pipeline and CLIP ViT-L/14 with random weights, assembled like sd.load_models.
    Modules are created directly on `device` (which may be "meta")."""
    tokenizer = sd.build_tiny_tokenizer(Path(cfg.cache_dir) / "bench-vocab")  # ids < 514: fine for timing
    with torch.device(device):
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        text_encoder = CLIPTextModel(sd15_text_config())
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # otherwise SD 1.x = the defaults
        clip = CLIPModel(CLIPConfig(
            text_config=sd15_text_config().to_dict(),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=224, patch_size=14, hidden_act="quick_gelu"),
            projection_dim=768,
        ))
        head = sd.AestheticHead(768).eval().requires_grad_(False)
    with sd.quiet_library_logs():  # diffusers warns on .to(dtype) even with nothing to keep in float32
        for module in (vae, text_encoder, unet):
            module.requires_grad_(False).to(dtype)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sd.sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    embedder = sd.ClipEmbedder(clip, tokenizer).to(device)
    lora = sd.add_lora(unet, cfg.lora_rank, cfg.lora_alpha)
    with torch.device(device):
        flow = sd.build_flow_net(unet, cfg.flow_widths)
    return sd.Models(pipe, lora, flow, embedder, sd.AestheticReward(embedder, head), sd.encode_prompts(pipe, [""]))


def transition_batch(models: sd.Models, schedule, step: int, n: int, resolution: int, generator):
    """n transitions at step index `step` of a synthetic chain (the values do not change the cost)."""
    shape = sd.latent_shape(models, n, resolution)
    trajectory = nabla_gfn.Trajectory(
        states=torch.randn(n, schedule.num_steps + 1, *shape[1:], generator=generator).to(models.pipe.device),
        eps=torch.randn(n, schedule.num_steps, *shape[1:], generator=generator).to(models.pipe.device),
    )
    return nabla_gfn.gather_transitions(trajectory, schedule, torch.full((n, 1), step))


# ----------------------------------------------------------------------------------------------
# Measures
# ----------------------------------------------------------------------------------------------


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # Linux: KiB


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


class Bench:
    """The loss and its parts on one batch of transitions, as zero-argument callables."""

    def __init__(self, models: sd.Models, cfg: sd.Config, batch, prompts):
        self.models, self.cfg, self.batch = models, cfg, batch
        cond = sd.encode_prompts(models.pipe, prompts)
        self.policy_eps, self.reference_eps, self.log_reward, self.flow = sd.loss_callables(
            models, cond, prompts, cfg.guidance_scale)
        self.params = [p for ps in sd.parameter_groups(models).values() for p in ps]

    def eps(self) -> None:
        with torch.no_grad():
            self.policy_eps(self.batch.x, self.batch.t, self.batch.traj)

    def loss(self, use_flow: bool) -> None:
        loss_cfg = dataclasses.replace(self.cfg, no_flow=not use_flow).loss_config()
        loss, _ = nabla_gfn.nabla_db_loss(self.batch, self.policy_eps, self.reference_eps, self.log_reward,
                                          self.flow if use_flow else None, loss_cfg)
        loss.backward()
        for p in self.params:
            p.grad = None

    def part_flops(self, reward_fn) -> dict:
        """FLOPs of the loss's parts, in guided-ε units: eps with a backward to the input (Eg) or to the
        LoRA (Ep), the reward gradient through decoder and reward model (R), g_φ forward+backward (F)."""
        b = self.batch

        def eps_to_input():
            x = b.x.detach().requires_grad_(True)
            torch.autograd.grad(self.policy_eps(x, b.t, b.traj).sum(), x)

        unit = flops(self.eps)
        parts = dict(Eg=flops(eps_to_input), Ep=flops(lambda: self.policy_eps(b.x, b.t, b.traj).sum().backward()),
                     R=flops(lambda: nabla_gfn.reward_gradient(reward_fn, b.x, b.traj)),
                     F=flops(lambda: self.flow(b.x, b.t, b.traj).sum().backward()))
        for p in self.params:
            p.grad = None
        return {k: v / unit for k, v in parts.items()} | {"unit": unit}


def composed_loss(parts: dict, use_flow: bool, terminal: bool) -> float:
    """nabla_db_loss's cost from its parts, in its call order (guided-ε units, E = 1):
    policy ε̂_θ(x) once, backward to x (reverse score, with the guess at x: R) and to the LoRA;
    reference ε̂♯(x) with a backward to x (no grad without g_φ: E); target at x': R at x_0 (terminal)
    or ε̂_θ(x') + R + backward to x' (Eg + R); g_φ at x and x' (2F)."""
    Eg, Ep, R, F = parts["Eg"], parts["Ep"], parts["R"], parts["F"]
    target = R if terminal else Eg + R
    if not use_flow:
        return Ep + 1 + target
    return (Eg + Ep - 1 + R) + Eg + target + 2 * F


def print_table(title: str, ratio, memory=None) -> None:
    """ratio(use_flow, kind) → float; memory(use_flow) → MiB or None."""
    print(title)
    print(f"| loss | non-terminal | terminal | training mix (1 terminal + {MIX - 1} others) |"
          + (" peak memory MiB |" if memory else ""))
    print("|---|---|---|---|" + ("---|" if memory else ""))
    for use_flow in (True, False):
        r = {kind: ratio(use_flow, kind) for kind in ("non-terminal", "terminal")}
        mix = (r["terminal"] + (MIX - 1) * r["non-terminal"]) / MIX
        label = "full (with g_φ)" if use_flow else "no flow (--no-flow)"
        print(f"| {label} | {r['non-terminal']:.2f} | {r['terminal']:.2f} | {mix:.2f} |"
              + (f" {memory(use_flow):.0f} |" if memory else ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny",
                        help="tiny: the --model tiny pipeline at 32²; sd15: SD-1.5-sized random weights at 512²")
    parser.add_argument("--measure", choices=("time", "flops"), default="time", help="see the module docstring")
    parser.add_argument("--batch", type=int, default=2, help="transitions per loss evaluation (train batch)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median ratio)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the chain the transitions come from")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for --measure time (flops with --size sd15 always uses meta)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="frozen-weight dtype, as sd_finetune.py --precision")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: as sd_finetune.py)")
    args = parser.parse_args(argv)

    flags = ["--steps", str(args.steps), "--precision", args.precision]
    flags += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    cfg = sd.parse_config(["--preset", "smoke", *flags] if args.size == "tiny" else flags)
    meta = args.size == "sd15" and args.measure == "flops"
    device = torch.device("meta" if meta else args.device)
    dtype = sd.weight_dtype(cfg.precision, torch.device("cuda" if meta else device))
    torch.manual_seed(0)
    if args.size == "tiny":
        models = sd.load_models(cfg, device, dtype)
    else:
        models = sd15_random_models(cfg, device, dtype)
    schedule = nabla_gfn.ddim_schedule(models.pipe.scheduler, cfg.steps)
    generator = torch.Generator().manual_seed(0)
    prompts = ["cat"] * args.batch
    benches = {kind: Bench(models, cfg, transition_batch(models, schedule, step, args.batch, cfg.resolution,
                                                         generator), prompts)
               for kind, step in (("non-terminal", cfg.steps // 2), ("terminal", cfg.steps - 1))}
    where = f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else \
        "meta device" if meta else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{'tiny pipeline (--model tiny)' if args.size == 'tiny' else 'SD-1.5-sized random weights'}, "
          f"{cfg.resolution}², batch {args.batch} transitions, {cfg.steps}-step chain, {where}, "
          f"frozen weights {str(dtype).removeprefix('torch.')}, LoRA/g_φ/reward float32")

    if args.measure == "flops":
        # On meta, prompts cannot be looked up by value (traj.tolist()); the aesthetic reward ignores them.
        def reward_of_latents(x0, traj):
            return models.reward(sd.decode_latents(models.pipe.vae, x0), prompts[: len(x0)])

        parts = {kind: b.part_flops(reward_of_latents) for kind, b in benches.items()}
        unit = parts["non-terminal"].pop("unit")
        parts["terminal"].pop("unit")
        print(f"unit: one guided ε evaluation = {unit / 1e9:.4g} GFLOP; parts (units): "
              + ", ".join(f"{k}={v:.2f}" for k, v in parts["non-terminal"].items()))
        print_table("composed from the parts:", lambda f, k: composed_loss(parts[k], f, k == "terminal"))
        if not meta:
            measured = {(f, k): flops(lambda: b.loss(f)) / flops(b.eps) for k, b in benches.items() for f in (0, 1)}
            print_table("measured on the real loss:", lambda f, k: measured[int(f), k])
        return

    memory, ratios = {}, {}
    for use_flow in (False, True):  # cheapest first: CPU peak RSS is monotone
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for kind, b in benches.items():
            b.loss(use_flow)  # warm-up
            paired = [seconds(lambda: b.loss(use_flow), device) / seconds(b.eps, device) for _ in range(args.repeats)]
            ratios[use_flow, kind] = statistics.median(paired)
        memory[use_flow] = peak_memory_mib(device)
    unit = statistics.median(seconds(benches["non-terminal"].eps, device) for _ in range(args.repeats))
    print(f"unit: one guided ε evaluation = {unit * 1e3:.1f} ms (median)")
    print_table("time of loss + backward / time of one guided ε evaluation (median of paired runs):",
                lambda f, k: ratios[f, k], lambda f: memory[f])


if __name__ == "__main__":
    main()
