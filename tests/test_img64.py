"""The ImageNet-64 networks, img64-xs and img64-s, without a GPU: every block's output shape on the
meta device (shapes only, no memory), gradients for every parameter, and one real training step."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mini_autoguide import presets

from image_helpers import on_meta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_shapes(channels, n):
    """EDM2's ImageNet-64 U-Net (arXiv 2312.02696, Fig. 2 and App. B), written out by hand: levels at
    64, 32, 16 and 8 pixels with channels C x (1, 2, 3, 4); 3 encoder blocks a level, a downsampling
    block opening each lower level; two blocks at the bottom, then 4 decoder blocks a level, an
    upsampling block opening each higher level; a 3x3 conv to the 3 colour channels."""
    c = {64: channels, 32: 2 * channels, 16: 3 * channels, 8: 4 * channels}
    enc = {"64_conv": (n, c[64], 64, 64)}
    enc.update({f"64_block{i}": (n, c[64], 64, 64) for i in range(3)})
    for res, above in ((32, 64), (16, 32), (8, 16)):
        enc[f"{res}_down"] = (n, c[above], res, res)
        enc.update({f"{res}_block{i}": (n, c[res], res, res) for i in range(3)})
    dec = {"8_in0": (n, c[8], 8, 8), "8_in1": (n, c[8], 8, 8)}
    dec.update({f"8_block{i}": (n, c[8], 8, 8) for i in range(4)})
    for res, below in ((16, 8), (32, 16), (64, 32)):
        dec[f"{res}_up"] = (n, c[below], res, res)
        dec.update({f"{res}_block{i}": (n, c[res], res, res) for i in range(4)})
    return {**{f"enc.{k}": v for k, v in enc.items()}, **{f"dec.{k}": v for k, v in dec.items()},
            "out_conv": (n, 3, 64, 64)}


@pytest.mark.parametrize("preset,channels", [("img64-xs", 128), ("img64-s", 192)])
def test_img64_forward_and_backward_shapes_on_the_meta_device(preset, channels):
    n = 2
    net = on_meta(presets.net_config(preset)).train()
    shapes = {}
    for name, module in net.unet.named_modules():
        if name.startswith(("enc.", "dec.")) and name.count(".") == 1 or name == "out_conv":
            module.register_forward_hook(lambda m, args, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
    with torch.device("meta"):
        x, sigma = torch.randn(n, 3, 64, 64), torch.ones(n)
        labels = torch.nn.functional.one_hot(torch.zeros(n, dtype=torch.long), 1000).float()
    denoised, logvar = net(x, sigma, labels, return_logvar=True)
    assert shapes == expected_shapes(channels, n)   # every block, in order of the names
    assert list(shapes) == list(expected_shapes(channels, n))
    assert denoised.shape == x.shape and logvar.shape == (n,)
    (denoised.square().mean() + logvar.mean()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name


@pytest.mark.slow
def test_one_img64_xs_training_step_on_the_cpu(tmp_path):
    """One fp32 training step of img64-xs at 64x64 (batch 1, then 3): finite losses, and the memory it
    needs, by benchmarks/img64_footprint.py (a few minutes on 2 cores)."""
    out = tmp_path / "footprint.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "img64_footprint.py"), "--presets", "img64-xs",
                    "--out", str(out)], check=True, timeout=1800)
    row = json.loads(out.read_text())["rows"][0]
    assert row["parameters"] == 124_710_949
    assert math.isfinite(row["batch1_loss"]) and math.isfinite(row["batch3_loss"])
    # Each image keeps its activations for backward: at least the input and output of every 3x3
    # convolution at 64x64 in the first level, 128 channels x 64 x 64 floats x 2 x 8 convolutions.
    assert row["per_image_mib_fp32"] > 128 * 64 * 64 * 4 * 2 * 8 / 2 ** 20
    assert row["batch3_peak_mib"] > row["batch1_peak_mib"] > row["fixed_mib"]
    assert row["backward_gflop"] > row["forward_gflop"] > 0
