"""Tokenizer training: XLab's byte-level BPE (Hugging Face `tokenizers`) beside SentencePiece BPE.

Both learn a 32K vocabulary from the same 90% of the built-in corpus (the Python standard library,
whole files as documents, seeded split) in the same run, on all cores, and encode the other 10%.
SentencePiece is set up to be lossless on code like XLab's tokenizer: no normalization, whitespace kept,
byte fallback for unseen characters, newline as a symbol; every held-out file must round-trip for both.
Compression is bytes of UTF-8 text per token on the held-out files (higher: shorter sequences).

    python benchmarks/tokenizer_train.py                 # 32K vocabulary, whole stdlib (~12 MB)
    python benchmarks/tokenizer_train.py --vocab 8000 --max-documents 200

Prints a table, then as its last line one JSON object; ratios compare XLab with SentencePiece so that
higher is better for XLab: `train_time_ratio` = SentencePiece seconds / XLab seconds,
`bytes_per_token_ratio` = XLab bytes per token / SentencePiece bytes per token.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentencepiece as spm  # noqa: E402

from xlab.sources import python_stdlib_files  # noqa: E402
from xlab.tokenizer import Tokenizer  # noqa: E402


def train_xlab(texts: list[str], vocab: int):
    tokenizer = Tokenizer.train(iter(texts), vocab, show_progress=False)
    return tokenizer.vocab_size, tokenizer.encode_batch, tokenizer.decode


def train_sentencepiece(texts: list[str], vocab: int):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, byte_fallback=True, character_coverage=1.0, user_defined_symbols=["\n"],
        max_sentence_length=1 << 30, hard_vocab_limit=False, num_threads=os.cpu_count(), minloglevel=2)
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return processor.get_piece_size(), processor.encode, processor.decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    texts = [f.read_text(encoding="utf-8", errors="replace") for f in python_stdlib_files()[:args.max_documents]]
    texts = [t for t in texts if t.strip()]
    random.Random(args.seed).shuffle(texts)
    cut = len(texts) * 9 // 10
    train, held_out = texts[:cut], texts[cut:]
    train_mb = sum(len(t.encode()) for t in train) / 1e6
    held_out_bytes = sum(len(t.encode()) for t in held_out)

    rows = {}
    for name, trainer in (("xlab (tokenizers BPE)", train_xlab), ("sentencepiece BPE", train_sentencepiece)):
        start = time.perf_counter()
        size, encode, decode = trainer(train, args.vocab)
        seconds = time.perf_counter() - start
        ids = encode(held_out)
        assert all(decode(i) == t for i, t in zip(ids, held_out, strict=True)), f"{name} is not lossless"
        tokens = sum(len(i) for i in ids)
        rows[name] = {"seconds": seconds, "vocab": size, "tokens": tokens, "bytes_per_token": held_out_bytes / tokens}

    print(f"train: {len(train)} files, {train_mb:.1f} MB; held out: {len(held_out)} files, "
          f"{held_out_bytes / 1e6:.1f} MB; vocab {args.vocab}; {os.cpu_count()} CPUs")
    print(f"{'tokenizer':<24}{'train s':>10}{'vocab':>8}{'held-out tokens':>17}{'bytes/token':>13}")
    for name, r in rows.items():
        print(f"{name:<24}{r['seconds']:>10.1f}{r['vocab']:>8}{r['tokens']:>17}{r['bytes_per_token']:>13.3f}")
    xlab, peer = rows["xlab (tokenizers BPE)"], rows["sentencepiece BPE"]
    print(json.dumps({
        "vocab": args.vocab, "train_mb": round(train_mb, 2), "xlab_train_s": round(xlab["seconds"], 2),
        "sentencepiece_train_s": round(peer["seconds"], 2), "xlab_bytes_per_token": round(xlab["bytes_per_token"], 4),
        "sentencepiece_bytes_per_token": round(peer["bytes_per_token"], 4),
        "train_time_ratio": round(peer["seconds"] / xlab["seconds"], 3),
        "bytes_per_token_ratio": round(xlab["bytes_per_token"] / peer["bytes_per_token"], 3),
    }))


if __name__ == "__main__":
    main()
