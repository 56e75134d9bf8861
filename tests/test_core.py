"""The EDM core: preconditioning, losses, sampler, guidance, learning-rate schedule, EMA."""
import math

import numpy as np
import pytest
import torch

import toy2d
from mini_autoguide import edm, ema, guidance, sampler

pytestmark = pytest.mark.usefixtures("one_thread")   # many small ops: one thread is faster on a busy CPU


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
        x = y + sigma[:, None] * torch.randn(y.shape, generator=gen, dtype=y.dtype)
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


def test_the_default_sampler_takes_the_papers_32_steps():
    """32 Heun steps wherever a default sets the count: the schedule, the toy, image sampling, both CLIs."""
    import inspect

    from mini_autoguide import cli, generate
    from toy2d.reproduce import Settings
    assert len(sampler.sigma_steps()) == 32 + 1
    assert Settings().steps == 32
    assert inspect.signature(generate.generate).parameters["steps"].default == 32
    parser = cli.build_parser()
    assert parser.parse_args(["toy", "sample", "m", "--out", "o"]).steps == 32
    assert parser.parse_args(["sample", "m", "--out", "o"]).steps == 32


@pytest.mark.parametrize("solve,order", [(sampler.heun_sample, 2), (sampler.euler_sample, 1)])
def test_convergence_order_on_a_gaussian(solve, order):
    """For N(0, c^2) data, D = x c^2 / (c^2 + sigma^2) and the ODE's solution is
    x sqrt(c^2 + sigma'^2) / sqrt(c^2 + sigma^2). Heun's global error falls as N^-2,
    Euler's as N^-1 (EDM, arXiv 2206.00364, Sec. 3): doubling N divides it by 4 or 2,
    up to corrections O(1/N), about 5% at N = 32; we allow 15%."""
    c, sigma_max, sigma_min = 0.7, 5.0, 0.002

    def D(x, sigma):
        return x * c ** 2 / (c ** 2 + sigma ** 2)
    x0 = sigma_max * torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = x0 * math.sqrt(c ** 2 + sigma_min ** 2) / math.sqrt(c ** 2 + sigma_max ** 2)
    # stop at sigma_min: every step is then the method's own (the step to 0 is Euler's in both)
    err = [(solve(D, x0, sampler.sigma_steps(n, sigma_min, sigma_max)[:-1]) - exact).abs().max().item()
           for n in (32, 64)]
    assert abs(err[0] / err[1] / 2 ** order - 1) < 0.15, err


def _toy_ode_solution(g, x0, sigma_max, sigma_min):
    """An independent solve of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
    (EDM, arXiv 2206.00364, Eqs. 1 and 3 with sigma(t) = t): scipy's 8th-order DOP853 in ln sigma at
    tolerance 1e-8, then the sampler's last step to sigma = 0, x - sigma_min dx/dsigma = D(x; sigma_min)."""
    from scipy.integrate import solve_ivp

    def slope(log_sigma, y):   # dx / d ln sigma = x - D(x; sigma)
        x = torch.from_numpy(y.reshape(-1, 2))
        return (x - g.denoise(x, math.exp(log_sigma))).numpy().reshape(-1)
    sol = solve_ivp(slope, (math.log(sigma_max), math.log(sigma_min)), x0.numpy().reshape(-1),
                    method="DOP853", rtol=1e-8, atol=1e-8)
    assert sol.success
    return g.denoise(torch.from_numpy(sol.y[:, -1].reshape(-1, 2)), sigma_min)


def test_32_heun_steps_solve_the_toy_ode():
    """The deterministic sampler with the exact toy denoiser, against a fine independent solve of
    its ODE in float64. The paper's 32 steps land within 0.01 RMS of it (2% of the data's std 0.5);
    8 steps, or 32 first-order (Euler) steps, miss it by a factor of 5 or more."""
    g = toy2d.gmm("A")
    x0 = g.sample(32, sigma=5.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = _toy_ode_solution(g, x0, 5.0, 0.002)

    def rms_error(steps):
        x = sampler.heun_sample(g.denoise, x0, sampler.sigma_steps(steps, 0.002, 5.0, 7))
        return (x - ref).norm(dim=1).square().mean().sqrt().item()
    assert rms_error(32) < 0.01 < rms_error(8)


def test_exact_denoiser_reproduces_the_true_distribution():
    """The toy's sampling at its default settings (32 Heun steps, as checked above) with the exact
    denoiser, from exact samples at sigma_max, gives samples of the class-A mixture: mean and
    covariance against their closed forms, mean log-density against fresh exact samples.
    Tolerance: 5 standard errors of each estimate."""
    from toy2d.reproduce import Settings
    settings = Settings()
    g = toy2d.gmm("A")
    n = 512
    x = settings.sample(g.denoise, settings.start_points(n, seed=2)).double().numpy()
    w, mu, cov = g.weight, g.mu, g.cov
    mean = (w[:, None] * mu).sum(0)
    covariance = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0) - np.outer(mean, mean)
    dev = x - mean
    products = dev[:, :, None] * dev[:, None, :]
    assert (np.abs(x.mean(0) - mean) < 5 * x.std(0) / math.sqrt(n)).all()
    assert (np.abs(np.cov(x, rowvar=False) - covariance) < 5 * products.std(0) / math.sqrt(n)).all()
    truth = g.sample(4 * n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    logp_x, logp_truth = g.logp(torch.from_numpy(x)), g.logp(truth)
    se = math.sqrt(logp_x.var().item() / n + logp_truth.var().item() / (4 * n))
    assert abs(logp_x.mean().item() - logp_truth.mean().item()) < 5 * se


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


def _edm_stochastic_sampler(D, x, sigmas, churn, churn_min, churn_max, noise_scale, noise):
    """EDM's Algorithm 2 (arXiv 2206.00364) line by line: S_churn, S_tmin, S_tmax, S_noise.
    eps is drawn only where gamma > 0 (elsewhere it is multiplied by 0)."""
    steps = len(sigmas) - 1
    for t, t_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        gamma = min(churn / steps, math.sqrt(2) - 1) if churn_min <= t <= churn_max else 0.0
        t_hat = t + gamma * t
        x_hat = x + math.sqrt(t_hat ** 2 - t ** 2) * noise_scale * noise(x) if gamma > 0 else x
        d = (x_hat - D(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if t_next != 0:
            d_next = (x - D(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (d / 2 + d_next / 2)
    return x


@pytest.mark.parametrize("churn,churn_min,churn_max,noise_scale", [
    (2.0, 0.0, math.inf, 1.0),      # gamma = churn / steps = 0.25
    (40.0, 0.0, math.inf, 1.0),     # gamma capped at sqrt(2) - 1
    (5.0, 0.05, 1.0, 1.007)])       # churn only for 0.05 <= sigma <= 1, EDM's S_noise
def test_churn_follows_edm_algorithm_2(churn, churn_min, churn_max, noise_scale):
    """Every (x_hat, sigma_hat) the denoiser receives and the result, against Algorithm 2 written out
    above, with the same noise draws. Same float64 operations: equal to a few ulps (1e-12 relative)."""
    g = toy2d.gmm("A")
    x0 = g.sample(16, sigma=5.0, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sigmas = sampler.sigma_steps(8, 0.002, 5.0, 7)

    def run(solve):
        calls = []
        gen = torch.Generator().manual_seed(5)

        def D(x, sigma):
            calls.append((x.clone(), float(sigma)))
            return g.denoise(x, sigma)

        def noise(like):
            return torch.randn(like.shape, generator=gen, dtype=like.dtype)
        return solve(D, x0, sigmas, churn=churn, churn_min=churn_min, churn_max=churn_max,
                     noise_scale=noise_scale, noise=noise), calls
    x, calls = run(sampler.heun_sample)
    x_ref, calls_ref = run(_edm_stochastic_sampler)
    assert len(calls) == len(calls_ref) == 2 * 8 - 1
    for (xh, sh), (xh_ref, sh_ref) in zip(calls, calls_ref):
        assert math.isclose(sh, sh_ref, rel_tol=1e-12)
        assert torch.allclose(xh, xh_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(x, x_ref, rtol=1e-12, atol=1e-12)
    assert any(sh > s for (_, sh), s in zip(calls[::2], sigmas.tolist()))   # the churn did act


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


@pytest.mark.parametrize("w", [-1.0, 0.0, 0.5, 1.0, 2.5, 12.0])
def test_guided_denoiser_formula(w):
    """D_w = D_guide + w (D_main - D_guide) (arXiv 2406.02507, Sec. 3), computed here from the two
    denoisers' outputs, for each wrapper; truncation is x + w (D - x). w = 1 gives the main model.
    Tolerance: the same formula up to the order of float64 operations, a few ulps of (1 + |w|) |D|."""
    a, ab, x = _pair()
    s = 0.3
    d_main, d_guide = a.denoise(x, s), ab.denoise(x, s)
    expected = d_guide + w * (d_main - d_guide)
    tol = 8 * torch.finfo(torch.float64).eps * (1 + abs(w)) * max(d_main.abs().max(), d_guide.abs().max())
    for wrapper in (guidance.autoguidance, guidance.cfg, guidance.guided):
        assert (wrapper(a.denoise, ab.denoise, w)(x, s) - expected).abs().max() <= tol
    assert (guidance.autoguidance(a.denoise, ab.denoise, w, interval=(0.1, 1.0))(x, s) - expected).abs().max() <= tol
    for method in ("cfg", "autoguidance"):
        assert (guidance.make(method, a.denoise, ab.denoise, w)(x, s) - expected).abs().max() <= tol
    truncated = x + w * (d_main - x)
    assert (guidance.truncation(a.denoise, w)(x, s) - truncated).abs().max() <= tol
    assert (guidance.make("truncation", a.denoise, None, w)(x, s) - truncated).abs().max() <= tol


def test_guidance_extrapolates_the_scores_alike():
    """D = x + sigma^2 s is affine in the score s (EDM, arXiv 2206.00364, Eq. 3), so the guided
    denoiser's score is s_guide + w (s_main - s_guide), with the toy's exact scores."""
    a, ab, x = _pair()
    w, s = 2.5, 0.3
    score = (guidance.cfg(a.denoise, ab.denoise, w)(x, s) - x) / s ** 2
    assert torch.allclose(score, ab.score(x, s) + w * (a.score(x, s) - ab.score(x, s)), atol=1e-8)


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


def test_make_at_weight_one_returns_the_main_model_itself():
    """make's shortcut: at w = 1 no guide is evaluated and the main model's output is not rounded."""
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


# ---- learning-rate schedule ----------------------------------------------------
@pytest.mark.parametrize("step,expected", [
    (0, 0.01 * 8 / 80),    # warm-up: step s (from 0) counts the (s + 1) * batch images seen after it
    (4, 0.01 * 40 / 80),
    (8, 0.01 * 72 / 80),
    (9, 0.01),             # warm-up done after 80 images
    (100, 0.01),           # decay: t = s, the batches before the step; t = t_ref, the decay starts
    (400, 0.01 / 2),       # 1 / sqrt(t / t_ref) = 1 / sqrt(4)
    (2500, 0.01 / 5)])     # 1 / sqrt(25)
def test_learning_rate_schedule_by_hand(step, expected):
    """EDM2's alpha_ref / sqrt(max(t / t_ref, 1)) with a linear warm-up (arXiv 2312.02696, Sec. 2
    and App. B): batch 8, t_ref = 100 batches, warm-up over 80 images (10 steps)."""
    from mini_autoguide.edm import learning_rate
    assert learning_rate(step, 8, 0.01, 100, 80) == pytest.approx(expected, rel=1e-12)


def test_learning_rate_warm_up_and_decay_together():
    """At step 400 (t / t_ref = 4: factor 1/2) of a warm-up over 8020 images with batch 10,
    (400 + 1) * 10 / 8020 = 1/2: lr = 0.01 / 2 * 1/2. Without warm-up (0 images) only the decay."""
    from mini_autoguide.edm import learning_rate
    assert learning_rate(400, 10, 0.01, 100, 8020) == pytest.approx(0.0025, rel=1e-12)
    assert learning_rate(0, 10, 0.01, 100, 0) == 0.01
    assert learning_rate(400, 10, 0.01, 100, 0) == pytest.approx(0.005, rel=1e-12)


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
