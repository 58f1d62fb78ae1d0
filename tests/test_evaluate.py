"""Benchmark evaluation: prompts as VLMEvalKit builds them, scores on a hand-made benchmark, resume, MMBench TSV."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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
from internvl_mpo.errors import ConfigError, InputError
from internvl_mpo.evaluate import (
    Prompt,
    build_prompt,
    read_benchmark,
    run_eval,
    score_response,
)

MCQ = "Answer with the option's letter from the given choices directly."
SHORT = "Answer the question using a single word or phrase."
COT_HEAD = COT_INSTRUCTION.split("{question}")[0]

BENCH = [
    {"id": "1", "image": "img.png", "question": "What color is the car?", "options": {"A": "red", "B": "blue"},
     "answer": "B", "category": "color"},
    {"id": "2", "question": "How many cats are there?", "options": ["one", "two", "three"], "answer": "C",
     "category": "count"},
    {"id": "3", "image": "img.png", "question": "Is there a cat in the image?", "answer": "Yes", "category": "exist"},
    {"id": "4", "question": "How many dogs are there?", "answer": "3", "category": "count"},
    {"id": "5", "question": "Which city is this?", "answer": "Paris", "category": "place"},
    {"id": "6", "image": "img.png", "question": "What color is the sky?", "hint": "It is noon.",
     "options": {"A": "blue", "B": "black"}, "answer": "A", "category": "color"},
]
# Direct answers per question: 1 right, 2 wrong, 3 right, 4 right (units), 5 wrong, 6 unparseable.
DIRECT = {"car": "B", "cats": "The answer is B", "cat in": "Yes, there is.", "dogs": "3 dogs", "city": "London",
          "sky": "I cannot tell"}
COT = {k: f"Let me think about it step by step.\nFinal answer: {v}" for k, v in DIRECT.items()}


def write_bench(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), (20, 20, 220)).save(folder / "img.png")
    path = folder / "bench.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in BENCH))
    return path


class FakeAnswerer:
    def __init__(self, script: dict[str, str], fail: bool = False):
        self.script, self.fail = script, fail
        self.prompts: list[Prompt] = []

    def __call__(self, prompts, batch_size: int):
        for key, p in prompts:
            if self.fail:
                raise AssertionError("every answer should have been loaded from predictions.jsonl")
            self.prompts.append(p)
            yield key, next(v for k, v in self.script.items() if k in p.question)


EXPECTED = {
    "accuracy": 3 / 6, "correct": 3, "total": 6, "unparsed": 1,
    "categories": {
        "color": {"accuracy": 0.5, "correct": 1, "total": 2},
        "count": {"accuracy": 0.5, "correct": 1, "total": 2},
        "exist": {"accuracy": 1.0, "correct": 1, "total": 1},
        "place": {"accuracy": 0.0, "correct": 0, "total": 1},
    },
}


def test_vlmevalkit_prompts(tmp_path):
    items = {i.id: i for i in read_benchmark(write_bench(tmp_path))}
    assert build_prompt(items["1"]) == f"What color is the car?\nA. red\nB. blue\n{MCQ}"
    assert build_prompt(items["2"]) == f"How many cats are there?\nA. one\nB. two\nC. three\n{MCQ}"
    assert build_prompt(items["6"]) == f"It is noon.\nWhat color is the sky?\nA. blue\nB. black\n{MCQ}"
    assert build_prompt(items["3"]) == "Is there a cat in the image?"  # yes/no: as given
    assert build_prompt(items["5"]) == "Which city is this?\nAnswer the question using a single word or phrase."
    # MPO CoT prompt: the question without the hint, options as "A. text" lines, the CoT instruction.
    assert build_prompt(items["6"], cot=True) == COT_HEAD + "What color is the sky?\nA. blue\nB. black"
    assert build_prompt(items["5"], cot=True) == COT_HEAD + "Which city is this?"



def test_a_hint_goes_before_a_question_of_any_kind(tmp_path):
    """A hint went before a multiple-choice question only: a yes/no or short-answer question was asked without it."""
    rows = [dict(BENCH[2], hint="The animal is small."), dict(BENCH[4], hint="It has the Eiffel Tower.")]
    Image.new("RGB", (56, 56), (20, 20, 220)).save(tmp_path / "img.png")
    (tmp_path / "hints.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    yes_no, short = read_benchmark(tmp_path / "hints.jsonl")
    assert build_prompt(yes_no) == "The animal is small.\nIs there a cat in the image?"
    assert build_prompt(short) == f"It has the Eiffel Tower.\nWhich city is this?\n{SHORT}"
    assert build_prompt(short, cot=True) == COT_HEAD + "Which city is this?"  # the MPO prompt leaves it out


def test_chinese_multiple_choice_instruction(tmp_path):
    path = tmp_path / "zh.jsonl"
    path.write_text(json.dumps({"id": 1, "question": "天空是什么颜色？", "options": ["蓝色", "红色"], "answer": "A"}) + "\n")
    (item,) = read_benchmark(path)
    assert build_prompt(item) == "天空是什么颜色？\nA. 蓝色\nB. 红色\n请直接回答选项字母。"


@pytest.mark.parametrize("cot, script", [(False, DIRECT), (True, COT), (True, DIRECT)])
def test_scores_a_hand_made_benchmark(tmp_path, cot, script, monkeypatch):
    data = write_bench(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    answerer = FakeAnswerer(script)
    score = run_eval(data, answerer, cot=cot, batch_size=4)
    assert {k: score[k] for k in EXPECTED} == EXPECTED
    # The default output folder is in the current folder, not beside the data file.
    out = tmp_path / ("bench_cot_eval" if cot else "bench_eval")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["bench.jsonl", "img.png"]
    assert json.loads((out / "score.json").read_text()) == score
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert [r["correct"] for r in rows] == [True, False, True, True, False, None]
    assert rows[1]["extracted"] == "The answer is B" and rows[1]["prediction"] == script["cats"]
    # Questions with an image get its path (relative to the data file); the others none.
    assert [[Path(i).name for i in p.images] for p in answerer.prompts] == [["img.png"], [], ["img.png"], [], [], ["img.png"]]


def test_resume_answers_only_missing_questions(tmp_path):
    data = write_bench(tmp_path / "data")
    out = tmp_path / "out"
    first = run_eval(data, FakeAnswerer(DIRECT), out, batch_size=2)
    assert run_eval(data, FakeAnswerer(DIRECT, fail=True), out) == first
    lines = (out / "predictions.jsonl").read_text().splitlines()
    (out / "predictions.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # cut mid-line
    again = FakeAnswerer(DIRECT)
    assert run_eval(data, again, out) == first
    assert [p.question.split("\n")[0] for p in again.prompts] == ["Which city is this?", "It is noon."]
    assert run_eval(data, FakeAnswerer(DIRECT), tmp_path / "limited", limit=2)["total"] == 2



def test_a_rerun_removes_the_temporary_file_of_a_write_a_kill_cut_short(tmp_path):
    """A run killed inside an atomic write (after it wrote predictions.jsonl.tmp, before the rename) left the .tmp:
    the rerun, finding predictions.jsonl already in order, wrote nothing and never removed it."""
    data = write_bench(tmp_path / "data")
    out = tmp_path / "out"
    first = run_eval(data, FakeAnswerer(DIRECT), out, batch_size=1)
    for name in ("predictions.jsonl.tmp", "score.json.tmp", "download.tmp"):
        (out / name).write_text("cut short")
    assert run_eval(data, FakeAnswerer(DIRECT, fail=True), out) == first
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == ["download.tmp"]  # not the run's


def test_a_rerun_after_a_kill_past_the_last_answer_writes_the_predictions_in_data_order(tmp_path):
    """A run killed after its last answer, before it rewrote predictions.jsonl in data order, left the answers in
    the order they finished: the rerun had nothing to ask and kept them so."""
    data = write_bench(tmp_path / "data")
    out = tmp_path / "out"
    first = run_eval(data, FakeAnswerer(DIRECT), out, batch_size=2)
    path = out / "predictions.jsonl"
    ordered = path.read_bytes()
    lines = ordered.splitlines(keepends=True)
    path.write_bytes(b"".join(lines[1:] + lines[:1]))  # as they finished
    assert run_eval(data, FakeAnswerer(DIRECT, fail=True), out) == first
    assert path.read_bytes() == ordered

def test_resume_asks_again_where_the_data_changed_under_an_id(tmp_path):
    """Ids may be line numbers: a question inserted above renumbers the rest, so a stored prediction is
    reused only for the same prompt and ground truth."""
    data = write_bench(tmp_path / "data")
    out = tmp_path / "out"
    run_eval(data, FakeAnswerer(DIRECT), out)
    rows = [dict(BENCH[0]), dict(BENCH[4], id="2"), *BENCH[2:4], dict(BENCH[1], id="5", answer="B"), BENCH[5]]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    again = FakeAnswerer(DIRECT)
    score = run_eval(data, again, out)
    assert [p.question.split("\n")[0] for p in again.prompts] == ["Which city is this?", "How many cats are there?"]
    assert score["correct"] == 4 and score["total"] == 6  # the cats answer "B" is right against the new truth
    # the same question about another image (benchmarks ask "How many ...?" of many images) is asked again
    Image.new("RGB", (56, 56), (220, 20, 20)).save(tmp_path / "data" / "other.png")
    rows[2] = dict(rows[2], image="other.png")
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    again = FakeAnswerer(DIRECT)
    run_eval(data, again, out)
    assert [p.question for p in again.prompts] == ["Is there a cat in the image?"]
    assert json.loads((out / "predictions.jsonl").read_text().splitlines()[2])["images"] == [
        str(tmp_path / "data" / "other.png")]
    # a new ground truth alone (the same prompt): asked again, and the row holds the new one
    rows[0] = dict(rows[0], answer="A")
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    again = FakeAnswerer(DIRECT)
    run_eval(data, again, out)
    assert [p.question.split("\n")[0] for p in again.prompts] == ["What color is the car?"]
    assert json.loads((out / "predictions.jsonl").read_text().splitlines()[0])["answer"] == "A"


def test_predictions_keep_the_verdicts_the_score_counts(tmp_path):
    """A kind or category edited since a question was answered (the same prompt) changed score.json, rescored from
    the stored answers, but predictions.jsonl kept the earlier kind, category and verdict (scripts that read its
    "correct" counted otherwise); its rows are now brought up to date, without asking again."""
    data = write_bench(tmp_path / "data")
    out = tmp_path / "out"
    run_eval(data, FakeAnswerer(DIRECT), out)
    before = (out / "predictions.jsonl").read_text()
    assert run_eval(data, FakeAnswerer(DIRECT, fail=True), out)["correct"] == 3
    assert (out / "predictions.jsonl").read_text() == before  # nothing changed: nothing rewritten
    rows = [*BENCH[:3], dict(BENCH[3], kind="text"), dict(BENCH[4], category="city"), BENCH[5]]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    score = run_eval(data, FakeAnswerer(DIRECT, fail=True), out)  # "3 dogs" is no longer "3" as text
    stored = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [row["id"] for row in stored] == ["1", "2", "3", "4", "5", "6"]
    assert (stored[3]["kind"], stored[3]["extracted"], stored[3]["correct"]) == ("text", "3 dogs", False)
    assert stored[4]["category"] == "city"
    assert score["correct"] == sum(row["correct"] is True for row in stored) == 2


def test_resume_asks_again_where_an_image_file_was_edited_in_place(tmp_path):
    """A stored prediction was reused when its image path was the same, though the file had been
    overwritten since: the score mixed answers about the old picture. A touch or a copy that keeps the
    bytes keeps the predictions; a row written before stamps were kept is not compared on them."""
    import os

    data = write_bench(tmp_path / "data")
    out = tmp_path / "out"
    run_eval(data, FakeAnswerer(DIRECT), out)
    image = tmp_path / "data" / "img.png"
    os.utime(image, ns=(1, 1))
    run_eval(data, FakeAnswerer(DIRECT, fail=True), out)
    Image.new("RGB", (56, 56), (220, 20, 20)).save(image)
    again = FakeAnswerer(DIRECT)
    run_eval(data, again, out)
    assert [p.question.split("\n")[0] for p in again.prompts] == [  # questions 1, 3 and 6 have the image
        "What color is the car?", "Is there a cat in the image?", "It is noon."]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [len(r["stamps"]) for r in rows] == [1, 0, 1, 0, 0, 1]
    (out / "predictions.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "stamps"}) + "\n"
                                                   for r in rows))
    Image.new("RGB", (56, 56), (20, 220, 20)).save(image)
    run_eval(data, FakeAnswerer(DIRECT, fail=True), out)


def test_the_settings_record_a_local_model_folder_by_its_resolved_path_and_a_hub_id_as_typed(tmp_path, monkeypatch):
    """settings.json kept --model as typed: resuming with ./m, m/ or /abs/m was refused as another model,
    and a model m in another folder was taken for the same one."""

    data = write_bench(tmp_path / "data")
    (tmp_path / "m").mkdir()
    (tmp_path / "data" / "m").mkdir()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    run_eval(data, FakeAnswerer(DIRECT), out, settings={"model": "m"})
    assert json.loads((out / "settings.json").read_text())["model"] == str(tmp_path / "m")
    for same in ("./m", "m/", str(tmp_path / "m")):
        run_eval(data, FakeAnswerer(DIRECT, fail=True), out, settings={"model": same})
    monkeypatch.chdir(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"other settings \(model\)"):
        run_eval(data, FakeAnswerer(DIRECT), out, settings={"model": "m"})
    monkeypatch.chdir(tmp_path)  # a folder written before: the model as typed, read against the current folder
    (out / "settings.json").write_text(json.dumps({**json.loads((out / "settings.json").read_text()), "model": "m"}))
    run_eval(data, FakeAnswerer(DIRECT, fail=True), out, settings={"model": "./m"})
    run_eval(data, FakeAnswerer(DIRECT), tmp_path / "hub", settings={"model": "OpenGVLab/InternVL2_5-1B-MPO"})
    assert json.loads((tmp_path / "hub" / "settings.json").read_text())["model"] == "OpenGVLab/InternVL2_5-1B-MPO"


def test_a_run_in_another_precision_is_refused_before_the_model_loads(tmp_path):
    """--dtype was not recorded: a resume in another precision mixed its answers with the first run's."""
    from internvl_mpo.errors import ConfigError
    from internvl_mpo.evaluate import eval_

    data = write_bench(tmp_path / "data")
    (tmp_path / "m").mkdir()
    out = tmp_path / "out"
    settings = {"model": str(tmp_path / "m"), "max_num": 6, "max_new_tokens": 4096, "dtype": "float32"}
    run_eval(data, FakeAnswerer(DIRECT), out, settings=settings)
    run = dict(data=str(data), model=str(tmp_path / "m"), output=str(out), device="cpu")
    with pytest.raises(ConfigError, match=r"other settings \(dtype\)"):
        eval_(**run, dtype="bfloat16")
    with pytest.raises(ConfigError, match="no such config file"):  # the same settings: on to loading the model
        eval_(**run, dtype="float32")


@pytest.mark.parametrize("limit", [0, -1])
def test_limits_below_one_are_refused(tmp_path, limit, capsys):
    data = write_bench(tmp_path / "data")
    with pytest.raises(InputError, match=f"limit must be at least 1, got {limit}"):
        run_eval(data, FakeAnswerer(DIRECT), tmp_path / "out", limit=limit)
    from internvl_mpo.cli import main

    # refused before the (here missing) model is loaded
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), f"--limit={limit}"]) != 0
    assert f"error: --limit must be at least 1, got {limit}" in capsys.readouterr().err  # the flag, on the command line


def test_an_output_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    from internvl_mpo.cli import main

    data = write_bench(tmp_path / "data")
    (tmp_path / "taken").write_text("a file")
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), "--output",
                 str(tmp_path / "taken")]) != 0
    assert f"error: {tmp_path / 'taken'}: exists and is not a folder" in capsys.readouterr().err
    with pytest.raises(InputError, match="exists and is not a folder"):
        run_eval(data, FakeAnswerer(DIRECT), tmp_path / "taken")


def test_bad_flags_and_another_runs_folder_are_refused_before_the_model_loads(tmp_path, capsys):
    from internvl_mpo.cli import main

    data = write_bench(tmp_path / "data")
    out = tmp_path / "out"
    base = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), "--output", str(out)]
    for flag, message in (("--max-new-tokens=0", "--max-new-tokens must be at least 1, got 0"),
                          ("--max-num=0", "--max-num must be at least 1, got 0"),
                          ("--batch-size=0", "--batch-size must be at least 1, got 0")):
        assert main([*base, flag]) != 0
        assert f"error: {message}" in capsys.readouterr().err
    run_eval(data, FakeAnswerer(DIRECT), out, settings={"model": "another", "max_num": 6, "max_new_tokens": 4096,
                                                        "dtype": "float32"})
    base.append("--device=cpu")
    assert main(base) != 0
    assert f"error: {out} holds a run with other settings (model)" in capsys.readouterr().err
    assert main([*base, "--cot"]) != 0
    assert f"error: {out} holds a run with other settings (cot, model)" in capsys.readouterr().err


def test_a_folder_holding_predictions_of_no_eval_run_is_refused_and_left_alone(tmp_path, capsys):
    """An `--output` folder without settings.json was taken for a new run: predictions.jsonl and score.json
    found there (another tool's) were read as this run's and overwritten."""
    from internvl_mpo.cli import main

    data = write_bench(tmp_path / "data")
    out = tmp_path / "results"
    out.mkdir()
    (out / "predictions.jsonl").write_text('{"id": "1", "response": "mine"}\n')
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), "--output", str(out),
                 "--device=cpu"]) != 0
    assert f"error: {out} holds predictions.jsonl but no settings.json of a pairs or eval run" in capsys.readouterr().err
    (out / "score.json").write_text("{}\n")
    with pytest.raises(ConfigError, match="holds predictions.jsonl, score.json but no settings.json"):
        run_eval(data, FakeAnswerer(DIRECT), out)
    assert (out / "predictions.jsonl").read_text() == '{"id": "1", "response": "mine"}\n'
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "score.json"]


def test_a_second_run_on_the_folder_of_a_live_run_is_refused(tmp_path, capsys):
    """Two evals on one --output both appended to predictions.jsonl and rewrote it under each other; the
    folder is held as train holds its own (an flock, dropped when the run ends however it ends)."""
    import fcntl
    import os
    import socket

    from internvl_mpo.cli import main

    data = write_bench(tmp_path / "data")
    out = tmp_path / "out"
    refused = []

    class WithASecondRun(FakeAnswerer):  # a second run on the folder starts while the first answers
        def __call__(self, prompts, batch_size):
            with pytest.raises(ConfigError) as second:
                run_eval(data, FakeAnswerer(DIRECT), out)
            refused.append(str(second.value))
            yield from super().__call__(prompts, batch_size)

    assert run_eval(data, WithASecondRun(DIRECT), out) == run_eval(data, FakeAnswerer(DIRECT), tmp_path / "alone")
    assert refused == [(f"{out} is in use by another eval run (pid {os.getpid()} on {socket.gethostname()}): two "
                        "runs would overwrite each other's predictions and scores; wait for it to end or choose "
                        "another --output")]
    run_eval(data, FakeAnswerer(DIRECT, fail=True), out)  # the lock went with the run: it resumes
    base = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), "--output", str(out), "--device=cpu"]
    (tmp_path / "new").mkdir()
    with open(out / ".eval.lock", "w") as lock, open(tmp_path / "new" / ".eval.lock", "w") as new:
        for held in (lock, new):  # another host's runs hold them
            fcntl.flock(held, fcntl.LOCK_EX)
            held.write("pid 123 on elsewhere\n")
            held.flush()
        assert main(base) != 0  # refused before the model loads
        assert f"error: {out} is in use by another eval run (pid 123 on elsewhere)" in capsys.readouterr().err
        with pytest.raises(ConfigError, match="in use by another eval run"):
            run_eval(data, FakeAnswerer(DIRECT), tmp_path / "new")
        assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [".eval.lock"]  # no settings recorded
    assert main(base) != 0  # released: on to the next check
    assert f"error: {out} holds a run with other settings" in capsys.readouterr().err


def test_a_question_that_cannot_run_counts_wrong_and_is_asked_again_by_a_rerun(tmp_path):
    data = write_bench(tmp_path / "data")
    out = tmp_path / "out"

    class LongCity(FakeAnswerer):
        def __call__(self, prompts, batch_size):
            for key, answer in super().__call__(prompts, batch_size):
                yield key, InputError("prompt is 9999 tokens") if "city" in self.prompts[-1].question else answer

    score = run_eval(data, LongCity(DIRECT), out, batch_size=4)
    # Question 5 ("London") was wrong anyway: the same score, with question 5 listed as failed.
    assert {k: score[k] for k in EXPECTED} == EXPECTED
    assert score["failed"] == [f"{data}:5 (id '5'): prompt is 9999 tokens"]
    rows = {r["id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert rows["5"]["correct"] is False and rows["5"]["error"] == "prompt is 9999 tokens"
    # A rerun asks the failed question again (out of memory, say, may not happen twice), and only that one.
    rerun = FakeAnswerer(dict(DIRECT, city="Paris"))
    score = run_eval(data, rerun, out)
    assert [p.question for p in rerun.prompts] == ["Which city is this?\nAnswer the question using a single word or "
                                                   "phrase."]
    assert score["failed"] == [] and score["correct"] == EXPECTED["correct"] + 1
    assert run_eval(data, FakeAnswerer(DIRECT, fail=True), out) == score  # answered now: not asked again


def test_a_damaged_predictions_row_is_named_not_a_traceback(tmp_path):
    """A hand-edited predictions.jsonl row whose prediction is no string failed in rescoring (AttributeError)."""
    data = write_bench(tmp_path / "data")
    out = tmp_path / "out"
    run_eval(data, FakeAnswerer(DIRECT), out)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    rows[0]["prediction"] = 5
    (out / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(InputError, match=f"the row of id {rows[0]['id']!r} is not one eval writes"):
        run_eval(data, FakeAnswerer(DIRECT, fail=True), out)


def test_rows_without_an_id_are_numbered_in_file_order(tmp_path):
    path = tmp_path / "bench.jsonl"
    rows = [{"question": "How many dogs?", "answer": "3"}, {"question": "Is it red?", "answer": "no"},
            {"id": "x", "question": "Which city?", "answer": "Paris"}, {"question": "How many cats?", "answer": "2"}]
    path.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(row) + "\n" for row in rows[1:]))
    # Numbered as `generate` numbers requests: blank lines do not count; file:line still names the line.
    assert [(i.id, i.where) for i in read_benchmark(path)] == [
        ("1", f"{path}:1"), ("2", f"{path}:3"), ("x", f"{path}:4"), ("4", f"{path}:5")]
    path.write_text("".join(json.dumps(row) + "\n" for row in [rows[0], dict(rows[1], id=1)]))
    with pytest.raises(InputError, match=r"bench.jsonl:2: id '1' appears twice \(first at .*bench.jsonl:1\)"):
        read_benchmark(path)
    path.write_text(json.dumps(dict(rows[0], id=None)) + "\n")
    with pytest.raises(InputError, match=r"bench.jsonl:1: field 'id' is required \(a string or a number\)"):
        read_benchmark(path)


def test_a_folder_given_as_the_data_or_items_file_is_named_as_a_folder(tmp_path):
    """It was reported as "benchmark file not found" (and "requests file" / "items file not found")."""
    from internvl_mpo.jsonl import read_objects

    with pytest.raises(InputError, match=rf"^{tmp_path}: is a folder; give the benchmark file$"):
        read_benchmark(tmp_path)
    with pytest.raises(InputError, match=rf"^{tmp_path}: is a folder; give the requests file$"):
        next(read_objects(tmp_path, "requests file"))
    with pytest.raises(InputError, match=rf"^{tmp_path / 'nope.jsonl'}: requests file not found$"):
        next(read_objects(tmp_path / "nope.jsonl", "requests file"))


def test_a_pipe_given_as_the_data_or_items_file_is_named_as_such(tmp_path):
    """A shell's `--input <(...)` (a pipe) or /dev/null was reported as "requests file not found"."""
    from internvl_mpo.jsonl import read_objects

    pipe = tmp_path / "requests.jsonl"
    os.mkfifo(pipe)  # opening it to read would wait for a writer: it must be refused before
    for path, what in ((pipe, "requests file"), (Path(os.devnull), "items file")):
        message = rf"^{path}: not a regular file \(a pipe or a device\); give the {what} as a file$"
        with pytest.raises(InputError, match=message):
            next(read_objects(path, what))
    with pytest.raises(InputError, match=rf"^{pipe}: not a regular file .* give the benchmark file as a file$"):
        read_benchmark(pipe)


def test_bad_input_is_named_with_its_line_before_any_answer(tmp_path):
    data = write_bench(tmp_path)
    (tmp_path / "notes.png").write_text("not an image")
    rows = [dict(BENCH[0]), dict(BENCH[1], image="notes.png")]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(InputError, match=r"bench.jsonl:2: .*notes.png: not an image"):
        read_benchmark(data)
    rows = [dict(BENCH[0]), dict(BENCH[1], image=["http://example.com/b.png"])]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(InputError, match=r"bench.jsonl:2: http://example.com/b.png: is a URL"):
        read_benchmark(data)
    rows = [BENCH[0], BENCH[1], dict(BENCH[2], id="1")]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(InputError, match=r"bench.jsonl:3: id '1' appears twice \(first at .*bench.jsonl:1\)"):
        read_benchmark(data)
    with open(tmp_path / "bad.tsv", "w", encoding="utf-8") as f:
        f.write("index\tquestion\tanswer\timage\n7\tIs it red?\tyes\t" + base64.b64encode(b"not an image " * 10).decode() + "\n")
    with pytest.raises(InputError, match=r"bad.tsv:row 2 \(index 7\): .*not an image"):
        read_benchmark(tmp_path / "bad.tsv")
    for extra, why in [({"images": ["a.png"]}, r"'images' is not read; did you mean 'image'\?"),
                       ({"video": "clip.mp4"}, "'video' is not supported")]:
        data.write_text(json.dumps({"id": "1", "question": "How many?", "answer": "2", **extra}) + "\n")
        with pytest.raises(InputError, match=rf"bench.jsonl:1: field {why}"):
            read_benchmark(data)
    # a video given as an image was pointed to --video, a flag eval does not have
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(64))
    data.write_text(json.dumps({"id": "1", "question": "How many?", "answer": "2", "image": "clip.mp4"}) + "\n")
    with pytest.raises(InputError, match=r"bench.jsonl:1: .*clip.mp4: .*looks like a video: videos are not read "
                                         r"here; give frames as a list of paths in 'image'$"):
        read_benchmark(data)
    # a hint or category that is no text went into the prompt or score.json as its repr; an empty image path
    # was read as the data file's folder
    for extra, why in [({"hint": {"text": "It is noon."}}, r"'hint' must be a string, got \{'text'"),
                       ({"category": ["count"]}, r"'category' must be a string, got \['count'\]"),
                       ({"hint": True}, "'hint' must be a string, got True"),
                       ({"image": ["img.png", ""]}, r"'image' must be a path or a list of paths, got \['img.png', ''")]:
        data.write_text(json.dumps({"id": "1", "question": "How many?", "answer": "2", **extra}) + "\n")
        with pytest.raises(InputError, match=rf"bench.jsonl:1: field {why}"):
            read_benchmark(data)
    data.write_text(json.dumps({"id": "1", "question": "How many?", "answer": " "}) + "\n")
    with pytest.raises(InputError, match=r"bench.jsonl:1: the answer is empty"):
        read_benchmark(data)
    # placeholders that do not fit the images failed each such question after the model loaded
    for image, count in [(None, 1), ("img.png", 2)]:
        data.write_text(json.dumps({"id": "1", "question": "<image> " * count + "How many?", "answer": "2",
                                    **({"image": image} if image else {})}) + "\n")
        with pytest.raises(InputError, match=rf"bench.jsonl:1: the question has {count} <image> placeholder\(s\) for "
                                             rf"{count - 1} image\(s\)"):
            read_benchmark(data)
    # an empty question was asked as an empty prompt; a TSV row cut short gave None, failing in the engine
    data.write_text(json.dumps({"id": "1", "question": " ", "answer": "yes"}) + "\n")
    with pytest.raises(InputError, match=r"bench.jsonl:1: the question is empty"):
        read_benchmark(data)
    (tmp_path / "empty.tsv").write_text("index\tquestion\tanswer\n1\tIs it red?\tyes\n2\t\tyes\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"empty.tsv:row 3 \(index 2\): the question is empty"):
        read_benchmark(tmp_path / "empty.tsv")
    (tmp_path / "short.tsv").write_text("index\tanswer\tquestion\n1\tyes\tIs it red?\n2\tyes\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"short.tsv:row 3: 2 cells, but the header has 3 columns"):
        read_benchmark(tmp_path / "short.tsv")


# ----------------------------------------------------------------------------- MMBench TSV


def png_b64(color, size=(56, 56), noise=False) -> str:
    image = Image.new("RGB", size, color)
    if noise:
        rng = random.Random(0)
        image.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(size[0] * size[1])])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path: Path) -> list[dict]:
    rows = [
        {"index": "10", "question": "What color is the square?", "hint": "", "A": "red", "B": "green", "C": "blue",
         "D": "", "answer": "C", "category": "color", "image": png_b64((0, 0, 255))},
        {"index": "11", "question": "Which shape is it?\n(look closely)", "hint": "Only one shape is drawn.",
         "A": "square", "B": "circle", "C": "", "D": "", "answer": "A", "category": "shape", "image": "10"},
        {"index": "12", "question": "What is in the picture?", "hint": "nan", "A": "noise", "B": "a cat",
         "C": "a dog", "D": "a car", "answer": "A", "category": "scene",
         "image": png_b64(None, (260, 260), noise=True)},  # over csv's 128 kB default field limit
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_reads_mmbench_tsv_with_shared_and_large_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output folder, mmbench_eval, goes here
    rows = write_tsv(tmp_path / "mmbench.tsv")
    limit = csv.field_size_limit()
    items = read_benchmark(tmp_path / "mmbench.tsv")
    assert csv.field_size_limit() == limit
    assert len(rows[2]["image"]) > 131072
    assert [i.id for i in items] == ["10", "11", "12"]
    assert items[0].options == {"A": "red", "B": "green", "C": "blue"} and items[0].kind == "choice"
    assert items[1].images == items[0].images  # "10" in the image cell: row 10's image
    assert Image.open(io.BytesIO(items[0].images[0])).getpixel((5, 5)) == (0, 0, 254)  # blue, through JPEG
    assert Image.open(io.BytesIO(items[2].images[0])).size == (260, 260)
    assert items[2].hint == ""
    assert build_prompt(items[1]) == f"Only one shape is drawn.\nWhich shape is it?\n(look closely)\nA. square\nB. circle\n{MCQ}"
    score = run_eval(tmp_path / "mmbench.tsv", FakeAnswerer({"color": "C. blue", "shape": "circle", "picture": "A"}))
    assert score["correct"] == 2 and score["categories"]["shape"]["correct"] == 0
    assert json.loads((tmp_path / "mmbench_eval" / "score.json").read_text()) == score


def test_tsv_with_a_byte_order_mark_or_not_utf8(tmp_path):
    """A TSV saved with a UTF-8 BOM (Excel, Notepad) reads as without it, as pandas reads it; one in
    another encoding is an InputError naming the file and row, not a UnicodeDecodeError."""
    text = "index\tquestion\tanswer\tA\tB\n1\tCafé or tea?\tA\tcafé\ttea\n"
    (tmp_path / "bom.tsv").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    items = read_benchmark(tmp_path / "bom.tsv")
    assert [(i.id, i.question, i.options) for i in items] == [("1", "Café or tea?", {"A": "café", "B": "tea"})]
    (tmp_path / "latin1.tsv").write_bytes(text.encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.tsv: not valid UTF-8 \(line 2\)"):
        read_benchmark(tmp_path / "latin1.tsv")
    (tmp_path / "noindex.tsv").write_text("index\tquestion\tanswer\n1\tq?\t2\n\tq?\t3\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"noindex.tsv:row 3: the index is empty"):
        read_benchmark(tmp_path / "noindex.tsv")
    # VLMEvalKit's local-file column: not read here, so its questions would be asked without their images
    (tmp_path / "paths.tsv").write_text("index\tquestion\tanswer\timage_path\n1\tq?\t2\ta.jpg\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"paths.tsv: images given as an image_path column"):
        read_benchmark(tmp_path / "paths.tsv")


def test_a_tsv_whose_cells_do_not_fit_its_header_is_refused_naming_the_row_or_column(tmp_path):
    """A column named twice kept its last copy, a row with a cell too many dropped it and a row with one too few
    left the last columns empty (option B was left out); a blank first line made the header look empty. A cell the
    csv reader refuses (a quote never closed, text after a closing quote) was named by the file alone: by its line."""
    header = "index\tquestion\tA\tB\tanswer\n"
    for text, problem in [
        ("", r"the file is empty \(or blank\); expected a header row naming the columns"),
        ("\n\n", r"the file is empty \(or blank\)"),
        ("index\tquestion\n1\tWhich?\n", r"missing column\(s\) answer"),
        ("index\tquestion\tanswer\tanswer\n1\tq?\t2\t3\n", "column 'answer' appears more than once in the header"),
        (header + "1\tWhich?\tred\tblue\tA\n2\tWhich?\tred\tA\n", ":row 3: 4 cells, but the header has 5 columns"),
        (header + "1\tWhich?\tred\tblue\tA\tB\n", ":row 2: 6 cells, but the header has 5 columns"),
        (header + '1\t"Which?\tred\tblue\tA\n2\tWhich?\tred\tblue\tA\n',  # a quote opens a cell, never closed
         r":line 2: not a readable TSV \(unexpected end of data"),
        (header + '1\tWhich?\tred\tblue\tA\n\n2\t"Red" or what?\tred\tblue\tA\n',  # blank line 3 skipped
         r":line 4: not a readable TSV \('\t' expected after '\"'"),
    ]:
        (tmp_path / "bad.tsv").write_text(text, encoding="utf-8")
        with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path / 'bad.tsv'))}{'' if text.startswith(header) else ': '}"
                                             rf"{problem}"):
            read_benchmark(tmp_path / "bad.tsv")
    (tmp_path / "good.tsv").write_text("\n" + header + "1\tWhich?\tred\tblue\tA\n\n2\tWhich?\tred\tblue\tB\n",
                                       encoding="utf-8")
    items = read_benchmark(tmp_path / "good.tsv")  # blank lines are skipped, as pandas skips them
    assert [(i.id, i.options, i.answer) for i in items] == [("1", {"A": "red", "B": "blue"}, "A"),
                                                           ("2", {"A": "red", "B": "blue"}, "B")]


def write_circular_tsv(path: Path) -> None:
    """Two questions with rotated copies, in MMBench's order: the questions first (1, 2), then their
    rotations (1000001, 1000002, 2000001)."""
    image = png_b64((0, 0, 255))
    rotations = {"color": [("red", "blue", "green"), ("blue", "green", "red"), ("green", "red", "blue")],
                 "shape": [("square", "circle"), ("circle", "square")]}
    truth = {"color": "blue", "shape": "square"}
    rows = []
    for k in range(3):
        for i, (name, question) in enumerate([("color", "What color is it?"), ("shape", "Which shape is it?")], 1):
            if k < len(rotations[name]):
                options = rotations[name][k]
                rows.append({"index": str(i + k * 10**6), "question": question, "A": options[0], "B": options[1],
                             "C": options[2] if len(options) > 2 else "",
                             "answer": "ABC"[options.index(truth[name])], "category": name,
                             "image": image if not rows else "1"})
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def answer_circular(prompts, batch_size):  # the color always right (by its text), the shape always "A"
    return [(key, "A" if "shape" in p.question else
             next(line[0] for line in p.question.splitlines() if line.endswith(". blue"))) for key, p in prompts]


def test_mmbench_tsv_with_rotated_copies_is_scored_circularly(tmp_path):
    """VLMEvalKit's circular evaluation: rows i + k * 10**6 rotate question i's options; the question
    counts only when every rotation is answered right."""
    write_circular_tsv(tmp_path / "mmb.tsv")
    score = run_eval(tmp_path / "mmb.tsv", answer_circular, tmp_path / "out")
    assert (score["correct"], score["total"], score["rows"], score["circular"]) == (1, 2, 5, True)
    assert score["categories"] == {"color": {"accuracy": 1.0, "correct": 1, "total": 1},
                                   "shape": {"accuracy": 0.0, "correct": 0, "total": 1}}


def test_large_indexes_that_are_no_rotated_copies_are_questions_of_their_own(tmp_path):
    """Any index of 10**6 or more made a TSV circular: rows 5 and 1000005 of a file with other large indexes
    were scored as one question (right only when both were), and a row without its original as its own."""
    rows = [{"index": index, "question": question, "A": "red", "B": "blue", "answer": "B", "category": "c"}
            for index, question in [("5", "What color is the sky?"), ("1000005", "What color is the sea?"),
                                    ("2000007", "What color is the lake?")]]
    with open(tmp_path / "big.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)

    def answer(prompts, batch_size):  # the sky right, the sea and the lake wrong
        return [(key, "B" if "sky" in p.question else "A") for key, p in prompts]

    score = run_eval(tmp_path / "big.tsv", answer, tmp_path / "out")
    assert (score["correct"], score["total"]) == (1, 3) and "circular" not in score


def test_limit_takes_the_first_questions_with_all_their_rotations(tmp_path):
    """--limit counted rows: with MMBench's order (questions, then their rotations) --limit 2 scored both
    questions on one row each, and a question was right when the rotations left out would have failed it."""
    write_circular_tsv(tmp_path / "mmb.tsv")
    score = run_eval(tmp_path / "mmb.tsv", answer_circular, tmp_path / "one", limit=1)
    assert (score["correct"], score["total"], score["rows"], score["circular"]) == (1, 1, 3, True)
    rows = (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(row)["id"] for row in rows] == ["1", "1000001", "2000001"]
    score = run_eval(tmp_path / "mmb.tsv", answer_circular, tmp_path / "two", limit=2)
    assert (score["correct"], score["total"], score["rows"]) == (1, 2, 5)
    assert run_eval(tmp_path / "mmb.tsv", answer_circular, tmp_path / "more", limit=3) == score


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from conftest import tiny_chat_folder

    folder, _ = tiny_chat_folder(tmp_path_factory.mktemp("ckpt") / "model")
    return folder


def test_a_model_saved_again_into_its_folder_does_not_resume_the_earlier_weights_answers(tiny_model, tmp_path):
    """A model retrained or converted into the run's model folder counted as the same model: a rerun kept the
    earlier weights' predictions and scored them as the new model's. Their save id is recorded and compared."""
    import shutil

    from internvl_mpo.evaluate import eval_

    model = shutil.copytree(tiny_model, tmp_path / "model")
    data, out = write_bench(tmp_path / "data"), tmp_path / "out"
    run = dict(data=str(data), model=str(model), output=str(out), limit=1, max_new_tokens=1, device="cpu",
               progress=False)
    check_resave_refuses_resume(lambda: eval_(**run), model, out)


def test_a_replaced_weight_file_does_not_resume_the_earlier_weights_answers(tiny_model, tmp_path):
    """Weights without a save id (official checkpoints) recorded none: a shard replaced by other weights resumed
    with the earlier predictions kept. The stamps of the weight files are recorded and compared now."""
    import shutil

    from internvl_mpo.evaluate import eval_

    model = official_shards(shutil.copytree(tiny_model, tmp_path / "model"))
    data, out = write_bench(tmp_path / "data"), tmp_path / "out"
    run = dict(data=str(data), model=str(model), output=str(out), limit=1, max_new_tokens=1, device="cpu",
               progress=False)
    check_replaced_weights_refuse_resume(lambda: eval_(**run), model, out / "settings.json", "out holds a run with")


def test_real_model_on_tsv_through_the_cli(tiny_model, tmp_path, capsys):
    from internvl_mpo.cli import main
    from internvl_mpo.pipeline import InternVLChat

    write_tsv(tmp_path / "mmbench.tsv")
    out = tmp_path / "out"
    args = ["eval", "--model", str(tiny_model), "--data", str(tmp_path / "mmbench.tsv"), "--output", str(out),
            "--max-new-tokens", "4", "--batch-size", "2", "--device", "cpu", "--dtype", "float32"]
    assert main(args) == 0
    assert "overall" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    score = json.loads((out / "score.json").read_text())
    assert [r["id"] for r in rows] == ["10", "11", "12"] and score["total"] == 3
    assert score["correct"] == sum(r["correct"] is True for r in rows)
    # Batched evaluation gives what a single greedy chat() gives for the same prompt and image.
    item = read_benchmark(tmp_path / "mmbench.tsv")[2]
    chat = InternVLChat.from_pretrained(tiny_model, dtype="float32")
    single = chat.chat(build_prompt(item), list(item.images), do_sample=False, max_new_tokens=4, max_num=6,
                       total_max_num=64)
    assert rows[2]["prediction"] == single


def test_eval_reads_each_weight_files_header_once(tiny_model, tmp_path, monkeypatch):
    """--dtype auto without a config dtype read the shards' headers for the run's recorded dtype, and the load
    read them all again."""
    from internvl_mpo.cli import main

    model = bf16_shards_without_dtype(tiny_model, tmp_path / "bf16")
    opened = record_header_reads(monkeypatch)
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({"id": "a", "question": "How many?", "answer": "2"}) + "\n")
    args = ["eval", "--model", str(model), "--data", str(path), "--output", str(tmp_path / "out"),
            "--max-new-tokens", "2", "--device", "cpu", "--dtype", "auto"]
    assert main(args) == 0
    shards = sorted(model.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(opened) == shards
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "out" / "score.json").read_text())["total"] == 1


def test_real_model_counts_a_prompt_longer_than_the_context_wrong(tiny_model, tmp_path, capsys):
    from internvl_mpo.cli import main

    path = tmp_path / "bench.jsonl"
    rows = [{"id": "short", "question": "How many?", "answer": "2"},
            {"id": "long", "question": "dog " * 20000, "answer": "2"}]  # 40000 tokens; the context is 32768
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["eval", "--model", str(tiny_model), "--data", str(path), "--output", str(tmp_path / "out"),
            "--max-new-tokens", "2", "--device", "cpu", "--dtype", "float32"]
    for _ in range(2):  # the rerun finds both questions answered
        assert main(args) == 0
        assert f"failed (counted wrong) {path}:2 (id 'long'): prompt is 40" in capsys.readouterr().out
    score = json.loads((tmp_path / "out" / "score.json").read_text())
    assert score["total"] == 2 and len(score["failed"]) == 1
    predictions = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in predictions] == ["short", "long"]


def test_a_question_whose_image_fills_the_context_names_the_flag(tiny_model, tmp_path, capsys):
    """The failure named max_num and total_max_num, Python's names, where eval has --max-num and no total flag."""
    import shutil

    from internvl_mpo.cli import main

    model = shutil.copytree(tiny_model, tmp_path / "short")
    config = json.loads((model / "config.json").read_text())
    config["llm_config"]["max_position_embeddings"] = 100  # 4 tokens a tile: 41 tiles do not fit
    (model / "config.json").write_text(json.dumps(config))
    Image.new("RGB", (40, 1)).save(tmp_path / "strip.png")
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({"id": "a", "image": "strip.png", "question": "How many?", "answer": "2"}) + "\n")
    assert main(["eval", "--model", str(model), "--data", str(path), "--output", str(tmp_path / "out"),
                 "--max-num", "40", "--max-new-tokens", "1", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"failed (counted wrong) {path}:1 (id 'a'): prompt is " in out
    assert "; the images take 41 tiles ([41] by image; a smaller --max-num gives fewer)\n" in out


def test_no_progress_hides_the_progress_bar(tiny_model, tmp_path, capsys):
    """--no-progress, as train's, keeps a job's log free of the bar's lines; eval had none."""
    from internvl_mpo.cli import main

    data = write_bench(tmp_path / "data")
    run_eval(data, FakeAnswerer(DIRECT), tmp_path / "shown")
    assert "eval: 100%" in capsys.readouterr().err
    run_eval(data, FakeAnswerer(DIRECT), tmp_path / "hidden", progress=False)
    assert capsys.readouterr().err == ""
    args = ["eval", "--model", str(tiny_model), "--data", str(data), "--output", str(tmp_path / "cli"),
            "--max-new-tokens", "1", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    assert main(args) == 0
    assert capsys.readouterr().err == ""


def eval_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "internvl_mpo.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_cli_writes_into_the_current_folder_says_where_and_resumes(tiny_model, tmp_path):
    data = write_bench(tmp_path / "data")
    run = tmp_path / "run"
    run.mkdir()
    args = ["--model", tiny_model, "--data", data, "--cot", "--max-new-tokens", "2", "--device", "cpu"]
    first = eval_cli(*args, cwd=run)
    assert first.returncode == 0, first.stderr
    out = run / "bench_cot_eval"  # the help's default: <data stem>_cot_eval with --cot, in the current folder
    assert sorted(p.name for p in out.iterdir()) == [".eval.lock", "predictions.jsonl", "score.json", "settings.json"]
    assert sorted(p.name for p in data.parent.iterdir()) == ["bench.jsonl", "img.png"]
    where = "predictions and scores: bench_cot_eval/predictions.jsonl, bench_cot_eval/score.json"
    assert first.stdout.splitlines()[-1] == where
    predictions = (out / "predictions.jsonl").read_text()
    assert len(predictions.splitlines()) == 6
    again = eval_cli(*args, cwd=run)  # resumes: every answer is found, none is added
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout and (out / "predictions.jsonl").read_text() == predictions
    assert eval_cli(*args, "--output", tmp_path / "elsewhere", cwd=run).stdout.splitlines()[-1] == (
        f"predictions and scores: {tmp_path}/elsewhere/predictions.jsonl, {tmp_path}/elsewhere/score.json")
    usage = " ".join(eval_cli("--help", cwd=run).stdout.split())
    assert "./<data stem>_eval, or ./<data stem>_cot_eval with --cot, in the current folder" in usage


def test_answers_that_finish_out_of_order_are_stored_in_data_order(tmp_path):
    """Continuous batching hands answers back as they finish; predictions.jsonl ends in data order."""
    data = write_bench(tmp_path / "data")

    class Backwards(FakeAnswerer):
        def __call__(self, prompts, batch_size):
            return list(super().__call__(prompts, batch_size))[::-1]

    score = run_eval(data, Backwards(DIRECT), tmp_path / "out", batch_size=3)
    assert score == run_eval(data, FakeAnswerer(DIRECT), tmp_path / "in_order")
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5", "6"]


def test_an_answerer_that_leaves_a_question_out_is_an_error(tmp_path):
    data = write_bench(tmp_path / "data")

    class Forgetful(FakeAnswerer):
        def __call__(self, prompts, batch_size):
            return list(super().__call__(prompts, batch_size))[1:]

    with pytest.raises(InputError, match=r"gave no answer for 1 questions \(ids \['1'\]\)"):
        run_eval(data, Forgetful(DIRECT), tmp_path / "out")


def test_eval_help_lists_every_jsonl_field(capsys):
    """`eval --help` left out the "hint" and "kind" fields that a JSONL line may hold."""
    from internvl_mpo.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    for field in ("id", "image", "question", "answer", "options", "hint", "category", "kind"):
        assert f'"{field}"' in text
    # a hint goes before a question of any kind (it said a multiple-choice one's only)
    assert '"hint" (a line before the question, left out with --cot)' in text


def test_a_misspelt_field_is_refused_with_the_field_it_probably_meant(tmp_path):
    """"imgae" or "hnit" was ignored and the question asked without its image or hint; fields with other names
    (ids, metadata) are still ignored."""
    data = write_bench(tmp_path)
    good = {"id": "a", "question": "Is it blue?", "answer": "yes", "image": "img.png"}
    extra = {"question_id": 7, "image_id": "x", "split": "dev", "meta": {"k": 1}}
    data.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, id="b", hint="Look.", **extra)) + "\n")
    assert read_benchmark(data)[1].hint == "Look."
    for bad, meant in [({"imgae": "img.png"}, "image"), ({"images": ["img.png"]}, "image"),
                       ({"hnit": "Look."}, "hint"), ({"categroy": "color"}, "category"),
                       ({"Answer": "yes"}, "answer"), ({"videos": "c.mp4"}, "video")]:
        row = dict({"id": "b", "question": "Is it blue?", "answer": "yes"}, **bad)
        if "Answer" in bad:
            del row["answer"]
        data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(InputError, match=rf"bench.jsonl:2: field '{next(iter(bad))}' is not read; "
                                             rf"did you mean '{meant}'\?$"):
            read_benchmark(data)


def test_another_name_for_a_field_is_refused_with_the_field_it_means(tmp_path):
    """"image_path", "img" or "prompt" was ignored: the question was asked without its image (or refused as
    lacking a question, without saying which field was meant)."""
    data = write_bench(tmp_path)
    for bad, meant in [({"image_path": "img.png"}, "image"), ({"image_file": "img.png"}, "image"),
                       ({"img": "img.png"}, "image"), ({"images_path": ["img.png"]}, "image"),
                       ({"video_path": "c.mp4"}, "video"), ({"prompt": "Is it blue?"}, "question")]:
        row = dict({"id": "b", "answer": "yes"}, **({} if "prompt" in bad else {"question": "Is it blue?"}), **bad)
        data.write_text(json.dumps(row) + "\n")
        with pytest.raises(InputError, match=rf"bench.jsonl:1: field '{next(iter(bad))}' is not read; "
                                             rf"did you mean '{meant}'\?$"):
            read_benchmark(data)


def test_max_pixels_refuses_a_larger_image_naming_the_flag_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """`eval` had no --max-pixels: an image over Pillow's limit was refused with "a larger max_pixels allows it",
    a setting it did not take, and a larger one could not be allowed. A TSV's images are checked too."""
    from PIL import Image as PILImage

    from internvl_mpo.cli import main

    data = write_bench(tmp_path / "data")  # img.png: 56 x 56 = 3136 pixels, on lines 1, 3 and 6
    base = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(data), "--output", str(tmp_path / "out"),
            "--device", "cpu"]
    assert main([*base, "--max-pixels", "3000"]) == 1
    assert capsys.readouterr().err == (f"internvl-mpo eval: error: {data}:1: {data.parent / 'img.png'}: 56x56 = 3136 "
                                       "pixels exceeds the limit of 3000 (possible decompression bomb; a larger "
                                       "--max-pixels allows it)\n")
    assert main([*base, "--max-pixels", "3136"]) == 1  # read: on to loading the model, which is not there
    assert "no-model: no such checkpoint folder" in capsys.readouterr().err
    write_tsv(tmp_path / "mmbench.tsv")
    with pytest.raises(InputError, match=r"mmbench.tsv:row 2 \(index 10\): <\d+ bytes>: 56x56 = 3136 pixels exceeds the "
                                         r"limit of 3000 \(possible decompression bomb; a larger max_pixels allows it\)$"):
        read_benchmark(tmp_path / "mmbench.tsv", max_pixels=3000)
    assert len(read_benchmark(tmp_path / "mmbench.tsv", max_pixels=260 * 260)) == 3
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # Pillow then refuses over 2000 pixels
    assert main([*base, "--max-pixels", "5000"]) == 1  # a limit above Pillow's raises Pillow's
    assert "no-model: no such checkpoint folder" in capsys.readouterr().err


def test_options_that_a_question_of_another_kind_would_be_asked_without_are_refused(tmp_path, capsys):
    """Without --cot only a multiple-choice question is asked with its options: a question of another kind that
    gave options was asked without them, without a word."""
    from internvl_mpo.cli import main

    path = tmp_path / "bench.jsonl"
    row = {"id": "a", "question": "How many?", "options": ["2", "3"], "answer": "3", "kind": "number"}
    path.write_text(json.dumps(row) + "\n")
    args = ["eval", "--model", str(tmp_path / "no-model"), "--data", str(path), "--output", str(tmp_path / "out")]
    assert main(args) != 0
    assert "bench.jsonl:1: the question gives options, but its kind is 'number'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before the model loads
    with pytest.raises(InputError, match="bench.jsonl:1: the question gives options, but its kind is 'number'"):
        run_eval(path, FakeAnswerer(DIRECT), tmp_path / "direct")
    assert "A. 2\nB. 3" in build_prompt(read_benchmark(path)[0], cot=True)  # --cot asks with them
    path.write_text(json.dumps({**row, "answer": "B", "kind": "choice"}) + "\n")
    assert "A. 2\nB. 3" in build_prompt(read_benchmark(path)[0])


def test_eval_interrupted_says_what_is_kept_and_the_rerun_resumes(tiny_model, tmp_path, monkeypatch, capsys):
    """Ctrl-C ended eval without a word (generate says what it kept and how to resume); it says so too."""
    from internvl_mpo.cli import main
    from internvl_mpo.pipeline import InternVLChat

    data, out = write_bench(tmp_path / "data"), tmp_path / "out"
    args = ["eval", "--model", str(tiny_model), "--data", str(data), "--output", str(out), "--max-new-tokens", "1",
            "--device", "cpu", "--batch-size", "1"]
    finish = InternVLChat.answers_as_they_finish

    def ctrl_c_after_one(bot, jobs, batch_size):
        for i, done in enumerate(finish(bot, jobs, batch_size)):
            if i == 1:
                raise KeyboardInterrupt
            yield done

    with monkeypatch.context() as m:
        m.setattr(InternVLChat, "answers_as_they_finish", ctrl_c_after_one)
        assert main(args) == 130
    # the last line, below the progress bar
    assert capsys.readouterr().err.endswith(f"internvl-mpo eval: interrupted; {out / 'predictions.jsonl'} keeps 1 "
                                            "answer: run the same command again to resume\n")
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 1
    assert main(args + ["--no-progress"]) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == len(BENCH)


def test_benchmark_files_vlmevalkit_tools_write_are_read_or_refused_by_name(tmp_path):
    """A quote opened in a TSV cell and never closed took every later row into that cell (1 question read of 3; pandas
    refuses the file); a JSONL row written from a VLMEvalKit table (choices as "A", "B" fields) lost its choices, and
    its NaN hint or options became the text "nan"; base64 wrapped in lines of 76 (base64.encodebytes) was refused."""
    tsv = tmp_path / "q.tsv"
    tsv.write_text("index\tquestion\tA\tB\tanswer\tcategory\n1\tWhich is red?\tapple\tsky\tA\t\"fruit\n"
                   "2\tWhich is blue?\tapple\tsky\tB\tcolour\n")
    with pytest.raises(InputError, match=r"q.tsv:line 2: not a readable TSV \(unexpected end of data; a quote opened"):
        read_benchmark(tsv)
    jsonl = tmp_path / "q.jsonl"
    for row, message in [({"A": "apple", "B": "sky"}, r"q.jsonl:1: field 'A' is not read: give the choices as "),
                         ({"hint": float("nan"), "options": ["apple", "sky"]}, "field 'hint' must be a finite"),
                         ({"options": {"A": "apple", "B": float("nan")}}, "\"options\\['B'\\]\" must be a finite"),
                         ({"options": ["apple", float("nan")]}, "field 'options\\[1\\]' must be a finite")]:
        jsonl.write_text(json.dumps({"id": 1, "question": "Which is a fruit?", "answer": "A", **row}) + "\n")
        with pytest.raises(InputError, match=message):
            read_benchmark(jsonl)
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), "red").save(buffer, format="PNG")
    wrapped = base64.encodebytes(buffer.getvalue()).decode()  # newlines every 76 characters: quoted in the cell
    with tsv.open("w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["index", "question", "answer", "image"],
                                                 ["1", "Is it red?", "yes", wrapped]])
    (item,) = read_benchmark(tsv)
    assert Image.open(io.BytesIO(item.images[0])).getpixel((0, 0)) == (254, 0, 0)  # red, through JPEG


def vlmevalkit_dump(encoded: str, folder: Path, index: str) -> bytes:
    """VLMEvalKit's `dump_image` of a TSV row, as its `decode_base64_to_image_file` writes it: the file's bytes."""
    image = Image.open(io.BytesIO(base64.b64decode(encoded)))
    if image.mode in ("RGBA", "P", "LA"):
        image = image.convert("RGB")
    image.save(folder / f"{index}.jpg")
    return (folder / f"{index}.jpg").read_bytes()


def test_tsv_images_are_what_vlmevalkit_writes_for_the_model(tmp_path):
    """VLMEvalKit saves each TSV image as <index>.jpg (a JPEG at quality 75; RGBA, P and LA made RGB) and the model
    reads that file: the images were handed over as decoded from base64, other pixels than VLMEvalKit's run."""
    rng = np.random.default_rng(0)
    pictures = {"rgba": Image.fromarray(rng.integers(0, 256, (40, 60, 4), dtype=np.uint8), "RGBA"),
                "p": Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).quantize(16),
                "gray": Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8), "L"),
                "jpeg": Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))}
    cells = []
    for name, picture in pictures.items():
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG" if name == "jpeg" else "PNG", quality=95)
        cells.append(base64.b64encode(buffer.getvalue()).decode())
    sixteen = io.BytesIO()  # 16-bit: JPEG cannot hold it (VLMEvalKit fails): handed over as given
    Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16)).save(sixteen, format="PNG")
    tsv = tmp_path / "q.tsv"
    with tsv.open("w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows(
            [["index", "question", "answer", "image"], *[[str(i), "What?", "x", c] for i, c in enumerate(cells)],
             ["9", "What?", "x", base64.b64encode(sixteen.getvalue()).decode()], ["10", "Again?", "x", "0"]])
    items = read_benchmark(tsv)
    for i, cell in enumerate(cells):
        assert items[i].images == (vlmevalkit_dump(cell, tmp_path, str(i)),), list(pictures)[i]
    assert items[4].images == (sixteen.getvalue(),)
    assert items[5].images == items[0].images  # a row naming another's image


def test_cot_a_final_answer_with_nothing_after_it_answers_nothing(tmp_path):
    """A --cot response cut right after its "Final answer:" was scored from its whole text (its reasoning's letter or
    number counted), where VLMEvalKit's mpo_post_processing reads the empty answer: it answers nothing now."""
    data = tmp_path / "bench.jsonl"
    rows = [{"id": "1", "question": "Which animal?", "options": ["dog", "cat"], "answer": "B"},
            {"id": "2", "question": "How many?", "answer": "3"}, {"id": "3", "question": "How many?", "answer": "3"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    responses = {"1": "It has whiskers, so B.\nFinal answer:", "2": "I count 3 shapes.\n**Final answer:**",
                 "3": "I count 3 shapes."}  # no trigger: the whole response, as VLMEvalKit reads it

    def answerer(prompts, batch_size):
        for key, _ in prompts:
            yield key, responses[key[0].id]

    score = run_eval(data, answerer, output=tmp_path / "out", cot=True, progress=False)
    assert (score["correct"], score["unparsed"]) == (1, 2)


def test_a_multiple_choice_question_without_options_is_asked_as_vlmevalkit_asks_it(tmp_path):
    """VLMEvalKit's build_multi_choice_prompt asks for "the option's letter from the given choices" only where it
    lists options; without them (the letters in the question's text, a TSV without option columns) it says "Answer
    the question directly." (请直接回答问题。 in Chinese)."""
    rows = [{"id": 1, "question": "Which is larger? (A) 3 (B) 5", "answer": "B"},
            {"id": 2, "question": "哪个更大？(A) 3 (B) 5", "answer": "B"}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    english, chinese = read_benchmark(tmp_path / "q.jsonl")
    assert english.kind == "choice"
    assert build_prompt(english) == "Which is larger? (A) 3 (B) 5\nAnswer the question directly."
    assert build_prompt(chinese) == "哪个更大？(A) 3 (B) 5\n请直接回答问题。"


def test_a_category_or_hint_given_as_the_number_0_is_kept(tmp_path):
    """`str(row.get("category") or "")` made a category 0 (and a hint 0) no category: its questions were scored
    under "(none)", beside category 1."""
    rows = [{"id": 1, "question": "How many?", "answer": "3", "category": 0, "hint": 0},
            {"id": 2, "question": "How many?", "answer": "4", "category": 1}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    first, second = read_benchmark(tmp_path / "q.jsonl")
    assert (first.category, first.hint, second.category) == ("0", "0", "1")
    score = run_eval(tmp_path / "q.jsonl", lambda prompts, n: [(key, "3") for key, _ in prompts], tmp_path / "out")
    assert sorted(score["categories"]) == ["0", "1"]


def test_eval_answers_run_to_vlmevalkits_4096_tokens_by_default():
    """VLMEvalKit evaluates InternVL2.5-MPO with max_new_tokens 4096; eval's 1024 cut longer chains of thought
    before their final answer, which then counted wrong."""
    import inspect

    from internvl_mpo.evaluate import eval_

    assert inspect.signature(eval_).parameters["max_new_tokens"].default == 4096


def test_blank_options_are_left_out_of_a_jsonl_question_as_of_a_tsv_one(tmp_path):
    """A JSONL question's blank options were asked ("C. \\nD. ") and an answer "C" picked one, where the same question
    in a TSV (blank cells, VLMEvalKit's missing values) is asked without them; an option letter given twice in
    another case ({"A": ..., "a": ...}) replaced the first without a word."""
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": 1, "question": "Which is red?", "answer": "A",
                                                  "options": {"A": "apple", "B": "sky", "C": "", "D": " "}}) + "\n")
    with open(tmp_path / "q.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([["index", "question", "A", "B", "C", "D", "answer"],
                                                 ["1", "Which is red?", "apple", "sky", "", "", "A"]])
    (jsonl,), (tsv,) = read_benchmark(tmp_path / "q.jsonl"), read_benchmark(tmp_path / "q.tsv")
    for cot in (False, True):
        assert build_prompt(jsonl, cot) == build_prompt(tsv, cot)
    assert jsonl.options == {"A": "apple", "B": "sky"}
    assert score_response(jsonl, "C", False) == ("C", None)
    (tmp_path / "q.jsonl").write_text(json.dumps({"id": 1, "question": "Which is red?", "answer": "A",
                                                  "options": {"A": "apple", "a": "sky"}}) + "\n")
    with pytest.raises(InputError, match=r"q.jsonl:1: option A is given twice"):
        read_benchmark(tmp_path / "q.jsonl")
