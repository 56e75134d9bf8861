"""The magnitude-preserving U-Net of EDM2 and its EDM denoiser (EDM2, arXiv 2312.02696, Sec. 2).

Reads top to bottom: Block (one encoder or decoder block), UNet (the
topology), Denoiser (EDM preconditioning + learned uncertainty u(sigma)),
load_denoiser (a stored snapshot back as a Denoiser).
Every activation is kept at unit magnitude by construction (mp.py), so there
are no normalisation layers with statistics and no biases.

Shapes: images x [N, C, H, W]; sigma [N]; class labels [N] (ints) or
[N, classes] (one-hot; all-zero = unconditional, for CFG).
"""
import math

import torch
import torch.nn.functional as F

from .checkpoint import CheckpointError, read_model
from .edm import SIGMA_DATA, expand, precondition, sigma_per_sample
from .mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize


def resample(x, mode):
    """Box filter: 2x2 average down, nearest-neighbour up (both keep magnitude)."""
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class Block(torch.nn.Module):
    """One encoder ("enc") or decoder ("dec") block, optionally with self-attention.

    enc: resample, 1x1 conv if channels change, pixel norm, residual branch.
    dec: resample, residual branch from the input channels; the 1x1 conv
         acts on the main path just before the merge; no pixel norm.
    x [N, in, H, W], emb [N, emb] -> [N, out, H', W'].
    """

    def __init__(self, in_channels, out_channels, emb_channels, flavor="enc", resample_mode="keep",
                 attention=False, channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3,
                 clip_act=256):
        super().__init__()
        self.flavor, self.resample_mode, self.dropout = flavor, resample_mode, dropout
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))  # the block starts ignoring sigma/class
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, (3, 3))
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm: unit RMS over channels at each pixel

        # Residual branch, modulated by the embedding: conv(silu(x)) * (1 + g * W emb).
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)

        if self.num_heads:
            n, ch, h, w = x.shape
            qkv = self.attn_qkv(x).reshape(n, self.num_heads, ch // self.num_heads, 3, h * w)
            q, k, v = normalize(qkv, dim=2).unbind(3)  # pixel norm of q, k, v per head: [N, heads, c, HW]
            y = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))
            y = self.attn_proj(y.transpose(2, 3).reshape(n, ch, h, w))
            x = mp_sum(x, y, self.attn_balance)

        return x.clip(-self.clip_act, self.clip_act) if self.clip_act is not None else x


class UNet(torch.nn.Module):
    """EDM2's U-Net F(x; c_noise, class) (EDM2, arXiv 2312.02696, Sec. 2).

    channels: C; mult: per-level multipliers (levels at resolution, /2, /4 ...);
    num_blocks: encoder blocks a level (the decoder has one more);
    attn_resolutions: resolutions whose blocks use self-attention.
    """

    def __init__(self, resolution, img_channels, num_classes=0, channels=192, mult=(1, 2, 3, 4),
                 num_blocks=3, attn_resolutions=(16, 8), channels_per_head=64, dropout=0.0,
                 label_balance=0.5, concat_balance=0.5):
        super().__init__()
        cblock = [channels * m for m in mult]
        cnoise, cemb = cblock[0], max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        kw = dict(channels_per_head=channels_per_head, dropout=dropout)

        # Embedding: Fourier(c_noise) -> linear; one-hot * sqrt(classes) -> linear; blend; silu.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb)
        self.emb_label = MPConv(num_classes, cemb) if num_classes else None

        # Encoder. skips records every output's channel count, in order.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1  # + a constant-ones channel, so convs can see the border
        skips = []
        for level, ch in enumerate(cblock):
            res = resolution >> level
            if level == 0:
                cin, cout = cout, ch
                self.enc[f"{res}_conv"] = MPConv(cin, cout, (3, 3))
            else:
                self.enc[f"{res}_down"] = Block(cout, cout, cemb, "enc", "down", **kw)
            skips.append(cout)
            for i in range(num_blocks):
                cin, cout = cout, ch
                self.enc[f"{res}_block{i}"] = Block(cin, cout, cemb, "enc", attention=res in attn_resolutions, **kw)
                skips.append(cout)

        # Decoder: two blocks at the bottom (attention, then none), else an upsampling
        # block; then num_blocks + 1 blocks, each fed mp_cat(x, skip).
        self.dec = torch.nn.ModuleDict()
        for level, ch in reversed(list(enumerate(cblock))):
            res = resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}_in0"] = Block(cout, cout, cemb, "dec", attention=True, **kw)
                self.dec[f"{res}_in1"] = Block(cout, cout, cemb, "dec", **kw)
            else:
                self.dec[f"{res}_up"] = Block(cout, cout, cemb, "dec", "up", **kw)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), ch
                self.dec[f"{res}_block{i}"] = Block(cin, cout, cemb, "dec", attention=res in attn_resolutions, **kw)
        self.out_conv = MPConv(cout, img_channels, (3, 3))
        self.out_gain = torch.nn.Parameter(torch.zeros([]))  # the network starts at F = 0

    def forward(self, x, noise_labels, class_labels=None):
        """x [N, C, H, W], noise_labels [N] (c_noise), class_labels [N, classes] or None."""
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            if class_labels is None:
                class_labels = emb.new_zeros(emb.shape[0], self.emb_label.weight.shape[1])
            onehot = class_labels.to(emb.dtype) * math.sqrt(class_labels.shape[1])
            emb = mp_sum(emb, self.emb_label(onehot), self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), dim=1, t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class Denoiser(torch.nn.Module):
    """EDM denoiser D(x; sigma, class) = c_skip x + c_out F(c_in x; c_noise, class).

    Also owns the learned uncertainty u(sigma) = linear(Fourier_128(c_noise))
    used by the EDM2 loss (return_logvar=True gives (D, u) with u [N]).
    config: the UNet keyword arguments (JSON-able), stored in checkpoints.
    """

    def __init__(self, config, sigma_data=SIGMA_DATA, logvar_channels=128):
        super().__init__()
        self.config = dict(config)
        self.resolution = config["resolution"]
        self.img_channels = config["img_channels"]
        self.num_classes = config.get("num_classes", 0)
        self.sigma_data = sigma_data
        self.unet = UNet(**config)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1)

    def labels(self, class_labels, n, device):
        """ints [N] -> one-hot [N, classes]; one-hot passes through; None stays None."""
        if class_labels is None or not self.num_classes:
            return None
        class_labels = torch.as_tensor(class_labels, device=device)
        if class_labels.ndim == 1:
            class_labels = F.one_hot(class_labels.long(), self.num_classes)
        return class_labels.float().expand(n, -1)

    def forward(self, x, sigma, class_labels=None, return_logvar=False):
        sigma = sigma_per_sample(sigma, x)
        c_skip, c_out, c_in, c_noise = precondition(sigma, self.sigma_data)
        labels = self.labels(class_labels, x.shape[0], x.device)
        f = self.unet(expand(c_in, x) * x, c_noise, labels)  # under autocast the convs run in bf16/fp16
        d = expand(c_skip, x) * x + expand(c_out, x) * f.to(torch.float32)
        if not return_logvar:
            return d
        return d, self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1).float()


def count_parameters(net):
    return sum(p.numel() for p in net.parameters())


__all__ = ["Block", "UNet", "Denoiser", "count_parameters", "resample"]


# ---- storage: safetensors weights with the network's config in the JSON header ----
KIND = "denoiser"


def load_denoiser(path, device="cpu"):
    """A Denoiser from a snapshot file (train's EMA snapshots, ema's reconstructions),
    in eval mode; returns (net, config, extra info)."""
    state, config, extra = read_model(path, KIND)
    net = Denoiser(config["net"])
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit its config: {str(e).splitlines()[0]}") from None
    return net.to(device).eval().requires_grad_(False), config, extra
