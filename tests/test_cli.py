"""The `xlab.py` command line: what it accepts, what it refuses, where its runs and evaluations write."""

from __future__ import annotations

import inspect
import re
import sys
import warnings
from unittest import mock

import lightning as L
import pytest
import torch
import yaml
from conftest import ROOT, run_cli, run_script, tiny_args
from lightning.pytorch.demos.boring_classes import BoringModel

from xlab.callbacks import ProgressBar
from xlab.checkpoint import load_checkpoint
from xlab.cli import main
from xlab.data import XLabDataModule


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    """The in-process tests pass their arguments explicitly; pytest's own must not look like a second set."""
    monkeypatch.setattr(sys, "argv", ["xlab.py"])


def error_of(*args: str) -> str:
    """The one-line message `main` exits with."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@pytest.mark.parametrize("flag", ["--model.arch.n_layer=2", "--trainer.max_step=2", "--optimizer=torch.optim.SGD",
                                  "--lr_scheduler=torch.optim.lr_scheduler.StepLR"])
def test_abbreviated_and_lightning_optimizer_keys_are_errors(tmp_path, flag):
    key = flag.split("=")[0].removeprefix("--")
    message = error_of("fit", *tiny_args(tmp_path), flag)
    assert key in message and "see ./xlab.py fit --help" in message


def test_print_config_offers_only_xlab_optimizer_keys(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    assert "optimizer" not in config and "lr_scheduler" not in config
    assert "optimizer" in config["model"] and "schedule" in config["model"]  # XLab's own, inside the model


def test_help_gives_each_subcommand_its_whole_description(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out.split("Available subcommands:")[1]
    names = ["fit", "validate", "test", "predict", "prepare_data", "train_tokenizer", "compute_stats"]
    blocks = re.split(r"\n    (" + "|".join(names) + r")\s", listing)[1:]
    described = {name: " ".join(text.split()) for name, text in zip(blocks[::2], blocks[1::2], strict=True)}
    assert sorted(described) == sorted(names)
    for name, text in described.items():
        assert text.endswith("."), (name, text)  # a whole sentence, not cut at the width of a line
    for name in ("prepare_data", "train_tokenizer", "compute_stats"):
        paragraph = " ".join(inspect.cleandoc(getattr(XLabDataModule, name).__doc__).split("\n\n")[0].split())
        assert described[name] == paragraph


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_is_refused(tmp_path, stage):
    message = error_of(stage, *tiny_args(tmp_path))
    assert "--ckpt_path" in message and "--untrained=true" in message
    assert not (tmp_path / "logs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without GPUs")
@pytest.mark.parametrize("flag, fix", [("--trainer.accelerator=gpu", "--trainer.accelerator=auto"),
                                       ("--trainer.devices=-1", "--trainer.devices=N")])
def test_asking_for_gpus_without_any_is_one_line_naming_the_fix(tmp_path, flag, fix):
    assert fix in error_of("fit", *tiny_args(tmp_path), flag)


def test_evaluations_are_written_with_the_run_they_evaluate(tmp_path):
    args = tiny_args(tmp_path, steps=2)
    run_cli("fit", *args)
    run = tmp_path / "logs/version_0"
    run_cli("validate", *args, f"--ckpt_path={run}/checkpoints/last.ckpt")
    with mock.patch("time.strftime", return_value="19990101-120000"):  # a second evaluation in the same second
        run_cli("validate", *args, f"--ckpt_path={run}/checkpoints/last.ckpt")
        run_cli("validate", *args, f"--ckpt_path={run}/checkpoints/last.ckpt")
    assert sorted(p.name for p in (run / "eval").glob("validate-1999*")) == [
        "validate-19990101-120000", "validate-19990101-120000-2"]  # each its own folder
    [validate] = [p for p in (run / "eval").glob("validate-*") if not p.name.startswith("validate-1999")]
    assert re.fullmatch(r"validate-\d{8}-\d{6}", validate.name)  # (predict: tests/test_end_to_end.py)
    assert "ckpt_path" in (validate / "config.yaml").read_text() and list(validate.glob("events.out.tfevents.*"))
    # an untrained model on purpose: its scores go to the folder the README names
    out = run_cli("validate", *args, "--untrained=true").stdout
    assert "val/loss" in out
    assert len(list((tmp_path / "logs/eval").glob("validate-*/config.yaml"))) == 1
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["eval", "version_0"]  # one run


def test_a_fit_that_fails_before_its_first_step_leaves_nothing(tmp_path):
    # infinite initial weights: the first training step stops the run, after the run folder was set up
    result = run_cli("fit", *tiny_args(tmp_path), "--model.arch.init_std=1e39", check=False)
    assert result.returncode != 0 and "at step 0" in result.stderr, result.stderr
    assert not list((tmp_path / "logs").glob("version_*"))


def test_init_from_records_the_architecture_it_trains_and_resumes(tmp_path):
    base = tmp_path / "base/version_0/checkpoints/last.ckpt"
    run_cli("fit", *tiny_args(tmp_path, steps=2,
                                **{"trainer.logger.init_args.save_dir": base.parents[2]}))
    # the config asks for 2 layers with RoPE; the checkpoint has 1 with learned positions, and wins
    tuned = tiny_args(tmp_path, steps=2, **{"trainer.logger.init_args.save_dir": tmp_path / "tuned",
                                            "model.arch.n_layers": 2, "model.arch.position": "rope"})
    run_cli("fit", *tuned, f"--model.init_from={base}")
    run = tmp_path / "tuned/version_0"
    trained = load_checkpoint(base).model.config
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True, mmap=True)
    config, hparams = (yaml.safe_load((run / name).read_text()) for name in ("config.yaml", "hparams.yaml"))
    for recorded in (ckpt["hyper_parameters"]["arch"], config["model"]["arch"], hparams["arch"]):
        recorded = recorded if isinstance(recorded, dict) else vars(recorded)
        assert (recorded["n_layers"], recorded["position"]) == (trained.n_layers, trained.position), recorded
    # resuming its checkpoints needs no --model.init_from (it was a multi-page state_dict traceback)
    run_cli("fit", *tuned, "--trainer.max_steps=3", "--ckpt_path=last")
    assert load_checkpoint(run / "checkpoints/last.ckpt").meta["step"] == 3
    # the resume keeps the run's config.yaml as it was and records its own beside it
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 2
    [resumed] = run.glob("config-resume-*.yaml")
    assert re.fullmatch(r"config-resume-\d{8}-\d{6}\.yaml", resumed.name)
    assert yaml.safe_load(resumed.read_text())["trainer"]["max_steps"] == 3


def test_ddp_config_on_the_cpu_global_batch_and_a_clean_console(tmp_path):
    args = tiny_args(tmp_path, steps=2, **{"trainer.enable_model_summary": True})
    result = run_script("xlab.py", "fit", "-c", "conf/extra/ddp.yaml", *args, "--global_batch_size=12")
    output = result.stdout + result.stderr
    assert "DDP on the CPU: 1 process" in output, output
    for noise in ("Tip:", "LeafSpec", "Total FLOPs: 0", "Traceback"):
        assert noise not in output, output
    # --global_batch_size: the accumulation is stated, saved, and trained with
    assert "global batch 12 = 4 sequences x 1 device x 3 accumulated batches" in output
    run = tmp_path / "logs/version_0"
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["accumulate_grad_batches"] == 3
    loaded = load_checkpoint(run / "checkpoints/last.ckpt")
    assert loaded.meta["tokens_seen"] == 2 * 12 * 32
    assert f"Training FLOPs per token: {loaded.model.flops_per_token()['total']:,}" in output, output


class BarRecorder(L.Callback):
    """What the progress bar shows after each training batch: (completed, total) of its training task."""

    def __init__(self, bar: ProgressBar):
        self.bar, self.shown = bar, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        task = self.bar.progress.tasks[self.bar.train_progress_bar_id]
        self.shown.append((task.completed, task.total))


def test_progress_bar_counts_optimizer_steps_also_after_a_resume(tmp_path):
    def fit(max_steps, ckpt_path=None):
        bar = ProgressBar()
        recorder = BarRecorder(bar)
        trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=3, callbacks=[bar, recorder], logger=False,
                            default_root_dir=tmp_path, enable_model_summary=False, limit_val_batches=0,
                            enable_checkpointing=False)
        trainer.fit(BoringModel(), ckpt_path=ckpt_path)
        return trainer, recorder.shown

    trainer, shown = fit(2)
    # 6 batches make 2 optimizer steps of 3 batches each
    assert shown == [(0, 2), (0, 2), (1, 2), (1, 2), (1, 2), (2, 2)]
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    _, shown = fit(4, tmp_path / "two.ckpt")
    assert shown == [(2, 4), (2, 4), (3, 4), (3, 4), (3, 4), (4, 4)]


def test_readme_and_default_config_agree_on_the_default_run():
    steps = yaml.safe_load((ROOT / "conf/defaults.yaml").read_text())["trainer"]["max_steps"]
    readme = (ROOT / "README.md").read_text()
    assert f"context 256, {steps} steps" in readme and f"checkpoints/step{steps}-val" in readme


def test_an_evaluation_warns_of_no_checkpoint_folder(tmp_path):
    """validate/test/predict write no checkpoints: the run's ModelCheckpoint state is not restored into the
    evaluation's folder, which Lightning warned about ('The dirpath has changed ...') on every evaluation."""
    args = tiny_args(tmp_path, steps=2)
    run_cli("fit", *args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_cli("validate", *args, "--ckpt_path=last")
    assert "val/loss" in result.stdout
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]


def test_global_batch_and_another_accumulation_are_refused(tmp_path):
    # 12 sequences of 4 on one device is 3 accumulated batches, not 2
    message = error_of("fit", *tiny_args(tmp_path), "--global_batch_size=12", "--trainer.accumulate_grad_batches=2")
    assert "3 accumulated batches" in message and "accumulate_grad_batches is 2" in message
    assert not (tmp_path / "data").exists()
