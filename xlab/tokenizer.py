"""Byte-level BPE tokenizer: a thin layer over Hugging Face `tokenizers`.

Every byte has a token, so any Unicode string encodes and decodes back exactly.
This module reads and writes local files only; it never touches the network.

Encoding (`encode`, `encode_batch`, `encode_flat`, `encode_prompt`) runs on one of two engines, `Tokenizer.encoder`
(the `data.encoder` option): `fast` is the `fastokens` package, which reads the same `tokenizer.json` and encodes
20-50x faster with the same ids; `hf` is `tokenizers` itself; `auto` (the default) takes `fast` when it is installed
and gives the same ids on this tokenizer's pipeline (see `fast_engine`), else `hf`. Training stays with `tokenizers`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from importlib.metadata import version
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"  # end of document, GPT-2's name so its files work unchanged
BOS = "<|bos|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, BOS, PAD]
ENCODERS = ("auto", "fast", "hf")
# The pipeline steps tests/test_encoder.py holds fastokens to `tokenizers` on: XLab's and GPT-2's byte-level BPE,
# Llama 3's and Qwen's regex split before it, Qwen's NFC. Others stay with tokenizers: Llama 2's SentencePiece-style
# Prepend/Replace normalizers (with byte fallback, fastokens 0.3.5 encodes a special token's string that the merges
# cannot build as the special id), Metaspace (which it cannot load).
FAST_STEPS = {"normalizer": {"NFC"}, "pre_tokenizer": {"ByteLevel", "Split", "Digits"}, "model": {"BPE"}}
# Text that trips encoders up, checked before the fast engine is taken (with the tokenizer's added tokens' strings
# appended): every Unicode plane, emoji sequences, combining marks, replacement characters, runs of spaces and digits.
PROBE = ("Größe naïve e\u0301 \u0915\u094d\u0937 Ελληνικά русский 日本語 한국어 \U0001d518 \U0002070e \U000e0041 "
         "\U000f0000 \U0010fffd 👩\u200d👩\u200d👧 👍🏽 🇫🇷 \ufffd\ufffd\u00a0 " + " " * 40 + "\n\n\r\n\t "
         + "1234567890" * 5 + " 3.14 I'm we'll THEY'RE x  y   z\n    def f():\n\treturn 0 ")

log = logging.getLogger(__name__)


class Tokenizer:
    """Encodes text to token ids and back. `bos_id` and `pad_id` fall back to `eos_id`
    for tokenizers (such as GPT-2's) that only define an end-of-text token.

    Text is always encoded as ordinary text: a document that happens to contain the string
    "<|endoftext|>" gets the tokens of those characters, never the special id (as tiktoken's
    `encode_ordinary`), so data cannot forge document boundaries. The pipeline inserts `eos_id` itself.
    """

    def __init__(self, tokenizer: HFTokenizer, encoder: str = "auto"):
        self.hf = tokenizer
        self.hf.encode_special_tokens = True  # special tokens' strings in text are plain text (see above)
        self.eos_id = tokenizer.token_to_id(EOS)
        if self.eos_id is None:
            raise ValueError(f"tokenizer has no end-of-document token {EOS!r}; add it as a special token")
        self.bos_id = self._id_or(BOS, self.eos_id)
        self.pad_id = self._id_or(PAD, self.eos_id)
        self.encoder = encoder

    @property
    def encoder(self) -> str:
        """The engine asked for: auto, fast or hf (see the module doc). The choice is made at the first encoding."""
        return self._encoder

    @encoder.setter
    def encoder(self, name: str) -> None:
        if name not in ENCODERS:
            raise ValueError(f"encoder {name!r} is not one of {', '.join(ENCODERS)} (data.encoder)")
        if name != getattr(self, "_encoder", None):  # the same again keeps the engine chosen
            self._encoder, self._engine, self._fast = name, None, None

    def engine(self):
        """fastokens' tokenizer, or None to encode with `tokenizers`: chosen by `encoder` at the first call, and logged
        in one line. A copy in another process (`Dataset.map`'s workers) rebuilds it without checking again."""
        if self._engine is None:
            self._fast, why = (None, "as asked") if self.encoder == "hf" else fast_engine(self.hf)
            if self.encoder == "fast" and self._fast is None:
                raise ValueError(f"data.encoder=fast cannot be used: {why}; or set data.encoder=auto")
            self._engine = "tokenizers" if self._fast is None else "fastokens"
            log.info("encoding with %s %s (data.encoder=%s: %s)", self._engine, version(self._engine), self.encoder,
                     why)
        elif self._engine == "fastokens" and self._fast is None:
            import fastokens

            self._fast = fastokens.Tokenizer.from_json_str(self.hf.to_str())
        return self._fast

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fast": None}  # fastokens' tokenizer does not pickle: engine() rebuilds it

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.hf.encode_special_tokens = True  # tokenizers does not pickle it

    def _id_or(self, token: str, default: int) -> int:
        found = self.hf.token_to_id(token)
        return default if found is None else found

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        fast = self.engine()
        if fast is not None:
            return fast.encode(text, split_special_tokens=True).ids
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str | Sequence[int]) -> list[int]:
        """The token ids a model reads for a prompt, on every path (predict, infer.py, the training samples, the
        attention maps, lm-eval's contexts): `start_id`, then the text's ids. The prompt so starts a document as
        in training, and an imported Llama gets its one `<s>`, as transformers' tokenizer prompts it.
        `text` may come already encoded (ids of `encode`), such as the first tokens of a document."""
        return [self.start_id, *(self.encode(text) if isinstance(text, str) else text)]

    @property
    def start_id(self) -> int:
        """The token a document starts after: the one the tokenizer's post-processor puts before a text (Llama's
        `<s>`), else the end-of-document token, which XLab's data pipeline writes before every document but the
        first. XLab's `<|bos|>` never appears in its training data."""
        return (self.hf.encode("", add_special_tokens=True).ids or [self.eos_id])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel on Rust threads (no character offsets)."""
        fast = self.engine()
        if fast is not None:
            return [e.ids for e in fast.encode_batch(texts, split_special_tokens=True)]
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Many texts' ids one after the other (uint32), and where each text's start (int64, one more than texts):
        the data pipeline's form, which the fast engine gives without a Python int per token."""
        fast = self.engine()
        if fast is not None:
            ids, offsets = fast.encode_batch_flat(texts, split_special_tokens=True)
            return np.frombuffer(ids, np.uint32), np.frombuffer(offsets, np.uint64).astype(np.int64)
        docs = self.encode_batch(texts)
        offsets = np.zeros(len(docs) + 1, np.int64)
        np.cumsum([len(d) for d in docs], out=offsets[1:])
        return np.fromiter(itertools.chain.from_iterable(docs), np.uint32, count=offsets[-1]), offsets

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self) -> list[int]:
        """The number of UTF-8 bytes each token id stands for in decoded text, a list of `vocab_size`: what bits
        per byte divides by. Special tokens (end of document, BOS, padding) stand for no text and count 0.

        Byte-level BPE (XLab's, GPT-2's, Llama 3's) spells each byte as one character, so a token's length is its
        byte count even when it holds part of a multi-byte character. SentencePiece-style vocabularies
        (Llama 2's) spell a space as "▁" (1 byte) and a fallback byte as "<0xNN>" (1 byte).
        """
        byte_level = "ByteLevel" in json.dumps(json.loads(self.to_str()).get("decoder"))
        added = self.hf.get_added_tokens_decoder()  # spelled as plain text, not in the byte alphabet
        lengths = []
        for i in range(self.vocab_size):
            token = self.hf.id_to_token(i)
            if token is None or (i in added and added[i].special):
                lengths.append(0)
            elif i in added:
                lengths.append(len(added[i].content.encode()))
            elif byte_level:
                lengths.append(len(token))
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                lengths.append(1)
            else:
                lengths.append(len(token.replace("\u2581", " ").encode()))
        return lengths

    def sha256(self) -> str:
        """Checksum of the tokenizer's full definition: caches of encoded tokens are only valid for it."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int, length: int | None = None,
              show_progress: bool = True, special_tokens: list[str] | None = None) -> Tokenizer:
        """Train byte-level BPE on texts; `length` (number of texts) sizes the progress bar.

        The special tokens take the first ids, then the 256 bytes, then the merges.
        """
        special_tokens = list(SPECIAL_TOKENS if special_tokens is None else special_tokens)
        if EOS not in special_tokens:
            raise ValueError(f"special_tokens {special_tokens} must include the end-of-document token {EOS!r}")
        minimum = 256 + len(special_tokens)
        if vocab_size < minimum:
            raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
                             f"{minimum} (256 bytes + {len(special_tokens)} special tokens)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special_tokens, show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer, length=length)
        return cls(tok)

    @classmethod
    def from_gpt2_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> Tokenizer:
        """GPT-2's `vocab.json` + `merges.txt`: ids equal tiktoken's `gpt2` encoding."""
        try:
            vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
            tok = HFTokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt)))
        except Exception as err:  # tokenizers raises a bare Exception on bad files
            raise ValueError(f"cannot read GPT-2 tokenizer files {vocab_json} and {merges_txt}: {err}") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([t for t in SPECIAL_TOKENS if t in vocab])
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, or a folder holding it or GPT-2's `vocab.json` + `merges.txt`."""
        path = Path(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                path = path / "tokenizer.json"
            elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
                return cls.from_gpt2_files(path / "vocab.json", path / "merges.txt")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found at {path}: give a tokenizer.json file or a folder "
                                    "with tokenizer.json, or with vocab.json and merges.txt")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"cannot read tokenizer {path}: {str(err).splitlines()[0]}") from None

    def to_str(self) -> str:
        return self.hf.to_str()

    @classmethod
    def from_str(cls, text: str) -> Tokenizer:
        return cls(HFTokenizer.from_str(text))

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json atomically (a temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{uuid.uuid4().hex[:12]}")  # unique even across nodes
        self.hf.save(str(tmp))
        os.replace(tmp, path)


def fast_engine(hf: HFTokenizer):
    """fastokens' tokenizer for `hf` when it gives `hf`'s ids, else None; and why: not installed, a pipeline step
    outside `FAST_STEPS`, a tokenizer it cannot load, or other ids than `hf`'s on `PROBE`."""
    try:
        import fastokens
    except ImportError:
        return None, "fastokens is not installed (pip install fastokens)"
    definition = hf.to_str()
    step = unheld_step(json.loads(definition))
    if step:
        return None, f"fastokens is not tested on this tokenizer's {step}"
    try:
        fast = fastokens.Tokenizer.from_json_str(definition)
    except ValueError as err:
        return None, f"fastokens cannot load this tokenizer ({str(err).splitlines()[0]})"
    # each added token's string inside a word and as a word of its own
    probe = PROBE + "".join(f"a{token.content}b\n{token.content}\n" for token in hf.get_added_tokens_decoder().values())
    if fast.encode(probe, split_special_tokens=True).ids != hf.encode(probe, add_special_tokens=False).ids:
        return None, "fastokens' ids differ from tokenizers' on a test text"
    return fast, "installed, and it gives tokenizers' ids on this tokenizer's pipeline"


def unheld_step(definition: dict) -> str | None:
    """The first normalizer, pre-tokenizer or model of a tokenizer.json (parsed) outside `FAST_STEPS`, as
    "normalizer Prepend", or None."""
    for part, held in FAST_STEPS.items():
        steps = [definition.get(part)]
        while steps:
            step = steps.pop(0)
            if step is not None and step["type"] == "Sequence":
                steps[:0] = step.get("normalizers") or step.get("pretokenizers") or []
            elif step is not None and (step["type"] not in held or step.get("dropout")):
                return f"{part.replace('_', '-')} {step['type']}{' with dropout' if step.get('dropout') else ''}"
    return None
