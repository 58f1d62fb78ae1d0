"""Constrained decoding (json mode, JSON schema, regex, choice, grammar) with the SentencePiece vocabulary of the
InternLM2-based checkpoints (InternVL2.5-2B, -8B, -26B), end to end on tiny random-weight checkpoints written here.

The masks read each token's bytes (`JsonVocabulary.of_tokenizer`, `SentencePieceTokenizer.token_bytes`: "▁" is a
space, `<0xNN>` one byte); these tests hold the answer's text (chat, batch_chat, the streamed pieces) to those
bytes. InternLM2's tokenizer.model has no dummy prefix; a SentencePiece model with one (SentencePiece's default)
drops the leading space of a decoded text, which an answer, the continuation of its prompt, keeps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import re

import pytest
import torch

from internvl_mpo.chat.tokenizer import load_tokenizer
from internvl_mpo.errors import InputError
from internvl_mpo.generate.json_mode import JsonVocabulary
from internvl_mpo.pipeline import InternVLChat, TextAssembler

from conftest import write_checkpoint
from test_internlm2 import hf_llama_reference, hf_llama_to_official, internlm2_config
from test_internlm2_tokenizer import CHAT_TOKENS, INTERNLM2_LIKE, spm, train, write_folder  # needs sentencepiece

CHOICES = ["circle", "square", "café", "日本"]  # "é", "日", "本" are spelled in byte pieces
SAMPLED = dict(do_sample=True, temperature=1.0, seed=0)
SHAPE = {"type": "object", "properties": {"shape": {"enum": CHOICES}, "sides": {"type": "integer", "minimum": 0,
                                                                               "maximum": 9}},
         "required": ["shape", "sides"], "additionalProperties": False}


def write_chat(folder, **options) -> tuple[InternVLChat, object]:
    """A tiny InternLM2 checkpoint (random weights) whose tokenizer.model is trained with `options`: "▁" pieces,
    byte pieces, the chat tokens; its InternVLChat and the SentencePieceProcessor of that model."""
    _, sp = write_folder(folder, train(**options))
    base = internlm2_config()
    config = base.replace(llm=dataclasses.replace(base.llm, vocab_size=len(load_tokenizer(folder))))
    write_checkpoint(folder, config, hf_llama_to_official(hf_llama_reference(config).state_dict(), config))
    return InternVLChat.from_pretrained(folder, dtype=torch.float32), sp


@pytest.fixture(scope="module")
def internlm2(tmp_path_factory):
    return write_chat(tmp_path_factory.mktemp("internlm2"), **INTERNLM2_LIKE)


@pytest.fixture(scope="module")
def dummy_prefix(tmp_path_factory):
    """SentencePiece's defaults: a dummy prefix and whitespace folding."""
    return write_chat(tmp_path_factory.mktemp("dummy_prefix"), byte_fallback=True)


def streamed(chat: InternVLChat, **kwargs) -> str:
    return "".join(chat.stream_chat("hello", **kwargs))


def test_the_vocabulary_bytes_are_the_text_of_the_answer(internlm2, dummy_prefix):
    """Any tokens' bytes, joined, are the answer's text; with InternLM2's settings also SentencePiece's decoding."""
    rng = random.Random(0)
    for chat, sp in (internlm2, dummy_prefix):
        tokenizer = chat.tokenizer
        vocabulary = JsonVocabulary.of_tokenizer(tokenizer, chat.config.llm.vocab_size)
        assert vocabulary.pieces[sp.piece_to_id("<0xC3>")] == b"\xc3"
        assert vocabulary.pieces[sp.piece_to_id("▁the")] == b" the"
        assert all(vocabulary.pieces[i] is None for i in (tokenizer.im_end_id, tokenizer.token_to_id("<|im_start|>"),
                                                          tokenizer.img_context_id, sp.bos_id(), sp.eos_id()))
        ordinary = [i for i, piece in enumerate(vocabulary.pieces) if piece]
        for _ in range(200):
            ids = [rng.choice(ordinary) for _ in range(rng.randint(1, 8))]
            texts = TextAssembler(tokenizer)
            text = "".join(texts.feed(i)[0] for i in ids) + texts.feed(None, last=True)[0]
            assert text == b"".join(vocabulary.pieces[i] for i in ids).decode("utf-8", "sentencepiece"), ids
            if chat is internlm2[0]:
                assert text == sp.decode(ids), ids


def test_a_dummy_prefix_space_stays_in_the_answer_as_the_constraint_read_it(dummy_prefix):
    """The first token "▁the" is " the" to the masks; the answer dropped that space ("the", as decoding a text
    alone does), so a regex or grammar that took " the" gave a text it does not take."""
    chat, sp = dummy_prefix
    the = sp.piece_to_id("▁the")
    forced = dict(max_new_tokens=8, do_sample=False, logit_bias={the: 100})
    assert chat.tokenizer.decode([the]) == "the"
    assert TextAssembler(chat.tokenizer).feed(the) == (" the", False)  # the server's text too
    for constraint in (dict(regex=r"\sthe"), dict(grammar='root ::= " the" | "no"'), dict(choice=[" the", "no"])):
        assert chat.chat("hello", **forced, **constraint) == " the", constraint
        assert streamed(chat, **forced, **constraint) == " the", constraint
        assert chat.batch_chat(["hello", "hi"], **forced, **constraint) == [" the", " the"], constraint
    assert chat.chat("hello", **forced, choice=["the", "no"]) in ("the", "no")  # " the" is no choice here


@pytest.mark.parametrize("which", ["internlm2", "dummy_prefix"])
def test_choice_answers_are_one_of_the_choices(which, request):
    chat, _ = request.getfixturevalue(which)
    answers = chat.batch_chat(["hello"] * 8, max_new_tokens=16, **SAMPLED, choice=CHOICES)
    assert set(answers) <= set(CHOICES) and len(set(answers)) > 1, answers
    for text in ("café", "日本"):  # byte pieces only ("日本") or a piece then byte pieces
        assert chat.chat("hello", max_new_tokens=16, **SAMPLED, choice=[text]) == text
    assert streamed(chat, max_new_tokens=16, **SAMPLED, choice=CHOICES) == chat.chat(
        "hello", max_new_tokens=16, **SAMPLED, choice=CHOICES)


@pytest.mark.parametrize("which", ["internlm2", "dummy_prefix"])
def test_regex_and_grammar_answers_are_taken_whole(which, request):
    chat, _ = request.getfixturevalue(which)
    regex = r"\s?[a-zé]{2,6}( [0-9]{1,3})?"
    grammar = 'root ::= item ("," item)?\nitem ::= "circle" | "日本" | " the" | [0-9]'
    sentence = r"(circle|日本| the|[0-9])(,(circle|日本| the|[0-9]))?"
    for constraint, pattern in ((dict(regex=regex), regex), (dict(grammar=grammar), sentence)):
        answers = chat.batch_chat(["hello"] * 6, max_new_tokens=32, **SAMPLED, **constraint)
        assert all(re.fullmatch(pattern, a) for a in answers) and len(set(answers)) > 1, answers
        assert streamed(chat, max_new_tokens=32, **SAMPLED, **constraint) == answers[0]


@pytest.mark.parametrize("which", ["internlm2", "dummy_prefix"])
def test_json_answers_parse_and_validate(which, request):
    chat, sp = request.getfixturevalue(which)
    answers = chat.batch_chat(["hello"] * 4, max_new_tokens=200, **SAMPLED, json_schema=SHAPE)
    values = [json.loads(a) for a in answers]
    assert all(set(v) == {"shape", "sides"} and v["shape"] in CHOICES and v["sides"] in range(10) for v in values)
    assert len({v["shape"] for v in values}) > 1, answers
    assert streamed(chat, max_new_tokens=200, **SAMPLED, json_schema=SHAPE) == answers[0]
    # random weights ramble on: a nudge to '"' (a byte piece here) and to "}" closes the keys and the object
    bias = {sp.piece_to_id("<0x22>"): 2.0, sp.piece_to_id("}"): 2.0}
    answers = chat.batch_chat(["hello"] * 6, max_new_tokens=120, **SAMPLED, json_mode=True, logit_bias=bias)
    values = [json.loads(a) for a in answers]
    assert all(isinstance(v, dict) for v in values) and any(values), answers
    assert streamed(chat, max_new_tokens=120, **SAMPLED, json_mode=True, logit_bias=bias) == answers[0]


def test_a_vocabulary_without_byte_pieces_is_refused(tmp_path):
    """Without byte_fallback, text of characters no piece holds cannot be spelled: choice=["日本"] ended the answer
    at once, with "" (no choice). Constrained decoding is refused, naming the tokenizer; other answers go on."""
    chat, _ = write_chat(tmp_path, **{**INTERNLM2_LIKE, "byte_fallback": False})
    for constraint in (dict(choice=["日本"]), dict(json_mode=True), dict(regex="x")):
        with pytest.raises(InputError, match=f"needs a token for every byte of UTF-8 text, and the tokenizer from "
                                             f"{re.escape(str(tmp_path))} has none for .* needs byte_fallback"):
            chat.chat("hello", max_new_tokens=4, **constraint)
    assert isinstance(chat.chat("hello", max_new_tokens=4), str)


@pytest.mark.parametrize("options", [dict(byte_fallback=True), dict(INTERNLM2_LIKE, remove_extra_whitespaces=True),
                                     dict(INTERNLM2_LIKE, add_dummy_prefix=True)])
def test_a_text_decoded_alone_drops_its_leading_space_as_sentencepiece_does(tmp_path, options):
    """`decode` (and the stream decoder) of ids that begin a text: SentencePiece drops the "▁" of the first piece
    with a dummy prefix, that of each piece while nothing is out with whitespace folding (there was none dropped
    without a dummy prefix), never a byte piece's (<0x20> lost its space); an answer keeps them all."""
    folder, sp = write_folder(tmp_path, train(**options))
    tokenizer = load_tokenizer(folder)
    pieces = [i for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))
              and tokenizer.token_bytes(i) and not tokenizer.is_special(i)]
    spaced = [i for i in pieces if sp.id_to_piece(i).startswith("▁")] + [sp.piece_to_id("<0x20>")]
    rng = random.Random(0)
    for _ in range(1000):
        ids = [rng.choice(spaced if rng.random() < 0.6 else pieces) for _ in range(rng.randint(1, 5))]
        stream, texts = tokenizer.stream_decoder(), TextAssembler(tokenizer)
        assert tokenizer.decode(ids) == sp.decode(ids), [sp.id_to_piece(i) for i in ids]
        assert "".join(stream.feed(i) for i in ids) + stream.flush() == sp.decode(ids)
        answer = "".join(texts.feed(i)[0] for i in ids) + texts.feed(None, last=True)[0]
        assert answer == b"".join(map(tokenizer.token_bytes, ids)).decode("utf-8", "sentencepiece")


def test_a_control_piece_the_config_does_not_name_has_no_text(tmp_path):
    """SentencePiece decodes a control piece as nothing; it read as its name ("<ctl>"), which a constraint could
    write as text. It has no bytes now: never in a mask, nothing in the text."""
    corpus = [" ".join(random.Random(i).choice(["the", "dog", "a", "x"]) for _ in range(6)) for i in range(500)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=out, model_type="bpe", vocab_size=300,
                                   hard_vocab_limit=False, user_defined_symbols=CHAT_TOKENS, control_symbols=["<ctl>"],
                                   minloglevel=2, **INTERNLM2_LIKE)
    folder, sp = write_folder(tmp_path, out.getvalue())
    tokenizer, control = load_tokenizer(folder), sp.piece_to_id("<ctl>")
    ids = [sp.piece_to_id("▁the"), control, sp.piece_to_id("▁dog")]
    assert tokenizer.decode(ids) == sp.decode(ids) == " the dog" and tokenizer.token_bytes(control) == b""
    assert not JsonVocabulary.of_tokenizer(tokenizer, len(tokenizer)).pieces[control]
    assert tokenizer.encode("a<ctl>b") == sp.encode("a<ctl>b")  # typed, it is text
