"""Training metrics: throughput and MFU over every micro-batch of a logging interval, the peak-FLOPs table,
the step a non-finite loss is reported at, and DDP evaluation (loss and bits per byte) that counts every window once."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import run_script, tiny_args
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.loggers import Logger
from test_data import make_corpus
from test_distributed import DDP, free_port
from torch.utils.data import DataLoader

from xlab import callbacks, kernels
from xlab.callbacks import Throughput
from xlab.data import XLabDataModule
from xlab.loss import next_token_loss
from xlab.module import LanguageModel, NonFiniteLoss
from xlab.transformer import TransformerConfig

ARCH = TransformerConfig(vocab_size=40, context=8, n_layers=1, n_heads=2, d_model=16)


class Recorder(Logger):
    """Keeps the last metrics logged at each step."""

    def __init__(self):
        super().__init__()
        self.steps: dict[int, dict] = {}

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None):
        self.steps.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class FakeClock:
    """Stands for time.perf_counter: micro-batch i (from 0) lasts durations[i % len(durations)] seconds. Listed
    before Throughput, its hooks move the time to the start, then the end, of each micro-batch."""

    def __init__(self, durations):
        self.durations, self.now, self.batches = durations, 0.0, 0

    def perf_counter(self):
        return self.now

    def callback(self):
        clock = self

        class Tick(L.Callback):
            def on_train_batch_end(self, *args):
                clock.now += clock.durations[clock.batches % len(clock.durations)]
                clock.batches += 1

        return Tick()


def random_batches(n: int, batch: int, generator_seed: int = 0):
    g = torch.Generator().manual_seed(generator_seed)
    return [(torch.randint(0, ARCH.vocab_size, (batch, ARCH.context), generator=g),
             torch.randint(0, ARCH.vocab_size, (batch, ARCH.context), generator=g)) for _ in range(n)]


def trainer(tmp_path, steps: int, callbacks_: list, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     default_root_dir=tmp_path, callbacks=callbacks_, **kwargs)


def test_throughput_counts_every_micro_batch_of_the_logging_interval(tmp_path, monkeypatch):
    clock = FakeClock([1.0, 3.0])  # the two micro-batches of a step last 1 s and 3 s
    monkeypatch.setattr(callbacks, "time", clock)
    batch, peak = 2, 1e9
    logger = Recorder()
    run = trainer(tmp_path, 4, [clock.callback(), Throughput(peak_flops=peak)], accumulate_grad_batches=2,
                  log_every_n_steps=2, logger=logger)
    module = LanguageModel(ARCH)
    run.fit(module, DataLoader(random_batches(8, batch), batch_size=None))
    # each logging interval: 2 steps x 2 micro-batches of batch x context tokens, in 2 x (1 + 3) seconds
    tokens_per_s = 2 * 2 * batch * ARCH.context / 8.0
    logged = {step: m["perf/tokens_per_s"] for step, m in logger.steps.items() if "perf/tokens_per_s" in m}
    assert logged == {1: pytest.approx(tokens_per_s), 3: pytest.approx(tokens_per_s)}
    mfu = module.model.flops_per_token()["total"] * tokens_per_s / peak
    assert logger.steps[3]["perf/mfu"] == pytest.approx(mfu)


@pytest.mark.parametrize("name, dtype, expected", [
    # dense datasheet figures: bf16 / tf32 / fp32
    ("NVIDIA H200", torch.bfloat16, 989.4e12),  # Lightning's table has no plain H200
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
    ("NVIDIA H100 PCIe", torch.float16, 756e12),
    ("NVIDIA H100 NVL", torch.bfloat16, 835.5e12),
    ("NVIDIA B200", torch.bfloat16, 2.25e15),
    ("NVIDIA A100-SXM4-80GB", torch.float32, 156e12),  # TF32 matmuls: float32 precision "high"
    ("NVIDIA L40S", torch.bfloat16, 362.05e12),  # Lightning reads it as an L4
    ("AMD Instinct MI300X", torch.bfloat16, 1307.4e12),
])
def test_peak_flops_table_by_device_name(monkeypatch, name, dtype, expected):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert callbacks.peak_flops(torch.device("cuda", 0), dtype) == pytest.approx(expected)


def test_peak_flops_fall_back_to_lightning_and_yield_to_the_option(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4090")
    gpu = torch.device("cuda", 0)
    assert callbacks.peak_flops(gpu, torch.bfloat16) == get_available_flops(gpu, torch.bfloat16) == 82.6e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=gpu), precision="bf16-mixed")
    module = LanguageModel(ARCH)
    for option, expected in ((None, 989.4e12), (123e12, 123e12)):
        throughput = Throughput(peak_flops=option)
        throughput.on_train_start(trainer, module)
        assert throughput.peak_flops == expected


def test_non_finite_loss_names_its_step_when_only_logging_steps_check(tmp_path, monkeypatch):
    # as on a GPU, where checking every step would wait for the device: only logging steps (every 5th) check
    monkeypatch.setattr(LanguageModel, "waits_for_device", lambda self: True)
    module = LanguageModel(ARCH)

    def loss_fn(logits, targets):  # the loss turns NaN at step 2, between the logging steps 0 and 4
        loss = next_token_loss(logits, targets)
        return loss * float("nan") if module.global_step == 2 else loss

    module.loss_fn = loss_fn
    run = trainer(tmp_path, 8, [], log_every_n_steps=5, logger=Recorder())
    with pytest.raises(NonFiniteLoss, match=r"at step 2\b"):
        run.fit(module, DataLoader(random_batches(8, 2), batch_size=None))


def table_value(output: str, metric: str) -> float:
    """A metric's row (such as val/loss) of the table `xlab.py validate` or `test` prints."""
    [row] = [line for line in output.splitlines() if f" {metric} " in line]
    return float(row.strip("│┃ ").split()[-1])


def test_ddp_validation_counts_each_window_once(tmp_path):
    # short documents, 3 of them in val: 9 windows, which Lightning's sampler would even out to 10 for 2 ranks by
    # repeating one; ours gives rank 1 a window whose targets are all ignored instead
    corpus = tmp_path / "corpus.jsonl"
    make_corpus(corpus, n=30)
    options = {"data.source": corpus, "data.val_size": 3, "data.max_documents": "null", "data.predict_size": 1,
               "trainer.limit_val_batches": 1.0, "data.batch_size": 2}
    args = tiny_args(tmp_path, steps=1, **options)
    run_script("xlab.py", "fit", *args)
    dm = XLabDataModule(source=str(corpus), data_dir=str(tmp_path / "data"), vocab_size=300, context=32,
                        val_size=3, predict_size=1)
    dm.setup("validate")
    assert len(dm.windows["val"]) % 2 == 1
    ckpt = f"--ckpt_path={tmp_path}/logs/version_0/checkpoints/last.ckpt"
    one = run_script("xlab.py", "validate", *args, ckpt).stdout
    two = run_script("xlab.py", "validate", *args, ckpt, *(f"--{k}={v}" for k, v in DDP.items()),
                     "--trainer.devices=2", env={"MASTER_PORT": str(free_port())}).stdout
    for metric in ("val/loss", "val/bpb", "val/accuracy"):  # sums over both ranks; rank 1's padding adds nothing
        assert table_value(two, metric) == pytest.approx(table_value(one, metric), rel=1e-6, abs=0)


def test_throughput_leaves_out_a_validation_inside_the_logging_interval(tmp_path, monkeypatch):
    """Validation counts micro-batches and logging counts steps: with accumulation a validation falls inside a logging
    interval. Its time is not training time."""
    clock = FakeClock([1.0, 3.0])

    class SlowValidation(L.Callback):
        def on_validation_batch_end(self, *args):
            clock.now += 100.0

    monkeypatch.setattr(callbacks, "time", clock)
    batch, logger = 2, Recorder()
    run = L.Trainer(max_steps=4, accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=3,
                    default_root_dir=tmp_path, callbacks=[clock.callback(), SlowValidation(), Throughput()],
                    accumulate_grad_batches=2, log_every_n_steps=2, logger=logger)
    batches = random_batches(8, batch)
    run.fit(LanguageModel(ARCH), DataLoader(batches, batch_size=None), DataLoader(batches[:1], batch_size=None))
    assert clock.now > 200  # two validations ran, after micro-batches 3 and 6: inside both logging intervals
    logged = {step: m["perf/tokens_per_s"] for step, m in logger.steps.items() if "perf/tokens_per_s" in m}
    tokens_per_s = 2 * 2 * batch * ARCH.context / 8.0  # 2 steps x 2 micro-batches in 2 x (1 + 3) seconds
    assert logged == {1: pytest.approx(tokens_per_s), 3: pytest.approx(tokens_per_s)}


class StepFigures(L.Callback):
    """Works out, before each micro-batch trains, its loss and correct predictions at the step's weights (they change
    only at the step's end): the reference for what is logged for the step."""

    def __init__(self):
        self.losses, self.correct, self.targets = {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            logits = pl_module.model(batch[0])
        step = trainer.global_step
        self.losses.setdefault(step, []).append(next_token_loss(logits, batch[1]).item())
        self.correct[step] = self.correct.get(step, 0) + (logits.argmax(-1) == batch[1]).sum().item()
        self.targets[step] = self.targets.get(step, 0) + batch[1].numel()


def test_training_figures_under_accumulation_are_the_steps_not_the_last_micro_batchs(tmp_path):
    logger, figures = Recorder(), StepFigures()
    run = trainer(tmp_path, 4, [figures], accumulate_grad_batches=4, log_every_n_steps=2, logger=logger)
    run.fit(LanguageModel(ARCH), DataLoader(random_batches(16, 2), batch_size=None))
    for step in (1, 3):  # the logging steps
        logged = logger.steps[step]
        mean = sum(figures.losses[step]) / 4
        assert logged["train/loss"] == pytest.approx(mean, abs=1e-5)
        assert logged["train/perplexity"] == pytest.approx(math.exp(mean), rel=1e-5)
        assert logged["train/accuracy"] == pytest.approx(figures.correct[step] / figures.targets[step])
        assert figures.losses[step][-1] != pytest.approx(mean, abs=1e-5)  # the last micro-batch alone differs


@pytest.mark.skipif(not kernels.ONEDNN, reason="the oneDNN layers run on x86 CPUs only")
def test_each_validation_lays_the_weights_out_once_and_sees_the_trained_ones(tmp_path, monkeypatch):
    """An evaluation multiplies by oneDNN copies of the weights, laid out once for it: the next one, after training
    steps, lays them out again (its loss is the trained weights', worked out here by plain forwards)."""
    layouts, layout = [], kernels._onednn_layout  # those of validation (training lays its own out per product)
    monkeypatch.setattr(kernels, "_onednn_layout", lambda w: layouts.append(run.validating) or layout(w))
    logger, module = Recorder(), LanguageModel(ARCH)
    run = L.Trainer(max_steps=4, accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=2, limit_val_batches=2,
                    default_root_dir=tmp_path, log_every_n_steps=1, logger=logger)
    val = random_batches(2, 2, generator_seed=1)
    run.fit(module, DataLoader(random_batches(4, 2), batch_size=None), DataLoader(val, batch_size=None))
    linears = sum(isinstance(m, kernels.Linear) for m in module.model.modules())
    assert sum(layouts) == 2 * linears  # two validations
    with torch.no_grad():  # outside an evaluation: nn.Linear's own product
        expected = sum(next_token_loss(module.model(x), y) for x, y in val) / len(val)
    assert logger.steps[3]["val/loss"] == pytest.approx(expected.item(), abs=1e-5)
