"""Callbacks: throughput and MFU, a checkpoint on SIGTERM (preemption), the predictions file, the progress bar,
the model summary."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ModelSummary, RichProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count

log = logging.getLogger(__name__)
PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32, "64": torch.float64}


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision string such as 'bf16-mixed' or '32-true'."""
    return PRECISION_DTYPES.get(str(precision).split("-")[0], torch.float32)


class Throughput(L.Callback):
    """Logs tokens/s, tokens seen and model FLOPs utilisation every `log_every_n_steps`.

    MFU = FLOPs per token (the model's 6N + attention estimate) x tokens/s / (peak x devices).
    The peak comes from `peak_flops` (per device), else from Lightning's table of known GPUs;
    on a CPU without `peak_flops` MFU is not logged. Timing never synchronises the device:
    over a logging interval the queue of pending work is short against the interval.
    """

    def __init__(self, peak_flops: float | None = None):
        self.peak_flops = peak_flops
        self._start: float | None = None
        self._tokens = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None and trainer.strategy.root_device.type == "cuda":
            self.peak_flops = get_available_flops(trainer.strategy.root_device,
                                                  precision_dtype(trainer.precision))
        self._flops_per_token = pl_module.model.flops_per_token()["total"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start, self._tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch[0].numel() * trainer.world_size
        if not trainer._logger_connector.should_update_logs:
            return
        elapsed = time.perf_counter() - self._start
        tokens_per_s = self._tokens / elapsed
        metrics = {"perf/tokens_per_s": tokens_per_s}
        if self.peak_flops:
            metrics["perf/mfu"] = self._flops_per_token * tokens_per_s / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        pl_module.log("tok/s", tokens_per_s, prog_bar=True, on_step=True, on_epoch=False, logger=False)
        self._start = None


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (preemption, a SLURM time limit) save `last.ckpt` before the process exits;
    Lightning raises SIGTERMException at a batch boundary, so the state is consistent."""

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        checkpoint = trainer.checkpoint_callback
        folder = Path(checkpoint.dirpath) if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath \
            else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        log.warning("SIGTERM received at step %d: saved %s", trainer.global_step, path)


class PredictionWriter(BasePredictionWriter):
    """`predict` writes one JSON line per prompt, `{"prompt": str, "completions": [str]}`, to
    `predictions.jsonl` in the log folder (`<run>/eval/predict-<time>/`; rank r > 0 of a multi-process run:
    `predictions.rank{r}.jsonl`), batch by batch, so a long run shows its progress in the file."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.path: Path | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        name = "predictions.jsonl" if trainer.global_rank == 0 else f"predictions.rank{trainer.global_rank}.jsonl"
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        log.info("writing predictions to %s", self.path)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in prediction)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar counting optimizer steps rather than batches (they differ under gradient
    accumulation): up to max_steps, from the step a resumed run starts at; without the logger's version number
    (`v_num`), and "Epoch 0" rather than "Epoch 0/-2" for runs bounded by max_steps (Lightning then sets
    max_epochs to -1)."""

    @property
    def total_train_batches(self) -> int | float:
        """The run's optimizer steps (max_steps), else an epoch's."""
        trainer = self.trainer
        return trainer.max_steps if trainer.max_steps > 0 else \
            math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._epoch_start_step = trainer.global_step if trainer.max_steps <= 0 else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # which counts batches
        self._update(self.train_progress_bar_id, trainer.global_step - self._epoch_start_step)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items

    def _get_train_description(self, current_epoch: int) -> str:
        description = super()._get_train_description(current_epoch)
        max_epochs = self.trainer.max_epochs
        return description.replace(f"/{max_epochs - 1}", "") if max_epochs is not None and max_epochs < 0 \
            else description


class FlopsSummary(ModelSummary):
    """Lightning's model summary table without its FLOPs column and total, which Lightning counts only on an
    `example_input_array` (0 without one), and with the model's training FLOPs per token instead
    (`Transformer.flops_per_token()`, the figure behind MFU)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._max_depth:
            return
        summary = self._summary(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary._get_summary_data() if name != "FLOPs"]
        table = Table(header_style="bold magenta")
        for name, _ in columns:
            table.add_column(name, justify="right" if name == "Params" else "left")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        trainable, total = summary.trainable_parameters, summary.total_parameters
        console.print(f"Trainable params: {get_human_readable_count(trainable).strip()}, non-trainable: "
                      f"{get_human_readable_count(total - trainable).strip()}, size "
                      f"{get_formatted_model_size(summary.model_size)} MB\n"
                      f"Training FLOPs per token: {pl_module.model.flops_per_token()['total']:,} (6N + attention)",
                      highlight=False)
