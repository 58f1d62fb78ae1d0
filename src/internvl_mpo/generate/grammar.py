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
reference to a rule never defined, no `root` rule, surrogate code points, a bound above automaton.MAX_REPEAT, a
left-recursive rule whose every alternative begins with itself (it derives no text; named with its cycle), and a root
that derives no text within MAX_DEPTH. Lark grammars (vLLM's other syntax) are converted to GBNF first (lark.py).

Left recursion (a rule that can call itself before reading a byte, as xgrammar takes it: `expr ::= expr "+" term |
term`, through other rules, behind rules or repetitions that may be empty) is rewritten on the rules' trees to the same
language without it (_LeftRecursion: a rule that derives the empty text split into it and a variant without it,
Paull's algorithm, a rule's own left recursion made a repetition `expr ::= term ("+" term)*`, so that a long sentence
opens no more calls than a short one); a grammar without left recursion is compiled as written.

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
            if e in ("", "\n", "\r"):
                raise self.refuse("a '\\' at the end of its line escapes nothing", start)
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
            if self.peek() == "-" and self.text[self.pos + 1: self.pos + 2] not in ("]", "", "\n", "\r"):
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
        rules = {name: tree for name, (tree, _) in parser.parse().items()}
        if "root" not in rules:
            raise GrammarError("grammar: it has no `root` rule (where its sentences begin)")
        for tree in rules.values():
            _refuse_undefined(tree, rules, parser)
        rules = _without_left_recursion(rules)
        self._calls: list[list[tuple[int, int]]] = []  # (the called rule's entry node, the return node)
        self._extra = (self._calls,)
        self._entries = [self._node() for _ in rules]
        self._exits = set()
        numbers = self._numbers = {name: i for i, name in enumerate(rules)}
        for i, tree in enumerate(rules.values()):
            first, last = self._build(tree)
            self._empty[self._entries[i]].append(first)
            self._exits.add(last)
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
        return _too_large()

    def _build_other(self, tree, entry: int) -> int:
        """Literal bytes (a chain of byte edges) and rule references (a call edge)."""
        if tree[0] == "bytes":
            end = entry
            for byte in tree[1]:
                after = self._node()
                self._bytes[end].append((byte, byte, after))
                end = after
            return end
        end = self._node()  # a "ref"
        self._calls[entry].append((self._entries[self._numbers[tree[1]]], end))
        return end

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


# ---- left recursion rewritten away (on the rules' trees) ------------------------------------

EMPTY = ("alt", ())  # the empty language: no text at all
SMALL = 16  # NFA nodes of a part of a rewritten rule copied where it is used (a larger one is a rule of its own)


def _too_large() -> GrammarError:
    return GrammarError(f"grammar: too large: its automaton would have more than {MAX_NODES} nodes (a repetition "
                        "copies what it repeats, and so does rewriting left recursion)")


def _refuse_undefined(tree, rules: dict, parser: _Parser) -> None:
    """A GrammarError naming the place of the first call of a rule never defined in `tree`."""
    if tree[0] == "ref" and tree[1] not in rules:
        raise parser.refuse(f"the rule {tree[1]!r} is used but never defined", tree[2])
    for part in (tree[1] if tree[0] in ("cat", "alt") else (tree[1],) if tree[0] == "rep" else ()):
        _refuse_undefined(part, rules, parser)


def _nullable(tree, nullable: set[str]) -> bool:
    """Whether `tree` derives the empty text (`nullable`: the rules that do)."""
    kind = tree[0]
    if kind in ("bytes", "set"):
        return kind == "bytes" and not tree[1]
    if kind == "ref":
        return tree[1] in nullable
    if kind == "rep":
        return tree[2] == 0 or _nullable(tree[1], nullable)
    return (all if kind == "cat" else any)(_nullable(part, nullable) for part in tree[1])


def _firsts(tree, nullable: set[str]) -> set[str]:
    """The rules `tree` can call before reading a byte."""
    kind = tree[0]
    if kind == "ref":
        return {tree[1]}
    if kind == "rep":
        return _firsts(tree[1], nullable) if tree[3] != 0 else set()
    found: set[str] = set()
    for part in tree[1] if kind in ("cat", "alt") else ():
        found |= _firsts(part, nullable)
        if kind == "cat" and not _nullable(part, nullable):
            break
    return found


def _size(tree) -> int:
    """About the number of NFA nodes of `tree` (a repetition's copies counted)."""
    kind = tree[0]
    if kind in ("cat", "alt"):
        return 1 + sum(_size(part) for part in tree[1])
    if kind == "rep":
        return 1 + _size(tree[1]) * (tree[2] + 1 if tree[3] is None else tree[3])
    return 1 + (len(tree[1]) if kind == "bytes" else 1)


def _refs(tree) -> set[str]:
    """The rules `tree` calls, anywhere in it."""
    kind = tree[0]
    if kind == "ref":
        return {tree[1]}
    if kind == "rep":
        return _refs(tree[1])
    return set().union(*map(_refs, tree[1])) if kind in ("cat", "alt") else set()


def _nullable_rules(rules: dict) -> set[str]:
    """The rules of `rules` ({name: tree}) that derive the empty text. A rule is checked again only when one it calls
    turns out to: passes over every rule until none changed took one pass per rule of a chain (minutes at 3000)."""
    callers: dict[str, list[str]] = {}
    for name, tree in rules.items():
        for callee in _refs(tree):
            callers.setdefault(callee, []).append(name)
    nullable: set[str] = set()
    todo = list(rules)
    while todo:
        name = todo.pop()
        if name not in nullable and _nullable(rules[name], nullable):
            nullable.add(name)
            todo += callers.get(name, [])
    return nullable


def _components(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each node's strongly connected component in `graph` ({node: its successors}): Tarjan's algorithm, with a
    stack of its own for chains of thousands of rules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    component: dict[str, int] = {}
    stack: list[str] = []
    for root in graph:
        if root in index:
            continue
        index[root] = low[root] = len(index)
        stack.append(root)
        work = [(root, iter(sorted(graph[root])))]
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor not in component:  # on the stack: in the component being found
                    low[node] = min(low[node], index[successor])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    while (member := stack.pop()) != node:
                        component[member] = index[node]
                    component[node] = index[node]
    return component


def _cycles(firsts: dict) -> dict[str, list[str]]:
    """{rule: a path of first calls from it back to itself (name, ..., name)} for the rules on such a cycle, in the
    rules' order: those of a strongly connected component of more than one rule, or calling themselves first.
    Searched only within the rule's component (nothing outside it leads back), with each rule's caller kept rather
    than its whole path (copies of paths made the search cubic in a chain's length)."""
    component = _components(firsts)
    sizes: dict[int, int] = {}
    for number in component.values():
        sizes[number] = sizes.get(number, 0) + 1
    cycles = {}
    for name in firsts:
        if name not in firsts[name] and sizes[component[name]] == 1:
            continue
        callers, todo = {name: None}, [name]
        while name not in cycles:
            node = todo.pop()
            for callee in sorted(firsts[node]):
                if callee == name:
                    path = [name]
                    while node is not None:
                        path.append(node)
                        node = callers[node]
                    cycles[name] = path[::-1]
                    break
                if callee not in callers and component[callee] == component[name]:
                    callers[callee] = node
                    todo.append(callee)
    return cycles


def _without_left_recursion(rules: dict) -> dict:
    """`rules` ({name: tree}) where no rule can call itself before reading a byte: the same ones where none can, else
    the same language without left recursion (_LeftRecursion)."""
    nullable = _nullable_rules(rules)
    firsts = {name: _firsts(tree, nullable) for name, tree in rules.items()}
    cycles = _cycles(firsts)
    return _LeftRecursion(rules, nullable, cycles).rules if cycles else rules


class _LeftRecursion:
    """Left recursion rewritten away, the language kept. The rules on a cycle of first calls (`cycles`) are written
    as alternatives (sequences of trees) that each begin with a literal, a set or a call of a rule that does not
    derive the empty text (`leading`): a rule `a` that does is `a ::= a' | ""`, its variant `a'` the same less the
    empty text (`nonempty`, a variant made for each such rule called first). Then, in the rules' order (Paull's
    algorithm), a first call of an earlier rule of the same cycles is replaced by that rule's alternatives and a
    rule's own left recursion `a ::= a x | a y | b | c` becomes `a ::= (b | c) (x | y)*`: a repetition, not a
    right-recursive rule, so a long sentence (200 `+ term`) opens no more calls than a short one; its large parts are
    rules of their own, called where the rule is substituted, not copied. A rule whose every alternative begins with
    itself derives no text and is refused naming its cycle."""

    def __init__(self, rules: dict, nullable: set[str], cycles: dict):
        self.original, self.nullable, self.cycles = rules, nullable, cycles
        self.rules = dict(rules)  # the result, variants added
        self.variants = {name: name + "'" for name in cycles if name in nullable}
        self.todo = []  # variants of rules on no cycle whose bodies are still to be made
        self.base = {variant: name for name, variant in self.variants.items()}
        alternatives = {}
        for name in cycles:
            if name in nullable:
                self.rules[name] = ("alt", (("ref", self.variants[name], None), ("bytes", b"")))
                alternatives[self.variants[name]] = list(dict.fromkeys(self.leading((self.nonempty(rules[name]),))))
            else:
                alternatives[name] = list(dict.fromkeys(self.leading((rules[name],))))
        while self.todo:
            name = self.todo.pop()
            self.rules[self.variants[name]] = self.nonempty(rules[name])
        reach = {name: self.reach(name, alternatives) for name in alternatives}
        done: list[str] = []
        for name in alternatives:
            sequences = alternatives[name]
            for earlier in (rule for rule in done if rule in reach[name] and name in reach[rule]):
                substituted = []
                for sequence in sequences:
                    if self.calls(sequence, earlier):
                        substituted += [found + sequence[1:] for found in alternatives[earlier]]
                    else:
                        substituted.append(sequence)
                sequences = list(dict.fromkeys(substituted))
                if len(sequences) > MAX_NODES:
                    raise _too_large()
            alternatives[name] = self.direct(name, sequences, {rule for rule in reach[name] if name in reach[rule]})
            done.append(name)

    @staticmethod
    def calls(sequence: tuple, name: str) -> bool:
        """Whether `sequence` begins with a call of the rule `name`."""
        return bool(sequence) and sequence[0][0] == "ref" and sequence[0][1] == name

    def reach(self, name: str, alternatives: dict) -> set[str]:
        """The rules of `alternatives` that `name`'s can call first, through one another."""
        seen, todo = set(), [name]
        while todo:
            for sequence in alternatives[todo.pop()]:
                callee = sequence[0][1] if sequence and sequence[0][0] == "ref" else None
                if callee in alternatives and callee not in seen:
                    seen.add(callee)
                    todo.append(callee)
        return seen

    def direct(self, name: str, sequences: list[tuple], cycle: set[str]) -> list[tuple]:
        """`name`'s alternatives without its own left recursion, its rule's tree written (`self.rules`): those that
        begin otherwise, then its tails repeated (`name ::= (b | c) (x | y)*`). Where large, the repetition is a rule
        of its own (`name*`), and so are the alternatives that begin with no rule of its `cycle` (`name^`): later
        rules that begin with `name` get calls of them, not copies."""
        tails = [sequence[1:] for sequence in sequences if self.calls(sequence, name)]
        bases = [sequence for sequence in sequences if not self.calls(sequence, name)]
        if tails and not bases and name not in self.base:
            raise GrammarError(f"grammar: the rule {name!r} is left-recursive ({' -> '.join(self.cycles[name])}, "
                               "reading no byte) and has no alternative that begins otherwise: it derives no text")
        tails = [tail for tail in tails if tail]  # `a ::= a` adds nothing
        ends: tuple = ()
        if tails:
            ends = (self.named(name + "*", ("rep", ("alt", tuple(("cat", tail) for tail in tails)), 0, None)),)
        inner = [sequence for sequence in bases if sequence[0][0] == "ref" and sequence[0][1] in cycle]
        outer = [sequence for sequence in bases if sequence not in inner]
        if outer:
            outer = [(self.named(name + "^", ("alt", tuple(("cat", sequence) for sequence in outer))),)]
        kept = [sequence + ends for sequence in outer + inner]
        self.rules[name] = ("alt", tuple(("cat", sequence) for sequence in kept))
        return kept

    def named(self, name: str, tree):
        """`tree`, or where it is large a call of a new rule `name` of it."""
        if _size(tree) <= SMALL:
            return tree
        self.rules[name] = tree
        return ("ref", name, None)

    def variant(self, name: str) -> str:
        """The name of the rule `name` less the empty text (made once)."""
        if name not in self.variants:
            self.variants[name] = name + "'"
            self.base[name + "'"] = name
            self.todo.append(name)
        return self.variants[name]

    def nonempty(self, tree):
        """`tree` less the empty text."""
        if not _nullable(tree, self.nullable):
            return tree
        kind = tree[0]
        if kind == "ref":
            return ("ref", self.variant(tree[1]), tree[2])
        if kind == "cat":  # the first part that is not empty
            parts = tree[1]
            return ("alt", tuple(("cat", (self.nonempty(part),) + parts[i + 1:]) for i, part in enumerate(parts)))
        if kind == "alt":
            return ("alt", tuple(self.nonempty(part) for part in tree[1]))
        if kind == "rep" and tree[3] != 0:  # one that is not empty, then any (empty ones stand for the least count)
            return ("cat", (self.nonempty(tree[1]), ("rep", tree[1], 0, None if tree[3] is None else tree[3] - 1)))
        return EMPTY  # "", x{0}

    def leading(self, sequence: tuple) -> list[tuple]:
        """`sequence` (of trees) as alternatives that each begin with a literal, a set or a call of a rule that does
        not derive the empty text (or are empty)."""
        found: list[tuple] = []
        while sequence:
            head, rest = sequence[0], sequence[1:]
            kind = head[0]
            if kind == "cat":
                sequence = head[1] + rest
            elif kind == "alt":
                found += [begun for part in head[1] for begun in self.leading((part,) + rest)]
                break
            elif kind == "rep" and head[3] != 0 and head[2] and not _nullable(head[1], self.nullable):
                sequence = (head[1], ("rep", head[1], head[2] - 1, None if head[3] is None else head[3] - 1)) + rest
            elif kind == "rep":  # once not empty, then fewer times; or not at all
                if head[3] != 0:
                    again = ("rep", head[1], 0, None if head[3] is None else head[3] - 1)
                    found += self.leading((self.nonempty(head[1]), again) + rest)
                sequence = rest
            elif kind == "ref" and head[1] in self.nullable:  # the rule less the empty text; or the empty text
                found.append((self.nonempty(head),) + rest)
                sequence = rest
            elif kind == "bytes" and not head[1]:
                sequence = rest
            else:
                found.append(sequence)
                break
        else:
            found.append(())
        if len(found) > MAX_NODES:
            raise _too_large()
        return found


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

