"""The exact toy in D dimensions: ∇-GFlowNet, adjoint matching, RTB and DDPO for D ∈ {2, 8, 32, 128}.

    python benchmarks/toy_dim_sweep.py --readme   # 4 D × 4 methods × 3 seeds (≤ 30 min on 2 cores): runs/toy_dim_sweep/
                                                  # table.{md,json}, assets/toy_dim.png, the table in README.md
    python benchmarks/toy_dim_sweep.py            # the same without touching README.md / assets (figure in --out)
    python benchmarks/toy_dim_sweep.py --quick    # tiny budget, D ∈ {2, 3}, 1 seed (seconds; the test)
    python benchmarks/toy_dim_sweep.py --dims 2,32 --methods rtb --seeds 1
    python benchmarks/toy_dim_sweep.py --reward bump-all --out runs/toy_dim_sweep_bump_all   # a reward on all D

Every run is `toy_2d.run` with `--dim D` (ring8 in the first two coordinates, a fixed norm-2 offset
per mode in the others, std 0.3; reward "bump" on the first two coordinates, β = 1: the target's
mode weights are the same at every D, so the task stays the same and only its dimension grows)
and toy_2d's current defaults otherwise — ∇-GFlowNet is toy_2d's default `nabla-db` with whatever
flow target, weighting and rates toy_2d defaults to when this runs. Each (D, seed) has its own
pretrained ε-network (widths max(128, 2·D), `toy_2d.network_width`).

Budget, chosen to fit 30 min on 2 idle cores: BUDGET below (300 updates × 128 trajectories, TV
evaluated every 10 updates on 1000 samples, final metrics on 2000). Learning rates: toy_2d's --lr
for every method and D, times LR_SCALE[(method, D)] where the default rate diverged or flung the
samples off the data (found with --lr-factor on seed 0; every rate is in the table; divergence that
remains is reported, never dropped). Per method
and D: final mode TV (mean ± std over seeds), updates and train seconds to TV ≤ 0.1 (median over the
seeds that reached it), train seconds per update, network VJPs and reward gradients per update.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import compare_toy  # noqa: E402
import toy_2d  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

METHODS = {"nabla-db": "∇-GFlowNet (toy_2d default)", "adjoint-matching": "Adjoint Matching", "rtb": "RTB", "ddpo": "DDPO"}
BUDGET = dict(updates=300, batch_size=128, eval_every=10, eval_samples=2000)
QUICK = dict(updates=4, batch_size=16, num_steps=10, eval_every=2, eval_samples=200, pretrain_iters=100, pretrain_batch=128)
# (method, D) → factor on toy_2d's --lr where that rate diverged (found with this script's --lr-factor, seed 0).
# At lr 2e-3 (seed 0, 200 updates × 64 trajectories): RTB diverged at D = 32 (0.3× collapsed, 0.1× still improving) and
# D = 128 (0.1× still flung off the data); DDPO flung off at D = 32 and 128 (0.1× at D = 128 too);
# ∇-GFlowNet diverged and adjoint matching flung off at D = 128 (Adam's first steps move every weight of
# the D-wide output layer by ~lr, also those whose gradient is noise). D = 2 and 8: all at 2e-3.
LR_SCALE: Dict[Tuple[str, int], float] = {
    ("rtb", 32): 0.1, ("ddpo", 32): 0.3,
    ("nabla-db", 128): 0.1, ("adjoint-matching", 128): 0.1, ("rtb", 128): 0.03, ("ddpo", 128): 0.03,
}
README_TABLE = ("<!-- TOY-DIM-TABLE:BEGIN -->", "<!-- TOY-DIM-TABLE:END -->")
README_FIGURE = "assets/toy_dim.png"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dims", default="2,8,32,128", help="comma-separated dimensions D ≥ 2")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--reward", default="bump", choices=sorted(toy_2d.REWARD_PRESETS),
                        help="toy_2d reward preset: bump/linear read the first two coordinates, bump-all all D")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … seeds−1 (each with its own pretrained model)")
    parser.add_argument("--updates", type=int, default=BUDGET["updates"], help="updates per run (the fixed budget)")
    parser.add_argument("--threshold", type=float, default=0.1, help="TV level for 'updates to TV ≤ threshold'")
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs (one CPU thread each)")
    parser.add_argument("--out", default="runs/toy_dim_sweep", help="output folder")
    parser.add_argument("--cache-dir", default="", help="pretrained-model cache (as toy_2d.py)")
    parser.add_argument("--readme", action="store_true", help=f"write the figure to {README_FIGURE} and the table into README.md")
    parser.add_argument("--quick", action="store_true", help="tiny budget for tests: D ∈ {2, 3}, 1 seed, 4 updates")
    parser.add_argument("--lr-factor", type=float, default=1.0, help="multiplies every run's policy lr (for probing rates)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --out whose config matches exactly")
    args = parser.parse_args(argv)
    try:
        args.dim_list = [int(d) for d in args.dims.split(",")]
    except ValueError:
        raise SystemExit(f"error: --dims must be comma-separated integers ≥ 2, got {args.dims!r}")
    args.method_list = [m.strip() for m in args.methods.split(",")]
    if args.quick:
        args.dim_list, args.seeds, args.updates = [2, 3], 1, QUICK["updates"]
    if any(d < 2 for d in args.dim_list):
        raise SystemExit(f"error: --dims must be comma-separated integers ≥ 2, got {args.dims!r}")
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or args.seeds < 1 or args.updates < 1:
        raise SystemExit(f"error: --methods must be from {list(METHODS)} (got {unknown or args.methods}); --seeds, --updates ≥ 1")
    return args


def run_configs(args) -> Dict[Tuple[str, int, int], toy_2d.ToyConfig]:
    """(method, D, seed) → the toy_2d config of that run."""
    budget = {**BUDGET, **(QUICK if args.quick else {}), "updates": args.updates}
    base = toy_2d.ToyConfig(prior="ring8", reward=args.reward, beta=1.0, cache_dir=args.cache_dir, no_figure=True, **budget)
    jobs = {}
    for dim in args.dim_list:
        for method in args.method_list:
            lr = LR_SCALE.get((method, dim), 1.0) * args.lr_factor * base.lr
            for seed in range(args.seeds):
                out = Path(args.out) / "runs" / f"d{dim}" / method / f"seed{seed}"
                jobs[(method, dim, seed)] = dataclasses.replace(base, dim=dim, method=method, lr=lr, seed=seed, out=str(out))
    return jobs


# ----------------------------------------------------------------------------------------------
# Runs (in worker processes)
# ----------------------------------------------------------------------------------------------


def _worker_init():
    torch.set_num_threads(1)


def pretrain(cfg: toy_2d.ToyConfig) -> float:
    """Pretrain (or load) the ε-network of (cfg.dim, cfg.seed) so that the runs only read the cache. Returns seconds."""
    start = time.perf_counter()
    toy_2d.pretrain(cfg, toy_2d.build_task(cfg).prior, toy_2d.sd_scheduler(), quiet=True)
    return time.perf_counter() - start


def held_crossing(cfg: toy_2d.ToyConfig, run: dict, threshold: float) -> Tuple[Optional[int], Optional[float]]:
    """(update, train seconds) of the first evaluation from which TV stays ≤ threshold to the end; (None, None) if never.

    A policy that swings through the target on its way elsewhere (over-tilting, collapsing) crosses
    the threshold once and leaves: its first crossing is not a cost of reaching the target.
    """
    curve = run["curve"]  # compare_toy.read_run's (update, TV), cut where a diverged run left the data
    if run["diverged_at"] is not None or not curve or curve[-1][1] > threshold:
        return None, None
    start = len(curve)
    while start > 0 and curve[start - 1][1] <= threshold:
        start -= 1
    update = curve[start][0]
    history = json.loads((Path(cfg.out) / "metrics.json").read_text())["history"]
    return update, next(h["train_time_s"] for h in history if h["update"] == update)


def run_all(args, jobs) -> Dict[Tuple[str, int, int], dict]:
    """Pretrain every (D, seed), then every run, largest D first; each summarised by compare_toy.read_run."""
    results = {}
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        firsts = {(dim, seed): cfg for (method, dim, seed), cfg in jobs.items()}
        list(pool.map(pretrain, firsts.values()))
        order = sorted(jobs, key=lambda key: (-key[1], key[0] not in ("ddpo", "rtb")))
        futures = {key: pool.submit(compare_toy.run_one, jobs[key], args.threshold, args.reuse) for key in order}
        for key, future in futures.items():
            results[key] = r = future.result()
            r["updates_held"], r["train_s_held"] = held_crossing(jobs[key], r, args.threshold)
            status = f"final TV {r['final_tv']:.3f}" if r["diverged_at"] is None else f"diverged at update {r['diverged_at']}"
            print(f"D={key[1]} {key[0]} seed {key[2]}: {status}, train {r['train_s']:.0f} s", flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# Table and figure
# ----------------------------------------------------------------------------------------------


def summarise(args, jobs, results) -> List[dict]:
    """One row per (D, method): lists over seeds plus the per-update costs of seed 0."""
    rows = []
    for dim in args.dim_list:
        for method in args.method_list:
            seeds = [results[(method, dim, s)] for s in range(args.seeds)]
            first = seeds[0]
            rows.append({
                "dim": dim, "method": method, "label": METHODS[method], "lr": jobs[(method, dim, 0)].lr,
                "final_tv": [r["final_tv"] for r in seeds],
                "min_tv": [r["min_tv"] for r in seeds],
                "updates_to_threshold": [r["updates_to_threshold"] for r in seeds],
                "train_s_to_threshold": [r["train_s_to_threshold"] for r in seeds],
                "updates_held": [r["updates_held"] for r in seeds],
                "train_s_held": [r["train_s_held"] for r in seeds],
                "mean_log_reward": [r["final_log_reward"] for r in seeds],
                "exact_mean_log_reward": first["exact_mean_log_reward"],
                "diverged_at": [r["diverged_at"] for r in seeds],
                "train_s_per_update": [r["train_s"] / r["updates"] for r in seeds],
                "network_vjps_per_update": first["network_vjps_total"] / first["updates"],
                "reward_grads_per_update": first["reward_grads_total"] / first["updates"],
                "pretrained_tv": [r["pretrained"]["mode_tv"] for r in seeds],
                "oracle_tv": [r["oracle"]["mode_tv"] for r in seeds],
            })
    return rows


def markdown_table(rows: List[dict], args, cfg: toy_2d.ToyConfig) -> str:
    """The README table: one row per (D, method), then the pretrained and oracle TV of that D; `cfg`: any run's config."""
    default_lr = toy_2d.ToyConfig.lr
    thr = f"{args.threshold:g}"
    head = (f"| D | method | final mode TV ↓ | mean log r | updates to TV ≤ {thr}, held | train s, held | first TV ≤ {thr} at | "
            "best TV seen | train s / update | network VJPs / update | ∇r / update | policy lr | diverged |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines, ms, reached = [], compare_toy.mean_std, compare_toy._median_reached
    for i, row in enumerate(rows):
        lines.append(
            f"| {row['dim']} | {row['label']} | {ms(row['final_tv'], '.3f')} | {ms(row['mean_log_reward'], '.2f')} | "
            f"{reached(row['updates_held'], '.0f')} | {reached(row['train_s_held'], '.1f')} | "
            f"{reached(row['updates_to_threshold'], '.0f')} | {ms(row['min_tv'], '.3f')} | {ms(row['train_s_per_update'], '.3f')} | {row['network_vjps_per_update']:.0f} | {row['reward_grads_per_update']:.0f} | "
            f"{row['lr']:g} | {compare_toy._diverged(row['diverged_at'])} |")
        if i == len(rows) - 1 or rows[i + 1]["dim"] != row["dim"]:
            lines.append(f"| {row['dim']} | *pretrained P_F♯ / oracle (exact flow) / exact* | {ms(row['pretrained_tv'], '.3f')} / "
                         f"{ms(row['oracle_tv'], '.3f')} / 0 | {row['exact_mean_log_reward']:.2f} (exact) | | | | | | | | | |")
    changed = [f"{r['label']} at D = {r['dim']}: {r['lr']:g}" for r in rows if r["lr"] != default_lr]
    note = (f"\n{args.seeds} seed(s) × {args.updates} updates × {cfg.batch_size} trajectories × {cfg.num_steps} steps; "
            f"mean ± std over seeds. 'Held': the first evaluation (every {cfg.eval_every} updates, 1000 samples) from which TV "
            f"stayed ≤ {thr} to the end of the budget; 'first TV ≤ {thr} at': the first evaluation below it, even if it left "
            "again (a swing through the target on the way elsewhere); both medians over the seeds that got there, "
            f"(reached/seeds) when not all did. Policy lr {default_lr:g} "
            f"(toy_2d's) unless listed: {'; '.join(changed) if changed else 'none changed'}. Diverged: seeds whose sampler "
            "ended non-finite or flung off the data (compare_toy's rule); their final TV is left out of the mean.\n")
    return head + "\n".join(lines) + "\n" + note


def compact_table(rows: List[dict], args) -> str:
    """Final mode TV (mean ± std over seeds; † = some seed diverged) with methods as rows and D as columns."""
    dims = sorted({r["dim"] for r in rows})
    lines = ["| final mode TV | " + " | ".join(f"D = {d}" for d in dims) + " |", "|---|" + "---|" * len(dims)]
    for method in args.method_list:
        cells = []
        for dim in dims:
            row = next(r for r in rows if r["method"] == method and r["dim"] == dim)
            dagger = " †" if any(d is not None for d in row["diverged_at"]) else ""
            cells.append(compare_toy.mean_std(row["final_tv"], ".3f") + dagger)
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    oracle = [compare_toy.mean_std(next(r for r in rows if r["dim"] == d)["oracle_tv"], ".3f") for d in dims]
    pretrained = [compare_toy.mean_std(next(r for r in rows if r["dim"] == d)["pretrained_tv"], ".3f") for d in dims]
    lines += ["| *oracle (exact flow)* | " + " | ".join(oracle) + " |", "| *pretrained P_F♯* | " + " | ".join(pretrained) + " |"]
    return "\n".join(lines) + "\n"


def _plot_rows(ax, rows, methods, key, agg):
    for i, method in enumerate(methods):
        mine = [r for r in rows if r["method"] == method]
        dims = [r["dim"] for r in mine]
        values = [agg(r[key]) for r in mine]
        ax.plot(dims, values, "o-", color=f"C{i}", label=METHODS[method])
        for r, value in zip(mine, values):
            if any(d is not None for d in r["diverged_at"]) and math.isfinite(value):
                ax.plot(r["dim"], value, "x", color=f"C{i}", ms=10)


def make_figure(path: Path, rows: List[dict], args):
    """final TV, updates and train seconds to TV ≤ threshold, and train seconds per update, against D."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else float("nan")

    def median_or_budget(values):  # not reached → plotted at the budget, open marker
        return float(np.median([v if v is not None else args.updates for v in values]))

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    panels = [("final_tv", mean, "final mode TV (mean over seeds)"),
              ("updates_held", median_or_budget, f"updates to TV ≤ {args.threshold:g}, held (median; budget = never)"),
              ("train_s_held", mean, f"train seconds to TV ≤ {args.threshold:g}, held (mean of seeds that got there)"),
              ("train_s_per_update", mean, "train seconds per update")]
    for ax, (key, agg, title) in zip(axes, panels):
        _plot_rows(ax, rows, args.method_list, key, agg)
        ax.set_xscale("log", base=2), ax.set_xticks(args.dim_list, [str(d) for d in args.dim_list])
        ax.set_xlabel("dimension D"), ax.set_title(title, fontsize=9)
    axes[0].axhline(args.threshold, ls=":", c="k", lw=0.8)
    oracle = [mean(r["oracle_tv"]) for r in rows if r["method"] == args.method_list[0]]
    axes[0].plot(args.dim_list, oracle, ":", c="gray", label="oracle (exact flow)")
    axes[1].axhline(args.updates, ls=":", c="gray", lw=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"ring8 + {args.reward} in D dimensions: {args.seeds} seed(s) × {args.updates} updates; × = a seed diverged", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def write_readme_table(table: str, command: str, wall: str, readme: Path = Path("README.md")):
    """Replace the text between the TOY-DIM-TABLE markers of README.md."""
    compare_toy.replace_readme_block(README_TABLE, f"Produced by `{command}` ({wall}):\n\n{table}", readme)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    jobs = run_configs(args)
    for cfg in jobs.values():
        toy_2d.validate(cfg)
    results = run_all(args, jobs)
    rows = summarise(args, jobs, results)
    table = markdown_table(rows, args, next(iter(jobs.values())))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure = Path(README_FIGURE) if args.readme else out / "toy_dim.png"
    make_figure(figure, rows, args)
    wall = time.time() - start
    (out / "table.md").write_text(table + "\n" + compact_table(rows, args))
    summary = {"args": {k: v for k, v in vars(args).items()}, "toy_config": dataclasses.asdict(next(iter(jobs.values()))),
               "git": compare_toy.git_state(), "wall_s": wall, "rows": rows,
               "runs": {f"d{d}/{m}/seed{s}": r for (m, d, s), r in results.items()}}
    (out / "table.json").write_text(json.dumps(summary, indent=2, default=float))
    if args.readme:
        given = argv if argv is not None else sys.argv[1:]
        command = "python benchmarks/toy_dim_sweep.py " + " ".join(a for a in given if a != "--reuse")
        timing = "runs reused from an earlier invocation" if args.reuse else f"wall {wall / 60:.1f} min with --jobs {args.jobs}"
        write_readme_table(table, command.strip(), timing)
    print(table + "\n" + compact_table(rows, args))
    print(f"wall time {wall:.0f} s; table in {out / 'table.md'}, figure in {figure}")


if __name__ == "__main__":
    main()
