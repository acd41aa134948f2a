"""Crash-safe run folder of sd_finetune.py: checkpoints that resume exactly, and the logs beside them.

A checkpoint folder holds the LoRA in diffusers' format (so `pipe.load_lora_weights(folder)` works),
g_φ (`flow/`, diffusers' save_pretrained) and `training_state.pt` (optimiser, every process's RNG
states, epoch and update), written last. It is staged in `.partial-NAME` and renamed into place only
when complete: a run killed at any moment leaves either the old checkpoint or the new one, and
`complete_checkpoints` ignores folders without the training state. Logs are JSON lines; on resume
each is truncated to what the checkpoint covers, so the resumed run writes them as if never stopped.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft, make_image_grid
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor, nn

from cli import UsageError

COMPLETE_MARKER = "training_state.pt"  # written last: a checkpoint folder without it is incomplete


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------


def lora_format(denoiser: nn.Module) -> Tuple[type, str]:
    """(pipeline class whose save_lora_weights / lora_state_dict write and read the LoRA, its key prefix)."""
    if isinstance(denoiser, SD3Transformer2DModel):
        return StableDiffusion3Pipeline, "transformer"
    return StableDiffusionPipeline, "unet"


def lora_state_dict(denoiser: nn.Module) -> dict:
    """The adapter's weights in the key format its pipeline's load_lora_weights reads: SD's UNet the diffusers
    names (lora.down / lora.up), SD3's transformer peft's own (lora_A / lora_B), as diffusers' SD3 LoRA
    training script saves them (SD's conversion would rename only some of SD3's layers)."""
    state = get_peft_model_state_dict(denoiser)
    return state if isinstance(denoiser, SD3Transformer2DModel) else convert_state_dict_to_diffusers(state)


def rng_state(generators: Sequence[torch.Generator]) -> dict:
    return {"generators": [g.get_state() for g in generators], "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict, generators: Sequence[torch.Generator]) -> None:
    for g, s in zip(generators, state["generators"]):
        g.set_state(s)
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, models, optimizer, generators, epoch: int, update: int,
                    accelerator: Accelerator) -> Path:
    """LoRA in diffusers format (pipe.load_lora_weights(path) works), g_φ, optimiser, per-process RNG
    states and the step. Written by the main process; every process must call it."""
    rng = gather_object([rng_state(generators)])
    if accelerator.is_main_process:
        # Crash safety: everything goes into a hidden temporary folder, which is renamed into place only
        # once complete; a run killed mid-save leaves only the temporary folder, which --resume ignores.
        partial = path.parent / f".partial-{path.name}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        pipeline, prefix = lora_format(models.unet)
        pipeline.save_lora_weights(partial, **{f"{prefix}_lora_layers": lora_state_dict(models.unet),
                                               f"{prefix}_lora_adapter_metadata": models.lora.to_dict()})
        if models.flow is not None:
            models.flow.save_pretrained(partial / "flow")
        torch.save({"epoch": epoch, "update": update, "optimizer": optimizer.state_dict(), "rng": rng,
                    "num_processes": accelerator.num_processes}, partial / COMPLETE_MARKER)
        _replace_folder(partial, path)
    accelerator.wait_for_everyone()
    return path


def _replace_folder(source: Path, target: Path) -> None:
    """Rename `source` to `target`; an existing `target` is moved aside first and deleted after."""
    old = target.parent / f".old-{target.name}"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    source.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the last `keep` complete epoch checkpoints (keep = 0: delete none)."""
    if keep > 0:
        for path in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(path)


def load_lora(unet: nn.Module, path: Path) -> None:
    """Load a checkpoint's diffusers-format LoRA into the peft adapter of `unet` (SD3: the transformer; exact copy)."""
    pipeline, prefix = lora_format(unet)
    state = pipeline.lora_state_dict(str(path), return_lora_metadata=True)[0]
    unet_state = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state))
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{path}: LoRA keys do not match the model: {result.unexpected_keys[:3]} ...")


def load_checkpoint(path: Path, models, optimizer, generators, accelerator: Accelerator) -> Tuple[int, int]:
    """Restore what save_checkpoint wrote; returns (epochs done, updates done)."""
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    if state["num_processes"] != accelerator.num_processes:
        raise UsageError(f"--resume: the run used {state['num_processes']} processes; resume it with the same number")
    load_lora(models.unet, path)
    if models.flow is not None:
        models.flow.load_state_dict(UNet2DConditionModel.from_pretrained(path / "flow").state_dict())
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][accelerator.process_index], generators)
    return state["epoch"], state["update"]


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """The epoch checkpoints of a run that were completely written, oldest first. Temporary folders
    (`.partial-*`) and folders without the training state (written in place by an older version and
    cut short) are not checkpoints."""
    found = [p for p in (run_dir / "checkpoints").glob("epoch_*") if re.fullmatch(r"epoch_\d+", p.name)]
    return sorted((p for p in found if (p / COMPLETE_MARKER).is_file()), key=lambda p: int(p.name[6:]))


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------
# Logs and sample grids (written by the main process only)
# ----------------------------------------------------------------------------------------------


class RunFolder:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write_json(self, name: str, obj) -> None:
        """Write to a temporary file, then rename: a killed run leaves the old file or the new one."""
        if self.enabled:
            partial = self.path / f".partial-{name}"
            partial.write_text(json.dumps(obj, indent=2) + "\n")
            partial.replace(self.path / name)

    def append(self, name: str, records: Sequence[dict]) -> None:
        if self.enabled:
            with open(self.path / name, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    def truncate(self, name: str, key: str, done: int) -> None:
        """Keep the lines of a .jsonl log with record[key] <= done: drop what a killed run logged after the
        checkpoint it resumes from (and a last line cut short by the kill)."""
        log = self.path / name
        if self.enabled and log.exists():
            kept = [line for line in log.read_text().splitlines() if _jsonl_value(line, key, done + 1) <= done]
            partial = self.path / f".partial-{name}"
            partial.write_text("".join(line + "\n" for line in kept))
            partial.replace(log)

    def save_grid(self, name: str, images: Tensor, pipe: StableDiffusionPipeline) -> None:
        """images (rows, cols, 3, H, W) in [-1, 1] → one PNG."""
        if self.enabled:
            rows, cols = images.shape[:2]
            pil = pipe.image_processor.postprocess(images.flatten(0, 1).float().cpu(), output_type="pil")
            (self.path / "samples").mkdir(exist_ok=True)
            make_image_grid(pil, rows, cols).save(self.path / "samples" / name)


def _jsonl_value(line: str, key: str, default: int) -> int:
    try:
        return json.loads(line)[key]
    except (json.JSONDecodeError, KeyError, TypeError):
        return default
