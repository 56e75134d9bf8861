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
import math

import torch

from mini_autoguide.edm import SIGMA_DATA, expand
from mini_autoguide.mp import MPConv, _unit_rows, mp_silu


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


class StackedToyMLP(torch.nn.Module):
    """S toy models of one architecture as one batched computation: the fast path that trains
    many seeds at once (train.train_seeds). Each parameter holds the S models' tensors stacked
    along a leading dimension, and every operation is ToyMLP's with that dimension in front. A
    batched matrix product computes each model's product as a single one would, so each model
    gets the same numbers, bit for bit, as its ToyMLP alone (tests/test_toy.py checks it).

    x: [S, N, 2], sigma: [S, N]."""

    def __init__(self, nets):
        super().__init__()
        self.config, self.sigma_data = dict(nets[0].config), nets[0].sigma_data
        if any(net.config != self.config for net in nets):
            raise ValueError("stacked models must share one architecture")
        self.weights = torch.nn.ParameterList(
            [torch.stack([net.layers[i].weight.detach() for net in nets]) for i in range(len(nets[0].layers))])
        self.gain = torch.nn.Parameter(torch.stack([net.gain.detach() for net in nets]))

    def logp(self, x, sigma):
        """G(x; sigma) of each model: [S, N]."""
        sigma = sigma[:, :, None]
        c_in = (sigma ** 2 + self.sigma_data ** 2).rsqrt()
        y = torch.cat([x * c_in, sigma.log() / 4, torch.ones_like(sigma)], 2)
        for i, weight in enumerate(self.weights):
            w = _unit_rows(weight) * (1 / math.sqrt(weight.shape[2]))   # MPConv.effective_weight
            if i == 0:   # 4 inputs: batched, its products (and their gradients) would round differently
                y = torch.stack([y[k] @ w[k].t() for k in range(len(w))])
            else:
                y = mp_silu(y) @ w.transpose(1, 2)
        return self.gain[:, None] * y.square().mean(2) / sigma[:, :, 0] - 0.5 * (x * c_in).square().sum(2)

    def score(self, x, sigma):
        """grad_x G of each model, with its graph kept for training: [S, N, 2]."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.logp(x, sigma).sum(), x, create_graph=torch.is_grad_enabled())
        return grad

    @torch.no_grad()
    def normalize_weights_(self):
        """mp.normalize_weights_ for the S models at once."""
        for weight in self.weights:
            weight.copy_(_unit_rows(weight))

    def unstack(self):
        """The S models as ToyMLPs (eval mode, no gradients)."""
        nets = []
        for k in range(len(self.gain)):
            net = ToyMLP(**self.config)
            with torch.no_grad():
                for layer, weight in zip(net.layers, self.weights):
                    layer.weight.copy_(weight[k])
                net.gain.copy_(self.gain[k])
            nets.append(net.eval().requires_grad_(False))
        return nets
