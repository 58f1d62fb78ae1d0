"""Context-free grammars in GBNF as byte-level pushdown recognizers: guided decoding to a grammar (vLLM's
`guided_grammar`, `structured_outputs: {"grammar": ...}`).

`compile_grammar(text)` gives a `Grammar`: a recognizer of the UTF-8 bytes of the sentences of the grammar's `root` rule
(the whole text). The syntax is GBNF as llama.cpp and xgrammar take it: rules `name ::= alternatives` (a name of
letters, digits, `_`, `-` and `.`, not beginning with a digit; a rule ends where the next `name ::=` begins, so a body
may span lines), string literals `"..."`, character classes `[a-z0-9_]` and `[^...]` (code points; `[^]` is any), `.`
(any code point), rule references, grouping `( )` (empty: the empty text), alternation `|`, the repetitions `* + ?`,
`{m}`, `{m,}`, `{m,n}` (one per element), and `#` comments to the end of a line. Escapes, in literals and classes: `\\"
\\\\ \\/ \\' \\?`, `\\n \\r \\t \\b \\f \\a \\v \\0 \\e`, `\\xH...` (any number of hex digits, as xgrammar reads it),
`\\uHHHH`, `\\UHHHHHHHH`; in classes also `\\^ \\$ \\. \\* \\+ \\( \\) \\[ \\] \\{ \\} \\| \\-` (a `-` first or last in
a class is itself). Refused with a GrammarError naming the line and column: syntax errors, a rule defined twice, a
reference to a rule never defined, no `root` rule, surrogate code points, a bound above automaton.MAX_REPEAT, left
recursion (a rule that can reach itself without reading a byte: xgrammar takes it, this module does not), and a root
that derives no text within MAX_DEPTH. Lark grammars (vLLM's other syntax) are converted to GBNF first (lark.py).

Each rule is compiled to a small automaton (Thompson-style, automaton.ByteAutomaton, as regex.py's, its character
classes as UTF-8 byte ranges) over bytes and rule calls; all rules' nodes are numbered together. A state is a frozenset
of stacks: a stack is a tuple of nodes, return points of the calls under way and last the node that reads the next byte;
the empty tuple stands for the end of the root rule (the text so far is accepted). `cost[node]`, found once, is the
least call depth that finishing the node's rule from it needs (infinite where it cannot be finished: those parts are
pruned). A stack is kept only where each of its frames can be finished within MAX_DEPTH frames, and a stack whose top
node reads a byte only where one of those bytes keeps it so: `advance` returns None exactly where no sentence of the
grammar (within MAX_DEPTH nested calls) begins with the bytes so far, and every state it returns has an accepted
completion. Bounds: a sentence that needs more than MAX_DEPTH calls open at once is not taken (the bytes that would open
the deeper call are refused); a state of more than MAX_STACKS stacks (a very ambiguous grammar) keeps the MAX_STACKS
shortest (then in sorted order), so that the answer stays a sentence of the grammar but some sentences can no longer be
written. Moves are memoized per state, cleared past automaton.MAX_HELD stacks held (the NFA's construction and the memo
are automaton.py's, shared with regex.py). `automaton.AutomatonConstraint` holds one answer to a Grammar, with masks as
a regex's (automaton.automaton_mask: the top nodes' byte edges are byte ranges, so the grammar's byte runs class the
tokens and one of each class is walked), cached per grammar and state in the vocabulary.
"""

from __future__ import annotations

import functools
import heapq

from ..errors import InputError
from .automaton import MAX_CODE, MAX_NODES, ByteAutomaton, TreeParser, complement, normalized

MAX_DEPTH = 200  # rule calls open at once (a stack's frames)
MAX_STACKS = 1000  # stacks in one state
MAX_NESTING = 100  # groups inside one another
CACHED_GRAMMARS = 64
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
HEX = frozenset("0123456789abcdefABCDEF")
ESCAPES = {'"': 0x22, "\\": 0x5C, "/": 0x2F, "'": 0x27, "?": 0x3F, "n": 0x0A, "r": 0x0D, "t": 0x09, "b": 0x08,
           "f": 0x0C, "a": 0x07, "v": 0x0B, "0": 0x00, "e": 0x1B}
CLASS_ESCAPES = frozenset("^$\\.*+?()[]{}|/-")
INFINITE = float("inf")


class GrammarError(InputError):
    """A grammar this module does not take; the message names the problem and, where it has one, its place."""


class _Parser(TreeParser):
    """A grammar's text to rules: {name: (tree, position)}, a tree ("bytes", data), ("set", code point ranges),
    ("ref", name, position), ("cat", parts), ("alt", parts) or ("rep", part, least, most or None)."""

    forms = "{m}, {m,} or {m,n}"
    spaced = True

    def where(self, pos: int) -> str:
        line = self.text.count("\n", 0, pos) + 1
        return f"line {line}, column {pos - (self.text.rfind(chr(10), 0, pos) + 1) + 1}"

    def refuse(self, what: str, pos: int | None = None, why: str = "") -> GrammarError:
        where = self.where(self.pos if pos is None else pos)
        return GrammarError(f"grammar: {where}: {what}" + (f" {why}" if why else ""))

    def skip(self) -> None:
        """Past whitespace, line breaks and comments."""
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif c.isspace():
                self.pos += 1
            else:
                return

    def name(self) -> str:
        start = self.pos
        while self.peek() and self.peek() in NAME_CHARS:
            self.pos += 1
        return self.text[start: self.pos]

    def rule_begins(self) -> bool:
        """Whether a `name ::=` begins here (the end of the rule before it)."""
        start = self.pos
        name = self.name()
        self.skip()
        found = bool(name) and not name[0].isdigit() and self.text.startswith("::=", self.pos)
        self.pos = start
        return found

    def parse(self) -> dict:
        rules: dict = {}
        self.skip()
        if "::=" not in self.text:
            raise GrammarError("grammar: no rule in it (GBNF's `name ::= ...` or Lark's `name: ...`)")
        while self.pos < len(self.text):
            start = self.pos
            name = self.name()
            if not name or name[0].isdigit():
                raise self.refuse(f"expected a rule name, got {self.text[start: start + 10]!r}", start)
            self.skip()
            if not self.text.startswith("::=", self.pos):
                raise self.refuse(f"expected '::=' after the rule name {name!r}")
            if name in rules:
                raise self.refuse(f"the rule {name!r} is defined twice", start)
            self.pos += 3
            rules[name] = (self.alternation(), start)
            if self.pos < len(self.text) and not self.rule_begins():
                raise self.refuse(f"unexpected {self.peek()!r} (a ')' closing no group?)")
        return rules

    def sequence(self):
        parts = []
        while True:
            self.skip()
            if self.peek() in ("", "|", ")") or self.rule_begins():
                return ("cat", tuple(parts))
            parts.append(self.quantified(self.element()))

    def element(self):
        start = self.pos
        c = self.peek()
        if c == '"':
            self.pos += 1
            data = bytearray()
            while self.peek() != '"':
                if self.peek() in ("", "\n"):
                    raise self.refuse("the string literal is never closed (on its line)", start)
                data += chr(self.character(in_class=False)).encode()
            self.pos += 1
            return ("bytes", bytes(data))
        if c == "[":
            return ("set", self.character_class())
        if c == ".":
            self.pos += 1
            return ("set", ((0, MAX_CODE),))
        if c == "(":
            self.pos += 1
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.refuse(f"groups nested more than {MAX_NESTING} deep", start)
            tree = self.alternation()
            self.depth -= 1
            if self.peek() != ")":
                raise self.refuse("the '(' is never closed", start)
            self.pos += 1
            return ("cat", (tree,))
        if c and c in NAME_CHARS and not c.isdigit():
            return ("ref", self.name(), start)
        if c in ("*", "+", "?", "{"):
            raise self.refuse(f"'{c}' repeats nothing")
        if c == "'":
            raise self.refuse("a single-quoted literal (GBNF's literals are double-quoted)")
        raise self.refuse(f"unexpected {c!r}")

    def quantified(self, element):
        bounds = self.quantifier()
        if bounds is None:
            return element
        if self.peek() in ("*", "+", "?", "{"):
            raise self.refuse(f"'{self.peek()}' repeats a repetition (group it: ( ... ))")
        return ("rep", element, *bounds)

    def character(self, in_class: bool) -> int:
        """The code point of the character or escape here (self.pos past it)."""
        start = self.pos
        c = self.peek()
        self.pos += 1
        if c == "\\":
            e = self.peek()
            self.pos += 1
            if e in ESCAPES:
                return ESCAPES[e]
            if in_class and e in CLASS_ESCAPES:
                return ord(e)
            if e in ("x", "u", "U"):
                count = {"u": 4, "U": 8}.get(e)
                digits = ""
                while self.peek() in HEX and (count is None or len(digits) < count):
                    digits += self.peek()
                    self.pos += 1
                if not digits or (count and len(digits) < count) or int(digits, 16) > MAX_CODE:
                    raise self.refuse(f"the escape \\{e}{digits} needs {count or 'some'} hex digits of a code point "
                                      "up to 10FFFF", start)
                c = chr(int(digits, 16))
            else:
                raise self.refuse(f"the escape \\{e} is not supported" + (" (write the class's ranges: [0-9])"
                                                                         if e in "dwsDWS" else ""), start)
        if 0xD800 <= ord(c) <= 0xDFFF:
            raise self.refuse(f"a surrogate U+{ord(c):04X} is not a character UTF-8 can hold", start)
        return ord(c)

    def character_class(self) -> tuple[tuple[int, int], ...]:
        start = self.pos
        self.pos += 1
        negated = self.peek() == "^"
        self.pos += negated
        ranges: list[tuple[int, int]] = []
        while self.peek() != "]":
            if self.peek() in ("", "\n"):
                raise self.refuse("the class '[' has no ']' (on its line)", start)
            item = self.pos
            low = self.character(in_class=True)
            if self.peek() == "-" and self.text[self.pos + 1: self.pos + 2] not in ("]", ""):
                self.pos += 1
                high = self.character(in_class=True)
                if high < low:
                    raise self.refuse(f"the range {self.text[item: self.pos]} has its ends out of order", item)
                ranges.append((low, high))
            else:
                ranges.append((low, low))
        self.pos += 1
        if not ranges and not negated:
            raise self.refuse("the empty class [] matches nothing", start)
        return complement(ranges) if negated else normalized(ranges)


class Grammar(ByteAutomaton):
    """A compiled grammar: `initial` (a state), `advance(state, byte)` (the next state or None), `accepting(state)`.
    Equal (and hashed) by its text."""

    held_to = "the grammar"

    def __init__(self, text: str):
        super().__init__()
        self.key = text
        parser = _Parser(text)
        rules = parser.parse()
        if "root" not in rules:
            raise GrammarError("grammar: it has no `root` rule (where its sentences begin)")
        self._calls: list[list[tuple[int, int]]] = []  # (the called rule's entry node, the return node)
        self._extra = (self._calls,)
        self._names = list(rules)
        self._entries = [self._node() for _ in rules]
        self._exits = set()
        numbers = self._numbers = {name: i for i, name in enumerate(rules)}
        self._parser = parser  # names the place of an undefined rule
        for i, (tree, _) in enumerate(rules.values()):
            first, last = self._build(tree)
            self._empty[self._entries[i]].append(first)
            self._exits.add(last)
        self._refuse_left_recursion()
        self.cost = self._costs()
        if self.cost[self._entries[numbers["root"]]] >= MAX_DEPTH:
            raise GrammarError("grammar: the root rule derives no text" + (
                "" if self.cost[self._entries[numbers["root"]]] == INFINITE else
                f" within {MAX_DEPTH} nested rule calls"))
        self._byte_cost = [min((self.cost[t] for _, _, t in edges), default=INFINITE) for edges in self._bytes]
        self.initial = self._closure([(self._entries[numbers["root"]],)])

    def accepting(self, state) -> bool:
        return () in state

    def _step(self, state, byte: int):
        cost = self.cost
        seeds = [stack[:-1] + (t,) for stack in state if stack for lo, hi, t in self._bytes[stack[-1]]
                 if lo <= byte <= hi and len(stack) + cost[t] <= MAX_DEPTH]
        return self._closure(seeds) or None

    # ---- construction -----------------------------------------------------------------------

    def _too_large(self) -> GrammarError:
        return GrammarError(f"grammar: too large: its automaton would have more than {MAX_NODES} nodes (a "
                            "repetition copies what it repeats)")

    def _build_other(self, tree, entry: int) -> int:
        """Literal bytes (a chain of byte edges) and rule references (a call edge)."""
        if tree[0] == "bytes":
            end = entry
            for byte in tree[1]:
                after = self._node()
                self._bytes[end].append((byte, byte, after))
                end = after
            return end
        _, name, pos = tree  # "ref"
        if name not in self._numbers:
            raise self._parser.refuse(f"the rule {name!r} is used but never defined", pos)
        end = self._node()
        self._calls[entry].append((self._entries[self._numbers[name]], end))
        return end

    def _refuse_left_recursion(self) -> None:
        """A GrammarError naming a rule that can call itself before reading a byte (the closure would not end)."""
        nullable: set[int] = set()  # entries of the rules that derive the empty text
        while True:
            found = {entry for entry in self._entries if entry not in nullable and self._exits & self._reach(entry,
                                                                                                         nullable)}
            if not found:
                break
            nullable |= found
        first = {entry: {callee for node in self._reach(entry, nullable) for callee, _ in self._calls[node]}
                 for entry in self._entries}
        names = dict(zip(self._entries, self._names))
        for entry in self._entries:  # a path back to `entry` through first calls
            paths, todo = {entry: [entry]}, [entry]
            while todo:
                node = todo.pop()
                for callee in first[node]:
                    if callee == entry:
                        cycle = " -> ".join(names[n] for n in paths[node] + [entry])
                        raise GrammarError(f"grammar: the rule {names[entry]!r} is left-recursive ({cycle}, reading "
                                           "no byte): this module does not take left recursion (write it as a "
                                           "repetition: a ::= b (\"op\" b)*)")
                    if callee not in paths:
                        paths[callee] = paths[node] + [callee]
                        todo.append(callee)

    def _reach(self, entry: int, nullable: set[int]) -> set[int]:
        """The nodes of `entry`'s rule reached from it by epsilon edges and calls of `nullable` rules."""
        seen, todo = {entry}, [entry]
        while todo:
            node = todo.pop()
            after = self._empty[node] + [t for callee, t in self._calls[node] if callee in nullable]
            for t in after:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    def _costs(self) -> list[float]:
        """Per node, the least number of frames above its own that finishing its rule from it needs (INFINITE:
        it cannot be finished): 0 at a rule's exit, a byte or epsilon edge's target's, a call's the larger of 1 +
        the called rule's entry's and its return node's. Found from the exits back, least first (Knuth's
        generalization of Dijkstra's algorithm: each edge's cost is monotone and no less than its parts)."""
        before: list[list[tuple[int, tuple[int, int] | None]]] = [[] for _ in self._bytes]
        for node in range(len(self._bytes)):
            for t in self._empty[node] + [t for _, _, t in self._bytes[node]]:
                before[t].append((node, None))
            for call in self._calls[node]:
                before[call[0]].append((node, call))
                before[call[1]].append((node, call))
        cost = [INFINITE] * len(self._bytes)
        heap = [(0, node) for node in self._exits]
        for node in self._exits:
            cost[node] = 0
        while heap:
            value, node = heapq.heappop(heap)
            if value > cost[node]:
                continue
            for previous, call in before[node]:
                found = value if call is None else max(1 + cost[call[0]], cost[call[1]])
                if found < cost[previous]:
                    cost[previous] = found
                    heapq.heappush(heap, (found, previous))
        return cost

    def _closure(self, seeds) -> frozenset:
        """The stacks reached from `seeds` by epsilon edges, calls and returns whose top node reads a byte that
        keeps them finishable, and () where the root rule ends; at most MAX_STACKS of them."""
        cost, byte_cost, exits = self.cost, self._byte_cost, self._exits
        seen = set(seeds)
        todo = list(seeds)
        found = set()
        while todo:
            stack = todo.pop()
            node, depth = stack[-1], len(stack)
            if depth + byte_cost[node] <= MAX_DEPTH:
                found.add(stack)
            after = [stack[:-1] + (t,) for t in self._empty[node] if depth + cost[t] <= MAX_DEPTH]
            after += [stack[:-1] + (t, callee) for callee, t in self._calls[node]
                      if depth + cost[t] <= MAX_DEPTH and depth + 1 + cost[callee] <= MAX_DEPTH]
            if node in exits:
                if depth == 1:
                    found.add(())
                else:
                    after.append(stack[:-1])
            for s in after:
                if s not in seen:
                    seen.add(s)
                    todo.append(s)
        if len(found) > MAX_STACKS:
            found = set(sorted(found, key=lambda s: (len(s), s))[:MAX_STACKS])
        return frozenset(found)


def compile_grammar(text: str) -> Grammar:
    """`text`, a GBNF grammar (or a Lark one, converted by lark.py), compiled (cached); GrammarError where it does not
    parse or uses what this module does not take."""
    if not isinstance(text, str):
        raise GrammarError(f"a grammar must be a string, got {type(text).__name__}")
    from .lark import is_lark, lark_to_gbnf  # lark.py imports this module
    return _compiled(lark_to_gbnf(text) if is_lark(text) else text)


@functools.lru_cache(maxsize=CACHED_GRAMMARS)
def _compiled(text: str) -> Grammar:
    return Grammar(text)

