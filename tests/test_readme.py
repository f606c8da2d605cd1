"""The README's "Use in your code" snippet, run exactly as written, on a training checkpoint and an export."""

from __future__ import annotations

import contextlib
import io
import re

import torch
from conftest import ROOT
from test_export import greedy_reference, make_training_checkpoint, tiny_config, tiny_tokenizer

from xlab.checkpoint import export_checkpoint, load_checkpoint
from xlab.generate import GenerationConfig, generate

SNIPPET_PATH = "logs/version_0/checkpoints/last.ckpt"


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Use in your code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_use_in_your_code_snippet_runs_on_full_and_exported_checkpoints(tmp_path, monkeypatch):
    snippet = readme_snippet()
    assert SNIPPET_PATH in snippet
    tok = tiny_tokenizer()
    ckpt = tmp_path / SNIPPET_PATH
    ckpt.parent.mkdir(parents=True)
    make_training_checkpoint(ckpt, tiny_config("llama", tok.vocab_size, context=64), tok)  # room for 40 new
    exported = tmp_path / "exported"
    export_checkpoint(load_checkpoint(ckpt), exported)
    monkeypatch.chdir(tmp_path)

    outputs = []
    for path in (SNIPPET_PATH, str(exported)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(snippet.replace(SNIPPET_PATH, path), "README.md", "exec"), {})
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]  # the same weights and tokenizer either way

    # the greedy lines are what a reference loop of full forward passes gives
    loaded = load_checkpoint(ckpt)
    model, tok = loaded.model, loaded.tokenizer
    lines = outputs[0].splitlines()
    assert len(lines) == 6 and [line.split()[0] for line in lines] == ["greedy"] * 2 + ["sample"] * 2 + ["beam"] * 2
    starts = [[tok.eos_id, *tok.encode(p)] for p in ("def ", "import ")]  # prompts start documents, as in training
    for prompt, line in zip(starts, lines[:2], strict=True):
        new = greedy_reference(model, prompt, 40, tok.eos_id, keep_eos=False)
        assert line == f"greedy {tok.decode(new)!r}"
    # and the sampled lines follow the seed
    config = GenerationConfig(strategy="sample", temperature=0.8, top_p=0.95, max_new_tokens=40, eos_id=tok.eos_id,
                              bos_id=tok.bos_id, pad_id=tok.pad_id)
    sampled = generate(model, starts, config, torch.Generator().manual_seed(0))
    assert lines[2:4] == [f"sample {tok.decode(best.tokens)!r}" for [best] in sampled]
