"""Generation as the README's Generation section describes it, checked end to end by a user's audit."""

from __future__ import annotations

import pytest
import torch

from internvl_mpo.errors import InputError
from internvl_mpo.generate.engine import Engine, Request
from internvl_mpo.generate.sampling import SamplingParams
from internvl_mpo.pipeline import InternVLChat

from conftest import tiny_chat_folder


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    folder, _ = tiny_chat_folder(tmp_path_factory.mktemp("audit") / "model")
    return InternVLChat.from_pretrained(folder, dtype=torch.float32)


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
