"""The SD benchmarks' reduced modes on the tiny pipeline (CPU): numerics, transition cost, GPU check."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_sd_numerics  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def cache(tiny_sd_cache):
    return tiny_sd_cache  # conftest.py: built once for both SD test files


def test_numerics_quick_mode(cache, tmp_path, capsys):
    """--quick: the residual is exactly 0 at init in every precision; the default (IEEE float32) stays
    within 5 % of float64 at every timestep for every target, while bf16 makes the forward residual
    mostly rounding noise (the reason for the default)."""
    result = bench_sd_numerics.main(["--quick", "--cache-dir", str(cache), "--json", str(tmp_path / "n.json")])
    assert json.loads((tmp_path / "n.json").read_text())["timesteps"][0] == 981
    assert result["init"] == {name: 0.0 for name in ("fp64", "fp32", "tf32", "bf16", "fp16")}
    for t, row in result["perturbed"].items():
        assert 0.003 < row["lora_size"] < 0.03, (t, row["lora_size"])
        assert all(row["fp32"][k] < 0.05 for k in ("forward", "reverse", "adjoint")), (t, row["fp32"])
        assert row["bf16"]["forward"] > 0.5, (t, row["bf16"])
    assert "| 1 | 0.000426 |" in capsys.readouterr().out


def test_emulated_tf32_rounds_to_ten_mantissa_bits():
    import torch

    x = torch.tensor([1.0 + 2**-10, 1.0 + 2**-11, 1.0 + 3 * 2**-11, 1.0 + 2**-12, -3.0 - 2**-9])
    expected = torch.tensor([1.0 + 2**-10, 1.0, 1.0 + 2**-9, 1.0, -3.0 - 2**-9])  # ties to even
    assert torch.equal(bench_sd_numerics.round_to_tf32(x), expected)


def test_transition_cost_composition_matches_the_real_loss(cache, capsys):
    """--measure flops on the tiny pipeline: every target's composed cost (the formula the SD-1.5 table
    uses) matches FlopCounter on the real loss, and the sweep's composition matches its real count."""
    import bench_sd_transition

    bench_sd_transition.main(["--measure", "flops", "--cache-dir", str(cache)])
    out = capsys.readouterr().out
    worst = float(out.split("max |measured − composed| = ")[1].split()[0])
    assert worst < 0.2, out
    for jacobian in ("guided", "unguided"):
        measured, composed = out.split(f"{jacobian} ")[-1].split(",")[0].split(" / ")
        assert abs(float(measured) - float(composed)) < 0.05 * float(composed), out
    assert out.count("| adjoint matching |") == 2  # guided and unguided Jacobian rows


def test_transition_cost_time_mode_runs(cache, capsys):
    import bench_sd_transition

    bench_sd_transition.main(["--repeats", "2", "--steps", "4", "--transitions", "2,4", "--cache-dir", str(cache)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "target" not in line]
    assert len(rows) == 8, out  # bootstrap, no flow; mixed, adjoint, adjoint matching × (guided, unguided)
    assert all("nan" not in r for r in rows)


def test_gpu_check_reduced_mode_writes_one_json(cache, tmp_path):
    import gpu_check

    out = tmp_path / "check.json"
    gpu_check.main(["--reduced", "--out", str(out), "--cache-dir", str(cache)])
    result = json.loads(out.read_text())
    assert set(result["precisions"]) == set(gpu_check.PRECISIONS)
    for precision in result["precisions"].values():
        assert [r["batch"] for r in precision["rows"]] == [1, 2]
        for row in precision["rows"]:
            assert set(row["targets"]) == {"bootstrap (paper)", "mixed", "adjoint", "no flow", "adjoint matching"}
            assert all(v["update_seconds"] > 0 and v["peak_memory_mib"] > 0 for v in row["targets"].values())
            assert all(v["seconds"] > 0 for v in row["sweep"].values())
    assert result["numerics"]["init"]["bf16"] == 0.0
    assert [(r["batch"], r["gradient_checkpointing"]) for r in result["memory"]["rows"]] == [(1, False), (1, True)]


def test_sd_memory_quick_mode(cache, tmp_path):
    """--quick (widths / 4, 64²): one JSON row per configuration with the documented keys, and gradient
    checkpointing holds at most 40 % of the bytes each added transition costs without it (issue 19)."""
    import sd_memory

    out = tmp_path / "m.json"
    sd_memory.main(["--quick", "--json", str(out), "--cache-dir", str(cache)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["batch"], r["gradient_checkpointing"]) for r in rows] == [(1, False), (1, True), (2, False), (2, True)]
    for r in rows:
        assert {"gradient_checkpointing", "batch", "resolution", "peak_bytes", "peak_bytes_per_transition"} <= set(r)
        assert r["resolution"] == 64 and r["peak_bytes"] > 0
        assert r["peak_bytes_per_transition"] == r["peak_bytes"] / r["batch"]
    marginal = result["marginal_bytes_per_transition"]["64"]
    assert marginal["off"] > 0 and 0 < marginal["on"] <= 0.4 * marginal["off"], marginal
