"""The toy CLI end to end (fast mode) and its handling of bad input."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from mini_autoguide.checkpoint import save_model
from mini_autoguide.cli import build_parser, main
from mini_autoguide.guidance import METHODS
from toy2d import plots
from toy2d import reproduce as toy
from toy2d.model import ToyMLP
from toy2d.train import MODEL_KIND, ToyConfig, save_toy, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def run(*args):
    """The CLI as a user runs it: a subprocess, so tracebacks would show."""
    return subprocess.run([sys.executable, "-m", "mini_autoguide", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def bad(capsys, *args):
    """In-process run that must fail with exit 2 and one clear line on stderr."""
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    r = run("toy", "reproduce", "--fast", "--quiet", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, r


@pytest.mark.slow   # a whole `toy reproduce --fast` with figures: about a minute on 2 cores
def test_reproduce_fast_end_to_end(reproduced):
    out, r = reproduced
    report = json.loads((out / "metrics.json").read_text())
    for name in (*METHODS, "truth"):
        x = np.load(out / "samples" / f"{name}.npz")["x"]
        assert x.shape == (4096, 2) and np.isfinite(x).all()
        assert set(report["methods"][name]) >= {"mean_logp", "outliers", "branch_tv", "precision", "recall"}
    for fig in ("samples.png", "guide.png", "sweep.png"):
        # a drawn figure, not an empty canvas: hundreds of pixels a side, many distinct colours
        # (what each figure shows is checked in test_plot_and_evaluate_from_a_run)
        png = plt.imread(out / fig)
        assert min(png.shape[:2]) > 200 and len(np.unique(png.reshape(-1, png.shape[2]), axis=0)) > 100
    assert "autoguidance" in r.stdout and "outliers" in r.stdout
    # a (method, w) is sampled once; every method at w = 1 is the main model alone
    for point in report["sweep"]:
        same = "none" if point["weight"] == 1.0 else point["method"]
        if point["weight"] == report["methods"][same]["weight"]:
            assert all(point[k] == report["methods"][same][k] for k in ("mean_logp", "outliers", "recall"))
    assert sum(p["weight"] == 1.0 for p in report["sweep"]) == 3
    # the true samples are the reference: few outliers, high precision and recall
    t = report["methods"]["truth"]
    assert t["outliers"] < 0.03 and t["precision"] > 0.9 and t["recall"] > 0.9
    # autoguidance corrects the main model's errors: fewer outliers, higher precision
    none, auto = report["methods"]["none"], report["methods"]["autoguidance"]
    assert auto["outliers"] < 0.85 * none["outliers"] and auto["precision"] > none["precision"]
    # truncation removes outliers but loses coverage: the trade-off shows even in fast mode
    assert report["methods"]["truncation"]["outliers"] < report["methods"]["none"]["outliers"]
    assert report["methods"]["truncation"]["recall"] < report["methods"]["none"]["recall"]


def _numbers(obj):
    """Every number in a metrics.json, in order, except the wall-clock seconds."""
    if isinstance(obj, dict):
        return [v for k, x in obj.items() if k != "seconds" for v in _numbers(x)]
    if isinstance(obj, list):
        return [v for x in obj for v in _numbers(x)]
    return [obj] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def test_reproduce_is_deterministic_per_seed_in_small(tmp_path):
    """reproduce() at tiny settings (a few seconds): the default run's check of what
    the slow test below checks on `toy reproduce --fast`."""
    def tiny(seed):
        s = toy.Settings.fast(seed)
        s.main, s.guide, s.uncond = (replace(c, iterations=16, batch=256) for c in (s.main, s.guide, s.uncond))
        s.samples, s.steps, s.sweep = 512, 4, dict(autoguidance=[1.0, 2.0])
        return s
    reports = [toy.reproduce(tmp_path / name, tiny(seed), figures=False, log=lambda *a: None)
               for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert _numbers(reports[0]) == _numbers(reports[1]) and _numbers(reports[0]) != _numbers(reports[2])
    for name in METHODS:
        x, y, z = (np.load(tmp_path / d / "samples" / f"{name}.npz")["x"] for d in "abc")
        assert np.array_equal(x, y) and not np.array_equal(x, z)


@pytest.mark.slow
@pytest.mark.slow   # a whole `toy reproduce --fast` with figures: about a minute on 2 cores
def test_reproduce_is_deterministic_per_seed(reproduced, tmp_path):
    """Same seed: the same bits in every metric and sample; another seed: different ones."""
    out, _ = reproduced
    runs = {}
    for name, seed in (("again", "0"), ("other", "1")):
        r = run("toy", "reproduce", "--fast", "--quiet", "--no-figures", "--seed", seed,
                "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        runs[name] = tmp_path / name
    first, again, other = (json.loads((d / "metrics.json").read_text()) for d in (out, runs["again"], runs["other"]))
    assert _numbers(first) == _numbers(again) and len(_numbers(first)) > 50
    assert _numbers(first["methods"]) != _numbers(other["methods"])
    for name in METHODS:
        x, y, z = (np.load(d / "samples" / f"{name}.npz")["x"] for d in (out, runs["again"], runs["other"]))
        assert np.array_equal(x, y) and not np.array_equal(x, z)


@pytest.mark.slow   # a whole `toy reproduce --fast` with figures: about a minute on 2 cores
def test_reproduce_refuses_to_overwrite(reproduced):
    out, _ = reproduced
    before = (out / "metrics.json").read_bytes()
    r = run("toy", "reproduce", "--fast", "--quiet", "--out", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.slow   # a whole `toy reproduce --fast` with figures: about a minute on 2 cores
def test_plot_and_evaluate_from_a_run(reproduced, tmp_path, capsys, monkeypatch):
    out, _ = reproduced
    drawn, draw = {}, toy.draw   # keep the Figures that `toy plot` draws
    monkeypatch.setattr(toy, "draw", lambda *args: drawn.update(draw(*args)))
    pixels = {name: plt.imread(out / f"{name}.png") for name in ("samples", "sweep")}
    assert main(["toy", "plot", str(out)]) == 0
    check_figures(drawn, out)
    # reproduce drew the same pictures from the same numbers (the guide figure also reruns the
    # networks, so it is left out: a thread count could move a trajectory by a float rounding)
    for name, before in pixels.items():
        assert np.array_equal(plt.imread(out / f"{name}.png"), before), name
    js = tmp_path / "eval.json"
    assert main(["toy", "evaluate", str(out / "samples" / "truth.npz"), "--json", str(js)]) == 0
    assert "precision" in capsys.readouterr().out
    assert json.loads(js.read_text())
    bad(capsys, "toy", "evaluate", str(out / "samples" / "truth.npz"), "--json", str(js))  # exists


def check_figures(figs, out):
    """The figures show the run's own samples and metrics."""
    report = json.loads((out / "metrics.json").read_text())
    names = ("truth", "none", "autoguidance", "cfg", "truncation")
    # samples: one panel a method, its samples (the first 3000) and its metrics under them
    assert [ax.get_title().split(" (w=")[0] for ax in figs["samples"].axes] == [plots.look(m).label for m in names]
    for ax, name in zip(figs["samples"].axes, names):
        (dots,) = ax.collections
        assert np.array_equal(dots.get_offsets(), np.load(out / "samples" / f"{name}.npz")["x"][:3000])
        assert ax.get_xlabel().startswith(f"outliers {100 * report['methods'][name]['outliers']:.1f}%")
    # sweep: per method, precision and outlier rate against recall over its weights
    for ax, key in zip(figs["sweep"].axes, ("precision", "outliers")):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for method in ("autoguidance", "cfg", "truncation"):
            rows = [r for r in report["sweep"] if r["method"] == method]
            assert list(lines[plots.look(method).label].get_xdata()) == [r["recall"] for r in rows]
            assert list(lines[plots.look(method).label].get_ydata()) == [r[key] for r in rows]
        truth = report["methods"]["truth"]
        assert ax.collections[0].get_offsets().tolist() == [[truth["recall"], truth[key]]]
    # guide: main, guide, their log-ratio, then trajectories without and with autoguidance from
    # the same 24 starting points, ending in different places
    guide = figs["guide"].axes
    assert len(guide) == 4 and not np.array_equal(guide[0].images[0].get_array(), guide[1].images[0].get_array())
    paths = {m: [np.column_stack(line.get_data()) for line in guide[3].get_lines()
                 if line.get_color() == plots.look(m).style[0]] for m in ("none", "autoguidance")}
    assert [len(p) for p in paths.values()] == [24, 24]
    none, auto = (np.array([p[[0, -1]] for p in paths[m]]) for m in paths)   # [24, start/end, 2]
    assert np.array_equal(none[:, 0], auto[:, 0]) and np.abs(none[:, 1] - auto[:, 1]).max() > 0.01


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    cfg = ToyConfig(width=8, iterations=2, batch=64)
    net, _ = train(cfg)
    save_toy(d / "main.safetensors", net, cfg)
    save_toy(d / "guide.safetensors", net, cfg)
    odd = ToyMLP(8, dim=3)
    save_model(d / "dim3.safetensors", odd, MODEL_KIND, dict(vars(cfg), dim=3))
    (d / "truncated.safetensors").write_bytes((d / "main.safetensors").read_bytes()[:64])
    torch.save({"a": 1}, d / "foreign.safetensors")
    return d


def test_the_commands_defaults_are_the_toys():
    # the parser cannot import toy2d (the library never imports the toy), so it writes them again
    parser, c, s = build_parser(), ToyConfig(), toy.Settings()
    args = parser.parse_args(["toy", "train", "--out", "m"])
    assert (args.classes, args.width, args.depth, args.iterations, args.batch, args.loss, args.lr, args.ema,
            args.seed) == (c.classes, c.width, c.depth, c.iterations, c.batch, c.loss, c.lr, c.ema_sigma_rel, c.seed)
    args = parser.parse_args(["toy", "sample", "m", "--out", "o"])
    assert (args.num, args.steps, args.seed) == (s.samples, s.steps, s.seed)


def test_train_and_sample_commands(models, tmp_path, capsys):
    m = str(tmp_path / "m.safetensors")
    assert main(["toy", "train", "--out", m, "--width", "8", "--iterations", "3", "--batch", "64", "--quiet"]) == 0
    s = tmp_path / "s.npz"
    assert main(["toy", "sample", m, "--guide", str(models / "guide.safetensors"), "--method",
                 "autoguidance", "--weight", "2", "-n", "32", "--steps", "4", "--out", str(s), "--quiet"]) == 0
    assert np.load(s)["x"].shape == (32, 2)
    capsys.readouterr()
    bad(capsys, "toy", "train", "--out", m, "--width", "8", "--iterations", "3")  # exists, no --force


def test_bad_input(models, tmp_path, capsys):
    m, g = str(models / "main.safetensors"), str(models / "guide.safetensors")
    out = str(tmp_path / "x.npz")
    common = [m, "-n", "8", "--steps", "2", "--out", out, "--quiet"]
    assert "unknown class" in bad(capsys, "toy", "train", "--out", str(tmp_path / "c.st"), "--classes", "C")
    with pytest.raises(SystemExit) as e:   # argparse knows the methods
        main(["toy", "sample", *common, "--method", "magic"])
    assert e.value.code == 2 and "invalid choice: 'magic'" in capsys.readouterr().err
    assert "finite" in bad(capsys, "toy", "sample", *common, "--guide", g, "--weight", "nan")
    assert "finite" in bad(capsys, "toy", "sample", *common, "--guide", g, "--weight", "inf")
    assert "interval" in bad(capsys, "toy", "sample", *common, "--guide", g, "--interval", "1", "0.5")
    assert "interval" in bad(capsys, "toy", "sample", *common, "--guide", g, "--interval", "0.5", "0.5")
    assert "needs --guide" in bad(capsys, "toy", "sample", *common, "--method", "cfg")
    assert "dimensions" in bad(capsys, "toy", "sample", *common, "--guide", str(models / "dim3.safetensors"))
    assert "not found" in bad(capsys, "toy", "sample", *common, "--guide", str(tmp_path / "missing.safetensors"))
    assert "truncated" in bad(capsys, "toy", "sample", *common, "--guide", str(models / "truncated.safetensors"))
    assert "foreign" in bad(capsys, "toy", "sample", *common, "--guide", str(models / "foreign.safetensors"))
    assert not os.path.exists(out)
    notnpz = tmp_path / "n.npz"
    notnpz.write_text("hello")
    assert "cannot read" in bad(capsys, "toy", "evaluate", str(notnpz))
    np.savez(tmp_path / "w.npz", x=np.zeros((10, 3)))
    assert "shape" in bad(capsys, "toy", "evaluate", str(tmp_path / "w.npz"))


def test_bad_device_is_one_line(tmp_path, capsys):
    assert "not available" in bad(capsys, "toy", "train", "--out", str(tmp_path / "a"), "--device", "cuda:7")
