"""Named model presets, shared by the CLI and Python: preset name -> config.

Each preset holds the network config (UNet keyword arguments) and its
training defaults; TrainOptions is a run's whole option set, which options()
builds from a preset and the caller's overrides. The img64 presets are the paper's ImageNet-64 sizes
(EDM2, arXiv 2312.02696; autoguidance, arXiv 2406.02507, Table 1); the fmnist presets train on 2 CPU cores in minutes.
"""
import copy
from dataclasses import dataclass, fields, replace

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
    # eight rows of 5,000 samples, FID included, fit a few hours on 2 CPU cores (docs/eval.md).
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


# ---- the option set of one training run ---------------------------------------------
@dataclass
class TrainOptions:
    """Every option of an image training run. options() fills it: the preset's training
    defaults (presets.py), then the caller's overrides; train() adds what the data says."""
    preset: str
    # the preset's training recipe (EDM2, arXiv 2312.02696, Sec. 2 and App. B)
    batch: int
    lr_ref: float                 # alpha_ref of lr = alpha_ref / sqrt(max(t / lr_tref, 1))
    lr_tref: float                # in batches
    rampup_kimg: float            # linear lr warm-up
    p_mean: float                 # training noise levels: ln sigma ~ N(p_mean, p_std^2)
    p_std: float
    ema: list                     # power-function EMA lengths sigma_rel tracked
    snapshot_kimg: float          # EMA snapshots every this many thousand images
    kimg: float                   # training length
    # the run
    label_dropout: float = 0.0    # drop class labels with this probability (CFG's unconditional model)
    cond: bool = True             # False: ignore class labels
    xflip: bool = False
    precision: str = "auto"       # auto, fp32, bf16 or fp16
    channels_last: bool = True
    compile: bool = False
    seed: int = 0
    device: str = "cpu"
    workers: int = 2
    checkpoint_kimg: float = None  # the resume state this often; None = snapshot_kimg
    progress: bool = True
    max_steps: int = None         # stop early (the run resumes later)
    max_minutes: float = None
    # filled in by train() from the data and the network
    net: dict = None
    num_images: int = None
    data: str = None


def options(preset="fmnist-main", **overrides):
    """The full option set: the preset's training defaults, then overrides (None = keep)."""
    opts = TrainOptions(preset=preset, **get(preset)["train"])
    unknown = sorted(set(overrides) - {f.name for f in fields(TrainOptions)})
    if unknown:
        raise ValueError(f"unknown training option(s): {', '.join(unknown)}")
    opts = replace(opts, **{k: v for k, v in overrides.items() if v is not None})
    opts.checkpoint_kimg = opts.checkpoint_kimg or opts.snapshot_kimg
    return opts
