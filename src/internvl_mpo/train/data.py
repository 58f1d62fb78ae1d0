"""Preference and SFT records -> token ids, labels and pixel tiles; the batch collators.

Mirrors the per-item side of `internvl_chat/internvl/train/internvl_chat_mpo.py`
(`LazySupervisedDataset.multi_modal_get_item`, `multi_modal_multi_image_get_item`,
`video_get_item`, `pure_text_get_item`) and of the fine-tuning dataset for conversations:

- single image: tiles from dynamic tiling with `max_num` = the dataset's `max_dynamic_patch` (meta.json)
  or the settings' (`--max-dynamic-patch`, which the trainer lets win over meta.json, else the model
  config's); the question gets `"<image>\\n"` in front when it has no placeholder;
- multi-image (`image` is a list): each image gets `max(1, max_num // n_images)` tiles at most, as
  the official multi-image branch; a question without placeholders gets "Image-k: <image>\\n" lines;
- video (a file, or a folder of frame images): `load_video` frames, one tile each; `<video>\\n` (or
  nothing) becomes the "Frame1: <image>\\nFrame2: <image>\\n..." prefix. Unlike the official branch (broken,
  pitfall 13.8) this path works; the prefix is the inference card's, with a newline after every frame;
- ids come from `chat.template.build_pair_ids` (one shared prompt, two answers), so labels mask the
  system and user turns and supervise each response plus its `<|im_end|>`.

SFT conversations (`encode_sft`, the fine-tuning dataset of `internvl_chat_finetune.py` with
`preprocess_internvl2_5`) get their ids and labels from `chat.template.build_training_ids`. Images fill
the user turns' `<image>` placeholders in order; only when no user turn holds one does the first user
turn get them in front (`add_image_prefix`); `<video>` (or nothing) in the first user turn becomes the
frame prefix. The official item prefixes the record's first turn whatever its role, adds nothing for
several images and writes video frames as `Frame-k: <image>`: README's differences list them.

Deliberate differences from the official code:
- text-only samples carry no dummy white image (the official code encodes one and drops its
  features with `image_flags = 0`); the trainer handles the distributed case on its own;
- too-long samples are never cut through image tokens (pitfall 13.6): only the answers' tails are
  truncated; when the prompt leaves no room for a supervised answer token, or the cut leaves both
  answers the same tokens (a shared prefix), or two texts tokenize alike (Unicode normalization), the
  sample is refused with its `file:line` (the trainer counts and skips it with `--skip-bad`);
- the collator's attention mask comes from the true sequence lengths. The official collator uses
  `input_ids != 0`, which also masks every real `!` token (id 0 in the Qwen vocabulary, pitfall
  13.3); we do not reproduce that;
- padding uses the tokenizer's pad id (`<|endoftext|>`) everywhere (the official code pads with 0
  and then 151643, pitfall 13.4; labels are -100 on pads either way).

Data augmentation (meta.json `data_augment: true`, the official `build_transform(is_train=True)`):
each tile that dynamic tiling cuts, thumbnail included, is re-encoded as JPEG at a quality drawn
uniformly from 75..100, every tile on its own draw, before the (then no-op) resize and normalisation;
video frames and images tiled with `dynamic_image_size` off are re-encoded whole, before their resize
to one tile, as the official transform runs on them there. The official code draws the qualities
from Python's global `random` in each loader worker; here they come from a generator seeded with the
run seed, the epoch and the record's position (`jpeg_augment`), so a resumed run and the
precomputed-reference pass see the same tiles as an uninterrupted run. Chosen and rejected share them.

An option the official code does not have: `rejected_span="divergent-line"` scores a rejected answer
only up to the end of its first line that differs from the chosen answer (`divergent_line_labels`).
The lines after it follow from that first error (a wrong running count stays consistently wrong), so
pushing them down also pushes down correct steps taken from a wrong state. The tokens before the
divergence are the chosen answer's own, so they cancel in the DPO margin either way.
"""

from __future__ import annotations

import copy
import io
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from internvl_mpo.chat.template import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    add_image_prefix,
    build_pair_ids,
    build_training_ids,
    place_video,
)
from internvl_mpo.chat.tokenizer import Tokenizer
from internvl_mpo.config import ModelConfig
from internvl_mpo.errors import InputError, SettingError
from internvl_mpo.processor.image import image_to_pixel_values, load_image, open_image, pointed_elsewhere
from internvl_mpo.processor.tiling import dynamic_preprocess
from internvl_mpo.processor.video import load_video
from internvl_mpo.train.mmpr import PreferenceRecord, SFTRecord
from internvl_mpo.train.settings import REJECTED_SPANS

SFT_ROLE_NAMES = {"human": "user", "gpt": "assistant", "system": "system"}
JPEG_QUALITIES = tuple(range(75, 101))  # the official `qualities`, each equally likely


@dataclass(frozen=True)
class MediaSettings:
    """How images and videos become tiles (the model config's values unless overridden)."""

    image_size: int = 448
    num_image_token: int = 256
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    dynamic_image_size: bool = True
    video_frames: int = 8
    max_pixels: int | None = None  # images and frames with more pixels are refused (None: Pillow's limit)

    @classmethod
    def from_model_config(
        cls, config: ModelConfig, max_dynamic_patch: int | None = None, video_frames: int = 8,
        max_pixels: int | None = None,
    ) -> MediaSettings:
        return cls(
            image_size=config.image_size,
            num_image_token=config.num_image_token,
            min_dynamic_patch=config.min_dynamic_patch,
            max_dynamic_patch=config.max_dynamic_patch if max_dynamic_patch is None else max_dynamic_patch,
            use_thumbnail=config.use_thumbnail,
            dynamic_image_size=config.dynamic_image_size,
            video_frames=video_frames,
            max_pixels=max_pixels,
        )


@dataclass
class PairExample:
    """One encoded preference pair. Full sequences are prompt + chosen and prompt + rejected."""

    index: int  # position in the dataset (keys precomputed reference log-probs)
    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    pixel_values: torch.Tensor  # (N, 3, S, S) float32; N = 0 for text-only
    truncated: bool
    source: str


@dataclass
class SFTExample:
    index: int
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # (N, 3, S, S)
    truncated: bool
    source: str


@dataclass
class BadExample:
    """A sample that could not be encoded; the trainer raises or counts it (`--skip-bad`)."""

    index: int
    kind: str
    message: str  # starts with file:line


# ----------------------------------------------------------------------------- media


def jpeg_reencode(image: Image.Image, quality: int) -> Image.Image:
    """The official `jpeg_degrade`: save as RGB JPEG (Pillow's defaults otherwise) in memory, decode."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def jpeg_augment(seed: int, epoch: int, index: int) -> Callable[[Image.Image], Image.Image]:
    """One record's augmentation in one epoch: each call re-encodes one tile at the next quality drawn
    uniformly from `JPEG_QUALITIES` by a generator seeded with (seed, epoch, index)."""
    rng = random.Random(f"jpeg-augment/{seed}/{epoch}/{index}")
    return lambda image: jpeg_reencode(image, rng.choice(JPEG_QUALITIES))


def _augmented_tiles(
    path: str, augment: Callable[[Image.Image], Image.Image], max_num: int, min_num: int, settings: MediaSettings
) -> torch.Tensor:
    """`load_image`'s tiles with `augment` run on each tile `dynamic_preprocess` cuts (on the whole image
    when dynamic tiling is off), in tile order, before the resize and normalisation."""
    s = settings
    image = open_image(path, s.max_pixels)
    pieces = [image]
    if s.dynamic_image_size:
        pieces = dynamic_preprocess(image, min_num, max_num, s.image_size, s.use_thumbnail)
    return torch.cat([image_to_pixel_values(augment(p), max_num=1, image_size=s.image_size) for p in pieces])


def load_media(
    images: Sequence[str],
    multi_image: bool,
    video: str | None,
    question: str,
    settings: MediaSettings,
    max_num: int | None = None,
    augment: Callable[[Image.Image], Image.Image] | None = None,
    context_length: int | None = None,
) -> tuple[torch.Tensor, list[int], str]:
    """(pixel_values (N, 3, S, S), tiles per `<image>` placeholder, question with the video prefix).

    `augment` (training's `data_augment`, see `jpeg_augment`) runs on every tile and video frame. `context_length`
    (the run's --max-seq-length) is the context a video's frames must fit, as `load_video` takes it.
    """
    s = settings
    videos = question.count(VIDEO_PLACEHOLDER)  # the official reader leaves one it does not fill as text
    if (videos and video is None) or videos > 1:
        raise InputError(f"the question holds {videos} {VIDEO_PLACEHOLDER} placeholder(s) but the record gives"
                         f" {'one video' if video else 'no video'}")
    max_num = s.max_dynamic_patch if max_num is None else max_num
    if not s.dynamic_image_size:
        max_num = 1
    if images:
        per_image = max(1, max_num // len(images)) if multi_image else max_num
        min_num = min(s.min_dynamic_patch, per_image)
        tiles = [
            load_image(p, max_num=per_image, min_num=min_num, image_size=s.image_size, use_thumbnail=s.use_thumbnail,
                       max_pixels=s.max_pixels)
            if augment is None else _augmented_tiles(p, augment, per_image, min_num, s)
            for p in images
        ]
        return torch.cat(tiles), [t.shape[0] for t in tiles], question
    if video is not None:
        frames = load_video(video, num_segments=s.video_frames, image_size=s.image_size, frame_transform=augment,
                            max_pixels=s.max_pixels, context_length=context_length)
        return frames.pixel_values, frames.num_patches_list, place_video(question, frames.prefix)
    return torch.zeros(0, 3, s.image_size, s.image_size), [], question


# ----------------------------------------------------------------------------- encoding


def _supervised(labels: Sequence[int]) -> int:
    return sum(1 for x in labels if x != IGNORE_INDEX)


def fit_pair(
    prompt_len: int, chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]], max_seq_length: int
) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]], bool] | None:
    """Cut each answer's tail so prompt + answer <= max_seq_length; None if an answer keeps no label.
    `truncated`: a supervised token was cut (not only the untrained newline after <|im_end|>)."""
    room = max_seq_length - prompt_len
    out = []
    truncated = False
    for ids, labels in (chosen, rejected):
        if len(ids) > room:
            truncated = truncated or _supervised(labels[max(room, 0):]) > 0
            ids, labels = ids[: max(room, 0)], labels[: max(room, 0)]
        if _supervised(labels) == 0:
            return None
        out.append((ids, labels))
    return out[0], out[1], truncated


def divergent_line_labels(
    chosen_ids: Sequence[int], rejected_ids: Sequence[int], rejected_labels: Sequence[int],
    ends_line: Callable[[int], bool],
) -> list[int]:
    """`rejected_labels` with every position after the end of the rejected answer's first divergent line
    set to -100. The line ends at the first token from the first differing position on for which
    `ends_line(token_id)` is true; without one (or without a difference) nothing is masked."""
    n = min(len(chosen_ids), len(rejected_ids))
    first = next((i for i in range(n) if chosen_ids[i] != rejected_ids[i]), n)
    end = next((j for j in range(first, len(rejected_ids)) if ends_line(rejected_ids[j])), None)
    labels = list(rejected_labels)
    if end is not None:
        labels[end + 1 :] = [IGNORE_INDEX] * (len(labels) - end - 1)
    return labels


class _LineEnds:
    """`token_id -> bool`: does the token's text hold a newline (cached per tokenizer)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, bool] = {}

    def __call__(self, token_id: int) -> bool:
        if token_id not in self.cache:
            self.cache[token_id] = "\n" in self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self.cache[token_id]


def _flagged(error: InputError) -> InputError:
    """`error` naming the pixel limit and the frame count by their `internvl-mpo train` flags, as the other messages
    here name theirs, and pointing a video given as a record's image (or an image as its video) to the record's
    field, not to --video."""
    if isinstance(error, SettingError):
        return error.named({"max_pixels": "--max-pixels", "num_segments": "--video-frames"})
    return pointed_elsewhere(error, 'give it as the record\'s "video"', 'give it as the record\'s "image"')


def _check_video_length(video: str | None, settings: MediaSettings, max_seq_length: int) -> None:
    """Refuse a video whose frames alone (one tile each) fill max_seq_length, before any is decoded (a
    large video_frames would otherwise decode every frame first)."""
    if video is not None:
        tokens = _image_token_count([1] * settings.video_frames, settings.num_image_token)
        if tokens >= max_seq_length:
            raise InputError(f"the video's {settings.video_frames} frames (one tile each) are {tokens} image tokens,"
                             f" which fill --max-seq-length {max_seq_length}; lower --video-frames or raise"
                             " --max-seq-length")


def _image_token_count(num_patches: list[int], num_image_token: int) -> int:
    """Prompt tokens of images with `num_patches` tiles each: the context tokens and <img> ... </img>."""
    return sum(n * num_image_token + 2 for n in num_patches)


def _tiles_flag(video: str | None) -> str:
    """The setting that decides a record's image tokens: a video's frame count (one tile each), else tiles."""
    return "--video-frames" if video else "--max-dynamic-patch"


def encode_pair(
    record: PreferenceRecord,
    tokenizer: Tokenizer,
    settings: MediaSettings,
    max_seq_length: int,
    max_num: int | None = None,
    index: int = 0,
    rejected_span: str = "full",
    line_ends: Callable[[int], bool] | None = None,
    augment: Callable[[Image.Image], Image.Image] | None = None,
) -> PairExample:
    """Load a record's media and tokenize it; InputError("file:line: problem") when it cannot be used.

    One set of tiles serves both answers, as the official item holds one `pixel_values` for both."""
    where = str(record.source)
    try:
        _check_video_length(record.video, settings, max_seq_length)
        pixel_values, num_patches, question = load_media(
            record.images, record.multi_image, record.video, record.question, settings, max_num, augment, max_seq_length
        )
        pair = build_pair_ids(
            tokenizer, question, record.chosen, record.rejected, num_patches, num_image_token=settings.num_image_token
        )
    except InputError as e:
        raise InputError(f"{where}: {_flagged(e)}") from None
    fitted = fit_pair(
        len(pair.prompt_ids), (pair.chosen_ids, pair.chosen_labels), (pair.rejected_ids, pair.rejected_labels),
        max_seq_length,
    )
    if fitted is None:
        image_tokens = _image_token_count(num_patches, settings.num_image_token)
        raise InputError(
            f"{where}: the prompt is {len(pair.prompt_ids)} tokens ({image_tokens} of them image tokens), which leaves"
            f" no supervised answer token within --max-seq-length {max_seq_length}; "
            + (f"lower {_tiles_flag(record.video)} or raise --max-seq-length" if image_tokens
               else "raise --max-seq-length")
        )
    (chosen_ids, chosen_labels), (rejected_ids, rejected_labels), truncated = fitted
    if chosen_ids == rejected_ids and not truncated:  # the texts differ (mmpr refuses equal ones), not the tokens
        raise InputError(
            f"{where}: 'chosen' and 'rejected' are different text but the same tokens (texts that differ only in"
            " Unicode normalization, which the tokenizer undoes): the pair states no preference"
        )
    if chosen_ids == rejected_ids:  # both were cut and lost the difference
        raise InputError(
            f"{where}: 'chosen' and 'rejected' are the same in their first {len(chosen_ids)} tokens, all that"
            f" --max-seq-length {max_seq_length} leaves after the {len(pair.prompt_ids)}-token prompt: the cut pair"
            " states no preference; raise --max-seq-length"
        )
    if rejected_span == "divergent-line":
        ends = line_ends if line_ends is not None else _LineEnds(tokenizer)
        rejected_labels = divergent_line_labels(chosen_ids, rejected_ids, rejected_labels, ends)
    elif rejected_span != "full":
        raise ValueError(f"rejected_span must be one of {REJECTED_SPANS}, got {rejected_span!r}")
    return PairExample(
        index, pair.prompt_ids, chosen_ids, chosen_labels, rejected_ids, rejected_labels, pixel_values, truncated, where
    )


def sft_messages(record: SFTRecord) -> list[dict[str, str]]:
    """Official conversation turns ({"from": human|gpt|system}) as {"role", "content"} messages."""
    return [{"role": SFT_ROLE_NAMES[t["from"]], "content": t["value"]} for t in record.conversations]


def _image_prefix_first_user(messages: list[dict[str, str]], num_images: int) -> None:
    """Images but no placeholder in any user turn: the first user turn gets them in front (`add_image_prefix`).
    An `<image>` in a system or assistant turn is text, as in the official preprocessing."""
    if num_images and not any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] == "user"):
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = add_image_prefix(first_user["content"], num_images)


def encode_sft(
    record: SFTRecord,
    tokenizer: Tokenizer,
    settings: MediaSettings,
    max_seq_length: int,
    max_num: int | None = None,
    index: int = 0,
    augment: Callable[[Image.Image], Image.Image] | None = None,
) -> SFTExample:
    """A conversation with its media; a too-long one loses its tail, never an image token."""
    where = str(record.source)
    messages = sft_messages(record)
    first_user = next((m for m in messages if m["role"] == "user"), None)
    try:
        _check_video_length(record.video, settings, max_seq_length)
        if any(m["role"] == "user" and m is not first_user and VIDEO_PLACEHOLDER in m["content"] for m in messages):
            # only the first human turn's placeholder takes the video; another would be trained on as text
            raise InputError(f"a human turn after the first holds {VIDEO_PLACEHOLDER}: a video goes in front of the "
                             f"first human turn only (its {VIDEO_PLACEHOLDER}, or none)")
        question = first_user["content"] if first_user is not None else ""
        pixel_values, num_patches, question = load_media(
            record.images, record.multi_image, record.video, question, settings, max_num, augment, max_seq_length
        )
        if first_user is not None:
            first_user["content"] = question
        _image_prefix_first_user(messages, len(num_patches))
        ids, labels = build_training_ids(tokenizer, messages, num_patches, num_image_token=settings.num_image_token)
    except InputError as e:
        raise InputError(f"{where}: {_flagged(e)}") from None
    truncated = _supervised(labels[max_seq_length:]) > 0  # not for the untrained newline after <|im_end|> alone
    if len(ids) > max_seq_length:
        # the last image's context tokens and the </img> after them must be kept; a <img> or </img> typed in an
        # answer (the tokenizer reads them as those ids, as the official one does) is text, cut as any; a typed
        # <IMG_CONTEXT> is refused earlier, so context ids are images'
        last = len(ids) - 1 - ids[::-1].index(tokenizer.img_context_id) if tokenizer.img_context_id in ids else -1
        if last >= 0 and last + 1 >= max_seq_length:
            raise InputError(
                f"{where}: the conversation is {len(ids)} tokens and cutting it to --max-seq-length {max_seq_length}"
                f" would cut image tokens; lower {_tiles_flag(record.video)} or raise --max-seq-length"
            )
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
    if _supervised(labels) == 0:
        raise InputError(f"{where}: no supervised answer token within --max-seq-length {max_seq_length}")
    return SFTExample(index, ids, labels, pixel_values, truncated, where)


# ----------------------------------------------------------------------------- datasets


class _EpochView:
    """`at_epoch(e)`: the same dataset at epoch e (a shallow copy), which seeds its data augmentation."""

    epoch = 0

    def at_epoch(self, epoch: int):
        view = copy.copy(self)
        view.epoch = epoch
        return view


class PairDataset(_EpochView):
    """Map-style dataset of preference records; items are encoded (images loaded) on access.

    `__getitem__` never raises for bad data: it returns a `BadExample` whose message names the
    record's file:line, so the trainer can stop with it or count it. Records of the datasets named
    in `augment_datasets` get the JPEG augmentation drawn for (`seed`, `epoch`, index); `at_epoch`
    gives the same dataset at another epoch.
    """

    def __init__(
        self,
        records: Sequence[PreferenceRecord],
        tokenizer: Tokenizer,
        settings: MediaSettings,
        max_seq_length: int,
        max_num_by_dataset: dict[str, int] | None = None,
        rejected_span: str = "full",
        augment_datasets: Collection[str] = (),
        seed: int = 0,
    ):
        self.records = list(records)
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_seq_length = max_seq_length
        self.max_num_by_dataset = dict(max_num_by_dataset or {})
        self.rejected_span = rejected_span
        self.line_ends = _LineEnds(tokenizer)
        self.augment_datasets = frozenset(augment_datasets)
        self.seed = seed

    @property
    def augments(self) -> bool:
        return any(r.dataset in self.augment_datasets for r in self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> PairExample | BadExample:
        record = self.records[index]
        augment = jpeg_augment(self.seed, self.epoch, index) if record.dataset in self.augment_datasets else None
        try:
            return encode_pair(
                record, self.tokenizer, self.settings, self.max_seq_length,
                self.max_num_by_dataset.get(record.dataset), index, self.rejected_span, self.line_ends, augment,
            )
        except InputError as e:
            return BadExample(index, "encode", str(e))


class SFTDataset(_EpochView):
    """Map-style dataset of SFT conversation records (same error and augmentation contract as
    `PairDataset`; `augment` flags each record)."""

    def __init__(
        self,
        records: Sequence[SFTRecord],
        tokenizer: Tokenizer,
        settings: MediaSettings,
        max_seq_length: int,
        max_num: Sequence[int | None] | None = None,
        augment: Sequence[bool] | None = None,
        seed: int = 0,
    ):
        self.records = list(records)
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_seq_length = max_seq_length
        self.max_num = list(max_num) if max_num is not None else [None] * len(self.records)
        self.augment = list(augment) if augment is not None else [False] * len(self.records)
        self.seed = seed

    @property
    def augments(self) -> bool:
        return any(self.augment)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SFTExample | BadExample:
        augment = jpeg_augment(self.seed, self.epoch, index) if self.augment[index] else None
        try:
            return encode_sft(
                self.records[index], self.tokenizer, self.settings, self.max_seq_length, self.max_num[index], index,
                augment,
            )
        except InputError as e:
            return BadExample(index, "encode", str(e))


# ----------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """Right-padded sequences for one forward.

    For preference pairs the rows are [prompt+chosen_1..B ; prompt+rejected_1..B] (2B rows) and
    `pixel_values` holds each pair's tiles once, pair after pair; for SFT there are B rows.
    """

    input_ids: torch.Tensor  # (R, T) int64, pad id after each sequence
    labels: torch.Tensor  # (R, T) int64, -100 on prompt and pad positions
    attention_mask: torch.Tensor  # (R, T) int64, 1 for the first `length` positions of a row
    pixel_values: torch.Tensor  # (N, 3, S, S) float32
    num_tiles: torch.Tensor  # (B,) int64 tiles per sample
    indices: torch.Tensor  # (B,) int64 dataset positions
    pairs: bool

    @property
    def num_samples(self) -> int:
        return self.indices.numel()

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> Batch:
        move = {"non_blocking": True}
        return Batch(
            self.input_ids.to(device, **move), self.labels.to(device, **move), self.attention_mask.to(device, **move),
            self.pixel_values.to(device, **move), self.num_tiles, self.indices, self.pairs,
        )


def pad_sequences(
    sequences: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels) pairs -> right-padded ids (pad_id), labels (-100) and a mask from the lengths."""
    length = max(len(ids) for ids, _ in sequences)
    n = len(sequences)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for row, (ids, labs) in enumerate(sequences):
        if len(ids) != len(labs):
            raise ValueError(f"row {row}: {len(ids)} ids but {len(labs)} labels")
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(ids)] = torch.tensor(labs, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, labels, attention_mask


def _tiles(examples: Sequence[PairExample | SFTExample]) -> tuple[torch.Tensor, torch.Tensor]:
    pixel_values = torch.cat([e.pixel_values for e in examples])
    num_tiles = torch.tensor([e.pixel_values.shape[0] for e in examples], dtype=torch.long)
    return pixel_values, num_tiles


def collate_pairs(examples: Sequence[PairExample], pad_id: int) -> Batch:
    """Stack B pairs as 2B rows (chosen block, then rejected block), tiles once per pair."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    chosen = [(e.prompt_ids + e.chosen_ids, [IGNORE_INDEX] * len(e.prompt_ids) + e.chosen_labels) for e in examples]
    rejected = [
        (e.prompt_ids + e.rejected_ids, [IGNORE_INDEX] * len(e.prompt_ids) + e.rejected_labels) for e in examples
    ]
    input_ids, labels, attention_mask = pad_sequences(chosen + rejected, pad_id)
    pixel_values, num_tiles = _tiles(examples)
    indices = torch.tensor([e.index for e in examples], dtype=torch.long)
    return Batch(input_ids, labels, attention_mask, pixel_values, num_tiles, indices, pairs=True)


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> Batch:
    if not examples:
        raise ValueError("cannot collate an empty batch")
    input_ids, labels, attention_mask = pad_sequences([(e.input_ids, e.labels) for e in examples], pad_id)
    pixel_values, num_tiles = _tiles(examples)
    indices = torch.tensor([e.index for e in examples], dtype=torch.long)
    return Batch(input_ids, labels, attention_mask, pixel_values, num_tiles, indices, pairs=False)
