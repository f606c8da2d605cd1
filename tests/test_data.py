"""The DataModule: splits, encoding into the memory-mapped cache, windows, sampling, resuming, commands.

Corpora are tiny jsonl files written by the tests; references are computed independently: ids straight
from the `tokenizers` library, offsets and statistics with numpy, split sizes by hand.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import platform
import random
import sys
from collections import Counter
from importlib.util import find_spec
from pathlib import Path
from types import SimpleNamespace

import datasets
import huggingface_hub
import lightning as L
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from xlab import data as xdata
from xlab.data import SPLITS, XLabDataModule, split_documents, token_dtype
from xlab.resume import Resume
from xlab.tokenizer import BOS, EOS, PAD, Tokenizer
from xlab.windows import IGNORE_INDEX, PackedWindows, PaddedWindows, ShuffledSampler, SplitTokens

WORDS = "the of and to in is was for on that with as by at from his her an which you were are it be".split()


def make_corpus(path: Path, n: int = 60, seed: int = 0, blanks: tuple[int, ...] = ()) -> list[str]:
    """n documents of 5 to 120 random words (some multi-byte), as jsonl; documents in `blanks` are blank."""
    rng = random.Random(seed)
    docs = [" ".join(rng.choice(WORDS + ["naïve", "日本", "x1"]) for _ in range(rng.randint(5, 120))) + "."
            for _ in range(n)]
    for i in blanks:
        docs[i] = " \n " if i % 2 else ""
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    path = tmp_path / "corpus.jsonl"
    return path, make_corpus(path, blanks=(3, 10))


def module(tmp_path: Path, source, **kwargs) -> XLabDataModule:
    options = dict(data_dir=str(tmp_path / "data"), vocab_size=300, context=16, batch_size=4, val_size=6,
                   test_size=0.1, predict_size=3, hf_datasets_cache=str(tmp_path / "hf"))
    return XLabDataModule(source=str(source), **{**options, **kwargs})


def reference_ids(dm: XLabDataModule, texts: list[str]) -> list[list[int]]:
    """Ids from the `tokenizers` library itself, end-of-document appended, blank documents left out."""
    hf = HFTokenizer.from_file(str(dm.tokenizer_path))
    hf.encode_special_tokens = True
    eos = hf.token_to_id("<|endoftext|>")
    return [hf.encode(t, add_special_tokens=False).ids + [eos] for t in texts if t.strip()]


# ---------------------------------------------------------------------------------------------- splits

def test_split_sizes_by_fraction_and_count():
    splits = split_documents(100, {"val": 0.05, "test": 10, "predict": 0.001}, seed=7)
    # 5% of 100 = 5; 10 documents; 0.1 of a document rounds to 0 but a positive fraction gives at least 1
    assert {s: len(i) for s, i in splits.items()} == {"train": 84, "val": 5, "test": 10, "predict": 1}
    everything = np.concatenate(list(splits.values()))
    assert np.array_equal(np.sort(everything), np.arange(100))  # a partition: every document exactly once
    again = split_documents(100, {"val": 0.05, "test": 10, "predict": 0.001}, seed=7)
    assert all(np.array_equal(splits[s], again[s]) for s in splits)
    other = split_documents(100, {"val": 0.05, "test": 10, "predict": 0.001}, seed=8)
    assert not np.array_equal(splits["val"], other["val"])


@pytest.mark.parametrize("sizes, message", [
    ({"val_size": 0.6, "test_size": 0.5}, "sum to 1.1"),
    ({"val_size": -1}, "val_size=-1"),
    ({"test_size": 1.0}, "test_size=1.0"),
])
def test_bad_split_sizes_are_config_errors(tmp_path, corpus, sizes, message):
    with pytest.raises(ValueError, match=message):
        module(tmp_path, corpus[0], **sizes)


def test_counts_that_leave_no_training_documents_are_errors(tmp_path, corpus):
    dm = module(tmp_path, corpus[0], val_size=30, test_size=30)
    with pytest.raises(ValueError, match="leave none to train on"):
        dm.prepare_data()


# -------------------------------------------------------------------------------------------- encoding

def test_prepare_encodes_every_document_with_eos_into_flat_memmaps(tmp_path, corpus):
    path, docs = corpus
    dm = module(tmp_path, path)
    dm.prepare_data()
    dm.setup()
    splits = split_documents(len(docs), dm.sizes, seed=dm.hparams.seed)
    for name in SPLITS:
        ids = reference_ids(dm, [docs[i] for i in splits[name]])
        tokens = np.fromfile(dm.cache_dir / f"{name}.bin", dtype=np.uint16)
        offsets = np.fromfile(dm.cache_dir / f"{name}.idx", dtype=np.uint64)
        assert tokens.tolist() == [t for doc in ids for t in doc]
        assert offsets.tolist() == np.cumsum([0] + [len(d) for d in ids]).tolist()
        blanks = sum(1 for i in splits[name] if not docs[i].strip())
        manifest = dm.manifests[name]
        assert (manifest["documents"], manifest["skipped_empty"]) == (len(splits[name]) - blanks, blanks)
        assert manifest["bytes"] == sum(len(docs[i].encode()) for i in splits[name] if docs[i].strip())
    assert sum(dm.manifests[s]["skipped_empty"] for s in SPLITS) == 2
    assert isinstance(dm.tokenizer, Tokenizer) and dm.tokenizer.vocab_size == 300


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path):
    path = tmp_path / "c.jsonl"
    docs = make_corpus(path, n=40)
    dm = module(tmp_path, path, val_size=5, test_size=0, predict_size=0, vocab_size=259 + 40)
    splits = split_documents(40, dm.sizes, seed=dm.hparams.seed)
    # make the held-out documents contain a word no training document has
    docs = [d + (" zqxjzqxj" * 50 if i in set(splits["val"].tolist()) else "") for i, d in enumerate(docs)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    dm.prepare_data()
    vocab = HFTokenizer.from_file(str(dm.tokenizer_path)).get_vocab()
    assert not any("zq" in token for token in vocab)  # would be merged early if val text were seen


def test_parallel_encoding_gives_the_same_tokens_with_either_engine(tmp_path, corpus):
    """tokenizers in 2 processes (each unpickles the tokenizer) and fastokens in one write the same files, the
    reference ids, on a corpus with a document that spells the special tokens."""
    path, docs = corpus
    docs.append(f"a document that spells {EOS}, {BOS} and{PAD}.")
    with path.open("a") as f:
        f.write(json.dumps({"text": docs[-1]}) + "\n")
    one = module(tmp_path / "one", path, encoder="fast" if find_spec("fastokens") else "auto")
    two = module(tmp_path / "two", path, num_proc=2, encoder="hf")
    one.prepare_data()
    two.prepare_data()
    splits = split_documents(len(docs), one.sizes, seed=one.hparams.seed)
    for name in SPLITS:
        assert (one.cache_dir / f"{name}.bin").read_bytes() == (two.cache_dir / f"{name}.bin").read_bytes()
        assert (one.cache_dir / f"{name}.idx").read_bytes() == (two.cache_dir / f"{name}.idx").read_bytes()
        ids = reference_ids(one, [docs[i] for i in splits[name]])
        assert np.fromfile(one.cache_dir / f"{name}.bin", np.uint16).tolist() == [t for d in ids for t in d]


def test_uint32_tokens_when_the_vocabulary_does_not_fit_uint16(tmp_path, corpus):
    assert (token_dtype(65536), token_dtype(65537)) == (np.uint16, np.uint32)
    big = Tokenizer.train(iter(corpus[1]), vocab_size=300, show_progress=False)
    big.hf.add_tokens([f"<extra{i}>" for i in range(65536)])
    big.save(tmp_path / "big" / "tokenizer.json")
    dm = module(tmp_path, corpus[0], pretrained_tokenizer=str(tmp_path / "big"))
    dm.prepare_data()
    dm.setup()
    assert dm.manifests["train"]["dtype"] == "uint32" and dm.splits["train"].tokens.dtype == np.uint32
    tokens = np.fromfile(dm.cache_dir / "val.bin", dtype=np.uint32)
    splits = split_documents(len(corpus[1]), dm.sizes, seed=dm.hparams.seed)
    assert tokens.tolist() == [t for d in reference_ids(dm, [corpus[1][i] for i in splits["val"]]) for t in d]


# ------------------------------------------------------------------------------------------- the cache

def test_cache_is_reused_and_keyed_by_what_changes_the_data(tmp_path, corpus, monkeypatch):
    dm = module(tmp_path, corpus[0])
    dm.prepare_data()
    monkeypatch.setattr(xdata, "encode_split", lambda *a, **k: pytest.fail("re-encoded a valid cache"))
    monkeypatch.setattr(xdata, "load_sources", lambda *a, **k: pytest.fail("read the sources again"))
    module(tmp_path, corpus[0]).prepare_data()
    module(tmp_path, corpus[0], encoder="hf").prepare_data()  # the same ids: another engine does not re-encode
    same = [dict(context=64), dict(batch_size=32), dict(num_workers=2), dict(num_proc=4), dict(windows="padded"),
            dict(prompt_tokens=5), dict(encoder="hf"), dict(encoder="fast")]
    different = [dict(vocab_size=301), dict(seed=1), dict(val_size=7), dict(max_documents=50),
                 dict(tokenizer_train_bytes=1000), dict(special_tokens=["<|endoftext|>"])]
    assert all(module(tmp_path, corpus[0], **kw).fingerprint() == dm.fingerprint() for kw in same)
    assert len({module(tmp_path, corpus[0], **kw).fingerprint() for kw in different} | {dm.fingerprint()}) == 7
    other = tmp_path / "other.jsonl"
    make_corpus(other)
    assert module(tmp_path, other).fingerprint() != dm.fingerprint()


def test_fingerprint_covers_the_files_of_a_local_folder(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    for i in range(8):
        (notes / f"{i}.txt").write_text(" ".join(WORDS[i:] * 5))
    dm = module(tmp_path, notes, val_size=1, test_size=1, predict_size=1)
    dm.prepare_data()
    (notes / "8.txt").write_text("a new note")  # a file more: new documents, a new split
    added = module(tmp_path, notes, val_size=1, test_size=1, predict_size=1)
    assert added.fingerprint() != dm.fingerprint() and not added.is_prepared()
    added.prepare_data()
    assert len(list((tmp_path / "data").glob("*/train.bin"))) == 2
    (notes / "0.txt").write_text("an edited note")  # the same names, other contents
    assert module(tmp_path, notes, val_size=1, test_size=1, predict_size=1).fingerprint() != added.fingerprint()
    # a hidden file (an editor's swap file) changes no document
    (notes / ".0.txt.swp").write_text("x")
    assert module(tmp_path, notes, val_size=1, test_size=1, predict_size=1).fingerprint() == \
        module(tmp_path, notes, val_size=1, test_size=1, predict_size=1).fingerprint()


def test_fingerprint_covers_the_interpreter_of_the_builtin_corpus(tmp_path, monkeypatch):
    here = XLabDataModule(data_dir=str(tmp_path)).fingerprint()
    monkeypatch.setattr(platform, "python_version", lambda: "3.99.0")
    assert XLabDataModule(data_dir=str(tmp_path)).fingerprint() != here


def test_fingerprint_covers_the_commit_a_hub_revision_resolved_to(tmp_path, monkeypatch):
    # the layout of the Hugging Face cache: refs/<branch or tag> holds the commit the last download resolved it to
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    refs = tmp_path / "hub/datasets--owner--name/refs"

    def fingerprint(**source):
        return XLabDataModule(source=xdata.Source(path="owner/name", **source), data_dir=str(tmp_path)).fingerprint()

    unresolved = fingerprint()
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    first = fingerprint()
    (refs / "main").write_text("b" * 40)  # the Hub's main moved on, and a download followed it
    assert len({unresolved, first, fingerprint()}) == 3
    (refs / "v1").write_text("c" * 40)
    assert fingerprint(revision="v1") != fingerprint(revision="v2") != fingerprint()


def test_truncated_or_corrupt_cache_is_detected_and_rebuilt(tmp_path, corpus):
    dm = module(tmp_path, corpus[0])
    dm.prepare_data()
    good = {n: (dm.cache_dir / f"{n}.bin").read_bytes() for n in SPLITS}
    with open(dm.cache_dir / "train.bin", "r+b") as f:
        f.truncate(len(good["train"]) - 2)  # an interrupted copy
    (dm.cache_dir / "val.json").write_text("{")  # a corrupt manifest
    (dm.cache_dir / "test.idx").unlink()
    with pytest.raises(FileNotFoundError, match="train split .* incomplete.*prepare the data first"):
        module(tmp_path, corpus[0]).setup("fit")
    dm = module(tmp_path, corpus[0])
    dm.prepare_data()
    assert {n: (dm.cache_dir / f"{n}.bin").read_bytes() for n in SPLITS} == good
    assert not list(dm.cache_dir.glob("tmp-*")) and not list(dm.cache_dir.glob("*.tmp*"))


def test_a_replaced_tokenizer_invalidates_the_tokens(tmp_path, corpus):
    dm = module(tmp_path, corpus[0])
    dm.prepare_data()
    before = (dm.cache_dir / "train.bin").read_bytes()
    Tokenizer.train(iter(corpus[1][:5]), vocab_size=300, show_progress=False).save(dm.tokenizer_path)
    with pytest.raises(FileNotFoundError, match="another tokenizer"):
        module(tmp_path, corpus[0]).setup("fit")
    dm = module(tmp_path, corpus[0])
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.cache_dir / "train.bin").read_bytes() != before
    splits = split_documents(len(corpus[1]), dm.sizes, seed=dm.hparams.seed)
    train_ids = reference_ids(dm, [corpus[1][i] for i in splits["train"]])
    assert dm.splits["train"].tokens.tolist() == [t for d in train_ids for t in d]


# ------------------------------------------------------------------------------------------------ windows

def write_split(folder: Path, docs: list[list[int]]) -> SplitTokens:
    np.array([t for d in docs for t in d], dtype=np.uint16).tofile(folder / "s.bin")
    np.cumsum([0] + [len(d) for d in docs], dtype=np.uint64).tofile(folder / "s.idx")
    return SplitTokens(folder / "s.bin", folder / "s.idx", np.uint16)


def test_packed_windows_are_consecutive_slices(tmp_path):
    split = write_split(tmp_path, [[5, 6, 7, 0], [8, 9, 0], list(range(10, 30)) + [0]])
    flat = np.concatenate([[5, 6, 7, 0], [8, 9, 0], np.arange(10, 30), [0]])
    split.REMAP_EVERY = 2  # reads go through several fresh mappings
    windows = PackedWindows(split, context=4)
    assert len(windows) == (len(flat) - 1) // 4 == 6
    for i in range(len(windows)):
        x, y = windows[i]
        assert x.dtype == torch.int64 and x.tolist() == flat[4 * i: 4 * i + 4].tolist()
        assert y.tolist() == flat[4 * i + 1: 4 * i + 5].tolist()
    shipped = pickle.dumps(windows)  # as to a spawned DataLoader worker: the file's name, not its contents
    assert len(shipped) < 1000 and torch.equal(pickle.loads(shipped)[5][1], windows[5][1])


def test_padded_windows_hold_one_document_and_ignore_padding(tmp_path):
    eos, pad = 0, 2
    split = write_split(tmp_path, [[5, 6, eos], list(range(10, 19)) + [eos]])
    windows = PaddedWindows(split, context=4, pad_id=pad)
    # document 1: inputs [eos 5 6], targets [5 6 eos]; document 2 (10 tokens): 10 targets in 3 windows
    expected = [([eos, 5, 6, pad], [5, 6, eos, -100]),
                ([eos, 10, 11, 12], [10, 11, 12, 13]), ([13, 14, 15, 16], [14, 15, 16, 17]),
                ([17, 18, pad, pad], [18, eos, -100, -100])]
    assert len(windows) == len(expected)
    assert [(x.tolist(), y.tolist()) for x, y in (windows[i] for i in range(len(windows)))] == expected
    assert IGNORE_INDEX == -100


def test_padded_option_reaches_the_dataloader(tmp_path, corpus):
    dm = module(tmp_path, corpus[0], windows="padded", context=64)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == y.shape == (4, 64)
    first = dm.splits["val"].document(0).astype(np.int64)
    n = min(64, len(first))
    assert x[0, 0] == dm.tokenizer.eos_id and x[0, 1:n].tolist() == first[: n - 1].tolist()
    assert y[0, :n].tolist() == first[:n].tolist()
    assert (y[0, n:] == -100).all() and (x[0, n:] == dm.tokenizer.pad_id).all()


@pytest.mark.parametrize("device, pinned", [("cpu", False), ("cuda", True)])
def test_batches_are_pinned_for_a_gpu_only(tmp_path, corpus, device, pinned):
    """Page-locked memory speeds the copy to a GPU; for a CPU run it would only cost."""
    dm = module(tmp_path, corpus[0], context=64)
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), world_size=1,
                                 global_rank=0)
    assert dm.val_dataloader().pin_memory is pinned


def test_evaluation_gives_every_rank_as_many_batches_and_each_window_once(tmp_path, corpus):
    """Rank r of R evaluates windows r, r + R, ...; a rank left a window short takes one whose targets are all
    ignored rather than a repeat (which would count twice), so that every rank runs as many batches, as a sharded
    forward pass needs."""
    dm = module(tmp_path, corpus[0], batch_size=3)
    dm.prepare_data()
    dm.setup("validate")
    windows = dm.windows["val"]
    n, uneven = len(windows), 0
    for world in (1, 2, 5, 7):
        per_rank = -(-n // world)
        ranks = []
        for rank in range(world):
            dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                         world_size=world, global_rank=rank)
            batches = list(dm.val_dataloader())
            assert len(batches) == -(-per_rank // 3), (world, rank)
            ranks.append([(x, y) for xs, ys in batches for x, y in zip(xs, ys, strict=True)])
        assert [len(rows) for rows in ranks] == [per_rank] * world
        in_order = [ranks[r][k] for k in range(per_rank) for r in range(world)]  # rank r's k-th is k * world + r
        for i, (x, y) in enumerate(in_order[:n]):
            assert torch.equal(x, windows[i][0]) and torch.equal(y, windows[i][1]), (world, i)
        for x, y in in_order[n:]:
            assert (y == IGNORE_INDEX).all() and (0 <= x).all() and (x < dm.tokenizer.vocab_size).all()
        uneven += n % world != 0
    assert uneven  # some world size needs padding windows


# ----------------------------------------------------------------------------------------------- sampling

def test_sampler_orders_are_seeded_permutations_distinct_across_ranks():
    data = list(range(103))
    single = ShuffledSampler(data, seed=3)
    assert sorted(single) == data  # one epoch: every window once
    first = list(single)
    single.set_epoch(1)
    assert list(single) != first and sorted(single) == data
    single.set_epoch(0)
    assert list(single) == first == list(ShuffledSampler(data, seed=3))
    ranks = [list(ShuffledSampler(data, num_replicas=2, rank=r, seed=3)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 51 and not set(ranks[0]) & set(ranks[1])
    # batch k of two ranks with batch 4 holds the same windows as batch k of one rank with batch 8
    for k in range(6):
        assert sorted(ranks[0][4 * k: 4 * k + 4] + ranks[1][4 * k: 4 * k + 4]) == sorted(first[8 * k: 8 * k + 8])


def test_sampler_resumes_once_after_the_windows_seen():
    data = list(range(50))
    full = list(ShuffledSampler(data, seed=1))
    sampler = ShuffledSampler(data, seed=1)
    sampler.resume(epoch=0, seen=12)
    assert list(sampler) == full[12:] and len(sampler) == 50
    assert list(sampler) == full  # the next pass over the epoch starts at its beginning
    two = [ShuffledSampler(data, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    for s in two:
        s.resume(epoch=0, seen=12)
    assert sorted(list(two[0]) + list(two[1])) == sorted(full[12:])


class Recorder(L.LightningModule):
    """A tiny model that remembers the first window of every training batch."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 8)
        self.head = torch.nn.Linear(8, vocab)
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append(x[:, 0].tolist())
        return torch.nn.functional.cross_entropy(self.head(self.embed(x)).flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm: XLabDataModule, tmp_path: Path, steps: int, ckpt: str | None = None, every: int | None = None):
    """A plain LightningModule of the user's: the position in the epoch is kept by xlab.resume.Resume, which
    LanguageModel brings and any other module's Trainer takes as a callback."""
    callbacks = [Resume()] + ([L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)] if every else [])
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(every), callbacks=callbacks, limit_val_batches=0,
                        accelerator="cpu", devices=1)
    model = Recorder(300)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt)
    return model.seen


def test_training_resumes_mid_epoch_with_the_same_next_batch(tmp_path, corpus):
    dm = module(tmp_path, corpus[0], val_size=0)
    dm.prepare_data()
    dm.setup("fit")
    per_epoch = len(dm.windows["train"]) // 4
    assert per_epoch > 7  # the run below crosses no epoch boundary before step 3
    straight = fit(module(tmp_path, corpus[0], val_size=0), tmp_path, steps=per_epoch + 3)
    fit(module(tmp_path, corpus[0], val_size=0), tmp_path / "a", steps=5, every=5)
    ckpt = next((tmp_path / "a/ckpt").glob("*.ckpt"))
    resumed = fit(module(tmp_path, corpus[0], val_size=0), tmp_path / "b", steps=per_epoch + 3, ckpt=str(ckpt))
    assert resumed == straight[5:]  # the rest of epoch 0, then epoch 1, batch for batch


def test_resuming_without_the_resume_callback_says_the_epoch_starts_again(tmp_path, corpus, caplog):
    fit(module(tmp_path, corpus[0], val_size=0), tmp_path / "a", steps=2, every=2)
    ckpt = next((tmp_path / "a/ckpt").glob("*.ckpt"))
    trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, accelerator="cpu", devices=1)
    with caplog.at_level(logging.WARNING, logger="xlab"):
        trainer.fit(Recorder(300), datamodule=module(tmp_path, corpus[0], val_size=0), ckpt_path=str(ckpt))
    assert "without the xlab.resume.Resume callback" in caplog.text


# ------------------------------------------------------------------------------------ stages and prompts

def test_predict_gives_the_first_tokens_of_each_predict_document(tmp_path, corpus):
    path, docs = corpus
    dm = module(tmp_path, path, prompt_tokens=5, batch_size=2)
    dm.prepare_data()
    dm.setup("predict")
    splits = split_documents(len(docs), dm.sizes, seed=dm.hparams.seed)
    expected = [ids[:5] for ids in reference_ids(dm, [docs[i] for i in splits["predict"]])]
    batches = list(dm.predict_dataloader())
    assert [ids.tolist() for b in batches for ids in b["ids"]] == expected
    assert [t for b in batches for t in b["text"]] == [dm.tokenizer.decode(ids) for ids in expected]
    dm = module(tmp_path, path, prompts=["def f(", "hello"], predict_size=0)
    dm.prepare_data()
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["text"] == ["def f(", "hello"] and batch["ids"][1].tolist() == dm.tokenizer.encode("hello")


def test_an_empty_split_a_stage_needs_is_an_error(tmp_path, corpus):
    dm = module(tmp_path, corpus[0], test_size=0, predict_size=0, val_size=0)
    dm.prepare_data()
    dm.setup("fit")  # no validation asked for: fine
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="test split is empty.*data.test_size"):
        dm.setup("test")
    with pytest.raises(ValueError, match="predict split is empty"):
        dm.setup("predict")
    dm = module(tmp_path, corpus[0], val_size=1, context=4096)
    dm.prepare_data()
    with pytest.raises(ValueError, match="too few for one window"):
        dm.setup("fit")


def test_tokenizer_bigger_than_the_model_is_an_error(tmp_path, corpus):
    dm = module(tmp_path, corpus[0])
    dm.prepare_data()
    model = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(vocab_size=299)))
    dm.trainer = SimpleNamespace(lightning_module=model)
    with pytest.raises(ValueError, match="300 tokens but the model's vocab_size is 299"):
        dm.setup("fit")


def test_vocab_below_bytes_plus_special_tokens_is_a_config_error(tmp_path, corpus):
    with pytest.raises(ValueError, match="at least 259"):
        module(tmp_path, corpus[0], vocab_size=258)


# ------------------------------------------------------------------------------- statistics and commands

def test_compute_stats_match_numpy(tmp_path, corpus, capsys):
    path, docs = corpus
    dm = module(tmp_path, path)
    stats = dm.compute_stats()
    splits = split_documents(len(docs), dm.sizes, seed=dm.hparams.seed)
    all_ids = []
    train = Counter(t for d in reference_ids(dm, [docs[i] for i in splits["train"]]) for t in d)
    for name in SPLITS:
        ids = [d[:-1] for d in reference_ids(dm, [docs[i] for i in splits[name]])]  # without end-of-document
        all_ids += ids
        lengths = [len(d) for d in ids]
        n_bytes = sum(len(docs[i].encode()) for i in splits[name] if docs[i].strip())
        row = stats[name]
        assert (row["documents"], row["tokens"], row["bytes"]) == (len(ids), sum(lengths), n_bytes)
        assert row["bytes_per_token"] == pytest.approx(n_bytes / sum(lengths))
        assert row["doc_tokens_p50"] == pytest.approx(np.percentile(lengths, 50))
        assert row["doc_tokens_p90"] == pytest.approx(np.percentile(lengths, 90))
        assert row["doc_tokens_max"] == max(lengths)
        used = {t for d in ids for t in d} | {dm.tokenizer.eos_id}
        assert row["vocab_used"] == pytest.approx(len(used) / 300)
        # the unigram baseline: each token (end-of-document included) costs -log p(token) under the train counts
        tokens = [t for d in reference_ids(dm, [docs[i] for i in splits[name]]) for t in d]
        total = sum(train.values()) + 300
        expected = sum(-math.log((train[t] + 1) / total) for t in tokens) / len(tokens)
        assert row["unigram_loss"] == pytest.approx(expected)
    assert stats["all"]["documents"] == len(docs) - 2 and stats["all"]["skipped_empty"] == 2
    assert stats["all"]["doc_tokens_p99"] == pytest.approx(np.percentile([len(d) for d in all_ids], 99))
    out = capsys.readouterr().out
    assert "B/tok" in out and "vocab used" in out and "unigram loss" in out and "predict" in out
    assert json.loads((dm.cache_dir / "stats.json").read_text())["train"]["documents"] == stats["train"]["documents"]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """The CLI tests pass their arguments explicitly; pytest's own must not look like a second set."""
    monkeypatch.setattr(sys, "argv", ["xlab.py"])


def cli_args(tmp_path: Path, source: Path, *extra: str) -> list[str]:
    return [f"--data.source={source}", f"--data.data_dir={tmp_path / 'data'}", "--data.vocab_size=300",
            f"--data.hf_datasets_cache={tmp_path / 'hf'}", "--data.val_size=6", "--trainer.logger=false", *extra]


def test_cli_data_commands_take_the_fit_config(tmp_path, corpus, capsys):
    from xlab.cli import main

    config = tmp_path / "conf.yaml"
    config.write_text(f"data:\n  source:\n    - path: {corpus[0]}\n      text_column: text\n  predict_size: 2\n")
    main(["train_tokenizer", "-c", str(config), *cli_args(tmp_path, corpus[0])[1:]])
    tokenizers = list((tmp_path / "data").glob("*/tokenizer.json"))
    assert len(tokenizers) == 1 and not list((tmp_path / "data").glob("*/*.bin"))
    main(["prepare_data", "-c", str(config), *cli_args(tmp_path, corpus[0])[1:]])
    assert len(list((tmp_path / "data").glob("*/*.bin"))) == 4
    capsys.readouterr()
    main(["compute_stats", "-c", str(config), *cli_args(tmp_path, corpus[0])[1:]])
    out = capsys.readouterr().out
    assert "B/tok" in out and f"{len(corpus[1]) - 2:>13}" in out.splitlines()[-1]


def test_cli_links_the_model_vocabulary_to_a_pretrained_tokenizer(tmp_path, corpus):
    from xlab.cli import XLabCLI
    from xlab.module import LanguageModel

    tok = Tokenizer.train(iter(corpus[1]), vocab_size=321, show_progress=False)
    tok.save(tmp_path / "tok" / "tokenizer.json")
    args = cli_args(tmp_path, corpus[0], f"--data.pretrained_tokenizer={tmp_path / 'tok'}", "--data.vocab_size=999")
    cli = XLabCLI(LanguageModel, XLabDataModule, args=args, run=False)
    assert cli.model.model.config.vocab_size == tok.vocab_size == 321
    cli = XLabCLI(LanguageModel, XLabDataModule, args=cli_args(tmp_path, corpus[0]), run=False)
    assert cli.model.model.config.vocab_size == 300


def test_structured_sources_from_yaml(tmp_path, corpus):
    from xlab.cli import XLabCLI
    from xlab.module import LanguageModel

    config = tmp_path / "sources.yaml"
    config.write_text(f"data:\n  source:\n    - {corpus[0]}\n    - path: {corpus[0]}\n      text_column: text\n"
                      "    - {path: owner/name, name: cfg, revision: v1}\n")
    cli = XLabCLI(LanguageModel, XLabDataModule, args=["-c", str(config), *cli_args(tmp_path, corpus[0])[1:]],
                  run=False)
    sources = cli.datamodule.sources
    assert [s.path for s in sources] == [str(corpus[0])] * 2 + ["owner/name"]
    assert (sources[2].name, sources[2].revision, sources[2].split) == ("cfg", "v1", "train")
    assert cli.datamodule.hparams.source[2]["revision"] == "v1"  # plain data for the checkpoint


def test_builtin_default_prepares_and_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    dm = XLabDataModule(data_dir=str(tmp_path / "data"), max_documents=12, vocab_size=300, context=32,
                        batch_size=2, val_size=2, test_size=1, predict_size=1)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 32) and torch.equal(x[:, 1:], y[:, :-1])
    assert str(dm.tokenizer_path).endswith("tokenizer.json") and dm.fingerprint().startswith("python-stdlib-")


def test_prompts_file_one_per_line_or_json_lines(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("def f(\n\n  class A:\n")
    assert xdata.read_prompts(text) == ["def f(", "  class A:"]  # blank lines skipped, spaces kept
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('"import os\\nimport sys"\n"x = 1"\n')
    assert xdata.read_prompts(jsonl) == ["import os\nimport sys", "x = 1"]
    jsonl.write_text('{"prompt": 1}\n')
    with pytest.raises(ValueError, match="not a string"):
        xdata.read_prompts(jsonl)
    with pytest.raises(FileNotFoundError, match="no such file"):
        xdata.read_prompts(tmp_path / "missing.txt")


def test_evaluation_uses_the_checkpoints_tokenizer_and_data(tmp_path, capsys):
    from conftest import tiny_args

    from xlab.checkpoint import read_training_checkpoint
    from xlab.cli import main

    run = {"trainer.logger.init_args.save_dir": tmp_path / "logs", "data.seed": 7}
    main(["fit", *tiny_args(tmp_path, steps=2, **run)])  # validates once, at its last step
    ckpt = read_training_checkpoint(tmp_path / "logs/version_0/checkpoints/last.ckpt")
    capsys.readouterr()

    def validate(*extra: str, **options) -> str:
        main(["validate", *tiny_args(tmp_path, **options), f"--ckpt_path={tmp_path}/logs/version_0/checkpoints/"
              "last.ckpt", *extra])
        return capsys.readouterr().out

    # the run's own data options: its prepared data and tokenizer, and the val loss the run measured
    [row] = [line for line in validate(**run).splitlines() if " val/loss " in line]
    assert float(row.strip("│ ").split()[-1]) == pytest.approx(ckpt["val_loss"], abs=1e-6)
    # another seed (another split, so another BPE) is refused, naming both fingerprints and the flag
    folders = set((tmp_path / "data").iterdir())
    with pytest.raises(SystemExit) as refused:
        validate()
    message = str(refused.value)
    assert message.startswith("error: ") and ckpt["data_fingerprint"] in message
    assert "--data.allow_other_data=true" in message and set((tmp_path / "data").iterdir()) == folders
    other = XLabDataModule(data_dir=str(tmp_path / "data"), max_documents=40, vocab_size=300).fingerprint()
    assert other in message
    # ... unless accepted: that data, tokenized by the checkpoint's tokenizer (no new one trained)
    assert "val/loss" in validate("--data.allow_other_data=true")
    [new] = set((tmp_path / "data").iterdir()) - folders
    sha = Tokenizer.from_str(ckpt["tokenizer"]).sha256()
    assert Tokenizer.load(new / "tokenizer.json").sha256() == sha
    assert json.loads((new / "val.json").read_text())["tokenizer_sha256"] == sha


def test_max_documents_below_one_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="data.max_documents=0"):
        XLabDataModule(max_documents=0, data_dir=str(tmp_path))
