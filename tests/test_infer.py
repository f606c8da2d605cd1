"""`./infer.py` as a user runs it, on an exported checkpoint made here without any training: its text
against a full-forward greedy loop, its errors (one line, exit status 2) and its interactive mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_script
from test_export import greedy_reference

from xlab.checkpoint import Loaded, export_checkpoint
from xlab.generate import GenerationConfig, generate
from xlab.infer import main
from xlab.tokenizer import Tokenizer
from xlab.transformer import Transformer, TransformerConfig

TEXTS = ["hello world, this is a small test", "the quick brown fox jumps over the lazy dog", "héllo wörld ✓"] * 4


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, Transformer, Tokenizer]:
    tokenizer = Tokenizer.train(iter(TEXTS), vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tokenizer.vocab_size, context=64, n_layers=2, n_heads=2,
                                          d_model=32, init_std=0.2)).eval()
    path = export_checkpoint(Loaded(model, tokenizer, {}), tmp_path_factory.mktemp("infer") / "export")
    return path, model, tokenizer


def greedy_text(model: Transformer, tokenizer: Tokenizer, prompt: str, n: int) -> str:
    """The reference: a full forward pass per token, no cache, stopping at end of document."""
    return tokenizer.decode(greedy_reference(model, tokenizer.encode(prompt), n, tokenizer.eos_id, keep_eos=False))


def infer(*args, **kwargs):
    # one thread: a tiny model gains nothing from more, and they would contend on a busy machine
    return run_script("infer.py", *args, check=False, timeout=120, env={"OMP_NUM_THREADS": "1"}, **kwargs)


def test_greedy_output(export):
    path, model, tokenizer = export
    result = infer(path, "hello world", "--greedy", "--max-new-tokens", 25, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello world" + greedy_text(model, tokenizer, "hello world", 25) + "\n"


def test_interactive_mode_replies_to_each_line_until_eof(export):
    path, model, tokenizer = export
    result = infer(path, "--greedy", "--max-new-tokens", 12, input="the quick\n\nhéllo\n")
    assert result.returncode == 0, result.stderr
    # the empty line is skipped: one reply per prompt, in order
    expected = "".join(greedy_text(model, tokenizer, p, 12) + "\n" for p in ["the quick", "héllo"])
    assert result.stdout == expected


def test_sampling_defaults_and_seed_and_beams_give_n_best(export):
    path, model, tokenizer = export
    result = infer(path, "the", "--seed", 3, "--max-new-tokens", 15, "--top-p", 0.9)
    assert result.returncode == 0, result.stderr
    # the documented defaults (temperature 0.8, top-k 50) and the seed, as the library applies them
    config = GenerationConfig(strategy="sample", max_new_tokens=15, temperature=0.8, top_k=50, top_p=0.9,
                              eos_id=tokenizer.eos_id, bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
    [[sampled]] = generate(model, [tokenizer.encode("the")], config, torch.Generator().manual_seed(3))
    assert result.stdout == "the" + tokenizer.decode(sampled.tokens) + "\n"
    beams = infer(path, "the", "--beam-width", 3, "--num-samples", 2, "--max-new-tokens", 8)
    assert beams.returncode == 0, beams.stderr
    assert [line.split(" (")[0] for line in beams.stdout.splitlines() if line.startswith("---")] == \
        ["--- beam 1", "--- beam 2"]


@pytest.mark.parametrize("args, message", [
    (["--greedy", "--top-k", "5"], "error: --top-k only applies to sampling, not with --greedy"),
    (["--top-p", "1.5"], "error: --top-p must be in (0, 1], got 1.5"),
    (["--temperature", "0"], "error: --temperature must be > 0 for sampling, got 0.0"),
])
def test_bad_options_are_one_line_errors(export, args, message):
    result = infer(export[0], "hello", *args)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args, message", [
    (["--beam-width", "3", "--temperature", "0.7"], "error: --temperature only applies to sampling"),
    (["--beam-width", "3", "--top-k", "5", "--seed", "1"], "error: --top-k, --seed only apply to sampling"),
    (["--greedy", "--length-penalty", "2"], "error: --length-penalty only applies to beam search"),
    (["--min-p", "2"], "error: --min-p must be in [0, 1], got 2.0"),
    (["--beam-width", "0"], "error: --beam-width must be >= 1"),
    (["--beam-width", "2", "--num-samples", "3"], "error: --num-samples=3 exceeds the beam width 2"),
    (["--greedy", "--num-samples", "2"], "error: --num-samples > 1 needs sampling or beam search"),
    (["--repetition-penalty", "0"], "error: --repetition-penalty must be > 0"),
    (["--top-k", "many"], "error: argument --top-k: invalid int value: 'many'"),
])
def test_more_bad_options_in_process(export, capsys, args, message):
    """The same entry point as infer.py, called in-process: these fail before loading anything."""
    assert main([str(export[0]), "hello", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""


def test_missing_checkpoint_and_mismatched_tokenizer(export, tmp_path):
    result = infer(tmp_path / "nowhere", "hello")
    assert result.returncode == 2
    assert result.stderr.startswith("error: checkpoint not found") and result.stderr.count("\n") == 1
    big = Tokenizer.train(iter(TEXTS * 20 + [" ".join(map(str, range(2000)))]), vocab_size=600, show_progress=False)
    assert big.vocab_size > export[2].vocab_size
    big.save(tmp_path / "big.json")
    result = infer(export[0], "hello", "--tokenizer", tmp_path / "big.json")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "does not belong" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
