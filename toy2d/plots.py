"""Figures for the toy (matplotlib lives here, never in the library core).

Grey-scale-safe: densities in 'Greys', methods told apart by marker and line
style as well as colour. Each figure function writes a PNG and returns its Figure
(closed, so pyplot holds no reference; its Axes still hold what was drawn).
"""
import os

import numpy as np
import torch

from mini_autoguide.guidance import METHODS

from .fractal import gmm as make_gmm

STYLE = {"truth": ("#444444", "o", "-"), **{m: v.style for m, v in METHODS.items()}}  # colour, marker, line
LABEL = {"truth": "true samples", **{m: v.label for m, v in METHODS.items()}}
EXTENT = (-0.55, 1.25, -0.45, 1.35)  # where class A lives (x0 min, max, x1 min, max)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "figure.dpi": 110})
    return plt


def grid(extent=EXTENT, n=200):
    x0 = np.linspace(extent[0], extent[1], n)
    x1 = np.linspace(extent[2], extent[3], n)
    xx = np.stack(np.meshgrid(x0, x1), -1).reshape(-1, 2)
    return torch.tensor(xx, dtype=torch.float32), (n, n)


def normalized_logp(logp, shape, extent=EXTENT):
    """Normalise an unnormalised log-density over the grid (for model densities)."""
    cell = (extent[1] - extent[0]) / (shape[1] - 1) * (extent[3] - extent[2]) / (shape[0] - 1)
    return logp - (torch.logsumexp(logp, 0) + np.log(cell))


def _density(ax, logp, shape, extent=EXTENT, floor=-6):
    img = logp.reshape(shape).numpy()
    ax.imshow(np.clip(img, img.max() + floor, None), origin="lower", extent=extent, cmap="Greys",
              aspect="equal", interpolation="bilinear")
    ax.set_xlim(extent[:2]), ax.set_ylim(extent[2:])
    ax.set_xticks([]), ax.set_yticks([])


def samples_figure(path, samples, report):
    """Samples of each method over the true class-A density, metrics under each."""
    plt = _plt()
    names = ["truth", "none", "autoguidance", "cfg", "truncation"]
    fig, axes = plt.subplots(1, len(names), figsize=(2.3 * len(names), 2.75))
    xy, shape = grid()
    logp = make_gmm("A").logp(xy)
    for ax, name in zip(axes, names):
        _density(ax, logp, shape)
        x = np.asarray(samples[name])[:3000]
        color, marker, _ = STYLE[name]
        ax.scatter(x[:, 0], x[:, 1], s=0.6, c=color, marker=".", linewidths=0, alpha=0.8)
        r = report["methods"][name]
        w = f" (w={r['weight']:g})" if "weight" in r and name != "none" else ""
        ax.set_title(LABEL[name] + w)
        ax.set_xlabel(f"outliers {100 * r['outliers']:.1f}%\nprec {r['precision']:.2f}  rec {r['recall']:.2f}")
    fig.tight_layout()
    return _save(fig, path)


def guide_figure(path, nets, settings, sigma=0.05, n_traj=24):
    """Main and guide densities with score arrows, their log-ratio with its
    gradient (the direction autoguidance adds), and trajectories."""
    plt = _plt()
    from .reproduce import denoiser, sample, start_points
    xy, shape = grid(n=160)
    fig, axes = plt.subplots(1, 4, figsize=(11, 3.0))
    lp = {}
    for ax, name, title in zip(axes[:2], ("main", "guide"), ("main model", "guide (weaker)")):
        with torch.no_grad():
            lp[name] = normalized_logp(nets[name].logp(xy, sigma), shape)
        _density(ax, lp[name], shape)
        _arrows(ax, nets[name], sigma)
        ax.set_title(f"{title}: log p and score direction\n(sigma = {sigma:g})")
    ratio = (lp["main"] - lp["guide"]).reshape(shape).numpy()
    # scale colours by where class A has mass (the far field is uninformative)
    logp_true = make_gmm("A").logp(xy, sigma).reshape(shape).numpy()
    where = logp_true > logp_true.max() - 8
    lim = np.percentile(np.abs(ratio[where]), 98)
    ratio = np.where(where, ratio, np.nan)  # blank where class A has no mass
    axes[2].imshow(ratio, origin="lower", extent=EXTENT, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="equal")
    _arrows(axes[2], lambda x, s: nets["main"].score(x, s) - nets["guide"].score(x, s), sigma, color="k")
    axes[2].set_title("log p_main - log p_guide\nand its gradient (red: main > guide)")
    axes[2].set_xticks([]), axes[2].set_yticks([])
    _density(axes[3], make_gmm("A").logp(xy), shape)
    x0 = start_points(settings, n=n_traj, seed=3)
    for method in ("none", "autoguidance"):
        _, traj = sample(denoiser(method, nets, settings.weights[method]), x0, settings, record=True)
        color, _, ls = STYLE[method]
        t = traj.numpy()
        for i in range(n_traj):
            axes[3].plot(t[:, i, 0], t[:, i, 1], color=color, lw=0.6, ls=ls, alpha=0.7,
                         label=LABEL[method] if i == 0 else None)
        axes[3].scatter(t[-1, :, 0], t[-1, :, 1], s=6, color=color, zorder=3)
    axes[3].legend(loc="lower right", fontsize=7)
    axes[3].set_title("trajectories from sigma = %g" % settings.sigma_max)
    fig.tight_layout()
    return _save(fig, path)


def _arrows(ax, score_fn, sigma, color="#c03030", n=12):
    xy, shape = grid(n=n)
    with torch.no_grad():
        s = score_fn(xy, sigma) if callable(score_fn) and not hasattr(score_fn, "score") else score_fn.score(xy, sigma)
    s = s.numpy()
    # unit-length directions: the magnitudes span orders of magnitude
    s = s / (np.linalg.norm(s, axis=1, keepdims=True) + 1e-12)
    ax.quiver(xy[:, 0], xy[:, 1], s[:, 0], s[:, 1], color=color, angles="xy", scale=22, width=0.005, alpha=0.85)
    ax.set_xlim(EXTENT[:2]), ax.set_ylim(EXTENT[2:])  # quiver would widen the view


def sweep_figure(path, report):
    """Precision against recall over the guidance weight, one curve a method."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    for method in ("autoguidance", "cfg", "truncation"):
        rows = [r for r in report["sweep"] if r["method"] == method]
        color, marker, ls = STYLE[method]
        rec = [r["recall"] for r in rows]
        for ax, key in zip(axes, ("precision", "outliers")):
            ax.plot(rec, [r[key] for r in rows], color=color, marker=marker, ls=ls, ms=4, label=LABEL[method])
            for r in rows:
                ax.annotate(f"{r['weight']:g}", (r["recall"], r[key]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points", color=color)
    truth = report["methods"]["truth"]
    for ax, key in zip(axes, ("precision", "outliers")):
        ax.scatter([truth["recall"]], [truth[key]], color="k", marker="*", s=60, label="true samples", zorder=4)
        ax.set_xlabel("recall (diversity) ->")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("precision (quality) ->")
    axes[1].set_ylabel("outlier rate (<- better)")
    axes[0].legend(fontsize=7)
    axes[0].set_title("quality vs diversity over the weight w")
    axes[1].set_title("outside the 99%-mass region")
    fig.tight_layout()
    return _save(fig, path)


def seeds_figure(path, summary, methods=("none", "autoguidance", "cfg", "truncation")):
    """Each seed's outcome (toy2d.seeds summary): outliers and recall of each method at its
    headline w, one grey line a seed joining its methods, and the mean +- std over seeds."""
    from .seeds import point
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    pts = [point(summary, m) for m in methods]
    x = np.arange(len(methods))
    for ax, key, better in zip(axes, ("outliers", "recall"), ("<- better", "better ->")):
        per_seed = np.array([p["metrics"][key]["per_seed"] for p in pts])   # [methods, seeds]
        ax.plot(x, per_seed, color="#999999", lw=0.8, alpha=0.7)
        for i, (m, p) in enumerate(zip(methods, pts)):
            color, marker, _ = STYLE[m]
            s = p["metrics"][key]
            ax.errorbar([i], [s["mean"]], yerr=[s["std"]], color=color, marker=marker, ms=7, capsize=4, zorder=3)
        ax.set_xticks(x, [f"{LABEL[m]}\nw={p['weight']:g}" for m, p in zip(methods, pts)])
        ax.set_ylabel(f"{key} ({better})")
        ax.grid(alpha=0.3, axis="y")
    n = len(summary["seeds"])
    axes[0].set_title(f"outlier rate: {n} seeds (grey: one seed), mean +- std")
    axes[1].set_title("recall (coverage of the true distribution)")
    fig.tight_layout()
    return _save(fig, path)


def all_figures(outdir, nets, samples, report, settings):
    """Write samples.png, guide.png and sweep.png; returns their Figures by name."""
    return dict(samples=samples_figure(os.path.join(outdir, "samples.png"), samples, report),
                guide=guide_figure(os.path.join(outdir, "guide.png"), nets, settings),
                sweep=sweep_figure(os.path.join(outdir, "sweep.png"), report))


def _save(fig, path):
    """Write fig as a PNG and close it; returns fig (closed: pyplot lets it go, its Axes stay readable)."""
    from mini_autoguide.checkpoint import atomic_write
    import matplotlib.pyplot as plt
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)
    return fig
