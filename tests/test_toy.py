"""The toy network, its training, saving/loading, sampling and the exact metrics."""
import os
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import knn_reference
import toy2d
from mini_autoguide import guidance
from mini_autoguide.checkpoint import CheckpointError
from mini_autoguide.edm import exact_score_loss, learning_rate
from mini_autoguide.mp import mp_silu
from toy2d.model import ToyMLP
from toy2d.sample import ToyMetrics, denoiser
from toy2d.train import ToyConfig, load_toy, save_toy, train

pytestmark = pytest.mark.usefixtures("one_thread")   # many small ops: one thread is faster on a busy CPU


def test_score_is_the_gradient_of_logp_by_finite_differences_in_float64():
    torch.manual_seed(0)
    net = ToyMLP(16).double().eval()
    with torch.no_grad():
        net.gain.fill_(0.8)
    x = torch.randn(50, 2, dtype=torch.float64)
    sigma = torch.rand(50, dtype=torch.float64) + 0.01
    # central differences of G (independent of autograd): error O(h^2) + rounding O(1e-16 / h)
    h = 1e-6
    fd = torch.stack([(net.logp(x + h * e, sigma) - net.logp(x - h * e, sigma)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], 1)
    assert torch.allclose(net.score(x, sigma), fd, rtol=1e-6, atol=1e-6)
    with torch.no_grad():   # as the sampler calls it
        assert torch.allclose(net.score(x, sigma), net.score(x, sigma, create_graph=True), rtol=1e-12, atol=1e-12)
        assert torch.allclose(net(x, sigma), x + sigma[:, None] ** 2 * net.score(x, sigma))
    assert torch.allclose(net.score(x, 0.3), net.score(x, torch.full((50,), 0.3, dtype=torch.float64)))


@pytest.mark.parametrize("width,depth", [(16, 4), (8, 0)])
def test_weight_gradient_of_the_score_loss_by_finite_differences_in_float64(width, depth):
    """Training differentiates the autograd score with respect to the weights
    (create_graph=True): check that double backward against central differences of the loss."""
    torch.manual_seed(width + depth)
    net = ToyMLP(width, depth).double().train()
    with torch.no_grad():
        net.gain.fill_(0.7)
    x = torch.randn(40, 2, dtype=torch.float64)
    sigma = torch.exp(torch.randn(40, dtype=torch.float64))
    target = torch.randn(40, 2, dtype=torch.float64)

    def loss():
        return exact_score_loss(net.score(x, sigma), target, sigma)
    net.zero_grad()
    loss().backward()
    h = 1e-6
    for p in net.parameters():
        assert p.grad.abs().max() > 0
        flat, grad = p.data.view(-1), p.grad.view(-1)
        for i in torch.randperm(flat.numel())[:4].tolist():
            old = flat[i].item()
            with torch.no_grad():
                flat[i] = old + h
                up = loss()
                flat[i] = old - h
                down = loss()
                flat[i] = old
            assert abs((up - down).item() / (2 * h) - grad[i].item()) <= 1e-6 * (1 + abs(grad[i].item()))


def test_untrained_model_is_the_gaussian_prior():
    """With gain 0, G = -|x c_in|^2 / 2: the denoiser of N(0, sigma_d^2 I) data."""
    net = ToyMLP(8).double().eval()
    x = torch.randn(10, 2, dtype=torch.float64)
    assert torch.allclose(net(x, 0.7), x * 0.25 / (0.25 + 0.49))


def test_mp_layers_keep_unit_variance():
    net = ToyMLP(256, depth=4)
    x = torch.randn(4096, 4)
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


def test_learning_rate_schedule_by_hand():
    """lr / sqrt(max(t / t_ref, 1)), iterations t counted from 1, no warm-up (arXiv 2406.02507, App. C)."""
    for t, expected in ((1, 0.01), (100, 0.01), (400, 0.01 / 2), (2500, 0.01 / 5)):
        assert learning_rate(t, 1, 0.01, 100) == pytest.approx(expected, rel=1e-12)   # as toy2d.train calls it


def test_training_is_deterministic_per_seed():
    a, _ = train(ToyConfig(width=8, iterations=5, batch=256, seed=3))
    b, _ = train(ToyConfig(width=8, iterations=5, batch=256, seed=3))
    c, _ = train(ToyConfig(width=8, iterations=5, batch=256, seed=4))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


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
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a mini_autoguide model"):
        load_toy(foreign)


def test_each_method_is_guided_by_its_own_model():
    """Autoguidance takes the guide, CFG the unconditional model (exact mixtures stand in for the networks)."""
    a, b, ab = toy2d.gmm("A"), toy2d.gmm("B"), toy2d.gmm("AB")
    nets = dict(main=a.denoise, guide=b.denoise, uncond=ab.denoise)
    x = torch.randn(64, 2, dtype=torch.float64)
    for method, guide in (("autoguidance", b), ("cfg", ab)):
        expected = guidance.make(method, a.denoise, guide.denoise, 2.0)(x, 0.3)
        assert torch.equal(denoiser(method, nets, 2.0)(x, 0.3), expected)
    assert torch.equal(denoiser("none", nets, 1.0)(x, 0.3), a.denoise(x, 0.3))
    assert torch.equal(denoiser("truncation", nets, 1.4)(x, 0.3), guidance.truncation(a.denoise, 1.4)(x, 0.3))


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


def test_metrics_use_the_third_nearest_neighbour():
    """The reference's k-NN radii for precision/recall: k = 3, a point not its own neighbour, against a
    float64 brute force (tests/knn_reference.py), to float32 rounding."""
    m = ToyMetrics("A", n_reference=300, n_threshold=1000)
    reference = m.reference.numpy()
    radii = knn_reference.knn_radii(reference, 3)
    assert np.abs(m.reference_radii.numpy() ** 2 - radii ** 2).max() <= knn_reference.float32_slack(reference)


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
