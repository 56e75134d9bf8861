"""Self-checks for the course assignments (notebooks/assignments/).

Each check_* function takes the student's function, runs it on a few
inputs, compares with the package's own implementation and prints one line:

    PASS <what was checked>
    HINT <what went wrong: which input, expected vs got, what to look at>

It returns True on PASS and False otherwise. A student function that raises
(NotImplementedError while unfilled, or any bug) is reported as a HINT, never
re-raised, so an assignment notebook always runs to the end.

The checks of the generic pieces (any denoiser, any data shape) come first,
then the toy's exact mixture score.
"""
import math
import traceback

import numpy as np
import torch

from mini_autoguide import ema as ema_mod
from mini_autoguide import guidance, sampler
from toy2d.fractal import GMM, gmm as make_gmm

__all__ = ["report", "call", "compare", "check_guided", "check_heun_step", "check_sigma_steps",
           "check_ema_weights", "check_mixture_score", "small_mixture"]


# ---- the reporting machinery ------------------------------------------------
class CheckFailed(Exception):
    """Raised inside a check with the hint to print."""


def report(name, body):
    """Run body() -> success message; print PASS or HINT; return True/False."""
    try:
        message = body()
    except CheckFailed as e:
        print(f"HINT [{name}] {e}")
        return False
    print(f"PASS [{name}] {message}")
    return True


def call(fn, *args, what=None, **kwargs):
    """Call the student's fn; turn any exception into a CheckFailed with a hint."""
    what = what or f"{getattr(fn, '__name__', 'your function')}(...)"
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckFailed(f"{what} is not filled in yet (it raised NotImplementedError): "
                          "replace the `raise NotImplementedError` line with your code.") from None
    except Exception as e:  # a bug in the student's code: show where, keep the notebook going
        frame = traceback.extract_tb(e.__traceback__)[-1]
        raise CheckFailed(f"calling {what} raised {type(e).__name__}: {e} "
                          f"(line {frame.lineno}: `{(frame.line or '').strip()}`)") from None


def compare(got, expected, where, rtol=1e-5, atol=1e-6):
    """Fail with a hint unless got matches expected (shape, finiteness, value)."""
    if not torch.is_tensor(got):
        try:
            got = torch.as_tensor(np.asarray(got))
        except Exception:
            raise CheckFailed(f"{where}: expected a tensor of shape {tuple(expected.shape)}, "
                              f"got a {type(got).__name__}") from None
    expected = torch.as_tensor(expected)
    if tuple(got.shape) != tuple(expected.shape):
        raise CheckFailed(f"{where}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    got = got.detach().to(torch.float64)
    expected = expected.detach().to(torch.float64)
    if not torch.isfinite(got).all():
        i = int(torch.nonzero(~torch.isfinite(got.reshape(-1)))[0])
        raise CheckFailed(f"{where}: got a non-finite value ({got.reshape(-1)[i].item()}) at flat index {i}; "
                          f"expected {expected.reshape(-1)[i].item():.6g}")
    err = (got - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        i = int(torch.argmax(err.reshape(-1)))
        raise CheckFailed(f"{where}: expected {_fmt(expected.reshape(-1)[i])}, got {_fmt(got.reshape(-1)[i])} "
                          f"at flat index {i} (largest error {err.max().item():.3g}; "
                          f"{int(bad.sum())} of {bad.numel()} entries off)")


def _fmt(v):
    return f"{float(v):.6g}"


def _first_mismatch(candidates, got, expected):
    """The first (hint, wrong_value) whose wrong_value got matches: a recognised mistake."""
    for hint, value in candidates:
        if torch.is_tensor(got) and got.shape == value.shape and torch.allclose(
                got.to(torch.float64), value.to(torch.float64), rtol=1e-5, atol=1e-6):
            return hint
    return None


# ---- test denoisers: exact, closed form, different on purpose ----------------
def gaussian_denoiser(mean, std):
    """The exact denoiser of data ~ N(mean, std^2 I): E[y | x] for x = y + sigma n."""
    mean = torch.as_tensor(mean, dtype=torch.float64)

    def denoise(x, sigma, **kwargs):
        s2 = torch.as_tensor(sigma, dtype=x.dtype) ** 2
        if s2.ndim:
            s2 = s2.reshape(-1, *([1] * (x.ndim - 1)))
        return (std ** 2 * x + s2 * mean.to(x.dtype)) / (std ** 2 + s2)

    return denoise


def _test_points(n=6, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64)


# ---- the checks ---------------------------------------------------------------
def check_guided(student_guided):
    """student_guided(main, guide, weight) -> a denoiser D(x, sigma)."""
    def body():
        main = gaussian_denoiser([1.0, -0.5], 0.4)
        guide = gaussian_denoiser([0.2, 0.3], 0.9)
        x = _test_points()
        for w in (1.0, 0.0, 2.5, -1.0):
            for sigma in (0.3, 2.0):
                D = call(student_guided, main, guide, w, what=f"guided(main, guide, weight={w})")
                got = call(D, x, sigma, what=f"the guided denoiser (weight={w}) at sigma={sigma}")
                expected = guidance.guided(main, guide, w)(x, sigma)
                hint = _first_mismatch([
                    ("you extrapolated from the main model towards the guide: it is "
                     "D_guide + w (D_main - D_guide)", guidance.guided(guide, main, w)(x, sigma)),
                    ("you returned the main model alone: the guide's term is missing", main(x, sigma)),
                    ("you returned the guide alone", guide(x, sigma)),
                ], got, expected) if w not in (0.0, 1.0) else None
                if hint:
                    raise CheckFailed(f"weight={w}, sigma={sigma}: {hint}")
                special = {1.0: " (w = 1 must give the main model back)", 0.0: " (w = 0 must give the guide)"}
                compare(got, expected, f"weight={w}, sigma={sigma}{special.get(w, '')}")
        return "D_w = D_guide + w (D_main - D_guide) at w = 1, 0, 2.5, -1 and two noise levels"
    return report("guided denoiser", body)


def check_heun_step(student_step):
    """student_step(D, x, sigma, sigma_next) -> x at sigma_next (one Heun step)."""
    def body():
        D = gaussian_denoiser([0.7, -0.2], 0.5)
        x = _test_points() * 2.0
        for sigma, sigma_next in ((2.0, 1.0), (0.5, 0.1), (0.1, 0.0)):
            got = call(student_step, D, x, sigma, sigma_next,
                       what=f"heun_step(D, x, sigma={sigma}, sigma_next={sigma_next})")
            expected = sampler.heun_sample(D, x, torch.tensor([sigma, sigma_next]))
            euler = sampler.euler_sample(D, x, torch.tensor([sigma, sigma_next]))
            if sigma_next > 0:
                hint = _first_mismatch([("this is the Euler step: add Heun's correction, the average of the "
                                         "slopes at x and at the Euler end point", euler)], got, expected)
            else:
                hint = None if torch.isfinite(torch.as_tensor(got)).all() else (
                    "on the last step (sigma_next = 0) skip Heun's correction: the slope at sigma = 0 "
                    "divides by zero; take the Euler step alone")
            if hint:
                raise CheckFailed(f"sigma {sigma} -> {sigma_next}: {hint}")
            compare(got, expected, f"sigma {sigma} -> {sigma_next}")
        return "matches sampler.heun_sample on two inner steps and on the last step to sigma = 0"
    return report("Heun step", body)


def check_sigma_steps(student_steps):
    """student_steps(num_steps, sigma_min, sigma_max, rho) -> [num_steps + 1], ending in 0."""
    def body():
        for n, lo, hi, rho in ((32, 0.002, 80.0, 7.0), (5, 0.01, 5.0, 3.0), (2, 0.1, 1.0, 1.0)):
            where = f"num_steps={n}, sigma_min={lo}, sigma_max={hi}, rho={rho}"
            got = call(student_steps, n, lo, hi, rho, what=f"sigma_steps({where})")
            got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got)
            expected = sampler.sigma_steps(n, lo, hi, rho)
            if got.numel() == n:
                raise CheckFailed(f"{where}: got {n} values; the schedule has num_steps + 1 values, "
                                  "the last one 0 (the clean sample)")
            compare(got.reshape(-1), expected, where)
        return "rho-schedule from sigma_max to sigma_min, then 0, for three settings"
    return report("sigma schedule", body)


def check_ema_weights(student_weights):
    """student_weights(num_steps, gamma) -> [num_steps]: the weight of each step's
    parameters in the power-function EMA after num_steps updates (sums to 1)."""
    def body():
        for steps, sigma_rel in ((10, 0.1), (200, 0.05), (50, 0.2)):
            gamma = ema_mod.sigma_rel_to_gamma(sigma_rel)
            where = f"num_steps={steps}, gamma={gamma:.4g} (sigma_rel={sigma_rel})"
            got = call(student_weights, steps, gamma, what=f"ema_weights({where})")
            got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got).reshape(-1)
            expected = ema_profile(steps, sigma_rel)
            if got.shape == expected.shape and abs(float(got.sum()) - 1) > 1e-4:
                raise CheckFailed(f"{where}: your weights sum to {float(got.sum()):.6g}; an average's "
                                  "weights sum to 1")
            if got.shape == expected.shape and torch.allclose(got.double().flip(0), expected, atol=1e-7):
                raise CheckFailed(f"{where}: the weights are reversed: index 0 is the first step, which "
                                  "gets the smallest weight")
            compare(got, expected, where, rtol=1e-4, atol=1e-8)
        return "the power-EMA weights of every step, as PowerEMA applies them"
    return report("EMA profile", body)


def ema_profile(steps, sigma_rel):
    """Reference: the weights PowerEMA really gives each step, measured by
    feeding it one-hot parameters (step t sets parameter t to 1, all else 0)."""
    net = torch.nn.Linear(steps, 1, bias=False).double()
    ema = ema_mod.PowerEMA(net, [sigma_rel])
    with torch.no_grad():
        for t in range(1, steps + 1):
            net.weight.zero_()
            net.weight[0, t - 1] = 1.0
            ema.update(net, t)
    return ema.nets[0].weight.detach()[0].clone()


def relative_std(weights):
    """EDM2's sigma_rel of an EMA profile: its standard deviation over training
    time measured in units of the run's length (t / T)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    t = (torch.arange(1, len(w) + 1, dtype=torch.float64) - 0.5) / len(w)  # the middle of each step
    mean = (w * t).sum()
    return math.sqrt(float((w * (t - mean) ** 2).sum()))


# ---- the toy: the exact score of a heat-diffused Gaussian mixture ----------
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
