"""export-onnx, held to onnxruntime: logits equal PyTorch's within 1e-4 for any batch and length, the
cache graph continues sequences exactly (left-padded rows too), and every strategy of xlab.generate run on
the graph in onnxruntime (`OnnxModel`) gives PyTorch's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_export import greedy_reference, make_training_checkpoint, one_thread, tiny_config, tiny_tokenizer

from xlab.checkpoint import load_checkpoint
from xlab.manage import main

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

assert one_thread  # autouse fixture, imported to apply here
CONFIGS = {
    "gpt2": {},
    "llama": {},  # RoPE, RMSNorm, SwiGLU, grouped-query attention
    # every option the Hugging Face formats lack: ALiBi, post-norm, QK-norm, ReLU, no final norm, untied, padded vocab
    "other": dict(position="alibi", prenorm=False, qk_norm=True, mlp="relu", final_norm=False, tie_embeddings=False,
                  n_kv_heads=1, pad_vocab_to=64),
    "sinusoidal": dict(position="sinusoidal", norm="rmsnorm", bias=False, mlp="gelu"),
    # the speedrun's options (the zero projections only start the weights, which the checkpoint randomises)
    "speedrun": dict(mlp="relu2", logit_softcap=2.0, zero_init_proj=True),
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # see one_thread
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_cache_match_pytorch(tmp_path, tok, name):
    preset = name if name in ("gpt2", "llama") else "gpt2"
    model = make_training_checkpoint(tmp_path / "run.ckpt", tiny_config(preset, tok.vocab_size, **CONFIGS[name]), tok)
    c = model.config
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "plain.onnx")])
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "kv.onnx"), "--kv-cache"])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tok.vocab_size, (3, 12), generator=gen)
    with torch.no_grad():
        expected = model(ids).numpy()

    plain = session(tmp_path / "plain.onnx")
    for rows, length in [(3, 12), (1, 1), (2, 7)]:  # batch and sequence are dynamic, is_causal holds for each
        (logits,) = plain.run(None, {"input_ids": ids[:rows, :length].numpy()})
        assert logits.shape == (rows, length, c.vocab_size)
        np.testing.assert_allclose(logits, model(ids[:rows, :length]).detach().numpy(), rtol=0, atol=1e-4)

    # with the cache: prefill 5, then 1, 1, 1, then a chunk of 4, each against the full forward's positions
    kv = session(tmp_path / "kv.onnx")
    past = np.zeros((c.n_layers, 3, c.kv_heads, 0, c.head_dim), np.float32)
    past_k = past_v = past
    start = 0
    for step in (5, 1, 1, 1, 4):
        positions = np.arange(start, start + step)[None].repeat(3, 0)
        feed = {"input_ids": ids[:, start:start + step].numpy(), "positions": positions,
                "key_mask": np.ones((3, start + step), bool), "past_k": past_k, "past_v": past_v}
        logits, past_k, past_v = kv.run(None, feed)
        start += step
        assert past_k.shape == past_v.shape == (c.n_layers, 3, c.kv_heads, start, c.head_dim)
        np.testing.assert_allclose(logits, expected[:, start - step:start], rtol=0, atol=1e-4)

    # left padding: row 1 holds its first 9 tokens after 3 pads, row 0 all 12; each row's logits are those
    # of its tokens alone (the full forward above), prefilled 8 and then continued by 4
    padded = torch.cat([ids[:1], torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[1:2, :9]], 1)])
    real = np.ones((2, 12), bool)
    real[1, :3] = False
    positions = (real.cumsum(1) - 1).clip(min=0)
    past_k = past_v = past[:, :2]
    for lo, hi in ((0, 8), (8, 12)):
        feed = {"input_ids": padded[:, lo:hi].numpy(), "positions": positions[:, lo:hi], "key_mask": real[:, :hi],
                "past_k": past_k, "past_v": past_v}
        logits, past_k, past_v = kv.run(None, feed)
        np.testing.assert_allclose(logits[0], expected[0, lo:hi], rtol=0, atol=1e-4)
        np.testing.assert_allclose(logits[1, max(3 - lo, 0):], expected[1, max(lo - 3, 0):hi - 3], rtol=0, atol=1e-4)

    for graph in (onnx.load(tmp_path / "plain.onnx"), onnx.load(tmp_path / "kv.onnx")):
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
        assert dims["input_ids"] == ["batch", "sequence"]
        if "past_k" in dims:
            assert dims["past_k"] == [c.n_layers, "batch", c.kv_heads, "past", c.head_dim]
            assert dims["positions"] == ["batch", "sequence"] and dims["key_mask"] == ["batch", "total"]


# prompts of 10, 2 and 3 tokens: a batch left-padded to 10
PROMPTS = ["def add(x, y):", "class", "import os"]
STRATEGIES = {
    "greedy": dict(strategy="greedy"),
    "beam": dict(strategy="beam", num_beams=3, num_return_sequences=2, length_penalty=0.7),
    "sample": dict(strategy="sample", temperature=1.5, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.3,
                   num_return_sequences=2),
}


def compare(model, onnx_model, prompts, strategy, seed=0, max_new_tokens=12):
    """Generate with both models; returns the torch completions after asserting the ONNX ones equal them:
    the same tokens and ends (given equal logits, the same draws of the same generator), scores within 1e-4."""
    from xlab.generate import GenerationConfig, generate

    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_id=2, **STRATEGIES[strategy])
    expected = generate(model, prompts, config, torch.Generator().manual_seed(seed))
    got = generate(onnx_model, prompts, config, torch.Generator().manual_seed(seed))
    for e, g in zip(expected, got, strict=True):
        assert [(c.tokens, c.finished) for c in g] == [(c.tokens, c.finished) for c in e], (strategy, seed)
        if strategy == "beam":
            np.testing.assert_allclose([c.score for c in g], [c.score for c in e], rtol=0, atol=1e-4)
    return expected


@pytest.mark.parametrize("name", ["gpt2", "llama", "other"])
def test_every_strategy_in_onnxruntime_gives_pytorchs_tokens(tmp_path, tok, name):
    """Batched prompts of different lengths, left-padded, on the cache graph: greedy search, beam search
    and sampling (top-k, top-p, min-p, repetition penalty, several samples per prompt) give the tokens
    generate() gives on the PyTorch model, for learned positions, RoPE with GQA, ALiBi with post-norm.

    Sampling draws the same numbers from the same seed on both, on logits that differ by ~1e-6. Tokens
    could still differ where two candidates lie closer than that (they swap places among the sorted
    candidates) and the draw falls on one of them: here the closest adjacent pair of the top 40 in a
    sequence is typically ~3e-5 apart, and 20 seeds per model gave no difference (measured when written);
    an untrained model's near-uniform logits do branch now and then (benchmarks/generate.py --onnx)."""
    from xlab.onnx import OnnxModel

    preset = "llama" if name == "llama" else "gpt2"
    path = tmp_path / "run.ckpt"
    model = make_training_checkpoint(path, tiny_config(preset, tok.vocab_size, **CONFIGS[name]), tok, seed=7)
    main(["export-onnx", str(path), str(tmp_path / "kv.onnx"), "--kv-cache"])
    onnx_model = OnnxModel(tmp_path / "kv.onnx", threads=1)
    assert onnx_model.kv_cache and onnx_model.masked and onnx_model.config == model.config
    assert onnx_model.tokenizer.encode("def add(x") == tok.encode("def add(x")
    prompts = [tok.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    greedy = compare(model, onnx_model, prompts, "greedy")
    # the torch path itself, row by row against full forwards (nothing shared with generate.py)
    assert [c.tokens for [c] in greedy] == [greedy_reference(model, p, 12, 2, keep_eos=False) for p in prompts]
    compare(model, onnx_model, prompts, "beam")
    if name != "gpt2":  # RoPE and ALiBi slide on past the context (32): the window restarts, padding and all
        with pytest.warns(UserWarning, match="sliding the window"):
            compare(model, onnx_model, prompts, "greedy", max_new_tokens=30)
    samples = [compare(model, onnx_model, prompts, "sample", seed) for seed in (0, 1, 2)]
    assert len({str(s) for s in samples}) == 3  # the seeds matter: it really samples
    assert samples[0] == compare(model, onnx_model, prompts, "sample", 0)  # repeatable


def test_the_graph_without_cache_decodes_equal_prompts_and_refuses_padded_ones(tmp_path, tok):
    """The graph without cache reruns the whole sequence each step: every strategy gives the cache's tokens
    for prompts of one length; it has no positions or key mask, so a padded batch is refused, not garbled."""
    from xlab.generate import GenerationConfig, generate
    from xlab.onnx import OnnxModel

    model = make_training_checkpoint(tmp_path / "run.ckpt", tiny_config("llama", tok.vocab_size), tok, seed=7)
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "plain.onnx")])
    plain = OnnxModel(tmp_path / "plain.onnx", threads=1)
    assert not plain.kv_cache and not plain.masked
    prompts = [tok.encode(p)[:2] for p in PROMPTS]
    for strategy in STRATEGIES:
        compare(model, plain, prompts, strategy)
    with pytest.raises(ValueError, match=r"plain.onnx takes no positions or key mask, which prompts of different "
                                         r"lengths need: export it again with `manage.py export-onnx --kv-cache`"):
        generate(plain, [tok.encode(p) for p in PROMPTS], GenerationConfig(strategy="greedy"))


def test_greedy_at_the_context_limit_gives_the_tokens_torch_gives(tmp_path, tok):
    """Learned positions end at the context (32): the last new token is predicted at position 31, so a
    prompt of 30 tokens gets 3, in onnxruntime as in generate.py and a full forward per token."""
    from xlab.generate import GenerationConfig, generate
    from xlab.onnx import OnnxModel

    model = make_training_checkpoint(tmp_path / "run.ckpt", tiny_config("gpt2", tok.vocab_size), tok, seed=7)
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "kv.onnx"), "--kv-cache"])
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "plain.onnx")])
    config = GenerationConfig(strategy="greedy", max_new_tokens=10)
    for length in (30, 32):
        prompt = [int(t) for t in np.random.default_rng(length).integers(3, tok.vocab_size, length)]
        for runner in (model, *(OnnxModel(tmp_path / graph, threads=1) for graph in ("kv.onnx", "plain.onnx"))):
            with pytest.warns(UserWarning, match="stopped at the context of 32"):
                [[greedy]] = generate(runner, [prompt], config)
            assert greedy.tokens == greedy_reference(model, prompt, 32 - length + 1, eos_id=-1), (runner, length)


def test_opset_is_the_one_asked_for(tmp_path, tok):
    make_training_checkpoint(tmp_path / "run.ckpt", tiny_config("llama", tok.vocab_size, n_layers=1), tok)
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "kv.onnx"), "--kv-cache", "--opset", "18"])
    graph = onnx.load(tmp_path / "kv.onnx")
    assert {o.domain: o.version for o in graph.opset_import}[""] == 18
    model = load_checkpoint(tmp_path / "run.ckpt").model
    c = model.config
    ids = torch.randint(0, tok.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).numpy()
    kv = session(tmp_path / "kv.onnx")
    empty = np.zeros((c.n_layers, 2, c.kv_heads, 0, c.head_dim), np.float32)
    logits, past_k, past_v = kv.run(None, {"input_ids": ids[:, :8].numpy(), "positions": np.tile(np.arange(8), (2, 1)),
                                           "key_mask": np.ones((2, 8), bool), "past_k": empty, "past_v": empty})
    np.testing.assert_allclose(logits, expected[:, :8], rtol=0, atol=1e-4)
    logits, _, _ = kv.run(None, {"input_ids": ids[:, 8:].numpy(), "positions": np.full((2, 1), 8),
                                 "key_mask": np.ones((2, 9), bool), "past_k": past_k, "past_v": past_v})
    np.testing.assert_allclose(logits, expected[:, 8:], rtol=0, atol=1e-4)


def test_infer_on_an_onnx_file_prints_what_infer_on_the_checkpoint_prints(tmp_path, tok, capsys):
    """infer.py's command line, in this process (a new interpreter per run takes ~8 s here)."""
    from xlab.infer import main as infer

    def run(*argv):
        code = infer([str(a) for a in argv])
        return code, *capsys.readouterr()

    make_training_checkpoint(tmp_path / "run.ckpt", tiny_config("llama", tok.vocab_size), tok, seed=7)
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "kv.onnx"), "--kv-cache"])
    capsys.readouterr()
    sampling = ["--temperature", "1.5", "--top-k", "40", "--top-p", "0.95", "--min-p", "0.02",
                "--repetition-penalty", "1.3"]
    # sampling with every filter and a seed (streamed), with another seed, then beam search with its n best
    outputs = []
    for flags in ([*sampling, "--seed", "3"], [*sampling, "--seed", "4"],
                  ["--beam-width", "3", "--num-samples", "2", "--length-penalty", "0.7"]):
        flags = ["def add(x", "--max-new-tokens", "15", "--device", "cpu", *flags]
        torch_out = run(tmp_path / "run.ckpt", *flags)
        assert torch_out[0] == 0 and torch_out[1].startswith(("def add(x", "--- beam 1 (score"))
        assert run(tmp_path / "kv.onnx", *flags) == torch_out
        outputs.append(torch_out[1])
    assert outputs[0] != outputs[1] and "--- beam 2 (score" in outputs[2]
    assert run(tmp_path / "kv.onnx", "def", "--device", "cuda") == (2, "", (
        f"error: the installed onnxruntime {ort.__version__} has no CUDA provider "
        "(install onnxruntime-gpu, or run on the CPU)\n"))
