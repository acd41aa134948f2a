"""The experiments' shared runner (experiments/runner.py) and the parts of the experiments that need no training.

Oracles: numpy's sample std (ddof 1) for mean ± std, hand-written markdown for the table writer,
the files a docs page links to, and compare_digits' table rebuilt from fabricated run records. The
toy experiments run end to end in tests/test_toy_baselines.py (compare_toy --quick) and
tests/test_toy_dim.py (toy_dim_sweep --quick); toy_ablation --quick runs here (≈ 15 s).
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

import toy_digits as td
from experiments import compare_digits, runner

ROOT = Path(__file__).resolve().parents[1]


def test_mean_std_is_the_sample_std_over_the_seeds_that_have_a_value():
    values = [0.1, 0.4, None, 0.25]
    mean, std = np.mean([0.1, 0.4, 0.25]), np.std([0.1, 0.4, 0.25], ddof=1)
    assert runner.mean_std(values, ".4f") == f"{mean:.4f} ± {std:.4f}"
    assert runner.mean_std([0.1234], ".2f") == "0.12"  # one seed: no ± 0
    assert runner.mean_std([None, None], ".2f") == "—"
    assert runner.mean_std([3.0, 3.0], ".1f") == "3.0 ± 0.0"


def test_reached_and_diverged_cells():
    assert runner.median_reached([10, 30, 20], ".0f") == "20"
    assert runner.median_reached([10, None, 30], ".0f") == "20 (2/3)"
    assert runner.median_reached([None, None], ".0f") == "not reached (0/2)"
    assert runner.diverged_cell([None, 195, None, 40]) == "2/4 (at update 40, 195)"
    assert runner.diverged_cell([None, None]) == "—"


def test_markdown_table_writes_header_rule_and_rows():
    table = runner.markdown_table(["method", "TV", "n"], [["a", "0.1", 3], ["b", "", ""]])
    assert table == "| method | TV | n |\n|---|---|---|\n| a | 0.1 | 3 |\n| b |  |  |\n"


def test_write_outputs_writes_docs_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "DOCS", tmp_path / "docs")

    def figure(path):
        path.write_bytes(b"png")

    table = runner.markdown_table(["a"], [["1"]])
    runner.write_outputs("toy_thing", "A title", tmp_path / "out", table, figure, "python experiments/toy_thing.py", docs=False,
                         summary={"x": 1})
    assert (tmp_path / "out" / "table.md").read_text() == table
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert saved["x"] == 1 and set(saved["git"]) == {"commit", "changed"}
    assert (tmp_path / "out" / "toy_thing.png").read_bytes() == b"png"
    assert not (tmp_path / "docs").exists()

    runner.write_outputs("toy_thing", "A title", tmp_path / "out", table, figure, "python experiments/toy_thing.py --docs",
                         docs=True, timing="wall 1.0 min")
    page = (tmp_path / "docs" / "results" / "toy_thing.md").read_text()
    assert page.startswith("# A title\n") and table in page
    assert "Produced by `python experiments/toy_thing.py --docs` (wall 1.0 min):" in page
    assert "![toy_thing](../figures/toy_thing.png)" in page and "Git state: commit `" in page
    assert (tmp_path / "docs" / "figures" / "toy_thing.png").read_bytes() == b"png"


def test_command_line_leaves_out_reuse():
    assert runner.command_line("compare_toy", ["--docs", "--reuse", "--seeds", "5"]) == "python experiments/compare_toy.py --docs --seeds 5"


def test_every_relative_link_of_the_results_pages_resolves():
    pages = sorted((ROOT / "docs" / "results").glob("*.md"))
    assert {p.stem for p in pages} >= {"compare_toy", "toy_dim_sweep", "compare_digits"}
    for page in pages:
        for link in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" not in link:
                assert (page.parent / link).resolve().exists(), (page.name, link)


def _digits_record(row, method, seed, reward, frac):
    cfg = dataclasses.asdict(td.Config(reward=reward, beta=1.0, seed=seed, method=method, updates=40, curve_every=20))
    metrics = {"mean_reward": -1.0 + frac, "diversity_l2": 2.0, "distinct_nearest_digits": 150.0, "frechet_to_reference": 10.0 * seed,
               "frac_class": frac}
    result = {**metrics, "diversity_ratio": 1.0, "updates_to_bar": 20 if frac > 0.5 else None, "seconds_to_bar": 5.0,
              "network_vjps_per_update": 100.0, "reward_calls_per_update": 36.0, "reward_grads_per_update": 32.0,
              "seconds_per_update": 0.2 * (1 + seed), "diverged": False}
    history = [{"update": u, "frac_class": frac * u / 40, "mean_reward": -1.0} for u in (0, 20, 40)]
    return {"row": row, "config": cfg, "result": result, "history": history,
            "reference": {**metrics, "frechet_to_reference": 0.0}, "pretrained": metrics}


def test_compare_digits_table_only_rebuilds_the_table_from_records(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "DOCS", tmp_path / "docs")
    rows = compare_digits.ROWS[:2]
    for row, method, _ in rows:
        for seed, frac in ((0, 0.6), (1, 0.8)):
            path = tmp_path / "runs" / runner.slug("class:3") / runner.slug(row) / f"seed{seed}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_digits_record(row, method, seed, "class:3", frac)))
    compare_digits.main(["--table-only", "--docs", "--out", str(tmp_path), "--updates", "40", "--curve-every", "20"])
    table = (tmp_path / "table.md").read_text()
    frac = f"{np.mean([0.6, 0.8]):.2f} ± {np.std([0.6, 0.8], ddof=1):.2f}"
    for row, _, _ in rows:
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        assert f"| 2 | {frac} |" in line and "| 0/2 |" in line
        # costs: VJPs, reward calls, ∇r per update, then seconds per update (mean ± std over the seeds)
        assert f"| 100 | 36 | 32 | 0.30 ± 0.14 | 0/2 |" in line
    assert "**ink**" not in table  # no ink records: no ink table
    assert (tmp_path / "compare_digits.png").stat().st_size > 10_000
    page = (tmp_path / "docs" / "results" / "compare_digits.md").read_text()
    assert "python experiments/compare_digits.py --table-only --docs" in page and table in page


def test_toy_ablation_quick_writes_its_table_and_figure(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_ablation.py"), "--quick", "--jobs", "1",
                          "--out", str(tmp_path / "abl"), "--cache-dir", str(tmp_path / "cache")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "abl" / "table.md").read_text()
    summary = json.loads((tmp_path / "abl" / "table.json").read_text())
    assert list(summary["runs"]) == ["default (adjoint, kl, guess from reference)", "flow target bootstrap"]
    for name, run in summary["runs"].items():
        assert f"| {name} | **{run['final_tv']:.3f}** |" in table and 0 <= run["final_tv"] <= 1
    assert json.loads((tmp_path / "abl" / "runs" / "flow-target-bootstrap" / "config.json").read_text())["flow_target"] == "bootstrap"
    assert (tmp_path / "abl" / "toy_ablation.png").stat().st_size > 5_000
    assert not (tmp_path / "docs").exists()
