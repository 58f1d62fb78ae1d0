"""One InternVLChat called from several threads at once (a Flask or Gradio app) answers as the same
calls made one after another, and leaves nothing behind."""

from __future__ import annotations

import gc
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from internvl_mpo.cli import default_model
from internvl_mpo.generate.engine import Generation
from internvl_mpo.pipeline import InternVLChat
from internvl_mpo.processor.image import open_image

THREADS = 4
GREEDY = {"do_sample": False, "max_new_tokens": 24}


def sampled(seed: int) -> dict:
    return {"do_sample": True, "temperature": 0.9, "seed": seed, "max_new_tokens": 24}


def load() -> InternVLChat:
    """A fresh demo model: its lazily built state (RoPE frequencies, greedy screen) not built yet."""
    chat = InternVLChat.from_pretrained(default_model())
    chat.engine.screen = True  # greedy rows go through the screen, built on first use
    return chat


def slowly(pieces) -> str:
    out = []
    for piece in pieces:
        out.append(piece)
        time.sleep(0.001)  # let the other threads step in between
    return "".join(out)


def in_another_thread(pieces) -> str:
    """Consume a stream in a thread other than the one that made it."""
    out = []
    consumer = threading.Thread(target=lambda: out.append("".join(pieces)))
    consumer.start()
    consumer.join()
    return out[0]


def abandoned(chat: InternVLChat, question: str, images, how: str) -> str:
    stream = chat.stream_chat(question, images, **sampled(5))
    first = next(stream) + next(stream)
    if how == "close":
        stream.close()
    del stream  # dropped half way: only the garbage collector ends it
    return first


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("threads")
    paths = []
    for name, size, colour in (("wide.png", (300, 200), "red"), ("tall.png", (200, 300), "blue")):
        Image.new("RGB", size, colour).save(folder / name)
        paths.append(str(folder / name))
    return paths


def jobs(images) -> list:
    wide, tall = images
    history = [("<image>\nHow many shapes are there?", "Final answer: 2")]
    return [
        lambda c: c.chat("How many shapes are there?", **GREEDY),
        lambda c: c.chat("What colour is the first shape?", wide, **sampled(1)),
        lambda c: c.chat("Compare them.", [wide, tall], **GREEDY),
        lambda c: c.chat("And now?", wide, history=history, return_history=True, **GREEDY),
        lambda c: slowly(c.stream_chat("Describe the picture.", tall, **GREEDY)),
        lambda c: slowly(c.stream_chat("Describe the picture.", None, **sampled(2))),
        lambda c: in_another_thread(c.stream_chat("How many shapes are there?", wide, **sampled(3))),
        lambda c: c.batch_chat(["How many shapes?", "Which colour?", "Hello"], [wide, None, [wide, tall]], **GREEDY),
        lambda c: c.batch_chat(["How many shapes?", "How many shapes?"], [tall, tall], **sampled(4)),
        lambda c: abandoned(c, "Describe the picture.", wide, "close"),
        lambda c: abandoned(c, "What is in the top row?", None, "drop"),
    ]


def test_calls_from_several_threads_equal_the_same_calls_in_turn(images):
    work = jobs(images)
    alone = load()
    expected = [job(alone) for job in work]
    shared = load()
    filters = list(warnings.filters)
    start = threading.Barrier(THREADS)

    def worker(t: int) -> list:
        start.wait()
        results = [None] * len(work)
        for k in range(len(work)):  # each thread its own order, so different calls overlap
            i = (k + 3 * t) % len(work)
            results[i] = work[i](shared)
        return results

    with ThreadPoolExecutor(THREADS) as pool:  # result() raises here what a call raised there
        runs = [pool.submit(worker, t) for t in range(THREADS)]
        for t, run in enumerate(runs):
            assert run.result() == expected, f"thread {t}"
    # Nothing left behind: no running batch (the abandoned streams' included), the warning filters
    # as they were, and a later call answers as before.
    gc.collect()
    assert [o for o in gc.get_objects() if type(o) is Generation and o.engine is shared.engine] == []
    assert warnings.filters == filters
    assert work[4](shared) == expected[4]


def test_images_opened_from_several_threads_leave_the_warning_filters_alone(images):
    """Opening hides Pillow's DecompressionBombWarning with catch_warnings, which swaps the process-wide
    filter list: threads inside it at once used to leave the warning ignored for good."""
    filters = list(warnings.filters)

    def open_many():
        for _ in range(200):
            open_image(images[0])

    threads = [threading.Thread(target=open_many) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings.filters == filters


def test_generations_started_at_once_never_share_a_compiled_engines_storages(monkeypatch):
    """Two threads starting Generations of one compiled engine at the same moment could both pass the check that
    the storages were free and build their KV caches on one storage: one chat answered the other's question. The
    check and the claim are one step now (here the claim is slowed, so the threads overlap in it)."""
    from types import SimpleNamespace

    from internvl_mpo.generate import engine as engine_module

    real_ref = engine_module.weakref.ref

    def slow_ref(obj):
        time.sleep(0.05)
        return real_ref(obj)

    monkeypatch.setattr(engine_module, "weakref", SimpleNamespace(ref=slow_ref))

    class Taker:  # a Generation, as far as the storages see one
        pass

    storages, takers = engine_module._Storages(), [Taker(), Taker()]
    start, got = threading.Barrier(2), [None, None]

    def take(i):
        start.wait()
        got[i] = storages.take(takers[i])

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(f is engine_module.torch.full for f in got) == [False, True]  # one got the storages, one its own


def test_a_compiled_step_runs_one_thread_at_a_time(monkeypatch):
    """Two threads in a compiled decode step at once sometimes raised "torch.compile with fullgraph=True found no
    compiled frames": the step is entered by one thread at a time."""
    from internvl_mpo.generate.engine import _without_duck_sizing

    inside, most = [0], [0]

    def step(*args):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.02)
        inside[0] -= 1
        return args

    decode = _without_duck_sizing(step)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(decode, range(8))) == [(k,) for k in range(8)]
    assert most[0] == 1


def test_a_stream_made_under_inference_mode_is_read_outside_it(images):
    """torch.inference_mode() is thread-local and ends with its block: a stream made inside one (a handler
    that returns it) and read after it, or in another thread, must not write into inference tensors."""
    import torch

    chat = InternVLChat.from_pretrained(default_model())
    expected = chat.chat("Describe the picture.", images[0], **GREEDY)
    with torch.inference_mode():
        later = chat.stream_chat("Describe the picture.", images[0], **GREEDY)
        elsewhere = chat.stream_chat("Describe the picture.", images[0], **GREEDY)
    assert "".join(later) == expected  # before: "Inplace update to inference tensor outside InferenceMode"
    assert in_another_thread(elsewhere) == expected
    with torch.inference_mode():  # and read inside one, as before
        assert "".join(chat.stream_chat("Describe the picture.", images[0], **GREEDY)) == expected
