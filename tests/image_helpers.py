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
