"""Every released InternVL2.5-MPO size: configs, key layouts, parameter counts, InternViT-6B maths.

Expected keys and shapes are written here from the official layout (reference doc section 2 and the
official InternViT / InternLM2 / Qwen2 modules), not read from our model.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from internvl_mpo.config import FAMILY_SIZES, ModelConfig, family_config
from internvl_mpo.errors import ConfigError
from internvl_mpo.model import InternVL
from internvl_mpo.vision import InternVisionModel

from conftest import tiny_config

# Published totals (model cards), and the exact 4B count of the reference doc (section 1.4).
PUBLISHED_BILLIONS = {"1B": 0.9, "2B": 2.2, "4B": 3.7, "8B": 8.1, "26B": 25.5, "38B": 38.4, "78B": 78.4}
EXACT_4B = 3_712_637_952
# (vision width, vision layers, LLM class, LLM width, LLM layers, heads, kv heads, MLP width, vocab)
WIDTHS = {
    "1B": (1024, 24, "Qwen2ForCausalLM", 896, 24, 14, 2, 4864, 151674),
    "2B": (1024, 24, "InternLM2ForCausalLM", 2048, 24, 16, 8, 8192, 92553),
    "4B": (1024, 24, "Qwen2ForCausalLM", 2048, 36, 16, 2, 11008, 151674),
    "8B": (1024, 24, "InternLM2ForCausalLM", 4096, 32, 32, 8, 14336, 92553),
    "26B": (3200, 45, "InternLM2ForCausalLM", 6144, 48, 48, 8, 16384, 92553),
    "38B": (3200, 45, "Qwen2ForCausalLM", 5120, 64, 40, 8, 27648, 151674),
    "78B": (3200, 45, "Qwen2ForCausalLM", 8192, 80, 64, 8, 29568, 151674),
}


def official_keys(config: ModelConfig) -> dict[str, tuple]:
    """Key -> shape of an official checkpoint with this config."""
    v, l = config.vision, config.llm
    c, p = v.hidden_size, v.patch_size
    keys = {
        "vision_model.embeddings.class_embedding": (1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": (c, 3, p, p),
        "vision_model.embeddings.patch_embedding.bias": (c,),
        "vision_model.embeddings.position_embedding": (1, (v.image_size // p) ** 2 + 1, c),
        "mlp1.0.weight": (4 * c,), "mlp1.0.bias": (4 * c,),
        "mlp1.1.weight": (l.hidden_size, 4 * c), "mlp1.1.bias": (l.hidden_size,),
        "mlp1.3.weight": (l.hidden_size, l.hidden_size), "mlp1.3.bias": (l.hidden_size,),
    }
    for i in range(v.num_hidden_layers):
        b = f"vision_model.encoder.layers.{i}."
        keys.update({b + "ls1": (c,), b + "ls2": (c,), b + "attn.qkv.weight": (3 * c, c),
                     b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,),
                     b + "mlp.fc1.weight": (v.intermediate_size, c), b + "mlp.fc1.bias": (v.intermediate_size,),
                     b + "mlp.fc2.weight": (c, v.intermediate_size), b + "mlp.fc2.bias": (c,),
                     b + "norm1.weight": (c,), b + "norm2.weight": (c,)})
        if v.qkv_bias:
            keys[b + "attn.qkv.bias"] = (3 * c,)
        if v.norm_type == "layer_norm":
            keys.update({b + "norm1.bias": (c,), b + "norm2.bias": (c,)})
        if v.qk_normalization:
            keys.update({b + "attn.q_norm.weight": (c,), b + "attn.k_norm.weight": (c,)})
    d, h, k, f, n = l.hidden_size, l.num_attention_heads, l.num_key_value_heads, l.intermediate_size, l.vocab_size
    hd = d // h
    if l.architectures[0] == "InternLM2ForCausalLM":
        keys.update({"language_model.model.tok_embeddings.weight": (n, d), "language_model.model.norm.weight": (d,),
                     "language_model.output.weight": (n, d)})
        for i in range(l.num_hidden_layers):
            b = f"language_model.model.layers.{i}."
            keys.update({b + "attention.wqkv.weight": ((h + 2 * k) * hd, d), b + "attention.wo.weight": (d, h * hd),
                         b + "feed_forward.w1.weight": (f, d), b + "feed_forward.w3.weight": (f, d),
                         b + "feed_forward.w2.weight": (d, f), b + "attention_norm.weight": (d,),
                         b + "ffn_norm.weight": (d,)})
    else:
        keys.update({"language_model.model.embed_tokens.weight": (n, d), "language_model.model.norm.weight": (d,),
                     "language_model.lm_head.weight": (n, d)})
        for i in range(l.num_hidden_layers):
            b = f"language_model.model.layers.{i}."
            keys.update({b + "self_attn.q_proj.weight": (h * hd, d), b + "self_attn.q_proj.bias": (h * hd,),
                         b + "self_attn.k_proj.weight": (k * hd, d), b + "self_attn.k_proj.bias": (k * hd,),
                         b + "self_attn.v_proj.weight": (k * hd, d), b + "self_attn.v_proj.bias": (k * hd,),
                         b + "self_attn.o_proj.weight": (d, h * hd), b + "mlp.gate_proj.weight": (f, d),
                         b + "mlp.up_proj.weight": (f, d), b + "mlp.down_proj.weight": (d, f),
                         b + "input_layernorm.weight": (d,), b + "post_attention_layernorm.weight": (d,)})
    return keys


@pytest.mark.parametrize("size", FAMILY_SIZES)
def test_config_widths_and_published_parameter_count(size):
    config = family_config(size)
    v, l = config.vision, config.llm
    got = (v.hidden_size, v.num_hidden_layers, l.architectures[0], l.hidden_size, l.num_hidden_layers,
           l.num_attention_heads, l.num_key_value_heads, l.intermediate_size, l.vocab_size)
    assert got == WIDTHS[size]
    assert config.template == "internvl2_5" and config.num_image_token == 256 and not l.tie_word_embeddings
    with torch.device("meta"):
        model = InternVL(config)
    total = sum(t.numel() for t in model.parameters())
    assert round(total / 1e9, 1) == PUBLISHED_BILLIONS[size]
    assert total == sum(math.prod(shape) for shape in official_keys(config).values())
    if size == "4B":
        assert total == EXACT_4B


@pytest.mark.parametrize("size", FAMILY_SIZES)
def test_key_layout_with_one_layer(size):
    config = family_config(size, layers=1)
    assert config.vision.num_hidden_layers == 1 and config.llm.num_hidden_layers == 1
    with torch.device("meta"):
        model = InternVL(config)
    assert {k: tuple(s) for k, s in model.expected_keys().items()} == official_keys(config)


def test_internvit_6b_values():
    v = family_config("26B").vision
    assert (v.hidden_size, v.num_attention_heads, v.head_dim, v.num_hidden_layers, v.intermediate_size) == (
        3200, 25, 128, 45, 12800)
    assert (v.norm_type, v.qk_normalization, v.qkv_bias, v.layer_norm_eps) == ("rms_norm", True, False, 1e-6)
    assert family_config("38B").vision == v == family_config("78B").vision


def test_family_config_refusals():
    with pytest.raises(ConfigError, match="unknown InternVL2.5-MPO size '3B'"):
        family_config("3B")
    for size in (8, None):  # not a name: was an AttributeError ('int' object has no attribute 'upper')
        with pytest.raises(ConfigError, match=f"unknown InternVL2.5-MPO size {size!r}; known: 1B, 2B"):
            family_config(size)
    with pytest.raises(ConfigError, match="layers must be at least 1"):
        family_config("1B", layers=0)
    assert family_config("8b").llm.rope_scaling == {"factor": 2.0, "type": "dynamic"}


def test_2b_layout_round_trip(tmp_path):
    """A random 2B checkpoint (InternLM2, real widths and vocab, one layer each) saves and loads bit-exactly."""
    config = family_config("2B", layers=1)
    with torch.device("meta"):
        model = InternVL(config, image_token_id=92546).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    folder = model.save_pretrained(tmp_path / "2b", max_shard_size="300MB")
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    loaded = InternVL.from_pretrained(folder, dtype="bf16", image_token_id=92546)
    assert loaded.config == config and loaded.config.llm.extra["bias"] is False
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    ids = torch.tensor([[1, 92543, 333, 92542]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("size", FAMILY_SIZES)
def test_every_size_round_trips_at_tiny_width(tmp_path, size):
    """Each size's structure (ViT norm and qk-norm, LLM class, InternLM2 bias, RoPE) at tiny widths, bf16:
    sharded save -> load gives the same tensors and logits, a complete index and bf16 recorded throughout."""
    real = family_config(size)
    vision = dataclasses.replace(real.vision, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, image_size=56)
    llm = dataclasses.replace(real.llm, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, vocab_size=300)
    config = real.replace(vision=vision, llm=llm, force_image_size=56)
    torch.manual_seed(0)
    model = InternVL(config, image_token_id=299)
    with torch.no_grad():
        for t in model.parameters():
            t.copy_(0.1 * torch.randn_like(t) + (1.0 if t.dim() == 1 else 0.0))
    model = model.to(torch.bfloat16)
    folder = model.save_pretrained(tmp_path / size, max_shard_size=50_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    assert index["weight_map"].keys() == state.keys() and len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in state.values())
    saved = json.loads((folder / "config.json").read_text())
    assert saved["torch_dtype"] == saved["vision_config"]["torch_dtype"] == saved["llm_config"]["torch_dtype"]
    assert saved["torch_dtype"] == "bfloat16" and saved["llm_config"]["architectures"] == list(llm.architectures)
    loaded = InternVL.from_pretrained(folder, dtype="auto", image_token_id=299)
    assert loaded.config == config and loaded.dtype == torch.bfloat16
    ids = torch.tensor([[5, 6] + [299] * config.num_image_token + [7]])
    pixels = torch.randn(1, 3, 56, 56, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixel_values=pixels), model(ids, pixel_values=pixels))


# ---- InternViT-6B: our encoder against the official equations, written out here -----------------


def rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def official_internvit(state: dict[str, torch.Tensor], config, pixels: torch.Tensor) -> torch.Tensor:
    """InternViT-6B forward (`modeling_intern_vit.py`, eager attention): RMSNorm, qk-norm over all heads
    jointly, no qkv bias, layer scale; the last hidden state."""
    c, heads, eps = config.hidden_size, config.num_attention_heads, config.layer_norm_eps
    e = "embeddings."
    x = F.conv2d(pixels, state[e + "patch_embedding.weight"], state[e + "patch_embedding.bias"],
                 stride=config.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state[e + "class_embedding"].expand(x.shape[0], 1, c), x], dim=1) + state[e + "position_embedding"]
    n, p, _ = x.shape
    for i in range(config.num_hidden_layers):
        s = {k.split(f"encoder.layers.{i}.", 1)[1]: t for k, t in state.items() if f"encoder.layers.{i}." in k}
        h = rms_norm(x, s["norm1.weight"], eps)
        qkv = (h @ s["attn.qkv.weight"].T).reshape(n, p, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (N, H, P, D) each
        q = rms_norm(q.transpose(1, 2).flatten(-2), s["attn.q_norm.weight"], eps).view(n, p, heads, -1).transpose(1, 2)
        k = rms_norm(k.transpose(1, 2).flatten(-2), s["attn.k_norm.weight"], eps).view(n, p, heads, -1).transpose(1, 2)
        attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(n, p, c) @ s["attn.proj.weight"].T + s["attn.proj.bias"]
        x = x + out * s["ls1"]
        h = rms_norm(x, s["norm2.weight"], eps)
        mlp = F.gelu(h @ s["mlp.fc1.weight"].T + s["mlp.fc1.bias"]) @ s["mlp.fc2.weight"].T + s["mlp.fc2.bias"]
        x = x + mlp * s["ls2"]
    return x


def test_internvit_6b_matches_official_equations():
    """The 6B options (rms_norm, qk-normalisation, no qkv bias) at tiny size; head_dim 8 x 4 heads."""
    six_b = family_config("26B").vision
    config = dataclasses.replace(
        tiny_config().vision, norm_type=six_b.norm_type, qk_normalization=six_b.qk_normalization,
        qkv_bias=six_b.qkv_bias, layer_norm_eps=six_b.layer_norm_eps,
    )
    torch.manual_seed(0)
    model = InternVisionModel(config).eval()
    with torch.no_grad():
        for name, t in model.named_parameters():
            t.copy_((1.0 + 0.2 * torch.randn_like(t)) if name.endswith(("norm.weight", "norm1.weight", "norm2.weight",
                                                                          "ls1", "ls2")) else 0.1 * torch.randn_like(t))
        pixels = torch.randn(2, 3, 56, 56)
        expected = official_internvit(dict(model.state_dict()), config, pixels)
        assert_close(model(pixels), expected, atol=1e-5, rtol=0)
    assert model.encoder.layers[0].attn.qkv.bias is None
