"""The encoding engines behind `Tokenizer` (`data.encoder`): fastokens gives `tokenizers`' ids, or is not taken.

Every comparison is with an independent reference: a `tokenizers.Tokenizer` read from the same JSON (special tokens'
strings encoded as text, as XLab encodes them), or tiktoken for GPT-2's files. Each test first checks that the
engine under test is the one encoding, so that it cannot compare `tokenizers` with itself.
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_export import raw_tokenizer
from test_tokenizer import gpt2_pair, trained
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from xlab import tokenizer as xtokenizer
from xlab.hf import tokenizer_from_hf
from xlab.tokenizer import BOS, EOS, PAD, Tokenizer

pytest.importorskip("fastokens")
assert gpt2_pair and trained  # fixtures, imported to serve here

# Text that trips encoders up: every Unicode plane (assigned or not, noncharacters too), emoji sequences, combining
# marks, replacement characters from invalid UTF-8, runs of whitespace and digits, the special tokens' strings.
HARD = [
    "".join(chr(plane * 0x10000 + low) for plane in range(17) for low in (0x41, 0x4E01, 0xFFFD, 0xFFFF)),
    "👩‍👩‍👧‍👦 👍🏽 🇯🇵🇫🇷 ❤️ 🏳️‍🌈 🫠🫶🏿 keycap 1️⃣ #️⃣",
    "e\u0301\u0302\u0303 a\u20dd Z\u0334\u0321\u0327\u031b\u0324 \u0915\u094d\u0937\u093f \u1100\u1161\u11a8 "
    "\u05e9\u05c1\u05b8 \u0627\u0644\u0639\u064e\u0631\u064e\u0628\u0650\u064a\u064e\u0651\u0629 Ελληνικά",
    bytes(range(256)).decode("utf-8", errors="replace"),
    b"\xff\xfe ok \xc3( \xe2\x82 \xf0\x9f\x98 \xed\xa0\x80 end".decode("utf-8", errors="replace"),
    " " * 1000 + "x" + "\t" * 50 + "\n" * 100 + "\r\n" * 30 + "\u00a0" * 20 + "\u3000" * 10 + " \n \n\t ",
    "1" * 1000 + " " + "1234567890" * 100 + " 12 345 6789 3.14159 1,000,000 0x1F 1e-10",
    f"a{EOS}b {BOS}{PAD} {EOS}{EOS} <|endof{EOS}text|> <|endoftext <s></s><unk> [{EOS}]",
    "'s 'S 'll 'LL I'M don't we'VE\n    def f(x):\n\treturn x  # 日本語のテキスト, 한국어, русский",
    "",
]
STDLIB = sorted(Path(json.__file__).parent.glob("*.py"))  # real text: the json package's source


def assert_fast_gives(reference: HFTokenizer, tok: Tokenizer, texts: list[str]) -> None:
    """`tok` encodes with fastokens and gives `reference`'s ids on every path, special tokens' strings as text."""
    assert tok.engine() is not None, "fastokens was not taken"
    reference.encode_special_tokens = True
    expected = [reference.encode(t, add_special_tokens=False).ids for t in texts]
    assert [tok.encode(t) for t in texts] == expected
    assert tok.encode_batch(texts) == expected
    ids, offsets = tok.encode_flat(texts)
    assert [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:], strict=True)] == expected


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in STDLIB] + HARD


@pytest.fixture(scope="module", params=[300, 1000, 4096])
def xlab_vocab(request, corpus) -> Tokenizer:
    return Tokenizer.train(iter(corpus), vocab_size=request.param, show_progress=False)


def test_fast_gives_tokenizers_ids_on_xlab_vocabularies(xlab_vocab, corpus):
    assert_fast_gives(HFTokenizer.from_str(xlab_vocab.to_str()), Tokenizer.from_str(xlab_vocab.to_str()), corpus)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text() | st.binary().map(lambda b: b.decode("utf-8", errors="replace")))
def test_fast_gives_tokenizers_ids_on_any_text(trained, text):
    reference = HFTokenizer.from_str(trained.to_str())
    reference.encode_special_tokens = True
    assert trained.engine() is not None
    assert trained.encode(text) == reference.encode(text, add_special_tokens=False).ids


def test_gpt2_files_give_tiktokens_ids_on_hard_text(gpt2_pair):
    """GPT-2's vocab.json + merges.txt: tiktoken's `gpt2` ids, with either engine (`gpt2_pair` runs both)."""
    xlab, reference = gpt2_pair
    assert [xlab.encode(t) for t in HARD] == [reference.encode_ordinary(t) for t in HARD]


def llama3_folder(folder: Path) -> Path:
    """A Llama 3-style Hugging Face tokenizer: Llama 3's split regex before byte-level BPE without its regex,
    ignore_merges, <s> put before a text by the template, Llama's special tokens and a non-special added one."""
    raw = raw_tokenizer(["<unk>", "<s>", "</s>"], vocab_size=400)
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    raw.add_special_tokens(["<|reserved_special_token_0|>"])
    raw.add_tokens(["<tool>"])
    definition = json.loads(raw.to_str())
    definition["model"]["ignore_merges"] = True
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(definition))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return folder


def test_fast_gives_tokenizers_ids_on_an_imported_llama3_style_tokenizer(tmp_path):
    folder = llama3_folder(tmp_path / "llama")
    imported, renames = tokenizer_from_hf(folder)  # as import-hf reads it: </s> becomes <|endoftext|>
    assert renames == {"</s>": EOS, "<s>": BOS}
    assert_fast_gives(HFTokenizer.from_file(str(folder / "tokenizer.json")), imported, HARD + ["a<tool>b <tool>"])
    assert imported.encode_prompt("hi")[0] == imported.bos_id == 1


def llama2_style() -> Tokenizer:
    """SentencePiece-style BPE as Llama 2's tokenizer.json has it: Prepend/Replace normalizers, no pre-tokenizer,
    byte fallback; trained on text without "<", so that the special tokens' strings fall back to bytes."""
    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    text = ["The quick brown fox jumps over the lazy dog; naïve café, 日本語, 12 345."] * 5
    trained.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", EOS, *(f"<0x{b:02X}>" for b in range(256))])}
    vocab |= {t: len(vocab) + i for i, t in enumerate(learned["vocab"])}
    sp = HFTokenizer(models.BPE(vocab, [tuple(m) for m in learned["merges"]], unk_token="<unk>", byte_fallback=True))
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    sp.add_special_tokens(["<unk>", "<s>", EOS])
    return Tokenizer(sp)


def engine_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("encoding with")]


def test_auto_takes_fastokens_and_says_so_once(trained, caplog):
    tok = Tokenizer.from_str(trained.to_str())
    with caplog.at_level(logging.INFO, logger="xlab"):
        tok.encode("a")
        tok.encode_batch(["b", "c"])
        tok.encoder = "auto"  # the same again: the engine chosen stays
        tok.encode_flat(["d"])
    assert engine_lines(caplog) == [f"encoding with fastokens {xtokenizer.version('fastokens')} (data.encoder=auto: "
                                    "installed, and it gives tokenizers' ids on this tokenizer's pipeline)"]


def test_auto_falls_back_on_llama2_normalizers_and_fast_refuses_them(caplog):
    tok = llama2_style()
    with caplog.at_level(logging.INFO, logger="xlab"):
        ids = [tok.encode(t) for t in HARD]
    assert tok.engine() is None
    assert engine_lines(caplog) == [f"encoding with tokenizers {xtokenizer.version('tokenizers')} (data.encoder=auto: "
                                    "fastokens is not tested on this tokenizer's normalizer Prepend)"]
    reference = HFTokenizer.from_str(tok.to_str())
    reference.encode_special_tokens = True
    assert ids == [reference.encode(t, add_special_tokens=False).ids for t in HARD]
    tok.encoder = "fast"
    with pytest.raises(ValueError, match="data.encoder=fast cannot be used: .*normalizer Prepend; or set data.encoder"
                                         "=auto") as err:
        tok.encode("x")
    assert "\n" not in str(err.value)


def test_auto_falls_back_when_fastokens_ids_differ_on_the_probe(monkeypatch, caplog):
    """Let through to the probe, Llama 2's pipeline is caught there: fastokens 0.3.5 encodes the special tokens'
    strings, which fall back to bytes, as the special ids."""
    monkeypatch.setitem(xtokenizer.FAST_STEPS, "normalizer", {"Prepend", "Replace"})
    tok = llama2_style()
    with caplog.at_level(logging.INFO, logger="xlab"):
        assert tok.encode(f"a{EOS}<s>") == tok.hf.encode(f"a{EOS}<s>", add_special_tokens=False).ids
    assert tok.engine() is None
    assert engine_lines(caplog)[0].endswith("fastokens' ids differ from tokenizers' on a test text)")


def test_auto_falls_back_when_fastokens_is_missing(trained, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "fastokens", None)  # import fastokens raises ImportError
    tok = Tokenizer.from_str(trained.to_str())
    with caplog.at_level(logging.INFO, logger="xlab"):
        assert tok.encode(HARD[7]) == trained.hf.encode(HARD[7], add_special_tokens=False).ids
    assert tok.engine() is None
    assert engine_lines(caplog)[0].endswith("(data.encoder=auto: fastokens is not installed (pip install fastokens))")
    tok.encoder = "fast"
    with pytest.raises(ValueError, match=r"data.encoder=fast cannot be used: fastokens is not installed \(pip install "
                                         r"fastokens\); or set data.encoder=auto"):
        tok.encode("x")
    with pytest.raises(ValueError, match="encoder 'fastest' is not one of auto, fast, hf"):
        tok.encoder = "fastest"


@pytest.mark.parametrize("encoder", ["fast", "hf"])
def test_a_pickled_tokenizer_encodes_as_the_original(trained, encoder):
    """Dataset.map's worker processes get the tokenizer pickled: fastokens is rebuilt there, and special tokens'
    strings stay text (tokenizers does not pickle that setting)."""
    tok = Tokenizer.from_str(trained.to_str())
    tok.encoder = encoder
    expected = tok.encode(HARD[7])
    copy = pickle.loads(pickle.dumps(tok))
    assert (copy.engine() is not None) == (encoder == "fast")
    assert copy.encode(HARD[7]) == expected and trained.eos_id not in expected
