"""Cost of one trained ∇-GFlowNet transition on Stable Diffusion, in guided-ε evaluations.

Unit: one guided ε evaluation = what one sampling step costs: a single no-grad UNet call on 2N rows
(unconditional and conditional, classifier-free guidance) for a batch of N transitions. The script
reports, for the same batch, on one device and in one run,

    ratio = cost(nabla_gfn.nabla_db_loss + backward) / cost(one guided ε evaluation)

with the flow correction g_φ (full loss) and without it (--no-flow variant), for non-terminal and
terminal transitions and for the paper's training mix (1 terminal + 5 others per trajectory at 50
steps). Goal (issue 3): ≤ 13 with the full loss, ≤ 7 without g_φ. The VAE decoder and the reward
model run inside the loss (the reward gradient), so their cost is part of the ratio.

Each flow target of sd_finetune.py (--flow-target bootstrap|mixed|adjoint, with and without g_φ; adjoint
matching = --no-flow --flow-target adjoint) gets a row, the lean-adjoint targets one per Jacobian of
their sweep (--adjoint-jacobian guided|unguided): the loss per trained transition (training mix),
the sweep per trajectory, the cost per trained transition with the sweep spread over the K trained
transitions of its trajectory, and per trajectory (50 sampling steps + sweep + K losses), for K = 6
(the paper's --subsample-fraction 0.1) and K = 50 (every transition, --subsample-fraction 1). Not
counted: with --precision bf16 sampling and the default fp32 residual, one no-grad ε̂ per trained
transition re-records ε̂_old (sd_finetune.recorded_eps; +1 unit). --taesd also composes the cost with
AutoencoderTiny (madebyollin/taesd's architecture) decoding the forward-looking guesses only (the
terminal reward keeps the VAE); sd_finetune.py has no such option yet.

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
    python benchmarks/bench_sd_transition.py --size sd15 --measure flops --taesd     # SD-1.5 at 512², any CPU
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
from typing import List, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nabla_gfn  # noqa: E402
import sd_finetune as sd  # noqa: E402
import sd_models as sdm  # noqa: E402
import tiny_models  # noqa: E402
from sd_rewards import AestheticHead, AestheticReward, ClipEmbedder, quiet_library_logs  # noqa: E402
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel  # noqa: E402

MIX = nabla_gfn.subsample_steps(50, 0.1, 1, torch.Generator()).shape[1]  # paper: terminal + 5 per trajectory

# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def narrow(channels: int, reduce: int) -> int:
    """channels / reduce, rounded down to a multiple of 32 (GroupNorm's groups), at least 32."""
    return max(32, channels // reduce // 32 * 32)


def sd15_text_config(reduce: int = 1) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=49408, hidden_size=768 // reduce, intermediate_size=3072 // reduce,
                          num_hidden_layers=12 // reduce, num_attention_heads=12 // reduce,
                          max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=512, eos_token_id=513, pad_token_id=513)


def sd15_vae(reduce: int = 1) -> AutoencoderKL:
    """SD-1.5's VAE architecture (83.7M parameters at reduce=1), random weights, on the current device."""
    return AutoencoderKL(block_out_channels=tuple(narrow(c, reduce) for c in (128, 256, 512, 512)),
                         layers_per_block=2, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def sd15_clip(reduce: int = 1) -> CLIPModel:
    """CLIP ViT-L/14 (the aesthetic reward's, 428M parameters at reduce=1), random weights; reduce > 1
    also shrinks its input (224² / reduce), so that its graph stays as small a share as at 512²."""
    return CLIPModel(CLIPConfig(
        text_config=sd15_text_config(reduce).to_dict(),
        vision_config=dict(hidden_size=1024 // reduce, intermediate_size=4096 // reduce,
                           num_hidden_layers=24 // reduce, num_attention_heads=16 // reduce, image_size=224 // reduce,
                           patch_size=14, hidden_act="quick_gelu"),
        projection_dim=768 // reduce,
    ))


def sd15_random_models(cfg: sd.Config, device: torch.device, dtype: torch.dtype, reduce: int = 1) -> sd.Models:
    """SD-1.5-sized pipeline and CLIP ViT-L/14 with random weights, assembled like sd.load_models.
    Modules are created directly on `device` (which may be "meta"). reduce > 1: the same architectures
    with every width (and the CLIP towers' depth) divided by `reduce` (sd_memory.py --quick)."""
    tokenizer = tiny_models.build_tiny_tokenizer(Path(cfg.cache_dir) / "bench-vocab")  # ids < 514: fine for timing
    with torch.device(device):
        vae = sd15_vae(reduce)
        text_encoder = CLIPTextModel(sd15_text_config(reduce))
        unet = UNet2DConditionModel(  # otherwise SD 1.x = the defaults
            sample_size=64, cross_attention_dim=768 // reduce,
            block_out_channels=tuple(narrow(c, reduce) for c in (320, 640, 1280, 1280)))
        clip = sd15_clip(reduce)
        head = AestheticHead(768 // reduce).eval().requires_grad_(False)
    with quiet_library_logs():  # diffusers warns on .to(dtype) even with nothing to keep in float32
        unet_dtype, fast_dtype = sd.unet_dtypes(cfg, torch.device("cuda" if device == "meta" else device))
        vae_dtype = sd.weight_dtype(cfg.vae_precision, torch.device("cuda" if device == "meta" else device))
        for module, module_dtype in ((vae, vae_dtype), (text_encoder, dtype), (unet, unet_dtype)):
            module.requires_grad_(False).to(module_dtype)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=tiny_models.sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    embedder = ClipEmbedder(clip, tokenizer).to(device)
    lora = sd.add_lora(unet, cfg.lora_rank, cfg.lora_alpha)
    with torch.device(device):
        flow = sd.build_flow_net(unet, cfg.flow_widths)
    return sd.Models(pipe, lora, flow, embedder, AestheticReward(embedder, head), sd.encode_prompts(pipe, [""]),
                     fast_dtype, cfg.reward_chunk)  # gradient checkpointing: the caller's (sdm.enable_...)


def transition_batch(models: sd.Models, schedule, step: int, n: int, resolution: int, generator):
    """n transitions at step index `step` of a synthetic chain (the values do not change the cost)."""
    shape = sdm.latent_shape(models, n, resolution)
    trajectory = nabla_gfn.Trajectory(
        states=torch.randn(n, schedule.num_steps + 1, *shape[1:], generator=generator).to(models.pipe.device),
        eps=torch.randn(n, schedule.num_steps, *shape[1:], generator=generator).to(models.pipe.device),
    )
    return nabla_gfn.gather_transitions(trajectory, schedule, torch.full((n, 1), step)), trajectory


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


# name → (use_flow, flow_target): the paper's loss, its no-flow variant and the lean-adjoint targets
TARGETS = {
    "bootstrap (paper)": (True, "bootstrap"),
    "mixed": (True, "mixed"),
    "adjoint": (True, "adjoint"),
    "no flow": (False, "bootstrap"),
    "adjoint matching": (False, "adjoint"),
}
GOALS = {True: 13.0, False: 7.0}  # issue 13: per trained transition, full loss / no flow


class Bench:
    """The loss and its parts on one batch of transitions, as zero-argument callables."""

    def __init__(self, models: sd.Models, cfg: sd.Config, batch, prompts, schedule, trajectory):
        self.models, self.cfg, self.batch, self.schedule, self.trajectory = models, cfg, batch, schedule, trajectory
        self.cond = sd.encode_prompts(models.pipe, prompts)
        self.prompts = prompts
        self.policy_eps, self.reference_eps, self.log_reward, self.flow = sd.loss_callables(
            models, self.cond, prompts, cfg.guidance_scale)
        self.params = [p for ps in sd.parameter_groups(models).values() for p in ps]
        self.adjoint = torch.randn_like(trajectory.states)  # values do not change the cost

    def eps(self) -> None:
        with torch.no_grad():
            self.policy_eps(self.batch.x, self.batch.t, self.batch.traj)

    def sampling_eps(self) -> None:
        """One sampling step's guided ε (under --precision autocast when the UNet is held in float32)."""
        with torch.no_grad():
            sdm.guided_eps(self.models.unet, self.cond, self.models.uncond, self.cfg.guidance_scale,
                          autocast=self.models.fast_dtype)(self.batch.x, self.batch.t, self.batch.traj)

    def loss(self, target: str) -> None:
        use_flow, flow_target = TARGETS[target]
        loss_cfg = dataclasses.replace(self.cfg, no_flow=not use_flow, flow_target=flow_target).loss_config()
        loss, _ = nabla_gfn.nabla_db_loss(self.batch, self.policy_eps, self.reference_eps, self.log_reward,
                                          self.flow if use_flow else None, loss_cfg,
                                          adjoint=None if flow_target == "bootstrap" else self.adjoint)
        loss.backward()
        for p in self.params:
            p.grad = None

    def sweep(self, jacobian: str, counting: bool = False) -> None:
        """The lean-adjoint sweep of the batch's n trajectories (sd_finetune.adjoint_sweep). counting: the
        same sweep with each UNet input cloned (FlopCounterMode's module hooks reject a leaf input under
        autograd.grad, which the unguided reference's single UNet call would pass)."""
        if not counting:
            cfg = dataclasses.replace(self.cfg, flow_target="adjoint", adjoint_jacobian=jacobian,
                                      sample_batch_size=len(self.trajectory.states))
            sd.adjoint_sweep(self.models, self.schedule, self.trajectory, self.cond, self.prompts, cfg)
            return
        reference = self.reference_eps if jacobian == "guided" else sdm.conditional_eps(self.models.unet, self.cond)
        nabla_gfn.lean_adjoint(lambda x, t, traj: reference(x.clone(), t, traj), self.schedule, self.trajectory,
                               self.log_reward, self.cfg.beta)

    def part_flops(self, reward_fn, taesd=None) -> dict:
        """FLOPs of the loss's parts, in guided-ε units: eps with a backward to the input (Eg) or to the
        LoRA (Ep), the reference's VJP guided (Egr) and unguided (Egu), the reward gradient through
        decoder and reward model (R; through AutoencoderTiny's decoder: Rt), g_φ forward+backward (F)."""
        b = self.batch

        def to_input(eps_fn):
            def run():
                x = b.x.detach().requires_grad_(True)
                torch.autograd.grad(eps_fn(x.clone(), b.t, b.traj).sum(), x)  # clone: see `sweep`
            return run

        unit = flops(self.eps)
        unguided = sdm.conditional_eps(self.models.unet, self.cond)
        parts = dict(Eg=flops(to_input(self.policy_eps)), Egr=flops(to_input(self.reference_eps)),
                     Egu=flops(to_input(unguided)),
                     Ep=flops(lambda: self.policy_eps(b.x, b.t, b.traj).sum().backward()),
                     R=flops(lambda: nabla_gfn.reward_gradient(reward_fn, b.x, b.traj)),
                     F=flops(lambda: self.flow(b.x, b.t, b.traj).sum().backward()))
        if taesd is not None:
            def taesd_reward(x0, traj):
                return self.models.reward(taesd.decode(x0.to(taesd.dtype)).sample.float(), self.prompts[: len(x0)])
            parts["Rt"] = flops(lambda: nabla_gfn.reward_gradient(taesd_reward, b.x, b.traj))
        for p in self.params:
            p.grad = None
        return {k: v / unit for k, v in parts.items()} | {"unit": unit}


def composed_loss(parts: dict, name: str, terminal: bool, guess_reward: str = "R") -> float:
    """nabla_db_loss's cost from its parts, in its call order (guided-ε units, E = 1), for each target:
    bootstrap, mixed: policy ε̂_θ(x) once, backward to x (reverse score, with the guess at x: R) and
        to the LoRA (Eg + Ep − 1 + R); reference ε̂♯(x) with a backward to x (Eg); target at x': R at
        x_0 (terminal) or ε̂_θ(x') + R + backward to x' (Eg + R); g_φ at x and x' (2F);
    adjoint: no L_B, so no graph to x and no guess at x: Ep, reference without grad (1), target at
        x', g_φ at x' only (F);
    no flow: Ep + 1 + target;   adjoint matching: Ep + 1 (a_{i+1} is the target: no reward call).
    guess_reward "Rt": the forward-looking guesses decode with AutoencoderTiny (terminal rows keep R)."""
    Eg, Ep, R, F, Rg = parts["Eg"], parts["Ep"], parts["R"], parts["F"], parts[guess_reward]
    next_target = R if terminal else Eg + Rg
    use_flow, flow_target = TARGETS[name]
    if flow_target == "adjoint":
        return Ep + 1 + (next_target + F if use_flow else 0.0)
    if not use_flow:
        return Ep + 1 + next_target
    return (Eg + Ep - 1 + Rg) + Eg + next_target + 2 * F


def sweep_units(parts: dict, jacobian: str, steps: int) -> float:
    """The lean-adjoint sweep of one trajectory: ∇r(x_0) (R), then one reference VJP per step."""
    return parts["R"] + steps * parts["Egr" if jacobian == "guided" else "Egu"]


def mix(per_kind: dict, transitions: int) -> float:
    """Mean over a trajectory's trained transitions: 1 terminal + (transitions − 1) others."""
    return (per_kind["terminal"] + (transitions - 1) * per_kind["non-terminal"]) / transitions


def cost_rows(loss, sweep, sampling: float, steps: int, transitions: Sequence[int]) -> List[dict]:
    """loss(name, kind) and sweep(jacobian) in units → one row per target (and Jacobian) with the cost per
    trained transition (loss, plus the sweep spread over the trajectory's transitions) and per trajectory
    (sampling + sweep + every trained transition), for each count of trained transitions per trajectory."""
    rows = []
    for name, (use_flow, flow_target) in TARGETS.items():
        per_loss = mix({k: loss(name, k) for k in ("non-terminal", "terminal")}, transitions[0])
        for jacobian in (("guided", "unguided") if flow_target != "bootstrap" else ("-",)):
            sweep_cost = sweep(jacobian) if jacobian != "-" else 0.0
            row = dict(target=name, jacobian=jacobian, loss=per_loss, sweep=sweep_cost, goal=GOALS[use_flow])
            for k in transitions:
                per_k = mix({kind: loss(name, kind) for kind in ("non-terminal", "terminal")}, k)
                row[f"transition_k{k}"] = per_k + sweep_cost / k
                row[f"trajectory_k{k}"] = sampling * steps + sweep_cost + k * per_k
            rows.append(row)
    return rows


def print_cost_table(title: str, rows: List[dict], transitions: Sequence[int], extra: str = "") -> None:
    print(title)
    k0 = transitions[0]
    head = "| target | adjoint Jacobian | loss / transition | sweep / trajectory | " + " | ".join(
        f"per transition, K={k} | per trajectory, K={k}" for k in transitions) + " | goal |" + extra
    print(head)
    print("|---|---|---|---|" + "---|---|" * len(transitions) + "---|" + ("---|" if extra else ""))
    for r in rows:
        cells = " | ".join(f"{r[f'transition_k{k}']:.2f} | {r[f'trajectory_k{k}']:.0f}" for k in transitions)
        print(f"| {r['target']} | {r['jacobian']} | {r['loss']:.2f} | {r['sweep']:.1f} | {cells} | "
              f"{'≤' if r[f'transition_k{k0}'] <= r['goal'] else '>'} {r['goal']:.0f} |"
              + (f" {r['memory']:.0f} |" if extra else ""))


def sd15_flops(models, benches, cfg, prompts, transitions, taesd: bool) -> None:
    """--measure flops: the parts, then the cost table composed from them (and, off meta, checked)."""
    def reward_of_latents(x0, traj):  # on meta, prompts cannot be looked up by value (traj.tolist())
        return models.reward(sdm.decode_latents(models.pipe.vae, x0), prompts[: len(x0)])

    tiny_decoder = None
    if taesd:
        from diffusers import AutoencoderTiny

        with torch.device(models.pipe.device):
            tiny_decoder = AutoencoderTiny().requires_grad_(False)
        with quiet_library_logs():
            tiny_decoder.to(models.pipe.vae.dtype)
    parts = {kind: b.part_flops(reward_of_latents, tiny_decoder) for kind, b in benches.items()}
    unit = parts["non-terminal"].pop("unit")
    parts["terminal"].pop("unit")
    print(f"unit: one guided ε evaluation = {unit / 1e9:.4g} GFLOP; parts (units): "
          + ", ".join(f"{k}={v:.2f}" for k, v in parts["non-terminal"].items()))
    p = parts["non-terminal"]
    for guess in (["R", "Rt"] if taesd else ["R"]):
        rows = cost_rows(lambda n, k: composed_loss(parts[k], n, k == "terminal", guess),
                         lambda j: sweep_units(p, j, cfg.steps), 1.0, cfg.steps, transitions)
        label = "real VAE" if guess == "R" else "AutoencoderTiny for the forward-looking guesses (FLOPs only)"
        print_cost_table(f"composed from the parts, guided-ε units ({label}):", rows, transitions)
    if models.pipe.device.type != "meta":
        measured = {(n, k): flops(lambda: b.loss(n)) / flops(b.eps) for k, b in benches.items() for n in TARGETS}
        worst = max(abs(measured[n, k] - composed_loss(parts[k], n, k == "terminal")) for n in TARGETS
                    for k in benches)
        print(f"composition check on the real loss: max |measured − composed| = {worst:.3f} units")
        sweep_measured = {j: flops(lambda: benches['non-terminal'].sweep(j, counting=True)) / flops(benches['non-terminal'].eps)
                          for j in ("guided", "unguided")}
        print("sweep measured / composed: " + ", ".join(
            f"{j} {v:.2f} / {sweep_units(p, j, cfg.steps):.2f}" for j, v in sweep_measured.items()))


def timed(benches, device, repeats: int, transitions, steps: int) -> None:
    """--measure time: median paired ratios to one guided ε; peak memory after each target."""
    ratios, memory, sweeps = {}, {}, {}
    order = ["adjoint matching", "no flow", "adjoint", "mixed", "bootstrap (paper)"]  # cheapest first (RSS)
    b = benches["non-terminal"]
    for name in order:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for kind, bench in benches.items():
            bench.loss(name)  # warm-up
            ratios[name, kind] = statistics.median(
                seconds(lambda: bench.loss(name), device) / seconds(bench.eps, device) for _ in range(repeats))
        memory[name] = peak_memory_mib(device)
    for jacobian in ("unguided", "guided"):
        b.sweep(jacobian)
        sweeps[jacobian] = statistics.median(seconds(lambda: b.sweep(jacobian), device) / seconds(b.eps, device)
                                             for _ in range(max(1, repeats // 5)))
    sampling = statistics.median(seconds(b.sampling_eps, device) / seconds(b.eps, device) for _ in range(repeats))
    unit = statistics.median(seconds(b.eps, device) for _ in range(repeats))
    print(f"unit: one guided ε evaluation of the loss = {unit * 1e3:.1f} ms (median); a sampling step = "
          f"{sampling:.2f} units; peak memory (MiB) {'allocated' if device.type == 'cuda' else 'RSS so far'}")
    rows = cost_rows(lambda n, k: ratios[n, k], lambda j: sweeps[j], sampling, steps, transitions)
    for r in rows:
        r["memory"] = memory[r["target"]]
    print_cost_table("time / time of one guided ε evaluation (median of paired runs):", rows, transitions,
                     " peak memory MiB |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "sd15"), default="tiny",
                        help="tiny: the --model tiny pipeline at 32²; sd15: SD-1.5-sized random weights at 512²")
    parser.add_argument("--measure", choices=("time", "flops"), default="time", help="see the module docstring")
    parser.add_argument("--batch", type=int, default=2, help="transitions per loss evaluation (train batch)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median ratio)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the chain the transitions come from")
    parser.add_argument("--transitions", default=f"{MIX},50", help="trained transitions per trajectory K "
                        "(comma-separated; the first is the training mix of the loss column)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device for --measure time (flops with --size sd15 always uses meta)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="frozen-weight dtype, as sd_finetune.py --precision")
    parser.add_argument("--residual-precision", default="fp32", choices=("fp32", "tf32", "same"),
                        help="the loss's UNet arithmetic, as sd_finetune.py --residual-precision")
    parser.add_argument("--taesd", action="store_true", help="also compose the cost with AutoencoderTiny "
                        "decoding the forward-looking guesses (flops only)")
    parser.add_argument("--cache-dir", default=None, help="cache folder (default: as sd_finetune.py)")
    args = parser.parse_args(argv)

    flags = ["--steps", str(args.steps), "--precision", args.precision, "--residual-precision", args.residual_precision]
    flags += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    cfg = sd.parse_config(["--preset", "smoke", *flags] if args.size == "tiny" else flags)
    transitions = [int(k) for k in args.transitions.split(",")]
    meta = args.size == "sd15" and args.measure == "flops"
    device = torch.device("meta" if meta else args.device)
    models, schedule = setup_models(args, cfg, device, meta)
    generator = torch.Generator().manual_seed(0)
    prompts = ["cat"] * args.batch
    benches = {}
    for kind, step in (("non-terminal", cfg.steps // 2), ("terminal", cfg.steps - 1)):
        batch, trajectory = transition_batch(models, schedule, step, args.batch, cfg.resolution, generator)
        benches[kind] = Bench(models, cfg, batch, prompts, schedule, trajectory)
    where = f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else \
        "meta device" if meta else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{'tiny pipeline (--model tiny)' if args.size == 'tiny' else 'SD-1.5-sized random weights'}, "
          f"{cfg.resolution}², batch {args.batch} transitions, {cfg.steps}-step chain, {where}, UNet weights "
          f"{str(models.unet.conv_in.weight.dtype).removeprefix('torch.')} (sampling autocast "
          f"{str(models.fast_dtype).removeprefix('torch.')}), LoRA/g_φ/reward float32")
    if args.measure == "flops":
        sd15_flops(models, benches, cfg, prompts, transitions, args.taesd)
    else:
        timed(benches, device, args.repeats, transitions, cfg.steps)


def setup_models(args, cfg, device, meta: bool):
    dtype = sd.weight_dtype(cfg.precision, torch.device("cuda" if meta else device))
    torch.manual_seed(0)
    if args.size == "tiny":
        models = sd.load_models(cfg, device, dtype)
    else:
        models = sd15_random_models(cfg, device, dtype)
    sd.set_float32_matmul(cfg.residual_precision)
    return models, nabla_gfn.ddim_schedule(models.pipe.scheduler, cfg.steps)


if __name__ == "__main__":
    main()
