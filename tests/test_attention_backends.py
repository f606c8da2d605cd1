"""`model.attention_backends`: the SDPA kernels training and evaluation may use."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import run_cli, tiny_args
from test_loss import ARCH, batches
from torch.utils.data import DataLoader

from xlab.module import LanguageModel


def enabled_backends() -> tuple[bool, bool, bool, bool]:
    """The SDPA backends allowed right now: flash, cudnn, efficient, math (global flags, the CPU's too)."""
    cuda = torch.backends.cuda
    return (cuda.flash_sdp_enabled(), cuda.cudnn_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
            cuda.math_sdp_enabled())


def run(backends: list[str] | None) -> tuple[dict[str, float], list[tuple[bool, ...]]]:
    """One training step and a validation of the tiny model: what was logged, and the backends each attention
    call of the model saw."""
    torch.manual_seed(0)
    module = LanguageModel(ARCH, attention_backends=backends)
    seen = []
    module.model.blocks[0].attn.register_forward_pre_hook(lambda *_: seen.append(enabled_backends()))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    loader = DataLoader(batches(2), batch_size=None)
    trainer.fit(module, loader)
    train_loss = trainer.callback_metrics["train/loss"].item()
    [logged] = trainer.validate(module, loader, verbose=False)
    return logged | {"train/loss": train_loss}, seen


def test_math_backend_gives_the_default_loss_and_is_used_in_training_and_evaluation():
    before = enabled_backends()
    default, seen_default = run(None)
    math, seen_math = run(["math"])
    assert set(seen_default) == {before}
    assert len(seen_math) == 3 and set(seen_math) == {(False, False, False, True)}  # a step, 2 validation batches
    assert enabled_backends() == before  # restored after each call
    assert {"train/loss", "val/loss", "val/accuracy"} <= default.keys()
    for name, value in default.items():
        assert math[name] == pytest.approx(value, rel=1e-5), name


@pytest.mark.parametrize("backends, message", [
    ("[flsh,math]", "attention_backends ['flsh', 'math']: unknown ['flsh']; choose among flash, cudnn, efficient, "
                    "math"),
    # scaled_dot_product_attention has no cuDNN kernel on the CPU
    ("[cudnn]", "attention_backends ['cudnn']: none of them can run this model's attention on cpu"),
])
def test_bad_or_unavailable_backends_are_one_clear_line(tmp_path, backends, message):
    result = run_cli("fit", *tiny_args(tmp_path, steps=1), f"--model.attention_backends={backends}", check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), result.stderr


@pytest.mark.parametrize("backends, disabled", [(None, False), (["math"], True)])
def test_compiling_with_chosen_backends_bypasses_the_disk_caches(backends, disabled):
    """The on-disk compile caches do not key on the SDPA backends: a chosen backend turns them off, so a graph
    compiled under another is never reused (pytorch/pytorch#185449)."""
    with torch.compiler.config.patch(force_disable_caches=False):
        LanguageModel(ARCH, compile=True, attention_backends=backends).configure_model()
        assert torch.compiler.config.force_disable_caches is disabled
        assert torch._inductor.config.force_disable_caches is disabled  # what inductor reads
