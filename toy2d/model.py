"""The toy network of the paper: an MP MLP whose output is a log-density
(arXiv 2406.02507, App. C).

G(x; sigma) = g * mean_k F_k(x, sigma)^2 / sigma - 0.5 |x c_in|^2

Its score is grad_x G, taken by autograd (so the network is a true gradient
field), and the denoiser is D = x + sigma^2 grad_x G. Because G is a
log-density up to a constant, the densities of main and guide can be drawn
and compared. Training puts a loss on the score, so the gradient is taken
with create_graph=True and the loss backpropagates through it (autograd's
double backward).
"""
import torch

from mini_autoguide.edm import SIGMA_DATA, expand
from mini_autoguide.mp import MPConv, mp_silu


class ToyMLP(torch.nn.Module):
    """x: [N, 2], sigma: [N] or scalar. width n, `depth` hidden n->n layers; dropout: the
    probability of zeroing each hidden layer's input in training (0: none, as in the paper)."""

    def __init__(self, width=64, depth=4, sigma_data=SIGMA_DATA, dim=2, dropout=0.0):
        super().__init__()
        self.config = dict(width=width, depth=depth, sigma_data=sigma_data, dim=dim, dropout=dropout)
        self.sigma_data, self.dropout = sigma_data, dropout
        self.layers = torch.nn.ModuleList(
            [MPConv(dim + 2, width)] + [MPConv(width, width) for _ in range(depth)])
        self.gain = torch.nn.Parameter(torch.zeros([]))
        # set by weakened(), for guides made without training
        self.skip, self.sigma_scale, self.dropout_seed = (), 1.0, None

    def logp(self, x, sigma):
        """G(x; sigma), an unnormalised log-density. [N]."""
        sigma = expand(sigma, x[:, :1]).expand(x.shape[0], 1)
        if self.sigma_scale != 1:
            sigma = sigma * self.sigma_scale
        c_in = (sigma ** 2 + self.sigma_data ** 2).rsqrt()
        y = torch.cat([x * c_in, sigma.log() / 4, torch.ones_like(sigma)], 1)
        y = self.layers[0](y)
        for i, layer in enumerate(self.layers[1:], 1):
            if i not in self.skip:
                y = layer(self._drop(mp_silu(y), i, sigma))
        return self.gain * y.square().mean(1) / sigma[:, 0] - 0.5 * (x * c_in).square().sum(1)

    def _drop(self, y, layer, sigma):
        """Dropout on a hidden layer's input y [N, width], kept at its expected value: in training
        a fresh mask for every entry; in a guide with dropout at inference (dropout_seed set), one
        mask of units a layer for each noise level (the first sample's: sampling passes one sigma
        for all), drawn from (dropout_seed, layer, sigma), so sampling stays deterministic and
        independent of the batch and of the order of calls."""
        if self.dropout == 0 or not (self.training or self.dropout_seed is not None):
            return y
        if self.training:
            keep = torch.rand(y.shape, device=y.device) >= self.dropout
        else:
            key = (self.dropout_seed * 1000 + layer) * 10 ** 9 + round(float(sigma.flatten()[0]) * 1e6)
            keep = torch.rand(y.shape[1], generator=torch.Generator().manual_seed(key)) >= self.dropout
        return y * keep.to(y.device, y.dtype) / (1 - self.dropout)

    def weakened(self, skip=(), sigma_scale=1.0, dropout_seed=None):
        """A weaker version of this network, made without training, as a guide: a copy of it
        that skips hidden layers `skip` (each a number in 1..depth; S²-Guidance,
        arXiv 2508.12880, drops blocks), reads its log-density at the noisier level
        sigma_scale * sigma (self-guidance, arXiv 2412.05827): G'(x; sigma) = G(x; s sigma), and,
        with dropout_seed, keeps the dropout it was trained with on at inference (in-situ
        autoguidance, arXiv 2510.17136)."""
        if any(not 1 <= i < len(self.layers) for i in skip):
            raise ValueError(f"hidden layers are numbered 1 to {len(self.layers) - 1}, got {tuple(skip)}")
        if not sigma_scale > 0:
            raise ValueError(f"the sigma scale must be positive, got {sigma_scale}")
        if dropout_seed is not None and self.dropout == 0:
            raise ValueError("dropout at inference needs a network trained with dropout")
        weak = ToyMLP(**self.config)
        weak.load_state_dict(self.state_dict())
        weak.skip, weak.sigma_scale, weak.dropout_seed = tuple(skip), float(sigma_scale), dropout_seed
        return weak.train(self.training).requires_grad_(False)

    def score(self, x, sigma, create_graph=None):
        """grad_x G by autograd: [N, 2]. create_graph (default: in training
        mode with grad enabled) keeps the graph, so that a loss on the score
        trains the weights."""
        if create_graph is None:
            create_graph = self.training and torch.is_grad_enabled()
        with torch.enable_grad():   # the sampler calls this under no_grad
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.logp(x, sigma).sum(), x, create_graph=create_graph)
        return grad

    def forward(self, x, sigma, **unused):
        """The denoiser D(x; sigma) = x + sigma^2 grad_x G. [N, 2]."""
        return x + expand(sigma, x) ** 2 * self.score(x, sigma)
