"""What every experiment shares: runs in a process pool, mean ± std over seeds, markdown tables, outputs.

An experiment script (compare_toy.py, toy_dim_sweep.py, compare_digits.py, toy_ablation.py) holds
its variants, its table layout and its main; everything else is here:

- `run_pool`: a list of run configs through a pool of spawned processes (one torch thread each),
  with a warm-up pass (pretraining shared models, so that the runs only read the cache);
- `mean_std` (sample std over seeds, ddof 1), `median_reached`, `diverged_cell`, `markdown_table`;
- `write_outputs`: table.md, table.json (with the git state) and the figure in --out; with
  `docs=True` also the page docs/results/<experiment>.md (command, table, figure link, git state)
  and the figure docs/figures/<experiment>.png;
- the toy_2d adapter (last section): one toy run → its summary, reused when --out already holds
  that exact run. It is the one place where the toy experiments use toy_2d beyond `ToyConfig`,
  `run` and `build_task`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional, Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the rungs live at the repository root
    sys.path.insert(0, str(ROOT))

import nabla_gfn as ng  # noqa: E402
import toy_2d  # noqa: E402
from experiments import toy_diagnostics  # noqa: E402

DOCS = ROOT / "docs"

# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def one_thread():
    torch.set_num_threads(1)  # the pool's processes share the machine's cores


def run_pool(worker: Callable[[Any], Any], items: Dict[Hashable, Any], jobs: int, order: Optional[Callable] = None,
             warmup: Optional[Callable[[Any], Any]] = None, warmup_items: Iterable = (),
             report: Optional[Callable[[Hashable, Any], None]] = None) -> Dict[Hashable, Any]:
    """worker(item) for every item, in `jobs` spawned processes; results keyed as `items`, in its order.

    `warmup` maps over `warmup_items` first (e.g. pretraining each seed's model once, so that the
    parallel runs only read the cache); `order` sorts the keys for submission (slowest first, so
    that the pool's last minutes are not one long run); `report(key, result)` as each finishes.
    """
    results = {}
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=one_thread) as pool:
        if warmup is not None:
            list(pool.map(warmup, list(warmup_items)))
        keys = sorted(items, key=order) if order else list(items)
        futures = {pool.submit(worker, items[key]): key for key in keys}
        for future in as_completed(futures):
            key = futures[future]
            results[key] = future.result()
            if report is not None:
                report(key, results[key])
    return {key: results[key] for key in items}


# ----------------------------------------------------------------------------------------------
# Statistics and tables
# ----------------------------------------------------------------------------------------------


def mean_std(values: Sequence[Optional[float]], fmt: str) -> str:
    """"mean ± std" over seeds (sample std, ddof 1), None values left out; one value alone; "—" for none."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(float(np.mean(values)), fmt)} ± {format(float(np.std(values, ddof=1)), fmt)}"


def median_reached(values: Sequence[Optional[float]], fmt: str) -> str:
    """Median over the seeds that reached a bar (None: did not), "(reached/seeds)" when not all did."""
    reached = [v for v in values if v is not None]
    if not reached:
        return f"not reached (0/{len(values)})"
    text = format(float(np.median(reached)), fmt)
    return text if len(reached) == len(values) else f"{text} ({len(reached)}/{len(values)})"


def diverged_cell(updates: Sequence[Optional[int]]) -> str:
    """"k/n (at update …)" for the seeds that diverged (their update; None: did not), "—" for none."""
    hits = sorted(u for u in updates if u is not None)
    return "—" if not hits else f"{len(hits)}/{len(updates)} (at update {', '.join(map(str, hits))})"


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A markdown table: the header, the rule, one line per row (cells as given)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


def git_state() -> dict:
    """The commit the numbers came from and the tracked files changed since (empty when clean)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=ROOT).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    # porcelain lines are "XY path": the status columns may start with a space, so never strip before [3:]
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    return {"commit": git("rev-parse", "HEAD").strip(), "changed": changed}


def slug(text: str) -> str:
    """A folder name for a row label: lower case, every other character a dash."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def command_line(script: str, argv: Optional[List[str]]) -> str:
    """The command a user types to reproduce this invocation (--reuse changes no number: left out)."""
    given = argv if argv is not None else sys.argv[1:]
    return " ".join(["python", f"experiments/{script}.py", *(a for a in given if a != "--reuse")])


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 72):
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def write_outputs(name: str, title: str, out: Path, table: str, figure: Callable[[Path], None], command: str,
                  docs: bool, summary: Optional[dict] = None, timing: str = "") -> Path:
    """table.md, table.json (summary + git state) and <name>.png in `out`; with docs, the docs page and figure.

    Returns the figure's path in `out`.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table)
    if summary is not None:
        (out / "table.json").write_text(json.dumps({**summary, "git": git_state()}, indent=2, default=float))
    path = out / f"{name}.png"
    figure(path)
    if docs:
        (DOCS / "figures").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / "figures" / f"{name}.png")
        write_docs_page(name, name, title, f"{table}\n![{name}](../figures/{name}.png)\n", command, timing)
    return path


def write_docs_page(name: str, script: str, title: str, body: str, command: str, timing: str = "") -> Path:
    """docs/results/<name>.md, written by experiments/<script>.py: the command, `body` (table, figure), the git state."""
    git = git_state()
    dirty = f"; uncommitted changes in {', '.join(git['changed'])}" if git["changed"] else ""
    page = (f"# {title}\n\n"
            f"Generated by [`experiments/{script}.py`](../../experiments/{script}.py); rerun the command to update it.\n\n"
            f"Produced by `{command}`" + (f" ({timing})" if timing else "") + f":\n\n{body}\n"
            f"Git state: commit `{git['commit'] or 'unknown'}`{dirty}.\n")
    path = DOCS / "results" / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


# ----------------------------------------------------------------------------------------------
# toy_2d adapter: the toy experiments' flags, runs and per-run summaries
# ----------------------------------------------------------------------------------------------


def toy_parser(name: str, doc: str, quick: str) -> argparse.ArgumentParser:
    """The flags every toy experiment takes: --jobs, --out (runs/<name>), --cache-dir, --docs, --quick, --reuse."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2, help="parallel runs (one CPU thread each)")
    parser.add_argument("--out", default=f"runs/{name}", help="output folder")
    parser.add_argument("--cache-dir", default="", help="pretrained-model cache (as toy_2d.py)")
    parser.add_argument("--docs", action="store_true", help=f"also write docs/results/{name}.md and docs/figures/{name}.png")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs in --out whose config matches exactly")
    return parser


def run_toy(jobs: Dict[Hashable, toy_2d.ToyConfig], threshold: float, reuse: bool, workers: int, name: Callable[[Hashable], str],
            order: Optional[Callable] = None) -> Dict[Hashable, dict]:
    """Validate every config, pretrain each (prior, D, seed)'s model once, then every run (read_run's summaries)."""
    for cfg in jobs.values():
        toy_diagnostics.validate(cfg)
    models = {(cfg.prior, cfg.dim, cfg.seed): cfg for cfg in jobs.values()}
    return run_pool(functools.partial(toy_run, threshold=threshold, reuse=reuse), jobs, workers, order=order,
                    warmup=toy_pretrain, warmup_items=models.values(), report=toy_report(name))


def toy_pretrain(cfg: toy_2d.ToyConfig) -> str:
    """Pretrain (or load) the ε-network of cfg (its seed, dim, prior), so that later runs only read the cache."""
    toy_2d.pretrain(cfg, toy_2d.build_task(cfg).prior, toy_2d.sd_scheduler(), quiet=True)
    return f"seed {cfg.seed}, D = {cfg.dim}"


def mode_entropy(weights: torch.Tensor) -> float:
    """Entropy (nats) of mode weights; 0 log 0 = 0."""
    w = weights[weights > 0]
    return max(0.0, float(-(w * w.log()).sum()))


def pretrained_entropy(cfg: toy_2d.ToyConfig, n: int = 4000) -> float:
    """Mode entropy of the pretrained sampler P_F♯ (seed cfg.seed), nearest target mean as in the TV."""
    scheduler = toy_2d.sd_scheduler()
    task = toy_2d.build_task(cfg)
    reference = toy_2d.pretrain(cfg, task.prior, scheduler, quiet=True)
    schedule = ng.ddim_schedule(scheduler, cfg.num_steps)
    x0 = toy_2d.sample(toy_2d.as_eps_fn(reference), schedule, n, torch.Generator().manual_seed(cfg.seed + 3), cfg.dim).final
    return mode_entropy(toy_2d.mode_weights(x0, task.target.means))


def toy_finished(cfg: toy_2d.ToyConfig) -> bool:
    """Whether cfg.out holds a completed toy_2d run of exactly this config."""
    out = Path(cfg.out)
    if not (out / "metrics.json").exists() or not (out / "config.json").exists():
        return False
    return json.loads((out / "config.json").read_text()) == json.loads(json.dumps(dataclasses.asdict(cfg)))


def toy_run(cfg: toy_2d.ToyConfig, threshold: float, reuse: bool = False) -> dict:
    """toy_2d.run (skipped with reuse when cfg.out already holds this exact run), then its summary."""
    if not (reuse and toy_finished(cfg)):
        toy_diagnostics.run(cfg, quiet=True)  # toy_2d.run + oracle, flow errors, cost counters
    return read_run(cfg, threshold)


def _divergence(evals: List[dict], history: List[dict], samples: torch.Tensor, final_w1: float, far: float):
    """(update where the unbroken tail of non-finite / far-flung evaluations starts or None, evals before it)."""
    def sane(w1: float) -> bool:
        return math.isfinite(w1) and w1 <= far

    if torch.isfinite(samples).all() and sane(final_w1):
        return None, evals
    keep = len(evals)
    while keep > 0 and not sane(evals[keep - 1]["eval_sliced_w1"]):
        keep -= 1
    return (evals[keep]["update"] if keep < len(evals) else history[-1]["update"]), evals[:keep]


def read_run(cfg: toy_2d.ToyConfig, threshold: float) -> dict:
    """The experiments' summary of one finished toy run: curve, first crossing of the threshold, entropy.

    Divergence: a run whose final samples are non-finite or flung far off the data (sliced W1 to the
    target over 10× the pretrained sampler's) diverged where the unbroken tail of such evaluations
    starts; its curve stops there and its final numbers are None (toy_2d's nearest-mode metrics
    would count NaN samples as mode 0). A transient outlier that training recovers from is not a
    divergence.
    """
    result = json.loads((Path(cfg.out) / "metrics.json").read_text())
    history, final = result["history"], result["finetuned"]
    task = toy_2d.build_task(cfg)
    samples = torch.from_numpy(np.load(Path(cfg.out) / "samples.npy"))
    evals = [h for h in history if "eval_mode_tv" in h]
    diverged_at, evals = _divergence(evals, history, samples, final["sliced_w1"], 10 * result["pretrained"]["sliced_w1"])
    curve = [(h["update"], h["eval_mode_tv"]) for h in evals]
    hit = next((h for h in evals if h["eval_mode_tv"] <= threshold), None)
    mid = cfg.updates // 5
    at_mid = next((tv for u, tv in curve if u >= mid), None) if (diverged_at is None or diverged_at > mid) else None
    ok = diverged_at is None
    return {
        "final_tv": final["mode_tv"] if ok else None,
        "final_log_reward": final["mean_log_reward"] if ok else None,
        "final_sliced_w1": final["sliced_w1"] if ok else None,
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
        "reward_calls_total": history[-1].get("reward_calls"),  # None: a run recorded before the toy counted them
        "network_vjps_total": history[-1].get("network_vjps", 0),
        "train_s": history[-1]["train_time_s"],
        "wall_s": result.get("time_s", {}).get("total"),
        "optimizer_steps_per_update": history[-1].get("optimizer_steps", 1),
        "updates": cfg.updates,
    }


def toy_row(seeds: List[dict]) -> dict:
    """The columns every toy table shares, for one variant: lists over its seeds' summaries, per-update costs of seed 0."""
    first = seeds[0]
    row = {key: [r[key] for r in seeds] for key in ("final_tv", "min_tv", "diverged_at", "updates_to_threshold", "train_s_to_threshold")}
    return {**row, "mean_log_reward": [r["final_log_reward"] for r in seeds], "exact_mean_log_reward": first["exact_mean_log_reward"],
            "network_vjps_per_update": first["network_vjps_total"] / first["updates"],
            "reward_grads_per_update": first["reward_grads_total"] / first["updates"],
            "reward_calls_per_update": None if first["reward_calls_total"] is None else first["reward_calls_total"] / first["updates"]}


def per_update_cell(value: Optional[float]) -> str:
    """A per-update count for a table; "not counted" where the run's counters did not record it."""
    return "not counted" if value is None else f"{value:.0f}"


def toy_report(name: Callable[[Hashable], str]) -> Callable[[Hashable, dict], None]:
    """A run_pool report for toy runs: "<name(key)>: final TV … | diverged at update …, train … s"."""
    def report(key, r):
        status = f"final TV {r['final_tv']:.3f}" if r["diverged_at"] is None else f"diverged at update {r['diverged_at']}"
        print(f"{name(key)}: {status}, train {r['train_s']:.0f} s", flush=True)

    return report
