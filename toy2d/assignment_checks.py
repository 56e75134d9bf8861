"""Self-checks for the toy assignments: the exact score of a heat-diffused
Gaussian mixture. Same conventions as mini_autoguide/checks.py (prints PASS or
HINT, returns True/False, never raises)."""
import numpy as np
import torch

from mini_autoguide.assignment_checks import CheckFailed, call, compare, report

from .fractal import GMM, gmm as make_gmm

__all__ = ["check_mixture_score", "small_mixture"]


def small_mixture():
    """Three components with unnormalised weights and full covariances. (weight [3], mu [3,2], cov [3,2,2])."""
    weight = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    mu = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-0.5, 1.0]], dtype=torch.float64)
    cov = torch.tensor([[[0.10, 0.03], [0.03, 0.05]],
                        [[0.02, 0.00], [0.00, 0.20]],
                        [[0.30, -0.10], [-0.10, 0.10]]], dtype=torch.float64)
    return weight, mu, cov


def check_mixture_score(student_score):
    """student_score(x [N,2], sigma float, weight [K], mu [K,2], cov [K,2,2]) -> [N,2]:
    the score of p(x; sigma) = sum_k w_k N(x; mu_k, cov_k + sigma^2 I) / sum_k w_k."""
    def body():
        g = torch.Generator().manual_seed(0)
        weight, mu, cov = small_mixture()
        x = torch.randn(8, 2, generator=g, dtype=torch.float64)
        one = (weight[:1], mu[:1], cov[:1])
        cases = [("one component, sigma=0", x, 0.0, one),
                 ("one component, sigma=0.5", x, 0.5, one),
                 ("three components with weights 2, 1, 0.5, sigma=0.3", x, 0.3, (weight, mu, cov)),
                 ("three components, a point far from all of them, sigma=0.01",
                  torch.tensor([[40.0, -30.0], [0.2, 0.1]], dtype=torch.float64), 0.01, (weight, mu, cov))]
        tree = make_gmm("A")
        fractal = tuple(torch.as_tensor(v) for v in (tree.weight, tree.mu, tree.cov))
        cases.append(("the fractal class A (1016 components), sigma=0.05",
                      tree.sample(16, sigma=0.05, generator=g, dtype=torch.float64), 0.05, fractal))
        for where, points, sigma, (w, m, c) in cases:
            got = call(student_score, points.clone(), sigma, w.clone(), m.clone(), c.clone(),
                       what=f"mixture_score(...) on {where}")
            expected = GMM(w.numpy(), m.numpy(), c.numpy()).score(points, sigma)
            _recognise(got, expected, where, points, sigma, w, m, c)
            compare(got, expected, where, rtol=1e-5, atol=1e-7)
        return "exact score of heat-diffused mixtures: one and three components, far points, the fractal"
    return report("mixture score", body)


def _recognise(got, expected, where, x, sigma, w, m, c):
    """Name the usual mistakes when the answer matches one of them."""
    got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got)
    if got.shape != expected.shape:
        return
    if not torch.isfinite(got).all() and torch.isfinite(expected).all():
        raise CheckFailed(f"{where}: got NaN or inf. Far from every component all the Gaussian densities "
                          "underflow to 0 and 0/0 = NaN: compute the responsibilities from log-densities "
                          "with torch.logsumexp / torch.softmax")
    if sigma > 0:
        no_noise = GMM(w.numpy(), m.numpy(), c.numpy()).score(x, 0.0)
        if torch.allclose(got.double(), no_noise, rtol=1e-4, atol=1e-6):
            raise CheckFailed(f"{where}: this is the score at sigma = 0. Adding noise of std sigma adds "
                              "sigma^2 I to every covariance")
        if torch.allclose(got.double(), GMM(w.numpy(), m.numpy(), c.numpy() + sigma * torch.eye(2).double().numpy()
                                            ).score(x, 0.0), rtol=1e-4, atol=1e-6):
            raise CheckFailed(f"{where}: you added sigma I to the covariances; the variance of the noise "
                              "is sigma^2, so add sigma^2 I")
    if len(w) > 1 and not torch.allclose(w, w[:1].expand_as(w)):
        equal = GMM(np.ones(len(w)), m.numpy(), c.numpy()).score(x, sigma)
        if torch.allclose(got.double(), equal, rtol=1e-4, atol=1e-6):
            raise CheckFailed(f"{where}: your answer ignores the mixture weights: the responsibilities "
                              "are proportional to w_k N(x; mu_k, cov_k + sigma^2 I)")
