"""JSON mode: the byte-level recognizer, the vocabulary masks against a token-by-token oracle, and constrained
generation through the engine, the chat API and the server's request parsing."""

from __future__ import annotations

import json
import math
import random
import re

import numpy
import pytest
import torch

from internvl_mpo.errors import InputError, SettingError
from internvl_mpo.generate import json_mode as jm
from internvl_mpo.generate.engine import Engine, Request
from internvl_mpo.generate.params import SamplingParams
from internvl_mpo.pipeline import InternVLChat
from internvl_mpo.server.requests import ApiError, parse_chat_request, parse_completion_request
from internvl_mpo.server.settings import ServerSettings

from conftest import engine_answers, tiny_chat_folder


def state_of(data: bytes):
    return jm.advance_bytes(jm.INITIAL, data)


def complete(data: bytes) -> bool:
    state = state_of(data)
    return state is not None and state[0] == jm.DONE


VALID = [
    b"{}", b' \n{"a": 1}', b'{"a":[1,-0.5e+3,0,-0,0.25,1E5,2e-7,1.5E+10,true,false,null,"x",[],{}],"b":{"c":{}}}',
    b'{"esc":"\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9 \\uD83D\\uDE00 \\u12aF"}',
    b'{"pairs":"\\ud7ff \\uE000 \\ud800\\udc00 \\uDBFF\\uDFFF","\\ud83d\\ude00":"\\udbc0\\uDc00"}',
    '{"猫":"😀 Café \u07ff \uffff \U0010ffff", "k": "\x7f"}'.encode(),
    json.dumps({"a": [1, {"b": [None, True, "x"]}], "c": {}}, indent=4).encode(),
    json.dumps({"a": [1, {"b": "y"}]}, indent="\t").encode(),
]
INVALID = [
    b"[]", b'"a"', b"1", b"true", b'{"a":01}', b'{"a":-01}', b'{"a":1.}', b'{"a":.5}', b'{"a":+1}', b'{"a":1e}',
    b'{"a":1e+}', b'{"a":-}', b'{"a":0x1}', b"{a:1}", b"{'a':1}", b'{"a":1,}', b"{,}", b'{"a" 1}', b'{"a":tru}',
    b'{"a":True}', b'{"a":NaN}', b'{"a":Infinity}', b'{"a":"\x01"}', b'{"a":"\n"}', b'{"a":"\\x"}',
    b'{"a":"\\u12g4"}', b'{"a":"\\u12"}', b'{"a":1}}', b'{"a":1} ', b'{"a":1}x', b'{"a":1]', b'{"a":[1}',
    b'{1:2}', b'{"a":"\xc0\x80"}', b'{"a":"\xc1\xbf"}', b'{"a":"\xe0\x80\x80"}', b'{"a":"\xed\xa0\x80"}',
    b'{"a":"\xf4\x90\x80\x80"}', b'{"a":"\xf5\x80\x80\x80"}', b'{"a":"\x80"}', b'{"a":"\xe4\xb8"}', b'{"a":"\xff"}',
    # lone surrogates (json.loads takes them; I-JSON, Pydantic and serde_json do not)
    b'{"a":"\\ud800"}', b'{"a":"\\udc00"}', b'{"a":"\\uDFFF"}', b'{"a":"\\ud83dx"}', b'{"a":"\\ud83d\\u0041"}',
    b'{"a":"\\ud83d\\ud83d\\ude00"}', b'{"a":"\\ud83d\\ude00\\ude00"}', b'{"\\ud83d":1}', b'{"a":"\\ud83d\\n"}',
    b'{"a":"\\ud83d\\ud83d"}',  # a high surrogate where the low one must come
]


@pytest.mark.parametrize("text", VALID)
def test_every_prefix_of_a_json_object_is_taken_and_the_whole_completes_it(text):
    assert json.loads(text) is not None
    state = jm.INITIAL
    for i, byte in enumerate(text):
        assert state[0] != jm.DONE
        state = jm.advance(state, byte)
        assert state is not None, text[: i + 1]
    assert state[0] == jm.DONE


@pytest.mark.parametrize("text", INVALID)
def test_what_is_not_a_json_object_is_refused_at_its_first_wrong_byte(text):
    assert state_of(text) is None


def test_numbers_follow_the_rfc_grammar_exactly():
    for number in [b"0", b"-0", b"-0.5e+3", b"12", b"1.25", b"1e5", b"1E-5", b"0.0e0", b"-12.5E+07"]:
        assert complete(b'{"n":' + number + b"}"), number
        assert complete(b'{"n":[' + number + b" ,1]}"), number
    for number in [b"01", b"-", b"--1", b"1.", b".1", b"1e", b"1e+", b"+1", b"1.e5", b"00", b"-.5", b"1ee5"]:
        assert not complete(b'{"n":' + number + b"}"), number


def test_utf8_split_across_tokens_is_tracked_and_finished():
    cat = "猫".encode()  # three bytes
    state = state_of(b'{"a":"' + cat[:1])
    assert state is not None and state[0] == jm.STRING and state[1] & 7
    assert jm.advance(state, 0x22) is None  # the character is unfinished: no closing quote yet
    state = jm.advance_bytes(state, cat[1:2])
    assert jm.advance(state, ord("a")) is None
    assert jm.advance_bytes(state, cat[2:] + b'"}')[0] == jm.DONE
    vocabulary = jm.JsonVocabulary([b'{"a":"' + cat[:1], cat[1:], b'"}', b"\xe7"], 5)
    constraint = jm.JsonConstraint(vocabulary)
    for token in (0, 1, 2):
        assert constraint.allowed([4])[token]
        constraint.advance(token)
    assert constraint.complete and constraint.allowed([4]).tolist() == [False, False, False, False, True]
    with pytest.raises(ValueError, match="does not continue the JSON object"):
        constraint.advance(3)


def test_depth_and_whitespace_are_bounded():
    deep = b'{"a":' + b"[" * (jm.MAX_DEPTH - 1)
    assert complete(deep + b"]" * (jm.MAX_DEPTH - 1) + b"}")
    assert state_of(deep + b"[") is None and state_of(deep + b"{") is None
    inside = jm.whitespace_limit(1)  # a line break and one level of indentation
    assert complete(b"{" + b" " * inside + b"}")
    assert state_of(b"{" + b" " * (inside + 1)) is None
    assert complete(b"\r\n" + b'{"a"' + b"\t" * inside + b":1}")
    assert state_of(b"\r\n " + b"{") is None  # 2 bytes before the object, a line break
    assert state_of(b'{"a":[' + b" " * (jm.whitespace_limit(2) + 1)) is None
    # pretty-printed JSON at every depth, to the deepest: a CR LF and 4 spaces a level
    nested: object = 1
    for _ in range(jm.MAX_DEPTH - 1):
        nested = [nested]
    text = json.dumps({"a": nested}, indent=4).replace("\n", "\r\n").encode()
    assert complete(text) and max(map(len, re.findall(rb"\s+", text))) == jm.whitespace_limit(jm.MAX_DEPTH)


def test_the_recognizer_agrees_with_json_loads_on_mutated_objects():
    """Single-byte changes of compact objects: taken as complete exactly where json.loads reads a dict (its NaN and
    Infinity aside, which RFC 8259 has not)."""
    rng = random.Random(0)

    def value(depth):
        kind = rng.randrange(7 if depth < 3 else 5)
        return [lambda: rng.choice([0, -3, 12.5, -0.25e-3, 1e21]), lambda: rng.choice([True, False, None]),
                lambda: "".join(rng.choice('ab"\\\n\t猫é😀 /') for _ in range(rng.randrange(4))),
                lambda: rng.randrange(-99, 99), lambda: "x",
                lambda: [value(depth + 1) for _ in range(rng.randrange(3))],
                lambda: {str(i): value(depth + 1) for i in range(rng.randrange(3))}][kind]()

    def loads_dict(data: bytes) -> bool:
        try:
            text = data.decode("utf-8")
            parsed = json.loads(text, parse_constant=lambda name: 1 / 0)
            json.dumps(parsed, ensure_ascii=False).encode("utf-8")  # a lone surrogate escape is refused
        except (ValueError, ZeroDivisionError):
            return False
        return isinstance(parsed, dict) and text == text.rstrip(" \t\n\r")

    alphabet = b'{}[]":,0123456789-+.eEtrufalsn \\\n\x01\x80\xc3\xa9\xff'
    checked = 0
    for _ in range(300):
        doc = json.dumps({"k": value(0), "v": value(0)}, ensure_ascii=rng.random() < 0.5).encode()
        assert complete(doc)
        for _ in range(10):
            at = rng.randrange(len(doc))
            changed = doc[:at] + bytes([rng.choice(alphabet)]) + doc[at + rng.randrange(2):]
            assert complete(changed) == loads_dict(changed), changed
            checked += complete(changed)
    assert checked > 100  # the changed objects include valid ones


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    folder, _ = tiny_chat_folder(tmp_path_factory.mktemp("json") / "model")
    return InternVLChat.from_pretrained(folder, dtype=torch.float32)


def oracle(pieces: list[bytes | None], state) -> numpy.ndarray:
    """The mask of `state` token by token: each token's bytes run through the recognizer."""
    return numpy.array([bool(piece) and jm.advance_bytes(state, piece) is not None for piece in pieces])


def test_masks_equal_the_token_by_token_oracle_on_every_state_of_some_objects(tiny_chat):
    """The tiny tokenizer's tokens plus hand-made ones (split characters, quotes and escapes inside tokens, long
    whitespace runs, an empty one, a special one), on every state that a few objects pass through."""
    tokenizer = tiny_chat.tokenizer
    base = [None if tokenizer.is_special(i) else tokenizer.token_bytes(i) for i in range(len(tokenizer))]
    extra = [b'"', b'":', b'",', b'"}', b'"}}', b'"]', b'\\', b'\\"', b'\\n', b'\\u00', b'e9"', b"\xe7", b"\x8c",
             b"\x8c\xab", b"\xab\"", b"\xf0\x9f", b"\x98\x80", b"\xed\xa0", b"\xed\x9f\xbf", b"\xe0\xa0\x80",
             b" " * 100, b"\n" + b" " * 40, b"\t", b"", None, b"true", b"ru", b"e}", b"-0.", b"5e", b"+3", b"01",
             b"{\"", b"[[", b"]]", b"}]", b",\n", b":[", b"\x7f", b"\x1f"]
    pieces = base + extra
    vocabulary = jm.JsonVocabulary(pieces, len(pieces) + 3)
    texts = VALID + [b'{"a":"' + "猫".encode()[:2], b'{"x":"\\u00', b'{"x":"\\', b'{"n":-0.', b'{"n":1e+',
                     b'{"b":fa', b'{"a":[[[' + b" " * 14, b"{" + b" " * (jm.whitespace_limit(1) - 3)]
    states = {jm.INITIAL}
    for text in texts:
        state = jm.INITIAL
        for byte in text:
            state = jm.advance(state, byte)
            states.add(state)
    assert len(states) > 150
    padding = numpy.zeros(3, dtype=bool)
    for state in states:
        expected = numpy.concatenate([oracle(pieces, state), padding])
        assert (vocabulary.mask(state) == expected).all(), state
        assert (vocabulary.mask(state) == expected).all(), state  # cached
    done = jm.JsonConstraint(vocabulary)
    done.state = state_of(b"{}")
    assert numpy.flatnonzero(done.allowed([5, len(pieces) + 1])).tolist() == [5, len(pieces) + 1]
    started = jm.JsonConstraint(vocabulary)
    assert not started.allowed([pieces.index(b"{\"")])[pieces.index(b"{\"")]  # a stop id only ends the object


def walked(advance, state, piece: bytes) -> bool:
    """Whether `advance` takes every byte of `piece` from `state`."""
    for byte in piece:
        state = advance(state, byte)
        if state is None:
            return False
    return True


@pytest.mark.parametrize("few_words", [0, 256, 10**9])
def test_walk_tokens_and_masks_equal_the_oracle_for_any_advance(monkeypatch, few_words):
    """The generic all-tokens walk (the one regex and grammar masks use), with JSON mode's advance and with a
    counting one whose states differ per prefix, and JSON mode's masks (strings, escapes and numbers walk all their
    tokens together), on random tokens (duplicates, prefixes of one another); `few_words` moves where the walk turns
    to a trie."""
    monkeypatch.setattr(jm, "FEW_WORDS", few_words)
    rng = random.Random(2)
    pieces = [bytes(rng.choice(b'{}[]",: 01a.e-\\u\xc3\xa9') for _ in range(rng.randint(0, 7))) for _ in range(3000)]
    pieces += [None, b"", pieces[5], pieces[5] + b"a"]
    vocabulary = jm.JsonVocabulary(pieces, len(pieces) + 2)

    def counting(state, byte):  # at most 9 bytes, no two quotes in a row
        return None if state[0] >= 9 or byte == state[1] == 0x22 else (state[0] + 1, byte)

    for advance, state in [(jm.advance, s) for s in (jm.INITIAL, state_of(b'{"a": '), state_of(b'{"a":"'))] + \
            [(counting, (0, 0)), (counting, (6, 0x22))]:
        expected = [bool(piece) and walked(advance, state, piece) for piece in pieces]
        assert jm.walk_tokens(vocabulary, advance, state).tolist() == expected + [False, False], state
    text = b'{"a\\u00e9": [-0.5e+3, "\xc3\xa9\\n", {}], "b": 10'
    for state in {jm.advance_bytes(jm.INITIAL, text[:n]) for n in range(len(text) + 1)}:
        assert vocabulary.mask(state).tolist() == oracle(pieces, state).tolist() + [False, False], state


def closing_bias(tokenizer, strength: float) -> dict[int, float]:
    """A logit bias towards the tokens that close an object and the end of turn, so that the tiny random model
    finishes some objects within a few dozen tokens."""
    closing = [i for i in range(len(tokenizer)) if not tokenizer.is_special(i) and b"}" in tokenizer.token_bytes(i)]
    return {**dict.fromkeys(closing, strength), tokenizer.im_end_id: strength}


def test_constrained_answers_are_json_objects_when_they_stop_and_valid_prefixes_when_cut(tiny_chat):
    tokenizer = tiny_chat.tokenizer
    ids = tiny_chat.prepare("Describe the picture as JSON.").prompt_ids
    settings = [dict(do_sample=False), *({"do_sample": True, "seed": seed} for seed in range(8)),
                *({"do_sample": True, "seed": seed, "logit_bias": closing_bias(tokenizer, 3.0)} for seed in range(8)),
                {"do_sample": True, "seed": 3, "top_k": 5, "top_p": 0.9, "repetition_penalty": 1.3, "temperature": 0.7}]
    requests = [Request(ids, SamplingParams(max_new_tokens=48, json_mode=True, **kw)) for kw in settings]
    stopped = 0
    for tokens, finish in engine_answers(tiny_chat, requests):
        assert finish in ("stop", "length")
        if finish == "stop":
            assert tokens[-1] == tokenizer.im_end_id
            assert isinstance(json.loads(tokenizer.decode(tokens[:-1])), dict)
            stopped += 1
        else:
            assert len(tokens) == 48
            assert state_of(b"".join(tokenizer.token_bytes(t) for t in tokens)) is not None
    assert stopped >= 3
    unconstrained = engine_answers(tiny_chat, [Request(ids, SamplingParams(max_new_tokens=48, do_sample=True, seed=s))
                                         for s in range(8)])
    assert not any(complete(b"".join(map(tokenizer.token_bytes, tokens))) for tokens, _ in unconstrained)


def test_an_unconstrained_row_gets_the_same_tokens_beside_a_constrained_one(tiny_chat):
    ids = tiny_chat.prepare("Hello there").prompt_ids
    other = tiny_chat.prepare("Answer in JSON: what is it?").prompt_ids
    for plain in (SamplingParams(max_new_tokens=20, ignore_eos=True),
                  SamplingParams(max_new_tokens=20, ignore_eos=True, do_sample=True, seed=7)):
        alone = engine_answers(tiny_chat, [Request(ids, plain)])[0]
        for json_params in (SamplingParams(max_new_tokens=30, json_mode=True),
                            SamplingParams(max_new_tokens=30, json_mode=True, do_sample=True, seed=1)):
            both = engine_answers(tiny_chat, [Request(other, json_params), Request(ids, plain)])
            assert both[1] == alone
            tokens, finish = both[0]
            text = b"".join(map(tiny_chat.tokenizer.token_bytes, tokens[:-1] if finish == "stop" else tokens))
            assert complete(text) if finish == "stop" else state_of(text) is not None


def test_log_probabilities_of_a_constrained_row_are_those_of_its_masked_logits(tiny_chat):
    """As vLLM reports them: the mask applies to the logits the log-probabilities come from. The first token can
    only open the object or be whitespace before it (a few tokens of the tiny vocabulary): their probabilities add
    up to 1, and every other token has -inf."""
    ids = tiny_chat.prepare("JSON please").prompt_ids
    allowed = set(numpy.flatnonzero(tiny_chat.engine.json_vocabulary().mask(jm.INITIAL)).tolist())
    assert 1 < len(allowed) < 20
    for params in (SamplingParams(max_new_tokens=2, json_mode=True),
                   SamplingParams(max_new_tokens=2, json_mode=True, do_sample=True, seed=0, temperature=0.5)):
        first = next(iter(tiny_chat.engine.generate([Request(ids, params, logprobs=20)])))[0]
        finite = {token: value for token, value in first.top_logprobs if value > -math.inf}
        assert set(finite) == allowed and first.token in allowed
        assert math.isclose(sum(math.exp(v) for v in finite.values()), 1.0, rel_tol=1e-5)
        assert first.logprob == finite[first.token]


def test_chat_stream_chat_and_batch_chat_take_json_mode(tiny_chat):
    bias = closing_bias(tiny_chat.tokenizer, 6.0)
    answer = tiny_chat.chat("Give me JSON.", json_mode=True, do_sample=False, logit_bias=bias, max_new_tokens=40)
    assert isinstance(json.loads(answer), dict)
    assert "".join(tiny_chat.stream_chat("Give me JSON.", json_mode=True, do_sample=False, logit_bias=bias,
                                         max_new_tokens=40)) == answer
    for answer in tiny_chat.batch_chat(["One?", "Two?", "Three?"], json_mode=True, seed=4, logit_bias=bias,
                                       max_new_tokens=40):
        assert isinstance(json.loads(answer), dict)
    assert tiny_chat.chat("Give me JSON.", do_sample=False, max_new_tokens=5) != answer  # not JSON mode by default


def test_json_mode_settings_that_cannot_work_are_refused(tiny_chat):
    with pytest.raises(SettingError, match="^min_new_tokens does not go with json_mode"):
        SamplingParams(json_mode=True, min_new_tokens=2)
    with pytest.raises(InputError, match="^json_mode must be True or False"):
        SamplingParams(json_mode="yes")
    ids = tiny_chat.prepare("Hi").prompt_ids
    with pytest.raises(InputError, match="give stop_token_ids .ignore_eos drops the end-of-turn token.$"):
        tiny_chat.engine.generate([Request(ids, SamplingParams(json_mode=True, ignore_eos=True))])
    tiny_chat.engine.generate([Request(ids, SamplingParams(json_mode=True, ignore_eos=True, stop_token_ids=(5,)))])
    with pytest.raises(InputError, match="^json_mode ends the answer with a stop token"):
        Engine(tiny_chat.model, tokenizer=tiny_chat.tokenizer).generate([Request(ids, SamplingParams(json_mode=True))])
    with pytest.raises(InputError, match="^json_mode needs the tokens' bytes"):
        Engine(tiny_chat.model, (5,)).generate([Request(ids, SamplingParams(json_mode=True))])


def test_a_json_mode_answer_is_not_cut_where_a_string_spells_the_end_of_turn(tiny_chat):
    """chat() cuts an answer where the model spells <|im_end|> in ordinary tokens, as the official chat() cuts
    its decoded text; in JSON mode that text is inside a string of the object, which stays whole."""
    pieces = ['{"a": "<|', "im_end", '|>"}']
    tokens = [t for piece in pieces for t in tiny_chat.tokenizer.encode(piece)]
    assert tiny_chat.tokenizer.im_end_id not in tokens

    def text(params):
        assembler = tiny_chat._texts(params)
        return "".join(assembler.feed(t, last=i == len(tokens) - 1)[0] for i, t in enumerate(tokens))

    assert text(SamplingParams(json_mode=True)) == '{"a": "<|im_end|>"}'
    assert text(SamplingParams()) == '{"a": "'


def test_the_server_takes_json_object_and_refuses_other_formats():
    settings = ServerSettings()
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for parse, body in ((parse_chat_request, chat), (parse_completion_request, {"prompt": "hi"})):
        assert parse({**body, "response_format": {"type": "json_object"}}, settings).params.json_mode
        assert not parse({**body, "response_format": {"type": "text"}}, settings).params.json_mode
        assert not parse(body, settings).params.json_mode
        for kind in ("structural_tag", "grammar"):
            with pytest.raises(ApiError, match=f'^response_format type "{kind}" is not supported') as e:
                parse({**body, "response_format": {"type": kind, "json_schema": {"name": "x", "schema": {}}}}, settings)
            assert e.value.status == 400 and e.value.param == "response_format"
        with pytest.raises(ApiError, match="^response_format must be") as e:
            parse({**body, "response_format": {"type": "json_object", "schema": {}}}, settings)
        with pytest.raises(ApiError, match="^min_tokens does not go with response_format json_object") as e:
            parse({**body, "response_format": {"type": "json_object"}, "min_tokens": 3}, settings)
        with pytest.raises(ApiError, match="^ignore_eos with response_format json_object needs stop_token_ids"):
            parse({**body, "response_format": {"type": "json_object"}, "ignore_eos": True}, settings)
        with pytest.raises(ApiError, match="^guided_grammar: grammar: line 1, column 10: the rule 'x' is used"):
            parse({**body, "guided_grammar": "root ::= x"}, settings)
        # vLLM's newer structured_outputs {"json_object": true} is JSON mode too
        params = parse({**body, "structured_outputs": {"json_object": True, "json": None}}, settings).params
        assert params.json_mode and params.json_schema is None
        for structured, message in (({"json_object": 1}, "^structured_outputs.json_object must be true or false"),
                                    ({"json_object": True, "json": {}}, "with both json and json_object"),
                                    ({"json_object": False}, "with no constraint")):
            with pytest.raises(ApiError, match=message):
                parse({**body, "structured_outputs": structured}, settings)
        with pytest.raises(ApiError, match="^min_tokens does not go with structured_outputs json_object"):
            parse({**body, "structured_outputs": {"json_object": True}, "min_tokens": 3}, settings)


def test_in_key_marks_the_bytes_of_object_keys_and_only_those():
    text = b'{"k\\u00e9\\"y": "v\\u00e9\\"", "n": [{"x": 1}]}'
    keys = [b'"k\\u00e9\\"y', b'"n', b'"x']  # each key from its opening quote to before its closing one
    expected = {text.index(key) + i for key in keys for i in range(len(key))}
    state, inside = jm.INITIAL, set()
    for i, byte in enumerate(text):
        state = jm.advance(state, byte)
        if jm.in_key(state):
            inside.add(i)
    assert state is not None and inside == expected


def test_a_number_holds_at_most_max_number_digits_digits_in_a_row_and_masks_count_them():
    """A number of more than 4300 digits was taken as complete, and json.loads refuses it (Python's int limit); each
    run of digits (integer part, fraction, exponent) holds at most MAX_NUMBER_DIGITS now, and a state's mask, cached
    with the run set to 0, leaves out the tokens whose leading digits would pass it."""
    most = jm.MAX_NUMBER_DIGITS
    for text in (b"1" * most, b"-" + b"9" * most, b"0." + b"5" * most, b"1e" + b"7" * most, b"1.5E-" + b"3" * most):
        assert complete(b'{"a":' + text + b"}")
        assert state_of(b'{"a":' + text + b"1") is None
    assert state_of(b'{"a":1' + b"0" * most) is None
    assert complete(b'{"a":' + b"1" * most + b"." + b"2" * most + b"e" + b"3" * most + b"}")  # each run its own
    vocabulary = jm.JsonVocabulary([bytes([b]) for b in range(256)] + [b"123", b"45]", b"6,"], 259)
    at = state_of(b'{"a":[' + b"1" * (most - 2))
    assert at[3] == most - 2 and jm.unspaced(at)[3] == 0
    mask = vocabulary.mask(at)
    assert mask[ord("1")] and mask[257] and mask[258] and not mask[256]  # "123" would pass the limit, "45]" not
    mask = vocabulary.mask(jm.advance_bytes(at, b"11"))
    assert not mask[ord("1")] and not mask[257] and mask[ord(".")] and mask[ord("]")]
    assert not vocabulary.mask(jm.advance_bytes(at, b"1"))[256]


def test_a_mask_evicted_by_another_thread_between_its_read_and_its_touch_is_still_given():
    """Threads share one model's mask caches: a key evicted by another thread after `get` found it made
    `move_to_end` raise KeyError in the middle of an answer."""
    from collections import OrderedDict

    class Evicting(OrderedDict):  # another thread evicts the key right after this one read it
        def get(self, key, default=None):
            found = super().get(key, default)
            self.pop(key, None)
            return found

    vocabulary = jm.JsonVocabulary([b"{", b"}", b"1"], 4)
    cache = Evicting()
    first = vocabulary.cached_mask(cache, 8, "k", None, lambda: numpy.array([True, False, True, False]))
    again = vocabulary.cached_mask(cache, 8, "k", None, lambda: numpy.array([False] * 4))
    assert first.tolist() == again.tolist() == [True, False, True, False]
