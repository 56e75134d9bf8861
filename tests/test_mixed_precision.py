"""Mixed-precision training steps on the CPU: fp16 with loss scaling, bf16 and fp32.

fp16 training multiplies the loss by a scale S before backward so that small gradients do not
underflow float16, and divides the gradients by S before Adam's step. When a scaled gradient
overflows (inf or NaN), the step must be skipped and S halved: that is torch.amp.GradScaler's
contract, and train_step must let it see the overflow. Autocast float16 and GradScaler("cpu")
run the same code path as on a GPU, so these tests need none.
"""
import copy
import math

import pytest
import torch

from mini_autoguide import presets
from mini_autoguide import train as train_mod

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
CPU = torch.device("cpu")
# One rounding in float16 is off by at most 2^-11 relative (11-bit significand), 2^-11 / sqrt(3) RMS
# for a uniform error. The tiny network has ~20 layers on its longest path, ~40 forward and backward;
# with magnitudes held near 1 by construction, independent roundings add in quadrature. We allow
# twice that RMS: measured errors are a quarter of it, and bf16 (8 bits, 8x larger) exceeds it.
FP16_LOSS_REL = 2 * math.sqrt(20) * 2.0 ** -11 / math.sqrt(3)
FP16_GRAD_REL = 2 * math.sqrt(40) * 2.0 ** -11 / math.sqrt(3)


def trainer(precision, init_scale=1024.0):
    """make_trainer on the tiny preset with its gains at 1 (at init they are 0 and most gradients
    vanish); fp16 gets a GradScaler("cpu") starting at init_scale."""
    opts = train_mod.options("tiny", precision=precision, channels_last=False, progress=False)
    net, ema, optimizer, scaler = train_mod.make_trainer(opts, presets.net_config("tiny"), CPU)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("gain"):
                p.fill_(1.0)
    if precision == "fp16":
        assert isinstance(scaler, torch.amp.GradScaler)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return opts, net, ema, optimizer, scaler


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 3, (8,), generator=g)


def step(run, step_index, seed=0):
    opts, net, ema, optimizer, scaler = run
    return train_mod.train_step(net, net, ema, optimizer, scaler, opts, step_index, *batch(seed))


def state(run):
    """Everything a step may change, deep-copied: weights, EMA, Adam's state and the scaler's."""
    _, net, ema, optimizer, scaler = run
    return copy.deepcopy(dict(net=net.state_dict(), ema=ema.state_dict(), adam=optimizer.state_dict(),
                              scaler=scaler.state_dict() if scaler else None))


def assert_same(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}.{i}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    run = trainer("fp16")
    step(run, 0)                     # a normal step first, so that Adam and the EMA hold state
    scaler = run[4]
    assert scaler.get_scale() == 1024.0 and run[3].state_dict()["state"]
    scaler.update(2.0 ** 100)        # a scale at which the scaled gradients overflow float16
    before = state(run)
    loss = step(run, 1)
    assert math.isfinite(loss.item())   # the loss itself is fine: only the scaled gradients overflow
    after = state(run)
    assert after["scaler"]["scale"] == 2.0 ** 99
    for part in ("net", "ema", "adam"):
        assert_same(after[part], before[part], part)


def test_fp16_step_matches_fp32_within_float16_rounding():
    ref, low = trainer("fp32"), trainer("fp16")
    loss_ref, loss_low = step(ref, 0), step(low, 0)
    assert low[4].get_scale() == 1024.0   # the step was taken
    # Adam's first moment after one step is (1 - beta1) g: the unscaled gradient, in float32.
    grads = [torch.cat([opt.state[p]["exp_avg"].flatten() for p in net.parameters()])
             for _, net, _, opt, _ in (ref, low)]
    loss_err = abs(loss_low.item() - loss_ref.item()) / loss_ref.item()
    grad_err = ((grads[1] - grads[0]).norm() / grads[0].norm()).item()
    assert loss_err < FP16_LOSS_REL, loss_err
    assert 0 < grad_err < FP16_GRAD_REL, grad_err   # > 0: it really ran in float16


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_gradients_are_zeroed_in_fp32_and_bf16(precision):
    # EDM2 (arXiv 2312.02696) replaces NaN and inf gradients by 0 and takes the step.
    run = trainer(precision)
    _, net, _, optimizer, _ = run
    poisoned = net.unet.out_conv.weight
    poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    step(run, 0)
    assert torch.equal(optimizer.state[poisoned]["exp_avg"], torch.zeros_like(poisoned))
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert not torch.equal(net.unet.enc["8_conv"].weight, before["unet.enc.8_conv.weight"])  # the step was taken


def test_fp16_scaler_state_survives_a_resume_bit_for_bit(tmp_path):
    # The scale starts at a value that is not the default and not a power of two, so that a scaler
    # lost on resume (a fresh one at 65536) would scale the next gradients differently.
    def fresh():
        run = trainer("fp16", init_scale=1000.0)
        run[0].net, run[0].num_images = presets.net_config("tiny"), 8
        return run

    whole = fresh()
    for i in range(4):
        step(whole, i, seed=i)
    part = fresh()
    for i in range(2):
        step(part, i, seed=i)
    opts, net, ema, optimizer, scaler = part
    train_mod._save_checkpoint(str(tmp_path), net, ema, optimizer, scaler, opts, 2)
    saved = state(part)
    resumed = fresh()
    opts, net, ema, optimizer, scaler = resumed
    start = train_mod._resume_or_start(str(tmp_path), opts, net, ema, optimizer, scaler, False, 0, lambda *a: None)
    assert start == 2 and saved["scaler"]["_growth_tracker"] == 2
    assert_same(state(resumed), saved)
    for i in range(2, 4):
        step(resumed, i, seed=i)
    assert_same(state(resumed), state(whole))
