"""The InternLM2 / InternLM2.5 decoder of InternVL2.5-2B, -8B and -26B.

Mirrors `InternLM2ForCausalLM` in OpenGVLab/InternVL
`internvl_chat/internvl/model/internlm2/modeling_internlm2.py` (eager attention path). Attribute names
equal the checkpoint keys under `language_model.`: `model.tok_embeddings`,
`model.layers.N.attention.{wqkv,wo}`, `model.layers.N.feed_forward.{w1,w2,w3}`,
`model.layers.N.{attention_norm,ffn_norm}`, `model.norm`, `output`. Same interface as
`llm.Qwen2ForCausalLM` (`.model(...) -> hidden`, `input_embeddings()`, `output_head()`), and the same
RoPE, RMSNorm, KV cache and mask helpers from `llm.py`.

Quirks kept for parity:
- `wqkv` is one fused projection whose output rows are grouped per kv head: for each of the K kv
  heads, its H/K query heads, then its key head, then its value head (each D rows). Query head
  `kv * (H/K) + g` therefore shares kv head `kv`, the usual GQA pairing;
- `bias` (config key, default True in the official config class, False in every released
  checkpoint) switches the bias of both `wqkv` and `wo`; the MLP never has one;
- `w1` is the gate, `w3` the up projection and `w2` the down projection (SwiGLU);
- the token embedding has `padding_idx = pad_token_id` as in the official code, so during training
  the pad row (id 2, `</s>`, in the released models) gets no gradient;
- dynamic NTK RoPE (`rope_scaling.type = "dynamic"`, all released InternLM2.5 models) only changes
  the frequencies past max_position_embeddings; the context is capped there, so it is plain RoPE. (Past
  it the official frequencies depend on the longest sequence the module has seen, not only this one.)
Refused: tied embeddings (the InternVL config class forces them off) and the V2PE position variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LLMConfig
from .errors import ConfigError
from .kv_cache import KVCache
from .llm import (Embedding, Linear, RotaryEmbedding, attend, context_cap, init_language_model, refuse_past_cap,
                  run_layers)
from .vision import RMSNorm


class InternLM2Attention(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        bias = bool(config.extra.get("bias", True))
        self.wqkv = Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim, bias=bias)
        self.wo = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.dropout = config.attention_dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        cache_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.wqkv(x).view(b, t, self.num_kv_heads, self.groups + 2, self.head_dim)  # (B, T, K, H/K + 2, D)
        q = qkv[:, :, :, : self.groups].reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = qkv[:, :, :, -2].transpose(1, 2)  # (B, K, T, D)
        v = qkv[:, :, :, -1].transpose(1, 2)  # (B, K, T, D)
        dropout = self.dropout if self.training else 0.0
        gqa = self.num_kv_heads != self.num_heads  # from ints: k.shape would be symbolic under torch.compile
        return self.wo(attend(q, k, v, cos, sin, mask, cache, cache_positions, dropout, gqa))


class InternLM2MLP(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.w1 = Linear(config.hidden_size, config.intermediate_size, bias=False)  # gate
        self.w3 = Linear(config.hidden_size, config.intermediate_size, bias=False)  # up
        self.w2 = Linear(config.intermediate_size, config.hidden_size, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = InternLM2Attention(config)
        self.ffn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.feed_forward = InternLM2MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, cache_positions=None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, cache_positions)
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2Model(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.tok_embeddings = Embedding(config.vocab_size, config.hidden_size, config.extra.get("pad_token_id"))
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        self.max_tokens = context_cap(config)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        caches: list[KVCache] | None = None,
        cache_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds (B, T, C), position_ids (B, T) -> final hidden states (B, T, C).

        Arguments as in `llm.Qwen2Model.forward`.
        """
        if caches is None:
            refuse_past_cap(self.max_tokens, inputs_embeds.shape[1])
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        x = run_layers(self.layers, inputs_embeds, cos, sin, mask, caches, cache_positions)
        return self.norm(x.to(self.norm.weight.device))


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        if config.tie_word_embeddings:
            raise ConfigError(
                "llm_config.tie_word_embeddings=true is not supported for InternLM2 (InternVL forces false)"
            )
        version = config.extra.get("rope_pos_id_version")
        if version not in (None, "default"):
            raise ConfigError(f"llm_config.rope_pos_id_version {version!r} is not implemented (only 'default')")
        self.config = config
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def input_embeddings(self) -> nn.Embedding:
        return self.model.tok_embeddings

    def output_head(self) -> nn.Linear:
        return self.output

    def forward(self, inputs_embeds, position_ids, mask=None, caches=None, cache_positions=None) -> torch.Tensor:
        """Logits (B, T, V) in the activation dtype."""
        return self.output(self.model(inputs_embeds, position_ids, mask, caches, cache_positions))

    def init_weights(self, std: float = 0.02) -> None:
        init_language_model(self, std)
