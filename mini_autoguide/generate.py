"""Sampling images: a main model, an optional guide, one of the guidance methods.

Noise comes from one generator per seed (sampler.randn_from_seeds), and each
seed's class is fixed by the seed, so a sample depends only on its seed, not
on the batch it ran in: methods compare on identical noise. The denoising is
the project's one sampler (sampler.heun_sample) around guidance.make.
"""
import torch

from . import guidance
from .edm import sigma_per_sample
from .sampler import SeededNoise, heun_sample, randn_from_seeds, sigma_steps
from .unet import load_denoiser


def check_compatible(main_cfg, guide_cfg, method):
    """Refuse a guide that does not produce the same kind of image as the main model."""
    for key, what in (("resolution", "resolution"), ("img_channels", "channels"), ("num_classes", "classes")):
        if method == "cfg" and key == "num_classes":
            continue  # CFG's guide may be an unconditional model
        if main_cfg.get(key, 0) != guide_cfg.get(key, 0):
            raise ValueError(f"the guide's {what} ({guide_cfg.get(key, 0)}) differs from the main model's "
                             f"({main_cfg.get(key, 0)})")


def load_models(main_path, guide_path=None, method="none", device="cpu"):
    """(main, guide or None) Denoisers in eval mode, checked for compatibility."""
    guidance.check_method(method)
    main, main_cfg, _ = load_denoiser(main_path, device)
    guide = None
    if guide_path is not None:
        guide, guide_cfg, _ = load_denoiser(guide_path, device)
        check_compatible(main_cfg["net"], guide_cfg["net"], method)
    if method == "autoguidance" and guide is None:
        raise ValueError("autoguidance needs a guide model (--guide): a smaller or shorter-trained snapshot")
    if method == "cfg" and guide is None and not main.num_classes:
        raise ValueError("CFG needs a class-conditional main model (trained with label dropout) or --guide")
    return main, guide


def class_of(seeds, num_classes, classes=None):
    """Each seed's class: classes[seed % len(classes)] (all classes by default). [N] ints or None."""
    if not num_classes:
        if classes:
            raise ValueError("the model is unconditional: --classes does not apply")
        return None
    classes = list(range(num_classes)) if not classes else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is outside 0..{num_classes - 1}")
    return torch.tensor([classes[s % len(classes)] for s in seeds])


@torch.no_grad()
def generate(main, guide=None, method="none", weight=2.0, interval=None, seeds=range(16), classes=None,
             steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, churn=0.0, batch=64, bf16=False,
             device="cpu", progress=False, channels_last=True, compile=False):
    """Sample one image per seed. Returns (uint8 images [N, H, W, C], labels [N] or None, float [N, C, H, W]).

    channels_last: run the networks in NHWC layout (the faster convolutions on CPU and GPU;
    same results to float rounding). Converts main and guide in place.
    compile: torch.compile both networks (fuses the element-wise work around the convolutions;
    pays a one-off compilation, worth it for thousands of samples). The last, smaller batch is
    padded with repeats of its last seed so that one compiled shape serves every batch.
    """
    seeds = list(seeds)
    device = torch.device(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for net in (main, guide):
        if net is not None:
            net.to(memory_format=layout)
    labels = class_of(seeds, main.num_classes, classes)
    if method == "cfg" and guide is None:
        guide = main  # one network with label dropout serves as its own unconditional model
    guide_kwargs = {"class_labels": None} if method == "cfg" else None
    nets = (main, guide)
    if compile:
        nets = tuple(None if net is None else _sigma_as_tensor(torch.compile(net)) for net in nets)
    denoise = guidance.make(method, nets[0], nets[1], weight, interval, guide_kwargs)
    sigmas = sigma_steps(steps, sigma_min, sigma_max, rho)
    shape = (main.img_channels, main.resolution, main.resolution)
    out = []
    for i in range(0, len(seeds), batch):
        chunk = seeds[i:i + batch]
        n = len(chunk)
        chunk_labels = None if labels is None else labels[i:i + batch]
        if compile and n < batch <= len(seeds):  # per-seed noise makes the padding exact
            chunk = chunk + [chunk[-1]] * (batch - n)
            chunk_labels = None if labels is None else torch.cat([chunk_labels, chunk_labels[-1:].expand(batch - n)])
        x = (randn_from_seeds(chunk, shape, device=device) * float(sigmas[0])).contiguous(memory_format=layout)
        kw = {} if labels is None else {"class_labels": chunk_labels.to(device)}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            x = heun_sample(denoise, x, sigmas, churn=churn, noise=SeededNoise(chunk), progress=progress, **kw)
        out.append(x[:n].float().cpu())
    x = torch.cat(out)
    images = (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return images, (None if labels is None else labels.numpy()), x


def _sigma_as_tensor(net):
    """Call a compiled denoiser with sigma as a tensor [N]. torch.compile treats a Python float as
    a constant: every noise level would be a recompilation (about a minute each on 2 CPU cores),
    and after 8 of them dynamo gives up and runs the rest eager. A tensor is an input instead,
    so one graph serves every step."""
    def denoise(x, sigma, **kwargs):
        return net(x, sigma_per_sample(sigma, x), **kwargs)
    return denoise
