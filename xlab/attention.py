"""Attention maps as a picture: a grid of heatmaps, one row per layer and one column per head, with the prompt's
tokens on the axes (queries down, keys across). The probabilities come from `xlab.transformer.attention_maps`;
this module only draws them, with matplotlib (the `plot` extra), imported when a figure is made so that XLab
works without it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xlab.tokenizer import Tokenizer
from xlab.transformer import Transformer, attention_maps

MAX_TOKENS = 32  # more labels than this on a cell's side no longer read at a usable font size
PLOT_EXTRA = 'pip install -e ".[plot]"'
VISIBLE = {"\n": "⏎", "\t": "⇥", " ": "␣"}  # characters a tick label would show as nothing


def figure_class(user: str = "attention maps"):
    """matplotlib's `Figure`, or ImportError naming the extra to install (for `user`, what needs it). Figures are
    made without pyplot: no global figure registry to leak into, no GUI backend chosen for a process that may
    have its own."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"{user} need matplotlib: {PLOT_EXTRA}") from None
    return Figure


def token_label(text: str) -> str:
    """A token's text as a tick label: spaces, newlines and tabs as visible signs (␣ ⏎ ⇥), other control
    characters as Python escapes. A token holding part of a multi-byte character decodes to U+FFFD (�)."""
    return "".join(VISIBLE.get(c, c if c.isprintable() else repr(c)[1:-1]) for c in text)


def token_labels(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """One label per token id, each decoded on its own (special tokens by name)."""
    return [token_label(tokenizer.decode([i])) for i in ids]


def attention_figure(maps: Tensor, labels: list[str], title: str = ""):
    """A matplotlib Figure of maps (L, H, T, T): layers down, heads across, each cell a heatmap of one head's
    probabilities on a fixed 0-1 colour scale (so heads compare), query tokens down the left column, key tokens
    along the bottom row, one colour bar."""
    L, H, T, _ = maps.shape
    if len(labels) != T:
        raise ValueError(f"{len(labels)} labels for maps of {T} tokens")
    cell = min(max(0.11 * T + 0.4, 1.2), 4.5)  # inches per heatmap: room for T labels of ~7 points
    fig = figure_class()(figsize=(H * cell + 1.6, L * cell + 1.4), layout="constrained")
    axes = fig.subplots(L, H, squeeze=False, sharex=True, sharey=True)
    data = maps.detach().float().cpu().numpy()
    for layer in range(L):
        for head in range(H):
            ax = axes[layer, head]
            image = ax.imshow(data[layer, head], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            ax.set_xticks(range(T))
            ax.set_yticks(range(T))
            ax.tick_params(length=0, labelsize=6.5, labelbottom=layer == L - 1, labelleft=head == 0)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=9)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=9)
    # parse_math off: a token such as "$x$" is text, not mathtext
    for ax in axes[:, 0]:
        ax.set_yticklabels(labels, parse_math=False)
    for ax in axes[-1, :]:
        ax.set_xticklabels(labels, rotation=90, parse_math=False)
    fig.colorbar(image, ax=axes, shrink=min(1.0, 6 / L), label="attention probability")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def prompt_figure(model: Transformer, tokenizer: Tokenizer, ids: list[int], max_tokens: int = MAX_TOKENS,
                  title: str = ""):
    """The attention Figure of token ids `ids` (a prompt): the first min(max_tokens, context) tokens, whose
    maps are exact on their own (causal attention: they never see later tokens). The title says how many of
    the prompt's tokens are shown."""
    if not ids:
        raise ValueError("the prompt has no tokens")
    shown = ids[: min(max_tokens, model.config.context)]
    idx = torch.tensor([shown], device=model.wte.weight.device)
    maps = attention_maps(model, idx)[:, 0]  # (L, H, T, T)
    count = f"first {len(shown)} of {len(ids)} tokens" if len(shown) < len(ids) else \
        f"{len(ids)} token" if len(ids) == 1 else f"{len(ids)} tokens"
    heading = f"{model.config.n_layers} layers × {model.config.n_heads} heads, {count}"
    return attention_figure(maps, token_labels(tokenizer, shown), f"{title}: {heading}" if title else heading)
