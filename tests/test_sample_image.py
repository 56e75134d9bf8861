"""Image sampling: per-seed determinism, batch-size invariance, guide cost, guide checks, CLI outputs."""
import math
import os

import numpy as np
import pytest
import torch

from mini_autoguide import cli, generate as gen
from mini_autoguide.checkpoint import save_model
from mini_autoguide.sampler import randn_from_seeds
from mini_autoguide.seeds import parse_seeds, seed_text
from mini_autoguide.unet import KIND

from image_helpers import assert_close_up_to_reordering, tiny_net

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_parse_seeds_and_seed_text_are_inverse():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert seed_text([0, 1, 2, 3, 7, 10, 11]) == "0-3,7,10-11" and seed_text([5]) == "5"
    for bad in ("3-1", "a", "1-x", "-2"):
        with pytest.raises(ValueError, match="seed range"):
            parse_seeds(bad)


def assert_uint8_of(images, x):
    """images (uint8 [N, H, W, C]) are x (float [N, C, H, W], in [-1, 1]) mapped to 0..255:
    127.5 (x + 1) rounded to the nearest integer (halves up), then clipped."""
    v = x.double().permute(0, 2, 3, 1).numpy() * 127.5 + 128
    expected = np.floor(v).clip(0, 255)
    # generate computes v in float32 (its ulp at 256 is 3e-5): within 1e-4 of an integer it may round either way
    near_integer = np.abs(v - np.round(v)) < 1e-4
    assert images.dtype == np.uint8 and images.shape == expected.shape
    assert (images == expected)[~near_integer].all() and (np.abs(images - expected) <= 1).all()


def test_sampling_is_batch_size_invariant_and_seeded():
    main, guide = tiny_net(seed=0), tiny_net(seed=1)
    kw = dict(method="autoguidance", weight=2.0, seeds=range(6), steps=4, sigma_max=20.0)
    images, labels, whole = gen.generate(main, guide, batch=6, **kw)
    assert_uint8_of(images, whole)
    _, labels2, split = gen.generate(main, guide, batch=4, **kw)   # batches of 4 + 2
    assert np.array_equal(labels, labels2) and labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert_close_up_to_reordering(split, whole)   # convolution kernels are blocked by batch size
    _, _, one = gen.generate(main, guide, batch=1, **{**kw, "seeds": [4]})
    assert_close_up_to_reordering(one[0], whole[4])                   # seed 4 alone = seed 4 in a batch
    _, _, other = gen.generate(main, guide, batch=6, **{**kw, "seeds": range(6, 12)})
    assert not torch.allclose(other, whole)                           # other seeds, other images


def test_a_network_that_outputs_c_skip_x_samples_the_solution_of_its_ode():
    # out_gain = 0 (as initialised): F = 0, so D(x; sigma) = c_skip x = x sigma_d^2 / (sigma^2 + sigma_d^2).
    # The probability-flow ODE dx/dsigma = (x - D) / sigma = x sigma / (sigma^2 + sigma_d^2) is then
    # solved by x(sigma) ~ sqrt(sigma^2 + sigma_d^2): x(0) = x(sigma_max) sigma_d / sqrt(sigma_d^2 + sigma_max^2),
    # with x(sigma_max) = sigma_max times each seed's noise.
    net = tiny_net(live=False)
    seeds, sigma_max, sigma_d = range(4), 20.0, net.sigma_data
    x_start = sigma_max * randn_from_seeds(seeds, (net.img_channels, net.resolution, net.resolution))
    exact = x_start * sigma_d / math.sqrt(sigma_d ** 2 + sigma_max ** 2)
    error = {}
    for steps in (16, 32):
        images, _, x = gen.generate(net, seeds=seeds, steps=steps, sigma_max=sigma_max)
        error[steps] = (x / exact - 1).abs().max().item()
        assert_uint8_of(images, x)
    assert (x < -1).any() and (x > 1).any()   # the uint8 check above saw clipping at both ends
    # The sampler's discretisation error: Heun's method is second order, so doubling the steps
    # divides it by about 4 (a first-order method's by 2).
    assert error[16] < 0.1 and error[32] < error[16] / 3


def test_channels_last_sampling_matches_nchw():
    main, guide = tiny_net(seed=0), tiny_net(seed=1)
    kw = dict(method="autoguidance", weight=2.0, seeds=range(4), steps=4, sigma_max=20.0)
    _, _, nhwc = gen.generate(main, guide, channels_last=True, **kw)
    conv = next(m.weight for m in main.modules() if getattr(m, "weight", None) is not None and m.weight.ndim == 4
                and m.weight.shape[0] > 1 and m.weight.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()  # NHWC was used
    _, _, nchw = gen.generate(main, guide, channels_last=False, **kw)
    assert nchw.abs().max() > 0.1
    assert_close_up_to_reordering(nhwc, nchw)


def test_compiled_sampling_compiles_once_per_graph_not_once_per_sigma(monkeypatch):
    # dynamo with a counting backend (no inductor: fast). A float sigma reaching the compiled
    # network would be a constant: 23 compilations for 12 Heun steps, eager after the 8th.
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda net: compile_(net, backend=counting))
    torch._dynamo.reset()
    main, guide = tiny_net(seed=0), tiny_net(seed=1)
    kw = dict(method="autoguidance", weight=2.0, seeds=range(3), steps=12, sigma_max=20.0, batch=2)  # 2 + 1
    _, _, eager = gen.generate(main, guide, **kw)
    _, _, compiled = gen.generate(main, guide, compile=True, **kw)
    torch._dynamo.reset()
    assert 1 <= len(graphs) <= 4  # main and guide (two modules), maybe a second graph each; not 23
    assert_close_up_to_reordering(compiled, eager)


@pytest.mark.slow  # inductor compiles C++ kernels: a minute or two on 2 cores
def test_compiled_sampling_matches_eager_with_a_padded_last_batch():
    main, guide = tiny_net(seed=0), tiny_net(seed=1)
    kw = dict(method="autoguidance", weight=2.0, seeds=range(7), steps=3, sigma_max=20.0, batch=4)  # 4 + 3
    _, labels, eager = gen.generate(main, guide, **kw)
    _, labels_c, compiled = gen.generate(main, guide, compile=True, **kw)
    assert compiled.shape == eager.shape and np.array_equal(labels, labels_c)
    assert_close_up_to_reordering(compiled, eager)   # inductor fuses and reorders the element-wise sums


class Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0
        self.num_classes, self.img_channels, self.resolution = net.num_classes, net.img_channels, net.resolution

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


@pytest.mark.parametrize("method,interval,guide_calls", [("autoguidance", None, 7), ("cfg", None, 7),
                                                         ("none", None, 0), ("autoguidance", (0.5, 5.0), None)])
def test_guide_costs_at_most_one_evaluation_per_main_evaluation(method, interval, guide_calls):
    main, guide = Counting(tiny_net(seed=0)), Counting(tiny_net(seed=1))
    gen.generate(main, guide, method, 2.0, interval, seeds=range(3), steps=4, sigma_max=20.0, batch=3)
    assert main.calls == 2 * 4 - 1
    if guide_calls is None:  # with an interval the guide runs only inside it
        assert 0 < guide.calls < main.calls
    else:
        assert guide.calls == guide_calls


class Recording(torch.nn.Module):
    """A denoiser that records the class labels of every call (None: unconditional)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.labels = net, []
        self.num_classes, self.img_channels, self.resolution = net.num_classes, net.img_channels, net.resolution

    def forward(self, x, sigma, class_labels=None, **kwargs):
        self.labels.append(None if class_labels is None else class_labels.clone())
        return self.net(x, sigma, class_labels, **kwargs)


def test_cfg_with_the_main_network_as_its_own_unconditional_model():
    # No --guide: the main network guides itself without labels. If the labels reached the
    # guide call too, D_guide = D_main and CFG would silently return the main model's images.
    main = Recording(tiny_net(seed=0))
    kw = dict(seeds=range(3), steps=4, sigma_max=20.0)
    _, _, plain = gen.generate(main, None, "none", **kw)
    main.labels.clear()
    _, labels, guided = gen.generate(main, None, "cfg", 2.5, **kw)
    calls = main.labels
    assert len(calls) == 2 * (2 * 4 - 1)                  # a main and a guide call per evaluation
    assert all(c is not None and c.tolist() == labels.tolist() for c in calls[0::2])
    assert all(c is None for c in calls[1::2])
    assert (guided - plain).abs().max() > 1e-2            # w != 1 changes the images


def test_weight_one_is_the_main_model_and_guidance_changes_images():
    main, guide = tiny_net(seed=0), tiny_net(seed=1)
    kw = dict(seeds=range(3), steps=4, sigma_max=20.0)
    _, _, plain = gen.generate(main, None, "none", **kw)
    _, _, w1 = gen.generate(main, guide, "autoguidance", 1.0, **kw)
    _, _, w2 = gen.generate(main, guide, "autoguidance", 2.0, **kw)
    assert torch.equal(plain, w1) and not torch.allclose(plain, w2, atol=1e-3)


def test_bf16_sampling_stays_close_to_fp32():
    # Tolerance: 4 Heun steps through a bf16 network (relative precision 2^-8 per layer);
    # the images (in [-1, 1] scale) must agree to 0.05 RMS.
    main = tiny_net(seed=0)
    _, _, ref = gen.generate(main, seeds=range(4), steps=4, sigma_max=20.0)
    _, _, low = gen.generate(main, seeds=range(4), steps=4, sigma_max=20.0, bf16=True)
    rms = (ref - low).square().mean().sqrt()
    assert 0 < rms < 0.05, rms


def save_net(path, net):
    save_model(path, net, KIND, dict(net=net.config, preset="tiny"), dict(nimg=0))


def test_incompatible_guides_are_refused(tmp_path):
    save_net(tmp_path / "main.safetensors", tiny_net())
    for name, override, what in (("res", dict(resolution=16), "resolution"), ("ch", dict(img_channels=3), "channels"),
                                 ("cls", dict(num_classes=5), "classes")):
        save_net(tmp_path / f"{name}.safetensors", tiny_net(**override))
        with pytest.raises(ValueError, match=f"guide's {what}"):
            gen.load_models(tmp_path / "main.safetensors", tmp_path / f"{name}.safetensors", "autoguidance")
    # CFG may use an unconditional guide of the same image shape
    save_net(tmp_path / "uncond.safetensors", tiny_net(num_classes=0))
    gen.load_models(tmp_path / "main.safetensors", tmp_path / "uncond.safetensors", "cfg")
    with pytest.raises(ValueError, match="needs a guide"):
        gen.load_models(tmp_path / "main.safetensors", None, "autoguidance")


def test_cli_sample_writes_pngs_grid_npz_and_refuses_to_overwrite(tmp_path, capsys):
    save_net(tmp_path / "main.safetensors", tiny_net(seed=0))
    save_net(tmp_path / "guide.safetensors", tiny_net(seed=1))
    out = tmp_path / "s"
    argv = ["sample", str(tmp_path / "main.safetensors"), "--guide", str(tmp_path / "guide.safetensors"),
            "--method", "autoguidance", "--seeds", "0-5", "--steps", "3", "--sigma-max", "20", "--out", str(out)]
    assert cli.main(argv) == 0
    z = np.load(out / "samples.npz")
    assert z["seeds"].tolist() == list(range(6)) and z["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    # the images are generate's for these models and settings (the CLI's default w = 2)
    images, _, _ = gen.generate(tiny_net(seed=0), tiny_net(seed=1), "autoguidance", 2.0, seeds=range(6), steps=3,
                                sigma_max=20.0)
    assert np.array_equal(z["images"], images)
    # each seed's PNG is its image; the grid has a column a class, so seed i sits at row i // 3, column i % 3
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(out / "000005.png")), images[5, :, :, 0])
    grid = np.asarray(Image.open(out / "grid.png"))
    assert np.array_equal(grid.reshape(2, 8, 3, 8).transpose(0, 2, 1, 3).reshape(6, 8, 8), images[..., 0])
    before = (out / "grid.png").read_bytes()
    capsys.readouterr()
    assert cli.main(argv + ["--seeds", "6-11"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--force" in err and err.count("\n") == 1
    assert (out / "grid.png").read_bytes() == before
    assert cli.main(argv + ["--force", "--classes", "2"]) == 0
    assert np.load(out / "samples.npz")["labels"].tolist() == [2] * 6


@pytest.mark.parametrize("argv,message", [
    (["sample", "missing.safetensors", "--out", "x"], "checkpoint not found"),
    (["sample", "MAIN", "--method", "autoguidance", "--out", "x"], "needs a guide"),
    (["sample", "MAIN", "--classes", "7", "--out", "x"], "class 7 is outside"),
    (["sample", "MAIN", "--seeds", "5-1", "--out", "x"], "bad seed range"),
])
def test_cli_sample_bad_input(tmp_path, capsys, argv, message):
    save_net(tmp_path / "main.safetensors", tiny_net())
    argv = [str(tmp_path / "main.safetensors") if a == "MAIN" else str(tmp_path / a) if a in ("x", "missing.safetensors")
            else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x")


def test_cli_really_exits_2_without_traceback(tmp_path):
    import subprocess
    import sys
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    r = subprocess.run([sys.executable, "-m", "mini_autoguide", "sample", str(tmp_path / "junk.safetensors"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_side_by_side_wraps_into_rows_of_equal_cells(tmp_path, capsys):
    from PIL import Image
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    paths = []
    for k, colour in enumerate(colours):  # different sizes: every cell takes the largest
        paths.append(str(tmp_path / f"{k}.png"))
        Image.new("RGB", (10 + k, 6), colour).save(paths[-1])
    out = tmp_path / "grid.png"
    assert cli.main(["grid", *paths, "--titles", "a", "b", "c", "d", "--columns", "2", "--scale", "2",
                     "--out", str(out)]) == 0
    im = Image.open(out).convert("RGB")
    gap, head, cell_w, cell_h = 8, 20, 2 * 13, 2 * 6 + 20
    assert im.size == (2 * cell_w + gap, 2 * cell_h + gap)
    for k, colour in enumerate(colours):  # each image's top-left pixel, under its title, in row-major order
        x, y = (k % 2) * (cell_w + gap), (k // 2) * (cell_h + gap) + head
        assert im.getpixel((x, y)) == colour
    one_row = tmp_path / "row.png"
    assert cli.main(["grid", *paths, "--out", str(one_row)]) == 0
    assert Image.open(one_row).size == (4 * cell_w + 3 * gap, 2 * 6)  # no titles, no head
    capsys.readouterr()
    assert cli.main(["grid", *paths, "--columns", "0", "--out", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--columns" in err and err.count("\n") == 1
    assert not (tmp_path / "bad.png").exists()
