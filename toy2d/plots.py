"""Figures for the toy (matplotlib lives here, never in the library core).

Each figure draws the arrays it is given: a run's samples and metrics, the networks'
densities, scores and trajectories (reproduce.guide_views), a seeds study's summary. It
samples nothing and runs no network; it computes only the fractal's exact density behind
them. Grey-scale-safe: densities in 'Greys', methods told apart by marker and line style as
well as colour. Each figure writes a PNG and returns its Figure (closed, so pyplot holds no
reference; its Axes still hold what was drawn).
"""
import numpy as np
import torch

from mini_autoguide.checkpoint import atomic_write
from mini_autoguide.guidance import METHODS, Method

from .fractal import gmm as make_gmm

TRUTH = Method("true samples", ("#444444", "o", "-"), None, None)   # drawn beside the methods
EXTENT = (-0.55, 1.25, -0.45, 1.35)   # where class A lives (x0 min, max, x1 min, max)
DENSITY_GRID, ARROW_GRID = 160, 12    # the guide figure's grids: n x n points over EXTENT
ORDER = ("none", "autoguidance", "cfg", "truncation")   # the methods side by side: autoguidance next to main alone


def look(name):
    """The label and style (colour, marker, line style) of "truth" or of a method of guidance.METHODS."""
    return TRUTH if name == "truth" else METHODS[name]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "figure.dpi": 110})
    return plt


def grid(extent=EXTENT, n=200):
    """n x n points over extent, row by row from the bottom: ([n * n, 2] float32, (n, n))."""
    x0 = np.linspace(extent[0], extent[1], n)
    x1 = np.linspace(extent[2], extent[3], n)
    xx = np.stack(np.meshgrid(x0, x1), -1).reshape(-1, 2)
    return torch.tensor(xx, dtype=torch.float32), (n, n)


def normalized_logp(logp, shape, extent=EXTENT):
    """Normalise an unnormalised log-density [n * n] over the grid (for model densities)."""
    logp = torch.as_tensor(logp)
    cell = (extent[1] - extent[0]) / (shape[1] - 1) * (extent[3] - extent[2]) / (shape[0] - 1)
    return logp - (torch.logsumexp(logp, 0) + np.log(cell))


def _density(ax, logp, shape, extent=EXTENT, floor=-6):
    img = logp.reshape(shape).numpy()
    ax.imshow(np.clip(img, img.max() + floor, None), origin="lower", extent=extent, cmap="Greys",
              aspect="equal", interpolation="bilinear")
    ax.set_xlim(extent[:2]), ax.set_ylim(extent[2:])
    ax.set_xticks([]), ax.set_yticks([])


def samples_figure(path, samples, report):
    """Samples of each method over the true class-A density, metrics under each.
    samples: name -> [N, 2]; report: a run's metrics.json content."""
    plt = _plt()
    names = ("truth", *ORDER)
    fig, axes = plt.subplots(1, len(names), figsize=(2.3 * len(names), 2.75))
    xy, shape = grid()
    logp = make_gmm("A").logp(xy)
    for ax, name in zip(axes, names):
        _density(ax, logp, shape)
        x = np.asarray(samples[name])[:3000]
        ax.scatter(x[:, 0], x[:, 1], s=0.6, c=look(name).style[0], marker=".", linewidths=0, alpha=0.8)
        r = report["methods"][name]
        w = f" (w={r['weight']:g})" if "weight" in r and name != "none" else ""
        ax.set_title(look(name).label + w)
        ax.set_xlabel(f"outliers {100 * r['outliers']:.1f}%\nprec {r['precision']:.2f}  rec {r['recall']:.2f}")
    return _save(fig, path)


def guide_figure(path, views):
    """Main and guide densities with score arrows, their log-ratio with its gradient (the
    direction autoguidance adds), and trajectories without and with autoguidance.

    views (reproduce.guide_views): sigma; logp: {"main", "guide"} -> G at sigma on
    grid(n=DENSITY_GRID), [DENSITY_GRID ** 2]; score: {"main", "guide"} -> their scores on
    grid(n=ARROW_GRID), [ARROW_GRID ** 2, 2]; trajectories: {"none", "autoguidance"} -> [steps + 1, K, 2]
    from the same K starting points at sigma_max."""
    plt = _plt()
    sigma, score = views["sigma"], views["score"]
    xy, shape = grid(n=DENSITY_GRID)
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.0))
    lp = {}
    for ax, name, title in zip(axes[:2], ("main", "guide"), ("main model", "guide (weaker)")):
        lp[name] = normalized_logp(views["logp"][name], shape)
        _density(ax, lp[name], shape)
        _arrows(ax, score[name])
        ax.set_title(f"{title}: log p and score direction\n(sigma = {sigma:g})")
    ratio = (lp["main"] - lp["guide"]).reshape(shape).numpy()
    # scale colours by where class A has mass (the far field is uninformative)
    logp_true = make_gmm("A").logp(xy, sigma).reshape(shape).numpy()
    where = logp_true > logp_true.max() - 8
    lim = np.percentile(np.abs(ratio[where]), 98)
    ratio = np.where(where, ratio, np.nan)  # blank where class A has no mass
    axes[2].imshow(ratio, origin="lower", extent=EXTENT, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="equal")
    _arrows(axes[2], score["main"] - score["guide"], color="k")
    axes[2].set_title("log p_main - log p_guide\nand its gradient (red: main > guide)")
    axes[2].set_xticks([]), axes[2].set_yticks([])
    _density(axes[3], make_gmm("A").logp(xy), shape)
    for method, t in views["trajectories"].items():
        color, _, ls = look(method).style
        for i in range(t.shape[1]):
            axes[3].plot(t[:, i, 0], t[:, i, 1], color=color, lw=0.6, ls=ls, alpha=0.7,
                         label=look(method).label if i == 0 else None)
        axes[3].scatter(t[-1, :, 0], t[-1, :, 1], s=6, color=color, zorder=3)
    axes[3].legend(loc="lower right", fontsize=7)
    axes[3].set_title("trajectories from sigma = %g" % views["sigma_max"])
    return _save(fig, path)


def _arrows(ax, score, color="#c03030"):
    """Score directions [ARROW_GRID ** 2, 2] at grid(n=ARROW_GRID), drawn at unit length:
    the magnitudes span orders of magnitude."""
    xy, _ = grid(n=ARROW_GRID)
    s = score / (np.linalg.norm(score, axis=1, keepdims=True) + 1e-12)
    ax.quiver(xy[:, 0], xy[:, 1], s[:, 0], s[:, 1], color=color, angles="xy", scale=22, width=0.005, alpha=0.85)
    ax.set_xlim(EXTENT[:2]), ax.set_ylim(EXTENT[2:])  # quiver would widen the view


def sweep_figure(path, report):
    """Precision against recall over the guidance weight, one curve a method.
    report: a run's metrics.json content."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for method in ORDER[1:]:
        rows = [r for r in report["sweep"] if r["method"] == method]
        color, marker, ls = look(method).style
        rec = [r["recall"] for r in rows]
        for ax, key in zip(axes, ("precision", "outliers")):
            ax.plot(rec, [r[key] for r in rows], color=color, marker=marker, ls=ls, ms=4, label=look(method).label)
            for r in rows:
                ax.annotate(f"{r['weight']:g}", (r["recall"], r[key]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points", color=color)
    truth = report["methods"]["truth"]
    for ax, key in zip(axes, ("precision", "outliers")):
        ax.scatter([truth["recall"]], [truth[key]], color="k", marker="*", s=60, label=TRUTH.label, zorder=4)
        ax.set_xlabel("recall (diversity) ->")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("precision (quality) ->")
    axes[1].set_ylabel("outlier rate (<- better)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("quality vs diversity over the weight w")
    axes[1].set_title("outside the 99%-mass region")
    return _save(fig, path)


def seeds_figure(path, points):
    """Each seed's outcome: outliers and recall of each method at its headline w, one grey
    line a seed joining its methods, and the mean +- std over the seeds.
    points: the seeds summary's entries (reproduce.point) of the methods shown, in order."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    x = np.arange(len(points))
    for ax, key, better in zip(axes, ("outliers", "recall"), ("<- better", "better ->")):
        per_seed = np.array([p["metrics"][key]["per_seed"] for p in points])   # [methods, seeds]
        ax.plot(x, per_seed, color="#999999", lw=0.8, alpha=0.7)
        for i, p in enumerate(points):
            color, marker, _ = look(p["method"]).style
            s = p["metrics"][key]
            ax.errorbar([i], [s["mean"]], yerr=[s["std"]], color=color, marker=marker, ms=7, capsize=4, zorder=3)
        ax.set_xticks(x, [f"{look(p['method']).label}\nw={p['weight']:g}" for p in points])
        ax.set_ylabel(f"{key} ({better})")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_title(f"outlier rate: {per_seed.shape[1]} seeds (grey: one seed), mean +- std")
    axes[1].set_title("recall (coverage of the true distribution)")
    return _save(fig, path)


def frontier_figure(path, curves):
    """Outliers against recall and against precision, one curve a method over its strength w, each
    point the mean over seeds with +- std bars. curves: [dict(label, style (colour, marker, line),
    weights, and for "outliers", "recall", "precision": dict(mean=[...], std=[...]) over weights)]."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key in zip(axes, ("recall", "precision")):
        for c in curves:
            color, marker, line = c["style"]
            o, m = c["outliers"], c[key]
            # bars clipped to the metrics' range [0, 1]
            xerr = [np.minimum(o["std"], o["mean"]), np.minimum(o["std"], 1 - np.array(o["mean"]))]
            yerr = [np.minimum(m["std"], m["mean"]), np.minimum(m["std"], 1 - np.array(m["mean"]))]
            ax.errorbar(o["mean"], m["mean"], xerr=xerr, yerr=yerr, color=color, marker=marker, ls=line,
                        ms=5, capsize=2, lw=1.2, elinewidth=0.6, alpha=0.9, label=c["label"])
            ax.annotate(f"w={c['weights'][-1]:g}", (o["mean"][-1], m["mean"][-1]), fontsize=7, color=color,
                        textcoords="offset points", xytext=(4, 2))
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("outlier rate (<- better)")
        ax.set_ylabel(f"{key} (better ->)")
        ax.grid(alpha=0.3)
    axes[0].set_title("each method over its strength w: mean +- std over seeds")
    axes[1].legend(fontsize=7, loc="lower left")
    return _save(fig, path)


def _save(fig, path):
    """Lay fig out, write it as a PNG and close it; returns fig (closed: pyplot lets it go, its Axes
    stay readable)."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)
    return fig
