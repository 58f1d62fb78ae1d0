"""Token-id parity of chat/tokenizer.py with transformers' Qwen2Tokenizer on a tiny trained BPE."""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest
from tokenizer_fixture import ADDED_TOKENS, SYSTEM_MESSAGE, bytes_to_unicode, write_qwen2_tokenizer

from internvl_mpo.chat.tokenizer import load_tokenizer
from internvl_mpo.errors import CheckpointError, InputError

transformers = pytest.importorskip("transformers")

EXPANDED_PROMPT = (
    f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n"
    + "<img>"
    + "<IMG_CONTEXT>" * 512
    + "</img>\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n"
)

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "don't DON'T I'm we'll they've she'd it's",
    SYSTEM_MESSAGE,
    "请详细描述这张图片。今天天气很好。",
    "日本語のテキスト、한국어, Русский, العربية",
    "😀🐼👍🏽👨‍👩‍👧🇨🇳🦩🦜 and ✨ sparkles",  # 🦩 🦜 are not in the training corpus
    "Café naïve e\u0301 cafe\u0301 A\u030a",  # NFD input, NFC-normalized before BPE
    "def f(x):\n    return x ** 2  # square\n\n\n\tindented\r\nwindows\r\n",
    "spaces:     five  two \n  \n\n   trailing   ",
    "Numbers 0 12 345 6789 3.14159 1,234,567 2024-12-31 1e-6 ½ ²",
    "<|endoftext|><|im_start|><|im_end|><img></img><IMG_CONTEXT><quad></quad><ref></ref><box></box>",
    "text<|im_start|>user\nhi<|im_end|>\n  <|im_end|>  <img> </img>",
    '<tool_call>{"name": "f"}</tool_call> non-special added tokens',
    "<ref>the cat</ref><box>[[12, 34, 567, 890]]</box>",
    "partial <|im_end <IMG_CONTEXT <image> <im_start|> not tokens",
    "Image-1: <image>\nImage-2: <image>\nFrame1: <image>\n",
    EXPANDED_PROMPT,
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_vocab")
    write_qwen2_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory, vocab_dir):
    """The same tokenizer saved by transformers as tokenizer.json (no vocab.json / merges.txt)."""
    folder = tmp_path_factory.mktemp("qwen2_json")
    transformers.AutoTokenizer.from_pretrained(vocab_dir).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink(missing_ok=True)
    assert (folder / "tokenizer.json").is_file()
    return folder


@pytest.fixture(scope="module", params=["vocab_merges", "tokenizer_json"])
def pair(request, vocab_dir, json_dir):
    folder = vocab_dir if request.param == "vocab_merges" else json_dir
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert type(hf).__name__ == "Qwen2Tokenizer"
    return load_tokenizer(folder), hf


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(pair, text):
    ours, hf = pair
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ids == hf(text)["input_ids"]  # no BOS or EOS is added by default either


def test_special_tokens_are_single_ids(pair):
    ours, hf = pair
    for content, _ in ADDED_TOKENS:
        assert ours.encode(content) == [hf.convert_tokens_to_ids(content)]
        assert ours.token_to_id(content) == hf.convert_tokens_to_ids(content)


def test_sizes_and_named_ids(pair):
    ours, hf = pair
    assert len(ours) == len(hf)
    assert ours.token_to_id("<|im_start|>") == hf.convert_tokens_to_ids("<|im_start|>")
    assert ours.im_end_id == hf.convert_tokens_to_ids("<|im_end|>") == hf.eos_token_id
    assert ours.pad_id == hf.pad_token_id == hf.convert_tokens_to_ids("<|endoftext|>")
    assert ours.img_context_id == hf.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ours.img_start_id == hf.convert_tokens_to_ids("<img>")
    assert ours.img_end_id == hf.convert_tokens_to_ids("</img>")
    # The tiny vocabulary puts them far from the real checkpoint's ids: nothing can be hard-coded.
    assert ours.img_context_id != 151667 and ours.im_end_id != 151645


def test_split_special_tokens_true_is_refused_naming_the_file(tmp_path):
    """transformers spells "<|im_end|>" as text under split_special_tokens: true; the key was ignored here (the same
    files gave other ids), and the chat prompts need the special tokens whole."""
    write_qwen2_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": False}))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.encode("a <|im_end|> b").count(tokenizer.token_to_id("<|im_end|>")) == 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "split_special_tokens": True}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: split_special_tokens is true, which spells"):
        load_tokenizer(tmp_path)


def test_token_to_id_names_missing_token(vocab_dir):
    ours = load_tokenizer(vocab_dir)
    with pytest.raises(CheckpointError, match="not_a_token"):
        ours.token_to_id("<not_a_token>")


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(pair, text):
    ours, hf = pair
    ids = ours.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)


def _stream(tokenizer, ids, skip):
    decoder = tokenizer.stream_decoder(skip_special_tokens=skip)
    pieces = [decoder.feed(i) for i in ids]
    return pieces, decoder.flush()


@pytest.mark.parametrize("skip", [True, False])
def test_stream_decoder_never_yields_broken_characters(vocab_dir, skip):
    ours = load_tokenizer(vocab_dir)
    text = "<|im_start|>assistant\n🦩 熊猫🐼吃竹子🦜 é<|im_end|>\n中文<tool_call>x</tool_call>👨‍👩‍👧"
    ids = ours.encode(text)
    # The test is only meaningful if some tokens end inside a character.
    assert any(ours.decode([i]).endswith("\ufffd") for i in ids)
    pieces, tail = _stream(ours, ids, skip)
    assert "" in pieces  # something was held back
    assert all("\ufffd" not in piece for piece in pieces)
    assert tail == ""
    assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)
    # Feeding several ids at once gives the same text.
    decoder = ours.stream_decoder(skip_special_tokens=skip)
    assert decoder.feed(ids[:7]) + decoder.feed(ids[7:]) + decoder.flush() == ours.decode(ids, skip)


def test_stream_decoder_takes_one_id_of_any_integer_type(vocab_dir):
    """A hand-written decoding loop feeds `logits.argmax(-1)[0]` (a 0-d tensor) or a NumPy integer."""
    import numpy as np
    import torch

    ours = load_tokenizer(vocab_dir)
    ids = ours.encode("熊猫 é")
    for convert in (int, np.int64, torch.tensor):
        decoder = ours.stream_decoder()
        assert "".join(decoder.feed(convert(i)) for i in ids) + decoder.flush() == ours.decode(ids)
    with pytest.raises(TypeError):
        ours.stream_decoder().feed(1.5)
    # a tensor's items are 0-d tensors, which hash by identity: the special tokens among them were not skipped
    with_end = ours.encode("熊猫<|im_end|>")
    for ids in (torch.tensor(with_end), list(torch.tensor(with_end))):
        decoder = ours.stream_decoder()
        assert decoder.feed(ids) + decoder.flush() == "熊猫"


@pytest.mark.parametrize("name, content, problem", [
    ("merges.txt", b"#version: 0.2\n\xff\xfe a\n", r"cannot read tokenizer file .*merges.txt"),
    ("merges.txt", b"#version: 0.2\nzzzq qqqz\n", r"cannot build the tokenizer from .*vocab.json and .*merges.txt"),
    ("vocab.json", b'{"a": "0"}', r"vocab.json: token 'a' has id '0'; ids are integers >= 0"),
    ("vocab.json", b'{"a": -1}', r"vocab.json: token 'a' has id -1"),
])
def test_malformed_vocab_or_merges_named(tmp_path, vocab_dir, name, content, problem):
    folder = tmp_path / "tok"
    shutil.copytree(vocab_dir, folder)
    (folder / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=problem):
        load_tokenizer(folder)


def test_stream_decoder_invalid_bytes_match_decode(vocab_dir):
    ours = load_tokenizer(vocab_dir)
    byte_id = {b: ours.token_to_id(ch) for b, ch in bytes_to_unicode().items()}
    sequences = [
        [byte_id[0xE4], byte_id[0x41]],  # truncated 3-byte character, then "A"
        [byte_id[0x80], byte_id[0xE4], byte_id[0xB8]],  # stray continuation byte; unfinished at the end
        [byte_id[0xE4], ours.im_end_id, byte_id[0xB8], byte_id[0xAD]],  # a skipped special in the middle
        [byte_id[0xE4], ours.token_to_id("<tool_call>"), byte_id[0xB8]],
        [byte_id[0x41], len(ours) + 5, byte_id[0x42]],  # an id past the vocabulary (the model's rows go further)
    ]
    for ids in sequences:
        for skip in (True, False):
            pieces, tail = _stream(ours, ids, skip)
            assert "".join(pieces) + tail == ours.decode(ids, skip_special_tokens=skip)


def test_lone_surrogate_is_refused_by_name(pair):
    """A text with a lone surrogate (a broken \\ud83d escape in a JSON dataset) cannot be tokenized;
    transformers fails with a bare TypeError, ours names the character and where it is."""
    ours, hf = pair
    text = "caption: a dog \ud83d and a cat"
    with pytest.raises(TypeError):
        hf.encode(text, add_special_tokens=False)
    with pytest.raises(InputError, match=r"lone surrogate '\\ud83d' at character 15, .*'caption: a dog "):
        ours.encode(text)


def test_legacy_added_tokens_json(tmp_path, vocab_dir):
    """Without added_tokens_decoder, added tokens come from added_tokens.json + special_tokens_map.json."""
    folder = tmp_path / "legacy"
    shutil.copytree(vocab_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"], config["additional_special_tokens"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert len(ours) == len(hf)
    for text in TEXTS[12:16] + ["x <tool_call> y"]:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_legacy_special_tokens_map_names_the_special_tokens_over_the_config(tmp_path, vocab_dir):
    """In a folder without added_tokens_decoder, transformers reads special_tokens_map.json over the config's
    pad token (the config's was taken)."""
    folder = tmp_path / "legacy"
    shutil.copytree(vocab_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    config.update(eos_token="<|endoftext|>", pad_token="<|im_end|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    special_map = json.loads((folder / "special_tokens_map.json").read_text())
    special_map.update(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    ours, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.pad_id == hf.pad_token_id == ours.token_to_id("<|endoftext|>")


def test_named_special_tokens_the_config_omits_take_qwen2tokenizers_defaults(tmp_path, vocab_dir):
    """Without eos/pad/unk keys, Qwen2Tokenizer's constructor defaults name `<|endoftext|>` for all three."""
    folder = tmp_path / "no_named"
    shutil.copytree(vocab_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("eos_token", "pad_token", "unk_token"):
        del config[key]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.pad_id == hf.pad_token_id == ours.token_to_id("<|endoftext|>")
    config.update(eos_token=None, pad_token=None)  # set to null: transformers has none; ours falls back as documented
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder).pad_id == ours.pad_id


def test_add_prefix_space_in_the_config_follows_transformers(tmp_path, vocab_dir):
    folder = tmp_path / "prefix"
    shutil.copytree(vocab_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["add_prefix_space"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS[1:4] + TEXTS[13:14]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False) != load_tokenizer(vocab_dir).encode(text)


def test_added_token_flags_follow_transformers(tmp_path, vocab_dir):
    """lstrip/rstrip/single_word/normalized flags act as in transformers (which resets them on named
    special tokens and keeps them on the others)."""
    folder = tmp_path / "flags"
    shutil.copytree(vocab_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    flags = {
        "<box>": {"lstrip": True, "rstrip": True},
        "<ref>": {"single_word": True},
        "<tool_call>": {"lstrip": True},
        "</tool_call>": {"rstrip": True, "normalized": True},
    }
    for entry in config["added_tokens_decoder"].values():
        entry.update(flags.get(entry["content"], {}))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    texts = ["a  <box> b </box> c", "x  <tool_call>  y  </tool_call>  z", "a <ref> b", "a<ref>b", "q <img> r"]
    for text in texts:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False)
    assert ours.is_plain_added_token("<img>") and not ours.is_plain_added_token("<tool_call>")


def test_missing_files_raise(tmp_path, vocab_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="merges.txt"):
        load_tokenizer(tmp_path / "empty")
    folder = tmp_path / "gap"
    shutil.copytree(vocab_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    last = max(decoder, key=int)
    decoder[str(int(last) + 5)] = decoder.pop(last)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="declared as id"):
        load_tokenizer(folder)


@pytest.mark.parametrize("entry, problem", [
    ({"x1": {"content": "<q>", "special": True}}, r"added_tokens_decoder\['x1'\]: the key must be a token id"),
    ({"409": {"content": 123, "special": True}}, r"added_tokens_decoder\[409\]: content must be a non-empty string"),
    ({"409": {"special": True}}, r"added_tokens_decoder\[409\] has no content"),
])
def test_a_malformed_added_tokens_decoder_entry_is_named(tmp_path, entry, problem):
    """A key that is no id raised ValueError from int(), a content that is no string a TypeError from tokenizers."""
    write_qwen2_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"].update(entry)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: " + problem):
        load_tokenizer(tmp_path)
