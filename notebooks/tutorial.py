"""What the tutorial notebooks share (notebook code, not part of the package): the fast/full switch, the three toy
models (trained once and cached, or loaded from a `toy reproduce` output),
and the figure conventions (labelled axes, grey-scale-safe colour maps).

    FAST = tutorial.fast_mode()            # MINI_AUTOGUIDE_FAST=1 -> True
    settings = tutorial.settings(FAST)
    nets = tutorial.models(settings)       # {"main", "guide", "uncond"}
"""
import os
from dataclasses import asdict, replace

import numpy as np
import torch

from toy2d.reproduce import Settings
from toy2d.train import load_toy, save_toy, train

FAST_ENV = "MINI_AUTOGUIDE_FAST"
TOY_DIR_ENV = "MINI_AUTOGUIDE_TOY_DIR"  # a `toy reproduce --out` folder to load models from
CACHE_ENV = "MINI_AUTOGUIDE_CACHE"      # where trained models are kept (the tests use a fresh one)
DEFAULT_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")

# Colour maps whose lightness changes monotonically: they read the same in grey.
DENSITY_CMAP = "Greys"
SIGNED_CMAP = "cividis"


def fast_mode():
    """True when MINI_AUTOGUIDE_FAST is set to anything but '' or '0'."""
    return os.environ.get(FAST_ENV, "0").strip() not in ("", "0")


def settings(fast):
    """The paper's settings, or a version small enough for CI that keeps the story.

    Fast: Settings.fast()'s choices (main 512 iterations; the guide is the
    main architecture at 1/4 of its training, since after so short a run a
    width-32 guide is too weak to help; w = 2) at batch 512 instead of 2048,
    sampling 2048 points. The models are worse than the paper's, but the
    ranking the notebooks show holds: autoguidance raises precision and
    keeps far more recall than CFG or truncation.
    """
    if not fast:
        return Settings()
    s = Settings.fast()
    s.main, s.guide, s.uncond = (replace(c, batch=512) for c in (s.main, s.guide, s.uncond))
    s.samples = 2048
    s.sweep = dict(autoguidance=[1.0, 1.5, 2.0, 3.0], cfg=[1.0, 2.0, 4.0, 6.0], truncation=[1.0, 1.2, 1.4, 2.0])
    return s


def _same(config, wanted):
    a, b = asdict(config), asdict(wanted)
    a.pop("seed"), b.pop("seed")
    return a == b


def models(settings, log=print):
    """main, guide and uncond, each loaded when a matching model exists, else trained.

    Looks in $MINI_AUTOGUIDE_TOY_DIR/models (a `toy reproduce` output) and in
    $MINI_AUTOGUIDE_CACHE (default notebooks/.cache)/<fast|full>/; a model counts as matching when its saved
    config equals the settings' (seed aside). Trained models go to the cache,
    so the notebooks after the first one start at once.
    """
    label = "full" if settings.main.iterations == Settings().main.iterations else "fast"
    cache = os.path.join(os.environ.get(CACHE_ENV) or DEFAULT_CACHE, label)
    places = [os.path.join(os.environ[TOY_DIR_ENV], "models")] if os.environ.get(TOY_DIR_ENV) else []
    nets = {}
    for i, name in enumerate(("main", "guide", "uncond")):
        wanted = replace(getattr(settings, name), seed=settings.seed * 10 + i)
        for folder in places + [cache]:
            path = os.path.join(folder, f"{name}.safetensors")
            if os.path.exists(path):
                net, config = load_toy(path)
                if _same(config, wanted):
                    nets[name] = net
                    log(f"{name}: loaded {os.path.relpath(path)}")
                    break
        else:
            log(f"{name}: training ({wanted.classes}, width {wanted.width}, {wanted.iterations} iterations, "
                f"batch {wanted.batch}) ...")
            net, _ = train(wanted)
            nets[name] = net.requires_grad_(False)
            save_toy(os.path.join(cache, f"{name}.safetensors"), net, wanted)
    return nets


# ---- figures -------------------------------------------------------------------
def style():
    """The notebooks' matplotlib style; returns pyplot."""
    import matplotlib.pyplot as plt
    plt.rcParams.update({"figure.dpi": 90, "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9,
                         "image.cmap": DENSITY_CMAP, "axes.grid": False, "legend.fontsize": 8})
    return plt


def grid_points(extent, n=160):
    """A regular n x n grid over extent = (x0_min, x0_max, x1_min, x1_max). ([n*n, 2] float32, (n, n))."""
    a = np.linspace(extent[0], extent[1], n)
    b = np.linspace(extent[2], extent[3], n)
    return torch.tensor(np.stack(np.meshgrid(a, b), -1).reshape(-1, 2), dtype=torch.float32), (n, n)


def show_logp(ax, logp, shape, extent, sigma=None, floor=8.0, title=None, colorbar=False):
    """A log-density on a grid, clipped `floor` nats below its peak, with labelled axes."""
    img = np.asarray(logp, dtype=np.float64).reshape(shape)
    im = ax.imshow(np.clip(img, img.max() - floor, None), origin="lower", extent=extent,
                   cmap=DENSITY_CMAP, aspect="equal")
    label_axes(ax)
    if title is not None or sigma is not None:
        ax.set_title((title or "log p") + ("" if sigma is None else f"  (σ = {sigma:g})"))
    if colorbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.8, label="log p (nats)")
    return im


def label_axes(ax):
    ax.set_xlabel("x₀")
    ax.set_ylabel("x₁")
