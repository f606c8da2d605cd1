"""The static-cache decoding step (`xlab.decoding.decode_step` and `StaticCacheModel`) against the growing
cache it replaces: the same logits step by step, the same tokens from every strategy, and one compiled graph
per row count. CUDA graphs need a GPU; what they capture is this step, which these tests hold on the CPU."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from xlab.decoding import StaticCacheModel, decode_step
from xlab.generate import GenerationConfig, generate, stream
from xlab.transformer import KVCache, Transformer, TransformerConfig

VOCAB = 64
POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "none"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_dynamo():
    """Dynamo counts graphs of `decode_step` for the whole process: start each compiling test from none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_model(position: str = "learned", context: int = 24, **overrides) -> Transformer:
    """Peaked distributions (init_std 0.2): no greedy choice hinges on rounding-level differences."""
    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, context=context, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                  position=position, init_std=0.2)
    return Transformer(TransformerConfig(**(fields | overrides))).eval()


def tokens_of(results) -> list[list[list[int]]]:
    return [[c.tokens for c in row] for row in results]


PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # left-padded together: positions and key masks


# each position encoding (RoPE's with QK-norm), and the speedrun's ReLU² and soft-capped logits
STEP_ARCHES = {position: {"position": position, "qk_norm": position == "rope"} for position in POSITIONS} | {
    "relu2-softcap": {"position": "rope", "mlp": "relu2", "logit_softcap": 2.0}}


@pytest.mark.parametrize("arch", list(STEP_ARCHES))
@pytest.mark.parametrize("padded", [False, True])
def test_step_equals_forward_on_the_growing_cache(arch, padded):
    """Each step's logits and the keys/values it writes equal `forward` on today's growing cache."""
    model = tiny_model(**STEP_ARCHES[arch])
    prompts = PROMPTS if padded else [p[:2] for p in PROMPTS]
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    real = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
    positions = (real.cumsum(1) - 1).clamp(min=0)
    growing = KVCache(model.config, 3, model.config.context)
    static = KVCache(model.config, 3, model.config.context)
    with torch.no_grad():
        model(ids, growing, positions, real)
        model(ids, static, positions, real)
        key_mask = torch.ones(3, model.config.context, dtype=torch.bool)
        key_mask[:, :P] = real
        pos = positions[:, -1:] + 1
        for step in range(model.config.context - P):
            token = torch.tensor([[(7 * step + r) % VOCAB] for r in range(3)])
            expected = model(token, growing, pos, key_mask[:, :P + step + 1])[:, -1]
            got = decode_step(model, token, static, torch.tensor([P + step]), pos, key_mask)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            pos = pos + 1
    n = growing.length
    torch.testing.assert_close(static.k[:, :, :, :n], growing.k[:, :, :, :n])
    torch.testing.assert_close(static.v[:, :, :, :n], growing.v[:, :, :, :n])


CONFIGS = {
    "greedy": dict(strategy="greedy", max_new_tokens=30),
    "sample": dict(strategy="sample", max_new_tokens=30, temperature=0.9, top_k=20, top_p=0.95,
                   num_return_sequences=2),
    "beam": dict(strategy="beam", max_new_tokens=12, num_beams=3, num_return_sequences=2),
    "penalty": dict(strategy="greedy", max_new_tokens=16, repetition_penalty=1.3, eos_id=3),
}


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("case", list(CONFIGS))
def test_static_cache_generates_the_tokens_of_the_growing_cache(position, case):
    """Every strategy, on left-padded prompts and on prompts of one length (no positions, no key mask), past the
    context where positions can slide (greedy's 30 tokens after a 5-token prompt, context 24), gives the growing
    cache's tokens; beam scores agree to rounding."""
    model = tiny_model(position)
    config = GenerationConfig(**CONFIGS[case])
    static = StaticCacheModel(model, compile=False)
    for prompts in (PROMPTS, [p[:2] for p in PROMPTS]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the context warnings, alike for both
            expected = generate(model, prompts, config, torch.Generator().manual_seed(1))
            got = generate(static, prompts, config, torch.Generator().manual_seed(1))
        assert tokens_of(got) == tokens_of(expected)
        for row_got, row_expected in zip(got, expected, strict=True):
            for a, b in zip(row_got, row_expected, strict=True):
                assert a.finished == b.finished
                if b.score is not None:
                    assert a.score == pytest.approx(b.score, rel=1e-5)


def test_compiled_step_is_one_graph_per_row_count(fresh_dynamo):
    """`torch.compile(fullgraph=True)` captures the whole step (a graph break would raise), once per row count:
    new prompt lengths, new calls and later steps reuse it. The compile time is reported once per row count."""
    model = tiny_model("rope")
    counter, reports = CompileCounter(), []
    static = StaticCacheModel(model, backend=counter, report=reports.append)
    greedy = GenerationConfig(strategy="greedy", max_new_tokens=10)
    sampling = GenerationConfig(strategy="sample", max_new_tokens=10, top_k=10, num_return_sequences=2)
    for prompts in (PROMPTS, [[1, 2, 3, 4], [5], [6, 7, 8, 9, 10, 11]]):
        for config in (greedy, sampling):
            expected = generate(model, prompts, config, torch.Generator().manual_seed(2))
            got = generate(static, prompts, config, torch.Generator().manual_seed(2))
            assert tokens_of(got) == tokens_of(expected)
    assert counter.frame_count == 2  # 3 rows (greedy), 6 rows (2 samples each of 3 prompts)
    assert len(reports) == 2 and "3 row(s)" in reports[0] and "6 row(s)" in reports[1]


def test_inductor_compiled_decoding_gives_the_eager_tokens(fresh_dynamo):
    """The real compiler (inductor, CPU code here; CUDA graphs on a GPU) gives the eager path's tokens:
    greedy, and sampling from the same seed."""
    model = tiny_model("learned")
    static = StaticCacheModel(model, report=lambda line: None)
    prompt = [[3, 1, 4, 1, 5]]
    for config in (GenerationConfig(strategy="greedy", max_new_tokens=12),
                   GenerationConfig(strategy="sample", max_new_tokens=12, top_p=0.9)):
        expected = generate(model, prompt, config, torch.Generator().manual_seed(3))
        assert tokens_of(generate(static, prompt, config, torch.Generator().manual_seed(3))) == tokens_of(expected)


def test_past_the_recompile_limit_decoding_goes_on_eagerly(fresh_dynamo):
    """Dynamo keeps a limited number of graphs of `decode_step` for the whole process: past it the step runs
    eagerly, with a warning, and the tokens are the same."""
    model = tiny_model("rope")
    counter = CompileCounter()
    static = StaticCacheModel(model, backend=counter, report=lambda line: None)
    greedy = GenerationConfig(strategy="greedy", max_new_tokens=8)
    with torch._dynamo.config.patch(recompile_limit=1):
        assert tokens_of(generate(static, PROMPTS, greedy)) == tokens_of(generate(model, PROMPTS, greedy))
        with pytest.warns(UserWarning, match="recompile_limit"):
            got = generate(static, PROMPTS[:2], greedy)  # 2 rows: a second graph, past the limit
    assert tokens_of(got) == tokens_of(generate(model, PROMPTS[:2], greedy))
    assert counter.frame_count == 1 and not static.compiled


class CompileSpy:
    """Stands in for torch.compile: records each call's options and returns the function itself (eager)."""

    def __init__(self):
        self.calls = []

    def __call__(self, fn, **options):
        self.calls.append(options)
        return fn


def test_generation_config_compile_switch(monkeypatch):
    """compile=None decodes eagerly on a CPU (CUDA only), True builds one StaticCacheModel kept on the model for
    later calls (fullgraph, fixed shapes), False never does; the tokens are the same."""
    spy = CompileSpy()
    monkeypatch.setattr(torch, "compile", spy)
    model = tiny_model("alibi")
    results = {}
    for compile in (None, False, True, True):
        config = GenerationConfig(strategy="greedy", max_new_tokens=8, compile=compile)
        results[compile] = tokens_of(generate(model, PROMPTS, config))
        assert ("_static_decoding" in model.__dict__) == (compile is True)
    assert len(spy.calls) == 1 and spy.calls[0]["fullgraph"] and spy.calls[0]["dynamic"] is False
    assert spy.calls[0]["mode"] is None  # "reduce-overhead" (CUDA graphs) is for CUDA
    assert results[None] == results[False] == results[True]
    clone = copy.deepcopy(model)  # what generation kept on the model is not copied, nor pickled
    assert "_static_decoding" not in clone.__dict__
    assert "_static_decoding" not in pickle.loads(pickle.dumps(model)).__dict__


def test_two_streams_at_once_do_not_share_a_cache():
    """Interleaved streams of one StaticCacheModel (the same row count) each get the tokens they get alone."""
    model = tiny_model("rope")
    static = StaticCacheModel(model, compile=False)
    config = GenerationConfig(strategy="greedy", max_new_tokens=10)
    alone = [list(stream(model, p, config)) for p in PROMPTS[:2]]
    together = list(zip(*(stream(static, p, config) for p in PROMPTS[:2]), strict=True))
    assert [list(t) for t in zip(*together, strict=True)] == alone


def test_compile_with_a_model_that_is_not_a_transformer_is_an_error():
    class Other:  # a Decodable such as xlab.onnx.OnnxModel
        config = TransformerConfig(vocab_size=VOCAB, context=8)
        device = torch.device("cpu")

        def start(self, batch, max_len):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="compile applies to a Transformer, not to Other"):
        generate(Other(), [[1]], GenerationConfig(strategy="greedy", compile=True))
