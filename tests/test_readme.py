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


def test_cli_reference_is_the_same_on_any_machine(monkeypatch, tmp_path):
    # docs/cli.md is compared byte for byte wherever the tests run, so no --help text may show a
    # default taken from the machine: its core count, torch's threads, a GPU, the working folder,
    # the environment or the path separator.
    import ntpath
    import posixpath

    import cli_reference
    import torch
    native, texts = os.path, []
    for cores, cuda, cwd, path in ((1, False, tmp_path, posixpath), (96, True, ROOT, ntpath)):
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        monkeypatch.setattr(torch, "get_num_threads", lambda: cores)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.chdir(cwd)
        monkeypatch.setenv("HOME", str(cwd))
        monkeypatch.setenv("MINI_AUTOGUIDE_INCEPTION", str(cwd))
        monkeypatch.setattr(os, "path", path)   # how os.path.join would write a default on Windows
        monkeypatch.setattr(os, "sep", path.sep)
        try:
            texts.append(cli_reference.reference())
        finally:   # pytest itself needs the real os.path between the two
            monkeypatch.setattr(os, "path", native)
            monkeypatch.setattr(os, "sep", native.sep)
    assert texts[0] == texts[1]


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


def _documented_command(text, start):
    """The one backquoted command in `text` that begins with `start`, as an argument list."""
    import shlex
    found = [c for c in text.split("`") if c.startswith(start)]
    assert len(found) == 1, f"expected one command starting {start!r}, found {found}"
    return shlex.split(found[0])


def test_toy_tables_are_the_output_of_their_documented_commands():
    # the multi-seed table (README and docs/toy.md) and the guide study's table (docs/toy.md)
    # are exactly what their committed commands print from the committed results
    with open(os.path.join(ROOT, "docs", "toy.md")) as f:
        toy = f.read()
    for start in ("python docs/toy_tables.py --seeds ", "python experiments/toy_guides.py --out docs/results"):
        args = _documented_command(toy, start)
        r = subprocess.run([sys.executable] + args[1:], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        table = "\n".join(line for line in r.stdout.splitlines() if line.startswith("|"))
        assert table.count("\n") > 5 and table in toy, start
        if start.startswith("python docs/toy_tables.py"):
            assert table in readme()


def test_the_figures_seed_is_the_median_seed():
    import json
    import toy_tables
    with open(os.path.join(ROOT, "docs", "results", "toy_seeds.json")) as f:
        seed, _ = toy_tables.median_seed(json.load(f))
    with open(os.path.join(ROOT, "docs", "toy.md")) as f:
        assert f"from seed {seed}, the seed whose numbers are nearest the median" in f.read()
    assert os.path.exists(os.path.join(ROOT, "docs", "results", f"toy_seed{seed}.json"))


def test_every_linked_file_exists():
    """Each relative link and image in the README and docs/ names a file of the repository."""
    import glob
    import re
    missing = []
    for md in ["README.md"] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        path = os.path.join(ROOT, md)
        with open(path) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            if not os.path.exists(os.path.join(os.path.dirname(path), target.split("#")[0])):
                missing.append(f"{os.path.relpath(path, ROOT)}: {target}")
    assert not missing, missing
