"""Parameter groups and learning-rate schedules (multipliers of the base rate, per optimizer step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Weight decay on matrices only: norms and biases (1-D) never, embeddings only if asked."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in dict.fromkeys(model.parameters()):  # tied weights appear once
        if not p.requires_grad:
            continue
        matrix = p.dim() >= 2 and (decay_embeddings or id(p) not in embeddings)
        (decay if matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Schedule:
    """Warmup, then `cosine` decay to `min_lr_ratio`, `constant`, or warmup-stable-decay (`wsd`):
    constant until the last `decay_fraction` of the steps, then linear decay to `min_lr_ratio`.
    `total_steps` defaults to the trainer's `max_steps`."""

    kind: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    total_steps: int | None = None

    def __call__(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        floor = self.min_lr_ratio
        if self.kind == "cosine":
            progress = min(1.0, (step - self.warmup_steps) / max(1, total - self.warmup_steps))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = total - round(self.decay_fraction * total)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return 1.0 - (1.0 - floor) * progress
