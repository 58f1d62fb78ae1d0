"""GBNF grammars as byte-level pushdown recognizers (generate/grammar.py): hand grammars whose random sentences are
taken and whose random mutations are judged as independent checkers judge them, live prefixes and random walks
without dead ends, the bounds, refusals naming their place, masks against a token-by-token oracle, and
grammar-guided decoding in the engine, the chat API, the server's requests and the command line."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from internvl_mpo.errors import SettingError
from internvl_mpo.generate import automaton
from internvl_mpo.generate import grammar as grammar_module
from internvl_mpo.generate import json_mode as jm
from internvl_mpo.generate.engine import Request
from internvl_mpo.generate.automaton import AutomatonConstraint
from internvl_mpo.generate.grammar import GrammarError, compile_grammar
from internvl_mpo.generate.params import SamplingParams
from internvl_mpo.pipeline import InternVLChat
from internvl_mpo.server.requests import ApiError, parse_chat_request, parse_completion_request
from internvl_mpo.server.settings import ServerSettings

from conftest import after, assert_automaton_masks, cli, engine_answers, states, tiny_chat_folder

ARITHMETIC = r"""
# integer arithmetic: + - * / and parentheses
root   ::= expr
expr   ::= term (("+" | "-") term)*
term   ::= factor ([*/] factor)*
factor ::= [0-9]+ | "(" expr ")"
"""
JSON_SUBSET = r"""
root    ::= object
value   ::= object | array | string | number | "true" | "false" | "null"
object  ::= "{" ( member ("," member)* )? "}"
member  ::= string ":" value
array   ::= "[" ( value ("," value)* )? "]"
string  ::= "\"" [a-z é]* "\""
number  ::= "-"? ("0" | [1-9] [0-9]{0,5})
"""
WORDS = r"""
root ::= word ( "," " "? word ){0,4} "."?
word ::= [a-zé]+ | "\u732B" | "\U0001F600"
"""
WORDS_REGEX = r"(?:[a-zé]+|猫|😀)(?:, ?(?:[a-zé]+|猫|😀)){0,4}\.?"
PARENTHESES = 'root ::= ("(" root ")")*'
LEFT_ARITHMETIC = r"""
# ARITHMETIC written left-recursively, as users write it
root   ::= expr
expr   ::= expr ("+" | "-") term | term
term   ::= term [*/] factor | factor
factor ::= number | "(" expr ")"
number ::= number [0-9] | [0-9]
"""
SHORT = 'root ::= " "? ("yes" | "no" | [0-9]{1,2} | "\u732B") (", " animal)?\nanimal ::= "cats" | "dogs"\n'
SHORT_REGEX = r" ?(yes|no|[0-9]{1,2}|猫)(, (cats|dogs))?"


# ---- independent checkers and sentence makers -----------------------------------------------

def arithmetic_ok(text: str) -> bool:
    """Numbers joined by binary operators, with parentheses: reduced to one `n` by (n) -> n and n op n -> n."""
    if not re.fullmatch(r"[0-9+\-*/()]*", text):
        return False
    text = re.sub("[0-9]+", "n", text)
    while True:
        reduced = re.sub(r"n[-+*/]n", "n", text.replace("(n)", "n"))
        if reduced == text:
            return text == "n"
        text = reduced


def arithmetic(rng: random.Random, depth: int = 3) -> str:
    if depth == 0 or rng.random() < 0.3:
        return str(rng.randint(0, 10 ** rng.randint(1, 4)))
    if rng.random() < 0.3:
        return "(" + arithmetic(rng, depth - 1) + ")"
    return arithmetic(rng, depth - 1) + rng.choice("+-*/") + arithmetic(rng, depth - 1)


def json_ok(text: str) -> bool:
    """The JSON subset: compact JSON of objects (the top value), arrays, strings of [a-z é], integers of at most 6
    digits, true, false and null, written back the same (duplicate keys kept)."""
    class Pairs(list):
        pass

    def write(value) -> str:
        if isinstance(value, Pairs):
            return "{" + ",".join(write(k) + ":" + write(v) for k, v in value) + "}"
        if isinstance(value, list):
            return "[" + ",".join(write(v) for v in value) + "]"
        if isinstance(value, str) and not re.fullmatch("[a-z é]*", value):
            raise ValueError
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                        and abs(value) >= 10 ** 6):
            raise ValueError
        return json.dumps(value, ensure_ascii=False)

    try:
        value = json.loads(text, object_pairs_hook=Pairs)
        return isinstance(value, Pairs) and write(value) == text
    except (ValueError, RecursionError):
        return False


def json_value(rng: random.Random, depth: int = 3, top: bool = False):
    kind = "object" if top else rng.choice(["object", "array", "string", "number", "literal"] if depth else
                                            ["string", "number", "literal"])
    if kind == "object":
        return "{" + ",".join(f'"{rng.choice(["a", "bé", "", "x y"])}":{json_value(rng, depth - 1)}'
                              for _ in range(rng.randint(0, 3))) + "}"
    if kind == "array":
        return "[" + ",".join(json_value(rng, depth - 1) for _ in range(rng.randint(0, 3))) + "]"
    if kind == "string":
        return json.dumps("".join(rng.choice("ab é") for _ in range(rng.randint(0, 4))), ensure_ascii=False)
    if kind == "number":
        return str(rng.randint(-999999, 999999))
    return rng.choice(["true", "false", "null"])


def words(rng: random.Random) -> str:
    word = lambda: rng.choice(["猫", "😀", "".join(rng.choice("abzé") for _ in range(rng.randint(1, 4)))])  # noqa
    return word() + "".join(rng.choice([",", ", "]) + word() for _ in range(rng.randint(0, 4))) + rng.choice(["", "."])


def parentheses_ok(text: str) -> bool:
    depth = 0
    for c in text:
        if c not in "()":
            return False
        depth += 1 if c == "(" else -1
        if depth < 0:
            return False
    return depth == 0


def parentheses(rng: random.Random, depth: int = 4) -> str:
    return "".join("(" + (parentheses(rng, depth - 1) if depth else "") + ")" for _ in range(rng.randint(0, 2)))


CASES = [(ARITHMETIC, arithmetic, arithmetic_ok, "0123456789+-*/()x "),
         (JSON_SUBSET, lambda rng: json_value(rng, top=True), json_ok, '{}[]",:-0123456789 aébtruefalsn'),
         (WORDS, words, lambda text: bool(re.fullmatch(WORDS_REGEX, text)), "abzé猫😀,. x"),
         (PARENTHESES, parentheses, parentheses_ok, "()x"),
         (LEFT_ARITHMETIC, arithmetic, arithmetic_ok, "0123456789+-*/()x ")]


def mutated(rng: random.Random, text: str, alphabet: str) -> str:
    for _ in range(rng.randint(1, 3)):
        i = rng.randint(0, len(text))
        kind = rng.choice(["insert", "delete", "replace", "cut"])
        if kind == "insert":
            text = text[:i] + rng.choice(alphabet) + text[i:]
        elif kind == "delete":
            text = text[:i] + text[i + 1:]
        elif kind == "replace":
            text = text[:i] + rng.choice(alphabet) + text[i + 1:]
        else:
            text = text[:i]
    return text


def random_walk(grammar, rng: random.Random, limit: int = 40) -> bytes:
    """Bytes taken at random (each step one of the bytes the state takes) until the state accepts and the walk
    chooses to stop; fails on a state that takes no byte and is not accepted (a dead end)."""
    state, data = grammar.initial, b""
    for _ in range(limit):
        if grammar.accepting(state) and rng.random() < 0.2:
            return data
        taken = [b for b in range(256) if grammar.advance(state, b) is not None]
        if not taken:
            assert grammar.accepting(state), f"a dead end after {data!r}"
            return data
        byte = rng.choice(taken)
        state, data = grammar.advance(state, byte), data + bytes((byte,))
    return data


@pytest.mark.parametrize("text, make, check, alphabet", CASES)
def test_random_sentences_are_taken_and_mutations_judged_as_the_checker_judges(text, make, check, alphabet):
    grammar = compile_grammar(text)
    rng = random.Random(0)
    for _ in range(150):
        sentence = make(rng)
        assert check(sentence), sentence  # the maker and the checker agree
        data = sentence.encode()
        assert grammar.matches(data), sentence
        assert None not in states(grammar, data), sentence  # every prefix is live
        for _ in range(4):
            other = mutated(rng, sentence, alphabet)
            assert grammar.matches(other.encode()) == check(other), other


@pytest.mark.parametrize("text, make, check, alphabet", CASES)
def test_random_walks_never_dead_end_and_end_in_sentences(text, make, check, alphabet):
    grammar = compile_grammar(text)
    rng = random.Random(1)
    for _ in range(40):
        data = random_walk(grammar, rng)
        if grammar.accepting(after(grammar, grammar.initial, data)):
            assert check(data.decode()), data


@pytest.mark.parametrize("text, taken, refused", [
    ('root ::= "a" "b"? "c"{2,3}', ["acc", "abccc"], ["ac", "abcccc", ""]),
    ('root ::= "" | "x"', ["", "x"], ["xx"]),
    ('root ::= ( )\n', [""], ["a"]),
    ('root ::= "a"{0}', [""], ["a"]),
    ('root ::= "a"{ 1 , 2 } "b"{ 2 , }', ["abb", "aabbb"], ["ab", "aaabb"]),  # spaces around bounds
    ('root ::= [^a-c\\n] [\\-+*/] [^]', ["x-\n", "é+😀"], ["a-x", "\n-x", "x.x"]),
    ('root ::= [a\\]\\\\]+', ["a]\\"], ["b"]),
    ('root ::= "\\"\\\\\\/\\n\\t\\u00e9\\x41\\U0001F600"', ['"\\/\n\té' + "A😀"], ['"']),
    ('root ::= . .', ["a\n", "é😀"], ["a", "abc"]),
    ('root ::= my-rule.x # comment\nmy-rule.x ::= "a" |\n   "b"  # another\n', ["a", "b"], ["ab"]),
    ('root ::= a b ::= "y" a ::= "x" b', ["xy"], ["x"]),
    ('root ::= "(" root ")" | [0-9]', ["(((1)))", "5"], ["(5", "()"]),
    ('root ::= x "!"\nx ::= "a" x | "" | y\ny ::= "z" y?', ["!", "aaa!", "aazz!"], ["za!"]),
    ('root ::= ("a"{0,2}){0,3} ("b"{2,3}){0,2} ([a-c]{1,2} ","){2}',  # nested repetitions: (a gapless one merged)
     ["a,b,", "aaaaaabbbbbbab,c,", "bbbbbbb,a,"], ["aaaaaaaaa,a,", "bbbbbbbbc,a,", "a,b,c,"]),
])
def test_hand_cases(text, taken, refused):
    grammar = compile_grammar(text)
    for sentence in taken:
        assert grammar.matches(sentence.encode()), sentence
        assert None not in states(grammar, sentence.encode()), sentence
    for sentence in refused:
        assert not grammar.matches(sentence.encode()), sentence


def test_only_well_formed_utf8_is_taken():
    grammar = compile_grammar("root ::= [^]*")
    for bad in (b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xff", b"\x80"):
        assert None in states(grammar, bad), bad
    assert not grammar.matches("é".encode()[:1]) and states(grammar, "é".encode()[:1])[0] is not None


@pytest.mark.parametrize("text, named", [
    ('root ::= a', "grammar: line 1, column 10: the rule 'a' is used but never defined"),
    ('x ::= "a"', "grammar: it has no `root` rule"),
    ('root ::= "a"\nroot ::= "b"', "grammar: line 2, column 1: the rule 'root' is defined twice"),
    ('root ::= "a', "grammar: line 1, column 10: the string literal is never closed"),
    ('root ::= [a-', "grammar: line 1, column 10: the class '[' has no ']'"),
    ('root ::= [b-\n', "grammar: line 1, column 10: the class '[' has no ']' (on its line)"),  # not "range b-\n"
    ('root ::= [\\\r\n', "grammar: line 1, column 11: a '\\' at the end of its line escapes nothing"),
    ('root ::= "a\\', "grammar: line 1, column 12: a '\\' at the end of its line escapes nothing"),
    ('root ::= [b-a]', "grammar: line 1, column 11: the range b-a has its ends out of order"),
    ('root ::= []', "grammar: line 1, column 10: the empty class [] matches nothing"),
    ('root ::= [\\d]', "grammar: line 1, column 11: the escape \\d is not supported (write the class's ranges"),
    ('root ::= "\\q"', "grammar: line 1, column 11: the escape \\q is not supported"),
    ('root ::= "\\uD800"', "grammar: line 1, column 11: a surrogate U+D800"),
    ('root ::= "\\x110000"', "grammar: line 1, column 11: the escape \\x110000 needs some hex digits"),
    ('root ::= "a"++', "grammar: line 1, column 14: '+' repeats a repetition"),
    ('root ::= *', "grammar: line 1, column 10: '*' repeats nothing"),
    ('root ::= "a"{2000}', "grammar: line 1, column 13: the repetition {2000} is over the limit of 1000"),
    ('root ::= "a"{3,2}', "the repetition {3,2} has its bounds out of order"),
    ('root ::= "a"{,2}', "grammar: line 1, column 13: a '{' that does not begin a repetition"),
    # spaces go around a bound, not inside one: these read as {12} and {1,20}, as llama.cpp refuses them
    ('root ::= "a"{1 2}', "grammar: line 1, column 13: a '{' that does not begin a repetition"),
    ('root ::= "a"{1, 2 0}', "grammar: line 1, column 13: a '{' that does not begin a repetition"),
    ('\n\nroot ::= ("a" | "b"', "grammar: line 3, column 10: the '(' is never closed"),
    ('root ::= "a")', "grammar: line 1, column 13: unexpected ')'"),
    ("root ::= 'a'", "grammar: line 1, column 10: a single-quoted literal"),
    ('root ::= "a"\n5x ::= "b"', "grammar: line 2, column 1: unexpected '5'"),
    ('start: "a" | "b"\n%ignore " "', "grammar (Lark): line 2, column 1: %ignore is not taken"),
    ("", "grammar: no rule"),
    ('root ::= root "a"', "grammar: the rule 'root' is left-recursive (root -> root, reading no byte) and has no "
                          "alternative that begins otherwise: it derives no text"),
    ('root ::= "a" | x\nx ::= x', "the rule 'x' is left-recursive (x -> x, reading no byte) and has no alternative"),
    ('root ::= a\na ::= b "x"\nb ::= (a) "y"', "the rule 'b' is left-recursive (b -> a -> b, reading no byte) and "
                                            "has no alternative that begins otherwise"),
    ('root ::= x\nx ::= "a" x', "grammar: the root rule derives no text"),
    ('root ::= ("a"{1000}){200}', "grammar: too large"),
    ('root ::= ' + "(" * 101 + ")" * 101, "groups nested more than 100 deep"),
])
def test_grammars_this_module_does_not_take_are_refused_naming_the_problem(text, named):
    with pytest.raises(GrammarError, match=re.escape(named)):
        compile_grammar(text)
    with pytest.raises(GrammarError, match="must be a string, got bytes"):
        compile_grammar(b"root ::= x")


# ---- left recursion: rewritten, the language kept --------------------------------------------

LEFT_RECURSIVE = [  # (grammar, alphabet: its characters and one more)
    ('root ::= root "+" t | t\nt ::= "a" | "b"', "ab+x"),
    ('root ::= a\na ::= b "x" | "y"\nb ::= a "z" | "w"', "xyzw"),  # indirect
    ('root ::= x\nx ::= y? "-" | "a"\ny ::= "" | x "b"', "-abc"),  # hidden: behind an optional, a rule deriving ""
    ('root ::= n* root "a" | "b"\nn ::= "c"', "abcd"),  # hidden behind a repetition
    ('root ::= l "." l\nl ::= l "," "a" | ""', ".,ab"),  # a left-recursive rule deriving "", used after text too
    ('root ::= (root [+-] | "-") ("1" | "(" root ")") | "1"', "1+-()"),  # groups and alternation in a sequence
    ('root ::= (root "a")+ "b" | "c"', "abcd"),
    ('root ::= (root "a"){0,2} "b" | (root "c")? "d"', "abcde"),
    ('root ::= "<" l ">"\nl ::= (l ","?){2,3} "a" | ""', "<>,ab"),  # a repetition of what may be empty
    ('root ::= a "!"\na ::= b a "x" | ""\nb ::= a "y" | ""', "!xyz"),  # a cycle of rules deriving ""
    ('root ::= a | "q"\na ::= root | "z" | a "z"', "qzx"),  # a cycle of bare calls
    ('root ::= e\ne ::= s? e "*" f | f\ns ::= " "\nf ::= "1" | "(" e ")"', "1)*( "),  # closers first
]


def sentences(text: str, alphabet: str, length: int) -> set[str]:
    """The sentences of at most `length` characters of the grammar `text` (its characters in `alphabet`), straight
    from its rules as parsed: each rule's texts grown together until none grows (left recursion and all)."""
    rules = {name: tree for name, (tree, _) in grammar_module._Parser(text).parse().items()}
    found: dict[str, set[str]] = {name: set() for name in rules}

    def joined(firsts: set[str], seconds: set[str]) -> set[str]:
        return {a + b for a in firsts for b in seconds if len(a + b) <= length}

    def texts(tree) -> set[str]:
        kind = tree[0]
        if kind == "bytes":
            return {tree[1].decode()}
        if kind == "set":
            return {c for c in alphabet if any(lo <= ord(c) <= hi for lo, hi in tree[1])}
        if kind == "ref":
            return found[tree[1]]
        if kind == "alt":
            return set().union(*(texts(part) for part in tree[1]))
        if kind == "cat":
            done = {""}
            for part in tree[1]:
                done = joined(done, texts(part))
            return done
        _, part, least, most = tree
        one, done, count = texts(part), {""}, {""}
        done = {""} if least == 0 else set()
        for k in range(1, (least + length if most is None else most) + 1):
            count = joined(count, one)
            if k >= least:
                done |= count
        return done

    while True:
        grown = {name: texts(tree) for name, tree in rules.items()}
        if grown == found:
            return found["root"]
        found = grown


def finishes(grammar, state, alphabet: str, steps: int, failed: dict) -> bool:
    """Whether some text of at most `steps` characters of `alphabet` takes `state` to acceptance: depth first, in the
    alphabet's order, `failed` holding the most steps each state was searched with in vain."""
    if grammar.accepting(state):
        return True
    if steps == 0 or failed.get(state, -1) >= steps:
        return False
    for c in alphabet:
        s = after(grammar, state, c.encode())
        if s is not None and finishes(grammar, s, alphabet, steps - 1, failed):
            return True
    failed[state] = steps
    return False


@pytest.mark.parametrize("text, alphabet", LEFT_RECURSIVE)
def test_left_recursive_grammars_take_exactly_the_sentences_of_the_grammar(text, alphabet):
    """Every text of up to 6 characters of the alphabet is taken exactly where it is a sentence (of the grammar as
    written); it is refused (from the byte where it goes astray) only where no sentence of up to 10 characters
    begins with it, and where it is not, a sentence lies ahead (no dead ends)."""
    grammar = compile_grammar(text)
    short, long = sentences(text, alphabet, 6), sentences(text, alphabet, 10)
    assert short and len(long) > len(short)
    beginnings = {sentence[:i] for sentence in long for i in range(len(sentence) + 1)}
    level, failed = {"": grammar.initial}, {}
    for size in range(7):
        for prefix, state in level.items():
            assert (state is not None) >= (prefix in beginnings), prefix
            assert state is None or prefix in beginnings or finishes(grammar, state, alphabet, 16, failed), prefix
            assert (state is not None and grammar.accepting(state)) == (prefix in short), prefix
        level = {prefix + c: None if state is None else after(grammar, state, c.encode())
                 for prefix, state in level.items() for c in alphabet}


def test_a_long_left_recursive_sentence_is_taken_in_few_calls_and_masks_along_it_are_the_oracles():
    """`expr ::= expr "+" term` becomes a repetition, not a right-recursive rule: 201 terms open no more calls (nor
    hold more stacks) than 3, well within MAX_DEPTH and MAX_STACKS."""
    grammar = compile_grammar('root ::= expr\nexpr ::= expr "+" term | term\nterm ::= [0-9]+ | "(" expr ")"')

    def largest(data: bytes) -> int:  # stacks in a state, calls in a stack
        return max(max(len(state), *(len(stack) for stack in state)) for state in states(grammar, data))

    sentence = "+".join(["12", "(3+4)"] * 100 + ["5"]).encode()
    pieces = [b"1", b"2", b"12", b"+", b"+1", b"2+", b"(", b"(3", b"3", b"3+4", b"4", b")", b")+", b"5", b"x", None]
    vocabulary = jm.JsonVocabulary(pieces, len(pieces) + 1)
    constraint = AutomatonConstraint(vocabulary, grammar)
    at = 0
    while at < len(sentence):
        expected = [bool(piece) and after(grammar, constraint.state, piece) is not None for piece in pieces] + [False]
        assert grammar.mask(vocabulary, constraint.state).tolist() == expected
        piece = max((p for p in pieces if p and sentence.startswith(p, at)), key=len)
        constraint.advance(pieces.index(piece))
        at += len(piece)
    assert constraint.complete and grammar.matches(sentence) and not grammar.matches(sentence + b"+")
    assert largest(sentence) == largest(b"12+(3+4)+5") < 10


def test_rewriting_left_recursion_calls_large_parts_instead_of_copying_them():
    """`b`'s 60 alternatives begin with `a`: each gets `a`'s alternatives, the large one (1,000 nodes) as a call of a
    rule of its own, not a copy each (which would pass MAX_NODES)."""
    text = 'root ::= a\na ::= b "x" | "q" [a-z]{0,999}\nb ::= ' + " | ".join(f'a "{i}"' for i in range(60)) + ' | "w"'
    grammar = compile_grammar(text)
    assert grammar.size < 10_000
    for sentence, taken in (("qab1x", True), ("wx59x", True), ("q" + "z" * 999 + "7x0x", True), ("qab1", False),
                            ("w", False), ("q" + "z" * 1000 + "7x", False), ("wx60x", False)):
        assert grammar.matches(sentence.encode()) == taken, sentence


def test_the_left_recursion_analysis_agrees_with_plain_fixpoints_on_random_grammars():
    """The rules that derive the empty text and those on a cycle of first calls (with a path of it), now found in
    linear time (a chain of 3000 rules took two minutes), equal the plain definitions on random grammars."""
    rng = random.Random(0)
    for _ in range(300):
        names = [f"r{i}" for i in range(rng.randint(1, 9))]

        def tree(depth=0):
            kind = rng.choice(["ref", "ref", "bytes", "empty", "cat", "alt", "rep"] if depth < 3 else ["ref", "bytes"])
            if kind == "ref":
                return ("ref", rng.choice(names), None)
            if kind in ("bytes", "empty"):
                return ("bytes", b"x" if kind == "bytes" else b"")
            if kind == "rep":
                low = rng.choice([0, 1, 2])
                return ("rep", tree(depth + 1), low, rng.choice([None, low, low + 1]))
            return (kind, tuple(tree(depth + 1) for _ in range(rng.randint(1, 3))))

        rules = {name: tree() for name in names}
        nullable: set[str] = set()
        while found := {n for n in names if n not in nullable and grammar_module._nullable(rules[n], nullable)}:
            nullable |= found
        assert grammar_module._nullable_rules(rules) == nullable
        firsts = {n: grammar_module._firsts(rules[n], nullable) for n in names}
        reach = {}
        for n in names:  # the rules n calls first, through one another
            seen, todo = set(), [n]
            while todo:
                for callee in firsts[todo.pop()] - seen:
                    seen.add(callee)
                    todo.append(callee)
            reach[n] = seen
        cycles = grammar_module._cycles(firsts)
        assert list(cycles) == [n for n in names if n in reach[n]]
        for n, path in cycles.items():
            assert path[0] == path[-1] == n and all(b in firsts[a] for a, b in zip(path, path[1:]))


def test_a_chain_of_thousands_of_rules_compiles():
    text = "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "x" | "y"\n' for i in range(3000)) + 'r3000 ::= "a"'
    grammar = compile_grammar(text)
    assert grammar.matches(b"y") and grammar.matches(b"yxx") and not grammar.matches(b"x")


def test_unproductive_parts_are_pruned():
    """An alternative that derives no text (`loop` never ends) takes no byte: its prefix `"l"` is refused."""
    grammar = compile_grammar('root ::= "a" | loop\nloop ::= "l" loop')
    assert grammar.matches(b"a") and grammar.advance(grammar.initial, ord("l")) is None


def test_past_the_depth_limit_deeper_nesting_is_refused_without_dead_ends(monkeypatch):
    monkeypatch.setattr(grammar_module, "MAX_DEPTH", 6)
    grammar = grammar_module.Grammar('root ::= "(" root ")" | "x"')
    assert grammar.matches(b"(((((x)))))")  # 6 frames: root and 5 more
    assert after(grammar, grammar.initial, b"((((((") is None
    rng = random.Random(2)
    for _ in range(40):
        random_walk(grammar, rng)
    with pytest.raises(GrammarError, match="the root rule derives no text within 6 nested rule calls"):
        grammar_module.Grammar('root ::= a\na ::= b\nb ::= c\nc ::= d\nd ::= e\ne ::= f\nf ::= "x"')


def test_past_the_stack_limit_a_state_keeps_the_shortest_stacks_and_stays_in_the_grammar(monkeypatch):
    """An ambiguous grammar (each `(` opens either rule) doubles its stacks with each `(`: past MAX_STACKS some are
    dropped, some sentences can no longer be written, and what is written is still a sentence, without dead ends."""
    monkeypatch.setattr(grammar_module, "MAX_STACKS", 8)
    grammar = grammar_module.Grammar('root ::= a\na ::= "(" (a | b)? ")"\nb ::= "(" (a | b)? ")"')
    for depth in range(1, 10):
        state = after(grammar, grammar.initial, b"(" * depth)
        assert state is not None and len(state) <= 8
    rng = random.Random(3)
    for _ in range(40):
        data = random_walk(grammar, rng)
        if grammar.matches(data):
            assert parentheses_ok(data.decode()) and data.startswith(b"(" * (len(data) // 2)), data


def test_the_memo_is_cleared_past_its_bound_and_answers_stay_the_same(monkeypatch):
    monkeypatch.setattr(automaton, "MAX_HELD", 20)
    grammar = grammar_module.Grammar(ARITHMETIC)
    rng = random.Random(4)
    for _ in range(50):
        text = mutated(rng, arithmetic(rng), "0123456789+-*/()")
        assert grammar.matches(text.encode()) == arithmetic_ok(text), text
        assert grammar._held <= 20 + max((len(state) for state in grammar._moves), default=0)


def test_compiled_grammars_are_cached_and_equal_by_their_text():
    assert compile_grammar(ARITHMETIC) is compile_grammar(ARITHMETIC)
    assert compile_grammar(ARITHMETIC) == grammar_module.Grammar(ARITHMETIC) != compile_grammar(PARENTHESES)


# ---- guided decoding: masks, the engine and the chat API ---------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_chat_folder(tmp_path_factory.mktemp("grammar") / "model")[0]


@pytest.fixture(scope="module")
def tiny_chat(folder):
    return InternVLChat.from_pretrained(folder, dtype=torch.float32)


def test_masks_equal_the_token_by_token_oracle(tiny_chat):
    """The tiny tokenizer's tokens plus hand-made ones (split characters, an empty one, a special one), on every
    state that some sentences pass through."""
    extra = [b"\xe7", b"\x8c", b"\x8c\xab", b"\xf0\x9f", b"\x98\x80", b"\xed\xa0", b"", None, b"12", b"(1"]
    cases = ((ARITHMETIC, ["(12+3)*45", "7"]), (JSON_SUBSET, ['{"a b":[1,true,{}],"é":"x"}']), (WORDS, ["猫, ab,😀."]),
             (PARENTHESES, ["(()())"]))
    assert_automaton_masks(tiny_chat.tokenizer, extra, compile_grammar, cases, "grammar")


@pytest.mark.parametrize("few_words", [0, 256, 10**9])
def test_masks_of_random_walks_equal_the_oracle(monkeypatch, few_words):
    """Masks (one token of each class of the grammar's byte runs walked, all together, the last few as a trie)
    against the token-by-token oracle: tokens cut from random sentences and random texts (split characters, long
    ones, runs of one character), on the states of random walks; `few_words` moves where the walk turns to a trie."""
    monkeypatch.setattr(jm, "FEW_WORDS", few_words)
    monkeypatch.setattr(jm, "CACHED_CLASSES", 2)  # class tables evicted and built again
    rng = random.Random(5)
    text = "".join([make(rng) for _, make, _, _ in CASES for _ in range(30)] +
                   [rng.choice("".join(alphabet for *_, alphabet in CASES)) for _ in range(1000)]).encode()
    starts = [rng.randrange(len(text)) for _ in range(1500)]
    pieces = [text[i: i + rng.choice([1, 1, 2, 3, 4, 6, 9, 20])] for i in starts]
    pieces += [c.encode() * n for c in "a(é😀" for n in (3, 8, 30)] + [None, b""]
    vocabulary = jm.JsonVocabulary(pieces, len(pieces) + 2)
    checked = 0
    for grammar_text, *_ in CASES + [(SHORT,)]:
        grammar = compile_grammar(grammar_text)
        seen = {grammar.initial}
        for _ in range(10):
            seen.update(states(grammar, random_walk(grammar, rng)))
        for state in seen:
            expected = [bool(piece) and after(grammar, state, piece) is not None for piece in pieces] + [False] * 2
            assert grammar.mask(vocabulary, state).tolist() == expected, (grammar_text, state)
            checked += 1
    assert checked > 50


def test_a_mask_advances_one_token_of_each_class_of_the_byte_runs():
    """[a-z]+ reads a..z alike: the 26 one-letter tokens are one class, so a mask advances the state by one byte
    (and one more for the class of "é"), not by each token's."""
    grammar = grammar_module.Grammar('root ::= [a-z]+ | "é"')
    pieces = [bytes((c,)) for c in range(ord("a"), ord("z") + 1)] + ["é".encode()]
    vocabulary = jm.JsonVocabulary(pieces, len(pieces))
    advanced = []

    def counted(state, byte):
        advanced.append(byte)
        return grammar_module.Grammar.advance(grammar, state, byte)

    grammar.advance = counted
    assert grammar.mask(vocabulary, grammar.initial).all()
    assert len(advanced) == 3, advanced

SAMPLED = [dict(do_sample=False), *({"do_sample": True, "seed": seed} for seed in range(6)),
           {"do_sample": True, "seed": 3, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3, "temperature": 0.7}]


def test_guided_answers_are_sentences_when_they_stop(tiny_chat):
    tokenizer = tiny_chat.tokenizer
    ids = tiny_chat.prepare("Compute something").prompt_ids
    end = {tokenizer.im_end_id: 4.0}  # so that some answers stop before the length cuts them
    for text, check in ((ARITHMETIC, arithmetic_ok), (JSON_SUBSET, json_ok), (PARENTHESES, parentheses_ok)):
        grammar = compile_grammar(text)
        requests = [Request(ids, SamplingParams(max_new_tokens=16, grammar=text, logit_bias=end, **kw))
                    for kw in SAMPLED]
        stopped = 0
        for tokens, finish in engine_answers(tiny_chat, requests):
            data = b"".join(tokenizer.token_bytes(t) for t in (tokens[:-1] if finish == "stop" else tokens))
            if finish == "stop":
                assert tokens[-1] == tokenizer.im_end_id and check(data.decode()), data
                stopped += 1
            else:
                assert len(tokens) == 16 and None not in states(grammar, data)
        assert stopped >= 2, text


def test_chat_stream_chat_and_batch_chat_take_a_grammar(tiny_chat):
    check = lambda answer: re.fullmatch(SHORT_REGEX, answer)  # noqa: E731
    answer = tiny_chat.chat("How many?", do_sample=False, max_new_tokens=12, grammar=SHORT)
    assert check(answer), answer  # not stripped: the whole text is what the grammar took
    assert "".join(tiny_chat.stream_chat("How many?", do_sample=False, max_new_tokens=12, grammar=SHORT)) \
        == answer
    for answer in tiny_chat.batch_chat(["One?", "Two?", "Three?"], seed=4, max_new_tokens=12, grammar=SHORT):
        assert check(answer), answer
    assert tiny_chat.chat("Hi", do_sample=False, max_new_tokens=12, grammar='root ::= " yes "') == " yes "


def test_grammar_settings_that_cannot_work_are_refused():
    with pytest.raises(SettingError, match="^give regex or grammar, not both$"):
        SamplingParams(regex="a", grammar='root ::= "a"')
    with pytest.raises(SettingError, match="^give json_mode or grammar, not both$"):
        SamplingParams(json_mode=True, grammar='root ::= "a"')
    with pytest.raises(SettingError, match="^min_new_tokens does not go with grammar: the answer may be complete"):
        SamplingParams(grammar='root ::= "a"', min_new_tokens=2)
    with pytest.raises(SettingError, match="^ignore_eos with grammar needs stop_token_ids"):
        SamplingParams(grammar='root ::= "a"', ignore_eos=True)
    with pytest.raises(GrammarError, match="^grammar: line 1, column 10: the rule 'a' is used but never defined$"):
        SamplingParams(grammar="root ::= a")
    assert SamplingParams(grammar='root ::= "a"').constrained_by == "grammar"


# ---- the server and the command line --------------------------------------------------------

def test_guided_grammar_and_structured_outputs_grammar_and_their_400s():
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for parse, body in ((parse_chat_request, chat), (parse_completion_request, {"prompt": "hi"})):
        def params(**fields):
            return parse({**body, **fields}, ServerSettings()).params

        assert params(guided_grammar=ARITHMETIC).grammar == ARITHMETIC
        assert params(structured_outputs={"grammar": PARENTHESES, "json": None}).grammar == PARENTHESES
        for fields, message, param in (
                ({"guided_grammar": "start: a"}, r"^guided_grammar: grammar \(Lark\): line 1, column 8: 'a' is used "
                 "but never defined$", "guided_grammar"),
                ({"structured_outputs": {"grammar": "root ::= x"}}, "^structured_outputs.grammar: grammar: line 1, "
                 "column 10: the rule 'x' is used but never defined$", "structured_outputs"),
                ({"guided_grammar": ["a"]},
                 r'^guided_grammar must be a string \(a GBNF or Lark grammar\), got \["a"\]$', "guided_grammar"),
                ({"guided_grammar": PARENTHESES, "guided_regex": "a"},
                 "^give one of guided_regex and guided_grammar, not more", "guided_grammar"),
                ({"guided_grammar": PARENTHESES, "structured_outputs": {"json": {}}},
                 "^give one of guided_grammar and structured_outputs", "structured_outputs"),
                ({"structured_outputs": {"grammar": PARENTHESES, "regex": "a"}}, "with both regex and grammar",
                 "structured_outputs"),
                ({"guided_grammar": PARENTHESES, "min_tokens": 2}, "^min_tokens does not go with guided_grammar",
                 "min_tokens")):
            with pytest.raises(ApiError, match=message) as e:
                params(**fields)
            assert (e.value.status, e.value.param) == (400, param), fields


def test_grammar_flag(folder, tmp_path):
    """--grammar FILE holds chat's and generate's answers (the API's grammar=); generate records the grammar's text
    in its settings (a resume without it is refused); a file that is missing or does not parse is refused naming it."""
    bot = InternVLChat.from_pretrained(folder)
    path = tmp_path / "short.gbnf"
    path.write_text(SHORT, encoding="utf-8")
    out = cli("chat", "--model", folder, "--max-new-tokens", "12", "--grammar", path, "How many?")
    assert out.returncode == 0, out.stderr
    expected = bot.chat("How many?", max_new_tokens=12, grammar=SHORT, do_sample=False)
    assert out.stdout == expected + "\n" and re.fullmatch(SHORT_REGEX, expected), out.stdout
    (tmp_path / "bad.gbnf").write_text('root ::= "a" b\n')
    for args, message in ((["--grammar", tmp_path / "bad.gbnf"], f"--grammar {tmp_path / 'bad.gbnf'}: grammar: line 1, "
                           "column 14: the rule 'b' is used but never defined"),
                          (["--grammar", tmp_path / "none.gbnf"], f"--grammar {tmp_path / 'none.gbnf'}: No such file"),
                          (["--grammar", path, "--regex", "a"], "give --regex or --grammar, not both")):
        out = cli("chat", "--model", folder, *args, "Hi")
        assert out.returncode == 1 and message in out.stderr, out.stderr
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "How many?"}) + "\n"
                        + json.dumps({"id": "b", "question": "Hi"}) + "\n")
    answers = tmp_path / "a.jsonl"
    out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--max-new-tokens", "12",
              "--grammar", path)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert lines[0]["answer"] == expected and all(re.fullmatch(SHORT_REGEX, line["answer"]) for line in lines)
    assert json.loads((tmp_path / "a.jsonl.settings.json").read_text())["grammar"] == SHORT
    answers.write_text(answers.read_text().splitlines()[0] + "\n")  # one answer left to write
    out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--max-new-tokens", "12")
    assert out.returncode == 1 and "other settings (" in out.stderr and "grammar" in out.stderr, out.stderr
    out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--max-new-tokens", "12",
              "--grammar", path)
    assert out.returncode == 0 and len(answers.read_text().splitlines()) == 2, out.stderr


def test_guided_grammar_answers_over_http_on_both_endpoints_streamed_too(tiny_chat):
    """guided_grammar and structured_outputs {"grammar"} answers are chat()'s under the same grammar, plain and
    streamed, and sentences of the grammar where they stop; a grammar that does not parse is a 400 naming it."""
    openai = pytest.importorskip("openai")
    from test_server import app_server, stream_text

    expected = tiny_chat.chat("How many?", grammar=SHORT, do_sample=False, max_new_tokens=20)
    assert re.fullmatch(SHORT_REGEX, expected), expected
    body = {"messages": [{"role": "user", "content": "How many?"}], "temperature": 0, "max_tokens": 20}
    with app_server(tiny_chat) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=120)
        for extra in ({"guided_grammar": SHORT}, {"structured_outputs": {"grammar": SHORT}}):
            reply = client.chat.completions.create(model="m", **body, extra_body=extra)
            assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.content == expected
        texts, finishes, _ = stream_text(client, **body, extra_body={"guided_grammar": SHORT})
        assert texts == {0: expected} and finishes == {0: "stop"}
        completion = client.completions.create(model="m", prompt="Count:", max_tokens=20, temperature=0.8, seed=3,
                                               n=3, extra_body={"guided_grammar": ARITHMETIC})
        for choice in completion.choices:
            if choice.finish_reason == "stop":
                assert arithmetic_ok(choice.text), choice.text
            else:
                assert None not in states(compile_grammar(ARITHMETIC), choice.text.encode()), choice.text
        with pytest.raises(openai.BadRequestError, match=r"guided_grammar: grammar \(Lark\): line 1, column 8"):
            client.chat.completions.create(model="m", **body, extra_body={"guided_grammar": "start: a"})
