"""The InternLM2 SentencePiece tokenizer against SentencePiece itself and transformers' Llama conversion.

A small BPE model is trained with `sentencepiece` at test time with InternLM2's settings (BPE, byte
fallback, no dummy prefix, no whitespace folding, identity normalisation); the references are
(1) the official slow path, `InternLM2Tokenizer`: split on the added tokens, then `sp.encode` each
piece, and (2) transformers' `LlamaTokenizer` built from the same file, as the `-hf` InternLM2 ports
are (prepend scheme "never").
"""

from __future__ import annotations

import io
import json
import random
import re

import pytest

from internvl_mpo.chat.internlm2_tokenizer import load_internlm2_tokenizer, read_sentencepiece_model
from internvl_mpo.errors import CheckpointError

spm = pytest.importorskip("sentencepiece")

CHAT_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
WORDS = ("the quick brown fox jumps over a lazy dog . def return import torch ( ) { } = + image token "
         "模型 图像 你好 世界 12345 678 describe picture what is in this").split()
TEXTS = [
    "Hello world, what is in this picture?",
    "    def f(x):\n        return x + 1\n\n\n",
    "  leading, trailing  and   runs\tof\twhitespace ",
    "模型图像 你好世界！ unseen 龘 and emoji 🚀🤖 and über",
    "12345678901234567890",
    "",
    " ",
    "<|im_start|>system\n你是书生·万象<|im_end|>\n<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
    "Describe the image 🚀<|im_end|>\n<|im_start|>assistant\n",
    "<s>x</s> <unk><ref>dog</ref><box>[[1, 2, 3, 4]]</box>",
]


def train(**options) -> bytes:
    random.seed(0)
    corpus = [" ".join(random.choice(WORDS) for _ in range(random.randint(3, 14))) for _ in range(2000)]
    corpus += ["    def f(x):\n        return x + 1", "\tindent\ttab", "a  b   c"] * 30
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, model_type="bpe", vocab_size=400, hard_vocab_limit=False,
        user_defined_symbols=CHAT_TOKENS, minloglevel=2, **options,
    )
    return out.getvalue()


INTERNLM2_LIKE = dict(byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
                      normalization_rule_name="identity", allow_whitespace_only_pieces=True)


def write_folder(folder, proto: bytes):
    """tokenizer.model + a tokenizer_config.json laid out like InternVL2.5-8B's."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    decoder = {str(sp.piece_to_id(t)): {"content": t, "special": True} for t in ["<unk>", "<s>", "</s>", *CHAT_TOKENS]}
    for i, token in enumerate(INTERNVL_TOKENS):
        decoder[str(sp.get_piece_size() + i)] = {"content": token, "lstrip": False, "normalized": False,
                                                 "rstrip": False, "single_word": False, "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "tokenizer_class": "InternLM2Tokenizer",
    }))
    return folder, sp


def slow_path_ids(sp, text: str, added: dict[str, int] | None = None) -> list[int]:
    """InternLM2Tokenizer without BOS: added tokens (longest first) split the text; the rest is sp.encode'd."""
    if added is None:
        added = {t: sp.piece_to_id(t) for t in ["<unk>", "<s>", "</s>", *CHAT_TOKENS]}
        added.update({t: sp.get_piece_size() + i for i, t in enumerate(INTERNVL_TOKENS)})
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids = []
    for chunk in re.split(pattern, text):
        if chunk in added:
            ids.append(added[chunk])
        elif chunk:
            ids += sp.encode(chunk)
    return ids


@pytest.fixture(scope="module")
def internlm2_like(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("tok"), train(**INTERNLM2_LIKE))


@pytest.mark.parametrize("options", [INTERNLM2_LIKE, dict(byte_fallback=False)])
def test_model_file_is_read_like_sentencepiece(tmp_path, options):
    proto = train(**options)
    (tmp_path / "tokenizer.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    model = read_sentencepiece_model(tmp_path / "tokenizer.model")
    assert len(model.pieces) == sp.get_piece_size()
    for i, (piece, score, kind) in enumerate(model.pieces):
        assert piece == sp.id_to_piece(i) and score == pytest.approx(sp.get_score(i))
        assert (kind == 2, kind == 3, kind == 6) == (sp.is_unknown(i), sp.is_control(i), sp.is_byte(i))
    assert (model.unk_id, model.bos_id, model.eos_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id())
    assert model.byte_fallback == options["byte_fallback"]
    assert model.add_dummy_prefix == options.get("add_dummy_prefix", True)
    assert bool(model.precompiled_charsmap) == ("normalization_rule_name" not in options)


def test_ids_equal_the_official_slow_path(internlm2_like):
    folder, sp = internlm2_like
    tokenizer = load_internlm2_tokenizer(folder)
    random.seed(1)
    texts = TEXTS + [" ".join(random.choice(WORDS + CHAT_TOKENS + INTERNVL_TOKENS) for _ in range(30))
                     for _ in range(50)]
    for text in texts:
        assert tokenizer.encode(text) == slow_path_ids(sp, text), text


def test_ids_equal_transformers_llama_conversion(internlm2_like):
    pytest.importorskip("google.protobuf")
    from transformers import LlamaTokenizer

    folder, _ = internlm2_like
    reference = LlamaTokenizer.from_pretrained(folder, legacy=False, add_bos_token=False, add_prefix_space=False)
    tokenizer = load_internlm2_tokenizer(folder)
    for text in TEXTS[:5]:
        assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False), text


def test_sentencepiece_normaliser_options(tmp_path):
    """Dummy prefix, whitespace folding and the nmt_nfkc charsmap, each as SentencePiece applies them."""
    proto = train(byte_fallback=True)
    folder, sp = write_folder(tmp_path, proto)
    tokenizer = load_internlm2_tokenizer(folder)
    for text in TEXTS[:5] + ["ＡＢＣ　全角 ﬁ ①"]:
        assert tokenizer.encode(text) == sp.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == sp.decode(sp.encode(text))


def test_special_ids_decode_and_streaming(internlm2_like):
    folder, sp = internlm2_like
    tokenizer = load_internlm2_tokenizer(folder)
    base = sp.get_piece_size()
    assert (tokenizer.img_start_id, tokenizer.img_end_id, tokenizer.img_context_id) == (base, base + 1, base + 2)
    assert tokenizer.im_end_id == sp.piece_to_id("<|im_end|>") and len(tokenizer) == base + 9
    assert tokenizer.bos_id == sp.bos_id() and tokenizer.add_bos_token
    text = "    def f(x):\n 模型 🚀 über龘"
    ids = tokenizer.encode("<|im_start|>" + text + "<|im_end|>")
    assert tokenizer.decode(ids) == sp.decode(sp.encode(text)) == text
    stream = tokenizer.stream_decoder()
    assert "".join(stream.feed(i) for i in ids) + stream.flush() == text


def test_add_bos_token_defaults_to_true_as_internlm2tokenizer(internlm2_like, tmp_path):
    """InternLM2Tokenizer's add_bos_token defaults to True: a config without the key still gets the BOS."""
    from internvl_mpo.chat.template import build_prompt_ids

    folder, sp = internlm2_like
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    for setting, expected in ((None, True), (False, False), (True, True)):
        config.pop("add_bos_token", None)
        if setting is not None:
            config["add_bos_token"] = setting
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        tokenizer = load_internlm2_tokenizer(tmp_path)
        assert tokenizer.add_bos_token is expected
        assert (build_prompt_ids(tokenizer, "hi")[0] == sp.bos_id()) is expected


def test_refusals(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05hello\xff\xff")
    with pytest.raises(CheckpointError, match="not a SentencePiece model file"):
        load_internlm2_tokenizer(tmp_path)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(WORDS * 20), model_writer=out, model_type="unigram",
                                   vocab_size=80, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(out.getvalue())
    with pytest.raises(CheckpointError, match="model type 1 is not BPE"):
        load_internlm2_tokenizer(tmp_path)
    folder, sp = write_folder(tmp_path / "gap", train(**INTERNLM2_LIKE))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(sp.get_piece_size() + 20)] = {"content": "<far>", "special": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'<far>' is declared as id"):
        load_internlm2_tokenizer(folder)
    config["added_tokens_decoder"] = {str(sp.piece_to_id("▁the")): {"content": "<far>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="uses for the piece '▁the'"):
        load_internlm2_tokenizer(folder)
    # a key that is no id, a content that is no string: ValueError / TypeError from the loader before
    for entry, problem in (({"x1": {"content": "<q>"}}, r"\['x1'\]: the key must be a token id"),
                           ({"409": {"content": 123}}, r"\[409\]: content must be a non-empty string")):
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "added_tokens_decoder": entry}))
        with pytest.raises(CheckpointError, match=r"tokenizer_config.json: added_tokens_decoder" + problem):
            load_internlm2_tokenizer(folder)
    config["added_tokens_decoder"] = {str(sp.piece_to_id("<0x41>")): {"content": "<far>", "special": True}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="uses for the piece '<0x41>'"):  # a byte piece: "A" would be lost
        load_internlm2_tokenizer(folder)


def test_training_and_pair_ids_start_with_one_masked_bos_as_the_official_preprocess(internlm2_like):
    from internvl_mpo.chat.template import IGNORE_INDEX, build_pair_ids, build_prompt_ids, build_training_ids

    folder, sp = internlm2_like
    tokenizer = load_internlm2_tokenizer(folder)
    system = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。")
    segments = ["<s>" + f"<|im_start|>system\n{system}<|im_end|>\n",  # official: bos_token + batches[0]
                "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nhello<|im_end|>\n",
                "<|im_start|>assistant\nhi<|im_end|>\n"]
    official = sum((slow_path_ids(sp, text) for text in segments), [])  # each segment's own BOS dropped
    messages = [{"role": "user", "content": "<image>\nhello"}, {"role": "assistant", "content": "hi"}]
    ids, labels = build_training_ids(tokenizer, messages, [1], num_image_token=2)
    assert ids == official and ids.count(sp.bos_id()) == 1 and labels[0] == IGNORE_INDEX
    pair = build_pair_ids(tokenizer, "hello", "hi", "no", [1], num_image_token=2)
    assert pair.prompt_ids + pair.chosen_ids == ids
    assert pair.prompt_ids == build_prompt_ids(tokenizer, "hello", (), [1], num_image_token=2)[: len(pair.prompt_ids)]


def test_chat_prompt_ids_and_length_count_the_bos_as_the_official_chat(internlm2_like):
    """`chat()` tokenizes its prompt with InternLM2Tokenizer's BOS; `prompt_length` (measured from tile counts
    before the images are tiled) counts it too."""
    from internvl_mpo.chat.template import build_prompt_ids, prompt_length

    folder, sp = internlm2_like
    tokenizer = load_internlm2_tokenizer(folder)
    system = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。")
    prompt = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<img>{'<IMG_CONTEXT>' * 6}</img>\nhello"
              "<|im_end|>\n<|im_start|>assistant\n")
    official = [sp.bos_id(), *slow_path_ids(sp, prompt)]
    assert build_prompt_ids(tokenizer, "hello", (), [3], num_image_token=2) == official
    assert prompt_length(tokenizer, "hello", (), [3], num_image_token=2) == len(official)


def test_whitespace_folding_touches_spaces_only(tmp_path):
    """remove_extra_whitespaces trims and folds ASCII spaces; newlines and tabs stay, as in SentencePiece."""
    options = {**INTERNLM2_LIKE, "remove_extra_whitespaces": True}
    folder, sp = write_folder(tmp_path, train(**options))
    tokenizer = load_internlm2_tokenizer(folder)
    for text in ["\nx\n", "\tindent", "a\n\nb", "  a   b  ", " \tx \n "]:
        assert tokenizer.encode(text) == sp.encode(text), repr(text)
    # a "▁" typed in the text: trimmed at the end with the spaces (the escaped text's trim), kept elsewhere; it was
    # kept at the end too ("a▁" gave ['a', '▁'] where SentencePiece gives ['a'])
    for text in ["a\u2581", "x\u2581<|im_start|>", "b  x\u2581\u2581", " \u2581 ", "\u2581a  x\n", "x\u2581 \n"]:
        assert tokenizer.encode(text) == slow_path_ids(sp, text), repr(text)


def test_user_defined_pieces_the_config_does_not_list_stay_whole(tmp_path):
    random.seed(0)
    corpus = [" ".join(random.choice(WORDS) for _ in range(8)) for _ in range(2000)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, model_type="bpe", vocab_size=400, hard_vocab_limit=False,
        user_defined_symbols=CHAT_TOKENS + ["<foo>", "\n\n"], minloglevel=2, **INTERNLM2_LIKE,
    )
    folder, sp = write_folder(tmp_path, out.getvalue())  # its config lists the chat tokens only
    tokenizer = load_internlm2_tokenizer(folder)
    for text in ["a<foo>b", "x\n\ny", "the <foo> dog"]:
        assert tokenizer.encode(text) == slow_path_ids(sp, text), repr(text)


def test_streaming_drops_the_dummy_prefix_as_decode_does(tmp_path):
    folder, _ = write_folder(tmp_path, train(byte_fallback=True))  # SentencePiece's default: add_dummy_prefix
    tokenizer = load_internlm2_tokenizer(folder)
    for text in TEXTS[:5]:
        ids = tokenizer.encode(text)
        stream = tokenizer.stream_decoder()
        assert "".join(stream.feed(i) for i in ids) + stream.flush() == tokenizer.decode(ids), repr(text)


def test_config_tokens_over_user_defined_pieces_take_their_ids(tmp_path):
    """InternLM2's tokenizer.model holds `[UNUSED_TOKEN_145]` / `[UNUSED_TOKEN_146]` ... where the checkpoint's
    tokenizer_config.json declares `<|im_end|>` / `<|im_start|>` ... at the same ids; the slow tokenizer maps
    both spellings to that id and decodes it as the declared token."""
    random.seed(0)
    corpus = [" ".join(random.choice(WORDS) for _ in range(8)) for _ in range(2000)]
    unused = [f"[UNUSED_TOKEN_{i}]" for i in range(140, 147)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=out, model_type="bpe", vocab_size=400, hard_vocab_limit=False,
        user_defined_symbols=unused, minloglevel=2, **INTERNLM2_LIKE,
    )
    folder, sp = write_folder(tmp_path, out.getvalue())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    decoder = {str(sp.piece_to_id(t)): {"content": t, "special": True} for t in ["<unk>", "<s>", "</s>"]}
    decoder.update({str(sp.piece_to_id(piece)): {"content": token, "special": True}
                    for piece, token in zip(unused[1:], CHAT_TOKENS)})
    decoder.update({str(sp.get_piece_size() + i): {"content": token, "special": True}
                    for i, token in enumerate(INTERNVL_TOKENS)})
    config["added_tokens_decoder"] = decoder
    config["additional_special_tokens"] = CHAT_TOKENS
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    added = {entry["content"]: int(key) for key, entry in decoder.items()}
    tokenizer = load_internlm2_tokenizer(folder)
    assert tokenizer.im_end_id == sp.piece_to_id("[UNUSED_TOKEN_145]") and len(tokenizer) == sp.get_piece_size() + 9
    texts = [TEXTS[7], "typed [UNUSED_TOKEN_145] and [UNUSED_TOKEN_140]x<|im_end|>[UNUSED_TOKEN_146]"]
    for text in texts:
        assert tokenizer.encode(text) == slow_path_ids(sp, text, added), text
    ids = tokenizer.encode(TEXTS[7])
    assert tokenizer.decode(ids, skip_special_tokens=False) == TEXTS[7]
    assert tokenizer.decode(ids) == sp.decode([i for i in ids if i not in added.values()])
    stream = tokenizer.stream_decoder()
    assert "".join(stream.feed(i) for i in ids) + stream.flush() == tokenizer.decode(ids)


def test_decode_of_any_pieces_equals_sentencepiece(internlm2_like):
    """Byte pieces that do not form valid UTF-8 (a generation cut inside a character, or noise) decode as
    SentencePiece does, one U+FFFD per bad byte; the streamed text is the same."""
    folder, sp = internlm2_like
    tokenizer = load_internlm2_tokenizer(folder)
    byte = {b: sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    pieces = [i for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i))
              and sp.id_to_piece(i) not in CHAT_TOKENS]
    rng = random.Random(0)
    sequences = [[byte[0x79], byte[0xC8], sp.piece_to_id("▁the")], [byte[0xE4], byte[0xB8], byte[0x41]],
                 [byte[0xF0], byte[0x9F], byte[0x98]], [byte[0xE4], byte[0xB8], byte[0xAD], byte[0x80]]]
    sequences += [[rng.choice(pieces) for _ in range(rng.randint(1, 12))] for _ in range(500)]
    for ids in sequences:
        stream = tokenizer.stream_decoder()
        assert tokenizer.decode(ids) == sp.decode(ids), ids
        assert "".join(stream.feed(i) for i in ids) + stream.flush() == sp.decode(ids), ids


def test_a_folder_without_tokenizer_model_names_it(tmp_path):
    """An InternLM2 folder whose tokenizer is a SentencePiece-style tokenizer.json (as transformers saves one)
    or that has no tokenizer file was refused naming the Qwen2 files only ('not a byte-level BPE tokenizer',
    'no vocab.json or merges.txt'); the error now names tokenizer.model, the file an InternLM2 model needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from internvl_mpo.chat.tokenizer import load_tokenizer

    backend = Tokenizer(models.BPE({"<unk>": 0, "▁a": 1, "▁": 2, "a": 3}, [("▁", "a")], byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=f"is not a byte-level BPE tokenizer \\(Qwen2 style\\), and {tmp_path}"
                                              r" has no tokenizer.model \(the SentencePiece file of the InternLM2"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"no vocab.json or merges.txt \(Qwen2 sizes\), nor tokenizer.model"):
        load_tokenizer(tmp_path)
