"""Where the learned flow's bias sits: per step, θ's target against the exact ∇ log F̃, with and without
the control variate (nabla_gfn.antithetic_target), on the toy's exact tasks.

    python experiments/flow_bias.py --docs     # 2 tasks × {control variate on, off}, seed 0 (~4 min on 2 cores)
    python experiments/flow_bias.py --quick    # tiny budget (seconds; the test)

Each run is experiments/toy_diagnostics.py at toy_2d's defaults (± --no-control-variate); its
`flow_relative_error` holds, per step on 500 of the finetuned policy's evaluation paths, the relative
error ‖· − exact‖/‖exact‖ (spread: the one-sample noise and the bias) and the projection
Σ⟨·, exact⟩/Σ‖exact‖² (1 = unbiased on average) of guess + g_φ, the lean adjoint a_i and θ's
control-variate target. Writes <out>/flow_bias.{png,md,json} (--docs: docs/figures, docs/results).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import toy_2d as T  # noqa: E402
from experiments import toy_diagnostics as D  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = {  # docs/toy_2d.md's names
    "F: 2 modes / linear": ["--prior", '{"means": [[-2, 0], [2, 0]], "weights": [0.7, 0.3], "std": 0.4}',
                            "--reward", '{"type": "linear", "w": [0.5, 0]}'],
    "A: ring8 / bump": ["--prior", "ring8", "--reward", "bump"],
}
CURVES = (("guess_plus_flow", "guess + g_φ at x_i", "C0"), ("adjoint_target", "lean adjoint a_i", "C3"),
          ("control_variate_target", "a_i − ½[h(x_i) − h(x̃_i)]", "C2"))


def run_all(out: Path, quick: bool, tasks: str = "FA") -> dict:
    """{task: {"on"/"off": (final mode TV, flow_relative_error)}}, one toy_diagnostics run each."""
    budget = ["--updates", "2", "--eval-samples", "600", "--num-steps", "6"] if quick else []
    results = {}
    for task, args in ((t, a) for t, a in TASKS.items() if t[0] in tasks):
        for key, flag in (("on", []), ("off", ["--no-control-variate"])):
            name = f"{task.split(':')[0]}_{key}"
            cfg = D.validate(T.parse_args([*args, *budget, *flag, "--no-figure", "--out", str(out / "runs" / name)], D.METHOD_NAMES))
            result = D.run(cfg, quiet=True)
            last = json.loads((Path(result["out"]) / "metrics.json").read_text())["history"][-1]
            cost = {k: last[k] / cfg.updates for k in ("reward_grad_calls", "network_vjps")}  # per update
            results.setdefault(task, {})[key] = (result["finetuned"]["mode_tv"], result["flow_relative_error"], cost)
    return results


def figure(results: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2 * len(results), figsize=(4.4 * 2 * len(results), 7.2), squeeze=False)
    for col, (task, runs) in enumerate((t, r) for t, rs in results.items() for r in rs.items()):
        (key, (tv, err, _)), task = runs, task
        for row, prefix in enumerate(("projection_", "")):
            ax = axes[row, col]
            for curve, label, color in CURVES:
                if key == "off" and curve == "control_variate_target":
                    continue
                ax.plot(np.array(err[prefix + curve], dtype=float), c=color, label=label)
            ax.axhline(1.0, c="gray", ls=":")
            ax.set_xlabel("step (0 = noise)")
            ax.set_ylabel("projection on exact ∇log F̃" if row == 0 else "relative error to exact ∇log F̃")
            ax.set_title(f"{task}\ncontrol variate {key}: θ fits {'the green' if key == 'on' else 'the blue'} target, TV {tv:.3f}")
            if row == 1:
                ax.set_yscale("log")
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def table(results: dict) -> str:
    lines = ["| task | control variate | final TV | ∇r / network VJPs per update | target | projection at steps 1, 10, 20, 30, 40, 49 "
             "| relative error at the same steps |", "|---|---|---|---|---|---|---|"]
    for task, runs in results.items():
        for key, (tv, err, cost) in runs.items():
            for curve, label, _ in CURVES:
                if key == "off" and curve == "control_variate_target":
                    continue
                pick = lambda v: ", ".join(f"{v[i]:.2f}" for i in (1, 10, 20, 30, 40, 49) if i < len(v))
                lines.append(f"| {task} | {key} | {tv:.3f} | {cost['reward_grad_calls']:.0f} / {cost['network_vjps']:.0f} | {label} "
                             f"| {pick(err['projection_' + curve])} | {pick(err[curve])} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", action="store_true", help="write into docs/figures and docs/results")
    parser.add_argument("--quick", action="store_true", help="tiny budget (the test)")
    parser.add_argument("--tasks", default="FA", help="letters of the tasks to run (F, A)")
    parser.add_argument("--out", default="runs/flow_bias")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(out, args.quick, args.tasks)
    figures, docs = (ROOT / "docs" / "figures", ROOT / "docs" / "results") if args.docs else (out, out)
    figure(results, figures / "flow_bias.png")
    header = ("# Where the learned flow's bias sits: θ's target against the exact flow, per step\n\n"
              "Generated by [`experiments/flow_bias.py`](../../experiments/flow_bias.py) (`--docs`), seed 0, "
              "toy_2d's defaults; 500 evaluation paths of the finetuned policy per run.\n\n"
              "![flow_bias](../figures/flow_bias.png)\n\n")
    (docs / "flow_bias.md").write_text(header + table(results) + "\n")
    (out / "flow_bias.json").write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
