"""Image datasets behind one interface: uint8 images [C, H, W] with integer labels.

open_dataset(path) recognises
  - Fashion-MNIST / MNIST IDX files (train-images-idx3-ubyte[.gz] + labels) in a
    folder, padded from 28x28 to 32x32 and held in memory;
  - a prepared folder or ZIP of PNGs with labels.json (written by prep.py);
  - a folder of images with one subfolder per class (or no subfolders: unlabelled).
Every dataset has .resolution, .channels, .num_classes, .labels [N] and
__getitem__(i) -> (uint8 array [C, H, W], label). batches() streams them.
"""
import gzip
import json
import os
import struct
import zipfile

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
LABELS_FILE = "labels.json"


class DataError(ValueError):
    """The dataset is missing, empty, unreadable or inconsistent."""


class ArrayDataset:
    """Images already in memory: images uint8 [N, C, H, W], labels int [N]."""

    def __init__(self, images, labels, num_classes, name="array"):
        if len(images) == 0:
            raise DataError(f"{name}: the dataset is empty")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.channels, self.resolution = images.shape[1], images.shape[2]
        self.num_classes, self.name = num_classes, name

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])

    def batch(self, indices):
        """Fast path for in-memory data: uint8 [B, C, H, W] tensor and labels [B]."""
        idx = np.asarray(indices)
        return torch.from_numpy(self.images[idx]), torch.from_numpy(self.labels[idx])


class FileDataset:
    """Image files in a folder or ZIP: files [N] relative paths, labels [N]."""

    def __init__(self, root, files, labels, num_classes, check_all=True):
        if not files:
            raise DataError(f"{root}: no images found (looked for {', '.join(IMAGE_EXTS)})")
        self.root, self.files, self.num_classes = root, list(files), num_classes
        self.labels = np.asarray(labels, dtype=np.int64)
        self.is_zip = os.path.isfile(root)
        self._zip = None  # opened lazily, once per worker process
        first = self._read(0)
        self.channels, self.resolution = first.shape[0], first.shape[1]
        if check_all:  # headers only: cheap, and a mixed-size set fails now, not mid-run
            for f in self.files:
                with self._open(f) as fh:
                    size = _pil_open(fh, self._where(f)).size
                if size != (self.resolution, self.resolution):
                    raise DataError(f"{self._where(f)} is {size[0]}x{size[1]}, but {self._where(self.files[0])} is "
                                    f"{self.resolution}x{self.resolution}: all images must have one square size")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return self._read(i), int(self.labels[i])

    def _where(self, f):
        return f"{self.root}:{f}" if self.is_zip else os.path.join(self.root, f)

    def _open(self, f):
        if not self.is_zip:
            return open(os.path.join(self.root, f), "rb")
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.root)
        return self._zip.open(f)

    def _read(self, i):
        f = self.files[i]
        with self._open(f) as fh:
            img = _pil_open(fh, self._where(f))
            try:
                arr = np.asarray(img.convert("L" if img.mode in ("L", "1", "I", "I;16") else "RGB"))
            except Exception as e:
                raise DataError(f"{self._where(f)} is not a readable image: {e}") from None
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        h, w = arr.shape[:2]
        if h != w or (hasattr(self, "resolution") and h != self.resolution):
            raise DataError(f"{self._where(f)} is {w}x{h}: all images must have one square size "
                            f"(use `prep` to crop and resize)")
        if hasattr(self, "channels") and arr.shape[2] != self.channels:
            raise DataError(f"{self._where(f)} has {arr.shape[2]} channels, the first image {self.channels}")
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def __getstate__(self):  # ZipFile handles do not cross process boundaries
        return {**self.__dict__, "_zip": None}


def _pil_open(fh, where):
    try:
        return Image.open(fh)  # reads the header only
    except Exception as e:
        raise DataError(f"{where} is not a readable image: {e}") from None


# --- IDX (MNIST-style) ---------------------------------------------------------------------------

def read_idx(path):
    """An IDX file (gzip or raw) as a uint8 numpy array."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {data.size} bytes")
    return data.reshape(shape)


def _find(folder, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def load_idx_folder(folder, split="train", pad_to=32):
    """(Fashion-)MNIST from `folder`: images padded with black to pad_to x pad_to."""
    prefix = "train" if split == "train" else "t10k"
    img_path, lbl_path = _find(folder, f"{prefix}-images-idx3-ubyte"), _find(folder, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        raise DataError(f"{folder}: no {prefix}-images-idx3-ubyte[.gz] / {prefix}-labels-idx1-ubyte[.gz] pair")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{folder}: images {images.shape} and labels {labels.shape} do not match")
    p = (pad_to - images.shape[1]) // 2
    images = np.pad(images, ((0, 0), (p, pad_to - images.shape[1] - p), (p, pad_to - images.shape[2] - p)))
    return ArrayDataset(images[:, None], labels, int(labels.max()) + 1, name=folder)


# --- Entry point ---------------------------------------------------------------------------------

def open_dataset(path, split="train", check_all=True):
    """Recognise the dataset at `path` (see module docstring) and open it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"dataset not found: {path}")
    if os.path.isfile(path):
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path} is a file but not a ZIP archive")
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            meta = json.loads(z.read(LABELS_FILE)) if LABELS_FILE in names else None
        files = sorted(n for n in names if n.lower().endswith(IMAGE_EXTS))
        return _labelled(path, files, meta, check_all=False)
    if _find(path, "train-images-idx3-ubyte"):
        return load_idx_folder(path, split)
    if os.path.isfile(os.path.join(path, LABELS_FILE)):
        with open(os.path.join(path, LABELS_FILE)) as f:
            meta = json.load(f)
        return _labelled(path, None, meta, check_all=False)
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    files, labels = [], []
    for label, c in enumerate(classes or [""]):
        for dirpath, _, names in sorted(os.walk(os.path.join(path, c))):
            if not classes and dirpath != path:
                continue
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTS):
                    files.append(os.path.relpath(os.path.join(dirpath, n), path))
                    labels.append(label)
    return FileDataset(path, files, labels, len(classes), check_all=check_all)


def _labelled(root, files, meta, check_all):
    """A prepared set: labels.json = {"classes": [...], "labels": [[file, label], ...]}."""
    if meta is None:
        return FileDataset(root, files, [0] * len(files or []), 0, check_all)
    try:
        pairs = meta["labels"]
        names, labels = [p[0] for p in pairs], [int(p[1]) for p in pairs]
        num_classes = len(meta.get("classes", [])) or (max(labels) + 1 if labels else 0)
    except (KeyError, TypeError, IndexError, ValueError):
        raise DataError(f"{root}: {LABELS_FILE} is not of the form {{\"labels\": [[file, label], ...]}}") from None
    return FileDataset(root, names, labels, num_classes, check_all)


# --- Streaming -----------------------------------------------------------------------------------

def epoch_order(n, seed, epoch):
    """The sample order of one epoch: a permutation fixed by (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).numpy()


def global_batch_indices(n, batch, step, seed):
    """Indices of the global batch number `step` (0-based) of an endless, reshuffled stream.

    Fixed by (seed, step) alone, so resuming at a step continues the same order.
    """
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        out.extend(epoch_order(n, seed, epoch)[offset:offset + batch - len(out)].tolist())
    return out


def batches(dataset, batch, start_step, seed, rank=0, world=1, workers=0):
    """Endless (step, uint8 images [B/world, C, H, W], labels) for this rank, from start_step on."""
    local = batch // world

    def indices(step):
        return global_batch_indices(len(dataset), batch, step, seed)[rank * local:(rank + 1) * local]

    step = start_step
    if hasattr(dataset, "batch"):  # in memory: no workers needed
        while True:
            yield (step, *dataset.batch(indices(step)))
            step += 1
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_Steps(indices, start_step), num_workers=workers,
                                         collate_fn=_collate, persistent_workers=workers > 0)
    for images, labels in loader:
        yield step, images, labels
        step += 1


class _Steps:
    """An endless batch sampler: the index list of each step in turn."""

    def __init__(self, indices, start):
        self.indices, self.start = indices, start

    def __iter__(self):
        step = self.start
        while True:
            yield self.indices(step)
            step += 1


def _collate(items):
    images = torch.from_numpy(np.stack([im for im, _ in items]))
    return images, torch.tensor([lb for _, lb in items], dtype=torch.int64)


def to_model(images):
    """uint8 [N, C, H, W] -> float32 in [-1, 1]."""
    return images.to(torch.float32) / 127.5 - 1
