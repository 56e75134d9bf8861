"""The command line as a whole: a bad command line is one line on stderr and exit code 2, like
every other error; every parser's --help is complete."""
import argparse
import os
import subprocess
import sys

import pytest

from mini_autoguide import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parsers(parser, path=()):
    """(argv prefix, parser) for the top parser and every subcommand, recursively."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


PARSERS = list(_parsers(cli.build_parser()))


@pytest.mark.parametrize("argv,message", [
    ([], "the following arguments are required: COMMAND"),
    (["magic"], "invalid choice: 'magic'"),
    (["train", "data", "--out", "o", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["train", "data"], "the following arguments are required: --out"),
    (["sample", "m.safetensors", "--out", "o", "--steps", "many"], "argument --steps: invalid int value"),
    (["toy", "sample", "--main", "m", "--out", "o", "--bogus"], "unrecognized arguments: --bogus"),
    (["eval", "samples"], "the following arguments are required"),
])
def test_bad_command_line_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.startswith("error: python -m mini_autoguide") and err.count("\n") == 1, err
    assert message in err and "usage:" not in err


def test_a_real_process_prints_one_line_and_no_usage_block():
    r = subprocess.run([sys.executable, "-m", "mini_autoguide", "train", "--preset", "huge"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


@pytest.mark.parametrize("path,parser", PARSERS, ids=[" ".join(p) or "top" for p, _ in PARSERS])
def test_help_is_complete(path, parser, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*path, "--help"])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and err == "" and out.startswith("usage: ")
    assert "%%" not in out, path   # argparse %-formats option help, not descriptions: no doubled % there
    for action in parser._actions:   # every option and every subcommand is listed
        for flag in action.option_strings:
            assert flag in out, (path, flag)
        if isinstance(action, argparse._SubParsersAction):
            assert all(name in out for name in action.choices), path
