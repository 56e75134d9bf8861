"""Throughput of the image path: training and sampling images/s, fp32 vs bf16 + channels-last.

    python benchmarks/bench_image.py [--presets fmnist-main fmnist-guide] [--steps 8] [--repeats 3]

Every configuration runs in this one process, interleaved round by round (so a
change in machine load hits all alike); we report medians over rounds and the
ratio to the straightforward baseline: the same network in fp32, NCHW layout,
no autocast. fmnist-main *is* the issue's reference configuration (C = 32,
mult [1, 2, 2], 2 blocks a level, attention at 8x8, 1 channel, 10 classes,
batch 64, 1.69 M parameters; the reference implementation trains ~65 img/s on
2 cores). On a GPU it also measures img64-xs and img64-s (bf16, compiled).
Results: benchmarks/results/image_cpu.json (or image_gpu.json) and a table.
"""
import argparse
import json
import os
import sys
import platform
import statistics
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mini_autoguide import presets  # noqa: E402
from mini_autoguide.unet import Denoiser, count_parameters  # noqa: E402

MODES = {  # name: (autocast dtype or None, channels_last)
    "fp32 (baseline)": (None, False),
    "fp32 + channels-last": (None, True),
    "bf16 + channels-last": (torch.bfloat16, True),
}


def make(preset, device, channels_last, batch, compile_=False):
    torch.manual_seed(0)
    cfg = presets.net_config(preset)
    net = Denoiser(cfg).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=fmt)
    x = torch.randn(batch, cfg["img_channels"], cfg["resolution"], cfg["resolution"], device=device)
    x = x.contiguous(memory_format=fmt)
    sigma = torch.rand(batch, device=device) * 5 + 0.01
    labels = torch.randint(0, cfg["num_classes"], (batch,), device=device) if cfg["num_classes"] else None
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model = torch.compile(net) if compile_ else net
    return net, model, opt, x, sigma, labels


def _timed(step, steps, device):
    """Seconds per call of step(), averaged over `steps` calls (GPU work included)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t) / steps


def train_steps(state, dtype, steps):
    """Seconds per training step (forward, EDM2 loss, backward, Adam)."""
    net, model, opt, x, sigma, labels = state

    def step():
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            d, logvar = model(x, sigma, labels, return_logvar=True)
        loss = ((d.float() - x).square().mean((1, 2, 3)) / logvar.exp() + logvar).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.train()
    return _timed(step, steps, x.device)


def eval_steps(state, dtype, steps):
    """Seconds per network evaluation at the batch size (what sampling is made of)."""
    net, model, _, x, sigma, labels = state

    @torch.no_grad()
    def step():
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            model(x, sigma, labels)
    net.eval()
    return _timed(step, steps, x.device)


def bench(preset_names, modes, device, batch, steps, repeats, heun_steps, compile_=False):
    states = {(p, m): make(p, device, modes[m][1], batch, compile_) for p in preset_names for m in modes}
    train_t = {k: [] for k in states}
    eval_t = {k: [] for k in states}
    for k, s in states.items():  # warm-up: kernel selection, allocator, compilation
        train_steps(s, modes[k[1]][0], 2)
        eval_steps(s, modes[k[1]][0], 2)
    for r in range(repeats):
        for k, s in states.items():
            train_t[k].append(train_steps(s, modes[k[1]][0], steps))
            eval_t[k].append(eval_steps(s, modes[k[1]][0], steps))
            print(f"  round {r + 1}/{repeats} {k[0]:14s} {k[1]:22s} train {batch / train_t[k][-1]:8.1f} img/s",
                  flush=True)
    evals = 2 * heun_steps - 1
    rows = []
    for (p, m), s in states.items():
        t_train, t_eval = statistics.median(train_t[p, m]), statistics.median(eval_t[p, m])
        rows.append(dict(preset=p, mode=m, params=count_parameters(s[0]), batch=batch,
                         train_img_s=batch / t_train, eval_img_s=batch / t_eval,
                         sample_img_s=batch / (evals * t_eval), train_s_per_step=train_t[p, m],
                         eval_s_per_call=eval_t[p, m]))
    base_mode = next(iter(modes))
    for row in rows:
        base = next(r for r in rows if r["preset"] == row["preset"] and r["mode"] == base_mode)
        row["train_speedup"] = row["train_img_s"] / base["train_img_s"]
        row["sample_speedup"] = row["sample_img_s"] / base["sample_img_s"]
    # Autoguided sampling: one main and one guide evaluation per step (main = first preset, guide = second).
    guided = {}
    if len(preset_names) > 1:
        for m in modes:
            t = statistics.median(eval_t[preset_names[0], m]) + statistics.median(eval_t[preset_names[1], m])
            guided[m] = batch / (evals * t)
    return rows, guided


def table(rows, guided, heun_steps):
    lines = [f"| preset | params | mode | train img/s | x baseline | sample img/s ({heun_steps} Heun steps) | x baseline |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f} M | {r['mode']} | {r['train_img_s']:.1f} | "
                     f"{r['train_speedup']:.2f} | {r['sample_img_s']:.2f} | {r['sample_speedup']:.2f} |")
    for m, v in guided.items():
        lines.append(f"| main + guide (autoguidance) | | {m} | | | {v:.2f} | |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["fmnist-main", "fmnist-guide"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="steps timed per round")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (the median is reported)")
    ap.add_argument("--heun-steps", type=int, default=32)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()

    rows, guided = bench(args.presets, MODES, "cpu", args.batch, args.steps, args.repeats, args.heun_steps)
    result = dict(device="cpu", threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                  processor=platform.processor() or platform.machine(), torch=torch.__version__,
                  load_average_at_end=os.getloadavg(), rows=rows, autoguided_sample_img_s=guided,
                  note="medians over interleaved rounds in one process; the CPU may be shared (see load average)")
    print(table(rows, guided, args.heun_steps))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "image_cpu.json"), "w") as f:
        json.dump(result, f, indent=2)

    if torch.cuda.is_available():
        gpu_modes = {"bf16 + channels-last, compiled": (torch.bfloat16, True)}
        rows, guided = bench(["img64-s", "img64-xs"], gpu_modes, "cuda", 256, args.steps, args.repeats,
                             args.heun_steps, compile_=True)
        for r in rows:
            r["train_speedup"] = r["sample_speedup"] = float("nan")
        print(table(rows, guided, args.heun_steps))
        with open(os.path.join(args.out, "image_gpu.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, autoguided_sample_img_s=guided), f,
                      indent=2)
    else:
        print("no GPU available: img64-xs / img64-s figures not measured")


if __name__ == "__main__":
    main()
