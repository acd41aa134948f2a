"""The SD benchmarks' reduced modes on the tiny pipeline (CPU): numerics, transition cost, GPU check."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_sd_numerics  # noqa: E402
import sd_finetune as sd  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    sd.tiny_assets(str(folder))
    return folder


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
