"""Training: schedules, parameter groups, metrics, checkpoints, failure handling (resume: test_resume.py)."""

from __future__ import annotations

import math
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_cli, tiny_args

from xlab.checkpoint import load_checkpoint
from xlab.loss import IGNORE_INDEX
from xlab.module import LanguageModel
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
    figures = module.evaluation("val")
    assert figures["loss"] == pytest.approx(expected_loss.item(), rel=1e-5)
    assert figures["accuracy"] == pytest.approx(expected_acc.item())
    assert "bpb" not in figures  # no tokenizer, no bytes to divide by


def test_nan_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path):
    # a learning rate of 1e30 sends the weights to inf after the first update
    args = tiny_args(tmp_path, steps=50, **{"model.learning_rate": 1e30, "model.schedule.warmup_steps": 1})
    result = run_cli("fit", *args, check=False)
    assert result.returncode == 1  # a failed run, not bad input (2)
    assert "at step" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not list((tmp_path / "logs").rglob("*.ckpt"))  # nothing with NaN weights was saved


@pytest.mark.parametrize("args, message", [
    (["--model.arch.n_layerz=2"], "n_layerz"),
    (["-c", "conf/missing.yaml"], "missing.yaml"),
    (["--data.source=nowhere:else"], "nowhere:else"),
    (["--model.arch.n_heads=x"], 'Parser key "model.arch.n_heads": Expected a <class \'int\'>. Got value: x'),
])
def test_bad_config_is_one_clear_line(tmp_path, args, message):
    result = run_cli("fit", *tiny_args(tmp_path), *args, check=False)
    assert result.returncode == 2  # bad input, as for infer.py and manage.py
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "usage:" not in result.stderr


def test_validate_and_test_report_loss_perplexity_accuracy(tmp_path):
    run_cli("fit", *tiny_args(tmp_path))
    ckpt = tmp_path / "logs/version_0/checkpoints/last.ckpt"
    for stage in ("validate", "test"):
        out = run_cli(stage, *tiny_args(tmp_path), f"--ckpt_path={ckpt}").stdout
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


def test_training_reads_logged_values_only_at_logging_steps(tmp_path, monkeypatch):
    """Turning a logged tensor into a number waits for a GPU. No training metric is logged for the progress bar
    (prog_bar=True), which Lightning converts after every batch, a stale one too; the bar reads the loss and
    tokens/s itself at logging steps only, and shows them."""
    from lightning.pytorch.trainer.connectors.logger_connector import result
    from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector
    from test_loss import ARCH, batches
    from torch.utils.data import DataLoader

    from xlab.callbacks import ProgressBar, Throughput

    reads, conversions = [], []
    read, convert = _LoggerConnector.callback_metrics.fget, result.convert_tensors_to_scalars
    monkeypatch.setattr(_LoggerConnector, "callback_metrics",
                        property(lambda self: reads.append(self.trainer.global_step) or read(self)))
    monkeypatch.setattr(result, "convert_tensors_to_scalars", lambda value: conversions.append(value) or convert(value))
    bar = ProgressBar()
    trainer = L.Trainer(accelerator="cpu", max_steps=9, log_every_n_steps=3, logger=False,
                        callbacks=[Throughput(), bar], enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(LanguageModel(ARCH), DataLoader(batches(9), batch_size=None))
    assert sorted(set(reads)) == [3, 6, 9]
    assert conversions == []
    logged = trainer.callback_metrics
    shown = bar.get_metrics(trainer, None)
    assert shown["train/loss"] == pytest.approx(logged["train/loss"].item())
    assert shown["tok/s"] == pytest.approx(logged["perf/tokens_per_s"].item())


def test_python_api_checkpoint_loads_without_unpickling(tmp_path, capsys):
    """A run made with Lightning's Python API, no CLI: every loader reads its checkpoint (weights_only), and
    Lightning's own load_from_checkpoint rebuilds the same dataclasses. infer.py and manage.py in-process."""
    from xlab import infer, manage
    from xlab.data import XLabDataModule
    from xlab.generate import GenerationConfig

    torch.manual_seed(0)
    arch = TransformerConfig(vocab_size=300, context=32, n_layers=1, n_heads=2, d_model=32)
    schedule, generation = Schedule(warmup_steps=1), GenerationConfig(strategy="sample", top_k=5)
    module = LanguageModel(arch, schedule=schedule, generation=generation)
    data = XLabDataModule(max_documents=40, vocab_size=300, data_dir=str(tmp_path / "data"), context=32, batch_size=4)
    # Lightning's defaults otherwise (its progress bar and logger, as a user's script has them)
    trainer = L.Trainer(max_steps=2, default_root_dir=tmp_path, enable_model_summary=False, limit_val_batches=1,
                        num_sanity_val_steps=0)
    trainer.fit(module, data)
    ckpt = trainer.checkpoint_callback.best_model_path
    loaded = load_checkpoint(ckpt)
    assert loaded.model.config == arch and loaded.meta["step"] == 2
    # xlab.resume's counters come with the module, whatever the Trainer: 2 steps of 4 windows of 32 tokens
    assert loaded.meta["consumed"] == {"steps": 2, "windows": 8, "tokens": 256, "epoch": 0, "epoch_windows": 8}
    for name, value in module.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    capsys.readouterr()
    assert infer.main([ckpt, "def ", "--greedy", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("def ")
    manage.main(["inspect", ckpt])
    out = capsys.readouterr().out
    assert "optimizer steps: 2" in out and f"total: {sum(p.numel() for p in module.model.parameters()):,}" in out, out
    again = LanguageModel.load_from_checkpoint(ckpt)
    assert (again.model.config, again.schedule, again.generation) == (arch, schedule, generation)


@pytest.mark.parametrize("damage", ["truncated", "text", "foreign"])
def test_evaluating_an_unreadable_checkpoint_is_one_line(tmp_path, damage):
    from test_export import make_training_checkpoint, tiny_config, tiny_tokenizer

    from xlab.cli import main

    ckpt = tmp_path / "bad.ckpt"
    if damage == "text":
        ckpt = ROOT / "README.md"
    else:
        make_training_checkpoint(ckpt, tiny_config(), tiny_tokenizer())
        if damage == "truncated":
            ckpt.write_bytes(ckpt.read_bytes()[:5000])
        else:  # a Lightning checkpoint of some other model
            torch.save({"state_dict": {"layer.weight": torch.zeros(2)}, "hyper_parameters": {}}, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as exit_:
        main(["validate", *tiny_args(tmp_path), f"--ckpt_path={ckpt}"])
    message = str(exit_.value)
    assert message.startswith("error: ") and str(ckpt) in message and "\n" not in message, message
    assert ckpt.read_bytes() == before and not (tmp_path / "data").exists()  # nothing touched, nothing prepared


@pytest.mark.parametrize("flags, lr, decay, momentum", [
    ([], 0.02, 0.3, None),  # AdamW, the default
    (["--model.optimizer=torch.optim.SGD"], 0.02, 0.3, 0.0),
    (["--model.optimizer=torch.optim.SGD", "--model.optimizer.momentum=0.9"], 0.02, 0.3, 0.9),  # the README's
    (["--model.optimizer=torch.optim.SGD", "--model.optimizer.init_args.lr=0.5",
      "--model.optimizer.init_args.weight_decay=0.01"], 0.5, 0.01, 0.0),  # the optimizer's own settings win
])
def test_any_optimizer_takes_the_models_learning_rate_and_weight_decay(tmp_path, monkeypatch, flags, lr, decay,
                                                                       momentum):
    from xlab.cli import DEFAULTS, XLabCLI
    from xlab.data import XLabDataModule

    monkeypatch.setattr(sys, "argv", ["xlab.py"])  # pytest's own arguments are not the CLI's
    args = tiny_args(tmp_path, **{"model.learning_rate": 0.02, "model.weight_decay": 0.3}) + flags
    cli = XLabCLI(LanguageModel, XLabDataModule, args=args, run=False,
                  parser_kwargs={"default_config_files": [str(DEFAULTS)]})
    cli.model.trainer = cli.trainer
    config = cli.model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert scheduler.base_lrs == [lr, lr]  # the schedule multiplies these
    assert [g["weight_decay"] for g in optimizer.param_groups] == [decay, 0.0]  # matrices only
    assert optimizer.param_groups[0].get("momentum") == momentum
