"""`lorasb --help` and each command's help: usage lines, grouped options, examples kept line by line."""

import pytest

from lorasb_ds.cli import main

COMMANDS = ("train", "eval", "export", "merge", "plan", "fetch")


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command_and_keeps_the_examples_on_their_lines(capsys):
    text = help_of(capsys)
    assert text.startswith("usage: lorasb [-h] COMMAND ...")
    for command in COMMANDS:
        assert f"\n    {command} " in text, command
        assert any(line.startswith(f"  lorasb {command} ") for line in text.splitlines()), command
    assert "``" not in text


@pytest.mark.parametrize("command,groups", [
    ("train", ["where and how the run starts:"]),
    ("eval", ["what to evaluate:", "generation:", "device and processes:"]),
    ("plan", ["the run:", "memory settings:", "the machine:"]),
])
def test_command_help_groups_its_options_and_wraps_its_description(capsys, command, groups):
    text = help_of(capsys, command)
    assert text.startswith(f"usage: lorasb {command} ")
    for group in groups:
        assert f"\n{group}\n" in text, group
    description = text.split("\n\n")[1]
    assert all(len(line) <= 100 for line in description.splitlines())
