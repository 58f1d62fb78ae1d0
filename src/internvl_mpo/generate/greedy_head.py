"""Exact greedy tokens from a large vocabulary head, screened with an int8 copy of the head.

A greedy row without repetition penalty needs only the argmax of its fp32 logits W h, not the
logits. On the CPU the fp32 head is read from memory at every step: 39 MB for a 151674-token
vocabulary at width 64, more than the L3 cache, which makes it most of a small model's decode
time. `GreedyScreen` keeps an int8 copy (a quarter of the bytes, one scale per vocabulary row) and:

1. computes approximate logits a_i = s_i (q_i . h') with torch's int8 weight-only kernel, where
   h' = bf16(h);
2. bounds |a_i - l_i| <= b_i for every row (below), so row i's fp32 logit l_i lies in
   [a_i - b_i, a_i + b_i];
3. only rows whose upper end a_i + b_i reaches the best lower end max_k (a_k - b_k) can hold the
   maximum. The screen ranks blocks of 64 rows by the upper end of their largest a_i (with the
   block's largest scale). If the (K+1)-th best block lies below the best lower end, the K best
   blocks hold every such row, and their fp32 logits (K * 64 gathered rows of W) decide, ties
   going to the lowest id as in `torch.argmax`. Otherwise the row's `ok` is False and the caller
   computes the full logits.

Shapes are fixed (K blocks per row), so the screen runs inside a compiled decode step; the
host reads `ok` with the tokens it syncs on anyway. The token equals the argmax of an fp32
evaluation of W h; two fp32 matmul kernels may round a near-exact tie differently, as the
engine's own one-row and few-row head paths already do.

The bound. The scale s_i is a bf16 number >= max_j |W_ij| / 127, so s_i q_ij is exact in fp32 and
the kernel's products are exact. For row i, with C the width:
- weight rounding: |W_ij - s_i q_ij| <= s_i (1/2 + 2^-16), times ||h||_1;
- input rounding: |s_i q_ij| <= 127 s_i, times ||h - h'||_1 (measured per row of h);
- the kernel (aten/src/ATen/native/cpu/int8mm_kernel.cpp, AVX2, AVX512, NEON and scalar paths
  alike) sums the products in fp32 in some order, <= C 2^-24 * 127 s_i ||h'||_1, and rounds the
  sum to bf16 once, <= 2^-8 |a_i| (taken as 2^-7);
- the fp32 logits the screen stands for round as well, <= (C + 1) 2^-24 * 127 s_i ||h||_1;
- 2^-120 absolute for underflow; the total is raised by 1/64, which covers the fp32 rounding of
  the bound and of a_i +- b_i themselves (b_i >= 2^-7 |a_i|).
Non-finite hidden states or logits beyond the bf16 range make some upper end NaN or infinite;
`topk` ranks those first, and the check fails.
"""

from __future__ import annotations

import torch

BLOCK = 64  # vocabulary rows screened together
CANDIDATE_BLOCKS = 16  # 1024 rows get exact logits; fewer blocks fail the check on a few % of steps
MIN_SCALE = 2.0**-100  # keeps every scale a normal bf16 number, far above subnormal weights


def round_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= x, for finite x >= 0 (fp32 in, bf16 out, exact)."""
    bits = x.float().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32).bfloat16()


class GreedyScreen:
    def __init__(self, weight: torch.Tensor, blocks: int = CANDIDATE_BLOCKS):
        """weight: the fp32 head (V, C), finite; see `build`."""
        w = weight.detach()
        vocab, width = w.shape
        self.weight, self.vocab = w, vocab
        n_blocks = -(-vocab // BLOCK)
        self.blocks = min(blocks, n_blocks - 1)
        pad = n_blocks * BLOCK - vocab  # padding rows (q = 0) fill the last block
        self.q = torch.zeros(vocab + pad, width, dtype=torch.int8)  # (V', C)
        scale = torch.full((vocab + pad,), MIN_SCALE)
        for start in range(0, vocab, 4096):  # in slices: no full-size fp32 temporaries
            part = slice(start, min(start + 4096, vocab))
            peak = (w[part].abs().amax(dim=1) / 127 * (1 + 2.0**-20)).clamp_(min=MIN_SCALE)
            scale[part] = round_up_to_bf16(peak).float()
            self.q[part] = torch.round(w[part] / scale[part, None]).clamp_(-127, 127)
        self.scale = scale.bfloat16()  # (V',) exact: every scale is a bf16 number
        # Folded into the scales the bound multiplies: the final 1/64 margin of `bound`.
        self.row_scale = scale * (1 + 2.0**-6)  # (V',)
        self.block_scale = self.row_scale.view(n_blocks, BLOCK).amax(-1)  # (V'/BLOCK,)
        # For lower ends only: padding rows get an infinite scale, so their lower end is -inf (q = 0
        # makes their approximate logit 0, and the bound's other term is finite).
        lower_scale = self.row_scale.clone()
        lower_scale[vocab:] = torch.inf
        self.lower_scale = lower_scale.view(n_blocks, BLOCK)  # (V'/BLOCK, BLOCK)
        # Each block's row ids; padding rows read the last real row again, after it: argmax keeps the real one.
        self.block_ids = torch.arange(n_blocks * BLOCK).clamp_(max=vocab - 1).view(n_blocks, BLOCK)
        self.weight_term = 0.5 + 2.0**-16 + 127 * (2 * width + 4) * 2.0**-24

    @classmethod
    def build(cls, weight: torch.Tensor, blocks: int = CANDIDATE_BLOCKS) -> "GreedyScreen | None":
        """The screen of an fp32 CPU head whose width is a multiple of 16 (the kernel's vector loads),
        or None for any other head, or one with a non-finite weight."""
        if not (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.shape[1] % 16 == 0
                and weight.shape[0] > BLOCK):
            return None
        screen = cls(weight, blocks)
        # A row's scale is infinite or NaN exactly when the row holds an infinite or NaN weight.
        return screen if bool(torch.isfinite(screen.row_scale).all()) else None

    @staticmethod
    def bound(approx: torch.Tensor, row_scale: torch.Tensor, per_scale: torch.Tensor) -> torch.Tensor:
        """b >= |approx - logit|, growing with |approx| and with the scale (so block maxima bound
        blocks). The 2^-120 floor sits in per_scale (>= 2^-20 with scales >= 2^-100)."""
        return torch.add(per_scale * row_scale, approx.abs(), alpha=2.0**-7 * (1 + 2.0**-6))

    def per_scale(self, h: torch.Tensor, h16: torch.Tensor) -> torch.Tensor:
        """(B, 1): what the bound multiplies each row's scale by, for h (B, C) and h16 = bf16(h)."""
        lost = (h - h16).abs().sum(-1, keepdim=True)
        return self.weight_term * h.abs().sum(-1, keepdim=True) + (127 * lost + 2.0**-20)

    def approx(self, h16: torch.Tensor) -> torch.Tensor:
        """(B, V') approximate logits, padding rows included."""
        return torch.ops.aten._weight_int8pack_mm(h16, self.q, self.scale).float()

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, C) -> greedy token ids (B,) and ok (B,) bool; where ok is False, use the full logits."""
        b = hidden.shape[0]
        h = hidden.float()
        h16 = h.bfloat16()
        approx = self.approx(h16).view(b, -1, BLOCK)  # (B, V'/BLOCK, BLOCK)
        per_scale = self.per_scale(h, h16)  # (B, 1)
        # Upper end of each block: a + bound(a) grows with a, so the block's largest a gives it.
        peak = approx.amax(-1)  # (B, V'/BLOCK)
        top = (peak + self.bound(peak, self.block_scale, per_scale)).topk(self.blocks + 1, dim=-1)  # NaN first
        near = approx.gather(1, top.indices[..., None].expand(-1, -1, BLOCK))  # (B, K+1, BLOCK)
        scales = self.lower_scale.index_select(0, top.indices.flatten()).view(near.shape)
        lower = near - self.bound(near, scales, per_scale[..., None])
        # The row with the best lower end lies in these K+1 blocks whenever the check can pass;
        # a NaN or infinite upper end ranks first and fails it.
        ok = (top.values[:, -1] < lower.flatten(1).amax(-1)) & (top.values[:, 0] < torch.inf)
        blocks = top.indices[:, :-1].sort(dim=-1).values  # (B, K), ascending: ties go to the lowest id
        ids = self.block_ids.index_select(0, blocks.flatten()).view(b, -1)  # (B, K BLOCK)
        gathered = self.weight.index_select(0, ids.flatten()).view(b, -1, h.shape[-1])  # (B, K BLOCK, C)
        exact = (gathered @ h[:, :, None])[..., 0]  # (B, K BLOCK) fp32 logits
        return ids.gather(-1, exact.argmax(-1, keepdim=True))[:, 0], ok
