"""Training the toy models (paper, App. C; facts file, section 3).

Exact score matching needs no data set: each batch is fresh samples of the
class, noised, with the exact score of the noised density as the target.
Denoising score matching (EDM weighting) is the alternative that only needs
samples, as for images.
"""
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from mini_autoguide.edm import denoising_loss, exact_score_loss, sample_sigma
from mini_autoguide.ema import PowerEMA
from mini_autoguide.mp import normalize_weights_

from . import kernel
from .fractal import CLASSES, gmm as make_gmm
from .model import ToyMLP

LOSSES = ("exact", "dsm")
_SEEDING = threading.Lock()


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
        return self


def learning_rate(config, t):
    return config.lr / math.sqrt(max(t / config.lr_ref_iter, 1))


def batches(target, config, generator, chunk=16, ahead=True):
    """Each iteration's training batch: (clean y, sigma, noisy x, exact score of x
    or None for the DSM loss), shapes [B, 2], [B], [B, 2], [B, 2].

    The random draws come in the order of one iteration at a time, but the
    exact scores of `chunk` iterations are computed in one call: switching
    between the C kernel's threads and torch's costs more than the per-point
    work it saves to call it once per iteration. With `ahead`, the next chunk
    is drawn and scored in a background thread while this one trains
    (kernel.idle_thread: it takes a core only when training leaves one idle,
    as it does in its small one-thread torch ops). Each point's score does
    not depend on its neighbours and the draws keep their order, so the
    batches are the same either way."""
    def draw(count):
        drawn = []
        for _ in range(count):
            y = target.sample(config.batch, generator=generator)
            sigma = sample_sigma(config.batch, config.p_mean, config.p_std, generator=generator)
            drawn.append((y, sigma, y + sigma[:, None] * torch.randn(y.shape, generator=generator)))
        if config.loss == "exact":
            scores = target.score(torch.cat([x for _, _, x in drawn]), torch.cat([s for _, s, _ in drawn]))
            scores = scores.split(config.batch)
        else:
            scores = [None] * len(drawn)
        return [(y, sigma, x, score) for (y, sigma, x), score in zip(drawn, scores)]

    counts = [min(chunk, config.iterations - i) for i in range(0, config.iterations, chunk)]
    if not ahead:
        for count in counts:
            yield from draw(count)
        return
    ready = draw(counts[0])   # the first chunk here, on all the kernels' threads: nothing to hide it behind
    with ThreadPoolExecutor(1, initializer=kernel.idle_thread) as pool:
        for count in counts[1:] + [None]:
            future = pool.submit(draw, count) if count is not None else None
            yield from ready
            ready = future.result() if future is not None else None


def train(config, progress=False, callback=None, chunk=16):
    """Train one toy model; return its EMA copy (eval mode) and the loss history.

    callback(t, ema_net), if given, is called after every iteration t (1-based),
    e.g. to keep snapshots. chunk: iterations whose exact targets are computed
    together (see `batches`; the result does not depend on it).
    """
    config = config.check()
    with _SEEDING:   # the initial weights come from torch's global generator: one thread at a time
        torch.manual_seed(config.seed)
        net = ToyMLP(config.width, config.depth).train()
    normalize_weights_(net)   # before the EMA copy, so that it starts equal to the network
    gen = torch.Generator().manual_seed(config.seed)
    target = make_gmm(config.classes)
    ema = PowerEMA(net, [config.ema_sigma_rel])
    # fused: one pass over all parameters instead of a dozen small ops each
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.99), fused=True)
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.iterations, desc=f"toy {config.classes} w{config.width}", unit="it", leave=False)
    # With the C kernels serving the network and the targets, torch's own ops are small.
    kernels = kernel.load_mlp(config.width, torch.float32) is not None
    with kernel.cores_to_kernels(kernels):
        # Batches ahead only where the kernels have several threads: beside torch's
        # own threads (no kernel) they would compete with its OpenMP threads, which
        # spin for work between ops, and a one-thread trainer has no idle core.
        ahead = kernels and kernel.threads_to_use() > 1
        for t, (y, sigma, x, score) in enumerate(batches(target, config, gen, chunk, ahead), start=1):
            if config.loss == "exact":
                loss = exact_score_loss(net.score(x, sigma), score, sigma)
            else:
                loss = denoising_loss(net(x, sigma), y, sigma)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at iteration {t}")
            for group in opt.param_groups:
                group["lr"] = learning_rate(config, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema.update(net, t)   # the weights as Adam left them; then forced weight normalisation, as for images
            normalize_weights_(net)
            losses.append(loss.item())
            if callback is not None:
                callback(t, ema.nets[0])
            if bar is not None:
                bar.update(1)
                if t % 64 == 0:
                    bar.set_postfix(loss=f"{sum(losses[-64:]) / 64:.4f}")
    if bar is not None:
        bar.close()
    return ema.nets[0].eval(), losses


def model_config(config):
    """What a saved toy model's JSON header holds."""
    return asdict(config)
