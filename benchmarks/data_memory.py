"""Peak memory of the data path against corpus size: it must not grow with the corpus.

Two generated corpora (jsonl of synthetic documents with a Zipfian vocabulary), 10 MB and 200 MB by default.
For each, in fresh processes (so each peak is its own):
- prepare: `XLabDataModule.prepare_data()`: load into Arrow, split, train the tokenizer on a fixed-size
  sample (`tokenizer_train_bytes`), encode every split into the memory-mapped cache;
- train data path: what a training run does with data: `setup("fit")`, then `--batches` training batches
  (seeded shuffled windows over the whole corpus) and the validation batches.
Peak RSS is the kernel's high-water mark of the resident set (VmHWM); peak anon samples the anonymous part
of it (heap: what really grows) every 10 ms. They differ by pages of memory-mapped files that were read:
`datasets` reads the corpus through memory-mapped Arrow files, so while preparing, every page of the corpus
read once counts in RSS until the file is unmapped (the kernel reclaims such clean pages at will); the
training path remaps its token files every few reads, so its whole RSS stays flat.

    python benchmarks/data_memory.py                         # 10 MB vs 200 MB
    python benchmarks/data_memory.py --sizes-mb 2 20 --batches 50

Prints a table, then as its last line one JSON object; `train_rss_flat_ratio` (the target: >= 0.9, within
10%), `train_anon_flat_ratio`, `prepare_rss_flat_ratio` and `prepare_anon_flat_ratio` are the peak on the
small corpus over the peak on the large one (1.0 = flat; higher is better).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def generate(path: Path, megabytes: float, seed: int = 0) -> int:
    """Synthetic documents of 50-2000 Zipf-distributed words from a 30K-word vocabulary."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(30_000)]
    written, docs = 0, 0
    with open(path, "w") as f:
        while written < megabytes * 1e6:
            words = np.minimum(rng.zipf(1.2, size=rng.integers(50, 2000)), len(vocab)) - 1
            text = " ".join(vocab[w] for w in words) + "."
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            written += len(text)
            docs += 1
    return docs


def status() -> dict[str, float]:
    """Peak and current resident memory of this process, in MB, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


class PeakAnon(threading.Thread):
    """Samples anonymous resident memory every 10 ms: the kernel keeps a high-water mark for the whole
    resident set only, which also counts pages of memory-mapped files that were read."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = 0.0, True
        self.start()

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, status()["RssAnon"])
            time.sleep(0.01)

    def stop(self) -> float:
        self.running = False
        self.join()
        return max(self.peak, status()["RssAnon"])


def datamodule(args: argparse.Namespace, corpus: Path, folder: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from xlab.data import XLabDataModule

    return XLabDataModule(source=str(corpus), data_dir=str(folder / "data"), hf_datasets_cache=str(folder / "hf"),
                          vocab_size=args.vocab, tokenizer_train_bytes=args.tokenizer_bytes, context=args.context,
                          batch_size=args.batch_size, val_size=0.01, test_size=0.01, predict_size=4)


def prepare(args: argparse.Namespace, corpus: Path, folder: Path, out: mp.Queue) -> None:
    import datasets

    datasets.disable_progress_bars()
    dm = datamodule(args, corpus, folder)
    start, peak = time.perf_counter(), PeakAnon()
    dm.prepare_data()
    anon = peak.stop()
    tokens = json.loads((dm.cache_dir / "train.json").read_text())["tokens"]
    out.put({"seconds": time.perf_counter() - start, "tokens": tokens, "anon_peak": anon, **status()})


def train_path(args: argparse.Namespace, corpus: Path, folder: Path, out: mp.Queue) -> None:
    import torch  # what a training process has loaded anyway, before any data

    dm = datamodule(args, corpus, folder)
    before, peak = status(), PeakAnon()
    dm.setup("fit")
    checksum = 0
    for i, (x, _) in enumerate(dm.train_dataloader()):
        checksum += int(x[:, 0].sum())
        if i + 1 == args.batches:
            break
    for x, _ in dm.val_dataloader():
        checksum += int(x.sum())
    assert torch.is_tensor(x)
    anon = peak.stop()
    out.put({"windows": len(dm.windows["train"]), "baseline_mb": before["RssAnon"] + before["RssFile"],
             "anon_peak": anon, **status()})


def in_fresh_process(fn, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=fn, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs=2, default=[10, 200])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokenizer-bytes", type=int, default=5_000_000)
    args = parser.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes_mb:
            folder = Path(tmp) / f"{size:g}mb"
            folder.mkdir()
            corpus = folder / "corpus.jsonl"
            docs = generate(corpus, size)
            rows[size] = {"documents": docs, "prepare": in_fresh_process(prepare, args, corpus, folder),
                          "train": in_fresh_process(train_path, args, corpus, folder)}

    print(f"{'corpus':>8}{'docs':>8}{'tokens':>10}{'prepare s':>11}{'peak RSS':>10}{'peak anon':>11}"
          f"{'windows':>9}{'train peak RSS':>16}{'peak anon':>11}   (MB)")
    for size, row in rows.items():
        p, t = row["prepare"], row["train"]
        print(f"{size:>6g}MB{row['documents']:>8}{p['tokens']:>10}{p['seconds']:>11.1f}{p['VmHWM']:>10.0f}"
              f"{p['anon_peak']:>11.0f}{t['windows']:>9}{t['VmHWM']:>16.0f}{t['anon_peak']:>11.0f}")
    small, large = (rows[s] for s in args.sizes_mb)
    ratio = {f"{step}_{kind}_flat_ratio": round(small[step][key] / large[step][key], 3)
             for step in ("train", "prepare") for kind, key in (("rss", "VmHWM"), ("anon", "anon_peak"))}
    print(json.dumps({
        "sizes_mb": args.sizes_mb, "batches": args.batches,
        "train_peak_rss_mb": [round(rows[s]["train"]["VmHWM"], 1) for s in args.sizes_mb],
        "train_peak_anon_mb": [round(rows[s]["train"]["anon_peak"], 1) for s in args.sizes_mb],
        "prepare_peak_rss_mb": [round(rows[s]["prepare"]["VmHWM"], 1) for s in args.sizes_mb],
        "prepare_peak_anon_mb": [round(rows[s]["prepare"]["anon_peak"], 1) for s in args.sizes_mb],
        **ratio,
    }))


if __name__ == "__main__":
    main()
