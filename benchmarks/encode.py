"""Encoding throughput: text into XLab's memory-mapped token cache, beside the tokenizer alone.

On the built-in corpus (the Python standard library), with one tokenizer trained in this run:
- raw: `Tokenizer.encode_batch` over the documents already in memory, all cores (tokenization alone: the
  ceiling for any pipeline using this tokenizer);
- xlab, N procs: `encode_split`, what `prepare_data` does for a split: read the documents from the
  memory-mapped Arrow dataset, encode (`Dataset.map`, batched, N processes), stream the ids into
  `{split}.bin` + `{split}.idx` and write the manifest;
- xlab, 1 proc 1 thread, and raw 1 thread: one core, the unit from which a many-core machine is estimated;
- raw, 2 procs: tokenization alone in 2 forked single-threaded processes, each with every other document:
  the ceiling for the 2-process pipeline.
Variants run interleaved, `--repeats` times each, keeping the best time (the machine may be shared).

    python benchmarks/encode.py                      # whole stdlib (~12 MB), 3 repeats
    python benchmarks/encode.py --max-documents 200 --repeats 1

Prints a table, then as its last line one JSON object. `encode_1proc_vs_raw_ratio` and
`encode_2proc_vs_raw_ratio` are XLab's end-to-end throughput over raw encode_batch throughput (higher is
better; target >= 0.8). `wikipedia_20gb_16core_hours_estimate` assumes 16 processes scale linearly from the
one-core end-to-end rate (encoding only; downloading and tokenizer training not included).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402

from xlab.data import encode_split  # noqa: E402
from xlab.sources import Source, load_sources  # noqa: E402
from xlab.tokenizer import Tokenizer  # noqa: E402


def threads(on: bool) -> None:
    """The tokenizer's Rust thread pool, read at every call: on = all cores, off = one."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if on else "false"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    logging.getLogger("xlab").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = load_sources([Source("builtin:python-stdlib")], cache_dir=str(tmp / "hf"), limit=args.max_documents)
        texts = docs["text"][:]
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        threads(True)
        tokenizer = Tokenizer.train(iter(texts), args.vocab, show_progress=False)

        def raw() -> None:
            tokenizer.encode_batch(texts)

        def raw_2procs() -> None:
            # tokenization alone split over 2 forked processes (as Dataset.map(num_proc=2) runs it): the
            # ceiling for any 2-process pipeline, below raw's Rust threads, which balance work per document
            with multiprocessing.get_context("fork").Pool(2) as pool:
                pool.map(tokenizer.encode_batch, [texts[0::2], texts[1::2]])

        def xlab(procs: int):
            def run() -> None:
                encode_split(docs, tokenizer, tmp, "train", procs, key=f"bench{procs}")
            return run

        variants = {"raw encode_batch": (raw, True), "xlab 1 proc": (xlab(1), True),
                    "xlab 2 procs": (xlab(2), True), "raw, 2 procs": (raw_2procs, False),
                    "raw encode_batch, 1 thread": (raw, False),
                    "xlab 1 proc, 1 thread": (xlab(1), False)}
        best = {name: float("inf") for name in variants}
        for _ in range(args.repeats):
            for name, (fn, all_cores) in variants.items():
                threads(all_cores)
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
        tokens = json.loads((tmp / "train.json").read_text())["tokens"]

    rate = {name: mb / seconds for name, seconds in best.items()}
    print(f"built-in corpus: {len(texts)} documents, {mb:.1f} MB, {tokens} tokens, vocab {args.vocab}, "
          f"{os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'variant':<28}{'seconds':>10}{'MB/s':>10}{'vs raw':>10}")
    for name in variants:
        reference = rate["raw encode_batch, 1 thread" if "1 thread" in name or "raw, 2" in name else "raw encode_batch"]
        print(f"{name:<28}{best[name]:>10.2f}{rate[name]:>10.2f}{rate[name] / reference:>10.2f}")
    per_core = rate["xlab 1 proc, 1 thread"]
    hours = 20e9 / (16 * per_core * 1e6) / 3600
    print(f"estimate: English Wikipedia (~20 GB of text) on 16 cores at {per_core:.2f} MB/s per core: {hours:.1f} h")
    print(json.dumps({
        "documents": len(texts), "megabytes": round(mb, 2), "tokens": tokens, "cpus": os.cpu_count(),
        "raw_mb_s": round(rate["raw encode_batch"], 3), "encode_1proc_mb_s": round(rate["xlab 1 proc"], 3),
        "encode_2proc_mb_s": round(rate["xlab 2 procs"], 3),
        "raw_1thread_mb_s": round(rate["raw encode_batch, 1 thread"], 3), "encode_1thread_mb_s": round(per_core, 3),
        "encode_1proc_vs_raw_ratio": round(rate["xlab 1 proc"] / rate["raw encode_batch"], 3),
        "encode_2proc_vs_raw_ratio": round(rate["xlab 2 procs"] / rate["raw encode_batch"], 3),
        "encode_1thread_vs_raw_1thread_ratio": round(per_core / rate["raw encode_batch, 1 thread"], 3),
        "raw_2proc_mb_s": round(rate["raw, 2 procs"], 3),
        "encode_2proc_vs_raw_2proc_ratio": round(rate["xlab 2 procs"] / rate["raw, 2 procs"], 3),
        "wikipedia_20gb_16core_hours_estimate": round(hours, 2),
    }))


if __name__ == "__main__":
    main()
