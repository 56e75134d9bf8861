"""Named model presets, shared by the CLI and Python: preset name -> config.

Each preset holds the network config (UNet keyword arguments) and its
training defaults. The img64 presets are the paper's ImageNet-64 sizes
(EDM2, arXiv 2312.02696; autoguidance, arXiv 2406.02507, Table 1); the fmnist presets train on 2 CPU cores in minutes.
"""
import copy

_IMG64 = dict(resolution=64, img_channels=3, num_classes=1000, mult=[1, 2, 3, 4], num_blocks=3,
              attn_resolutions=[16, 8], dropout=0.0)
_IMG64_TRAIN = dict(batch=2048, lr_ref=0.010, lr_tref=35000, rampup_kimg=10000, p_mean=-0.8, p_std=1.6,
                    ema=[0.05, 0.10], snapshot_kimg=8192, kimg=1_000_000)
_FMNIST = dict(resolution=32, img_channels=1, num_classes=10, mult=[1, 2, 2], num_blocks=2,
               attn_resolutions=[8], dropout=0.0)
_FMNIST_TRAIN = dict(batch=64, lr_ref=0.010, lr_tref=2000, rampup_kimg=10, p_mean=-1.2, p_std=1.2,
                     ema=[0.05, 0.10], snapshot_kimg=32)

PRESETS = {
    # ImageNet-64, class-conditional: 124,710,949 and 280,209,381 parameters.
    "img64-xs": dict(net=dict(_IMG64, channels=128), train=dict(_IMG64_TRAIN, lr_ref=0.012)),
    "img64-s": dict(net=dict(_IMG64, channels=192), train=dict(_IMG64_TRAIN)),
    # Fashion-MNIST 32x32 on a laptop CPU: main model and its smaller, shorter-trained guide.
    "fmnist-main": dict(net=dict(_FMNIST, channels=32), train=dict(_FMNIST_TRAIN, kimg=192)),
    "fmnist-guide": dict(net=dict(_FMNIST, channels=16), train=dict(_FMNIST_TRAIN, kimg=48, lr_tref=500)),
    # The small-scale Table 1 (experiments/fmnist_table.py): an S main and an XS guide, sized so that
    # eight rows of 5,000 samples, FID included, fit a session on 2 CPU cores (docs/eval.md).
    "fmnist-s": dict(net=dict(_FMNIST, channels=16, channels_per_head=32), train=dict(_FMNIST_TRAIN, kimg=64, lr_tref=1000)),
    "fmnist-xs": dict(net=dict(_FMNIST, channels=8, channels_per_head=16), train=dict(_FMNIST_TRAIN, kimg=64, lr_tref=1000)),
    # For tests: runs a training step in milliseconds.
    "tiny": dict(net=dict(resolution=8, img_channels=1, num_classes=3, channels=8, mult=[1, 2], num_blocks=1,
                          attn_resolutions=[4], channels_per_head=8, dropout=0.0),
                 train=dict(_FMNIST_TRAIN, batch=8, lr_tref=100, rampup_kimg=0, kimg=1, snapshot_kimg=1)),
}


def names():
    return sorted(PRESETS)


def get(name):
    """A deep copy of preset `name`: {"net": {...}, "train": {...}}."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(names())}")
    return copy.deepcopy(PRESETS[name])


def net_config(name, **overrides):
    """The network config of a preset, with data-dependent fields overridden."""
    cfg = get(name)["net"]
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg
