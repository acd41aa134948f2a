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


@pytest.fixture(scope="module")
def small():
    """The toy's small test setup (6 steps, batch 8, width 16): schedule, frozen reference, config, task."""
    import nabla_gfn as ng
    import toy_2d as T

    schedule = ng.ddim_schedule(T.sd_scheduler(), 6)
    torch.manual_seed(0)
    reference = T.TimeMLP(hidden=16).requires_grad_(False).eval()
    cfg = T.ToyConfig(batch_size=8, num_steps=6, hidden=16, flow_hidden=16, eval_every=100)
    return schedule, reference, cfg, T.build_task(cfg)


def shuffled_transitions(models, cfg, prompts, seed=0):
    """Every transition of len(prompts) sampled trajectories, rows shuffled across trajectories."""
    import nabla_gfn
    import sd_finetune as sd

    generator = torch.Generator().manual_seed(seed)
    schedule = nabla_gfn.ddim_schedule(models.pipe.scheduler, cfg.steps)
    cond = sd.encode_prompts(models.pipe, prompts)
    trajectory = sd.sample_trajectories(models, schedule, cond, cfg, generator)
    steps = nabla_gfn.subsample_steps(cfg.steps, 1.0, len(prompts), generator)
    batch = nabla_gfn.gather_transitions(trajectory, schedule, steps)
    return batch.select(torch.randperm(len(batch), generator=generator)), cond


def assert_lora_moves_unet(cache, lora_dir) -> None:
    """lora_dir is a plain diffusers LoRA folder: the tiny SD pipeline's pipe.load_lora_weights(lora_dir) loads it
    and changes the UNet's output (its B matrices start at zero, so any trained LoRA moves it)."""
    import copy

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(Path(cache) / "tiny-v1" / "pipeline")
    before = copy.deepcopy(pipe.unet)
    pipe.load_lora_weights(lora_dir)
    x, t, context = torch.randn(1, 4, 4, 4), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert (pipe.unet(x, t, encoder_hidden_states=context).sample
                - before(x, t, encoder_hidden_states=context).sample).abs().max() > 0
