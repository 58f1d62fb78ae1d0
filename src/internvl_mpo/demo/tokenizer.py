"""A small Qwen2-style byte-level BPE for the demo model, trained with `tokenizers`.

The merges are learned from the demo language (questions and step-by-step answers from
`synth.tokenizer_corpus`), the internvl2_5 system message (Chinese, so the system turn is a
handful of tokens instead of ~150 bytes), the chat role words, MMPR's chain-of-thought instruction
the short-answer instruction of `internvl-mpo eval` and a few plain English lines; any other text still encodes, byte by byte. The folder is written in
the file layout of an InternVL2.5 checkpoint, which `chat.tokenizer.load_tokenizer` reads:

- vocab.json: the 256 byte symbols in GPT-2 `bytes_to_unicode` order, then one entry per merge;
- merges.txt: "#version: 0.2", then one "left right" pair per line;
- added tokens after the base vocabulary, in the official order: `<|endoftext|>`, `<|im_start|>`,
  `<|im_end|>`, `<tool_call>`, `</tool_call>` (not special, as in Qwen2.5), then the InternVL tokens
  `<img>`, `</img>`, `<IMG_CONTEXT>`, `<quad>`, `</quad>`, `<ref>`, `</ref>`, `<box>`, `</box>`;
- tokenizer_config.json (`added_tokens_decoder` with each token's flags, eos `<|im_end|>`, pad
  `<|endoftext|>`, no bos, `Qwen2Tokenizer`), added_tokens.json, special_tokens_map.json;
- tokenizer.json: the same pipeline serialized by `tokenizers`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from internvl_mpo.answers import COT_INSTRUCTION
from internvl_mpo.chat.template import get_template
from internvl_mpo.evaluate import SHORT_INSTRUCTION
from internvl_mpo.chat.tokenizer import QWEN2_SPLIT_PATTERN, Tokenizer, build_qwen2_backend, load_tokenizer

# (content, special) in id order after the base vocabulary, as in the InternVL2.5 checkpoints.
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

FIXED_TEXTS: tuple[str, ...] = (
    "system\nuser\nassistant\n",
    COT_INSTRUCTION.format(question=""),
    SHORT_INSTRUCTION,
    "Describe this image. What is in the picture? Please answer the question briefly.",
    "Hello! I am a tiny demo model. I answer questions about shapes and colors.",
    "Image-1: <image>\nImage-2: <image>\nFrame1: <image>\n",
    "0 1 2 3 4 5 6 7 8 9 10",
)
# Texts repeated so that their words become single tokens even though they are rare in the corpus.
FIXED_REPEAT = 20


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def train_merges(corpus: Iterable[str], vocab_size: int) -> list[tuple[str, str]]:
    """BPE merges learned with the Qwen2 pre-tokenizer (split regex, then byte level)."""
    trainer_tok = Backend(BPE())
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
    merges = json.loads(trainer_tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def _token_entry(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_qwen2_folder(folder: Path, merges: list[tuple[str, str]]) -> None:
    """Write the Qwen2 / InternVL2.5 tokenizer files for a base vocabulary built from `merges`."""
    vocab: dict[str, int] = {}
    for char in bytes_to_unicode().values():
        vocab[char] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges), encoding="utf-8"
    )

    added = {content: len(vocab) + i for i, (content, _) in enumerate(ADDED_TOKENS)}
    _write_json(folder / "added_tokens.json", added)
    additional = [content for content, special in ADDED_TOKENS if special and content != "<|endoftext|>"]
    eos, pad = _token_entry("<|im_end|>", True), _token_entry("<|endoftext|>", True)
    del eos["special"], pad["special"]
    _write_json(folder / "special_tokens_map.json",
                {"additional_special_tokens": additional, "eos_token": eos, "pad_token": pad})
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(added[c]): _token_entry(c, special) for c, special in ADDED_TOKENS},
        "additional_special_tokens": additional,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })

    backend = build_qwen2_backend(vocab, merges)
    for content, special in ADDED_TOKENS:
        backend.add_tokens([AddedToken(content, special=special, normalized=False)])
    backend.save(str(folder / "tokenizer.json"))


def write_demo_tokenizer(folder: str | Path, corpus: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """Train the demo BPE on `corpus` plus the fixed texts, write it to `folder`, return it loaded.

    `vocab_size` counts the base vocabulary (bytes + merges); the 14 added tokens come on top.
    """
    system = get_template("internvl2_5").system_message
    fixed = [system, *FIXED_TEXTS] * FIXED_REPEAT
    merges = train_merges([*fixed, *corpus], vocab_size)
    write_qwen2_folder(Path(folder), merges)
    return load_tokenizer(folder)
