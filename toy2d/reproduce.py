"""The toy reproduction (arXiv 2406.02507, Sec. 3 and App. C): train main,
autoguidance guide and CFG guide; sample each method from identical starting
points; measure everything exactly.

    main   = class A, width 64, 4096 iterations
    guide  = class A, width 32, 512 iterations   (the weak version of main)
    uncond = classes AB, width 32, 512 iterations (CFG's "unconditional" model)
"""
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from mini_autoguide import guidance
from mini_autoguide.checkpoint import CheckpointError, read_model, save_model, write_json, write_npz
from mini_autoguide.sampler import heun_sample, sigma_steps

from .fractal import gmm as make_gmm
from .metrics import ToyMetrics
from .model import ToyMLP
from .train import ToyConfig, model_config, train

METHODS = tuple(guidance.METHODS)   # the one list of methods: every method is sampled
MODEL_KIND = "toy2d-mlp"


@dataclass
class Settings:
    """The paper's settings by default; fast() shrinks them for CI and notebooks."""
    main: ToyConfig = field(default_factory=lambda: ToyConfig(classes="A", width=64, iterations=4096))
    guide: ToyConfig = field(default_factory=lambda: ToyConfig(classes="A", width=32, iterations=512))
    uncond: ToyConfig = field(default_factory=lambda: ToyConfig(classes="AB", width=32, iterations=512))
    samples: int = 8192
    steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 5.0
    rho: float = 7.0
    weights: dict = field(default_factory=lambda: {m: v.toy_weight for m, v in guidance.METHODS.items()})
    sweep: dict = field(default_factory=lambda: dict(
        autoguidance=[1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
        cfg=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
        truncation=[1.0, 1.1, 1.2, 1.3, 1.4, 1.6, 2.0]))
    seed: int = 0

    @classmethod
    def fast(cls, seed=0):
        """About 15x less work; keeps the qualitative result. After only 512
        main iterations a width-32 guide is too weak to help (its errors are
        no longer the main model's, only larger: see experiments/toy_guides.py),
        so the fast guide is the main architecture at a quarter of the training."""
        s = cls(seed=seed)
        s.main = replace(s.main, iterations=512, batch=2048)
        s.guide = replace(s.guide, width=64, iterations=128, batch=2048)
        s.uncond = replace(s.uncond, iterations=128, batch=2048)
        s.weights = dict(s.weights, autoguidance=2.0)
        s.samples = 4096
        s.steps = 16
        s.sweep = {k: v[::2] for k, v in s.sweep.items()}
        return s


# ---- models ------------------------------------------------------------------
def save_toy(path, net, config):
    save_model(path, net, MODEL_KIND, model_config(config))


def load_toy(path):
    """Load a toy model saved by save_toy; returns (net in eval mode, ToyConfig)."""
    state, config, _ = read_model(path, MODEL_KIND)
    try:
        cfg = ToyConfig(**config)
        net = ToyMLP(cfg.width, cfg.depth, dim=cfg.dim)
        net.load_state_dict(state)
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not match their config ({e})") from None
    return net.eval().requires_grad_(False), cfg


def obtain(settings, name, outdir=None, progress=False, log=print):
    """One of the three models ("main", "guide", "uncond"), trained, or loaded
    from outdir/models when present. Returns (net in eval mode, training seconds or None)."""
    index = dict(main=0, guide=1, uncond=2)[name]
    config = replace(getattr(settings, name), seed=settings.seed * 10 + index)
    path = None if outdir is None else os.path.join(outdir, "models", f"{name}.safetensors")
    if path is not None and os.path.exists(path):
        net, saved = load_toy(path)
        if saved != config:  # never let a model of other settings stand in silently
            raise CheckpointError(f"{path} was trained with other settings than this run's "
                                  f"(use --force or another --outdir)")
        log(f"loaded {name} from {path}")
        return net, None
    t0 = time.perf_counter()
    net, _ = train(config, progress=progress)
    seconds = time.perf_counter() - t0
    log(f"trained {name} ({config.classes}, width {config.width}, {config.iterations} it) "
        f"in {seconds:.1f}s ({seconds / config.iterations * 1e3:.1f} ms/it)")
    if path is not None:
        save_toy(path, net, config)
    return net.requires_grad_(False), seconds


# ---- sampling ----------------------------------------------------------------
def denoiser(method, nets, weight, interval=None):
    """The denoiser of one method: main alone, or guided by guide / uncond."""
    guide = {"cfg": nets.get("uncond"), "autoguidance": nets.get("guide")}.get(method)
    return guidance.make(method, nets["main"], guide, weight, interval)


def start_points(settings, n=None, seed=None):
    """Exact samples of class A at sigma_max: the same for every method."""
    gen = torch.Generator().manual_seed(settings.seed * 1000 + 7 if seed is None else seed)
    return make_gmm("A").sample(n or settings.samples, sigma=settings.sigma_max, generator=gen)


def sample(D, x, settings, record=False, progress=False):
    sigmas = sigma_steps(settings.steps, settings.sigma_min, settings.sigma_max, settings.rho)
    with torch.no_grad():
        return heun_sample(D, x, sigmas, record=record, progress=progress)


# ---- the whole reproduction --------------------------------------------------
def reproduce(outdir, settings, progress=False, figures=True, log=print):
    """Train the three models, sample every method and the sweeps from the
    same starting points, measure them exactly; write metrics.json, samples/
    and the figures to outdir. Returns the report (metrics.json's content)."""
    t_start = time.perf_counter()
    os.makedirs(outdir, exist_ok=True)

    # 1. the models: main, the autoguidance guide, the CFG "unconditional" model
    nets, train_seconds = {}, {}
    for name in ("main", "guide", "uncond"):
        nets[name], seconds = obtain(settings, name, outdir, progress, log)
        if seconds is not None:
            train_seconds[name] = seconds
    t_trained = time.perf_counter()

    # 2. the exact reference: true samples of class A and the metrics' reference quantities
    metrics = ToyMetrics("A", n_reference=settings.samples, seed=settings.seed + 12345)
    samples, results = {}, {}
    truth_gen = torch.Generator().manual_seed(settings.seed * 1000 + 99)
    samples["truth"] = metrics.gmm.sample(settings.samples, generator=truth_gen)
    results["truth"] = metrics(samples["truth"])

    # 3. every method, and the sweeps over w, from the same starting points.
    # Sampling is deterministic (no churn, each point's network output its own),
    # so a (method, w) is sampled once and every method at w = 1 is main alone.
    x0 = start_points(settings)
    runs = {}

    def run(method, w):
        """(samples, seconds, metrics) of one method at one guidance weight."""
        key = ("none", 1.0) if float(w) == 1.0 else (method, float(w))
        if key not in runs:
            t0 = time.perf_counter()
            x = sample(denoiser(key[0], nets, key[1]), x0, settings)
            runs[key] = (x, time.perf_counter() - t0, metrics(x))
            if progress:
                log(f"sampled {key[0]} w={key[1]:g}")
        return runs[key]

    for method in METHODS:
        samples[method], took, measures = run(method, settings.weights[method])
        results[method] = dict(weight=settings.weights[method], seconds=took, **measures)
    sweep = [dict(method=m, weight=w, **run(m, w)[2]) for m, ws in settings.sweep.items() for w in ws]
    t_sampled = time.perf_counter()

    # 4. write the report, the samples and the figures
    seconds = dict(train=train_seconds, guides_and_sampling=t_sampled - t_trained)
    report = dict(settings=_jsonable(settings), methods=results, sweep=sweep,
                  seconds=seconds, threshold_logp=metrics.threshold,
                  torch=torch.__version__, threads=torch.get_num_threads())
    os.makedirs(os.path.join(outdir, "samples"), exist_ok=True)
    for name, x in samples.items():
        write_npz(os.path.join(outdir, "samples", f"{name}.npz"), x=np.asarray(x, dtype=np.float32))
    if figures:
        from . import plots
        plots.guide_figure(os.path.join(outdir, "guide.png"), nets, settings)
        plots.samples_figure(os.path.join(outdir, "samples.png"), samples, report)
        plots.sweep_figure(os.path.join(outdir, "sweep.png"), report)
        seconds["figures"] = time.perf_counter() - t_sampled
    seconds["total"] = total = time.perf_counter() - t_start
    write_json(os.path.join(outdir, "metrics.json"), report)
    log(format_table(report))
    log(f"total {total:.1f}s; wrote {outdir}/metrics.json, samples/, figures")
    return report


def format_table(report):
    """The metrics table as aligned text (also used for the README)."""
    head = f"{'method':<13}{'w':>6}{'mean log p':>12}{'outliers':>10}{'branch TV':>11}{'precision':>11}{'recall':>8}"
    rows = [head, "-" * len(head)]
    for name in ("truth",) + METHODS:
        r = report["methods"][name]
        w = f"{r['weight']:.2f}" if "weight" in r else "-"
        rows.append(f"{name:<13}{w:>6}{r['mean_logp']:>12.3f}{r['outliers']:>10.3f}{r['branch_tv']:>11.3f}"
                    f"{r['precision']:>11.3f}{r['recall']:>8.3f}")
    return "\n".join(rows)


def _jsonable(settings):
    return json.loads(json.dumps(asdict(settings)))
