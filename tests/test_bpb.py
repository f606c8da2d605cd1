"""Bits per byte: the evaluation loss in bits over the UTF-8 bytes of the text the targets stand for, checked against
a computation by hand, and shown to compare models whose vocabularies differ where their losses per token do not."""

from __future__ import annotations

import json
import math
import random

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, tiny_args
from test_data import make_corpus
from test_metrics import table_value

from xlab.checkpoint import load_checkpoint
from xlab.data import XLabDataModule
from xlab.loss import IGNORE_INDEX
from xlab.module import LanguageModel
from xlab.transformer import TransformerConfig


def test_bpb_is_the_loss_in_bits_over_the_bytes_of_the_text(tmp_path):
    # padded windows: every token of every document is a target once, its end-of-document token included, and
    # the rest of the last window is padding (ignored); the bytes are then those of the documents' text
    corpus = tmp_path / "corpus.jsonl"
    docs = make_corpus(corpus, n=30)  # words with 2- and 3-byte characters
    options = {"data.source": corpus, "data.max_documents": "null", "data.val_size": 3, "data.test_size": 3,
               "data.predict_size": 1, "data.windows": "padded", "trainer.limit_val_batches": 1.0,
               "trainer.limit_test_batches": 1.0}
    args = tiny_args(tmp_path, steps=1, **options)
    run_cli("fit", *args)
    ckpt = tmp_path / "logs/version_0/checkpoints/last.ckpt"
    loaded = load_checkpoint(ckpt)
    model, tokenizer = loaded.model, loaded.tokenizer
    dm = XLabDataModule(source=str(corpus), data_dir=str(tmp_path / "data"), vocab_size=300, context=32,
                        val_size=3, test_size=3, predict_size=1, max_documents=None, windows="padded")
    dm.setup("validate")
    for stage, split in (("validate", "val"), ("test", "test")):
        output = run_cli(stage, *args, f"--ckpt_path={ckpt}").stdout
        nats, targets, eos_targets = 0.0, 0, 0
        with torch.no_grad():
            for x, y in dm.windows[split]:
                losses = F.cross_entropy(model(x[None])[0], y, ignore_index=IGNORE_INDEX, reduction="none")
                nats += losses.double().sum().item()
                targets += int((y != IGNORE_INDEX).sum())
                eos_targets += int((y == tokenizer.eos_id).sum())
        texts = [tokenizer.decode(dm.splits[split].document(d)[:-1]) for d in range(dm.splits[split].n_documents)]
        assert set(texts) <= set(docs)  # whole documents of the corpus, decoded exactly
        text_bytes = sum(len(text.encode()) for text in texts)
        assert text_bytes > sum(map(len, texts))  # multi-byte characters: bytes, not characters, are counted
        assert eos_targets == len(texts) and targets < len(dm.windows[split]) * 32  # end-of-document and padding
        assert table_value(output, f"{split}/loss") == pytest.approx(nats / targets, rel=1e-5)
        # end-of-document targets count 0 bytes while their loss counts
        assert table_value(output, f"{split}/bpb") == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-5)


def unigram_bpb(tmp_path, corpus, vocab_size: int) -> dict[str, float]:
    """Validate, with a `vocab_size` BPE trained on `corpus`, a Transformer whose every prediction is the smoothed
    frequency of each token in the train split (layer norm weight 0 and bias e0, so the head's column 0 is
    the logits): val/loss and val/bpb."""
    dm = XLabDataModule(source=str(corpus), data_dir=str(tmp_path / "data"), vocab_size=vocab_size, context=64,
                        batch_size=64, val_size=10, test_size=0, predict_size=1, max_documents=None)
    dm.prepare_data()
    dm.setup("validate")
    counts = np.bincount(dm.splits["train"].tokens, minlength=vocab_size) + 1
    module = LanguageModel(TransformerConfig(vocab_size=vocab_size, context=64, n_layers=1, n_heads=1, d_model=4,
                                             tie_embeddings=False))
    with torch.no_grad():
        model = module.model
        model.norm.weight.zero_()
        model.norm.bias.copy_(torch.eye(4)[0])
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = torch.tensor(np.log(counts / counts.sum()))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    [logged] = trainer.validate(module, datamodule=dm, verbose=False)
    return logged


def test_bpb_compares_vocabularies_where_loss_per_token_does_not(tmp_path):
    # letters drawn uniformly from 4: the text holds exactly 2 bits per byte, which no model beats on new text
    rng = random.Random(0)
    corpus = tmp_path / "letters.jsonl"
    corpus.write_text("".join(json.dumps({"text": "".join(rng.choices("abcd", k=2000))}) + "\n" for _ in range(60)))
    small, large = (unigram_bpb(tmp_path, corpus, vocab) for vocab in (260, 1000))  # ~bytes, ~2.6 bytes a token
    assert large["val/loss"] > 3 * small["val/loss"]
    assert small["val/bpb"] == pytest.approx(large["val/bpb"], rel=0.05)
    for logged in (small, large):
        assert 1.99 < logged["val/bpb"] < 2.2
