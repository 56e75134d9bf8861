"""Guide recipes: which weaker model guides the main one (autoguidance, arXiv 2406.02507, Sec. 3).

The paper trains a separate guide, smaller and trained less than the main model. Follow-up work
makes the guide from the main model itself. A recipe is a short name and its parameter, written
NAME or NAME:VALUE (mini_autoguide.guidance.GUIDE_RECIPES; toy reproduce --guide-recipe):

    separate      the paper's guide: a separate, smaller model trained less (its width, length and
                  EMA are Settings.guide: toy reproduce --guide-width, --guide-iterations, --guide-ema)
    snapshot:K    the main model's own run stopped at iteration K: its EMA there. The learning rate
                  and the power EMA do not depend on the run's length, so training the main model's
                  configuration for K iterations gives exactly that snapshot.
    ema:S         the main model's run averaged with another power-EMA length sigma_rel S
                  (EDM2, arXiv 2312.02696, Sec. 3.1). The EMA does not change the training, so
                  training the main model's configuration with EMA length S gives exactly that average.
    skip:K        the main network with hidden layer K (1..depth) skipped: no training
                  (S²-Guidance, arXiv 2508.12880, drops blocks; diffusers' AutoGuidance skips layers)
    sigma:F       the main network's log-density read at F times the noise level, F > 1: no
                  training (self-guidance, arXiv 2412.05827)
    decay:L       the separate guide trained with weight decay L (Adam's L2 term), which the 2D toy
                  of sliding-window guidance (arXiv 2411.10257) finds makes a good guide. Forced
                  weight normalisation (EDM2, arXiv 2312.02696, Sec. 2.3) rescales each weight row
                  after every step, so the decay acts through Adam's per-parameter steps and on the
                  output gain, not on the rows' lengths.
    dropout:P     the main model trained with dropout P on its hidden layers, guided by the same
                  network with the dropout on at inference (in-situ autoguidance, arXiv
                  2510.17136): no extra training, but its main model is another one than the
                  other recipes'. The guide's mask depends on the seed, the layer and the noise
                  level only (ToyMLP._drop), so sampling stays deterministic.
"""
from dataclasses import replace

import torch

from mini_autoguide.ema import sigma_rel_to_gamma
from mini_autoguide.guidance import parse_recipe


def check(recipe, main):
    """Refuse a recipe that does not fit the main model's ToyConfig `main`: ValueError."""
    name, value = parse_recipe(recipe)
    if name == "snapshot" and not 1 <= value < main.iterations:
        raise ValueError(f"snapshot:K needs 1 <= K < the main model's {main.iterations} iterations, got {value}")
    if name == "ema":
        sigma_rel_to_gamma(value)   # ValueError outside (0, 0.2887)
        if value == main.ema_sigma_rel:
            raise ValueError(f"ema:S with the main model's own sigma_rel {value} is the main model itself")
    if name == "skip" and not 1 <= value <= main.depth:
        raise ValueError(f"skip:K needs a hidden layer 1 <= K <= {main.depth}, got {value}")
    if name == "sigma" and not value > 1:
        raise ValueError(f"sigma:F needs F > 1 (a noisier level), got {value}")
    if name == "decay" and not value > 0:
        raise ValueError(f"decay:L needs L > 0, got {value}")
    if name == "dropout" and not 0 < value < 1:
        raise ValueError(f"dropout:P needs 0 < P < 1, got {value}")
    return recipe


def guide_config(recipe, main, separate):
    """The ToyConfig of the guide to train, or None when the recipe trains nothing.
    main: the main model's ToyConfig (with its seed); separate: the separate guide's."""
    name, value = parse_recipe(recipe)
    if name == "separate":
        return separate
    if name == "snapshot":
        return replace(main, iterations=value)
    if name == "ema":
        return replace(main, ema_sigma_rel=value)
    if name == "decay":
        return replace(separate, weight_decay=value)
    return None


def main_config(recipe, main):
    """The main model's ToyConfig under a recipe: trained with dropout for dropout:P, else main."""
    name, value = parse_recipe(recipe)
    return replace(main, dropout=value) if name == "dropout" else main


def weakened(recipe, main_net, seed):
    """The guide of a recipe that trains nothing, made from the main network (ToyMLP); seed
    draws the masks of dropout at inference."""
    name, value = parse_recipe(recipe)
    if name == "dropout":
        return main_net.weakened(dropout_seed=seed)
    if name == "skip":
        return main_net.weakened(skip=(value,))
    if name == "sigma":
        return main_net.weakened(sigma_scale=value)
    raise ValueError(f"guide recipe {name!r} trains its guide")


def error_alignment(main, guide, gmm, sigmas=(0.01, 0.03, 0.1, 0.3, 1.0), n=2000, seed=0):
    """What autoguidance assumes of its guide (arXiv 2406.02507, Sec. 3): errors like the main
    model's in direction, but larger. At each sigma, over n samples of the noised class (gmm),
    the median cosine between the guide's score error and main's, and the median ratio of their
    lengths |e_guide| / |e_main|. Returns {sigma: (cosine, ratio)}."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for sigma in sigmas:
        x = gmm.sample(n, sigma=sigma, generator=gen)
        exact = gmm.score(x, sigma)
        e_main, e_guide = main.score(x, sigma) - exact, guide.score(x, sigma) - exact
        cosine = torch.nn.functional.cosine_similarity(e_main, e_guide, dim=1).median().item()
        out[sigma] = (cosine, (e_guide.norm(dim=1) / e_main.norm(dim=1)).median().item())
    return out
