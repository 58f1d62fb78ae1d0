"""The generation engine: prefill on spliced embeddings, then token-by-token decode on a static cache.

It works on token ids and tensors only (no chat roles, no HTTP, no text). A `Generation` holds up
to `max_batch` sequences in the rows of one static KV cache. Requests may be added at any time
(continuous batching: they are prefilled and join the running batch between decode steps) and
finished from outside (a stop string matched, a client went away). Active rows are kept packed at
the front of the cache, so a finished sequence stops costing compute at once: the last active row
moves into its place. Each `step()` returns the tokens produced by that step, so one iterator serves
streaming, the CLI, the server and the tests. A request whose prefill fails, fails alone: `step()`
reports it as an "error" event (iterating raises it) and the other rows go on. Requests with the same
prompt and images that join in one step (the n choices of a server request, several samples of one
question) are prefilled once: the others copy its cache slots and its last hidden state. A request may
also ask for its prompt's log-probabilities (`Request.prompt_logprobs`): they come from the prefill's
hidden states, through the head a chunk of positions at a time (PROMPT_CHUNK_ELEMENTS logits at most),
with the request's first Event. A row under
its `min_new_tokens` has its stop ids' logits set to -inf where its token is chosen (a mask kept on the
device per row, applied only while some row needs it: no host sync), as transformers'
MinNewTokensLengthLogitsProcessor does; a greedy screen's token stands unless it is a stop id of such
a row, which then takes the argmax of its masked full logits. A request's logit bias
(`SamplingParams.logit_bias`) is kept the same way, as a dense row added to that row's logits where its token
is chosen (after the stop-id mask, before the penalty, as vLLM orders them), and only while some row has one
(the rows are made by the batch's first biased request); a row with a bias takes the full head (the greedy
screen sees no logits). Log-probabilities stay the model's own, before the bias, as vLLM reports them by default.
A request in JSON mode (`SamplingParams.json_mode`) keeps a `JsonConstraint` (json_mode.py) in its row (one
with a `json_schema` a `SchemaConstraint`, json_schema.py; one with a `regex`, `choice` or `grammar` an
`AutomatonConstraint`, automaton.py, over its regex.py Regex or grammar.py Grammar): where its
token is chosen, its row's logits are -inf outside the constraint's mask, before everything else (stop-id mask,
bias, penalty, temperature, filters, greedy choice), and the constraint takes each token emitted; such a row takes
the full head. As vLLM applies a structured output's mask to the logits its log-probabilities come from, a
constrained row's log-probabilities are those of the masked logits (-inf outside the mask).

The decode step has static shapes for a given number of active rows and is free of host syncs and
graph breaks; `compile=True` wraps it in torch.compile ("reduce-overhead" on GPU, which asks for CUDA
graphs). CUDA graph trees replay a step only if every tensor it writes into is a static input, so a
compiled engine's Generation marks its mask and caches as static addresses (without guards: new
addresses make torch record again instead of compiling again; not run on a GPU here, the static inputs
are tested on the CPU). Graph trees keep every recording, and do not count those made for moved static
inputs towards their re-record limit, so a compiled engine keeps its Generations' mask and caches in
storages of its own (`_Storages`) that the next Generation reuses: a long chat session or a server that
starts fresh batches records once per shape, not once per turn; `Engine.release()` lets them go. It is compiled with symbolic sizes
(COMPILE_OPTIONS), so batches of other sizes and lengths reuse it instead of compiling again
(torch.compile stops after 8 recompiles, and every chat turn has a new length); `generate` rounds a
compiled batch's length up to 256 slots (fewer distinct shapes). Without compile, attention reads
only the filled part of the cache (rounded up to 256 slots).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import weakref
from dataclasses import dataclass, field

import torch

from ..errors import InputError, NumericsError, PromptTooLongError
from ..kv_cache import make_caches
from ..llm import few_rows_matmul, thread_count
from ..model import InternVL, check_tile_values
from . import cpu_forms
from .automaton import AutomatonConstraint
from .greedy_head import GreedyScreen
from .json_mode import JsonConstraint, JsonVocabulary
from .json_schema import SchemaConstraint
from .params import MAX_TOP_LOGPROBS, SamplingParams, whole_number
from .sampling import (
    apply_repetition_penalty, choose_tokens, exponential_noise, make_generator, race_among_top_k, with_temperature,
)

SPAN_BUCKET = 256
COMPILE_OPTIONS = {"fullgraph": True, "dynamic": True}
# The greedy screen (greedy_head.py) pays where the fp32 head no longer fits a CPU's last-level cache;
# its int8 copy adds a quarter of the head to memory, so heads above 2 GB (the family's from the 26B
# model on) go without it.
SCREEN_MIN_BYTES = 32 << 20
SCREEN_MAX_BYTES = 2 << 30
PROMPT_CHUNK_ELEMENTS = 1 << 24  # logits held at once for prompt log-probabilities (64 MiB in fp32)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    pixel_values: torch.Tensor | None = None  # the tiles of this prompt's images, in placeholder order
    vit_embeds: torch.Tensor | None = None  # or their precomputed image embeddings
    # Report each token's log-probability under the model (before logit bias, penalty, temperature, filters;
    # after JSON mode's mask) and this many of the most likely tokens with theirs (0-20); None: do not.
    logprobs: int | None = None
    # Report each prompt token's log-probability under the model given the tokens before it (the first
    # token has none), its rank, and this many of the most likely tokens at its position (0-20); None: do not.
    prompt_logprobs: int | None = None


# One prompt position's (log-probability of the prompt's token, its rank: 1 + how many tokens are at
# least as likely, other than itself, as vLLM counts it, ((token, log-probability), ...) best first).
PromptLogprob = tuple[float, int, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class Event:
    """One token produced for request `rid`; `finish` is "stop" or "length" on its last token. A
    request that failed (its prefill or a decode step raised, or its activations overflowed) gets one last
    Event with no token, finish "error" and the exception in `error`; `alone` tells a failure of the request's
    own (its prefill, its overflow) from a decode step that failed every running row. With `Request.logprobs`,
    the token's log-probability and the most likely (token, log-probability) pairs, best first. With
    `Request.prompt_logprobs`, the request's first Event carries one entry per prompt token (None for the first)."""

    rid: int
    token: int | None
    finish: str | None = None
    error: Exception | None = None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None
    alone: bool = False


@dataclass
class _Row:
    rid: int
    position: int  # position (= cache slot) of the next token to feed
    remaining: int
    stop_ids: frozenset[int]
    generator: torch.Generator | None
    pending: int  # the last sampled token, to be fed at the next decode step
    penalised: bool = False  # repetition_penalty != 1
    biased: bool = False  # has a logit bias
    plain: bool = False  # greedy, not penalised nor biased: only the argmax of the logits matters
    top_k: int = 0  # the row's sampling filters, on the host (their device copies are in Generation)
    top_p: float = 1.0
    logprobs: int | None = None  # Request.logprobs
    unstoppable: int = 0  # tokens still to come before a stop id may end the row (min_new_tokens)
    json: JsonConstraint | None = None  # its constraint's state (SchemaConstraint, AutomatonConstraint are ones)


class Engine:
    def __init__(self, model: InternVL, stop_token_ids: tuple[int, ...] = (), compile: bool = False,
                 screen: bool | None = None, tokenizer=None, time_cpu_forms: bool = True):
        """`screen`: choose greedy tokens through the int8 screen of the head (greedy_head.py); None
        uses it for fp32 CPU heads between SCREEN_MIN_BYTES and SCREEN_MAX_BYTES, True wherever it
        can run, False never. `tokenizer` (a chat.tokenizer.Tokenizer): the tokens' bytes, which JSON mode
        needs; its index is built on the first request in JSON mode. `time_cpu_forms`: keep the few-row
        forms of the decoder's large fp32 CPU weights only where they time faster than F.linear on this
        CPU (cpu_forms.py: once per weight shape and process); False turns them all on."""
        self.model = model.eval()
        self.stop_token_ids = tuple(stop_token_ids)
        self.tokenizer = tokenizer
        self._json_vocabulary: JsonVocabulary | None = None
        self.context = model.config.llm.max_position_embeddings
        self.compiled = compile
        self.screen = screen
        self._screen: GreedyScreen | None = None
        self._screen_key = None
        self.head_forms = cpu_forms.tune(model.language_model, timed=time_cpu_forms)
        self._decode_fn = self._decode
        self._storages = _Storages()
        if compile:
            torch.compiler.assume_constant_result(thread_count)  # dynamo cannot trace it otherwise
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self._decode_fn = _without_duck_sizing(torch.compile(self._decode, mode=mode, **COMPILE_OPTIONS))

    def start(self, max_batch: int, max_len: int) -> "Generation":
        """An empty batch of `max_batch` rows, each holding up to `max_len` tokens (at most the context)."""
        if not (whole_number(max_batch) and whole_number(max_len) and max_batch >= 1 and max_len >= 2):
            raise InputError(f"a batch needs at least 1 row and 2 slots, got {max_batch} rows of {max_len}")
        return Generation(self, max_batch, min(max_len, self.context))

    def generate(self, requests: list[Request]) -> "Generation":
        """A Generation over all `requests` at once, sized to fit them: the longest prompt + max_new_tokens,
        at most the context (see `start`). Every request is checked before the cache is allocated."""
        if not requests:
            raise InputError("no requests to generate for")
        for request in requests:  # before the cache is allocated
            self.check(request, self.context)
        longest = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests)
        if self.compiled:  # fewer distinct shapes (CUDA graphs record one per shape)
            longest = -(-longest // SPAN_BUCKET) * SPAN_BUCKET
        gen = self.start(len(requests), longest)
        for request in requests:
            gen._queue(request)  # checked above, and it fits: the batch holds the longest prompt + its new tokens
        return gen

    def release(self) -> None:
        """Let go of the storages a compiled engine keeps for its next Generation (the largest mask and KV
        cache so far): they are freed once no living Generation uses them. The next compiled Generation
        allocates buffers of its own size, which CUDA graphs record anew. An eager engine keeps none."""
        self._storages = _Storages()

    def check(self, request: Request, max_len: int) -> None:
        """Refuse a request that a batch of `max_len` slots cannot run: an empty prompt, one of `max_len`
        tokens or more, ids outside the vocabulary (prompt, stop or bias ids), log-probability counts out of range,
        pixel_values that are no normalised tiles (`check_tile_values`)."""
        n = len(request.prompt_ids)
        if n == 0:
            raise InputError("the prompt is empty")
        if n >= max_len:
            raise PromptTooLongError(f"the prompt is {n} tokens; this batch holds at most {max_len - 1} prompt tokens")
        vocab = self.model.config.llm.vocab_size
        ids = request.prompt_ids
        # plain ints in range, checked in C (a Python test per id cost 0.17 ms at 300 ids); else id by id
        if not (set(map(type, ids)) == {int} and 0 <= min(ids) and max(ids) < vocab):
            if bad := [i for i in ids if not (whole_number(i) and 0 <= i < vocab)]:
                raise InputError(f"prompt token ids must be whole numbers in 0..{vocab - 1}, got {bad[:5]}")
        if request.pixel_values is not None:
            check_tile_values(request.pixel_values)
        if bad := [i for i in request.params.stop_token_ids if not 0 <= i < vocab]:  # they could never stop it
            raise InputError(f"stop_token_ids must be in 0..{vocab - 1}, got {bad[:5]}")
        if bad := [i for i, _ in request.params.logit_bias if not 0 <= i < vocab]:
            raise InputError(f"logit_bias token ids must be in 0..{vocab - 1}, got {bad[:5]}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(request, name)
            if value is not None and not (whole_number(value) and 0 <= value <= MAX_TOP_LOGPROBS):
                raise InputError(f"{name} must be a whole number in 0..{MAX_TOP_LOGPROBS}, got {value!r}")
        p = request.params
        if name := p.constrained_by:
            if self.tokenizer is None:
                raise InputError(f"{name} needs the tokens' bytes: give the Engine its tokenizer")
            if not (p.stop_token_ids or self.stop_token_ids):  # SamplingParams refuses ignore_eos without them
                what = "the JSON is complete" if name.startswith("json") else "its text is accepted"
                raise InputError(f"{name} ends the answer with a stop token once {what}: give stop_token_ids (this "
                                 "Engine has no end-of-turn token ids)")

    def json_vocabulary(self) -> JsonVocabulary:
        """The tokenizer's JsonVocabulary, built on first use (about a second for a Qwen2 vocabulary)."""
        if self._json_vocabulary is None:
            self._json_vocabulary = JsonVocabulary.of_tokenizer(self.tokenizer, self.model.config.llm.vocab_size)
        return self._json_vocabulary

    def greedy_screen(self) -> GreedyScreen | None:
        """The head's greedy screen, built on first use and again when the head's weights change;
        None where it does not apply."""
        weight = self.model.language_model.output_head().weight
        key = (weight.data_ptr(), weight._version)
        if key != self._screen_key:
            use = self.screen if self.screen is not None else SCREEN_MIN_BYTES <= weight.nbytes <= SCREEN_MAX_BYTES
            with torch.no_grad():
                self._screen = GreedyScreen.build(weight) if use else None
            self._screen_key = key
        return self._screen

    @torch.no_grad()
    def prefill(self, request: Request, caches, row: int) -> torch.Tensor:
        """Run one prompt into cache row `row`; return the final hidden states (1, T, C) of its positions."""
        model = self.model
        ids = torch.tensor([[int(i) for i in request.prompt_ids]], device=model.device)  # NumPy ids: no slow path
        pixels = None if request.pixel_values is None else request.pixel_values.to(model.device, model.dtype)
        vit_embeds = None if request.vit_embeds is None else request.vit_embeds.to(model.device)  # as pixel_values
        embeds = model.embed(ids, pixels, vit_embeds=vit_embeds)
        positions = torch.arange(ids.shape[1], device=model.device)[None]
        lm = model.language_model
        return lm.model(embeds, positions, None, [c.prefill_row(row) for c in caches], None)

    @torch.no_grad()
    def prompt_logprobs(self, hidden: torch.Tensor, prompt_ids: list[int], k: int) -> tuple[PromptLogprob | None, ...]:
        """Each prompt token's PromptLogprob (None for the first) from the prefill's hidden states (T, C):
        position t's logits score token t + 1. The logits are computed PROMPT_CHUNK_ELEMENTS at a time."""
        head = self.model.language_model.output_head()
        rows = max(1, PROMPT_CHUNK_ELEMENTS // head.weight.shape[0])
        targets = torch.tensor(prompt_ids[1:], device=hidden.device)
        out: list[PromptLogprob | None] = [None]
        for start in range(0, len(targets), rows):
            logp = torch.log_softmax(head_logits(head, hidden[start : start + rows], self.head_forms), dim=-1)
            chosen = logp.gather(1, targets[start : start + rows, None])  # (t, 1)
            ranks = (logp >= chosen).sum(-1).tolist()  # vLLM's rank: ties count against the token
            best = logp.topk(k, dim=-1)
            ids, values = best.indices.tolist(), best.values.tolist()
            out += [(value, rank, tuple(zip(i, v)))
                    for value, rank, i, v in zip(chosen[:, 0].tolist(), ranks, ids, values)]
        return tuple(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits (B, V) of final hidden states (B, C)."""
        return head_logits(self.model.language_model.output_head(), hidden, self.head_forms)

    def _decode(self, tokens, positions, key_mask, caches, rows: int, span: int, screen: GreedyScreen | None = None):
        """One token per active row -> fp32 logits (rows, V); with a `screen`, its outputs (tokens, ok flags,
        upper ends, best logits) and the hidden states (rows, C) instead; then whether each row's hidden state
        is finite. Static shapes, no host sync."""
        lm = self.model.language_model
        key_mask[:rows].scatter_(1, positions[:, None], 0.0)
        mask = key_mask[:rows, None, None, :span]  # additive, as SDPA would turn a boolean mask into
        embeds = lm.input_embeddings()(tokens[:, None])
        views = [c.decode_view(rows, span) for c in caches]
        hidden = lm.model(embeds, positions[:, None], mask, views, positions)[:, 0]
        finite = torch.isfinite(hidden).all(-1)  # (rows,): read with the tokens, no sync of its own
        if screen is not None:
            return *screen(hidden), hidden, finite
        return head_logits(lm.output_head(), hidden, self.head_forms), finite


def _same_prompt(a: Request, b: Request) -> bool:
    """Whether two requests put the same tokens and image features into the cache."""
    def same(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
        return x is y or (x is not None and y is not None and x.shape == y.shape and x.device == y.device
                          and torch.equal(x, y))

    return (list(a.prompt_ids) == list(b.prompt_ids)  # as lists: NumPy arrays compare elementwise
            and same(a.pixel_values, b.pixel_values) and same(a.vit_embeds, b.vit_embeds))


def _without_duck_sizing(compiled):
    """`compiled`, traced without duck sizing, one thread at a time. With duck sizing, sizes equal when a graph is
    traced share one symbol and the graph is guarded on their equality: a first batch whose rows number the KV heads
    (2 in InternVL2.5-4B), or fill its cache rows (every `generate`), compiled the step again at the next batch size
    or finished row. The setting is a context variable, as the `dynamic=True` that torch.compile sets on each call:
    other threads and compiles keep theirs. Two threads in the compiled step at once (chats of one InternVLChat
    from a web app's threads) sometimes raised "torch.compile with fullgraph=True found no compiled frames": they
    take turns, a step each."""
    from torch.fx.experimental import _config

    patch = _config._make_closure_patcher(use_duck_shape=False)
    lock = threading.Lock()

    def decode(*args):
        with lock:
            revert = patch()
            try:
                return compiled(*args)
            finally:
                revert()

    return decode


def head_logits(head: torch.nn.Linear, hidden: torch.Tensor, forms: tuple[bool, bool]) -> torch.Tensor:
    """fp32 logits (B, V) of a few rows of hidden states; a few rows on the CPU go through `few_rows_matmul`
    with `forms` (one_row, more_rows)."""
    logits = few_rows_matmul(hidden, head.weight, None, *forms)
    return (head(hidden) if logits is None else logits).float()


class _Storages:
    """The storages a compiled engine's Generations take their cache and mask buffers from, kept from one
    Generation to the next so that every Generation of one shape gives the decode step the same addresses
    (CUDA graph trees record again for each new address of a static input; see the module's docstring).
    Buffer i of a Generation is the start of storage i, filled anew; a storage is replaced, and so moves, only
    when a larger Generation needs more. One Generation at a time: while the last taker lives (a stream not
    read to its end, a server's batch), another gets buffers of its own and never sees the taker's."""

    def __init__(self):
        self._storages: list[torch.Tensor | None] = []
        self._taker: weakref.ref | None = None
        self._lock = threading.Lock()  # two threads starting Generations at once both took the storages

    def take(self, generation: "Generation"):
        """A `torch.full` for `generation` to make its buffers with, in the same order every time."""
        with self._lock:
            if self._taker is not None and self._taker() is not None:
                return torch.full
            self._taker = weakref.ref(generation)
        index = itertools.count()

        def full(shape, value, dtype, device):
            i = next(index)
            if i == len(self._storages):
                self._storages.append(None)
            size = math.prod(shape)
            storage = self._storages[i]
            if storage is None or storage.numel() < size or storage.dtype != dtype or storage.device != device:
                self._storages[i] = None  # freed before the larger one is made
                self._storages[i] = storage = torch.empty(size, dtype=dtype, device=device)
            # a tensor of its own over the storage, not a view: torch.compile would guard on a view's base size
            return torch.empty(0, dtype=dtype, device=device).set_(storage.untyped_storage(), 0, shape).fill_(value)

        return full


class Generation:
    """A running batch. `add` requests, then iterate: each item is the list of Events of one step."""

    # Its buffers are ordinary tensors even when made under torch.inference_mode(): a stream made there may be
    # read outside it (a handler that returns it, another thread: the mode is thread-local), where writing
    # into an inference tensor is refused.
    @torch.inference_mode(False)
    @torch.no_grad()
    def __init__(self, engine: Engine, max_batch: int, max_len: int):
        model = engine.model
        self.engine = engine
        self.max_batch, self.max_len = max_batch, max_len
        device = model.device
        layer_devices = [next(layer.parameters()).device for layer in model.language_model.model.layers]
        # the decoder's dtype (model.dtype is the projector's: towers cast to different dtypes differ from it)
        llm_dtype = model.language_model.input_embeddings().weight.dtype
        full = engine._storages.take(self) if engine.compiled else torch.full
        self.caches = make_caches(model.config.llm, max_batch, max_len, llm_dtype, layer_devices,
                                  zeros=lambda shape, dtype, device: full(shape, 0, dtype=dtype, device=device))
        vocab = model.config.llm.vocab_size
        # Attention mask over cache slots, additive: 0 where a row's key is written, -inf elsewhere.
        self.key_mask = full((max_batch, max_len), -torch.inf, dtype=llm_dtype, device=device)
        if engine.compiled:  # the decode step writes into these (see the module's docstring)
            for buffer in [self.key_mask] + [t for c in self.caches for t in (c.k, c.v)]:
                torch._dynamo.mark_static_address(buffer, guard=False)
        self.seen = torch.zeros(max_batch, vocab, dtype=torch.bool, device=device)
        self.greedy = torch.ones(max_batch, dtype=torch.bool, device=device)
        self.temperature = torch.ones(max_batch, device=device)
        self.top_k = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.top_p = torch.ones(max_batch, dtype=torch.float64, device=device)  # exact, as filter_top_k_top_p wants
        self.penalty = torch.ones(max_batch, device=device)
        # The stop ids of each row still under its min_new_tokens, whose logits are set to -inf
        # (transformers' MinNewTokensLengthLogitsProcessor); cleared when the row reaches its minimum.
        self.banned = torch.zeros(max_batch, vocab, dtype=torch.bool, device=device)
        self.bias: torch.Tensor | None = None  # each row's logit bias, dense: made by the first request with one
        self.rows: list[_Row] = []
        self.fallbacks = 0  # greedy tokens the screen left to the full head
        self.widened = 0  # greedy tokens whose screen check failed, settled by the blocks within reach
        self.waiting: list[tuple[int, Request]] = []
        self._ids = itertools.count()
        self._cancelled: set[int] = set()

    # ---- requests -------------------------------------------------------------------------

    def add(self, request: Request) -> int:
        """Queue a request; it joins the batch at the next step with a free row. Returns its id."""
        self.engine.check(request, self.max_len)
        return self._queue(request)

    def _queue(self, request: Request) -> int:
        """Queue a request already checked against this batch (`add`, `Engine.generate`)."""
        rid = next(self._ids)
        self.waiting.append((rid, request))
        return rid

    def finish(self, rid: int) -> None:
        """Stop request `rid` now (stop string, disconnected client); its row is freed."""
        self._cancelled.add(rid)

    @property
    def active(self) -> int:
        return len(self.rows)

    def __bool__(self) -> bool:
        return bool(self.rows or self.waiting)

    def __iter__(self):
        """Steps until every request has finished; a failed request raises its error here."""
        while self:
            events = self.step()
            for event in events:
                if event.error is not None:
                    raise event.error
            yield events

    # ---- one step -------------------------------------------------------------------------

    @torch.inference_mode(False)  # writes into the buffers made in __init__, whatever mode the reader is in
    @torch.no_grad()  # inside: inference_mode(False) turns gradients on
    def step(self) -> list[Event]:
        """Admit waiting requests into free rows, then decode one token for every active row. Failures
        come back as "error" Events: a prefill that raises fails its own request, a decode step that
        raises fails the rows it ran; the batch stays usable either way."""
        events: list[Event] = []
        self._drop_cancelled()
        prefilled: list[tuple] = []  # this step's prompts: request, rid, last hidden state, prompt logprobs
        # rows whose first token ended them: freed after this step's admissions, so that a twin admitted after one
        # (the n choices of a max_tokens 1 request) still finds its cache slots to copy
        ended: list[int] = []
        while self.waiting and len(self.rows) < self.max_batch:
            rid, request = self.waiting.pop(0)
            try:
                events += self._admit(rid, request, prefilled, ended)
            except Exception as e:
                if self.rows and self.rows[-1].rid == rid:
                    self.rows.pop()
                self._clear(len(self.rows), len(request.prompt_ids))  # what its prefill may have written
                events.append(Event(rid, None, "error", e, alone=True))
        for rid in ended:
            self._release(rid)
        if not self.rows:
            return events
        try:
            chosen, logprobs, finite = self._decode_step()
        except Exception as e:
            events += [Event(row.rid, None, "error", e) for row in self.rows]
            for index, row in enumerate(self.rows):
                self._clear(index, row.position + 1)
            self.rows.clear()
            return events
        for row in self.rows:
            row.position += 1
        events += self._emit(chosen, logprobs=logprobs, finite=finite)
        return events

    def _decode_step(self) -> tuple[list[int], list | None, list[bool]]:
        n = len(self.rows)
        tokens = torch.tensor([r.pending for r in self.rows], device=self.key_mask.device)
        positions = torch.tensor([r.position for r in self.rows], device=self.key_mask.device)
        span = self.max_len
        if not self.engine.compiled:
            span = min(self.max_len, -(-(max(r.position for r in self.rows) + 1) // SPAN_BUCKET) * SPAN_BUCKET)
        screen = self.engine.greedy_screen() if all(r.plain for r in self.rows) else None
        *out, finite = self.engine._decode_fn(tokens, positions, self.key_mask, self.caches, n, span, screen)
        if screen is not None:
            chosen, logprobs = self._screened(*out), None
        else:
            logits = self._constrain(out[0], slice(0, n))
            chosen = self._choose(logits, slice(0, n))
            logprobs = self._logprobs(logits, chosen, slice(0, n))
        # after the tokens' read: the device has finished the step, so this read waits for nothing
        return chosen, logprobs, finite.tolist()

    def _admit(self, rid: int, request: Request, prefilled: list[tuple], ended: list[int]) -> list[Event]:
        """Prefill `request` into the next row, or copy the cache slots (and prompt log-probabilities) of a
        request with the same prompt and images admitted in this step (the n choices of one server
        request, repeated questions). If its first token ends it, its id goes to `ended`: the caller frees its
        row."""
        p = request.params
        row = len(self.rows)
        n = len(request.prompt_ids)
        rows = {r.rid: i for i, r in enumerate(self.rows)}
        twin = next(((rows[other_rid], hidden, prompt) for other, other_rid, hidden, prompt in prefilled
                     if other_rid in rows and _same_prompt(other, request)
                     and request.prompt_logprobs in (None, other.prompt_logprobs)), None)
        if twin is not None:
            for cache in self.caches:
                cache.move_row(twin[0], row, n)
            hidden, prompt = twin[1], twin[2] if request.prompt_logprobs is not None else None
        else:
            states = self.engine.prefill(request, self.caches, row)  # (1, T, C)
            prompt = None
            if request.prompt_logprobs is not None:
                prompt = self.engine.prompt_logprobs(states[0, :-1], request.prompt_ids, request.prompt_logprobs)
            hidden = states[:, -1]
            if not bool(torch.isfinite(hidden).all()):  # argmax of NaN logits is token 0 ("!!!!"): an error instead
                raise self._overflowed("on this prompt")
            prefilled.append((request, rid, hidden, prompt))
        self.key_mask[row] = -torch.inf
        self.key_mask[row, :n] = 0.0
        self.seen[row] = False
        self.greedy[row] = p.greedy
        self.temperature[row] = p.temperature if p.temperature > 0 else 1.0
        self.top_k[row] = p.top_k
        self.top_p[row] = p.top_p
        self.penalty[row] = p.repetition_penalty
        # ignore_eos drops the engine's end-of-turn ids only; the request's own stop ids still stop it
        stops = frozenset((() if p.ignore_eos else self.engine.stop_token_ids) + tuple(p.stop_token_ids))
        self.banned[row] = False
        if p.min_new_tokens:  # ids outside the vocabulary are never chosen anyway
            self.banned[row, [i for i in sorted(stops) if 0 <= i < self.banned.shape[1]]] = True
        if self.bias is not None:
            self.bias[row] = 0.0
        if p.logit_bias:
            if self.bias is None:  # most batches have none: (max_batch, vocab) fp32 is 4.9 MB at 8 rows of InternVL's
                self.bias = torch.zeros(self.banned.shape, device=self.banned.device)
            ids, values = zip(*p.logit_bias)
            self.bias[row, list(ids)] = torch.tensor(values, device=self.bias.device)
        generator = None if p.greedy else make_generator(p.seed, hidden.device)
        remaining = min(p.max_new_tokens, self.max_len - n)
        penalised, biased = p.repetition_penalty != 1.0, bool(p.logit_bias)
        constraint = JsonConstraint(self.engine.json_vocabulary()) if p.json_mode else \
            SchemaConstraint(self.engine.json_vocabulary(), p.json_schema) if p.json_schema is not None else \
            AutomatonConstraint(self.engine.json_vocabulary(), p.guide) if p.guide is not None else None
        # the screen has no logprobs, nor a constraint's mask
        plain = p.greedy and not penalised and not biased and request.logprobs is None and constraint is None
        self.rows.append(_Row(rid, n, remaining, stops, generator, -1, penalised, biased, plain, p.top_k, p.top_p,
                              request.logprobs, p.min_new_tokens if stops else 0, constraint))
        screen = self.engine.greedy_screen() if plain else None
        if screen is not None:
            events = self._emit(self._screened(*screen(hidden), hidden, first=row), first=row, ended=ended)
        else:
            logits = self._constrain(self.engine.logits(hidden), slice(row, row + 1))
            token = self._choose(logits, slice(row, row + 1))
            events = self._emit(token, first=row, logprobs=self._logprobs(logits, token, slice(row, row + 1)),
                                ended=ended)
        if prompt is not None:
            events[0] = dataclasses.replace(events[0], prompt_logprobs=prompt)
        return events

    def _screened(self, tokens: torch.Tensor, ok: torch.Tensor, ends: torch.Tensor, best: torch.Tensor,
                  hidden: torch.Tensor, first: int = 0) -> list[int]:
        """Greedy tokens of the screen for rows first.. (its outputs, then the hidden states); a row whose check
        failed takes the screen's `widen`; where that has none, and for rows under their min_new_tokens that
        it gave a stop id, the argmax of the full logits (stop ids masked). Any other token of the screen is
        also the argmax with the stop ids masked."""
        tokens, ok = tokens.tolist(), ok.tolist()
        for i, good in enumerate(ok):
            row = self.rows[first + i]
            if not good:
                tokens[i] = self.engine.greedy_screen().widen(hidden[i : i + 1], ends[i], best[i])
                self.widened += tokens[i] is not None
            if tokens[i] is None or (row.unstoppable > 0 and tokens[i] in row.stop_ids):
                logits = self.engine.logits(hidden[i : i + 1])
                if row.unstoppable > 0:
                    logits = logits.masked_fill(self.banned[first + i], -torch.inf)
                tokens[i] = int(logits.argmax())
                self.fallbacks += 1
        return tokens

    def _constrain(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """`logits` of rows `rows`, -inf outside the mask of each row in JSON mode (a new tensor; `logits`
        itself where no row is)."""
        constrained = [(i, r.json.allowed(r.stop_ids)) for i, r in enumerate(self.rows[rows]) if r.json is not None]
        if not constrained:
            return logits
        allowed = torch.ones(logits.shape, dtype=torch.bool)
        for i, mask in constrained:
            allowed[i] = torch.from_numpy(mask)
        return logits.masked_fill(~allowed.to(logits.device), -torch.inf)

    def _choose(self, logits: torch.Tensor, rows: slice) -> list[int]:
        if any(r.unstoppable > 0 for r in self.rows[rows]):  # decided on the host: no device sync
            logits = logits.masked_fill(self.banned[rows], -torch.inf)
        if any(r.biased for r in self.rows[rows]):  # a new tensor: `logits` stay raw for the log-probabilities
            logits = logits + self.bias[rows]
        penalised = any(r.penalised for r in self.rows[rows])  # decided on the host: no device sync
        if penalised:
            logits = apply_repetition_penalty(logits, self.seen[rows], self.penalty[rows])
        active = self.rows[rows]
        raced = {}
        # Top-k alone on the CPU (the model card's default): the race among the kept tokens, k draws a row, not V.
        # On a GPU the whole vocabulary's draws cost little, and this would sync the host once a row.
        if logits.device.type == "cpu" and (fast := [i for i, r in enumerate(active) if r.generator is not None
                                                     and r.top_k > 0 and r.top_p >= 1]):
            scaled = with_temperature(logits[fast], self.temperature[rows][fast])
            drawn = race_among_top_k(scaled, [active[i].top_k for i in fast], [active[i].generator for i in fast])
            raced = {i: token for i, token in zip(fast, drawn) if token is not None}
        generators = [None if i in raced else r.generator for i, r in enumerate(active)]
        noise, largest_k, nucleus = None, 0, False
        sampled = [r for r, g in zip(active, generators) if g is not None]
        if sampled:
            noise = exponential_noise(generators, logits.shape[-1], logits.device)
            # Known on the host, so top-k alone skips sorting the vocabulary (see filter_top_k_top_p).
            largest_k, nucleus = max(r.top_k for r in sampled), any(r.top_p < 1 for r in sampled)
        tokens = choose_tokens(  # raced rows draw no noise here (ones): their argmax is replaced below
            logits, self.greedy[rows], self.temperature[rows], self.top_k[rows], self.top_p[rows], noise,
            largest_k, nucleus,
        )
        if raced:
            tokens[list(raced)] = torch.tensor(list(raced.values()), device=tokens.device)
        if penalised:  # `seen` serves the penalty only, and a penalised row is in every step it lives
            self.seen[rows].scatter_(1, tokens[:, None], True)
        return tokens.tolist()

    def _logprobs(self, logits: torch.Tensor, tokens: list[int], rows: slice) -> list | None:
        """(log-probability, top pairs) of each chosen token for rows that asked (None for the others),
        from the raw logits; None when no row asked."""
        wanted = [r.logprobs for r in self.rows[rows]]
        if all(k is None for k in wanted):
            return None
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
        tops: dict[int, tuple] = {}
        for k in {w for w in wanted if w}:
            # one topk per count asked, over the rows asking it: torch orders tied values (the -inf of a
            # constrained row's masked tokens) differently for another k, so one topk with the largest k, cut to
            # each row's, let neighbours change a row's list
            rows_k = [i for i, w in enumerate(wanted) if w == k]
            best = logp[rows_k].topk(k, dim=-1)
            tops |= {i: tuple(zip(ids, values))
                     for i, ids, values in zip(rows_k, best.indices.tolist(), best.values.tolist())}
        return [None if w is None else (chosen[i], tops.get(i, ())) for i, w in enumerate(wanted)]

    def _emit(self, tokens: list[int], first: int = 0, logprobs: list | None = None,
              ended: list[int] | None = None, finite: list[bool] | None = None) -> list[Event]:
        """Record sampled tokens for rows first.., report them, and retire finished rows (or list them in
        `ended`). A row whose hidden state was not `finite` fails with a NumericsError instead."""
        events, done = [], []
        for offset, token in enumerate(tokens):
            row = self.rows[first + offset]
            if finite is not None and not finite[offset]:
                events.append(Event(row.rid, None, "error", self._overflowed("during the answer"), alone=True))
                done.append(row.rid)
                continue
            row.remaining -= 1
            row.pending = token
            if row.json is not None and token not in row.stop_ids:
                row.json.advance(token)
            if row.unstoppable > 0:
                row.unstoppable -= 1
                if row.unstoppable == 0:
                    self.banned[first + offset] = False
            extra = {}
            if logprobs is not None and logprobs[offset] is not None:
                extra = {"logprob": logprobs[offset][0], "top_logprobs": logprobs[offset][1]}
            if token in row.stop_ids:
                events.append(Event(row.rid, token, "stop", **extra))
                done.append(row.rid)
            elif row.remaining <= 0:
                events.append(Event(row.rid, token, "length", **extra))
                done.append(row.rid)
            else:
                events.append(Event(row.rid, token, **extra))
        if ended is not None:
            ended += done
            return events
        for rid in done:
            self._release(rid)
        return events

    def _overflowed(self, where: str) -> NumericsError:
        """The error of a row whose activations overflowed `where` (the argmax of its NaN logits would be token 0,
        "!!!!" for Qwen2.5)."""
        dtype = self.key_mask.dtype  # the decoder's
        fix = ": load it in bfloat16 or float32" if dtype == torch.float16 else ""
        return NumericsError(f"the model's activations overflowed to NaN or inf {where} (weights in "
                             f"{str(dtype).removeprefix('torch.')}{fix}); its answer would be garbage")

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        self.waiting = [(rid, r) for rid, r in self.waiting if rid not in self._cancelled]
        for rid in list(self._cancelled):
            if any(r.rid == rid for r in self.rows):
                self._release(rid)
        self._cancelled.clear()

    def _release(self, rid: int) -> None:
        """Free the row of `rid`: the last active row moves into its place, keeping rows packed. Every
        slot outside the active sequences stays zero (see KVCache.clear_row)."""
        index = next(i for i, r in enumerate(self.rows) if r.rid == rid)
        last = len(self.rows) - 1
        self._clear(index, self.rows[index].position + 1)
        if index != last:
            extent = self.rows[last].position + 1  # the slots the moving row has written
            for cache in self.caches:
                cache.move_row(last, index, extent)
            self._clear(last, extent)
            for state in (self.key_mask, self.seen, self.greedy, self.temperature, self.top_k, self.top_p,
                          self.penalty, self.banned, self.bias):
                if state is not None:
                    state[index] = state[last]
            self.rows[index] = self.rows[last]
        self.rows.pop()

    def _clear(self, row: int, length: int) -> None:
        for cache in self.caches:
            cache.clear_row(row, length)
