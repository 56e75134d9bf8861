"""Post-hoc EMA (EDM2, arXiv 2312.02696, Sec. 3, App. C.2): the profiles' inner product, the discrete EMA
as a power-function average, reconstruction of synthetic and trained runs, the `ema` command."""
import math
import shutil

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from mini_autoguide import cli, generate
from mini_autoguide import train as train_mod
from mini_autoguide.checkpoint import read_model, save_model, snapshot_name
from mini_autoguide.ema import PowerEMA, sigma_rel_to_gamma
from mini_autoguide.posthoc import profile_inner, reconstruct, save_reconstruction, snapshots, solve_coefficients
from mini_autoguide.unet import Denoiser

from image_helpers import tiny_dataset, tiny_net

EPS = np.finfo(np.float64).eps


def density(gamma, t, tau):
    return (gamma + 1) * tau ** gamma / t ** (gamma + 1) if 0 <= tau <= t else 0.0


@pytest.mark.parametrize("ga,ta,gb,tb", [(6.94, 3.0, 16.97, 5.0), (16.97, 5.0, 6.94, 3.0), (0.0, 1.0, 2.5, 1.0),
                                         (40.0, 7.0, 3.0, 2.0), (6.94, 2e6, 6.94, 2e6)])
def test_inner_product_matches_numerical_integration(ga, ta, gb, tb):
    t = min(ta, tb)
    for g, s in ((ga, ta), (gb, tb)):  # each a probability density on [0, t]
        assert quad(lambda tau: density(g, s, tau), 0, s, epsabs=0, epsrel=1e-13)[0] == pytest.approx(1, abs=1e-12)
    value, err = quad(lambda tau: density(ga, ta, tau) * density(gb, tb, tau), 0, t, epsabs=0, epsrel=1e-13)
    # quad's own error estimate, plus a few float64 roundings of the closed form's five operations
    assert abs(profile_inner(ga, ta, gb, tb) - value) <= err + 16 * EPS * value
    assert profile_inner(ga, ta, gb, tb) == profile_inner(gb, tb, ga, ta)


def test_power_ema_weights_are_the_profile_integrated_over_each_step():
    # theta_k = e_k (one-hot at step k): the EMA at step n holds each step's weight
    n = 60
    net = torch.nn.Linear(n, 1, bias=False).double()
    ema = PowerEMA(net, (0.05, 0.15))
    for k in range(1, n + 1):
        net.weight.data.zero_()[0, k - 1] = 1
        ema.update(net, k)
    k = np.arange(1, n + 1)
    for gamma, e in zip(ema.gammas, ema.nets):
        expected = (k / n) ** (gamma + 1) - ((k - 1) / n) ** (gamma + 1)  # integral of p over (k-1, k]
        # n float64 lerps, each rounding by ~eps of values <= 1
        np.testing.assert_allclose(e.weight[0].numpy(), expected, rtol=0, atol=4 * n * EPS)


# --- A synthetic run: theta_k a known function of the step, snapshots written like train's ---------------

STEPS, EVERY, BATCH = 1200, 100, 4  # 12 snapshot times x 2 profiles; nimg = 4 * step
TRACKED, TARGETS = (0.05, 0.10), (0.04, 0.075, 0.15)
CHECKS = (1200, 1000, 750)  # the last snapshot, an earlier one, and a time between snapshots
CONFIG = dict(net=dict(synthetic=8), preset="synthetic")


def theta(k):
    """[8] float64: polynomials, sines and an exponential of the progress s = k / STEPS."""
    s = k / STEPS
    return torch.tensor([s, s * s, (1 - s) ** 3, math.sin(2 * math.pi * s), math.sin(6 * math.pi * s),
                         math.cos(10 * math.pi * s), math.sin(30 * math.pi * s), math.exp(-5 * s)], dtype=torch.float64)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """(run folder, trajectory [STEPS, 8], {step: {sigma_rel: exact EMA [8]}}), PowerEMA run in float64."""
    run = tmp_path_factory.mktemp("synthetic")
    net = torch.nn.Linear(8, 1, bias=False).double()
    tracked, exact = PowerEMA(net, TRACKED), PowerEMA(net, TARGETS)
    trajectory, exact_at = [], {}
    for k in range(1, STEPS + 1):
        net.weight.data[0] = theta(k)
        trajectory.append(net.weight.data[0].clone())
        tracked.update(net, k)
        exact.update(net, k)
        if k % EVERY == 0:
            for s, e in zip(TRACKED, tracked.nets):
                save_model(run / snapshot_name(k * BATCH, s), e, train_mod.KIND, CONFIG,
                           dict(nimg=k * BATCH, step=k, sigma_rel=s, label_dropout=0.0))
        if k in CHECKS:
            exact_at[k] = {s: e.weight.data[0].clone() for s, e in zip(TARGETS, exact.nets)}
    return run, torch.stack(trajectory), exact_at


def gram(info):
    """(x [N], A [N, N], <p, p>) of a reconstruction: its coefficients, the Gram matrix of the snapshots
    it used and the target's squared norm (times in images)."""
    ph, gamma = info["posthoc"], sigma_rel_to_gamma(info["sigma_rel"])
    g, t = np.array([sigma_rel_to_gamma(s) for s in ph["sigma_rels"]]), np.array(ph["nimgs"], float)
    A = profile_inner(g[:, None], t[:, None], g[None], t[None])
    return np.array(ph["coefficients"]), A, profile_inner(gamma, info["nimg"], gamma, info["nimg"])


def residual_rounding(x, A, pp):
    """How far the reported residual may fall short of the true one: it is the root of the expanded square
    (x'Ax - 2x'b + pp) / pp, whose terms are at most (sum|x| sqrt(max A_ii / pp) + 1)^2 (Cauchy-Schwarz),
    each sum rounded by ~N eps."""
    return math.sqrt(8 * len(x) * EPS) * (np.abs(x).sum() * math.sqrt(A.diagonal().max() / pp) + 1)


def error_bound(info, trajectory):
    """Bound on |reconstructed - exact EMA|, per parameter [8].

    Both are integrals of the piecewise-constant trajectory (test above) against densities on [0, t]:
    the error is the integral of r (theta - c), r = sum_i x_i p_i - p, for any constant c (r integrates
    to 0: every p integrates to 1 and sum x = 1). Cauchy-Schwarz, c = the mean of theta_1..theta_t:
    |error| <= ||r|| ||theta - c|| = residual ||p|| ||theta - c||, and in steps
    ||p||^2 = (g+1)^2 / ((2g+1) t), ||theta - c||^2 = t std(theta)^2, so
    |error| <= residual (g+1) / sqrt(2g+1) std(theta_1..theta_t).
    Plus rounding: the residual's (above); the EMAs' STEPS float64 lerps and the weighted sum's N terms.
    """
    x, A, pp = gram(info)
    gamma, past = sigma_rel_to_gamma(info["sigma_rel"]), trajectory[:info["step"]]
    residual = info["posthoc"]["residual"] + residual_rounding(x, A, pp)
    bound = residual * (gamma + 1) / math.sqrt(2 * gamma + 1) * past.std(0, correction=0)
    return bound + 4 * (STEPS + len(x)) * EPS * np.abs(x).sum() * past.abs().max()


@pytest.mark.parametrize("step", CHECKS)
def test_reconstruction_matches_the_exact_power_ema(synthetic, step):
    run, trajectory, exact_at = synthetic
    for sigma_rel in TARGETS:
        state, info = reconstruct(run, sigma_rel, at_kimg=step * BATCH / 1000)
        assert info["nimg"] == step * BATCH and info["step"] == step
        assert all(n <= step * BATCH for n in info["posthoc"]["nimgs"])  # only snapshots up to that time
        got, exact = state["weight"][0], exact_at[step][sigma_rel]
        bound = error_bound(info, trajectory)
        assert ((got - exact).abs() <= bound).all(), (sigma_rel, got - exact, bound)
        if step % EVERY == 0:
            # the tolerance is tight enough to tell the target from the nearest tracked profile at that time
            nearest = min(TRACKED, key=lambda s: abs(s - sigma_rel))
            tracked = read_model(run / snapshot_name(step * BATCH, nearest))[0]["weight"][0]
            assert ((tracked - exact).abs() > bound).any(), (sigma_rel, tracked - exact, bound)


def assert_gives_back(run, state, info, name, cast):
    """The reconstruction of the profile stored in run/name is that snapshot: one-hot coefficients and
    the same weights, to rounding. cast: the sum (float64) was stored in float32."""
    x, A, pp = gram(info)
    names = info["posthoc"]["snapshots"]
    deviation = np.abs(x - np.eye(len(x))[names.index(name)])
    d = 1 / np.sqrt(A.diagonal())
    # b = A e_k exactly: a backward-stable solve is off by ~N eps times the condition number it solved
    assert deviation.max() <= 4 * len(x) * np.linalg.cond(A * d[:, None] * d[None]) * EPS, deviation
    assert info["posthoc"]["residual"] <= residual_rounding(x, A, pp) + deviation.sum() * math.sqrt(A.max() / pp)
    snaps = [read_model(run / n)[0] for n in names]
    scale = max(v.abs().max().item() for snap in snaps for v in snap.values())
    # the other snapshots' share; a float32 cast at most doubles a change (it adds < half an ulp of it)
    tol = (2 if cast else 1) * deviation.sum() * scale + len(x) * EPS * np.abs(x).sum() * scale
    stored = snaps[names.index(name)]
    assert state.keys() == stored.keys()
    for key, v in stored.items():
        assert (state[key] - v).abs().max() <= tol, key


def test_a_tracked_profile_at_a_stored_time_comes_back(synthetic):
    for sigma_rel, step in ((0.05, 1200), (0.10, 600), (0.05, 200)):
        state, info = reconstruct(synthetic[0], sigma_rel, at_kimg=step * BATCH / 1000)
        assert_gives_back(synthetic[0], state, info, snapshot_name(step * BATCH, sigma_rel), cast=False)


def test_coefficients_sum_to_one():
    gammas = [sigma_rel_to_gamma(s) for s in (0.05, 0.10)] * 5
    times = np.repeat([1.0, 2, 3, 4, 5], 2)
    for sigma_rel, t in ((0.02, 5), (0.075, 5), (0.2, 4.5), (0.1, 3)):
        x, residual = solve_coefficients(gammas, times, sigma_rel_to_gamma(sigma_rel), t)
        assert abs(x.sum() - 1) <= len(x) * EPS * np.abs(x).sum() and 0 <= residual < 1


def test_snapshot_scan_skips_duplicates_and_reconstructions(synthetic, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(synthetic[0], run)
    before = snapshots(run)
    last = snapshot_name(STEPS * BATCH, 0.05)
    shutil.copy(run / last, run / "network-latest-ema0.05.safetensors")  # a duplicate of the newest
    state, info = reconstruct(run, 0.07)
    save_reconstruction(run / "network-000004800-ema0.07.safetensors", state, info)
    assert [s["path"] for s in snapshots(run)] == [s["path"] for s in before]
    with pytest.raises(FileExistsError):
        save_reconstruction(run / "network-000004800-ema0.07.safetensors", state, info)


# --- A tiny training run, and the command line ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    """5 snapshot times x 2 profiles (sigma_rel 0.05, 0.10) of 60 steps of the tiny preset."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    train_mod.train(tiny_dataset(), str(run), "tiny", kimg=0.48, snapshot_kimg=0.096, precision="fp32",
                    channels_last=False, progress=False, log=lambda *a: None)
    return run


def test_tiny_run_reconstruction_loads_and_samples(tiny_run, tmp_path):
    state, info = reconstruct(tiny_run, 0.07)
    assert len(info["posthoc"]["snapshots"]) == 10 and info["nimg"] == 480
    path = tmp_path / "ema0.07.safetensors"
    save_reconstruction(path, state, info)
    snapshot = tiny_run / snapshot_name(480, 0.05)
    loaded, config, extra = read_model(path, train_mod.KIND)
    assert config == read_model(snapshot)[1] and extra["posthoc"]["coefficients"] == info["posthoc"]["coefficients"]
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert not torch.equal(loaded["unet.out_gain"], read_model(snapshot)[0]["unet.out_gain"])  # a new average
    guide_path = tiny_run / snapshot_name(96, 0.05)
    main, guide = generate.load_models(str(path), str(guide_path), "autoguidance")
    images, labels, raw = generate.generate(main, guide, "autoguidance", 2.0, seeds=range(3), steps=3)
    # the samples are those of the reconstructed weights, guided by that snapshot: the same bits
    # as from networks built here from the weights themselves
    nets = [Denoiser(config["net"]) for _ in range(2)]
    nets[0].load_state_dict(state)
    nets[1].load_state_dict(read_model(guide_path)[0])
    expected = generate.generate(nets[0].eval(), nets[1].eval(), "autoguidance", 2.0, seeds=range(3), steps=3)
    assert np.array_equal(images, expected[0]) and torch.equal(raw, expected[2])


def test_tiny_run_tracked_profile_comes_back(tiny_run):
    for sigma_rel, nimg in ((0.10, 288), (0.05, 480)):
        state, info = reconstruct(tiny_run, sigma_rel, at_kimg=nimg / 1000)
        assert_gives_back(tiny_run, state, info, snapshot_name(nimg, sigma_rel), cast=True)


def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_writes_and_refuses_to_overwrite(tiny_run, tmp_path, capsys):
    out = tmp_path / "ema.safetensors"
    rc, text, _ = run_cli(capsys, "ema", tiny_run, "--sigma-rel", "0.07", "--out", out)
    assert rc == 0 and out.is_file() and "network-000000480-ema0.1.safetensors" in text
    assert read_model(out, train_mod.KIND)[2]["sigma_rel"] == 0.07
    before, mtime = out.read_bytes(), out.stat().st_mtime_ns
    rc, _, err = run_cli(capsys, "ema", tiny_run, "--sigma-rel", "0.12", "--out", out)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--force" in err
    assert out.read_bytes() == before and out.stat().st_mtime_ns == mtime
    rc, _, _ = run_cli(capsys, "ema", tiny_run, "--sigma-rel", "0.12", "--out", out, "--force")
    assert rc == 0 and read_model(out, train_mod.KIND)[2]["sigma_rel"] == 0.12


def mixed_run(tiny_run, tmp_path):
    """The tiny run plus a snapshot of a wider network."""
    run = tmp_path / "mixed"
    shutil.copytree(tiny_run, run)
    wide = tiny_net(channels=16)
    save_model(run / snapshot_name(96, 0.2), wide, train_mod.KIND, dict(net=wide.config, preset="tiny"),
               dict(nimg=96, step=12, sigma_rel=0.2, label_dropout=0.0))
    return run


def pickled_run(tiny_run, tmp_path):
    """A folder whose only snapshot-named file is a pickle."""
    run = tmp_path / "pickled"
    run.mkdir()
    torch.save({"net": 1}, run / snapshot_name(96, 0.05))
    return run


@pytest.mark.parametrize("make,args,message", [
    (None, ["--sigma-rel", "0.3"], "sigma_rel must be in (0, 0.2887)"),
    (None, ["--sigma-rel", "0"], "sigma_rel must be in (0, 0.2887)"),
    (None, ["--sigma-rel", "nan"], "sigma_rel must be in (0, 0.2887)"),
    (None, ["--sigma-rel", "0.07", "--at", "0.5"], "is after the last snapshot"),
    (None, ["--sigma-rel", "0.07", "--at", "inf"], "positive number of kimg"),
    (None, ["--sigma-rel", "0.07", "--at", "0.05"], "at least two snapshots up to 0.05 kimg"),
    (mixed_run, ["--sigma-rel", "0.07"], "differ in network"),
    (pickled_run, ["--sigma-rel", "0.07"], "not a readable safetensors file"),
    (lambda run, tmp: tmp / "nowhere", ["--sigma-rel", "0.07"], "run folder not found"),
    (None, ["--sigma-rel", "x"], "invalid float value"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_run, tmp_path, capsys, make, args, message):
    run = make(tiny_run, tmp_path) if make else tiny_run
    out = tmp_path / "ema.safetensors"
    try:
        rc, text, err = run_cli(capsys, "ema", run, *args, "--out", out)
    except SystemExit as e:  # argparse's own errors
        rc, (text, err) = e.code, capsys.readouterr()
    assert rc == 2 and text == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err and not out.exists()
