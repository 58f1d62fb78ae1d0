"""Exact greedy tokens from a large vocabulary head, screened with an int8 copy of the head.

A greedy row without repetition penalty needs only the argmax of its fp32 logits W h, not the
logits. On the CPU the fp32 head is read at every step: 39 MB for a 151674-token vocabulary at
width 64, which makes it most of a small model's decode time. `GreedyScreen` keeps an int8 copy (a
quarter of the bytes, one scale per vocabulary row) and:

1. computes approximate logits a_i of every row with one of two int8 kernels (below);
2. bounds |a_i - l_i| <= b_i for every row (below), so row i's fp32 logit l_i is at most a_i + b_i;
3. ranks blocks of 64 rows by their upper end: the largest a_i of the block plus the bound that
   goes with it and the block's largest scale. It computes the fp32 logits of the K best blocks
   (K * 64 gathered rows of W); if the (K+1)-th block's upper end, plus what two fp32 evaluations of
   a logit may differ by, lies below the largest of them, no row outside the K blocks can beat it in
   any fp32 evaluation, and the largest decides, ties going to the lowest id as in `torch.argmax`.
   Otherwise the row's `ok` is False, and `widen` computes the fp32 logits of every block whose upper
   end comes within reach of that best logit (the caller computes the full logits where those would
   be more than a quarter of the head, or where anything is not finite).

Shapes are fixed (K blocks per row), so the screen runs inside a compiled decode step; the host
reads `ok` with the tokens it syncs on anyway. The token equals the argmax of an fp32 evaluation of
W h; two fp32 matmul kernels may round a near-exact tie among the K blocks' rows differently, as
the engine's own one-row and few-row head paths already do.

The kernels and their bounds. The scale s_i is a bf16 number >= max_j |W_ij| / 127, so s_i q_ij is
exact in fp32. For row i, with C the width, both bounds hold:
- weight rounding: |W_ij - s_i q_ij| <= s_i (1/2 + 2^-16), times the input's L1 norm;
- the fp32 logits the screen stands for round as well, <= (C + 1) 2^-24 * 127 s_i ||h||_1;
- an absolute 2^-20 s_i for underflow; the total is raised by 1/64, which covers the fp32
  rounding of the bound and of a_i + b_i themselves (b_i >= 2^-16 |a_i|).
`onednn` (x86 builds of torch, where a probe finds it exact): oneDNN's int8 x int8 linear, with
the packed weight, on the input in two int8 levels. h is divided by a power of two u (exact) to g,
with max |g| <= 127; high = round(g), low = round(128 (g - high)) in [-64, 64], so g = high
+ low / 128 + lost with |lost| <= 1/256 (exact in fp32). The kernel's integer sums are exact, and
it rounds s_i * sum once to fp32 for each level; a_i = high part + low part / 128 rounds once more.
The bound, in units of u (the ranking does not change with them): the input term 127 s_i ||lost||_1;
the roundings, <= 2^-24 (|a_i| + 127 s_i (||high||_1 + ||low||_1 / 128)) <= 2^-24 (|a_i| + 4 * 127 s_i
||g||_1) (a rounded number is at most twice its argument), within 2^-16 |a_i| and the C 2^-24 * 127 s_i
||g||_1 of the weight term that this kernel's exact sums leave spare (C >= 4; `build` takes multiples of 16).
Compiled steps call it through a custom op (`onednn_int8_linear`): inductor lowers torch's op only for
frozen weights. `int8pack` (elsewhere): torch's int8 weight-only kernel on h' = bf16(h). Input
rounding: 127 s_i ||h - h'||_1; the kernel (aten/src/ATen/native/cpu/int8mm_kernel.cpp, AVX2, AVX512,
NEON and scalar paths alike) sums the products in fp32 in some order, <= C 2^-24 * 127 s_i ||h'||_1,
and rounds the sum to bf16 once, <= 2^-8 |a_i| (taken as 2^-7).
Non-finite hidden states make the bound NaN or infinite, and `topk` ranks those first; they and
logits beyond the fp32 range (or, for int8pack, beyond bf16's) fail the check.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 64  # vocabulary rows screened together
CANDIDATE_BLOCKS = 16  # 1024 rows get exact logits; fewer blocks fail the check on a few % of steps
MIN_SCALE = 2.0**-100  # keeps every scale a normal bf16 number, far above subnormal weights


def round_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= x, for finite x >= 0 (fp32 in, bf16 out, exact)."""
    bits = x.float().view(torch.int32)
    return ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32).bfloat16()


def power_of_two_at_least(x: torch.Tensor) -> torch.Tensor:
    """2^k >= x for finite x >= 0 (at least 2^-100), up to x's own rounding: any power of two where x is not
    finite."""
    bits = x.clamp(min=2.0**-100).view(torch.int32)
    return ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)


@torch.library.custom_op("internvl_mpo::onednn_int8_linear", mutates_args=())
def onednn_int8_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor
                       ) -> torch.Tensor:
    """oneDNN's int8 x int8 linear in a compiled step: x (B, C) int8 -> fp32 (B, V'), row i's exact sum times
    scale[i], rounded once. inductor lowers torch's op only for frozen weights; it calls this one as it stands."""
    return int8_linear(x, packed, scale, zeros)


@onednn_int8_linear.register_fake
def _(x, packed, scale, zeros):
    return x.new_empty((x.shape[0], scale.shape[0]), dtype=torch.float32)


def int8_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    return torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, scale, zeros, None, 1.0, 0, torch.float32, "none",
                                              [], "")


@functools.cache
def onednn_int8(width: int) -> bool:
    """Whether torch's oneDNN int8 linear runs here (x86 builds) and sums exactly at this width: without
    VNNI instructions, x86 int8 products may saturate 16-bit pair sums. Probed with the extreme inputs
    (+-127 and runs of alternating signs), for 1 to 128 input rows (2 per screened row)."""
    if not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return False
    g = torch.Generator().manual_seed(0)
    steps = torch.arange(width)
    patterns = torch.stack([torch.full((width,), 127), torch.full((width,), -127), steps % 2 * 254 - 127,
                            steps // 2 % 2 * 254 - 127, torch.full((width,), 64), torch.full((width,), -64)])
    weight = torch.cat([patterns, torch.randint(-127, 128, (58, width), generator=g)]).to(torch.int8)  # (64, C)
    scales, zeros = torch.ones(64), torch.zeros(64, dtype=torch.int64)
    try:
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
        for rows in (1, 2, 3, 8, 16, 64, 128):
            x = weight[torch.arange(rows) % 64]
            out = int8_linear(x, packed, scales, zeros)
            if not torch.equal(out, (x.double() @ weight.double().T).float()):  # exact sums, rounded once
                return False
    except (RuntimeError, NotImplementedError):
        return False
    return True


class GreedyScreen:
    def __init__(self, weight: torch.Tensor, blocks: int = CANDIDATE_BLOCKS, kernel: str | None = None):
        """weight: the fp32 head (V, C), finite; see `build`. kernel: "onednn" or "int8pack" (the module's
        docstring); None takes oneDNN's where it runs exactly."""
        w = weight.detach()
        vocab, width = w.shape
        self.weight, self.vocab = w, vocab
        n_blocks = -(-vocab // BLOCK)
        self.blocks = min(blocks, n_blocks - 1)
        pad = n_blocks * BLOCK - vocab  # padding rows (q = 0) fill the last block
        q = torch.zeros(vocab + pad, width, dtype=torch.int8)  # (V', C)
        scale = torch.full((vocab + pad,), MIN_SCALE)
        for start in range(0, vocab, 4096):  # in slices: no full-size fp32 temporaries
            part = slice(start, min(start + 4096, vocab))
            peak = (w[part].abs().amax(dim=1) / 127 * (1 + 2.0**-20)).clamp_(min=MIN_SCALE)
            scale[part] = round_up_to_bf16(peak).float()
            q[part] = torch.round(w[part] / scale[part, None]).clamp_(-127, 127)
        # Folded into the scales the bound multiplies: the final 1/64 margin of `bound`.
        self.row_scale = scale * (1 + 2.0**-6)  # (V',)
        self.block_scale = self.row_scale.view(n_blocks, BLOCK).amax(-1)  # (V'/BLOCK,)
        # Each block's row ids; padding rows read the last real row again, after it: argmax keeps the real one.
        self.block_ids = torch.arange(n_blocks * BLOCK).clamp_(max=vocab - 1).view(n_blocks, BLOCK)
        self.weight_term = 0.5 + 2.0**-16 + 127 * (2 * width + 4) * 2.0**-24
        # What two fp32 evaluations of one row's logit may differ by, per unit of ||h||_1: the check keeps it
        # below the best exact logit, so that no fp32 kernel can put a row outside the K blocks above that row.
        self.tie_term = 2 * (width + 1) * 2.0**-24 * 127 * float(self.row_scale.max())
        self.underflow = torch.tensor(2.0**-20)  # the bound's absolute term, per unit of scale
        self.kernel = kernel or ("onednn" if onednn_int8(width) else "int8pack")
        if self.kernel == "onednn":
            self.q = torch.ops.onednn.qlinear_prepack(q, None)  # oneDNN's own layout
            self.scale, self.zeros = scale, torch.zeros(vocab + pad, dtype=torch.int64)
            self.relative = 2.0**-16
        else:
            self.q, self.scale = q, scale.bfloat16()  # exact: every scale is a bf16 number
            self.relative = 2.0**-7

    @classmethod
    def build(cls, weight: torch.Tensor, blocks: int = CANDIDATE_BLOCKS, kernel: str | None = None
              ) -> "GreedyScreen | None":
        """The screen of an fp32 CPU head whose width is a multiple of 16 (the int8pack kernel's vector
        loads), or None for any other head, or one with a non-finite weight."""
        if not (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.shape[1] % 16 == 0
                and weight.shape[0] > BLOCK):
            return None
        screen = cls(weight, blocks, kernel)
        # A row's scale is infinite or NaN exactly when the row holds an infinite or NaN weight.
        return screen if bool(torch.isfinite(screen.row_scale).all()) else None

    def bound(self, approx: torch.Tensor, row_scale: torch.Tensor, per_scale: torch.Tensor) -> torch.Tensor:
        """b >= |approx - logit|, growing with |approx| and with the scale (so block maxima bound
        blocks); approx and per_scale from `approximate`."""
        return torch.add(per_scale * row_scale, approx.abs(), alpha=self.relative * (1 + 2.0**-6))

    def approximate(self, h: torch.Tensor, norm: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h (B, C) fp32 -> approximate logits (B, V') in units u, padding rows included; what the bound
        multiplies each row's scale by (B, 1), in the same units; u (B, 1), powers of two (1 for int8pack).
        norm: ||h||_1 (B, 1), where the caller has it."""
        if norm is None:
            norm = torch.linalg.vector_norm(h, 1, -1, keepdim=True)
        if self.kernel == "int8pack":
            h16 = h.bfloat16()
            lost = (h - h16).abs().sum(-1, keepdim=True)
            per_scale = self.weight_term * norm + (127 * lost + self.underflow)
            approx = torch.ops.aten._weight_int8pack_mm(h16, self.q, self.scale).float()
            return approx, per_scale, self.unit(h)
        unit = self.unit(h)
        g = h / unit  # exact; |g| <= 127 up to the rounding of max |h| / 127, far below what round() carries up
        high = g.round()
        remainder = (g - high) * 128  # exact
        low = remainder.round()  # in [-64, 64]
        lost = torch.linalg.vector_norm(remainder - low, 1, -1, keepdim=True)  # 128 ||lost||_1, exact terms
        per_scale = torch.addcdiv(torch.add(self.underflow, lost, alpha=127 / 128), norm, unit, value=self.weight_term)
        # the custom op costs ~13 us more a call in eager steps
        linear = onednn_int8_linear if torch.compiler.is_compiling() else int8_linear
        levels = linear(torch.cat([high, low]).to(torch.int8), self.q, self.scale, self.zeros)  # (2B, V')
        b = h.shape[0]
        return levels[:b].add_(levels[b:], alpha=1 / 128), per_scale, unit  # in place: no new (B, V') buffer

    def unit(self, h: torch.Tensor) -> torch.Tensor:
        """u (B, 1) of `approximate` for h (B, C) fp32: a power of two >= max |h| / 127 (1 for int8pack)."""
        if self.kernel == "int8pack":
            return h.new_ones(h.shape[0], 1)
        return power_of_two_at_least(torch.linalg.vector_norm(h, torch.inf, -1, keepdim=True) * (1 / 127))

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden (B, C) -> greedy token ids (B,), ok (B,) bool, and for `widen`, the blocks' upper ends in units
        u (B, V'/BLOCK) and the best exact logit found (B,); where ok is False, the token is `widen`'s."""
        b = hidden.shape[0]
        h = hidden.float()
        norm = torch.linalg.vector_norm(h, 1, -1, keepdim=True)  # (B, 1)
        approx, per_scale, unit = self.approximate(h, norm)
        # Upper end of each block: a + bound(a) grows with a, so the block's largest a gives it.
        peak = approx.view(b, -1, BLOCK).amax(-1)  # (B, V'/BLOCK)
        ends = peak + self.bound(peak, self.block_scale, per_scale)  # (B, V'/BLOCK)
        top = ends.topk(self.blocks + 1, dim=-1)  # NaN first
        blocks = top.indices[:, :-1].sort(dim=-1).values  # (B, K), ascending: ties go to the lowest id
        ids = self.block_ids.index_select(0, blocks.flatten()).view(b, -1)  # (B, K BLOCK)
        gathered = self.weight.index_select(0, ids.flatten()).view(b, -1, h.shape[-1])  # (B, K BLOCK, C)
        exact = (gathered @ h[:, :, None])[..., 0]  # (B, K BLOCK) fp32 logits
        best, where = exact.max(-1)  # the first of equal maxima, as torch.argmax
        # Rows outside the K blocks lie below the (K+1)-th block's upper end. A NaN or infinite upper end ranks
        # first and fails the check, as does a best logit beyond the fp32 range (the full head's argmax would
        # be its first infinite row, wherever it lies).
        upper = torch.add(top.values[:, -1] * unit[:, 0], norm[:, 0], alpha=self.tie_term)
        ok = (upper < best) & (torch.maximum(top.values[:, 0], best) < torch.inf)  # maximum keeps NaN
        return ids.gather(-1, where[:, None])[:, 0], ok, ends, best

    def widen(self, hidden: torch.Tensor, ends: torch.Tensor, best: torch.Tensor) -> int | None:
        """The greedy token of a row whose check failed: hidden (1, C), and its ends (V'/BLOCK,) and best () from
        the call. Any fp32 evaluation of a row's logit lies within tie/2 (tie: the check's margin) of its true
        value, which is at most its block's upper end E; best is one evaluation of a row r. The blocks with E >=
        best - 2 tie hold r, and any other row evaluates to at most E + tie/2 < best - 3/2 tie <= (any evaluation of
        r) - tie/2: the largest fp32 logit of those blocks decides, ties going to the lowest id. None (take the full
        logits) where those blocks hold more than a quarter of the vocabulary, or anything is not finite."""
        h = hidden.float()
        norm = torch.linalg.vector_norm(h, 1)
        reach = best - 2 * self.tie_term * norm
        ends = ends * self.unit(h)[0]
        if not bool(torch.isfinite(ends).all() & torch.isfinite(reach)):
            return None
        blocks = (ends >= reach).nonzero()[:, 0]  # ascending
        if blocks.numel() * BLOCK > self.vocab // 4:
            return None
        ids = self.block_ids.index_select(0, blocks).flatten()
        return int(ids[(self.weight.index_select(0, ids) @ h[0]).argmax()])  # the first of equal maxima
