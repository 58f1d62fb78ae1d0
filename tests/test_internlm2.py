"""InternLM2 decoder (InternVL2.5-2B/8B/26B) against transformers, through our checkpoint loader.

The reference is transformers' InternVLForConditionalGeneration with a Llama text model, which is how
transformers' `convert_internvl_weights_to_hf.py` ports the InternLM2-based checkpoints. Its random
weights are moved to the official InternLM2 layout here, by the rules of that script run backwards:
`tok_embeddings`/`output`/`attention.wo`/`feed_forward.w1,w2,w3`/`attention_norm`/`ffn_norm` renames,
and q/k/v merged into `wqkv` grouped per kv head ("(h gs d) z" with gs = H/K + 2).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.testing import assert_close

from internvl_mpo.config import LLMConfig, ModelConfig
from internvl_mpo.errors import ConfigError, InputError
from internvl_mpo.internlm2 import InternLM2ForCausalLM
from internvl_mpo.kv_cache import make_caches
from internvl_mpo.llm import causal_mask
from internvl_mpo.model import InternVL

from conftest import IMAGE_TOKEN_ID, hf_config, hf_to_official, tiny_config, write_checkpoint

TOL = dict(atol=1e-4, rtol=0)

# Renames of transformers' Llama keys to InternLM2 keys (transformers' conversion script, reversed).
LLAMA_TO_INTERNLM2 = {
    "embed_tokens": "tok_embeddings",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}


def internlm2_config(bias: bool = False, **vision_changes) -> ModelConfig:
    """The tiny test config with an InternLM2 text model (4 query heads, 2 kv heads)."""
    base = tiny_config(**vision_changes)
    llm = dataclasses.replace(
        base.llm, architectures=("InternLM2ForCausalLM",), model_type="internlm2", rms_norm_eps=1e-5,
        rope_theta=50000000.0, rope_scaling={"type": "dynamic", "factor": 2.5}, bos_token_id=1, eos_token_id=2,
        extra={"bias": bias, "pad_token_id": 2},
    )
    return base.replace(llm=llm)


def hf_llama_config(config: ModelConfig):
    from transformers import LlamaConfig

    l = config.llm
    hf = hf_config(config)
    hf.text_config = LlamaConfig(
        hidden_size=l.hidden_size, intermediate_size=l.intermediate_size, num_hidden_layers=l.num_hidden_layers,
        num_attention_heads=l.num_attention_heads, num_key_value_heads=l.num_key_value_heads,
        vocab_size=l.vocab_size, rms_norm_eps=l.rms_norm_eps, rope_theta=l.rope_theta,
        rope_scaling=dict(l.rope_scaling),  # a copy: transformers edits the dict in place
        max_position_embeddings=l.max_position_embeddings, attention_bias=bool(l.extra.get("bias", True)),
        mlp_bias=False, tie_word_embeddings=False, pad_token_id=2, bos_token_id=1, eos_token_id=2,
    )
    return hf


def hf_llama_reference(config: ModelConfig, seed: int = 0):
    """transformers' InternVL with a Llama decoder and random, non-trivial weights (eager attention)."""
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(hf_llama_config(config)).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("lambda_1", "lambda_2")) or "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def merge_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Llama q/k/v rows (weights or biases) -> InternLM2 wqkv rows: per kv head [its queries, k, v]."""
    rest = q.shape[1:]
    q = q.reshape(num_kv_heads, -1, *rest)  # (K, G*D, ...)
    k = k.reshape(num_kv_heads, -1, *rest)  # (K, D, ...)
    v = v.reshape(num_kv_heads, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def hf_llama_to_official(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' InternVL (Llama text model) keys -> official InternVL keys with an InternLM2 LLM."""
    text_prefix = "model.language_model."
    out = hf_to_official({k: v for k, v in state.items() if not k.startswith(text_prefix) and k != "lm_head.weight"})
    out["language_model.output.weight"] = state["lm_head.weight"]
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(text_prefix):
            continue
        name = key[len(text_prefix):]
        for proj in ("q_proj", "k_proj", "v_proj"):
            if f"self_attn.{proj}." in name:
                prefix, kind = name.split(f"self_attn.{proj}.")
                qkv.setdefault(f"{prefix}attention.wqkv.{kind}", {})[proj] = value
                break
        else:
            for old, new in LLAMA_TO_INTERNLM2.items():
                name = name.replace(old, new)
            out["language_model.model." + name] = value
    for name, parts in qkv.items():
        merged = merge_wqkv(parts["q_proj"], parts["k_proj"], parts["v_proj"], config.llm.num_key_value_heads)
        out["language_model.model." + name] = merged
    return out


@pytest.fixture
def internlm2_pair(tmp_path):
    def make(config: ModelConfig):
        ref = hf_llama_reference(config)
        state = hf_llama_to_official(ref.state_dict(), config)
        folder = write_checkpoint(tmp_path / "ckpt", config, state, shards=2)
        return ref, InternVL.from_pretrained(folder, dtype=torch.float32, image_token_id=IMAGE_TOKEN_ID)

    return make


def test_official_key_names_and_shapes():
    config = internlm2_config()
    with torch.device("meta"):
        model = InternVL(config)
    keys = {k: tuple(v) for k, v in model.expected_keys().items() if k.startswith("language_model.")}
    h, c, f, v = 64, 64, 128, 300  # query heads 4 x 16 dims, 2 kv heads x 16 dims: wqkv rows (4 + 2*2) * 16
    expected = {"language_model.model.tok_embeddings.weight": (v, c), "language_model.model.norm.weight": (c,),
                "language_model.output.weight": (v, c)}
    for i in range(2):
        p = f"language_model.model.layers.{i}."
        expected.update({
            p + "attention.wqkv.weight": (128, c), p + "attention.wo.weight": (c, h),
            p + "feed_forward.w1.weight": (f, c), p + "feed_forward.w3.weight": (f, c),
            p + "feed_forward.w2.weight": (c, f),
            p + "attention_norm.weight": (c,), p + "ffn_norm.weight": (c,),
        })
    assert keys == expected
    assert isinstance(model.language_model, InternLM2ForCausalLM)


@pytest.mark.parametrize("bias", [False, True])
def test_decoder_parity_with_llama(internlm2_pair, bias):
    """Right-padded batch through the decoder alone; bias=True also moves wqkv/wo biases."""
    config = internlm2_config(bias=bias)
    ref, ours = internlm2_pair(config)
    ids = torch.randint(0, 290, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        embeds = ours.language_model.input_embeddings()(ids)
        got = ours.language_model(embeds, torch.arange(11).expand(2, 11), causal_mask(mask))
    assert_close(got[0], expected[0], **TOL)
    assert_close(got[1, :7], expected[1, :7], **TOL)


@pytest.mark.parametrize("tiles", [0, 3])
def test_full_model_parity(internlm2_pair, tiles):
    config = internlm2_config()
    ref, ours = internlm2_pair(config)
    ids = torch.tensor([[5, 6] + [IMAGE_TOKEN_ID] * (tiles * config.num_image_token) + [7, 8, 9]])
    pixels = torch.randn(tiles, 3, 56, 56) if tiles else None
    with torch.no_grad():
        got = ours(ids, pixel_values=pixels)
        expected = ref(input_ids=ids, pixel_values=pixels).logits
    assert (got - expected).abs().max() <= 1e-4


def test_cached_decoding_equals_full_forward():
    """Prefill each row into the static cache, then decode three tokens; logits equal one full pass."""
    torch.manual_seed(0)
    config = internlm2_config().llm
    model = InternLM2ForCausalLM(config).eval()
    model.init_weights(0.1)
    ids = torch.randint(0, 290, (2, 9))
    embeds = model.input_embeddings()(ids)
    caches = make_caches(config, 2, 16, torch.float32, "cpu")
    with torch.no_grad():
        full = model(embeds, torch.arange(9).expand(2, 9))
        prefill = [model(embeds[row : row + 1, :6], torch.arange(6)[None], None,
                         [c.prefill_row(row) for c in caches], torch.arange(6)) for row in range(2)]
        steps = [torch.cat(prefill)]
        for t in range(6, 9):
            mask = torch.ones(2, 1, 1, t + 1, dtype=torch.bool)
            views = [c.decode_view(2, t + 1) for c in caches]
            steps.append(model(embeds[:, t : t + 1], torch.full((2, 1), t), mask, views, torch.full((2,), t)))
    assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_pad_row_gets_no_gradient():
    """Official quirk: nn.Embedding(padding_idx=pad_token_id) leaves the pad row out of training."""
    config = internlm2_config().llm
    model = InternLM2ForCausalLM(config)
    model.init_weights()
    assert model.input_embeddings().padding_idx == 2
    ids = torch.tensor([[1, 2, 3, 2, 4]])
    model(model.input_embeddings()(ids), torch.arange(5)[None]).sum().backward()
    grad = model.input_embeddings().weight.grad
    assert grad[2].abs().sum() == 0 and grad[3].abs().sum() > 0


def test_refusals():
    llm = internlm2_config().llm
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        InternLM2ForCausalLM(dataclasses.replace(llm, tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="rope_pos_id_version 'v2pe'"):
        InternLM2ForCausalLM(dataclasses.replace(llm, extra={"rope_pos_id_version": "v2pe"}))
    with pytest.raises(ConfigError, match="InternLM3ForCausalLM"):
        LLMConfig(architectures=("InternLM3ForCausalLM",))
    for pad in (llm.vocab_size, -1, "2"):  # nn.Embedding would fail with a bare assertion, or count from the end
        with pytest.raises(ConfigError, match=f"llm_config.pad_token_id {pad!r} is not a token id below {llm.vocab_size}"):
            InternLM2ForCausalLM(dataclasses.replace(llm, extra={"pad_token_id": pad}))


def test_bias_defaults_to_true_like_the_official_config_class():
    llm = dataclasses.replace(internlm2_config().llm, extra={})
    attention = InternLM2ForCausalLM(llm).model.layers[0].attention
    assert attention.wqkv.bias is not None and attention.wo.bias is not None


@pytest.mark.parametrize("make", [internlm2_config, tiny_config], ids=["internlm2", "qwen2"])
def test_a_sequence_past_the_context_is_refused_where_dynamic_rope_would_rescale(make):
    """Past max_position_embeddings the official dynamic NTK RoPE changes the frequencies of every position
    (to values that depend on the longest sequence its module has seen); a forward pass that long ran with
    plain RoPE and gave other logits without a word. It is refused, naming the limit; without dynamic
    scaling (plain RoPE there too) it runs. Qwen2's decoder lacked the cap (transformers' Qwen2 rescales too)."""
    base = make()
    config = base.replace(llm=dataclasses.replace(base.llm, max_position_embeddings=16,
                                                  rope_scaling={"type": "dynamic", "factor": 2.0}))
    torch.manual_seed(0)
    model = InternVL(config, image_token_id=IMAGE_TOKEN_ID).eval()
    with torch.no_grad():
        assert model(torch.randint(0, 290, (2, 16))).shape == (2, 16, 300)
        with pytest.raises(InputError, match=r"17 tokens are more than llm_config.max_position_embeddings \(16\)"):
            model(torch.randint(0, 290, (2, 17)))
        plain = InternVL(config.replace(llm=dataclasses.replace(config.llm, rope_scaling=None)))
        assert plain(torch.randint(0, 290, (1, 17))).shape == (1, 17, 300)
