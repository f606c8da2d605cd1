"""`./infer.py` as a user runs it, on an exported checkpoint made here without any training: its text
against a full-forward greedy loop, its errors (one line, exit status 2) and its interactive mode."""

from __future__ import annotations

import importlib.util
import io
import itertools
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_script
from test_export import greedy_reference, one_thread

from xlab.checkpoint import Loaded, export_checkpoint
from xlab.generate import GenerationConfig, generate, stream
from xlab.infer import REPLY_END, SAMPLING_DEFAULTS, build_parser, generation_config, main
from xlab.tokenizer import Tokenizer
from xlab.transformer import Transformer, TransformerConfig

assert one_thread  # autouse fixture, imported to apply here (the in-process tests)
TEXTS = ["hello world, this is a small test", "the quick brown fox jumps over the lazy dog", "héllo wörld ✓"] * 4


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, Transformer, Tokenizer]:
    tokenizer = Tokenizer.train(iter(TEXTS), vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tokenizer.vocab_size, context=64, n_layers=2, n_heads=2,
                                          d_model=32, init_std=0.2)).eval()
    path = export_checkpoint(Loaded(model, tokenizer, {}), tmp_path_factory.mktemp("infer") / "export")
    return path, model, tokenizer


def greedy_text(model: Transformer, tokenizer: Tokenizer, prompt: str, n: int) -> str:
    """The reference: a full forward pass per token, no cache, stopping at end of document, from the prompt as a
    document starts in training: after the end-of-document token."""
    ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    return tokenizer.decode(greedy_reference(model, ids, n, tokenizer.eos_id, keep_eos=False))


def infer(*args, **kwargs):
    # one thread: a tiny model gains nothing from more, and they would contend on a busy machine
    return run_script("infer.py", *args, check=False, timeout=120, env={"OMP_NUM_THREADS": "1"}, **kwargs)


def test_greedy_output(export):
    path, model, tokenizer = export
    result = infer(path, "hello world", "--greedy", "--max-new-tokens", 25, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello world" + greedy_text(model, tokenizer, "hello world", 25) + "\n"


def test_interactive_mode_replies_to_each_line_until_eof(export):
    path, model, tokenizer = export
    result = infer(path, "--greedy", "--max-new-tokens", 12, input="the quick\n\nhéllo\n")
    assert result.returncode == 0, result.stderr
    # the empty line is skipped: one reply per prompt, in order, each followed by the marker (stdin is piped)
    expected = "".join(greedy_text(model, tokenizer, p, 12) + "\n" + REPLY_END for p in ["the quick", "héllo"])
    assert result.stdout == expected


def in_process(capsys, *args) -> tuple[int, str, str]:
    """infer.py's `main` called here: its exit status, stdout and stderr."""
    status = main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_sampling_defaults_and_seed_and_beams_give_n_best(export, capsys):
    path, model, tokenizer = export
    status, out, err = in_process(capsys, path, "the", "--seed", 3, "--max-new-tokens", 15, "--top-p", 0.9)
    assert status == 0, err
    # the documented defaults (temperature 0.8, top-k 50) and the seed, as the library applies them
    config = GenerationConfig(strategy="sample", max_new_tokens=15, temperature=0.8, top_k=50, top_p=0.9,
                              eos_id=tokenizer.eos_id, bos_id=tokenizer.bos_id, pad_id=tokenizer.pad_id)
    prompt = [tokenizer.eos_id, *tokenizer.encode("the")]  # as a document starts in training
    [[sampled]] = generate(model, [prompt], config, torch.Generator().manual_seed(3))
    assert out == "the" + tokenizer.decode(sampled.tokens) + "\n"
    status, out, err = in_process(capsys, path, "the", "--beam-width", 3, "--num-samples", 2, "--max-new-tokens", 8)
    assert status == 0, err
    assert [line.split(" (")[0] for line in out.splitlines() if line.startswith("---")] == \
        ["--- beam 1", "--- beam 2"]


def test_no_compile_turns_off_the_compiled_decoding():
    """By default the library decides (compiled static-cache decoding on CUDA); --no-compile is eager anywhere."""
    tokenizer = SimpleNamespace(eos_id=1, start_id=1, pad_id=0)
    for flags, compile in (([], None), (["--no-compile"], False)):
        assert generation_config(build_parser().parse_args(["ckpt", "hi", *flags]), tokenizer).compile is compile


@pytest.mark.parametrize("args, message", [
    (["--greedy", "--top-k", "5"], "error: --top-k only applies to sampling, not with --greedy"),
    (["--top-p", "1.5"], "error: --top-p must be in (0, 1], got 1.5"),
    (["--temperature", "0"], "error: --temperature must be > 0 for sampling, got 0.0"),
    (["--beam-width", "3", "--temperature", "0.7"], "error: --temperature only applies to sampling"),
    (["--beam-width", "3", "--top-k", "5", "--seed", "1"], "error: --top-k, --seed only apply to sampling"),
    (["--greedy", "--length-penalty", "2"], "error: --length-penalty only applies to beam search"),
    (["--min-p", "2"], "error: --min-p must be in [0, 1], got 2.0"),
    (["--beam-width", "0"], "error: --beam-width must be >= 1"),
    (["--beam-width", "2", "--num-samples", "3"], "error: --num-samples=3 exceeds the beam width 2"),
    (["--greedy", "--num-samples", "2"], "error: --num-samples > 1 needs sampling or beam search"),
    (["--repetition-penalty", "0"], "error: --repetition-penalty must be > 0"),
    (["--top-k", "many"], "error: argument --top-k: invalid int value: 'many'"),
])
def test_bad_options_are_one_line_errors(export, capsys, args, message):
    """The entry point of infer.py, called in-process (test_greedy_output runs the script itself)."""
    assert main([str(export[0]), "hello", *args]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""


def test_missing_checkpoint_and_mismatched_tokenizer(export, tmp_path, capsys):
    status, _, err = in_process(capsys, tmp_path / "nowhere", "hello")
    assert status == 2
    assert err.startswith("error: checkpoint not found") and err.count("\n") == 1
    big = Tokenizer.train(iter(TEXTS * 20 + [" ".join(map(str, range(2000)))]), vocab_size=600, show_progress=False)
    assert big.vocab_size > export[2].vocab_size
    big.save(tmp_path / "big.json")
    status, _, err = in_process(capsys, export[0], "hello", "--tokenizer", tmp_path / "big.json")
    assert status == 2
    assert err.startswith("error: ") and "does not belong" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of infer.py's entry point called in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_beam_width_1_is_greedy_search(export, capsys):
    path, model, tokenizer = export
    code, out, err = run_main(capsys, path, "the quick", "--beam-width", 1, "--max-new-tokens", 20)
    assert code == 0, err
    assert out == "the quick" + greedy_text(model, tokenizer, "the quick", 20) + "\n"
    code, _, err = run_main(capsys, path, "the", "--beam-width", 1, "--temperature", 0.7)
    assert code == 2 and err == "error: --temperature only applies to sampling, not with --beam-width 1\n"


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])  # Python's stdin: UTF-8 locale, C/POSIX locale
def test_piped_prompt_that_is_not_utf8_is_decoded_with_replacement(export, capsys, monkeypatch, errors):
    path, model, tokenizer = export
    data = b"h\xe9llo \xff world\nthe quick\n"  # Latin-1 bytes on the first line
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=errors))
    code, out, err = run_main(capsys, path, "--greedy", "--max-new-tokens", 10)
    assert code == 0, err
    prompts = [data.splitlines()[0].decode("utf-8", errors="replace"), "the quick"]
    assert out == "".join(greedy_text(model, tokenizer, p, 10) + "\n" + REPLY_END for p in prompts)


def test_piped_replies_end_with_a_marker_that_help_describes(export, capsys, monkeypatch):
    path, model, tokenizer = export
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"def \nclass \n"), encoding="utf-8"))
    code, out, err = run_main(capsys, path, "--greedy", "--max-new-tokens", 12)
    assert code == 0, err
    assert out == "".join(greedy_text(model, tokenizer, p, 12) + "\n" + REPLY_END for p in ["def ", "class "])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert f"followed by the line {REPLY_END.strip()}" in " ".join(capsys.readouterr().out.split())


def test_help_shows_every_default_the_parser_uses(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split()).split(" options: ")[1]  # past the usage line
    parser = build_parser()
    for flag, value in [("--max-new-tokens", parser.get_default("max_new_tokens")),
                        ("--temperature", SAMPLING_DEFAULTS["temperature"]), ("--top-k", SAMPLING_DEFAULTS["top_k"]),
                        ("--repetition-penalty", parser.get_default("repetition_penalty")),
                        ("--num-samples", parser.get_default("num_samples")),
                        ("--device", parser.get_default("device")), ("--backend", parser.get_default("backend"))]:
        # the flag, its metavar, then "(default ...)" before the next flag's help begins
        assert re.search(rf"{flag} [^ ]+ (?:(?! --).)*\(default {value}\)", help_text), flag


def test_max_new_tokens_beyond_the_positions_stops_at_the_context(export, capsys):
    """Learned positions end at the context (64): a huge --max-new-tokens gives what fits, with the
    warning, instead of allocating for two billion tokens."""
    path, model, tokenizer = export
    prompt = [tokenizer.eos_id, *tokenizer.encode("hello world")]
    fits = model.config.context - len(prompt) + 1  # the last token is predicted at position context - 1
    code, out, err = run_main(capsys, path, "hello world", "--greedy", "--max-new-tokens", 2_000_000_000)
    assert code == 0, err
    assert out == "hello world" + greedy_text(model, tokenizer, "hello world", fits) + "\n"
    assert err.startswith("warning: stopped at the context of 64 tokens"), err
    code, out, err = run_main(capsys, path, "hello world", "--beam-width", 2, "--max-new-tokens", 2_000_000_000)
    assert code == 0, err
    config = GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=fits, eos_id=tokenizer.eos_id,
                              pad_id=tokenizer.pad_id)
    [[best]] = generate(model, [prompt], config)
    assert out == "hello world" + tokenizer.decode(best.tokens) + "\n"


def test_unbounded_max_new_tokens_with_sliding_positions_streams(export):
    """RoPE slides past the context: a huge max_new_tokens streams (memory grows with what is generated)."""
    tokenizer = export[2]
    torch.manual_seed(1)
    model = Transformer(TransformerConfig(vocab_size=tokenizer.vocab_size, context=16, n_layers=1, n_heads=2,
                                          d_model=32, position="rope", init_std=0.2)).eval()
    prompt = tokenizer.encode("the quick")
    n = 70  # several times the context, and past the first allocation
    ids = list(prompt)
    with torch.no_grad():  # the reference: a full forward over the last `context` tokens per step
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids[-model.config.context:]]))[0, -1].argmax()))
    huge = GenerationConfig(strategy="greedy", max_new_tokens=2_000_000_000)  # no eos: only the length stops it
    with pytest.warns(UserWarning, match="sliding the window"):
        streamed = list(itertools.islice(stream(model, prompt, huge), n))
        # beam search's finished pool grows with the decoder; a beam of width 1 is greedy search
        [[beam]] = generate(model, [prompt], GenerationConfig(strategy="beam", num_beams=1, max_new_tokens=n))
    assert streamed == ids[len(prompt):] == beam.tokens
    # a left-padded batch (its padding mask grows too): each row as when generated alone, without padding
    prompts = [prompt, tokenizer.encode("héllo wörld ✓ and more")]
    config = GenerationConfig(strategy="greedy", max_new_tokens=n)
    with pytest.warns(UserWarning, match="sliding the window"):
        batch = generate(model, prompts, config)
        alone = [generate(model, [p], config)[0] for p in prompts]
    assert batch == alone


def test_an_empty_prompt_starts_after_an_end_of_document_token(export, capsys):
    """The data pipeline puts <|endoftext|> between documents; <|bos|> never appears in training. An empty prompt
    is the start of a document: its continuation is the greedy text after the end-of-document token."""
    path, model, tokenizer = export
    assert tokenizer.bos_id != tokenizer.eos_id  # XLab's tokenizers define an (unused) <|bos|>
    status, out, err = in_process(capsys, path, "", "--greedy", "--max-new-tokens", 12)
    assert status == 0, err
    expected = greedy_reference(model, [tokenizer.eos_id], 12, tokenizer.eos_id, keep_eos=False)
    assert out == tokenizer.decode(expected) + "\n"


def llama_style(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with a post-processor that puts its BOS before every encoding, as an imported Llama's does."""
    from tokenizers import processors

    llama = Tokenizer.from_str(tokenizer.to_str())
    llama.hf.post_processor = processors.TemplateProcessing(single="<|bos|> $A",
                                                            special_tokens=[("<|bos|>", llama.bos_id)])
    return llama


def document_start(tokenizer: Tokenizer, text: str) -> list[int]:
    """The reference: the ids before and at the start of `text` when it begins a document. XLab's data joins
    encoded documents (`xlab.data.encode_documents`) into one stream, so a document follows the previous one's
    end-of-document token; a tokenizer that puts its own BOS before a text (Llama's <s>) starts it with that
    instead, once, as transformers' tokenizer encodes a prompt."""
    import numpy as np
    import pyarrow as pa

    from xlab.data import encode_documents

    if tokenizer.hf.post_processor is not None:
        return tokenizer.hf.encode(text, add_special_tokens=True).ids
    batch = pa.table({"text": ["an earlier document", text]})
    stream = sum(encode_documents(batch, tokenizer, np.dtype(np.uint32)).column("ids").to_pylist(), [])
    return stream[stream.index(tokenizer.eos_id):-1]


def first_input(model: torch.nn.Module, run: Callable[[], object]) -> list[int]:
    """The token ids of the first forward pass of `model` (batch row 0) while `run()` uses it."""
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(args[0][0].tolist()))
    try:
        run()
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("style", ["xlab", "llama"])
def test_a_prompt_reaches_the_model_as_the_same_ids_on_every_path(export, tmp_path, style):
    """predict, infer.py, the training samples, the attention maps and the lm-eval model all give the model a
    prompt as it starts a document in training: after the end-of-document token, or after the tokenizer's own BOS
    (once, not twice)."""
    from xlab.callbacks import AttentionMaps
    from xlab.infer import reply, write_attention
    from xlab.module import LanguageModel

    _, model, tokenizer = export
    tokenizer = llama_style(tokenizer) if style == "llama" else tokenizer
    path = export_checkpoint(Loaded(model, tokenizer, {}), tmp_path / "export")
    prompt = "the quick brown"
    module = LanguageModel(model.config, sample_prompts=[prompt], sample_tokens=2,
                           generation=GenerationConfig(strategy="greedy", max_new_tokens=2))
    module.model = model
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(tokenizer=tokenizer), loggers=[], global_step=0,
                                     sanity_checking=False, is_global_zero=True)
    greedy = GenerationConfig(strategy="greedy", max_new_tokens=2, eos_id=tokenizer.eos_id)
    runs = {
        "predict": lambda: module.predict_step({"text": [prompt], "ids": [torch.tensor(tokenizer.encode(prompt))]}, 0),
        "infer": lambda: reply(model, tokenizer, prompt, greedy, torch.Generator(), io.StringIO()),
        "infer --attention": lambda: write_attention(str(tmp_path / "maps.png"), Loaded(model, tokenizer, {}), prompt),
        "log_samples": lambda: module.log_samples(model),
        "AttentionMaps": lambda: AttentionMaps([prompt]).on_validation_epoch_end(module.trainer, module),
    }
    ids = {name: first_input(model, run) for name, run in runs.items()}
    if importlib.util.find_spec("lm_eval") is not None:
        from lm_eval.api.instance import Instance
        from lm_eval.api.registry import get_model

        import xlab.harness  # noqa: F401  (registers "xlab")

        lm = get_model("xlab")(checkpoint=str(path), device="cpu")
        request = Instance("generate_until", {}, (prompt, {"until": ["\n"], "max_gen_toks": 2}), 0)
        ids["harness"] = first_input(lm.model, lambda: lm.generate_until([request], disable_tqdm=True))
    expected = document_start(tokenizer, prompt)
    assert expected[0] == tokenizer.start_id and expected.count(tokenizer.start_id) == 1
    assert ids == dict.fromkeys(ids, expected)
