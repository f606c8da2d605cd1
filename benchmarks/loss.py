"""The cross-entropy at GPT-2 124M's head: `F.cross_entropy` of the full logits against XLab's chunked
`xlab.loss.linear_cross_entropy`, forward and backward.

N tokens' hidden states (N, --d-model) times the head's weight (--padded-vocab, --d-model), of which the first
--vocab rows are logits. The plain path makes the (N, V) logits, then F.cross_entropy works on a float32 copy;
the chunked one never holds more than (--chunk-size, V) logits. On CUDA (bf16 autocast, as training runs) the
peak memory is measured; on the CPU, whose allocations PyTorch does not track, the size of one logits tensor of
each path is worked out instead (each path holds a few tensors of that size at once).

    python benchmarks/loss.py                                  # CPU, N = 2048: under a minute
    python benchmarks/loss.py --device cuda --tokens 32768 --chunk-size 8192

Prints a table, then as its last line one JSON object; `*_ratio` keys are the plain loss's figure over the chunked
one's (time, memory: higher is better for XLab).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlab.loss import IGNORE_INDEX, linear_cross_entropy  # noqa: E402


def plain(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int, chunk: int):
    """The full-logits loss, as the model's head and `xlab.loss.next_token_loss` compute it."""
    return F.cross_entropy(F.linear(features, weight)[:, :vocab].float(), targets, ignore_index=IGNORE_INDEX)


def chunked(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int, chunk: int):
    return linear_cross_entropy(features, weight, targets, vocab, chunk)


def measure(loss_fn, features, weight, targets, args) -> tuple[float, float, int | None]:
    """Best seconds of `--repeats` forward + backward passes, the loss, and (CUDA) the peak memory in bytes."""
    cuda = features.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    best, peak = float("inf"), None
    for repeat in range(args.repeats + 1):  # the first pass warms up
        features.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with autocast:
            loss = loss_fn(features, weight, targets, args.vocab, args.chunk_size)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        if repeat:
            best = min(best, time.perf_counter() - start)
    return best, loss.item(), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tokens", type=int, default=2048, help="N: batch x context")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--padded-vocab", type=int, default=50304)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU here")
    torch.manual_seed(0)
    device = torch.device(args.device)
    features = torch.randn(args.tokens, args.d_model, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(args.padded_vocab, args.d_model, device=device)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    itemsize = 2 if device.type == "cuda" else 4  # the logits' dtype: bf16 autocast on CUDA, float32 on the CPU
    summary: dict[str, object] = {"device": args.device, "tokens": args.tokens, "chunk_size": args.chunk_size,
                                  "threads": torch.get_num_threads()}
    print(f"{'loss':<10}{'seconds':>10}{'logits MB':>11}{'peak MB':>9}  (N={args.tokens}, V={args.vocab}, "
          f"chunk {args.chunk_size}, {args.device}, best of {args.repeats})")
    for name, loss_fn, rows in (("plain", plain, args.tokens), ("chunked", chunked, args.chunk_size)):
        seconds, loss, peak = measure(loss_fn, features, weight, targets, args)
        logits_mb = min(rows, args.tokens) * args.vocab * itemsize / 1e6
        summary |= {f"{name}_seconds": round(seconds, 4), f"{name}_loss": round(loss, 5),
                    f"{name}_logits_mb": round(logits_mb, 1)}
        if peak is not None:
            summary[f"{name}_peak_mb"] = round(peak / 1e6, 1)
        print(f"{name:<10}{seconds:>10.3f}{logits_mb:>11.0f}{'-' if peak is None else f'{peak / 1e6:.0f}':>9}")
    summary["time_ratio"] = round(summary["plain_seconds"] / summary["chunked_seconds"], 3)
    summary["logits_memory_ratio"] = round(summary["plain_logits_mb"] / summary["chunked_logits_mb"], 3)
    if "plain_peak_mb" in summary:
        summary["peak_memory_ratio"] = round(summary["plain_peak_mb"] / summary["chunked_peak_mb"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
