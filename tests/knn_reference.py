"""Brute-force k-NN precision and recall (Kynkaanniemi et al. 2019, arXiv 1904.06991) in float64
numpy: the independent reference for mini_autoguide.metrics (a k-d tree and blocked float32 distances)."""
import numpy as np


def _squared_distances(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def knn_radii(x, k):
    """Distance from each point to its k-th nearest neighbour, the point itself not counted. [N]."""
    d2 = _squared_distances(x, x)
    np.fill_diagonal(d2, np.inf)
    return np.sqrt(np.sort(d2, axis=1)[:, k - 1])


def float32_slack(*sets):
    """A bound on the rounding error of squared distances computed in float32 (mini_autoguide.metrics)
    as |x|^2 + |y|^2 - 2 x.y (torch.cdist): a float sum of about 3 D terms, each below 2 max|x|^2,
    errs by at most ~3 D eps32 2 max|x|^2; a query's distance and the radius it is compared with
    both carry such an error, and the coordinates were rounded to float32 first: 16 (D + 2) eps32
    max|x|^2 covers all of it."""
    dim = sets[0].shape[1]
    return 16 * (dim + 2) * np.finfo(np.float32).eps * max((s ** 2).sum(1).max() for s in sets)


def coverage(queries, points, k, slack):
    """The share of queries inside the k-NN ball of at least one point (precision: fake queries, real
    points; recall: the other way round), and the share of queries whose answer a rounding error of
    up to slack in squared distances could flip."""
    r2 = knn_radii(points, k)[None] ** 2
    d2 = _squared_distances(queries, points)
    inside = (d2 <= r2).any(1)
    sure = (d2 <= r2 - slack).any(1) | (d2 > r2 + slack).all(1)
    return inside.mean(), (~sure).mean()
