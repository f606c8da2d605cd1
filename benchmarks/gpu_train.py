#!/usr/bin/env python3
"""GPU training speed: XLab's LightningModule + Trainer beside a plain PyTorch loop on the same model.

GPT-2 124M shape (12 layers, 768 wide, 12 heads, context 1024, vocabulary 50257 padded to a multiple
of 64) or the llama preset at a similar size, bf16 autocast, SDPA flash attention, torch.compile,
fused AdamW, random tokens. Prints tokens/s, MFU (against --peak-tflops, 989 for an H100 SXM) and
peak memory of both, then one JSON line; `trainer_vs_plain_ratio` is the Trainer's tokens/s over
the plain loop's (1.0 = no overhead).

Two levers apply to both loops alike: --loss-chunk-size N, the chunked cross-entropy of `xlab.loss` over N tokens at
a time instead of the full logits (`model.loss_chunk_size`), and --attention-backends, the SDPA kernels allowed
(`model.attention_backends`: flash, cudnn, efficient, math).

    python benchmarks/gpu_train.py --preset gpt2 --batch 16
    python benchmarks/gpu_train.py --preset gpt2 --batch 32 --loss-chunk-size 8192 --attention-backends cudnn
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
from torch.nn.attention import sdpa_kernel
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's xlab, as the other benchmarks

from xlab.loss import linear_cross_entropy, next_token_loss  # noqa: E402
from xlab.module import ATTENTION_BACKENDS, LanguageModel, sdpa_backends  # noqa: E402
from xlab.optim import param_groups  # noqa: E402
from xlab.transformer import Transformer, TransformerConfig  # noqa: E402

PRESETS = {
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=True),
    # similar size: SwiGLU with d_ff = 8/3 x 768 rounded to 2048 has the parameters of GELU's 4 x 768
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", d_ff=2048, bias=False, tie_embeddings=False,
                  n_kv_heads=4, norm_eps=1e-6),
}


def gpt2_shape(preset: str, context: int) -> TransformerConfig:
    return TransformerConfig(vocab_size=50257, pad_vocab_to=64, context=context, n_layers=12, n_heads=12,
                             d_model=768, **PRESETS[preset])


class RandomTokens(Dataset):
    """Fixed random windows (x, y), each (T,), generated once on the CPU like a memmap'd corpus."""

    def __init__(self, n: int, context: int, vocab: int):
        self.data = torch.randint(0, vocab, (n, context + 1))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i, :-1], self.data[i, 1:]


def plain_loss(model: Transformer, chunk_size: int, compile: bool) -> Callable:
    """loss(x, y) of a batch as LanguageModel computes it: on the full logits, or (chunk_size > 0) chunked over
    the head's weight from the model's features."""
    maybe_compile = torch.compile if compile else lambda fn: fn
    if chunk_size:
        features, loss = maybe_compile(model.features), maybe_compile(linear_cross_entropy)
        return lambda x, y: loss(features(x).flatten(0, 1), model.lm_head.weight, y.flatten(),
                                 model.config.vocab_size, chunk_size)
    if compile:
        model.compile()
    loss = maybe_compile(next_token_loss)
    return lambda x, y: loss(model(x), y)


def plain_loop(config: TransformerConfig, data: RandomTokens, batch: int, warmup: int, steps: int,
               compile: bool, loss_chunk_size: int, attention_backends: list[str] | None) -> tuple[float, int]:
    """nanoGPT-style loop: seconds for `steps` steps after `warmup`, and peak memory."""
    torch.manual_seed(0)
    model = Transformer(config).cuda()
    loss_fn = plain_loss(model, loss_chunk_size, compile)
    backends = sdpa_backends(attention_backends)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=True)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, pin_memory=True, num_workers=2)
    batches = iter(loader)
    torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = (t.cuda(non_blocking=True) for t in next(batches))
        with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(backends) if backends else nullcontext():
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model, optimizer
    return elapsed, torch.cuda.max_memory_allocated()


class StepTimer(L.Callback):
    """Wall time from the end of step `warmup` to the end of the last step."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            torch.cuda.synchronize()
            self.start = time.perf_counter()
        elif trainer.global_step == trainer.max_steps:
            torch.cuda.synchronize()
            self.end = time.perf_counter()


def trainer_loop(config: TransformerConfig, data: RandomTokens, batch: int, warmup: int, steps: int,
                 compile: bool, loss_chunk_size: int, attention_backends: list[str] | None) -> tuple[float, int]:
    torch.manual_seed(0)
    module = LanguageModel(config, learning_rate=3e-4, compile=compile, loss_chunk_size=loss_chunk_size,
                           attention_backends=attention_backends)
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=warmup + steps,
                        gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[timer], log_every_n_steps=50)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, pin_memory=True, num_workers=2)
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, train_dataloaders=loader)
    return timer.end - timer.start, torch.cuda.max_memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--loss-chunk-size", type=int, default=0,
                        help="tokens per chunk of the chunked cross-entropy (0: the full logits)")
    parser.add_argument("--attention-backends", nargs="+", choices=list(ATTENTION_BACKENDS), default=None,
                        help="SDPA kernels allowed (default: PyTorch's choice)")
    args = parser.parse_args()
    if not torch.cuda.is_available():  # `make bench` runs every benchmark; this one has nothing to do on a CPU
        print("benchmarks/gpu_train.py needs a CUDA GPU: skipped")
        print(json.dumps({"skipped": "no CUDA GPU"}))
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.attention_backends:
        # the compile caches on disk may not key on the SDPA backend flags (pytorch/pytorch#185449): a graph
        # compiled under other backends could be reused
        torch.compiler.config.force_disable_caches = True
    config = gpt2_shape(args.preset, args.context)
    flops_per_token = Transformer(config).flops_per_token()["total"]
    data = RandomTokens(args.batch * (args.warmup + args.steps + 2), args.context, config.vocab_size)
    tokens = args.batch * args.context * args.steps
    results = {"preset": args.preset, "batch": args.batch, "context": args.context, "compile": args.compile,
               "loss_chunk_size": args.loss_chunk_size, "attention_backends": args.attention_backends,
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "lightning": L.__version__}
    for name, loop in (("plain", plain_loop), ("trainer", trainer_loop)):
        elapsed, memory = loop(config, data, args.batch, args.warmup, args.steps, args.compile, args.loss_chunk_size,
                               args.attention_backends)
        rate = tokens / elapsed
        results[f"{name}_tokens_per_s"] = round(rate)
        results[f"{name}_mfu"] = round(flops_per_token * rate / (args.peak_tflops * 1e12), 4)
        results[f"{name}_peak_memory_gib"] = round(memory / 2**30, 2)
        print(f"{name:8s} {rate:12,.0f} tokens/s  MFU {results[f'{name}_mfu']:.1%}  "
              f"peak memory {memory / 2**30:.1f} GiB")
    results["trainer_vs_plain_ratio"] = round(results["trainer_tokens_per_s"] / results["plain_tokens_per_s"], 4)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
