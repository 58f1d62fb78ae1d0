"""The OpenAI-compatible server over real HTTP: the real `internvl-mpo serve` process on a tiny checkpoint,
driven by the official `openai` client (answers, streaming, images, multi-turn, stop strings, n, errors,
limits, concurrent batching, client disconnects).

Expected answers come from the in-process `InternVLChat.chat` (greedy), expected token counts from
transformers' tokenizer on prompts written out by hand, so the server's message mapping and usage
counts are checked against independent paths.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import gzip
import inspect
import io
import ipaddress
import itertools
import json
import logging
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import stop, tiny_chat_folder
from PIL import Image
from tokenizer_fixture import SYSTEM_MESSAGE

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from internvl_mpo.generate.engine import Request
from internvl_mpo.generate.params import SamplingParams
from internvl_mpo.pipeline import InternVLChat
from internvl_mpo.server import ServerSettings, serve
from internvl_mpo.server.media import image_bytes
from internvl_mpo.server.prompts import TEXT_ROOM, build_completion_prompts, build_prompt, tokenize_ids
from internvl_mpo.server.requests import (
    ApiError,
    check_model,
    parse_chat_request,
    parse_completion_request,
    parse_tokenize_request,
)
from internvl_mpo.server.worker import BatchWorker, Job

KEY = "test-key"
MAX_BATCH = 8
STEPS = 24
GREEDY = {"temperature": 0, "max_tokens": STEPS}
LONG = {"temperature": 0, "max_tokens": STEPS, "extra_body": {"ignore_eos": True}}
QUESTIONS = ["Hello there", "What is the capital of France?", "Count to ten.", "Tell me a story."]


def launch(cmd: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """The `internvl-mpo serve` process of `cmd` given `--port 0` (its output in `log`) and its base url, read from
    uvicorn's "running on" line (a free port chosen here and then passed on could be taken in between), once it
    answers /health."""
    assert cmd[cmd.index("--port") + 1] == "0"
    with open(log, "w") as out:
        # SIGINT as a terminal's foreground command gets it: a suite started in the background (`... &` in a
        # script) ignores SIGINT, which its children inherit, and the Ctrl-C test's server then exits 0, not 130
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            raise AssertionError(log.read_text())
        running = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", log.read_text())
        try:
            if running and httpx.get(running[1] + "/health", timeout=1).status_code == 200:
                return proc, running[1]
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not come up")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, checkpoint folder) of a running `internvl-mpo serve` subprocess, stopped after the module."""
    root = tmp_path_factory.mktemp("serve")
    folder, _ = tiny_chat_folder(root / "model")
    cmd = [sys.executable, "-m", "internvl_mpo.cli", "serve", "--model", str(folder), "--served-model-name", "m",
           "--port", "0", "--api-key", KEY, "--max-batch", str(MAX_BATCH), "--max-len", "2048", "--max-tokens", "1800",
           "--max-request-bytes", "200000", "--max-images", "2"]
    proc, url = launch(cmd, root / "server.log")
    try:
        yield url, folder
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local_chat(server):
    return InternVLChat.from_pretrained(server[1], dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_tokenizer(server):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(server[1])


def png(width: int, height: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, *images: bytes) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def hand_prompt(*turns: str) -> str:
    """The internvl2_5 prompt written out: system turn, alternating user/assistant turns, open assistant turn."""
    out = f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|>\n"
    for i, text in enumerate(turns):
        out += f"<|im_start|>{'user' if i % 2 == 0 else 'assistant'}\n{text}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


def post_to(server, route: str, body: dict, key: str | None = KEY) -> httpx.Response:
    """A JSON POST to one of the server's routes (those the openai client has no method for: /tokenize)."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.post(server[0] + route, json=body, headers=headers, timeout=120)


def stream_text(client, **kwargs) -> tuple[dict[int, str], dict[int, str], object]:
    """(text per choice, finish_reason per choice, usage) of a streamed completion."""
    texts, finishes, usage = {}, {}, None
    for chunk in client.chat.completions.create(model="m", stream=True, **kwargs):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, usage


@pytest.fixture
def apps(monkeypatch) -> list:
    """`serve` run in this process up to where it would listen: the apps it would have served are listed here instead.
    What it froze for the garbage collector (gc.freeze) is unfrozen after, so that this process collects again."""
    import gc

    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: served.append(self.config.app))
    yield served
    gc.unfreeze()


def health(server) -> dict:
    return httpx.get(server[0] + "/health").json()


def test_serve_flags_are_the_settings_fields():
    params = inspect.signature(serve).parameters
    fields = {f.name: f.default for f in dataclasses.fields(ServerSettings)}
    assert {name: p.default for name, p in params.items()} == fields
    assert fields["host"] == "127.0.0.1" and not fields["allow_remote_images"] and not fields["allow_local_images"]
    assert not fields["allow_private_image_hosts"]


def test_messages_map_onto_the_template():
    body = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                     {"type": "image_url", "image_url": {"url": "data:,"}},
                                     {"type": "text", "text": "Compare."}]},
        {"role": "assistant", "content": "Same."},
        {"role": "user", "content": "Sure?"},
        {"role": "user", "content": [{"type": "text", "text": "Really?"}]},
    ]}
    req = parse_chat_request(body, ServerSettings())
    assert req.system_message == "Be brief."
    # the model card's multi-image prompt; consecutive user messages read as one turn
    assert req.history == [("Image-1: <image>\nImage-2: <image>\nCompare.", "Same.")]
    assert req.question == "Sure?\nReally?"
    assert [p for p, _ in req.image_urls] == ["messages[1].content[0].image_url", "messages[1].content[1].image_url"]


def test_an_empty_last_user_message_and_top_logprobs_0_without_logprobs_are_taken():
    """As vLLM and chat("") answer them: a last user message of no text (or of whitespace alone) was a 400 ("the last
    user message is empty"), and top_logprobs 0 without logprobs (which asks for nothing; vLLM refuses only a count
    above 0) was a 400 "top_logprobs needs logprobs: true"."""
    for content in ("", " ", [], [{"type": "text", "text": ""}]):
        req = parse_chat_request({"messages": [{"role": "user", "content": content}]}, ServerSettings())
        assert req.question == ("" if content != " " else " ") and req.history == []
    req = parse_chat_request({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 0}, ServerSettings())
    assert req.logprobs is None
    req = parse_chat_request({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 0, "logprobs": True},
                             ServerSettings())
    assert req.logprobs == 0
    with pytest.raises(ApiError, match="top_logprobs needs logprobs: true"):
        parse_chat_request({"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 1}, ServerSettings())


def test_an_assistant_refusal_in_the_history_is_read_as_its_answer():
    """OpenAI sends a refusal as an assistant message with content null and the text in `refusal` (or as a
    {"type": "refusal"} part): a client that sent such a turn back got a 400."""
    def history(assistant: dict) -> list:
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", **assistant},
                    {"role": "user", "content": "Why?"}]
        return parse_chat_request({"messages": messages}, ServerSettings()).history

    assert history({"content": None, "refusal": "I can't help."}) == [("Hi", "I can't help.")]
    assert history({"content": None}) == [("Hi", "")]
    assert history({"content": [{"type": "refusal", "refusal": "No."}, {"type": "text", "text": "Sorry."}]}) == [
        ("Hi", "No.\nSorry.")]
    with pytest.raises(ApiError, match=r"^messages\[1\]\.refusal must be a string, got 3$"):
        history({"content": None, "refusal": 3})
    with pytest.raises(ApiError, match=r"messages\[0\]\.content\[0\]: content parts must be"):
        parse_chat_request({"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}]},
                           ServerSettings())


def test_a_user_messages_images_go_before_its_text_whatever_the_parts_order():
    """OpenAI's examples send the text part first and the image after it: the prompt read "What is it?\n<image>",
    where the model card and InternVL's training put the image first (and vLLM puts a message's image
    placeholders in front of its text, whatever the parts' order)."""
    image = {"type": "image_url", "image_url": {"url": "data:,"}}

    def question(*content):
        return parse_chat_request({"messages": [{"role": "user", "content": list(content)}]}, ServerSettings()).question

    assert question({"type": "text", "text": "What is it?"}, image) == "<image>\nWhat is it?"
    assert question({"type": "text", "text": "Compare"}, image, {"type": "text", "text": "these."}, image) == \
        "Image-1: <image>\nImage-2: <image>\nCompare\nthese."
    assert question(image) == "<image>\n"  # the card's question without text: "<image>\n" + ""


def test_an_answer_or_system_message_that_mentions_image_keeps_it_as_text():
    """The model's own answer may say <image> (HTML); sending it back must not be a 400 or an image slot."""
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    body = {"messages": [
        {"role": "system", "content": "Explain tags such as <image>."},
        {"role": "user", "content": [image, image, {"type": "text", "text": "Which tags?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It uses <image> and <div>."}]},
        {"role": "user", "content": "Why?"},
    ]}
    req = parse_chat_request(body, ServerSettings())
    assert req.system_message == "Explain tags such as <image>."
    assert req.history == [("Image-1: <image>\nImage-2: <image>\nWhich tags?", "It uses <image> and <div>.")]
    body["messages"][-1]["content"] = "What does <image> do?"
    with pytest.raises(ApiError, match=r"messages\[3\].content: the text holds '<image>'; send images as image_url"):
        parse_chat_request(body, ServerSettings())


def test_top_k_off_is_0_or_vllms_minus_1():
    messages = [{"role": "user", "content": "hi"}]
    for top_k in (0, -1, None):
        assert parse_chat_request({"messages": messages, "top_k": top_k}, ServerSettings()).params.top_k == 0
    assert parse_chat_request({"messages": messages, "top_k": 5}, ServerSettings()).params.top_k == 5
    with pytest.raises(ApiError, match="top_k must be at least -1, got -2"):
        parse_chat_request({"messages": messages, "top_k": -2}, ServerSettings())


def test_an_unknown_stream_option_is_a_400_naming_it():
    """`stream_options: {"include_usages": true}` (a typo) was ignored: the stream came without its usage chunk."""
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
    with pytest.raises(ApiError, match=r"^stream_options\.include_usages is not a stream option") as e:
        parse_chat_request({**body, "stream_options": {"include_usages": True}}, ServerSettings())
    assert (e.value.status, e.value.param) == (400, "stream_options.include_usages")
    options = {"include_usage": True, "include_obfuscation": False}  # OpenAI's; no effect here
    assert parse_chat_request({**body, "stream_options": options}, ServerSettings()).include_usage


def test_stream_options_without_stream_and_tool_choice_without_tools_are_refused_as_in_vllm():
    def parse(**fields):
        return parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **fields}, ServerSettings())

    usage = {"include_usage": True}
    for fields in ({"stream_options": usage}, {"stream": False, "stream_options": usage}):
        with pytest.raises(ApiError, match="stream_options is only allowed with stream: true") as e:
            parse(**fields)
        assert e.value.status == 400 and e.value.param == "stream_options"
    assert parse(stream=True, stream_options=usage).include_usage
    assert not parse(stream_options=None).stream
    for fields in ({"tool_choice": "auto"}, {"tool_choice": "required"}, {"tool_choice": "sometimes", "tools": []},
                   {"tool_choice": {"type": "function", "function": {"name": "f"}}, "tools": []}):
        with pytest.raises(ApiError, match="^tool_choice (.* needs tools|must be)") as e:
            parse(**fields)
        assert e.value.status == 400 and e.value.param == "tool_choice"
    for fields in ({"tool_choice": "none"}, {"tool_choice": None}, {"tool_choice": "auto", "tools": []},
                   {"tool_choice": "required", "tools": []}):
        assert parse(**fields).question == "hi"  # nothing to call: vLLM answers these with text


def test_fields_of_the_wrong_type_are_400s_naming_them_even_when_they_read_as_false():
    """`stop: 0` or `stream_options: []` were taken as absent, `skip_special_tokens: "no"` as true, and NaN was a
    400 without its field in `param`: each is a 400 naming the field, on both endpoints."""
    cases = {"stop": [0, {}, ["ok", "\udc00"]], "stop_token_ids": [0, {}, ""],
             "stream_options": [[], 0, "", {"include_usage": "yes"}, {"include_usage": True, "continuous_usage_stats": 1}],
             "response_format": [[], 0, "", {}], "skip_special_tokens": ["no", 0, []],
             "temperature": [float("nan")], "top_p": [float("nan")], "repetition_penalty": [float("nan")]}
    for key, values in cases.items():
        for value in values:
            for parse, body in ((parse_chat_request, {"messages": [{"role": "user", "content": "hi"}]}),
                                (parse_completion_request, {"prompt": "hi"})):
                with pytest.raises(ApiError) as e:
                    parse({**body, "stream": True, key: value}, ServerSettings())
                assert e.value.status == 400 and e.value.param.startswith(key), (key, value, e.value.message)
                assert key in e.value.message, e.value.message
    for value in ("no", 0, []):
        with pytest.raises(ApiError, match="^add_generation_prompt must be bool") as e:
            parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": value},
                               ServerSettings())
        assert e.value.param == "add_generation_prompt"


def test_a_turn_of_several_user_messages_puts_all_its_images_in_front_as_chat_does():
    """Each message of a turn was written on its own (images, a newline, its text) and the messages joined by
    newlines: an image-only message then the question gave "<image>\n\nWhat?" and an image sent after the question
    went after it, where chat() writes "<image>\nWhat?"."""
    image = {"type": "image_url", "image_url": {"url": "data:,"}}

    def question(*contents) -> str:
        return parse_chat_request({"messages": [{"role": "user", "content": c} for c in contents]},
                                  ServerSettings()).question

    assert question([image], "What differs?") == "<image>\nWhat differs?"
    assert question("What differs?", [image]) == "<image>\nWhat differs?"
    assert question([image], [image], [{"type": "text", "text": "What differs?"}]) == (
        "Image-1: <image>\nImage-2: <image>\nWhat differs?")
    assert question([image, {"type": "text", "text": "A"}], "B") == "<image>\nA\nB"
    assert question([image]) == "<image>\n"  # an image alone: an empty question, as before


def test_consecutive_messages_of_one_role_are_joined_without_copying_each_again():
    """One turn of k messages was built by k concatenations, each copying the turn so far: 300,000 one-line
    messages (a 10 MB body) held the event loop for 16 s, 100-character ones for minutes. Every `+` on the
    messages' texts is counted here by the characters it builds; the turn must not cost more than its size."""
    built = [0]

    class Counted(str):
        def __add__(self, other):
            built[0] += len(self) + len(other)
            return Counted(str.__add__(self, other))

    count = 2000
    messages = [{"role": "user", "content": Counted(f"line {i}")} for i in range(count)]
    req = parse_chat_request({"messages": messages}, ServerSettings())
    assert req.question == "\n".join(f"line {i}" for i in range(count))
    assert built[0] <= 2 * len(req.question)


def test_vllm_fields_that_would_change_the_answer_are_refused_not_ignored():
    """A vLLM client's guided decoding, min_p or stop ids must not be dropped silently; left at their
    off values they are fine."""
    def parse(**fields):
        return parse_chat_request({"messages": [{"role": "user", "content": "hi"}], **fields}, ServerSettings())

    for key, value in {"min_p": 0.1, "use_beam_search": True, "include_stop_str_in_output": True,
                       "allowed_token_ids": [1, 2],
                       "bad_words": ["no"], "logits_processors": ["x"], "truncate_prompt_tokens": 5,
                       "return_tokens_as_token_ids": True, "chat_template": "{{ messages }}",
                       "skip_special_tokens": False, "add_generation_prompt": False,
                       "guided_whitespace_pattern": ""}.items():  # vLLM's JSON whitespace: it was ignored
        with pytest.raises(ApiError, match=f"{key}(: false)? is not supported by this server") as e:
            parse(**{key: value})
        assert (e.value.status, e.value.param) == (400, key)
    assert parse(min_p=0.0, min_tokens=0, use_beam_search=False, echo=False, skip_special_tokens=True,
                 add_generation_prompt=True, truncate_prompt_tokens=None, chat_template_kwargs={}).question == "hi"


def test_ignored_fields_of_the_wrong_type_are_400s_naming_them():
    """`user: 5` or `metadata: 1` passed unchecked; OpenAI's and vLLM's schemas refuse a field of the wrong type."""
    bodies = ((parse_chat_request, {"messages": [{"role": "user", "content": "hi"}]}),
              (parse_completion_request, {"prompt": "hi"}))
    for key, value in {"user": 5, "metadata": 1, "store": "yes", "service_tier": 0, "parallel_tool_calls": "no",
                       "reasoning_effort": [], "chat_template_kwargs": [], "request_id": 1, "cache_salt": False,
                       "spaces_between_special_tokens": 0, "mm_processor_kwargs": "x"}.items():
        for parse, body in bodies:
            with pytest.raises(ApiError, match=f"^{key} must be ") as e:
                parse({**body, key: value}, ServerSettings())
            assert (e.value.status, e.value.param) == (400, key)
    fine = {"user": "u1", "metadata": {"a": "b"}, "store": False, "service_tier": "auto", "parallel_tool_calls": True,
            "chat_template_kwargs": {}, "request_id": "r"}
    for parse, body in bodies:
        parse({**body, **fine}, ServerSettings())


def test_unknown_fields_are_400s_naming_them_and_every_openai_field_is_known():
    """A typo (`max_token`, `temprature`) or another API's name (`max_new_tokens`) was ignored, so the answer was
    made as if it had not been sent (2048 tokens, sampled); it is a 400 naming it, as OpenAI answers. Every field
    of the openai client's requests is known (sent as null, each is taken as absent)."""
    import typing

    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params

    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for parse, body in ((parse_chat_request, chat), (parse_completion_request, {"prompt": "hi"})):
        for key in ("max_token", "temprature", "max_new_tokens", "stop_sequences"):
            with pytest.raises(ApiError, match=f'^unrecognized request argument supplied: "{key}" ') as e:
                parse({**body, key: 3}, ServerSettings())
            assert (e.value.status, e.value.param) == (400, key)
        with pytest.raises(ApiError, match='supplied: "a", "b" .*know them'):
            parse({**body, "a": 1, "b": 2}, ServerSettings())
    for parse, body, params in ((parse_chat_request, chat, chat_create_params),
                                (parse_completion_request, {"prompt": "hi"}, completion_create_params)):
        fields = set(typing.get_type_hints(params.CompletionCreateParamsBase)) | {"stream"}
        parse({**dict.fromkeys(fields), **body}, ServerSettings())
    assert parse_tokenize_request({**chat, "add_special_tokens": True, "continue_final_message": False},
                                  ServerSettings()).chat.question == "hi"
    with pytest.raises(ApiError, match='"add_special_tokens"|add_special_tokens is not supported'):
        parse_chat_request({**chat, "add_special_tokens": True}, ServerSettings())


def test_refused_fields_are_refused_whatever_their_type_and_pass_only_at_their_off_value():
    """`tools: {}`, chat `echo: 0` or `suffix: []` passed because they read as false: a refused field passes
    only as null or its off value of its own JSON type (`tools: []`, `echo: false`, `min_p: 0`)."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [(parse_chat_request, chat, {"min_p": False, "bad_words": {},
                                         "use_beam_search": 0, "chat_template": "", "functions": "",
                                         "truncate_prompt_tokens": 0, "audio": {}}),
             (parse_completion_request, {"prompt": "hi"}, {"suffix": [], "tools": "", "include_stop_str_in_output": 0,
                                                           "structural_tag": [], "allowed_token_ids": []})]
    for parse, body, refused in cases:
        for key, value in refused.items():
            with pytest.raises(ApiError, match=f"^{key} is not supported by this server") as e:
                parse({**body, key: value}, ServerSettings())
            assert (e.value.status, e.value.param) == (400, key)
    off = {"tools": [], "functions": [], "min_p": 0, "use_beam_search": False, "bad_words": [], "audio": None,
           "return_tokens_as_token_ids": False, "include_stop_str_in_output": False}
    assert parse_chat_request({**chat, **off, "min_p": 0.0, "echo": False}, ServerSettings()).question == "hi"
    assert parse_completion_request({"prompt": "hi", **off, "suffix": None}, ServerSettings()).prompts == ["hi"]
    # an empty suffix, text after the completion that adds nothing, is its off value (it was refused)
    assert parse_completion_request({"prompt": "hi", "suffix": ""}, ServerSettings()).prompts == ["hi"]


def test_an_image_detail_other_than_openais_is_refused_naming_it():
    url = "data:image/png;base64,AAAA"
    for detail in (5, "medium", "", []):
        content = [{"type": "image_url", "image_url": {"url": url, "detail": detail}}, {"type": "text", "text": "hi"}]
        with pytest.raises(ApiError, match=r"^messages\[0\]\.content\[0\]\.image_url\.detail must be one of auto, "
                                           r"low, high, got ") as e:
            parse_chat_request({"messages": [{"role": "user", "content": content}]}, ServerSettings())
        assert (e.value.status, e.value.param) == (400, "messages[0].content[0].image_url.detail")
    for detail in ("auto", "low", "high", None):
        content = [{"type": "image_url", "image_url": {"url": url, "detail": detail}}, {"type": "text", "text": "hi"}]
        assert parse_chat_request({"messages": [{"role": "user", "content": content}]},
                                  ServerSettings()).image_urls == [("messages[0].content[0].image_url", url)]


def test_a_prompt_list_mixing_strings_and_token_lists_is_refused_as_in_vllm():
    for prompt in ([[1], "a"], ["a", [1, 2]], ["a", [1], "b"]):
        with pytest.raises(ApiError, match="^prompt must be .*not strings and token lists mixed") as e:
            parse_completion_request({"prompt": prompt}, ServerSettings())
        assert (e.value.status, e.value.param) == (400, "prompt")
    assert parse_completion_request({"prompt": [[1], [2, 3]]}, ServerSettings()).prompts == [[1], [2, 3]]
    assert parse_completion_request({"prompt": ["a", "b"]}, ServerSettings()).prompts == ["a", "b"]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["m"]
    state = health(server)
    assert state["status"] == "ok" and state["max_batch"] == MAX_BATCH and state["model"] == "m"



def test_the_api_key_is_taken_whatever_the_case_of_its_scheme_and_a_wrong_key_is_a_401(server):
    """The Authorization scheme is case-insensitive (RFC 9110): `bearer KEY` is served as `Bearer KEY` is."""
    url = server[0] + "/v1/models"
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert httpx.get(url, headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    # a key that only begins the real one, or none, is wrong too
    for header in (f"Bearer {KEY}x", f"Basic {KEY}", KEY, f"Bearer {KEY[:-1]}", "Bearer"):
        reply = httpx.get(url, headers={"Authorization": header})
        assert (reply.status_code, reply.headers["www-authenticate"]) == (401, "Bearer")
    for route in ("/tokenize", "/detokenize"):  # vLLM's routes beside /v1 need the key too (README)
        reply = post_to(server, route, {"model": "m", "prompt": "hi", "tokens": [1]}, key=None)
        assert (reply.status_code, reply.json()["error"]["code"]) == (401, "invalid_api_key"), route


def test_only_bad_input_fails_a_request_in_the_worker_with_a_400():
    """An InputError is the client's (a 400); any other failure, a ValueError from a bug included, is a 500."""
    from internvl_mpo.errors import InputError
    from internvl_mpo.server.worker import _failure

    assert _failure(InputError("the prompt is empty")).status == 400
    assert [_failure(e).status for e in (ValueError("a shape"), RuntimeError("out of memory"))] == [500, 500]

def test_the_models_route_with_a_trailing_slash_lists_the_models(server):
    """GET /v1/models/ is the list, as /v1/models (FastAPI redirects a trailing slash there, as vLLM's route does):
    the model route read it as an empty id, which is served as no model at all, and answered the card."""
    auth = {"Authorization": f"Bearer {KEY}"}
    listed = httpx.get(server[0] + "/v1/models/", headers=auth)
    assert listed.status_code == 200 and listed.json() == httpx.get(server[0] + "/v1/models", headers=auth).json()
    assert httpx.get(server[0] + "/v1/models/m", headers=auth).json()["id"] == "m"


def test_unknown_routes_and_methods_get_openai_errors(server):
    missing = httpx.post(server[0] + "/v1/embeddings", json={})
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    wrong = httpx.get(server[0] + "/v1/chat/completions")
    assert wrong.status_code == 405 and set(wrong.json()["error"]) == {"message", "type", "param", "code"}
    assert wrong.headers["allow"] == "POST"  # a 405 must say what is allowed (RFC 9110)


def test_a_request_naming_another_model_is_404_and_one_naming_none_is_served(server, client):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist; this server serves `m`"):
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
    reply = post(server, json.dumps({"messages": messages, "max_tokens": 2}).encode())
    assert reply.status_code == 200 and reply.json()["model"] == "m"
    assert client.chat.completions.create(model="m", messages=messages, max_tokens=2).model == "m"
    # as in vLLM the name is checked before the rest of the body: a client pointed at the wrong server
    # learns that, not that a field it sent is refused here
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=messages, frequency_penalty=0.5)
    # a name that is not valid Unicode (a lone surrogate) is a 400, not a 500 when the 404 echoes it
    reply = post(server, b'{"model": "a\\ud800", "messages": [{"role": "user", "content": "hi"}]}')
    assert reply.status_code == 400 and "model: character 1 is a lone surrogate" in reply.json()["error"]["message"]
    reply = post(server, json.dumps({"model": 5, "messages": messages}).encode())
    assert reply.status_code == 400 and reply.json()["error"]["message"] == "model must be str, got 5"


def test_max_image_pixels_above_pillows_limit_is_honoured(server, apps, monkeypatch):
    """Pillow refuses images over twice its MAX_IMAGE_PIXELS whatever limit the server passes: a larger
    --max-image-pixels raises Pillow's limit too."""
    from PIL import Image as PILImage
    from starlette.testclient import TestClient

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # Pillow then refuses over 2000 pixels
    serve(model=str(server[1]), port=0, device="cpu", max_batch=1, max_len=1024, max_image_pixels=5000)
    buffer = io.BytesIO()
    Image.new("RGB", (90, 50), "red").save(buffer, format="PNG")  # 4500 pixels
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
    with TestClient(apps[0]) as client:
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                          "max_tokens": 1})
    assert reply.status_code == 200, reply.text


def test_prompts_fetching_from_a_slow_image_host_do_not_hold_up_other_requests(server, apps):
    """Prompts were built (remote images fetched) on the pool of 40 threads that also reads every request's body:
    40 requests waiting on a slow image host held up a text-only completion until their fetches ended. Prompts
    have threads of their own now, one per request in progress."""
    from starlette.testclient import TestClient

    release, arrived = threading.Event(), []
    host = image_server(png(28, 28), lambda path: (arrived.append(path), release.wait(120)))
    serve(model=str(server[1]), port=0, device="cpu", max_batch=4, max_len=1024, allow_remote_images=True,
          allow_private_image_hosts=True, image_timeout=120.0)
    url = f"http://127.0.0.1:{host.server_port}/slow.png"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]
    slow_replies, text_reply = [], []
    try:
        with TestClient(apps[0]) as client:
            def slow():
                slow_replies.append(client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": content}], "max_tokens": 1}).status_code)

            waiting = [threading.Thread(target=slow) for _ in range(40)]
            for thread in waiting:
                thread.start()
            deadline = time.monotonic() + 60
            while len(arrived) < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(arrived) == 40  # every one of them holds a thread in its fetch
            text = threading.Thread(target=lambda: text_reply.append(client.post(
                "/v1/completions", json={"prompt": "Hello", "max_tokens": 1}).status_code))
            text.start()
            text.join(60)
            assert text_reply == [200] and not release.is_set()  # answered while the 40 still wait
            release.set()
            for thread in waiting:
                thread.join(120)
        assert slow_replies == [200] * 40
    finally:
        release.set()
        host.shutdown()
        host.server_close()


def test_an_image_over_the_pixel_limit_names_the_server_flag_that_raises_it(server, apps):
    """The limit is the server's --max-image-pixels; the error said "pass a larger max_pixels", which no
    request can pass."""
    from starlette.testclient import TestClient

    serve(model=str(server[1]), port=0, device="cpu", max_batch=1, max_len=1024, max_image_pixels=4000)
    buffer = io.BytesIO()
    Image.new("RGB", (90, 50), "red").save(buffer, format="PNG")  # 4500 pixels
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]
    with TestClient(apps[0]) as client:
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                          "max_tokens": 1})
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "messages[0].content[1].image_url" and error["message"] == (
        f"messages[0].content[1].image_url: <{len(buffer.getvalue())} bytes>: 90x50 = 4500 pixels exceeds the limit of 4000 "
        "(possible decompression bomb; a larger --max-image-pixels of internvl-mpo serve allows it)")


def test_the_served_name_defaults_to_the_model_as_given_or_the_demo_name(server, apps):
    from starlette.testclient import TestClient

    small = {"port": 0, "device": "cpu", "max_batch": 1, "max_len": 64}
    serve(**small)  # the shipped demo model
    serve(model=str(server[1]), **small)
    serve(model=str(server[1]), served_model_name="mine", **small)
    serve(model=server[1], **small)  # a Path from Python is named as its text
    assert [TestClient(app).get("/v1/models").json()["data"][0]["id"] for app in apps] == [
        "internvl-mpo-demo", str(server[1]), "mine", str(server[1])]
    assert TestClient(apps[-1]).get("/health").json()["model"] == str(server[1])


def test_plain_answer_is_chat_and_stream_joins_to_it(client, local_chat, hf_tokenizer):
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello there"}], **GREEDY)
    answer = reply.choices[0].message.content
    assert answer.strip() == local_chat.chat("Hello there", do_sample=False, max_new_tokens=STEPS)
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(hf_tokenizer(hand_prompt("Hello there"))["input_ids"])
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    texts, finishes, usage = stream_text(client, messages=[{"role": "user", "content": "Hello there"}],
                                         stream_options={"include_usage": True}, **GREEDY)
    assert texts == {0: answer} and finishes == {0: reply.choices[0].finish_reason}
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(usage, k) for k in counts] == [getattr(reply.usage, k) for k in counts]


def test_image_input_counts_image_tokens(client, local_chat, hf_tokenizer):
    image = png(112, 56)  # 2:1 on 56-pixel tiles -> a 2x1 grid + thumbnail = 3 tiles of 4 tokens
    reply = client.chat.completions.create(model="m", messages=[user("What is it?", image)], **GREEDY)
    assert reply.choices[0].message.content.strip() == local_chat.chat(
        "What is it?", images=image, do_sample=False, max_new_tokens=STEPS)
    expanded = "<img>" + "<IMG_CONTEXT>" * 12 + "</img>\nWhat is it?"
    assert reply.usage.prompt_tokens == len(hf_tokenizer(hand_prompt(expanded))["input_ids"])


def test_multi_turn_keeps_the_image_of_the_first_turn(client, local_chat):
    image = png(56, 56, seed=1)
    messages = [user("What is it?", image), {"role": "assistant", "content": "A square."},
                {"role": "user", "content": "Are you sure?"}]
    reply = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    expected = local_chat.chat("Are you sure?", images=image, history=[("<image>\nWhat is it?", "A square.")],
                               do_sample=False, max_new_tokens=STEPS)
    assert reply.choices[0].message.content.strip() == expected
    system = [{"role": "system", "content": "You answer in French."}] + messages
    other = client.chat.completions.create(model="m", messages=system, **GREEDY)
    assert other.choices[0].message.content.strip() == local_chat.chat(
        "Are you sure?", images=image, history=[("<image>\nWhat is it?", "A square.")], do_sample=False,
        max_new_tokens=STEPS, system_message="You answer in French.")


def test_a_conversation_that_opens_with_an_assistant_greeting_is_answered(client, local_chat, hf_tokenizer):
    """[assistant, user] (a chat app's greeting first, which OpenAI and vLLM answer) was a 400 ("must start and end
    with a user message"); the greeting is the assistant's opening turn, as vLLM renders the chat template."""
    greeting = {"role": "assistant", "content": "How can I help you?"}
    for system in ([], [{"role": "system", "content": "You answer in French."}]):
        messages = system + [greeting, {"role": "user", "content": "Hello there"}]
        reply = client.chat.completions.create(model="m", messages=messages, **GREEDY)
        settings = {"system_message": "You answer in French."} if system else {}
        assert reply.choices[0].message.content.strip() == local_chat.chat(
            "Hello there", history=[(None, "How can I help you?")], do_sample=False, max_new_tokens=STEPS, **settings)
    opened = hand_prompt("Hello there").replace("<|im_start|>user\n", "<|im_start|>assistant\nHow can I help you?"
                                                "<|im_end|>\n<|im_start|>user\n", 1)
    reply = client.chat.completions.create(model="m", messages=[greeting, {"role": "user", "content": "Hello there"}],
                                           **GREEDY)
    assert reply.usage.prompt_tokens == len(hf_tokenizer(opened)["input_ids"])


def test_a_conversation_that_ends_with_an_assistant_message_is_answered_anew(server, client, local_chat,
                                                                             hf_tokenizer):
    """[user, assistant] (which OpenAI answers, and vLLM renders with its generation prompt: a new assistant turn
    after the last) was a 400 ("must end with a user message"); so was a lone assistant message."""
    greeting = {"role": "assistant", "content": "How can I help you?"}
    for messages, turns in (([{"role": "user", "content": "Hi"}, greeting], ("Hi", "How can I help you?")),
                            ([greeting], None)):
        text = hand_prompt(*turns) if turns else hand_prompt("x").replace(
            "<|im_start|>user\nx<|im_end|>\n", "<|im_start|>assistant\nHow can I help you?<|im_end|>\n")
        ids = hf_tokenizer(text)["input_ids"]
        reply = client.chat.completions.create(model="m", messages=messages, **GREEDY)
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.choices[0].message.content.strip() == engine_completion(local_chat, ids, STEPS)[0].strip()
        # without the generation prompt, as vLLM's /tokenize: the conversation as it stands
        body = {"messages": messages, "add_generation_prompt": False}
        closed = text.removesuffix("<|im_start|>assistant\n")
        assert post_to(server, "/tokenize", body).json()["tokens"] == hf_tokenizer(closed)["input_ids"]
    with pytest.raises(openai.BadRequestError, match="the conversation holds no user or assistant message"):
        client.chat.completions.create(model="m", messages=[{"role": "system", "content": "Hi"}], **GREEDY)


def test_continue_final_message_continues_the_assistant_message(server, client, local_chat, hf_tokenizer):
    """vLLM's `continue_final_message` (with `add_generation_prompt: false`, as vLLM asks) was a 400: the final
    assistant message is left open (no <|im_end|>) and the answer continues it, as transformers renders the
    template; /tokenize gives the same ids. Both flags on, or a conversation ending with a user message, is a 400."""
    cont = {"continue_final_message": True, "add_generation_prompt": False}
    for messages, text in (
            ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is "}],
             hand_prompt("Hi") + "The answer is "),
            ([{"role": "assistant", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "I"}]}],
             hand_prompt("x").replace("<|im_start|>user\nx<|im_end|>\n", "") + "Hello\nI")):
        ids = hf_tokenizer(text)["input_ids"]
        reply = client.chat.completions.create(model="m", messages=messages, extra_body=cont, **GREEDY)
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.choices[0].message.content == engine_completion(local_chat, ids, STEPS)[0].split("<|im_end|>")[0]
        assert post_to(server, "/tokenize", {"messages": messages, **cont}).json()["tokens"] == ids
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The"}]
    for body, why in (({"continue_final_message": True}, "needs add_generation_prompt: false"),
                      ({**cont, "messages": messages[:1]}, "ends with an assistant message")):
        with pytest.raises(openai.BadRequestError, match=why):
            client.chat.completions.create(model="m", messages=messages, extra_body=body, **GREEDY)
        assert post_to(server, "/tokenize", {"messages": messages, **body}).status_code == 400
    video = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}},
                                         {"type": "text", "text": "Q"}]}  # a video before the continued message
    req = parse_chat_request({"messages": [video, {"role": "assistant", "content": "It is"}], **cont}, ServerSettings())
    assert (req.question, req.answer_start, req.video_url[0]) == ("Q", "It is", "messages[0].content[0].video_url")


def test_chat_echo_puts_the_final_assistant_message_before_the_answer(server, client):
    """vLLM's chat `echo` was a 400: the final message, where it is the assistant's, goes before each answer (in a
    chunk of its own after the role when streamed); after a user message it adds nothing, as in vLLM."""
    greedy = {**GREEDY, "max_tokens": 6}
    ask = [{"role": "user", "content": "Hi"}]
    prefill = [*ask, {"role": "assistant", "content": "The answer is "}]
    cont = {"continue_final_message": True, "add_generation_prompt": False}
    for messages, extra, echoed in ((prefill, cont, "The answer is "), (prefill, {}, "The answer is "), (ask, {}, "")):
        plain = client.chat.completions.create(model="m", messages=messages, extra_body=extra, **greedy)
        reply = client.chat.completions.create(model="m", messages=messages, n=2,
                                               extra_body={**extra, "echo": True}, **greedy)
        answer = plain.choices[0].message.content
        assert [c.message.content for c in reply.choices] == [echoed + answer] * 2
        assert reply.usage.prompt_tokens == plain.usage.prompt_tokens
        texts, _, _ = stream_text(client, messages=messages, extra_body={**extra, "echo": True}, **greedy)
        assert texts == {0: echoed + answer}
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.chat.completions.create(model="m", messages=ask, extra_body={"echo": 1}, **greedy)


def clip(path: Path, size: tuple[int, int] = (64, 48)) -> bytes:
    """A 12-frame video of changing colours, written with the first encoder PyAV has (skips without one)."""
    av = pytest.importorskip("av")
    for codec in ("mpeg4", "mjpeg"):
        try:
            with av.open(str(path), "w") as container:
                stream = container.add_stream(codec, rate=4)
                stream.width, stream.height, stream.pix_fmt = *size, "yuvj420p" if codec == "mjpeg" else "yuv420p"
                for k in range(12):
                    frame = av.VideoFrame.from_image(Image.new("RGB", size, (20 * k, 100, 250 - 20 * k)))
                    for packet in [*stream.encode(frame), *(stream.encode() if k == 11 else [])]:
                        container.mux(packet)
            return path.read_bytes()
        except ValueError:  # av's UnknownCodecError
            continue
    pytest.skip("no video encoder in this PyAV build")


def test_a_video_part_is_answered_as_chat_answers_about_the_video(client, local_chat, tmp_path):
    """A `video_url` part (vLLM's) was a 400 ("content parts must be ..."); its frames now go in front of the
    question as chat(video=...) puts them, with the same answer and usage counting every frame's tokens."""
    path = tmp_path / "clip.mp4"
    url = "data:video/mp4;base64," + base64.b64encode(clip(path)).decode()
    messages = [{"role": "user", "content": [{"type": "text", "text": "What colour is it?"},
                                             {"type": "video_url", "video_url": {"url": url}}]}]
    reply = client.chat.completions.create(model="m", messages=messages, **GREEDY)
    assert reply.choices[0].message.content.strip() == local_chat.chat(
        "What colour is it?", video=path, do_sample=False, max_new_tokens=STEPS)
    assert reply.usage.prompt_tokens == len(local_chat.prepare("What colour is it?", video=path).prompt_ids)
    placed = [{"role": "user", "content": [{"type": "text", "text": "Here: <video>\nWhat colour is it?"},
                                           {"type": "video_url", "video_url": {"url": url}}]}]
    reply = client.chat.completions.create(model="m", messages=placed, **GREEDY)  # the frames at its <video>
    assert reply.usage.prompt_tokens == len(local_chat.prepare("Here: <video>\nWhat colour is it?", video=path)
                                            .prompt_ids)
    twice = [{"role": "user", "content": [{"type": "text", "text": "<video> or <video>?"},
                                          {"type": "video_url", "video_url": {"url": url}}]}]
    with pytest.raises(openai.BadRequestError, match="the question holds 2 <video> placeholders"):
        client.chat.completions.create(model="m", messages=twice, **GREEDY)
    video = {"type": "video_url", "video_url": {"url": url}}
    for content, where in (([video, video], "messages[0].content[1]"),
                           ([video, {"type": "image_url", "image_url": {"url": data_url(png(56, 56))}}],
                            "messages[0].content[0]")):
        with pytest.raises(openai.BadRequestError, match="one video, in the user message that ends the") as e:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}], **GREEDY)
        assert e.value.body["param"] == where + ".video_url"
    earlier = [{"role": "user", "content": [video]}, {"role": "assistant", "content": "Blue."},
               {"role": "user", "content": "Sure?"}]
    with pytest.raises(openai.BadRequestError, match="one video, in the user message that ends the conversation"):
        client.chat.completions.create(model="m", messages=earlier, **GREEDY)
    broken = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAAAAA"}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [broken]}], **GREEDY)
    assert e.value.body["message"].startswith("messages[0].content[0].video_url: not a video FFmpeg can read")
    assert e.value.body["code"] == "invalid_video"


def test_a_video_part_that_is_a_concat_list_reads_no_video_beside_its_temporary_file(client):
    """A video_url part holding an FFmpeg concat list ("ffconcat version 1.0 / file x/y.mp4") was answered about the
    video it names, read relative to the temporary file, so from the temporary folder (/tmp): a local file read
    without --allow-local-images (and "no such file" against "not a video" told which names exist there)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))
    try:
        clip(folder / "private.mp4")
        listing = f"ffconcat version 1.0\nfile {folder.name}/private.mp4\n".encode()
        url = "data:video/mp4;base64," + base64.b64encode(listing).decode()
        video = {"type": "video_url", "video_url": {"url": url}}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": [video]}], **GREEDY)
        assert e.value.body["code"] == "invalid_video"
    finally:
        shutil.rmtree(folder)


def test_an_image_in_a_video_part_or_a_video_in_an_image_part_is_told_the_part_to_use(client, tmp_path):
    """A JPEG sent as a video_url part got a 400 saying "pass it as an image (images= in Python, --image on the
    command line)", words for Python and the command line; a video sent as an image_url part was only "not an
    image Pillow can read". Each now says which part to send it as."""
    jpeg = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(jpeg, format="JPEG")
    video = {"type": "video_url", "video_url": {"url": "data:image/jpeg;base64," + base64.b64encode(
        jpeg.getvalue()).decode()}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [video]}], **GREEDY)
    assert e.value.body["code"] == "invalid_video"
    assert e.value.body["message"].startswith("messages[0].content[0].video_url: is an image, not a video")
    assert e.value.body["message"].endswith("; send it as an image_url part")
    image = {"type": "image_url", "image_url": {"url": "data:video/mp4;base64," + base64.b64encode(
        clip(tmp_path / "clip.mp4")).decode()}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [image]}], **GREEDY)
    assert e.value.body["code"] == "invalid_image"
    assert e.value.body["message"].endswith(": not an image Pillow can read, and it looks like a video: send it as a "
                                            "video_url part")


def test_stop_string_cuts_the_answer(client):
    messages = [{"role": "user", "content": "Count to ten."}]
    full = client.chat.completions.create(model="m", messages=messages, **LONG).choices[0].message.content
    start = next(k for k in range(3, len(full) - 2) if "\ufffd" not in full[k:k + 2] and full[k:k + 2].strip())
    stop = full[start:start + 2]
    cut = full[: full.find(stop)]
    reply = client.chat.completions.create(model="m", messages=messages, stop=[stop, "never-seen"], **LONG)
    assert reply.choices[0].message.content == cut and reply.choices[0].finish_reason == "stop"
    texts, finishes, _ = stream_text(client, messages=messages, stop=stop, **LONG)
    assert texts == {0: cut} and finishes == {0: "stop"}


def test_n_choices(client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    greedy = client.chat.completions.create(model="m", messages=messages, n=2, **LONG)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    assert greedy.usage.completion_tokens == 2 * STEPS
    sampled = {"messages": messages, "n": 2, "temperature": 1.0, "seed": 7, "max_tokens": STEPS}
    first = [c.message.content for c in client.chat.completions.create(model="m", **sampled).choices]
    again = [c.message.content for c in client.chat.completions.create(model="m", **sampled).choices]
    assert first == again  # seeded: reproducible
    assert first[0] != first[1]  # each choice gets its own seed
    texts, finishes, _ = stream_text(client, **sampled)
    assert texts == {0: first[0], 1: first[1]} and set(finishes) == {0, 1}


def test_any_int64_seed_and_max_completion_tokens(client):
    """OpenAI takes any int64 seed: it is read modulo 2**63, so -1 samples as 2**63 - 1, and choice 1 of
    that seed as seed 0. max_completion_tokens, OpenAI's current name, wins over max_tokens."""
    def answers(seed: int, n: int = 1, **kw) -> list[str]:
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Tell me a story."}],
                                               temperature=1.0, seed=seed, n=n, max_tokens=STEPS, **kw)
        return [c.message.content for c in reply.choices]

    wrapped = answers(-1, n=2)
    assert wrapped == answers(2**63 - 1, n=2) and wrapped[1] == answers(0)[0]
    both = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=STEPS,
                                          max_completion_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    assert both.usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError) as e:
        answers(0, max_completion_tokens=10**9)
    assert e.value.body["param"] == "max_completion_tokens" and "max_completion_tokens is 1000000000" in e.value.message


def test_logprobs_plain_and_streamed(client, local_chat):
    """OpenAI's logprobs.content: one entry per token of the answer (the end-of-turn token is not in the
    text), each with its text, UTF-8 bytes, log-probability and top alternatives, best first; the
    streamed chunks carry the same entries."""
    messages = [{"role": "user", "content": "Hello there"}]
    reply = client.chat.completions.create(model="m", messages=messages, logprobs=True, top_logprobs=2, **GREEDY)
    choice = reply.choices[0]
    entries = choice.logprobs.content
    stopped_by_eos = choice.finish_reason == "stop"
    assert len(entries) == reply.usage.completion_tokens - stopped_by_eos > 0
    ids = local_chat.prepare("Hello there").prompt_ids
    events = [e for step in local_chat.engine.generate(
        [Request(ids, SamplingParams(max_new_tokens=STEPS), logprobs=2)]) for e in step]
    for entry, event in zip(entries, events):
        raw = local_chat.tokenizer.token_bytes(event.token)
        assert (entry.bytes, entry.token) == (list(raw), raw.decode("utf-8", errors="replace"))
        assert entry.logprob == pytest.approx(event.logprob, abs=1e-5) and entry.logprob <= 0
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in event.top_logprobs], abs=1e-5)
        assert entry.top_logprobs[0].bytes == entry.bytes  # greedy: the chosen token is the best
    assert client.chat.completions.create(model="m", messages=messages, **GREEDY).choices[0].logprobs is None
    stream = client.chat.completions.create(model="m", messages=messages, logprobs=True, top_logprobs=2,
                                            stream=True, **GREEDY)
    streamed = [e for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert [(e.bytes, e.logprob) for e in streamed] == [(e.bytes, e.logprob) for e in entries]
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs: true"):
        client.chat.completions.create(model="m", messages=messages, top_logprobs=2, **GREEDY)
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be"):
        client.chat.completions.create(model="m", messages=messages, logprobs=True, top_logprobs=21, **GREEDY)


def engine_completion(local_chat, ids: list[int], steps: int, logprobs: int | None = None, **params):
    """(text, events) of a greedy run of the engine on the raw prompt `ids` (no chat template)."""
    request = Request(ids, SamplingParams(max_new_tokens=steps, **params), logprobs=logprobs)
    events = [e for step in local_chat.engine.generate([request]) for e in step]
    return local_chat.tokenizer.decode([e.token for e in events]), events


def stream_completion(client, **kwargs) -> tuple[dict[int, str], dict[int, str], object, list]:
    """(text per choice, finish_reason per choice, usage, chunks) of a streamed /v1/completions request."""
    texts, finishes, usage, chunks = {}, {}, None, []
    for chunk in client.completions.create(model="m", stream=True, **kwargs):
        assert chunk.object == "text_completion"
        chunks.append(chunk)
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, usage, chunks


def test_tokenize_and_detokenize_as_vllm(server, client, hf_tokenizer):
    """vLLM's /tokenize: a prompt as /v1/completions tokenizes it, or messages as a chat request would prefill
    them, image tokens included (usage.prompt_tokens of the real request; transformers' ids of the prompt
    written out), the open assistant turn left off with add_generation_prompt false; count and the
    server's max_model_len beside. /detokenize: transformers' decode of the ids, special tokens kept."""
    def tokenize(body: dict) -> dict:
        reply = post_to(server, "/tokenize", {"model": "m", **body})
        assert reply.status_code == 200, reply.text
        return reply.json()

    ids = hf_tokenizer("Hello there, <|im_end|> friend")["input_ids"]
    assert tokenize({"prompt": "Hello there, <|im_end|> friend"}) == {"count": len(ids), "max_model_len": 2048,
                                                                        "tokens": ids, "token_strs": None}
    messages = [user("What is it?", png(112, 56))]  # 3 tiles of 4 tokens, as in the image test above
    chat = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=1)
    expanded = hand_prompt("<img>" + "<IMG_CONTEXT>" * 12 + "</img>\nWhat is it?")
    tokens = tokenize({"messages": messages})["tokens"]
    assert tokens == hf_tokenizer(expanded)["input_ids"] and len(tokens) == chat.usage.prompt_tokens
    bare = tokenize({"messages": messages, "add_generation_prompt": False, "add_special_tokens": False})["tokens"]
    assert bare == hf_tokenizer(expanded.removesuffix("<|im_start|>assistant\n"))["input_ids"]
    for ids in (tokens, [], hf_tokenizer("caf\u00e9 \U0001f99c")["input_ids"][:-1]):
        reply = post_to(server, "/detokenize", {"model": "m", "tokens": ids})
        assert reply.json() == {"prompt": hf_tokenizer.decode(ids)}, reply.text
    refused = [("/tokenize", {"prompt": "a", "messages": messages}, 400, "send either prompt"),
               ("/tokenize", {}, 400, "send either prompt"),
               ("/tokenize", {"prompt": ["a"]}, 400, "prompt must be str"),
               ("/tokenize", {"prompt": "a", "return_token_strs": True}, 400, "return_token_strs is not supported"),
               ("/tokenize", {"messages": [{"role": "user", "content": "a <image>"}]}, 400, "send images as image_url"),
               ("/tokenize", {"model": "other", "prompt": "a"}, 404, "does not exist"),
               ("/detokenize", {"tokens": [1, -1]}, 400, r"tokens must be in 0\.\.\d+, got \[-1\]"),
               ("/detokenize", {"tokens": "12"}, 400, "tokens must be a list of token ids")]
    for route, body, status, message in refused:
        reply = post_to(server, route, {"model": "m", **body})
        assert reply.status_code == status and re.search(message, reply.json()["error"]["message"]), reply.text
    assert post_to(server, "/tokenize", {"prompt": "a"}, key=None).status_code == 401


def test_a_text_prompt_gets_the_bos_of_an_internlm2_tokenizer_as_vllm_adds_it(tmp_path):
    """vLLM tokenizes a /v1/completions or /tokenize text prompt with add_special_tokens (default true), so
    InternVL2.5-8B's InternLM2 tokenizer prepends <s> as the official InternLM2Tokenizer does (its BOS, then
    the slow path's ids); add_special_tokens false leaves it off, and token ids are used as sent."""
    pytest.importorskip("sentencepiece")
    from test_internlm2_tokenizer import INTERNLM2_LIKE, slow_path_ids, train, write_folder

    from internvl_mpo.chat.internlm2_tokenizer import load_internlm2_tokenizer

    folder, sp = write_folder(tmp_path / "tok", train(**INTERNLM2_LIKE))
    tokenizer = load_internlm2_tokenizer(folder)
    chat = SimpleNamespace(tokenizer=tokenizer, config=SimpleNamespace(llm=SimpleNamespace(vocab_size=len(tokenizer))))
    settings = ServerSettings()
    text = "Hello world, what is in this picture?"
    ids, bos = slow_path_ids(sp, text), sp.piece_to_id("<s>")

    def completion(**body) -> list[list[int]]:
        req = parse_completion_request(body, settings)
        return [p.ids for p in build_completion_prompts(chat, req, settings, 4096)]

    def tokenized(**body) -> list[int]:
        return tokenize_ids(chat, parse_tokenize_request(body, settings), settings, 4096)

    assert completion(prompt=text) == [[bos, *ids]] and tokenized(prompt=text) == [bos, *ids]
    assert completion(prompt=text, add_special_tokens=False) == [ids] == [tokenized(prompt=text,
                                                                                  add_special_tokens=False)]
    assert completion(prompt=[ids, ids]) == [ids, ids] and completion(prompt=[text, text]) == [[bos, *ids]] * 2


def test_text_completion_continues_the_raw_prompt(client, local_chat, hf_tokenizer):
    """/v1/completions as vLLM serves a chat model: the prompt is raw text (no chat template), tokenized
    as transformers does; max_tokens defaults to 16; a stream joins to the same text."""
    prompt = "The capital of France is"
    ids = hf_tokenizer(prompt)["input_ids"]
    expected, _ = engine_completion(local_chat, ids, STEPS)
    reply = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=STEPS)
    assert reply.object == "text_completion" and reply.model == "m" and reply.id.startswith("cmpl-")
    [choice] = reply.choices
    assert choice.text == expected and choice.index == 0 and choice.logprobs is None
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    texts, finishes, usage, _ = stream_completion(client, prompt=prompt, temperature=0, max_tokens=STEPS,
                                                  stream_options={"include_usage": True})
    assert texts == {0: expected} and finishes == {0: choice.finish_reason}
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), reply.usage.completion_tokens)
    default = client.completions.create(model="m", prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert default.usage.completion_tokens == 16 and default.choices[0].finish_reason == "length"
    as_ids = client.completions.create(model="m", prompt=ids, temperature=0, max_tokens=STEPS)
    assert as_ids.choices[0].text == expected and as_ids.usage.prompt_tokens == len(ids)
    echoed = client.completions.create(model="m", prompt=prompt, temperature=0, max_tokens=STEPS, echo=True)
    assert echoed.choices[0].text == prompt + expected
    texts, _, _, _ = stream_completion(client, prompt=prompt, temperature=0, max_tokens=STEPS, echo=True)
    assert texts == {0: prompt + expected}


def test_text_completion_of_several_prompts_and_choices(client, local_chat, hf_tokenizer):
    """As in vLLM, choice j of prompt p has index p * n + j, and usage counts each prompt once."""
    prompts = ["Once upon a time", "One, two, three,"]
    ids = [hf_tokenizer(p)["input_ids"] for p in prompts]
    expected = [engine_completion(local_chat, i, STEPS, ignore_eos=True)[0] for i in ids]
    reply = client.completions.create(model="m", prompt=prompts, n=2, **LONG)
    assert [(c.index, c.text) for c in reply.choices] == [(0, expected[0]), (1, expected[0]),
                                                          (2, expected[1]), (3, expected[1])]
    assert reply.usage.prompt_tokens == sum(map(len, ids)) and reply.usage.completion_tokens == 4 * STEPS
    texts, finishes, _, _ = stream_completion(client, prompt=[ids[0], ids[1]], n=2, **LONG)
    assert texts == {0: expected[0], 1: expected[0], 2: expected[1], 3: expected[1]}
    assert finishes == dict.fromkeys(range(4), "length")
    sampled = {"prompt": prompts[0], "n": 2, "temperature": 1.0, "seed": 7, "max_tokens": STEPS, "stop": ["\n\n"]}
    first = [c.text for c in client.completions.create(model="m", **sampled).choices]
    assert first == [c.text for c in client.completions.create(model="m", **sampled).choices]
    assert first[0] != first[1]



def test_echoed_choices_of_several_prompts_each_echo_their_own_prompt_streamed_too(client):
    """With echo, choice p * n + j begins with prompt p, plain and streamed alike."""
    prompts = ["Once upon a time", "One, two, three,", "Red"]
    body = {"prompt": prompts, "n": 2, "echo": True, "max_tokens": 2, "temperature": 0}
    plain = {c.index: c.text for c in client.completions.create(model="m", **body).choices}
    streamed, _, _, _ = stream_completion(client, **body)
    assert streamed == plain and sorted(plain) == list(range(6))
    assert all(plain[i].startswith(prompts[i // 2]) for i in range(6))

def vllm_stream_offsets(choices: list) -> list[int]:
    """The text offsets vLLM gives the streamed chunks of one choice: each chunk's first token at the length
    of the text streamed before it, then after each token's text (vLLM's completion_stream_generator)."""
    out, sent = [], 0
    for choice in choices:
        out += [sent + sum(map(len, choice.logprobs.tokens[:k])) for k in range(len(choice.logprobs.tokens))]
        sent += len(choice.text)
    return out


def test_text_completion_logprobs_are_the_legacy_format(client, local_chat, hf_tokenizer):
    """An integer `logprobs`: each token's text and log-probability, the token and its top alternatives
    as a {text: log-probability} map (where two read the same, the later one's value stands, as in vLLM's
    dict), and text offsets, as vLLM builds them; streamed chunks carry the same tokens, their offsets
    counted from the text streamed before each chunk, as vLLM counts them."""
    prompt = "Hello there"
    ids = hf_tokenizer(prompt)["input_ids"]
    _, events = engine_completion(local_chat, ids, STEPS, logprobs=2, ignore_eos=True)
    reply = client.completions.create(model="m", prompt=prompt, logprobs=2, **LONG)
    logprobs = reply.choices[0].logprobs
    texts = [token_text(local_chat, e.token) for e in events]
    assert logprobs.tokens == texts
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in events], abs=1e-5)
    shared = 0  # positions where two of the alternatives read the same (pieces of characters: "\ufffd")
    for top, text, event in zip(logprobs.top_logprobs, texts, events):
        expected = {text: event.logprob}  # the token, then its alternatives from the likeliest down
        for token, value in event.top_logprobs:
            expected[token_text(local_chat, token)] = value
        shared += len(expected) < len({event.token, *(t for t, _ in event.top_logprobs)})
        assert list(top) == list(expected) and list(top.values()) == pytest.approx(list(expected.values()), abs=1e-5)
    assert shared  # the case this checks occurs
    assert logprobs.text_offset == [sum(map(len, texts[:k])) for k in range(len(texts))]
    _, _, _, chunks = stream_completion(client, prompt=prompt, logprobs=2, **LONG)
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert [t for c in streamed for t in c.logprobs.tokens] == logprobs.tokens
    offsets = [o for c in streamed for o in c.logprobs.text_offset]
    assert offsets == vllm_stream_offsets(streamed) and offsets != logprobs.text_offset  # split characters
    assert client.completions.create(model="m", prompt=prompt, logprobs=0, **LONG).choices[0].logprobs.top_logprobs[
        0] == {texts[0]: pytest.approx(events[0].logprob, abs=1e-5)}


def test_stop_token_ids_end_the_answer_without_their_text(client, local_chat, hf_tokenizer):
    """vLLM's stop_token_ids: the answer stops at the first of them (finish_reason "stop", the token
    counted in usage), and that token's text is not in the answer, as in vLLM; also past ignore_eos."""
    ids = hf_tokenizer("Once upon a time")["input_ids"]
    _, events = engine_completion(local_chat, ids, STEPS, ignore_eos=True)
    tokens = [e.token for e in events]
    k = next(k for k in range(3, STEPS) if tokens[k] not in tokens[:k])
    expected = local_chat.tokenizer.decode(tokens[:k])
    body = {"prompt": "Once upon a time", **LONG, "extra_body": {"ignore_eos": True, "stop_token_ids": [tokens[k]]}}
    reply = client.completions.create(model="m", **body)
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "stop")
    assert reply.usage.completion_tokens == k + 1
    texts, finishes, _, _ = stream_completion(client, **body)
    assert texts == {0: expected} and finishes == {0: "stop"}
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], **LONG)
    chat_ids = local_chat.prepare("Hi").prompt_ids
    chat_tokens = [e.token for e in engine_completion(local_chat, chat_ids, STEPS, ignore_eos=True)[1]]
    k = next(k for k in range(3, STEPS) if chat_tokens[k] not in chat_tokens[:k])
    cut = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], logprobs=True,
                                         temperature=0, max_tokens=STEPS,
                                         extra_body={"ignore_eos": True, "stop_token_ids": [chat_tokens[k]]})
    assert cut.choices[0].message.content == local_chat.tokenizer.decode(chat_tokens[:k])
    assert chat.choices[0].message.content.startswith(cut.choices[0].message.content)
    assert len(cut.choices[0].logprobs.content) == k  # the stop token is not listed, as the end-of-turn token
    for value in ([-1], [True], "7", [1.5]):
        with pytest.raises(openai.BadRequestError, match="stop_token_ids must be a list of token ids"):
            client.completions.create(model="m", prompt="hi", extra_body={"stop_token_ids": value})
    for create, args in ((client.completions.create, {"prompt": "hi"}),
                         (client.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}]})):
        with pytest.raises(openai.BadRequestError, match=r"stop_token_ids must be in 0\.\.\d+, got \[2147483000\]"):
            create(model="m", **args, extra_body={"stop_token_ids": [5, 2147483000]})


def log_softmax_over(local_chat, ids: list[int]) -> torch.Tensor:
    """(T, V) log_softmax of the model's uncached forward over `ids`: row t scores token t + 1."""
    with torch.no_grad():
        return torch.log_softmax(local_chat.model(torch.tensor([ids])).float()[0], dim=-1)


def token_text(local_chat, token: int) -> str:
    return local_chat.tokenizer.token_bytes(token).decode("utf-8", errors="replace")


def test_logit_bias_forces_or_bans_tokens_on_both_endpoints_streamed_too(client, local_chat, hf_tokenizer):
    """OpenAI's logit_bias: +100 makes every greedy token the biased one, -100 on the greedy first token
    gives the model's second best; log-probabilities stay the model's own, before the bias (vLLM's default);
    streamed answers are the same."""
    ids = hf_tokenizer("Once upon a time")["input_ids"]
    first = log_softmax_over(local_chat, ids)[-1]
    words = [i for i in range(len(first)) if token_text(local_chat, i).strip().isalpha()]
    worst = min(words, key=lambda i: first[i])
    best, second = first.topk(2).indices.tolist()
    body = {"prompt": "Once upon a time", **LONG, "logprobs": 2}
    for bias, head in (({str(worst): 100}, [worst] * STEPS), ({str(best): -100.0}, [second])):
        text, events = engine_completion(local_chat, ids, STEPS, logprobs=2, ignore_eos=True,
                                         logit_bias={int(k): v for k, v in bias.items()})
        assert [e.token for e in events][: len(head)] == head
        reply = client.completions.create(model="m", logit_bias=bias, **body)
        assert reply.choices[0].text == text
        assert reply.choices[0].logprobs.token_logprobs == pytest.approx([e.logprob for e in events], abs=1e-5)
        texts, _, _, _ = stream_completion(client, logit_bias=bias, **body)
        assert texts == {0: text}
    assert reply.choices[0].logprobs.token_logprobs[0] == pytest.approx(first[second].item(), abs=1e-4)
    messages = [{"role": "user", "content": "Hello there"}]
    first = log_softmax_over(local_chat, local_chat.prepare("Hello there").prompt_ids)[-1]
    worst = min(words, key=lambda i: first[i])
    forced = client.chat.completions.create(model="m", messages=messages, logit_bias={str(worst): 100},
                                            logprobs=True, **LONG)
    assert forced.choices[0].message.content == token_text(local_chat, worst) * STEPS
    assert forced.choices[0].logprobs.content[0].logprob == pytest.approx(first[worst].item(), abs=1e-4)
    texts, _, _ = stream_text(client, messages=messages, logit_bias={str(worst): 100}, **LONG)
    assert texts == {0: forced.choices[0].message.content}
    banned = client.chat.completions.create(model="m", messages=messages, logprobs=True, **LONG,
                                            logit_bias={str(int(first.argmax())): -100})
    assert banned.choices[0].logprobs.content[0].bytes == list(local_chat.tokenizer.token_bytes(
        first.topk(2).indices[1].item()))
    assert client.chat.completions.create(model="m", messages=messages, logit_bias={}, **LONG).choices[0] \
        .message.content == client.chat.completions.create(model="m", messages=messages, **LONG).choices[0].message.content


def test_response_format_json_object_answers_a_json_object_and_json_schema_a_valid_value(client, local_chat):
    """JSON mode on both endpoints, streamed too: the answer is the constrained chat()'s, a JSON object once it stops
    (the tiny random model is nudged to close it by a logit bias, which leaves the constraint whole). A JSON schema
    (OpenAI's response_format, vLLM's guided_json) is answered with a value it takes; one with a keyword this server
    does not support is a 400 naming it."""
    tokenizer = local_chat.tokenizer
    closing = [i for i in range(len(tokenizer)) if not tokenizer.is_special(i) and b"}" in tokenizer.token_bytes(i)]
    bias = {**dict.fromkeys(closing, 4.0), tokenizer.im_end_id: 4.0}
    expected = local_chat.chat("Describe it as JSON.", json_mode=True, do_sample=False, max_new_tokens=40,
                               logit_bias=bias)
    assert isinstance(json.loads(expected), dict)
    body = {"messages": [{"role": "user", "content": "Describe it as JSON."}], "temperature": 0, "max_tokens": 40,
            "logit_bias": {str(k): v for k, v in bias.items()}, "response_format": {"type": "json_object"}}
    reply = client.chat.completions.create(model="m", **body)
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content.strip() == expected
    texts, finishes, _ = stream_text(client, **body)
    assert texts == {0: reply.choices[0].message.content} and finishes == {0: "stop"}
    completion = client.completions.create(model="m", prompt="{", max_tokens=40, temperature=0,
                                           logit_bias=body["logit_bias"],
                                           extra_body={"response_format": {"type": "json_object"}})
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(completion.choices[0].text), dict)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "kind": {"enum": ["cat", "dog", None]}},
              "required": ["ok", "kind"], "additionalProperties": False}
    padding = [i for i in range(len(tokenizer)) if not tokenizer.is_special(i)  # away from escapes and whitespace
               and (b"\\" in tokenizer.token_bytes(i) or tokenizer.token_bytes(i).strip() == b"")]
    bias = {**bias, **dict.fromkeys(padding, -4.0)}
    body["logit_bias"] = {str(k): v for k, v in bias.items()}
    expected = local_chat.chat("Describe it as JSON.", json_schema=schema, do_sample=False, max_new_tokens=40,
                               logit_bias=bias)
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    reply = client.chat.completions.create(model="m", **{**body, "response_format": response_format})
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content.strip() == expected
    value = json.loads(expected)
    assert list(value) == ["ok", "kind"] and isinstance(value["ok"], bool) and value["kind"] in ("cat", "dog", None)
    completion = client.completions.create(model="m", prompt="{", max_tokens=40, temperature=0,
                                           logit_bias=body["logit_bias"], extra_body={"guided_json": schema})
    assert completion.choices[0].finish_reason == "stop"
    assert list(json.loads(completion.choices[0].text)) == ["ok", "kind"]
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "not": {"const": 5}}}}
    with pytest.raises(openai.BadRequestError, match='the keyword .not. at # is not supported'):
        client.chat.completions.create(model="m", **{**body, "response_format": bad})
    for text, why in (("[" * 5000 + "]" * 5000, "nested too deeply"), ("7" * 5000, "an integer of more than")):
        with pytest.raises(openai.BadRequestError, match=f"guided_json is not JSON: its JSON .*{why}"):  # was a 500
            client.completions.create(model="m", prompt="{", max_tokens=4, extra_body={"guided_json": text})


def test_guided_regex_and_choice_in_their_four_forms_and_their_400s():
    """vLLM's guided_regex and guided_choice, and structured_outputs {"regex"} / {"choice"}, on both endpoints; more
    than one constraint, a regex this server does not take, a choice that is not a non-empty list of strings, and
    min_tokens beside them are 400s naming them."""
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for parse, body in ((parse_chat_request, chat), (parse_completion_request, {"prompt": "hi"})):
        def params(**fields):
            return parse({**body, **fields}, ServerSettings()).params

        assert params(guided_regex=r"\d+").regex == r"\d+" and params(guided_regex=r"\d+").choice is None
        assert params(guided_choice=["yes", "no"]).choice == ("yes", "no")
        assert params(structured_outputs={"regex": "a|b", "json": None}).regex == "a|b"
        assert params(structured_outputs={"choice": ["a"], "json_object": False}).choice == ("a",)
        assert params(guided_regex="a", response_format={"type": "text"}).regex == "a"
        for fields, message, param in (
                ({"guided_regex": "a", "guided_choice": ["a"]}, "^give one of guided_regex and guided_choice, not more",
                 "guided_choice"),
                ({"guided_json": {}, "guided_regex": "a"}, "^give one of guided_json and guided_regex, not more",
                 "guided_regex"),
                ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]},
                 "^give one of response_format and guided_choice", "guided_choice"),
                ({"guided_regex": "a", "structured_outputs": {"json": {}}},
                 "^give one of guided_regex and structured_outputs", "structured_outputs"),
                ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "with both regex and choice",
                 "structured_outputs"),
                ({"structured_outputs": {"json": {}, "regex": "a"}}, "with both json and regex", "structured_outputs"),
                ({"structured_outputs": {"json": {}, "regex": "a", "grammar": 'root ::= "a"'}},
                 "with json, regex and grammar:", "structured_outputs"),  # the third was not named
                ({"guided_regex": "a(?=b)"}, r"^guided_regex: regex 'a\(\?=b\)': a lookaround \(\?= at position 1 is "
                 "not supported$", "guided_regex"),
                ({"structured_outputs": {"regex": r"\1"}}, r"^structured_outputs.regex: regex '\\\\1': a backreference",
                 "structured_outputs"),
                ({"guided_regex": "a{2000}"}, "over the limit of 1000", "guided_regex"),
                ({"guided_regex": ["a"]}, r'^guided_regex must be a string \(a regular expression\), got \["a"\]$',
                 "guided_regex"),
                ({"guided_choice": []}, "^guided_choice must be a non-empty list of strings, got \\[\\]$",
                 "guided_choice"),
                ({"guided_choice": ["a", 1]}, "^guided_choice must be a non-empty list of strings", "guided_choice"),
                ({"guided_choice": "yes"}, "^guided_choice must be a non-empty list of strings", "guided_choice"),
                ({"structured_outputs": {"choice": {}}}, "^structured_outputs.choice must be a non-empty list",
                 "structured_outputs"),
                ({"guided_choice": ["\ud800"]}, "^guided_choice: choice 0 .* holds a lone surrogate", "guided_choice"),
                ({"guided_choice": [f"w{i}" for i in range(20000)]}, "^guided_choice: the regex is too large",
                 "guided_choice"),  # was "guided_choice: choice: the regex ..."
                ({"structured_outputs": {"choice": ["a" * 1000] * 200}},
                 "^structured_outputs.choice: the regex is too large", "structured_outputs"),
                ({"guided_regex": "a", "min_tokens": 2}, "^min_tokens does not go with guided_regex: the answer may be "
                 "complete", "min_tokens"),
                ({"structured_outputs": {"choice": ["a"]}, "min_tokens": 1},
                 "^min_tokens does not go with structured_outputs choice", "min_tokens"),
                ({"guided_choice": ["a"], "ignore_eos": True}, r"^ignore_eos with guided_choice needs stop_token_ids: "
                 r"the answer ends with a stop token once its text is accepted; give stop_token_ids \(ignore_eos",
                 "ignore_eos"),
                ({"structured_outputs": {"regex": "a"}, "ignore_eos": True},
                 "^ignore_eos with structured_outputs regex needs stop_token_ids", "ignore_eos")):
            with pytest.raises(ApiError, match=message) as e:
                params(**fields)
            assert (e.value.status, e.value.param) == (400, param), fields
        assert params(guided_choice=["a"], ignore_eos=True, stop_token_ids=[5]).choice == ("a",)


def test_guided_choice_and_regex_answers_on_both_endpoints_streamed_too(client, local_chat):
    """A guided_choice answer is one of the choices and a guided_regex one matches the regex when it stops (the
    chat()'s answer under the same constraint); streamed, the pieces join to it."""
    choices = ["yes", "no", "a cat 😀"]
    expected = local_chat.chat("Is it a cat?", choice=choices, do_sample=False, max_new_tokens=20)
    assert expected in choices
    body = {"messages": [{"role": "user", "content": "Is it a cat?"}], "temperature": 0, "max_tokens": 20}
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        reply = client.chat.completions.create(model="m", **body, extra_body=extra)
        assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content == expected
    texts, finishes, _ = stream_text(client, **body, extra_body={"guided_choice": choices})
    assert texts == {0: expected} and finishes == {0: "stop"}
    pattern = r"(\d{1,3}|many) (cats|dogs)"
    expected = local_chat.chat("How many cats?", regex=pattern, do_sample=False, max_new_tokens=20)
    assert re.fullmatch(pattern, expected), expected
    body["messages"] = [{"role": "user", "content": "How many cats?"}]
    for extra in ({"guided_regex": pattern}, {"structured_outputs": {"regex": pattern}}):
        reply = client.chat.completions.create(model="m", **body, extra_body=extra)
        assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content == expected
    completion = client.completions.create(model="m", prompt="The answer is", max_tokens=20, temperature=0.8,
                                           seed=3, n=3, extra_body={"guided_regex": pattern})
    for choice in completion.choices:
        assert choice.finish_reason == "stop" and re.fullmatch(pattern, choice.text), choice.text
    completion = client.completions.create(model="m", prompt="Yes or no?", max_tokens=20, temperature=0,
                                           extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert completion.choices[0].text in ("yes", "no")
    with pytest.raises(openai.BadRequestError, match="guided_regex: regex .* a backreference"):
        client.chat.completions.create(model="m", **body, extra_body={"guided_regex": r"(a)\1"})


def test_the_openai_clients_pydantic_parse_gets_a_parsed_answer(client, local_chat):
    """The openai client's parse() and stream() with a Pydantic model as response_format (a tagged union, which
    Pydantic writes with a `discriminator` beside its oneOf, an enum, an optional nested model with a description
    beside its $ref): the answer stops and the client fills `.parsed` (the tiny random model is nudged to close
    strings and objects by a logit bias, which leaves the constraint whole)."""
    from enum import Enum
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, Field

    class Size(Enum):
        small = "small"
        big = "big"

    class Cat(BaseModel):
        pet_type: Literal["cat"]
        indoor: bool

    class Dog(BaseModel):
        pet_type: Literal["dog"]
        size: Size

    class Owner(BaseModel):
        name: str

    class Pet(BaseModel):
        pet: Union[Cat, Dog] = Field(discriminator="pet_type")
        owner: Optional[Owner] = Field(description="who owns it")

    tokenizer = local_chat.tokenizer
    pieces = {i: tokenizer.token_bytes(i) for i in range(len(tokenizer)) if not tokenizer.is_special(i)}
    bias = {**{str(i): 4 for i, piece in pieces.items() if any(c in piece for c in b'}]",')},
            **{str(i): -4 for i, piece in pieces.items() if b"\\" in piece or piece.strip() == b""},
            str(tokenizer.im_end_id): 4}
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    body = {"model": "m", "messages": [{"role": "user", "content": "Describe the pet."}], "response_format": Pet,
            "temperature": 0, "max_tokens": 400, "logit_bias": bias}
    reply = parse(**body)
    assert reply.choices[0].finish_reason == "stop" and isinstance(reply.choices[0].message.parsed, Pet)
    assert reply.choices[0].message.parsed == Pet.model_validate_json(reply.choices[0].message.content)
    stream = getattr(client.chat.completions, "stream", None) or client.beta.chat.completions.stream
    with stream(**body) as events:
        final = events.get_final_completion()
    assert final.choices[0].message.parsed == reply.choices[0].message.parsed


def worker_texts(local_chat, requests: list[Request]) -> tuple[list[str], dict]:
    """The answers of `requests` joined in one batch of the server's worker, and its stats."""
    texts, finals = [""] * len(requests), Finals()
    worker = BatchWorker(local_chat, max_batch=len(requests), max_len=256)
    for i, request in enumerate(requests):
        def deliver(item, i=i, last=finals.deliver(str(i))) -> None:
            assert not isinstance(item, Exception), item
            texts[i] += item.text
            last(item)
        worker.submit(Job(request, 0, deliver))
    worker.start()
    try:
        assert finals.wait(len(requests))
    finally:
        worker.stop()
    return texts, worker.stats


def test_a_request_with_a_logit_bias_leaves_the_one_batched_beside_it_as_it_is_alone(local_chat):
    """Two requests for one prompt, decoded side by side (the second copies the first's prefilled cache),
    one with a bias that bans the greedy tokens: each answers as it does alone."""
    ids = local_chat.prepare("Hello there").prompt_ids
    plain = SamplingParams(max_new_tokens=STEPS, ignore_eos=True)
    alone, _ = worker_texts(local_chat, [Request(ids, plain)])
    tokens = [e.token for e in engine_completion(local_chat, ids, STEPS, ignore_eos=True)[1]]
    biased = dataclasses.replace(plain, logit_bias={t: -100 for t in tokens})
    banned, _ = worker_texts(local_chat, [Request(ids, biased)])
    assert banned != alone
    for order in ((plain, biased), (biased, plain)):
        texts, stats = worker_texts(local_chat, [Request(ids, p) for p in order])
        assert stats["max_active"] == 2
        assert texts == [alone[0] if p is plain else banned[0] for p in order]


def test_bad_logit_biases_are_400s_naming_the_entry(server, client, local_chat):
    vocab = local_chat.config.llm.vocab_size
    cases = {"logit_bias keys must be token ids written as decimal integers, got \"abc\"": {"abc": 1},
             "logit_bias keys must be token ids written as decimal integers, got \"1.5\"": {"1.5": 1},
             "logit_bias[\"5\"] must be a number from -100 to 100, got 101": {"5": 101},
             "logit_bias[\"5\"] must be a number from -100 to 100, got -100.5": {"5": -100.5},
             "logit_bias[\"5\"] must be a number from -100 to 100, got \"1\"": {"5": "1"},
             "logit_bias[\"5\"] must be a number from -100 to 100, got true": {"5": True},
             "logit_bias[\"5\"] must be a number from -100 to 100, got null": {"5": None},
             "logit_bias must be an object mapping token ids (as strings) to biases": [5],
             f"logit_bias keys must be token ids in 0..{vocab - 1}, got [-1, {vocab}]": {"3": 1, str(vocab): 1,
                                                                                         "-1": 1},
             "logit_bias has 1025 entries; this server accepts at most 1024": {str(i): 1 for i in range(1025)}}
    for message, bias in cases.items():
        for create, args in ((client.completions.create, {"prompt": "hi"}),
                             (client.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}]})):
            with pytest.raises(openai.BadRequestError, match=re.escape(message)) as e:
                create(model="m", **args, logit_bias=bias, max_tokens=2)
            assert e.value.body["param"] == "logit_bias"
    reply = post(server, b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": NaN}}')
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "logit_bias[\"5\"] must be a number from -100 to 100, got NaN"
    # 1024 keys, the most taken, over fewer ids: "5", "05" and "005" are token 5, as vLLM's int() reads them
    keys = {"0" * (i // 500) + str(i % 500): -1 for i in range(1024)}
    assert client.completions.create(model="m", prompt="hi", logit_bias=keys, max_tokens=2).usage.completion_tokens


def lm_eval_reading(reply: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """What lm-evaluation-harness' `local-completions` takes from an echo reply (its parse_logprobs): per
    choice in index order, the sum of token_logprobs from ctxlen up to the last (generated) token, and
    whether each of those equals the largest value of its top_logprobs map."""
    out = []
    for choice, ctxlen in zip(sorted(reply["choices"], key=lambda c: c["index"]), ctxlens):
        values = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        out.append((sum(values), all(v == max(top.values()) for v, top in zip(values, tops))))
    return out


def test_echo_with_logprobs_scores_a_continuation_as_lm_eval_reads_it(server, local_chat, hf_tokenizer):
    """lm-eval's `local-completions` scores a continuation with one request per batch: the token ids of
    context + continuation, echo, logprobs 1, max_tokens 1, temperature 0. The echoed prompt's tokens lead
    `logprobs` (the first with null log-probability and alternatives) and the generated token ends it; the
    sum over the continuation and the greedy flag equal the model's uncached forward (lm-eval's own
    parse_logprobs reads the reply where lm-eval is installed). vLLM's prompt_logprobs comes alongside."""
    contexts = [hf_tokenizer(c)["input_ids"] for c in ("The capital of France is", "One, two, three,")]
    greedy = [e.token for e in engine_completion(local_chat, contexts[1], 3, ignore_eos=True)[1]]
    tokens = [contexts[0] + hf_tokenizer(" Paris, of course")["input_ids"], contexts[1] + greedy]
    ctxlens = [len(c) for c in contexts]
    body = {"model": "m", "prompt": tokens, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    response = httpx.post(server[0] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=120)
    assert response.status_code == 200, response.text
    reply = response.json()
    try:
        from lm_eval.models.openai_completions import LocalCompletionsAPI
        read = LocalCompletionsAPI.parse_logprobs(reply, tokens=tokens, ctxlens=ctxlens)
    except ImportError:  # lm-eval is heavy (datasets, scikit-learn, ...): not a test dependency
        read = lm_eval_reading(reply, ctxlens)
    assert [flag for _, flag in read] == [False, True]
    for (total, _), ids, ctxlen, choice in zip(read, tokens, ctxlens, reply["choices"]):
        logp = log_softmax_over(local_chat, ids)
        targets = torch.tensor(ids[ctxlen:])
        assert total == pytest.approx(logp[ctxlen - 1 : -1].gather(1, targets[:, None]).sum().item(), abs=1e-4)
        logprobs = choice["logprobs"]
        generated = int(logp[-1].argmax())
        assert choice["text"] == local_chat.tokenizer.decode(ids, skip_special_tokens=False) + \
            local_chat.tokenizer.decode([generated])
        assert logprobs["tokens"] == [token_text(local_chat, t) for t in ids + [generated]]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        expected = [logp[t - 1, ids[t]].item() for t in range(1, len(ids))] + [logp[-1, generated].item()]
        assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
        assert logprobs["text_offset"] == [sum(map(len, logprobs["tokens"][:k])) for k in range(len(ids) + 1)]
        prompt_logprobs = choice["prompt_logprobs"]  # vLLM's: the token, then the top 1, with ranks
        assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
        for t in range(1, len(ids)):
            value = logp[t - 1, ids[t]]
            ranked = prompt_logprobs[t]
            assert ranked[str(ids[t])]["logprob"] == logprobs["token_logprobs"][t]
            assert ranked[str(ids[t])]["rank"] == int((logp[t - 1] >= value).sum())
            assert ranked[str(ids[t])]["decoded_token"] == token_text(local_chat, ids[t])
            best = int(logp[t - 1].argmax())
            assert ranked[str(best)]["rank"] == 1 and len(ranked) == (1 if best == ids[t] else 2)
    assert reply["usage"] == {"prompt_tokens": sum(map(len, tokens)), "completion_tokens": 2,
                              "total_tokens": sum(map(len, tokens)) + 2}


def test_prompt_logprobs_of_a_token_among_the_alternatives_take_its_rank_there_as_vllms_dict():
    """vLLM builds a prompt token's map as {token: its rank, then alternative j: rank j}, so a token that is
    also an alternative keeps its place first and ends with rank j; where its log-probability ties a likelier-
    ranked alternative (common in bf16), j differs from its own rank (1 + how many others are at least as
    likely). Hand-built entries: token 5 ties token 7 and topk put 5 first."""
    from internvl_mpo.server.app import _vllm_prompt_logprobs

    def entry(i: int, token: str) -> dict:
        return {"id": i, "token": token, "logprob": -1.0}

    prompt = [{**entry(3, "x"), "logprob": None, "rank": None, "top_logprobs": None},
              {**entry(5, "a"), "rank": 2, "top_logprobs": [entry(5, "a"), entry(7, "b"), entry(9, "c")]}]
    a, b = {"logprob": -1.0, "decoded_token": "a"}, {"logprob": -1.0, "decoded_token": "b"}
    assert _vllm_prompt_logprobs(prompt, 2) == [None, {"5": {**a, "rank": 1}, "7": {**b, "rank": 2}}]
    assert list(_vllm_prompt_logprobs(prompt, 2)[1]) == ["5", "7"]
    assert _vllm_prompt_logprobs(prompt, 0) == [None, {"5": {**a, "rank": 2}}]


def test_max_tokens_0_echoes_the_prompt_and_its_logprobs_alone(client, local_chat, hf_tokenizer):
    """As vLLM: max_tokens 0 (only with echo) answers the prompt and, with logprobs, its tokens'
    log-probabilities and alternatives (the uncached forward's), counting no completion tokens; n choices,
    several prompts, token id prompts and a stream (one chunk per choice) give the same."""
    prompt = "Once upon a time"
    ids = hf_tokenizer(prompt)["input_ids"]
    logp = log_softmax_over(local_chat, ids)
    reply = client.completions.create(model="m", prompt=prompt, echo=True, max_tokens=0, logprobs=2, n=2)
    texts = [token_text(local_chat, t) for t in ids]
    for choice in reply.choices:
        assert (choice.text, choice.finish_reason, choice.model_extra["stop_reason"]) == (prompt, "length", None)
        logprobs = choice.logprobs
        assert logprobs.tokens == texts and logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert logprobs.text_offset == [sum(map(len, texts[:k])) for k in range(len(ids))]
        for t in range(1, len(ids)):
            best = logp[t - 1].topk(2)
            expected = {texts[t]: logp[t - 1, ids[t]].item()}
            for token, value in zip(best.indices.tolist(), best.values.tolist()):
                expected.setdefault(token_text(local_chat, token), value)
            assert logprobs.token_logprobs[t] == pytest.approx(expected[texts[t]], abs=1e-4)
            assert list(logprobs.top_logprobs[t]) == list(expected)
            assert list(logprobs.top_logprobs[t].values()) == pytest.approx(list(expected.values()), abs=1e-4)
    assert [c.logprobs.model_dump() for c in reply.choices[1:]] == [reply.choices[0].logprobs.model_dump()]
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(ids), 0)
    _, finishes, usage, chunks = stream_completion(client, prompt=prompt, echo=True, max_tokens=0, logprobs=2, n=2,
                                                   stream_options={"include_usage": True})
    for index in range(2):
        [choice] = [c for chunk in chunks for c in chunk.choices if c.index == index]
        assert (choice.text, choice.finish_reason) == (prompt, "length")
        assert choice.logprobs.model_dump() == reply.choices[0].logprobs.model_dump()
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), 0)
    hello = hf_tokenizer("Hello there")["input_ids"]  # a list is all token lists or all strings, as in vLLM
    several = client.completions.create(model="m", prompt=[ids, hello], echo=True, max_tokens=0, logprobs=0)
    assert [c.text for c in several.choices] == [prompt, "Hello there"]
    assert several.choices[0].logprobs.token_logprobs == reply.choices[0].logprobs.token_logprobs
    assert several.usage.prompt_tokens == len(ids) + len(hf_tokenizer("Hello there")["input_ids"])
    plain = client.completions.create(model="m", prompt=prompt, echo=True, max_tokens=0)
    assert (plain.choices[0].text, plain.choices[0].logprobs, plain.usage.completion_tokens) == (prompt, None, 0)
    texts, _, _, _ = stream_completion(client, prompt=prompt, echo=True, max_tokens=0)
    assert texts == {0: prompt}


def test_echoed_logprobs_stream_with_the_first_token_as_in_vllm(client, local_chat, hf_tokenizer):
    """A streamed echo with logprobs: each choice's first chunk carries the prompt and its log-probabilities
    with the first generated token's; the chunks join to the non-streamed answer, and their text offsets
    count on from the text streamed before, the echoed prompt included (as in vLLM since its PR #47815:
    a prompt whose emoji is split over three tokens reads 2 characters shorter than its tokens)."""
    prompt = "Hello \U0001f99c there"
    body = {"prompt": prompt, "echo": True, "logprobs": 1, **LONG}
    reply = client.completions.create(model="m", **body)
    _, _, _, chunks = stream_completion(client, **body)
    streamed = [c.choices[0] for c in chunks if c.choices]
    assert streamed[0].text.startswith(prompt) and "".join(c.text for c in streamed) == reply.choices[0].text
    for key in ("tokens", "token_logprobs", "top_logprobs"):
        assert [v for c in streamed for v in getattr(c.logprobs, key)] == getattr(reply.choices[0].logprobs, key)
    ids = hf_tokenizer(prompt)["input_ids"]
    assert sum(len(token_text(local_chat, t)) for t in ids) > len(prompt)
    assert [o for c in streamed for o in c.logprobs.text_offset] == vllm_stream_offsets(streamed)
    assert len(reply.choices[0].logprobs.tokens) == len(ids) + STEPS


def test_more_stop_strings_than_openais_4_as_vllm_and_lm_eval_send_them(client, local_chat, hf_tokenizer):
    """lm-eval's local-completions sends a task's `until` strings and the end-of-text token as `stop`, often
    more than OpenAI's 4, and vLLM takes any number: up to 64 are taken, the earliest match cutting."""
    ids = hf_tokenizer("Once upon a time")["input_ids"]
    full, _ = engine_completion(local_chat, ids, STEPS, ignore_eos=True)
    stop = full.strip()[:1]
    stops = [f"\x00never{k}" for k in range(63)] + [stop]
    choice = client.completions.create(model="m", prompt="Once upon a time", **LONG, stop=stops).choices[0]
    assert (choice.text, choice.finish_reason, choice.model_extra["stop_reason"]) == \
        (full[: full.index(stop)], "stop", stop)
    chat = [{"role": "user", "content": "Hi"}]
    assert client.chat.completions.create(model="m", messages=chat, **LONG, stop=stops).choices[0].message.content
    for create, args in ((client.completions.create, {"prompt": "Once upon a time"}),
                         (client.chat.completions.create, {"messages": chat})):
        with pytest.raises(openai.BadRequestError, match="a list of at most 64 of them"):
            create(model="m", **args, stop=stops + ["one more"])


def test_continuous_usage_stats_put_usage_on_every_chunk_as_vllm(client, hf_tokenizer):
    """vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk carries usage, its
    choice's prompt and the tokens that choice has so far (0 on a chat's opening role chunks); the last
    usage chunk is unchanged. Without include_usage it adds nothing, as in vLLM."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    messages = [{"role": "user", "content": "Hello there"}]
    prompt_tokens = len(hf_tokenizer(hand_prompt("Hello there"))["input_ids"])
    chunks = list(client.chat.completions.create(model="m", messages=messages, n=2, stream=True,
                                                 stream_options=options, **LONG))
    seen: dict[int, list[int]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        assert chunk.usage.prompt_tokens == prompt_tokens
        assert chunk.usage.total_tokens == prompt_tokens + chunk.usage.completion_tokens
        seen[choice.index].append(chunk.usage.completion_tokens)
    for counts in seen.values():
        assert counts[0] == 0 and counts == sorted(counts) and counts[-1] == STEPS and len(set(counts)) > 2
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 2 * STEPS
    prompts = ["Hello there", "Once upon a time"]
    lengths = [len(hf_tokenizer(p)["input_ids"]) for p in prompts]
    _, _, usage, chunks = stream_completion(client, prompt=prompts, stream_options=options, **LONG)
    last = {}
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        assert chunk.usage.prompt_tokens == lengths[choice.index]
        assert chunk.usage.completion_tokens >= last.get(choice.index, 1)
        last[choice.index] = chunk.usage.completion_tokens
    assert last == {0: STEPS, 1: STEPS} and usage.prompt_tokens == sum(lengths)
    for chunk in client.chat.completions.create(model="m", messages=messages, stream=True, **LONG,
                                                stream_options={"continuous_usage_stats": True}):
        assert chunk.usage is None


def test_stop_reason_names_the_stop_string_or_stop_token_as_vllm(client, local_chat, hf_tokenizer):
    """vLLM's stop_reason on every choice, streamed and not, on both endpoints: the stop string that cut
    the text, the stop token id that ended it (listed in a text completion's logprobs, as vLLM lists every
    counted token), null for a length cut."""
    ids = hf_tokenizer("Once upon a time")["input_ids"]
    full, events = engine_completion(local_chat, ids, STEPS, ignore_eos=True)
    tokens = [e.token for e in events]
    k = next(k for k in range(3, STEPS) if tokens[k] not in tokens[:k])
    stop = full.strip()[:1]
    cases = [({}, "length", None),
             ({"stop": ["\x00never", stop]}, "stop", stop),
             ({"extra_body": {"ignore_eos": True, "stop_token_ids": [tokens[k]]}, "logprobs": 0}, "stop", tokens[k])]
    for extra, finish, reason in cases:
        body = {"prompt": "Once upon a time", **LONG, **extra}
        choice = client.completions.create(model="m", **body).choices[0]
        assert (choice.finish_reason, choice.model_extra["stop_reason"]) == (finish, reason)
        last = [c for chunk in stream_completion(client, **body)[3] for c in chunk.choices][-1]
        assert (last.finish_reason, last.model_extra["stop_reason"]) == (finish, reason)
    assert choice.logprobs.tokens[-1] == token_text(local_chat, tokens[k]) and len(choice.logprobs.tokens) == k + 1
    chat_ids = local_chat.prepare("Hi").prompt_ids
    chat_tokens = [e.token for e in engine_completion(local_chat, chat_ids, STEPS, ignore_eos=True)[1]]
    k = next(k for k in range(3, STEPS) if chat_tokens[k] not in chat_tokens[:k])
    for extra, finish, reason in [({}, "length", None),
                                  ({"extra_body": {"ignore_eos": True, "stop_token_ids": [chat_tokens[k]]}}, "stop",
                                   chat_tokens[k])]:
        body = {"messages": [{"role": "user", "content": "Hi"}], **LONG, **extra}
        choice = client.chat.completions.create(model="m", **body).choices[0]
        assert (choice.finish_reason, choice.model_extra["stop_reason"]) == (finish, reason)
        last = [c for chunk in client.chat.completions.create(model="m", stream=True, **body) for c in chunk.choices][-1]
        assert (last.finish_reason, last.model_extra["stop_reason"]) == (finish, reason)


def test_prompt_logprobs_of_a_chat_request_as_vllm(client, local_chat):
    """vLLM's prompt_logprobs on /v1/chat/completions: one entry per prompt token of the templated
    conversation (the first null), on the response, from the uncached forward; refused with a stream."""
    ids = local_chat.prepare("Hi").prompt_ids
    logp = log_softmax_over(local_chat, ids)
    messages = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=2, n=2,
                                           extra_body={"prompt_logprobs": 0})
    prompt_logprobs = reply.model_extra["prompt_logprobs"]
    assert len(prompt_logprobs) == len(ids) == reply.usage.prompt_tokens and prompt_logprobs[0] is None
    for t in range(1, len(ids)):
        assert list(prompt_logprobs[t]) == [str(ids[t])]
        assert prompt_logprobs[t][str(ids[t])]["logprob"] == pytest.approx(logp[t - 1, ids[t]].item(), abs=1e-4)
    assert client.chat.completions.create(model="m", messages=messages, max_tokens=2).model_extra[
        "prompt_logprobs"] is None
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs are not available with stream: true"):
        client.chat.completions.create(model="m", messages=messages, stream=True, extra_body={"prompt_logprobs": 1})


def test_min_tokens_holds_stop_strings_back_as_vllm(client, local_chat, hf_tokenizer):
    """vLLM's min_tokens: a stop string counts only where it ends in the text after the first min_tokens
    tokens, so the answer that the first token's text cut to "" runs on; min_tokens over max_tokens is a 400."""
    ids = hf_tokenizer("Once upon a time")["input_ids"]
    full, events = engine_completion(local_chat, ids, STEPS, ignore_eos=True)
    stop = full.strip()[:1]
    assert stop and full.find(stop) <= len(local_chat.tokenizer.decode([events[0].token]))
    body = {"prompt": "Once upon a time", "stop": stop, **LONG}
    assert client.completions.create(model="m", **body).choices[0].text == full[: full.find(stop)]
    seen = len(local_chat.tokenizer.decode([e.token for e in events[:4]]))
    cut = full.find(stop, seen - len(stop) + 1)
    expected = full if cut < 0 else full[:cut]
    held = {**body, "extra_body": {"ignore_eos": True, "min_tokens": 4}}
    assert client.completions.create(model="m", **held).choices[0].text == expected
    assert stream_completion(client, **held)[0] == {0: expected}
    with pytest.raises(openai.BadRequestError, match="min_tokens is 30, more than the 24 tokens"):
        client.completions.create(model="m", **{**body, "extra_body": {"min_tokens": 30}})
    with pytest.raises(openai.BadRequestError, match="min_tokens is 17, more than the 16 tokens"):
        client.completions.create(model="m", prompt="hi", extra_body={"min_tokens": 17})  # the default max_tokens
    with pytest.raises(openai.BadRequestError, match="min_tokens must be at least 0"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"min_tokens": -1})


def test_bad_text_completions_get_openai_errors(server, client, local_chat):
    vocab = local_chat.config.llm.vocab_size
    bad = {
        "max_tokens must be at least 1, got 0": {"prompt": "hi", "max_tokens": 0},  # as vLLM: 0 only with echo
        "prompt_logprobs are not available with stream: true": {"prompt": "hi", "prompt_logprobs": 1, "stream": True},
        # 0 too, as vLLM refuses any value with a stream (it was dropped without a word)
        "prompt_logprobs are not available with stream": {"prompt": "hi", "prompt_logprobs": 0, "stream": True},
        "prompt_logprobs must be between 0 and 20, got 21": {"prompt": "hi", "prompt_logprobs": 21},
        "min_tokens is 1, more than the 0 tokens": {"prompt": "hi", "echo": True, "max_tokens": 0, "min_tokens": 1},
        "suffix is not supported": {"prompt": "hi", "suffix": "end"},
        "best_of other than 1 is not supported": {"prompt": "hi", "best_of": 2},
        "prompt must be a string, a list of strings": {"prompt": []},
        "prompt must be a string, a list of strings,": {"prompt": [True, 2]},
        "prompt[0] is empty": {"prompt": ""},
        "prompt[1]: token ids must be in 0..": {"prompt": [[1, 2], [vocab]]},
        "prompt[0] holds the image-context token <IMG_CONTEXT>": {"prompt": "look: <IMG_CONTEXT>"},
        "logprobs must be between 0 and 20, got 21": {"prompt": "hi", "logprobs": 21},
        "prompt[0] is 3000 tokens; this server accepts at most 2047": {"prompt": [5] * 3000},
        "prompt[1] is 2000 tokens and max_tokens is 100, more than the 2048 tokens":
            {"prompt": [[5], [5] * 2000], "max_tokens": 100},
        "max_tokens is 1900; this server allows at most 1800": {"prompt": "hi", "max_tokens": 1900},
        "prompt must be a string": {},
    }
    for expected, body in bad.items():
        reply = httpx.post(server[0] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert reply.status_code == 400, (expected, reply.text)
        error = reply.json()["error"]
        assert expected in error["message"] and set(error) == {"message", "type", "param", "code"}, reply.text
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist"):
        client.completions.create(model="gpt-4o", prompt="hi")
    assert httpx.post(server[0] + "/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert health(server)["status"] == "ok"


def test_a_model_card_by_id(server, client):
    card = client.models.retrieve("m")
    assert (card.id, card.object, card.owned_by) == ("m", "model", "internvl-mpo")
    assert card.max_model_len == health(server)["max_len"] == 2048  # as vLLM's card says it
    assert card.model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("OpenGVLab/InternVL2_5-4B-MPO")
    assert e.value.body == {"message": "The model `OpenGVLab/InternVL2_5-4B-MPO` does not exist; this server serves "
                                       "`m`", "type": "invalid_request_error", "param": "model",
                            "code": "model_not_found"}
    assert httpx.get(server[0] + "/v1/models/m").status_code == 401


def test_non_finite_logprobs_are_sent_as_valid_json(local_chat):
    from internvl_mpo.generate.engine import Event

    worker = BatchWorker(local_chat, max_batch=1, max_len=64)
    entry = worker._logprob_entry(Event(0, 5, logprob=float("-inf"), top_logprobs=((5, float("nan")),)))
    assert json.loads(json.dumps(entry, allow_nan=False))["top_logprobs"][0]["logprob"] == entry["logprob"] == -9999.0



def test_a_late_cancel_of_a_job_from_a_failed_batch_leaves_the_new_job_with_its_id_running(local_chat):
    """Request ids restart with a fresh batch: a cancel that reaches the worker after the batch it was sent for
    failed must not finish the new request that took the same id."""
    worker = BatchWorker(local_chat, max_batch=1, max_len=64)
    finished = []

    class Gen:
        def finish(self, rid):
            finished.append(rid)

    old, new = (Job(Request([1, 2], SamplingParams()), 0, lambda item: None, rid=0) for _ in range(2))
    jobs, stats = {0: new}, dict(worker.stats)
    worker._command(Gen(), jobs, "cancel", old, stats)
    assert finished == [] and jobs == {0: new} and stats["cancelled"] == 0
    worker._command(Gen(), jobs, "cancel", new, stats)
    assert finished == [0] and jobs == {} and stats["cancelled"] == 1

def test_the_end_of_turn_token_has_no_stop_reason_and_a_stop_token_id_has_its_id(local_chat):
    """As vLLM: an answer ended by the model's end-of-turn token has stop_reason None (unless ignore_eos
    made it one of the request's stop_token_ids), one ended by a stop token id has that id; a text
    completion lists the stopping token in its logprobs, a chat answer does not."""
    from internvl_mpo.generate.engine import Event
    from internvl_mpo.pipeline import TextAssembler

    worker = BatchWorker(local_chat, max_batch=1, max_len=64)
    end = local_chat.tokenizer.im_end_id
    assert end in local_chat.engine.stop_token_ids

    class Gen:
        def finish(self, rid):
            raise AssertionError("a finished row is not finished again")

    def last_chunk(token: int, list_stop_token: bool = False, **params):
        chunks = []
        job = Job(Request([1, 2], SamplingParams(**params), logprobs=0), 0, chunks.append,
                  list_stop_token=list_stop_token)
        job.texts = TextAssembler(local_chat.tokenizer)
        worker._event(Gen(), {0: job}, Event(0, token, "stop", logprob=-0.5), dict(worker.stats))
        [chunk] = chunks
        assert chunk.finish_reason == "stop" and chunk.text == ""
        return chunk

    assert last_chunk(end).stop_reason is None and last_chunk(end).logprobs == []
    assert last_chunk(7, stop_token_ids=(7,)).stop_reason == 7
    assert last_chunk(end, ignore_eos=True, stop_token_ids=(end,)).stop_reason == end
    assert [e["logprob"] for e in last_chunk(end, list_stop_token=True).logprobs] == [-0.5]


def test_bad_requests_get_openai_errors(server, client):
    corrupt = b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[user("What?", corrupt)], **GREEDY)
    error = e.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_image"
    assert "messages[0].content[0].image_url" in error["message"] and "image" in error["message"]

    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 300_000}])
    assert e.value.status_code == 413

    wrong = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(server[0] + "/v1/models").status_code == 401

    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="allow-remote-images"):
        remote = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": [remote]}])
    with pytest.raises(openai.BadRequestError, match="at most 2"):
        client.chat.completions.create(model="m", messages=[user("Which?", *[png(56, 56)] * 3)])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "word " * 3000}])
    # the whole message (no images to count); body, not str(e), whose wording differs between openai versions
    assert re.fullmatch(r"the prompt is \d+ tokens; this server accepts at most 2047", e.value.body["message"])
    assert (e.value.body["param"], e.value.body["code"]) == ("messages", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError, match="holds no user or assistant message"):
        client.chat.completions.create(model="m", messages=[{"role": "system", "content": "hi"}])
    bad_json = httpx.post(server[0] + "/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {KEY}"})
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    # a compressed body was a 400 saying it was not valid JSON ("'utf-8' codec can't decode byte 0x8b")
    gzipped = httpx.post(server[0] + "/v1/chat/completions", content=gzip.compress(b'{"messages": []}'),
                         headers={"Authorization": f"Bearer {KEY}", "Content-Encoding": "gzip"})
    assert gzipped.status_code == 415 and gzipped.json()["error"] == {
        "message": "Content-Encoding 'gzip' is not supported; send the body uncompressed",
        "type": "invalid_request_error", "param": None, "code": "unsupported_content_encoding"}
    # a content coding is case-insensitive (RFC 9110): "Identity" is the uncompressed body
    plain = httpx.post(server[0] + "/detokenize", json={"model": "m", "tokens": [1]},
                       headers={"Authorization": f"Bearer {KEY}", "Content-Encoding": "Identity"})
    assert plain.status_code == 200, plain.text
    # an empty Content-Encoding names no coding: it was a 415 ("Content-Encoding '' is not supported")
    plain = httpx.post(server[0] + "/detokenize", json={"model": "m", "tokens": [1]},
                       headers={"Authorization": f"Bearer {KEY}", "Content-Encoding": ""})
    assert plain.status_code == 200, plain.text
    assert health(server)["status"] == "ok"


def test_concurrent_streams_are_batched(server, client):
    solo = {q: client.chat.completions.create(model="m", messages=[{"role": "user", "content": q}], **LONG)
            .choices[0].message.content for q in QUESTIONS}
    clients = 16
    barrier = threading.Barrier(clients)
    results: dict[int, tuple] = {}

    def one(i: int) -> None:
        barrier.wait()
        question = QUESTIONS[i % len(QUESTIONS)]
        results[i] = (question, *stream_text(client, messages=[{"role": "user", "content": question}], **LONG))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(clients))
    for question, texts, finishes, _ in results.values():
        assert finishes == {0: "length"} and texts == {0: solo[question]}  # batched greedy == alone
    state = health(server)
    # earlier tests never had more than 2 rows at once (n=2); 16 clients fill the batch
    assert state["max_active"] >= 4 and state["active"] == 0 and state["waiting"] == 0
    after = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTIONS[0]}], **LONG)
    assert after.choices[0].message.content == solo[QUESTIONS[0]]


def test_disconnect_frees_the_row(server, client):
    before = health(server)
    stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Go on."}], stream=True,
                                            temperature=0, max_tokens=1800, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 60  # a busy machine may take a while; the row is freed long before 1800 tokens
    while (state := health(server))["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["cancelled"] == before["cancelled"] + 1 and state["active"] == 0
    assert state["completion_tokens"] - before["completion_tokens"] < 1800  # stopped well before max_tokens


def post(server, body: bytes, timeout=120) -> httpx.Response:
    """A raw /v1/chat/completions POST (bodies the openai client will not send: NaN, lone surrogates)."""
    return httpx.post(server[0] + "/v1/chat/completions", content=body, timeout=timeout,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})


def test_bad_requests_fail_alone_with_400(server, client):
    """Requests that would fail inside the worker are refused up front, and a request decoding meanwhile
    is untouched."""
    messages = [{"role": "user", "content": "Count to ten."}]
    # as long as the server allows: the ten bad requests took a quarter of the time of 1000 tokens here (0.5 of 2 s),
    # and on a loaded machine the victim could end before the last of them
    long = {"temperature": 0, "max_tokens": 1800, "extra_body": {"ignore_eos": True}}
    solo = client.chat.completions.create(model="m", messages=messages, **long).choices[0].message.content
    hi = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4'
    bad = {
        "messages[0].content: the text holds the image-context token <IMG_CONTEXT>, which is reserved for image":
            '{"messages": [{"role": "user", "content": "a <IMG_CONTEXT> b"}]}',
        "top_p must be a finite number": hi + ', "temperature": 1, "top_p": NaN}',
        "temperature must be a finite number": hi + ', "temperature": NaN}',
        "repetition_penalty must be a finite number": hi + ', "repetition_penalty": NaN}',
        "seed must be between -9223372036854775808 and 9223372036854775807, got 9223372036854775808":
            hi + f', "temperature": 1, "seed": {2**63}}}',
        "top_k must be in [0, 2**31)": hi + f', "temperature": 1, "top_k": {2**31}}}',
        "max_tokens must be at least 1, got 0": '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
        "messages[0].content: character 3 is a lone surrogate": '{"messages": [{"role": "user", "content": "abc\\ud800"}]}',
        "nested too deeply": "[" * 50_000 + "]" * 50_000,
        "holds an integer of more than 4300 digits": hi + ', "seed": ' + "9" * 5000 + "}",
    }
    started = threading.Event()
    result = {}

    def victim() -> None:
        stream = client.chat.completions.create(model="m", messages=messages, stream=True, **long)
        text = ""
        for chunk in stream:
            started.set()
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        result["text"] = text

    thread = threading.Thread(target=victim)
    thread.start()
    assert started.wait(60)
    for expected, body in bad.items():
        reply = post(server, body.encode())
        assert reply.status_code == 400, (expected, reply.text)
        assert expected in reply.json()["error"]["message"], reply.text
    assert thread.is_alive()  # the bad requests came while it decoded
    thread.join(60)
    assert result == {"text": solo}
    assert health(server)["status"] == "ok"


def test_the_tiles_of_several_images_are_cut_to_fit_the_sequence(local_chat):
    """Two images at the default 12 tiles each (plus thumbnails) overflow a short sequence; each image's
    tile limit shrinks so that all tiles leave TEXT_ROOM tokens, instead of a context_length_exceeded."""
    body = {"messages": [user("Compare them.", png(560, 560), png(560, 560, seed=1))]}
    settings = ServerSettings(max_images=2)
    req = parse_chat_request(body, settings)
    per_tile = local_chat.model.num_image_token
    roomy = build_prompt(local_chat, req, settings, max_len=4096)
    assert roomy.pixel_values.shape[0] == 2 * 10  # 3x3 grid + thumbnail each: nothing to cut
    for tiles in (14, 10, 0):  # tiles that fit beside TEXT_ROOM, for both images together
        max_len = TEXT_ROOM + tiles * per_tile
        got = build_prompt(local_chat, req, settings, max_len=max_len).pixel_values.shape[0]
        assert got == {14: 2 * 5, 10: 2 * 5, 0: 2 * 1}[tiles]  # max_num 6 and 4: 2x2 + thumbnail; 1: one tile
        assert got * per_tile <= max(tiles * per_tile, 2 * per_tile)


def test_the_tiles_of_a_videos_frames_are_cut_to_fit_the_sequence(local_chat, tmp_path):
    """A video's `max_num` tiles per frame, 8 frames, overflowed a short sequence: the demo model's server
    answered `max_num: 2` with a 400 `invalid_video` whose hint named num_segments, no field of a request.
    The tiles per frame now shrink so that all frames leave TEXT_ROOM tokens, as several images' do."""
    url = "data:video/mp4;base64," + base64.b64encode(clip(tmp_path / "wide.mp4", (112, 56))).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What colour is it?"},
                                                      {"type": "video_url", "video_url": {"url": url}}]}],
            "max_num": 3}
    req = parse_chat_request(body, ServerSettings())
    per_tile = local_chat.model.num_image_token
    roomy = build_prompt(local_chat, req, ServerSettings(), max_len=4096)
    assert roomy.pixel_values.shape[0] == 8 * 3  # a 2x1 grid + thumbnail a frame: nothing to cut
    for tiles, per_frame in ((8 * 3, 3), (8 * 3 - 1, 1), (0, 1)):  # tiles that fit beside TEXT_ROOM, for all 8 frames
        prompt = build_prompt(local_chat, req, ServerSettings(), max_len=TEXT_ROOM + tiles * per_tile)
        assert prompt.pixel_values.shape[0] == 8 * per_frame


def test_a_prompt_over_the_context_is_refused_before_its_images_are_tiled(local_chat, monkeypatch):
    """The prompt is measured from the tile counts its images' headers give: a text over the context is
    refused with the 400 it got once its images were tiled, and no tile is made."""
    from internvl_mpo.server import prompts as prompts_module

    body = {"messages": [user("word " * 3000, png(560, 560))]}
    req = parse_chat_request(body, ServerSettings())
    length = len(tokenize_ids(local_chat, parse_tokenize_request(body, ServerSettings()), ServerSettings(), 2048))
    tiled, load_image = [], prompts_module.load_image
    monkeypatch.setattr(prompts_module, "load_image", lambda *args, **kwargs: tiled.append(args) or load_image(*args,
                                                                                                          **kwargs))
    with pytest.raises(ApiError, match=rf"^the prompt is {length} tokens \(images included\); this server accepts at "
                                       r"most 2047$") as e:
        build_prompt(local_chat, req, ServerSettings(), max_len=2048)
    assert (e.value.status, e.value.param, e.value.code) == (400, "messages", "context_length_exceeded")
    assert tiled == []


def test_a_prompt_over_the_context_is_refused_before_its_videos_frames_are_decoded(local_chat, monkeypatch, tmp_path):
    """As a prompt with images: its length comes from the frame size the video's stream gives, and a text over
    the context gets the context_length_exceeded 400 before a frame is decoded. On the demo model, whose context
    the frames fill, it was a 400 invalid_video naming num_segments; elsewhere every frame was decoded first."""
    url = "data:video/mp4;base64," + base64.b64encode(clip(tmp_path / "clip.mp4")).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "word " * 3000},
                                                      {"type": "video_url", "video_url": {"url": url}}]}]}
    req = parse_chat_request(body, ServerSettings())
    length = len(tokenize_ids(local_chat, parse_tokenize_request(body, ServerSettings()), ServerSettings(), 2048))
    monkeypatch.setattr(local_chat, "prepare", lambda *args, **kwargs: pytest.fail("the frames were decoded"))
    with pytest.raises(ApiError, match=rf"^the prompt is {length} tokens \(the video's frames included\); this "
                                       r"server accepts at most 2047$") as e:
        build_prompt(local_chat, req, ServerSettings(), max_len=2048)
    assert (e.value.status, e.value.param, e.value.code) == (400, "messages", "context_length_exceeded")


def test_tokenize_counts_a_video_prompt_over_the_context_as_other_prompts(local_chat, tmp_path):
    """/tokenize counts a prompt longer than the sequence rather than refusing it (as vLLM); with a video, whose
    prompt chat's prepare() built, one over the model's context was a 400 invalid_video naming num_segments."""
    url = "data:video/mp4;base64," + base64.b64encode(clip(tmp_path / "clip.mp4")).decode()
    words = "word " * (local_chat.context + 10)
    for content in ([{"type": "text", "text": words}],
                    [{"type": "text", "text": words}, {"type": "video_url", "video_url": {"url": url}}]):
        req = parse_tokenize_request({"messages": [{"role": "user", "content": content}]}, ServerSettings())
        assert len(tokenize_ids(local_chat, req, ServerSettings(), 4096)) > local_chat.context


def test_a_video_request_gets_the_templates_system_message_as_other_requests_do(local_chat, monkeypatch, tmp_path):
    """Where a request sends no system message the server prompts with the template's, also beside a config.json
    `system_message` (which chat() uses); a request with a video went through chat's prepare() and got config.json's."""
    monkeypatch.setitem(local_chat.config.extra, "system_message", "Answer in French.")
    url = "data:video/mp4;base64," + base64.b64encode(clip(tmp_path / "clip.mp4")).decode()
    text = {"type": "text", "text": "What colour is it?"}
    for content in ([text], [text, {"type": "video_url", "video_url": {"url": url}}]):
        req = parse_tokenize_request({"messages": [{"role": "user", "content": content}]}, ServerSettings())
        prompt = local_chat.tokenizer.decode(tokenize_ids(local_chat, req, ServerSettings(), 4096), False)
        assert SYSTEM_MESSAGE in prompt and "French" not in prompt, (len(content), prompt[:200])


def test_a_max_tokens_past_the_sequence_names_the_field_the_request_used(local_chat):
    """The openai client sends max_completion_tokens: the error must not name a max_tokens it never sent."""
    for key in ("max_tokens", "max_completion_tokens"):
        req = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], key: 100}, ServerSettings())
        with pytest.raises(ApiError, match=rf"^the prompt is \d+ tokens and {key} is 100, more than the 90 tok") as e:
            build_prompt(local_chat, req, ServerSettings(), max_len=90)
        assert (e.value.param, e.value.code) == (key, "context_length_exceeded")



def test_a_prompt_and_max_tokens_that_fill_the_sequence_exactly_are_taken_and_one_token_more_is_refused():
    """A sequence of max_len slots holds a prompt of max_len - 1 tokens (one left to answer), and a prompt with
    max_tokens that add up to max_len; one token more of either is a 400."""
    chat = SimpleNamespace(tokenizer=SimpleNamespace(img_context_id=299), config=SimpleNamespace(
        llm=SimpleNamespace(vocab_size=300)))

    def prompts(length: int, **body) -> list[int]:
        req = parse_completion_request({"prompt": [7] * length, **body}, ServerSettings())
        return [p.max_new_tokens for p in build_completion_prompts(chat, req, ServerSettings(), max_len=90)]

    assert prompts(89, max_tokens=1) == [1] and prompts(80, max_tokens=10) == [10]
    with pytest.raises(ApiError, match="^prompt\\[0\\] is 90 tokens; this server accepts at most 89$"):
        prompts(90, max_tokens=1)
    with pytest.raises(ApiError, match="^prompt\\[0\\] is 80 tokens and max_tokens is 11, more than the 90 tokens"):
        prompts(80, max_tokens=11)

def test_url_schemes_and_base64_are_read_whatever_their_case():
    """A URL's scheme is case-insensitive (RFC 3986), and so is a data URL's ";base64": "DATA:" was an
    "unsupported URL scheme 'data'" and "HTTP://" the same, where vLLM reads the scheme whatever its case."""
    image = png(20, 20)
    for url in ("DATA:image/png;base64," + base64.b64encode(image).decode(),
                "Data:image/png;BASE64," + base64.b64encode(image).decode()):
        assert image_bytes(url, "messages[0].content[0].image_url", ServerSettings()) == image
    with pytest.raises(ApiError, match="remote image URLs are refused") as e:
        image_bytes("HTTP://127.0.0.1:9/x.png", "messages[0].content[0].image_url", ServerSettings())
    assert e.value.code == "remote_image_refused"


def test_a_file_url_is_read_whatever_the_case_of_its_scheme(tmp_path):
    """A scheme is read whatever its case, but "FILE:///dir/a%20b.png" was read as the path "FILE:/dir/a%20b.png":
    a 400 "... is not a file". It is the file URL it names, percent-decoded and its host checked, as "file:" is."""
    image = png(20, 20)
    (tmp_path / "a b.png").write_bytes(image)
    settings = ServerSettings(allow_local_images=True)
    for scheme in ("file", "FILE", "File"):
        assert image_bytes(f"{scheme}://{tmp_path}/a%20b.png", "messages[0].content[0].image_url", settings) == image
    with pytest.raises(ApiError, match="a file URL must name this machine .* got host 'elsewhere'"):
        image_bytes(f"FILE://elsewhere{tmp_path}/a%20b.png", "messages[0].content[0].image_url", settings)


def test_errors_show_a_long_value_cut_short():
    """A 1 MB role or model name came back whole in the error message."""
    with pytest.raises(ApiError, match="role must be system, user, assistant or tool, got \"xxx") as e:
        parse_chat_request({"messages": [{"role": "x" * 10**6, "content": "hi"}]}, ServerSettings())
    assert len(e.value.message) < 300
    with pytest.raises(ApiError, match="^The model `xxx") as e:
        check_model({"model": "x" * 10**6}, "m")
    assert e.value.status == 404 and len(e.value.message) < 400


def test_image_urls_that_cannot_be_read_are_400():
    settings = ServerSettings(allow_remote_images=True, allow_local_images=True)
    cases = [("http://127.0.0.1:abc/x.png", "could not fetch", "image_fetch_failed"),
             ("/tmp/" + "a" * 5000, "could not read .*: File name too long", "invalid_image"),
             ("/nonexistent/x.png", "is not a file", "invalid_image")]
    for url, message, code in cases:
        with pytest.raises(ApiError, match=message) as e:
            image_bytes(url, "messages[0].content[0].image_url", settings)
        assert (e.value.status, e.value.code) == (400, code)


def test_an_image_over_the_byte_limit_names_the_server_flag_that_raises_it(tmp_path):
    """A 413 for an image's bytes names `--max-image-bytes` (data URLs and local files alike): a client
    read "images may be at most N bytes" with nothing saying who can change N."""
    image = png(56, 56)
    path = tmp_path / "a.png"
    path.write_bytes(image)
    settings = ServerSettings(allow_local_images=True, max_image_bytes=len(image) - 1)
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    for url in (data_url, str(path)):
        with pytest.raises(ApiError, match=r"at most \d+ bytes \(the server's --max-image-bytes\)$") as e:
            image_bytes(url, "image", settings)
        assert (e.value.status, e.value.code) == (413, "image_too_large")



def test_a_data_url_of_exactly_the_byte_limit_is_taken_whatever_its_padding():
    """The limit is on the decoded bytes: a data URL whose base64 ends in padding holds up to 2 bytes fewer than
    its length says, and an image of exactly --max-image-bytes is taken; one byte more is the 413."""
    for size in (30, 31, 32):  # base64 padded with 0, 2 and 1 "="
        raw = bytes(range(size))
        url = "data:image/png;base64," + base64.b64encode(raw).decode()
        assert image_bytes(url, "image", ServerSettings(max_image_bytes=size)) == raw
        with pytest.raises(ApiError, match="at most") as e:
            image_bytes(url, "image", ServerSettings(max_image_bytes=size - 1))
        assert e.value.status == 413

def test_file_urls_are_percent_decoded_and_name_this_machine(tmp_path):
    """A file URL writes a space as %20 and may name this machine as localhost or not at all; another
    host, or a scheme that is neither data, http(s) nor file, is a clear 400 (not a missing relative path)."""
    from urllib.parse import quote

    image = png(56, 56)
    path = tmp_path / "my image #1.png"
    path.write_bytes(image)
    settings = ServerSettings(allow_local_images=True)
    for url in (str(path), "file://" + quote(str(path)), "file://localhost" + quote(str(path)),
                "file://LocalHost" + quote(str(path)), "file:" + quote(str(path))):
        assert image_bytes(url, "image", settings) == image, url
    refused = {"file://example.com" + quote(str(path)): "a file URL must name this machine",
               "ftp://127.0.0.1/x.png": "unsupported URL scheme 'ftp'",
               "s3://bucket/x.png": "unsupported URL scheme 's3'"}
    for url, message in refused.items():
        with pytest.raises(ApiError, match=message) as e:
            image_bytes(url, "messages[0].content[0].image_url", settings)
        assert (e.value.status, e.value.param) == (400, "messages[0].content[0].image_url")
    with pytest.raises(ApiError, match="unsupported URL scheme 'ftp'"):  # not "local image files are refused"
        image_bytes("ftp://127.0.0.1/x.png", "image", ServerSettings())


def test_remote_image_redirects_stay_on_http_and_are_few():
    """--allow-remote-images follows at most 5 redirects, to http(s) only: a redirect to ftp:// or file://
    (a way around the data:-only default) or a long chain is a 400 that says so."""
    from http.server import BaseHTTPRequestHandler

    image = png(56, 56)

    class Redirects(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/hop/"):  # /hop/k redirects k times before the image
                left = int(self.path.rsplit("/", 1)[1])
                self.send_response(302)
                self.send_header("Location", f"/hop/{left - 1}" if left > 1 else "/image.png")
            elif self.path.startswith("/to/"):
                self.send_response(301)
                self.send_header("Location", self.path.removeprefix("/to/"))
            else:
                self.send_response(200)
                self.send_header("Content-Length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)
                return
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = start_http(Redirects)
    base = f"http://127.0.0.1:{httpd.server_port}"
    settings = ServerSettings(allow_remote_images=True, allow_private_image_hosts=True)
    try:
        assert image_bytes(f"{base}/hop/5", "image", settings) == image
        refused = {f"{base}/hop/6": "more than 5 redirects",
                   f"{base}/to/ftp://127.0.0.1:9/x.png": "redirected to ftp://127.0.0.1:9/x.png; only http",
                   f"{base}/to/file:///etc/hostname": "redirected to file:///etc/hostname; only http"}
        for url, message in refused.items():
            with pytest.raises(ApiError, match=message) as e:
                image_bytes(url, "messages[0].content[0].image_url", settings)
            assert (e.value.status, e.value.code) == (400, "image_fetch_failed")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_remote_image_that_trickles_in_is_cut_off_at_the_image_timeout():
    """--image-timeout bounds the whole fetch: a server that sends a byte every 0.1 s (each read well
    within the timeout) must not hold the request for the 20 s its image takes; one that answers at once
    gives the whole image. The bound held for the body alone: a status line or headers sent a byte at a time
    held the request (and a thread of the pool every request shares) for as long as they took."""
    from http.server import BaseHTTPRequestHandler

    stop = threading.Event()
    image = png(300, 200)

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path in ("/slow-status.png", "/slow-headers.png"):
                head = b"HTTP/1.0 200 OK\r\n" + b"".join(b"X-%d: y\r\n" % k for k in range(60))
                start = 0 if self.path == "/slow-status.png" else head.index(b"\n") + 1
                self.wfile.write(head[:start])
                for k in range(start, len(head)):
                    if stop.wait(0.1):
                        return
                    self.wfile.write(head[k:k + 1])
                    self.wfile.flush()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)) if self.path == "/fast.png" else "200")
            self.end_headers()
            if self.path == "/fast.png":
                self.wfile.write(image)
                return
            for _ in range(200):
                if stop.wait(0.1):
                    return
                self.wfile.write(b"x")
                self.wfile.flush()

        def log_message(self, *args):
            pass

    httpd = start_http(Trickle)
    try:
        settings = ServerSettings(allow_remote_images=True, allow_private_image_hosts=True, image_timeout=1.0)
        # the whole image under a bound that a busy machine cannot miss (1 s of it could be spent elsewhere)
        assert image_bytes(f"http://127.0.0.1:{httpd.server_port}/fast.png", "image",
                           dataclasses.replace(settings, image_timeout=60.0)) == image
        for path in ("slow.png", "slow-status.png", "slow-headers.png"):  # each takes 20 s or more to send
            start = time.monotonic()
            with pytest.raises(ApiError, match=r"could not fetch .*not received within 1\.0 s") as e:
                image_bytes(f"http://127.0.0.1:{httpd.server_port}/{path}", "messages[0].content[0].image_url",
                            settings)
            assert (e.value.status, e.value.code) == (400, "image_fetch_failed")
            assert time.monotonic() - start < 15, path
    finally:
        stop.set()
        httpd.shutdown()
        httpd.server_close()


def start_http(handler):
    """A threaded HTTP server of `handler` on 127.0.0.1 at a free port, serving in a daemon thread."""
    from http.server import ThreadingHTTPServer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def image_server(image: bytes, on_request=None):
    """An HTTP server on 127.0.0.1 that serves `image` at any path, and redirects /to/<url> to <url>;
    `on_request(path)` is called first with each request's path, as sent."""
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if on_request is not None:
                on_request(self.path)
            if self.path.startswith("/to/"):
                self.send_response(302)
                self.send_header("Location", self.path.removeprefix("/to/"))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args):
            pass

    return start_http(Handler)


def test_a_remote_image_url_with_non_ascii_characters_is_fetched_percent_encoded():
    """urllib sends the URL as given, and a request line is ASCII: http://host/Café.png was a 400 ("'ascii' codec
    can't encode character"). Its path and query go out percent-encoded as UTF-8, as requests (vLLM's fetcher)
    sends them; escapes already there are kept."""
    image, seen = png(56, 56), []
    httpd = image_server(image, seen.append)
    settings = ServerSettings(allow_remote_images=True, allow_private_image_hosts=True, image_timeout=60.0)
    try:
        base = f"http://127.0.0.1:{httpd.server_port}"
        for path, sent in (("/Café 1.png?q=é", "/Caf%C3%A9%201.png?q=%C3%A9"), ("/a%20b.png", "/a%20b.png")):
            assert image_bytes(base + path, "image", settings) == image
            assert seen[-1] == sent
        for control in ("\n", "\t"):  # urlsplit would drop them (fetching another path): refused as urllib refuses them
            with pytest.raises(ApiError, match="can't contain control characters"):
                image_bytes(f"{base}/a{control}b.png", "image", settings)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_remote_images_on_private_addresses_are_refused():
    """--allow-remote-images fetches from public addresses only (no server-side request forgery onto this
    machine, its LAN or the cloud metadata service): a host at any loopback, private, link-local, unique-local,
    unspecified, multicast or reserved address, however the URL writes it (brackets, the decimal and hex forms
    that the resolver reads as 127.0.0.1, IPv4-mapped IPv6), is a 400 that names the host and why, before
    any connection is made. --allow-private-image-hosts lets them through."""
    settings = ServerSettings(allow_remote_images=True, image_timeout=1.0)
    cases = {"http://127.0.0.1:9/x.png": ("127.0.0.1", "127.0.0.1", "loopback"),
             "https://127.0.0.2/x.png": ("127.0.0.2", "127.0.0.2", "loopback"),
             "http://[::1]:9/x.png": ("::1", "::1", "loopback"),
             "http://2130706433:9/x.png": ("2130706433", "127.0.0.1", "loopback"),
             "http://0x7f.1:9/x.png": ("0x7f.1", "127.0.0.1", "loopback"),
             "http://017700000001:9/x.png": ("017700000001", "127.0.0.1", "loopback"),
             "http://[::ffff:127.0.0.1]:9/x.png": ("::ffff:127.0.0.1", "::ffff:127.0.0.1", "loopback"),
             "http://[::ffff:a00:1]/x.png": ("::ffff:a00:1", "::ffff:10.0.0.1", "private"),
             "http://0.0.0.0:9/x.png": ("0.0.0.0", "0.0.0.0", "unspecified"),
             "http://[::]:9/x.png": ("::", "::", "unspecified"),
             "http://169.254.169.254/latest/meta-data/": ("169.254.169.254", "169.254.169.254", "link-local"),
             "http://[fe80::1]/x.png": ("fe80::1", "fe80::1", "link-local"),
             "http://10.1.2.3/x.png": ("10.1.2.3", "10.1.2.3", "private"),
             "http://172.16.0.1/x.png": ("172.16.0.1", "172.16.0.1", "private"),
             "http://192.168.1.1/x.png": ("192.168.1.1", "192.168.1.1", "private"),
             "http://[fd00::1]/x.png": ("fd00::1", "fd00::1", "private"),
             "http://100.64.0.1/x.png": ("100.64.0.1", "100.64.0.1", "non-public"),
             "http://224.0.0.1/x.png": ("224.0.0.1", "224.0.0.1", "multicast"),
             "http://[ff02::1]/x.png": ("ff02::1", "ff02::1", "multicast"),
             "http://240.0.0.1/x.png": ("240.0.0.1", "240.0.0.1", "reserved"),
             "http://localhost:9/x.png": ("localhost", r"(127\.0\.0\.1|::1)", "loopback"),
             "http://0/x.png": ("0", r"0\.0\.0\.0", "unspecified")}
    for url, (host, ip, reason) in cases.items():
        article = "an" if reason == "unspecified" else "a"
        refused = rf"^image: refused to fetch {re.escape(url)}: host '{re.escape(host)}' is at {ip}, {article} {reason}"
        with pytest.raises(ApiError, match=refused + " address; .*--allow-private-image-hosts") as e:
            image_bytes(url, "image", settings)
        assert (e.value.status, e.value.param, e.value.code) == (400, "image", "remote_image_refused"), url

    image = png(56, 56)
    httpd = image_server(image)
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/image.png"
        with pytest.raises(ApiError, match="refused to fetch"):
            image_bytes(url, "image", settings)
        # a bound a busy machine cannot miss for the fetch that goes through (the refusals come before any connection)
        assert image_bytes(url, "image", dataclasses.replace(settings, allow_private_image_hosts=True,
                                                             image_timeout=60.0)) == image
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_nat64_addresses_are_judged_by_the_ipv4_address_they_carry():
    """64:ff9b::/96 (NAT64) reaches the IPv4 address in its last 32 bits: 64:ff9b::7f00:1 is this
    machine's loopback through the gateway, and 64:ff9b::808:808 a public host (the only way an
    IPv6-only machine with DNS64 reaches IPv4-only sites; all of them were refused as reserved)."""
    from internvl_mpo.server.media import refusal

    assert refusal("64:ff9b::7f00:1") == "loopback"
    assert refusal("64:ff9b::a9fe:a9fe") == "link-local"  # 169.254.169.254, cloud metadata
    assert refusal("64:ff9b::a00:1") == "private"
    assert refusal("64:ff9b::6440:1") == "non-public"  # 100.64.0.1, carrier-grade NAT
    assert refusal("64:ff9b::808:808") is None
    assert refusal("64:ff9b:1::a00:1") == "reserved"  # the local-use prefix stays refused
    assert refusal("2606:2800::1") is None and refusal("8.8.8.8") is None


def test_6to4_addresses_are_judged_by_the_ipv4_address_they_carry():
    """2002::/16 (6to4) carries an IPv4 address in bits 16-48, and Python's is_global takes every 2002:: address
    as public: 2002:7f00:1:: (127.0.0.1) must be refused as the loopback address it reaches."""
    from internvl_mpo.server.media import refusal

    assert refusal("2002:7f00:1::") == "loopback"
    assert refusal("2002:a9fe:a9fe::") == "link-local"  # 169.254.169.254, cloud metadata
    assert refusal("2002:a00:1::") == "private"
    assert refusal("2002:808:808::") is None


def fetch_from_a_named_host(monkeypatch, resolve) -> None:
    """Fetch an image served on this machine from `images.invalid` (a name nothing else resolves) with `resolve`
    as the resolver and 127.0.0.1 taken for a public address: the image comes back whole."""
    from internvl_mpo.server import media as media_module

    real = media_module.refusal
    monkeypatch.setattr(media_module, "refusal", lambda ip: None if ip == "127.0.0.1" else real(ip))
    image = png(56, 56)
    httpd = image_server(image)
    try:
        settings = ServerSettings(allow_remote_images=True, image_timeout=60.0)  # a bound a busy machine cannot miss
        url = f"http://images.invalid:{httpd.server_port}/image.png"
        assert media_module._fetch_remote(url, "image", settings, resolve=resolve) == image
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_remote_image_is_not_fetched_through_a_proxy_from_the_environment(monkeypatch):
    """Unless --allow-private-image-hosts, http_proxy is not used: a proxy would connect wherever the URL says,
    past the check of the host's addresses. The image comes straight from the host (the proxy named here does
    not exist: a request sent there would fail)."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", "http://proxy.invalid:9")
    asked = []

    def resolve(host, port, **kwargs):
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    fetch_from_a_named_host(monkeypatch, resolve)
    assert asked == ["images.invalid"]


def test_a_remote_image_one_byte_over_the_limit_is_a_413_whatever_its_chunks():
    """The fetch reads past --max-image-bytes before it stops: an image that comes chunked, a first chunk of exactly
    the limit and then one byte, is a 413, not taken cut to the limit; one of exactly the limit is taken."""
    from http.server import BaseHTTPRequestHandler

    class Chunked(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            for piece in [b"x" * 100] + ([b"y"] if self.path == "/over.png" else []):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args):
            pass

    httpd = start_http(Chunked)
    base = f"http://127.0.0.1:{httpd.server_port}"
    settings = ServerSettings(allow_remote_images=True, allow_private_image_hosts=True, max_image_bytes=100,
                              image_timeout=60.0)  # a bound a busy machine cannot miss
    try:
        assert image_bytes(f"{base}/exact.png", "image", settings) == b"x" * 100
        with pytest.raises(ApiError, match="at most 100 bytes") as e:
            image_bytes(f"{base}/over.png", "image", settings)
        assert e.value.status == 413
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_remote_image_sent_gzip_or_deflate_encoded_is_decoded():
    """A host may send an image with Content-Encoding gzip whatever the request asked (an object stored compressed);
    requests and aiohttp, vLLM's fetchers, decode it: the image's bytes are the decoded ones (it was "not an image
    Pillow can read"). Decoded past --max-image-bytes is a 413 (a bomb fills no memory); an encoding it cannot
    decode is a 400 naming it."""
    import gzip
    import zlib
    from http.server import BaseHTTPRequestHandler

    image = bytes(range(256)) * 40
    bodies = {"/gzip.png": ("gzip", gzip.compress(image)), "/deflate.png": ("deflate", zlib.compress(image)),
              "/raw-deflate.png": ("deflate", zlib.compress(image)[2:-4]), "/br.png": ("br", b"\x0b\x01\x80"),
              "/bomb.png": ("gzip", gzip.compress(b"\0" * 10**6)), "/cut.png": ("gzip", gzip.compress(image)[:-20]),
              # several members (`cat a.gz b.gz`), as urllib3 decodes them: the image was cut to the first
              "/members.png": ("gzip", gzip.compress(image[:5000]) + gzip.compress(image[5000:]) + b"junk"),
              "/member-bomb.png": ("gzip", gzip.compress(image) + gzip.compress(b"\0" * 10**6)),
              # raw deflate and data after it: urllib3 reads the one stream (-15, raw deflate's wbits, has the gzip
              # bit set in two's complement: the data after it was decoded as more "members" and added to the image)
              "/raw-deflate-more.png": ("deflate", zlib.compress(image)[2:-4] + zlib.compress(b"junk")[2:-4])}

    class Encoded(BaseHTTPRequestHandler):
        def do_GET(self):
            encoding, body = bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = start_http(Encoded)
    base = f"http://127.0.0.1:{httpd.server_port}"
    settings = ServerSettings(allow_remote_images=True, allow_private_image_hosts=True, max_image_bytes=100_000,
                              image_timeout=60.0)
    try:
        for path in ("/gzip.png", "/deflate.png", "/raw-deflate.png", "/members.png", "/raw-deflate-more.png"):
            assert image_bytes(base + path, "image", settings) == image, path
        for path in ("/bomb.png", "/member-bomb.png"):
            with pytest.raises(ApiError, match="at most 100000 bytes") as e:
                image_bytes(base + path, "image", settings)
            assert e.value.status == 413
        for path, match in (("/br.png", "Content-Encoding 'br'"), ("/cut.png", "does not decode")):
            with pytest.raises(ApiError, match=match) as e:
                image_bytes(base + path, "image", settings)
            assert (e.value.status, e.value.code) == (400, "image_fetch_failed")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_local_image_over_the_byte_limit_is_refused_by_its_size_before_it_is_read(tmp_path, monkeypatch):
    """A local file's size is checked before its bytes are read (a path to a 10 GB file must not fill memory):
    the 413 names its size, and the file is never read."""
    path = tmp_path / "big.png"
    path.write_bytes(b"x" * 101)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} was read"))
    with pytest.raises(ApiError, match=rf"{re.escape(str(path))} is 101 bytes; images may be at most 100 bytes") as e:
        image_bytes(str(path), "image", ServerSettings(allow_local_images=True, max_image_bytes=100))
    assert e.value.status == 413


def test_every_address_of_a_remote_image_host_is_checked():
    """A host is refused when any of its addresses is not public (the connection could reach that one)."""
    from internvl_mpo.server.media import public_addresses

    def resolver(*ips):
        def resolve(host, port, **kwargs):
            asked.append((host, port))
            family = {4: socket.AF_INET, 6: socket.AF_INET6}
            return [(family[ipaddress.ip_address(ip).version], socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]
        return resolve

    asked = []
    assert public_addresses("images.example", 443, resolver("93.184.216.34", "2606:2800::1")) == [
        ("93.184.216.34", 443), ("2606:2800::1", 443)]
    assert asked == [("images.example", 443)]
    with pytest.raises(ValueError, match=r"^host 'images\.example' is at 10\.0\.0\.5, a private address$"):
        public_addresses("images.example", 443, resolver("93.184.216.34", "10.0.0.5"))


def test_image_timeout_bounds_connecting_to_every_address_of_a_host(monkeypatch):
    """--image-timeout bounds the whole fetch, connecting included: a host whose name gives several addresses that
    drop packets got --image-timeout for each (4 addresses: 4 times the bound)."""
    from internvl_mpo.server import media as media_module

    monkeypatch.setattr(media_module, "refusal", lambda ip: None)
    tried = []

    def dropping(address, timeout=None, source_address=None):  # a connection attempt that gets no answer
        tried.append(timeout)
        time.sleep(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(media_module.socket, "create_connection", dropping)
    addresses = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.%d" % k, 80)) for k in range(1, 5)]
    settings = ServerSettings(allow_remote_images=True, image_timeout=0.5)
    start = time.monotonic()
    with pytest.raises(ApiError, match="could not fetch"):
        media_module._fetch_remote("http://images.invalid/a.png", "image", settings,
                                   resolve=lambda host, port, **kw: addresses)
    assert time.monotonic() - start < 1.0 and sum(tried) <= 0.5 + 1e-6


def test_a_redirect_to_a_private_address_is_refused(monkeypatch):
    """The check is made on every connection, so on every redirect hop: a public host that redirects to the
    metadata service or the LAN is refused too. (The test server stands for the public host: 127.0.0.1 is
    taken as public here.)"""
    from internvl_mpo.server import media as media_module

    real = media_module.refusal
    monkeypatch.setattr(media_module, "refusal", lambda ip: None if ip == "127.0.0.1" else real(ip))
    image = png(56, 56)
    httpd = image_server(image)
    base = f"http://127.0.0.1:{httpd.server_port}"
    settings = ServerSettings(allow_remote_images=True, image_timeout=1.0)
    try:
        # a bound a busy machine cannot miss for the fetch that goes through (the refusals come before any connection)
        assert image_bytes(f"{base}/to/{base}/image.png", "image", dataclasses.replace(settings, image_timeout=60.0)) \
            == image
        refused = {f"{base}/to/http://169.254.169.254/latest/meta-data/": "'169.254.169.254' is at 169.254.169.254, "
                                                                           "a link-local address",
                   f"{base}/to/http://10.0.0.1/x.png": "'10.0.0.1' is at 10.0.0.1, a private address",
                   f"{base}/to/http://[::ffff:127.0.0.1]:{httpd.server_port}/image.png": "a loopback address"}
        for url, message in refused.items():
            with pytest.raises(ApiError, match=re.escape(message)) as e:
                image_bytes(url, "image", settings)
            assert (e.value.status, e.value.code) == (400, "remote_image_refused")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_remote_image_is_fetched_from_the_address_that_was_checked(monkeypatch):
    """The host is resolved once and the connection goes to the address checked, so a DNS answer that changes
    between the check and the connection (DNS rebinding) cannot slip a private address through: the resolver
    is asked once, and the connection reaches the address it gave for a name nothing else can resolve."""
    asked = []

    def rebinding(host, port, **kwargs):  # public the first time, loopback (::1) after
        asked.append(host)
        ip = "127.0.0.1" if len(asked) == 1 else "::1"
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    fetch_from_a_named_host(monkeypatch, rebinding)
    assert asked == ["images.invalid"]


def test_allow_private_image_hosts_needs_allow_remote_images():
    from internvl_mpo.errors import ConfigError

    with pytest.raises(ConfigError, match="--allow-private-image-hosts only applies with --allow-remote-images"):
        serve(model="/nonexistent/model", allow_private_image_hosts=True)


class Finals:
    """Each worker job's last item (its error, or its chunk with a finish reason), by name."""

    def __init__(self):
        self.items: dict[str, object] = {}
        self._done = threading.Semaphore(0)

    def deliver(self, name: str):
        def deliver(item) -> None:
            if isinstance(item, Exception) or item.finish_reason:
                self.items[name] = item
                self._done.release()
        return deliver

    def wait(self, count: int = 1) -> bool:
        return all(self._done.acquire(timeout=60) for _ in range(count))


def test_a_failing_prefill_fails_its_request_alone(local_chat, monkeypatch):
    """A request whose admission fails in the worker (here a prefill that raises) gets an error; the request
    decoding beside it goes on to the same tokens as alone."""
    ids = local_chat.prepare("Hello there").prompt_ids
    params = SamplingParams(max_new_tokens=STEPS, ignore_eos=True)
    # Different prompts: a request with the same prompt as one prefilled in the same step copies its cache.
    good, bad = Request(ids, params), Request(local_chat.prepare("Something else").prompt_ids, params)
    prefill = local_chat.engine.prefill

    def failing_prefill(request, caches, row):
        if request is bad:
            raise RuntimeError("out of memory")
        return prefill(request, caches, row)

    monkeypatch.setattr(local_chat.engine, "prefill", failing_prefill)
    outputs = {"good": [], "bad": []}
    done = threading.Semaphore(0)

    def deliver_to(name):
        def deliver(item) -> None:
            outputs[name].append(item)
            if isinstance(item, Exception) or item.finish_reason:
                done.release()
        return deliver

    worker = BatchWorker(local_chat, max_batch=4, max_len=256)
    worker.submit(Job(good, 0, deliver_to("good")))
    worker.submit(Job(bad, 0, deliver_to("bad")))
    worker.start()
    try:
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        worker.stop()
    [error] = outputs["bad"]
    assert isinstance(error, ApiError) and error.status == 500 and "out of memory" in error.message
    assert all(not isinstance(item, Exception) for item in outputs["good"])
    assert outputs["good"][-1].finish_reason == "length" and outputs["good"][-1].completion_tokens == STEPS
    expected = local_chat.chat("Hello there", do_sample=False, max_new_tokens=STEPS, ignore_eos=True)
    assert "".join(item.text for item in outputs["good"]).strip() == expected


def test_a_request_submitted_as_the_worker_stops_gets_a_503(local_chat):
    """A request that passed the handler's `alive` check just as Ctrl-C stopped the worker must not wait
    unanswered until the server cuts its connection: submitting after the stop is a 503 at once."""
    worker = BatchWorker(local_chat, max_batch=1, max_len=64)
    worker.start()
    worker.stop()
    job = Job(Request([1, 2, 3], SamplingParams(max_new_tokens=2)), 0, lambda item: None)
    with pytest.raises(ApiError, match="the server is shutting down") as error:
        worker.submit(job)
    assert error.value.status == 503


def test_a_request_arriving_after_ctrl_c_stopped_the_worker_is_told_the_server_is_shutting_down(local_chat):
    """Ctrl-C stops the worker before uvicorn stops taking requests: one that comes in between (or was being read)
    gets the 503 the running ones get, "the server is shutting down", not "the generation worker is not running",
    which reads as a crash (it did before 2026-12-05)."""
    from fastapi.testclient import TestClient

    from internvl_mpo.server import create_app

    app = create_app(local_chat, ServerSettings(served_model_name="m", max_batch=1, max_len=256))
    with TestClient(app) as client:
        app.state.worker.stop()  # as the server's shutdown does first
        for route, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there"}]}),
                            ("/v1/completions", {"prompt": "Hello"})]:
            for stream in (False, True):
                refused = client.post(route, json={**body, "max_tokens": 2, "stream": stream})
                assert refused.status_code == 503, (route, stream, refused.text)
                assert refused.json()["error"]["message"] == "the server is shutting down"


def test_a_worker_that_is_not_running_makes_health_and_requests_503s(local_chat):
    """A generation worker that is not running (its thread never started here; one that died alike) is told: /health
    answers a 503 with the status "error", and a request a 503 at once, not a wait for ever on a worker that will
    never answer it."""
    from fastapi.testclient import TestClient

    from internvl_mpo.server import create_app

    app = create_app(local_chat, ServerSettings(served_model_name="m", max_batch=1, max_len=256))
    client = TestClient(app)  # not entered: the app's lifespan, which starts the worker, does not run
    state = client.get("/health")
    assert (state.status_code, state.json()["status"]) == (503, "error")
    answers = []
    sender = threading.Thread(target=lambda: answers.append(client.post("/v1/completions", json={
        "prompt": "Hello", "max_tokens": 2})), daemon=True)
    sender.start()
    sender.join(60)
    assert answers, "no answer within 60 s"
    assert answers[0].status_code == 503, answers[0].text
    assert answers[0].json()["error"]["message"] == "the generation worker is not running"


def test_a_burst_of_requests_joins_the_batch_in_one_step(local_chat):
    """Requests that arrive together are all prefilled before the first decode step: four requests of
    STEPS tokens take STEPS - 1 decode steps, not one more step per request queued behind the first."""
    params = SamplingParams(max_new_tokens=STEPS, ignore_eos=True)
    finished = threading.Semaphore(0)
    counts = []

    def deliver(item) -> None:
        assert not isinstance(item, Exception), item
        if item.finish_reason:
            counts.append(item.completion_tokens)
            finished.release()

    worker = BatchWorker(local_chat, max_batch=4, max_len=256)
    for question in QUESTIONS:
        worker.submit(Job(Request(local_chat.prepare(question).prompt_ids, params), 0, deliver))
    worker.start()
    try:
        assert all(finished.acquire(timeout=60) for _ in QUESTIONS)
    finally:
        worker.stop()
    assert counts == [STEPS] * 4
    assert (worker.stats["steps"], worker.stats["max_active"]) == (STEPS - 1, 4)


def test_an_unexpected_failure_in_a_step_fails_its_requests_and_the_worker_goes_on(local_chat, monkeypatch):
    from internvl_mpo.generate.engine import Generation

    step = Generation.step
    calls = []

    def broken_once(self):
        calls.append(1)
        if len(calls) == 2:  # mid-decode, outside the engine's own per-request failure handling
            raise RuntimeError("bookkeeping bug")
        return step(self)

    monkeypatch.setattr(Generation, "step", broken_once)
    params = SamplingParams(max_new_tokens=STEPS, ignore_eos=True)
    results = Finals()
    worker = BatchWorker(local_chat, max_batch=4, max_len=256)
    first = Job(Request(local_chat.prepare("Hello there").prompt_ids, params), 0, results.deliver("first"))
    worker.submit(first)
    worker.start()
    try:
        assert results.wait()
        worker.submit(Job(Request(local_chat.prepare("Hello there").prompt_ids, params), 0, results.deliver("second")))
        worker.cancel(first)  # as its handler's close() does; the fresh batch numbers ids from 0 again
        assert results.wait()
    finally:
        worker.stop()
    results = results.items
    assert isinstance(results["first"], ApiError) and "bookkeeping bug" in results["first"].message
    assert results["second"].finish_reason == "length" and results["second"].completion_tokens == STEPS


def test_a_fresh_batch_that_cannot_be_built_fails_its_request_and_the_worker_goes_on(local_chat, monkeypatch):
    """After a failed step the worker builds a fresh batch; when that raises too (out of memory, say),
    the request that needed it gets a 500 and a later request is served by a batch built then."""
    from internvl_mpo.generate.engine import Generation

    step, start = Generation.step, local_chat.engine.start
    steps, starts = [], []

    def broken_once(self):
        steps.append(1)
        if len(steps) == 2:
            raise RuntimeError("bookkeeping bug")
        return step(self)

    def start_fails_once(max_batch, max_len):
        starts.append(1)
        if len(starts) == 2:  # the batch built after the failed step
            raise RuntimeError("out of memory")
        return start(max_batch, max_len)

    monkeypatch.setattr(Generation, "step", broken_once)
    monkeypatch.setattr(local_chat.engine, "start", start_fails_once)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    results = Finals()
    worker = BatchWorker(local_chat, max_batch=4, max_len=256)
    worker.start()
    try:
        for name in ("first", "second", "third"):
            worker.submit(Job(Request(local_chat.prepare("Hello there").prompt_ids, params), 0, results.deliver(name)))
            assert results.wait()
        assert worker.alive
    finally:
        worker.stop()
    results = results.items
    assert isinstance(results["first"], ApiError) and "bookkeeping bug" in results["first"].message
    assert isinstance(results["second"], ApiError) and results["second"].status == 500
    assert "out of memory" in results["second"].message
    assert results["third"].finish_reason == "length" and results["third"].completion_tokens == 4


def test_a_request_that_cannot_join_the_batch_fails_alone(local_chat, monkeypatch):
    from internvl_mpo.generate.engine import Generation

    add = Generation.add
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    bad = Request(local_chat.prepare("Hello there").prompt_ids, params)

    def failing_add(self, request):
        if request is bad:
            raise RuntimeError("unexpected")
        return add(self, request)

    monkeypatch.setattr(Generation, "add", failing_add)
    results = Finals()
    worker = BatchWorker(local_chat, max_batch=4, max_len=256)
    worker.submit(Job(bad, 0, results.deliver("bad")))
    worker.submit(Job(Request(local_chat.prepare("Hello there").prompt_ids, params), 0, results.deliver("good")))
    worker.start()
    try:
        assert results.wait(2)
    finally:
        worker.stop()
    results = results.items
    assert isinstance(results["bad"], ApiError) and results["bad"].status == 500
    assert results["good"].finish_reason == "length" and results["good"].completion_tokens == 4


def test_non_streamed_client_that_goes_away_frees_its_rows(server):
    """Tokens flow all the time, yet the rows of a plain request are freed soon after its client leaves."""
    before = health(server)
    body = {"messages": [{"role": "user", "content": "Go on."}], "temperature": 0, "max_tokens": 1800, "n": 4,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server[0] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(30, read=0.3))
    deadline = time.monotonic() + 60  # a busy machine may take a while; the rows are freed long before 1800 tokens
    while (state := health(server))["cancelled"] < before["cancelled"] + 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state["cancelled"] == before["cancelled"] + 4 and state["active"] == 0
    assert state["completion_tokens"] - before["completion_tokens"] < 4 * 1800


def test_ctrl_c_ends_the_running_generations_at_once(server, tmp_path):
    """uvicorn waits for open responses before the app shuts down; a SIGINT (Ctrl-C) to a busy server ends
    its long generations at once instead: a stream gets the error event and its end, a plain request a
    503, and the process exits (as a Ctrl-C'd command, 130)."""
    cmd = [sys.executable, "-m", "internvl_mpo.cli", "serve", "--model", str(server[1]), "--port", "0",
           "--max-len", "2048", "--max-tokens", "1900"]
    proc, url = launch(cmd, tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        long = {"model": str(server[1]), "messages": [{"role": "user", "content": "Go on."}], "temperature": 0,
                "max_tokens": 1900, "extra_body": {"ignore_eos": True}}
        plain = {}

        def plain_request() -> None:
            try:
                client.chat.completions.create(**long)
            except openai.APIStatusError as e:
                plain["error"] = e

        thread = threading.Thread(target=plain_request)
        thread.start()
        stream = client.chat.completions.create(stream=True, **long)
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)
        deadline = time.monotonic() + 60
        while httpx.get(url + "/health").json()["active"] < 2:  # both generations are running
            assert time.monotonic() < deadline, "the plain request did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        with pytest.raises(openai.APIError, match="the server is shutting down"):
            for chunk in chunks:
                assert chunk.choices[0].finish_reason is None  # no answer runs to its end
        thread.join(60)
        assert plain["error"].status_code == 503 and "shutting down" in plain["error"].message
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_logs_a_client_dropped_after_send_timeout_as_one_info_line(server, tmp_path):
    """`internvl-mpo serve` shows the server's own info lines beside uvicorn's: a plain answer (1800 tokens with their
    logprobs, 4 choices: 11 MB, more than the kernel's send buffer grows to, 4 MiB by default) to a client that reads
    none of it is dropped after --send-timeout 0.5 with the line saying so, and no warning or error is logged (our
    lines at INFO went nowhere before 2026-12-04)."""
    cmd = [sys.executable, "-m", "internvl_mpo.cli", "serve", "--model", str(server[1]), "--port", "0",
           "--max-len", "2048", "--max-tokens", "1800", "--send-timeout", "0.5"]
    log = tmp_path / "server.log"
    proc, url = launch(cmd, log)
    line = "INFO:     a client took none of its answer for 0.5 s (--send-timeout 0.5): its connection is closed"
    try:
        data = json.dumps({**LOUD, "max_tokens": 1800, "n": 4}).encode()
        with slow_client(url, "/v1/chat/completions", len(data), data, receive_buffer=4096):
            deadline = time.monotonic() + 60
            while line not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
    finally:
        stop(proc, 30)
    lines = log.read_text().splitlines()
    assert [x for x in lines if "client took" in x or x.startswith(("WARNING", "ERROR"))] == [line]


def test_a_port_out_of_range_is_refused_before_the_model_loads():
    from internvl_mpo.errors import ConfigError
    from internvl_mpo.server import serve

    for port in (99999, 65536, -1):  # 65536 reached the bind, an OverflowError's traceback
        with pytest.raises(ConfigError, match=rf"--port must be in 0\.\.65535, got {port}$"):
            serve(model="/nonexistent/model", port=port)


@pytest.mark.parametrize("flag, value, message", [
    ("max_tokens", 0, "--max-tokens must be at least 1, got 0"),  # every request without max_tokens was a 500
    ("max_n", 0, "--max-n must be at least 1, got 0"),
    ("max_tiles", 0, "--max-tiles must be at least 1, got 0"),
    ("max_prompt_tokens", 0, "--max-prompt-tokens must be at least 1, got 0"),  # 0 was read as no limit
    ("max_images", -1, "--max-images must be at least 0, got -1"),
    ("max_request_bytes", 0, "--max-request-bytes must be at least 1, got 0"),
    ("max_image_bytes", 0, "--max-image-bytes must be at least 1, got 0"),
    ("max_image_pixels", 0, "--max-image-pixels must be at least 1, got 0"),
    ("image_timeout", 0.0, "--image-timeout must be a number of seconds more than 0, got 0.0"),
    ("image_timeout", float("inf"), "--image-timeout must be a number of seconds more than 0, got inf"),  # socket's
    ("image_timeout", True, "--image-timeout must be a number of seconds more than 0, got True"),  # settimeout fails
    ("max_concurrent_requests", 0, "--max-concurrent-requests must be at least 1, got 0"),
    ("max_concurrent_requests", 2.5, "--max-concurrent-requests must be a whole number, got 2.5"),  # from Python
    ("max_concurrent_requests", True, "--max-concurrent-requests must be a whole number, got True"),
    ("request_read_timeout", 0, "--request-read-timeout must be a number of seconds more than 0, got 0"),
    ("request_read_timeout", -1.0, "--request-read-timeout must be a number of seconds more than 0, got -1.0"),
    ("request_read_timeout", float("nan"), "--request-read-timeout must be a number of seconds more than 0, got nan"),
    ("request_read_timeout", float("inf"), "--request-read-timeout must be a number of seconds more than 0, got inf"),
    ("request_read_timeout", "60", "--request-read-timeout must be a number of seconds more than 0, got '60'"),
    ("request_read_timeout", True, "--request-read-timeout must be a number of seconds more than 0, got True"),
    ("send_timeout", 0, "--send-timeout must be a number of seconds more than 0, got 0"),
    ("send_timeout", float("inf"), "--send-timeout must be a number of seconds more than 0, got inf"),
    ("send_timeout", "60", "--send-timeout must be a number of seconds more than 0, got '60'"),
    ("header_timeout", 0, "--header-timeout must be a number of seconds more than 0, got 0"),
    ("header_timeout", float("nan"), "--header-timeout must be a number of seconds more than 0, got nan"),
    ("max_connections", 0, "--max-connections must be at least 1, got 0"),
    ("max_len", 1, "--max-batch must be >= 1 and --max-len >= 2, got 8, 1"),  # no room for a prompt and a token
    ("max_batch", 0, "--max-batch must be >= 1 and --max-len >= 2, got 0, 4096"),
    ("served_model_name", "", "--served-model-name must name the model, got ''"),  # the default name was served
    ("served_model_name", " ", "--served-model-name must name the model, got ' '"),
    ("max_connections", 300.0, "--max-connections must be a whole number, got 300.0"),  # from Python
    ("max_connections", 64, "--max-connections (64) must be more than --max-concurrent-requests (64): each request "
                            "in progress holds a connection, and /health needs one more"),
])
def test_limits_out_of_range_are_refused_before_the_model_loads(flag, value, message):
    from internvl_mpo.errors import ConfigError
    from internvl_mpo.server import serve

    with pytest.raises(ConfigError, match=re.escape(message)):
        serve(model="/nonexistent/model", port=0, **{flag: value})


def test_a_batch_too_big_for_memory_is_refused_before_serving(server, apps, monkeypatch):
    """The KV cache of --max-batch x --max-len is allocated before the server listens: when it does not fit,
    `serve` stops with a one-line error instead of serving with a dead worker (every request a 503)."""
    from internvl_mpo.errors import ConfigError
    from internvl_mpo.generate.engine import Engine

    def out_of_memory(self, max_batch, max_len):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(Engine, "start", out_of_memory)
    with pytest.raises(ConfigError, match=r"64 rows of \d+ tokens does not fit: CUDA out of memory.*--max-batch"):
        serve(model=str(server[1]), port=0, device="cpu", max_batch=64, max_len=4096)
    assert apps == []


def test_serve_freezes_what_is_alive_once_the_model_and_app_are_built(server, apps):
    """Before it listens, `serve` moves every object then alive (the model, the app, the modules: hundreds of
    thousands) out of the collector's generations, so that full collections stop walking them: during an answer of
    n 4 with 2048 tokens and 20 logprobs each, they took up to 0.36 s (every stream and /health waiting), frozen
    0.09 s (the README has the measurement). Nothing of this process was frozen before; all of it is after."""
    import gc

    assert gc.get_freeze_count() == 0
    serve(model=str(server[1]), port=0, device="cpu", max_len=256)
    [app] = apps
    assert gc.get_freeze_count() > 100_000 and gc.is_tracked(app)  # tracked, as every object that can hold others
    assert not any(o is app for o in gc.get_objects())  # in no generation: frozen


def test_a_port_in_use_is_refused_before_the_model_loads():
    from internvl_mpo.errors import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot listen on 127\.0\.0\.1:{port}: .*in use"):
            serve(model="/nonexistent/model", port=port)


@contextlib.contextmanager
def app_server(local_chat, send_buffer: int | None = None, **settings):
    """The base url of `create_app(local_chat, ServerSettings(served_model_name="m", **settings))` served by
    uvicorn on a thread of this process (so the test can patch the engine), stopped afterwards. `send_buffer`:
    the SO_SNDBUF of its connections (else the kernel sizes it, up to megabytes)."""
    import uvicorn

    from internvl_mpo.server import create_app
    from internvl_mpo.server.runner import uvicorn_config

    listener = socket.socket()
    if send_buffer is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)  # the connections it accepts inherit it
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    settings = ServerSettings(served_model_name="m", **settings)
    server = uvicorn.Server(uvicorn_config(create_app(local_chat, settings), settings, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]})
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def held_prefills(local_chat, monkeypatch):
    """Every prefill (and with it the worker thread) waits until the block ends: requests stay in progress."""
    gate = threading.Event()
    prefill = local_chat.engine.prefill

    def held(request, caches, row):
        assert gate.wait(60), "the test never let the prefill go"
        return prefill(request, caches, row)

    monkeypatch.setattr(local_chat.engine, "prefill", held)
    try:
        yield
    finally:
        gate.set()


def in_progress(url: str, count: int) -> None:
    """Wait until /health counts `count` requests in progress (the server sees a client go at its own pace)."""
    deadline = time.monotonic() + 30
    while (state := httpx.get(url + "/health").json())["in_progress"] != count:
        assert time.monotonic() < deadline, f"{state['in_progress']} requests in progress, not {count}"
        time.sleep(0.05)


def test_a_failed_generation_reaches_the_openai_client_as_an_error_and_the_server_goes_on(local_chat, monkeypatch):
    """What a client sees when generation fails inside the engine (a prefill out of memory, say): the
    openai client raises InternalServerError for a plain request and APIError from the stream's error
    event, and the next request is answered."""
    prefill, failing = local_chat.engine.prefill, [True]

    def flaky_prefill(request, caches, row):
        if failing[0]:
            raise RuntimeError("CUDA out of memory (simulated)")
        return prefill(request, caches, row)

    monkeypatch.setattr(local_chat.engine, "prefill", flaky_prefill)
    with app_server(local_chat, max_batch=2, max_len=256) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "Hello there"}]
        with pytest.raises(openai.InternalServerError, match="out of memory"):
            client.chat.completions.create(model="m", messages=messages, **GREEDY)
        with pytest.raises(openai.APIError, match="out of memory"):
            stream_text(client, messages=messages, **GREEDY)
        failing[0] = False
        texts, finishes, _ = stream_text(client, messages=messages, **GREEDY)
        expected = local_chat.chat("Hello there", do_sample=False, max_new_tokens=STEPS)
        assert texts[0].strip() == expected and finishes[0] in ("stop", "length")


def test_one_request_over_max_concurrent_requests_is_a_429_at_once_before_its_images_are_read(local_chat,
                                                                                               monkeypatch):
    """With --max-concurrent-requests 2 and two requests held (a plain one and a stream, their prefill
    blocked), a third gets the 429 at once on every route that prepares a prompt: a chat request with an
    unreadable image too, which would be a 400 if its image were decoded. Once the two are answered
    their places are free again."""
    messages = [{"role": "user", "content": "Hello there"}]
    bad_image = [user("What is this?", b"not an image")]
    with app_server(local_chat, max_batch=2, max_len=256, max_concurrent_requests=2) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        plain = {}
        with held_prefills(local_chat, monkeypatch):
            thread = threading.Thread(target=lambda: plain.update(
                answer=client.chat.completions.create(model="m", messages=messages, **GREEDY)))
            thread.start()
            in_progress(url, 1)
            stream = client.chat.completions.create(model="m", messages=messages, stream=True, **GREEDY)
            chunks = iter(stream)
            assert next(chunks).choices[0].delta.role == "assistant"  # its place is taken before this is sent
            assert httpx.get(url + "/health").json()["in_progress"] == 2
            for route, body in [("/v1/chat/completions", {"messages": bad_image}), ("/v1/completions", {"prompt": "a"}),
                                ("/tokenize", {"messages": bad_image})]:
                refused = httpx.post(url + route, json=body, timeout=30)
                assert refused.status_code == 429, (route, refused.text)
                assert refused.json() == {"error": {
                    "message": "the server is busy: 2 requests are in progress (--max-concurrent-requests 2); retry later",
                    "type": "server_error", "param": None, "code": "overloaded"}}
            with pytest.raises(openai.RateLimitError, match="--max-concurrent-requests 2"):
                client.chat.completions.create(model="m", messages=messages, **GREEDY)
        thread.join(60)
        expected = local_chat.chat("Hello there", do_sample=False, max_new_tokens=STEPS)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks).strip() == expected
        assert plain["answer"].choices[0].message.content.strip() == expected
        in_progress(url, 0)  # the stream's place comes back as its response ends
        state = httpx.get(url + "/health").json()
        assert state["max_concurrent_requests"] == 2 and state["requests"] == 2  # the refused ones never ran
        again = [client.chat.completions.create(model="m", messages=messages, **GREEDY) for _ in range(3)]
        assert [a.choices[0].message.content.strip() for a in again] == [expected] * 3


def test_a_place_comes_back_after_an_error_and_after_a_client_goes_away(local_chat, monkeypatch):
    """With --max-concurrent-requests 1: a request with a bad image (a 400) leaves its place free; so does a
    stream whose client goes away in the middle, and a plain request whose client stops waiting, while
    their generations are still held in the worker."""
    messages = [{"role": "user", "content": "Hello there"}]
    with app_server(local_chat, max_batch=2, max_len=256, max_concurrent_requests=1) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with held_prefills(local_chat, monkeypatch):
            for _ in range(2):  # a place leaked would make the second a 429
                with pytest.raises(openai.BadRequestError, match="not an image Pillow can read"):
                    client.chat.completions.create(model="m", messages=[user("What is this?", b"not an image")])
            stream = client.chat.completions.create(model="m", messages=messages, stream=True, **GREEDY)
            next(iter(stream))
            with pytest.raises(openai.RateLimitError, match=re.escape(
                    "the server is busy: 1 request is in progress (--max-concurrent-requests 1)")):
                client.chat.completions.create(model="m", messages=messages, **GREEDY)
            stream.close()  # the client goes away mid-stream, its generation still held
            in_progress(url, 0)
            with pytest.raises(httpx.ReadTimeout):  # a plain request whose client stops waiting
                httpx.post(url + "/v1/chat/completions", json={"messages": messages, **GREEDY},
                           timeout=httpx.Timeout(30, read=0.3))
            in_progress(url, 0)
        answer = client.chat.completions.create(model="m", messages=messages, **GREEDY)
        expected = local_chat.chat("Hello there", do_sample=False, max_new_tokens=STEPS)
        assert answer.choices[0].message.content.strip() == expected


def test_max_concurrent_requests_must_be_a_whole_number_on_the_command_line(capsys):
    from internvl_mpo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--max-concurrent-requests", "2.5"])
    assert exit_.value.code == 2
    assert "argument --max-concurrent-requests: invalid int value: '2.5'" in capsys.readouterr().err


def test_max_connections_must_be_a_whole_number_on_the_command_line(capsys):
    from internvl_mpo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--max-connections", "1e3"])
    assert exit_.value.code == 2
    assert "argument --max-connections: invalid int value: '1e3'" in capsys.readouterr().err


def test_a_connection_over_max_connections_is_a_503_and_the_next_is_served_once_one_closes(local_chat, monkeypatch):
    """With --max-concurrent-requests 1 and --max-connections 2: beside a request in progress (its prefill held),
    /health is answered on a second connection, which stays open. A third connection's request gets a 503 naming
    the flag, without reaching the app; so does a fourth's upload, whose rest the server reads and drops until the
    client closes (closed at once, the connection was reset, and a client still sending saw that, not the 503). The
    refused ones hold no place: once the second closes, a new connection is served again, and the held request is
    answered. Before 2026-12-04 any number of connections were held open, each with its socket and memory."""
    import http.client

    prefill, reached, gate = local_chat.engine.prefill, threading.Event(), threading.Event()

    def held(request, caches, row):
        reached.set()
        assert gate.wait(60), "the test never let the prefill go"
        return prefill(request, caches, row)

    def health(conn: socket.socket) -> tuple[int, str | None, dict]:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = http.client.HTTPResponse(conn)
        response.begin()
        return response.status, response.getheader("connection"), json.loads(response.read())

    monkeypatch.setattr(local_chat.engine, "prefill", held)
    body = {"messages": [{"role": "user", "content": "Hello there"}], **GREEDY}
    answers = []
    with app_server(local_chat, max_batch=2, max_len=256, max_concurrent_requests=1, max_connections=2) as url:
        address = url.removeprefix("http://").split(":")
        sender = threading.Thread(target=lambda: answers.append(httpx.post(url + "/v1/chat/completions", json=body,
                                                                           timeout=120)))
        sender.start()
        try:
            assert reached.wait(60), "the request never reached its prefill"
            kept = socket.create_connection((address[0], int(address[1])), timeout=30)
            status, _, state = health(kept)
            assert status == 200 and state["in_progress"] == 1
            kept.sendall(b"GET /health HTTP/1.1\r\n")  # part of a next head: held by --header-timeout (60 s)
            busy = (503, "close", {"error": {
                "message": "the server is busy: 2 connections are open (--max-connections 2); retry later",
                "type": "server_error", "param": None, "code": "overloaded"}})
            with socket.create_connection((address[0], int(address[1])), timeout=30) as refused:
                assert health(refused) == busy
                assert refused.recv(1) == b""  # the server sends nothing more
            with slow_client(url, "/v1/chat/completions", 10**6, b"[" * 1000) as upload:
                response = http.client.HTTPResponse(upload)
                response.begin()
                assert (response.status, response.getheader("connection"), json.loads(response.read())) == busy
                upload.sendall(b"[" * (10**6 - 1000))  # the rest of the body, read and dropped
                upload.shutdown(socket.SHUT_WR)
                assert upload.recv(1) == b""  # closed by the server once the client is done
            kept.close()
            deadline = time.monotonic() + 30
            while (answer := httpx.get(url + "/health", timeout=30)).status_code == 503:  # until the server sees it
                assert time.monotonic() < deadline, "no connection was served after one closed"
                time.sleep(0.05)
            assert answer.status_code == 200 and answer.json()["in_progress"] == 1
        finally:
            gate.set()
            sender.join(120)
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["choices"][0]["message"]["content"].strip() == local_chat.chat(
        "Hello there", do_sample=False, max_new_tokens=STEPS)


def test_request_read_timeout_must_be_a_number_on_the_command_line(capsys):
    from internvl_mpo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--request-read-timeout", "a minute"])
    assert exit_.value.code == 2
    assert "argument --request-read-timeout: invalid float value: 'a minute'" in capsys.readouterr().err


def slow_client(url: str, route: str, length: int, sent: bytes = b"",
                receive_buffer: int | None = None) -> socket.socket:
    """A connection that has sent a POST to `route` declaring a JSON body of `length` bytes, and `sent` of it;
    with a SO_RCVBUF of `receive_buffer` bytes if given (set before connecting: the window it offers stays small)."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.socket()
    conn.settimeout(30)
    if receive_buffer is not None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    conn.connect((host, int(port)))
    conn.sendall(f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + sent)
    return conn


def timed_out(conn: socket.socket) -> dict:
    """The 408 the server answered on `conn`, checked in full (the connection closed after it): its JSON body."""
    import http.client

    response = http.client.HTTPResponse(conn)
    response.begin()
    assert (response.status, response.getheader("connection")) == (408, "close")
    body = json.loads(response.read())
    assert conn.recv(1) == b""  # closed by the server, which waits no more for the rest of the body
    conn.close()
    return body


@pytest.mark.parametrize("sent", [b"", b'{"messages": [{"role": "user", '], ids=["no byte", "part"])
def test_a_body_that_stalls_is_a_408_after_request_read_timeout_and_its_place_comes_back(local_chat, sent):
    """With --max-concurrent-requests 1 and --request-read-timeout 0.5, a client that sends its headers and then
    none or part of its body, and stalls, holds the one place for the deadline only: on every route that takes
    one, it gets a 408 in OpenAI's error shape and its connection is closed, and the next request is served."""
    messages = [{"role": "user", "content": "Hello there"}]
    expected = local_chat.chat("Hello there", do_sample=False, max_new_tokens=STEPS)
    with app_server(local_chat, max_batch=2, max_len=256, max_concurrent_requests=1, request_read_timeout=0.5) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for route in ("/v1/chat/completions", "/v1/completions", "/tokenize"):
            assert timed_out(slow_client(url, route, 1000, sent)) == {"error": {
                "message": "the request body did not arrive within 0.5 s (--request-read-timeout 0.5)",
                "type": "invalid_request_error", "param": None, "code": "request_timeout"}}
            assert httpx.get(url + "/health").json()["in_progress"] == 0  # given back before the 408 was sent
            answer = client.chat.completions.create(model="m", messages=messages, **GREEDY)
            assert answer.choices[0].message.content.strip() == expected


def test_request_read_timeout_bounds_the_whole_body_not_the_gaps_between_its_bytes(local_chat):
    """A client that sends its body a byte every 0.1 s, never idle for the 0.5 s deadline, still gets the 408 once
    the deadline has passed since its body was awaited (1000 bytes would take it 100 s): a deadline between reads,
    as nginx's client_body_timeout, would let it hold a place for as long as it likes."""
    with app_server(local_chat, max_batch=2, max_len=256, max_concurrent_requests=1, request_read_timeout=0.5) as url:
        conn = slow_client(url, "/v1/chat/completions", 1000)
        trickle(conn)
        assert timed_out(conn)["error"]["code"] == "request_timeout"
        assert httpx.get(url + "/health").json()["in_progress"] == 0


def trickle(conn: socket.socket) -> None:
    """Send a byte every 0.1 s on `conn` until the server answers or closes it (30 s at most)."""
    for _ in range(300):
        if select.select([conn], [], [], 0.1)[0]:
            return
        conn.sendall(b"a")
    raise AssertionError("the server neither answered nor closed the connection within 30 s")


def test_a_request_head_that_trickles_in_is_a_408_after_header_timeout(local_chat):
    """With --header-timeout 0.5: a connection that sends nothing is closed at the deadline; one that sends a
    request's head a byte every 0.1 s, never idle for the deadline, gets a 408 naming the flag and is closed; so is
    one that does this with its third request (uvicorn's keep-alive timeout stops at the head's first byte, ours
    starts there). uvicorn has no deadline on a head: each held its connection as long as it liked before
    2026-12-04. An honest request on a kept-alive connection is served (its head comes at once). A body answered
    before it was read (a 401) and then sent a byte every 0.1 s is cut at the deadline too, with nothing more sent:
    uvicorn read and dropped it for as long as it came."""
    import http.client

    def connect() -> socket.socket:
        return socket.create_connection((host, int(port)), timeout=30)

    def health(conn: socket.socket) -> None:
        conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        response = http.client.HTTPResponse(conn)
        response.begin()
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"

    with app_server(local_chat, max_batch=2, max_len=256, header_timeout=0.5, api_key=KEY) as url:
        host, port = url.removeprefix("http://").split(":")
        with connect() as silent:
            assert silent.recv(1) == b""  # closed (a timeout after 30 s before)
        kept = connect()
        health(kept)
        health(kept)
        fresh = connect()  # after the two requests: opened before, it had 0.5 s for them to take, not for its head
        for conn in (fresh, kept):
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            trickle(conn)
            assert timed_out(conn) == {"error": {
                "message": "the request head did not arrive within 0.5 s (--header-timeout 0.5)",
                "type": "invalid_request_error", "param": None, "code": "request_timeout"}}
        with slow_client(url, "/v1/chat/completions", 10**6) as early:  # no API key: a 401 before the body is read
            response = http.client.HTTPResponse(early)
            response.begin()
            assert response.status == 401 and json.loads(response.read())["error"]["code"] == "invalid_api_key"
            trickle(early)
            assert early.recv(1) == b""  # closed


def test_a_client_still_sending_when_its_connection_is_cut_reads_the_end_not_a_reset(local_chat):
    """A client that floods the body of a request answered before it was read (a 401) until the server answers or
    closes: at --header-timeout the server ends what it sends and reads and drops what still comes until the client
    closes (or LINGER_S), so the client reads the end of the connection. It closed its socket at once before
    2026-12-05, with the client's bytes unread, and the kernel sent a reset in place of the end (CI saw it once, in
    test_a_request_head_that_trickles_in...); a reset can also reach a client before it read its answer."""
    import http.client

    chunk = b" " * 2**16
    with app_server(local_chat, max_batch=2, max_len=256, header_timeout=0.3, api_key=KEY,
                    max_request_bytes=2**50) as url:
        with slow_client(url, "/v1/chat/completions", 2**50) as early:  # no API key: a 401 before the body is read
            response = http.client.HTTPResponse(early)
            response.begin()
            assert response.status == 401 and json.loads(response.read())["error"]["code"] == "invalid_api_key"
            while not select.select([early], [], [], 0)[0]:
                early.sendall(chunk)
            assert early.recv(1) == b""  # the end; a ConnectionResetError before


def test_a_client_that_keeps_sending_after_its_408_is_cut_off_after_the_linger(local_chat):
    """After a 408 for a late head the server reads and drops what still comes for LINGER_S, then closes: a client
    that never closes and keeps sending a byte now and then must not hold the connection (and its place under
    --max-connections) for ever. Once the server has closed, what the client sends is answered by a reset."""
    import http.client

    with app_server(local_chat, max_batch=2, max_len=256, header_timeout=0.3) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            response = http.client.HTTPResponse(conn)
            response.begin()
            assert response.status == 408 and json.loads(response.read())["error"]["code"] == "request_timeout"
            deadline = time.monotonic() + 30
            while True:
                try:
                    conn.sendall(b"a")
                except OSError:  # reset: the server closed the connection
                    break
                assert time.monotonic() < deadline, "the connection was still open 30 s after the 408"
                time.sleep(0.1)
        assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"


def test_a_body_of_exactly_max_request_bytes_is_taken_and_one_byte_more_is_a_413_chunked_or_not(local_chat):
    """--max-request-bytes is the largest body taken: one of exactly that many bytes is served, one byte more is a 413
    whether its Content-Length says so or it comes chunked (no length: counted as it is read)."""
    body = json.dumps({"model": "m", "tokens": [1, 2, 3]}).encode()
    with app_server(local_chat, max_batch=2, max_len=256, max_request_bytes=len(body)) as url:
        exact = httpx.post(url + "/detokenize", content=body, timeout=60)
        assert exact.status_code == 200, exact.text
        for content in (body + b" ", iter([body, b" "])):
            over = httpx.post(url + "/detokenize", content=content, timeout=60)
            assert (over.status_code, over.json()["error"]["code"]) == (413, "request_too_large"), over.text


def test_an_honest_body_in_several_chunks_within_request_read_timeout_is_served(local_chat):
    """A body sent in five chunks (chunked transfer encoding, no Content-Length) spread over about a second is read
    whole and answered under a deadline of 10 s."""
    body = json.dumps({"messages": [{"role": "user", "content": "Hello there"}], **GREEDY}).encode()

    def chunks():
        for i in range(5):
            time.sleep(0.2)  # the pace of an upload, not a synchronisation
            yield body[i * len(body) // 5:(i + 1) * len(body) // 5]

    expected = local_chat.chat("Hello there", do_sample=False, max_new_tokens=STEPS)
    with app_server(local_chat, max_batch=2, max_len=256, max_concurrent_requests=1, request_read_timeout=10) as url:
        answer = httpx.post(url + "/v1/chat/completions", content=chunks(), timeout=60,
                            headers={"Content-Type": "application/json"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"].strip() == expected


def hold(monkeypatch, name: str) -> SimpleNamespace:
    """`internvl_mpo.server.app.<name>` (json_body or json_response) made to wait, once called (on a worker thread),
    until `released` is set or 20 s have passed (on the event loop, /health could not answer until then); it then
    notes its name in `events` and runs. `called` is set when it is called."""
    from internvl_mpo.server import app as app_module

    run = getattr(app_module, name)
    state = SimpleNamespace(events=[], called=threading.Event(), released=threading.Event())

    def held(value):
        state.called.set()
        state.released.wait(20)
        state.events.append(name)
        return run(value)

    monkeypatch.setattr(app_module, name, held)
    return state


def health_while_held(url: str, held: SimpleNamespace, route: str, body: dict) -> tuple[dict, httpx.Response]:
    """POST `body` to `route` on a thread and, once it has reached the `held` call, GET /health on another
    connection, note "health" in `held.events` and let the call go: /health's JSON and the POST's response."""
    held.events.clear(), held.called.clear(), held.released.clear()
    answers = []
    sender = threading.Thread(target=lambda: answers.append(httpx.post(url + route, json=body, timeout=120)))
    sender.start()
    try:
        assert held.called.wait(60), f"the request to {route} never reached the held call"
        state = httpx.get(url + "/health", timeout=60).json()
        held.events.append("health")
    finally:
        held.released.set()
        sender.join(120)
    return state, answers[0]


def test_a_body_being_parsed_holds_up_no_other_request(local_chat, monkeypatch):
    """A request's JSON is decoded and checked on a worker thread: while it is (held there until /health has answered,
    or 20 s), /health on another connection is answered, and the request is served after. Before, json.loads ran on
    the event loop (about a second for a 32 MiB body), and every stream and /health waited for it."""
    held = hold(monkeypatch, "json_body")
    with app_server(local_chat, max_batch=2, max_len=256) as url:
        body = {"messages": [{"role": "user", "content": "Hello there"}], **GREEDY}
        state, answer = health_while_held(url, held, "/v1/chat/completions", body)
    assert held.events == ["health", "json_body"] and state["in_progress"] == 1
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"].strip() == local_chat.chat(
        "Hello there", do_sample=False, max_new_tokens=STEPS)


# a request of each route that can answer megabytes of JSON, with the logprobs that make them large
BIG_ANSWERS = [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there"}], "n": 2,
                                         "logprobs": True, "top_logprobs": 20, "prompt_logprobs": 20, **GREEDY}),
               ("/v1/completions", {"prompt": ["Hello there", "Count to ten."], "n": 2, "echo": True, "logprobs": 20,
                                    "prompt_logprobs": 5, **GREEDY}),
               ("/tokenize", {"messages": [{"role": "user", "content": "Hello there"}]}),
               ("/detokenize", {"tokens": list(range(300))})]


def test_an_answer_being_encoded_holds_up_no_other_request(local_chat, monkeypatch):
    """A route's JSON answer is built and encoded on a worker thread: while it is (held there until /health has
    answered, or 20 s), /health on another connection is answered. Before, FastAPI encoded the returned dict on the
    event loop (about 3 s for the 15 MiB of a chat answer with n 4 of 2048 tokens, 2048 prompt tokens, 20
    alternatives each)."""
    held = hold(monkeypatch, "json_response")
    with app_server(local_chat, max_batch=2, max_len=256) as url:
        for route, body in BIG_ANSWERS:
            state, answer = health_while_held(url, held, route, body)
            assert held.events == ["health", "json_response"] and state["status"] == "ok", route
            assert answer.status_code == 200, answer.text


def test_answers_are_the_bytes_fastapi_made_of_them(server):
    """Encoded off the event loop, each answer is what FastAPI made of the returned dict (jsonable_encoder, then
    JSONResponse): the same bytes and headers."""
    from fastapi.encoders import jsonable_encoder
    from fastapi.responses import JSONResponse

    for route, body in BIG_ANSWERS:
        reply = post_to(server, route, {"model": "m", **body})
        assert reply.status_code == 200, reply.text
        made = JSONResponse(jsonable_encoder(reply.json()))
        assert reply.content == made.body, route
        assert reply.headers["content-type"] == made.headers["content-type"], route
        assert reply.headers["content-length"] == made.headers["content-length"], route


# a long greedy answer with 20 top logprobs per token: about 1.5 kB of events a token, megabytes in all
LOUD = {"messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "ignore_eos": True,
        "logprobs": True, "top_logprobs": 20}


def stream_client(url: str, body: dict) -> socket.socket:
    """A connection with a 4 KiB receive buffer that has sent `body` as a streamed chat request (read nothing yet)."""
    data = json.dumps({**body, "stream": True}).encode()
    return slow_client(url, "/v1/chat/completions", len(data), data, receive_buffer=4096)


@contextlib.contextmanager
def uvicorn_records(caplog):
    """caplog gets uvicorn's records and ours from INFO up, which the logging configs of uvicorn and of an earlier
    `serve` in this process keep from the root logger."""
    loggers = [logging.getLogger(name) for name in ("uvicorn", "internvl_mpo")]
    kept = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="internvl_mpo"):
            yield
    finally:
        for logger, propagate in zip(loggers, kept):
            logger.propagate = propagate


def send_timeout_lines(caplog) -> list[tuple[str, str]]:
    """The (logger, message) of each record from uvicorn, and of ours that say a client was dropped. Each record
    once: pytest >= 9.2 also hangs caplog's handler on the loggers that did not propagate when the test began,
    which `uvicorn_records` then lets propagate to the root, so caplog sees their records twice."""
    records = {id(r): r for r in caplog.records}.values()
    return [(r.name, r.getMessage()) for r in records
            if r.name.startswith("uvicorn") or "--send-timeout" in r.getMessage()]


def test_a_stream_whose_client_stops_reading_is_abandoned_after_send_timeout(local_chat, monkeypatch, caplog):
    """With --max-concurrent-requests 1 and --send-timeout 0.5, a client that asks for a 1800-token stream and reads
    none of it fills the socket buffers (a 64 KiB SO_SNDBUF here), and the server's next write waits for it: 0.5 s later
    the stream is abandoned, its place given back and its generation cancelled in the worker (held after 400 steps,
    enough to fill the buffers, so that it cannot end first), and the next request is served. The client reading
    at last gets what was sent before, without [DONE], then the end of the connection. The server logs one info line
    of its own, and nothing from uvicorn (which logged "ASGI callable returned without completing response" as an
    error, for each such client, before 2026-12-04)."""
    from internvl_mpo.generate.engine import Generation

    gate, steps, step = threading.Event(), itertools.count(1), Generation.step

    def held(self):
        if next(steps) > 400:
            assert gate.wait(60), "the test never let the worker go"
        return step(self)

    monkeypatch.setattr(Generation, "step", held)
    messages = [{"role": "user", "content": "Hello there"}]
    with uvicorn_records(caplog), app_server(local_chat, send_buffer=2**16, max_batch=2, max_len=2048,
                                             max_concurrent_requests=1, send_timeout=0.5) as url:
        conn = stream_client(url, {**LOUD, "max_tokens": 1800})
        try:
            in_progress(url, 0)  # the worker is still held: only the send deadline can give the place back
        finally:
            gate.set()
        deadline = time.monotonic() + 30
        while (state := httpx.get(url + "/health").json())["active"]:  # the worker takes the cancel at its next step
            assert time.monotonic() < deadline, state
            time.sleep(0.05)
        assert state["cancelled"] == 1 and state["completion_tokens"] < 1800
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.chat.completions.create(model="m", messages=messages, **GREEDY)
        assert answer.choices[0].message.content.strip() == local_chat.chat("Hello there", do_sample=False,
                                                                            max_new_tokens=STEPS)
        received = bytearray()
        while chunk := conn.recv(2**16):  # the server closed the connection (a timeout here if it had not)
            received += chunk
        conn.close()
        assert received.startswith(b"HTTP/1.1 200 OK\r\n") and b"data: {" in received and b"[DONE]" not in received
    assert send_timeout_lines(caplog) == [("internvl_mpo.server", "a client took none of its answer for 0.5 s "
                                                                  "(--send-timeout 0.5): its connection is closed")]


def test_a_plain_answer_its_client_never_reads_is_dropped_after_send_timeout(local_chat, caplog):
    """A plain answer (400 tokens with their logprobs, about 600 kB) to a client that reads none of it fills the socket
    buffers; with --send-timeout 0.5 the server drops the connection and the rest of the answer, logging one info line
    (nothing from uvicorn). The client reading at last gets the start of the answer, then the end of the connection.
    Before 2026-12-04 uvicorn kept the answer and the connection until the client read it, however long that was."""
    data = json.dumps({**LOUD, "max_tokens": 400}).encode()
    with uvicorn_records(caplog), app_server(local_chat, send_buffer=2**16, max_batch=2, max_len=2048,
                                             send_timeout=0.5) as url:
        conn = slow_client(url, "/v1/chat/completions", len(data), data, receive_buffer=4096)
        deadline = time.monotonic() + 60
        while not send_timeout_lines(caplog):
            assert time.monotonic() < deadline, "the connection was not dropped"
            time.sleep(0.05)
        received = bytearray()
        while chunk := conn.recv(2**16):  # the server closed the connection (a timeout here if it had not)
            received += chunk
        conn.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert 0 < len(body) < int(re.search(rb"content-length: (\d+)", head).group(1))
    assert send_timeout_lines(caplog) == [("internvl_mpo.server", "a client took none of its answer for 0.5 s "
                                                                  "(--send-timeout 0.5): its connection is closed")]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
def test_a_client_gone_before_its_body_arrived_gives_its_place_back_without_an_error_logged(local_chat, caplog, route):
    """A client that sends its head and part of its body, then closes (killed, its network gone), gives its place
    back, and the server logs nothing from WARNING up: before 2026-12-05 starlette's ClientDisconnect reached the
    app's handler of unexpected errors, which logged "request failed" and a traceback, and uvicorn a second one."""
    with uvicorn_records(caplog), app_server(local_chat, max_batch=2, max_len=256) as url:
        conn = slow_client(url, route, 1000, b'{"messages": [{"role": "user", ')
        if route != "/detokenize":  # not admitted: it holds no place
            in_progress(url, 1)
        time.sleep(0.2)  # the body being awaited
        conn.close()
        in_progress(url, 0)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hello there"}],
                                                **GREEDY)
        assert answer.choices[0].message.content.strip() == local_chat.chat("Hello there", do_sample=False,
                                                                            max_new_tokens=STEPS)
    assert [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_plain_answer_its_client_does_not_read_gives_its_place_back_once_made(local_chat):
    """A plain answer (400 tokens with their logprobs, about 600 kB, more than the socket buffers) gives its place
    back once it is made: uvicorn takes it whole and sends it as the client reads, which this one does only after
    the next request (with --max-concurrent-requests 1) has been served; it then gets all of it."""
    import http.client

    data = json.dumps({**LOUD, "max_tokens": 400}).encode()
    with app_server(local_chat, send_buffer=2**16, max_batch=2, max_len=2048, max_concurrent_requests=1) as url:
        conn = slow_client(url, "/v1/chat/completions", len(data), data, receive_buffer=4096)
        deadline = time.monotonic() + 30
        while (state := httpx.get(url + "/health").json())["requests"] < 1 or state["active"] or state["in_progress"]:
            assert time.monotonic() < deadline, state  # generated, and its place given back
            time.sleep(0.05)
        answer = httpx.post(url + "/v1/chat/completions", json={**LOUD, "max_tokens": 400}, timeout=60)
        assert answer.status_code == 200, answer.text
        response = http.client.HTTPResponse(conn)
        response.begin()
        assert response.status == 200 and json.loads(response.read())["choices"] == answer.json()["choices"]
        conn.close()


def test_a_stream_read_slowly_but_steadily_gets_its_whole_answer_past_send_timeout(local_chat):
    """A client reading its stream (400 tokens, about 600 kB) 8 KiB at a time every 0.05 s, so that the server's
    writes wait for it again and again, but each far less than --send-timeout 2, gets its whole answer though it
    takes longer than 2 s in all: the deadline is on each write, not on the response."""
    import http.client

    with app_server(local_chat, send_buffer=2**16, max_batch=2, max_len=2048, send_timeout=2) as url:
        expected = httpx.post(url + "/v1/chat/completions", json={**LOUD, "max_tokens": 400}, timeout=60).json()
        conn = stream_client(url, {**LOUD, "max_tokens": 400})
        response = http.client.HTTPResponse(conn)
        response.begin()
        assert response.status == 200
        body = bytearray()
        while piece := response.read(8192):
            body += piece
            time.sleep(0.05)  # the pace of a slow reader, not a synchronisation
        conn.close()
        events = [line.removeprefix("data: ") for line in body.decode().split("\n\n") if line]
        assert events[-1] == "[DONE]" and len(body) > 400_000
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert "".join(c["delta"].get("content") or "" for c in chunks) == expected["choices"][0]["message"]["content"]
        assert chunks[-1]["finish_reason"] == "length"
        assert sum(len(c["logprobs"]["content"]) for c in chunks if c["logprobs"]) == 400


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_cut_by_a_failed_step_counts_the_tokens_it_sent_in_its_usage_chunk(local_chat, monkeypatch, route):
    """A stream whose decode step fails after some tokens ends with the error event, then its usage chunk: that
    counted only the choices that had finished, so tokens already sent were reported as 0 completion tokens."""
    from internvl_mpo.generate.engine import Generation

    decode, calls = Generation._decode_step, []

    def failing_sixth(self):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("simulated device failure")
        return decode(self)

    monkeypatch.setattr(Generation, "_decode_step", failing_sixth)
    body = {"model": "m", "max_tokens": 50, "ignore_eos": True, "n": 2, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body.update({"messages": [{"role": "user", "content": "Hello there"}]} if "chat" in route else {"prompt": "Hi"})
    with app_server(local_chat, max_batch=2, max_len=256) as url:
        with httpx.stream("POST", url + route, json=body, timeout=60) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    errors = [e for e in events if "error" in e]
    assert len(errors) == 1 and "simulated device failure" in errors[0]["error"]["message"]
    sent = {}  # per choice, its tokens so far as its last chunk before the error counted them
    for e in events[:events.index(errors[0])]:
        for choice in e["choices"]:
            sent[choice["index"]] = e["usage"]["completion_tokens"]
    assert sorted(sent) == [0, 1] and min(sent.values()) >= 5
    final = events[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == sum(sent.values())


def test_chat_echo_is_the_final_messages_own_content_as_in_vllm():
    """vLLM's chat `echo` puts the final message's content before the answer: not the turn it joins (two assistant
    messages in a row: the last one's), nor the JSON this server writes an assistant's tool calls as in the prompt."""
    def echo(*messages):
        return parse_chat_request({"messages": [{"role": "user", "content": "Hi"}, *messages], "echo": True},
                                  ServerSettings()).echo

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert echo({"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}) == "B"
    assert echo({"role": "assistant", "content": None, "tool_calls": [call]}) == ""
    assert echo({"role": "assistant", "content": "Let me look", "tool_calls": [call]}) == "Let me look"
    parts = [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]
    assert echo({"role": "assistant", "content": parts}) == "x\ny"
    assert echo({"role": "assistant", "content": "The answer is "}) == "The answer is "
    assert echo() == ""


def test_tokenize_and_detokenize_refuse_unknown_fields_as_chat_requests_do():
    """/tokenize with messages refused a typo (`add_generation_promt`) as the chat endpoint does, but with a prompt
    (`add_special_token: false`, whose BOS then stayed) and /detokenize took any unknown field silently."""
    from internvl_mpo.server.requests import parse_detokenize_request, parse_tokenize_request

    for parse, body in ((lambda b: parse_tokenize_request(b, ServerSettings()), {"prompt": "a"}),
                        (lambda b: parse_tokenize_request(b, ServerSettings()), {"messages": [{"role": "user",
                                                                                                 "content": "a"}]}),
                        (lambda b: parse_detokenize_request(b, 10), {"tokens": [1]})):
        parse({**body, "model": "m", "user": "u"})  # known and ignored fields pass
        with pytest.raises(ApiError, match='unrecognized request argument supplied: "add_special_token"'):
            parse({**body, "add_special_token": False})
