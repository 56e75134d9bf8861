"""What one ImageNet-64 image costs to train: FLOPs and memory of img64-xs and img64-s.

    python benchmarks/img64_footprint.py                 # both presets -> benchmarks/results/img64_footprint.json
    python benchmarks/img64_footprint.py --presets img64-xs --out /tmp/f.json

FLOPs are counted, not timed: torch's FlopCounterMode over one forward and one backward pass on
the meta device (shapes only, no memory, no arithmetic), 2 FLOPs a multiply-add. Memory is
measured: one real fp32 training step (train.train_step: EDM2 loss, Adam, EMA) on the CPU at batch
1 and then at batch 1 + EXTRA, in a fresh process; the growth of the process's peak resident
memory between the two, divided by EXTRA, is what each more image of a batch needs (activations
kept for backward). The fixed part is counted: 4 bytes a parameter for the weights, 4 for their
gradients, 8 for Adam's two moments and 4 for each EMA copy. On a GPU, bf16 autocast keeps most
activations in 2 bytes instead of 4, so the fp32 figure per image is an upper bound there.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mini_autoguide import presets  # noqa: E402
from mini_autoguide import train as train_mod  # noqa: E402
from mini_autoguide.checkpoint import write_json  # noqa: E402
from mini_autoguide.unet import Denoiser, count_parameters  # noqa: E402


def on_meta(config):
    with torch.device("meta"):   # shapes and counts without memory
        return Denoiser(config)

from machine import machine  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "img64_footprint.json")
EXTRA = 2


def flops_per_image(preset, n=2):
    """(forward, backward) FLOPs of one image through the Denoiser, counted on the meta device."""
    net = on_meta(presets.net_config(preset)).train()
    cfg = net.config
    with torch.device("meta"):
        x = torch.randn(n, cfg["img_channels"], cfg["resolution"], cfg["resolution"])
        sigma, labels = torch.ones(n), torch.zeros(n, cfg["num_classes"])
    with FlopCounterMode(display=False) as forward:
        denoised, logvar = net(x, sigma, labels, return_logvar=True)
        loss = denoised.square().mean() + logvar.mean()
    with FlopCounterMode(display=False) as backward:
        loss.backward()
    return forward.get_total_flops() / n, backward.get_total_flops() / n


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux reports KiB


def training_step_memory(preset):
    """In this process: peak memory (MiB) after one fp32 step at batch 1, and after one at 1 + EXTRA;
    and the losses."""
    torch.manual_seed(0)
    opts = train_mod.options(preset, precision="fp32", channels_last=False, progress=False)
    net, ema, optimizer, scaler = train_mod.make_trainer(opts, presets.net_config(preset), torch.device("cpu"))
    cfg, record = net.config, dict(loaded_mib=peak_mib())
    for step, n in enumerate((1, 1 + EXTRA)):
        opts.batch = n
        y = torch.rand(n, cfg["img_channels"], cfg["resolution"], cfg["resolution"]) * 2 - 1
        labels = torch.randint(0, cfg["num_classes"], (n,))
        loss = train_mod.train_step(net, net, ema, optimizer, scaler, opts, step, y, labels)
        record[f"batch{n}_peak_mib"], record[f"batch{n}_loss"] = peak_mib(), float(loss)
    return record


def measure(preset):
    fwd, bwd = flops_per_image(preset)
    code = (f"import json, sys; sys.path[:0] = {sys.path[:2]!r}; import img64_footprint as f; "
            f"print(json.dumps(f.training_step_memory({preset!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    mem = json.loads(done.stdout.splitlines()[-1])
    per_image = (mem[f"batch{1 + EXTRA}_peak_mib"] - mem["batch1_peak_mib"]) / EXTRA
    params = count_parameters(on_meta(presets.net_config(preset)))
    ema_copies = len(presets.get(preset)["train"]["ema"])
    return dict(preset=preset, parameters=params, forward_gflop=fwd / 1e9, backward_gflop=bwd / 1e9,
                train_gflop=(fwd + bwd) / 1e9, fixed_mib=params * (4 + 4 + 8 + 4 * ema_copies) / 2 ** 20,
                per_image_mib_fp32=per_image, **mem)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["img64-xs", "img64-s"], choices=presets.names())
    p.add_argument("--out", default=OUT, help="JSON file to write (default: benchmarks/results/img64_footprint.json)")
    args = p.parse_args(argv)
    result = dict(machine=machine(), torch=torch.__version__, rows=[])
    for preset in args.presets:
        row = measure(preset)
        result["rows"].append(row)
        print(f"{preset}: {row['parameters']:,} parameters; {row['forward_gflop']:.1f} GFLOP forward, "
              f"{row['train_gflop']:.1f} GFLOP a training image; fp32 memory {row['fixed_mib']:.0f} MiB fixed + "
              f"{row['per_image_mib_fp32']:.0f} MiB an image; losses {row['batch1_loss']:.3f}, "
              f"{row[f'batch{1 + EXTRA}_loss']:.3f}", flush=True)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
