"""The toy network of the paper: an MP MLP whose output is a log-density.

G(x; sigma) = g * mean_k F_k(x, sigma)^2 / sigma - 0.5 |x c_in|^2

Its score is grad_x G (so the network is a true gradient field) and the
denoiser is D = x + sigma^2 grad_x G. Because G is a log-density up to a
constant, the densities of main and guide can be drawn and compared.

The score has two implementations: `score_autograd`, autograd of `logp` (the
reference), and `score`, the same derivative written out as the MLP's
backward pass, with its own gradient with respect to the weights (the
backward of the backward), which training needs. Written out, it does in a
few large matrix products what autograd's double backward does in many small
steps. On the CPU it runs in C (mlp_kernel.c, a tile of points at a time,
everything in cache), elsewhere in torch ops (`_Score`);
benchmarks/bench_toy.py times a training iteration all three ways.
tests/test_toy.py checks both against autograd in float64: the score and its
weight gradients.
"""
import torch

from mini_autoguide.edm import SIGMA_DATA, expand
from mini_autoguide.mp import SILU_STD, MPConv, effective_weights, mp_silu

from . import kernel


class ToyMLP(torch.nn.Module):
    """x: [N, 2], sigma: [N] or scalar. width n, `depth` hidden n->n layers."""

    def __init__(self, width=64, depth=4, sigma_data=SIGMA_DATA, dim=2):
        super().__init__()
        self.config = dict(width=width, depth=depth, sigma_data=sigma_data, dim=dim)
        self.sigma_data = sigma_data
        self.layers = torch.nn.ModuleList(
            [MPConv(dim + 2, width)] + [MPConv(width, width) for _ in range(depth)])
        self.gain = torch.nn.Parameter(torch.zeros([]))

    def logp(self, x, sigma):
        """G(x; sigma), an unnormalised log-density. [N]."""
        sigma = expand(sigma, x[:, :1]).expand(x.shape[0], 1)
        c_in = (sigma ** 2 + self.sigma_data ** 2).rsqrt()
        y = torch.cat([x * c_in, sigma.log() / 4, torch.ones_like(sigma)], 1)
        y = self.layers[0](y)
        for layer in self.layers[1:]:
            y = layer(mp_silu(y))
        return self.gain * y.square().mean(1) / sigma[:, 0] - 0.5 * (x * c_in).square().sum(1)

    def score_autograd(self, x, sigma, create_graph=None):
        """grad_x G by autograd: [N, 2], the reference for `score`. create_graph
        (default: in training mode with grad enabled) keeps the graph so a loss
        on the score trains."""
        if create_graph is None:
            create_graph = self.training and torch.is_grad_enabled()
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.logp(x, sigma).sum(), x, create_graph=create_graph)
        return grad

    def score(self, x, sigma):
        """grad_x G, written out: [N, 2]. Differentiable with respect to the
        parameters (not x): a loss on it trains the network."""
        sigma = expand(sigma, x[:, :1]).reshape(-1).expand(x.shape[0]).to(x.dtype)
        w0 = self.layers[0].effective_weight(dtype=x.dtype)
        # 1/SILU_STD moves from the activations into the weights: plain silu below.
        w = (effective_weights(self.layers[1:], 1 / SILU_STD, x.dtype) if len(self.layers) > 1
             else w0.new_zeros(0, w0.shape[0], w0.shape[0]))
        return _Score.apply(x, sigma, self.gain.to(x.dtype), self.sigma_data, w0, w)

    def forward(self, x, sigma, **unused):
        """The denoiser D(x; sigma) = x + sigma^2 grad_x G. [N, 2]."""
        return x + expand(sigma, x) ** 2 * self.score(x, sigma)


class _Score(torch.autograd.Function):
    """s = grad_x G and its vector-Jacobian product with respect to the weights.

    Rows are points. Forward pass: u = [x c_in, log(sigma) / 4, 1], h_0 = u W_0^T,
    h_l = silu(h_{l-1}) W_l^T (l = 1..L), G = k/2 |h_L|^2 + ..., k = 2 g / (n sigma).
    Backward pass (the score): b_L = k h_L; a_{l-1} = b_l W_l, b_{l-1} = silu'(h_{l-1}) a_{l-1};
    s = c_in (b_0 W_0)[:, :2] - c_in^2 x.
    `backward` runs both passes in reverse, with e = dLoss/ds: first the backward
    pass (adjoints bb of b), which also gives each h_l a second-order term
    silu''(h_l) a_l bb_l, then the forward pass (adjoints hb of h).
    aten's silu_backward(g, h) = g silu'(h) in one step.
    """

    @staticmethod
    def forward(ctx, x, sigma, gain, sigma_data, w0, w):
        save = any(ctx.needs_input_grad)
        ctx.lib = lib = _kernel(x, sigma, w0)
        if lib is not None:  # the same formulas in C (mlp_kernel.c), a tile of points at a time
            x, sigma, w0, w = x.contiguous(), sigma.contiguous(), w0.contiguous(), w.contiguous()
            score, hs, alphas = kernel.mlp_score(lib, x, sigma, float(gain), sigma_data, w0, w, save)
            if save:
                ctx.save_for_backward(x, sigma, gain, w0, w, hs, alphas)
                ctx.sigma_data = sigma_data
            return score
        weights = [w0, *w.unbind(0)]
        c_in = (sigma * sigma + sigma_data ** 2).rsqrt()
        u = torch.stack([x[:, 0] * c_in, x[:, 1] * c_in, sigma.log() / 4, torch.ones_like(sigma)], 1)
        h, hs, acts = u @ weights[0].t(), [], [u]
        for w_l in weights[1:]:
            hs.append(h), acts.append(torch.nn.functional.silu(h))
            h = acts[-1] @ w_l.t()
        k = (2 / h.shape[1]) * gain / sigma
        b = h * k[:, None]
        bs, alphas = [b], []
        for w_l, h_l in zip(weights[:0:-1], hs[::-1]):
            a = b @ w_l
            b = _silu_slope_times(a, h_l)
            bs.insert(0, b), alphas.insert(0, a)
        score = c_in[:, None] * (b @ weights[0][:, :2]) - (c_in * c_in)[:, None] * x
        if save:
            ctx.save_for_backward(sigma, c_in, gain, h, *weights, *hs, *acts, *bs, *alphas)
            ctx.depth = len(weights) - 1
        return score

    @staticmethod
    def backward(ctx, e):
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            raise RuntimeError("ToyMLP.score has no gradient with respect to x or sigma: use score_autograd")
        if ctx.lib is not None:
            x, sigma, gain, w0, w, hs, alphas = ctx.saved_tensors
            grads = kernel.mlp_score_backward(ctx.lib, x, sigma, float(gain), ctx.sigma_data, w0, w, hs, alphas,
                                              e.contiguous())
            return None, None, grads[2], None, grads[0], grads[1]
        L, saved = ctx.depth, list(ctx.saved_tensors)
        sigma, c_in, gain, h_last = saved[:4]
        sizes = [L + 1, L, L + 1, L + 1, L]   # weights, h, activations (u first), b, a
        weights, hs, acts, bs, alphas = (saved[4 + sum(sizes[:i]):4 + sum(sizes[:i + 1])] for i in range(5))
        n = h_last.shape[1]
        # Reverse of the backward pass.
        r = torch.zeros(e.shape[0], weights[0].shape[1], dtype=e.dtype, device=e.device)
        r[:, :2] = c_in[:, None] * e                                # adjoint of b_0 W_0
        grads = [bs[0].t() @ r] + [None] * L
        bb = r @ weights[0].t()
        hb = []
        for l in range(L):
            s, h_l = torch.sigmoid(hs[l]), hs[l]
            # silu''(h) = s (1 - s) (2 + h (1 - 2 s)) = (s - s s)(h + 2 - 2 h s), in few passes
            curvature = torch.addcmul(s, s, s, value=-1).mul_(torch.addcmul(h_l + 2, h_l, s, value=-2))
            hb.append(curvature.mul_(alphas[l]).mul_(bb))           # silu''(h) a bb
            ab = _silu_slope_times(bb, h_l)
            bb = ab @ weights[l + 1].t()
            grads[l + 1] = bs[l + 1].t() @ ab
        k = (2 / n) / sigma
        hb.append((gain * k)[:, None] * bb)
        gain_grad = (k[:, None] * h_last * bb).sum()
        # Reverse of the forward pass.
        for l in range(L, 0, -1):
            grads[l] = torch.addmm(grads[l], hb[l].t(), acts[l])
            hb[l - 1] += _silu_slope_times(hb[l] @ weights[l], hs[l - 1])
        grads[0] = torch.addmm(grads[0], hb[0].t(), acts[0])
        return None, None, gain_grad, None, grads[0], torch.stack(grads[1:]) if L else None


def _kernel(x, sigma, w0):
    """The compiled MLP kernel where it serves (CPU, float32 or float64, width a
    multiple of 8, finite x and positive sigma: it is built with -ffast-math), else None."""
    if x.device.type != "cpu" or not (torch.isfinite(x).all() and (sigma > 0).all() and torch.isfinite(sigma).all()):
        return None
    return kernel.load_mlp(w0.shape[0], x.dtype)


def _silu_slope_times(g, h):
    """g * silu'(h), fused."""
    return torch.ops.aten.silu_backward(g, h)
