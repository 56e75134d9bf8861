"""Run every tutorial notebook in fast mode and save its last figure, small,
as docs/img/notebook_NN.png (the thumbnails of docs/notebooks.md).

    python notebooks/make_thumbnails.py [--width 320] [06 ...]   # all tutorials, or those numbered

Trained toy models are cached in notebooks/.cache (as when reading them).
"""
import argparse
import base64
import glob
import io
import os
import sys

import nbclient
import nbformat
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mini_autoguide.checkpoint import atomic_write  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "docs", "img")


def last_figure(nb):
    """The PNG bytes of the notebook's last image output."""
    pngs = [out["data"]["image/png"] for cell in nb.cells for out in cell.get("outputs", [])
            if "data" in out and "image/png" in out["data"]]
    if not pngs:
        raise RuntimeError("the notebook drew no figure")
    return base64.b64decode(pngs[-1])


def thumbnail(png, width):
    image = Image.open(io.BytesIO(png)).convert("RGB")
    height = round(image.height * width / image.width)
    out = io.BytesIO()
    image.resize((width, height), Image.LANCZOS).save(out, format="PNG", optimize=True)
    return out.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=320, help="thumbnail width in pixels (default 320)")
    parser.add_argument("numbers", nargs="*", help="only the tutorials with these numbers, e.g. 03 06 (default: all)")
    args = parser.parse_args()
    os.environ["MINI_AUTOGUIDE_FAST"] = "1"
    os.makedirs(OUT, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(HERE, "[0-9]*.ipynb"))):
        if args.numbers and os.path.basename(path)[:2] not in args.numbers:
            continue
        nb = nbformat.read(path, as_version=4)
        nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": HERE}}).execute()
        target = os.path.join(OUT, f"notebook_{os.path.basename(path)[:2]}.png")
        png = thumbnail(last_figure(nb), args.width)

        def write(tmp, png=png):
            with open(tmp, "wb") as f:
                f.write(png)
        atomic_write(target, write)
        print(f"wrote {os.path.relpath(target)}")


if __name__ == "__main__":
    main()
