"""The table script's sweeps (experiments/fmnist_table.py): the grids, identical noise across methods,
resuming from the points the result file holds, the choice of each row's best point, the plot."""
import json
import os

import numpy as np
import pytest
import torch

from mini_autoguide import data, evaluate, generate, metrics, train
from script_loader import load_experiment

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
table = load_experiment("fmnist_table")


class PixelSpace:
    """A real (if crude) feature space, the pixels in [0, 1], standing in for the classifier (the metric the
    sweeps use). Counts its calls; can fail on demand."""

    name = "classifier"

    def __init__(self, fail_on_call=None):
        self.calls, self.fail_on_call = 0, fail_on_call

    def __call__(self, images, progress=False):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # as if the user stopped the sweep here
        return np.asarray(images, dtype=np.float64).reshape(len(images), -1) / 255


def _toy_images(n=96, seed=0):
    """3 classes of 8x8 images: a bright square in a class-dependent corner, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.integers(0, 40, size=(n, 1, 8, 8))
    for i, c in enumerate(labels):
        images[i, 0, 4 * (c // 2):4 * (c // 2) + 4, 4 * (c % 2):4 * (c % 2) + 4] += 200
    return images.clip(0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    """(main, guide) snapshot paths of two tiny denoisers, trained for a few steps."""
    images, labels = _toy_images()
    ds = data.ArrayDataset(images, labels, 3, name="toy")
    root = tmp_path_factory.mktemp("models")
    for name, kimg in (("main", 0.08), ("guide", 0.024)):
        train.train(ds, str(root / name), "tiny", kimg=kimg, snapshot_kimg=kimg, precision="fp32",
                    progress=False, log=lambda *a: None)
    return str(root / "main" / "network-000000080-ema0.1.safetensors"), str(root / "guide" / "network-000000024-ema0.1.safetensors")


def test_the_grids_hold_each_row_at_each_of_its_weights():
    cfg = table.CONFIGS["full"]
    models = {role: f"m/{role}" for role in ("main", "main@T/8", "small@T/8", "small@T", "uncond", "uncond-small@T/8")}
    grid = table.w_grid(models, cfg)
    by = {name: [p for p in grid if p["name"] == name] for name in dict.fromkeys(p["name"] for p in grid)}
    assert list(by) == [row["name"] for row in table.ROWS]
    assert [p["weight"] for p in by["CFG + interval"]] == cfg["cfg_weights"] and by["CFG + interval"][0]["interval"] == [0.28, 1.61]
    assert [p["weight"] for p in by["autoguidance"]] == cfg["ag_weights"] and by["autoguidance"][0]["guide"] == "m/small@T/8"
    assert [(p["weight"], p["guide"]) for p in by["unconditional"]] == [(1.0, None)]
    assert len(grid) == 2 + 2 * len(cfg["cfg_weights"]) + 4 * len(cfg["ag_weights"])
    # choosing: each row's lowest FD; the points at the EMA lengths fixed before training
    points = [dict(name="a", classifier_fd=3.0), dict(name="b", classifier_fd=1.0), dict(name="a", classifier_fd=2.0),
              dict(name="a", classifier_fd=2.0)]
    best = table.best(points)
    assert list(best) == ["a", "b"] and best["a"] is points[2] and best["b"] is points[1]
    assert [table.is_tracked(dict(name=n, ema_main=m, ema_guide=g)) for n, m, g in
            (("CFG", 0.1, 0.1), ("autoguidance", 0.1, 0.05), ("autoguidance", 0.1, 0.1), ("no guidance", 0.05, None))] \
        == [True, True, False, False]


def test_sweep_resumes_from_its_file_and_measures_on_the_same_noise(tmp_path, snapshots):
    main, guide = snapshots
    images, _ = _toy_images(60, seed=1)
    refs = {"classifier": evaluate.Reference.compute(PixelSpace(), images, {})}
    seeds, sampler = list(range(12)), dict(steps=4, sigma_max=20.0, batch=5)
    grid = [table.point("none", "none", main, None, 1.0)] + [table.point("autoguidance", "autoguidance", main, guide, w)
                                                            for w in (1.0, 2.0, 3.0)]
    path = str(tmp_path / "sweep.json")
    out = os.path.dirname(os.path.dirname(main))  # the work folder: the result file names models relative to it
    run = lambda grid, space: table.sweep(path, grid, seeds, space, refs, sampler, out, {"w": [1, 2, 3]})  # noqa: E731

    # Interrupted while measuring the third point: two points in the file, nothing half-written.
    with pytest.raises(KeyboardInterrupt):
        run(grid, PixelSpace(fail_on_call=3))
    saved = json.loads(open(path).read())
    assert [(p["name"], p["weight"]) for p in saved["points"]] == [("none", 1.0), ("autoguidance", 1.0)]
    assert saved["seeds"] == "0-11" and saved["chosen"]["autoguidance"]["guide"] == "guide/network-000000024-ema0.1.safetensors"

    # Resumed: only the two missing points run; the saved ones are kept as they were.
    space = PixelSpace()
    points = run(grid, space)
    assert space.calls == 2 and [p["weight"] for p in points] == [1.0, 1.0, 2.0, 3.0]
    assert [table._summary(p) for p in points[:2]] == saved["points"]
    # Autoguidance at w = 1 is the main model alone on the same seeds: the unguided point's numbers exactly.
    assert points[1]["classifier_fd"] == pytest.approx(points[0]["classifier_fd"], rel=1e-9)
    assert points[3]["classifier_fd"] != pytest.approx(points[0]["classifier_fd"], rel=1e-6)
    # The stored FD is that of the point's own samples, recomputed here from scratch.
    images, _, _ = generate.generate(*generate.load_models(main), seeds=seeds, **sampler)
    fake, real = PixelSpace()(evaluate.to_nchw(images)), PixelSpace()(_toy_images(60, seed=1)[0])
    assert points[0]["classifier_fd"] == pytest.approx(
        metrics.frechet_distance(*metrics.gaussian_stats(real), *metrics.gaussian_stats(fake)), rel=1e-9)

    # Finished: a rerun measures nothing and writes nothing; a new weight runs alone.
    before = open(path).read()
    space = PixelSpace()
    again = run(grid, space)
    assert [table._summary(p) for p in again] == [table._summary(p) for p in points]
    assert space.calls == 0 and open(path).read() == before
    run(grid + [table.point("autoguidance", "autoguidance", main, guide, 4.0)], space)
    assert space.calls == 1
    saved = json.loads(open(path).read())
    ag = [p for p in saved["points"] if p["name"] == "autoguidance"]
    assert len(ag) == 4 and saved["chosen"]["autoguidance"]["classifier_fd"] == min(p["classifier_fd"] for p in ag)


def test_sweep_plot_draws_each_row_against_w(tmp_path):
    import matplotlib.pyplot as plt
    fd = {"cfg": {1.0: 1.0, 2.0: 0.0, 3.0: 1.0}, "autoguidance": {1.0: 5.0, 2.0: 2.0, 3.0: 1.5}}
    pts = [dict(name=n, weight=w, classifier_fd=v, classifier_accuracy=v / 10)   # out of order: the plot sorts by w
           for n in fd for w, v in reversed(fd[n].items())]
    fig = table.plot_sweep(pts, str(tmp_path / "s.png"), "t")
    ax, accuracy = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_marker() == "o"}
    assert list(lines) == ["cfg", "autoguidance"]
    for name, values in fd.items():
        assert list(lines[name].get_xdata()) == [1.0, 2.0, 3.0]
        assert list(lines[name].get_ydata()) == [values[w] for w in (1.0, 2.0, 3.0)]
    stars = [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.get_lines() if line.get_marker() == "*"]
    assert stars == [(2.0, 0.0), (3.0, 1.5)]   # each row's lowest FD
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cfg", "autoguidance"]
    assert list(accuracy.get_lines()[0].get_ydata()) == [0.1, 0.0, 0.1] and fig.get_suptitle() == "t"
    png = plt.imread(tmp_path / "s.png")   # figsize 9.2 x 3.6 inches at 120 dpi, not blank
    assert png.shape == (432, 1104, 4) and png[..., :3].std() > 0.05
