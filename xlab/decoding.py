"""How a model decodes: the states that `xlab.generate`'s strategies drive, one per model kind.

- `TorchState`: a `Transformer` on its growing `KVCache` (any device, eager);
- `StaticCacheModel` / `StaticState`: a static cache that spans the context and `decode_step`, one token in fixed
  shapes, compiled once per row count (on CUDA, one CUDA graph replayed per token);
- `xlab.onnx.OnnxModel`: an ONNX Runtime session, through the same `ModelState` protocol.

Plain PyTorch, no Lightning. Shapes as in `xlab.transformer`: B rows, G key/value heads, D head dimension,
S cache slots, V vocabulary.
"""

from __future__ import annotations

import sys
import time
import warnings
import weakref
from collections.abc import Callable
from functools import partial
from typing import Protocol

import torch
from torch import Tensor, nn

from xlab.transformer import KVCache, Transformer, TransformerConfig

# what a fullgraph compile raises past Dynamo's recompile limit (named FailOnCacheLimitHit before torch 2.7)
_RECOMPILE_LIMIT = tuple(getattr(torch._dynamo.exc, name) for name in ("FailOnRecompileLimitHit", "FailOnCacheLimitHit")
                         if hasattr(torch._dynamo.exc, name))


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    param = next(model.parameters(), None)
    return (param.dtype, param.device) if param is not None else (torch.float32, torch.device("cpu"))


class ModelState(Protocol):
    """A model and its cache for one batch of R rows: what the decoding drives, so that one implementation of
    every strategy serves the PyTorch `Transformer` (`TorchState`) and an ONNX Runtime session
    (`xlab.onnx.OnnxModel`). Tensors are torch tensors on the model's device.
    """

    length: int  # positions cached, the same for every row
    max_len: int  # the most positions the cache holds

    def forward(self, ids: Tensor, positions: Tensor | None, key_mask: Tensor | None) -> Tensor:
        """Feed ids (R, T) after the cached positions; logits (R, V) at the last of them.

        positions (R, T) and key_mask (R, length + T) bool as `Transformer.forward` takes them (left-padded
        rows), or both None: positions length .. length + T - 1 in every row, every key real."""

    def restart(self) -> None:
        """Forget the cached positions (length 0): the next forward starts a new window."""

    def select(self, index: Tensor) -> None:
        """Row i becomes row index[i] (R',), rows repeated or dropped: R' rows from now on."""

    def reorder(self, index: Tensor, shared: int) -> None:
        """As select, for beam search: index (R,) maps each row to a row of its own prompt, no row copied
        from is itself overwritten, and the first `shared` cached positions are equal in all rows of a prompt
        (what an implementation may leave in place)."""


class Decodable(Protocol):
    """A model `generate` and `stream` accept besides a `Transformer`: e.g. `xlab.onnx.OnnxModel`."""

    config: TransformerConfig  # context, vocab_size and position are read
    device: torch.device  # where the states' tensors live

    def start(self, batch: int, max_len: int) -> ModelState:
        """A state for `batch` rows whose cache holds up to max_len positions."""


class TorchState:
    """`ModelState` of a `Transformer` on a preallocated `KVCache`."""

    def __init__(self, model: nn.Module, batch: int, max_len: int):
        dtype, device = model_dtype_device(model)
        self.model = model
        self.cache = KVCache(model.config, batch, max_len, device=device, dtype=dtype)

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def forward(self, ids: Tensor, positions: Tensor | None, key_mask: Tensor | None) -> Tensor:
        if positions is None:  # the model's fast path: no per-row positions, causal SDPA
            return self.model(ids, self.cache)[:, -1]
        return self.model(ids, self.cache, positions, key_mask)[:, -1]

    def restart(self) -> None:
        self.cache.length = 0

    def select(self, index: Tensor) -> None:
        self.cache.reorder(index)

    def reorder(self, index: Tensor, shared: int) -> None:
        """In place and only what changes: rows with index[i] == i keep their cache, and the first `shared`
        positions are not copied either. As no row copied from is overwritten, the copies can run one row at
        a time, each a single pass over its slice of the cache."""
        src = index.tolist()
        rows = [i for i, j in enumerate(src) if i != j]
        assert not {src[i] for i in rows} & set(rows), "a row copied from is itself overwritten"
        n = self.cache.length
        if n > shared:
            for kv in (self.cache.k, self.cache.v):
                for i in rows:
                    kv[:, i, :, shared:n].copy_(kv[:, src[i], :, shared:n])


class SlotWrite:
    """A `KVCache` as `decode_step` uses it: each layer's new keys and values go to a slot given as a tensor
    (1,), and attention reads the whole buffers (B, G, max_len, D), the slots after it masked. The shapes are the
    same at every step, so one compiled graph (one CUDA graph) serves them all."""

    def __init__(self, cache: KVCache, slot: Tensor):
        self.cache, self.slot = cache, slot

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, G, 1, D) at the slot; return all keys and values (B, G, max_len, D)."""
        keys, values = self.cache.k[layer], self.cache.v[layer]
        keys.index_copy_(2, self.slot, k)
        values.index_copy_(2, self.slot, v)
        return keys, values


def decode_step(model: Transformer, idx: Tensor, cache: KVCache, slot: Tensor, positions: Tensor,
            key_mask: Tensor) -> Tensor:
    """One decoding step in fixed shapes: logits (B, V) for one token per row, idx (B, 1).

    The tokens' keys and values go to cache slot `slot`, a (1,) long tensor, and attention spans every slot
    of the cache, those after `slot` masked: no shape and no Python value changes from one step to the next,
    and nothing waits for the device, so `torch.compile` captures one graph (a CUDA graph) for all steps.
    positions (B, 1) long: each row's position, below the context (within the precomputed tables).
    key_mask (B, S) bool over all S = cache.max_len slots: False marks padding. cache.length is not touched:
    the caller keeps count. The same logits as `model(idx, cache, ...)` at cache.length == slot.
    """
    x, rope = model.embed(idx, positions, None)
    mask = model.slot_mask(positions, slot, cache.max_len, key_mask, x.dtype)
    return model.logits(model.run_blocks(x, rope, mask, SlotWrite(cache, slot)))[:, -1]


class StaticCacheModel:
    """A `Transformer` that decodes on static KV caches with one fixed-shape step (`decode_step`), compiled:
    on CUDA with `mode="reduce-overhead"`, so each step replays one CUDA graph instead of launching every kernel
    from Python. A `Decodable`: `generate(StaticCacheModel(model), ...)`; `generate` builds one itself on CUDA
    (`GenerationConfig.compile`).

    Each cache holds the whole context, so the step's shapes depend only on the number of rows decoded together
    (batch x beams or samples): one compilation per row count, reused by every later call, and the caches are
    kept (one per row count) so that the captured graphs keep their addresses. Prompts (prefills) run eagerly.
    The first step at each row count is timed (`compile_seconds`) and reported through `report` (default: a line
    on stderr).

    compile False runs the same step eagerly (tests hold it to the growing cache); backend and mode go to
    `torch.compile` (mode None: "reduce-overhead" on CUDA, inductor's default elsewhere).
    """

    def __init__(self, model: nn.Module, compile: bool = True, backend: str | Callable = "inductor",
                 mode: str | None = None, report: Callable[[str], None] | None = None):
        self.model = model
        self.config = model.config
        self.compiled = compile
        self.built_on = self.device  # the mode suits this device
        if mode is None and self.device.type == "cuda":
            mode = "reduce-overhead"
        self.step = partial(decode_step, model)
        if compile:
            self.step = torch.compile(self.step, backend=backend, mode=mode, fullgraph=True, dynamic=False)
        self.report = report or (lambda line: print(line, file=sys.stderr, flush=True))
        self._caches: dict[int, tuple[KVCache, weakref.ref]] = {}  # rows: (cache, the state using it)
        self.compile_seconds: dict[int, float] = {}  # row count: the first step's time (compiled)

    @property
    def device(self) -> torch.device:
        return model_dtype_device(self.model)[1]

    def start(self, batch: int, max_len: int) -> ModelState:
        return StaticState(self, batch, max_len)

    def cache(self, rows: int, user: StaticState) -> KVCache:
        """An empty cache of `rows` rows for `user`: the kept one unless another live state uses it."""
        dtype, device = model_dtype_device(self.model)
        kept, holder = self._caches.get(rows, (None, None))
        if kept is not None and (kept.k.dtype, kept.k.device) != (dtype, device):  # the model moved
            self._caches.clear()
            kept = None
        if kept is None or holder() not in (None, user):
            cache = KVCache(self.config, rows, self.config.context, device=device, dtype=dtype)
            if self.compiled:  # graph inputs at fixed addresses: CUDA graphs capture them in place
                torch._dynamo.mark_static_address(cache.k)
                torch._dynamo.mark_static_address(cache.v)
            if kept is not None:  # in use by another generation (two streams at once): a fresh one, not kept
                return cache
            kept = cache
        self._caches[rows] = (kept, weakref.ref(user))
        kept.length = 0
        return kept

    def _call(self, *args: Tensor | KVCache) -> Tensor:
        if not self.compiled:
            return self.step(*args)
        # a CUDA graph writes its outputs to the same memory at every replay: a copy outlives the next step
        return self.step(*args).clone()

    def run_step(self, ids: Tensor, cache: KVCache, positions: Tensor, key_mask: Tensor) -> Tensor:
        """`decode_step` at slot cache.length (compiled, or eager); the first call per row count is timed."""
        slot = torch.full((1,), cache.length, dtype=torch.long, device=ids.device)
        rows = ids.shape[0]
        if rows in self.compile_seconds:
            return self._call(ids, cache, slot, positions, key_mask)
        start = time.perf_counter()
        try:
            logits = self._call(ids, cache, slot, positions, key_mask)
        except _RECOMPILE_LIMIT:
            # Dynamo keeps a limited number of graphs per function, `decode_step`, for all models in the
            # process together: past it, decode eagerly (the same tokens) rather than fail
            warnings.warn("the decoding step reached torch._dynamo.config.recompile_limit (graphs of "
                          "decode_step, all models together): decoding eagerly from now on; raise the limit "
                          "to compile more", stacklevel=2)
            self.step, self.compiled = partial(decode_step, self.model), False
            logits = self._call(ids, cache, slot, positions, key_mask)
        logits.sum().item()  # wait for the device: the time includes the work, not just its launch
        self.compile_seconds[rows] = seconds = time.perf_counter() - start
        if self.compiled:
            self.report(f"xlab: compiled the decoding step for {rows} row(s) in {seconds:.1f} s "
                        f"(once per row count; GenerationConfig.compile=False or infer.py --no-compile skip it)")
        return logits


class StaticState(TorchState):
    """`ModelState` of a `StaticCacheModel`: prompts prefill the cache eagerly, single tokens run its fixed-shape
    step. The cache spans the context whatever max_len is asked; `max_len` stays what the decoder asked for."""

    def __init__(self, owner: StaticCacheModel, batch: int, max_len: int):
        self.owner, self.model, self._max_len = owner, owner.model, max_len
        self.cache = owner.cache(batch, self)
        self.key_mask: Tensor | None = None  # (R, context) bool: the step's key mask, all True without padding

    @property
    def max_len(self) -> int:
        return self._max_len

    def forward(self, ids: Tensor, positions: Tensor | None, key_mask: Tensor | None) -> Tensor:
        rows, T = ids.shape
        if T > 1 or self.cache.length == 0:
            return super().forward(ids, positions, key_mask)
        if self.key_mask is None or self.key_mask.shape[0] != rows:
            self.key_mask = torch.ones(rows, self.cache.max_len, dtype=torch.bool, device=ids.device)
        if key_mask is not None:
            self.key_mask[:, :key_mask.shape[1]] = key_mask
        if positions is None:
            positions = torch.full((rows, 1), self.cache.length, dtype=torch.long, device=ids.device)
        # a column of the decoder's sequence: contiguous, so its strides (which the compiled step checks) never vary
        logits = self.owner.run_step(ids.contiguous(), self.cache, positions, self.key_mask)
        self.cache.length += 1
        return logits

    def select(self, index: Tensor) -> None:
        rows = len(index)
        if rows == self.cache.k.shape[1]:  # in place: the graphs captured on this cache keep its address
            for kv in (self.cache.k, self.cache.v):
                kv.copy_(kv.index_select(1, index))
            return
        old = self.cache
        self.cache = self.owner.cache(rows, self)
        for src, dst in ((old.k, self.cache.k), (old.v, self.cache.v)):
            torch.index_select(src, 1, index, out=dst)
        self.cache.length = old.length
