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
