"""Forced weight normalisation outside the forward pass, and compiled training that agrees with eager.

EDM2 (arXiv 2312.02696, Sec. 2.3) re-normalises the stored weights at the start of each training
forward pass; train_step does it after each optimizer step instead (after the EMA update), so that
the forward pass is pure and torch.compile can trace it. The two give the same numbers, bit for bit.
"""
import copy

import pytest
import torch

from mini_autoguide import data as data_mod
from mini_autoguide import mp, presets
from mini_autoguide import train as train_mod

from image_helpers import tiny_dataset

OPTS = dict(precision="fp32", channels_last=False, batch=8, lr_ref=0.02, lr_tref=1000, rampup_kimg=0,
            label_dropout=0.2, xflip=True, ema=[0.05, 0.1])


def _batch(n=8):
    images, labels = tiny_dataset().batch(range(n))
    return data_mod.to_model(images), labels.long()


def _step(trainer, opts, step, y, labels):
    net, ema, optimizer, scaler = trainer
    return train_mod.train_step(net, net, ema, optimizer, scaler, opts, step, y, labels).item()


def _mpconvs(net):
    return [m for m in net.modules() if isinstance(m, mp.MPConv)]


@pytest.mark.parametrize("channels_last", [False, True])
def test_post_step_normalisation_equals_normalising_in_the_forward_pass(monkeypatch, channels_last):
    opts = train_mod.options("tiny", **dict(OPTS, channels_last=channels_last))
    y, labels = _batch()
    new = train_mod.make_trainer(opts, presets.net_config("tiny"), torch.device("cpu"))
    new_losses = [_step(new, opts, s, y, labels) for s in range(6)]

    # EDM2's scheme: no normalisation after the step, but at the start of every training forward pass.
    def normalise_first(net, args):
        with torch.no_grad():
            for layer in _mpconvs(net):
                layer.weight.copy_(mp._unit_rows(layer.weight[None])[0])
    monkeypatch.setattr(train_mod, "normalize_weights_", lambda net: None)
    old = train_mod.make_trainer(opts, presets.net_config("tiny"), torch.device("cpu"))
    old[0].register_forward_pre_hook(normalise_first)
    old_losses = [_step(old, opts, s, y, labels) for s in range(6)]

    assert new_losses == old_losses
    for ema_new, ema_old in zip(new[1].nets, old[1].nets):   # the EMA averaged the same weights
        for a, b in zip(ema_new.state_dict().values(), ema_old.state_dict().values()):
            assert torch.equal(a, b)
    normalise_first(old[0], None)   # the weights the old scheme's next forward pass would use
    for a, b in zip(new[0].state_dict().values(), old[0].state_dict().values()):
        assert torch.equal(a, b)
    # after a step every stored row is at unit RMS, up to normalize's eps (1e-4) and float32 rounding
    for layer in _mpconvs(new[0]):
        rms = layer.weight.flatten(1).square().mean(1).sqrt()
        assert (rms - 1).abs().max() < 2e-4


def test_normalize_weights_divides_each_row_by_its_rms():
    """EDM2 (arXiv 2312.02696, Eq. 47): w <- w / (eps + |w_row| / sqrt(fan_in)), eps = 1e-4, written
    out here in float64; the library's float32 result within a few float32 roundings of it."""
    net = train_mod.Denoiser(presets.net_config("tiny"))
    with torch.no_grad():
        for i, layer in enumerate(_mpconvs(net)):   # rows far from unit RMS, each its own size
            layer.weight.mul_(torch.linspace(0.1, 10, layer.weight.shape[0]).reshape(-1, *[1] * (layer.weight.ndim - 1)))
    before = [layer.weight.detach().double().clone() for layer in _mpconvs(net)]
    mp.normalize_weights_(net)
    for w, layer in zip(before, _mpconvs(net)):
        rows = w.flatten(1)
        expected = rows / (1e-4 + rows.norm(dim=1, keepdim=True) / rows.shape[1] ** 0.5)
        assert torch.allclose(layer.weight.double().flatten(1), expected, rtol=8 * 2.0 ** -24, atol=0)


def test_forward_never_writes_the_parameters():
    net = train_mod.Denoiser(presets.net_config("tiny")).train()
    before = copy.deepcopy(net.state_dict())
    y, labels = _batch()
    d, logvar = net(y, torch.full([8], 0.5), labels, return_logvar=True)
    (d.square().mean() + logvar.mean()).backward()
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name


def _live_twins(opts):
    """Two equal networks with live gains (0.7, not 0: every weight then gets a gradient)."""
    net = train_mod.make_trainer(opts, presets.net_config("tiny"), torch.device("cpu"))[0]
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net, copy.deepcopy(net)


# Tolerance from float32 arithmetic. A result of n rounded operations that are reordered (inductor
# fuses element-wise work and reorders its sums) moves by about sqrt(n) units of roundoff
# u = 2^-24 relative to the magnitude of what was summed (errors of random sign add in quadrature).
# The longest chain here: a forward and a backward pass through the tiny U-Net's ~20 layers, each a
# reduction over at most 9 x 32 inputs plus ~10 element-wise steps (~2 x 20 x 300 operations), then a
# weight gradient summed over 8 x 8 x 8 = 512 pixels: n ~ 12,500, sqrt(n) ~ 112. With a factor 2^6 for
# the amplification through the network's normalisations and softmaxes: 64 x 112 x 2^-24 ~ 4e-4,
# relative to the whole gradient's norm (a single entry can cancel to near zero; its error cannot).
RTOL = 64 * 112 * 2.0 ** -24


@pytest.mark.slow   # inductor compiles the forward and backward graphs: about 100 s on 2 cores
def test_compiled_training_agrees_with_eager_on_cpu():
    # NCHW on purpose: the layout in which inductor's own layout optimisation gave wrong gradients.
    torch._dynamo.reset()
    opts = train_mod.options("tiny", **dict(OPTS, compile=True))
    eager, twin = _live_twins(opts)
    compiled = train_mod.wrap(twin, opts, 1, torch.device("cpu"))
    y, labels = _batch()
    onehot = torch.nn.functional.one_hot(labels, 3).float()
    sigma = torch.linspace(0.05, 5, 8)
    x = y + sigma[:, None, None, None] * torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    # One step's loss and gradients, on the same weights and inputs.
    losses = []
    for net, model in ((eager, eager), (twin, compiled)):
        d, logvar = model(x, sigma, onehot, return_logvar=True)
        loss = train_mod.edm.denoising_loss(d, y, sigma, logvar)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=RTOL)
    g_eager = torch.cat([p.grad.flatten() for p in eager.parameters()])
    g_compiled = torch.cat([p.grad.flatten() for p in twin.parameters()])
    assert (g_compiled - g_eager).norm() <= RTOL * g_eager.norm()
    for (name, a), b in zip(eager.named_parameters(), twin.parameters()):   # no tensor left out (zero)
        assert (a.grad - b.grad).norm() <= RTOL * g_eager.norm(), name

    # A few real training steps (train_step, Adam): the losses stay close. Adam turns a rounding-level
    # difference in a near-zero gradient into a whole lr-sized step, so weights are not compared one by
    # one; the loss, a smooth function of all of them, moves by about lr x its gradient at most.
    runs = []
    for model, net in ((eager, eager), (compiled, twin)):
        ema = train_mod.PowerEMA(net, opts.ema)
        optimizer = torch.optim.Adam(net.parameters(), lr=0.0, betas=(0.9, 0.99), eps=1e-8)
        runs.append([train_mod.train_step(net, model, ema, optimizer, None, opts, s, y, labels).item()
                     for s in range(4)])
    assert runs[0][0] == pytest.approx(runs[1][0], rel=RTOL)   # before any Adam step: float rounding only
    assert runs[0] == pytest.approx(runs[1], rel=0.05)
    torch._dynamo.reset()
