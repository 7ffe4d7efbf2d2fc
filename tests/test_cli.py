"""The `bnlab` command line: --version, and a help text with its default for every option."""

import argparse

import pytest

import bnlab
from bnlab.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"bnlab {bnlab.__version__}"


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no subcommands")


def test_every_option_of_every_command_has_a_help_text_with_its_default():
    commands = _subparsers(build_parser())
    assert {"audit", "report", "bench"} <= set(commands)
    missing = []
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            text = action.help or ""
            if "default" not in text:
                missing.append(f"bnlab {name} {'/'.join(action.option_strings)}: {text!r}")
            elif "%(default)s" in text:  # the default it shows is the parser's, not a copy that can drift
                assert action.default is not None, (name, action.option_strings)
    assert not missing, "options without a help text naming their default:\n" + "\n".join(missing)


def test_help_renders_for_every_command(capsys):
    for name in _subparsers(build_parser()):
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "(default:" in capsys.readouterr().out
