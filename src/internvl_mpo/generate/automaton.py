"""Byte automata: what regex.py's regexes and grammar.py's grammars share.

`TreeParser`, what the regex and grammar parsers share (alternation, a repetition's bounds); code point ranges
(`normalized`, `complement`, `without`) and their UTF-8 encodings as byte-range sequences
(`utf8_sequences`); `ByteAutomaton`, the base of `Regex` and `Grammar`: a Thompson-style NFA over bytes (byte-range
and epsilon edges per node, and the edges a subclass adds) built from a tree of ("set", ranges), ("cat", parts),
("alt", parts) and ("rep", part, least, most or None), a subclass building the kinds only it has; memoized moves
(`advance` over the subclass's `_step`, the memo cleared past MAX_HELD items held), `matches`, `byte_runs` and
`mask`; `automaton_mask`, the masks of any automaton with `advance` and `byte_runs` (one token of each class of its
byte runs walked), cached per automaton and state; and `AutomatonConstraint`, one answer held to an automaton.
"""

from __future__ import annotations

import numpy

from . import json_mode as jm

MAX_CODE = 0x10FFFF
MAX_REPEAT = 1000  # the largest bound of a repetition {n,m}
SURROGATES = ((0xD800, 0xDFFF),)
MAX_NODES = 100_000  # NFA nodes of one automaton
MAX_HELD = 1_000_000  # items (NFA nodes, stacks) in the memoized states of one automaton before the memo is cleared
CACHED_MASKS = 1024  # masks kept per vocabulary (all regexes and grammars together), packed 8 to a byte
_MISSING = object()


def normalized(ranges) -> tuple[tuple[int, int], ...]:
    """Code point ranges (lo, hi) sorted and merged."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def complement(ranges) -> tuple[tuple[int, int], ...]:
    """The code points 0..MAX_CODE not in `ranges`."""
    found, start = [], 0
    for lo, hi in normalized(ranges):
        if lo > start:
            found.append((start, lo - 1))
        start = hi + 1
    return tuple(found + ([(start, MAX_CODE)] if start <= MAX_CODE else []))


def without(ranges, banned) -> tuple[tuple[int, int], ...]:
    """`ranges` less the (normalized) `banned` ranges."""
    return complement(normalized(tuple(complement(ranges)) + tuple(banned)))


def utf8_sequences(lo: int, hi: int) -> list[tuple[tuple[int, int], ...]]:
    """The code points lo..hi (no surrogates) as sequences of byte ranges, each sequence's bytes any combination of
    its ranges' (the split of Rust's utf8-ranges)."""
    found, todo = [], [(lo, hi)]
    while todo:
        lo, hi = todo.pop()
        bound = next((b for b in (0x7F, 0x7FF, 0xFFFF) if lo <= b < hi), None)
        if bound is not None:  # the two sides encode to different lengths
            todo += [(lo, bound), (bound + 1, hi)]
            continue
        for bits in (6, 12, 18):  # the continuation bytes' bits below a lead byte's (or a higher continuation's)
            m = (1 << bits) - 1
            if lo & ~m != hi & ~m:
                if lo & m:
                    todo += [(lo, lo | m), ((lo | m) + 1, hi)]
                    break
                if hi & m != m:
                    todo += [(lo, (hi & ~m) - 1), (hi & ~m, hi)]
                    break
        else:
            found.append(tuple(zip(chr(lo).encode(), chr(hi).encode())))
    return found


class TreeParser:
    """What regex.py's and grammar.py's parsers share: `text` read at `pos`, `alternation()` of a subclass's
    `sequence()`s, and `quantifier()`, the bounds of a repetition. A subclass gives `refuse(what, pos, why)` (its
    error), `forms` (how errors name the repetition forms), `hint` (the `why` of a '{' that begins none) and `spaced`
    (whether spaces inside the braces are skipped)."""

    forms = "{n}, {n,} or {n,m}"
    hint = ""
    spaced = False

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.depth = 0

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.text[i] if i < len(self.text) else ""

    def alternation(self):
        parts = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            parts.append(self.sequence())
        return parts[0] if len(parts) == 1 else ("alt", tuple(parts))

    def quantifier(self) -> tuple[int, int | None] | None:
        """The bounds (least, most or None) of the quantifier `*`, `+`, `?` or `{...}` at `pos` (`pos` after it), or
        None where none begins there."""
        c = self.peek()
        if c in ("*", "+", "?"):
            self.pos += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        return self.bounds() if c == "{" else None

    def bounds(self) -> tuple[int, int | None]:
        """The repetition {n}, {n,} or {n,m} at `pos` (its '{'; `pos` after it): (n, m or None)."""
        start = self.pos
        end = self.text.find("}", start)
        inside = self.text[start + 1: end] if end > 0 else ""
        least, comma, most = inside.partition(",")
        if self.spaced:  # spaces around a bound, not inside one: {1 2} is no {12}
            least, most = least.strip(" "), most.strip(" ")
        if not (least.isascii() and least.isdigit() and (not most or (most.isascii() and most.isdigit()))):
            raise self.refuse(f"a '{{' that does not begin a repetition {self.forms}", start, self.hint)
        self.pos = end + 1
        least_n, most_n = int(least), (int(most) if most else None if comma else int(least))
        if max(least_n, most_n or 0) > MAX_REPEAT:
            raise self.refuse(f"the repetition {{{inside}}}", start, f"is over the limit of {MAX_REPEAT}")
        if most_n is not None and most_n < least_n:
            raise self.refuse(f"the repetition {{{inside}}}", start, "has its bounds out of order")
        return least_n, most_n


class ByteAutomaton:
    """An NFA over bytes and its lazily built, memoized DFA. A subclass sets `key` (equality and hashing),
    `held_to` (what a constraint's refused token fails to continue), `banned` (code points no set takes), the extra
    edge lists of its nodes (`_extra`, before the first node), `initial`, and gives `accepting(state)`,
    `_step(state, byte)` (the next state or None, memoized by `advance`), `_too_large()` (its error past MAX_NODES
    nodes) and `_build_other(tree, entry)` (the exit node of a tree of a kind of its own, built from `entry`)."""

    held_to = "the automaton"
    banned = SURROGATES

    def __init__(self):
        self._bytes: list[list[tuple[int, int, int]]] = []  # per node: its byte edges (lowest, highest, target)
        self._empty: list[list[int]] = []  # epsilon edges
        self._extra: tuple[list, ...] = ()
        # the copies of a bounded repetition from which each takes every text of a later one: (first node, nodes per
        # copy, copies), those of X{a,b} from copy a - 1 on (each copy built alike, its nodes numbered alike)
        self._copies: list[tuple[int, int, int]] = []
        self._moves: dict = {}  # state -> {byte: next state or None}
        self._held = 0
        self._runs: list[int] | None = None  # byte_runs(), worked out on first use

    def __eq__(self, other):
        return type(other) is type(self) and other.key == self.key

    def __hash__(self):
        return hash(self.key)

    @property
    def cache_key(self) -> tuple:
        """What the automaton is built from, with its kind: equal where the automata are, and holding none of their
        nodes or memo, so that the masks cached by it (automaton_mask) keep no automaton alive."""
        return type(self).__name__, self.key

    @property
    def size(self) -> int:
        """The number of NFA nodes."""
        return len(self._bytes)

    def advance(self, state, byte: int):
        """The state after one more byte, or None where no text the automaton takes begins with the bytes so far."""
        moves = self._moves.get(state)
        if moves is None:
            if self._held > MAX_HELD:
                self._moves.clear()
                self._held = 0
            moves = self._moves[state] = {}
            self._held += len(state)
        after = moves.get(byte, _MISSING)
        if after is _MISSING:
            after = moves[byte] = self._step(state, byte)
        return after

    def matches(self, data: bytes) -> bool:
        """Whether the automaton takes the text of these UTF-8 bytes."""
        state = jm.advance_bytes(self.initial, data, self.advance)
        return state is not None and self.accepting(state)

    def byte_runs(self) -> list[int]:
        """The sorted first bytes of runs of bytes that every NFA node reads alike (its edges are byte ranges): from
        any state, the bytes of one run lead to the same state, so one of each run stands for all."""
        if self._runs is None:
            self._runs = sorted({0} | {edge[k] + k for edges in self._bytes for edge in edges for k in (0, 1)} - {256})
        return list(self._runs)

    def mask(self, vocabulary: jm.JsonVocabulary, state) -> numpy.ndarray:
        """A new boolean array (vocabulary size,): the ids whose bytes take `state` to a live state (cached)."""
        return automaton_mask(vocabulary, self, state)

    # ---- construction -----------------------------------------------------------------------

    def _node(self) -> int:
        if len(self._bytes) >= MAX_NODES:
            raise self._too_large()
        for edges in (self._bytes, self._empty, *self._extra):
            edges.append([])
        return len(self._bytes) - 1

    def _build(self, tree) -> tuple[int, int]:
        """The NFA of `tree`: its (entry, exit) nodes."""
        kind = tree[0]
        entry = self._node()
        if kind == "set":
            end = self._node()
            suffixes: dict = {}  # a byte-range suffix's node, shared by the sequences ending with it
            for lo, hi in without(tree[1], self.banned):
                for sequence in utf8_sequences(lo, hi):
                    target = end
                    for i in range(len(sequence) - 1, 0, -1):
                        if sequence[i:] not in suffixes:
                            suffixes[sequence[i:]] = self._node()
                            self._bytes[suffixes[sequence[i:]]].append((*sequence[i], target))
                        target = suffixes[sequence[i:]]
                    self._bytes[entry].append((*sequence[0], target))
            return entry, end
        if kind == "cat":
            end = entry
            for part in tree[1]:
                first, last = self._build(part)
                self._empty[end].append(first)
                end = last
            return entry, end
        if kind == "alt":
            end = self._node()
            for part in tree[1]:
                first, last = self._build(part)
                self._empty[entry].append(first)
                self._empty[last].append(end)
            return entry, end
        if kind != "rep":
            return entry, self._build_other(tree, entry)
        _, part, least, most = merged(tree)
        copies = least + 1 if most is None else most
        end, skips, starts = entry, [], []
        for k in range(copies):
            size = len(self._bytes)
            starts.append(size)
            first, last = self._build(part)
            if len(self._bytes) + (len(self._bytes) - size) * (copies - 1 - k) > MAX_NODES:
                raise self._too_large()
            self._empty[end].append(first)
            if k == least and most is None:  # a loop: the part again and again
                self._empty[last].append(end)
                break
            if k >= least:
                skips.append(end)
            end = last
        starts = starts[max(least - 1, 0):] + [len(self._bytes)]
        if most is not None and len(starts) > 2 and len({b - a for a, b in zip(starts, starts[1:])}) == 1:
            self._copies.append((starts[0], starts[1] - starts[0], len(starts) - 1))
        exit = self._node()  # not `end`, which may be the loop's: a skip must not enter it
        for node in skips + [end]:
            self._empty[node].append(exit)
        return entry, exit


def merged(tree) -> tuple:
    """The repetition `tree` ("rep", part, least, most or None) with a repetition of a repetition made one: X{a,b}
    repeated c to d times is X repeated n*a to n*b times for each n of c..d (X's texts concatenated n-fold in any
    split), the one repetition X{c*a,d*b} where those counts leave no gap (the first gap, if any, comes after n = c).
    So `(.{0,50}){0,100}` is built as `.{0,5000}`, whose states are one copy of `.` each, not the copies of every split
    of the bytes so far. Others as they are."""
    _, part, least, most = tree
    while part[0] == "cat" and len(part[1]) == 1:  # a group
        part = part[1][0]
    if part[0] != "rep":
        return tree
    _, inner, low, high = merged(part)
    if high == 0 or most == 0:
        return tree
    if high is None:
        gapless = least >= 1 or low <= 1
    else:
        gapless = most == least or (least + 1) * low <= least * high + 1
    if not gapless:
        return tree
    return ("rep", inner, least * low, None if high is None or most is None else most * high)


def automaton_mask(vocabulary: jm.JsonVocabulary, automaton, state) -> numpy.ndarray:
    """A new boolean array (vocabulary size,): the ids whose bytes take `state` of `automaton` (anything with
    `advance`, `byte_runs` and `cache_key`) to a live state, cached in the vocabulary per automaton's `cache_key` and
    state (keyed by the automaton itself, the cache kept up to CACHED_MASKS automata alive, their nodes and memos, past
    the compile caches' bound): one token of each class of the automaton's byte runs (vocabulary.token_classes)
    walked, all together (jm.walk_flat)."""
    return vocabulary.cached_mask(vocabulary.regex_cache, CACHED_MASKS, (automaton.cache_key, state), None,
                                  lambda: _compute(vocabulary, automaton, state))


def _compute(vocabulary: jm.JsonVocabulary, automaton, state) -> numpy.ndarray:
    index, classes = vocabulary.token_classes(automaton.byte_runs())
    return numpy.append(jm.walk_flat(index, automaton.advance, state), False)[classes]


class AutomatonConstraint(jm.JsonConstraint):
    """One answer held to a ByteAutomaton (its whole text): JsonConstraint over the automaton's states, masks by its
    `mask`; a stop token is allowed where the text so far is accepted."""

    def __init__(self, vocabulary: jm.JsonVocabulary, automaton: ByteAutomaton):
        super().__init__(vocabulary, automaton.initial)
        self.automaton = automaton
        self.held_to = automaton.held_to

    @property
    def complete(self) -> bool:
        return self.automaton.accepting(self.state)

    def _mask(self) -> numpy.ndarray:
        return self.automaton.mask(self.vocabulary, self.state)

    def _after(self, piece: bytes):
        return jm.advance_bytes(self.state, piece, self.automaton.advance)
