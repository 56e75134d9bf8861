"""The EDM core: preconditioning, losses, sampler, guidance, EMA."""
import math

import numpy as np
import pytest
import torch

import toy2d
from mini_autoguide import edm, ema, guidance, sampler


# ---- EDM ---------------------------------------------------------------------
def test_preconditioning_closed_form():
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.precondition(sigma)
    sd = 0.5
    assert torch.allclose(c_skip, sd ** 2 / (sigma ** 2 + sd ** 2))
    assert torch.allclose(c_out, sigma * sd / (sigma ** 2 + sd ** 2).sqrt())
    assert torch.allclose(c_in, 1 / (sigma ** 2 + sd ** 2).sqrt())
    assert torch.allclose(c_noise, sigma.log() / 4)
    # unit variance of the network input, and of the effective training target
    # F = (y - c_skip x) / c_out for y ~ N(0, sd^2), x = y + sigma n
    assert torch.allclose(c_in ** 2 * (sd ** 2 + sigma ** 2), torch.ones(3, dtype=torch.float64))
    target_var = ((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * sigma ** 2) / c_out ** 2
    assert torch.allclose(target_var, torch.ones(3, dtype=torch.float64))


def test_sample_sigma_is_lognormal():
    s = edm.sample_sigma(200_000, -1.2, 1.2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(s.log().mean().item() + 1.2) < 0.01 and abs(s.log().std().item() - 1.2) < 0.01


def test_loss_weight_gives_unit_loss_for_the_trivial_denoiser():
    """For D = c_skip x (a network that outputs 0), lambda * E|D - y|^2 = 1 at every sigma."""
    gen = torch.Generator().manual_seed(1)
    y = 0.5 * torch.randn(400_000, 1, generator=gen, dtype=torch.float64)
    for s in (0.01, 0.5, 20.0):
        sigma = torch.full((len(y),), s, dtype=torch.float64)
        x = edm.add_noise(y, sigma, generator=gen)
        c_skip = edm.precondition(sigma)[0]
        loss = edm.denoising_loss(c_skip[:, None] * x, y, sigma)
        assert abs(loss.item() - 1) < 0.01


def test_denoising_loss_with_uncertainty():
    d, y = torch.randn(8, 3), torch.randn(8, 3)
    sigma, u = torch.rand(8) + 0.1, torch.randn(8)
    lam = edm.loss_weight(sigma)[:, None]
    expected = (lam / u.exp()[:, None] * (d - y) ** 2 + u[:, None]).mean()
    assert torch.allclose(edm.denoising_loss(d, y, sigma, u), expected)


def test_exact_score_loss_formula():
    s, t, sigma = torch.randn(6, 2), torch.randn(6, 2), torch.rand(6)
    expected = (sigma ** 2 * ((s - t) ** 2).mean(1)).mean()
    assert torch.allclose(edm.exact_score_loss(s, t, sigma), expected)


# ---- sampler -----------------------------------------------------------------
def test_sigma_steps_rho_schedule():
    s = sampler.sigma_steps(32, 0.002, 80, 7)
    assert len(s) == 33 and s[-1] == 0
    assert math.isclose(s[0].item(), 80) and math.isclose(s[31].item(), 0.002, rel_tol=1e-12)
    i = 5
    expected = (80 ** (1 / 7) + i / 31 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert math.isclose(s[i].item(), expected, rel_tol=1e-12)
    assert torch.all(s[:-1] > s[1:])


def test_heun_counts_evaluations():
    calls = []

    def D(x, sigma):
        calls.append(sigma)
        return torch.zeros_like(x)
    sampler.heun_sample(D, torch.ones(3, 2), sampler.sigma_steps(10, 0.01, 5))
    assert len(calls) == 2 * 10 - 1


def test_heun_is_exact_for_a_gaussian():
    """For N(0, c^2) data the ODE solution is x * sqrt(c^2 + sigma'^2) / sqrt(c^2 + sigma^2);
    Heun with many steps must reproduce it."""
    c = 0.7

    def D(x, sigma):
        return x * c ** 2 / (c ** 2 + sigma ** 2)
    x0 = torch.randn(100, 2, dtype=torch.float64) * math.sqrt(c ** 2 + 5.0 ** 2)
    sigmas = sampler.sigma_steps(200, 0.002, 5.0, 7)
    x = sampler.heun_sample(D, x0, sigmas)
    expected = x0 * c / math.sqrt(c ** 2 + 25)
    assert torch.allclose(x, expected, atol=2e-3 * c)


def test_exact_denoiser_reproduces_the_true_distribution():
    """Sampling with the exact toy denoiser gives the true class-A distribution."""
    g = toy2d.gmm("A")
    gen = torch.Generator().manual_seed(2)
    n = 2048
    x0 = g.sample(n, sigma=5.0, generator=gen, dtype=torch.float64)
    x = sampler.heun_sample(g.denoise, x0, sampler.sigma_steps(32, 0.002, 5.0, 7))
    truth = g.sample(200_000, generator=gen, dtype=torch.float64)
    assert (x.mean(0) - truth.mean(0)).abs().max() < 0.02
    assert np.abs(np.cov(x.numpy(), rowvar=False) - np.cov(truth.numpy(), rowvar=False)).max() < 0.01
    # mean exact log-density close to the truth's (the paper's 32 Heun steps)
    assert abs(g.logp(x).mean().item() - g.logp(truth[:n]).mean().item()) < 0.15


def test_per_sample_seeds_are_batch_invariant():
    a = sampler.randn_from_seeds([3, 4, 5], (2,))
    b = sampler.randn_from_seeds([5], (2,))
    assert torch.equal(a[2], b[0])
    churn_a = sampler.SeededNoise([3, 4, 5])(torch.zeros(3, 2))
    churn_b = sampler.SeededNoise([4])(torch.zeros(1, 2))
    assert torch.equal(churn_a[1], churn_b[0])


def test_churn_with_seeded_noise_is_batch_invariant():
    g = toy2d.gmm("A")
    seeds = [10, 11, 12, 13]
    sigmas = sampler.sigma_steps(8, 0.002, 5.0, 7)
    x0 = 5.0 * sampler.randn_from_seeds(seeds, (2,), dtype=torch.float64)
    full = sampler.heun_sample(g.denoise, x0, sigmas, churn=4.0, noise=sampler.SeededNoise(seeds))
    part = sampler.heun_sample(g.denoise, x0[2:], sigmas, churn=4.0, noise=sampler.SeededNoise(seeds[2:]))
    assert torch.allclose(full[2:], part, atol=1e-12)
    plain = sampler.heun_sample(g.denoise, x0, sigmas)
    assert not torch.allclose(full, plain)  # churn does something


def test_trajectory_recording():
    g = toy2d.gmm("A")
    x0 = g.sample(16, sigma=5.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, traj = sampler.heun_sample(g.denoise, x0, sampler.sigma_steps(6, 0.002, 5.0), record=True)
    assert traj.shape == (7, 16, 2) and torch.equal(traj[0], x0) and torch.equal(traj[-1], x)


# ---- guidance ----------------------------------------------------------------
def _pair():
    a, ab = toy2d.gmm("A"), toy2d.gmm("AB")
    x = a.sample(64, sigma=0.3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return a, ab, x


def test_weight_one_is_the_main_model():
    a, ab, x = _pair()
    assert torch.allclose(guidance.autoguidance(a.denoise, ab.denoise, 1.0)(x, 0.3), a.denoise(x, 0.3))


def test_guidance_formula_in_denoiser_and_score_space():
    a, ab, x = _pair()
    w, s = 2.5, 0.3
    d = guidance.cfg(a.denoise, ab.denoise, w)(x, s)
    assert torch.allclose(d, ab.denoise(x, s) + w * (a.denoise(x, s) - ab.denoise(x, s)))
    score = (d - x) / s ** 2
    assert torch.allclose(score, ab.score(x, s) + w * (a.score(x, s) - ab.score(x, s)), atol=1e-8)
    assert torch.allclose(guidance.autoguidance(a.denoise, ab.denoise, 0.0)(x, s), ab.denoise(x, s))


def test_interval_switches_at_the_right_sigma():
    a, ab, x = _pair()
    D = guidance.autoguidance(a.denoise, ab.denoise, 3.0, interval=(0.28, 1.61))
    G = guidance.autoguidance(a.denoise, ab.denoise, 3.0)
    for s, on in ((0.27, False), (0.28, True), (1.0, True), (1.61, True), (1.62, False)):
        expected = G(x, s) if on else a.denoise(x, s)
        assert torch.allclose(D(x, s), expected), s
    # per-sample sigma: a mask, element by element
    sig = torch.tensor([0.1, 0.5, 2.0] * 21 + [0.5], dtype=torch.float64)
    d = D(x, sig)
    inside = (sig >= 0.28) & (sig <= 1.61)
    assert torch.allclose(d[inside], G(x, sig)[inside]) and torch.allclose(d[~inside], a.denoise(x, sig)[~inside])


def test_guide_not_evaluated_outside_the_interval():
    calls = []

    def guide(x, sigma):
        calls.append(sigma)
        return x
    D = guidance.autoguidance(lambda x, s: x, guide, 2.0, interval=(0.5, 1.0))
    D(torch.zeros(2, 2), 0.1), D(torch.zeros(2, 2), 0.7)
    assert calls == [0.7]


def test_truncation_scales_the_score():
    a, _, x = _pair()
    D = guidance.truncation(a.denoise, 1.4)
    assert torch.allclose((D(x, 0.3) - x) / 0.09, 1.4 * a.score(x, 0.3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_is_refused(bad):
    with pytest.raises(ValueError, match="finite"):
        guidance.autoguidance(lambda x, s: x, lambda x, s: x, bad)


@pytest.mark.parametrize("interval", [(1.0, 0.5), (0.5, 0.5), (-1.0, 1.0), (float("nan"), 1.0)])
def test_bad_interval_is_refused(interval):
    with pytest.raises(ValueError, match="interval"):
        guidance.autoguidance(lambda x, s: x, lambda x, s: x, 2.0, interval=interval)


def test_unknown_method_and_missing_guide():
    with pytest.raises(ValueError, match="unknown guidance method"):
        guidance.make("magic", lambda x, s: x)
    with pytest.raises(ValueError, match="needs a guide"):
        guidance.make("autoguidance", lambda x, s: x, None, 2.0)


def test_make_at_weight_one_is_the_main_model_itself():
    a, ab, x = _pair()
    main = a.denoise   # a bound method: a new object at each attribute access
    for method in ("cfg", "autoguidance", "truncation"):
        assert guidance.make(method, main, ab.denoise, 1.0) is main
        assert guidance.make(method, main, ab.denoise, 1.5) is not main
    # the arguments are still checked
    with pytest.raises(ValueError, match="needs a guide"):
        guidance.make("cfg", a.denoise, None, 1.0)
    with pytest.raises(ValueError, match="interval"):
        guidance.make("autoguidance", a.denoise, ab.denoise, 1.0, interval=(1.0, 0.5))


def test_negative_and_large_weights_are_allowed():
    a, ab, x = _pair()
    for w in (-1.0, 0.5, 12.0):
        d = guidance.make("cfg", a.denoise, ab.denoise, w)(x, 0.3)
        expected = ab.denoise(x, 0.3) + w * (a.denoise(x, 0.3) - ab.denoise(x, 0.3))
        assert torch.allclose(d, expected, rtol=1e-12, atol=1e-12)


# ---- EMA ---------------------------------------------------------------------
@pytest.mark.parametrize("sigma_rel", [0.005, 0.010, 0.05, 0.1, 0.2])
def test_sigma_rel_gamma_round_trip(sigma_rel):
    gamma = ema.sigma_rel_to_gamma(sigma_rel)
    assert math.isclose(ema.gamma_to_sigma_rel(gamma), sigma_rel, rel_tol=1e-10)


def test_known_gamma_values():
    # EDM2: gamma = 6.94 <-> sigma_rel ~ 0.10; gamma = 16.97 <-> sigma_rel ~ 0.05
    assert math.isclose(ema.gamma_to_sigma_rel(6.94), 0.10, abs_tol=5e-4)
    assert math.isclose(ema.gamma_to_sigma_rel(16.97), 0.05, abs_tol=5e-4)


def test_power_ema_tracks_the_power_profile():
    """With theta_t = t, the EMA approximates sum t^gamma * t / sum t^gamma."""
    net = torch.nn.Linear(1, 1, bias=False)
    tracker = ema.PowerEMA(net, [0.05])
    gamma = tracker.gammas[0]
    T = 2000
    for t in range(1, T + 1):
        with torch.no_grad():
            net.weight.fill_(float(t))
        tracker.update(net, t)
    ts = np.arange(1, T + 1, dtype=np.float64)
    expected = (ts ** gamma * ts).sum() / (ts ** gamma).sum()
    assert abs(tracker.nets[0].weight.item() - expected) / expected < 2e-3
    # and its relative width matches sigma_rel
    w = ts ** gamma / (ts ** gamma).sum()
    std = np.sqrt((w * (ts - (w * ts).sum()) ** 2).sum()) / T
    assert abs(std - 0.05) < 2e-3


def test_ema_state_round_trip():
    net = torch.nn.Linear(2, 2)
    a = ema.PowerEMA(net, [0.05, 0.1])
    for t in range(1, 6):   # past step 1 (beta = 0, every profile a copy of net): the profiles differ
        with torch.no_grad():
            net.weight.mul_(1.5).add_(t)
        a.update(net, t)
    assert not torch.equal(a[0.05].weight, a[0.1].weight)
    b = ema.PowerEMA(torch.nn.Linear(2, 2), [0.05, 0.1])
    b.load_state_dict(a.state_dict())
    for s in (0.05, 0.1):   # each profile back in its own place
        assert torch.equal(b[s].weight, a[s].weight) and torch.equal(b[s].bias, a[s].bias)
    a.update(net, 6), b.update(net, 6)   # and they go on alike
    assert all(torch.equal(p, q) for s in (0.05, 0.1) for p, q in zip(a[s].parameters(), b[s].parameters()))
