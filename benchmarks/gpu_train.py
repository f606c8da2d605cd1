#!/usr/bin/env python3
"""GPU training speed: XLab's LightningModule + Trainer beside a plain PyTorch loop on the same model.

GPT-2 124M shape (12 layers, 768 wide, 12 heads, context 1024, vocabulary 50257 padded to a multiple
of 64) or the llama preset at a similar size, bf16 autocast, SDPA flash attention, torch.compile,
fused AdamW, random tokens. Prints tokens/s, MFU (against --peak-tflops, 989 for an H100 SXM) and
peak memory of both, then one JSON line; `trainer_vs_plain_ratio` is the Trainer's tokens/s over
the plain loop's (1.0 = no overhead).

    python benchmarks/gpu_train.py --preset gpt2 --batch 16
"""

from __future__ import annotations

import argparse
import json
import time

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from xlab.module import LanguageModel, next_token_loss
from xlab.optim import param_groups
from xlab.transformer import Transformer, TransformerConfig

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


def plain_loop(config: TransformerConfig, data: RandomTokens, batch: int, warmup: int, steps: int,
               compile: bool) -> tuple[float, int]:
    """nanoGPT-style loop: seconds for `steps` steps after `warmup`, and peak memory."""
    torch.manual_seed(0)
    model = Transformer(config).cuda()
    loss_fn = next_token_loss
    if compile:
        model.compile()
        loss_fn = torch.compile(next_token_loss)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95), fused=True)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, pin_memory=True, num_workers=2)
    batches = iter(loader)
    torch.cuda.reset_peak_memory_stats()
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = (t.cuda(non_blocking=True) for t in next(batches))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x)
            loss = loss_fn(logits, y)
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
                 compile: bool) -> tuple[float, int]:
    torch.manual_seed(0)
    module = LanguageModel(config, learning_rate=3e-4, compile=compile)
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
    args = parser.parse_args()
    if not torch.cuda.is_available():  # `make bench` runs every benchmark; this one has nothing to do on a CPU
        print("benchmarks/gpu_train.py needs a CUDA GPU: skipped")
        print(json.dumps({"skipped": "no CUDA GPU"}))
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    config = gpt2_shape(args.preset, args.context)
    flops_per_token = Transformer(config).flops_per_token()["total"]
    data = RandomTokens(args.batch * (args.warmup + args.steps + 2), args.context, config.vocab_size)
    tokens = args.batch * args.context * args.steps
    results = {"preset": args.preset, "batch": args.batch, "context": args.context, "compile": args.compile,
               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "lightning": L.__version__}
    for name, loop in (("plain", plain_loop), ("trainer", trainer_loop)):
        elapsed, memory = loop(config, data, args.batch, args.warmup, args.steps, args.compile)
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
