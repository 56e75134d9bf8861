"""The small Table 1's post-hoc EMA stage: each model's EMA length chosen after training, as the paper does.

The autoguidance paper (arXiv 2406.02507, Sec. 5, Table 1, Fig. 3) picks the EMA length of the main
model (EMA_m) and of the guide (EMA_g) separately, by post-hoc EMA (EDM2, arXiv 2312.02696, Sec. 3),
and reports results more sensitive to them than to w. Here: rebuild the main model at T and the guide
at T/8 for every EMA length of a grid, sweep EMA_m x EMA_g x w for autoguidance and EMA_m x w for CFG
(its unconditional model at the main's EMA length, as one network would be), with the fast classifier
metric on the w sweep's seeds; write the table of every point and the Fig. 3-style plot.

Then the comparison that says what choosing them changes: no guidance, CFG and autoguidance, each with
the EMA lengths fixed before training (the tracked profiles) and with those chosen after, each at its
best w, on the final rows' fresh seeds with the classifier metric.

Used by experiments/fmnist_table.py (`--ema-only` stops after it).
"""
import math
import os

from mini_autoguide import sweep
from mini_autoguide.checkpoint import atomic_write, write_json
from mini_autoguide.posthoc import posthoc_file
from mini_autoguide.seeds import seed_text
from mini_autoguide.checkpoint import snapshot_name
from mini_autoguide.train import options

ROWS = ("no guidance", "CFG", "autoguidance")  # the table rows whose models (and w) this stage chooses
TRACKED = dict(ema_main=0.10, ema_guide=0.05)  # the EMA lengths the table used before choosing them
FIGURE_SEEDS = range(40)  # four samples of each class, a class per column


def models(out, cfg, fraction, build=True):
    """{(role, sigma_rel): model path} for the grid: main and uncond at T, small at T/fraction.
    build=False: the paths alone, reading and writing nothing (the run's snapshot for an EMA length its
    training tracked, else where its reconstruction is kept): for a machine that holds only some models."""
    T, folder = cfg["kimg"], lambda name: os.path.join(out, "models", name)  # noqa: E731
    files = {}
    for role, name, preset, kimg, grid in (("main", "main", cfg["main"], T, cfg["ema_main"]),
                                           ("uncond", "uncond", cfg["main"], T, cfg["ema_main"]),
                                           ("guide", "small", cfg["small"], T / fraction, cfg["ema_guide"])):
        for s in grid:
            if build:
                files[role, s] = posthoc_file(folder(name), s, kimg, os.path.join(out, "posthoc", name))
                continue
            tracked = any(math.isclose(s, t) for t in options(preset).ema)
            files[role, s] = os.path.join(folder(name) if tracked else os.path.join(out, "posthoc", name),
                                          snapshot_name(round(kimg * 1000), s))
    return files


def runs(files, cfg):
    """The sweep's runs: no guidance and CFG for each EMA_m (CFG's two models at the same length),
    autoguidance over the grid EMA_m x EMA_g; each over its weights."""
    out = []
    for m in cfg["ema_main"]:
        out.append(dict(name="no guidance", method="none", main=files["main", m], weights=[1.0]))
        out.append(dict(name="CFG", method="cfg", main=files["main", m], guide=files["uncond", m],
                        weights=cfg["ema_cfg_weights"]))
    out.append(dict(name="autoguidance", method="autoguidance", main=[files["main", m] for m in cfg["ema_main"]],
                    guide=[files["guide", g] for g in cfg["ema_guide"]], weights=cfg["ema_ag_weights"]))
    return out


def run(out, record, cfg, fraction, spaces, refs, sampler, results, suffix, progress, log):
    """Rebuild (into OUT/posthoc), sweep (resumable, RECORD/ema_sweep), write the table, plot and figure.
    Returns ({row: best point}, the grid's points)."""
    files = models(out, cfg, fraction)
    points = sweep.run_sweep(runs(files, cfg), os.path.join(record, "ema_sweep"), list(range(cfg["sweep_samples"])),
                             spaces, refs, sampler, progress=progress, log=log)
    chosen, points = choose(points, files, cfg)
    write(results, suffix, points, chosen, cfg, out)
    figure(points, chosen, os.path.join(out, "figure"), os.path.join(results, f"fmnist_side_by_side{suffix}.png"),
           sampler, log)
    return chosen, points


def recorded(out, record, cfg, fraction, spaces, sampler):
    """What run() returns, from the record alone, reading no model: for a machine that holds only the models
    of the final rows (fmnist_table.py --final-from-record). Every point of the grid must be recorded."""
    files = models(out, cfg, fraction, build=False)
    points = sweep.recorded(runs(files, cfg), os.path.join(record, "ema_sweep"), list(range(cfg["sweep_samples"])),
                            spaces, sampler)
    return choose(points, files, cfg)


def choose(points, files, cfg):
    """({row: the point of lowest classifier FD}, the grid's points labelled with their EMA lengths)."""
    wanted = {(p["name"], p["main"], p["guide"], p["weight"]) for p in sweep.expand(runs(files, cfg))}
    points = [p for p in points if (p["name"], p["main"], p["guide"], p["weight"]) in wanted]  # not an older grid's
    ema_of = {path: s for (_, s), path in files.items()}
    for p in points:
        p["ema_main"], p["ema_guide"] = ema_of[p["main"]], ema_of.get(p["guide"])
    return sweep.best(points, "classifier_fd", ROWS), points


def figure(points, chosen, work, path, sampler, log):
    """The same seeds and classes under no guidance, CFG, and autoguidance before and after choosing the
    EMA lengths (each at its best w of the sweep; no guidance and CFG at their chosen EMA_m), 2 x 2;
    the panels are kept in WORK."""
    from mini_autoguide.generate import generate, load_models
    from mini_autoguide.image_files import make_grid, save_png, side_by_side
    fixed = [p for p in points if p["name"] == "autoguidance" and all(p[k] == v for k, v in TRACKED.items())]
    panels = [(chosen["no guidance"], "no guidance"), (chosen["CFG"], "CFG"),
              (min(fixed, key=lambda p: p["classifier_fd"]), "autoguidance, EMA fixed before training"),
              (chosen["autoguidance"], "autoguidance, EMA chosen post hoc")]
    files, titles = [], []
    for p, what in panels:
        ema = f"EMA_m {p['ema_main']:g}" + (f", EMA_g {p['ema_guide']:g}" if p["method"] == "autoguidance" else "")
        files.append(os.path.join(work, f"{p['method']}-w{p['weight']:g}-{ema.replace(', ', '-').replace(' ', '')}.png"))
        titles.append(f"{what}: w = {p['weight']:g}, {ema}" if p["method"] != "none" else f"{what}: {ema}")
        if not os.path.isfile(files[-1]):
            log(f"figure: {titles[-1]}")
            main, guide = load_models(p["main"], p["guide"], p["method"])
            images, _, _ = generate(main, guide, p["method"], p["weight"], p["interval"], list(FIGURE_SEEDS),
                                    **sampler)  # class = seed % 10
            os.makedirs(work, exist_ok=True)
            save_png(files[-1], make_grid(images, 10))
    side_by_side(files, titles, path, scale=2, columns=2)


def write(folder, suffix, points, chosen, cfg, out):
    from mini_autoguide.plots import plot_ema_sensitivity
    os.makedirs(folder, exist_ok=True)
    seeds = seed_text(range(cfg["sweep_samples"]))
    plot_ema_sensitivity(points, "classifier_fd", "classifier FD (lower is better)",
                         os.path.join(folder, f"fmnist_ema_sweep{suffix}.png"),
                         title=f"Fashion-MNIST: sensitivity to the EMA lengths and w "
                               f"({cfg['sweep_samples']} samples, seeds {seeds})")
    keep = ("name", "method", "weight", "ema_main", "ema_guide", "classifier_fd", "classifier_accuracy", "seconds")
    rel = {p[k]: os.path.relpath(p[k], out) for p in points for k in ("main", "guide") if p.get(k)}
    write_json(os.path.join(folder, f"fmnist_ema_sweep{suffix}.json"), dict(
        seeds=seeds, metric="classifier_fd", grid={k: cfg[k] for k in ("ema_main", "ema_guide", "ema_ag_weights",
                                                                        "ema_cfg_weights")},
        chosen={name: {k: p[k] for k in keep if k in p} | dict(main=rel[p["main"]], guide=rel.get(p["guide"]))
                for name, p in chosen.items()},
        points=[{k: p[k] for k in keep if k in p} for p in points]))
    lines = [f"Post-hoc EMA sweep: classifier FD (class accuracy) on {cfg['sweep_samples']} samples, seeds {seeds}; "
             "each row's best in bold. Autoguidance: one table per w, EMA_m down, EMA_g across.", ""]
    for w in cfg["ema_ag_weights"]:
        lines += [f"Autoguidance, w = {w:g}:", "", "| EMA_m \\ EMA_g | " + " | ".join(f"{g:g}" for g in cfg["ema_guide"])
                  + " |", "|---" * (len(cfg["ema_guide"]) + 1) + "|"]
        for m in cfg["ema_main"]:
            cells = [_cell(_find(points, "autoguidance", w, m, g), chosen) for g in cfg["ema_guide"]]
            lines.append(f"| {m:g} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["CFG (both models at EMA_m) and no guidance:", "",
              "| EMA_m | no guidance | " + " | ".join(f"CFG w = {w:g}" for w in cfg["ema_cfg_weights"]) + " |",
              "|---" * (len(cfg["ema_cfg_weights"]) + 2) + "|"]
    for m in cfg["ema_main"]:
        cells = [_cell(_find(points, "no guidance", 1.0, m, None), chosen)]
        cells += [_cell(_find(points, "CFG", w, m, m), chosen) for w in cfg["ema_cfg_weights"]]
        lines.append(f"| {m:g} | " + " | ".join(cells) + " |")
    atomic_write(os.path.join(folder, f"fmnist_ema_sweep{suffix}.md"), lambda tmp: _write_text(tmp, "\n".join(lines) + "\n"))


def _write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def _find(points, name, w, m, g):
    for p in points:
        if p["name"] == name and p["weight"] == w and p["ema_main"] == m and (name != "autoguidance" or p["ema_guide"] == g):
            return p
    return None


def _cell(p, chosen):
    if p is None:
        return "-"
    accuracy = f" ({p['classifier_accuracy']:.2f})" if "classifier_accuracy" in p else ""
    text = f"{p['classifier_fd']:.1f}{accuracy}"
    return f"**{text}**" if any(p is c for c in chosen.values()) else text



def comparison(points, chosen):
    """[(row, point)]: no guidance, CFG and autoguidance at the tracked EMA lengths (each at its best w
    there) and at the chosen ones: every method gets the same chance to gain from choosing."""
    def tracked(name):
        return min((p for p in points if p["name"] == name and p["ema_main"] == TRACKED["ema_main"]
                    and (name != "autoguidance" or p["ema_guide"] == TRACKED["ema_guide"])),
                   key=lambda p: p["classifier_fd"])
    row = lambda name, what: dict(name=name, paper=what)  # noqa: E731
    return [(row("EMA: no guidance, fixed", "tracked EMA"), tracked("no guidance")),
            (row("EMA: no guidance, post hoc", "chosen EMA"), chosen["no guidance"]),
            (row("EMA: CFG, fixed", "tracked EMA"), tracked("CFG")),
            (row("EMA: CFG, post hoc", "chosen EMA"), chosen["CFG"]),
            (row("EMA: autoguidance, fixed", "tracked EMA"), tracked("autoguidance")),
            (row("EMA: autoguidance, post hoc", "chosen EMA"), chosen["autoguidance"])]


def write_comparison(folder, suffix, rows, cfg):
    """The comparison's table (markdown and JSON); rows still to measure are marked pending."""
    lines = [f"EMA lengths fixed before training against chosen after (post-hoc EMA sweep), each at its best w: "
             f"classifier FD, precision / recall and class accuracy on {cfg['eval_samples']:,} fresh samples.", "",
             "| setting | EMA_m | EMA_g | w | classifier FD | classifier P / R | class acc. |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ema_m = _ema(r["main"])
        ema_g = _ema(r["guide"]) if "autoguidance" in r["row"] else "-"
        if r.get("pending"):
            lines.append(f"| {r['row'][5:]} | {ema_m} | {ema_g} | {r['weight']:g} | pending | | |")
            continue
        lines.append(f"| {r['row'][5:]} | {ema_m} | {ema_g} | {r['weight']:g} | {r['classifier_fd']:.2f} | "
                     f"{r['classifier_precision']:.3f} / {r['classifier_recall']:.3f} | {r['classifier_accuracy']:.3f} |")
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, f"fmnist_ema_final{suffix}.md"), lambda tmp: _write_text(tmp, "\n".join(lines) + "\n"))
    write_json(os.path.join(folder, f"fmnist_ema_final{suffix}.json"), rows)


def _ema(path):
    """The EMA length in a snapshot's file name: network-<images>-ema<sigma_rel>.safetensors."""
    return f"{float(path.rsplit('-ema', 1)[1][:-len('.safetensors')]):g}" if path else "-"
