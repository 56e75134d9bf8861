"""One-GPU check of the image path: training and sampling speed, loss health, bf16 against fp32,
and fp16 loss scaling on an overflow.

    bash benchmarks/gpu_check.sh             # one CUDA GPU -> benchmarks/results/image_gpu.json, < 8 minutes
    bash benchmarks/gpu_check.sh --dry-run   # the same code on the CPU, tiny preset, a few steps, seconds

Needs no data and no network: batches are random images and labels. Training runs the project's own
step (train.make_trainer, train.wrap, train.train_step) for img64-xs and img64-s in bf16 and in fp16
with loss scaling, eager and compiled. Each eager run trains a few hundred steps from the preset's
initial weights (its learning-rate warm-up shortened to half the run, so the loss check sees the
full rate) and records the first and last loss and whether all were finite; images/s is timed over
the steps after the first few. Sampling: img64-s guided by img64-xs (autoguidance, a few Heun steps,
bf16). Agreement: one img64-s denoiser call in bf16 autocast against fp32, with live gains.
fp16 overflow: with the loss scale forced to 2^100, train_step must skip the step (weights, EMA and
Adam's state unchanged) and halve the scale.

A time budget guards the whole: each phase starts only if its minimum time is left and stops its
steps when its share is spent, recording why; the JSON is rewritten (atomically) after each phase.
"""
import argparse
import os
import platform
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mini_autoguide import presets  # noqa: E402
from mini_autoguide import train as train_mod  # noqa: E402
from mini_autoguide.checkpoint import write_json  # noqa: E402
from mini_autoguide.generate import generate  # noqa: E402
from mini_autoguide.unet import Denoiser  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "image_gpu.json")
# Batch per preset on one H100/H200 (80-141 GB), from the memory that benchmarks/img64_footprint.py
# measured (fp32: 0.71 GiB an image for xs, 1.31 for s, plus a fixed 2.8 and 6.3 GiB): about what fits
# in fp32 on 80 GB, and half of what should fit in bf16 and fp16, which keep most activations in 2 bytes.
GPU_BATCH = {"img64-xs": 128, "img64-s": 64}


class Budget:
    """Wall-clock budget from start; phases ask before they start and while they run."""

    def __init__(self, seconds):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self):
        return self.seconds - (time.perf_counter() - self.t0)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(cfg, n, device, seed=0):
    """Random clean images in [-1, 1] [n, C, R, R] and labels [n]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(n, cfg["img_channels"], cfg["resolution"], cfg["resolution"], generator=g) * 2 - 1
    return y.to(device), torch.randint(0, max(cfg["num_classes"], 1), (n,), generator=g).to(device)


def train_run(preset, precision, compiled, batch, steps, skip, share, device):
    """Train `steps` real training steps (fewer if `share` seconds run out); time those after `skip`."""
    opts = train_mod.options(preset, precision=precision, compile=compiled, batch=batch, channels_last=True,
                             device=str(device), rampup_kimg=steps * batch / 2 / 1000)
    cfg = presets.net_config(preset)
    net, ema, optimizer, scaler = train_mod.make_trainer(opts, cfg, device)
    model = train_mod.wrap(net, opts, 1, device)
    y, labels = _batch(cfg, batch, device)
    t_start, losses, t_timed = time.perf_counter(), [], None
    for step in range(steps):
        if step == skip:
            _sync(device)
            t_timed = time.perf_counter()
        losses.append(train_mod.train_step(net, model, ema, optimizer, scaler, opts, step, y, labels))
        if step == 0:
            _sync(device)
            first_s = time.perf_counter() - t_start   # compilation included, when compiled
        if time.perf_counter() - t_start > share and step >= skip + 1:
            break
    _sync(device)
    done = len(losses)
    losses = torch.stack(losses).float().cpu()
    return dict(status="ok", img_per_s=(done - skip) * batch / (time.perf_counter() - t_timed) if t_timed else None,
                steps=done, timed_steps=done - skip, first_step_s=first_s, first_loss=float(losses[0]),
                last_loss=float(losses[-1]), all_finite=bool(torch.isfinite(losses).all()),
                lr_rampup_kimg=opts.rampup_kimg, stopped_by_budget=done < steps)


def sampling_run(main, guide, batch, heun_steps, device):
    """Images/s of autoguided sampling: main guided by guide, bf16, seeds 0..batch-1 (after one warm-up)."""
    nets = []
    for name in (main, guide):
        torch.manual_seed(0)
        net = Denoiser(presets.net_config(name)).to(device).eval().requires_grad_(False)
        _live_gains(net)
        nets.append(net)
    kw = dict(method="autoguidance", weight=2.0, batch=batch, bf16=True, device=device)
    generate(*nets, seeds=range(batch), steps=2, **kw)   # warm-up: kernel choice, allocator
    _sync(device)
    t = time.perf_counter()
    _, _, x = generate(*nets, seeds=range(batch), steps=heun_steps, **kw)
    _sync(device)
    return dict(status="ok", main=main, guide=guide, method="autoguidance", weight=2.0, heun_steps=heun_steps,
                network_calls_each=2 * heun_steps - 1, batch=batch, bf16=True,
                img_per_s=batch / (time.perf_counter() - t), finite=bool(torch.isfinite(x).all()))


def agreement(preset, batch, device):
    """One denoiser call in bf16 autocast against fp32: max and RMS difference over the fp32 output's RMS."""
    torch.manual_seed(0)
    cfg = presets.net_config(preset)
    net = Denoiser(cfg).to(device).eval().requires_grad_(False)
    _live_gains(net)   # at init the gains are 0 and D = c_skip x whatever the precision
    y, labels = _batch(cfg, batch, device, seed=1)
    sigma = torch.exp(torch.linspace(-3, 3, batch, device=device))   # noise levels 0.05 .. 20
    x = y + sigma[:, None, None, None] * torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:   # a true fp32 reference: cuDNN convolutions run in TF32 (10-bit mantissa) by default
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        d32 = net(x, sigma, labels)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    with torch.autocast(device.type, dtype=torch.bfloat16):
        d16 = net(x, sigma, labels).float()
    rms = d32.square().mean().sqrt()
    diff = d16 - d32
    return dict(status="ok", preset=preset, batch=batch, reference="fp32, TF32 off", max_abs_rel=float(diff.abs().max() / rms),
                rms_rel=float(diff.square().mean().sqrt() / rms), output_rms=float(rms))


def fp16_overflow(preset, batch, device):
    """fp16 loss scaling on an overflow: a normal step, then the scale set to 2^100 so that the scaled
    gradients overflow float16. train_step must skip that step (weights, EMA and Adam's state
    unchanged, bit for bit) and GradScaler must halve the scale."""
    opts = train_mod.options(preset, precision="fp16", batch=batch, channels_last=True, device=str(device))
    cfg = presets.net_config(preset)
    net, ema, optimizer, scaler = train_mod.make_trainer(opts, cfg, device)
    _live_gains(net)
    y, labels = _batch(cfg, batch, device)
    scales = []
    for step in range(30):   # GradScaler starts at 2^16 and halves until the gradients fit
        scales.append(scaler.get_scale())
        train_mod.train_step(net, net, ema, optimizer, scaler, opts, step, y, labels)
        if scaler.get_scale() == scales[-1]:
            break
    scaler.update(2.0 ** 100)
    before = [t.clone() for t in _state_tensors(net, ema, optimizer)]
    loss = train_mod.train_step(net, net, ema, optimizer, scaler, opts, step + 1, y, labels)
    after = _state_tensors(net, ema, optimizer)
    return dict(status="ok", preset=preset, batch=batch, scales_until_a_step=scales, loss=float(loss),
                scale_after_overflow=scaler.get_scale(), scale_halved=scaler.get_scale() == 2.0 ** 99,
                state_unchanged=len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)))


def _state_tensors(net, ema, optimizer):
    adam = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return [*net.state_dict().values(), *[p for n in ema.nets for p in n.state_dict().values()], *adam]


def _live_gains(net):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)


def _fp16_support(device):
    """None if fp16 autocast and GradScaler work here, else why not."""
    try:
        scaler = torch.amp.GradScaler(device.type)
        w = torch.ones(2, 2, device=device, requires_grad=True)
        with torch.autocast(device.type, dtype=torch.float16):
            loss = (w @ w).float().sum()
        scaler.scale(loss).backward()
        return None
    except Exception as e:   # noqa: BLE001 - the reason goes into the results
        return f"fp16 autocast with GradScaler({device.type!r}) fails here: {type(e).__name__}: {e}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, the tiny preset in place of both img64 "
                    "presets, a handful of steps; writes into a temp dir unless --out or $GPU_CHECK_OUT")
    ap.add_argument("--out", default=None, help="the JSON file (default: $GPU_CHECK_OUT, else "
                    "benchmarks/results/image_gpu.json, or in a dry run a new temp dir)")
    ap.add_argument("--compile", action="store_true", help="dry run: also the compiled configs (minutes on a CPU)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock seconds for all phases "
                    "(default: 450 on a GPU, 45 in a dry run)")
    ap.add_argument("--steps", type=int, default=None, help="training steps of each eager run (default: 300; dry: 6)")
    args = ap.parse_args(argv)

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        ap.error("no CUDA GPU here: use --dry-run to run the same code on the CPU")
    out = args.out or os.environ.get("GPU_CHECK_OUT") or (
        os.path.join(tempfile.mkdtemp(prefix="gpu_check_"), "image_gpu.json") if dry else DEFAULT_OUT)
    device = torch.device("cpu" if dry else "cuda")
    budget = Budget(args.budget_s or (45 if dry else 450))
    names = {"xs": "tiny" if dry else "img64-xs", "s": "tiny" if dry else "img64-s"}
    batch = {k: 8 if dry else GPU_BATCH[v] for k, v in names.items()}
    steps = args.steps or (6 if dry else 300)
    compiled_ok = not dry or args.compile
    # Each phase: (minimum seconds left to start it, its share of the time at most).
    eager_need, compiled_need = (0, 20) if dry else (30, 50), (60, 600) if dry else (150, 200)

    result = dict(dry_run=dry, device=torch.cuda.get_device_name() if not dry else platform.processor() or "cpu",
                  torch=torch.__version__, cuda=torch.version.cuda, cpu_count=os.cpu_count(),
                  presets=names, batch={names[k]: batch[k] for k in names},
                  batch_note="per-preset batch on one GPU: " + ("the tiny preset's 8 (dry run)" if dry else
                             "128 for img64-xs, 64 for img64-s: about half of what should fit in bf16 on 80 GB (docs/image.md)"),
                  budget_s=budget.seconds, train=[], sampling=None, bf16_vs_fp32=None, fp16_overflow=None)

    def save():
        result["elapsed_s"] = budget.seconds - budget.left()
        write_json(out, result)

    def phase(record, need, fn):
        """Run fn() into record unless the budget says no; failures are recorded, not raised."""
        if budget.left() < need:
            record.update(status="skipped", reason=f"time budget: {budget.left():.0f} s left, {need} s needed")
        else:
            try:
                record.update(fn())
            except Exception as e:   # noqa: BLE001 - one failing config must not lose the others
                record.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                              where=traceback.format_exc(limit=-1).strip().splitlines()[-1][:300])
            finally:
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        save()
        print(record, flush=True)
        return record

    fp16_reason = _fp16_support(device)

    def train_phase(key, precision, compiled):
        record = dict(preset=names[key], precision=precision, compiled=compiled, batch=batch[key])
        result["train"].append(record)
        skip = fp16_reason if precision == "fp16" else None
        if compiled and not compiled_ok:
            skip = "dry run: compiled configs need --compile (inductor takes minutes on a CPU)"
        if skip:
            record.update(status="skipped", reason=skip)
            return save()
        need, share = compiled_need if compiled else eager_need
        share = min(share, max(budget.left() - 10, 1))
        phase(record, need, lambda: train_run(names[key], precision, compiled, batch[key],
                                              min(steps, 20) if compiled else steps,
                                              3 if compiled or dry else 5, share, device))

    # The eager runs, the two cheap measurements, then the compiled runs (the first to give way).
    for precision in ("bf16", "fp16"):
        for key in ("xs", "s"):
            train_phase(key, precision, False)
    result["bf16_vs_fp32"] = phase({}, 0 if dry else 15, lambda: agreement(names["s"], min(batch["s"], 16), device))
    result["fp16_overflow"] = phase({}, 0 if dry else 15, lambda: fp16_overflow(names["xs"], min(batch["xs"], 16), device)) \
        if fp16_reason is None else dict(status="skipped", reason=fp16_reason)
    result["sampling"] = phase({}, 0 if dry else 30, lambda: sampling_run(
        names["s"], names["xs"], batch["s"], 2 if dry else 8, device))
    for precision in ("bf16", "fp16"):
        for key in ("xs", "s"):
            train_phase(key, precision, True)
    save()
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
