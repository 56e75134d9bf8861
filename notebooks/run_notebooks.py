"""Run notebooks top to bottom, headless, print each one's wall time, and keep their outputs.

The tutorials are committed with the outputs of a full-mode run, so that a reader browsing the
repository sees every figure. Their figures are stored as 256-colour PNGs, which keeps a notebook
under 500 kB. docs/course.md lists the times this prints.

    python notebooks/run_notebooks.py notebooks/0*.ipynb                      # full mode, saved in place
    python notebooks/run_notebooks.py --fast --no-save notebooks/0*.ipynb     # fast mode, times only
"""
import argparse
import base64
import io
import os
import sys
import time

import nbformat
from nbclient import NotebookClient
from PIL import Image


def shrink_png(data):
    """A base64 PNG as a base64 256-colour PNG (plots use few colours; the difference is invisible)."""
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB").quantize(256)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return base64.b64encode(out.getvalue()).decode()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="+", help=".ipynb files")
    p.add_argument("--fast", action="store_true", help="fast mode (MINI_AUTOGUIDE_FAST=1)")
    p.add_argument("--no-save", action="store_true", help="leave the notebooks as they are; only time them")
    p.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run")
    args = p.parse_args()
    os.environ["MINI_AUTOGUIDE_FAST"] = "1" if args.fast else "0"
    for path in args.notebooks:
        if not path.endswith(".ipynb") or not os.path.isfile(path):
            sys.exit(f"error: not a notebook: {path}")
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        start = time.time()
        NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                       resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}}).execute()
        print(f"{path}: {time.time() - start:.0f} s ({'fast' if args.fast else 'full'} mode)", flush=True)
        if not args.no_save:
            for cell in nb.cells:
                for output in cell.get("outputs", []):
                    if "image/png" in output.get("data", {}):
                        output["data"]["image/png"] = shrink_png(output["data"]["image/png"])
            tmp = path + ".tmp"
            nbformat.write(nb, tmp)
            os.replace(tmp, path)  # atomic: a failed run leaves the notebook as it was


if __name__ == "__main__":
    main()
