"""The exact toy in D dimensions: ∇-GFlowNet, adjoint matching, RTB, DDPO, GRPO and KL-PG for D ∈ {2, 8, 32, 128}.

    python experiments/toy_dim_sweep.py --docs    # 4 D × 6 methods × 3 seeds (≤ 60 min on 2 cores): runs/toy_dim_sweep/
                                                  # table.{md,json}, docs/results/toy_dim_sweep.md, docs/figures/toy_dim_sweep.png
    python experiments/toy_dim_sweep.py           # the same, outputs in --out only
    python experiments/toy_dim_sweep.py --quick   # tiny budget, D ∈ {2, 3}, 1 seed (seconds; the test)
    python experiments/toy_dim_sweep.py --dims 2,32 --methods rtb --seeds 1
    python experiments/toy_dim_sweep.py --reward bump-all --out runs/toy_dim_sweep_bump_all   # a reward on all D

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
seeds that reached it), train seconds per update, network VJPs, reward calls and reward gradients per
update (experiments/toy_diagnostics.py's counters; reward calls "not counted" for runs recorded before they counted them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import toy_2d  # noqa: E402
from experiments import runner  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

METHODS = {"nabla-db": "∇-GFlowNet (toy_2d default)", "adjoint-matching": "Adjoint Matching", "rtb": "RTB", "ddpo": "DDPO",
           "grpo": "GRPO", "kl-pg": "KL-PG"}
BUDGET = dict(updates=300, batch_size=128, eval_every=10, eval_samples=2000)
QUICK = dict(updates=4, batch_size=16, num_steps=10, eval_every=2, eval_samples=200, pretrain_iters=100, pretrain_batch=128)
# (method, D) → factor on toy_2d's --lr where that rate diverged (found with this script's --lr-factor, seed 0).
# At lr 2e-3 (seed 0, 200 updates × 64 trajectories): RTB diverged at D = 32 (0.3× collapsed, 0.1× still improving) and
# D = 128 (0.1× still flung off the data); DDPO flung off at D = 32 and 128 (0.1× at D = 128 too);
# ∇-GFlowNet diverged and adjoint matching flung off at D = 128 (Adam's first steps move every weight of
# the D-wide output layer by ~lr, also those whose gradient is noise). D = 2 and 8: all at 2e-3.
# GRPO and KL-PG (seed 0, the full BUDGET, factors 1, 0.3, 0.1 until a rate held): KL-PG flung off at D = 128
# (0.3× and 0.1× both held: final TV 0.211 / 0.219); GRPO held at 2e-3 at every D, as KL-PG at D ≤ 32.
LR_SCALE: Dict[Tuple[str, int], float] = {
    ("rtb", 32): 0.1, ("ddpo", 32): 0.3,
    ("nabla-db", 128): 0.1, ("adjoint-matching", 128): 0.1, ("rtb", 128): 0.03, ("ddpo", 128): 0.03,
    ("kl-pg", 128): 0.3,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = runner.toy_parser("toy_dim_sweep", __doc__, "tiny budget for tests: D ∈ {2, 3}, 1 seed, 4 updates")
    parser.add_argument("--dims", default="2,8,32,128", help="comma-separated dimensions D ≥ 2")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--reward", default="bump", choices=sorted(toy_2d.REWARD_PRESETS),
                        help="toy_2d reward preset: bump/linear read the first two coordinates, bump-all all D")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 … seeds−1 (each with its own pretrained model)")
    parser.add_argument("--updates", type=int, default=BUDGET["updates"], help="updates per run (the fixed budget)")
    parser.add_argument("--threshold", type=float, default=0.1, help="TV level for 'updates to TV ≤ threshold'")
    parser.add_argument("--lr-factor", type=float, default=1.0, help="multiplies every run's policy lr (for probing rates)")
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


def held_crossing(cfg: toy_2d.ToyConfig, run: dict, threshold: float) -> Tuple[Optional[int], Optional[float]]:
    """(update, train seconds) of the first evaluation from which TV stays ≤ threshold to the end; (None, None) if never.

    A policy that swings through the target on its way elsewhere (over-tilting, collapsing) crosses
    the threshold once and leaves: its first crossing is not a cost of reaching the target.
    """
    curve = run["curve"]  # runner.read_run's (update, TV), cut where a diverged run left the data
    if run["diverged_at"] is not None or not curve or curve[-1][1] > threshold:
        return None, None
    start = len(curve)
    while start > 0 and curve[start - 1][1] <= threshold:
        start -= 1
    update = curve[start][0]
    history = json.loads((Path(cfg.out) / "metrics.json").read_text())["history"]
    return update, next(h["train_time_s"] for h in history if h["update"] == update)


def run_all(args, jobs) -> Dict[Tuple[str, int, int], dict]:
    """Every run, largest D first, each summarised by runner.read_run, plus when TV ≤ threshold began to hold."""
    results = runner.run_toy(jobs, args.threshold, args.reuse, args.jobs, name=lambda key: f"D={key[1]} {key[0]} seed {key[2]}",
                             order=lambda key: (-key[1], key[0] not in ("ddpo", "rtb")))
    for key, r in results.items():
        r["updates_held"], r["train_s_held"] = held_crossing(jobs[key], r, args.threshold)
    return results


# ----------------------------------------------------------------------------------------------
# Table and figure
# ----------------------------------------------------------------------------------------------


def summarise(args, jobs, results) -> List[dict]:
    """One row per (D, method): the toy summary lists over seeds (runner.toy_row) plus this table's columns."""
    rows = []
    for dim in args.dim_list:
        for method in args.method_list:
            seeds = [results[(method, dim, s)] for s in range(args.seeds)]
            rows.append({
                "dim": dim, "method": method, "label": METHODS[method], "lr": jobs[(method, dim, 0)].lr, **runner.toy_row(seeds),
                "updates_held": [r["updates_held"] for r in seeds],
                "train_s_held": [r["train_s_held"] for r in seeds],
                "train_s_per_update": [r["train_s"] / r["updates"] for r in seeds],
                "pretrained_tv": [r["pretrained"]["mode_tv"] for r in seeds],
                "oracle_tv": [r["oracle"]["mode_tv"] for r in seeds],
            })
    return rows


def markdown_table(rows: List[dict], args, cfg: toy_2d.ToyConfig) -> str:
    """The full table: one row per (D, method), then the pretrained and oracle TV of that D; `cfg`: any run's config."""
    default_lr = toy_2d.ToyConfig.lr
    thr = f"{args.threshold:g}"
    head = ["D", "method", "final mode TV ↓", "mean log r", f"updates to TV ≤ {thr}, held", "train s, held", f"first TV ≤ {thr} at",
            "best TV seen", "train s / update", "network VJPs / update", "r calls / update", "∇r / update", "policy lr", "diverged"]
    lines, ms, reached = [], runner.mean_std, runner.median_reached
    for i, row in enumerate(rows):
        lines.append([row["dim"], row["label"], ms(row["final_tv"], ".3f"), ms(row["mean_log_reward"], ".2f"),
                      reached(row["updates_held"], ".0f"), reached(row["train_s_held"], ".1f"),
                      reached(row["updates_to_threshold"], ".0f"), ms(row["min_tv"], ".3f"), ms(row["train_s_per_update"], ".3f"),
                      f"{row['network_vjps_per_update']:.0f}", runner.per_update_cell(row["reward_calls_per_update"]),
                      f"{row['reward_grads_per_update']:.0f}",
                      f"{row['lr']:g}", runner.diverged_cell(row["diverged_at"])])
        if i == len(rows) - 1 or rows[i + 1]["dim"] != row["dim"]:
            lines.append([row["dim"], "*pretrained P_F♯ / oracle (exact flow) / exact*",
                          f"{ms(row['pretrained_tv'], '.3f')} / {ms(row['oracle_tv'], '.3f')} / 0",
                          f"{row['exact_mean_log_reward']:.2f} (exact)"] + [""] * 10)
    changed = [f"{r['label']} at D = {r['dim']}: {r['lr']:g}" for r in rows if r["lr"] != default_lr]
    note = (f"\n{args.seeds} seed(s) × {args.updates} updates × {cfg.batch_size} trajectories × {cfg.num_steps} steps; "
            f"mean ± std over seeds. 'Held': the first evaluation (every {cfg.eval_every} updates, 1000 samples) from which TV "
            f"stayed ≤ {thr} to the end of the budget; 'first TV ≤ {thr} at': the first evaluation below it, even if it left "
            "again (a swing through the target on the way elsewhere); both medians over the seeds that got there, "
            f"(reached/seeds) when not all did. Policy lr {default_lr:g} "
            f"(toy_2d's) unless listed: {'; '.join(changed) if changed else 'none changed'}. Diverged: seeds whose sampler "
            "ended non-finite or flung off the data (runner.read_run's rule); their final TV is left out of the mean. Costs per "
            "update: network VJPs (rows of ε̂_θ, ε̂♯, g_φ backpropagated), r calls (rows the reward scores, with or without a "
            "graph), ∇r (rows whose reward gradient is taken); GRPO, KL-PG and DDPO take ppo_epochs × ppo_minibatches optimiser "
            "steps per batch, the others one.\n")
    return runner.markdown_table(head, lines) + note


def compact_table(rows: List[dict], args) -> str:
    """Final mode TV (mean ± std over seeds; † = some seed diverged) with methods as rows and D as columns."""
    dims = sorted({r["dim"] for r in rows})
    by_dim = {d: next(r for r in rows if r["dim"] == d) for d in dims}
    lines = []
    for method in args.method_list:
        mine = [next(r for r in rows if r["method"] == method and r["dim"] == d) for d in dims]
        lines.append([METHODS[method]] + [runner.mean_std(r["final_tv"], ".3f") + (" †" if any(d is not None for d in r["diverged_at"]) else "")
                                          for r in mine])
    lines.append(["*oracle (exact flow)*"] + [runner.mean_std(by_dim[d]["oracle_tv"], ".3f") for d in dims])
    lines.append(["*pretrained P_F♯*"] + [runner.mean_std(by_dim[d]["pretrained_tv"], ".3f") for d in dims])
    return runner.markdown_table(["final mode TV"] + [f"D = {d}" for d in dims], lines)


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
    plt = runner.pyplot()

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
    runner.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    jobs = run_configs(args)
    results = run_all(args, jobs)
    rows = summarise(args, jobs, results)
    table = markdown_table(rows, args, next(iter(jobs.values()))) + "\n" + compact_table(rows, args)
    wall = time.time() - start
    summary = {"args": vars(args), "toy_config": dataclasses.asdict(next(iter(jobs.values()))), "wall_s": wall, "rows": rows,
               "runs": {f"d{d}/{m}/seed{s}": r for (m, d, s), r in results.items()}}
    timing = "runs reused from an earlier invocation" if args.reuse else f"wall {wall / 60:.1f} min with --jobs {args.jobs}"
    figure = runner.write_outputs("toy_dim_sweep", __doc__.split("\n")[0], Path(args.out), table,
                                  lambda path: make_figure(path, rows, args), runner.command_line("toy_dim_sweep", argv),
                                  args.docs, summary, timing)
    print(table)
    print(f"wall time {wall:.0f} s; table in {Path(args.out) / 'table.md'}, figure in {figure}")


if __name__ == "__main__":
    main()
