"""ONNX export of an XLab model, and `OnnxModel`: an exported file decoded by `xlab.generate` in onnxruntime.

Two graphs (shapes: B batch, T new tokens, P cached positions, L layers, G key/value heads,
D head dimension, V vocabulary):

- without cache: input_ids (B, T) int64 -> logits (B, T, V);
- with cache (`kv_cache=True`): input_ids (B, T), positions (B, T) int64, key_mask (B, P + T) bool,
  past_k and past_v (L, B, G, P, D) -> logits (B, T, V), present_k and present_v (L, B, G, P + T, D).
  The first call passes P = 0 (empty past tensors); each next call passes the presents of the
  previous one. positions and key_mask are `Transformer.forward`'s: a row's position per token, and
  False for the keys of left padding, so prompts of different lengths decode in one batch
  (without padding: positions P .. P + T - 1 in every row, key_mask all True).

B, T and P are dynamic axes. The file's metadata carries the architecture (`xlab.arch`), the
tokenizer (`xlab.tokenizer`) and its end-of-document id, so `OnnxModel` needs nothing else.

`OnnxDecoder` re-states the model's forward for export: `Attention.forward` decides
`is_causal` from the sequence length, which tracing turns into a tensor and `torch.export` into a
symbolic bool, and neither can be passed to SDPA. Here the graph without cache uses SDPA's
`is_causal=True` (correct for any T, as queries and keys then start together), the graph with
cache the model's own explicit mask (`Transformer.attention_mask`), offset by P. The tests hold
both to the PyTorch model's logits.
"""

from __future__ import annotations

import copy
import json
import warnings
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

    def forward(self, idx: Tensor, positions: Tensor | None = None, key_mask: Tensor | None = None,
                past_k: Tensor | None = None, past_v: Tensor | None = None):
        """Without cache: idx (B, T) only. With: positions (B, T), key_mask (B, P + T), past (L, B, G, P, D),
        as `Transformer.forward(idx, cache, positions, key_mask)` takes them for left-padded rows."""
        m, c = self.model, self.model.config
        T = idx.shape[1]
        past = past_k.shape[3] if self.kv_cache else 0
        if positions is None:  # the graph without cache: one (1, T) row shared by the batch
            positions = torch.arange(T, device=idx.device)[None]
        x = m.wte(idx)
        if m.wpe is not None:
            x = x + m.wpe(positions)
        elif c.position == "sinusoidal":
            x = x + m.sinusoid[positions].to(x.dtype)
        rope = None
        if c.position == "rope":  # (B, 1, T, D): broadcast over the heads
            rope = (m.rope_cos[positions][:, None].to(x.dtype), m.rope_sin[positions][:, None].to(x.dtype))
        # the model's own mask (None without cache: SDPA's is_causal, right when there is no past)
        mask = m.attention_mask(positions, past, key_mask, x.dtype)
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
        logits = m.logits(_norm(m.norm, x))  # the head, and the soft cap if the model has one
        if self.kv_cache:
            return logits, torch.stack(keys), torch.stack(values)
        return logits


def _io(config: TransformerConfig, kv_cache: bool) -> tuple[list[str], list[str], dict]:
    inputs, outputs = ["input_ids"], ["logits"]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    if kv_cache:
        inputs += ["positions", "key_mask", "past_k", "past_v"]
        outputs += ["present_k", "present_v"]
        axes |= {"positions": {0: "batch", 1: "sequence"}, "key_mask": {0: "batch", 1: "total"},
                 "past_k": {1: "batch", 3: "past"}, "past_v": {1: "batch", 3: "past"},
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
    if kv_cache:  # row 1 left-padded by one, so the mask's padding path is traced
        positions = torch.tensor([[2, 3, 4], [1, 2, 3]])
        key_mask = torch.tensor([[True] * 5, [False] + [True] * 4])
        past = torch.zeros(config.n_layers, 2, config.kv_heads, 2, config.head_dim)
        example += (positions, key_mask, past, past.clone())
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


# torch dtypes of the graphs' inputs and outputs, as onnxruntime's IO binding names them
_NUMPY_TYPES = {torch.int64: np.int64, torch.bool: np.bool_, torch.float32: np.float32}


def cuda_available() -> bool:
    """Whether `OnnxModel(device="cuda")` can run: onnxruntime's CUDA provider, and CUDA in PyTorch."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


class OnnxModel:
    """An `export-onnx` file run by onnxruntime under `xlab.generate`'s decoding: a `Decodable`, so every
    strategy (greedy, sampling, beam search) runs on it as on the PyTorch model, with the same code.

        model = OnnxModel("model.onnx")          # device="cuda": onnxruntime's CUDA provider
        completions = generate(model, [model.tokenizer.encode_prompt("def ")], config, generator)

    `.tokenizer` is the one stored in the file (None if it has none), `.config` its architecture. Inputs
    and outputs stay torch tensors on `device`, bound to the session by their memory (IO binding): logits
    are filtered and sampled by torch, and on CUDA the cache never leaves the GPU. Graphs with a KV cache
    decode incrementally; graphs without rerun the whole sequence each step and, as they take no positions
    or key mask, cannot decode a batch of prompts of different lengths (nor can cache graphs exported
    before those inputs existed): that is a ValueError saying to re-export.
    threads: intra-op threads (default: one per core).
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", threads: int | None = None):
        import onnxruntime as ort

        path = Path(path)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CheckpointError(f"the installed onnxruntime {ort.__version__} has no CUDA provider "
                                      "(install onnxruntime-gpu, or run on the CPU)")
            if not torch.cuda.is_available():  # the inputs and outputs are torch tensors on the GPU
                raise CheckpointError("onnxruntime has a CUDA provider, but PyTorch has no CUDA here "
                                      "(install a CUDA build of PyTorch, or run on the CPU)")
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", index)
            # CPU second: onnxruntime places the few ops CUDA lacks (shape arithmetic) there
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        elif self.device.type == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise CheckpointError(f"onnxruntime runs on cpu or cuda here, not {self.device.type}")
        if not path.is_file():
            raise CheckpointError(f"ONNX file not found: {path}")
        options = ort.SessionOptions()
        if threads:  # onnxruntime's default: one per core
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as err:  # onnxruntime's own exception types: a truncated or foreign file
            raise CheckpointError(f"cannot load ONNX file {path}: {str(err).strip().splitlines()[0]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "xlab.arch" not in meta:
            raise CheckpointError(f"{path} was not exported by XLab (no xlab.arch metadata)")
        self.path = path
        self.config = TransformerConfig(**json.loads(meta["xlab.arch"]))
        inputs = {i.name for i in self.session.get_inputs()}
        self.kv_cache = inputs >= {"past_k", "past_v"}
        self.masked = inputs >= {"positions", "key_mask"}  # only cache graphs of this version have them
        self.tokenizer = None
        if meta.get("xlab.tokenizer"):
            from xlab.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.from_str(meta["xlab.tokenizer"])

    def start(self, batch: int, max_len: int) -> _OrtState:
        """A `ModelState` for `batch` rows of up to max_len positions."""
        return _OrtState(self, batch, max_len)

    def run(self, inputs: dict[str, Tensor], outputs: dict[str, Tensor]) -> None:
        """Run the session on torch tensors on `device`, writing its outputs into `outputs` (preallocated)."""
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        for bind, tensors in ((binding.bind_input, inputs), (binding.bind_output, outputs)):
            for name, t in tensors.items():
                assert t.is_contiguous() and t.device == self.device, name
                bind(name, kind, index, _NUMPY_TYPES[t.dtype], tuple(t.shape), t.data_ptr())
        if kind == "cuda":
            torch.cuda.synchronize(self.device)  # torch's stream wrote the inputs, onnxruntime's reads them
        self.session.run_with_iobinding(binding)
        if kind == "cuda":
            binding.synchronize_outputs()  # done before torch reads them


class _OrtState:
    """`ModelState` of an `OnnxModel`: the cache is the graph's present_k/present_v (L, R, G, length, D),
    fed back as the next past; a graph without cache keeps the token ids (R, length) and reruns them."""

    def __init__(self, model: OnnxModel, batch: int, max_len: int):
        self.model, self.max_len = model, max_len
        c, device = model.config, model.device
        if model.kv_cache:
            self.k = self.v = torch.zeros(c.n_layers, batch, c.kv_heads, 0, c.head_dim, device=device)
        else:
            self.ids = torch.zeros(batch, 0, dtype=torch.long, device=device)

    @property
    def length(self) -> int:
        return self.k.shape[3] if self.model.kv_cache else self.ids.shape[1]

    def forward(self, ids: Tensor, positions: Tensor | None, key_mask: Tensor | None) -> Tensor:
        m, c = self.model, self.model.config
        R, T = ids.shape
        S = self.length + T
        if S > self.max_len:  # as KVCache's check in Transformer.forward
            raise ValueError(f"sequence of {S} tokens exceeds the cache length of {self.max_len}")
        if positions is not None and not m.masked:
            raise ValueError(f"{m.path} takes no positions or key mask, which prompts of different lengths need: "
                             "export it again with `manage.py export-onnx --kv-cache`")
        if not m.kv_cache:
            self.ids = torch.cat([self.ids, ids], dim=1)
            logits = torch.empty(R, S, c.vocab_size, device=m.device)
            m.run({"input_ids": self.ids}, {"logits": logits})
            return logits[:, -1]
        logits = torch.empty(R, T, c.vocab_size, device=m.device)
        inputs = {"input_ids": ids.contiguous()}
        if m.masked:
            if positions is None:  # every row at the same positions, every key real: what the graph needs spelled out
                positions = torch.arange(self.length, S, device=m.device).expand(R, T)
                key_mask = torch.ones(R, S, dtype=torch.bool, device=m.device)
            inputs |= {"positions": positions.contiguous(), "key_mask": key_mask.contiguous()}
        shape = (c.n_layers, R, c.kv_heads, S, c.head_dim)
        present_k, present_v = torch.empty(shape, device=m.device), torch.empty(shape, device=m.device)
        m.run(inputs | {"past_k": self.k, "past_v": self.v},
              {"logits": logits, "present_k": present_k, "present_v": present_v})
        self.k, self.v = present_k, present_v
        return logits[:, -1]

    def restart(self) -> None:
        if self.model.kv_cache:
            self.k, self.v = self.k[:, :, :, :0], self.v[:, :, :, :0]
        else:
            self.ids = self.ids[:, :0]

    def select(self, index: Tensor) -> None:
        if self.model.kv_cache:
            self.k, self.v = self.k.index_select(1, index), self.v.index_select(1, index)
        else:
            self.ids = self.ids.index_select(0, index)

    def reorder(self, index: Tensor, shared: int) -> None:
        self.select(index)  # the graph returns new tensors each step: there is no copy to save
