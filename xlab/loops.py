"""The adapter to Lightning's training loop: every read or write of its private state happens here.

Lightning has no public API for "is this a logging step", "does this step have micro-batches to come", "where
does a checkpoint resume" or "write last.ckpt now": XLab reads (and, in checkpoints, rewrites) the fit loop's
progress counters for them, and calls ModelCheckpoint's own last-checkpoint writer.
They are private and change between releases, so `pyproject.toml` bounds lightning to the releases this file was
tested with, and `tests/test_resume.py` checks every resume case against a straight run.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def is_logging_step(trainer: L.Trainer) -> bool:
    """Whether the training batch in progress belongs to a step Lightning logs (`trainer.log_every_n_steps`).
    Under gradient accumulation every micro-batch of that step is one; Lightning writes what was logged at the
    step's last micro-batch."""
    return trainer._logger_connector.should_update_logs


def has_micro_batches_to_come(trainer: L.Trainer) -> bool:
    """Whether the optimizer step in progress gathers more micro-batches after this one (gradient accumulation)."""
    return trainer.fit_loop.epoch_loop._should_accumulate()


def batches_done_in_epoch(trainer: L.Trainer) -> int:
    """Training batches (micro-batches) this rank has processed in the current epoch."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def resume_point(trainer: L.Trainer) -> tuple[int, int, int]:
    """Where a checkpoint of `fit` saved now resumes: (epoch, batches of it done, batches done since, to train again).

    Lightning counts a batch once its backward ran, but under gradient accumulation the optimizer steps every
    `accumulate_grad_batches` batches (and on an epoch's last batch): the gradients of the batches after the last
    step are not saved, so the resume point is that step and those batches are trained again. An epoch whose
    batches are all done resumes at the start of the next."""
    fit_loop = trainer.fit_loop
    epoch = max(fit_loop.epoch_progress.total.started - 1, 0)  # the epoch in progress, or just ended
    done = batches_done_in_epoch(trainer)
    if done >= trainer.num_training_batches or fit_loop.epoch_loop.batch_progress.is_last_batch:
        return epoch + 1, 0, 0
    again = done % trainer.accumulate_grad_batches
    return epoch, done - again, again


def _counts(ready: int, processed: int, completed: int) -> dict:
    """A Lightning progress tracker's counts (`started` goes with `ready`)."""
    return {"ready": ready, "started": ready, "processed": processed, "completed": completed}


def rewrite_fit_loop(loops: dict, trainer: L.Trainer, validation_pending: bool) -> None:
    """Rewrite the fit loop's state in a checkpoint (`checkpoint["loops"]["fit_loop"]`) to the one Lightning writes at
    the end of the training batch of the `resume_point` (as ModelCheckpoint's `every_n_train_steps` does), from which
    its restart logic continues exactly. The state it writes elsewhere does not: at the end of `fit` it counts the
    epoch as finished (training further would skip the rest of it), and between the micro-batches of a step the
    resumed step would gather too few.

    `validation_pending`: the validation at the resume point was interrupted. It is marked as started with no batch
    done, which Lightning runs again from its beginning before training on."""
    epoch, batches, again = resume_point(trainer)
    trained = trainer.fit_loop.epoch_loop.batch_progress.total.processed - again  # batches, all epochs
    epoch_counts = _counts(epoch + 1, epoch, epoch)  # started, not finished
    loops["epoch_progress"] = {"total": epoch_counts, "current": epoch_counts}
    loops["epoch_loop.batch_progress"] = {  # batch number `batches` trained, its end hooks not run
        "total": _counts(trained, trained, trained - 1), "current": _counts(batches, batches, batches - 1),
        "is_last_batch": False}
    validation_pending = validation_pending and not again  # else it comes again after the batches trained again
    # the logging step: Lightning adds one on restarting at the end of a batch, one more when replaying its validation
    steps = trainer.fit_loop.epoch_loop.global_step
    loops["epoch_loop.state_dict"]["_batches_that_stepped"] = steps - 1 - validation_pending
    if validation_pending:
        val = loops["epoch_loop.val_loop.batch_progress"]
        earlier = val["total"]["completed"] - val["current"]["completed"]
        val.update(total=_counts(earlier + 1, earlier, earlier), current=_counts(1, 0, 0))


def save_last_if_behind(trainer: L.Trainer) -> None:
    """Have ModelCheckpoint (with `save_last`) write last.ckpt now if its last one is of an earlier step: it writes
    it at validations and epoch ends, and at the end of fit only when it wrote none."""
    checkpoint = trainer.checkpoint_callback
    if (isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last
            and checkpoint._last_global_step_saved != trainer.global_step):
        checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))
