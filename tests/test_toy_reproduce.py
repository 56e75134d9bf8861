"""The toy reproduction (toy2d/reproduce.py): one run, and many seeds with their summary's
statistics, per-seed runs and the CLI's --seeds."""
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest

from mini_autoguide.cli import main
from mini_autoguide.guidance import METHODS
from toy2d import plots
from toy2d import reproduce as toy
from toy2d.reproduce import Settings
from toy2d.sample import denoiser

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _report(values, sweep_values):
    """A metrics.json-like report: values[method] = dict of metrics (weights from Settings)."""
    weights = Settings().weights
    methods = {m: dict(weight=weights[m], **v) for m, v in values.items() if m != "truth"}
    methods["truth"] = dict(values["truth"])
    sweep = [dict(method="autoguidance", weight=w, **v) for w, v in sweep_values.items()]
    return dict(methods=methods, sweep=sweep)


def _metrics(outliers, recall, precision=0.9, mean_logp=1.0, branch_tv=0.1):
    return dict(outliers=outliers, recall=recall, precision=precision, mean_logp=mean_logp, branch_tv=branch_tv)


def test_summary_statistics_by_hand(tmp_path):
    # three seeds; autoguidance has fewer outliers than no guidance on seeds 0 and 2 only
    none = [0.10, 0.20, 0.30]
    auto = [0.05, 0.25, 0.10]
    reports = {}
    for k, seed in enumerate((4, 7, 9)):
        values = {m: _metrics(0.2, 0.8) for m in METHODS}
        values["none"] = _metrics(none[k], 0.9)
        values["autoguidance"] = _metrics(auto[k], 0.85 + 0.01 * k)
        values["truth"] = _metrics(0.01, 0.95)
        reports[seed] = _report(values, {2.0: _metrics(0.5 + k, 0.5)})
    summary = toy.summarize(reports)
    assert summary["seeds"] == [4, 7, 9]
    s = toy.point(summary, "autoguidance")["metrics"]["outliers"]
    assert s["per_seed"] == auto and s["min"] == 0.05 and s["max"] == 0.25
    assert s["mean"] == pytest.approx(np.mean(auto), rel=1e-15)
    assert s["std"] == pytest.approx(np.sqrt(sum((a - np.mean(auto)) ** 2 for a in auto) / 2), rel=1e-12)
    assert s["beats_none"] == 2                                     # lower is better for outliers
    r = toy.point(summary, "autoguidance")["metrics"]["recall"]
    assert r["beats_none"] == 0                                     # higher is better for recall: 0.85.. < 0.9
    sweep = toy.point(summary, "autoguidance", 2.0)["metrics"]["outliers"]
    assert sweep["per_seed"] == [0.5, 1.5, 2.5] and sweep["std"] == pytest.approx(1.0)
    assert "beats_none" not in toy.point(summary, "truth")["metrics"]["outliers"]
    json.dumps(summary)   # plain JSON
    text = toy.format_summary(summary)
    assert "3 seeds (4,7,9)" in text and "[2]" in text
    # The figure: per panel, one grey line a seed through each method's value, and each method's
    # mean over the seeds with a bar of +- the standard deviation.
    fig = plots.seeds_figure(str(tmp_path / "seeds.png"), [toy.point(summary, m) for m in plots.ORDER])
    outliers_ax, recall_ax = fig.axes
    grey = [line for line in outliers_ax.get_lines() if line.get_color() == "#999999"]
    assert [list(line.get_ydata()) for line in grey] == [[none[k], auto[k], 0.2, 0.2] for k in range(3)]
    assert [list(line.get_ydata()) for line in recall_ax.get_lines() if line.get_color() == "#999999"] == \
        [[0.9, 0.85 + 0.01 * k, 0.8, 0.8] for k in range(3)]
    marker, _, (bar,) = outliers_ax.containers[1]   # autoguidance, the second method
    mean, std = np.mean(auto), np.std(auto, ddof=1)
    assert marker.get_ydata()[0] == pytest.approx(mean, rel=1e-15)
    assert bar.get_segments()[0][:, 1] == pytest.approx([mean - std, mean + std], rel=1e-12)
    assert [t.get_text().split("\n")[0] for t in outliers_ax.get_xticklabels()] == \
        ["no guidance", "autoguidance", "CFG", "truncation"]
    assert "3 seeds" in outliers_ax.get_title()


def test_a_point_missing_on_some_seed_is_left_out():
    a = _report({m: _metrics(0.1, 0.9) for m in (*METHODS, "truth")}, {2.0: _metrics(0.1, 0.9)})
    b = _report({m: _metrics(0.2, 0.8) for m in (*METHODS, "truth")}, {})
    summary = toy.summarize({0: a, 1: b})
    with pytest.raises(KeyError):
        toy.point(summary, "autoguidance", 2.0)
    assert toy.point(summary, "none")["metrics"]["outliers"]["per_seed"] == [0.1, 0.2]


def _tiny(seed):
    s = Settings(seed=seed)
    small = dict(width=8, iterations=3, batch=64)
    s.main, s.guide = replace(s.main, **small), replace(s.guide, **small)
    s.uncond = replace(s.uncond, **small)
    s.samples, s.steps = 256, 3
    s.sweep = dict(autoguidance=[1.0, 2.0], cfg=[1.0, 2.0], truncation=[1.2])
    s.weights = dict(none=1.0, cfg=2.0, autoguidance=2.0, truncation=1.2)
    return s


def test_settings_read_back_from_metrics_json_are_the_run_s():
    for settings in (Settings(), Settings.fast(3), _tiny(7)):
        assert Settings.from_json(json.loads(json.dumps(settings.to_json()))) == settings


def test_guide_figure_draws_the_networks_and_trajectories_of_the_run(tmp_path):
    # guide_views runs the networks; guide_figure draws those arrays and samples nothing itself
    settings = _tiny(0)
    nets = {name: toy.obtain(settings, name, log=lambda *a: None)[0] for name in toy.MODELS}
    views = toy.guide_views(nets, settings, n_traj=5)
    x0 = settings.start_points(5, seed=3)
    for method, t in views["trajectories"].items():
        x = settings.sample(denoiser(method, nets, settings.weights[method]), x0)
        assert t.shape == (settings.steps + 1, 5, 2) and np.array_equal(t[0], x0) and np.array_equal(t[-1], x)
    assert views["logp"]["main"].shape == (plots.DENSITY_GRID ** 2,)
    assert views["score"]["guide"].shape == (plots.ARROW_GRID ** 2, 2)
    fig = plots.guide_figure(str(tmp_path / "guide.png"), views)
    lines = fig.axes[3].get_lines()
    for method, t in views["trajectories"].items():
        drawn = [np.column_stack(line.get_data()) for line in lines if line.get_color() == plots.look(method).style[0]]
        assert len(drawn) == 5 and all(np.array_equal(d, t[:, i]) for i, d in enumerate(drawn))
    arrows = fig.axes[0].collections[0]   # main's score directions, at unit length
    u = views["score"]["main"] / np.linalg.norm(views["score"]["main"], axis=1, keepdims=True)
    assert np.allclose(np.column_stack([arrows.U, arrows.V]), u, atol=1e-6)


def test_every_seed_is_the_one_seed_run_and_resumes(tmp_path, monkeypatch):
    quiet = dict(figures=False, log=lambda *a: None)
    summary = toy.reproduce_seeds(str(tmp_path / "study"), [3, 5], _tiny, **quiet)
    alone = toy.reproduce(str(tmp_path / "alone"), _tiny(5), **quiet)   # seed 5 on its own
    got = toy.point(summary, "autoguidance")["metrics"]["outliers"]["per_seed"]
    assert got[1] == alone["methods"]["autoguidance"]["outliers"]
    assert got[0] != got[1] or summary["points"][0]["metrics"]["recall"]["std"] > 0   # the seeds differ
    for seed in (3, 5):
        assert os.path.isfile(tmp_path / "study" / f"seed-{seed}" / "metrics.json")
    # a finished seed is read back, not rerun
    os.remove(tmp_path / "study" / "summary.json")
    monkeypatch.setattr(toy, "reproduce", lambda *a, **k: pytest.fail("a finished seed ran again"))
    again = toy.reproduce_seeds(str(tmp_path / "study"), [3, 5], _tiny, **quiet)
    assert again == json.loads((tmp_path / "study" / "summary.json").read_text()) == json.loads(json.dumps(summary))
    # a seed of other settings is refused, not mixed in
    with pytest.raises(ValueError, match="other settings"):
        toy.reproduce_seeds(str(tmp_path / "study"), [3], lambda s: replace(_tiny(s), samples=128), **quiet)


def test_cli_seeds_reads_back_finished_seeds_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "study"
    toy.reproduce_seeds(str(out), [0], _tiny, figures=False, log=lambda *a: None)
    os.remove(out / "summary.json")
    # The CLI's --fast settings differ from the tiny ones: the finished seed is refused, one line, exit 2.
    assert main(["toy", "reproduce", "--out", str(out), "--seeds", "0", "--fast", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "other settings" in err and err.count("\n") == 1
    # Bad seed lists are one line too.
    assert main(["toy", "reproduce", "--out", str(out), "--seeds", "3-1", "--quiet"]) == 2
    assert "seed range" in capsys.readouterr().err
    # An existing summary is not overwritten without --force.
    (out / "summary.json").write_text("{}")
    assert main(["toy", "reproduce", "--out", str(out), "--seeds", "0", "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err and (out / "summary.json").read_text() == "{}"
    shutil.rmtree(out)


@pytest.mark.parametrize("flag,value,message", [("--guide-width", "0", "width"),
                                                ("--guide-iterations", "-3", "iterations"),
                                                ("--guide-ema", "0.5", "sigma_rel"),
                                                ("--guide-weight", "nan", "--guide-weight"),
                                                ("--guide-weight", "-1", "--guide-weight")])
def test_bad_guide_recipe_is_refused_before_anything_runs(tmp_path, capsys, flag, value, message):
    out = tmp_path / "run"
    assert main(["toy", "reproduce", "--out", str(out), flag, value, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_guide_recipe_reaches_the_guide(tmp_path, monkeypatch):
    # The options change the guide's configuration only: the main model and CFG's model stay.
    seen = {}
    monkeypatch.setattr(toy, "reproduce", lambda outdir, settings, **kw: seen.setdefault("s", settings))
    main(["toy", "reproduce", "--out", str(tmp_path / "r"), "--guide-width", "16", "--guide-iterations", "100",
          "--guide-ema", "0.05", "--guide-weight", "2", "--quiet", "--no-figures"])
    s = seen["s"]
    assert (s.guide.width, s.guide.iterations, s.guide.ema_sigma_rel) == (16, 100, 0.05)
    assert s.weights == dict(Settings().weights, autoguidance=2.0)
    assert s.main == Settings().main and s.uncond == Settings().uncond


def test_a_finished_study_grows_but_never_shrinks(tmp_path, capsys, monkeypatch):
    # summary.json is rewritten from the seed folders: allowed when it loses nothing
    out = tmp_path / "study"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"seeds": [0, 1]}))
    called = []
    monkeypatch.setattr(toy, "reproduce_seeds", lambda outdir, seeds, *a, **k: called.append(seeds))
    assert main(["toy", "reproduce", "--out", str(out), "--seeds", "0-2", "--quiet", "--no-figures"]) == 0
    assert called == [[0, 1, 2]]
    assert main(["toy", "reproduce", "--out", str(out), "--seeds", "0", "--quiet"]) == 2   # would drop seed 1
    assert "--force" in capsys.readouterr().err and called == [[0, 1, 2]]
