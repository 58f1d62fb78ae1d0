"""JSON mode: constrained decoding to one JSON object (OpenAI's `response_format` `json_object`).

`advance` is a byte-level recognizer of RFC 8259 JSON whose top-level value must be an object: objects, arrays,
strings with their escapes (`\\uXXXX`: any four hex digits, but a surrogate only as a pair, the high half's escape
followed by the low half's, as I-JSON (RFC 7493) asks and Pydantic's reader takes them), numbers in the RFC's exact
grammar (`-0.5e+3`; no `01`, `.5`, `+1`, `1.`), `true`/`false`/`null` and whitespace. It works on bytes, as a
byte-level BPE token may hold part of a UTF-8 character: inside strings it takes only well-formed UTF-8 (no overlong
forms, surrogates or code points past U+10FFFF; the continuation bytes still due are part of the state) and no raw
control bytes (< 0x20). Three bounds keep a model from looping: at most `whitespace_limit(depth)` whitespace bytes in
a row outside strings, a CR LF and 4 spaces of indentation for each container open (pretty-printed JSON passes; 2
before the object), and at most MAX_DEPTH nested objects and arrays; and at most MAX_NUMBER_DIGITS digits in a row in
a number. Whitespace may come before the object, none after it.

A state is a hashable tuple (mode, detail, open containers as a str of "{" and "[", whitespace bytes in a
row, or in a number its digits in a row); None is a rejected prefix.

`JsonVocabulary` indexes a tokenizer's tokens to give, for a state, the mask of the token ids whose bytes
keep the output a valid prefix (`mask`). Special tokens, and ids without bytes, are never in it. Masks
are cached by state (the state with its whitespace count, or a number's digit count, set to 0: the count only
removes the tokens that begin with too long a run, a vectorized check). Outside strings a mask is found by a walk
of the sorted tokens as a trie, each branch cut at its first rejected byte (`_walk`), after an escape by all of
them walked together a byte position at a time (`walk_flat`); inside a string, the tokens of plain string
content (no `"`, `\\` or control byte) are a class precomputed for each of the 8 UTF-8 states, so only the
tokens holding a `"` or `\\` are walked (together). `JsonConstraint` is one answer's state:
the engine masks its row's logits with `allowed` and `advance`s it with each token it emits.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import itertools
import re
from collections import OrderedDict

import numpy

from ..errors import InputError

MAX_DEPTH = 32
# digits in a row in a number (its integer part, fraction or exponent): json.loads refuses an integer of more than
# 4300 (Python's int limit, at least 640 wherever it is set), and nothing real is this long
MAX_NUMBER_DIGITS = 300
CACHED_MASKS = 512  # masks kept per vocabulary, packed 8 to a byte (19 KB each for a Qwen2 vocabulary)
FEW_WORDS = 256  # walk_flat walks the words still taken as a trie once they are this few
CACHED_CLASSES = 16  # token class tables kept per vocabulary (by byte runs; 0.6 MB each for a Qwen2 vocabulary)

# modes
START, VALUE, ARRAY_START, OBJECT_START, KEY, COLON, AFTER, STRING, ESCAPE, UNICODE, NUMBER, LITERAL, DONE = range(13)
SPACED = frozenset((START, VALUE, ARRAY_START, OBJECT_START, KEY, COLON, AFTER))  # modes that take whitespace
# modes whose masks walk_flat finds faster than _walk (after an escape, most tokens that begin right go on long
# inside the string); elsewhere most tokens end, or are refused, within a byte or two
FLAT_WALKED = frozenset((ESCAPE, UNICODE))
WHITESPACE = frozenset(b" \t\n\r")
HEX = frozenset(b"0123456789abcdefABCDEF")
SIMPLE_ESCAPES = frozenset(b'"\\/bfnrt')

# UTF-8 inside a string: the detail of a STRING state is 8 * (1 for a key) + u, u indexing (bytes still due,
# lowest and highest next byte); u 0 expects a new character.
UTF8 = ((0, 0, 0), (1, 0x80, 0xBF), (2, 0x80, 0xBF), (2, 0xA0, 0xBF), (2, 0x80, 0x9F), (3, 0x80, 0xBF),
        (3, 0x90, 0xBF), (3, 0x80, 0x8F))
UTF8_NEXT = (0, 0, 1, 1, 1, 2, 2, 2)  # u after one more continuation byte
# u after each lead byte (0: not a lead byte of well-formed UTF-8): C2-DF, E0 (no overlong), E1-EC, ED (no
# surrogates), EE-EF, F0 (no overlong), F1-F3, F4 (not past U+10FFFF)
UTF8_LEAD = bytes(1 if 0xC2 <= b <= 0xDF else 3 if b == 0xE0 else 4 if b == 0xED else 2 if 0xE1 <= b <= 0xEF
                  else 6 if b == 0xF0 else 5 if 0xF1 <= b <= 0xF3 else 7 if b == 0xF4 else 0 for b in range(256))

# the detail of a UNICODE state: 16 * (1 for a key) + the phase of a \\u escape; UNICODE_NEXT[phase] maps each byte
# taken to the next phase (-1: the escape ends). A high surrogate's escape goes on with a low one's, read as one escape
# (`\\ud83d\\ude00`), and a low one never comes alone: strict readers (Pydantic's jiter, serde_json) refuse a lone one
U_FIRST, U_SECOND, U_THIRD, U_FOURTH, U_D, U_HIGH_THIRD, U_HIGH_FOURTH, U_BACKSLASH, U_U, U_LOW_D, U_LOW_SECOND = \
    range(11)
UNICODE_NEXT = (
    {**dict.fromkeys(HEX, U_SECOND), **dict.fromkeys(b"dD", U_D)},
    dict.fromkeys(HEX, U_THIRD),
    dict.fromkeys(HEX, U_FOURTH),
    dict.fromkeys(HEX, -1),
    {**dict.fromkeys(b"01234567", U_THIRD), **dict.fromkeys(b"89abAB", U_HIGH_THIRD)},  # not c-f: a low half alone
    dict.fromkeys(HEX, U_HIGH_FOURTH),
    dict.fromkeys(HEX, U_BACKSLASH),
    {0x5C: U_U},
    {0x75: U_LOW_D},
    dict.fromkeys(b"dD", U_LOW_SECOND),
    dict.fromkeys(b"cdefCDEF", U_THIRD),
)

# the detail of a NUMBER state: where in -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? it stands
MINUS, ZERO, INT, DOT, FRAC, EXP, EXP_SIGN, EXP_INT = range(8)
NUMBER_ENDS = frozenset((ZERO, INT, FRAC, EXP_INT))  # a byte that goes on no further ends the number there
DIGIT_AFTER = {MINUS: INT, INT: INT, DOT: FRAC, FRAC: FRAC, EXP: EXP_INT, EXP_SIGN: EXP_INT, EXP_INT: EXP_INT}

INITIAL = (START, 0, "", 0)
ANY_VALUE = (VALUE, 0, "", 0)  # the start of any top-level value (JSON schema mode's, a tool call list's)
KEY_FLAG = 8  # in a string's detail (an escape's too): the string is an object's key; a \u escape's is twice it
_DONE = (DONE, 0, "", 0)
PLAIN_CONTENT = re.compile(rb'[^"\\\x00-\x1f]*')


def whitespace_limit(depth: int) -> int:
    """The most whitespace bytes in a row with `depth` containers open: a line break and its indentation."""
    return 2 + 4 * depth


def _after(stack: str):
    return (AFTER, 0, stack, 0) if stack else _DONE


def _value(stack: str, byte: int):
    """The state after the first byte of a value, or None."""
    if byte == 0x22:  # "
        return (STRING, 0, stack, 0)
    if byte == 0x7B or byte == 0x5B:  # { [
        if len(stack) >= MAX_DEPTH:
            return None
        return (OBJECT_START, 0, stack + "{", 0) if byte == 0x7B else (ARRAY_START, 0, stack + "[", 0)
    if 0x31 <= byte <= 0x39:
        return (NUMBER, INT, stack, 1)
    if byte == 0x30:
        return (NUMBER, ZERO, stack, 1)
    if byte == 0x2D:  # -
        return (NUMBER, MINUS, stack, 0)
    if byte == 0x74:
        return (LITERAL, b"rue", stack, 0)
    if byte == 0x66:
        return (LITERAL, b"alse", stack, 0)
    if byte == 0x6E:
        return (LITERAL, b"ull", stack, 0)
    return None


def advance(state, byte: int):
    """The state after one more byte, or None where the bytes so far can no longer begin a JSON object."""
    mode, detail, stack, ws = state
    if mode == STRING:
        u = detail & 7
        if u:
            _, low, high = UTF8[u]
            return (STRING, detail - u + UTF8_NEXT[u], stack, 0) if low <= byte <= high else None
        if byte == 0x22:
            return (COLON, 0, stack, 0) if detail else _after(stack)
        if byte == 0x5C:
            return (ESCAPE, detail, stack, 0)
        if byte < 0x20:
            return None
        if byte < 0x80:
            return state
        lead = UTF8_LEAD[byte]
        return (STRING, detail + lead, stack, 0) if lead else None
    if mode in SPACED:
        if byte in WHITESPACE:
            return (mode, detail, stack, ws + 1) if ws < whitespace_limit(len(stack)) else None
        if mode == AFTER:
            top = stack[-1]
            if byte == 0x2C:  # ,
                return (KEY, 0, stack, 0) if top == "{" else (VALUE, 0, stack, 0)
            if (byte == 0x7D and top == "{") or (byte == 0x5D and top == "["):
                return _after(stack[:-1])
            return None
        if mode == VALUE:
            return _value(stack, byte)
        if mode == COLON:
            return (VALUE, 0, stack, 0) if byte == 0x3A else None
        if mode == KEY or mode == OBJECT_START:
            if byte == 0x22:
                return (STRING, KEY_FLAG, stack, 0)
            return _after(stack[:-1]) if byte == 0x7D and mode == OBJECT_START else None
        if mode == ARRAY_START:
            return _after(stack[:-1]) if byte == 0x5D else _value(stack, byte)
        return (OBJECT_START, 0, "{", 0) if byte == 0x7B else None  # START: the top-level value is an object
    if mode == NUMBER:
        if 0x30 <= byte <= 0x39:
            if detail == ZERO or ws >= MAX_NUMBER_DIGITS:
                return None  # no leading zeros, no endless digits
            return (NUMBER, ZERO if detail == MINUS and byte == 0x30 else DIGIT_AFTER[detail], stack, ws + 1)
        if byte == 0x2E and (detail == ZERO or detail == INT):
            return (NUMBER, DOT, stack, 0)
        if (byte == 0x65 or byte == 0x45) and detail in (ZERO, INT, FRAC):
            return (NUMBER, EXP, stack, 0)
        if (byte == 0x2B or byte == 0x2D) and detail == EXP:
            return (NUMBER, EXP_SIGN, stack, 0)
        return advance((AFTER, 0, stack, 0), byte) if detail in NUMBER_ENDS else None
    if mode == ESCAPE:
        if byte in SIMPLE_ESCAPES:
            return (STRING, detail, stack, 0)
        return (UNICODE, 2 * detail, stack, 0) if byte == 0x75 else None
    if mode == UNICODE:
        phase = detail & 15
        after = UNICODE_NEXT[phase].get(byte)
        if after is None:
            return None
        return (STRING, (detail >> 4) << 3, stack, 0) if after < 0 else (UNICODE, detail - phase + after, stack, 0)
    if mode == LITERAL:
        if byte != detail[0]:
            return None
        return (LITERAL, detail[1:], stack, 0) if len(detail) > 1 else _after(stack)
    return None  # DONE: nothing may follow the object


def in_key(state) -> bool:
    """Whether `state` is inside an object's key (its string, escapes included)."""
    mode, detail = state[0], state[1]
    return bool(detail & KEY_FLAG) if mode in (STRING, ESCAPE) else mode == UNICODE and bool(detail & 2 * KEY_FLAG)


def advance_bytes(state, data: bytes, advance=advance):
    """The state after `data` (by `advance`, this module's or another recognizer's), or None."""
    for byte in data:
        state = advance(state, byte)
        if state is None:
            return None
    return state


def unspaced(state):
    """`state` with its whitespace run (or a number's run of digits) set to 0, as masks are cached."""
    return (state[0], state[1], state[2], 0) if state[3] and (state[0] in SPACED or state[0] == NUMBER) else state


def _leading_whitespace(piece: bytes) -> int:
    return len(piece) - len(piece.lstrip(b" \t\n\r"))


def _leading_digits(piece: bytes) -> int:
    return len(piece) - len(piece.lstrip(b"0123456789"))


def _touch(cache: OrderedDict, key) -> None:
    """Mark `key` as the latest used in the LRU `cache`, which another thread may have evicted it from since it was
    read (a KeyError from `move_to_end` then: threads share one model's caches)."""
    with contextlib.suppress(KeyError):
        cache.move_to_end(key)


class JsonVocabulary:
    """A tokenizer's tokens indexed for JSON masks. `pieces[i]` is the bytes of token id i, or None for an id
    that never goes inside the object (a special token); ids from len(pieces) to `size` (the model's
    vocabulary, padded) are never allowed either."""

    def __init__(self, pieces: list[bytes | None], size: int):
        if len(pieces) > size:
            raise ValueError(f"{len(pieces)} tokens for a vocabulary of {size}")
        self.size = size
        self.pieces = pieces
        usable = [(piece, i) for i, piece in enumerate(pieces) if piece]  # no empty token: it could repeat forever
        usable.sort()
        self._words = [piece for piece, _ in usable]
        self._ids = numpy.array([i for _, i in usable], dtype=numpy.int64)
        quoted = [(piece, i) for piece, i in usable if b'"' in piece or b"\\" in piece]
        self._quoted_words = [piece for piece, _ in quoted]
        self._quoted_ids = numpy.array([i for _, i in quoted], dtype=numpy.int64)
        self._lead_ws = numpy.zeros(size, dtype=numpy.int32)
        self._lead_digits = numpy.zeros(size, dtype=numpy.int32)
        # the tokens of plain string content valid from each UTF-8 state u (ASCII ones from u 0 only)
        self._content = numpy.zeros((len(UTF8), size), dtype=bool)
        for piece, i in usable:
            if piece[0] in WHITESPACE:
                self._lead_ws[i] = _leading_whitespace(piece)
            elif 0x30 <= piece[0] <= 0x39:
                self._lead_digits[i] = _leading_digits(piece)
            if len(PLAIN_CONTENT.match(piece)[0]) != len(piece):
                continue
            if piece.isascii():
                self._content[0, i] = True
                continue
            for u in range(len(UTF8)) if 0x80 <= piece[0] <= 0xBF else (0,):
                self._content[u, i] = advance_bytes((STRING, u, "", 0), piece) is not None
        self._cache: OrderedDict = OrderedDict()
        self.schema_cache: OrderedDict = OrderedDict()  # json_schema.schema_mask's, by (canonical JSON, state)
        self.regex_cache: OrderedDict = OrderedDict()  # automaton.automaton_mask's, by (automaton's cache_key, state)
        self._classes: OrderedDict = OrderedDict()  # token_classes', by byte runs

    @functools.cached_property
    def flat_words(self) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        """The sorted tokens as `flat_index` lays them out: the index of `walk_tokens`, built on first use."""
        return flat_index(self._words)

    @functools.cached_property
    def quoted_flat(self) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray, numpy.ndarray]:
        """The `flat_index` of the sorted tokens that hold a `"` or `\\`, those walked inside a string."""
        return flat_index(self._quoted_words)

    def token_classes(self, runs) -> tuple[tuple, numpy.ndarray]:
        """The sorted tokens in classes by `runs` (the sorted first bytes of runs of bytes that an automaton reads
        alike from every state, 0 first): tokens whose bytes fall in the same runs in the same order are taken from
        the same states, so one of each class is walked. Gives the `flat_index` of one word per class (each byte
        made its run's first) and each id's class there (len(representatives) for an id without bytes); kept for
        the CACHED_CLASSES latest runs."""
        key = tuple(runs)
        found = self._classes.get(key)
        if found is None:
            firsts = numpy.zeros(256, dtype=numpy.uint8)
            firsts[list(key)] = key
            table = numpy.maximum.accumulate(firsts).tobytes()  # each byte's run's first byte
            words = [word.translate(table) for word in self._words]
            representatives = sorted(set(words))
            numbers = {word: i for i, word in enumerate(representatives)}
            classes = numpy.full(self.size, len(representatives), dtype=numpy.int32)  # no class: never taken
            classes[self._ids] = numpy.fromiter(map(numbers.__getitem__, words), dtype=numpy.int32, count=len(words))
            found = self._classes[key] = (flat_index(representatives), classes)
            if len(self._classes) > CACHED_CLASSES:
                self._classes.popitem(last=False)
        else:
            _touch(self._classes, key)
        return found

    @functools.cached_property
    def characters(self) -> numpy.ndarray:
        """(size,): the UTF-8 characters each token's bytes begin (its bytes that are not continuation bytes), for
        JSON schema mode's string lengths."""
        pieces = [piece or b"" for piece in self.pieces]
        lengths = numpy.fromiter(map(len, pieces), dtype=numpy.int64, count=len(pieces))
        ends = lengths.cumsum()
        data = numpy.frombuffer(b"".join(pieces), dtype=numpy.uint8)
        begun = numpy.concatenate([[0], ((data & 0xC0) != 0x80).cumsum()])  # characters begun before each byte
        counts = numpy.zeros(self.size, dtype=numpy.int32)
        counts[: len(pieces)] = begun[ends] - begun[ends - lengths]
        return counts

    @classmethod
    def of_tokenizer(cls, tokenizer, size: int) -> "JsonVocabulary":
        """The vocabulary of a `chat.tokenizer.Tokenizer` (its `token_bytes`, without its special tokens). Refused
        where a byte of UTF-8 text has no token of its own (a SentencePiece model without byte pieces): a constraint
        whose text needs that byte would end the answer short of it."""
        count = min(len(tokenizer), size)
        pieces = [None if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(count)]
        missing = sorted((set(range(0xC0)) | set(range(0xC2, 0xF5))) - {p[0] for p in pieces if p and len(p) == 1})
        if missing:
            shown = ", ".join(f"0x{b:02X}" for b in missing[:6]) + (", ..." if len(missing) > 6 else "")
            raise InputError(f"constrained decoding needs a token for every byte of UTF-8 text, and the tokenizer "
                             f"from {tokenizer.source} has none for {len(missing)} bytes ({shown}); a SentencePiece "
                             "tokenizer.model needs byte_fallback (its <0xNN> pieces)")
        return cls(pieces, size)

    def mask(self, state) -> numpy.ndarray:
        """A new boolean array (size,): the ids whose bytes take `state` to a valid prefix (never a stop id:
        JsonConstraint adds those)."""
        key = unspaced(state)
        return self.cached_mask(self._cache, CACHED_MASKS, key, state, lambda: self._compute(key))

    def cached_mask(self, cache: OrderedDict, limit: int, key, lexical, compute) -> numpy.ndarray:
        """A new boolean array (size,): the mask `compute()` gives, kept packed in `cache` (its `limit` most recent)
        by `key`, which holds the state with its whitespace or digit run set to 0 (`unspaced`); the run of the lexical
        state `lexical` then leaves room for tokens that begin with a shorter run only (None: a state without one)."""
        packed = cache.get(key)
        if packed is None:
            packed = cache[key] = numpy.packbits(compute())
            if len(cache) > limit:
                cache.popitem(last=False)
        else:
            _touch(cache, key)
        mask = numpy.unpackbits(packed, count=self.size).view(bool)
        if lexical is not None and lexical[3]:
            if lexical[0] in SPACED:
                mask &= self._lead_ws <= whitespace_limit(len(lexical[2])) - lexical[3]
            elif lexical[0] == NUMBER:
                mask &= self._lead_digits <= MAX_NUMBER_DIGITS - lexical[3]
        return mask

    def _compute(self, state) -> numpy.ndarray:
        mask = numpy.zeros(self.size, dtype=bool)
        if state[0] == DONE:
            return mask
        if state[0] == STRING:
            mask |= self._content[state[1] & 7]
            mask[self._quoted_ids[walk_flat(self.quoted_flat, advance, state)]] = True
        elif state[0] in FLAT_WALKED:
            mask[self._ids[walk_flat(self.flat_words, advance, state)]] = True
        else:
            mask[self._ids[_walk(self._words, state)]] = True
        return mask


def flat_index(words: list[bytes]) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """Sorted, non-empty `words` laid end to end (uint8), each one's start and length there, and where the words of
    each first byte begin (257 positions): what `walk_flat` walks."""
    lengths = numpy.fromiter(map(len, words), dtype=numpy.int64, count=len(words))
    starts = numpy.concatenate([[0], lengths.cumsum()[:-1]]).astype(numpy.int64)
    data = numpy.frombuffer(b"".join(words), dtype=numpy.uint8)
    return data, starts, lengths, numpy.searchsorted(data[starts], numpy.arange(257))


def walk_tokens(vocabulary: JsonVocabulary, advance, state) -> numpy.ndarray:
    """A new boolean array (vocabulary size,): the ids whose bytes `advance` ((state, byte) -> the next state or
    None; states hashable) takes from `state` without a None, by `walk_flat` over all the vocabulary's tokens."""
    mask = numpy.zeros(vocabulary.size, dtype=bool)
    mask[vocabulary._ids[walk_flat(vocabulary.flat_words, advance, state)]] = True
    return mask


def walk_flat(index, advance, state) -> numpy.ndarray:
    """A boolean array over the words of `index` (a `flat_index`): those whose bytes `advance` takes from `state`
    without a None. All words are walked together, a byte position at a time (the trie walk's work, each distinct
    (state, byte) of a position advanced once, the rest in numpy), each dropped at its first refused byte; where
    most words stay taken, about ten times faster than `_walk`."""
    data, starts, lengths, groups = index
    taken = numpy.zeros(len(lengths), dtype=bool)
    firsts = [(b, advance(state, b)) for b in range(256) if groups[b] < groups[b + 1]]
    states = [after for _, after in firsts if after is not None]  # the states reached, numbered
    numbers = {after: i for i, after in enumerate(states)}
    # the positions of the words still taken (by their first byte, a range of them), and their states
    alive = numpy.concatenate([numpy.arange(groups[b], groups[b + 1]) for b, after in firsts if after is not None]
                              or [numpy.zeros(0, dtype=numpy.int64)])
    current = numpy.concatenate([numpy.full(groups[b + 1] - groups[b], numbers[after]) for b, after in firsts
                                 if after is not None] or [numpy.zeros(0, dtype=numpy.int64)])
    depth = 1
    while alive.size:
        if alive.size <= FEW_WORDS:  # the long words left: walked as a trie from each state, shared bytes read once
            rest = sorted(zip(current.tolist(), [data[starts[p] + depth: starts[p] + lengths[p]].tobytes()
                                                 for p in alive.tolist()], alive.tolist()))
            for number, group in itertools.groupby(rest, key=lambda item: item[0]):
                group = list(group)
                taken[[group[i][2] for i in _walk([word for _, word, _ in group], states[number], advance)]] = True
            break
        ended = lengths[alive] == depth
        taken[alive[ended]] = True
        alive, current = alive[~ended], current[~ended]
        keys = current * 256 + data[starts[alive] + depth]
        present = numpy.zeros(len(states) * 256, dtype=bool)  # the distinct keys, without sorting them
        present[keys] = True
        pairs = numpy.flatnonzero(present)
        places = numpy.empty(len(present), dtype=numpy.int64)
        places[pairs] = numpy.arange(len(pairs))
        following = numpy.empty(len(pairs), dtype=numpy.int64)
        for j, pair in enumerate(pairs.tolist()):
            after = advance(states[pair >> 8], pair & 255)
            if after is not None and after not in numbers:
                numbers[after] = len(states)
                states.append(after)
            following[j] = -1 if after is None else numbers[after]
        current = following[places[keys]]
        alive, current = alive[current >= 0], current[current >= 0]
        depth += 1
    return taken


def _walk(words: list[bytes], state, advance=advance) -> list[int]:
    """The positions in sorted `words` of those that `state` takes to a valid prefix (by `advance`, this
    module's or a json_schema.Schema's): a depth-first walk of the words as a trie (the words in lo:hi share
    their first `depth` bytes), cut at each rejected byte."""
    found = []
    todo = [(0, len(words), 0, state)]
    while todo:
        lo, hi, depth, state = todo.pop()
        while lo < hi and len(words[lo]) == depth:  # the shared prefix is a word itself (sorted first; maybe twice)
            found.append(lo)
            lo += 1
        while lo < hi:
            word = words[lo]
            byte = word[depth]
            end = hi if byte == 255 else bisect.bisect_left(words, word[:depth] + bytes((byte + 1,)), lo, hi)
            after = advance(state, byte)
            if after is not None:
                todo.append((lo, end, depth + 1, after))
            lo = end
    return found


class JsonConstraint:
    """One answer held to a JSON object: its recognizer state over the tokens emitted so far. A subclass holds it
    to other values (json_schema.SchemaConstraint) through its own `complete`, `_mask` and `_after`."""

    held_to = "the JSON object"  # what a token that does not continue the answer fails to continue

    def __init__(self, vocabulary: JsonVocabulary, state=INITIAL):
        self.vocabulary = vocabulary
        self.state = state

    @property
    def complete(self) -> bool:
        return self.state[0] == DONE

    def _mask(self) -> numpy.ndarray:
        return self.vocabulary.mask(self.state)

    def _after(self, piece: bytes):
        return advance_bytes(self.state, piece)

    def allowed(self, stop_ids) -> numpy.ndarray:
        """The mask (vocabulary size,) of the next token: the ids that keep the output a valid prefix, or the
        stop ids alone once the value is complete. Where no other token could follow, the answer ends unfinished:
        by the ordinary stop ids whose text would continue it where there are some (what it needed next, so that
        the stop reason names the id that cut it, as vLLM, which takes such a token as a stop wherever it is
        sampled, ends it), else by any stop id."""
        mask = self._mask()
        stops = [i for i in stop_ids if i < mask.shape[0]]
        mask[stops] = self.complete
        if not mask.any():
            pieces = self.vocabulary.pieces
            spelling = [i for i in stops if i < len(pieces) and pieces[i] and self._after(pieces[i]) is not None]
            mask[spelling or stops] = True
        return mask

    def advance(self, token: int) -> None:
        """Take one emitted token (not a stop id) into the state."""
        piece = self.vocabulary.pieces[token] if token < len(self.vocabulary.pieces) else None
        state = self._after(piece) if piece else None  # no mask takes an empty or special token
        if state is None:
            raise ValueError(f"token {token} ({piece!r}) does not continue {self.held_to}")
        self.state = state
