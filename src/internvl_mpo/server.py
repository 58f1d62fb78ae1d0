"""`internvl-mpo serve`: an OpenAI-compatible HTTP server over the generation engine.

Endpoints: `POST /v1/chat/completions` (plain or `stream: true` server-sent events in OpenAI's
`chat.completion.chunk` format, ending with `data: [DONE]`), `POST /v1/completions` (raw text or token
ids in, no chat template, as vLLM serves a chat model; `text_completion` objects and chunks),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, and vLLM's `POST /tokenize` (a prompt, or messages with
their image tokens, as the endpoints above would prefill them) and `POST /detokenize`.

It is a thin layer: requests are parsed and checked against the limits up front (4xx with an
OpenAI-style `{"error": {...}}` body), and their JSON decoded and checked, their images decoded and their prompt
tokenized off the event loop; one worker thread owns the model and a single `Generation` (continuous batching): new
requests join the running batch between decode steps through a thread-safe inbox (a request whose
prefill fails fails alone; a failed decode step fails the rows it ran), and each request's text
flows back to its handler through an asyncio queue. A client that goes away has its rows finished at once.
At most --max-concurrent-requests requests are in progress (read, prepared, waiting in the batch or answered);
one more is refused at once with a 429, before its body is read or its images are decoded. A body must arrive
whole within --request-read-timeout (a 408 past it), and each write of a stream must reach its client within
--send-timeout (the stream is abandoned past it), so that clients that send or read slowly cannot hold every place.
At most --max-connections connections are served: one more gets a 503 at its first bytes.

OpenAI messages map onto the internvl2_5 template as the official `chat()` builds it: an optional
leading system (or developer) message replaces the template's system message, earlier user /
assistant turns become the history pairs and the last user message is the question. Each image part
becomes an `<image>` line in front of its message's text, whatever the parts' order (text parts joined with
"\\n"), so `[text, image]` too gives `chat()`'s `"<image>\\n" + question`; with several images in a request each is
labelled `Image-k: <image>` as in the model card's multi-image example. A video (vLLM's `video_url` part:
one, in the last user message, without images) puts its 8 frames' `FrameK: <image>` lines in front of the
question, as `chat(video=...)` does. A user's text may not hold `<image>` (images come only as parts); an
assistant or system message that mentions it keeps it as text. `usage.prompt_tokens` counts every prompt id,
image context tokens included.

Differences from OpenAI kept on purpose: `top_k`, `repetition_penalty`, `ignore_eos`, `min_tokens`
and `max_num` (tiles per image) are accepted as extra body fields (vLLM accepts the first four too;
`min_tokens` as vLLM reads it: no end-of-turn token before that many tokens, stop strings matched
only in the text after them, and more than `max_tokens` is a 400); sampling has
no top-k unless asked (the model card's HF default of 50 does not apply); a seed is any int64, read
modulo 2**63 (the engine's range), and choice i of a seeded request with `n > 1` samples with seed + i
(modulo 2**63); the text is the raw decoded answer (not stripped as `chat()` strips it), so streamed pieces join to
exactly the non-streamed content; `logprobs` are the model's raw log-probabilities (before
logit_bias, temperature, penalty and filters, as vLLM reports them by default), without the end-of-turn token in a chat
answer (a text completion lists every token it counts, the stopping one included, as vLLM does). `logit_bias`
is added to the logits as vLLM adds it (before the penalty and the rest); a bias outside -100..100 is a 400
where vLLM clamps it, and at most MAX_LOGIT_BIAS_ENTRIES tokens are taken.

Prompt log-probabilities as vLLM gives them: on /v1/completions `echo` with `logprobs` prepends the prompt's
tokens to the answer's in `logprobs` (the first prompt token's log-probability and alternatives are null),
and `max_tokens: 0` (only with `echo`) returns the prompt alone, generating nothing; vLLM's `prompt_logprobs`
extra (not with a stream) adds per prompt token a {token id: {logprob, rank, decoded_token}} map to each
completion choice, or to the chat response. Every choice carries vLLM's `stop_reason`: the stop string or
stop token id that ended it, null for the end-of-turn token or a length cut.

As in vLLM, one model is served under one name (`--served-model-name`, by default `--model` as given,
or `internvl-mpo-demo` for the shipped demo model): /v1/models lists it, responses carry it, and a
request that names another model gets a 404 (one that names none is served).
"""

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import functools
import gc
import hmac
import http.client
import ipaddress
import itertools
import json
import logging
import math
import queue
import re
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .chat.template import IMAGE_PLACEHOLDER, build_prompt_ids, get_template, prompt_length
from .chat.tokenizer import IMG_CONTEXT, Tokenizer
from .checkpoint import default_device
from .errors import ConfigError, InputError, SettingError
from .generate.engine import MAX_TOP_LOGPROBS, Generation, Request
from .generate.sampling import SamplingParams
from .pipeline import InternVLChat, TextAssembler
from .processor.image import AS_A_VIDEO, AS_AN_IMAGE, let_pillow_open, load_image
from .processor.multi import planned_tiles

log = logging.getLogger("internvl_mpo.server")

MAX_STOP_STRINGS = 64  # OpenAI takes 4, vLLM any number; lm-eval sends a task's stop strings and the EOS
MAX_LOGIT_BIAS_ENTRIES = 1024  # tokens in one request's logit_bias (OpenAI documents no count, vLLM has no cap)
DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
SHUTDOWN_GRACE_S = 5  # how long a response may stay open after Ctrl-C once its generation has ended
# fields that would change the answer, refused when set (not silently ignored): OpenAI's, then vLLM's extras;
# each with the values that mean "off" (of their JSON type: `false`, not `0`), which pass; null always passes
UNSUPPORTED_FIELDS = {"tools": ([],), "functions": ([],), "audio": (), "prediction": (),
                      "min_p": (0, 0.0), "use_beam_search": (False,), "include_stop_str_in_output": (False,),
                      "guided_json": (), "guided_regex": (), "guided_choice": (), "guided_grammar": (),
                      "structured_outputs": (), "allowed_token_ids": (), "bad_words": ([],), "logits_processors": (),
                      "truncate_prompt_tokens": (), "return_tokens_as_token_ids": (False,), "chat_template": (),
                      "modalities": (["text"],), "function_call": ("none",), "web_search_options": (), "moderation": (),
                      "length_penalty": (1, 1.0), "structural_tag": (), "documents": ([],), "return_token_ids": (False,),
                      "prompt_embeds": ()}
# fields that do not change the answer, accepted and ignored, but type-checked as OpenAI's and vLLM's schemas do
IGNORED_FIELDS = {"user": (str,), "metadata": (dict,), "store": (bool,), "service_tier": (str,),
                  "parallel_tool_calls": (bool,), "reasoning_effort": (str,), "chat_template_kwargs": (dict,),
                  "mm_processor_kwargs": (dict,), "request_id": (str,), "cache_salt": (str,),
                  "spaces_between_special_tokens": (bool,), "prompt_cache_key": (str,), "prompt_cache_retention": (str,),
                  "prompt_cache_options": (dict,), "safety_identifier": (str,), "verbosity": (str,),
                  "include_reasoning": (bool,), "priority": (int,), "kv_transfer_params": (dict,), "vllm_xargs": (dict,),
                  "guided_decoding_backend": (str,), "guided_whitespace_pattern": (str,)}
# the fields both endpoints read; with the two above and each endpoint's own, the only ones taken: any other is a 400
# naming it, as OpenAI answers one (vLLM ignores it), so that a typo (`max_token`) or another API's name
# (`max_new_tokens`, `stop_sequences`) does not leave the answer silently as if it had not been sent
SHARED_FIELDS = {"model", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "stop_token_ids",
                 "stream", "stream_options", "n", "seed", "min_tokens", "logit_bias", "top_k", "repetition_penalty",
                 "ignore_eos", "skip_special_tokens", "frequency_penalty", "presence_penalty", "response_format",
                 "logprobs", "prompt_logprobs"}
CHAT_FIELDS = {"messages", "top_logprobs", "tool_choice", "add_generation_prompt", "max_num"}
COMPLETION_FIELDS = {"prompt", "suffix", "best_of", "echo", "add_special_tokens"}
IMAGE_DETAILS = ("auto", "low", "high")  # OpenAI's image_url.detail; tiles follow max_num whatever it says
TEXT_ROOM = 512  # tokens of a sequence that image tiles leave to the text and the answer
DEMO_MODEL_NAME = "internvl-mpo-demo"  # the served name of the shipped demo model
COMPLETION_MAX_TOKENS = 16  # /v1/completions' default max_tokens (OpenAI's and vLLM's)
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_REDIRECTS = 5  # redirects followed to fetch a remote image
VIDEO_FRAMES = 8  # frames sampled from a video (the model card's num_segments)


@dataclass(frozen=True)
class ServerSettings:
    """The flags of `internvl-mpo serve` (see `serve` for their meaning)."""

    model: str | None = None
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_len: int = 4096
    device: str | None = None
    dtype: str | None = None
    compile: bool = False
    allow_remote_images: bool = False
    allow_private_image_hosts: bool = False
    allow_local_images: bool = False
    max_request_bytes: int = 32 * 2**20
    max_images: int = 8
    max_tiles: int = 24
    max_image_bytes: int = 16 * 2**20
    max_image_pixels: int = 40_000_000
    image_timeout: float = 10.0
    max_prompt_tokens: int | None = None
    max_tokens: int = 2048
    max_n: int = 4
    max_concurrent_requests: int = 64
    request_read_timeout: float = 300.0
    send_timeout: float = 60.0
    header_timeout: float = 60.0
    max_connections: int = 256


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style error body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request parsing --------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """A parsed /v1/chat/completions body; images are still URLs."""

    question: str
    history: list[tuple[str, str]]
    system_message: str | None
    image_urls: list[tuple[str, str]]  # (param path, url), in prompt order
    params: SamplingParams  # max_new_tokens is a placeholder until the prompt length is known
    max_tokens: int | None
    n: int
    stream: bool
    include_usage: bool
    max_num: int | None
    logprobs: int | None = None  # top_logprobs when logprobs were asked for, else None
    max_tokens_key: str = "max_tokens"  # the field max_tokens came from, named in errors
    prompt_logprobs: int | None = None  # vLLM's: top alternatives per prompt token, or None
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    video_url: tuple[str, str] | None = None  # (param path, url) of a video in the last user message


@dataclass
class CompletionRequest:
    """A parsed /v1/completions body: raw prompts (text or token ids), no chat template."""

    prompts: list[str | list[int]]
    params: SamplingParams  # max_new_tokens is a placeholder until the prompt length is known
    max_tokens: int
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None  # the legacy integer: top alternatives per token, or None
    echo: bool
    max_tokens_key: str = "max_tokens"
    prompt_logprobs: int | None = None  # vLLM's: top alternatives per prompt token, or None
    continuous_usage: bool = False  # vLLM's stream_options.continuous_usage_stats: usage on every chunk
    add_special_tokens: bool = True  # vLLM's: a text prompt gets the tokenizer's BOS, where it has one

    @property
    def shown_prompt_logprobs(self) -> int | None:
        """The alternatives per prompt token in vLLM's `prompt_logprobs` (as vLLM: echo with logprobs asks too)."""
        return self.prompt_logprobs if self.prompt_logprobs is not None or not self.echo else self.logprobs


def json_body(body: bytes | bytearray):
    """The JSON value of a request body; a 400 naming what is wrong with it."""
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError:  # Python's limit on the digits of an int read from text (a 500 before)
        raise ApiError(400, f"the request body holds an integer of more than {sys.get_int_max_str_digits()} "
                            "digits") from None


def json_response(value):
    """The JSONResponse of `value` (dicts, lists, strings, numbers, None: the bytes and headers FastAPI makes of
    such a value returned by a route), encoded where it is called: on a worker thread (`answer` in create_app)."""
    from fastapi.responses import JSONResponse

    return JSONResponse(value)


def _field(body: dict, key: str, kinds: tuple[type, ...], default=None, low=None, high=None):
    """body[key] checked for type (bool is never a number) and range, or `default` when absent/null."""
    value = body.get(key)
    if value is None:
        return default
    is_bool_field = bool in kinds
    if isinstance(value, bool) != is_bool_field or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"{key} must be {names}, got {json.dumps(value)[:80]}", key)
    if value != value:  # NaN, which the range checks below would let through
        raise ApiError(400, f"{key} must be a finite number, got NaN", key)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise ApiError(400, f"{key} must be {bounds}, got {value}", key)
    return value


def _unicode(text: str, param: str) -> str:
    """`text`, refused when it holds a lone surrogate (a JSON \\ud800-\\udfff escape outside a pair)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{param}: character {e.start} is a lone surrogate {text[e.start]!r}, which is not "
                            "valid Unicode", param) from None
    return text


def _plain_text(text: str, param: str, role: str) -> str:
    """A text part; `<image>` places an image in a user message, so it is refused there (an answer or a
    system message that mentions it keeps it as text)."""
    _unicode(text, param)
    if role == "user" and IMAGE_PLACEHOLDER in text:
        raise ApiError(400, f"{param}: the text holds {IMAGE_PLACEHOLDER!r}; send images as image_url parts", param)
    return text


def _content_text(content, param: str, role: str, images: list[tuple[str, str]],
                  videos: list[tuple[str, str]] | None = None) -> str:
    """The text of one message, an `<image>` line for each image part in front of its text parts, whatever the
    parts' order, as the model card puts images and vLLM a message's placeholders (their URLs appended to
    `images`); text parts are joined by newlines. A video part (vLLM's `video_url`) adds its URL to `videos`
    and nothing to the text: its frames' lines go in front of the question (`_video_prompt`)."""
    if isinstance(content, str):
        return _plain_text(content, param, role)
    if not isinstance(content, list):
        raise ApiError(400, f"{param} must be a string or a list of content parts", param)
    placeholders, pieces = [], []
    for k, part in enumerate(content):
        where = f"{param}[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(_plain_text(part["text"], where, role))
        elif kind == "video_url" and videos is not None:
            video = part.get("video_url")
            url = video.get("url") if isinstance(video, dict) else None
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{where}: video_url needs a url string ({{'url': ...}})", where)
            videos.append((f"{where}.video_url", _unicode(url, f"{where}.video_url")))
        elif kind == "image_url":
            if role != "user":
                raise ApiError(400, f"{where}: images are only accepted in user messages", where)
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"{where}: image_url needs a url string", where)
            if isinstance(image, dict) and image.get("detail") not in (None, *IMAGE_DETAILS):
                raise ApiError(400, f"{where}.image_url.detail must be one of {', '.join(IMAGE_DETAILS)}, got "
                                    f"{json.dumps(image['detail'])[:80]}", f"{where}.image_url.detail")
            images.append((f"{where}.image_url", _unicode(url, f"{where}.image_url")))
            placeholders.append(IMAGE_PLACEHOLDER)
        else:
            video = " or {'type': 'video_url', 'video_url': {'url': ...}}" if role == "user" else ""
            raise ApiError(400, f"{where}: content parts must be {{'type': 'text', 'text': ...}} or "
                                f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}{video}", where)
    return "\n".join(placeholders + ["\n".join(pieces)])


def _conversation(messages) -> tuple[str | None, list[tuple[str, str]], list[tuple[str, str]], tuple[str, str] | None]:
    """(system message, [(role, text)] alternating user/assistant and ending with user, image urls, the video url
    or None)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    system, turns, images, videos, video_turn = None, [], [], [], None
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            if i != 0:
                raise ApiError(400, f"{param}: a system message may only come first", param)
            system = _content_text(message.get("content"), f"{param}.content", role, [])
            continue
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{param}: role must be system, user or assistant, got {json.dumps(role)[:80]}", param)
        count = len(videos)
        text = _content_text(message.get("content"), f"{param}.content", role, images,
                             videos if role == "user" else None)
        if turns and turns[-1][0] == role:  # consecutive messages of one role read as one turn
            turns[-1][1].append(text)  # joined once below: adding each to the turn so far is quadratic
        else:
            turns.append((role, [text]))
        if len(videos) > count:
            video_turn = len(turns) - 1
    turns = [(role, "\n".join(texts)) for role, texts in turns]
    if not turns or turns[0][0] != "user" or turns[-1][0] != "user":
        raise ApiError(400, "the conversation must start and end with a user message (after an optional "
                            "system message)", "messages")
    if videos and (len(videos) > 1 or images or video_turn != len(turns) - 1):
        raise ApiError(400, "a request may hold one video, in its last user message, and no images beside it (its "
                            "frames go in front of the question, as the model card asks about a video)", videos[-1][0])
    if not turns[-1][1].strip() and not videos:
        raise ApiError(400, "the last user message is empty", "messages")
    return system, turns, images, videos[0] if videos else None


def _label_images(turns: list[tuple[str, str]], count: int) -> list[tuple[str, str]]:
    """With several images, write each placeholder as `Image-k: <image>` (k counts over the request)."""
    if count < 2:
        return turns
    k = 0
    out = []
    for role, text in turns:
        if role != "user":
            out.append((role, text))
            continue
        pieces = text.split(IMAGE_PLACEHOLDER)
        labelled = [pieces[0]]
        for piece in pieces[1:]:
            k += 1
            labelled += [f"Image-{k}: {IMAGE_PLACEHOLDER}", piece]
        out.append((role, "".join(labelled)))
    return out


def check_model(body, served: str) -> None:
    """As vLLM, before the rest of the body: a request that names another model gets a 404 (one that
    names none, or "", is served)."""
    model = _field(body, "model", (str,), "") if isinstance(body, dict) else ""
    if model not in ("", served):
        shown = _unicode(model, "model")[:200]  # a name of a megabyte is not sent back whole
        raise ApiError(404, f"The model `{shown}` does not exist; this server serves `{served}`", "model",
                       "model_not_found")


def _refuse_off(body: dict, key: str) -> None:
    """A vLLM field that is on by default and would change the answer when turned off: a 400 when false."""
    if not _field(body, key, (bool,), True):
        raise ApiError(400, f"{key}: false is not supported by this server", key)


def _sampling(body: dict, settings: ServerSettings, refused: dict[str, tuple], fields: set[str],
              lowest_max_tokens: int = 1) -> dict:
    """The fields that chat and text completions share (sampling, limits, n, streaming), checked; raises
    ApiError. Fields in `refused` are a 400 when set to anything but null or one of their off values, and so is
    any field not among them, the shared ones, the ignored ones and the endpoint's own `fields`."""
    known = SHARED_FIELDS | IGNORED_FIELDS.keys() | refused.keys() | fields
    if unknown := [key for key in body if key not in known]:
        shown = ", ".join(json.dumps(key)[:80] for key in unknown[:5])
        raise ApiError(400, f"unrecognized request argument supplied: {shown} (this server does not know "
                            f"{'them' if len(unknown) > 1 else 'it'}, so it would have no effect)", unknown[0][:80])
    for key, off in refused.items():
        value = body.get(key)
        if value is not None and not any(type(value) is type(v) and value == v for v in off):
            raise ApiError(400, f"{key} is not supported by this server", key)
    for key, kinds in IGNORED_FIELDS.items():
        _field(body, key, kinds)
    _refuse_off(body, "skip_special_tokens")  # the text would show the special tokens
    for key in ("frequency_penalty", "presence_penalty"):
        if _field(body, key, (int, float), 0):
            raise ApiError(400, f"{key} is not supported (use repetition_penalty)", key)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise ApiError(400, "only response_format {'type': 'text'} is supported", "response_format")
    temperature = _field(body, "temperature", (int, float), 1.0, 0, 2)
    top_p = _field(body, "top_p", (int, float), 1.0, 0, 1)
    if top_p == 0:
        raise ApiError(400, "top_p must be greater than 0", "top_p")
    # max_completion_tokens is OpenAI's current name and wins over the older max_tokens (as in vLLM)
    limit_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, "max_tokens", (int,), None, lowest_max_tokens)
    max_tokens = _field(body, "max_completion_tokens", (int,), max_tokens, lowest_max_tokens)
    if max_tokens is not None and max_tokens > settings.max_tokens:
        raise ApiError(400, f"{limit_key} is {max_tokens}; this server allows at most {settings.max_tokens}",
                       limit_key)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
                       "stop")
    for text in stop:  # one that is not valid Unicode could never match
        _unicode(text, "stop")
    stop_ids = body.get("stop_token_ids")  # vLLM's; the token that stops is counted, not shown
    stop_ids = [] if stop_ids is None else stop_ids
    if not isinstance(stop_ids, list) or not all(type(i) is int and 0 <= i < 2**31 for i in stop_ids):
        raise ApiError(400, f"stop_token_ids must be a list of token ids, got {json.dumps(stop_ids)[:80]}",
                       "stop_token_ids")
    stream_options = body.get("stream_options")
    stream_options = {} if stream_options is None else stream_options
    if not isinstance(stream_options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    usage_keys = ("include_usage", "continuous_usage_stats")
    # a typo (include_usages) left the stream without its usage chunk; include_obfuscation (OpenAI's) changes nothing
    if unknown := [key for key in stream_options if key not in (*usage_keys, "include_obfuscation")]:
        key = f"stream_options.{unknown[0][:80]}"
        raise ApiError(400, f"{key} is not a stream option this server knows (include_usage, continuous_usage_stats)",
                       key)
    include_usage, continuous_usage = (  # checked as fields of their own, named stream_options.<key>
        _field({f"stream_options.{k}": stream_options.get(k) for k in usage_keys}, f"stream_options.{k}", (bool,), False)
        for k in usage_keys)
    if stream_options and not body.get("stream"):  # as vLLM and OpenAI
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    n = _field(body, "n", (int,), 1, 1, settings.max_n)
    seed = _field(body, "seed", (int,), None, -(2**63), 2**63 - 1)  # OpenAI's int64; read modulo 2**63
    min_tokens = _field(body, "min_tokens", (int,), 0, 0)  # vLLM's; checked against the answer's room later
    logit_bias = _logit_bias(body.get("logit_bias"))
    try:
        params = SamplingParams(
            max_new_tokens=max(1, min_tokens), min_new_tokens=min_tokens,  # max_new_tokens: a placeholder
            do_sample=temperature > 0, temperature=float(temperature), top_p=float(top_p),
            top_k=max(0, _field(body, "top_k", (int,), 0, -1)), stop=tuple(stop),  # -1 is vLLM's "off" too
            stop_token_ids=tuple(stop_ids),
            repetition_penalty=float(_field(body, "repetition_penalty", (int, float), 1.0, 0.01, 10)),
            seed=None if seed is None else seed % 2**63, ignore_eos=_field(body, "ignore_eos", (bool,), False),
            logit_bias=logit_bias,
        )
    except InputError as e:
        raise ApiError(400, str(e)) from None
    return {"params": params, "max_tokens": max_tokens, "max_tokens_key": limit_key, "n": n,
            "stream": _field(body, "stream", (bool,), False), "include_usage": include_usage,
            # as vLLM, continuous_usage_stats counts only beside include_usage
            "continuous_usage": include_usage and continuous_usage}


def _logit_bias(value) -> dict[int, float]:
    """OpenAI's `logit_bias`, {"token id": bias}, as {id: bias}; ids are checked against the vocabulary by
    `check_token_ids`. A bias outside -100..100 is a 400 where vLLM clamps it silently."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "logit_bias must be an object mapping token ids (as strings) to biases from -100 to 100, "
                            f"got {json.dumps(value)[:80]}", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise ApiError(400, f"logit_bias has {len(value)} entries; this server accepts at most "
                            f"{MAX_LOGIT_BIAS_ENTRIES}", "logit_bias")
    bias = {}
    for key, number in value.items():
        if not re.fullmatch(r"-?[0-9]{1,20}", key):  # JSON keys are strings; vLLM reads them with int()
            raise ApiError(400, f"logit_bias keys must be token ids written as decimal integers, got "
                                f"{json.dumps(key)[:80]}", "logit_bias")
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not -100 <= number <= 100:
            raise ApiError(400, f"logit_bias[{json.dumps(key)}] must be a number from -100 to 100, got "
                                f"{json.dumps(number)[:80]}", "logit_bias")
        bias[int(key)] = float(number)
    return bias


def _prompt_logprobs(body: dict) -> int | None:
    """vLLM's `prompt_logprobs` (alternatives per prompt token), refused with a stream as vLLM refuses it."""
    value = _field(body, "prompt_logprobs", (int,), None, 0, MAX_TOP_LOGPROBS)
    if value and body.get("stream"):
        raise ApiError(400, "prompt_logprobs are not available with stream: true", "prompt_logprobs")
    return value


def parse_chat_request(body, settings: ServerSettings) -> ChatRequest:
    """Check a /v1/chat/completions body and map it onto the chat template; raises ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    # vLLM's chat fields: echo (its chat meaning), continue_final_message, a BOS besides the template's
    refused = {**UNSUPPORTED_FIELDS, "echo": (False,), "best_of": (1,), "continue_final_message": (False,),
               "add_special_tokens": (False,)}
    sampling = _sampling(body, settings, refused, CHAT_FIELDS)
    _refuse_off(body, "add_generation_prompt")  # the answer would go on with the user's turn
    logprobs = _field(body, "logprobs", (bool,), False)
    top_logprobs = _field(body, "top_logprobs", (int,), None, 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    tool_choice = body.get("tool_choice")  # vLLM's rule, given that tools can only be [] here
    if tool_choice not in (None, "none") and not (tool_choice in ("auto", "required") and body.get("tools") == []):
        raise ApiError(400, f"tool_choice {json.dumps(tool_choice)[:80]} needs tools, and this server does not "
                            "support tools", "tool_choice")
    system, turns, images, video = _conversation(body.get("messages"))
    if len(images) > settings.max_images:
        raise ApiError(400, f"the request has {len(images)} images; this server accepts at most "
                            f"{settings.max_images}", "messages", "too_many_images")
    turns = _label_images(turns, len(images))
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return ChatRequest(
        question=turns[-1][1], history=history, system_message=system, image_urls=images, video_url=video,
        max_num=_field(body, "max_num", (int,), None, 1, settings.max_tiles),
        logprobs=(top_logprobs or 0) if logprobs else None, prompt_logprobs=_prompt_logprobs(body), **sampling,
    )


def _prompt_list(prompt) -> list[str | list[int]]:
    """The prompts of a /v1/completions body: a string, a list of strings, a list of token ids, or a list
    of such lists (as OpenAI and vLLM accept them)."""
    def token_ids(value) -> bool:
        return isinstance(value, list) and bool(value) and all(type(i) is int for i in value)  # not bool

    if isinstance(prompt, str) or token_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                  or all(token_ids(p) for p in prompt)):  # not mixed, as vLLM
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of token "
                            "id lists (not strings and token lists mixed), none of them empty", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"the request has {len(prompts)} prompts; this server accepts at most {MAX_PROMPTS}",
                       "prompt")
    for i, text in enumerate(prompts):
        if text == "":
            raise ApiError(400, f"prompt[{i}] is empty", "prompt")
        if isinstance(text, str):
            _unicode(text, f"prompt[{i}]")
    return prompts


def parse_completion_request(body, settings: ServerSettings) -> CompletionRequest:
    """Check a /v1/completions body (raw text in, no chat template, as vLLM serves it); raises ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    echo = _field(body, "echo", (bool,), False)
    # as vLLM, max_tokens 0 echoes the prompt (with its log-probabilities) and generates nothing
    sampling = _sampling(body, settings, {**UNSUPPORTED_FIELDS, "suffix": ()}, COMPLETION_FIELDS,
                         lowest_max_tokens=0 if echo else 1)
    if sampling["max_tokens"] is None:  # OpenAI's and vLLM's default for text completions
        sampling["max_tokens"] = min(COMPLETION_MAX_TOKENS, settings.max_tokens)
    if _field(body, "best_of", (int,), 1) != 1:
        raise ApiError(400, "best_of other than 1 is not supported (ask for n choices instead)", "best_of")
    logprobs = _field(body, "logprobs", (int,), None, 0, MAX_TOP_LOGPROBS)
    return CompletionRequest(prompts=_prompt_list(body.get("prompt")), logprobs=logprobs, echo=echo,
                             prompt_logprobs=_prompt_logprobs(body),
                             add_special_tokens=_field(body, "add_special_tokens", (bool,), True), **sampling)


@dataclass
class TokenizeRequest:
    """A parsed /tokenize body (vLLM's): raw text as /v1/completions takes it, or a chat as
    /v1/chat/completions takes it (`chat`, its images still URLs)."""

    prompt: str | None
    chat: ChatRequest | None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # for a prompt: its BOS, as /v1/completions adds it


def parse_tokenize_request(body, settings: ServerSettings) -> TokenizeRequest:
    """Check a /tokenize body: vLLM's `prompt` (with `add_special_tokens`) or `messages` (with
    `add_generation_prompt`, `add_special_tokens`); raises ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise ApiError(400, "send either prompt (text, tokenized as /v1/completions tokenizes it) or messages (a "
                            "chat, as /v1/chat/completions takes it)", "prompt")
    for key in ("return_token_strs", "continue_final_message"):  # vLLM's; the chat must end with a user message
        if _field(body, key, (bool,), False):
            raise ApiError(400, f"{key} is not supported by this server", key)
    # vLLM's add_special_tokens (the BOS of a tokenizer that has one); a chat's ids are the template's, BOS included
    add_special_tokens = _field(body, "add_special_tokens", (bool,), True)
    if body.get("prompt") is not None:
        return TokenizeRequest(_unicode(_field(body, "prompt", (str,)), "prompt"), None,
                               add_special_tokens=add_special_tokens)
    own = ("prompt", "add_special_tokens", "return_token_strs", "continue_final_message", "add_generation_prompt")
    return TokenizeRequest(None, parse_chat_request({k: v for k, v in body.items() if k not in own}, settings),
                           _field(body, "add_generation_prompt", (bool,), True))


def parse_detokenize_request(body, vocab: int) -> list[int]:
    """The token ids of a /detokenize body (vLLM's `tokens`), each in 0..vocab - 1; raises ApiError."""
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
        raise ApiError(400, f"tokens must be a list of token ids, got {json.dumps(tokens)[:80]}", "tokens")
    if bad := [t for t in tokens if not 0 <= t < vocab]:
        raise ApiError(400, f"tokens must be in 0..{vocab - 1}, got {bad[:5]}", "tokens")
    return tokens


# ---- images and the prompt --------------------------------------------------------------------


class _Redirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, limited to MAX_REDIRECTS and to http(s): urllib alone follows 10, and to ftp://
    as well (a way past the data:-only default onto another protocol)."""

    def __init__(self, param: str):
        self.param, self.count = param, 0

    def http_error_302(self, req, fp, code, msg, headers):
        target = urllib.parse.urljoin(req.full_url, headers.get("location") or headers.get("uri") or "")
        self.count += 1
        if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
            fail = f"redirected to {target[:200]}; only http(s) redirects are followed"
        elif self.count > MAX_REDIRECTS:
            fail = f"more than {MAX_REDIRECTS} redirects"
        else:
            return super().http_error_302(req, fp, code, msg, headers)
        fp.close()
        raise ApiError(400, f"{self.param}: could not fetch {req.full_url[:200]}: {fail}", self.param,
                       "image_fetch_failed")

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class HostRefused(ValueError):
    """A remote image's host is at an address that is not public."""


# RFC 6052's well-known NAT64 prefix: the last 32 bits are an IPv4 address, which a NAT64 gateway
# connects to (an IPv6-only host with DNS64 reaches every IPv4-only site this way).
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refusal(ip: str) -> str | None:
    """Why an image may not be fetched from `ip` unless --allow-private-image-hosts ("loopback", ...), or None
    for a public address. An IPv4 address inside IPv6 (::ffff:a.b.c.d, 6to4, NAT64's 64:ff9b::a.b.c.d) is
    judged as that IPv4 address."""
    address = ipaddress.ip_address(ip)
    if address.version == 6:
        if address in NAT64:
            address = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        else:
            address = address.ipv4_mapped or address.sixtofour or address
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private", "site_local"):
        if getattr(address, "is_" + kind, False):
            return kind.replace("_", "-")
    return None if address.is_global else "non-public"  # 100.64.0.0/10 (carrier-grade NAT), say


def public_addresses(host: str, port: int, resolve=socket.getaddrinfo) -> list[tuple[str, int]]:
    """The (ip, port) addresses of `host`, looked up once with `resolve` (getaddrinfo's signature); HostRefused
    when any of them is not public."""
    addresses = [sockaddr[:2] for *_, sockaddr in resolve(host, port, type=socket.SOCK_STREAM)]
    for ip, _ in addresses:
        if reason := refusal(ip):
            raise HostRefused(f"host {host!r} is at {ip}, a {reason} address")
    return addresses


class _PublicHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to public addresses only. It connects to an address that `public_addresses` checked,
    not to the host name (a second lookup that DNS could answer differently: rebinding); the Host header, and
    in the HTTPS subclass the TLS server name, stay the URL's host."""

    resolve = staticmethod(socket.getaddrinfo)

    def connect(self):
        *others, last = public_addresses(self.host, self.port, self.resolve)
        for address in others:  # each address in turn, as socket.create_connection tries them
            with contextlib.suppress(OSError):
                self.sock = socket.create_connection(address, self.timeout, self.source_address)
                return
        self.sock = socket.create_connection(last, self.timeout, self.source_address)


class _PublicHTTPSConnection(http.client.HTTPSConnection, _PublicHTTPConnection):
    """HTTPS over `_PublicHTTPConnection`'s connect (HTTPSConnection.connect wraps what it connected)."""


class _PublicHosts(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's http and https handler over the connections above, which look hosts up with `resolve`."""

    def __init__(self, resolve):
        super().__init__()
        self.resolve = resolve

    def _connection(self, cls, host, **kwargs):
        connection = cls(host, **kwargs)
        connection.resolve = self.resolve
        return connection

    def http_open(self, req):
        return self.do_open(functools.partial(self._connection, _PublicHTTPConnection), req)

    def https_open(self, req):
        return self.do_open(functools.partial(self._connection, _PublicHTTPSConnection), req)


def _fetch_remote(url: str, param: str, settings: ServerSettings, resolve=socket.getaddrinfo) -> bytes:
    """The image at `url` within `image_timeout` seconds in all (urllib's timeout bounds each read alone, so a
    server that sends a byte now and then would hold the request and a thread for as long as it likes).
    Unless --allow-private-image-hosts, every connection (each redirect hop's too) goes to a public address
    of its host, looked up with `resolve`, and proxies from the environment are not used (a proxy would
    connect where this server cannot check)."""
    deadline = time.monotonic() + settings.image_timeout
    data = bytearray()
    if settings.allow_private_image_hosts:
        opener = urllib.request.build_opener(_Redirects(param))
    else:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _PublicHosts(resolve), _Redirects(param))
    try:
        with opener.open(url, timeout=settings.image_timeout) as response:
            while len(data) <= settings.max_image_bytes and (piece := response.read1(2**16)):
                data += piece
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not received within {settings.image_timeout} s")
    except HostRefused as e:
        raise ApiError(400, f"{param}: refused to fetch {url[:200]}: {e}; start the server with "
                            "--allow-private-image-hosts to fetch from this machine or its network", param,
                       "remote_image_refused") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # InvalidURL is an HTTPException
        raise ApiError(400, f"{param}: could not fetch {url[:200]}: {e}", param, "image_fetch_failed") from None
    return bytes(data)


def _read_local(url: str, param: str, settings: ServerSettings) -> bytes:
    """The file named by a path or a file URL (percent-decoded; its host empty or localhost)."""
    path = Path(url)
    if url.startswith("file:"):
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ApiError(400, f"{param}: a file URL must name this machine (file:///path or file://localhost/path), "
                                f"got host {parts.netloc[:100]!r}", param, "invalid_image")
        path = Path(urllib.parse.unquote(parts.path))
    shown = str(path)[:200]
    try:
        if not path.is_file():
            raise ApiError(400, f"{param}: {shown} is not a file", param, "invalid_image")
        size = path.stat().st_size
        if size > settings.max_image_bytes:
            raise _too_large(param, f"{shown} is {size} bytes", settings)
        return path.read_bytes()
    except OSError as e:  # a name too long, no permission, ...
        raise ApiError(400, f"{param}: could not read {shown}: {e.strerror or e}", param, "invalid_image") from None


def image_bytes(url: str, param: str, settings: ServerSettings) -> bytes:
    """The bytes behind an image URL: a base64 `data:` URL, or (only when allowed) http(s) or a local file. A
    scheme is read whatever its case (RFC 3986; vLLM reads it so), and so is a data URL's ";base64"."""
    start = url[:8].lower()
    if start.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ApiError(400, f"{param}: a data URL must be base64 encoded (data:image/png;base64,...)", param,
                           "invalid_image")
        data = "".join(data.split())
        if len(data) // 4 * 3 > settings.max_image_bytes + 2:
            raise _too_large(param, "the image is larger", settings)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ApiError(400, f"{param}: the data URL is not valid base64 ({e})", param, "invalid_image") from None
    elif start.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise ApiError(400, f"{param}: remote image URLs are refused; send the image as a data: URL "
                                "(or start the server with --allow-remote-images)", param, "remote_image_refused")
        raw = _fetch_remote(url, param, settings)
    elif (scheme := urllib.parse.urlsplit(url).scheme) not in ("", "file"):
        raise ApiError(400, f"{param}: unsupported URL scheme {scheme[:20]!r}; images come as data: URLs, http(s) "
                            "URLs or (when allowed) file URLs and paths", param, "invalid_image")
    else:
        if not settings.allow_local_images:
            raise ApiError(400, f"{param}: local image files are refused; send the image as a data: URL "
                                "(or start the server with --allow-local-images)", param, "local_image_refused")
        raw = _read_local(url, param, settings)
    if len(raw) > settings.max_image_bytes:
        raise _too_large(param, "the image is larger", settings)  # a fetch stops reading past the limit
    return raw


def _too_large(param: str, what: str, settings: ServerSettings) -> ApiError:
    """The 413 for an image of more bytes than the server takes, naming the flag that sets the limit."""
    return ApiError(413, f"{param}: {what}; images may be at most {settings.max_image_bytes} bytes (the server's "
                         "--max-image-bytes)", param, "image_too_large")


@dataclass
class Prompt:
    ids: list[int]
    pixel_values: torch.Tensor | None
    max_new_tokens: int


def build_prompt(chat: InternVLChat, req: ChatRequest, settings: ServerSettings, max_len: int) -> Prompt:
    """Fetch and tile the images, tokenize the conversation and check the token limits (blocking); the limits
    are checked before a tile is made too, on the length the images' headers give."""
    def room(length: int) -> int:
        return _answer_room(length, req, settings, max_len, "messages", "the prompt", " (images included)")

    ids, pixels = chat_prompt_ids(chat, req, settings, max_len, room)
    return Prompt(ids, pixels, room(len(ids)))


@contextlib.contextmanager
def _invalid_image(param: str):
    """An image the processor refuses, as the 400 naming its part (the pixel limit as the server's flag)."""
    try:
        yield
    except InputError as e:
        if isinstance(e, SettingError):
            e = e.named({"max_pixels": "--max-image-pixels of internvl-mpo serve"})
        why = str(e).replace(AS_A_VIDEO, "send it as a video_url part")
        raise ApiError(400, f"{param}: {why}", param, "invalid_image") from None


def chat_prompt_ids(chat: InternVLChat, req: ChatRequest, settings: ServerSettings, max_len: int,
                    fits: Callable[[int], object] | None = None) -> tuple[list[int], torch.Tensor | None]:
    """The prompt's ids and its images' tiles (None without images), each image tiled to fit (blocking).
    `fits` gets the prompt's length, planned from the images' headers, before any tile is made (each
    ~2.4 MB at 448 pixels), and raises where it is too long."""
    if req.video_url is not None:
        ids, pixels = _video_prompt(chat, req, settings)
        if fits is not None:
            fits(len(ids))
        return ids, pixels
    config = chat.config
    per_image = req.max_num or config.tiles_per_image
    if req.image_urls:
        n = len(req.image_urls)
        per_image = min(per_image, max(1, settings.max_tiles // n))
        # and the tiles (thumbnails included) of every image must fit in the sequence beside TEXT_ROOM
        fit = (max_len - TEXT_ROOM) // chat.model.num_image_token // n
        per_image = min(per_image, max(1, fit - 1 if config.use_thumbnail and fit >= 2 else fit))
    budget = dict(max_num=per_image, min_num=min(config.min_dynamic_patch, per_image), image_size=config.image_size,
                  use_thumbnail=config.use_thumbnail, max_pixels=settings.max_image_pixels)
    images, planned = [], []
    for param, url in req.image_urls:
        images.append((param, image_bytes(url, param, settings)))
        if fits is not None:  # /tokenize checks no limit: it needs no plan
            with _invalid_image(param):
                planned += planned_tiles([images[-1][1]], **budget)
    prompt = dict(question=req.question, history=req.history, system_message=req.system_message,
                  num_image_token=chat.model.num_image_token, template=config.template)
    if fits is not None and images:
        try:
            length = prompt_length(chat.tokenizer, num_patches_list=planned, **prompt)
        except InputError as e:
            raise ApiError(400, str(e), "messages") from None
        fits(length)
    tiles = []
    for param, raw in images:
        with _invalid_image(param):
            tiles.append(load_image(raw, **budget))
    try:
        ids = build_prompt_ids(chat.tokenizer, num_patches_list=[t.shape[0] for t in tiles], **prompt)
    except InputError as e:
        raise ApiError(400, str(e), "messages") from None
    return ids, torch.cat(tiles) if tiles else None


def _video_prompt(chat: InternVLChat, req: ChatRequest, settings: ServerSettings) -> tuple[list[int], torch.Tensor]:
    """The prompt of a request with a video, as `InternVLChat.prepare` builds it: VIDEO_FRAMES frames, `max_num`
    tiles each (1 by default, as the model card; within --max-tiles in all), their `Frame1: <image>` lines in front
    of the question. The video's bytes come as an image's do (a data: URL, or a file or http(s) URL when allowed,
    within --max-image-bytes); PyAV reads them from a temporary file."""
    param, url = req.video_url
    raw = image_bytes(url, param, settings)
    per_frame = min(req.max_num or 1, max(1, settings.max_tiles // VIDEO_FRAMES))
    with tempfile.NamedTemporaryFile(suffix=".video") as file:
        file.write(raw)
        file.flush()
        try:
            prepared = chat.prepare(req.question, video=file.name, history=req.history, max_num=per_frame,
                                    num_segments=VIDEO_FRAMES, system_message=req.system_message,
                                    max_pixels=settings.max_image_pixels)
        except InputError as e:
            why = str(e).replace(file.name, "the video").replace(AS_AN_IMAGE, "send it as an image_url part")
            raise ApiError(400, f"{param}: {why}", param, "invalid_video") from None
    return prepared.prompt_ids, prepared.pixel_values


def tokenize_ids(chat: InternVLChat, req: TokenizeRequest, settings: ServerSettings, max_len: int) -> list[int]:
    """/tokenize's ids: a text as /v1/completions tokenizes it, or the ids a chat request would prefill,
    image tokens included (without the trailing assistant header when add_generation_prompt is false)."""
    if req.chat is None:
        return text_prompt_ids(chat.tokenizer, req.prompt, req.add_special_tokens)
    ids, _ = chat_prompt_ids(chat, req.chat, settings, max_len)
    if not req.add_generation_prompt:
        header = chat.tokenizer.encode(get_template(chat.config.template).roles[1])
        ids = ids[: len(ids) - len(header)]
    return ids


def check_token_ids(params: SamplingParams, vocab: int) -> None:
    """Token ids the model does not have: a stop id would never stop anything, a logit_bias key has no logit
    (vLLM refuses it too); a 400 naming them."""
    if bad := [i for i in params.stop_token_ids if i >= vocab]:
        raise ApiError(400, f"stop_token_ids must be in 0..{vocab - 1}, got {bad[:5]}", "stop_token_ids")
    if bad := [i for i, _ in params.logit_bias if not 0 <= i < vocab]:
        raise ApiError(400, f"logit_bias keys must be token ids in 0..{vocab - 1}, got {bad[:5]}", "logit_bias")


def _answer_room(length: int, req: ChatRequest | CompletionRequest, settings: ServerSettings, max_len: int,
                 param: str, name: str, what: str = "") -> int:
    """The max_new_tokens of a prompt of `length` tokens (`name` in errors), after checking the token limits."""
    limit = min(settings.max_prompt_tokens or max_len - 1, max_len - 1)
    if length > limit:
        raise ApiError(400, f"{name} is {length} tokens{what}; this server accepts at most {limit}",
                       param, "context_length_exceeded")
    room = max_len - length
    if req.max_tokens is not None and req.max_tokens > room:
        raise ApiError(400, f"{name} is {length} tokens and {req.max_tokens_key} is {req.max_tokens}, more "
                            f"than the {max_len} tokens a sequence may hold here", req.max_tokens_key,
                       "context_length_exceeded")
    max_new_tokens = req.max_tokens if req.max_tokens is not None else min(settings.max_tokens, room)
    if req.params.min_new_tokens > max_new_tokens:  # as vLLM: min_tokens may not exceed max_tokens
        raise ApiError(400, f"min_tokens is {req.params.min_new_tokens}, more than the {max_new_tokens} tokens this "
                            f"answer may have ({req.max_tokens_key} or what the sequence leaves)", "min_tokens")
    return max(1, max_new_tokens)  # max_tokens 0 (an echo): the engine picks one token, which is not shown


def text_prompt_ids(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """A raw text prompt's ids as vLLM's tokenizer call gives them: with `add_special_tokens`, the BOS of a
    tokenizer that prepends one (InternLM2's `<s>`; the Qwen2 tokenizer adds nothing)."""
    ids = tokenizer.encode(text)
    return [tokenizer.bos_id, *ids] if add_special_tokens and tokenizer.add_bos_token else ids


def build_completion_prompts(chat: InternVLChat, req: CompletionRequest, settings: ServerSettings,
                             max_len: int) -> list[Prompt]:
    """Tokenize the raw prompts (no chat template; token ids are taken as they are) and check them."""
    tokenizer = chat.tokenizer
    vocab = chat.config.llm.vocab_size
    prompts = []
    for i, prompt in enumerate(req.prompts):
        param = f"prompt[{i}]"
        ids = text_prompt_ids(tokenizer, prompt, req.add_special_tokens) if isinstance(prompt, str) else prompt
        if bad := [t for t in ids if not 0 <= t < vocab]:
            raise ApiError(400, f"{param}: token ids must be in 0..{vocab - 1}, got {bad[:5]}", "prompt")
        if tokenizer.img_context_id in ids:  # the model would look for image features there
            raise ApiError(400, f"{param} holds the image-context token {IMG_CONTEXT}, which is reserved for image "
                                "features (this endpoint takes no images)", "prompt")
        prompts.append(Prompt(ids, None, _answer_room(len(ids), req, settings, max_len, "prompt", param)))
    return prompts


def echo_texts(tokenizer: Tokenizer, req: CompletionRequest) -> list[str]:
    """The text each prompt puts in front of its answers: the prompt (token ids decoded) with `echo`, else ""."""
    if not req.echo:
        return [""] * len(req.prompts)
    return [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=False) for p in req.prompts]


# ---- the generation worker --------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """New text of choice `index`; `finish_reason`, vLLM's `stop_reason` (the stop string or stop token id
    that ended the choice, None for the end-of-turn token or a length cut) and the choice's token count on
    its last chunk; its prompt's log-probabilities on its first."""

    index: int
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    logprobs: list[dict] | None = None  # OpenAI `logprobs.content` entries of the tokens behind `text`
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict] | None = None  # an entry per prompt token (see BatchWorker._prompt_entries)


@dataclass(eq=False)
class Job:
    """One choice of one HTTP request, as the worker sees it. `deliver` must be thread-safe."""

    request: Request
    index: int
    deliver: Callable[[object], None]  # gets Chunks, or an Exception if generation failed
    rid: int | None = None
    tokens: int = 0
    texts: TextAssembler | None = None
    cancelled: bool = False
    done: bool = False
    logprobs: list[dict] = field(default_factory=list)  # entries not yet delivered with a chunk
    prompt_logprobs: list[dict] | None = None  # the prompt's entries, until the first chunk carries them
    prompt_only: bool = False  # max_tokens 0: the chunk of the prompt's log-probabilities alone
    list_stop_token: bool = False  # list the token that stops the answer in logprobs (/v1/completions, as vLLM)


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error")


class BatchWorker:
    """The one thread that owns the model and its `Generation`; handlers talk to it through `submit`/`cancel`."""

    def __init__(self, chat: InternVLChat, max_batch: int, max_len: int):
        self.chat = chat
        self.max_batch, self.max_len = max_batch, min(max_len, chat.context)
        try:  # allocated here, before the server listens; the worker thread takes it over
            self._batch: Generation | None = chat.engine.start(max_batch, self.max_len)
        except RuntimeError as e:  # out of memory (CUDA's OutOfMemoryError is a RuntimeError too)
            raise ConfigError(f"the KV cache for {max_batch} rows of {self.max_len} tokens does not fit: {e}; "
                              "lower --max-batch or --max-len") from None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._submit_lock = threading.Lock()  # no job may enter the inbox after the stop sign: none would answer it
        self._thread = threading.Thread(target=self._run, name="internvl-generation", daemon=True)
        self.stats = {"active": 0, "waiting": 0, "max_active": 0, "requests": 0, "cancelled": 0,
                      "completion_tokens": 0, "steps": 0}

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._submit_lock:
            self._stopping = True
            self._inbox.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._submit_lock:
            if self._stopping:
                raise _shutting_down()
            self._inbox.put(("add", job))

    def cancel(self, job: Job) -> None:
        """Free the row of `job` (its client went away); a no-op once it has finished."""
        if not job.done and not job.cancelled:
            job.cancelled = True
            self._inbox.put(("cancel", job))

    def _run(self) -> None:
        gen, self._batch = self._batch, None  # gen is None after a failure, until a request builds a fresh one
        jobs: dict[int, Job] = {}  # the jobs in `gen` (waiting or decoding), by request id
        stats = dict(self.stats)
        while True:
            commands = [] if gen else [self._inbox.get()]
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for command in commands:
                if command is None:
                    for job in jobs.values():
                        job.done = True
                        job.deliver(_shutting_down())
                    return
                if gen is None and command[0] == "add":
                    gen = self._fresh(command[1])
                if gen is not None:
                    self._command(gen, jobs, *command, stats)
            if not gen:
                continue
            try:
                for event in gen.step():  # a request that fails comes back as an "error" event, alone
                    self._event(gen, jobs, event, stats)
            except Exception as e:  # anything else must not take the server down: fail what runs, start afresh
                log.exception("generation step failed")
                for job in jobs.values():
                    job.done = True  # its handler's cancel must not reach a new request with the same id
                    job.deliver(_failure(e))
                jobs.clear()
                gen = None  # freed before the next request builds a fresh one
            active, waiting = (gen.active, len(gen.waiting)) if gen else (0, 0)
            stats.update(active=active, waiting=waiting, steps=stats["steps"] + 1,
                         max_active=max(stats["max_active"], active))
            self.stats = dict(stats)

    def _fresh(self, job: Job) -> Generation | None:
        """A new empty batch for `job` to join, or None (and `job` fails alone) when it cannot be built."""
        try:
            return self.chat.engine.start(self.max_batch, self.max_len)
        except Exception as e:  # out of memory, say: the worker goes on and the next request tries again
            log.exception("could not start a batch")
            job.done = True
            job.deliver(_failure(e))
            return None

    def _command(self, gen: Generation, jobs: dict[int, Job], kind: str, job: Job, stats: dict) -> None:
        if kind == "add":
            try:
                job.texts = TextAssembler(self.chat.tokenizer, job.request.params.stop, job.request.params.min_new_tokens)
                job.rid = gen.add(job.request)
            except Exception as e:  # this request alone fails; the worker goes on
                if not isinstance(e, InputError):
                    log.exception("a request could not join the batch")
                job.deliver(_failure(e))
                return
            jobs[job.rid] = job
            stats["requests"] += 1
        elif jobs.get(job.rid) is job:  # ids restart with a fresh batch: only this very job
            gen.finish(job.rid)
            del jobs[job.rid]
            stats["cancelled"] += 1

    def _event(self, gen: Generation, jobs: dict[int, Job], event, stats: dict) -> None:
        job = jobs.get(event.rid)
        if job is None:  # cancelled after this step began
            return
        if event.error is not None:
            log.error("generation failed", exc_info=event.error)
            del jobs[event.rid]
            job.done = True
            job.deliver(_failure(event.error))
            return
        if event.prompt_logprobs is not None:
            job.prompt_logprobs = self._prompt_entries(job.request.prompt_ids, event.prompt_logprobs)
        if job.prompt_only:  # the token the engine chose is not shown nor counted (as vLLM's max_tokens 0)
            if event.finish is None:
                gen.finish(event.rid)
            del jobs[event.rid]
            job.done = True
            job.deliver(Chunk(job.index, "", "length", 0, [], prompt_logprobs=job.prompt_logprobs))
            return
        job.tokens += 1
        stats["completion_tokens"] += 1
        # a token that stops the answer (end of turn, or one of the request's stop_token_ids) is not in its
        # text (as in vLLM), nor in a chat answer's logprobs
        stop_token = event.finish == "stop"
        piece, stopped = job.texts.feed(None if stop_token else event.token, last=event.finish is not None)
        finish = "stop" if stopped else event.finish
        if event.logprob is not None and (job.list_stop_token or not stop_token):
            job.logprobs.append(self._logprob_entry(event))
        stop_reason = None  # as vLLM: the stop string, else a stop token other than the end of turn's
        if stopped:
            stop_reason = job.texts.stopped_by
        elif stop_token and (job.request.params.ignore_eos or event.token not in self.chat.engine.stop_token_ids):
            stop_reason = event.token
        if finish:
            if event.finish is None:
                gen.finish(event.rid)
            del jobs[event.rid]
            job.done = True
        if piece or finish:
            entries = None
            if job.request.logprobs is not None:
                entries, job.logprobs = job.logprobs, []
            prompt, job.prompt_logprobs = job.prompt_logprobs, None
            job.deliver(Chunk(job.index, piece, finish, job.tokens, entries, stop_reason, prompt))

    def _token_entry(self, token: int, logprob: float | None) -> dict:
        """A token's text and UTF-8 bytes (a token may hold part of a character) and its log-probability."""
        raw = self.chat.tokenizer.token_bytes(token)
        if logprob is not None and not math.isfinite(logprob):
            logprob = -9999.0  # JSON has no NaN or -inf (vLLM's stand-in)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def _logprob_entry(self, event) -> dict:
        """An OpenAI `logprobs.content` entry: the token's text, bytes and log-probability, and the top alternatives."""
        return {**self._token_entry(event.token, event.logprob),
                "top_logprobs": [self._token_entry(token, logprob) for token, logprob in event.top_logprobs]}

    def _prompt_entries(self, ids: list[int], prompt_logprobs) -> list[dict]:
        """An entry per prompt token as `_logprob_entry` makes them, with the token ids and the token's rank;
        the first token has no log-probability, rank or alternatives (None)."""
        entries = []
        for token, item in zip(ids, prompt_logprobs):
            value, rank, top = item or (None, None, None)
            entries.append({**self._token_entry(token, value), "id": token, "rank": rank, "top_logprobs": None if
                            top is None else [{**self._token_entry(t, v), "id": t} for t, v in top]})
        return entries


def _failure(error: Exception) -> ApiError:
    """What a request that failed in the worker gets: 400 for bad input, 500 for anything else."""
    if isinstance(error, InputError):
        return ApiError(400, str(error), "messages")
    return ApiError(500, f"generation failed: {error}", type="server_error")


# ---- HTTP -------------------------------------------------------------------------------------


def _sse(payload: dict | str) -> str:
    return "data: " + (payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)) + "\n\n"


class InProgress:
    """The requests the server is preparing or answering, at most `limit`: one more is refused at once with a 429,
    as text-generation-inference refuses one over its --max-concurrent-requests, so that a burst cannot fill
    memory with waiting bodies, images and tiles. Used on the event loop alone: a plain count."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def enter(self) -> None:
        """Take a place, or raise the 429: TGI's status for "Model is overloaded", with the type OpenAI's own
        overloaded error carries and TGI's error type as its code."""
        if self.count >= self.limit:
            are = "request is" if self.count == 1 else "requests are"
            raise ApiError(429, f"the server is busy: {self.count} {are} in progress "
                                f"(--max-concurrent-requests {self.limit}); retry later", code="overloaded",
                           type="server_error")
        self.count += 1

    def leave(self) -> None:
        self.count -= 1


def create_app(chat: InternVLChat, settings: ServerSettings):
    """The FastAPI app: one BatchWorker (started and stopped with the app) behind the OpenAI routes."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    worker = BatchWorker(chat, settings.max_batch, settings.max_len)
    in_progress = InProgress(settings.max_concurrent_requests)
    model_name = str(settings.served_model_name or settings.model or "internvl-mpo")  # a Path from Python too
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="internvl-mpo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    class _EventStream(StreamingResponse):
        """Server-sent events that cancel their generation however the response ends (done, error, or its client
        gone: away, or dropped by `http_protocol` after --send-timeout without reading)."""

        def __init__(self, content, on_close: Callable[[], None]):
            super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            self.on_close = [on_close]

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                for close in self.on_close:
                    close()

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        # a 408 closes its connection, as Node.js's requestTimeout does: the rest of a body too slow to wait for
        # is not waited for (uvicorn would read and drop it, and a client trickling bytes would keep the connection)
        headers = {401: {"WWW-Authenticate": "Bearer"}, 408: {"Connection": "close"}}.get(exc.status)
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code,
                            headers=exc.headers)  # a 405's Allow

    @app.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)

    def authorize(request: HttpRequest) -> None:
        if settings.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    async def read_body(request: HttpRequest) -> bytearray:
        encoding = request.headers.get("content-encoding", "identity")
        if encoding.strip().lower() != "identity":  # a gzip body was read as text: "not valid JSON: 'utf-8' codec ..."
            raise ApiError(415, f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed",
                           code="unsupported_content_encoding")
        limit = settings.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request is {declared} bytes; this server accepts at most {limit}",
                           code="request_too_large")

        async def read() -> bytearray:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"the request is over the limit of {limit} bytes", code="request_too_large")
            return body

        timeout = settings.request_read_timeout
        try:  # the whole body within the deadline, its first byte too (uvicorn has no deadline of its own)
            return await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--request-read-timeout "
                                f"{timeout:g})", code="request_timeout") from None

    def parsed(body: bytearray, parse: Callable, *args):
        """`parse(value, *args)` of the JSON value of `body` once it names the served model (or none)."""
        value = json_body(body)
        check_model(value, model_name)
        return parse(value, *args)

    async def read_json(request: HttpRequest, parse: Callable, *args):
        """`parse(value, *args)` of the JSON body of `request`, decoded and checked on a worker thread: a body of
        32 MiB takes about a second, which on the event loop would hold up every stream and /health."""
        body = await read_body(request)
        return await run_in_threadpool(parsed, body, parse, *args)

    async def answer(build: Callable[[], dict]):
        """The JSON response of `build()`, built and encoded on a worker thread: a non-streamed answer with logprobs
        can be 15 MiB (n 4 of 2048 tokens, 2048 prompt tokens, 20 alternatives each), about 3 s through FastAPI's
        encoder on the event loop, where every stream and /health waited. (json.dumps, 0.4 s of it, holds the GIL
        here too.)"""
        return await run_in_threadpool(lambda: json_response(build()))

    def admitted(endpoint):
        """`endpoint` behind the API key, holding a place in `in_progress` (none free: the 429 at once) from before
        its body is read (images are decoded and tiled after) until its response is made, or for a stream until
        the stream ends: answered, failed or its client gone."""
        @functools.wraps(endpoint)
        async def run(request: HttpRequest):
            authorize(request)
            in_progress.enter()
            try:
                response = await endpoint(request)
            except BaseException:  # a 4xx, a failure, a client gone (499) or a cancellation
                in_progress.leave()
                raise
            if isinstance(response, _EventStream):
                response.on_close.append(in_progress.leave)
            else:
                in_progress.leave()
            return response

        return run

    @app.get("/health")
    async def health():
        status = "ok" if worker.alive else "error"
        return JSONResponse({"status": status, "model": model_name, "max_batch": worker.max_batch,
                             "max_len": worker.max_len, "in_progress": in_progress.count,
                             "max_concurrent_requests": in_progress.limit, **worker.stats},
                            status_code=200 if worker.alive else 503)

    card = {"id": model_name, "object": "model", "created": started, "owned_by": "internvl-mpo",
            "max_model_len": worker.max_len}  # vLLM's card field: tokens per sequence, prompt included

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")  # a served name may hold slashes (OpenGVLab/InternVL2_5-4B-MPO)
    async def model(model_id: str, request: HttpRequest):
        authorize(request)
        check_model({"model": model_id}, model_name)
        return card

    @app.post("/tokenize")  # vLLM's, beside /v1 as in vLLM; it decodes and tiles a chat's images too
    @admitted
    async def tokenize(request: HttpRequest):
        req = await read_json(request, parse_tokenize_request, settings)
        ids = await run_in_threadpool(tokenize_ids, chat, req, settings, worker.max_len)
        return await answer(lambda: {"count": len(ids), "max_model_len": worker.max_len, "tokens": ids,
                                     "token_strs": None})

    @app.post("/detokenize")
    async def detokenize(request: HttpRequest):
        authorize(request)
        tokens = await read_json(request, parse_detokenize_request, chat.config.llm.vocab_size)
        # off the event loop: a long list would hold up the streams being sent
        return await answer(lambda: {"prompt": chat.tokenizer.decode(tokens, skip_special_tokens=False)})

    def submit(prompts: list[Prompt], n: int, params: SamplingParams, logprobs: int | None,
               prompt_logprobs: int | None = None, prompt_only: bool = False, list_stop_token: bool = False):
        """Queue `n` choices of each prompt (choice j of prompt p is index p * n + j, as in vLLM); returns the
        queue their chunks arrive on and the function that cancels them."""
        if not worker.alive:
            raise ApiError(503, "the generation worker is not running", type="server_error")
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def deliver(item) -> None:  # called on the worker thread
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        jobs = []
        for p, prompt in enumerate(prompts):
            for j in range(n):
                seed = None if params.seed is None else (params.seed + j) % 2**63
                choice = dataclasses.replace(params, max_new_tokens=prompt.max_new_tokens, seed=seed)
                request = Request(prompt.ids, choice, prompt.pixel_values, logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs)
                jobs.append(Job(request, p * n + j, deliver, prompt_only=prompt_only, list_stop_token=list_stop_token))
                worker.submit(jobs[-1])

        def close() -> None:
            for job in jobs:
                worker.cancel(job)

        return inbox, close

    @app.post("/v1/chat/completions")
    @admitted
    async def chat_completions(request: HttpRequest):
        req = await read_json(request, parse_chat_request, settings)
        check_token_ids(req.params, chat.config.llm.vocab_size)
        prompt = await run_in_threadpool(build_prompt, chat, req, settings, worker.max_len)
        inbox, close = submit([prompt], req.n, req.params, req.logprobs, None if req.stream else req.prompt_logprobs)
        head = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": model_name}
        usage = {"prompt_tokens": len(prompt.ids)}
        if req.stream:
            return _EventStream(_chat_stream(inbox, req, head, usage), close)
        try:
            answers = await _gather(inbox, request, req.n)
        finally:
            close()
        return await answer(lambda: _chat_body(req, answers, head, usage))

    @app.post("/v1/completions")
    @admitted
    async def text_completions(request: HttpRequest):
        req = await read_json(request, parse_completion_request, settings)
        check_token_ids(req.params, chat.config.llm.vocab_size)
        prompts = await run_in_threadpool(build_completion_prompts, chat, req, settings, worker.max_len)
        echoes = await run_in_threadpool(echo_texts, chat.tokenizer, req)
        # the prompt's log-probabilities serve vLLM's prompt_logprobs and an echo's logprobs (the larger top k)
        asked = [k for k in (req.shown_prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
        inbox, close = submit(prompts, req.n, req.params, req.logprobs, max(asked, default=None),
                              prompt_only=req.max_tokens == 0, list_stop_token=True)
        head = {"id": "cmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": model_name}
        usage = {"prompt_tokens": sum(len(p.ids) for p in prompts)}
        count = len(prompts) * req.n
        if req.stream:
            return _EventStream(_completion_stream(inbox, req, count, echoes, head, usage,
                                                   [len(p.ids) for p in prompts]), close)
        try:
            answers = await _gather(inbox, request, count)
        finally:
            close()
        return await answer(lambda: _completion_body(req, answers, echoes, head, usage))

    async def _gather(inbox: asyncio.Queue, request: HttpRequest, count: int) -> list[Answer]:
        """The Answer of each of `count` choices, once all have finished."""
        answers = [Answer() for _ in range(count)]
        clock = asyncio.get_running_loop().time
        check_at = clock() + DISCONNECT_POLL_S
        while any(a.finish_reason is None for a in answers):
            try:
                item = await asyncio.wait_for(inbox.get(), max(0.0, check_at - clock()))
            except asyncio.TimeoutError:
                item = None
            if clock() >= check_at:  # however fast tokens come, look for a gone client every DISCONNECT_POLL_S
                if await request.is_disconnected():
                    raise ApiError(499, "the client went away")
                check_at = clock() + DISCONNECT_POLL_S
            if item is None:
                continue
            if isinstance(item, Exception):
                raise item
            answer = answers[item.index]
            answer.text += item.text
            answer.logprobs += item.logprobs or []
            answer.prompt_logprobs = item.prompt_logprobs or answer.prompt_logprobs
            if item.finish_reason:
                answer.finish_reason, answer.tokens = item.finish_reason, item.completion_tokens
                answer.stop_reason = item.stop_reason
        return answers

    async def _chunks(inbox: asyncio.Queue, count: int):
        """The Chunks of `count` choices as they come, until all have finished; a failure ends them as an ApiError."""
        finished = 0
        while finished < count:
            item = await inbox.get()
            if isinstance(item, Exception):
                yield item if isinstance(item, ApiError) else ApiError(500, str(item), type="server_error")
                return
            yield item
            finished += bool(item.finish_reason)

    async def _chat_stream(inbox: asyncio.Queue, req: ChatRequest, head: dict, usage: dict):
        head = {**head, "object": "chat.completion.chunk"}

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: list[dict] | None = None,
                  stop_reason: int | str | None = None, tokens: int = 0) -> str:
            choice = {"index": index, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
                      "finish_reason": finish, "stop_reason": stop_reason}
            more = {"usage": _usage(usage, tokens)} if req.continuous_usage else {}  # the choice's tokens so far
            return _sse({**head, "choices": [choice], **more})

        for index in range(req.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        tokens = 0
        async for item in _chunks(inbox, req.n):
            if isinstance(item, ApiError):
                yield _sse(item.body())
                break
            yield chunk(item.index, {"content": item.text} if item.text else {}, item.finish_reason, item.logprobs,
                        item.stop_reason, item.completion_tokens)
            tokens += item.completion_tokens if item.finish_reason else 0  # the choice's count, on its last chunk
        if req.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(usage, tokens)})
        yield _sse("[DONE]")

    async def _completion_stream(inbox: asyncio.Queue, req: CompletionRequest, count: int, echoes: list[str],
                                 head: dict, usage: dict, lengths: list[int]):
        head = {**head, "object": "text_completion"}

        def chunk(item: Chunk, text: str, logprobs: dict | None) -> str:
            more = {}
            if req.continuous_usage:  # as vLLM: the choice's prompt and its tokens so far
                more["usage"] = _usage({"prompt_tokens": lengths[item.index // req.n]}, item.completion_tokens)
            return _sse({**head, "choices": [{"index": item.index, "text": text, "logprobs": logprobs,
                                              "finish_reason": item.finish_reason, "stop_reason": item.stop_reason}],
                         **more})

        echoed = [not req.echo] * count  # as vLLM, a choice's first chunk carries the echoed prompt
        offsets, tokens = [0] * count, 0  # per choice, the length of the text sent: the next chunk's text_offset
        async for item in _chunks(inbox, count):
            if isinstance(item, ApiError):
                yield _sse(item.body())
                break
            text, entries = item.text, item.logprobs or []
            if not echoed[item.index]:
                echoed[item.index] = True
                text = echoes[item.index // req.n] + text
                if req.logprobs is not None:
                    entries = _echo_entries(item.prompt_logprobs, req.logprobs) + entries
            logprobs = None
            if req.logprobs is not None:
                logprobs = _legacy_logprobs(entries, offsets[item.index])
            offsets[item.index] += len(text)
            yield chunk(item, text, logprobs)
            tokens += item.completion_tokens if item.finish_reason else 0  # the choice's count, on its last chunk
        if req.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(usage, tokens)})
        yield _sse("[DONE]")

    return app


@dataclass
class Answer:
    """What the chunks of one choice add up to."""

    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    tokens: int = 0
    logprobs: list[dict] = field(default_factory=list)
    prompt_logprobs: list[dict] | None = None


def _chat_body(req: ChatRequest, answers: list[Answer], head: dict, usage: dict) -> dict:
    """The non-streamed /v1/chat/completions response of the finished `answers`."""
    choices = [{"index": i, "message": {"role": "assistant", "content": a.text},
                "logprobs": None if req.logprobs is None else {"content": a.logprobs},
                "finish_reason": a.finish_reason, "stop_reason": a.stop_reason} for i, a in enumerate(answers)]
    # vLLM's extra, for the whole response (the n choices share the prompt)
    prompt_logprobs = None if req.prompt_logprobs is None else _vllm_prompt_logprobs(
        answers[0].prompt_logprobs, req.prompt_logprobs)
    return {**head, "object": "chat.completion", "choices": choices, "prompt_logprobs": prompt_logprobs,
            "usage": _usage(usage, sum(a.tokens for a in answers))}


def _completion_body(req: CompletionRequest, answers: list[Answer], echoes: list[str], head: dict,
                     usage: dict) -> dict:
    """The non-streamed /v1/completions response of the finished `answers` (choice i echoes `echoes[i // n]`)."""
    choices = []
    for i, a in enumerate(answers):
        logprobs = None
        if req.logprobs is not None:
            echoed = _echo_entries(a.prompt_logprobs, req.logprobs) if req.echo else []
            logprobs = _legacy_logprobs(echoed + a.logprobs, 0)
        shown = req.shown_prompt_logprobs
        prompt_logprobs = None if shown is None else _vllm_prompt_logprobs(a.prompt_logprobs, shown)
        choices.append({"index": i, "text": echoes[i // req.n] + a.text, "logprobs": logprobs,
                        "finish_reason": a.finish_reason, "stop_reason": a.stop_reason,
                        "prompt_logprobs": prompt_logprobs})
    return {**head, "object": "text_completion", "choices": choices,
            "usage": _usage(usage, sum(a.tokens for a in answers))}


def _echo_entries(prompt: list[dict], k: int) -> list[dict]:
    """The prompt's entries (BatchWorker._prompt_entries) as logprobs entries with `k` alternatives each."""
    return [{**e, "top_logprobs": None if e["top_logprobs"] is None else e["top_logprobs"][:k]} for e in prompt]


def _vllm_prompt_logprobs(prompt: list[dict], k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token {token id: {"logprob", "rank",
    "decoded_token"}} of the token itself and its `k` likeliest alternatives (ranked 1..k). As in vLLM's
    dict, a token that is also among the alternatives keeps its place first and takes its rank there, which
    differs from its own rank only where its log-probability ties another's."""
    out: list[dict | None] = []
    for e in prompt:
        if e["logprob"] is None:
            out.append(None)
            continue
        ranked = {str(e["id"]): {"logprob": e["logprob"], "rank": e["rank"], "decoded_token": e["token"]}}
        for rank, top in enumerate(e["top_logprobs"][:k], 1):
            ranked[str(top["id"])] = {"logprob": top["logprob"], "rank": rank, "decoded_token": top["token"]}
        out.append(ranked)
    return out


def _legacy_logprobs(entries: list[dict], offset: int) -> dict:
    """The /v1/completions `logprobs` object of chat-format entries, as vLLM builds it: each token's text
    and log-probability, a {text: log-probability} map of the token and the top alternatives, and each
    token's offset (the first at `offset`, then after the previous token's text: a character split over
    two tokens counts twice, as in vLLM). Where two of a map's tokens read the same (pieces of one
    character both read "\ufffd"), the last one's value stands, as in vLLM's map: the chosen token comes
    first, then the alternatives from the likeliest down."""
    def choices(entry: dict) -> dict | None:
        if entry["top_logprobs"] is None:  # the first prompt token: nothing came before it
            return None
        out = {entry["token"]: entry["logprob"]}
        for top in entry["top_logprobs"]:
            out[top["token"]] = top["logprob"]
        return out

    tokens = [entry["token"] for entry in entries]
    return {"tokens": tokens, "token_logprobs": [entry["logprob"] for entry in entries],
            "top_logprobs": [choices(entry) for entry in entries],
            "text_offset": list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))[:len(tokens)]}


def _usage(usage: dict, completion_tokens: int) -> dict:
    return {**usage, "completion_tokens": completion_tokens,
            "total_tokens": usage["prompt_tokens"] + completion_tokens}


# ---- the command ------------------------------------------------------------------------------


def _require_web_stack():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"the server needs FastAPI and uvicorn ({e}); install them with "
                          "pip install 'internvl-mpo[serve]'") from None
    return uvicorn


def _uvicorn_server(app, settings: ServerSettings):
    """uvicorn's server for `app`, made to stop promptly on Ctrl-C or SIGTERM. uvicorn waits for open
    responses before it runs the app's shutdown, and a long answer can stream for minutes: so the
    worker stops first, and every running request ends at once with "the server is shutting down"
    (an error event and `[DONE]` for a stream, a 503 otherwise). A response still open
    SHUTDOWN_GRACE_S later (a client that stopped reading) is cut off."""
    uvicorn = _require_web_stack()

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await asyncio.to_thread(app.state.worker.stop)
            await super().shutdown(sockets)

    # the server's own lines (a client dropped, a request failed) through uvicorn's handler, from INFO up
    loggers = {**uvicorn.config.LOGGING_CONFIG["loggers"],
               "internvl_mpo": {"handlers": ["default"], "level": "INFO", "propagate": False}}
    return Server(uvicorn_config(app, settings, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
                                 log_config={**uvicorn.config.LOGGING_CONFIG, "loggers": loggers}))


def uvicorn_config(app, settings: ServerSettings, **options):
    """uvicorn's Config for `app` on --host and --port, over `http_protocol` (`options` are more of its arguments)."""
    uvicorn = _require_web_stack()
    return uvicorn.Config(app, host=settings.host, port=settings.port, http=http_protocol(settings), **options)


def http_protocol(settings: ServerSettings) -> type:
    """uvicorn's HTTP/1.1 protocol (h11) with the two deadlines on a connection that uvicorn lacks.
    --header-timeout while no request holds it: on a request's head, from the connection's start or the head's first
    byte (uvicorn's own keep-alive timeout stops at the first byte), and on the rest of a body answered before it
    was read (a 401 or 429), which uvicorn reads and drops for as long as it comes; past it a 408 where part of a
    head came, and the connection closed. --send-timeout on a client that takes none of the bytes waiting for it,
    whatever the response (uvicorn writes a plain answer whole and would keep it, and the connection, until the
    client read it): the connection is dropped with its unsent bytes, which also ends a stream as a client that went
    away does. The check runs every --send-timeout seconds, so a client is cut between one and two of them after its
    last read. With --max-connections connections served, one more is answered a 503 at its first bytes (none of
    them reach the app) and closed once the client is done sending, or at --header-timeout; uvicorn's
    limit_concurrency would instead answer every request, on any connection, a plain-text 503 while that many
    connections are open, and count the refused ones as open."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        head_timer = send_timer = None
        unsent = 0  # the bytes waiting for the client at the last check
        served = 0  # the connections open and not over --max-connections: used on the event loop alone, a plain count
        over_limit = answered = False

        def connection_made(self, transport):
            super().connection_made(transport)
            transport.set_write_buffer_limits(high=0)  # pause_writing as soon as the client leaves a byte waiting
            self.over_limit = Protocol.served >= settings.max_connections
            Protocol.served += not self.over_limit
            self.head_timer = self.loop.call_later(settings.header_timeout, self.head_late)

        def serving(self) -> bool:
            """A request's head has come and its answer is not all written: the app has it, with its deadlines."""
            return self.conn.their_state is not h11.IDLE and self.conn.our_state is not h11.DONE

        def data_received(self, data: bytes) -> None:
            if self.over_limit:  # the 503, then the rest of its request read and dropped until the client closes or
                # --header-timeout: closed with bytes unread, the connection is reset, and a client still sending an
                # upload (Python's http.client) sees that instead of the answer
                if not self.answered:
                    limit = settings.max_connections
                    self.answer(ApiError(503, f"the server is busy: {limit} connections are open (--max-connections "
                                              f"{limit}); retry later", code="overloaded", type="server_error"))
                    self.transport.write_eof()
                    self.answered = True
                return
            super().data_received(data)
            if self.serving():
                self.stop(self.head_timer)
                self.head_timer = None
            elif self.head_timer is None:  # the first bytes of the next head, or of a body answered already
                self.head_timer = self.loop.call_later(settings.header_timeout, self.head_late)

        def head_late(self) -> None:
            self.head_timer = None
            if self.serving() or self.transport.is_closing():
                return
            if not (self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]):  # no part of a head came
                self.transport.close()
                return
            timeout = settings.header_timeout  # say why, as Node.js's headersTimeout does
            self.answer(ApiError(408, f"the request head did not arrive within {timeout:g} s (--header-timeout "
                                      f"{timeout:g})", code="request_timeout"))
            self.transport.close()

        def answer(self, error: ApiError) -> None:
            """`error` as the answer of a connection whose request never reached the app (`Connection: close`)."""
            body = json.dumps(error.body()).encode()
            headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                       ("connection", "close")]
            for event in (h11.Response(status_code=error.status, headers=headers,
                                       reason=http.HTTPStatus(error.status).phrase.encode()),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))

        def pause_writing(self) -> None:
            super().pause_writing()
            self.unsent = self.transport.get_write_buffer_size()
            self.send_timer = self.loop.call_later(settings.send_timeout, self.send_late)

        def resume_writing(self) -> None:  # all taken
            super().resume_writing()
            self.stop(self.send_timer)
            self.send_timer = None

        def send_late(self) -> None:
            unsent, self.unsent = self.unsent, self.transport.get_write_buffer_size()
            if self.unsent < unsent:  # the client took some: it has another --send-timeout
                self.send_timer = self.loop.call_later(settings.send_timeout, self.send_late)
                return
            log.info("a client took none of its answer for %g s (--send-timeout %g): its connection is closed",
                     settings.send_timeout, settings.send_timeout)
            self.transport.abort()

        def connection_lost(self, exc: Exception | None) -> None:
            Protocol.served -= not self.over_limit
            self.stop(self.head_timer)
            self.stop(self.send_timer)
            super().connection_lost(exc)

        @staticmethod
        def stop(timer: asyncio.TimerHandle | None) -> None:
            if timer is not None:
                timer.cancel()

    return Protocol


def serve(
    model: str | None = None,
    served_model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_len: int = 4096,
    device: str | None = None,
    dtype: str | None = None,
    compile: bool = False,
    allow_remote_images: bool = False,
    allow_private_image_hosts: bool = False,
    allow_local_images: bool = False,
    max_request_bytes: int = 32 * 2**20,
    max_images: int = 8,
    max_tiles: int = 24,
    max_image_bytes: int = 16 * 2**20,
    max_image_pixels: int = 40_000_000,
    image_timeout: float = 10.0,
    max_prompt_tokens: int | None = None,
    max_tokens: int = 2048,
    max_n: int = 4,
    max_concurrent_requests: int = 64,
    request_read_timeout: float = 300.0,
    send_timeout: float = 60.0,
    header_timeout: float = 60.0,
    max_connections: int = 256,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /tokenize, ...).

    model: checkpoint folder or hub id (default: the shipped demo model)
    served_model_name: the model's name in the API (/v1/models, responses); a request naming another model gets a 404 (default: --model as given; internvl-mpo-demo for the demo model)
    host: address to bind; the default answers this machine only
    port: TCP port
    api_key: require 'Authorization: Bearer <key>' on /v1 routes
    max_batch: sequences decoded together (continuous batching)
    max_len: tokens per sequence, prompt included (capped at the model's context)
    device: torch device (default: cuda when available, else cpu)
    dtype: weights dtype (bfloat16, float16, float32, auto; default: bf16 on CUDA, fp32 elsewhere)
    compile: torch.compile the decode step
    allow_remote_images: fetch http(s) image and video URLs (off: only data: URLs are accepted); from public addresses only
    allow_private_image_hosts: with --allow-remote-images, fetch from loopback, private and link-local addresses too (this machine, its LAN, cloud metadata)
    allow_local_images: read image and video files on this machine named by path or file:// URL
    max_request_bytes: largest request body accepted (413 above)
    max_images: images per request
    max_tiles: tile budget per request, shared by its images (InternVL's total_max_num)
    max_image_bytes: largest image or video file accepted (413 above)
    max_image_pixels: largest image accepted, in pixels (decompression-bomb guard)
    image_timeout: seconds allowed to fetch a remote image
    max_prompt_tokens: longest prompt accepted, image tokens included (default: max_len - 1)
    max_tokens: largest max_tokens a request may ask for (also the default, within max_len)
    max_n: largest n (choices per request)
    max_concurrent_requests: requests (chat, completion, /tokenize; n choices count once) prepared or answered at
      once, the waiting ones included; one more is a 429 at once, before its body is read (default: 64, eight
      batches of the default --max-batch; keep it at least --max-batch, or the batch cannot fill)
    request_read_timeout: seconds a request body may take to arrive whole, from when the server awaits it (408
      past it): it bounds how long a client sending slowly holds a place (default: 300, as Node.js's requestTimeout;
      the default --max-request-bytes, 32 MiB, takes 270 s at 1 Mbit/s)
    send_timeout: seconds a client may take none of the answer bytes waiting for it, streamed or not (its connection
      is closed past it, the bytes dropped: a stream's generation stopped, its place given back): it bounds how long a
      client that stops reading holds a place and a connection (default: 60, as nginx's send_timeout)
    header_timeout: seconds a request's head (request line and headers) may take to arrive, from the connection's
      start or the head's first byte (408 past it, the connection closed), and the rest of a body answered before it
      was read (a 401 or 429): it bounds how long a client sending slowly holds a connection (default: 60, as nginx's
      client_header_timeout and Node.js's headersTimeout)
    max_connections: connections served at once, kept-alive idle ones and ones still sending a head included; one
      more is answered a 503 at its first bytes and closed (once its client is done sending, at --header-timeout at
      the latest): it bounds the sockets and memory that clients holding connections open can take (default: 256,
      four times the default --max-concurrent-requests, and far below the usual limit of 1024 open files; more than
      --max-concurrent-requests, so that every request in progress and /health can connect)
    """
    settings = ServerSettings(**locals())  # the parameters are exactly the settings' fields
    _require_web_stack()
    if settings.allow_private_image_hosts and not settings.allow_remote_images:
        raise ConfigError("--allow-private-image-hosts only applies with --allow-remote-images")
    if settings.model is None:
        from .cli import default_model

        if not default_model().exists():
            raise ConfigError("no demo checkpoint is installed; pass --model <checkpoint folder or hub id>")
        settings = dataclasses.replace(settings, model=str(default_model()),
                                       served_model_name=settings.served_model_name or DEMO_MODEL_NAME)
    if settings.max_batch < 1 or settings.max_len < 2:
        raise ConfigError(f"--max-batch must be >= 1 and --max-len >= 2, got {settings.max_batch}, {settings.max_len}")
    for name in ("max_concurrent_requests", "max_connections"):  # argparse reads a whole number; Python may pass 2.5
        if type(getattr(settings, name)) is not int:
            raise ConfigError(f"--{name.replace('_', '-')} must be a whole number, got {getattr(settings, name)!r}")
    lowest = dict(max_tokens=1, max_n=1, max_tiles=1, max_prompt_tokens=1, max_images=0, max_request_bytes=1,
                  max_image_bytes=1, max_image_pixels=1, max_concurrent_requests=1, max_connections=1)
    for name, low in lowest.items():  # a limit out of range would fail or misread every request
        value = getattr(settings, name)
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    if settings.max_connections <= settings.max_concurrent_requests:
        raise ConfigError(f"--max-connections ({settings.max_connections}) must be more than --max-concurrent-requests "
                          f"({settings.max_concurrent_requests}): each request in progress holds a connection, and "
                          "/health needs one more")
    # inf: settimeout, wait_for would fail
    for name in ("image_timeout", "request_read_timeout", "send_timeout", "header_timeout"):
        timeout = getattr(settings, name)
        if type(timeout) not in (int, float) or not 0 < timeout < math.inf:  # nan fails the comparison too
            raise ConfigError(f"--{name.replace('_', '-')} must be a number of seconds more than 0, got {timeout!r}")
    if not 0 <= settings.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {settings.port}")
    with socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:  # a port in use fails now, not after the model has loaded
            probe.bind((settings.host, settings.port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}") from None
    if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model",
                    settings.host)
    let_pillow_open(settings.max_image_pixels)
    chosen_device = default_device(settings.device)
    chat = InternVLChat.from_pretrained(settings.model, dtype=settings.dtype, device=chosen_device,
                                        compile=settings.compile)
    server = _uvicorn_server(create_app(chat, settings), settings)
    # the objects alive now (the model, torch's and the web stack's modules: some 300,000) live as long as the server:
    # out of the collector's generations, a full collection need not walk them again (one of 0.3 s, every stream
    # and /health waiting, came every few seconds of a big logprob answer); the garbage among them is collected first
    gc.collect()
    gc.freeze()
    server.run()
