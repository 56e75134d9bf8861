"""Sweeps: each guidance method over a grid of weights w (and EMA snapshots), resumable.

A sweep is a list of runs; a run is a dict

    {"name": "autoguidance", "method": "autoguidance", "main": PATH or [PATHS],
     "guide": PATH or [PATHS] or None, "interval": None or [lo, hi], "weights": [1.0, 1.5, ...]}

expanded into points (main x guide x weight). Every point samples the same
seeds (per-seed noise and class: methods compare on identical noise), is
measured by evaluate.evaluate, and is appended to OUT/points.json (rewritten
atomically after each point) and OUT/points.csv. A point already in
points.json with the same definition is skipped, so an interrupted sweep
resumes where it stopped and a finished one costs nothing. The definition
includes the SHA-256 of the model files and of each feature space's weights:
a point measured on other bytes (a model retrained at the same path) is
measured again, and a points.json kept from another machine or session is
reused exactly where its models were rebuilt bit for bit.
"""
import csv
import io
import json
import os
import shutil
import time

from .checkpoint import atomic_write, write_json
from .evaluate import evaluate, file_digest, to_nchw
from .seeds import seed_text
from .progress import progress_bar

POINTS = "points.json"
KEYS = ("name", "method", "main", "guide", "interval", "weight", "seeds", "sampler",
        "main_sha256", "guide_sha256", "spaces")


def expand(runs):
    """The points of a list of runs: dicts with name, method, main, guide, interval, weight."""
    points = []
    for run in runs:
        for key in ("name", "method", "main", "weights"):
            if key not in run:
                raise ValueError(f"sweep run {run.get('name', '?')!r} has no {key!r}")
        mains = run["main"] if isinstance(run["main"], list) else [run["main"]]
        guides = run.get("guide") if isinstance(run.get("guide"), list) else [run.get("guide")]
        for main in mains:
            for guide in guides:
                for w in run["weights"]:
                    points.append(dict(name=run["name"], method=run["method"], main=main, guide=guide,
                                       interval=list(run["interval"]) if run.get("interval") else None,
                                       weight=float(w)))
    return points


def point_key(point):
    """What defines a point's result: the same key means the same samples and numbers."""
    return json.dumps([point.get(k) for k in KEYS])


def load_points(out):
    path = os.path.join(out, POINTS)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError:
            raise ValueError(f"{path} is damaged (not JSON): move it away to start the sweep over") from None


def save_points(out, points):
    write_json(os.path.join(out, POINTS), points)
    columns = list(dict.fromkeys(k for p in points for k in p))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns)
    writer.writeheader()
    for p in points:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in p.items()})

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            f.write(buf.getvalue())
    atomic_write(os.path.join(out, "points.csv"), write)


def run_sweep(runs, out, seeds, spaces, refs, sampler=None, precision_recall=False, progress=True, log=print,
              device="cpu"):
    """Sample and measure every point of `runs` not yet in OUT/points.json. Returns the points of `runs`,
    each as measured on the model files now at its paths (OUT keeps any other version's too, for the
    record, but a choice among the returned points never picks a measurement of other bytes).

    seeds: list of ints; spaces/refs: see evaluate.evaluate; sampler: keyword
    arguments of generate.generate (steps, sigma_max, batch, ...).
    """
    from .generate import generate, load_models
    sampler = dict(sampler or {})
    seeds_text = seed_text(seeds)
    done = load_points(out)
    known = {point_key(p) for p in done}
    todo, current = [], []
    space_digests = {s.name: file_digest(s.path) if getattr(s, "path", None) else None for s in spaces}
    for p in expand(runs):
        p.update(seeds=seeds_text, sampler=sampler, spaces=space_digests, main_sha256=file_digest(p["main"]),
                 guide_sha256=p["guide"] and file_digest(p["guide"]))
        current.append(point_key(p))
        if point_key(p) not in known:
            todo.append(p)
    if not todo:
        return _in_order(done, current)
    log(f"sweep: {len(todo)} of {len(todo) + len(done)} points to run ({len(seeds)} samples each) -> {out}")
    models = {}
    bar = progress_bar(len(todo), "sweep", "point", enabled=progress, leave=True)
    for p in todo:
        t0 = time.time()
        key = (p["main"], p["guide"], p["method"])
        if key not in models:
            models.clear()  # one pair in memory at a time
            models[key] = load_models(p["main"], p["guide"], p["method"], device=device)
        main, guide = models[key]
        images, labels, _ = generate(main, guide, p["method"], p["weight"], p["interval"], seeds,
                                     device=device, **sampler)
        p.update(evaluate(to_nchw(images), spaces, refs, labels, precision_recall=precision_recall))
        p["seconds"] = round(time.time() - t0, 2)
        done.append(p)
        save_points(out, done)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{p['name']} w={p['weight']:g}")
    if bar is not None:
        bar.close()
    return _in_order(done, current)


def _in_order(points, keys):
    """The points whose keys are `keys`, in that order."""
    by_key = {point_key(p): p for p in points}
    return [by_key[k] for k in keys]


def recorded(runs, out, seeds, spaces, sampler=None):
    """The points of `runs` that OUT holds for these seeds, feature spaces and sampler, matched on their
    definition but not on the models' SHA-256, so that the model files need not be here (a machine that
    holds only the models it will sample from): check_models(point) before using a point's models.
    Raises ValueError if a point is missing, or recorded twice for other model bytes."""
    sampler, seeds_text = dict(sampler or {}), seed_text(seeds)
    space_digests = {s.name: file_digest(s.path) if getattr(s, "path", None) else None for s in spaces}
    definition = lambda p: json.dumps([p.get(k) for k in ("name", "method", "main", "guide", "interval", "weight")])  # noqa: E731
    wanted = {definition(p) for p in expand(runs)}
    found = {}
    for p in load_points(out):
        if p.get("seeds") == seeds_text and p.get("sampler") == sampler and p.get("spaces") == space_digests:
            k = definition(p)
            if k in found and point_key(found[k]) != point_key(p):
                raise ValueError(f"{out} holds {p['name']} at w = {p['weight']:g} for two versions of its models: "
                                 "run the sweep with the models present")
            if k in wanted:
                found[k] = p
    if len(found) < len(wanted):
        raise ValueError(f"{out} holds {len(found)} of the sweep's {len(wanted)} points: run the sweep")
    return list(found.values())


def check_models(point):
    """Raise ValueError unless the point's model files are here with the bytes it was measured on."""
    for role in ("main", "guide"):
        path = point.get(role)
        if path and (not os.path.isfile(path) or file_digest(path) != point[f"{role}_sha256"]):
            raise ValueError(f"{path}: {'missing' if not os.path.isfile(path) else 'not the model'} the record's "
                             f"{point['name']} at w = {point['weight']:g} was measured on")


# Training is deterministic per seed on one kind of machine, but another CPU's kernels round
# otherwise and train other bytes, which no key matches. So a run can keep beside its record (in
# RECORD/kept, the layout of its work folder) the few files its final measurements need, and a
# machine that holds only the record takes them from there.

def keep(models, notes, out, record):
    """Copy each of `models` (paths under OUT) to RECORD/kept/<its path in OUT>, unless one with its
    bytes is there, and each of `notes` (their training times, say) where missing or where a model
    changed: a rerun that retrains the same bytes leaves the record as it was."""
    kept = lambda path: os.path.join(record, "kept", os.path.relpath(path, out))  # noqa: E731
    changed = [p for p in models if not (os.path.isfile(kept(p)) and file_digest(kept(p)) == file_digest(p))]
    for path in changed + [p for p in notes if changed or not os.path.isfile(kept(p))]:
        atomic_write(kept(path), lambda tmp, path=path: shutil.copyfile(path, tmp))


def restore(paths, out, record):
    """Copy each file missing from OUT back from RECORD/kept, where kept. Its bytes are checked later
    (check_models): a file of other bytes in OUT is left there, and refused."""
    for path in paths:
        kept = os.path.join(record, "kept", os.path.relpath(path, out))
        if not os.path.exists(path) and os.path.isfile(kept):
            atomic_write(path, lambda tmp, kept=kept: shutil.copyfile(kept, tmp))


def best(points, metric, names=None):
    """{run name: the point with the lowest `metric`} (over weights and snapshots)."""
    out = {}
    for p in points:
        if (names is None or p["name"] in names) and metric in p:
            if p["name"] not in out or p[metric] < out[p["name"]][metric]:
                out[p["name"]] = p
    return out


__all__ = ["expand", "run_sweep", "recorded", "check_models", "keep", "restore", "best", "load_points", "save_points", "point_key"]
