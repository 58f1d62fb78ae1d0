"""The Qwen2 / Qwen2.5 decoder that InternVL2.5 uses as its language model.

Mirrors transformers' `Qwen2ForCausalLM` (the official InternVL code wraps it unchanged), so the
attribute names equal the checkpoint keys under `language_model.`: `model.embed_tokens`,
`model.layers.N.self_attn.{q,k,v,o}_proj`, `model.layers.N.mlp.{gate,up,down}_proj`,
`model.layers.N.{input,post_attention}_layernorm`, `model.norm`, `lm_head`. q/k/v projections carry a
bias, o_proj does not; RoPE is the non-interleaved (rotate-half) form over the whole head dim, with
the cos/sin tables computed in fp32 and cast to the activation dtype, as transformers does.

The forward takes embeddings (the image splice happens in `model.py`) and returns final hidden
states; `lm_head` is applied by the caller, so training can compute label log-probs in chunks
without building the full (B, T, V) logits. An optional static KV cache serves generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LLMConfig
from .errors import InputError
from .kv_cache import KVCache
from .vision import RMSNorm


class RotaryEmbedding(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        # Linear scaling divides positions; dynamic NTK equals plain RoPE up to max_position_embeddings,
        # and the context is capped there (prompts beyond it are refused before any compute).
        scaling = config.rope_scaling or {}
        self.position_scale = 1.0 / float(scaling.get("factor", 1.0)) if config.rope_type == "linear" else 1.0
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device) -> torch.Tensor:
        """Always fp32 (a stored buffer would be rounded by `model.to(bf16)`); computed once per device."""
        if device not in self._inv_freq:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
            self._inv_freq[device] = 1.0 / (self.theta**exponent)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, 1, T, D) in `dtype` (broadcast over heads); the first
        half of sin is negated for `apply_rope`."""
        positions = position_ids.float()
        if self.position_scale != 1.0:
            positions = positions * self.position_scale
        freqs = positions[..., None] * self.inv_freq(position_ids.device)  # (B, T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # cos/sin of the full width, as transformers rounds them
        sin = emb.sin()
        sin[..., : self.head_dim // 2].neg_()
        return emb.cos().to(dtype)[:, None], sin.to(dtype)[:, None]


def context_cap(config: LLMConfig) -> int | None:
    """The most tokens one uncached forward takes: max_position_embeddings under dynamic NTK RoPE, which transformers
    rescales beyond it (every position's frequencies change with the length); None for other RoPE."""
    return config.max_position_embeddings if config.rope_type == "dynamic" else None


def refuse_past_cap(cap: int | None, tokens: int) -> None:
    if cap is not None and tokens > cap:
        raise InputError(f"{tokens} tokens are more than llm_config.max_position_embeddings ({cap}), where dynamic "
                         "RoPE (llm_config.rope_scaling) would change every position's frequencies; this package caps "
                         "the context there")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, 1, T, D) from RotaryEmbedding. The rotate-half form x cos +
    [-x2, x1] sin, written as x cos + [x2, x1] [-sin, sin]: the same products, bit for bit."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# The row blocks of `row_blocks_matmul`: the most rows that fit in ROW_BLOCK_BYTES (the blocks stay in a
# core's L2 cache while MKL packs them), and no form for blocks under MIN_ROW_BLOCK_BYTES.
ROW_BLOCK_BYTES = 512 << 10
MIN_ROW_BLOCK_BYTES = 64 << 10


def row_block(out_features: int, in_features: int) -> int | None:
    """The rows of `row_blocks_matmul`'s blocks for an fp32 weight: the largest divisor of out_features whose
    block fits in ROW_BLOCK_BYTES, leaving two blocks or more; None where that block is under MIN_ROW_BLOCK_BYTES."""
    row_bytes = 4 * in_features
    most = min(out_features // 2, ROW_BLOCK_BYTES // row_bytes)
    if most < 1:
        return None
    # Searched from both ends at once: down from `most` rows, and up from the fewest blocks of at most `most`
    # rows, whose first divisor gives the same block. It runs at every call of `row_blocks_matmul`: either
    # search alone takes hundreds of steps for some heads (151674 = 2 * 3 * 17 * 1487 rows of 64 or of 896).
    rows, blocks = most, -(-out_features // most)
    while out_features % rows and out_features % blocks:
        rows, blocks = rows - 1, blocks + 1
    if out_features % rows:
        rows = out_features // blocks
    return rows if rows * row_bytes >= MIN_ROW_BLOCK_BYTES else None


def row_blocks_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ weight.T (+ bias) for a few rows x against an fp32 CPU weight, as one bmm of x against each block of
    `row_block` weight rows; None where no block size applies (or the weight is not a contiguous fp32 one). For
    4 to 12 rows, MKL's fp32 x @ W.T against a weight that is not in the caches streams it at about half its
    rate for one to three rows (the small config's 4864 x 896 weights on a 2-core Xeon, 2026-12-06: 13-15 GB/s
    at 4 rows, 7-9 at 8-12, 23-29 at 1-3), while this form streams it at 17-22 GB/s; without a bias, the
    values came out equal to F.linear's, bit for bit, there."""
    out_features, in_features = weight.shape
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    block = row_block(out_features, in_features)
    if block is None:
        return None
    blocks, rows = out_features // block, x.numel() // in_features
    rows_x = x.reshape(rows, in_features).expand(blocks, rows, in_features)
    weight = weight.view(blocks, block, in_features).transpose(1, 2)
    if bias is None:
        out = torch.bmm(rows_x, weight)
    else:
        out = torch.baddbmm(bias.view(blocks, 1, block), rows_x, weight)
    return out.transpose(0, 1).reshape(*x.shape[:-1], out_features)  # (blocks, rows, block) -> (rows, out)


def thread_count() -> int:
    """torch's intra-op threads. The engine marks it a constant when it compiles the decode step (not
    here: torch.compiler's marker imports dynamo, which costs every eager process about a second and
    70 MB), so a compiled graph keeps the count it was traced with (any count gives the same values up
    to rounding)."""
    return torch.get_num_threads()


def blocked_matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ weight.T (+ bias) for one row x against an fp32 CPU weight, as one bmm over equal blocks
    of the weight's rows, one block per thread; None where that does not apply (other dtypes, a
    non-contiguous weight, one thread, no divisor of the row count up to the thread count). torch
    runs a bmm's blocks on its threads, each a matrix-vector product of its own, while MKL's one fp32
    matrix-vector product streams the weight at about half the memory bandwidth on a 2-core CPU
    (13-19 against 26-35 GB/s for the decoder's shapes, benchmarks/generate.py). Same values up to
    fp32 rounding. Written with as few tensor ops as it takes (one view each of x, the weight and
    the bias): in a decode step it runs seven times per layer, and each op costs microseconds."""
    out_features, in_features = weight.shape
    if weight.dtype != torch.float32 or not weight.is_contiguous():
        return None
    blocks = thread_count()
    while blocks > 1 and out_features % blocks:
        blocks -= 1
    if blocks < 2:
        return None
    if x.stride(-1) != 1:
        x = x.contiguous()
    # x as the same transposed row in every block (strides (0, 1, in)): torch picks the blocks' BLAS
    # call by the strides, and a contiguous column takes a path about 4x slower here.
    column = x.as_strided((blocks, in_features, 1), (0, 1, in_features))
    weight = weight.view(blocks, -1, in_features)
    if bias is None:
        out = torch.bmm(weight, column)
    else:
        out = torch.baddbmm(bias.view(blocks, -1, 1), weight, column)
    return out.view(*x.shape[:-1], out_features)


def matvec(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ weight.T (+ bias) for one row x against a bf16 CPU weight, as torch.mv (addmv with a bias); None for
    other dtypes or a non-contiguous weight. In bf16, F.linear's kernel streamed the small config's weights from
    memory at 10-16 GB/s at one row on the 2-core Xeon (2026-12-06), torch.mv at 1.2-1.5 times that; the values came
    out equal to F.linear's, bit for bit, there."""
    if weight.dtype != torch.bfloat16 or not weight.is_contiguous():
        return None
    row = x.reshape(-1)
    out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)
    return out.view(*x.shape[:-1], weight.shape[0])


def transposed_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                      ) -> torch.Tensor | None:
    """x @ weight.T (+ bias) for a few rows x against a bf16 CPU weight, as (weight @ x.T).T (addmm with a bias);
    None for other dtypes or a non-contiguous weight. In bf16 at 2-16 rows it streamed the small config's weights
    from memory at 1.1-1.5 times F.linear's rate on the 2-core Xeon (2026-12-06), with the same values, bit for
    bit, there."""
    if weight.dtype != torch.bfloat16 or not weight.is_contiguous():
        return None
    rows = x.reshape(-1, x.shape[-1]).T
    out = weight @ rows if bias is None else torch.addmm(bias[:, None], weight, rows)
    return out.T.reshape(*x.shape[:-1], weight.shape[0])


# Smallest weights (entries) that take the few-row forms: from 64K entries (256 x 256) on, both pay
# wherever the weight comes from memory rather than the caches (the small config's 128 x 896 k and
# v projections gain too); smaller ones stay with nn.Linear's kernels.
FEW_ROWS_MIN_ENTRIES = 1 << 16
# Most rows that take the few-row forms: on the 2-core Xeon the row blocks beat MKL from 4 to 12 rows
# (1.2-1.9x for the small config's shapes) and tie at 16.
FEW_ROWS_MAX = 16


def few_row_weight(weight: torch.Tensor) -> bool:
    """Whether a weight is one the few-row forms serve: fp32 or bf16, on the CPU, FEW_ROWS_MIN_ENTRIES or more."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and weight.numel() >= FEW_ROWS_MIN_ENTRIES)


def few_rows_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    one_row: bool = True, more_rows: bool = True) -> torch.Tensor | None:
    """x @ weight.T (+ bias) in a faster form for 1 to FEW_ROWS_MAX rows against a large fp32 CPU weight:
    `blocked_matvec` for one row (unless `one_row` is False), `row_blocks_matmul` for more (unless
    `more_rows` is False); against a bf16 one, `matvec` and `transposed_matmul` (in bf16 the fp32 forms are slower
    than nn.Linear's kernels); None: use the plain matmul (other devices and dtypes). Whether the forms pay depends
    on the CPU: the engine times them (generate/cpu_forms.py)."""
    rows = x.numel() // x.shape[-1]
    if not (1 <= rows <= FEW_ROWS_MAX and few_row_weight(weight)):
        return None
    if rows == 1:
        if not one_row:
            return None
        return blocked_matvec(x, weight, bias) if weight.dtype == torch.float32 else matvec(x, weight, bias)
    if not more_rows:
        return None
    return row_blocks_matmul(x, weight, bias) if weight.dtype == torch.float32 else transposed_matmul(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear that computes 1 to FEW_ROWS_MAX rows against a large CPU weight with `few_rows_matmul`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        # Decided once: a weight too small for the few-row forms goes straight to F.linear. The engine
        # may turn either form off where it times slower than F.linear on this CPU.
        self.one_row = self.more_rows = in_features * out_features >= FEW_ROWS_MIN_ENTRIES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        if self.one_row or self.more_rows:
            out = few_rows_matmul(x, self.weight, self.bias, self.one_row, self.more_rows)
        return F.linear(x, self.weight, self.bias) if out is None else out


class Embedding(nn.Embedding):
    """nn.Embedding that draws no weights on the meta device (a checkpoint's model is built there):
    torch's `normal_` on meta tensors runs through its Python reference, which imports dynamo, about
    a second and 70 MB for every process that loads a model."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Attention(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=False)
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
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, K, T, D)
        dropout = self.dropout if self.training else 0.0
        gqa = self.num_kv_heads != self.num_heads  # from ints: k.shape would be symbolic under torch.compile
        return self.o_proj(attend(q, k, v, cos, sin, mask, cache, cache_positions, dropout, gqa))


def attend(q, k, v, cos, sin, mask, cache: KVCache | None, cache_positions, dropout_p: float,
           gqa: bool) -> torch.Tensor:
    """A decoder layer's attention of q (B, H, T, D) over k, v (B, K, T, D), all three before RoPE, through its KV
    cache where it has one (written at cache_positions; arguments as in `Qwen2Model.forward`); `gqa`: K < H.
    -> (B, T, H * D)."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache is not None:
        k, v = cache.update(cache_positions, k, v)  # (B, K, S, D)
    b, h, t, d = q.shape
    if gqa and t == 1 and mask is not None:
        # A decode step: the query heads of each KV head go on the query axis, (B, K, H/K, D), and the mask broadcasts
        # over them. The same values without enable_gqa, which with a mask has no fused kernel on CUDA (SDPA fell
        # back to its math one, K and V copied per query head in fp32); 1.5x as fast on the CPU for 14 over 2 heads.
        out = F.scaled_dot_product_attention(q.view(b, k.shape[1], -1, d), k, v, attn_mask=mask, dropout_p=dropout_p)
        return out.reshape(b, 1, h * d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout_p,
                                         enable_gqa=gqa)  # (B, H, T, D)
    return out.transpose(1, 2).reshape(b, t, -1)


class MLP(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache=None, cache_positions=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        # as transformers' Qwen2Model: the pad row (llm_config.pad_token_id, if any) gets no gradient
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.extra.get("pad_token_id"))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
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

        mask: boolean (B, 1, T, S), True where a query may attend a key (or the same as an additive
        float mask: 0 or -inf); None means plainly causal (no padding, no cache). caches: one KVCache per layer; cache_positions (T,) are the slots
        written by this call. Without caches, more tokens than `context_cap` are refused (generation caps them).
        """
        if caches is None:
            refuse_past_cap(self.max_tokens, inputs_embeds.shape[1])
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        x = run_layers(self.layers, inputs_embeds, cos, sin, mask, caches, cache_positions)
        return self.norm(x.to(self.norm.weight.device))


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, config: LLMConfig):
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # The two accessors every language model of this package offers (InternLM2 names them differently).
    def input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def output_head(self) -> nn.Linear:
        return self.lm_head

    def forward(self, inputs_embeds, position_ids, mask=None, caches=None, cache_positions=None) -> torch.Tensor:
        """Logits (B, T, V) in the activation dtype."""
        return self.lm_head(self.model(inputs_embeds, position_ids, mask, caches, cache_positions))

    def init_weights(self, std: float = 0.02) -> None:
        init_language_model(self, std)


@torch.no_grad()
def init_language_model(lm: nn.Module, std: float = 0.02) -> None:
    """Random init of a language model of this package, for training from scratch (never needed when loading a
    checkpoint)."""
    for m in lm.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)
    embeddings = lm.input_embeddings()
    if embeddings.padding_idx is not None:  # zero, as transformers' init leaves it
        embeddings.weight[embeddings.padding_idx].zero_()


def run_layers(layers, x, cos, sin, mask, caches=None, cache_positions=None) -> torch.Tensor:
    """Run decoder layers in order. When layers sit on different devices (a `device_map`), the
    hidden states and the per-call tensors follow them; on one device every `.to` is a no-op."""
    for i, layer in enumerate(layers):
        device = next(layer.children()).weight.device  # its first norm's (a parameter walk costs ~10 us)
        if x.device != device:
            x, cos, sin = x.to(device), cos.to(device), sin.to(device)
            mask = mask.to(device) if mask is not None else None
            cache_positions = cache_positions.to(device) if cache_positions is not None else None
        x = layer(x, cos, sin, mask, caches[i] if caches is not None else None, cache_positions)
    return x


def causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, S, S) mask from a (B, S) padding mask (1 = real token), causal over positions.

    A padded query may attend to itself, so no row is fully masked: SDPA would return NaN there, and
    NaN values in padded rows would leak through the zero-weighted keys of later layers.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    causal = positions[None, :] <= positions[:, None]  # (S, S): query rows, key columns
    mask = causal[None] & attention_mask.bool()[:, None, :]  # (B, S, S)
    mask = mask | (positions[None, :] == positions[:, None])[None]
    return mask[:, None]
