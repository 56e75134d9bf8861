"""Throughput of the image path: training and sampling images/s, fp32 vs bf16 + channels-last.

    python benchmarks/bench_image.py [--presets fmnist-main fmnist-guide] [--steps 8] [--repeats 3]
    python benchmarks/bench_image.py --conv-profile     # convolution GFLOP and GFLOPS: the fp32 ceiling
    python benchmarks/bench_image.py --compile --presets tiny   # adds fp32 + channels-last, compiled

Every configuration runs in this one process, interleaved round by round (so a
change in machine load hits all alike); we report medians over rounds and the
ratio to the straightforward baseline: the same network in fp32, NCHW layout,
no autocast. fmnist-main is the reference configuration (C = 32,
mult [1, 2, 2], 2 blocks a level, attention at 8x8, 1 channel, 10 classes,
batch 64, 1.69 M parameters; the reference implementation trains ~65 img/s on
2 cores). --compile adds a compiled mode to the CPU modes (not by default: inductor
compiles C++ for minutes on 2 cores, per preset, for training and sampling).
Results: benchmarks/results/image_cpu.json and a table. On a GPU, benchmarks/gpu_check.sh
measures the img64 presets (bf16 and fp16, eager and compiled, loss health, agreement).
"""
import argparse
import json
import os
import sys
import statistics
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mini_autoguide import presets  # noqa: E402
from mini_autoguide.mp import normalize_weights_  # noqa: E402
from mini_autoguide.train import wrap  # noqa: E402
from mini_autoguide.unet import Denoiser, count_parameters  # noqa: E402
from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)

MODES = {  # name: (autocast dtype or None, channels_last[, compiled])
    "fp32 (baseline)": (None, False),
    "fp32 + channels-last": (None, True),
    "bf16 + channels-last": (torch.bfloat16, True),
}
COMPILED = {"fp32 + channels-last, compiled": (None, True, True)}


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
    model = wrap(net, presets.options(preset, compile=compile_), 1, device)   # as train() compiles it
    return net, model, opt, x, sigma, labels


MAX_SECONDS = 20.0  # per timed round: a mode with no fast kernels here (bf16 without AVX-512 BF16) stops early


def _timed(step, steps, device):
    """Seconds per call of step(), averaged over up to `steps` calls (GPU work included)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    done = 0
    while done < steps and (done == 0 or time.perf_counter() - t < MAX_SECONDS):
        step()
        done += 1
    sync()
    return (time.perf_counter() - t) / done


def train_steps(state, dtype, steps):
    """Seconds per training step (forward, EDM2 loss, backward, Adam, weight normalisation)."""
    net, model, opt, x, sigma, labels = state

    def step():
        with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            d, logvar = model(x, sigma, labels, return_logvar=True)
        loss = ((d.float() - x).square().mean((1, 2, 3)) / logvar.exp() + logvar).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        normalize_weights_(net)
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


def bench(preset_names, modes, device, batch, steps, repeats, heun_steps):
    states = {(p, m): make(p, device, modes[m][1], batch, modes[m][2:] == (True,))
              for p in preset_names for m in modes}
    train_t = {k: [] for k in states}
    eval_t = {k: [] for k in states}
    for k, s in states.items():  # warm-up: kernel selection, allocator, compilation
        train_steps(s, modes[k[1]][0], 1)
        eval_steps(s, modes[k[1]][0], 1)
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


def conv_profile(preset, batch, repeats=10):
    """Convolution FLOPs of one forward pass and the rate oneDNN reaches on each layer shape.

    Explains the CPU ceiling: training costs about 3x the forward's FLOPs, so
    (3 x GFLOP) / (GFLOPS) bounds the batches per second of any fp32 implementation.
    """
    net = make(preset, torch.device("cpu"), False, batch)[0].eval()
    shapes, conv2d = {}, F.conv2d

    def counting(x, w, *args, **kwargs):
        shapes[tuple(x.shape), tuple(w.shape)] = shapes.get((tuple(x.shape), tuple(w.shape)), 0) + 1
        return conv2d(x, w, *args, **kwargs)
    cfg = presets.net_config(preset)
    x = torch.randn(batch, cfg["img_channels"], cfg["resolution"], cfg["resolution"])
    labels = torch.zeros(batch, dtype=torch.long) if cfg["num_classes"] else None
    F.conv2d = counting
    try:
        with torch.no_grad():
            net(x, torch.ones(batch), labels)
    finally:
        F.conv2d = conv2d
    total, seconds = 0.0, {False: 0.0, True: 0.0}
    print(f"{preset}, batch {batch}: convolutions of one forward pass")
    for (xs, ws), n in shapes.items():
        flop = 2 * xs[0] * xs[2] * xs[3] * ws[0] * ws[1] * ws[2] * ws[3] * n
        total += flop
        rates = []
        for cl in (False, True):
            a = torch.randn(xs).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
            w = torch.randn(ws)
            conv2d(a, w, padding=ws[-1] // 2)
            t = time.perf_counter()
            for _ in range(repeats):
                conv2d(a, w, padding=ws[-1] // 2)
            dt = (time.perf_counter() - t) / repeats
            seconds[cl] += dt * n
            rates.append(flop / n / dt / 1e9)
        print(f"  x {str(xs):18s} w {str(ws):18s} x{n:<3d} {flop / 1e9:6.2f} GFLOP  "
              f"NCHW {rates[0]:6.1f} GFLOPS  channels-last {rates[1]:6.1f} GFLOPS")
    print(f"  total {total / 1e9:.1f} GFLOP; all convolutions alone: NCHW {seconds[False] * 1e3:.0f} ms, "
          f"channels-last {seconds[True] * 1e3:.0f} ms a forward pass; a training step (~3x) cannot beat "
          f"{batch / (3 * min(seconds.values())):.0f} img/s here")


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
    ap.add_argument("--conv-profile", action="store_true",
                    help="only print each preset's convolution FLOPs and GFLOPS per layer shape (the fp32 ceiling)")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd mode on the CPU")
    args = ap.parse_args()
    if args.conv_profile:
        for p in args.presets:
            conv_profile(p, args.batch)
        return

    modes = {**MODES, **COMPILED} if args.compile else MODES
    rows, guided = bench(args.presets, modes, torch.device("cpu"), args.batch, args.steps, args.repeats, args.heun_steps)
    result = dict(device="cpu", threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                  machine=machine(), torch=torch.__version__,
                  load_average_at_end=os.getloadavg(), rows=rows, autoguided_sample_img_s=guided,
                  note="medians over interleaved rounds in one process; the CPU may be shared (see load average)")
    print(f"machine: {result['machine']}, torch {torch.__version__}, {result['threads']} threads")
    print(table(rows, guided, args.heun_steps))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "image_cpu.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
