"""Next-token cross-entropy: on the full logits, or fused with the language-model head chunk by chunk.

At GPT-2 124M's shape the logits of a batch of N tokens are N x 50304 values: with N = 32K, 3.3 GB in bfloat16 and
twice that again for the float32 copy `F.cross_entropy` works on, more than the rest of the activations. The
chunked loss takes the final hidden states and the head's weight instead, and never holds more than one chunk's
logits (see `linear_cross_entropy`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # targets at padding; cross-entropy and accuracy skip them


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T), skipping IGNORE_INDEX."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def target_losses(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy in nats of each target of logits (B, T, V), flat (B * T,): 0 at IGNORE_INDEX. Evaluation sums
    them once both per token (the loss) and per byte (bits per byte)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none")


def _compute_dtype(features: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a Linear layer would multiply features by weight in: autocast's, when it is on."""
    device = features.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(features.dtype, weight.dtype)


def _chunk_losses(features: Tensor, weight: Tensor, targets: Tensor,
                  softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk's logits, at least float32 (n, V), their logsumexp (n,) and the losses (n,), 0 at IGNORE_INDEX.

    features (n, C) and weight (V, C) in the compute dtype; targets (n,). softcap: the logits are
    softcap * tanh(logits / softcap), as `Transformer.logits` caps them, or None."""
    logits = (features @ weight.T).to(torch.promote_types(features.dtype, torch.float32))
    if softcap is not None:  # in place: the product is this chunk's own
        logits = logits.div_(softcap).tanh_().mul_(softcap)
    lse = logits.logsumexp(-1)
    target_logits = logits.gather(1, targets.clamp(min=0)[:, None])[:, 0]
    return logits, lse, torch.where(targets != IGNORE_INDEX, lse - target_logits, 0)


def _chunk_grads(logits: Tensor, lse: Tensor, targets: Tensor, scale: Tensor, features: Tensor,
                 weight: Tensor, softcap: float | None) -> tuple[Tensor, Tensor]:
    """The gradients of sum(scale * losses) of a chunk w.r.t. its features (n, C) and weight (V, C).

    d loss / d logits = (softmax - onehot(target)) * scale per row, written over `logits` (n, V), which is then
    spent; scale (n,) is 0 at IGNORE_INDEX. Soft-capped logits c = s tanh(z / s) pass it on to the raw ones z times
    dc/dz = 1 - tanh²(z / s) = 1 - (c / s)², one more (n, V) buffer. The products run in the features' (compute)
    dtype, as autocast would run a Linear's backward, except float16's, which run in float32: a GradScaler's scale
    comes only in backward, and without it float16 flushes a large vocabulary's gradients (1 / V / N = 3e-8 at
    V = 8192 and N = 4096, float16's least step 6e-8) to zero."""
    slope = None if softcap is None else 1 - (logits / softcap).square()  # before `logits` is overwritten
    grad = logits.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, targets.clamp(min=0)[:, None], torch.full_like(grad[:, :1], -1))
    dtype = torch.float32 if features.dtype == torch.float16 else features.dtype
    grad.mul_(torch.where(targets != IGNORE_INDEX, scale, 0)[:, None])
    if slope is not None:
        grad.mul_(slope)
    grad = grad.to(dtype)
    return grad @ weight.to(dtype), grad.T @ features.to(dtype)


def _chunks(n: int, size: int) -> list[slice]:
    """Slices of n rows, size at a time (the last shorter)."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of features @ weight[:vocab].T, chunk by chunk of rows.

    Mean (training): each chunk's gradients w.r.t. the features and the weight are computed in the forward pass,
    while its logits exist, and kept, as Liger's fused linear cross-entropy does: (N, C) + (V, C) float32 values,
    small beside the (N, V) logits, and three products a chunk. Recomputing the logits in backward instead would
    add a fourth, the head's forward again: about 10% more FLOPs for GPT-2 124M. The backward then only scales
    them, by the incoming gradient: under float16, a GradScaler's scale comes only there (see `_chunk_grads`).
    Per-token losses (reduction "none") weight each row's gradient by its own incoming gradient, known only in
    backward: there the logits are recomputed, chunk by chunk (evaluation, without gradients, never does).
    """

    @staticmethod
    def forward(ctx, features: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, chunk_size: int,
                mean: bool, predict: bool, grads: bool, softcap: float | None) -> tuple[Tensor, Tensor | None]:
        dtype = _compute_dtype(features, weight)
        with torch.autocast(features.device.type, enabled=False):  # the casts are explicit, autocast's own
            f, w = features.to(dtype), weight[:vocab_size].to(dtype)
            losses = torch.empty(len(targets), dtype=torch.promote_types(dtype, torch.float32), device=f.device)
            predictions = torch.empty_like(targets) if predict else None
            count = (targets != IGNORE_INDEX).sum()
            precomputed = mean and grads
            if precomputed:
                scale = 1 / count.clamp(min=1).to(losses.dtype)  # no targets: NaN loss, 0 gradients, as F's
                grad_features = torch.empty_like(features, dtype=torch.promote_types(features.dtype, torch.float32))
                grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
            for rows in _chunks(len(targets), chunk_size):
                logits, lse, chunk_losses = _chunk_losses(f[rows], w, targets[rows], softcap)
                losses[rows] = chunk_losses
                if predict:
                    predictions[rows] = logits.argmax(-1)
                if precomputed:
                    grad_f, grad_w = _chunk_grads(logits, lse, targets[rows], scale, f[rows], w, softcap)
                    grad_features[rows] = grad_f
                    grad_weight[:vocab_size] += grad_w
        ctx.vocab_size, ctx.chunk_size, ctx.precomputed, ctx.softcap = vocab_size, chunk_size, precomputed, softcap
        if precomputed:
            ctx.save_for_backward(grad_features, grad_weight)
            ctx.dtypes = features.dtype, weight.dtype
        elif grads:
            ctx.save_for_backward(features, weight, targets)
        if predict:
            ctx.mark_non_differentiable(predictions)
        return losses.sum() / count if mean else losses, predictions

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_predictions) -> tuple[Tensor | None, ...]:
        if ctx.precomputed:
            grad_features, grad_weight = ctx.saved_tensors
            return ((grad_features * grad_loss).to(ctx.dtypes[0]), (grad_weight * grad_loss).to(ctx.dtypes[1]),
                    None, None, None, None, None, None, None)
        features, weight, targets = ctx.saved_tensors
        dtype = _compute_dtype(features, weight)
        with torch.autocast(features.device.type, enabled=False):
            f, w = features.to(dtype), weight[: ctx.vocab_size].to(dtype)
            grad_features, grad_weight = torch.empty_like(features), torch.zeros_like(weight)
            for rows in _chunks(len(targets), ctx.chunk_size):
                logits, lse, _ = _chunk_losses(f[rows], w, targets[rows], ctx.softcap)
                grad_f, grad_w = _chunk_grads(logits, lse, targets[rows], grad_loss[rows], f[rows], w, ctx.softcap)
                grad_features[rows] = grad_f
                grad_weight[: ctx.vocab_size] += grad_w
        return grad_features, grad_weight, None, None, None, None, None, None, None


def linear_cross_entropy(features: Tensor, weight: Tensor, targets: Tensor, vocab_size: int, chunk_size: int,
                         reduction: str = "mean", predict: bool = False,
                         softcap: float | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Cross-entropy of the logits features @ weight[:vocab_size].T against targets, skipping IGNORE_INDEX, without
    ever holding more than `chunk_size` rows of logits (chunk_size, vocab_size).

    features (N, C): the final hidden states; weight (Vp, C): the head's, whose rows from vocab_size on (a vocabulary
    padded for speed) are no logits, and get zero gradient; targets (N,). Under autocast the products run in its dtype
    as a Linear's would, and each chunk's log-sum-exp in float32. reduction "mean": the mean over non-ignored targets
    (NaN if there are none, as `F.cross_entropy`'s, with zero gradients); "none": the losses (N,), 0 at IGNORE_INDEX.
    predict: also return the argmax of each row's logits (N,), for accuracy. softcap: the loss of the soft-capped
    logits softcap * tanh(logits / softcap), computed in float32 as `Transformer.logits` does (None: uncapped).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    grads = torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad)
    loss, predictions = _LinearCrossEntropy.apply(features, weight, targets, vocab_size, chunk_size,
                                                  reduction == "mean", predict, grads, softcap)
    return (loss, predictions) if predict else loss
