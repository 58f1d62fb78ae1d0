"""Next-token choice: logit bias, greedy, temperature, top-k, top-p and repetition penalty, per batch row.

Follows the order and semantics of transformers' logits processors, as used by the official
`chat()` (which calls the inner language model's `generate`): a request's logit bias first (OpenAI's
`logit_bias`, added where vLLM adds it: before the penalties and everything after them), then
repetition penalty (over the tokens generated so far: the official call passes embeddings, so the
prompt ids are not seen), then temperature, top-k, top-p (drop the tokens whose cumulative
probability from the least likely up is <= 1 - top_p, always keeping the most likely). Sampling draws
with the exponential-race trick (argmax of p / Exp(1) noise), which needs no host sync; each row has
its own torch.Generator, so a seeded request draws the same noise alone or batched with others (its
logits may still round differently with the batch's size: see the README).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import InputError, SettingError
from .grammar import Grammar, compile_grammar
from .json_schema import Schema, compile_schema
from .regex import Regex, RegexError, choice_pattern, compile_regex


# transformers takes any penalty > 0, but a positive logit divided by one below ~1e-37 (and then by the
# temperature) overflows fp32 to inf and sampling gives NaN; from 1e-6 up, logits up to 1e4 divided by
# it and by the smallest temperature (1e-5) stay below 1e16, and a repeat is already all but certain.
MIN_REPETITION_PENALTY = 1e-6
MAX_LOGIT_BIAS = 100  # OpenAI's range for a bias, -100..100: -100 bans a token in practice, 100 forces it


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are transformers' (greedy; top_k 50 when sampling) with the card's max_new_tokens;
    `chat()` samples by default, as the card's quick start does (pipeline.CARD_DEFAULTS)."""

    max_new_tokens: int = 1024
    # The stop token ids cannot end the answer before this many new tokens (transformers'
    # min_new_tokens, vLLM's min_tokens); stop strings count only in the text after them (vLLM).
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    # (token id, bias) pairs, or a {token id: bias} dict: the bias is added to the token's logit before
    # the penalty, temperature, filters and greedy choice (OpenAI's logit_bias); kept as sorted pairs.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # JSON mode: the answer is held to one JSON object (generate/json_mode.py), ended by a stop token once complete
    json_mode: bool = False
    # JSON schema mode: the answer is held to one JSON value the schema takes (generate/json_schema.py); given as a
    # dict, True/False or a Pydantic model, kept as its compiled Schema
    json_schema: Schema | None = None
    # Guided decoding (generate/regex.py): the answer's whole text matches this regex (as Python's re.fullmatch), or
    # is exactly one of these strings (`choice`); a stop token may end it only where its text is accepted
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    # Grammar-guided decoding (generate/grammar.py): the answer's whole text is a sentence of this GBNF grammar's root
    grammar: str | None = None

    def __post_init__(self):
        for name in ("max_new_tokens", "min_new_tokens", "top_k") + (("seed",) if self.seed is not None else ()):
            if not whole_number(getattr(self, name)):
                raise SettingError("", name, f" must be a whole number, got {getattr(self, name)!r}")
            object.__setattr__(self, name, int(getattr(self, name)))  # numpy.int64: torch's manual_seed refuses it
        for name in ("do_sample", "ignore_eos", "json_mode"):  # a string such as "False" would read as true
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)):
                raise SettingError("", name, f" must be a finite number, got {value!r}")
        if not (isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) for s in self.stop)):
            raise InputError(f"stop must be a list of strings, got {self.stop!r}")
        if "" in self.stop:  # it would never stop the answer; vLLM refuses it too
            raise InputError("stop strings must not be empty")
        if not (isinstance(self.stop_token_ids, (tuple, list)) and all(map(whole_number, self.stop_token_ids))):
            raise InputError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        object.__setattr__(self, "logit_bias", checked_logit_bias(self.logit_bias))
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise SettingError("", "seed", f" must be in [0, 2**63), got {self.seed}")
        if not 0 <= self.top_k < 2**31:
            raise SettingError("", "top_k", f" must be in [0, 2**31) (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise SettingError("", "max_new_tokens", f" must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise SettingError("", "min_new_tokens", " must be in 0..", "max_new_tokens",
                               f" ({self.max_new_tokens}), got {self.min_new_tokens}")
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", compile_schema(self.json_schema))
        if self.regex is not None:
            compile_regex(self.regex)  # RegexError names what it does not take
        if self.choice is not None:
            object.__setattr__(self, "choice", checked_choice(self.choice))
        if self.grammar is not None:
            compile_grammar(self.grammar)  # GrammarError names the problem and its line and column
        given = [name for name, value in (("json_mode", self.json_mode or None), ("json_schema", self.json_schema),
                                          ("regex", self.regex), ("choice", self.choice),
                                          ("grammar", self.grammar)) if value is not None]
        if len(given) > 1:
            raise SettingError("give ", given[0], " or ", given[1], ", not both")
        if given and self.min_new_tokens:
            what = "the JSON" if given[0].startswith("json") else "the answer"
            raise SettingError("", "min_new_tokens", " does not go with ", given[0], f": {what} may be complete "
                               "before it, and then only a stop token may follow")
        if given and self.ignore_eos and not self.stop_token_ids:
            what = "the JSON is complete" if given[0].startswith("json") else "its text is accepted"
            raise SettingError("", "ignore_eos", " with ", given[0], " needs ", "stop_token_ids",
                               f": the answer ends with a stop token once {what}; give ", "stop_token_ids", " (",
                               "ignore_eos", " drops the end-of-turn token)")
        if self.temperature < 0:
            raise SettingError("", "temperature", f" must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SettingError("", "top_p", f" must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty < MIN_REPETITION_PENALTY:
            raise SettingError("", "repetition_penalty", f" must be at least {MIN_REPETITION_PENALTY:g} (smaller ones "
                               f"overflow the fp32 logits they divide), got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def constrained_by(self) -> str | None:
        """The setting that constrains the answer (json_mode, json_schema, regex, choice or grammar), or None."""
        return "json_mode" if self.json_mode else "json_schema" if self.json_schema is not None else \
            "regex" if self.regex is not None else "choice" if self.choice is not None else \
            "grammar" if self.grammar is not None else None

    @property
    def guide(self) -> Regex | Grammar | None:
        """The compiled regex of `regex` or `choice`, or the compiled `grammar` (None without them)."""
        if self.grammar is not None:
            return compile_grammar(self.grammar)
        if self.choice is not None:
            return compile_regex(choice_pattern(self.choice))
        return None if self.regex is None else compile_regex(self.regex)


def whole_number(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def checked_choice(choice) -> tuple[str, ...]:
    """`choice` as a tuple of strings whose regex compiles; InputError naming what is wrong with it."""
    if not (isinstance(choice, (tuple, list)) and all(isinstance(c, str) for c in choice)):
        raise InputError(f"choice must be a list of strings, got {choice!r}"[:200])
    if not choice:
        raise InputError("choice must hold at least one string (the answer is one of them)")
    for i, text in enumerate(choice):
        if not text.isascii() and any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            raise InputError(f"choice {i} ({text[:40]!r}) holds a lone surrogate, which UTF-8 cannot hold")
    try:
        compile_regex(choice_pattern(choice))
    except RegexError as e:  # a SettingError: the server and the command line name `choice` their way
        raise SettingError("", "choice", f": {e}") from None
    return tuple(choice)


def checked_logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """A logit bias as sorted (token id, bias) pairs, one per id (the last given wins, as in a dict);
    raises InputError naming the first entry that is not a whole-number id and a finite bias within
    +-MAX_LOGIT_BIAS. Ids are checked against the vocabulary by the engine."""
    pairs = list(bias.items()) if isinstance(bias, Mapping) else bias
    if not isinstance(pairs, (tuple, list)):
        raise InputError(f"logit_bias must map token ids to biases, got {type(bias).__name__}")
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InputError(f"logit_bias must map token ids to biases, got the entry {pair!r}"[:200])
        token, value = pair
        if not whole_number(token):
            raise InputError(f"logit_bias keys must be token ids (whole numbers), got {token!r}"[:200])
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):  # NaN fails the comparison too
            raise InputError(f"logit_bias of token {token} must be a number from -{MAX_LOGIT_BIAS} to "
                             f"{MAX_LOGIT_BIAS}, got {value!r}"[:200])
    return tuple(sorted((int(token), float(value)) for token, value in dict(pairs).items()))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """logits (B, V), seen (B, V) bool, penalty (B,): seen logits < 0 are multiplied, others divided."""
    p = penalty[:, None]
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, largest_k: int | None = None,
                       nucleus: bool = True) -> torch.Tensor:
    """Set to -inf what top-k (B,) (0 = off) and then top-p (B,) remove; top_p in float64 keeps the
    caller's value exact (the engine's), fp32 cuts where transformers cuts given that fp32 value.

    `largest_k` (the largest top_k of the rows, 0 when none uses top-k) and `nucleus` (whether a row
    has top_p < 1), known on the host, let the common cases skip sorting the vocabulary: top-k alone
    needs only each row's k-th largest logit (`topk`), and neither needs nothing. The result is the
    same either way (ties with the k-th logit are kept, as transformers' TopKLogitsWarper does)."""
    if not nucleus and largest_k is not None:
        if largest_k == 0:
            return logits
        largest = logits.topk(min(largest_k, logits.shape[-1]), dim=-1).values  # descending
        k = top_k.clamp(min=1, max=largest.shape[-1])
        kth = largest.gather(-1, (k - 1)[:, None])
        kth = kth.masked_fill(top_k[:, None] == 0, float("-inf"))
        return logits.masked_fill(logits < kth, float("-inf"))
    vocab = logits.shape[-1]
    # Ascending, as transformers' and vLLM's top-p sort, with ties in id order: where the cut falls
    # inside a tie (common in bf16 logits), the tied tokens of the highest ids are kept.
    sorted_logits, order = logits.sort(dim=-1, stable=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth = sorted_logits.gather(-1, (vocab - k)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    # The mass of each token and all less likely ones, summed from the least likely up as transformers
    # does: summed from the top down, fp32 rounding would cut a large vocabulary's tail too early.
    tail = sorted_logits.softmax(-1).cumsum(-1)
    # The cut 1 - top_p is taken in float64 and then rounded to the sums' dtype, as transformers' Python
    # float `1 - top_p` is when compared with them; 1 - (top_p in fp32) lands up to 3e-8 away.
    cut = (1 - top_p.double()).to(tail.dtype)
    drop = (tail <= cut[:, None]) & (top_p[:, None] < 1)  # top_p 1 keeps all (fp32 sums may pass 1)
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def with_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """(B, V) logits divided by each row's temperature (B,), kept above 1e-5 (temperature 0 is greedy)."""
    return logits / temperature.clamp(min=1e-5)[:, None]


def choose_tokens(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    noise: torch.Tensor | None,
    largest_k: int | None = None,
    nucleus: bool = True,
) -> torch.Tensor:
    """(B, V) fp32 logits -> (B,) token ids. `noise` is Exp(1) noise (B, V), needed when any row samples;
    `largest_k` and `nucleus` as in `filter_top_k_top_p`."""
    best = logits.argmax(-1)
    if noise is None:
        return best
    scaled = with_temperature(logits, temperature)
    probs = filter_top_k_top_p(scaled, top_k, top_p, largest_k, nucleus).softmax(-1)
    drawn = (probs / noise).argmax(-1)
    return torch.where(greedy, best, drawn)


def race_among_top_k(logits: torch.Tensor, top_k: list[int], generators: list[torch.Generator]) -> list[int | None]:
    """Sampled tokens of rows (temperature applied) whose filter is top-k alone (k >= 1 each, no top-p): the
    exponential race of `choose_tokens` run among the tokens top-k keeps (ties with the k-th included, as in
    `filter_top_k_top_p`; -inf logits have no chance and are left out), one Exp(1) draw per kept token in id
    order from the row's generator. The same distribution as the race over the whole vocabulary, for k draws
    where that takes V: a 151674-token vocabulary's float64 uniforms cost ~0.7 ms a row on a CPU, more than a
    tiny model's whole step. None for a row whose largest logit is not finite (the caller's full race)."""
    largest = logits.topk(min(max(top_k), logits.shape[-1]), dim=-1).values  # descending, NaN first
    out: list[int | None] = []
    for row, (k, generator) in enumerate(zip(top_k, generators)):
        top = float(largest[row, 0])
        if not math.isfinite(top):
            out.append(None)
            continue
        kth = largest[row, min(k, largest.shape[-1]) - 1]
        kept = ((logits[row] >= kth) & (logits[row] > -math.inf)).nonzero()[:, 0]  # ascending ids
        weights = (logits[row, kept] - top).exp()  # the probabilities times one common factor
        out.append(int(kept[(weights / exponential_draws(generator, kept.numel(), logits.device)).argmax()]))
    return out


def exponential_draws(generator: torch.Generator, count: int, device) -> torch.Tensor:
    """`count` Exp(1) draws (fp32) from `generator`, as `exponential_noise` draws them."""
    u = torch.rand(count, generator=generator, device=device, dtype=torch.float64)
    return u.clamp_(min=2.0**-60).log_().neg_().float()


def exponential_noise(generators: list[torch.Generator | None], vocab: int, device) -> torch.Tensor:
    """(B, V) Exp(1) draws, row b from generators[b] (ones for a row without one: a greedy row).

    Drawn as -log U with U uniform in float64 and kept off 0: finite and positive, so p / noise is
    never 0 / 0 or 0 / inf, and small enough (down to ~1e-16) that rare tokens win as often as they
    should (float32 U stops at ~6e-8, which starves tokens below ~1e-7). torch's own `exponential_`
    is several times slower on the CPU, and at a full vocabulary per row per step it cost more than
    a small model's decode step."""
    rows = [torch.ones(vocab, device=device) if g is None else exponential_draws(g, vocab, device) for g in generators]
    return torch.stack(rows)


def make_generator(seed: int | None, device) -> torch.Generator:
    """A row's generator; without a seed, seeded from torch's global generator, so that
    `torch.manual_seed` makes unseeded sampling repeatable, as it does in transformers."""
    if seed is None:
        seed = int(torch.randint(2**62, (1,)))
    return torch.Generator(device=device).manual_seed(seed)
