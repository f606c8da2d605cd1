"""manage.py as a command line: --help, inspect, and bad input (one `error:` line, non-zero exit, no
traceback, nothing half-written left behind, an existing output untouched)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_script
from test_export import make_training_checkpoint, one_thread, raw_tokenizer, tiny_config, tiny_tokenizer
from test_optim import optimizer_of

from xlab import manage
from xlab.module import LanguageModel
from xlab.tokenizer import Tokenizer

assert one_thread  # autouse fixture, imported to apply here
COMMANDS = {"export-checkpoint": ["--output", "--dtype", "--force"], "export-hf": ["--dtype", "--force"],
            "import-hf": ["--dtype", "--force", "--pad-vocab-to"], "export-onnx": ["--kv-cache", "--opset", "--force"],
            "inspect": []}


def run(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `manage.py argv`, in this process (a subprocess costs seconds)."""
    try:
        manage.main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tok) -> dict[str, Path]:
    """A training checkpoint, its export, and its Hugging Face folder; read-only for the tests."""
    root = tmp_path_factory.mktemp("sources")
    make_training_checkpoint(root / "run.ckpt", tiny_config("llama", tok.vocab_size), tok)
    manage.main(["export-checkpoint", str(root / "run.ckpt"), "--output", str(root / "exported")])
    manage.main(["export-hf", str(root / "run.ckpt"), str(root / "hf")])
    return {"ckpt": root / "run.ckpt", "exported": root / "exported", "hf": root / "hf"}


def test_every_command_has_help_with_its_flags(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and all(name in out for name in COMMANDS)
    for name, flags in COMMANDS.items():
        code, out, _ = run(capsys, name, "--help")
        assert code == 0 and all(flag in out for flag in flags), (name, out)


def test_inspect_training_checkpoint_and_export(tmp_path, tok, capsys):
    model = make_training_checkpoint(tmp_path / "run.ckpt", tiny_config("gpt2", tok.vocab_size), tok)
    run(capsys, "export-checkpoint", tmp_path / "run.ckpt", "--output", tmp_path / "exported")
    # by hand: embeddings 300x32 (tied head) + positions 32x32; per block two LayerNorms (2x64),
    # qkv 32x96+96, proj 32x32+32, up 32x128+128, down 128x32+32; final LayerNorm 64
    block = 2 * 64 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    embeddings = 300 * 32 + 32 * 32
    total = embeddings + 2 * block + 64
    assert total == sum(p.numel() for p in model.parameters())  # the hand count is right
    for path in (tmp_path / "run.ckpt", tmp_path / "exported"):
        code, out, err = run(capsys, "inspect", path)
        assert code == 0, err
        for line in (f"total: {total:,}", f"without embeddings: {total - embeddings:,}", "optimizer steps: 3",
                     "tokens seen: 100", "validation loss: 2.5000", "vocab size: 300", "position: learned",
                     "n_layers: 2", "eos '<|endoftext|>' = 0", "bos '<|bos|>' = 1", "pad '<|pad|>' = 2"):
            assert line in out, (line, out)
        files = [path] if path.is_file() else sorted(path.iterdir())
        for f in files:
            assert f"{f.name}: " in out and f"({f.stat().st_size:,} bytes)" in out


def test_inspect_lists_which_optimizer_steps_which_parameters(tmp_path, tok, sources, capsys):
    """Muon's and AdamW's groups in a training checkpoint, counted by hand (tiny llama: per block qkv 64x32, proj
    32x32, up 96x32, down 32x48, two RMSNorms of 32; wte and the untied head 300x32; final norm 32), at the
    schedule's first step (warmup 1/100). A checkpoint from before the group names gives counts only."""
    config = tiny_config("llama", tok.vocab_size)
    make_training_checkpoint(tmp_path / "muon.ckpt", config, tok)
    checkpoint = torch.load(tmp_path / "muon.ckpt", weights_only=True)
    optimizer = optimizer_of(LanguageModel(config, optimizer="muon", learning_rate=0.002))["optimizer"]
    torch.save(checkpoint | {"optimizer_states": [optimizer.state_dict()]}, tmp_path / "muon.ckpt")
    code, out, err = run(capsys, "inspect", tmp_path / "muon.ckpt")
    assert code == 0, err
    assert "\n".join([
        "optimizer groups:",
        "  hidden (Muon): 8 tensors, 15,360 parameters, lr 0.05 (now 0.0005), weight decay 0",
        "    blocks.*.attn.qkv.weight, blocks.*.attn.proj.weight, blocks.*.mlp.up.weight, blocks.*.mlp.down.weight",
        "  embeddings+other (AdamW): 6 tensors, 9,760 parameters, lr 0.002 (now 2e-05), weight decay 0",
        "    wte.weight, blocks.*.norm1.weight, blocks.*.norm2.weight, norm.weight",
        "  head (AdamW): 1 tensor, 9,600 parameters, lr 0.002 (now 2e-05), weight decay 0.1",
        "    lm_head.weight",
        "tokenizer:"]) in out, out
    code, out, err = run(capsys, "inspect", sources["ckpt"])  # AdamW over model.parameters(), one group
    assert "optimizer groups:\n  group 0: 15 tensors, lr 0.0001 (now 0.0001), weight decay 0.01\ntokenizer:" in out
    code, out, err = run(capsys, "inspect", sources["exported"])
    assert code == 0 and "optimizer groups" not in out  # an export has no optimizer state


def test_inspect_onnx_describes_the_graph_as_onnxruntime_sees_it(tmp_path, tok, capsys):
    ort = pytest.importorskip("onnxruntime")
    make_training_checkpoint(tmp_path / "run.ckpt", tiny_config("llama", tok.vocab_size), tok)
    for kv_cache in (True, False):
        path = tmp_path / f"model{int(kv_cache)}.onnx"
        run(capsys, "export-onnx", tmp_path / "run.ckpt", path, *(["--kv-cache"] if kv_cache else []), "--opset", 18)
        code, out, err = run(capsys, "inspect", path)
        assert code == 0, err
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        expected = [f"{path} (ONNX graph)", "opset: 18", f"KV cache: {'yes' if kv_cache else 'no'}",
                    "n_layers: 2", "position: rope", "vocab size: 300", f"({path.stat().st_size:,} bytes)"]
        for arg in (*session.get_inputs(), *session.get_outputs()):  # e.g. "past_k: float32 (2, batch, 2, past, 8)"
            dtype = arg.type.removeprefix("tensor(").removesuffix(")").replace("float", "float32")
            expected.append(f"{arg.name}: {dtype} ({', '.join(map(str, arg.shape))})")
        for line in expected:
            assert line in out, (line, out)
    (tmp_path / "bad.onnx").write_text("not a graph")
    expect_error(capsys, tmp_path, "inspect", tmp_path / "bad.onnx", match="cannot read ONNX file")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    err = expect_error(capsys, tmp_path, "inspect", tmp_path / "weights.bin", match="cannot read checkpoint")
    assert "inspect reads a training checkpoint (.ckpt), an exported folder or an .onnx file" in err


def expect_error(capsys, where: Path, *argv, match: str) -> str:
    """Run argv; assert one clear `error:` line mentioning match, and no temporary left in `where`."""
    before = sorted(p.name for p in where.iterdir())
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out)  # bad input: exit status 2, as infer.py and argparse
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    assert sorted(p.name for p in where.iterdir()) == before  # nothing new, nothing half-written
    return err


@pytest.mark.parametrize("command", ["export-checkpoint", "export-hf", "export-onnx", "inspect"])
def test_missing_checkpoint(tmp_path, capsys, command):
    outputs = [tmp_path / "out"] if command in ("export-hf", "export-onnx") else []
    argv = [command, tmp_path / "missing.ckpt", *outputs]
    expect_error(capsys, tmp_path, *argv, match="checkpoint not found")


def test_unreadable_training_checkpoint(tmp_path, capsys, sources):
    data = sources["ckpt"].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    for name in ("cut.ckpt", "text.ckpt"):
        expect_error(capsys, tmp_path, "export-checkpoint", tmp_path / name, "--output", tmp_path / "out",
                     match="cannot read checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    expect_error(capsys, tmp_path, "inspect", tmp_path / "foreign.ckpt", match="not an XLab training checkpoint")


def test_truncated_export_is_refused_by_every_command(tmp_path, capsys, sources):
    broken = Path(shutil.copytree(sources["exported"], tmp_path / "broken"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for argv in (["inspect", broken], ["export-hf", broken, tmp_path / "hf"],
                 ["export-onnx", broken, tmp_path / "m.onnx"]):
        expect_error(capsys, tmp_path, *argv, match="does not match the content hash")


@pytest.mark.parametrize("option, value, match", [
    ("position", "alibi", "position='alibi'"), ("prenorm", False, "prenorm=False"),
    ("qk_norm", True, "qk_norm=True"), ("norm", "rmsnorm", "norm='rmsnorm'")])
def test_export_hf_names_the_option_that_does_not_map(tmp_path, tok, capsys, option, value, match):
    make_training_checkpoint(tmp_path / "run.ckpt", tiny_config("gpt2", tok.vocab_size, **{option: value}), tok)
    expect_error(capsys, tmp_path, "export-hf", tmp_path / "run.ckpt", tmp_path / "hf", match=match)


def hf_variant(tmp_path: Path, sources, damage: str) -> Path:
    """A copy of the good Hugging Face folder with one thing wrong."""
    src = Path(shutil.copytree(sources["hf"], tmp_path / "src"))
    if damage == "no config":
        (src / "config.json").unlink()
    elif damage == "bert":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))
    elif damage == "truncated weights":
        weights = src / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "no weights":
        (src / "model.safetensors").unlink()
    elif damage == "no tokenizer":
        (src / "tokenizer.json").unlink()
    elif damage == "tokenizer without eos":
        raw_tokenizer(["<unk>", "<s>"]).save(str(src / "tokenizer.json"))
        (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
        for name in ("config.json", "generation_config.json"):
            data = json.loads((src / name).read_text())
            (src / name).write_text(json.dumps({**data, "eos_token_id": None}))
    return src


@pytest.mark.parametrize("damage, match", [
    ("no config", "config.json is missing"), ("bert", "holds a 'bert' model: only gpt2 and llama"),
    ("truncated weights", "truncated or corrupt"), ("no weights", "has no weights"),
    ("no tokenizer", "has no tokenizer"), ("tokenizer without eos", "declares no eos_token")])
def test_import_hf_bad_folders(tmp_path, capsys, sources, damage, match):
    src = hf_variant(tmp_path, sources, damage)
    expect_error(capsys, tmp_path, "import-hf", src, tmp_path / "out", match=match)
    expect_error(capsys, tmp_path, "import-hf", tmp_path / "nowhere", tmp_path / "out", match="not found")


@pytest.mark.parametrize("command", ["export-checkpoint", "export-hf", "import-hf", "export-onnx"])
def test_existing_output_is_kept_unless_forced(tmp_path, capsys, sources, command):
    source = sources["hf"] if command == "import-hf" else sources["ckpt"]
    output = tmp_path / ("out.onnx" if command == "export-onnx" else "out")
    if command == "export-onnx":
        output.write_text("keep")
    else:
        output.mkdir()
        (output / "mine.txt").write_text("keep")
    argv = [command, source] + (["--output", output] if command == "export-checkpoint" else [output])
    expect_error(capsys, tmp_path, *argv, match="already exists")
    assert (output.read_text() if output.is_file() else (output / "mine.txt").read_text()) == "keep"
    code, _, err = run(capsys, *argv, "--force")
    assert code == 0, err
    assert not (output / "mine.txt").exists() and output.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name]  # nothing else beside it


def test_failure_while_writing_leaves_the_old_output_and_no_temporary(tmp_path, capsys, sources, monkeypatch):
    output = Path(shutil.copytree(sources["exported"], tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in output.iterdir()}

    def disk_full(self, path):
        Path(path).write_text("{ half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Tokenizer, "save", disk_full)
    expect_error(capsys, tmp_path, "export-checkpoint", sources["ckpt"], "--output", output, "--force",
                 match="No space left on device")
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before


def test_errors_from_the_script_itself(tmp_path, sources):
    """The real entry point: exit status 2, one line on stderr, no traceback."""
    result = run_script("manage.py", "import-hf", sources["exported"], tmp_path / "out", check=False, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "config.json is missing" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
