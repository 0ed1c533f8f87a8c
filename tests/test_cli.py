"""The command line's help: every command says what it does and shows an example."""

from __future__ import annotations

import argparse

import pytest

from ferrolm.cli import build_parser, main


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    found = {"ferrolm": build_parser()}
    pending = [("ferrolm", found["ferrolm"])]
    while pending:
        name, parser = pending.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    found[f"{name} {command}"] = sub
                    pending.append((f"{name} {command}", sub))
    return found


def test_every_command_is_found() -> None:
    names = set(all_parsers())
    for command in ("demo", "shard", "pretrain", "finetune", "evaluate", "predict", "export", "generate"):
        assert f"ferrolm {command}" in names
    assert "ferrolm tokenizer train" in names
    assert "ferrolm shard merge" in names  # a subcommand of shard, not a parser of its own


@pytest.mark.parametrize("name", sorted(all_parsers()))
def test_help_describes_and_gives_an_example(name: str) -> None:
    parser = all_parsers()[name]
    text = parser.format_help()
    assert parser.description or name == "ferrolm", f"{name}: no description"
    assert "example" in text, f"{name} --help shows no example"
    assert "ferrolm " in text.split("example", 1)[1], f"{name}: the example is not a command line"


def test_no_command_prints_help(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
