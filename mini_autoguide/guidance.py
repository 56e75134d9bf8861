"""Guidance: wrap denoisers into a denoiser (autoguidance, arXiv 2406.02507, Sec. 3).

    D_w(x; sigma) = D_guide(x; sigma) + w (D_main(x; sigma) - D_guide(x; sigma))

Autoguidance and CFG are the same extrapolation; they differ only in the
guide: a weaker version of the main model (autoguidance) or an unconditional
model (CFG). Because D = x + sigma^2 s is affine in the score, this is also
s_w = s_guide + w (s_main - s_guide). w = 1 gives the main model back.
"""
import math
from typing import NamedTuple

import torch

from .edm import expand


class Method(NamedTuple):
    """What every figure, table and command knows of a method."""
    label: str            # its name in figures and tables
    style: tuple          # colour, marker, line style: each method differs in all three (grey-scale safe)
    toy_weight: float     # the default w on the toy: the paper's Fig. 1 (arXiv 2406.02507, Sec. 3)
    image_weight: float   # the default w for images: inside the published 1.15-2.2 (ImageNet, Table 1)


# The one list of methods. For truncation, w is the factor on the score.
METHODS = {
    "none": Method("no guidance", ("#1f77b4", "s", "--"), 1.0, 1.0),
    "cfg": Method("CFG", ("#2ca02c", "v", ":"), 4.0, 2.0),
    "autoguidance": Method("autoguidance", ("#d62728", "^", "-"), 3.0, 2.0),
    "truncation": Method("truncation", ("#9467bd", "D", "-."), 1.4, 1.4),
}


def check_method(method):
    """The one check of a method's name, against the one list of methods (METHODS)."""
    if method not in METHODS:
        raise ValueError(f"unknown guidance method {method!r}: choose one of {', '.join(METHODS)}")
    return method


# The one list of guide recipes: which weaker model guides the main one. The paper trains a
# separate guide; follow-up work makes it from the main model. Each is written as its usage says;
# the toy builds them (toy2d/guides.py). name -> (usage, the type of its value or None, what it is).
GUIDE_RECIPES = {
    "separate": ("separate", None, "a separate guide, smaller and trained less (the paper's)"),
    "snapshot": ("snapshot:K", int, "the main model's own run stopped at iteration K"),
    "ema": ("ema:S", float, "the main model's run under power-EMA length sigma_rel S"),
    "skip": ("skip:K", int, "the main network with hidden layer K skipped"),
    "sigma": ("sigma:F", float, "the main network read at F times the noise level, F > 1"),
    "decay": ("decay:L", float, "the separate guide trained with weight decay L"),
    "dropout": ("dropout:P", float, "the main model trained with dropout P, and with it on at inference"),
}


def parse_recipe(recipe):
    """'NAME' or 'NAME:VALUE' -> (name, value or None), against GUIDE_RECIPES; ValueError with the reason."""
    name, _, text = str(recipe).partition(":")
    if name not in GUIDE_RECIPES:
        raise ValueError(f"unknown guide recipe {name!r}: choose one of {', '.join(GUIDE_RECIPES)}")
    usage, kind, _ = GUIDE_RECIPES[name]
    if kind is None:
        if text:
            raise ValueError(f"guide recipe {name!r} takes no value, got {recipe!r}")
        return name, None
    try:
        value = kind(text)
        if not math.isfinite(value):
            raise ValueError
    except ValueError:
        raise ValueError(f"guide recipe {name!r} needs a finite {kind.__name__} value ({usage}), "
                         f"got {recipe!r}") from None
    return name, value


def check_weight(weight):
    weight = float(weight)
    if not math.isfinite(weight):
        raise ValueError(f"guidance weight must be a finite number, got {weight}")
    return weight


def check_interval(interval):
    """interval: None (always on) or (sigma_lo, sigma_hi) with 0 <= lo < hi."""
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    if not (math.isfinite(lo) and lo >= 0 and hi > lo):
        raise ValueError(f"guidance interval must satisfy 0 <= lo < hi, got [{lo}, {hi}]")
    return lo, hi


def guided(main, guide, weight, interval=None, guide_kwargs=None):
    """The guided denoiser D_guide + w (D_main - D_guide).

    main, guide: denoisers D(x, sigma, **kwargs). interval: optional
    (lo, hi); outside lo <= sigma <= hi the main model runs alone, and the
    guide is not evaluated at all when sigma is a scalar. guide_kwargs
    replace the call's kwargs for the guide (e.g. class_labels=None for an
    unconditional CFG guide that is the main network itself).
    """
    weight, interval = check_weight(weight), check_interval(interval)

    def denoise(x, sigma, **kwargs):
        d_main = main(x, sigma, **kwargs)
        on = _inside(sigma, interval, x)
        if on is False:
            return d_main
        d_guide = guide(x, sigma, **(kwargs if guide_kwargs is None else guide_kwargs))
        d = d_guide + weight * (d_main - d_guide)
        return d if on is True else torch.where(on, d, d_main)

    return denoise


def autoguidance(main, guide, weight, interval=None):
    """Guide the main model with a weaker version of itself (smaller, shorter-trained)."""
    return guided(main, guide, weight, interval)


def cfg(main, unconditional, weight, interval=None, unconditional_kwargs=None):
    """Classifier-free guidance: guide the conditional model with an unconditional one."""
    return guided(main, unconditional, weight, interval, unconditional_kwargs)


def truncation(main, factor):
    """Naive score truncation: scale the score by factor. D' = x + factor (D - x)."""
    factor = check_weight(factor)

    def denoise(x, sigma, **kwargs):
        return x + factor * (main(x, sigma, **kwargs) - x)

    return denoise


def make(method, main, guide=None, weight=1.0, interval=None, guide_kwargs=None):
    """One entry point for all methods: "none", "cfg", "autoguidance", "truncation".
    The arguments are checked either way; weight 1 returns main itself."""
    check_method(method)
    if method == "none":
        return main
    if method == "truncation":
        denoise = truncation(main, weight)
    elif guide is None:
        raise ValueError(f"method {method!r} needs a guide model")
    else:
        denoise = guided(main, guide, weight, interval, guide_kwargs)
    # w = 1 is the main model exactly: no guide evaluations, no rounding of the formula
    return main if float(weight) == 1.0 else denoise


def _inside(sigma, interval, x):
    """True/False for a scalar sigma, or a broadcastable mask for per-sample sigma."""
    if interval is None:
        return True
    lo, hi = interval
    if not torch.is_tensor(sigma) or sigma.ndim == 0:
        return lo <= float(sigma) <= hi
    sigma_t = sigma
    mask = (sigma_t >= lo) & (sigma_t <= hi)
    return expand(mask.to(x.dtype), x).bool()
