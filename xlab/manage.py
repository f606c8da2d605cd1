"""`manage.py`: maintenance commands on checkpoints (`manage.py COMMAND --help` for each).

  export-checkpoint  training checkpoint -> folder: safetensors weights, architecture, tokenizer
  export-hf          XLab checkpoint -> Hugging Face folder (GPT-2 or Llama architecture)
  import-hf          Hugging Face GPT-2 / Llama folder -> XLab exported checkpoint
  export-onnx        XLab checkpoint -> ONNX graph (optionally with a KV cache), run with onnxruntime
  inspect            print what a checkpoint holds
  extrapolate        loss and bits per byte by position, past the training context
  sweep              a grid of overrides x seeds over a base config, each member an xlab.py fit run
  compare            runs or sweeps side by side: a table with error bars over seeds, a plot, HParams

Outputs are written under a temporary name beside the target and renamed when complete: a failed
or interrupted command leaves nothing behind, and an existing output is kept unless --force.
Bad input (a missing or unreadable file, an unsupported architecture, an existing output) gives one
line `error: ...` on stderr and exit status 2, as in infer.py; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path

import torch

from xlab.checkpoint import (
    DTYPES,
    EXPORT_META,
    CheckpointError,
    check_output,
    export_checkpoint,
    load_checkpoint,
    read_checkpoint_file,
)


def _dtype(args: argparse.Namespace) -> torch.dtype | None:
    return DTYPES[args.dtype] if getattr(args, "dtype", None) else None


def _load(args: argparse.Namespace):
    loaded = load_checkpoint(args.ckpt, tokenizer=getattr(args, "tokenizer", None))
    loaded.meta["source"] = str(args.ckpt)
    return loaded


def cmd_export_checkpoint(args: argparse.Namespace) -> None:
    """Weights (safetensors), architecture and tokenizer in one folder, without optimizer state."""
    source = Path(args.ckpt)
    output = Path(args.output) if args.output else source.with_suffix("")
    check_output(output, args.force)  # before the (slow) load
    export_checkpoint(_load(args), output, force=args.force, dtype=_dtype(args))
    print(f"exported {source} -> {output}")


def cmd_export_hf(args: argparse.Namespace) -> None:
    """A Hugging Face folder that transformers' Auto classes load, for GPT-2- and Llama-shaped models."""
    from xlab.hf import export_hf

    check_output(args.output, args.force)
    export_hf(_load(args), args.output, force=args.force, dtype=_dtype(args))
    print(f"exported {args.ckpt} -> {args.output} (load with transformers.AutoModelForCausalLM.from_pretrained)")


def cmd_import_hf(args: argparse.Namespace) -> None:
    """A local Hugging Face GPT-2 or Llama folder -> an XLab exported checkpoint folder."""
    from xlab.hf import import_hf

    import_hf(args.source, args.output, force=args.force, dtype=_dtype(args), pad_vocab_to=args.pad_vocab_to)
    renamed = json.loads((Path(args.output) / EXPORT_META).read_text()).get("renamed_tokens") or {}
    for old, new in renamed.items():
        print(f"note: token {old!r} is named {new!r} in XLab (same id)")
    print(f"imported {args.source} -> {args.output}")


def cmd_export_onnx(args: argparse.Namespace) -> None:
    """An ONNX graph of the model (dynamic batch and sequence), optionally with past keys/values."""
    from xlab.onnx import export_onnx

    check_output(args.output, args.force)
    export_onnx(_load(args), args.output, kv_cache=args.kv_cache, opset=args.opset, force=args.force)
    print(f"exported {args.ckpt} -> {args.output}" + (" (with KV cache)" if args.kv_cache else ""))


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _files(files: list[Path]) -> list[str]:
    """The `files:` section: each file's size, and their total when there are several."""
    lines = ["files:"] + [f"  {f.name}: {_size(f.stat().st_size)} ({f.stat().st_size:,} bytes)" for f in files]
    if len(files) > 1:
        total = sum(f.stat().st_size for f in files)
        lines.append(f"  total: {_size(total)} ({total:,} bytes)")
    return lines


def describe_onnx(path: Path) -> str:
    """What `inspect` prints for an ONNX file: inputs, outputs, opset, KV cache, architecture, tokenizer, files."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)  # the graph only: weights may be gigabytes
    except Exception as err:  # protobuf's DecodeError: not an ONNX file
        raise CheckpointError(f"cannot read ONNX file {path}: {str(err).strip()}") from None

    def describe_value(value) -> str:  # "past_k: float32 (2, batch, 2, past, 8)"
        tensor = value.type.tensor_type
        dims = ", ".join(d.dim_param or str(d.dim_value) for d in tensor.shape.dim)
        return f"  {value.name}: {onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)} ({dims})"

    meta = {p.key: p.value for p in model.metadata_props}
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    opset = {o.domain: o.version for o in model.opset_import}.get("", "unknown")
    kv_cache = {i.name for i in inputs} >= {"past_k", "past_v"}
    lines = [f"{path} (ONNX graph)", "inputs:", *map(describe_value, inputs), "outputs:",
             *map(describe_value, model.graph.output), f"opset: {opset}", f"KV cache: {'yes' if kv_cache else 'no'}"]
    if "xlab.arch" in meta:
        lines += ["architecture:"] + [f"  {k}: {v}" for k, v in json.loads(meta["xlab.arch"]).items()]
    else:
        lines.append("architecture: unknown (not exported by XLab: no xlab.arch metadata)")
    if meta.get("xlab.tokenizer"):
        from xlab.tokenizer import Tokenizer

        tok = Tokenizer.from_str(meta["xlab.tokenizer"])
        lines += ["tokenizer:", f"  vocab size: {tok.vocab_size:,}",
                  f"  eos {tok.hf.id_to_token(tok.eos_id)!r} = {tok.eos_id}"]
    external = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    return "\n".join(lines + _files([path] + [path.parent / name for name in external]))


def describe_groups(path: Path, sizes: dict[str, int]) -> list[str]:
    """The optimizer's parameter groups in a training checkpoint: each group's name and optimizer (`xlab.optim.label`),
    tensors and parameters (`sizes` by name), base and current learning rate, weight decay, and its parameters'
    names, each block's once (`blocks.*.`). Checkpoints from before the names give counts only."""
    states = read_checkpoint_file(path).get("optimizer_states") or []
    lines = ["optimizer groups:"] if states else []
    for i, group in enumerate(states[0]["param_groups"] if states else []):
        names = group.get("param_names", [])
        by = f" ({group['optimizer']})" if "optimizer" in group else ""
        count = f", {sum(sizes[n] for n in names):,} parameters" if names else ""
        tensors = len(group["params"])
        lines.append(f"  {group.get('name', f'group {i}')}{by}: {tensors} tensor{'s' * (tensors != 1)}{count}, lr "
                     f"{group.get('initial_lr', group['lr']):g} (now {group['lr']:g}), weight decay "
                     f"{group.get('weight_decay', 0):g}")
        if names:
            listing = ", ".join(dict.fromkeys(re.sub(r"^blocks\.\d+\.", "blocks.*.", n) for n in names))
            lines += textwrap.wrap(listing, 116, initial_indent="    ", subsequent_indent="    ")
    return lines


def describe(path: str | Path) -> str:
    """What `inspect` prints: architecture, parameters, training state, optimizer groups, tokenizer, files."""
    path = Path(path)
    if path.is_file() and path.suffix == ".onnx":
        return describe_onnx(path)
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as err:
        if not path.is_file():
            raise
        raise CheckpointError(f"{err} (inspect reads a training checkpoint (.ckpt), an exported folder "
                              "or an .onnx file)") from None
    model, tok, meta = loaded.model, loaded.tokenizer, loaded.meta
    config = model.config
    kind = "exported folder" if path.is_dir() else "training checkpoint"
    lines = [f"{path} ({kind})", "architecture:"]
    lines += [f"  {k}: {v}" for k, v in config.__dict__.items()]
    lines += ["parameters:",
              f"  total: {model.num_params():,}",
              f"  without embeddings: {model.num_params(embeddings=False):,}"]
    val_loss = meta.get("val_loss")
    consumed = meta.get("consumed") or {}
    lines += ["training:",
              f"  optimizer steps: {meta.get('step', 'unknown')}",
              f"  windows drawn: {consumed['windows']:,} (epoch {consumed['epoch']}: {consumed['epoch_windows']:,})"
              if consumed else "  windows drawn: unknown",
              f"  tokens seen: {meta['tokens_seen']:,}" if isinstance(meta.get("tokens_seen"), int)
              else "  tokens seen: unknown",
              f"  validation loss: {val_loss:.4f}" if isinstance(val_loss, float) else "  validation loss: unknown"]
    if meta.get("imported_from"):
        lines.append(f"  imported from: {meta['imported_from']} ({meta.get('source')})")
    if path.is_file():
        lines += describe_groups(path, {name: p.numel() for name, p in model.named_parameters()})
    specials = {"eos": tok.eos_id, "bos": tok.bos_id, "pad": tok.pad_id}
    lines += ["tokenizer:", f"  vocab size: {tok.vocab_size:,}",
              "  special tokens: " + ", ".join(f"{role} {tok.hf.id_to_token(i)!r} = {i}"
                                              for role, i in specials.items())]
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return "\n".join(lines + _files(files))


def cmd_extrapolate(args: argparse.Namespace) -> None:
    """Loss and bits per byte by position, from 1 to --factor x the training context, on the val or test split of
    the data each checkpoint was trained on: a table (Markdown), a TensorBoard curve in the run's eval folder, and
    optionally a plot. Learned positions stop at the context (they cannot extend); sinusoidal, RoPE, ALiBi and no
    positions run past it. Several checkpoints (models trained alike) share the table and the plot."""
    from xlab.extrapolation import run

    run(args.ckpts, split=args.split, factor=args.factor, windows=args.windows, batch_size=args.batch_size,
        data=args.data, plot_path=args.plot, force=args.force, device=args.device)


def cmd_inspect(args: argparse.Namespace) -> None:
    """Architecture, parameter counts, training step, tokens seen, validation loss, the optimizer's parameter groups
    (which parameters each optimizer steps, at what learning rate), tokenizer, file sizes; for an .onnx file its
    inputs, outputs, opset and KV cache."""
    print(describe(args.ckpt))


def cmd_compare(args: argparse.Namespace) -> None:
    """Runs side by side: the config keys that differ between them, runs differing only by seed grouped, and a
    Markdown table of steps, tokens, wall time, tokens/s and the final and best val loss and bpb (mean ± std over
    seeds, with a 95-percent interval), the best group marked and its lead over the next tested against the seed
    noise (Welch's t-test). A sweep folder's members also get a TensorBoard HParams record."""
    from xlab.compare import compare

    compare(args.runs, plot_path=args.plot, x=args.x, steps_to=args.steps_to, force=args.force)


def cmd_sweep(args: argparse.Namespace) -> None:
    """A base config (-c files and ./xlab.py fit flags, passed through) expanded by a grid of overrides (--vary) and
    seeds (--seed_everything=0..N-1), each member an ordinary `./xlab.py fit` run in DIR/NAME/<member>/seed<k>/,
    the sweep described in DIR/NAME/sweep.json. Rerunning it skips finished members and resumes interrupted ones
    from their last.ckpt. --launcher slurm submits the members as a SLURM job array (submitit)."""
    from xlab.sweep import sweep

    base = [arg for config in args.config for arg in ("-c", config)] + args.fit_flags
    failed = sweep(base, args.vary, args.seeds, args.name, logs=args.logs, launcher=args.launcher,
                   dry_run=args.dry_run, slurm_time=args.slurm_time, slurm_partition=args.slurm_partition)
    if failed:  # a run that failed, not bad input: exit 1, as xlab.py's
        print(f"error: {len(failed)} member(s) failed ({', '.join(failed)}): rerun the same command to resume them",
              file=sys.stderr)
        sys.exit(1)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage too; one line is the contract (as infer.py's)
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="manage.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, run, ckpt_help="training checkpoint (.ckpt) or exported folder"):
        sub = commands.add_parser(name, help=run.__doc__, description=run.__doc__)
        if ckpt_help:
            sub.add_argument("ckpt", help=ckpt_help)
        sub.set_defaults(run=run)
        return sub

    def output_options(sub, dtype=True):
        if dtype:
            sub.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep)")
        sub.add_argument("--force", action="store_true", help="replace an existing output")

    sub = command("export-checkpoint", cmd_export_checkpoint)
    sub.add_argument("--output", help="output folder (default: the checkpoint's path without .ckpt)")
    sub.add_argument("--tokenizer", help="tokenizer.json or folder, for a checkpoint that carries none")
    output_options(sub)

    sub = command("export-hf", cmd_export_hf)
    sub.add_argument("output", help="Hugging Face folder to write")
    sub.add_argument("--tokenizer", help="tokenizer.json or folder, for a checkpoint that carries none")
    output_options(sub)

    sub = command("import-hf", cmd_import_hf, ckpt_help=None)
    sub.add_argument("source", help="local Hugging Face folder of a GPT-2 or Llama model (as save_pretrained writes)")
    sub.add_argument("output", help="XLab exported checkpoint folder to write")
    sub.add_argument("--pad-vocab-to", type=int, default=1,
                     help="round the embedding rows up to a multiple (64 helps GPU matmuls; default 1)")
    output_options(sub)
    sub.description += (" A tokenizer whose end-of-sequence token is not <|endoftext|> (Llama's </s>) gets "
                        "that token renamed to <|endoftext|>, and its beginning token to <|bos|>; ids are kept.")

    sub = command("export-onnx", cmd_export_onnx)
    sub.add_argument("output", help="ONNX file to write")
    sub.add_argument("--kv-cache", action="store_true",
                     help="inputs past_k/past_v and outputs present_k/present_v for incremental decoding")
    sub.add_argument("--opset", type=int, default=17, help="ONNX opset version (default 17)")
    sub.add_argument("--tokenizer", help="tokenizer.json or folder, for a checkpoint that carries none")
    output_options(sub, dtype=False)

    command("inspect", cmd_inspect)

    sub = command("extrapolate", cmd_extrapolate, ckpt_help=None)
    sub.add_argument("ckpts", nargs="+", metavar="CKPT", help="training checkpoints (.ckpt) or exported folders")
    sub.add_argument("--split", choices=("val", "test"), default="test", help="the split to measure (default test)")
    sub.add_argument("--factor", type=int, default=4, help="windows of FACTOR x the training context (default 4)")
    sub.add_argument("--windows", type=int, help="at most this many windows, spread over the split (default: all)")
    sub.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    sub.add_argument("--data", help="the prepared data folder (data_dir/<fingerprint>) to read the split from "
                                    "(default: the one the checkpoint was trained on)")
    sub.add_argument("--plot", help="write the curves to this PNG (needs matplotlib)")
    sub.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                     help="default: cuda when there is one")
    sub.add_argument("--force", action="store_true", help="replace an existing plot")

    sub = command("compare", cmd_compare, ckpt_help=None)
    sub.add_argument("runs", nargs="+", metavar="RUN_OR_SWEEP", help="run folders (logs/version_N) or sweep folders")
    sub.add_argument("--plot", metavar="PNG", help="write val bpb curves to this PNG (needs matplotlib)")
    sub.add_argument("--x", choices=("tokens", "time"), default="tokens", help="the plot's x axis (default tokens)")
    sub.add_argument("--steps-to", type=float, metavar="BPB",
                     help="add a column: the steps, tokens and wall time each group needs to reach this val bpb")
    sub.add_argument("--force", action="store_true", help="replace an existing plot")

    sub = command("sweep", cmd_sweep, ckpt_help=None)
    sub.allow_abbrev = False  # the flags passed through to xlab.py (--seed_everything) are not this command's
    sub.add_argument("-c", "--config", action="append", default=[], metavar="CONF",
                     help="config files, in order (other arguments go to ./xlab.py fit as they are)")
    sub.add_argument("--vary", action="append", default=[], required=True, metavar="KEY=V1,V2",
                     help="a config key and its values (repeat for a grid)")
    sub.add_argument("--seeds", type=int, default=1, help="seeds per grid point: --seed_everything=0..N-1 (default 1)")
    sub.add_argument("--name", required=True, help="the sweep's folder under --logs")
    sub.add_argument("--logs", default="logs", help="where the sweep's folder goes (default logs)")
    sub.add_argument("--launcher", choices=("local", "slurm"), default="local",
                     help="local: one member after another here (default); slurm: a SLURM job array (submitit)")
    sub.add_argument("--dry-run", action="store_true", help="print what would run or be submitted, run nothing")
    sub.add_argument("--slurm-time", type=int, default=240, metavar="MIN",
                     help="time limit of each SLURM job; a member past it is requeued and resumes (default 240)")
    sub.add_argument("--slurm-partition", help="SLURM partition (default: the cluster's)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, fit_flags = parser.parse_known_args(argv)
    if fit_flags and args.command != "sweep":  # only sweep passes arguments on (to xlab.py fit)
        parser.error(f"unrecognized arguments: {' '.join(fit_flags)}")
    args.fit_flags = fit_flags
    try:
        args.run(args)
    except (CheckpointError, ValueError, OSError) as err:
        # bad input (missing or corrupt files, unsupported architecture, existing output): one line
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted (nothing half-written was left behind)", file=sys.stderr)
        sys.exit(130)
