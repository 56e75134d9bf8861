"""The docs stay true: the CLI reference (docs/cli.md) is the parsers' own --help, and
the README's test command is what CI runs."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "docs"))


def readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_cli_reference_matches_help():
    import cli_reference
    with open(cli_reference.PATH) as f:
        assert f.read() == cli_reference.reference(), "run: python docs/cli_reference.py --write"


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = [line for line in f.read().splitlines() if line.endswith("python -m pytest")]
    assert len(ci) == 1 and ci[0] in readme()


def test_import_has_no_plotting_or_notebook_dependency():
    code = ("import sys, mini_autoguide, mini_autoguide.cli; "
            "bad = [m for m in ('matplotlib', 'toy2d', 'jupyter', 'IPython', 'notebook') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
