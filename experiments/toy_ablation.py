"""The toy's tuning table: ∇-GFlowNet variants and tasks, each against its exact target.

    python experiments/toy_ablation.py --docs     # all rows (~7 min on 2 idle CPU cores): docs/results/toy_ablation.md
    python experiments/toy_ablation.py --rows 2   # first rows only, outputs in --out
    python experiments/toy_ablation.py --quick    # tiny budget, first 2 rows (seconds; the test)

Every row is one `toy_2d.run` at toy_2d's defaults but for the row's overrides (same seed, same
cached pretrained model per prior): one seed, a quick look, not a 3-seed result. Runs go to
<out>/runs/<row>/, the table to <out>/table.{md,json}, the figure (final mode TV per row, with the
pretrained and oracle TV) to <out>/toy_ablation.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toy_2d  # noqa: E402
from experiments import runner  # noqa: E402

ROWS = [
    # (name, overrides of the ToyConfig defaults)
    ("default (adjoint, kl, guess from reference)", {}),
    ("flow target bootstrap", {"flow_target": "bootstrap"}),
    ("flow target mixed λ=0.5", {"flow_target": "mixed"}),
    ("guess from the policy (paper)", {"guess_from": "policy"}),
    ("weighting plain (paper)", {"weighting": "plain"}),
    ("weighting kl-shift", {"weighting": "kl-shift"}),
    ("γ = ᾱ", {"gamma": "alpha_bar"}),
    ("constant learning rate", {"lr_schedule": "constant"}),
    ("no-flow", {"method": "no-flow"}),
    ("adjoint matching", {"method": "adjoint-matching"}),
    ("exact-flow (diagnostic)", {"method": "exact-flow"}),
    ("ring8 / linear", {"reward": "linear"}),
    ("grid25 / bump", {"prior": "grid25"}),
    ("grid25 / linear", {"prior": "grid25", "reward": "linear"}),
]
QUICK = dict(updates=4, batch_size=16, num_steps=10, eval_every=2, eval_samples=200, pretrain_iters=100, pretrain_batch=128)


def parse_args(argv=None) -> argparse.Namespace:
    parser = runner.toy_parser("toy_ablation", __doc__, "tiny budget for tests: the first 2 rows, 4 updates")
    parser.add_argument("--rows", type=int, default=len(ROWS), help="run the first N rows")
    args = parser.parse_args(argv)
    if args.quick:
        args.rows = min(args.rows, 2)
    if not 1 <= args.rows <= len(ROWS) or args.jobs < 1:
        parser.error(f"--rows must be in 1 … {len(ROWS)} and --jobs ≥ 1")
    return args


def markdown_table(results: dict) -> str:
    head = ["run", "mode TV finetuned", "pretrained", "oracle", "mean log r (exact)", "sliced W1", "wall s"]
    lines = [[name, f"**{runner.mean_std([r['final_tv']], '.3f')}**", f"{r['pretrained']['mode_tv']:.3f}",
              f"{r['oracle']['mode_tv']:.3f}" if r["oracle"] else "—",
              f"{runner.mean_std([r['final_log_reward']], '.2f')} ({r['exact_mean_log_reward']:.2f})",
              runner.mean_std([r["final_sliced_w1"]], ".3f"), f"{r['wall_s']:.1f}"]
             for name, r in results.items()]
    return runner.markdown_table(head, lines) + "\nOne seed (0) per row; toy_2d's defaults but for the row's change.\n"


def make_figure(path: Path, results: dict):
    """Final mode TV per row (bars), the pretrained sampler's (×) and the exact-flow oracle's (○)."""
    plt = runner.pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(results) + 1.2))
    names = list(results)[::-1]
    ax.barh(names, [results[n]["final_tv"] or 0.0 for n in names], color="C0")
    ax.plot([results[n]["pretrained"]["mode_tv"] for n in names], names, "x", c="gray", label="pretrained P_F♯")
    ax.plot([(results[n]["oracle"] or {}).get("mode_tv", float("nan")) for n in names], names, "o", mfc="none", c="k",
            label="oracle (exact flow)")
    ax.set_xlabel("final mode-weight TV to the exact target (seed 0)"), ax.legend(fontsize=7)
    runner.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    out = Path(args.out)
    jobs = {name: toy_2d.ToyConfig(**{**overrides, **(QUICK if args.quick else {})}, out=str(out / "runs" / runner.slug(name)),
                                   cache_dir=args.cache_dir, no_figure=True)
            for name, overrides in ROWS[: args.rows]}
    results = runner.run_toy(jobs, 0.1, args.reuse, args.jobs, name=str)
    table = markdown_table(results)
    summary = {"args": vars(args), "configs": {n: dataclasses.asdict(c) for n, c in jobs.items()}, "runs": results,
               "wall_s": time.time() - start}
    figure = runner.write_outputs("toy_ablation", __doc__.split("\n")[0], out, table, lambda path: make_figure(path, results),
                                  runner.command_line("toy_ablation", argv), args.docs, summary)
    print(table)
    print(f"wall time {summary['wall_s']:.0f} s; table in {out / 'table.md'}, figure in {figure}")


if __name__ == "__main__":
    main()
