"""Parameter groups, the optimizers over them (AdamW; or Muon on the hidden matrices and AdamW on the rest, as one
optimizer) and learning-rate schedules (multipliers of each group's own base rate, per optimizer step)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn
from torch.optim import _muon

if TYPE_CHECKING:
    from xlab.transformer import Transformer

ROLES = ("hidden", "embeddings", "head", "other")  # in the order of the groups they make


def roles(model: Transformer) -> list[tuple[str, str, nn.Parameter]]:
    """(role, name, parameter) of every trainable parameter, in the model's order (tied weights once). Roles:
    `hidden`, the blocks' matrices (attention and MLP weights); `embeddings`, the token and position tables (and the
    head when tied: one tensor); `head`, an untied output head; `other`, norms, biases and any other parameter."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = {id(p) for p in model.blocks.parameters() if p.dim() == 2}
    found = []
    for name, p in model.named_parameters():  # tied weights appear once
        if p.requires_grad:
            role = ("embeddings" if id(p) in embeddings else "head" if p is model.lm_head.weight
                    else "hidden" if id(p) in hidden else "other")
            found.append((role, name, p))
    return found


@dataclass
class GroupLR:
    """Learning rates of the embeddings, the untied head and the other parameters (norms, biases); None:
    `model.learning_rate`. The hidden matrices take `model.learning_rate` under AdamW, `model.muon.lr` under Muon."""

    embeddings: float | None = None
    head: float | None = None
    other: float | None = None


def param_groups(model: Transformer, weight_decay: float | None, decay_embeddings: bool = False,
                 lr: GroupLR = GroupLR(), only: tuple[str, ...] = ROLES) -> list[dict]:
    """The groups of the parameters whose role is in `only`, named after their roles: one per distinct (lr, weight
    decay), so that by default AdamW has two, the decayed matrices (hidden+head) and the rest (embeddings+other), as
    checkpoints written before the roles have. Weight decay on matrices only: norms and biases never, embeddings only
    if asked. A setting that is None is left out of the group: the optimizer's own applies."""
    settings = {"hidden": (None, weight_decay), "head": (lr.head, weight_decay), "other": (lr.other, 0.0),
                "embeddings": (lr.embeddings, weight_decay if decay_embeddings else 0.0)}
    found = [(role, name, p) for role, name, p in roles(model) if role in only]
    present = {role: settings[role] for role in ROLES if any(r == role for r, _, _ in found)}
    groups = []
    for key in dict.fromkeys(present.values()):  # in the order of ROLES
        members = [role for role, setting in present.items() if setting == key]
        chosen = [(name, p) for role, name, p in found if role in members]  # in the model's order
        group = {"name": "+".join(members), "params": [p for _, p in chosen], "param_names": [n for n, _ in chosen]}
        groups.append(group | {k: v for k, v in zip(("lr", "weight_decay"), key, strict=True) if v is not None})
    return groups


@dataclass
class MuonConfig:
    """Muon (`torch.optim.Muon`) on the hidden matrices, with `model.optimizer: muon`: momentum, orthogonalised by
    `ns_steps` Newton-Schulz iterations, scaled by `adjust_lr_fn` for the matrix's shape. The defaults are
    modded-nanogpt's (the GPT-2 speedrun: lr 0.05, Nesterov momentum 0.95, 5 steps, no weight decay, the update
    scaled by max(1, rows/cols)^0.5, "original"). "match_rms_adamw" (Moonlight) scales the update to AdamW's typical
    size, so Muon can share AdamW's rate and weight decay: set lr and weight_decay to None, which stand for
    `model.learning_rate` and `model.weight_decay`."""

    lr: float | None = 0.05
    weight_decay: float | None = 0.0
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    adjust_lr_fn: Literal["original", "match_rms_adamw", "spectral_unclamped"] = "original"

    def options(self, lr: float, weight_decay: float) -> dict:
        """torch.optim.Muon's keyword arguments, None standing for `lr` and `weight_decay`."""
        return asdict(self) | {"lr": lr if self.lr is None else self.lr,
                               "weight_decay": weight_decay if self.weight_decay is None else self.weight_decay}


def newton_schulz_float32(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                          eps: float) -> Tensor:
    """Muon's orthogonalisation of grad (rows, cols) as `torch.optim.Muon` computes it (the quintic iteration on the
    wide orientation, from unit Frobenius norm), in float32 where torch's runs in bfloat16: a CPU without bf16 units
    emulates bfloat16 products, 2-20x slower than float32 ones (128 to 256 wide, our 2-core AVX2 machine)."""
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.float().T if tall else grad.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(grad.dtype)


class Muon(torch.optim.Muon):
    """`torch.optim.Muon`, with the Newton-Schulz iterations in float32 when its parameters are on the CPU (see
    `newton_schulz_float32`); on a GPU it is torch's, bfloat16 products and all."""

    def step(self, closure=None):
        on_cpu = all(p.device.type == "cpu" for group in self.param_groups for p in group["params"])
        if not on_cpu or not hasattr(_muon, "_zeropower_via_newtonschulz"):
            return super().step(closure)
        # torch's step calls its module's function by name: swapped for the step's length only
        torch_own, _muon._zeropower_via_newtonschulz = _muon._zeropower_via_newtonschulz, newton_schulz_float32
        try:
            return super().step(closure)
        finally:
            _muon._zeropower_via_newtonschulz = torch_own


class Combined(torch.optim.Optimizer):
    """Optimizers over disjoint parameters, stepped as one: for what takes a single optimizer (Lightning's automatic
    optimization, the LR schedule, gradient clipping, float16's unscaling). Its `param_groups` are the parts' own
    dicts, so a schedule that sets a group's lr sets the part's; its `state` is the one dict the parts write, so
    `state_dict` is the standard one over every group, and `load_state_dict` restores each part."""

    def __init__(self, *parts: torch.optim.Optimizer):
        self.parts = parts
        super().__init__([group for part in parts for group in part.param_groups], {})
        self.share()

    def share(self) -> None:
        """Give each part its own groups of ours, and our state (loading replaces both with new objects)."""
        groups = iter(self.param_groups)
        for part in self.parts:
            part.param_groups = [next(groups) for _ in part.param_groups]
            part.state = self.state

    def step(self, closure=None):
        loss = None
        if closure is not None:  # Lightning's: forward and backward, once for all the parts
            with torch.enable_grad():
                loss = closure()
        for part in self.parts:
            part.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.share()


def label(optimizer: torch.optim.Optimizer) -> None:
    """Write into each group the class of the optimizer that steps it: checkpoints keep it for `manage.py inspect`."""
    for part in getattr(optimizer, "parts", (optimizer,)):
        for group in part.param_groups:
            group["optimizer"] = type(part).__name__


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
