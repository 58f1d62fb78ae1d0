"""The generation worker: the one thread that owns the model and a `Generation` (continuous batching), which
requests join and leave between decode steps, their text and log-probabilities handed back as Chunks."""

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError, InputError
from ..generate.engine import Generation, Request
from ..pipeline import InternVLChat, TextAssembler
from .metrics import Metrics
from .requests import ApiError

log = logging.getLogger("internvl_mpo.server")  # one logger for the whole server (users filter on it)


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
    submitted: float = 0.0  # time.monotonic() when it was submitted
    last_token_at: float | None = None  # time.monotonic() of its last generated token


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
        self.metrics = Metrics()  # /metrics: written on the worker thread

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        """Stopped (Ctrl-C) or stopping: `submit` refuses a job with "the server is shutting down"."""
        return self._stopping

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
            job.submitted = time.monotonic()
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
                        self._ended(job, "abort")
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
                    self._ended(job, "error")
                    job.deliver(_failure(e))
                jobs.clear()
                gen = None  # freed before the next request builds a fresh one
            active, waiting = (gen.active, len(gen.waiting)) if gen else (0, 0)
            stats.update(active=active, waiting=waiting, steps=stats["steps"] + 1,
                         max_active=max(stats["max_active"], active))
            self.stats = dict(stats)
            self.metrics.rows(active, waiting)

    def _ended(self, job: Job, reason: str) -> None:
        """Count `job` as finished for `reason` (one of metrics.FINISH_REASONS) in the metrics."""
        self.metrics.ended(reason, time.monotonic() - job.submitted)

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
            self._ended(job, "abort")

    def _event(self, gen: Generation, jobs: dict[int, Job], event, stats: dict) -> None:
        job = jobs.get(event.rid)
        if job is None:  # cancelled after this step began
            return
        if event.error is not None:
            log.error("generation failed", exc_info=event.error)
            del jobs[event.rid]
            job.done = True
            self._ended(job, "error")
            job.deliver(_failure(event.error))
            return
        now = time.monotonic()
        if job.last_token_at is None:  # its prompt is prefilled and its first token made
            self.metrics.prefilled(len(job.request.prompt_ids), now - job.submitted)
        if event.prompt_logprobs is not None:
            job.prompt_logprobs = self._prompt_entries(job.request.prompt_ids, event.prompt_logprobs)
        if job.prompt_only:  # the token the engine chose is not shown nor counted (as vLLM's max_tokens 0)
            if event.finish is None:
                gen.finish(event.rid)
            del jobs[event.rid]
            job.done = True
            self._ended(job, "length")
            job.deliver(Chunk(job.index, "", "length", 0, [], prompt_logprobs=job.prompt_logprobs))
            return
        job.tokens += 1
        stats["completion_tokens"] += 1
        self.metrics.generated(None if job.last_token_at is None else now - job.last_token_at)
        job.last_token_at = now
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
            self._ended(job, finish)
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
