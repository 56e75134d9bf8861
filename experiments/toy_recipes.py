"""What makes a good bad model: the guide recipes (toy2d/guides.py) on the exact toy, over seeds.

Every recipe is a `toy reproduce --seeds` study on the same main models. The first recipe (the
paper's separate guide) trains each seed's main and unconditional models; each other recipe's
seed folder starts from copies of them, so its no-guidance, CFG and truncation points are the same
bits, and every difference between recipes is the guide's (paired, seed by seed).

    python experiments/toy_recipes.py --out runs/toy-recipes --seeds 0-9 [--fast]

OUT/<recipe>/ is that recipe's study (seed-<k>/metrics.json, summary.json); OUT/seconds.json
adds up each recipe's wall time. Resumable: a finished seed is read back, not rerun.
"""
import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mini_autoguide.checkpoint import write_json  # noqa: E402
from mini_autoguide.seeds import parse_seeds  # noqa: E402
from toy2d import guides  # noqa: E402
from toy2d.reproduce import Settings, reproduce_seeds, seed_dir  # noqa: E402

# Chosen before any was run: the paper's guide; the main network with its second or last hidden
# layer skipped, or at 1.5x the noise level; the main model's run at T/8 (the paper's guide length)
# and under a shorter EMA. The first trains the shared models; the cheapest come next.
RECIPES = ("separate", "skip:2", "skip:4", "sigma:1.5", "snapshot:512", "ema:0.003")
SHARED = ("main", "uncond")   # the models every recipe's run of a seed shares


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
            for name in SHARED if recipe != recipes[0] else ():
                source = os.path.join(seed_dir(os.path.join(out, folder(recipes[0])), seed), "models", f"{name}.safetensors")
                target = os.path.join(seed_dir(study, seed), "models", f"{name}.safetensors")
                if not os.path.exists(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copyfile(source, target)
        log(f"recipe {recipe}")
        t0 = time.perf_counter()
        reproduce_seeds(study, seeds, lambda s: replace(make_settings(s), guide_recipe=recipe), figures=False, log=log)
        seconds[recipe] = seconds.get(recipe, 0.0) + time.perf_counter() - t0
        write_json(seconds_path, seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (resumed when it exists)")
    parser.add_argument("--seeds", default="0-9", help="main seeds (default 0-9)")
    parser.add_argument("--fast", action="store_true", help="Settings.fast: minutes instead of hours (a check)")
    args = parser.parse_args()
    make_settings = Settings.fast if args.fast else paper
    recipes = tuple(r.replace("snapshot:512", "snapshot:128") for r in RECIPES) if args.fast else RECIPES
    run(args.out, parse_seeds(args.seeds), recipes, make_settings)


if __name__ == "__main__":
    main()
