"""Test setup: offline Hugging Face hub, and the repository root importable from any cwd."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = str(Path(__file__).resolve().parents[1])
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run faster on one thread, and results are bitwise reproducible across runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd_cache(tmp_path_factory):
    """A private cache holding the tiny SD pipeline, CLIP and aesthetic head, built once per session."""
    import tiny_models

    folder = tmp_path_factory.mktemp("sd-cache")
    tiny_models.tiny_assets(str(folder))
    return folder
