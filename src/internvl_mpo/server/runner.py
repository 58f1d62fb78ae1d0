"""`internvl-mpo serve`: its flags checked, the model loaded and the app run by uvicorn, over an HTTP protocol
with the deadlines and the connection limit that uvicorn lacks, stopping promptly on Ctrl-C."""

import asyncio
import dataclasses
import gc
import http
import json
import logging
import math
import os
import signal
import socket

from ..errors import ConfigError, Interrupted
from .requests import ApiError
from .settings import ServerSettings

log = logging.getLogger("internvl_mpo.server")  # one logger for the whole server (users filter on it)

SHUTDOWN_GRACE_S = 5  # how long a response may stay open after Ctrl-C once its generation has ended
LINGER_S = 2.0  # after a 408 or a cut body, how long a client's bytes still coming are read and dropped (nginx's
# lingering close): a socket closed with bytes unread, or sent more after it closed, is reset, and a reset can reach
# the client before it has read the answer
DEMO_MODEL_NAME = "internvl-mpo-demo"  # the served name of the shipped demo model


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
    (an error event and `[DONE]` for a stream, a 503 otherwise). A connection still open SHUTDOWN_GRACE_S later (a
    client that stopped reading, or one still sending its body) is dropped, its request ending as one whose client went
    away, and everything is cut off at a second Ctrl-C: the process exits at once with 130. Each with one line: uvicorn
    would cancel the open requests' tasks (at its graceful shutdown's timeout, or with the event loop at its forced
    exit), each logged with a traceback."""
    uvicorn = _require_web_stack()

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await asyncio.to_thread(app.state.worker.stop)
            cut = asyncio.get_running_loop().call_later(SHUTDOWN_GRACE_S, self.cut_off)
            try:
                await super().shutdown(sockets)
            finally:
                cut.cancel()

        def cut_off(self) -> None:
            connections = list(self.server_state.connections)
            log.info("%d connection%s still open %g s after the stop signal: cut off", len(connections),
                     "" if len(connections) == 1 else "s", SHUTDOWN_GRACE_S)
            for connection in connections:
                connection.transport.abort()

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:  # where uvicorn would force its exit; run on the event loop,
                asyncio.get_running_loop().call_soon_threadsafe(self.quit)  # not inside whatever the signal interrupted
                return
            super().handle_exit(sig, frame)

        def quit(self) -> None:
            count = len(self.server_state.connections)
            log.info("a second Ctrl-C: the server stops now, its %d open connection%s cut off", count,
                     "" if count == 1 else "s")
            os._exit(130)  # as a Ctrl-C'd command; the worker thread may be inside a step that cannot be interrupted

    # the server's own lines (a client dropped, a request failed) through uvicorn's handler, from INFO up
    loggers = {**uvicorn.config.LOGGING_CONFIG["loggers"],
               "internvl_mpo": {"handlers": ["default"], "level": "INFO", "propagate": False}}
    # uvicorn's timeout: for a request still running once its connection was cut off (its task is cancelled then)
    return Server(uvicorn_config(app, settings, log_level="info", timeout_graceful_shutdown=2 * SHUTDOWN_GRACE_S,
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
    head came, and the connection closed: at once where nothing came, else once the client closes or LINGER_S later,
    what it still sends read and dropped till then. --send-timeout on a client that takes none of the bytes waiting
    for it, whatever the response (uvicorn writes a plain answer whole and would keep it, and the connection, until the
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
        over_limit = answered = lingering = False

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
            if self.lingering:
                return
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
            if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:  # nothing came
                self.transport.close()
                return
            if self.conn.their_state is h11.IDLE:  # part of a head: say why, as Node.js's headersTimeout does
                timeout = settings.header_timeout
                self.answer(ApiError(408, f"the request head did not arrive within {timeout:g} s (--header-timeout "
                                          f"{timeout:g})", code="request_timeout"))
            self.transport.write_eof()  # the end of what we send; closed when the client closes, or LINGER_S on
            self.lingering = True
            self.head_timer = self.loop.call_later(LINGER_S, self.transport.close)

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
    if settings.allow_private_image_hosts and not settings.allow_remote_images:
        raise ConfigError("--allow-private-image-hosts only applies with --allow-remote-images")
    if settings.served_model_name is not None and not str(settings.served_model_name).strip():
        raise ConfigError(f"--served-model-name must name the model, got {settings.served_model_name!r}")
    if settings.model is None:
        from ..cli import default_model

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
    _require_web_stack()  # before the model loads
    # torch, the model's code and the app load from here on: the flags above are refused in a fraction of a second
    from ..devices import default_device
    from ..pipeline import InternVLChat
    from ..processor.image import let_pillow_open
    from .app import create_app

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
    try:
        server.run()
    except KeyboardInterrupt:  # raised again by uvicorn once it logged its shutdown, a line each
        raise Interrupted from None
