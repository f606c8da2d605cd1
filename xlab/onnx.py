"""ONNX export of an XLab model, and greedy decoding with onnxruntime.

Two graphs (shapes: B batch, T new tokens, P cached positions, L layers, G key/value heads,
D head dimension, V vocabulary):

- without cache: input_ids (B, T) int64 -> logits (B, T, V);
- with cache (`kv_cache=True`): input_ids (B, T), past_k and past_v (L, B, G, P, D) -> logits (B, T, V),
  present_k and present_v (L, B, G, P + T, D). The first call passes P = 0 (empty past tensors);
  each next call passes the presents of the previous one.

B, T and P are dynamic axes. The file's metadata carries the architecture (`xlab.arch`), the
tokenizer (`xlab.tokenizer`) and its end-of-document id, so `OnnxGreedy` needs nothing else.

`OnnxDecoder` re-states the model's forward for export: `Attention.forward` decides
`is_causal` from the sequence length, which tracing turns into a tensor and `torch.export` into a
symbolic bool, and neither can be passed to SDPA. Here the graph without cache uses SDPA's
`is_causal=True` (correct for any T, as queries and keys then start together), the graph with
cache an explicit mask offset by P. The tests hold both to the PyTorch model's logits.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xlab.checkpoint import CheckpointError, Loaded, atomic_output, check_output
from xlab.transformer import Attention, Transformer, TransformerConfig, apply_rope

# above this, weights go to one external-data file beside the .onnx (protobuf's limit is 2 GB)
EXTERNAL_DATA_BYTES = 1 << 30


def _norm(norm: nn.Module, x: Tensor) -> Tensor:
    """`norm(x)`, with RMSNorm written out: the TorchScript exporter has no aten::rms_norm below opset 23."""
    if isinstance(norm, nn.RMSNorm):
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return x * norm.weight if norm.weight is not None else x
    return norm(x)


def _attention(attn: Attention, x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor | None,
               past_k: Tensor | None, past_v: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """`Attention.forward` with concatenated past keys/values: x (B, T, C); past (B, G, P, D) or None;
    mask (1, H or 1, T, P + T) or None for causal. Returns y (B, T, C) and keys, values (B, G, P + T, D)."""
    B, T, _ = x.shape
    H, G, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q, k, v = attn.qkv(x).split([H * D, G * D, G * D], dim=-1)
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in (q, k, v))
    if attn.q_norm is not None:
        q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if past_k is not None:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    # the exporters do not all translate SDPA's enable_gqa; repeating the shared heads is the same function
    keys, values = (k, v) if G == H else (k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1))
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None)
    return attn.proj(y.transpose(1, 2).reshape(B, T, H * D)), k, v


class OnnxDecoder(nn.Module):
    """Export wrapper around a `Transformer` (shares its weights); see the module docstring for I/O."""

    def __init__(self, model: Transformer, kv_cache: bool = False):
        super().__init__()
        self.model, self.kv_cache = model, kv_cache

    def forward(self, idx: Tensor, past_k: Tensor | None = None, past_v: Tensor | None = None):
        m, c = self.model, self.model.config
        T = idx.shape[1]
        past = past_k.shape[3] if self.kv_cache else 0
        positions = torch.arange(T, device=idx.device) + past  # (T,): the same for every row
        x = m.wte(idx)
        if m.wpe is not None:
            x = x + m.wpe(positions)
        elif c.position == "sinusoidal":
            x = x + m.sinusoid[positions].to(x.dtype)
        rope = None
        if c.position == "rope":
            rope = (m.rope_cos[positions][None, None].to(x.dtype), m.rope_sin[positions][None, None].to(x.dtype))
        mask = None  # SDPA's is_causal: right when there is no past
        if self.kv_cache or c.position == "alibi":
            key_pos = torch.arange(past + T, device=idx.device)
            allowed = key_pos[None, :] <= positions[:, None]  # (T, S): causal, offset by the past
            mask = allowed[None, None]
            if c.position == "alibi":
                distance = (positions[:, None] - key_pos[None, :]).to(x.dtype)
                bias = torch.zeros_like(distance).masked_fill(~allowed, float("-inf"))
                mask = bias[None, None] - m.alibi.to(x.dtype)[None, :, None, None] * distance[None, None]
        keys, values = [], []
        for i, block in enumerate(m.blocks):
            pk, pv = (past_k[i], past_v[i]) if self.kv_cache else (None, None)
            if block.prenorm:
                y, k, v = _attention(block.attn, _norm(block.norm1, x), rope, mask, pk, pv)
                x = x + y
                x = x + block.mlp(_norm(block.norm2, x))
            else:
                y, k, v = _attention(block.attn, x, rope, mask, pk, pv)
                x = _norm(block.norm1, x + y)
                x = _norm(block.norm2, x + block.mlp(x))
            keys.append(k)
            values.append(v)
        logits = m.lm_head(_norm(m.norm, x))[..., : c.vocab_size]
        if self.kv_cache:
            return logits, torch.stack(keys), torch.stack(values)
        return logits


def _io(config: TransformerConfig, kv_cache: bool) -> tuple[list[str], list[str], dict]:
    inputs, outputs = ["input_ids"], ["logits"]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    if kv_cache:
        inputs += ["past_k", "past_v"]
        outputs += ["present_k", "present_v"]
        axes |= {"past_k": {1: "batch", 3: "past"}, "past_v": {1: "batch", 3: "past"},
                 "present_k": {1: "batch", 3: "total"}, "present_v": {1: "batch", 3: "total"}}
    return inputs, outputs, axes


def export_onnx(loaded: Loaded, output: str | Path, kv_cache: bool = False, opset: int = 17,
                force: bool = False) -> Path:
    """Write `loaded`'s model (in fp32) as an ONNX graph; see the module docstring for inputs and outputs.

    Exported with the TorchScript tracer (`dynamo=False`): under a second for a small model, where the
    torch.export-based exporter takes ~15 s for the same graph (it also exports `OnnxDecoder`
    correctly, with `dynamic_shapes` in place of `dynamic_axes`, should the tracer be removed).
    """
    import onnx

    output = Path(output)
    check_output(output, force)
    model = loaded.model
    if any(p.dtype != torch.float32 for p in model.parameters()):  # a copy: the caller's model stays as it is
        model = copy.deepcopy(model).float()
    model = model.eval()
    config = model.config
    wrapper = OnnxDecoder(model, kv_cache).eval()
    inputs, outputs, axes = _io(config, kv_cache)
    # example: batch 2, 3 new tokens after 2 cached positions (sizes > 1, so no axis is fixed at 1)
    example: tuple[Tensor, ...] = (torch.zeros(2, 3, dtype=torch.long),)
    if kv_cache:
        past = torch.zeros(config.n_layers, 2, config.kv_heads, 2, config.head_dim)
        example += (past, past.clone())
    with atomic_output(output, force, is_dir=False) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the TorchScript exporter's deprecation notice
        raw = tmp / "raw" / output.name
        raw.parent.mkdir()
        torch.onnx.export(wrapper, example, raw, input_names=inputs, output_names=outputs, opset_version=opset,
                          dynamic_axes=axes, dynamo=False, do_constant_folding=True)
        graph = onnx.load(str(raw))  # also reads any external data the exporter wrote beside it
        tok = loaded.tokenizer
        meta = {"xlab.arch": json.dumps(asdict(config)), "xlab.kv_cache": str(int(kv_cache)),
                "xlab.tokenizer": tok.to_str(), "xlab.eos_id": str(tok.eos_id)}
        for key, value in meta.items():
            graph.metadata_props.add(key=key, value=value)
        large = sum(p.numel() * 4 for p in model.parameters()) > EXTERNAL_DATA_BYTES
        onnx.save_model(graph, str(tmp / output.name), save_as_external_data=large,
                        all_tensors_to_one_file=True, location=output.name + ".data")
        for f in raw.parent.iterdir():
            f.unlink()
        raw.parent.rmdir()
    return output


class OnnxGreedy:
    """Greedy decoding of an exported ONNX file with onnxruntime.

    `OnnxGreedy(path).generate(ids, max_new_tokens, eos_id)`; `.tokenizer` is the one stored in the
    file, `.config` its architecture. Graphs with a KV cache decode incrementally (one token per
    step after the prompt); graphs without rerun the whole sequence each step.
    providers: onnxruntime execution providers (default CPU); threads: intra-op threads (default: one per core).
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX file not found: {path}")
        options = ort.SessionOptions()
        if threads:  # onnxruntime's default: one per core
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as err:  # onnxruntime's own exception types: a truncated or foreign file
            raise CheckpointError(f"cannot load ONNX file {path}: {str(err).strip().splitlines()[0]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "xlab.arch" not in meta:
            raise CheckpointError(f"{path} was not exported by XLab (no xlab.arch metadata)")
        self.config = TransformerConfig(**json.loads(meta["xlab.arch"]))
        self.kv_cache = {i.name for i in self.session.get_inputs()} >= {"past_k", "past_v"}
        self.tokenizer = None
        if meta.get("xlab.tokenizer"):
            from xlab.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_str(meta["xlab.tokenizer"])
        self.eos_id = int(meta["xlab.eos_id"]) if "xlab.eos_id" in meta else None

    def empty_past(self, batch: int) -> np.ndarray:
        """(L, B, G, 0, D) float32: the past of the first call."""
        c = self.config
        return np.zeros((c.n_layers, batch, c.kv_heads, 0, c.head_dim), dtype=np.float32)

    def forward(self, ids: np.ndarray, past: tuple[np.ndarray, np.ndarray] | None = None):
        """logits (B, T, V) for ids (B, T); with a cache graph also (present_k, present_v)."""
        feed = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        if self.kv_cache:
            past_k, past_v = past if past is not None else (self.empty_past(len(ids)),) * 2
            feed |= {"past_k": past_k, "past_v": past_v}
            logits, present_k, present_v = self.session.run(None, feed)
            return logits, (present_k, present_v)
        return self.session.run(None, feed)[0]

    def generate(self, ids: Sequence[int] | Sequence[Sequence[int]] | np.ndarray, max_new_tokens: int,
                 eos_id: int | None = None) -> list[int] | list[list[int]]:
        """Greedy continuation of ids: one prompt (a list of ints) gives a list of new token ids; a batch
        (B, T) of equal-length prompts gives one list per row.

        A row stops after it produces eos_id (which is included); every row stops at max_new_tokens or
        at the context: the last token is predicted at position context - 1 (as generate.py's greedy search).
        Raises ValueError for a prompt longer than the context.
        """
        prompts = np.asarray(ids, dtype=np.int64)
        single = prompts.ndim == 1
        prompts = prompts[None] if single else prompts
        if prompts.ndim != 2 or prompts.shape[1] == 0:
            raise ValueError(f"expected a non-empty prompt of token ids or a (batch, length) array: {prompts.shape}")
        B, T = prompts.shape
        context = self.config.context
        if T > context:
            raise ValueError(f"prompt of {T} tokens exceeds the model's context of {context}")
        steps = min(max_new_tokens, context - T + 1)  # step i feeds T + i - 1 <= context tokens
        new = np.zeros((B, 0), dtype=np.int64)
        done = np.zeros(B, dtype=bool)
        past = None
        for _ in range(steps):
            if self.kv_cache:
                step_input = prompts if past is None else new[:, -1:]
                logits, past = self.forward(step_input, past)
            else:
                logits = self.forward(np.concatenate([prompts, new], axis=1))
            token = logits[:, -1].argmax(-1).astype(np.int64)
            token = np.where(done, eos_id if eos_id is not None else 0, token)  # finished rows: filler
            new = np.concatenate([new, token[:, None]], axis=1)
            if eos_id is not None:
                done |= token == eos_id
                if done.all():
                    break
        rows = []
        for row in new.tolist():
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id) + 1]
            rows.append(row)
        return rows[0] if single else rows
