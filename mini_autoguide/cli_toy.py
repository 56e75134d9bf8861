"""`python -m mini_autoguide toy ...`: the 2D toy from the command line.

    python -m mini_autoguide toy reproduce --out runs/toy [--fast] [--seeds 0-9]
    python -m mini_autoguide toy train --out main.safetensors --width 64
    python -m mini_autoguide toy sample main.safetensors --guide guide.safetensors --out x.npz
    python -m mini_autoguide toy evaluate x.npz
    python -m mini_autoguide toy plot runs/toy

Each command imports the toy package (toy2d) when it runs: the library never imports the package
that stands on it (tests/test_readme.py checks), and the import costs only about 25 ms.
"""
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import torch

from . import guidance
from .checkpoint import refuse_existing, write_json, write_npz
from .cli_args import UsageError, add_common, add_guidance_options, command, family, guidance_weight
from .seeds import parse_seeds


def register(sub):
    cmds = family(sub, "toy", "the 2D fractal toy: exact scores, training, sampling, metrics, figures")

    p = command(cmds, "reproduce", run_reproduce, "train the three models, sample every method, measure, plot",
                "The paper's toy experiment (Fig. 1-2) with exact metrics. Writes OUT/metrics.json, "
                "OUT/samples/<method>.npz, OUT/models/*.safetensors and figures.")
    p.add_argument("--fast", action="store_true", help="about 15x less work (CI, notebooks); same qualitative result")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--seed", type=int, default=0, help="random seed of the run (default 0)")
    p.add_argument("--seeds", help="run every seed of a list instead of --seed, e.g. 0-9: OUT/seed-<k>/ holds each "
                   "seed's run, OUT/summary.json each metric's per-seed values, mean, std, min and max, OUT/seeds.png "
                   "each seed's outcome; seeds already finished in OUT are read back, not rerun, so an interrupted study "
                   "resumes and a finished one grows (0-9 after 0-4)")
    p.add_argument("--guide-recipe", default="separate", metavar="NAME[:VALUE]",
                   help="which weaker model guides the main one (default: separate): "
                   + "; ".join(f"{usage} = {text}" for usage, _, text in guidance.GUIDE_RECIPES.values())
                   + " (more in toy2d/guides.py)")
    p.add_argument("--guide-width", type=int, help="the autoguidance guide's hidden width (paper: 32)")
    p.add_argument("--guide-iterations", type=int, help="the guide's training iterations (paper: 512)")
    p.add_argument("--guide-ema", type=float, help="the guide's power-EMA length sigma_rel (paper: 0.010)")
    p.add_argument("--guide-weight", type=float, help="autoguidance's headline weight w (paper: 3; the sweep over w "
                   "runs either way)")
    add_common(p, "output folder (refused if it holds results, unless --force)")

    p = command(cmds, "train", run_train, "train one toy model",
                "Train one toy model (the paper's MP MLP) and save it as safetensors with its JSON config.")
    p.add_argument("--classes", default="A", help="A, B or AB")
    p.add_argument("--width", type=int, default=64, help="hidden width (the paper's guide: 32)")
    p.add_argument("--depth", type=int, default=4, help="hidden layers")
    p.add_argument("--iterations", type=int, default=4096, help="training iterations")
    p.add_argument("--batch", type=int, default=4096, help="batch size")
    p.add_argument("--loss", default="exact", help="exact (score matching against the exact score) or dsm")
    p.add_argument("--lr", type=float, default=0.01, help="reference learning rate")
    p.add_argument("--ema", type=float, default=0.010, help="power-EMA sigma_rel")
    add_common(p, "output .safetensors file", seed_help="seed of the initial weights and the batches (default 0)")

    p = command(cmds, "sample", run_sample, "sample a trained model with a guidance method",
                "Heun sampling from the exact class-A density at sigma_max; writes an .npz with array x of shape "
                "[N, 2].")
    p.add_argument("main", help="main model (.safetensors from toy train)")
    add_guidance_options(p, "toy", "guide model: the weak model (autoguidance) or the AB model (cfg)")
    p.add_argument("-n", "--num", type=int, default=8192, help="number of samples")
    p.add_argument("--steps", type=int, default=32, help="Heun steps")
    add_common(p, "output .npz", seed_help="seed of the starting points (default 0)")

    p = command(cmds, "evaluate", run_evaluate, "exact metrics of sample files",
                "Mean exact log-density, outlier rate (outside 99% of the mass), branch coverage (total "
                "variation) and k-NN precision/recall (k=3) against class A.")
    p.add_argument("samples", nargs="+", help=".npz files with an array x of shape [N, 2]")
    p.add_argument("--json", help="also write the results to this JSON file")
    add_common(p, device=False, seed_help="seed of the metrics' reference samples (default 0)")

    p = command(cmds, "plot", run_plot, "redraw the figures of a reproduce folder",
                "Redraw samples.png, guide.png and sweep.png from DIR/metrics.json, DIR/samples and DIR/models.")
    p.add_argument("dir", help="a folder written by 'toy reproduce'")


def _use_device(args):
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"device {args.device!r} is not available: {str(e).splitlines()[0]}")
    if args.device != "cpu":
        torch.set_default_device(args.device)


def run_reproduce(args):
    from toy2d import guides
    from toy2d.reproduce import Settings, reproduce, reproduce_seeds, seed_dir
    _use_device(args)
    if os.path.isfile(args.out):
        raise UsageError(f"--out {args.out} is a file")
    separate_guide = {k: v for k, v in (("width", args.guide_width), ("iterations", args.guide_iterations),
                                ("ema_sigma_rel", args.guide_ema)) if v is not None}
    if args.guide_weight is not None:
        try:
            if not guidance.check_weight(args.guide_weight) > 0:
                raise ValueError(f"it must be positive, got {args.guide_weight}")
        except ValueError as e:
            raise UsageError(f"--guide-weight: {e}") from None

    def make_settings(seed):
        settings = Settings.fast(seed) if args.fast else Settings(seed=seed)
        settings.guide = replace(settings.guide, **separate_guide).check()
        try:
            settings.guide_recipe = guides.check(args.guide_recipe, settings.main)
        except ValueError as e:
            raise UsageError(f"--guide-recipe: {e}") from None
        if separate_guide and guidance.parse_recipe(args.guide_recipe)[0] != "separate":
            raise UsageError("--guide-width, --guide-iterations and --guide-ema shape the separate guide: "
                             f"drop them or use --guide-recipe separate, not {args.guide_recipe}")
        if args.guide_weight is not None:
            settings.weights = dict(settings.weights, autoguidance=args.guide_weight)
        return settings

    make_settings(args.seed)   # a bad guide recipe is refused before anything runs
    if args.seeds is None:
        refuse_existing(os.path.join(args.out, "metrics.json"), args.force, "results")
        if args.force:
            _clear_run(args.out)
        reproduce(args.out, make_settings(args.seed), progress=not args.quiet, figures=not args.no_figures)
        return
    seeds = sorted(set(parse_seeds(args.seeds)))
    if not _extends(os.path.join(args.out, "summary.json"), seeds):
        refuse_existing(os.path.join(args.out, "summary.json"), args.force, "results")
    if args.force:
        for seed in seeds:
            _clear_run(seed_dir(args.out, seed))
    reproduce_seeds(args.out, seeds, make_settings, progress=not args.quiet, figures=not args.no_figures)


def _extends(summary_path, seeds):
    """True when summary_path is a seeds summary of a subset of `seeds`: rewriting it from the
    seed folders (finished ones are read back) loses nothing, so a study can grow."""
    try:
        with open(summary_path) as f:
            old = json.load(f)["seeds"]
        return set(old) <= set(seeds)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _clear_run(folder):
    """--force: a run's results and models go, so that nothing of the old run is read back."""
    if os.path.isdir(os.path.join(folder, "models")):
        shutil.rmtree(os.path.join(folder, "models"))
    if os.path.isfile(os.path.join(folder, "metrics.json")):
        os.unlink(os.path.join(folder, "metrics.json"))


def run_train(args):
    from toy2d.train import ToyConfig, save_toy, train
    _use_device(args)
    refuse_existing(args.out, args.force)
    config = ToyConfig(classes=args.classes, width=args.width, depth=args.depth, iterations=args.iterations,
                       batch=args.batch, loss=args.loss, lr=args.lr, ema_sigma_rel=args.ema, seed=args.seed).check()
    net, losses = train(config, progress=not args.quiet)
    save_toy(args.out, net, config)
    print(f"saved {args.out} (final loss {sum(losses[-16:]) / len(losses[-16:]):.4f})")


def run_sample(args):
    from toy2d.reproduce import Settings
    from toy2d.train import load_toy
    _use_device(args)
    if args.num < 1 or args.steps < 1:
        raise UsageError("--num and --steps must be positive")
    weight = guidance.check_weight(guidance_weight(args, "toy"))
    guidance.check_interval(args.interval)
    refuse_existing(args.out, args.force)
    main, guide = load_toy(args.main)[0], None
    if args.method in ("cfg", "autoguidance"):
        if not args.guide:
            raise UsageError(f"--method {args.method} needs --guide")
        guide, _ = load_toy(args.guide)
        if guide.config["dim"] != main.config["dim"]:
            raise UsageError(f"guide works in {guide.config['dim']} dimensions, main in {main.config['dim']}")
    settings = Settings(seed=args.seed, samples=args.num, steps=args.steps)
    x = settings.sample(guidance.make(args.method, main, guide, weight, args.interval), settings.start_points(),
                        progress=not args.quiet)
    write_npz(args.out, x=np.asarray(x, dtype=np.float32))
    print(f"wrote {args.out}: {len(x)} samples, mean {np.round(x.mean(0).numpy(), 3)}")


def run_evaluate(args):
    from toy2d.reproduce import METRICS, Settings
    if args.json:
        refuse_existing(args.json, args.force)
    arrays = {}
    for path in args.samples:
        try:
            with np.load(path, allow_pickle=False) as f:
                x = f["x"]
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"cannot read samples from {path}: {e}")
        if x.ndim != 2 or x.shape[1] != 2 or len(x) < 4:
            raise UsageError(f"{path}: x must have shape [N, 2] with N >= 4, got {list(x.shape)}")
        if not np.isfinite(x).all():
            raise UsageError(f"{path}: samples contain non-finite values")
        arrays[path] = x
    metrics = Settings(seed=args.seed).metrics()
    results = {path: metrics(x) for path, x in arrays.items()}
    width = max(len(p) for p in results)
    print(f"{'samples':<{width}}" + "".join(f"{k:>11}" for k in METRICS))
    for path, r in results.items():
        print(f"{path:<{width}}" + "".join(f"{r[k]:>11.3f}" for k in METRICS))
    if args.json:
        write_json(args.json, results)


def run_plot(args):
    from toy2d.reproduce import MODELS, Settings, draw
    from toy2d.train import load_toy
    path = os.path.join(args.dir, "metrics.json")
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found: run 'toy reproduce --out {args.dir}' first")
    with open(path) as f:
        report = json.load(f)
    nets = {name: load_toy(os.path.join(args.dir, "models", f"{name}.safetensors"))[0] for name in MODELS}
    samples = {}
    for name in ("truth", *guidance.METHODS):
        with np.load(os.path.join(args.dir, "samples", f"{name}.npz")) as f:
            samples[name] = f["x"]
    draw(args.dir, nets, samples, report, Settings.from_json(report["settings"]))
    print(f"wrote figures to {args.dir}")
