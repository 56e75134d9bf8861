"""The paper's Table 1 in small: Fashion-MNIST 32x32, class-conditional, on a CPU.

Top to bottom: train the domain classifier and the four denoisers; compute the reference statistics;
choose EMA_m, EMA_g (the EMA lengths of the main model and the guide) and w for no guidance, CFG and
autoguidance by a post-hoc EMA sweep (EDM2, arXiv 2312.02696, Sec. 3; autoguidance, arXiv 2406.02507,
Sec. 5); sweep w for every row; measure each row at its best setting on fresh seeds (FID, the classifier's
FD, precision/recall, class accuracy); compare the EMA lengths fixed before training with those chosen.

    python experiments/fmnist_table.py --out runs/fmnist_table --threads 2   # the full table (hours)
    python experiments/fmnist_table.py --mini --out runs/fmnist_table_mini   # the same pipeline in minutes

OUT holds the work: the classifier, the denoisers' runs (models/<run>/), post-hoc EMA reconstructions
(posthoc/<run>/), reference statistics (ref/), the figure's panels. RESULTS (docs/results; OUT/results
with --mini) holds the measurements (fmnist_*.json) and the tables and plots made from them. Resuming: a
model already trained (its run's done.json) or rebuilt is not made again, a sweep point or row already in
its JSON file is not measured again (remove it there to measure it again), and the side-by-side figure is
drawn only where missing. Each JSON file is rewritten after each measurement.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mini_autoguide.checkpoint import atomic_write, parse_snapshot_name, snapshot_name, write_json
from mini_autoguide.classifier import ClassifierFeatures, train_classifier
from mini_autoguide.data import load_idx_folder
from mini_autoguide.evaluate import evaluate, reference, to_nchw
from mini_autoguide.fid import Inception
from mini_autoguide.generate import generate, load_models
from mini_autoguide.image_files import make_grid, save_png, side_by_side
from mini_autoguide.posthoc import reconstruct, save_reconstruction
from mini_autoguide.progress import progress_bar
from mini_autoguide.seeds import seed_text
from mini_autoguide.train import train

DATA = "/usr/share/datasets/fashion-mnist"
INTERVAL = [0.28, 1.61]  # the paper's FID-optimal band for 32 steps (EDM2-XXL); not re-tuned here
# Sizes (see docs/eval.md). T = main training length in thousands of images; guides at T/8.
CONFIGS = {
    # fp32 throughout, as the reference: "auto" would train in bf16 on a CPU with AVX-512 BF16 and so
    # give another machine's table other models (bf16 is the faster choice there, not the exact one)
    "full": dict(main="fmnist-s", small="fmnist-xs", kimg=64, snapshots=128, precision="fp32", classifier=dict(epochs=3),
                 steps=12, batch=64, compile_final=True, sweep_samples=250, eval_samples=5000, ref_images=None,
                 cfg_weights=[1.5, 2.0, 2.5, 3.0, 4.0], ag_weights=[1.25, 1.5, 2.0, 2.5, 3.0, 4.0],
                 ema_main=[0.02, 0.03, 0.05, 0.10, 0.15], ema_guide=[0.03, 0.05, 0.10],
                 ema_ag_weights=[1.25, 1.5, 2.0], ema_cfg_weights=[2.0, 2.5, 3.0]),
    "mini": dict(main="tiny", small="tiny", kimg=0.512, snapshots=32, precision="fp32", classifier=dict(epochs=2, limit=2000, channels=[8, 16, 32]),
                 steps=6, sweep_samples=24, eval_samples=32, ref_images=200,
                 cfg_weights=[1.0, 2.0], ag_weights=[1.0, 2.0],
                 ema_main=[0.075, 0.10], ema_guide=[0.05, 0.075], ema_ag_weights=[2.0], ema_cfg_weights=[2.0]),
}
FRACTION = 8  # the guide's training length: T / 8, as the paper's ImageNet-64 recipe
ROWS = [dict(zip(("name", "method", "main", "guide", "paper", "interval"), row)) for row in (  # main, guide: model roles
    # paper: the setting of arXiv 2406.02507's Table 1 (or Sec. 5's ablation) that the row imitates, and its FID
    ("no guidance", "none", "main", None, "ImageNet-64 EDM2-S, no guidance: 1.58"),
    ("CFG", "cfg", "main", "uncond", "ImageNet-64 EDM2-S + CFG: 1.48 (w 1.15)"),
    ("CFG + interval", "cfg", "main", "uncond", "ImageNet-512 EDM2-S + guidance interval: 1.68", INTERVAL),
    ("autoguidance", "autoguidance", "main", "small@T/8", "ImageNet-64 EDM2-S + autoguidance, XS guide at T/8: 1.01 (w 1.70)"),
    ("ablation: guide trained less only", "autoguidance", "main", "main@T/8", "ImageNet-512 EDM2-S, S guide at T/16: 1.51"),
    ("ablation: guide smaller only", "autoguidance", "main", "small@T", "ImageNet-512 EDM2-S, XS guide at T: 2.13"),
    ("unconditional", "none", "uncond", None, "ImageNet-512 EDM2-S unconditional: 11.67"),
    ("unconditional + autoguidance", "autoguidance", "uncond", "uncond-small@T/8",
     "ImageNet-512 EDM2-S unconditional + autoguidance: 3.86 (w 2.85)"))]
EMA_ROWS = ("no guidance", "CFG", "autoguidance")  # the rows whose EMA lengths (and w) post-hoc EMA chooses
TRACKED = dict(ema_main=0.10, ema_guide=0.05)  # the EMA lengths fixed before training
FIGURE_SEEDS = range(40)  # four samples of each class, a class per column
KEEP = ("name", "method", "weight", "ema_main", "ema_guide", "classifier_fd", "classifier_accuracy", "seconds")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (models, reference statistics); resumed if present")
    p.add_argument("--mini", action="store_true", help="tiny models and few samples: the pipeline in minutes")
    p.add_argument("--data", default=DATA, help="Fashion-MNIST IDX folder")
    p.add_argument("--results", help="measurements, tables, plots (default docs/results; OUT/results with --mini)")
    p.add_argument("--no-fid", action="store_true", help="skip Inception (FID) in the final rows")
    p.add_argument("--device", default="cpu", help="where the final rows sample and run Inception (cuda: TF32 off)")
    p.add_argument("--batch", type=int, help="the final rows' sampling batch (default 64; the noise is per seed)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a loaded machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):  # float32 as on the CPU: TF32 would round convolutions' inputs to 10 bits
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    if not os.path.isdir(args.data):
        sys.exit(f"error: Fashion-MNIST not found at {args.data} (apt-get install dataset-fashion-mnist)")
    cfg = CONFIGS["mini" if args.mini else "full"]
    folder = args.results or (os.path.join(args.out, "results") if args.mini else os.path.join("docs", "results"))
    result = lambda name: os.path.join(folder, f"fmnist_{name}{'_mini' if args.mini else ''}")  # noqa: E731
    progress, out = not args.quiet, args.out
    test = load_idx_folder(args.data, "test")
    ref_images = test.images if cfg["ref_images"] is None else test.images[:cfg["ref_images"]]

    # The classifier (the fast metric), the four denoisers, the reference statistics.
    clf_path = os.path.join(out, "classifier.safetensors")
    if not os.path.isfile(clf_path):
        log("training the classifier")
        train_classifier(load_idx_folder(args.data, "train"), test, clf_path, log=log, progress=progress,
                         **cfg["classifier"])
    clf = ClassifierFeatures(clf_path)
    models = train_models(args.data, out, cfg, progress)
    refs = {"classifier": reference(clf, ref_images, os.path.join(out, "ref"), args.data, "test",
                                    progress=progress, log=log)}

    # The sweeps, on the same seeds: EMA_m (x EMA_g) x w for no guidance, CFG and autoguidance; w for every row.
    sampler, sweep_seeds = dict(steps=cfg["steps"], batch=cfg.get("batch", 64)), list(range(cfg["sweep_samples"]))
    ema_points = sweep(result("ema_sweep") + ".json", ema_grid(out, cfg), sweep_seeds, clf, refs, sampler, out,
                       {k: cfg[k] for k in ("ema_main", "ema_guide", "ema_ag_weights", "ema_cfg_weights")}, progress)
    ema_chosen, ema_fixed = best(ema_points), best([p for p in ema_points if is_tracked(p)])
    write_ema_sweep(result("ema_sweep"), ema_points, ema_chosen, cfg)
    if not os.path.isfile(result("side_by_side") + ".png"):
        figure(ema_chosen, ema_fixed, os.path.join(out, "figure"), result("side_by_side") + ".png", sampler)
    points = sweep(result("sweep") + ".json", w_grid(models, cfg), sweep_seeds, clf, refs, sampler, out,
                   {k: cfg[k] for k in ("cfg_weights", "ag_weights")}, progress)
    chosen = best(points)
    write_sweep(result("sweep"), points, chosen, cfg)
    chosen.update(ema_chosen)  # these rows take their EMA lengths and w from the post-hoc EMA sweep

    # The final rows: each at its chosen setting, on fresh seeds (w was chosen on others).
    spaces = [clf]
    if not args.no_fid:
        spaces.append(Inception(device=args.device))
        refs["inception"] = reference(spaces[1], ref_images, os.path.join(out, "ref"), args.data, "test",
                                      progress=progress, log=log)
    seeds = list(range(1_000_000, 1_000_000 + cfg["eval_samples"]))
    # 5,000 samples repay compilation on a CPU; on a GPU these small networks sample in seconds without it
    final = dict(sampler, compile=cfg.get("compile_final", False) and args.device == "cpu", device=args.device,
                 batch=args.batch or sampler["batch"])
    info = dict(config=cfg, reference=dict(split="test", images=int(len(ref_images))), timings_s=None,
                models={k: os.path.relpath(v, out) for k, v in models.items()},
                command=" ".join(["python", "experiments/fmnist_table.py"] + (sys.argv[1:] if argv is None else argv)))
    done = {r["row"]: r for r in read(result("table") + ".json", "rows")}
    rows = [done.get(row["name"]) for row in ROWS]
    for i, row in enumerate(ROWS):
        if rows[i] is None:
            rows[i] = final_row(row["name"], row["paper"], chosen[row["name"]], spaces, refs, seeds, final, out)
            write_json(result("table") + ".json", dict(info, threads=torch.get_num_threads(), rows=[r for r in rows if r]))

    # EMA lengths fixed before training against chosen after, each at its best w: classifier only. A chosen
    # setting is the table's row (the same samples), its numbers taken from there and its time counted there.
    plan = [(f"EMA: {name}, {when}", paper, name, pick[name]) for name in EMA_ROWS
            for when, paper, pick in (("fixed", "tracked EMA", ema_fixed), ("post hoc", "chosen EMA", ema_chosen))]
    done = {r["row"]: r for r in read(result("ema_final") + ".json")}
    compared = [done.get(name) for name, _, _, _ in plan]
    for i, (name, paper, base, point) in enumerate(plan):
        if compared[i] is None:
            if point is ema_chosen[base]:
                compared[i] = {k: v for k, v in dict(rows[[r["name"] for r in ROWS].index(base)], row=name,
                                                     paper=paper, seconds=0.0).items() if not k.startswith("inception")}
            else:
                compared[i] = final_row(name, paper, point, [clf], refs, seeds, final, out)
            write_json(result("ema_final") + ".json", [r for r in compared if r])
    write_comparison(result("ema_final"), compared, cfg)

    info.update(timings_s=timings(out, refs, points + ema_points, rows + compared), threads=torch.get_num_threads())
    write_json(result("table") + ".json", dict(info, rows=rows))
    write_text(result("table") + ".md", markdown(rows, info))
    print(markdown(rows, info))


def log(message):
    print(message, file=sys.stderr, flush=True)


def read(path, field=None):
    """What a result file already holds: its list, or its dict's `field`; [] where there is no file."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        data = json.load(f)
    return data if field is None else data[field]


def write_text(path, text):
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def timings(out, refs, points, rows):
    """Seconds of each stage, from what each stage saved with its result: the work, however many runs it took."""
    with open(os.path.join(out, "classifier.json")) as f:
        stages = dict(classifier=json.load(f)["train_seconds"], train=0.0)
    for run in os.listdir(os.path.join(out, "models")):
        with open(os.path.join(out, "models", run, "done.json")) as f:
            stages["train"] += json.load(f)["seconds"]
    stages.update(train=round(stages["train"], 1), reference=round(sum(r.info["seconds"] for r in refs.values()), 1),
                  sweep=round(sum(p["seconds"] for p in points), 1), final=round(sum(r["seconds"] for r in rows), 1))
    stages["total"] = round(sum(stages.values()), 1)
    return stages


# --- Models ------------------------------------------------------------------------------------

def train_models(data, out, cfg, progress):
    """Train the four denoisers, each where its done.json is missing (resuming from its checkpoint);
    return {role: the tracked snapshot a row uses}. Every run stores both tracked EMA profiles every
    T / cfg["snapshots"] images, so that post-hoc EMA can rebuild any EMA length at T and at T/8."""
    T = cfg["kimg"]
    for name, preset, cond, kimg in (("main", cfg["main"], True, T), ("small", cfg["small"], True, T),
                                     ("uncond", cfg["main"], False, T), ("uncond-small", cfg["small"], False, T / FRACTION)):
        folder = os.path.join(out, "models", name)
        if not os.path.isfile(os.path.join(folder, "done.json")):
            log(f"training {name}: preset {preset}, {'conditional' if cond else 'unconditional'}, {kimg:g} kimg")
            summary = train(data, folder, preset, cond=cond, kimg=kimg, snapshot_kimg=T / cfg["snapshots"],
                            checkpoint_kimg=T / FRACTION, progress=progress, log=log, workers=0,
                            precision=cfg["precision"])
            write_json(os.path.join(folder, "done.json"), dict(kimg=kimg, preset=preset, cond=cond,
                                                               seconds=round(summary["seconds"], 1)))
    snap = lambda name, kimg, ema: os.path.join(out, "models", name, snapshot_name(round(kimg * 1000), ema))  # noqa: E731
    return {"main": snap("main", T, 0.10), "main@T/8": snap("main", T / FRACTION, 0.05),
            "small@T/8": snap("small", T / FRACTION, 0.05), "small@T": snap("small", T, 0.05),
            "uncond": snap("uncond", T, 0.10), "uncond-small@T/8": snap("uncond-small", T / FRACTION, 0.05)}


def ema_model(out, run, sigma_rel, kimg):
    """A file holding run's EMA of length sigma_rel at kimg thousand images: the run's own snapshot where
    it tracked that length, else a post-hoc EMA reconstruction, made once in OUT/posthoc/<run>/."""
    name = snapshot_name(round(kimg * 1000), sigma_rel)
    if os.path.isfile(os.path.join(out, "models", run, name)):
        return os.path.join(out, "models", run, name)
    path = os.path.join(out, "posthoc", run, name)
    if not os.path.isfile(path):
        save_reconstruction(path, *reconstruct(os.path.join(out, "models", run), sigma_rel, kimg))
    return path


# --- Sweeps ------------------------------------------------------------------------------------

def point(name, method, main, guide, weight, interval=None, **ema):
    return dict(name=name, method=method, main=main, guide=guide, interval=interval, weight=float(weight), **ema)


def ema_grid(out, cfg):
    """The post-hoc EMA sweep: no guidance and CFG at each EMA_m (CFG's unconditional model at the same
    length, as one network would be), autoguidance at each EMA_m x EMA_g (its guide at T/8); each over w."""
    T = cfg["kimg"]
    main, uncond = ({m: ema_model(out, run, m, T) for m in cfg["ema_main"]} for run in ("main", "uncond"))
    guide = {g: ema_model(out, "small", g, T / FRACTION) for g in cfg["ema_guide"]}
    grid = []
    for m in cfg["ema_main"]:
        grid.append(point("no guidance", "none", main[m], None, 1.0, ema_main=m, ema_guide=None))
        grid += [point("CFG", "cfg", main[m], uncond[m], w, ema_main=m, ema_guide=m) for w in cfg["ema_cfg_weights"]]
    return grid + [point("autoguidance", "autoguidance", main[m], guide[g], w, ema_main=m, ema_guide=g)
                   for m in cfg["ema_main"] for g in cfg["ema_guide"] for w in cfg["ema_ag_weights"]]


def w_grid(models, cfg):
    """Every row over its weights, at the EMA lengths fixed before training."""
    return [point(row["name"], row["method"], models[row["main"]], row["guide"] and models[row["guide"]], w,
                  row.get("interval"))
            for row in ROWS for w in ([1.0] if row["method"] == "none" else
                                      cfg["cfg_weights" if row["method"] == "cfg" else "ag_weights"])]


def sweep(path, grid, seeds, clf, refs, sampler, out, grid_info, progress=False):
    """Measure each point of the grid that PATH does not hold: sample the seeds (the same noise for every
    point), classifier FD and class accuracy. PATH is rewritten after each point. Returns the grid's points
    with their numbers."""
    key = lambda p: (p["name"], p["weight"], p.get("ema_main"), p.get("ema_guide"))  # noqa: E731
    done = {key(p): p for p in read(path, "points")}
    points = [dict(p, **done.get(key(p), {})) for p in grid]
    todo = [p for p in points if "classifier_fd" not in p]
    if todo:
        log(f"sweep: {len(todo)} of {len(points)} points to measure on {len(seeds)} samples -> {path}")
    bar = progress_bar(len(todo), "sweep", "point", enabled=progress, leave=True)
    for p in todo:
        t0 = time.time()
        main, guide = load_models(p["main"], p["guide"], p["method"])
        images, labels, _ = generate(main, guide, p["method"], p["weight"], p["interval"], seeds, **sampler)
        p.update(evaluate(to_nchw(images), [clf], refs, labels, precision_recall=False))
        p["seconds"] = round(time.time() - t0, 2)
        measured = [q for q in points if "classifier_fd" in q]
        write_json(path, dict(seeds=seed_text(seeds), metric="classifier_fd", grid=grid_info, chosen={
            name: dict(_summary(c), main=_rel(c["main"], out), guide=_rel(c["guide"], out))
            for name, c in best(measured).items()}, points=[_summary(q) for q in measured]))
        bar.update(1)
        bar.set_postfix_str(f"{p['name']} w={p['weight']:g}")
    bar.close()
    return points


def _rel(path, out):
    return path and os.path.relpath(path, out)


def _summary(p):
    return {k: p[k] for k in KEEP if k in p}


def best(points):
    """{row name: its point of lowest classifier FD}."""
    names = dict.fromkeys(p["name"] for p in points)
    return {n: min((p for p in points if p["name"] == n), key=lambda p: p["classifier_fd"]) for n in names}


def is_tracked(p):
    """Whether a point of the post-hoc EMA sweep is at the EMA lengths fixed before training."""
    return p["ema_main"] == TRACKED["ema_main"] and (p["name"] != "autoguidance" or p["ema_guide"] == TRACKED["ema_guide"])


def final_row(name, paper, point, spaces, refs, seeds, sampler, out):
    """One row of a final table: `point` sampled on the seeds and measured in each space."""
    device, n = torch.device(sampler["device"]), torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {n} thread{'s' * (n != 1)}"
    log(f"final: {name} at w = {point['weight']:g} on {len(seeds):,} samples ({where})")
    t0 = time.time()
    main, guide = load_models(point["main"], point["guide"], point["method"], device=device)
    images, labels, _ = generate(main, guide, point["method"], point["weight"], point["interval"], seeds, **sampler)
    metrics = evaluate(to_nchw(images), spaces, refs, labels)
    return dict(row=name, paper=paper, method=point["method"], weight=point["weight"],
                main=_rel(point["main"], out), guide=_rel(point["guide"], out),
                interval=point["interval"], seeds=seed_text(seeds), device=where, torch=torch.__version__,
                seconds=round(time.time() - t0, 1), **metrics)


def figure(chosen, fixed, work, path, sampler):
    """The same seeds and classes under no guidance, CFG, and autoguidance before and after choosing the
    EMA lengths (each at its best w of the sweep), 2 x 2; the panels are kept in WORK."""
    panels = [(chosen["no guidance"], "no guidance"), (chosen["CFG"], "CFG"),
              (fixed["autoguidance"], "autoguidance, EMA fixed before training"),
              (chosen["autoguidance"], "autoguidance, EMA chosen post hoc")]
    files, titles = [], []
    for p, what in panels:
        ema = f"EMA_m {p['ema_main']:g}" + (f", EMA_g {p['ema_guide']:g}" if p["method"] == "autoguidance" else "")
        files.append(os.path.join(work, f"{p['method']}-w{p['weight']:g}-{ema.replace(', ', '-').replace(' ', '')}.png"))
        titles.append(f"{what}: w = {p['weight']:g}, {ema}" if p["method"] != "none" else f"{what}: {ema}")
        log(f"figure: {titles[-1]}")
        main, guide = load_models(p["main"], p["guide"], p["method"])
        images, _, _ = generate(main, guide, p["method"], p["weight"], p["interval"], list(FIGURE_SEEDS), **sampler)
        save_png(files[-1], make_grid(images, 10))  # class = seed % 10: a class per column
    side_by_side(files, titles, path, scale=2, columns=2)


# --- Tables and plots --------------------------------------------------------------------------

def _cell(p, chosen):
    """A sweep point's classifier FD (class accuracy), in bold where it is a chosen one."""
    if p is None:
        return "-"
    accuracy = f" ({p['classifier_accuracy']:.2f})" if "classifier_accuracy" in p else ""  # none unconditional
    text = f"{p['weight']:g}: " * ("ema_main" not in p) + f"{p['classifier_fd']:.1f}{accuracy}"
    return f"**{text}**" if any(p is c for c in chosen.values()) else text


def write_sweep(path, points, chosen, cfg):
    """The w sweep's plot and table: classifier FD (class accuracy) at each w, the best in bold."""
    seeds = seed_text(range(cfg["sweep_samples"]))
    plot_sweep(points, path + ".png", f"Fashion-MNIST: sweeps over w ({cfg['sweep_samples']} samples, seeds {seeds})")
    lines = [f"Sweeps over w: classifier FD (class accuracy) on {cfg['sweep_samples']} samples, seeds {seeds}; "
             "the row's best w in bold.", "", "| row | w: FD (accuracy) |", "|---|---|"]
    lines += [f"| {row['name']} | {'; '.join(_cell(p, chosen) for p in points if p['name'] == row['name'])} |"
              for row in ROWS]
    write_text(path + ".md", "\n".join(lines) + "\n")


def write_ema_sweep(path, points, chosen, cfg):
    """The post-hoc EMA sweep's plot and tables: autoguidance as EMA_m x EMA_g for each w; CFG and no guidance."""
    seeds = seed_text(range(cfg["sweep_samples"]))
    plot_ema_sensitivity(points, path + ".png", f"Fashion-MNIST: sensitivity to the EMA lengths and w "
                                                f"({cfg['sweep_samples']} samples, seeds {seeds})")
    at = {(p["name"], p["weight"], p["ema_main"], p["ema_guide"]): p for p in points}
    lines = [f"Post-hoc EMA sweep: classifier FD (class accuracy) on {cfg['sweep_samples']} samples, seeds {seeds}; "
             "each row's best in bold. Autoguidance: one table per w, EMA_m down, EMA_g across.", ""]
    for w in cfg["ema_ag_weights"]:
        lines += [f"Autoguidance, w = {w:g}:", "", "| EMA_m \\ EMA_g | " + " | ".join(f"{g:g}" for g in cfg["ema_guide"])
                  + " |", "|---" * (len(cfg["ema_guide"]) + 1) + "|"]
        lines += [f"| {m:g} | " + " | ".join(_cell(at.get(("autoguidance", w, m, g)), chosen) for g in cfg["ema_guide"])
                  + " |" for m in cfg["ema_main"]] + [""]
    lines += ["CFG (both models at EMA_m) and no guidance:", "",
              "| EMA_m | no guidance | " + " | ".join(f"CFG w = {w:g}" for w in cfg["ema_cfg_weights"]) + " |",
              "|---" * (len(cfg["ema_cfg_weights"]) + 2) + "|"]
    lines += [f"| {m:g} | " + " | ".join(_cell(at.get(key), chosen) for key in [("no guidance", 1.0, m, None)]
                                          + [("CFG", w, m, m) for w in cfg["ema_cfg_weights"]]) + " |"
              for m in cfg["ema_main"]]
    write_text(path + ".md", "\n".join(lines) + "\n")


def _ema(path):
    return "-" if not path else f"{parse_snapshot_name(path)[1]:g}"


def write_comparison(path, rows, cfg):
    lines = [f"EMA lengths fixed before training against chosen after (post-hoc EMA sweep), each at its best w: "
             f"classifier FD, precision / recall and class accuracy on {cfg['eval_samples']:,} fresh samples.", "",
             "| setting | EMA_m | EMA_g | w | classifier FD | classifier P / R | class acc. |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['row'][5:]} | {_ema(r['main'])} | {_ema(r['guide']) if 'autoguidance' in r['row'] else '-'} | "
              f"{r['weight']:g} | {r['classifier_fd']:.2f} | {r['classifier_precision']:.3f} / "
              f"{r['classifier_recall']:.3f} | {r['classifier_accuracy']:.3f} |" for r in rows]
    write_text(path + ".md", "\n".join(lines) + "\n")


def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(rows, info):
    cfg, t, threads = info["config"], info["timings_s"], info["threads"]
    lines = [f"Fashion-MNIST 32x32: {cfg['eval_samples']:,} samples a row (seeds {rows[0]['seeds']}) against "
             f"{info['reference']['images']:,} test images; {cfg['steps']} Heun steps. Each row's w was chosen by the "
             f"classifier's FD on {cfg['sweep_samples']:,} other samples, and so were the EMA lengths of the rows whose "
             "EMA column says \"sweep\" (the others keep the lengths fixed before training: EMA_m "
             f"{TRACKED['ema_main']:g}, EMA_g {TRACKED['ema_guide']:g}). So the rows are compared by classifier FD, the "
             "metric that chose them. FID and Inception P / R are measured at the same settings, which FID did not "
             "choose: [fmnist_fid_sweep.md](fmnist_fid_sweep.md) chooses autoguidance's w by FID. Last "
             "column: the paper's setting that the row imitates, and its FID (arXiv 2406.02507, Table 1 and Sec. 5).",
             "", "| row | EMA_m | guide | EMA_g | EMA | w | classifier FD | classifier P / R | class acc. | FID | "
             "Inception P / R | paper's setting: FID |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        guide = "-" if not r["guide"] else f"{os.path.basename(os.path.dirname(r['guide']))}, " \
                                           f"{parse_snapshot_name(r['guide'])[0] / 1000:g} kimg"
        pr = {space: f"{_fmt(r.get(f'{space}_precision'), 3)} / {_fmt(r.get(f'{space}_recall'), 3)}"
              for space in ("inception", "classifier")}
        lines.append(f"| {r['row']} | {_ema(r['main'])} | {guide} | {_ema(r['guide'])} | "
                     f"{'sweep' if r['row'] in EMA_ROWS else 'fixed'} | {r['weight']:g} | "
                     f"{_fmt(r.get('classifier_fd'), 2)} | {pr['classifier']} | "
                     f"{_fmt(r.get('classifier_accuracy'), 3)} | {_fmt(r.get('inception_fd'))} | {pr['inception']} | "
                     f"{r['paper']} |")
    where = {}
    for r in rows:
        where.setdefault(f"{r['device']}, torch {r['torch']}", []).append(r["row"])
    lines += ["", "P / R: k-NN precision / recall (k = 3) in each feature space.", "", target_check(rows), "",
              "Final rows sampled and measured on: " + "; ".join(
                  f"{name} ({len(names)} row{'s' if len(names) != 1 else ''})" for name, names in where.items())
              + ". Everything before them (training, sweeps) on the CPU.", "",
              f"Wall-clock time of each part ({threads} thread{'s' if threads != 1 else ''} on the CPU, summed over the "
              f"runs that built it; an upper bound, as it includes any other work the machine did meanwhile): "
              f"classifier {_fmt(t['classifier'], 0)} s, training {_fmt(t['train'], 0)} s, reference statistics "
              f"{_fmt(t['reference'], 0)} s, sweeps {_fmt(t['sweep'], 0)} s, final rows {_fmt(t['final'], 0)} s "
              f"(on the machines named above); total {t['total'] / 3600:.2f} h.", "", f"Command: `{info['command']}`"]
    return "\n".join(lines) + "\n"


def target_check(rows):
    """The stated targets, checked in each feature space measured (Inception: FID; the classifier: its FD)."""
    by = {r["row"]: r for r in rows}
    none, ag, cfg = by["no guidance"], by["autoguidance"], by["CFG"]
    out = []
    for space, metric in (("classifier", "classifier FD (the metric that chose the settings)"),
                          ("inception", "FID (at settings it did not choose)")):
        fd, p, r = f"{space}_fd", f"{space}_precision", f"{space}_recall"
        if fd not in none:
            continue
        drop, best_cfg = 1 - ag[fd] / none[fd], min(cfg[fd], by["CFG + interval"][fd])
        out.append(
            f"By {metric}: autoguidance {'lowers' if drop > 0 else 'raises'} it by {abs(drop):.0%} against "
            f"no guidance (target: at least 30%: {'met' if drop >= 0.3 else 'not met'}); best CFG row "
            f"{best_cfg:.2f} vs autoguidance {ag[fd]:.2f} ({'beaten' if ag[fd] < best_cfg else 'not beaten'}); "
            f"autoguidance's recall {ag[r]:.3f} vs unguided {none[r]:.3f} (within 0.02: "
            f"{'yes' if ag[r] >= none[r] - 0.02 else 'no'}); CFG's precision {none[p]:.3f} -> {cfg[p]:.3f} "
            f"({'raised' if cfg[p] > none[p] else 'not raised'}) and recall {none[r]:.3f} -> {cfg[r]:.3f} "
            f"({'lowered' if cfg[r] < none[r] else 'not lowered'}).")
    return "\n\n".join(out)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, plt, path, title):
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return fig


def plot_sweep(points, path, title):
    """Classifier FD and class accuracy against w, a line per row, each row's lowest FD starred.
    Returns the Figure (closed: its Axes stay readable)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.2, 3.6))
    for ax, key, label in ((axes[0], "classifier_fd", "classifier FD (lower is better)"),
                           (axes[1], "classifier_accuracy", "class accuracy")):
        for name in dict.fromkeys(p["name"] for p in points):
            pts = sorted((p for p in points if p["name"] == name and key in p), key=lambda p: p["weight"])
            if not pts:
                continue
            w, v = [p["weight"] for p in pts], [p[key] for p in pts]
            (line,) = ax.plot(w, v, marker="o", ms=3, label=name)
            if key == "classifier_fd":
                i = int(np.argmin(v))
                ax.plot(w[i], v[i], marker="*", ms=11, color=line.get_color())
        ax.set_xlabel("guidance weight w")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, plt, path, title)


def plot_ema_sensitivity(points, path, title):
    """Classifier FD against EMA_m (the guide at its best EMA_g) and against EMA_g (the main model at its best
    EMA_m), a line per w; and against w, each method at its best EMA lengths: the paper's Fig. 3."""
    plt, metric = _pyplot(), "classifier_fd"
    ag = [p for p in points if p["name"] == "autoguidance"]
    top = min(ag, key=lambda p: p[metric])
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8))
    for ax, fixed, axis in ((axes[0], "ema_guide", "ema_main"), (axes[1], "ema_main", "ema_guide")):
        for w in sorted({p["weight"] for p in ag}):
            pts = sorted((p for p in ag if p["weight"] == w and p[fixed] == top[fixed]), key=lambda p: p[axis])
            ax.plot([p[axis] for p in pts], [p[metric] for p in pts], marker="o", ms=3, label=f"autoguidance, w={w:g}")
        ax.plot(top[axis], top[metric], marker="*", ms=12, color="k")
        ax.set_xlabel(f"{'EMA_m (main model)' if axis == 'ema_main' else 'EMA_g (guide)'}, sigma_rel")
        ax.set_title(f"{'EMA_g' if fixed == 'ema_guide' else 'EMA_m'} = {top[fixed]:g}", fontsize=9)
    for name, style in (("CFG", "--"), ("no guidance", ":")):
        ms = sorted({p["ema_main"] for p in points if p["name"] == name})
        axes[0].plot(ms, [min(p[metric] for p in points if p["name"] == name and p["ema_main"] == m) for m in ms],
                     style, color="grey",
                     label=name if name == "no guidance" else f"{name} (best w)")
    for name, style in (("autoguidance", "-"), ("CFG", "--")):
        pts = [p for p in points if p["name"] == name]
        low = min(pts, key=lambda p: p[metric])
        pts = sorted((p for p in pts if p["ema_main"] == low["ema_main"] and p["ema_guide"] == low["ema_guide"]),
                     key=lambda p: p["weight"])
        ema = f"EMA_m {low['ema_main']:g}" + (f", EMA_g {low['ema_guide']:g}" if name == "autoguidance" else "")
        axes[2].plot([p["weight"] for p in pts], [p[metric] for p in pts], style, marker="o", ms=3, label=f"{name} ({ema})")
    axes[2].set_xlabel("guidance weight w")
    axes[2].set_title("each method at its best EMA lengths", fontsize=9)
    for ax in axes:
        ax.set_ylabel("classifier FD (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, plt, path, title)


if __name__ == "__main__":
    main()
