"""Markdown tables of toy results: one seed's metrics.json (written by `toy
reproduce`), or the multi-seed summaries of `toy reproduce --seeds`.

    python docs/toy_tables.py docs/results/toy_seed0.json [more.json ...]
    python docs/toy_tables.py --seeds "paper's guide=docs/results/toy_seeds.json" [label=summary.json[@w] ...]
    python docs/toy_tables.py --median-seed docs/results/toy_seeds.json
    python docs/toy_tables.py --seeds-sweep docs/results/toy_seeds.json
"""
import json
import sys

import numpy as np

from toy2d.plots import ORDER, look
from toy2d.reproduce import point

ROWS = ("truth", *ORDER)


def methods_table(report):
    out = ["| method | w | mean log p | outliers | branch TV | precision | recall |",
           "|---|---|---|---|---|---|---|"]
    for name in ROWS:
        r = report["methods"][name]
        w = f"{r['weight']:g}" if name not in ("truth", "none") else "-"
        out.append(f"| {look(name).label} | {w} | {r['mean_logp']:.2f} | {100 * r['outliers']:.1f}% | "
                   f"{r['branch_tv']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    return "\n".join(out)


def sweep_table(report):
    """One line per method: w: precision/recall/outliers, and the share of
    diverged samples (inf or NaN, counted as outliers) where there are any."""
    out = []
    for m in ORDER[1:]:
        cells = []
        for r in (r for r in report["sweep"] if r["method"] == m):
            diverged = f" ({100 * r['diverged']:.2g}% diverged)" if r.get("diverged") else ""
            cells.append(f"{r['weight']:g}: {r['precision']:.2f}/{r['recall']:.2f}/{100 * r['outliers']:.0f}%{diverged}")
        out.append(f"- **{look(m).label}** (w: precision/recall/outliers) {'; '.join(cells)}")
    return "\n".join(out)


def seeds_table(summaries):
    """[(label, summary of `toy reproduce --seeds`, w or None), ...] -> one markdown table: each method at its
    headline w, mean +- std over the seeds, and [on how many seeds it beats no guidance].
    Entries after the first are another guide recipe, or another w of autoguidance's sweep
    (w given): they add their autoguidance row."""
    out = ["| guide recipe | method | w | outliers | precision | recall | branch TV |", "|---|---|---|---|---|---|---|"]
    for i, (label, summary, weight) in enumerate(summaries):
        # the runs differ in their guide only: after the first, only autoguidance's row is new
        for name in ROWS if i == 0 else ("autoguidance",):
            p = point(summary, name, weight if name == "autoguidance" else None)
            cells = []
            for metric, scale, fmt in (("outliers", 100, "{:.1f}%"), ("precision", 1, "{:.3f}"),
                                       ("recall", 1, "{:.3f}"), ("branch_tv", 1, "{:.3f}")):
                m = p["metrics"][metric]
                better = f" [{m['beats_none']}]" if "beats_none" in m and name != "none" else ""
                cells.append(f"{fmt.format(scale * m['mean'])} ± {fmt.format(scale * m['std']).rstrip('%')}{better}")
            w = f"{p['weight']:g}" if name not in ("truth", "none") else "-"
            out.append(f"| {label} | {look(name).label} | {w} | " + " | ".join(cells) + " |")
    n = {len(s["seeds"]) for _, s, _ in summaries}
    out.append(f"\nMean ± std over {'/'.join(map(str, sorted(n)))} seeds; [k]: the seeds on which the method beats "
               "no guidance.")
    return "\n".join(out)


def seeds_sweep_table(summary):
    """Every method's sweep over w, mean +- std over the seeds [seeds better than no guidance]."""
    out = ["| method | w | outliers | precision | recall |", "|---|---|---|---|---|"]
    for name in ORDER[1:]:
        for p in sorted((p for p in summary["points"] if p["method"] == name and p["weight"] != 1.0),
                        key=lambda p: p["weight"]):
            o, pr, r = (p["metrics"][k] for k in ("outliers", "precision", "recall"))
            out.append(f"| {look(name).label} | {p['weight']:g} | {100 * o['mean']:.1f}% ± {100 * o['std']:.1f} "
                       f"[{o['beats_none']}] | {pr['mean']:.3f} ± {pr['std']:.3f} [{pr['beats_none']}] "
                       f"| {r['mean']:.3f} ± {r['std']:.3f} |")
    return "\n".join(out)


# what makes a seed typical: no guidance's and autoguidance's outliers, autoguidance's precision and recall
TYPICAL = (("none", "outliers"), ("autoguidance", "outliers"), ("autoguidance", "precision"), ("autoguidance", "recall"))


def median_seed(summary):
    """The seed nearest the median: the smallest sum over TYPICAL of |value - median| / std."""
    distance = np.zeros(len(summary["seeds"]))
    for method, metric in TYPICAL:
        p = point(summary, method)
        v = np.array(p["metrics"][metric]["per_seed"])
        distance += np.abs(v - np.median(v)) / max(v.std(ddof=1), 1e-12)
    return summary["seeds"][int(np.argmin(distance))], distance


def main():
    if sys.argv[1:2] == ["--median-seed"]:
        with open(sys.argv[2]) as f:
            summary = json.load(f)
        seed, distance = median_seed(summary)
        print(f"seed {seed} is nearest the median (distance in stds, summed over {len(TYPICAL)} metrics: "
              + ", ".join(f"seed {s} {d:.2f}" for s, d in zip(summary["seeds"], distance)) + ")")
        return
    if sys.argv[1:2] == ["--seeds-sweep"]:
        with open(sys.argv[2]) as f:
            print(seeds_sweep_table(json.load(f)))
        return
    if sys.argv[1:2] == ["--seeds"]:
        summaries = []
        for arg in sys.argv[2:]:   # LABEL=PATH, or LABEL=PATH@W for autoguidance at w = W of the sweep
            label, path = arg.split("=", 1)
            path, _, weight = path.partition("@")
            with open(path) as f:
                summaries.append((label, json.load(f), float(weight) if weight else None))
        print(seeds_table(summaries))
        return
    for path in sys.argv[1:]:
        with open(path) as f:
            report = json.load(f)
        seed = report["settings"]["seed"]
        print(f"**seed {seed}** ({report['settings']['samples']} samples, {report['seconds']['total']:.0f} s)\n")
        print(methods_table(report) + "\n")
        print(sweep_table(report) + "\n")


if __name__ == "__main__":
    main()
