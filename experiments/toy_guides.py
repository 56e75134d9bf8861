"""Which guide works best? Keep a trained main model, vary the guide's width
and training length, and sweep the autoguidance weight. Resumable: finished
guides are kept in OUTDIR/guides and finished points in OUTDIR/guides.json.

    python experiments/toy_guides.py --run results/toy --outdir results/toy-guides
"""
import argparse
import json
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mini_autoguide.checkpoint import write_json  # noqa: E402
from toy2d.metrics import ToyMetrics  # noqa: E402
from toy2d.reproduce import Settings, denoiser, load_toy, sample, save_toy, start_points  # noqa: E402
from toy2d.train import ToyConfig, train  # noqa: E402

GUIDES = [(32, 128), (32, 256), (32, 512), (32, 1024), (16, 512), (64, 512), (64, 256), (16, 256)]
WEIGHTS = [1.5, 2.0, 2.5, 3.0, 4.0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a 'toy reproduce' output directory (its main model is used)")
    parser.add_argument("--outdir", required=True)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--table", action="store_true", help="print OUTDIR/guides.json as a markdown table")
    args = parser.parse_args()
    if args.table:
        print(table(os.path.join(args.outdir, "guides.json")))
        return
    os.makedirs(os.path.join(args.outdir, "guides"), exist_ok=True)
    path = os.path.join(args.outdir, "guides.json")
    done = json.load(open(path)) if os.path.exists(path) else []
    seen = {(r["width"], r["iterations"], r["weight"]) for r in done}
    settings = replace(Settings(), samples=args.samples)
    nets = {"main": load_toy(os.path.join(args.run, "models", "main.safetensors"))[0]}
    metrics = ToyMetrics("A", n_reference=args.samples, seed=12345)
    x0 = start_points(settings)
    for width, iterations in GUIDES:
        file = os.path.join(args.outdir, "guides", f"w{width}_it{iterations}.safetensors")
        if os.path.exists(file):
            nets["guide"] = load_toy(file)[0]
        else:
            config = ToyConfig(classes="A", width=width, iterations=iterations, seed=1)
            nets["guide"], _ = train(config)
            save_toy(file, nets["guide"], config)
        for w in WEIGHTS:
            if (width, iterations, w) in seen:
                continue
            r = metrics(sample(denoiser("autoguidance", nets, w), x0, settings))
            done.append(dict(width=width, iterations=iterations, weight=w, **r))
            write_json(path, done)
            print(f"guide width {width:3d} it {iterations:5d} w {w:.1f}: outliers {100 * r['outliers']:5.1f}% "
                  f"precision {r['precision']:.3f} recall {r['recall']:.3f} branch TV {r['branch_tv']:.3f}", flush=True)




def table(path):
    """Markdown: one row a guide, precision/recall/outliers at each w."""
    rows = json.load(open(path))
    guides = sorted({(r["width"], r["iterations"]) for r in rows}, key=lambda g: (g[0], g[1]))
    weights = sorted({r["weight"] for r in rows})
    out = ["| guide (width, iterations) | " + " | ".join(f"w = {w:g}" for w in weights) + " |",
           "|---|" + "---|" * len(weights)]
    for g in guides:
        cells = []
        for w in weights:
            r = next(r for r in rows if (r["width"], r["iterations"], r["weight"]) == (*g, w))
            cells.append(f"{r['precision']:.3f} / {r['recall']:.2f} / {100 * r['outliers']:.1f}%")
        out.append(f"| {g[0]}, {g[1]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
