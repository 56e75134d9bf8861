"""The EDM sampler: Heun's method on the probability-flow ODE (EDM, arXiv 2206.00364, Sec. 3, Algorithm 1).

Written against the denoiser interface D(x, sigma, **kwargs) -> [N, ...], so the
exact toy denoiser, a trained network and any guided combination all plug in.
"""
import math

import torch

from .progress import progress_bar


def sigma_steps(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, dtype=torch.float64, device="cpu"):
    """The rho-schedule sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, then 0. [N+1]."""
    if num_steps < 1:
        raise ValueError("num_steps must be at least 1")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    i = torch.arange(num_steps, dtype=torch.float64)
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).to(dtype=dtype, device=device)


def randn_from_seeds(seeds, shape, device="cpu", dtype=torch.float32):
    """One generator per sample: row i depends only on seeds[i], not on the batch.

    seeds: sequence of ints; shape: per-sample shape. Returns [len(seeds), *shape].
    """
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
            for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


class SeededNoise:
    """A per-sample noise source for churn: noise(like) gives [N, ...] from N generators."""

    def __init__(self, seeds, offset=1_000_003):
        self.generators = [torch.Generator().manual_seed(int(s) + offset) for s in seeds]

    def __call__(self, like):
        rows = [torch.randn(like.shape[1:], generator=g, dtype=torch.float64) for g in self.generators]
        return torch.stack(rows).to(like)


def heun_sample(denoise, x, sigmas, churn=0.0, churn_min=0.0, churn_max=math.inf, noise_scale=1.0,
                noise=torch.randn_like, record=False, progress=False, **kwargs):
    """Integrate from sigmas[0] to sigmas[-1] = 0 with Heun's 2nd-order method.

    denoise: D(x, sigma, **kwargs); x: [N, ...], a sample at noise level
    sigmas[0] (e.g. sigmas[0] * eps); sigmas: decreasing [steps + 1] ending
    at 0. churn: EDM's S_churn (0 = deterministic); noise(like) draws the
    churn noise (pass SeededNoise for batch-size invariance).
    Returns x: [N, ...], or (x, trajectory [steps + 1, N, ...]) if record.
    Costs 2 * steps - 1 calls of denoise.
    """
    sigmas = [float(s) for s in sigmas]
    steps = len(sigmas) - 1
    gamma_max = min(churn / steps, math.sqrt(2) - 1) if steps else 0.0
    trajectory = [x] if record else None
    bar = progress_bar(steps, "sampling", "step", enabled=progress)
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]

        # Churn: add noise to climb from sigma to sigma_hat >= sigma.
        gamma = gamma_max if churn_min <= sigma <= churn_max else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat ** 2 - sigma ** 2) * noise_scale * noise(x)

        # Euler step along dx/dsigma = (x - D(x; sigma)) / sigma.
        d = (x - denoise(x, sigma_hat, **kwargs)) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d

        # Heun's correction: average with the slope at the end point (not on the last step).
        if sigma_next > 0:
            d_next = (x_next - denoise(x_next, sigma_next, **kwargs)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)

        x = x_next
        if record:
            trajectory.append(x)
        bar.update(1)
    bar.close()
    return (x, torch.stack(trajectory)) if record else x


def euler_sample(denoise, x, sigmas, **kwargs):
    """First-order variant (Euler only), for comparison in the notebooks."""
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = x + (sigma_next - sigma) * (x - denoise(x, sigma, **kwargs)) / sigma
    return x


__all__ = ["sigma_steps", "randn_from_seeds", "SeededNoise", "heun_sample", "euler_sample"]
