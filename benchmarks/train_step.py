"""Training throughput and peak memory: XLab's Transformer against the Hugging Face model of the same architecture.

For each preset (gpt2: GPT2LMHeadModel, llama: LlamaForCausalLM) both models start from identical weights
(the XLab model exported with `xlab.convert`) and train with AdamW on the same random token batches. Both
use SDPA attention and the same dtype; their final losses are printed as a check that they really compute
the same thing.

- Speed: both models live in one spawned process and step alternately, so load from other processes hits
  both alike; tokens/s comes from the fastest step (other processes only ever add time), medians are shown.
- Memory: each model trains two steps alone in a fresh spawned process: the growth of its peak RSS over
  the baseline after imports on CPU, `torch.cuda.max_memory_allocated` on GPU.

    python benchmarks/train_step.py                                      # CPU, fp32, both presets
    python benchmarks/train_step.py --device cuda --dtype bf16 --compile --steps 50

Prints a table, then as its last line one JSON object; keys ending in `_ratio` compare XLab with
Hugging Face so that higher is better for XLab: tokens/s (from the fastest step) XLab over HF, memory HF
over XLab. The median step times are in the JSON too.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

PRESETS = {
    # the architecture choices of conf/extra/gpt2.yaml and conf/extra/llama.yaml
    "gpt2": {"position": "learned", "norm": "layernorm", "norm_bias": True, "mlp": "gelu_tanh", "bias": True,
             "tie_embeddings": True, "norm_eps": 1e-5},
    "llama": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False,
              "norm_eps": 1e-5, "rope_theta": 10000.0},
}


def build(preset: str, impl: str, args: argparse.Namespace):
    """The model of `impl` ("xlab" or "hf"), with weights from the same seed in both cases."""
    import torch
    import transformers

    from xlab.convert import hf_config_from_xlab, hf_state_dict_from_xlab
    from xlab.transformer import Transformer, TransformerConfig

    arch = dict(PRESETS[preset])
    if preset == "llama" and args.kv_heads:
        arch["n_kv_heads"] = args.kv_heads
    config = TransformerConfig(vocab_size=args.vocab, context=args.context, n_layers=args.layers,
                               n_heads=args.heads, d_model=args.d_model, **arch)
    torch.manual_seed(0)
    model = Transformer(config)
    if impl == "hf":  # the exported XLab weights, so both models compute the same function
        hf_config = hf_config_from_xlab(config)
        hf_config._attn_implementation = "sdpa"  # the attention kernel XLab uses
        hf_class = transformers.GPT2LMHeadModel if preset == "gpt2" else transformers.LlamaForCausalLM
        hf_model = hf_class(hf_config)
        hf_model.load_state_dict(hf_state_dict_from_xlab(model.state_dict(), config))
        model = hf_model
    return model


class Trainer:
    """One model, its AdamW and a step function on fixed random batches (the same for every model)."""

    def __init__(self, preset: str, impl: str, args: argparse.Namespace):
        import torch

        self.device = torch.device(args.device)
        self.model = build(preset, impl, args).to(self.device).train()
        self.impl, self.args = impl, args
        self.params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1,
                                           fused=self.device.type == "cuda")
        self.forward = torch.compile(self.model) if args.compile else self.model
        generator = torch.Generator().manual_seed(1)
        self.batches = [torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=generator)
                        for _ in range(4)]
        self.steps = 0

    def step(self) -> float:
        """One optimizer step; returns its wall time in seconds (the device is synchronised)."""
        import torch
        import torch.nn.functional as F

        start = time.perf_counter()
        batch = self.batches[self.steps % len(self.batches)].to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.dtype == "bf16"):
            if self.impl == "hf":
                logits = self.forward(input_ids=batch[:, :-1], use_cache=False).logits  # no KV cache in training
            else:
                logits = self.forward(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = loss.item()  # also waits for the device
        self.steps += 1
        return time.perf_counter() - start


def _setup(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch
    import transformers  # noqa: F401  (imported for both models, so both memory baselines include it)

    if args.threads:
        torch.set_num_threads(args.threads)


def measure_speed(preset: str, args: argparse.Namespace) -> dict[str, dict]:
    """Both models in one process, stepping alternately (the order flips every step), so that load from other
    processes hits both alike.

    tokens/s comes from each model's fastest step: on a shared machine other processes only ever add time,
    so the minimum is the least disturbed estimate (the rule of Python's timeit). The median is kept too.
    """
    _setup(args)
    trainers = {impl: Trainer(preset, impl, args) for impl in ("xlab", "hf")}
    times: dict[str, list[float]] = {impl: [] for impl in trainers}
    for i in range(args.warmup + args.steps):
        for impl in (("xlab", "hf") if i % 2 == 0 else ("hf", "xlab")):
            elapsed = trainers[impl].step()
            if i >= args.warmup:
                times[impl].append(elapsed)
    tokens = args.batch * args.context
    return {impl: {"tokens_per_s": tokens / min(t), "step_ms": 1000 * min(t),
                   "median_step_ms": 1000 * statistics.median(t), "final_loss": trainers[impl].loss,
                   "params": trainers[impl].params} for impl, t in times.items()}


def measure_memory(preset: str, impl: str, args: argparse.Namespace) -> float:
    """Peak memory in MiB of building and training one model for two steps (AdamW state exists by the second).

    CPU: growth of the process's peak RSS over the baseline after imports. CUDA: max_memory_allocated.
    """
    _setup(args)
    import torch

    baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is KiB on Linux
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(args.device)
    trainer = Trainer(preset, impl, args)
    for _ in range(2):
        trainer.step()
    if args.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(args.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - baseline_mb


def isolated(fn, *fn_args):
    """fn(*fn_args) in a fresh spawned process: its peak memory and allocator state are its own."""
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, fn_args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model before timing")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2, help="llama preset only (grouped-query); 0: = heads")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    results: dict[str, dict[str, dict]] = {}
    for preset in args.presets:
        results[preset] = isolated(measure_speed, preset, args)
        for impl in results[preset]:
            results[preset][impl]["peak_mb"] = isolated(measure_memory, preset, impl, args)

    memory = "peak CUDA MiB" if args.device.startswith("cuda") else "peak RSS delta MiB"
    print(f"device={args.device} dtype={args.dtype} compile={args.compile} layers={args.layers} "
          f"d_model={args.d_model} heads={args.heads} context={args.context} batch={args.batch} vocab={args.vocab} "
          f"steps={args.steps} (+{args.warmup} warmup; fastest step, models alternating)")
    print(f"{'preset':<7}{'model':<6}{'params':>11}{'tokens/s':>11}{'ms/step':>10}{'median ms':>11}{memory:>20}"
          f"{'final loss':>12}")
    summary: dict[str, float | str | bool] = {"device": args.device, "dtype": args.dtype, "compile": args.compile}
    for preset, r in results.items():
        for impl, m in r.items():
            print(f"{preset:<7}{impl:<6}{m['params']:>11,}{m['tokens_per_s']:>11.0f}{m['step_ms']:>10.1f}"
                  f"{m['median_step_ms']:>11.1f}{m['peak_mb']:>20.1f}{m['final_loss']:>12.4f}")
        x, h = r["xlab"], r["hf"]
        summary |= {f"{preset}_xlab_tokens_per_s": round(x["tokens_per_s"], 1),
                    f"{preset}_hf_tokens_per_s": round(h["tokens_per_s"], 1),
                    f"{preset}_xlab_peak_mb": round(x["peak_mb"], 1), f"{preset}_hf_peak_mb": round(h["peak_mb"], 1),
                    f"{preset}_loss_abs_diff": abs(x["final_loss"] - h["final_loss"]),
                    f"{preset}_xlab_median_step_ms": round(x["median_step_ms"], 1),
                    f"{preset}_hf_median_step_ms": round(h["median_step_ms"], 1),
                    f"{preset}_tokens_per_s_ratio": round(x["tokens_per_s"] / h["tokens_per_s"], 3),
                    f"{preset}_memory_ratio": round(h["peak_mb"] / max(x["peak_mb"], 1e-9), 3)}
        print(f"{preset:<13}XLab/HF tokens/s {summary[f'{preset}_tokens_per_s_ratio']:.3f} "
              f"({h['median_step_ms'] / x['median_step_ms']:.3f} from the median steps)   "
              f"HF/XLab memory {summary[f'{preset}_memory_ratio']:.3f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
