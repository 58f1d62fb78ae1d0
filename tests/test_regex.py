"""Regexes as byte-level automata (generate/regex.py): hand cases, refusals, and random regexes checked against
Python's re on random texts and on random walks of the automaton."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from internvl_mpo.errors import InputError, SettingError
from internvl_mpo.generate import automaton
from internvl_mpo.generate import json_mode as jm
from internvl_mpo.generate import regex as regex_module
from internvl_mpo.generate.engine import Engine, Request
from internvl_mpo.generate.automaton import automaton_mask
from internvl_mpo.generate.regex import RegexError, choice_pattern, compile_regex, escape
from internvl_mpo.generate.params import SamplingParams
from internvl_mpo.pipeline import InternVLChat

from conftest import after, assert_automaton_masks, engine_answers, states, tiny_chat_folder

TEXT_ALPHABET = "ab1 _\n\té€😀.-Z\U0010ffff"


@pytest.mark.parametrize("pattern, taken, refused", [
    ("abc", ["abc"], ["", "ab", "abcd", "xabc"]),
    ("a|bc|", ["a", "bc", ""], ["b", "abc"]),
    ("(?:ab)*c", ["c", "abc", "ababc"], ["ac", "abab"]),
    ("a{2,3}", ["aa", "aaa"], ["a", "aaaa"]),
    ("a{2}", ["aa"], ["a", "aaa"]),
    ("a{2,}?", ["aa", "aaaaa"], ["a"]),
    ("[a-c]+[^a-c]", ["abx", "c€"], ["ab", "abc", "x"]),
    (r"\d\w\s\D\W\S", ["1a\tx-y"], ["1a\t1-y", "١a xx_"]),
    (r"\x41\u00e9\uD83D\uDE00\.\\\/\n\t\r\f\v", ["Aé😀.\\/\n\t\r\f\v"], ["Aé😀x\\/\n\t\r\f\v"]),
    (r"[\]\-\\a-c\d]+", ["]-\\b5"], ["^"]),
    ("[é-ü]€.😀", ["ñ€x😀", "é€é😀"], ["a€x😀", "ñ€\n😀"]),
    ("(?P<x>a)(?<y>b)", ["ab"], ["a"]),
    ("^ab$", ["ab"], ["ab\n"]),
    ("a^b|c", ["c"], ["ab", "a^b"]),
    ("a$b|c", ["c"], ["ab", "a$b"]),
    ("[\\b]", ["\b"], ["b"]),
    ("", [""], ["a"]),
    (r"\U0001F642[\U00000061-\U00000063]", ["🙂a", "🙂c"], ["🙂d", "a"]),  # Python's \U: eight hex digits
])
def test_hand_cases_match_as_python_fullmatch(pattern, taken, refused):
    regex = compile_regex(pattern)
    for text in taken:
        assert regex.matches(text.encode()), text
        assert all(s is not None for s in states(regex, text.encode())), text
    for text in refused:
        assert not regex.matches(text.encode()), text


def test_search_is_unanchored_but_for_caret_and_dollar():
    assert compile_regex("ab", search=True).matches(b"xxabyy")
    assert not compile_regex("ab", search=True).matches(b"xxa")
    assert compile_regex("^ab", search=True).matches(b"aby")
    assert not compile_regex("^ab", search=True).matches(b"xab")
    assert compile_regex("ab$", search=True).matches(b"xab")
    assert not compile_regex("ab$", search=True).matches(b"ab\n")  # ECMA-262's $: the end only
    assert compile_regex("", search=True).matches("any\n😀".encode())


def test_only_well_formed_utf8_is_taken():
    regex = compile_regex(".*")
    for bad in [b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xff", b"\xe0\x80\x80"]:
        assert None in states(regex, bad), bad
    assert not regex.matches("é".encode()[:1])  # a character cut short is a live prefix, not an accepted text
    assert states(regex, "é".encode()[:1])[0] is not None


def test_excluded_characters_never_appear():
    regex = compile_regex(".*", excluded='"\\' + "".join(map(chr, range(0x20))))
    assert regex.matches("abc é".encode())
    for text in ['a"', "a\\", "\x00", "\x1f", "\n"]:
        assert not regex.matches(text.encode()), text
    with pytest.raises(RegexError, match="no text matches it without the characters"):
        compile_regex('"', excluded='"')
    assert compile_regex('a|"', search=True, excluded='"').matches(b"xa")


@pytest.mark.parametrize("pattern, named", [
    (r"(a)\1", r"backreference \1 at position 3"), ("(?P<n>a)(?P=n)", "backreference (?P= at position 8"),
    (r"\k<n>", "backreference"), ("a(?=b)", "lookaround (?= at position 1"), ("(?!b)", "lookaround (?!"),
    ("(?<=a)b", "lookaround (?<="), ("(?<!a)b", "lookaround (?<!"), (r"\bx", r"word boundary \b at position 0"),
    (r"x\B", r"word boundary \B at position 1"), ("a++", "possessive quantifier at position 2"),
    ("a{2}+", "possessive"), ("(?>a)", "atomic group"), ("(?i)a", "inline flags (?i at position 0"),
    ("(?s:a)", "inline flags"), (r"\p{L}", r"Unicode property \p"), (r"\P{L}", "Unicode property"),
    ("(a", "'(' at position 0 is never closed"), ("a)", "')' at position 1 closes no group"),
    ("a{1001}", "over the limit of 1000"), ("a{3,2}", "out of order"), ("[a", "has no ']'"),
    ("*a", "repeats nothing"), ("a**", "repeats a repetition"), ("^*", "after an anchor"), (r"\q", r"escape \q"),
    ("[]a]", "']' first in a class"), ("a{,3}", "does not begin a repetition"), ("a{x}", "'{'"),
    ("[z-a]", "bad range z-a"), (r"[\d-z]", "bad range"), (r"\x4", r"\x4 at position 0 needs 2 hex digits"),
    (r"\U1F642", r"\U1F642 at position 0 needs 8 hex digits"), (r"\U00110000", "is past U+10FFFF"),
    (r"\U0000D83D\uDE00", "lone surrogate U+D83D"),
    ("\\", "backslash at position 0 ends the regex"), ("(?P<1>a)", "group name '1'"), ("(?P<x>a)(?<x>b)", "'x'"),
    ("\ud800", "lone surrogate U+D800"), (r"\ud800", "lone surrogate"), ("(?#c)", "comment"),
    ("(" * 101 + ")" * 101, "nested more than 100 deep"), ("(?:.{1000}){20}", "the regex is too large"),
])
def test_unsupported_constructs_are_refused_naming_them(pattern, named):
    with pytest.raises(RegexError, match=re.escape(named)) as caught:
        compile_regex(pattern)
    assert isinstance(caught.value, InputError)


def test_the_dfa_memo_is_cleared_past_its_bound_and_answers_stay_the_same(monkeypatch):
    """(a|b)*a(a|b){6} has 2**7 DFA states; with room for a few, the memo is cleared again and again."""
    monkeypatch.setattr(automaton, "MAX_HELD", 20)
    regex = regex_module.Regex("(a|b)*a(a|b){6}", False, "")
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        assert regex.matches(text.encode()) == bool(re.fullmatch("(a|b)*a(a|b){6}", text)), text
        assert regex._held <= 20 + max(len(state) for state in regex._moves)


def test_cached_masks_keep_no_automaton_or_schema_alive():
    """The vocabulary's mask caches are keyed by what a regex, grammar or schema is built from: once the compile caches
    (CACHED_REGEXES, ...) let go of one, it is freed with its nodes and memo. Keyed by the objects, the caches kept up
    to CACHED_MASKS of them alive (a server given distinct regexes held hundreds, a few MiB each)."""
    import gc
    import weakref

    from internvl_mpo.generate import json_schema as js
    from internvl_mpo.generate.grammar import Grammar

    pieces = [bytes([b]) for b in range(32, 127)] + [b"ab", b"12", b'{"', b'":', b'"}']
    vocabulary = jm.JsonVocabulary(pieces, len(pieces) + 1)
    value = {"type": "object", "properties": {"k": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}},
             "required": ["k"]}
    schema = js.Schema(json.dumps(value), value)
    built = [(regex_module.Regex("[a-z]{1,3}x", False, ""), b"abx"), (Grammar('root ::= "a" [0-9]+'), b"a12"),
             (schema, b'{"k":"ab"}')]
    for source, text in built:
        constraint = automaton.AutomatonConstraint(vocabulary, source) if source is not schema else \
            js.SchemaConstraint(vocabulary, source)
        for byte in text:
            assert constraint.allowed([len(pieces)])[pieces.index(bytes([byte]))]
            constraint.advance(pieces.index(bytes([byte])))
    assert vocabulary.regex_cache and vocabulary.schema_cache
    bounded = [a.automaton for a in schema.alternatives if a.automaton is not None]
    assert [type(a).__name__ for a in bounded] == ["_Bounded"]  # its masks are cached too
    refs = [weakref.ref(thing) for thing in [source for source, _ in built] + bounded]
    del built, source, constraint, schema, bounded
    gc.collect()
    assert [ref() for ref in refs] == [None] * 4


def test_a_non_string_regex_is_refused():
    with pytest.raises(RegexError, match="must be a string, got int"):
        compile_regex(5)


def test_compiled_regexes_are_cached_and_equal_by_their_arguments():
    assert compile_regex("a+b") is compile_regex("a+b")
    assert compile_regex("a+b") != compile_regex("a+b", search=True)
    assert compile_regex("a+b", excluded="x") == compile_regex("a+b", excluded="x")


def test_choices_are_escaped_alternatives():
    choices = ["yes", "no", "a.b*(c)", "[x]{1}|\\^$?+", "😀 é", ""]
    regex = compile_regex(choice_pattern(choices))
    for text in choices:
        assert regex.matches(text.encode()), text
    for text in ["ye", "yesno", "aXb*(c)", "a.bb*(c)", "[x]", " "]:
        assert not regex.matches(text.encode()), text
    assert re.fullmatch(escape("[x]{1}|\\^$?+"), "[x]{1}|\\^$?+")


BOUNDS = [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 3), (0, None), (1, None), (2, None)]


def quantifier(low, high):
    return f"{{{low},}}" if high is None else f"{{{low},{high}}}"


def test_nested_bounded_repetitions_match_as_python_fullmatch():
    """A repetition of a repetition, merged into one where the counts leave no gap (automaton.merged), takes the
    texts Python's re does, for every pair of bounds, a part that may be empty and one of two lengths."""
    texts = [""]
    for _ in range(5):
        texts += [t + c for t in texts if len(t) == len(texts[-1]) for c in "abc"]
    texts += ["a" * n for n in range(6, 14)] + ["bc" * n for n in range(3, 8)]
    for part in ("a", "a?", "ab?", "(?:a|bc)"):
        for inner in BOUNDS:
            for outer in BOUNDS:
                pattern = f"(?:(?:{part}){quantifier(*inner)}){quantifier(*outer)}"
                regex, oracle = compile_regex(pattern), re.compile(pattern)
                for text in texts:
                    assert regex.matches(text.encode()) == bool(oracle.fullmatch(text)), (pattern, text)


@pytest.mark.parametrize("pattern, most, taken, refused", [
    ("(.{0,50}){0,100}", 2, ["x" * 40, "x" * 5000], ["x" * 5001, "ab\n"]),
    ("(?:(?:[a-z]{1,3}){2,}){1,4}", 2, ["x" * 40, "ab"], ["x", "ab1"]),
    ("(.{0,50}\n?){0,100}", 4, ["abc\n" * 30, "ab " * 60 + "\n", "\n" * 100, ("x" * 50 + "\n") * 100],
     ["\n" * 101, ("x" * 50 + "\n") * 100 + "x"]),
    (r"(\w{1,10}\s?){0,50}", 4, ["ab " * 50, "abcdefghijk"], ["ab " * 51, "x" * 501, " ab"]),
])
def test_a_repetition_of_a_bounded_repetition_keeps_small_states(pattern, most, taken, refused):
    """`(.{0,50}){0,100}` is built as `.{0,5000}`, and a state holds a node of a bounded repetition's copy only where
    no earlier copy's same node is there (that one takes every text it does): a state stays a few nodes, not one for
    every split of the text so far between the repetitions. (The refused texts are not checked against Python's re,
    which backtracks through every split of them.)"""
    regex = compile_regex(pattern)
    state = regex.initial
    for byte in b"abcdefghij" * 4:
        state = regex.advance(state, byte)
        assert state is not None and len(state) <= most, len(state)
    for text in taken:
        assert regex.matches(text.encode()) and re.fullmatch(pattern, text), text
    for text in refused:
        assert not regex.matches(text.encode()), text


# ---- random regexes against Python's re --------------------------------------------------

ATOMS = ["a", "b", "é", "€", "😀", r"\n", r"\.", "-", " ", "[ab]", "[^a]", "[a-é]", "[€-😀]", r"[^\n]", r"[\d€]",
         r"[^\w]", ".", r"\d", r"\w", r"\s", r"\D", r"\W", r"\S", r"\x61", r"\u20ac", "[.-]"]


def random_regex(rng: random.Random, depth: int, names: list) -> tuple[str, str]:
    """(this module's regex, the same for Python's re: `$` as \\Z, `(?<n>` as `(?P<n>`)."""
    r = rng.random()
    if depth <= 0 or r < 0.3:
        if rng.random() < 0.06:
            return ("^", "^") if rng.random() < 0.5 else ("$", r"\Z")
        atom = rng.choice(ATOMS)
        return atom, atom
    if r < 0.5:
        parts = [random_regex(rng, depth - 1, names) for _ in range(rng.randint(2, 3))]
        return "".join(p for p, _ in parts), "".join(q for _, q in parts)
    if r < 0.65:
        parts = [random_regex(rng, depth - 1, names) for _ in range(rng.randint(2, 3))]
        return "(?:" + "|".join(p for p, _ in parts) + ")", "(?:" + "|".join(q for _, q in parts) + ")"
    if r < 0.88:
        mine, python = random_regex(rng, depth - 1, names)
        low = rng.randint(0, 2)
        quantifier = rng.choice(["*", "+", "?", f"{{{low}}}", f"{{{low},}}", f"{{{low},{low + rng.randint(0, 2)}}}"])
        quantifier += "?" if rng.random() < 0.2 else ""
        return f"(?:{mine}){quantifier}", f"(?:{python}){quantifier}"
    mine, python = random_regex(rng, depth - 1, names)
    names.append(f"g{len(names)}")
    kind = rng.randrange(3)
    if kind == 0:
        return f"({mine})", f"({python})"
    return (f"(?P<{names[-1]}>{mine})" if kind == 1 else f"(?<{names[-1]}>{mine})"), f"(?P<{names[-1]}>{python})"


def random_walk(regex, rng: random.Random, limit: int = 30) -> bytes | None:
    """Bytes of a random walk from the initial state, stopped at an accepting state (None: the limit came first);
    every state on the way has a live next byte or accepts."""
    state, data = regex.initial, b""
    for _ in range(limit):
        if regex.accepting(state) and rng.random() < 0.3:
            return data
        start, stride = rng.randrange(256), rng.randrange(1, 256, 2)  # a random order of the bytes
        order = [(start + stride * i) % 256 for i in range(256)]
        byte = next((b for b in order if regex.advance(state, b) is not None), None)
        if byte is None:
            assert regex.accepting(state), f"a dead end after {data!r}"
            return data
        state, data = regex.advance(state, byte), data + bytes((byte,))
    return data if regex.accepting(state) else None


@pytest.mark.parametrize("search", [False, True])
def test_random_regexes_agree_with_python_re(search):
    rng = random.Random(1234 + search)
    checked = accepted = 0
    for case in range(250):
        mine, python = random_regex(rng, 4, [])
        excluded = rng.choice(["", "", "a", "é\n", '"\\' + "".join(map(chr, range(0x20)))])
        try:
            regex = compile_regex(mine, search=search, excluded=excluded)
        except RegexError as e:
            assert "no text matches it" in str(e), (mine, e)
            continue
        oracle = re.compile(python, re.ASCII)
        find = oracle.search if search else oracle.fullmatch

        def expected(text):
            return find(text) is not None and not any(c in excluded for c in text)

        texts = ["".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(0, 6))) for _ in range(60)]
        for _ in range(8):
            data = random_walk(regex, rng)
            if data is not None:
                text = data.decode()  # well-formed UTF-8
                assert expected(text), (mine, python, excluded, text)
                texts += [text, text[:-1], text + rng.choice(TEXT_ALPHABET)]
        for text in texts:
            data = text.encode()
            want = expected(text)
            assert regex.matches(data) == want, (mine, python, search, excluded, text)
            if want:
                assert None not in states(regex, data), (mine, text)
            checked += 1
            accepted += want
    assert checked > 10000 and accepted > 1000


# ---- guided decoding: masks, the engine and the chat API ---------------------------------

@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    folder, _ = tiny_chat_folder(tmp_path_factory.mktemp("regex") / "model")
    return InternVLChat.from_pretrained(folder, dtype=torch.float32)


def test_masks_equal_the_token_by_token_oracle(tiny_chat):
    """The tiny tokenizer's tokens plus hand-made ones (split characters, an empty one, a special one), on every
    state that some accepted texts pass through."""
    extra = [b"\xe7", b"\x8c", b"\x8c\xab", b"\xf0\x9f", b"\x98\x80", b"\xed\xa0", b"", None, b"12", b"a1"]
    cases = ((r"\d{1,3}(\.\d+)?", ["123.45", "7"]), ("(yes|no|猫😀)+", ["yesno猫😀", "no"]), ("[^a]*a", ["bbé猫a", "a"]),
             ("", [""]))
    assert_automaton_masks(tiny_chat.tokenizer, extra, compile_regex, cases, "regex")


@pytest.mark.parametrize("few_words", [0, 256, 10**9])
def test_masks_of_random_regexes_equal_the_oracle(monkeypatch, few_words):
    """Masks (one token of each class of the regex's byte runs walked, all together, the last few as a trie) against
    the token-by-token oracle: random regexes, tokens cut from random texts (split characters, long ones, runs of one
    character), on the states of random walks; `few_words` moves where the walk turns to a trie."""
    monkeypatch.setattr(jm, "FEW_WORDS", few_words)
    monkeypatch.setattr(jm, "CACHED_CLASSES", 4)  # class tables evicted and built again
    rng = random.Random(77)
    text = "".join(rng.choice(TEXT_ALPHABET) for _ in range(4000)).encode()
    pieces = [text[i: i + rng.choice([1, 1, 2, 3, 4, 6, 9, 20])] for i in (rng.randrange(4000) for _ in range(1500))]
    pieces += [c.encode() * n for c in "a é😀" for n in (3, 8, 30, 64)] + [None, b""]
    vocabulary = jm.JsonVocabulary(pieces, len(pieces) + 2)
    checked = 0
    for case in range(40):
        mine, _ = random_regex(rng, 3, [])
        try:
            regex = compile_regex(mine, search=rng.random() < 0.3)
        except RegexError:
            continue
        seen = {regex.initial}
        for _ in range(3):
            data = random_walk(regex, rng) or b""
            seen.update(s for s in states(regex, data) if s is not None)
        for state in seen:
            expected = [bool(piece) and after(regex, state, piece) is not None for piece in pieces] + [False] * 2
            assert automaton_mask(vocabulary, regex, state).tolist() == expected, (mine, state)
            checked += 1
    assert checked > 100


SAMPLED = [dict(do_sample=False), *({"do_sample": True, "seed": seed} for seed in range(6)),
           {"do_sample": True, "seed": 3, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3, "temperature": 0.7}]


def test_guided_answers_match_the_regex_when_they_stop(tiny_chat):
    tokenizer = tiny_chat.tokenizer
    ids = tiny_chat.prepare("How many cats?").prompt_ids
    # so that some answers stop before the regex forces them to (or the length cuts them)
    end = {tokenizer.im_end_id: 4.0, **{i: 3.0 for i in range(len(tokenizer))
                                        if not tokenizer.is_special(i) and tokenizer.token_bytes(i).endswith(b".")}}
    for pattern in (r"\d{1,4}( cats?)?", r"[a-z]+( [a-z]+)*\.", "(?:yes|no), (?:é|😀)+"):
        requests = [Request(ids, SamplingParams(max_new_tokens=16, regex=pattern, logit_bias=end, **kw))
                    for kw in SAMPLED]
        stopped = 0
        for tokens, finish in engine_answers(tiny_chat, requests):
            data = b"".join(tokenizer.token_bytes(t) for t in (tokens[:-1] if finish == "stop" else tokens))
            if finish == "stop":
                assert tokens[-1] == tokenizer.im_end_id and re.fullmatch(pattern, data.decode()), data
                stopped += 1
            else:
                assert len(tokens) == 16 and None not in states(compile_regex(pattern), data)
        assert stopped >= 2, pattern


def test_choice_answers_are_one_of_the_choices(tiny_chat):
    tokenizer = tiny_chat.tokenizer
    ids = tiny_chat.prepare("Is it a cat?").prompt_ids
    choices = ("yes", "no", "yes, a cat", "猫 😀", "")
    requests = [Request(ids, SamplingParams(max_new_tokens=24, choice=choices, **kw)) for kw in SAMPLED]
    for tokens, finish in engine_answers(tiny_chat, requests):
        assert finish == "stop" and tokenizer.decode(tokens[:-1]) in choices


def test_an_unconstrained_row_gets_the_same_tokens_beside_a_guided_one(tiny_chat):
    ids = tiny_chat.prepare("Hello there").prompt_ids
    other = tiny_chat.prepare("Yes or no?").prompt_ids
    for plain in (SamplingParams(max_new_tokens=20, ignore_eos=True),
                  SamplingParams(max_new_tokens=20, ignore_eos=True, do_sample=True, seed=7)):
        alone = engine_answers(tiny_chat, [Request(ids, plain)])[0]
        for guided in (SamplingParams(max_new_tokens=30, regex="[a-z ]+"),
                       SamplingParams(max_new_tokens=30, choice=["yes", "no"], do_sample=True, seed=1)):
            both = engine_answers(tiny_chat, [Request(other, guided), Request(ids, plain)])
            assert both[1] == alone


def test_chat_stream_chat_and_batch_chat_take_regex_and_choice(tiny_chat):
    for kw, check in ((dict(regex=r" ?\d+ (cats|dogs)\n?"), lambda a: re.fullmatch(r" ?\d+ (cats|dogs)\n?", a)),
                      (dict(choice=["yes", "no", " maybe "]), lambda a: a in ("yes", "no", " maybe "))):
        answer = tiny_chat.chat("How many?", do_sample=False, max_new_tokens=12, **kw)
        assert check(answer), answer  # not stripped: the whole text is what the regex took
        assert "".join(tiny_chat.stream_chat("How many?", do_sample=False, max_new_tokens=12, **kw)) == answer
        for answer in tiny_chat.batch_chat(["One?", "Two?", "Three?"], seed=4, max_new_tokens=12, **kw):
            assert check(answer), answer
    assert tiny_chat.chat("How many?", do_sample=False, max_new_tokens=12, choice=[" maybe "]) == " maybe "


def test_guided_settings_that_cannot_work_are_refused(tiny_chat):
    with pytest.raises(SettingError, match="^give json_mode or regex, not both$"):
        SamplingParams(json_mode=True, regex="a")
    with pytest.raises(SettingError, match="^give json_schema or choice, not both$"):
        SamplingParams(json_schema={}, choice=["a"])
    with pytest.raises(SettingError, match="^give regex or choice, not both$"):
        SamplingParams(regex="a", choice=["a"])
    with pytest.raises(SettingError, match="^min_new_tokens does not go with choice: the answer may be complete"):
        SamplingParams(choice=["a"], min_new_tokens=2)
    with pytest.raises(InputError, match="^choice must hold at least one string"):
        SamplingParams(choice=[])
    with pytest.raises(InputError, match="^choice must be a list of strings, got .'a', 1.$"):
        SamplingParams(choice=["a", 1])
    with pytest.raises(InputError, match="^choice must be a list of strings, got 'ab'$"):
        SamplingParams(choice="ab")
    with pytest.raises(RegexError, match="^regex 'a.': the '.' at position 1 is never closed"):
        SamplingParams(regex="a(")
    with pytest.raises(RegexError, match="^a regex must be a string, got bytes"):
        SamplingParams(regex=b"a")
    with pytest.raises(SettingError, match="^choice: the regex is too large") as e:
        SamplingParams(choice=[f"w{i}" for i in range(20000)])
    assert str(e.value.named({"choice": "--choice"})).startswith("--choice: the regex is too large")
    assert SamplingParams(choice=["a", "b"]) == SamplingParams(choice=("a", "b"))
    # ignore_eos without stop_token_ids: refused by SamplingParams itself (was only when the engine took the request),
    # naming the settings so that the server and the command line can name them their own way
    with pytest.raises(SettingError, match=r"^ignore_eos with regex needs stop_token_ids: the answer ends with a stop "
                                           r"token once its text is accepted; give stop_token_ids \(ignore_eos drops"):
        SamplingParams(regex="a", ignore_eos=True)
    with pytest.raises(SettingError, match="^ignore_eos with choice needs stop_token_ids") as e:
        SamplingParams(choice=["a"], ignore_eos=True)
    assert str(e.value.named({"ignore_eos": "IE", "choice": "C"})).startswith("IE with C needs stop_token_ids")
    ids = tiny_chat.prepare("Hi").prompt_ids
    tiny_chat.engine.generate([Request(ids, SamplingParams(regex="a", ignore_eos=True, stop_token_ids=(5,)))])
    with pytest.raises(InputError, match="^regex ends the answer with a stop token once its text is accepted: give "
                                         r"stop_token_ids \(this Engine has no end-of-turn token ids\)$"):
        Engine(tiny_chat.model, tokenizer=tiny_chat.tokenizer).generate([Request(ids, SamplingParams(regex="a"))])
    with pytest.raises(InputError, match="^choice needs the tokens' bytes"):
        Engine(tiny_chat.model, (5,)).generate([Request(ids, SamplingParams(choice=["a"]))])
    with pytest.raises(InputError, match="^unknown generation settings: .'guided_regex'."):
        tiny_chat.chat("Hi", guided_regex="a")


def test_a_guided_answer_ended_by_an_ordinary_stop_token_leaves_its_text_out(tiny_chat):
    """With ignore_eos, a stop_token_ids token (an ordinary one, here "!") ends a guided answer once the regex accepts;
    chat() put its text after the regex's ("12!", which the regex does not take), where the server leaves it out."""
    stop = tiny_chat.tokenizer.encode("!")
    assert len(stop) == 1 and stop[0] not in tiny_chat.engine.stop_token_ids
    kw = dict(max_new_tokens=12, ignore_eos=True, stop_token_ids=stop)
    for guided, check in ((dict(regex=r"\d{2}"), lambda a: re.fullmatch(r"\d{2}", a)),
                          (dict(choice=["yes", "no"]), lambda a: a in ("yes", "no"))):
        answer = tiny_chat.chat("How many?", do_sample=False, **guided, **kw)
        assert check(answer), answer
        assert "".join(tiny_chat.stream_chat("How many?", do_sample=False, **guided, **kw)) == answer
        for answer in tiny_chat.batch_chat(["One?", "Two?"], seed=4, **guided, **kw):
            assert check(answer), answer


def test_byte_runs_stand_for_their_bytes():
    """From any state reached, every byte of one of `byte_runs()`'s runs leads where the run's first byte does (JSON
    schema mode reads one byte per run when it works out a pattern's lengths)."""
    for pattern in (r"[a-f]x|[d-z]+", r"\d{2}[^\n]é?", r"(?:ab|[^a])*", r"[\u00e0-\u00ff]+"):
        regex = compile_regex(pattern)
        runs = regex.byte_runs() + [256]
        seen, todo = {regex.initial}, [regex.initial]
        while todo:
            state = todo.pop()
            for first, end in zip(runs, runs[1:]):
                after = regex.advance(state, first)
                assert all(regex.advance(state, byte) == after for byte in range(first, end)), (pattern, first)
                if after is not None and after not in seen:
                    seen.add(after)
                    todo.append(after)


def test_where_only_an_ordinary_stop_id_can_write_what_comes_next_it_alone_ends_the_answer():
    """choice ["a"] with the id of `a` among the stop ids: no token but that one can write the answer, so it ends
    there unfinished, by that id (the server's stop_reason names it, as vLLM, which takes it as a stop wherever it
    is sampled, reports it), not by the end of turn, which would look like an answer the constraint ended; once
    complete, every stop id ends it; a vocabulary that cannot go on at all ends it by any stop id."""
    vocabulary = jm.JsonVocabulary([b"a", b"b", b"ab"], 5)  # 3: the end of turn, 4: another special token
    constraint = automaton.AutomatonConstraint(vocabulary, compile_regex(choice_pattern(["a"])))
    assert constraint.allowed([3, 0]).tolist() == [True, False, False, False, False]
    constraint.advance(0)
    assert constraint.allowed([3, 0]).tolist() == [True, False, False, True, False]
    stuck = automaton.AutomatonConstraint(vocabulary, compile_regex("c"))
    assert stuck.allowed([3, 4]).tolist() == [False, False, False, True, True]
