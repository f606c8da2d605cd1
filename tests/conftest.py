"""Shared fixtures: a tiny configuration of the real CLI, and a way to run the top-level scripts."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tiny_args(tmp: Path, steps: int = 4, **overrides: object) -> list[str]:
    """Flags for `xlab.py fit|validate|test` that train a ~20K-parameter model on 40 stdlib files. Only sizes are
    shrunk: the progress bar, logger and callbacks of conf/defaults.yaml stay on, as users run them."""
    flags = {
        "trainer.max_steps": steps, "trainer.val_check_interval": 2, "trainer.limit_val_batches": 2,
        "trainer.limit_test_batches": 2, "trainer.log_every_n_steps": 1,
        "trainer.logger.init_args.save_dir": tmp / "logs", "trainer.enable_model_summary": False,
        "model.arch.n_layers": 1, "model.arch.d_model": 32, "model.arch.n_heads": 2, "model.arch.context": 32,
        "model.schedule.warmup_steps": 2, "data.vocab_size": 300, "data.batch_size": 4,
        "data.max_documents": 40, "data.data_dir": tmp / "data",
    }
    flags.update(overrides)
    return [f"--{key}={value}" for key, value in flags.items()]


def run_script(script: str, *args: object, env: dict | None = None, timeout: float = 300,
               check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run one of the top-level scripts as a user would, from the repository root."""
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, text=True,
                            capture_output=True, timeout=timeout, env={**os.environ, **(env or {})}, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def run_cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    """`./xlab.py ARGS` in this process, through the same `xlab.cli.main`: seconds instead of a new interpreter's
    imports. What it prints (not the log records, whose handlers hold the real streams) and its exit status come
    back as `run_script` gives them."""
    from xlab.cli import main

    out, err, status = io.StringIO(), io.StringIO(), 0
    with mock.patch.object(sys, "argv", ["xlab.py"]), redirect_stdout(out), redirect_stderr(err):
        try:
            main([str(arg) for arg in args])
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    result = subprocess.CompletedProcess(["xlab.py", *map(str, args)], status, out.getvalue(), err.getvalue())
    if check and status != 0:
        raise AssertionError(f"xlab.py failed ({status}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def tiny(tmp_path: Path):
    return lambda **kw: tiny_args(tmp_path, **kw)
