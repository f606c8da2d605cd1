"""Callbacks: throughput and MFU, the predictions file, the progress bar, the model summary, attention maps in
TensorBoard. (Saving on SIGTERM and resuming are `xlab.resume`'s.)"""

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
from lightning.pytorch.callbacks import BasePredictionWriter, ModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count
from torch.distributed.fsdp import FSDPModule

from xlab import loops
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
    """Logs tokens/s and model FLOPs utilisation every `log_every_n_steps`.

    MFU = FLOPs per token (the model's 6N + attention estimate) x tokens/s / (peak x devices).
    The peak comes from `peak_flops` (per device), else from `PEAK_FLOPS` or Lightning's table of known GPUs;
    on a CPU without `peak_flops` MFU is not logged. Tokens are every rank's, over the training time of the
    interval: a validation inside it is not counted. Under gradient accumulation an interval ends after the last
    micro-batch of its logging step, and every micro-batch's tokens count. Timing never synchronises the device:
    over a logging interval the queue of pending work is short against the interval.
    """

    def __init__(self, peak_flops: float | None = None):
        self.peak_flops = peak_flops
        self._start: float | None = None  # of the interval's training time
        self._paused: float | None = None  # when the validation in progress began
        self._tokens = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None and trainer.strategy.root_device.type == "cuda":
            self.peak_flops = peak_flops(trainer.strategy.root_device, precision_dtype(trainer.precision))
        self._flops_per_token = pl_module.model.flops_per_token()["total"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start, self._tokens = time.perf_counter(), 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None:
            self._paused = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._paused is not None:  # the interval's clock skips the validation
            self._start += time.perf_counter() - self._paused
            self._paused = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._tokens += batch[0].numel() * trainer.world_size
        if loops.has_micro_batches_to_come(trainer) or not loops.is_logging_step(trainer):
            return
        elapsed = time.perf_counter() - self._start
        tokens_per_s = self._tokens / elapsed
        metrics = {"perf/tokens_per_s": tokens_per_s}
        if self.peak_flops:
            metrics["perf/mfu"] = self._flops_per_token * tokens_per_s / (self.peak_flops * trainer.world_size)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self._start = None


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

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # which counts batches
        self._update(self.train_progress_bar_id, self.steps_done(trainer))

    @staticmethod
    def steps_done(trainer: L.Trainer) -> int:
        """The run's optimizer steps (bounded by max_steps), else the current epoch's. Worked out at every batch:
        a run resumed mid-epoch starts without Lightning's on_train_epoch_start."""
        if trainer.max_steps > 0:
            return trainer.global_step
        done, accumulate = loops.batches_done_in_epoch(trainer), trainer.accumulate_grad_batches
        return math.ceil(done / accumulate) if done >= trainer.num_training_batches else done // accumulate

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """Lightning's items, and the training loss and tokens/s as logged at the last logging step. Reading a logged
        tensor waits for a GPU: it happens at logging steps only, and no training metric is logged with prog_bar=True,
        which Lightning would turn into a number after every batch."""
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        if trainer.training and loops.is_logging_step(trainer):
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
    as every prompt is (`Tokenizer.encode_prompt`: the start token first). Rank 0 draws them; a sharded model
    (FSDP) is first gathered into a full copy, which every rank takes part in. Needs matplotlib (the `plot` extra),
    checked when the run starts.

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
                figure = prompt_figure(model, tokenizer, tokenizer.encode_prompt(prompt), self.max_tokens,
                                       repr(prompt))
                for writer in writers:
                    writer.add_figure(f"attention/{i}", figure, trainer.global_step, close=False)
