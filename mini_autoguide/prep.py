"""Dataset preparation: an ImageNet-style class-folder tree -> square PNGs + labels.json.

The crop is ADM's ("dhariwal"; Dhariwal & Nichol 2021, arXiv 2105.05233, as
used by EDM2): halve with a box filter while the short side is at least twice
the target, resize the short side to the target with bicubic filtering, then
cut out the centre. Output is a folder
(resumable: finished images are skipped) or a ZIP (built from a resumable
staging folder next to it), with labels.json = {"classes", "labels": [[file, label]]}.
"""
import json
import multiprocessing
import os
import shutil
import zipfile

import numpy as np
from PIL import Image

from .checkpoint import atomic_write, refuse_existing, write_json
from .data import IMAGE_EXTS, LABELS_FILE, DataError
from .progress import progress_bar


def center_crop_dhariwal(image, resolution):
    """PIL image -> uint8 [resolution, resolution, C] (C = 3, or 1 for greyscale)."""
    image = image.convert("L" if image.mode in ("L", "1", "I", "I;16") else "RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    arr = arr[top:top + resolution, left:left + resolution]
    return arr[:, :, None] if arr.ndim == 2 else arr


def list_tree(src):
    """(classes, [(relative source path, label)]) of SRC/<class>/**/<image>, sorted."""
    if not os.path.isdir(src):
        raise DataError(f"source folder not found: {src}")
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise DataError(f"{src} has no class subfolders (expected SRC/<class>/<image>)")
    items = []
    for label, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(src, c))):
            items += [(os.path.relpath(os.path.join(dirpath, n), src), label)
                      for n in sorted(names) if n.lower().endswith(IMAGE_EXTS)]
    if not items:
        raise DataError(f"{src} holds no images ({', '.join(IMAGE_EXTS)})")
    return classes, items


def _convert(job):
    """Worker: crop one image into its PNG (written atomically). Returns an error line or None."""
    src_path, dst_path, resolution = job
    if os.path.exists(dst_path):
        return None  # done in an earlier, interrupted run
    try:
        with Image.open(src_path) as im:
            arr = center_crop_dhariwal(im, resolution)
    except Exception as e:
        return f"{src_path} is not a readable image: {e}"
    out = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    atomic_write(dst_path, lambda tmp: out.save(tmp, format="PNG"))
    return None


def prepare(src, out, resolution=64, workers=None, force=False, progress=True):
    """Crop every image of the tree `src` into folder `out` or ZIP `out` (*.zip). Returns the image count."""
    to_zip = out.lower().endswith(".zip")
    if to_zip:
        refuse_existing(out, force)
    if not to_zip and os.path.exists(os.path.join(out, LABELS_FILE)) and not force:
        raise FileExistsError(f"{out} is a finished dataset: pass --force to overwrite")
    classes, items = list_tree(src)
    stage = out[:-4] + ".partial" if to_zip else out
    if force and os.path.isdir(stage):
        shutil.rmtree(stage)
    files = [os.path.splitext(rel)[0] + ".png" for rel, _ in items]
    jobs = [(os.path.join(src, rel), os.path.join(stage, f), resolution) for (rel, _), f in zip(items, files)]

    bar = progress_bar(len(jobs), "prep", "img", enabled=progress, leave=True)
    workers = max(1, workers or os.cpu_count() or 1)
    try:  # the bar closed first, so that an error's one line is not mixed into it
        with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else _Serial() as pool:
            for error in pool.imap_unordered(_convert, jobs, chunksize=64):
                if error:
                    raise DataError(error)
                bar.update(1)
    finally:
        bar.close()

    labels = dict(classes=classes, resolution=resolution, labels=[[f, lb] for f, (_, lb) in zip(files, items)])
    if not to_zip:
        write_json(os.path.join(out, LABELS_FILE), labels)
        return len(files)

    def write(tmp):
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:  # PNGs are compressed already
            for f in files:
                z.write(os.path.join(stage, f), f)
            z.writestr(LABELS_FILE, json.dumps(labels))
    atomic_write(out, write)
    shutil.rmtree(stage)
    return len(files)


class _Serial:
    """Stands in for a Pool when workers == 1 (no processes, easier debugging)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def imap_unordered(self, fn, jobs, chunksize=1):
        return map(fn, jobs)
