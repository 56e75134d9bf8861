"""Command family for images: prep, train, sample, grid.

    python -m mini_autoguide prep  SRC_TREE OUT(.zip)         # ImageNet-style tree -> 64x64 PNGs
    python -m mini_autoguide train DATA --preset fmnist-main --out runs/main
    python -m mini_autoguide sample runs/main/network-...safetensors --guide ... --method autoguidance
    python -m mini_autoguide grid A.png B.png --titles a b --out side_by_side.png
"""
import argparse
import os
import sys
import time

from . import presets
from .checkpoint import refuse_existing
from .cli_args import UsageError, add_common, add_guidance_options, command, guidance_weight
from .generate import generate, load_models
from .image_files import save_outputs, side_by_side
from .prep import prepare
from .seeds import parse_seeds
from .train import TrainingDiverged, train


# The preset's training recipe, option by option (flag, TrainOptions field, type, help); unset, the preset's value.
RECIPE = [
    ("--kimg", "kimg", float, "train until this many thousand images"),
    ("--batch", "batch", int, "global batch size (split across processes)"),
    ("--lr", "lr_ref", float, "alpha_ref of lr = alpha_ref / sqrt(max(t / t_ref, 1))"),
    ("--lr-tref", "lr_tref", float, "t_ref in batches: when the lr starts to decay"),
    ("--rampup-kimg", "rampup_kimg", float, "linear lr warm-up over this many thousand images (0: none)"),
    ("--snapshot-kimg", "snapshot_kimg", float, "write EMA snapshots every this many thousand images"),
    ("--checkpoint-kimg", "checkpoint_kimg", float, "write the resume state this often (default: snapshot)"),
]


def register(sub):
    p = command(sub, "train", run_train, "train an image denoiser (EDM2 U-Net)",
                "Train an EDM2 U-Net denoiser. Resumes automatically from OUT/state.pt; writes EMA snapshots "
                "OUT/network-<images>-ema<sigma_rel>.safetensors every --snapshot-kimg (an early one can serve as"
                " the autoguidance guide). Multi-GPU/multi-node: launch with torchrun. Unset options take the "
                "preset's value.")
    p.add_argument("data", help="Fashion-MNIST IDX folder, prepared folder/ZIP with labels.json, or class-folder tree")
    p.add_argument("--preset", default="fmnist-main", choices=presets.names(), help="network size and training defaults")
    for flag, key, kind, text in RECIPE:
        p.add_argument(flag, dest=key, type=kind, help=text)
    p.add_argument("--ema", type=float, nargs="+", help="power-function EMA widths sigma_rel to track")
    p.add_argument("--label-dropout", type=float, help="drop class labels with this probability (for CFG)")
    p.add_argument("--uncond", action="store_true", help="ignore class labels: train an unconditional model")
    p.add_argument("--xflip", action="store_true", help="random horizontal flips")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32", "fp16"], default="auto",
                   help="bf16 autocast, fp32, or fp16 with loss scaling (GPU); auto = bf16 where it is fast "
                        "(GPU, CPU with AVX-512 BF16/AMX), else fp32")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="keep NCHW memory layout")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network: faster steps after a compilation (minutes on a CPU)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (file datasets)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and noise")
    p.add_argument("--max-steps", type=int, help="stop after this many steps of this call, with a checkpoint; the next call resumes")
    p.add_argument("--max-minutes", type=float, help="stop after this many minutes of this call, with a checkpoint; the next call resumes")
    add_common(p, "run folder (created; resumed if it holds state.pt)", "start over in an existing --out folder")

    p = command(sub, "sample", run_sample, "sample images, optionally guided",
                "Sample with the EDM Heun sampler. Each seed has its own noise generator and its class is "
                "classes[seed % len(classes)], so methods compare on identical noise. Writes OUT/<seed>.png, "
                "grid.png, samples.npz and info.json.")
    p.add_argument("main", help="main model snapshot (.safetensors from train)")
    add_guidance_options(p, "image", "guide snapshot: a smaller/shorter-trained model (autoguidance) or an "
                         "unconditional one (cfg; default: the main model with no label)", method="none")
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,5,10-12")
    p.add_argument("--classes", help="classes to cycle through, e.g. 3 or 0-9 (default: all)")
    p.add_argument("--steps", type=int, default=32, help="Heun steps (2 * steps - 1 evaluations)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="starting noise level")
    p.add_argument("--sigma-min", type=float, default=0.002, help="last nonzero noise level")
    p.add_argument("--batch", type=int, default=64, help="images per batch (results do not depend on it)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the networks: faster for thousands of samples, after a compilation of a minute or two")
    p.add_argument("--columns", type=int, help="grid columns (default: number of classes, or square)")
    add_common(p, "output folder")

    p = command(sub, "prep", run_prep, "class-folder tree -> 64x64 PNGs + labels.json",
                "ADM centre crop (box-downsample by 2 while the short side >= 2x the target, bicubic resize, "
                "centre crop) of every image of an ImageNet-style tree (one subfolder per class), into a folder "
                "or a .zip, with labels.json. Parallel; a folder output resumes where it stopped.")
    p.add_argument("src", help="source tree: SRC/<class>/<image>")
    p.add_argument("out", help="output folder, or a path ending in .zip")
    p.add_argument("--resolution", type=int, default=64, help="output size")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    add_common(p, device=False)

    p = command(sub, "grid", run_grid, "put images side by side with titles",
                "Lay out images (e.g. sample grids of several methods) left to right, with a title above each; "
                "--columns wraps them into rows.")
    p.add_argument("images", nargs="+", help="PNG files")
    p.add_argument("--titles", nargs="+", help="one title per image")
    p.add_argument("--columns", type=int, help="images per row (default: all in one row)")
    p.add_argument("--scale", type=int, default=2, help="nearest-neighbour upscaling factor")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--force", action="store_true", help="overwrite the output")


def _at_least_one(*options):
    """Refuse a count below 1; options: (flag, value) pairs, a value of None being unset."""
    for flag, value in options:
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")


def run_train(args):
    opts = {k: getattr(args, k) for k in [key for _, key, _, _ in RECIPE] + [
        "ema", "label_dropout", "xflip", "precision", "channels_last", "compile", "workers", "seed", "device",
        "max_steps", "max_minutes"]}
    for flag, key, _, _ in RECIPE:
        value = opts[key]
        if value is not None and not (value >= 0 if key == "rampup_kimg" else value > 0):  # NaN too
            raise UsageError(f"{flag} must be {'at least 0' if key == 'rampup_kimg' else 'positive'}, got {value}")
    if opts["label_dropout"] is not None and not 0 <= opts["label_dropout"] < 1:
        raise UsageError(f"--label-dropout must be in [0, 1), got {opts['label_dropout']}")
    try:
        summary = train(args.data, args.out, args.preset, force=args.force, cond=not args.uncond, progress=not args.quiet,
                        log=lambda m: print(m, file=sys.stderr), **opts)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"done: {summary['steps']} steps, {summary['img_per_s']:.1f} img/s, loss {summary['loss']:.4f}, "
          f"{summary['seconds']:.0f} s; snapshots in {args.out}", file=sys.stderr)


def run_sample(args):
    seeds = parse_seeds(args.seeds)
    classes = parse_seeds(args.classes) if args.classes else None
    _at_least_one(("--batch", args.batch), ("--steps", args.steps))
    for name in ("grid.png", "samples.npz"):   # before the slow part; save_outputs checks every file
        refuse_existing(os.path.join(args.out, name), args.force)
    main, guide = load_models(args.main, args.guide, args.method, args.device)
    t0 = time.time()
    weight = guidance_weight(args, "image")
    images, labels, _ = generate(main, guide, args.method, weight, args.interval, seeds, classes, args.steps,
                                 args.sigma_min, args.sigma_max, batch=args.batch, bf16=args.bf16,
                                 device=args.device, progress=not args.quiet, compile=args.compile)
    seconds = time.time() - t0
    info = dict(main=args.main, guide=args.guide, method=args.method, weight=weight, interval=args.interval,
                seeds=args.seeds, classes=args.classes, steps=args.steps, bf16=args.bf16, seconds=seconds,
                img_per_s=len(seeds) / seconds)
    columns = args.columns or (len(classes) if classes else main.num_classes) or None
    columns = min(columns, len(seeds)) if columns and columns <= 16 else None
    save_outputs(args.out, images, labels, seeds, info, columns, args.force)
    print(f"wrote {len(seeds)} samples to {args.out} ({seconds:.1f} s)", file=sys.stderr)


def run_prep(args):
    _at_least_one(("--resolution", args.resolution), ("--workers", args.workers))
    n = prepare(args.src, args.out, args.resolution, args.workers, force=args.force, progress=not args.quiet)
    print(f"prepared {n} images in {args.out}", file=sys.stderr)


def run_grid(args):
    if args.titles and len(args.titles) != len(args.images):
        raise UsageError(f"{len(args.images)} images but {len(args.titles)} titles")
    _at_least_one(("--columns", args.columns), ("--scale", args.scale))
    refuse_existing(args.out, args.force)
    side_by_side(args.images, args.titles, args.out, args.scale, args.columns)
