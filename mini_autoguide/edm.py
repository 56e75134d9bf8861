"""The EDM formulation (Karras et al. 2022, arXiv 2206.00364, Table 1).

Preconditioning, the training noise distribution, the losses, and EDM2's
learning-rate schedule. Everything works on any data shape: x is [N, ...]
and sigma is [N] (or a scalar).
"""
import math

import torch

SIGMA_DATA = 0.5


def expand(sigma, x):
    """Broadcast sigma (scalar or [N]) against x: [N, ...] -> [N, 1, ..., 1]."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def sigma_per_sample(sigma, x):
    """sigma (a Python float, a scalar tensor or [N]) as a float32 tensor [N], one per sample of x [N, ...]."""
    return torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])


def precondition(sigma, sigma_data=SIGMA_DATA):
    """EDM's (c_skip, c_out, c_in, c_noise) for noise level sigma.

    D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).
    """
    sigma = torch.as_tensor(sigma)
    var = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / var
    c_out = sigma * sigma_data / var.sqrt()
    c_in = 1 / var.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def sample_sigma(n, p_mean=-1.2, p_std=1.2, generator=None, device="cpu", dtype=torch.float32):
    """Training noise levels: ln sigma ~ N(p_mean, p_std^2). Returns [n]."""
    z = torch.randn(n, generator=generator, device=device, dtype=dtype)
    return (z * p_std + p_mean).exp()


def loss_weight(sigma, sigma_data=SIGMA_DATA):
    """EDM's lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2: unit loss at init."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def exact_score_loss(score, score_true, sigma):
    """Exact score matching: mean over the batch of sigma^2 * mean_dim (s - s_true)^2.

    score, score_true: [N, ...]; sigma: [N]. The sigma^2 factor makes every
    noise level count alike (sigma * score is O(1)).
    """
    err = (score - score_true).flatten(1).square().mean(1)
    return (sigma.reshape(-1) ** 2 * err).mean()


def denoising_loss(denoised, clean, sigma, logvar=None, sigma_data=SIGMA_DATA):
    """Denoising score matching with EDM weighting; EDM2's learned uncertainty.

    denoised, clean: [N, ...]; sigma: [N]; logvar: optional [N] (u(sigma)).
    Per element lambda/e^u (D - y)^2 + u, averaged (u = 0 gives plain EDM).
    """
    weight = expand(loss_weight(sigma, sigma_data), clean)
    err = weight * (denoised - clean).square()
    if logvar is not None:
        u = expand(logvar, clean)
        err = err / u.exp() + u
    return err.mean()


def learning_rate(step, batch, lr_ref, lr_tref, rampup_img=0):
    """EDM2's inverse-square-root decay alpha_ref / sqrt(max(t / t_ref, 1)), t = step in batches
    (arXiv 2312.02696, Sec. 2.3), with a linear warm-up over the first rampup_img images."""
    lr = lr_ref / math.sqrt(max(step / lr_tref, 1))
    if rampup_img > 0:
        lr *= min((step + 1) * batch / rampup_img, 1)
    return lr
