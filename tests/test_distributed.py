"""DDP on the CPU with gloo: two processes equal one process with the same global batch (weights, counters, the
logged training loss and throughput), and a two-node launch on localhost (NODE_RANK 0 and 1) completes fit and
validate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import lightning as L
import pytest
import torch
from conftest import ROOT, run_script, tiny_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xlab import callbacks
from xlab.checkpoint import load_checkpoint

DDP = {"trainer.accelerator": "cpu", "trainer.strategy": "ddp"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TickingClock(L.Callback):
    """Stands for `time` in xlab.callbacks: each reading of perf_counter is one second after the last. Throughput reads
    it at the start and the end of a logging interval (one step here), which then lasts exactly one second."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now

    def setup(self, trainer, pl_module, stage) -> None:
        callbacks.time = self


def scalars(run, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    """With Muon on the matrices and AdamW on the rest (`model.optimizer: muon`): each rank orthogonalises the same
    averaged gradient. AdamW alone under DDP is test_fsdp.py's reference."""
    clock = ["--trainer.callbacks+=test_distributed.TickingClock", "--model.optimizer=muon"]
    env = {"PYTHONPATH": str(ROOT / "tests")}
    single = tiny_args(tmp_path, steps=4,
                       **{"data.batch_size": 8, "trainer.logger.init_args.save_dir": tmp_path / "one"})
    run_script("xlab.py", "fit", *single, *clock, env=env)
    double = tiny_args(tmp_path, steps=4, **DDP, **{"trainer.devices": 2, "data.batch_size": 4,
                                                    "trainer.logger.init_args.save_dir": tmp_path / "two"})
    run_script("xlab.py", "fit", *double, *clock, env={**env, "MASTER_PORT": str(free_port())})
    one = load_checkpoint(tmp_path / "one/version_0/checkpoints/last.ckpt")
    two = load_checkpoint(tmp_path / "two/version_0/checkpoints/last.ckpt")
    assert one.meta["tokens_seen"] == two.meta["tokens_seen"] == 4 * 8 * 32
    assert one.meta["consumed"] == two.meta["consumed"]
    # the training loss is the whole global batch's, both ranks' (packed windows: as many targets each)
    losses = [scalars(tmp_path / name / "version_0", "train/loss") for name in ("one", "two")]
    assert losses[0].keys() == losses[1].keys() == {0, 1, 2, 3}
    for step, loss in losses[0].items():
        assert losses[1][step] == pytest.approx(loss, abs=1e-5), step
    # every rank's tokens: 8 windows of 32 a step, a step a second
    for name in ("one", "two"):
        assert set(scalars(tmp_path / name / "version_0", "perf/tokens_per_s").values()) == {8 * 32}, name
    assert one.meta["val_loss"] == two.meta["val_loss"] or abs(one.meta["val_loss"] - two.meta["val_loss"]) < 1e-5
    for name, weight in one.model.state_dict().items():
        torch.testing.assert_close(weight, two.model.state_dict()[name], rtol=0, atol=1e-5, msg=name)


def test_two_nodes_on_localhost_fit_validate_predict(tmp_path):
    args = tiny_args(tmp_path, steps=2, **DDP, **{"trainer.devices": 1, "trainer.num_nodes": 2})
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ckpt = f"--ckpt_path={tmp_path}/logs/version_0/checkpoints/last.ckpt"
    predict = ["predict", ckpt, "--data.prompt_tokens=8", "--model.generation.max_new_tokens=4"]
    for command in (["fit"], ["validate", ckpt], predict):
        nodes = [subprocess.Popen([sys.executable, str(ROOT / "xlab.py"), *command, *args], cwd=ROOT, text=True,
                                  env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) for rank in (0, 1)]
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
        assert command[0] != "validate" or "val/loss" in outputs[0]
    assert (tmp_path / "logs/version_0/checkpoints/last.ckpt").is_file()
    # each node wrote its share of the 8 predict-split prompts into the same folder, in the evaluated run's
    [predict] = (tmp_path / "logs/version_0/eval").glob("predict-*")
    rows = [json.loads(line) for name in ("predictions.jsonl", "predictions.rank1.jsonl")
            for line in (predict / name).read_text().splitlines()]
    assert len(rows) == 8 and all(len(row["completions"]) == 1 for row in rows)
