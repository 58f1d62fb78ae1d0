"""`internvl-mpo serve`: an OpenAI-compatible HTTP server over the generation engine.

Endpoints: `POST /v1/chat/completions` (plain or `stream: true` server-sent events in OpenAI's
`chat.completion.chunk` format, ending with `data: [DONE]`), `POST /v1/completions` (raw text or token
ids in, no chat template, as vLLM serves a chat model; `text_completion` objects and chunks),
`GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /metrics` (Prometheus text, vLLM's metric names), and
vLLM's `POST /tokenize` (a prompt, or messages with their image tokens, as the endpoints above would prefill
them) and `POST /detokenize`.

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
where vLLM clamps it, and at most `requests.MAX_LOGIT_BIAS_ENTRIES` tokens are taken.

Prompt log-probabilities as vLLM gives them: on /v1/completions `echo` with `logprobs` prepends the prompt's
tokens to the answer's in `logprobs` (the first prompt token's log-probability and alternatives are null),
and `max_tokens: 0` (only with `echo`) returns the prompt alone, generating nothing; vLLM's `prompt_logprobs`
extra (not with a stream) adds per prompt token a {token id: {logprob, rank, decoded_token}} map to each
completion choice, or to the chat response. Every choice carries vLLM's `stop_reason`: the stop string or
stop token id that ended it, null for the end-of-turn token or a length cut.

As in vLLM, one model is served under one name (`--served-model-name`, by default `--model` as given,
or `internvl-mpo-demo` for the shipped demo model): /v1/models lists it, responses carry it, and a
request that names another model gets a 404 (one that names none is served).

The modules, each using only those before it: `settings` (ServerSettings, the flags), `requests` (bodies parsed and
checked; ApiError, the error body), `media` (the bytes behind image and video URLs), `prompts` (prompt ids, images
tiled, the token limits), `metrics` (what the worker counts, as Prometheus text), `worker` (the thread that owns
the model and its batch), `app` (the FastAPI routes and their response bodies) and `runner` (`serve`: the flags
checked, uvicorn and its HTTP protocol).
"""

from .runner import serve
from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]


def __getattr__(name: str):
    # The app (torch and the web stack) loads on first use, so `internvl-mpo serve --help` and the flag errors of
    # `serve` come before torch is imported.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
