"""The "xlab" lm-eval model, held to lm-eval's own `hf` model on the `export-hf` folder of the same checkpoint:
the same metrics and per-document results on local tasks (multiple choice, rolling log-likelihood, generation),
and per-request log-likelihoods equal to a plain forward pass."""

from __future__ import annotations

import json
import math
import runpy
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from test_export import make_training_checkpoint, one_thread, tiny_config, tiny_tokenizer

from xlab.manage import main as manage

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
from lm_eval.api.instance import Instance  # noqa: E402  (only once lm_eval is known to be there)
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import xlab.harness  # noqa: E402, F401  (registers "xlab")

assert one_thread  # autouse fixture, imported to apply here
WORDS = "the cat sat on a mat while two dogs ran past , and then it rained over every small town".split()
MC_TASK, PPL_TASK, GEN_TASK = "xlab_test_mc", "xlab_test_ppl", "xlab_test_gen"


def _text(rng: torch.Generator, n: int) -> str:
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=rng).tolist())


def write_tasks(folder: Path) -> None:
    """Three tasks on local JSON lines: documents of different lengths, some longer than the model's context."""
    rng = torch.Generator().manual_seed(0)
    mc = [{"question": _text(rng, 2 + 3 * i), "choices": [_text(rng, 1 + (i + j) % 4) for j in range(3)],
           "answer": i % 3} for i in range(6)]
    ppl = [{"text": _text(rng, n)} for n in (3, 9, 30, 70)]  # 70 words: several 32-token windows
    gen = [{"prompt": _text(rng, 2 + 4 * i), "target": _text(rng, 2)} for i in range(4)]
    common = "dataset_path: json\ntest_split: train\n"
    specs = {
        MC_TASK: (mc, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                      "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        PPL_TASK: (ppl, "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                        "  - metric: bits_per_byte\n"),
        GEN_TASK: (gen, "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
                        "generation_kwargs:\n  until: [' sat']\n  max_gen_toks: 6\n  do_sample: false\n"
                        "metric_list:\n  - metric: exact_match\n"),
    }
    for name, (docs, spec) in specs.items():
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(f"task: {name}\n{common}dataset_kwargs:\n  data_files: {data}\n{spec}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A GPT-2-shaped checkpoint with a 32-token context, its export-hf and export-checkpoint folders, the tasks."""
    tmp = tmp_path_factory.mktemp("harness")
    tok = tiny_tokenizer()
    model = make_training_checkpoint(tmp / "run.ckpt", tiny_config("gpt2", tok.vocab_size), tok)
    manage(["export-hf", str(tmp / "run.ckpt"), str(tmp / "hf")])
    manage(["export-checkpoint", str(tmp / "run.ckpt"), "--output", str(tmp / "export")])
    write_tasks(tmp)
    return tmp, model, tok


def evaluate(model: str, model_args: dict, folder: Path, tasks: list[str]) -> dict:
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=3, device="cpu",
                                   log_samples=True,
                                   task_manager=TaskManager(include_path=str(folder), include_defaults=False))


def hf_args(folder: Path, add_bos_token: bool = True) -> dict:
    """lm-eval's `hf` model on the export. Its BOS is the export's start token, <|endoftext|>: add_bos_token puts it
    before every context, as XLab prompts start after it. Perplexity texts take the tokenizer's default (no BOS
    added): each is conditioned on the prefix token, the same <|endoftext|>, once, as XLab's; add_bos_token
    would add a second one and score it."""
    return {"pretrained": str(folder / "hf"), "dtype": "float32"} | ({"add_bos_token": True} if add_bos_token else {})


def test_results_equal_lm_evals_hf_model_on_the_export(setup, monkeypatch):
    tmp, _, tok = setup
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ours = evaluate("xlab", {"checkpoint": str(tmp / "run.ckpt")}, tmp, [MC_TASK, PPL_TASK, GEN_TASK])
    ref = evaluate("hf", hf_args(tmp), tmp, [MC_TASK, GEN_TASK])
    ppl = evaluate("hf", hf_args(tmp, add_bos_token=False), tmp, [PPL_TASK])
    for task in (MC_TASK, PPL_TASK, GEN_TASK):
        results, samples = ((ppl if task == PPL_TASK else ref)[key] for key in ("results", "samples"))
        for metric, value in results[task].items():
            if isinstance(value, float):  # not the task's alias, nor "N/A" for a stderr
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)
        for a, b in zip(ours["samples"][task], samples[task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            # one response per request: (log-likelihood, is greedy) per choice, a log-likelihood, or a text
            for [x], [y] in zip(a["resps"], b["resps"], strict=True):
                if task == MC_TASK:
                    assert (x[0], x[1]) == (pytest.approx(y[0], rel=1e-5), y[1]), (task, a["doc_id"])
                else:
                    assert x == (y if task == GEN_TASK else pytest.approx(y, rel=1e-5)), (task, a["doc_id"])
    # the tasks measure something: varied generations, finite and distinct perplexities, not all answers alike
    assert len({s["resps"][0][0] for s in ours["samples"][GEN_TASK]}) > 1
    assert math.isfinite(ours["results"][PPL_TASK]["word_perplexity,none"])
    assert len({s["resps"][0][0][0] for s in ours["samples"][MC_TASK]}) == len(ours["samples"][MC_TASK])


def forward_logprobs(model, ids: list[int], n: int) -> tuple[float, bool]:
    """(sum of the log-probs of the last n of ids, whether each is the argmax) from one unbatched forward."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)[-n:]
    target = torch.tensor(ids[-n:])
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihoods_equal_a_plain_forward_and_hf(setup):
    """Per request, batched with padding, including an empty context (the start token alone) and inputs longer
    than the context (the oldest tokens dropped), against one unbatched forward each and against hf. Every context
    starts after <|endoftext|>, as documents do in training; a perplexity text too, which scores its own tokens."""
    tmp, model, tok = setup
    rng = torch.Generator().manual_seed(1)
    pairs = [("", "the cat"), ("the cat", " sat"), (_text(rng, 40), " on a mat"), ("a", " " + _text(rng, 5))]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    xlab_lm = get_model("xlab")(checkpoint=str(tmp / "export"), batch_size=3)
    ours = xlab_lm.loglikelihood(requests, disable_tqdm=True)
    ref = get_model("hf")(**hf_args(tmp), batch_size=3, device="cpu").loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, greedy), (ref_logprob, ref_greedy) in zip(pairs, ours, ref, strict=True):
        ids = [tok.eos_id, *tok.encode(context + continuation)]
        n = len(ids) - 1 - len(tok.encode(context))
        expected = forward_logprobs(model, ids[-33:], n)  # the last context + 1 tokens
        assert (logprob, greedy) == (pytest.approx(expected[0], rel=1e-5), expected[1])
        assert (logprob, greedy) == (pytest.approx(ref_logprob, rel=1e-5), ref_greedy)
    text = _text(rng, 6)
    [rolling] = xlab_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [tok.eos_id, *tok.encode(text)]
    assert rolling == pytest.approx(forward_logprobs(model, ids, len(ids) - 1)[0], rel=1e-5)


@pytest.mark.parametrize("flags, message", [
    ("--model_args checkpoint={tmp}/missing.ckpt --device cpu", "checkpoint not found"),
    ("--model_args checkpoint={tmp}/run.ckpt,max_length=33 --device cpu", "max_length must be in [1, 32]"),
    ("--model_args checkpoint={tmp}/run.ckpt --device cpu --batch_size auto", "batch_size must be a number"),
    ("--model_args checkpoint={tmp}/run.ckpt,compile=maybe --device cpu", "compile must be True or False"),
    ("--model_args checkpoint={tmp}/run.ckpt --device cuda:7", "device cuda:7 is not available"),
])
def test_bad_model_arguments_are_one_line(setup, capsys, monkeypatch, flags, message):
    tmp, _, _ = setup
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    # lm-eval's command line indexes its thousands of built-in tasks first (~15 s here): only ours are needed
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", partial(TaskManager, include_defaults=False))
    with pytest.raises(SystemExit) as exit_:
        xlab.harness.main(["--model", "xlab", *flags.format(tmp=tmp).split(), "--tasks", MC_TASK,
                           "--include_path", str(tmp)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {message}")


def test_without_lm_eval_the_command_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an environment without the eval extra gives
    monkeypatch.delitem(sys.modules, "xlab.harness")
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err == 'error: lm-eval is not installed: pip install -e ".[eval]"\n'
