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
