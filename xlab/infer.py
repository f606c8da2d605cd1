"""`./infer.py CKPT "PROMPT"`: generate text from a training checkpoint or an exported one.

It prints the prompt followed by its continuation. Sampling is the default (temperature 0.8,
top-k 50); --greedy (or --beam-width 1) and --beam-width N > 1 pick the other strategies. Options
that do not apply to the chosen strategy are an error. Without a prompt it reads prompts from stdin,
one per line, and streams a reply to each until end of input (Ctrl-D); when stdin is piped rather
than a terminal, each reply is followed by the line --- end of reply ---. A file from
`manage.py export-onnx` runs in onnxruntime (`--backend onnx`, the default for a .onnx path) with the
same strategies and options, --device cuda taking onnxruntime's CUDA provider (onnxruntime-gpu).
Bad input gives one line `error: ...` on stderr and exit status 2.

    ./infer.py exports/model "Once upon a time" --max-new-tokens 100
    ./infer.py runs/last.ckpt "The" --greedy
    ./infer.py exports/model "The" --beam-width 4 --num-samples 3
    ./infer.py exports/model                        # interactive
    ./infer.py model.onnx "The" --top-p 0.9 --seed 1
    ./infer.py exports/model "The cat sat" --attention maps.png --max-new-tokens 0   # attention maps only
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

SAMPLING_DEFAULTS = {"temperature": 0.8, "top_k": 50}
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")
DTYPES = ("auto", "fp32", "bf16", "fp16")
REPLY_END = "--- end of reply ---\n"  # piped mode: the line after each reply


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage too; one line is the contract
        raise UsageError(f"{message} (see --help)")


def build_parser() -> Parser:
    p = Parser(prog="infer.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", help="a training checkpoint (.ckpt), an exported folder, or an .onnx file")
    p.add_argument("prompt", nargs="?", help="text to continue; without it, read prompts from stdin")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="at most this many; learned positions stop at the context (default %(default)s)")
    strategy = p.add_argument_group("strategy (default: sampling)")
    strategy.add_argument("--greedy", action="store_true", help="greedy search")
    strategy.add_argument("--beam-width", type=int, help="beam search of this width (1: greedy search)")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, help=f"(default {SAMPLING_DEFAULTS['temperature']})")
    sampling.add_argument("--top-k", type=int, help=f"(default {SAMPLING_DEFAULTS['top_k']})")
    sampling.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1]")
    sampling.add_argument("--min-p", type=float, help="in [0, 1], relative to the most probable token")
    sampling.add_argument("--seed", type=int, help="the same seed gives the same text (on the same device)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 discourages repeats, any strategy (default %(default)s)")
    p.add_argument("--length-penalty", type=float, help="beam search: score = logprob / length**this (default 1)")
    p.add_argument("--num-samples", type=int, default=1,
                   help="sampling: independent samples; beam: the n best (default %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when available (default %(default)s)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="auto: bf16 on CUDA, fp32 on CPU (default %(default)s)")
    p.add_argument("--no-compile", action="store_true",
                   help="on CUDA, decode eagerly: no one-off compilation of the decoding step (by default on CUDA: "
                        "a static KV cache and one compiled step, replayed as a CUDA graph)")
    p.add_argument("--tokenizer", help="tokenizer.json (or its folder) replacing the checkpoint's own")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"], default="auto",
                   help="onnx: run an exported ONNX file in onnxruntime, float32; auto: onnx for a .onnx path "
                        "(default %(default)s)")
    p.add_argument("--attention", metavar="IMAGE",
                   help="also draw the prompt's attention maps, every layer and head (a long prompt: its first "
                        "tokens, as the title says), to this .png (or .pdf, .svg); with --max-new-tokens 0, only "
                        "the maps. Needs matplotlib")
    return p


def generation_config(args: argparse.Namespace, tokenizer):
    """The GenerationConfig the flags ask for; UsageError for flags that do not fit the strategy."""
    from xlab.generate import GenerationConfig

    beam_width = 1 if args.beam_width is None else args.beam_width
    if args.greedy and beam_width != 1:
        raise UsageError("--greedy and --beam-width > 1 are two different strategies: choose one")
    if beam_width < 1:
        raise UsageError(f"--beam-width must be >= 1, got {beam_width}")
    # a beam of width 1 keeps the most probable token at each step: greedy search
    strategy = "beam" if beam_width > 1 else "greedy" if args.greedy or args.beam_width == 1 else "sample"
    given = {name: getattr(args, name) for name in SAMPLING_ONLY if getattr(args, name) is not None}
    if strategy != "sample":
        misplaced = [f"--{name.replace('_', '-')}" for name in given] + (["--seed"] if args.seed is not None else [])
        verb = "applies" if len(misplaced) == 1 else "apply"
        if misplaced:
            flag = "--greedy" if args.greedy else "--beam-width 1" if beam_width == 1 else "--beam-width > 1"
            raise UsageError(f"{', '.join(misplaced)} only {verb} to sampling, not with {flag}")
    if args.length_penalty is not None and strategy != "beam":
        raise UsageError("--length-penalty only applies to beam search (--beam-width > 1)")
    if args.num_samples != 1 and strategy == "greedy":
        raise UsageError("--num-samples > 1 needs sampling or beam search: greedy search has one result")
    fields = {"strategy": strategy, "max_new_tokens": args.max_new_tokens,
              "repetition_penalty": args.repetition_penalty, "num_return_sequences": args.num_samples,
              "eos_id": tokenizer.eos_id, "bos_id": tokenizer.start_id, "pad_id": tokenizer.pad_id,
              "compile": False if args.no_compile else None}
    if strategy == "sample":
        fields |= SAMPLING_DEFAULTS | given
    if strategy == "beam":
        fields |= {"num_beams": beam_width, "length_penalty": 1.0 if args.length_penalty is None
                   else args.length_penalty}
    try:
        return GenerationConfig(**fields)
    except ValueError as err:  # name the flag rather than the config field
        message = str(err)
        for name in [*SAMPLING_ONLY, "max_new_tokens", "repetition_penalty", "num_return_sequences"]:
            flag = {"num_return_sequences": "num_samples"}.get(name, name)
            message = message.replace(name, f"--{flag.replace('_', '-')}")
        message = message.replace("beam width (num_beams)", "--beam-width").replace("strategy='greedy'", "--greedy")
        raise UsageError(message) from None


def load(args: argparse.Namespace):
    """(Loaded, device) for the checkpoint flags; UsageError for anything unreadable or unavailable."""
    import torch

    from xlab.checkpoint import load_checkpoint

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but CUDA is not available here (use --device cpu or auto)")
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    name = args.dtype if args.dtype != "auto" else "bf16" if device == "cuda" else "fp32"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    try:
        loaded = load_checkpoint(args.checkpoint, device=device, tokenizer=args.tokenizer, dtype=dtype)
    except (ValueError, OSError, RuntimeError) as err:  # CheckpointError is a ValueError
        raise UsageError(str(err).strip().splitlines()[0] if str(err).strip() else repr(err)) from None
    return loaded, device


def reply(model, tokenizer, prompt: str, config, generator, out, echo: bool = False) -> None:
    """Generate for one prompt and write the text to `out`: streamed for a single sequence.
    echo: write the prompt before each continuation (the one-shot command line does; interactive does not)."""
    from xlab.generate import TextStreamer, generate, stream

    ids = tokenizer.encode_prompt(prompt)
    head = prompt if echo else ""
    if config.strategy != "beam" and config.num_return_sequences == 1:
        streamer = TextStreamer(tokenizer)
        out.write(head)
        for token in stream(model, ids, config, generator):
            out.write(streamer.push(token))
            out.flush()
        out.write(streamer.flush() + "\n")
        out.flush()
        return
    [completions] = generate(model, [ids], config, generator)
    for i, completion in enumerate(completions, 1):
        if len(completions) > 1:
            kind = "beam" if config.strategy == "beam" else "sample"
            score = f" (score {completion.score:.4f})" if completion.score is not None else ""
            out.write(f"--- {kind} {i}{score} ---\n")
        out.write(head + tokenizer.decode(completion.tokens) + "\n")
    out.flush()


def interactive(respond: Callable[[str], None]) -> None:
    """Read prompts from stdin, one per line, passing each to `respond`, until end of input.
    Piped (stdin not a terminal), each reply is followed by REPLY_END, so replies that span lines stay apart."""
    tty = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # a text stream over bytes: a line that is not UTF-8 gets U+FFFD
        sys.stdin.reconfigure(errors="replace")
    if tty:
        print("Type a prompt and press Enter; Ctrl-D to quit.", file=sys.stderr)
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:  # end of input
            if tty:
                print(file=sys.stderr)
            return
        prompt = line.rstrip("\r\n")
        if prompt.strip():
            respond(prompt)
            if not tty:
                sys.stdout.write(REPLY_END)
                sys.stdout.flush()


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: bad input, reported as one `error:` line)."""
    showwarning, warnings.showwarning = warnings.showwarning, _warning_line
    try:
        return _run(build_parser().parse_args(argv))
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    finally:
        warnings.showwarning = showwarning


def _run(args: argparse.Namespace) -> int:
    maps_only = args.attention is not None and args.max_new_tokens == 0
    if args.attention is not None:
        check_attention(args)
    if args.max_new_tokens < 1 and not maps_only:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    if maps_only:
        check_maps_only(args)
    else:
        generation_config(args, _NoTokenizer())  # the flags, checked before the (slow) load
    onnx = args.backend == "onnx" or (args.backend == "auto" and str(args.checkpoint).endswith(".onnx"))
    respond = onnx_responder(args) if onnx else torch_responder(args)
    if args.prompt is None:
        interactive(respond)
    else:
        respond(args.prompt, echo=True)
    return 0


def torch_responder(args: argparse.Namespace) -> Callable[..., None]:
    """`respond(prompt, echo=False)` writing what the loaded checkpoint generates for the flags."""
    loaded, device = load(args)
    if args.attention is not None:
        write_attention(args.attention, loaded, args.prompt)
        if args.max_new_tokens == 0:
            return lambda prompt, echo=False: None
    return responder(args, loaded.model, loaded.tokenizer, device)


def onnx_responder(args: argparse.Namespace) -> Callable[..., None]:
    """`respond(prompt, echo=False)` writing what an `export-onnx` file, run by onnxruntime, generates for the
    flags: the torch backend's decoding (`xlab.generate`) on the graph's logits."""
    if args.dtype not in ("auto", "fp32"):
        raise UsageError("--backend onnx runs the exported float32 graph as it is: drop --dtype")
    from xlab.checkpoint import CheckpointError
    from xlab.onnx import OnnxModel, cuda_available
    from xlab.tokenizer import Tokenizer

    device = args.device if args.device != "auto" else "cuda" if cuda_available() else "cpu"
    try:
        model = OnnxModel(args.checkpoint, device=device)
        tokenizer = Tokenizer.load(args.tokenizer) if args.tokenizer else model.tokenizer
    except (CheckpointError, OSError, ValueError) as err:
        raise UsageError(str(err)) from None
    if tokenizer is None:
        raise UsageError(f"{args.checkpoint} carries no tokenizer: pass one with --tokenizer")
    return responder(args, model, tokenizer, device)


def responder(args: argparse.Namespace, model, tokenizer, device: str) -> Callable[..., None]:
    """`respond(prompt, echo=False)` generating with model (a Transformer or an OnnxModel) for the flags."""
    import torch

    config = generation_config(args, tokenizer)  # now with the tokenizer's special ids
    generator = torch.Generator(device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    return lambda prompt, echo=False: reply(model, tokenizer, prompt, config, generator, sys.stdout, echo)


def check_attention(args: argparse.Namespace) -> None:
    """--attention, checked before the (slow) load: UsageError unless a prompt, the torch backend, matplotlib
    and an image path in an existing folder are there."""
    if args.prompt is None:
        raise UsageError("--attention draws the prompt given on the command line, not interactive prompts")
    if args.backend == "onnx" or (args.backend == "auto" and str(args.checkpoint).endswith(".onnx")):
        raise UsageError("--attention needs the torch backend: an ONNX graph does not return attention weights")
    from xlab.attention import figure_class

    try:
        formats = figure_class()().canvas.get_supported_filetypes()
    except ImportError as err:
        raise UsageError(str(err)) from None
    path = Path(args.attention)
    if path.suffix.lstrip(".").lower() not in formats:
        raise UsageError(f"--attention {path}: name an image file ending in one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    if not path.parent.is_dir():
        raise UsageError(f"--attention {path}: the folder {path.parent} does not exist")


def check_maps_only(args: argparse.Namespace) -> None:
    """UsageError for generation flags given with --max-new-tokens 0, which generates nothing to apply them to."""
    defaults = build_parser()
    names = ["greedy", "beam_width", *SAMPLING_ONLY, "seed", "length_penalty", "num_samples", "repetition_penalty"]
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) != defaults.get_default(name)]
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise UsageError(f"{', '.join(given)} only {verb} to generation: --max-new-tokens 0 draws the attention "
                         "maps only")


def write_attention(path: str, loaded, prompt: str) -> None:
    """Draw the attention maps of `prompt`, encoded as it is for generation, to the image `path`."""
    from xlab.attention import prompt_figure

    figure = prompt_figure(loaded.model, loaded.tokenizer, loaded.tokenizer.encode_prompt(prompt))
    try:
        figure.savefig(path, dpi=120)
    except OSError as err:
        raise UsageError(f"--attention: cannot write {path}: {err.strerror or err}") from None
    print(f"attention maps: {path} ({figure.get_suptitle()})", file=sys.stderr)


class _NoTokenizer:
    """Special ids for checking the flags before the checkpoint (and its tokenizer) is loaded."""

    eos_id = start_id = pad_id = None


if __name__ == "__main__":
    sys.exit(main())
