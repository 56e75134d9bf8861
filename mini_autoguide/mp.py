"""Magnitude-preserving (MP) building blocks of EDM2 (arXiv 2312.02696, Sec. 2).

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

    Each output unit's weight row is used at unit norm divided by sqrt(fan_in).
    The forward pass only reads the stored weight: training keeps it at unit
    RMS with normalize_weights_ after each optimizer step.
    """

    def __init__(self, in_channels, out_channels, kernel=()):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def effective_weight(self, gain=1, dtype=torch.float32):
        """The weight as used: rows at unit norm / sqrt(fan_in), times gain."""
        # weight[None]: a view, so that a channels-last weight stays channels-last
        w = _unit_rows(self.weight[None])[0]
        return (w * (gain / math.sqrt(self.weight[0].numel()))).to(dtype)

    def forward(self, x, gain=1):
        w = self.effective_weight(gain, x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=w.shape[-1] // 2)


def _unit_rows(w):
    """Stacked weights [L, out, in, ...] with each layer's rows at unit RMS, in at least float32."""
    return normalize(w.to(torch.promote_types(w.dtype, torch.float32)), list(range(2, w.ndim)))


@torch.no_grad()
def normalize_weights_(net):
    """Forced weight normalisation (EDM2, arXiv 2312.02696, Sec. 2.3): every
    MPConv's stored weight rows re-normalised in place, to RMS 1 / (1 + eps)
    of `normalize`. Training calls it once before the first step and after
    each optimizer step: Adam's updates, orthogonal to the rows on average,
    would otherwise grow their norm and so shrink the effective learning rate.
    EDM2 does it at the start of each training forward pass; done here, the
    forward pass is a pure function of the parameters, as graph compilers
    want (docs/image.md, "Known issues")."""
    for layer in net.modules():
        if isinstance(layer, MPConv):
            layer.weight.copy_(_unit_rows(layer.weight[None])[0])   # as the forward pass computes it
