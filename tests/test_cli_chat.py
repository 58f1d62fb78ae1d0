"""The `internvl-mpo chat` and `generate` commands, run for real in subprocesses on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from internvl_mpo.pipeline import InternVLChat

from conftest import (
    cli,
    ScriptedEngine,
    bf16_shards_without_dtype,
    check_replaced_weights_refuse_resume,
    official_shards,
    record_header_reads,
    refuse_reading,
    replace_shard,
    tiny_chat_folder,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder, _ = tiny_chat_folder(root / "model")
    Image.new("RGB", (90, 50), "red").save(root / "red.png")
    Image.new("RGB", (50, 50), "blue").save(root / "blue.png")
    return folder


def test_chat_one_question_with_image_streams_the_greedy_answer(folder):
    image = folder.parent / "red.png"
    out = cli("chat", "--model", folder, "--image", image, "--max-new-tokens", "12", "What colour?")
    assert out.returncode == 0, out.stderr
    expected = InternVLChat.from_pretrained(folder).chat("What colour?", images=str(image), max_new_tokens=12,
                                                        do_sample=False)
    assert out.stdout.strip() == expected


def test_the_streamed_answer_holds_back_trailing_whitespace(folder, capsys):
    """An answer cut (at --max-new-tokens) right after a newline printed a blank line before the next
    prompt; whitespace inside the answer still streams as it comes."""
    from internvl_mpo.cli_chat import _answer
    from internvl_mpo.generate.params import sampling_params

    bot = InternVLChat.from_pretrained(folder)
    bot.engine = ScriptedEngine([t for c in "Two lines:\n first\n\nsecond  \n\n" for t in bot.tokenizer.encode(c)])
    assert _answer(bot, bot.prepare("Hi"), sampling_params()) == "Two lines:\n first\n\nsecond"
    assert capsys.readouterr().out == "Two lines:\n first\n\nsecond\n"


def test_interactive_chat_keeps_history(folder):
    image = folder.parent / "blue.png"
    out = cli("chat", "--model", folder, "--max-new-tokens", "6", stdin=f"/image {image}\nfirst?\nsecond?\n/exit\n")
    assert out.returncode == 0, out.stderr
    bot = InternVLChat.from_pretrained(folder)
    a1, history = bot.chat("first?", images=str(image), max_new_tokens=6, do_sample=False, return_history=True)
    a2 = bot.chat("second?", images=str(image), history=history, max_new_tokens=6, do_sample=False)
    assert a1 != a2
    assert out.stdout.startswith(a1)  # no "> " prompts in the answers when stdin is not a terminal
    assert out.stdout.index(a2, len(a1)) > 0


def test_chat_errors_are_one_clear_line(folder):
    out = cli("chat", "--model", folder, "--image", folder / "missing.png", "hi")
    assert out.returncode == 1
    assert "error:" in out.stderr and "missing.png" in out.stderr and "Traceback" not in out.stderr
    out = cli("chat", "--model", folder / "nope", "hi")
    assert out.returncode == 1 and "no such checkpoint folder" in out.stderr


def earlier_run(folder: Path, answers: Path, text: str | bytes, max_new_tokens: int) -> None:
    """`answers` as an earlier generate run of `folder` with `max_new_tokens` left it, holding `text`: the settings
    file beside it written by a real run (of a question of its own, whose answer `text` replaces)."""
    from internvl_mpo import cli_chat

    scratch = answers.with_name("earlier_requests.jsonl")
    scratch.write_text(json.dumps({"question": "Earlier?"}) + "\n")
    assert cli_chat.generate(input=str(scratch), output=str(answers), model=str(folder),
                             max_new_tokens=max_new_tokens) == 0
    answers.write_bytes(text if isinstance(text, bytes) else text.encode())


def test_generate_batch_file_and_resume(folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    images = {"a": "red.png", "c": "blue.png"}
    lines = [{"id": "a", "question": "Colour?", "image": images["a"]}, {"id": "b", "question": "Hello"},
             {"id": "c", "question": "Shape?", "image": images["c"]}]
    for name in images.values():
        (tmp_path / name).write_bytes((folder.parent / name).read_bytes())
    requests.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    answers = tmp_path / "answers.jsonl"
    # An interrupted earlier run: "b" done, plus a half-written line.
    cut = "{\"id\": \"c\", \"ans"
    earlier_run(folder, answers, json.dumps({"id": "b", "question": "Hello", "answer": "kept"}) + "\n" + cut, 8)
    out = cli("generate", "--input", requests, "--output", answers, "--model", folder, "--max-new-tokens", "8",
              "--batch-size", "2")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in answers.read_text().splitlines()]  # the cut line is gone
    by_id = {r["id"]: r["answer"] for r in rows}
    assert list(by_id) == ["a", "b", "c"] and by_id["b"] == "kept"
    bot = InternVLChat.from_pretrained(folder)
    assert by_id["a"] == bot.chat("Colour?", images=str(tmp_path / "red.png"), max_new_tokens=8, do_sample=False)


def test_generate_answers_again_a_request_whose_question_changed_since_the_last_run(folder, tmp_path):
    """The answers of an earlier run were kept by id alone: after editing a question (or inserting a
    line into a file without ids, which shifts the default ids) the old answer stayed, under the new question."""
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hello"}) + "\n" + json.dumps({"id": "b", "question": "Hi"}))
    earlier_run(folder, answers, json.dumps({"id": "a", "question": "Helo", "answer": "stale"}) + "\n"
                + json.dumps({"id": "b", "question": "Hi", "answer": "kept"}) + "\n", 6)
    out = cli("generate", "--input", requests, "--output", answers, "--model", folder, "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    expected = InternVLChat.from_pretrained(folder).chat("Hello", max_new_tokens=6, do_sample=False)
    assert rows == [{"id": "a", "question": "Hello", "answer": expected}, {"id": "b", "question": "Hi", "answer": "kept"}]


def test_generate_answers_again_a_request_whose_image_or_video_changed_since_the_last_run(folder, tmp_path):
    """Resuming kept an answer by id and question alone: a request whose image was swapped for
    another file kept the answer about the old one. Answer lines now repeat the image and video
    paths as the request wrote them, and a request whose paths differ is asked again."""
    for name in ("red.png", "blue.png"):
        (tmp_path / name).write_bytes((folder.parent / name).read_bytes())
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    lines = [{"id": "a", "question": "Colour?", "image": "blue.png"},
             {"id": "b", "question": "Colour?", "image": ["red.png", "blue.png"]},
             {"id": "c", "question": "Colour?", "image": "red.png"}]
    requests.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    earlier_run(folder, answers, "\n".join(json.dumps(x) for x in [
        {"id": "a", "question": "Colour?", "image": "red.png", "answer": "stale"},  # the image was changed
        {"id": "b", "question": "Colour?", "image": ["red.png", "blue.png"], "answer": "kept"},
        {"id": "c", "question": "Colour?", "answer": "stale"},  # an image was added to the request
    ]) + "\n", 6)
    out = cli("generate", "--input", requests, "--output", answers, "--model", folder, "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in answers.read_text().splitlines()]
    bot = InternVLChat.from_pretrained(folder)
    expected = {name: bot.chat("Colour?", images=str(tmp_path / name), max_new_tokens=6, do_sample=False)
                for name in ("red.png", "blue.png")}
    for row in rows:
        row.pop("stamps", None)  # the files' stamps, tested below
    assert rows == [{"id": "a", "question": "Colour?", "image": "blue.png", "answer": expected["blue.png"]},
                    {"id": "b", "question": "Colour?", "image": ["red.png", "blue.png"], "answer": "kept"},
                    {"id": "c", "question": "Colour?", "image": "red.png", "answer": expected["red.png"]}]
    assert "0 of 3" not in out.stderr
    again = cli("generate", "--input", requests, "--output", answers, "--model", folder, "--max-new-tokens", "6")
    assert again.returncode == 0 and "all 3 requests are answered" in again.stderr  # no model needed


def test_generate_answers_again_a_request_whose_image_or_video_file_was_edited_in_place(folder, tmp_path):
    """Resuming compared the request's paths only: an image overwritten under the same name kept the
    answer about the old picture. Answer lines now keep a stamp (size, mtime, sha256) of each file; a
    file touched or copied without its times but holding the same bytes keeps its answer."""
    import os

    for name in ("red.png", "blue.png"):
        (tmp_path / name).write_bytes((folder.parent / name).read_bytes())
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(2):
        (frames / f"{k}.png").write_bytes((folder.parent / "red.png").read_bytes())
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    lines = [{"id": "a", "question": "Colour?", "image": "red.png"}, {"id": "b", "question": "Colour?", "image": "blue.png"},
             {"id": "v", "question": "Colour?", "video": "frames"}, {"id": "t", "question": "Hi"}]
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["generate", "--input", requests, "--output", answers, "--model", folder, "--max-new-tokens", "4"]
    assert cli(*args).returncode == 0

    def mark_stale():  # the answers so far, marked so that a request asked again shows
        rows = [json.loads(x) for x in answers.read_text().splitlines()]
        answers.write_text("".join(json.dumps(dict(r, answer="stale")) + "\n" for r in rows))
        return rows

    rows = mark_stale()
    assert [set(r) for r in rows] == [{"id", "question", "image", "answer", "stamps"}] * 2 + [
        {"id", "question", "video", "answer", "stamps"}, {"id", "question", "answer"}]
    assert set(rows[0]["stamps"][0]) == {"size", "mtime_ns", "sha256"} and set(rows[2]["stamps"][0]) == {"stats", "sha256"}
    os.utime(tmp_path / "blue.png", ns=(1, 1))  # same bytes, another mtime: a copy without its times
    again = cli(*args)
    assert again.returncode == 0 and "all 4 requests are answered" in again.stderr, again.stderr
    (tmp_path / "red.png").write_bytes((folder.parent / "blue.png").read_bytes())  # edited in place
    (frames / "2.png").write_bytes((folder.parent / "red.png").read_bytes())  # a frame added to the video
    assert cli(*args).returncode == 0
    rows = {r["id"]: r for r in map(json.loads, answers.read_text().splitlines())}
    bot = InternVLChat.from_pretrained(folder)
    assert rows["a"]["answer"] == bot.chat("Colour?", images=str(tmp_path / "red.png"), max_new_tokens=4, do_sample=False)
    assert rows["v"]["answer"] != "stale"
    assert rows["b"]["answer"] == rows["t"]["answer"] == "stale"


def test_generate_resumes_only_with_the_model_and_settings_that_wrote_the_answers(folder, tmp_path, monkeypatch):
    """A rerun into the same --output with another model or other sampling settings found every request
    answered and kept the first run's answers, silently. answers.jsonl.settings.json now keeps them; the
    model folder counts by its resolved path (./m and /abs/m are the same)."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import ConfigError, InputError

    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    monkeypatch.chdir(folder.parent)
    run = dict(input=str(requests), output=str(answers), device="cpu")
    assert cli_chat.generate(**run, model=folder.name, max_new_tokens=4) == 0
    recorded = json.loads((tmp_path / "answers.jsonl.settings.json").read_text())
    assert recorded["model"] == str(folder) and recorded["max_new_tokens"] == 4
    for other, changed in [(dict(max_new_tokens=5), "max_new_tokens"), (dict(temperature=0.5, seed=1), "temperature"),
                           (dict(model=str(tmp_path)), "model")]:
        with pytest.raises(ConfigError, match=rf"answers.jsonl holds answers written with other settings \({changed}\)"):
            cli_chat.generate(**run, **{"model": str(folder), "max_new_tokens": 4, **other})
    assert cli_chat.generate(**run, model=f"./{folder.name}/", max_new_tokens=4) == 0  # the same folder
    (tmp_path / "answers.jsonl.settings.json").write_text("[4]")
    with pytest.raises(ConfigError, match=r"answers.jsonl.settings.json: not the settings of a generate run"):
        cli_chat.generate(**run, model=str(folder), max_new_tokens=4)
    # answers without the settings file are not a run's (a file of questions and reference answers, given by
    # mistake): they resumed under any settings, taken for the model's answers
    (tmp_path / "answers.jsonl.settings.json").unlink()
    text = answers.read_text()
    with pytest.raises(InputError, match=r"answers.jsonl holds answer lines but no answers.jsonl.settings.json beside"):
        cli_chat.generate(**run, model=str(folder), max_new_tokens=5)
    assert answers.read_text() == text and not (tmp_path / "answers.jsonl.settings.json").exists()
    answers.unlink()  # a new run records its own settings
    assert cli_chat.generate(**run, model=str(folder), max_new_tokens=3) == 0
    assert json.loads((tmp_path / "answers.jsonl.settings.json").read_text())["max_new_tokens"] == 3


def test_generate_resumes_only_with_the_weights_that_wrote_the_answers(folder, tmp_path):
    """A model saved again into the run's model folder (trained anew, converted) counted as the same model: a
    rerun kept the answers of the earlier weights and answered the rest with the new ones, without a word.
    The save id that each save stamps into the weight files is recorded and compared now."""
    import shutil

    from internvl_mpo import InternVL, cli_chat
    from internvl_mpo.errors import ConfigError

    model = shutil.copytree(folder, tmp_path / "model")
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    run = dict(input=str(requests), output=str(answers), model=str(model), device="cpu", max_new_tokens=4)
    assert cli_chat.generate(**run) == 0
    settings = tmp_path / "answers.jsonl.settings.json"
    assert list(json.loads(settings.read_text())["weights"]) == ["model.safetensors"]  # no save id, as official
    InternVL.from_pretrained(model).save_pretrained(model)
    with pytest.raises(ConfigError, match=r"answers.jsonl holds answers written with other settings \(weights\)"):
        cli_chat.generate(**run)
    answers.unlink()
    assert cli_chat.generate(**run) == 0
    recorded = json.loads(settings.read_text())
    assert len(recorded["weights"]) == 32
    assert cli_chat.generate(**run) == 0  # the same weights resume
    del recorded["weights"]  # settings recorded before the save id was: nothing to compare
    settings.write_text(json.dumps(recorded))
    InternVL.from_pretrained(model).save_pretrained(model)
    assert cli_chat.generate(**run) == 0


def test_generate_resumes_only_with_the_weight_files_that_wrote_the_answers(folder, tmp_path):
    """Weights without a save id (official checkpoints) recorded none: a shard replaced by other weights resumed
    with the earlier answers kept. The stamps of the weight files are recorded and compared now."""
    import shutil

    from internvl_mpo import cli_chat

    model = official_shards(shutil.copytree(folder, tmp_path / "model"))
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    run = dict(input=str(requests), output=str(answers), model=str(model), device="cpu", max_new_tokens=4)
    check_replaced_weights_refuse_resume(lambda: cli_chat.generate(**run), model,
                                         tmp_path / "answers.jsonl.settings.json", "answers.jsonl holds answers written with")


def test_a_hub_ids_new_revision_with_other_weights_does_not_resume(folder, tmp_path, fake_hub):
    """A hub id was recorded as typed, its weights not at all: a resume after the repo got new weights mixed the
    two revisions' answers. The hub id is resolved before the settings are checked, and its files' stamps compared;
    a revision whose weight files are the same ones resumes."""
    import shutil

    from internvl_mpo import cli_chat
    from internvl_mpo.errors import ConfigError

    first = official_shards(shutil.copytree(folder, tmp_path / "first"))
    same = shutil.copytree(first, tmp_path / "same")
    other = shutil.copytree(first, tmp_path / "other")
    replace_shard(other / "model-00001-of-00002.safetensors")
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    run = dict(input=str(requests), output=str(answers), model="org/name", device="cpu", max_new_tokens=4)
    fake_hub(first)
    assert cli_chat.generate(**run) == 0
    fake_hub(same)
    assert cli_chat.generate(**run) == 0
    fake_hub(other)
    with pytest.raises(ConfigError, match=r"\(weights: the model's model-00001-of-00002.safetensors is not what"):
        cli_chat.generate(**run)


def test_a_bad_dtype_is_refused_before_a_hub_id_downloads(fake_hub):
    """run_dtype resolves a hub id for its weights' identity: an unknown --dtype is refused before that."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import InputError

    asked = fake_hub(AssertionError("the checkpoint was fetched before the dtype was checked"))
    with pytest.raises(InputError, match="unknown dtype 'bogus'"):
        cli_chat.run_dtype("bogus", "cpu", "org/name")
    assert asked == []


def test_generate_resumes_only_in_the_precision_that_wrote_the_answers(folder, tmp_path):
    """--dtype was not recorded: a resume in another precision mixed its answers with the first run's. The
    dtype the run computes in is recorded (left out: fp32 on the CPU; auto: the checkpoint's torch_dtype)."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import ConfigError

    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    run = dict(input=str(requests), output=str(answers), model=str(folder), device="cpu", max_new_tokens=4)
    assert cli_chat.generate(**run) == 0
    assert json.loads((tmp_path / "answers.jsonl.settings.json").read_text())["dtype"] == "float32"
    answers.write_text(json.dumps({**json.loads(answers.read_text()), "answer": "kept"}) + "\n")
    written = answers.read_text()  # an answer asked again (greedy: the same) would not be "kept"
    with pytest.raises(ConfigError, match=r"other settings \(dtype\)"):
        cli_chat.generate(**run, dtype="bfloat16")
    assert cli_chat.generate(**run, dtype="fp32") == 0  # the same precision, spelled otherwise
    assert answers.read_text() == written
    (tmp_path / "bf16").mkdir()
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "bf16" / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    assert cli_chat.run_dtype("auto", "cpu", str(tmp_path / "bf16"))[0] == "bfloat16"
    # no torch_dtype in config.json: the weights' dtype, as transformers and the load itself take it
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    (tmp_path / "bf16").joinpath("config.json").write_text(json.dumps(config))
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, tmp_path / "bf16" / "model.safetensors")
    assert cli_chat.run_dtype("auto", "cpu", str(tmp_path / "bf16"))[0] == "bfloat16"


def test_generate_reads_each_weight_files_header_once(folder, tmp_path, monkeypatch):
    """--dtype auto without a config dtype read the shards' headers for the recorded dtype, and the load read
    them all again."""
    from internvl_mpo import cli_chat

    model = bf16_shards_without_dtype(folder, tmp_path / "bf16")
    opened = record_header_reads(monkeypatch)
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    assert cli_chat.generate(input=str(requests), output=str(answers), model=str(model), device="cpu",
                             dtype="auto", max_new_tokens=2) == 0
    shards = sorted(model.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(opened) == shards
    assert json.loads((tmp_path / "answers.jsonl.settings.json").read_text())["dtype"] == "bfloat16"
    assert "answer" in json.loads(answers.read_text())


def test_a_generate_refused_for_its_settings_leaves_the_answers_file_as_it_was(folder, tmp_path):
    """The refused rerun had already rewritten the file without its error lines (and a cut last line)."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import ConfigError

    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text("".join(json.dumps(x) + "\n" for x in [{"id": "a", "question": "Hi"},
                                                                 {"id": "b", "question": "Hi", "image": "gone.png"}]))
    run = dict(input=str(requests), output=str(answers), model=str(folder), device="cpu")
    assert cli_chat.generate(**run, max_new_tokens=4) == 0
    written = answers.read_text()
    assert "error" in json.loads(written.splitlines()[1])
    with pytest.raises(ConfigError, match=r"other settings \(max_new_tokens\)"):
        cli_chat.generate(**run, max_new_tokens=5)
    assert answers.read_text() == written


def test_a_greedy_generate_resumes_under_other_sampling_flags_a_sampled_one_does_not(folder, tmp_path):
    """--temperature 0 reads no --seed, --top-p or --top-k, yet a greedy rerun with another of them was
    refused; they count only where the answers sample."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import ConfigError

    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    run = dict(input=str(requests), output=str(answers), model=str(folder), device="cpu", max_new_tokens=4)
    assert cli_chat.generate(**run, seed=1, top_p=0.5, top_k=3) == 0
    answers.write_text(json.dumps({**json.loads(answers.read_text()), "answer": "kept"}) + "\n")
    written = answers.read_text()  # an answer asked again (greedy: the same) would not be "kept"
    assert cli_chat.generate(**run, seed=2, top_p=1.0, top_k=50) == 0
    assert cli_chat.generate(**run) == 0
    assert answers.read_text() == written
    with pytest.raises(ConfigError, match=r"other settings \(temperature\)"):
        cli_chat.generate(**run, temperature=0.7, seed=1, top_p=0.5, top_k=3)
    answers.unlink()
    assert cli_chat.generate(**run, temperature=0.7, seed=1, top_p=0.5, top_k=3) == 0
    for other, changed in [(dict(seed=2), "seed"), (dict(top_p=1.0), "top_p"), (dict(top_k=50), "top_k"),
                           (dict(temperature=0, seed=2, top_k=50), "temperature")]:  # greedy: seed, top_k unread
        with pytest.raises(ConfigError, match=rf"other settings \({changed}\)"):
            cli_chat.generate(**run, **{"temperature": 0.7, "seed": 1, "top_p": 0.5, "top_k": 3, **other})
    assert cli_chat.generate(**run, temperature=0.7, seed=1, top_p=0.5, top_k=3) == 0


def test_generate_resumes_with_max_num_spelled_as_the_models_default_or_left_out(folder, tmp_path):
    """--max-num N where N is the model's max_dynamic_patch tiles as leaving it out does, yet a resume
    that spelled it (or left out what the first run spelled) was refused as a changed setting."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import ConfigError

    tiles = json.loads((folder / "config.json").read_text())["max_dynamic_patch"]
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi", "image": str(folder.parent / "red.png")}) + "\n")
    run = dict(input=str(requests), output=str(answers), model=str(folder), device="cpu", max_new_tokens=4)
    for first, then in [(None, tiles), (tiles, None)]:
        assert cli_chat.generate(**run, max_num=first) == 0
        answers.write_text(json.dumps({**json.loads(answers.read_text()), "answer": "kept"}) + "\n")
        written = answers.read_text()  # an answer asked again (greedy: the same) would not be "kept"
        assert cli_chat.generate(**run, max_num=then) == 0
        assert answers.read_text() == written
        with pytest.raises(ConfigError, match=r"other settings \(max_num\)"):
            cli_chat.generate(**run, max_num=tiles + 1)
        answers.unlink()


def test_generate_refuses_a_seed_whose_last_request_would_pass_the_seed_range_before_loading(folder, tmp_path):
    """Request k samples with seed + k; past 2**63 the run answered the first requests, then stopped
    on the seed of a later one, which the --seed it was given did not show."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import InputError

    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"question": q}) + "\n" for q in ("Hi", "Ho")))
    run = dict(input=str(requests), output=str(tmp_path / "answers.jsonl"), model=str(folder), device="cpu",
               max_new_tokens=2, temperature=0.7)
    with pytest.raises(InputError, match=r"--seed 9223372036854775807: request 1 samples with seed \+ 1, past "
                                         r"the largest seed 2\*\*63 - 1; use a smaller --seed"):
        cli_chat.generate(**run, seed=2**63 - 1)
    assert not (tmp_path / "answers.jsonl").exists()
    assert cli_chat.generate(**run, seed=2**63 - 2) == 0


def test_generate_interrupted_says_how_to_resume_and_the_rerun_answers_the_rest(folder, tmp_path, monkeypatch, capsys):
    from internvl_mpo import cli_chat

    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text("".join(json.dumps({"id": k, "question": q}) + "\n" for k, q in [("a", "Hi"), ("b", "Hello")]))
    finish = InternVLChat.answers_as_they_finish

    def ctrl_c_after_one(bot, jobs, batch_size):
        for i, done in enumerate(finish(bot, jobs, batch_size)):
            if i == 1:
                raise KeyboardInterrupt
            yield done

    with monkeypatch.context() as m:
        m.setattr(InternVLChat, "answers_as_they_finish", ctrl_c_after_one)
        with pytest.raises(KeyboardInterrupt):
            cli_chat.generate(input=str(requests), output=str(answers), model=str(folder), device="cpu",
                              max_new_tokens=6, batch_size=1)
    # the message is the last line: the progress bar was drawn again below it
    assert capsys.readouterr().err.endswith(f"interrupted after 1 of 2 requests (their lines are in {answers}); run "
                                            "the same command again to resume\n")
    assert [json.loads(x)["id"] for x in answers.read_text().splitlines()] == ["a"]
    assert cli_chat.generate(input=str(requests), output=str(answers), model=str(folder), device="cpu",
                             max_new_tokens=6, batch_size=1) == 0
    assert [json.loads(x)["id"] for x in answers.read_text().splitlines()] == ["a", "b"]


def test_generate_interrupted_before_any_answer_says_nothing_was_written(folder, tmp_path, monkeypatch, capsys):
    """It said 'interrupted after 0 of 2 requests (their lines are in ...)' where no line was written."""
    from internvl_mpo import cli_chat

    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text("".join(json.dumps({"question": q}) + "\n" for q in ("Hi", "Hello")))

    def ctrl_c_at_once(bot, jobs, batch_size):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(InternVLChat, "answers_as_they_finish", ctrl_c_at_once)
    with pytest.raises(KeyboardInterrupt):
        cli_chat.generate(input=str(requests), output=str(answers), model=str(folder), device="cpu", max_new_tokens=6)
    assert capsys.readouterr().err.endswith(f"internvl-mpo generate: interrupted before any of 2 requests was "
                                            f"answered; nothing was written to {answers}\n")
    assert answers.read_text() == ""


def test_generate_writes_an_error_line_for_a_bad_request_and_goes_on(folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    (tmp_path / "red.png").write_bytes((folder.parent / "red.png").read_bytes())
    lines = [{"id": "a", "question": "Colour?", "image": "red.png"}, {"id": "b", "question": "Hi", "image": "gone.png"},
             {"id": "c", "question": "Hello"}]
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    answers = tmp_path / "answers.jsonl"
    bot = InternVLChat.from_pretrained(folder)
    expected = {"a": bot.chat("Colour?", images=str(tmp_path / "red.png"), max_new_tokens=8, do_sample=False),
                "c": bot.chat("Hello", max_new_tokens=8, do_sample=False)}
    for _ in range(2):  # the second run keeps the answers and tries "b" again
        out = cli("generate", "--input", requests, "--output", answers, "--model", folder, "--max-new-tokens", "8",
                  "--batch-size", "3")
        assert out.returncode == 0, out.stderr
        assert f"{requests}:2 (id 'b') skipped:" in out.stderr and "gone.png" in out.stderr
        written = [json.loads(x) for x in answers.read_text().splitlines()]
        assert [r["id"] for r in written] == ["a", "b", "c"]  # put back in the requests' order at the end
        rows = {r["id"]: r for r in written}
        assert set(rows["b"]) == {"id", "question", "image", "error"} and "gone.png" in rows["b"]["error"]
        assert rows["b"]["image"] == "gone.png"  # as the request wrote it
        assert {i: rows[i]["answer"] for i in "ac"} == expected


def test_generate_splits_lines_at_newlines_only_and_resumes_after_a_cut_character(folder, tmp_path):
    """U+2028 inside JSON strings is not a line end (in the requests or the answers), CRLF line ends
    work, and an answers file cut in the middle of a UTF-8 character loses only its last line."""
    requests = tmp_path / "requests.jsonl"
    lines = [{"id": "kept", "question": "One\u2028two"}, {"id": "cut", "question": "Three\u2029four\x85"}]
    requests.write_bytes(b"".join(json.dumps(x, ensure_ascii=False).encode() + b"\r\n" for x in lines))
    answers = tmp_path / "answers.jsonl"
    kept = json.dumps({"id": "kept", "question": "One\u2028two", "answer": "a\u2028b"}, ensure_ascii=False)
    earlier_run(folder, answers, kept.encode() + b"\n" + '{"id": "cut", "answer": "От'.encode()[:-1], 8)
    out = cli("generate", "--input", requests, "--output", answers, "--model", folder, "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(x) for x in answers.read_bytes().decode().split("\n")[:-1]]
    assert rows[0] == json.loads(kept)
    expected = InternVLChat.from_pretrained(folder).chat(lines[1]["question"], max_new_tokens=8, do_sample=False)
    assert rows[1:] == [{"id": "cut", "question": lines[1]["question"], "answer": expected}]


def test_generate_reads_a_requests_file_that_starts_with_a_byte_order_mark(tmp_path):
    """Windows editors save "UTF-8 with BOM"; its first line was refused as not valid JSON."""
    from internvl_mpo.cli_chat import _read_requests

    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "a", "question": "Hi"}).encode() + b"\r\n")
    assert [(r["id"], r["question"]) for r in _read_requests(requests)] == [("a", "Hi")]


def test_generate_refuses_a_misspelt_field_before_the_model_loads(tmp_path, capsys):
    """{"question": ..., "imgae": "a.png"} was answered without its image; fields with other names (an answer,
    ids, metadata) are still ignored."""
    from internvl_mpo.cli import main

    requests = tmp_path / "requests.jsonl"
    good = {"id": 1, "question": "Hi", "image": "a.png", "answer": "Hello", "image_id": 3, "meta": {"source": "web"}}
    run = ["generate", "--input", str(requests), "--output", str(tmp_path / "a.jsonl"), "--model",
           str(tmp_path / "no-model")]
    for bad, meant in [({"imgae": "a.png"}, "image"), ({"images": ["a.png"]}, "image"), ({"Image": "a.png"}, "image"),
                       ({"vidoe": "c.mp4"}, "video"), ({"videos": "c.mp4"}, "video"), ({"qustion": "Hi"}, "question")]:
        row = {"id": 2, **({} if "qustion" in bad else {"question": "Hi"}), **bad}
        requests.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        assert main(run) == 1
        err = capsys.readouterr().err
        assert f"{requests}:2: field '{next(iter(bad))}' is not read; did you mean '{meant}'?" in err, err
    text_only = {"id": 2, "question": "Hi", "image": None, "image_id": 4}  # "image": null: no image, on purpose
    requests.write_text(json.dumps(good) + "\n" + json.dumps(text_only) + "\n")
    assert main(run) == 1  # on to loading the (missing) model
    assert "is not read" not in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


def test_generate_refuses_another_name_for_an_input_field_before_the_model_loads(tmp_path, capsys):
    """{"question": ..., "image_path": "a.png"} (or "img", "video_file", ...) was answered without its image, and
    {"prompt": ...} was refused as lacking a question without saying which field was meant."""
    from internvl_mpo.cli import main

    requests = tmp_path / "requests.jsonl"
    run = ["generate", "--input", str(requests), "--output", str(tmp_path / "a.jsonl"), "--model",
           str(tmp_path / "no-model")]
    for bad, meant in [({"image_path": "a.png"}, "image"), ({"image_file": "a.png"}, "image"), ({"img": "a.png"}, "image"),
                       ({"images_path": ["a.png"]}, "image"), ({"ImageURL": "a.png"}, "image"),
                       ({"video_path": "c.mp4"}, "video"), ({"prompt": "Hi"}, "question")]:
        row = {"id": 1, **({} if "prompt" in bad else {"question": "Hi"}), **bad}
        requests.write_text(json.dumps(row) + "\n")
        assert main(run) == 1
        err = capsys.readouterr().err
        assert err == f"internvl-mpo generate: error: {requests}:1: field '{next(iter(bad))}' is not read; " \
                      f"did you mean '{meant}'?\n", err
    assert not (tmp_path / "a.jsonl").exists()


def test_generate_refuses_a_line_s_own_constraint_or_setting_before_the_model_loads(tmp_path, capsys):
    """{"question": ..., "regex": "[0-9]+"} (or a json_schema, grammar, vLLM's guided_* or response_format) was
    answered unconstrained, the field ignored; the run's flag is the constraint. A null one is no constraint."""
    from internvl_mpo.cli import main

    requests = tmp_path / "requests.jsonl"
    run = ["generate", "--input", str(requests), "--output", str(tmp_path / "a.jsonl"), "--model",
           str(tmp_path / "no-model")]
    for field, value, flag in [("regex", "[0-9]+", "--regex"), ("json_mode", True, "--json-mode"),
                               ("json_schema", {"type": "integer"}, "--json-schema FILE"),
                               ("grammar", 'root ::= "a"', "--grammar FILE"),
                               ("guided_choice", ["a", "b"], "--choice"),
                               ("choice", ["yes", "no"], "--choice"),  # the Python API's name: it was ignored
                               ("response_format", {"type": "json_object"}, "--json-mode or --json-schema FILE")]:
        requests.write_text(json.dumps({"id": 1, "question": "Hi"}) + "\n" +
                            json.dumps({"id": 2, "question": "Hi", field: value}) + "\n")
        assert main(run) == 1
        err = capsys.readouterr().err
        assert err == f"internvl-mpo generate: error: {requests}:2: field '{field}' is not read: a constraint holds " \
                      f"every answer of a run, given on the command line ({flag}); answer each constraint's lines in " \
                      "a run of their own\n", err
    for field, value, flag in [("temperature", 0.7, "--temperature"), ("max_tokens", 16, "--max-new-tokens"),
                               ("seed", 3, "--seed"), ("max_num", 2, "--max-num")]:  # a setting's own line
        requests.write_text(json.dumps({"id": 1, "question": "Hi", field: value}) + "\n")
        assert main(run) == 1
        err = capsys.readouterr().err
        assert err == f"internvl-mpo generate: error: {requests}:1: field '{field}' is not read: a setting holds " \
                      f"every answer of a run, given on the command line ({flag}); answer each setting's lines in " \
                      "a run of their own\n", err
    for field, value, said in [("num_segments", 2, "a video's 8 frames are sampled"),  # no flag sets them: ignored
                               ("repetition_penalty", 1.2, "answers are decoded without a repetition penalty")]:
        requests.write_text(json.dumps({"id": 1, "question": "Hi", field: value}) + "\n")
        assert main(run) == 1
        assert capsys.readouterr().err.startswith(
            f"internvl-mpo generate: error: {requests}:1: field '{field}' is not read: {said}")
    requests.write_text(json.dumps({"id": 1, "question": "Hi", "regex": None, "choice": "A", "seed": None}) + "\n")
    assert main(run) == 1  # on to loading the (missing) model
    assert "is not read" not in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


def test_generate_refuses_a_requests_file_without_requests(tmp_path):
    """An empty (or blank) file printed "all 0 requests are answered" and exited 0, where pairs and eval
    refuse theirs."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import InputError

    requests = tmp_path / "requests.jsonl"
    for text in ("", "\n\n"):
        requests.write_text(text)
        with pytest.raises(InputError, match=rf"{requests}: no requests"):
            cli_chat.generate(input=str(requests), output=str(tmp_path / "answers.jsonl"))
    assert not (tmp_path / "answers.jsonl.settings.json").exists()


def test_an_output_under_a_file_says_it_is_a_file(folder, tmp_path, capsys):
    """generate --output afile/x.jsonl (and tiles --output), where afile is a file, said "the folder afile does
    not exist"."""
    from internvl_mpo.cli import main

    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), "red").save(image)
    for args in (["generate", "--input", str(requests), "--model", str(folder / "nope"), "--output"],
                 ["tiles", str(image), "--output"]):
        for below in ("x", "sub/x"):
            assert main([*args, str(requests / below)]) == 1
            assert f"{requests} is a file, not a folder" in capsys.readouterr().err
    assert main(["tiles", str(image), "--output", str(tmp_path / "no" / "x.png")]) == 1
    assert f"the folder {tmp_path / 'no'} does not exist" in capsys.readouterr().err


def test_running_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    """A MemoryError (here from the tiling, as Pillow's allocation of a huge picture under a memory limit gives) ends
    the command with one line and exit code 1; it was a traceback ending in Pillow's allocator."""
    from internvl_mpo.cli import main
    from internvl_mpo.processor import preview

    def huge(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(preview, "tiles_report", huge)
    image = tmp_path / "red.png"
    Image.new("RGB", (64, 48), "red").save(image)
    assert main(["tiles", str(image)]) == 1
    assert capsys.readouterr().err == ("internvl-mpo tiles: error: out of memory: this machine could not allocate "
                                       "what the command needed\n")


def test_generate_checks_its_arguments_before_loading_the_model(folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    missing_model = folder / "nope"  # reached only if the checks below let a run through
    cases = [(["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
             (["--batch-size", "-1"], "--batch-size must be at least 1, got -1"),
             (["--output", tmp_path / "no" / "a.jsonl"], f"the folder {tmp_path / 'no'} does not exist"),
             (["--output", tmp_path], "is a folder"),
             (["--output", requests], "is the requests file; give the answers a file of their own")]
    for args, message in cases:
        out = cli("generate", "--input", requests, "--output", tmp_path / "a.jsonl", "--model", missing_model, *args)
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n" + json.dumps({"id": [1], "question": "Hi"}))
    out = cli("generate", "--input", requests, "--output", tmp_path / "a.jsonl", "--model", missing_model)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"{requests}:2: 'id' must be a string or an integer, got [1]" in out.stderr


def test_generate_with_every_request_answered_does_not_load_the_model(folder, tmp_path, monkeypatch):
    from internvl_mpo import cli_chat

    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    earlier_run(folder, answers, json.dumps({"id": "a", "question": "Hi", "answer": "Hello"}) + "\n", 8)
    monkeypatch.setattr(InternVLChat, "from_pretrained", None)  # loading the model would fail
    assert cli_chat.generate(input=str(requests), output=str(answers), model=str(folder), max_new_tokens=8) == 0
    assert answers.read_text() == json.dumps({"id": "a", "question": "Hi", "answer": "Hello"}) + "\n"


def test_generate_refuses_an_output_that_is_not_an_answers_file_and_leaves_it_as_it_was(folder, tmp_path,
                                                                                          monkeypatch):
    """A file given as --output by mistake (another requests file, notes) was rewritten with the answer
    lines it held, none, before the answers were appended: its content was lost without a word. Then any line
    with an "answer" or "error" field passed for one of generate's: a log of {"time", "error"} lines was emptied,
    and a file of questions and reference answers (examples/questions.jsonl) was "all answered", its reference
    answers taken for the model's; answer lines are generate's own now, and come with its settings file."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import InputError

    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    answer = json.dumps({"id": "a", "question": "Hi", "answer": "Hello"})
    output = tmp_path / "answers.jsonl"  # its last line complete but for the LF, a line cut short: an answers file
    earlier_run(folder, output, '{"id": "b", "question": "Ho", "ans\n' + answer, 8)
    monkeypatch.setattr(InternVLChat, "from_pretrained", None)  # loading the model would fail
    run = dict(input=str(requests), model=str(folder), max_new_tokens=8)
    log = json.dumps({"time": "2026-12-01", "error": "disk full"}) + "\n"
    for name, text, line in [("other.jsonl", json.dumps({"question": "Mine"}) + "\n", 1), ("notes.txt", "my notes", 1),
                             ("mixed.jsonl", answer + "\n\nmy notes\n", 3), ("log.jsonl", log, 1),
                             ("ids.jsonl", json.dumps({"id": True, "question": "Hi", "answer": "yes"}) + "\n", 1),
                             ("extra.jsonl", json.dumps({"id": "a", "question": "Hi", "answer": "yes", "x": 1}), 1)]:
        other = tmp_path / name
        other.write_text(text)
        with pytest.raises(InputError, match=rf"--output \S+{name}:{line}: not an answer line of generate"):
            cli_chat.generate(output=str(other), **run)
        assert other.read_text() == text and not (tmp_path / f"{name}.settings.json").exists()
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes((Path(__file__).parents[1] / "examples" / "questions.jsonl").read_bytes())
    text = labels.read_text()
    with pytest.raises(InputError, match=r"--output \S+labels.jsonl holds answer lines but no "
                                         r"labels.jsonl.settings.json beside it"):
        cli_chat.generate(output=str(labels), **run)
    assert labels.read_text() == text and not (tmp_path / "labels.jsonl.settings.json").exists()
    assert cli_chat.generate(output=str(output), **run) == 0
    assert output.read_text() == answer + "\n"


def test_generate_drops_answers_no_request_stands_for_before_the_model_loads(folder, tmp_path, monkeypatch, capsys):
    """Answers of ids no longer in the requests file stayed in the answers file, which then held more lines than
    requests, "all answered"; and the answer of an edited request stayed until its new answer came, so a run
    interrupted before that left two lines of one id."""
    from internvl_mpo import cli_chat

    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text("".join(json.dumps({"id": i, "question": q}) + "\n" for i, q in (("a", "Hi"), ("b", "New?"))))
    earlier_run(folder, answers, "".join(json.dumps({"id": i, "question": q, "answer": "old"}) + "\n"
                                         for i, q in (("gone", "Bye"), ("a", "Hi"), ("b", "Old?"), ("gone2", "Ho"))), 8)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(InternVLChat, "from_pretrained", interrupted)  # b is asked again: the model would load
    with pytest.raises(KeyboardInterrupt):
        cli_chat.generate(input=str(requests), output=str(answers), model=str(folder), max_new_tokens=8)
    assert answers.read_text() == json.dumps({"id": "a", "question": "Hi", "answer": "old"}) + "\n"
    assert f"dropped from {answers} the answers of 2 ids no longer in {requests}: 'gone', 'gone2'" in \
        capsys.readouterr().err


def test_a_second_generate_into_the_same_output_is_refused_while_the_first_runs(folder, tmp_path):
    """Two runs into one --output both appended to it, and the first to end replaced it with its rewrite: the
    other's later answers went to the replaced file, lost without a word. A run now holds a lock beside it."""
    import fcntl

    from internvl_mpo import cli_chat
    from internvl_mpo.errors import ConfigError

    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    run = dict(input=str(requests), output=str(answers), model=str(folder), device="cpu", max_new_tokens=3)
    with open(tmp_path / ".answers.jsonl.lock", "a+") as held:  # as a live run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 12 on elsewhere\n")
        held.flush()
        with pytest.raises(ConfigError, match=r"is in use by another generate run writing answers.jsonl \(pid 12 on "
                                              r"elsewhere\): two runs would overwrite each other's answers"):
            cli_chat.generate(**run)
        assert not answers.exists()
    assert cli_chat.generate(**run) == 0  # once it ends
    assert cli_chat.generate(**run) == 0  # and the lock goes with the run that held it
    assert [json.loads(line)["id"] for line in answers.read_text().splitlines()] == ["a"]


def test_a_negative_temperature_is_refused_before_the_model_loads(folder, tmp_path):
    """It was read as greedy (0 is greedy); the Python API refuses it, and so does the command line now."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import InputError

    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    missing_model = str(folder / "nope")  # reached only if the temperature gets through
    for run in (lambda: cli_chat.chat("Hi", model=missing_model, temperature=-1.0),
                lambda: cli_chat.generate(input=str(requests), output=str(tmp_path / "a.jsonl"), model=missing_model,
                                          temperature=-1.0)):
        with pytest.raises(InputError, match="temperature must be >= 0, got -1.0"):
            run()


def test_chat_names_its_flags_on_the_command_line_and_its_parameters_in_python(folder, capsys):
    """chat said "temperature must be >= 0" where generate and train name the flag (--batch-size)."""
    from internvl_mpo import cli_chat
    from internvl_mpo.cli import main
    from internvl_mpo.errors import InputError

    missing_model = str(folder / "nope")  # reached only if the setting gets through
    for args, message in ((["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
                          (["--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
                          (["--top-k", "-1"], "--top-k must be in [0, 2**31) (0 = off), got -1"),
                          (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
                          (["--max-new-tokens", "2", "--min-new-tokens", "3"],
                           "--min-new-tokens must be in 0..--max-new-tokens (2), got 3"),
                          (["--repetition-penalty", "0"], "--repetition-penalty must be at least 1e-06"),
                          (["--temperature", "1e39"], "--temperature must be at most 3.40282e+38 (the largest fp32 "
                                                      "number), got 1e+39"),
                          (["--repetition-penalty", "1e39"], "--repetition-penalty must be at most 3.40282e+38"),
                          (["--num-segments", "0"], "--num-segments must be at least 1, got 0")):
        assert main(["chat", "Hi", "--model", missing_model, *args]) == 1
        assert f"internvl-mpo chat: error: {message}" in capsys.readouterr().err
    with pytest.raises(InputError, match="^max_num must be at least 1, got 0$"):
        cli_chat.chat("Hi", model=missing_model, max_num=0)


def test_a_repetition_penalty_that_overflows_the_logits_is_refused_before_the_model_loads(folder):
    """chat --repetition-penalty 1e-40 made the penalised logits inf and sampling drew arbitrary tokens."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import InputError

    missing_model = str(folder / "nope")  # reached only if the penalty gets through
    with pytest.raises(InputError, match="repetition_penalty must be at least 1e-06"):
        cli_chat.chat("Hi", model=missing_model, repetition_penalty=1e-40)


def test_bad_image_and_video_flags_fail_once_not_at_every_question(folder, tmp_path):
    """A missing --image was found only at the first question, after the model had loaded, and an
    interactive chat then refused every question with the same error and exited 0; a --video was
    decoded again at every question."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import InputError

    missing_model = str(folder / "nope")  # reached only if the image gets through
    with pytest.raises(InputError, match="missing.png: no such file"):
        cli_chat.chat("Hi", model=missing_model, image=[str(tmp_path / "missing.png")])
    with pytest.raises(InputError, match="^give --image or --video, not both$"):  # named by the flags (was "images")
        cli_chat.chat("Hi", model=missing_model, image=[str(tmp_path / "a.png")], video=str(tmp_path / "b.mp4"))
    empty = tmp_path / "frames"
    empty.mkdir()
    out = cli("chat", "--model", folder, "--video", empty, stdin="first?\nsecond?\n")
    assert out.returncode == 1 and out.stderr.count("error:") == 1 and "no image files" in out.stderr, out.stderr
    assert out.stdout == ""


def test_chat_points_a_video_given_with_image_to_video(folder, tmp_path, capsys):
    """`chat --image clip.mp4` said only "not an image Pillow can read"."""
    from internvl_mpo.cli import main

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x1cftypisom" + bytes(40))
    assert main(["chat", "Hi", "--model", str(folder / "nope"), "--image", str(clip)]) == 1
    assert capsys.readouterr().err == (f"internvl-mpo chat: error: {clip}: not an image Pillow can read, and it looks "
                                       "like a video: pass it as a video (video= in Python, --video on the command "
                                       "line)\n")


def test_chat_refuses_more_video_frames_than_the_context_holds_before_decoding(folder, tmp_path, monkeypatch,
                                                                                capsys):
    """Refused before a frame is decoded, naming the flag on the command line."""
    from internvl_mpo import cli_chat
    from internvl_mpo.cli import main
    from internvl_mpo.errors import InputError
    from internvl_mpo.processor import video

    monkeypatch.setattr(video, "load_video", lambda *args, **kwargs: pytest.fail("the frames were decoded"))
    with pytest.raises(InputError, match=r"^num_segments=100000: its frames take \d+ image tokens at least"):
        cli_chat.chat("Hi", model=str(folder), device="cpu", video=str(tmp_path), num_segments=100000)
    assert main(["chat", "Hi", "--model", str(folder), "--video", str(tmp_path), "--num-segments", "100000"]) == 1
    assert capsys.readouterr().err.startswith("internvl-mpo chat: error: --num-segments=100000: its frames take ")


def test_the_video_frame_cap_follows_the_models_context(folder, tmp_path, monkeypatch, capsys):
    """load_video's own cap was InternVL2.5's 32768 positions (8191 frames of this model's 4-token tiles) whatever
    the model's max_position_embeddings: a model with a longer context was refused 8192 frames, as num_segments
    must be at most 8191 "of an InternVL2.5 model", not checked against its context."""
    import shutil

    from internvl_mpo.cli import main
    from internvl_mpo.processor import video

    def with_context(positions: int) -> Path:
        model = tmp_path / f"model-{positions}"
        shutil.copytree(folder, model)
        config = json.loads((model / "config.json").read_text())
        config["llm_config"]["max_position_embeddings"] = positions
        (model / "config.json").write_text(json.dumps(config))
        return model

    frame = Image.new("RGB", (8, 8))
    bot = InternVLChat.from_pretrained(with_context(131072))
    assert bot.model.num_image_token == 4
    bot.check_video_frames([frame], 8192)  # 32768 image tokens and their prompt fit 131072 positions
    for k in range(2):
        frame.save(tmp_path / f"{k}.png")
    monkeypatch.setattr(video, "load_video", lambda *args, **kwargs: pytest.fail("the frames were decoded"))
    # 65536 positions hold the 8192 frames' image tokens but not their prompt: the model's context says so
    model = with_context(65536)
    assert main(["chat", "Hi", "--model", str(model), "--video", str(tmp_path), "--num-segments", "8192"]) == 1
    assert re.fullmatch(r"internvl-mpo chat: error: prompt is \d+ tokens \(\d+ of them image tokens\), longer than "
                        r"the context allows: at most 65535; the video's 8192 frames take 8192 tiles \(a smaller "
                        r"--num-segments gives fewer\)\n", capsys.readouterr().err)


def test_chat_counts_the_question_beside_the_video_frames_before_decoding(folder, tmp_path, monkeypatch):
    """The frames fit the context, the question beside them does not: refused before a frame is decoded (the
    question was counted only once the video was decoded)."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import PromptTooLongError
    from internvl_mpo.processor import video

    for k in range(2):
        Image.new("RGB", (32, 32), (k, 0, 0)).save(tmp_path / f"{k}.png")
    monkeypatch.setattr(video, "load_video", lambda *args, **kwargs: pytest.fail("the frames were decoded"))
    question = "Why" + "!" * InternVLChat.from_pretrained(folder).context
    with pytest.raises(PromptTooLongError, match=r"^prompt is \d+ tokens \(\d+ of them image tokens\), longer than "
                                                 r"the context allows: at most \d+; without its images it is \d+ "
                                                 r"tokens$"):  # the question alone is too long: no frame hint
        cli_chat.chat(question, model=str(folder), device="cpu", video=str(tmp_path), num_segments=2)


def test_interactive_video_chat_decodes_the_video_once(folder, tmp_path, monkeypatch):
    import io

    from internvl_mpo import cli_chat
    from internvl_mpo.errors import InputError
    from internvl_mpo.processor import video

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 100, 0, 0)).save(frames / f"{i}.png")
    calls, real = [], video.load_video
    monkeypatch.setattr(video, "load_video", lambda *a, **k: calls.append(a) or real(*a, **k))
    monkeypatch.setattr("sys.stdin", io.StringIO("first?\nsecond?\n"))
    assert cli_chat.chat(model=str(folder), device="cpu", video=str(frames), num_segments=2, max_new_tokens=4) == 0
    assert len(calls) == 1
    bot = InternVLChat.from_pretrained(folder)  # the Python API takes the loaded clip too
    clip = real(str(frames), num_segments=2, image_size=bot.config.image_size)
    prepared, expected = bot.prepare("Hi", video=clip), bot.prepare("Hi", video=str(frames), num_segments=2)
    assert prepared.prompt_ids == expected.prompt_ids and prepared.pixel_values.equal(expected.pixel_values)
    with pytest.raises(InputError, match="frames are 224 pixels wide"):
        bot.prepare("Hi", video=real(str(frames), num_segments=2, image_size=224))


def test_chat_images_are_read_once_for_the_question_and_for_each_turn(folder, tmp_path, monkeypatch, capsys):
    """An --image file was decoded before the model loaded (to refuse a broken one early), then read again by
    each question's prepare (its header, then its pixels): a 12000x9000 PNG spent seconds per question."""
    import io

    from internvl_mpo import cli_chat
    from internvl_mpo.processor import image

    Image.new("RGB", (300, 200), "blue").save(tmp_path / "blue.png")
    opened, real = [], image._open_pil
    monkeypatch.setattr(image, "_open_pil", lambda *args: opened.append(args[1]) or real(*args))
    kw = dict(model=str(folder), device="cpu", max_new_tokens=3, image=[str(tmp_path / "blue.png")])
    assert cli_chat.chat("What is it?", **kw) == 0
    assert len(opened) == 1
    answer = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {folder.parent / 'red.png'}\nWhat is it?\nSure?\n"))
    assert cli_chat.chat(**kw) == 0
    assert len(opened) == 3  # each file once, for two questions
    bot = InternVLChat.from_pretrained(folder)  # the same answer as the path gives
    assert answer.strip() == bot.chat("What is it?", [str(tmp_path / "blue.png")], do_sample=False, max_new_tokens=3)


def test_ctrl_c_stops_the_answer_and_the_interactive_chat_goes_on(folder, monkeypatch, capsys):
    """As in other chat programs: the interrupted question is dropped, the session and its model stay."""
    import io

    from internvl_mpo import cli_chat

    stream, prompts = InternVLChat.stream_prepared, []

    def interrupted_once(bot, prepared, params):
        prompts.append(prepared.prompt_ids)
        for i, piece in enumerate(stream(bot, prepared, params)):
            if len(prompts) == 1 and i == 1:
                raise KeyboardInterrupt  # Ctrl-C after the first piece of the first answer
            yield piece

    monkeypatch.setattr(InternVLChat, "stream_prepared", interrupted_once)
    monkeypatch.setattr("sys.stdin", io.StringIO("first?\nsecond?\n"))
    assert cli_chat.chat(model=str(folder), device="cpu", max_new_tokens=6) == 0
    assert len(prompts) == 2 and prompts[1] == InternVLChat.from_pretrained(folder).prepare("second?").prompt_ids
    assert "(interrupted; that question is left out of the conversation)" in capsys.readouterr().err


def test_interactive_image_command_checks_its_argument(folder):
    image = folder.parent / "blue.png"
    commands = f"/image\n/image {folder}\n/image {folder / 'config.json'}\n/image {image}\nfirst?\n/exit\n"
    out = cli("chat", "--model", folder, "--max-new-tokens", "6", stdin=commands)
    assert out.returncode == 0, out.stderr
    assert "usage: /image PATH" in out.stderr and "is a directory" in out.stderr and "not an image" in out.stderr
    expected = InternVLChat.from_pretrained(folder).chat("first?", images=str(image), max_new_tokens=6, do_sample=False)
    # one answer (piped, no prompts): no bare "/image" question, no refused image in the prompt
    assert out.stdout.strip() == expected


def test_interactive_image_command_takes_a_quoted_path_and_a_tilde(folder, tmp_path, monkeypatch, capsys):
    """No shell reads the line typed at the prompt: `~` was not expanded, and the quotes a terminal puts
    around a file dropped onto it were taken as part of the name."""
    import io

    from internvl_mpo import cli_chat

    (tmp_path / "my pics").mkdir()
    (tmp_path / "my pics" / "red.png").write_bytes((folder.parent / "red.png").read_bytes())
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("sys.stdin", io.StringIO("/image '~/my pics/red.png'\n/image \"~/my pics/red.png\"\n"))
    assert cli_chat.chat(model=str(folder), device="cpu") == 0
    err = capsys.readouterr().err
    assert "error" not in err and f"added {tmp_path / 'my pics' / 'red.png'}; " in err and "with 2 image(s)" in err


def test_chat_names_the_flag_of_a_limit_an_image_is_over(folder, monkeypatch, capsys, tmp_path):
    """`chat` and `generate` said "a larger max_pixels" where their user types --max-pixels: for --image,
    /image and a request's image."""
    import io

    from internvl_mpo import cli_chat
    from internvl_mpo.cli import main

    red = folder.parent / "red.png"
    message = f"{red}: 90x50 = 4500 pixels exceeds the limit of 1000 (possible decompression bomb; a larger " \
              "--max-pixels allows it)"
    assert main(["chat", "Hi", "--model", str(folder), "--image", str(red), "--max-pixels", "1000"]) == 1
    assert capsys.readouterr().err == f"internvl-mpo chat: error: {message}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {red}\n"))
    assert cli_chat.chat(model=str(folder), device="cpu", max_pixels=1000) == 0
    assert f"error: {message}\n" in capsys.readouterr().err
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": 1, "question": "hi", "image": str(red)}) + "\n")
    assert cli_chat.generate(input=str(requests), output=str(answers), model=str(folder), device="cpu",
                             max_pixels=1000) == 0
    assert json.loads(answers.read_text())["error"] == message


def test_chat_takes_an_unquoted_question_as_its_words_joined_by_spaces(folder, capsys):
    """`internvl-mpo chat What colour is it?` was refused with argparse's "unrecognized arguments: colour is
    it?"; the words are the question, as `chat "What colour is it?"` gives it, flags before or after them."""
    from internvl_mpo.cli import main

    red = str(folder.parent / "red.png")
    assert main(["chat", "--model", str(folder), "--image", red, "--max-new-tokens", "6", "What colour is it?"]) == 0
    quoted = capsys.readouterr().out
    assert main(["chat", "--model", str(folder), "What", "colour", "is", "it?", "--image", red,
                 "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == quoted
    with pytest.raises(SystemExit):  # other commands keep their own positionals
        main(["tiles", "a.png", "b.png"])
    assert "unrecognized arguments: b.png" in capsys.readouterr().err


def test_chat_takes_question_words_with_flags_between_them(folder, monkeypatch, capsys):
    """`chat What --image a.png is it` was refused ("unrecognized arguments: is it") while the same words
    before or after the flags worked; a flag's value stays the flag's, and after `--` every word is the
    question's, one that starts with a dash included."""
    from internvl_mpo.cli import main

    asked, real = [], InternVLChat.prepare
    monkeypatch.setattr(InternVLChat, "prepare", lambda self, question, images, *args, **kwargs: asked.append(
        (question, images and [image.size for image in images])) or real(self, question, images, *args, **kwargs))
    red, size = str(folder.parent / "red.png"), (90, 50)  # the files come decoded, as red.png's size
    assert main(["chat", "What colour is it?", "--model", str(folder), "--image", red, "--max-new-tokens", "3"]) == 0
    quoted = capsys.readouterr().out
    assert main(["chat", "What", "--image", red, "colour", "--max-new-tokens", "3", "is", "--no-compile", "it?",
                 "--model", str(folder)]) == 0
    assert capsys.readouterr().out == quoted
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "3", "--", "--image", red]) == 0
    assert main(["chat", "--model", str(folder), "--image", red, "--max-new-tokens", "3", "--", "-1", "or", "1?"]) == 0
    # words before the flags and after `--` (refused as 'unrecognized arguments: -- -x')
    assert main(["chat", "What", "--model", str(folder), "--image", red, "--max-new-tokens", "3", "--", "-x"]) == 0
    assert asked == [("What colour is it?", [size])] * 2 + [(f"--image {red}", None), ("-1 or 1?", [size]),
                                                             ("What -x", [size])]
    capsys.readouterr()
    with pytest.raises(SystemExit):  # still a command's own positionals only
        main(["tiles", "a.png", "--max-num", "3", "b.png"])
    assert "unrecognized arguments: b.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["tiles", "a.png", "--max-num", "3", "--", "-b.png"])
    assert "unrecognized arguments: -b.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # `--` ends the flags: the flag before it has no value
        main(["chat", "--image", "--", "a.png"])
    assert "argument --image: expected one argument" in capsys.readouterr().err
    assert main(["tiles", "--max-num", "3", "--", "-b.png"]) == 1  # a positional one after `--`
    assert "-b.png" in capsys.readouterr().err


def test_interactive_reset_says_the_conversation_starts_over(folder, monkeypatch, capsys):
    """/reset drops the images and the turns, and says so, as /image does (it printed nothing)."""
    import io

    from internvl_mpo import cli_chat

    image = folder.parent / "red.png"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {image}\nfirst?\n/reset\nsecond?\n"))
    assert cli_chat.chat(model=str(folder), device="cpu", max_new_tokens=4) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[-1] == "the conversation starts over, with no images or video"
    expected = InternVLChat.from_pretrained(folder).chat("second?", max_new_tokens=4, do_sample=False)
    assert captured.out.splitlines()[-1] == expected


def test_interactive_commands_help_video_and_a_conversation_too_long(folder, tmp_path):
    """/help and a mistyped command (with or without an argument) list the commands (not asked as a
    question); /image on a video conversation is refused with the way out; a history too long for the context says /reset helps."""
    small = tmp_path / "small"
    small.mkdir()
    for f in folder.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    config = json.loads((small / "config.json").read_text())
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 40), (i * 100, 0, 0)).save(frames / f"{i}.png")
    question = "Tell me about " + "the big red square and " * 8 + "nothing else."
    bot = InternVLChat.from_pretrained(folder)
    first = len(bot.prepare(question, None, str(frames), None, num_segments=2).prompt_ids)
    config["llm_config"]["max_position_embeddings"] = first + 12  # room for one turn, not for two
    (small / "config.json").write_text(json.dumps(config))
    blue = folder.parent / "blue.png"
    stdin = f"/help\n/hlep\n/imgae {blue}\n/image {blue}\n{question}\n{question}\n/reset now\n/exit\n"
    out = cli("chat", "--model", small, "--max-new-tokens", "4", "--video", frames, "--num-segments", "2", stdin=stdin)
    assert out.returncode == 0, out.stderr
    err = out.stderr.splitlines()
    # every command, /help itself included (it was left out)
    assert err[1] == "/image FILE adds an image, /reset starts over, /exit quits, /help shows this list"
    assert err[2].startswith("unknown command /hlep; /image FILE")
    assert err[3].startswith("unknown command /imgae; /image FILE")  # a misspelt command with its argument too
    assert "images and a video do not mix (/reset starts over" in err[4]
    assert err[5].startswith("error: prompt is") and err[5].endswith("(earlier turns count: /reset starts over)")
    assert err[6].startswith("/reset takes nothing after it; /image FILE")  # it was "unknown command /reset"
    assert len(out.stdout.strip().splitlines()) == 1  # one answer: no command was asked as a question


def test_text_that_is_not_utf8_is_named_as_such(folder):
    """A line typed at a terminal that does not send UTF-8 (Latin-1 \\xe9) was refused as "a lone surrogate ...
    (a broken \\uXXXX escape?)", and where Python reads stdin strictly it was a UnicodeDecodeError traceback; the
    question given on the command line too. Now each says the text is not UTF-8."""
    import os

    from internvl_mpo import cli_chat
    from internvl_mpo.errors import InputError

    said = "is not UTF-8 text (byte 0xe9 at character 3); set the terminal's encoding to UTF-8"
    with pytest.raises(InputError) as e:  # before the model loads
        cli_chat.chat("caf\udce9?", model=str(folder / "nope"))
    assert str(e.value) == f"the question {said}"
    for errors in ("surrogateescape", "strict"):
        out = subprocess.run([sys.executable, "-m", "internvl_mpo.cli", "chat", "--model", str(folder),
                              "--max-new-tokens", "2"], input=b"caf\xe9?\nHi?\n", capture_output=True, timeout=120,
                             env={**os.environ, "PYTHONIOENCODING": f"utf-8:{errors}"})
        err = out.stderr.decode()
        assert out.returncode == 0 and f"error: the line {said}\n" in err and "Traceback" not in err, err
        assert len(out.stdout.decode().strip().splitlines()) == 1  # the next line is answered


def test_stdout_writes_what_its_encoding_cannot_as_escapes(folder, tmp_path):
    """stdout is strict outside the C locale: a file name whose bytes are not UTF-8 (under en_US.UTF-8), or an
    answer's CJK text (under a Latin-1 or cp1252 locale, Windows output redirected to a file), raised
    UnicodeEncodeError after the work was done: `tiles` had written its PNG, `convert` its folder."""
    Image.new("RGB", (64, 48), "red").save(tmp_path / "a.png")
    name = os.fsdecode(b"caf\xe9.png")  # "caf\udce9.png"
    shutil.copy(tmp_path / "a.png", tmp_path / name)
    runs = [(["tiles", name], "utf-8", "preview: caf\\udce9.png.tiles.png"),
            (["chat", "--model", str(folder), "--choice", "\u65e5\u672c", "Which?"], "cp1252", "\\u65e5\\u672c")]
    for args, encoding, shown in runs:
        out = subprocess.run([sys.executable, "-m", "internvl_mpo.cli", *args], capture_output=True, timeout=120,
                             cwd=tmp_path, env={**os.environ, "PYTHONIOENCODING": encoding})
        assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr.decode()
        assert shown in out.stdout.decode(encoding), out.stdout


def test_interactive_images_too_many_for_the_context_say_reset_drops_them(folder, tmp_path, monkeypatch, capsys):
    """Images added with /image until the prompt outgrew the context failed every question with an error that
    named max_num and total_max_num, which the session cannot change, and not /reset, which drops them."""
    import io
    import shutil
    from pathlib import Path

    from internvl_mpo import cli_chat

    small = Path(shutil.copytree(folder, tmp_path / "small"))
    config = json.loads((small / "config.json").read_text())
    text_only = len(InternVLChat.from_pretrained(folder).prepare("Hi?").prompt_ids)
    config["llm_config"]["max_position_embeddings"] = text_only + 4  # room for the question, not for an image
    (small / "config.json").write_text(json.dumps(config))
    image = folder.parent / "red.png"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {image}\nHi?\n/reset\nHi?\n"))
    assert cli_chat.chat(model=str(small), device="cpu", max_new_tokens=2) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[2].startswith("error: prompt is") and err[2].endswith(" (/reset starts over without the images)")
    assert len(err) == 4  # the question after /reset is answered
    # The line's own <image> placeholder: checked alone it was a count error, which ended the session.
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {image}\n<image> Hi?\n/reset\nHi?\n"))
    assert cli_chat.chat(model=str(small), device="cpu", max_new_tokens=2) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[2].startswith("error: prompt is") and err[2].endswith(" (/reset starts over without the images)"), err
    assert len(err) == 4



def test_interactive_reset_is_not_offered_where_the_question_alone_is_too_long(folder, tmp_path, monkeypatch, capsys):
    """A question too long for the context even alone was told "/reset starts over without the images" beside its
    images, and "earlier turns count: /reset starts over" after a turn, where /reset does not help."""
    import io
    import shutil
    from pathlib import Path

    from internvl_mpo import cli_chat

    small = Path(shutil.copytree(folder, tmp_path / "small"))
    config = json.loads((small / "config.json").read_text())
    text_only = len(InternVLChat.from_pretrained(folder).prepare("Hi?").prompt_ids)
    config["llm_config"]["max_position_embeddings"] = text_only + 4  # room for "Hi?", not for the long question
    (small / "config.json").write_text(json.dumps(config))
    long = "Tell me about " + "the big red square and " * 8 + "nothing else."
    image = folder.parent / "red.png"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"Hi?\n{long}\n/image {image}\n{long}\n"))
    assert cli_chat.chat(model=str(small), device="cpu", max_new_tokens=2) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[1].startswith("error: prompt is") and err[1].endswith(f"at most {text_only + 3}"), err
    assert err[3].startswith("error: prompt is") and err[3].endswith(" tokens"), err  # "without its images it is N"
    assert len(err) == 4

def test_help_lists_commands():
    out = cli("--help")
    assert out.returncode == 0 and "chat" in out.stdout and "generate" in out.stdout
    out = cli("chat", "--help")
    assert "--max-new-tokens" in out.stdout and "repeat the flag" in out.stdout
    assert "/reset, /exit, /help)" in " ".join(out.stdout.split())  # the session's commands, as README lists them
    help_text = " ".join(out.stdout.split())
    assert "(default: the shipped demo model) --" in help_text  # said once, not followed by "(default: None)"
    assert "(default: 1024)" in help_text  # defaults not written in words are still shown
    help_text = " ".join(cli("generate", "--help").stdout.split())
    assert "--input INPUT JSONL lines" in help_text and '"video"} --output' in help_text  # required: no default
    assert 'a resume must repeat (a greedy one all but --seed, --top-p and --top-k) --model' in help_text  # later lines
    assert "--grammar GRAMMAR a file holding a GBNF or Lark grammar" in help_text  # it said GBNF; Lark is taken too
    for command in ("chat", "generate", "serve", "train", "eval", "pairs", "tiles", "convert", "plot"):
        assert "default: None" not in cli(command, "--help").stdout, command  # a flag not given says nothing


def test_the_readmes_command_lines_show_each_flags_default():
    """`[--flag N]` in the README's command lines is the flag's default, as `--help` shows it."""
    from internvl_mpo.cli import _resolve, build_parser

    readme = Path(__file__).resolve().parents[1] / "README.md"
    lines = [line for line in readme.read_text(encoding="utf-8").splitlines() if line.startswith("internvl-mpo ")]
    shown = [(line.split()[1], flag, value) for line in lines
             for flag, value in re.findall(r"\[--([a-z-]+) (\d+)\]", line)]
    assert len(shown) >= 4, shown  # generate's --batch-size, tiles' --max-num and --min-num, eval's --max-num
    for command, flag, value in shown:
        parser = build_parser(_resolve(command), command)
        assert parser.get_default(flag.replace("-", "_")) == int(value), (command, flag)


def test_chat_samples_the_model_cards_8_video_frames_unless_told():
    """The model card's video example samples num_segments=8 frames (the reference's load_video default is 32)."""
    from internvl_mpo.cli import build_parser
    from internvl_mpo.cli_chat import chat

    parser = build_parser(chat, "chat")
    assert parser.get_default("num_segments") == 8
    assert "frames sampled from a video (default: 8)" in " ".join(parser.format_help().split())


def test_no_command_is_a_usage_error():
    out = cli()  # as argparse does for a missing argument: usage on stderr, exit status 2
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("usage: internvl-mpo <command>") and "chat" in out.stderr


def test_an_unknown_command_is_a_usage_error_naming_it(capsys):
    from internvl_mpo.cli import COMMANDS, main

    assert main(["chta", "What is it?"]) == 2  # a usage error, as argparse's for an unknown flag
    err = capsys.readouterr().err
    assert err == "internvl-mpo: unknown command 'chta'; commands: " + ", ".join(COMMANDS) + "\n"


def test_tiles_command_prints_grid_and_writes_png(tmp_path):
    image = tmp_path / "wide.jpg"
    Image.new("RGB", (1920, 1080), "red").save(image)
    out = cli("tiles", image, "--output", tmp_path / "t.png")
    assert out.returncode == 0, out.stderr
    assert "4x2 grid" in out.stdout and "9 tiles" in out.stdout and "2306 tokens" in out.stdout
    with Image.open(tmp_path / "t.png") as png:
        assert png.width > 448 and png.height > 200
    # Without --output the picture goes to the current folder, not beside the image.
    (tmp_path / "here").mkdir()
    out = cli("tiles", image, cwd=tmp_path / "here")
    assert out.returncode == 0 and "preview: wide.jpg.tiles.png" in out.stdout, out.stderr
    assert (tmp_path / "here" / "wide.jpg.tiles.png").is_file() and not (tmp_path / "wide.jpg.tiles.png").exists()


def test_tiles_refuses_to_write_its_picture_over_the_image(tmp_path):
    """`tiles photo.png --output photo.png` replaced the photo with the picture of its tiles."""
    image = tmp_path / "photo.png"
    Image.new("RGB", (90, 50), "red").save(image)
    before = image.read_bytes()
    for output in (image, tmp_path / "photo", tmp_path / "." / "photo.png"):
        out = cli("tiles", image, "--output", output)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.strip().endswith(": is the image shown; the picture would replace it: write it to another"
                                           " path"), out.stderr
    assert image.read_bytes() == before


def test_bad_device_dtype_and_tile_budget_are_one_line_errors(folder):
    cases = [(["--dtype", "foo"], "unknown dtype 'foo'"), (["--device", "foo"], "unknown device 'foo'"),
             (["--device", "meta"], "device 'meta' holds no data"),
             (["--max-num", "0", "--image", folder.parent / "red.png"], "--max-num must be at least 1, got 0")]
    if not __import__("torch").cuda.is_available():
        cases.append((["--device", "cuda"], "sees no CUDA device"))
    for args, message in cases:
        out = cli("chat", "--model", folder, *args, "hi")
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_a_bare_gpu_index_is_that_cuda_device_in_every_command(folder, tmp_path, monkeypatch):
    """`--device 0` said "unknown device '0'", while `device=0` in Python is cuda:0: a string of digits is cuda:N."""
    import torch

    from internvl_mpo import cli_chat, devices
    from internvl_mpo.devices import default_device

    assert default_device("1") == "cuda:1" and default_device("cpu") == "cpu"
    if not __import__("torch").cuda.is_available():
        out = cli("chat", "--model", folder, "--device", "0", "hi")
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert "device 'cuda:0' asked for, but this PyTorch sees no CUDA device" in out.stderr

    class Loaded(Exception):
        pass

    def from_pretrained(path, dtype=None, device=None, **kw):
        raise Loaded(device)

    monkeypatch.setattr(InternVLChat, "from_pretrained", staticmethod(from_pretrained))
    # generate reads the device (run_dtype) before the model loads: a CPU machine passes for one with two GPUs here
    monkeypatch.setattr(devices, "parse_device", lambda device: torch.device(devices.device_name(device)))
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "a", "question": "Hi"}\n')
    with pytest.raises(Loaded, match="^cuda:1$"):
        cli_chat.chat("Hi", model=str(folder), device="1")
    with pytest.raises(Loaded, match="^cuda:1$"):
        cli_chat.generate(input=str(requests), output=str(tmp_path / "out.jsonl"), model=str(folder), device="1")
    # the run's recorded dtype is CUDA's default (bf16), not the CPU's: a resume on cuda:1 is the same run
    assert cli_chat.run_dtype(None, default_device("1"), str(folder))[0] == "bfloat16"


def test_generate_refuses_malformed_image_and_video_fields_up_front(folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    for field, value, message in [("image", 5, "'image' must be a path or a list of paths"),
                                  ("image", ["x.png", 7], "'image' must be a path or a list of paths"),
                                  ("image", ["x.png", ""], "'image' must be a path or a list of paths"),
                                  ("video", {"a": 1}, "'video' must be a path")]:
        lines = [{"id": "a", "question": "Hi"}, {"id": "b", "question": "Hi", field: value}]
        requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
        out = cli("generate", "--input", requests, "--output", tmp_path / "a.jsonl", "--model", folder)
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"{requests}:2: {message}" in out.stderr
    # both an image and a video: refused with its line before the model loads (it was an "error" answer line once the
    # model ran, as prepare() refused it)
    lines = [{"id": "a", "question": "Hi"}, {"id": "b", "question": "Hi", "image": ["x.png"], "video": "clip.mp4"}]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = cli("generate", "--input", requests, "--output", tmp_path / "a.jsonl", "--model", folder)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"{requests}:2: give 'image' or 'video', not both" in out.stderr
    assert not (tmp_path / "a.jsonl").exists()


def test_generate_reads_an_empty_image_or_video_as_none_as_pairs_and_eval_do(folder, tmp_path):
    """"video": "" took the requests file's own folder for a folder of frames (every picture beside the file),
    and "image": "" failed as "./: is a directory, not an image file"; pairs and eval read an empty field as none."""
    (tmp_path / "red.png").write_bytes((folder.parent / "red.png").read_bytes())
    requests = tmp_path / "requests.jsonl"
    lines = [{"id": "v", "question": "Hello", "video": ""}, {"id": "i", "question": "Hello", "image": ""}]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    answers = tmp_path / "answers.jsonl"
    out = cli("generate", "--input", requests, "--output", answers, "--model", folder, "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    text_only = InternVLChat.from_pretrained(folder).chat("Hello", max_new_tokens=8, do_sample=False)
    assert [json.loads(x) for x in answers.read_text().splitlines()] == [
        {**line, "answer": text_only} for line in lines]  # the fields as the requests wrote them


def test_a_closed_pipe_ends_the_command_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "internvl_mpo.cli", "--help"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the command writes (as with `| head` that has quit)
    stderr = proc.stderr.read()
    proc.stderr.close()  # left to the garbage collector, its ResourceWarning came in a later test
    assert proc.wait(timeout=120) == 141 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_command_list_reads_the_docstrings_without_importing_the_commands():
    """`internvl-mpo --help` lists each command's docstring summary, read from source (no torch import)."""
    import inspect

    from internvl_mpo import cli as cli_module

    code = "import sys; from internvl_mpo.cli import main; main(['--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("False"), out.stderr
    for name in cli_module.COMMANDS:
        summary = (inspect.getdoc(cli_module._resolve(name)) or "").splitlines()[0]
        assert f"  {name:10s} {summary}" in out.stdout


def test_every_command_answers_help_without_importing_torch():
    """A command's module is imported to build its flags; none of them imports torch (about 1.5 s), so
    `internvl-mpo COMMAND --help` answers at once (`convert` took 1.8 s while its command lived in convert.py)."""
    from internvl_mpo.cli import COMMANDS

    code = ("import contextlib, io, sys\n"
            "from internvl_mpo.cli import main\n"
            "for name in sys.argv[1:]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
            "        main([name, '--help'])\n"
            "    print(name, 'usage: internvl-mpo ' + name in out.getvalue(), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, *COMMANDS], capture_output=True, text=True, timeout=120)
    assert out.stdout.splitlines() == [f"{name} True False" for name in COMMANDS], out.stderr


def test_an_eager_chat_never_imports_dynamo_or_sympy():
    """Importing torch._dynamo costs a process about a second and 70 MB, sympy (torch's symbolic shapes)
    0.6 s; an eager chat has no use for either. Dynamo came in through torch.compiler's marker on
    llm.thread_count (now set by a compiling Engine) and through nn.Embedding drawing its weights on the
    meta device, where torch's normal_ imports it; sympy through torch.randn on the meta device."""
    code = ("import sys\n"
            "from internvl_mpo.cli import main\n"
            "assert main(['chat', '--image', 'examples/scene_1.png', '--max-new-tokens', '4', 'How many?']) == 0\n"
            "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'torch._inductor', 'sympy'))))")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=repo)
    assert out.returncode == 0 and out.stdout.strip().endswith("[]"), (out.stdout, out.stderr)


def test_the_command_line_starts_without_torch_and_ctrl_c_while_importing_is_quiet(monkeypatch):
    code = "import sys, internvl_mpo.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr  # Ctrl-C there can only hit the code below

    from internvl_mpo import cli as cli_module

    def interrupted(name):
        raise KeyboardInterrupt  # as if Ctrl-C came while the command's modules were importing

    monkeypatch.setattr(cli_module, "_resolve", interrupted)
    assert cli_module.main(["chat", "hi"]) == 130


def test_flag_errors_are_refused_before_torch_loads(tmp_path):
    """Sampling, constraint, count and output-path flags of chat and generate, generate's requests file, eval's
    counts, pairs' settings, serve's limits, train's flags and plot's metrics file are checked before torch and the
    model's code import (about 1.5 s of a process's start): a mistyped flag is refused at once, in one line."""
    (tmp_path / "bad.gbnf").write_text("root ::= (\n")
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "Hi"}) + "\n"
                                        + json.dumps({"question": "Hi", "imgae": "a"}))
    calls = [["chat", "--temperature", "-1", "hi"], ["chat", "--top-p", "0", "hi"], ["chat", "--max-num", "0", "hi"],
             ["chat", "--regex", "(a", "hi"], ["chat", "--regex", "a", "--choice", "a", "hi"],
             ["chat", "--grammar", str(tmp_path / "bad.gbnf"), "hi"],
             ["chat", "--json-schema", str(tmp_path / "bad.json"), "hi"],
             ["chat", "--image", "a.png", "--video", "b.mp4", "hi"],
             ["generate", "--input", "x.jsonl", "--output", str(tmp_path / "no" / "a.jsonl")],
             ["generate", "--input", "x.jsonl", "--output", str(tmp_path / "a.jsonl"), "--batch-size", "0"],
             ["generate", "--input", "x.jsonl", "--output", str(tmp_path / "a.jsonl"), "--min-new-tokens", "9",
              "--max-new-tokens", "4"],
             ["eval", "--data", "x.jsonl", "--max-new-tokens", "0"],
             ["pairs", "correctness", "--model", "m", "--input", "x.jsonl", "--output", "o", "--samples", "0"],
             ["serve", "--port", "99999"], ["serve", "--max-batch", "0"],
             ["generate", "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "a.jsonl")],
             ["train", "mpo", "--model", "m", "--data", "meta.json", "--output", "o", "--lr", "-1"],
             ["train", "sft", "--data", "a.jsonl", "--output", "o"],
             ["train", "sft", "--model", "m", "--data", "a.jsonl", "--output", "o", "--quality-weight", "0.2"],
             ["plot", str(tmp_path)],
             ["generate", "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "a.jsonl")],
             ["chat", "--max-pixels", "0", "hi"],
             ["generate", "--input", "x.jsonl", "--output", str(tmp_path / "a.jsonl"), "--max-pixels", "0"]]
    code = ("import json, sys\n"
            "from internvl_mpo.cli import main\n"
            f"for args in {calls!r}:\n"
            "    print(json.dumps([main(args), 'torch' in sys.modules]), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert [json.loads(line) for line in out.stdout.splitlines()] == [[1, False]] * len(calls), out.stderr
    errors = out.stderr.splitlines()
    assert len(errors) == len(calls) and all(line.startswith("internvl-mpo ") for line in errors), out.stderr
    for needle, line in zip(["--temperature", "--top-p", "--max-num", "--regex", "--regex or --choice", "--grammar",
                             "--json-schema", "--image or --video", "does not exist", "--batch-size",
                             "--min-new-tokens", "--max-new-tokens", "--samples", "--port must be in 0..65535",
                             "--max-batch must be >= 1", "missing.jsonl: requests file not found", "--lr must be >= 0",
                             "--model (a checkpoint folder", "--quality-weight must be 0 in sft",
                             "metrics.jsonl: no metrics file", "bad.jsonl:2: field 'imgae'",
                             "--max-pixels must be a whole number of pixels >= 1, got 0", "--max-pixels"], errors):
        assert needle in line, line


CTRL_C_WHILE_LOADING = """
import sys, time, types
from internvl_mpo.cli import main
from internvl_mpo.pipeline import InternVLChat
from internvl_mpo.train import mpo

def loading(*args, **kwargs):  # a model load that lasts until Ctrl-C
    print("loading", file=sys.stderr, flush=True)
    time.sleep(300)

def answering(*args, **kwargs):  # an answer, cut short by Ctrl-C: chat ends its line itself
    print("answering", file=sys.stderr, flush=True)
    time.sleep(300)

InternVLChat.from_pretrained = mpo.load_initial_model = staticmethod(loading)
for command in COMMANDS:
    if command == ["chat", "answer"]:
        InternVLChat.from_pretrained = staticmethod(lambda *args, **kwargs: types.SimpleNamespace(prepare=answering))
    print("rc", main(command), file=sys.stderr, flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_ctrl_c_while_the_model_loads_ends_the_terminal_line(folder, tmp_path):
    """Ctrl-C at a terminal while a command's model loaded exited 130 with the terminal's ^C (or a progress bar)
    as the last thing on the line: the shell's prompt came after it. The line is ended; where the command prints a
    line of its own at Ctrl-C (train's, chat's cut answer), no second, empty one follows."""
    import os
    import pty
    import select
    import signal

    requests, bench, sft = tmp_path / "requests.jsonl", tmp_path / "bench.jsonl", tmp_path / "sft.jsonl"
    requests.write_text(json.dumps({"id": 1, "question": "hi"}) + "\n")
    sft.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]})
                   + "\n")
    bench.write_text(json.dumps({"id": 1, "image": str(folder.parent / "red.png"), "question": "Which?",
                                 "options": {"A": "red", "B": "blue"}, "answer": "A"}) + "\n")
    commands = [["chat", "hi"], ["generate", "--input", str(requests), "--output", str(tmp_path / "a.jsonl")],
                ["eval", "--data", str(bench), "--output", str(tmp_path / "eval")],
                ["pairs", "correctness", "--model", str(folder), "--input", str(bench),
                 "--output", str(tmp_path / "p")],
                ["serve", "--port", "0"], ["chat", "answer"],
                ["train", "sft", "--model", str(folder), "--data", str(sft), "--output", str(tmp_path / "t")]]
    pid, terminal = pty.fork()
    if pid == 0:  # the command, on a terminal of its own (Ctrl-C as a foreground command gets it)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-c", f"COMMANDS = {commands!r}\n{CTRL_C_WHILE_LOADING}"])
    shown, typed = b"", 0
    try:
        while True:
            ready, _, _ = select.select([terminal], [], [], 120)
            assert ready, shown
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # the command exited
                break
            if not chunk:
                break
            shown += chunk
            if shown.count(b"loading\r\n") + shown.count(b"answering\r\n") > typed:
                os.write(terminal, b"\x03")  # Ctrl-C, typed at the terminal
                typed += 1
    finally:
        os.waitpid(pid, 0)
    assert shown.decode() == "".join(f"{step}\r\n^C\r\nrc 130\r\n" for step in ["loading"] * 5 + ["answering"]) + (
        "loading\r\n^Cinternvl-mpo train: interrupted by Ctrl-C; no checkpoint was saved: run the same command with "
        "--resume to start over\r\nrc 130\r\n")


def test_chat_and_generate_default_to_cuda_when_it_is_there(folder, tmp_path, monkeypatch):
    """As pairs, eval, serve and train do: a GPU machine does not quietly run the model on the CPU."""
    import torch

    from internvl_mpo import cli_chat, devices

    class Loaded(Exception):
        pass

    def from_pretrained(path, dtype=None, device=None, **kw):
        raise Loaded(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(InternVLChat, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(devices, "parse_device", lambda device: torch.device(devices.device_name(device)))
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"id": "a", "question": "Hi"}\n')
    for run in (lambda: cli_chat.chat("Hi", model=str(folder)),
                lambda: cli_chat.generate(input=str(requests), output=str(tmp_path / "out.jsonl"), model=str(folder))):
        with pytest.raises(Loaded, match="^cuda$"):
            run()
    with pytest.raises(Loaded, match="^cpu$"):
        cli_chat.chat("Hi", model=str(folder), device="cpu")


def test_pixel_limit_can_be_set_on_the_command_line(folder, tmp_path):
    image = folder.parent / "red.png"  # 90 x 50 = 4500 pixels
    for args in (["chat", "--model", folder, "--image", image, "hi"], ["tiles", image, "--output", tmp_path / "t.png"]):
        out = cli(*args, "--max-pixels", "4000")
        assert out.returncode == 1 and "exceeds the limit of 4000" in out.stderr, out.stderr
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": 1, "question": "hi", "image": str(image)}) + "\n")
    out = cli("generate", "--model", folder, "--input", requests, "--output", tmp_path / "a.jsonl", "--max-pixels", "4000")
    assert out.returncode == 0 and "exceeds the limit of 4000" in (tmp_path / "a.jsonl").read_text(), out.stderr
    out = cli("chat", "--model", folder, "--max-pixels", "4000", "--max-new-tokens", "1", stdin=f"/image {image}\n/exit\n")
    assert "exceeds the limit of 4000" in out.stderr, out.stderr


# Pillow checks the masks of drawn text against its limit too: the preview's labels (about 6500 pixels) pass a real
# limit by far, and only this test's limit of a few thousand pixels makes Pillow warn about them.
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_above_pillows_own_is_honoured(folder, tmp_path, monkeypatch):
    """Pillow refuses images over twice its MAX_IMAGE_PIXELS whatever limit is passed: a --max-pixels above
    that raises Pillow's limit too (the error told a command-line user to raise PIL.Image.MAX_IMAGE_PIXELS)."""
    from PIL import Image as PILImage

    from internvl_mpo import cli_chat

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # Pillow then refuses over 2000 pixels
    image = str(folder.parent / "red.png")  # 90 x 50 = 4500 pixels
    assert cli_chat.tiles(image, output=str(tmp_path / "t.png"), max_pixels=5000) == 0
    assert cli_chat.chat("hi", model=str(folder), image=[image], max_pixels=5000, max_new_tokens=1, device="cpu") == 0
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": 1, "question": "hi", "image": image}) + "\n")
    cli_chat.generate(input=str(requests), output=str(answers), model=str(folder), max_pixels=5000,
                      max_new_tokens=1, device="cpu")
    assert "answer" in json.loads(answers.read_text()), answers.read_text()


def test_tile_and_frame_counts_are_checked_before_the_model_loads(tmp_path):
    """A --max-num or --num-segments below 1 is one error before a (minutes-long) model load; generate wrote
    an error line for every request with images instead, and answered the rest."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": 1, "question": "hi"}) + "\n")
    missing = tmp_path / "no-model"
    for args, flag in ((["chat", "--model", missing, "--max-num", "0", "hi"], "--max-num"),
                       (["chat", "--model", missing, "--num-segments", "0", "hi"], "--num-segments"),
                       (["generate", "--model", missing, "--input", requests, "--output", tmp_path / "a.jsonl",
                         "--max-num", "0"], "--max-num")):
        out = cli(*args)
        assert out.returncode == 1 and f"error: {flag} must be at least 1, got 0" in out.stderr, out.stderr
    assert not (tmp_path / "a.jsonl").exists()


def test_a_tile_budget_past_the_limit_is_refused_before_the_model_loads(tmp_path):
    """--max-num past 10000 (the tiling's limit): chat loaded the model first, generate wrote an error line for
    every request with images, and pairs recorded the value, skipped every item with an image for good and
    refused the corrected flag as "other settings" in the same --output."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": 1, "question": "hi"}) + "\n")
    missing = tmp_path / "no-model"
    for args in (["chat", "--model", missing, "--max-num", "20000", "hi"],
                 ["generate", "--model", missing, "--input", requests, "--output", tmp_path / "a.jsonl",
                  "--max-num", "20000"],
                 ["eval", "--model", missing, "--data", requests, "--output", tmp_path / "e", "--max-num", "20000"],
                 ["pairs", "correctness", "--model", missing, "--input", requests, "--output", tmp_path / "p",
                  "--max-num", "20000"]):
        out = cli(*args)
        assert out.returncode == 1 and "error: --max-num must be at most 10000 tiles" in out.stderr, out.stderr
    assert not any((tmp_path / name).exists() for name in ("a.jsonl", "a.jsonl.settings.json", "e", "p"))


def test_generate_seeds_request_k_as_batch_chat_seeds_question_k(folder, tmp_path):
    """--seed S gives the file's k-th request (from 0) the seed S + k, as batch_chat(seed=S) seeds its questions,
    so one request answers as `chat --seed S` does (the first request took S + 1)."""
    questions = ["Colour?", "Shape?", "Size?"]
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text("".join(json.dumps({"id": i, "question": q}) + "\n" for i, q in enumerate(questions)))
    out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--seed", "7",
              "--temperature", "1", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    expected = InternVLChat.from_pretrained(folder).batch_chat(questions, seed=7, max_new_tokens=8)
    assert [json.loads(line)["answer"] for line in answers.read_text().splitlines()] == expected
    out = cli("chat", "--model", folder, "--seed", "7", "--temperature", "1", "--max-new-tokens", "8", questions[0])
    assert out.stdout.strip() == expected[0]


def test_generate_names_urls_in_requests_as_urls(folder, tmp_path):
    requests = tmp_path / "requests.jsonl"
    lines = [{"id": 1, "question": "Hi", "image": "https://example.com/a.jpg"},
             {"id": 2, "question": "Hi", "image": ["red.png", "http://example.com/b.png"]},
             {"id": 3, "question": "Hi", "video": "https://example.com/c.mp4"}]
    requests.write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "red.png").write_bytes((folder.parent / "red.png").read_bytes())
    out = cli("generate", "--model", folder, "--input", requests, "--output", tmp_path / "a.jsonl")
    assert out.returncode == 0, out.stderr
    errors = [json.loads(x)["error"] for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [e.split(": is a URL")[0] for e in errors] == ["https://example.com/a.jpg", "http://example.com/b.png",
                                                         "https://example.com/c.mp4"]


def test_min_new_tokens_flag(folder, tmp_path):
    """--min-new-tokens reaches the answer's settings in chat and generate, and one over --max-new-tokens is
    refused before the model loads."""
    from internvl_mpo import cli_chat
    from internvl_mpo.errors import InputError

    out = cli("chat", "--model", folder, "--max-new-tokens", "8", "--min-new-tokens", "8", "Hello")
    assert out.returncode == 0, out.stderr
    bot = InternVLChat.from_pretrained(folder)
    assert out.stdout.strip() == bot.chat("Hello", max_new_tokens=8, min_new_tokens=8, do_sample=False)
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    missing_model = str(folder / "nope")  # reached only if the setting gets through
    for run in (lambda: cli_chat.chat("Hi", model=missing_model, max_new_tokens=8, min_new_tokens=9),
                lambda: cli_chat.generate(input=str(requests), output=str(tmp_path / "a.jsonl"), model=missing_model,
                                          max_new_tokens=8, min_new_tokens=-1)):
        with pytest.raises(InputError, match=r"min_new_tokens must be in 0..max_new_tokens \(8\)"):
            run()


def test_max_num_is_the_image_budget_video_frames_take_one_tile(folder, tmp_path):
    """--max-num with a video: the frames take one tile each (the card's), in chat and in generate's
    video requests, while images get the budget (the API's max_num would tile each frame)."""
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        Image.new("RGB", (80, 40), (i * 100, 0, 0)).save(frames / f"{i}.png")
    out = cli("chat", "--model", folder, "--max-new-tokens", "3", "--temperature", "0", "--video", frames,
              "--num-segments", "2", "--max-num", "2", "What happens?")
    assert out.returncode == 0, out.stderr
    bot = InternVLChat.from_pretrained(folder)
    assert out.stdout.strip() == bot.chat("What happens?", video=str(frames), num_segments=2, max_new_tokens=3,
                                          do_sample=False)
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": 1, "question": "What happens?", "video": str(frames)}) + "\n")
    answers = tmp_path / "answers.jsonl"
    out = cli("generate", "--input", requests, "--output", answers, "--model", folder, "--max-new-tokens", "3",
              "--max-num", "2")
    assert out.returncode == 0, out.stderr
    row = json.loads(answers.read_text())
    assert "error" not in row and row["answer"] == bot.chat("What happens?", video=str(frames), max_new_tokens=3,
                                                            do_sample=False)


def test_interactive_chat_at_a_terminal_edits_the_line_with_the_arrow_keys(folder):
    """At a terminal the prompt reads its lines through readline, as chat programs and Python's own prompt
    do: without it the arrow keys moved nothing and reached the model as escape codes ("/rest", Left, "e"
    was asked as a question instead of being /reset)."""
    import os
    import select

    leader, follower = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "internvl_mpo.cli", "chat", "--model", str(folder),
                             "--max-new-tokens", "2"], stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "TERM": "xterm"}, start_new_session=True)
    os.close(follower)
    seen = b""

    def read_until(text: bytes) -> bool:
        nonlocal seen
        while text not in seen and select.select([leader], [], [], 120)[0]:
            try:
                seen += os.read(leader, 4096)
            except OSError:  # the chat ended and closed the terminal
                return False
        return text in seen

    try:
        assert read_until(b"> "), seen
        os.write(leader, b"/rest\x1b[De\r")  # Left moves the cursor back over the "t"
        assert read_until(b"the conversation starts over"), seen
        os.write(leader, b"/exit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(leader)


def test_interactive_image_command_reads_a_dropped_file_as_the_terminal_writes_it(folder, tmp_path, monkeypatch,
                                                                                   capsys):
    """A file dropped onto macOS Terminal or iTerm2 arrives with its spaces and brackets escaped by backslashes,
    and onto other terminals quoted, an apostrophe written '\\''; both were taken as part of the name ("no such
    file"). A path typed by hand, spaces and apostrophe as they are, still reads as typed."""
    import io

    from internvl_mpo import cli_chat

    pics = tmp_path / "Bob's pics (2)"
    pics.mkdir()
    (pics / "red.png").write_bytes((folder.parent / "red.png").read_bytes())
    escaped = str(pics / "red.png").replace(" ", "\\ ").replace("(", "\\(").replace(")", "\\)").replace("'", "\\'")
    quoted = "'" + str(pics / "red.png").replace("'", "'\\''") + "'"
    lines = [f"/image {escaped}", f"/image {quoted}", f"/image {pics / 'red.png'}"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert cli_chat.chat(model=str(folder), device="cpu") == 0
    err = capsys.readouterr().err
    assert "error" not in err and err.count(f"added {pics / 'red.png'}; ") == 3 and "with 3 image(s)" in err, err


def test_a_video_given_as_an_image_is_pointed_to_each_commands_own_way(folder, tmp_path, monkeypatch, capsys):
    """The hint for a video given as an image said "--video on the command line" everywhere: `tiles` has no
    video at all, /image cannot take one mid-chat, and a batch file's request takes it as its "video"."""
    import io

    from internvl_mpo import cli_chat
    from internvl_mpo.cli import main

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x1cftypisom\x00\x00\x02\x00isomiso2mp41" + bytes(100))
    assert main(["tiles", str(clip), "--output", str(tmp_path / "t.png")]) == 1
    err = capsys.readouterr().err
    assert err.endswith("it looks like a video: `tiles` shows images only\n") and "--video" not in err, err
    monkeypatch.setattr("sys.stdin", io.StringIO(f"/image {clip}\n"))
    assert cli_chat.chat(model=str(folder), device="cpu") == 0
    err = capsys.readouterr().err
    assert "it looks like a video: a chat about a video starts with --video FILE\n" in err, err
    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": 1, "question": "hi", "image": str(clip)}) + "\n")
    assert cli_chat.generate(input=str(requests), output=str(answers), model=str(folder), device="cpu") == 0
    assert json.loads(answers.read_text())["error"].endswith("it looks like a video: give it as the request's \"video\"")
    # and an image given as a request's "video" is pointed to its "image", not to --image
    picture = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(picture)
    requests.write_text(json.dumps({"id": 1, "question": "hi", "video": str(picture)}) + "\n")
    assert cli_chat.generate(input=str(requests), output=str(tmp_path / "more.jsonl"), model=str(folder),
                             device="cpu") == 0
    error = json.loads((tmp_path / "more.jsonl").read_text())["error"]
    assert "is an image, not a video" in error and error.endswith("give it as the request's \"image\"") \
        and "--image" not in error, error
    # --image at the start of a chat keeps the hint that fits it
    assert main(["chat", "hi", "--model", str(folder), "--image", str(clip)]) == 1
    assert "--video on the command line" in capsys.readouterr().err


def test_json_mode_flag(folder, tmp_path):
    """--json-mode holds chat's and generate's answers to a JSON object (the API's json_mode=True), generate records
    it in its settings (a resume without it is refused), and --min-new-tokens beside it is refused by its flag."""
    from internvl_mpo.generate import json_mode

    out = cli("chat", "--model", folder, "--max-new-tokens", "12", "--json-mode", "Hello")
    assert out.returncode == 0, out.stderr
    bot = InternVLChat.from_pretrained(folder)
    expected = bot.chat("Hello", max_new_tokens=12, json_mode=True, do_sample=False)
    assert out.stdout.strip() == expected.strip() and expected.lstrip().startswith("{")
    assert json_mode.advance_bytes(json_mode.INITIAL, expected.encode()) is not None
    out = cli("chat", "--model", folder, "--json-mode", "--min-new-tokens", "2", "Hello")
    assert out.returncode == 1 and "--min-new-tokens does not go with --json-mode" in out.stderr, out.stderr
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hello"}) + "\n" + json.dumps({"id": "b", "question": "Hi"})
                        + "\n")
    answers = tmp_path / "a.jsonl"
    out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--max-new-tokens", "12",
              "--json-mode")
    assert out.returncode == 0, out.stderr
    assert json.loads(answers.read_text().splitlines()[0])["answer"] == expected
    assert json.loads((tmp_path / "a.jsonl.settings.json").read_text())["json_mode"] is True
    answers.write_text(answers.read_text().splitlines()[0] + "\n")  # one answer left to write
    out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--max-new-tokens", "12")
    assert out.returncode == 1 and "other settings (json_mode)" in out.stderr, out.stderr


def test_schema_and_grammar_files_with_a_byte_order_mark_or_a_huge_integer(tmp_path):
    """A schema or grammar file saved with a byte order mark (Windows editors) was refused ("Unexpected UTF-8 BOM",
    a grammar error at its first character), where meta.json and request files take one; a 5000-digit integer in
    a schema was refused with json's advice to call sys.set_int_max_str_digits()."""
    from internvl_mpo.cli_chat import _read_grammar, _read_schema
    from internvl_mpo.errors import InputError

    schema, grammar = tmp_path / "schema.json", tmp_path / "yes.gbnf"
    schema.write_bytes(b"\xef\xbb\xbf" + json.dumps({"enum": ["yes", "no"]}).encode())
    grammar.write_bytes(b'\xef\xbb\xbfroot ::= "yes" | "no"\n')
    assert _read_schema(str(schema)) == {"enum": ["yes", "no"]}
    assert _read_grammar(str(grammar)) == 'root ::= "yes" | "no"\n'
    schema.write_text('{"type": "integer", "maximum": ' + "9" * 5000 + "}")
    with pytest.raises(InputError, match=r"schema.json: its JSON holds an integer of more than 4300 digits$"):
        _read_schema(str(schema))


def test_json_schema_flag(folder, tmp_path):
    """--json-schema FILE holds chat's and generate's answers to a value of the schema (the API's json_schema),
    generate records the schema in its settings (a resume without it is refused), and a schema file that cannot be
    read or compiled is refused naming the file and the keyword."""
    schema = {"enum": ["yes", "no", 42]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    out = cli("chat", "--model", folder, "--max-new-tokens", "12", "--json-schema", path, "Hello")
    assert out.returncode == 0, out.stderr
    bot = InternVLChat.from_pretrained(folder)
    expected = bot.chat("Hello", max_new_tokens=12, json_schema=schema, do_sample=False)
    assert out.stdout.strip() == expected.strip() and json.loads(expected) in ("yes", "no", 42)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "string", "pattern": "(?=a)"}))
    out = cli("chat", "--model", folder, "--json-schema", bad, "Hello")
    assert out.returncode == 1 and f"--json-schema {bad}: pattern at #: regex '(?=a)': a lookaround" in out.stderr
    bad.write_text("{")
    out = cli("chat", "--model", folder, "--json-schema", bad, "Hello")
    assert out.returncode == 1 and f"--json-schema {bad}: not valid JSON (Expecting property name" in out.stderr
    out = cli("chat", "--model", folder, "--json-schema", tmp_path / "missing.json", "Hello")
    assert out.returncode == 1 and "missing.json: No such file or directory" in out.stderr, out.stderr
    out = cli("chat", "--model", folder, "--json-schema", path, "--json-mode", "Hello")
    assert out.returncode == 1 and "give --json-mode or --json-schema, not both" in out.stderr, out.stderr
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hello"}) + "\n" + json.dumps({"id": "b", "question": "Hi"})
                        + "\n")
    answers = tmp_path / "a.jsonl"
    out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--max-new-tokens", "12",
              "--json-schema", path)
    assert out.returncode == 0, out.stderr
    assert json.loads(answers.read_text().splitlines()[0])["answer"] == expected
    assert json.loads(json.loads((tmp_path / "a.jsonl.settings.json").read_text())["json_schema"]) == schema
    answers.write_text(answers.read_text().splitlines()[0] + "\n")  # one answer left to write
    reordered = tmp_path / "reordered.json"  # the same keywords, its properties generated in another order
    path.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "null"}, "b": {"type": "null"}}}))
    reordered.write_text(json.dumps({"type": "object", "properties": {"b": {"type": "null"}, "a": {"type": "null"}}}))
    out = cli("generate", "--model", folder, "--input", requests, "--output", tmp_path / "b.jsonl",
              "--max-new-tokens", "12", "--json-schema", path)
    assert out.returncode == 0, out.stderr
    (tmp_path / "b.jsonl").write_text((tmp_path / "b.jsonl").read_text().splitlines()[0] + "\n")
    out = cli("generate", "--model", folder, "--input", requests, "--output", tmp_path / "b.jsonl",
              "--max-new-tokens", "12", "--json-schema", reordered)
    assert out.returncode == 1 and "other settings (json_schema)" in out.stderr, out.stderr
    path.write_text(json.dumps(schema))
    out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--max-new-tokens", "12")
    assert out.returncode == 1 and "other settings (json_schema)" in out.stderr, out.stderr
    out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--max-new-tokens", "12",
              "--json-schema", path)
    assert out.returncode == 0, out.stderr
    assert [json.loads(json.loads(line)["answer"]) in ("yes", "no", 42) for line in answers.read_text().splitlines()] \
        == [True, True]


def test_regex_and_choice_flags(folder, tmp_path):
    """--regex PATTERN and --choice TEXT (repeated) hold chat's and generate's answers (the API's regex= and
    choice=), unstripped; generate records them in its settings (a resume under others is refused), and a regex this
    module does not take, two constraints or --min-new-tokens beside one are refused naming their flags."""
    bot = InternVLChat.from_pretrained(folder)
    pattern = r"(\d{1,3}|many) (cats|dogs)"
    out = cli("chat", "--model", folder, "--max-new-tokens", "12", "--regex", pattern, "How many?")
    assert out.returncode == 0, out.stderr
    expected = bot.chat("How many?", max_new_tokens=12, regex=pattern, do_sample=False)
    assert out.stdout == expected + "\n" and re.fullmatch(pattern, expected), out.stdout
    out = cli("chat", "--model", folder, "--choice", "yes", "--choice", " no way", "Is it?")
    choice = bot.chat("Is it?", choice=["yes", " no way"], do_sample=False)
    assert out.returncode == 0 and out.stdout == choice + "\n" and choice in ("yes", " no way"), out.stderr
    for args, message in ((["--regex", "(a"], "--regex: regex '(a': the '(' at position 0 is never closed"),
                          (["--regex", r"\bx"], r"--regex: regex '\\bx': the word boundary \b at position 0"),
                          (["--regex", "a", "--choice", "a"], "give --regex or --choice, not both"),
                          (["--choice", "a", "--min-new-tokens", "2"], "--min-new-tokens does not go with --choice"),
                          (["--json-mode", "--regex", "a"], "give --json-mode or --regex, not both")):
        out = cli("chat", "--model", folder, *args, "Hi")
        assert out.returncode == 1 and message in out.stderr, out.stderr
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "How many?"}) + "\n"
                        + json.dumps({"id": "b", "question": "Hi"}) + "\n")
    answers = tmp_path / "a.jsonl"
    out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--max-new-tokens", "12",
              "--regex", pattern)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in answers.read_text().splitlines()]
    assert lines[0]["answer"] == expected and all(re.fullmatch(pattern, line["answer"]) for line in lines)
    assert json.loads((tmp_path / "a.jsonl.settings.json").read_text())["regex"] == pattern
    answers.write_text(answers.read_text().splitlines()[0] + "\n")  # one answer left to write
    for args in ([], ["--regex", "(many|\\d{1,3}) (cats|dogs)"], ["--choice", "yes"]):
        out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--max-new-tokens", "12",
                  *args)
        assert out.returncode == 1 and "other settings (" in out.stderr and "regex" in out.stderr, out.stderr
    out = cli("generate", "--model", folder, "--input", requests, "--output", answers, "--max-new-tokens", "12",
              "--regex", pattern)
    assert out.returncode == 0 and len(answers.read_text().splitlines()) == 2, out.stderr
    out = cli("generate", "--model", folder, "--input", requests, "--output", tmp_path / "b.jsonl",
              "--max-new-tokens", "12", "--choice", "yes", "--choice", " no way")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "b.jsonl.settings.json").read_text())["choice"] == ["yes", " no way"]
    assert [json.loads(line)["answer"] for line in (tmp_path / "b.jsonl").read_text().splitlines()][0] == choice


def test_a_piped_session_that_starts_with_a_byte_order_mark_reads_its_first_command(folder, monkeypatch, capsys):
    """A session file saved as "UTF-8 with BOM" (Windows editors): its first line, "/image ...", went to the model
    as a question, and the next question was answered without the image."""
    import io

    from internvl_mpo import cli_chat

    image = folder.parent / "red.png"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"\ufeff/image {image}\nWhat is it?\n"))
    assert cli_chat.chat(model=str(folder), device="cpu", max_new_tokens=6) == 0
    out, err = capsys.readouterr()
    assert f"added {image}" in err
    assert out.strip() == InternVLChat.from_pretrained(folder).chat("What is it?", images=str(image),
                                                                    max_new_tokens=6, do_sample=False)


def test_generate_refuses_an_output_that_is_a_pipe_or_a_device(folder, tmp_path):
    """--output on a named pipe waited forever to read it; on a device (/dev/null, as root) the answers replaced
    the device with a file, and a settings file and a lock were written beside it."""
    import os
    import stat

    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    os.mkfifo(tmp_path / "answers.fifo")
    outputs = [tmp_path / "answers.fifo"]
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        outputs.append(tmp_path / "null")
    except PermissionError:  # not root: the pipe alone
        pass
    for out in outputs:
        run = cli("generate", "--input", requests, "--output", out, "--model", folder, "--max-new-tokens", 4)
        assert run.returncode == 1 and f"--output {out}: not a regular file (a pipe or a device)" in run.stderr
        assert not out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["requests.jsonl", *(o.name for o in outputs)])


def test_generate_writes_through_a_link_to_the_file_it_names(folder, tmp_path):
    """An --output that is a symbolic link was replaced by a file of its own at the first rewrite (the file it
    named stayed as it was), and its lock and settings were the link's: a run on the file and one through the
    link wrote into one file at once. They are the file's now."""
    from internvl_mpo import cli_chat

    requests, store = tmp_path / "requests.jsonl", tmp_path / "store"
    requests.write_text("".join(json.dumps({"id": k, "question": q}) + "\n" for k, q in [("a", "Hi"), ("b", "Yo")]))
    store.mkdir()
    (store / "answers.jsonl").write_text("")
    link = tmp_path / "answers.jsonl"
    link.symlink_to(store / "answers.jsonl")
    for _ in range(2):  # the second run finds every request answered and rewrites the file in order
        assert cli_chat.generate(input=str(requests), output=str(link), model=str(folder), max_new_tokens=4) == 0
        assert link.is_symlink()
        assert [json.loads(x)["id"] for x in (store / "answers.jsonl").read_text().splitlines()] == ["a", "b"]
    assert (store / "answers.jsonl.settings.json").is_file() and not (tmp_path / "answers.jsonl.settings.json").exists()


def test_generate_interrupted_as_an_answer_is_written_counts_the_lines_on_disk(folder, tmp_path, monkeypatch,
                                                                                capsys):
    """A Ctrl-C after an answer's line was written and before the progress bar moved said "nothing was written"
    (or one request fewer than the file held)."""
    import tqdm

    from internvl_mpo import cli_chat

    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text("".join(json.dumps({"question": q}) + "\n" for q in ("Hi", "Hello")))

    def ctrl_c(bar, n=1):
        raise KeyboardInterrupt

    monkeypatch.setattr(tqdm.tqdm, "update", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        cli_chat.generate(input=str(requests), output=str(answers), model=str(folder), device="cpu",
                          max_new_tokens=6, batch_size=1)
    assert capsys.readouterr().err.endswith(f"interrupted after 1 of 2 requests (their lines are in {answers}); run "
                                            "the same command again to resume\n")
    assert len(answers.read_text().splitlines()) == 1


def test_an_unreadable_requests_file_is_one_line(folder, tmp_path, monkeypatch, capsys):
    """A requests file without read permission (or an I/O error) ended generate, eval and pairs with a
    PermissionError traceback (their reader is one: jsonl.read_objects)."""
    from internvl_mpo.cli import main

    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    refuse_reading(monkeypatch, requests)
    assert main(["generate", "--input", str(requests), "--output", str(tmp_path / "a.jsonl"), "--model",
                 str(folder)]) == 1
    assert capsys.readouterr().err == f"internvl-mpo generate: error: {requests}: cannot read it (Permission denied)\n"


def test_a_finished_command_line_ignores_ctrl_c_while_its_process_ends(tmp_path):
    """A Ctrl-C in the 0.6 s a finished command's process takes to end (torch's teardown) printed a KeyboardInterrupt
    traceback, or turned its exit 0 into a kill. The command line's main() ignores SIGINT once it returns; main()
    called with arguments (from Python) leaves the handler alone."""
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    args = ["tiles", str(tmp_path / "a.png"), "--output", str(tmp_path / "t.png")]
    code = ("import signal, sys\n"
            "from internvl_mpo.cli import main\n"
            f"assert main({args!r}) == 0 and signal.getsignal(signal.SIGINT) is signal.default_int_handler\n"
            f"sys.argv = ['internvl-mpo', *{args!r}]\n"
            "print(main(), signal.getsignal(signal.SIGINT) is signal.SIG_IGN)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == "0 True", done.stderr


def test_an_answer_whose_activations_overflow_fails_alone_and_the_interactive_chat_goes_on(folder, monkeypatch,
                                                                                            capsys):
    """A NumericsError part way through an answer (fp16 activations past its range) ended the interactive session,
    its conversation lost, the error glued to the half answer's line: that question fails alone, as Ctrl-C's does."""
    import io

    from internvl_mpo import cli_chat
    from internvl_mpo.errors import NumericsError

    stream, prompts = InternVLChat.stream_prepared, []

    def overflowing_once(bot, prepared, params):
        prompts.append(prepared.prompt_ids)
        for i, piece in enumerate(stream(bot, prepared, params)):
            if len(prompts) == 1 and i == 1:  # as the engine fails a row at the step its hidden state is not finite
                raise NumericsError("the model's activations overflowed to NaN or inf during the answer (weights in "
                                    "float16: load it in bfloat16 or float32); its answer would be garbage")
            yield piece

    monkeypatch.setattr(InternVLChat, "stream_prepared", overflowing_once)
    monkeypatch.setattr("sys.stdin", io.StringIO("first?\nsecond?\n"))
    assert cli_chat.chat(model=str(folder), device="cpu", max_new_tokens=6) == 0
    assert len(prompts) == 2 and prompts[1] == InternVLChat.from_pretrained(folder).prepare("second?").prompt_ids
    out, err = capsys.readouterr()
    assert "error: the model's activations overflowed" in err and "left out of the conversation" in err
    assert len(out.splitlines()) == 2  # the half answer's line ended, then the second answer's


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("command", [["tiles", "{image}", "--output", "{tmp}/t.png"],
                                     ["chat", "--model", "{model}", "--max-new-tokens", "4", "Hi"]])
def test_an_answer_that_stdout_cannot_take_is_one_line(folder, tmp_path, command):
    """stdout on a full disk (`chat ... > out.txt`) ended chat, tiles, convert and demo-data with an OSError
    traceback after the work was done: one line, exit 1."""
    words = [w.format(image=folder.parent / "red.png", tmp=tmp_path, model=folder) for w in command]
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "internvl_mpo.cli", *words], stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1] == f"internvl-mpo {words[0]}: error: cannot write to stdout (No space left on " \
                                          "device)" and "Traceback" not in out.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("command", [["--help"], ["tiles", "--help"], ["tiles", "{image}", "--output", "{tmp}/t.png"]])
def test_a_buffered_stdout_that_cannot_take_the_output_is_one_line(folder, tmp_path, command):
    """Without PYTHONUNBUFFERED, stdout into a file is block-buffered: a short output was still in the buffer when
    the guard came off, and Python's flush at exit failed ("Exception ignored ... OSError: [Errno 28]", exit 120)."""
    words = [w.format(image=folder.parent / "red.png", tmp=tmp_path) for w in command]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-m", "internvl_mpo.cli", *words], stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=120, env=env)
    assert out.returncode == 1, out.stderr
    assert out.stderr.splitlines()[-1].endswith("error: cannot write to stdout (No space left on device)")
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", [["--help"], ["tiles", "{image}", "--output", "{tmp}/t.png"]])
def test_a_closed_stdout_is_written_nothing_as_print_writes_nothing(folder, tmp_path, command):
    """A stdout closed at the start (`internvl-mpo tiles ... >&-`, a daemon or cron job's) is None in Python, and
    print() writes nothing to it: the guard around stdout wrapped None, so the command's first line raised
    AttributeError ('NoneType' object has no attribute 'write') with a traceback and exit 1, after the work."""
    words = [w.format(image=folder.parent / "red.png", tmp=tmp_path) for w in command]
    line = " ".join(shlex.quote(w) for w in [sys.executable, "-m", "internvl_mpo.cli", *words])
    out = subprocess.run(["sh", "-c", f"exec {line} >&-"], stderr=subprocess.PIPE, text=True, timeout=120,
                         check=False)
    assert (out.returncode, out.stderr) == (0, "")
    if command[0] == "tiles":
        assert (tmp_path / "t.png").is_file()


def test_an_answers_file_generate_cannot_read_is_one_line(folder, tmp_path, monkeypatch, capsys):
    """An --output without read permission ended generate with a PermissionError traceback (the resume reads it)."""
    from internvl_mpo.cli import main

    requests, answers = tmp_path / "requests.jsonl", tmp_path / "answers.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    answers.write_text(json.dumps({"id": "a", "question": "Hi", "answer": "Hello"}) + "\n")
    refuse_reading(monkeypatch, answers)
    assert main(["generate", "--input", str(requests), "--output", str(answers), "--model", str(folder)]) == 1
    assert capsys.readouterr().err == (f"internvl-mpo generate: error: --output {answers}: cannot read it (Permission "
                                       "denied); a resume reads the answers written before\n")


def test_an_output_name_near_the_file_name_limit_is_one_line(folder, tmp_path, capsys):
    """An --output name a few bytes under the file-name limit (its lock fits, <output>.settings.json.tmp does not)
    ended generate with an OSError traceback: removing the .tmp that could not be made failed again."""
    from internvl_mpo.cli import main

    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "question": "Hi"}) + "\n")
    answers = tmp_path / ("a" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 12) + ".jsonl")
    assert main(["generate", "--input", str(requests), "--output", str(answers), "--model", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "saving failed" in err and "File name too long" in err and "Traceback" not in err
    assert "give a shorter one" in err and "make room" not in err  # room would not help
