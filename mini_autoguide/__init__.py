"""mini_autoguide: a small, exact reference implementation of autoguidance.

Karras et al., "Guiding a Diffusion Model with a Bad Version of Itself"
(NeurIPS 2024). The core works on any denoiser D(x, sigma, **kwargs):

    from mini_autoguide import guidance, sampler
    D = guidance.autoguidance(main, guide, weight=2.0)
    x = sampler.heun_sample(D, sigmas[0] * noise, sigmas)
"""
from . import edm, ema, guidance, metrics, sampler
from .edm import precondition, sample_sigma
from .guidance import autoguidance, cfg, guided, truncation
from .sampler import heun_sample, sigma_steps

__version__ = "0.1.0"
__all__ = ["edm", "ema", "guidance", "metrics", "sampler", "precondition", "sample_sigma",
           "autoguidance", "cfg", "guided", "truncation", "heun_sample", "sigma_steps"]
