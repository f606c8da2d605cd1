"""Generation against independent references: full-forward loops without a cache, filters and penalties
worked out by hand, brute-force search on a model with hand-set probabilities, and Hugging Face's
`generate()` on converted weights."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from xlab.generate import (
    GenerationConfig,
    TextStreamer,
    apply_repetition_penalty,
    filter_logits,
    generate,
    sample,
    stream,
)
from xlab.tokenizer import Tokenizer
from xlab.transformer import Transformer, TransformerConfig

VOCAB = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine each op would wait for the other
    core: one thread keeps this file fast anywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(position: str = "learned", context: int = 32, seed: int = 0, **overrides) -> Transformer:
    """A random 2-layer model; init_std 0.2 makes its distributions peaked, so that no greedy choice
    hinges on rounding-level differences between the cached and the uncached computation."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, context=context, n_layers=2, n_heads=2, d_model=32, position=position,
                  init_std=0.2)
    return Transformer(TransformerConfig(**(fields | overrides))).eval()


@torch.no_grad()
def reference_greedy(model: Transformer, prompt: list[int], n: int, eos: int | None = None, slide: int = 1,
                     penalty: float = 1.0) -> list[int]:
    """Greedy search with a full forward pass per token and no cache: the definition of the result.

    Past the context, sliding positions see a window that restarts `context + 1 - slide` tokens back
    whenever it would exceed the context; learned positions stop after `context + 1` tokens.
    """
    context, seq, start = model.config.context, list(prompt), 0
    for _ in range(n):
        if len(seq) - start > context:
            if model.config.position in ("learned", "sinusoidal"):
                break
            start = len(seq) - (context + 1 - slide)
        logits = model(torch.tensor([seq[start:]]))[0, -1].double()
        for t in set(seq):  # CTRL's penalty, written out
            logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        token = int(logits.argmax())
        if token == eos:
            return seq[len(prompt):]
        seq.append(token)
    return seq[len(prompt):]


def tokens_of(results) -> list[list[int]]:
    return [[c.tokens for c in r] for r in results]


# --------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "sinusoidal", "none"])
def test_greedy_with_cache_equals_full_forward(position):
    model = tiny_model(position, context=24)
    prompt = [5, 17, 3, 42, 8, 9, 1]
    n = 30  # 7 + 30 > 24: sliding positions slide, learned/sinusoidal stop at the context
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [[ours]] = generate(model, [prompt], GenerationConfig(strategy="greedy", max_new_tokens=n))
    assert ours.tokens == reference_greedy(model, prompt, n)
    assert any("context" in str(w.message) for w in caught), "passing the context must warn"


@pytest.mark.parametrize("slide", [3, 10])
def test_sliding_window_of_several_tokens(slide):
    model = tiny_model("rope", context=16)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    config = GenerationConfig(strategy="greedy", max_new_tokens=40, slide=slide)
    with pytest.warns(UserWarning, match="sliding"):
        [[ours]] = generate(model, [prompt], config)
    assert ours.tokens == reference_greedy(model, prompt, 40, slide=slide)


def test_eos_stops_each_sequence_and_is_excluded():
    model = tiny_model("rope")
    prompt = [7, 7, 2]
    free = reference_greedy(model, prompt, 12)
    eos = free[5]  # a token greedy search produces: with it as eos, search must stop there
    [[ours]] = generate(model, [prompt], GenerationConfig(strategy="greedy", max_new_tokens=12, eos_id=eos))
    assert ours.finished and ours.tokens == free[:free.index(eos)]


@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_batched_left_padded_prompts_equal_each_alone(position):
    model = tiny_model(position, context=32)
    prompts = [[4, 8, 15], [16, 23, 42, 4, 8, 15, 16, 23], [1], [9, 9, 9, 9, 2]]
    eos = reference_greedy(model, prompts[1], 10)[4]  # makes at least one row stop early
    config = GenerationConfig(strategy="greedy", max_new_tokens=10, eos_id=eos)
    batched = generate(model, prompts, config)
    for prompt, [result] in zip(prompts, batched, strict=True):
        assert result.tokens == reference_greedy(model, prompt, 10, eos=eos)
        assert result.tokens == generate(model, [prompt], config)[0][0].tokens


def test_empty_prompt_starts_from_bos():
    model = tiny_model()
    config = GenerationConfig(strategy="greedy", max_new_tokens=6, bos_id=3)
    assert generate(model, [[]], config)[0][0].tokens == reference_greedy(model, [3], 6)
    with pytest.raises(ValueError, match="bos_id"):
        generate(model, [[]], GenerationConfig(strategy="greedy", max_new_tokens=6))


def test_prompt_longer_than_context_keeps_its_end_with_a_warning():
    model = tiny_model("learned", context=16)
    prompt = list(range(1, 25))  # 24 tokens
    with pytest.warns(UserWarning, match="keeping its last 16"):
        [[ours]] = generate(model, [prompt], GenerationConfig(strategy="greedy", max_new_tokens=5))
    # learned positions: the 16 kept tokens fill the context, so one token can follow them
    assert ours.tokens == reference_greedy(model, prompt[-16:], 1)


def test_repetition_penalty_on_hand_made_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False], [False, False, True, True]])
    expected = torch.tensor([[1.0, -2.0, 0.5, -3.0], [2.0, -1.0, 0.25, -6.0]])
    assert torch.equal(apply_repetition_penalty(logits, seen, 2.0), expected)


def test_greedy_with_repetition_penalty_equals_full_forward():
    model = tiny_model("rope")
    prompt = [5, 6, 5, 6, 11]
    config = GenerationConfig(strategy="greedy", max_new_tokens=20, repetition_penalty=1.8)
    [[ours]] = generate(model, [prompt], config)
    reference = reference_greedy(model, prompt, 20, penalty=1.8)
    assert ours.tokens == reference
    assert reference != reference_greedy(model, prompt, 20), "the penalty should change this output"


# --------------------------------------------------------------------------- sampling

# probabilities worked out by hand: sorted, token 1 (0.5) > 3 (0.2) > 4 (0.15) > 0 (0.1) > 2 (0.05)
PROBS = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])


@pytest.mark.parametrize("top_k, top_p, min_p, kept", [
    (2, None, None, {1, 3}),
    (1, None, None, {1}),
    (10, None, None, {0, 1, 2, 3, 4}),  # k beyond the vocabulary keeps everything
    (None, 0.6, None, {1, 3}),  # 0.5 < 0.6, then 0.5 + 0.2 reaches it
    (None, 0.75, None, {1, 3, 4}),  # 0.7 < 0.75 still needs token 4
    (None, 0.4, None, {1}),
    (None, 1.0, None, {0, 1, 2, 3, 4}),
    (None, None, 0.35, {1, 3}),  # threshold 0.175
    (None, None, 0.25, {1, 3, 4}),  # threshold 0.125
    (None, None, 0.0, {0, 1, 2, 3, 4}),
    (None, None, 1.0, {1}),
    (3, 0.6, None, {1, 3}),  # after top-3: 0.5/0.85 = 0.588 < 0.6, so token 3 stays too
    (4, 0.55, 0.5, {1}),  # top-p keeps {1, 3} (0.526 < 0.55), min-p then drops 3 (0.2 < 0.25)
])
def test_filters_keep_the_tokens_worked_out_by_hand(top_k, top_p, min_p, kept):
    logits = PROBS.log()[None].repeat(2, 1) + torch.tensor([[0.0], [3.0]])  # a shift changes nothing
    filtered = filter_logits(logits, top_k, top_p, min_p)
    for row in range(2):
        assert {i for i in range(5) if filtered[row, i] > float("-inf")} == kept
        survivors = torch.tensor(sorted(kept))
        assert torch.equal(filtered[row, survivors], logits[row, survivors]), "kept logits stay unchanged"


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 4, 0.8, None),
    (2.0, None, None, 0.3),
    (0.5, 3, None, None),
    (1.0, None, 0.9, None),
])
def test_sampling_frequencies_match_the_filtered_distribution(temperature, top_k, top_p, min_p):
    draws = 40_000
    logits = PROBS.log()[None].expand(draws, -1)
    tokens = sample(logits, temperature, top_k, top_p, min_p, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=5).double()
    # the expected distribution, computed by hand from PROBS: tempered, filtered, renormalised
    p = PROBS.double() ** (1 / temperature)
    p = p / p.sum()
    order = sorted(range(5), key=lambda i: -p[i])
    keep = set(order[:top_k or 5])
    if top_p is not None:
        q = {i: p[i] / sum(p[j] for j in keep) for i in keep}
        mass, nucleus = 0.0, set()
        for i in [i for i in order if i in keep]:
            if mass < top_p:
                nucleus.add(i)
            mass += q[i]
        keep = nucleus
    if min_p is not None:
        keep = {i for i in keep if p[i] >= min_p * max(p[j] for j in keep)}
    expected = torch.tensor([p[i] if i in keep else 0.0 for i in range(5)])
    expected = expected / expected.sum() * draws
    assert all(counts[i] == 0 for i in range(5) if i not in keep)
    chi2 = sum((counts[i] - expected[i]) ** 2 / expected[i] for i in keep)
    assert chi2 < 20.5, f"chi-square {chi2:.1f} (df <= 4, p = 0.0004): {counts.tolist()} vs {expected.tolist()}"


def test_top_k_1_and_tiny_temperature_equal_greedy():
    model = tiny_model("rope")
    prompts = [[1, 2, 3], [40, 41]]
    greedy = tokens_of(generate(model, prompts, GenerationConfig(strategy="greedy", max_new_tokens=15)))
    for fields in ({"top_k": 1}, {"temperature": 1e-6}):
        config = GenerationConfig(strategy="sample", max_new_tokens=15, **fields)
        assert tokens_of(generate(model, prompts, config, torch.Generator().manual_seed(1))) == greedy


def test_sampling_is_reproducible_from_the_seed():
    model = tiny_model("rope", init_std=0.05)  # flat distributions: samples differ between seeds
    config = GenerationConfig(strategy="sample", max_new_tokens=20, top_p=0.95, num_return_sequences=2)
    first = tokens_of(generate(model, [[1, 2], [3]], config, torch.Generator().manual_seed(7)))
    again = tokens_of(generate(model, [[1, 2], [3]], config, torch.Generator().manual_seed(7)))
    other = tokens_of(generate(model, [[1, 2], [3]], config, torch.Generator().manual_seed(8)))
    assert first == again and first != other
    assert first[0][0] != first[0][1], "samples of one prompt are independent"
    streamed = list(stream(model, [1, 2], GenerationConfig(strategy="sample", max_new_tokens=20, top_p=0.95),
                           torch.Generator().manual_seed(7)))
    single = generate(model, [[1, 2]], GenerationConfig(strategy="sample", max_new_tokens=20, top_p=0.95),
                      torch.Generator().manual_seed(7))
    assert streamed == single[0][0].tokens


# --------------------------------------------------------------------------- beam search


def bigram_model(table: torch.Tensor) -> Transformer:
    """A Transformer whose next-token log-probs are table[last token] (V, V): embeddings one-hot, blocks
    zeroed (their residual adds nothing), the head reading the table; positions 'none'."""
    V = table.shape[0]
    model = Transformer(TransformerConfig(vocab_size=V, context=16, n_layers=1, n_heads=1, d_model=V,
                                          position="none", final_norm=False, tie_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.wte.weight.copy_(torch.eye(V))
        model.lm_head.weight.copy_(table.log_softmax(-1).T)
    return model.eval()


def full_forward_logprob(model, prompt: list[int], tokens: list[int]) -> float:
    """Sum of the log-probs of `tokens` after `prompt`, from one forward pass without cache."""
    seq = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logprobs = model(seq)[0].double().log_softmax(-1)
    return sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens))


def test_beam_search_finds_what_greedy_misses():
    # from 0: A=1 (0.6) or B=2 (0.4); after A everything is flat; after B, C=3 is nearly certain
    V = 5
    p = torch.full((V, V), 1.0 / V)
    p[0] = torch.tensor([0.0, 0.6, 0.4, 0.0, 0.0]) + 1e-4
    p[2] = torch.tensor([0.02, 0.02, 0.02, 0.9, 0.04])
    model = bigram_model(p.log())
    n = 2  # best: B C (0.4 * 0.9 = 0.36); greedy takes A, after which nothing beats 0.6 * 0.2 = 0.12
    best = max(itertools.product(range(V), repeat=n), key=lambda s: full_forward_logprob(model, [0], list(s)))
    greedy = generate(model, [[0]], GenerationConfig(strategy="greedy", max_new_tokens=n))[0][0].tokens
    config = GenerationConfig(strategy="beam", num_beams=2, max_new_tokens=n, num_return_sequences=2)
    [beams] = generate(model, [[0]], config)
    assert beams[0].tokens == list(best) and greedy != list(best)
    assert beams[0].score >= beams[1].score and beams[0].tokens != beams[1].tokens
    for beam in beams:  # scores: the full-forward log-prob over length ** length_penalty (1)
        assert beam.logprob == pytest.approx(full_forward_logprob(model, [0], beam.tokens), abs=1e-4)
        assert beam.score == pytest.approx(beam.logprob / n, abs=1e-5)


def test_beam_width_1_equals_greedy():
    model = tiny_model("rope")
    prompts = [[1, 2, 3], [60, 2], [5]]
    eos = reference_greedy(model, prompts[0], 12)[6]
    for eos_id in (None, eos):
        greedy = generate(model, prompts, GenerationConfig(strategy="greedy", max_new_tokens=12, eos_id=eos_id))
        beam = generate(model, prompts, GenerationConfig(strategy="beam", num_beams=1, max_new_tokens=12,
                                                         eos_id=eos_id))
        assert tokens_of(beam) == tokens_of(greedy)
        assert [r[0].finished for r in beam] == [r[0].finished for r in greedy]


def test_beam_search_on_left_padded_prompts_equals_each_alone():
    model = tiny_model("alibi")
    prompts = [[4, 8, 15, 16, 23, 42], [7], [1, 2, 3]]
    config = GenerationConfig(strategy="beam", num_beams=3, num_return_sequences=3, max_new_tokens=9,
                              eos_id=reference_greedy(model, prompts[0], 9)[3])
    for prompt, batched in zip(prompts, generate(model, prompts, config), strict=True):
        [alone] = generate(model, [prompt], config)
        assert [h.tokens for h in batched] == [h.tokens for h in alone]
        assert [h.score for h in batched] == pytest.approx([h.score for h in alone], abs=1e-5)


def test_generation_runs_without_dropout_and_restores_the_mode():
    model = tiny_model("rope", dropout_attn=0.5, dropout_resid=0.5, dropout_embed=0.5)
    config = GenerationConfig(strategy="greedy", max_new_tokens=12)
    expected = reference_greedy(model, [1, 2, 3], 12)  # model.eval(): no dropout
    model.train()
    assert generate(model, [[1, 2, 3]], config)[0][0].tokens == expected
    assert model.training


# --------------------------------------------------------------------------- against Hugging Face


def hf_pair(kind: str):
    """A random Hugging Face model (peaked distributions) and XLab's conversion of it."""
    transformers = pytest.importorskip("transformers")
    convert = pytest.importorskip("xlab.convert")
    common = dict(vocab_size=VOCAB, initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if kind == "gpt2":
        hf_config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, **common)
        hf_class = transformers.GPT2LMHeadModel
    else:
        hf_config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, tie_word_embeddings=False, **common)
        hf_class = transformers.LlamaForCausalLM
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = hf_class(hf_config).eval()
    model = Transformer(convert.config_from_hf(hf_config))
    model.load_state_dict(convert.state_dict_from_hf(hf.state_dict(), hf_config))
    return hf, model.eval()


def hf_new_tokens(row: list[int], prompt_len: int, eos: int | None) -> list[int]:
    """HF's generated tokens up to and including eos (HF pads after it)."""
    new = row[prompt_len:]
    return new[:new.index(eos) + 1] if eos is not None and eos in new else new


PROMPTS = [[3, 14, 15, 9, 26], [53, 5, 8, 9, 7]]  # equal lengths: HF needs no padding


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_equals_hugging_face(kind):
    hf, model = hf_pair(kind)
    ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        free = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    eos = free[0, 5 + 8].item()  # so that HF's stopping rule and ours both get exercised
    for penalty in (1.0, 1.3):
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                              eos_token_id=eos, pad_token_id=0, repetition_penalty=penalty)
        config = GenerationConfig(strategy="greedy", max_new_tokens=20, eos_id=eos, repetition_penalty=penalty)
        for prompt, row, [ours] in zip(PROMPTS, out.tolist(), generate(model, PROMPTS, config), strict=True):
            assert ours.tokens + [eos] * ours.finished == hf_new_tokens(row, len(prompt), eos)


@pytest.mark.parametrize("kind, length_penalty, early_stopping", [
    ("gpt2", 1.0, True), ("gpt2", 2.0, True), ("gpt2", 0.5, False), ("llama", 1.0, True), ("llama", -0.5, False),
])
def test_beam_search_equals_hugging_face(kind, length_penalty, early_stopping):
    hf, model = hf_pair(kind)
    K, n = 4, 12
    ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        free = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                           num_beams=K, num_return_sequences=K)
    eos = free[:, 5:].flatten().mode().values.item()  # the most frequent token: many beams meet it
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          num_beams=K, num_return_sequences=K, length_penalty=length_penalty,
                          early_stopping=early_stopping, eos_token_id=eos, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)
    config = GenerationConfig(strategy="beam", num_beams=K, num_return_sequences=K, max_new_tokens=n, eos_id=eos,
                              length_penalty=length_penalty, early_stopping=early_stopping)
    ours = generate(model, PROMPTS, config)
    finished = 0
    for b, prompt in enumerate(PROMPTS):
        assert len(ours[b]) == K
        for k, hyp in enumerate(ours[b]):
            row = out.sequences[b * K + k].tolist()
            assert hyp.tokens + [eos] * hyp.finished == hf_new_tokens(row, len(prompt), eos)
            assert hyp.score == pytest.approx(out.sequences_scores[b * K + k].item(), abs=1e-4)
            length = len(hyp.tokens) + hyp.finished
            assert hyp.score == pytest.approx(full_forward_logprob(model, prompt, hyp.tokens + [eos] * hyp.finished)
                                              / length ** length_penalty, abs=1e-4)
            finished += hyp.finished
    assert finished > 0, "some hypotheses should end at eos, or the eos rules go untested"


# --------------------------------------------------------------------------- streaming


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = ["hello world, this is a test of the tokenizer", "the quick brown fox jumps over the lazy dog"] * 5
    return Tokenizer.train(iter(texts), vocab_size=300, show_progress=False)


def test_text_streamer_never_splits_a_character(tokenizer):
    text = "naïve café — 日本語のテキスト 😀🎉 ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode()) / 2, "multi-byte characters should span several tokens"
    streamer = TextStreamer(tokenizer)
    pieces = [streamer.push(t) for t in ids] + [streamer.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces, "some tokens end inside a character and must be held back"


def test_streamed_text_equals_the_full_decode(tokenizer):
    model = tiny_model("rope", vocab_size=tokenizer.vocab_size, init_std=0.05)
    prompt = tokenizer.encode("the quick")
    config = GenerationConfig(strategy="sample", max_new_tokens=60, eos_id=tokenizer.eos_id)
    streamer = TextStreamer(tokenizer)
    tokens, pieces = [], []
    for token in stream(model, prompt, config, torch.Generator().manual_seed(3)):
        tokens.append(token)
        pieces.append(streamer.push(token))
    pieces.append(streamer.flush())
    assert "".join(pieces) == tokenizer.decode(tokens)
    assert tokens == generate(model, [prompt], config, torch.Generator().manual_seed(3))[0][0].tokens


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fields, message", [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature": -1.0}, "temperature must be > 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": 0}, "top_k must be >= 1"),
    ({"min_p": -0.1}, r"min_p must be in \[0, 1\]"),
    ({"min_p": 1.1}, r"min_p must be in \[0, 1\]"),
    ({"strategy": "beam", "num_beams": 0}, "beam width"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"strategy": "greedy", "top_k": 5}, "only apply to sampling"),
    ({"strategy": "beam", "temperature": 0.7}, "only apply to sampling"),
    ({"strategy": "beam", "num_beams": 2, "num_return_sequences": 3}, "exceeds the beam width"),
    ({"strategy": "nucleus"}, "strategy must be one of"),
])
def test_invalid_settings_raise_clear_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**fields)


def test_invalid_prompts_and_stream_strategy_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, [[1, VOCAB]], GenerationConfig(strategy="greedy"))
    with pytest.raises(ValueError, match="streaming"):
        stream(model, [1], GenerationConfig(strategy="beam"))
