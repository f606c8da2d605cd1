"""export-onnx, held to onnxruntime: logits equal PyTorch's within 1e-4 for any batch and length, the
cache graph continues sequences exactly, and greedy decoding in onnxruntime gives PyTorch's tokens."""

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
        feed = {"input_ids": ids[:, start:start + step].numpy(), "past_k": past_k, "past_v": past_v}
        logits, past_k, past_v = kv.run(None, feed)
        start += step
        assert past_k.shape == past_v.shape == (c.n_layers, 3, c.kv_heads, start, c.head_dim)
        np.testing.assert_allclose(logits, expected[:, start - step:start], rtol=0, atol=1e-4)

    for graph in (onnx.load(tmp_path / "plain.onnx"), onnx.load(tmp_path / "kv.onnx")):
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
        assert dims["input_ids"] == ["batch", "sequence"]
        if "past_k" in dims:
            assert dims["past_k"] == [c.n_layers, "batch", c.kv_heads, "past", c.head_dim]


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_greedy_in_onnxruntime_equals_pytorch_greedy(tmp_path, tok, preset):
    from xlab.onnx import OnnxGreedy

    model = make_training_checkpoint(tmp_path / "run.ckpt", tiny_config(preset, tok.vocab_size), tok, seed=7)
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "kv.onnx"), "--kv-cache"])
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "plain.onnx")])
    prompts = [tok.encode("def add(x"), tok.encode("class Po")]
    prompts = [p[:4] for p in prompts]  # a batch needs equal lengths
    expected = [greedy_reference(model, p, 15, tok.eos_id) for p in prompts]
    assert all(len(e) > 3 for e in expected)
    for graph in ("kv.onnx", "plain.onnx"):
        runner = OnnxGreedy(tmp_path / graph, threads=1)
        assert runner.kv_cache == (graph == "kv.onnx")
        assert runner.tokenizer.encode("def add(x") == tok.encode("def add(x") and runner.eos_id == tok.eos_id
        assert runner.generate(prompts[0], 15, tok.eos_id) == expected[0]
        assert runner.generate(prompts, 15, tok.eos_id) == expected
        # a stop token that row 0 produces early: that row ends with it, the other runs on to its own stop
        stop = expected[0][2]
        stopped = [greedy_reference(model, p, 15, stop) for p in prompts]
        assert stopped[0] == expected[0][:3] and runner.generate(prompts, 15, stop) == stopped
    with pytest.raises(ValueError, match="exceeds the model's context of 32"):  # a longer prompt is refused
        runner.generate(prompts[0] * 9, 1)


def test_greedy_at_the_context_limit_gives_the_tokens_torch_gives(tmp_path, tok):
    """Learned positions end at the context (32): the last new token is predicted at position 31, so a
    prompt of 30 tokens gets 3, in onnxruntime as in generate.py and a full forward per token."""
    from xlab.generate import GenerationConfig, generate
    from xlab.onnx import OnnxGreedy

    model = make_training_checkpoint(tmp_path / "run.ckpt", tiny_config("gpt2", tok.vocab_size), tok, seed=7)
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "kv.onnx"), "--kv-cache"])
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "plain.onnx")])
    for length in (30, 32):
        prompt = [int(t) for t in np.random.default_rng(length).integers(3, tok.vocab_size, length)]
        with pytest.warns(UserWarning, match="stopped at the context of 32"):
            [[torch_greedy]] = generate(model, [prompt], GenerationConfig(strategy="greedy", max_new_tokens=10))
        assert torch_greedy.tokens == greedy_reference(model, prompt, 32 - length + 1, eos_id=-1)
        for graph in ("kv.onnx", "plain.onnx"):
            assert OnnxGreedy(tmp_path / graph, threads=1).generate(prompt, 10) == torch_greedy.tokens, (graph, length)


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
    logits, past_k, past_v = kv.run(None, {"input_ids": ids[:, :8].numpy(), "past_k": empty, "past_v": empty})
    np.testing.assert_allclose(logits, expected[:, :8], rtol=0, atol=1e-4)
    logits, _, _ = kv.run(None, {"input_ids": ids[:, 8:].numpy(), "past_k": past_k, "past_v": past_v})
    np.testing.assert_allclose(logits, expected[:, 8:], rtol=0, atol=1e-4)


def test_infer_backend_onnx_prints_what_infer_greedy_prints(tmp_path, tok):
    from conftest import run_script

    make_training_checkpoint(tmp_path / "run.ckpt", tiny_config("llama", tok.vocab_size), tok, seed=7)
    main(["export-onnx", str(tmp_path / "run.ckpt"), str(tmp_path / "kv.onnx"), "--kv-cache"])
    env = {"OMP_NUM_THREADS": "1"}
    flags = ["def add(x", "--greedy", "--max-new-tokens", "15"]
    torch_out = run_script("infer.py", tmp_path / "run.ckpt", *flags, "--device", "cpu", env=env).stdout
    onnx_out = run_script("infer.py", tmp_path / "kv.onnx", *flags, env=env).stdout
    assert onnx_out == torch_out and torch_out.startswith("def add(x")
    refused = run_script("infer.py", tmp_path / "kv.onnx", "def", "--backend", "onnx", check=False, env=env)
    assert refused.returncode == 2 and refused.stderr == "error: --backend onnx decodes greedily only: add --greedy\n"
