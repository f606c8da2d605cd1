"""The whole loop as a user runs it: fit, validate, test, export, infer, through the real scripts (the later
xlab.py commands in this process, through the same `main`)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import run_cli, run_script, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_export import greedy_reference

from xlab.checkpoint import load_checkpoint


def test_fit_validate_test_export_infer(tmp_path):
    args = tiny_args(tmp_path, steps=6)
    run_script("xlab.py", "fit", *args)
    run_dir = tmp_path / "logs/version_0"
    ckpt = run_dir / "checkpoints/last.ckpt"
    assert ckpt.is_file() and (run_dir / "config.yaml").is_file()
    assert "n_layers: 1" in (run_dir / "config.yaml").read_text()  # the run's full config is saved with it
    events = EventAccumulator(str(run_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("train/loss", "val/loss", "val/perplexity", "val/accuracy", "perf/tokens_per_s", "train/grad_norm"):
        assert tag in scalars, scalars
    assert [e.step for e in events.Scalars("train/loss")] == list(range(6))

    losses = {}
    for stage, key in (("validate", "val/loss"), ("test", "test/loss")):
        out = run_cli(stage, *args, f"--ckpt_path={ckpt}").stdout
        losses[stage] = reported(out, key)

    # predict: greedy continuations of the given prompts, each after
    # an end-of-document token, against a reference loop of full forward passes
    prompts = ["def ", "import os\n", "class A:"]
    prompts_file = tmp_path / "prompts.jsonl"  # a prompts file; JSON lines, since a prompt holds a newline
    prompts_file.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    run_cli("predict", *args, f"--ckpt_path={ckpt}", f"--data.prompts={prompts_file}",
               "--model.generation.max_new_tokens=10")
    [predictions] = (run_dir / "eval").glob("predict-*/predictions.jsonl")  # with the run it evaluates
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    loaded = load_checkpoint(ckpt)
    tok = loaded.tokenizer
    expected = [tok.decode(greedy_reference(loaded.model, [tok.eos_id, *tok.encode(p)], 10, tok.eos_id,
                                            keep_eos=False)) for p in prompts]
    assert rows == [{"prompt": p, "completions": [e]} for p, e in zip(prompts, expected, strict=True)]

    exported = tmp_path / "exported"
    run_script("manage.py", "export-checkpoint", ckpt, "--output", exported)
    meta = json.loads((exported / "xlab.json").read_text())
    assert meta["step"] == 6 and meta["arch"]["n_layers"] == 1
    assert ckpt.stat().st_size > 2.5 * (exported / "model.safetensors").stat().st_size  # no optimizer state

    # the exported folder evaluates like the checkpoint it came from, and fit fine-tunes from it
    out = run_cli("validate", *args, f"--ckpt_path={exported}").stdout
    assert reported(out, "val/loss") == pytest.approx(losses["validate"], abs=1e-6)
    tuned = tmp_path / "tuned"  # learning rate 0: the fine-tuned weights must still be the exported ones
    run_cli("fit", *tiny_args(tmp_path, steps=2, **{"trainer.logger.init_args.save_dir": tuned}),
               f"--model.init_from={exported}", "--model.learning_rate=0")
    start = load_checkpoint(exported).model.state_dict()
    after = load_checkpoint(tuned / "version_0/checkpoints/last.ckpt")
    for name, value in start.items():
        torch.testing.assert_close(after.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert after.meta["step"] == 2
    refused = run_cli("fit", *args, f"--ckpt_path={exported}", check=False)
    assert refused.returncode != 0 and "--model.init_from" in refused.stderr.strip().splitlines()[-1]

    # greedy decoding is deterministic: both checkpoint forms give the same continuation
    outputs = [run_script("infer.py", path, "def ", "--greedy", "--max-new-tokens", "12").stdout
               for path in (ckpt, exported)]
    assert outputs[0] == outputs[1] and outputs[0].startswith("def ")
    model_tokens = load_checkpoint(exported).tokenizer.encode(outputs[0].strip())
    assert len(model_tokens) > 1


def reported(stdout: str, key: str) -> float:
    """The value Lightning's results table prints for a metric."""
    return float(re.search(re.escape(key) + r"\s*│\s*([-+0-9.eE]+)", stdout).group(1))
