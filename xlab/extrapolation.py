"""Length extrapolation: loss and bits per byte by position, up to `factor` x the training context.

`manage.py extrapolate CKPT [CKPT ...]` cuts the val or test split's tokens (the data the checkpoint was trained
on, encoded with its tokenizer) into windows of factor x context + 1 tokens, runs each window through the model in
one forward pass, and sums the next-token loss (nats) and the UTF-8 bytes of the target at each position over all
windows. Position p (1-based) is the prediction made after seeing p tokens. Learned positions have no row past
the context: they are measured on the first `context` tokens of the same windows, and the output says so.

bpb over positions = their summed nats / ln 2 / their summed target bytes (special tokens count 0 bytes).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from xlab.attention import figure_class
from xlab.checkpoint import (
    CheckpointError,
    Loaded,
    atomic_output,
    check_output,
    fresh_name,
    load_checkpoint,
    read_checkpoint_file,
    run_folder,
)
from xlab.tokenizer import Tokenizer
from xlab.transformer import Transformer
from xlab.windows import SplitTokens, read_manifest, token_dtype


@dataclass
class Curve:
    """Per-position sums of one model over the windows of a split."""

    label: str
    context: int  # the training context
    window: int  # tokens predicted per window: factor x context (what was asked)
    windows: int  # windows measured
    nats: np.ndarray  # (P,) float64: summed nats at positions 1..P; P = window, or the context for learned
    bytes: np.ndarray  # (P,) int64: summed UTF-8 bytes of the targets at positions 1..P

    @property
    def measured(self) -> int:
        return len(self.nats)

    def loss(self, lo: int, hi: int) -> float:
        """Mean nats per token over positions lo..hi (1-based, inclusive): every window has one token at each."""
        return float(self.nats[lo - 1:hi].sum() / (self.windows * (hi - lo + 1)))

    def bpb(self, lo: int, hi: int) -> float:
        """Bits per byte over positions lo..hi; NaN when their targets are all special tokens (no bytes)."""
        n_bytes = int(self.bytes[lo - 1:hi].sum())
        return float(self.nats[lo - 1:hi].sum() / math.log(2) / n_bytes) if n_bytes else math.nan


def window_starts(n_tokens: int, window: int, windows: int | None) -> np.ndarray:
    """Offsets of `windows` windows of window + 1 tokens in a split of n_tokens, spread evenly over it (all of them
    back to back when windows is None or more than fit). Refuses a split shorter than one window."""
    available = (n_tokens - 1) // window
    if available < 1:
        raise ValueError(f"the split has {n_tokens} tokens, fewer than one window of {window + 1} "
                         "(factor x context + 1): lower --factor, or use a larger split")
    n = available if windows is None else min(windows, available)
    return (np.arange(n) * available // n) * window


def measure(model: Transformer, tokens: np.ndarray, token_bytes: torch.Tensor, window: int, starts: np.ndarray,
            batch_size: int = 8, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed nats and target bytes at each position of the windows tokens[s : s + window + 1] for s in starts.

    The model sees min(window, its limit) tokens per window: the context for learned positions, else all.
    tokens: the split (N,) (a memmap: only the windows are read); token_bytes (V,): UTF-8 bytes per token id.
    Returns nats (P,) float64 and bytes (P,) int64, P the positions seen.
    """
    seen = min(window, model.config.context) if model.config.position == "learned" else window
    device = next(model.parameters()).device
    token_bytes = token_bytes.to(device)
    nats = torch.zeros(seen, dtype=torch.float64, device=device)
    n_bytes = torch.zeros(seen, dtype=torch.int64, device=device)
    with torch.no_grad(), tqdm(total=len(starts), desc=desc, unit="window", file=sys.stderr) as bar:
        for i in range(0, len(starts), batch_size):
            rows = np.stack([tokens[s:s + seen + 1] for s in starts[i:i + batch_size]]).astype(np.int64)
            batch = torch.from_numpy(rows).to(device)
            x, y = batch[:, :-1], batch[:, 1:]
            logits = model(x).float()  # (b, seen, V); fp32 for the loss under a bf16 model
            nats += F.cross_entropy(logits.transpose(1, 2), y, reduction="none").double().sum(0)
            n_bytes += token_bytes[y].sum(0)
            bar.update(len(x))
    return nats.cpu().numpy(), n_bytes.cpu().numpy()


def buckets(context: int, length: int) -> list[tuple[int, int]]:
    """Table rows (lo, hi), 1-based and inclusive: 1, 2, 3-4, 5-8, ... up to the context, then one context's
    worth at a time (C+1-2C, ...) up to length."""
    ends = [1]
    while ends[-1] * 2 < context:
        ends.append(ends[-1] * 2)
    ends += [context] if context > 1 else []
    ends += list(range(2 * context, length + 1, context))
    ends += [length] if ends[-1] < length else []
    return [(lo + 1, hi) for lo, hi in zip([0] + ends[:-1], ends, strict=True)]


def plot_bins(length: int, n: int = 64) -> list[tuple[int, int]]:
    """About n position bins (lo, hi), 1-based inclusive, of equal width on a log scale up to length: the first
    positions, where the loss falls fastest, one by one; far positions pooled (a single position's mean over
    a few hundred windows is noisy)."""
    edges = np.unique(np.round(np.geomspace(1, length + 1, n + 1)).astype(int))
    return [(int(lo), int(hi) - 1) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def _span(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}–{hi}"


def format_table(curves: list[Curve], split: str) -> str:
    """A Markdown table: a row per position bucket, then positions within and past the context, with loss
    (nats per token) and bpb per model; '–' where a model was not measured (learned past its context)."""
    context, length = curves[0].context, max(c.window for c in curves)
    rows = [(_span(lo, hi), lo, hi) for lo, hi in buckets(context, length)]
    rows.append((f"all 1–{context}", 1, context))
    if length > context:
        rows.append((f"all {context + 1}–{length}", context + 1, length))
    windows = sorted({c.windows for c in curves})
    lines = [f"{split} split, {'/'.join(map(str, windows))} windows of {length} tokens ({length // context} x the "
             f"training context of {context}); loss: nats per token, bpb: bits per byte",
             "| positions | " + " | ".join(f"{c.label} loss | {c.label} bpb" for c in curves) + " |",
             "|---" * (1 + 2 * len(curves)) + "|"]
    for name, lo, hi in rows:
        cells = [f"{c.loss(lo, hi):.3f} | {c.bpb(lo, hi):.3f}" if hi <= c.measured else "– | –" for c in curves]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: list[Curve], path: Path, split: str, force: bool = False) -> None:
    """Loss per token and bpb against position (log scale, `plot_bins`), a line per model, a dashed line at the
    training context. Written under a temporary name and renamed."""
    try:
        figure = figure_class("extrapolation plots")
    except ImportError as err:
        raise ValueError(str(err)) from None
    fig = figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    for curve in curves:
        bins = plot_bins(curve.measured)
        x = [(lo + hi) / 2 for lo, hi in bins]
        axes[0].plot(x, [curve.loss(lo, hi) for lo, hi in bins], label=curve.label)
        axes[1].plot(x, [curve.bpb(lo, hi) for lo, hi in bins], label=curve.label)
    for ax, what in zip(axes, ("loss (nats per token)", "bits per byte"), strict=True):
        ax.axvline(curves[0].context, color="grey", linestyle="--", linewidth=1, label="training context")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the window (tokens seen)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{split} split: {curves[0].windows} windows of {max(c.window for c in curves)} tokens")
    with atomic_output(path, force=force, is_dir=False) as tmp:
        fig.savefig(tmp / path.name, dpi=100, format="png")


def log_tensorboard(curve: Curve, log_dir: Path, split: str) -> None:
    """The curve as TensorBoard scalars `extrapolate/{split}/loss` and `/bpb`, one step per `plot_bins` bin,
    the step being the bin's last position."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for lo, hi in plot_bins(curve.measured):
            writer.add_scalar(f"extrapolate/{split}/loss", curve.loss(lo, hi), hi)
            writer.add_scalar(f"extrapolate/{split}/bpb", curve.bpb(lo, hi), hi)


def data_folder(ckpt: Path, meta: dict) -> Path:
    """The prepared data the checkpoint was trained on: `data_dir/<fingerprint>`, data_dir as its run recorded it
    (relative paths are the run's working directory), `data` for an export."""
    fingerprint = meta.get("data_fingerprint")
    if not fingerprint:
        raise CheckpointError(f"{ckpt} records no data fingerprint: pass the prepared data folder with --data")
    data_dir = "data"
    if ckpt.is_file():
        data_dir = (read_checkpoint_file(ckpt).get("datamodule_hyper_parameters") or {}).get("data_dir", data_dir)
    return Path(data_dir) / fingerprint


def split_tokens(folder: Path, split: str, tokenizer: Tokenizer) -> np.ndarray:
    """The split's token array (a memmap), checked complete and encoded with `tokenizer`."""
    manifest, why = read_manifest(folder, split, tokenizer.sha256())
    if manifest is None:
        raise CheckpointError(f"the {split} split in {folder} is {why}: prepare the run's data "
                              "(./xlab.py prepare_data -c <run>/config.yaml), or pass its folder with --data")
    return SplitTokens(folder / f"{split}.bin", folder / f"{split}.idx", token_dtype(tokenizer.vocab_size)).tokens


def eval_dir(ckpt: Path, split: str) -> Path:
    """`<run>/eval/extrapolate-...` for a checkpoint of a run folder (`<run>/checkpoints/`), as validate and test
    log; else an `eval/` folder beside the checkpoint. A second measurement in the same second gets `-2`."""
    folder = (run_folder(ckpt) or ckpt.parent) / "eval"
    return folder / fresh_name(folder, f"extrapolate-{split}-{time.strftime('%Y%m%d-%H%M%S')}-{ckpt.stem}")


def labels(loaded: list[Loaded], paths: list[Path]) -> list[str]:
    """Each model's position type; the checkpoint's path too where two share one."""
    kinds = [m.model.config.position for m in loaded]
    return [k if kinds.count(k) == 1 else f"{k} ({p})" for k, p in zip(kinds, paths, strict=True)]


def run(ckpts: list[str], split: str = "test", factor: int = 4, windows: int | None = None, batch_size: int = 8,
        data: str | None = None, plot_path: str | None = None, force: bool = False,
        device: str = "auto") -> list[Curve]:
    """What `manage.py extrapolate` does: measure each checkpoint, log its curve, print the table, plot."""
    for name, value in (("--factor", factor), ("--windows", windows or 1), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if plot_path:
        check_output(plot_path, force)  # before the slow work
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    paths = [Path(c) for c in ckpts]
    loaded = [load_checkpoint(p, device=device) for p in paths]
    contexts = sorted({m.model.config.context for m in loaded})
    if len(contexts) > 1:
        raise ValueError(f"the checkpoints have different contexts ({', '.join(map(str, contexts))}): "
                         "compare models trained with the same context")
    curves = []
    for path, model, label in zip(paths, loaded, labels(loaded, paths), strict=True):
        config = model.model.config
        window = factor * config.context
        tokens = split_tokens(Path(data) if data else data_folder(path, model.meta), split, model.tokenizer)
        starts = window_starts(len(tokens), window, windows)
        if config.position == "learned" and factor > 1:
            print(f"{label}: learned positions cannot extend past the context of {config.context}: measured "
                  f"positions 1–{config.context} only", file=sys.stderr)
        token_bytes = torch.tensor(model.tokenizer.token_bytes())
        nats, n_bytes = measure(model.model, tokens, token_bytes, window, starts, batch_size, desc=label)
        curve = Curve(label, config.context, window, len(starts), nats, n_bytes)
        log_dir = eval_dir(path, split)
        log_tensorboard(curve, log_dir, split)
        print(f"{label}: TensorBoard curve in {log_dir}", file=sys.stderr)
        curves.append(curve)
    print(format_table(curves, split))
    if plot_path:
        plot(curves, Path(plot_path), split, force)
        print(f"plot: {plot_path}", file=sys.stderr)
    return curves
