"""Regular expressions as byte-level automata: guided decoding to a regex or a choice (vLLM's `guided_regex` and
`guided_choice`), and JSON schema's `pattern`.

`compile_regex(pattern, search=False, excluded="")` gives a `Regex`: a recognizer of the UTF-8 bytes of the texts
the regex takes (well-formed UTF-8 only). search=False: the whole text matches (Python's re.fullmatch). search=True:
the regex matches somewhere in the text (ECMA-262's unanchored `test`, JSON Schema's `pattern`; `^` and `$` anchor
it to the text's start and end). `excluded`: code points that may not appear in the text at all.

The syntax taken (Python's and ECMA-262's common ground): literals, `.` (any code point but \\n), classes `[...]`
(ranges, `^` negation, escapes), `\\d \\w \\s \\D \\W \\S` (ASCII meanings), the escapes `\\n \\t \\r \\f \\v \\xHH
\\uHHHH` (a surrogate pair's two escapes read as one code point) and any escaped punctuation, the quantifiers
`* + ? {n} {n,} {n,m}` and their lazy forms (the same language), groups `(...)`, `(?:...)`, `(?P<name>...)`,
`(?<name>...)`, alternation, and `^`/`$` (the start and the end of the text: `$` is not also before a final
newline, as Python's is). Refused with a RegexError naming the construct and its position: backreferences,
lookarounds, `\\b` and `\\B`, possessive quantifiers and atomic groups, inline flags, `\\p{...}`, unknown escapes,
unbalanced parentheses, a bound above automaton.MAX_REPEAT, and an automaton of more than MAX_NODES nodes.

The regex is parsed to a tree, then built as a Thompson NFA over bytes (each character class turned into UTF-8
byte-range sequences, their common suffixes shared), with epsilon edges and the `^`/`$` assertions as edges of
their own. A node that cannot reach acceptance is pruned: `live` holds the (node, past `$`) pairs from which the
end is reachable once a byte has been read (a `^` is crossed only before the first byte). The DFA is built lazily:
a state is the frozenset of the live NFA nodes that read a byte (and the final node when the text so far is
accepted), less a bounded repetition's copy of a node where an earlier copy of it is there (it takes every text the
later one does: `(\\w{1,10}\\s?){0,50}` keeps a few nodes, not one per split of the text), each state's moves
memoized. So `advance` returns None exactly when no text the regex takes begins with the bytes so far, and a
state it returns always has an accepted completion (the NFA's construction, the memo and the masks are
automaton.py's, shared with grammar.py). `automaton.AutomatonConstraint` holds one answer to a Regex,
with masks from JSON mode's vocabulary index, cached per regex and state: the tokens in classes by the regex's
byte runs (those whose bytes fall in the same runs in the same order are taken alike from every state; a table built
once per vocabulary and runs, about 25 times fewer classes than tokens for `.{0,300}` on Qwen2's vocabulary), one of
each class walked, all together a byte position at a time (jm.walk_flat: each distinct state and byte of a position
advanced once).
"""

from __future__ import annotations

import functools

from ..errors import InputError
from .automaton import (MAX_CODE, MAX_NODES, SURROGATES, ByteAutomaton, TreeParser, complement,
                        normalized)

MAX_NESTING = 100  # groups inside one another
CACHED_REGEXES = 64
SPECIAL = frozenset("\\.^$|?*+()[]{}")
CLASSES = {"d": ((0x30, 0x39),), "w": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
           "s": ((0x09, 0x0D), (0x20, 0x20))}
ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B}
HEX = frozenset("0123456789abcdefABCDEF")


class RegexError(InputError):
    """A regex this module does not take; the message names the construct and its position."""


class _Parser(TreeParser):
    """A regex's text to a tree: ("set", code point ranges), ("cat", parts), ("alt", parts), ("rep", part, least,
    most or None), ("^",), ("$",)."""

    hint = "is not supported (escape it as \\{)"

    def __init__(self, pattern: str):
        super().__init__(pattern)
        self.names: set[str] = set()

    def refuse(self, what: str, pos: int, why: str = "is not supported") -> RegexError:
        shown = self.text if len(self.text) <= 60 else self.text[:57] + "..."
        return RegexError(f"regex {shown!r}: {what} at position {pos} {why}")

    def parse(self):
        tree = self.alternation()
        if self.pos < len(self.text):  # only a ')' stops an alternation early
            raise self.refuse("the ')'", self.pos, "closes no group (unbalanced parentheses)")
        return tree

    def sequence(self):
        parts = []
        while self.peek() not in ("", "|", ")"):
            parts.append(self.quantified(self.atom()))
        return parts[0] if len(parts) == 1 else ("cat", tuple(parts))

    def quantified(self, atom):
        start = self.pos
        c = self.peek()
        bounds = self.quantifier()
        if bounds is None:
            return atom
        if atom[0] in ("^", "$"):
            raise self.refuse(f"'{c}' after an anchor", start, "repeats nothing")
        if self.peek() == "?":  # lazy: the same language
            self.pos += 1
        elif self.peek() == "+":
            raise self.refuse("a possessive quantifier", self.pos)
        if self.peek() in ("*", "+", "?", "{"):
            raise self.refuse(f"'{self.peek()}'", self.pos, "repeats a repetition (group it: (?:...))")
        return ("rep", atom, *bounds)

    def atom(self):
        start = self.pos
        c = self.peek()
        self.pos += 1
        if c == "(":
            return self.group(start)
        if c == "[":
            return ("set", self.character_class(start))
        if c == ".":
            return ("set", complement(((0x0A, 0x0A),)))
        if c in ("^", "$"):
            return (c,)
        if c == "\\":
            found = self.escape(start, in_class=False)
            return ("set", found if isinstance(found, tuple) else ((found, found),))
        if c in ("*", "+", "?", "{"):
            raise self.refuse(f"'{c}'", start, "repeats nothing (escape it for the character)")
        return ("set", ((self.code_point(c, start),) * 2,))

    def code_point(self, c: str, pos: int) -> int:
        if 0xD800 <= ord(c) <= 0xDFFF:
            raise self.refuse(f"a lone surrogate U+{ord(c):04X}", pos, "is not a character UTF-8 can hold")
        return ord(c)

    def group(self, start: int):
        if self.peek() == "?":
            after = self.text[self.pos + 1: self.pos + 3]
            if after[:1] == ":":
                self.pos += 2
            elif after[:1] in ("=", "!") or after in ("<=", "<!"):
                raise self.refuse("a lookaround (?" + after[:1 if after[:1] in "=!" else 2], start)
            elif after == "P=":
                raise self.refuse("a backreference (?P=", start)
            elif after[:1] == "<" or after == "P<":
                self.pos += 3 if after == "P<" else 2
                end = self.text.find(">", self.pos)
                name = self.text[self.pos: end] if end >= 0 else ""
                if not name.isidentifier() or name in self.names:
                    raise self.refuse(f"the group name {name!r}", start, "is not a new identifier")
                self.names.add(name)
                self.pos = end + 1
            elif after[:1] == ">":
                raise self.refuse("an atomic group (?>", start)
            elif after[:1] == "#":
                raise self.refuse("a comment (?#", start)
            elif after[:1] == "(":
                raise self.refuse("a conditional group (?(", start)
            elif after[:1].isalpha() or after[:1] == "-":
                raise self.refuse("inline flags (?" + after[:1], start)
            else:
                raise self.refuse("the group (?" + after[:1], start)
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.refuse("a group", start, f"is nested more than {MAX_NESTING} deep")
        tree = self.alternation()
        self.depth -= 1
        if self.peek() != ")":
            raise self.refuse("the '('", start, "is never closed (unbalanced parentheses)")
        self.pos += 1
        return ("cat", (tree,))  # not a bare anchor: it may be repeated

    def character_class(self, start: int) -> tuple[tuple[int, int], ...]:
        negated = self.peek() == "^"
        self.pos += negated
        if self.peek() == "]":
            raise self.refuse("a ']' first in a class", self.pos, "is not supported (escape it as \\])")
        ranges: list[tuple[int, int]] = []
        while self.peek() != "]":
            if not self.peek():
                raise self.refuse("the class '['", start, "has no ']'")
            item_pos = self.pos
            low = self.class_item()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                high = self.class_item()
                if isinstance(low, tuple) or isinstance(high, tuple) or low > high:
                    raise self.refuse("a bad range " + self.text[item_pos: self.pos], item_pos,
                                      "(its ends must be characters in order)")
                ranges.append((low, high))
            else:
                ranges += low if isinstance(low, tuple) else [(low, low)]
        self.pos += 1
        return complement(ranges) if negated else normalized(ranges)

    def class_item(self) -> int | tuple:
        start = self.pos
        c = self.peek()
        self.pos += 1
        return self.escape(start, in_class=True) if c == "\\" else self.code_point(c, start)

    def escape(self, start: int, in_class: bool) -> int | tuple:
        """The escape at `start` (its backslash; self.pos after it): a code point, or a class's ranges."""
        c = self.peek()
        self.pos += 1
        if not c:
            raise self.refuse("a backslash", start, "ends the regex")
        if c.lower() in CLASSES:
            ranges = CLASSES[c.lower()]
            return ranges if c.islower() else complement(ranges)
        if c in ESCAPES:
            return ESCAPES[c]
        if c in ("x", "u", "U"):  # \U: Python's, eight digits
            wanted = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.text[self.pos: self.pos + wanted]
            if len(digits) < wanted or not all(d in HEX for d in digits):
                raise self.refuse(f"the escape \\{c}{digits}", start, f"needs {wanted} hex digits")
            self.pos += len(digits)
            code = int(digits, 16)
            if code > MAX_CODE:
                raise self.refuse(f"the escape \\{c}{digits}", start, f"is past U+{MAX_CODE:X}")
            low = self.text[self.pos: self.pos + 6]
            pair = c == "u" and len(low) == 6 and low[:2] == "\\u" and all(d in HEX for d in low[2:])
            if pair and 0xD800 <= code <= 0xDBFF and 0xDC00 <= int(low[2:], 16) <= 0xDFFF:  # a surrogate pair: one
                self.pos += 6
                return 0x10000 + ((code - 0xD800) << 10) + int(low[2:], 16) - 0xDC00
            return self.code_point(chr(code), start)
        if c == "b" and in_class:
            return 0x08
        if c in ("b", "B"):
            raise self.refuse(f"the word boundary \\{c}", start)
        if c in "0123456789k":
            raise self.refuse(f"a backreference \\{c}", start)
        if c in ("p", "P"):
            raise self.refuse(f"a Unicode property \\{c}{{...}}", start)
        if c.isascii() and c.isalnum():
            raise self.refuse(f"the escape \\{c}", start)
        return self.code_point(c, start)


class Regex(ByteAutomaton):
    """A compiled regex: `initial` (a state), `advance(state, byte)` (the next state or None), `accepting(state)`.
    Equal (and hashed) by its compile_regex arguments."""

    held_to = "the regex"

    def __init__(self, pattern: str, search: bool, excluded: str):
        super().__init__()
        self.key = (pattern, search, excluded)
        tree = parse_regex(pattern)
        self.banned = normalized(SURROGATES + tuple((ord(c), ord(c)) for c in excluded))
        if search:  # any text before and after the match
            anything = ("rep", ("set", ((0, MAX_CODE),)), 0, None)
            tree = ("cat", (anything, tree, anything))
        self._starts: list[list[int]] = []  # `^` edges: crossed before the first byte only
        self._ends: list[list[int]] = []  # `$` edges: no byte is read after one
        self._extra = (self._starts, self._ends)
        entry, self.final = self._build(tree)
        self._live = self._find_live()
        self._copy_of = self._copy_keys()
        self.initial = self._closure([entry], at_start=True)
        if not self.initial:
            raise RegexError(f"regex {pattern[:60]!r}: no text matches it" +
                             (f" without the characters {excluded!r}" if excluded else ""))

    def accepting(self, state) -> bool:
        return self.final in state

    def _step(self, state, byte: int):
        targets = [t for node in state for lo, hi, t in self._bytes[node] if lo <= byte <= hi]
        return self._closure(targets, at_start=False) or None

    # ---- construction -----------------------------------------------------------------------

    def _too_large(self) -> RegexError:
        return RegexError(f"the regex is too large: its automaton would have more than {MAX_NODES} nodes (a "
                          "repetition copies what it repeats)")

    def _build_other(self, tree, entry: int) -> int:
        """The `^` and `$` assertions: an edge of their own."""
        end = self._node()
        (self._starts if tree[0] == "^" else self._ends)[entry].append(end)
        return end

    def _find_live(self) -> set[tuple[int, bool]]:
        """The (node, past a `$`) pairs from which the final node is reachable after the first byte (no `^`)."""
        before: dict[tuple[int, bool], list[tuple[int, bool]]] = {}
        for node in range(len(self._bytes)):
            for ended in (False, True):
                for target in self._empty[node]:
                    before.setdefault((target, ended), []).append((node, ended))
                for target in self._ends[node]:
                    before.setdefault((target, True), []).append((node, ended))
            for _, _, target in self._bytes[node]:
                before.setdefault((target, False), []).append((node, False))
        live = {(self.final, False), (self.final, True)}
        todo = list(live)
        while todo:
            for pair in before.get(todo.pop(), ()):
                if pair not in live:
                    live.add(pair)
                    todo.append(pair)
        return live

    def _closure(self, seeds, at_start: bool) -> frozenset[int]:
        """The live nodes that read a byte, reached from `seeds` by epsilon and assertion edges (`^` only
        `at_start`), and the final node where it is reached."""
        live = self._live
        todo = [(node, False) for node in seeds if at_start or (node, False) in live]
        seen = set(todo)
        found = set()
        while todo:
            node, ended = todo.pop()
            if node == self.final:
                found.add(node)
            elif not ended and self._bytes[node] and (node, False) in live:
                found.add(node)
            after = [(t, ended) for t in self._empty[node]] + [(t, True) for t in self._ends[node]]
            if at_start:
                after += [(t, ended) for t in self._starts[node]]
            for pair in after:
                if pair not in seen and (at_start or pair in live):
                    seen.add(pair)
                    todo.append(pair)
        return frozenset(self._undominated(found) if self._copies else found)

    def _copy_keys(self) -> list[tuple]:
        """Per node: ((repetition, offset in its copy), copy) for each repetition of `_copies` whose copy holds it."""
        keys: list[tuple] = [()] * len(self._bytes)
        for i, (start, size, count) in enumerate(self._copies):
            for node in range(start, start + size * count):
                copy, offset = divmod(node - start, size)
                keys[node] += (((i, offset), copy),)
        return keys

    def _undominated(self, found: set[int]) -> set[int]:
        """`found` less each node of a bounded repetition's copy where the same node of an earlier copy (`_copies`)
        is in `found`: that one takes every text this one does, so the state's texts are the same."""
        first: dict = {}
        for node in found:
            for key, copy in self._copy_of[node]:
                if first.get(key, copy) >= copy:
                    first[key] = copy
        return {node for node in found if all(first[key] == copy for key, copy in self._copy_of[node])}


def parse_regex(pattern: str) -> tuple:
    """The syntax tree of `pattern` that a Regex compiles (automaton.TreeParser's nodes: what lark.py builds its
    terminals from); RegexError where it uses what this module does not take."""
    return _Parser(pattern).parse()


def compile_regex(pattern: str, *, search: bool = False, excluded: str = "") -> Regex:
    """`pattern` compiled (cached by the arguments); RegexError where it uses what this module does not take."""
    if not isinstance(pattern, str):
        raise RegexError(f"a regex must be a string, got {type(pattern).__name__}")
    return _compiled(pattern, bool(search), str(excluded))


@functools.lru_cache(maxsize=CACHED_REGEXES)
def _compiled(pattern: str, search: bool, excluded: str) -> Regex:
    return Regex(pattern, search, excluded)


def escape(text: str) -> str:
    """`text` as a regex that takes it alone."""
    return "".join("\\" + c if c in SPECIAL else c for c in text)


def choice_pattern(choices) -> str:
    """The regex of exactly one of `choices` (strings)."""
    return "|".join(escape(choice) for choice in choices)


