"""The domain classifier: trains to a stated accuracy on a small subset; saves and reloads exactly."""
import json
import os

import numpy as np
import pytest
import torch

from mini_autoguide import classifier, data
from mini_autoguide.checkpoint import read_model

from image_helpers import assert_close_up_to_reordering

FMNIST = "/usr/share/datasets/fashion-mnist"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def fmnist():
    if not os.path.isdir(FMNIST):
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST} (apt-get install dataset-fashion-mnist)")
    return data.load_idx_folder(FMNIST, "train"), data.load_idx_folder(FMNIST, "test")


class Subset:
    def __init__(self, ds, n):
        self.images, self.labels, self.num_classes = ds.images[:n], ds.labels[:n], ds.num_classes


def test_classifier_reaches_stated_accuracy_on_a_subset(fmnist, tmp_path):
    train_set, test_set = fmnist
    out = str(tmp_path / "clf.safetensors")
    summary = classifier.train_classifier(train_set, Subset(test_set, 500), out, progress=False,
                                          log=lambda *a: None, limit=1000, epochs=4, batch=50, channels=[8, 16, 32])
    # Stated: >= 60% on 500 test images after 1,000 training images (measured 68%; chance is 10%).
    assert summary["test_accuracy"] >= 0.60
    info = json.load(open(str(tmp_path / "clf.json")))
    assert info["test_accuracy"] == summary["test_accuracy"] and info["train_images"] == 1000

    # Reloaded from safetensors: the same predictions, features and accuracy.
    space = classifier.ClassifierFeatures(out)
    images = test_set.images[:500]
    assert space.accuracy(images, test_set.labels[:500]) == pytest.approx(summary["test_accuracy"])
    feats = space(images[:20])
    assert feats.shape == (20, 128) and feats.dtype == np.float64
    assert_close_up_to_reordering(torch.as_tensor(feats), classifier._run(summary["net"], images[:20])[1].double())
    # Wrong labels score near chance: accuracy really compares against the labels.
    assert space.accuracy(images, (test_set.labels[:500] + 1) % 10) < 0.3

    # Retrained, the same weights and header (its timing lives in clf.json only): training is deterministic.
    again = str(tmp_path / "again.safetensors")
    classifier.train_classifier(train_set, Subset(test_set, 500), again, progress=False,
                                log=lambda *a: None, limit=1000, epochs=4, batch=50, channels=[8, 16, 32])
    (a, config_a, extra_a), (b, config_b, extra_b) = read_model(out), read_model(again)
    assert (config_a, extra_a) == (config_b, extra_b) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_classifier_file_is_refused(tmp_path):
    from mini_autoguide.checkpoint import CheckpointError
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a model")
    with pytest.raises(CheckpointError):
        classifier.ClassifierFeatures(str(bad))


def test_features_do_not_depend_on_the_arrays_memory_layout():
    # Sampled images are [N, H, W, 1] and reach the classifier as a transposed view whose strides
    # also pass as channels-last; loaded images are plain [N, 1, H, W]. The same pixels must give the
    # same features bit for bit, or a result would change with where its images came from.
    torch.manual_seed(0)
    net = classifier.Classifier(dict(img_channels=1, channels=[8, 16, 32], resolution=32, features=128,
                                     num_classes=10)).eval()
    pixels = np.random.default_rng(0).integers(0, 256, size=(16, 32, 32, 1), dtype=np.uint8)
    as_view = pixels.transpose(0, 3, 1, 2)        # strides (1024, 1, 32, 1)
    as_copy = np.array(as_view, order="C")         # strides (1024, 1024, 32, 1)
    with torch.no_grad():
        assert torch.equal(classifier._run(net, as_view)[1], classifier._run(net, as_copy)[1])
