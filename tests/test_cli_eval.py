"""The eval commands on a tiny IDX dataset: what each writes and prints equals a direct call of
the library on the same inputs."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from mini_autoguide import cli, data, metrics
from mini_autoguide.classifier import ClassifierFeatures, train_classifier
from mini_autoguide.checkpoint import read_model
from mini_autoguide.evaluate import Reference, evaluate

from test_data import write_idx

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TRAIN, TEST = 64, 48


def run(capsys, *argv):
    """In-process CLI run that must succeed: (stdout, stderr)."""
    assert cli.main([str(a) for a in argv]) == 0
    return capsys.readouterr()


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    """A Fashion-MNIST-like IDX folder: 28x28 images of 3 classes (a bright band at a class's height),
    which the classifier learns in a few steps."""
    folder = tmp_path_factory.mktemp("idx")
    rng = np.random.RandomState(0)
    for prefix, n in (("train", TRAIN), ("t10k", TEST)):
        labels = np.arange(n) % 3
        images = rng.randint(0, 30, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 9 * k:9 * k + 10] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, False)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), False)
    return folder


@pytest.fixture(scope="module")
def classifier(idx, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    assert cli.main(["eval", "train-classifier", str(idx), "--out", str(out), "--epochs", "8", "--limit", "32",
                     "--seed", "1", "--quiet"]) == 0
    return out


def test_train_classifier_writes_the_weights_and_their_summary(idx, classifier, tmp_path):
    info = json.loads(classifier.with_suffix(".json").read_text())
    assert info["train_images"] == 32 and info["test_images"] == TEST       # --limit; the whole test split
    assert info["options"]["epochs"] == 8 and info["options"]["seed"] == 1
    assert (info["config"]["img_channels"], info["config"]["resolution"], info["config"]["num_classes"]) == (1, 32, 3)
    # the stated accuracy is the saved weights' accuracy on the test split
    test = data.load_idx_folder(idx, "test")
    assert info["test_accuracy"] == ClassifierFeatures(classifier).accuracy(test.images, test.labels)
    # the same weights as the library function given the same options
    direct = tmp_path / "direct.safetensors"
    train_classifier(data.load_idx_folder(idx, "train"), test, direct, log=lambda *a: None, progress=False,
                     limit=32, epochs=8, seed=1)
    (a, config_a, _), (b, config_b, _) = read_model(direct), read_model(classifier)
    assert config_a == config_b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ref_prints_and_caches_the_reference_statistics(idx, classifier, tmp_path, capsys):
    cache, weights = tmp_path / "cache", tmp_path / "clf.safetensors"
    shutil.copy(classifier, weights)
    out, err = run(capsys, "eval", "ref", idx, "--classifier", weights, "--cache", cache, "--quiet")
    info = json.loads(out)   # one line: one space
    assert (info["space"], info["split"], info["images"], info["n"], info["k"]) == ("classifier", "test", TEST, TEST, 3)
    assert info["weights"] == str(weights) and info["weights_bytes"] == weights.stat().st_size
    assert info["dataset"] == os.path.abspath(idx)
    assert os.listdir(cache) == ["ref-classifier-test.safetensors"] and "computing" in err
    # the cached statistics are those of the test images' features
    mu, cov = metrics.gaussian_stats(ClassifierFeatures(weights)(data.load_idx_folder(idx, "test").images))
    ref = Reference.load(cache / "ref-classifier-test.safetensors")
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-6)
    np.testing.assert_allclose(ref.cov, cov, rtol=1e-6, atol=1e-9 * np.abs(cov).max())
    # a second run reads the cache back: the same line, nothing recomputed or rewritten
    mtime = (cache / "ref-classifier-test.safetensors").stat().st_mtime_ns
    again, err = run(capsys, "eval", "ref", idx, "--classifier", weights, "--cache", cache, "--quiet")
    assert again == out and "computing" not in err
    assert (cache / "ref-classifier-test.safetensors").stat().st_mtime_ns == mtime
    # the weights file written again (a retrained classifier): the cache is made from other inputs
    os.utime(weights, ns=(mtime, mtime + 10**9))
    again, err = run(capsys, "eval", "ref", idx, "--classifier", weights, "--cache", cache, "--quiet")
    assert "made from other inputs (weights_mtime_ns" in err and "computing" in err
    assert json.loads(again)["weights_mtime_ns"] == mtime + 10**9
    # the other split is another reference
    train, _ = run(capsys, "eval", "ref", idx, "--classifier", weights, "--cache", cache, "--split", "train",
                   "--quiet")
    assert json.loads(train)["images"] == TRAIN and len(os.listdir(cache)) == 2


@pytest.mark.filterwarnings("ignore:Matrix is singular")   # fewer images than feature dimensions
def test_samples_prints_and_writes_the_metrics_of_each_file(idx, classifier, tmp_path, capsys):
    test, train = data.load_idx_folder(idx, "test"), data.load_idx_folder(idx, "train")
    real = tmp_path / "real.npz"     # the reference images themselves, with their labels
    np.savez(real, images=test.images.transpose(0, 2, 3, 1), seeds=np.arange(TEST), labels=test.labels)
    other = tmp_path / "other.npz"   # other images, no labels
    np.savez(other, images=train.images[:24].transpose(0, 2, 3, 1), seeds=np.arange(100, 124))
    js = tmp_path / "metrics.json"
    out, _ = run(capsys, "eval", "samples", real, other, "--data", idx, "--classifier", classifier,
                 "--cache", tmp_path / "cache", "--json", js, "--quiet")
    lines = [json.loads(line) for line in out.splitlines()]
    written = json.loads(js.read_text())
    assert [r["file"] for r in lines] == [str(real), str(other)] and [r["seeds"] for r in lines] == ["0-47", "100-123"]

    space = ClassifierFeatures(classifier)
    ref = Reference.from_features(space(test.images), {})
    for line, result, (images, labels) in zip(lines, written, ((test.images, test.labels), (train.images[:24], None))):
        direct = evaluate(images, [space], {"classifier": ref}, labels)
        assert {k: line[k] for k in direct} == pytest.approx(direct, rel=1e-6, abs=1e-9)
        assert {k: v for k, v in result.items() if k != "reference"} == line
        assert result["reference"]["classifier"]["images"] == TEST
    # the real images against themselves: every image inside the other set's k-NN balls
    assert lines[0]["classifier_precision"] == lines[0]["classifier_recall"] == 1.0
    assert lines[0]["classifier_accuracy"] == space.accuracy(test.images, test.labels)
    assert "classifier_accuracy" not in lines[1]   # no labels, no accuracy
