"""Toy benchmarks: exact score, training iteration, whole reproduction.

Prints medians and ratios against a straightforward baseline run in the same
process, and writes benchmarks/results/toy_cpu.json.

    python benchmarks/bench_toy.py            # score + training iteration (~1 min)
    python benchmarks/bench_toy.py --full     # + the whole reproduction at the paper's settings

The exact score is timed twice: the fused C kernel (float32 on the CPU, the
default where a C compiler exists) and fractal.py's torch code (its fallback).
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy2d  # noqa: E402
from mini_autoguide.edm import exact_score_loss, sample_sigma  # noqa: E402
from toy2d.model import ToyMLP  # noqa: E402
from toy2d.train import ToyConfig, train  # noqa: E402


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


@contextlib.contextmanager
def model_score(path):
    """Within: ToyMLP.score runs as `path` says: "kernel" (the default: the C
    kernel), "torch" (the same formulas in torch ops) or "autograd" (autograd's
    double backward of logp, the reference)."""
    written, load_mlp = ToyMLP.score, toy2d.kernel.load_mlp
    if path != "kernel":
        toy2d.kernel.load_mlp = lambda *args: None
    if path == "autograd":
        ToyMLP.score = lambda self, x, sigma: self.score_autograd(x, sigma)
    try:
        yield
    finally:
        ToyMLP.score, toy2d.kernel.load_mlp = written, load_mlp


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
    res = dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               torch=torch.__version__, threads=torch.get_num_threads())

    # ---- exact score ---------------------------------------------------------
    s64 = g.score(x.double(), sigma.double())
    paths = {}
    for path, off in (("kernel", ""), ("torch", "1")):  # the fused C kernel, then fractal.py's torch code
        os.environ["MINI_AUTOGUIDE_NO_KERNEL"] = off
        if path == "kernel" and toy2d.kernel.load() is None:
            print("exact score: no C compiler, the kernel is not timed")
            continue
        ms = median_ms(lambda: g.score(x, sigma), repeats=30)
        err = float(((g.score(x, sigma).double() - s64) * sigma.double()[:, None]).abs().max())
        paths[path] = dict(ms=ms, max_err_sigma_times_score_vs_float64=err)
    os.environ.pop("MINI_AUTOGUIDE_NO_KERNEL")
    base = median_ms(lambda: baseline_score(g, x, sigma), repeats=5, warmup=1)
    res["exact_score"] = dict(points=n, components=len(g), baseline_ms=base, **{
        f"{k}_{path}": v for path, r in paths.items() for k, v in r.items()})
    for path, r in paths.items():
        print(f"exact score ({path}), {n} points x {len(g)} components, mixed sigma, float32: {r['ms']:.1f} ms "
              f"(baseline {base:.0f} ms, {base / r['ms']:.0f}x); "
              f"max |sigma (s32 - s64)| = {r['max_err_sigma_times_score_vs_float64']:.1e}")

    # ---- one training iteration ----------------------------------------------
    # train() itself, per iteration: sampling, exact targets (16 iterations a kernel
    # call, drawn ahead in the background where the kernels serve), the model's score and its weight gradient, Adam, EMA. The model's score
    # three ways, interleaved: the C kernel (ours), the same formulas in torch ops,
    # and autograd's double backward; and a step with the baseline exact score.
    paths = ("kernel", "torch", "autograd")
    for width in (64, 32):
        config = ToyConfig(width=width, iterations=96, batch=n)   # 6 chunks of targets: the first is not hidden
        runs = {path: [] for path in paths}
        for r in range(5):
            for path in paths[r % 3:] + paths[:r % 3]:
                with model_score(path):
                    t = time.perf_counter()
                    train(config)
                    runs[path].append((time.perf_counter() - t) / config.iterations * 1e3)
        it, it_torch, it_autograd = (float(np.median(runs[k])) for k in paths)
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
        res[f"train_iteration_width{width}"] = dict(
            batch=n, ms=it, torch_model_score_ms=it_torch, autograd_model_score_ms=it_autograd,
            baseline_target_ms=it_base, speedup=it_base / it)
        print(f"training iteration, width {width}, batch {n}: {it:.1f} ms (the network in torch ops: "
              f"{it_torch:.1f} ms, {it_torch / it:.2f}x; with autograd's double backward: {it_autograd:.1f} ms, "
              f"{it_autograd / it:.2f}x; a step with the baseline exact score: {it_base:.0f} ms, {it_base / it:.1f}x)")

    # ---- the whole reproduction ----------------------------------------------
    if args.full:
        import tempfile
        from toy2d.reproduce import Settings, reproduce
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
    old = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
    old.update(res)
    with open(args.out, "w") as f:
        json.dump(old, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
