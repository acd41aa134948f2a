"""∇-GFlowNet against DRaFT-K, ReFL, DDPO, RTB, GRPO and KL-PG on the 2-D toy, judged against the exact target.

    python experiments/compare_toy.py --docs     # ring8 + bump, 3 seeds, all methods (22 min on 2 shared CPU cores):
                                                 # runs/compare_toy/table.{md,json}, docs/results/compare_toy.md
                                                 # and docs/figures/compare_toy.png
    python experiments/compare_toy.py            # the same, outputs in --out only
    python experiments/compare_toy.py --quick    # tiny budget, seconds (tests)
    python experiments/compare_toy.py --methods nabla-db,rtb --seeds 5

Every method runs through `toy_2d.run` with toy_2d's current defaults (so a change of defaults is
picked up by rerunning this one command), on the same prior, reward, β, pretrained model (one per
seed) and sampler; one update = one batch of `batch_size` trajectories for every method. Per method
and seed it records the mode-weight TV to the exact target along training and at the end, the mean
log-reward against its exact expectation under the target, the entropy of the mode weights, the
number of updates, training seconds and reward-gradient calls until TV ≤ --threshold first holds at
an evaluation (every --eval-every updates, 1000 samples), and the final samples for the figure.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import cli  # noqa: E402
import nabla_gfn as ng  # noqa: E402
import toy_2d  # noqa: E402
from experiments import runner  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclass
class CompareConfig:
    prior: str = field(default=toy_2d.ToyConfig.prior, metadata={"help": "prior preset or GMM JSON (as toy_2d.py)"})
    reward: str = field(default=toy_2d.ToyConfig.reward, metadata={"help": "reward preset or JSON (as toy_2d.py)"})
    beta: float = field(default=toy_2d.ToyConfig.beta, metadata={"help": "reward scale β (as toy_2d.py)"})
    methods: str = field(default="all", metadata={"help": "comma-separated variant ids (see --list) or 'all'"})
    seeds: int = field(default=3, metadata={"help": "seeds 0 … seeds−1 (each seed: its own pretrained model)"})
    updates: int = field(default=0, metadata={"help": "updates per run (0: toy_2d's default)"})
    eval_every: int = field(default=5, metadata={"help": "updates between TV evaluations (1000 samples)"})
    threshold: float = field(default=0.1, metadata={"help": "TV level for 'updates to TV ≤ threshold'"})
    jobs: int = field(default=2, metadata={"help": "parallel runs (one CPU thread each)"})
    out: str = field(default="runs/compare_toy", metadata={"help": "output folder"})
    docs: bool = field(default=False, metadata={"help": "also write docs/results/compare_toy.md and docs/figures/compare_toy.png"})
    quick: bool = field(default=False, metadata={"help": "tiny budget for tests: 1 seed, 6 updates, 10 steps, small pretraining"})
    cache_dir: str = field(default="", metadata={"help": "pretrained-model cache (as toy_2d.py)"})
    reuse: bool = field(default=False, metadata={"help": "reuse runs in --out whose config.json matches exactly (e.g. after a crash)"})
    list: bool = field(default=False, metadata={"help": "print the variant ids and exit"})


QUICK = dict(updates=6, batch_size=16, num_steps=10, eval_every=2, eval_samples=200, pretrain_iters=200, pretrain_batch=256)


PAPER = toy_2d.PRESETS["paper"]  # the paper's ∇-DB


def variants(base: toy_2d.ToyConfig) -> Dict[str, dict]:
    """Variant id → {"label", "overrides"} relative to toy_2d's defaults `base` (labels follow them).

    ∇-GFlowNet at the defaults, with each other flow target, with the paper's settings, without g_φ,
    adjoint matching (no guess, no g_φ); then the baselines at their defaults.
    """
    gamma_label = {"alpha_bar": "ᾱ", "sqrt_alpha_bar": "√ᾱ"}

    def nabla(flow_target, weighting, gamma, prefix="∇-GFlowNet"):
        return f"{prefix} ({flow_target}, {weighting}, γ={gamma_label.get(gamma, gamma)})"

    table = {"nabla-db": {"label": nabla(base.flow_target, base.weighting, base.gamma) + " default",
                          "overrides": {"method": "nabla-db"}}}
    for target in (t for t in ng.FLOW_TARGET_CHOICES if t != base.flow_target):
        label = nabla(target if target != "mixed" else f"mixed λ={base.adjoint_lambda:g}", base.weighting, base.gamma)
        table[f"nabla-db-{target}"] = {"label": label, "overrides": {"method": "nabla-db", "flow_target": target}}
    if any(getattr(base, k) != v for k, v in PAPER.items()):
        table["nabla-db-paper"] = {"label": nabla(PAPER["flow_target"], PAPER["weighting"], PAPER["gamma"]) + " paper",
                                   "overrides": {"method": "nabla-db", **PAPER}}
    table["no-flow"] = {"label": f"∇-GFlowNet no-flow ({base.weighting}, γ={gamma_label.get(base.gamma, base.gamma)})",
                        "overrides": {"method": "no-flow"}}
    table["adjoint-matching"] = {"label": f"Adjoint Matching ({base.weighting})", "overrides": {"method": "adjoint-matching"}}
    table.update({
        "draft": {"label": f"DRaFT-{base.draft_k}", "overrides": {"method": "draft"}},
        "refl": {"label": "ReFL", "overrides": {"method": "refl"}},
        "ddpo": {"label": "DDPO", "overrides": {"method": "ddpo"}},
        "rtb": {"label": "RTB", "overrides": {"method": "rtb"}},
        "grpo": {"label": "GRPO (Flow-GRPO's advantage and KL)", "overrides": {"method": "grpo"}},
        "kl-pg": {"label": "KL-PG (KL-regularised policy gradient)", "overrides": {"method": "kl-pg"}},
    })
    return table


# ----------------------------------------------------------------------------------------------
# Table and figure
# ----------------------------------------------------------------------------------------------


def summarise(runs: Dict[str, List[dict]], labels: Dict[str, str]) -> List[dict]:
    """Per variant: the toy summary lists over seeds (runner.toy_row) plus this table's columns."""
    return [{"id": key, "method": labels[key], **runner.toy_row(seeds),
             "tv_at_mid": [r["tv_at_mid"] for r in seeds],
             "mode_entropy": [r["entropy"] for r in seeds],
             "reward_grads_to_threshold": [r["reward_grads_to_threshold"] for r in seeds],
             "optimizer_steps_per_update": seeds[0]["optimizer_steps_per_update"],
             "train_s": [r["train_s"] for r in seeds]}
            for key, seeds in runs.items()]


def markdown_table(rows: List[dict], reference: dict, threshold: float, updates: int, seeds: int) -> str:
    thr, mid = f"{threshold:g}", updates // 5
    ms, reached = runner.mean_std, runner.median_reached
    head = ["method", "final mode TV ↓", f"TV at update {mid}", "best TV seen", "mean log-reward", "mode entropy (nats)",
            f"updates to TV ≤ {thr}", f"train s to TV ≤ {thr}", "network VJPs per update", "r calls per update", "∇r calls per update", "s per update", "diverged"]
    lines = [[row["method"], ms(row["final_tv"], ".3f"), ms(row["tv_at_mid"], ".3f"), ms(row["min_tv"], ".3f"),
              ms(row["mean_log_reward"], ".2f"), ms(row["mode_entropy"], ".2f"),
              reached(row["updates_to_threshold"], ".0f"), reached(row["train_s_to_threshold"], ".1f"),
              f"{row['network_vjps_per_update']:.0f}", runner.per_update_cell(row["reward_calls_per_update"]),
              f"{row['reward_grads_per_update']:.0f}",
              ms([t / updates for t in row["train_s"]], ".3f"), runner.diverged_cell(row["diverged_at"])]
             for row in rows]
    for name, ref in reference.items():
        entropy = "" if ref.get("entropy") is None else f"{ref['entropy']:.2f}"
        lines.append([f"*{name}*", f"{ref['mode_tv']:.3f}", "", "", f"{ref['mean_log_reward']:.2f}", entropy] + [""] * 7)
    note = (f"\n{seeds} seed(s) × {updates} updates; mean ± std over seeds; 'updates/train s to TV ≤ {thr}': median over "
            f"the seeds that reached it at an evaluation (every few updates, 1000 samples), with (reached/seeds) when not all did; "
            f"exact mean log-reward under the target: {rows[0]['exact_mean_log_reward']:.2f}. "
            "Network VJPs: rows of ε̂_θ, ε̂♯ and g_φ evaluated with a graph and backpropagated (the lean adjoint's "
            "sweep is one ε̂♯ VJP per step of every trajectory); r calls: rows the reward scores per update, with or without a graph; ∇r calls: per-sample reward gradients per update. Diverged: seeds whose sampler ended non-finite or flung "
            "off the data, with the update where that began; their final columns are left out of the mean and their "
            "curves stop there. Every method samples the same number of trajectories "
            "per update; DDPO, GRPO and KL-PG then take ppo_epochs × ppo_minibatches optimiser steps on them, the others one. "
            "s per update: training seconds per update (sampling included, evaluation excluded), one CPU thread.\n")
    return runner.markdown_table(head, lines) + note


def make_figure(path: Path, task: toy_2d.Task, samples: Dict[str, np.ndarray], runs: Dict[str, List[dict]],
                labels: Dict[str, str], threshold: float):
    """Left: exact-target samples and each method's final samples (seed 0). Right: TV vs updates."""
    plt = runner.pyplot()
    n_panels = len(samples) + 1
    rows = 2 if n_panels <= 10 else 3
    side = math.ceil(n_panels / rows)  # sample panels per row
    fig = plt.figure(figsize=(2.4 * side + 8.5, 2.7 * rows + 0.3))
    grid = fig.add_gridspec(rows, side + 3)
    lim = float(task.prior.means.abs().max()) + 4 * task.prior.std
    n = len(next(iter(samples.values())))
    panels = {"target": task.target.sample(n, torch.Generator().manual_seed(0)).numpy(), **samples}
    for i, (key, s) in enumerate(panels.items()):
        ax = fig.add_subplot(grid[i // side, i % side])
        ax.scatter(s[:, 0], s[:, 1], s=0.5, alpha=0.3, c="C3" if key == "target" else "C0", rasterized=True)
        if key == "target":
            title = "exact target p♯·R^β"
        elif runs[key][0]["diverged_at"] is not None:
            title = f"{labels[key]}\ndiverged (NaN) at update {runs[key][0]['diverged_at']}"
        else:
            title = f"{labels[key]}\nTV {runs[key][0]['final_tv']:.3f}"
        ax.set_title(title, fontsize=7)
        ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal"), ax.set_xticks([]), ax.set_yticks([])
    ax = fig.add_subplot(grid[:, side:])
    for key, seeds in runs.items():
        updates = sorted({u for r in seeds for u, _ in r["curve"]})
        column = {u: i for i, u in enumerate(updates)}
        tv = np.full((len(seeds), len(updates)), np.nan)  # NaN after a seed diverged
        for row, r in enumerate(seeds):
            for u, v in r["curve"]:
                tv[row, column[u]] = v
        style = "-" if key.startswith(("nabla", "no-flow")) else "--"
        (line,) = ax.plot(updates, np.nanmean(tv, 0), style, lw=1.3, label=labels[key])
        if len(seeds) > 1:
            ax.fill_between(updates, np.nanmin(tv, 0), np.nanmax(tv, 0), color=line.get_color(), alpha=0.1)
        for r in seeds:  # × where a seed diverged
            if r["diverged_at"] is not None:
                ax.plot(r["curve"][-1][0], r["curve"][-1][1], "x", color=line.get_color(), ms=7)
    first = next(iter(runs.values()))[0]
    ax.axhline(first["pretrained"]["mode_tv"], ls=":", c="gray", lw=1, label="pretrained P_F♯")
    if first["oracle"] is not None:
        ax.axhline(first["oracle"]["mode_tv"], ls="-.", c="gray", lw=1, label="oracle (exact flow)")
    ax.axhline(threshold, ls=":", c="k", lw=0.8)
    ax.set_xlabel("update (batch of trajectories)"), ax.set_ylabel("mode-weight TV to exact target")
    ax.set_title(f"TV vs updates: mean and min–max over {len(next(iter(runs.values())))} seed(s)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("samples after finetuning (seed 0), mode-weight TV to the exact target", x=side / (2 * (side + 4.5)), fontsize=9)
    runner.save_figure(fig, path)


def compare(cc: CompareConfig, command: str = "python experiments/compare_toy.py") -> dict:
    """Run every (variant, seed), write table.{md,json} and the figure (and the docs page). Returns the table's json."""
    start = time.time()
    base = toy_2d.ToyConfig(prior=cc.prior, reward=cc.reward, beta=cc.beta, cache_dir=cc.cache_dir, no_figure=True, eval_samples=2000,
                            eval_every=cc.eval_every)
    if cc.quick:
        base = dataclasses.replace(base, **QUICK)
        cc = dataclasses.replace(cc, seeds=1, jobs=1)
    if cc.updates:
        base = dataclasses.replace(base, updates=cc.updates)
    table_variants = variants(base)
    keys = list(table_variants) if cc.methods == "all" else [m.strip() for m in cc.methods.split(",")]
    unknown = [k for k in keys if k not in table_variants]
    if unknown:
        raise SystemExit(f"error: --methods: unknown {unknown}; choose from {list(table_variants)}")
    out = Path(cc.out)
    jobs = {(key, seed): dataclasses.replace(base, seed=seed, out=str(out / "runs" / key / f"seed{seed}"),
                                             **table_variants[key]["overrides"])
            for key in keys for seed in range(cc.seeds)}
    # slowest methods first, so that the pool's last minutes are not one long run
    results = runner.run_toy(jobs, cc.threshold, cc.reuse, cc.jobs, name=lambda ks: f"{ks[0]} seed {ks[1]}",
                             order=lambda ks: ks[0] not in ("ddpo", "rtb"))
    runs = {key: [results[(key, seed)] for seed in range(cc.seeds)] for key in keys}

    labels = {k: v["label"] for k, v in table_variants.items()}
    rows = summarise(runs, labels)
    first = runs[keys[0]][0]
    reference = {"pretrained P_F♯": {**first["pretrained"], "entropy": runner.pretrained_entropy(dataclasses.replace(base, seed=0))}}
    if first["oracle"] is not None:
        reference["oracle (exact flow)"] = {**first["oracle"], "entropy": None}
    reference["exact target"] = {"mode_tv": 0.0, "mean_log_reward": first["exact_mean_log_reward"],
                                 "entropy": first["target_entropy"]}
    table = markdown_table(rows, reference, cc.threshold, base.updates, cc.seeds)
    samples = {key: np.load(out / "runs" / key / "seed0" / "samples.npy")[:1500] for key in keys}
    summary = {"compare_config": dataclasses.asdict(cc), "toy_config": dataclasses.asdict(base),
               "variants": {k: table_variants[k] for k in keys}, "wall_s": time.time() - start,
               "rows": rows, "reference": reference, "runs": runs}
    timing = "runs reused from an earlier invocation" if cc.reuse else f"wall {summary['wall_s'] / 60:.1f} min with --jobs {cc.jobs}"
    figure = runner.write_outputs("compare_toy", __doc__.split("\n")[0], out, table, command=command, docs=cc.docs,
                                  summary=summary, timing=timing,
                                  figure=lambda path: make_figure(path, toy_2d.build_task(base), samples, runs, labels, cc.threshold))
    print(table)
    print(f"wall time {summary['wall_s']:.0f} s; table in {out / 'table.md'}, figure in {figure}")
    return summary


def parse_args(argv=None) -> CompareConfig:
    return cli.parse(CompareConfig, argv, description=__doc__.split("\n\n")[0])


def main(argv=None):
    cc = parse_args(argv)
    if cc.list:
        for key, v in variants(toy_2d.ToyConfig()).items():
            print(f"{key:24s} {v['label']}  {v['overrides']}")
        return
    compare(cc, runner.command_line("compare_toy", argv))


if __name__ == "__main__":
    main()
