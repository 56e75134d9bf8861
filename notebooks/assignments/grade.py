"""Grade assignment notebooks: run each one headless and print PASS or FAIL for each exercise.

    python notebooks/assignments/grade.py [PATHS...] [--csv FILE] [--json FILE] [--timeout S] [--force]

Run python notebooks/assignments/grade.py --help for what it does; docs/course.md for how to use it.
"""
import argparse
import csv
import glob
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))   # notebooks/assignments: checks.py, the exercises
ROOT = os.path.dirname(os.path.dirname(HERE))       # the repository: mini_autoguide and toy2d
RECORD_ENV = "MINI_AUTOGUIDE_CHECKS_RECORD"         # where checks.py appends each check's outcome
CHECK_CALL = re.compile(r"\bchecks\.check_(\w+)\s*\(")
FIELDS = ("path", "exercise", "result", "detail")

DESCRIPTION = """\
Grade assignment notebooks: run each one headless and print PASS or FAIL for each of its exercises.

PATHS are notebooks, or folders searched for notebooks (one submission or many, in subfolders);
by default the four exercise notebooks next to this script. An exercise is one checks.check_* call
in the notebook, or in the assignment of the same file name here, so a deleted check counts as FAIL.

Each notebook runs in fast mode (MINI_AUTOGUIDE_FAST=1) with its own folder as working directory,
and with the checks next to this script, whatever checks.py sits beside the notebook. It runs on
past a cell that raises. An exercise is PASS when its check printed PASS; FAIL when it printed a
HINT, or when it never ran: its cell, or an earlier cell it needs, raised (the reason gives the
error), or the run stopped (timeout, dead kernel). Exercises that do not need the failing cell are
still graded. The notebooks run as you, with your files: this grades honest work, it is no sandbox.

Exit status: 0 when every exercise of every notebook passes, 1 when any fails, 2 on bad input."""


class BadInput(Exception):
    """One line for stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BadInput(message)


def check_names(nb):
    """The exercises a notebook's code cells check, in order: ["sigma_steps", "heun_step", ...]."""
    names = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            names += [n for n in CHECK_CALL.findall(cell.source) if n not in names]
    return names


def find_notebooks(paths):
    """[(path, notebook)] of the PATHS, each read and holding at least one check. BadInput otherwise."""
    import nbformat
    found = []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(p for p in glob.glob(os.path.join(path, "**", "*.ipynb"), recursive=True)
                            if ".ipynb_checkpoints" not in p.split(os.sep))
            if not inside:
                raise BadInput(f"{path}: no notebook (*.ipynb) in this folder")
            found += [(p, True) for p in inside]
        elif os.path.isfile(path):
            found.append((path, False))
        else:
            raise BadInput(f"{path}: no such file or folder")
    notebooks, seen = [], set()
    for path, in_folder in found:
        if os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        try:
            nb = nbformat.read(path, as_version=4)
        except Exception as e:
            raise BadInput(f"{path}: not a notebook ({type(e).__name__})") from None
        if not check_names(nb):
            if in_folder:   # a scratch notebook beside a submission: say so, grade the rest
                print(f"skipping {path}: it calls no checks.check_*", file=sys.stderr)
                continue
            raise BadInput(f"{path}: not an assignment notebook (it calls no checks.check_*)")
        notebooks.append((path, nb))
    if not notebooks:
        raise BadInput("no assignment notebook among " + " ".join(paths))
    return notebooks


def expected(path, nb):
    """The notebook's exercises, and those of the assignment of the same name here (a deleted check fails)."""
    import nbformat
    names = check_names(nb)
    original = os.path.join(HERE, os.path.basename(path))
    if os.path.isfile(original) and os.path.realpath(original) != os.path.realpath(path):
        names = check_names(nbformat.read(original, as_version=4)) + names
    return list(dict.fromkeys(names))


def _error_note(index, cell):
    """'cell 7 (def run_seed(seed):) raised NameError: ...' for a cell with an error output, else None."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            first = (cell.source.strip().splitlines() or [""])[0][:40]
            return f"cell {index} ({first}) raised {out['ename']}: {out['evalue']}"
    return None


def grade(path, nb, timeout):
    """Run one notebook; return (rows, notes): a row per exercise, a note per cell that raised."""
    import nbclient
    import nbformat
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    fd, record = tempfile.mkstemp(prefix="grade-", suffix=".jsonl")
    os.close(fd)
    setup = nbformat.v4.new_code_cell(
        "import os, sys\n"
        f"sys.path[:0] = [{HERE!r}, {ROOT!r}]\n"
        f"os.environ.update(MINI_AUTOGUIDE_FAST='1', {RECORD_ENV}={record!r})\n"
        "import checks  # the grader's checks, whatever checks.py sits beside the notebook\n")
    run = nbformat.from_dict(nb)
    run.cells = [setup] + run.cells
    stopped = None
    try:
        nbclient.NotebookClient(run, timeout=timeout, kernel_name="python3", allow_errors=True,
                                resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}
                                ).execute(stderr=subprocess.DEVNULL)   # the kernel's own log; cells keep theirs
    except CellTimeoutError:
        stopped = f"the run stopped: a cell ran longer than --timeout {timeout:g} s"
    except DeadKernelError:
        stopped = "the run stopped: the kernel died"
    finally:
        with open(record) as f:
            records = [json.loads(line) for line in f if line.strip()]
        os.unlink(record)
    cells = run.cells[1:]
    errors = {i: note for i, cell in enumerate(cells, 1) if (note := _error_note(i, cell))}
    rows = []
    for name in expected(path, nb):
        mine = [r for r in records if r["exercise"] == name]
        if mine:
            passed, detail = all(r["passed"] for r in mine), mine[-1]["line"]
        else:
            at = next((i for i, c in enumerate(cells, 1) if c.cell_type == "code"
                       and name in CHECK_CALL.findall(c.source)), None)
            reasons = [errors[i] for i in sorted(errors) if at is None or i <= at] + ([stopped] if stopped else [])
            passed = False
            detail = ("its check never ran" if at is not None else "its check cell is missing") + (
                f": {reasons[0]}" if reasons else "")
        rows.append(dict(path=path, exercise=name, result="PASS" if passed else "FAIL", detail=detail))
    notes = [f"{path}: {note}" for _, note in sorted(errors.items())] + ([f"{path}: {stopped}"] if stopped else [])
    return rows, notes


def table(rows):
    """The rows as an aligned text table; details cut to one short line."""
    head = dict(path="notebook", exercise="exercise", result="result", detail="detail")
    width = {k: max(len(r[k]) for r in [head] + rows) for k in ("path", "exercise")}
    lines = []
    for r in [head] + rows:
        detail = r["detail"] if len(r["detail"]) <= 90 else r["detail"][:87] + "..."
        lines.append(f"{r['path']:<{width['path']}}  {r['exercise']:<{width['exercise']}}  {r['result']:<6}  {detail}")
    return "\n".join(lines)


def write_atomic(path, text):
    """Write text to path through a temporary file in the same folder, so a reader never sees half of it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".grade-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def csv_text(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def main(argv=None):
    parser = Parser(prog="grade.py", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="*", metavar="PATHS", help="notebooks or folders (default: the exercises here)")
    parser.add_argument("--csv", metavar="FILE", help="write one row per notebook and exercise: " + ", ".join(FIELDS))
    parser.add_argument("--json", metavar="FILE", help="write the same rows as a JSON list of objects")
    parser.add_argument("--timeout", type=float, default=600, metavar="S",
                        help="seconds one cell may run before the notebook is stopped (default 600)")
    parser.add_argument("--force", action="store_true", help="replace an existing --csv or --json file")
    try:
        args = parser.parse_args(argv)
        if not args.timeout > 0:
            raise BadInput(f"--timeout must be positive, got {args.timeout:g}")
        for out in (args.csv, args.json):
            if out is None:
                continue
            if os.path.isdir(out):
                raise BadInput(f"{out}: is a folder")
            if os.path.exists(out) and not args.force:
                raise BadInput(f"{out} exists: add --force to replace it")
            if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
                raise BadInput(f"{out}: its folder does not exist")
        try:
            import nbclient  # noqa: F401
            import nbformat  # noqa: F401
        except ImportError as e:
            raise BadInput(f"grading needs nbclient and nbformat: pip install nbclient nbformat ipykernel ({e})")
        default = [os.path.relpath(p) for p in sorted(glob.glob(os.path.join(HERE, "[0-9]*.ipynb")))]
        notebooks = find_notebooks(args.paths or default)
    except BadInput as e:
        print(f"grade.py: {e}", file=sys.stderr)
        return 2
    rows, notes = [], []
    for i, (path, nb) in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {path} ...", end="", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        got, raised = grade(path, nb, args.timeout)
        rows += got
        notes += raised
        passed = sum(r["result"] == "PASS" for r in got)
        print(f" {passed} of {len(got)} pass ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print(table(rows))
    passed = sum(r["result"] == "PASS" for r in rows)
    print(f"{passed} of {len(rows)} exercises pass, in {len(notebooks)} notebook(s)")
    for note in notes:
        print(f"note: {note}")
    if args.csv:
        write_atomic(args.csv, csv_text(rows))
    if args.json:
        write_atomic(args.json, json.dumps(rows, indent=1) + "\n")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
