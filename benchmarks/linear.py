"""Inference matrix products: `xlab.kernels.Linear` (oneDNN, blocked weight) against `nn.Linear`.

PyTorch's fp32 CPU `nn.Linear` calls MKL, which on non-Intel CPUs runs a generic code path. XLab's
`Linear` multiplies by a oneDNN copy of the weight with autograd off inside a `OneDNNWeights` scope, as
`generate` opens for each call (outside one it is `nn.Linear`). This times both on the
projections of a transformer of width --d-model (qkv, attention output, MLP up and down, and the
vocabulary head) for several row counts: 1, 4 and 8 rows are decoding (greedy, beams, a sampled
batch), more rows are a prefill or an evaluation batch.

Each product cycles through enough copies of its weight to fill --working-set MB, more than the
last-level cache, as a model's weights do when decoding: in cache the figures would flatter both.

    python benchmarks/linear.py
    python benchmarks/linear.py --d-model 384 --vocab 4096

Prints a table, then as its last line one JSON object; `*_ratio` keys are XLab's speed over nn.Linear's
(higher is better for XLab).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlab.kernels import ONEDNN, Linear, OneDNNWeights  # noqa: E402


def seconds_per_call(layers: list[nn.Module], x: torch.Tensor, repeats: int) -> float:
    """Best of `repeats` passes over all layers, per layer call."""
    for layer in layers:  # warm up (and lay XLab's weights out for oneDNN)
        layer(x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in layers:
            layer(x)
        best = min(best, (time.perf_counter() - start) / len(layers))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 64, 512])
    parser.add_argument("--working-set", type=float, default=256, help="MB of weights cycled through per product")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    C = args.d_model
    shapes = {"qkv": (C, 3 * C), "attn_out": (C, C), "mlp_up": (C, 4 * C), "mlp_down": (4 * C, C),
              "lm_head": (C, args.vocab)}
    print(f"threads={torch.get_num_threads()} oneDNN={ONEDNN} working set {args.working_set:.0f} MB "
          f"(best of {args.repeats})")
    print(f"{'product':<10}{'rows':>6}{'nn.Linear us':>14}{'XLab us':>10}{'XLab/nn':>9}")
    summary: dict[str, object] = {"oneDNN": ONEDNN, "threads": torch.get_num_threads()}
    ratios = []
    torch.manual_seed(0)
    for name, (n_in, n_out) in shapes.items():
        copies = max(2, int(args.working_set * 1e6 / (4 * n_in * n_out)))
        ours = [Linear(n_in, n_out) for _ in range(copies)]
        theirs = [nn.Linear(n_in, n_out) for _ in range(copies)]
        with torch.inference_mode(), OneDNNWeights():  # XLab's weights laid out once, as in a generate call
            for rows in args.rows:
                x = torch.randn(rows, n_in)
                torch.testing.assert_close(ours[0](x), nn.functional.linear(x, ours[0].weight, ours[0].bias),
                                           rtol=1e-4, atol=1e-4)
                t_ref = seconds_per_call(theirs, x, args.repeats)
                t_ours = seconds_per_call(ours, x, args.repeats)
                ratio = t_ref / t_ours
                ratios.append(ratio)
                print(f"{name:<10}{rows:>6}{t_ref * 1e6:>14.0f}{t_ours * 1e6:>10.0f}{ratio:>9.2f}")
                summary[f"{name}_rows{rows}_speed_ratio"] = round(ratio, 3)
            del ours, theirs
    summary["median_speed_ratio"] = round(statistics.median(ratios), 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
