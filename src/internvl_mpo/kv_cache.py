"""Static per-layer key/value buffers for generation, one row per sequence.

Each buffer has a fixed shape (B, K, S, D). A row's slot s holds the token at position s; prefill
fills slots 0..T-1 of one row, each decode step writes one slot per row at that row's position.
Slots not yet written are hidden by the attention mask the engine keeps (and are zero: the engine
clears what a finished sequence wrote), so the decode step sees the same shapes every time (friendly
to torch.compile and CUDA graphs). The attention modules only call `update(positions, k, v)`;
`prefill_row` and `decode_view` choose what that call does.
"""

from __future__ import annotations

import torch


class KVCache:
    """Two plain tensors, not an nn.Module: torch.compile keeps a module's buffer shapes static, so
    every cache size would compile the decode step anew and the ninth would fail."""

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype, device=None,
                 zeros=torch.zeros):
        """`zeros(shape, dtype=, device=)` makes each of the two zero-filled buffers."""
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = zeros(shape, dtype=dtype, device=device)
        self.v = zeros(shape, dtype=dtype, device=device)

    def prefill_row(self, row: int) -> "_PrefillRow":
        return _PrefillRow(self, row)

    def decode_view(self, rows: int, span: int) -> "_DecodeView":
        """Rows 0..rows-1, reading the first `span` slots."""
        return _DecodeView(self, rows, span)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy slots 0..length-1 of row `src` into row `dst` (a length past the end means all)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]

    def clear_row(self, row: int, length: int) -> None:
        """Zero slots 0..length-1 of `row` (a length past the end means all). A masked slot still enters attention as 0 x value, so a free
        row must hold no inf or NaN that its last sequence left (fp16 overflow) for the next one."""
        self.k[row, :, :length] = 0
        self.v[row, :, :length] = 0


class _PrefillRow:
    """Writes a whole prompt's k, v (1, K, T, D) into slots 0..T-1 of one row; attention stays local."""

    def __init__(self, cache: KVCache, row: int):
        self.cache, self.row = cache, row

    def update(self, positions, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        self.cache.k[self.row, :, :t] = k[0]
        self.cache.v[self.row, :, :t] = v[0]
        return k, v


class _DecodeView:
    """Writes one token per row (rows 0..n-1) at its position; returns the first `span` slots."""

    def __init__(self, cache: KVCache, rows: int, span: int):
        self.cache, self.rows, self.span = cache, rows, span

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (n,), k and v (n, K, 1, D): row r's slot positions[r] gets k[r], v[r]."""
        k_cache, v_cache = self.cache.k[: self.rows], self.cache.v[: self.rows]
        # one scatter per buffer: rows 0..n-1 need no row index (index_put's costs several ops more)
        slots = positions[:, None, None, None].expand(k.shape)  # (n, K, 1, D)
        k_cache.scatter_(2, slots, k)
        v_cache.scatter_(2, slots, v)
        return k_cache[:, :, : self.span], v_cache[:, :, : self.span]


def make_caches(config, batch: int, max_len: int, dtype, devices, zeros=torch.zeros) -> list[KVCache]:
    """One cache per decoder layer of an LLMConfig; `devices` is one device, or one per layer; `zeros` makes
    each buffer, layer by layer, k before v."""
    if not isinstance(devices, (list, tuple)):
        devices = [devices] * config.num_hidden_layers
    return [
        KVCache(batch, max_len, config.num_key_value_heads, config.head_dim, dtype, device, zeros)
        for device in devices
    ]
