"""The toy CLI end to end (fast mode) and its handling of bad input."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from mini_autoguide.cli import main
from toy2d.model import ToyMLP
from toy2d.reproduce import METHODS, save_toy
from toy2d.train import ToyConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    """The CLI as a user runs it: a subprocess, so tracebacks would show."""
    return subprocess.run([sys.executable, "-m", "mini_autoguide", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def bad(capsys, *args):
    """In-process run that must fail with exit 2 and one clear line on stderr."""
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "run"
    r = run("toy", "reproduce", "--fast", "--quiet", "--outdir", str(out))
    assert r.returncode == 0, r.stderr
    return out, r


def test_reproduce_fast_end_to_end(reproduced):
    out, r = reproduced
    report = json.loads((out / "metrics.json").read_text())
    for name in METHODS + ("truth",):
        x = np.load(out / "samples" / f"{name}.npz")["x"]
        assert x.shape == (4096, 2) and np.isfinite(x).all()
        assert set(report["methods"][name]) >= {"mean_logp", "outliers", "branch_tv", "precision", "recall"}
    for fig in ("samples.png", "guide.png", "sweep.png"):
        assert (out / fig).stat().st_size > 10_000
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
    from toy2d.reproduce import Settings, reproduce

    def tiny(seed):
        s = Settings.fast(seed)
        s.main, s.guide, s.uncond = (replace(c, iterations=16, batch=256) for c in (s.main, s.guide, s.uncond))
        s.samples, s.steps, s.sweep = 512, 4, dict(autoguidance=[1.0, 2.0])
        return s
    reports = [reproduce(tmp_path / name, tiny(seed), figures=False, log=lambda *a: None)
               for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    assert _numbers(reports[0]) == _numbers(reports[1]) and _numbers(reports[0]) != _numbers(reports[2])
    for name in METHODS:
        x, y, z = (np.load(tmp_path / d / "samples" / f"{name}.npz")["x"] for d in "abc")
        assert np.array_equal(x, y) and not np.array_equal(x, z)


@pytest.mark.slow
def test_reproduce_is_deterministic_per_seed(reproduced, tmp_path):
    """Same seed: the same bits in every metric and sample; another seed: different ones."""
    out, _ = reproduced
    runs = {}
    for name, seed in (("again", "0"), ("other", "1")):
        r = run("toy", "reproduce", "--fast", "--quiet", "--no-figures", "--seed", seed,
                "--outdir", str(tmp_path / name))
        assert r.returncode == 0, r.stderr
        runs[name] = tmp_path / name
    first, again, other = (json.loads((d / "metrics.json").read_text()) for d in (out, runs["again"], runs["other"]))
    assert _numbers(first) == _numbers(again) and len(_numbers(first)) > 50
    assert _numbers(first["methods"]) != _numbers(other["methods"])
    for name in METHODS:
        x, y, z = (np.load(d / "samples" / f"{name}.npz")["x"] for d in (out, runs["again"], runs["other"]))
        assert np.array_equal(x, y) and not np.array_equal(x, z)


def test_reproduce_refuses_to_overwrite(reproduced):
    out, _ = reproduced
    before = (out / "metrics.json").read_bytes()
    r = run("toy", "reproduce", "--fast", "--quiet", "--outdir", str(out))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--force" in r.stderr and "Traceback" not in r.stderr
    assert (out / "metrics.json").read_bytes() == before


def test_plot_and_evaluate_from_a_run(reproduced, tmp_path, capsys):
    out, _ = reproduced
    assert main(["toy", "plot", "--outdir", str(out)]) == 0
    js = tmp_path / "eval.json"
    assert main(["toy", "evaluate", str(out / "samples" / "truth.npz"), "--json", str(js)]) == 0
    assert "precision" in capsys.readouterr().out
    assert json.loads(js.read_text())
    bad(capsys, "toy", "evaluate", str(out / "samples" / "truth.npz"), "--json", str(js))  # exists


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    cfg = ToyConfig(width=8, iterations=2, batch=64)
    from toy2d.train import train
    net, _ = train(cfg)
    save_toy(d / "main.safetensors", net, cfg)
    save_toy(d / "guide.safetensors", net, cfg)
    odd = ToyMLP(8, dim=3)
    from mini_autoguide.checkpoint import save_model
    save_model(d / "dim3.safetensors", odd, "toy2d-mlp", dict(vars(cfg), dim=3))
    (d / "truncated.safetensors").write_bytes((d / "main.safetensors").read_bytes()[:64])
    torch.save({"a": 1}, d / "foreign.safetensors")
    return d


def test_train_and_sample_commands(models, tmp_path, capsys):
    m = str(tmp_path / "m.safetensors")
    assert main(["toy", "train", "--out", m, "--width", "8", "--iterations", "3", "--batch", "64", "--quiet"]) == 0
    s = tmp_path / "s.npz"
    assert main(["toy", "sample", "--main", m, "--guide", str(models / "guide.safetensors"), "--method",
                 "autoguidance", "--weight", "2", "-n", "32", "--steps", "4", "--out", str(s), "--quiet"]) == 0
    assert np.load(s)["x"].shape == (32, 2)
    capsys.readouterr()
    bad(capsys, "toy", "train", "--out", m, "--width", "8", "--iterations", "3")  # exists, no --force


def test_bad_input(models, tmp_path, capsys):
    m, g = str(models / "main.safetensors"), str(models / "guide.safetensors")
    out = str(tmp_path / "x.npz")
    common = ["--main", m, "-n", "8", "--steps", "2", "--out", out, "--quiet"]
    assert "unknown class" in bad(capsys, "toy", "train", "--out", str(tmp_path / "c.st"), "--classes", "C")
    assert "unknown guidance method" in bad(capsys, "toy", "sample", *common, "--method", "magic")
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
