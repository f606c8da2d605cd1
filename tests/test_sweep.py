"""`./manage.py sweep`: the grid and member names (worked out by hand), bad input refused before anything runs, the
layout, skip and resume of a sweep whose member was killed (kill -9) halfway (the final weights equal a clean
sweep's), and the SLURM launcher: its requeue path (the member stopped as submitit stops it, then resumed) and an
array run by submitit's LocalExecutor. The members are the tiny model of conftest.tiny_args, 5 steps with a
validation every 2, in processes of their own as the sweep runs them.

A real single-node SLURM (Debian's slurm-wlm, started by the test) runs where its daemons are installed and the test
runs as root; elsewhere it is skipped (benchmarks/slurm_sweep.sh runs the same on a real cluster).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
from conftest import ROOT, tiny_args

from xlab import sweep as sw
from xlab.checkpoint import CheckpointError, load_checkpoint
from xlab.cli import main as xlab_main
from xlab.manage import main as manage_main

STEPS = 5  # ends between validations (every 2): the final step is saved at the end of fit, not at a validation
VARY = ["model.arch.position=rope"]  # and two seeds: rope/seed0, rope/seed1
RUNS = ("position=rope/seed0", "position=rope/seed1")


class Interrupt(L.Callback):
    """Stops a member as the environment's SWEEP_INTERRUPT says, after optimizer step `at` of the run whose folder
    holds `where`: `kill AT WHERE` SIGKILLs the process; `hold AT WHERE FLAG` writes FLAG and waits for a SIGTERM."""

    def on_train_batch_end(self, trainer, *args) -> None:
        how, at, where, *flag = os.environ.get("SWEEP_INTERRUPT", "- 0 -").split()
        if trainer.global_step != int(at) or where not in trainer.log_dir or trainer.received_sigterm:
            return
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        Path(flag[0]).write_text("held")
        deadline = time.monotonic() + 120
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with the tiny corpus prepared once for every member (data/), tests/ importable by the members (for
    Interrupt), one thread per member process."""
    folder = tmp_path_factory.mktemp("sweep")
    with mock.patch.object(sys, "argv", ["xlab.py"]):
        xlab_main(["prepare_data", *tiny_args(folder)])
    with mock.patch.dict(os.environ, {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH", "")])}):
        yield folder


def base(work: Path) -> list[str]:
    interrupt = json.dumps({"class_path": "test_sweep.Interrupt"})
    return [*tiny_args(work, STEPS), "--model.sample_prompts=null", f"--trainer.callbacks+={interrupt}"]


def manage(*args: object) -> None:
    manage_main([str(a) for a in args])


def sweep_args(work: Path, name: str, vary: list[str] = VARY, seeds: int = 2, *extra: str) -> list[str]:
    return ["sweep", *base(work), *(f"--vary={v}" for v in vary), "--seeds", str(seeds), "--name", name,
            "--logs", work / "sweeps", *extra]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints/last.ckpt").model.state_dict()


def assert_same_weights(run: Path, reference: Path) -> None:
    expected = weights(reference)
    for name, value in weights(run).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-5, msg=name)


def steps(run: Path) -> int:
    return load_checkpoint(run / "checkpoints/last.ckpt").meta["consumed"]["steps"]


# ------------------------------------------------------------------------------ the grid and the names


def test_vary_parses_keys_and_values():
    assert sw.parse_vary(["model.arch.position=learned,rope", "--model.betas=[0.9,0.95],[0.9,0.99]"]) == {
        "model.arch.position": ["learned", "rope"], "model.betas": ["[0.9,0.95]", "[0.9,0.99]"]}
    for bad in (["model.arch.position"], ["=rope"], ["model.arch.position=rope,"], ["a=1", "a=2"], ["a=1,1"]):
        with pytest.raises(ValueError, match="--vary"):
            sw.parse_vary(bad)


def test_the_grid_is_every_combination_with_every_seed_and_names_its_members():
    grid = {"model.arch.position": ["rope", "alibi"], "model.learning_rate": ["0.001", "3e-4"]}
    members = sw.expand(grid, seeds=2)
    names = ["position=rope,learning_rate=0.001", "position=rope,learning_rate=3e-4",
             "position=alibi,learning_rate=0.001", "position=alibi,learning_rate=3e-4"]
    assert [(m.member, m.seed) for m in members] == [(name, seed) for name in names for seed in (0, 1)]
    assert members[3].overrides == {"model.arch.position": "rope", "model.learning_rate": "3e-4"}
    assert members[3].run == "position=rope,learning_rate=3e-4/seed1"


def test_member_names_are_folder_names_and_unique():
    # keys with the same last part keep as many parts as tell them apart
    assert sw.member_name({"model.arch.dropout": "0.1", "data.dropout": "0", "model.arch.position": "rope"}) == \
        "arch.dropout=0.1,data.dropout=0,position=rope"
    assert sw.member_name({"a.b": "1", "b": "2"}) == "a.b=1,b=2"
    # values that would be paths or break the key=value,key=value form are percent-encoded
    values = ["conf/x.yaml", "conf_x.yaml", "[1,2]", "a=b", "..", "x y"]
    names = [sw.member_name({"data.source": value}) for value in values]
    assert names == ["source=conf%2Fx.yaml", "source=conf_x.yaml", "source=%5B1%2C2%5D", "source=a%3Db",
                     "source=..", "source=x%20y"]
    assert all("/" not in name for name in names) and len(set(names)) == len(names)


# ------------------------------------------------------------------------------ bad input, dry run


@pytest.mark.parametrize("vary, message", [
    (["model.arch.nokey=1,2"], "--vary model.arch.nokey=1: unrecognized arguments: --model.arch.nokey=1"),
    (["model.arch.position=rope,bogus"], "--vary model.arch.position=bogus: Parser key \"model.arch.position\""),
    (["model.arch.n_heads=2,3"], "--vary model.arch.n_heads=3: invalid transformer config: d_model=32 is not "
                                 "divisible by n_heads=3"),
    (["model.arch.position"], "--vary 'model.arch.position' is not KEY=V1,V2"),
])
def test_bad_input_is_one_line_before_anything_runs(work, capsys, vary, message):
    with pytest.raises(SystemExit) as exit_:
        manage(*sweep_args(work, "bad", vary))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (work / "sweeps" / "bad").exists()


def test_dry_run_prints_the_commands_and_runs_nothing(work, capsys):
    grid = ["model.arch.position=rope,learned"]
    manage(*sweep_args(work, "dry", grid), "--dry-run")
    lines = capsys.readouterr().out.splitlines()
    root = work / "sweeps" / "dry"
    assert [line.split(": ")[0] for line in lines] == [
        f"{root}/position={p}/seed{k}" for p in ("rope", "learned") for k in (0, 1)]
    assert lines[3].endswith(f"--model.arch.position=learned --seed_everything=1 --trainer.logger.init_args.save_dir="
                             f"{root}/position=learned --trainer.logger.init_args.name= "
                             "--trainer.logger.init_args.version=seed1")
    manage(*sweep_args(work, "dry", grid), "--dry-run", "--launcher", "slurm")
    out = capsys.readouterr().out
    assert "SLURM array of 4 member(s): gpus_per_node=1, nodes=1, tasks_per_node=1" in out, out
    assert not root.exists()


# ------------------------------------------------------------------------------ the local launcher


@pytest.fixture(scope="module")
def clean(work) -> Path:
    """A sweep run through without interruption: the reference."""
    manage(*sweep_args(work, "clean"))
    return work / "sweeps" / "clean"


def test_a_sweep_files_its_members_as_ordinary_runs_one_per_seed(work, clean):
    manifest = json.loads((clean / "sweep.json").read_text())
    assert manifest == {
        "name": "clean", "base": [str(a) for a in base(work)], "vary": {"model.arch.position": ["rope"]},
        "seeds": 2, "members": [{"member": "position=rope", "seed": k, "overrides": {"model.arch.position": "rope"},
                                 "run": f"position=rope/seed{k}"} for k in (0, 1)]}
    assert sorted(p.name for p in (clean / "position=rope").iterdir()) == ["seed0", "seed1"]
    for seed, run in enumerate(RUNS):
        config = (clean / run / "config.yaml").read_text()
        assert f"seed_everything: {seed}\n" in config and "position: rope\n" in config
        assert list((clean / run).glob("events.out.tfevents.*"))
        assert steps(clean / run) == STEPS  # the last step is saved although no validation came after it
    with pytest.raises(AssertionError):  # the seeds gave different initialisations
        assert_same_weights(clean / RUNS[0], clean / RUNS[1])


def test_a_member_killed_halfway_is_resumed_and_finished_members_are_skipped(work, clean, capfd, monkeypatch):
    root = work / "sweeps" / "killed"
    monkeypatch.setenv("SWEEP_INTERRUPT", "kill 3 seed0")
    with pytest.raises(SystemExit) as exit_:
        manage(*sweep_args(work, "killed"))
    out, err = capfd.readouterr()
    assert exit_.value.code == 1 and "error: 1 member(s) failed" in err, err
    assert f"[1/2] {root / RUNS[0]}: failed (exit -9)" in out, out
    assert f"[2/2] {root / RUNS[1]}: done" in out, out  # the sweep went on
    assert steps(root / RUNS[0]) == 2  # its last validation's
    finished = (root / RUNS[1] / "checkpoints/last.ckpt").stat().st_mtime_ns

    monkeypatch.delenv("SWEEP_INTERRUPT")
    manage(*sweep_args(work, "killed"))
    out = capfd.readouterr().out
    assert f"[1/2] {root / RUNS[0]}: resumed from step 2, done" in out, out
    assert f"[2/2] {root / RUNS[1]}: skipped (finished)" in out, out
    assert (root / RUNS[1] / "checkpoints/last.ckpt").stat().st_mtime_ns == finished
    for run in RUNS:
        assert_same_weights(root / run, clean / run)


def test_a_finished_sweep_reruns_as_nothing_to_do_and_another_grid_under_its_name_is_refused(work, clean, capfd):
    manage(*sweep_args(work, "clean"))
    assert capfd.readouterr().out.count("skipped (finished)") == 2
    for args in (sweep_args(work, "clean", ["model.arch.position=rope,alibi"]), sweep_args(work, "clean", seeds=3)):
        with pytest.raises(SystemExit) as exit_:
            manage(*args)
        err = capfd.readouterr().err
        assert exit_.value.code == 2 and f"error: {clean} holds a sweep with another" in err, err


# ------------------------------------------------------------------------------ the SLURM launcher


def test_a_member_stopped_as_submitit_stops_it_saves_and_resumes_exactly(work, clean, monkeypatch):
    """What submitit does on a time limit or a preemption: `checkpoint()` (the member's child gets SIGTERM and saves
    last.ckpt), then the returned submission runs again, as the requeued job does."""
    pytest.importorskip("submitit")
    root, flag = work / "sweeps" / "requeued", work / "held"
    member = sw.Member("position=rope", 1, {"model.arch.position": "rope"})
    job = sw.SlurmMember(sw.fit_args(base(work), member, root), root / member.run, STEPS)
    monkeypatch.setenv("SWEEP_INTERRUPT", f"hold 3 seed1 {flag}")
    errors = []
    running = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, job)))
    running.start()
    while not flag.exists() and running.is_alive():
        time.sleep(0.05)
    requeued = job.checkpoint()
    running.join()
    assert errors and "status 143" in str(errors[0].value)  # stopped as a preempted xlab.py run stops
    assert steps(root / member.run) == 3  # saved where it stopped
    monkeypatch.delenv("SWEEP_INTERRUPT")
    requeued.function()  # the requeued job
    assert_same_weights(root / member.run, clean / member.run)


def test_the_slurm_launcher_submits_an_array_that_runs_the_members(work, clean, capsys):
    """The members as a submitit job array, run by submitit's LocalExecutor (SLURM's own executor below)."""
    pytest.importorskip("submitit")
    root = work / "sweeps" / "array"
    sw.sweep(base(work), VARY, 2, "array", logs=str(work / "sweeps"), launcher="slurm", cluster="local")
    assert "SLURM array of 2 member(s)" in capsys.readouterr().out
    wait_for(root)
    for run in RUNS:
        assert_same_weights(root / run, clean / run)


def wait_for(root: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not all(finished(root / run) for run in RUNS):
        assert time.monotonic() < deadline, f"the members did not finish: see {root / 'slurm'}"
        time.sleep(0.5)


def finished(run: Path) -> bool:
    try:
        return steps(run) == STEPS
    except (FileNotFoundError, CheckpointError):  # not written yet, or being written
        return False
