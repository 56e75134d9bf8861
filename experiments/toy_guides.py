"""Which guide, robustly? The guide study over main seeds and guide seeds.

Autoguidance's effect on the toy depends on the draw: the same main model
guided by guides of one recipe that differ only in their seed lands anywhere
from a large cut in outliers to none (autoguidance, arXiv 2406.02507, Sec. 3
shows one draw). So every cell here is a statistic over (main seed, guide seed)
pairs, and a recipe is judged by how often it helps, not by its best draw.

    recipe = the guide's width, its training length (iterations) and its EMA
             length sigma_rel (EDM2, arXiv 2312.02696, Sec. 3.1)

Each main model is the one `toy reproduce --seeds` trained for that seed
(read from RUNS/seed-<k>/models/main.safetensors); its baseline (no guidance)
and the metrics' reference are the reproduction's own, so the numbers line
up with RUNS/summary.json. One training run per (width, sigma_rel, guide seed)
gives every training length: the learning rate and the power-function EMA do
not depend on the total length, so the snapshot at iteration 512 of a longer
run is exactly the 512-iteration guide. Further EMA lengths are tracked in
the same run.

    python experiments/toy_guides.py --runs runs/toy-seeds --out runs/toy-guides
    python experiments/toy_guides.py --out runs/toy-guides --table     # markdown
    python experiments/toy_guides.py --out runs/toy-guides --figure F  # one panel a w

Resumable: OUT/guides.json holds each main's no-guidance baseline and
every finished (main, guide seed, recipe, w) point; it is written after each
training run.
"""
import argparse
import copy
import json
import os
import sys
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mini_autoguide.checkpoint import write_json  # noqa: E402
from mini_autoguide.ema import PowerEMA  # noqa: E402
from mini_autoguide.seeds import parse_seeds  # noqa: E402
from toy2d.reproduce import Settings  # noqa: E402
from toy2d.sample import denoiser  # noqa: E402
from toy2d.train import ToyConfig, load_toy, train  # noqa: E402

WIDTHS = {16: (0.01,), 32: (0.01, 0.05, 0.10), 64: (0.01,)}   # width -> the EMA lengths studied at it
ITERATIONS = (256, 512, 1024)
WEIGHTS = (1.5, 2.0, 3.0)
PAPER = (32, 512, 0.01)            # the paper's guide: width 32, 512 iterations (T/8), sigma_rel 0.010
RECALL_FLOOR = 0.85                # "keeps recall"


def train_guides(width, sigma_rels, seed):
    """One guide training run -> {(iterations, sigma_rel): EMA network} at every ITERATIONS."""
    config = ToyConfig(classes="A", width=width, iterations=max(ITERATIONS), ema_sigma_rel=sigma_rels[0], seed=seed)
    ema, guides = None, {}

    def keep(t, net):
        nonlocal ema
        if ema is None:   # at t = 1 the power-function EMA is the network itself (beta = 0)
            ema = PowerEMA(net, sigma_rels)
        ema.update(net, t)
        if t in ITERATIONS:
            for s in sigma_rels:
                guides[t, s] = copy.deepcopy(ema[s]).eval().requires_grad_(False)

    train(config, callback=keep)
    return guides


def run(runs, out, mains, guide_seeds, log=print):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "guides.json")
    study = json.load(open(path)) if os.path.exists(path) else dict(baseline={}, rows=[])
    rows = study["rows"]
    done = {(r["main_seed"], r["guide_seed"], r["width"], r["ema"]) for r in rows}
    for guide_seed in guide_seeds:          # guide seed outermost: an interrupted study is balanced over mains
        for main_seed in mains:
            settings = replace(Settings(), seed=main_seed)
            report = json.load(open(os.path.join(runs, f"seed-{main_seed}", "metrics.json")))
            if report["settings"] != settings.to_json():
                raise SystemExit(f"{runs}/seed-{main_seed} was not made at the paper's settings")
            study["baseline"][str(main_seed)] = report["methods"]["none"]   # main alone, same x0 and reference
            main = load_toy(os.path.join(runs, f"seed-{main_seed}", "models", "main.safetensors"))[0]
            metrics = settings.metrics()
            x0 = settings.start_points()
            for width, sigma_rels in WIDTHS.items():
                if (main_seed, guide_seed, width, sigma_rels[-1]) in done:
                    continue
                # guide seeds live far from the reproduction's own (seed * 10 + index)
                guides = train_guides(width, sigma_rels, seed=100_000 + 1000 * main_seed + guide_seed)
                for (iterations, sigma_rel), guide in guides.items():
                    for w in WEIGHTS:
                        r = metrics(settings.sample(denoiser("autoguidance", dict(main=main, guide=guide), w), x0))
                        rows.append(dict(main_seed=main_seed, guide_seed=guide_seed, width=width,
                                         iterations=iterations, ema=sigma_rel, weight=w, **r))
                        log(f"main {main_seed} guide seed {guide_seed} width {width:2d} it {iterations:4d} "
                            f"ema {sigma_rel:.2f} w {w:.1f}: outliers {100 * r['outliers']:5.1f}% "
                            f"precision {r['precision']:.3f} recall {r['recall']:.3f}")
                for s in sigma_rels:
                    done.add((main_seed, guide_seed, width, s))
                write_json(path, study)
    return study


def cells(study):
    """Per (recipe, w): over every (main, guide seed) pair, the mean and std of
    outliers, precision and recall, of the change in outliers against the pair's
    own main model without guidance, and on how many pairs the point beats that
    baseline on outliers and on precision."""
    rows, baseline = study["rows"], {int(k): v for k, v in study["baseline"].items()}
    groups = {}
    for r in rows:
        groups.setdefault((r["width"], r["iterations"], r["ema"], r["weight"]), []).append(r)
    out = []
    for (width, iterations, ema, w), rs in sorted(groups.items()):
        cell = dict(width=width, iterations=iterations, ema=ema, weight=w, pairs=len(rs))
        for name in ("outliers", "precision", "recall"):
            v = np.array([r[name] for r in rs])
            cell[name] = dict(mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0)
        delta = np.array([r["outliers"] - baseline[r["main_seed"]]["outliers"] for r in rs])   # against its own main
        cell["outliers_change"] = dict(mean=float(delta.mean()), std=float(delta.std(ddof=1)) if len(rs) > 1 else 0.0)
        cell["fewer_outliers"] = sum(r["outliers"] < baseline[r["main_seed"]]["outliers"] for r in rs)
        cell["higher_precision"] = sum(r["precision"] > baseline[r["main_seed"]]["precision"] for r in rs)
        out.append(cell)
    none = {name: [baseline[s][name] for s in baseline] for name in ("outliers", "precision", "recall")}
    return out, none


def robust(cell_list):
    """The recipe and w that beat no guidance on outliers and precision on the most
    pairs while keeping mean recall >= RECALL_FLOOR; ties go to fewer outliers.
    None where no point keeps recall."""
    ok = [c for c in cell_list if c["recall"]["mean"] >= RECALL_FLOOR]
    if not ok:
        return None
    return max(ok, key=lambda c: (min(c["fewer_outliers"], c["higher_precision"]), -c["outliers"]["mean"]))


def table(study):
    cell_list, none = cells(study)
    best = robust(cell_list)
    lines = [f"No guidance: outliers {100 * np.mean(none['outliers']):.1f}% ± {100 * np.std(none['outliers'], ddof=1):.1f}, "
             f"precision {np.mean(none['precision']):.3f}, recall {np.mean(none['recall']):.3f} "
             f"({len(none['outliers'])} main seeds).", "",
             "| guide: width, iterations, EMA | w | outliers | change against no guidance | precision | recall "
             "| fewer outliers | higher precision |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cell_list:
        mark = " **(paper)**" if (c["width"], c["iterations"], c["ema"]) == PAPER else ""
        mark += " **(robust)**" if c is best else ""
        lines.append(f"| {c['width']}, {c['iterations']}, {c['ema']:.2f}{mark} | {c['weight']:g} "
                     f"| {100 * c['outliers']['mean']:.1f}% ± {100 * c['outliers']['std']:.1f} "
                     f"| {100 * c['outliers_change']['mean']:+.1f} ± {100 * c['outliers_change']['std']:.1f} pts "
                     f"| {c['precision']['mean']:.3f} ± {c['precision']['std']:.3f} "
                     f"| {c['recall']['mean']:.3f} ± {c['recall']['std']:.3f} "
                     f"| {c['fewer_outliers']} of {c['pairs']} | {c['higher_precision']} of {c['pairs']} |")
    if best is None:
        lines += ["", f"No recipe keeps a mean recall >= {RECALL_FLOOR}."]
    else:
        lines += ["", f"Robust recipe (most pairs better on both outliers and precision, mean recall >= {RECALL_FLOOR}): "
                  f"width {best['width']}, {best['iterations']} iterations, EMA {best['ema']:.2f}, w = {best['weight']:g}."]
    return "\n".join(lines)


def figure(path, study):
    """One panel a w: each recipe's change in outliers against the pair's own main
    model without guidance, mean (dot) and spread over pairs (bar, ± std); below
    the dashed line at 0 the guide helps. Green: mean recall >= RECALL_FLOOR;
    ringed: the paper's recipe."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cell_list, none = cells(study)
    recipes = sorted({(c["width"], c["iterations"], c["ema"]) for c in cell_list})
    fig, axes = plt.subplots(1, len(WEIGHTS), figsize=(4.2 * len(WEIGHTS), 4.2), sharey=True)
    for ax, w in zip(axes, WEIGHTS):
        for i, recipe in enumerate(recipes):
            c = next(c for c in cell_list if (c["width"], c["iterations"], c["ema"], c["weight"]) == (*recipe, w))
            color = "tab:green" if c["recall"]["mean"] >= RECALL_FLOOR else "tab:gray"
            ax.errorbar(i, 100 * c["outliers_change"]["mean"], yerr=100 * c["outliers_change"]["std"], fmt="o",
                        color=color, mec="k" if recipe == PAPER else color, capsize=3)
        ax.axhline(0, ls="--", color="k", lw=1, label="no guidance")
        ax.set_xticks(range(len(recipes)), [f"{r[0]}/{r[1]}/{r[2]:g}" for r in recipes], rotation=90, fontsize=7)
        ax.set_title(f"autoguidance w = {w:g}")
        ax.set_xlabel("guide: width / iterations / EMA sigma_rel")
    axes[0].set_ylabel("change in outliers against no guidance, % points\n(mean ± std over main x guide seeds)")
    axes[0].legend(title=f"green: mean recall >= {RECALL_FLOOR}", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/toy-seeds", help="a `toy reproduce --seeds` output directory")
    parser.add_argument("--out", required=True, help="where guides.json goes")
    parser.add_argument("--mains", default="0-3", help="main seeds (default 0-3)")
    parser.add_argument("--guide-seeds", default="0-2", help="guide seeds per main (default 0-2)")
    parser.add_argument("--table", action="store_true", help="print OUT/guides.json as a markdown table")
    parser.add_argument("--figure", metavar="PNG", help="write the outliers figure from OUT/guides.json")
    args = parser.parse_args()
    path = os.path.join(args.out, "guides.json")
    if args.table or args.figure:
        study = json.load(open(path))
        if args.table:
            print(table(study))
        if args.figure:
            figure(args.figure, study)
        return
    run(args.runs, args.out, parse_seeds(args.mains), parse_seeds(args.guide_seeds))


if __name__ == "__main__":
    main()
