"""The toy network, its training, saving/loading, and the metrics."""
import os
import stat

import numpy as np
import pytest
import torch

import toy2d
from mini_autoguide.checkpoint import CheckpointError
from mini_autoguide.edm import exact_score_loss
from toy2d import kernel
from toy2d.metrics import ToyMetrics
from toy2d.model import ToyMLP
from toy2d.reproduce import load_toy, save_toy
from toy2d.train import ToyConfig, batches, train


def test_score_equals_autograd_reference_in_float64():
    torch.manual_seed(0)
    net = ToyMLP(16).double().eval()
    with torch.no_grad():
        net.gain.fill_(0.8)
    x = torch.randn(50, 2, dtype=torch.float64)
    sigma = torch.rand(50, dtype=torch.float64) + 0.01
    # finite differences of G (independent of autograd)
    h = 1e-6
    fd = torch.stack([(net.logp(x + h * e, sigma) - net.logp(x - h * e, sigma)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], 1)
    assert torch.allclose(net.score_autograd(x, sigma), fd, rtol=1e-6, atol=1e-6)
    assert torch.allclose(net.score(x, sigma), fd, rtol=1e-6, atol=1e-6)
    d = net(x, sigma)
    assert torch.allclose(d, x + sigma[:, None] ** 2 * net.score(x, sigma))


@pytest.fixture(params=["C kernel", "torch"])
def score_path(request, monkeypatch):
    """The written-out score runs in C (mlp_kernel.c) where it can, else in torch:
    test both. Returns a list that counts the kernel's calls."""
    calls = []
    if request.param == "torch":
        monkeypatch.setattr(kernel, "load_mlp", lambda *args: None)
    elif kernel.load_mlp(8, torch.float64) is None:
        pytest.skip("no C compiler here: the kernel cannot be built")
    else:
        run = kernel.mlp_score
        monkeypatch.setattr(kernel, "mlp_score", lambda *args: calls.append(1) or run(*args))
    return request.param, calls


@pytest.mark.parametrize("width,depth,n", [(16, 4, 40), (8, 1, 40), (8, 0, 40), (64, 2, 71)])
def test_written_out_score_and_its_weight_gradients_equal_autograd_in_float64(score_path, width, depth, n):
    torch.manual_seed(width + depth)
    net = ToyMLP(width, depth).double().eval()
    with torch.no_grad():
        net.gain.fill_(0.7)
    x = torch.randn(n, 2, dtype=torch.float64)   # n = 71: two full tiles of 32 points and an odd rest
    sigma = torch.exp(torch.randn(n, dtype=torch.float64))
    target = torch.randn(n, 2, dtype=torch.float64)
    grads, scores = [], []
    for score in (net.score_autograd(x, sigma, create_graph=True), net.score(x, sigma)):
        net.zero_grad()
        exact_score_loss(score, target, sigma).backward()  # autograd's double backward vs the written-out one
        grads.append([p.grad.clone() for p in net.parameters()])
        scores.append(score.detach())
    assert scores[0].abs().max() > 0 and torch.allclose(scores[1], scores[0], rtol=1e-12, atol=1e-12)
    for reference, written_out in zip(*grads):
        assert reference.abs().max() > 0 and torch.allclose(written_out, reference, rtol=1e-10, atol=1e-12)
    assert torch.allclose(net.score(x, 0.3), net.score_autograd(x, 0.3), rtol=1e-12, atol=1e-12)  # scalar sigma
    assert (len(score_path[1]) > 0) == (score_path[0] == "C kernel")


def test_kernel_agrees_with_torch_in_float32_across_threads(monkeypatch):
    """Training's case: float32, width 64, points split over threads and tiles."""
    if kernel.load_mlp(64, torch.float32) is None:
        pytest.skip("no C compiler here: the kernel cannot be built")
    torch.manual_seed(0)
    net = ToyMLP(64).eval()
    with torch.no_grad():
        net.gain.fill_(0.5)
    x, target = torch.randn(4101, 2), torch.randn(4101, 2)
    sigma = torch.exp(torch.randn(4101) * 1.5 - 1.2)
    results, threads = [], torch.get_num_threads()
    torch.set_num_threads(2)   # the kernel splits the points over 2 threads, whatever the machine
    try:
        for load in (kernel.load_mlp, lambda *args: None):
            monkeypatch.setattr(kernel, "load_mlp", load)
            with kernel.cores_to_kernels():
                assert kernel.threads_to_use() == 2
                net.zero_grad()
                score = net.score(x, sigma)
                exact_score_loss(score, target, sigma).backward()
            results.append([score.detach()] + [p.grad.clone() for p in net.parameters()])
    finally:
        torch.set_num_threads(threads)
    for ours, reference in zip(*results):
        assert (ours - reference).abs().max() <= 1e-5 * reference.abs().max()
    # non-finite input takes the torch code (the kernel is built with -ffast-math)
    monkeypatch.undo()
    x[3] = float("nan")
    with torch.no_grad():
        score = net.score(x, sigma)
    assert torch.isnan(score[3]).all() and torch.isfinite(score[4:]).all()


def test_cores_to_kernels_lends_torch_threads_and_gives_them_back():
    before = torch.get_num_threads()
    with kernel.cores_to_kernels():
        inside = torch.get_num_threads(), kernel.threads_to_use()
    assert torch.get_num_threads() == before
    assert inside == ((1, before) if kernel.load() is not None else (before, before))
    with kernel.cores_to_kernels(enabled=False):
        assert torch.get_num_threads() == before


def test_written_out_score_refuses_a_gradient_with_respect_to_x():
    net = ToyMLP(8).double().eval()
    x = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="score_autograd"):
        net.score(x, 0.5).sum().backward()


def test_untrained_model_is_the_gaussian_prior():
    """With gain 0, G = -|x c_in|^2 / 2: the denoiser of N(0, sigma_d^2 I) data."""
    net = ToyMLP(8).double().eval()
    x = torch.randn(10, 2, dtype=torch.float64)
    assert torch.allclose(net(x, 0.7), x * 0.25 / (0.25 + 0.49))


def test_mp_layers_keep_unit_variance():
    net = ToyMLP(256, depth=4)
    x = torch.randn(4096, 4)
    from mini_autoguide.mp import mp_silu
    y = net.layers[0](x)
    assert abs(y.std().item() - 1) < 0.1
    for layer in net.layers[1:]:
        y = layer(mp_silu(y))
        assert 0.8 < y.std().item() < 1.25


def test_training_beats_untrained_model():
    config = ToyConfig(width=32, iterations=150, batch=1024, seed=1)
    net, losses = train(config)
    g = toy2d.gmm("A")
    gen = torch.Generator().manual_seed(99)
    y = g.sample(4096, generator=gen)
    sigma = (torch.randn(4096, generator=gen) * 1.5 - 2.3).exp()
    x = y + sigma[:, None] * torch.randn(4096, 2, generator=gen)
    target = g.score(x, sigma)
    untrained = ToyMLP(32).eval()
    with torch.no_grad():
        trained_loss = exact_score_loss(net.score(x, sigma), target, sigma)
        untrained_loss = exact_score_loss(untrained.score(x, sigma), target, sigma)
    assert trained_loss < 0.6 * untrained_loss
    assert np.mean(losses[-20:]) < np.mean(losses[:20])


def test_dsm_loss_trains_too():
    net, losses = train(ToyConfig(width=16, iterations=60, batch=512, loss="dsm"))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_training_is_deterministic_per_seed():
    a, _ = train(ToyConfig(width=8, iterations=5, batch=256, seed=3))
    b, _ = train(ToyConfig(width=8, iterations=5, batch=256, seed=3))
    c, _ = train(ToyConfig(width=8, iterations=5, batch=256, seed=4))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("loss", ["exact", "dsm"])
def test_training_does_not_depend_on_how_targets_are_chunked(loss):
    # the exact targets of several iterations come from one call; the random draws keep their order
    config = ToyConfig(width=8, iterations=7, batch=256, seed=5, loss=loss)
    one, losses_one = train(config, chunk=1)
    three, losses_three = train(config, chunk=3)   # 3 + 3 + 1
    assert losses_one == pytest.approx(losses_three, rel=1e-6, abs=1e-7)
    for pa, pb in zip(one.parameters(), three.parameters()):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("loss", ["exact", "dsm"])
def test_batches_drawn_ahead_in_the_background_are_the_same(loss):
    config = ToyConfig(width=8, iterations=5, batch=300, loss=loss)
    target = toy2d.gmm("A")

    def draw(ahead):
        return list(batches(target, config, torch.Generator().manual_seed(1), chunk=2, ahead=ahead))
    with kernel.cores_to_kernels():
        ahead, inline = draw(True), draw(False)
    assert len(ahead) == len(inline) == 5
    for a, b in zip(ahead, inline):
        assert all(torch.equal(p, q) if p is not None else q is None for p, q in zip(a, b))
    assert (ahead[0][3] is None) == (loss == "dsm")


def test_bad_config():
    with pytest.raises(ValueError, match="unknown class"):
        ToyConfig(classes="Z").check()
    with pytest.raises(ValueError, match="unknown loss"):
        ToyConfig(loss="l1").check()


def test_save_load_round_trip(tmp_path):
    config = ToyConfig(width=8, iterations=3, batch=64)
    net, _ = train(config)
    path = tmp_path / "m.safetensors"
    save_toy(path, net, config)
    loaded, cfg = load_toy(path)
    assert cfg == config
    x = torch.randn(5, 2)
    assert torch.equal(loaded(x, 0.3), net(x, 0.3))
    # written atomically, yet with the usual permissions (mkstemp alone gives 0600)
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask


def test_load_refuses_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_toy(tmp_path / "nope.safetensors")
    config = ToyConfig(width=8, iterations=1, batch=64)
    net, _ = train(config)
    good = tmp_path / "good.safetensors"
    save_toy(good, net, config)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or foreign"):
        load_toy(truncated)
    pickle = tmp_path / "pickle.safetensors"
    torch.save(net.state_dict(), pickle)
    with pytest.raises(CheckpointError):
        load_toy(pickle)
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a mini_autoguide model"):
        load_toy(foreign)


def test_metrics_on_true_and_bad_samples():
    m = ToyMetrics("A", n_reference=2048, n_threshold=50_000)
    gen = torch.Generator().manual_seed(5)
    truth = m.gmm.sample(2048, generator=gen)
    r = m(truth)
    assert abs(r["outliers"] - 0.01) < 0.01       # 1% of true samples fall outside 99% of the mass
    assert r["precision"] > 0.9 and r["recall"] > 0.9
    assert r["branch_tv"] < 0.15
    # a distribution that collapses onto the single heaviest branch
    heavy = m.gmm.branch == m.gmm.branch[np.argmax(m.gmm.weight)]
    sub = toy2d.GMM(m.gmm.weight[heavy], m.gmm.mu[heavy], m.gmm.cov[heavy])
    core = sub.sample(2048, generator=gen)
    rc = m(core)
    share = m.gmm.weight[heavy].sum()
    assert abs(rc["branch_tv"] - (1 - share)) < 0.03  # all mass on one branch: TV = 1 - its weight
    assert rc["recall"] < share + 0.1 and rc["precision"] > 0.9
    # class B samples are almost all outliers
    rb = m(toy2d.gmm("B").sample(2048, generator=gen))
    assert rb["outliers"] > 0.9 and rb["precision"] < 0.2
    assert r["diverged"] == 0


def test_metrics_count_diverged_samples_against_the_method():
    """A sample thrown out of float range (inf, NaN) is an outlier, lies on no
    branch and is imprecise; the others are measured as usual."""
    m = ToyMetrics("A", n_reference=2048, n_threshold=50_000)
    truth = m.gmm.sample(1000, generator=torch.Generator().manual_seed(6))
    clean = m(truth)
    broken = truth.clone()
    broken[:50, 0] = float("inf")
    broken[50:100, 1] = float("nan")
    r, rest = m(broken), m(truth[100:])
    assert r["diverged"] == 0.1 and r["n"] == 1000
    assert r["outliers"] == pytest.approx(0.1 + 0.9 * rest["outliers"])
    assert r["precision"] == pytest.approx(0.9 * rest["precision"])
    assert r["branch_tv"] > clean["branch_tv"] + 0.04   # a tenth of the mass on no branch
    assert r["mean_logp"] == rest["mean_logp"] and np.isfinite(r["mean_logp"])
    with pytest.raises(ValueError, match="every sample diverged"):
        m(torch.full((5, 2), float("nan")))
