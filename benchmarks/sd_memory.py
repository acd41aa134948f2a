"""Peak memory of one ∇-GFlowNet training step on Stable Diffusion, gradient checkpointing off and on.

One step = what sd_finetune.update runs per micro-batch: `nabla_gfn.nabla_db_loss` on a batch of
transitions with the driver's callables (sd_models.loss_callables: guided policy and reference ε,
decode + reward, g_φ) and the paper's loss (bootstrap flow target), then backward. The models are
SD-1.5-sized with random weights (bench_sd_transition.sd15_random_models, built like sd_finetune's
load_models for --precision bf16: UNet float32 for the float32 residual, VAE and text encoder bf16 or
as --vae-precision says, LoRA, g_φ and CLIP ViT-L/14 + aesthetic head float32); the transitions are
non-terminal (the dearest kind: a forward-looking guess at x and at x'), from a synthetic 50-step
chain (values do not change the memory).

How the peak is measured. Each configuration runs in a fresh subprocess, so peaks never mix.
  CPU:  the process's resident set. After setup (weights built, transitions drawn), the kernel's
        high-water mark is reset (`5` written to /proc/self/clear_refs); after the step, peak =
        VmHWM − VmRSS at the reset. glibc runs with MALLOC_MMAP_THRESHOLD_=65536, so every tensor
        of 64 KiB or more is its own mmap, returned to the kernel when freed: the resident set
        follows the live tensors, not an allocator's cache. (torch.profiler's memory profile was
        the alternative; it adds its own bookkeeping to a multi-GiB run and reports per operator,
        not the process's peak.)
  CUDA: torch.cuda.max_memory_allocated − memory_allocated before the step.

The prediction for the default run at 512² (a CPU-measured prediction, not a GPU measurement): each
step's peak at the measured resolution (batch 1 and 2) is split into the reward model's graph as the
step holds it (all rows, or one chunk with --reward-chunk; measured alone beside the step, CLIP at its
fixed 224² input: kept as is), the trainable parameters' gradients (kept as is) and the rest (UNet,
g_φ and VAE decoder graphs: scaled by the pixel ratio to 512²); the two batches then give the bytes
per transition and the batch-independent part at 512², and

    peak(reward) = weights(reward) + trajectories held + batch-independent part + train_batch_size × m(512²)

with the weights as sd_finetune holds them on a GPU (UNet float32, VAE --vae-precision, text encoder
bf16, g_φ and every reward model float32; HPSv2 and PickScore add an open_clip ViT-H-14, 986.1M
parameters, beside the CLIP ViT-L/14 that is always loaded, and their graph is the ViT-L's scaled by
the towers' activation ratio (32 × 1280) / (24 × 1024)). Not included: AdamW state of the LoRA and
g_φ (< 0.1 GiB), the CUDA context and cuDNN workspaces (≈ 0.5–1 GiB).
"Off" is --no-gradient-checkpointing --reward-chunk 0 (the loss before issue 19); "on" is the
default: sd_models.enable_gradient_checkpointing and --reward-chunk 1.

Run (CPU; one configuration at a time, ≤ 8 GB each; ~30 min on 2 busy cores):
    nice python benchmarks/sd_memory.py --json docs/results/sd_memory.json    # SD-1.5 size, 128², batch 1 and 2
    python benchmarks/sd_memory.py --quick --json /tmp/m.json        # widths / 4, 64², batch 1 and 2 (the test)
    python benchmarks/sd_memory.py --device cuda --resolutions 512    # on a GPU (benchmarks/gpu_check.py)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_sd_transition as bench  # noqa: E402
import nabla_gfn  # noqa: E402
import sd_finetune as sd  # noqa: E402
import sd_models as sdm  # noqa: E402

GIB = 2**30
VIT_H_PARAMS = 986.1e6  # open_clip ViT-H-14 (HPSv2.1) and PickScore's CLIP-H: vision 632.1M + text 354.0M
VIT_H_GRAPH = (32 * 1280) / (24 * 1024)  # ViT-H/14 vs ViT-L/14 saved activations at 224² (same 257 tokens)
QUICK_REDUCE = 4  # --quick: every width / 4 (UNet 64-160-320-320, VAE 32-64-128-128, CLIP towers ÷ 4 deep)

# ----------------------------------------------------------------------------------------------
# One configuration (runs in its own process)
# ----------------------------------------------------------------------------------------------


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers (or of a list of parameters)."""
    tensors = module if isinstance(module, list) else [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(models: sd.Models) -> dict:
    """Bytes of each component as it is held (the LoRA inside the UNet)."""
    parts = dict(unet=models.unet, vae=models.pipe.vae, text_encoder=models.pipe.text_encoder,
                 reward_clip_l=models.reward, flow=models.flow)
    return {name: module_bytes(m) for name, m in parts.items() if m is not None}


def measure_one(gradient_checkpointing: bool, batch: int, resolution: int, device: str, reduce: int,
                cache_dir: str) -> dict:
    """Peak memory of one loss + backward on `batch` non-terminal transitions (see the module docstring)."""
    device = torch.device(device)
    flags = ["--precision", "bf16", "--resolution", str(resolution), "--cache-dir", cache_dir]
    flags += ["--flow-channels", "32,64"] if reduce > 1 else []
    flags += [] if gradient_checkpointing else ["--reward-chunk", "0"]  # off: all rows' reward graphs at once
    cfg = sd.parse_config(flags)
    torch.manual_seed(0)
    models = bench.sd15_random_models(cfg, device, sd.weight_dtype(cfg.precision, device), reduce)
    if gradient_checkpointing:
        sdm.enable_gradient_checkpointing(models)
    sd.set_float32_matmul(cfg.residual_precision)
    schedule = nabla_gfn.ddim_schedule(models.pipe.scheduler, cfg.steps)
    transitions, trajectory = bench.transition_batch(models, schedule, cfg.steps // 2, batch, resolution,
                                                     torch.Generator().manual_seed(0))
    step = bench.Bench(models, cfg, transitions, ["cat"] * batch, schedule, trajectory)
    started = time.perf_counter()
    peak = peak_of(lambda: step.loss("bootstrap (paper)"), device)
    seconds = round(time.perf_counter() - started, 1)
    rows = min(batch, cfg.reward_chunk) if cfg.reward_chunk > 0 else batch  # images whose graph lives at once
    images = (torch.rand(rows, 3, resolution, resolution, device=device) * 2 - 1).requires_grad_(True)
    reward_graph = peak_of(lambda: torch.autograd.grad(models.reward(images, ["cat"] * rows).sum(), images), device)
    return dict(gradient_checkpointing=gradient_checkpointing, batch=batch, resolution=resolution,
                peak_bytes=peak, peak_bytes_per_transition=peak / batch, reward_model_graph_bytes=reward_graph,
                trainable_bytes=sum(module_bytes(p) for p in sdm.parameter_groups(models).values()),
                step_seconds=seconds, weight_bytes=weight_bytes(models), device=device.type, reduce=reduce,
                vae_dtype=str(models.pipe.vae.dtype).removeprefix("torch."))


def peak_of(fn, device) -> int:
    """Bytes above the memory in use before fn() at fn's peak (CPU: resident set; CUDA: allocated)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = rss_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current VmRSS
    fn()
    return rss_kib("VmHWM") * 1024 - before


def run_child(config: dict, args) -> dict:
    """measure_one in a fresh interpreter (glibc returning freed tensors to the kernel: see docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, __file__, "--child", json.dumps(config), "--device", args.device,
           "--cache-dir", args.cache_dir]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{config}: child failed\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# The prediction for the default run
# ----------------------------------------------------------------------------------------------


def marginal(rows, resolution: int, checkpointing: bool, key: str = "peak_bytes") -> tuple:
    """(bytes per added transition, batch-independent bytes) from the two smallest batches measured."""
    pts = sorted((r["batch"], r[key]) for r in rows
                 if r["resolution"] == resolution and r["gradient_checkpointing"] == checkpointing)[:2]
    (b0, m0), (b1, m1) = pts
    per = (m1 - m0) / (b1 - b0)
    return per, m0 - per * b0


def predict(rows, resolution: int = 512) -> list:
    """Predicted GPU peak of the default run per reward, checkpointing off and on (module docstring)."""
    cfg, measured = sd.Config(), max(r["resolution"] for r in rows)
    weights = rows[0]["weight_bytes"]
    vae_params = weights["vae"] // (2 if rows[0]["vae_dtype"] == "bfloat16" else 4)
    vae_bytes = vae_params * (4 if cfg.vae_precision == "fp32" else 2)  # as held on a GPU
    base = weights["unet"] + weights["text_encoder"] + weights["reward_clip_l"] + weights.get("flow", 0) + vae_bytes
    held = cfg.trajectories_per_epoch * (2 * cfg.steps + 1) * 4 * (resolution // 8) ** 2 * 4  # states, ε (float32)
    scale = (resolution / measured) ** 2
    table = []
    for checkpointing in (False, True):
        step = {r["batch"]: r for r in rows if r["resolution"] == measured and r["gradient_checkpointing"] == checkpointing}
        for reward, extra_weights, graph_scale in (("aesthetic (CLIP ViT-L/14)", 0.0, 1.0),
                                                   ("hpsv2 (+ ViT-H-14)", 4 * VIT_H_PARAMS, VIT_H_GRAPH),
                                                   ("pickscore (+ CLIP-H)", 4 * VIT_H_PARAMS, VIT_H_GRAPH)):
            at_512 = {}  # peak(batch) at 512²: reward graph and gradients as measured, the rest × pixel ratio
            for batch in sorted(step)[:2]:
                r = step[batch]
                rest = max(0, r["peak_bytes"] - r["reward_model_graph_bytes"] - r["trainable_bytes"])
                at_512[batch] = r["reward_model_graph_bytes"] * graph_scale + r["trainable_bytes"] + rest * scale
            if len(at_512) == 2:
                per_transition, fixed = at_512[2] - at_512[1], 2 * at_512[1] - at_512[2]
            else:  # batch 1 only: all of it per transition (an upper bound)
                per_transition, fixed = at_512[1], 0.0
            total = base + extra_weights + held + fixed + cfg.train_batch_size * per_transition
            table.append(dict(reward=reward, gradient_checkpointing=checkpointing, resolution=resolution,
                              train_batch_size=cfg.train_batch_size, weights_bytes=base + extra_weights,
                              trajectories_bytes=held, fixed_bytes=fixed, per_transition_bytes=per_transition,
                              peak_bytes=total, peak_bytes_by_train_batch_size={
                                  n: total + (n - cfg.train_batch_size) * per_transition for n in (1, 2, 4, 8)}))
    return table


def print_tables(result: dict) -> None:
    print("\nmeasured: peak of one loss + backward above the weights "
          f"({result['device']}, {result['measure']}; GiB)")
    print("| resolution | batch | checkpointing | peak | per transition | step s |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['resolution']}² | {r['batch']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
              f"{r['peak_bytes'] / GIB:.2f} | {r['peak_bytes_per_transition'] / GIB:.2f} | {r['step_seconds']} |")
    for res, ratio in result["ratios"].items():
        print(f"checkpointing on / off, bytes per added transition, {res}²: {100 * ratio:.0f} %")
    if result.get("prediction"):
        p = result["prediction"]
        print(f"\nCPU-measured prediction (not a GPU measurement): GPU peak of the default run at "
              f"{p[0]['resolution']}², --train-batch-size {p[0]['train_batch_size']} (GiB)")
        print("| reward | checkpointing | weights | trajectories | batch-independent | per transition | "
              "predicted peak | ≤ 24 GiB | at --train-batch-size 1 / 2 / 4 / 8 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in p:
            print(f"| {row['reward']} | {'on' if row['gradient_checkpointing'] else 'off'} | "
                  f"{row['weights_bytes'] / GIB:.1f} | {row['trajectories_bytes'] / GIB:.2f} | "
                  f"{row['fixed_bytes'] / GIB:.2f} | "
                  f"{row['per_transition_bytes'] / GIB:.2f} | {row['peak_bytes'] / GIB:.1f} | "
                  f"{'yes' if row['peak_bytes'] <= 24 * GIB else 'no'} | "
                  + " / ".join(f"{v / GIB:.1f}" for v in row["peak_bytes_by_train_batch_size"].values()) + " |")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"widths / {QUICK_REDUCE}, 64² (the test)")
    parser.add_argument("--resolutions", default="128", help="image sizes measured (comma-separated)")
    parser.add_argument("--batches", default="1,2", help="transitions per step measured (comma-separated)")
    parser.add_argument("--device", default="cpu", help="cpu (resident set) or cuda (allocated bytes)")
    parser.add_argument("--cache-dir", default=sd.Config.__dataclass_fields__["cache_dir"].default_factory())
    parser.add_argument("--json", default="", help="also write the result to this file")
    parser.add_argument("--from-json", default="", help="recompute the tables (and the prediction) from a "
                        "JSON this script wrote, without measuring")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # one configuration, JSON to stdout
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure_one(device=args.device, cache_dir=args.cache_dir, **json.loads(args.child))))
        return {}
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
        result["prediction"] = predict(result["rows"]) if result["reduce"] == 1 else None
        print_tables(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return result
    reduce, resolutions = (QUICK_REDUCE, [64]) if args.quick else (1, [int(r) for r in args.resolutions.split(",")])
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for resolution in resolutions:
        for batch in batches:
            for checkpointing in (False, True):
                config = dict(gradient_checkpointing=checkpointing, batch=batch, resolution=resolution, reduce=reduce)
                rows.append(run_child(config, args))
                print(f"{resolution}², batch {batch}, checkpointing {'on' if checkpointing else 'off'}: "
                      f"{rows[-1]['peak_bytes'] / GIB:.3f} GiB ({rows[-1]['step_seconds']} s)", flush=True)
    result = dict(device=args.device, reduce=reduce, torch=torch.__version__,
                  measure="VmHWM − VmRSS after setup" if args.device == "cpu" else "max_memory_allocated",
                  rows=rows, marginal_bytes_per_transition={}, ratios={})
    for res in resolutions if len(batches) >= 2 else []:
        per = {gc: marginal(rows, res, gc)[0] for gc in (False, True)}
        result["marginal_bytes_per_transition"][res] = {"off": per[False], "on": per[True]}
        result["ratios"][res] = per[True] / per[False]
    if reduce == 1:
        result["prediction"] = predict(rows)
    print_tables(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
