"""Latency audit: work that users wait for is done once (the causes checked, no timings)."""

import ast

from internvl_mpo import cli


def test_help_parses_each_command_module_once(monkeypatch, capsys):
    # `internvl-mpo --help` reads each command's summary from its module's source; chat, generate and tiles share
    # cli_chat.py, train and plot train/cli.py: each file is parsed once, not once per command
    cli._module_tree.cache_clear()
    parsed = []
    real_parse = ast.parse
    monkeypatch.setattr(ast, "parse", lambda source, *a, **k: parsed.append(source) or real_parse(source, *a, **k))
    assert cli.main(["--help"]) == 0
    modules = {target.partition(":")[0] for target in cli.COMMANDS.values()}
    assert len(parsed) == len(modules) < len(cli.COMMANDS)
    assert "generate" in capsys.readouterr().out
