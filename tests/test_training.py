"""Training: schedules, parameter groups, metrics, checkpoints and resume, failure handling."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_script, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xlab.checkpoint import load_checkpoint
from xlab.module import IGNORE_INDEX, LanguageModel
from xlab.optim import Schedule, param_groups
from xlab.transformer import Transformer, TransformerConfig


@pytest.mark.parametrize("kind, step, expected", [
    ("cosine", 0, 0.1), ("cosine", 9, 1.0), ("cosine", 10, 1.0),
    ("cosine", 60, 0.1 + 0.9 * 0.5),  # half-way through the decay: cos(pi/2) = 0
    ("cosine", 110, 0.1), ("cosine", 500, 0.1),
    ("constant", 4, 0.5), ("constant", 80, 1.0),
    ("wsd", 50, 1.0), ("wsd", 88, 1.0),  # decay starts at 110 - 22 = 88
    ("wsd", 99, 1.0 - 0.9 * 0.5), ("wsd", 110, 0.1),
])
def test_schedule_values_worked_out_by_hand(kind, step, expected):
    schedule = Schedule(kind=kind, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    assert schedule(step, total=110) == pytest.approx(expected)


def test_weight_decay_only_on_matrices():
    model = Transformer(TransformerConfig(vocab_size=50, context=8, n_layers=2, n_heads=2, d_model=8))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    expected = {f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")}
    assert decayed == expected
    assert {names[id(p)] for p in no_decay["params"]} == set(names.values()) - expected
    with_embeddings = param_groups(model, weight_decay=0.1, decay_embeddings=True)[0]["params"]
    assert {names[id(p)] for p in with_embeddings} == expected | {"wte.weight", "wpe.weight"}


def test_evaluation_metrics_match_direct_computation():
    torch.manual_seed(0)
    module = LanguageModel(TransformerConfig(vocab_size=40, context=8, n_layers=1, n_heads=2, d_model=16))
    batches = [(torch.randint(0, 40, (3, 8)), torch.randint(0, 40, (3, 8))) for _ in range(2)]
    batches[1][1][0, :5] = IGNORE_INDEX  # padding, ignored by loss and accuracy
    for batch in batches:
        module.evaluate(batch, "val")
    logits = torch.cat([module.model(x) for x, _ in batches]).flatten(0, 1)
    targets = torch.cat([y for _, y in batches]).flatten()
    keep = targets != IGNORE_INDEX
    expected_loss = F.cross_entropy(logits[keep], targets[keep])  # mean over all real tokens
    expected_acc = (logits[keep].argmax(-1) == targets[keep]).float().mean()
    assert module.metrics["val_loss"].compute() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert module.metrics["val_acc"].compute() == pytest.approx(expected_acc.item())


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path):
    def weights(path):
        return load_checkpoint(path).model.state_dict()

    # the schedule's length is fixed, so stopping at max_steps=3 is an interruption, not a shorter run
    common = {"trainer.val_check_interval": 3, "trainer.logger.init_args.save_dir": tmp_path / "a",
              "model.schedule.total_steps": 6}
    run_script("xlab.py", "fit", *tiny_args(tmp_path, steps=6, **common))
    straight = tmp_path / "a/version_0/checkpoints/last.ckpt"
    # the same run interrupted at step 3, then resumed from its last checkpoint up to step 6
    common["trainer.logger.init_args.save_dir"] = tmp_path / "b"
    run_script("xlab.py", "fit", *tiny_args(tmp_path, steps=3, **common))
    first = torch.load(tmp_path / "b/version_0/checkpoints/last.ckpt", weights_only=False)
    # "last": the newest run's last.ckpt; the resumed run continues in its folder (one TensorBoard run)
    run_script("xlab.py", "fit", *tiny_args(tmp_path, steps=6, **common), "--ckpt_path=last")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["version_0"]
    resumed = tmp_path / "b/version_0/checkpoints/last.ckpt"
    assert load_checkpoint(resumed).meta["step"] == 6
    # the best-k bookkeeping went on from the first part's: its step-3 checkpoint is still among the best
    [state] = [v for k, v in torch.load(resumed, weights_only=False)["callbacks"].items() if "ModelCheckpoint" in k]
    [first_state] = [v for k, v in first["callbacks"].items() if "ModelCheckpoint" in k]
    assert set(first_state["best_k_models"]) <= set(state["best_k_models"]) and len(state["best_k_models"]) == 2
    assert state["best_model_score"] == min(state["best_k_models"].values())
    events = EventAccumulator(str(tmp_path / "b/version_0"))
    events.Reload()
    assert sorted({e.step for e in events.Scalars("train/loss")}) == list(range(6))  # one curve, steps 0-5
    a, b = weights(straight), weights(resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_sigterm_saves_a_checkpoint_before_exiting(tmp_path):
    args = tiny_args(tmp_path, steps=100000, **{"trainer.val_check_interval": 100000})
    proc = subprocess.Popen([sys.executable, str(ROOT / "xlab.py"), "fit", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events = tmp_path / "logs/version_0"
    deadline = time.time() + 120
    while not list(events.glob("events.out.tfevents.*")) and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # a few training steps
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    last = events / "checkpoints/last.ckpt"
    assert last.is_file(), output
    step = load_checkpoint(last).meta["step"]
    assert 0 < step < 100000


def test_nan_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path):
    # a learning rate of 1e30 sends the weights to inf after the first update
    args = tiny_args(tmp_path, steps=50, **{"model.learning_rate": 1e30, "model.schedule.warmup_steps": 1})
    result = run_script("xlab.py", "fit", *args, check=False)
    assert result.returncode != 0
    assert "at step" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not list((tmp_path / "logs").rglob("*.ckpt"))  # nothing with NaN weights was saved


@pytest.mark.parametrize("args, message", [
    (["--model.arch.n_layerz=2"], "n_layerz"),
    (["-c", "conf/missing.yaml"], "missing.yaml"),
    (["--data.source=nowhere:else"], "nowhere:else"),
    (["--model.arch.n_heads=x"], 'Parser key "model.arch.n_heads": Expected a <class \'int\'>. Got value: x'),
])
def test_bad_config_is_one_clear_line(tmp_path, args, message):
    result = run_script("xlab.py", "fit", *tiny_args(tmp_path), *args, check=False)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "usage:" not in result.stderr


def test_validate_and_test_report_loss_perplexity_accuracy(tmp_path):
    run_script("xlab.py", "fit", *tiny_args(tmp_path))
    ckpt = tmp_path / "logs/version_0/checkpoints/last.ckpt"
    for stage in ("validate", "test"):
        out = run_script("xlab.py", stage, *tiny_args(tmp_path), f"--ckpt_path={ckpt}").stdout
        prefix = "val" if stage == "validate" else "test"
        for metric in ("loss", "perplexity", "accuracy"):
            assert f"{prefix}/{metric}" in out, out
    meta = load_checkpoint(ckpt).meta
    assert math.isfinite(meta["val_loss"]) and meta["tokens_seen"] == 4 * 4 * 32


def test_progress_bar_hides_v_num_and_the_negative_epoch_count(tmp_path):
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from xlab.callbacks import ProgressBar

    bar = ProgressBar()
    # max_epochs -1: what Lightning sets when fitting a run bounded by max_steps
    trainer = L.Trainer(max_steps=5, max_epochs=-1, logger=TensorBoardLogger(tmp_path), callbacks=[bar],
                        enable_model_summary=False)
    bar.setup(trainer, None, "fit")
    assert "/-2" in RichProgressBar._get_train_description(bar, 0)
    assert bar._get_train_description(0).strip() == "Epoch 0"
    assert "v_num" in RichProgressBar.get_metrics(bar, trainer, None)
    assert "v_num" not in bar.get_metrics(trainer, None)
