"""A user's audit of the Python API and the chat command, run on the shipped demo model."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import internvl_mpo
from internvl_mpo import cli_chat

DEMO = str(Path(internvl_mpo.__file__).parent / "demo_model")


class Terminal(io.StringIO):
    """Typed lines at a terminal; `interrupt` makes the next read a Ctrl-C."""

    interrupt = False

    def isatty(self):
        return True

    def readline(self, *args):
        if self.interrupt:
            raise KeyboardInterrupt
        return super().readline(*args)


@pytest.mark.parametrize("interrupt", [False, True], ids=["ctrl-d", "ctrl-c"])
def test_quitting_at_the_prompt_ends_the_prompts_line(monkeypatch, capsys, interrupt):
    """Ctrl-D (or Ctrl-C) at the `> ` prompt quit without a newline, so the shell's prompt followed `> `."""
    terminal = Terminal("")
    terminal.interrupt = interrupt
    monkeypatch.setattr("sys.stdin", terminal)
    if interrupt:
        with pytest.raises(KeyboardInterrupt):  # the command line makes it exit 130
            cli_chat.chat(model=DEMO, device="cpu")
    else:
        assert cli_chat.chat(model=DEMO, device="cpu") == 0
    assert capsys.readouterr().out == "> \n"


@pytest.mark.parametrize("ids, words", [
    ([[-1]], r"input_ids hold -1, outside the vocabulary 0\.\.663"),
    ([[5, 664]], r"input_ids hold 664, outside the vocabulary 0\.\.663"),
    ("int16", r"\(B, T\) tensor of token ids, got a torch.int16 tensor of shape \(1, 2\); it takes int64 or int32"),
    ("bool", r"\(B, T\) tensor of token ids, got a torch.bool tensor of shape \(1, 1\); it takes int64 or int32"),
    ("empty", r"\(B, T\) tensor of token ids, got a torch.int64 tensor of shape \(1, 0\); it takes .*at least one"),
])
def test_the_bare_model_refuses_ids_it_cannot_look_up_by_name(ids, words):
    """Ids outside the vocabulary (an IndexError deep inside torch; on CUDA a device-side assert), an int16 or
    bool tensor (the embedding takes int64 and int32 only) and no tokens failed inside torch."""
    import torch

    from internvl_mpo import InternVL
    from internvl_mpo.errors import InputError

    model = InternVL.from_pretrained(DEMO)
    special = {"int16": torch.tensor([[1, 2]], dtype=torch.int16), "bool": torch.tensor([[True]]),
               "empty": torch.zeros(1, 0, dtype=torch.long)}
    with pytest.raises(InputError, match=words):
        model(special[ids] if isinstance(ids, str) else torch.tensor(ids))
    assert model(torch.tensor([[0, 663]], dtype=torch.int32)).shape == (1, 2, 664)


def test_ctrl_c_during_a_one_question_answer_ends_its_line(monkeypatch, capsys):
    """`chat "question"` stopped by Ctrl-C mid-answer exited (130) after the partial answer without a newline,
    so the shell's prompt followed it on the same line."""
    from internvl_mpo.pipeline import InternVLChat

    stream = InternVLChat.stream_prepared

    def interrupted(bot, prepared, params):
        for i, piece in enumerate(stream(bot, prepared, params)):
            if i == 2:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(InternVLChat, "stream_prepared", interrupted)
    with pytest.raises(KeyboardInterrupt):  # the command line makes it exit 130
        cli_chat.chat("How many shapes?", model=DEMO, device="cpu")
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1 and len(out) > 1



def test_pillows_warnings_show_once_not_at_every_image(tmp_path, monkeypatch):
    """A palette PNG with a transparency table (web graphics) printed Pillow's two-line "Palette images with
    Transparency expressed in bytes should be converted to RGBA images" at every load (each chat turn): the
    catch_warnings of each open reset the registry that shows a warning once. Its pixels stay the official
    convert('RGB')'s; a warning Pillow gives while opening a file that opens shows once."""
    import warnings

    import numpy as np
    import torch
    from PIL import Image

    from internvl_mpo.processor import load_image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 16, (50, 70)).astype(np.uint8), "P")
    image.putpalette(rng.integers(0, 256, 48).astype(np.uint8).tobytes())
    path, official = tmp_path / "logo.png", tmp_path / "official.png"
    image.save(path, transparency=bytes(range(0, 160, 10)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Image.open(path).convert("RGB").save(official)  # the official conversion, kept losslessly
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        tiles = [load_image(path, max_num=2) for _ in range(3)]
    assert not shown, [str(w.message) for w in shown]
    assert all(torch.equal(t, load_image(official, max_num=2)) for t in tiles)

    pillow_open = Image.open

    def warning_open(fp, *args, **kwargs):
        warnings.warn("Possibly corrupt EXIF data", UserWarning)
        return pillow_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", warning_open)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("default")
        for _ in range(3):
            load_image(path)
    assert [str(w.message) for w in shown] == ["Possibly corrupt EXIF data"]
