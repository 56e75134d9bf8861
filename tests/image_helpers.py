"""Shared fixtures for the image tests: a tiny in-memory dataset and a tiny model."""
import numpy as np
import torch

from mini_autoguide import presets
from mini_autoguide.data import ArrayDataset
from mini_autoguide.unet import Denoiser


def tiny_dataset(n=32, resolution=8, classes=3, seed=0):
    """Class k = a bright square at a class-dependent corner, with jitter: easy to learn."""
    rng = np.random.RandomState(seed)
    images = np.zeros((n, 1, resolution, resolution), dtype=np.uint8)
    labels = np.arange(n) % classes
    for i, k in enumerate(labels):
        r, c = [(0, 0), (0, 4), (4, 2)][k]
        images[i, 0, r:r + 4, c:c + 4] = 200 + rng.randint(0, 55)
    return ArrayDataset(images, labels, classes, name="tiny")


def tiny_net(seed=0, live=True, **overrides):
    """The tiny preset's Denoiser; live=True sets the zero-initialised gains to 1 so the output depends on F."""
    torch.manual_seed(seed)
    net = Denoiser(presets.net_config("tiny", **overrides))
    if live:
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.endswith("gain"):
                    p.fill_(1.0)
    return net.eval()


# Tolerance for float32 results whose sums ran in another order (another convolution algorithm,
# memory layout or batch blocking): each reordered sum of K terms moves by at most ~K ulps of its
# scale, typically sqrt(K); through ~10 layers, up to 2 * 32 - 1 network evaluations and a guidance
# extrapolation, this stays well under 2^12 ulps of the largest value. Derived from float32's
# epsilon, not measured on one CPU; a real error (a wrong layout, a mixed-up seed) is O(1).
REORDERED_F32_ULPS = 2 ** 12


def assert_close_up_to_reordering(a, b, ulps=REORDERED_F32_ULPS):
    """max |a - b| <= ulps * eps32 * max |b|: equal up to float32 summation order."""
    scale = b.abs().max()
    err = (a - b).abs().max()
    assert err <= ulps * torch.finfo(torch.float32).eps * scale, f"max diff {err:.3g} at scale {scale:.3g}"


def on_meta(config):
    """A Denoiser built on the meta device: shapes and parameter counts without memory."""
    with torch.device("meta"):
        return Denoiser(config)
