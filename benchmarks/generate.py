"""Generation speed: `xlab.generate` against Hugging Face `generate(use_cache=True)`, same model and weights.

For each preset a random Hugging Face model (gpt2: GPT2LMHeadModel, llama: LlamaForCausalLM, both
with SDPA attention) is converted to XLab with `xlab.convert`, so both compute the same function; a
greedy run checks that they produce the same tokens. Three cases, each generating exactly
--new-tokens tokens per prompt (no end-of-document token stops them):

- greedy_b1:  batch 1, greedy search;
- sample_b8:  batch 8, sampling with temperature 0.8, top-k 50, top-p 0.9;
- beam4_b1:   batch 1, beam search of width 4 (tokens/s counts the tokens of the best beam).

With --compile, XLab decodes on its static cache with the step compiled (CUDA graphs on CUDA); the one-off
compile time of each case and whether it gave the eager path's tokens (same seed) are printed too.

Each case also runs "bare": XLab's model forwards alone on the KV cache (a prefill, then one token at a
time) with as many rows as the case decodes (batch x beams) and no generation logic: the floor for any
decoding loop over this model. `*_share_of_bare_forward` is XLab's speed over it (1.0: no overhead).

With --onnx, the XLab model is also exported with a KV cache (`export-onnx --kv-cache`) and each case
runs on it in onnxruntime under the same `generate` (`xlab.onnx.OnnxModel`, fp32): `*_onnx_over_xlab` is
its speed over XLab's, `*_onnx_matches_xlab` whether it gave the same tokens (same seed, every case).

XLab and HF runs alternate, in one process, so load from other processes hits both alike; the median
of --repeats runs is reported. tokens/s = prompts x new tokens / wall time, prefill included.

    python benchmarks/generate.py                                   # CPU, fp32, gpt2 and llama
    python benchmarks/generate.py --device cuda --dtype bf16 --compile     # static cache + CUDA graphs
    python benchmarks/generate.py --onnx --presets gpt2 --cases greedy_b1      # onnxruntime beside XLab

Prints a table, then as its last line one JSON object; keys ending in `_ratio` are XLab tokens/s over
HF tokens/s (higher is better for XLab).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from xlab.convert import config_from_hf, state_dict_from_hf  # noqa: E402
from xlab.decoding import StaticCacheModel  # noqa: E402
from xlab.generate import GenerationConfig, generate  # noqa: E402
from xlab.kernels import OneDNNWeights  # noqa: E402
from xlab.transformer import KVCache, Transformer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CASES = {  # name: (batch, XLab config fields, HF generate kwargs)
    "greedy_b1": (1, {"strategy": "greedy"}, {"do_sample": False, "num_beams": 1}),
    "sample_b8": (8, {"strategy": "sample", "temperature": 0.8, "top_k": 50, "top_p": 0.9},
                  {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.9, "num_beams": 1}),
    "beam4_b1": (1, {"strategy": "beam", "num_beams": 4, "length_penalty": 1.0, "early_stopping": True},
                 {"do_sample": False, "num_beams": 4, "length_penalty": 1.0, "early_stopping": True}),
}


def build(preset: str, args: argparse.Namespace):
    """(HF model, XLab model) with the same weights, on args.device in args.dtype, in eval mode."""
    import transformers

    common = {"vocab_size": args.vocab, "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
    if preset == "gpt2":
        hf_config = transformers.GPT2Config(n_positions=args.context, n_embd=args.d_model, n_layer=args.layers,
                                            n_head=args.heads, **common)
        hf_class = transformers.GPT2LMHeadModel
    else:
        hf_config = transformers.LlamaConfig(
            hidden_size=args.d_model, intermediate_size=4 * args.d_model, num_hidden_layers=args.layers,
            num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
            max_position_embeddings=args.context, tie_word_embeddings=False, **common)
        hf_class = transformers.LlamaForCausalLM
    hf_config._attn_implementation = "sdpa"  # the attention kernel XLab uses
    torch.manual_seed(0)
    hf = hf_class(hf_config).eval()
    xlab = Transformer(config_from_hf(hf_config))
    xlab.load_state_dict(state_dict_from_hf(hf.state_dict(), hf_config))
    dtype = DTYPES[args.dtype]
    hf, xlab = hf.to(args.device, dtype), xlab.to(args.device, dtype).eval()
    hf.generation_config.eos_token_id = None  # generate exactly --new-tokens tokens
    hf.generation_config.pad_token_id = 0
    if args.hf_compile:
        hf.generation_config.cache_implementation = "static"  # HF's compiled generation path
    return hf, xlab


def onnx_model(xlab, path: Path, args: argparse.Namespace):
    """xlab exported with a KV cache to path and loaded in onnxruntime (an OnnxModel on args.device)."""
    from xlab.checkpoint import Loaded
    from xlab.onnx import OnnxModel, export_onnx
    from xlab.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(iter(["def add(a, b): return a + b"]), 300, show_progress=False)  # metadata only
    path = export_onnx(Loaded(xlab, tokenizer), path, kv_cache=True)
    return OnnxModel(path, device=args.device, threads=args.threads or None)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_case(hf, xlab, case: str, args: argparse.Namespace, onnx=None) -> tuple[dict[str, float], bool | None]:
    """Median tokens/s of each implementation over args.repeats alternating runs; whether onnx (an OnnxModel,
    or None) gave XLab's tokens (None without it)."""
    batch, xlab_fields, hf_kwargs = CASES[case]
    # --compile: the static cache and its compiled step (CUDA graphs on CUDA), compiled in the warmup run
    decoder = StaticCacheModel(xlab, report=lambda line: None) if args.compile else xlab
    prompts = torch.randint(1, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(1))
    config = GenerationConfig(max_new_tokens=args.new_tokens, compile=False, **xlab_fields)  # decoder decides
    input_ids = prompts.to(args.device)
    attention_mask = torch.ones_like(input_ids)

    def run_xlab():
        return generate(decoder, prompts.tolist(), config, torch.Generator(args.device).manual_seed(2))

    def run_hf():
        return hf.generate(input_ids, attention_mask=attention_mask, max_new_tokens=args.new_tokens,
                           min_new_tokens=0, use_cache=True, **hf_kwargs)

    rows = batch * xlab_fields.get("num_beams", 1)  # beam search decodes every beam of every prompt

    def run_bare():
        """The model alone on the KV cache with as many rows as the case decodes, no generation logic; its
        weights laid out for oneDNN once per run, as `generate` lays them out once per call."""
        cache = KVCache(xlab.config, rows, args.prompt + args.new_tokens, device=args.device,
                        dtype=next(xlab.parameters()).dtype)
        ids = input_ids[:1].expand(rows, -1)
        with OneDNNWeights():
            xlab(ids, cache)
            for _ in range(args.new_tokens - 1):
                xlab(ids[:, -1:], cache)

    def run_onnx():
        return generate(onnx, prompts.tolist(), config, torch.Generator(args.device).manual_seed(2))

    runners = [("xlab", run_xlab), ("hf", run_hf), ("bare", run_bare)] + ([("onnx", run_onnx)] if onnx else [])
    times: dict[str, list[float]] = {name: [] for name, _ in runners}
    outputs = {}
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            for name, fn in runners:
                sync(args.device)
                start = time.perf_counter()
                out = fn()
                sync(args.device)
                if i >= args.warmup:
                    times[name].append(time.perf_counter() - start)
                outputs[name] = out
                if name == "xlab":
                    assert all(len(c.tokens) == args.new_tokens for r in out for c in r), "XLab stopped early"
                elif name == "hf":
                    assert out.shape[1] == args.prompt + args.new_tokens, "HF stopped early"
    speed = {name: batch * args.new_tokens / statistics.median(t) for name, t in times.items()}
    if args.compile:  # the one-off compilation of the step for this case's row count, and the eager path's tokens
        speed["compile_seconds"] = next(iter(decoder.compile_seconds.values()))
        with torch.inference_mode():
            eager = generate(xlab, prompts.tolist(), config, torch.Generator(args.device).manual_seed(2))
        tokens = [[[c.tokens for c in row] for row in out] for out in (eager, outputs["xlab"])]
        speed["matches_eager"] = tokens[0] == tokens[1]
    return speed, (outputs["onnx"] == outputs["xlab"] if onnx else None)


def greedy_match(hf, xlab, args: argparse.Namespace) -> bool:
    """Whether both produce the same greedy tokens: a check that the comparison is like for like."""
    prompt = torch.randint(1, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(3))
    n = min(32, args.new_tokens)
    with torch.inference_mode():
        ref = hf.generate(prompt.to(args.device), max_new_tokens=n, do_sample=False)[0, args.prompt:].tolist()
    ours = generate(xlab, prompt.tolist(), GenerationConfig(strategy="greedy", max_new_tokens=n, compile=False))
    ours = ours[0][0].tokens
    return ours == ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", choices=["gpt2", "llama"], default=["gpt2", "llama"])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per implementation (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per implementation first")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=240)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2, help="llama preset only (grouped-query); 0: = heads")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--compile", action="store_true",
                        help="XLab decodes on its static cache with the compiled step (StaticCacheModel: CUDA graphs "
                             "on CUDA), compiled during the warmup; for GPUs: on a CPU it seldom pays")
    parser.add_argument("--hf-compile", action="store_true",
                        help="HF generate() on its static cache, compiled (cache_implementation='static')")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads, and onnxruntime's with --onnx (0: their defaults)")
    parser.add_argument("--onnx", action="store_true", help="also time the model exported to onnxruntime (fp32)")
    args = parser.parse_args()
    if args.onnx and (args.dtype != "fp32" or args.compile or args.hf_compile):
        parser.error("--onnx runs the float32 export: drop --dtype, --compile and --hf-compile")
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"device={args.device} dtype={args.dtype} compile={args.compile} hf_compile={args.hf_compile} "
          f"threads={torch.get_num_threads()} "
          f"layers={args.layers} d_model={args.d_model} heads={args.heads} vocab={args.vocab} "
          f"context={args.context} prompt={args.prompt} new_tokens={args.new_tokens} "
          f"(median of {args.repeats}, +{args.warmup} warmup, alternating)")
    print(f"{'preset':<7}{'case':<11}{'XLab tok/s':>12}{'HF tok/s':>12}{'XLab/HF':>9}")
    summary: dict[str, object] = {"device": args.device, "dtype": args.dtype, "compile": args.compile,
                                  "hf_compile": args.hf_compile}
    folder = tempfile.TemporaryDirectory()
    for preset in args.presets:
        hf, xlab = build(preset, args)
        summary[f"{preset}_greedy_matches_hf"] = greedy_match(hf, xlab, args)
        onnx = onnx_model(xlab, Path(folder.name) / f"{preset}.onnx", args) if args.onnx else None
        for case in args.cases:
            speed, onnx_matches = time_case(hf, xlab, case, args, onnx)
            ratio = speed["xlab"] / speed["hf"]
            print(f"{preset:<7}{case:<11}{speed['xlab']:>12.1f}{speed['hf']:>12.1f}{ratio:>9.2f}")
            if args.compile:
                print(f"{'':<7}{'  compiled':<11}in {speed['compile_seconds']:.1f} s, "
                      f"the eager path's tokens: {speed['matches_eager']}")
                summary |= {f"{preset}_{case}_compile_seconds": round(speed["compile_seconds"], 1),
                            f"{preset}_{case}_compiled_matches_eager": speed["matches_eager"]}
            summary |= {f"{preset}_{case}_xlab_tokens_per_s": round(speed["xlab"], 1),
                        f"{preset}_{case}_hf_tokens_per_s": round(speed["hf"], 1),
                        f"{preset}_{case}_tokens_per_s_ratio": round(ratio, 3)}
            # the floor: XLab's model forwards alone (tokens counted as the case counts them)
            bare = speed["bare"]
            print(f"{'':<7}{'  bare fwd':<11}{bare:>12.1f}{'':>12}{speed['xlab'] / bare:>9.2f}  (XLab / bare)")
            summary |= {f"{preset}_{case}_bare_forward_tokens_per_s": round(bare, 1),
                        f"{preset}_{case}_share_of_bare_forward": round(speed["xlab"] / bare, 3)}
            if onnx:
                ort_speed = speed["onnx"]
                print(f"{'':<7}{'  onnx':<11}{ort_speed:>12.1f}{'':>12}{ort_speed / speed['xlab']:>9.2f}  "
                      f"(onnxruntime / XLab, same tokens: {onnx_matches})")
                summary |= {f"{preset}_{case}_onnx_tokens_per_s": round(ort_speed, 1),
                            f"{preset}_{case}_onnx_over_xlab": round(ort_speed / speed["xlab"], 3),
                            f"{preset}_{case}_onnx_matches_xlab": onnx_matches}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
