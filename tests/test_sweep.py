"""The sweep runner: points, identical noise across methods, resume after an interruption."""
import glob
import json
import os
import time

import numpy as np
import pytest
import torch

from mini_autoguide import data, evaluate, sweep, train


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class PixelSpace:
    """A real (if crude) feature space: the pixels in [0, 1]. Counts its calls; can fail on demand."""

    name = "pixels"

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
    paths = []
    for name, kimg in (("main", 0.08), ("guide", 0.024)):
        train.train(ds, str(root / name), "tiny", kimg=kimg, snapshot_kimg=kimg, precision="fp32",
                    progress=False, log=lambda *a: None)
        paths.append(sorted(glob.glob(str(root / name / "network-*-ema0.1.safetensors")))[-1])
    return paths


def _runs(main, guide, weights):
    return [dict(name="none", method="none", main=main, weights=[1.0]),
            dict(name="autoguidance", method="autoguidance", main=main, guide=guide, weights=weights)]


def test_expand_makes_the_grid():
    pts = sweep.expand([dict(name="a", method="autoguidance", main=["m1", "m2"], guide="g", weights=[1, 2, 3]),
                        dict(name="b", method="cfg", main="m", guide=None, interval=(0.3, 2), weights=[2])])
    assert len(pts) == 7
    assert pts[-1] == dict(name="b", method="cfg", main="m", guide=None, interval=[0.3, 2], weight=2.0)
    with pytest.raises(ValueError, match="weights"):
        sweep.expand([dict(name="x", method="none", main="m")])


def test_sweep_resumes_after_interruption(tmp_path, snapshots):
    main, guide = snapshots
    images, _ = _toy_images(60, seed=1)
    ref = evaluate.Reference.compute(PixelSpace(), images, dict(space="pixels"))
    seeds = list(range(12))
    sampler = dict(steps=4, sigma_max=20.0, batch=5)
    out = str(tmp_path / "sweep")
    kw = dict(refs={"pixels": ref}, sampler=sampler, progress=False, log=lambda *a: None, precision_recall=True)

    # Interrupted while measuring the third point: two points saved, nothing half-written.
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(_runs(main, guide, [1.0, 2.0, 3.0]), out, seeds, spaces=[PixelSpace(fail_on_call=3)], **kw)
    saved = sweep.load_points(out)
    assert [p["name"] for p in saved] == ["none", "autoguidance"]

    # Resumed: only the two missing points run; the saved ones are kept as they were.
    space = PixelSpace()
    points = sweep.run_sweep(_runs(main, guide, [1.0, 2.0, 3.0]), out, seeds, spaces=[space], **kw)
    assert space.calls == 2 and len(points) == 4
    assert points[:2] == saved
    assert len(open(os.path.join(out, "points.csv")).read().strip().splitlines()) == 5  # header + 4 rows

    # Every point records its seeds and sampler; autoguidance at w = 1 is the main model alone,
    # sampled on the same seeds, so its numbers equal the unguided point's exactly.
    by = {(p["name"], p["weight"]): p for p in points}
    assert all(p["seeds"] == "0-11" and p["sampler"] == sampler and p["n"] == 12 for p in points)
    assert by[("autoguidance", 1.0)]["pixels_fd"] == pytest.approx(by[("none", 1.0)]["pixels_fd"], rel=1e-9)
    assert by[("autoguidance", 3.0)]["pixels_fd"] != pytest.approx(by[("none", 1.0)]["pixels_fd"], rel=1e-6)
    # The stored metrics are those of the point's own samples: recomputed here from scratch.
    from mini_autoguide import generate, metrics
    images, _, _ = generate.generate(*generate.load_models(main), seeds=seeds, **sampler)
    fake = PixelSpace()(evaluate.to_nchw(images))
    real = PixelSpace()(_toy_images(60, seed=1)[0])
    p, r = metrics.precision_recall(torch.as_tensor(real, dtype=torch.float32),
                                    torch.as_tensor(fake, dtype=torch.float32))
    assert (by[("none", 1.0)]["pixels_precision"], by[("none", 1.0)]["pixels_recall"]) == (p, r)
    fd = metrics.frechet_distance(*metrics.gaussian_stats(real), *metrics.gaussian_stats(fake))
    assert by[("none", 1.0)]["pixels_fd"] == pytest.approx(fd, rel=1e-9)

    # Finished: a rerun measures nothing; a new weight runs alone; other seeds are new points.
    space = PixelSpace()
    assert sweep.run_sweep(_runs(main, guide, [1.0, 2.0, 3.0]), out, seeds, spaces=[space], **kw) == points
    assert space.calls == 0
    sweep.run_sweep(_runs(main, guide, [1.0, 2.0, 3.0, 4.0]), out, seeds, spaces=[space], **kw)
    assert space.calls == 1
    best = sweep.best(sweep.load_points(out), "pixels_fd")
    assert set(best) == {"none", "autoguidance"}
    ag = [p for p in sweep.load_points(out) if p["name"] == "autoguidance"]
    assert best["autoguidance"]["pixels_fd"] == min(p["pixels_fd"] for p in ag)
    json.dumps(sweep.load_points(out))  # all plain JSON


def test_file_digest_ignores_metadata_order_not_content(tmp_path):
    """safetensors writes its metadata keys in a varying order: the digest sorts the header,
    and still sees every tensor byte and every metadata value."""
    import struct
    from mini_autoguide.checkpoint import save_tensors
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    save_tensors(a, state, "denoiser", {"c": 1}, {"e": 2})
    with open(a, "rb") as f:  # the same file with its header's keys in reverse order
        size = struct.unpack("<Q", f.read(8))[0]
        header, data = json.loads(f.read(size)), f.read()
    text = json.dumps(dict(reversed(list(header.items())))).encode().ljust(size)
    with open(b, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    assert open(a, "rb").read() != open(b, "rb").read() and evaluate.file_digest(a) == evaluate.file_digest(b)
    save_tensors(b, {"w": state["w"] + 1}, "denoiser", {"c": 1}, {"e": 2})
    assert evaluate.file_digest(a) != evaluate.file_digest(b)
    save_tensors(b, state, "denoiser", {"c": 2}, {"e": 2})
    assert evaluate.file_digest(a) != evaluate.file_digest(b)


def test_sweep_reuses_points_only_for_the_same_model_bytes(tmp_path, snapshots):
    """A point's key holds the SHA-256 of its model files: a points.json kept from another session is
    reused where the model was rebuilt bit for bit, and measured again where it was not."""
    import shutil
    main = str(tmp_path / "main.safetensors")
    shutil.copy(snapshots[0], main)
    images, _ = _toy_images(60, seed=1)
    kw = dict(refs={"pixels": evaluate.Reference.compute(PixelSpace(), images, dict(space="pixels"))},
              sampler=dict(steps=3, sigma_max=20.0, batch=6), progress=False, log=lambda *a: None)
    runs = [dict(name="none", method="none", main=main, weights=[1.0])]
    out, seeds = str(tmp_path / "sweep"), list(range(6))
    first = sweep.run_sweep(runs, out, seeds, spaces=[PixelSpace()], **kw)
    assert first[0]["main_sha256"] == evaluate.file_digest(snapshots[0]) and first[0]["guide_sha256"] is None
    shutil.copy(snapshots[1], main)  # "retrained": other bytes at the same path
    space = PixelSpace()
    points = sweep.run_sweep(runs, out, seeds, spaces=[space], **kw)
    # Only the new measurement comes back (a choice among them never picks the other bytes' point);
    # the record keeps both.
    assert space.calls == 1 and len(points) == 1 and points[0]["pixels_fd"] != first[0]["pixels_fd"]
    assert points[0]["main_sha256"] == evaluate.file_digest(snapshots[1]) and len(sweep.load_points(out)) == 2
    shutil.copy(snapshots[0], main)  # rebuilt bit for bit: the first measurement stands
    space = PixelSpace()
    assert sweep.run_sweep(runs, out, seeds, spaces=[space], **kw) == first and space.calls == 0
    # Without the models, the record alone cannot say which of two measured versions is meant.
    with pytest.raises(ValueError, match="two versions"):
        sweep.recorded(runs, out, seeds, [PixelSpace()], kw["sampler"])


def test_recorded_points_need_no_models_but_check_them_before_use(tmp_path, snapshots):
    """sweep.recorded matches points on their definition alone (the models may be elsewhere);
    check_models then refuses a point whose model is missing or holds other bytes."""
    import shutil
    main, guide = str(tmp_path / "main.safetensors"), str(tmp_path / "guide.safetensors")
    shutil.copy(snapshots[0], main)
    shutil.copy(snapshots[1], guide)
    images, _ = _toy_images(60, seed=1)
    sampler, seeds, out = dict(steps=3, sigma_max=20.0, batch=6), list(range(6)), str(tmp_path / "sweep")
    runs = _runs(main, guide, [1.5])
    done = sweep.run_sweep(runs, out, seeds, [PixelSpace()], {"pixels": evaluate.Reference.compute(
        PixelSpace(), images, dict(space="pixels"))}, sampler, progress=False, log=lambda *a: None)
    os.remove(guide)  # elsewhere now: the record still answers
    assert sweep.recorded(runs, out, seeds, [PixelSpace()], sampler) == done
    with pytest.raises(ValueError, match="holds 2 of the sweep's 3 points"):
        sweep.recorded(_runs(main, guide, [1.5, 2.0]), out, seeds, [PixelSpace()], sampler)
    with pytest.raises(ValueError, match="holds 0 of"):  # measured with other sampler settings
        sweep.recorded(runs, out, seeds, [PixelSpace()], dict(sampler, steps=4))
    sweep.check_models(done[0])
    with pytest.raises(ValueError, match="guide.safetensors: missing"):
        sweep.check_models(done[1])
    shutil.copy(snapshots[0], guide)
    with pytest.raises(ValueError, match="guide.safetensors: not the model"):
        sweep.check_models(done[1])


def test_kept_models_travel_with_the_record(tmp_path, snapshots):
    """keep copies models beside the record, rewriting nothing that holds the same bytes (and the notes
    only where a model changed); restore brings back only missing files, never over other bytes."""
    import shutil
    out, record = tmp_path / "out", tmp_path / "record"
    main, note = out / "models" / "main" / "net.safetensors", out / "models" / "main" / "done.json"
    os.makedirs(main.parent)
    shutil.copy(snapshots[0], main)
    note.write_text('{"seconds": 1}')
    kept_main, kept_note = record / "kept" / "models" / "main" / "net.safetensors", record / "kept" / "models" / "main" / "done.json"
    sweep.keep([str(main)], [str(note)], str(out), str(record))
    assert kept_main.read_bytes() == main.read_bytes() and kept_note.read_text() == '{"seconds": 1}'
    stamp = os.stat(kept_main).st_mtime_ns
    note.write_text('{"seconds": 2}')  # retrained to the same bytes, in another time: nothing changes
    sweep.keep([str(main)], [str(note)], str(out), str(record))
    assert os.stat(kept_main).st_mtime_ns == stamp and kept_note.read_text() == '{"seconds": 1}'
    shutil.copy(snapshots[1], main)  # other bytes (another machine's training): both are replaced
    sweep.keep([str(main)], [str(note)], str(out), str(record))
    assert kept_main.read_bytes() == main.read_bytes() and kept_note.read_text() == '{"seconds": 2}'
    os.remove(main)
    sweep.restore([str(main), str(out / "absent.safetensors")], str(out), str(record))
    assert main.read_bytes() == kept_main.read_bytes() and not (out / "absent.safetensors").exists()
    shutil.copy(snapshots[0], main)  # other bytes in OUT are left for check_models to refuse
    sweep.restore([str(main)], str(out), str(record))
    assert main.read_bytes() == open(snapshots[0], "rb").read()


def test_sweep_plot_draws_each_run_against_w(tmp_path):
    import matplotlib.pyplot as plt
    from mini_autoguide import plots
    fd = {"cfg": {1.0: 1.0, 2.0: 0.0, 3.0: 1.0}, "autoguidance": {1.0: 5.0, 2.0: 2.0, 3.0: 1.5}}
    pts = [dict(name=n, main="m", guide=None, weight=w, classifier_fd=v)   # out of order: the plot sorts by w
           for n in fd for w, v in reversed(fd[n].items())]
    fig = plots.plot_sweep(pts, [("classifier_fd", "FD")], str(tmp_path / "s.png"), title="t")
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_marker() == "o"}
    assert list(lines) == ["cfg", "autoguidance"]
    for name, values in fd.items():
        assert list(lines[name].get_xdata()) == [1.0, 2.0, 3.0]
        assert list(lines[name].get_ydata()) == [values[w] for w in (1.0, 2.0, 3.0)]
    stars = [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.get_lines() if line.get_marker() == "*"]
    assert stars == [(2.0, 0.0), (3.0, 1.5)]   # each run's lowest FD
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cfg", "autoguidance"]
    assert ax.get_ylabel() == "FD" and fig.get_suptitle() == "t"
    png = plt.imread(tmp_path / "s.png")   # figsize 4.6 x 3.6 inches at 120 dpi, not blank
    assert png.shape == (432, 552, 4) and png[..., :3].std() > 0.05


def test_reference_statistics_resume_after_interruption(tmp_path):
    images, _ = _toy_images(23, seed=2)
    weights = tmp_path / "pixels.bin"
    weights.write_bytes(b"weights")

    class Blocks(PixelSpace):
        path = str(weights)

    kw = dict(cache_dir=str(tmp_path / "ref"), dataset_name="toy", split="test", log=lambda *a: None)
    space = Blocks(fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):  # stopped in the third block of 5 images
        evaluate._features_resumable(space, images, str(tmp_path / "ref" / "p"), False, kw["log"], block=5)
    assert np.load(tmp_path / "ref" / "p.npy").shape[0] == 10  # two blocks kept
    resumed, _ = evaluate._features_resumable(Blocks(), images, str(tmp_path / "ref" / "p"), False, kw["log"], block=5)
    assert np.array_equal(resumed, Blocks()(images))
    # Through reference(): the cache is written, it records its compute time, no partial file is left.
    class SlowBlocks(Blocks):   # a known minimum compute time
        def __call__(self, images, progress=False):
            time.sleep(0.4)
            return super().__call__(images, progress)

    ref = evaluate.reference(SlowBlocks(), images, **{**kw, "cache_dir": str(tmp_path / "cache")})
    assert ref.info["n"] == 23 and ref.info["seconds"] >= 0.4   # at least the sleep
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].startswith("ref-pixels-test-") and files[0].endswith(".safetensors")
