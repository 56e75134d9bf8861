"""Post-hoc EMA (EDM2, Karras et al. 2024, arXiv 2312.02696, Sec. 3.2, App. C.2): train once,
choose each model's EMA length afterwards.

At step t the power-function EMA (ema.py) averages the weights theta_k of steps k = 1..t with
the density p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t], theta(tau) = theta_k on
(k - 1, k], and exactly so: unrolling the recursion, the weight of theta_k is
(1 - beta_k) prod_{j>k} beta_j = (k^(g+1) - (k-1)^(g+1)) / t^(g+1), the integral of p over
(k - 1, k]. Snapshots of a few profiles at several times span a space of such densities; any
other profile is fitted in it by least squares in L2, and the same combination of the
snapshots' weights is (close to) its EMA.
"""
import contextlib
import json
import math
import os

import numpy as np
import torch
from safetensors import safe_open

from .checkpoint import CheckpointError, parse_snapshot_name, read_header, refuse_existing, save_tensors
from .ema import sigma_rel_to_gamma
from .unet import KIND


def profile_inner(gamma_a, t_a, gamma_b, t_b):
    """<p_a, p_b> = integral of p_a(tau) p_b(tau) of two power-function profiles (arrays broadcast).

    With t_a <= t_b the product lives on [0, t_a], where it is
    (ga+1)(gb+1) tau^(ga+gb) / (t_a^(ga+1) t_b^(gb+1)); integrated:
    (ga+1)(gb+1) (t_a/t_b)^gb / ((ga+gb+1) t_b). Units of 1/time: a common scale of the times cancels in x.
    """
    ga, ta, gb, tb = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (gamma_a, t_a, gamma_b, t_b)))
    ga, gb = np.where(ta <= tb, ga, gb), np.where(ta <= tb, gb, ga)  # a: the earlier profile
    ta, tb = np.minimum(ta, tb), np.maximum(ta, tb)
    return (ga + 1) * (gb + 1) * (ta / tb) ** gb / ((ga + gb + 1) * tb)


def solve_coefficients(gammas, times, gamma, t):
    """Coefficients x [N], sum 1, with sum_i x_i p_i closest in L2 to the profile (gamma, t), for the
    stored profiles (gammas [N], times [N]); and the relative residual ||sum_i x_i p_i - p|| / ||p||."""
    g, ts = np.asarray(gammas, np.float64), np.asarray(times, np.float64)
    A = profile_inner(g[:, None], ts[:, None], g[None], ts[None])
    b = profile_inner(g, ts, gamma, t)
    # Each profile scaled to unit norm first: the diagonal of A spans the ratio of the times (~1/t),
    # and the solver's cut-off is relative to the largest singular value.
    d = 1 / np.sqrt(np.diag(A))
    # lstsq (SVD; singular values under N * eps of the largest are cut) rather than solve(): A is the
    # Gram matrix of similar densities, near-singular for dense or repeated snapshots, and a minimum-norm
    # solution keeps the coefficients from blowing up there. Scaled, cond ~ 5e7 for 2 x 256 snapshots.
    x = d * np.linalg.lstsq(A * d[:, None] * d[None], b * d, rcond=None)[0]
    x /= x.sum()
    pp = float(profile_inner(gamma, t, gamma, t))
    r2 = float(x @ A @ x - 2 * x @ b + pp)  # ||sum x_i p_i - p||^2, expanded
    return x, math.sqrt(max(r2, 0.0) / pp)


def snapshots(run_dir):
    """The EMA snapshots in a training run's folder: [dict(path, sigma_rel, nimg, step, config, extra)],
    sorted by time. A network-latest-* file counts only where no numbered file has its
    (sigma_rel, nimg) (a training call stopped between snapshots); saved reconstructions do not count."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    found = {}
    for name in sorted(n for n in os.listdir(run_dir) if parse_snapshot_name(n)):  # numbered ones sort first
        path = os.path.join(run_dir, name)
        config, extra = read_header(path, KIND)
        if "posthoc" in extra:
            continue
        try:
            key = (float(extra["sigma_rel"]), int(extra["nimg"]))
            step = int(extra["step"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} has no sigma_rel, nimg and step in its header: not a snapshot of train")
        found.setdefault(key, dict(path=path, sigma_rel=key[0], nimg=key[1], step=step, config=config, extra=extra))
    return sorted(found.values(), key=lambda s: (s["nimg"], s["sigma_rel"]))


def weighted_sum(paths, coefficients):
    """sum_i c_i theta_i of safetensors files, one tensor at a time: memory ~ one model plus a tensor.

    Accumulated in float64, stored in the files' dtype. A tensor equal in every file (the buffers, which
    PowerEMA copies rather than averages) is copied as is: sum c_i = 1 only up to rounding.
    """
    out = {}
    with contextlib.ExitStack() as stack:
        try:
            files = [stack.enter_context(safe_open(p, framework="pt")) for p in paths]
        except Exception as e:  # safetensors raises its own error types for bad files
            raise CheckpointError(f"unreadable snapshot among {', '.join(map(str, paths))}: {e}") from None
        keys = sorted(files[0].keys())
        for path, f in zip(paths, files):
            if sorted(f.keys()) != keys:
                raise CheckpointError(f"{path} and {paths[0]} hold different tensors")
        for key in keys:
            first = files[0].get_tensor(key)
            acc = first.double() * float(coefficients[0]) if first.is_floating_point() else None
            same = True
            for path, c, f in zip(paths[1:], coefficients[1:], files[1:]):
                t = f.get_tensor(key)
                if t.shape != first.shape or t.dtype != first.dtype:
                    raise CheckpointError(f"{key}: {path} and {paths[0]} differ in shape or dtype")
                same = same and torch.equal(t, first)
                if acc is not None:
                    acc.add_(t.double(), alpha=float(c))
            if not same and acc is None:
                raise CheckpointError(f"{key}: a non-float tensor that differs between snapshots")
            out[key] = first if same else acc.to(first.dtype)
    return out


def reconstruct(run_dir, sigma_rel, at_kimg=None):
    """The EMA of profile sigma_rel at at_kimg thousand images (default: the last snapshot), rebuilt from
    the run's snapshots up to that time. Returns (state_dict, info); save_reconstruction writes them."""
    gamma = sigma_rel_to_gamma(sigma_rel)  # ValueError outside (0, 0.2887)
    snaps = snapshots(run_dir)
    if not snaps:
        raise ValueError(f"{run_dir} holds no EMA snapshots (network-<images>-ema<sigma_rel>.safetensors)")
    for s in snaps[1:]:
        for key, a, b in (("network", s["config"], snaps[0]["config"]),
                          ("label dropout", s["extra"].get("label_dropout"), snaps[0]["extra"].get("label_dropout"))):
            if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
                raise ValueError(f"{s['path']} and {snaps[0]['path']} differ in {key}: snapshots of different runs")
    if at_kimg is not None and not (math.isfinite(at_kimg) and at_kimg > 0):
        raise ValueError(f"the time must be a positive number of kimg, got {at_kimg}")
    last = snaps[-1]["nimg"]
    nimg = last if at_kimg is None else round(at_kimg * 1000)
    if nimg > last:
        raise ValueError(f"{at_kimg:g} kimg is after the last snapshot of {run_dir} ({last / 1000:g} kimg)")
    used = [s for s in snaps if s["nimg"] <= nimg]
    if len(used) < 2:
        raise ValueError(f"post-hoc EMA needs at least two snapshots up to {nimg / 1000:g} kimg; "
                         f"{run_dir} has {len(used)}")
    # Times in images: the EMA is a power function in steps, images = steps * batch (fixed within a run),
    # and a common scale of the times cancels in the coefficients.
    x, residual = solve_coefficients([sigma_rel_to_gamma(s["sigma_rel"]) for s in used],
                                     [s["nimg"] for s in used], gamma, nimg)
    state = weighted_sum([s["path"] for s in used], x)
    batch = used[-1]["nimg"] // max(used[-1]["step"], 1)
    info = dict(sigma_rel=float(sigma_rel), nimg=nimg, step=nimg // batch if nimg % batch == 0 else nimg / batch,
                label_dropout=used[0]["extra"].get("label_dropout"), config=used[0]["config"],
                posthoc=dict(run=os.fspath(run_dir), snapshots=[os.path.basename(s["path"]) for s in used],
                             sigma_rels=[s["sigma_rel"] for s in used], nimgs=[s["nimg"] for s in used],
                             coefficients=x.tolist(), residual=residual))
    return state, info


def save_reconstruction(path, state, info, force=False):
    """Write a reconstruction like a snapshot of train (same kind and config: sample and eval read it
    as one); its header also records the target, the snapshots used and their coefficients."""
    refuse_existing(path, force)
    save_tensors(path, state, KIND, info["config"], {k: v for k, v in info.items() if k != "config"})

