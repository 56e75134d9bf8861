"""The command line as a whole: a bad command line is one line on stderr and exit code 2, like
every other error; every parser's --help is complete."""
import argparse
import os
import shutil
import subprocess
import sys

import pytest

from mini_autoguide import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parsers(parser, path=()):
    """(argv prefix, parser) for the top parser and every subcommand, recursively."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


PARSERS = list(_parsers(cli.build_parser()))


@pytest.mark.parametrize("argv,message", [
    ([], "the following arguments are required: COMMAND"),
    (["magic"], "invalid choice: 'magic'"),
    (["train", "data", "--out", "o", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["train", "data"], "the following arguments are required: --out"),
    (["sample", "m.safetensors", "--out", "o", "--steps", "many"], "argument --steps: invalid int value"),
    (["toy", "sample", "m", "--out", "o", "--bogus"], "unrecognized arguments: --bogus"),
    (["eval", "samples"], "the following arguments are required"),
])
def test_bad_command_line_is_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.startswith("error: python -m mini_autoguide") and err.count("\n") == 1, err
    assert message in err and "usage:" not in err


def test_a_real_process_prints_one_line_and_no_usage_block():
    r = subprocess.run([sys.executable, "-m", "mini_autoguide", "train", "--preset", "huge"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")


@pytest.mark.parametrize("path,parser", PARSERS, ids=[" ".join(p) or "top" for p, _ in PARSERS])
def test_help_is_complete(path, parser, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*path, "--help"])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and err == "" and out.startswith("usage: ")
    assert "%%" not in out, path   # argparse %-formats option help, not descriptions: no doubled % there
    for action in parser._actions:   # every option and every subcommand is listed
        for flag in action.option_strings:
            assert flag in out, (path, flag)
        if isinstance(action, argparse._SubParsersAction):
            assert all(name in out for name in action.choices), path


# --- Bad input: one line, exit 2, nothing written --------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of the inputs the table below names as {d}/...: good and bad sample files, datasets
    and outputs that already exist (which only --force may replace)."""
    import numpy as np
    from PIL import Image
    from mini_autoguide.checkpoint import save_model
    from mini_autoguide.classifier import KIND, Classifier

    d = tmp_path_factory.mktemp("inputs")
    images = np.zeros((4, 32, 32, 1), np.uint8)
    np.savez(d / "samples.npz", images=images, seeds=np.arange(4), labels=np.arange(4) % 2)
    np.savez(d / "small.npz", images=images[:, :8, :8], seeds=np.arange(4))
    np.savez(d / "float.npz", images=images.astype(np.float32), seeds=np.arange(4))
    np.savez(d / "miscount.npz", images=images, seeds=np.arange(4), labels=np.arange(3))
    np.savez(d / "nan.npz", x=np.full((8, 2), np.nan, np.float32))
    (d / "text.npz").write_text("hello")
    config = dict(img_channels=1, resolution=32, num_classes=2, channels=[4, 4, 4], features=8)
    save_model(d / "clf.safetensors", Classifier(config), KIND, config)
    (d / "junk.safetensors").write_bytes(b"junk")
    for name in ("exists.json", "exists.safetensors", "exists.png", "exists.zip", "file.txt", "sampled/grid.png",
                 "done/labels.json"):
        os.makedirs(os.path.dirname(d / name), exist_ok=True)
        (d / name).write_text(f"the old {name}")
    for name in ("small/c/0.png", "small/c/1.png", "tree/c/0.png", "flat/0.png"):
        os.makedirs(os.path.dirname(d / name), exist_ok=True)
        Image.new("L", (8, 8), 128).save(d / name)
    os.makedirs(d / "empty" / "c")
    os.makedirs(d / "broken" / "c")
    (d / "broken" / "c" / "0.png").write_bytes(b"not a png")
    return d


def _tree(folder):
    """{relative path: its bytes, or None for a folder} of everything below folder."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


SAMPLES = "eval samples {d}/%s --data {d}/small --classifier {d}/clf.safetensors"


@pytest.mark.parametrize("argv,message", [
    # eval
    ("eval train-classifier {d}/nowhere --out {d}/exists.safetensors", "exists: pass --force"),
    ("eval train-classifier {d}/nowhere --out {d}/new.safetensors --epochs 0", "must be positive"),
    ("eval train-classifier {d}/nowhere --out {d}/new.safetensors --limit 0", "must be positive"),
    ("eval train-classifier {d}/nowhere --out {d}/new.safetensors", "no train-images-idx3-ubyte"),
    ("eval ref {d}/small", "choose at least one feature space"),
    ("eval ref {d}/small --classifier {d}/junk.safetensors", "not a readable safetensors file"),
    ("eval ref {d}/small --fid --inception {d}/nowhere.pt", "Inception weights not found"),
    ("eval ref {d}/small --classifier {d}/clf.safetensors", "are 1x8x8 (channels x height x width), but the "
                                                           "classifier takes 1x32x32"),
    ("eval samples {d}/samples.npz --data {d}/small", "choose at least one feature space"),
    (SAMPLES % "samples.npz --json {d}/exists.json", "exists: pass --force"),
    (SAMPLES % "missing.npz", "samples not found"),
    (SAMPLES % "text.npz", "is not a samples.npz with images and seeds"),
    (SAMPLES % "float.npz", "images must be uint8 [N, H, W, C], got float32"),
    (SAMPLES % "miscount.npz", "4 images but 3 labels"),
    (SAMPLES % "small.npz", "small.npz are 1x8x8"),
    # image
    ("train {d}/nowhere --out {d}/run --kimg 0", "--kimg must be positive, got 0.0"),
    ("train {d}/nowhere --out {d}/run --lr nan", "--lr must be positive, got nan"),
    ("train {d}/nowhere --out {d}/run --checkpoint-kimg -1", "--checkpoint-kimg must be positive"),
    ("train {d}/nowhere --out {d}/run --label-dropout 1", "--label-dropout must be in [0, 1)"),
    ("sample {d}/nowhere.safetensors --out {d}/new --steps 0", "--steps must be at least 1, got 0"),
    ("sample {d}/nowhere.safetensors --out {d}/new --batch 0", "--batch must be at least 1, got 0"),
    ("sample {d}/nowhere.safetensors --out {d}/sampled", "exists: pass --force"),
    ("prep {d}/tree {d}/new --resolution 0", "--resolution must be at least 1"),
    ("prep {d}/tree {d}/new --workers 0", "--workers must be at least 1"),
    ("prep {d}/nowhere {d}/new", "source folder not found"),
    ("prep {d}/flat {d}/new", "has no class subfolders"),
    ("prep {d}/empty {d}/new", "holds no images"),
    ("prep {d}/broken {d}/new --workers 1 --quiet", "0.png is not a readable image"),
    ("prep {d}/tree {d}/exists.zip", "exists: pass --force"),
    ("prep {d}/tree {d}/done", "is a finished dataset: pass --force"),
    ("grid {d}/tree/c/0.png {d}/flat/0.png --titles a --out {d}/new.png", "2 images but 1 titles"),
    ("grid {d}/tree/c/0.png --columns 0 --out {d}/new.png", "--columns must be at least 1"),
    ("grid {d}/tree/c/0.png --scale 0 --out {d}/new.png", "--scale must be at least 1"),
    ("grid {d}/tree/c/0.png --out {d}/exists.png", "exists: pass --force"),
    # ema
    ("ema {d}/nowhere --sigma-rel 0.07 --out {d}", "is a folder: give a file name"),
    # toy
    ("toy reproduce --out {d}/file.txt", "is a file"),
    ("toy sample {d}/nowhere.safetensors --out {d}/new.npz -n 0", "--num and --steps must be positive"),
    ("toy sample {d}/nowhere.safetensors --out {d}/new.npz --steps 0", "--num and --steps must be positive"),
    ("toy evaluate {d}/nan.npz", "non-finite values"),
    ("toy plot {d}", "metrics.json not found"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(inputs, argv, message, tmp_path, capsys, monkeypatch):
    d = shutil.copytree(inputs, tmp_path / "d")   # a copy per case: what one case writes cannot mislead another
    monkeypatch.chdir(d)   # default output folders (eval's runs/eval) would land in the snapshot too
    before = _tree(d)
    assert cli.main([a.format(d=d) for a in argv.split()]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert _tree(d) == before   # no new file or folder, no changed byte


def test_an_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    from mini_autoguide import cli_image

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_image, "run_grid", interrupted)
    assert cli.main(["grid", "a.png", "--out", "b.png"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


# --- prep ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("to_zip", [False, True])
def test_prep_writes_the_cropped_images_and_their_labels(tmp_path, capsys, to_zip):
    import json
    import zipfile
    import numpy as np
    from PIL import Image
    from mini_autoguide import data, prep
    from test_data import make_tree

    make_tree(tmp_path / "src")   # classes n02 and n01, 3 images each, of 3 sizes
    out = tmp_path / ("out.zip" if to_zip else "out")
    assert cli.main(["prep", str(tmp_path / "src"), str(out), "--resolution", "16", "--workers", "1", "--quiet"]) == 0
    assert capsys.readouterr().err == f"prepared 6 images in {out}\n"
    if to_zip:
        with zipfile.ZipFile(out) as z:
            labels = json.loads(z.read("labels.json"))
            assert sorted(z.namelist()) == sorted(["labels.json"] + [f for f, _ in labels["labels"]])
    else:
        labels = json.loads((out / "labels.json").read_text())
    assert labels["classes"] == ["n01", "n02"] and labels["resolution"] == 16
    assert [label for _, label in labels["labels"]] == [0, 0, 0, 1, 1, 1]   # sorted by class name
    ds = data.open_dataset(out)
    for i, (name, label) in enumerate(labels["labels"]):   # each image is the ADM crop of its source
        src = next((tmp_path / "src" / name).parent.glob((tmp_path / "src" / name).stem + ".*"))
        with Image.open(src) as im:
            assert np.array_equal(ds[i][0], prep.center_crop_dhariwal(im, 16).transpose(2, 0, 1)), name
        assert ds[i][1] == label


def test_prep_uses_all_cores_by_default(tmp_path, monkeypatch, capsys):
    # without --workers, prep takes os.cpu_count() when it runs: one core here, so no worker processes
    from test_data import make_tree
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    make_tree(tmp_path / "src")
    assert cli.main(["prep", str(tmp_path / "src"), str(tmp_path / "out"), "--resolution", "8", "--quiet"]) == 0
    assert "prepared 6 images" in capsys.readouterr().err
