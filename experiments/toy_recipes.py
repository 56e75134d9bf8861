"""What makes a good bad model: the guide recipes (toy2d/guides.py) on the exact toy, over seeds.

Every recipe is a `toy reproduce --seeds` study on the same main models. The first recipe (the
paper's separate guide) trains each seed's main and unconditional models; each other recipe's
seed folder starts from copies of them, so its no-guidance, CFG and truncation points are the same
bits, and every difference between recipes is the guide's (paired, seed by seed).

    python experiments/toy_recipes.py --out runs/toy-recipes --seeds 0-9 [--fast]
    python experiments/toy_recipes.py --out runs/toy-recipes --report docs/results/toy_recipes

OUT/<recipe>/ is that recipe's study (seed-<k>/metrics.json, summary.json); OUT/seconds.json
adds up each recipe's wall time. Resumable: a finished seed is read back, not rerun.
--report writes PREFIX.json (every point: per-seed values, mean, std, and the paired change
against no guidance; each guide's score error against main's), PREFIX.md (each method at its best
w by RULE) and PREFIX.png (the frontier).
"""
import argparse
import json
import math
import os
import pathlib
import shutil
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mini_autoguide.checkpoint import atomic_write, write_json  # noqa: E402
from mini_autoguide.seeds import parse_seeds  # noqa: E402
from mini_autoguide.guidance import METHODS  # noqa: E402
from toy2d import guides, plots  # noqa: E402
from toy2d import gmm  # noqa: E402
from toy2d.reproduce import MODELS, Settings, point, reproduce_seeds, seed_dir  # noqa: E402
from toy2d.train import load_toy  # noqa: E402

# Chosen before any was run: the paper's guide; the main network with its second or last hidden
# layer skipped, or at 1.5x the noise level; the main model's run at T/8 (the paper's guide length)
# and under a shorter EMA; the paper's guide with strong weight decay; a main model trained with
# dropout 0.1 (the rate of EDM2's larger networks, arXiv 2312.02696), guided by itself with dropout
# on. The first trains the shared models; the cheapest come next.
RECIPES = ("separate", "skip:2", "skip:4", "sigma:1.5", "snapshot:512", "decay:0.1", "ema:0.003", "dropout:0.1")
SHARED = ("main", "uncond")   # the models every recipe's run of a seed shares
RECALL_FLOOR = 0.9
RULE = f"the w with the fewest mean outliers among those with mean recall >= {RECALL_FLOOR} (else the highest recall)"
SHOWN = ("outliers", "recall", "precision", "branch_tv", "mean_logp")
RECIPE_STYLES = [("#d62728", "^"), ("#ff7f0e", "<"), ("#8c564b", ">"), ("#000000", "x"), ("#17becf", "o"),
                 ("#bcbd22", "P"), ("#7f7f7f", "*"), ("#e377c2", "h")]   # colour and marker a recipe


def folder(recipe):
    return recipe.replace(":", "-")


def paper(seed):
    return Settings(seed=seed)


def run(out, seeds, recipes=RECIPES, make_settings=paper, log=print):
    """Each recipe's study in OUT/<recipe>/, on the first recipe's main and unconditional models.
    make_settings(seed) -> the Settings of a seed's run."""
    seconds_path = os.path.join(out, "seconds.json")
    seconds = json.load(open(seconds_path)) if os.path.exists(seconds_path) else {}
    for recipe in recipes:
        guides.check(recipe, make_settings(0).main)
    for recipe in recipes:
        study = os.path.join(out, folder(recipe))
        for seed in seeds:
            mine, first = (_settings(make_settings, seed, r) for r in (recipe, recipes[0]))
            for name in SHARED if recipe != recipes[0] else ():
                if mine.config(name) != first.config(name):
                    continue   # this recipe trains its own (dropout:P its main model)
                source = os.path.join(seed_dir(os.path.join(out, folder(recipes[0])), seed), "models", f"{name}.safetensors")
                target = os.path.join(seed_dir(study, seed), "models", f"{name}.safetensors")
                if not os.path.exists(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copyfile(source, target)
        log(f"recipe {recipe}")
        t0 = time.perf_counter()
        reproduce_seeds(study, seeds, lambda s: _settings(make_settings, s, recipe), figures=False, log=log)
        seconds[recipe] = seconds.get(recipe, 0.0) + time.perf_counter() - t0
        write_json(seconds_path, seconds)


def _settings(make_settings, seed, recipe):
    return replace(make_settings(seed), guide_recipe=recipe)


def curve(summary, method, none):
    """One method's points over w from a seeds summary, each metric's mean, std and the paired
    change against no guidance (per seed: this point minus none on the same main model)."""
    weights = sorted({p["weight"] for p in summary["points"] if p["method"] == method})
    c = dict(weights=weights)
    for key in SHOWN:
        rows = [point(summary, method, w)["metrics"][key] for w in weights]
        change = [[a - b for a, b in zip(r["per_seed"], none["metrics"][key]["per_seed"])] for r in rows]
        c[key] = dict(mean=[r["mean"] for r in rows], std=[r["std"] for r in rows],
                      change_mean=[sum(d) / len(d) for d in change],
                      change_std=[math.sqrt(sum((v - sum(d) / len(d)) ** 2 for v in d) / max(len(d) - 1, 1))
                                  for d in change],
                      seeds_better=[r.get("beats_none") for r in rows])
    return c


def _run(out, recipe, seed):
    """A finished run's folder and Settings."""
    run = seed_dir(os.path.join(out, folder(recipe)), seed)
    with open(os.path.join(run, "metrics.json")) as f:
        return run, Settings.from_json(json.load(f)["settings"])


def alignment(out, recipe, seed):
    """guides.error_alignment of a finished run's guide against its main model."""
    run, settings = _run(out, recipe, seed)
    main, _ = load_toy(os.path.join(run, "models", "main.safetensors"))
    if settings.config("guide") is None:
        guide = guides.weakened(recipe, main, settings.seed * 10 + MODELS.index("guide"))
    else:
        guide, _ = load_toy(os.path.join(run, "models", "guide.safetensors"))
    return guides.error_alignment(main, guide, gmm(settings.main.classes), seed=seed)


def best(c):
    """The index of c's point chosen by RULE."""
    ok = [i for i, r in enumerate(c["recall"]["mean"]) if r >= RECALL_FLOOR]
    if not ok:
        return max(range(len(c["weights"])), key=lambda i: c["recall"]["mean"][i])
    return min(ok, key=lambda i: c["outliers"]["mean"][i])


def report(out, prefix, recipes=RECIPES):
    """The recipes' curves, CFG's and truncation's (from the first recipe's study, which shares
    their models), the table and the frontier figure."""
    summaries = {r: json.load(open(os.path.join(out, folder(r), "summary.json"))) for r in recipes
                 if os.path.exists(os.path.join(out, folder(r), "summary.json"))}
    first = summaries[recipes[0]]
    none = point(first, "none")
    curves = {f"autoguidance, {r}": curve(summ, "autoguidance", point(summ, "none")) for r, summ in summaries.items()}
    for r, summ in summaries.items():   # the guide's error against main's, mean over seeds at each sigma
        per_seed = [alignment(out, r, seed) for seed in summ["seeds"]]
        curves[f"autoguidance, {r}"]["error_alignment"] = {
            str(sigma): dict(cosine=sum(a[sigma][0] for a in per_seed) / len(per_seed),
                             length_ratio=sum(a[sigma][1] for a in per_seed) / len(per_seed))
            for sigma in per_seed[0]}
    curves.update({METHODS[m].label: curve(first, m, none) for m in ("cfg", "truncation")})
    cost = {f"autoguidance, {r}": _extra_training(r, out, first["seeds"][0]) for r in summaries}
    cost.update({METHODS["cfg"].label: _extra_training(recipes[0], out, first["seeds"][0], "uncond"),
                 METHODS["truncation"].label: 0})
    calls = 2 * _run(out, recipes[0], first["seeds"][0])[1].steps - 1   # Heun: two evaluations a step, one on the last
    result = dict(seeds=first["seeds"], rule=RULE, none={k: none["metrics"][k] for k in SHOWN}, curves=curves,
                  extra_training_iterations=cost, network_evaluations_unguided=calls,
                  seconds=json.load(open(os.path.join(out, "seconds.json"))))
    write_json(prefix + ".json", result)
    rows = [f"{len(first['seeds'])} seeds; each method at its best w ({RULE}); mean ± std over seeds, and "
            "the paired change against no guidance with the seeds on which it helps.", "",
            "| method | w | outliers | change | recall | change | precision | extra training (iterations) | "
            "network evaluations a sample | guide's error against main's: cosine, length ratio (mean over σ) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| no guidance | 1 | {_ms(none['metrics']['outliers'])} | | {_ms(none['metrics']['recall'])} | | "
            f"{_ms(none['metrics']['precision'])} | 0 | {calls} | |"]
    for label, c in curves.items():
        i = best(c)
        o, r, p = c["outliers"], c["recall"], c["precision"]
        rows.append(f"| {label} | {c['weights'][i]:g} | {o['mean'][i]:.3f} ± {o['std'][i]:.3f} | "
                    f"{o['change_mean'][i]:+.3f} [{o['seeds_better'][i]}] | {r['mean'][i]:.3f} ± {r['std'][i]:.3f} | "
                    f"{r['change_mean'][i]:+.3f} | {p['mean'][i]:.3f} ± {p['std'][i]:.3f} | "
                    f"{cost[label]} | {calls * (1 if label == 'truncation' or c['weights'][i] == 1 else 2)} | "
                    f"{_alignment_cell(c)} |")
    atomic_write(prefix + ".md", lambda tmp: pathlib.Path(tmp).write_text("\n".join(rows) + "\n"))
    styles = {METHODS[m].label: METHODS[m].style for m in ("cfg", "truncation")}
    plots.frontier_figure(prefix + ".png", [
        dict(c, label=label, style=styles.get(label, (*RECIPE_STYLES[k % len(RECIPE_STYLES)], "-")))
        for k, (label, c) in enumerate(curves.items())])
    return result


def _extra_training(recipe, out, seed, model="guide"):
    """The iterations trained for a run's guide (or its unconditional model), from the settings the
    run recorded: 0 for a guide made from the main network."""
    config = _run(out, recipe, seed)[1].config(model)
    return 0 if config is None else config.iterations


def _alignment_cell(c):
    if "error_alignment" not in c:
        return ""
    a = list(c["error_alignment"].values())
    return f"{sum(v['cosine'] for v in a) / len(a):.2f}, {sum(v['length_ratio'] for v in a) / len(a):.2f}"


def _ms(stats):
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (resumed when it exists)")
    parser.add_argument("--seeds", default="0-9", help="main seeds (default 0-9)")
    parser.add_argument("--fast", action="store_true", help="Settings.fast: minutes instead of hours (a check)")
    parser.add_argument("--report", metavar="PREFIX", help="write PREFIX.json, .md and .png from OUT; run nothing")
    args = parser.parse_args()
    if args.report:
        report(args.out, args.report)
        return
    make_settings = Settings.fast if args.fast else paper
    recipes = tuple(r.replace("snapshot:512", "snapshot:128") for r in RECIPES) if args.fast else RECIPES
    run(args.out, parse_seeds(args.seeds), recipes, make_settings)


if __name__ == "__main__":
    main()
