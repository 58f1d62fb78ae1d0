"""The engine keeps a few-row CPU form only where it times faster than F.linear on this CPU."""

import time

import pytest
import torch
from torch.testing import assert_close

from internvl_mpo.generate import cpu_forms
from internvl_mpo.generate.engine import Engine
from internvl_mpo.llm import Linear, few_rows_matmul
from internvl_mpo.model import InternVL

from conftest import tiny_config


def slow(form, seconds=0.05):  # far past F.linear even on a loaded machine (3 ms was not)
    def run(*args):
        time.sleep(seconds)
        return form(*args)
    return run


def instant(x, weight, bias=None):
    return x.new_zeros(x.shape[0], weight.shape[0])


def large_model() -> InternVL:
    """Decoder linears of 64 x 1024 and 1024 x 64 and a 1024 x 64 head: 64K entries each, the few-row size."""
    import dataclasses

    base = tiny_config()
    return InternVL(base.replace(llm=dataclasses.replace(base.llm, intermediate_size=1024, vocab_size=1024))).eval()


def forms_of(model) -> dict:
    return {name: (m.one_row, m.more_rows) for name, m in model.language_model.named_modules() if isinstance(m, Linear)}


@pytest.mark.parametrize("dtype, one_row, more_rows", [(torch.float32, "blocked_matvec", "row_blocks_matmul"),
                                                       (torch.bfloat16, "matvec", "transposed_matmul")])
def test_a_form_slower_than_f_linear_is_turned_off_and_a_faster_one_kept(monkeypatch, dtype, one_row, more_rows):
    """Each dtype's forms (bf16 took none: both fp32 forms are slower there, while torch.mv and W @ x.T streamed its
    weights at 1.1-1.5 times F.linear's rate on the Xeon, with the same values)."""
    weights = [(torch.randn(1024, 256, dtype=dtype), torch.randn(1024, dtype=dtype)) for _ in range(3)]
    monkeypatch.setattr(cpu_forms, one_row, slow(getattr(cpu_forms, one_row)))
    monkeypatch.setattr(cpu_forms, more_rows, instant)
    assert cpu_forms.time_forms(weights) == (False, True)
    monkeypatch.setattr(cpu_forms, one_row, instant)
    monkeypatch.setattr(cpu_forms, more_rows, slow(instant))
    assert cpu_forms.time_forms(weights) == (True, False)


def test_a_shape_without_row_blocks_keeps_f_linear_for_more_rows(monkeypatch):
    """257 rows (a prime) have no row block: F.linear serves 2-16 rows there, untimed against that form."""
    monkeypatch.setattr(cpu_forms, "blocked_matvec", instant)
    assert cpu_forms.time_forms([(torch.randn(257, 256), None)]) == (True, False)


def test_one_thread_has_no_blocked_form(monkeypatch):
    monkeypatch.setattr(cpu_forms, "row_blocks_matmul", instant)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cpu_forms.time_forms([(torch.randn(1024, 256), torch.randn(1024))]) == (False, True)
    finally:
        torch.set_num_threads(threads)


def test_engine_sets_each_large_linear_and_the_head_and_times_a_shape_once(monkeypatch):
    """Only fp32 CPU weights of 64K entries or more are timed, one call per (shape, bias, threads),
    over at most BUDGET_BYTES of that shape's weights; the result lands on every module of the shape."""
    monkeypatch.setattr(cpu_forms, "_choices", {})
    monkeypatch.setattr(cpu_forms, "BUDGET_BYTES", 2 * 1024 * 64 * 4)  # two weights of 64K entries
    calls = []
    answers = {(1024, 64): (True, False), (64, 1024): (False, True)}

    def fake(pairs):
        calls.append((tuple(pairs[0][0].shape), len(pairs)))
        return answers[tuple(pairs[0][0].shape)]

    monkeypatch.setattr(cpu_forms, "time_forms", fake)
    model = large_model()
    engine = Engine(model)
    # gate and up (1024 x 64, two per layer, and the head alone: bias-free, same shape) and down (64 x 1024)
    assert sorted(calls) == [((64, 1024), 2), ((1024, 64), 2)]
    assert engine.head_forms == (True, False)
    forms = forms_of(model)
    for name, got in forms.items():
        if name.endswith(("gate_proj", "up_proj")):
            assert got == (True, False), name
        elif name.endswith("down_proj"):
            assert got == (False, True), name
        else:  # q/k/v/o: 64 x 64, under the few-row size
            assert got == (False, False), name
    Engine(model)
    assert len(calls) == 2  # remembered for the process
    Engine(model, time_cpu_forms=False)
    assert set(forms_of(model).values()) == {(True, True), (False, False)}
    assert all(forms_of(model)[n] == (True, True) for n in forms if n.endswith(("gate_proj", "up_proj", "down_proj")))


def test_bf16_weights_are_timed_apart_from_fp32_ones_of_the_same_shape(monkeypatch):
    """bf16 weights' forms (`matvec`, `transposed_matmul`) are timed as the fp32 forms are, kept apart from those of
    fp32 weights of the same shape, and give F.linear's values for 1-16 rows."""
    monkeypatch.setattr(cpu_forms, "_choices", {})
    timed = []
    monkeypatch.setattr(cpu_forms, "time_forms", lambda pairs: timed.append(pairs[0][0].dtype) or (True, False))
    model = large_model()
    Engine(model)
    assert Engine(model.to(torch.bfloat16)).head_forms == (True, False) and set(timed) == {torch.float32, torch.bfloat16}
    layer = Linear(256, 1024).bfloat16()
    with torch.no_grad():
        for x in (torch.randn(1, 256), torch.randn(3, 256), torch.randn(2, 1, 256), torch.randn(16, 256)):
            x = x.bfloat16()
            out = few_rows_matmul(x, layer.weight, layer.bias, True, True)
            assert out.shape == (*x.shape[:-1], 1024)
            assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-2, atol=1e-2)
        assert few_rows_matmul(torch.randn(17, 256).bfloat16(), layer.weight, layer.bias, True, True) is None
        assert few_rows_matmul(torch.randn(1, 256).bfloat16(), layer.weight, layer.bias, False, True) is None
        assert few_rows_matmul(torch.randn(3, 256).bfloat16(), layer.weight, layer.bias, True, False) is None


def test_forms_turned_off_give_f_linear_exactly():
    torch.manual_seed(0)
    layer = Linear(256, 1024)
    layer.one_row, layer.more_rows = False, True
    with torch.no_grad():
        one, three = torch.randn(1, 256), torch.randn(3, 256)
        assert torch.equal(layer(one), torch.nn.functional.linear(one, layer.weight, layer.bias))
        assert_close(layer(three), torch.nn.functional.linear(three, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert few_rows_matmul(three, layer.weight, layer.bias, True, False) is None
        assert few_rows_matmul(one, layer.weight, layer.bias, False, True) is None
        layer.more_rows = False
        assert torch.equal(layer(three), torch.nn.functional.linear(three, layer.weight, layer.bias))


def test_another_thread_count_times_the_shape_again(monkeypatch):
    """The blocked form splits rows over the threads, so its worth is timed per thread count."""
    monkeypatch.setattr(cpu_forms, "_choices", {})
    counts = []
    monkeypatch.setattr(cpu_forms, "time_forms", lambda pairs: counts.append(torch.get_num_threads()) or (True, True))
    pairs = [(torch.randn(1024, 64), None)]
    threads = torch.get_num_threads()
    try:
        for n in (2, 2, 1, 2, 1):
            torch.set_num_threads(n)
            cpu_forms.choose(*pairs[0], pairs)
    finally:
        torch.set_num_threads(threads)
    assert counts == [2, 1]
