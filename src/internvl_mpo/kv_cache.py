"""Static per-layer key/value buffers for generation.

The buffers have a fixed shape (B, K, S, D) and are written by position index, so the decode step
sees the same shapes every time (friendly to torch.compile and CUDA graphs); positions not yet
written are hidden by the attention mask the engine builds.
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache(nn.Module):
    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, D) at slots `positions` (T,); return the whole buffers."""
        self.k.index_copy_(2, positions, k)
        self.v.index_copy_(2, positions, v)
        return self.k, self.v

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (finished sequences leave the batch)."""
        self.k = self.k.index_select(0, rows)
        self.v = self.v.index_select(0, rows)


def make_caches(config, batch: int, max_len: int, dtype, device) -> list[KVCache]:
    """One cache per decoder layer of an LLMConfig."""
    return [
        KVCache(batch, max_len, config.num_key_value_heads, config.head_dim, dtype, device)
        for _ in range(config.num_hidden_layers)
    ]
