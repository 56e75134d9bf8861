"""Sampling the toy with a guidance method, and measuring the samples exactly
(arXiv 2406.02507, Sec. 3 and App. C).

Every method starts from the same points, exact samples of class A at sigma_max,
and runs the deterministic Heun sampler (EDM, arXiv 2206.00364, Alg. 1) with its
own denoiser. Because the true density is known, the samples are measured exactly:
(a) mean exact log-density under the class; (b) outlier rate: the share of
samples outside the region that holds 99% of the class's mass; (c) branch
coverage: total variation between the samples' distribution over the tree's
branches and the true branch weights; (d) k-NN precision and recall (k = 3)
against true samples.
"""
import numpy as np
import torch

from mini_autoguide import guidance
from mini_autoguide.metrics import knn_radii, precision_recall
from mini_autoguide.sampler import heun_sample, sigma_steps

from .fractal import gmm as make_gmm

# the paper's toy sampling: 32 Heun steps of EDM's rho-schedule from sigma = 5 down to 0.002, then 0
STEPS, SIGMA_MIN, SIGMA_MAX, RHO = 32, 0.002, 5.0, 7.0


def start_points(n, seed, sigma_max=SIGMA_MAX):
    """n exact samples of class A at sigma_max, drawn by their own generator seeded with seed. [n, 2]"""
    return make_gmm("A").sample(n, sigma=sigma_max, generator=torch.Generator().manual_seed(seed))


def denoiser(method, nets, weight, interval=None):
    """The denoiser of a method of guidance.METHODS: nets["main"] alone, or guided by
    nets["guide"] (autoguidance) or by nets["uncond"] (cfg)."""
    guide = {"cfg": nets.get("uncond"), "autoguidance": nets.get("guide")}.get(method)
    return guidance.make(method, nets["main"], guide, weight, interval)


def sample(D, x, steps=STEPS, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO, record=False, progress=False):
    """Heun sampling of the denoiser D from x [N, 2] at sigma_max down to 0: the samples [N, 2],
    and with record=True also the trajectories [steps + 1, N, 2]."""
    sigmas = sigma_steps(steps, sigma_min, sigma_max, rho)
    with torch.no_grad():   # a toy network takes its score by autograd inside; nothing outside needs a graph
        return heun_sample(D, x, sigmas, record=record, progress=progress)


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
        self._branch_of = np.unique(self.gmm.branch, return_inverse=True)[1]   # component -> branch 0, 1, ...
        self.branch_weight = np.bincount(self._branch_of, weights=self.gmm.weight)   # the true branch weights

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
