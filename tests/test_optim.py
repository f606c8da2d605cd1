"""Optimizers: Muon's step against a hand-written Newton-Schulz iteration, the routing of every parameter to Muon or
AdamW, each group's learning rate under the schedule, and bad input. Resume with Muon: test_resume.py."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import yaml
from conftest import ROOT, tiny_args
from test_cli import error_of

from xlab.module import LanguageModel
from xlab.optim import Combined, GroupLR, Muon, MuonConfig, Schedule
from xlab.transformer import TransformerConfig

# Keller Jordan's quintic Newton-Schulz coefficients (kellerjordan.github.io/posts/muon)
A, B, C = 3.4445, -4.7750, 2.0315


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """G scaled to unit Frobenius norm, then X <- aX + (bXX^T + c(XX^T)^2)X, on the wide orientation; float64."""
    x = g.double().T if g.shape[0] > g.shape[1] else g.double()
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = A * x + (B * gram + C * gram @ gram) @ x
    return x.T if g.shape[0] > g.shape[1] else x


def spread_gradient(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A random matrix whose singular values span 0.1 to 10: far from orthogonal."""
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator))
    k = min(rows, cols)
    return (u[:, :k] * torch.logspace(-1, 1, k)) @ v[:k]


# torch's Muon multiplies in bfloat16 (a few 1e-2 off the float64 reference); XLab's on the CPU in float32
MUONS = [pytest.param(torch.optim.Muon, 0.05, id="torch"), pytest.param(Muon, 1e-5, id="xlab-float32")]


@pytest.mark.parametrize("muon, atol", MUONS)
@pytest.mark.parametrize("rows, cols", [(6, 4), (4, 6)])
def test_muon_steps_the_newton_schulz_orthogonalised_nesterov_momentum(rows, cols, muon, atol):
    """Two steps of Muon inside `Combined`, beside an AdamW part: W <- W - lr max(1, rows/cols)^0.5
    NS5(g + mu B) with B <- mu B + g (Muon's own momentum is this one scaled by 1 - mu, which NS5 does not see). The
    update's singular values lie near 1 although the gradient's span a factor 100. AdamW's first step is
    -lr sign(g)."""
    gen = torch.Generator().manual_seed(rows)
    weight, bias = torch.nn.Parameter(torch.randn(rows, cols, generator=gen)), torch.nn.Parameter(torch.zeros(3))
    optimizer = Combined(muon([weight], lr=0.1, weight_decay=0.0, momentum=0.95, nesterov=True),
                         torch.optim.AdamW([bias], lr=0.01, weight_decay=0.0))
    scale, momentum = 0.1 * max(1, rows / cols) ** 0.5, torch.zeros(rows, cols, dtype=torch.float64)
    for step in range(2):
        before = weight.detach().double().clone()
        grad = spread_gradient(rows, cols, gen)
        weight.grad, bias.grad = grad.clone(), torch.tensor([1.0, -2.0, 0.5])
        optimizer.step()
        momentum = 0.95 * momentum + grad
        expected = newton_schulz(grad + 0.95 * momentum)
        update = (before - weight.detach().double()) / scale
        # plain momentum instead of Nesterov is ~0.25 off
        torch.testing.assert_close(update, expected, rtol=0, atol=atol, msg=f"step {step}")
        singular = torch.linalg.svdvals(update)
        assert singular.min() > 0.6 and singular.max() < 1.2, singular  # measured 0.68 to 1.14
    torch.testing.assert_close(bias.detach(), torch.tensor([-0.01, 0.01, -0.01]) * 2, rtol=0, atol=1e-4)


def preset(name: str, **arch) -> TransformerConfig:
    """conf/extra/NAME.yaml's architecture at a tiny size, two blocks."""
    fields = yaml.safe_load((ROOT / f"conf/extra/{name}.yaml").read_text())["model"]["arch"]
    return TransformerConfig(**{**fields, "vocab_size": 64, "context": 16, "n_layers": 2, "n_heads": 4,
                                "d_model": 16, **arch})


def optimizer_of(module: LanguageModel, max_steps: int = 10) -> dict:
    module.trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                               enable_model_summary=False, enable_checkpointing=False)
    return module.configure_optimizers()


MATRICES = ("attn.qkv.weight", "attn.proj.weight", "mlp.up.weight", "mlp.down.weight")


@pytest.mark.parametrize("name, embeddings, head, other", [
    ("gpt2", ["wte.weight", "wpe.weight"], [],  # tied: the head is wte.weight
     [f"blocks.{i}.{n}" for i in range(2) for n in ("norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias",
                                                    "norm2.weight", "norm2.bias", "mlp.up.bias", "mlp.down.bias")]
     + ["norm.weight", "norm.bias"]),
    ("llama", ["wte.weight"], ["lm_head.weight"],
     [f"blocks.{i}.{n}" for i in range(2) for n in ("norm1.weight", "attn.q_norm.weight", "attn.k_norm.weight",
                                                    "norm2.weight")] + ["norm.weight"]),
])
def test_muon_steps_the_blocks_matrices_and_adamw_everything_else(name, embeddings, head, other):
    module = LanguageModel(preset(name, **({"qk_norm": True} if name == "llama" else {})), optimizer="muon")
    optimizer = optimizer_of(module)["optimizer"]
    groups = {(g["optimizer"], g["name"]): g for g in optimizer.param_groups}
    hidden = [f"blocks.{i}.{m}" for i in range(2) for m in MATRICES]
    expected = {("Muon", "hidden"): hidden, ("AdamW", "embeddings+other"): embeddings + other}
    expected |= {("AdamW", "head"): head} if head else {}
    assert {key: group["param_names"] for key, group in groups.items()} == expected
    parameters = dict(module.model.named_parameters())
    assert len(parameters) == sum(map(len, expected.values()))  # every parameter once
    for group in groups.values():  # the names are those of the tensors stepped
        assert all(p is parameters[n] for n, p in zip(group["param_names"], group["params"], strict=True))
    assert [type(part).__name__ for part in optimizer.parts] == ["Muon", "AdamW"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0] + [0.1] * bool(head)


def test_each_group_follows_the_schedule_from_its_own_rate():
    """Muon's hidden matrices at model.muon.lr, AdamW's groups at model.group_lr's rates or model.learning_rate;
    warmup over 4 steps, then cosine to 0.1 at step 20, worked out by hand."""
    module = LanguageModel(preset("llama"), optimizer="muon", learning_rate=0.002,
                           group_lr=GroupLR(embeddings=0.01, head=0.003),
                           schedule=Schedule(warmup_steps=4, min_lr_ratio=0.1, total_steps=20))
    config = optimizer_of(module)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    base = {"hidden": 0.05, "embeddings": 0.01, "head": 0.003, "other": 0.002}
    for step in range(8):
        factor = (step + 1) / 4 if step < 4 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 4) / 16))
        assert {g["name"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
            {name: rate * factor for name, rate in base.items()}), step
        # the parts step at the rates the schedule set (no gradients: nothing moves)
        assert [g["lr"] for part in optimizer.parts for g in part.param_groups] == \
               [g["lr"] for g in optimizer.param_groups]
        optimizer.step()
        scheduler.step()


def test_adamw_takes_the_group_learning_rates_too():
    module = LanguageModel(preset("llama"), learning_rate=0.002, group_lr=GroupLR(head=0.003, other=0.004))
    optimizer = optimizer_of(module)["optimizer"]
    assert type(optimizer) is torch.optim.AdamW
    assert [(g["name"], g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        ("hidden", 0.002, 0.1), ("embeddings", 0.002, 0.0), ("head", 0.003, 0.1), ("other", 0.004, 0.0)]


def test_an_unknown_optimizer_name_is_one_line(tmp_path):
    message = error_of("fit", *tiny_args(tmp_path), "--model.optimizer=sgd")
    assert "model.optimizer" in message and "'adamw', 'muon'" in message
    assert not (tmp_path / "data").exists()
    with pytest.raises(ValueError, match="model.optimizer 'sgd': choose adamw or muon, or give a torch.optim class"):
        LanguageModel(preset("gpt2"), optimizer="sgd")


def test_fsdp_refuses_muon():
    module = LanguageModel(preset("gpt2"), optimizer="muon")
    module._device_mesh = object()  # as ModelParallelStrategy sets it: the model is about to be sharded
    with pytest.raises(ValueError, match="muon is not supported with FSDP2.*DDP.*or model.optimizer=adamw"):
        module.configure_model()


def test_the_modern_preset_layers_over_the_defaults_as_its_file_says(tmp_path):
    """conf/extra/modern.yaml through the CLI's layering (defaults.yaml, then the file): Muon at its rate on the
    blocks' matrices, AdamW at the preset's rate on the rest, and every architecture switch of the file on."""
    from conftest import run_cli

    printed = run_cli("fit", "-c", ROOT / "conf/extra/modern.yaml", "--print_config").stdout
    model = yaml.safe_load(printed)["model"]
    written = yaml.safe_load((ROOT / "conf/extra/modern.yaml").read_text())["model"]
    assert {key: model["arch"][key] for key in written["arch"]} == written["arch"]
    assert model["arch"]["d_model"] == 256  # sizes from conf/defaults.yaml
    module = LanguageModel(preset("modern"), optimizer=model["optimizer"], learning_rate=model["learning_rate"],
                           muon=MuonConfig(**model["muon"]))
    rates = {(g["optimizer"], g["name"]): g["initial_lr"] for g in optimizer_of(module)["optimizer"].param_groups}
    assert rates == {("Muon", "hidden"): written["muon"]["lr"], ("AdamW", "embeddings+other"): written["learning_rate"],
                     ("AdamW", "head"): written["learning_rate"]}
    blocks = module.model.blocks
    assert all(not b.attn.proj.weight.any() and not b.mlp.down.weight.any() for b in blocks)  # zero_init_proj
