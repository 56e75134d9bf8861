"""The toy reproduction over many seeds, and the spread of its results.

A seed changes everything random in a run: the three models' initial weights
and training batches, the starting points and the metrics' reference samples.
One run shows one draw of the claim; the claim itself is a statement about
the distribution over seeds (autoguidance, arXiv 2406.02507, Sec. 3 and Fig. 1-2).

    python -m mini_autoguide toy reproduce --outdir DIR --seeds 0-9

DIR/seed-<k>/ holds the files of a one-seed run (reproduce.reproduce); a seed
whose metrics.json exists is read back, not rerun, so an interrupted study
resumes. DIR/summary.json gives, for every (method, w) that was measured (the
headline methods and every sweep point), each metric's per-seed values, mean,
standard deviation (ddof = 1), minimum and maximum, and on how many seeds the
point beats no guidance, and each seed's run time in seconds (by its own clock).
"""
import json
import os
from dataclasses import asdict

import numpy as np

from mini_autoguide.checkpoint import write_json
from mini_autoguide.seeds import seed_text

from .reproduce import METHODS, reproduce

# metric -> +1 where higher is better, -1 where lower is better
METRICS = {"mean_logp": +1, "outliers": -1, "branch_tv": -1, "precision": +1, "recall": +1}


def seed_dir(outdir, seed):
    return os.path.join(outdir, f"seed-{seed}")


def reproduce_seeds(outdir, seeds, make_settings, progress=False, figures=True, log=print):
    """Run (or read back) reproduce for every seed; write DIR/summary.json and the seeds figure.

    make_settings(seed) -> reproduce.Settings. Returns the summary."""
    reports = {}
    for i, seed in enumerate(seeds):
        path = os.path.join(seed_dir(outdir, seed), "metrics.json")
        settings = make_settings(seed)
        if os.path.isfile(path):
            with open(path) as f:
                reports[seed] = json.load(f)
            if reports[seed]["settings"] != json.loads(json.dumps(asdict(settings))):
                raise ValueError(f"{path} was made with other settings than this run's: use another --outdir")
            log(f"seed {seed}: read back {path}")
            continue
        log(f"seed {seed} ({i + 1} of {len(seeds)})")
        reports[seed] = reproduce(seed_dir(outdir, seed), settings, progress=progress, figures=figures, log=log)
    summary = summarize(reports)
    write_json(os.path.join(outdir, "summary.json"), summary)
    if figures:
        from . import plots
        plots.seeds_figure(os.path.join(outdir, "seeds.png"), summary)
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
    for method in ("truth",) + METHODS:
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


