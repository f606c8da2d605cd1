"""Resuming a run exactly: what a run has consumed, and where its checkpoints resume.

`Consumed` holds the run's counters, summed over every rank and every start of the run: optimizer steps, training
windows drawn, input tokens trained on, and how far into its epoch the sampler is. They are counted as they happen,
one optimizer step at a time, never recomputed from batches x world size, so they stay exact when a run resumes on
another number of devices. Micro-batches of a step not yet taken are not counted: a checkpoint saved between them
resumes at the step's start and trains them again.

`Resume`, a callback every `LanguageModel` brings (`configure_callbacks`), keeps them and
- writes them, with the resume point, into every checkpoint `fit` saves (`checkpoint["xlab"]["consumed"]`), and has
  Lightning's loop state there rewritten to that point (`xlab.loops.rewrite_fit_loop`);
- hands the position back to the DataModule on resuming (`XLabDataModule.resume_at`);
- saves `last.ckpt` on SIGTERM (preemption, a SLURM time limit) while training or validating, and at the end of
  `fit` when Lightning's last one is older.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from xlab import loops

log = logging.getLogger(__name__)


@dataclass
class Consumed:
    """A run's counters up to its last optimizer step, all ranks together."""

    steps: int = 0  # optimizer steps
    windows: int = 0  # training windows (sequences) drawn, all epochs
    tokens: int = 0  # input tokens of those windows
    epoch: int = 0  # the epoch `epoch_windows` belongs to
    epoch_windows: int = 0  # windows drawn in that epoch: where its sampler goes on

    def add_step(self, epoch: int, windows: int, tokens: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.epoch_windows = epoch, 0
        self.steps += 1
        self.windows += windows
        self.tokens += tokens
        self.epoch_windows += windows


class Resume(L.Callback):
    """Counts what `fit` consumes, and makes every checkpoint it saves resume exactly (see the module docstring)."""

    def __init__(self):
        self.consumed = Consumed()
        self._pending = (0, 0)  # windows, tokens of the micro-batches since the last optimizer step
        self._step = 0  # the trainer's global step when they were counted
        self._validation_interrupted = False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending, self._step = (0, 0), trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        inputs = batch[0]  # (B, T) on this rank; every rank draws as many (the sampler drops the rest)
        windows, tokens = self._pending
        self._pending = (windows + len(inputs) * trainer.world_size, tokens + inputs.numel() * trainer.world_size)
        if trainer.global_step > self._step:  # this batch ended an optimizer step
            self.consumed.add_step(trainer.current_epoch, *self._pending)
            self._pending, self._step = (0, 0), trainer.global_step
            if loops.is_logging_step(trainer):
                pl_module.log("train/tokens_seen", float(self.consumed.tokens), on_step=True, on_epoch=False,
                              rank_zero_only=True)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != TrainerFn.FITTING or "loops" not in checkpoint:
            return
        loops.rewrite_fit_loop(checkpoint["loops"]["fit_loop"], trainer, self._validation_interrupted)
        epoch, batches, _ = loops.resume_point(trainer)
        windows = self.consumed.epoch_windows if epoch == self.consumed.epoch else 0  # an epoch ended: the next
        datamodule = trainer.datamodule
        checkpoint.setdefault("xlab", {}).update(consumed=asdict(self.consumed), tokens_seen=self.consumed.tokens)
        checkpoint["xlab"]["resume"] = {
            "epoch": epoch, "windows": windows, "loop_batches": batches,
            "data": datamodule.position_key() if hasattr(datamodule, "position_key") else None}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        meta = checkpoint.get("xlab", {})
        if "consumed" in meta:
            self.consumed, resume = Consumed(**meta["consumed"]), meta["resume"]
        else:  # written by XLab before these counters: its tokens_seen and the DataModule's own epoch position
            self.consumed, resume = legacy_position(checkpoint, pl_module)
        if trainer.state.fn == TrainerFn.FITTING and hasattr(trainer.datamodule, "resume_at"):
            trainer.datamodule.resume_at(**resume)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning writes last.ckpt at validations (and epoch ends) only, and at the end of fit only when it wrote
        none: steps after the last validation would be lost, and a finished run's last.ckpt would not be its end."""
        loops.save_last_if_behind(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On SIGTERM during `fit`, training or validating, save `last.ckpt` before the process exits. Lightning
        raises SIGTERMException at a batch boundary, so the state is consistent."""
        if (not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING
                or trainer.sanity_checking):
            return
        checkpoint = trainer.checkpoint_callback
        folder = Path(checkpoint.dirpath) if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath \
            else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        self._validation_interrupted = trainer.validating  # read by on_save_checkpoint
        trainer.save_checkpoint(path)
        self._validation_interrupted = False
        log.warning("SIGTERM received at step %d%s: saved %s", trainer.global_step,
                    " during validation" if trainer.validating else "", path)


def legacy_position(checkpoint: dict, pl_module: L.LightningModule) -> tuple[Consumed, dict]:
    """The counters and resume position of a checkpoint written before `Consumed` existed: its optimizer steps, its
    tokens seen, the DataModule's epoch position, and windows worked out from tokens (exact for packed windows)."""
    tokens = checkpoint.get("xlab", {}).get("tokens_seen", 0)
    data = checkpoint.get("XLabDataModule") or {}
    context = pl_module.model.config.context
    consumed = Consumed(steps=checkpoint.get("global_step", 0), windows=tokens // context, tokens=tokens,
                        epoch=data.get("epoch", 0), epoch_windows=data.get("seen", 0))
    key = {k: data[k] for k in ("seed", "windows", "fingerprint")} if data else None
    return consumed, {"epoch": consumed.epoch, "windows": consumed.epoch_windows,
                      "loop_batches": data.get("batches", 0), "data": key}
