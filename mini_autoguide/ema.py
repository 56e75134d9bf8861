"""Power-function EMA (EDM2, Karras et al. 2024, arXiv 2312.02696, Sec. 3, Eq. 3-4).

beta_t = (1 - 1/t)^(gamma + 1); its relative standard deviation is
sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Unlike a fixed
beta, the profile scales with training length: at every step the average
covers a fixed *fraction* of the run so far. posthoc.py rebuilds any other
length afterwards from stored snapshots.
"""
import copy

import numpy as np
import torch


def gamma_to_sigma_rel(gamma):
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel):
    """Invert gamma_to_sigma_rel: the real root > -1 of the cubic
    sigma_rel^2 (g+2)^2 (g+3) = g + 1 (sigma_rel in (0, sqrt(1/12) ~ 0.289))."""
    s2 = float(sigma_rel) ** 2
    if not 0 < s2 < 1 / 12:
        raise ValueError(f"sigma_rel must be in (0, 0.2887), got {sigma_rel}")
    # s2 (g^3 + 7g^2 + 16g + 12) - g - 1 = 0
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(real[real > -1].max())


class PowerEMA:
    """EMA copies of a module at one or more sigma_rel.

    update(step) with step = number of optimizer steps taken (1, 2, ...).
    """

    def __init__(self, net, sigma_rels=(0.05,)):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.nets = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.sigma_rels]

    @torch.no_grad()
    def update(self, net, step):
        for gamma, ema in zip(self.gammas, self.nets):
            beta = (1 - 1 / step) ** (gamma + 1) if step > 0 else 0.0
            torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1 - beta)
            for b_ema, b in zip(ema.buffers(), net.buffers()):
                b_ema.copy_(b)

    def state_dict(self):
        return {f"{s:g}": n.state_dict() for s, n in zip(self.sigma_rels, self.nets)}

    def load_state_dict(self, state):
        for s, n in zip(self.sigma_rels, self.nets):
            n.load_state_dict(state[f"{s:g}"])

    def __getitem__(self, sigma_rel):
        return self.nets[self.sigma_rels.index(float(sigma_rel))]
