"""Generate the README's CLI reference from the parsers' own --help texts.

    python docs/cli_reference.py           # print it
    python docs/cli_reference.py --write   # replace the block in README.md

tests/test_readme.py checks that the README holds exactly this text.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
BEGIN, END = "<!-- cli-reference:begin -->", "<!-- cli-reference:end -->"


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def reference():
    from mini_autoguide.cli import build_parser
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: fix it
    parser = build_parser()
    blocks = [parser.format_help()]
    for name, sub in _subparsers(parser).items():
        blocks.append(sub.format_help())
        for child in _subparsers(sub).values():
            blocks.append(child.format_help())
    body = "\n".join(f"```text\n{b.rstrip()}\n```\n" for b in blocks)
    return f"{BEGIN}\n{body}{END}"


def main():
    text = reference()
    if "--write" not in sys.argv:
        print(text)
        return
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        readme = f.read()
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    with open(path, "w") as f:
        f.write(readme[:start] + text + readme[end:])


if __name__ == "__main__":
    main()
