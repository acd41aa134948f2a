"""Every method on the 8×8-digits rung, 3 seeds × both rewards, on one budget: a markdown table and a figure.

    python experiments/compare_digits.py --sweep              # 1. each method's learning rate: 3 values, seed 0, class:3
    python experiments/compare_digits.py --docs               # 2. every method × seeds 0, 1, 2 × {class:3 (β 1), ink (β 0.5)}:
                                                              #    docs/results/compare_digits.md, docs/figures/compare_digits.png
    python experiments/compare_digits.py --table-only --docs  # rebuild the table and figure from the results on disk
    python experiments/compare_digits.py --sweep --methods grpo,kl-pg   # only some methods' rows (sweep or runs)

Rows: ∇-GFlowNet (guess + g_φ) with each flow target — adjoint (toy_digits' default), mixed (λ 0.5),
bootstrap (the paper's way of training g_φ; everything else as the default) — and adjoint matching,
RTB (learned log Z), DDPO (PPO-clip), ReFL, DRaFT-1, GRPO (Flow-GRPO's group-std advantages and
0.04 × per-step KL) and KL-PG (KL-regularised policy gradient, α = 1/β), all `toy_digits.py` methods on the same LoRA
(rank 8), 32 trajectories per update, 25 DDIM steps and `--updates` updates (default 200, as
toy_digits' default: what fits the 60-minute bar on 2 shared cores). The first row is exactly
`python toy_digits.py --seed S` (and `--preset ink --seed S`), so its class:3 line is the default's
3-seed measurement.

Learning rates. `--sweep` runs each row at {d/3, d, 3d} (d = toy_digits' default for that method's
rate; for ∇-GFlowNet the policy rate, g_φ's stays 5e-4) on seed 0, class:3, and keeps the rate with
the lowest final Fréchet distance to the reference (the target-matching criterion every method is
judged by; diverged runs excluded). It writes sweep.json, which the comparison reads; without it the
defaults are used (and the table says so).

Columns (means ± std over seeds): fraction classified as K (class reward), mean reward, diversity ÷
the reference's (mean pairwise L2), distinct nearest training digits, Fréchet distance to the
reference in the classifier's features, updates and train seconds until the curve (every
--curve-every updates, 256 samples) first reaches the bar (class: frac ≥ reference − 0.1; ink: mean
reward half of the way from p♯ to the reference), network VJPs, reward calls and reward gradients per
update (counted by `experiments/digits_diagnostics.py`'s `CostMeter`), training seconds per update, and
how many seeds diverged (`toy_digits.diverged`).

Runs are resumable: each (row, reward, seed) result is a JSON file under --out, and a finished one is
skipped, so an interrupted run can be continued and the table rebuilt from whatever finished. The
learning rates of the committed table are docs/results/compare_digits_sweep.json (the sweep's
sweep.json; copy it into --out to skip the sweep).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import toy_digits as td  # noqa: E402
from experiments import digits_diagnostics, runner  # noqa: E402
from experiments.runner import mean_std  # noqa: E402  (sample std over seeds, as every table here)

# (row, toy_digits method, Config overrides); the first row is toy_digits' default
ROWS: List[Tuple[str, str, Dict]] = [
    ("∇-GFlowNet, adjoint (default)", "nabla-db", {}),
    ("∇-GFlowNet, mixed λ 0.5", "nabla-db", {"flow_target": "mixed", "adjoint_lambda": 0.5}),
    ("∇-GFlowNet, bootstrap (paper's g_φ)", "nabla-db", {"flow_target": "bootstrap"}),
    ("adjoint matching", "adjoint-matching", {}),
    ("RTB", "rtb", {}),
    ("DDPO", "ddpo", {}),
    ("ReFL", "refl", {}),
    ("DRaFT-1", "draft", {"draft_k": 1}),
    ("GRPO", "grpo", {}),
    ("KL-PG", "kl-pg", {}),
]
REWARDS: List[Tuple[str, float]] = [("class:3", 1.0), ("ink", 0.5)]
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)


def row_config(row: str, reward: str, beta: float, seed: int, args, lr: Optional[float]) -> td.Config:
    _, method, overrides = next(r for r in ROWS if r[0] == row)
    cfg = td.Config(reward=reward, beta=beta, seed=seed, method=method, updates=args.updates,
                    curve_every=args.curve_every, cache=args.cache, threads=1, **overrides)
    if lr is not None:
        cfg = dataclasses.replace(cfg, **{td.LR_FIELDS[method]: lr})
    td.validate(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------
# One job: one row × reward × seed (× learning rate), in a worker process
# ----------------------------------------------------------------------------------------------

_SETUPS: Dict[Tuple, "td.Setup"] = {}


def setup_for(cfg: td.Config) -> "td.Setup":
    """prepare(cfg) once per worker for each (reward, β, seed): the reference is shared by the rows."""
    key = (cfg.reward, cfg.beta, cfg.seed)
    if key not in _SETUPS:
        _SETUPS[key] = td.prepare(cfg)
    return _SETUPS[key]


def run_job(job: Dict) -> str:
    cfg = td.Config(**job["config"])
    setup = setup_for(cfg)
    start = time.time()
    result, _, history = digits_diagnostics.run_method(dataclasses.replace(setup, cfg=cfg), cfg.method, progress=False)
    record = {"row": job["row"], "config": job["config"], "result": result, "history": history,
              "reference": setup.metrics["reference"], "pretrained": setup.metrics["pretrained"],
              "wall_seconds": time.time() - start}
    path = Path(job["path"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return f"{job['row']} {cfg.reward} seed {cfg.seed} lr {td.method_lr(cfg, cfg.method):.1e}: " \
           f"{result.get('frac_class', result['mean_reward']):.3f}, Fréchet {result['frechet_to_reference']:.1f} " \
           f"({record['wall_seconds']:.0f} s)"


def run_jobs(jobs: List[Dict], workers: int) -> None:
    todo = [j for j in jobs if not Path(j["path"]).exists()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already on disk; running {len(todo)} on {workers} workers", flush=True)
    # class:3 before ink, seed by seed, so that a partial run has every method; within a seed the ∇-DB
    # rows (the slowest) first, so the workers finish together
    rewards = [r for r, _ in REWARDS]
    runner.run_pool(run_job, dict(enumerate(todo)), workers, report=lambda _, line: print(line, flush=True),
                    order=lambda i: (rewards.index(todo[i]["config"]["reward"]), todo[i]["config"]["seed"],
                                     todo[i]["config"]["method"] not in ("nabla-db", "adjoint-matching")))


def selected_rows(args) -> List[Tuple[str, str, Dict]]:
    """The ROWS whose toy_digits method is in --methods."""
    return [r for r in ROWS if r[1] in args.methods]


def sweep_jobs(args) -> List[Dict]:
    jobs = []
    for row, method, overrides in selected_rows(args):
        default = td.method_lr(td.Config(**overrides), method)
        for factor in SWEEP_FACTORS:
            cfg = row_config(row, *REWARDS[0], 0, args, default * factor)
            path = Path(args.out) / "sweep" / runner.slug(row) / f"lr{default * factor:.2e}.json"
            jobs.append({"row": row, "config": dataclasses.asdict(cfg), "path": str(path)})
    return jobs


def chosen_rates(args) -> Dict[str, float]:
    """The sweep's winner per row: lowest final Fréchet to the reference among non-diverged runs."""
    chosen = {}
    for row, _, _ in ROWS:
        records = [json.loads(p.read_text()) for p in (Path(args.out) / "sweep" / runner.slug(row)).glob("lr*.json")]
        records = [r for r in records if not r["result"]["diverged"]]
        if records:
            best = min(records, key=lambda r: r["result"]["frechet_to_reference"])
            chosen[row] = td.method_lr(td.Config(**best["config"]), best["config"]["method"])
    return chosen


def comparison_jobs(args, rates: Dict[str, float]) -> List[Dict]:
    jobs = []
    for reward, beta in REWARDS:
        for row, _, _ in selected_rows(args):
            for seed in args.seeds:
                # the first row is toy_digits' default as it stands (the sweep found 1e-3, 3e-3 and 9e-3 alike)
                cfg = row_config(row, reward, beta, seed, args, None if row == ROWS[0][0] else rates.get(row))
                path = Path(args.out) / "runs" / runner.slug(reward) / runner.slug(row) / f"seed{seed}.json"
                jobs.append({"row": row, "config": dataclasses.asdict(cfg), "path": str(path)})
    return jobs


# ----------------------------------------------------------------------------------------------
# Table and figure
# ----------------------------------------------------------------------------------------------




def to_bar(records: List[Dict], key: str, fmt: str) -> str:
    hits = [r["result"][key] for r in records if r["result"][key] is not None]
    if not hits:
        return "never"
    text = mean_std(hits, fmt)
    return text if len(hits) == len(records) else f"{text} ({len(hits)}/{len(records)} seeds)"


def count_cell(results: List[Dict], key: str) -> str:
    """The mean over seeds of a per-update count the runs recorded; "—" for runs from before it was counted."""
    values = [m.get(key) for m in results]
    return "—" if None in values else f"{np.mean(values):.0f}"


def load_records(args, reward: str) -> Dict[str, List[Dict]]:
    records = {}
    for row, _, _ in ROWS:
        paths = sorted((Path(args.out) / "runs" / runner.slug(reward) / runner.slug(row)).glob("seed*.json"))
        if paths:
            records[row] = [json.loads(p.read_text()) for p in paths]
    return records


def reward_table(reward: str, records: Dict[str, List[Dict]]) -> List[str]:
    any_records = next(iter(records.values()))
    has_frac = "frac_class" in any_records[0]["reference"]
    head = ["method", "lr", "seeds"] + (["frac K"] if has_frac else []) + [
        "mean r", "diversity ÷ ref", "distinct nearest", "Fréchet", "updates to bar", "train s to bar",
        "VJPs / update", "r calls / update", "∇r / update", "s / update", "diverged"]
    rows = []
    by_seed = {r["config"]["seed"]: r for rs in records.values() for r in rs}  # one reference per seed
    for name in ("reference", "pretrained"):
        pick = [r[name] for r in by_seed.values()]
        ratio = [r[name]["diversity_l2"] / r["reference"]["diversity_l2"] for r in by_seed.values()]
        cells = [name, "", str(len(by_seed))]
        cells += [mean_std([m["frac_class"] for m in pick], ".2f")] if has_frac else []
        cells += [mean_std([m["mean_reward"] for m in pick], ".2f"), mean_std(ratio, ".2f"),
                  mean_std([m["distinct_nearest_digits"] for m in pick], ".0f"),
                  mean_std([m["frechet_to_reference"] for m in pick], ".1f")] + [""] * 7
        rows.append(cells)
    for row, rs in records.items():
        res = [r["result"] for r in rs]
        lr = td.method_lr(td.Config(**rs[0]["config"]), rs[0]["config"]["method"])
        cells = [row, f"{lr:.0e}", str(len(rs))]
        cells += [mean_std([m["frac_class"] for m in res], ".2f")] if has_frac else []
        cells += [mean_std([m["mean_reward"] for m in res], ".2f"), mean_std([m["diversity_ratio"] for m in res], ".2f"),
                  mean_std([m["distinct_nearest_digits"] for m in res], ".0f"),
                  mean_std([m["frechet_to_reference"] for m in res], ".1f"),
                  to_bar(rs, "updates_to_bar", ".0f"), to_bar(rs, "seconds_to_bar", ".0f"),
                  f"{np.mean([m['network_vjps_per_update'] for m in res]):.0f}", count_cell(res, "reward_calls_per_update"),
                  f"{np.mean([m['reward_grads_per_update'] for m in res]):.0f}", mean_std([m.get("seconds_per_update") for m in res], ".2f"),
                  f"{sum(bool(m['diverged']) for m in res)}/{len(res)}"]
        rows.append(cells)
    return [f"**{reward}**", "", runner.markdown_table(head, rows)]


def write_table(args, rates: Dict[str, float], seconds: Optional[float], command: str) -> None:
    lines = [f"Digits comparison: {args.updates} updates × 32 trajectories, 25 steps, LoRA rank 8; "
             f"means ± std over seeds. Learning rates: "
             + ("from the sweep (sweep.json)" if rates else "toy_digits' defaults (no sweep.json)") + ".", ""]
    for reward, _ in REWARDS:
        records = load_records(args, reward)
        if records:
            lines += reward_table(reward, records)
    timing = ""
    if seconds is not None:
        timing = f"wall {seconds / 60:.1f} min on {args.workers} workers"
        lines.append(f"Wall time of this invocation: {seconds / 60:.1f} min on {args.workers} workers; load at the end: "
                     f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 min).")
    table = "\n".join(lines) + "\n"
    runner.write_outputs("compare_digits", __doc__.split("\n")[0], Path(args.out), table, lambda path: write_figure(args, path),
                         command, args.docs, timing=timing)
    print(table)


def sweep_table(args, rates: Dict[str, float]) -> str:
    """Each row's swept rates (frac / Fréchet / diversity ÷ ref, seed 0, class:3) and the rate kept."""
    rows = []
    for row, _, _ in ROWS:
        records = [json.loads(p.read_text()) for p in sorted((Path(args.out) / "sweep" / runner.slug(row)).glob("lr*.json"))]
        if not records:
            continue
        cells = [f"{td.method_lr(td.Config(**r['config']), r['config']['method']):.0e}: {r['result']['frac_class']:.2f} / "
                 f"{r['result']['frechet_to_reference']:.1f} / {r['result']['diversity_ratio']:.2f}" for r in records]
        rows.append([row, "; ".join(cells), f"{rates[row]:.0e}" if row in rates else "—"])
    return runner.markdown_table(["method", "lr: frac / Fréchet / diversity ÷ ref", "chosen"], rows)


def write_figure(args, path: Path) -> None:
    plt = runner.pyplot()
    fig, axes = plt.subplots(len(REWARDS), 2, figsize=(12, 4.2 * len(REWARDS)), squeeze=False)
    for (reward, _), (ax_curve, ax_scatter) in zip(REWARDS, axes):
        records = load_records(args, reward)
        if not records:  # not run (yet): say so instead of an empty frame
            for ax in (ax_curve, ax_scatter):
                ax.axis("off")
            ax_curve.text(0, 0.5, f"{reward}: no finished runs", fontsize=12)
            continue
        key = "frac_class" if "frac_class" in next(iter(records.values()))[0]["reference"] else "mean_reward"
        for i, (row, rs) in enumerate(records.items()):
            updates = [h["update"] for h in rs[0]["history"]]
            curve = np.mean([[h[key] for h in r["history"]] for r in rs if len(r["history"]) == len(updates)], 0)
            ax_curve.plot(updates, curve, color=f"C{i}", label=row)
            x = [r["result"][key] for r in rs]
            y = [r["result"]["frechet_to_reference"] for r in rs]
            ax_scatter.scatter(x, y, color=f"C{i}", label=row, s=25)
        ref = next(iter(records.values()))[0]["reference"][key]
        for ax in (ax_curve,):
            ax.axhline(ref, color="k", ls="--", lw=1, label="reference")
        ax_scatter.axvline(ref, color="k", ls="--", lw=1)
        ax_curve.set(xlabel="update", ylabel=key, title=f"{reward}: {key} (mean over seeds)")
        ax_scatter.set(xlabel=key, ylabel="Fréchet to reference", yscale="log", title=f"{reward}: final, each seed")
        ax_curve.legend(fontsize=7)
    runner.save_figure(fig, path, dpi=100)


def cache_models(args) -> None:
    """Pretrain (or load) the denoiser and classifier once here, so that the workers only load them."""
    cfg = td.Config(cache=args.cache)
    images, labels = td.load_digits_tensor()
    td.load_or_pretrain_denoiser(cfg, images, td.make_scheduler())
    td.load_or_train_classifier(cfg, images, labels)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true", help="run the learning-rate sweep (seed 0, class:3) instead")
    parser.add_argument("--table-only", action="store_true", help="only rebuild table.md and compare_digits.png")
    parser.add_argument("--docs", action="store_true", help="also write docs/results/compare_digits.md (--sweep: "
                        "compare_digits_sweep.{md,json}) and docs/figures/compare_digits.png")
    parser.add_argument("--out", default="runs/compare-digits", help="output folder (results, sweep.json, table.md, compare_digits.png)")
    parser.add_argument("--cache", default="", help="toy_digits --cache ('' = $NABLA_GFN_CACHE or ~/.cache/nabla-gfn)")
    parser.add_argument("--updates", type=int, default=td.Config.updates, help="finetuning updates per run")
    parser.add_argument("--curve-every", type=int, default=td.Config.curve_every, help="updates between curve points (the 'to bar' resolution)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2], help="comma-separated seeds")
    parser.add_argument("--workers", type=int, default=2, help="worker processes, one torch thread each")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=sorted({m for _, m, _ in ROWS}),
                        help="comma-separated toy_digits methods: run (and sweep) only their rows; the table shows every row on disk")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - {m for _, m, _ in ROWS})
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {sorted({m for _, m, _ in ROWS})}")
    if args.updates < 1 or args.curve_every < 1 or args.workers < 1:
        parser.error("--updates, --curve-every and --workers must be ≥ 1")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.time()
    if not args.table_only:
        cache_models(args)
    if args.sweep:
        run_jobs(sweep_jobs(args), args.workers)
        previous = Path(args.out) / "sweep.json"  # the rows not swept now keep their rates
        rates = {**(json.loads(previous.read_text()) if previous.exists() else {}), **chosen_rates(args)}
        previous.write_text(json.dumps(rates, indent=1))
        table = sweep_table(args, rates)
        print(table, f"\nsweep: {(time.time() - start) / 60:.1f} min")
        if args.docs:
            (runner.DOCS / "results" / "compare_digits_sweep.json").write_text(json.dumps(rates, indent=1))
            runner.write_docs_page("compare_digits_sweep", "compare_digits", "Digits: each method's learning rate (seed 0, class:3)", table,
                                   runner.command_line("compare_digits", argv), f"{(time.time() - start) / 60:.1f} min")
        return
    sweep = Path(args.out) / "sweep.json"
    rates = json.loads(sweep.read_text()) if sweep.exists() else {}
    if not args.table_only:
        run_jobs(comparison_jobs(args, rates), args.workers)
    write_table(args, rates, None if args.table_only else time.time() - start, runner.command_line("compare_digits", argv))


if __name__ == "__main__":
    main()
