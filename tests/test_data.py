"""Datasets (IDX, class folders, prepared ZIP/folder), the ADM crop, and the data order."""
import gzip
import json
import os
import struct
import zipfile

import numpy as np
import pytest
from PIL import Image

from mini_autoguide import data, prep


def write_idx(path, array, compress):
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder_is_read_and_padded_to_32(tmp_path, compress):
    images = np.random.RandomState(0).randint(1, 256, (5, 28, 28)).astype(np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, compress)
    ds = data.open_dataset(tmp_path)
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (5, 1, 32, 6)
    img, label = ds[2]
    assert img.shape == (1, 32, 32) and label == 4
    assert np.array_equal(img[0, 2:30, 2:30], images[2])         # centred
    assert img[0, :2].max() == 0 and img[0, :, 30:].max() == 0   # black padding


def test_truncated_idx_is_a_clear_error(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8), False)
    with open(tmp_path / "train-images-idx3-ubyte", "r+b") as f:
        f.truncate(100)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), False)
    with pytest.raises(data.DataError, match="truncated"):
        data.open_dataset(tmp_path)


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def test_class_folders_give_sorted_labels(tmp_path):
    for k, cls in enumerate(["cat", "ant", "bee"]):
        for i in range(2):
            save(str(tmp_path / cls / f"{i}.png"), np.full((16, 16, 3), 40 * k + i, np.uint8))
    ds = data.open_dataset(tmp_path)
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (6, 3, 16, 3)
    # classes sorted by name: ant=0, bee=1, cat=2; cat's pixels were written with k=0
    assert [ds[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert ds[4][0][0, 0, 0] == 0 and ds[0][0][0, 0, 0] == 40


@pytest.mark.parametrize("problem,message", [("empty", "no images"), ("mixed", "all images must have one"),
                                             ("garbage", "not a readable image"), ("missing", "not found")])
def test_bad_datasets_are_clear_errors(tmp_path, problem, message):
    root = tmp_path / "set"
    if problem == "empty":
        os.makedirs(root / "a")
    elif problem == "mixed":
        save(str(root / "a" / "0.png"), np.zeros((16, 16), np.uint8))
        save(str(root / "a" / "1.png"), np.zeros((8, 8), np.uint8))
    elif problem == "garbage":
        os.makedirs(root / "a")
        (root / "a" / "0.png").write_bytes(b"not a png at all")
    with pytest.raises(data.DataError, match=message):
        data.open_dataset(root)


def test_adm_crop_box_downsamples_by_two_while_large():
    # A 512x512 checkerboard of 8x8 tiles: three box halvings (512 -> 64) average each tile into
    # exactly one pixel, so the 64x64 result is a 1-pixel checkerboard of 0 and 255. A direct
    # bicubic resize would instead blur it to grey.
    yy, xx = np.mgrid[:512, :512]
    board = (((yy // 8) + (xx // 8)) % 2 * 255).astype(np.uint8)
    out = prep.center_crop_dhariwal(Image.fromarray(board), 64)
    expect = ((np.arange(64)[:, None] + np.arange(64)[None, :]) % 2 * 255).astype(np.uint8)
    assert out.shape == (64, 64, 1)
    assert np.array_equal(out[:, :, 0], expect)


def test_adm_crop_takes_the_centre_of_the_short_side_resize():
    # 300x150 (w x h): red | green | blue bands at x < 75, 75..224, >= 225. Halved once to 150x75
    # (75 < 128 stops), bicubic to 128x64, centre crop x in [32, 96) = original x in [75, 225):
    # exactly the green band. Bicubic may bleed at most one pixel at each side.
    img = np.zeros((150, 300, 3), np.uint8)
    img[:, :75, 0] = img[:, 75:225, 1] = img[:, 225:, 2] = 255
    out = prep.center_crop_dhariwal(Image.fromarray(img), 64).astype(int)
    assert out.shape == (64, 64, 3)
    inner = out[:, 2:-2]
    assert (inner[..., 1] == 255).all() and inner[..., [0, 2]].max() == 0
    assert out[:, 0, 0].max() > 0 and out[:, -1, 2].max() > 0  # the neighbours bleed in at the edges


def make_tree(root, sizes=((120, 90), (64, 64), (200, 300))):
    for k, cls in enumerate(["n02", "n01"]):
        for i, (w, h) in enumerate(sizes):
            save(str(root / cls / f"im{i}.jpg" if i == 0 else root / cls / f"im{i}.png"),
                 np.full((h, w, 3), 30 * i + 100 * k, np.uint8))


@pytest.mark.parametrize("to_zip", [False, True])
def test_prep_writes_a_labelled_dataset_and_resumes(tmp_path, to_zip):
    make_tree(tmp_path / "src")
    out = str(tmp_path / ("out.zip" if to_zip else "out"))
    assert prep.prepare(str(tmp_path / "src"), out, 32, workers=1, progress=False) == 6
    ds = data.open_dataset(out)
    assert (len(ds), ds.resolution, ds.channels, ds.num_classes) == (6, 32, 3, 2)
    assert [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 1, 1]   # n01 -> 0, n02 -> 1
    assert ds[4][0][0, 16, 16] == 30                             # n02/im1: value 30 * 1 + 100 * 0
    if to_zip:
        assert "labels.json" in zipfile.ZipFile(out).namelist() and not os.path.exists(out[:-4] + ".partial")
    with pytest.raises(FileExistsError):
        prep.prepare(str(tmp_path / "src"), out, 32, workers=1, progress=False)
    if not to_zip:  # resume: an interrupted run left some images and no labels.json
        os.unlink(os.path.join(out, "labels.json"))
        os.unlink(os.path.join(out, "n02", "im2.png"))
        mtime = os.path.getmtime(os.path.join(out, "n01", "im0.png"))
        assert prep.prepare(str(tmp_path / "src"), out, 32, workers=1, progress=False) == 6
        assert os.path.getmtime(os.path.join(out, "n01", "im0.png")) == mtime   # not redone
        assert os.path.exists(os.path.join(out, "n02", "im2.png"))
        assert json.load(open(os.path.join(out, "labels.json")))["classes"] == ["n01", "n02"]


def test_prep_in_parallel_equals_serial(tmp_path):
    make_tree(tmp_path / "src")
    prep.prepare(str(tmp_path / "src"), str(tmp_path / "a"), 16, workers=1, progress=False)
    prep.prepare(str(tmp_path / "src"), str(tmp_path / "b"), 16, workers=2, progress=False)
    a, b = data.open_dataset(tmp_path / "a"), data.open_dataset(tmp_path / "b")
    assert all(np.array_equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(len(a)))


def test_data_order_is_fixed_by_step_and_split_across_ranks():
    n, batch = 10, 4
    stream = [i for step in range(5) for i in data.global_batch_indices(n, batch, step, seed=7)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))  # epochs
    assert stream[:10] != stream[10:20]                                                      # reshuffled
    ds = data.ArrayDataset(np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1), np.zeros(n), 1)
    whole = next(data.batches(ds, batch, 3, 7))[1].flatten().tolist()
    halves = [next(data.batches(ds, batch, 3, 7, rank=r, world=2))[1].flatten().tolist() for r in (0, 1)]
    assert whole == halves[0] + halves[1] == data.global_batch_indices(n, batch, 3, 7)


def test_file_dataset_streams_through_worker_processes(tmp_path):
    make_tree(tmp_path / "src")
    prep.prepare(str(tmp_path / "src"), str(tmp_path / "p.zip"), 16, workers=1, progress=False)
    ds = data.open_dataset(tmp_path / "p.zip")
    stream = data.batches(ds, 4, 0, seed=0, workers=2)
    step, images, labels = next(stream)
    idx = data.global_batch_indices(6, 4, 0, 0)
    assert step == 0 and images.shape == (4, 3, 16, 16)
    assert labels.tolist() == [ds[i][1] for i in idx]
    assert all(np.array_equal(images[j].numpy(), ds[i][0]) for j, i in enumerate(idx))
