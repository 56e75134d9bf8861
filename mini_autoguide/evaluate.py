"""Evaluating image sets: feature spaces, cached reference statistics, one metrics dict.

A feature space is a callable uint8 images [N, C, H, W] -> float64 [N, D]
with a .name and a .path (its weights file): fid.Inception ("inception") or
classifier.ClassifierFeatures ("classifier"). For each space and dataset the
reference (real) statistics are computed once and cached in a safetensors
file: mean and covariance in float64, the features themselves and their k-NN
radii for precision/recall, and a header saying what they were made from
(the weights' SHA-256, the dataset, its split and image count). A cache whose
header does not match is recomputed, never silently reused.

Results: evaluate() returns {"n": N, "<space>_fd": ..., "<space>_precision":
..., "<space>_recall": ..., "classifier_accuracy": ...}; callers add the seeds.
"""
import hashlib
import json
import os
import time

import numpy as np
import torch

from . import metrics
from .checkpoint import atomic_write, write_json

K = 3  # k-NN precision/recall neighbourhood (Kynkaanniemi et al. 2019)


def file_digest(path, _cache={}):
    """SHA-256 of a file's content (memoised per path, size and mtime). For safetensors, of its
    header with sorted keys, then its tensor bytes: the library writes the metadata in an order
    that changes from one save to the next, so equal models would otherwise hash differently."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if os.fspath(path).endswith(".safetensors"):
                size = int.from_bytes(f.read(8), "little")
                h.update(json.dumps(json.loads(f.read(size)), sort_keys=True).encode())
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _cache[key] = h.hexdigest()
    return _cache[key]


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
    """The cached Reference of `images` (the real set) in `space`, computing it if needed."""
    info = dict(space=space.name, weights_sha256=file_digest(space.path), dataset=str(dataset_name),
                split=split, images=int(len(images)), k=k)
    path = os.path.join(cache_dir, f"ref-{space.name}-{split}-{info['weights_sha256'][:12]}.safetensors")
    if os.path.isfile(path):
        try:
            ref = Reference.load(path)
            if all(ref.info.get(key) == value for key, value in info.items()):
                return ref
            log(f"{path}: made from other inputs ({_diff(ref.info, info)}); recomputing")
        except Exception as e:  # a damaged cache is recomputed, not trusted
            log(f"{path}: unreadable ({' '.join(str(e).split())[:80]}); recomputing")
    log(f"computing {space.name} reference statistics of {len(images):,} {split} images -> {path}")
    partial = f"{path}.{len(images)}-images.partial"
    t0 = time.time()
    feats, seconds_before = _features_resumable(space, images, partial, progress, log)
    ref = Reference.from_features(feats, info, k)
    ref.info["seconds"] = round(seconds_before + time.time() - t0, 1)  # kept with the cache, for reports
    ref.save(path)
    _remove_partial(partial)
    return ref


def _features_resumable(space, images, partial, progress, log, block=500):
    """space(images) in blocks, keeping the finished blocks in PARTIAL.npy (+ .json: seconds spent),
    so that an interrupted reference (Inception: 26 minutes for 10,000 images on 2 cores) resumes.
    Returns (features [N, D], seconds spent before this call)."""
    done, seconds = None, 0.0
    if os.path.isfile(partial + ".npy") and os.path.isfile(partial + ".json"):
        try:
            done = np.load(partial + ".npy")  # allow_pickle is off: plain numbers only
            with open(partial + ".json") as f:
                seconds = json.load(f)["seconds"]
            log(f"resuming: {len(done):,} of {len(images):,} images already in {partial}.npy")
        except Exception:  # unreadable: start over
            done, seconds = None, 0.0
    t0 = time.time()
    blocks = [] if done is None else [done]
    start = 0 if done is None else len(done)
    for i in range(start, len(images), block):
        blocks.append(space(images[i:i + block], progress=progress))
        if i + block < len(images):  # keep the progress (not needed after the last block)
            so_far = np.concatenate(blocks)
            atomic_write(partial + ".npy", lambda tmp: _save_npy(tmp, so_far))
            write_json(partial + ".json", dict(seconds=seconds + time.time() - t0))
    return np.concatenate(blocks), seconds


def _remove_partial(partial):
    for f in (partial + ".npy", partial + ".json"):
        if os.path.exists(f):
            os.remove(f)


def _save_npy(path, array):
    with open(path, "wb") as f:
        np.save(f, array)


def _diff(old, new):
    return ", ".join(f"{key} {old.get(key)!r} != {value!r}" for key, value in new.items() if old.get(key) != value)


def evaluate(images, spaces, refs, labels=None, precision_recall=True, progress=False, partial=None, log=print):
    """Metrics of generated uint8 images [N, C, H, W] against refs[space.name] in each space.

    labels: the class each image was sampled for (classifier accuracy, if a
    classifier space is given). partial: a path prefix; if given, features are
    computed in blocks kept in PARTIAL.<space>.npy, so an interrupted
    evaluation resumes (the files are removed at the end). Returns a flat
    dict of floats plus "n".
    """
    out = {"n": int(len(images))}
    for space in spaces:
        ref = refs[space.name]
        if partial is None:
            feats = space(images, progress=progress)
        else:
            feats, _ = _features_resumable(space, images, f"{partial}.{space.name}", progress, log)
        mu, cov = metrics.gaussian_stats(feats)
        out[f"{space.name}_fd"] = metrics.frechet_distance(ref.mu, ref.cov, mu, cov)
        if precision_recall:
            p, r = metrics.precision_recall(ref.features, torch.as_tensor(feats, dtype=torch.float32),
                                            k=ref.info.get("k", K), real_radii=ref.radii)
            out[f"{space.name}_precision"], out[f"{space.name}_recall"] = p, r
        if labels is not None and hasattr(space, "accuracy"):
            out[f"{space.name}_accuracy"] = space.accuracy(images, labels)
    if partial is not None:  # done: the blocks are no longer needed
        for space in spaces:
            _remove_partial(f"{partial}.{space.name}")
    return out


def to_nchw(images):
    """Sampler output uint8 [N, H, W, C] -> [N, C, H, W] (numpy)."""
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2))


__all__ = ["Reference", "reference", "evaluate", "file_digest", "to_nchw", "K"]
