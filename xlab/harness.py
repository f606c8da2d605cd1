"""XLab checkpoints as a model of EleutherAI's lm-evaluation-harness (`lm-eval`), registered as "xlab".

    ./evaluate.py --model xlab --model_args checkpoint=CKPT --tasks hellaswag,lambada_openai --batch_size 16

`./evaluate.py` is lm-eval's own command line (every flag of `lm_eval run`) with this module imported first:
lm-eval 0.4 finds models only in its built-in table or among classes registered in the running process (no
entry points), so the plain `lm_eval` command cannot see an out-of-tree model. In Python,
`import xlab.harness` and then `lm_eval.simple_evaluate(model="xlab", model_args={"checkpoint": ...}, ...)`.

Requests are scored as lm-eval's `hf` model scores them: contexts and continuations are split by lm-eval's own
`TemplateLM`, windows of `loglikelihood_rolling` come from lm-eval's `get_rolling_token_windows`, inputs longer
than `max_length` keep their last tokens. A context is encoded as every XLab prompt (`Tokenizer.encode_prompt`:
after the start token, `<|endoftext|>` for XLab's tokenizers, as documents start in training), an empty one is the
start token alone (`prefix_token_id`), and a perplexity text is conditioned on the start token once, which is not
scored. So results equal `--model hf` on the `export-hf` folder of the same checkpoint with `add_bos_token=True`
(its BOS is the start token) on log-likelihood and generation tasks, and with the tokenizer's default on perplexity
tasks (`add_bos_token=True` would score the BOS after the prefix token, which is the same token). Generation runs
on XLab's KV cache (`xlab.generate`), and lm-eval's stop sequences cut the decoded text.

lm-eval is an optional dependency (`pip install -e ".[eval]"`); XLab without it never imports this module.
"""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from xlab.checkpoint import DTYPES, CheckpointError, load_checkpoint
from xlab.generate import GenerationConfig, generate

NOT_INSTALLED = 'lm-eval is not installed: pip install -e ".[eval]"'

try:
    import lm_eval.models  # noqa: F401  (fills the registry first: lm-eval only does so while it is empty)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError as err:
    if (err.name or "").split(".")[0] != "lm_eval":
        raise
    raise ModuleNotFoundError(NOT_INSTALLED, name="lm_eval") from None


class HarnessError(ValueError):
    """Bad model arguments: reported as one line by `./evaluate.py`."""


@register_model("xlab")
class XLabLM(TemplateLM):
    """An XLab training checkpoint (.ckpt) or exported folder as an lm-eval model.

    model_args: checkpoint (required), tokenizer (for a checkpoint that carries none), dtype (float32,
    bfloat16, float16; default: as stored), max_length (default: the model's context), compile (generate_until's
    compiled static-cache decoding, `GenerationConfig.compile`: default on CUDA; False: eager). lm-eval's own
    --device (default: cuda when available) and --batch_size (a number; default 1) also arrive here.
    """

    def __init__(self, checkpoint: str | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 1, max_length: int | None = None, tokenizer: str | None = None,
                 compile: bool | None = None) -> None:
        super().__init__()
        if checkpoint is None:
            raise HarnessError("no checkpoint: pass --model_args checkpoint=PATH (a .ckpt or an exported folder)")
        if dtype is not None and dtype not in DTYPES:
            raise HarnessError(f"dtype must be one of {', '.join(sorted(DTYPES))}, got {dtype!r}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise HarnessError(f"batch_size must be a number >= 1, got {batch_size!r} (the xlab model has no 'auto')")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._device = torch.device(device)
        if self._device.type == "cuda" and (self._device.index or 0) >= torch.cuda.device_count():  # lm-eval's default
            raise HarnessError(f"device {device} is not available: pass --device cpu")
        loaded = load_checkpoint(checkpoint, device=device, tokenizer=tokenizer,
                                 dtype=DTYPES[dtype] if dtype else None)
        self.model, self.tok = loaded.model, loaded.tokenizer
        self.batch_size = int(batch_size)
        if compile not in (None, True, False):
            raise HarnessError(f"compile must be True or False, got {compile!r}")
        self.compile = compile
        context = self.model.config.context
        self.max_length = context if max_length is None else int(max_length)
        if not 1 <= self.max_length <= context:
            raise HarnessError(f"max_length must be in [1, {context}] (the model's context), got {max_length}")
        self._prefix_token_id = self.tok.start_id  # what an empty context is conditioned on

    # ------------------------------------------------------------------ what TemplateLM builds on

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token_id

    @property
    def max_gen_toks(self) -> int:
        return 256  # lm-eval's default, as its hf model's

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # a context is a prompt (`Tokenizer.encode_prompt`: after the start token); False: the bare text
        return self.tok.encode(string) if add_special_tokens is False else self.tok.encode_prompt(string)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.hf.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether greedy decoding gives it) per (key, context, continuation).

        Longest first, in batches of batch_size, one forward each: right padding leaves a causal model's
        outputs at the real positions unchanged, so no mask is needed.
        """
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in collator.get_batched(n=self.batch_size):
            longest = max(len(continuation) for _, _, continuation in chunk)
            if longest > self.max_length:  # (as hf) the window cannot hold it: no score rather than a wrong one
                raise HarnessError(f"a continuation of {longest} tokens is longer than max_length={self.max_length}")
            # the model reads all tokens but the last; beyond max_length, the context loses its oldest tokens
            inputs = [(context + continuation)[-(self.max_length + 1):-1] for _, context, continuation in chunk]
            width = max(map(len, inputs))
            batch = torch.tensor([ids + [self.tok.pad_id] * (width - len(ids)) for ids in inputs], device=self.device)
            with torch.inference_mode():
                logprobs = self.model(batch).float().log_softmax(-1)
            for (key, _, continuation), ids, row in zip(chunk, inputs, logprobs, strict=True):
                scored = row[len(ids) - len(continuation):len(ids)]  # the positions that predict the continuation
                target = torch.tensor(continuation, device=self.device)
                answer = (float(scored.gather(1, target[:, None]).sum()), bool((scored.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:  # rolling windows have no key; loglikelihood_rolling caches their sum
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    # ------------------------------------------------------------------ the other two request types

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of max_length tokens that each predict new tokens only. A text
        is conditioned on the start token (the prefix token) once and that token is not scored: the first window
        predicts the text's first token from it."""
        windows, counts = [], []
        for (text,) in tqdm([req.args for req in requests], disable=disable_tqdm):
            doc = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows += doc
            counts.append(len(doc))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, start = [], 0
        for req, n in zip(requests, counts, strict=True):
            totals.append(sum(logprob for logprob, _ in scores[start:start + n]))
            start += n
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, totals[-1])
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop sequence, the end-of-document token or max_gen_toks tokens."""
        collator = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                            group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, [gen_kwargs, *_] = zip(*chunk, strict=True)  # a chunk shares its gen_kwargs
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            config = self._generation_config(kwargs)
            room = self.max_length - config.max_new_tokens  # the context keeps its last tokens, as hf's
            if room < 1:
                raise HarnessError(f"max_gen_toks={config.max_new_tokens} leaves no room for a context in "
                                   f"max_length={self.max_length}")
            prompts = [self.tok_encode(context)[-room:] for context in contexts]
            completions = generate(self.model, prompts, config)
            for context, [completion] in zip(contexts, completions, strict=True):
                text = postprocess_generated_text(self.tok_decode(completion.tokens), until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return collator.get_original(results)

    def _generation_config(self, kwargs: dict) -> GenerationConfig:
        """Greedy search, or sampling when lm-eval's do_sample says so; options XLab lacks are an error."""
        max_new_tokens, do_sample = kwargs.pop("max_gen_toks"), kwargs.pop("do_sample")
        temperature = kwargs.pop("temperature", 1.0)  # normalize_gen_kwargs sets 0 unless sampling; 1: transformers'
        sampling = {k: kwargs.pop(k) for k in ("top_k", "top_p") if k in kwargs}
        if kwargs:
            raise HarnessError(f"generation options the xlab model does not support: {', '.join(sorted(kwargs))}")
        ids = {"eos_id": self.tok.eos_id, "bos_id": self.prefix_token_id, "pad_id": self.tok.pad_id,
               "compile": self.compile}
        try:
            if do_sample:
                return GenerationConfig(strategy="sample", max_new_tokens=max_new_tokens, temperature=temperature,
                                        **sampling, **ids)
            return GenerationConfig(strategy="greedy", max_new_tokens=max_new_tokens, **sampling, **ids)
        except ValueError as err:  # e.g. top_k without do_sample, or do_sample with temperature 0
            raise HarnessError(f"generation options: {err}") from None


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line with the "xlab" model registered; bad model arguments end in one `error:` line."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    if argv is not None:  # lm-eval's parser reads sys.argv itself
        sys.argv = [saved[0], *argv]
    try:
        cli_evaluate()
    except (CheckpointError, HarnessError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv = saved
