"""Tests of toy_2d.py --dim D: D = 2 keeps the original networks, bad values, a D = 8 run, the D-sweep.
The D-dimensional tilted GMM, its scores and flow: tests/test_gmm.py.

    pytest -x -q tests/test_toy_dim.py     # ≈ 1 min on one core
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import toy_2d as T

ROOT = Path(__file__).resolve().parents[1]


def test_dim2_keeps_the_original_2d_networks():
    assert T.network_width(T.ToyConfig.hidden, 2) == T.ToyConfig.hidden and T.make_flow(T.ToyConfig()).net[0].in_features == 18


# ----------------------------------------------------------------------------------------------
# CLI: bad values, an end-to-end run at D = 8
# ----------------------------------------------------------------------------------------------


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "toy_2d.py"), *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--dim", "1"], "--dim: must be an integer ≥ 2"),
        (["--dim", "-4"], "--dim: must be an integer ≥ 2"),
        (["--dim", "eight"], "argument --dim: invalid int value"),
        (["--dim", "3", "--reward", '{"type": "linear", "w": [1, 2, 3, 4]}'], "--reward: center / w must have 1 … 3 coordinates"),
        (["--dim", "8", "--prior", '{"means": [[0, 0, 1]], "std": 1}'], "--prior: means must be K×2 (or K×8 for --dim 8)"),
    ],
)
def test_bad_dim_values_give_one_line_errors(args, needle):
    out = run_cli(*args, "--updates", "1")
    assert out.returncode != 0
    assert needle in out.stderr
    assert "Traceback" not in out.stderr
    assert len([line for line in out.stderr.splitlines() if line.startswith(("error", "toy_2d.py: error"))]) == 1


def test_end_to_end_tiny_run_at_d8(tmp_path):
    out = run_cli("--dim", "8", "--updates", "4", "--batch-size", "16", "--num-steps", "10", "--pretrain-iters", "100",
                  "--eval-samples", "300", "--eval-every", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.load(tmp_path / "run" / "samples.npy").shape == (300, 8)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dim"] == 8
    for key in ("finetuned", "pretrained"):  # the oracle and flow errors: tests/test_toy_diagnostics.py
        assert 0 <= metrics[key]["mode_tv"] <= 1 and math.isfinite(metrics[key]["sliced_w1"])
    assert len(metrics["history"]) == 4 and [h["update"] for h in metrics["history"] if "eval_mode_tv" in h] == [1, 2, 4]
    assert (tmp_path / "run" / "figure.png").stat().st_size > 10_000


def test_dim_sweep_quick_writes_its_table_and_figure(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "toy_dim_sweep.py"), "--quick", "--jobs", "1",
                          "--out", str(tmp_path / "sweep"), "--cache-dir", str(tmp_path / "cache")],
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "sweep" / "table.md").read_text()
    for dim in (2, 3):
        for label in ("∇-GFlowNet", "Adjoint Matching", "RTB", "DDPO", "GRPO", "KL-PG"):
            assert any(line.startswith(f"| {dim} | {label}") for line in table.splitlines()), (dim, label)
    assert "| r calls / update | ∇r / update |" in table  # cost columns: reward calls beside reward gradients
    summary = json.loads((tmp_path / "sweep" / "table.json").read_text())
    assert {r["dim"] for r in summary["rows"]} == {2, 3} and all(len(r["final_tv"]) == 1 for r in summary["rows"])
    assert json.loads((tmp_path / "sweep" / "runs" / "d3" / "rtb" / "seed0" / "config.json").read_text())["dim"] == 3
    assert (tmp_path / "sweep" / "toy_dim_sweep.png").stat().st_size > 10_000


def test_held_crossing_is_the_start_of_the_final_run_below_the_threshold(tmp_path):
    from experiments import toy_dim_sweep

    history = [{"update": u, "train_time_s": 0.5 * u} for u in range(1, 61)]
    (tmp_path / "metrics.json").write_text(json.dumps({"history": history}))
    cfg = T.ToyConfig(out=str(tmp_path), updates=60)
    run = {"diverged_at": None, "curve": [(10, 0.3), (20, 0.05), (30, 0.2), (40, 0.09), (50, 0.1), (60, 0.08)]}
    assert toy_dim_sweep.held_crossing(cfg, run, 0.1) == (40, 20.0)  # the swing at update 20 does not count
    assert toy_dim_sweep.held_crossing(cfg, {**run, "curve": run["curve"][:3]}, 0.1) == (None, None)  # ends above
    assert toy_dim_sweep.held_crossing(cfg, {**run, "diverged_at": 60}, 0.1) == (None, None)
