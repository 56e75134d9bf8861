"""The EDM2 U-Net: parameter counts, magnitude-preserving layers, unit magnitudes at init,
EDM preconditioning, bf16 against fp32."""
import math

import numpy as np
import pytest
import torch

from mini_autoguide import presets
from mini_autoguide.mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize_weights_
from mini_autoguide.unet import Block, count_parameters

from image_helpers import assert_close_up_to_reordering, on_meta, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")   # small convolutions: one thread is faster on a busy CPU


@pytest.mark.parametrize("name,expected", [("img64-xs", 124_710_949), ("img64-s", 280_209_381)])
def test_img64_parameter_counts_match_the_reference(name, expected):
    # Built on the meta device: no memory, no compute. The counts are those of EDM2's XS and S networks
    # (arXiv 2312.02696) as built by the original implementation; we match them exactly.
    n = count_parameters(on_meta(presets.net_config(name)))
    assert n == expected


def test_small_presets_are_small():
    main = count_parameters(on_meta(presets.net_config("fmnist-main")))
    guide = count_parameters(on_meta(presets.net_config("fmnist-guide")))
    assert 1_000_000 < main < 5_000_000 and guide < main / 3


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        presets.get("nope")


@pytest.mark.parametrize("kernel", [(), (3, 3), (1, 1)])
def test_mp_conv_keeps_unit_variance_at_init(kernel):
    torch.manual_seed(0)
    layer = MPConv(64, 96, kernel)
    x = torch.randn(32, 64, 16, 16) if kernel else torch.randn(4096, 64)
    y = layer(x)
    assert abs(y.std().item() - 1) < 0.05
    # forced weight normalisation is normalize_weights_'s: the stored rows end at unit RMS
    normalize_weights_(layer)
    rms = layer.weight.flatten(1).square().mean(1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3)


@pytest.mark.parametrize("kernel", [(), (3, 3)])
def test_effective_weight_formula_and_gradients(kernel):
    """Each output row divided by (1e-4 + its RMS), mp.normalize's eps convention, times
    gain / sqrt(fan_in) (EDM2, arXiv 2312.02696, Sec. 2), written out here in float64: equal to a few
    ulps (1e-14 relative). Then the forward pass's gradients (weight, input, gain) by gradcheck."""
    torch.manual_seed(0)
    layer = MPConv(6, 5, kernel).double()
    with torch.no_grad():   # rows of unequal norm
        layer.weight.mul_(torch.rand(5, *[1] * (1 + len(kernel)), dtype=torch.float64) * 3)
    w = layer.weight.detach()
    rms = w.reshape(5, -1).square().mean(1).sqrt().reshape(-1, *[1] * (w.ndim - 1))
    expected = w / (1e-4 + rms) * (1.7 / math.sqrt(w[0].numel()))
    assert torch.allclose(layer.effective_weight(1.7, torch.float64), expected, rtol=1e-14, atol=0)
    x = torch.randn(3, 6, *([4, 4] if kernel else []), dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, expected, padding=1) if kernel else x @ expected.t()
    assert torch.allclose(layer(x, 1.7), y, rtol=1e-13, atol=1e-13)

    def forward(weight, x, gain):
        return torch.func.functional_call(layer, {"weight": weight}, (x,), {"gain": gain})
    gain = torch.tensor(1.7, dtype=torch.float64)
    assert torch.autograd.gradcheck(forward, [t.clone().requires_grad_() for t in (w, x, gain)], fast_mode=True)


def test_mp_silu_has_unit_second_moment():
    """E[mp_silu(z)^2] = 1 for z ~ N(0, 1) (EDM2, arXiv 2312.02696, Sec. 2), by 100-point Gauss-Hermite
    quadrature (exact to float64 rounding for this smooth integrand). The constant 0.596 is
    sqrt(E[silu(z)^2]) = 0.59647 to 3 digits, so the RMS is 1.0008: allow 1.5e-3."""
    z, w = np.polynomial.hermite_e.hermegauss(100)   # nodes and weights for exp(-z^2 / 2)
    z, w = torch.tensor(z), torch.tensor(w) / math.sqrt(2 * math.pi)
    assert abs((w * mp_silu(z) ** 2).sum().sqrt().item() - 1) < 1.5e-3


@pytest.mark.parametrize("t", [0.3, 0.5, 0.8])
def test_mp_sum_and_mp_cat_keep_unit_magnitude(t):
    """Both are linear: mp_sum = alpha a + beta b, mp_cat = [alpha a, beta b]. For independent unit-variance
    inputs the output's mean square is alpha^2 + beta^2, or (na alpha^2 + nb beta^2) / (na + nb) for the
    concatenation: 1 (EDM2, arXiv 2312.02696, Sec. 2). b's share is t: beta / alpha = t / (1 - t), per
    channel group for mp_cat (sqrt(nb) beta / sqrt(na) alpha). Read off unit inputs in float64: exact
    to a few ulps."""
    one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    alpha, beta = mp_sum(one, zero, t).item(), mp_sum(zero, one, t).item()
    assert math.isclose(alpha ** 2 + beta ** 2, 1, rel_tol=1e-14)
    assert math.isclose(beta / alpha, t / (1 - t), rel_tol=1e-14)
    na, nb = 6, 10
    out = mp_cat(torch.ones(2, na, 3, dtype=torch.float64), torch.ones(2, nb, 3, dtype=torch.float64), dim=1, t=t)
    assert out.shape == (2, na + nb, 3)
    alpha, beta = out[0, 0, 0].item(), out[0, na, 0].item()
    assert torch.equal(out[:, :na], torch.full_like(out[:, :na], alpha))
    assert torch.equal(out[:, na:], torch.full_like(out[:, na:], beta))
    assert math.isclose((na * alpha ** 2 + nb * beta ** 2) / (na + nb), 1, rel_tol=1e-14)
    assert math.isclose(math.sqrt(nb) * beta / (math.sqrt(na) * alpha), t / (1 - t), rel_tol=1e-14)


def test_mp_fourier_features_have_unit_magnitude():
    """For c ~ N(0, 1), sqrt(2) cos(f c + phi) (f, phi: angular frequency and phase) has mean square
    1 + cos(2 phi) exp(-2 f^2) (EDM2, arXiv 2312.02696, Sec. 2). The expectation over c by the trapezoid
    rule (step 0.01, more than 10 points a period of cos(2 f c) for every channel: for such a smooth,
    Gaussian-weighted integrand exact to rounding) against that closed form, to 1e-4 (float32 cosines
    of arguments up to ~100 err by ~1e-5). With f = 2 pi N(0, 1) and phi uniform, the second term has
    std 0.17 a channel, so over 1024 channels it averages to 0 within 0.17 / 32 = 0.005: allow 0.03."""
    fourier = MPFourier(1024)
    c = torch.linspace(-8, 8, 1601, dtype=torch.float64)
    density = torch.exp(-c ** 2 / 2) / math.sqrt(2 * math.pi) * (c[1] - c[0])
    mean_square = (density[:, None] * fourier(c).double() ** 2).sum(0).mean().item()
    f, phi = fourier.freqs.double(), fourier.phases.double()
    closed_form = 1 + (torch.cos(2 * phi) * torch.exp(-2 * f ** 2)).mean().item()
    assert abs(mean_square - closed_form) < 1e-4
    assert abs(closed_form - 1) < 0.03


@pytest.mark.parametrize("flavor,cin,cout,attention", [("enc", 32, 64, False), ("dec", 96, 64, True),
                                                       ("enc", 64, 64, True)])
def test_block_output_has_unit_magnitude_at_init(flavor, cin, cout, attention):
    torch.manual_seed(0)
    block = Block(cin, cout, 128, flavor, attention=attention, channels_per_head=32)
    with torch.no_grad():
        block.emb_gain.fill_(1.0)  # include the embedding modulation
    x, emb = torch.randn(8, cin, 16, 16), torch.randn(8, 128)
    y = block(x, emb)
    assert y.shape == (8, cout, 16, 16)
    assert abs(y.square().mean().sqrt().item() - 1) < 0.15
    if flavor == "enc":   # pixel norm: the input's scale is gone (up to normalize's eps, 1e-4 relative)
        assert torch.allclose(block(10 * x, emb), y, rtol=1e-3, atol=1e-3)


def test_unet_at_init_outputs_zero_so_denoiser_is_c_skip_x():
    net = tiny_net(live=False)
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 0.5, 2.0, 20.0])
    d, logvar = net(x, sigma, torch.tensor([0, 1, 2, 0]), return_logvar=True)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert torch.allclose(d, c_skip[:, None, None, None] * x, atol=1e-6)
    assert logvar.shape == (4,) and torch.isfinite(logvar).all()


def test_unet_keeps_unit_magnitude_at_init():
    """Forward hooks on the tiny preset's U-Net with its gains live (EDM2, arXiv 2312.02696, Sec. 2),
    fed n = 48 unit-variance images and noise labels, all classes alike.
    Exact: the scaled one-hot (one entry sqrt(classes)) has mean square 1, and so has the class
    embedding averaged over the classes (the mean of its unit-norm rows' squares), up to normalize's
    eps: 1e-3. The Fourier features' mean square has a closed form over random inputs (see
    test_mp_fourier_features_have_unit_magnitude): 5 standard errors of the mean of n inputs.
    Every block's output, every mp_cat feeding a decoder block, the noise embedding, the embedding
    and F have RMS 1 in expectation over weights and inputs; one tiny network (8 channels, fan-in 72)
    departs by O(1) factors (channel correlations, zero padding of 8x8 and 4x4 maps, the live
    modulation 1 + W emb of mean square 2), and n images estimate each mean square to sqrt(2 / n) =
    20%: allow a factor 2 in RMS. A lost normalisation compounds over the ~10 blocks far beyond that."""
    unet = tiny_net(seed=0).unet
    seen = {}

    def keep(name, what="output"):
        def hook(module, args, out=None):
            seen[name] = (out if what == "output" else args[0]).detach().double()
        return hook
    blocks = [(f"enc {name}", m) for name, m in unet.enc.items()] + [(f"dec {name}", m) for name, m in unet.dec.items()]
    for name, module in blocks + [("noise embedding", unet.emb_noise), ("F", unet.out_conv),
                                  ("fourier", unet.emb_fourier), ("class embedding", unet.emb_label)]:
        module.register_forward_hook(keep(name))
    for name, block in blocks:
        if name.startswith("dec") and "_block" in name:
            block.register_forward_pre_hook(keep(f"mp_cat into {name}", "input"))
    unet.enc["8_block0"].emb_linear.register_forward_pre_hook(keep("embedding", "input"))
    unet.emb_label.register_forward_pre_hook(keep("one-hot", "input"))
    gen = torch.Generator().manual_seed(0)
    n = 48
    with torch.no_grad():
        unet(torch.randn(n, 1, 8, 8, generator=gen), torch.randn(n, generator=gen),
             torch.nn.functional.one_hot(torch.arange(n) % 3, 3).float())
    assert len(seen) == len(blocks) + 4 + 4 + 2   # every hook ran: 4 decoder blocks take an mp_cat
    mean_square = {name: x.square().mean().item() for name, x in seen.items()}
    assert abs(mean_square.pop("one-hot") - 1) < 1e-6 and abs(mean_square.pop("class embedding") - 1) < 1e-3
    per_input = seen["fourier"].square().mean(1)
    f, phi = unet.emb_fourier.freqs.double(), unet.emb_fourier.phases.double()
    closed_form = 1 + (torch.cos(2 * phi) * torch.exp(-2 * f ** 2)).mean().item()
    assert abs(per_input.mean().item() - closed_form) < 5 * per_input.std().item() / math.sqrt(n)
    assert all(0.5 < math.sqrt(m) < 2 for m in mean_square.values()), mean_square


class RecordingF(torch.nn.Module):
    """Stands in for the U-Net: records its input and noise labels, returns a known F = sin(2 x) + c_noise."""

    def forward(self, x, noise_labels, class_labels=None):
        self.x, self.noise_labels = x, noise_labels
        return torch.sin(2 * x) + noise_labels[:, None, None, None]


def test_denoiser_applies_edm_preconditioning():
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) with EDM's Table 1 (arXiv 2206.00364),
    sigma_data = 0.5, written out here in float64: c_skip = sd^2 / (s^2 + sd^2), c_out = s sd /
    sqrt(s^2 + sd^2), c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4. The network computes them in
    float32: a few roundings of eps32 each, doubled by sin(2 x); allow 2^6 eps32 of each value's scale."""
    net = tiny_net()
    net.unet = RecordingF()
    sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0])
    s, sd = sigma.double()[:, None, None, None], 0.5
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * (s ** 2 + sd ** 2).sqrt().float()
    d = net(x, sigma, torch.tensor([0, 1, 2, 0, 1, 2]))
    c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt()
    c_in, c_noise = 1 / (s ** 2 + sd ** 2).sqrt(), s.log() / 4
    f = torch.sin(2 * c_in * x.double()) + c_noise
    assert_close_up_to_reordering(net.unet.x.double(), c_in * x.double(), ulps=2 ** 6)
    assert_close_up_to_reordering(net.unet.noise_labels.double(), c_noise.flatten(), ulps=2 ** 6)
    assert_close_up_to_reordering(d.double(), c_skip * x.double() + c_out * f, ulps=2 ** 6)


def test_shapes_labels_and_unconditional_input():
    net = tiny_net()
    x = torch.randn(5, 1, 8, 8)
    d_int = net(x, 1.0, torch.tensor([0, 1, 2, 0, 1]))
    d_hot = net(x, 1.0, torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0, 1]), 3).float())
    d_none = net(x, 1.0, None)
    assert d_int.shape == x.shape
    assert torch.equal(d_int, d_hot)           # ints and one-hot are the same input
    assert not torch.allclose(d_int, d_none)   # the label matters; None = all-zero label (CFG)


def test_bf16_matches_fp32_within_tolerance():
    # Tolerance: bf16 has an 8-bit mantissa (relative step 2^-8 = 0.4%); through ~15 layers the
    # errors add up to a few per mille of the output's magnitude. We allow 2%.
    net = tiny_net()
    x = torch.randn(8, 1, 8, 8)
    sigma = torch.logspace(-2, 1.5, 8)
    labels = torch.arange(8) % 3
    with torch.no_grad():
        ref = net(x, sigma, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x, sigma, labels)
    assert low.dtype == torch.float32
    f_ref = (ref - 0.25 / (sigma ** 2 + 0.25)[:, None, None, None] * x)  # compare the network part c_out F
    err = (low - ref).norm() / f_ref.norm()
    assert err < 0.02, f"bf16 relative error {err:.4f}"
    assert err > 0  # it really ran in bf16


def test_fourier_features_are_fixed_by_construction():
    a, b = tiny_net(seed=1), tiny_net(seed=2)
    assert torch.equal(a.unet.emb_fourier.freqs, b.unet.emb_fourier.freqs)  # buffers, not learned
    assert not any("freqs" in n for n, _ in a.named_parameters())
    assert math.isclose(a.sigma_data, 0.5)
