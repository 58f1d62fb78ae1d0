"""Lark grammars (the other syntax vLLM takes for `guided_grammar` and `structured_outputs: {"grammar": ...}`)
converted to GBNF for grammar.py.

`is_lark(text)` is vLLM's decision (its `grammar_is_likely_lark`): a non-empty text is Lark when none of its lines, cut
at its first `#` or `//` (even inside a literal), holds `::=`. `lark_to_gbnf(text)` gives the GBNF of the same language.
vLLM's own converter rewrites rule heads, `|` continuation lines and single quotes only, and drops `%import` and
`%ignore` lines silently; this one takes more of Lark, and refuses what it cannot convert. Taken: definitions `name:
...` (rules, lowercase, `?name` and `!name` taken as plain rules) and `NAME: ...` (terminals, uppercase; a terminal may
use terminals only), a priority (`rule.2:`, `NAME.2:`: it picks among parses, the language is the same), alternatives
`|` (a line beginning with `|` continues the definition), aliases `-> name` (ignored: they name tree nodes), string
literals `"..."` and `'...'` with the escapes `\\n \\t \\r \\f \\\\ \\" (\\' in '...') \\xHH \\uHHHH \\UHHHHHHHH`, the
range `"a".."z"`, regex literals `/.../` as regex.py takes them (classes, `.` (all but \\n, as in Python), groups,
alternation, `* + ? {m,n}`; `\\d \\w \\s` in their ASCII meanings, where Python's are Unicode's), grouping `( )`, `[ ]`
(optional), `* + ?`, `~ n` and `~ n..m` (up to automaton.MAX_REPEAT), `//` and `#` comments, and `%import common.X`
(also `-> Y` and `%import common (X, Y)`) for the terminals of Lark's common.lark, written here (COMMON). The root is
the rule `start`, or where there is none the first definition (as vLLM has it; Lark itself needs `start`). A terminal is
taken as all the texts it matches (Lark's Earley with lexer="dynamic_complete"); Lark's other lexers match a terminal
greedily, so there a grammar whose terminal can swallow the next one's text takes fewer sentences. Refused with a
GrammarError naming the line and column: `%ignore` (it lets its text appear between any two tokens, which GBNF cannot
say: write the whitespace into the rules; vLLM drops it silently, which changes the language), other directives than
`%import common`, flags (`"a"i`, `/a/i`), regex lookarounds, backreferences, anchors and what else regex.py refuses,
templates, names used but never defined or defined twice, and syntax errors.

A Lark rule keeps its name in the GBNF (GBNF's `root ::= start` is added; a Lark rule named `root` that is not the
root becomes `root-`); an imported terminal is `X ::= common.X`, common.lark's terminals named `common.X`.
"""

from __future__ import annotations

import functools

from .automaton import MAX_REPEAT, SURROGATES, without
from .grammar import GrammarError
from .regex import RegexError, parse_regex

MAX_NESTING = 50  # Lark groups inside one another (grammar.py takes 100 deep; a regex's groups add to them)
NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
NAME_CHARS = NAME_START | frozenset("0123456789")
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "\\": "\\"}
HEX = frozenset("0123456789abcdefABCDEF")
CLASS_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 !#%&',:;<=>@_`~")
# Lark's common.lark, its lazy regexes written as the texts they match (ESCAPED_STRING ends at the first `"` not
# escaped by a backslash, C_COMMENT at the first `*/`)
COMMON = r"""
DIGIT: "0".."9"
HEXDIGIT: "a".."f"|"A".."F"|DIGIT
INT: DIGIT+
SIGNED_INT: ["+"|"-"] INT
DECIMAL: INT "." INT? | "." INT
_EXP: ("e"|"E") SIGNED_INT
FLOAT: INT _EXP | DECIMAL _EXP?
SIGNED_FLOAT: ["+"|"-"] FLOAT
NUMBER: FLOAT | INT
SIGNED_NUMBER: ["+"|"-"] NUMBER
ESCAPED_STRING: "\"" /([^"\\\n]|\\.)*/ "\""
LCASE_LETTER: "a".."z"
UCASE_LETTER: "A".."Z"
LETTER: UCASE_LETTER | LCASE_LETTER
WORD: LETTER+
CNAME: ("_"|LETTER) ("_"|LETTER|DIGIT)*
WS_INLINE: (" "|/\t/)+
WS: /[ \t\f\r\n]/+
CR: /\r/
LF: /\n/
NEWLINE: (CR? LF)+
SH_COMMENT: /#[^\n]*/
CPP_COMMENT: /\/\/[^\n]*/
C_COMMENT: "/*" /([^*]|\*+[^*\/])*\*+\//
SQL_COMMENT: /--[^\n]*/
"""


def is_lark(text) -> bool:
    """Whether vLLM takes `text` as a Lark grammar: a non-empty string none of whose lines holds `::=` before its
    first `#` or `//`."""
    if not isinstance(text, str) or not text:
        return False
    for line in text.split("\n"):
        cuts = [i for i in (line.find("#"), line.find("//")) if i >= 0]
        if "::=" in line[: min(cuts, default=len(line))]:
            return False
    return True


class _Parser:
    """A Lark grammar's text to definitions: {name: (tree, position)}, a tree ("str", text), ("set", code point
    ranges), ("ref", name, position), ("cat", parts), ("alt", parts) or ("rep", part, least, most or None); and
    `imports`: {name: (the common terminal, position)}."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.depth = 0
        self.definitions: dict = {}
        self.imports: dict = {}

    def peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.text[i] if i < len(self.text) else ""

    def refuse(self, what: str, pos: int | None = None) -> GrammarError:
        pos = self.pos if pos is None else pos
        line = self.text.count("\n", 0, pos) + 1
        column = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return GrammarError(f"grammar (Lark): line {line}, column {column}: {what}")

    def comment_at(self, i: int) -> bool:
        return self.text.startswith("#", i) or self.text.startswith("//", i)

    def skip_line(self) -> None:
        """Past spaces and a comment, to the end of the line; past the line break too where the next line that is
        not blank begins with `|` (a continuation)."""
        text = self.text
        while self.pos < len(text):
            if text[self.pos] in " \t\r\f\v":
                self.pos += 1
            elif self.comment_at(self.pos):
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            elif text[self.pos] == "\n":
                after = self.pos
                while after < len(text) and (text[after].isspace() or self.comment_at(after)):
                    if self.comment_at(after):
                        end = text.find("\n", after)
                        after = len(text) if end < 0 else end
                    else:
                        after += 1
                if text.startswith("|", after):
                    self.pos = after
                return
            else:
                return

    def skip_blank(self) -> None:
        """Past spaces, line breaks and comments."""
        while self.pos < len(self.text):
            if self.text[self.pos].isspace():
                self.pos += 1
            elif self.comment_at(self.pos):
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                return

    def name(self) -> str:
        start = self.pos
        if self.peek() and self.peek() in NAME_START:
            while self.peek() and self.peek() in NAME_CHARS:
                self.pos += 1
        return self.text[start: self.pos]

    def number(self) -> int:
        start = self.pos
        while self.peek().isdigit() and self.peek().isascii():
            self.pos += 1
        if start == self.pos:
            raise self.refuse(f"expected a number, got {self.text[start: start + 10]!r}")
        return int(self.text[start: self.pos])

    def end_of_line(self, what: str) -> None:
        self.skip_line()
        if self.peek() not in ("", "\n"):
            raise self.refuse(f"unexpected {self.text[self.pos: self.pos + 10]!r} after {what}")

    def parse(self) -> None:
        while True:
            self.skip_blank()
            if self.pos >= len(self.text):
                return
            if self.peek() == "%":
                self.directive()
            else:
                self.definition()

    def definition(self) -> None:
        start = self.pos
        while self.peek() in ("?", "!"):
            self.pos += 1
        modifiers = self.pos > start
        name = self.name()
        if not name:
            raise self.refuse(f"expected a rule or terminal name, got {self.text[self.pos: self.pos + 10]!r}")
        if modifiers and name.isupper():
            raise self.refuse(f"the terminal {name!r} has a rule's '?' or '!' (they go on rules only)", start)
        if self.peek() == "{":
            raise self.refuse(f"{name!r} is a template (name{{...}}): templates are not taken")
        if self.peek() == ".":  # a priority: it picks among parses, the language is the same
            self.pos += 1
            self.pos += self.peek() in ("+", "-")
            self.number()
        self.skip_line()
        if self.peek() != ":":
            raise self.refuse(f"expected ':' after the name {name!r} (a definition is `name: ...`)")
        self.pos += 1
        if name in self.definitions or name in self.imports:
            raise self.refuse(f"{name!r} is defined twice", start)
        self.skip_line()
        self.pos += self.peek() == "|"  # a first alternative's '|' on a line of its own
        tree = self.expansions()
        self.end_of_line(f"the definition of {name!r} (a ')' or ']' closing no group?)")
        self.definitions[name] = (tree, start)

    def directive(self) -> None:
        start = self.pos
        self.pos += 1
        word = self.name()
        if word == "ignore":
            raise self.refuse("%ignore is not taken: it lets its text (whitespace) appear between any two tokens, "
                              "which GBNF cannot say (write it into the rules, e.g. `WS?` between items)", start)
        if word != "import":
            raise self.refuse(f"the directive %{word} is not taken (only %import common.X is)", start)
        self.skip_line()
        module_pos = self.pos
        module = self.name()
        if module != "common":
            raise self.refuse("only Lark's common terminals are imported (%import common.X, %import common (X, Y))",
                              module_pos)
        if self.peek() == ".":
            self.pos += 1
            name_pos = self.pos
            name = self.name()
            self.skip_line()
            alias = name
            if self.text.startswith("->", self.pos):
                self.pos += 2
                self.skip_line()
                alias = self.name()
            self.add_import(alias, name, name_pos)
        else:
            self.skip_line()
            if self.peek() != "(":
                raise self.refuse("expected '.X' or '(X, Y)' after %import common")
            while True:
                self.pos += 1
                self.skip_line()
                name_pos = self.pos
                name = self.name()
                self.add_import(name, name, name_pos)
                self.skip_line()
                if self.peek() != ",":
                    break
            if self.peek() != ")":
                raise self.refuse("expected ')' closing the names of %import common (X, Y)")
            self.pos += 1
        self.end_of_line("%import")

    def add_import(self, alias: str, name: str, pos: int) -> None:
        if name not in COMMON_DEFINITIONS:
            raise self.refuse(f"common has no terminal {name!r} (it has {', '.join(sorted(COMMON_DEFINITIONS))})",
                              pos)
        if not alias.isupper():
            raise self.refuse(f"expected a terminal's (uppercase) name after '->', got {alias!r}")
        if alias in self.definitions or alias in self.imports:
            raise self.refuse(f"{alias!r} is defined twice", pos)
        self.imports[alias] = (name, pos)

    def expansions(self):
        parts = [self.expansion()]
        while self.peek() == "|":
            self.pos += 1
            parts.append(self.expansion())
        return parts[0] if len(parts) == 1 else ("alt", tuple(parts))

    def expansion(self):
        parts = []
        while True:
            self.skip_line()
            if self.peek() in ("", "\n", "|", ")", "]"):
                return ("cat", tuple(parts))
            if self.text.startswith("->", self.pos):  # an alias names a tree node: the language is the same
                self.pos += 2
                self.skip_line()
                if not self.name():
                    raise self.refuse("expected a name after '->'")
                self.skip_line()
                if self.peek() not in ("", "\n", "|", ")", "]"):
                    raise self.refuse(f"unexpected {self.peek()!r} after an alias (an alias ends an alternative)")
                return ("cat", tuple(parts))
            parts.append(self.expression())

    def expression(self):
        tree = self.atom()
        self.skip_line()
        c = self.peek()
        if c in ("*", "+", "?"):
            self.pos += 1
            tree = ("rep", tree, *{"*": (0, None), "+": (1, None), "?": (0, 1)}[c])
        elif c == "~":
            start = self.pos
            self.pos += 1
            self.skip_line()
            least = most = self.number()
            if self.text.startswith("..", self.pos):
                self.pos += 2
                most = self.number()
            if max(least, most) > MAX_REPEAT:
                raise self.refuse(f"the repetition ~ {self.text[start + 1: self.pos].strip()} is over the limit of "
                                  f"{MAX_REPEAT}", start)
            if most < least:
                raise self.refuse(f"the repetition ~ {self.text[start + 1: self.pos].strip()} has its bounds out of "
                                  "order", start)
            tree = ("rep", tree, least, most)
        elif c == "{":
            raise self.refuse("a '{' (write a repetition as `x ~ m..n`; templates are not taken)")
        else:
            return tree
        self.skip_line()
        if self.peek() in ("*", "+", "?", "~"):
            raise self.refuse(f"'{self.peek()}' repeats a repetition (group it: ( ... ))")
        return tree

    def atom(self):
        start = self.pos
        c = self.peek()
        if c in ("(", "["):
            self.pos += 1
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise self.refuse(f"groups nested more than {MAX_NESTING} deep", start)
            tree = self.expansions()
            self.depth -= 1
            close = ")" if c == "(" else "]"
            if self.peek() != close:
                raise self.refuse(f"the '{c}' is never closed (a line break inside a group goes only before a '|')",
                                  start)
            self.pos += 1
            return ("cat", (tree,)) if c == "(" else ("rep", tree, 0, 1)
        if c in ('"', "'"):
            text = self.string()
            self.skip_line()
            if not self.text.startswith("..", self.pos):
                return ("str", text)
            self.pos += 2
            self.skip_line()
            high_pos = self.pos
            if self.peek() not in ('"', "'"):
                raise self.refuse("expected a string literal after '..'")
            high = self.string()
            if len(text) != 1 or len(high) != 1:
                raise self.refuse("a range `\"a\"..\"z\"` is between single characters", start)
            if ord(high) < ord(text):
                raise self.refuse(f"the range {self.text[start: self.pos]} has its ends out of order", high_pos)
            return ("set", ((ord(text), ord(high)),))
        if c == "/":
            return self.regex()
        if c and c in NAME_START:
            name = self.name()
            return ("ref", name, start)
        if c == "%":
            raise self.refuse("a directive must begin its own line")
        raise self.refuse(f"unexpected {c!r}")

    def string(self) -> str:
        start = self.pos
        quote = self.peek()
        self.pos += 1
        found = []
        while self.peek() != quote:
            c = self.peek()
            if c in ("", "\n"):
                raise self.refuse("the string literal is never closed (on its line)", start)
            self.pos += 1
            if c == "\\":
                c = self.escape(quote)
            elif 0xD800 <= ord(c) <= 0xDFFF:
                raise self.refuse(f"a surrogate U+{ord(c):04X} is not a character UTF-8 can hold", self.pos - 1)
            found.append(c)
        self.pos += 1
        if self.peek() == "i" and self.peek(1) not in NAME_CHARS:
            raise self.refuse("the flag i (any case) is not taken: write the cases out (\"yes\" | \"Yes\")")
        return "".join(found)

    def escape(self, quote: str) -> str:
        start = self.pos - 1
        e = self.peek()
        self.pos += 1
        if e in ESCAPES:
            return ESCAPES[e]
        if e == quote or (quote == "'" and e == '"'):
            return e
        if e in ("x", "u", "U"):
            count = {"x": 2, "u": 4, "U": 8}[e]
            digits = self.text[self.pos: self.pos + count]
            if len(digits) < count or not all(d in HEX for d in digits) or int(digits, 16) > 0x10FFFF:
                raise self.refuse(f"the escape \\{e} needs {count} hex digits of a code point up to 10FFFF", start)
            self.pos += count
            if 0xD800 <= int(digits, 16) <= 0xDFFF:
                raise self.refuse(f"a surrogate U+{digits.upper()} is not a character UTF-8 can hold", start)
            return chr(int(digits, 16))
        raise self.refuse(f"the escape \\{e} is not taken (in Lark it is a backslash and {e!r}: write \\\\{e} for "
                          "that)", start)

    def regex(self):
        start = self.pos
        self.pos += 1
        while self.peek() != "/":
            if self.peek() in ("", "\n"):
                raise self.refuse("the regex /.../ is never closed (on its line)", start)
            self.pos += 1 + (self.peek() == "\\" and self.peek(1) not in ("", "\n"))
        pattern = self.text[start + 1: self.pos]
        self.pos += 1
        flags = self.pos
        while self.peek() and self.peek().isalpha():
            self.pos += 1
        if self.pos > flags:
            raise self.refuse(f"the regex flags {self.text[flags: self.pos]!r} are not taken (for i, write the cases "
                              "out: [Yy]es)", flags)
        try:
            tree = parse_regex(pattern)
        except RegexError as e:
            raise self.refuse(f"the regex /{pattern}/: {e}", start) from None
        if _has_anchor(tree):
            raise self.refuse(f"the regex /{pattern}/: the anchors ^ and $ are not taken in a terminal", start)
        return tree


def _has_anchor(tree) -> bool:
    if tree[0] in ("^", "$"):
        return True
    if tree[0] in ("cat", "alt"):
        return any(_has_anchor(part) for part in tree[1])
    return tree[0] == "rep" and _has_anchor(tree[1])


def _parsed(text: str) -> _Parser:
    parser = _Parser(text)
    parser.parse()
    return parser


COMMON_DEFINITIONS = _parsed(COMMON).definitions


def _references(tree):
    """The ("ref", name, position) leaves of a tree."""
    if tree[0] == "ref":
        yield tree
    elif tree[0] in ("cat", "alt"):
        for part in tree[1]:
            yield from _references(part)
    elif tree[0] == "rep":
        yield from _references(tree[1])


def _char(code: int, in_class: bool) -> str:
    c = chr(code)
    if (c in CLASS_PLAIN) if in_class else (c.isprintable() and c not in '"\\'):
        return c
    if not in_class and c in '"\\':
        return "\\" + c
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def _merged(parts) -> list:
    """A sequence's parts, its single characters and literals joined into literals, empty parts left out."""
    merged: list = []
    for part in parts:
        if part[0] == "set" and len(part[1]) == 1 and part[1][0][0] == part[1][0][1]:
            part = ("str", chr(part[1][0][0]))
        if part[0] == "str" and merged and merged[-1][0] == "str":
            merged[-1] = ("str", merged[-1][1] + part[1])
        elif part != ("cat", ()) and part != ("str", ""):
            merged.append(part)
    return merged


def _gbnf(tree, names, where: str = "alt") -> str:
    """`tree` in GBNF; `where` is "alt" (anything goes), "seq" (an alternation needs parentheses) or "atom" (so do a
    sequence and a repetition)."""
    kind = tree[0]
    if kind == "str":
        return '"' + "".join(_char(ord(c), in_class=False) for c in tree[1]) + '"'
    if kind == "set":
        ranges = without(tree[1], SURROGATES)
        if not ranges:
            return "[^\\u0000-\\U0010FFFF]"  # the empty class: no character (grammar.py refuses `[]`)
        return "[" + "".join(_char(lo, True) + ("" if lo == hi else "-" + _char(hi, True)) for lo, hi in ranges) + "]"
    if kind == "ref":
        return names[tree[1]]
    if kind == "rep":
        _, part, least, most = tree
        suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((least, most))
        if suffix is None:
            suffix = f"{{{least}}}" if least == most else f"{{{least},{'' if most is None else most}}}"
        text = _gbnf(part, names, "atom") + suffix
        return f"({text})" if where == "atom" else text
    parts = _merged(tree[1]) if kind == "cat" else list(tree[1])
    if not parts:
        return '""'
    if len(parts) == 1:
        return _gbnf(parts[0], names, where)
    text = (" | " if kind == "alt" else " ").join(_gbnf(part, names, "alt" if kind == "alt" else "seq")
                                                  for part in parts)
    return text if where == "alt" or (kind == "cat" and where == "seq") else f"({text})"


@functools.lru_cache(maxsize=64)
def lark_to_gbnf(text: str) -> str:
    """The GBNF of the Lark grammar `text` (see the module's docstring); GrammarError naming the line and column of
    what it does not take."""
    parser = _parsed(text)
    definitions, imports = parser.definitions, parser.imports
    if not definitions:
        raise GrammarError("grammar (Lark): no definition `name: ...` in it")
    start = "start" if "start" in definitions else next(iter(definitions))
    names = {name: name for name in list(definitions) + list(imports)}
    if start != "root" and "root" in definitions:
        names["root"] = "root-"
    for name, (tree, _) in definitions.items():
        for _, used, pos in _references(tree):
            if used not in names:
                raise parser.refuse(f"{used!r} is used but never defined", pos)
            if name.isupper() and not used.isupper():
                raise parser.refuse(f"the terminal {name!r} uses the rule {used!r} (a terminal uses terminals only)",
                                    pos)
    lines = [] if start == "root" else [f"root ::= {start}"]
    lines += [f"{names[name]} ::= {_gbnf(tree, names)}" for name, (tree, _) in definitions.items()]
    lines += [f"{alias} ::= common.{name}" for alias, (name, _) in imports.items()]
    needed, todo = set(), [name for name, _ in imports.values()]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += [used for _, used, _ in _references(COMMON_DEFINITIONS[name][0])]
    common_names = {name: f"common.{name}" for name in COMMON_DEFINITIONS}
    lines += [f"common.{name} ::= {_gbnf(tree, common_names)}" for name, (tree, _) in COMMON_DEFINITIONS.items()
              if name in needed]
    return "\n".join(lines) + "\n"
