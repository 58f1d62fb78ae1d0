"""Which few-row CPU forms of a matrix product pay on this CPU, timed once per weight shape.

A decode step multiplies a few rows (its batch) by each large fp32 (or bf16) weight. `llm.few_rows_matmul`
offers two forms beside F.linear's MKL kernel: a bmm over row blocks for one row (`blocked_matvec`) and a bmm
of the rows against each block of the weight's rows for more (`row_blocks_matmul`). Which is fastest
depends on the CPU, not only on the shapes. On the 2-core AMD EPYC VM the forms were written on
(2026-12-03) the one-row form streamed the small config's weights at about twice MKL's rate; on a 2-core
Xeon with AMX (2026-12-06) it ran at half MKL's rate (1.66 against 0.89 ms for a 4864 x 896 weight read
from memory), while MKL's 4-row product ran at half its one-row rate and the row blocks near it (0.8-1.0
against 1.2-1.4 ms for that weight). The form the row blocks replaced, W @ x.T, was the faster one for
2-4 rows on the EPYC VM and no faster than MKL on the Xeon; the row blocks were not timed on the EPYC VM.
Against bf16 weights the forms are `matvec` for one row (torch.mv: 1.2-1.5 times F.linear's rate on that Xeon)
and `transposed_matmul` for more (W @ x.T: 1.1-1.5 times).

So the engine times them, the first time it meets a weight shape in a process: each form against
F.linear over the model's weights of that shape (up to BUDGET_BYTES of them, the way a decode step
reads them: one after another), ROUNDS times taking turns, and keeps a form only where its best pass
beats F.linear's best by MARGIN. The forms give the same values as F.linear up to rounding.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ..llm import Linear, blocked_matvec, few_row_weight, matvec, row_blocks_matmul, thread_count, transposed_matmul

BUDGET_BYTES = 256 << 20  # the weights of one shape streamed in a timed pass
ROUNDS = 3
MARGIN = 0.95  # a form must take under 95% of F.linear's time: near a tie, F.linear (transformers' kernel) stays
MORE_ROWS = 4  # the rows the row-block form is timed with (it serves 2 to FEW_ROWS_MAX rows)

_choices: dict[tuple, tuple[bool, bool]] = {}  # (out, in, dtype, bias, threads) -> (one_row, more_rows)


def _pass_seconds(form, x: torch.Tensor, pairs: list) -> float:
    start = time.perf_counter()
    for weight, bias in pairs:
        form(x, weight, bias)
    return time.perf_counter() - start


def time_forms(pairs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[bool, bool]:
    """(one_row, more_rows): whether `blocked_matvec` (one row; `matvec` for bf16) and `row_blocks_matmul`
    (MORE_ROWS rows; `transposed_matmul` for bf16) beat F.linear over `pairs` of fp32 (or bf16) CPU weights of one
    shape and their biases (False where a form does not apply to the shape or dtype)."""
    width, dtype = pairs[0][0].shape[1], pairs[0][0].dtype
    one, more = torch.randn(1, width, dtype=dtype), torch.randn(MORE_ROWS, width, dtype=dtype)
    forms = {"linear 1": (F.linear, one), "linear more": (F.linear, more)}
    one_row, more_rows = (blocked_matvec, row_blocks_matmul) if dtype == torch.float32 else (matvec, transposed_matmul)
    if one_row(one, pairs[0][0]) is not None:  # it applies (threads, row count, dtype)
        forms["blocked"] = (one_row, one)
    if more_rows(more, pairs[0][0]) is not None:  # it applies (a block size divides the rows, dtype)
        forms["row blocks"] = (more_rows, more)
    best = dict.fromkeys(forms, float("inf"))
    with torch.no_grad():
        _pass_seconds(F.linear, one, pairs)  # first touch: mapped weights fault their pages in here
        for _ in range(ROUNDS):
            for name, (form, x) in forms.items():
                best[name] = min(best[name], _pass_seconds(form, x, pairs))
    return (best.get("blocked", float("inf")) < MARGIN * best["linear 1"],
            best.get("row blocks", float("inf")) < MARGIN * best["linear more"])


def choose(weight: torch.Tensor, bias: torch.Tensor | None, same_shape: list) -> tuple[bool, bool]:
    """The forms for `weight`'s shape on this CPU (and thread count), timed on the first call for the
    shape over `same_shape` ((weight, bias) pairs, cut to BUDGET_BYTES), remembered after."""
    key = (*weight.shape, weight.dtype, bias is not None, thread_count())
    if key not in _choices:
        keep = max(1, BUDGET_BYTES // weight.nbytes)
        _choices[key] = time_forms(same_shape[:keep])
    return _choices[key]


def tune(language_model: nn.Module, timed: bool = True) -> tuple[bool, bool]:
    """Set each large fp32 or bf16 CPU `llm.Linear` of `language_model` to the forms that pay on this CPU (both
    forms where `timed` is False), and return those of its output head (one_row, more_rows) for
    `engine.head_logits`. The setting lives on the modules: the last engine built over them decides."""
    head = language_model.output_head()
    groups: dict[tuple, list] = {}
    for module in [m for m in language_model.modules() if isinstance(m, Linear)] + [head]:
        if few_row_weight(module.weight):
            groups.setdefault((*module.weight.shape, module.weight.dtype, module.bias is not None), []).append(module)
    head_forms = (True, True)
    for modules in groups.values():
        pairs = [(m.weight, m.bias) for m in modules]
        forms = choose(*pairs[0], pairs) if timed else (True, True)
        for m in modules:
            if m is head:
                head_forms = forms
            else:
                m.one_row, m.more_rows = forms
    return head_forms
