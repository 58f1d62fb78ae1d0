"""The FastAPI app: the OpenAI and vLLM routes over one BatchWorker, the places in progress, and the response
bodies (plain and streamed, with their log-probabilities) made of the worker's Chunks."""

import asyncio
import dataclasses
import functools
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ..generate import json_mode as jm
from ..generate.engine import Request
from ..generate.params import SamplingParams
from ..pipeline import InternVLChat
from .metrics import CONTENT_TYPE
from .prompts import Prompt, build_completion_prompts, build_prompt, check_token_ids, echo_texts, tokenize_ids
from .requests import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    check_model,
    json_body,
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
)
from .settings import ServerSettings
from .worker import BatchWorker, Chunk, Job

log = logging.getLogger("internvl_mpo.server")  # one logger for the whole server (users filter on it)

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


def json_response(value):
    """The JSONResponse of `value` (dicts, lists, strings, numbers, None: the bytes and headers FastAPI makes of
    such a value returned by a route), encoded where it is called: on a worker thread (`answer` in create_app)."""
    from fastapi.responses import JSONResponse

    return JSONResponse(value)


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

    import anyio
    import anyio.to_thread
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    worker = BatchWorker(chat, settings.max_batch, settings.max_len)
    in_progress = InProgress(settings.max_concurrent_requests)
    model_name = str(settings.served_model_name or settings.model or "internvl-mpo")  # a Path from Python too
    started = int(time.time())
    prompt_threads = None  # the prompts' own threads, one per request in progress (made in the event loop)

    @asynccontextmanager
    async def lifespan(app):
        nonlocal prompt_threads
        prompt_threads = anyio.CapacityLimiter(settings.max_concurrent_requests)
        worker.start()
        yield
        worker.stop()

    async def in_prompt_thread(func: Callable, *args):
        """`func(*args)` on one of the prompts' own threads: a prompt fetches its remote images (seconds each from
        a slow host), which on the shared pool of 40 threads that reads every body and encodes every answer held up
        all other requests once 40 such prompts were being built. Each request in progress may hold one."""
        return await anyio.to_thread.run_sync(functools.partial(func, *args), limiter=prompt_threads)

    app = FastAPI(title="internvl-mpo", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    class _EventStream(StreamingResponse):
        """Server-sent events that cancel their generation however the response ends (done, error, or its client
        gone: away, or dropped by `runner.http_protocol` after --send-timeout without reading)."""

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
        # a gzip body was read as text ("not valid JSON: 'utf-8' codec ..."); an empty header names no coding
        if encoding.strip().lower() not in ("identity", ""):
            raise ApiError(415, f"Content-Encoding {encoding[:40]!r} is not supported; send the body uncompressed",
                           code="unsupported_content_encoding")
        limit = settings.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request is {declared} bytes; this server accepts at most {limit}",
                           code="request_too_large")

        async def read() -> bytearray:
            body = bytearray()
            try:
                async for chunk in request.stream():
                    body += chunk
                    if len(body) > limit:
                        raise ApiError(413, f"the request is over the limit of {limit} bytes", code="request_too_large")
            except ClientDisconnect:  # not an error of ours to log with a traceback: as a client gone later, a 499
                raise ApiError(499, "the client went away before its request body arrived") from None
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

    @app.get("/metrics")  # outside the API key, as vLLM serves it (its key guards /v1 alone), and as /health is
    async def metrics():
        return Response(worker.metrics.text(model_name), media_type=CONTENT_TYPE)

    card = {"id": model_name, "object": "model", "created": started, "owned_by": "internvl-mpo",
            "max_model_len": worker.max_len}  # vLLM's card field: tokens per sequence, prompt included

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")  # a served name may hold slashes (OpenGVLab/InternVL2_5-4B-MPO)
    async def model(model_id: str, request: HttpRequest):
        authorize(request)
        if not model_id:  # /v1/models/ is the list (where FastAPI's slash redirect takes it), not an empty id's card
            return {"object": "list", "data": [card]}
        check_model({"model": model_id}, model_name)
        return card

    @app.post("/tokenize")  # vLLM's, beside /v1 as in vLLM; it decodes and tiles a chat's images too
    @admitted
    async def tokenize(request: HttpRequest):
        req = await read_json(request, parse_tokenize_request, settings)
        ids = await in_prompt_thread(tokenize_ids, chat, req, settings, worker.max_len)
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
        if not worker.alive and not worker.stopping:  # once stopped by Ctrl-C, worker.submit says it shuts down
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
        prompt = await in_prompt_thread(build_prompt, chat, req, settings, worker.max_len)
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
        prompts = await in_prompt_thread(build_completion_prompts, chat, req, settings, worker.max_len)
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
        for index in range(req.n if req.echo else 0):  # as vLLM, the echoed message in a chunk of its own
            yield chunk(index, {"content": req.echo})
        tokens = [0] * req.n  # per choice, its tokens so far (all counted if the stream ends on an error)
        calls = [ToolCalls(req.named_tool) for _ in range(req.n)] if req.named_tool or req.tools_required else None
        held: list[list[dict]] = [[] for _ in range(req.n)]  # per choice, the logprobs of the chunks not sent
        async for item in _chunks(inbox, req.n):
            if isinstance(item, ApiError):
                yield _sse(item.body())
                break
            if calls is None:
                delta, finish = {"content": item.text} if item.text else {}, item.finish_reason
            else:  # the calls' name, then their arguments in pieces, as OpenAI streams them
                deltas = calls[item.index].read(item.text)
                finish = _tool_finish(req, item.finish_reason, item.stop_reason)
                delta = {"tool_calls": deltas} if deltas else {}
            held[item.index] += item.logprobs or []
            if not delta and not finish:  # as vLLM, no chunk of nothing ("required" calls' brackets and keys)
                continue  # its tokens' logprobs come with the next chunk
            logprobs, held[item.index] = None if item.logprobs is None else held[item.index], []
            yield chunk(item.index, delta, finish, logprobs, item.stop_reason, item.completion_tokens)
            tokens[item.index] = item.completion_tokens
        if req.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(usage, sum(tokens))})
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
        offsets = [0] * count  # per choice, the length of the text sent: the next chunk's text_offset
        tokens = [0] * count  # per choice, its tokens so far (all counted if the stream ends on an error)
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
            tokens[item.index] = item.completion_tokens
        if req.include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(usage, sum(tokens))})
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


class ToolCalls:
    """The tool calls of one choice's text, read as it comes, as vLLM reads them without a tool parser. With a named
    tool_choice (`named`) the whole text is that function's arguments but for the whitespace before the value (the
    openai client's stream helper fails to parse arguments of whitespace alone). With "required" the text is a JSON
    list of {"name": ..., "parameters": ...} objects, keys in that order as the constraint writes them, read by JSON
    mode's recognizer (json_mode.advance from a value's start: the constraint's own lexical state, so it takes all
    the constraint writes; reading stops at a character it refuses): a call begins once its name's string is closed,
    and its arguments are the text of its parameters' value as written, from its first character to its last.
    `read` returns OpenAI's streamed `tool_calls` deltas of the next piece of text, so that the pieces join to
    `calls`."""

    def __init__(self, named: str | None):
        self.named = named
        self.calls: list[dict] = []  # OpenAI's message tool_calls: {"id", "type", "function": {"name", "arguments"}}
        self.state = jm.ANY_VALUE  # the recognizer's state after the text so far; None once it refused it
        self.key = ""  # the call object's last key
        self.text = ""  # the JSON text so far of the key, or the name, being read

    def read(self, text: str) -> list[dict]:
        deltas: list[dict] = []
        if self.named is not None:
            if not self.calls:
                self._call(self.named, deltas)
            if not self.calls[0]["function"]["arguments"]:
                text = text.lstrip(" \t\n\r")  # JSON's whitespace before the value
            self._arguments(text, deltas)
            return deltas
        for c in text:
            before, self.state = self.state, jm.advance_bytes(self.state, c.encode())
            if self.state is None:
                break
            # c belongs to a key or value of a call's object: it is inside it, or its last character (a number
            # there ends at the character after it, which is not the number's)
            number_ended = before[0] == jm.NUMBER and len(before[2]) == 2
            if _in_member(self.state) or (_in_member(before) and not number_ended):
                if _in_key(self.state):
                    self.text += c
                    if self.state[0] == jm.COLON:  # the key closed
                        self.key, self.text = json.loads(self.text), ""
                elif self.key == "parameters":
                    self._arguments(c, deltas)
                elif self.key == "name":
                    self.text += c
                    if not _in_member(self.state):  # the name closed
                        self._call(json.loads(self.text), deltas)
                        self.text = ""
        return deltas

    def _call(self, name: str, deltas: list[dict]) -> None:
        call = {"id": "chatcmpl-tool-" + uuid.uuid4().hex, "type": "function",  # vLLM's ids
                "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        deltas.append({"index": len(self.calls) - 1, **call, "function": dict(call["function"])})

    def _arguments(self, text: str, deltas: list[dict]) -> None:
        if not text:
            return
        self.calls[-1]["function"]["arguments"] += text
        index = len(self.calls) - 1
        if not deltas or deltas[-1]["index"] != index:
            deltas.append({"index": index, "function": {"arguments": ""}})
        deltas[-1]["function"]["arguments"] += text


SCALAR_MODES = (jm.STRING, jm.ESCAPE, jm.UNICODE, jm.NUMBER, jm.LITERAL)  # a string, number or literal being read


def _in_member(state) -> bool:
    """Whether recognizer `state` is inside a key or value of a call's object (the list's "[{" open): in a string,
    number or literal there, or in a container inside it."""
    return len(state[2]) > 2 or (len(state[2]) == 2 and state[0] in SCALAR_MODES)


def _in_key(state) -> bool:
    """Whether recognizer `state` is in a key of a call's object, or right after its closing quote."""
    return state[2] == "[{" and (state[0] == jm.COLON or jm.in_key(state))


def _tool_finish(req: ChatRequest, finish_reason: str | None, stop_reason: int | str | None) -> str | None:
    """A choice's finish_reason as OpenAI's and vLLM's: "tool_calls" for "required" calls ended by the model (its end
    of turn or a stop token, taken only where the calls are whole), the answer's own for a named function's or a cut
    (by max_tokens, or by a stop string: "stop", its calls cut too)."""
    ended = finish_reason == "stop" and not isinstance(stop_reason, str)
    return "tool_calls" if req.tools_required and ended else finish_reason


def _message(req: ChatRequest, a: Answer) -> tuple[dict, str | None]:
    """(the message, the finish_reason) of one finished choice; with tool_choice, its calls (content "", as vLLM);
    the content starts with the echoed message (vLLM's chat `echo`)."""
    if not (req.named_tool or req.tools_required):
        return {"role": "assistant", "content": req.echo + a.text}, a.finish_reason
    calls = ToolCalls(req.named_tool)
    calls.read(a.text)
    message = {"role": "assistant", "content": req.echo, "tool_calls": calls.calls}
    return message, _tool_finish(req, a.finish_reason, a.stop_reason)


def _chat_body(req: ChatRequest, answers: list[Answer], head: dict, usage: dict) -> dict:
    """The non-streamed /v1/chat/completions response of the finished `answers`."""
    choices = [{"index": i, "message": message, "logprobs": None if req.logprobs is None else {"content": a.logprobs},
                "finish_reason": finish, "stop_reason": a.stop_reason}
               for i, a in enumerate(answers) for message, finish in [_message(req, a)]]
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
