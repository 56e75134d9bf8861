"""Magnitude-preserving (MP) building blocks of EDM2 (facts file, section 4).

Every layer keeps unit-variance inputs at unit variance: weight rows are used
at unit norm, activations and sums are rescaled. No biases anywhere.
"""
import math

import numpy as np
import torch


def normalize(x, dim=None, eps=1e-4):
    """Scale x so that its RMS over `dim` (all but dim 0 by default) is 1."""
    if dim is None:
        dim = list(range(1, x.ndim))
    # at least float32 (bf16 weights), float64 kept (exactness tests)
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


SILU_STD = 0.596  # std of silu(z) for z ~ N(0, 1)


def mp_silu(x):
    """SiLU rescaled to unit variance for unit-normal input."""
    return torch.nn.functional.silu(x) / SILU_STD


def mp_sum(a, b, t=0.5):
    """Blend a and b with weight t on b, keeping unit magnitude."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenate along dim, weighting b by t, keeping unit magnitude overall."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


class MPFourier(torch.nn.Module):
    """Fourier features sqrt(2) cos(2 pi (f c + phi)) with fixed random f, phi."""

    def __init__(self, channels, bandwidth=1.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * np.pi * torch.randn(channels, generator=g) * bandwidth)
        self.register_buffer("phases", 2 * np.pi * torch.rand(channels, generator=g))

    def forward(self, x):
        y = x.to(torch.float32).ger(self.freqs) + self.phases
        return (y.cos() * np.sqrt(2)).to(x.dtype)


class MPConv(torch.nn.Module):
    """MP linear (kernel=()) or 2D convolution (kernel=(k, k)) without bias.

    Each output unit's weight row is used at unit norm divided by sqrt(fan_in)
    and, while training, the stored weight is re-normalised in place first
    ("forced weight normalisation"), so the optimizer cannot inflate it.
    """

    def __init__(self, in_channels, out_channels, kernel=()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def effective_weight(self, gain=1, dtype=torch.float32):
        """The weight as used: rows at unit norm / sqrt(fan_in), times gain.
        While training, also re-normalises the stored weight in place."""
        return effective_weights([self], gain, dtype)[0]

    def forward(self, x, gain=1):
        w = self.effective_weight(gain, x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)


def effective_weights(layers, gain=1, dtype=torch.float32):
    """MPConv.effective_weight of several layers of one shape, stacked:
    [len(layers), out, in, ...]. The same numbers as one layer at a time, in a
    few ops for all (for the toy MLP, whose small ops cost more than its math)."""
    def stacked():   # one layer: a view, so that a channels-last weight stays channels-last
        return layers[0].weight[None] if len(layers) == 1 else torch.stack([layer.weight for layer in layers])
    real = torch.promote_types(layers[0].weight.dtype, torch.float32)
    rows = list(range(2, layers[0].weight.ndim + 1))   # each layer's rows: all but its dim 0
    if layers[0].training:   # first, so that what follows normalises the stored rows
        with torch.no_grad():
            for layer, normed in zip(layers, normalize(stacked().to(real), rows)):
                layer.weight.copy_(normed)
    w = normalize(stacked().to(real), rows) * (gain / math.sqrt(layers[0].weight[0].numel()))
    return w.to(dtype)
