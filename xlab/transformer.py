"""A decoder-only transformer in plain PyTorch.

One config dataclass expresses GPT-2, Llama and the variants between them: position
encoding, norm type and placement, MLP activation, grouped-query attention, QK-norm,
dropout, weight tying, and the speedrun's (modded-nanogpt's) ReLU², logit soft-capping and
zero-initialised output projections. `KVCache` holds preallocated keys and values for incremental
decoding. Nothing here imports Lightning: the module (with `xlab.kernels`, its CPU kernels) can be lifted out
on its own; `xlab.decoding` adds the fixed-shape decoding step that CUDA graphs capture.

Shapes: B batch, T new tokens, S keys (cached + new), H query heads, G key/value heads,
D head dimension, C model width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlab.kernels import Linear, swiglu


@dataclass
class TransformerConfig:
    """Architecture hyperparameters. `vocab_size` is normally set from the tokenizer."""

    vocab_size: int = 4096
    context: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: multi-head; 1: multi-query; else grouped-query
    d_model: int = 256
    d_ff: int | None = None  # None: 4 * d_model
    position: Literal["none", "sinusoidal", "learned", "rope", "alibi"] = "learned"
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    prenorm: bool = True
    final_norm: bool = True
    mlp: Literal["gelu", "gelu_tanh", "relu", "relu2", "swiglu"] = "gelu"
    bias: bool = True
    qk_norm: bool = False
    tie_embeddings: bool = True
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap), in float32 (Gemma 2, modded-nanogpt)
    dropout_embed: float = 0.0
    dropout_attn: float = 0.0
    dropout_resid: float = 0.0
    init_std: float = 0.02
    zero_init_proj: bool = False  # attention and MLP output projections start at zero (modded-nanogpt)
    pad_vocab_to: int = 1  # round the embedding rows up to a multiple (64 helps GPU matmuls)

    def __post_init__(self) -> None:
        checks = [
            (self.d_model % self.n_heads == 0,
             f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"),
            (self.n_heads % self.kv_heads == 0,
             f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"),
            (self.position != "rope" or self.head_dim % 2 == 0,
             f"RoPE needs an even head dimension, got d_model/n_heads={self.head_dim}"),
            (min(self.vocab_size, self.context, self.n_layers, self.pad_vocab_to) > 0,
             "vocab_size, context, n_layers and pad_vocab_to must be positive"),
            (self.logit_softcap is None or self.logit_softcap > 0,
             f"logit_softcap must be positive or None, got {self.logit_softcap}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid transformer config: {message}")

    @property
    def kv_heads(self) -> int:
        """n_kv_heads resolved (fields stay None so configs layered over defaults keep the meaning)."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ff_dim(self) -> int:
        return 4 * self.d_model if self.d_ff is None else self.d_ff

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to


class KVCache:
    """Preallocated keys and values for every layer: (L, B, G, max_len, D) each.

    `length` counts the positions already written; all rows of the batch share it
    (batched prompts of different lengths are left-padded and masked instead).
    """

    def __init__(self, config: TransformerConfig, batch_size: int, max_len: int | None = None,
                 device=None, dtype=torch.float32):
        max_len = max_len or config.context
        shape = (config.n_layers, batch_size, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, G, T, D) after the cached positions; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search keeps the cache of each surviving beam)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


def alibi_slopes(n_heads: int) -> Tensor:
    """Head slopes of ALiBi (Press et al.), with the paper's rule for non-powers of two."""
    def powers(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = powers(closest)
    if closest < n_heads:
        slopes += powers(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes)


def sinusoidal_table(length: int, dim: int, start: int = 0) -> Tensor:
    """(length - start, dim) sine/cosine table of 'Attention is all you need' for positions start..length-1."""
    position = torch.arange(start, length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length - start, dim)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table


def rope_tables(length: int, head_dim: int, theta: float, start: int = 0) -> tuple[Tensor, Tensor]:
    """cos and sin (length - start, head_dim) for rotate-half RoPE, as in Llama, for positions start..length-1."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(start, length, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, heads, T, D) by cos, sin broadcastable to it: each pair (x[i], x[i + D/2]) turns by its angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def make_norm(config: TransformerConfig, dim: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=config.norm_eps)
    return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.norm_bias)


class Attention(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        kv_dim = 2 * config.kv_heads * config.head_dim
        self.qkv = Linear(config.d_model, config.d_model + kv_dim, bias=config.bias)
        self.proj = Linear(config.d_model, config.d_model, bias=config.bias)
        self.q_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, self.head_dim) if config.qk_norm else None
        self.dropout = config.dropout_attn

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) -> q (B, H, T, D), k and v (B, G, T, D): projected, QK-normed and rotated (RoPE).

        rope: cos, sin broadcastable to (B, H, T, D), or None.
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = (t.to(q.dtype) for t in rope)  # under autocast q is bf16 while the tables are fp32
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if (rope is not None or self.q_norm is not None) and torch.is_grad_enabled():
            # q and k are new tensors now; a view v would keep the whole fused qkv output alive for backward
            v = v.contiguous()
        return q, k, v

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
                cache: KVCache | None) -> Tensor:
        """x (B, T, C) -> (B, T, C).

        rope: cos, sin broadcastable to (B, H, T, D); mask (B or 1, H or 1, T, S) added to the scores, or None
        for plain causal attention.
        """
        B, T, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads)
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))

    def probabilities(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None) -> Tensor:
        """The attention probabilities (B, H, T, T) of `forward` without a cache, in float32, before dropout:
        softmax(q k^T / sqrt(D) + mask), spelt out where `forward` leaves them inside SDPA.

        x, rope and mask as `forward` takes them; mask None is plain causal attention.
        """
        q, k, _ = self.project(x, rope)
        q, k = q.float(), k.float()
        # grouped-query attention: query head h reads key head h // (H / G), as SDPA's enable_gqa repeats them
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if mask is None:  # -inf above the diagonal: no query sees a later key
            T = x.shape[1]
            mask = torch.full((T, T), float("-inf"), device=x.device).triu(1)
        return (scores + mask.float()).softmax(-1)


def attention_maps(model: Transformer, idx: Tensor) -> Tensor:
    """The attention probabilities of every layer and head for token ids idx (B, T): (L, B, H, T, T), float32.

    maps[l, b, h, t] is how query position t of layer l, head h spreads over the keys 0..t: causal, each row
    summing to 1, the model's own position bias (ALiBi) included. One forward pass, in eval mode (no dropout)
    and without gradients; each layer's probabilities are worked out from what its attention receives
    (`Attention.probabilities`), so the ordinary forward keeps SDPA and pays nothing for this.
    """
    maps = []

    def record(attn: Attention, args: tuple, output: Tensor) -> None:
        x, rope, mask, _ = args  # as Block calls it: (x, rope, mask, cache)
        maps.append(attn.probabilities(x, rope, mask))

    hooks = [block.attn.register_forward_hook(record) for block in model.blocks]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(idx)
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    return torch.stack(maps)


class ReLU2(nn.Module):
    """relu(x)², the MLP activation Primer (So et al., 2021) found and modded-nanogpt trains with."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        width = config.ff_dim * (2 if self.gated else 1)  # gate and up projections fused
        self.up = Linear(config.d_model, width, bias=config.bias)
        self.down = Linear(config.ff_dim, config.d_model, bias=config.bias)
        # swiglu's SiLU is applied by `swiglu`, fused with the gating product
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"),
                    "relu": nn.ReLU(), "relu2": ReLU2(), "swiglu": nn.SiLU()}[config.mlp]

    def forward(self, x: Tensor) -> Tensor:
        """x (B, T, C) -> (B, T, C)."""
        if self.gated:
            return self.down(swiglu(self.up(x)))
        return self.down(self.act(self.up(x)))


class Block(nn.Module):
    def __init__(self, config: TransformerConfig, layer: int):
        super().__init__()
        self.prenorm = config.prenorm
        self.norm1 = make_norm(config, config.d_model)
        self.attn = Attention(config, layer)
        self.norm2 = make_norm(config, config.d_model)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout_resid)

    def forward(self, x: Tensor, rope, mask, cache) -> Tensor:
        if self.prenorm:
            x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache))
            return x + self.drop(self.mlp(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, rope, mask, cache)))
        return self.norm2(x + self.drop(self.mlp(x)))


class Transformer(nn.Module):
    """Decoder-only language model: token ids (B, T) -> logits (B, T, V)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.wpe = nn.Embedding(config.context, config.d_model) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout_embed)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config, config.d_model) if config.final_norm else nn.Identity()
        self.lm_head = Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.position == "sinusoidal":
            self.register_buffer("sinusoid", self.scaled_sinusoid(config.context), persistent=False)
        if config.position == "rope":
            cos, sin = rope_tables(config.context, config.head_dim, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        if config.position == "alibi":
            self.register_buffer("alibi", alibi_slopes(config.n_heads), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, std), residual output projections scaled by 1/sqrt(2 n_layers), or zero with
        `zero_init_proj`: then every block starts as the identity and the model as embeddings and head alone."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            residual = name.endswith(("attn.proj.weight", "mlp.down.weight"))
            scale = 1 / math.sqrt(2 * self.config.n_layers) if residual else 1
            if residual and self.config.zero_init_proj:
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std * scale)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor, cache: KVCache | None = None, positions: Tensor | None = None,
                key_mask: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) for token ids idx (B, T).

        cache: when given, idx continues the cached sequence and its keys/values are appended.
        positions (B, T): per-row positions, for left-padded batches; default offset + arange(T).
        key_mask (B, S) bool: False marks padding keys that no query may attend to.
        """
        return self.logits(self.features(idx, cache, positions, key_mask))

    def logits(self, features: Tensor) -> Tensor:
        """The language-model head: features (..., C) from `features` -> logits (..., V); soft-capped ones in at
        least float32, where tanh does not round logits near the cap together (modded-nanogpt's choice)."""
        logits = self.lm_head(features)[..., : self.config.vocab_size]
        if self.config.logit_softcap is None:
            return logits
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits.to(torch.promote_types(logits.dtype, torch.float32)) / cap)

    def features(self, idx: Tensor, cache: KVCache | None = None, positions: Tensor | None = None,
                 key_mask: Tensor | None = None) -> Tensor:
        """The final hidden states (B, T, C), normed, that the head turns into logits; arguments as `forward`'s.
        A loss can take these and the head's weight instead of the (B, T, V) logits."""
        B, T = idx.shape
        offset = cache.length if cache is not None else 0
        learned = self.config.position == "learned"
        # only learned positions end at the context: the sinusoidal and RoPE tables are extended past it by their
        # formula (`position_tables`), ALiBi and no positions need none. A cache holds what it was sized for.
        limit = cache.max_len if cache is not None else self.config.context if learned else None
        if limit is not None and offset + T > limit:
            what = "context" if cache is None else "cache length"
            raise ValueError(f"sequence of {offset + T} tokens exceeds the {what} of {limit}; truncate the input")
        tabled = self.config.position in ("learned", "sinusoidal", "rope")
        if positions is None:
            # the common case: one (T,) row broadcast over the batch, and no device sync for the check
            pos = torch.arange(offset, offset + T, device=idx.device)
            last = offset + T - 1
        else:
            pos = positions
            last = int(positions.max()) if tabled else 0
        if learned and last >= self.config.context:
            raise ValueError(f"position {last} is beyond the context of {self.config.context} "
                             f"({self.config.position} positions); truncate the input")
        x, rope = self.embed(idx, pos, last)
        # without per-row positions every row has the same ALiBi bias: build one, broadcast over the batch
        mask = self.attention_mask(pos[None] if positions is None else positions, offset, key_mask, x.dtype)
        x = self.run_blocks(x, rope, mask, cache)
        if cache is not None:
            cache.length += T
        return x

    def embed(self, idx: Tensor, pos: Tensor, last: int | None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Token embeddings plus absolute positions, and RoPE's cos, sin for the blocks (or None).

        idx (B, T); pos (T,) or (B, T), none past `last` (None: all within the precomputed tables).
        Returns x (B, T, C) and cos, sin broadcastable to (B, H, T, D).
        """
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(pos)
        elif self.config.position == "sinusoidal":
            [sinusoid] = self.position_tables(last)
            x = x + sinusoid[pos].to(x.dtype)
        x = self.drop(x)
        rope = None
        if self.config.position == "rope":
            # (T, D) -> (1, T, D) or (B, T, D) -> (B, 1, T, D): broadcast over the batch and heads
            rope = tuple(table[pos].unsqueeze(-3) for table in self.position_tables(last))
        return x, rope

    def run_blocks(self, x: Tensor, rope, mask: Tensor | None, cache) -> Tensor:
        """x (B, T, C) through every block and the final norm -> (B, T, C)."""
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        return self.norm(x)

    def __getstate__(self) -> dict:
        # what generation keeps on the model (`xlab.decoding.StaticCacheModel`: compiled code, caches) is not copied
        return {k: v for k, v in super().__getstate__().items() if k != "_static_decoding"}

    def scaled_sinusoid(self, length: int, start: int = 0) -> Tensor:
        """The sinusoid (length - start, C) as added to the token embeddings: scaled so that each coordinate's RMS
        is `init_std`, the scale of the embeddings (and of a learned table) at initialisation. Unscaled, its
        entries of ±1 outweigh embeddings of std 0.02 some 35 times, and the model hardly sees which token it
        reads (tests/test_transformer.py::test_token_identity_survives_the_position_signal)."""
        return sinusoidal_table(length, self.config.d_model, start) * (math.sqrt(2) * self.config.init_std)

    def position_tables(self, last: int | None) -> list[Tensor]:
        """The sinusoid [(P, C)] or RoPE's [cos, sin] (P, D) covering positions 0..last (P > last); last None:
        the precomputed tables of the context's positions.

        Within the context: the precomputed buffers. Past it (evaluating longer sequences than training's), the
        missing rows are computed by the same formula and appended, the buffers' rows kept as they are; nothing
        is stored, so a long sequence costs no memory after its forward.
        """
        if self.config.position == "sinusoidal":
            tables = [self.sinusoid]
        else:
            tables = [self.rope_cos, self.rope_sin]
        have = tables[0].shape[0]
        if last is None or last < have:
            return tables
        if self.config.position == "sinusoidal":
            more = [self.scaled_sinusoid(last + 1, start=have)]
        else:
            more = rope_tables(last + 1, self.config.head_dim, self.config.rope_theta, start=have)
        return [torch.cat([table, rows.to(table)]) for table, rows in zip(tables, more, strict=True)]

    def attention_mask(self, positions: Tensor, offset: int, key_mask: Tensor | None, dtype) -> Tensor | None:
        """Float mask (B or 1, H or 1, T, S) added to attention scores for T queries after `offset` cached
        positions, or None when plain causal SDPA will do.

        positions (B or 1, T): one row (1, T) when all rows share them; with no key_mask the mask is then (1, ...).
        """
        T = positions.shape[1]
        if self.config.position != "alibi" and key_mask is None and (offset == 0 or T == 1):
            return None  # SDPA's is_causal, or one new token that sees every cached key
        slots = torch.arange(offset, offset + T, device=positions.device)
        return self.slot_mask(positions, slots, offset + T, key_mask, dtype)

    def slot_mask(self, positions: Tensor, slots: Tensor, S: int, key_mask: Tensor | None, dtype) -> Tensor:
        """Float mask (B or 1, H or 1, T, S) for T queries in cache slots `slots` (T,) over keys in slots 0..S-1:
        each query sees the keys up to its own slot that key_mask (B, >= S) bool does not mark False, with
        ALiBi's bias by position (positions (B or 1, T), the queries')."""
        B = positions.shape[0]
        device = positions.device
        q_idx = slots[:, None]
        k_idx = torch.arange(S, device=device)[None, :]
        allowed = (k_idx <= q_idx)[None, None]  # (1, 1, T, S)
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, :S].bool()
        mask = torch.zeros(allowed.shape, device=device, dtype=dtype).masked_fill(~allowed, float("-inf"))
        if self.config.position == "alibi":
            # bias = -slope * distance, measured in positions so left padding shifts nothing
            if key_mask is None:
                key_pos = k_idx.expand(B, S)
            else:
                key_pos = (key_mask[:, :S].long().cumsum(-1) - 1).clamp(min=0)
            distance = (positions[:, :, None] - key_pos[:, None, :]).to(dtype)  # (B, T, S)
            mask = mask - self.alibi.to(dtype)[None, :, None, None] * distance[:, None]
        # a fully masked row (a padding query) would give NaN; let it see itself instead
        return mask.masked_fill(~allowed.any(-1, keepdim=True) & (k_idx == q_idx), 0.0)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count; without embeddings excludes the token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
            if not self.config.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> dict[str, int]:
        """Training FLOPs per token: 6N for the matmuls plus 12·L·C·T for attention (PaLM's estimate).

        N counts the parameters used in matrix products: every parameter but the position table
        and, when untied, the input embedding (a lookup, not a product).
        """
        T = seq_len or self.config.context
        n = sum(p.numel() for p in self.parameters())
        n -= self.wpe.weight.numel() if self.wpe is not None else 0
        n -= 0 if self.config.tie_embeddings else self.wte.weight.numel()
        forward = 2 * n + 4 * self.config.n_layers * self.config.d_model * T
        return {"forward": forward, "backward": 2 * forward, "total": 3 * forward}
