"""The command line: python -m mini_autoguide <command> ...

The top layer: it may import everything (the toy, plotting). Each command
family registers its subcommands; bad input ends with one line on stderr and
exit code 2, never a traceback.
"""
import argparse
import sys

from .checkpoint import CheckpointError


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr like every other error of the CLI
    (argparse prints the whole usage block first); --help stays complete. Subcommand parsers
    inherit the class (add_subparsers uses the parent's)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows an option's default where it says something: not for options without one
    (None), not for on/off flags (False), and not where the help text already states it."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _families():
    # each: (name, module path) with register(subparsers) inside
    return [("toy", "mini_autoguide.cli_toy"), ("image", "mini_autoguide.cli_image"),
            ("eval", "mini_autoguide.cli_eval"), ("ema", "mini_autoguide.cli_ema")]


def build_parser():
    parser = Parser(
        prog="python -m mini_autoguide",
        description="Autoguidance (Karras et al. 2024) from a 2D toy with exact scores to image U-Nets.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    import importlib
    for _, module in _families():
        importlib.import_module(module).register(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (UsageError, CheckpointError, ValueError, FileExistsError, FileNotFoundError) as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
