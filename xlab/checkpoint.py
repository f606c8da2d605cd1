"""Reading and writing model checkpoints, without Lightning.

Two formats carry a model and its tokenizer:
- a training checkpoint (`*.ckpt`, written by Lightning): weights under `state_dict` with the
  prefix `model.`, optimizer state, and an `xlab` entry holding the architecture, the
  tokenizer's JSON and training metadata;
- an exported folder (`manage.py export-checkpoint`): `model.safetensors`, `xlab.json`
  (architecture, metadata, the SHA-256 of the other two files) and `tokenizer.json`; no pickle anywhere.

Loading never unpickles arbitrary objects: `torch.load(weights_only=True)` for the training
checkpoint, safetensors and JSON for the exported folder, whose hashes are checked before use.
Every writer goes through `atomic_output`: the result appears complete under its name or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from xlab.tokenizer import Tokenizer
from xlab.transformer import Transformer, TransformerConfig

EXPORT_WEIGHTS, EXPORT_META, EXPORT_TOKENIZER = "model.safetensors", "xlab.json", "tokenizer.json"
EXPORT_FORMAT = "xlab-export-1"
# the dtypes a loaded or exported model's weights may be cast to (`load_checkpoint`, `export_checkpoint`), by name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not XLab's, or an output that may not be written."""


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    meta: dict = field(default_factory=dict)  # step, tokens_seen, val_loss, source path, ...


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_checkpoint_file(path: Path) -> dict:
    """The whole dict of an XLab Lightning checkpoint, loaded pickle-free with tensors memory-mapped."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated zip, foreign pickle globals, not a torch file at all
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(err)}") from None
    if not isinstance(ckpt, dict) or "xlab" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an XLab training checkpoint (no 'xlab' entry)")
    return ckpt


def run_counters(run: Path) -> tuple[int, int] | None:
    """A run folder's last.ckpt: its optimizer steps and tokens seen (the exact counters), or None without one
    (or without tokens seen)."""
    path = run / "checkpoints" / "last.ckpt"
    if not path.is_file():
        return None
    ckpt = read_checkpoint_file(path)
    tokens = ckpt["xlab"].get("tokens_seen")
    return (int(ckpt["global_step"]), int(tokens)) if isinstance(tokens, int) else None


def read_training_checkpoint(path: Path) -> dict:
    """The `xlab` entry and the model's weights of a Lightning checkpoint (pickle-free load)."""
    ckpt = read_checkpoint_file(path)
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    return {**ckpt["xlab"], "weights": weights}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_export_meta(path: Path) -> dict:
    """The parsed `xlab.json` of an exported folder (no weights read, no hash checked)."""
    meta_file = path / EXPORT_META
    if not meta_file.is_file():
        hint = (": it looks like a Hugging Face folder, convert it with `manage.py import-hf`"
                if (path / "config.json").is_file() else "")
        raise CheckpointError(f"{path} is not an exported XLab checkpoint: {EXPORT_META} is missing{hint}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {meta_file}: {_first_line(err)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("arch"), dict):
        raise CheckpointError(f"{meta_file} has no 'arch' entry: not an exported XLab checkpoint")
    return meta


def verify_export(path: Path, meta: dict) -> None:
    """Check every file against the SHA-256 recorded in xlab.json at export time.

    A mismatch means the file was truncated, corrupted or edited after the export; loading it
    anyway could give a model that silently computes something else. So could a file with no recorded hash.
    """
    recorded = meta.get("sha256")
    recorded = recorded if isinstance(recorded, dict) else {}
    read = [EXPORT_WEIGHTS] + ([EXPORT_TOKENIZER] if (path / EXPORT_TOKENIZER).is_file() else [])
    unrecorded = [name for name in read if name not in recorded]
    if unrecorded:
        raise CheckpointError(f"{path / EXPORT_META} records no SHA-256 for {', '.join(unrecorded)}, so its content "
                              "cannot be checked (the file was edited or written by another tool): export it again")
    for name, expected in recorded.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path} is incomplete: {name} is missing")
        found = file_sha256(file)
        if found != expected:
            raise CheckpointError(f"{file} does not match the content hash recorded in {EXPORT_META} "
                                  f"(sha256 {found[:12]}… instead of {expected[:12]}…): the file is truncated, "
                                  "corrupt or was modified after export; export it again")


def read_export(path: Path, verify: bool = True) -> dict:
    meta = read_export_meta(path)
    weights_file = path / EXPORT_WEIGHTS
    if not weights_file.is_file():
        raise CheckpointError(f"{path} is not an exported XLab checkpoint: {EXPORT_WEIGHTS} is missing")
    if verify:
        verify_export(path, meta)
    try:
        weights = load_file(weights_file)
    except Exception as err:  # SafetensorError derives from Exception only
        raise CheckpointError(f"cannot read {weights_file} (truncated or corrupt?): {_first_line(err)}") from None
    tokenizer = path / EXPORT_TOKENIZER
    return {**meta, "weights": weights, "tokenizer": tokenizer.read_text() if tokenizer.is_file() else None}


def config_from_dict(arch: dict, source: Path | str) -> TransformerConfig:
    try:
        return TransformerConfig(**arch)
    except TypeError as err:  # an option this version of XLab does not know
        raise CheckpointError(f"{source}: architecture not understood by this XLab version: {err}") from None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", tokenizer: str | Path | None = None,
                    dtype: torch.dtype | None = None) -> Loaded:
    """Load a training checkpoint or an exported folder: the model in eval mode, and its tokenizer.

    `tokenizer` (a tokenizer.json or a folder) overrides the one stored with the checkpoint.
    An exported folder's files are checked against their recorded SHA-256 first.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    data = read_export(path) if path.is_dir() else read_training_checkpoint(path)
    config = config_from_dict(data["arch"], path)
    model = Transformer(config)
    weights = data["weights"]
    if config.tie_embeddings:
        weights.setdefault("lm_head.weight", weights.get("wte.weight"))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the architecture: {_first_line(err)}") from None
    if tokenizer is not None:
        tok = Tokenizer.load(tokenizer)
    elif data.get("tokenizer"):
        tok = Tokenizer.from_str(data["tokenizer"])
    else:
        raise CheckpointError(f"{path} carries no tokenizer: pass one with --tokenizer")
    if tok.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}: "
                              "this tokenizer does not belong to this checkpoint")
    model = model.to(device=device, dtype=dtype).eval()
    return Loaded(model, tok, {k: v for k, v in data.items() if k not in ("weights", "tokenizer", "arch")})


def run_folder(ckpt: Path) -> Path | None:
    """The run folder a checkpoint of `fit` lives in (`<run>/checkpoints/*.ckpt`), or None for one elsewhere."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def fresh_name(folder: Path, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... when earlier names (the same second's evaluations) are taken in folder."""
    taken = sum(1 for _ in folder.glob(f"{name}*"))
    return name if taken == 0 else f"{name}-{taken + 1}"


def check_output(output: str | Path, force: bool) -> None:
    """Refuse an existing output unless `force`: call it before slow work, so the error comes first."""
    output = Path(output)
    if (output.exists() or output.is_symlink()) and not force:
        raise CheckpointError(f"{output} already exists: choose another output or pass --force")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_in(new: Path, output: Path) -> None:
    """Rename `new` to `output`; an existing output is moved aside first and only deleted once the
    new one is in place, so a failure at any point leaves the old output intact."""
    old = None
    if output.exists() or output.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent)) / output.name
        os.replace(output, old)
    try:
        os.replace(new, output)
    except BaseException:
        if old is not None:
            os.replace(old, output)
        raise
    finally:
        if old is not None:
            _remove(old.parent)


@contextmanager
def atomic_output(output: str | Path, force: bool = False, is_dir: bool = True) -> Iterator[Path]:
    """Yield a fresh hidden folder beside `output` to write into; when the block succeeds its result
    replaces `output` by rename, when it fails (or is interrupted) the folder is removed.

    is_dir: the folder itself becomes `output`. Otherwise the block writes the file `tmp / output.name`
    (plus, for example, an external-data file beside it) and each file is renamed into output's folder.
    Staying in the same folder keeps the renames on one file system, hence atomic.
    """
    output = Path(output)
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
    try:
        yield tmp
        if is_dir:
            _swap_in(tmp, output)
        else:
            main = tmp / output.name
            if not main.is_file():
                raise CheckpointError(f"nothing was written for {output}")
            for extra in sorted(tmp.iterdir()):  # companions first: the main file appears last, complete
                if extra != main:
                    _swap_in(extra, output.parent / extra.name)
            _swap_in(main, output)
    finally:
        _remove(tmp)


def write_export(state: dict[str, Tensor], config: TransformerConfig, tokenizer: Tokenizer, meta: dict,
                 output: str | Path, force: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write an exported folder from a state dict (`Transformer`'s keys), its config and tokenizer.

    dtype: cast floating-point weights (default: keep each tensor's dtype). The tied head is not
    stored twice. Fails, leaving nothing behind, if the weights do not fit `config`.
    """
    output = Path(output)
    expected = {k: v.shape for k, v in _meta_model(config).state_dict().items()}
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    if config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # the same tensor as wte.weight
        expected.pop("lm_head.weight")
    wrong = sorted(set(state) ^ set(expected)) + sorted(k for k in state if k in expected
                                                         and tuple(state[k].shape) != tuple(expected[k]))
    if wrong:
        raise CheckpointError(f"weights do not fit the architecture (keys or shapes differ: {wrong[:6]})")
    with atomic_output(output, force) as tmp:
        tensors = {k: v.detach().to("cpu", dtype if dtype and v.is_floating_point() else v.dtype).contiguous()
                   for k, v in state.items()}
        save_file(tensors, tmp / EXPORT_WEIGHTS, metadata={"format": "pt"})
        tokenizer.save(tmp / EXPORT_TOKENIZER)
        record = {"format": EXPORT_FORMAT, "arch": asdict(config),
                  **{k: v for k, v in meta.items() if k not in ("format", "arch", "sha256")},
                  "sha256": {name: file_sha256(tmp / name) for name in (EXPORT_WEIGHTS, EXPORT_TOKENIZER)}}
        (tmp / EXPORT_META).write_text(json.dumps(record, indent=2, default=str) + "\n")
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors creates its file private to the user; an export is meant to be shared
    return output


def _meta_model(config: TransformerConfig) -> Transformer:
    """The model's parameter names and shapes without allocating or initialising its weights."""
    with torch.device("meta"):
        return Transformer(config)


def export_checkpoint(loaded: Loaded, output: str | Path, force: bool = False,
                      dtype: torch.dtype | None = None) -> Path:
    """Write `loaded` as an exported folder; written beside the target and renamed, so an
    interrupted export leaves nothing half-written."""
    return write_export(loaded.model.state_dict(), loaded.model.config, loaded.tokenizer, loaded.meta,
                        output, force=force, dtype=dtype)
