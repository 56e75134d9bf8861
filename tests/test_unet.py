"""The EDM2 U-Net: parameter counts, unit magnitudes at init, bf16 against fp32."""
import copy
import math

import pytest
import torch

from mini_autoguide import presets
from mini_autoguide.mp import MPConv, effective_weights, normalize_weights_
from mini_autoguide.unet import Block, build, count_parameters

from image_helpers import tiny_net


@pytest.mark.parametrize("name,expected", [("img64-xs", 124_710_949), ("img64-s", 280_209_381)])
def test_img64_parameter_counts_match_the_reference(name, expected):
    # Built on the meta device: no memory, no compute. The counts are those of EDM2's XS and S networks
    # (arXiv 2312.02696) as built by the original implementation; we match them exactly.
    n = count_parameters(build(presets.net_config(name), device="meta"))
    assert n == expected


def test_small_presets_are_small():
    main = count_parameters(build(presets.net_config("fmnist-main"), device="meta"))
    guide = count_parameters(build(presets.net_config("fmnist-guide"), device="meta"))
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
def test_effective_weights_of_several_layers_equal_one_at_a_time(kernel):
    torch.manual_seed(0)
    one = [MPConv(6, 5, kernel).double() for _ in range(3)]
    for layer in one:
        layer.weight.data *= torch.rand(5, *[1] * (1 + len(kernel)), dtype=torch.float64) * 3  # unnormalised rows
    many = copy.deepcopy(one)
    a = torch.stack([layer.effective_weight(1.7, torch.float64) for layer in one])
    b = effective_weights(many, 1.7, torch.float64)
    assert torch.allclose(a, b, rtol=1e-14, atol=0)
    probe = torch.randn_like(a)
    (a * probe).sum().backward(), (b * probe).sum().backward()
    for p, q in zip(one, many):   # the stored weights untouched, and the same gradients
        assert torch.allclose(p.weight, q.weight, rtol=1e-14, atol=0)
        assert torch.allclose(p.weight.grad, q.weight.grad, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(one[0].weight.grad, torch.zeros_like(one[0].weight))


@pytest.mark.parametrize("flavor,cin,cout,attention", [("enc", 32, 64, False), ("dec", 96, 64, True),
                                                       ("enc", 64, 64, True)])
def test_block_output_has_unit_magnitude_at_init(flavor, cin, cout, attention):
    torch.manual_seed(0)
    block = Block(cin, cout, 128, flavor, attention=attention, channels_per_head=32)
    with torch.no_grad():
        block.emb_gain.fill_(1.0)  # include the embedding modulation
    y = block(torch.randn(8, cin, 16, 16), torch.randn(8, 128))
    assert y.shape == (8, cout, 16, 16)
    assert abs(y.square().mean().sqrt().item() - 1) < 0.15


def test_unet_at_init_outputs_zero_so_denoiser_is_c_skip_x():
    net = tiny_net(live=False)
    x, sigma = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 0.5, 2.0, 20.0])
    d, logvar = net(x, sigma, torch.tensor([0, 1, 2, 0]), return_logvar=True)
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    assert torch.allclose(d, c_skip[:, None, None, None] * x, atol=1e-6)
    assert logvar.shape == (4,) and torch.isfinite(logvar).all()


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
