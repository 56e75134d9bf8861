"""Write the exercise notebooks from the solution notebooks.

The solutions (notebooks/assignments/solutions/*.ipynb) are the one source:
each filled-in piece sits between `### BEGIN SOLUTION` and `### END SOLUTION`
lines. An exercise notebook is the same notebook with every such block
replaced by `raise NotImplementedError` (same indentation) and without
outputs. Run after editing a solution:

    python notebooks/assignments/make_exercises.py          # rewrite
    python notebooks/assignments/make_exercises.py --check  # exit 1 if out of date

A student copy is a folder with the exercise notebooks, checks.py and a short
README.md (how to install the package and run them), never the solutions:

    python notebooks/assignments/make_exercises.py --student-copy DIR [--force]

It refuses an existing DIR unless --force (which writes these files into it).
"""
import glob
import os
import shutil
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
PLACEHOLDER = 'raise NotImplementedError("your code here")'


def strip_solution(source):
    """The source with each BEGIN/END block replaced by the placeholder."""
    out, inside = [], False
    for line in source.splitlines():
        stripped = line.strip()
        if stripped == BEGIN:
            if inside:
                raise ValueError("nested BEGIN SOLUTION")
            inside = True
            out.append(line[:len(line) - len(line.lstrip())] + PLACEHOLDER)
        elif stripped == END:
            if not inside:
                raise ValueError("END SOLUTION without BEGIN")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError("BEGIN SOLUTION without END")
    return "\n".join(out)


def exercise(solution_path):
    """The exercise notebook (an nbformat node) made from one solution notebook."""
    nb = nbformat.read(solution_path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = strip_solution(cell.source)
            cell.outputs, cell.execution_count = [], None
    return nb


STUDENT_README = """# Assignments: mini_autoguide

Each notebook here is an assignment that checks itself: fill in each `raise NotImplementedError`,
run the cell after it, and read PASS or a HINT. checks.py holds the checks; keep it next to the notebooks.

They need the mini_autoguide package (which brings toy2d) and Jupyter:

    pip install <the course's copy of mini_autoguide>   # e.g. pip install ./mini_autoguide
    pip install jupyter
    jupyter notebook

Assignment 4 trains models: `MINI_AUTOGUIDE_FAST=1 jupyter notebook` runs it with small ones, in a
few minutes.
"""


def student_copy(folder, force):
    """Write the exercise notebooks, checks.py and README.md to folder. Returns the exit status."""
    if os.path.exists(folder) and not force:
        print(f"{folder} exists: choose another folder or add --force", file=sys.stderr)
        return 2
    os.makedirs(folder, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(HERE, "solutions", "*.ipynb"))):
        nbformat.write(exercise(path), os.path.join(folder, os.path.basename(path)))
    shutil.copyfile(os.path.join(HERE, "checks.py"), os.path.join(folder, "checks.py"))
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(STUDENT_README)
    print(f"wrote {folder}: " + ", ".join(sorted(os.listdir(folder))))
    return 0


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    if "--student-copy" in argv:
        i = argv.index("--student-copy")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            print("--student-copy needs a folder", file=sys.stderr)
            return 2
        return student_copy(argv[i + 1], "--force" in argv)
    check = "--check" in argv
    stale = []
    for path in sorted(glob.glob(os.path.join(HERE, "solutions", "*.ipynb"))):
        target = os.path.join(HERE, os.path.basename(path))
        text = nbformat.writes(exercise(path)) + "\n"
        current = open(target).read() if os.path.exists(target) else None
        if current != text:
            stale.append(target)
            if not check:
                with open(target, "w") as f:
                    f.write(text)
    for target in stale:
        print(("out of date: " if check else "wrote ") + os.path.relpath(target))
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
