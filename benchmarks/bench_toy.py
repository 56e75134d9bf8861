"""Toy benchmarks: exact score, model score, training iteration, whole reproduction.

Prints medians and ratios against a straightforward baseline run in the same
process, and writes benchmarks/results/toy_cpu.json.

    python benchmarks/bench_toy.py            # scores + training iteration (~1 min)
    python benchmarks/bench_toy.py --full     # + the whole reproduction at the paper's settings

The exact score is timed in float32 (the fast path training uses) and float64
(the reference), with float32's error against float64.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy2d  # noqa: E402
from mini_autoguide.edm import exact_score_loss, sample_sigma  # noqa: E402
from toy2d.model import ToyMLP  # noqa: E402
from toy2d.reproduce import Settings, reproduce  # noqa: E402
from toy2d.train import ToyConfig, train  # noqa: E402
from machine import machine  # noqa: E402  (benchmarks/machine.py, beside this script)


def median_ms(fn, repeats=15, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def baseline_score(g, x, sigma):
    """The straightforward way: per-component Gaussians in log space, autograd for the score."""
    mu = torch.as_tensor(g.mu, dtype=x.dtype)
    cov = torch.as_tensor(g.cov, dtype=x.dtype)[None] + (sigma ** 2)[:, None, None, None] * torch.eye(2, dtype=x.dtype)
    logw = torch.as_tensor(g.weight, dtype=x.dtype).log()
    x = x.detach().requires_grad_(True)
    d = x[:, None, :] - mu[None]                                   # [N, K, 2]
    prec = torch.linalg.inv(cov)
    q = torch.einsum("nki,nkij,nkj->nk", d, prec, d)
    logp = torch.logsumexp(logw - 0.5 * q - 0.5 * torch.logdet(cov) - np.log(2 * np.pi), 1)
    return torch.autograd.grad(logp.sum(), x)[0]


def naive_model_score(net, x, sigma, n=256):
    """The straightforward loop: autograd one point at a time, over the first n points.
    Returns ms per point."""
    t = time.perf_counter()
    for i in range(n):
        net.score(x[i:i + 1], sigma[i:i + 1])
    return (time.perf_counter() - t) / n * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also time the whole reproduction (minutes)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "toy_cpu.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    g = toy2d.gmm("A")
    gen = torch.Generator().manual_seed(0)
    n = 4096
    x = g.sample(n, generator=gen) + 0.05 * torch.randn(n, 2, generator=gen)
    sigma = sample_sigma(n, -2.3, 1.5, generator=gen)
    res = dict(machine=machine(), torch=torch.__version__, threads=torch.get_num_threads())
    print(f"machine: {res['machine']}, torch {res['torch']}, {res['threads']} threads")

    # ---- exact score ---------------------------------------------------------
    s64 = g.score(x.double(), sigma.double())
    ms32 = median_ms(lambda: g.score(x, sigma), repeats=30)
    ms64 = median_ms(lambda: g.score(x.double(), sigma.double()), repeats=15)
    err = float(((g.score(x, sigma).double() - s64) * sigma.double()[:, None]).abs().max())
    base = median_ms(lambda: baseline_score(g, x, sigma), repeats=5, warmup=1)
    res["exact_score"] = dict(points=n, components=len(g), float32_ms=ms32, float64_ms=ms64, baseline_ms=base,
                              max_err_sigma_times_score_float32_vs_float64=err)
    print(f"exact score, {n} points x {len(g)} components, mixed sigma: float32 {ms32:.1f} ms, "
          f"float64 {ms64:.1f} ms ({ms64 / ms32:.1f}x float32); baseline (per-component Gaussians + autograd, "
          f"float32) {base:.0f} ms ({base / ms32:.0f}x float32); max |sigma (s32 - s64)| = {err:.1e}")

    # ---- the model's score (sampling: no graph) ------------------------------
    net = ToyMLP(64).eval().requires_grad_(False)
    with torch.no_grad():
        net.gain.fill_(0.5)
        ms = median_ms(lambda: net.score(x, sigma), repeats=15)
        per_point = naive_model_score(net, x, sigma)
    res["model_score_width64"] = dict(points=n, ms=ms, naive_loop_ms=per_point * n)
    print(f"model score by autograd, width 64, {n} points: {ms:.1f} ms (a loop over points: "
          f"{per_point * n:.0f} ms, {per_point * n / ms:.0f}x)")

    # ---- one training iteration ----------------------------------------------
    # train() itself, per iteration: sampling, the exact target (float32), the
    # model's score by autograd with its graph, the loss's weight gradient
    # (double backward), Adam, EMA; against a step with the baseline exact target.
    for width in (64, 32):
        config = ToyConfig(width=width, iterations=48, batch=n)
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            train(config)
            runs.append((time.perf_counter() - t) / config.iterations * 1e3)
        it = float(np.median(runs))
        net = ToyMLP(width).train()
        opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.9, 0.99))

        def baseline_step():
            y = g.sample(n, generator=gen)
            s = sample_sigma(n, -2.3, 1.5, generator=gen)
            xx = y + s[:, None] * torch.randn(n, 2, generator=gen)
            loss = exact_score_loss(net.score(xx, s), baseline_score(g, xx, s), s)
            opt.zero_grad()
            loss.backward()
            opt.step()
        it_base = median_ms(baseline_step, repeats=5, warmup=1)
        res[f"train_iteration_width{width}"] = dict(batch=n, ms=it, baseline_target_ms=it_base, speedup=it_base / it)
        print(f"training iteration, width {width}, batch {n}: {it:.1f} ms "
              f"(a step with the baseline exact target: {it_base:.0f} ms, {it_base / it:.1f}x)")

    # ---- the whole reproduction ----------------------------------------------
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            report = reproduce(tmp, Settings(), progress=False, log=lambda *a: None)
            total = time.perf_counter() - t
        res["reproduce"] = dict(seconds=total, stages=report["seconds"])
        print(f"toy reproduce at the paper's settings: {total:.0f} s (training "
              + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"]["train"].items())
              + "; " + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items() if k not in ("train", "total"))
              + ")")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
