"""Tests for internvl_mpo.train.mmpr: meta round trips, repeat_time, shuffle order, validation.

The order test compares with the official `build_datasets` / `LazySupervisedDataset.__init__`
algorithm written out below on raw line strings (Python `random.sample` from one generator seeded
42 across datasets, list repetition, `numpy.random.default_rng(dataset_index).shuffle`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re

import numpy as np
import pytest

from internvl_mpo.errors import InputError
from internvl_mpo.train.mmpr import (
    DatasetSpec,
    SkipReport,
    load_meta,
    read_datasets,
    read_records,
    read_sft_records,
    write_meta,
)


def _pair(k: int, **extra) -> dict:
    return {"question": f"q{k}", "chosen": f"good {k}", "rejected": f"bad {k}", **extra}


def _write_jsonl(path, items) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items)
    return str(path)


@pytest.fixture
def root(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "notes").mkdir()
    for name in ("a.jpg", "b.jpg", "sub/c.png", "clip.mp4", "notes/read_me.txt"):
        (images / name).write_bytes(b"x")
    return str(images)


def _spec(tmp_path, root, items, name="ds", repeat_time=1.0) -> DatasetSpec:
    ann = _write_jsonl(tmp_path / f"{name}.jsonl", items)
    return DatasetSpec(name=name, root=root, annotation=ann, repeat_time=repeat_time)


# ----------------------------------------------------------------------------- meta.json


def test_meta_round_trip(tmp_path):
    specs = [
        DatasetSpec("m3cot_pairs", str(tmp_path / "img"), str(tmp_path / "a.jsonl"), 0.5, False, None, 120),
        DatasetSpec("other", "s3://bucket/imgs/", str(tmp_path / "b.jsonl"), 2.0, True, 6, None),
    ]
    meta = tmp_path / "meta.json"
    write_meta(str(meta), specs)
    assert load_meta(str(meta)) == specs
    raw = json.loads(meta.read_text())
    assert list(raw) == ["m3cot_pairs", "other"]
    assert "max_dynamic_patch" not in raw["m3cot_pairs"] and raw["other"]["max_dynamic_patch"] == 6
    with pytest.raises(InputError, match="given twice"):
        write_meta(str(meta), [specs[0], specs[0]])


def test_write_meta_makes_missing_folders_and_names_a_path_it_cannot_write(tmp_path):
    """A meta.json for a new run folder failed with a bare FileNotFoundError."""
    specs = [DatasetSpec("d", str(tmp_path / "img"), str(tmp_path / "d.jsonl"), length=3)]
    meta = tmp_path / "runs" / "mix" / "meta.json"
    write_meta(str(meta), specs)
    assert load_meta(str(meta)) == specs
    (tmp_path / "a-file").write_text("")
    for path, reason in ((tmp_path / "a-file" / "meta.json", "Not a directory"), (tmp_path / "runs", "Is a directory")):
        with pytest.raises(InputError, match=re.escape(f"{path}: cannot write the meta file ({reason})")):
            write_meta(str(path), specs)


def test_meta_relative_paths_resolve_against_base_dir(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"d": {"root": "MMPR/images", "annotation": "MMPR/annotations/d.jsonl",
                                      "data_augment": False, "repeat_time": 1, "length": 3}}))
    (spec,) = load_meta(str(meta), base_dir=str(tmp_path))
    assert spec.root == os.path.join(str(tmp_path), "MMPR", "images")
    assert spec.annotation == os.path.join(str(tmp_path), "MMPR", "annotations", "d.jsonl")
    assert spec.repeat_time == 1.0 and isinstance(spec.repeat_time, float) and spec.length == 3


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"d": 3}', "expected an object"),
        ('{"d": {"annotation": "a.jsonl", "repeat_time": 1}}', "missing required field 'root'"),
        ('{"d": {"root": "r", "repeat_time": 1}}', "missing required field 'annotation'"),
        ('{"d": {"root": "r", "annotation": "a.jsonl"}}', "missing required field 'repeat_time'"),
        ('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": "2"}}', "'repeat_time' must be int or float"),
        ('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": true}}', "'repeat_time' must be int or float"),
        ('{"d": {"root": "r", "annotation": "a.json", "repeat_time": 1}}', "must be a .jsonl"),
        ('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": -1}}', "repeat_time must be a number from 0 to"),
        # NaN trained as 1 (MPO) and failed in int() (SFT); infinity and 1e300 raised OverflowError while reading
        *[('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": %s}}' % v,
           r"dataset 'd': repeat_time must be a number from 0 to 10000, got ") for v in ("NaN", "Infinity", "1e300")],
        ('{"note": ' + "[" * 5000 + "]" * 5000 + "}", "its JSON is nested too deeply to read"),  # RecursionError
        ('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": 1, "data_augment": "no"}}', "'data_augment'"),
        ('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": 1, "max_dynamic_patch": 0}}', "max_dynamic_patch"),
        # planning a grid of up to 10**9 tiles filled the memory
        ('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": 1, "max_dynamic_patch": 1000000000}}',
         "dataset 'd': max_dynamic_patch must be from 1 to 10000, got 1000000000"),
        # json.load keeps the last of two equal keys: a dataset named twice would silently be dropped
        ('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": 1},\n "d": {"root": "r", "annotation": "b.jsonl",'
         ' "repeat_time": 1}}', "'d' appears twice"),
        ('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": 1, "root": "s"}}', "'root' appears twice"),
        # a misspelt optional field was ignored: the dataset trained without augmentation, or with the default tiles
        ('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": 1, "data_augmentation": true}}',
         "dataset 'd': field 'data_augmentation' is not read; did you mean 'data_augment'"),
        ('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": 1, "max_dynamic_patches": 1}}',
         "field 'max_dynamic_patches' is not read; did you mean 'max_dynamic_patch'"),
        # a setting of its own, no misspelling: it was told "did you mean 'max_dynamic_patch'?"
        ('{"d": {"root": "r", "annotation": "a.jsonl", "repeat_time": 1, "min_dynamic_patch": 2}}',
         r"field 'min_dynamic_patch' is not read: a meta.json entry sets max_dynamic_patch only \(as in the official "
         r"reader\); remove it$"),
    ],
)
def test_meta_errors_name_file_and_problem(tmp_path, content, problem):
    meta = tmp_path / "meta.json"
    meta.write_text(content)
    with pytest.raises(InputError, match=problem) as err:
        load_meta(str(meta))
    assert str(meta) in str(err.value)


def test_missing_meta_and_annotation_files(tmp_path, root):
    with pytest.raises(InputError, match="meta file not found"):
        load_meta(str(tmp_path / "nope.json"))
    spec = DatasetSpec("d", root, str(tmp_path / "nope.jsonl"))
    with pytest.raises(InputError, match="nope.jsonl: annotation file not found"):
        read_records(spec, 0)
    # A folder where a file belongs (the pairs' output folder given as --data) is named, not an OSError.
    (tmp_path / "pairs").mkdir()
    with pytest.raises(InputError, match=r"pairs: is a folder; give the meta.json file"):
        load_meta(str(tmp_path / "pairs"))
    (tmp_path / "ann.jsonl").mkdir()
    with pytest.raises(InputError, match=r"ann.jsonl: is a folder, not an annotation file"):
        read_records(DatasetSpec("d", root, str(tmp_path / "ann.jsonl")), 0)
    with pytest.raises(InputError, match=r"ann.jsonl: is a folder, not an annotation file"):
        read_sft_records(str(tmp_path / "ann.jsonl"), root)


# ----------------------------------------------------------------------------- records


def test_record_fields_and_media_branches(tmp_path, root):
    items = [
        _pair(0, image="a.jpg"),
        _pair(1, image=["a.jpg", "sub/c.png"]),
        _pair(2, image=["b.jpg"]),
        _pair(3),
        _pair(4, image="", video="clip.mp4"),
        _pair(5, image=[], video=""),
        _pair(6, image=os.path.join(root, "b.jpg"), answer_gt="B", chosen_meta={"x": 1}),
    ]
    spec = _spec(tmp_path, root, items)
    records = sorted(read_records(spec, 0), key=lambda r: r.source.line)
    assert [r.question for r in records] == [f"q{k}" for k in range(7)]
    r0, r1, r2, r3, r4, r5, r6 = records
    assert r0.images == (os.path.join(root, "a.jpg"),) and not r0.multi_image
    assert r0.chosen == "good 0" and r0.rejected == "bad 0" and r0.dataset == "ds"
    assert r0.source.file == spec.annotation and r0.source.line == 1 and str(r0.source) == f"{spec.annotation}:1"
    assert r1.images == (os.path.join(root, "a.jpg"), os.path.join(root, "sub", "c.png")) and r1.multi_image
    assert r2.multi_image and len(r2.images) == 1  # a one-element list still takes the multi-image branch
    assert r3.images == () and r3.video is None
    assert r4.images == () and r4.video == os.path.join(root, "clip.mp4")
    assert r5.images == () and r5.video is None
    assert r6.images == (os.path.join(root, "b.jpg"),)
    assert all(os.path.isabs(p) for r in records for p in r.images)


def test_a_video_that_is_a_folder_of_frames_is_read_as_the_records_video(tmp_path, root):
    """Training refused a folder of frames as a record's video ("video is a folder, not a file"), where chat and the
    server read one and the official trainer reads a path that ends in '/' as one."""
    spec = _spec(tmp_path, root, [_pair(0, video="sub"), _pair(1, video="sub/"), _pair(2, video=f"{root}/sub")])
    records = read_records(spec, 0)
    assert len(records) == 3 and {r.video for r in records} == {os.path.join(root, "sub")}
    convo = [{"from": "human", "value": "<video>\nhi"}, {"from": "gpt", "value": "yo"}]
    (record,) = read_sft_records(_write_jsonl(tmp_path / "sft.jsonl", [{"video": "sub/", "conversations": convo}]),
                                 root)
    assert record.video == os.path.join(root, "sub") and record.images == ()


def test_fields_beside_the_image_that_are_not_another_name_for_it_are_ignored(tmp_path, root):
    """Ids and metadata beside an image (or beside "image": "", text only) are not taken for a misnamed image."""
    spec = _spec(tmp_path, root, [_pair(0, image="a.jpg", image_id=3, images_meta="x", answer_gt="B"),
                                  _pair(1, image="", image_id=4, source="web"),
                                  _pair(2, image="a.jpg", video_id="v_abc", image_id="img-7"),  # string ids
                                  _pair(3, image="", video_id="v_abc")])
    images = {r.question: r.images for r in read_records(spec, 0)}
    assert images == {"q0": (os.path.join(root, "a.jpg"),), "q1": (), "q2": (os.path.join(root, "a.jpg"),), "q3": ()}
    # a string that could name a file still is another name for the image: with a folder or an extension
    for misnamed in ({"images": "b.png"}, {"image_path": "sub/b"}, {"img": "a.jpg"}, {"video_id": "v.mp4"}):
        with pytest.raises(InputError, match=f"field {next(iter(misnamed))!r} is not read"):
            read_records(_spec(tmp_path, root, [_pair(0, image="", **misnamed)]), 0)


def test_a_misnamed_field_naming_a_frames_folder_or_a_file_without_extension_is_refused(tmp_path, root):
    """A plain name (no folder, no extension) was never taken for a path: "videos": "v_abc" naming the record's
    folder of frames (or an image saved without an extension) trained the record as text, without a word. It is a
    path where it names something under the root; an id that names nothing there stays ignored."""
    (tmp_path / "images" / "photo").write_bytes(b"x")
    for misnamed in ({"videos": "notes"}, {"video_path": ["notes"]}, {"images": ["photo"]}, {"image_file": "photo"}):
        for base in ({}, {"image": ""}):
            with pytest.raises(InputError, match=f"field {next(iter(misnamed))!r} is not read"):
                read_records(_spec(tmp_path, root, [_pair(0, **base, **misnamed)]), 0)
    spec = _spec(tmp_path, root, [_pair(0, image="a.jpg", video_id="v_abc", image_id="photo"), _pair(1, video_id="x")])
    assert [r.images for r in read_records(spec, 0)] == [(os.path.join(root, "a.jpg"),), ()]


def test_s3_images_are_root_prefixed(tmp_path, root):
    spec = _spec(tmp_path, "s3://bucket/", [_pair(0, image="s3://x/y.jpg")])
    with pytest.raises(InputError, match="s3://bucket/s3://x/y.jpg"):
        read_records(spec, 0)


@pytest.mark.parametrize("n_lines, repeat_time, expected_len, copies", [
    (10, 1.0, 10, 1), (10, 0.5, 5, 1), (7, 0.3, 2, 1), (7, 0.5, 3, 1), (10, 2.0, 20, 2), (10, 2.7, 20, 2),
    (10, 0.0, 0, 0),
])
def test_repeat_time(tmp_path, root, n_lines, repeat_time, expected_len, copies):
    """<1 keeps int(n * r) distinct lines; >1 repeats int(r) times (fraction dropped, as the official code)."""
    spec = _spec(tmp_path, root, [_pair(k) for k in range(n_lines)], repeat_time=repeat_time)
    records = read_records(spec, 3)
    assert len(records) == expected_len
    counts = {q: sum(r.question == q for r in records) for q in {r.question for r in records}}
    assert all(c == copies for c in counts.values())
    if repeat_time >= 1:
        assert len(counts) == n_lines


def _official_order(specs: list[DatasetSpec], seed: int = 42) -> list[str]:
    """build_datasets + LazySupervisedDataset.__init__ on raw lines, then the question of each."""
    rng = random.Random(seed)  # stands for the global `random` after set_seed(42)
    out = []
    for ds_idx, spec in enumerate(specs):
        with open(spec.annotation) as f:
            raw = f.readlines()
        if spec.repeat_time < 1:
            raw = rng.sample(raw, k=int(len(raw) * spec.repeat_time))
        if spec.repeat_time > 1:
            raw = raw * int(spec.repeat_time)
        np.random.default_rng(seed=ds_idx).shuffle(raw)
        out += [json.loads(line)["question"] for line in raw]
    return out


def test_order_matches_official_algorithm_and_is_deterministic(tmp_path, root):
    specs = [
        _spec(tmp_path, root, [_pair(k) for k in range(30)], name="a", repeat_time=0.4),
        _spec(tmp_path, root, [_pair(k) for k in range(100, 112)], name="b", repeat_time=2.0),
        _spec(tmp_path, root, [_pair(k) for k in range(200, 225)], name="c", repeat_time=0.6),
        _spec(tmp_path, root, [_pair(k) for k in range(300, 309)], name="d", repeat_time=1),
    ]
    records, report = read_datasets(specs)
    questions = [r.question for r in records]
    assert questions == _official_order(specs)
    assert report.total == 0
    assert [r.question for r in read_datasets(specs)[0]] == questions  # deterministic
    assert [r.dataset for r in records] == ["a"] * 12 + ["b"] * 24 + ["c"] * 15 + ["d"] * 9
    # the numpy shuffle is seeded by the dataset's index: the same file at another index reorders
    alone = [r.question for r in read_records(specs[3], 0)]
    assert sorted(alone) == sorted(questions[-9:]) and alone != questions[-9:]
    assert [r.question for r in read_records(specs[3], 3)] == questions[-9:]


# ----------------------------------------------------------------------------- validation


BAD_LINES = [
    ("{\"question\": \"q\", \"chosen\": ", "json", "malformed JSON"),
    ("[1, 2, 3]", "json", "expected a JSON object, got list"),
    (json.dumps({"chosen": "c", "rejected": "r"}), "missing_field", "missing required field 'question'$"),
    # JSON keeps the last of two equal keys: the pair trained on an answer the line also gave otherwise
    ('{"question": "q", "chosen": "c", "rejected": "r", "chosen": "d"}', "json",
     r"field 'chosen' appears twice \(JSON keeps only the last\)$"),
    # SFT data given to mpo/dpo: the message says which command reads such records
    (json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}), "missing_field",
     r"missing required field 'question' \(a conversation record: train sft reads those\)$"),
    (json.dumps({"question": "q", "rejected": "r"}), "missing_field", "missing required field 'chosen'"),
    (json.dumps({"question": "q", "chosen": "c"}), "missing_field", "missing required field 'rejected'"),
    (json.dumps({"question": 3, "chosen": "c", "rejected": "r"}), "wrong_type", "field 'question' must be a string, got int"),
    (json.dumps(_pair(0, chosen=["c"])), "wrong_type", "field 'chosen' must be a string, got list"),
    # an object was named by the reader's own class ("got _Object")
    (json.dumps(_pair(0, rejected={"a": 1})), "wrong_type", "field 'rejected' must be a string, got dict"),
    (json.dumps(_pair(0, chosen="")), "empty_answer", "field 'chosen' is empty"),
    (json.dumps(_pair(0, rejected=" \n")), "empty_answer", "field 'rejected' is empty"),
    (json.dumps(_pair(0, rejected=_pair(0)["chosen"])), "same_answers", "'chosen' and 'rejected' are the same text"),
    (json.dumps(_pair(0, image=5)), "wrong_type", "field 'image' must be a string or a list of strings"),
    (json.dumps(_pair(0, image=None)), "wrong_type", "field 'image' must be a string or a list of strings"),
    (json.dumps(_pair(0, image=["a.jpg", 1])), "wrong_type", "field 'image' must be a string or a list of strings"),
    (json.dumps(_pair(0, video=7)), "wrong_type", "field 'video' must be a string"),
    (json.dumps(_pair(0, image="missing.jpg")), "missing_file", "image file not found: .*missing.jpg"),
    (json.dumps(_pair(0, image=["a.jpg", "gone.png"])), "missing_file", "image file not found: .*gone.png"),
    # a folder was named "image file not found", which sends one looking for a file that is there
    (json.dumps(_pair(0, image="sub")), "missing_file", "image is a folder, not a file: .*sub$"),
    # a device was "not found"
    (json.dumps(_pair(0, image="/dev/zero")), "missing_file", "image is not a regular file: /dev/zero$"),
    # a video's folder is its frames (as chat reads one): a folder without frame images has none to train on
    (json.dumps(_pair(0, video="notes")), "missing_file",
     "video folder has no image files to use as video frames: .*notes$"),
    # an empty name in a list named the images' root folder ("image file not found: /data/images")
    (json.dumps(_pair(0, image=["a.jpg", ""])), "wrong_type", r"field 'image' lists an empty path: \['a.jpg', ''\]$"),
    (json.dumps(_pair(0, video="none.mp4")), "missing_file", "video file not found"),
    # the official reader trains the image and drops the video: the pair trained without the video it names
    (json.dumps(_pair(0, image="a.jpg", video="clip.mp4")), "image_and_video",
     "the record gives both 'image' and 'video'"),
    # another name for 'image' or 'video' was ignored and the pair trained without its image
    (json.dumps(_pair(0, images=["a.jpg"])), "unread_field", r"field 'images' is not read; did you mean 'image'\?$"),
    (json.dumps(_pair(0, image_path="a.jpg")), "unread_field", r"field 'image_path' is not read; did you mean 'image'\?$"),
    (json.dumps(_pair(0, imgae="a.jpg")), "unread_field", r"field 'imgae' is not read; did you mean 'image'\?$"),
    (json.dumps(_pair(0, video_file="clip.mp4")), "unread_field",
     r"field 'video_file' is not read; did you mean 'video'\?$"),
    # beside an empty 'image' (or 'video') the other name was not flagged, and the pair trained without its image
    (json.dumps(_pair(0, image="", images=["a.jpg"])), "unread_field",
     r"field 'images' is not read; did you mean 'image'\?$"),
    (json.dumps(_pair(0, image=[], video="", video_path="clip.mp4")), "unread_field",
     r"field 'video_path' is not read; did you mean 'video'\?$"),
]


@pytest.mark.parametrize("bad, kind, problem", BAD_LINES)
def test_bad_line_raises_with_file_and_line(tmp_path, root, bad, kind, problem):
    spec = _spec(tmp_path, root, [_pair(0), _pair(1), bad, _pair(3)])
    with pytest.raises(InputError, match=f"^{re.escape(spec.annotation)}:3: {problem}"):
        read_records(spec, 0)
    report = SkipReport()
    records = read_records(spec, 0, report=report)
    assert sorted(r.question for r in records) == ["q0", "q1", "q3"]
    assert report.counts == {kind: 1} and report.total == 1
    assert report.messages[0].startswith(f"{spec.annotation}:3: ")


def test_blank_lines_are_skipped_keeping_line_numbers_and_the_official_order(tmp_path, root):
    """A blank line (one at the end of a file too: "...}\n\n") stopped training as an "empty line". It is
    skipped; the lines after it keep their numbers, and sampling and shuffling still run over every line, as
    the official reader's `readlines()` counts them, so the records come in the official order."""
    items = ["", _pair(0), "  \t", _pair(1), "\r", _pair(2), _pair(3), ""]
    spec = _spec(tmp_path, root, items, repeat_time=0.75)
    records = read_records(spec, 0, sample_rng=random.Random(42))
    with open(spec.annotation) as f:
        raw = f.readlines()
    raw = random.Random(42).sample(raw, k=int(len(raw) * 0.75))
    np.random.default_rng(seed=0).shuffle(raw)
    assert [r.question for r in records] == [json.loads(line)["question"] for line in raw if line.strip()]
    assert sorted(r.source.line for r in read_records(dataclasses.replace(spec, repeat_time=1), 0)) == [2, 4, 6, 7]
    bad = _spec(tmp_path, root, ["", _pair(0), "", "{oops", ""], name="bad")
    with pytest.raises(InputError, match=f"^{re.escape(bad.annotation)}:4: malformed JSON"):
        read_records(bad, 0)
    sft = tmp_path / "sft.jsonl"
    turns = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    sft.write_text(f"\n{json.dumps(turns)}\n \n{json.dumps(turns)}\n\n")
    assert [r.source.line for r in read_sft_records(str(sft), root)] == [2, 4]


def test_lines_end_where_the_official_readlines_ends_them(tmp_path, root):
    """An annotation file with CR line ends (classic Mac) was one line, refused as malformed JSON ("Extra data"):
    the official reader's readlines() in text mode ends lines at LF, CRLF and a lone CR."""
    path = tmp_path / "cr.jsonl"
    path.write_bytes(b"\r".join(json.dumps(_pair(k)).encode() for k in range(3)) + b"\r\n"
                     + json.dumps(_pair(3)).encode() + b"\n")
    records = read_records(DatasetSpec("cr", root, str(path)), 0)
    with open(path) as f:
        official = [json.loads(line)["question"] for line in f.readlines()]
    assert sorted((r.source.line, r.question) for r in records) == list(enumerate(official, 1))
    assert len(official) == 4


def test_a_key_given_twice_where_nothing_reads_it_is_left_be(tmp_path, root):
    """MMPR records carry objects nothing reads (`chosen_meta`): a key given twice there refused the whole record,
    which the official reader trains on. A read field given twice is still refused (BAD_LINES)."""
    line = '{"question": "q", "chosen": "c", "rejected": "r", "chosen_meta": {"question": "a", "question": "b"}}'
    (record,) = read_records(DatasetSpec("a", root, _write_jsonl(tmp_path / "a.jsonl", [line])), 0)
    assert (record.question, record.chosen, record.rejected) == ("q", "c", "r")


def test_non_utf8_line(tmp_path, root):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(json.dumps(_pair(0)).encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(InputError, match=f"{path}:2: not UTF-8"):
        read_records(DatasetSpec("b", root, str(path)), 0)


def test_meta_json_not_utf8_says_so_as_other_json_files(tmp_path):
    """A meta.json in Latin-1 was "not valid JSON ('utf-8' codec can't decode ...)"; it is said as config.json and
    the other JSON files say it (jsonl.json_problem)."""
    meta = tmp_path / "meta.json"
    meta.write_bytes('{"caf\xe9": {}}'.encode("latin-1"))
    with pytest.raises(InputError, match=re.escape(f"{meta}: not UTF-8 text (invalid continuation byte at byte 5)")):
        load_meta(str(meta))


def test_files_saved_with_a_byte_order_mark_read_as_without(tmp_path, root):
    """Windows editors save "UTF-8 with BOM": the meta.json was refused as not valid JSON and the first
    line of an annotation or SFT file as malformed, where `pairs` and `eval` read the same files."""
    bom = b"\xef\xbb\xbf"
    ann = tmp_path / "ann.jsonl"
    ann.write_bytes(bom + b"".join(json.dumps(_pair(k)).encode() + b"\n" for k in range(2)))
    meta = tmp_path / "meta.json"
    meta.write_bytes(bom + json.dumps({"ds": {"root": root, "annotation": str(ann), "repeat_time": 1}}).encode())
    records, _ = read_datasets(load_meta(str(meta)))
    assert sorted(r.question for r in records) == ["q0", "q1"]
    sft = tmp_path / "sft.jsonl"
    sft.write_bytes(bom + json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                                        {"from": "gpt", "value": "yo"}]}).encode() + b"\n")
    (record,) = read_sft_records(str(sft), root)
    assert record.conversations[0] == {"from": "human", "value": "hi"}


def test_skip_bad_counts_and_keeps_first_messages(tmp_path, root):
    lines = [_pair(0)] + ["{oops"] * 4 + [_pair(0, image="nope.jpg")] * 3 + [json.dumps({"question": "q"})] + [_pair(9)]
    spec = _spec(tmp_path, root, lines, repeat_time=2.0)
    records, report = read_datasets([spec], skip_bad=True)
    assert sorted(r.question for r in records) == ["q0", "q0", "q9", "q9"]
    # each bad line counts once, however often repetition selects it
    assert report.counts == {"json": 4, "missing_file": 3, "missing_field": 1}
    assert report.total == 8
    assert report.messages == [f"{spec.annotation}:{n}: malformed JSON (Expecting property name enclosed in "
                               f"double quotes at column 2)" for n in (2, 3, 4, 5)] + [
        f"{spec.annotation}:6: image file not found: {os.path.join(root, 'nope.jpg')}"]
    with pytest.raises(InputError, match=f"{spec.annotation}:2: malformed JSON"):
        read_datasets([spec])


def test_a_root_that_is_no_folder_is_named_with_the_missing_file(tmp_path, root):
    """A wrong meta.json `root` made every record "image file not found: <root>/a.jpg", with nothing saying that
    the root itself is not there."""
    (tmp_path / "a_file").write_text("x")
    for bad, why in [(tmp_path / "nope", "does not exist"), (tmp_path / "a_file", "is a file, not a folder")]:
        for record, kind, name in [(_pair(0, image="a.jpg"), "image", "a.jpg"),
                                   (_pair(0, video="clip.mp4"), "video", "clip.mp4")]:
            spec = _spec(tmp_path, str(bad), [record])
            with pytest.raises(InputError) as error:
                read_records(spec, 0)
            assert str(error.value) == (f"{spec.annotation}:1: {kind} file not found: {bad / name} (the folder it is"
                                        f" read from, {bad}, {why})")
    # an absolute path does not come from the root: no word about it
    spec = _spec(tmp_path, str(tmp_path / "nope"), [_pair(0, image=str(tmp_path / "gone.jpg"))])
    with pytest.raises(InputError) as error:
        read_records(spec, 0)
    assert str(error.value) == f"{spec.annotation}:1: image file not found: {tmp_path / 'gone.jpg'}"


def test_subsampled_out_lines_are_not_checked(tmp_path, root):
    """As in the official lazy loader, only the selected lines are parsed."""
    spec = _spec(tmp_path, root, [_pair(k) for k in range(9)] + ["{bad"], repeat_time=0.5)
    selected_bad = []
    for seed in range(20):
        report = SkipReport()
        records = read_records(spec, seed, report=report)
        selected_bad.append(report.total)
        assert len(records) + report.total == 5
    assert 0 in selected_bad and 1 in selected_bad


# ----------------------------------------------------------------------------- SFT


def test_sft_records(tmp_path, root):
    conv = [{"from": "system", "value": "s"}, {"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "yo"}]
    path = _write_jsonl(tmp_path / "sft.jsonl", [
        {"id": 1, "image": "a.jpg", "conversations": conv},
        {"image": ["a.jpg", "b.jpg"], "conversations": conv[1:]},
        {"conversations": conv[1:], "width": 3},
    ])
    a, b, c = read_sft_records(path, root)
    assert a.conversations == tuple(conv) and a.images == (os.path.join(root, "a.jpg"),) and not a.multi_image
    assert b.multi_image and len(b.images) == 2
    assert c.images == () and c.video is None and str(c.source) == f"{path}:3"


@pytest.mark.parametrize("item, kind, problem", [
    ({"image": "a.jpg"}, "missing_field", "missing required field 'conversations'$"),
    (_pair(0), "missing_field",
     r"missing required field 'conversations' \(a preference pair: train mpo and train dpo read those\)$"),
    ({"conversations": []}, "wrong_type", "field 'conversations' must be a non-empty list"),
    ({"conversations": "hi"}, "wrong_type", "field 'conversations' must be a non-empty list"),
    ({"conversations": ["hi"]}, "wrong_type", r"conversations\[0\] must be an object"),
    ({"conversations": [{"from": "human"}]}, "missing_field", r"conversations\[0\] is missing 'value'"),
    ({"conversations": [{"from": "user", "value": "x"}]}, "wrong_type", r"conversations\[0\].from must be one of"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": None}]}, "wrong_type",
     r"conversations\[1\].value must be a string"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": " "}]}, "empty_answer",
     r"conversations\[1\].value is empty"),
    ({"image": "zzz.jpg", "conversations": [{"from": "human", "value": "x"}]}, "missing_file", "image file not found"),
    ({"video": "notes", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "missing_file", "video folder has no image files to use as video frames: .*notes$"),
    ({"img": "a.jpg", "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]},
     "unread_field", r"field 'img' is not read; did you mean 'image'\?$"),
    ({"image": "a.jpg", "video": "clip.mp4", "conversations": [{"from": "human", "value": "x"},
                                                                {"from": "gpt", "value": "y"}]},
     "image_and_video", "the record gives both 'image' and 'video'"),
    ('{"conversations": [{"from": "human", "value": "x", "value": "z"}, {"from": "gpt", "value": "y"}]}', "json",
     "field 'value' appears twice"),
])
def test_sft_bad_lines(tmp_path, root, item, kind, problem):
    good = {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}
    path = _write_jsonl(tmp_path / "sft.jsonl", [good, item])
    with pytest.raises(InputError, match=f"^{re.escape(path)}:2: {problem}"):
        read_sft_records(path, root)
    report = SkipReport()
    assert len(read_sft_records(path, root, report=report)) == 1
    assert report.counts == {kind: 1}


def test_a_key_twice_in_metadata_that_is_not_read_is_no_problem(tmp_path, root):
    spec = _spec(tmp_path, root, ['{"question": "q0", "chosen": "c", "rejected": "r", "meta": {"x": 1, "x": 2}}'])
    assert [r.question for r in read_records(spec, 0)] == ["q0"]


def test_a_line_nested_too_deeply_is_a_bad_line_not_a_recursion_error(tmp_path, root):
    """json.loads raises RecursionError past about 1000 levels, which --skip-bad did not catch either."""
    deep = '{"question": ' + "[" * 5000 + "]" * 5000 + ', "chosen": "A", "rejected": "B"}'
    spec = _spec(tmp_path, root, [_pair(0), deep])
    with pytest.raises(InputError, match=r"ds.jsonl:2: malformed JSON \(nested too deeply to read\)"):
        read_records(spec, 0)
    report = SkipReport()
    assert [r.question for r in read_records(spec, 0, report=report)] == ["q0"]
    sft = _write_jsonl(tmp_path / "s.jsonl", ['{"conversations": ' + "[" * 5000 + "]" * 5000 + "}"])
    with pytest.raises(InputError, match=r"s.jsonl:1: malformed JSON \(nested too deeply"):
        read_sft_records(sft, root)
    huge = '{"question": "q", "chosen": "A", "rejected": "B", "score": ' + "9" * 5000 + "}"  # past Python's digits
    with pytest.raises(InputError, match=r"ds.jsonl:2: malformed JSON \(an integer of more than \d+ digits\)"):
        read_records(_spec(tmp_path, root, [_pair(0), huge]), 0)


def test_sft_repeat_time_above_one_is_a_whole_number(tmp_path, root):
    """1.9 read as 1 copy without a word; the official fine-tuning reader asserts a whole number above 1."""
    sft = _write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "q"},
                                                                 {"from": "gpt", "value": "a"}]}])
    assert len(read_sft_records(sft, root, repeat_time=2.0)) == 2
    assert len(read_sft_records(sft, root, repeat_time=0.5)) == 0
    with pytest.raises(InputError, match=r"s.jsonl: repeat_time 1.9 is above 1 and not a whole number"):
        read_sft_records(sft, root, repeat_time=1.9)


def test_a_lone_surrogate_escape_is_a_bad_line(tmp_path, root):
    """JSON reads "\\ud800" without its pair as a lone surrogate, no Unicode character: it failed later, when the
    text was encoded; a bad line named by file and line (skipped under --skip-bad). A pair is a character."""
    lone = '{"question": "How many \\ud800?", "chosen": "A", "rejected": "B"}'
    paired = '{"question": "q\\ud83d\\ude00", "chosen": "A", "rejected": "B"}'
    spec = _spec(tmp_path, root, [_pair(0), lone, paired])
    with pytest.raises(InputError, match=r"ds.jsonl:2: a string holds \\ud800 without its surrogate pair"):
        read_records(spec, 0)
    report = SkipReport()
    assert sorted(r.question for r in read_records(spec, 0, report=report)) == ["q0", "q\U0001f600"]


def test_unreadable_meta_and_annotation_files_are_named(tmp_path, root, monkeypatch):
    """A file without read permission (or an I/O error) raised PermissionError with a traceback from train."""
    import builtins

    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    annotation = _write_jsonl(tmp_path / "ann.jsonl", [])
    real_open = builtins.open

    def refusing(path, *args, **kwargs):
        if str(path) in (str(meta), annotation):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    with pytest.raises(InputError, match=r"meta.json: cannot read the meta file \(Permission denied\)$"):
        load_meta(str(meta))
    with pytest.raises(InputError, match=r"ann.jsonl: cannot read the annotation file \(Permission denied\)$"):
        read_records(DatasetSpec("d", root, annotation), 0)
    with pytest.raises(InputError, match=r"ann.jsonl: cannot read the annotation file \(Permission denied\)$"):
        read_sft_records(annotation, root)
