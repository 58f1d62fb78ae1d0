"""The int8 greedy screen, with each of its kernels: its error bound holds, and its tokens are the fp32 argmax or it
falls back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from internvl_mpo.generate import greedy_head
from internvl_mpo.generate.greedy_head import BLOCK, GreedyScreen, onednn_int8, power_of_two_at_least, round_up_to_bf16

# oneDNN's int8 linear: in torch's x86 builds, where CI runs; elsewhere the screen takes int8pack
KERNELS = ["int8pack", pytest.param("onednn", marks=pytest.mark.skipif(not onednn_int8(64),
                                                                         reason="no exact oneDNN int8 linear here"))]


def random_head(vocab: int, width: int, seed: int) -> torch.Tensor:
    """Rows of very different sizes (scales from 1e-3 to 10), as a trained head has."""
    g = torch.Generator().manual_seed(seed)
    sizes = 10 ** (torch.rand(vocab, 1, generator=g) * 4 - 3)
    return torch.randn(vocab, width, generator=g) * sizes


def check(screen: GreedyScreen, weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Assert that every row the screen accepts got the fp32 argmax, and that `widen` gives it or None for the
    others; return the ok flags."""
    tokens, ok, ends, best = screen(hidden)
    expected = F.linear(hidden, weight).argmax(-1)
    assert tokens[ok].tolist() == expected[ok].tolist()
    for i in (~ok).nonzero()[:, 0].tolist():
        assert screen.widen(hidden[i : i + 1], ends[i], best[i]) in (None, expected[i].item())
    return ok


def test_round_up_to_bf16():
    x = torch.tensor([0.0, 1.0, 1.0 + 2**-10, 3e-39, 2.5e36, 1e-30])
    up = round_up_to_bf16(x)
    assert up.dtype == torch.bfloat16
    assert (up.float() >= x).all()
    assert (up.float() == x.bfloat16().float()).tolist()[:2] == [True, True]  # bf16 values stay put
    assert up.float()[2] == 1.0 + 2**-7  # the next bf16 number up


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("width", [16, 64, 128])
def test_bound_holds(width, kernel):
    """|approx - logit| <= bound against fp64 logits, hidden states far from bf16 numbers included."""
    weight = random_head(3000, width, seed=width)
    screen = GreedyScreen(weight, kernel=kernel)
    g = torch.Generator().manual_seed(1)
    hidden = torch.cat([torch.randn(4, width, generator=g) * 10 ** torch.linspace(-3, 3, 4)[:, None],
                        1 + torch.rand(2, width, generator=g) * 2**-8,  # just between bf16 steps
                        torch.randn(1, width, generator=g) * 1e-33])  # below the oneDNN path's smallest unit
    approx, per_scale, unit = screen.approximate(hidden)
    approx = approx[:, : screen.vocab]
    bound = screen.bound(approx, screen.row_scale[: screen.vocab], per_scale)
    exact = hidden.double() @ weight.double().T
    assert ((approx.double() * unit - exact).abs() <= bound * unit).all()


def test_bound_holds_for_worst_case_rows():
    """Rows built so that the roundings add up: each weight just short of half a step from its int8
    value, with the sign of h; each h just short of half a bf16 step from h'; int8 values near 127.
    The two parts of the bound are checked apart, so that each of its terms is needed here."""
    width = 64
    g = torch.Generator().manual_seed(7)
    base = torch.randn(1, width, generator=g).bfloat16().float()  # bf16 numbers
    ulp = 2.0 ** (torch.floor(torch.log2(base.abs())) - 7)  # their bf16 step
    hidden = base + 0.49 * ulp * base.sign()  # rounds back to `base`
    s = 2.0**-7  # a bf16 number; every row gets it as its scale (peak just under 127 s)
    q = (120 + torch.randint(0, 7, (400, width), generator=g)).float()  # int8 values 120..126
    weight = s * (q + 0.5 * (1 - 2.0**-10)) * hidden.sign()  # rounding error s/2, with the sign of h
    weight[:, 0] = 127 * s / (1 + 2.0**-19) * hidden.sign()[0, 0]
    screen = GreedyScreen(weight, kernel="int8pack")
    assert (screen.scale[:400].float() == s).all()
    h16 = hidden.bfloat16()
    approx, per_scale, unit = screen.approximate(hidden)
    approx = approx[:, :400]
    assert unit.item() == 1
    exact = hidden.double() @ weight.double().T
    unrounded = h16.double() @ (screen.q[:400].double() * s).T  # the kernel's sum before it rounds
    assert ((unrounded - exact).abs() <= per_scale * screen.row_scale[:400]).all()  # weights and inputs
    rounding = screen.bound(approx, torch.zeros(400), per_scale)  # the output's rounding to bf16
    assert ((approx - unrounded).abs() <= rounding).all()
    assert ((approx - exact).abs() <= screen.bound(approx, screen.row_scale[:400], per_scale)).all()


@pytest.mark.parametrize("kernel", KERNELS[1:])
def test_onednn_bound_holds_for_worst_case_rows(kernel):
    """The oneDNN path's roundings added up: h between integers, so that its two int8 levels leave nearly 1/256
    out, with the sign of h, and weights just short of half a step from their int8 values, also with h's sign.
    Without the input term of the bound the weights' alone would not cover the error."""
    width = 64
    g = torch.Generator().manual_seed(8)
    sign = torch.where(torch.rand(1, width, generator=g) < 0.5, -1.0, 1.0)
    hidden = sign * (torch.randint(60, 126, (1, width), generator=g) + 0.5 + 0.99 / 256)
    hidden[0, 0] = 126.5 + 0.99 / 256  # the largest |h| sets the unit to 1
    s = 2.0**-7
    q = (120 + torch.randint(0, 7, (400, width), generator=g)).float()
    weight = s * (q + 0.5 * (1 - 2.0**-10)) * sign
    screen = GreedyScreen(weight, kernel=kernel)
    approx, per_scale, unit = screen.approximate(hidden)
    assert unit.item() == 1
    high = hidden.round()
    low = ((hidden - high) * 128).round()
    assert ((hidden - high - low / 128).abs() > 0.98 / 256).all()  # as far from the two levels as it gets
    exact = hidden.double() @ weight.double().T
    unrounded = (high.double() + low.double() / 128) @ (q * sign * s).double().T  # the kernel's sums, scaled
    assert ((unrounded - exact).abs() <= per_scale * screen.row_scale[:400]).all()
    assert ((unrounded - exact).abs() > screen.weight_term * hidden.abs().sum() * s).all()  # the input term counts
    bound = screen.bound(approx[:, :400], screen.row_scale[:400], per_scale)
    assert ((approx[:, :400].double() - exact).abs() <= bound).all()


def test_power_of_two_at_least():
    x = torch.tensor([0.0, 1e-40, 1.0, 1.5, 3.0, 1e30, 2.0**-100, 2.0**-99 * 1.5])
    assert power_of_two_at_least(x).tolist() == [2.0**-100, 2.0**-100, 1.0, 2.0, 4.0, 2.0**100, 2.0**-100, 2.0**-98]


def test_a_kernel_that_saturates_is_refused(monkeypatch):
    """x86 int8 products without VNNI add pairs of products into 16 bits, which saturate at the extreme inputs:
    the probe must find that and leave the screen to int8pack."""
    real = torch.ops.onednn.qlinear_pointwise if onednn_int8(64) else None
    if real is None:
        pytest.skip("no oneDNN int8 linear here")

    def saturating(x, *args):
        out = real(x, *args)
        return torch.where(out.abs() > 1_000_000, out.sign() * 1_000_000, out)  # clipped, as saturated sums are

    monkeypatch.setattr(torch.ops.onednn, "qlinear_pointwise", saturating)
    assert not onednn_int8.__wrapped__(64)
    monkeypatch.setattr(greedy_head, "onednn_int8", onednn_int8.__wrapped__)
    assert GreedyScreen(torch.randn(500, 64)).kernel == "int8pack"
    monkeypatch.undo()
    assert onednn_int8.__wrapped__(64)
    assert GreedyScreen(torch.randn(500, 64)).kernel == "onednn"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("vocab,width", [(1000, 16), (5003, 64), (2000, 128)])
def test_tokens_equal_the_fp32_argmax_on_random_heads(vocab, width, kernel):
    weight = random_head(vocab, width, seed=vocab)
    screen = GreedyScreen.build(weight, kernel=kernel)
    accepted = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(1 + seed % 5, width, generator=g) * 10 ** (seed % 7 - 3)
        accepted += int(check(screen, weight, hidden).sum())
    assert accepted >= 0.9 * sum(1 + seed % 5 for seed in range(20))  # the screen rarely needs the fallback


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("same_block", [True, False])
def test_near_ties_get_the_fp32_argmax_or_fall_back(same_block, kernel):
    """Two leading rows closer than the bound: the exact logits must decide, ties to the lowest id."""
    width = 64
    weight = random_head(4000, width, seed=3) * 0.01
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, width, generator=g)
    a, b = (700, 701) if same_block else (700, 700 + 5 * BLOCK)
    seen_ok = 0
    for gap in [0.0, 1e-5, -1e-5, 1e-4, -1e-4, 1e-3, -1e-3, 1e-2, -1e-2]:
        w = weight.clone()
        w[a] = hidden[0] / hidden.norm()  # logit ||h||: far above every other row
        w[b] = w[a] * (1 + gap)
        screen = GreedyScreen.build(w, kernel=kernel)
        tokens, ok, ends, best = screen(hidden)
        expected = F.linear(hidden, w).argmax(-1)
        assert expected.item() in (a, b)
        if gap == 0.0:
            assert expected.item() == a  # equal rows: torch.argmax keeps the first
        if ok.item():
            seen_ok += 1
            assert tokens.item() == expected.item(), gap
        else:  # only the blocks of a and b come within reach
            assert screen.widen(hidden, ends[0], best[0]) == expected.item(), gap
    assert seen_ok >= 5  # the close calls are decided by the exact logits, not all left to the fallback


@pytest.mark.parametrize("kernel", KERNELS)
def test_widen_settles_ties_across_more_blocks_than_the_check_gathers(kernel):
    """Equal leading rows in 20 blocks (the check gathers 16): every check fails, and `widen` gives the lowest
    of them, as torch.argmax; with the ties in over a quarter of the vocabulary it leaves them to the full head."""
    width = 64
    weight = random_head(8192, width, seed=8) * 1e-3
    g = torch.Generator().manual_seed(9)
    lead = torch.randn(width, generator=g)
    weight[10 * BLOCK + 5 : 30 * BLOCK + 5] = lead  # rows 5..69 of block 10, ..., the first 5 of block 30
    weight[40 * BLOCK : 60 * BLOCK] = -lead
    hidden = torch.randn(6, width, generator=g)
    for kept in (weight, weight[: 90 * BLOCK]):  # 1280 tied rows: 1/6 of the vocabulary, then 2/9
        screen = GreedyScreen.build(kept, kernel=kernel)
        tokens, ok, ends, best = screen(hidden)
        expected = F.linear(hidden, kept).argmax(-1)
        assert set(expected.tolist()) == {10 * BLOCK + 5, 40 * BLOCK} and not ok.any()
        assert [screen.widen(hidden[i : i + 1], ends[i], best[i]) for i in range(6)] == expected.tolist()
    screen = GreedyScreen.build(weight[: 70 * BLOCK], kernel=kernel)  # 2/7: more than a quarter
    tokens, ok, ends, best = screen(hidden)
    assert [screen.widen(hidden[i : i + 1], ends[i], best[i]) for i in range(6)] == [None] * 6


@pytest.mark.parametrize("kernel", KERNELS)
def test_huge_small_and_zero_rows(kernel):
    width = 32
    weight = random_head(2000, width, seed=5)
    weight[:100] = 0.0  # zero rows
    weight[100:200] *= 1e-30
    weight[200:300] = torch.randn(100, width) * 1e-41  # subnormal weights
    weight[300:310] *= 1e30
    screen = GreedyScreen.build(weight, kernel=kernel)
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(3, width, generator=g)
        check(screen, weight, hidden)
        check(screen, weight, -hidden)
    small = weight.clone()
    small[300:310] = 0.0
    small[310:] = 0.0  # only zero, tiny and subnormal rows left
    check(GreedyScreen.build(small, kernel=kernel), small, torch.randn(3, width))


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_head_of_equal_rows_always_fails_the_check(kernel):
    """Also where the logits are negative: the padding rows of the last block (500 is not a multiple of
    64) have approximate logits 0, and must not let the check pass."""
    weight = torch.randn(1, 64).expand(500, 64).contiguous()
    hidden = torch.randn(3, 64)
    screen = GreedyScreen.build(weight, kernel=kernel)
    for h in (hidden, -hidden):
        tokens, ok, ends, best = screen(h)
        assert not ok.any()
        assert [screen.widen(h[i : i + 1], ends[i], best[i]) for i in range(3)] == [None] * 3  # all 500 in reach


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_finite_or_overflowing_hidden_states_fail_the_check(kernel):
    weight = random_head(1000, 64, seed=6)
    screen = GreedyScreen.build(weight, kernel=kernel)
    hidden = torch.randn(5, 64)
    hidden[0, 3] = float("nan")
    hidden[1, 5] = float("inf")
    hidden[2, 7] = -float("inf")
    hidden[3] *= 1e37  # finite, but the logits overflow
    _, ok, ends, best = screen(hidden)
    assert ok.tolist() == [False, False, False, False, True]
    assert [screen.widen(hidden[i : i + 1], ends[i], best[i]) for i in range(4)] == [None] * 4


def test_build_refuses_heads_it_cannot_screen():
    assert GreedyScreen.build(torch.randn(500, 60)) is None  # width not a multiple of 16
    assert GreedyScreen.build(torch.randn(500, 64, dtype=torch.bfloat16)) is None
    bad = torch.randn(500, 64)
    bad[7, 7] = float("nan")
    assert GreedyScreen.build(bad) is None
    bad[7, 7] = float("inf")
    assert GreedyScreen.build(bad) is None
    assert GreedyScreen.build(torch.randn(500, 64)) is not None
