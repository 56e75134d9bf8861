"""Guide recipes (mini_autoguide.guidance.GUIDE_RECIPES, toy2d/guides.py): each builds the guide it
names, exactly, and a bad recipe is refused with one line and exit 2 before anything runs."""
import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from mini_autoguide import guidance
from mini_autoguide.cli import main
from mini_autoguide.ema import PowerEMA
from mini_autoguide.mp import mp_silu
from script_loader import load_experiment
import toy2d
from toy2d import guides, reproduce as toy
from toy2d.model import ToyMLP
from toy2d.train import ToyConfig, load_toy, train

pytestmark = pytest.mark.usefixtures("one_thread")
MAIN = ToyConfig(width=16, iterations=6, batch=128, seed=3)


def _points(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.exp(torch.randn(n, generator=g) - 1)


@pytest.mark.parametrize("text,parsed", [("separate", ("separate", None)), ("snapshot:512", ("snapshot", 512)),
                                         ("ema:0.05", ("ema", 0.05)), ("skip:2", ("skip", 2)),
                                         ("sigma:1.5", ("sigma", 1.5)), ("decay:0.1", ("decay", 0.1)),
                                         ("dropout:0.1", ("dropout", 0.1))])
def test_recipes_parse(text, parsed):
    assert guidance.parse_recipe(text) == parsed


@pytest.mark.parametrize("text,message", [
    ("ensemble", "unknown guide recipe 'ensemble'"), ("separate:3", "takes no value"),
    ("snapshot", "needs a finite int value (snapshot:K)"), ("snapshot:1.5", "needs a finite int"),
    ("sigma:nan", "needs a finite float"), ("sigma:inf", "needs a finite float"),
    ("snapshot:0", "1 <= K < the main model's 6"), ("snapshot:6", "1 <= K < the main model's 6"),
    ("ema:0.3", "sigma_rel must be in"), ("ema:0.01", "is the main model itself"),
    ("skip:0", "1 <= K <= 4"), ("skip:5", "1 <= K <= 4"), ("sigma:1", "F > 1"), ("decay:0", "L > 0"),
    ("decay:-1", "L > 0"), ("dropout:0", "0 < P < 1"), ("dropout:1", "0 < P < 1")])
def test_bad_recipes_are_refused(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        guides.check(text, MAIN)


@pytest.mark.parametrize("text", ["separate", "snapshot:1", "snapshot:5", "ema:0.2", "skip:1", "skip:4", "sigma:1.01",
                                  "decay:1e-6", "dropout:0.99"])
def test_recipes_at_their_limits_are_accepted(text):
    assert guides.check(text, MAIN) == text


def test_snapshot_and_ema_recipes_are_the_main_run_stopped_early_or_averaged_otherwise():
    # Tracked during the main model's own run (its training network after each of Adam's steps),
    # the EMA at iteration K and a second EMA length equal the guides the recipes train, bit for bit.
    net0 = ToyMLP(MAIN.width)
    ema_main, ema_other, kept = None, None, {}

    def callback(t, net):
        nonlocal ema_main, ema_other
        if t == 1:
            ema_main, ema_other = PowerEMA(net0, [MAIN.ema_sigma_rel]), PowerEMA(net0, [0.05])
        for ema in (ema_main, ema_other):
            ema.update(net, t)
        if t == 4:
            kept["snapshot"] = copy.deepcopy(ema_main.nets[0])
    main_net, _ = train(MAIN, callback=callback)
    # The callback's EMA starts from a fresh network, so it must be seeded as train() seeds its own:
    # both take their first update with weight 1 (beta_1 = 0), which erases the starting point.
    assert all(torch.equal(a, b) for a, b in zip(ema_main.nets[0].parameters(), main_net.parameters()))
    for recipe, tracked in (("snapshot:4", kept["snapshot"]), ("ema:0.05", ema_other.nets[0])):
        config = guides.guide_config(recipe, MAIN, separate=None)
        guide, _ = train(config)
        for a, b in zip(guide.parameters(), tracked.parameters()):
            assert torch.equal(a, b), recipe


def _net(seed):
    """A width-16 toy network whose output is not the prior alone (gain 0.7, not 0)."""
    torch.manual_seed(seed)
    net = ToyMLP(16).eval()
    with torch.no_grad():
        net.gain.fill_(0.7)
    return net


def test_decay_recipe_trains_the_separate_guide_with_weight_decay():
    separate = ToyConfig(width=8, iterations=5, batch=128, seed=4)
    config = guides.guide_config("decay:0.5", MAIN, separate)
    assert config == replace(separate, weight_decay=0.5)
    decayed, plain = train(config)[0], train(separate)[0]
    assert any(not torch.equal(a, b) for a, b in zip(decayed.parameters(), plain.parameters()))   # it reached Adam
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight_decay"):
            replace(separate, weight_decay=bad).check()


def test_dropout_recipe_trains_main_with_dropout_and_guides_it_with_dropout_on():
    config = guides.main_config("dropout:0.5", MAIN)
    assert config == replace(MAIN, dropout=0.5) and guides.guide_config("dropout:0.5", config, MAIN) is None
    net, _ = train(config)
    plain, _ = train(MAIN)
    assert any(not torch.equal(a, b) for a, b in zip(net.parameters(), plain.parameters()))   # masks in training
    with torch.no_grad():
        net.gain.fill_(0.7)
    x, _ = _points()
    sigma = torch.full((len(x),), 0.3)
    # main itself, in eval mode, has no dropout: the same numbers as a copy built without dropout
    copy_ = ToyMLP(16)
    copy_.load_state_dict(net.state_dict())
    assert torch.equal(net.eval().logp(x, sigma), copy_.eval().logp(x, sigma))
    guide = guides.weakened("dropout:0.5", net, seed=7)
    g = guide.logp(x, sigma)
    assert not torch.allclose(g, net.logp(x, sigma))
    assert torch.equal(g, guide.logp(x, sigma)) and torch.equal(g[:5], guide.logp(x[:5], sigma[:5]))  # deterministic
    assert not torch.equal(g, guide.logp(x, sigma * 1.01))   # another noise level, another mask
    assert not torch.equal(g, guides.weakened("dropout:0.5", net, seed=8).logp(x, sigma))   # another seed
    # the masks written out: one per (seed, layer, sigma), units kept with probability 1 - P, scaled by 1 / (1 - P)
    s = sigma[:, None]
    c_in = (s ** 2 + 0.25).rsqrt()
    y = torch.cat([x * c_in, s.log() / 4, torch.ones_like(s)], 1) @ net.layers[0].effective_weight().t()
    for k in range(1, 5):
        key = (7 * 1000 + k) * 10 ** 9 + round(0.3 * 1e6)
        keep = torch.rand(16, generator=torch.Generator().manual_seed(key)) >= 0.5
        y = (mp_silu(y) * keep / 0.5) @ net.layers[k].effective_weight().t()
    assert torch.allclose(g, 0.7 * y.square().mean(1) / sigma - 0.5 * (x * c_in).square().sum(1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="trained with dropout"):
        plain.weakened(dropout_seed=0)


def test_skip_recipe_is_the_main_network_without_one_hidden_layer():
    net = _net(0)
    weak = guides.weakened("skip:2", net, seed=0)
    x, sigma = _points()
    # written out: the input layer, hidden layers 1, 3 and 4 (2 skipped), the log-density
    s = sigma[:, None]
    c_in = (s ** 2 + 0.25).rsqrt()
    y = torch.cat([x * c_in, s.log() / 4, torch.ones_like(s)], 1) @ net.layers[0].effective_weight().t()
    for k in (1, 3, 4):
        y = mp_silu(y) @ net.layers[k].effective_weight().t()
    expected = 0.7 * y.square().mean(1) / sigma - 0.5 * (x * c_in).square().sum(1)
    assert torch.allclose(weak.logp(x, sigma), expected, rtol=1e-5, atol=1e-5)   # float32, a few ulps
    assert not torch.allclose(net.logp(x, sigma), expected, rtol=1e-3)
    assert weak.skip == (2,) and net.skip == ()   # the main network is untouched


def test_sigma_recipe_is_the_main_density_at_a_noisier_level():
    net = _net(1)
    weak = guides.weakened("sigma:1.5", net, seed=0)
    x, sigma = _points()
    assert torch.equal(weak.logp(x, sigma), net.logp(x, sigma * 1.5))
    assert torch.equal(weak.score(x, sigma), net.score(x, sigma * 1.5))
    d = weak(x, sigma)   # the denoiser: x + sigma^2 times the guide's score, at the run's own sigma
    assert torch.allclose(d, x + sigma[:, None] ** 2 * net.score(x, sigma * 1.5), rtol=0, atol=1e-6)


def _tiny(seed, recipe):
    s = toy.Settings(seed=seed, guide_recipe=recipe)
    small = dict(width=8, iterations=4, batch=64)
    s.main, s.guide, s.uncond = (replace(c, **small) for c in (s.main, s.guide, s.uncond))
    s.samples, s.steps = 256, 3
    s.sweep = dict(autoguidance=[1.0, 2.0], cfg=[1.0], truncation=[1.2])
    s.weights = dict(none=1.0, cfg=2.0, autoguidance=2.0, truncation=1.2)
    return s


@pytest.fixture(scope="module")
def separate(tmp_path_factory):
    """The tiny run with the paper's separate guide, that each recipe's run is compared with."""
    return toy.reproduce(str(tmp_path_factory.mktemp("separate")), _tiny(0, "separate"), figures=False,
                         log=lambda *a: None)


@pytest.mark.parametrize("recipe,trains", [("snapshot:2", True), ("ema:0.05", True), ("skip:3", False),
                                           ("sigma:2", False), ("decay:0.5", True), ("dropout:0.5", False)])
def test_reproduce_with_each_recipe(tmp_path, separate, recipe, trains):
    report = toy.reproduce(str(tmp_path), _tiny(0, recipe), figures=False, log=lambda *a: None)
    assert report["settings"]["guide_recipe"] == recipe
    assert (tmp_path / "models" / "guide.safetensors").exists() == trains
    guided, plain = (np.load(tmp_path / "samples" / f"{m}.npz")["x"] for m in ("autoguidance", "none"))
    assert not np.array_equal(guided, plain)   # the guide acted
    # the same main model as with the paper's guide: only the guide changed
    unguided = [{k: v for k, v in r["methods"]["none"].items() if k != "seconds"} for r in (report, separate)]
    assert (unguided[0] == unguided[1]) == (recipe != "dropout:0.5")   # dropout:P trains another main model


def test_a_study_of_another_recipe_is_refused(tmp_path):
    toy.reproduce_seeds(str(tmp_path), [0], lambda s: _tiny(s, "skip:1"), figures=False, log=lambda *a: None)
    with pytest.raises(ValueError, match="other settings"):
        toy.reproduce_seeds(str(tmp_path), [0], lambda s: _tiny(s, "skip:2"), figures=False, log=lambda *a: None)
    old = json.loads((tmp_path / "seed-0" / "metrics.json").read_text())
    del old["settings"]["guide_recipe"]   # written before recipes existed: the paper's separate guide
    assert toy.Settings.from_json(old["settings"]).guide_recipe == "separate"


@pytest.mark.parametrize("argv,message", [
    (["--guide-recipe", "ensemble:2"], "--guide-recipe: unknown guide recipe 'ensemble'"),
    (["--guide-recipe", "skip:9"], "--guide-recipe: skip:K needs a hidden layer 1 <= K <= 4, got 9"),
    (["--guide-recipe", "sigma:0.5"], "--guide-recipe: sigma:F needs F > 1"),
    (["--guide-recipe", "snapshot:4096"], "--guide-recipe: snapshot:K needs 1 <= K < the main model's 4096"),
    (["--guide-recipe", "skip:1", "--guide-width", "16"], "shape the separate guide"),
])
def test_cli_refuses_bad_recipes_with_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["toy", "reproduce", "--out", str(out), "--quiet", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_cli_recipe_reaches_the_run(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(toy, "reproduce", lambda outdir, settings, **kw: seen.setdefault("s", settings))
    assert main(["toy", "reproduce", "--out", str(tmp_path / "r"), "--guide-recipe", "ema:0.05", "--quiet"]) == 0
    s = seen["s"]
    assert s.guide_recipe == "ema:0.05" and s.config("guide") == replace(s.config("main"), ema_sigma_rel=0.05)


def test_the_recipe_study_pairs_every_recipe_on_the_same_main_models(tmp_path, monkeypatch):
    study = load_experiment("toy_recipes")
    recipes = ("separate", "skip:1", "sigma:2", "dropout:0.5")
    study.run(str(tmp_path), [0], recipes, make_settings=lambda seed: _tiny(seed, "separate"), log=lambda *a: None)
    summaries = {r: json.loads((tmp_path / study.folder(r) / "summary.json").read_text()) for r in recipes}
    assert "main" in json.loads((tmp_path / "dropout-0.5" / "seed-0" / "metrics.json").read_text())["seconds"]["train"]
    for recipe in recipes[1:3]:
        for name in ("none", "cfg", "truncation"):   # the same main and unconditional models: the same bits
            assert toy.point(summaries[recipe], name) == toy.point(summaries["separate"], name)
        assert toy.point(summaries[recipe], "autoguidance") != toy.point(summaries["separate"], "autoguidance")
        trained = json.loads((tmp_path / study.folder(recipe) / "seed-0" / "metrics.json").read_text())["seconds"]["train"]
        assert "main" not in trained and "uncond" not in trained   # shared, not trained again
    assert sorted(json.loads((tmp_path / "seconds.json").read_text())) == sorted(recipes)
    # resumed: nothing runs again
    monkeypatch.setattr(toy, "reproduce", lambda *a, **k: pytest.fail("a finished seed ran again"))
    study.run(str(tmp_path), [0], recipes, make_settings=lambda seed: _tiny(seed, "separate"), log=lambda *a: None)


def test_the_recipe_report_pairs_changes_and_picks_by_its_rule(tmp_path):
    study = load_experiment("toy_recipes")
    recipes = ("separate", "skip:1")
    study.run(str(tmp_path), [0, 1], recipes, make_settings=lambda seed: _tiny(seed, "separate"), log=lambda *a: None)
    result = study.report(str(tmp_path), str(tmp_path / "r"), recipes)
    for name in ("r.json", "r.md", "r.png"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "skip-1" / "summary.json").read_text())
    c = result["curves"]["autoguidance, skip:1"]
    for i, w in enumerate(c["weights"]):   # the paired change, by hand from the per-seed values
        mine = toy.point(summary, "autoguidance", w)["metrics"]["outliers"]["per_seed"]
        base = toy.point(summary, "none")["metrics"]["outliers"]["per_seed"]
        assert c["outliers"]["change_mean"][i] == pytest.approx(np.mean(np.subtract(mine, base)))
        assert c["outliers"]["change_std"][i] == pytest.approx(np.std(np.subtract(mine, base), ddof=1))
    fake = dict(weights=[1, 2, 3], recall=dict(mean=[0.95, 0.92, 0.80]), outliers=dict(mean=[0.2, 0.1, 0.01]))
    assert study.best(fake) == 1   # the fewest outliers among recall >= 0.9, not the fewest overall
    fake["recall"]["mean"] = [0.5, 0.7, 0.6]
    assert study.best(fake) == 1   # none reaches the floor: the highest recall
    assert result["extra_training_iterations"] == {"autoguidance, separate": 4, "autoguidance, skip:1": 0,
                                                   "CFG": 4, "truncation": 0}
    assert "| autoguidance, skip:1 |" in (tmp_path / "r.md").read_text()
    assert result["network_evaluations_unguided"] == 2 * 3 - 1   # 3 Heun steps
    # the guide's error against main's, from each run's own models (skip:1 rebuilt from main)
    per_seed = []
    for seed in (0, 1):
        main_net, _ = load_toy(str(tmp_path / "skip-1" / f"seed-{seed}" / "models" / "main.safetensors"))
        per_seed.append(guides.error_alignment(main_net, main_net.weakened(skip=(1,)), toy2d.gmm("A"), seed=seed))
    for sigma in (0.01, 0.1, 1.0):
        got = result["curves"]["autoguidance, skip:1"]["error_alignment"][str(sigma)]
        assert got["cosine"] == pytest.approx(np.mean([a[sigma][0] for a in per_seed]))
        assert got["length_ratio"] == pytest.approx(np.mean([a[sigma][1] for a in per_seed]))


class _ScaledError:
    """A guide whose score error is k times the main model's, exactly."""

    def __init__(self, main, gmm, k):
        self.main, self.gmm, self.k = main, gmm, k

    def score(self, x, sigma):
        exact = self.gmm.score(x, sigma)
        return exact + self.k * (self.main.score(x, sigma) - exact)


@pytest.mark.parametrize("k", [2.0, -0.5])
def test_error_alignment_measures_direction_and_length(k):
    g = toy2d.gmm("A")
    main_net = _net(3)
    got = guides.error_alignment(main_net, _ScaledError(main_net, g, k), g, sigmas=(0.05, 0.5), n=256)
    for cosine, ratio in got.values():
        assert cosine == pytest.approx(1.0 if k > 0 else -1.0, abs=1e-5) and ratio == pytest.approx(abs(k), rel=1e-4)
