"""The exact fractal distribution: construction, log-density, score, denoiser, sampler."""
import math

import numpy as np
import pytest
import torch

import toy2d
from toy2d.fractal import GMM

pytestmark = pytest.mark.usefixtures("one_thread")   # many small ops: one thread is faster on a busy CPU


def direct_logp(g, x, sigma):
    """Independent float64 reference: a plain mixture of MultivariateNormals."""
    mu = torch.tensor(g.mu)
    cov = torch.tensor(g.cov)[None] + (sigma ** 2)[:, None, None, None] * torch.eye(2, dtype=torch.float64)
    comp = torch.distributions.MultivariateNormal(mu[None].expand(len(x), -1, -1), cov)
    return torch.logsumexp(comp.log_prob(x[:, None, :]) + torch.tensor(g.weight).log(), 1)


def points(n, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    g = toy2d.gmm("A")
    x = g.sample(n, generator=gen, dtype=dtype) + 0.05 * torch.randn(n, 2, generator=gen, dtype=dtype)
    sigma = (torch.randn(n, generator=gen, dtype=dtype) * 1.5 - 2.3).exp()
    return x, sigma


def test_tree_shape_and_calibration():
    phi, mu, cov, branch, cls = toy2d.tree()
    assert len(phi) == 2032 and (cls == 0).sum() == 1016
    assert len(np.unique(branch[cls == 0])) == 127  # 127 branches a class
    x = toy2d.gmm("AB").sample(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # origin and scale are calibrated so that the AB mixture has mean ~0 and std ~0.5
    assert x.mean(0).abs().max() < 0.01
    assert (x.std(0) - 0.5).abs().max() < 0.01


def test_classes_partition_the_mixture():
    a, b, ab = toy2d.gmm("A"), toy2d.gmm("B"), toy2d.gmm("AB")
    assert len(a) == len(b) == 1016 and len(ab) == 2032
    x, _ = points(64)
    # p_AB = (W_A p_A + W_B p_B) / (W_A + W_B), with W the raw weight totals
    phi, _, _, _, cls = toy2d.tree()
    wa, wb = phi[cls == 0].sum(), phi[cls == 1].sum()
    mix = torch.logaddexp(a.logp(x) + math.log(wa), b.logp(x) + math.log(wb)) - math.log(wa + wb)
    assert torch.allclose(ab.logp(x), mix, atol=1e-10)


def test_unknown_class():
    with pytest.raises(ValueError, match="unknown class"):
        toy2d.gmm("C")


def test_logp_matches_direct_mixture():
    g = toy2d.gmm("A")
    x, sigma = points(300)
    assert torch.allclose(g.logp(x, sigma), direct_logp(g, x, sigma), atol=1e-9, rtol=0)


def test_score_equals_autograd_of_exact_logp():
    g = toy2d.gmm("A")
    x, sigma = points(300, seed=1)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(direct_logp(g, xr, sigma).sum(), xr)
    assert torch.allclose(g.score(x, sigma), grad, rtol=1e-7, atol=1e-7 / sigma.min().item())


def test_score_is_gradient_of_own_logp():
    """Central finite differences of GMM.logp itself (float64)."""
    g = toy2d.gmm("AB")
    x, _ = points(50, seed=2)
    sigma = 0.1
    h = 1e-5
    fd = torch.stack([(g.logp(x + h * e, sigma) - g.logp(x - h * e, sigma)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], 1)
    assert torch.allclose(g.score(x, sigma), fd, rtol=1e-5, atol=1e-4)


def test_denoiser_is_x_plus_sigma2_score():
    g = toy2d.gmm("A")
    x, sigma = points(100, seed=3)
    assert torch.allclose(g.denoise(x, sigma), x + sigma[:, None] ** 2 * g.score(x, sigma))
    assert torch.allclose(g.denoise(x, 0.3), x + 0.09 * g.score(x, 0.3))


@pytest.mark.parametrize("classes", ["A", "AB", "ungrouped"])
def test_float32_agrees_with_float64(classes):
    """Error in units of sigma * score (what the training loss weights), over mixed sigma.

    The bound comes from float32 arithmetic, not from a measurement: the logits
    that matter (within 80 of the peak) are sums of terms below 2^6 in size
    (log-weights, log-determinants, quadratic forms), each after at most 2^3
    roundings of relative size eps; so each logit, and log p, carries at most
    2^9 eps of absolute error, and sigma * score, a responsibility-weighted mean
    of O(1) terms, at most about as much. Twice that: 2^10 eps = 1.2e-4."""
    tol = 2 ** 10 * torch.finfo(torch.float32).eps
    if classes == "ungrouped":  # components that share no covariance: groups of one
        phi, mu, cov, _, _ = toy2d.fractal.tree()
        g = GMM(phi[:300], mu[:300], cov[:300] * np.linspace(0.5, 2, 300)[:, None, None])
        assert g.group == 1
    else:
        g = toy2d.gmm(classes)
    x, sigma = points(4096, seed=4)
    if classes == "ungrouped":  # points near this mixture (far ones lose float32 digits in any code)
        x = g.sample(4096, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.05 * torch.randn_like(x)
    s64 = g.score(x, sigma)
    s32 = g.score(x.float(), sigma.float())
    assert s32.dtype == torch.float32 and s32.shape == (4096, 2)
    assert ((s32.double() - s64) * sigma[:, None]).abs().max() < tol
    assert (g.logp(x.float(), sigma.float()).double() - g.logp(x, sigma)).abs().max() < tol
    assert (g.logp(x.float(), 0.3).double() - g.logp(x, 0.3)).abs().max() < tol   # scalar sigma
    assert g.score(x[:0].float(), sigma[:0].float()).shape == (0, 2)
    bad = x[:3].float().clone()
    bad[1, 0] = float("nan")
    out = g.score(bad, sigma[:3].float())
    assert out[1].isnan().all() and out[[0, 2]].isfinite().all()


def test_blocks_do_not_change_results():
    """Chunked evaluation (bounded memory) gives the same values for any N."""
    g = toy2d.gmm("A")
    x, sigma = points(2500, seed=5)
    full = g.score(x, sigma)
    parts = torch.cat([g.score(x[i:i + 7], sigma[i:i + 7]) for i in range(0, 2500, 7)])
    assert torch.allclose(full, parts, rtol=1e-12, atol=1e-12)


def test_sample_matches_density_moments():
    """Samples at sigma have the mixture's exact mean and covariance (closed form)."""
    g = toy2d.gmm("A")
    sigma = 0.2
    x = g.sample(400_000, sigma=sigma, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    w, mu, cov = g.weight, g.mu, g.cov
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0) + sigma ** 2 * np.eye(2)
    covariance = second - np.outer(mean, mean)
    assert np.abs(x.mean(0).numpy() - mean).max() < 3e-3
    assert np.abs(np.cov(x.numpy(), rowvar=False) - covariance).max() < 3e-3


def test_single_gaussian_closed_form():
    """A one-component GMM is a Gaussian: score = -(C + s^2 I)^-1 (x - mu)."""
    cov = np.array([[0.3, 0.1], [0.1, 0.2]])
    g = GMM([1.0], [[0.2, -0.1]], [cov])
    x = torch.randn(20, 2, dtype=torch.float64)
    for sigma in (0.0, 0.5):
        prec = torch.tensor(np.linalg.inv(cov + sigma ** 2 * np.eye(2)))
        expected = -(x - torch.tensor([0.2, -0.1], dtype=torch.float64)) @ prec
        assert torch.allclose(g.score(x, sigma), expected, atol=1e-12)


def test_bad_shapes():
    g = toy2d.gmm("A")
    with pytest.raises(ValueError, match="shape"):
        g.score(torch.zeros(5, 3), 0.1)
    with pytest.raises(ValueError, match="sigma"):
        g.score(torch.zeros(5, 2), torch.ones(4))


def test_responsibilities_are_posteriors():
    g = toy2d.gmm("A")
    x, _ = points(1500, seed=7)
    r = g.responsibilities(x, 0.05)
    assert r.shape == (1500, 1016)
    assert torch.allclose(r.sum(1), torch.ones(1500, dtype=torch.float64))
    # posterior of component k = w_k N(x; mu_k, C_k + s^2 I) / p(x)
    k = 17
    comp = torch.distributions.MultivariateNormal(
        torch.tensor(g.mu[k]), torch.tensor(g.cov[k]) + 0.05 ** 2 * torch.eye(2, dtype=torch.float64))
    expected = (comp.log_prob(x) + math.log(g.weight[k]) - g.logp(x, 0.05)).exp()
    assert torch.allclose(r[:, k], expected, atol=1e-10)


def test_most_responsible_against_the_mixture_written_out():
    """log p(x; sigma) and the posterior's argmax over components, computed here in float64 numpy from
    the mixture's weights, means and covariances: logit_k = log w_k - log(2 pi) - log det(C_k + s^2 I) / 2
    - (x - mu_k)^T (C_k + s^2 I)^-1 (x - mu_k) / 2 with the 2x2 inverse written out; logsumexp and argmax.
    Both codes round differently (~1e-12): log p to 1e-9, and the argmax wherever the top two logits
    differ by more than 1e-9."""
    import scipy.special
    g = toy2d.gmm("A")
    x, _ = points(1500, seed=8)    # more than one block of points
    logp, component = g.most_responsible(x, 0.05)
    s2 = 0.05 ** 2
    a, b, c = g.cov[:, 0, 0] + s2, g.cov[:, 0, 1], g.cov[:, 1, 1] + s2
    det = a * c - b * b
    u = x.numpy()[:, None, :] - g.mu[None]                                     # [n, K, 2]
    quadratic = (c * u[..., 0] ** 2 - 2 * b * u[..., 0] * u[..., 1] + a * u[..., 1] ** 2) / det
    logit = np.log(g.weight) - np.log(2 * np.pi) - 0.5 * np.log(det) - 0.5 * quadratic
    assert np.abs(logp.numpy() - scipy.special.logsumexp(logit, axis=1)).max() < 1e-9
    top_two = np.sort(logit, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 1e-9
    assert clear.mean() > 0.99
    assert np.array_equal(component.numpy()[clear], logit.argmax(1)[clear])
    assert len(component.unique()) > 100   # the points spread over many components
    empty_logp, empty_component = g.most_responsible(torch.zeros(0, 2, dtype=torch.float64))
    assert empty_logp.shape == empty_component.shape == (0,)
