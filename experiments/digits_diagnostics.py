"""What the digits comparison measures beyond `toy_digits.py`'s own metrics: the cost of each update and
the time until a run first reaches the bar.

    from experiments.digits_diagnostics import run_method   # toy_digits.run_method + the counts below

`run_method` is `toy_digits.run_method` with a `CostMeter` attached, and adds to its result
network_vjps_per_update, reward_calls_per_update, reward_grads_per_update (means over the updates),
seconds_per_update (training seconds, curve points excluded) and updates_to_bar, seconds_to_bar (the
first curve point at the bar of `progress_bar`, None if never); each history point also holds the
network_vjps, reward_calls and reward_grads of the update just taken.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import nabla_gfn as ng  # noqa: E402
import toy_digits as td  # noqa: E402


class CostMeter:
    """Counts, per update, the rows backpropagated through the ε-network and the rows the reward scores.

    "Network VJPs": rows of every backward pass through the denoiser (policy with adapters on, or
    the reference with them off; a graph backpropagated twice counts twice), via a full backward
    hook. "Reward calls": rows passed to r during the update, with or without a graph (the methods'
    logging score of the batch included: the code makes that call). "Reward gradients": rows whose
    reward input receives a gradient, via a tensor hook (each is also a reward call). Policy-gradient
    methods call r without ∇r, so reward gradients alone would show them as free of reward cost.
    Sampling and evaluation do not go through the wrapped reward or the counted backward and are not counted.
    """

    def __init__(self):
        self.network_vjps = 0
        self.reward_calls = 0
        self.reward_grads = 0

    def attach(self, model: nn.Module, log_reward: ng.LogRewardFn) -> ng.LogRewardFn:
        """Count the backward passes through `model`; return `log_reward` wrapped to count its gradients."""
        # the hook also fires when only the parameters (LoRA), not the input, need a gradient: wanted
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to module outputs")
        model.register_full_backward_hook(self._on_network_backward)

        def counted(x0: Tensor, traj: Tensor) -> Tensor:
            self.reward_calls += int(x0.shape[0])
            if x0.requires_grad and torch.is_grad_enabled():
                x0.register_hook(self._on_reward_backward)
            return log_reward(x0, traj)

        return counted

    def _on_network_backward(self, module, grad_input, grad_output) -> None:
        self.network_vjps += int(grad_output[0].shape[0])

    def _on_reward_backward(self, grad: Tensor) -> None:
        self.reward_grads += int(grad.shape[0])

    def take(self) -> Dict[str, int]:
        """The counts since the last call, then reset."""
        counts = {"network_vjps": self.network_vjps, "reward_calls": self.reward_calls, "reward_grads": self.reward_grads}
        self.network_vjps = self.reward_calls = self.reward_grads = 0
        return counts


def progress_bar(setup: td.Setup) -> Tuple[str, float]:
    """The level a curve must reach: frac ≥ the reference's − 0.1 (class:K); for ink, mean reward half
    of the way from the pretrained model's to the reference's (the whole gap is ~1.8, a 256-sample
    curve point is uncertain by ~0.3). Returns (metric key, threshold)."""
    ref, pre = setup.metrics["reference"], setup.metrics["pretrained"]
    if "frac_class" in ref:
        return "frac_class", ref["frac_class"] - 0.1
    return "mean_reward", ref["mean_reward"] - 0.5 * (ref["mean_reward"] - pre["mean_reward"])


def run_method(setup: td.Setup, method: str, progress: bool = True) -> Tuple[Dict, Tensor, List[Dict]]:
    """`toy_digits.run_method` with the costs counted; returns (final metrics + costs and time to the bar,
    eval samples, history with each point's costs)."""
    result, x, history = td.run_method(setup, method, progress, meter=CostMeter())
    result["network_vjps_per_update"] = float(np.mean([h["network_vjps"] for h in history[1:]]))
    result["reward_calls_per_update"] = float(np.mean([h["reward_calls"] for h in history[1:]]))
    result["reward_grads_per_update"] = float(np.mean([h["reward_grads"] for h in history[1:]]))
    result["seconds_per_update"] = history[-1]["seconds"] / history[-1]["update"]
    key, threshold = progress_bar(setup)
    hit = next((h for h in history if h[key] >= threshold), None)
    result["updates_to_bar"] = None if hit is None else hit["update"]
    result["seconds_to_bar"] = None if hit is None else hit["seconds"]
    return result, x, history
