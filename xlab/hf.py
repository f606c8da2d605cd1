"""Hugging Face folders in and out: `export_hf` writes what `transformers` loads with no custom code,
`import_hf` turns a local GPT-2 or Llama folder into an XLab exported checkpoint.

The weight and config mapping lives in `xlab.convert`; this module handles files, tokenizers and
failure. `transformers` is imported inside functions, so `xlab` works without it.

Tokenizers: XLab's `Tokenizer` needs the end-of-document token `<|endoftext|>` (GPT-2's name).
A Hugging Face tokenizer that has another end-of-sequence token (Llama's `</s>`, ...) is imported by
renaming that token to `<|endoftext|>` (and a beginning-of-sequence token such as `<s>` to `<|bos|>`
when the tokenizer has no `<|bos|>`): ids, and so the embeddings, stay the same; only the string
the token decodes to changes. A tokenizer that declares no end-of-sequence token is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers
from torch import Tensor

from xlab.checkpoint import CheckpointError, Loaded, _first_line, atomic_output, check_output, write_export
from xlab.convert import config_from_hf, hf_config_from_xlab, hf_state_dict_from_xlab, state_dict_from_hf
from xlab.tokenizer import BOS, EOS, Tokenizer
from xlab.transformer import TransformerConfig

SUPPORTED = ("gpt2", "llama")
HF_CONFIG, HF_WEIGHTS, HF_INDEX, HF_BIN = ("config.json", "model.safetensors", "model.safetensors.index.json",
                                          "pytorch_model.bin")


# --------------------------------------------------------------------------- XLab -> Hugging Face


def hf_tokenizer(tokenizer: Tokenizer, context: int | None = None):
    """A `PreTrainedTokenizerFast` that encodes exactly as `tokenizer` does.

    `split_special_tokens=True` because XLab encodes the text "<|endoftext|>" as ordinary
    characters, never as the special id (see `xlab.tokenizer.Tokenizer`); without it AutoTokenizer
    would give different ids for such text.
    """
    from transformers import PreTrainedTokenizerFast

    hf = tokenizer.hf
    # the BOS transformers (and lm-eval's hf model) condition an empty input on: the token documents start after
    names = {"eos_token": EOS, "bos_token": hf.id_to_token(tokenizer.start_id),
             "pad_token": hf.id_to_token(tokenizer.pad_id)}
    extra = {"model_max_length": context} if context else {}
    return PreTrainedTokenizerFast(tokenizer_object=hf, split_special_tokens=True, clean_up_tokenization_spaces=False,
                                   **names, **extra)


def export_hf(loaded: Loaded, output: str | Path, force: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face folder for a GPT-2- or Llama-shaped XLab model.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json.
    Raises ValueError naming the first option that has no Hugging Face equivalent (ALiBi, post-norm, ...),
    before anything is written.
    """
    import transformers

    config, tok = loaded.model.config, loaded.tokenizer
    ids = {"bos_token_id": tok.start_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    hf_config = hf_config_from_xlab(config, **ids)  # raises for architectures that do not map
    check_output(output, force)
    state = hf_state_dict_from_xlab(loaded.model.state_dict(), config)
    dtype = dtype or loaded.model.wte.weight.dtype
    hf_config.dtype = dtype  # recorded in config.json, so from_pretrained(dtype="auto") keeps it
    with torch.device("meta"):  # no memory or time spent initialising weights that are replaced next
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with atomic_output(output, force) as tmp:
        result = model.load_state_dict({k: v.detach().to("cpu", dtype) for k, v in state.items()},
                                       strict=True, assign=True)
        if result.missing_keys or result.unexpected_keys:  # strict=True raises; this guards future versions
            raise CheckpointError(f"internal error: weights do not fit {type(model).__name__}: {result}")
        if config.tie_embeddings:
            model.tie_weights()  # assign=True replaced the shared parameter with two tensors
        # no max_length: generate(max_new_tokens=...) is how transformers sets the length, and warns when both are set
        model.generation_config = transformers.GenerationConfig(**ids, do_sample=False)
        bar = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # a bar for one small file is noise
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if bar:
                transformers.utils.logging.enable_progress_bar()
        hf_tokenizer(tok, config.context).save_pretrained(tmp)
        _portable_tokenizer_config(tmp / "tokenizer_config.json")
        for f in tmp.iterdir():
            f.chmod(0o644)  # some writers create files private to the user
    return Path(output)


def _portable_tokenizer_config(path: Path) -> None:
    """Name the tokenizer class `PreTrainedTokenizerFast`, which transformers 4.x also knows
    (transformers 5 writes `TokenizersBackend`, a class older versions lack)."""
    data = json.loads(path.read_text())
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------- Hugging Face -> XLab


def read_hf_config(source: Path):
    """The GPT2Config / LlamaConfig of a folder; CheckpointError for anything else."""
    file = source / HF_CONFIG
    if not source.is_dir():
        raise CheckpointError(f"{source} is not a folder: give a Hugging Face model folder (with {HF_CONFIG})")
    if not file.is_file():
        raise CheckpointError(f"{source} is not a Hugging Face model folder: {HF_CONFIG} is missing")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {file}: {_first_line(err)}") from None
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in SUPPORTED:
        raise CheckpointError(f"{source} holds a {model_type!r} model: only {' and '.join(SUPPORTED)} "
                              "architectures can be imported")
    import transformers

    return transformers.AutoConfig.for_model(**data)


def read_hf_weights(source: Path) -> dict[str, Tensor]:
    """All tensors of a folder: model.safetensors, its sharded form, or pytorch_model.bin (pickle-free)."""
    index = source / HF_INDEX
    try:
        if (source / HF_WEIGHTS).is_file():
            return load_file(source / HF_WEIGHTS)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            weights: dict[str, Tensor] = {}
            for shard in shards:
                weights.update(load_file(source / shard))
            return weights
        if (source / HF_BIN).is_file():
            return torch.load(source / HF_BIN, map_location="cpu", weights_only=True)
    except Exception as err:  # SafetensorError, a missing shard, a foreign pickle: all one message
        raise CheckpointError(f"cannot read the weights in {source} (truncated or corrupt?): "
                              f"{_first_line(err)}") from None
    raise CheckpointError(f"{source} has no weights: expected {HF_WEIGHTS}, {HF_INDEX} or {HF_BIN}")


def _declared_token(source: Path, role: str, hf: HFTokenizer) -> str | None:
    """The string of the `role` ("eos", "bos") token the folder declares, wherever it declares it."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = source / name
        if file.is_file():
            value = json.loads(file.read_text()).get(f"{role}_token")
            if isinstance(value, dict):  # serialised AddedToken
                value = value.get("content")
            if isinstance(value, str):
                return value
    for name in ("generation_config.json", HF_CONFIG):
        file = source / name
        if file.is_file():
            value = json.loads(file.read_text()).get(f"{role}_token_id")
            value = value[0] if isinstance(value, list) and value else value
            if isinstance(value, int) and hf.id_to_token(value) is not None:
                return hf.id_to_token(value)
    return None


def _rename_tokens(data: Any, renames: dict[str, str]) -> Any:
    """`data` (part of a tokenizer.json) with every string, and dict key, equal to a key of renames replaced."""
    if isinstance(data, str):
        return renames.get(data, data)
    if isinstance(data, list):
        return [_rename_tokens(x, renames) for x in data]
    if isinstance(data, dict):
        return {renames.get(k, k): _rename_tokens(v, renames) for k, v in data.items()}
    return data


def _raw_tokenizer(source: Path) -> HFTokenizer:
    if (source / "tokenizer.json").is_file():
        try:
            return HFTokenizer.from_file(str(source / "tokenizer.json"))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"cannot read {source / 'tokenizer.json'}: {_first_line(err)}") from None
    if (source / "vocab.json").is_file() and (source / "merges.txt").is_file():
        try:
            hf = HFTokenizer(models.BPE.from_file(str(source / "vocab.json"), str(source / "merges.txt")))
        except Exception as err:
            raise CheckpointError(f"cannot read {source}/vocab.json and merges.txt: {_first_line(err)}") from None
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # as GPT-2's
        hf.decoder = decoders.ByteLevel()
        return hf
    raise CheckpointError(f"{source} has no tokenizer: expected tokenizer.json, or vocab.json and merges.txt")


def tokenizer_from_hf(source: str | Path) -> tuple[Tokenizer, dict[str, str]]:
    """XLab tokenizer of a Hugging Face folder, and the tokens renamed to XLab's names (see module doc)."""
    source = Path(source)
    hf = _raw_tokenizer(source)
    if hf.token_to_id(EOS) is not None:
        return Tokenizer(hf) if (source / "tokenizer.json").is_file() else Tokenizer.load(source), {}
    renames: dict[str, str] = {}
    for role, name in (("eos", EOS), ("bos", BOS)):
        declared = _declared_token(source, role, hf)
        if declared is None or hf.token_to_id(name) is not None or declared in renames:
            continue  # e.g. bos == eos: the bos falls back to the eos, as for GPT-2
        renames[declared] = name
    if EOS not in renames.values():
        raise CheckpointError(f"the tokenizer in {source} has no {EOS!r} token and declares no eos_token to use "
                              "as XLab's end-of-document token")
    data = json.loads(hf.to_str())
    # rename the token wherever it is named as a token: the vocabulary, merges, added tokens and the
    # templates that insert it; not in normalizers or pre-tokenizers, whose strings are text patterns
    for key in ("added_tokens", "model", "post_processor"):
        data[key] = _rename_tokens(data.get(key), renames)
    renamed = HFTokenizer.from_str(json.dumps(data))
    for old, new in renames.items():
        if renamed.token_to_id(new) != hf.token_to_id(old):  # the ids are what the weights were trained on
            raise CheckpointError(f"internal error: renaming {old!r} to {new!r} changed its id")
    return Tokenizer(renamed), renames


def load_hf(source: str | Path, pad_vocab_to: int = 1) -> tuple[TransformerConfig, dict[str, Tensor], Tokenizer, dict]:
    """(config, XLab state dict, tokenizer, metadata) of a local Hugging Face GPT-2 or Llama folder."""
    source = Path(source)
    if not source.exists():
        raise CheckpointError(f"not found: {source}")
    hf_config = read_hf_config(source)
    config = config_from_hf(hf_config, pad_vocab_to=pad_vocab_to)
    hf_state = read_hf_weights(source)
    state = state_dict_from_hf(hf_state, hf_config, config)
    tok, renames = tokenizer_from_hf(source)
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"the tokenizer in {source} has {tok.vocab_size} tokens but the model only "
                              f"{config.vocab_size} embeddings")
    floats = [v.dtype for v in hf_state.values() if v.is_floating_point()]
    meta = {"source": str(source), "imported_from": hf_config.model_type,
            "dtype": str(max(set(floats), key=floats.count)).removeprefix("torch.") if floats else None,
            "renamed_tokens": renames}
    return config, state, tok, meta


def import_hf(source: str | Path, output: str | Path, force: bool = False, dtype: torch.dtype | None = None,
              pad_vocab_to: int = 1) -> Path:
    """Convert a Hugging Face folder into an XLab exported checkpoint folder (see `xlab.checkpoint`).

    dtype: default the source's (a bf16 Llama stays bf16). pad_vocab_to: round the embedding rows up.
    """
    check_output(output, force)
    config, state, tok, meta = load_hf(source, pad_vocab_to)
    dtype = dtype or getattr(torch, meta["dtype"] or "float32")
    return write_export(state, config, tok, meta, output, force=force, dtype=dtype)
