"""Resume and preemption: a run that stops (finished, or SIGTERM while training, while validating, or between the
micro-batches of an accumulated step) and is resumed from its last.ckpt trains as a straight run does, step by step,
and its checkpoints count what it consumed (steps, windows, tokens) as the straight run's do. Resumed on another
number of processes, the counts stay those of the windows drawn.

The runs go through the real CLI in this process (`xlab.cli.main`), on a corpus small enough for epochs of about ten
batches. SIGTERM is sent by the process to itself from a callback at a given batch: the interruption is deterministic.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from conftest import run_script, tiny_args
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_distributed import free_port

from xlab.checkpoint import load_checkpoint
from xlab.cli import main
from xlab.manage import describe
from xlab.windows import ShuffledSampler

VAL_EVERY = 4  # batches
ACCUMULATE = 3  # micro-batches of 4 per step with --global_batch_size=12


class SigtermAt(L.Callback):
    """Sends SIGTERM to this process once the training loop has processed `batches` batches (micro-batches): at the
    end of that batch or, with `validation`, of the first validation batch after it."""

    def __init__(self, batches: int, validation: bool = False):
        self.batches, self.validation = batches, validation

    def signal_at(self, trainer: L.Trainer, validation: bool) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.total.processed
        if validation == self.validation and done == self.batches and not trainer.received_sigterm:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, *args) -> None:
        self.signal_at(trainer, validation=False)

    def on_validation_batch_end(self, trainer, *args) -> None:
        self.signal_at(trainer, validation=True)


def data_args(work: Path) -> dict:
    source = json.dumps({"path": str(work / "corpus.txt"), "sample_by": "paragraph"})
    return {"data.source": source, "data.val_size": 2, "data.test_size": 1, "data.predict_size": 1}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with a prepared corpus: 14 paragraphs of seeded random words (10 train, 2 val: two validation
    batches, 1 test, 1 predict)."""
    folder = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    words = "def class return import self value index token window batch step epoch".split()
    (folder / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words, 60)) for _ in range(14)))
    with mock.patch.object(sys, "argv", ["xlab.py"]):
        main(["prepare_data", *tiny_args(folder, **data_args(folder))])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 20K-parameter model trains faster on one thread than on cores it shares
    yield folder
    torch.set_num_threads(threads)


def per_epoch(work: Path) -> int:
    """Training batches per epoch: windows of context 32, batches of 4."""
    manifest = json.loads(next((work / "data").glob("*/train.json")).read_text())
    batches = (manifest["tokens"] - 1) // 32 // 4
    assert 8 <= batches <= 20, batches
    return batches


def total_steps(work: Path, accumulate: int = 1) -> int:
    """Steps of the reference runs: into a third epoch, ending at a validation (so their last.ckpt is the end)."""
    steps = -(-2 * per_epoch(work) // accumulate) + 2
    return steps + -steps % VAL_EVERY


def fit_args(work: Path, name: str, steps: int, accumulate: int = 1, **overrides) -> list[str]:
    """Flags of `xlab.py fit` logging to work/name/version_N; the learning-rate schedule always spans the reference
    run, so that stopping earlier is an interruption, not a shorter run."""
    return tiny_args(work, steps, **{
        "trainer.val_check_interval": VAL_EVERY, "trainer.logger.init_args.save_dir": work / name,
        "model.schedule.total_steps": total_steps(work, accumulate), "model.sample_prompts": "null",
        **data_args(work), **overrides})


def fit(work: Path, name: str, steps: int, *flags: str, accumulate: int = 1, **overrides) -> None:
    """`xlab.py fit` in this process, one device, `accumulate` batches of 4 a step."""
    with mock.patch.object(sys, "argv", ["xlab.py"]):  # the CLI's arguments are these, not pytest's
        main(["fit", *fit_args(work, name, steps, accumulate, **overrides), *flags,
              f"--global_batch_size={4 * accumulate}"])


def last(work: Path, name: str) -> Path:
    return work / name / "version_0/checkpoints/last.ckpt"


def expected_consumed(work: Path, steps: int, accumulate: int = 1) -> dict:
    """What a run of `steps` optimizer steps on one process consumed, worked out by hand: a step takes `accumulate`
    batches of 4 windows of 32 tokens, or the rest of its epoch (Lightning steps on an epoch's last batch)."""
    epoch_batches, taken, epoch, in_epoch = per_epoch(work), 0, 0, 0
    for _ in range(steps):
        if in_epoch == epoch_batches:
            epoch, in_epoch = epoch + 1, 0
        batches = min(accumulate, epoch_batches - in_epoch)
        taken, in_epoch = taken + batches, in_epoch + batches
    return {"steps": steps, "windows": taken * 4, "tokens": taken * 4 * 32, "epoch": epoch,
            "epoch_windows": in_epoch * 4}


def assert_consumed(checkpoint: Path, expected: dict) -> None:
    """The checkpoint's counters are `expected`'s, and `./manage.py inspect` prints them."""
    meta = load_checkpoint(checkpoint).meta
    assert (meta["step"], meta["tokens_seen"]) == (expected["steps"], expected["tokens"])
    assert meta["consumed"] == expected
    shown = describe(checkpoint)
    assert (f"optimizer steps: {expected['steps']}\n" in shown and f"tokens seen: {expected['tokens']:,}\n" in shown
            and f"windows drawn: {expected['windows']:,} (epoch {expected['epoch']}: {expected['epoch_windows']:,})"
            in shown), shown


def sigterm_at(batches: int, validation: bool = False) -> str:
    init = {"batches": batches, "validation": validation}
    return "--trainer.callbacks+=" + json.dumps({"class_path": "test_resume.SigtermAt", "init_args": init})


def curves(run: Path, tag: str = "train/loss") -> list[dict[int, float]]:
    """`tag`'s value at each logging step, for each start of a run, in order. A resumed run logs to the folder of the
    run it resumes (one TensorBoard run), each start to an events file of its own."""
    assert [p.name for p in run.iterdir()] == ["version_0"], "a resumed run continues in its own folder"
    found = []
    for file in sorted(run.glob("version_0/events.out.tfevents.*"), key=lambda f: f.stat().st_mtime_ns):
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        found.append({e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {})
    return found


def assert_same_curve(straight: Path, run: Path, tag: str = "train/loss") -> None:
    """The parts of an interrupted run, each starting where the one before stopped, make up the straight curve."""
    [reference], parts = curves(straight, tag), curves(run, tag)
    for before, after in zip(parts, parts[1:], strict=False):
        assert not after or min(after) > max(before, default=-1), (tag, before, after)  # no step twice
    joined = {step: value for part in parts for step, value in part.items()}
    assert joined.keys() == reference.keys(), tag
    for step, value in reference.items():
        assert joined[step] == pytest.approx(value, abs=1e-5), (tag, step)


@pytest.fixture(scope="module")
def straight(work) -> Path:
    """Uninterrupted, over two epochs: the reference of the runs without accumulation."""
    fit(work, "straight", total_steps(work))
    return work / "straight"


@pytest.fixture(scope="module")
def straight_accumulated(work) -> Path:
    fit(work, "straight-accumulated", total_steps(work, ACCUMULATE), accumulate=ACCUMULATE)
    return work / "straight-accumulated"


@pytest.mark.parametrize("where", ["mid-epoch", "epoch end"])
def test_training_longer_from_a_finished_run_is_exact(work, straight, where):
    stop = 5 if where == "mid-epoch" else per_epoch(work)
    run = f"finished-{stop}"
    # without validation the run's last.ckpt is the one written when fit ends (at a validation it is written then)
    fit(work, run, stop, **{"trainer.limit_val_batches": 0})
    assert_consumed(last(work, run), expected_consumed(work, stop))
    fit(work, run, total_steps(work), f"--ckpt_path={last(work, run)}", **{"trainer.limit_val_batches": 0})
    assert_consumed(last(work, "straight"), expected_consumed(work, total_steps(work)))
    assert_consumed(last(work, run), expected_consumed(work, total_steps(work)))
    assert [min(part) for part in curves(work / run)] == [0, stop]
    assert_same_curve(straight, work / run)
    final, resumed = load_checkpoint(last(work, "straight")), load_checkpoint(last(work, run))
    assert final.meta["step"] == resumed.meta["step"] == total_steps(work)
    for name, weight in final.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], weight, rtol=0, atol=1e-5, msg=name)


def test_a_run_bounded_by_epochs_resumes_mid_epoch_with_the_progress_bar_counting_its_steps(work, straight):
    """Bounded by max_epochs, the bar counts the epoch's steps, which a run resumed mid-epoch works out without
    Lightning's on_train_epoch_start (not called then)."""
    run = "epochs"
    fit(work, run, 5, **{"trainer.limit_val_batches": 0})
    fit(work, run, -1, f"--ckpt_path={last(work, run)}", **{"trainer.limit_val_batches": 0, "trainer.max_epochs": 1})
    assert_consumed(last(work, run), expected_consumed(work, per_epoch(work)))
    [reference], parts = curves(straight), curves(work / run)
    assert {step: value for part in parts for step, value in part.items()} == pytest.approx(
        {step: value for step, value in reference.items() if step < per_epoch(work)}, abs=1e-5)


def test_a_finished_runs_last_ckpt_is_its_end_when_no_validation_falls_there(work):
    """Lightning writes last.ckpt at validations, and at the end of fit only if it wrote none: a run of 5 steps
    validated at step 4 would leave step 4's, and step 5 would be lost to a resume, infer.py and the counters."""
    fit(work, "ends-between-validations", 5)
    assert_consumed(last(work, "ends-between-validations"), expected_consumed(work, 5))


def test_sigterm_while_training_saves_last_ckpt_and_resumes_exactly(work, straight):
    at = per_epoch(work) + 2 if (per_epoch(work) + 2) % VAL_EVERY else per_epoch(work) + 3  # epoch 1, no validation
    with pytest.raises(SIGTERMException) as stopped:
        fit(work, "sigterm", total_steps(work), sigterm_at(at))
    assert stopped.value.code == 128 + signal.SIGTERM  # as a process ended by SIGTERM: schedulers restart it
    assert_consumed(last(work, "sigterm"), expected_consumed(work, at))
    # with a DataLoader worker, which draws indices as soon as Lightning creates the loader, before it sets the epoch
    fit(work, "sigterm", total_steps(work), "--ckpt_path=last", **{"data.num_workers": 1})  # the newest last.ckpt
    assert_same_curve(straight, work / "sigterm")
    assert_same_curve(straight, work / "sigterm", "val/loss")
    assert_consumed(last(work, "sigterm"), expected_consumed(work, total_steps(work)))


def test_sigterm_during_validation_saves_and_validates_again(work, straight):
    at = 2 * VAL_EVERY
    with pytest.raises(SIGTERMException):
        fit(work, "sigterm-validating", total_steps(work), sigterm_at(at, validation=True))
    assert_consumed(last(work, "sigterm-validating"), expected_consumed(work, at))
    fit(work, "sigterm-validating", total_steps(work), f"--ckpt_path={last(work, 'sigterm-validating')}")
    assert_same_curve(straight, work / "sigterm-validating")
    # the interrupted validation (logged at the step's index, at - 1) is done again, in full, by the resumed run
    assert at - 1 in curves(work / "sigterm-validating", "val/loss")[1]
    assert_same_curve(straight, work / "sigterm-validating", "val/loss")
    assert_consumed(last(work, "sigterm-validating"), expected_consumed(work, total_steps(work)))
    # ModelCheckpoint's top-k bookkeeping goes on in the same folder: the straight run's best checkpoints
    [resumed], [reference] = (best_k(last(work, name)) for name in ("sigterm-validating", "straight"))
    assert {Path(p).name for p in resumed["best_k_models"]} == {Path(p).name for p in reference["best_k_models"]}
    assert resumed["best_model_score"].item() == pytest.approx(reference["best_model_score"].item(), abs=1e-5)


def best_k(checkpoint: Path) -> list[dict]:
    states = torch.load(checkpoint, weights_only=True)["callbacks"]
    return [state for name, state in states.items() if name.startswith("ModelCheckpoint")]


@pytest.mark.parametrize("where", ["mid-epoch", "next epoch"])
def test_sigterm_between_micro_batches_resumes_at_the_step_boundary(work, straight_accumulated, where):
    # after one micro-batch of step 3, or of the first step of epoch 1 (Lightning steps on an epoch's last batch)
    epoch = per_epoch(work)
    at, step = (2 * ACCUMULATE + 1, 2) if where == "mid-epoch" else (epoch + 1, -(-epoch // ACCUMULATE))
    steps, run = total_steps(work, ACCUMULATE), f"sigterm-accumulating-{at}"
    with pytest.raises(SIGTERMException):
        fit(work, run, steps, sigterm_at(at), accumulate=ACCUMULATE)
    # the micro-batch after the step is not counted: the resumed run trains it again
    assert_consumed(last(work, run), expected_consumed(work, step, ACCUMULATE))
    fit(work, run, steps, f"--ckpt_path={last(work, run)}", accumulate=ACCUMULATE)
    assert_same_curve(straight_accumulated, work / run)
    assert_same_curve(straight_accumulated, work / run, "val/loss")
    assert_consumed(last(work, "straight-accumulated"), expected_consumed(work, steps, ACCUMULATE))
    assert_consumed(last(work, run), expected_consumed(work, steps, ACCUMULATE))


def test_resuming_on_another_number_of_processes_counts_the_windows_drawn(work):
    """1 process trains 3 steps, 2 DDP processes go on from its last.ckpt to step 5, 1 process again to step 7: each
    step drew 4 windows of 32 tokens per process, and the counters say so (and where the epoch goes on)."""
    run = "processes"
    fit(work, run, 3, **{"trainer.limit_val_batches": 0})
    ddp = {"trainer.strategy": "ddp", "trainer.accelerator": "cpu", "trainer.devices": 2,
           "trainer.limit_val_batches": 0}
    run_script("xlab.py", "fit", *fit_args(work, run, 5, **ddp), f"--ckpt_path={last(work, run)}",
               "--global_batch_size=8", env={"MASTER_PORT": str(free_port())})
    windows = 3 * 4 + 2 * 8
    expected = {"steps": 5, "windows": windows, "tokens": windows * 32, "epoch": 0, "epoch_windows": windows}
    assert windows < per_epoch(work) * 4  # one epoch
    assert_consumed(last(work, run), expected)
    fit(work, run, 7, f"--ckpt_path={last(work, run)}", **{"trainer.limit_val_batches": 0})
    windows += 2 * 4
    assert_consumed(last(work, run), expected | {"steps": 7, "windows": windows, "tokens": windows * 32,
                                                  "epoch_windows": windows})


@pytest.mark.parametrize("before, after", [(2, 3), (3, 2), (1, 4), (4, 1), (2, 2)])
@pytest.mark.parametrize("batches", [0, 1, 5])
def test_resuming_on_another_number_of_devices_draws_no_window_twice(before, after, batches):
    """`before` ranks each draw `batches` batches of epoch 2, then `after` ranks resume the epoch: no window is
    drawn twice, and the windows never drawn are the last of the permutation, fewer than `after` x batch size,
    as at the end of any epoch."""
    windows, size, epoch = 103, 4, 2

    def samplers(ranks: int) -> list[ShuffledSampler]:
        found = [ShuffledSampler(range(windows), num_replicas=ranks, rank=r, seed=5) for r in range(ranks)]
        for sampler in found:
            sampler.set_epoch(epoch)
        return found

    [single] = samplers(1)
    permutation = list(single)
    drawn = [w for sampler in samplers(before) for w in list(sampler)[: batches * size]]
    assert sorted(drawn) == sorted(permutation[: len(drawn)])
    resumed = samplers(after)
    for sampler in resumed:
        sampler.resume(epoch, seen=len(drawn), counted=batches * size)
    loop_length = [len(sampler) // size for sampler in resumed]  # the batches Lightning counts for the epoch
    rest = [list(sampler) for sampler in resumed]
    rest = [order[: len(order) // size * size] for order in rest]  # the DataLoader drops a last partial batch
    # the training loop, which counts `batches` as done, does not end the epoch before the sampler does
    assert all(length - batches >= len(order) // size for length, order in zip(loop_length, rest, strict=True))
    everything = drawn + [w for order in rest for w in order]
    assert len(everything) == len(set(everything))  # none twice
    never = len(permutation) - len(everything)
    assert sorted(everything) == sorted(permutation[: len(everything)]) and never < after * size
    if before == after:  # the same ranks: each continues its own order of the straight run
        assert rest == [list(sampler)[batches * size:][: len(order)] for sampler, order in
                        zip(samplers(after), rest, strict=True)]


def test_a_resumed_sampler_starts_in_its_epoch_before_lightning_sets_it():
    sampler, reference = ShuffledSampler(range(50), seed=1), ShuffledSampler(range(50), seed=1)
    sampler.resume(epoch=3, seen=8)
    reference.set_epoch(3)
    assert list(sampler) == list(reference)[8:]



def test_a_checkpoint_from_before_the_counters_resumes_exactly(work, straight):
    """Checkpoints written before `xlab.resume` kept the epoch position in the DataModule's state and only tokens_seen
    of the counters: resuming one goes on where it stopped, and the windows are worked out from the tokens."""
    run, stop = "before-counters", 5
    fit(work, run, stop, **{"trainer.limit_val_batches": 0})
    checkpoint = torch.load(last(work, run), weights_only=True)
    resume = checkpoint["xlab"].pop("resume")
    checkpoint["xlab"].pop("consumed")
    checkpoint["XLabDataModule"] = {"epoch": resume["epoch"], "batches": resume["loop_batches"],
                                    "seen": resume["windows"], **resume["data"]}
    torch.save(checkpoint, last(work, run))
    fit(work, run, total_steps(work), f"--ckpt_path={last(work, run)}", **{"trainer.limit_val_batches": 0})
    assert_same_curve(straight, work / run)
    assert_consumed(last(work, run), expected_consumed(work, total_steps(work)))


def test_muon_resumes_exactly_under_gradient_accumulation(work):
    """Muon's momentum and AdamW's moments, every group's base and scheduled learning rate come back from last.ckpt
    (`xlab.optim.Combined.state_dict`): 2 + 2 steps of 2 micro-batches are a straight run's 4, step by step."""
    muon, steps = {"model.optimizer": "muon", "trainer.limit_val_batches": 0}, 4
    fit(work, "muon-straight", steps, accumulate=2, **muon)
    fit(work, "muon-resumed", steps // 2, accumulate=2, **muon)
    fit(work, "muon-resumed", steps, f"--ckpt_path={last(work, 'muon-resumed')}", accumulate=2, **muon)
    for tag in ("train/loss", "lr-Combined/hidden", "lr-Combined/embeddings+other"):
        assert_same_curve(work / "muon-straight", work / "muon-resumed", tag)
    final, resumed = load_checkpoint(last(work, "muon-straight")), load_checkpoint(last(work, "muon-resumed"))
    for name, weight in final.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], weight, rtol=0, atol=1e-6, msg=name)
    assert_consumed(last(work, "muon-resumed"), expected_consumed(work, steps, 2))
