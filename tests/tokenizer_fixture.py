"""Write a tiny Qwen2-style tokenizer folder for tests (no network, a fraction of a second).

`write_qwen2_tokenizer(folder)` trains a byte-level BPE with the `tokenizers` library on a small
multilingual corpus and saves it in the file layout of an InternVL2.5 / Qwen2.5 checkpoint:

- vocab.json: the 256 byte symbols in GPT-2 `bytes_to_unicode` order (so id 0 is "!", as in Qwen),
  then one entry per merge, in merge order; no added tokens (Qwen keeps them out of vocab.json);
- merges.txt: "#version: 0.2" header, then one "left right" pair per line;
- tokenizer_config.json: `added_tokens_decoder` with the Qwen special tokens, two non-special added
  tokens (`<tool_call>`, `</tool_call>`, non-special in Qwen too) and the nine InternVL tokens, each
  with the flags the real file carries (lstrip/rstrip/normalized False); eos `<|im_end|>`, pad
  `<|endoftext|>`, no bos, `tokenizer_class` Qwen2Tokenizer;
- added_tokens.json and special_tokens_map.json as transformers writes them.

Token ids are the base vocabulary size plus the position in `ADDED_TOKENS`, so tests must look ids up
by string, as the library does. Other test modules (model, generation, server) reuse this to build
tiny checkpoints: `len(vocab) + len(ADDED_TOKENS)` is the embedding size to use.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

# The Qwen2 pre-tokenizer split pattern, as published in the Qwen2 tokenizer.
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

# (content, special) in id order after the base vocabulary, mirroring the order in the real checkpoint.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<img>", True),
    ("</img>", True),
    ("<IMG_CONTEXT>", True),
    ("<quad>", True),
    ("</quad>", True),
    ("<ref>", True),
    ("</ref>", True),
    ("<box>", True),
    ("</box>", True),
)

BASE_CORPUS: tuple[str, ...] = (
    SYSTEM_MESSAGE,
    "The quick brown fox jumps over the lazy dog. Don't panic; it's fine, we'll see. I'M SURE THEY'VE GONE.",
    "Describe this image in detail. What is the red panda doing? Please answer the question briefly.",
    "The image shows a cat sitting on a wooden table next to a cup of coffee and a laptop.",
    "Image-1: <image>\nImage-2: <image>\nWhat are the similarities and differences between these two images?",
    "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat is happening in this video?",
    "请详细描述这张图片。图片中有一只小猫坐在桌子上，旁边有一杯咖啡。这是一个多模态大语言模型。",
    "上海人工智能实验室与清华大学联合开发了书生·万象。你好，世界！今天天气很好。",
    "日本語のテキストです。これはテストです。東京は日本の首都です。",
    "한국어 텍스트입니다. 안녕하세요, 세계!",
    "Привет, мир! Это тестовый текст на русском языке.",
    "مرحبا بالعالم. هذا نص تجريبي.",
    "Café, naïve, façade, résumé, über, Ångström, smörgåsbord.",
    "Emoji: 😀 😃 😄 🐼 🐱 ❤️ 👍🏽 👨‍👩‍👧 🇨🇳 ✨ 🚀",
    'def main(args):\n    for i in range(10):\n        print(f"value {i}: {args[i]!r}")\n    return 0\n',
    '#include <stdio.h>\nint main(void) {\n\treturn printf("%d\\n", 42);\n}\n',
    "## Heading\n\n- item one\n- item two\n\n```python\nx = [1, 2, 3]\n```\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2024-12-31 12:30:45 $1,234.56 50% 1e-6",
    "Spaces:    four   three  two and\ttabs\t\there.\n\n\nThree newlines above.\r\nWindows line.",
    "A. yes\nB. no\nC. maybe\nD. all of the above\nAnswer with the option's letter from the given choices directly.",
    "<ref>the cat</ref><box>[[12, 34, 567, 890]]</box> <quad>quad</quad>",
    # Chat-role words, so that "<|im_start|>assistant\n" is three tokens as in Qwen.
    "system\nuser\nassistant\nsystem\nuser\nassistant\n",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _train_merges(corpus: Sequence[str], vocab_size: int) -> list[tuple[str, str]]:
    trainer_tok = Tokenizer(BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(list(corpus), trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def _added_token_entry(content: str, special: bool) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def write_qwen2_tokenizer(folder: str | Path, extra_corpus: Iterable[str] = (), vocab_size: int = 900) -> None:
    """Train a tiny byte-level BPE and write it to `folder` in the Qwen2 / InternVL2.5 file layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = list(BASE_CORPUS) + list(extra_corpus)
    merges = _train_merges(corpus, vocab_size)

    vocab: dict[str, int] = {}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))

    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for left, right in merges:
            f.write(f"{left} {right}\n")

    added = {content: len(vocab) + i for i, (content, _) in enumerate(ADDED_TOKENS)}
    with open(folder / "added_tokens.json", "w", encoding="utf-8") as f:
        json.dump(added, f, ensure_ascii=False, indent=2)

    additional = [content for content, special in ADDED_TOKENS if special and content != "<|endoftext|>"]
    special_map = {
        "additional_special_tokens": additional,
        "eos_token": _added_token_entry("<|im_end|>", True),
        "pad_token": _added_token_entry("<|endoftext|>", True),
    }
    for entry in (special_map["eos_token"], special_map["pad_token"]):
        del entry["special"]
    with open(folder / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump(special_map, f, ensure_ascii=False, indent=2)

    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(added[content]): _added_token_entry(content, special) for content, special in ADDED_TOKENS
        },
        "additional_special_tokens": additional,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 8192,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(folder / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
