"""Items and benchmark lines found wrong in an end-to-end audit of `pairs` and `eval` (README, "Preference data
and evaluation")."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from internvl_mpo.errors import InputError
from internvl_mpo.evaluate import read_benchmark
from internvl_mpo.pairs import read_items


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
@pytest.mark.parametrize("key", ["answer", "question", "id"])
def test_a_json_number_no_float_holds_is_refused_not_read_as_nan_or_inf(tmp_path, key, number):
    """Python's json reads NaN and Infinity and turns 1e400 into inf: the ground truth was the text "nan" or "inf",
    and the samples were judged against it (the README refuses a ground truth beyond the float range)."""
    fields = {"id": '"a"', "question": '"How many?"', "answer": '"3"', key: number}
    for name, read in [("items.jsonl", lambda p: read_items(p, "correctness")), ("bench.jsonl", read_benchmark)]:
        path = tmp_path / name
        path.write_text("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}\n")
        message = rf"field '{key}' must be a finite number, got -?(nan|inf) \(JSON NaN, Infinity or a number beyond"
        with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:1: {message} about 1.8e308\)$"):
            read(path)


@pytest.mark.parametrize("value", [["3"], {"text": "3"}, True])
def test_eval_names_an_answer_of_the_wrong_type_as_such(tmp_path, value):
    """It said "field 'answer' is required (a string)" of an answer that was there, as a list, an object or a bool
    (and numbers, which are taken, were not named); `pairs` names the value given."""
    path = tmp_path / "bench.jsonl"
    path.write_text(json.dumps({"id": "1", "question": "How many?", "answer": value}) + "\n")
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:1: field 'answer' must be a string or a number, "
                                         rf"got {re.escape(repr(value))}$"):
        read_benchmark(path)
    path.write_text(json.dumps({"id": "1", "question": "How many?"}) + "\n")
    with pytest.raises(InputError, match=r"bench.jsonl:1: field 'answer' is required \(a string or a number\)$"):
        read_benchmark(path)


def test_pairs_and_eval_refuse_each_others_folder_by_name(tmp_path, capsys):
    """`eval --output` a pairs folder (or `pairs --output` an eval folder) said it "holds a run with other settings
    (cot, data, input, method, min_new_tokens, samples, seed, temperature, top_k, top_p)"; it says what it holds."""
    from internvl_mpo.cli import main

    items = tmp_path / "items.jsonl"
    Image.new("RGB", (28, 28), (200, 20, 20)).save(tmp_path / "red.png")
    items.write_text(json.dumps({"id": "1", "image": "red.png", "question": "Is it red?", "answer": "yes"}) + "\n")
    pairs_out, eval_out = tmp_path / "pairs", tmp_path / "bench_eval"
    pairs_out.mkdir()
    (pairs_out / "settings.json").write_text(json.dumps({"method": "correctness", "samples": 32}))
    eval_out.mkdir()
    (eval_out / "settings.json").write_text(json.dumps({"data": str(items), "cot": False}))
    no_model = str(tmp_path / "no-model")
    assert main(["eval", "--model", no_model, "--data", str(items), "--output", str(pairs_out), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == (f"internvl-mpo eval: error: {pairs_out} holds correctness pairs (eval and pairs "
                                       "need output folders of their own): give eval another --output\n")
    assert main(["pairs", "dropout-ntp", "--model", no_model, "--input", str(items), "--output", str(eval_out),
                 "--device", "cpu"]) == 1
    assert capsys.readouterr().err == (f"internvl-mpo pairs: error: {eval_out} holds an eval run's predictions (eval "
                                       "and pairs need output folders of their own): give the dropout-ntp pairs "
                                       "another --output\n")


@pytest.mark.parametrize("text, expected", [
    ("10", None), ("11", None), ("1.5", None), ("-1", None), ("There are 10 shapes.", None), ("1,000", None),
    ("1", "A"), ("(1)", "A"), ("There is 1.", "A"), ("I count 3 shapes", "C"), ("The answer is 2", "B"), ("B", "B"),
])
def test_a_numeric_option_is_not_found_inside_a_longer_number(text, expected):
    """Options 1, 2, 3: "10", "1.5" and "-1" picked option "1" (its text is inside them), so a wrong count was a
    positive sample against a ground truth of A."""
    from internvl_mpo.answers import check_answer, parse_choice

    assert parse_choice(text, ["1", "2", "3"]) == expected
    assert check_answer(text, "1", options=["1", "2", "3"]) is (None if expected is None else expected == "A")


@pytest.mark.parametrize("text, options, expected", [
    ("2.0", ["1", "2", "3"], "B"), ("There are 10 shapes.", ["1", "2", "10"], "C"), ("5 cm", ["5 m", "5 cm"], "B"),
    ("two", ["1", "2", "3"], "B"), ("3", ["3 apples", "4 apples"], "A"), ("1", ["1 dog", "1 cat"], None),
])
def test_a_number_picks_the_one_option_that_is_the_same_number(text, options, expected):
    """"2.0" picked option "2" only because the text "2" was inside it, which a longer number no longer allows; a
    number now picks the one option that is the same number, as a number answer is checked."""
    from internvl_mpo.answers import parse_choice

    assert parse_choice(text, options) == expected
