"""Generation as the README's Generation section describes it, checked end to end by a user's audit."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from internvl_mpo.errors import InputError
from internvl_mpo.generate.engine import Engine, Request
from internvl_mpo.generate.params import SamplingParams
from internvl_mpo.pipeline import InternVLChat

from conftest import tiny_chat_folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("audit") / "model")


@pytest.fixture(scope="module")
def chat(checkpoint):
    return InternVLChat.from_pretrained(checkpoint[0], dtype=torch.float32)


def tokens_of(engine: Engine, requests: list[Request]) -> list[list[int]]:
    """Each request's tokens, generated together."""
    got = [[] for _ in requests]
    for events in engine.generate(requests):
        for e in events:
            got[e.rid].append(e.token)
    return got


def test_a_compiled_engine_compiles_one_step_for_every_batch_of_two_rows_or_more(chat, monkeypatch):
    """The tiny model has 2 KV heads. Duck sizing gave a first batch of 2 rows a step guarded on rows == KV heads
    == cache rows: batches of 3 and 4, and each batch once a row finished, compiled the step again (5 graphs
    here, where torch stops at 8). Traced with a counting backend through the engine's own compile."""
    from torch._dynamo.testing import CompileCounter

    counter, real = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **options: real(fn, backend=counter, **options))
    torch._dynamo.reset()
    engine = Engine(chat.model, chat.engine.stop_token_ids, compile=True)
    eager = Engine(chat.model, chat.engine.stop_token_ids)
    prompts = [chat.prepare(q).prompt_ids for q in ("Hi", "What is it?", "Tell me more", "Why?", "And then?")]
    for size in (2, 3, 4, 5, 2):  # each batch's rows finish one by one, down to a single row
        requests = [Request(ids, SamplingParams(max_new_tokens=3 + 2 * i, ignore_eos=True))
                    for i, ids in enumerate(prompts[:size])]
        got = {i: [] for i in range(size)}
        for events in engine.generate(requests):
            for e in events:
                got[e.rid].append(e.token)
        assert list(got.values()) == [[e.token for events in eager.generate([r]) for e in events] for r in requests]
    assert counter.frame_count == 2  # one row (sizes of 1 are specialised) and two rows or more
    torch._dynamo.reset()


def test_a_bool_for_a_number_setting_is_refused_by_name(chat):
    """temperature=True sampled at temperature 1 and top_p=True kept every token: a bool was read as a number,
    where every whole-number setting refuses one."""
    for bad in (dict(temperature=True), dict(top_p=True), dict(repetition_penalty=True), dict(temperature=False)):
        name = next(iter(bad))
        with pytest.raises(InputError, match=rf"^{name} must be a finite number, got {bad[name]}$"):
            chat.chat("Hi", max_new_tokens=2, **bad)
    assert SamplingParams(temperature=1, top_p=1, repetition_penalty=1).temperature == 1  # ints are numbers


def test_ignore_eos_goes_past_the_engines_end_of_turn_ids(chat):
    """ignore_eos drops the engine's own stop ids (the end of turn): the answer goes on past them."""
    ids = chat.prepare("Stop early").prompt_ids
    free = tokens_of(chat.engine, [Request(ids, SamplingParams(max_new_tokens=6, ignore_eos=True))])[0]
    k = next(k for k in range(1, 6) if free[k] not in free[:k])
    engine = Engine(chat.model, stop_token_ids=(free[k],))
    assert tokens_of(engine, [Request(ids, SamplingParams(max_new_tokens=6))])[0] == free[: k + 1]
    assert tokens_of(engine, [Request(ids, SamplingParams(max_new_tokens=6, ignore_eos=True))])[0] == free


def test_a_penalised_request_in_a_freed_row_is_penalised_for_its_own_tokens_only(chat):
    """A request that takes the row of a finished one does not inherit the tokens it saw."""
    ids = chat.prepare("Tell me more").prompt_ids
    params = SamplingParams(max_new_tokens=8, repetition_penalty=3.0, ignore_eos=True)
    [alone] = tokens_of(chat.engine, [Request(ids, params)])
    gen = chat.engine.start(max_batch=1, max_len=128)  # the second waits for the first's row
    got = {gen.add(Request(ids, params)): [], gen.add(Request(ids, params)): []}
    for events in gen:
        for e in events:
            got[e.rid].append(e.token)
    assert list(got.values()) == [alone, alone]


def test_rows_asking_for_different_logprob_counts_get_each_their_own(chat):
    """Each row of a batch gets as many top alternatives as it asked for, the same as alone."""
    a, b = chat.prepare("What is it?").prompt_ids, chat.prepare("Hi there").prompt_ids
    greedy = SamplingParams(max_new_tokens=4, ignore_eos=True)
    requests = [Request(a, greedy, logprobs=1), Request(a, greedy, logprobs=3), Request(b, greedy, logprobs=0),
                Request(b, greedy)]
    events = [e for step in chat.engine.generate(requests) for e in step]
    for rid, request in enumerate(requests):
        mine = [e for e in events if e.rid == rid]
        alone = [e for step in chat.engine.generate([request]) for e in step]
        assert [len(e.top_logprobs) for e in mine] == [request.logprobs or 0] * 4
        assert [[i for i, _ in e.top_logprobs] for e in mine] == [[i for i, _ in e.top_logprobs] for e in alone]
        assert [e.logprob is None for e in mine] == [request.logprobs is None] * 4


def test_a_constrained_rows_top_logprobs_do_not_depend_on_a_neighbours_count(chat):
    """A constrained row's masked tokens tie at -inf, and torch's topk orders ties differently for another k:
    one topk with the batch's largest k, cut to each row's, listed other ids beside a neighbour asking for 20."""
    params = SamplingParams(max_new_tokens=5, choice=("yes", "no", "maybe"))
    request = Request(chat.prepare("Yes or no?").prompt_ids, params, logprobs=4)
    other = Request(chat.prepare("Hi").prompt_ids, SamplingParams(max_new_tokens=8, ignore_eos=True), logprobs=20)
    same_k = Request(chat.prepare("Hello?").prompt_ids, SamplingParams(max_new_tokens=8, ignore_eos=True), logprobs=4)
    alone = [e for step in chat.engine.generate([request]) for e in step]
    assert any(v == float("-inf") for e in alone for _, v in e.top_logprobs)  # ties among masked tokens
    for neighbours in ([other], [same_k], [other, same_k]):
        beside = [e for step in chat.engine.generate([request, *neighbours]) for e in step if e.rid == 0]
        assert [e.token for e in alone] == [e.token for e in beside]
        assert [[i for i, _ in e.top_logprobs] for e in beside] == [[i for i, _ in e.top_logprobs] for e in alone]


def test_a_stop_id_held_back_by_min_new_tokens_stops_the_answer_once_the_minimum_is_reached(chat):
    """Under min_new_tokens the stop id is masked, even where a logit bias forces it; once the minimum is
    reached it ends the answer, also in a row that moved when the row before it finished."""
    ids = chat.prepare("Hello there").prompt_ids
    stop = 5
    held = SamplingParams(max_new_tokens=12, min_new_tokens=4, stop_token_ids=(stop,), logit_bias={stop: 100},
                          ignore_eos=True)
    [alone] = tokens_of(chat.engine, [Request(ids, held)])
    assert len(alone) == 5 and alone[-1] == stop and stop not in alone[:4]
    short = SamplingParams(max_new_tokens=2, ignore_eos=True)  # finishes first: the held row moves into its row
    assert tokens_of(chat.engine, [Request(chat.prepare("Why?").prompt_ids, short), Request(ids, held)])[1] == alone
    longer = dataclasses.replace(held, min_new_tokens=8)  # a row still under its minimum beside it
    assert tokens_of(chat.engine, [Request(ids, held), Request(ids, longer)])[0] == alone


def test_one_prompt_with_other_images_is_prefilled_for_itself(chat):
    """Requests share a prefill only where their tiles are the same too, not their prompt ids alone."""
    red = chat.prepare("What is it?", Image.new("RGB", (80, 40), "red"))
    other = -red.pixel_values
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    requests = [Request(red.prompt_ids, params, red.pixel_values), Request(red.prompt_ids, params, other)]
    alone = [tokens_of(chat.engine, [r])[0] for r in requests]
    assert alone[0] != alone[1]
    assert tokens_of(chat.engine, requests) == alone


def test_a_twin_prompt_asking_for_prompt_logprobs_gets_them(chat):
    """A request asking for its prompt's log-probabilities (k alternatives) gets them even where a request of the
    same prompt admitted before it in the same step asked for none, or for fewer."""
    ids = chat.prepare("Describe it.").prompt_ids
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    requests = [Request(ids, params), Request(ids, params, prompt_logprobs=1), Request(ids, params, prompt_logprobs=3)]
    events = [e for step in chat.engine.generate(requests) for e in step]
    first = {e.rid: e for e in reversed(events)}
    assert first[0].prompt_logprobs is None
    for rid, k in ((1, 1), (2, 3)):
        got = first[rid].prompt_logprobs
        assert len(got) == len(ids) and got[0] is None and all(len(top) == k for _, _, top in got[1:])


def test_decoding_across_the_256th_cache_slot_equals_transformers(chat, checkpoint):
    """Without compile, attention reads the cache rounded up to 256 slots; the step that writes slot 256
    reads it too: its tokens and their log-probabilities are transformers'."""
    ids = chat.tokenizer.encode("one two three four five six " * 60)[:250]
    assert len(ids) == 250 and 299 not in ids  # 299: the tiny vocabulary's image context token
    request = Request(ids, SamplingParams(max_new_tokens=16, ignore_eos=True), logprobs=0)
    events = [e for step in chat.engine.generate([request]) for e in step]
    ours = [e.token for e in events]
    with torch.no_grad():
        ones = torch.ones(1, len(ids), dtype=torch.long)  # else the prompt's tokens equal to pad_token_id are masked
        out = checkpoint[1].generate(input_ids=torch.tensor([ids]), attention_mask=ones, max_new_tokens=16,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
        logp = checkpoint[1](input_ids=torch.tensor([ids + ours])).logits[0, len(ids) - 1 : -1].float().log_softmax(-1)
    assert ours == out[0, len(ids):].tolist()
    assert [e.logprob for e in events] == pytest.approx([logp[t, e.token].item() for t, e in enumerate(events)],
                                                         abs=1e-4)


def test_a_request_finished_while_it_waits_for_a_row_never_runs(chat):
    """`finish` of a queued request (its client went away before a row was free) drops it from the queue."""
    ids = chat.prepare("Hi").prompt_ids
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    gen = chat.engine.start(max_batch=1, max_len=128)
    first, waiting = gen.add(Request(ids, params)), gen.add(Request(ids, params))
    events = gen.step()
    gen.finish(waiting)
    events += [e for step in gen for e in step]
    assert [e.rid for e in events] == [first] * 3 and not gen
