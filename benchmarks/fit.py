#!/usr/bin/env python3
"""Training-loop overhead: a short `fit` of the default config through the real CLI, beside the
bare forward/backward/optimizer step of the same model on the same batches in the same process.

overhead = 1 - bare step time / CLI step time: the share of a step spent outside the model
(data loading, logging, callbacks, Lightning's loop). Target: under 10% on the CPU.

    python benchmarks/fit.py [--steps 30] [extra xlab.py flags...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import lightning as L
import torch

from xlab.cli import DEFAULTS, XLabCLI
from xlab.data import XLabDataModule
from xlab.module import LanguageModel


class StepTimes(L.Callback):
    """Wall time between the ends of consecutive training steps: everything a step costs."""

    def __init__(self):
        self.times, self.last, self.batches = [], None, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now
        if len(self.batches) < 5:
            self.batches.append([t.clone() for t in batch])


def bare_steps(module: LanguageModel, batches: list, repeats: int) -> list[float]:
    """Forward, loss, backward, clip and AdamW step, nothing else: seconds per step."""
    optimizer = module.configure_optimizers()["optimizer"]
    times = []
    for i in range(repeats):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        loss, _ = module.step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    args, extra = parser.parse_known_args()
    timer = StepTimes()
    with tempfile.TemporaryDirectory() as logs:
        cli = XLabCLI(LanguageModel, XLabDataModule, run=False, trainer_defaults={"callbacks": [timer]},
                      parser_kwargs={"default_config_files": [str(DEFAULTS)]},
                      args=[f"--trainer.max_steps={args.steps}", "--trainer.limit_val_batches=0",
                            f"--trainer.logger.init_args.save_dir={logs}",
                            *extra])
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    module = cli.model
    skip = min(5, len(timer.times) // 3)  # first steps warm up allocators and caches
    cli_step = statistics.median(timer.times[skip:])
    bare_step = statistics.median(bare_steps(module, timer.batches, len(timer.times[skip:])))
    tokens = timer.batches[0][0].numel()
    results = {"steps": args.steps, "batch_tokens": tokens, "threads": torch.get_num_threads(),
               "cli_tokens_per_s": round(tokens / cli_step), "bare_tokens_per_s": round(tokens / bare_step),
               "overhead": round(1 - bare_step / cli_step, 4), "cli_vs_bare_ratio": round(bare_step / cli_step, 4)}
    print(f"CLI fit  {tokens / cli_step:10,.0f} tokens/s  ({cli_step * 1e3:.0f} ms/step)")
    print(f"bare     {tokens / bare_step:10,.0f} tokens/s  ({bare_step * 1e3:.0f} ms/step)")
    print(f"overhead {results['overhead']:.1%} of each step outside forward/backward/optimizer")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
