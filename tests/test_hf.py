"""export-hf and import-hf, held to transformers itself: the folders load with the Auto classes and no
custom code, logits agree within 1e-4 (fp32), greedy generations and token ids are the same."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_export import (
    SAMPLES,
    greedy_reference,
    make_training_checkpoint,
    one_thread,
    randomize,
    raw_tokenizer,
    tiny_config,
    tiny_tokenizer,
)

from xlab.checkpoint import load_checkpoint
from xlab.manage import main

transformers = pytest.importorskip("transformers")
from transformers.testing_utils import CaptureLogger  # noqa: E402  (only once transformers is known to be there)

assert one_thread  # autouse fixture, imported to apply here
HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_export_hf_loads_with_auto_classes_and_matches(tmp_path, tok, preset):
    model = make_training_checkpoint(tmp_path / "run.ckpt", tiny_config(preset, tok.vocab_size), tok)
    out = tmp_path / "hf"
    main(["export-hf", str(tmp_path / "run.ckpt"), str(out)])
    assert HF_FILES <= {p.name for p in out.iterdir()}

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[preset]
    if preset == "llama":
        assert (hf.config.num_attention_heads, hf.config.num_key_value_heads) == (4, 2)  # GQA survives
    ids = torch.randint(0, tok.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-4

    prompt = tok.encode("def add(")
    expected = greedy_reference(model, prompt, 12, tok.eos_id)
    logger = transformers.utils.logging.get_logger("transformers.generation.utils")
    with torch.no_grad(), CaptureLogger(logger) as log:  # settings from the exported generation_config.json
        generated = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert generated[0, len(prompt):].tolist() == expected and len(expected) > 1
    assert "max_length" not in log.out, log.out  # max_new_tokens alone sets the length, without a warning

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in SAMPLES:  # the last sample spells "<|endoftext|>": text to both, not the special id
        assert hf_tok(text).input_ids == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == text
    # the BOS transformers starts an empty input from is the token documents start after in XLab's data,
    # <|endoftext|>, not XLab's <|bos|>, which no training window holds (as GPT-2's files declare it)
    assert (hf_tok.eos_token_id, hf_tok.bos_token_id, hf_tok.pad_token_id) == (tok.eos_id, tok.eos_id, tok.pad_id)
    assert hf.generation_config.eos_token_id == hf.generation_config.bos_token_id == tok.eos_id
    with torch.no_grad():
        unprompted = hf.generate(max_new_tokens=6, do_sample=False)[0, 1:].tolist()
    assert unprompted == greedy_reference(model, [tok.eos_id], 6, tok.eos_id)

    # and back: importing the export gives the same weights
    main(["import-hf", str(out), str(tmp_path / "back")])
    back = load_checkpoint(tmp_path / "back").model.state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(back[name], value), name


def test_import_gpt2_folder_with_vocab_and_merges(tmp_path, tok):
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)
    hf = randomize(transformers.GPT2LMHeadModel(config), seed=3).eval()
    src = tmp_path / "gpt2"
    hf.save_pretrained(src)
    tok.hf.model.save(str(src))  # GPT-2's own tokenizer files: vocab.json + merges.txt
    assert {"vocab.json", "merges.txt"} <= {p.name for p in src.iterdir()}

    main(["import-hf", str(src), str(tmp_path / "xlab")])
    loaded = load_checkpoint(tmp_path / "xlab")
    ids = torch.randint(0, tok.vocab_size, (3, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (loaded.model(ids) - hf(ids).logits).abs().max() <= 1e-4
    assert [loaded.tokenizer.encode(t) for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]
    assert loaded.meta["imported_from"] == "gpt2" and loaded.meta["source"] == str(src)


def test_import_llama_gqa_bf16_with_sentencepiece_style_special_tokens(tmp_path, capsys):
    raw = raw_tokenizer(["<unk>", "<s>", "</s>"])  # Llama's names: no <|endoftext|>
    config = transformers.LlamaConfig(vocab_size=raw.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, rope_theta=500.0, tie_word_embeddings=False,
                                      bos_token_id=1, eos_token_id=2)
    src = tmp_path / "llama"
    randomize(transformers.LlamaForCausalLM(config), seed=4).to(torch.bfloat16).save_pretrained(src)
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(src)

    main(["import-hf", str(src), str(tmp_path / "xlab")])
    assert "'</s>' is named '<|endoftext|>'" in capsys.readouterr().out
    with safe_open(tmp_path / "xlab" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # the source's dtype is kept
    loaded = load_checkpoint(tmp_path / "xlab")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (loaded.model(ids) - hf(ids).logits).abs().max() <= 1e-4

    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    xtok = loaded.tokenizer
    assert (xtok.eos_id, xtok.bos_id) == (hf_tok.eos_token_id, hf_tok.bos_token_id) == (2, 1)
    assert xtok.decode([xtok.eos_id]) == "<|endoftext|>"  # the documented rename, same id
    for text in SAMPLES:
        assert xtok.encode(text) == hf_tok(text, add_special_tokens=False).input_ids, text
    meta = json.loads((tmp_path / "xlab" / "xlab.json").read_text())
    assert meta["renamed_tokens"] == {"</s>": "<|endoftext|>", "<s>": "<|bos|>"}


def test_imported_llama_prompts_start_with_bos_as_transformers_tokenizer_does(tmp_path, capsys):
    """Llama's tokenizers put <s> before the text (a TemplateProcessing post-processor): an imported model is
    prompted with it, as transformers' own tokenizer and generate() prompt the original."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors, trainers

    from xlab.hf import tokenizer_from_hf
    from xlab.infer import main as infer

    raw = raw_tokenizer(["<unk>", "<s>", "</s>"])  # Llama 3 style: byte-level BPE, <s> added by the template
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    config = transformers.LlamaConfig(vocab_size=raw.get_vocab_size(), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32, bos_token_id=1, eos_token_id=2)
    src = tmp_path / "llama"
    hf = randomize(transformers.LlamaForCausalLM(config), seed=6).eval()
    hf.save_pretrained(src)
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(src)
    main(["import-hf", str(src), str(tmp_path / "xlab")])
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    prompt = "def add("
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0, 0] == 1
    with torch.no_grad():
        new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    new = new[0, ids.shape[1]:]
    capsys.readouterr()
    assert infer([str(tmp_path / "xlab"), prompt, "--greedy", "--max-new-tokens", "10"]) == 0
    assert capsys.readouterr().out == prompt + hf_tok.decode(new.tolist()) + "\n"
    assert load_checkpoint(tmp_path / "xlab").tokenizer.encode_prompt(prompt) == ids[0].tolist()

    # Llama 2 style (SentencePiece BPE, as transformers' LlamaTokenizer builds it with add_bos_token)
    sp = HFTokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.train_from_iterator(SAMPLES * 3, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                            show_progress=False))
    model = json.loads(sp.to_str())["model"]
    transformers.LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                                add_bos_token=True).save_pretrained(tmp_path / "llama2")
    llama2 = transformers.AutoTokenizer.from_pretrained(tmp_path / "llama2")
    xtok, _ = tokenizer_from_hf(tmp_path / "llama2")
    for text in SAMPLES:
        assert xtok.encode_prompt(text) == llama2(text).input_ids and llama2(text).input_ids[0] == 1, text
