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
