"""Evaluating image sets: feature spaces, cached reference statistics, one metrics dict.

A feature space is a callable uint8 images [N, C, H, W] -> float64 [N, D] with a .name and a .path
(its weights file): fid.Inception ("inception") or classifier.ClassifierFeatures ("classifier"). The
reference (real) statistics of a space and a dataset split (mean and covariance in float64, the
features themselves and their k-NN radii for precision/recall) are computed once and cached in
CACHE/ref-<space>-<split>.safetensors, whose header says what they were made from: the weights file
(its path, size and modification time), the dataset, its split, the image count and k. A cache whose
header does not match is recomputed (so a weights file rewritten in place counts as another network),
never silently reused.

Results: evaluate() returns {"n": N, "<space>_fd": ..., "<space>_precision":
..., "<space>_recall": ..., "classifier_accuracy": ...}; callers add the seeds.
"""
import json
import os
import time

import numpy as np
import torch

from . import metrics
from .checkpoint import atomic_write

K = 3  # k-NN precision/recall neighbourhood (Kynkaanniemi et al. 2019)


class Reference:
    """Real-image statistics in one feature space: mu [D], cov [D, D] (float64), features, radii."""

    def __init__(self, mu, cov, features, radii, info):
        self.mu, self.cov, self.features, self.radii, self.info = mu, cov, features, radii, info

    @classmethod
    def compute(cls, space, images, info, k=K, progress=False):
        return cls.from_features(space(images, progress=progress), info, k)

    @classmethod
    def from_features(cls, feats, info, k=K):
        mu, cov = metrics.gaussian_stats(feats)
        feats32 = torch.as_tensor(feats, dtype=torch.float32)
        return cls(mu, cov, feats32, metrics.knn_radii(feats32, k), dict(info, k=k, n=len(feats)))

    def save(self, path):
        from safetensors.torch import save_file
        tensors = dict(mu=torch.as_tensor(self.mu), cov=torch.as_tensor(self.cov),
                       features=self.features.contiguous(), radii=self.radii.contiguous())
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"info": json.dumps(self.info)}))

    @classmethod
    def load(cls, path):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("info", "{}"))
            t = {name: f.get_tensor(name) for name in f.keys()}
        return cls(t["mu"].numpy(), t["cov"].numpy(), t["features"], t["radii"], info)


def reference(space, images, cache_dir, dataset_name, split, k=K, progress=False, log=print):
    """The cached Reference of `images` (the real set) in `space`, computing it if needed; its info
    also holds the seconds the computation took."""
    st = os.stat(space.path)
    info = dict(space=space.name, weights=os.path.abspath(space.path), weights_bytes=st.st_size,
                weights_mtime_ns=st.st_mtime_ns, dataset=str(dataset_name), split=split, images=int(len(images)), k=k)
    path = os.path.join(cache_dir, f"ref-{space.name}-{split}.safetensors")
    if os.path.isfile(path):
        try:
            ref = Reference.load(path)
            if all(ref.info.get(key) == value for key, value in info.items()):
                return ref
            log(f"{path}: made from other inputs ({_diff(ref.info, info)}); recomputing")
        except Exception as e:  # a damaged cache is recomputed, not trusted
            log(f"{path}: unreadable ({' '.join(str(e).split())[:80]}); recomputing")
    log(f"computing {space.name} reference statistics of {len(images):,} {split} images -> {path}")
    t0 = time.time()
    ref = Reference.compute(space, images, info, k, progress)
    ref.info["seconds"] = round(time.time() - t0, 1)
    ref.save(path)
    return ref


def _diff(old, new):
    return ", ".join(f"{key} {old.get(key)!r} != {value!r}" for key, value in new.items() if old.get(key) != value)


def evaluate(images, spaces, refs, labels=None, precision_recall=True, progress=False):
    """Metrics of generated uint8 images [N, C, H, W] against refs[space.name] in each space.

    labels: the class each image was sampled for (classifier accuracy, if a
    classifier space is given). Returns a flat dict of floats plus "n".
    """
    out = {"n": int(len(images))}
    for space in spaces:
        ref = refs[space.name]
        feats = space(images, progress=progress)
        mu, cov = metrics.gaussian_stats(feats)
        out[f"{space.name}_fd"] = metrics.frechet_distance(ref.mu, ref.cov, mu, cov)
        if precision_recall:
            p, r = metrics.precision_recall(ref.features, torch.as_tensor(feats, dtype=torch.float32),
                                            k=ref.info.get("k", K), real_radii=ref.radii)
            out[f"{space.name}_precision"], out[f"{space.name}_recall"] = p, r
        if labels is not None and hasattr(space, "accuracy"):
            out[f"{space.name}_accuracy"] = space.accuracy(images, labels)
    return out


def to_nchw(images):
    """Sampler output uint8 [N, H, W, C] -> [N, C, H, W] (numpy)."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))


__all__ = ["Reference", "reference", "evaluate", "to_nchw", "K"]
