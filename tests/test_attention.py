"""Attention maps: `attention_maps` gives the probabilities the model computes, held to transformers' eager
attention (GPT-2; Llama with RoPE and grouped-query attention) and to a forward pass written out here from the
weights (ALiBi, sinusoidal, no positions); the picture has one heatmap per layer and head with the tokens on its
axes; `infer.py --attention` writes it, and bad input is one line; the `AttentionMaps` callback logs it to
TensorBoard."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.data import AttributeDict
from test_export import one_thread, randomize, tiny_config, tiny_tokenizer

from xlab.attention import attention_figure, prompt_figure
from xlab.callbacks import AttentionMaps
from xlab.checkpoint import Loaded, export_checkpoint
from xlab.infer import build_parser, main
from xlab.transformer import Transformer, attention_maps

assert one_thread  # autouse fixture, imported to apply here
PROMPT = "def add(x, y):\n    return x + y"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids_for(tok, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, tok.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


def assert_probabilities(maps: torch.Tensor) -> None:
    """(..., T, T) maps: nothing above the diagonal (causal), every row a distribution."""
    assert maps.triu(1).abs().max() == 0
    torch.testing.assert_close(maps.sum(-1), torch.ones(maps.shape[:-1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])  # llama: RoPE, 4 query heads over 2 key/value heads
def test_maps_equal_transformers_eager_attentions(tmp_path, tok, preset):
    transformers = pytest.importorskip("transformers")
    from xlab.hf import export_hf

    model = randomize(Transformer(tiny_config(preset, tok.vocab_size))).eval()
    export_hf(Loaded(model, tok), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = ids_for(tok)
    with torch.no_grad():
        expected = torch.stack(hf(ids, output_attentions=True).attentions)  # L x (B, H, T, T)
    maps = attention_maps(model, ids)
    assert maps.shape == (2, 2, 4, 12, 12) and maps.dtype == torch.float32
    assert_probabilities(maps)
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-5)


def reference_maps(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """(L, B, H, T, T): a pre-norm LayerNorm/GELU model's forward written out from its weights, nothing taken
    from xlab.transformer but the parameters; ALiBi's slopes by the paper's formula (a power-of-two head count).
    Checks its own logits against the model's, so that the maps come from the right hidden states."""
    c = model.config
    B, T = ids.shape
    H, G, D = c.n_heads, c.kv_heads, c.d_model // c.n_heads
    x = model.wte.weight[ids]
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    if c.position == "sinusoidal":  # PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(same)
        angle = pos / 10000 ** (torch.arange(0, c.d_model, 2, dtype=torch.float64) / c.d_model)
        # scaled to RMS init_std per coordinate, the embeddings' scale
        x = x + (torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1) * 2 ** 0.5 * c.init_std).float()
    bias = torch.zeros(H, T, T)
    if c.position == "alibi":  # head h (from 1) has slope 2^(-8h/H); the bias is -slope * (query - key)
        slopes = torch.tensor([2 ** (-8 * h / H) for h in range(1, H + 1)])
        bias = -slopes[:, None, None] * (pos - pos.T).float()
    causal = torch.ones(T, T).tril().bool()
    maps = []
    for block in model.blocks:
        attn = block.attn
        h = F.layer_norm(x, (c.d_model,), block.norm1.weight, block.norm1.bias, c.norm_eps)
        qkv = h @ attn.qkv.weight.T + attn.qkv.bias
        q = qkv[..., : H * D].reshape(B, T, H, D).transpose(1, 2)
        k = qkv[..., H * D: (H + G) * D].reshape(B, T, G, D).transpose(1, 2)
        v = qkv[..., (H + G) * D:].reshape(B, T, G, D).transpose(1, 2)
        k = torch.cat([k[:, [g]].expand(B, H // G, T, D) for g in range(G)], dim=1)  # query head i: kv head i // (H/G)
        v = torch.cat([v[:, [g]].expand(B, H // G, T, D) for g in range(G)], dim=1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(D) + bias).masked_fill(~causal, -math.inf)
        p = scores.softmax(-1)
        maps.append(p)
        y = (p @ v).transpose(1, 2).reshape(B, T, c.d_model)
        x = x + y @ attn.proj.weight.T + attn.proj.bias
        h = F.layer_norm(x, (c.d_model,), block.norm2.weight, block.norm2.bias, c.norm_eps)
        x = x + F.gelu(h @ block.mlp.up.weight.T + block.mlp.up.bias) @ block.mlp.down.weight.T + block.mlp.down.bias
    logits = F.layer_norm(x, (c.d_model,), model.norm.weight, model.norm.bias, c.norm_eps) @ model.wte.weight.T
    torch.testing.assert_close(logits, model(ids), rtol=0, atol=1e-4)
    return torch.stack(maps)


@pytest.mark.parametrize("position, kv_heads", [("alibi", 2), ("sinusoidal", None), ("none", 1)])
def test_maps_equal_a_softmax_written_out(tok, position, kv_heads):
    model = randomize(Transformer(tiny_config("", tok.vocab_size, position=position, n_kv_heads=kv_heads))).eval()
    ids = ids_for(tok)
    with torch.no_grad():
        expected = reference_maps(model, ids)
    maps = attention_maps(model, ids)
    assert_probabilities(maps)
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-5)


def test_maps_leave_the_model_as_they_found_it(tok):
    """Dropout off for the maps, the training mode and the forward hooks as they were afterwards."""
    model = randomize(Transformer(tiny_config("gpt2", tok.vocab_size, dropout_attn=0.5, dropout_resid=0.5)))
    ids = ids_for(tok)
    maps = attention_maps(model, ids)
    assert model.training and not any(m._forward_hooks for m in model.modules())
    torch.testing.assert_close(maps, attention_maps(model.eval(), ids), rtol=0, atol=0)


def test_figure_has_a_heatmap_per_layer_and_head_with_the_tokens_on_its_axes(tok):
    model = randomize(Transformer(tiny_config("llama", tok.vocab_size)))
    text = PROMPT + " $x$\t"
    ids = tok.encode(text)
    figure = prompt_figure(model, tok, ids)
    heatmaps = [ax for ax in figure.axes if ax.images and ax.get_label() != "<colorbar>"]
    assert len(heatmaps) == 2 * 4 and len(figure.axes) == 2 * 4 + 1  # and the colour bar
    maps = attention_maps(model, torch.tensor([ids]))[:, 0]
    for i, ax in enumerate(heatmaps):  # row-major: layer i // 4, head i % 4
        assert (ax.images[0].get_array() == maps[i // 4, i % 4].numpy()).all()
    left = [t.get_text() for t in heatmaps[0].get_yticklabels()]
    bottom = [t.get_text() for t in heatmaps[-4].get_xticklabels()]
    assert left == bottom and len(left) == len(ids)
    # the labels spell the prompt, its spaces, newline and tab made visible, "$" as text rather than mathtext
    assert "".join(left) == text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥")
    assert not any(t.get_parse_math() for t in heatmaps[0].get_yticklabels())
    assert figure._suptitle.get_text() == f"2 layers × 4 heads, {len(ids)} tokens"


def test_a_long_prompt_shows_its_first_tokens_and_says_so(tok):
    model = randomize(Transformer(tiny_config("gpt2", tok.vocab_size)))  # context 32
    ids = tok.encode(PROMPT * 10)
    figure = prompt_figure(model, tok, ids, max_tokens=20)
    assert figure._suptitle.get_text() == f"2 layers × 4 heads, first 20 of {len(ids)} tokens"
    assert figure.axes[0].images[0].get_array().shape == (20, 20)
    assert prompt_figure(model, tok, ids, max_tokens=100)._suptitle.get_text().endswith(f"first 32 of {len(ids)} "
                                                                                         "tokens")
    with pytest.raises(ValueError, match="3 labels for maps of 4 tokens"):
        attention_figure(torch.rand(1, 1, 4, 4), ["a", "b", "c"])


@pytest.fixture(scope="module")
def export(tmp_path_factory, tok):
    model = randomize(Transformer(tiny_config("gpt2", tok.vocab_size))).eval()
    return export_checkpoint(Loaded(model, tok, {}), tmp_path_factory.mktemp("attention") / "export"), model


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_infer_writes_the_maps_and_generates_unless_told_not_to(export, tok, tmp_path, capsys):
    path, model = export
    assert "--attention IMAGE" in build_parser().format_help()
    image = tmp_path / "maps.png"
    code, out, err = run_main(capsys, path, PROMPT, "--greedy", "--max-new-tokens", 4, "--attention", image)
    _, plain, _ = run_main(capsys, path, PROMPT, "--greedy", "--max-new-tokens", 4)
    assert code == 0 and out == plain and out.startswith(PROMPT)
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tokens = 1 + len(tok.encode(PROMPT))  # after the end-of-document token, as a document starts in training
    assert err == f"attention maps: {image} (2 layers × 4 heads, {tokens} tokens)\n"
    image.unlink()
    code, out, err = run_main(capsys, path, PROMPT, "--max-new-tokens", 0, "--attention", image)
    assert (code, out) == (0, "") and image.exists() and err.startswith("attention maps:")


@pytest.mark.parametrize("args, message", [
    (["hi", "--attention", "{tmp}/missing/maps.png"], "error: --attention {tmp}/missing/maps.png: the folder "
                                                       "{tmp}/missing does not exist"),
    (["hi", "--attention", "{tmp}/maps.txt"], "error: --attention {tmp}/maps.txt: name an image file ending in"),
    (["hi", "--attention", "{tmp}/folder.png", "--max-new-tokens", "0"], "error: --attention: cannot write "
                                                                        "{tmp}/folder.png: Is a directory"),
    (["--attention", "{tmp}/maps.png"], "error: --attention draws the prompt given on the command line"),
    (["hi", "--attention", "{tmp}/maps.png", "--backend", "onnx"], "error: --attention needs the torch backend"),
    (["hi", "--max-new-tokens", "0"], "error: --max-new-tokens must be >= 1, got 0"),  # without --attention
    (["hi", "--attention", "{tmp}/maps.png", "--max-new-tokens", "0", "--beam-width", "3", "--seed", "1"],
     "error: --beam-width, --seed only apply to generation: --max-new-tokens 0 draws the attention maps only"),
    (["hi", "--attention", "{tmp}/maps.png", "--no-matplotlib"],
     'error: attention maps need matplotlib: pip install -e ".[plot]"'),
])
def test_infer_bad_attention_input_is_one_line(export, tmp_path, capsys, monkeypatch, args, message):
    (tmp_path / "folder.png").mkdir()
    if "--no-matplotlib" in args:  # as if it were not installed: importing it fails
        args.remove("--no-matplotlib")
        for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
            monkeypatch.setitem(sys.modules, name, None)
    code, out, err = run_main(capsys, export[0], *[a.format(tmp=tmp_path) for a in args])
    assert code == 2 and out == ""
    assert err.startswith(message.format(tmp=tmp_path)) and err.count("\n") == 1, err
    assert not (tmp_path / "maps.png").exists()


class Experiment:
    """A TensorBoard SummaryWriter's add_figure, recorded."""

    def __init__(self):
        self.figures = []

    def add_figure(self, tag, figure, step, close=True):
        self.figures.append((tag, figure, step))


def test_callback_logs_a_figure_per_sample_prompt_on_rank_zero(tok):
    model = randomize(Transformer(tiny_config("gpt2", tok.vocab_size)))
    module = SimpleNamespace(model=model, hparams=AttributeDict(sample_prompts=["def ", PROMPT]),
                             device=torch.device("cpu"))
    experiment = Experiment()
    trainer = SimpleNamespace(sanity_checking=False, is_global_zero=True, global_step=7,
                              loggers=[SimpleNamespace(experiment=experiment)],
                              datamodule=SimpleNamespace(tokenizer=tok))
    callback = AttentionMaps()
    callback.setup(trainer, module, "fit")
    callback.on_validation_epoch_end(trainer, module)
    assert [(tag, step) for tag, _, step in experiment.figures] == [("attention/0", 7), ("attention/1", 7)]
    figure = experiment.figures[1][1]
    ids = [tok.eos_id, *tok.encode(PROMPT)]  # the prompt starts a document, as in training
    assert figure._suptitle.get_text() == f"{PROMPT!r}: 2 layers × 4 heads, {len(ids)} tokens"
    expected = attention_maps(model, torch.tensor([ids]))[1, 0, 3]
    assert (figure.axes[7].images[0].get_array() == expected.numpy()).all()  # layer 1, head 3
    for other in (dict(sanity_checking=True), dict(is_global_zero=False)):
        experiment.figures.clear()
        callback.on_validation_epoch_end(SimpleNamespace(**{**vars(trainer), **other}), module)
        assert experiment.figures == []
    experiment.figures.clear()
    AttentionMaps(prompts=[""]).on_validation_epoch_end(trainer, module)  # an empty prompt: the start token alone
    assert experiment.figures[0][1]._suptitle.get_text() == "'': 2 layers × 4 heads, 1 token"
