"""The rectified-flow toy (`toy_2d.py --model flow`) over seeds, tasks and noise levels, with the exact start bias.

    python experiments/flow_matching.py --docs     # 36 runs (~20 min on one idle core): docs/results/flow_matching.md
    python experiments/flow_matching.py --quick    # tiny budget (seconds; the test)

Every run is `toy_2d.run` (with the diagnostics' oracle) at toy_2d.py's defaults and `--model flow`, seeds 0–2,
with the default method (nabla-db) and with adjoint matching (no learned flow: the policy fits the lean adjoint):
  * tasks: ring8/bump (the default), grid25/bump and ring8/linear at the default noise level;
  * noise levels a ∈ {0.3, 0.7, 1.0, √2} on ring8/bump, each with the exact bias of the untilted start
    (`untilted_start_bias`: the pretrained chain with the prior's exact velocity, tilted exactly by
    nested importance sampling, started from N(0, I) or from its own tilted start).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nabla_gfn as ng  # noqa: E402
import toy_2d  # noqa: E402
from experiments import runner, toy_diagnostics  # noqa: E402
from toy_models import make_sampler  # noqa: E402

SEEDS = (0, 1, 2)
TASKS = (("ring8", "bump"), ("grid25", "bump"), ("ring8", "linear"))
NOISE_LEVELS = (0.3, 0.7, 1.0, math.sqrt(2))
METHODS = ("nabla-db", "adjoint-matching")


def untilted_start_bias(cfg: toy_2d.ToyConfig, starts: int = 4000, inner: int = 128, seed: int = 0) -> dict:
    """Mode TVs of the exactly tilted pretrained chain (the prior's exact velocity, the flow SDE at cfg.noise_level).

    From each of `starts` x_1 ~ N(0, I), `inner` continuations x_0 with weights R(x_0)^β. Normalised per start
    (E[· R^β | x_1] / F̃(x_1)) they give the tilted chain started from N(0, I): what finetuning converges to;
    normalised over all, the tilted chain from its tilted start p(x_1) F̃(x_1) / Z: the chain's own exact target.
    Returns {"untilted_start": TV to the target, "tilted_start": TV to the target, "start_bias": TV between them}.
    """
    task = toy_2d.build_task(cfg)
    _, schedule = make_sampler("flow", cfg.num_steps, cfg.noise_level)
    model, gen = toy_diagnostics.analytic_velocity(task.prior), torch.Generator().manual_seed(seed)
    K = len(task.target.weights)
    per_start, joint, joint_norm = torch.zeros(K, dtype=torch.float64), torch.zeros(K, dtype=torch.float64), 0.0
    for chunk in range(0, starts, 500):
        n = min(500, starts - chunk)
        x_1 = torch.randn(n, task.dim, generator=gen, dtype=torch.float64).repeat_interleave(inner, 0)
        x_0 = ng.sample_trajectory(model, schedule, x_1, gen).final
        log_w = (task.beta * task.reward(x_0)).view(n, inner)
        modes = torch.nn.functional.one_hot(torch.cdist(x_0, task.target.means).argmin(1), K).double().view(n, inner, K)
        per_start += (log_w.softmax(1)[..., None] * modes).sum((0, 1))
        w = log_w.exp()
        joint, joint_norm = joint + (w[..., None] * modes).sum((0, 1)), joint_norm + float(w.sum())
    untilted, tilted = per_start / starts, joint / joint_norm
    tv = lambda p, q: 0.5 * float((p - q).abs().sum())
    return {"untilted_start": tv(untilted, task.target.weights), "tilted_start": tv(tilted, task.target.weights),
            "start_bias": tv(untilted, tilted)}


def main(argv=None):
    parser = runner.toy_parser("flow_matching", __doc__, "tiny budget, one seed, two noise levels")
    args = parser.parse_args(argv)
    quick = dict(updates=4, batch_size=16, num_steps=10, pretrain_iters=100, eval_samples=300, eval_every=2) if args.quick else {}
    seeds, levels = ((0,), NOISE_LEVELS[-2:]) if args.quick else (SEEDS, NOISE_LEVELS)
    out = Path(args.out)
    variants = {(prior, reward, math.sqrt(2)) for prior, reward in TASKS} | {("ring8", "bump", a) for a in levels}
    suffix = lambda method: "" if method == METHODS[0] else f"_{method}"
    jobs = {(p, r, a, m, s): toy_2d.ToyConfig(model="flow", prior=p, reward=r, noise_level=a, seed=s, method=m, no_figure=True,
                                               cache_dir=args.cache_dir, out=str(out / "runs" / f"{p}_{r}_a{a:.2f}_s{s}{suffix(m)}"), **quick)
            for p, r, a in sorted(variants) for m in METHODS for s in seeds}
    name = lambda key: f"{key[0]}/{key[1]} a={key[2]:.2f} {key[3]} seed {key[4]}"
    results = runner.run_toy(jobs, 0.1, args.reuse, args.jobs, name)
    per = lambda key, *v: [results[(*v, s)][key] for s in seeds]
    tvs = lambda *v: [runner.mean_std(per("final_tv", *v), ".3f"), " / ".join(f"{x:.3f}" for x in per("final_tv", *v))]
    oracle = lambda *v: runner.mean_std([results[(*v, s)]["oracle"]["mode_tv"] for s in seeds], ".3f")
    tasks = runner.markdown_table(
        ["task (a = √2)", "method", "final mode TV", "per seed", "oracle TV", "pretrained TV", "slowest run (s)"],
        [[f"{p}/{r}", m, *tvs(p, r, math.sqrt(2), m), oracle(p, r, math.sqrt(2), m),
          f"{results[(p, r, math.sqrt(2), m, seeds[0])]['pretrained']['mode_tv']:.2f}",
          f"{max(per('wall_s', p, r, math.sqrt(2), m)):.0f}"] for p, r in TASKS for m in METHODS])
    rows = []
    for a in levels:
        bias = untilted_start_bias(dataclasses.replace(jobs[("ring8", "bump", a, METHODS[0], seeds[0])], num_steps=50),
                                   300 if args.quick else 4000)
        rows.append([f"{a:.2f}" + (" (√2, memoryless)" if a == math.sqrt(2) else ""),
                     *(cell for m in METHODS for cell in tvs("ring8", "bump", a, m)),
                     f"{bias['start_bias']:.3f}", f"{bias['untilted_start']:.3f}", f"{bias['tilted_start']:.3f}",
                     oracle("ring8", "bump", a, METHODS[0])])
    levels_table = runner.markdown_table(
        ["noise level a", "nabla-db TV", "per seed", "adjoint-matching TV", "per seed", "exact start bias",
         "exact chain, N(0, I) start", "exact chain, tilted start", "oracle TV (closed-form flow)"], rows)
    body = f"{tasks}\n\nring8/bump against the noise level:\n\n{levels_table}\n"
    print(body)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(body)
    if args.docs:
        runner.write_docs_page("flow_matching", "flow_matching", "Rectified flow on the toy: tasks and noise levels",
                               body, runner.command_line("flow_matching", argv))


if __name__ == "__main__":
    main()
