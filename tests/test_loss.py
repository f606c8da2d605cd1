"""The chunked linear cross-entropy against F.cross_entropy on the full logits, alone and in the LightningModule."""

from __future__ import annotations

import dataclasses
import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, tiny_args
from test_metrics import table_value
from torch.utils.data import DataLoader

from xlab.loss import IGNORE_INDEX, linear_cross_entropy, next_token_loss
from xlab.module import LanguageModel
from xlab.transformer import TransformerConfig

N, C, VOCAB, PADDED = 23, 16, 37, 48  # the head has PADDED rows, only the first VOCAB of which are logits


def inputs(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (N, C), weight (PADDED, C) and targets (N,) with a few ignored."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(N, C, generator=generator, dtype=dtype)
    weight = torch.randn(PADDED, C, generator=generator, dtype=dtype) / 2
    targets = torch.randint(0, VOCAB, (N,), generator=generator)
    targets[[0, 7, 8]] = IGNORE_INDEX
    return features, weight, targets


def loss_and_grads(fn, features, weight, targets, upstream):
    """fn(features, weight, targets), and the gradients of sum(loss * upstream) w.r.t. features and weight."""
    features, weight = (t.detach().clone().requires_grad_() for t in (features, weight))
    loss = fn(features, weight, targets)
    return (loss.detach(), *torch.autograd.grad((loss * upstream).sum(), (features, weight)))


def capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Soft-capped logits, softcap * tanh(logits / softcap); softcap None: the logits as they are."""
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def reference(reduction: str, softcap: float | None = None):
    """F.cross_entropy on the full logits of the first VOCAB rows, soft-capped if asked: the unfused loss."""
    return lambda f, w, t: F.cross_entropy(capped(f @ w[:VOCAB].T, softcap), t, ignore_index=IGNORE_INDEX,
                                           reduction=reduction)


SOFTCAPS = [None, 1.5]  # the logits (std ~2, up to ~10) go well past a cap of 1.5


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("chunk_size", [1, 5, 23, 64])  # 5 leaves a chunk of 3; 64 > N is one chunk
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_loss_and_gradients_match_cross_entropy_of_the_full_logits(dtype, tolerance, reduction, chunk_size, softcap):
    features, weight, targets = inputs(dtype)
    # per-token losses get a different incoming gradient each, as a weighted sum of them would give
    upstream = torch.linspace(-1, 2, N, dtype=dtype) if reduction == "none" else torch.tensor(1.5, dtype=dtype)
    chunked = loss_and_grads(lambda f, w, t: linear_cross_entropy(f, w, t, VOCAB, chunk_size, reduction,
                                                                  softcap=softcap),
                             features, weight, targets, upstream)
    expected = loss_and_grads(reference(reduction, softcap), features, weight, targets, upstream)
    for ours, theirs in zip(chunked, expected, strict=True):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=tolerance, atol=tolerance)
    grad_weight = chunked[2]
    assert (grad_weight[VOCAB:] == 0).all() and (grad_weight[:VOCAB] != 0).any()  # padded rows are no logits
    if reduction == "none":
        assert (chunked[0][targets == IGNORE_INDEX] == 0).all()


def test_predictions_are_the_argmax_of_the_full_logits():
    features, weight, targets = inputs(torch.float32)
    loss, predictions = linear_cross_entropy(features, weight, targets, VOCAB, 5, predict=True)
    assert torch.equal(predictions, (features @ weight[:VOCAB].T).argmax(-1))
    assert loss.item() == pytest.approx(reference("mean")(features, weight, targets).item(), rel=1e-6)


def test_tied_weight_gets_the_embedding_and_the_head_gradient():
    features, weight, targets = inputs(torch.float64)
    idx = torch.randint(0, VOCAB, (N,), generator=torch.Generator().manual_seed(1))

    def tied(loss_fn):  # the weight embeds the tokens and is the head: one tensor, two uses
        return lambda f, w, t: loss_fn(torch.tanh(F.embedding(idx, w) + f), w, t)

    chunked = loss_and_grads(tied(lambda f, w, t: linear_cross_entropy(f, w, t, VOCAB, 4)), features, weight,
                             targets, 1.0)
    expected = loss_and_grads(tied(reference("mean")), features, weight, targets, 1.0)
    for ours, theirs in zip(chunked, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_all_targets_ignored_gives_a_nan_mean_and_zero_gradients_as_cross_entropy():
    features, weight, _ = inputs(torch.float32)
    targets = torch.full((N,), IGNORE_INDEX)
    for fn in (lambda f, w, t: linear_cross_entropy(f, w, t, VOCAB, 5), reference("mean")):
        loss, grad_features, grad_weight = loss_and_grads(fn, features, weight, targets, 1.0)
        assert loss.isnan()
        assert (grad_features == 0).all() and (grad_weight == 0).all()


@pytest.mark.parametrize("features_dtype", [torch.float32, torch.bfloat16])  # a final LayerNorm's, or a Linear's
@pytest.mark.parametrize("softcap", SOFTCAPS)
def test_bf16_autocast_is_close_to_the_unfused_bf16_path(features_dtype, softcap):
    features, weight, targets = inputs(torch.float32)  # weight: the float32 master copy
    features = features.to(features_dtype)

    def unfused(f, w, t):  # as the model's head (soft cap in float32) and next_token_loss run under autocast
        return F.cross_entropy(capped(F.linear(f, w)[:, :VOCAB].float(), softcap), t, ignore_index=IGNORE_INDEX)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = loss_and_grads(lambda f, w, t: linear_cross_entropy(f, w, t, VOCAB, 5, softcap=softcap), features,
                                 weight, targets, 1.0)
        expected = loss_and_grads(unfused, features, weight, targets, 1.0)
    exact = loss_and_grads(reference("mean", softcap), features.double(), weight.double(), targets, 1.0)
    (loss, grad_features, grad_weight), (loss_bf16, grad_features_bf16, grad_weight_bf16) = chunked, expected
    assert (loss.dtype, grad_features.dtype, grad_weight.dtype) == (torch.float32, features_dtype, torch.float32)
    # the loss and the features' gradient are the unfused path's to float32 rounding, far closer than to the exact
    # values (bf16 logits round at ~1e-3): the products do run in bfloat16
    assert abs(loss_bf16.double() - exact[0]) > 1e-4
    torch.testing.assert_close(loss, loss_bf16, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_features, grad_features_bf16, rtol=1e-5, atol=1e-5)
    # the weight's gradient sums bf16 products chunk by chunk in float32, the unfused path rounds one product
    # once: as close to the exact gradient, give or take bf16 rounding
    torch.testing.assert_close(grad_weight, grad_weight_bf16, rtol=2e-2, atol=2e-3)
    error, error_bf16 = ((g.double() - exact[2]).abs().max() for g in (grad_weight, grad_weight_bf16))
    assert error <= 1.5 * error_bf16 + 1e-4


def test_fp16_autocast_gradients_under_a_grad_scaler_are_as_accurate_as_the_full_logits():
    """Under float16 a GradScaler multiplies the loss by 2 ** 16 so that small gradients survive float16's range: the
    gradient of the logits must not be rounded to float16 before that scale (known only in backward) reaches it."""
    n, c, vocab = 1024, 8, 4096  # softmax / n ~ 2e-7, below float16's normal range (6e-5) unless the scale comes first
    generator = torch.Generator().manual_seed(0)
    features, weight = torch.randn(n, c, generator=generator), torch.randn(vocab, c, generator=generator) / c**0.5
    targets = torch.randint(0, vocab, (n,), generator=generator)
    scale = 2.0**16  # torch.amp.GradScaler's initial scale

    def errors(fn) -> list[float]:  # relative errors of the unscaled gradients against float64's
        with torch.autocast("cpu", dtype=torch.float16):
            _, *grads = loss_and_grads(fn, features, weight, targets, scale)
        assert [g.dtype for g in grads] == [torch.float32, torch.float32]
        return [((g.double() / scale - e).norm() / e.norm()).item() for g, e in zip(grads, exact, strict=True)]

    _, *exact = loss_and_grads(lambda f, w, t: F.cross_entropy(f @ w.T, t), features.double(), weight.double(),
                               targets, 1.0)
    chunked = errors(lambda f, w, t: linear_cross_entropy(f, w, t, vocab, 256))
    full = errors(lambda f, w, t: next_token_loss(F.linear(f, w)[None], t[None]))
    assert max(full) < 1e-3  # float16 rounding of the logits and their gradient, no worse
    for ours, theirs in zip(chunked, full, strict=True):
        assert ours <= 1.25 * theirs, (chunked, full)


def test_bad_arguments_are_one_line_errors():
    features, weight, targets = inputs(torch.float32)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'none'"):
        linear_cross_entropy(features, weight, targets, VOCAB, 4, reduction="sum")
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        linear_cross_entropy(features, weight, targets, VOCAB, 0)


ARCH = TransformerConfig(vocab_size=VOCAB, pad_vocab_to=16, context=8, n_layers=1, n_heads=2, d_model=16)
# logits of std ~2 (init_std 0.5), which a cap of 2 bends: a loss that skipped it would differ
SOFTCAPPED = dataclasses.replace(ARCH, init_std=0.5, logit_softcap=2.0)
ARCHES = pytest.mark.parametrize("arch", [ARCH, SOFTCAPPED], ids=["plain", "softcap"])


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = [(torch.randint(0, VOCAB, (3, 8), generator=generator),
            torch.randint(0, VOCAB, (3, 8), generator=generator)) for _ in range(n)]
    out[0][1][0, :5] = IGNORE_INDEX  # padding: no loss, no accuracy
    return out


def evaluation(arch: TransformerConfig, chunk_size: int) -> dict[str, float]:
    torch.manual_seed(0)
    module = LanguageModel(arch, loss_chunk_size=chunk_size)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    [logged] = trainer.validate(module, DataLoader(batches(3), batch_size=None), verbose=False)
    return logged


@ARCHES
def test_module_evaluation_with_the_chunked_loss_matches_the_full_logits(arch):
    full, chunked = evaluation(arch, 0), evaluation(arch, 5)
    assert full.keys() == chunked.keys() >= {"val/loss", "val/accuracy", "val/perplexity"}
    for name, value in full.items():
        assert chunked[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    # and against the full logits computed here: the mean loss over the real targets
    torch.manual_seed(0)
    model = LanguageModel(arch).model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches(3)]).flatten(0, 1)
    targets = torch.cat([y for _, y in batches(3)]).flatten()
    assert chunked["val/loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)


@ARCHES
def test_module_training_step_with_the_chunked_loss_matches_the_full_logits(arch):
    grads = []
    for chunk_size in (0, 7):
        torch.manual_seed(0)
        module = LanguageModel(arch, loss_chunk_size=chunk_size)
        loss, predictions = module.step(batches(1)[0], predict=True)
        loss.backward()
        grads.append((loss.detach(), predictions, {n: p.grad for n, p in module.named_parameters()}))
    (full_loss, full_predictions, full_grads), (loss, predictions, chunked_grads) = grads
    torch.testing.assert_close(loss, full_loss)
    assert torch.equal(predictions, full_predictions)
    assert full_grads.keys() == chunked_grads.keys()
    for name, grad in full_grads.items():  # the tied embedding/head included
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_negative_chunk_size_is_refused():
    with pytest.raises(ValueError, match="loss_chunk_size must be 0"):
        LanguageModel(ARCH, loss_chunk_size=-1)


def test_cli_validate_with_the_chunked_loss_reports_the_same_figures(tmp_path):
    # bits per byte needs the datamodule's tokenizer: a real run, validated from its checkpoint both ways
    args = tiny_args(tmp_path, steps=1)
    run_cli("fit", *args)
    ckpt = tmp_path / "logs/version_0/checkpoints/last.ckpt"
    full, chunked = (run_cli("validate", *args, f"--ckpt_path={ckpt}", f"--model.loss_chunk_size={size}").stdout
                     for size in (0, 50))  # 50 does not divide a batch's 4 x 32 tokens
    for metric in ("val/loss", "val/bpb", "val/accuracy", "val/perplexity"):
        assert table_value(chunked, metric) == pytest.approx(table_value(full, metric), rel=1e-5), metric


def test_compiled_training_with_the_chunked_loss_matches_eager(tmp_path, monkeypatch):
    """torch.compile traces the custom autograd Function, forward and backward, in one graph with the model. The
    "aot_eager" backend runs that traced graph without generating code: inductor's code generation would add
    ~30 s on 2 cores from a cold cache (tests/test_static_cache.py runs inductor itself)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    logged = []
    for compile in (False, True):
        torch.manual_seed(0)
        module = LanguageModel(ARCH, compile=compile, loss_chunk_size=7)
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
                            limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(module, DataLoader(batches(1), batch_size=None))
        logged.append(trainer.callback_metrics)
    eager, compiled = logged
    for name in ("train/loss", "train/grad_norm", "train/accuracy"):
        assert compiled[name].item() == pytest.approx(eager[name].item(), rel=1e-4), name


def test_fsdp_refuses_the_chunked_loss():
    module = LanguageModel(ARCH, loss_chunk_size=8)
    module._device_mesh = object()  # as ModelParallelStrategy sets it: the model is about to be sharded
    with pytest.raises(ValueError, match="loss_chunk_size is not supported with FSDP yet"):
        module.configure_model()
