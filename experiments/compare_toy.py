"""∇-GFlowNet against DRaFT-K, ReFL, DDPO and RTB on the 2-D toy, judged against the exact target.

    python compare_toy.py --readme      # ring8 + bump, 3 seeds, all methods (≈ 10 min on 2 CPU cores):
                                        # runs/compare_toy/table.{md,json}, assets/toy_baselines.png and
                                        # the table in README.md's baselines section
    python compare_toy.py               # the same without touching README.md / assets (figure in --out)
    python compare_toy.py --quick       # tiny budget, seconds (tests)
    python compare_toy.py --methods nabla-db,rtb --seeds 5

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
import json
import math
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

import nabla_gfn as ng
import toy_2d

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

README_TABLE = ("<!-- BASELINES-TABLE:BEGIN -->", "<!-- BASELINES-TABLE:END -->")
README_FIGURE = "assets/toy_baselines.png"


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
    readme: bool = field(default=False, metadata={"help": f"write the figure to {README_FIGURE} and the table into README.md"})
    quick: bool = field(default=False, metadata={"help": "tiny budget for tests: 1 seed, 6 updates, 10 steps, small pretraining"})
    cache_dir: str = field(default="", metadata={"help": "pretrained-model cache (as toy_2d.py)"})
    reuse: bool = field(default=False, metadata={"help": "reuse runs in --out whose config.json matches exactly (e.g. after a crash)"})
    list: bool = field(default=False, metadata={"help": "print the variant ids and exit"})


QUICK = dict(updates=6, batch_size=16, num_steps=10, eval_every=2, eval_samples=200, pretrain_iters=200, pretrain_batch=256)


PAPER = {"flow_target": "bootstrap", "weighting": "plain", "gamma": "alpha_bar", "guess_from": "policy"}  # the paper's ∇-DB


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
    })
    return table


# ----------------------------------------------------------------------------------------------
# One run (in a worker process)
# ----------------------------------------------------------------------------------------------


def _worker_init():
    torch.set_num_threads(1)  # the pool's processes share the machine's cores


def mode_entropy(weights: torch.Tensor) -> float:
    """Entropy (nats) of mode weights; 0 log 0 = 0."""
    w = weights[weights > 0]
    return max(0.0, float(-(w * w.log()).sum()))


def pretrain_seed(cfg: toy_2d.ToyConfig) -> str:
    """Pretrain (or load) the ε-network of cfg.seed, so that later parallel runs only read the cache."""
    scheduler = toy_2d.sd_scheduler()
    toy_2d.pretrain(cfg, toy_2d.parse_prior(cfg.prior), scheduler, quiet=True)
    return f"seed {cfg.seed}"


def pretrained_entropy(cfg: toy_2d.ToyConfig, n: int = 4000) -> float:
    """Mode entropy of the pretrained sampler P_F♯ (seed cfg.seed), nearest target mean as in the TV."""
    scheduler = toy_2d.sd_scheduler()
    task = toy_2d.build_task(cfg)
    reference = toy_2d.pretrain(cfg, task.prior, scheduler, quiet=True)
    schedule = ng.ddim_schedule(scheduler, cfg.num_steps)
    x0 = toy_2d.sample(toy_2d.as_eps_fn(reference), schedule, n, torch.Generator().manual_seed(cfg.seed + 3)).final
    return mode_entropy(toy_2d.mode_weights(x0, task.target.means))


def finished(cfg: toy_2d.ToyConfig) -> bool:
    """Whether cfg.out holds a completed toy_2d run of exactly this config."""
    out = Path(cfg.out)
    if not (out / "metrics.json").exists() or not (out / "config.json").exists():
        return False
    return json.loads((out / "config.json").read_text()) == json.loads(json.dumps(dataclasses.asdict(cfg)))


def run_one(cfg: toy_2d.ToyConfig, threshold: float, reuse: bool = False) -> dict:
    """toy_2d.run (skipped with reuse when cfg.out already holds this exact run), then its summary."""
    if not (reuse and finished(cfg)):
        toy_2d.run(cfg, quiet=True)
    return read_run(cfg, threshold)


def read_run(cfg: toy_2d.ToyConfig, threshold: float) -> dict:
    """The comparison's summary of one finished run: curve, first crossing of the threshold, entropy.

    Divergence: a run whose final samples are non-finite or flung far off the data (sliced W1 to the
    target over 10× the pretrained sampler's) diverged where the unbroken tail of such evaluations
    starts; its curve stops there and its final numbers are None (toy_2d's nearest-mode metrics
    would count NaN samples as mode 0). A transient outlier that training recovers from is not a
    divergence.
    """
    result = json.loads((Path(cfg.out) / "metrics.json").read_text())
    history = result["history"]
    task = toy_2d.build_task(cfg)
    samples = torch.from_numpy(np.load(Path(cfg.out) / "samples.npy"))
    far = 10 * result["pretrained"]["sliced_w1"]

    def sane(w1: float) -> bool:
        return math.isfinite(w1) and w1 <= far

    evals = [h for h in history if "eval_mode_tv" in h]
    diverged_at = None
    if not (torch.isfinite(samples).all() and sane(result["finetuned"]["sliced_w1"])):
        keep = len(evals)
        while keep > 0 and not sane(evals[keep - 1]["eval_sliced_w1"]):
            keep -= 1
        diverged_at = evals[keep]["update"] if keep < len(evals) else history[-1]["update"]
        evals = evals[:keep]
    curve = [(h["update"], h["eval_mode_tv"]) for h in evals]
    hit = next((h for h in evals if h["eval_mode_tv"] <= threshold), None)
    mid = cfg.updates // 5
    at_mid = next((tv for u, tv in curve if u >= mid), None) if (diverged_at is None or diverged_at > mid) else None
    final = result["finetuned"]
    ok = diverged_at is None
    return {
        "final_tv": final["mode_tv"] if ok else None,
        "final_log_reward": final["mean_log_reward"] if ok else None,
        "exact_mean_log_reward": final["exact_mean_log_reward"],
        "entropy": mode_entropy(toy_2d.mode_weights(samples, task.target.means)) if ok else None,
        "diverged_at": diverged_at,
        "tv_at_mid": at_mid,
        "mid_update": mid,
        "pretrained": result["pretrained"],
        "oracle": result.get("oracle"),
        "target_entropy": mode_entropy(task.target.weights),
        "curve": curve,
        "min_tv": min((tv for _, tv in curve), default=None),  # None: diverged before its first evaluation
        "updates_to_threshold": hit["update"] if hit else None,
        "train_s_to_threshold": hit["train_time_s"] if hit else None,
        "reward_grads_to_threshold": hit["reward_grad_calls"] if hit else None,
        "reward_grads_total": history[-1]["reward_grad_calls"],
        "network_vjps_total": history[-1].get("network_vjps", 0),
        "train_s": history[-1]["train_time_s"],
        "optimizer_steps_per_update": history[-1].get("optimizer_steps", 1),
        "updates": cfg.updates,
    }


# ----------------------------------------------------------------------------------------------
# Table and figure
# ----------------------------------------------------------------------------------------------


def mean_std(values: List[Optional[float]], fmt: str) -> str:
    """"mean ± std" over seeds (sample std, ddof 1), None values left out; one value alone; "—" for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.mean(values)), fmt)} ± {format(float(np.std(values, ddof=1)), fmt)}"


def _median_reached(values: List[Optional[float]], fmt: str) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return f"not reached (0/{len(values)})"
    text = format(float(np.median(reached)), fmt)
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)})"


def _diverged(updates: List[Optional[int]]) -> str:
    hits = sorted(u for u in updates if u is not None)
    return "—" if not hits else f"{len(hits)}/{len(updates)} (at update {', '.join(map(str, hits))})"


def summarise(runs: Dict[str, List[dict]], labels: Dict[str, str]) -> List[dict]:
    """Per variant, aggregate over seeds (mean ± std, or median over the seeds that reached TV ≤ thr)."""
    rows = []
    for key, seeds in runs.items():
        rows.append({
            "id": key,
            "method": labels[key],
            "final_tv": [r["final_tv"] for r in seeds],
            "tv_at_mid": [r["tv_at_mid"] for r in seeds],
            "min_tv": [r["min_tv"] for r in seeds],
            "mean_log_reward": [r["final_log_reward"] for r in seeds],
            "exact_mean_log_reward": seeds[0]["exact_mean_log_reward"],
            "mode_entropy": [r["entropy"] for r in seeds],
            "diverged_at": [r["diverged_at"] for r in seeds],
            "updates_to_threshold": [r["updates_to_threshold"] for r in seeds],
            "train_s_to_threshold": [r["train_s_to_threshold"] for r in seeds],
            "reward_grads_to_threshold": [r["reward_grads_to_threshold"] for r in seeds],
            "reward_grads_per_update": seeds[0]["reward_grads_total"] / seeds[0]["updates"],
            "network_vjps_per_update": seeds[0]["network_vjps_total"] / seeds[0]["updates"],
            "optimizer_steps_per_update": seeds[0]["optimizer_steps_per_update"],
            "train_s": [r["train_s"] for r in seeds],
        })
    return rows


def markdown_table(rows: List[dict], reference: dict, threshold: float, updates: int, seeds: int) -> str:
    thr, mid = f"{threshold:g}", updates // 5
    head = (f"| method | final mode TV ↓ | TV at update {mid} | best TV seen | mean log-reward | mode entropy (nats) | "
            f"updates to TV ≤ {thr} | train s to TV ≤ {thr} | network VJPs per update | ∇r calls per update | diverged |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for row in rows:
        lines.append(
            f"| {row['method']} | {mean_std(row['final_tv'], '.3f')} | {mean_std(row['tv_at_mid'], '.3f')} | {mean_std(row['min_tv'], '.3f')} | "
            f"{mean_std(row['mean_log_reward'], '.2f')} | {mean_std(row['mode_entropy'], '.2f')} | "
            f"{_median_reached(row['updates_to_threshold'], '.0f')} | {_median_reached(row['train_s_to_threshold'], '.1f')} | "
            f"{row['network_vjps_per_update']:.0f} | {row['reward_grads_per_update']:.0f} | {_diverged(row['diverged_at'])} |")
    for name, ref in reference.items():
        entropy = "" if ref.get("entropy") is None else f"{ref['entropy']:.2f}"
        lines.append(f"| *{name}* | {ref['mode_tv']:.3f} | | | {ref['mean_log_reward']:.2f} | {entropy} | | | | | |")
    note = (f"\n{seeds} seed(s) × {updates} updates; mean ± std over seeds; 'updates/train s to TV ≤ {thr}': median over "
            f"the seeds that reached it at an evaluation (every few updates, 1000 samples), with (reached/seeds) when not all did; "
            f"exact mean log-reward under the target: {rows[0]['exact_mean_log_reward']:.2f}. "
            "Network VJPs: rows of ε̂_θ, ε̂♯ and g_φ evaluated with a graph and backpropagated (the lean adjoint's "
            "sweep is one ε̂♯ VJP per step of every trajectory); ∇r calls: per-sample reward gradients per update. Diverged: seeds whose sampler ended non-finite or flung "
            "off the data, with the update where that began; their final columns are left out of the mean and their "
            "curves stop there. Every method samples the same number of trajectories "
            "per update; DDPO then takes ppo_epochs × ppo_minibatches optimiser steps on them, the others one.\n")
    return head + "\n".join(lines) + "\n" + note


def make_figure(path: Path, task: toy_2d.Task, samples: Dict[str, np.ndarray], runs: Dict[str, List[dict]],
                labels: Dict[str, str], threshold: float):
    """Left: exact-target samples and each method's final samples (seed 0). Right: TV vs updates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=72)
    plt.close(fig)


def replace_readme_block(markers: Tuple[str, str], content: str, readme: Path = Path("README.md")):
    """Replace the text between two marker comments of README.md with `content` (markers kept)."""
    text = readme.read_text()
    begin, end = markers
    if begin not in text or end not in text:
        raise SystemExit(f"error: README.md has no {begin} … {end} markers")
    body = f"{begin}\n\n{content}\n{end}"
    readme.write_text(re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: body, text, flags=re.S))


def write_readme_table(table: str, command: str, readme: Path = Path("README.md")):
    """The table between the BASELINES-TABLE markers of README.md (inside the baselines section)."""
    replace_readme_block(README_TABLE, f"Produced by `{command}`:\n\n{table}", readme)


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------


def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "toy_2d_dirty": bool(git("status", "--porcelain", "toy_2d.py", "toy_baselines.py"))}


def compare(cc: CompareConfig, command: str = "python compare_toy.py") -> dict:
    """Run every (variant, seed), write table.{md,json} and the figure. Returns the table's json."""
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
    for cfg in jobs.values():
        toy_2d.validate(cfg)

    runs: Dict[str, List[dict]] = {key: [None] * cc.seeds for key in keys}
    with ProcessPoolExecutor(cc.jobs, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        list(pool.map(pretrain_seed, [dataclasses.replace(base, seed=s) for s in range(cc.seeds)]))
        # slowest methods first, so that the pool's last minutes are not one long run
        order = sorted(jobs, key=lambda ks: ks[0] not in ("ddpo", "rtb"))
        futures = {ks: pool.submit(run_one, jobs[ks], cc.threshold, cc.reuse) for ks in order}
        for (key, seed), future in futures.items():
            runs[key][seed] = future.result()
            r = runs[key][seed]
            print(f"{key} seed {seed}: " + (f"final TV {r['final_tv']:.3f}" if r["diverged_at"] is None
                                            else f"diverged at update {r['diverged_at']}"), flush=True)

    labels = {k: v["label"] for k, v in table_variants.items()}
    rows = summarise(runs, labels)
    first = runs[keys[0]][0]
    reference = {"pretrained P_F♯": {**first["pretrained"], "entropy": pretrained_entropy(dataclasses.replace(base, seed=0))}}
    if first["oracle"] is not None:
        reference["oracle (exact flow)"] = {**first["oracle"], "entropy": None}
    reference["exact target"] = {"mode_tv": 0.0, "mean_log_reward": first["exact_mean_log_reward"],
                                 "entropy": first["target_entropy"]}
    table = markdown_table(rows, reference, cc.threshold, base.updates, cc.seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    figure = Path(README_FIGURE) if cc.readme else out / "toy_baselines.png"
    samples = {key: np.load(out / "runs" / key / "seed0" / "samples.npy")[:1500] for key in keys}
    make_figure(figure, toy_2d.build_task(base), samples, runs, labels, cc.threshold)
    summary = {
        "compare_config": dataclasses.asdict(cc),
        "toy_config": dataclasses.asdict(base),
        "variants": {k: table_variants[k] for k in keys},
        "git": git_state(),
        "wall_s": time.time() - start,
        "rows": rows,
        "reference": reference,
        "runs": runs,
    }
    (out / "table.json").write_text(json.dumps(summary, indent=2, default=float))
    if cc.readme:
        write_readme_table(table, command)
    print(table)
    print(f"wall time {summary['wall_s']:.0f} s; table in {out / 'table.md'}, figure in {figure}")
    return summary


def parse_args(argv=None) -> CompareConfig:
    parser = toy_2d.dataclass_parser(CompareConfig, __doc__.split("\n\n")[0])
    return CompareConfig(**vars(parser.parse_args(argv)))


def main(argv=None):
    cc = parse_args(argv)
    if cc.list:
        for key, v in variants(toy_2d.ToyConfig()).items():
            print(f"{key:24s} {v['label']}  {v['overrides']}")
        return
    args = argv if argv is not None else sys.argv[1:]
    command = "python compare_toy.py " + " ".join(a for a in args if a != "--reuse")  # reuse changes no number
    compare(cc, command.strip())


if __name__ == "__main__":
    main()
