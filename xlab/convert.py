"""Conversion between Hugging Face GPT-2 / Llama checkpoints and XLab's `Transformer`.

Four functions, two per direction:

- `config_from_hf(hf_config) -> TransformerConfig` and `state_dict_from_hf(hf_state_dict, hf_config)`
  load a `GPT2LMHeadModel` or `LlamaForCausalLM` into XLab;
- `hf_config_from_xlab(config)` and `hf_state_dict_from_xlab(state_dict, config)` go the other way.

Layout differences handled here:

- XLab fuses the query, key and value projections into `attn.qkv` (rows: q, then k, then v) and, for
  SwiGLU, the gate and up projections into `mlp.up` (rows: gate, then up). GPT-2's `c_attn` is already
  fused in the same order; Llama's are separate matrices and get concatenated.
- GPT-2 uses `Conv1D`, whose weight is (in, out): the transpose of `nn.Linear`'s (out, in).
- Llama's checkpoints in the transformers format already use rotate-half RoPE, the convention of
  `xlab.transformer.apply_rope`, so q and k need no permutation.
- XLab may round the vocabulary up (`pad_vocab_to`); the Hugging Face side always has exactly
  `vocab_size` rows. Import pads with zero rows, export slices them off.

Anything that does not map exactly raises `ValueError` naming the option, rather than producing a
model that silently computes something else. `transformers` is only imported inside functions, so
this module loads without it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from xlab.transformer import TransformerConfig

# Hugging Face activation names -> XLab's `mlp` for non-gated MLPs. gelu_new, gelu_fast and
# gelu_pytorch_tanh are all the tanh approximation of GELU (the first two written out in Python).
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                     "gelu": "gelu", "relu": "relu"}
# XLab `mlp` -> GPT-2's activation_function: gelu_new is what GPT-2 checkpoints use.
_XLAB_TO_GPT2_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def _unsupported(model: str, option: str, value: Any, why: str = "") -> ValueError:
    return ValueError(f"cannot convert {model}: {option}={value!r} is not supported" + (f" ({why})" if why else ""))


def _rope(hf_config) -> tuple[float, dict | None]:
    """(theta, the non-default RoPE parameters or None).

    transformers 5 keeps everything in `rope_parameters` (and aliases `rope_scaling` to it); older
    versions have `rope_theta` plus `rope_scaling` (None for plain RoPE, else {"type"/"rope_type": ...}).
    """
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    params = dict(params)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = getattr(hf_config, "rope_theta", 10000.0)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type != "default" or params:
        return float(theta), {"rope_type": rope_type, **params}
    return float(theta), None


# --------------------------------------------------------------------------- Hugging Face -> XLab


def config_from_hf(hf_config, **overrides) -> TransformerConfig:
    """XLab config with the architecture of a GPT2Config or LlamaConfig.

    overrides: extra TransformerConfig fields that have no Hugging Face counterpart, such as
    `pad_vocab_to`, or values to replace (e.g. dropout for fine-tuning).
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "gpt2":
        for option, supported in [("add_cross_attention", False), ("scale_attn_weights", True),
                                  ("scale_attn_by_inverse_layer_idx", False)]:
            if getattr(hf_config, option, supported) != supported:
                raise _unsupported("gpt2", option, getattr(hf_config, option))
        # reorder_and_upcast_attn only changes numerics of the eager fp16 path, not the function
        activation = hf_config.activation_function
        if activation not in _GPT2_ACTIVATIONS:
            raise _unsupported("gpt2", "activation_function", activation,
                               f"expected one of {sorted(_GPT2_ACTIVATIONS)}")
        fields = {
            "vocab_size": hf_config.vocab_size, "context": hf_config.n_positions, "n_layers": hf_config.n_layer,
            "n_heads": hf_config.n_head, "n_kv_heads": hf_config.n_head, "d_model": hf_config.n_embd,
            "d_ff": hf_config.n_inner or 4 * hf_config.n_embd, "position": "learned", "norm": "layernorm",
            "norm_eps": hf_config.layer_norm_epsilon, "norm_bias": True, "prenorm": True, "final_norm": True,
            "mlp": _GPT2_ACTIVATIONS[activation], "bias": True, "qk_norm": False,
            "tie_embeddings": bool(hf_config.tie_word_embeddings), "dropout_embed": float(hf_config.embd_pdrop),
            "dropout_attn": float(hf_config.attn_pdrop), "dropout_resid": float(hf_config.resid_pdrop),
            "init_std": hf_config.initializer_range}
    elif model_type == "llama":
        theta, scaling = _rope(hf_config)
        if scaling is not None:
            raise _unsupported("llama", "rope_scaling", scaling, "only the default RoPE maps to XLab")
        if hf_config.hidden_act not in ("silu", "swish"):
            raise _unsupported("llama", "hidden_act", hf_config.hidden_act, "XLab's swiglu gates with SiLU")
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        if head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
            raise _unsupported("llama", "head_dim", head_dim,
                               f"XLab needs head_dim = hidden_size / num_attention_heads = "
                               f"{hf_config.hidden_size}/{hf_config.num_attention_heads}")
        attention_bias, mlp_bias = bool(hf_config.attention_bias), bool(getattr(hf_config, "mlp_bias", False))
        if attention_bias != mlp_bias:
            raise _unsupported("llama", "attention_bias/mlp_bias", (attention_bias, mlp_bias),
                               "XLab has one `bias` flag for attention and MLP")
        fields = {
            "vocab_size": hf_config.vocab_size, "context": hf_config.max_position_embeddings,
            "n_layers": hf_config.num_hidden_layers, "n_heads": hf_config.num_attention_heads,
            "n_kv_heads": hf_config.num_key_value_heads or hf_config.num_attention_heads,
            "d_model": hf_config.hidden_size, "d_ff": hf_config.intermediate_size, "position": "rope",
            "rope_theta": theta, "norm": "rmsnorm", "norm_eps": hf_config.rms_norm_eps, "norm_bias": False,
            "prenorm": True, "final_norm": True, "mlp": "swiglu", "bias": attention_bias, "qk_norm": False,
            "tie_embeddings": bool(hf_config.tie_word_embeddings),
            "dropout_embed": 0.0, "dropout_attn": float(hf_config.attention_dropout or 0.0), "dropout_resid": 0.0,
            "init_std": hf_config.initializer_range}
    else:
        raise ValueError(f"cannot convert model_type={model_type!r}: only 'gpt2' and 'llama' are supported")
    fields.update(overrides)
    return TransformerConfig(**fields)


def _strip_prefix(hf_state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys relative to the base model, whether the dict came from the LM head model or the base model."""
    return {k.removeprefix(prefix): v for k, v in hf_state_dict.items()}


def _pad_rows(weight: Tensor, rows: int) -> Tensor:
    """(V, C) -> (rows, C) with zero rows appended: padded token ids are never produced by a tokenizer."""
    if weight.shape[0] == rows:
        return weight
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])])


def state_dict_from_hf(hf_state_dict: dict[str, Tensor], hf_config,
                       config: TransformerConfig | None = None) -> dict[str, Tensor]:
    """XLab state dict from a GPT2LMHeadModel or LlamaForCausalLM state dict.

    config: the XLab config the result is for (default `config_from_hf(hf_config)`); only its
    `padded_vocab_size` matters here, to pad the embedding rows.
    Raises ValueError on keys the conversion does not understand (e.g. cross-attention weights).
    """
    config = config or config_from_hf(hf_config)
    rows = config.padded_vocab_size
    model_type = hf_config.model_type
    sd = dict(hf_state_dict)
    out: dict[str, Tensor] = {}
    lm_head = sd.pop("lm_head.weight", None)

    def take(key: str) -> Tensor:
        if key not in sd:
            raise ValueError(f"cannot convert {model_type}: state dict has no {key!r}")
        return sd.pop(key)

    if model_type == "gpt2":
        sd = _strip_prefix(sd, "transformer.")
        for key in [k for k in sd if k.endswith((".attn.bias", ".attn.masked_bias"))]:
            if sd[key].dim() != 1:  # causal-mask buffers of old transformers versions, not parameters
                del sd[key]
        out["wte.weight"] = _pad_rows(take("wte.weight"), rows)
        out["wpe.weight"] = take("wpe.weight")
        for i in range(hf_config.n_layer):
            h, x = f"h.{i}.", f"blocks.{i}."
            for hf_name, name in [("ln_1", "norm1"), ("ln_2", "norm2")]:
                out[f"{x}{name}.weight"] = take(f"{h}{hf_name}.weight")
                out[f"{x}{name}.bias"] = take(f"{h}{hf_name}.bias")
            # Conv1D stores (in, out); nn.Linear wants (out, in)
            for hf_name, name in [("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                                  ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")]:
                out[f"{x}{name}.weight"] = take(f"{h}{hf_name}.weight").t().contiguous()
                out[f"{x}{name}.bias"] = take(f"{h}{hf_name}.bias")
        out["norm.weight"] = take("ln_f.weight")
        out["norm.bias"] = take("ln_f.bias")
    elif model_type == "llama":
        sd = _strip_prefix(sd, "model.")
        out["wte.weight"] = _pad_rows(take("embed_tokens.weight"), rows)
        for i in range(hf_config.num_hidden_layers):
            h, x = f"layers.{i}.", f"blocks.{i}."
            out[f"{x}norm1.weight"] = take(f"{h}input_layernorm.weight")
            out[f"{x}norm2.weight"] = take(f"{h}post_attention_layernorm.weight")
            groups = [("attn.qkv", [f"{h}self_attn.{p}_proj" for p in "qkv"]),
                      ("attn.proj", [f"{h}self_attn.o_proj"]),
                      ("mlp.up", [f"{h}mlp.gate_proj", f"{h}mlp.up_proj"]),  # gate first, as MLP.forward splits
                      ("mlp.down", [f"{h}mlp.down_proj"])]
            for name, hf_names in groups:
                out[f"{x}{name}.weight"] = torch.cat([take(f"{n}.weight") for n in hf_names])
                if config.bias:
                    out[f"{x}{name}.bias"] = torch.cat([take(f"{n}.bias") for n in hf_names])
        out["norm.weight"] = take("norm.weight")
    else:
        raise ValueError(f"cannot convert model_type={model_type!r}: only 'gpt2' and 'llama' are supported")

    if sd:
        raise ValueError(f"cannot convert {model_type}: unexpected keys {sorted(sd)[:8]}")
    if config.tie_embeddings and not getattr(hf_config, "tie_word_embeddings", True):
        raise ValueError(f"cannot convert {model_type}: tie_embeddings=True but the checkpoint's head is untied")
    if config.tie_embeddings or lm_head is None:
        if not config.tie_embeddings:
            raise ValueError(f"cannot convert {model_type}: untied embeddings but no 'lm_head.weight'")
        out["lm_head.weight"] = out["wte.weight"]  # same tensor, as in the tied XLab model
    else:
        out["lm_head.weight"] = _pad_rows(lm_head, rows)
    return out


# --------------------------------------------------------------------------- XLab -> Hugging Face


def _check(model: str, requirements: list[tuple[str, Any, Any]]) -> None:
    """Raise for the first (option, value, allowed values) whose value is not allowed."""
    for option, value, allowed in requirements:
        if value not in allowed:
            raise _unsupported(model, option, value, f"{model} needs {option} in {list(allowed)}")


def hf_config_from_xlab(config: TransformerConfig, **overrides):
    """A GPT2Config or LlamaConfig computing the same function as `Transformer(config)`.

    The target follows from the position encoding: learned -> GPT-2, rope -> Llama. Every other
    option must then match that architecture, else ValueError names the first that does not.
    overrides: extra config fields, e.g. bos_token_id / eos_token_id from the tokenizer (both
    default to None, since XLab does not know them).
    """
    import transformers

    # neither has a soft cap (Gemma 2's final_logit_softcapping is a third architecture); ReLU² fails the mlp checks
    common = [("prenorm", config.prenorm, [True]), ("final_norm", config.final_norm, [True]),
              ("qk_norm", config.qk_norm, [False]), ("logit_softcap", config.logit_softcap, [None])]
    tokens = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if config.position == "learned":
        _check("gpt2", [*common, ("norm", config.norm, ["layernorm"]), ("norm_bias", config.norm_bias, [True]),
                        ("mlp", config.mlp, list(_XLAB_TO_GPT2_ACTIVATION)), ("bias", config.bias, [True]),
                        ("n_kv_heads", config.kv_heads, [config.n_heads])])
        fields = dict(
            vocab_size=config.vocab_size, n_positions=config.context, n_embd=config.d_model, n_layer=config.n_layers,
            n_head=config.n_heads, n_inner=config.ff_dim, activation_function=_XLAB_TO_GPT2_ACTIVATION[config.mlp],
            resid_pdrop=config.dropout_resid, embd_pdrop=config.dropout_embed, attn_pdrop=config.dropout_attn,
            layer_norm_epsilon=config.norm_eps, initializer_range=config.init_std,
            tie_word_embeddings=config.tie_embeddings, **tokens)
        fields.update(overrides)
        return transformers.GPT2Config(**fields)
    if config.position == "rope":
        _check("llama", [*common, ("norm", config.norm, ["rmsnorm"]), ("mlp", config.mlp, ["swiglu"])])
        if config.dropout_embed or config.dropout_resid:
            # dropout changes training only, not the function the weights compute; Llama has no such layers
            warnings.warn("Llama has no embedding or residual dropout: dropout_embed/dropout_resid are dropped",
                          stacklevel=2)
        fields = dict(
            vocab_size=config.vocab_size, hidden_size=config.d_model, intermediate_size=config.ff_dim,
            num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
            num_key_value_heads=config.kv_heads, head_dim=config.head_dim, hidden_act="silu",
            max_position_embeddings=config.context, initializer_range=config.init_std, rms_norm_eps=config.norm_eps,
            tie_word_embeddings=config.tie_embeddings, attention_bias=config.bias, mlp_bias=config.bias,
            attention_dropout=config.dropout_attn,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, **tokens)
        fields.update(overrides)
        return transformers.LlamaConfig(**fields)
    raise _unsupported("XLab model", "position", config.position,
                       "only learned (GPT-2) and rope (Llama) positions have a Hugging Face equivalent")


def hf_state_dict_from_xlab(state_dict: dict[str, Tensor], config: TransformerConfig) -> dict[str, Tensor]:
    """GPT2LMHeadModel or LlamaForCausalLM state dict (see `hf_config_from_xlab`) from an XLab one.

    Padded vocabulary rows are sliced off; the tensors are copies or views of the inputs.
    """
    hf_config = hf_config_from_xlab(config)  # validates the architecture
    sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}  # torch.compile'd modules
    V, C = config.vocab_size, config.d_model
    q_dim, kv_dim = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    out: dict[str, Tensor] = {}
    if hf_config.model_type == "gpt2":
        out["transformer.wte.weight"] = sd["wte.weight"][:V]
        out["transformer.wpe.weight"] = sd["wpe.weight"]
        for i in range(config.n_layers):
            h, x = f"transformer.h.{i}.", f"blocks.{i}."
            for hf_name, name in [("ln_1", "norm1"), ("ln_2", "norm2")]:
                out[f"{h}{hf_name}.weight"] = sd[f"{x}{name}.weight"]
                out[f"{h}{hf_name}.bias"] = sd[f"{x}{name}.bias"]
            for hf_name, name in [("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"),
                                  ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")]:
                out[f"{h}{hf_name}.weight"] = sd[f"{x}{name}.weight"].t().contiguous()
                out[f"{h}{hf_name}.bias"] = sd[f"{x}{name}.bias"]
        out["transformer.ln_f.weight"] = sd["norm.weight"]
        out["transformer.ln_f.bias"] = sd["norm.bias"]
    else:
        out["model.embed_tokens.weight"] = sd["wte.weight"][:V]
        for i in range(config.n_layers):
            h, x = f"model.layers.{i}.", f"blocks.{i}."
            out[f"{h}input_layernorm.weight"] = sd[f"{x}norm1.weight"]
            out[f"{h}post_attention_layernorm.weight"] = sd[f"{x}norm2.weight"]
            splits = [("attn.qkv", [f"{h}self_attn.{p}_proj" for p in "qkv"], [q_dim, kv_dim, kv_dim]),
                      ("attn.proj", [f"{h}self_attn.o_proj"], [C]),
                      ("mlp.up", [f"{h}mlp.gate_proj", f"{h}mlp.up_proj"], [config.ff_dim, config.ff_dim]),
                      ("mlp.down", [f"{h}mlp.down_proj"], [C])]
            for name, hf_names, sizes in splits:
                for param in ["weight", "bias"] if config.bias else ["weight"]:
                    for hf_name, part in zip(hf_names, sd[f"{x}{name}.{param}"].split(sizes), strict=True):
                        out[f"{hf_name}.{param}"] = part.clone()
        out["model.norm.weight"] = sd["norm.weight"]
    # Hugging Face models list the tied head in their state dict too; load_state_dict expects it
    out["lm_head.weight"] = out["transformer.wte.weight" if hf_config.model_type == "gpt2"
                                else "model.embed_tokens.weight"] if config.tie_embeddings else sd["lm_head.weight"][:V]
    return out
