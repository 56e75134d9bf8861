"""Sample-set metrics that work in any feature space: k-NN precision/recall
(Kynkaanniemi et al. 2019) and the Frechet distance between Gaussians fitted
to two feature sets.

features: [N, D] tensors or arrays; everything runs in blocks of rows so that
memory stays bounded (N x block distances at a time).
"""
import numpy as np
import torch

_BLOCK = 2048
# scipy is imported where it is used: it adds half a second to every `import mini_autoguide`
_TREE_DIMS = 3  # up to this many dimensions, neighbours come from a k-d tree


def _as_tensor(x):
    # float32 distances are plenty for ranking neighbours and twice as fast
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(torch.float32)


def knn_radii(features, k=3):
    """Distance from each point to its k-th nearest neighbour in the same set (self excluded). [N]."""
    x = _as_tensor(features)
    if x.shape[1] <= _TREE_DIMS:
        from scipy.spatial import cKDTree
        d, _ = cKDTree(x.numpy()).query(x.numpy(), k=k + 1)
        return torch.as_tensor(d[:, k], dtype=torch.float32)
    radii = []
    for i in range(0, len(x), _BLOCK):
        d = torch.cdist(x[i:i + _BLOCK], x)
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])  # +1: the point itself
    return torch.cat(radii)


def _covered(queries, points, radii):
    """For each query: is it inside the k-NN ball of at least one point?"""
    q, p = _as_tensor(queries), _as_tensor(points)
    out = torch.zeros(len(q), dtype=torch.bool)
    todo = torch.arange(len(q))
    if q.shape[1] <= _TREE_DIMS:
        # Low dimension: check the nearest candidates with a k-d tree; only
        # queries whose candidates are all farther than the largest radius
        # are settled there, the rest go to the exact brute force below.
        from scipy.spatial import cKDTree
        m = min(16, len(p))  # enough to settle most queries; more costs more than the brute force saves
        d, idx = cKDTree(p.numpy()).query(q.numpy(), k=m)
        d, idx = torch.as_tensor(d, dtype=torch.float32).reshape(len(q), m), torch.as_tensor(idx).reshape(len(q), m)
        hit = (d <= radii[idx]).any(1)
        settled = hit | (d[:, -1] > radii.max())
        out[hit] = True
        todo = torch.nonzero(~settled).flatten()
    for i in range(0, len(todo), _BLOCK):
        rows = todo[i:i + _BLOCK]
        out[rows] = (torch.cdist(q[rows], p) <= radii[None]).any(1)
    return out


def precision_recall(real, fake, k=3, real_radii=None):
    """k-NN precision (fake inside the real manifold) and recall (real inside the fake one).

    real: [N, D], fake: [M, D]; real_radii: knn_radii(real, k) if already
    known. Returns (precision, recall) as floats in [0, 1].
    """
    real_r = knn_radii(real, k) if real_radii is None else real_radii
    fake_r = knn_radii(fake, k)
    precision = _covered(fake, real, real_r).double().mean().item()
    recall = _covered(real, fake, fake_r).double().mean().item()
    return precision, recall


def gaussian_stats(features):
    """Mean [D] and covariance [D, D] in float64."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2):
    """|mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), with scipy's sqrtm."""
    import scipy.linalg
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    cov1, cov2 = np.atleast_2d(cov1), np.atleast_2d(cov2)
    # no disp=False: it is deprecated, and scipy returns a bare array (no tuple) for 1x1 input
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        eps = 1e-6 * np.eye(len(cov1))
        covmean = scipy.linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * covmean))
