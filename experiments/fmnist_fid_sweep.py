"""FID against w for the kept autoguidance pair (models/fmnist), 1,000 samples a point.

The table's w were chosen by the classifier's FD on 250 samples; this sweep asks FID itself, on four
times as many, which w it prefers, and whether autoguidance's best w lies inside its grid (w = 1 is the
main model alone, the "no guidance" row at the same EMA length). Each point is measured in both spaces:
FID and the FD of a domain classifier trained here (the table's recipe, so its FD is on a similar scale,
but not the table's classifier). One point is measured twice, on two disjoint seed sets, for the
sampling noise of a 1,000-sample FID.

    python experiments/fmnist_fid_sweep.py --out runs/fmnist_fid_sweep     # about an hour on 2 CPU cores

Resumes: a point already in docs/results/fmnist_fid_sweep.json is not measured again.
"""
import argparse
import json
import os
import time

import torch

from mini_autoguide.checkpoint import write_json
from mini_autoguide.classifier import ClassifierFeatures, train_classifier
from mini_autoguide.data import load_idx_folder
from mini_autoguide.evaluate import evaluate, reference, to_nchw
from mini_autoguide.fid import Inception
from mini_autoguide.generate import generate, load_models

DATA = "/usr/share/datasets/fashion-mnist"
MAIN, GUIDE = "models/fmnist/main.safetensors", "models/fmnist/guide.safetensors"
SEED_SETS = {"0-999": range(0, 1000), "1000-1999": range(1000, 2000)}
NOISE_WEIGHT = 1.25  # measured on both seed sets
# (w, seed set): the table's w and its neighbours, then the table's w on other seeds
POINTS = [(1.0, "0-999"), (1.25, "0-999"), (1.5, "0-999"), (NOISE_WEIGHT, "1000-1999")]
STEPS = 12  # as the table


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (the classifier, reference statistics)")
    p.add_argument("--results", default="docs/results/fmnist_fid_sweep", help="JSON and Markdown, without suffix")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    test = load_idx_folder(DATA, "test")
    clf_path = os.path.join(args.out, "classifier.safetensors")
    if not os.path.isfile(clf_path):
        train_classifier(load_idx_folder(DATA, "train"), test, clf_path, progress=not args.quiet, epochs=3)
    spaces = [ClassifierFeatures(clf_path), Inception()]
    refs = {s.name: reference(s, test.images, os.path.join(args.out, "ref"), DATA, "test", progress=not args.quiet)
            for s in spaces}
    path = args.results + ".json"
    points = json.load(open(path))["points"] if os.path.isfile(path) else []
    for w, seeds in POINTS:
        if any(q["weight"] == w and q["seeds"] == seeds for q in points):
            continue
        t0 = time.time()
        method = "none" if w == 1 else "autoguidance"
        main_net, guide_net = load_models(MAIN, GUIDE if w != 1 else None, method)
        images, labels, _ = generate(main_net, guide_net, method, w, None, SEED_SETS[seeds], steps=STEPS,
                                     progress=not args.quiet)
        metrics = evaluate(to_nchw(images), spaces, refs, labels)
        points.append(dict(weight=w, seeds=seeds, seconds=round(time.time() - t0, 1), **metrics))
        print(f"w {w:g}, seeds {seeds}: FID {metrics['inception_fd']:.2f}, "
              f"classifier FD {metrics['classifier_fd']:.2f} ({time.time() - t0:.0f} s)", flush=True)
        write_json(path, dict(main=MAIN, guide=GUIDE, steps=STEPS, torch=torch.__version__,
                              threads=torch.get_num_threads(), points=points))
    write_markdown(args.results + ".md", points)


def write_markdown(path, points):
    first = sorted((q for q in points if q["seeds"] == "0-999"), key=lambda q: q["weight"])
    best = {m: min(first, key=lambda q: q[m])["weight"] for m in ("inception_fd", "classifier_fd")}
    bold = lambda q, m: f"**{q[m]:.2f}**" if q["weight"] == best[m] else f"{q[m]:.2f}"  # noqa: E731
    lines = [f"Autoguidance with the kept pair ({MAIN}, {GUIDE}), {STEPS} Heun steps, 1,000 samples a point "
             "(seeds 0-999) against the 10,000 test images; w = 1 is the main model alone. Each column's best "
             "in bold. The classifier is one trained by the table's recipe, not the table's own.", "",
             "| w | FID | Inception P / R | classifier FD | classifier P / R | class acc. |", "|---|---|---|---|---|---|"]
    lines += [f"| {q['weight']:g} | {bold(q, 'inception_fd')} | {q['inception_precision']:.3f} / "
              f"{q['inception_recall']:.3f} | {bold(q, 'classifier_fd')} | {q['classifier_precision']:.3f} / "
              f"{q['classifier_recall']:.3f} | {q['classifier_accuracy']:.3f} |" for q in first]
    pair = [q for q in points if q["weight"] == NOISE_WEIGHT]
    if len(pair) == 2:
        a, b = pair
        lines += ["", f"Sampling noise: at w = {NOISE_WEIGHT:g}, FID {a['inception_fd']:.2f} on seeds {a['seeds']} "
                  f"and {b['inception_fd']:.2f} on seeds {b['seeds']} (difference "
                  f"{abs(a['inception_fd'] - b['inception_fd']):.2f}); classifier FD {a['classifier_fd']:.2f} and "
                  f"{b['classifier_fd']:.2f}."]
    lines += ["", "Command: `python experiments/fmnist_fid_sweep.py --out runs/fmnist_fid_sweep`; "
              f"{sum(q['seconds'] for q in points) / 60:.0f} min of sampling and measuring on a 2-core AMD EPYC with AVX2 only, plus "
              "the classifier's training and the reference statistics."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
