"""docs/img/posthoc_ema.png: post-hoc EMA (EDM2, arXiv 2312.02696, Sec. 3) as a sum of averaging profiles.

    python docs/posthoc_ema_figure.py                       # fmnist-main's snapshot schedule
    python docs/posthoc_ema_figure.py --run runs/fmnist/main --sigma-rel 0.07 --out fig.png

Top: the averaging densities of the stored snapshots over training time. Bottom: a target
profile, the weighted sum of the stored densities that reconstructs it, and each weighted term.
Formulas only: nothing is loaded but the snapshots' headers (with --run).
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mini_autoguide import presets  # noqa: E402
from mini_autoguide.checkpoint import atomic_write  # noqa: E402
from mini_autoguide.ema import sigma_rel_to_gamma  # noqa: E402
from mini_autoguide.posthoc import snapshots, solve_coefficients  # noqa: E402


def schedule(run=None, preset="fmnist-main"):
    """[(sigma_rel, kimg)] of a run's snapshots, or of the preset's schedule when run is None."""
    if run:
        return [(s["sigma_rel"], s["nimg"] / 1000) for s in snapshots(run)]
    p = presets.get(preset)["train"]
    times = np.arange(1, round(p["kimg"] / p["snapshot_kimg"]) + 1) * p["snapshot_kimg"]
    return [(s, t) for t in times for s in p["ema"]]


def density(gamma, t, tau):
    """p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], 0 after; tau [M] -> [M]."""
    return np.where(tau <= t, (gamma + 1) / t * np.clip(tau / t, 0, 1) ** gamma, 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="a training run folder (default: fmnist-main's snapshot schedule)")
    ap.add_argument("--sigma-rel", type=float, default=0.15, help="target EMA length")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img", "posthoc_ema.png"))
    args = ap.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    snaps = schedule(args.run)
    sigma_rels = sorted({s for s, _ in snaps})
    gammas, times = [sigma_rel_to_gamma(s) for s, _ in snaps], [t for _, t in snaps]
    t_r, gamma_r = max(times), sigma_rel_to_gamma(args.sigma_rel)
    x, residual = solve_coefficients(gammas, times, gamma_r, t_r)
    tau = np.linspace(0, t_r, 1200)
    colors = dict(zip(sigma_rels, plt.cm.tab10.colors))

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.6), dpi=100, sharex=True)
    for (s, t), g in zip(snaps, gammas):
        top.plot(tau, density(g, t, tau), color=colors[s], lw=1.2, label=f"stored, σ_rel {s:g}")
    handles, labels = top.get_legend_handles_labels()
    keep = {lab: h for h, lab in zip(handles, labels)}  # one legend entry per tracked profile
    top.legend(keep.values(), keep.keys(), fontsize=9, loc="upper left")
    top.set_title(f"{len(snaps)} snapshots: power-function EMA profiles at each snapshot time", fontsize=10)
    top.set_ylabel("density (1/kimg)")

    for (s, t), g, c in zip(snaps, gammas, x):
        bottom.plot(tau, c * density(g, t, tau), color=colors[s], lw=0.8, alpha=0.55)
    bottom.plot([], [], color="gray", lw=0.8, alpha=0.7, label="weighted terms x_i p_i (colours as above)")
    bottom.plot(tau, density(gamma_r, t_r, tau), color="black", lw=2.2, label=f"target, σ_rel {args.sigma_rel:g}")
    bottom.plot(tau, sum(c * density(g, t, tau) for (_, t), g, c in zip(snaps, gammas, x)), color="tab:red",
                lw=1.6, ls="--", label=f"reconstruction Σ x_i p_i (rel. L2 error {residual:.2g})")
    bottom.axhline(0, color="gray", lw=0.5)
    bottom.legend(fontsize=9, loc="upper left")
    bottom.set_title(f"target at {t_r:g} kimg and its least-squares reconstruction", fontsize=10)
    bottom.set_xlabel("training time τ (kimg)")
    bottom.set_ylabel("density (1/kimg)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9)
    fig.tight_layout()
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, format="png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
