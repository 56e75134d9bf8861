"""Training the toy models (arXiv 2406.02507, App. C), and saving and loading them.

Exact score matching needs no data set: each batch is fresh samples of the
class, noised, with the exact score of the noised density as the target.
Denoising score matching (EDM weighting) is the alternative that only needs
samples, as for images.
"""
from dataclasses import asdict, dataclass

import torch

from mini_autoguide.checkpoint import CheckpointError, read_model, save_model
from mini_autoguide.edm import denoising_loss, exact_score_loss, learning_rate, sample_sigma
from mini_autoguide.ema import PowerEMA, sigma_rel_to_gamma
from mini_autoguide.mp import normalize_weights_
from mini_autoguide.progress import progress_bar

from .fractal import CLASSES, gmm as make_gmm
from .model import ToyMLP

LOSSES = ("exact", "dsm")
MODEL_KIND = "toy2d-mlp"   # what a saved toy model's header says it is


@dataclass
class ToyConfig:
    """The paper's settings are the defaults."""
    classes: str = "A"
    width: int = 64
    depth: int = 4
    iterations: int = 4096
    batch: int = 4096
    loss: str = "exact"        # "exact" score matching or "dsm" (denoising)
    lr: float = 0.01
    lr_ref_iter: int = 512     # lr = lr / sqrt(max(t / lr_ref_iter, 1))
    p_mean: float = -2.3
    p_std: float = 1.5
    ema_sigma_rel: float = 0.010
    weight_decay: float = 0.0  # Adam's L2 term on every parameter (0: none, as in the paper)
    dropout: float = 0.0       # dropout on the hidden layers' inputs in training (0: none, as in the paper)
    seed: int = 0
    dim: int = 2               # data dimension (the fractal is 2D; kept so files say it)

    def check(self):
        if self.classes not in CLASSES:
            raise ValueError(f"unknown class {self.classes!r}: choose one of {', '.join(CLASSES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}")
        if self.dim != 2:
            raise ValueError(f"the fractal toy is 2-dimensional, got dim={self.dim}")
        for name in ("width", "iterations", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer")
        sigma_rel_to_gamma(self.ema_sigma_rel)   # ValueError outside (0, 0.2887)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.weight_decay < float("inf"):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        return self


def train(config, progress=False, callback=None):
    """Train one toy model; return its EMA copy (eval mode) and the loss history.

    callback(t, net), if given, is called after every iteration t (1-based) with
    the training network as Adam left it, just when the EMA takes its update and
    before the weights are normalised: a caller can keep snapshots or further
    EMA lengths of its own (experiments/toy_guides.py does both).
    """
    config = config.check()
    torch.manual_seed(config.seed)   # the initial weights come from torch's global generator
    net = ToyMLP(config.width, config.depth, dropout=config.dropout).train()
    normalize_weights_(net)   # before the EMA copy, so that it starts equal to the network
    gen = torch.Generator().manual_seed(config.seed)   # the batches: their own generator
    target = make_gmm(config.classes)
    ema = PowerEMA(net, [config.ema_sigma_rel])
    # fused: one pass over all parameters instead of a dozen small ops each
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.99), weight_decay=config.weight_decay,
                           fused=True)
    losses = []
    bar = progress_bar(config.iterations, f"toy {config.classes} w{config.width}", "it", enabled=progress)
    for t in range(1, config.iterations + 1):
        # a fresh batch of the class, noised at sigma ~ lognormal(P_mean, P_std)
        y = target.sample(config.batch, generator=gen)                                      # [B, 2]
        sigma = sample_sigma(config.batch, config.p_mean, config.p_std, generator=gen)      # [B]
        x = y + sigma[:, None] * torch.randn(y.shape, generator=gen)                        # [B, 2]
        if config.loss == "exact":   # sigma^2 |grad log p(x; sigma) - grad G(x; sigma)|^2
            loss = exact_score_loss(net.score(x, sigma), target.score(x, sigma), sigma)
        else:
            loss = denoising_loss(net(x, sigma), y, sigma)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at iteration {t}")
        for group in opt.param_groups:
            group["lr"] = learning_rate(t, 1, config.lr, config.lr_ref_iter)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net, t)   # the weights as Adam left them; then forced weight normalisation, as for images
        if callback is not None:
            callback(t, net)
        normalize_weights_(net)
        losses.append(loss.item())
        bar.update(1)
        if t % 64 == 0:
            bar.set_postfix(loss=f"{sum(losses[-64:]) / 64:.4f}")
    bar.close()
    return ema.nets[0].eval(), losses


def save_toy(path, net, config):
    """Save a toy model as safetensors, its ToyConfig in the JSON header."""
    save_model(path, net, MODEL_KIND, asdict(config))


def load_toy(path):
    """Load a toy model saved by save_toy; returns (net in eval mode, ToyConfig)."""
    state, config, _ = read_model(path, MODEL_KIND)
    try:
        config = ToyConfig(**config)
        net = ToyMLP(config.width, config.depth, dim=config.dim, dropout=config.dropout)
        net.load_state_dict(state)
    except (TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not match their config ({e})") from None
    return net.eval().requires_grad_(False), config
