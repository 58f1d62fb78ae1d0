"""The SentencePiece tokenizer of the InternLM2-based checkpoints (InternVL2.5-2B, -8B, -26B).

Mirrors the slow `InternLM2Tokenizer` that the official chat code loads (`use_fast=False`): the text
is first split on the added tokens of `tokenizer_config.json` (InternLM2's `<|im_start|>` ...
and InternVL's `<img>`, `<IMG_CONTEXT>`, ...), then every other piece goes through the SentencePiece
BPE model in `tokenizer.model`. The model file is a protobuf; the few fields needed are read here
directly (no `sentencepiece` / `protobuf` dependency) and turned into a `tokenizers` pipeline the way
transformers' SentencePiece converters do:
- normalizer, in SentencePiece's order: the precompiled charsmap when there is one, then
  `remove_extra_whitespaces` (trim, collapse runs of spaces), `add_dummy_prefix` (a leading "▁") and
  `escape_whitespaces` (" " -> "▁"), each only when the model file sets it;
- BPE over the whole piece (no pre-tokenizer), merges derived from the vocabulary: every split of a
  normal piece into two normal pieces, ranked by the merged piece's score (then its id, then the
  parts' ids), unknown characters fused into one `<unk>` or, with `byte_fallback`, spelled as
  `<0xXX>` byte pieces;
- decoding (`SentencePieceTokenizer.decode`, the streaming decoder's code): "▁" -> " ", byte pieces ->
  bytes, control pieces -> nothing (unless the config names them), each byte of invalid UTF-8 -> U+FFFD as
  SentencePiece has it, and, with `add_dummy_prefix` or `remove_extra_whitespaces`, the "▁" of the text's
  first piece dropped (of each piece while the text is still empty, with `remove_extra_whitespaces`; never a
  byte piece's), as SentencePiece's decoder does.
Kept from the reference: `unk`/`bos`/`eos` written in the text are matched as special tokens; a token
that tokenizer_config.json declares at the id of another piece takes that id over (InternLM2's
`<|im_end|>` is declared at 92542, the user-defined piece `[UNUSED_TOKEN_145]` in `tokenizer.model`), and
the user-defined piece so renamed, typed in a text, still reads as that id, as SentencePiece has it. Not done
here: the BOS that `InternLM2Tokenizer` prepends by default (`add_bos_token`, exposed on the result);
the slow decoder's spacing quirks around special tokens; SentencePiece's own charsmap normalizer (`tokenizers`'
`Precompiled` stands for it, as in transformers' fast converters, and differs from it: a combining mark after a
character the map rewrites (a no-break or ideographic space, a full-width letter, a circled digit) is lost, and
Hangul jamo are not composed; InternLM2's files normalize nothing, so they have no charsmap).
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from tokenizers import AddedToken, Regex, models, normalizers
from tokenizers import Tokenizer as Backend

from internvl_mpo.chat.tokenizer import Tokenizer, added_tokens_decoder, legacy_added_tokens, read_tokenizer_json
from internvl_mpo.errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece piece types
BPE_MODEL = 2  # TrainerSpec.model_type
SPACE = "\u2581"  # "▁"


@dataclass
class SentencePieceModel:
    """The fields of `tokenizer.model` (ModelProto) that tokenization depends on."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type) by id
    model_type: int = 1  # UNIGRAM unless set
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes):
    """Yield (field number, wire type, value) of one protobuf message; value is int, bytes or float."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = struct.unpack("<f", data[pos : pos + 4])[0], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


def read_sentencepiece_model(path: str | Path) -> SentencePieceModel:
    """Parse a SentencePiece `tokenizer.model` file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read tokenizer file {path}: {e}") from None
    model = SentencePieceModel()
    try:
        for number, wire, value in _fields(data):
            if number == 1 and wire == 2:  # repeated SentencePiece {1: piece, 2: score, 3: type}
                piece, score, kind = "", 0.0, NORMAL
                for n, _, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = v
                    elif n == 3:
                        kind = v
                model.pieces.append((piece, score, kind))
            elif number == 2 and wire == 2:  # TrainerSpec
                for n, _, v in _fields(value):
                    if n == 3:
                        model.model_type = v
                    elif n == 24:
                        model.treat_whitespace_as_suffix = bool(v)
                    elif n == 35:
                        model.byte_fallback = bool(v)
                    elif n in (40, 41, 42):
                        setattr(model, {40: "unk_id", 41: "bos_id", 42: "eos_id"}[n], v if v < 2**63 else v - 2**64)
            elif number == 3 and wire == 2:  # NormalizerSpec
                for n, _, v in _fields(value):
                    if n == 2:
                        model.precompiled_charsmap = bytes(v)
                    elif n in (3, 4, 5):
                        name = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}[n]
                        setattr(model, name, bool(v))
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a SentencePiece model file ({e})") from None
    if not model.pieces:
        raise CheckpointError(f"{path}: not a SentencePiece model file (no pieces)")
    if model.model_type != BPE_MODEL:
        raise CheckpointError(f"{path}: SentencePiece model type {model.model_type} is not BPE (2), as InternLM2's is")
    if model.treat_whitespace_as_suffix:
        raise CheckpointError(f"{path}: treat_whitespace_as_suffix is not implemented")
    return model


def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Merges that rebuild SentencePiece BPE: every split of a normal piece into two normal pieces,
    best score first (then merged id, left id, right id)."""
    ids = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == NORMAL}
    ranked = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_backend(model: SentencePieceModel) -> Backend:
    """The `tokenizers` pipeline of a SentencePiece BPE model (no added tokens yet)."""
    vocab = {}
    for i, (piece, _, _) in enumerate(model.pieces):
        vocab.setdefault(piece, i)
    unk = model.pieces[model.unk_id][0] if 0 <= model.unk_id < len(model.pieces) else None
    backend = Backend(models.BPE(
        vocab=vocab, merges=bpe_merges(model.pieces), unk_token=unk, fuse_unk=True,
        byte_fallback=model.byte_fallback, dropout=None,
    ))
    steps = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        # spaces only, as SentencePiece does (normalizers.Strip would take newlines and tabs too); its trailing trim
        # runs on the escaped text, so it takes a "▁" typed at the end of the text too
        steps += [normalizers.Replace(Regex(f"\\A +|[ {SPACE}]+\\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if model.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    if model.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    return backend


# SentencePiece turns each byte of invalid UTF-8 into its own U+FFFD (Python's "replace" gives one per bad
# sequence, `tokenizers`' ByteFallback one per byte of the whole run of byte pieces, valid or not).
codecs.register_error("sentencepiece", lambda e: ("\ufffd" * (e.end - e.start), e.end))


class SentencePieceTokenizer(Tokenizer):
    """`chat.tokenizer.Tokenizer` over SentencePiece pieces (its streaming decoder needs the bytes of a
    piece), plus the BOS facts of InternLM2Tokenizer. Decoding goes through the streaming decoder, which
    spells invalid UTF-8 as SentencePiece does."""

    utf8_errors = "sentencepiece"

    def __init__(self, backend: Backend, pad_token, source: str, bos_token: str | None,
                 add_bos_token: bool, strips_leading_space: bool = False, aliases: dict[int, int] | None = None,
                 folds_whitespace: bool = False, control_ids: frozenset[int] = frozenset()):
        super().__init__(backend, pad_token, source)
        self.bos_token = bos_token
        self.add_bos_token = add_bos_token
        # add_dummy_prefix or remove_extra_whitespaces: decoding drops the "▁" a text begins with
        self.strips_leading_space = strips_leading_space
        self.folds_whitespace = folds_whitespace  # remove_extra_whitespaces: that of each piece while nothing is out
        # backend id -> real id of user-defined pieces whose id the config gave to another token
        self._aliases = aliases or {}
        self._control_ids = control_ids  # control pieces: no text unless the config names them as tokens

    def encode(self, text: str) -> list[int]:
        return [self._aliases.get(i, i) for i in super().encode(text)]

    def __len__(self) -> int:
        return super().__len__() - len(self._aliases)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        stream = self.stream_decoder(skip_special_tokens)
        return stream.feed(ids) + stream.flush()

    @property
    def bos_id(self) -> int:
        return self.token_to_id(self.bos_token or "<s>")

    def token_bytes(self, token_id: int) -> bytes:
        added = self._added.get(token_id)
        if added is not None:
            return added.content.encode("utf-8")
        piece = self.backend.id_to_token(token_id)
        if piece is None or token_id in self._control_ids:
            return b""
        if _is_byte_piece(piece):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(SPACE, " ").encode("utf-8")

    def strip_leading_space(self, token_id: int, data: bytes) -> tuple[bytes, bool]:
        """SentencePiece's start of a decoded text: `data`, the bytes of `token_id` while no text is out, without
        the space ("▁") it begins with, and whether the next token's is dropped too (with remove_extra_whitespaces,
        while nothing is out; a byte piece keeps its byte and ends it)."""
        if token_id not in self._added and _is_byte_piece(self.backend.id_to_token(token_id) or ""):
            return data, False
        if data.startswith(b" "):
            data = data[1:]
            return data, self.folds_whitespace and not data
        return data, not data


def _is_byte_piece(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_internlm2_tokenizer(folder: str | Path) -> SentencePieceTokenizer:
    """`tokenizer.model` + `tokenizer_config.json` (or `added_tokens.json`) of a checkpoint folder."""
    folder = Path(folder)
    model = read_sentencepiece_model(folder / "tokenizer.model")
    config_path = folder / "tokenizer_config.json"
    config = read_tokenizer_json(config_path) if config_path.is_file() else {}
    # InternLM2Tokenizer's defaults for the named tokens.
    named = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>"}
    named.update({k: _content(config[k]) for k in named if k in config})
    declared: dict[int, AddedToken] = {}
    if "added_tokens_decoder" in config:
        declared = added_tokens_decoder(config, config_path)
    elif (folder / "added_tokens.json").is_file():
        declared = {token_id: AddedToken(content, special=True, normalized=False)
                    for content, token_id in legacy_added_tokens(folder / "added_tokens.json").items()}
    # A token declared at the id of a different piece takes that id over (InternLM2's `<|im_end|>` sits on
    # the user-defined piece `[UNUSED_TOKEN_145]`); the piece, when user-defined, still reads as that id.
    renamed = list(model.pieces)
    displaced = {}
    for token_id, token in declared.items():
        if token_id < len(renamed) and renamed[token_id][0] != token.content:
            piece, score, kind = renamed[token_id]
            if kind in (NORMAL, BYTE):
                raise CheckpointError(
                    f"{config_path}: added token {token.content!r} is declared as id {token_id}, which"
                    f" tokenizer.model uses for the piece {piece!r}; only user-defined, control or unused pieces"
                    " can be renamed"
                )
            renamed[token_id] = (token.content, score, kind)
            if kind == USER_DEFINED:
                displaced[piece] = token_id
    model = replace(model, pieces=renamed)
    backend = build_backend(model)
    for token_id, token in sorted(declared.items()):
        backend.add_tokens([token])
        if backend.token_to_id(token.content) != token_id:
            raise CheckpointError(
                f"{folder}: added token {token.content!r} is declared as id {token_id} but lands on id "
                f"{backend.token_to_id(token.content)}"
            )
    # SentencePiece never splits a user-defined piece, listed in the config or not.
    listed = {token.content for token in declared.values()}
    user_defined = [piece for piece, _, kind in model.pieces if kind == USER_DEFINED and piece not in listed]
    backend.add_tokens([AddedToken(piece, special=False, normalized=False) for piece in user_defined])
    specials = [t for t in named.values() if t] + [_content(t) for t in config.get("additional_special_tokens") or []]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials) if t])
    backend.add_tokens([AddedToken(piece, special=False, normalized=False) for piece in displaced])
    return SentencePieceTokenizer(
        backend, named["pad_token"], str(folder), named["bos_token"],
        bool(config.get("add_bos_token", True)), model.add_dummy_prefix or model.remove_extra_whitespaces,
        {backend.token_to_id(piece): token_id for piece, token_id in displaced.items()}, model.remove_extra_whitespaces,
        frozenset(i for i, (_, _, kind) in enumerate(model.pieces) if kind == CONTROL),
    )
