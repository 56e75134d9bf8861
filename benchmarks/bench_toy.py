"""Toy benchmarks: exact score, model score, training iteration, seeds trained together, whole reproduction.

Prints medians and ratios against a straightforward baseline run in the same
process, and writes benchmarks/results/toy_cpu.json.

    python benchmarks/bench_toy.py            # scores, routes to the score's gradient, training (~3 min)
    python benchmarks/bench_toy.py --full     # + the whole reproduction at the paper's settings

The exact score is timed in float32 (the fast path training uses) and float64
(the reference), with float32's error against float64.
"""
import argparse
import json
import math
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
from mini_autoguide.ema import PowerEMA  # noqa: E402
from mini_autoguide.edm import learning_rate  # noqa: E402
from mini_autoguide.mp import SILU_STD, _unit_rows, mp_silu, normalize_weights_  # noqa: E402
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


def hand_written_score(net, x, sigma):
    """The network's score with its backward pass written out (first-order operations only), so
    that training needs one backward instead of a double backward. A route measured here, not used."""
    s = sigma[:, None]
    c_in = (s ** 2 + net.sigma_data ** 2).rsqrt()
    weights = [layer.effective_weight() for layer in net.layers]
    h = torch.cat([x * c_in, s.log() / 4, torch.ones_like(s)], 1) @ weights[0].t()
    hidden = []
    for w in weights[1:]:
        hidden.append(h)
        h = (torch.nn.functional.silu(h) / SILU_STD) @ w.t()
    delta = h * (2 * net.gain / (h.shape[1] * s))                  # dG/dF
    for w, h in zip(reversed(weights[1:]), reversed(hidden)):
        sig = torch.sigmoid(h)
        delta = (delta @ w) * (sig * (1 + h * (1 - sig)) / SILU_STD)   # through silu'
    return (delta @ weights[0][:, :2]) * c_in - x * c_in ** 2


def forward_mode_score(net, x, sigma):
    """The network's score by forward mode: one torch.func.jvp per input dimension."""
    f = lambda xx: net.logp(xx, sigma)  # noqa: E731
    return torch.stack([torch.func.jvp(f, (x,), (torch.eye(2)[i].expand_as(x),))[1] for i in range(2)], 1)


class StackedToyMLP(torch.nn.Module):
    """S ToyMLPs of one architecture as one batched computation (a route measured here, not used):
    each parameter stacks the S models' tensors along a leading dimension, and every operation is
    ToyMLP.logp's with that dimension in front. x: [S, N, 2], sigma: [S, N]."""

    def __init__(self, nets):
        super().__init__()
        self.sigma_data = nets[0].sigma_data
        self.weights = torch.nn.ParameterList(
            [torch.stack([net.layers[i].weight.detach() for net in nets]) for i in range(len(nets[0].layers))])
        self.gain = torch.nn.Parameter(torch.stack([net.gain.detach() for net in nets]))

    def score(self, x, sigma):
        sigma = sigma[:, :, None]
        x = x.detach().requires_grad_(True)
        c_in = (sigma ** 2 + self.sigma_data ** 2).rsqrt()
        y = torch.cat([x * c_in, sigma.log() / 4, torch.ones_like(sigma)], 2)
        for i, weight in enumerate(self.weights):
            w = _unit_rows(weight) * (1 / math.sqrt(weight.shape[2]))   # MPConv.effective_weight
            if i == 0:   # 4 inputs: a batched product (and its gradients) would round differently
                y = torch.stack([y[k] @ w[k].t() for k in range(len(w))])
            else:
                y = mp_silu(y) @ w.transpose(1, 2)
        logp = self.gain[:, None] * y.square().mean(2) / sigma[:, :, 0] - 0.5 * (x * c_in).square().sum(2)
        return torch.autograd.grad(logp.sum(), x, create_graph=True)[0]


def train_together(configs):
    """train() for seeds of one configuration (exact loss) as one batched computation. Returns
    each seed's EMA weights as a list of state dicts, which main() compares with train()'s bits."""
    nets = []
    for c in configs:
        torch.manual_seed(c.seed)
        nets.append(ToyMLP(c.width, c.depth))
        normalize_weights_(nets[-1])
    net, config, target = StackedToyMLP(nets), configs[0], toy2d.gmm(configs[0].classes)
    gens = [torch.Generator().manual_seed(c.seed) for c in configs]
    ema = PowerEMA(net, [config.ema_sigma_rel])
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.99), fused=True)
    for t in range(1, config.iterations + 1):
        ys = [target.sample(config.batch, generator=gen) for gen in gens]   # each seed's batch, as train() draws it
        sigmas = [sample_sigma(config.batch, config.p_mean, config.p_std, generator=gen) for gen in gens]
        x = torch.stack([y + s[:, None] * torch.randn(y.shape, generator=gen) for y, s, gen in zip(ys, sigmas, gens)])
        sigma = torch.stack(sigmas)
        s_true = target.score(x.flatten(0, 1), sigma.flatten()).view(x.shape)
        score = net.score(x, sigma)
        loss = sum(exact_score_loss(score[k], s_true[k], sigma[k]) for k in range(len(configs)))
        for group in opt.param_groups:
            group["lr"] = learning_rate(t, 1, config.lr, config.lr_ref_iter)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(net, t)
        with torch.no_grad():
            for weight in net.weights:
                weight.copy_(_unit_rows(weight))
    stacked = ema.nets[0]
    return [dict({f"layers.{i}.weight": w[k] for i, w in enumerate(stacked.weights)}, gain=stacked.gain[k])
            for k in range(len(configs))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also time the whole reproduction (minutes)")
    parser.add_argument("--original-s-per-iteration", type=float, metavar="S",
                        help="with --full: another implementation's measured seconds per training iteration, "
                             "on this machine; prints how many times faster the whole reproduction is than its training alone")
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

    # ---- routes to the loss's weight gradient ----------------------------------
    # The model's part of a training step (score with its graph, loss, backward) by three routes.
    net = ToyMLP(64).train()
    with torch.no_grad():
        net.gain.fill_(0.5)
    target = g.score(x, sigma)
    routes = dict(double_backward=lambda: net.score(x, sigma),
                  hand_written_backward=lambda: hand_written_score(net, x, sigma),
                  forward_mode_jvp=lambda: forward_mode_score(net, x, sigma))
    res["score_routes_width64"] = {}
    for name, score in routes.items():
        def step():
            net.zero_grad(set_to_none=True)
            exact_score_loss(score(), target, sigma).backward()
        res["score_routes_width64"][name] = median_ms(step, repeats=10)
    ref = res["score_routes_width64"]["double_backward"]
    print("the model's part of a training step, width 64, batch 4,096: "
          + ", ".join(f"{k.replace('_', ' ')} {v:.1f} ms ({v / ref:.2f}x)" for k, v in res["score_routes_width64"].items()))

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

    # ---- seeds trained together ------------------------------------------------
    # S seeds one after another (train) against the same S as one batched computation
    # (train_together; are each seed's bits train()'s?), 16 iterations each at the
    # paper's batch; seeds per hour of the paper's iterations.
    res["seeds_together"] = {}
    for width, iterations in ((64, 4096), (32, 512)):
        for seeds in (2, 5, 10):
            configs = [ToyConfig(width=width, iterations=16, seed=k) for k in range(seeds)]
            t = time.perf_counter()
            nets = [train(config)[0] for config in configs]
            alone = (time.perf_counter() - t) / (16 * seeds)
            t = time.perf_counter()
            states = train_together(configs)
            together = (time.perf_counter() - t) / (16 * seeds)
            same_bits = all(torch.equal(value, state[name]) for net, state in zip(nets, states)
                            for name, value in net.state_dict().items())
            res["seeds_together"][f"width{width}_seeds{seeds}"] = dict(
                alone_ms_per_seed_iteration=alone * 1e3, together_ms_per_seed_iteration=together * 1e3,
                speedup=alone / together, seeds_per_hour_alone=3600 / (alone * iterations),
                seeds_per_hour_together=3600 / (together * iterations), iterations=iterations,
                same_bits_as_alone=same_bits)
            print(f"width {width}, {seeds} seeds: {alone * 1e3:.1f} ms a seed's iteration alone, {together * 1e3:.1f} "
                  f"together ({alone / together:.2f}x); {iterations} iterations: {3600 / (alone * iterations):.1f} "
                  f"against {3600 / (together * iterations):.1f} seeds an hour; "
                  f"{'the same bits as alone' if same_bits else 'OTHER BITS than alone'}")

    # ---- the whole reproduction ----------------------------------------------
    if args.full:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            report = reproduce(tmp, Settings(), progress=False, log=lambda *a: None)
            total = time.perf_counter() - t
        iterations = sum(Settings().config(name).iterations for name in ("main", "guide", "uncond"))
        res["reproduce"] = dict(seconds=total, stages=report["seconds"], iterations=iterations)
        print(f"toy reproduce at the paper's settings: {total:.0f} s (training "
              + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"]["train"].items())
              + "; " + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items() if k not in ("train", "total"))
              + ")")
        if args.original_s_per_iteration:
            other = args.original_s_per_iteration * iterations
            res["reproduce"]["other_implementation"] = dict(s_per_iteration=args.original_s_per_iteration,
                                                            training_seconds=other, ratio=other / total)
            print(f"the other implementation's training of the same {iterations} iterations: {other:.0f} s, "
                  f"{other / total:.1f}x this whole reproduction")

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
