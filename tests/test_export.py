"""export-checkpoint: a training checkpoint becomes a pickle-free folder (safetensors + JSON) with a
content hash; and the shared helpers (tiny tokenizer, presets, fake Lightning checkpoints) of the
other interop tests."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from xlab.checkpoint import CheckpointError, load_checkpoint
from xlab.manage import main
from xlab.tokenizer import Tokenizer
from xlab.transformer import Transformer, TransformerConfig

TEXTS = ["def add(x, y):\n    return x + y\n", "class Point:\n    pass\n", "héllo wörld, 你好! <b>bold</b>",
         "for i in range(10):\n    print(i * 2)\n", "import os\nimport sys\n"] * 10
SAMPLES = ["def add(a, b): return a + b", "héllo 你好 wörld", "  spaces\tand\nnewlines ", "<|endoftext|> is text"]

# the architectures that map to Hugging Face: GPT-2 (learned positions, LayerNorm, tanh GELU, biases, tied)
# and Llama (RoPE, RMSNorm, SwiGLU, no biases, untied) with grouped-query attention (4 query heads, 2 kv heads)
PRESETS = {
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=True),
    "llama": dict(position="rope", norm="rmsnorm", norm_bias=False, mlp="swiglu", bias=False, tie_embeddings=False,
                  n_kv_heads=2, d_ff=48, rope_theta=500.0),
}


def tiny_tokenizer(vocab_size: int = 300) -> Tokenizer:
    """XLab's byte-level BPE trained on a few lines."""
    return Tokenizer.train(iter(TEXTS), vocab_size, show_progress=False)


def raw_tokenizer(special_tokens: list[str], vocab_size: int = 300):
    """A `tokenizers.Tokenizer` with other special tokens than XLab's (Llama's <s>, </s>, ...)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    return tok


def tiny_config(preset: str = "gpt2", vocab_size: int = 300, **overrides) -> TransformerConfig:
    fields = dict(vocab_size=vocab_size, context=32, n_layers=2, n_heads=4, d_model=32, **PRESETS.get(preset, {}))
    return TransformerConfig(**{**fields, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values everywhere: init leaves biases at 0 and norm weights at 1, which would hide
    a bias or norm that a conversion drops or swaps. Larger weights also keep greedy argmaxes clear of ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def make_training_checkpoint(path: Path, config: TransformerConfig, tok: Tokenizer, seed: int = 0) -> Transformer:
    """What `LanguageModel.on_save_checkpoint` + Lightning write, without Lightning: the weights under
    `model.`, the `xlab` entry, and real AdamW state after one step (two moments per parameter)."""
    model = randomize(Transformer(config), seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randint(0, config.vocab_size, (2, 8))).logsumexp(-1).mean().backward()
    optimizer.step()
    torch.save({"epoch": 0, "global_step": 3, "pytorch-lightning_version": "2.5.0",
                "state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
                "hyper_parameters": {"arch": asdict(config), "learning_rate": 1e-4},
                "xlab": {"arch": asdict(config), "tokenizer": tok.to_str(), "step": 3, "tokens_seen": 100,
                         "val_loss": 2.5}}, path)
    return model.eval()


def greedy_reference(model, prompt: list[int], steps: int, eos_id: int, keep_eos: bool = True) -> list[int]:
    """Argmax over a full forward pass per token: no cache, nothing shared with generate.py, HF or ONNX.
    Stops after eos_id, which ends the result unless keep_eos is False (as generate's completions)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            if ids[-1] == eos_id:
                if not keep_eos:
                    ids.pop()
                break
    return ids[len(prompt):]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run in one thread: on a loaded 2-core machine, 2 intra-op threads make each forward
    ~50x slower (threads wait on each other), and tiny matmuls gain nothing from them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok) -> tuple[Path, Transformer]:
    """A training checkpoint, shared read-only by this file's tests (each writes to its own tmp_path)."""
    # wide enough that the tokenizer's JSON is small beside the weights, as in real models
    config = tiny_config("gpt2", tok.vocab_size, d_model=64, n_layers=3)
    path = tmp_path_factory.mktemp("run") / "last.ckpt"
    return path, make_training_checkpoint(path, config, tok)


def test_export_is_weights_config_tokenizer_and_a_third_of_the_size(ckpt, tok, tmp_path):
    path, model = ckpt
    path = Path(shutil.copy(path, tmp_path / "last.ckpt"))
    main(["export-checkpoint", str(path)])
    out = path.with_suffix("")  # the default output: the checkpoint's name without .ckpt
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "tokenizer.json", "xlab.json"]
    # weights and Adam's two moments: the training checkpoint is about three times the weights
    ratio = path.stat().st_size / sum(p.stat().st_size for p in out.iterdir())
    assert 2.6 < ratio < 3.3, ratio
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    assert stored.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(stored[k], v), k
    meta = json.loads((out / "xlab.json").read_text())
    assert (meta["step"], meta["tokens_seen"], meta["val_loss"]) == (3, 100, 2.5)
    assert meta["arch"] == asdict(model.config) and "optimizer_states" not in meta
    for name in ("model.safetensors", "tokenizer.json"):
        assert meta["sha256"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert Tokenizer.load(out).encode(SAMPLES[1]) == tok.encode(SAMPLES[1])


def test_exported_and_training_checkpoints_compute_the_same(ckpt, tmp_path):
    path, model = ckpt
    out = tmp_path / "exported"
    main(["export-checkpoint", str(path), "--output", str(out)])
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = model(ids)
        for source in (path, out):
            loaded = load_checkpoint(source)
            assert not loaded.model.training
            torch.testing.assert_close(loaded.model(ids), expected, rtol=0, atol=0)
    assert loaded.model.lm_head.weight is loaded.model.wte.weight  # still tied after loading


def test_dtype_casts_the_stored_weights(ckpt, tmp_path):
    path, model = ckpt
    main(["export-checkpoint", str(path), "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert torch.equal(f.get_tensor("wte.weight"), model.wte.weight.detach().bfloat16())


def test_refuses_to_overwrite_unless_forced(ckpt, capsys, tmp_path):
    path, _ = ckpt
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(["export-checkpoint", str(path), "--output", str(out)])
    assert exit_.value.code != 0 and "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    main(["export-checkpoint", str(path), "--output", str(out), "--force"])
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "tokenizer.json", "xlab.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary left beside it


@pytest.mark.parametrize("damage", ["flip", "truncate", "tokenizer"])
def test_content_hash_is_verified_on_load(ckpt, tmp_path, damage):
    path, _ = ckpt
    out = tmp_path / "exported"
    main(["export-checkpoint", str(path), "--output", str(out)])
    target = out / ("tokenizer.json" if damage == "tokenizer" else "model.safetensors")
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # one changed byte in the tensor data (or in a merge) keeps the file well-formed
        data[-10] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{target.name} does not match the content hash"):
        load_checkpoint(out)


def test_loading_never_unpickles_arbitrary_objects(tmp_path, tok):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # unpickling this would create the marker file
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    config = tiny_config(vocab_size=tok.vocab_size)
    torch.save({"state_dict": {}, "xlab": {"arch": asdict(config), "tokenizer": tok.to_str(), "x": Payload()}}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("record", ["no entry", "no weights hash", "no tokenizer hash", "not a mapping"])
def test_an_export_without_its_hashes_is_refused(ckpt, tmp_path, record):
    path, _ = ckpt
    out = tmp_path / "exported"
    main(["export-checkpoint", str(path), "--output", str(out)])
    meta = json.loads((out / "xlab.json").read_text())
    hashes = meta.pop("sha256")
    if record == "no weights hash":
        meta["sha256"] = {"tokenizer.json": hashes["tokenizer.json"]}
    elif record == "no tokenizer hash":
        meta["sha256"] = {"model.safetensors": hashes["model.safetensors"]}
    elif record == "not a mapping":
        meta["sha256"] = hashes["model.safetensors"]
    (out / "xlab.json").write_text(json.dumps(meta))
    weights = bytearray((out / "model.safetensors").read_bytes())
    weights[-10] ^= 0x01  # a modified weight the missing hash would have caught
    (out / "model.safetensors").write_bytes(bytes(weights))
    missing = "tokenizer.json" if record == "no tokenizer hash" else "model.safetensors"
    with pytest.raises(CheckpointError, match=f"records no SHA-256 for {missing}"):
        load_checkpoint(out)
