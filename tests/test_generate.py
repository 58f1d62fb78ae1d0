"""Generation: greedy tokens equal transformers', cache equals recomputation, sampling rules, chat API."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import random
import re
import shutil
import warnings
import weakref

import numpy
import pytest
import torch
from PIL import Image

from internvl_mpo.errors import InputError
from internvl_mpo.generate.engine import Engine, Request
from internvl_mpo.generate.greedy_head import BLOCK, onednn_int8
from internvl_mpo.generate.params import SamplingParams
from internvl_mpo.generate.sampling import (
    apply_repetition_penalty,
    choose_tokens,
    exponential_noise,
    filter_top_k_top_p,
    make_generator,
    race_among_top_k,
)
from internvl_mpo.kv_cache import make_caches
from internvl_mpo.pipeline import InternVLChat, TextAssembler

from conftest import (IMAGE_TOKEN_ID, ScriptedEngine, hf_reference, hf_to_official, tiny_config, tiny_chat_folder,
                      write_checkpoint)

STEPS = 64
GREEDY = SamplingParams(max_new_tokens=STEPS, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("gen") / "model")


@pytest.fixture(scope="module")
def setup(checkpoint):
    folder, ref = checkpoint
    chat = InternVLChat.from_pretrained(folder, dtype=torch.float32)
    return chat, ref


def run(engine: Engine, requests: list[Request]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {i: [] for i in range(len(requests))}
    for events in engine.generate(requests):
        for e in events:
            out[e.rid].append(e.token)
    return out


def hf_greedy(ref, ids, pixels=None, attention_mask=None, steps=STEPS) -> torch.Tensor:
    kw = {} if pixels is None else {"pixel_values": pixels}
    if attention_mask is None:  # given, or transformers masks the prompt's tokens equal to pad_token_id 0 ("!")
        attention_mask = torch.ones_like(ids)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=attention_mask, max_new_tokens=steps, do_sample=False,
                           eos_token_id=None, pad_token_id=0, **kw)
    return out[:, ids.shape[1]:]


def prompt(chat, question, images=None):
    p = chat.prepare(question, images)
    return p.prompt_ids, p.pixel_values


@pytest.mark.parametrize("case", ["text", "one image", "two images"])
def test_greedy_tokens_equal_transformers(setup, case):
    chat, ref = setup
    images = {"text": None, "one image": Image.new("RGB", (100, 50), "red"),
              "two images": [Image.new("RGB", (60, 60), "blue"), Image.new("RGB", (50, 120), "green")]}[case]
    ids, pixels = prompt(chat, "Describe it.", images)
    ours = run(chat.engine, [Request(ids, GREEDY, pixels)])[0]
    assert ours == hf_greedy(ref, torch.tensor([ids]), pixels)[0].tolist()


def test_left_padded_batch_of_three_equals_transformers(setup):
    chat, ref = setup
    cases = [("Hello there, how are you today?", None), ("What?", Image.new("RGB", (90, 40), "red")),
             ("Tell me more about it please", Image.new("RGB", (40, 40), "white"))]
    prompts = [prompt(chat, q, im) for q, im in cases]
    ours = run(chat.engine, [Request(ids, GREEDY, px) for ids, px in prompts])
    width = max(len(ids) for ids, _ in prompts)
    padded = torch.tensor([[0] * (width - len(ids)) + ids for ids, _ in prompts])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in prompts])
    pixels = torch.cat([px for _, px in prompts if px is not None])
    expected = hf_greedy(ref, padded, pixels, attention_mask=mask)
    for i in range(3):
        assert ours[i] == expected[i].tolist(), i


@pytest.fixture(scope="module")
def few_row_setup(tmp_path_factory):
    """A model whose decoder linears (256 x 4096) and head (8192 x 256) hold at least 1M weights, so
    that one to a few rows take the few-row CPU forms (llm.py: a blocked bmm for one row, a bmm over
    row blocks for 2-16 rows); and transformers' model with the same weights."""
    from internvl_mpo.model import InternVL

    base = tiny_config()
    config = base.replace(llm=dataclasses.replace(base.llm, hidden_size=256, intermediate_size=4096,
                                                  vocab_size=8192))
    ref = hf_reference(config, seed=3)
    folder = tmp_path_factory.mktemp("few_rows")
    write_checkpoint(folder, config, hf_to_official(ref.state_dict()))
    return InternVL.from_pretrained(folder, dtype=torch.float32, image_token_id=IMAGE_TOKEN_ID), ref


def test_greedy_tokens_equal_transformers_through_the_few_row_cpu_kernels(few_row_setup):
    """Greedy tokens through the few-row CPU forms equal transformers' for 64 steps at batch 1 and
    in a left-padded batch of 3."""
    model, ref = few_row_setup
    engine = Engine(model, time_cpu_forms=False)  # the forms on, whichever this CPU runs faster
    assert engine.greedy_screen() is None  # the full head, through few_rows_matmul
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(300, 8192, (n,), generator=g).tolist() for n in (9, 4, 13)]
    alone = run(engine, [Request(prompts[0], GREEDY)])[0]
    assert alone == hf_greedy(ref, torch.tensor([prompts[0]]))[0].tolist()
    together = run(engine, [Request(p, GREEDY) for p in prompts])
    width = max(map(len, prompts))
    padded = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    expected = hf_greedy(ref, padded, attention_mask=mask)
    for i in range(3):
        assert together[i] == expected[i].tolist(), i


def test_decode_step_through_the_few_row_cpu_kernels_compiles_with_symbolic_sizes(few_row_setup):
    """torch.compile with the engine's options (fullgraph, dynamic) traces the blocked matvec (the
    thread count is a constant to it) and gives eager's tokens."""
    from internvl_mpo.generate.engine import COMPILE_OPTIONS

    model, _ = few_row_setup
    eager, compiled = Engine(model, time_cpu_forms=False), Engine(model, compile=True, time_cpu_forms=False)
    # the engine's own compile (which marks the thread count), traced with the quick eager backend
    compiled._decode_fn = torch.compile(compiled._decode, backend="eager", **COMPILE_OPTIONS)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    requests = [Request([300 + i, 301, 302 + 7 * i], params) for i in range(2)]
    assert run(compiled, requests[:1]) == run(eager, requests[:1])
    assert run(compiled, requests) == run(eager, requests)


def test_cached_decoding_equals_uncached_recomputation(setup):
    chat, _ = setup
    ids, pixels = prompt(chat, "Describe it.", Image.new("RGB", (70, 70), "red"))
    cached = run(chat.engine, [Request(ids, SamplingParams(max_new_tokens=24, ignore_eos=True), pixels)])[0]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(24):
            logits = chat.model(torch.tensor([seq]), pixel_values=pixels)
            seq.append(int(logits[0, -1].argmax()))
    assert cached == seq[len(ids):]


def test_request_joining_a_running_batch_gets_the_same_tokens(setup):
    chat, _ = setup
    a, pa = prompt(chat, "First question here.", Image.new("RGB", (70, 30), "red"))
    b, _ = prompt(chat, "Second one")
    alone = {0: run(chat.engine, [Request(a, GREEDY, pa)])[0], 1: run(chat.engine, [Request(b, GREEDY)])[0]}
    gen = chat.engine.start(max_batch=2, max_len=256)
    got = {0: [], 1: []}
    gen.add(Request(a, GREEDY, pa))
    steps = 0
    while gen:
        for e in gen.step():
            got[e.rid].append(e.token)
        steps += 1
        if steps == 5:
            assert gen.add(Request(b, GREEDY)) == 1  # joins between decode steps
    assert got == alone


@pytest.mark.parametrize("images", [None, Image.new("RGB", (100, 50), "red")])
def test_prompt_logprobs_are_transformers_log_softmax_over_the_prompt(setup, monkeypatch, images):
    """Request.prompt_logprobs: each prompt token's log-probability given the tokens before it (none for the
    first), its rank and the top k, equal to the log_softmax of transformers' logits over the prompt, computed
    a few positions at a time; a twin of the same prompt admitted in the same step gets the same, the
    answer is unchanged, and a request that does not ask gets none."""
    from internvl_mpo.generate import engine as engine_module

    chat, ref = setup
    ids, pixels = prompt(chat, "Describe this in a few words, please.", images)
    vocab = chat.config.llm.vocab_size
    monkeypatch.setattr(engine_module, "PROMPT_CHUNK_ELEMENTS", 4 * vocab)  # chunks of 4 positions, the last short
    assert (len(ids) - 1) % 4
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    requests = [Request(ids, params, pixels, prompt_logprobs=3), Request(ids, params, pixels, prompt_logprobs=3),
                Request(ids, params, pixels)]
    events = [e for step in chat.engine.generate(requests) for e in step]
    first = {e.rid: e for e in reversed(events)}  # each request's first event
    kw = {} if pixels is None else {"pixel_values": pixels}
    with torch.no_grad():
        logp = torch.log_softmax(ref(input_ids=torch.tensor([ids]), **kw).logits[0].float(), dim=-1)
    got = first[0].prompt_logprobs
    assert len(got) == len(ids) and got[0] is None
    for t in range(1, len(ids)):
        value, rank, top = got[t]
        expected = logp[t - 1, ids[t]]
        assert value == pytest.approx(expected.item(), abs=1e-4)
        assert rank == int((logp[t - 1] >= expected - 1e-5).sum()) == int((logp[t - 1] >= expected + 1e-5).sum()) + 1
        best = logp[t - 1].topk(3)
        assert [i for i, _ in top] == best.indices.tolist()
        assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert first[1].prompt_logprobs == got and first[2].prompt_logprobs is None
    assert [e.prompt_logprobs for e in events if e is not first[e.rid]] == [None] * 6
    assert [e.token for e in events if e.rid == 0] == run(chat.engine, [Request(ids, params, pixels)])[0]
    with pytest.raises(InputError, match="prompt_logprobs must be a whole number in 0..20, got 21"):
        chat.engine.generate([Request(ids, params, prompt_logprobs=21)])


def test_a_failing_prefill_fails_its_request_alone(setup, monkeypatch):
    """Of three requests admitted in one step, the one whose prefill raises gets an "error" event; the
    others decode to the tokens they get alone, and iterating the batch raises the error."""
    chat, _ = setup
    a, pa = prompt(chat, "First question here.", Image.new("RGB", (70, 30), "red"))
    b, _ = prompt(chat, "Second one")
    alone = {0: run(chat.engine, [Request(a, GREEDY, pa)])[0], 2: run(chat.engine, [Request(b, GREEDY)])[0]}
    bad = Request(b, GREEDY)
    prefill = chat.engine.prefill

    def failing_prefill(request, caches, row):
        if request is bad:
            raise RuntimeError("out of memory")
        return prefill(request, caches, row)

    monkeypatch.setattr(chat.engine, "prefill", failing_prefill)
    gen = chat.engine.generate([Request(a, GREEDY, pa), bad, Request(b, GREEDY)])
    got, errors = {0: [], 2: []}, {}
    while gen:
        for e in gen.step():
            if e.error is not None:
                assert (e.token, e.finish) == (None, "error")
                errors[e.rid] = str(e.error)
            else:
                got[e.rid].append(e.token)
    assert errors == {1: "out of memory"} and got == alone
    with pytest.raises(RuntimeError, match="out of memory"):
        list(chat.engine.generate([Request(a, GREEDY, pa), bad]))


def test_a_failing_decode_step_fails_only_the_rows_it_ran(setup, monkeypatch):
    """A request that finished on its prefill token keeps its finish when the step's decode then fails;
    the rows the decode ran get the error, and the batch takes new requests afterwards."""
    chat, _ = setup
    a, _ = prompt(chat, "one")
    gen = chat.engine.start(max_batch=4, max_len=256)
    gen.add(Request(a, GREEDY))
    gen.add(Request(a, SamplingParams(max_new_tokens=1, ignore_eos=True)))
    decode = chat.engine._decode_fn

    def failing_decode(*args):
        raise RuntimeError("device lost")

    monkeypatch.setattr(chat.engine, "_decode_fn", failing_decode)
    events = gen.step()
    assert [(e.rid, e.finish, str(e.error) if e.error else None) for e in events] == [
        (0, None, None), (1, "length", None), (0, "error", "device lost")]
    assert not gen and gen.active == 0
    monkeypatch.setattr(chat.engine, "_decode_fn", decode)
    rid = gen.add(Request(a, GREEDY))
    tokens = [e.token for events in gen for e in events]
    assert rid == 2 and tokens == run(chat.engine, [Request(a, GREEDY)])[0]


def test_requests_with_one_prompt_are_prefilled_once(setup, monkeypatch):
    """Samples of one prompt admitted together share a single prefill and still get each its own tokens
    (the same as alone); so does a twin whose source row finished on its first token (that row is freed after the
    step's admissions: the n choices of a max_tokens 1 request prefilled n times before)."""
    chat, _ = setup
    a, pa = prompt(chat, "First question here.", Image.new("RGB", (70, 30), "red"))
    sampled = [SamplingParams(max_new_tokens=12, do_sample=True, temperature=1.0, seed=s, ignore_eos=True)
               for s in range(3)]
    alone = [run(chat.engine, [Request(a, params, pa)])[0] for params in sampled]
    assert alone[0] != alone[1]
    calls = []
    prefill = chat.engine.prefill

    def counting_prefill(request, caches, row):
        calls.append(row)
        return prefill(request, caches, row)

    monkeypatch.setattr(chat.engine, "prefill", counting_prefill)
    # Equal prompts and tiles as separate objects count as the same prompt too.
    requests = [Request(list(a), params, pa.clone()) for params in sampled]
    assert list(run(chat.engine, requests).values()) == alone and calls == [0]
    calls.clear()
    b, _ = prompt(chat, "Second one")
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    requests = [Request(a, one, pa), Request(a, sampled[1], pa), Request(b, GREEDY), Request(b, GREEDY)]
    out = run(chat.engine, requests)
    assert calls == [0, 2] and out[1] == alone[1] and out[2] == out[3] == run(chat.engine, [Request(b, GREEDY)])[0]
    calls.clear()
    firsts = run(chat.engine, [Request(a, dataclasses.replace(one, do_sample=True, seed=s), pa) for s in range(4)])
    assert calls == [0] and [firsts[i] for i in range(4)] == [alone[i][:1] for i in range(3)] + [firsts[3]]


def _poisoned_prefill(chat, monkeypatch):
    """A short prompt, its greedy answer alone, and a long request whose prefill writes NaN keys into its row
    (as an fp16 overflow would)."""
    long_prompt, _ = prompt(chat, "A much longer first question, with many more words in it than the next one.")
    short, _ = prompt(chat, "Hi")
    alone = run(chat.engine, [Request(short, GREEDY)])[0]
    prefill = chat.engine.prefill
    poisoned = Request(long_prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))

    def overflowing_prefill(request, caches, row):
        hidden = prefill(request, caches, row)
        if request is poisoned:
            for cache in caches:
                cache.k[row, :, : len(request.prompt_ids)] = float("nan")
        return hidden

    monkeypatch.setattr(chat.engine, "prefill", overflowing_prefill)
    return short, alone, poisoned


def test_a_sequence_that_went_non_finite_leaves_nothing_for_the_next_one(setup, monkeypatch):
    """Masked cache slots still enter attention as 0 x value: inf or NaN that a finished sequence wrote
    (fp16 overflow) must not reach the next sequence in its row."""
    chat, _ = setup
    short, alone, poisoned = _poisoned_prefill(chat, monkeypatch)
    gen = chat.engine.start(max_batch=2, max_len=256)
    for request in (Request(short, GREEDY), poisoned):  # the poisoned sequence in the last row
        gen.add(request)
    tokens = {0: [], 1: []}
    while gen:  # step by step: iterating would raise the poisoned row's error
        for e in gen.step():
            tokens[e.rid].append(e.token)
            if e.rid == 1 and e.finish:  # "error": its first decode step read the NaN keys
                gen.add(Request(short, GREEDY))  # takes the row the poisoned sequence leaves
                tokens[2] = []
    assert tokens[0] == alone and tokens[2] == alone
    assert all(not (c.k.isnan().any() or c.v.isnan().any()) for c in gen.caches)


def test_a_non_finite_sequence_that_moved_rows_leaves_nothing_in_the_row_it_left(setup, monkeypatch):
    """A finished row takes the last row's sequence; the slots that sequence leaves behind are zeroed too, so that
    the next sequence in that row does not read its inf or NaN through masked slots."""
    chat, _ = setup
    short, alone, poisoned = _poisoned_prefill(chat, monkeypatch)
    gen = chat.engine.start(max_batch=2, max_len=256)
    gen.add(Request(short, SamplingParams(max_new_tokens=2, ignore_eos=True)))  # finishes first: row 1 moves to 0
    gen.add(poisoned)
    tokens = {}
    while gen:  # step by step: iterating would raise the poisoned row's error
        for e in gen.step():
            tokens.setdefault(e.rid, []).append(e.token)
            if e.rid == 0 and e.finish:
                gen.add(Request(short, GREEDY))  # takes row 1, which the poisoned sequence left
    assert tokens[2] == alone
    assert all(not (c.k.isnan().any() or c.v.isnan().any()) for c in gen.caches)


def test_logprobs_are_the_models_log_softmax_of_each_chosen_token(setup):
    """The raw distribution (before temperature and filters) from an uncached forward over the prompt
    and the tokens so far; the top alternatives best first."""
    chat, _ = setup
    ids, pixels = prompt(chat, "Describe it.", Image.new("RGB", (70, 30), "red"))
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    sampled = SamplingParams(max_new_tokens=6, do_sample=True, temperature=0.5, top_k=5, seed=3, ignore_eos=True)
    for params in (greedy, sampled):
        events = [e for step in chat.engine.generate([Request(ids, params, pixels, logprobs=3)]) for e in step]
        tokens = [e.token for e in events]
        with torch.no_grad():
            logits = chat.model(torch.tensor([ids + tokens]), pixel_values=pixels)[0, len(ids) - 1 : -1]
        expected = logits.float().log_softmax(-1)
        for t, e in enumerate(events):
            assert e.logprob == pytest.approx(expected[t, e.token].item(), abs=1e-4)
            best = expected[t].topk(3)
            assert [i for i, _ in e.top_logprobs] == best.indices.tolist()
            assert [v for _, v in e.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-4)
            if params is greedy:
                assert e.top_logprobs[0][0] == e.token
    plain = [e for step in chat.engine.generate([Request(ids, greedy, pixels)]) for e in step]
    assert all(e.logprob is None and e.top_logprobs == () for e in plain)  # only when asked
    zero = [e for step in chat.engine.generate([Request(ids, greedy, pixels, logprobs=0)]) for e in step]
    assert all(e.logprob is not None and e.top_logprobs == () for e in zero)
    with pytest.raises(InputError, match="logprobs must be a whole number in 0..20, got 21"):
        chat.engine.generate([Request(ids, greedy, logprobs=21)])


def test_early_finish_frees_the_row(setup):
    chat, _ = setup
    a, _ = prompt(chat, "one")
    b, _ = prompt(chat, "two two")
    gen = chat.engine.generate([Request(a, SamplingParams(max_new_tokens=3, ignore_eos=True)), Request(b, GREEDY)])
    finishes, active = {}, []
    for events in gen:
        active.append(gen.active)
        for e in events:
            if e.finish:
                finishes[e.rid] = e.finish
    assert finishes == {0: "length", 1: "length"}
    assert 1 in active and active[0] == 2  # the short request left the batch early
    assert run(chat.engine, [Request(b, GREEDY)])[0] == run(chat.engine, [Request(a, GREEDY), Request(b, GREEDY)])[1]


def test_stop_token_ends_a_request(setup):
    chat, _ = setup
    ids, _ = prompt(chat, "Stop early")
    first = run(chat.engine, [Request(ids, SamplingParams(max_new_tokens=5, ignore_eos=True))])[0]
    stopped = run(chat.engine, [Request(ids, SamplingParams(max_new_tokens=5, stop_token_ids=(first[2],)))])[0]
    assert stopped == first[:3]


def test_seeded_sampling_is_reproducible(setup):
    chat, _ = setup
    ids, _ = prompt(chat, "Sample")
    params = SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.5, top_k=0, seed=7, ignore_eos=True)
    first = run(chat.engine, [Request(ids, params)])[0]
    again = run(chat.engine, [Request(ids, params)])[0]
    other = run(chat.engine, [Request(ids, SamplingParams(**{**params.__dict__, "seed": 8}))])[0]
    batched = run(chat.engine, [Request(ids, GREEDY), Request(ids, params)])[1]
    assert first == again == batched
    assert first != other


def test_top_k_and_top_p_masks_on_hand_made_logits():
    # probabilities 0.5, 0.25, 0.125, 0.125 (log-space logits)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]] * 3))
    top_k = torch.tensor([2, 0, 0])
    top_p = torch.tensor([1.0, 0.7, 0.5])
    kept = filter_top_k_top_p(logits, top_k, top_p).isfinite()
    assert kept[0].tolist() == [True, True, False, False]  # top-k 2
    assert kept[1].tolist() == [True, True, False, False]  # 0.5 + 0.25 reaches 0.7
    assert kept[2].tolist() == [True, False, False, False]  # 0.5 alone reaches 0.5
    # The most likely token is always kept, however small top_p is.
    assert filter_top_k_top_p(logits[:1], torch.tensor([0]), torch.tensor([1e-6])).isfinite()[0].tolist() == [
        True, False, False, False]


def test_top_p_keeps_the_tokens_transformers_keeps_on_a_full_vocabulary():
    """The nucleus is cut where transformers' TopPLogitsWarper cuts it: on 151674 tokens, the mass
    above each token summed from the most likely down lost the tail's small terms to fp32 rounding,
    so top_p 0.999 dropped a few hundred more tokens than transformers (and the exact sum) does. Both
    sides get top_p as the engine holds it, in fp32."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 151674) * 3
    for top_p in (torch.tensor(p).item() for p in (0.5, 0.99, 0.999, 0.99999)):
        for top_k in (0, 50_000):
            hf = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, logits) if top_k else logits)
            ours = filter_top_k_top_p(logits, torch.full((4,), top_k), torch.full((4,), top_p))
            assert ours.isfinite().sum(-1).tolist() == hf.isfinite().sum(-1).tolist(), (top_p, top_k)


def test_top_p_cuts_where_transformers_cuts_for_top_p_as_the_user_gave_it():
    """Seeded random rows, each with a top_p as a Python float: uniform, or 1 - a cumulative mass of the
    row itself (the cut then falls on a token). transformers compares its fp32 sums with 1 - top_p taken
    in float64; the nucleus took 1 - top_p in fp32 (the engine held top_p in fp32), up to 3e-8 off, and
    kept or dropped a token of probability ~1e-7 differently."""
    from transformers.generation.logits_process import TopPLogitsWarper

    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(300):
        vocab = rng.choice([5, 50, 1000, 20_000])
        logits = torch.randn(1, vocab) * rng.choice([0.3, 1.0, 3.0, 8.0])
        tail = logits.sort().values.softmax(-1).cumsum(-1)[0]
        top_p = rng.random() if rng.random() < 0.3 else 1 - tail[rng.randrange(vocab - 1)].item()
        if not 0 < top_p < 1:
            continue
        hf = TopPLogitsWarper(top_p)(None, logits)
        ours = filter_top_k_top_p(logits, torch.zeros(1, dtype=torch.long), torch.tensor([top_p], dtype=torch.float64))
        # compared as the logit values kept: transformers' CPU sort of a large vocabulary orders tied
        # tokens arbitrarily (see the next test)
        assert torch.equal(ours.sort(-1).values, hf.sort(-1).values), (vocab, top_p)


def test_penalty_temperature_top_k_top_p_equal_transformers_processors_ties_included():
    """The chain transformers runs when sampling (RepetitionPenalty, Temperature, TopK, TopP) on hand-made
    and bf16-rounded logits, where ties are common. Where the top-p cut fell inside a tie, the nucleus
    kept the tied tokens of the lowest ids and transformers (and vLLM) the highest. Their sort is stable
    on a few tokens (and on a GPU's vocabulary) but not on a CPU's large one, so there the tokens kept
    are compared as the logit values kept (which tied ids carry them is arbitrary there)."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    torch.manual_seed(0)
    cases = [torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 1.0, 1.0]]),
             (torch.randn(3, 5000) * 4).bfloat16().float()]
    for logits in cases:
        rows, vocab = logits.shape
        generated = torch.randint(vocab, (rows, 6))  # transformers sees only these: the prompt went in as embeddings
        seen = torch.zeros(rows, vocab, dtype=torch.bool).scatter_(1, generated, True)
        for penalty, temperature, top_k, top_p in [(1.0, 1.0, 0, 0.3), (1.3, 0.7, 0, 0.5), (1.3, 0.7, 2, 0.9),
                                                   (0.8, 1.5, 50, 0.95), (1.0, 1.0, 1, 1.0), (1.2, 0.5, 7, 1.0)]:
            hf = RepetitionPenaltyLogitsProcessor(penalty)(generated, logits.clone())
            hf = TemperatureLogitsWarper(temperature)(generated, hf)
            hf = TopKLogitsWarper(top_k)(generated, hf) if top_k else hf
            hf = TopPLogitsWarper(top_p)(generated, hf) if top_p < 1 else hf
            scaled = apply_repetition_penalty(logits, seen, torch.full((rows,), penalty)) / temperature
            top_ks, top_ps = torch.full((rows,), top_k), torch.full((rows,), top_p)
            for ours in (filter_top_k_top_p(scaled, top_ks, top_ps),
                         filter_top_k_top_p(scaled, top_ks, top_ps, largest_k=top_k, nucleus=top_p < 1)):
                expected = hf
                if vocab > 3:
                    ours, expected = ours.sort(-1).values, hf.sort(-1).values
                assert torch.equal(ours, expected), (vocab, penalty, temperature, top_k, top_p)


def test_top_k_alone_without_sorting_masks_exactly_as_the_sorting_path():
    """The host-known fast path (only the k-th largest logit) keeps the same tokens, ties with the k-th
    included, for rows with top-k, without it (0) and with k past the vocabulary."""
    torch.manual_seed(0)
    logits = (torch.randn(5, 1000) * 2).round() / 2  # many ties
    logits[4, :500] = float("-inf")
    top_k = torch.tensor([1, 3, 0, 5000, 50])
    top_p = torch.ones(5)
    fast = filter_top_k_top_p(logits, top_k, top_p, largest_k=5000, nucleus=False)
    assert torch.equal(fast, filter_top_k_top_p(logits, top_k, top_p))
    assert (fast[0].isfinite().sum() > 1) and fast[2].isfinite().all()  # a tie at the top kept; no top-k
    assert torch.equal(filter_top_k_top_p(logits, top_k * 0, top_p, largest_k=0, nucleus=False), logits)


def test_exponential_noise_draws_exp1_and_sampling_follows_the_probabilities():
    generators = [make_generator(1, "cpu"), None]
    noise = exponential_noise(generators, 200_000, "cpu")
    assert torch.equal(noise[1], torch.ones(200_000))  # a greedy row
    assert (noise[0] > 0).all() and abs(noise[0].mean().item() - 1) < 0.01 and abs(noise[0].var().item() - 1) < 0.02
    assert torch.equal(noise[0], exponential_noise([make_generator(1, "cpu")], 200_000, "cpu")[0])
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    rows = 20_000
    g = make_generator(7, "cpu")
    noise = exponential_noise([g] * rows, 4, "cpu")
    tokens = choose_tokens(probs.log().expand(rows, 4), torch.zeros(rows, dtype=torch.bool), torch.ones(rows),
                           torch.zeros(rows, dtype=torch.long), torch.ones(rows), noise, 0, False)
    assert torch.allclose(torch.bincount(tokens, minlength=4) / rows, probs, atol=0.015)


def test_the_race_among_top_k_draws_the_filtered_probabilities_and_k_values_a_row():
    """race_among_top_k samples what top-k filtering then the full race would: the kept tokens (ties with the k-th
    included, -inf left out) with their renormalised probabilities, from one draw per kept token in id order."""
    weights = torch.tensor([0.05, 0.3, 0.1, 0.1, 0.2, 0.1, 0.15, 0.0])  # token 7 has logit -inf
    tied = torch.tensor([0.05, 0.3, 0.1, 0.1, 0.2, 0.1, 0.2, 0.2])  # the 3rd value, 0.2, three times
    logits = weights.log()
    rows = 6000
    for row, k, kept in ((weights, 3, [1, 4, 6]), (tied, 3, [1, 4, 6, 7]), (weights, 50, list(range(7)))):
        g = make_generator(3, "cpu")
        drawn = race_among_top_k(row.log().expand(rows, -1), [k] * rows, [g] * rows)
        counts = torch.bincount(torch.tensor(drawn), minlength=8) / rows
        want = torch.zeros(8)
        want[kept] = row[kept] / row[kept].sum()
        assert (counts - want).abs().max() < 0.02, (k, counts, want)
        assert counts[[i for i in range(8) if i not in kept]].sum() == 0
    # one draw per kept token, in id order: the generator gives exactly the stream of a by-hand race
    g, by_hand = make_generator(5, "cpu"), make_generator(5, "cpu")
    assert race_among_top_k(logits[None], [3], [g]) == [[1, 4, 6][int(
        (torch.tensor([0.3, 0.2, 0.15]) / 0.3 / exponential_noise([by_hand], 3, "cpu")[0]).argmax())]]
    assert torch.equal(g.get_state(), by_hand.get_state())
    # a row whose largest logit is not finite is left to the full race
    odd = torch.stack([logits, logits.clone().fill_(-math.inf),
                       logits.clone().index_fill_(0, torch.tensor([2]), math.nan)])
    assert race_among_top_k(odd, [3, 3, 3], [make_generator(0, "cpu")] * 3)[1:] == [None, None]


def test_engine_top_k_sampling_is_the_race_among_the_kept_tokens(setup):
    """A top-k request (no top-p) samples each step by race_among_top_k on its logits, drawing k values from its
    generator, batched with other kinds of rows or alone."""
    chat, _ = setup
    ids, _ = prompt(chat, "Sample")
    params = SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=5, seed=11, ignore_eos=True)
    alone = run(chat.engine, [Request(ids, params)])[0]
    nucleus = SamplingParams(**{**params.__dict__, "top_p": 0.9, "seed": 12})
    assert run(chat.engine, [Request(ids, GREEDY), Request(ids, nucleus), Request(ids, params)])[2] == alone
    g, tokens = make_generator(11, "cpu"), list(ids)
    with torch.no_grad():
        for _ in range(8):
            logits = chat.model(torch.tensor([tokens]))[0, -1].float()
            tokens += race_among_top_k((logits / 0.7)[None], [5], [g])
    assert alone == tokens[len(ids):]


def test_exponential_noise_is_finite_positive_and_fine_near_zero(monkeypatch):
    """U = 0 must not give inf (p / inf = 0 would let argmax take a filtered token when one token is
    left), and U just below 1 must give noise far below float32's 6e-8 step, or tokens under ~1e-7
    probability would almost never be drawn."""
    draws = torch.tensor([0.5, 1 - 2.0**-53, 0.0], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda n, generator=None, device=None, dtype=None: draws.to(dtype or torch.float32))
    noise = exponential_noise([make_generator(0, "cpu")], 3, "cpu")[0]
    assert noise.isfinite().all() and (noise > 0).all()
    assert noise[1] < 1e-15 and noise[0] == pytest.approx(math.log(2))
    probs = torch.tensor([[0.0, 0.0, 1.0]])  # only token 2, the one that drew U = 0, survives the filters
    assert choose_tokens(probs.log(), torch.tensor([False]), torch.ones(1), torch.zeros(1, dtype=torch.long),
                         torch.ones(1), noise[None], 0, False).item() == 2


def test_greedy_rows_ignore_noise_and_sampled_rows_follow_it():
    logits = torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 0.5]])
    noise = torch.tensor([[1.0, 1e6, 1e-6], [1.0, 1e6, 1e-6]])  # favours token 2 overwhelmingly
    tokens = choose_tokens(logits, torch.tensor([True, False]), torch.ones(2), torch.zeros(2, dtype=torch.long),
                           torch.ones(2), noise)
    assert tokens.tolist() == [1, 2]


def test_repetition_penalty_matches_the_hf_rule():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_bad_sampling_settings_are_refused():
    with pytest.raises(InputError, match=r"^top_p must be in \(0, 1\], got 0$"):
        SamplingParams(top_p=0)
    with pytest.raises(InputError, match="^max_new_tokens must be at least 1, got 0$"):
        SamplingParams(max_new_tokens=0)


def test_an_empty_stop_string_is_refused(setup):
    """stop="" (or "" in a list) was taken and never stopped anything; vLLM and this package's server refuse it."""
    chat, _ = setup
    for stop in ([""], ["ok", ""]):
        with pytest.raises(InputError, match="stop strings must not be empty"):
            SamplingParams(stop=stop)
    with pytest.raises(InputError, match="stop strings must not be empty"):
        chat.chat("Hello", stop="", max_new_tokens=2)


def test_a_repetition_penalty_that_would_overflow_the_logits_is_refused():
    """With 1e-40 the seen tokens' logits became inf, softmax NaN, and sampling drew token 0, one neither
    seen nor likely; transformers takes any penalty > 0 and gives inf too. From the smallest accepted,
    logits of 1e4 divided by it and by the smallest temperature stay finite."""
    with pytest.raises(InputError, match=r"repetition_penalty must be at least 1e-06 .*, got 1e-40"):
        SamplingParams(repetition_penalty=1e-40)
    smallest = SamplingParams(repetition_penalty=1e-6, temperature=1e-9, do_sample=True)
    logits = torch.tensor([[1e4, 3.0, -1e4, 0.0]])
    penalised = apply_repetition_penalty(logits, torch.ones(1, 4, dtype=torch.bool),
                                         torch.tensor([smallest.repetition_penalty]))
    noise = exponential_noise([make_generator(0, "cpu")], 4, "cpu")
    assert choose_tokens(penalised, torch.tensor([False]), torch.tensor([smallest.temperature]),
                         torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.float64), noise).item() == 0


@pytest.mark.parametrize("screen", [False, True])
def test_decode_step_compiles_without_graph_breaks(setup, screen):
    chat, _ = setup
    # compile=True marks what the step needs marked for dynamo (llm.thread_count); nothing compiles before a step runs
    engine = Engine(chat.model, chat.engine.stop_token_ids, compile=True, screen=screen)
    ids, _ = prompt(chat, "compile me")
    gen = engine.start(max_batch=1, max_len=128)
    gen.add(Request(ids, GREEDY))
    gen.step()
    tokens = torch.tensor([5])
    positions = torch.tensor([len(ids) + 1])
    greedy_screen = engine.greedy_screen()
    assert (greedy_screen is not None) == screen
    explanation = torch._dynamo.explain(engine._decode)(tokens, positions, gen.key_mask, gen.caches, 1, 128,
                                                         greedy_screen)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def compiled_batches(engine: Engine, chat) -> list[list[int]]:
    """Greedy tokens of batches of 1-4 prompts at many lengths, screened and not, in one engine."""
    texts = [prompt(chat, q)[0] for q in ("Hi", "What is it?", "Tell me more about the red square", "Why?")]
    out = []
    for new in range(2, 12):
        for size in (1, 3, 4):
            requests = [Request(t, SamplingParams(max_new_tokens=new + i, ignore_eos=True)) for i, t in
                        enumerate(texts[:size])]
            out += list(run(engine, requests).values())
    return out


def test_compiled_decode_takes_new_batch_sizes_and_lengths_without_recompiling(setup):
    """Every chat turn and batch has its own cache shape; compiled with static sizes, each one
    compiled again and the ninth failed (torch.compile's recompile limit, fullgraph=True). Traced here
    with a counting backend (no code generation) in the engine's own compile options."""
    from torch._dynamo.testing import CompileCounter

    from internvl_mpo.generate.engine import COMPILE_OPTIONS

    chat, _ = setup
    torch._dynamo.reset()
    expected = compiled_batches(Engine(chat.model, chat.engine.stop_token_ids), chat)
    counter = CompileCounter()
    engine = Engine(chat.model, chat.engine.stop_token_ids, compile=True, screen=True)
    engine._decode_fn = torch.compile(engine._decode, backend=counter, **COMPILE_OPTIONS)
    assert compiled_batches(engine, chat) == expected
    assert counter.frame_count <= 3  # one row / several rows, as sizes of 1 are specialised
    torch._dynamo.reset()


def test_compiled_decode_writes_only_into_static_inputs(setup):
    """CUDA graph trees skip a compiled step that writes into an input which is not a static address
    (torch's check_for_mutation); the step writes into the mask and the caches, which a compiled
    engine's Generation marks. Checked on what AOT autograd reports for the traced step."""
    from torch._dynamo.backends.common import aot_autograd

    from internvl_mpo.generate.engine import COMPILE_OPTIONS

    chat, _ = setup
    traced = []

    def record(gm, inputs):
        meta = torch._guards.TracingContext.try_get().fw_metadata
        mutated = {i for i, info in enumerate(meta.input_info) if info.mutates_data}
        traced.append((mutated, set(meta.static_input_indices)))
        return gm

    ids, _ = prompt(chat, "Hello")
    for screen in (False, True):
        torch._dynamo.reset()
        engine = Engine(chat.model, chat.engine.stop_token_ids, compile=True, screen=screen)
        engine._decode_fn = torch.compile(engine._decode, backend=aot_autograd(
            fw_compiler=record, keep_inference_input_mutations=True), **COMPILE_OPTIONS)
        run(engine, [Request(ids, SamplingParams(max_new_tokens=3, ignore_eos=True))] * 2)
    torch._dynamo.reset()
    assert len(traced) == 2
    for mutated, static in traced:
        assert len(mutated) == 1 + 2 * len(chat.engine.model.language_model.model.layers)  # mask, k and v
        assert mutated <= static


def static_inputs_recorder(engine: Engine) -> list:
    """Set `engine` up as a compiled one whose decode step runs eagerly and records, per call, the shape of
    the buffers it writes into and their addresses, holding the tensors (so no address is reused)."""
    seen = []

    def decode(tokens, positions, key_mask, caches, *args):
        buffers = [key_mask] + [t for c in caches for t in (c.k, c.v)]
        seen.append((tuple(key_mask.shape), tuple(b.data_ptr() for b in buffers), buffers))
        return engine._decode(tokens, positions, key_mask, caches, *args)

    engine.compiled, engine._decode_fn = True, decode
    return seen


def test_compiled_generations_of_one_shape_give_the_decode_step_the_same_buffers(setup):
    """CUDA graph trees record the compiled step again for every new address of its static inputs (the mask
    and the caches) and keep every recording: a Generation with new buffers for each chat turn made a long
    session record without end. After a first batch as large as any, 32 chat and batch_chat calls of 1-4
    prompts, short and past the first 256 slots, give the step the same addresses; the tokens are the eager
    engine's. (A larger batch moves the buffers once: each shape is then recorded once more.)"""
    chat, _ = setup
    bot = InternVLChat(chat.model, chat.tokenizer)
    seen = static_inputs_recorder(bot.engine)
    words = "one two three four five six seven".split()
    for i in [-1] + list(range(32)):
        questions = [" ".join(words[: 1 + i % 7]) * (1 + (i % 5) * 20) + str(j) for j in range(1 + i % 4)]
        expected = chat.batch_chat(questions, max_new_tokens=3 + i % 4, do_sample=False)
        if len(questions) == 1:
            assert bot.chat(questions[0], max_new_tokens=3 + i % 4, do_sample=False) == expected[0]
        else:
            assert bot.batch_chat(questions, max_new_tokens=3 + i % 4, do_sample=False) == expected
    shapes = {shape for shape, _, _ in seen}
    assert len(shapes) >= 8 and max(length for _, length in shapes) > 256
    assert len({pointers for _, pointers, _ in seen}) == 1


def test_a_reused_buffer_holds_nothing_of_the_generation_before(setup):
    """A compiled engine's next Generation takes the buffers of one left mid-way (a stream not read to its end)
    whose rows hold keys, values and inf: it gives the tokens of a fresh engine."""
    chat, _ = setup
    engine = Engine(chat.model, chat.engine.stop_token_ids)
    seen = static_inputs_recorder(engine)
    ids, _ = prompt(chat, "Tell me a long story")
    gen = engine.generate([Request(ids, GREEDY), Request(ids[:-2], GREEDY)])
    for _ in range(5):
        gen.step()
    for cache in gen.caches:
        cache.k[:, :, -1] = torch.inf
    del gen
    short = [Request(ids[:-4], SamplingParams(max_new_tokens=8, ignore_eos=True)), Request(ids[:-1], GREEDY)]
    assert run(engine, short) == run(chat.engine, short)
    assert seen[0][1] == seen[-1][1]  # the same buffers


def test_a_generation_started_while_another_lives_gets_buffers_of_its_own(setup):
    """Two live Generations of one compiled engine (an unfinished stream, then a chat call) never share buffers;
    each gives the tokens it gives alone."""
    chat, _ = setup
    engine = Engine(chat.model, chat.engine.stop_token_ids)
    static_inputs_recorder(engine)
    ids, _ = prompt(chat, "Two at once")
    first, second = [Request(ids, GREEDY)], [Request(ids[:-3], GREEDY)]
    a, b = engine.generate(first), engine.generate(second)
    buffers = [{t.untyped_storage().data_ptr() for t in [g.key_mask] + [x for c in g.caches for x in (c.k, c.v)]}
               for g in (a, b)]
    assert not buffers[0] & buffers[1]
    tokens = {0: [], 1: []}
    while a or b:
        for index, gen in enumerate((a, b)):
            tokens[index] += [e.token for e in gen.step()] if gen else []
    assert [tokens[0], tokens[1]] == [run(chat.engine, first)[0], run(chat.engine, second)[0]]


def test_release_frees_the_buffers_a_compiled_engine_keeps(setup):
    """A compiled engine keeps its largest mask and caches for the next Generation; `release()` lets them go
    (they were held for the life of the engine): after a long batch and a release, the storages are freed and
    a short batch allocates buffers of its own size. A Generation alive at the release keeps its buffers,
    which the next one never shares, and each gives a fresh engine's tokens."""
    chat, _ = setup
    engine = Engine(chat.model, chat.engine.stop_token_ids)
    engine.compiled = True  # keeps buffers as a compiled engine does; the step itself runs eagerly
    ids, _ = prompt(chat, "Tell me a long story " * 120)
    long = [Request(ids, SamplingParams(max_new_tokens=4, ignore_eos=True))] * 4
    run(engine, long)
    held = [weakref.ref(s) for s in engine._storages._storages]
    largest = sum(s().nbytes for s in held)
    engine.release()
    gc.collect()
    assert largest > 0 and all(s() is None for s in held)
    short = [Request(ids[-20:], SamplingParams(max_new_tokens=8, ignore_eos=True))]
    assert run(engine, short) == run(chat.engine, short)
    assert 0 < sum(s.nbytes for s in engine._storages._storages) < largest / 10
    alive = engine.generate(short)
    engine.release()
    other = engine.generate(long[:1])
    buffers = [{t.untyped_storage().data_ptr() for t in [g.key_mask] + [x for c in g.caches for x in (c.k, c.v)]}
               for g in (alive, other)]
    assert not buffers[0] & buffers[1]
    assert [e.token for step in alive for e in step] == run(chat.engine, short)[0]
    assert [e.token for step in other for e in step] == run(chat.engine, long[:1])[0]


# ---- the greedy screen of the head (greedy_head.py) ---------------------------------------------

def test_screened_engine_gives_the_same_tokens(setup):
    """Forced on for the tiny vocabulary (the size rule keeps it off there): greedy tokens equal the
    full head's and transformers'; sampled and penalised rows in the same batch are unaffected."""
    chat, ref = setup
    screened = Engine(chat.model, chat.engine.stop_token_ids, screen=True)
    assert chat.engine.greedy_screen() is None and screened.greedy_screen() is not None
    ids, pixels = prompt(chat, "Describe it.", Image.new("RGB", (100, 50), "red"))
    assert run(screened, [Request(ids, GREEDY, pixels)])[0] == hf_greedy(ref, torch.tensor([ids]), pixels)[0].tolist()
    texts = [prompt(chat, q)[0] for q in ("Hello there, how are you today?", "What?", "Tell me more about it")]
    batch = [Request(t, GREEDY) for t in texts]
    assert run(screened, batch) == run(chat.engine, batch)
    sampled = SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.5, top_k=0, seed=7, ignore_eos=True)
    penalised = SamplingParams(max_new_tokens=20, ignore_eos=True, repetition_penalty=1.3)
    mixed = [Request(texts[0], GREEDY), Request(texts[1], sampled), Request(texts[2], penalised)]
    assert run(screened, mixed) == run(chat.engine, mixed)


def test_failed_screen_checks_fall_back_to_the_full_head(setup):
    """A head whose rows are all equal ties every logit (up to the matmul's rounding), so every check
    fails and each token comes from the full head, as without the screen."""
    chat, _ = setup
    model = copy.deepcopy(chat.model)
    with torch.no_grad():
        head = model.language_model.output_head().weight
        head.copy_(head[:1].expand_as(head))
    ids, _ = prompt(chat, "Anything")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    plain = run(Engine(model, screen=False), [Request(ids, params)])[0]
    gen = Engine(model, screen=True).generate([Request(ids, params)])
    got = [e.token for events in gen for e in events]
    assert got == plain
    assert gen.fallbacks == 6  # the first token (prefill) and five decode steps


def test_failed_screen_checks_are_settled_by_the_blocks_within_reach(few_row_setup):
    """Equal leading rows in 20 of the head's 128 blocks (the check gathers 16), +r and -r so that they lead
    whatever the hidden state: every check fails, and `widen` gives the full head's tokens without it."""
    model, _ = few_row_setup
    model = copy.deepcopy(model)
    with torch.no_grad():
        head = model.language_model.output_head().weight
        lead = head[0] * 1000
        head[10 * BLOCK : 30 * BLOCK] = lead
        head[40 * BLOCK : 60 * BLOCK] = -lead
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    requests = [Request(list(range(300, 300 + n)), params) for n in (5, 9)]
    plain = run(Engine(model, screen=False), requests)
    gen = Engine(model, screen=True).generate(requests)
    got = {}
    for events in gen:
        for e in events:
            got.setdefault(e.rid, []).append(e.token)
    assert got == plain and set(sum(plain.values(), [])) <= {10 * BLOCK, 40 * BLOCK}
    assert gen.widened == 12 and gen.fallbacks == 0


def test_screen_follows_changes_to_the_head(setup):
    chat, _ = setup
    model = copy.deepcopy(chat.model)
    engine = Engine(model, screen=True)
    first = engine.greedy_screen()
    assert engine.greedy_screen() is first
    with torch.no_grad():
        model.language_model.output_head().weight.mul_(2)
    assert engine.greedy_screen() is not first


def test_compiled_steps_screen_through_the_same_kernel(setup):
    """Compiled steps call oneDNN's int8 linear through a custom op (inductor lowers torch's own only for frozen
    weights), so compiled and eager engines screen through oneDNN's kernel where it sums exactly."""
    chat, _ = setup
    width = chat.model.config.llm.hidden_size
    kernel = "onednn" if onednn_int8(width) else "int8pack"
    assert Engine(chat.model, compile=True, screen=True).greedy_screen().kernel == kernel
    assert Engine(chat.model, screen=True).greedy_screen().kernel == kernel


@pytest.mark.slow  # about a minute of compilation on a 2-core CPU
@pytest.mark.parametrize("screen", [False, True])
def test_compiled_engine_gives_the_same_tokens(setup, screen):
    chat, _ = setup
    eager = compiled_batches(Engine(chat.model, chat.engine.stop_token_ids, screen=screen), chat)
    compiled = Engine(chat.model, chat.engine.stop_token_ids, compile=True, screen=screen)
    assert compiled_batches(compiled, chat) == eager


# ---- text assembly and the chat API -------------------------------------------------------

class CharTokenizer:
    """Each id is one character; enough to test text assembly."""

    def stream_decoder(self, skip_special_tokens=True):
        class Decoder:
            def feed(self, token):
                return chr(token)

            def flush(self):
                return ""

        return Decoder()


def test_stop_strings_cut_the_text_and_hold_back_partial_matches():
    text = TextAssembler(CharTokenizer(), stop=("END",))
    pieces = [text.feed(ord(c)) for c in "abEcdEN"]
    assert "".join(p for p, _ in pieces) == "abEcd"  # "EN" is held back: it may begin "END"
    assert text.feed(ord("D")) == ("", True)


def test_chat_stream_and_batch_agree(setup):
    chat, _ = setup
    image = Image.new("RGB", (80, 40), "red")
    kw = dict(max_new_tokens=12, do_sample=False)
    answer = chat.chat("What is it?", images=image, **kw)
    assert "".join(chat.stream_chat("What is it?", images=image, **kw)).strip() == answer
    assert chat.batch_chat(["Hi", "What is it?"], images=[None, image], **kw)[1] == answer
    answer2, history = chat.chat("What is it?", images=image, return_history=True, **kw)
    assert answer2 == answer and history == [("<image>\nWhat is it?", answer)]
    follow = chat.prepare("And then?", image, history=history)
    assert follow.prompt_ids[: len(chat.prepare("What is it?", image).prompt_ids) - 3] == \
        chat.prepare("What is it?", image).prompt_ids[:-3]


def test_images_first_given_on_a_later_turn_are_placed_and_kept_in_the_history(setup):
    """A conversation that starts with text and then shows an image (or a video) was refused: only the
    first turn got the `<image>` prefix. The later question gets it, and the history keeps it."""
    chat, _ = setup
    image = Image.new("RGB", (80, 40), "red")
    kw = dict(max_new_tokens=4, do_sample=False)
    _, history = chat.chat("Hi", return_history=True, **kw)
    answer, history = chat.chat("What is it?", image, history=history, return_history=True, **kw)
    assert history[1] == ("<image>\nWhat is it?", answer)
    assert chat.prepare("What is it?", image, history=history[:1]).prompt_ids == \
        chat.prepare("<image>\nWhat is it?", image, history=history[:1]).prompt_ids
    assert chat.chat("And then?", image, history=history, **kw)  # the image goes to its question again
    assert len(history) == 2  # the caller's list is left as it is (the official chat() appends to it)
    frames = [Image.new("RGB", (20, 10))] * 2
    clip = chat.prepare("What happens?", video=frames, history=history[:1])
    assert clip.question == "".join(f"Frame{k}: <image>\n" for k in range(1, 9)) + "What happens?"
    for bad in (["qa"], [("q", "a", "b")]):
        with pytest.raises(InputError, match="history entries must be"):
            chat.prepare("What happens?", video=frames, history=bad)


def test_a_video_placeholder_in_the_question_takes_the_frames_as_in_training(setup, tmp_path):
    """`<video>` typed in a question stayed text while training data (and vLLM) put the frames there: the same
    record text gave another prompt at inference. The frames go at it; without one, in front (the card's)."""
    from internvl_mpo.train.data import MediaSettings, load_media

    chat, _ = setup
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(4):
        Image.new("RGB", (20, 10), (40 * k, 0, 0)).save(frames / f"{k + 1}.png")
    prefix = "".join(f"Frame{k}: <image>\n" for k in range(1, 5))
    for question, placed in (("<video>\nWhat happens?", prefix + "What happens?"),
                             ("Watch <video> closely.", f"Watch {prefix} closely."),
                             ("What happens?", prefix + "What happens?")):
        assert chat.prepare(question, video=str(frames), num_segments=4).question == placed
        settings = MediaSettings(video_frames=4, image_size=chat.config.image_size)
        trained = load_media((), False, str(frames), question, settings)[2]
        assert trained == placed
    assert chat.prepare("<video> and <video>?").question == "<video> and <video>?"  # no video: text
    # beside an <image>, the frames still go at the <video>, as training puts them (the official reader's order)
    mixed = "<image>\nSee <video>\nWhat happens?"
    trained = load_media((), False, str(frames), mixed, MediaSettings(video_frames=4,
                                                                     image_size=chat.config.image_size))[2]
    assert trained == f"<image>\nSee {prefix}What happens?"
    with pytest.raises(InputError, match="5 <image> placeholder"):  # the same prompt: one <image> too many
        chat.prepare(mixed, video=str(frames), num_segments=4)
    with pytest.raises(InputError, match="^the question holds 2 <video> placeholders; a video's frames go at one$"):
        chat.prepare("<video> and <video>?", video=str(frames), num_segments=4)


def test_the_model_cards_calls_give_the_official_prompt_ids(setup, checkpoint):
    """The card's chat() calls (one image, a follow-up turn, combined and separate images, a video,
    pure text), written with this API, give the ids of the prompt the official chat() builds
    (rendered independently from conversation.py's rules, tokenized by transformers)."""
    transformers = pytest.importorskip("transformers")
    from test_template import official_chat_prompt

    chat, _ = setup
    hf = transformers.AutoTokenizer.from_pretrained(checkpoint[0])
    size, n = chat.config.image_size, chat.model.num_image_token

    def official(question, history=None, patches=()):
        text = official_chat_prompt(question, history, patches, image_given=bool(patches), num_image_token=n)
        return hf.encode(text, add_special_tokens=False)

    one, two = torch.randn(2, 3, size, size), torch.randn(1, 3, size, size)
    first = chat.prepare("Please describe the image shortly.", one)
    assert first.prompt_ids == official("Please describe the image shortly.", None, [2])
    history = [(first.question, "A red square.")]
    assert chat.prepare("Write a poem about it.", one, history=history).prompt_ids == \
        official("Write a poem about it.", history, [2])
    combined = "<image>\nDescribe the two images in detail."
    assert chat.prepare(combined, torch.cat([one, two])).prompt_ids == official(combined, None, [3])
    separate = "Image-1: <image>\nImage-2: <image>\nWhat are the similarities and differences?"
    assert chat.prepare(separate, torch.cat([one, two]), num_patches_list=[2, 1]).prompt_ids == \
        official(separate, None, [2, 1])
    video = "".join(f"Frame{i + 1}: <image>\n" for i in range(4)) + "What is the red panda doing?"
    assert chat.prepare(video, torch.randn(4, 3, size, size), num_patches_list=[1] * 4).prompt_ids == \
        official(video, None, [1] * 4)
    assert chat.prepare("Hello, who are you?").prompt_ids == official("Hello, who are you?")


def test_prompt_ids_outside_the_vocabulary_are_refused_when_added(setup):
    """An id past the vocabulary failed in the embedding lookup (IndexError; on a GPU a device-side
    assert, which ends every other request of the process too)."""
    chat, _ = setup
    vocab = chat.model.config.llm.vocab_size
    gen = chat.engine.start(max_batch=1, max_len=64)
    for ids in ([5, vocab], [-1, 5], [5, 2.0], [5, True], [vocab + 1]):
        with pytest.raises(InputError, match=f"prompt token ids must be whole numbers in 0..{vocab - 1}"):
            gen.add(Request(ids, GREEDY))
    assert not gen


def test_log_probability_counts_that_are_not_whole_numbers_are_refused_when_added(setup):
    """Request.logprobs or prompt_logprobs of 2.5 or True passed the range check, then failed in torch's topk
    after the prefill ran ("argument 'k' must be int"); they are refused by name when added. NumPy integers count."""
    chat, _ = setup
    ids, _ = prompt(chat, "Count")
    gen = chat.engine.start(max_batch=1, max_len=128)
    for name in ("logprobs", "prompt_logprobs"):
        for bad in (2.5, True, -1):
            with pytest.raises(InputError, match=re.escape(f"{name} must be a whole number in 0..20, got {bad!r}")):
                gen.add(Request(ids, SamplingParams(max_new_tokens=2), **{name: bad}))
    assert not gen
    events = [e for step in chat.engine.generate([Request(ids, SamplingParams(max_new_tokens=1),
                                                          logprobs=numpy.int64(2), prompt_logprobs=numpy.int64(1))])
              for e in step]
    assert len(events[0].top_logprobs) == 2 and len(events[0].prompt_logprobs[1][2]) == 1


def test_prompt_ids_given_as_numpy_arrays_act_as_lists(setup):
    """Requests whose prompt ids were NumPy arrays, admitted in one step, failed with numpy's "truth value of an
    array is ambiguous" (or a broadcast error) where the engine looks for a prompt it has just prefilled."""
    chat, _ = setup
    ids, _ = prompt(chat, "Arrays")
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    want = run(chat.engine, [Request(x, params) for x in (ids, ids[:-1], ids)])
    with warnings.catch_warnings():  # nor through torch's slow path for a list of arrays, which warns
        warnings.simplefilter("error")
        assert run(chat.engine, [Request(numpy.array(x), params) for x in (ids, ids[:-1], ids)]) == want


def test_prompt_longer_than_context_is_refused_before_compute(setup):
    chat, _ = setup
    small = chat.model.config.llm.max_position_embeddings
    with pytest.raises(InputError, match="longer than the context"):
        chat.chat("word " * (small + 10), max_new_tokens=4)


def test_placeholder_count_mismatch(setup):
    chat, _ = setup
    with pytest.raises(InputError, match="2 <image> placeholder"):
        chat.chat("<image> and <image>", images=Image.new("RGB", (20, 20)))


def test_unknown_generation_setting(setup):
    chat, _ = setup
    with pytest.raises(InputError, match="unknown generation settings"):
        chat.chat("hi", temprature=0.5)


def test_the_official_generation_keys_beams_refused_eos_and_pad_overridden(setup):
    """Beam search is refused, not run as sampling; eos_token_id and pad_token_id are taken and change
    nothing, as the official chat() overwrites eos_token_id with <|im_end|> (pad only pads batches)."""
    chat, _ = setup
    kw = dict(max_new_tokens=6, do_sample=False)
    for beams in (2, 4):
        with pytest.raises(InputError, match="beam search is not implemented; use num_beams=1"):
            chat.chat("Hi", generation_config=dict(num_beams=beams, **kw))
    answer = chat.chat("Hi", **kw)
    official = dict(num_beams=1, eos_token_id=chat.tokenizer.encode("Hi")[0], pad_token_id=chat.tokenizer.pad_id, **kw)
    assert chat.chat("Hi", generation_config=official) == answer
    assert chat.batch_chat(["Hi"], generation_config=official) == [answer]


def test_the_model_cards_streamer_setting_points_to_stream_chat(setup):
    """The card streams by putting a TextIteratorStreamer in generation_config; that was refused as an
    unknown setting among the list of known ones, with no word of how to stream here."""
    chat, _ = setup
    config = dict(max_new_tokens=4, do_sample=False, streamer=object())
    with pytest.raises(InputError, match=r"^streamer is not taken: iterate stream_chat\(\) for the answer's pieces"):
        chat.chat("hi", generation_config=config)


def test_sampling_default_is_the_model_card(setup):
    from internvl_mpo.generate.params import sampling_params

    params = sampling_params()
    assert params.do_sample and params.max_new_tokens == 1024 and params.top_k == 50
    assert math.isclose(params.temperature, 1.0)


def test_repetition_penalty_in_the_engine_prevents_repeats(setup):
    chat, _ = setup
    ids, _ = prompt(chat, "Repeat after me")
    plain = run(chat.engine, [Request(ids, SamplingParams(max_new_tokens=40, ignore_eos=True))])[0]
    assert len(set(plain)) < len(plain)  # random weights repeat themselves without a penalty
    strict = SamplingParams(max_new_tokens=40, ignore_eos=True, repetition_penalty=1e6)
    penalised = run(chat.engine, [Request(ids, GREEDY), Request(ids, strict)])[1]
    assert len(set(penalised)) == len(penalised)


def test_ignore_eos_keeps_the_requests_own_stop_ids(setup):
    chat, _ = setup
    ids, _ = prompt(chat, "Stop early")
    first = run(chat.engine, [Request(ids, SamplingParams(max_new_tokens=5, ignore_eos=True))])[0]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True, stop_token_ids=(first[2],))
    assert run(chat.engine, [Request(ids, params)])[0] == first[:3]


def test_unseeded_sampling_follows_the_global_torch_seed(setup):
    chat, _ = setup
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=0)
    torch.manual_seed(3)
    first = chat.chat("Sample", **kw)
    torch.manual_seed(3)
    assert chat.chat("Sample", **kw) == first
    torch.manual_seed(4)
    assert chat.chat("Sample", **kw) != first


def test_seeded_batch_chat_samples_each_question_differently(setup):
    chat, _ = setup
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=0, seed=5)
    answers = chat.batch_chat(["Sample"] * 3, **kw)
    assert len(set(answers)) == 3
    assert chat.batch_chat(["Sample"] * 3, **kw) == answers
    assert answers[1] == chat.chat("Sample", **{**kw, "seed": 6})
    # the last int64 seed: question 1's seed + 1 was refused as 2**63, a seed never given; it wraps to 0
    last = chat.batch_chat(["Sample"] * 2, **{**kw, "seed": 2**63 - 1})
    assert last[1] == chat.chat("Sample", **{**kw, "seed": 0})


def test_generation_settings_given_as_none_are_unset(setup):
    from internvl_mpo.generate.params import sampling_params

    params = sampling_params(do_sample=False, temperature=None, top_p=None, max_new_tokens=None,
                             stop_token_ids=None, stop=None, seed=None)
    assert params == sampling_params(do_sample=False)


def test_top_k_none_turns_top_k_off_as_in_transformers():
    """`top_k=None` took the default 50; transformers (which the official chat() hands its settings to)
    sets top_k None and then adds no TopKLogitsWarper: sampling from the whole vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.generation.logits_process import TopKLogitsWarper

    from internvl_mpo.generate.params import sampling_params

    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1))
    for given in ({"top_k": None}, {}, {"top_k": 7}):
        config, _ = hf._prepare_generation_config(None, do_sample=True, **given)
        top_k = [p.top_k for p in hf._get_logits_processor(config, input_ids_seq_length=0)
                 if isinstance(p, TopKLogitsWarper)]
        assert [sampling_params(do_sample=True, **given).top_k] == (top_k or [0]), given


def test_out_of_range_and_non_finite_settings_are_refused():
    for bad in (dict(seed=2**64), dict(seed=-1), dict(top_k=2**63), dict(temperature=math.nan),
                dict(repetition_penalty=math.nan), dict(top_p=math.nan), dict(temperature=math.inf)):
        with pytest.raises(InputError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_settings_of_the_wrong_type_are_refused_by_name(setup):
    """A float token count or a stop list holding a number raised torch's or Python's TypeError from
    deep inside (or, for stop_token_ids=["a"] and stop=[None], was silently never matched)."""
    chat, _ = setup
    for bad in (dict(max_new_tokens=8.0), dict(max_new_tokens="8"), dict(top_k=2.5), dict(seed=1.5),
                dict(temperature="0.5"), dict(repetition_penalty="1"), dict(stop=5), dict(stop=[1]),
                dict(stop=[None]), dict(stop_token_ids=["a"]), dict(stop_token_ids=[torch.tensor(5)]),
                dict(do_sample="False"), dict(ignore_eos="no")):  # a truthy string silently sampled
        with pytest.raises(InputError, match=next(iter(bad))):
            chat.chat("Hi", **{"max_new_tokens": 2, **bad})
    # one stop token id, like transformers' eos_token_id, and numpy integers are fine
    ids = run(chat.engine, [Request(chat.prepare("Hi").prompt_ids, GREEDY)])[0]
    k = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])
    expected = chat.tokenizer.decode(ids[: k + 1], skip_special_tokens=True).strip()
    for stop in (ids[k], [numpy.int64(ids[k])]):
        assert chat.chat("Hi", do_sample=False, max_new_tokens=64, ignore_eos=True, stop_token_ids=stop) == expected


def test_numpy_integer_settings_act_as_python_ints(setup):
    """seed=numpy.int64(3) (say from numpy.random) passed the checks and failed in torch's manual_seed with a bare
    TypeError ("an integer is required"), in chat and in batch_chat's seed + i."""
    chat, _ = setup
    kw = dict(do_sample=True, temperature=1.0, top_k=0)
    as_numpy = dict(seed=numpy.int64(3), max_new_tokens=numpy.int32(6), min_new_tokens=numpy.int64(2))
    as_int = {key: int(value) for key, value in as_numpy.items()}
    assert chat.chat("Hi", **kw, **as_numpy) == chat.chat("Hi", **kw, **as_int)
    assert chat.batch_chat(["Hi", "Yo"], **kw, **as_numpy) == chat.batch_chat(["Hi", "Yo"], **kw, **as_int)
    assert type(SamplingParams(**as_numpy).seed) is int
    # one numpy id for stop_token_ids was refused as "not a list of token ids" (a Python int was taken)
    greedy = dict(do_sample=False, max_new_tokens=4)
    assert chat.chat("Hi", stop_token_ids=numpy.int64(5), **greedy) == chat.chat("Hi", stop_token_ids=5, **greedy)
    for bad in ([1.0], True):  # as given, not as the tuple it was turned into ("got (1.0,)")
        said = re.escape(repr(bad))
        with pytest.raises(InputError, match=f"^stop_token_ids must be a list of token ids, got {said}$"):
            chat.chat("Hi", stop_token_ids=bad, **greedy)


def test_stop_token_ids_outside_the_vocabulary_are_refused(setup):
    """An id the model does not have could never stop anything (another model's <|im_end|>, say Qwen2's 151645
    given to a model of another tokenizer): it was taken silently, and the answer ran on; the server said so."""
    chat, _ = setup
    vocab = chat.model.config.llm.vocab_size
    for ids in ([vocab], [3, -1]):
        with pytest.raises(InputError, match=rf"^stop_token_ids must be in 0..{vocab - 1}, got \[{ids[-1]}\]$"):
            chat.chat("Hi", max_new_tokens=2, stop_token_ids=ids)
    ids, last = chat.prepare("Hi").prompt_ids, dict(max_new_tokens=3, logit_bias={vocab - 1: 100.0})  # drawn always
    assert run(chat.engine, [Request(ids, SamplingParams(**last))])[0] == [vocab - 1] * 3
    assert run(chat.engine, [Request(ids, SamplingParams(stop_token_ids=(vocab - 1,), **last))])[0] == [vocab - 1]


def test_input_settings_of_the_wrong_type_are_refused_by_name(setup):
    """These raised a bare TypeError from deep inside (max_num as a string or a per-image list, a float
    num_segments, a string max_pixels, a non-string system message, a string num_patches_list)."""
    chat, _ = setup
    image, size = Image.new("RGB", (60, 40), "red"), chat.config.image_size
    cases = [(dict(images=image, max_num="2"), "max_num"), (dict(images=image, max_num=0), "max_num"),
             (dict(images=[image, image], max_num=[1, "2"]), "max_num"),
             (dict(video=[image, image], num_segments=2.5), "num_segments"),
             (dict(video=[image, image], num_segments="2"), "num_segments"),
             (dict(video=[image, image], num_segments=True), "num_segments"),  # was one frame
             (dict(images=image, max_pixels="1000"), "max_pixels"), (dict(system_message=5), "system message"),
             (dict(images=torch.zeros(2, 3, size, size), num_patches_list="11"), "num_patches_list")]
    for kwargs, name in cases:
        with pytest.raises(InputError, match=name):
            chat.chat("Hi", max_new_tokens=2, **kwargs)
    assert chat.prepare("Hi", [image, image], max_num=[1, 2]).num_patches_list[0] == 1  # one max_num per image


def test_top_p_one_keeps_every_token_despite_rounding():
    logits = torch.cat([torch.tensor([[30.0]]), torch.full((1, 151673), -30.0)], dim=1)
    assert filter_top_k_top_p(logits, torch.tensor([0]), torch.tensor([1.0])).isfinite().all()



def test_a_tiny_top_p_keeps_the_most_likely_token():
    """However small top_p, the most likely token stays (transformers' min_tokens_to_keep=1): its cut 1 - top_p
    rounds to 1 in fp32, which the whole sum reaches, and without that rule every token went and sampling read NaN."""
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    kept = filter_top_k_top_p(logits, torch.tensor([0]), torch.tensor([1e-9], dtype=torch.float64))
    assert kept.isfinite().tolist() == [[False, True, False, False]]
    noise = exponential_noise([make_generator(0, "cpu")], 4, "cpu")
    assert choose_tokens(logits, torch.tensor([False]), torch.tensor([1.0]), torch.tensor([0]),
                         torch.tensor([1e-9], dtype=torch.float64), noise).tolist() == [1]

def test_the_earliest_of_several_stop_strings_cuts():
    class WordTokenizer:  # id 0 decodes to the whole word "image"
        def stream_decoder(self, skip_special_tokens=True):
            return type("Decoder", (), {"feed": lambda self, token: "image", "flush": lambda self: ""})()

    assert TextAssembler(WordTokenizer(), stop=("g", "m")).feed(0) == ("i", True)
    assert TextAssembler(CharTokenizer(), stop=("g", "m")).feed(ord("i")) == ("i", False)


def test_context_rule_is_the_same_for_every_max_new_tokens(checkpoint, tmp_path):
    folder = tmp_path / "short"
    shutil.copytree(checkpoint[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["max_position_embeddings"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    short = InternVLChat.from_pretrained(folder, dtype=torch.float32)
    ids = short.prepare("Describe").prompt_ids
    for new in (1, 100 - len(ids), 99, 100, 10_000):  # max_new_tokens is a cap; the context is the other one
        params = SamplingParams(max_new_tokens=new, ignore_eos=True)
        assert len(run(short.engine, [Request(ids, params)])[0]) == min(new, 100 - len(ids))
    with pytest.raises(InputError, match=r"longer than the context allows: at most 99$"):
        short.chat("word " * 100, max_new_tokens=1)


def test_preprocessed_tiles_as_one_tensor_or_one_per_image(setup):
    chat, _ = setup
    size = chat.config.image_size
    a, b = torch.randn(2, 3, size, size), torch.randn(1, 3, size, size)
    kw = dict(max_new_tokens=6, do_sample=False)
    listed = chat.prepare("Compare", [a, b])
    joined = chat.prepare("Compare", torch.cat([a, b]), num_patches_list=[2, 1])
    assert listed.prompt_ids == joined.prompt_ids and listed.num_patches_list == [2, 1]
    assert torch.equal(listed.pixel_values, joined.pixel_values)
    assert chat.chat("Compare", [a, b], **kw) == chat.chat("Compare", torch.cat([a, b]), num_patches_list=[2, 1], **kw)
    with pytest.raises(InputError, match="shape"):
        chat.prepare("Compare", [torch.randn(3, size, size)])
    with pytest.raises(InputError, match="all as preprocessed"):
        chat.prepare("Compare", [a, Image.new("RGB", (20, 20))])
    # beside files, PIL images or no images, num_patches_list must be what they get (it was ignored)
    picture = Image.new("RGB", (size, size))
    tiles = chat.prepare("Compare", [picture]).num_patches_list
    assert chat.prepare("Compare", [picture], num_patches_list=tiles).num_patches_list == tiles
    assert chat.prepare("Hi", None, num_patches_list=[]).pixel_values is None  # as the official passes it
    with pytest.raises(InputError, match=r"num_patches_list \[5\] does not match the tiles of the images"):
        chat.prepare("Compare", [picture], num_patches_list=[5])
    with pytest.raises(InputError, match=r"num_patches_list \[2\] given without images"):
        chat.chat("Hi", num_patches_list=[2], **kw)
    with pytest.raises(InputError, match="given without images"):
        chat.batch_chat(["Hi", "Ho"], num_patches_list=[1, 1], **kw)
    # tile budgets and the pixel limit shape files and PIL images; beside tiles made already they were ignored
    for setting in (dict(max_num=1), dict(total_max_num=2), dict(max_pixels=100)):
        with pytest.raises(InputError, match=rf"^{next(iter(setting))} applies to files and PIL images; "
                                             "pixel_values are tiles made already"):
            chat.chat("Compare", [a, b], **setting, **kw)
        with pytest.raises(InputError, match="pixel_values are tiles made already"):
            chat.batch_chat(["First", "Second"], torch.cat([a, b]), num_patches_list=[2, 1], **setting, **kw)


def test_numpy_settings_per_image_max_num_with_a_budget_and_eager_stream_checks(setup):
    """Four inputs that failed deep inside: NumPy floats for temperature, top_p and repetition_penalty passed the
    settings' check and then could not be written into the engine's tensors (TypeError); one pixel_values tensor
    with num_patches_list [] met min() of an empty list (ValueError); a per-image max_num list beside
    total_max_num failed building the error hint whenever an image took more than one tile, even for a prompt
    that fits (TypeError); stream_chat checked stop and bias ids only at its first piece."""
    np = numpy
    chat, _ = setup
    size = chat.config.image_size
    kw = dict(max_new_tokens=6, seed=3)
    for name, value in (("temperature", 0.7), ("top_p", 0.9), ("repetition_penalty", 1.1)):
        assert chat.chat("Hi", **{name: np.float32(value)}, **kw) == chat.chat("Hi", **{name: float(np.float32(value))},
                                                                                **kw)
        assert isinstance(getattr(SamplingParams(**{name: np.float64(value)}), name), float)
    assert chat.batch_chat(["Hi"], temperature=np.float64(0.7), **kw) == [chat.chat("Hi", temperature=0.7, **kw)]
    with pytest.raises(InputError, match=r"^num_patches_list \[\] splits the 2 tiles given into no image"):
        chat.chat("Hi", pixel_values=torch.randn(2, 3, size, size), num_patches_list=[], **kw)
    wide = Image.new("RGB", (2 * size, size))  # 2 tiles and the thumbnail at max_num 2
    listed = chat.prepare("Compare", [wide, wide], max_num=[2, 2], total_max_num=4)
    assert listed.num_patches_list == [3, 3] == chat.prepare("Compare", [wide, wide], max_num=2).num_patches_list
    stream = None
    with pytest.raises(InputError, match="stop_token_ids must be in"):
        stream = chat.stream_chat("Hi", stop_token_ids=[10**9], **kw)
    with pytest.raises(InputError, match="logit_bias token ids must be in"):
        stream = chat.stream_chat("Hi", logit_bias={10**9: 1.0}, **kw)
    assert stream is None


def test_images_take_the_tiles_of_the_configs_dynamic_image_size_unless_max_num_is_given(checkpoint, tmp_path):
    """A config.json with dynamic_image_size false (what a config without the key means to the official
    InternVLChatConfig) gives each image one tile, resized whole, as vLLM and the official demo tile it;
    an explicit max_num still tiles. It was tiled to max_dynamic_patch whatever the key said."""
    folder = shutil.copytree(checkpoint[0], tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    size = config["vision_config"]["image_size"]
    wide = Image.new("RGB", (4 * size, size))
    assert InternVLChat.from_pretrained(folder, dtype=torch.float32).prepare("Hi", [wide]).num_patches_list == [5]
    (folder / "config.json").write_text(json.dumps({**config, "dynamic_image_size": False}))
    chat = InternVLChat.from_pretrained(folder, dtype=torch.float32)
    assert chat.prepare("Hi", [wide]).num_patches_list == [1]  # 4 x 1 tiles and a thumbnail before
    assert chat.prepare("Hi", [wide], max_num=4).num_patches_list == [5]


def test_a_tile_count_below_one_in_chat_is_named(setup):
    """chat's num_patches_list [0, 2] for two tiles said "does not add up to the 2 tiles given", which they do;
    a count of 0 (a question without an image) belongs to batch_chat."""
    chat, _ = setup
    size = chat.config.image_size
    for counts, shown in (([0, 2], r"\[0, 2\]"), ([-1, 3], r"\[-1, 3\]")):
        with pytest.raises(InputError, match=rf"^num_patches_list {shown}: an image takes 1 tile at least "
                                             r"\(a 0 asks a question without an image only in batch_chat\)$"):
            chat.chat("Compare", torch.randn(2, 3, size, size), num_patches_list=counts, max_new_tokens=1)


def test_batch_chat_takes_the_official_concatenated_pixel_values(setup):
    chat, _ = setup
    size = chat.config.image_size
    a, b = torch.randn(2, 3, size, size), torch.randn(1, 3, size, size)
    kw = dict(max_new_tokens=6, do_sample=False)
    official = chat.batch_chat(["First", "Second"], torch.cat([a, b]), num_patches_list=[2, 1], **kw)
    assert official == chat.batch_chat(["First", "Second"], [a, b], **kw)
    # a count of 0: that question has no image
    assert chat.batch_chat(["First", "Second"], a, num_patches_list=[0, 2], **kw) == \
        [chat.chat("First", **kw), chat.chat("Second", a, **kw)]
    with pytest.raises(InputError, match="num_patches_list"):
        chat.batch_chat(["First", "Second"], torch.cat([a, b]), **kw)
    with pytest.raises(InputError, match="one entry per question"):
        chat.batch_chat(["First"], "picture.png", **kw)
    # with a list (one entry per question) num_patches_list has nothing to split: refused, not misapplied
    # to each question's tensor ("does not add up") or ignored for its files
    for images in ([a, b], [Image.new("RGB", (size, size)), None]):
        with pytest.raises(InputError, match="num_patches_list goes with one pixel_values tensor"):
            chat.batch_chat(["First", "Second"], images, num_patches_list=[2, 1], **kw)
    # the official keywords, at their defaults, are taken; history is refused as the official refuses it
    assert chat.batch_chat(["First"], history=None, return_history=False, **kw) == [chat.chat("First", **kw)]
    for bad in (dict(history=[("Hi", "Hello")]), dict(return_history=True)):
        with pytest.raises(InputError, match="batch_chat answers independent questions: no history"):
            chat.batch_chat(["First"], **bad, **kw)


def test_batch_chat_takes_the_official_image_counts(setup):
    """The official batch_chat still takes `image_counts`, the old name of num_patches_list; it was
    refused as an unknown generation setting."""
    chat, _ = setup
    size = chat.config.image_size
    pixels = torch.randn(3, 3, size, size)
    kw = dict(max_new_tokens=6, do_sample=False)
    assert chat.batch_chat(["First", "Second"], pixel_values=pixels, image_counts=[2, 1], **kw) == \
        chat.batch_chat(["First", "Second"], pixel_values=pixels, num_patches_list=[2, 1], **kw)
    with pytest.raises(InputError, match="image_counts is the official batch_chat's old name of num_patches_list"):
        chat.batch_chat(["First", "Second"], pixel_values=pixels, image_counts=[2, 1], num_patches_list=[2, 1], **kw)


def test_malformed_questions_history_and_tile_counts_are_refused_by_name(setup):
    """A tile count list that is not whole numbers of at least 0 (one tile count per question) raised
    TypeError in batch_chat, or split the tiles wrongly ([3, -1]); so did a num_patches_list that is
    one number in chat(), a history that is not a list and questions that are not a list."""
    chat, _ = setup
    size = chat.config.image_size
    pixels = torch.randn(2, 3, size, size)
    kw = dict(max_new_tokens=2, do_sample=False)
    for counts in ([1.5, 0.5], "11", 2, [True, True], [3, -1]):
        with pytest.raises(InputError, match="num_patches_list"):
            chat.batch_chat(["First", "Second"], pixel_values=pixels, num_patches_list=counts, **kw)
    with pytest.raises(InputError, match=r"num_patches_list must be a list of whole tile counts, got 2"):
        chat.chat("First", pixel_values=pixels, num_patches_list=2, **kw)
    # any sequence of whole numbers will do, numpy's included
    assert chat.batch_chat(["First", "Second"], pixel_values=pixels, num_patches_list=numpy.array([1, 1]), **kw) == \
        chat.batch_chat(["First", "Second"], pixel_values=pixels, num_patches_list=[1, 1], **kw)
    assert chat.prepare("First", pixels, num_patches_list=numpy.array([1, 1])).num_patches_list == [1, 1]
    with pytest.raises(InputError, match=r"num_patches_list .* given without images"):
        chat.prepare("First", num_patches_list=numpy.array([1, 1]))
    with pytest.raises(InputError, match=r"history must be a list of \(question, answer\) pairs, got int"):
        chat.chat("First", history=5, **kw)
    with pytest.raises(InputError, match="questions must be a list of strings, got NoneType"):
        chat.batch_chat(None, **kw)
    assert chat.batch_chat((q for q in ["First"]), **kw) == [chat.chat("First", **kw)]  # any iterable will do
    # the official argument order without the tokenizer says how to write it here
    with pytest.raises(InputError, match=r"got Tensor; the official batch_chat\(tokenizer, pixel_values, questions, "
                                         r"generation_config\) is batch_chat\(questions, pixel_values=pixel_values"):
        chat.batch_chat(pixels, ["First", "Second"], **kw)


def test_verbose_prints_the_prompt_with_images_as_placeholders_and_the_answer(setup, capsys):
    """The official chat(verbose=True) prints the query, image tokens collapsed to <image>, and the response."""
    chat, _ = setup
    size = chat.config.image_size
    kw = dict(max_new_tokens=6, do_sample=False)
    answer = chat.chat("What is it?", torch.randn(2, 3, size, size), verbose=True, **kw)
    printed = capsys.readouterr().out
    assert printed.count("<image>") == 1 and "<IMG_CONTEXT>" not in printed and "<img>" not in printed
    assert "<|im_start|>user\n<image>\nWhat is it?<|im_end|>" in printed and printed.rstrip().endswith(answer)
    answers = chat.batch_chat(["First", "Second"], verbose=True, **kw)
    printed = capsys.readouterr().out
    assert printed.index("First") < printed.index(answers[0]) < printed.index("Second") < printed.rindex(answers[1])
    chat.chat("Quiet", **kw)
    assert capsys.readouterr().out == ""


def test_images_may_be_passed_as_pixel_values_as_in_the_official_methods(setup):
    chat, _ = setup
    size = chat.config.image_size
    a, b = torch.randn(2, 3, size, size), torch.randn(1, 3, size, size)
    kw = dict(max_new_tokens=6, do_sample=False)
    assert chat.batch_chat(["First", "Second"], pixel_values=torch.cat([a, b]), num_patches_list=[2, 1], **kw) == \
        chat.batch_chat(["First", "Second"], [a, b], **kw)
    assert chat.chat("First", pixel_values=a, **kw) == chat.chat("First", a, **kw)
    assert "".join(chat.stream_chat("First", pixel_values=a, **kw)).strip() == chat.chat("First", a, **kw)
    with pytest.raises(InputError, match="as images= or as pixel_values=, not both"):
        chat.chat("First", a, pixel_values=a, **kw)


def test_typed_image_context_tokens_are_refused(setup):
    chat, _ = setup
    with pytest.raises(InputError, match="reserved for image features"):
        chat.prepare("what is <IMG_CONTEXT>?")


def test_chat_takes_the_pixel_limit(setup):
    chat, _ = setup
    image = Image.new("RGB", (20, 10))
    with pytest.raises(InputError, match="exceeds the limit of 100"):
        chat.prepare("What is it?", image, max_pixels=100)
    assert chat.prepare("What is it?", image, max_pixels=200).num_patches_list
    with pytest.raises(InputError, match="exceeds the limit of 100"):
        chat.chat("What is it?", image, max_pixels=100, max_new_tokens=1)


def test_stream_chat_refuses_bad_input_when_called(setup):
    chat, _ = setup
    with pytest.raises(InputError, match="unknown generation settings"):
        chat.stream_chat("hi", temprature=0.5)  # no iteration needed
    with pytest.raises(InputError, match="2 <image> placeholder"):
        chat.stream_chat("<image> and <image>", images=Image.new("RGB", (20, 20)))


def test_stream_chat_refuses_chats_history_and_verbose_with_the_way_to_keep_a_history(setup):
    """stream_chat(return_history=True) was "unknown generation settings: ['return_history']"; the history of a
    streamed answer needs the question as chat stores it, with the images' prefix, which prepare() gives."""
    chat, _ = setup
    picture = Image.new("RGB", (20, 20))
    with pytest.raises(InputError, match=r"^stream_chat takes no return_history \(chat's\): it yields the answer's "
                                         r"pieces; for a history, add \(prepare\(question, images\).question, "):
        chat.stream_chat("hi", images=picture, return_history=True)
    # verbose has nothing to do with a history: its message says what stands for it
    with pytest.raises(InputError, match=r"^stream_chat takes no verbose \(chat's\): it yields the answer's pieces; "
                                         r"print them as they come \(prepare\(question, images\) gives the prompt\)$"):
        chat.stream_chat("hi", images=picture, verbose=True)
    kw = dict(max_new_tokens=4, do_sample=False)
    answer, history = chat.chat("What is it?", images=picture, return_history=True, **kw)
    streamed = "".join(chat.stream_chat("What is it?", images=picture, **kw))
    assert [(chat.prepare("What is it?", picture).question, streamed)] == history


def test_pixel_values_that_are_not_float_tiles_are_refused(setup):
    chat, _ = setup
    size = chat.config.image_size
    raw = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8)  # unnormalised pixels, not tiles
    with pytest.raises(InputError, match="pixel_values must be floating point .* got torch.uint8"):
        chat.prepare("What is it?", raw)
    with pytest.raises(InputError, match="got torch.uint8"):
        chat.batch_chat(["What is it?"], pixel_values=raw, num_patches_list=[1], max_new_tokens=1)
    tiles = (raw.float() / 255 - 0.45) / 0.225  # normalised as load_image normalises
    assert chat.prepare("What is it?", tiles.half()).num_patches_list == [1]
    with pytest.raises(InputError, match="^pixel_values are on the meta device, which holds no values"):
        chat.prepare("What is it?", tiles.to("meta"))  # a RuntimeError from torch before


@pytest.mark.parametrize("value", [255.0, float("nan"), float("-inf")])
def test_pixel_values_no_normalised_tile_holds_are_refused(setup, value):
    """Float tiles of raw 0..255 values (a picture made a tensor without load_image's normalisation), or with
    a NaN (a division by zero), were answered from garbage image features without a word."""
    chat, _ = setup
    size = chat.config.image_size
    tiles = torch.zeros(2, 3, size, size)
    tiles[1, 2, 5, 7] = value
    message = rf"pixel_values must be tiles normalised as load_image makes them \(-2.12 to 2.64\), got a value of " \
              rf"magnitude {abs(value):g}; give raw pictures as files or PIL images"
    with pytest.raises(InputError, match=message):
        chat.chat("What is it?", pixel_values=tiles, num_patches_list=[2], max_new_tokens=1)
    with pytest.raises(InputError, match=message):
        chat.batch_chat(["What is it?", "And this?"], pixel_values=tiles, num_patches_list=[1, 1], max_new_tokens=1)
    tiles[1, 2, 5, 7] = 2.64
    assert chat.prepare("What is it?", tiles).num_patches_list == [2]


def test_the_engine_refuses_pixel_values_that_are_no_tiles_as_chat_does(setup):
    """A Request's pixel_values went into the vision encoder unchecked: NaN tiles answered token 0 at every step
    (finish "length"), uint8 tiles (a raw picture) were cast to float and answered."""
    chat, _ = setup
    prepared = chat.prepare("What is it?", Image.new("RGB", (112, 56), "blue"))
    params = SamplingParams(max_new_tokens=2)
    for tiles, message in ((prepared.pixel_values * float("nan"), "got a value of magnitude nan"),
                           ((prepared.pixel_values * 50).to(torch.uint8), "must be floating point .* got torch.uint8")):
        with pytest.raises(InputError, match=message):
            run(chat.engine, [Request(prepared.prompt_ids, params, tiles)])
    assert run(chat.engine, [Request(prepared.prompt_ids, params, prepared.pixel_values)])[0]


def test_the_engine_reads_a_requests_tiles_once(setup, monkeypatch):
    """Engine.generate checked each request, then Generation.add checked it again: two passes over the tiles
    (0.2 ms each for one tile on a 2-core CPU, part of every image prompt's prefill)."""
    from internvl_mpo.generate import engine as engine_module

    chat, _ = setup
    prepared = chat.prepare("What is it?", Image.new("RGB", (112, 56), "blue"))
    scanned = []
    real = engine_module.check_tile_values
    monkeypatch.setattr(engine_module, "check_tile_values", lambda tiles: scanned.append(tiles) or real(tiles))
    request = Request(prepared.prompt_ids, SamplingParams(max_new_tokens=2), prepared.pixel_values)
    assert run(chat.engine, [request])[0]
    assert len(scanned) == 1
    gen = chat.engine.start(1, 256)  # a request added to a running batch is checked there
    gen.add(request)
    assert len(scanned) == 2


def test_video_frames_take_the_pixel_limit(setup):
    chat, _ = setup
    frames = [Image.new("RGB", (20, 10))] * 2
    with pytest.raises(InputError, match="exceeds the limit of 100"):
        chat.prepare("What happens?", video=frames, max_pixels=100)
    assert chat.prepare("What happens?", video=frames, max_pixels=200).num_patches_list == [1] * 8


def test_video_frames_whose_tokens_alone_fill_the_context_are_refused_before_decoding(setup, monkeypatch):
    """A frame takes one tile at least (this model: 4 tokens, so 8192 frames fill its 32768-token context).
    The frames were decoded and tiled before the prompt was refused: at 448 pixels 2.4 MB a frame, so
    --num-segments 10000 ran out of memory."""
    from internvl_mpo.processor import video

    chat, _ = setup
    monkeypatch.setattr(video, "load_video", lambda *args, **kwargs: pytest.fail("the frames were decoded"))
    frames = chat.context // chat.model.num_image_token
    with pytest.raises(InputError, match=f"^num_segments={frames}: its frames take {chat.context} image tokens at "
                                         f"least, leaving no room in the model's context of {chat.context}$"):
        chat.prepare("What happens?", video=[Image.new("RGB", (8, 8))], num_segments=frames)


def refused_early(chat, lengths: tuple[int, int], hint: str):
    """The early check's error: the final check's message (prompt and image tokens), then `hint`."""
    length, image_tokens = lengths
    return pytest.raises(InputError, match="^" + re.escape(
        f"prompt is {length} tokens ({image_tokens} of them image tokens), longer than the context allows: at most "
        f"{chat.context - 1}; {hint}") + "$")


def test_images_whose_tiles_fill_the_context_are_refused_before_tiling(setup, monkeypatch, tmp_path):
    """The tile plan comes from each image's header: a 8192x1 strip with max_num 8192 plans an 8192x1 grid
    and its thumbnail (this model: 4 tokens a tile, a 32768-token context). Every image was tiled before
    the prompt was refused: at 448 pixels 2.4 MB a tile, so a long strip or several photos with a large
    max_num ran out of memory first."""
    from internvl_mpo.chat.template import build_prompt_ids
    from internvl_mpo.processor import image

    class Tiled(Exception):
        pass

    def tiled(*args, **kwargs):
        raise Tiled

    chat, _ = setup
    monkeypatch.setattr(image, "tiles_to_tensor", tiled)
    tokens = chat.model.num_image_token
    fill = chat.context // tokens
    strip = Image.new("RGB", (fill, 1))
    path = tmp_path / "strip.png"
    strip.save(path)

    def refused(question, counts):
        length = len(build_prompt_ids(chat.tokenizer, question, (), counts, num_image_token=tokens))
        shown = str(counts) if len(counts) <= 10 else str(counts[:10])[:-1] + ", ...]"
        return refused_early(chat, (length, sum(tokens * n + 2 for n in counts)),
                             f"the images take {sum(counts)} tiles ({shown} by image; a smaller max_num gives fewer)")

    with open(path, "rb") as stream:
        for source in (strip, path, path.read_bytes(), stream):
            with refused("What is this?", [fill + 1]):
                chat.prepare("What is this?", images=[source], max_num=fill)
    with refused("What is this?", [fill]):  # exactly the context: no room for the text
        chat.prepare("What is this?", images=[strip], max_num=fill - 1)
    with refused("What is this?", [fill - 1]):  # room for the image tokens, not for the text beside them
        chat.prepare("What is this?", images=[strip], max_num=fill - 2)
    with pytest.raises(Tiled):  # room for both: the images are tiled
        chat.prepare("What is this?", images=[strip], max_num=fill - 40)
    half = Image.new("RGB", (fill // 2, 1))
    with refused("What are these?", [fill // 2 + 1, fill // 2 + 1]):  # several images count together
        chat.chat("What are these?", images=[half, half], max_num=fill)
    with pytest.raises(Tiled):  # a total budget that brings them under the context
        chat.chat("What are these?", images=[half, half], max_num=fill, total_max_num=fill // 2)
    many = Image.new("RGB", (fill // 11, 1))
    with refused("What are these?", [fill // 11 + 1] * 11):
        chat.chat("What are these?", images=[many] * 11, max_num=fill)


def test_a_prompt_that_fits_exactly_is_accepted_and_one_token_more_is_refused_before_tiling(setup, monkeypatch):
    """The images' tiles planned from their headers and the text tokenized (question, history, system
    message, template) measure the prompt the final check measures: one that leaves exactly one position
    of the context for the answer is accepted, one token longer is refused with the final check's numbers
    before a tile is made (it was tiled first, 2.4 MB a tile at 448 pixels, and refused after)."""
    from internvl_mpo.chat.template import build_prompt_ids
    from internvl_mpo.errors import PromptTooLongError
    from internvl_mpo.processor import image

    chat, _ = setup
    made = []  # the images tiled
    tile = image.tiles_to_tensor
    monkeypatch.setattr(image, "tiles_to_tensor", lambda *args: made.append(args[1].num_tiles) or tile(*args))
    tokens = chat.model.num_image_token
    history = [("Hello there, who are you?", "A small model.")]
    system = "Answer briefly."

    def length(question, tiles):
        return len(build_prompt_ids(chat.tokenizer, question, history, [tiles], system, num_image_token=tokens))

    text = length("", 1) - tokens  # the ids of the prompt around one image of no tile
    tiles = (chat.context - 1 - text - 20) // tokens  # leaves 20 to 23 positions for the question
    strip = Image.new("RGB", (tiles * 10, 1))  # a (tiles - 1) x 1 grid and its thumbnail with max_num tiles - 1
    question = "Why"
    while length(question, tiles) < chat.context - 1:
        question += "!"
    assert length(question, tiles) == chat.context - 1 and length(question + "!", tiles) == chat.context
    kw = dict(history=history, max_num=tiles - 1, system_message=system)
    assert len(chat.prepare(question, [strip], **kw).prompt_ids) == chat.context - 1
    assert made == [tiles]
    with refused_early(chat, (chat.context, tokens * tiles + 2), f"the images take {tiles} tiles ([{tiles}] by image; "
                                                                  "a smaller max_num gives fewer)"):
        chat.prepare(question + "!", [strip], **kw)
    assert made == [tiles]
    with pytest.raises(PromptTooLongError) as final:  # the final check (on tiles made already) gives the same numbers
        chat.prepare(question + "!", chat.prepare(question, [strip], **kw).pixel_values, history=history,
                     system_message=system)
    assert str(final.value) == (f"prompt is {chat.context} tokens ({tokens * tiles + 2} of them image tokens), longer "
                                f"than the context allows: at most {chat.context - 1}")


def test_one_image_or_one_frame_that_does_not_fit_is_named_in_the_singular(setup, tmp_path):
    """A prompt of one 1-tile image, or a video of one frame, one token too long: the hint counts "1 tile" and "1
    frame takes" ("1 tiles", "1 frames take" before 2026-12-05)."""
    chat, _ = setup
    frame = tmp_path / "frame.png"
    Image.new("RGB", (32, 32)).save(frame)
    question = "Why" + "!" * (chat.context - len(chat.prepare("Why", [frame]).prompt_ids))
    with pytest.raises(InputError, match=re.escape("; the images take 1 tile ([1] by image; 1 tile each, ")):
        chat.prepare(question, [frame])
    video_question = "Why" + "!" * (chat.context - len(chat.prepare("Why", video=[frame], num_segments=1).prompt_ids))
    with pytest.raises(InputError, match=re.escape("; the video's 1 frame takes 1 tile (a smaller num_segments ")):
        chat.prepare(video_question, video=[frame], num_segments=1)


def test_video_frames_tiled_with_max_num_are_counted_before_decoding(setup, monkeypatch, tmp_path):
    """With max_num > 1 each frame takes the tiles its size plans (a 2:1 frame with max_num 2: 2 and a
    thumbnail), counted from the frames' headers with the prompt's text before a frame is decoded. Only one
    tile a frame was counted: these frames were decoded and tiled, then refused."""
    from internvl_mpo.chat.template import build_prompt_ids
    from internvl_mpo.processor import video

    chat, _ = setup
    decoded = []
    load = video.load_video
    monkeypatch.setattr(video, "load_video", lambda *args, **kwargs: decoded.append(1) or load(*args, **kwargs))
    tokens = chat.model.num_image_token
    frames = []
    for k in range(3):
        frames.append(tmp_path / f"frame{k}.png")
        Image.new("RGB", (112, 56), (k, 0, 0)).save(frames[-1])
    count = 2000
    question = "".join(f"Frame{k + 1}: <image>\n" for k in range(count)) + "What happens?"
    one, length = (len(build_prompt_ids(chat.tokenizer, question, (), [n] * count, num_image_token=tokens))
                   for n in (1, 3))
    assert count * tokens < one < chat.context <= length  # one tile a frame fits, three do not
    hint = f"the video's {count} frames take {3 * count} tiles (a smaller num_segments or max_num gives fewer)"
    for source in (frames, tmp_path):
        with refused_early(chat, (length, (3 * tokens + 2) * count), hint):
            chat.prepare("What happens?", video=source, num_segments=count, max_num=2)
    assert not decoded
    assert chat.prepare("What happens?", video=tmp_path, num_segments=count // 2, max_num=2).num_patches_list == (
        [3] * (count // 2))
    assert len(chat.prepare("What happens?", video=frames, num_segments=count).prompt_ids) == one


def test_max_num_tiles_each_video_frame_as_the_official_load_video(setup):
    """The card's load_video(max_num=1) tiles each frame with dynamic_preprocess(max_num); max_num beside a
    video was ignored without a word, as were total_max_num and num_patches_list."""
    from internvl_mpo.processor.image import image_to_pixel_values
    from internvl_mpo.processor.video import load_video

    chat, _ = setup
    size = chat.config.image_size
    frames = [Image.new("RGB", (2 * size, size), (40 * i, 0, 0)) for i in range(3)]
    assert chat.prepare("What happens?", video=frames, num_segments=3).num_patches_list == [1] * 3
    prepared = chat.prepare("What happens?", video=frames, num_segments=3, max_num=2)
    tiles = image_to_pixel_values(frames[0], max_num=2, image_size=size)
    assert prepared.num_patches_list == [tiles.shape[0]] * 3 == [3] * 3  # 2 tiles and the thumbnail
    assert torch.equal(prepared.pixel_values[:3], tiles)
    clip = load_video(frames, num_segments=3, image_size=size)
    with pytest.raises(InputError, match=r"max_num: the video is decoded already; pass it to load_video"):
        chat.prepare("What happens?", video=clip, max_num=2)
    for setting in (dict(total_max_num=4), dict(num_patches_list=[1, 1, 1])):
        with pytest.raises(InputError, match=f"{next(iter(setting))} applies to images, not to a video"):
            chat.prepare("What happens?", video=frames, num_segments=3, **setting)
    # num_segments beside a decoded clip was ignored (its frames answered), and beside images too
    assert chat.prepare("What happens?", video=clip, num_segments=3).num_patches_list == [1] * 3
    with pytest.raises(InputError, match=r"^num_segments=5: the video is decoded already, 3 frames; pass it to "
                                         r"load_video$"):
        chat.prepare("What happens?", video=clip, num_segments=5)
    with pytest.raises(InputError, match=r"^num_segments applies to a video \(the frames sampled from it\), not to "
                                         r"images$"):
        chat.prepare("What is it?", [frames[0]], num_segments=3)
    with pytest.raises(InputError, match=r"^batch_chat takes no video \(as the official batch_chat\); ask about a "
                                         r"video with chat\(\)$"):
        chat.batch_chat(["What happens?"], video=frames)


def test_the_model_cards_generation_config_dict_is_taken(setup):
    """Card code passes its settings as generation_config=dict(max_new_tokens=1024, do_sample=True)."""
    chat, _ = setup
    size = chat.config.image_size
    pixels = torch.randn(2, 3, size, size)
    config = dict(max_new_tokens=6, do_sample=False)
    assert chat.chat("First", pixel_values=pixels, generation_config=config) == chat.chat("First", pixels, **config)
    assert "".join(chat.stream_chat("First", generation_config=config)).strip() == chat.chat("First", **config)
    both = dict(pixel_values=pixels, num_patches_list=[1, 1])
    assert chat.batch_chat(["First", "Second"], **both, generation_config=config) == \
        chat.batch_chat(["First", "Second"], **both, **config)
    with pytest.raises(InputError, match=r"\['max_new_tokens'\] given in generation_config and as a keyword"):
        chat.chat("First", generation_config=config, max_new_tokens=3)
    # The card's argument order (without the tokenizer), or its settings in video='s place, say what to write.
    with pytest.raises(InputError, match=r"is chat\(question, pixel_values=pixel_values, generation_config="):
        chat.chat(pixels, "<image>\nFirst", config)
    with pytest.raises(InputError, match="got a dict; pass generation settings as keywords or as generation_config="):
        chat.chat("First", None, config)


def test_a_setting_given_as_none_beside_generation_config_is_not_set(setup):
    """None is "not set" (README): a wrapper's max_new_tokens=None beside the card's generation_config dict, or a
    None in the dict beside a keyword, takes the other value, where it was refused as given twice."""
    chat, _ = setup
    config = dict(max_new_tokens=6, do_sample=False)
    expected = chat.chat("First", **config)
    assert chat.chat("First", generation_config=config, max_new_tokens=None) == expected
    assert chat.chat("First", generation_config=dict(config, max_new_tokens=None), max_new_tokens=6) == expected
    assert "".join(chat.stream_chat("First", generation_config=config, seed=None)) == expected
    assert chat.batch_chat(["First"], generation_config=config, temperature=None) == [expected]
    with pytest.raises(InputError, match=r"\['top_k'\] given in generation_config and as a keyword"):
        chat.chat("First", generation_config=dict(config, top_k=5), top_k=None)  # None turns top-k off: a setting


def test_answers_as_they_finish_refills_freed_rows_and_pulls_jobs_lazily(setup):
    """Two rows, one long job and three short ones: each short one takes the row the last one freed
    while the long one runs on (chunks of two would make C and D wait for A), every job is pulled
    only when a row can take it, and each answer equals the same question asked alone."""
    from internvl_mpo.errors import InputError
    from internvl_mpo.generate.params import sampling_params

    chat, _ = setup
    lengths = {"A": 30, "B": 3, "C": 3, "D": 3}
    log, failed = [], InputError("no such image")

    def jobs():
        for key, n in lengths.items():
            log.append(f"pull {key}")
            yield key, chat.prepare(f"Question {key}"), sampling_params(do_sample=False, max_new_tokens=n,
                                                                         ignore_eos=True)
            if key == "B":
                yield "bad", failed, sampling_params()

    answers = {}
    for key, answer in chat.answers_as_they_finish(jobs(), batch_size=2):
        log.append(f"answer {key}")
        answers[key] = answer
    assert log == ["pull A", "pull B", "answer B", "answer bad", "pull C", "answer C", "pull D", "answer D",
                   "answer A"]
    assert answers.pop("bad") is failed  # a job's error is its answer, as given
    for key, n in lengths.items():
        assert answers[key] == chat.chat(f"Question {key}", max_new_tokens=n, ignore_eos=True, do_sample=False)


def test_answers_as_they_finish_gives_a_job_too_long_for_the_running_cache_a_new_one(setup):
    from internvl_mpo.generate.params import sampling_params

    chat, _ = setup
    short, long = (sampling_params(do_sample=False, max_new_tokens=n, ignore_eos=True) for n in (4, 300))
    jobs = [("short 1", chat.prepare("One"), short), ("short 2", chat.prepare("Two"), short),
            ("long", chat.prepare("Three"), long), ("short 3", chat.prepare("Four"), short)]
    started = []
    engine_start = chat.engine.start

    class Spy:  # records the caches the method asks for
        def __getattr__(self, name):
            return getattr(chat.engine, name)

        def start(self, max_batch, max_len):
            started.append((max_batch, max_len))
            return engine_start(max_batch, max_len)

    chat.engine, real = Spy(), chat.engine
    try:
        answers = dict(chat.answers_as_they_finish(jobs, batch_size=2))
    finally:
        chat.engine = real
    assert started == [(2, 256), (2, 512)]  # the long job waited for the first batch to finish
    assert answers["long"] == chat.chat("Three", max_new_tokens=300, ignore_eos=True, do_sample=False)
    assert answers["short 3"] == chat.chat("Four", max_new_tokens=4, ignore_eos=True, do_sample=False)


def test_answers_as_they_finish_gives_its_next_batch_a_compiled_engines_buffers(setup):
    """A compiled engine lends its buffers to one live Generation at a time: the batch a long job waits for
    is started after the finished one is dropped, so it takes them (not buffers of its own at new addresses)."""
    from internvl_mpo.generate.params import sampling_params

    chat, _ = setup
    bot = InternVLChat(chat.model, chat.tokenizer)
    seen = static_inputs_recorder(bot.engine)
    short, long = (sampling_params(do_sample=False, max_new_tokens=n, ignore_eos=True) for n in (4, 300))
    jobs = [("short", chat.prepare("One"), short), ("long", chat.prepare("Three"), long)]
    assert len(dict(bot.answers_as_they_finish(jobs, batch_size=1))) == 2
    assert {shape for shape, _, _ in seen} == {(1, 256), (1, 512)}
    assert seen[-1][1][0] == bot.engine._storages._storages[-1].data_ptr()  # the mask is made last


def test_answers_as_they_finish_cuts_each_job_at_its_own_stop_strings(setup):
    """Each job is cut at its own SamplingParams.stop (it was ignored for a stop list given beside the jobs)."""
    from internvl_mpo.generate.params import sampling_params

    chat, _ = setup
    kw = dict(do_sample=False, max_new_tokens=20, ignore_eos=True)
    full = chat.chat("Question A", **kw)
    stop = full[len(full) // 2 :][:2]
    assert stop.strip() and full.find(stop) > 0
    jobs = [("own", chat.prepare("Question A"), sampling_params(stop=stop, **kw)),
            ("none", chat.prepare("Question A"), sampling_params(**kw))]
    answers = dict(chat.answers_as_they_finish(jobs, batch_size=2))
    assert answers == {"own": full[: full.find(stop)].strip(), "none": full}
    assert chat.answer_prepared([(p, params) for _, p, params in jobs]) == [answers["own"], full]


def test_answers_as_they_finish_refuses_a_batch_size_below_one(setup):
    """batch_size=0 returned no answers at all, silently."""
    from internvl_mpo.generate.params import sampling_params

    chat, _ = setup
    jobs = [("a", chat.prepare("Question A"), sampling_params(max_new_tokens=2))]
    for bad in (0, -1, 1.5):
        with pytest.raises(InputError, match="batch_size must be a whole number of at least 1"):
            list(chat.answers_as_they_finish(jobs, batch_size=bad))


def test_answers_are_cut_where_the_end_of_turn_text_is_spelled_in_ordinary_tokens(setup):
    """The official chat() decodes without special tokens, then cuts at the text "<|im_end|>"; a
    model that spelled it in ordinary tokens ("<|im" + "_end|>") kept it and what followed."""
    chat, _ = setup
    tok = chat.tokenizer
    tokens = tok.encode("Yes.") + tok.encode("<|im") + tok.encode("_end|>") + tok.encode(" more")
    assert tok.im_end_id not in tokens and "<|im_end|>" in tok.decode(tokens, skip_special_tokens=True)
    chat.engine, real = ScriptedEngine(tokens), chat.engine
    try:
        assert chat.chat("Hi") == "Yes."
        assert "".join(chat.stream_chat("Hi")) == "Yes."
        assert chat.batch_chat(["Hi", "Ho"]) == ["Yes.", "Yes."]
        assert chat.chat("Hi", ignore_eos=True) == "Yes.<|im_end|> more"  # ignore_eos goes past it, as past the token
    finally:
        chat.engine = real


@pytest.mark.parametrize("text, kw", [
    ("Two lines:\n first\n\nsecond  \n\n", {}),  # cut at max_new_tokens right after newlines
    ("  \n Lead and trail \t", {}),
    ("Yes. STOP more", dict(stop="STOP")),  # a stop string leaves the space before it
    ("Yes. \n<|im_end|>\n more", {}),  # as does the end of turn spelled in ordinary tokens
    (" 熊猫 🐼  \n", {}),  # characters of several byte tokens each
    ("熊猫 🐼 end", dict(stop="🐼")),
])
def test_stream_chat_joined_is_exactly_the_answer(setup, text, kw):
    """stream_chat yielded the answer's trailing whitespace, which chat() strips: a caller that
    printed or stored the joined stream got a different answer (a blank line, a space); batch_chat strips too."""
    chat, _ = setup
    chat.engine, real = ScriptedEngine([t for piece in text for t in chat.tokenizer.encode(piece)]), chat.engine
    try:
        answer = chat.chat("Hi", **kw)
        assert answer == answer.strip() and answer
        pieces = list(chat.stream_chat("Hi", **kw))
        assert "".join(pieces) == answer and all(pieces) and "\ufffd" not in answer
        assert chat.batch_chat(["Hi", "Ho"], **kw) == [answer, answer]  # stripped the same way
    finally:
        chat.engine = real



def test_answers_as_they_finish_raises_a_failing_decode_step(setup, monkeypatch):
    """A decode step that fails fails every running row: answers_as_they_finish raises it, where a prompt that
    fails alone comes back as its own answer."""
    chat, _ = setup

    def broken(*args):
        raise RuntimeError("the decode step broke")

    monkeypatch.setattr(chat.engine, "_decode_fn", broken)
    prepared = chat.prepare("Hi")
    jobs = [(k, prepared, SamplingParams(max_new_tokens=4, ignore_eos=True)) for k in range(2)]
    with pytest.raises(RuntimeError, match="^the decode step broke$"):
        list(chat.answers_as_they_finish(jobs, batch_size=2))

def test_answers_as_they_finish_gives_a_prompt_that_fails_in_the_engine_its_error_and_goes_on(setup, monkeypatch):
    """A prefill that raises (out of memory on a large image, say) fails its own job only: it comes back
    as that job's answer, so `generate` writes an error line and goes on (it stopped the whole run,
    and a resumed run met the same request again)."""
    from internvl_mpo.generate.params import sampling_params

    chat, _ = setup
    params = sampling_params(do_sample=False, max_new_tokens=6)
    jobs = [(key, chat.prepare(f"Question {key}"), params) for key in "ABC"]
    prefill = chat.engine.prefill

    def failing(request, caches, row):
        if request.prompt_ids == jobs[1][1].prompt_ids:
            raise RuntimeError("out of memory")
        return prefill(request, caches, row)

    monkeypatch.setattr(chat.engine, "prefill", failing)
    answers = dict(chat.answers_as_they_finish(jobs, batch_size=2))
    monkeypatch.undo()
    assert isinstance(answers["B"], RuntimeError) and str(answers["B"]) == "out of memory"
    for key in "AC":
        assert answers[key] == chat.chat(f"Question {key}", max_new_tokens=6, do_sample=False)


# ---- min_new_tokens -----------------------------------------------------------------------

def _stop_first(chat, question, images=None):
    """A prompt and, as its stop id, the first token its greedy answer takes: without a minimum it stops at once."""
    ids, pixels = prompt(chat, question, images)
    return ids, pixels, run(chat.engine, [Request(ids, GREEDY, pixels)])[0][0]


@pytest.mark.parametrize("screen", [False, True])
def test_min_new_tokens_equals_transformers(setup, screen):
    """Greedy tokens under min_new_tokens equal transformers' generate(min_new_tokens=...), whose stop id
    (the greedy first token here) is masked for the first N tokens; the screen gives that stop id as its
    argmax, so the screened engine must fall back to the masked full head."""
    chat, ref = setup
    ids, pixels, stop = _stop_first(chat, "Describe it.", Image.new("RGB", (100, 50), "red"))
    engine = Engine(chat.model, chat.engine.stop_token_ids, screen=screen)
    for n in (0, 1, 4):
        params = SamplingParams(max_new_tokens=STEPS, min_new_tokens=n, ignore_eos=True, stop_token_ids=(stop,))
        ours = run(engine, [Request(ids, params, pixels)])[0]
        with torch.no_grad():
            out = ref.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               pixel_values=pixels, max_new_tokens=STEPS, min_new_tokens=n, do_sample=False,
                               eos_token_id=stop, pad_token_id=0)
        assert ours == out[0, len(ids):].tolist(), n
        assert stop not in ours[:n] and (ours[-1] == stop or len(ours) == STEPS)
    assert ours[0] != stop and len(ours) > 4


def test_min_new_tokens_holds_for_rows_of_different_progress(setup):
    """A row under its minimum beside rows past theirs (joined later, sampled, penalised): each gets the
    tokens it gets alone, and only the rows under their minimum have the stop id masked."""
    chat, _ = setup
    ids, _, stop = _stop_first(chat, "Hello there")
    held = SamplingParams(max_new_tokens=12, min_new_tokens=6, ignore_eos=True, stop_token_ids=(stop,))
    free = dataclasses.replace(held, min_new_tokens=0)
    sampled = dataclasses.replace(held, do_sample=True, temperature=0.05, top_k=0, seed=3)
    penalised = dataclasses.replace(held, repetition_penalty=1.2)
    alone = {p: run(chat.engine, [Request(ids, p)])[0] for p in (held, free, sampled, penalised)}
    assert alone[free] == [stop] and alone[sampled][0] != stop and stop not in alone[held][:6]
    gen = chat.engine.start(max_batch=4, max_len=128)
    order = [held, free, sampled, penalised]
    got = {gen.add(Request(ids, order[0])): []}
    steps = 0
    while gen:
        for e in gen.step():
            got[e.rid].append(e.token)
        steps += 1
        if steps in (2, 3, 4):  # join while the first row is partway to its minimum
            got[gen.add(Request(ids, order[steps - 1]))] = []
    assert [got[i] for i in range(4)] == [alone[p] for p in order]


def test_min_new_tokens_masks_sampled_rows(setup):
    """A sampled row at a low temperature would take the stop id first almost always; under a minimum of
    5 it never takes it among its first 5 tokens, whatever the seed."""
    chat, _ = setup
    ids, _, stop = _stop_first(chat, "Hello there")
    base = SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.01, top_k=0, ignore_eos=True,
                          stop_token_ids=(stop,))
    free = [run(chat.engine, [Request(ids, dataclasses.replace(base, seed=s))])[0] for s in range(6)]
    assert sum(out == [stop] for out in free) >= 4
    held = run(chat.engine, [Request(ids, dataclasses.replace(base, seed=s, min_new_tokens=5)) for s in range(6)])
    for out in held.values():
        assert stop not in out[:5] and len(out) >= 6


def test_min_new_tokens_is_checked():
    for bad in (-1, 9, 2.0, True):
        with pytest.raises(InputError, match="min_new_tokens"):
            SamplingParams(max_new_tokens=8, min_new_tokens=bad)
    assert SamplingParams(max_new_tokens=8, min_new_tokens=8).min_new_tokens == 8


def test_stop_strings_count_only_after_min_new_tokens():
    """vLLM's min_tokens with stop strings (its test_min_tokens_with_stop): a stop string that ends in
    the text of the first min_tokens tokens does not cut; one that ends later does, also when it began
    earlier; the end-of-turn text cuts everywhere."""
    def feed(text, stop=(), min_tokens=0, end=()):
        texts = TextAssembler(CharTokenizer(), stop, min_tokens, end)
        out = ""
        for i, c in enumerate(text):
            piece, stopped = texts.feed(ord(c), last=i == len(text) - 1)
            out += piece
            if stopped:
                return out, True
        return out, False

    assert feed("ab e cd e f", ("e",)) == ("ab ", True)
    assert feed("ab e cd e f", ("e",), min_tokens=4) == ("ab e cd ", True)
    assert feed("abEND", ("END",), min_tokens=3) == ("ab", True)  # begins inside the minimum, ends after it
    assert feed("ENDab", ("END",), min_tokens=3) == ("ENDab", False)
    assert feed("aXb", ("X",), min_tokens=2, end=("b",)) == ("aX", True)
    assert feed("aXb", ("X",), min_tokens=3, end=("a",)) == ("", True)


def test_chat_takes_min_new_tokens(setup):
    """chat(min_new_tokens=N): with the first greedy token as a stop id the answer is that token; with a
    minimum it is the text of the engine's tokens under that minimum."""
    chat, _ = setup
    ids, _, stop = _stop_first(chat, "Hi")
    kw = dict(do_sample=False, max_new_tokens=16, stop_token_ids=stop)
    assert chat.chat("Hi", **kw) == chat.tokenizer.decode([stop]).strip()
    params = SamplingParams(max_new_tokens=16, min_new_tokens=3, stop_token_ids=(stop,))
    tokens = run(chat.engine, [Request(ids, params)])[0]
    expected = chat.tokenizer.decode(tokens, skip_special_tokens=True).strip()
    assert expected and chat.chat("Hi", min_new_tokens=3, **kw) == expected
    assert chat.batch_chat(["Hi"], min_new_tokens=3, **kw) == [expected]


def test_answers_as_they_finish_answers_the_jobs_in_flight_before_raising_what_the_jobs_raised(setup):
    """A jobs iterator that raises (a bad request line, a failing image loader) lost the answers already
    decoding; now they come out first (generate and eval write each as it comes), then the exception."""
    from internvl_mpo.generate.params import sampling_params

    chat, _ = setup
    lengths = {"A": 12, "B": 3, "C": 5}
    pulls = []

    def jobs(fail_at):
        for key, n in lengths.items():
            pulls.append(key)
            if key == fail_at:
                raise RuntimeError(f"cannot read job {key}")
            yield key, chat.prepare(f"Question {key}"), sampling_params(do_sample=False, max_new_tokens=n,
                                                                         ignore_eos=True)

    answers = {}
    with pytest.raises(RuntimeError, match="cannot read job C"):
        for key, answer in chat.answers_as_they_finish(jobs("C"), batch_size=2):
            answers[key] = answer
    assert pulls == ["A", "B", "C"]
    assert set(answers) == {"A", "B"}
    for key in "AB":
        assert answers[key] == chat.chat(f"Question {key}", max_new_tokens=lengths[key], ignore_eos=True,
                                         do_sample=False)
    pulls.clear()
    with pytest.raises(RuntimeError, match="cannot read job A"):
        list(chat.answers_as_they_finish(jobs("A"), batch_size=2))
    assert pulls == ["A"]


@pytest.fixture(scope="module")
def short_chat(checkpoint, tmp_path_factory):
    """The tiny model with a context of 100 positions."""
    folder = tmp_path_factory.mktemp("short") / "model"
    shutil.copytree(checkpoint[0], folder)
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["max_position_embeddings"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    return InternVLChat.from_pretrained(folder, dtype=torch.float32)


def test_engine_generate_refuses_a_bad_request_before_allocating_and_caps_the_cache_at_the_context(
        short_chat, monkeypatch):
    """A batch holding one prompt as long as the context (or empty, or with an id past the vocabulary) is
    refused before its KV cache is allocated (it was allocated, batch x context, then refused); a huge
    max_new_tokens sizes the cache at the context, not at prompt + max_new_tokens."""
    from internvl_mpo.generate import engine as engine_module

    engine, vocab = short_chat.engine, short_chat.model.config.llm.vocab_size
    made = []
    monkeypatch.setattr(engine_module, "make_caches", lambda *a, **k: made.append(a[1:3]) or make_caches(*a, **k))
    ok = Request([5, 6, 7], SamplingParams(max_new_tokens=100_000))
    for bad, message in (([5] * 100, "the prompt is 100 tokens; this batch holds at most 99 prompt tokens"),
                         ([], "the prompt is empty"), ([5, vocab], "prompt token ids must be whole numbers")):
        with pytest.raises(InputError, match=message):
            engine.generate([ok, Request(bad, GREEDY)])
    assert made == []
    gen = engine.generate([ok, Request([5] * 99, GREEDY)])
    assert made == [(2, 100)] and gen.caches[0].k.shape[2] == 100


def test_a_batch_without_rows_or_slots_is_refused_when_started(setup):
    """engine.start(0, n) gave a Generation that took requests and never admitted them: iterating it
    spun for ever; a negative length failed deep in torch.full."""
    chat, _ = setup
    for rows, length in ((0, 64), (-1, 64), (1, 1), (2, -5), (1.5, 64)):
        with pytest.raises(InputError, match=rf"a batch needs at least 1 row and 2 slots, got {rows} rows of {length}"):
            chat.engine.start(rows, length)


def test_a_batch_mixing_images_and_text_and_lengths_gives_each_request_its_own_tokens(setup):
    """One batch of a one-image, a text-only, a two-image and a repeated text prompt, each with its own
    max_new_tokens: every request gets the tokens it gets alone, as many as it asked for."""
    chat, _ = setup
    image = Image.new("RGB", (80, 40), "red")
    prompts = [prompt(chat, "What is it?", image), prompt(chat, "Hi there"), prompt(chat, "And these?", [image, image]),
               prompt(chat, "Hi there")]
    requests = [Request(ids, SamplingParams(max_new_tokens=new, ignore_eos=True), pixels)
                for (ids, pixels), new in zip(prompts, (7, 30, 1, 3))]
    together = run(chat.engine, requests)
    assert [len(together[i]) for i in range(4)] == [7, 30, 1, 3]
    assert [together[i] for i in range(4)] == [run(chat.engine, [r])[0] for r in requests]


def test_a_stream_closed_midway_or_left_open_leaves_nothing_for_the_next_chat(setup):
    """A compiled engine's next chat takes the buffers of a stream closed after two pieces, or gets buffers
    of its own beside a stream left open: either way it answers as a fresh engine, and so does the open
    stream when read on."""
    chat, _ = setup
    bot = InternVLChat(chat.model, chat.tokenizer)
    bot.engine.compiled = True  # keeps buffers as a compiled engine does; the step itself runs eagerly
    kw = dict(max_new_tokens=12, do_sample=False, ignore_eos=True)
    story = dict(max_new_tokens=40, do_sample=False, ignore_eos=True)
    closed = bot.stream_chat("Tell me a long story", **story)
    next(closed), next(closed)
    closed.close()
    assert bot.chat("Hi there", **kw) == chat.chat("Hi there", **kw)
    left = bot.stream_chat("Tell me a long story", **story)
    first = next(left)
    assert bot.chat("Hi there", **kw) == chat.chat("Hi there", **kw)
    assert first + "".join(left) == chat.chat("Tell me a long story", **story)


# ---- logit bias -------------------------------------------------------------------------------

def _first_step_logprobs(chat, ids: list[int]) -> torch.Tensor:
    """(V,) log_softmax of the model's logits after `ids` (an uncached forward)."""
    with torch.no_grad():
        return chat.model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)


@pytest.mark.parametrize("screen", [False, True])
def test_logit_bias_forces_or_bans_a_token_under_greedy(setup, screen):
    """+100 on a token the model would not pick makes every greedy token that one; -100 on the greedy
    first token gives the model's second best instead, and never that token again. Log-probabilities
    stay the model's own, before the bias (vLLM's default raw_logprobs)."""
    chat, _ = setup
    engine = Engine(chat.model, chat.engine.stop_token_ids, screen=screen)
    ids, _ = prompt(chat, "Tell me about the sea.")
    plain = run(engine, [Request(ids, GREEDY)])[0]
    first = _first_step_logprobs(chat, ids)
    second_best, worst = first.topk(2).indices[1].item(), first.argmin().item()
    assert plain[0] == first.argmax().item() != second_best
    forced = [e for step in engine.generate([Request(ids, dataclasses.replace(GREEDY, logit_bias={worst: 100}),
                                                     logprobs=2)]) for e in step]
    assert [e.token for e in forced] == [worst] * STEPS
    assert forced[0].logprob == pytest.approx(first[worst].item(), abs=1e-4)  # the raw value, far below 0
    assert [i for i, _ in forced[0].top_logprobs] == first.topk(2).indices.tolist()
    banned = run(engine, [Request(ids, dataclasses.replace(GREEDY, logit_bias={plain[0]: -100}))])[0]
    assert banned[0] == second_best and plain[0] not in banned
    assert run(engine, [Request(ids, dataclasses.replace(GREEDY, logit_bias={}))])[0] == plain


def run_schedule(gen, schedule, after_step=None) -> dict[int, list[int]]:
    """Step `gen` to the end, adding schedule[k]'s requests before step k; each request id's tokens.
    `after_step(gen, k)` runs after step k."""
    got, step = {}, 0
    while step == 0 or gen:
        for request in schedule.get(step, []):
            got[gen.add(request)] = []
        for e in gen.step():
            got[e.rid].append(e.token)
        if after_step is not None:
            after_step(gen, step)
        step += 1
    return got


@pytest.mark.parametrize("screen", [False, True])
def test_rows_without_a_logit_bias_are_untouched_by_a_biased_row_beside_them(setup, screen):
    """A batch whose rows join and leave at different steps: a biased row moves into a freed row (its bias
    goes with it) and a plain row joins the row a biased one left (it must not inherit that bias, while
    another biased row is decoding); each request gets the tokens it gets alone, sampled ones included."""
    chat, _ = setup
    engine = Engine(chat.model, chat.engine.stop_token_ids, screen=screen)
    a, b, c = (prompt(chat, q)[0] for q in ("Hello there", "What is it?", "Tell me more"))
    worst = _first_step_logprobs(chat, b).argmin().item()
    short = SamplingParams(max_new_tokens=3, ignore_eos=True)
    forced = SamplingParams(max_new_tokens=10, ignore_eos=True, logit_bias={worst: 100})
    banned = SamplingParams(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=0, seed=5, ignore_eos=True,
                            logit_bias={i: -100 for i in range(0, 40)})
    schedule = {0: [Request(a, short), Request(b, forced)], 4: [Request(c, GREEDY), Request(a, banned)]}
    got = run_schedule(engine.start(max_batch=3, max_len=256), schedule)
    requests = schedule[0] + schedule[4]
    assert [got[i] for i in range(4)] == [run(engine, [r])[0] for r in requests]
    assert got[1] == [worst] * 10 and not set(got[3]) & set(range(40)) and len(got[2]) == STEPS


def test_a_batch_makes_its_logit_bias_at_its_first_biased_request(setup):
    """The dense rows x vocabulary bias (5 MB at 8 rows of InternVL's vocabulary) is made by the first request
    with a logit bias, not for every batch; made mid-batch it biases that request's row alone, and moves with
    the row when an earlier row is freed."""
    chat, _ = setup
    engine = Engine(chat.model, chat.engine.stop_token_ids)
    a, b, c = (prompt(chat, q)[0] for q in ("Hello there", "What is it?", "Tell me more"))
    sampled = SamplingParams(max_new_tokens=4, do_sample=True, seed=1, repetition_penalty=1.2, ignore_eos=True)
    unbiased = engine.generate([Request(a, GREEDY), Request(b, sampled, logprobs=1)])
    assert sum(map(len, unbiased)) == STEPS + 4 and unbiased.bias is None
    worst = _first_step_logprobs(chat, c).argmin().item()
    short = SamplingParams(max_new_tokens=3, ignore_eos=True)
    forced = SamplingParams(max_new_tokens=10, ignore_eos=True, logit_bias={worst: 100})
    schedule = {0: [Request(a, short), Request(b, GREEDY)], 1: [Request(c, forced)]}

    def check(gen, step):
        if step == 0:
            assert gen.bias is None
        if step == 1:  # `a` ended: `c` moved from row 2 into its row 0
            assert [r.rid for r in gen.rows] == [2, 1]
            assert gen.bias[0].nonzero().tolist() == [[worst]] and not gen.bias[1].any()

    got = run_schedule(engine.start(max_batch=3, max_len=256), schedule, check)
    requests = schedule[0] + schedule[1]
    assert [got[i] for i in range(3)] == [run(engine, [r])[0] for r in requests]
    assert got[2] == [worst] * 10


def test_chat_takes_a_logit_bias_as_the_server_does(setup):
    """chat(), stream_chat() and batch_chat() take logit_bias={token id: bias}; it was refused as an unknown
    generation setting, so only the server and the engine offered it."""
    chat, _ = setup
    token = chat.tokenizer.encode(" cat")[-1]
    expected = chat.tokenizer.decode([token] * 3).strip()
    kw = dict(max_new_tokens=3, do_sample=False, logit_bias={token: 100})
    assert chat.chat("Hello", **kw) == expected
    assert "".join(chat.stream_chat("Hello", **kw)) == expected
    assert chat.batch_chat(["Hello", "Hi"], **kw) == [expected, expected]
    assert chat.chat("Hello", max_new_tokens=3, do_sample=False) != expected
    with pytest.raises(InputError, match="logit_bias of token 5 must be a number from -100 to 100"):
        chat.chat("Hello", logit_bias={5: 500})


def test_a_bad_logit_bias_is_refused_by_name(setup):
    chat, _ = setup
    vocab = chat.model.config.llm.vocab_size
    for bias, message in (({"5": 1}, "logit_bias keys must be token ids (whole numbers), got '5'"),
                          ({True: 1}, "logit_bias keys must be token ids"),
                          ({5: 101}, "logit_bias of token 5 must be a number from -100 to 100, got 101"),
                          ({5: -100.5}, "got -100.5"), ({5: math.nan}, "got nan"), ({5: math.inf}, "got inf"),
                          ({5: "1"}, "got '1'"), ({5: True}, "got True"), ([5], "got the entry 5"),
                          ("5", "logit_bias must map token ids to biases, got str")):
        with pytest.raises(InputError, match=re.escape(message)):
            SamplingParams(logit_bias=bias)
    params = SamplingParams(logit_bias=[(9, 1), (3, -2.5), (9, 4)])
    assert params.logit_bias == ((3, -2.5), (9, 4.0)) == SamplingParams(logit_bias={9: 4, 3: -2.5}).logit_bias
    assert hash(params) == hash(dataclasses.replace(params))
    ids, _ = prompt(chat, "Hi")
    for token in (vocab, -1):
        with pytest.raises(InputError, match=rf"logit_bias token ids must be in 0..{vocab - 1}, got \[{token}\]"):
            chat.engine.generate([Request(ids, SamplingParams(logit_bias={3: 1, token: -100}))])


def test_a_system_message_in_config_json_replaces_the_templates_as_in_the_official_chat(checkpoint, tmp_path):
    """The official model reads config.json's `system_message`, where the key is there, and its chat() and
    batch_chat() use it instead of the template's; it was ignored here. A system message given still wins, and
    the early length check counts the one used."""
    from internvl_mpo.chat.template import build_prompt_ids
    from internvl_mpo.errors import ConfigError, PromptTooLongError

    def chat_with(system_message):
        folder = tmp_path / f"model{len(str(system_message))}"
        shutil.copytree(checkpoint[0], folder)
        config = json.loads((folder / "config.json").read_text())
        config["system_message"] = system_message
        (folder / "config.json").write_text(json.dumps(config))
        return InternVLChat.from_pretrained(folder, dtype=torch.float32)

    chat = chat_with("Answer in one word.")
    image = Image.new("RGB", (40, 40), (200, 30, 30))  # one tile
    settings = dict(generation_config=dict(max_new_tokens=4, do_sample=False))
    for given, used in ((None, "Answer in one word."), ("Be kind.", "Be kind.")):
        ids = chat.prepare("Hi", image, system_message=given).prompt_ids
        assert ids == build_prompt_ids(chat.tokenizer, "Hi", (), [1], used, num_image_token=chat.model.num_image_token)
        assert chat.batch_chat(["Hi"], system_message=given, **settings) == \
            chat.batch_chat(["Hi"], system_message=used, **settings)
    long = chat_with("word " * chat.context)
    long.check_prompt("Hi", None, [1], system_message="")
    image_ids = long.model.num_image_token + 2  # with <img> and </img>
    with pytest.raises(PromptTooLongError, match=rf"^prompt is \d+ tokens \({image_ids} of them image tokens\), "
                                                 rf"longer than the context allows: at most {long.context - 1}; "
                                                 r"without its images it is \d+ tokens$"):
        long.check_prompt("Hi", None, [1])  # the config's system message, not the one given as "", is too long
    assert chat_with(None).prepare("Hi").prompt_ids == build_prompt_ids(chat.tokenizer, "Hi")  # null: the template's
    with pytest.raises(ConfigError, match=r"^config.json: system_message must be a string \(or null\), got \['x'\]$"):
        chat_with(["x"]).prepare("Hi")


def generate_benchmark():
    """benchmarks/generate.py as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"
    spec = importlib.util.spec_from_file_location("benchmark_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.parametrize("script, args, said", [
    ("json_mask.py", ["--tokenizer", "nope"], "error: tokenizer folder nope has no tokenizer.json"),
    ("batch_file.py", ["--model", "nope"], "error: nope: no such checkpoint folder"),
])
def test_a_benchmark_given_a_bad_path_says_so_in_one_line(script, args, said, tmp_path):
    """The benchmarks printed a CheckpointError's traceback for a model or tokenizer folder that is not there."""
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    run = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 1 and run.stderr.startswith(said) and run.stderr.count("\n") == 1, run.stderr


def test_generate_benchmark_refuses_a_negative_decode_time():
    """benchmarks/generate.py times decoding as t(64 new tokens) - t(1 new token); on a busy machine the 1-token
    run took longer once and the README's benchmark printed "decode batch 4 (tok/s) -3488.54" and a -41.79x
    speed-up. Such a difference is refused with what was measured."""
    bench = generate_benchmark()
    assert bench.decode_time({"b4_64": 0.5, "b4_1": 0.1}, "b4", "ours") == pytest.approx(0.4)
    with pytest.raises(SystemExit, match=r"ours b4: 64 new tokens took 0\.1000 s, 1 new token 0\.1500 s: the machine"):
        bench.decode_time({"b4_64": 0.1, "b4_1": 0.15}, "b4", "ours")


def test_generate_benchmark_compiles_transformers_where_its_generate_does():
    """With --compile the benchmark set our compiled decode against transformers' eager one on every device; on GPUs
    transformers' generate compiles its decode itself given a static cache, which the benchmark now asks for. On
    the CPU only a private switch (CompileConfig._compile_all_devices) turns that on, so theirs stays eager."""
    bench = generate_benchmark()
    assert bench.theirs_compiles("cuda") and bench.theirs_compiles("cuda:1")
    assert not bench.theirs_compiles("cpu")


def test_a_history_that_is_no_list_is_refused_by_name_before_its_truth_value_is_asked(setup):
    import numpy as np

    chat = setup[0]
    for history in (np.array([["What is it?", "A cat."]]), np.empty((0, 2), dtype=object)):
        with pytest.raises(InputError, match="history must be a list of .* got ndarray"):
            chat.chat("And now?", history=history, do_sample=False, max_new_tokens=2)
        with pytest.raises(InputError, match="history must be a list"):
            chat.stream_chat("And now?", history=history, do_sample=False, max_new_tokens=2)


def test_activations_that_overflow_are_an_error_not_an_answer_of_exclamation_marks(checkpoint):
    """A model whose activations overflow to inf or NaN on a prompt (float16 weights on a GPU: these models'
    activations exceed its range) gave NaN logits, whose argmax is token 0 ("!"), an answer of "!!!!" without a
    word; the request fails naming the cause, and the engine answers the next one."""
    from internvl_mpo.errors import NumericsError

    chat = InternVLChat.from_pretrained(checkpoint[0], dtype=torch.float32)
    good = chat.chat("Hello", do_sample=False, max_new_tokens=3)
    zed = sorted(set(chat.prepare("Zzz").prompt_ids) - set(chat.prepare("Hello").prompt_ids))
    with torch.no_grad():
        chat.model.language_model.input_embeddings().weight[zed] = float("inf")  # in "Zzz", not in "Hello"'s prompt
    with pytest.raises(NumericsError, match=r"activations overflowed to NaN or inf on this prompt \(weights in "
                                            r"float32\); its answer would be garbage"):
        chat.chat("Zzz", do_sample=False, max_new_tokens=3)
    assert chat.chat("Hello", do_sample=False, max_new_tokens=3) == good


@pytest.mark.parametrize("mode", ["greedy", "screened", "sampled"])
def test_activations_that_overflow_during_the_answer_fail_that_row_not_its_batch(checkpoint, mode):
    """A row whose activations overflow only at a token of its answer (its prompt passed the admission check)
    decoded NaN logits into token 0 for the rest of the answer ("!!!!"); it fails with NumericsError at that step,
    and the other row of its batch answers as it does alone. Checked greedy (the full head), through the greedy
    screen, and sampled."""
    from internvl_mpo.errors import NumericsError

    chat = InternVLChat.from_pretrained(checkpoint[0], dtype=torch.float32)
    engine = Engine(chat.model, chat.engine.stop_token_ids, screen=mode == "screened")
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, do_sample=mode == "sampled", seed=3)
    ids_a, _ = prompt(chat, "Hello")
    ids_b, _ = prompt(chat, "What is it?")
    answer_a = run(engine, [Request(ids_a, params)])[0]
    answer_b = run(engine, [Request(ids_b, params)])[0]
    # the third token of A's answer, which neither prompt nor B's answer holds, overflows as it is fed back
    poison = answer_a[2]
    assert poison not in set(ids_a) | set(ids_b) | set(answer_b) | set(answer_a[:2])
    weight = chat.model.language_model.input_embeddings().weight
    saved = weight[poison].clone()
    with torch.no_grad():
        weight[poison] = float("inf")
    try:
        gen = engine.generate([Request(ids_a, params), Request(ids_b, params)])
        got: dict[int, list] = {0: [], 1: []}
        while gen:
            for e in gen.step():
                got[e.rid].append(e.error if e.finish == "error" else e.token)
    finally:
        with torch.no_grad():
            weight[poison] = saved
    assert got[0][:3] == answer_a[:3] and len(got[0]) == 4
    assert isinstance(got[0][3], NumericsError)
    assert re.fullmatch(r"the model's activations overflowed to NaN or inf during the answer \(weights in "
                        r"float32\); its answer would be garbage", str(got[0][3]))
    assert got[1] == answer_b


def test_answers_as_they_finish_gives_a_row_that_overflows_mid_answer_its_error_and_goes_on(checkpoint):
    """`eval` and `generate` files: a job whose activations overflow at a token of its answer comes back with its
    NumericsError as its answer (a failing decode step raises, as it fails every row); the other job answers."""
    from internvl_mpo.errors import NumericsError

    chat = InternVLChat.from_pretrained(checkpoint[0], dtype=torch.float32)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    jobs = [(key, chat.prepare(q), params) for key, q in (("a", "Hello"), ("b", "What is it?"))]
    alone = dict(chat.answers_as_they_finish(jobs, batch_size=2))
    poison = run(chat.engine, [Request(jobs[0][1].prompt_ids, params)])[0][2]
    assert poison not in set(jobs[0][1].prompt_ids) | set(jobs[1][1].prompt_ids)
    with torch.no_grad():
        chat.model.language_model.input_embeddings().weight[poison] = float("inf")
    answers = dict(chat.answers_as_they_finish(jobs, batch_size=2))
    assert isinstance(answers["a"], NumericsError) and answers["b"] == alone["b"]


def test_batch_chat_names_the_question_whose_activations_overflow(checkpoint):
    """batch_chat raised a NumericsError without saying which question overflowed (an input error names
    `questions[i]`); it names it too."""
    from internvl_mpo.errors import NumericsError

    chat = InternVLChat.from_pretrained(checkpoint[0], dtype=torch.float32)
    questions = ["What is it?", "Hello"]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    poison = run(chat.engine, [Request(chat.prepare("Hello").prompt_ids, params)])[0][2]
    assert poison not in set(chat.prepare("Hello").prompt_ids)
    with torch.no_grad():
        chat.model.language_model.input_embeddings().weight[poison] = float("inf")
    with pytest.raises(NumericsError, match=r"^questions\[1\]: the model's activations overflowed to NaN or inf "
                                            r"during the answer"):
        chat.batch_chat(questions, max_new_tokens=6, ignore_eos=True, do_sample=False)


def test_a_conversation_opened_by_the_assistant_is_measured_as_any_other(setup):
    """A first history entry (None, answer) (the assistant's opening turn): a prompt too long with its images is
    refused with the usual message (its text-only length was measured with None taken for a question)."""
    from internvl_mpo.errors import PromptTooLongError

    chat = setup[0]
    with pytest.raises(PromptTooLongError, match=r"^prompt is \d+ tokens .*longer than the context allows"):
        chat.check_prompt("<image>\nDescribe it.", [(None, "How can I help you?")], [10**6])
    answer = chat.chat("Hello", history=[(None, "How can I help you?")], do_sample=False, max_new_tokens=3)
    assert isinstance(answer, str)


def _benchmark(script, args, tmp_path, env=None, timeout=300):
    import os
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=None if env is None else {**os.environ, **env})


def test_json_mask_benchmark_refuses_a_text_the_schema_file_does_not_take(tmp_path):
    """`json_mask.py --schema-file FILE --text VALUE` with a VALUE the schema does not take ended in json_schema's
    "TypeError: cannot unpack non-iterable NoneType object" (the states were advanced past the dead one); as a
    --regex's or --grammar's --text, it is refused in one line, before any mask is timed."""
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], '
                      '"additionalProperties": false}')
    for text in ('{"a": "x"}', "[1, 2]", "{}"):
        run = _benchmark("json_mask.py", ["--schema-file", str(schema), "--text", text], tmp_path)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert f"error: --text is not a value of the schema in {schema}" in run.stderr.splitlines()[-1]
    run = _benchmark("json_mask.py", ["--schema-file", str(schema), "--text", '{"a": 1}'], tmp_path)
    assert run.returncode == 0 and "cached:" in run.stdout, run.stderr[-2000:]


def test_generate_benchmark_refuses_no_rounds_and_a_missing_transformers_in_one_line(tmp_path):
    """`generate.py --rounds 0` ran both peak-memory processes (minutes for the small config) and then printed the
    timing process's "KeyError: 'vision'" traceback; without transformers (the reference it compares with) the
    run was a ModuleNotFoundError traceback. Both are one line before anything is built."""
    run = _benchmark("generate.py", ["--config", "tiny", "--rounds", "0"], tmp_path, timeout=60)
    assert run.returncode == 2
    assert run.stderr.splitlines()[-1].endswith("--rounds 0: at least 1 turn per side is needed")
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "transformers.py").write_text("raise ModuleNotFoundError(\"No module named 'transformers'\", "
                                             "name='transformers')\n")
    import os

    path = os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")])
    run = _benchmark("generate.py", ["--config", "tiny"], tmp_path, env={"PYTHONPATH": path}, timeout=60)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.startswith("this benchmark compares with transformers' InternVLForConditionalGeneration")


def test_serve_benchmark_checks_its_json_folder_before_the_run(tmp_path):
    """`serve.py --json DIR/x.json` with no DIR measured both servers (minutes) and then ended in write_text's
    FileNotFoundError traceback; the folder is checked first."""
    run = _benchmark("serve.py", ["--json", str(tmp_path / "nope" / "x.json")], tmp_path, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.splitlines()[-1].endswith(f"--json {tmp_path / 'nope' / 'x.json'}: no folder "
                                                f"{tmp_path / 'nope'} to write the results in")
