"""Training an image denoiser the EDM2 way (EDM2, arXiv 2312.02696).

train() reads top to bottom: set up (devices, DDP, data, model, EMA,
optimizer, resume), then the loop, snapshots and checkpoints. Its step is
train_step (also what benchmarks/gpu_check.py times): EDM2 loss with learned
uncertainty, learning-rate schedule alpha_ref / sqrt(max(t / t_ref, 1)) with
linear warm-up, Adam(0.9, 0.99), power-function EMA, forced weight normalisation.

Every random draw of a step (noise levels, noise, label dropout, flips) comes
from a generator seeded by (seed, step) for the *global* batch; each rank
takes its slice. So a run resumes exactly, and N processes with batch B/N
compute what one process computes with batch B.
"""
import json
import math
import os
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from . import data as data_mod
from . import edm, presets
from .edm import learning_rate
from .checkpoint import load_state, save_model, save_state, snapshot_name, write_json
from .ema import PowerEMA
from .mp import normalize_weights_
from .presets import options
from .progress import progress_bar
from .unet import KIND, Denoiser, count_parameters

STATE = "state.pt"
# Options that define a run: a resumed run must agree on these.
_RUN_DEFINING = ("preset", "batch", "seed", "ema", "net", "label_dropout", "xflip", "p_mean", "p_std", "num_images")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: the run stops, its last checkpoint intact."""


def _setup_distributed(device):
    """(rank, world, device) from torchrun's environment; gloo on CPU, nccl on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.device(device).type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return rank, world, torch.device(device)


def fast_bf16(device):
    """Whether bf16 is a speed-up here: on GPUs, and on CPUs whose oneDNN has bf16 kernels
    (AVX-512 BF16 / AMX). Elsewhere PyTorch falls back to a slow reference convolution (~10x slower)."""
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _check_precision(opts, device):
    if opts.precision == "auto":
        opts.precision = "bf16" if fast_bf16(device) else "fp32"
    if opts.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {opts.precision!r}")
    if opts.precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 with loss scaling needs a GPU; use --precision bf16 on CPU")


def train(data, out, preset="fmnist-main", force=False, log=print, **overrides):
    """Train a denoiser on `data` (a path or a dataset object), writing into folder `out`.

    Resumes from out/state.pt if present (unless force). Returns a summary dict.
    """
    opts = options(preset, **overrides)
    rank, world, device = _setup_distributed(opts.device)
    _check_precision(opts, device)
    log = log if rank == 0 else (lambda *a, **k: None)

    # --- Data and model ---------------------------------------------------------------------
    dataset = data_mod.open_dataset(data) if isinstance(data, (str, os.PathLike)) else data
    if opts.batch % world:
        raise ValueError(f"batch {opts.batch} is not divisible by the {world} processes")
    classes = dataset.num_classes if opts.cond else 0
    net_cfg = presets.net_config(preset, resolution=dataset.resolution, img_channels=dataset.channels,
                                 num_classes=classes)
    opts.net, opts.num_images = net_cfg, len(dataset)
    opts.data = str(data) if isinstance(data, (str, os.PathLike)) else None
    net, ema, optimizer, scaler = make_trainer(opts, net_cfg, device)
    start_step = _resume_or_start(out, opts, net, ema, optimizer, scaler, force, rank, log)
    model = wrap(net, opts, world, device)

    # --- Loop -------------------------------------------------------------------------------
    batch, local = opts.batch, opts.batch // world
    total_steps = math.ceil(opts.kimg * 1000 / batch)
    stop_step = total_steps if opts.max_steps is None else min(total_steps, start_step + opts.max_steps)
    snap_img, ckpt_img = round(opts.snapshot_kimg * 1000), round(opts.checkpoint_kimg * 1000)
    log(f"training {preset}: {count_parameters(net):,} parameters, {len(dataset):,} images "
        f"{dataset.channels}x{dataset.resolution}x{dataset.resolution}, {classes} classes, batch {batch} "
        f"on {world} x {device.type}, {opts.precision}, steps {start_step} -> {total_steps}")
    stream = data_mod.batches(dataset, batch, start_step, opts.seed, rank, world, opts.workers)
    bar = progress_bar(total_steps, "train", "step", enabled=rank == 0 and opts.progress, initial=start_step,
                       leave=True)
    t0, loss_sum, loss_n, last_loss = time.time(), 0.0, 0, float("nan")
    for step in range(start_step, stop_step):
        _, images, labels = next(stream)
        y = data_mod.to_model(images.to(device))
        loss = train_step(net, model, ema, optimizer, scaler, opts, step, y, labels.to(device), rank * local)
        last_loss = _mean_over_ranks(loss, world)
        if not math.isfinite(last_loss):
            bar.close()
            raise TrainingDiverged(f"loss became {last_loss} at step {step} ({step * batch:,} images); stopped "
                                   f"without saving: the last good checkpoint in {out} is intact")
        loss_sum, loss_n = loss_sum + last_loss, loss_n + 1
        nimg, prev = (step + 1) * batch, step * batch
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{(step + 1 - start_step) * batch / (time.time() - t0):.0f}")
        out_of_time = opts.max_minutes is not None and _agree(time.time() - t0 > 60 * opts.max_minutes, world)
        end = step + 1 == stop_step or out_of_time
        if rank == 0 and (nimg // snap_img > prev // snap_img or step + 1 == total_steps):
            _save_snapshots(out, ema, opts, nimg, step + 1)
        if rank == 0 and (nimg // ckpt_img > prev // ckpt_img or end):
            _save_checkpoint(out, net, ema, optimizer, scaler, opts, step + 1)
            _append_log(out, dict(step=step + 1, nimg=nimg, loss=loss_sum / max(loss_n, 1),
                                  img_s=(step + 1 - start_step) * batch / (time.time() - t0),
                                  seconds=time.time() - t0))
            loss_sum, loss_n = 0.0, 0
        if rank == 0 and end:  # a stable name for the newest weights of this call
            _save_snapshots(out, ema, opts, nimg, step + 1, latest=True)
        if end:
            stop_step = step + 1
            break
    bar.close()
    if world > 1:
        dist.barrier()
    seconds = time.time() - t0
    return dict(steps=stop_step, start_step=start_step, seconds=seconds, loss=last_loss,
                img_per_s=(stop_step - start_step) * batch / max(seconds, 1e-9), net=net, ema=ema)


def make_trainer(opts, net_cfg, device):
    """A fresh network (train mode, its memory layout, weights normalised), its EMA, Adam, and fp16's loss scaler (else None)."""
    torch.manual_seed(opts.seed)  # the initial weights
    net = Denoiser(net_cfg).to(device).train()
    if opts.channels_last:
        net.to(memory_format=torch.channels_last)
    normalize_weights_(net)  # before the EMA copies, so that they start equal to the network
    ema = PowerEMA(net, opts.ema)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.0, betas=(0.9, 0.99), eps=1e-8)
    scaler = torch.amp.GradScaler(device.type) if opts.precision == "fp16" else None
    return net, ema, optimizer, scaler


def wrap(net, opts, world, device):
    """The module that training calls: net, under DDP and torch.compile if asked."""
    model = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    if opts.compile:
        # The memory layout is ours to choose (opts.channels_last): inductor may not re-lay the graph
        # out by itself (docs/image.md, "Known issues").
        model = torch.compile(model, options={"layout_optimization": False})
    return model


def train_step(net, model, ema, optimizer, scaler, opts, step, y, labels, first=0):
    """One training step on clean images y [B, C, H, W] in [-1, 1] and int labels [B]: this process's
    rows [first, first + B) of the global batch of `step` (0-based). Draws the step's randomness, runs
    the EDM2 loss through `model` (net, or its DDP / compiled wrapper), backward, zeroes non-finite
    gradients (fp32, bf16) or lets the loss scaler skip the step (fp16), steps Adam, updates the EMA
    and re-normalises the weights.
    Returns the loss, detached (a 0-dim tensor)."""
    device, local = y.device, y.shape[0]
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.precision)
    sigma, noise, keep, flip = _step_randomness(opts, step, y.shape[1:], device, first, local)
    y = torch.where(flip[:, None, None, None], y.flip(3), y)
    classes = net.num_classes if opts.cond else 0
    onehot = torch.nn.functional.one_hot(labels, classes).float() * keep[:, None] if classes else None
    x = y + edm.expand(sigma, y) * noise
    if opts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, opts.batch, opts.lr_ref, opts.lr_tref, opts.rampup_kimg * 1000)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        denoised, logvar = model(x, sigma, onehot, return_logvar=True)
    loss = edm.denoising_loss(denoised.float(), y, sigma, logvar)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        for p in net.parameters():  # EDM2: non-finite gradients zeroed, so one bad batch cannot poison Adam
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=0, neginf=0, out=p.grad)
        optimizer.step()
    else:
        # fp16: the loss is multiplied by the scale S before backward, so that small gradients do not
        # underflow. An inf or NaN among the scaled gradients means S was too large: GradScaler then
        # skips Adam's step and halves S. The gradients must reach it untouched for it to see that.
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(optimizer)   # unscales (divides by S), and steps only if every gradient is finite
        scaler.update()
        if scaler.get_scale() < scale:   # the step was skipped: the weights, and so their EMA, stay
            return loss.detach()
    # The EMA averages the weights as Adam left them, and only then are they re-normalised: the order
    # of EDM2's normalisation at the start of the next forward pass, so the EMA and every forward
    # pass get the same numbers as there. The checkpoint then holds the normalised weights that the
    # next step starts from, so a resumed run continues bit for bit.
    ema.update(net, step + 1)
    normalize_weights_(net)
    return loss.detach()


def _step_randomness(opts, step, shape, device, start, count):
    """This rank's slice [start, start + count) of the global batch's random draws at `step`."""
    g = torch.Generator(device).manual_seed(opts.seed * 1_000_003 + step + 1)
    n = opts.batch
    sigma = edm.sample_sigma(n, opts.p_mean, opts.p_std, generator=g, device=device)
    noise = torch.randn((n, *shape), generator=g, device=device)
    keep = (torch.rand(n, generator=g, device=device) >= opts.label_dropout).float()
    flip = torch.rand(n, generator=g, device=device) < (0.5 if opts.xflip else 0.0)
    s = slice(start, start + count)
    return sigma[s], noise[s], keep[s], flip[s]


def _agree(flag, world):
    """Rank 0's decision, so that all processes stop at the same step."""
    if world > 1:
        t = torch.tensor([float(flag)])
        dist.broadcast(t, 0)
        flag = bool(t.item())
    return flag


def _mean_over_ranks(value, world):
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def _resume_or_start(out, opts, net, ema, optimizer, scaler, force, rank, log):
    """Load out/state.pt into the objects and return its step; or check out is free and return 0."""
    path = os.path.join(out, STATE)
    if os.path.isfile(path) and not force:
        state = load_state(path)
        old = state["opts"]
        for key in _RUN_DEFINING:
            if json.dumps(old.get(key)) != json.dumps(getattr(opts, key)):
                raise ValueError(f"{out} holds a run with {key}={old.get(key)!r}, not {getattr(opts, key)!r}: "
                                 f"use the same options to resume, or --force to start over")
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        log(f"resuming {out} at step {state['step']} ({state['step'] * opts.batch:,} images)")
        return int(state["step"])
    if rank == 0 and os.path.isdir(out) and os.listdir(out) and not force:
        raise FileExistsError(f"{out} exists and holds no training state to resume: pass --force to reuse it")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "options.json"), asdict(opts))
        if force and os.path.exists(os.path.join(out, "log.jsonl")):
            os.unlink(os.path.join(out, "log.jsonl"))
    return 0


def _save_checkpoint(out, net, ema, optimizer, scaler, opts, step):
    state = dict(net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                 scaler=scaler.state_dict() if scaler else None, rng=torch.get_rng_state(), step=step,
                 opts={k: getattr(opts, k) for k in _RUN_DEFINING})
    save_state(os.path.join(out, STATE), state)


def _save_snapshots(out, ema, opts, nimg, step, latest=False):
    for sigma_rel, ema_net in zip(ema.sigma_rels, ema.nets):
        name = snapshot_name("latest" if latest else nimg, sigma_rel)
        save_model(os.path.join(out, name), ema_net, KIND,
                   dict(net=opts.net, preset=opts.preset),
                   dict(nimg=nimg, step=step, sigma_rel=sigma_rel, label_dropout=opts.label_dropout))


def _append_log(out, record):
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
