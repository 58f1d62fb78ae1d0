"""Preference-pair construction: pairing rules on scripted samples, MMPR validity, resume, the real model path."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
from conftest import (
    bf16_shards_without_dtype,
    check_replaced_weights_refuse_resume,
    check_resave_refuses_resume,
    official_shards,
    record_header_reads,
)
from PIL import Image

from internvl_mpo.answers import COT_INSTRUCTION
from internvl_mpo.errors import ConfigError, InputError, PromptTooLongError
from internvl_mpo.pairs import (
    ContinueJob,
    ModelGenerator,
    PairSettings,
    SampleJob,
    continuation_prompt_ids,
    judge,
    make_correctness_pairs,
    make_dropout_ntp_pairs,
    read_items,
    sample_seed,
    truncate_words,
)
from internvl_mpo.train.mmpr import load_meta, read_datasets

COT_HEAD = COT_INSTRUCTION.split("{question}")[0]

# Scripted samples per question tag; the fake sampler cycles through them.
SCRIPT = {
    "Q1": [
        "The animal has whiskers. Final answer: B",
        "It has pointy ears, so it is a cat.\nFinal answer: (B)",
        "It barks. Final answer: A",
        "Looks like a dog.\nFinal answer: A. dog",
        "I am not sure.",  # no final answer: format negative
        "It could be either. Final answer: maybe",  # no letter: format negative; contains "b"
    ],
    "Q2": [
        "Counting rows: 3 x 4.\nFinal answer: 12",
        "Two rows of six.\nFinal answer: 12 apples",
        "I count them.\nFinal answer: 11",
        "Hmm, many. Final answer: 112",  # contains the positive "12": never paired with it
        "Counting rows: 3 x 4.\nFinal answer: 12",  # an exact duplicate of the first
        "Final answer: 13",  # no reasoning: format negative
    ],
    "Q3": ["The sky is blue on a clear day.\nFinal answer: Yes"] * 6,
    "Q4": [
        "The first picture is lighter. Final answer: A",
        "The second is darker, so the first. Final answer: (A) first",
        "The second looks brighter. Final answer: B",
        "Both. Final answer: A and B",
        "Hmm.",
        "The first one. Final answer: A",
    ],
}


def write_image(path: Path, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), color).save(path)


def ntp_line(folder: Path, **fields) -> str:
    """A DropoutNTP item's JSONL line, with an image (written into `folder`, the items file's, as ntp.png)."""
    write_image(folder / "ntp.png", (30, 200, 30))
    return json.dumps({"image": "ntp.png", **fields}) + "\n"


def write_items(folder: Path) -> Path:
    write_image(folder / "img" / "a.png", (200, 30, 30))
    write_image(folder / "img" / "b.png", (30, 30, 200))
    rows = [
        {"id": "mc", "image": "img/a.png", "answer": "B",
         "question": "<image>\nQ1 Which animal is shown?\nA. dog\nB. cat\n"
                     "Answer with the option's letter from the given choices directly."},
        {"id": "num", "image": str((folder / "img" / "b.png").resolve()), "answer": "12",
         "question": "Q2 How many apples are there?\nAnswer the question using a single word or phrase."},
        {"id": "yn", "question": "Q3 Is the sky blue? Please answer Yes or No.", "answer": "yes"},
        {"id": "multi", "image": ["img/a.png", "img/b.png"], "question": "Q4 Which image is brighter?",
         "options": ["first", "second"], "answer": "A"},
    ]
    path = folder / "items.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class FakeSampler:
    """Answers from SCRIPT by the question's tag; records every job; can fail on a given call."""

    def __init__(self, fail_on_call: int | None = None):
        self.jobs: list[SampleJob] = []
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, jobs: list[SampleJob]) -> list[list[str]]:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        self.jobs += jobs
        out = []
        for job in jobs:
            script = SCRIPT[re.search(r"Q\d", job.question).group(0)]
            out.append([script[k % len(script)] for k in range(len(job.seeds))])
        return out


def pair_lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


SETTINGS = PairSettings(samples=6, batch_size=1, model="fake")


# ----------------------------------------------------------------------------- scripted samples


def test_correctness_pairs_follow_the_official_rules(tmp_path):
    items_path = write_items(tmp_path / "data")
    sampler = FakeSampler()
    stats = make_correctness_pairs(items_path, tmp_path / "out", sampler, SETTINGS)
    out = tmp_path / "out"
    correct = pair_lines(out / "items_pairs_vqa_correctness_rules.jsonl")
    formats = pair_lines(out / "items_pairs_vqa_format_rules.jsonl")
    by_id = {i.id: i for i in read_items(items_path, "correctness")}

    def ids(rows, item_id):
        tag = {"mc": "Q1", "num": "Q2", "yn": "Q3", "multi": "Q4"}[item_id]
        return [r for r in rows if tag in r["question"]]

    s1, s2, s4 = SCRIPT["Q1"], SCRIPT["Q2"], SCRIPT["Q4"]
    assert {(r["chosen"], r["rejected"]) for r in ids(correct, "mc")} == {(a, b) for a in s1[:2] for b in s1[2:4]}
    # "B" is contained in "maybe" (case-insensitive): that format pair is skipped; "(B)" is not.
    assert {(r["chosen"], r["rejected"]) for r in ids(formats, "mc")} == {(s1[0], s1[4]), (s1[1], s1[4]), (s1[1], s1[5])}
    # "12" is contained in "112": skipped; the duplicate positive adds nothing.
    assert {(r["chosen"], r["rejected"]) for r in ids(correct, "num")} == {(s2[0], s2[2]), (s2[1], s2[2]), (s2[1], s2[3])}
    assert {(r["chosen"], r["rejected"]) for r in ids(formats, "num")} == {(s2[0], s2[5]), (s2[1], s2[5])}
    assert ids(correct, "yn") == [] and ids(formats, "yn") == []  # all samples correct: nothing to pair
    # "A and B" names no single option: a format negative, and it contains the positive "A".
    assert {(r["chosen"], r["rejected"]) for r in ids(correct, "multi")} == {(a, s4[2]) for a in (s4[0], s4[1], s4[5])}
    assert {(r["chosen"], r["rejected"]) for r in ids(formats, "multi")} == {
        (s4[1], s4[3]), (s4[0], s4[4]), (s4[1], s4[4]), (s4[5], s4[4])}
    for row in correct + formats:
        item = by_id[{"Q1": "mc", "Q2": "num", "Q3": "yn", "Q4": "multi"}[re.search(r"Q\d", row["question"]).group(0)]]
        assert judge(item, row["chosen"])[0] == "positive"
        assert judge(item, row["rejected"])[0] == ("format" if row in formats else "negative")
        assert row["answer_gt"] == item.answer
    assert len({json.dumps(r, sort_keys=True) for r in correct}) == len(correct)
    assert (stats.pairs, stats.format_pairs, stats.entail_skipped) == (len(correct), len(formats), 1 + 2 + 2)
    assert (stats.positives, stats.negatives, stats.format_negatives) == (2 + 3 + 6 + 3, 2 + 2 + 1, 2 + 1 + 2)

    # The prompts: instruction stripped, CoT-wrapped, the single image placeholder in front, options appended.
    q1 = ids(correct, "mc")[0]["question"]
    assert q1 == "<image>\n" + COT_HEAD + "Q1 Which animal is shown?\nA. dog\nB. cat"
    assert ids(correct, "num")[0]["question"].startswith("<image>\n" + COT_HEAD + "Q2 How many")
    assert ids(correct, "multi")[0]["question"] == (
        "Image-1: <image>\nImage-2: <image>\n" + COT_HEAD + "Q4 Which image is brighter?\nA. first\nB. second"
    )
    text_only = [j for j in sampler.jobs if "Q3" in j.question][0]
    assert text_only.images == () and "<image>" not in text_only.question
    # Seeds: one per sample, derived from (seed, id, index).
    assert [j.seeds for j in sampler.jobs if "Q1" in j.question][0] == tuple(sample_seed(0, "mc", k) for k in range(6))


def test_more_responses_than_the_large_file_limit_keep_3_pairs_per_question(tmp_path, monkeypatch):
    """The official keeps 3 pairs per question when the file holds more than 500k responses (lines, one per
    sample): here 4 items x 6 samples = 24 against a lowered limit; "mc" has 2 x 2 correctness pairs."""
    items = write_items(tmp_path / "data")
    kept = {}
    for limit in (24, 23):
        monkeypatch.setattr("internvl_mpo.pairs.LARGE_FILE_RESPONSES", limit)
        make_correctness_pairs(items, tmp_path / f"out{limit}", FakeSampler(), SETTINGS)
        rows = pair_lines(tmp_path / f"out{limit}" / "items_pairs_vqa_correctness_rules.jsonl")
        kept[limit] = sum("Q1" in r["question"] for r in rows)
    assert kept == {24: 4, 23: 3}


def test_pair_files_are_valid_mmpr_input(tmp_path):
    items_path = write_items(tmp_path / "data")
    make_correctness_pairs(items_path, tmp_path / "out", FakeSampler(), SETTINGS)
    specs = load_meta(str(tmp_path / "out" / "meta.json"))
    assert [s.name for s in specs] == ["items_pairs_vqa_correctness_rules", "items_pairs_vqa_format_rules"]
    records, report = read_datasets(specs)
    assert report.total == 0
    assert len(records) == sum(s.length for s in specs)
    for record in records:
        assert all(Path(p).is_file() for p in record.images)
        assert record.question.count("<image>") == len(record.images)
    multi = [r for r in records if "Q4" in r.question]
    assert multi and all(r.multi_image and len(r.images) == 2 for r in multi)
    assert {Path(p).name for r in records if "Q1" in r.question for p in r.images} == {"a.png"}


def test_max_pairs_caps_each_question_and_rebuilds_without_sampling(tmp_path):
    items_path = write_items(tmp_path / "data")
    make_correctness_pairs(items_path, tmp_path / "out", FakeSampler(), SETTINGS)
    again = FakeSampler()
    stats = make_correctness_pairs(items_path, tmp_path / "out", again, PairSettings(samples=6, max_pairs=2, model="fake"))
    assert again.calls == 0  # every item was finished: only the files are rebuilt
    rows = pair_lines(tmp_path / "out" / "items_pairs_vqa_correctness_rules.jsonl")
    counts = {tag: sum(tag in r["question"] for r in rows) for tag in ("Q1", "Q2", "Q4")}
    assert counts == {"Q1": 2, "Q2": 2, "Q4": 2} and stats.pairs == 6


def test_resume_skips_finished_items_and_matches_an_uninterrupted_run(tmp_path):
    items_path = write_items(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        make_correctness_pairs(items_path, out, FakeSampler(fail_on_call=3), SETTINGS)
    progress = (out / "progress.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in progress] == ["mc", "num"]
    # An interrupted write leaves half a line: it is dropped and that item is redone.
    with open(out / "progress.jsonl", "a") as f:
        f.write('{"id": "yn", "question": "Q3 ..., "respon')
    resumed = FakeSampler()
    make_correctness_pairs(items_path, out, resumed, SETTINGS)
    assert [re.search(r"Q\d", j.question).group(0) for j in resumed.jobs] == ["Q3", "Q4"]

    fresh = tmp_path / "fresh"
    make_correctness_pairs(items_path, fresh, FakeSampler(), SETTINGS)
    for name in ("items_pairs_vqa_correctness_rules.jsonl", "items_pairs_vqa_format_rules.jsonl"):
        assert (out / name).read_text() == (fresh / name).read_text()
    with pytest.raises(ConfigError, match="temperature"):
        make_correctness_pairs(items_path, out, FakeSampler(), PairSettings(samples=6, temperature=1.0, model="fake"))
    # An output folder holding another tool's settings.json (or a damaged one) is refused in one line.
    for text in ("not json", "[1, 2]", "\xff"):
        (out / "settings.json").write_text(text, encoding="latin-1")
        with pytest.raises(ConfigError, match=r"settings.json: not the settings of a pairs or eval run"):
            make_correctness_pairs(items_path, out, FakeSampler(), SETTINGS)


def test_resume_redoes_items_edited_since_their_samples(tmp_path):
    """Samples belong to the prompt and images they answered: an item whose question or image changed
    between runs is sampled again, and its pairs hold the new question; the others are kept."""
    items_path = write_items(tmp_path / "data")
    out = tmp_path / "out"
    make_correctness_pairs(items_path, out, FakeSampler(), SETTINGS)
    rows = [json.loads(line) for line in items_path.read_text().splitlines()]
    rows[1]["question"] = rows[1]["question"].replace("apples", "pears")
    rows[3]["image"] = ["img/b.png", "img/a.png"]
    items_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = FakeSampler()
    make_correctness_pairs(items_path, out, again, SETTINGS)
    assert [re.search(r"Q\d", j.question).group(0) for j in again.jobs] == ["Q2", "Q4"]
    pairs = pair_lines(out / "items_pairs_vqa_correctness_rules.jsonl")
    q2 = [r["question"] for r in pairs if "Q2" in r["question"]]
    assert q2 and all("pears" in q and "apples" not in q for q in q2)

    ntp = tmp_path / "ntp.jsonl"
    ntp.write_text(ntp_line(tmp_path, id="1", question="Say hi.", chosen="Hello there, how are you?"))
    seen: list[ContinueJob] = []

    def fake_continue(jobs):
        seen.extend(jobs)
        return [" and more." for _ in jobs]

    make_dropout_ntp_pairs(ntp, tmp_path / "ntp_out", fake_continue, SETTINGS)
    ntp.write_text(ntp_line(tmp_path, id="1", question="Say hi.", chosen="Good day, friend, how are you?"))
    make_dropout_ntp_pairs(ntp, tmp_path / "ntp_out", fake_continue, SETTINGS)
    assert [j.prefix for j in seen] == ["Hello there,", "Good day, friend,"]
    assert pair_lines(tmp_path / "ntp_out" / "ntp_pairs_dropout_ntp.jsonl")[0]["rejected"] == "Good day, friend, and more."


def test_resume_redoes_items_whose_image_file_was_edited_in_place(tmp_path):
    """An item was skipped when its image path was the same, though the file had been overwritten
    since: its pairs held samples about the old picture. A touch that keeps the bytes keeps the
    samples, and a progress line written before stamps were kept is not compared on them."""
    import os

    items_path = write_items(tmp_path / "data")
    out = tmp_path / "out"
    make_correctness_pairs(items_path, out, FakeSampler(), SETTINGS)
    os.utime(tmp_path / "data" / "img" / "b.png", ns=(1, 1))
    again = FakeSampler()
    make_correctness_pairs(items_path, out, again, SETTINGS)
    assert again.calls == 0
    write_image(tmp_path / "data" / "img" / "b.png", (30, 200, 30))
    make_correctness_pairs(items_path, out, again, SETTINGS)
    assert [re.search(r"Q\d", j.question).group(0) for j in again.jobs] == ["Q2", "Q4"]  # the items showing b.png
    rows = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    (out / "progress.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "stamps"}) + "\n"
                                                for r in rows))
    write_image(tmp_path / "data" / "img" / "a.png", (200, 200, 30))
    make_correctness_pairs(items_path, out, FakeSampler(fail_on_call=1), SETTINGS)


def test_bad_items_are_reported_with_their_line(tmp_path):
    path = tmp_path / "items.jsonl"
    (tmp_path / "notes.png").write_text("not an image")
    good = {"id": "a", "question": "q", "answer": "B", "image": "good.png"}
    write_image(tmp_path / "good.png", (1, 2, 3))
    # Images are opened while the file is read (before any model loads), with the item's line.
    for name, why in [("missing.png", "no such file"), ("notes.png", "not an image"), (".", "is a directory"),
                      ("https://example.com/a.png", "https://example.com/a.png: is a URL")]:
        path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "b", "image": name}) + "\n")
        with pytest.raises(InputError, match=rf"items.jsonl:2: .*{why}"):
            read_items(path, "correctness")
    path.write_text(json.dumps({"id": "a", "question": "q", "answer": "Z", "options": ["x", "y"]}) + "\n")
    with pytest.raises(InputError, match=r"items.jsonl:1: ground truth 'Z'"):
        read_items(path, "correctness")
    path.write_text(json.dumps({"id": "a", "question": "q", "answer": "I", "kind": "choice"}) + "\n")
    with pytest.raises(InputError, match=r'items.jsonl:1: .*give the options, or "kind": "text"'):
        read_items(path, "correctness")
    path.write_text(json.dumps({"id": "a", "question": "q"}) + "\n" + json.dumps({"id": "a", "question": "q"}) + "\n")
    with pytest.raises(InputError, match="items.jsonl:1: DropoutNTP needs a non-empty string 'chosen' \\(or 'answer'\\)$"):
        read_items(path, "dropout-ntp")
    # a number as the answer, which correctness reads as text, was refused here
    path.write_text(json.dumps({"id": "a", "question": "<image>\nHow many?", "answer": 3, "image": "good.png"}) + "\n")
    assert read_items(path, "dropout-ntp")[0].chosen == "3" and read_items(path, "correctness")[0].answer == "3"
    # A field that would be ignored, leaving the question without its images, is refused.
    for extra, why in [({"images": ["good.png"]}, r"'images' is not read; did you mean 'image'\?"),
                       ({"video": "clip.mp4"}, "'video' is not supported")]:
        for method in ("correctness", "dropout-ntp"):
            path.write_text(json.dumps({"id": "a", "question": "q", "answer": "B", **extra}) + "\n")
            with pytest.raises(InputError, match=rf"items.jsonl:1: field {why}"):
                read_items(path, method)
    # a video given as an image was pointed to --video, a flag pairs does not have
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))
    path.write_text(json.dumps({"id": "a", "question": "q", "answer": "B", "image": "clip.mp4"}) + "\n")
    with pytest.raises(InputError, match=r"items.jsonl:1: .*clip.mp4: .*looks like a video: videos are not read "
                                         r"here; give frames as a list of paths in 'image'$"):
        read_items(path, "correctness")
    # A missing field was "must be a non-empty string, got None", and numbers, which are taken, were not named.
    for row, message in [({"question": "q", "answer": "2"}, "field 'id' is required (a string or a number)"),
                         ({"id": "a", "answer": "2"}, "field 'question' is required (a string or a number)"),
                         ({"id": ["a"], "question": "q", "answer": "2"},
                          "field 'id' must be a non-empty string or a number, got ['a']"),
                         ({"id": "a", "question": " ", "answer": "2"},
                          "field 'question' must be a non-empty string or a number, got ' '")]:
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(InputError, match=re.escape(f"items.jsonl:1: {message}")):
            read_items(path, "correctness")
    # Ids are text: 7 and "7" are the same id (progress and pairs are keyed by it).
    rows = [{"id": 7, "question": "q", "answer": "2"}, {"id": "8", "question": "q", "answer": "2"},
            {"id": "7", "question": "q", "answer": "3"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match=r"items.jsonl:3: id '7' appears twice \(first at .*items.jsonl:1\)"):
        read_items(path, "correctness")
    # DropoutNTP keeps the question as given: placeholders that do not fit the images (which training
    # refuses) are reported before any continuation is drawn, as for correctness items.
    for image, question in [(["good.png", "good.png"], "<image> Compare."), (None, "<image>\nDescribe.")]:
        for method in ("correctness", "dropout-ntp"):
            path.write_text(json.dumps({"id": "a", "question": question, "answer": "B", "image": image}) + "\n")
            with pytest.raises(InputError, match=r"items.jsonl:1: the question has 1 <image> placeholder\(s\) for"):
                read_items(path, method)


def test_sampling_settings_that_cannot_give_pairs_are_refused():
    greedy = r"^pairs need sampling: temperature > 0 and top_k other than 1 \(got temperature {}, top_k {}\)"
    for bad, message in ((dict(temperature=0.0), greedy.format(r"0\.0", 50)),
                         (dict(temperature=-1.0), greedy.format(r"-1\.0", 50)),
                         (dict(top_k=1), greedy.format(r"0\.7", 1)), (dict(max_num=0), "^max_num must be at least 1, got 0$")):
        with pytest.raises(InputError, match=message):
            PairSettings(**bad)
    PairSettings(temperature=0.1, top_k=0)  # top_k 0 is off, not greedy


def test_bad_sampling_flags_and_another_runs_folder_are_refused_before_the_model_loads(tmp_path, capsys):
    # A bad value failed only when the first sample was drawn, after the model loaded and after
    # settings.json was written, so the corrected command was then refused as "other settings".
    from internvl_mpo.cli import main

    items_path = write_items(tmp_path / "data")
    out = tmp_path / "out"
    base = ["pairs", "correctness", "--model", str(tmp_path / "no-model"), "--input", str(items_path),
            "--output", str(out)]
    for flag, message in (("--max-new-tokens=0", "--max-new-tokens must be at least 1, got 0"),
                          ("--batch-size=0", "--batch-size must be at least 1, got 0"),
                          ("--max-num=-2", "--max-num must be at least 1, got -2"),
                          ("--top-p=2", "--top-p must be in (0, 1], got 2.0"),
                          ("--top-k=-1", "--top-k must be in [0, 2**31) (0 = off), got -1"),
                          ("--temperature=0", "pairs need sampling: --temperature > 0 and --top-k other than 1 "
                                              "(got --temperature 0.0, --top-k 50)"),
                          ("--start-ratio=1", "--start-ratio must be in (0, 1), got 1.0")):
        assert main([*base, flag]) != 0
        assert f"error: {message}" in capsys.readouterr().err
    assert not out.exists()
    make_correctness_pairs(items_path, out, FakeSampler(), dataclasses.replace(SETTINGS, dtype="float32"))
    assert main([*base, "--samples=6", "--device=cpu"]) != 0
    assert f"error: {out} holds a run with other settings (model)" in capsys.readouterr().err


def test_a_folder_holding_files_of_no_pairs_run_is_refused_and_left_alone(tmp_path, capsys):
    """`--output` named a folder of the user's own (the data folder, with its MMPR meta.json): it had no
    settings.json, so the run took it for a new one and overwrote meta.json with its own."""
    from internvl_mpo.cli import main

    items_path = write_items(tmp_path / "data")
    out = items_path.parent
    (out / "meta.json").write_text('{"mine": {"root": ".", "annotation": "mine.jsonl"}}\n')
    base = ["pairs", "correctness", "--model", str(tmp_path / "no-model"), "--input", str(items_path),
            "--output", str(out), "--device=cpu"]
    assert main(base) != 0
    assert f"error: {out} holds meta.json but no settings.json of a pairs or eval run; use another output folder" in (
        capsys.readouterr().err)
    with pytest.raises(ConfigError, match="holds meta.json but no settings.json"):
        make_correctness_pairs(items_path, out, FakeSampler(), SETTINGS)
    assert (out / "meta.json").read_text() == '{"mine": {"root": ".", "annotation": "mine.jsonl"}}\n'
    assert not (out / "settings.json").exists()


def test_a_run_in_another_precision_is_refused_before_the_model_loads(tmp_path, capsys):
    """--dtype was not recorded: a resume in another precision mixed its samples with the first run's."""
    from internvl_mpo.cli import main

    items_path = write_items(tmp_path / "data")
    out, model = tmp_path / "out", str(tmp_path / "no-model")
    make_correctness_pairs(items_path, out, FakeSampler(), dataclasses.replace(SETTINGS, model=model, dtype="float32"))
    base = ["pairs", "correctness", "--model", model, "--input", str(items_path), "--output", str(out), "--samples=6",
            "--device=cpu"]
    assert main([*base, "--dtype=bfloat16"]) != 0
    assert f"error: {out} holds a run with other settings (dtype)" in capsys.readouterr().err
    assert main([*base, "--dtype=fp32"]) != 0  # the same settings: on to loading the model, which is not there
    assert "no-model: no such checkpoint folder" in capsys.readouterr().err


def test_the_settings_record_a_local_model_folder_by_its_resolved_path_and_a_hub_id_as_typed(tmp_path, monkeypatch):
    """settings.json kept --model as typed: resuming with ./m, m/ or /abs/m was refused as another model,
    and a model m in another folder was taken for the same one."""
    items_path = write_items(tmp_path / "data")
    (tmp_path / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    make_correctness_pairs(items_path, out, FakeSampler(), PairSettings(samples=6, model="m"))
    assert json.loads((out / "settings.json").read_text())["model"] == str(tmp_path / "m")
    for same in ("./m", "m/", str(tmp_path / "m"), str(tmp_path / "data" / ".." / "m")):
        make_correctness_pairs(items_path, out, FakeSampler(fail_on_call=1), PairSettings(samples=6, model=same))
    (tmp_path / "data" / "m").mkdir()
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"other settings \(model\)"):
        make_correctness_pairs(items_path, out, FakeSampler(), PairSettings(samples=6, model="m"))
    # a folder written before the model was resolved recorded it as typed: read against the current folder
    monkeypatch.chdir(tmp_path)
    earlier = json.loads((out / "settings.json").read_text())
    (out / "settings.json").write_text(json.dumps({**earlier, "model": "m/"}))
    make_correctness_pairs(items_path, out, FakeSampler(fail_on_call=1), PairSettings(samples=6, model="./m"))
    hub = tmp_path / "hub_out"
    make_correctness_pairs(items_path, hub, FakeSampler(), PairSettings(samples=6, model="OpenGVLab/InternVL2_5-1B-MPO"))
    assert json.loads((hub / "settings.json").read_text())["model"] == "OpenGVLab/InternVL2_5-1B-MPO"
    assert PairSettings().identity("correctness", items_path)["model"] == ""  # no model given: not the current folder


def test_an_item_that_cannot_run_is_skipped_reported_and_not_retried(tmp_path):
    items_path = write_items(tmp_path / "data")

    class LongQ2(FakeSampler):
        def __call__(self, jobs):
            out = super().__call__(jobs)
            return [InputError("prompt is 9999 tokens") if "Q2" in j.question else a for j, a in zip(jobs, out)]

    out = tmp_path / "out"
    stats = make_correctness_pairs(items_path, out, LongQ2(), SETTINGS)
    assert stats.failed == [f"{items_path}:2 (id 'num'): prompt is 9999 tokens"]
    assert "failed=1" in stats.summary()
    rows = pair_lines(out / "items_pairs_vqa_correctness_rules.jsonl")
    assert rows and not any("Q2" in r["question"] for r in rows) and any("Q1" in r["question"] for r in rows)
    again = FakeSampler()
    assert make_correctness_pairs(items_path, out, again, SETTINGS).failed == stats.failed
    assert again.calls == 0  # the failed item is recorded as done


def test_dropout_ntp_pairs(tmp_path):
    folder = tmp_path / "data"
    write_image(folder / "a.png", (10, 200, 10))
    chosen = "The image shows a green square on a plain background with no other objects."
    rows = [
        {"id": "1", "image": "a.png", "question": "<image>\nDescribe the image.", "chosen": chosen},
        {"id": "2", "image": "a.png", "question": "Say hi.", "answer": "Hello there, how are you today?"},
    ]
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen: list[ContinueJob] = []

    def fake_continue(jobs):
        seen.extend(jobs)
        return [" and then it keeps going." for _ in jobs]

    stats = make_dropout_ntp_pairs(folder / "items.jsonl", tmp_path / "out", fake_continue, SETTINGS)
    words = chosen.split(" ")
    assert seen[0].prefix == " ".join(words[: len(words) // 2]) == truncate_words(chosen)
    assert seen[0].question == "Describe the image."  # placeholder removed, stripped
    assert seen[1].prefix == "Hello there, how"  # 6 words -> 3
    assert truncate_words("图中是一只猫，坐在垫子上。") == ""  # one "word": no prefix, as the official split(" ")
    # the official int(ratio * n_words): an odd count rounds down
    assert truncate_words("one two three") == "one" and truncate_words("a b c d e", 0.7) == "a b c"
    out = pair_lines(tmp_path / "out" / "items_pairs_dropout_ntp.jsonl")
    assert out[0] == {"image": "a.png", "question": "<image>\nDescribe the image.", "chosen": chosen,
                      "rejected": seen[0].prefix + " and then it keeps going."}
    assert out[1]["rejected"] == "Hello there, how and then it keeps going." and out[1]["image"] == "a.png"
    records, _ = read_datasets(load_meta(str(tmp_path / "out" / "meta.json")))
    assert len(records) == stats.pairs == 2 and records[0].images == (str((folder / "a.png").resolve()),)


def test_a_continuation_that_gives_back_the_chosen_answer_makes_no_pair(tmp_path):
    """Such a pair states no preference, and training refuses a record whose answers are the same text."""
    folder = tmp_path / "data"
    chosen = "A green square sits on a plain white background."
    (folder / "items.jsonl").write_text(ntp_line(folder, id="1", question="Describe.", chosen=chosen))
    stats = make_dropout_ntp_pairs(folder / "items.jsonl", tmp_path / "out", lambda jobs: [
        chosen[len(job.prefix):] for job in jobs], SETTINGS)
    assert stats.pairs == 0 and (tmp_path / "out" / "items_pairs_dropout_ntp.jsonl").read_text() == ""
    assert stats.no_pairs == 1 and "no_pairs=1" in stats.summary()  # counted and reported, not dropped silently


def test_dropout_ntp_writes_no_pair_that_training_refuses(tmp_path):
    """A chosen answer holding <IMG_CONTEXT> past its kept half, or a rejected answer that is blank (no prefix kept, a
    continuation of whitespace), made a pair that `train mpo` refuses, stopping the run on the whole file."""
    from internvl_mpo.chat.template import build_pair_ids
    from internvl_mpo.chat.tokenizer import load_tokenizer

    folder = tmp_path / "data"
    lines = [ntp_line(folder, id="ctx", question="Describe.", chosen="A green square <IMG_CONTEXT> on white."),
             ntp_line(folder, id="blank", question="Describe.", chosen="图中有一个绿色的正方形。"),
             ntp_line(folder, id="ok", question="Describe.", chosen="A green square on a white background.")]
    (folder / "items.jsonl").write_text("".join(lines))
    stats = make_dropout_ntp_pairs(folder / "items.jsonl", tmp_path / "out", lambda jobs: [
        "\n\n\n" if job.prefix == "" else " and more." for job in jobs], SETTINGS)
    assert stats.pairs == 1 and stats.no_pairs == 1
    assert len(stats.failed) == 1 and "(id 'ctx')" in stats.failed[0] and "<IMG_CONTEXT>" in stats.failed[0]
    records, _ = read_datasets(load_meta(str(tmp_path / "out" / "meta.json")))
    tokenizer = load_tokenizer(Path(__file__).parents[1] / "src" / "internvl_mpo" / "demo_model")
    for record in records:  # what train mpo does with each record: no refusal
        build_pair_ids(tokenizer, record.question, record.chosen, record.rejected, [1], num_image_token=2)


def test_a_question_holding_a_video_placeholder_is_refused_with_its_line(tmp_path):
    """`train mpo` refuses a record whose question holds <video> without a video: pairs on such an item stopped
    the training run; the item is refused when read, naming its line, for both methods."""
    folder = tmp_path / "data"
    path = folder / "items.jsonl"
    question = "What does <video> do?"
    for method, line in (("dropout-ntp", ntp_line(folder, id="v", question=question, chosen="It plays.")),
                         ("correctness", ntp_line(folder, id="v", question=question, answer="play", kind="text"))):
        path.write_text(line)
        with pytest.raises(InputError, match=r"items\.jsonl:1: the question holds <video>"):
            read_items(path, method)


def test_items_that_give_no_pair_are_counted_in_the_summary(tmp_path):
    """An item whose samples are all right (or none right) gives no pair; the summary said only pairs=0, where the
    official postprocess reports all_correct / all_incorrect / key_without_pairs."""
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (28, 28), (200, 20, 20)).save(folder / "red.png")
    (folder / "items.jsonl").write_text("".join(
        json.dumps({"id": i, "image": "red.png", "question": "How many?", "answer": a}) + "\n"
        for i, a in [("right", "3"), ("wrong", "4")]))
    stats = make_correctness_pairs(folder / "items.jsonl", tmp_path / "out", lambda jobs: [
        ["Counting.\nFinal answer: 3"] * len(job.seeds) for job in jobs], SETTINGS)
    assert stats.pairs == stats.format_pairs == 0
    assert stats.no_pairs == 2 and "no_pairs=2" in stats.summary()


def test_correctness_asks_the_sampler_for_batch_size_sequences_a_call(tmp_path):
    """batch_size counts sequences: 12 at 6 samples per question is 2 questions a call (at least 1)."""
    items = write_items(tmp_path / "data")
    for batch_size, per_call in ((12, [2, 2]), (4, [1, 1, 1, 1])):
        sampler, calls = FakeSampler(), []

        def counting(jobs):
            calls.append(len(jobs))
            return sampler(jobs)

        settings = dataclasses.replace(SETTINGS, batch_size=batch_size)
        make_correctness_pairs(items, tmp_path / f"out{batch_size}", counting, settings)
        assert calls == per_call



def test_a_dropout_ntp_item_without_an_image_is_refused(tmp_path):
    """Its rejected answer would be the chosen one continued from the same prompt the model answers with: no image
    was dropped, so the pair taught nothing about the image (it was paired without a word)."""
    path = _items(tmp_path / "items.jsonl", {"id": "1", "question": "Say hi.", "chosen": "Hello there, how are you?"})
    with pytest.raises(InputError, match=r"items.jsonl:1: DropoutNTP needs an 'image'"):
        read_items(path, "dropout-ntp")
    assert read_items(_items(path, {"id": "1", "question": "Say hi?", "answer": "hi"}), "correctness")[0].images == ()

def test_an_output_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    from internvl_mpo.cli import main

    items_path = write_items(tmp_path / "data")
    (tmp_path / "taken").write_text("a file")
    for method in ("correctness", "dropout-ntp"):
        args = ["pairs", method, "--model", str(tmp_path / "no-model"), "--input", str(items_path),
                "--output", str(tmp_path / "taken")]
        if method == "dropout-ntp":
            args[5] = str(tmp_path / "ntp.jsonl")
            (tmp_path / "ntp.jsonl").write_text(ntp_line(tmp_path, id="1", question="Hi?", chosen="Hello there."))
        assert main(args) != 0
        assert f"error: {tmp_path / 'taken'}: exists and is not a folder" in capsys.readouterr().err
    with pytest.raises(InputError, match="exists and is not a folder"):
        make_correctness_pairs(items_path, tmp_path / "taken", FakeSampler(), SETTINGS)
    with pytest.raises(InputError, match=r"taken is a file, not a folder"):
        make_correctness_pairs(items_path, tmp_path / "taken" / "out", FakeSampler(), SETTINGS)
    assert not (tmp_path / "no-model").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "data", "ntp.jsonl", "ntp.png", "taken"]  # nothing was created


def test_a_second_run_on_the_folder_of_a_live_run_is_refused(tmp_path, capsys):
    """Two pairs runs on one --output both appended to progress.jsonl and wrote the pair files under each
    other; the folder is held as train holds its own (an flock, dropped when the run ends however it ends)."""
    import fcntl
    import os
    import socket

    from internvl_mpo.cli import main

    items_path = write_items(tmp_path / "data")
    ntp_path = tmp_path / "ntp.jsonl"
    ntp_path.write_text(ntp_line(tmp_path, id="1", question="Hi?", chosen="Hello there, how are you?"))

    def in_use(out: str) -> str:
        return re.escape(f"{tmp_path / out} is in use by another pairs run (pid {os.getpid()} on "
                         f"{socket.gethostname()}): two runs would overwrite each other's samples and pairs; wait "
                         "for it to end or choose another --output")

    class WithASecondRun(FakeSampler):  # a second run on the folder starts while the first samples
        def __call__(self, jobs):
            with pytest.raises(ConfigError, match=in_use("out")):
                make_correctness_pairs(items_path, tmp_path / "out", FakeSampler(), SETTINGS)
            return super().__call__(jobs)

    stats = make_correctness_pairs(items_path, tmp_path / "out", WithASecondRun(), SETTINGS)
    alone = make_correctness_pairs(items_path, tmp_path / "alone", FakeSampler(), SETTINGS)
    assert (stats.pairs, stats.format_pairs) == (alone.pairs, alone.format_pairs) and stats.pairs > 0

    def continue_with_a_second_run(jobs):
        with pytest.raises(ConfigError, match=in_use("ntp")):
            make_dropout_ntp_pairs(ntp_path, tmp_path / "ntp", lambda jobs: ["."] * len(jobs), SETTINGS)
        return [" and on." for _ in jobs]

    assert make_dropout_ntp_pairs(ntp_path, tmp_path / "ntp", continue_with_a_second_run, SETTINGS).pairs == 1
    make_correctness_pairs(items_path, tmp_path / "out", FakeSampler(fail_on_call=1), SETTINGS)  # free again: resumes
    for method, path, out in (("correctness", items_path, "out"), ("dropout-ntp", ntp_path, "ntp")):
        base = ["pairs", method, "--model", str(tmp_path / "no-model"), "--input", str(path),
                "--output", str(tmp_path / out), "--samples=6", "--device=cpu"]
        with open(tmp_path / out / ".pairs.lock", "w") as lock:  # another host's run: refused before the model loads
            fcntl.flock(lock, fcntl.LOCK_EX)
            lock.write("pid 123 on elsewhere\n")
            lock.flush()
            assert main(base) != 0
            assert f"error: {tmp_path / out} is in use by another pairs run (pid 123 on elsewhere)" in (
                capsys.readouterr().err)
        assert main(base) != 0  # released: on to the next check
        assert f"error: {tmp_path / out} holds a run with other settings" in capsys.readouterr().err


def test_a_run_on_a_filesystem_without_locks_says_so(tmp_path, monkeypatch, capsys):
    """Where flock is unsupported (some network filesystems), pairs and eval ran on without a lock in silence;
    they say so, as train does, and go on."""
    import errno
    import fcntl

    from internvl_mpo.evaluate import EVAL_LOCK
    from internvl_mpo.run_folder import hold_output

    def unsupported(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    items_path = write_items(tmp_path / "data")
    assert make_correctness_pairs(items_path, tmp_path / "out", FakeSampler(), SETTINGS).pairs > 0
    note = f"note: {tmp_path / 'out'}'s filesystem has no file locks: make sure no other run writes to it\n"
    assert note in capsys.readouterr().err
    with hold_output(tmp_path / "eval", {"kind": "eval"}, ("predictions.jsonl",), EVAL_LOCK):
        assert capsys.readouterr().err == note.replace(str(tmp_path / "out"), str(tmp_path / "eval"))


# ----------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest import tiny_chat_folder

    folder, _ = tiny_chat_folder(tmp_path_factory.mktemp("ckpt") / "model")
    return folder


def test_real_model_correctness_run_through_the_cli(tiny_model, tmp_path):
    from internvl_mpo.cli import main

    items_path = write_items(tmp_path / "data")
    out = tmp_path / "out"
    args = ["pairs", "correctness", "--model", str(tiny_model), "--input", str(items_path), "--output", str(out),
            "--samples", "2", "--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu", "--dtype", "float32"]
    assert main(args) == 0
    progress = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert [p["id"] for p in progress] == ["mc", "num", "yn", "multi"]
    assert all(len(p["responses"]) == 2 and all(isinstance(r, str) for r in p["responses"]) for p in progress)
    assert len({r for p in progress for r in p["responses"]}) > 1  # seeded samples differ
    records, _ = read_datasets(load_meta(str(out / "meta.json")))  # gibberish answers: likely no pairs, still valid
    assert len(records) == sum(1 for f in out.glob("items_pairs_*.jsonl") for _ in f.read_text().splitlines())
    assert main(args) == 0  # a rerun finds every item done
    assert [json.loads(line)["id"] for line in (out / "progress.jsonl").read_text().splitlines()] == ["mc", "num", "yn", "multi"]


def test_a_model_saved_again_into_its_folder_does_not_resume_the_earlier_weights_samples(tiny_model, tmp_path):
    """A model retrained or converted into the run's model folder counted as the same model: a rerun kept the
    earlier weights' samples and sampled the rest with the new ones. Their save id is recorded and compared."""
    import shutil

    from internvl_mpo.pairs import pairs

    model = shutil.copytree(tiny_model, tmp_path / "model")
    path, out = tmp_path / "items.jsonl", tmp_path / "out"
    path.write_text(json.dumps({"id": "a", "question": "How many?", "answer": "2"}) + "\n")
    run = dict(method="correctness", model=str(model), input=str(path), output=str(out), samples=2, max_new_tokens=2,
               device="cpu", progress=False)
    check_resave_refuses_resume(lambda: pairs(**run), model, out)


def test_a_replaced_weight_file_does_not_resume_the_earlier_weights_samples(tiny_model, tmp_path):
    """Weights without a save id (official checkpoints) recorded none: a shard replaced by other weights resumed
    with the earlier samples kept. The stamps of the weight files are recorded and compared now."""
    import shutil

    from internvl_mpo.pairs import pairs

    model = official_shards(shutil.copytree(tiny_model, tmp_path / "model"))
    path, out = tmp_path / "items.jsonl", tmp_path / "out"
    path.write_text(json.dumps({"id": "a", "question": "How many?", "answer": "2"}) + "\n")
    run = dict(method="correctness", model=str(model), input=str(path), output=str(out), samples=2, max_new_tokens=2,
               device="cpu", progress=False)
    check_replaced_weights_refuse_resume(lambda: pairs(**run), model, out / "settings.json", "out holds a run with")


def test_no_progress_hides_the_progress_bar(tiny_model, tmp_path, capsys):
    """--no-progress, as train's and eval's, keeps a job's log free of the bar's lines; pairs had none."""
    from internvl_mpo.cli import main

    items_path = write_items(tmp_path / "data")
    make_correctness_pairs(items_path, tmp_path / "shown", FakeSampler(), SETTINGS)
    assert "pairs correctness: 100%" in capsys.readouterr().err
    make_correctness_pairs(items_path, tmp_path / "hidden", FakeSampler(), SETTINGS, progress=False)
    assert capsys.readouterr().err == ""
    for method in ("correctness", "dropout-ntp"):
        path = items_path if method == "correctness" else tmp_path / "chosen.jsonl"
        if method == "dropout-ntp":
            path.write_text(ntp_line(tmp_path, id="a", question="How many?", chosen="There are two of them."))
        args = ["pairs", method, "--model", str(tiny_model), "--input", str(path), "--output", str(tmp_path / method),
                "--samples", "2", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32", "--no-progress"]
        assert main(args) == 0
        assert capsys.readouterr().err == "", method


def test_pairs_reads_each_weight_files_header_once(tiny_model, tmp_path, monkeypatch):
    """--dtype auto without a config dtype read the shards' headers for the run's recorded dtype, and the load
    read them all again."""
    from internvl_mpo.cli import main

    model = bf16_shards_without_dtype(tiny_model, tmp_path / "bf16")
    opened = record_header_reads(monkeypatch)
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "How many?", "answer": "2"}) + "\n")
    args = ["pairs", "correctness", "--model", str(model), "--input", str(path), "--output", str(tmp_path / "out"),
            "--samples", "2", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "auto"]
    assert main(args) == 0
    shards = sorted(model.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(opened) == shards
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["dtype"] == "bfloat16"
    assert len(json.loads((tmp_path / "out" / "progress.jsonl").read_text())["responses"]) == 2


def test_real_model_skips_a_prompt_longer_than_the_context(tiny_model, tmp_path, capsys):
    from internvl_mpo.cli import main
    from internvl_mpo.pipeline import InternVLChat

    long_question = "dog " * 20000  # 40000 tokens of the tiny tokenizer; its context is 32768
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"id": "short", "question": "How many?", "answer": "2"}) + "\n"
                    + json.dumps({"id": "long", "question": long_question, "answer": "2"}) + "\n")
    args = ["pairs", "correctness", "--model", str(tiny_model), "--input", str(path), "--output", str(tmp_path / "out"),
            "--samples", "2", "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]
    for _ in range(2):  # the rerun finds both items done
        assert main(args) == 0
        printed = capsys.readouterr().out
        assert f"skipped {path}:2 (id 'long'): prompt is 40" in printed and "failed=1" in printed
    progress = [json.loads(line) for line in (tmp_path / "out" / "progress.jsonl").read_text().splitlines()]
    assert [len(p["responses"]) for p in progress if p["id"] == "short"] == [2]
    assert [p["id"] for p in progress if "error" in p] == ["long"]
    chat = InternVLChat.from_pretrained(tiny_model, dtype="float32")
    generator = ModelGenerator(chat, PairSettings(max_new_tokens=8))
    texts = generator.continue_prefix([ContinueJob(long_question, "A", 1), ContinueJob("Say hi.", "Hello", 2)])
    assert isinstance(texts[0], PromptTooLongError) and "longer than the context" in str(texts[0])
    assert texts[1] == generator.continue_prefix([ContinueJob("Say hi.", "Hello", 2)])[0]  # as if asked alone


def test_an_img_context_in_a_continuation_fails_its_item_alone(tiny_model):
    """<IMG_CONTEXT> typed in a question or in the kept half of a chosen answer raised out of continue_prefix and
    ended the whole dropout-ntp run (no file:line, every rerun stopping there); the item fails alone now, as in
    correctness."""
    from internvl_mpo.pipeline import InternVLChat

    chat = InternVLChat.from_pretrained(tiny_model, dtype="float32")
    generator = ModelGenerator(chat, PairSettings(max_new_tokens=4))
    jobs = [ContinueJob("What does <IMG_CONTEXT> mean?", "It is", 1), ContinueJob("Say hi.", "The <IMG_CONTEXT> is", 2),
            ContinueJob("Say hi.", "Hello", 3)]
    texts = generator.continue_prefix(jobs)
    assert isinstance(texts[0], InputError) and "the text contains <IMG_CONTEXT> 1 time(s)" in str(texts[0])
    assert isinstance(texts[1], InputError) and "kept part of the chosen answer contains <IMG_CONTEXT>" in str(texts[1])
    assert texts[2] == generator.continue_prefix([jobs[2]])[0]


def test_an_item_whose_images_do_not_fit_names_the_command_line_flag(tiny_model, tmp_path):
    """pairs' per-item failure said "a smaller max_num gives fewer" (the Python parameter) where eval and generate
    name --max-num."""
    import shutil

    from internvl_mpo.pipeline import InternVLChat

    folder = tmp_path / "short"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["max_position_embeddings"] = 100  # 4 image tokens a tile: 4 images of 7 tiles overflow it
    (folder / "config.json").write_text(json.dumps(config))
    Image.new("RGB", (336, 56), (200, 30, 30)).save(tmp_path / "wide.png")  # 6 tiles and the thumbnail
    chat = InternVLChat.from_pretrained(folder, dtype="float32")
    got = ModelGenerator(chat, PairSettings(samples=2, max_new_tokens=4)).sample(
        [SampleJob("<image>\n" * 4 + "What?", (str(tmp_path / "wide.png"),) * 4, (1, 2))])[0]
    assert isinstance(got, InputError) and "a smaller --max-num gives fewer" in str(got), got


def test_engine_sampler_equals_chat_with_the_same_seed(tiny_model, tmp_path):
    from internvl_mpo.pipeline import InternVLChat

    write_image(tmp_path / "a.png", (120, 60, 200))
    chat = InternVLChat.from_pretrained(tiny_model, dtype="float32")
    settings = PairSettings(samples=3, max_new_tokens=8, batch_size=2)
    question = "<image>\n" + COT_HEAD + "What is shown?"
    seeds = (11, 12, 13)
    got = ModelGenerator(chat, settings).sample([SampleJob(question, (str(tmp_path / "a.png"),), seeds)])
    want = [
        chat.chat(question, str(tmp_path / "a.png"), do_sample=True, temperature=0.7, top_k=50, top_p=1.0, seed=s,
                  max_new_tokens=8, min_new_tokens=1, max_num=6)
        for s in seeds
    ]
    assert got == [want]


def test_dropout_ntp_prompt_is_the_template_plus_the_prefix(tiny_model, tmp_path):
    from internvl_mpo.chat.template import render_prompt
    from internvl_mpo.chat.tokenizer import load_tokenizer
    from internvl_mpo.cli import main

    tokenizer = load_tokenizer(tiny_model)
    for question, prefix in [("Describe the image.", "The image shows a"), ("Say hi.", "(1) Hello, 42"),
                             ("说说看。", "这是一只")]:
        ids = continuation_prompt_ids(tokenizer, question, prefix)
        assert ids == tokenizer.encode(render_prompt(question) + prefix)  # the official joint tokenization
        assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n" + prefix)

    folder = tmp_path / "data"
    write_image(folder / "a.png", (10, 200, 10))
    rows = [{"id": str(k), "image": "a.png", "question": "<image>\nDescribe it.",
             "chosen": f"A small green square number {k} sits on a plain white background."} for k in range(3)]
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["pairs", "dropout-ntp", "--model", str(tiny_model), "--input",
                 str(folder / "items.jsonl"), "--output", str(out), "--max-new-tokens", "5", "--batch-size", "2",
                 "--device", "cpu", "--dtype", "float32"]) == 0
    pairs = pair_lines(out / "items_pairs_dropout_ntp.jsonl")
    assert len(pairs) == 3
    for row, item in zip(pairs, rows, strict=True):
        assert row["chosen"] == item["chosen"] and row["rejected"].startswith(truncate_words(item["chosen"]))
        assert row["rejected"] != row["chosen"]


def test_dropout_ntp_prompt_of_a_question_that_is_only_its_image_closes_the_user_turn(tiny_model):
    """The official script renders the text-only question with lmdeploy's template, which closes an empty user turn
    ("<|im_start|>user\\n<|im_end|>\\n"); the prompt left the bare role, so the model continued another conversation."""
    from internvl_mpo.chat.template import get_template
    from internvl_mpo.chat.tokenizer import load_tokenizer
    from internvl_mpo.pairs import text_only_question

    tokenizer = load_tokenizer(tiny_model)
    question = text_only_question("<image>\n")
    assert question == ""
    tmpl = get_template("internvl2_5")
    official = tmpl.system_turn() + "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\nThe picture shows"
    assert continuation_prompt_ids(tokenizer, question, "The picture shows") == tokenizer.encode(official)


def test_one_mpo_training_step_on_the_pairs(tiny_model, tmp_path):
    import math

    from internvl_mpo.train.mpo import train
    from internvl_mpo.train.settings import TrainConfig

    items_path = write_items(tmp_path / "data")
    make_correctness_pairs(items_path, tmp_path / "pairs", FakeSampler(), SETTINGS)
    config = TrainConfig(
        mode="mpo", model=str(tiny_model), data=str(tmp_path / "pairs" / "meta.json"), output=str(tmp_path / "run"),
        max_steps=1, batch_size=2, precision="fp32", device="cpu", grad_checkpointing=False, progress=False,
    )
    result = train(config)
    assert result.steps == 1 and result.skipped.total == 0
    assert all(math.isfinite(v) for v in result.metrics.values()) and result.metrics["tokens"] > 0
    assert result.metrics["loss/pref"] == pytest.approx(math.log(2), abs=0.05)  # policy ~ reference at step 0


def test_progress_lines_end_at_newlines_only(tmp_path):
    from internvl_mpo.run_folder import Progress

    progress = Progress(tmp_path / "progress.jsonl")
    rows = [{"id": "a", "answer": "one\u2028two\u0085three"}, {"id": "b", "answer": "ok"}]
    progress.append(rows)
    with open(progress.path, "ab") as f:
        f.write(b'{"id": "c", "answer": "cut \xd0')  # an interrupted write, cut inside a character
    assert progress.load() == {row["id"]: row for row in rows}


def test_samples_and_continuations_keep_the_official_min_new_tokens(tiny_model):
    """DropoutNTP continues with at least 5 new tokens and correctness samples with at least 1 (the official
    scripts' --min-new-tokens): a model that ends its turn at once left the bare prefix as the rejected
    answer. Here the end-of-turn id is the token the model would take first."""
    from internvl_mpo.generate.engine import Engine
    from internvl_mpo.pairs import MIN_NEW_TOKENS
    from internvl_mpo.pipeline import InternVLChat

    class Recording(Engine):  # keeps the tokens of every request
        def start(self, max_batch, max_len):
            gen = super().start(max_batch, max_len)
            step = gen.step

            def recorded():
                events = step()
                for e in events:
                    tokens.setdefault(e.rid, []).append(e.token)
                return events

            gen.step = recorded
            return gen

    assert MIN_NEW_TOKENS == {"correctness": 1, "dropout-ntp": 5}
    chat = InternVLChat.from_pretrained(tiny_model, dtype="float32")
    settings = PairSettings(temperature=0.01, max_new_tokens=12, batch_size=2)
    job = ContinueJob("Describe it.", "The image shows a", 3)
    tokens: dict[int, list[int]] = {}
    chat.engine = Recording(chat.model, stop_token_ids=(chat.tokenizer.im_end_id,))
    ModelGenerator(chat, settings).continue_prefix([job])
    end = tokens[0][0]
    for method, run in (("dropout-ntp", lambda g: g.continue_prefix([job])),
                        ("correctness", lambda g: g.sample([SampleJob("Describe it.", (), (3,))]))):
        chat.engine = Recording(chat.model, stop_token_ids=(end,))  # the first token now ends the turn
        tokens.clear()
        run(ModelGenerator(chat, settings))
        n = MIN_NEW_TOKENS[method]
        assert end not in tokens[0][:n] and len(tokens[0]) > n, method
    tokens.clear()
    ModelGenerator(chat, PairSettings(temperature=0.01, max_new_tokens=3)).continue_prefix([job])
    assert len(tokens[0]) == 3  # the minimum never passes max_new_tokens


def test_a_folder_sampled_without_the_minimum_is_not_resumed(tmp_path):
    """Samples drawn before min_new_tokens was kept follow other rules: resuming such a folder would mix them."""
    items_path = write_items(tmp_path / "data")
    out = tmp_path / "out"
    make_correctness_pairs(items_path, out, FakeSampler(), SETTINGS)
    earlier = json.loads((out / "settings.json").read_text())
    del earlier["min_new_tokens"]
    (out / "settings.json").write_text(json.dumps(earlier))
    with pytest.raises(ConfigError, match=r"other settings \(min_new_tokens\)"):
        make_correctness_pairs(items_path, out, FakeSampler(), SETTINGS)


def test_correctness_resumes_whatever_start_ratio_says(tmp_path):
    """Only DropoutNTP reads --start-ratio (as only correctness reads --samples and --max-num): a correctness
    folder resumed with another one was refused as 'other settings (start_ratio)'."""
    items_path = write_items(tmp_path / "data")
    out = tmp_path / "out"
    make_correctness_pairs(items_path, out, FakeSampler(), SETTINGS)
    assert "start_ratio" not in json.loads((out / "settings.json").read_text())
    done = FakeSampler(fail_on_call=1)  # every item is done: a resume samples nothing
    make_correctness_pairs(items_path, out, done, dataclasses.replace(SETTINGS, start_ratio=0.3))
    # a folder written when correctness recorded it resumes too
    earlier = json.loads((out / "settings.json").read_text())
    (out / "settings.json").write_text(json.dumps({**earlier, "start_ratio": 0.5}))
    make_correctness_pairs(items_path, out, done, dataclasses.replace(SETTINGS, start_ratio=0.7))
    assert done.calls == 0
    ntp = tmp_path / "ntp.jsonl"
    ntp.write_text(ntp_line(tmp_path, id="1", question="Say hi.", chosen="Hello there, how are you?"))
    make_dropout_ntp_pairs(ntp, tmp_path / "ntp", lambda jobs: [" and more."] * len(jobs), SETTINGS)
    with pytest.raises(ConfigError, match=r"other settings \(start_ratio\)"):
        make_dropout_ntp_pairs(ntp, tmp_path / "ntp", lambda jobs: [], dataclasses.replace(SETTINGS, start_ratio=0.3))


def test_one_sample_per_question_is_refused_before_the_model_loads(tmp_path, capsys):
    """A pair is a right and a wrong answer to one question: --samples 1 sampled every item and gave no pair."""
    from internvl_mpo.cli import main

    items_path = write_items(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["pairs", "correctness", "--model", str(tmp_path / "no-model"), "--input", str(items_path),
                 "--output", str(out), "--samples", "1"]) != 0
    assert "error: --samples 1: correctness pairs need at least 2 samples per question" in capsys.readouterr().err
    assert not out.exists()


def test_a_misspelt_field_is_refused_with_the_field_it_probably_meant(tmp_path):
    """"imgae" (or "Image", "img", ...) was ignored and the question sampled without its image; fields with
    other names (ids, metadata) are still ignored."""
    write_image(tmp_path / "a.png", (200, 30, 30))
    path = tmp_path / "items.jsonl"
    good = {"id": "a", "question": "Is it red?", "answer": "yes", "image": "a.png"}
    extra = {"question_id": 7, "image_id": "x", "source": "web", "meta": {"k": 1}, "images": ["a.png"]}
    for method in ("correctness", "dropout-ntp"):
        assert read_items(_items(path, good, dict(good, id="b", chosen="yes", **extra)), method)[1].images
    for bad, meant in [({"imgae": "a.png"}, "image"), ({"Image": "a.png"}, "image"), ({"img": "a.png"}, "image"),
                       ({"Question": "q"}, "question"), ({"optoins": ["x", "y"]}, "options"),
                       ({"kinds": "text"}, "kind"), ({"vidoe": "c.mp4"}, "video")]:
        row = dict({"id": "b", "question": "Is it red?", "answer": "yes"}, **bad)
        if "Question" in bad:
            del row["question"]
        with pytest.raises(InputError, match=rf"items.jsonl:2: field '{next(iter(bad))}' is not read; "
                                             rf"did you mean '{meant}'\?$"):
            read_items(_items(path, good, row), "correctness")
    with pytest.raises(InputError, match=r"items.jsonl:2: field 'chosne' is not read; did you mean 'chosen'\?"):
        read_items(_items(path, good, {"id": "b", "question": "q", "chosne": "It is."}), "dropout-ntp")


def test_another_name_for_a_field_is_refused_with_the_field_it_means(tmp_path):
    """"image_path", "image_file" or "prompt" was ignored: the question was sampled without its image (or refused
    as lacking a question, without saying which field was meant)."""
    write_image(tmp_path / "a.png", (200, 30, 30))
    path = tmp_path / "items.jsonl"
    for bad, meant in [({"image_path": "a.png"}, "image"), ({"image_file": "a.png"}, "image"),
                       ({"images_path": ["a.png"]}, "image"), ({"Video_Path": "c.mp4"}, "video"),
                       ({"prompt": "Is it red?"}, "question"), ({"query": "Is it red?"}, "question")]:
        row = dict({"id": "b", "answer": "yes"}, **({} if "prompt" in bad or "query" in bad else {"question": "q"}),
                   **bad)
        for method in ("correctness", "dropout-ntp"):
            with pytest.raises(InputError, match=rf"items.jsonl:1: field '{next(iter(bad))}' is not read; "
                                                 rf"did you mean '{meant}'\?$"):
                read_items(_items(path, row), method)


def _items(path: Path, *rows: dict) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_max_pixels_refuses_a_larger_image_naming_the_flag_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """`pairs` had no --max-pixels: an image over Pillow's limit was refused with "a larger max_pixels allows it",
    a setting it did not take, and a larger one could not be allowed."""
    from PIL import Image as PILImage

    from internvl_mpo.cli import main

    items_path = write_items(tmp_path / "data")  # 56 x 56 = 3136-pixel images
    image = (tmp_path / "data" / "img" / "a.png").resolve()
    base = ["pairs", "correctness", "--model", str(tmp_path / "no-model"), "--input", str(items_path),
            "--output", str(tmp_path / "out")]
    assert main([*base, "--max-pixels", "3000"]) == 1
    assert capsys.readouterr().err == (f"internvl-mpo pairs: error: {items_path}:1: {image}: 56x56 = 3136 pixels exceeds "
                                       "the limit of 3000 (possible decompression bomb; a larger --max-pixels allows it)\n")
    assert main([*base, "--max-pixels", "3136"]) == 1  # read: on to loading the model, which is not there
    assert "no-model: no such checkpoint folder" in capsys.readouterr().err
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # Pillow then refuses over 2000 pixels
    assert main([*base, "--max-pixels", "5000"]) == 1  # a limit above Pillow's raises Pillow's
    assert "no-model: no such checkpoint folder" in capsys.readouterr().err


def test_the_model_sampler_refuses_an_image_over_max_pixels(tiny_model, tmp_path):
    from internvl_mpo.pipeline import InternVLChat

    write_image(tmp_path / "a.png", (120, 60, 200))
    chat = InternVLChat.from_pretrained(tiny_model, dtype="float32")
    job = SampleJob("<image>\nWhat is shown?", (str(tmp_path / "a.png"),), (1, 2))
    settings = PairSettings(samples=2, max_new_tokens=1)
    refused, = ModelGenerator(chat, settings, max_pixels=3000).sample([job])
    assert isinstance(refused, InputError) and "56x56 = 3136 pixels exceeds the limit of 3000" in str(refused)
    assert [len(texts) for texts in ModelGenerator(chat, settings, max_pixels=3136).sample([job])] == [2]


def test_a_hint_goes_on_a_line_before_the_question(tmp_path):
    """A "hint" (as in eval's files: MMBench's context for the question) was ignored, and the question was sampled
    and paired without it; it now goes before the question, as eval puts it. A hint that is no text is refused."""
    write_image(tmp_path / "a.png", (200, 30, 30))
    path = _items(tmp_path / "items.jsonl",
                  {"id": "h", "image": "a.png", "hint": "The dog is on the left.",
                   "question": "Q1 Which animal is left?", "options": ["dog", "cat"], "answer": "A",
                   "chosen": "The dog is on the left side."},
                  {"id": "n", "image": "a.png", "hint": "", "question": "Q3 Is the sky blue?", "answer": "yes",
                   "chosen": "Yes it is."})
    sampler = FakeSampler()
    make_correctness_pairs(path, tmp_path / "out", sampler, SETTINGS)
    assert sampler.jobs[0].question.startswith(f"<image>\n{COT_HEAD}")
    assert "Question:\n\nThe dog is on the left.\nQ1 Which animal is left?\nA. dog\nB. cat" in sampler.jobs[0].question
    assert sampler.jobs[1].question.endswith("Question:\n\nQ3 Is the sky blue?")  # an empty hint adds no line
    seen = []
    make_dropout_ntp_pairs(path, tmp_path / "ntp", lambda jobs: seen.extend(jobs) or [" more" for _ in jobs], SETTINGS)
    assert seen[0].question == "The dog is on the left.\nQ1 Which animal is left?\nA. dog\nB. cat"  # options too
    assert pair_lines(tmp_path / "ntp" / "items_pairs_dropout_ntp.jsonl")[0]["question"] == seen[0].question
    for method in ("correctness", "dropout-ntp"):
        with pytest.raises(InputError, match=r"items.jsonl:1: field 'hint' must be a non-empty string or a number"):
            read_items(_items(path, {"id": "b", "question": "q", "answer": "yes", "hint": {"text": "x"}}), method)
        with pytest.raises(InputError, match=r"items.jsonl:1: field 'hnit' is not read; did you mean 'hint'\?"):
            read_items(_items(path, {"id": "b", "question": "q", "answer": "yes", "hnit": "x"}), method)


def test_each_sample_is_written_with_its_verdict_and_extracted_answer(tmp_path):
    """The samples' verdicts (correct, wrong, unparseable) were only counted: which sample was judged how, and on
    what extracted answer, could not be seen. samples.jsonl now lists each with its item id and index."""
    items_path = write_items(tmp_path / "data")
    stats = make_correctness_pairs(items_path, tmp_path / "out", FakeSampler(), SETTINGS)
    rows = pair_lines(tmp_path / "out" / "samples.jsonl")
    assert [(r["id"], r["sample"]) for r in rows] == [(i, k) for i in ("mc", "num", "yn", "multi") for k in range(6)]
    mc = [(r["verdict"], r["answer"], r["response"]) for r in rows if r["id"] == "mc"]
    assert mc == [("positive", "B", SCRIPT["Q1"][0]), ("positive", "(B)", SCRIPT["Q1"][1]),
                  ("negative", "A", SCRIPT["Q1"][2]), ("negative", "A. dog", SCRIPT["Q1"][3]),
                  ("format", None, SCRIPT["Q1"][4]), ("format", "maybe", SCRIPT["Q1"][5])]
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("positive", "negative", "format")}
    assert counts == {"positive": stats.positives, "negative": stats.negatives, "format": stats.format_negatives}
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "samples.jsonl").write_text("{}\n")  # a folder of the user's: not overwritten
    with pytest.raises(ConfigError, match="holds samples.jsonl but no settings.json"):
        make_correctness_pairs(items_path, tmp_path / "mine", FakeSampler(), SETTINGS)


def test_pairs_interrupted_says_what_is_kept_and_the_rerun_resumes(tiny_model, tmp_path, monkeypatch, capsys):
    """Ctrl-C ended pairs without a word (generate says what it kept and how to resume); it says so too."""
    from internvl_mpo.cli import main
    from internvl_mpo.pairs import ModelGenerator

    out = tmp_path / "out"
    args = ["pairs", "correctness", "--model", str(tiny_model), "--input", str(write_items(tmp_path / "data")),
            "--output", str(out), "--samples", "2", "--max-new-tokens", "2", "--batch-size", "1", "--device", "cpu"]
    generate, calls = ModelGenerator._generate, []

    def ctrl_c_at_the_second_item(generator, requests):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate(generator, requests)

    with monkeypatch.context() as m:
        m.setattr(ModelGenerator, "_generate", ctrl_c_at_the_second_item)
        assert main(args) == 130
    assert capsys.readouterr().err.endswith(f"internvl-mpo pairs: interrupted; {out / 'progress.jsonl'} keeps 1 "
                                            "finished item: run the same command again to resume\n")
    assert main(args + ["--no-progress"]) == 0
    assert len((out / "progress.jsonl").read_text().splitlines()) == 4


def test_a_folder_of_one_methods_pairs_refuses_the_other_method_by_name(tmp_path, capsys):
    """`pairs correctness` into a dropout-ntp folder listed every setting the two methods record differently
    ("other settings (max_num, method, min_new_tokens, samples, start_ratio)"); it says the method."""
    from internvl_mpo.cli import main

    items_path, out = tmp_path / "items.jsonl", tmp_path / "ntp"
    items_path.write_text(ntp_line(tmp_path, id="1", question="Say hi.", chosen="Hello there, how are you?",
                                   answer="hello"))
    make_dropout_ntp_pairs(items_path, out, lambda jobs: [" and more." for _ in jobs], SETTINGS)
    settings, _ = (out / "settings.json").read_text(), capsys.readouterr()
    assert main(["pairs", "correctness", "--model", str(tmp_path / "no-model"), "--input", str(items_path),
                 "--output", str(out), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == (f"internvl-mpo pairs: error: {out} holds dropout-ntp pairs (an output folder "
                                       "holds one method's): give the correctness pairs another --output\n")
    assert (out / "settings.json").read_text() == settings


def test_a_lone_surrogate_escape_in_an_items_file_is_named_before_the_model_loads(tmp_path):
    """It passed the reader and crashed with a UnicodeEncodeError traceback after sampling (writing the id, the
    question or a pair)."""
    from internvl_mpo.jsonl import read_objects

    path = tmp_path / "items.jsonl"
    path.write_text('{"id": "a", "question": "q\\ud83d\\ude00", "answer": "1"}\n'
                    '{"id": "\\udc00", "question": "q", "answer": "1"}\n')
    with pytest.raises(InputError, match=r"items.jsonl:2: a string holds \\udc00 without its surrogate pair"):
        list(read_objects(path))
    with pytest.raises(InputError, match=r"items.jsonl:2: a string holds \\udc00"):
        read_items(path, "correctness")



def zed_items(tiny_model, tmp_path) -> tuple[Path, list[str]]:
    """Three correctness items, the second's question holding "Zzz" (tokens the others lack), and the pairs
    command over them, one prompt a batch."""
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": q, "answer": "2"}) + "\n"
                            for i, q in (("a", "How many?"), ("b", "Zzz how many?"), ("c", "Hello, how many?"))))
    return path, ["pairs", "correctness", "--model", str(tiny_model), "--input", str(path), "--output",
                  str(tmp_path / "out"), "--samples", "2", "--max-new-tokens", "2", "--batch-size", "1", "--device",
                  "cpu", "--dtype", "float32", "--no-progress"]


def test_a_prompt_whose_activations_overflow_fails_its_item_alone(tiny_model, tmp_path, monkeypatch, capsys):
    """A prompt whose activations overflow (NumericsError from the engine, as an fp16 model's can) ended the whole
    pairs run after the model loaded, naming neither file:line nor id, and every rerun stopped there: the item fails
    alone, reported as `skipped file:line (id ...)`, as a prompt longer than the context is."""
    import torch

    from internvl_mpo.cli import main
    from internvl_mpo.pipeline import InternVLChat

    load = InternVLChat.from_pretrained.__func__

    def overflowing(cls, *args, **kwargs):  # inf in the embeddings of the tokens of "Zzz" only
        chat = load(cls, *args, **kwargs)
        zed = sorted(set(chat.prepare("Zzz").prompt_ids) - set(chat.prepare("Hello").prompt_ids))
        with torch.no_grad():
            chat.model.language_model.input_embeddings().weight[zed] = float("inf")
        return chat

    monkeypatch.setattr(InternVLChat, "from_pretrained", classmethod(overflowing))
    path, args = zed_items(tiny_model, tmp_path)
    assert main(args) == 0
    assert f"skipped {path}:2 (id 'b'): the model's activations overflowed" in capsys.readouterr().out
    progress = {p["id"]: p for p in map(json.loads, (tmp_path / "out" / "progress.jsonl").read_text().splitlines())}
    assert sorted(progress) == ["a", "b", "c"] and "overflowed" in progress["b"]["error"]
    assert [len(progress[i]["responses"]) for i in "ac"] == [2, 2]
    chat = InternVLChat.from_pretrained(tiny_model, dtype="float32")
    generator = ModelGenerator(chat, PairSettings(max_new_tokens=2))
    texts = generator.continue_prefix([ContinueJob("Zzz?", "It is", 1), ContinueJob("Say hi.", "Hello", 2)])
    assert type(texts[0]).__name__ == "NumericsError" and isinstance(texts[1], str)


def test_a_sample_whose_activations_overflow_mid_answer_fails_its_item_alone(tiny_model):
    """An overflow that starts at a token of one sample's answer fails that sample's item with its NumericsError
    (the engine fails that row alone); the other item gets its samples."""
    import torch

    from internvl_mpo.errors import NumericsError
    from internvl_mpo.generate.engine import Request
    from internvl_mpo.pairs import CORRECTNESS
    from internvl_mpo.pipeline import InternVLChat

    chat = InternVLChat.from_pretrained(tiny_model, dtype="float32")
    settings = PairSettings(max_new_tokens=5, temperature=0.01)
    generator = ModelGenerator(chat, settings)
    jobs = [SampleJob("Hello", (), (1,)), SampleJob("What is it?", (), (2,))]
    alone = generator.sample(jobs)
    ids = chat.prepare("Hello").prompt_ids
    tokens = [e.token for events in chat.engine.generate([Request(ids, settings.sampling_params(1, CORRECTNESS))])
              for e in events]
    assert tokens[2] not in set(ids) | set(chat.prepare("What is it?").prompt_ids)
    with torch.no_grad():
        chat.model.language_model.input_embeddings().weight[tokens[2]] = float("inf")
    out = generator.sample(jobs)
    assert isinstance(out[0], NumericsError) and out[1] == alone[1]


def test_a_prompt_that_runs_out_of_memory_stops_the_run_and_is_retried(tiny_model, tmp_path, monkeypatch):
    """Out of memory on one item's prompt (a CUDA OutOfMemoryError from its prefill, which depends on what else the
    batch holds) was recorded as that item's failure in progress.jsonl, and failed items are never retried: the same
    command, with the memory back, skipped it again for good. It stops the run, as before, and the rerun asks it."""
    import torch

    from internvl_mpo.cli import main
    from internvl_mpo.generate.engine import Engine
    from internvl_mpo.pipeline import InternVLChat

    chat = InternVLChat.from_pretrained(tiny_model, dtype="float32")
    zed = set(chat.prepare("Zzz").prompt_ids) - set(chat.prepare("Hello").prompt_ids)
    prefill = Engine.prefill

    def out_of_memory(self, request, caches, row):
        if set(request.prompt_ids) & zed:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return prefill(self, request, caches, row)

    path, args = zed_items(tiny_model, tmp_path)
    monkeypatch.setattr(Engine, "prefill", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        main(args)
    monkeypatch.setattr(Engine, "prefill", prefill)
    assert main(args) == 0
    progress = {p["id"]: p for p in map(json.loads, (tmp_path / "out" / "progress.jsonl").read_text().splitlines())}
    assert sorted(progress) == ["a", "b", "c"] and all(len(p.get("responses", ())) == 2 for p in progress.values())


def test_reading_the_items_shows_progress(tmp_path, capsys, monkeypatch):
    """Every image is decoded while the items are read, before the model loads (80 ms for a 3-megapixel JPEG:
    minutes for thousands of items, again on every rerun): `pairs` showed nothing meanwhile."""
    from internvl_mpo.pairs import read_items

    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (28, 28), (200, 20, 20)).save(folder / "red.png")
    (folder / "items.jsonl").write_text("".join(
        json.dumps({"id": str(i), "image": "red.png", "question": "How many?", "answer": "3"}) + "\n"
        for i in range(3)))
    from internvl_mpo import pairs

    real_read = pairs.read_objects

    def slow_read(*args):  # a second a line, as a few large images take
        for line in real_read(*args):
            time.sleep(0.6)
            yield line

    assert len(read_items(folder / "items.jsonl", "correctness", progress=True)) == 3
    assert capsys.readouterr().err == ""  # a file read within a second shows no bar
    monkeypatch.setattr(pairs, "read_objects", slow_read)
    assert len(read_items(folder / "items.jsonl", "correctness", progress=True)) == 3
    assert "reading items: 3item" in capsys.readouterr().err
    read_items(folder / "items.jsonl", "correctness")
    assert capsys.readouterr().err == ""


def test_choices_is_refused_as_another_name_for_options(tmp_path):
    """"choices" (ScienceQA's and A-OKVQA's name for the options) was ignored: the question was sampled without its
    options, and a letter ground truth checked against letters the model was never shown."""
    path = tmp_path / "items.jsonl"
    row = {"id": "a", "question": "Which animal is shown?", "answer": "A", "choices": ["cat", "dog"]}
    for method in ("correctness", "dropout-ntp"):
        with pytest.raises(InputError, match=r"items.jsonl:1: field 'choices' is not read; did you mean 'options'\?$"):
            read_items(_items(path, row), method)
