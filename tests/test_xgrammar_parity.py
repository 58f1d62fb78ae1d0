"""A second opinion from xgrammar (vLLM's default structured-output backend): our recognizers and its matchers judge
the same texts (random sentences, random walks of either side, single-byte mutations) alike, and give the same token
masks at the states along them, on the demo model's vocabulary: GBNF grammars (left-recursive ones too), regexes,
choices, JSON schemas and JSON mode (against xgrammar's builtin JSON grammar). Skipped where xgrammar is not
installed (`pip install --no-deps xgrammar apache-tvm-ffi`; its triton dependency is for GPU kernels only). Where the
two differ by design the comparison keeps to what both mean alike (JSON: texts and tokens without whitespace outside
strings; a surrogate code point's three bytes, which xgrammar's negated classes take and no well-formed UTF-8 holds,
nowhere), and the last tests pin each known difference."""

from __future__ import annotations

import importlib.util
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from test_grammar import CASES, LEFT_ARITHMETIC, LEFT_RECURSIVE, SHORT, mutated, random_walk

xg = pytest.importorskip("xgrammar", reason="xgrammar is not installed (pip install --no-deps xgrammar "
                         "apache-tvm-ffi)")

from internvl_mpo.chat.tokenizer import load_tokenizer  # noqa: E402
from internvl_mpo.generate import grammar as gr  # noqa: E402
from internvl_mpo.generate import json_mode as jm  # noqa: E402
from internvl_mpo.generate import json_schema as js  # noqa: E402
from internvl_mpo.generate import regex as rx  # noqa: E402

DEMO = Path(__file__).parent.parent / "src/internvl_mpo/demo_model"
SURROGATE = re.compile(rb"\xed[\xa0-\xbf]")  # U+D800-U+DFFF's UTF-8 form: not well-formed UTF-8


@pytest.fixture(scope="module")
def side():
    """(pieces, our vocabulary index, xgrammar's compiler, the stop token id): the demo model's token bytes, taken by
    both as raw bytes (special tokens empty, which xgrammar takes as special)."""
    tokenizer = load_tokenizer(DEMO)
    pieces = [None if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(len(tokenizer))]
    stop = pieces.index(None)
    info = xg.TokenizerInfo([p or b"" for p in pieces], xg.VocabType.RAW, vocab_size=len(pieces),
                            stop_token_ids=[stop])
    return pieces, jm.JsonVocabulary(pieces, len(pieces)), xg.GrammarCompiler(info, max_threads=1), stop


class Theirs:
    """An xgrammar matcher fed one byte at a time."""

    def __init__(self, compiled, stop: int, size: int):
        self.matcher, self.stop, self.size = xg.GrammarMatcher(compiled), stop, size
        self.bitmask = xg.allocate_token_bitmask(1, size)

    def feed(self, data: bytes) -> bool:
        return all(self.matcher.accept_string(data[i:i + 1]) for i in range(len(data)))

    def mask(self) -> np.ndarray:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return np.unpackbits(self.bitmask[0].numpy().view(np.uint8), bitorder="little")[: self.size].astype(bool)


def judged(compiled, stop, size, data: bytes) -> tuple[bool, bool]:
    """xgrammar's (prefix taken, whole text taken) of `data`."""
    theirs = Theirs(compiled, stop, size)
    if not theirs.feed(data):
        return False, False
    return True, bool(theirs.mask()[stop])


def ours_judged(advance, complete, state, data: bytes) -> tuple[bool, bool]:
    for byte in data:
        state = advance(state, byte)
        if state is None:
            return False, False
    return True, complete(state)


def xg_walk(compiled, stop, pieces, rng: random.Random, limit: int = 30, keep=None) -> bytes:
    """A text of xgrammar's: tokens drawn from its masks (the stop token ends it where allowed), each keeping
    `keep(text so far)` where given."""
    theirs, data = Theirs(compiled, stop, len(pieces)), b""
    for _ in range(limit):
        allowed = np.flatnonzero(theirs.mask())
        tokens = [t for t in allowed if t != stop and (keep is None or keep(data + pieces[t]))]
        if not tokens or stop in allowed and rng.random() < 0.2:
            break
        token = int(rng.choice(tokens))
        assert theirs.matcher.accept_token(token)
        data += pieces[token]
    return data


def compare(pieces, vocabulary, compiled, stop, ours, texts, alphabet, rng, kept=None, masked=None) -> None:
    """Accept/refuse of each text and of mutations of it, and the masks along each text, alike on both sides.
    `ours`: (initial, advance, complete, mask); `kept(data)`: whether a text is in what both mean alike;
    `masked(text so far, token bytes)`: whether a token's place in the masks is compared there (ordinary `kept`
    tokens by default)."""
    initial, advance, complete, mask = ours
    ordinary = np.array([p is not None for p in pieces])
    kept = kept or (lambda data: True)
    masked = masked or (lambda data, piece: kept(piece))
    for text in texts:
        data = text if isinstance(text, bytes) else text.encode()
        if SURROGATE.search(data) or not kept(data):
            continue
        candidates = [data] + [mutated(rng, data.decode(errors="replace"), alphabet).encode() for _ in range(8)]
        for candidate in candidates:
            if kept(candidate) and not SURROGATE.search(candidate):
                assert ours_judged(advance, complete, initial, candidate) == judged(compiled, stop, len(pieces),
                                                                                    candidate), candidate
        theirs, state = Theirs(compiled, stop, len(pieces)), initial
        for i in range(len(data) + 1):
            got, want = np.asarray(mask(state))[: len(pieces)], theirs.mask()
            differ = [pieces[t] for t in np.flatnonzero((got != want) & ordinary)
                      if not SURROGATE.search(data[max(0, i - 2):i] + pieces[t]) and masked(data[:i], pieces[t])]
            assert not differ, (data[:i], differ[:8])
            if i < len(data):
                state = advance(state, data[i])
                assert theirs.feed(data[i:i + 1]) and state is not None, data[: i + 1]


GRAMMARS = [(text, make, alphabet) for text, make, _, alphabet in CASES] + [
    (LEFT_ARITHMETIC, None, "0123456789+-*/() x"), (SHORT, None, " yesno0123456789,猫catsdog")] + [
    (text, None, alphabet) for text, alphabet in LEFT_RECURSIVE]


@pytest.mark.parametrize("text, make, alphabet", GRAMMARS)
def test_grammars_are_judged_and_masked_as_xgrammar_does(side, text, make, alphabet):
    pieces, vocabulary, compiler, stop = side
    rng, grammar, compiled = random.Random(0), gr.compile_grammar(text), compiler.compile_grammar(text)
    texts = [make(rng) for _ in range(6)] if make else []
    texts += [random_walk(grammar, rng) for _ in range(6)] + [xg_walk(compiled, stop, pieces, rng) for _ in range(6)]
    ours = (grammar.initial, grammar.advance, grammar.accepting, lambda state: grammar.mask(vocabulary, state))
    compare(pieces, vocabulary, compiled, stop, ours, texts, alphabet, rng)


REGEXES = [(r"\d{4}-\d{2}-\d{2}", "0123456789-x"), (r"[a-z]{1,8}( [a-z]{1,8}){0,4}\.", "abz .A"),
           (r"(ab|a)*c?", "abcd"), (r"[^a-c\n]+x", "abcxy\n"), (r"yes|no|maybe", "yesnomab"),
           (r"a{2,5}b*", "abc"), (r"[0-9a-fA-F]{8}", "09afAFgG"), (r"(é|😀|猫)+!?", "é😀猫!e"),
           (r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?", "0123456789.eE+-x"),
           (r"\((\+|-)\)|\[\]", "()[]+-"), (r"a+?b*?c??", "abc"), (r"(?:ab){2,}", "abx"), (r"[\-\]\\]+", "-]\\a"),
           (r"\x41\u00e9+", "Aéx"), (r"^(cat|dog)s?$", "catdogs"), (r"\w+@\w+\.(com|org)", "a_1@.comorgx"),
           (r"[^\d\s]{1,3}", "a1 b"), (r"\t\n\r\f\v", "\t\n\r\f\vx"), (r"(a|)+b", "ab"),
           (r"\.\*\+\?\(\)\[\]\{\}\|\^\$", ".*+?()[]{}|^$")]


@pytest.mark.parametrize("pattern, alphabet", REGEXES)
def test_regexes_are_judged_and_masked_as_xgrammar_does(side, pattern, alphabet):
    pieces, vocabulary, compiler, stop = side
    rng, regex, compiled = random.Random(0), rx.compile_regex(pattern), compiler.compile_regex(pattern)
    texts = [random_walk(regex, rng) for _ in range(8)] + [xg_walk(compiled, stop, pieces, rng) for _ in range(8)]
    ours = (regex.initial, regex.advance, regex.accepting, lambda state: regex.mask(vocabulary, state))
    compare(pieces, vocabulary, compiled, stop, ours, texts, alphabet, rng)


def test_choices_are_judged_and_masked_as_xgrammar_does(side):
    pieces, vocabulary, compiler, stop = side
    choices = ["yes", "no", "yes, and more", "a+b (c)", "猫"]
    rng = random.Random(0)
    regex = rx.compile_regex(rx.choice_pattern(choices))
    compiled = compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices))
    ours = (regex.initial, regex.advance, regex.accepting, lambda state: regex.mask(vocabulary, state))
    compare(pieces, vocabulary, compiled, stop, ours, choices, "yesno,and+()猫 x", rng)


INTEGER = re.compile(rb"-0")  # an integer's -0: JSON, taken here; xgrammar refuses it
BOUNDED = re.compile(rb'"s":"[^"]*[\x00-\x1f\\]')  # xgrammar's string with a length: raw controls, no escapes
SCHEMAS = [
    ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                       "tags": {"type": "array", "items": {"type": "string"}}},
      "required": ["name"]}, [{"name": "Ann", "age": 3, "tags": ["a", "b c"]}, {"name": "é\"\\", "tags": []}],
     INTEGER),
    ({"type": "array", "items": {"enum": ["red", "green", 3, None, True]}, "minItems": 1, "maxItems": 3},
     [["red"], [3, None, True]], None),
    ({"anyOf": [{"type": "number"}, {"type": "boolean"}, {"type": "null"}]}, [1.5e-3, -0.0, True, None], None),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/node"}}, "required": ["a"],
      "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "next": {"$ref": "#/$defs/node"}},
                         "required": ["v"]}}}, [{"a": {"v": 1, "next": {"v": -2}}}],
     INTEGER),
    ({"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 4},
                                       "k": {"const": "x"}}, "required": ["s", "k"]}, [{"s": "ab", "k": "x"}],
     BOUNDED),
    ({"type": "object", "properties": {"p": {"type": "string", "pattern": "^[a-z]+-[0-9]{2}$"}}, "required": ["p"]},
     [{"p": "ab-12"}], None),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, [{"x": 1, "y": 20}, {}], INTEGER),
]


UNFINISHED_ESCAPE = re.compile(rb"\\(u[0-9a-fA-F]{0,3})?$")


def spaced(data: bytes, start: int = 0) -> bool:
    """Whether JSON text `data` holds whitespace outside its strings at `start` or after."""
    in_string = escaped = False
    for i, byte in enumerate(data):
        if in_string:
            in_string, escaped = escaped or byte != ord('"'), not escaped and byte == ord("\\")
        elif byte == ord('"'):
            in_string = True
        elif byte in b" \t\n\r" and i >= start:
            return True
    return False


@pytest.mark.parametrize("schema, values, differ", SCHEMAS)
def test_json_schemas_are_judged_and_masked_as_xgrammar_does_without_whitespace(side, schema, values, differ):
    """Texts without whitespace outside strings (ours is bounded, xgrammar's `any_whitespace` is not), and masks of
    the tokens that add none and hold no backslash (a key or an enum string is taken here in any JSON spelling,
    `"\\u006eame"` for `"name"`; xgrammar takes the one `json.dumps` writes), leaving out the texts where `differ`
    finds the schema's difference."""
    pieces, vocabulary, compiler, stop = side
    rng, ours_schema = random.Random(0), js.compile_schema(schema)
    compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=True)
    texts = [json.dumps(v, separators=(",", ":"), ensure_ascii=False) for v in values]

    def kept(data: bytes) -> bool:  # an escape cut short may begin a key's or enum string's other spelling here
        return not spaced(data) and not (differ and differ.search(data)) and not UNFINISHED_ESCAPE.search(data)

    texts += [xg_walk(compiled, stop, pieces, rng, keep=kept) for _ in range(12)]
    ours = (ours_schema.initial, ours_schema.advance, ours_schema.complete,
            lambda state: js.schema_mask(vocabulary, ours_schema, state))
    compare(pieces, vocabulary, compiled, stop, ours, texts, '{}[]",:0123456789abxé\\-. ', rng, kept=kept,
            masked=lambda data, piece: b"\\" not in piece and not spaced(data + piece, len(data))
            and not (differ and differ.search(data + piece)))


DIFFERENCES = [  # (kind, source, text, ours, xgrammar's): (prefix taken, whole text taken), documented differences
    ("regex", ".", b"\n", (False, False), (True, True)),  # `.`: any character but \n here, any at all there
    ("regex", r"\s", "\u00a0".encode(), (False, False), (True, True)),  # \s: ASCII here, Unicode spaces there
    ("regex", "[^a]", b"\xed\xa0\x80", (False, False), (True, True)),  # a surrogate's bytes: not well-formed UTF-8
    ("grammar", 'root ::= "ab" | "a" x\nx ::= "c" x', b"ac", (False, False), (True, False)),  # a dead end there
    ("grammar", 'root ::= "(" root ")" | "x"', b"(" * 201, (False, False), (True, False)),  # our 200 open calls
    ("grammar", 'root ::= a "!"\na ::= b a "x" | ""\nb ::= a "y" | ""',  # a very ambiguous grammar: past our
     b"xyxyyyyyyyxxyyyyxyxyxyxxxyxxxyyxyxxyyyxyxxxyxxyyxyyxxxxyxxyxyxx!", (False, False), (True, True)),  # 1,000 stacks
    ("schema", {"type": "integer"}, b"-0", (True, True), (False, False)),
    ("schema", {"type": "object", "properties": {"n": {"type": "string"}}}, b'{"\\u006e":"a"}', (True, True),
     (False, False)),  # a key in any JSON spelling here, as json.dumps writes it there
    ("schema", {"type": "string", "maxLength": 4}, b'"a\\"b"', (True, True), (False, False)),  # an escape
    ("schema", {"type": "string", "maxLength": 4}, b'"\x01"', (False, False), (True, True)),  # a raw control there
    ("schema", {"type": "object"}, b"{" + b" " * 40 + b"}", (False, False), (True, True)),  # our whitespace bound
    ("schema", {"type": "string", "format": "date"}, b'"2023-02-29"', (False, False), (True, True)),
    ("schema", {"type": "string", "format": "time"}, b'"12:34:60Z"', (False, False), (True, True)),
    ("schema", {"type": "string", "format": "date-time"}, b'"2024-02-29T12:34:56.1234567891Z"', (False, False),
     (True, True)),  # formats: ours as RFC 3339 and the README say, xgrammar's looser or narrower
    ("schema", {"type": "string", "format": "email"}, b'"a@b"', (False, False), (True, True)),
    ("schema", {"type": "string", "format": "email"}, b'"\\"q\\"@c.de"', (False, False), (True, True)),
    ("schema", {"type": "string", "format": "ipv4"}, b'"01.2.3.4"', (False, False), (True, True)),
    ("schema", {"type": "string", "format": "ipv6"}, b'"1::2:3.4.5.6"', (True, True), (False, False)),
    ("schema", {"type": "string", "format": "uri"}, b'"http://[::1]:80"', (True, True), (False, False)),
    ("schema", {"type": "string", "format": "uri-reference"}, b'"a:b/c"', (True, True), (False, False)),
    ("json", None, b'{"a":"\\ud800"}', (False, False), (True, True)),  # a lone escaped surrogate (json.loads takes it)
    ("json", None, b"[1]", (False, False), (True, True)),  # JSON mode's object at the top; its JSON grammar's array
]


@pytest.mark.parametrize("kind, source, text, ours_judge, theirs_judge", DIFFERENCES)
def test_the_known_differences_from_xgrammar_hold(side, kind, source, text, ours_judge, theirs_judge):
    """Where the two differ by design (ours as the README says; the texts above leave these out): if xgrammar
    changes, this says so."""
    pieces, vocabulary, compiler, stop = side
    if kind == "json":
        ours = (jm.advance, lambda state: state[0] == jm.DONE, jm.INITIAL)
        compiled = compiler.compile_builtin_json_grammar()
    elif kind == "schema":
        schema = js.compile_schema(source)
        ours = (schema.advance, schema.complete, schema.initial)
        compiled = compiler.compile_json_schema(json.dumps(source))
    else:
        automaton = rx.compile_regex(source) if kind == "regex" else gr.compile_grammar(source)
        ours = (automaton.advance, automaton.accepting, automaton.initial)
        compiled = compiler.compile_regex(source) if kind == "regex" else compiler.compile_grammar(source)
    assert ours_judged(*ours, text) == ours_judge
    assert judged(compiled, stop, len(pieces), text) == theirs_judge


def test_xgrammar_refuses_an_empty_first_alternative_that_we_take(side):
    """llama.cpp's json.gbnf writes `ws ::= | " " | ...`: taken here, refused by xgrammar's parser."""
    assert gr.compile_grammar('root ::= "a" ws\nws ::= | " "').matches(b"a ")
    with pytest.raises(Exception, match="Expect element"):
        side[2].compile_grammar('root ::= "a" ws\nws ::= | " "')


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # xgrammar takes a lone one, json.loads too; we take pairs only


def test_json_mode_is_judged_and_masked_as_xgrammar_s_builtin_json_does_without_whitespace(side):
    """JSON mode against xgrammar's builtin JSON grammar: texts without whitespace outside strings (ours is bounded),
    an object at the top (xgrammar's grammar also takes an array there), no escaped surrogate (ours takes a pair
    only)."""
    pieces, vocabulary, compiler, stop = side
    rng, compiled = random.Random(0), compiler.compile_builtin_json_grammar()
    values = [{}, {"a": [1, -0.5e3, 0, 0.25, 1e5, 2e-7, True, False, None, "x", [], {}], "b": {"c": {}}},
              {"esc": "\" \\ / \b \f \n \r \t é \u12af \x7f", "猫": "😀 Café \u07ff \uffff \U0010ffff"},
              {"a": [1, {"b": [None, True, "x y"]}], "": {}}]
    texts = [json.dumps(v, separators=(",", ":"), ensure_ascii=ascii) for v in values for ascii in (False, True)]
    texts += [b'{"a":-0,"b":1E+5,"c":-0.0e-0}', b'{"a":"\\/"}']

    def kept(data: bytes) -> bool:
        return not spaced(data) and not SURROGATE_ESCAPE.search(data) and not data.startswith(b"[")

    texts += [xg_walk(compiled, stop, pieces, rng, keep=kept) for _ in range(24)]

    def masked(data: bytes, piece: bytes) -> bool:
        return not spaced(data + piece, len(data)) and not (data + piece).startswith(b"[") \
            and not SURROGATE_ESCAPE.search(data[-6:] + piece)

    ours = (jm.INITIAL, jm.advance, lambda state: state[0] == jm.DONE, vocabulary.mask)
    compare(pieces, vocabulary, compiled, stop, ours, texts, '{}[]",:0123456789aeE+\\-.tfn ', rng, kept=kept,
            masked=masked)


@pytest.mark.parametrize("extra", [[], ["--schema"], ["--mixed"], ["--regex", r"\d{4}-\d{2}-\d{2}"]])
def test_the_mask_benchmark_times_xgrammar_beside_us(monkeypatch, capsys, extra):
    """benchmarks/json_mask.py --against xgrammar on the demo vocabulary: both sides and their ratio (for `--mixed`,
    the states before the escape xgrammar refuses); a regex's masks agree at every state."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "json_mask.py"
    spec = importlib.util.spec_from_file_location("json_mask", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["json_mask.py", "--against", "xgrammar", *extra])
    module.main()
    out = capsys.readouterr().out
    assert re.search(r"mask, median over the timed states +[\d.]+us +[\d.]+us +[\d.]+ \((ours|xgrammar) faster\)", out)
    assert ("xgrammar refuses byte 52" in out) == (extra == ["--mixed"])
    if extra[:1] == ["--regex"]:
        assert "masks equal to ours (ordinary tokens) at 11 of 11 timed states" in out
