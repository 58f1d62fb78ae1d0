"""Qwen2 byte-level BPE tokenizer of InternVL2.5 checkpoints, on the `tokenizers` library only.

Mirrors transformers' `Qwen2Tokenizer` (the fast, `tokenizers`-backed class of transformers 5; the
same pipeline as the v4 `Qwen2Converter`): NFC normalizer; the Qwen2 split regex (isolated) followed
by a ByteLevel pre-tokenizer without prefix space or its own regex; a BPE model with no unk token,
no dropout and no unk fusing; a ByteLevel decoder. `load_tokenizer` reads `tokenizer.json` when the
folder has one, else builds that pipeline from `vocab.json` + `merges.txt` and adds the added tokens
from `tokenizer_config.json` (`added_tokens_decoder`, with each token's lstrip / rstrip /
normalized / single_word / special flags), or, for older folders without that key, from
`added_tokens.json` + `special_tokens_map.json` the way transformers' legacy path does. Then, as
Qwen2Tokenizer's constructor does, every named special token (eos, pad, unk, bos,
additional_special_tokens; unk/eos/pad default to `<|endoftext|>` when the config omits the key) is
added again as a special token with default flags: a missing one gets the next id, and
lstrip/rstrip/single_word flags the config sets on it are dropped (non-special added tokens keep
theirs).

Kept from the reference: no BOS is ever added; special tokens written in the text are recognised as
single ids (the official prompts rely on it); decoding skips special tokens but keeps non-special
added tokens such as `<tool_call>`; invalid UTF-8 decodes to U+FFFD. Not done: transformers'
`clean_up_tokenization_spaces` (Qwen2 checkpoints set it False). Special-token ids are looked up by
string; none is hard-coded.
"""

from __future__ import annotations

import codecs
import json
import operator
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from internvl_mpo.companions import broken_link
from internvl_mpo.errors import CheckpointError, InputError
from internvl_mpo.jsonl import json_problem, lone_surrogate

# The Qwen2 pre-tokenizer split pattern (transformers `tokenization_qwen2.PRETOKENIZE_REGEX`).
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"

# Keys of tokenizer_config.json / special_tokens_map.json that name one special token each.
_NAMED_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Qwen2Tokenizer's constructor defaults for keys the config does not mention.
_QWEN2_DEFAULTS = {"unk_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT}


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table that byte-level BPE tokens are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for byte in range(256):
        if byte not in printable:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


_BYTE_DECODER = _byte_decoder()


class Tokenizer:
    """A loaded tokenizer: text <-> ids, special-token ids, streaming decode."""

    add_bos_token = False  # Qwen2 prepends nothing; InternLM2's SentencePiece tokenizer prepends <s>
    utf8_errors = "replace"  # invalid UTF-8 in decoded bytes: one U+FFFD per bad sequence, as `tokenizers`

    def __init__(self, backend: Backend, pad_token: str | None, source: str):
        self.backend = backend
        self.source = source
        self._pad_token = pad_token or ENDOFTEXT
        self._added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self._special_ids = frozenset(i for i, tok in self._added.items() if tok.special)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it become their ids; no BOS."""
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # what `tokenizers` raises for a str that is not valid Unicode
            if isinstance(text, str):
                check_unicode(text, "the text")
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"token {token!r} is not in the tokenizer loaded from {self.source}")
        return token_id

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def is_plain_added_token(self, token: str) -> bool:
        """True if `token` is an added token matched on the raw text (before normalization) that strips
        no neighbouring whitespace and needs no word boundary: text on either side of it is then
        tokenized independently of it."""
        added = self._added.get(self.backend.token_to_id(token))
        return added is not None and not (added.lstrip or added.rstrip or added.single_word or added.normalized)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a single id stands for (an added token's text, or a byte-level piece)."""
        added = self._added.get(token_id)
        if added is not None:
            return added.content.encode("utf-8")
        piece = self.backend.id_to_token(token_id)
        if piece is None:  # ids past the vocabulary decode to nothing, as in `tokenizers`
            return b""
        return bytes(_BYTE_DECODER[char] for char in piece)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)

    @property
    def im_end_id(self) -> int:
        return self.token_to_id(IM_END)

    @property
    def pad_id(self) -> int:
        """The config's pad_token, else `<|endoftext|>`."""
        return self.token_to_id(self._pad_token)

    @property
    def img_context_id(self) -> int:
        return self.token_to_id(IMG_CONTEXT)

    @property
    def img_start_id(self) -> int:
        return self.token_to_id(IMG_START)

    @property
    def img_end_id(self) -> int:
        return self.token_to_id(IMG_END)


def check_unicode(text: str, what: str) -> None:
    """Refuse a `text` holding a lone surrogate (a \\ud800-\\udfff outside a pair: no Unicode character), naming
    `what` it is and where."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        at = err.start
        raise InputError(
            f"{what} holds a lone surrogate {text[at]!r} at character {at}, which is not valid Unicode"
            f" (a broken \\uXXXX escape?): {text[max(0, at - 30) : at + 30]!r}"
        ) from None


class StreamDecoder:
    """Turns ids fed one by one (or a few at a time) into text pieces for streaming.

    A byte-level token can end inside a multi-byte UTF-8 character; those bytes are held back until
    the character is complete, so no piece ends in a broken character. Joining every piece returned
    by `feed` plus `flush()` gives `tokenizer.decode(all_ids, skip_special_tokens)`.

    `strip_space`: drop the leading space of the text as a SentencePiece model that adds a dummy prefix or folds
    whitespace does when decoding (the tokenizer's `strip_leading_space`); False keeps it, for ids that continue a
    text (an answer after its prompt), whose text is then their tokens' bytes, as a constraint reads them.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=tokenizer.utf8_errors)
        self.strip_space = getattr(tokenizer, "strips_leading_space", False)

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add ids; return the text they complete ("" while a character is still incomplete)."""
        if not isinstance(ids, Iterable) or getattr(ids, "ndim", None) == 0:  # an int, a NumPy or 0-d torch integer
            ids = (ids,)
        parts = []
        for i in map(operator.index, ids):  # a tensor's 0-d items hash by identity: none would be a special id
            if self._skip_special and self._tokenizer.is_special(i):
                continue
            data = self._tokenizer.token_bytes(i)
            if self.strip_space:
                data, self.strip_space = self._tokenizer.strip_leading_space(i, data)
            parts.append(data)
        return self._utf8.decode(b"".join(parts))

    def flush(self) -> str:
        """Text of bytes still held back (an unfinished character decodes to U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def read_tokenizer_json(path: Path) -> dict:
    """A tokenizer JSON file (each holds one object); a missing or malformed one is a CheckpointError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        data = json.loads(text)
    except OSError as err:
        raise CheckpointError(f"cannot read tokenizer file {path}: {err}") from err
    except (ValueError, RecursionError) as err:  # not UTF-8, not JSON, nested too deeply, a 5000-digit integer
        raise CheckpointError(f"cannot read tokenizer file {path}: {json_problem(err)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"cannot read tokenizer file {path}: it holds a JSON {type(data).__name__}, not an object")
    if problem := lone_surrogate(text, data):  # a token's content that no text can hold: it failed deep inside later
        raise CheckpointError(f"cannot read tokenizer file {path}: {problem}")
    return data


def _token_text(value: object) -> str | None:
    """A special-token entry is a string, None, or an AddedToken dict with a "content" key."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot read tokenizer file {path}: {err}") from err
    merges = []
    for line_no, line in enumerate(lines):
        line = line.strip()
        if not line or (line_no == 0 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CheckpointError(f"{path} line {line_no + 1}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def build_qwen2_backend(
    vocab: dict[str, int], merges: list[tuple[str, str]], add_prefix_space: bool = False
) -> Backend:
    """The Qwen2 byte-level BPE pipeline over a base vocabulary (no added tokens yet)."""
    backend = Backend(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def _declared_added_tokens(folder: Path, config: dict, specials: set[str]) -> dict[int, AddedToken]:
    """id -> AddedToken from tokenizer_config.json, or the legacy added_tokens.json."""
    if "added_tokens_decoder" in config:
        return added_tokens_decoder(config, folder / "tokenizer_config.json")
    legacy = folder / "added_tokens.json"
    return {token_id: AddedToken(content, normalized=content not in specials, special=content in specials)
            for content, token_id in legacy_added_tokens(legacy).items()} if legacy.is_file() else {}


def added_tokens_decoder(config: dict, path: Path) -> dict[int, AddedToken]:
    """id -> AddedToken from a tokenizer_config.json's `added_tokens_decoder` (keys: ids as strings), checked."""
    declared: dict[int, AddedToken] = {}
    entries = config["added_tokens_decoder"]
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}: added_tokens_decoder must be an object of token ids, got "
                              f"{type(entries).__name__}")
    for key, entry in entries.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 18:  # int() refuses 4300 digits and more
            shown = repr(key) if len(key) <= 40 else f"{key[:20]!r}... ({len(key)} characters)"
            raise CheckpointError(f"{path}: added_tokens_decoder[{shown}]: the key must be a token id (digits, at most "
                                  "18)")
        if not isinstance(entry, dict) or "content" not in entry:
            raise CheckpointError(f"{path}: added_tokens_decoder[{key}] has no content")
        if not isinstance(entry["content"], str) or not entry["content"]:
            raise CheckpointError(f"{path}: added_tokens_decoder[{key}]: content must be a non-empty string, got "
                                  f"{json.dumps(entry['content'])[:60]}")
        names = ("single_word", "lstrip", "rstrip", "normalized", "special")
        declared[int(key)] = AddedToken(entry["content"], **{k: bool(entry[k]) for k in names if k in entry})
    return declared


def legacy_added_tokens(path: Path) -> dict[str, int]:
    """text -> id from an added_tokens.json, checked."""
    entries = read_tokenizer_json(path)
    for content, token_id in entries.items():
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise CheckpointError(f"{path}: {content!r} must map to a token id (a whole number >= 0), got "
                                  f"{json.dumps(token_id)[:60]}")
    return entries


def _add_tokens(backend: Backend, declared: dict[int, AddedToken], source: Path) -> None:
    for token_id, token in sorted(declared.items()):
        backend.add_tokens([token])
        got = backend.token_to_id(token.content)
        if got != token_id:
            raise CheckpointError(
                f"{source}: added token {token.content!r} is declared as id {token_id} but lands on id {got}"
                " (added-token ids must follow the base vocabulary without gaps)"
            )


def sentencepiece_folder(folder: Path) -> bool:
    """Whether `folder`'s tokenizer is the SentencePiece one of the InternLM2 sizes (tokenizer.model, no vocab.json)."""
    return (folder / "tokenizer.model").is_file() and not (folder / "vocab.json").is_file()


def adds_bos(folder: Path) -> bool:
    """Whether the tokenizer of `folder` starts each text it encodes with its BOS, as InternLM2's does unless its
    tokenizer_config.json sets add_bos_token false (the official chat() prompt starts with it then); Qwen2's
    adds none."""
    if not sentencepiece_folder(folder):
        return False
    path = folder / "tokenizer_config.json"
    return bool((read_tokenizer_json(path) if path.is_file() else {}).get("add_bos_token", True))


# The files load_tokenizer reads where the folder holds them (the InternLM2 loader too).
_READ_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "vocab.json", "merges.txt",
               "added_tokens.json", "tokenizer.model")


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Refuse a tokenizer whose ids run past a model's vocabulary of `vocab_size`: a text holding its last
    tokens would index past the embeddings, and a checkpoint saved with its files would not load."""
    n = len(tokenizer)
    if n > vocab_size:
        last = tokenizer.decode([n - 1], skip_special_tokens=False)
        raise CheckpointError(f"{tokenizer.source}: the tokenizer files hold {n} tokens (the last, {last!r}, is id "
                              f"{n - 1}), past the model's vocabulary (llm_config.vocab_size {vocab_size}): they are "
                              "another model's; use the tokenizer files of the checkpoint the weights come from")


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load the tokenizer files of a checkpoint folder (see the module docstring for the rules)."""
    folder = Path(folder)
    for name in _READ_FILES:  # each is read where it is a file: a link leading nowhere would read as none
        if why := broken_link(folder / name):
            raise CheckpointError(why)
    config_path = folder / "tokenizer_config.json"
    config = read_tokenizer_json(config_path) if config_path.is_file() else {}
    if config.get("split_special_tokens") is True:  # transformers would spell them as text; official files: false
        raise CheckpointError(f"{config_path}: split_special_tokens is true, which spells special tokens typed in "
                              "a text (<|im_end|>, <IMG_CONTEXT>, ...) as text, and the chat prompts need them as "
                              "tokens; set it to false, as the official checkpoints do")
    if sentencepiece_folder(folder):
        from .internlm2_tokenizer import load_internlm2_tokenizer  # InternLM2 sizes: SentencePiece

        return load_internlm2_tokenizer(folder)
    map_path = folder / "special_tokens_map.json"
    special_map = read_tokenizer_json(map_path) if map_path.is_file() and "added_tokens_decoder" not in config else {}

    named: dict[str, str | None] = {}
    for key in _NAMED_SPECIAL_KEYS:  # as transformers' legacy path, special_tokens_map.json over the config
        if key in special_map:
            named[key] = _token_text(special_map[key])
        elif key in config:
            named[key] = _token_text(config[key])
        else:
            named[key] = _QWEN2_DEFAULTS.get(key)
    extra: list = []
    for key in ("additional_special_tokens", "extra_special_tokens"):
        value = config.get(key, special_map.get(key)) or []
        extra += list(value.values()) if isinstance(value, dict) else list(value)
    named_specials = [t for t in named.values() if t] + [t for t in map(_token_text, extra) if t]

    if (folder / "tokenizer.json").is_file():
        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # the Rust loader raises a plain Exception
            raise CheckpointError(f"cannot read tokenizer file {folder / 'tokenizer.json'}: {err}") from err
        if not isinstance(backend.model, models.BPE) or not isinstance(backend.decoder, decoders.ByteLevel):
            lacks = "" if (folder / "tokenizer.model").is_file() else (
                f", and {folder} has no tokenizer.model (the SentencePiece file of the InternLM2 sizes)")
            raise CheckpointError(f"{folder / 'tokenizer.json'} is not a byte-level BPE tokenizer (Qwen2 style){lacks}")
    else:
        vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
        missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
        if missing:
            raise CheckpointError(f"tokenizer folder {folder} has no tokenizer.json and no {' or '.join(missing)}"
                                  " (Qwen2 sizes), nor tokenizer.model (InternLM2 sizes)")
        vocab = read_tokenizer_json(vocab_path)
        bad = next((k for k, i in vocab.items() if type(i) is not int or i < 0), None)
        if bad is not None:
            raise CheckpointError(f"{vocab_path}: token {bad!r} has id {vocab[bad]!r}; ids are integers >= 0")
        merges = _read_merges(merges_path)
        try:
            backend = build_qwen2_backend(vocab, merges, bool(config.get("add_prefix_space", False)))
        except Exception as err:  # the Rust BPE constructor raises a plain Exception (a merge of unknown symbols)
            raise CheckpointError(f"cannot build the tokenizer from {vocab_path} and {merges_path}: {err}") from err

    source = config_path if "added_tokens_decoder" in config else folder / "added_tokens.json"
    _add_tokens(backend, _declared_added_tokens(folder, config, set(named_specials)), source)
    # Qwen2Tokenizer's constructor re-adds every named special token with default flags: missing ones
    # get the next ids, and lstrip/rstrip/single_word set for them in the config are dropped.
    backend.add_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(named_specials)])
    return Tokenizer(backend, named["pad_token"], str(folder))
