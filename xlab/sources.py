"""Where documents come from: the Hugging Face Hub, local files, or the built-in corpus.

Every source becomes a `datasets.Dataset` with one string column, `text`, one row per document.
Such datasets are memory-mapped Arrow files: a corpus of any size costs disk, not memory.
Hub ids and local folders go through the same `datasets.load_dataset` call.

In a config, `data.source` is a string (a Hub id, a local path, or `builtin:python-stdlib`), a mapping
with the fields of `Source`, or a list of them (concatenated in order):

    source:
      - {path: wikimedia/wikipedia, name: 20231101.en}
      - {path: my_notes/, sample_by: document}
"""

from __future__ import annotations

import glob
import logging
import platform
import re
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import huggingface_hub

log = logging.getLogger(__name__)
BUILTIN_STDLIB = "builtin:python-stdlib"
BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json", ".ndjson": "json",
            ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
COMPRESSIONS = {".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip"}
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


@dataclass
class Source:
    """One corpus. `path`: a Hub dataset id, a local file, glob or folder, or `builtin:python-stdlib`."""

    path: str
    name: str | None = None  # the Hub dataset's configuration, e.g. "20231101.en"
    split: str = "train"  # the source's own split to read; XLab cuts its train/val/test from it
    text_column: str = "text"
    revision: str | None = None  # Hub branch, tag or commit: pin it for reproducible data
    data_files: str | list[str] | None = None  # restrict to these files (globs, relative to path)
    sample_by: Literal["document", "line", "paragraph"] = "document"  # plain text: one document per ...
    delimiter: str | None = None  # plain text: documents are separated by this string

    def describe(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in (("name", self.name), ("revision", self.revision)) if v)
        return f"{self.path!r}{extra} split={self.split}"


def as_sources(source: str | Source | list[str | Source]) -> list[Source]:
    items = source if isinstance(source, list) else [source]
    if not items:
        raise ValueError("data.source is empty: give a Hub dataset id, a local path or builtin:python-stdlib")
    return [Source(path=s) if isinstance(s, str) else s for s in items]


def python_stdlib_files() -> list[Path]:
    """The running interpreter's standard library sources, sorted, without tests and site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "dist-packages", "idle_test"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1]))


def source_state(src: Source) -> list:
    """What the documents of a source depend on beyond its options, read without loading it: the interpreter
    whose standard library is the built-in corpus; the (name, size, modification time) of every file of a local
    source; for a Hub dataset, the commit its revision resolved to in the local Hugging Face cache, once a
    download has resolved it (None before; no network call)."""
    if src.path == BUILTIN_STDLIB:
        return [platform.python_implementation(), platform.python_version()]
    path = Path(src.path).expanduser()
    if path.is_dir():  # hidden files (.git, editors' swap files) hold no documents
        files = sorted(f for f in path.rglob("*") if f.is_file() and not any(
            part.startswith(".") for part in f.relative_to(path).parts))
    elif path.exists() or any(c in src.path for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(path)) if Path(f).is_file())
    else:
        ref = Path(huggingface_hub.constants.HF_HUB_CACHE, f"datasets--{src.path.replace('/', '--')}", "refs",
                   src.revision or "main")
        return [ref.read_text().strip() if ref.is_file() else None]
    stats = ((f, f.stat()) for f in files)  # one stat call a file: a local corpus can have many
    return [[str(f.relative_to(path)) if path.is_dir() else str(f), st.st_size, st.st_mtime_ns] for f, st in stats]


def builder_for(file: str | Path) -> str | None:
    """The `datasets` packaged builder that reads a file, from its extension (compression suffixes skipped)."""
    suffixes = [s for s in Path(file).suffixes if s.lower() not in COMPRESSIONS]
    return BUILDERS.get(suffixes[-1].lower()) if suffixes else None


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def load_source(src: Source, cache_dir: str | None = None, limit: int | None = None,
                num_proc: int | None = None) -> datasets.Dataset:
    """One source as a Dataset with a single `text` column (at most `limit` documents); `num_proc` processes
    convert a many-file dataset (Wikipedia has 41 parquet files) into the Arrow cache in parallel."""
    if src.path == BUILTIN_STDLIB:
        files = [str(f) for f in python_stdlib_files()[:limit]]
        ds = datasets.load_dataset("text", data_files=files, split="train", cache_dir=cache_dir,
                                   sample_by="document", encoding_errors="replace")
    elif src.path.startswith("builtin:"):
        raise ValueError(f"unknown built-in corpus {src.path!r}: the built-in corpus is {BUILTIN_STDLIB!r}")
    else:
        ds = _load(src, cache_dir, num_proc)
    ds = _text_column(_first(ds, limit), src)
    if src.delimiter:  # each row holds one or more documents: split the rows kept, then count documents
        ds = ds.map(_split_at, fn_kwargs={"delimiter": src.delimiter}, batched=True, desc="split at delimiter")
        ds = _first(ds, limit)
    return ds


def _first(ds: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return ds.select(range(limit)) if limit is not None and limit < len(ds) else ds


def load_sources(sources: list[Source], cache_dir: str | None = None, limit: int | None = None,
                 num_proc: int | None = None) -> datasets.Dataset:
    """All sources concatenated in order, at most `limit` documents in all."""
    parts = []
    for src in sources:
        remaining = None if limit is None else limit - sum(len(p) for p in parts)
        if remaining == 0:
            break
        ds = load_source(src, cache_dir, remaining, num_proc)
        log.info("source %s: %d documents", src.describe(), len(ds))
        parts.append(ds)
    if len({repr(p.features) for p in parts}) > 1:  # string vs large_string: make them agree
        parts = [p.cast_column("text", datasets.Value("large_string")) for p in parts]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load(src: Source, cache_dir: str | None, num_proc: int | None = None) -> datasets.Dataset:
    path = Path(src.path).expanduser()
    local = path.exists() or any(c in src.path for c in "*?[")
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        return _load_from_disk(path, src)
    looks_local = src.path.startswith((".", "/", "~")) or builder_for(src.path) is not None
    if not local and (looks_local or not HUB_ID.fullmatch(src.path)):
        raise FileNotFoundError(f"data source {src.path!r} not found: no such local file or folder "
                                "(and not a Hugging Face Hub dataset id like 'owner/name')")
    kwargs = dict(name=src.name, split=src.split, data_files=src.data_files, cache_dir=cache_dir)
    if num_proc and num_proc > 1:
        kwargs["num_proc"] = num_proc
    if local and not path.is_dir():  # a file or glob: the builder follows from the extension
        builder = builder_for(src.path)
        if builder is None:
            raise ValueError(f"cannot tell the format of {src.path!r} from its extension: use one of "
                             f"{sorted(BUILDERS)} (or a folder laid out like a Hub dataset)")
        kwargs.update(path=builder, data_files=src.data_files or str(path), name=None)
    else:  # a Hub id, or a local folder laid out like a Hub dataset repository
        kwargs.update(path=str(path) if local else src.path, revision=None if local else src.revision)
    if kwargs["path"] == "text" or (local and path.is_dir() and _folder_builder(path) == "text"):
        # plain text: one document per file unless told otherwise; odd bytes must not stop a 20 GB run
        sample_by = "document" if src.delimiter else src.sample_by
        kwargs.update(sample_by=sample_by, encoding_errors="replace")
    return _call_load_dataset(src, local, **kwargs)


def _call_load_dataset(src: Source, local: bool, **kwargs) -> datasets.Dataset:
    where = "" if local else " from the Hugging Face Hub"
    try:
        return datasets.load_dataset(**kwargs)
    except ConnectionError as err:
        raise ConnectionError(f"cannot reach the Hugging Face Hub to load dataset {src.describe()} "
                              f"({first_line(err)}): check the network, or download it where the Hub is "
                              "reachable and point data.source at the local copy") from None
    except datasets.exceptions.DatasetNotFoundError as err:
        raise FileNotFoundError(f"dataset {src.describe()} not found{where}: {first_line(err)}") from None
    except Exception as err:  # datasets raises many types, often with multi-line messages
        raise ValueError(f"cannot load dataset {src.describe()}{where}: {first_line(err)}") from None


def _folder_builder(folder: Path) -> str | None:
    """The builder `datasets` infers for a folder: that of its most common data file extension."""
    counts = Counter(builder_for(f) for f in folder.rglob("*") if f.is_file() and not f.name.startswith("."))
    counts.pop(None, None)
    return counts.most_common(1)[0][0] if counts else None


def _load_from_disk(path: Path, src: Source) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise ValueError(f"cannot read the saved dataset at {path}: {first_line(err)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if src.split not in loaded:
            raise ValueError(f"saved dataset {path} has no split {src.split!r}: its splits are {list(loaded)}")
        loaded = loaded[src.split]
    return loaded


def _text_column(ds: datasets.Dataset, src: Source) -> datasets.Dataset:
    """Keep only the text column, named `text`."""
    column = src.text_column
    if column not in ds.column_names:
        raise ValueError(f"source {src.describe()} has no column {column!r}: its columns are "
                         f"{ds.column_names}; set text_column to one of them")
    feature = ds.features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"column {column!r} of source {src.describe()} holds {feature}, not text: "
                         "set text_column to a string column")
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


def _split_at(batch: dict[str, list[str]], delimiter: str) -> dict[str, list[str]]:
    return {"text": [doc for text in batch["text"] for doc in text.split(delimiter)]}
