"""Self-checks for the course assignments (notebooks/assignments/).

Each check_* function takes the student's function, runs it on a few
inputs, compares with the package's own implementation (assignment 4: with
answers written here as numbers, or with one seed re-derived by the package)
and prints one line:

    PASS <what was checked>
    HINT <what went wrong: which input, expected vs got, what to look at>

It returns True on PASS and False otherwise. A student function that raises
(NotImplementedError while unfilled, or any bug) is reported as a HINT, never
re-raised, so an assignment notebook always runs to the end.

For grading (notebooks/assignments/grade.py), each check also appends one JSON
line {"exercise": "sigma_steps", "passed": true, "line": "PASS [...] ..."} to
the file named by $MINI_AUTOGUIDE_CHECKS_RECORD when that is set; a student
sees only the PASS/HINT line.

The checks of the generic pieces (any denoiser, any data shape) come first,
then the toy's exact mixture score, then the experiment of assignment 4.
"""
import functools
import json
import math
import os
import re
import traceback

import numpy as np
import torch

from mini_autoguide import ema as ema_mod
from mini_autoguide import guidance, sampler
from toy2d.fractal import GMM, gmm as make_gmm

__all__ = ["report", "call", "compare", "check_guided", "check_heun_step", "check_sigma_steps",
           "check_ema_weights", "check_mixture_score", "small_mixture", "check_plan", "check_paired_summary",
           "check_run_seed", "check_report"]
RECORD_ENV = "MINI_AUTOGUIDE_CHECKS_RECORD"   # set by grade.py: where each check's outcome goes


# ---- the reporting machinery ------------------------------------------------
class CheckFailed(Exception):
    """Raised inside a check with the hint to print."""


_printed = []   # the lines report() printed during the check that runs now (for the record)


def report(name, body):
    """Run body() -> success message; print PASS or HINT; return True/False."""
    try:
        line, passed = f"PASS [{name}] {body()}", True
    except CheckFailed as e:
        line, passed = f"HINT [{name}] {e}", False
    except Exception as e:   # an answer of a kind the check cannot read: still a hint, never a crash
        line, passed = f"HINT [{name}] the check could not use your answer ({type(e).__name__}: {e})", False
    print(line)
    _printed.append(line)
    return passed


def exercise(check):
    """Make a check_* function an exercise that grade.py can read: after each run, where
    $MINI_AUTOGUIDE_CHECKS_RECORD names a file, append its outcome there as one JSON line."""
    name = check.__name__.removeprefix("check_")

    @functools.wraps(check)
    def run(*args, **kwargs):
        _printed.clear()
        passed = bool(check(*args, **kwargs))
        path = os.environ.get(RECORD_ENV)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(dict(exercise=name, passed=passed, line=" ".join(_printed))) + "\n")
        return passed

    return run


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
@exercise
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


@exercise
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


@exercise
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


@exercise
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


@exercise
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


# ---- assignment 4: one experiment over main-model seeds ------------------------
PLAN_KEYS = ("width", "training", "ema", "weight", "seeds", "metric")


@exercise
def check_plan(student_plan):
    """student_plan() -> dict(width, training, ema, weight, seeds, metric): the guide's recipe (its
    width, its training length as a fraction of the main model's, its EMA length sigma_rel), the
    guidance weight w, the main-model seeds and the exact metric to compare."""
    from toy2d.reproduce import METRICS

    def body():
        plan = call(student_plan, what="my_plan()")
        if not isinstance(plan, dict) or any(k not in plan for k in PLAN_KEYS):
            raise CheckFailed(f"return a dict with the keys {', '.join(PLAN_KEYS)}; got {plan!r}")
        seeds = plan["seeds"]
        if not isinstance(seeds, (list, tuple)) or not all(
                isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0 for s in seeds):
            raise CheckFailed(f"seeds must be a list of whole numbers >= 0; got {seeds!r}")
        repeated = sorted({int(s) for s in seeds if list(seeds).count(s) > 1})
        if repeated:
            raise CheckFailed(f"seed(s) {repeated} appear more than once: the same seed trains the same main "
                              "model again, so it is one draw counted twice, not a new one")
        if len(seeds) < 3:
            raise CheckFailed(f"{len(seeds)} seed(s): take at least 3. With 2 the spread rests on a single "
                              "degree of freedom, with 1 there is none")
        if plan["metric"] not in METRICS:
            raise CheckFailed(f"metric {plan['metric']!r}: choose one of {', '.join(METRICS)}")
        weight = plan["weight"]
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 1:
            raise CheckFailed(f"weight {weight!r}: autoguidance extrapolates away from the guide with w > 1 "
                              "(w = 1 is the main model alone, so both arms would be the same)")
        if not isinstance(plan["width"], (int, np.integer)) or plan["width"] < 1:
            raise CheckFailed(f"width {plan['width']!r}: the guide's width is a whole number >= 1")
        if not 0 < plan["training"] <= 1:
            raise CheckFailed(f"training {plan['training']!r}: the guide's training length is a fraction of "
                              "the main model's, in (0, 1]: a guide is a weaker version of the main model")
        try:
            ema_mod.sigma_rel_to_gamma(plan["ema"])
        except (TypeError, ValueError) as e:
            raise CheckFailed(f"ema {plan['ema']!r}: {e}") from None
        return (f"{len(seeds)} distinct seeds; metric {plan['metric']}; guide of width {plan['width']}, "
                f"{plan['training']:g} of the main model's training, EMA sigma_rel {plan['ema']:g}; w = {weight:g}")
    return report("plan", body)


# Fixed arrays and their answers, written as numbers: (unguided [S], guided [S], higher_is_better,
# differences [S], mean, std, helps, helps counted in the wrong direction, helps with ties counted)
PAIRED_CASES = [
    ([0.30, 0.25, 0.28, 0.22], [0.20, 0.27, 0.21, 0.15], False,
     [-0.10, 0.02, -0.07, -0.07], -0.055, 0.05196152422706632, 3, 1, 3),
    ([0.90, 0.80, 0.85], [0.95, 0.80, 0.75], True,
     [0.05, 0.0, -0.10], -0.01666666666666668, 0.07637626158259729, 1, 1, 2),
    ([-3.1, -2.4, -5.0, -2.9, -3.3], [-2.6, -2.5, -4.1, -2.2, -3.0], True,
     [0.5, -0.1, 0.9, 0.7, 0.3], 0.46, 0.38470768123342697, 4, 1, 4),
]
SUMMARY_KEYS = ("differences", "mean", "std", "helps")


@exercise
def check_paired_summary(student_summary):
    """student_summary(unguided [S], guided [S], higher_is_better) -> dict(differences [S], mean, std,
    helps), on the fixed arrays PAIRED_CASES."""
    def body():
        for u, g, higher, d, mean, std, helps, wrong_way, with_ties in PAIRED_CASES:
            where = f"unguided={u}, guided={g}, higher_is_better={higher}"
            got = call(student_summary, np.array(u), np.array(g), higher, what=f"paired_summary({where})")
            if not isinstance(got, dict) or any(k not in got for k in SUMMARY_KEYS):
                raise CheckFailed(f"{where}: return a dict with the keys {', '.join(SUMMARY_KEYS)}")
            diff = np.asarray(got["differences"], dtype=np.float64).reshape(-1)
            if diff.shape == (len(d),) and np.allclose(diff, -np.array(d)) and any(d):
                raise CheckFailed(f"{where}: your differences have the wrong sign: each is guided - unguided "
                                  "(what guidance changes), seed by seed")
            if diff.shape != (len(d),) or not np.allclose(diff, d, atol=1e-9):
                raise CheckFailed(f"{where}: expected the differences {d} (guided - unguided, in seed order), "
                                  f"got {np.round(diff, 6).tolist()}")
            if np.isclose(float(got["mean"]), -mean, atol=1e-9):
                raise CheckFailed(f"{where}: the mean has the wrong sign: average guided - unguided")
            if not np.isclose(float(got["mean"]), mean, atol=1e-9):
                raise CheckFailed(f"{where}: expected mean {mean:.6g}, got {float(got['mean']):.6g}")
            if np.isclose(float(got["std"]), std * math.sqrt((len(d) - 1) / len(d)), atol=1e-9):
                raise CheckFailed(f"{where}: your spread divides by S = {len(d)}, the population formula. The "
                                  f"sample standard deviation of S measured values divides by S - 1 = {len(d) - 1} "
                                  "(ddof=1): the differences scatter around their own mean, which used up one "
                                  "degree of freedom")
            if not np.isclose(float(got["std"]), std, atol=1e-9):
                raise CheckFailed(f"{where}: expected the spread {std:.6g} (the sample standard deviation of "
                                  f"the differences), got {float(got['std']):.6g}")
            if got["helps"] != helps and got["helps"] == with_ties:
                raise CheckFailed(f"{where}: a seed whose difference is 0 is not one on which guidance helps")
            if got["helps"] != helps and got["helps"] == wrong_way:
                raise CheckFailed(f"{where}: you counted the seeds on which guidance makes the metric worse: "
                                  f"here {'higher' if higher else 'lower'} is better")
            if got["helps"] != helps:
                raise CheckFailed(f"{where}: expected helps = {helps}, got {got['helps']!r}")
        return "paired differences, their mean and sample standard deviation, and the seeds where guidance helps"
    return report("paired summary", body)


def _same_samples(a, b, atol=1e-3):
    """At least 99% of the rows of a and b [N, 2] agree within atol (diverged samples count where both did)."""
    a, b = (torch.as_tensor(np.asarray(v), dtype=torch.float64) for v in (a, b))
    if a.shape != b.shape:
        return False
    rows = (((a - b).abs() <= atol) | (~torch.isfinite(a) & ~torch.isfinite(b))).all(1)
    return bool(rows.double().mean() >= 0.99)


@exercise
def check_run_seed(student_run_seed, plan, make_settings, guide_config):
    """student_run_seed(seed) -> (x_none [N, 2], x_guided [N, 2]): both arms of one main-model seed.
    Re-derives the plan's largest seed with the library (toy2d.train.train, Settings.start_points,
    toy2d.sample.denoiser) and compares the samples. plan None: sections 1 and 2 do not pass yet."""
    from toy2d.sample import denoiser
    from toy2d.train import train

    def body():
        if plan is None:
            raise CheckFailed("make the checks of sections 1 and 2 pass first: decide the plan and how you "
                              "will judge the result before the experiment runs")
        seed = max(int(s) for s in plan["seeds"])   # not seed 0: using one seed's model for all shows here
        got = call(student_run_seed, seed, what=f"run_seed({seed})")
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckFailed(f"run_seed({seed}): return the two arms' samples, (x_none, x_guided)")
        x_none, x_guided = got
        settings = make_settings(seed)
        nets = dict(main=train(settings.config("main"))[0], guide=train(guide_config(settings, plan))[0])
        x0 = settings.start_points()
        expected_none = settings.sample(denoiser("none", nets, 1.0), x0)
        expected_guided = settings.sample(denoiser("autoguidance", nets, plan["weight"]), x0)
        for name, x in (("x_none", x_none), ("x_guided", x_guided)):
            shape = tuple(np.shape(x))
            if shape != tuple(x0.shape):
                raise CheckFailed(f"run_seed({seed}): {name} has shape {shape}; expected {tuple(x0.shape)}, "
                                  "one sample per starting point of settings.start_points()")
        none_ok, guided_ok = _same_samples(x_none, expected_none), _same_samples(x_guided, expected_guided)
        if none_ok and guided_ok:
            return (f"both arms of seed {seed} re-derived: the seed's main model, its starting points, "
                    "a guide of the plan's recipe at the plan's w")
        if _same_samples(x_none, x_guided):
            raise CheckFailed(f"run_seed({seed}): both arms are the same samples: the guided arm samples "
                              f"denoiser('autoguidance', nets, w) with w = {plan['weight']:g}")
        if none_ok:
            raise CheckFailed(f"run_seed({seed}): the unguided arm matches, the guided one does not: guide the "
                              "same main model, from the same starting points, with a guide trained from "
                              "guide_config(settings, PLAN), at w = PLAN['weight']")
        if guided_ok:
            raise CheckFailed(f"run_seed({seed}): the guided arm matches, the unguided one does not: sample the "
                              "same main model alone (denoiser('none', nets, 1.0)) from the same starting points")
        raise CheckFailed(f"run_seed({seed}): neither arm matches seed {seed}'s: train the main model from "
                          "make_settings(seed).config('main') (the seed sets its weights), and start both "
                          "arms from the same settings.start_points()")
    return report("one seed, both arms", body)


# Made-up summaries the report must state: (metric, seeds, summary)
REPORT_CASES = [
    ("recall", [3, 5, 8], dict(differences=np.array([0.012, -0.034, 0.051]),
                               mean=0.009666666666666665, std=0.042548012096140675, helps=2)),
    ("outliers", [0, 1, 2, 3], dict(differences=np.array([-0.021, -0.0105, 0.004, -0.03]),
                                    mean=-0.014374999999999999, std=0.014613777745675483, helps=3)),
]
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _states(text, value):
    """Whether text prints value to 3 significant digits or more (rounded or cut): some number in it
    is within 1% of value and within one unit of its own last printed digit."""
    for token in _NUMBER.findall(text.replace("\u2212", "-")):
        mantissa, _, exponent = token.lower().partition("e")
        unit = 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))   # its last digit's place
        error = abs(float(token) - value)
        if error <= unit * (1 + 1e-9) and error <= abs(value) / 100:
            return True
    return False


def _check_report_text(text, metric, seeds, summary, where):
    if not isinstance(text, str):
        raise CheckFailed(f"{where}: return the report as a str, got a {type(text).__name__}")
    if metric not in text:
        raise CheckFailed(f"{where}: name the metric ({metric!r}) in the report")
    n, helps = len(seeds), int(summary["helps"])
    if not re.search(rf"(?<!\d){helps} of {n}(?!\d)", text):
        raise CheckFailed(f"{where}: say on how many seeds guidance helps as '{helps} of {n}'")
    for name in ("mean", "std"):
        if not _states(text, float(summary[name])):
            raise CheckFailed(f"{where}: state the {name} of the differences, {float(summary[name]):.6g}, with at "
                              "least 3 significant digits, in the metric's own units (a fraction, not a "
                              "percentage): take it from summary, type no number")


@exercise
def check_report(student_report, plan, summary):
    """student_report(metric, seeds, summary) -> str, on made-up summaries and then on the student's own
    (summary None: the experiment has not run yet)."""
    def body():
        for metric, seeds, made_up in REPORT_CASES:
            text = call(student_report, metric, list(seeds), dict(made_up), what="write_report(...)")
            _check_report_text(text, metric, seeds, made_up, f"on made-up numbers ({metric}, seeds {seeds})")
        if summary is None or plan is None:
            raise CheckFailed("your report states made-up numbers right; make the checks above pass to report "
                              "your own experiment")
        text = call(student_report, plan["metric"], list(plan["seeds"]), summary, what="write_report(...)")
        _check_report_text(text, plan["metric"], plan["seeds"], summary, "on your experiment")
        return "states the metric, the mean and spread of the paired differences and 'K of N' seeds, as given"
    return report("report", body)
