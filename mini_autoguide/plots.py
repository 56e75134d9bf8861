"""Figures of sweeps: a metric against the guidance weight w, one line per method.

Imports matplotlib (Agg): used by the table script and the CLI only, never by
the core (`import mini_autoguide` stays free of matplotlib).
"""
import os

from .checkpoint import atomic_write


def plot_sweep(points, metrics, out, title=None, best_marker=True):
    """points: sweep points (dicts with name, weight, and the metrics); metrics: [(key, label)].

    One panel per metric, x = w, one line per run name (several snapshots of
    one run: one line each, labelled by the main/guide file). Lowest value
    marked per line when best_marker. Writes a PNG atomically.
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


__all__ = ["plot_sweep"]
