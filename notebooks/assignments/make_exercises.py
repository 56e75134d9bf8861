"""Write the exercise notebooks from the solution notebooks.

The solutions (notebooks/assignments/solutions/*.ipynb) are the one source:
each filled-in piece sits between `### BEGIN SOLUTION` and `### END SOLUTION`
lines. An exercise notebook is the same notebook with every such block
replaced by `raise NotImplementedError` (same indentation) and without
outputs. Run after editing a solution:

    python notebooks/assignments/make_exercises.py          # rewrite
    python notebooks/assignments/make_exercises.py --check  # exit 1 if out of date
"""
import glob
import os
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


def main(argv):
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
