"""Lark grammars as vLLM takes them (generate/lark.py): vLLM's "likely Lark" decision, conversions to GBNF whose
language is compared with Lark's own Earley parser (every text up to a length for small grammars, random sentences
and their mutations for larger ones), refusals naming the construct and its line, and Lark grammars given to
compile_grammar, the chat API on the shipped demo model and the server's guided_grammar."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

import pytest
import torch

from internvl_mpo.generate.grammar import GrammarError, compile_grammar
from internvl_mpo.generate.lark import is_lark, lark_to_gbnf
from internvl_mpo.pipeline import InternVLChat

DEMO_MODEL = Path(__file__).resolve().parents[1] / "src" / "internvl_mpo" / "demo_model"

YES_NO = 'start: "yes" | "no"\n'
ARITHMETIC = r"""
// integer arithmetic, without left recursion
?start: sum
sum: product (("+" | "-") product)*
product: atom (("*" | "/") atom)*
atom: INT | "(" sum ")" | "-" atom
%import common.INT
"""
FEATURES = r"""
# ranges, ~ repetition, [optional], regexes, aliases, prefixes, continuation lines, a priority
start: item ~ 1..2 [sep] | "z"?
!item: "a".."c" | /x(y|z)?/ -> xs
    | "(" item ")"   // a group
?sep.2: ";"
    | "," | B
B: "b" ~ 2
"""
SQL = r"""
start: "SELECT " columns " FROM " NAME [" WHERE " condition] [";"]
columns: "*" | NAME ("," " "? NAME)*
condition: NAME ("=" | "<" | ">") (NAME | INT | ESCAPED_STRING)
NAME: /[a-z_][a-z0-9_]*/
%import common.INT
%import common.ESCAPED_STRING
"""
JSON_LIKE = r"""
?start: value
?value: object | array | ESCAPED_STRING | SIGNED_NUMBER | "true" | "false" | "null"
array: "[" [value ("," value)*] "]"
object: "{" [pair ("," pair)*] "}"
pair: ESCAPED_STRING ":" value
%import common.ESCAPED_STRING
%import common.SIGNED_NUMBER
"""

COMMON_TERMINALS = r"""
start: "w" WS | "i" WS_INLINE | "n" NEWLINE | "c" CNAME | "h" HEXDIGIT+ | "f" FLOAT | "d" DECIMAL
    | "s" SIGNED_NUMBER | "e" ESCAPED_STRING | "l" LETTER WORD | "u" UCASE_LETTER LCASE_LETTER | "m" C_COMMENT
%import common (WS, WS_INLINE, NEWLINE, CNAME, HEXDIGIT, FLOAT, DECIMAL, SIGNED_NUMBER, ESCAPED_STRING)
%import common (LETTER, WORD, UCASE_LETTER, LCASE_LETTER, C_COMMENT)
"""


def lark_parser(text: str):
    """Lark's Earley parser of `text`, every text a terminal matches taken (lexer="dynamic_complete")."""
    lark = pytest.importorskip("lark")
    return lark.Lark(text, start="start", parser="earley", lexer="dynamic_complete")


def lark_takes(parser, sentence: str) -> bool:
    import lark

    try:
        parser.parse(sentence)
    except lark.exceptions.LarkError:
        return False
    return True


def compiled(text: str):
    return compile_grammar(lark_to_gbnf(text))


def random_sentence(grammar, alphabet: str, rng: random.Random, longest: int = 40) -> str | None:
    """A random text of `alphabet`'s characters that `grammar` takes (None where the walk found no end)."""
    state, text = grammar.initial, ""
    while len(text) < longest:
        if grammar.accepting(state) and rng.random() < 0.15:
            return text
        moves = [(c, grammar.advance(state, ord(c))) for c in alphabet]
        moves = [(c, s) for c, s in moves if s is not None]
        if not moves:
            break
        c, state = rng.choice(moves)
        text += c
    return text if grammar.accepting(state) else None


def mutated(rng: random.Random, text: str, alphabet: str) -> str:
    i = rng.randrange(len(text) + 1)
    kind = rng.randrange(3)
    if kind == 0 or not text:
        return text[:i] + rng.choice(alphabet) + text[i:]
    i = min(i, len(text) - 1)
    return text[:i] + (rng.choice(alphabet) if kind == 1 else "") + text[i + 1:]


def test_is_lark_decides_as_vllm():
    """vLLM's grammar_is_likely_lark: Lark unless a line, less its `#` or `//` comment, holds `::=`."""
    assert is_lark(YES_NO) and is_lark(ARITHMETIC) and is_lark("rule: 'abc'")
    assert is_lark('# root ::= "a"\nstart: "a"') and is_lark('start: "a" // x ::= y')
    assert is_lark("anything without the GBNF arrow") and is_lark("  ")
    assert not is_lark("rule ::= 'abc'") and not is_lark('start: "::="') and not is_lark('\n  root ::= "a"\n')
    assert not is_lark("") and not is_lark(None) and not is_lark(b"start: x")


def test_the_gbnf_of_a_lark_grammar():
    assert lark_to_gbnf(YES_NO) == 'root ::= start\nstart ::= "yes" | "no"\n'
    assert lark_to_gbnf("first: 'a' SECOND\nSECOND: \"\\\"\\\\\\n\"") == \
        'root ::= first\nfirst ::= "a" SECOND\nSECOND ::= "\\"\\\\\\u000A"\n'  # no `start`: the first definition
    assert lark_to_gbnf('root: x\nx: "a".."c" ~ 2 [/[^a]./]\n%import common.DIGIT -> D') == (
        'root ::= x\nx ::= [a-c]{2} ([\\u0000-`b-\\uD7FF\\uE000-\\U0010FFFF] '
        '[\\u0000-\\u0009\\u000B-\\uD7FF\\uE000-\\U0010FFFF])?\nD ::= common.DIGIT\ncommon.DIGIT ::= [0-9]\n')
    assert lark_to_gbnf('start: root\nroot: "a"').startswith("root ::= start\nstart ::= root-\nroot- ::= \"a\"")
    assert lark_to_gbnf("start: 'it\\'s' 'a\"'") == lark_to_gbnf('start: "it\'s" "a\\""') == \
        'root ::= start\nstart ::= "it\'sa\\""\n'


def test_string_escapes_read_as_their_characters():
    """A literal's escapes (newline, tab, carriage return, form feed, backslash, two hex digits, four hex digits)
    are the characters Python reads them as, in a single-quoted literal too."""
    for quote in ('"', "'"):
        grammar = compile_grammar(f"start: {quote}a\\tb\\rc\\fd\\ne\\\\f\\x41\\u00e9{quote}")
        assert grammar.matches("a\tb\rc\fd\ne\\fA\u00e9".encode()), quote
        assert not grammar.matches("a b\rc\fd\ne\\fA\u00e9".encode()) and not grammar.matches(b"a\\tb"), quote


@pytest.mark.parametrize("text, alphabet, longest", [(YES_NO, "yesno", 4), (ARITHMETIC, "1+(-)", 5),
                                                     (FEATURES, "abx(y;,)z", 4)], ids=["yes-no", "arithmetic",
                                                                                        "features"])
def test_every_short_text_is_taken_as_lark_takes_it(text, alphabet, longest):
    parser, grammar = lark_parser(text), compiled(text)
    taken = 0
    for length in range(longest + 1):
        for letters in itertools.product(alphabet, repeat=length):
            sentence = "".join(letters)
            expected = lark_takes(parser, sentence)
            assert grammar.matches(sentence.encode()) == expected, (text, sentence, expected)
            taken += expected
    assert taken >= 2


@pytest.mark.parametrize("text, alphabet, examples", [
    (SQL, 'SELCT FROMWHE*,ab_1="\\<;x', ['SELECT * FROM t', 'SELECT a, b,c FROM t_1 WHERE a="x\\"y";',
                                        'SELECT a FROM t WHERE b<12', 'SELECT a FROM t WHERE b=c']),
    (JSON_LIKE, '{}[]",:-+1.eE0a\\tr ufln', ['{"a":[1,-2.5e3,true,null,"b\\"c\\\\"],"":{}}', '[]', '"x"', '-0.',
                                            '+.5E-1', '[[],{}]']),
    (COMMON_TERMINALS, 'wincfdsehlum \t\n\r\x0c_aZ09.+-E"\\/*', ['e"\\""', 'm/* * / **/', 'n\r\n\n', 'f1e5',
                                                                 'd.5', 's-1.', 'hAf0', 'c_a9', 'lZab', 'uZa'])],
    ids=["sql", "json", "common"])
def test_random_sentences_and_mutations_are_taken_as_lark_takes_them(text, alphabet, examples):
    parser, grammar = lark_parser(text), compiled(text)
    rng = random.Random(5)
    sentences = list(examples)
    while len(sentences) < 150:
        sentence = random_sentence(grammar, alphabet, rng)
        if sentence is not None:
            sentences.append(sentence)
    taken = refused = 0
    for sentence in sentences:
        assert lark_takes(parser, sentence), sentence
        for _ in range(4):
            other = mutated(rng, sentence, alphabet)
            expected = lark_takes(parser, other)
            assert grammar.matches(other.encode()) == expected, (other, expected)
            taken, refused = taken + expected, refused + (not expected)
    assert taken > 20 and refused > 100


@pytest.mark.parametrize("text, named", [
    ('start: "a"\n%ignore " "', "grammar (Lark): line 2, column 1: %ignore is not taken: it lets its text"),
    ('start: "a"\n  %declare X', "line 2, column 3: the directive %declare is not taken (only %import common.X is)"),
    ("%import python.NAME\nstart: NAME", "line 1, column 9: only Lark's common terminals are imported"),
    ("%import common.NUMBERS\nstart: NUMBERS", "line 1, column 16: common has no terminal 'NUMBERS' (it has "),
    ('start: "yes"i', "line 1, column 13: the flag i (any case) is not taken"),
    ("start: /yes/i", "line 1, column 13: the regex flags 'i' are not taken"),
    ("start: x\nx: /a(?=b)/", "line 2, column 4: the regex /a(?=b)/: regex 'a(?=b)': a lookaround (?= at position 1"),
    ("start: /(a)\\1/", "line 1, column 8: the regex /(a)\\1/: regex '(a)\\\\1': a backreference \\1 at position 3"),
    ("start: /^a$/", "line 1, column 8: the regex /^a$/: the anchors ^ and $ are not taken"),
    ('start: "a" b\n\nb: c', "grammar (Lark): line 3, column 4: 'c' is used but never defined"),
    ('start: "a"\nstart: "b"', "line 2, column 1: 'start' is defined twice"),
    ('start: A\nA: "a" b\nb: "b"', "line 2, column 8: the terminal 'A' uses the rule 'b' (a terminal uses terminals"),
    ("start: _sep{x}\n_sep{x}: x", "line 1, column 12: a '{' (write a repetition as `x ~ m..n`; templates are not"),
    ('start: "abc', "line 1, column 8: the string literal is never closed (on its line)"),
    ('start: ("a"\n "b")', "line 1, column 8: the '(' is never closed"),
    ('start: "a" ~ 2000', "line 1, column 12: the repetition ~ 2000 is over the limit of 1000"),
    ('start: "a" ~ 3..2', "line 1, column 12: the repetition ~ 3..2 has its bounds out of order"),
    ('start: "a"+*', "line 1, column 12: '*' repeats a repetition"),
    ('start: "\\d"', "line 1, column 9: the escape \\d is not taken (in Lark it is a backslash and 'd'"),
    ('start: "ab".."z"', "line 1, column 8: a range `\"a\"..\"z\"` is between single characters"),
    ('start: "a")', "line 1, column 11: unexpected ')' after the definition of 'start'"),
    ("start \"a\"", "line 1, column 7: expected ':' after the name 'start' (a definition is `name: ...`)"),
    ("// only a comment", "grammar (Lark): no definition `name: ...` in it"),
])
def test_what_is_not_converted_is_refused_naming_it_and_its_line(text, named):
    with pytest.raises(GrammarError, match=re.escape(named)):
        compile_grammar(text)


def test_compile_grammar_takes_lark_where_vllm_does():
    """Lark text goes through lark_to_gbnf (the same language as its GBNF), GBNF as before; an empty text is
    GBNF's refusal."""
    grammar = compile_grammar(ARITHMETIC)
    assert grammar.key == compile_grammar(lark_to_gbnf(ARITHMETIC)).key == lark_to_gbnf(ARITHMETIC)
    assert grammar.matches(b"-(1+2)*3") and not grammar.matches(b"1+") and not grammar.matches(b"1 + 2")
    assert compile_grammar('root ::= "a" # start: "b"').matches(b"a")
    with pytest.raises(GrammarError, match="^grammar: no rule in it"):
        compile_grammar("")


@pytest.fixture(scope="module")
def demo_chat():
    return InternVLChat.from_pretrained(DEMO_MODEL, dtype=torch.float32)


ANSWER = 'start: WORD " " (COLOR | NUMBER)\nWORD: "yes" | "no"\nCOLOR: "red" | "blue"\nNUMBER: /[1-9][0-9]?/\n'


def test_chat_on_the_demo_model_with_a_lark_grammar(demo_chat):
    """Greedy and sampled answers are sentences of the Lark grammar (checked by Lark's parser where it is
    installed, and by a regex of the same language)."""
    answers = [demo_chat.chat("What color is the square?", do_sample=False, max_new_tokens=12, grammar=ANSWER)]
    answers += demo_chat.batch_chat(["How many circles?", "Is there a red square?"], seed=3, max_new_tokens=12,
                                    grammar=ANSWER)
    for answer in answers:
        assert re.fullmatch(r"(yes|no) (red|blue|[1-9][0-9]?)", answer), answer
    try:
        parser = lark_parser(ANSWER)
    except pytest.skip.Exception:
        return
    assert all(lark_takes(parser, answer) for answer in answers), answers


def test_guided_grammar_in_lark_over_http(demo_chat):
    """The server's guided_grammar takes Lark text (the answer is chat()'s under it); a Lark grammar it cannot
    convert is a 400 naming the line."""
    openai = pytest.importorskip("openai")
    from test_server import app_server

    expected = demo_chat.chat("How many circles?", grammar=ANSWER, do_sample=False, max_new_tokens=12)
    body = {"messages": [{"role": "user", "content": "How many circles?"}], "temperature": 0, "max_tokens": 12}
    with app_server(demo_chat) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="m", **body, extra_body={"guided_grammar": ANSWER})
        assert reply.choices[0].message.content == expected
        with pytest.raises(openai.BadRequestError, match=r"guided_grammar: grammar \(Lark\): line 5, column 1: "
                                                         "%ignore is not taken"):
            client.chat.completions.create(model="m", **body, extra_body={"guided_grammar": ANSWER + '%ignore " "'})
