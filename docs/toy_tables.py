"""Markdown tables of toy results (metrics.json files written by `toy reproduce`).

    python docs/toy_tables.py docs/results/toy_seed0.json [more.json ...]
"""
import json
import sys

ROWS = ("truth", "none", "autoguidance", "cfg", "truncation")
NAMES = {"truth": "true samples", "none": "no guidance", "autoguidance": "autoguidance",
         "cfg": "CFG", "truncation": "truncation"}


def methods_table(report):
    out = ["| method | w | mean log p | outliers | branch TV | precision | recall |",
           "|---|---|---|---|---|---|---|"]
    for name in ROWS:
        r = report["methods"][name]
        w = f"{r['weight']:g}" if name not in ("truth", "none") else "-"
        out.append(f"| {NAMES[name]} | {w} | {r['mean_logp']:.2f} | {100 * r['outliers']:.1f}% | "
                   f"{r['branch_tv']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    return "\n".join(out)


def sweep_table(report):
    """One line per method: w: precision/recall/outliers, and the share of
    diverged samples (inf or NaN, counted as outliers) where there are any."""
    out = []
    for m in ("autoguidance", "cfg", "truncation"):
        cells = []
        for r in (r for r in report["sweep"] if r["method"] == m):
            diverged = f" ({100 * r['diverged']:.2g}% diverged)" if r.get("diverged") else ""
            cells.append(f"{r['weight']:g}: {r['precision']:.2f}/{r['recall']:.2f}/{100 * r['outliers']:.0f}%{diverged}")
        out.append(f"- **{NAMES[m]}** (w: precision/recall/outliers) {'; '.join(cells)}")
    return "\n".join(out)


def main():
    for path in sys.argv[1:]:
        with open(path) as f:
            report = json.load(f)
        seed = report["settings"]["seed"]
        print(f"**seed {seed}** ({report['settings']['samples']} samples, {report['seconds']['total']:.0f} s)\n")
        print(methods_table(report) + "\n")
        print(sweep_table(report) + "\n")


if __name__ == "__main__":
    main()
