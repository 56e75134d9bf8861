"""Image files: a grid of samples, PNGs, a sampling run's outputs, and a side-by-side
comparison. Every file is written atomically (checkpoint.atomic_write).

Images are uint8 [N, H, W, C] arrays, C = 1 or 3, as generate.generate returns them.
"""
import os

import numpy as np
from PIL import Image, ImageDraw

from .checkpoint import atomic_write, refuse_existing, write_json, write_npz


def make_grid(images, columns):
    """uint8 [N, H, W, C] -> one uint8 [rows * H, columns * W, C] image (row-major, black padding)."""
    n, h, w, c = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * h, columns * w, c), dtype=np.uint8)
    for i, im in enumerate(images):
        r, k = divmod(i, columns)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = im
    return grid


def save_png(path, image):
    """uint8 [H, W, C] with C = 1 or 3 -> PNG, written atomically."""
    picture = Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def save_outputs(out, images, labels, seeds, info, columns=None, force=False):
    """Write out/SEED.png per sample, out/grid.png, out/samples.npz and out/info.json."""
    files = [os.path.join(out, f"{s:06d}.png") for s in seeds] + [os.path.join(out, n) for n in
                                                                    ("grid.png", "samples.npz", "info.json")]
    for f in files:
        refuse_existing(f, force)
    os.makedirs(out, exist_ok=True)
    for s, im in zip(seeds, images):
        save_png(os.path.join(out, f"{s:06d}.png"), im)
    save_png(os.path.join(out, "grid.png"), make_grid(images, columns or int(np.ceil(np.sqrt(len(images))))))
    write_npz(os.path.join(out, "samples.npz"), images=images, seeds=np.asarray(seeds),
              labels=np.asarray([] if labels is None else labels))
    write_json(os.path.join(out, "info.json"), info)


def side_by_side(paths, titles, out, scale=2, columns=None):
    """Images in rows of `columns` (default: all in one row), upscaled by `scale` (nearest), each with its
    title above; every cell is as large as the largest image. Writes out (PNG)."""
    ims = []
    for p in paths:
        try:
            im = Image.open(p).convert("RGB")
        except Exception as e:
            raise ValueError(f"{p} is not a readable image: {e}") from None
        ims.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    columns = len(ims) if columns is None else columns
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    rows = -(-len(ims) // columns)
    gap, head = 8, 20 if titles else 0
    cell_w, cell_h = max(i.width for i in ims), max(i.height for i in ims) + head
    canvas = Image.new("RGB", (min(columns, len(ims)) * (cell_w + gap) - gap, rows * (cell_h + gap) - gap), "white")
    draw = ImageDraw.Draw(canvas)
    for k, im in enumerate(ims):
        x, y = (k % columns) * (cell_w + gap), (k // columns) * (cell_h + gap)
        canvas.paste(im, (x, y + head))
        if titles:
            draw.text((x + 4, y + 4), titles[k], fill="black")
    atomic_write(out, lambda tmp: canvas.save(tmp, format="PNG"))
