"""`python -m mini_autoguide toy ...`: the 2D toy from the command line."""
import json
import os
from dataclasses import replace

from .cli_args import UsageError

HELP = "the 2D fractal toy: exact scores, training, sampling, metrics, figures"
METHOD_HELP = "none | cfg | autoguidance | truncation"


def register(sub):
    toy = sub.add_parser("toy", help=HELP, description=HELP)
    cmds = toy.add_subparsers(dest="toy_command", metavar="SUBCOMMAND", required=True)

    p = cmds.add_parser("reproduce", help="train the three models, sample every method, measure, plot",
                        description="The paper's toy experiment (Fig. 1-2) with exact metrics. Writes "
                        "DIR/metrics.json, DIR/samples/<method>.npz, DIR/models/*.safetensors and figures.")
    p.add_argument("--outdir", required=True, help="output directory (refused if it holds results, unless --force)")
    p.add_argument("--fast", action="store_true", help="about 15x less work (CI, notebooks); same qualitative result")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    p.add_argument("--seeds", help="run every seed of a list instead of --seed, e.g. 0-9: DIR/seed-<k>/ holds each "
                   "seed's run, DIR/summary.json each metric's per-seed values, mean, std, min and max, DIR/seeds.png "
                   "each seed's outcome; seeds already finished in DIR are read back, not rerun, so an interrupted study "
                   "resumes and a finished one grows (0-9 after 0-4)")
    p.add_argument("--guide-width", type=int, help="the autoguidance guide's hidden width (paper: 32)")
    p.add_argument("--guide-iterations", type=int, help="the guide's training iterations (paper: 512)")
    p.add_argument("--guide-ema", type=float, help="the guide's power-EMA length sigma_rel (paper: 0.010)")
    p.add_argument("--guide-weight", type=float, help="autoguidance's headline weight w (paper: 3; the sweep over w "
                   "runs either way)")
    _common(p)
    p.set_defaults(run=run_reproduce)

    p = cmds.add_parser("train", help="train one toy model", description="Train one toy model "
                        "(the paper's MP MLP) and save it as safetensors with its JSON config.")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--classes", default="A", help="A, B or AB (default A)")
    p.add_argument("--width", type=int, default=64, help="hidden width (default 64; the guide uses 32)")
    p.add_argument("--depth", type=int, default=4, help="hidden layers (default 4)")
    p.add_argument("--iterations", type=int, default=4096, help="training iterations (default 4096)")
    p.add_argument("--batch", type=int, default=4096, help="batch size (default 4096)")
    p.add_argument("--loss", default="exact", help="exact (score matching against the exact score, default) or dsm")
    p.add_argument("--lr", type=float, default=0.01, help="reference learning rate (default 0.01)")
    p.add_argument("--ema", type=float, default=0.010, help="power-EMA sigma_rel (default 0.010)")
    _common(p)
    p.set_defaults(run=run_train)

    p = cmds.add_parser("sample", help="sample a trained model with a guidance method",
                        description="Heun sampling from the exact class-A density at sigma_max; writes an .npz "
                        "with array x of shape [N, 2].")
    p.add_argument("--main", required=True, help="main model (.safetensors)")
    p.add_argument("--guide", help="guide model: the weak model (autoguidance) or the AB model (cfg)")
    p.add_argument("--method", default="autoguidance", help=METHOD_HELP + " (default autoguidance)")
    p.add_argument("--weight", type=float, default=3.0, help="guidance weight w, or the truncation factor (default 3)")
    p.add_argument("--interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only for LO <= sigma <= HI (default: always)")
    p.add_argument("-n", "--num", type=int, default=8192, help="number of samples (default 8192)")
    p.add_argument("--steps", type=int, default=32, help="Heun steps (default 32)")
    p.add_argument("--out", required=True, help="output .npz")
    _common(p)
    p.set_defaults(run=run_sample)

    p = cmds.add_parser("evaluate", help="exact metrics of sample files",
                        description="Mean exact log-density, outlier rate (outside 99% of the mass), branch "
                        "coverage (total variation) and k-NN precision/recall (k=3) against class A.")
    p.add_argument("samples", nargs="+", help=".npz files with an array x of shape [N, 2]")
    p.add_argument("--json", help="also write the results to this JSON file")
    _common(p, device=False)
    p.set_defaults(run=run_evaluate)

    p = cmds.add_parser("plot", help="redraw the figures of a reproduce directory",
                        description="Redraw samples.png, guide.png and sweep.png from DIR/metrics.json, "
                        "DIR/samples and DIR/models.")
    p.add_argument("--outdir", required=True, help="a directory written by 'toy reproduce'")
    p.set_defaults(run=run_plot)


def _common(p, device=True):
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    if device:
        p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--force", action="store_true", help="overwrite existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _check_device(args):
    import torch
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"device {args.device!r} is not available: {str(e).splitlines()[0]}")
    if args.device != "cpu":
        torch.set_default_device(args.device)


def _refuse_existing(path, force, what="output"):
    if os.path.exists(path) and not force:
        raise UsageError(f"{what} {path} already exists (use --force to overwrite)")


def run_reproduce(args):
    from toy2d.reproduce import Settings, reproduce
    from . import guidance
    _check_device(args)
    if os.path.isfile(args.outdir):
        raise UsageError(f"--outdir {args.outdir} is a file")

    recipe = {k: v for k, v in (("width", args.guide_width), ("iterations", args.guide_iterations),
                                ("ema_sigma_rel", args.guide_ema)) if v is not None}

    if args.guide_weight is not None:
        try:
            if not guidance.check_weight(args.guide_weight) > 0:
                raise ValueError(f"it must be positive, got {args.guide_weight}")
        except ValueError as e:
            raise UsageError(f"--guide-weight: {e}") from None

    def make_settings(seed):
        settings = Settings.fast(seed) if args.fast else Settings(seed=seed)
        settings.guide = replace(settings.guide, **recipe).check()
        if args.guide_weight is not None:
            settings.weights = dict(settings.weights, autoguidance=args.guide_weight)
        return settings

    make_settings(args.seed)   # a bad guide recipe is refused before anything runs

    if args.seeds is None:
        _refuse_existing(os.path.join(args.outdir, "metrics.json"), args.force, "results")
        if args.force:
            _clear_run(args.outdir)
        reproduce(args.outdir, make_settings(args.seed), progress=not args.quiet, figures=not args.no_figures)
        return
    from toy2d.seeds import reproduce_seeds, seed_dir
    from .seeds import parse_seeds
    seeds = sorted(set(parse_seeds(args.seeds)))
    if not _extends(os.path.join(args.outdir, "summary.json"), seeds):
        _refuse_existing(os.path.join(args.outdir, "summary.json"), args.force, "results")
    if args.force:
        for seed in seeds:
            _clear_run(seed_dir(args.outdir, seed))
    reproduce_seeds(args.outdir, seeds, make_settings, progress=not args.quiet, figures=not args.no_figures)


def _extends(summary_path, seeds):
    """True when summary_path is a seeds summary of a subset of `seeds`: rewriting it from the
    seed folders (finished ones are read back) loses nothing, so a study can grow."""
    try:
        with open(summary_path) as f:
            old = json.load(f)["seeds"]
        return set(old) <= set(seeds)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _clear_run(outdir):
    """--force: a run's results and models go, so that nothing of the old run is read back."""
    import shutil
    if os.path.isdir(os.path.join(outdir, "models")):
        shutil.rmtree(os.path.join(outdir, "models"))
    if os.path.isfile(os.path.join(outdir, "metrics.json")):
        os.unlink(os.path.join(outdir, "metrics.json"))


def run_train(args):
    from toy2d.reproduce import save_toy
    from toy2d.train import ToyConfig, train
    _check_device(args)
    _refuse_existing(args.out, args.force)
    config = ToyConfig(classes=args.classes, width=args.width, depth=args.depth, iterations=args.iterations,
                       batch=args.batch, loss=args.loss, lr=args.lr, ema_sigma_rel=args.ema, seed=args.seed)
    config.check()
    net, losses = train(config, progress=not args.quiet)
    save_toy(args.out, net, config)
    print(f"saved {args.out} (final loss {sum(losses[-16:]) / len(losses[-16:]):.4f})")


def run_sample(args):
    import numpy as np
    from mini_autoguide import guidance
    from mini_autoguide.checkpoint import write_npz
    from toy2d.reproduce import Settings, load_toy, sample, start_points
    _check_device(args)
    guidance.check_method(args.method)
    guidance.check_weight(args.weight)
    guidance.check_interval(args.interval)
    if args.num < 1 or args.steps < 1:
        raise UsageError("--num and --steps must be positive")
    _refuse_existing(args.out, args.force)
    main, _ = load_toy(args.main)
    guide = None
    if args.method in ("cfg", "autoguidance"):
        if not args.guide:
            raise UsageError(f"--method {args.method} needs --guide")
        guide, _ = load_toy(args.guide)
        if guide.config["dim"] != main.config["dim"]:
            raise UsageError(f"guide works in {guide.config['dim']} dimensions, main in {main.config['dim']}")
    settings = replace(Settings(seed=args.seed), samples=args.num, steps=args.steps)
    D = guidance.make(args.method, main, guide, args.weight, args.interval)
    x = sample(D, start_points(settings), settings, progress=not args.quiet)
    write_npz(args.out, x=np.asarray(x, dtype=np.float32))
    print(f"wrote {args.out}: {len(x)} samples, mean {np.round(x.mean(0).numpy(), 3)}")


def run_evaluate(args):
    import numpy as np
    from toy2d.metrics import ToyMetrics
    if args.json:
        _refuse_existing(args.json, args.force)
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
    metrics = ToyMetrics("A", seed=args.seed + 12345)
    results = {path: metrics(x) for path, x in arrays.items()}
    keys = ("mean_logp", "outliers", "branch_tv", "precision", "recall")
    width = max(len(p) for p in results)
    print(f"{'samples':<{width}}" + "".join(f"{k:>11}" for k in keys))
    for path, r in results.items():
        print(f"{path:<{width}}" + "".join(f"{r[k]:>11.3f}" for k in keys))
    if args.json:
        from .checkpoint import write_json
        write_json(args.json, results)


def run_plot(args):
    import numpy as np
    from toy2d import plots
    from toy2d.reproduce import Settings, load_toy
    path = os.path.join(args.outdir, "metrics.json")
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found: run 'toy reproduce --outdir {args.outdir}' first")
    with open(path) as f:
        report = json.load(f)
    nets = {name: load_toy(os.path.join(args.outdir, "models", f"{name}.safetensors"))[0]
            for name in ("main", "guide", "uncond")}
    samples = {}
    for name in ("truth", "none", "autoguidance", "cfg", "truncation"):
        with np.load(os.path.join(args.outdir, "samples", f"{name}.npz")) as f:
            samples[name] = f["x"]
    s = report["settings"]
    settings = replace(Settings(seed=s["seed"]), steps=s["steps"], sigma_min=s["sigma_min"],
                       sigma_max=s["sigma_max"], rho=s["rho"], weights=s["weights"])
    plots.all_figures(args.outdir, nets, samples, report, settings)
    print(f"wrote figures to {args.outdir}")
