"""The command line: python -m mini_autoguide <command> ...

The top layer: it may import everything (the toy, plotting). Each command
family (cli_toy, cli_image, cli_eval, cli_ema) registers its subcommands; bad input ends with one line on stderr and
exit code 2, never a traceback.
"""
import sys

from . import cli_ema, cli_eval, cli_image, cli_toy
from .checkpoint import CheckpointError
from .cli_args import Parser, UsageError


def build_parser():
    parser = Parser(
        prog="python -m mini_autoguide",
        description="Autoguidance (Karras et al. 2024) from a 2D toy with exact scores to image U-Nets.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for family in (cli_toy, cli_image, cli_eval, cli_ema):
        family.register(sub)
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
