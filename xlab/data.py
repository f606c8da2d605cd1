"""The LightningDataModule: documents -> splits -> tokenizer -> memory-mapped tokens -> windows.

`prepare_data` (once per node; on rank 0 under DDP):
  1. load the sources (`xlab.sources`) as one memory-mapped `datasets.Dataset` of documents;
  2. split the documents into train/val/test/predict: a seeded permutation cut by fractions or counts;
  3. train byte-level BPE on (a sample of) the train split, or take a pretrained tokenizer;
  4. encode each split in parallel (`Dataset.map`, batched, `num_proc` processes, written in chunks) and
     stream the ids into `{split}.bin` (uint16 when the vocabulary fits, else uint32) and `{split}.idx`
     (uint64 document offsets); see `xlab.windows` for the layout.
`setup` (every rank): load the tokenizer and map the token files. The sources are not read again.

Everything lives in `data_dir/<fingerprint>/`, keyed by the sources (with their files' names, sizes and times),
the split, the tokenizer and their options: changing any of them prepares a new folder, changing context, batch
size or workers does not.
Files are written under temporary names and renamed when complete; each split's `{split}.json` manifest
comes last and records sizes and the tokenizer's checksum, so an interrupted or stale cache is rebuilt.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import datasets
import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from xlab.sources import BUILTIN_STDLIB, Source, as_sources, load_sources, python_stdlib_files, source_state
from xlab.tokenizer import SPECIAL_TOKENS, Tokenizer
from xlab.windows import (
    CACHE_VERSION,
    IgnoredPadding,
    PackedWindows,
    PaddedWindows,
    Prompts,
    ResumableLoader,
    ShuffledSampler,
    SplitTokens,
    collate_prompts,
    read_manifest,
    token_dtype,
)

__all__ = ["BUILTIN_STDLIB", "Source", "XLabDataModule", "python_stdlib_files", "split_documents"]

log = logging.getLogger(__name__)
if not logging.getLogger().handlers and not logging.getLogger("xlab").handlers:
    # as Lightning does for its own logger: show INFO (split sizes, progress) unless the user configured logging
    logging.getLogger("xlab").addHandler(logging.StreamHandler())
    logging.getLogger("xlab").setLevel(logging.INFO)
    logging.getLogger("xlab").propagate = False

SPLITS = ("train", "val", "test", "predict")


@rank_zero_only
def info(msg: str, *args) -> None:
    log.info(msg, *args)


# ---------------------------------------------------------------------------------------------- splits

def check_sizes(sizes: dict[str, int | float]) -> None:
    """Validate split sizes before touching any data: an int is a document count, a float a fraction."""
    for name, size in sizes.items():
        if size < 0 or (isinstance(size, float) and size >= 1):
            raise ValueError(f"data.{name}_size={size} is invalid: give a fraction in [0, 1) or a document count")
    fractions = {n: s for n, s in sizes.items() if isinstance(s, float)}
    if sum(fractions.values()) >= 1:
        raise ValueError(f"split fractions {fractions} sum to {sum(fractions.values()):g}: they must sum to less "
                         "than 1 to leave documents to train on")


def split_counts(n: int, sizes: dict[str, int | float]) -> dict[str, int]:
    """Documents per split. A fraction rounds to the nearest count but gives at least one document when
    positive; train gets the rest and must not be empty."""
    counts = {name: size if isinstance(size, int) else (max(1, round(size * n)) if size > 0 else 0)
              for name, size in sizes.items()}
    if sum(counts.values()) >= n:
        raise ValueError(f"the splits {counts} take {sum(counts.values())} of the {n} documents and leave none to "
                         "train on: lower data.val_size, data.test_size or data.predict_size, or add documents")
    return {"train": n - sum(counts.values()), **counts}


def split_documents(n: int, sizes: dict[str, int | float], seed: int) -> dict[str, np.ndarray]:
    """Sorted document indices per split: a seeded permutation cut into consecutive pieces, so each
    document lands in exactly one split and the same seed always gives the same split."""
    check_sizes(sizes)
    counts = split_counts(n, sizes)
    order = np.random.default_rng(seed).permutation(n)
    pieces, start = {}, 0
    for name in ("val", "test", "predict", "train"):
        pieces[name] = np.sort(order[start: start + counts[name]])
        start += counts[name]
    return {s: pieces[s] for s in SPLITS}


# -------------------------------------------------------------------------------------------- encoding

def encode_documents(batch: pa.Table, tokenizer: Tokenizer, dtype: np.dtype) -> pa.Table:
    """`Dataset.map` function, Arrow in and out: each non-blank document's ids with the end-of-document id appended,
    and its size in UTF-8 bytes. Blank documents are dropped here (the caller counts them). The ids go from the
    encoder's flat buffer to Arrow's list column without a Python int per token."""
    texts = batch.column("text").to_pylist()
    kept = [bool(t) and not t.isspace() for t in texts]
    ids, offsets = tokenizer.encode_flat(list(itertools.compress(texts, kept)))
    ids = np.insert(ids.astype(dtype), offsets[1:], tokenizer.eos_id)  # after each document
    offsets = (offsets + np.arange(len(offsets))).astype(np.int32)
    n_bytes = pc.binary_length(batch.column("text").filter(kept)).cast(pa.int64())
    return pa.table({"ids": pa.ListArray.from_arrays(offsets, ids), "bytes": n_bytes})


@contextmanager
def tokenizer_threads_off(off: bool):
    """With several processes, each encodes on one thread (the processes share the cores); with one, the
    tokenizer's Rust threads use them all. Set before `datasets` forks, this also keeps `tokenizers`
    from warning that it disables its threads in forked children."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    if off:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if off and old is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        elif off:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def write_tokens(encoded: datasets.Dataset, bin_path: Path, idx_path: Path) -> tuple[int, int]:
    """Stream the encoded ids (Arrow, memory-mapped) into the flat token file and the offsets file,
    one record batch at a time; returns (tokens, bytes of text)."""
    n_tokens = n_bytes = 0
    with open(bin_path, "wb") as tokens, open(idx_path, "wb") as offsets:
        np.zeros(1, np.uint64).tofile(offsets)
        for table in encoded.with_format("arrow").iter(batch_size=16_384):
            for chunk in table.column("ids").chunks:
                chunk.flatten().to_numpy().tofile(tokens)
                lengths = pc.list_value_length(chunk).to_numpy().astype(np.uint64)
                ends = n_tokens + np.cumsum(lengths, dtype=np.uint64)
                ends.tofile(offsets)
                n_tokens += int(lengths.sum())
            n_bytes += int(pc.sum(table.column("bytes")).as_py() or 0)
    return n_tokens, n_bytes


def encode_split(docs: datasets.Dataset, tokenizer: Tokenizer, folder: Path, name: str, num_proc: int,
                 key: str) -> dict:
    """Encode one split's documents into `{name}.bin`/`.idx` in `folder`, then write its manifest."""
    dtype = token_dtype(tokenizer.vocab_size)
    features = datasets.Features({"ids": datasets.List(datasets.Value(dtype.name)), "bytes": datasets.Value("int64")})
    work = folder / f"tmp-{name}-{unique()}"  # everything in progress lives here; removed in any case
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        procs = min(num_proc, len(docs)) if num_proc > 1 else None
        tokenizer.engine()  # chosen (and logged) here, once, rather than in every process
        with tokenizer_threads_off(procs is not None):
            encoded = docs.with_format("arrow").map(
                encode_documents, fn_kwargs={"tokenizer": tokenizer, "dtype": dtype}, batched=True, num_proc=procs,
                remove_columns=docs.column_names, features=features, load_from_cache_file=False,
                cache_file_name=str(work / "encoded.arrow"), desc=f"encode {name}",
                new_fingerprint=hashlib.sha256(f"{key}/{name}".encode()).hexdigest()[:32])
        n_tokens, n_bytes = write_tokens(encoded, work / "tokens.bin", work / "tokens.idx")
        manifest = {"version": CACHE_VERSION, "split": name, "documents": len(encoded),
                    "skipped_empty": len(docs) - len(encoded), "bytes": n_bytes, "tokens": n_tokens,
                    "dtype": dtype.name, "tokenizer_sha256": tokenizer.sha256(),
                    "bin_bytes": (work / "tokens.bin").stat().st_size,
                    "idx_bytes": (work / "tokens.idx").stat().st_size}
        del encoded
        os.replace(work / "tokens.bin", folder / f"{name}.bin")
        os.replace(work / "tokens.idx", folder / f"{name}.idx")
        write_json(folder / f"{name}.json", manifest)  # last: its presence means the split is complete
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    info("encoded %s: %d documents (%d empty skipped), %.1f MB of text -> %d tokens in %.1fs (%.2f MB/s)", name,
         manifest["documents"], manifest["skipped_empty"], n_bytes / 1e6, n_tokens, seconds, n_bytes / 1e6 / seconds)
    return manifest


def unique() -> str:
    """A suffix for temporary names no other process uses, even on another node sharing the folder."""
    return uuid.uuid4().hex[:12]


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp{unique()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ statistics

def document_lengths(split: SplitTokens) -> np.ndarray:
    """Text tokens per document (the end-of-document token not counted)."""
    return np.diff(split.offsets.astype(np.int64)) - 1


def token_counts(split: SplitTokens, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """How often each token id occurs in a split (end-of-document tokens included), read in chunks so
    memory stays flat."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(split.tokens), chunk):
        counts += np.bincount(split.read(start, start + chunk), minlength=vocab_size)
        split.release()
    return counts


def unigram_loss(counts: np.ndarray, train_counts: np.ndarray) -> float:
    """Cross-entropy (nats/token) of a split's tokens under the train split's unigram distribution
    (add-one smoothed): the loss of a model that ignores context, which a trained model must beat."""
    probs = (train_counts + 1) / (train_counts.sum() + len(train_counts))
    return float(-(counts * np.log(probs)).sum() / max(1, counts.sum()))


def stats_row(manifests: list[dict], lengths: np.ndarray, counts: np.ndarray, train_counts: np.ndarray) -> dict:
    """One line of compute_stats: sizes, bytes per token, document length percentiles, vocabulary used,
    unigram loss."""
    total = {k: sum(m[k] for m in manifests) for k in ("documents", "skipped_empty", "bytes", "tokens")}
    text_tokens = total["tokens"] - total["documents"]
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]) if len(lengths) else (0, 0, 0)
    return {**total, "tokens": text_tokens, "bytes_per_token": total["bytes"] / text_tokens if text_tokens else 0.0,
            "doc_tokens_p50": float(p50), "doc_tokens_p90": float(p90), "doc_tokens_p99": float(p99),
            "doc_tokens_max": int(lengths.max()) if len(lengths) else 0, "vocab_used": float((counts > 0).mean()),
            "unigram_loss": unigram_loss(counts, train_counts)}


def format_stats(stats: dict[str, dict]) -> str:
    columns = [("documents", "docs", "d"), ("skipped_empty", "empty", "d"), ("bytes", "bytes", "d"),
               ("tokens", "tokens", "d"), ("bytes_per_token", "B/tok", ".3f"), ("doc_tokens_p50", "p50", ".0f"),
               ("doc_tokens_p90", "p90", ".0f"), ("doc_tokens_p99", "p99", ".0f"), ("doc_tokens_max", "max", "d"),
               ("vocab_used", "vocab used", ".1%"), ("unigram_loss", "unigram loss", ".3f")]
    lines = [f"{'split':<8}" + "".join(f"{title:>13}" for _, title, _ in columns)]
    for name, row in stats.items():
        lines.append(f"{name:<8}" + "".join(f"{row[key]:>13{fmt}}" for key, _, fmt in columns))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- data module

class XLabDataModule(L.LightningDataModule):
    """From a corpus (Hub id, local files or the built-in one) to training batches; see the module docstring.

    Batches: fit/validate/test give (x, y) int64 tensors of shape (batch_size, context), y = x shifted by
    one, -100 where ignored (padding). predict gives {"text": [str], "ids": [LongTensor]} prompts.
    """

    def __init__(self,
                 source: str | Source | list[str | Source] = BUILTIN_STDLIB,
                 data_dir: str = "data",
                 max_documents: int | None = None,
                 val_size: int | float = 0.05,
                 test_size: int | float = 0.05,
                 predict_size: int | float = 8,
                 seed: int = 1234,
                 vocab_size: int = 4096,
                 pretrained_tokenizer: str | None = None,
                 special_tokens: list[str] | None = None,
                 tokenizer_train_bytes: int | None = 1_000_000_000,
                 num_proc: int = 1,
                 encoder: Literal["auto", "fast", "hf"] = "auto",
                 windows: Literal["packed", "padded"] = "packed",
                 context: int = 256,
                 batch_size: int = 16,
                 num_workers: int = 0,
                 prompt_tokens: int = 32,
                 prompts: list[str] | str | None = None,
                 hf_datasets_cache: str | None = None,
                 allow_other_data: bool = False):
        """
        Args:
            source: a Hub dataset id, a local file/glob/folder, `builtin:python-stdlib`, a `Source`, or a list
                of them (concatenated).
            data_dir: where the prepared data (tokenizer, token files) is cached.
            max_documents: use only the first documents of the sources (quick experiments).
            val_size, test_size, predict_size: documents per split: a fraction (float) or a count (int);
                train gets the rest.
            seed: the split and the training order.
            vocab_size: size of the byte-level BPE vocabulary to train (ignored with pretrained_tokenizer).
            pretrained_tokenizer: a tokenizer.json, or a folder with it or with GPT-2's vocab.json + merges.txt,
                used instead of training one; the model's vocab_size then comes from it.
            special_tokens: of a trained tokenizer (default <|endoftext|>, <|bos|>, <|pad|>).
            tokenizer_train_bytes: train the tokenizer on a random sample of this much train text (None: all).
            num_proc: processes encoding in parallel (1: one process, whose tokenizer uses every core), also
                converting a many-file dataset to Arrow.
            encoder: the engine encoding text (data preparation and predict's prompts): "fast" (the fastokens
                package), "hf" (tokenizers), or "auto": fast when installed and giving tokenizers' ids on the
                tokenizer's pipeline, else hf (logged). The same ids either way, so it is not part of the fingerprint.
            windows: "packed" (documents joined by end-of-document tokens, cut into full windows) or
                "padded" (each document on its own, padding ignored by the loss).
            context: tokens per window (linked to the model's context by the CLI).
            batch_size, num_workers: of the DataLoaders.
            prompt_tokens: predict prompts are the first tokens of each predict-split document.
            prompts: predict from these texts instead of the predict split: a list, or the path of a text file
                with one prompt per line (a JSON string per line in a .jsonl file, for prompts with newlines).
            hf_datasets_cache: the `datasets` cache for Hub downloads and Arrow files (default: HF's).
            allow_other_data: validate/test/predict a checkpoint on data other than its run's (another corpus,
                split or seed), tokenized by the checkpoint's tokenizer; without it that is an error.
        """
        super().__init__()
        self.save_hyperparameters()
        self.sources = as_sources(source)
        if not isinstance(source, str):  # plain data in checkpoints' hyperparameters, not dataclasses
            self.hparams.source = [asdict(s) for s in self.sources]
        if max_documents is not None and max_documents < 1:
            raise ValueError(f"data.max_documents={max_documents} leaves nothing to train on: give at least 1, "
                             "or null for every document")
        self.sizes = {"val": val_size, "test": test_size, "predict": predict_size}
        check_sizes(self.sizes)
        self.special_tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
        minimum = 256 + len(self.special_tokens)
        if pretrained_tokenizer is None and vocab_size < minimum:
            raise ValueError(f"data.vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum} "
                             f"(256 bytes + {len(self.special_tokens)} special tokens)")
        self.pretrained = Tokenizer.load(pretrained_tokenizer) if pretrained_tokenizer else None
        self.checkpoint_tokenizer: Tokenizer | None = None  # evaluating a checkpoint: see use_checkpoint()
        self.other_data = False  # ... on data other than its run's
        self.cache_dir = Path(data_dir) / self.current_fingerprint()
        self.tokenizer: Tokenizer | None = None  # set by setup()
        self.splits: dict[str, SplitTokens] = {}
        self.manifests: dict[str, dict] = {}
        self.windows: dict[str, Dataset] = {}
        self.train_sampler: ShuffledSampler | None = None
        self.resume_state: dict | None = None

    @staticmethod
    def model_vocab_size(vocab_size: int, pretrained_tokenizer: str | None) -> int:
        """The model's vocabulary (linked by the CLI): the configured size for a tokenizer trained here,
        else the pretrained tokenizer's own size."""
        return vocab_size if pretrained_tokenizer is None else Tokenizer.load(pretrained_tokenizer).vocab_size

    def fingerprint(self) -> str:
        """The name of the cache folder in use (see `current_fingerprint`)."""
        return self.cache_dir.name

    def current_fingerprint(self) -> str:
        """Names the cache folder: a readable slug, and a hash of every option that changes the prepared data and
        of the sources' state now (`xlab.sources.source_state`: files, interpreter, resolved Hub commit)."""
        h = self.hparams
        corpus = [[asdict(s) | {"state": source_state(s)} for s in self.sources], h.max_documents, self.sizes, h.seed]
        given = self.checkpoint_tokenizer if self.other_data else self.pretrained
        tokenizer = (["pretrained", given.sha256()] if given is not None else
                     ["bpe", h.vocab_size, self.special_tokens, h.tokenizer_train_bytes])
        key = json.dumps([CACHE_VERSION, corpus, tokenizer], sort_keys=True)
        first = self.sources[0].path.removeprefix("builtin:")
        slug = re.sub(r"[^\w.]+", "-", f"{first}-{self.sources[0].name or ''}").strip("-.")[:48]
        more = f"+{len(self.sources) - 1}" if len(self.sources) > 1 else ""
        return f"{slug}{more}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def use_checkpoint(self, tokenizer: Tokenizer, fingerprint: str | None) -> None:
        """Evaluate a checkpoint on data tokenized by its own tokenizer. With its run's data options the fingerprint
        is its `fingerprint` and the run's prepared data serves. Other data is an error unless `allow_other_data`;
        it is then prepared with the checkpoint's tokenizer, in a cache folder of its own."""
        h = self.hparams
        if fingerprint not in (None, self.fingerprint()) and not h.allow_other_data:
            raise ValueError(f"the data options give data {self.fingerprint()}, not the data {fingerprint} the "
                             "checkpoint was trained on: use its run's data options (its config.yaml), or "
                             "--data.allow_other_data=true to evaluate on this data with the checkpoint's tokenizer")
        self.checkpoint_tokenizer = tokenizer
        if fingerprint != self.fingerprint():  # other data, or a checkpoint that does not say which
            self.pretrained, self.other_data = None, True  # the fingerprint then names the checkpoint's tokenizer
            self.cache_dir = Path(h.data_dir) / self.current_fingerprint()

    @property
    def tokenizer_path(self) -> Path:
        """The tokenizer.json in use (a pretrained GPT-2 tokenizer: the folder of its vocab.json and merges.txt)."""
        if self.pretrained is None:
            return self.cache_dir / "tokenizer.json"
        path = Path(self.hparams.pretrained_tokenizer)
        return path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path

    # ------------------------------------------------------------------------------ preparation (rank 0)

    def load_corpus(self) -> tuple[datasets.Dataset, dict[str, np.ndarray]]:
        """All documents, and their split into train/val/test/predict (logged)."""
        h = self.hparams
        docs = load_sources(self.sources, cache_dir=h.hf_datasets_cache, limit=h.max_documents, num_proc=h.num_proc)
        if len(docs) == 0:
            raise ValueError(f"data.source {h.source!r} has no documents")
        splits = split_documents(len(docs), self.sizes, h.seed)
        info("%d documents split by seed %d: %s", len(docs), h.seed,
             ", ".join(f"{s} {len(i)} ({len(i) / len(docs):.1%})" for s, i in splits.items()))
        return docs, splits

    def train_tokenizer(self) -> Tokenizer:
        """Train byte-level BPE on (a sample of) the train split and save it, unless it is already there
        (or a pretrained tokenizer is configured)."""
        return self.get_tokenizer()

    def get_tokenizer(self, corpus: tuple[datasets.Dataset, dict] | None = None) -> Tokenizer:
        """The pretrained tokenizer, the one trained before, or a new one trained on `corpus` (loaded if None)."""
        if self.pretrained is not None:
            info("using the pretrained tokenizer %s (%d tokens)", self.tokenizer_path, self.pretrained.vocab_size)
            return self.pretrained
        if self.checkpoint_tokenizer is not None and not self.tokenizer_path.is_file():
            self.checkpoint_tokenizer.save(self.tokenizer_path)  # the model's own, rather than a new one trained
        if self.tokenizer_path.is_file():
            tokenizer = Tokenizer.load(self.tokenizer_path)
            info("reusing the tokenizer %s (%d tokens)", self.tokenizer_path, tokenizer.vocab_size)
            return tokenizer
        docs, splits = corpus or self.load_corpus()
        train = docs.select(splits["train"])
        budget = self.hparams.tokenizer_train_bytes
        info("training a %d-token byte-level BPE on %s of the train split", self.hparams.vocab_size,
             "all" if budget is None else f"up to {budget / 1e6:g} MB")
        start = time.perf_counter()
        tokenizer = Tokenizer.train(sample_texts(train, budget, self.hparams.seed), self.hparams.vocab_size,
                                    length=len(train) if budget is None else None,
                                    special_tokens=self.special_tokens)
        tokenizer.save(self.tokenizer_path)
        info("saved the tokenizer (%d tokens) to %s in %.1fs", tokenizer.vocab_size, self.tokenizer_path,
             time.perf_counter() - start)
        return tokenizer

    def is_prepared(self) -> bool:
        """Tokenizer and every split's tokens are complete; checking needs no access to the sources."""
        if not (self.pretrained is not None or self.tokenizer_path.is_file()):
            return False
        sha = (self.pretrained or Tokenizer.load(self.tokenizer_path)).sha256()
        return all(read_manifest(self.cache_dir, s, sha)[0] is not None for s in SPLITS)

    def prepare_data(self) -> None:
        """Load, split, train the tokenizer and encode every split into the cache; only what is missing."""
        if self.is_prepared():
            info("prepared data found in %s", self.cache_dir)
            return
        docs, splits = corpus = self.load_corpus()
        # a first download of a Hub dataset resolves its revision to a commit, which the fingerprint covers
        self.cache_dir = Path(self.hparams.data_dir) / self.current_fingerprint()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tokenizer = self.get_tokenizer(corpus)
        tokenizer.encoder = self.hparams.encoder
        for name in SPLITS:
            manifest, why = read_manifest(self.cache_dir, name, tokenizer.sha256())
            if manifest is None:
                if why != "not prepared":
                    log.warning("the cached %s split is %s: encoding it again", name, why)
                encode_split(docs.select(splits[name]), tokenizer, self.cache_dir, name, self.hparams.num_proc,
                             self.fingerprint())

    def compute_stats(self) -> dict[str, dict]:
        """Documents, bytes, tokens, bytes per token, document lengths, share of the vocabulary used and the
        unigram loss (the baseline for val/loss), per split; printed as a table and saved as stats.json in the
        cache folder."""
        self.prepare_data()
        self.setup()
        vocab = self.tokenizer.vocab_size
        lengths = {s: document_lengths(self.splits[s]) for s in SPLITS}
        counts = {s: token_counts(self.splits[s], vocab) for s in SPLITS}
        stats = {s: stats_row([self.manifests[s]], lengths[s], counts[s], counts["train"]) for s in SPLITS}
        stats["all"] = stats_row(list(self.manifests.values()), np.concatenate(list(lengths.values())),
                                 sum(counts.values()), counts["train"])
        print(f"{self.cache_dir} (tokenizer: {self.tokenizer_path}, {vocab} tokens)\n{format_stats(stats)}")
        write_json(self.cache_dir / "stats.json", stats)
        return stats

    # -------------------------------------------------------------------------------- every rank

    def setup(self, stage: str | None = None) -> None:
        # as prepare_data (maybe on another rank) left it
        self.cache_dir = Path(self.hparams.data_dir) / self.current_fingerprint()
        if not (self.pretrained is not None or self.tokenizer_path.is_file()):
            raise FileNotFoundError(f"no tokenizer at {self.tokenizer_path}: prepare the data first "
                                    "(./xlab.py prepare_data -c CONF, or datamodule.prepare_data())")
        self.tokenizer = self.pretrained or Tokenizer.load(self.tokenizer_path)
        self.tokenizer.encoder = self.hparams.encoder
        if self.checkpoint_tokenizer is not None and self.tokenizer.sha256() != self.checkpoint_tokenizer.sha256():
            raise ValueError(f"{self.tokenizer_path} is not the tokenizer the checkpoint was trained with: remove "
                             f"{self.cache_dir} to prepare the data again with the checkpoint's tokenizer")
        self.check_model_vocab()
        dtype = token_dtype(self.tokenizer.vocab_size)
        for name in SPLITS:
            manifest, why = read_manifest(self.cache_dir, name, self.tokenizer.sha256())
            if manifest is None:
                raise FileNotFoundError(f"the {name} split in {self.cache_dir} is {why}: prepare the data first "
                                        "(./xlab.py prepare_data -c CONF, or datamodule.prepare_data())")
            self.manifests[name] = manifest
            self.splits[name] = SplitTokens(self.cache_dir / f"{name}.bin", self.cache_dir / f"{name}.idx", dtype)
            self.windows[name] = self.make_windows(self.splits[name])
        for name in self.needed_splits(stage):
            self.check_not_empty(name, stage)

    def make_windows(self, split: SplitTokens) -> Dataset:
        if self.hparams.windows == "padded":
            return PaddedWindows(split, self.hparams.context, self.tokenizer.pad_id)
        return PackedWindows(split, self.hparams.context)

    def needed_splits(self, stage: str | None) -> list[str]:
        needs = {"fit": ["train"] + (["val"] if self.sizes["val"] else []), "validate": ["val"], "test": ["test"],
                 "predict": [] if self.hparams.prompts else ["predict"]}
        return needs.get(stage, [])

    def check_not_empty(self, name: str, stage: str | None) -> None:
        fix = ("add documents or lower data.val_size, data.test_size and data.predict_size" if name == "train"
               else f"raise data.{name}_size (now {self.sizes[name]})")
        if self.manifests[name]["documents"] == 0:
            raise ValueError(f"the {name} split is empty but stage {stage!r} needs it: {fix}")
        if name != "predict" and len(self.windows[name]) == 0:
            raise ValueError(f"the {name} split has {self.manifests[name]['tokens']} tokens, too few for one window "
                             f"of context {self.hparams.context} + 1: {fix}, or lower model.arch.context")

    def check_model_vocab(self) -> None:
        """Token ids must index the model's embedding: the tokenizer may not be bigger than the model's vocab."""
        model = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        model_vocab = getattr(getattr(getattr(model, "model", None), "config", None), "vocab_size", None)
        if model_vocab is not None and self.tokenizer.vocab_size > model_vocab:
            raise ValueError(f"the tokenizer {self.tokenizer_path} has {self.tokenizer.vocab_size} tokens but the "
                             f"model's vocab_size is {model_vocab}: set model.arch.vocab_size to at least "
                             f"{self.tokenizer.vocab_size} (the CLI links it from data.vocab_size / "
                             "data.pretrained_tokenizer)")

    def loader(self, dataset: Dataset, kind: type[DataLoader] = DataLoader, **kwargs) -> DataLoader:
        h = self.hparams
        # page-locked batches for a GPU: Lightning's copy to the device then runs without the host waiting
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return kind(dataset, batch_size=h.batch_size, num_workers=h.num_workers,
                    persistent_workers=h.num_workers > 0, pin_memory=on_gpu, **kwargs)

    def ranks(self) -> tuple[int, int]:
        """(processes, this one's rank): (1, 0) without a trainer."""
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        windows = self.windows["train"]
        world, rank = self.ranks()
        first = self.train_sampler is None
        self.train_sampler = ShuffledSampler(windows, num_replicas=world, rank=rank, seed=self.hparams.seed)
        if self.resume_state is not None:
            self.resume(self.resume_state)
            self.resume_state = None
        elif first and self.trainer is not None and self.trainer.ckpt_path:
            log.warning("resuming without the xlab.resume.Resume callback (which LanguageModel brings), so without "
                        "the position in the epoch: it starts from its beginning. Add Resume() to the callbacks")
        return self.loader(windows, ResumableLoader, sampler=self.train_sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader | list:
        return self.eval_loader("val") if self.sizes["val"] else []

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")

    def eval_loader(self, name: str) -> DataLoader:
        """Each window once, in order. Under DDP or FSDP rank r of R takes windows r, r + R, r + 2R, ..., and the
        ranks left a window short take one that predicts nothing (`xlab.windows.IgnoredPadding`), rather than a
        repeated window, which would count twice in the loss: every rank runs as many batches, as a sharded
        forward pass needs (a rank with a batch more would wait for the others forever)."""
        world, rank = self.ranks()
        windows = IgnoredPadding(self.windows[name], world)
        # a DistributedSampler, which Lightning leaves in place; over a multiple of `world` windows it repeats none
        sampler = DistributedSampler(windows, num_replicas=world, rank=rank, shuffle=False)
        return self.loader(windows, sampler=sampler)

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.prompts(), shuffle=False, collate_fn=collate_prompts)

    def prompts(self) -> Prompts:
        """`data.prompts` if given, else the first `prompt_tokens` tokens of each predict-split document."""
        h = self.hparams
        if h.prompts:
            texts = read_prompts(Path(h.prompts)) if isinstance(h.prompts, str) else list(h.prompts)
            return Prompts(texts, [self.tokenizer.encode(p) for p in texts])
        split = self.splits["predict"]
        ids = [split.document(d)[:-1][: h.prompt_tokens] for d in range(split.n_documents)]
        return Prompts([self.tokenizer.decode(i.tolist()) for i in ids], ids)

    # ------------------------------------------------------------------------ resuming mid-epoch

    def position_key(self) -> dict:
        """What a saved position in the training order is valid for: the same windows in the same order."""
        return {"seed": self.hparams.seed, "windows": len(self.windows["train"]), "fingerprint": self.fingerprint()}

    def resume_at(self, epoch: int, windows: int, loop_batches: int, data: dict | None) -> None:
        """Continue epoch `epoch` after its first `windows` training windows (all ranks together; counted by
        `xlab.resume`), of which the training loop counts `loop_batches` batches per rank as done. `data`: the
        `position_key` of the run that saved it. Applied by the next `train_dataloader()`."""
        self.resume_state = {"epoch": epoch, "windows": windows, "loop_batches": loop_batches, "data": data}

    def resume(self, state: dict) -> None:
        if state["data"] != self.position_key():
            log.warning("the checkpoint was trained on other data (seed, windows or data differ): "
                        "training starts its epoch from the beginning")
            return
        self.train_sampler.resume(state["epoch"], state["windows"], state["loop_batches"] * self.hparams.batch_size)
        info("resuming epoch %d after %d training windows", state["epoch"], state["windows"])


def read_prompts(path: Path) -> list[str]:
    """Prompts from a file: one per line, or one JSON string per line in a .jsonl file; blank lines skipped."""
    if not path.is_file():
        raise FileNotFoundError(f"data.prompts: no such file {path} (give a file of prompts, one per line, or a list)")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            lines = [json.loads(line) for line in lines]
        except json.JSONDecodeError as err:
            raise ValueError(f"data.prompts: {path} is not one JSON string per line ({err})") from None
    if not lines or not all(isinstance(p, str) for p in lines):
        raise ValueError(f"data.prompts: {path} holds no prompts, or a line that is not a string")
    return lines


def sample_texts(train: datasets.Dataset, budget: int | None, seed: int):
    """The train split's documents, or a seeded random sample of them up to `budget` bytes of text."""
    docs, seen = (train, 0) if budget is None else (train.shuffle(seed=seed), 0)
    for batch in docs.iter(batch_size=1000):
        for text in batch["text"]:
            if budget is not None and seen >= budget:
                return
            seen += len(text.encode("utf-8"))
            yield text
