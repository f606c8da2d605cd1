"""Sharded training (FSDP2, conf/extra/fsdp.yaml) on two CPU processes with gloo, against DDP on the same data.

The sharded run stops at step 4 and resumes from its last.ckpt to step 8; DDP runs straight through. Both
validate every 2 steps and clip gradients. The sharded curve must be DDP's at every step (loss, global
gradient norm), its validation samples the same, its weights at the end the same, weight decay on every
matrix, MFU from the full model's FLOPs, and its checkpoint a single file that infer.py and manage.py read.
Sharded validation over windows that do not split evenly between the processes finishes, with exact figures.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import ROOT, run_cli, run_script, tiny_args
from lightning.pytorch.strategies import FSDPStrategy
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_data import make_corpus
from test_distributed import free_port
from test_export import greedy_reference
from test_metrics import table_value
from torch.distributed.device_mesh import init_device_mesh

from xlab import infer, manage
from xlab.checkpoint import load_checkpoint
from xlab.cli import check_hardware, main
from xlab.data import XLabDataModule
from xlab.fsdp import full_copy, shard
from xlab.kernels import OneDNNWeights
from xlab.loss import IGNORE_INDEX
from xlab.transformer import Transformer, TransformerConfig

STEPS, PEAK_FLOPS = 8, 1e12


def fit(tmp_path: Path, name: str, *extra: str, steps: int = STEPS) -> Path:
    """Two CPU processes, fp32; returns the logger's folder. The schedule spans STEPS however long the run."""
    args = tiny_args(tmp_path, steps=steps, **{
        "trainer.accelerator": "cpu", "trainer.devices": 2, "trainer.precision": "32",
        "trainer.gradient_clip_val": 0.5, "model.schedule.total_steps": STEPS, "model.sample_tokens": 12,
        "throughput.peak_flops": PEAK_FLOPS, "trainer.logger.init_args.save_dir": tmp_path / name})
    result = run_script("xlab.py", "fit", *extra, *args, env={"MASTER_PORT": str(free_port())})
    for noise in ("returned a view tensor", "sync_dist=True"):  # FSDP2's and Lightning's, about nothing wrong here
        assert noise not in result.stderr, result.stderr
    return tmp_path / name


def events(root: Path) -> list[EventAccumulator]:
    # a resumed run logs to its own folder, each start to an events file of its own
    runs = [EventAccumulator(str(file)) for file in sorted(root.glob("version_*/events.out.tfevents.*"))]
    for run in runs:
        run.Reload()
    return runs


def scalars(root: Path, tag: str) -> dict[int, float]:
    """step -> value of a TensorBoard scalar over every run (version) under root."""
    return {e.step: e.value for run in events(root) for e in run.Scalars(tag)}


def samples(root: Path) -> dict[int, str]:
    """step -> the validation samples' text (Markdown) over every run under root."""
    return {e.step: e.tensor_proto.string_val[0].decode() for run in events(root)
            if "samples/text_summary" in run.Tags()["tensors"] for e in run.Tensors("samples/text_summary")}


def test_fsdp_matches_ddp_resumes_and_its_checkpoint_loads(tmp_path, capsys):
    ddp = fit(tmp_path, "ddp", "--trainer.strategy=ddp")
    fsdp = fit(tmp_path, "fsdp", "-c", str(ROOT / "conf/extra/fsdp.yaml"), steps=STEPS // 2)
    half = fsdp / "version_0/checkpoints/last.ckpt"
    fit(tmp_path, "fsdp", "-c", str(ROOT / "conf/extra/fsdp.yaml"), f"--ckpt_path={half}")

    for tag, rtol, steps in (("train/loss", 1e-4, range(STEPS)), ("train/grad_norm", 1e-4, range(STEPS)),
                             ("val/loss", 1e-5, range(1, STEPS, 2))):
        reference, sharded = scalars(ddp, tag), scalars(fsdp, tag)
        assert sorted(sharded) == sorted(reference) == list(steps), tag
        for step, value in reference.items():
            assert abs(sharded[step] - value) <= rtol * abs(value), (tag, step, sharded[step], value)
    expected_samples = samples(ddp)
    assert sorted(expected_samples) == [2, 4, 6, 8] and samples(fsdp) == expected_samples

    ckpt = fsdp / "version_0/checkpoints/last.ckpt"
    sharded, reference = load_checkpoint(ckpt), load_checkpoint(ddp / "version_0/checkpoints/last.ckpt")
    assert sharded.meta["step"] == STEPS and sharded.meta["tokens_seen"] == reference.meta["tokens_seen"]
    for name, weight in reference.model.state_dict().items():
        torch.testing.assert_close(sharded.model.state_dict()[name], weight, rtol=0, atol=1e-5, msg=name)

    # weight decay on every matrix (not on embeddings, norms and biases), as DDP's optimizer has it
    model = sharded.model
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matrices = [p for p in dict.fromkeys(model.parameters()) if p.dim() == 2 and id(p) not in embeddings]
    groups = [torch.load(path, weights_only=True)["optimizer_states"][0]["param_groups"]
              for path in (ckpt, ddp / "version_0/checkpoints/last.ckpt")]
    assert [[len(g["params"]), g["weight_decay"]] for g in groups[0]] == \
           [[len(g["params"]), g["weight_decay"]] for g in groups[1]] == \
           [[len(matrices), 0.1], [len(list(dict.fromkeys(model.parameters()))) - len(matrices), 0.0]]

    # MFU counts the whole model's FLOPs, not one shard's
    mfu, rate = scalars(fsdp, "perf/mfu"), scalars(fsdp, "perf/tokens_per_s")
    flops = model.flops_per_token()["total"]
    for step, value in mfu.items():
        assert abs(value - flops * rate[step] / (PEAK_FLOPS * 2)) <= 1e-5 * value, step

    # infer.py and manage.py read the sharded run's checkpoint
    assert infer.main([str(ckpt), "def ", "--greedy", "--max-new-tokens", "5", "--device", "cpu"]) in (0, None)
    tok = sharded.tokenizer
    continuation = tok.decode(greedy_reference(model, tok.encode("def "), 5, tok.eos_id, keep_eos=False))
    assert capsys.readouterr().out == "def " + continuation + "\n"
    manage.main(["inspect", str(ckpt)])
    assert "  optimizer steps: 8\n" in capsys.readouterr().out
    manage.main(["export-checkpoint", str(ckpt), "--output", str(tmp_path / "exported")])
    exported = load_checkpoint(tmp_path / "exported")
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(exported.model.state_dict()[name], weight, rtol=0, atol=0, msg=name)


def test_sharded_model_evaluates_with_its_current_weights(tmp_path):
    """A sharded model (one process) evaluated, updated in place as an optimizer step does, and evaluated again
    computes what an unsharded copy of its new weights computes. FSDP2 gathers each weight into the same storage
    without bumping its version: each evaluation lays out oneDNN copies of its own (a `OneDNNWeights` scope, as
    `LanguageModel` opens one per evaluation). Evaluation runs without grad, not in inference mode, as Lightning
    does under gloo and conf/extra/fsdp.yaml."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = Transformer(TransformerConfig(vocab_size=64, context=16, n_layers=2, d_model=32, n_heads=2))
        shard(model, init_device_mesh("cpu", (1,)), "32-true")
        x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        for step in range(2):
            with torch.no_grad():
                model(x)
                model.reshard()  # as a training step's backward pass does (the blocks reshard after forward)
                for p in model.parameters():
                    p.mul_(1.5)
                with OneDNNWeights():
                    logits = model(x)
                torch.testing.assert_close(logits, full_copy(model, torch.device("cpu"))(x), rtol=0, atol=1e-5,
                                           msg=lambda m, step=step: f"step {step}: {m}")
    finally:
        dist.destroy_process_group()


def reference_figures(model: Transformer, windows, token_bytes: torch.Tensor) -> dict[str, float]:
    """Loss, accuracy and bits per byte of `model` over every window once, by hand in one process."""
    nats, targets, correct, text_bytes = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in map(windows.__getitem__, range(len(windows))):
            logits, kept = model(x[None])[0], y != IGNORE_INDEX
            nats += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum").double().item()
            targets += int(kept.sum())
            correct += int((logits.argmax(-1) == y)[kept].sum())
            text_bytes += int(token_bytes[y[kept]].sum())
    return {"loss": nats / targets, "accuracy": correct / targets, "bpb": nats / math.log(2) / text_bytes}


def test_sharded_validation_with_uneven_batches_matches_one_process(tmp_path):
    """validate sharded over 2 processes, on a split of an odd number of windows in batches of one: each window
    once would give rank 0 a batch more than rank 1, and a sharded forward needs every rank (it hung). The figures
    are those of every window once, computed by hand from the same checkpoint. (test takes the same loader.)"""
    corpus = tmp_path / "corpus.jsonl"
    make_corpus(corpus, n=30)
    options = {"data.source": corpus, "data.max_documents": "null", "data.val_size": 3, "data.predict_size": 1,
               "data.batch_size": 1, "trainer.limit_val_batches": 1.0, "trainer.accelerator": "cpu",
               "trainer.precision": "32"}
    args = tiny_args(tmp_path, steps=1, **options)
    run_cli("fit", *args)
    ckpt = tmp_path / "logs/version_0/checkpoints/last.ckpt"
    dm = XLabDataModule(source=str(corpus), data_dir=str(tmp_path / "data"), vocab_size=300, context=32,
                        val_size=3, predict_size=1, max_documents=None)
    dm.setup("validate")
    assert len(dm.windows["val"]) % 2 == 1  # one rank would run a batch more
    output = run_script("xlab.py", "validate", "-c", ROOT / "conf/extra/fsdp.yaml", *args, "--trainer.devices=2",
                        f"--ckpt_path={ckpt}", env={"MASTER_PORT": str(free_port())}, timeout=180).stdout
    loaded = load_checkpoint(ckpt)
    token_bytes = torch.tensor(loaded.tokenizer.token_bytes())
    for name, value in reference_figures(loaded.model, dm.windows["val"], token_bytes).items():
        assert table_value(output, f"val/{name}") == pytest.approx(value, rel=1e-5, abs=0), name


def test_refused_combinations(tmp_path, monkeypatch):
    """predict under FSDP2 (each process generates for its own prompts, but a sharded forward pass needs every
    process) and Lightning's FSDP v1 (flat weights) are refused with one line, before any data is prepared."""
    monkeypatch.setattr(sys, "argv", ["xlab.py"])  # the arguments are main's, not pytest's
    args = tiny_args(tmp_path, **{"trainer.accelerator": "cpu", "trainer.devices": 2})
    with pytest.raises(SystemExit, match="^error: predict cannot run sharded.*--trainer.strategy=ddp"):
        main(["predict", "-c", str(ROOT / "conf/extra/fsdp.yaml"), *args, "--untrained=true"])
    assert not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="FSDP v1.*conf/extra/fsdp.yaml"):  # Lightning allows it on GPUs only
        check_hardware(SimpleNamespace(strategy=FSDPStrategy()))
