"""The whole loop as a user runs it: fit, validate, test, export, infer, through the real scripts."""

from __future__ import annotations

import json

from conftest import run_script, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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

    for stage, key in (("validate", "val/loss"), ("test", "test/loss")):
        assert key in run_script("xlab.py", stage, *args, f"--ckpt_path={ckpt}").stdout

    exported = tmp_path / "exported"
    run_script("manage.py", "export-checkpoint", ckpt, "--output", exported)
    meta = json.loads((exported / "xlab.json").read_text())
    assert meta["step"] == 6 and meta["arch"]["n_layers"] == 1
    assert ckpt.stat().st_size > 2.5 * (exported / "model.safetensors").stat().st_size  # no optimizer state

    # greedy decoding is deterministic: both checkpoint forms give the same continuation
    outputs = [run_script("infer.py", path, "def ", "--greedy", "--max-new-tokens", "12").stdout
               for path in (ckpt, exported)]
    assert outputs[0] == outputs[1] and outputs[0].startswith("def ")
    model_tokens = load_checkpoint(exported).tokenizer.encode(outputs[0].strip())
    assert len(model_tokens) > 1
