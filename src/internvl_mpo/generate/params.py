"""Generation settings: `SamplingParams` and its checks, and the chat API's names for them (`sampling_params`).

Plain Python, without torch: the command line checks its flags here before it loads torch and the model, so
a mistyped setting is refused in a fraction of a second. How the settings choose tokens: `sampling.py`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InputError, SettingError
from .grammar import Grammar, compile_grammar
from .json_schema import Schema, compile_schema
from .regex import Regex, RegexError, choice_pattern, compile_regex


# transformers takes any penalty > 0, but a positive logit divided by one below ~1e-37 (and then by the
# temperature) overflows fp32 to inf and sampling gives NaN; from 1e-6 up, logits up to 1e4 divided by
# it and by the smallest temperature (1e-5) stay below 1e16, and a repeat is already all but certain.
MIN_REPETITION_PENALTY = 1e-6
FP32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max
MAX_LOGIT_BIAS = 100  # OpenAI's range for a bias, -100..100: -100 bans a token in practice, 100 forces it
MAX_TOP_LOGPROBS = 20  # log-probabilities of the most likely tokens, per token (OpenAI's top_logprobs: 0..20)


@dataclass(frozen=True)
class SamplingParams:
    """Defaults are transformers' (greedy; top_k 50 when sampling) with the card's max_new_tokens;
    `chat()` samples by default, as the card's quick start does (CARD_DEFAULTS)."""

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
        for name in ("temperature", "repetition_penalty"):  # the engine holds them in fp32 tensors
            if getattr(self, name) > FP32_MAX:
                raise SettingError("", name, f" must be at most {FP32_MAX:.6g} (the largest fp32 number), got "
                                   f"{getattr(self, name)}")
        for name in ("temperature", "top_p", "repetition_penalty"):  # numpy.float32: torch refuses it in a tensor
            object.__setattr__(self, name, float(getattr(self, name)))

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


CARD_DEFAULTS = dict(max_new_tokens=1024, do_sample=True)
GENERATION_KEYS = {
    "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "stop",
    "stop_token_ids", "seed", "ignore_eos", "min_new_tokens", "logit_bias", "json_mode",
    "json_schema", "regex", "choice", "grammar",
}
# what chat() takes beside the generation settings: how its images and video become the prompt
INPUT_KEYS = {"max_num", "total_max_num", "num_segments", "num_patches_list", "system_message", "max_pixels"}


def sampling_params(**generation) -> SamplingParams:
    """Map `chat(**generation)` keywords (HF names) to SamplingParams, refusing unknown ones. A
    setting given as None is not set, except top_k: transformers adds no top-k filter for top_k=None,
    so None turns top-k off here too."""
    if "top_k" in generation and generation["top_k"] is None:
        generation["top_k"] = 0
    generation = {key: value for key, value in generation.items() if value is not None}
    unknown = set(generation) - GENERATION_KEYS - {"num_beams", "eos_token_id", "pad_token_id"}
    if "streamer" in unknown:  # the model card's way to stream
        raise InputError("streamer is not taken: iterate stream_chat() for the answer's pieces")
    if unknown:
        raise InputError(
            f"unknown generation settings: {sorted(unknown)}; known: {sorted(GENERATION_KEYS | INPUT_KEYS)}"
        )
    if generation.pop("num_beams", 1) != 1:
        raise InputError("beam search is not implemented; use num_beams=1")
    generation.pop("eos_token_id", None)  # chat() always stops at <|im_end|>, as the official one does
    generation.pop("pad_token_id", None)
    for key, one in (("stop", lambda v: isinstance(v, str)), ("stop_token_ids", whole_number)):  # one, or a list
        value = generation.get(key, ())
        if one(value):
            generation[key] = (value,)
        elif isinstance(value, list) and all(map(one, value)):
            generation[key] = tuple(value)  # a list holding a wrong one stays a list: its error shows what was given
    return SamplingParams(**{**CARD_DEFAULTS, **generation})
