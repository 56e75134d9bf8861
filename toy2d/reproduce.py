"""The toy reproduction (arXiv 2406.02507, Sec. 3, Fig. 1-2 and App. C), on one seed and over many.

One run trains the three models, samples every method and a sweep over w from the same
starting points, and measures everything exactly (python -m mini_autoguide toy reproduce --out DIR):

    main   = class A, width 64, 4096 iterations
    guide  = class A, width 32, 512 iterations   (the weak version of main)
    uncond = classes AB, width 32, 512 iterations (CFG's "unconditional" model)

A seed changes everything random in a run: the models' initial weights and batches, the
starting points and the metrics' reference samples. One run shows one draw of the claim; the
claim itself is about the distribution over seeds (toy reproduce --seeds 0-9): DIR/seed-<k>/
holds each seed's run (read back, not rerun, when finished, so a study resumes), and
DIR/summary.json gives, for every (method, w) measured, each metric's per-seed values, mean,
std (ddof = 1), min and max, on how many seeds the point beats no guidance, and each seed's
run time in seconds (by its own clock).
"""
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from mini_autoguide.checkpoint import CheckpointError, write_json, write_npz
from mini_autoguide.guidance import METHODS
from mini_autoguide.seeds import seed_text

from . import guides, plots
from .sample import RHO, SIGMA_MAX, SIGMA_MIN, STEPS, ToyMetrics, denoiser, sample, start_points
from .train import ToyConfig, load_toy, save_toy, train

MODELS = ("main", "guide", "uncond")
# metric -> +1 where higher is better, -1 where lower is better
METRICS = {"mean_logp": +1, "outliers": -1, "branch_tv": -1, "precision": +1, "recall": +1}


@dataclass
class Settings:
    """The configuration of one run: the paper's settings by default; fast() shrinks them for CI
    and notebooks. Its seed picks every random draw of the run (config, start_points, metrics)."""
    main: ToyConfig = field(default_factory=lambda: ToyConfig(classes="A", width=64, iterations=4096))
    guide: ToyConfig = field(default_factory=lambda: ToyConfig(classes="A", width=32, iterations=512))
    uncond: ToyConfig = field(default_factory=lambda: ToyConfig(classes="AB", width=32, iterations=512))
    samples: int = 8192
    steps: int = STEPS
    sigma_min: float = SIGMA_MIN
    sigma_max: float = SIGMA_MAX
    rho: float = RHO
    weights: dict = field(default_factory=lambda: {m: v.toy_weight for m, v in METHODS.items()})
    sweep: dict = field(default_factory=lambda: dict(
        autoguidance=[1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
        cfg=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
        truncation=[1.0, 1.1, 1.2, 1.3, 1.4, 1.6, 2.0]))
    seed: int = 0
    guide_recipe: str = "separate"   # which weaker model guides main (guidance.GUIDE_RECIPES)

    @classmethod
    def fast(cls, seed=0):
        """About 15x less work; keeps the qualitative result. After only 512 main iterations
        a width-32 guide is too weak to help (its errors differ from the main model's, not
        only in size: see experiments/toy_guides.py), so the fast guide is the main
        architecture at a quarter of the training."""
        s = cls(seed=seed)
        s.main = replace(s.main, iterations=512, batch=2048)
        s.guide = replace(s.guide, width=64, iterations=128, batch=2048)
        s.uncond = replace(s.uncond, iterations=128, batch=2048)
        s.weights = dict(s.weights, autoguidance=2.0)
        s.samples = 4096
        s.steps = 16
        s.sweep = {k: v[::2] for k, v in s.sweep.items()}
        return s

    @classmethod
    def from_json(cls, d):
        """The Settings of a run's metrics.json ("settings", as to_json wrote it)."""
        return cls(**dict(d, **{name: ToyConfig(**d[name]) for name in MODELS}))

    def to_json(self):
        """As metrics.json records it: plain JSON types."""
        return json.loads(json.dumps(asdict(self)))

    def config(self, name):
        """The ToyConfig of model "main", "guide" or "uncond", seeded for this run; for "guide",
        the one its recipe trains, or None when the recipe makes it from main without training."""
        seeded = replace(getattr(self, name), seed=self.seed * 10 + MODELS.index(name))
        if name == "main":
            return guides.main_config(self.guide_recipe, seeded)
        if name == "uncond":
            return seeded
        return guides.guide_config(self.guide_recipe, self.config("main"), seeded)

    def start_points(self, n=None, seed=None):
        """The run's starting points, the same for every method (seed: another draw). [n, 2]"""
        return start_points(n or self.samples, self.seed * 1000 + 7 if seed is None else seed, self.sigma_max)

    def sample(self, D, x, record=False, progress=False):
        """sample.sample at this run's noise levels."""
        return sample(D, x, self.steps, self.sigma_min, self.sigma_max, self.rho, record=record, progress=progress)

    def metrics(self):
        """The run's exact metrics of class-A samples (sample.ToyMetrics)."""
        return ToyMetrics("A", n_reference=self.samples, seed=self.seed + 12345)


def obtain(settings, name, outdir=None, progress=False, log=print):
    """One of the three models (MODELS), trained, or loaded from outdir/models when present.
    Returns (net in eval mode, training seconds or None)."""
    config = settings.config(name)
    path = None if outdir is None else os.path.join(outdir, "models", f"{name}.safetensors")
    if path is not None and os.path.exists(path):
        net, saved = load_toy(path)
        if saved != config:  # never let a model of other settings stand in silently
            raise CheckpointError(f"{path} was trained with other settings than this run's "
                                  f"(use --force or another --out)")
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


# ---- one run -------------------------------------------------------------------
def reproduce(outdir, settings, progress=False, figures=True, log=print):
    """Train the three models, sample every method and the sweeps from the
    same starting points, measure them exactly; write metrics.json, samples/
    and the figures to outdir. Returns the report (metrics.json's content)."""
    t_start = time.perf_counter()
    os.makedirs(outdir, exist_ok=True)

    # 1. the models: main, the autoguidance guide, the CFG "unconditional" model
    nets, train_seconds = {}, {}
    for name in MODELS:
        if settings.config(name) is None:   # a guide made from main, without training
            nets[name] = guides.weakened(settings.guide_recipe, nets["main"], settings.seed * 10 + MODELS.index(name))
            continue
        nets[name], seconds = obtain(settings, name, outdir, progress, log)
        if seconds is not None:
            train_seconds[name] = seconds
    t_trained = time.perf_counter()

    # 2. the exact reference: true samples of class A and the metrics' reference quantities
    metrics = settings.metrics()
    samples, results = {}, {}
    truth_gen = torch.Generator().manual_seed(settings.seed * 1000 + 99)
    samples["truth"] = metrics.gmm.sample(settings.samples, generator=truth_gen)
    results["truth"] = metrics(samples["truth"])

    # 3. every method, and the sweeps over w, from the same starting points.
    # Sampling is deterministic (no churn, each point's network output its own),
    # so a (method, w) is sampled once and every method at w = 1 is main alone.
    x0 = settings.start_points()
    runs = {}

    def run(method, w):
        """(samples, seconds, metrics) of one method at one guidance weight."""
        key = ("none", 1.0) if float(w) == 1.0 else (method, float(w))
        if key not in runs:
            t0 = time.perf_counter()
            x = settings.sample(denoiser(key[0], nets, key[1]), x0)
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
    report = dict(settings=settings.to_json(), methods=results, sweep=sweep,
                  seconds=seconds, threshold_logp=metrics.threshold,
                  torch=torch.__version__, threads=torch.get_num_threads())
    os.makedirs(os.path.join(outdir, "samples"), exist_ok=True)
    for name, x in samples.items():
        write_npz(os.path.join(outdir, "samples", f"{name}.npz"), x=np.asarray(x, dtype=np.float32))
    if figures:
        draw(outdir, nets, samples, report, settings)
        seconds["figures"] = time.perf_counter() - t_sampled
    seconds["total"] = total = time.perf_counter() - t_start
    write_json(os.path.join(outdir, "metrics.json"), report)
    log(format_table(report))
    log(f"total {total:.1f}s; wrote {outdir}/metrics.json, samples/, figures")
    return report


def guide_views(nets, settings, sigma=0.05, n_traj=24):
    """What the guide figure shows (plots.guide_figure): main's and guide's log-density G at
    sigma on grid(n=DENSITY_GRID) and their scores on grid(n=ARROW_GRID), and n_traj
    trajectories without and with autoguidance from the same starting points."""
    xy, _ = plots.grid(n=plots.DENSITY_GRID)
    arrows, _ = plots.grid(n=plots.ARROW_GRID)
    with torch.no_grad():
        logp = {name: nets[name].logp(xy, sigma).numpy() for name in ("main", "guide")}
        score = {name: nets[name].score(arrows, sigma).numpy() for name in ("main", "guide")}
    x0 = settings.start_points(n_traj, seed=3)
    trajectories = {m: settings.sample(denoiser(m, nets, settings.weights[m]), x0, record=True)[1].numpy()
                    for m in ("none", "autoguidance")}
    return dict(sigma=sigma, sigma_max=settings.sigma_max, logp=logp, score=score, trajectories=trajectories)


def draw(outdir, nets, samples, report, settings):
    """Write a run's samples.png, guide.png and sweep.png; returns their Figures by name."""
    return dict(samples=plots.samples_figure(os.path.join(outdir, "samples.png"), samples, report),
                guide=plots.guide_figure(os.path.join(outdir, "guide.png"), guide_views(nets, settings)),
                sweep=plots.sweep_figure(os.path.join(outdir, "sweep.png"), report))


def format_table(report):
    """A run's metrics as an aligned text table."""
    head = f"{'method':<13}{'w':>6}{'mean log p':>12}{'outliers':>10}{'branch TV':>11}{'precision':>11}{'recall':>8}"
    rows = [head, "-" * len(head)]
    for name in ("truth", *METHODS):
        r = report["methods"][name]
        w = f"{r['weight']:.2f}" if "weight" in r else "-"
        rows.append(f"{name:<13}{w:>6}{r['mean_logp']:>12.3f}{r['outliers']:>10.3f}{r['branch_tv']:>11.3f}"
                    f"{r['precision']:>11.3f}{r['recall']:>8.3f}")
    return "\n".join(rows)


# ---- many seeds ----------------------------------------------------------------
def seed_dir(outdir, seed):
    return os.path.join(outdir, f"seed-{seed}")


def reproduce_seeds(outdir, seeds, make_settings, progress=False, figures=True, log=print):
    """Run (or read back) reproduce for every seed; write DIR/summary.json and the seeds figure.

    make_settings(seed) -> Settings. Returns the summary."""
    reports = {}
    for i, seed in enumerate(seeds):
        path = os.path.join(seed_dir(outdir, seed), "metrics.json")
        settings = make_settings(seed)
        if os.path.isfile(path):
            with open(path) as f:
                reports[seed] = json.load(f)
            if Settings.from_json(reports[seed]["settings"]) != settings:
                raise ValueError(f"{path} was made with other settings than this run's: use another --out")
            log(f"seed {seed}: read back {path}")
            continue
        log(f"seed {seed} ({i + 1} of {len(seeds)})")
        reports[seed] = reproduce(seed_dir(outdir, seed), settings, progress=progress, figures=figures, log=log)
    summary = summarize(reports)
    write_json(os.path.join(outdir, "summary.json"), summary)
    if figures:
        plots.seeds_figure(os.path.join(outdir, "seeds.png"), [point(summary, m) for m in plots.ORDER])
    log(format_summary(summary))
    return summary


def summarize(reports):
    """{seed: metrics.json content} -> the summary (plain JSON).

    points: one entry per (method, w) measured on every seed, with, per metric,
    per_seed (in the order of `seeds`), mean, std, min, max, and beats_none: the
    number of seeds on which the point is better than no guidance."""
    seeds = sorted(reports)
    values = {}   # (method, w) -> {seed: metrics}
    for seed in seeds:
        report = reports[seed]
        for method, m in report["methods"].items():
            values.setdefault((method, m.get("weight")), {})[seed] = m
        for p in report["sweep"]:
            values.setdefault((p["method"], p["weight"]), {})[seed] = p
    none_key = ("none", 1.0)
    points = []
    for (method, weight), by_seed in values.items():
        if sorted(by_seed) != seeds:   # a point of some seeds only is not a statistic over the seeds
            continue
        point = dict(method=method, weight=weight, metrics={})
        for name, sign in METRICS.items():
            v = np.array([by_seed[s][name] for s in seeds], dtype=np.float64)
            stats = dict(per_seed=v.tolist(), mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                         min=float(v.min()), max=float(v.max()))
            if method != "truth" and none_key in values:
                base = np.array([values[none_key][s][name] for s in seeds])
                stats["beats_none"] = int(np.sum(sign * (v - base) > 0))
            point["metrics"][name] = stats
        points.append(point)
    headline = {m: reports[seeds[0]]["methods"][m]["weight"] for m in METHODS}
    seconds = [reports[s].get("seconds", {}).get("total") for s in seeds]   # each seed's run, by its own clock
    return dict(seeds=seeds, headline=headline, points=points, seconds=seconds)


def point(summary, method, weight=None):
    """The summary's entry of (method, w); w defaults to the method's headline weight."""
    weight = summary["headline"].get(method) if weight is None else weight
    for p in summary["points"]:
        if p["method"] == method and (method == "truth" or p["weight"] == weight):
            return p
    raise KeyError(f"no point ({method}, {weight}) in the summary")


def format_summary(summary):
    """The headline methods as mean +- std over the seeds, and on how many seeds each beats no guidance."""
    n = len(summary["seeds"])
    head = f"{'method':<13}{'w':>6}" + "".join(f"{name:>26}" for name in METRICS)
    rows = [f"{n} seeds ({seed_text(summary['seeds'])}): mean +- std [seeds better than no guidance]", head,
            "-" * len(head)]
    for method in ("truth", *METHODS):
        p = point(summary, method)
        w = "-" if method == "truth" else f"{p['weight']:.2f}"
        cells = []
        for name in METRICS:
            s = p["metrics"][name]
            better = "" if "beats_none" not in s or method == "none" else f" [{s['beats_none']}]"
            # 3 significant digits: a seed whose samples diverged has a mean log p of -1e6 or below
            cells.append(f"{s['mean']:.3g}+-{s['std']:.3g}{better}".rjust(26))
        rows.append(f"{method:<13}{w:>6}" + "".join(cells))
    return "\n".join(rows)
