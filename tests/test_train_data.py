"""Preference / SFT records -> ids, labels, tiles and batches (train/data.py).

Label masks are checked against the official `preprocess_internvl2_5` rule written out here on top of
transformers' Qwen2Tokenizer: each turn tokenized on its own, system and user turns all -100, the
assistant turn supervised except its first 3 tokens (`<|im_start|>assistant\\n`) and its final "\\n".
The helpers at the top (tiny PNGs, MMPR files) are shared with test_train.py and test_distributed.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_mpo.chat.template import TEMPLATES, build_pair_ids
from internvl_mpo.chat.tokenizer import load_tokenizer
from internvl_mpo.config import ModelConfig
from internvl_mpo.errors import InputError
from internvl_mpo.processor.image import IMAGENET_MEAN, IMAGENET_STD, load_image
from internvl_mpo.processor.tiling import dynamic_preprocess
from internvl_mpo.processor.video import load_video
from internvl_mpo.train import data
from internvl_mpo.train.data import (
    BadExample,
    MediaSettings,
    PairDataset,
    SFTDataset,
    collate_pairs,
    collate_sft,
    divergent_line_labels,
    encode_pair,
    jpeg_augment,
    load_media,
)
from internvl_mpo.train.distributed import DistEnv
from internvl_mpo.train.fingerprints import media_digest
from internvl_mpo.train.mmpr import load_meta, read_datasets, read_sft_records
from internvl_mpo.train.mpo import train
from internvl_mpo.train.settings import TrainConfig

COLORS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20), "grey": (128, 128, 128)}
SIZES = {"red": (40, 30), "blue": (30, 60), "green": (56, 56), "grey": (90, 30)}


# ----------------------------------------------------------------------------- shared helpers


def write_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, color in COLORS.items():
        Image.new("RGB", SIZES[name], color).save(folder / f"{name}.png")
    return folder


def write_noise_images(folder: Path) -> Path:
    """The picture files of `write_images`, same names and sizes, as seeded RGB noise: JPEG changes such
    pixels at every quality (a flat colour can come back unchanged)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (width, height) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def write_mmpr(root: Path, records: list[dict], name: str = "toy", **spec) -> Path:
    """One-dataset MMPR folder: images/, pairs.jsonl (records written as given), meta.json."""
    images = write_images(root / "images")
    annotation = root / f"{name}.jsonl"
    annotation.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    meta = {name: {"root": str(images), "annotation": str(annotation), "data_augment": False, "repeat_time": 1,
                   **spec}}
    (root / "meta.json").write_text(json.dumps(meta))
    return root / "meta.json"


def color_pairs(n: int, text_only: int = 0) -> list[dict]:
    """Image questions whose chosen answer names the colour; a few text-only ones."""
    names = list(COLORS)
    out = [
        {"image": f"{names[i % 4]}.png", "question": f"What colour is picture {i}?",
         "chosen": f"It is {names[i % 4]}.", "rejected": "It is purple."}
        for i in range(n)
    ]
    out += [{"question": f"Say hello {i}", "chosen": "Hello there!", "rejected": "Go away."} for i in range(text_only)]
    return out


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    from conftest import tiny_chat_folder

    folder, _ = tiny_chat_folder(tmp_path_factory.mktemp("tiny") / "model")
    return folder


@pytest.fixture(scope="module")
def tokenizer(chat_folder):
    return load_tokenizer(chat_folder)


@pytest.fixture(scope="module")
def settings(chat_folder):
    return MediaSettings.from_model_config(ModelConfig.from_json(chat_folder / "config.json"))


def official_segments(hf, question: str, answer: str, system: str) -> tuple[list[int], list[int]]:
    """`preprocess_internvl2_5` for one [human, gpt] conversation: per-turn tokenization and masks."""
    system_ids = hf(f"<|im_start|>system\n{system}<|im_end|>\n", add_special_tokens=False).input_ids
    user_ids = hf(f"<|im_start|>user\n{question}<|im_end|>\n", add_special_tokens=False).input_ids
    answer_ids = hf(f"<|im_start|>assistant\n{answer}<|im_end|>\n", add_special_tokens=False).input_ids
    answer_labels = [-100] * 3 + answer_ids[3:-1] + [-100]
    ids = system_ids + user_ids + answer_ids
    labels = [-100] * (len(system_ids) + len(user_ids)) + answer_labels
    return ids, labels


def expand(question: str, tiles: list[int], per_tile: int) -> str:
    for n in tiles:
        question = question.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (per_tile * n) + "</img>", 1)
    return question


# ----------------------------------------------------------------------------- tests


def test_label_masks_match_official_rendering(tmp_path, chat_folder, tokenizer, settings):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(chat_folder)
    records = [
        {"image": "red.png", "question": "What colour is it?", "chosen": "It is red!", "rejected": "Blue, I think."},
        {"question": "Hi there\nfriend", "chosen": "Hello!\nNice day.", "rejected": "No."},
    ]
    specs = load_meta(str(write_mmpr(tmp_path, records)))
    recs, _ = read_datasets(specs)
    recs = sorted(recs, key=lambda r: r.source.line)
    examples = [encode_pair(r, tokenizer, settings, max_seq_length=4096) for r in recs]
    batch = collate_pairs(examples, tokenizer.pad_id)
    system = TEMPLATES["internvl2_5"].system_message
    tiles = load_image(tmp_path / "images" / "red.png", max_num=settings.max_dynamic_patch,
                       image_size=settings.image_size).shape[0]
    questions = [expand("<image>\nWhat colour is it?", [tiles], settings.num_image_token), "Hi there\nfriend"]
    b = len(examples)
    for i, (record, question) in enumerate(zip(recs, questions)):
        for half, answer in ((0, record.chosen), (1, record.rejected)):
            ids, labels = official_segments(hf, question, answer, system)
            row = half * b + i
            n = int(batch.attention_mask[row].sum())
            assert batch.input_ids[row, :n].tolist() == ids
            assert batch.labels[row, :n].tolist() == labels
    assert batch.num_tiles.tolist() == [tiles, 0]
    torch.testing.assert_close(batch.pixel_values, load_image(tmp_path / "images" / "red.png",
                                                              max_num=settings.max_dynamic_patch,
                                                              image_size=settings.image_size), rtol=0, atol=0)


def test_collator_pads_with_pad_id_and_masks_from_lengths(tokenizer, settings, tmp_path):
    # "!" is id 0 in the Qwen vocabulary: the official `input_ids != 0` mask would hide it.
    assert tokenizer.encode("!") == [0]
    records = [{"question": "Shout", "chosen": "Wow!!! Yes!", "rejected": "no"},
               {"question": "A much longer question with many more words in it", "chosen": "ok", "rejected": "fine"}]
    recs, _ = read_datasets(load_meta(str(write_mmpr(tmp_path, records))))
    examples = [encode_pair(r, tokenizer, settings, 4096, index=k) for k, r in enumerate(recs)]
    batch = collate_pairs(examples, tokenizer.pad_id)
    lengths = [len(e.prompt_ids) + len(e.chosen_ids) for e in examples]
    lengths += [len(e.prompt_ids) + len(e.rejected_ids) for e in examples]
    assert batch.input_ids.shape == (4, max(lengths))
    for row, n in enumerate(lengths):
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert (batch.input_ids[row, n:] == tokenizer.pad_id).all()
        assert (batch.labels[row, n:] == -100).all()
    has_bang = (batch.input_ids == 0) & (batch.attention_mask == 1)
    assert has_bang.any()
    assert batch.pixel_values.shape[0] == 0 and batch.num_tiles.tolist() == [0, 0]
    assert batch.indices.tolist() == [0, 1]


def test_multi_image_tiles_split_the_budget_and_meta_override(tmp_path, tokenizer, settings):
    records = [{"image": ["red.png", "grey.png"], "question": "Compare them.", "chosen": "Red, grey.", "rejected": "x"},
               {"image": "grey.png", "question": "What is it?", "chosen": "Grey.", "rejected": "y"}]
    meta = write_mmpr(tmp_path, records, max_dynamic_patch=4)
    specs = load_meta(str(meta))
    recs, _ = read_datasets(specs)
    dataset = PairDataset(recs, tokenizer, settings, 8192, {s.name: s.max_dynamic_patch for s in specs})
    by_line = {dataset.records[i].source.line: dataset[i] for i in range(len(dataset))}
    multi, single = by_line[1], by_line[2]
    images = tmp_path / "images"
    expected = [load_image(images / f"{n}.png", max_num=2, image_size=settings.image_size).shape[0]
                for n in ("red", "grey")]
    assert multi.pixel_values.shape[0] == sum(expected)
    grey4 = load_image(images / "grey.png", max_num=4, image_size=settings.image_size)
    assert single.pixel_values.shape[0] == grey4.shape[0] > expected[1]
    text = tokenizer.decode(multi.prompt_ids, skip_special_tokens=False)
    assert "Image-1: <img>" in text and "Image-2: <img>" in text
    n_context = sum(t == tokenizer.img_context_id for t in multi.prompt_ids)
    assert n_context == settings.num_image_token * sum(expected)


def test_video_records_use_frames_and_the_card_prefix(tmp_path, tokenizer, settings):
    av = pytest.importorskip("av")
    codec = next((c for c in ("mpeg4", "mjpeg") if c in av.codecs_available), None)
    if codec is None:
        pytest.skip("no video encoder in this PyAV build")
    root = tmp_path / "data"
    write_images(root / "images")
    with av.open(str(root / "images" / "clip.mp4"), "w") as container:
        stream = container.add_stream(codec, rate=4)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for k in range(12):
            frame = Image.new("RGB", (64, 48), (20 * k, 100, 255 - 20 * k))
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    meta = write_mmpr(root, [{"video": "clip.mp4", "question": "<video>\nWhat happens?", "chosen": "Bars grow.",
                              "rejected": "Nothing."}])
    recs, _ = read_datasets(load_meta(str(meta)))
    example = encode_pair(recs[0], tokenizer, MediaSettings(**{**settings.__dict__, "video_frames": 3}), 8192)
    assert example.pixel_values.shape[0] == 3
    text = tokenizer.decode(example.prompt_ids, skip_special_tokens=False)
    assert "Frame1: <img>" in text and "Frame3: <img>" in text and "</img>\nWhat happens?" in text
    assert "<video>" not in text
    with pytest.raises(InputError,
                       match=r"\(\d+ of them image tokens\).*; lower --video-frames or raise --max-seq-length$"):
        # a video's frames are one tile each: their count decides (the default 8 frames' tokens, and some room)
        encode_pair(recs[0], tokenizer, settings, 8 * (settings.num_image_token + 2) + 5)
    # frames that alone fill max_seq_length are refused before any is decoded (a large video_frames
    # decoded them all first)
    import internvl_mpo.train.data as data_module

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded")

    frames = 8192 // (settings.num_image_token + 2) + 1
    many = MediaSettings(**{**settings.__dict__, "video_frames": frames})
    tokens = frames * (settings.num_image_token + 2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data_module, "load_video", no_decoding)
        with pytest.raises(InputError, match=rf"video's {frames} frames \(one tile each\) are {tokens} image tokens, "
                                             r"which fill --max-seq-length 8192; lower --video-frames"):
            encode_pair(recs[0], tokenizer, many, 8192)
        convo = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Bars grow."}]
        (root / "sft.jsonl").write_text(json.dumps({"video": "clip.mp4", "conversations": convo}) + "\n")
        bad = SFTDataset(read_sft_records(str(root / "sft.jsonl"), str(root / "images")), tokenizer, many, 8192)[0]
        assert isinstance(bad, BadExample) and f"video's {frames} frames (one tile each)" in bad.message


def test_long_answers_lose_their_tails_never_the_prompt(tmp_path, tokenizer, settings):
    long = " ".join(["word"] * 200)
    recs, _ = read_datasets(load_meta(str(write_mmpr(tmp_path, [
        {"image": "red.png", "question": "Describe.", "chosen": long, "rejected": "Short."}]))))
    full = encode_pair(recs[0], tokenizer, settings, 100_000)
    room = len(full.rejected_ids) + 2
    assert len(full.chosen_ids) > room
    cut = encode_pair(recs[0], tokenizer, settings, len(full.prompt_ids) + room)
    assert cut.truncated and not full.truncated
    assert cut.prompt_ids == full.prompt_ids
    assert cut.chosen_ids == full.chosen_ids[:room] and cut.chosen_labels == full.chosen_labels[:room]
    assert cut.rejected_ids == full.rejected_ids
    torch.testing.assert_close(cut.pixel_values, full.pixel_values, rtol=0, atol=0)
    # a limit the longer answer exactly fills cuts nothing: not counted as cut
    exact = encode_pair(recs[0], tokenizer, settings, len(full.prompt_ids) + len(full.chosen_ids))
    assert not exact.truncated and exact.chosen_ids == full.chosen_ids and exact.chosen_labels == full.chosen_labels
    # nor one that cuts only the untrained newline after <|im_end|>: no answer token was lost
    assert full.chosen_labels[-1] == -100 and full.chosen_labels[-2] != -100
    newline = encode_pair(recs[0], tokenizer, settings, len(full.prompt_ids) + len(full.chosen_ids) - 1)
    assert not newline.truncated and newline.chosen_labels == full.chosen_labels[:-1]


def test_answers_cut_to_the_same_tokens_name_file_and_line(tmp_path, tokenizer, settings):
    # DropoutNTP-style: the rejected answer repeats the first half of the chosen one, then goes astray.
    shared = " ".join(["word"] * 40)
    meta = write_mmpr(tmp_path, [{"image": "red.png", "question": "Describe.", "chosen": shared + " right end.",
                                  "rejected": shared + " wrong end."}])
    (rec,), _ = read_datasets(load_meta(str(meta)))
    full = encode_pair(rec, tokenizer, settings, 100_000)
    first = next(i for i, (c, r) in enumerate(zip(full.chosen_ids, full.rejected_ids)) if c != r)
    kept = encode_pair(rec, tokenizer, settings, len(full.prompt_ids) + first + 1)
    assert kept.chosen_ids != kept.rejected_ids and kept.truncated
    limit = len(full.prompt_ids) + first
    with pytest.raises(InputError, match=rf"toy\.jsonl:1: 'chosen' and 'rejected' are the same in their first {first}"
                                         rf" tokens.*--max-seq-length {limit}.*raise --max-seq-length") as error:
        encode_pair(rec, tokenizer, settings, limit)
    assert PairDataset([rec], tokenizer, settings, max_seq_length=limit)[0] == BadExample(0, "encode", str(error.value))


def test_answers_that_tokenize_alike_uncut_do_not_blame_the_sequence_length(tmp_path, tokenizer, settings):
    # Composed and decomposed accents are different text but the same tokens (the tokenizer's NFC normalizer):
    # nothing was cut, so raising --max-seq-length cannot help, as the error used to say.
    meta = write_mmpr(tmp_path, [{"question": "Where?", "chosen": "At the caf\u00e9.", "rejected": "At the cafe\u0301."}])
    (rec,), _ = read_datasets(load_meta(str(meta)))
    with pytest.raises(InputError, match=r"toy\.jsonl:1: 'chosen' and 'rejected' are different text but the same"
                                         r" tokens \(texts that differ only in Unicode normalization") as error:
        encode_pair(rec, tokenizer, settings, 100_000)
    assert "--max-seq-length" not in str(error.value)


def test_prompt_too_long_names_file_and_line(tmp_path, tokenizer, settings):
    meta = write_mmpr(tmp_path, [{"question": "ok", "chosen": "a", "rejected": "b"},
                                 {"image": "green.png", "question": "Long " * 50, "chosen": "a", "rejected": "b"}])
    recs, _ = read_datasets(load_meta(str(meta)))
    recs = sorted(recs, key=lambda r: r.source.line)
    short = encode_pair(recs[0], tokenizer, settings, 100_000)
    limit = len(short.prompt_ids) + max(len(short.chosen_ids), len(short.rejected_ids))
    dataset = PairDataset(recs, tokenizer, settings, max_seq_length=limit)
    assert not isinstance(dataset[0], BadExample)
    bad = dataset[1]
    assert isinstance(bad, BadExample)
    assert f"{tmp_path / 'toy.jsonl'}:2:" in bad.message and f"--max-seq-length {limit}" in bad.message
    with pytest.raises(InputError,
                       match=r"toy\.jsonl:2: the prompt is \d+ tokens.*lower --max-dynamic-patch or raise"
                             r" --max-seq-length$"):
        encode_pair(recs[1], tokenizer, settings, limit)
    # a text-only prompt: fewer tiles would not help, so only the length is named
    meta = write_mmpr(tmp_path / "text", [{"question": "Long " * 50, "chosen": "a", "rejected": "b"}])
    (text,), _ = read_datasets(load_meta(str(meta)))
    with pytest.raises(InputError, match=r"\(0 of them image tokens\).*--max-seq-length \d+; raise --max-seq-length$"):
        encode_pair(text, tokenizer, settings, limit)


def test_divergent_line_labels_on_hand_made_ids():
    newline = 9
    chosen = [1, 2, 9, 3, 4, 9, 5, 9]
    # differs at position 3 (7 vs 3); that line ends at position 5; positions 6.. are masked
    rejected = [1, 2, 9, 7, 4, 9, 6, 9, 8]
    labels = [10, 11, 12, 13, 14, 15, 16, 17, 18]
    out = divergent_line_labels(chosen, rejected, labels, lambda t: t == newline)
    assert out == [10, 11, 12, 13, 14, 15, -100, -100, -100]
    # the first difference is a newline itself: the line ends there
    assert divergent_line_labels([1, 2, 3], [1, 9, 4, 9], [0, 1, 2, 3], lambda t: t == newline) == [0, 1, -100, -100]
    # no newline after the difference, or the rejected answer is a prefix of the chosen one: nothing is cut
    assert divergent_line_labels([1, 2, 3], [1, 5, 6], [0, 1, 2], lambda t: t == newline) == [0, 1, 2]
    assert divergent_line_labels([1, 2, 9, 3], [1, 2], [0, 1], lambda t: t == newline) == [0, 1]


def test_rejected_span_divergent_line_scores_up_to_the_first_wrong_line(tmp_path, tokenizer, settings):
    chosen = "Goal: count.\nleft: red, 1.\nright: blue, no.\nFinal answer: 1"
    rejected = "Goal: count.\nleft: red, 2.\nright: blue, no.\nFinal answer: 2"
    meta = write_mmpr(tmp_path, [{"image": "red.png", "question": "How many?", "chosen": chosen, "rejected": rejected}])
    recs, _ = read_datasets(load_meta(str(meta)))
    full = PairDataset(recs, tokenizer, settings, 4096)[0]
    cut = PairDataset(recs, tokenizer, settings, 4096, rejected_span="divergent-line")[0]
    assert cut.chosen_labels == full.chosen_labels and cut.rejected_ids == full.rejected_ids
    kept = [t for t, lab in zip(cut.rejected_ids, cut.rejected_labels) if lab != -100]
    assert tokenizer.decode(kept) == "Goal: count.\nleft: red, 2.\n"
    whole = [t for t, lab in zip(full.rejected_ids, full.rejected_labels) if lab != -100]
    assert tokenizer.decode(whole) == rejected
    with pytest.raises(ValueError, match="rejected_span"):
        PairDataset(recs, tokenizer, settings, 4096, rejected_span="half")[0]


def test_a_dotdot_image_path_under_a_symlinked_root_opens_the_file_the_official_join_opens(tmp_path):
    # root is a symlink; "../other/x.png" goes up from the link's target, as os.path.join(root, image) is opened by
    # the official reader (and the OS). A lexical collapse (abspath) took the file beside the link instead.
    real, top = tmp_path / "real", tmp_path / "top"
    (real / "images").mkdir(parents=True)
    (real / "other").mkdir()
    (top / "other").mkdir(parents=True)
    Image.new("RGB", (8, 8), COLORS["red"]).save(real / "other" / "x.png")
    Image.new("RGB", (8, 8), COLORS["blue"]).save(top / "other" / "x.png")  # the wrong one
    (top / "link").symlink_to(real / "images", target_is_directory=True)
    annotation = tmp_path / "pairs.jsonl"
    record = {"image": "../other/x.png", "question": "q", "chosen": "a", "rejected": "b"}
    annotation.write_text(json.dumps(record) + "\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"d": {"root": str(top / "link"), "annotation": str(annotation), "repeat_time": 1}}))
    (record,), _ = read_datasets(load_meta(str(meta)))
    official = os.path.join(str(top / "link"), "../other/x.png")
    assert os.path.samefile(record.images[0], official)
    with Image.open(record.images[0]) as image:
        assert image.convert("RGB").getpixel((0, 0)) == COLORS["red"]


def test_an_annotation_that_is_a_named_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    import threading

    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": str(fifo), "repeat_time": 1}}))
    outcome = []

    def read():
        try:
            read_datasets(load_meta(str(meta)))
            outcome.append("read")
        except InputError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # hung in open(): a writer lets it go on
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
    assert outcome and "is not a regular file" in outcome[0] and str(fifo) in outcome[0]


def test_metadata_that_cannot_name_a_file_is_not_taken_for_a_misnamed_image_or_video(tmp_path):
    """A text-only (or video) SFT record with `"image_id": 4` was refused as "did you mean 'image'?", though an
    integer names no image; the official reader trains it (and `"image": null`, generate's way out, is refused)."""
    write_images(tmp_path / "images")
    (tmp_path / "images" / "frames").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "frames" / "f_1.png")
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    lines = [{"image_id": 4, "conversations": turns}, {"video": "frames", "image_id": 7, "conversations": turns},
             {"image": "red.png", "video_id": 12, "conversations": turns},
             {"images": ["red.png"], "conversations": turns}]  # a path under another name: still refused
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    from internvl_mpo.train.mmpr import SkipReport

    report = SkipReport()
    records = read_sft_records(str(tmp_path / "sft.jsonl"), str(tmp_path / "images"), report=report)
    assert [r.source.line for r in records] == [1, 2, 3]
    assert report.messages == [f"{tmp_path / 'sft.jsonl'}:4: field 'images' is not read; did you mean 'image'?"]


def test_a_misnamed_image_in_another_form_than_a_string_is_still_refused(tmp_path):
    """The metadata exemption ("image_id": 4) took every value that is not a string or a list of strings for one
    that names no file: an image under another name in datasets' form ([{"bytes": null, "path": ...}]), as an
    object, or in a list with a null trained text-only without a word (before, "did you mean 'image'?")."""
    write_images(tmp_path / "images")
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    lines = [{"images": [{"bytes": None, "path": "red.png"}], "conversations": turns},
             {"image_path": {"path": "red.png"}, "conversations": turns},
             {"images": ["red.png", None], "conversations": turns},
             {"image_id": 4, "image_flags": [0, 1], "conversations": turns}]  # names no file: kept
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    from internvl_mpo.train.mmpr import SkipReport

    report = SkipReport()
    records = read_sft_records(str(tmp_path / "sft.jsonl"), str(tmp_path / "images"), report=report)
    assert [r.source.line for r in records] == [4]
    assert [m.split(": ", 1)[1] for m in report.messages] == [
        "field 'images' is not read; did you mean 'image'?", "field 'image_path' is not read; did you mean 'image'?",
        "field 'images' is not read; did you mean 'image'?"]


def test_an_empty_misnamed_media_field_beside_the_record_s_own_is_not_refused(tmp_path):
    meta = write_mmpr(tmp_path, [{"image": "red.png", "videos": [], "question": "q", "chosen": "a", "rejected": "b"},
                                 {"images": None, "question": "t", "chosen": "a", "rejected": "b"},
                                 {"images": ["red.png"], "question": "u", "chosen": "a", "rejected": "b"}])
    records, report = read_datasets(load_meta(str(meta)), skip_bad=True)
    assert sorted(r.question for r in records) == ["q", "t"]
    assert report.messages == [f"{tmp_path / 'toy.jsonl'}:3: field 'images' is not read; did you mean 'image'?"]


def test_corrupt_image_names_file_and_line(tmp_path, tokenizer, settings):
    meta = write_mmpr(tmp_path, [{"image": "broken.png", "question": "q", "chosen": "a", "rejected": "b"}])
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    recs, _ = read_datasets(load_meta(str(meta)))
    item = PairDataset(recs, tokenizer, settings, 4096)[0]
    assert isinstance(item, BadExample) and "toy.jsonl:1:" in item.message and "broken.png" in item.message


def test_an_image_over_max_pixels_names_file_line_and_the_flag(tmp_path, tokenizer, settings):
    """Training read images under Pillow's limit only, and its refusal named a "max_pixels" that train did not take."""
    import dataclasses

    meta = write_mmpr(tmp_path, [{"image": "red.png", "question": "q", "chosen": "a", "rejected": "b"}])
    (tmp_path / "sft.jsonl").write_text(json.dumps({"image": "red.png", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}) + "\n")
    pairs, _ = read_datasets(load_meta(str(meta)))
    sft = read_sft_records(str(tmp_path / "sft.jsonl"), str(tmp_path / "images"))
    red = tmp_path / "images" / "red.png"  # 40 x 30 = 1200 pixels
    for limit, fits in ((1199, False), (1200, True)):
        limited = dataclasses.replace(settings, max_pixels=limit)
        for item, source in [(PairDataset(pairs, tokenizer, limited, 4096)[0], "toy.jsonl"),
                             (PairDataset(pairs, tokenizer, limited, 4096, augment_datasets={"toy"})[0], "toy.jsonl"),
                             (SFTDataset(sft, tokenizer, limited, 4096)[0], "sft.jsonl")]:
            assert isinstance(item, BadExample) != fits
            if not fits:
                assert item.message == (f"{tmp_path / source}:1: {red}: 40x30 = 1200 pixels exceeds the limit of 1199 "
                                        "(possible decompression bomb; a larger --max-pixels allows it)")


def test_typed_image_context_token_names_file_and_line(tmp_path, tokenizer, settings):
    meta = write_mmpr(tmp_path, [{"image": "red.png", "question": "<IMG_CONTEXT> hi", "chosen": "a", "rejected": "b"},
                                 {"question": "q", "chosen": "a", "rejected": "b <IMG_CONTEXT>"}])
    recs, _ = read_datasets(load_meta(str(meta)))
    dataset = PairDataset(sorted(recs, key=lambda r: r.source.line), tokenizer, settings, 4096)
    for line in (1, 2):
        item = dataset[line - 1]
        assert isinstance(item, BadExample) and item.kind == "encode"
        assert item.message == (f"{tmp_path / 'toy.jsonl'}:{line}: the text contains <IMG_CONTEXT> 1 time(s); it is"
                                " reserved for image features")


def test_a_video_placeholder_without_its_one_video_names_file_and_line(tmp_path, tokenizer, settings):
    """`<video>` in a record without a video trained as the literal text (the official reader leaves it so), a
    question about a video the model never saw; a second `<video>` became a second copy of the frames."""
    meta = write_mmpr(tmp_path, [{"question": "<video>\nWhat happens?", "chosen": "a", "rejected": "b"},
                                 {"image": "red.png", "question": "<video>\nq", "chosen": "a", "rejected": "b"},
                                 {"video": "clip.mp4", "question": "<video>\nq <video>", "chosen": "a", "rejected": "b"}])
    (tmp_path / "images" / "clip.mp4").write_bytes(b"")  # refused before it is decoded
    recs, _ = read_datasets(load_meta(str(meta)))
    dataset = PairDataset(sorted(recs, key=lambda r: r.source.line), tokenizer, settings, 4096)
    for line, problem in [(1, "1 <video> placeholder(s) but the record gives no video"),
                          (2, "1 <video> placeholder(s) but the record gives no video"),
                          (3, "2 <video> placeholder(s) but the record gives one video")]:
        item = dataset[line - 1]
        assert isinstance(item, BadExample) and item.kind == "encode"
        assert item.message == f"{tmp_path / 'toy.jsonl'}:{line}: the question holds {problem}"


def test_an_sft_video_placeholder_after_the_first_human_turn_names_file_and_line(tmp_path, tokenizer, settings):
    """`<video>` in a later human turn was trained on as literal text (only the first turn's is filled), with or
    without a video; in the first turn it is taken or refused as before."""
    write_images(tmp_path / "images")
    later = [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A"},
             {"from": "human", "value": "<video>\nAnd now?"}, {"from": "gpt", "value": "B"}]
    lines = [{"conversations": later}, {"image": "blue.png", "conversations": later},
             {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A"}]}]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    dataset = SFTDataset(read_sft_records(str(tmp_path / "sft.jsonl"), str(tmp_path / "images")), tokenizer, settings,
                         4096)
    for line in (1, 2):
        item = dataset[line - 1]
        assert isinstance(item, BadExample) and item.message == (
            f"{tmp_path / 'sft.jsonl'}:{line}: a human turn after the first holds <video>: a video goes in front of "
            "the first human turn only (its <video>, or none)")
    assert not isinstance(dataset[2], BadExample)


def test_a_video_as_a_records_image_is_pointed_to_its_video_field(tmp_path, tokenizer, settings):
    """A video named as a record's "image" (or a picture as its "video") was told to pass it "as a video (video= in
    Python, --video on the command line)": neither is how a training record gives one."""
    pytest.importorskip("av")  # FFmpeg reads the picture given as a video
    meta = write_mmpr(tmp_path, [{"image": "clip.mp4", "question": "<image>\nq", "chosen": "a", "rejected": "b"},
                                 {"video": "red.png", "question": "<video>\nq", "chosen": "a", "rejected": "b"}])
    (tmp_path / "images" / "clip.mp4").write_bytes(b"\0\0\0\x18ftypisom" + bytes(100))
    recs, _ = read_datasets(load_meta(str(meta)))
    dataset = PairDataset(sorted(recs, key=lambda r: r.source.line), tokenizer, settings, 4096)
    for line, field in [(1, "video"), (2, "image")]:
        item = dataset[line - 1]
        assert isinstance(item, BadExample) and item.message.endswith(f"give it as the record's \"{field}\""), item
        assert "--video" not in item.message and "--image" not in item.message


def test_sft_conversations_match_official_masks(tmp_path, chat_folder, tokenizer, settings):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(chat_folder)
    write_images(tmp_path / "images")
    convo = [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "Blue."},
             {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes!"}]
    (tmp_path / "sft.jsonl").write_text(json.dumps({"image": "blue.png", "conversations": convo}) + "\n"
                                        + json.dumps({"conversations": convo[:2]}) + "\n")
    records = read_sft_records(str(tmp_path / "sft.jsonl"), str(tmp_path / "images"))
    dataset = SFTDataset(records, tokenizer, settings, 4096)
    batch = collate_sft([dataset[0], dataset[1]], tokenizer.pad_id)
    tiles = batch.num_tiles.tolist()[0]
    system = TEMPLATES["internvl2_5"].system_message
    question = expand("<image>\nWhat colour?", [tiles], settings.num_image_token)
    segments = [(f"<|im_start|>system\n{system}<|im_end|>\n", False),
                (f"<|im_start|>user\n{question}<|im_end|>\n", False),
                ("<|im_start|>assistant\nBlue.<|im_end|>\n", True),
                ("<|im_start|>user\nSure?<|im_end|>\n", False),
                ("<|im_start|>assistant\nYes!<|im_end|>\n", True)]
    ids, labels = [], []
    for text, supervised in segments:
        seg = hf(text, add_special_tokens=False).input_ids
        ids += seg
        labels += ([-100] * 3 + seg[3:-1] + [-100]) if supervised else [-100] * len(seg)
    n = int(batch.attention_mask[0].sum())
    assert batch.input_ids[0, :n].tolist() == ids
    assert batch.labels[0, :n].tolist() == labels
    assert tiles > 0 and batch.num_tiles.tolist()[1] == 0


def test_sft_image_placeholder_in_answer_or_system_is_text(tmp_path, chat_folder, tokenizer, settings):
    # Only user turns place images (as the official preprocessing expands only human turns): an `<image>`
    # that the system message or the answer mentions is text, and the image still goes in front of the
    # first question (this record was refused, "0 placeholder(s) but 1 image(s)").
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(chat_folder)
    write_images(tmp_path / "images")
    system = "Answer about <image> tags."
    convo = [{"from": "system", "value": system}, {"from": "human", "value": "Which tag shows this?"},
             {"from": "gpt", "value": "An <image> tag."}]
    (tmp_path / "sft.jsonl").write_text(json.dumps({"image": "red.png", "conversations": convo}) + "\n")
    records = read_sft_records(str(tmp_path / "sft.jsonl"), str(tmp_path / "images"))
    item = SFTDataset(records, tokenizer, settings, 4096)[0]
    assert not isinstance(item, BadExample), item
    question = expand("<image>\nWhich tag shows this?", [item.pixel_values.shape[0]], settings.num_image_token)
    assert (item.input_ids, item.labels) == official_segments(hf, question, "An <image> tag.", system)


def test_sft_record_with_an_image_but_no_human_turn_says_which_turn_it_needs(tmp_path):
    """Only a human turn shows images: such a record was refused when encoded, as "the user turns hold 0
    <image> placeholder(s) but 1 image(s)", which named neither the record's problem nor its fix."""
    from internvl_mpo.train.mmpr import SkipReport

    write_images(tmp_path / "images")
    answer = {"from": "gpt", "value": "It is red."}
    lines = [{"image": "red.png", "conversations": [answer]},
             {"image": ["red.png", "blue.png"], "conversations": [{"from": "system", "value": "Be brief."}, answer]},
             {"conversations": [answer]},  # text only: an answer alone trains, as in the official code
             {"image": "red.png", "conversations": [answer, {"from": "human", "value": "And this?"}, answer]},
             {"video": "clip.mp4", "conversations": [answer]}]
    (tmp_path / "images" / "clip.mp4").write_bytes(b"")  # read only when encoded
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    need = ("but no 'human' turn to show {}: a conversation with media needs the question as a human turn, "
            '{{"from": "human", "value": "<question>"}}')
    with pytest.raises(InputError, match=re.escape(f"sft.jsonl:1: the record has an image {need.format('it')}")):
        read_sft_records(str(tmp_path / "sft.jsonl"), str(tmp_path / "images"))
    report = SkipReport()
    records = read_sft_records(str(tmp_path / "sft.jsonl"), str(tmp_path / "images"), report=report)
    assert [r.source.line for r in records] == [3, 4] and report.counts == {"missing_field": 3}
    assert report.messages[1].endswith(f"sft.jsonl:2: the record has 2 images {need.format('them')}")
    assert report.messages[2].endswith(f"sft.jsonl:5: the record has a video {need.format('it')}")


def test_sft_truncation_never_cuts_image_tokens(tmp_path, tokenizer, settings):
    write_images(tmp_path / "images")
    convo = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."},
             {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "Red " * 40}]
    (tmp_path / "sft.jsonl").write_text(json.dumps({"image": "red.png", "conversations": convo}) + "\n")
    records = read_sft_records(str(tmp_path / "sft.jsonl"), str(tmp_path / "images"))
    full = SFTDataset(records, tokenizer, settings, 100_000)[0]
    image_end = full.input_ids.index(tokenizer.img_end_id) + 1
    limit = len(full.input_ids) - 20
    ok = SFTDataset(records, tokenizer, settings, limit)[0]
    assert ok.truncated and ok.input_ids == full.input_ids[:limit] and ok.labels == full.labels[:limit]
    torch.testing.assert_close(ok.pixel_values, full.pixel_values, rtol=0, atol=0)
    bad = SFTDataset(records, tokenizer, settings, image_end - 3)[0]
    assert isinstance(bad, BadExample) and "sft.jsonl:1:" in bad.message
    assert bad.message.endswith(f"cutting it to --max-seq-length {image_end - 3} would cut image tokens; lower"
                                " --max-dynamic-patch or raise --max-seq-length")
    # the first token cut is </img>: refused; one more keeps the image whole
    assert isinstance(SFTDataset(records, tokenizer, settings, image_end - 1)[0], BadExample)
    whole = SFTDataset(records, tokenizer, settings, image_end)[0]
    assert whole.truncated and whole.input_ids == full.input_ids[:image_end]
    assert full.labels[-1] == -100 and full.labels[-2] != -100  # the newline after the last <|im_end|>
    newline = SFTDataset(records, tokenizer, settings, len(full.input_ids) - 1)[0]
    assert not newline.truncated and newline.labels == full.labels[:-1]  # cut, but no answer token lost
    # <img> / </img> typed in an answer are those ids (as in the official tokenizer) but no image: cut as text
    typed = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Red " * 30 + "</img> and <img>" + "Red " * 30}]
    (tmp_path / "typed.jsonl").write_text(json.dumps({"conversations": typed}) + "\n")
    typed = read_sft_records(str(tmp_path / "typed.jsonl"), str(tmp_path / "images"))
    whole_text = SFTDataset(typed, tokenizer, settings, 100_000)[0]
    assert tokenizer.img_end_id in whole_text.input_ids and tokenizer.img_context_id not in whole_text.input_ids
    cut = SFTDataset(typed, tokenizer, settings, whole_text.input_ids.index(tokenizer.img_end_id) - 2)[0]
    assert not isinstance(cut, BadExample) and cut.truncated
    (tmp_path / "text.jsonl").write_text(json.dumps({"conversations": convo[:2]}) + "\n")
    text = read_sft_records(str(tmp_path / "text.jsonl"), str(tmp_path / "images"))
    short = SFTDataset(text, tokenizer, settings, 5)[0]  # the answer starts past token 5
    assert short.message == f"{tmp_path / 'text.jsonl'}:1: no supervised answer token within --max-seq-length 5"


# ----------------------------------------------------------------------------- data_augment


def normalized(tile: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize (ImageNet) of one RGB tile, as float32 ops: (3, S, S)."""
    x = np.asarray(tile.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / np.float32(255)
    mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy((x - mean) / std)


def jpeg_at(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def jpeg_qualities(tiles: torch.Tensor, pieces: list[Image.Image], size: int | None = None) -> list[int]:
    """For each tile, the first quality in 75..100 whose JPEG re-encode of its piece (resized to `size`
    afterwards, if given) reproduces the tile bit for bit; fails the test where none does."""
    assert tiles.shape[0] == len(pieces)
    found = []
    for k, piece in enumerate(pieces):
        match = next((q for q in range(75, 101) if torch.equal(tiles[k], normalized(
            jpeg_at(piece, q) if size is None else jpeg_at(piece, q).resize((size, size))))), None)
        assert match is not None, f"tile {k} is no JPEG re-encode (quality 75..100) of its un-augmented tile"
        found.append(match)
    return found


def test_data_augment_reencodes_every_tile_as_jpeg_at_quality_75_to_100(tmp_path, tokenizer, settings):
    """Official `build_transform(is_train=True)`: each tile dynamic tiling cuts (the thumbnail too), on its
    own draw; chosen and rejected share the one set of tiles."""
    records = [{"image": "grey.png", "question": "What is it?", "chosen": "Noise.", "rejected": "A cat."},
               {"image": ["red.png", "grey.png"], "question": "Compare.", "chosen": "Noise.", "rejected": "Cats."}]
    meta = write_mmpr(tmp_path, records, data_augment=True)
    write_noise_images(tmp_path / "images")
    specs = load_meta(str(meta))
    assert specs[0].data_augment
    recs, _ = read_datasets(specs)
    recs = sorted(recs, key=lambda r: r.source.line)
    augmented = PairDataset(recs, tokenizer, settings, 8192, augment_datasets={"toy"}, seed=7)
    plain = PairDataset(recs, tokenizer, settings, 8192)
    assert augmented.augments and not plain.augments
    s, budget = settings.image_size, settings.max_dynamic_patch
    for index, parts in ((0, [("grey", budget)]), (1, [("red", budget // 2), ("grey", budget // 2)])):
        item, reference = augmented[index], plain[index]
        pieces = [tile for name, max_num in parts for tile in dynamic_preprocess(
            Image.open(tmp_path / "images" / f"{name}.png").convert("RGB"), 1, max_num, s, settings.use_thumbnail)]
        assert item.pixel_values.shape == reference.pixel_values.shape == (len(pieces), 3, s, s)
        assert item.prompt_ids == reference.prompt_ids
        for k, piece in enumerate(pieces):  # un-augmented tiles are the plain normalised pieces
            assert torch.equal(reference.pixel_values[k], normalized(piece))
            assert not torch.equal(item.pixel_values[k], reference.pixel_values[k])
        jpeg_qualities(item.pixel_values, pieces)


def test_data_augment_draws_every_quality_from_75_to_100(monkeypatch):
    """The official `qualities = list(range(75, 101))`, drawn uniformly: 100 included."""
    drawn = []
    monkeypatch.setattr(data, "jpeg_reencode", lambda image, quality: drawn.append(quality))
    augment = jpeg_augment(0, 0, 0)
    for _ in range(2000):
        augment(None)
    assert set(drawn) == set(range(75, 101))


def test_data_augment_is_seeded_by_run_seed_epoch_and_record(tmp_path, tokenizer, settings):
    meta = write_mmpr(tmp_path, color_pairs(4), data_augment=True)
    write_noise_images(tmp_path / "images")
    recs, _ = read_datasets(load_meta(str(meta)))
    grey = next(i for i, r in enumerate(recs) if r.images[0].endswith("grey.png"))

    def tiles(seed: int, epoch: int = 0, index: int = grey) -> torch.Tensor:
        dataset = PairDataset(recs, tokenizer, settings, 8192, augment_datasets={"toy"}, seed=seed)
        return dataset.at_epoch(epoch)[index].pixel_values

    first = tiles(7)
    assert first.shape[0] > 2
    assert torch.equal(first, tiles(7)) and torch.equal(first, tiles(7, epoch=0))  # reproducible
    for other in (tiles(8), tiles(7, epoch=1)):  # another seed or epoch draws other qualities
        assert other.shape == first.shape and not torch.equal(other, first)
    # the draws are one generator per (seed, epoch, record), one quality per tile in tile order
    pieces = dynamic_preprocess(Image.open(recs[grey].images[0]).convert("RGB"), 1, settings.max_dynamic_patch,
                                settings.image_size, settings.use_thumbnail)
    augment = jpeg_augment(7, 0, grey)
    assert torch.equal(first, torch.stack([normalized(augment(p)) for p in pieces]))


def test_data_augment_reencodes_whole_video_frames_before_their_resize(tmp_path, settings):
    """The official video branch runs the transform on each frame, JPEG first, then the resize to one tile."""
    folder = write_noise_images(tmp_path / "frames")
    video_settings = MediaSettings(**{**settings.__dict__, "video_frames": 2})
    plain, _, _ = load_media((), False, str(folder), "q", video_settings)
    augmented, tiles, question = load_media((), False, str(folder), "q", video_settings,
                                            augment=jpeg_augment(3, 0, 0))
    assert tiles == [1, 1] and question.startswith("Frame1: <image>\nFrame2: <image>\n")
    assert augmented.shape == plain.shape and not torch.equal(augmented, plain)
    # the folder's frames in name order are blue, green, grey, red: 2 segments of 4 take frames 0 and 2
    frames = [Image.open(folder / f"{name}.png").convert("RGB") for name in ("blue", "grey")]
    assert torch.equal(plain, torch.stack([normalized(f.resize((settings.image_size,) * 2)) for f in frames]))
    jpeg_qualities(augmented, frames, size=settings.image_size)


# ----------------------------------------------------------------------------- a video given as a folder of frames


def frames_folder_pairs(root: Path, videos: list[str]) -> Path:
    """An MMPR set of one pair per entry of `videos`, each a folder under images/; "clip" holds the four noise
    frames of `write_noise_images`, and the question puts the video first as the data does."""
    meta = write_mmpr(root, [{"video": video, "question": f"<video>\nWhat happens {k}?", "chosen": "Bars grow.",
                              "rejected": "Nothing."} for k, video in enumerate(videos)])
    write_noise_images(root / "images" / "clip")
    return meta


def test_video_frames_follow_the_runs_max_seq_length(tmp_path, tokenizer, settings, monkeypatch):
    """load_video refused more frames than fill InternVL2.5's 32768 positions (8192 of this model's 4-token tiles)
    whatever --max-seq-length a model with a longer context allowed, naming load_video's num_segments; its cap is
    now the run's --max-seq-length, and its refusal names --video-frames."""
    import internvl_mpo.train.data as data_module

    (record,) = read_datasets(load_meta(str(frames_folder_pairs(tmp_path, ["clip/"]))))[0]
    frames = 32768 // settings.num_image_token
    example = encode_pair(record, tokenizer, MediaSettings(**{**settings.__dict__, "video_frames": frames}), 131072)
    assert example.pixel_values.shape[0] == frames
    # the check on the frames' tokens and their <img> </img> refuses first; load_video's cap, behind it, as named
    monkeypatch.setattr(data_module, "_check_video_length", lambda *args: None)
    sixteen = MediaSettings(**{**settings.__dict__, "video_frames": 16})
    with pytest.raises(InputError) as error:
        encode_pair(record, tokenizer, sixteen, 64)
    assert str(error.value) == (f"{record.source}: --video-frames must be at most 15, got 16: more frames of 4 image "
                                "tokens (a 56-pixel tile) fill the 64-token context")


def test_a_video_folder_of_frames_encodes_the_frames_load_video_samples(tmp_path, tokenizer, settings):
    """A record whose video is a folder of frame images was refused in training ("video is a folder, not a file");
    it takes the --video-frames frames load_video samples from the folder, with a video file's prompt."""
    meta = frames_folder_pairs(tmp_path, ["clip/"])
    (record,) = read_datasets(load_meta(str(meta)))[0]
    three = MediaSettings(**{**settings.__dict__, "video_frames": 3})
    frames = load_video(tmp_path / "images" / "clip", num_segments=3, image_size=settings.image_size)
    example = encode_pair(record, tokenizer, three, 8192)
    assert torch.equal(example.pixel_values, frames.pixel_values) and frames.pixel_values.shape[0] == 3
    prompt = build_pair_ids(tokenizer, frames.prefix + "What happens 0?", "Bars grow.", "Nothing.", [1, 1, 1],
                            num_image_token=settings.num_image_token).prompt_ids
    assert example.prompt_ids == prompt
    convo = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "Bars grow."}]
    (tmp_path / "sft.jsonl").write_text(json.dumps({"video": "clip", "conversations": convo}) + "\n")
    (sft,) = SFTDataset(read_sft_records(str(tmp_path / "sft.jsonl"), str(tmp_path / "images")), tokenizer, three,
                        8192)
    assert torch.equal(sft.pixel_values, frames.pixel_values)
    assert "Frame3: <img>" in tokenizer.decode(sft.input_ids, skip_special_tokens=False)


def test_the_media_digest_covers_a_video_folders_frames(tmp_path):
    """The precomputed reference's media digest hashed a folder as "unreadable" whatever its frames held: a frame
    edited, added, removed or renamed must change it, a file that is no frame must not."""
    meta = frames_folder_pairs(tmp_path, ["clip"])
    records, _ = read_datasets(load_meta(str(meta)))
    clip = tmp_path / "images" / "clip"
    seen = [media_digest(records, DistEnv())]
    (clip / "notes.txt").write_text("not a frame: load_video does not read it")
    assert media_digest(records, DistEnv()) == seen[0]
    for change in (lambda: Image.new("RGB", (30, 60), (1, 2, 3)).save(clip / "blue.png"),
                   lambda: Image.new("RGB", (8, 8), (9, 9, 9)).save(clip / "white.png"),
                   lambda: (clip / "green.png").unlink(),
                   lambda: (clip / "red.png").rename(clip / "rose.png"),
                   lambda: [p.unlink() for p in clip.glob("*.png")]):  # no frames left: no error, a digest still
        change()
        seen.append(media_digest(records, DistEnv()))
        assert seen[-1] not in seen[:-1]


def test_a_video_folder_of_frames_trains_a_step_and_one_without_frames_is_a_bad_record(tmp_path, chat_folder):
    meta = frames_folder_pairs(tmp_path / "data", ["clip/", "notes", "clip"])
    (tmp_path / "data" / "images" / "notes").mkdir()
    (tmp_path / "data" / "images" / "notes" / "read_me.txt").write_text("no frames here")
    run = TrainConfig(model=str(chat_folder), data=str(meta), output=str(tmp_path / "a"), max_steps=1, batch_size=2,
                      video_frames=2, lr=1e-3, warmup_ratio=0.0, drop_path_rate=0.0, grad_checkpointing=False,
                      progress=False)
    annotation = tmp_path / "data" / "toy.jsonl"
    with pytest.raises(InputError, match=rf"^{annotation}:2: video folder has no image files to use as video frames: "
                                         rf"{tmp_path / 'data' / 'images' / 'notes'}$"):
        train(run)
    result = train(dataclasses.replace(run, output=str(tmp_path / "b"), skip_bad=True))
    assert result.skipped.counts == {"missing_file": 1}
    (row,) = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and math.isfinite(row["loss"]) and row["grad_norm"] > 0


def test_a_dotdot_path_without_a_symlink_is_spelt_as_before_so_that_older_checkpoints_resume(tmp_path, monkeypatch):
    # records' file:line sources and media paths go into share_sha256 and the --precompute-ref cache: a meta.json
    # naming "../data/pairs.jsonl" from the working directory kept its `..` (9d30922), so a run's checkpoint
    # written before was refused ("process 0 would read other records than the checkpoint's run")
    data, run = tmp_path / "data", tmp_path / "run"
    write_mmpr(data, color_pairs(2))
    run.mkdir()
    monkeypatch.chdir(run)
    (run / "meta.json").write_text(json.dumps({"toy": {"root": "../data/images", "annotation": "../data/toy.jsonl",
                                                       "repeat_time": 1}}))
    (spec,) = load_meta("meta.json")
    assert (spec.root, spec.annotation) == (str(data / "images"), str(data / "toy.jsonl"))
    records, _ = read_datasets([spec])
    assert str(records[0].source) == f"{data / 'toy.jsonl'}:1"
    assert records[0].images == (str(data / "images" / "red.png"),)
