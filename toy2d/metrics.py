"""Exact metrics for toy samples, possible because the true density is known.

(a) mean exact log-density under the class; (b) outlier rate: the share of
samples outside the region that holds 99% of the class's mass; (c) branch
coverage: total variation between the samples' distribution over the tree's
branches and the true branch weights; (d) k-NN precision and recall (k = 3)
against true samples.
"""
import numpy as np
import torch

from mini_autoguide.metrics import knn_radii, precision_recall

from .fractal import gmm as make_gmm


class ToyMetrics:
    """Reference quantities for one class, computed once (fixed seed)."""

    def __init__(self, classes="A", n_reference=8192, n_threshold=200_000, seed=12345, mass=0.99):
        self.gmm = make_gmm(classes)
        gen = torch.Generator().manual_seed(seed)
        big = self.gmm.sample(n_threshold, generator=gen, dtype=torch.float64)
        # p(x) >= t holds `mass` of the probability: t is the (1 - mass) quantile of log p
        self.threshold = float(torch.quantile(self.gmm.logp(big), 1 - mass))
        self.reference = self.gmm.sample(n_reference, generator=gen, dtype=torch.float64)
        self.k = 3
        self.reference_radii = knn_radii(self.reference, self.k)
        branches = np.unique(self.gmm.branch)
        self.branch_ids = {b: i for i, b in enumerate(branches)}
        true = np.zeros(len(branches))
        np.add.at(true, [self.branch_ids[b] for b in self.gmm.branch], self.gmm.weight)
        self.branch_weight = true
        self._branch_of = np.array([self.branch_ids[b] for b in self.gmm.branch])   # component -> branch

    def branch_histogram(self, x, component=None):
        """Share of samples per branch (by most responsible component). [branches].
        component: the samples' most responsible components, where already known."""
        if component is None:
            component = self.gmm.most_responsible(torch.as_tensor(x, dtype=torch.float64))[1]
        idx = self._branch_of[component.numpy()]
        return np.bincount(idx, minlength=len(self.branch_weight)) / max(len(component), 1)

    def __call__(self, x):
        """All metrics of samples x: [N, 2] as a dict of floats.

        A sample that diverged (inf or NaN: strong guidance of a weak model can
        throw one out of float range) lies in no region, branch or k-NN ball:
        it counts as an outlier, as mass on no branch and as imprecise, covers
        nothing, and `diverged` gives its share; mean log p is over the rest."""
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        finite = torch.isfinite(x).all(1)
        n, kept = len(x), int(finite.sum())
        x = x[finite]
        if kept == 0:
            raise ValueError("every sample diverged (inf or NaN)")
        logp, component = self.gmm.most_responsible(x)
        hist = self.branch_histogram(x, component) * kept / n
        precision, recall = precision_recall(self.reference, x, self.k, self.reference_radii)
        return dict(
            n=n,
            mean_logp=float(logp.mean()),
            outliers=float(((logp < self.threshold).sum() + n - kept) / n),
            branch_tv=float(0.5 * (np.abs(hist - self.branch_weight).sum() + (n - kept) / n)),
            precision=precision * kept / n,
            recall=recall,
            diverged=(n - kept) / n,
        )
