"""CPU kernels behind `xlab.transformer`: what makes the plain model fast on a CPU without changing its numbers.

- `Linear`: nn.Linear that multiplies on oneDNN (fp32, x86), with `OneDNNWeights` scopes holding the weights in
  oneDNN's layout for one decoding or evaluation call;
- `swiglu`: SiLU gating with a backward that keeps a third less activation memory.

Everything here falls back to plain PyTorch where it does not apply (autocast, compile, export, other devices),
so the model reads the same with or without it. Nothing imports Lightning.
"""

from __future__ import annotations

import platform
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _onednn_layout(weight: Tensor) -> Tensor:
    """A copy of weight (out, in) in oneDNN's blocked layout: about 2x faster than the plain one for 2+ rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., in) @ weight.T + bias; weight (out, in) from `_onednn_layout`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFn(torch.autograd.Function):
    """A training linear layer with its forward and input gradient on oneDNN.

    The weight gradient, a product summed over every row of the batch, stays on PyTorch's matmul: oneDNN
    is no faster there. The weight is laid out afresh each step, as the optimizer changes it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, _onednn_layout(weight), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # grad (..., out) @ weight (out, in): a linear layer of weight.T
            grad_x = _onednn_linear(grad, _onednn_layout(weight.t().contiguous()), None)
        rows = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = rows.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


class OneDNNWeights:
    """oneDNN copies of `Linear` weights, kept for one decoding or evaluation call.

    Inside `with weights:`, each `Linear`'s inference forward (autograd off) multiplies by a copy of its weight
    in oneDNN's layout, made on that layer's first such forward and held by this object until it is dropped.
    The copies serve only inside its `with`, so no write to a weight outside it (an optimizer step, `.data`,
    numpy, FSDP's gathers) can leave one stale; the weights must not change inside. The same object may be
    entered again (a streamed generation enters it around each step); scopes nest, the innermost serving, and
    each thread has its own.
    """

    def __init__(self) -> None:
        self.copies: dict[Linear, Tensor] = {}

    def __enter__(self) -> OneDNNWeights:
        _SCOPES.open.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _SCOPES.open.pop()

    def of(self, layer: Linear) -> Tensor:
        """layer's weight (out, in) in oneDNN's layout, laid out on the first call."""
        if layer not in self.copies:
            self.copies[layer] = _onednn_layout(layer.weight.detach())
        return self.copies[layer]


class _Scopes(threading.local):
    """This thread's open `OneDNNWeights` scopes, innermost last."""

    def __init__(self) -> None:
        self.open: list[OneDNNWeights] = []


_SCOPES = _Scopes()


class Linear(nn.Linear):
    """nn.Linear that multiplies on oneDNN on the CPU.

    PyTorch's fp32 CPU matmul goes through MKL, which runs a generic code path on non-Intel CPUs: on the
    AMD EPYC our CI runs on, oneDNN computes the same product 1.7-4x faster at every row count
    (benchmarks/linear.py), given the weight in oneDNN's layout. With autograd off, inside a `OneDNNWeights`
    scope (`generate`, `stream`), the weight is laid out once per scope: one more copy of the weights in
    memory while it lasts. Outside any scope this is plain nn.Linear: laying the weight out for a single
    product costs more than MKL's product. In training, `_OneDNNLinearFn` runs the forward and the input
    gradient. Under autocast, tracing, compiling or export, or off the CPU, this is plain nn.Linear.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out)."""
        if not self._onednn_applies(x):
            return super().forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _OneDNNLinearFn.apply(x, self.weight, self.bias)
        if _SCOPES.open:
            return _onednn_linear(x, _SCOPES.open[-1].of(self), self.bias)
        return super().forward(x)

    def _onednn_applies(self, x: Tensor) -> bool:
        return (ONEDNN and not torch.compiler.is_compiling() and x.device.type == "cpu"
                and x.dtype == self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
                and not torch.onnx.is_in_onnx_export())


# x86 only: measured there; elsewhere (ARM) PyTorch's own BLAS choice is kept
ONEDNN = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available() and all(
    hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight"))


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up from the fused (..., 2F) projection; (..., F) out.

    Autograd's version keeps three (..., F) tensors for backward (gate, up, silu(gate)); this keeps
    only the fused input, the same memory as two, and recomputes silu(gate) in backward: one cheap
    elementwise pass for a third less MLP activation memory.
    """

    @staticmethod
    def forward(ctx, h: Tensor) -> Tensor:
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)  # written in place
        return grad_h


def swiglu(h: Tensor) -> Tensor:
    """silu(gate) * up for h (..., 2F) = [gate | up]; (..., F)."""
    if torch.is_grad_enabled() and h.requires_grad:
        return _SwiGLU.apply(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up

