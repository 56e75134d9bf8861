"""What every command of the CLI shares: one-line errors, --help that shows defaults, and the
options that the toy and the images spell alike (--guide, --method, --weight, --interval)."""
import argparse

from .guidance import METHODS


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


def add_guidance_options(p, domain, guide_help, method="autoguidance"):
    """--guide, --method, --weight and --interval; domain "toy" or "image" picks the default w."""
    defaults = ", ".join(f"{m} {getattr(v, domain + '_weight'):g}" for m, v in METHODS.items() if m != "none")
    why = ("the paper's toy figure, arXiv 2406.02507 Fig. 1" if domain == "toy" else
           "inside the 1.15-2.2 that the paper's ImageNet models use")
    p.add_argument("--guide", help=guide_help)
    p.add_argument("--method", default=method, choices=list(METHODS), help=f"guidance method (default {method})")
    p.add_argument("--weight", type=float, help=f"guidance weight w (1 = the main model alone), or truncation's "
                   f"factor on the score (default by method: {defaults}; {why})")
    p.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only for LO <= sigma <= HI (default: always)")


def guidance_weight(args, domain):
    """--weight, or the method's default w for the domain."""
    return args.weight if args.weight is not None else getattr(METHODS[args.method], domain + "_weight")


def add_common(p, out_help=None, force_help="overwrite existing outputs", device=True, seed_help=None):
    """--out (where out_help is given), --seed (where seed_help is), --device, --force and --quiet:
    spelled alike in every command."""
    if seed_help:
        p.add_argument("--seed", type=int, default=0, help=seed_help)
    if out_help:
        p.add_argument("--out", required=True, help=out_help)
    if device:
        p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--force", action="store_true", help=force_help)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def command(cmds, name, run, help, description=None):
    """A subcommand `name` that runs run(args); its --help shows the defaults."""
    p = cmds.add_parser(name, formatter_class=DefaultsHelp, help=help, description=description or help)
    p.set_defaults(run=run)
    return p


def family(sub, name, help):
    """A command with subcommands of its own (toy, eval): returns what command() adds them to."""
    parser = sub.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND", required=True)
