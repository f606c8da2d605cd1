"""Encoding throughput: text into XLab's memory-mapped token cache, beside the encoder alone, for both engines.

On the built-in corpus (the Python standard library), with one tokenizer trained in this run, each row once with
`tokenizers` (hf) and once with `fastokens` (fast), the two `data.encoder` engines:
- raw: the engine's batch call over the documents already in memory, all cores (`Tokenizer.encode_batch` for hf,
  `Tokenizer.encode_flat`, what the pipeline calls, for fast): tokenization alone, the ceiling for any pipeline;
- xlab, N procs: `encode_split`, what `prepare_data` does for a split: read the documents from the
  memory-mapped Arrow dataset, encode (`Dataset.map`, batched, N processes), stream the ids into
  `{split}.bin` + `{split}.idx` and write the manifest;
- raw, N procs: tokenization alone in N forked processes, each with every N-th document: the ceiling for the
  N-process pipeline;
- raw and xlab on 1 core: in a forked process pinned to one core, whatever threads the engine starts: the unit
  from which a many-core machine is estimated.
Variants run interleaved, `--repeats` times each, keeping the best time (the machine may be shared).

    python benchmarks/encode.py                      # whole stdlib (~12 MB), 3 repeats, 2 processes
    python benchmarks/encode.py --max-documents 200 --repeats 1

Prints a table, then as its last line one JSON object. `fast_vs_hf_ratio` is the end-to-end `encode_split`
rate (one process) with fastokens over the same with tokenizers (target >= 5); `fast_ids_identical` is true when
both engines wrote the same token files (every document's ids) and raw encodings. `fast_other_costs_share` is the
part of the fast pipeline's time spent outside the encoder (Arrow reading, `Dataset.map`, writing the memmap;
target <= 1/3). `*_vs_raw_ratio` keys are XLab's end-to-end throughput over the raw engine's (higher is better).
`wikipedia_20gb_16core_hours_estimate` assumes 16 processes scale linearly from the one-core end-to-end rate
(encoding only; downloading and tokenizer training not included).
"""

from __future__ import annotations

import argparse
import filecmp
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
    """tokenizers' Rust thread pool, read at every call: on = all cores, off = one."""
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if on else "false"


def on_one_core(fn) -> float:
    """Seconds `fn` takes in a forked process pinned to one core, which every thread it starts shares: the engine's
    rate as one of N processes on N cores (fastokens sizes its thread pool once per process, so a setting in this
    one could not turn it off)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=timed_on_one_core, args=(fn, send))
    child.start()
    seconds = receive.recv()
    child.join()
    return seconds


def timed_on_one_core(fn, send) -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    start = time.perf_counter()
    fn()
    send.send(time.perf_counter() - start)


def variants(engine: str, tokenizer: Tokenizer, docs: datasets.Dataset, texts: list[str], folder: Path,
             procs: int) -> dict:
    """name -> (function, all cores?) for one engine; the xlab rows write their split to `folder`."""
    raw_call = tokenizer.encode_flat if engine == "fast" else tokenizer.encode_batch

    def raw() -> None:
        raw_call(texts)

    def raw_procs() -> None:
        # split over forked single-threaded processes (as Dataset.map(num_proc=N) runs it)
        with multiprocessing.get_context("fork").Pool(procs) as pool:
            pool.map(raw_call, [texts[i::procs] for i in range(procs)])

    def xlab(n: int):
        def run() -> None:
            encode_split(docs, tokenizer, folder, "train", n, key=f"bench{engine}{n}")
        return run

    return {f"{engine} raw": (raw, True), f"{engine} xlab 1 proc": (xlab(1), True),
            f"{engine} xlab {procs} procs": (xlab(procs), True), f"{engine} raw, {procs} procs": (raw_procs, False),
            f"{engine} raw, 1 core": (lambda: on_one_core(raw), False),
            f"{engine} xlab 1 proc, 1 core": (lambda: on_one_core(xlab(1)), False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-proc", type=int, default=2, help="processes of the N-process rows (data.num_proc)")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    logging.getLogger("xlab").setLevel(logging.WARNING)
    procs = args.num_proc

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = load_sources([Source("builtin:python-stdlib")], cache_dir=str(tmp / "hf"), limit=args.max_documents)
        texts = docs["text"][:]
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        threads(True)
        tokenizers = {"hf": Tokenizer.train(iter(texts), args.vocab, show_progress=False)}
        tokenizers["fast"] = Tokenizer(tokenizers["hf"].hf, encoder="fast")
        tokenizers["hf"].encoder = "hf"
        table = {}
        for engine, tokenizer in tokenizers.items():
            (tmp / f"tokens-{engine}").mkdir()
            table |= variants(engine, tokenizer, docs, texts, tmp / f"tokens-{engine}", procs)
        best = {name: float("inf") for name in table}
        for _ in range(args.repeats):
            for name, (fn, all_cores) in table.items():
                threads(all_cores)
                start = time.perf_counter()
                seconds = fn()  # the one-core rows time their child alone, not its start
                best[name] = min(best[name], seconds if seconds is not None else time.perf_counter() - start)
        tokens = json.loads((tmp / "tokens-hf" / "train.json").read_text())["tokens"]
        identical = (tokenizers["fast"].encode_batch(texts) == tokenizers["hf"].encode_batch(texts)
                     and all(filecmp.cmp(tmp / "tokens-hf" / f, tmp / "tokens-fast" / f, shallow=False)
                             for f in ("train.bin", "train.idx")))

    rate = {name: mb / seconds for name, seconds in best.items()}
    print(f"built-in corpus: {len(texts)} documents, {mb:.1f} MB, {tokens} tokens, vocab {args.vocab}, "
          f"{os.cpu_count()} CPUs, best of {args.repeats}")
    print(f"{'variant':<30}{'seconds':>10}{'MB/s':>10}{'vs raw':>10}")
    for name in table:
        engine = name.split()[0]
        peer = f"{engine} raw, 1 core" if "1 core" in name else f"{engine} raw, {procs} procs" if "procs" in name \
            else f"{engine} raw"
        print(f"{name:<30}{best[name]:>10.2f}{rate[name]:>10.2f}{rate[name] / rate[peer]:>10.2f}")
    figures = {"documents": len(texts), "megabytes": round(mb, 2), "tokens": tokens, "cpus": os.cpu_count(),
               "num_proc": procs}
    for engine in tokenizers:
        per_core = rate[f"{engine} xlab 1 proc, 1 core"]
        hours = 20e9 / (16 * per_core * 1e6) / 3600
        print(f"estimate ({engine}): English Wikipedia (~20 GB of text) on 16 cores at {per_core:.2f} MB/s per core: "
              f"{hours * 60:.1f} min")
        ratio = rate[f"{engine} xlab 1 proc"] / rate[f"{engine} raw"]
        figures |= {f"{engine}_raw_mb_s": round(rate[f"{engine} raw"], 3),
                    f"{engine}_encode_1proc_mb_s": round(rate[f"{engine} xlab 1 proc"], 3),
                    f"{engine}_encode_{procs}proc_mb_s": round(rate[f"{engine} xlab {procs} procs"], 3),
                    f"{engine}_raw_1core_mb_s": round(rate[f"{engine} raw, 1 core"], 3),
                    f"{engine}_encode_1core_mb_s": round(per_core, 3),
                    f"{engine}_encode_1proc_vs_raw_ratio": round(ratio, 3),
                    f"{engine}_encode_{procs}proc_vs_raw_{procs}proc_ratio": round(
                        rate[f"{engine} xlab {procs} procs"] / rate[f"{engine} raw, {procs} procs"], 3),
                    f"{engine}_wikipedia_20gb_16core_hours_estimate": round(hours, 3)}
    print(json.dumps(figures | {
        "fast_vs_hf_ratio": round(rate["fast xlab 1 proc"] / rate["hf xlab 1 proc"], 2),
        f"fast_vs_hf_{procs}proc_ratio": round(rate[f"fast xlab {procs} procs"] / rate[f"hf xlab {procs} procs"], 2),
        "fast_vs_hf_1core_ratio": round(rate["fast xlab 1 proc, 1 core"] / rate["hf xlab 1 proc, 1 core"], 2),
        "fast_other_costs_share": round(1 - best["fast raw"] / best["fast xlab 1 proc"], 3),
        "fast_ids_identical": identical,
    }))


if __name__ == "__main__":
    main()
