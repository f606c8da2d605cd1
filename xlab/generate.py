"""Text generation from a `Transformer`: greedy search, sampling and beam search, batched on the KV cache.

Plain PyTorch, no Lightning. Every strategy runs a whole batch at once: prompts of different lengths
are left-padded and masked (`positions`, `key_mask`), each sequence stops on its own at the
end-of-document token (`eos_id`) or at `max_new_tokens`, and beam search advances all beams of all
prompts in one forward pass per step, reordering the cache rather than recomputing it.

    config = GenerationConfig(strategy="sample", temperature=0.8, top_k=50, eos_id=tok.eos_id, bos_id=tok.start_id)
    [[completion]] = generate(model, [tok.encode("Once upon a time")], config, torch.Generator().manual_seed(0))
    print(tok.decode(completion.tokens))

    streamer = TextStreamer(tok)
    for token in stream(model, tok.encode("Once upon a time"), config):
        print(streamer.push(token), end="", flush=True)
    print(streamer.flush())

The model is a `Transformer` or any `Decodable`: `xlab.onnx.OnnxModel` runs an ONNX export in onnxruntime
through the same strategies (see `ModelState`); tokens are always chosen here, by torch. On CUDA a
`Transformer` decodes by default as a `StaticCacheModel`: a static cache and one compiled step
(`GenerationConfig.compile`).

Shapes: B prompts, R rows decoded together (B, or B x beams / samples), K beams, P padded prompt
length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from xlab.decoding import Decodable, ModelState, StaticCacheModel, TorchState, model_dtype_device
from xlab.kernels import OneDNNWeights
from xlab.transformer import Transformer

STRATEGIES = ("greedy", "sample", "beam")
SLIDING_POSITIONS = ("rope", "alibi", "none")  # relative (or no) positions: a window may start anywhere
SYNC_EVERY = 8  # steps between "all finished?" checks: each check waits for the device


@dataclass
class GenerationConfig:
    """How to generate. Options of another strategy (e.g. top_k with greedy) are an error, not ignored."""

    strategy: Literal["greedy", "sample", "beam"] = "sample"
    max_new_tokens: int = 128
    # sampling: logits / temperature, then top-k, top-p (nucleus), min-p filters, in that order
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    # any strategy: CTRL's penalty on tokens already in the sequence (prompt included); 1 = none
    repetition_penalty: float = 1.0
    # beam search (Hugging Face conventions): score = sum of log-probs / generated length ** length_penalty
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool = True  # stop a prompt once num_beams hypotheses have ended
    num_return_sequences: int = 1  # beam: the n best; sample: independent samples per prompt
    eos_id: int | None = None  # end of document: stops a sequence (None: only max_new_tokens stops)
    bos_id: int | None = None  # what an empty prompt starts from
    pad_id: int = 0  # fills left padding and the steps after a sequence ended (always masked)
    # rope/alibi/none positions past the context: drop this many oldest tokens and re-prefill the rest.
    # 1: every token sees the full context (one prefill per token); larger: cheaper, less context
    slide: int = 1
    # decode on a static KV cache with a compiled one-token step (`StaticCacheModel`; CUDA graphs on CUDA).
    # None: on CUDA, for a Transformer; True: on any device (on a CPU it compiles slowly and seldom pays);
    # False: eagerly on the growing cache. The same tokens either way; the first call per batch shape compiles
    compile: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        sampling = self.strategy == "sample"
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}, got {self.strategy!r}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.temperature > 0 or not sampling,
             f"temperature must be > 0 for sampling, got {self.temperature} (use strategy='greedy' instead)"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.min_p is None or 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.num_beams >= 1, f"beam width (num_beams) must be >= 1, got {self.num_beams}"),
            (self.num_return_sequences >= 1, f"num_return_sequences must be >= 1, got {self.num_return_sequences}"),
            (self.slide >= 1, f"slide must be >= 1, got {self.slide}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if not sampling:
            options = [("temperature", self.temperature, 1.0), ("top_k", self.top_k, None),
                       ("top_p", self.top_p, None), ("min_p", self.min_p, None)]
            given = [name for name, value, default in options if value != default]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to sampling, not to {self.strategy}")
        if self.strategy == "greedy" and self.num_return_sequences != 1:
            raise ValueError("greedy search has one result per prompt: num_return_sequences must be 1")
        if self.strategy == "beam" and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences={self.num_return_sequences} exceeds the beam width "
                             f"{self.num_beams}")


@dataclass
class Completion:
    """One generated continuation (the prompt excluded)."""

    tokens: list[int]
    finished: bool  # True: ended by eos_id (which is not in `tokens`); False: stopped by a length limit
    score: float | None = None  # beam search: logprob / (len(tokens) + finished) ** length_penalty
    logprob: float | None = None  # beam search: sum of the token log-probs, eos included


# --------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty (Keskar et al. 2019, as in Hugging Face): for tokens already in the sequence,
    positive logits are divided by `penalty` and negative ones multiplied, so both become less likely.

    logits (R, V); seen (R, V) bool. Returns a new tensor.
    """
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def _candidates(logits: Tensor, top_k: int | None, top_p: float | None,
                min_p: float | None) -> tuple[Tensor, Tensor | None]:
    """Apply top-k, then top-p, then min-p to logits (R, V).

    Returns (values, ids): the logits of the candidate tokens, -inf for the filtered-out ones, and
    their token ids (R, C), or ids None when values is still (R, V) in vocabulary order. With top-k
    only the k best are sorted and processed further, which is much cheaper than the whole vocabulary.
    """
    ids = None
    if top_k is not None and top_k < logits.shape[-1]:
        logits, ids = logits.topk(top_k, dim=-1)  # sorted, best first
    if top_p is not None and top_p < 1:
        if ids is None:
            logits, ids = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p: drop a token once the more probable ones
        # before it already hold top_p (the first token always stays)
        logits = logits.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
    if min_p is not None and min_p > 0:
        # min-p (Nguyen et al. 2024): keep tokens at least min_p times as probable as the most probable one
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits, ids


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None) -> Tensor:
    """logits (R, V) with every token removed by top-k, top-p or min-p set to -inf."""
    values, ids = _candidates(logits, top_k, top_p, min_p)
    if ids is None:
        return values
    return torch.full_like(logits, float("-inf")).scatter(-1, ids, values)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token id per row of logits (R, V) from softmax(logits / temperature), filtered. -> (R,)"""
    values, ids = _candidates(logits / temperature, top_k, top_p, min_p)
    choice = torch.multinomial(values.softmax(-1), 1, generator=generator)  # (R, 1)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


# --------------------------------------------------------------------------- the decoding state


def _decoding_model(model: nn.Module | Decodable, config: GenerationConfig) -> nn.Module | Decodable:
    """What decodes: a `Transformer` as it is, or its `StaticCacheModel` as config.compile asks (None: on CUDA).
    The StaticCacheModel is kept on the model (`_static_decoding`), so its compiled step and caches serve every
    later call; it is rebuilt when the model moved to another device."""
    if not isinstance(model, nn.Module):
        if config.compile and not isinstance(model, StaticCacheModel):
            raise ValueError(f"GenerationConfig.compile applies to a Transformer, not to {type(model).__name__}: "
                             "leave it None or False")
        return model
    device = model_dtype_device(model)[1]
    if not (config.compile if config.compile is not None else device.type == "cuda" and isinstance(model, Transformer)):
        return model
    static = model.__dict__.get("_static_decoding")
    if static is None or static.built_on != device:
        static = model.__dict__["_static_decoding"] = StaticCacheModel(model)
    return static


def _start(model: nn.Module | Decodable, batch: int, max_len: int) -> ModelState:
    return TorchState(model, batch, max_len) if isinstance(model, nn.Module) else model.start(batch, max_len)


def _device(model: nn.Module | Decodable) -> torch.device:
    return model_dtype_device(model)[1] if isinstance(model, nn.Module) else model.device


def _prepare_prompts(prompts: Sequence[Sequence[int]], config: GenerationConfig, context: int,
                     vocab_size: int) -> list[list[int]]:
    """Empty prompts start from bos_id; prompts longer than the context keep their last `context` tokens."""
    if len(prompts) == 0:
        raise ValueError("no prompts given: pass a list of token-id lists (an empty list per empty prompt)")
    out = []
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            if config.bos_id is None:
                raise ValueError(f"prompt {i} is empty: set GenerationConfig.bos_id so generation can start")
            prompt = [config.bos_id]
        if min(prompt) < 0 or max(prompt) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside the model's vocabulary [0, {vocab_size})")
        if len(prompt) > context:
            warnings.warn(f"prompt {i} has {len(prompt)} tokens, more than the model's context of {context}: "
                          f"keeping its last {context} tokens", stacklevel=3)
            prompt = prompt[-context:]
        out.append(prompt)
    return out


class _Decoder:
    """Rows of left-padded token sequences on one model state (its KV cache): feeds tokens in, gives
    next-token logits out.

    seq (R, P + N): prompts right-aligned at column P, generated tokens after them; `end` columns are
    filled. real (R, P + N) bool marks non-padding (None when no prompt is padded: the model then needs
    neither positions nor a key mask, the fast path).
    """

    def __init__(self, model: nn.Module | Decodable, prompts: list[list[int]], config: GenerationConfig):
        self.arch = arch = model.config
        self.slide = config.slide
        device = _device(model)
        lengths = [len(p) for p in prompts]
        self.P, N = max(lengths), config.max_new_tokens
        self.can_slide = arch.position in SLIDING_POSITIONS
        # room for the new tokens: all that fit before the context when the positions cannot slide, else
        # a context's worth that `append` doubles as needed (max_new_tokens may be far more than is generated)
        room = min(N, arch.context if self.can_slide else arch.context - self.P + 1)
        self.pad_id = config.pad_id
        self.seq = torch.tensor([[config.pad_id] * (self.P - len(p)) + p + [config.pad_id] * room for p in prompts],
                                device=device)
        self.end = self.P
        self.real = None
        if min(lengths) < self.P:
            pad = torch.tensor([self.P - n for n in lengths], device=device)
            self.real = torch.arange(self.P + room, device=device)[None, :] >= pad[:, None]
        # every token but the last one generated passes through the cache
        self.state = _start(model, len(prompts), min(arch.context, self.P + N - 1))
        self.warned = False

    def at_limit(self) -> bool:
        """True (with a warning) when the cache is full and the positions cannot slide: no token can be fed."""
        if self.state.length < self.state.max_len or self.can_slide:
            return False
        warnings.warn(f"stopped at the context of {self.state.max_len} tokens: "
                      f"{self.arch.position} positions cannot slide past it", stacklevel=2)
        return True

    def prefill(self) -> Tensor:
        """Run the prompts; logits (R, V) for the first new token."""
        return self._run(0)

    def _run(self, start: int) -> Tensor:
        """Refill the cache with columns [start, end) of seq; logits (R, V) at the last one."""
        self.state.restart()
        # positions whose keys/values are the same in all rows of a prompt (see reorder); rows get
        # expanded after the prefill, and a slid window holds each row's own tokens
        self.shared = self.end if start == 0 else 0
        tokens = self.seq[:, start:self.end]
        if self.real is None:
            return self.state.forward(tokens, None, None)
        real = self.real[:, start:self.end]
        positions = (real.cumsum(1) - 1).clamp(min=0)  # real tokens count from 0; padding reuses 0
        self.key_mask = self.real[:, start:]  # cache slot i holds column start + i; later slots are all real
        self.next_pos = positions[:, -1:] + 1
        return self.state.forward(tokens, positions, self.key_mask[:, :self.end - start])

    def append(self, tokens: Tensor) -> None:
        """Record the tokens (R,) chosen for the next column."""
        if self.end == self.seq.shape[1]:  # sliding positions only: double the room (new columns are real)
            more = self.seq.shape[1]
            self.seq = _widen(self.seq, more, self.pad_id)
            if self.real is not None:  # key_mask (columns start: of real) needs as many more as real
                self.real, self.key_mask = _widen(self.real, more, True), _widen(self.key_mask, more, True)
        self.seq[:, self.end] = tokens
        self.end += 1

    def advance(self) -> Tensor:
        """Feed the last appended column; logits (R, V) for the next one. Call only when not at_limit."""
        if self.state.length == self.state.max_len:  # sliding positions: drop the oldest, re-prefill the rest
            if not self.warned:
                warnings.warn(f"generation passed the context of {self.state.max_len} tokens: sliding the window "
                              f"(a re-prefill every {self.slide} token(s))", stacklevel=2)
                self.warned = True
            return self._run(self.end - max(1, self.state.max_len + 1 - self.slide))
        tokens = self.seq[:, self.end - 1:self.end]
        if self.real is None:
            return self.state.forward(tokens, None, None)
        logits = self.state.forward(tokens, self.next_pos, self.key_mask[:, :self.state.length + 1])
        self.next_pos += 1
        return logits

    def expand(self, n: int) -> None:
        """Repeat each row n times (rows b*n + j): samples or beams of one prompt share its prefill."""
        index = torch.arange(self.seq.shape[0], device=self.seq.device).repeat_interleave(n)
        self.state.select(index)
        self._select_rows(index)

    def reorder(self, index: Tensor) -> None:
        """Beam selection: row i continues row index[i] (R,), a row of the same prompt.

        A row that is copied from keeps its own cache (as `_beam_slots` assigns them), and the positions all
        rows of a prompt share (its prompt, unless the window slid) need no copy: see `ModelState.reorder`.
        """
        self.state.reorder(index, self.shared)
        self._select_rows(index)

    def _select_rows(self, index: Tensor) -> None:
        self.seq = self.seq.index_select(0, index)
        if self.real is not None:
            self.real = self.real.index_select(0, index)
            self.key_mask = self.key_mask.index_select(0, index)
            self.next_pos = self.next_pos.index_select(0, index)

    def generated(self) -> Tensor:
        """The new tokens so far, (R, end - P)."""
        return self.seq[:, self.P:self.end]


def _widen(t: Tensor, more: int, fill: int | bool) -> Tensor:
    """t (R, W) -> (R, W + more), the new columns set to fill."""
    return torch.cat([t, t.new_full((t.shape[0], more), fill)], dim=1)


def _seen_tokens(dec: _Decoder, vocab_size: int) -> Tensor:
    """(R, V) bool: which tokens each row's prompt contains (padding excluded), for the repetition penalty."""
    tokens = dec.seq[:, :dec.end]
    if dec.real is not None:  # padding goes to an extra column that is dropped
        tokens = tokens.masked_fill(~dec.real[:, :dec.end], vocab_size)
    seen = torch.zeros(tokens.shape[0], vocab_size + 1, dtype=torch.bool, device=tokens.device)
    return seen.scatter_(1, tokens, True)[:, :vocab_size].contiguous()


def _to_completions(tokens: list[int], eos_id: int | None) -> Completion:
    if eos_id is not None and eos_id in tokens:
        return Completion(tokens[:tokens.index(eos_id)], True)
    return Completion(tokens, False)


def _check_model(model: nn.Module | Decodable) -> None:
    if not hasattr(model, "config") or not hasattr(model.config, "context"):
        raise TypeError("model must be an xlab Transformer (or have its forward/cache interface and a .config), "
                        "or a Decodable such as xlab.onnx.OnnxModel")
    if not isinstance(model, nn.Module) and not hasattr(model, "start"):
        raise TypeError(f"{type(model).__name__} is neither an nn.Module nor a Decodable (no start method)")


class _EvalMode:
    """Run with the model in eval mode (no dropout), then restore its mode; nothing to do for a `Decodable`."""

    def __init__(self, model: nn.Module | Decodable):
        module = model.model if isinstance(model, StaticCacheModel) else model
        self.model = module if isinstance(module, nn.Module) else None

    def __enter__(self):
        if self.model is not None:
            self.training = self.model.training
            self.model.eval()

    def __exit__(self, *exc):
        if self.model is not None:
            self.model.train(self.training)


# --------------------------------------------------------------------------- greedy and sampling


def _decode_steps(dec: _Decoder, config: GenerationConfig, generator: torch.Generator | None) -> Iterator[Tensor]:
    """Greedy search or sampling on `dec`: yields the tokens (R,) chosen at each step, pad_id for rows
    that ended earlier; stops after max_new_tokens, at the context limit, or once every row ended."""
    logits = dec.prefill()
    if config.strategy == "sample" and config.num_return_sequences > 1:
        dec.expand(config.num_return_sequences)  # each prompt prefilled once, its cache copied per sample
        logits = logits.repeat_interleave(config.num_return_sequences, 0)
    vocab_size = logits.shape[-1]
    seen = _seen_tokens(dec, vocab_size) if config.repetition_penalty != 1 else None
    ended = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    eos = config.eos_id
    for step in range(config.max_new_tokens):
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
        if config.strategy == "greedy":
            tokens = logits.argmax(-1)
        else:
            tokens = sample(logits, config.temperature, config.top_k, config.top_p, config.min_p, generator)
        if eos is not None:
            tokens = tokens.masked_fill(ended, config.pad_id)
            ended |= tokens == eos
        dec.append(tokens)
        yield tokens
        if step == config.max_new_tokens - 1:
            return
        if eos is not None and step % SYNC_EVERY == SYNC_EVERY - 1 and bool(ended.all()):
            return
        if dec.at_limit():
            return
        logits = dec.advance()
        if seen is not None:
            seen.scatter_(1, tokens[:, None], True)


# --------------------------------------------------------------------------- beam search


def _beam_slots(src: Tensor) -> Tensor:
    """Which row (slot) of its prompt each continuing beam takes, (B, K), given the beam it extends src (B, K).

    The first (best) continuation of a beam stays in that beam's slot, whose cache already holds its
    history; only the others, which take the slots of beams that had no continuation, need a cache copy.
    """
    B, K = src.shape
    order = torch.arange(K, device=src.device)
    repeat = ((src[:, :, None] == src[:, None, :]) & (order[None, None, :] < order[None, :, None])).any(-1)
    stays = torch.zeros(B, K + 1, dtype=torch.bool, device=src.device)
    stays = stays.scatter_(1, src.masked_fill(repeat, K), True)[:, :K]  # slots kept by their own beam
    free = stays.to(torch.uint8).argsort(dim=1, stable=True)  # free slots first, in order
    return torch.where(repeat, free.gather(1, (repeat.cumsum(1) - 1).clamp(min=0)), src)


def _beam_search(dec: _Decoder, config: GenerationConfig) -> list[list[Completion]]:
    """Beam search with Hugging Face's semantics (transformers >= 4.50 `_beam_search`).

    Per step, over the K x V continuations of each prompt's K beams, the 2K best by total log-prob
    are taken (so K remain after some end); of those, the ones ending (eos, or the length limit)
    among the best K enter the prompt's pool of finished hypotheses, scored logprob / length **
    length_penalty (length counts the generated tokens, eos included); the K best that do not end
    are the next beams. A prompt closes when its pool holds K hypotheses (early_stopping), or when
    no running beam can beat the worst of them (early_stopping=False, HF's heuristic).
    """
    K, N, lp = config.num_beams, config.max_new_tokens, config.length_penalty
    logits = dec.prefill()
    B, V, device = logits.shape[0], logits.shape[-1], logits.device
    dec.expand(K)  # rows b*K + j: beam j of prompt b
    logits = logits.repeat_interleave(K, 0)
    seen = _seen_tokens(dec, V) if config.repetition_penalty != 1 else None
    neg_inf = float("-inf")
    # running log-probs; all K beams start identical, so only beam 0 may be extended at the first step
    running = torch.full((B, K), neg_inf, device=device)
    running[:, 0] = 0.0
    row_offset = torch.arange(B, device=device)[:, None] * K
    # the pool of finished hypotheses: generated tokens, score, log-prob, length, ended by eos
    pool_tokens = torch.full((B, K, dec.seq.shape[1] - dec.P), config.pad_id, dtype=torch.long, device=device)
    pool_score = torch.full((B, K), neg_inf, device=device)
    pool_logprob = torch.full((B, K), neg_inf, device=device)
    pool_len = torch.zeros((B, K), dtype=torch.long, device=device)
    pool_eos = torch.zeros((B, K), dtype=torch.bool, device=device)
    closed = torch.zeros((B, 1), dtype=torch.bool, device=device)
    for step in range(N):
        length = step + 1
        last = step == N - 1 or dec.at_limit()
        logprobs = logits.float().log_softmax(-1)
        if seen is not None:  # HF applies its logits processors to the log-probs in beam search
            logprobs = apply_repetition_penalty(logprobs, seen, config.repetition_penalty)
        total = (logprobs.view(B, K, V) + running[:, :, None]).view(B, K * V)
        top, flat = total.topk(2 * K, dim=-1)  # (B, 2K), best first
        beam, tokens = flat // V, flat % V
        is_eos = tokens == config.eos_id if config.eos_id is not None else torch.zeros_like(tokens, dtype=torch.bool)
        ends = torch.ones_like(is_eos) if last else is_eos

        # candidates among the best K that end join the pool, unless the prompt is closed
        accept = ends[:, :K] & ~closed
        if bool(accept.any()):  # mostly none before the last step: skip the bookkeeping (a sync, as reorder's)
            scores = (top[:, :K] / length ** lp).masked_fill(~accept, neg_inf)
            gen = dec.generated().view(B, K, -1)  # (B, K, step): the running beams' tokens so far
            cand = torch.cat([gen.gather(1, beam[:, :K, None].expand(-1, -1, step)), tokens[:, :K, None]], dim=2)
            keep = torch.cat([pool_score, scores], dim=1).topk(K, dim=1).indices  # (B, K) of 2K
            if length > pool_tokens.shape[2]:  # the decoder's room grew (sliding positions): as wide again
                grow = dec.seq.shape[1] - dec.P - pool_tokens.shape[2]
                pool_tokens = torch.nn.functional.pad(pool_tokens, (0, grow), value=config.pad_id)
            pool_tokens[:, :, :length] = torch.cat([pool_tokens[:, :, :length], cand], 1).gather(
                1, keep[:, :, None].expand(-1, -1, length))
            pool_score = torch.cat([pool_score, scores], 1).gather(1, keep)
            pool_logprob = torch.cat([pool_logprob, top[:, :K]], 1).gather(1, keep)
            pool_len = torch.cat([pool_len, torch.full_like(pool_len, length)], 1).gather(1, keep)
            pool_eos = torch.cat([pool_eos, is_eos[:, :K]], 1).gather(1, keep)
        if last:
            break

        # the best K candidates that do not end continue, each in the slot _beam_slots gives it
        live = top.masked_fill(ends, neg_inf)
        best, pick = live.topk(K, dim=1)
        src = beam.gather(1, pick)
        slot = _beam_slots(src)
        running = torch.empty_like(best).scatter_(1, slot, best)
        index = (torch.empty_like(src).scatter_(1, slot, src) + row_offset).view(-1)
        next_tokens = torch.empty_like(src).scatter_(1, slot, tokens.gather(1, pick)).view(-1)
        full = pool_score.isfinite().all(1, keepdim=True)
        if config.early_stopping:
            closed = full
        else:  # HF: close when even the best running beam, scored at the current length, cannot beat the pool
            hopeless = running.amax(1, keepdim=True) / length ** lp <= pool_score.amin(1, keepdim=True)
            closed = closed | (full & hopeless)
        if step % SYNC_EVERY == SYNC_EVERY - 1 and bool(closed.all()):
            break
        dec.reorder(index)
        dec.append(next_tokens)
        logits = dec.advance()
        if seen is not None:
            seen = seen.index_select(0, index).scatter_(1, next_tokens[:, None], True)

    results = []
    for toks, score, logprob, n, eos in zip(pool_tokens.tolist(), pool_score.tolist(), pool_logprob.tolist(),
                                            pool_len.tolist(), pool_eos.tolist(), strict=True):
        hyps = [Completion(toks[k][:n[k] - eos[k]], eos[k], score[k], logprob[k])
                for k in range(K) if score[k] != neg_inf]
        results.append(hyps[:config.num_return_sequences])
    return results


# --------------------------------------------------------------------------- public entry points


@torch.inference_mode()
def generate(model: nn.Module | Decodable, prompts: Sequence[Sequence[int]], config: GenerationConfig,
             generator: torch.Generator | None = None) -> list[list[Completion]]:
    """Continue each prompt (a list of token ids; may be empty) with `config`'s strategy.

    Returns one list per prompt: num_return_sequences completions (beam search: best first).
    generator seeds sampling: the same seed gives the same tokens (on the same device and dtype).
    """
    _check_model(model)
    config.validate()
    prompts = _prepare_prompts(prompts, config, model.config.context, model.config.vocab_size)
    model = _decoding_model(model, config)
    with _EvalMode(model), OneDNNWeights():
        dec = _Decoder(model, prompts, config)
        if config.strategy == "beam":
            return _beam_search(dec, config)
        for _ in _decode_steps(dec, config, generator):
            pass
        rows = [_to_completions(row, config.eos_id) for row in dec.generated().tolist()]
    n = config.num_return_sequences if config.strategy == "sample" else 1
    return [rows[i:i + n] for i in range(0, len(rows), n)]


def stream(model: nn.Module | Decodable, prompt: Sequence[int], config: GenerationConfig,
           generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield the token ids continuing one prompt as they are decoded (greedy or sampling), eos excluded."""
    _check_model(model)
    config.validate()
    if config.strategy == "beam" or config.num_return_sequences != 1:
        raise ValueError("streaming decodes one sequence: use strategy 'greedy' or 'sample' with "
                         "num_return_sequences=1 (beam search changes earlier tokens until it ends)")
    [prompt] = _prepare_prompts([prompt], config, model.config.context, model.config.vocab_size)
    return _stream(_decoding_model(model, config), prompt, config, generator)


@torch.inference_mode()  # on a generator function, torch enters the mode around each step only
def _stream(model, prompt, config, generator) -> Iterator[int]:
    # entered around each step only: between tokens the caller's own forwards (and other streams) see no copies
    weights = OneDNNWeights()
    with _EvalMode(model):
        steps = _decode_steps(_Decoder(model, [prompt], config), config, generator)
        while True:
            with weights:
                tokens = next(steps, None)
            if tokens is None or int(tokens[0]) == config.eos_id:
                return
            yield int(tokens[0])


class TextStreamer:
    """Turns a stream of token ids into text pieces that never split a multi-byte character.

    Byte-level BPE tokens may end inside a UTF-8 character, which decodes to U+FFFD; such text is
    held back until the following tokens complete it. Pieces joined equal decoding all tokens at once.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []  # tokens since the last whole-character boundary

    def push(self, token: int) -> str:
        """Add one token id; return the newly complete text ('' while a character is incomplete)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        # the text ends on a whole character, so later tokens cannot change it: start afresh (keeps it O(n))
        self.pending = []
        return text

    def flush(self) -> str:
        """The held-back text at the end of the stream (with U+FFFD if the bytes really are invalid)."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text
