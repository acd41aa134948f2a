"""The toy's tuning table: ∇-GFlowNet variants and tasks, each against its exact target.

    python benchmarks/toy_ablation.py            # all rows (~7 min on 2 idle CPU cores)
    python benchmarks/toy_ablation.py --rows 2   # first rows only

Every row is one `toy_2d.py` run (same seed, same cached pretrained model per prior); the table
printed at the end (markdown) is the one in the README. Runs go to runs/toy_ablation/<name>/.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import toy_2d  # noqa: E402

ROWS = [
    # (name, overrides of the ToyConfig defaults); one seed: a quick look, not a 3-seed result
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=len(ROWS), help="run the first N rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = ["| run | mode TV finetuned | pretrained | oracle | mean log r (exact) | sliced W1 | wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, overrides in ROWS[: args.rows]:
        slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
        cfg = toy_2d.ToyConfig(**overrides, out=f"runs/toy_ablation/{slug}", no_figure=True)
        r = toy_2d.run(cfg, quiet=True)
        fin = r["finetuned"]
        lines.append(f"| {name} | **{fin['mode_tv']:.3f}** | {r['pretrained']['mode_tv']:.3f} | {r['oracle']['mode_tv']:.3f} "
                     f"| {fin['mean_log_reward']:.2f} ({fin['exact_mean_log_reward']:.2f}) | {fin['sliced_w1']:.3f} "
                     f"| {r['time_s']['total']:.0f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    Path("runs/toy_ablation").mkdir(parents=True, exist_ok=True)
    Path("runs/toy_ablation/table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
