"""Sources: every kind of input becomes one `text` column, one row per document, through `datasets`.

Local folders laid out like Hub repositories go through the same `datasets.load_dataset` call as Hub ids;
the Hub itself cannot be reached here, which is what the offline test checks.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xlab import sources
from xlab.sources import BUILTIN_STDLIB, Source, as_sources, load_source, load_sources


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow cache inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def texts(src: Source, **kwargs) -> list[str]:
    ds = load_source(src, **kwargs)
    assert ds.column_names == ["text"]
    return ds["text"][:]


def test_builtin_corpus_is_the_sorted_stdlib_without_tests(tmp_path):
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = []
    for folder, dirs, files in os.walk(root):  # an independent listing of the same rule
        dirs[:] = [d for d in dirs if d not in {"test", "tests", "site-packages", "dist-packages", "idle_test"}]
        expected += [Path(folder, f) for f in files if f.endswith(".py")]
    expected.sort()
    assert sources.python_stdlib_files() == expected
    docs = texts(Source(BUILTIN_STDLIB), limit=5)
    assert docs == [f.read_text(encoding="utf-8", errors="replace") for f in expected[:5]]


def test_plain_text_per_file_per_line_and_by_delimiter(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/a.txt").write_text("first doc\nstill first\n")
    (tmp_path / "notes/b.txt").write_text("second doc\n")
    (tmp_path / "lines.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "joined.txt").write_text("alpha<|sep|>beta<|sep|>gamma")
    assert texts(Source(str(tmp_path / "notes"))) == ["first doc\nstill first\n", "second doc\n"]
    assert texts(Source(str(tmp_path / "notes/*.txt"))) == ["first doc\nstill first\n", "second doc\n"]
    assert texts(Source(str(tmp_path / "lines.txt"), sample_by="line")) == ["one", "two", "three"]
    assert texts(Source(str(tmp_path / "joined.txt"), delimiter="<|sep|>")) == ["alpha", "beta", "gamma"]


def test_jsonl_parquet_and_a_text_column(tmp_path):
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps({"id": i, "body": f"document {i}"}) + "\n")
    pq.write_table(pa.table({"text": ["p0", "p1"], "n": [0, 1]}), tmp_path / "docs.parquet")
    assert texts(Source(str(tmp_path / "docs.jsonl"), text_column="body")) == ["document 0", "document 1", "document 2"]
    assert texts(Source(str(tmp_path / "docs.parquet"))) == ["p0", "p1"]


def test_folder_laid_out_like_a_hub_repo_goes_through_load_dataset(tmp_path, monkeypatch):
    repo = tmp_path / "owner_dataset"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["t0", "t1", "t2"]}), repo / "data/train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": ["v0"]}), repo / "data/validation-00000-of-00001.parquet")
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda **kw: calls.append(kw) or real(**kw))
    assert texts(Source(str(repo))) == ["t0", "t1", "t2"]
    assert texts(Source(str(repo), split="validation")) == ["v0"]
    assert calls[0]["path"] == str(repo) and calls[1]["split"] == "validation"


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets.Dataset.from_dict({"text": ["s0", "s1"]}).save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["a"]}),
                          "test": datasets.Dataset.from_dict({"body": ["b", "c"]})}).save_to_disk(tmp_path / "dict")
    assert texts(Source(str(tmp_path / "one"))) == ["s0", "s1"]
    assert texts(Source(str(tmp_path / "dict"), split="test", text_column="body")) == ["b", "c"]
    with pytest.raises(ValueError, match=r"no split 'val'.*\['train', 'test'\]"):
        load_source(Source(str(tmp_path / "dict"), split="val", text_column="body"))


def test_several_sources_are_concatenated_up_to_max_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"a{i}"}) + "\n" for i in range(3)))
    pq.write_table(pa.table({"content": ["b0", "b1"]}), tmp_path / "b.parquet")
    both = [str(tmp_path / "a.jsonl"), Source(str(tmp_path / "b.parquet"), text_column="content")]
    assert load_sources(as_sources(both))["text"][:] == ["a0", "a1", "a2", "b0", "b1"]
    assert load_sources(as_sources(both), limit=4)["text"][:] == ["a0", "a1", "a2", "b0"]
    assert load_sources(as_sources(both), limit=2)["text"][:] == ["a0", "a1"]


def test_hub_ids_pass_name_revision_and_split(monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda **kw: calls.append(kw) or datasets.Dataset.from_dict({"text": ["x"]}))
    load_source(Source("wikimedia/wikipedia", name="20231101.en", revision="abc123"))
    assert calls[0]["path"] == "wikimedia/wikipedia" and calls[0]["name"] == "20231101.en"
    assert calls[0]["revision"] == "abc123" and calls[0]["split"] == "train"
    assert "trust_remote_code" not in calls[0]  # datasets >= 4 runs no loading scripts and refuses the flag


def test_unreachable_hub_is_one_line_naming_the_dataset(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fails fast, as a network without the Hub does
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face Hub.*'roneneldan/TinyStories'") as err:
        load_source(Source("roneneldan/TinyStories"))
    assert "\n" not in str(err.value)


def test_bad_inputs_are_clear_one_line_errors(tmp_path):
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    (tmp_path / "broken.parquet").write_bytes(b"not a parquet file at all")
    (tmp_path / "data.xyz").write_text("?")
    cases = [
        (Source(str(tmp_path / "docs.jsonl")), ValueError, r"no column 'text'.*\['body', 'id'\]"),
        (Source(str(tmp_path / "docs.jsonl"), text_column="id"), ValueError, "not text"),
        (Source(str(tmp_path / "missing.jsonl")), FileNotFoundError, "not found"),
        (Source("./nowhere"), FileNotFoundError, "not found"),
        (Source(str(tmp_path / "broken.parquet")), ValueError, "cannot load dataset"),
        (Source(str(tmp_path / "data.xyz")), ValueError, "cannot tell the format"),
        (Source("builtin:nothing"), ValueError, "python-stdlib"),
    ]
    for src, kind, message in cases:
        with pytest.raises(kind, match=message) as err:
            load_source(src)
        assert "\n" not in str(err.value), err.value


def test_max_documents_counts_documents_after_a_delimiter_split(tmp_path):
    (tmp_path / "joined").mkdir()
    (tmp_path / "joined/1.txt").write_text("a0|a1|a2")
    (tmp_path / "joined/2.txt").write_text("a3|a4")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": f"b{i}"}) + "\n" for i in range(2)))
    (tmp_path / "c.txt").write_text("c0|c1|c2")
    joined, b, c = Source(str(tmp_path / "joined"), delimiter="|"), str(tmp_path / "b.jsonl"), Source(
        str(tmp_path / "c.txt"), delimiter="|")
    for order in ([joined, b], [b, c, joined]):
        everything = load_sources(as_sources(order))["text"][:]  # the reference: no limit
        assert len(everything) == len(set(everything)) == {2: 7, 3: 10}[len(order)]
        for limit in range(1, len(everything) + 1):
            assert load_sources(as_sources(order), limit=limit)["text"][:] == everything[:limit], (order, limit)
