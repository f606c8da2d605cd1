"""Callbacks: throughput and MFU, a checkpoint on SIGTERM (preemption), the predictions file, the progress bar,
the model summary, attention maps in TensorBoard."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, ModelSummary, RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from torch.distributed.fsdp import FSDPModule

from xlab.attention import MAX_TOKENS, figure_class, prompt_figure
from xlab.fsdp import full_copy
from xlab.module import eager

log = logging.getLogger(__name__)
PRECISION_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16, "32": torch.float32, "64": torch.float64}


# Dense peak FLOP/s (no 2:4 sparsity) of one data-centre GPU for matrix products, from the vendors' datasheets, by
# a pattern of the lower-case device name (torch.cuda.get_device_name), tried in order: the specific names first.
# "tf32" is float32 with TF32 matmuls (torch.get_float32_matmul_precision() not "highest"). Lightning's table
# lacks the H200 (plain "NVIDIA H200"), B200, L40S and MI300X and holds sparse figures for some others.
PEAK_FLOPS: dict[str, dict[torch.dtype | str, float]] = {
    r"h[12]00 nvl": {torch.bfloat16: 835.5e12, torch.float16: 835.5e12, "tf32": 417.5e12, torch.float32: 60e12},
    r"h100.*(pcie|hbm2e)": {torch.bfloat16: 756e12, torch.float16: 756e12, "tf32": 378e12, torch.float32: 51.2e12},
    r"h100|h200": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, "tf32": 494.7e12, torch.float32: 66.9e12},
    r"gb200": {torch.bfloat16: 2.5e15, torch.float16: 2.5e15, "tf32": 1.25e15, torch.float32: 80e12},
    r"b200": {torch.bfloat16: 2.25e15, torch.float16: 2.25e15, "tf32": 1.1e15, torch.float32: 75e12},
    r"a100": {torch.bfloat16: 312e12, torch.float16: 312e12, "tf32": 156e12, torch.float32: 19.5e12},
    r"l40s": {torch.bfloat16: 362.05e12, torch.float16: 362.05e12, "tf32": 183e12, torch.float32: 91.6e12},
    r"mi3[02]5x|mi300x": {torch.bfloat16: 1307.4e12, torch.float16: 1307.4e12, "tf32": 653.7e12,
                          torch.float32: 163.4e12},
}


def precision_dtype(precision: str) -> torch.dtype:
    """The matmul dtype of a Lightning precision string such as 'bf16-mixed' or '32-true'."""
    return PRECISION_DTYPES.get(str(precision).split("-")[0], torch.float32)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of one GPU for products in `dtype`: XLab's table, else Lightning's, else None."""
    name = torch.cuda.get_device_name(device).lower()
    kind = "tf32" if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest" else dtype
    for pattern, peaks in PEAK_FLOPS.items():
        if re.search(pattern, name):
            return peaks.get(kind)
    return get_available_flops(device, dtype)


class Throughput(L.Callback):
    """Logs tokens/s, tokens seen and model FLOPs utilisation every `log_every_n_steps`.

    MFU = FLOPs per token (the model's 6N + attention estimate) x tokens/s / (peak x devices).
    The peak comes from `peak_flops` (per device), else from `PEAK_FLOPS` or Lightning's table of known GPUs;
    on a CPU without `peak_flops` MFU is not logged. Under gradient accumulation an interval ends after the
    last micro-batch of its logging step, and every micro-batch's tokens count. Timing never synchronises the
    device: over a logging interval the queue of pending work is short against the interval.
    """

    def __init__(self, peak_flops: float | None = None):
        self.peak_flops = peak_flops
        self._start: float | None = None
        self._tokens = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None and trainer.strategy.root_device.type == "cuda":
            self.peak_flops = peak_flops(trainer.strategy.root_device, precision_dtype(trainer.precision))
        self._flops_per_token = pl_module.model.flops_per_token()["total"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start, self._tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch[0].numel() * trainer.world_size
        accumulating = trainer.fit_loop.epoch_loop._should_accumulate()  # the step has micro-batches to come
        if accumulating or not trainer._logger_connector.should_update_logs:
            return
        elapsed = time.perf_counter() - self._start
        tokens_per_s = self._tokens / elapsed
        metrics = {"perf/tokens_per_s": tokens_per_s}
        if self.peak_flops:
            metrics["perf/mfu"] = self._flops_per_token * tokens_per_s / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self._start = None


def resume_point(trainer: L.Trainer) -> tuple[int, int, int]:
    """Where a checkpoint of `fit` saved now resumes: (epoch, batches of it done, batches done since, to train again).

    Lightning counts a batch once its backward ran, but under gradient accumulation the optimizer steps every
    `accumulate_grad_batches` batches (and on an epoch's last batch): the gradients of the batches after the last
    step are not saved, so the resume point is that step and those batches are trained again. An epoch whose
    batches are all done resumes at the start of the next."""
    fit_loop = trainer.fit_loop
    progress = fit_loop.epoch_loop.batch_progress
    epoch = max(fit_loop.epoch_progress.total.started - 1, 0)  # the epoch in progress, or just ended
    done = progress.current.processed
    if done >= trainer.num_training_batches or progress.is_last_batch:
        return epoch + 1, 0, 0
    again = done % trainer.accumulate_grad_batches
    return epoch, done - again, again


def counts(ready: int, processed: int, completed: int) -> dict:
    """A Lightning progress tracker's counts (`started` goes with `ready`)."""
    return {"ready": ready, "started": ready, "processed": processed, "completed": completed}


def resume_loops_at(loops: dict, trainer: L.Trainer, validation_pending: bool) -> None:
    """Rewrite the fit loop's state in a checkpoint (`checkpoint["loops"]["fit_loop"]`) to the one Lightning writes at
    the end of the training batch of the `resume_point` (as ModelCheckpoint's `every_n_train_steps` does), from which
    its restart logic continues exactly. The state it writes elsewhere does not: at the end of `fit` it counts the
    epoch as finished (training further would skip the rest of it), and between the micro-batches of a step the
    resumed step would gather too few.

    `validation_pending`: the validation at the resume point was interrupted. It is marked as started with no batch
    done, which Lightning runs again from its beginning before training on."""
    epoch, batches, again = resume_point(trainer)
    trained = trainer.fit_loop.epoch_loop.batch_progress.total.processed - again  # batches, all epochs
    epoch_counts = counts(epoch + 1, epoch, epoch)  # started, not finished
    loops["epoch_progress"] = {"total": epoch_counts, "current": epoch_counts}
    loops["epoch_loop.batch_progress"] = {  # batch number `batches` trained, its end hooks not run
        "total": counts(trained, trained, trained - 1), "current": counts(batches, batches, batches - 1),
        "is_last_batch": False}
    validation_pending = validation_pending and not again  # else it comes again after the batches trained again
    # the logging step: Lightning adds one on restarting at the end of a batch, one more when replaying its validation
    steps = trainer.fit_loop.epoch_loop.global_step
    loops["epoch_loop.state_dict"]["_batches_that_stepped"] = steps - 1 - validation_pending
    if validation_pending:
        val = loops["epoch_loop.val_loop.batch_progress"]
        earlier = val["total"]["completed"] - val["current"]["completed"]
        val.update(total=counts(earlier + 1, earlier, earlier), current=counts(1, 0, 0))


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (preemption, a SLURM time limit) during `fit`, training or validating, save `last.ckpt` before the
    process exits; Lightning raises SIGTERMException at a batch boundary, so the state is consistent. Every checkpoint
    `fit` writes, this one or ModelCheckpoint's, resumes exactly where it was saved: see `resume_loops_at`."""

    def __init__(self):
        self.validation_interrupted = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if (not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING
                or trainer.sanity_checking):
            return
        checkpoint = trainer.checkpoint_callback
        folder = Path(checkpoint.dirpath) if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath \
            else Path(trainer.default_root_dir) / "checkpoints"
        path = folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        self.validation_interrupted = trainer.validating  # read by on_save_checkpoint
        trainer.save_checkpoint(path)
        self.validation_interrupted = False
        log.warning("SIGTERM received at step %d%s: saved %s", trainer.global_step,
                    " during validation" if trainer.validating else "", path)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING and "loops" in checkpoint:
            resume_loops_at(checkpoint["loops"]["fit_loop"], trainer, self.validation_interrupted)


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


SHOWN = {"train/loss": "train/loss", "tok/s": "perf/tokens_per_s"}  # the progress bar's training figures: logged key


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar counting optimizer steps rather than batches (they differ under gradient
    accumulation): up to max_steps, from the step a resumed run starts at; without the logger's version number
    (`v_num`), and "Epoch 0" rather than "Epoch 0/-2" for runs bounded by max_steps (Lightning then sets
    max_epochs to -1). In training it shows the loss and tokens/s read at logging steps only (see `get_metrics`)."""

    _figures: dict = {}  # the training figures read at the last logging step

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
        """Lightning's items, and the training loss and tokens/s as logged at the last logging step. Reading a logged
        tensor waits for a GPU: it happens at logging steps only, and no training metric is logged with prog_bar=True,
        which Lightning would turn into a number after every batch."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if trainer.training and trainer._logger_connector.should_update_logs:
            logged = trainer.callback_metrics
            self._figures = {name: float(logged[key]) for name, key in SHOWN.items() if key in logged}
        return items | self._figures

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


class AttentionMaps(L.Callback):
    """At the end of each validation of `fit` and `validate` (not the sanity check), log the attention maps of
    each prompt to TensorBoard's IMAGES tab as `attention/<i>`: every layer and head over the prompt's first
    `max_tokens` tokens (`xlab.attention.prompt_figure`). prompts: default the model's `sample_prompts`, encoded
    as `log_samples` encodes them. Rank 0 draws them; a sharded model (FSDP) is first gathered into a full copy,
    which every rank takes part in. Needs matplotlib (the `plot` extra), checked when the run starts.

        trainer:
          callbacks:
            - class_path: xlab.callbacks.AttentionMaps
    """

    def __init__(self, prompts: list[str] | None = None, max_tokens: int = MAX_TOKENS):
        if max_tokens < 1:
            raise ValueError(f"AttentionMaps: max_tokens must be >= 1, got {max_tokens}")
        self.prompts = prompts
        self.max_tokens = max_tokens

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        figure_class()  # matplotlib missing: fail now rather than at the first validation
        if "" in self._prompts(pl_module):
            raise ValueError("AttentionMaps: an empty prompt has no tokens to draw")

    def _prompts(self, pl_module: L.LightningModule) -> list[str]:
        return self.prompts if self.prompts is not None else list(pl_module.hparams.get("sample_prompts") or [])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        prompts = self._prompts(pl_module)
        if trainer.sanity_checking or not prompts:
            return
        model = pl_module.model
        if isinstance(model, FSDPModule):
            model = full_copy(model, pl_module.device)
        if not trainer.is_global_zero:
            return
        writers = [logger.experiment for logger in trainer.loggers if hasattr(logger.experiment, "add_figure")]
        tokenizer = trainer.datamodule.tokenizer
        with eager(model):  # hooks and a new shape: a compiled graph would recompile
            for i, prompt in enumerate(prompts):
                figure = prompt_figure(model, tokenizer, tokenizer.encode(prompt), self.max_tokens, repr(prompt))
                for writer in writers:
                    writer.add_figure(f"attention/{i}", figure, trainer.global_step, close=False)
