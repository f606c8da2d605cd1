"""`manage.py sweep`: a base config expanded by a grid of overrides and a number of seeds, each member an ordinary
`./xlab.py fit` run, filed together:

    DIR/NAME/sweep.json               what the sweep is: base, grid, seeds, and each member's run folder
    DIR/NAME/<member>/seed<k>/        member `<member>` (e.g. `position=rope`) with --seed_everything=k: the
                                      TensorBoard run (config.yaml, events, checkpoints/last.ckpt)

A member is finished when its last.ckpt reached the run's trainer.max_steps; one with an earlier last.ckpt is
resumed from it (`--ckpt_path`, the normal exact resume), one without starts. Rerunning a sweep therefore skips what
is done and loses nothing of what was interrupted. Members run in a process of their own (`xlab.cli.main` through
`python -c`): a member that crashes or is killed does not take the sweep down. `--launcher slurm` submits the
unfinished members as one SLURM job array through submitit; a member told of its time limit or of a preemption
(submitit's USR2) has its training saved by SIGTERM and is requeued, and resumes as above.
"""

from __future__ import annotations

import io
import itertools
import json
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock
from urllib.parse import quote

import yaml

from xlab.checkpoint import run_counters
from xlab.transformer import TransformerConfig

SWEEP_FILE = "sweep.json"
# `python -c` this: `./xlab.py` with the arguments that follow, importing the xlab the sweep runs (not an xlab.py
# in the working directory, which `-c` would put first)
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
RUN_MEMBER = f"import sys; sys.path[0] = {PACKAGE_ROOT!r}; from xlab.cli import main; main()"
TENSORBOARD = "lightning.pytorch.loggers.TensorBoardLogger"
SLURM_SIGNAL_DELAY_S = 120  # the time-limit warning comes this long before the end: time to save last.ckpt


@dataclass(frozen=True)
class Member:
    """One point of the grid with one seed."""

    member: str  # the varied settings, `position=rope,lr=0.001`: the folder of its seeds
    seed: int
    overrides: dict[str, str] = field(hash=False)  # full key -> value as given to --vary

    @property
    def run(self) -> str:
        """The member's run folder, relative to the sweep's."""
        return f"{self.member}/seed{self.seed}"


# ------------------------------------------------------------------------------ the grid


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` -> ["a", "b", "[1,2]"]: a comma inside brackets or braces belongs to its value."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    return values


def parse_vary(items: list[str]) -> dict[str, list[str]]:
    """`["model.arch.position=learned,rope", ...]` -> {"model.arch.position": ["learned", "rope"], ...}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().removeprefix("--")
        values = split_values(text)
        if not sep or not key or not all(values):
            raise ValueError(f"--vary {item!r} is not KEY=V1,V2,...: give a config key and its values, e.g. "
                             "--vary model.arch.position=learned,rope")
        if key in grid:
            raise ValueError(f"--vary {key} is given twice: list all its values in one --vary {key}=V1,V2")
        if len(set(values)) < len(values):
            raise ValueError(f"--vary {item!r} repeats a value: each value once")
        grid[key] = values
    return grid


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's last dotted part, or as many last parts as tell it from the other keys."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        names[key] = suffix
    return names


def member_name(overrides: dict[str, str]) -> str:
    """`{"model.arch.position": "rope", "model.learning_rate": "1e-3"}` -> `position=rope,learning_rate=1e-3`. Values
    are percent-encoded (`/` -> `%2F`, `,` -> `%2C`, ...): a folder name, and distinct values give distinct names."""
    names = short_names(list(overrides))
    return ",".join(f"{names[key]}={quote(value, safe='')}" for key, value in overrides.items())


def expand(grid: dict[str, list[str]], seeds: int) -> list[Member]:
    """Every combination of the grid's values (the first key varying slowest), each with seeds 0..seeds-1."""
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: a sweep needs at least one seed")
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    return [Member(member_name(point), seed, point) for point in points for seed in range(seeds)]


# ------------------------------------------------------------------------------ members as xlab.py fit runs


def fit_args(base: list[str], member: Member, root: Path) -> list[str]:
    """`./xlab.py` arguments of a member: the base, its overrides and seed, and its TensorBoard run folder
    root/<member>/seed<k> (save_dir root/<member>, name "", version seed<k>)."""
    return ["fit", *base, *(f"--{key}={value}" for key, value in member.overrides.items()),
            f"--seed_everything={member.seed}", f"--trainer.logger.init_args.save_dir={root / member.member}",
            "--trainer.logger.init_args.name=", f"--trainer.logger.init_args.version=seed{member.seed}"]


def resolved_config(args: list[str]) -> dict:
    """The config `./xlab.py ARGS` would run with (its --print_config, in this process, nothing run); a key or value
    the parser rejects raises ValueError with the parser's one line."""
    from xlab.cli import Failed, main

    printed = io.StringIO()
    try:  # (LightningCLI warns of a sys.argv besides its args: manage.py's)
        with redirect_stdout(printed), redirect_stderr(io.StringIO()), mock.patch.object(sys, "argv", ["xlab.py"]):
            main([*args, "--print_config"])
    except Failed as err:
        raise ValueError(str(err).removeprefix("error: ")) from None
    except SystemExit as exit_:  # --print_config exits 0 after printing
        if exit_.code:
            raise
    return yaml.safe_load(printed.getvalue())


@dataclass(frozen=True)
class Plan:
    """What the grid point of a member trains: enough to tell a finished member and to size its SLURM job."""

    max_steps: int
    devices: int | str
    num_nodes: int
    accelerator: str


def plan_point(args: list[str], where: str) -> Plan:
    """The checked config of one grid point (`where` names it in errors)."""
    try:
        config = resolved_config(args)
        TransformerConfig(**config["model"]["arch"])  # the architecture's own checks, which parsing does not run
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    trainer = config["trainer"]
    logger = trainer.get("logger")
    if not isinstance(logger, dict) or logger.get("class_path") != TENSORBOARD:
        raise ValueError(f"{where}: a sweep logs each member with TensorBoardLogger, but trainer.logger is "
                         f"{logger.get('class_path') if isinstance(logger, dict) else logger}: drop that override")
    if not trainer.get("max_steps") or trainer["max_steps"] < 1:
        raise ValueError(f"{where}: a sweep needs trainer.max_steps (a member is finished when its last.ckpt "
                         "reaches it): set --trainer.max_steps=N")
    return Plan(trainer["max_steps"], trainer.get("devices", "auto"), trainer.get("num_nodes", 1),
                str(trainer.get("accelerator", "auto")))


def plan(base: list[str], members: list[Member], root: Path) -> dict[str, Plan]:
    """Each grid point's checked config, by member name: the base first, then each point (one parse each)."""
    plan_point(["fit", *base], "the base config")
    plans = {}
    for member in members:
        if member.member not in plans:
            where = "--vary " + ",".join(f"{key}={value}" for key, value in member.overrides.items())
            plans[member.member] = plan_point(fit_args(base, member, root), where)
    return plans


def steps_done(run: Path) -> int | None:
    """The optimizer steps of a run folder's last.ckpt, or None without one."""
    counters = run_counters(run)
    return None if counters is None else counters[0]


def member_command(args: list[str], run: Path, max_steps: int) -> list[str] | None:
    """The `./xlab.py` arguments that bring a member to its end: resumed from its last.ckpt when it has one; None when
    that already reached max_steps."""
    done = steps_done(run)
    if done is None:
        return args
    return None if done >= max_steps else [*args, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]


# ------------------------------------------------------------------------------ sweep.json


def manifest(name: str, base: list[str], grid: dict[str, list[str]], seeds: int, members: list[Member]) -> dict:
    return {"name": name, "base": base, "vary": grid, "seeds": seeds,
            "members": [{"member": m.member, "seed": m.seed, "overrides": m.overrides, "run": m.run}
                        for m in members]}


def check_same_sweep(root: Path, wanted: dict) -> None:
    """An existing DIR/NAME/sweep.json must describe this sweep: rerunning resumes it, another grid is refused."""
    path = root / SWEEP_FILE
    if not path.is_file():
        return
    found = json.loads(path.read_text())
    differ = [key for key in ("base", "vary", "seeds") if found.get(key) != wanted[key]]
    if differ:
        was = ", ".join(f"{key} {found.get(key)}" for key in differ)
        raise ValueError(f"{root} holds a sweep with another {' and '.join(differ)} ({was}): rerun it as it was, "
                         "or choose another --name")


def write_manifest(root: Path, wanted: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    temporary = root / f".{SWEEP_FILE}.tmp"
    temporary.write_text(json.dumps(wanted, indent=2) + "\n")
    temporary.replace(root / SWEEP_FILE)


# ------------------------------------------------------------------------------ launchers


def member_process(command: list[str]) -> list[str]:
    return [sys.executable, "-c", RUN_MEMBER, *command]


def shown(command: list[str]) -> str:
    """A member's command as a user would type it."""
    return shlex.join(["./xlab.py", *command])


def run_local(root: Path, members: list[Member], base: list[str], plans: dict[str, Plan]) -> list[str]:
    """Runs the members one after another; one line per member. Returns the run folders of those that failed."""
    failed = []
    for i, member in enumerate(members, 1):
        run, started = root / member.run, time.monotonic()
        args = fit_args(base, member, root)
        command = member_command(args, run, plans[member.member].max_steps)
        if command is None:
            print(f"[{i}/{len(members)}] {run}: skipped (finished)", flush=True)
            continue
        resumed = f"resumed from step {steps_done(run)}, " if command is not args else ""
        status = subprocess.run(member_process(command)).returncode
        outcome = "done" if status == 0 else f"failed (exit {status})"
        print(f"[{i}/{len(members)}] {run}: {resumed}{outcome} in {time.monotonic() - started:.1f} s", flush=True)
        if status:
            failed.append(str(run))
    return failed


def ignore_submitit_signal() -> None:
    """In a member's child: SLURM sends its time-limit and preemption warning (submitit's USR2, whose default action
    is to end the process) to every process of the job; the child trains on until its parent's SIGTERM."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


@dataclass
class SlurmMember:
    """A member as a submitit job: it runs the member's training (as run_local does) in a child process; told by
    submitit of a time limit or a preemption (`checkpoint`), it stops the child with SIGTERM, which saves last.ckpt,
    and has itself requeued, to resume from it."""

    args: list[str]
    run: Path
    max_steps: int
    process: subprocess.Popen | None = field(default=None, repr=False, compare=False)
    status: int | None = field(default=None, repr=False, compare=False)  # the child's exit status, once it ended

    def __call__(self) -> None:
        command = member_command(self.args, self.run, self.max_steps)
        if command is None:
            return
        self.process = subprocess.Popen(member_process(command), preexec_fn=ignore_submitit_signal)
        # reaped in a thread: `checkpoint` runs in a signal handler of this thread, and Popen.wait there would
        # deadlock on the lock an interrupted Popen.wait holds; both only read `status`
        threading.Thread(target=self.reap, daemon=True).start()
        self.wait()
        if self.status:
            raise RuntimeError(f"{shown(command)} exited with status {self.status}")

    def reap(self) -> None:
        self.status = self.process.wait()

    def wait(self) -> None:
        while self.status is None:
            time.sleep(0.1)

    def checkpoint(self):
        """Called by submitit (in its signal handler) before it requeues the job."""
        from submitit.helpers import DelayedSubmission

        if self.process is not None and self.status is None:
            self.process.send_signal(signal.SIGTERM)  # xlab saves last.ckpt at the next batch boundary, exits 143
            self.wait()
        return DelayedSubmission(SlurmMember(self.args, self.run, self.max_steps))

    def __getstate__(self) -> dict:  # pickled by submitit: the child process stays behind
        return {**self.__dict__, "process": None, "status": None}


def slurm_resources(plan: Plan, where: str) -> dict:
    """submitit's parameters for one member: a task per device (Lightning reads SLURM's variables), GPUs unless the
    config trains on the CPU."""
    if plan.devices in (-1, "-1"):
        raise ValueError(f"{where}: trainer.devices is -1 (every GPU), which SLURM cannot allocate: "
                         "set --trainer.devices=N, the GPUs per node of each member")
    devices = 1 if plan.devices == "auto" else int(plan.devices)
    gpus = 0 if plan.accelerator == "cpu" else devices
    return {"nodes": plan.num_nodes, "tasks_per_node": devices, "gpus_per_node": gpus}


def check_slurm(cluster: str) -> None:
    """submitit, and SLURM's sbatch unless the array runs on this machine (`cluster="local"`, for tests)."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise ValueError("--launcher slurm needs submitit: pip install 'xlab[sweep]'") from None
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ValueError("--launcher slurm needs SLURM's sbatch on PATH: run the sweep on the cluster's login node "
                         "(or --dry-run to see what would be submitted)")


def slurm_executor(root: Path, resources: dict, name: str, time_min: int, partition: str | None, cluster: str):
    """A submitit executor for the sweep's array (`cluster="local"` runs it on this machine, for tests)."""
    import submitit

    executor = submitit.AutoExecutor(folder=root / "slurm" / "%j", cluster=cluster)
    executor.update_parameters(name=f"xlab-{name}", timeout_min=time_min, **resources,
                               slurm_signal_delay_s=SLURM_SIGNAL_DELAY_S,
                               **({"slurm_partition": partition} if partition else {}))
    return executor


def run_slurm(root: Path, members: list[Member], base: list[str], plans: dict[str, Plan], name: str,
              time_min: int, partition: str | None, dry_run: bool, cluster: str = "slurm") -> list:
    """Submits the unfinished members as one job array per resource shape (one, unless --vary changes
    devices or nodes); returns the submitit jobs."""
    pending = [(m, fit_args(base, m, root)) for m in members]
    pending = [(m, args) for m, args in pending
               if member_command(args, root / m.run, plans[m.member].max_steps) is not None]
    shapes: dict[tuple, list] = {}
    for member, args in pending:
        resources = slurm_resources(plans[member.member], member.member)
        shapes.setdefault(tuple(sorted(resources.items())), []).append((member, args))
    jobs = []
    for shape, group in shapes.items():
        print(f"SLURM array of {len(group)} member(s): {', '.join(f'{k}={v}' for k, v in shape)}, "
              f"time {time_min} min{', partition ' + partition if partition else ''}")
        for member, args in group:
            print(f"  {root / member.run}: {shown(args)}")
        if dry_run:
            continue
        executor = slurm_executor(root, dict(shape), name, time_min, partition, cluster)
        array = [SlurmMember(args, root / member.run, plans[member.member].max_steps) for member, args in group]
        jobs += executor.submit_array(array)
    if jobs:
        print(f"submitted {len(jobs)} job(s) ({jobs[0].job_id.split('_')[0]}); their output: {root / 'slurm'}/")
    print(f"{len(members) - len(pending)} of {len(members)} member(s) already finished")
    return jobs


def sweep(base: list[str], vary: list[str], seeds: int, name: str, logs: str = "logs", launcher: str = "local",
          dry_run: bool = False, slurm_time: int = 240, slurm_partition: str | None = None,
          cluster: str = "slurm") -> list[str]:
    """`manage.py sweep`: checks everything, then runs (local) or submits (slurm) what is not finished. Returns the
    run folders of the members that failed (local). `cluster="local"` runs the slurm launcher's array on this
    machine (submitit's LocalExecutor: tests)."""
    if not name or name in (".", "..") or quote(name, safe="") != name:
        raise ValueError(f"--name {name!r}: a sweep's name is a folder name (letters, digits, '-', '_', '.')")
    grid = parse_vary(vary)
    if not grid:
        raise ValueError("a sweep needs at least one --vary KEY=V1,V2 (for seeds alone, vary a key over one value)")
    root = Path(logs) / name
    members = expand(grid, seeds)
    wanted = manifest(name, base, grid, seeds, members)
    check_same_sweep(root, wanted)
    plans = plan(base, members, root)
    if launcher == "slurm":
        for member in members:
            slurm_resources(plans[member.member], member.member)  # every member's shape checked before submitting
        if not dry_run:
            check_slurm(cluster)
    if dry_run and launcher == "local":
        for member in members:
            command = member_command(fit_args(base, member, root), root / member.run, plans[member.member].max_steps)
            print(f"{root / member.run}: " + ("finished" if command is None else shown(command)))
        return []
    if not dry_run:
        write_manifest(root, wanted)
    if launcher == "slurm":
        run_slurm(root, members, base, plans, name, slurm_time, slurm_partition, dry_run, cluster)
        return []
    return run_local(root, members, base, plans)
