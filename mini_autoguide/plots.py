"""Figures of sweeps: a metric against the guidance weight w, one line per method; and its
sensitivity to the EMA lengths of the main model and of the guide.

Imports matplotlib (Agg): used by the table script and the CLI only, never by
the core (`import mini_autoguide` stays free of matplotlib).
"""
import os

from .checkpoint import atomic_write


def plot_sweep(points, metrics, out, title=None, best_marker=True):
    """points: sweep points (dicts with name, weight, and the metrics); metrics: [(key, label)].

    One panel per metric, x = w, one line per run name (several snapshots of
    one run: one line each, labelled by the main/guide file). Lowest value
    marked per line when best_marker. Writes a PNG atomically; returns the Figure
    (closed: its Axes stay readable).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    lines = _lines(points)
    for ax, (key, label) in zip(axes[0], metrics):
        for name, pts in lines.items():
            pts = sorted((p for p in pts if key in p and p[key] is not None), key=lambda p: p["weight"])
            if not pts:
                continue
            w, v = [p["weight"] for p in pts], [p[key] for p in pts]
            (line,) = ax.plot(w, v, marker="o", ms=3, label=name)
            if best_marker and key.endswith("_fd"):
                i = min(range(len(v)), key=v.__getitem__)
                ax.plot(w[i], v[i], marker="*", ms=11, color=line.get_color())
        ax.set_xlabel("guidance weight w")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return fig


def plot_ema_sensitivity(points, metric, label, out, title=None):
    """Sensitivity to EMA_m, EMA_g and w, drawn as the autoguidance paper's Fig. 3 (arXiv 2406.02507, Sec. 5).

    points: sweep points with name ("autoguidance", "CFG", "no guidance"), weight, ema_main, ema_guide and
    `metric`. Three panels: the metric against EMA_m (the guide's EMA at its best), against EMA_g (the
    main's EMA at its best), one line per w; and against w, each method at its best EMA lengths.
    Writes a PNG atomically; returns the Figure (closed: its Axes stay readable).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ag = [p for p in points if p["name"] == "autoguidance"]
    best = min(ag, key=lambda p: p[metric])
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    for ax, fixed, axis in ((axes[0], "ema_guide", "ema_main"), (axes[1], "ema_main", "ema_guide")):
        for w in sorted({p["weight"] for p in ag}):
            pts = sorted((p for p in ag if p["weight"] == w and p[fixed] == best[fixed]), key=lambda p: p[axis])
            ax.plot([p[axis] for p in pts], [p[metric] for p in pts], marker="o", ms=3, label=f"autoguidance, w={w:g}")
        ax.plot(best[axis], best[metric], marker="*", ms=12, color="k")
        ax.set_xlabel(f"{'EMA_m (main model)' if axis == 'ema_main' else 'EMA_g (guide)'}, sigma_rel")
        ax.set_title(f"{'EMA_g' if fixed == 'ema_guide' else 'EMA_m'} = {best[fixed]:g}", fontsize=9)
    for name, style in (("CFG", "--"), ("no guidance", ":")):
        pts = [p for p in points if p["name"] == name]
        if pts:
            by_m = {}
            for p in pts:
                if p["ema_main"] not in by_m or p[metric] < by_m[p["ema_main"]][metric]:
                    by_m[p["ema_main"]] = p
            xs = sorted(by_m)
            axes[0].plot(xs, [by_m[x][metric] for x in xs], style, color="grey",
                         label=name if name == "no guidance" else f"{name} (best w)")
    for name, style in (("autoguidance", "-"), ("CFG", "--")):
        pts = [p for p in points if p["name"] == name]
        if not pts:
            continue
        top = min(pts, key=lambda p: p[metric])
        pts = sorted((p for p in pts if p["ema_main"] == top["ema_main"] and p["ema_guide"] == top["ema_guide"]),
                     key=lambda p: p["weight"])
        ema = f"EMA_m {top['ema_main']:g}" + (f", EMA_g {top['ema_guide']:g}" if name == "autoguidance" else "")
        axes[2].plot([p["weight"] for p in pts], [p[metric] for p in pts], style, marker="o", ms=3,
                     label=f"{name} ({ema})")
    axes[2].set_xlabel("guidance weight w")
    axes[2].set_title("each method at its best EMA lengths", fontsize=9)
    for ax in axes:
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return fig


def _lines(points):
    """Group points into lines: by run name, split further when a run has several snapshots."""
    groups = {}
    for p in points:
        groups.setdefault(p["name"], {}).setdefault((p["main"], p.get("guide")), []).append(p)
    out = {}
    for name, pairs in groups.items():
        for (main, guide), pts in pairs.items():
            label = name if len(pairs) == 1 else f"{name} ({_short(main)}" + (f" / {_short(guide)})" if guide else ")")
            out[label] = pts
    return out


def _short(path):
    return os.path.basename(path).replace("network-", "").replace(".safetensors", "") if path else "-"


__all__ = ["plot_sweep", "plot_ema_sensitivity"]
