"""One GPU check of sd_finetune.py at SD-1.5 size: speed, memory and numerics, written to one JSON.

Random SD-1.5-sized weights (benchmarks/bench_sd_transition.py's builder: no downloads, the GPU
machine needs no network), 512² images. For the official all-bf16 arithmetic (--precision bf16
--residual-precision same) and the default (bf16 weights for sampling, float32 IEEE residual), for
each flow target (and adjoint matching) and batch 1, 2, 4 transitions: seconds per update (one
loss + backward on the batch: the cost that --transitions-per-update multiplies), the lean-adjoint
sweep of as many trajectories (guided and unguided Jacobian), a sampling step, and the peak GPU
memory; the peak memory of one training step at 512², gradient checkpointing off and on, batch 1
and 2 (benchmarks/sd_memory.py on CUDA: max_memory_allocated, each in a fresh process); then the
numerics table of bench_sd_numerics.py (float64 reference, real TF32).

Run (≤ 8 minutes on one H200; the --budget-seconds guard skips what would not fit, recorded as skipped):
    python benchmarks/gpu_check.py --out gpu_check.json
    python benchmarks/gpu_check.py --reduced --out /tmp/gpu_check.json      # CPU, tiny pipeline (the tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_sd_numerics  # noqa: E402
import bench_sd_transition as bench  # noqa: E402
import sd_memory  # noqa: E402
import nabla_gfn  # noqa: E402
import sd_finetune as sd  # noqa: E402

PRECISIONS = {"bf16 (official: all bf16)": ["--precision", "bf16", "--residual-precision", "same"],
              "default (bf16 sampling, fp32 residual)": ["--precision", "bf16", "--residual-precision", "fp32"]}


def median_seconds(fn, device, repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(bench.seconds(fn, device) for _ in range(repeats))


def peak_mib(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    fn()
    return bench.peak_memory_mib(device)


def check_precision(name: str, flags, args, device, started: float) -> dict:
    """Every target × batch for one precision; entries past the time budget are marked skipped."""
    size_flags = ["--preset", "smoke", "--cache-dir", args.cache_dir] if args.reduced else ["--cache-dir", args.cache_dir]
    cfg = sd.parse_config([*size_flags, *flags])
    torch.manual_seed(0)
    dtype = sd.weight_dtype(cfg.precision, device)
    models = sd.load_models(cfg, device, dtype) if args.reduced else bench.sd15_random_models(cfg, device, dtype)
    sd.set_float32_matmul(cfg.residual_precision)
    schedule = nabla_gfn.ddim_schedule(models.pipe.scheduler, cfg.steps)
    rows = []
    for batch in args.batches:
        if time.time() - started > args.budget_seconds:
            rows.append({"batch": batch, "skipped": "time budget"})
            continue
        transitions, trajectory = bench.transition_batch(models, schedule, cfg.steps // 2, batch, cfg.resolution,
                                                         torch.Generator().manual_seed(batch))
        b = bench.Bench(models, cfg, transitions, ["cat"] * batch, schedule, trajectory)
        row = {"batch": batch, "sampling_step_seconds": median_seconds(b.sampling_eps, device, args.repeats),
               "loss_eps_seconds": median_seconds(b.eps, device, args.repeats), "targets": {}, "sweep": {}}
        for target in bench.TARGETS:
            if time.time() - started > args.budget_seconds:
                row["targets"][target] = {"skipped": "time budget"}
                continue
            row["targets"][target] = {"update_seconds": median_seconds(lambda: b.loss(target), device, args.repeats),
                                      "peak_memory_mib": peak_mib(lambda: b.loss(target), device)}
        for jacobian in ("guided", "unguided"):
            if time.time() - started > args.budget_seconds:
                row["sweep"][jacobian] = {"skipped": "time budget"}
                continue
            row["sweep"][jacobian] = {"seconds": median_seconds(lambda: b.sweep(jacobian), device, 1),
                                      "peak_memory_mib": peak_mib(lambda: b.sweep(jacobian), device)}
        rows.append(row)
        print(f"{name}, batch {batch}: " + ", ".join(
            f"{t} {v.get('update_seconds', float('nan')):.3f} s" for t, v in row["targets"].items()), flush=True)
    del models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"flags": flags, "steps": cfg.steps, "resolution": cfg.resolution, "rows": rows}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON written")
    parser.add_argument("--reduced", action="store_true", help="tiny pipeline on the CPU, batches 1 and 2 (tests)")
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="skip measurements started after this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache-dir", default=sd.Config.__dataclass_fields__["cache_dir"].default_factory())
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.reduced else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or pass --reduced for the CPU check")
    args.batches = [1, 2] if args.reduced else [1, 2, 4]
    started = time.time()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "reduced": args.reduced, "precisions": {}}
    for name, flags in PRECISIONS.items():
        result["precisions"][name] = check_precision(name, flags, args, device, started)
    memory = ["--quick", "--batches", "1"] if args.reduced else ["--resolutions", "512", "--batches", "1,2"]
    if time.time() - started < args.budget_seconds:  # peak of one training step, checkpointing off and on
        result["memory"] = sd_memory.main([*memory, "--device", device.type, "--cache-dir", args.cache_dir])
    else:
        result["memory"] = {"skipped": "time budget"}
    numerics = (["--quick"] if args.reduced else
                ["--size", "sd15", "--batch", "2", "--reference", "fp64", "--init-timesteps", "4"])
    result["numerics"] = bench_sd_numerics.main([*numerics, "--device", device.type, "--cache-dir", args.cache_dir])
    result["seconds"] = time.time() - started
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
