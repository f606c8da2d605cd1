"""The tokenizer: exact round trips, GPT-2 files giving tiktoken's ids, special tokens, clear errors.

tiktoken cannot download GPT-2's files here, so the GPT-2 test builds a small vocabulary in GPT-2's
file format (vocab.json + merges.txt) and lets tiktoken's own loader (`data_gym_to_mergeable_bpe_ranks`,
which `tiktoken.get_encoding("gpt2")` uses on the real files) turn it into a tiktoken Encoding with
GPT-2's split pattern. XLab reads the same two files; both must give the same ids for any string.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from xlab.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it? We'll see, they'd say.",
    "def main():\n    return [x ** 2 for x in range(10)]  # squares\n\n\n",
    "Größe, naïve café, Ελληνικά, русский текст, 日本語のテキスト, 한국어, emoji 🙂🚀 and tabs\t\there.",
    "Numbers 3.14159 and 1,000,000; URLs like https://example.com/a?b=c&d=e; <|endoftext|> as text.",
] * 20


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return Tokenizer.train(iter(CORPUS), vocab_size=400, show_progress=False)


def gpt2_byte_order() -> list[int]:
    """GPT-2's byte token ids: printable bytes other than space first, then the rest (as in tiktoken's loader)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    return printable + [b for b in range(256) if b not in printable]


def write_gpt2_files(tokenizer: Tokenizer, folder: Path) -> None:
    """A trained byte-level BPE in GPT-2's layout: ids 0-255 the bytes in GPT-2's order, then one id per
    merge in merge order, then <|endoftext|>. HF's byte-level alphabet is GPT-2's byte-to-unicode map."""
    model = json.loads(tokenizer.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    unicode_of = {}  # byte -> the printable character GPT-2 writes it as
    extra = 0
    for b in range(256):
        if chr(b).isprintable() and chr(b) != " ":
            unicode_of[b] = chr(b)
        else:
            unicode_of[b], extra = chr(256 + extra), extra + 1
    vocab = {unicode_of[b]: i for i, b in enumerate(gpt2_byte_order())}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[EOS] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


@pytest.fixture(scope="module", params=["fast", "hf"])
def gpt2_pair(trained, tmp_path_factory, request) -> tuple[Tokenizer, tiktoken.Encoding]:
    """XLab reading GPT-2's files, with each encoding engine (`data.encoder`), and tiktoken reading them."""
    if request.param == "fast":
        pytest.importorskip("fastokens")
    folder = tmp_path_factory.mktemp("gpt2")
    write_gpt2_files(trained, folder)
    # local paths, no cache: tiktoken's file cache is keyed by path and could serve a stale file
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", "")
        ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "merges.txt"), str(folder / "vocab.json"))
    reference = tiktoken.Encoding(name="gpt2-test", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                  special_tokens={EOS: len(ranks)})
    xlab = Tokenizer.load(folder)
    xlab.encoder = request.param
    return xlab, reference


def test_gpt2_files_give_tiktoken_ids_on_fixed_texts(gpt2_pair):
    xlab, reference = gpt2_pair
    assert xlab.vocab_size == reference.n_vocab
    assert xlab.eos_id == reference.eot_token == xlab.vocab_size - 1
    assert xlab.bos_id == xlab.pad_id == xlab.eos_id  # GPT-2 defines only <|endoftext|>
    for text in [*CORPUS[:4], "", " ", "  \n\n  x", "a  b   c", "'s 'S 'll ''", "x\r\n\ty\u00a0z", "1234567 12.5e-3"]:
        assert xlab.encode(text) == reference.encode_ordinary(text), text
        assert xlab.decode(xlab.encode(text)) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
def test_gpt2_files_give_tiktoken_ids_on_any_text(gpt2_pair, text):
    xlab, reference = gpt2_pair
    ids = xlab.encode(text)
    assert ids == reference.encode_ordinary(text)
    assert reference.decode_bytes(ids) == text.encode("utf-8")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text() | st.binary().map(lambda b: b.decode("utf-8", errors="replace")))
def test_every_string_round_trips(trained, text):
    assert trained.decode(trained.encode(text)) == text
    assert trained.encode_batch([text, text]) == [trained.encode(text)] * 2


def test_special_tokens_take_the_first_ids_and_never_come_from_text(trained):
    assert (trained.eos_id, trained.bos_id, trained.pad_id) == (0, 1, 2)
    assert [trained.hf.id_to_token(i) for i in range(3)] == [EOS, BOS, PAD]
    ids = trained.encode(f"a{EOS}b")
    assert trained.eos_id not in ids  # a document cannot forge a document boundary
    assert trained.decode(ids) == f"a{EOS}b"
    assert trained.decode([trained.eos_id]) == EOS


def test_vocab_size_bytes_and_merges(trained):
    assert trained.vocab_size == 400
    vocab = trained.hf.get_vocab()
    assert len([t for t in vocab if len(t) == 1 and t not in (EOS, BOS, PAD)]) == 256  # every byte has a token


def test_save_load_and_training_are_deterministic(trained, tmp_path):
    trained.save(tmp_path / "tok" / "tokenizer.json")
    loaded = Tokenizer.load(tmp_path / "tok")  # a folder holding tokenizer.json
    assert loaded.sha256() == trained.sha256() == Tokenizer.from_str(trained.to_str()).sha256()
    again = Tokenizer.train(iter(CORPUS), vocab_size=400, show_progress=False)
    assert again.to_str() == trained.to_str()  # several nodes training at once must agree


def test_too_small_vocab_and_missing_eos_are_errors():
    with pytest.raises(ValueError, match="at least 259"):
        Tokenizer.train(iter(CORPUS), vocab_size=258, show_progress=False)
    with pytest.raises(ValueError, match="must include"):
        Tokenizer.train(iter(CORPUS), vocab_size=300, show_progress=False, special_tokens=[BOS])


def test_unreadable_tokenizer_files_are_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer") as err:
        Tokenizer.load(bad)
    assert "\n" not in str(err.value)
    (tmp_path / "vocab.json").write_text("[]")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    bad.unlink()
    with pytest.raises(ValueError, match="GPT-2 tokenizer files"):
        Tokenizer.load(tmp_path)


def test_token_bytes_are_tiktokens_bytes_per_token(gpt2_pair, trained):
    """Bits per byte divides by these: tiktoken's own bytes for every token, special tokens 0."""
    xlab, reference = gpt2_pair
    lengths = xlab.token_bytes()
    assert lengths[xlab.eos_id] == 0
    assert [n for i, n in enumerate(lengths) if i != xlab.eos_id] == [
        len(reference.decode_single_token_bytes(i)) for i in range(reference.n_vocab) if i != reference.eot_token]
    own = trained.token_bytes()
    assert [own[trained.hf.token_to_id(t)] for t in SPECIAL_TOKENS] == [0, 0, 0]
    for text in CORPUS[:4]:  # a document's tokens add up to its UTF-8 length, multi-byte characters split or not
        assert sum(own[i] for i in trained.encode(text)) == len(text.encode())


def test_token_bytes_of_a_sentencepiece_style_vocabulary():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    trained = HFTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trained.train_from_iterator(CORPUS[:2], trainers.BpeTrainer(vocab_size=150, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    # Llama 2's layout: <unk>, the specials, the 256 fallback bytes, then the learned pieces
    vocab = {t: i for i, t in enumerate(["<unk>", EOS, *(f"<0x{b:02X}>" for b in range(256))])}
    vocab |= {t: len(vocab) + i for i, t in enumerate(learned["vocab"])}
    sp = HFTokenizer(models.BPE(vocab, [tuple(m) for m in learned["merges"]], unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = trained.pre_tokenizer
    sp.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    sp.add_special_tokens(["<unk>", EOS])
    tok = Tokenizer(sp)
    lengths = tok.token_bytes()
    for text in ("hello world", "naïve 日本 🙂\n"):  # "▁" stands for the prepended space; unseen bytes fall back
        ids = tok.encode(text)
        assert sum(lengths[i] for i in ids) == len(tok.decode(ids).encode()) == len((" " + text).encode()), text


def test_documents_start_after_the_end_of_document_token_or_the_prompt_bos(trained):
    """start_id: what a prompt is conditioned on. XLab's data puts <|endoftext|> before each document (its
    <|bos|> is never written); a tokenizer whose template prepends a BOS (Llama's <s>) starts from that, once, as
    the template itself encodes a text. A prompt given as ids (a document's first tokens) gets the same."""
    from tokenizers import processors

    text = "def f(x):\n    return x"
    assert trained.start_id == trained.eos_id != trained.bos_id
    assert trained.encode_prompt(text) == [trained.eos_id, *trained.hf.encode(text, add_special_tokens=False).ids]
    assert trained.encode_prompt("") == [trained.eos_id]
    llama = Tokenizer.from_str(trained.to_str())
    llama.hf.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, llama.bos_id)])
    assert llama.start_id == llama.bos_id
    assert llama.encode_prompt(text) == llama.hf.encode(text, add_special_tokens=True).ids
    assert llama.encode_prompt(text).count(llama.bos_id) == 1
    for tok in (trained, llama):
        assert tok.encode_prompt(tok.encode(text)) == tok.encode_prompt(text)
