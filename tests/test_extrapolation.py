"""Length extrapolation: the model past its training context against the papers' formulas (the naive reference
of test_transformer.py) and a model built for the longer context; per-position losses against a forward pass per
window by hand; `manage.py extrapolate`'s table, plot, TensorBoard curve and one-line errors."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_export import TEXTS, make_training_checkpoint, one_thread, tiny_config, tiny_tokenizer
from test_manage import run
from test_transformer import POSITIONS, model_of, reference_forward
from test_transformer import tiny as tiny_arch

from xlab.data import encode_split
from xlab.extrapolation import Curve, buckets, measure, plot_bins, window_starts
from xlab.transformer import KVCache, Transformer

assert one_thread  # autouse fixture, imported to apply here
EXTENDING = ["sinusoidal", "rope", "alibi", "none"]


@pytest.mark.parametrize("position", EXTENDING)
def test_forward_past_the_context_matches_the_formulas(position):
    model = model_of(tiny_arch(position=position, context=8))
    idx = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(1))  # 3 x the context
    with torch.no_grad():
        logits = model(idx)
        # positions 0..23 by the formulas, in float64: the reference knows no context
        torch.testing.assert_close(logits, reference_forward(model, idx), atol=2e-5, rtol=1e-5)
        # the same weights in a model built for 24 positions, whose tables are precomputed that long
        long = Transformer(tiny_arch(position=position, context=24)).eval()
        long.load_state_dict(model.state_dict())
        torch.testing.assert_close(logits, long(idx), atol=1e-6, rtol=1e-6)
        # per-row positions (left-padded generation) and a KV cache sized past the context, decoding across it
        torch.testing.assert_close(model(idx, positions=torch.arange(24).expand(2, 24)), logits, atol=1e-6, rtol=0)
        cache = KVCache(model.config, 2, max_len=24)
        steps = [model(idx[:, :5], cache)] + [model(idx[:, t:t + 1], cache) for t in range(5, 24)]
        torch.testing.assert_close(torch.cat(steps, 1), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["sinusoidal", "rope"])
def test_tables_within_the_context_are_the_precomputed_ones(position):
    model = Transformer(tiny_arch(position=position, context=8))
    buffers = [model.sinusoid] if position == "sinusoidal" else [model.rope_cos, model.rope_sin]
    assert all(got is want for got, want in zip(model.position_tables(7), buffers, strict=True))  # no copy
    for got, want in zip(model.position_tables(30), buffers, strict=True):
        assert got.shape[0] == 31 and torch.equal(got[:8], want)  # extended, the context's rows unchanged


def direct_sums(model, tokens: np.ndarray, token_bytes: torch.Tensor, starts, seen: int):
    """Summed nats and target bytes per position: one forward per window, cross-entropy in float64."""
    nats, n_bytes = torch.zeros(seen, dtype=torch.float64), torch.zeros(seen, dtype=torch.int64)
    with torch.no_grad():
        for s in starts:
            window = torch.from_numpy(tokens[s:s + seen + 1].astype(np.int64))
            logits = model(window[None, :-1])[0]
            nats += F.cross_entropy(logits.double(), window[1:], reduction="none")
            n_bytes += token_bytes[window[1:]]
    return nats.numpy(), n_bytes.numpy()


@pytest.mark.parametrize("position", POSITIONS)
def test_per_position_sums_match_a_direct_forward(position):
    model = model_of(tiny_arch(position=position, context=8))
    tokens = np.random.default_rng(0).integers(0, 61, 200).astype(np.uint16)
    token_bytes = torch.randint(0, 5, (61,), generator=torch.Generator().manual_seed(2))  # zeros: special tokens
    starts = window_starts(len(tokens), 24, 5)
    assert list(starts) == [0, 24, 72, 96, 144]  # 5 of the 8 windows of 24 + 1 tokens, spread over the split
    nats, n_bytes = measure(model, tokens, token_bytes, 24, starts, batch_size=2)
    seen = 8 if position == "learned" else 24  # learned positions stop at the context
    want_nats, want_bytes = direct_sums(model, tokens, token_bytes, starts, seen)
    np.testing.assert_allclose(nats, want_nats, rtol=1e-5)
    np.testing.assert_array_equal(n_bytes, want_bytes)


def test_buckets_bins_and_curve_means_by_hand():
    assert buckets(8, 32) == [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 24), (25, 32)]
    assert [hi for _, hi in buckets(100, 300)] == [1, 2, 4, 8, 16, 32, 64, 100, 200, 300]
    assert buckets(8, 8)[-1] == (5, 8)
    bins = plot_bins(1000)
    assert bins[0] == (1, 1) and bins[-1][1] == 1000 and len(bins) <= 64
    assert all(lo == prev_hi + 1 and lo <= hi for (lo, hi), (_, prev_hi) in zip(bins[1:], bins, strict=False))
    curve = Curve("x", 2, 4, windows=2, nats=np.array([1.0, 2, 3, 4]), bytes=np.array([1, 0, 2, 3]))
    assert curve.loss(2, 3) == 5 / 4 and curve.bpb(2, 3) == 5 / math.log(2) / 2
    assert math.isnan(curve.bpb(2, 2))  # only special tokens there: no bytes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A prepared data folder (val and test split) and two run folders: RoPE, recording that data as its run's
    (fingerprint and data_dir), and learned positions, recording none. Context 16."""
    root = tmp_path_factory.mktemp("extrap")
    tok = tiny_tokenizer()
    data = root / "data" / "stdlib-abc"
    docs = datasets.Dataset.from_dict({"text": [" ".join(TEXTS[i:i + 12]) for i in range(0, 40, 4)]})
    encode_split(docs, tok, data, "test", 1, "key")
    encode_split(docs.select(range(1)), tok, data, "val", 1, "key")
    ckpts, models = {}, {}
    for position, preset in (("rope", "llama"), ("learned", "gpt2")):
        path = root / position / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        models[position] = make_training_checkpoint(path, tiny_config(preset, tok.vocab_size, context=16), tok)
        if position == "rope":  # as Lightning writes it: the data module's hyperparameters and the fingerprint
            ckpt = torch.load(path, weights_only=True)
            ckpt["xlab"]["data_fingerprint"] = data.name
            ckpt["datamodule_hyper_parameters"] = {"data_dir": str(data.parent)}
            torch.save(ckpt, path)
        ckpts[position] = path
    return {"root": root, "data": data, "tok": tok, "ckpts": ckpts, "models": models}


def test_command_table_plot_and_tensorboard_match_a_direct_forward(runs, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    png = tmp_path / "curves.png"
    ckpts = runs["ckpts"]
    code, out, err = run(capsys, "extrapolate", ckpts["rope"], ckpts["learned"], "--data", runs["data"],
                         "--factor", 2, "--windows", 6, "--batch-size", 4, "--plot", png)
    assert code == 0, err
    assert "learned: learned positions cannot extend past the context of 16: measured positions 1–16 only" in err
    tokens = np.fromfile(runs["data"] / "test.bin", dtype=np.uint16)
    starts = (np.arange(6) * ((len(tokens) - 1) // 32) // 6) * 32
    token_bytes = torch.tensor(runs["tok"].token_bytes())
    table = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:]
             for line in out.splitlines() if line.startswith("| ") and "loss" not in line}
    assert list(table) == ["1", "2", "3–4", "5–8", "9–16", "17–32", "all 1–16", "all 17–32"]
    for i, position in enumerate(("rope", "learned")):
        seen = 32 if position == "rope" else 16
        nats, n_bytes = direct_sums(runs["models"][position], tokens, token_bytes, starts, seen)
        for name, cells in table.items():
            lo, hi = map(int, re.findall(r"\d+", name)[-2:]) if "–" in name else (int(name), int(name))
            if hi > seen:
                assert cells[2 * i:2 * i + 2] == ["–", "–"]
                continue
            loss = nats[lo - 1:hi].sum() / (6 * (hi - lo + 1))
            bpb = nats[lo - 1:hi].sum() / math.log(2) / n_bytes[lo - 1:hi].sum()
            assert abs(float(cells[2 * i]) - loss) < 6e-4 and abs(float(cells[2 * i + 1]) - bpb) < 6e-4, name
        if position == "rope":  # its curve in its run's eval folder, one step per bin
            [log_dir] = (runs["root"] / "rope" / "eval").glob("extrapolate-test-*-last")
            events = EventAccumulator(str(log_dir))
            events.Reload()
            logged = [(e.step, e.value) for e in events.Scalars("extrapolate/test/loss")]
            want = [(hi, nats[lo - 1:hi].sum() / (6 * (hi - lo + 1))) for lo, hi in plot_bins(32)]
            assert [s for s, _ in logged] == [s for s, _ in want]
            np.testing.assert_allclose([v for _, v in logged], [v for _, v in want], rtol=1e-5)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_checkpoint_finds_its_own_data(runs, capsys):
    code, out, err = run(capsys, "extrapolate", runs["ckpts"]["rope"], "--split", "val", "--factor", 1)
    assert code == 0, err
    assert out.startswith("val split, ") and "| all 1–16 |" in out


@pytest.mark.parametrize("argv, message", [
    (["missing.ckpt"], "checkpoint not found: missing.ckpt"),
    (["{rope}", "--factor", "0"], "--factor must be at least 1, got 0"),
    (["{rope}", "--factor", "500"], "the split has {test} tokens, fewer than one window of 8001"),
    (["{rope}", "--split", "train"], "argument --split: invalid choice: 'train'"),
    (["{learned}"], "records no data fingerprint: pass the prepared data folder with --data"),
    (["{rope}", "--data", "{root}"], "the test split in {root} is not prepared"),
    (["{rope}", "--plot", "{data}/test.bin"], "test.bin already exists: choose another output or pass --force"),
])
def test_bad_input_is_one_line(runs, capsys, argv, message):
    fill = {"rope": runs["ckpts"]["rope"], "learned": runs["ckpts"]["learned"], "root": runs["root"],
            "data": runs["data"], "test": len(np.fromfile(runs["data"] / "test.bin", dtype=np.uint16))}
    code, out, err = run(capsys, "extrapolate", *(a.format(**fill) for a in argv))
    assert code == 2 and out == "", err
    assert err.startswith("error: ") and err.count("\n") == 1 and message.format(**fill) in err, err


def test_help_names_every_option(capsys):
    code, out, _ = run(capsys, "extrapolate", "--help")
    assert code == 0
    for flag in ("--split", "--factor", "--windows", "--batch-size", "--data", "--plot", "--device", "--force"):
        assert flag in out


def test_instruments_import_neither_lightning_nor_the_data_module_nor_manage():
    """The instruments are libraries: extrapolation reads token files through `xlab.windows` and the harness takes
    its dtypes from `xlab.checkpoint`, so neither loads Lightning, `datasets`, `xlab.data` or `manage.py`'s
    commands. A fresh interpreter, since this one has imported them all."""
    modules = ["xlab.extrapolation"] + (["xlab.harness"] if importlib.util.find_spec("lm_eval") else [])
    unwanted = ["lightning", "datasets", "xlab.data", "xlab.manage"]
    code = f"import sys, {', '.join(modules)}; print(sorted(m for m in {unwanted} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout == "[]\n", result.stdout
