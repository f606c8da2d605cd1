"""Conversion to and from Hugging Face: small random GPT-2 and Llama models built from configs (nothing is
downloaded) must give the same logits as their XLab conversions, in both directions."""

from __future__ import annotations

import pytest
import torch

from xlab.convert import config_from_hf, hf_config_from_xlab, hf_state_dict_from_xlab, state_dict_from_hf
from xlab.transformer import Transformer, TransformerConfig

transformers = pytest.importorskip("transformers")

V, T = 97, 24  # a vocabulary that is no multiple of anything, so padding shows


def randomize_vectors(model: torch.nn.Module) -> None:
    """Norm gains and biases start at ones and zeros in both libraries: randomise them so that a swapped or
    dropped one changes the logits."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))


def gpt2(**overrides):
    fields = {"vocab_size": V, "n_positions": T, "n_embd": 32, "n_layer": 2, "n_head": 4, "initializer_range": 0.2,
              "bos_token_id": None, "eos_token_id": None}
    fields.update(overrides)
    return transformers.GPT2Config(**fields)


def llama(**overrides):
    fields = {"vocab_size": V, "max_position_embeddings": T, "hidden_size": 32, "intermediate_size": 56,
              "num_hidden_layers": 2, "num_attention_heads": 4, "initializer_range": 0.2, "rms_norm_eps": 1e-5,
              "bos_token_id": None, "eos_token_id": None}
    fields.update(overrides)
    return transformers.LlamaConfig(**fields)


def hf_model(hf_config):
    torch.manual_seed(0)
    hf_config._attn_implementation = "sdpa"
    cls = transformers.GPT2LMHeadModel if hf_config.model_type == "gpt2" else transformers.LlamaForCausalLM
    model = cls(hf_config).eval()
    randomize_vectors(model)
    return model


def tokens(batch: int = 3, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


HF_CONFIGS = {
    "gpt2": lambda: gpt2(),
    "gpt2-untied-gelu-ninner": lambda: gpt2(tie_word_embeddings=False, activation_function="gelu", n_inner=48),
    "gpt2-relu-eps": lambda: gpt2(activation_function="relu", layer_norm_epsilon=1e-3),
    "llama": lambda: llama(),
    "llama-gqa-theta": lambda: llama(num_key_value_heads=2, rope_theta=500.0),
    "llama-mqa-tied": lambda: llama(num_key_value_heads=1, tie_word_embeddings=True),
    "llama-bias": lambda: llama(attention_bias=True, mlp_bias=True, num_key_value_heads=2),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
@pytest.mark.parametrize("pad_vocab_to", [1, 64])
def test_hf_to_xlab_same_logits(name, pad_vocab_to):
    hf_config = HF_CONFIGS[name]()
    hf = hf_model(hf_config)
    config = config_from_hf(hf_config, pad_vocab_to=pad_vocab_to)
    model = Transformer(config).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), hf_config, config))  # strict: every key
    assert model.wte.weight.shape[0] == (128 if pad_vocab_to == 64 else V)
    assert model.wte.weight[V:].abs().sum() == 0  # padding rows are zeros
    assert (model.lm_head.weight is model.wte.weight) == hf_config.tie_word_embeddings
    idx = tokens()
    with torch.no_grad():
        expected, logits = hf(idx).logits, model(idx)
    assert expected.std() > 0.5  # large enough logits for the comparison to mean something
    assert (logits - expected).abs().max() <= 1e-4


def test_config_from_hf_fields():
    config = config_from_hf(llama(num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-6))
    assert (config.position, config.norm, config.mlp, config.bias, config.kv_heads, config.ff_dim) == (
        "rope", "rmsnorm", "swiglu", False, 2, 56)
    assert (config.rope_theta, config.norm_eps, config.tie_embeddings, config.context) == (500.0, 1e-6, False, T)
    config = config_from_hf(gpt2(activation_function="gelu_new", resid_pdrop=0.2))
    assert (config.position, config.norm, config.norm_bias, config.mlp, config.bias, config.ff_dim) == (
        "learned", "layernorm", True, "gelu_tanh", True, 128)
    assert (config.tie_embeddings, config.dropout_resid, config.dropout_embed) == (True, 0.2, 0.1)
    # options Hugging Face's GPT-2 and Llama do not have stay off
    assert (config.logit_softcap, config.zero_init_proj) == (None, False)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-theta"])
def test_left_padded_batch_matches_hf_attention_mask(name):
    """XLab's key_mask + positions against HF's attention_mask + position_ids on the real tokens."""
    hf_config = HF_CONFIGS[name]()
    hf = hf_model(hf_config)
    model = Transformer(config_from_hf(hf_config)).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), hf_config))
    idx = tokens(2, 16)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(idx, attention_mask=mask, position_ids=positions).logits
        logits = model(idx, positions=positions, key_mask=mask.bool())
    assert (logits[0] - expected[0]).abs().max() <= 1e-4
    assert (logits[1, 5:] - expected[1, 5:]).abs().max() <= 1e-4


XLAB_CONFIGS = {
    "gpt2": {"position": "learned", "mlp": "gelu_tanh"},
    "gpt2-gelu-untied-padded": {"position": "learned", "mlp": "gelu", "tie_embeddings": False, "pad_vocab_to": 64,
                                "d_ff": 40},
    "llama": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False},
    "llama-gqa-padded-tied": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False,
                              "n_kv_heads": 2, "pad_vocab_to": 64, "rope_theta": 300.0, "d_ff": 72},
    "llama-mqa": {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_heads": 1,
                  "norm_eps": 1e-6, "tie_embeddings": False},
    # an initialisation only: the zero projections export as any weights
    "gpt2-zero-init": {"position": "learned", "mlp": "gelu_tanh", "zero_init_proj": True},
}


@pytest.mark.parametrize("name", list(XLAB_CONFIGS))
def test_xlab_to_hf_same_logits(name):
    config = TransformerConfig(vocab_size=V, context=T, n_layers=2, n_heads=4, d_model=32, init_std=0.2,
                               **XLAB_CONFIGS[name])
    torch.manual_seed(0)
    model = Transformer(config).eval()
    randomize_vectors(model)
    state_dict = model.state_dict()
    hf_config = hf_config_from_xlab(config)
    hf_config._attn_implementation = "sdpa"
    cls = transformers.GPT2LMHeadModel if hf_config.model_type == "gpt2" else transformers.LlamaForCausalLM
    hf = cls(hf_config).eval()
    hf.load_state_dict(hf_state_dict_from_xlab(state_dict, config))  # strict: every key, exact shapes
    idx = tokens()
    with torch.no_grad():
        expected, logits = model(idx), hf(idx).logits
    assert expected.std() > 0.5
    assert (logits - expected).abs().max() <= 1e-4
    # and back: the round trip gives the original tensors, but for zeros in the (unused) padding rows
    back = state_dict_from_hf(hf.state_dict(), hf_config, config)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        if key in ("wte.weight", "lm_head.weight"):
            assert back[key].shape == value.shape and torch.all(back[key][V:] == 0), key
            value, back[key] = value[:V], back[key][:V]
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize("fields, option", [
    ({"position": "alibi"}, "position='alibi'"),
    ({"position": "sinusoidal"}, "position='sinusoidal'"),
    ({"position": "none"}, "position='none'"),
    ({"prenorm": False}, "prenorm=False"),
    ({"final_norm": False}, "final_norm=False"),
    ({"qk_norm": True}, "qk_norm=True"),
    ({"mlp": "swiglu"}, "mlp='swiglu'"),  # swiglu with GPT-2 shapes
    ({"norm": "rmsnorm"}, "norm='rmsnorm'"),
    ({"norm_bias": False}, "norm_bias=False"),
    ({"bias": False}, "bias=False"),
    ({"n_kv_heads": 2}, "n_kv_heads=2"),
    ({"position": "rope", "norm": "rmsnorm", "mlp": "gelu"}, "mlp='gelu'"),
    ({"position": "rope", "mlp": "swiglu"}, "norm='layernorm'"),
    ({"mlp": "relu2"}, "mlp='relu2'"),
    ({"position": "rope", "norm": "rmsnorm", "mlp": "relu2"}, "mlp='relu2'"),
    ({"logit_softcap": 15.0}, "logit_softcap=15.0"),
    ({"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "logit_softcap": 30.0}, "logit_softcap=30.0"),
])
def test_unmappable_xlab_options_raise(fields, option):
    config = TransformerConfig(vocab_size=V, context=T, n_layers=1, n_heads=4, d_model=32, **fields)
    with pytest.raises(ValueError, match=f"cannot convert .*{option} is not supported"):
        hf_config_from_xlab(config)
    with pytest.raises(ValueError, match="is not supported"):
        hf_state_dict_from_xlab(Transformer(config).state_dict(), config)


@pytest.mark.parametrize("make, message", [
    (lambda: llama(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling=.*linear"),
    (lambda: llama(hidden_act="gelu"), "hidden_act='gelu'"),
    (lambda: llama(attention_bias=True, mlp_bias=False), "attention_bias/mlp_bias"),
    (lambda: llama(head_dim=16), "head_dim=16"),
    (lambda: gpt2(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx=True"),
    (lambda: gpt2(activation_function="gelu_10"), "activation_function='gelu_10'"),
    (lambda: transformers.MistralConfig(), "model_type='mistral'"),
])
def test_unsupported_hf_options_raise(make, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(make())


def test_tied_xlab_config_refuses_an_untied_checkpoint():
    hf_config = gpt2(tie_word_embeddings=False)
    config = config_from_hf(hf_config, tie_embeddings=True)
    with pytest.raises(ValueError, match="tie_embeddings=True but the checkpoint's head is untied"):
        state_dict_from_hf(hf_model(hf_config).state_dict(), hf_config, config)
