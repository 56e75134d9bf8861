"""`python -m mini_autoguide ema RUN --sigma-rel S --out FILE`: post-hoc EMA (EDM2, arXiv 2312.02696, Sec. 3).

    python -m mini_autoguide ema runs/main --sigma-rel 0.07 --out runs/main-ema0.07.safetensors
    python -m mini_autoguide ema runs/main --sigma-rel 0.15 --at 96 --out runs/main-96k-ema0.15.safetensors
"""
import argparse
import os
import sys
import textwrap

from .checkpoint import refuse_existing
from .cli_args import UsageError
from .posthoc import reconstruct, save_reconstruction

HELP = "post-hoc EMA: rebuild a model of any EMA length from a run's snapshots"


def register(sub):
    about = textwrap.fill(
        "Post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3): train once, choose the EMA length afterwards. "
        "`train` tracks power-function EMAs (sigma_rel 0.05 and 0.10 by default) and writes both every "
        "--snapshot-kimg; the EMA of any other sigma_rel, at the last snapshot or at an earlier time, is a "
        "weighted sum of those snapshots, with weights fitted by least squares to its averaging profile. "
        "FILE is a snapshot like train's: `sample` and `eval` read it as one. Prints the snapshots used and "
        "their weights.", 92)
    example = ("example:\n"
               "  python -m mini_autoguide ema runs/fmnist/main --sigma-rel 0.07 --out main-ema0.07.safetensors\n"
               "  python -m mini_autoguide sample main-ema0.07.safetensors --out samples/ema0.07")
    p = sub.add_parser("ema", formatter_class=argparse.RawDescriptionHelpFormatter, help=HELP, description=about,
                       epilog=example)
    p.add_argument("run_dir", metavar="RUN",
                   help="training run folder (holds network-<images>-ema<sigma_rel>.safetensors)")
    p.add_argument("--sigma-rel", type=float, required=True, metavar="S",
                   help="EMA length to rebuild: the profile's width relative to the training time, in (0, 0.2887)")
    p.add_argument("--at", type=float, metavar="KIMG",
                   help="time in thousand images, at most the last snapshot's (default: the last snapshot)")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors")
    p.add_argument("--force", action="store_true", help="overwrite FILE")
    p.set_defaults(run=run_ema)


def run_ema(args):
    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a folder: give a file name")
    refuse_existing(args.out, args.force)   # before the work, and again at the write
    state, info = reconstruct(args.run_dir, args.sigma_rel, args.at)
    ph = info["posthoc"]
    print(f"sigma_rel {info['sigma_rel']:g} at {info['nimg'] / 1000:g} kimg from {len(ph['snapshots'])} snapshots "
          f"(relative L2 error of the averaging profile {ph['residual']:.2g}):")
    for name, c in zip(ph["snapshots"], ph["coefficients"]):
        print(f"  {c:+12.6g}  {name}")
    if ph["residual"] > 0.1:
        print("warning: the snapshots fit this profile poorly; one nearer the tracked sigma_rel, or at a "
              "snapshot's time, fits better", file=sys.stderr)
    save_reconstruction(args.out, state, info, force=args.force)
    print(f"wrote {args.out}")
