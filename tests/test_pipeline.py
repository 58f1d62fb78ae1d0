"""InternVLChat's input checks that are not the model's or the engine's."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from internvl_mpo.errors import InputError
from internvl_mpo.pipeline import InternVLChat
from internvl_mpo.processor.multi import load_images

from conftest import tiny_chat_folder


def test_a_generator_or_set_of_images_gets_the_processors_message(tmp_path):
    """InternVLChat took a generator for one image ("cannot read a generator as an image"), where
    load_images says the images must be a list: one message now, from the processor."""
    folder, _ = tiny_chat_folder(tmp_path / "model")
    bot = InternVLChat.from_pretrained(folder)
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30), "red").save(path)
    for images in (lambda: (p for p in [path]), lambda: {path}, lambda: iter([path])):
        with pytest.raises(InputError) as processor:
            load_images(images())
        assert str(processor.value).startswith("images must be a list of images, got a ")
        with pytest.raises(InputError) as pipeline:
            bot.load_images(images())
        assert str(pipeline.value) == str(processor.value)
        with pytest.raises(InputError, match="^images must be a list of images"):
            bot.chat("What colour?", images=images(), max_new_tokens=2)
    with path.open("rb") as file:  # a file object (an iterator of lines too) is still one image
        assert bot.load_images(file)[1] == bot.load_images([path])[1]
    assert bot.load_images(io.BytesIO(path.read_bytes()))[1] == bot.load_images(path)[1]


@pytest.fixture(scope="module")
def short_folder(tmp_path_factory):
    """The tiny model (4 image tokens a tile) with a context of 100 positions, and a 40x1 strip beside it."""
    import json

    root = tmp_path_factory.mktemp("short")
    folder, _ = tiny_chat_folder(root / "model")
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["max_position_embeddings"] = 100
    (folder / "config.json").write_text(json.dumps(config))
    Image.new("RGB", (40, 1)).save(root / "strip.png")
    return folder


def test_images_too_large_for_the_context_get_a_hint_true_to_their_tiles(short_folder):
    """The hint said "a smaller max_num or total_max_num gives fewer" whatever the call: total_max_num where
    the call gave none, and max_num where every image had 1 tile already, the fewest an image takes."""
    from internvl_mpo.errors import PromptTooLongError

    bot = InternVLChat.from_pretrained(short_folder)
    strip = short_folder.parent / "strip.png"
    with pytest.raises(PromptTooLongError, match=r"\(\[41\] by image; a smaller max_num gives fewer\)$"):
        bot.prepare("What is it?", [strip], max_num=40)
    with pytest.raises(PromptTooLongError, match=r"\(\[21, 21\] by image; a smaller max_num or total_max_num gives "
                                                 r"fewer\)$"):
        bot.prepare("What is it?", [strip, strip], max_num=40, total_max_num=40)
    with pytest.raises(PromptTooLongError, match=r"\(\[21, 21\] by image; a smaller max_num gives fewer\)$"):
        bot.prepare("What is it?", [strip, strip], max_num=20, total_max_num=64)  # the total caps nothing
    with pytest.raises(PromptTooLongError) as one_each:
        bot.prepare("What are they?", [strip] * 20, max_num=1)
    assert str(one_each.value).endswith("; the images take 20 tiles ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, ...] by image; "
                                        "1 tile each, the fewest an image takes: fewer images fit)")


def test_a_text_too_long_alone_is_told_so_not_to_take_fewer_images(short_folder):
    """A question whose text alone (its images left out) is over the context was told "1 tile each, the fewest
    an image takes: fewer images fit", where no image setting helps."""
    from internvl_mpo.errors import PromptTooLongError

    bot = InternVLChat.from_pretrained(short_folder)
    with pytest.raises(PromptTooLongError, match=r"longer than the context allows: at most 99; without its images it "
                                                 r"is \d+ tokens$"):
        bot.prepare("word " * 200, [short_folder.parent / "strip.png"], max_num=1)


def test_the_command_line_names_the_flag_that_gives_fewer_tiles(short_folder, capsys):
    """`internvl-mpo chat --image` named max_num and total_max_num, where the flag is --max-num and there is
    no total flag."""
    from internvl_mpo.cli import main

    strip = str(short_folder.parent / "strip.png")
    assert main(["chat", "What is it?", "--model", str(short_folder), "--image", strip, "--max-num", "40",
                 "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("internvl-mpo chat: error: prompt is ")
    assert err.endswith("; the images take 41 tiles ([41] by image; a smaller --max-num gives fewer)\n")


def test_batch_chat_names_the_question_it_cannot_ask(short_folder):
    """batch_chat refused a batch with one question too long for the context with the prompt's numbers alone:
    which of the questions was not said. The error names its index, and keeps its type and settings."""
    from internvl_mpo.errors import PromptTooLongError

    bot = InternVLChat.from_pretrained(short_folder)
    strip = short_folder.parent / "strip.png"
    with pytest.raises(PromptTooLongError, match=r"^questions\[1\]: prompt is \d+ tokens .*a smaller max_num gives") as e:
        bot.batch_chat(["Hi", "What is it?"], [None, strip], max_num=40, max_new_tokens=1)
    assert e.value.named({"max_num": "--max-num"}).args[0].endswith("a smaller --max-num gives fewer)")
    with pytest.raises(InputError, match=r"^questions\[2\]: .*nothing\.png"):
        bot.batch_chat(["Hi", "Ho", "What is it?"], [None, None, short_folder / "nothing.png"], max_new_tokens=1)


def test_a_lone_surrogate_is_named_where_the_caller_wrote_it(tmp_path):
    """A broken \\ud83d escape was reported at its place in the rendered prompt (character 108 for a question's
    fourth character): the message names the argument and the place in it."""
    folder, _ = tiny_chat_folder(tmp_path / "model")
    bot = InternVLChat.from_pretrained(folder)
    cases = [
        ({"question": "hi \ud83d"}, r"^the question holds a lone surrogate '\\ud83d' at character 3,"),
        ({"question": "hi", "system_message": "\ud800 be brief"}, r"^the system message holds .* at character 0,"),
        ({"question": "hi", "history": [("q", "ok"), ("a\udfffb", "x")]}, r"^history\[1\]\[0\] holds .* character 1,"),
        ({"question": "hi", "history": [("q", "ans \ud83d")]}, r"^history\[0\]\[1\] holds .* at character 4,"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            bot.chat(**kwargs, max_new_tokens=2)


def add_token_past_the_vocabulary(folder) -> str:
    """Give `folder`'s tokenizer one added token more than its config's vocab_size holds; returns its text."""
    import json

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    decoder = config["added_tokens_decoder"]
    last = str(max(map(int, decoder)) + 1)
    decoder[last] = {**decoder[str(int(last) - 1)], "content": "<extra_token>", "special": False}
    config_path.write_text(json.dumps(config))
    added = json.loads((folder / "added_tokens.json").read_text())
    (folder / "added_tokens.json").write_text(json.dumps({**added, "<extra_token>": int(last)}))
    return last


def test_tokenizer_files_past_the_models_vocabulary_are_refused_before_the_weights(tmp_path, monkeypatch):
    """A tokenizer with more tokens than the model's embeddings (another model's files) was refused after the
    weights were read, with an InputError naming neither the folder nor the token."""
    from internvl_mpo.errors import CheckpointError
    from internvl_mpo.model import InternVL

    folder, _ = tiny_chat_folder(tmp_path / "model")
    last = add_token_past_the_vocabulary(folder)
    monkeypatch.setattr(InternVL, "from_pretrained", lambda *a, **k: pytest.fail("the weights were read"))
    with pytest.raises(CheckpointError, match=rf"^{folder}: the tokenizer files hold {int(last) + 1} tokens \(the "
                                              rf"last, '<extra_token>', is id {last}\), past the model's vocabulary "
                                              rf"\(llm_config.vocab_size {last}\): they are another model's"):
        InternVLChat.from_pretrained(folder)


@pytest.mark.parametrize("cast", ["language_model", "vision", "vision_model_alone"])
def test_chat_runs_a_model_whose_towers_were_cast_to_different_dtypes(tmp_path, cast):
    """A model with its LLM in bf16 and its ViT and projector in fp32 (or the reverse), as save_pretrained
    records it: the engine's KV cache and attention mask took the projector's dtype (`model.dtype`), and the
    first prompt stopped in the cache's scatter with "Expected self.dtype to be equal to src.dtype". A ViT in
    fp32 before a bf16 projector stopped in the projector's LayerNorm ("mixed dtype (CPU)")."""
    import torch

    folder, _ = tiny_chat_folder(tmp_path / "model")
    path = tmp_path / "a.png"
    Image.new("RGB", (40, 30), "red").save(path)
    bot = InternVLChat.from_pretrained(folder, dtype=torch.float32)
    if cast == "language_model":
        bot.model.language_model.to(torch.bfloat16)
    elif cast == "vision_model_alone":  # a bf16 model with its ViT kept in fp32: the projector's LayerNorm refused it
        bot.model.to(torch.bfloat16)
        bot.model.vision_model.float()
    else:
        bot.model.vision_model.to(torch.bfloat16)
        bot.model.mlp1.to(torch.bfloat16)
    answers = bot.batch_chat(["What colour?", "Hi"], [path, None], max_new_tokens=4, do_sample=False)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert bot.chat("What colour?", [path], max_new_tokens=4, do_sample=False) == answers[0]
