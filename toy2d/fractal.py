"""The 2D fractal toy: a Gaussian mixture grown from a random tree.

Built exactly as in the autoguidance paper's appendix C (arXiv 2406.02507, App. C).
Everything is known in closed form at every noise level sigma:

    p(x; sigma) = sum_i phi_i N(x; mu_i, Sigma_i + sigma^2 I)

The heavy lifting (4096 points x 1016 components) is arranged as matrix
products so that mixed per-point sigma costs little more than a single sigma:
for a 2x2 covariance C_i + s I, the determinant and the adjugate are
polynomials in s, so both the quadratic form's numerator and the determinant
of every (point, component) pair come out of a few broadcast products.
float64 is the reference; float32 is the fast path (tests/test_fractal.py
bounds its error by float32 arithmetic).
"""
import functools
import math

import numpy as np
import torch

ORIGIN = np.array([0.0030, 0.0325])
SCALE = np.array([1.3136, 1.3844])
DEPTH = 7
CLASSES = ("A", "B", "AB")
_CHUNK = 1024  # points per block: keeps the [chunk, K] temporaries in cache


@functools.lru_cache(maxsize=None)
def tree():
    """The tree of both classes, built once: (phi [K], mu [K,2], cov [K,2,2], branch [K], cls [K])
    as float64 numpy arrays. One RandomState(2) shared by both classes; A first, then B, depth first.
    """
    rnd = np.random.RandomState(2)
    phi, mu, cov, branch, cls = [], [], [], [], []
    counter = [0]

    def recurse(c, depth, p, theta):
        if depth >= DEPTH:
            return
        d = np.array([np.cos(theta), np.sin(theta)])
        dist = 0.292 * 0.8**depth * (1 + 0.2 * rnd.randn())
        thick = 0.2 * 0.8**depth / dist
        size = SCALE * dist * 0.06
        b = counter[0]
        counter[0] += 1
        outer = np.outer(d, d)
        c_i = (outer + (np.eye(2) - outer) * thick**2) * np.outer(size, size)
        for t in np.linspace(0.07, 0.93, 8):
            phi.append(dist * 0.5**depth)
            mu.append((p + d * dist * t) * SCALE)
            cov.append(c_i)
            branch.append(b)
            cls.append(c)
        for sign in (1, -1):
            angle = theta + sign * 0.7**depth * (1 + 0.2 * rnd.randn())
            recurse(c, depth + 1, p + d * dist, angle)

    recurse(0, 0, ORIGIN, np.pi / 4)
    recurse(1, 0, ORIGIN, 5 * np.pi / 4)
    return (np.array(phi), np.array(mu), np.array(cov), np.array(branch), np.array(cls))


class GMM:
    """Exact heat-diffused 2D Gaussian mixture.

    x: [N, 2] tensor; sigma: float or [N] tensor. All methods are exact in the
    dtype of x (float32 or float64) and run in blocks of points, so memory is
    bounded for any N.
    """

    def __init__(self, weight, mu, cov, branch=None):
        weight, mu, cov = (np.asarray(v, dtype=np.float64) for v in (weight, mu, cov))
        branch = np.zeros(len(weight), dtype=np.int64) if branch is None else np.asarray(branch)
        # Runs of 8 consecutive components share one covariance (a branch of
        # the tree). Store them transposed, component j of every run first,
        # so that per-run terms broadcast along the contiguous axis.
        self.group = 8 if len(cov) % 8 == 0 and np.all(cov.reshape(-1, 8, 2, 2) == cov[::8, None]) else 1
        order = np.arange(len(weight)).reshape(-1, self.group).T.reshape(-1)
        self.weight = weight[order] / np.sum(weight)                          # [K]
        self.mu, self.cov, self.branch = mu[order], cov[order], branch[order]  # [K,2], [K,2,2], [K]
        self._coef = {}

    def __len__(self):
        return len(self.weight)

    # ---- precomputed coefficients (per dtype/device) -------------------------
    def _coefficients(self, dtype, device):
        key = (dtype, device)
        if key not in self._coef:
            g = self.group
            cov = self.cov.reshape(g, -1, 2, 2)[0]                          # [B, 2, 2]
            a, b, c = cov[:, 0, 0], cov[:, 0, 1], cov[:, 1, 1]
            center = self.mu.reshape(g, -1, 2).mean(0)                      # [B, 2]
            v = self.mu.reshape(g, -1, 2) - center                          # [g, B, 2]
            # v^T adj(C) v, per component, and |v|^2
            vadj = c * v[..., 0] ** 2 - 2 * b * v[..., 0] * v[..., 1] + a * v[..., 1] ** 2
            t = lambda x: torch.as_tensor(np.ascontiguousarray(x), dtype=dtype, device=device)
            # for the score, -sum_k w_k A_b (x - mu_k) with A_b = adj(C_b) + sI
            # is linear in x with coefficients sum_k w_k [a, b, c, 1, adj mu, mu];
            # padded to 16 columns, where the matmul is fastest
            ak, bk, ck = (np.tile(z, g) for z in (a, b, c))
            m0, m1 = self.mu[:, 0], self.mu[:, 1]
            mix = np.stack([ak, bk, ck, np.ones_like(ak), ck * m0 - bk * m1, ak * m1 - bk * m0, m0, m1], 1)
            mix = np.concatenate([mix, np.zeros((len(mix), 8))], 1)
            self._coef[key] = dict(mix=t(mix),
                abc=t(np.stack([a, b, c])), center=t(center), v0=t(v[..., 0]), v1=t(v[..., 1]),
                vadj=t(vadj), vv=t((v ** 2).sum(-1)),
                logw=t(np.log(self.weight).reshape(g, -1)))
        return self._coef[key]

    # ---- the core: log-density, responsibilities, score ----------------------
    def _block(self, x, s, want_score, want_resp=False, want_component=False):
        """x: [n, 2], s: [n] (= sigma^2). Returns (logp [n], score [n,2] or None),
        or (logp, responsibilities [n, K]), or (logp, most responsible component [n]).

        Components are laid out [g, B]: g components in each of B groups that
        share a covariance C_b. With u = x - center_b and v = mu - center_b
        (small numbers, so float32 keeps its digits),
            (x-mu)^T adj(C_b+sI) (x-mu) = u^T A u - 2 (A u).v + v^T A v,
        with A = adj(C_b + sI) = adj(C_b) + sI.
        """
        co = self._coefficients(x.dtype, x.device)
        n = x.shape[0]
        a, b, c = co["abc"]                                                 # [B] each
        s1 = s[:, None]                                                     # [n, 1]
        u0 = x[:, 0:1] - co["center"][:, 0]                                 # [n, B]
        u1 = x[:, 1:2] - co["center"][:, 1]
        det = (a * c - b * b) + s1 * (a + c + s1)                           # det(C_b + sI), [n, B]
        inv = det.reciprocal()
        au0 = (c + s1) * u0 - b * u1                                        # A u, [n, B]
        au1 = (a + s1) * u1 - b * u0
        # logit = log w - 0.5 log det - 0.5 (u^T A u - 2 (Au).v + v^T A v) / det
        base = (u0 * au0 + u1 * au1).mul_(inv).add_(det.log()).mul_(-0.5)  # [n, B]
        logit = torch.addcmul(co["logw"], (au0 * inv)[:, None], co["v0"])  # [n, g, B]
        logit.addcmul_((au1 * inv)[:, None], co["v1"])
        logit.addcmul_(inv.mul(-0.5)[:, None], co["vadj"])
        logit.addcmul_((inv * s1).mul_(-0.5)[:, None], co["vv"])
        logit.add_(base[:, None])
        logit = logit.view(n, len(self))
        if want_component:  # the most responsible component has the largest logit
            peak, component = logit.max(1, keepdim=True)
        else:
            peak = logit.amax(1, keepdim=True)
        # exp is slow on inputs that underflow: clamp where e^-80 is negligible
        e = logit.sub_(peak).clamp_min_(-80.0).exp_()                       # [n, K]
        total = e.sum(1, keepdim=True)
        logp = (total.log() + peak).squeeze(1) - math.log(2 * math.pi)
        if want_component:
            return logp, component.squeeze(1)
        if want_resp:
            return logp, e / total
        if not want_score:
            return logp, None
        # score = -sum_k r_k (C_b + sI)^-1 (x - mu_k) = -sum_k (r_k / det_b) A_b (x - mu_k)
        w = e.view(n, self.group, -1).mul_(inv[:, None]).view(n, -1)
        m = torch.mm(w, co["mix"]).div_(total)                              # [n, 16]
        ma, mb, mc, m1 = m[:, 0], m[:, 1], m[:, 2], m[:, 3]
        x0, x1 = x[:, 0], x[:, 1]
        g0 = (mc + s * m1) * x0 - mb * x1 - m[:, 4] - s * m[:, 6]
        g1 = (ma + s * m1) * x1 - mb * x0 - m[:, 5] - s * m[:, 7]
        return logp, -torch.stack([g0, g1], 1)

    def _run(self, x, sigma, want_score):
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.float()
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"x must have shape [N, 2], got {tuple(x.shape)}")
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s = (s * s).expand(x.shape[0]) if s.ndim == 0 else (s * s).reshape(-1)
        if s.shape[0] != x.shape[0]:
            raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}]")
        logps, scores = [], []
        with torch.no_grad():
            for i in range(0, x.shape[0], _CHUNK):
                lp, sc = self._block(x[i:i + _CHUNK], s[i:i + _CHUNK], want_score)
                logps.append(lp)
                scores.append(sc)
        logp = torch.cat(logps) if logps else x.new_zeros(0)
        score = (torch.cat(scores) if scores else x.new_zeros(0, 2)) if want_score else None
        return logp, score

    # ---- public API ----------------------------------------------------------
    def logp(self, x, sigma=0.0):
        """Exact log-density log p(x; sigma). x: [N, 2] -> [N]."""
        return self._run(x, sigma, False)[0]

    def score(self, x, sigma=0.0):
        """Exact score grad_x log p(x; sigma). x: [N, 2] -> [N, 2]."""
        return self._run(x, sigma, True)[1]

    def denoise(self, x, sigma, *args, **kwargs):
        """Exact denoiser D(x; sigma) = E[y | x] = x + sigma^2 score. [N, 2]."""
        sig = torch.as_tensor(sigma, dtype=torch.as_tensor(x).dtype, device=torch.as_tensor(x).device)
        s2 = (sig * sig).reshape(-1, 1) if sig.ndim else sig * sig
        return x + s2 * self.score(x, sigma)

    __call__ = denoise

    def responsibilities(self, x, sigma=0.0):
        """Posterior component probabilities. x: [N, 2] -> [N, K]."""
        return torch.cat([r for _, r in self._blocks(x, sigma, want_resp=True)])

    def most_responsible(self, x, sigma=0.0):
        """Exact log p(x; sigma) [N] and each point's most responsible component
        [N] (int64), in one pass over the components: what the toy's metrics need."""
        blocks = self._blocks(x, sigma, want_component=True)
        return torch.cat([lp for lp, _ in blocks]), torch.cat([c for _, c in blocks])

    def _blocks(self, x, sigma, **want):
        """_block over chunks of x at one scalar sigma: a list of its outputs."""
        x = torch.as_tensor(x)
        s = torch.full((x.shape[0],), float(sigma) ** 2, dtype=x.dtype, device=x.device)
        with torch.no_grad():
            return [self._block(x[i:i + _CHUNK], s[i:i + _CHUNK], False, **want)
                    for i in range(0, max(x.shape[0], 1), _CHUNK)]

    def sample(self, n, sigma=0.0, generator=None, dtype=torch.float32, device="cpu"):
        """Draw n exact samples of p(x; sigma). Returns x: [n, 2]."""
        w = torch.as_tensor(self.weight, dtype=torch.float64)
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        # one factor per component (K of them, not n): the same numbers, gathered
        cov = torch.as_tensor(self.cov, dtype=torch.float64) + float(sigma) ** 2 * torch.eye(2, dtype=torch.float64)
        chol = torch.linalg.cholesky(cov)[k]                                # [n, 2, 2]
        eps = torch.randn(n, 2, 1, generator=generator, dtype=torch.float64)
        x = torch.as_tensor(self.mu, dtype=torch.float64)[k] + (chol @ eps)[..., 0]
        return x.to(dtype=dtype, device=device)


def gmm(classes="A"):
    """The exact fractal mixture of class "A", "B" or both ("AB")."""
    if classes not in CLASSES:
        raise ValueError(f"unknown class {classes!r}: choose one of {', '.join(CLASSES)}")
    phi, mu, cov, branch, cls = tree()
    keep = np.isin(cls, [CLASSES.index(c) for c in classes])
    # branch ids are global (0..126 for A, 127..253 for B)
    return GMM(phi[keep], mu[keep], cov[keep], branch[keep])
