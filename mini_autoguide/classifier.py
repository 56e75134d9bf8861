"""A small Fashion-MNIST classifier: a fast domain feature space for 32x32 images.

Its penultimate activations (128-d) give a Frechet distance that takes
milliseconds per thousand images on a CPU (Inception takes minutes), and its
accuracy on generated images, against the class each was sampled for, is a
class-consistency score. Trained once by `python -m mini_autoguide eval
train-classifier`; the weights are a safetensors file whose header holds the
config and the test accuracy, with the same facts in a JSON file beside it.

Images: uint8 [N, C, H, W] (the dataset layout), scaled to [-1, 1] inside.
"""
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import read_model, save_model, write_json
from .progress import progress_bar

KIND = "classifier"
DEFAULTS = dict(channels=[16, 32, 64], features=128, epochs=3, batch=128, lr=3e-3, seed=0)


class Classifier(torch.nn.Module):
    """conv-conv-pool per level (3 levels), then a 128-d feature layer and the class logits."""

    def __init__(self, config):
        super().__init__()
        self.config = dict(config)
        c_in, layers = config["img_channels"], []
        for c in config["channels"]:
            layers += [torch.nn.Conv2d(c_in, c, 3, padding=1), torch.nn.ReLU(),
                       torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)]
            c_in = c
        self.conv = torch.nn.Sequential(*layers)
        side = config["resolution"] >> len(config["channels"])
        self.feature = torch.nn.Linear(c_in * side * side, config["features"])
        self.head = torch.nn.Linear(config["features"], config["num_classes"])

    def forward(self, x, return_features=False):
        """x float [N, C, H, W] in [-1, 1] -> logits [N, classes] (and features [N, 128])."""
        f = F.relu(self.feature(self.conv(x).flatten(1)))
        logits = self.head(f)
        return (logits, f) if return_features else logits


def _to_input(images):
    # Standard strides, whatever the array's: a [N, 1, H, W] view of [N, H, W, 1] data also passes as
    # channels-last, and oneDNN would then take another convolution path, with other float32 rounding.
    return torch.as_tensor(np.asarray(images)).to(torch.float32, memory_format=torch.contiguous_format) / 127.5 - 1


def train_classifier(train_set, test_set, out, log=print, progress=True, limit=None, **overrides):
    """Train on train_set, measure on test_set, save to `out` (.safetensors + .json). Returns the summary.

    Datasets: objects with .images uint8 [N, C, H, W], .labels [N], .num_classes
    (data.load_idx_folder). limit: use only the first `limit` training images.
    """
    opts = dict(DEFAULTS, **{k: v for k, v in overrides.items() if v is not None})
    images, labels = train_set.images, np.asarray(train_set.labels)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    config = dict(img_channels=int(images.shape[1]), resolution=int(images.shape[2]),
                  num_classes=int(train_set.num_classes), channels=list(opts["channels"]),
                  features=int(opts["features"]))
    if config["resolution"] % (1 << len(config["channels"])):
        raise ValueError(f"resolution {config['resolution']} is not divisible by 2^{len(config['channels'])}")
    torch.manual_seed(opts["seed"])
    net = Classifier(config)
    optimizer = torch.optim.Adam(net.parameters(), lr=opts["lr"])
    steps_per_epoch = math.ceil(len(images) / opts["batch"])
    total = opts["epochs"] * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, opts["lr"], total_steps=total)
    x_all, y_all = _to_input(images), torch.as_tensor(labels, dtype=torch.long)
    g = torch.Generator().manual_seed(opts["seed"])
    bar = progress_bar(total, "classifier", "step", enabled=progress)
    t0 = time.time()
    for _ in range(opts["epochs"]):
        order = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(order), opts["batch"]):
            idx = order[i:i + opts["batch"]]
            loss = F.cross_entropy(net(x_all[idx]), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    accuracy = float(np.mean(predict(net, test_set.images) == np.asarray(test_set.labels)))
    summary = dict(test_accuracy=accuracy, test_images=int(len(test_set.images)), train_images=int(len(images)),
                   train_seconds=round(time.time() - t0, 1), options=opts)
    # The timing goes to the JSON beside it only: the weights file stays the same byte for byte when
    # retrained, so its SHA-256 can key the measurements made with it.
    save_model(out, net, KIND, config, {k: v for k, v in summary.items() if k != "train_seconds"})
    write_json(_json_path(out), dict(config=config, **summary))
    log(f"classifier: test accuracy {accuracy:.4f} on {len(test_set.images):,} images "
        f"({len(images):,} training images, {summary['train_seconds']:.0f} s) -> {out}")
    return dict(summary, net=net)


def _json_path(out):
    return os.path.splitext(os.fspath(out))[0] + ".json"


def load_classifier(path):
    """(Classifier in eval mode, extra info incl. test_accuracy) from a file written by train_classifier."""
    state, config, extra = read_model(path, KIND)
    net = Classifier(config)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False), extra


@torch.no_grad()
def _run(net, images, batch=500):
    logits, feats = [], []
    for i in range(0, len(images), batch):
        lg, f = net(_to_input(images[i:i + batch]), return_features=True)
        logits.append(lg)
        feats.append(f)
    return torch.cat(logits), torch.cat(feats)


def predict(net, images):
    """Predicted classes [N] of uint8 images [N, C, H, W]."""
    return _run(net, images)[0].argmax(1).numpy()


class ClassifierFeatures:
    """The domain feature space: uint8 [N, C, H, W] -> float64 [N, 128] penultimate features."""

    name = "classifier"

    def __init__(self, path):
        self.path = os.fspath(path)
        self.net, self.info = load_classifier(path)

    def __call__(self, images, progress=False):
        return _run(self.net, images)[1].double().numpy()

    def accuracy(self, images, labels):
        """Fraction of images classified as their intended class."""
        return float(np.mean(predict(self.net, images) == np.asarray(labels)))


__all__ = ["Classifier", "ClassifierFeatures", "train_classifier", "load_classifier", "predict"]
