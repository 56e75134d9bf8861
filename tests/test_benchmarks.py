"""The benchmark scripts run: their smallest setting, end to end, in a subprocess (speed is not asserted)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_image_runs_every_mode_on_the_tiny_preset(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_image.py"), "--presets", "tiny",
                        "--steps", "1", "--repeats", "1", "--heun-steps", "2", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "image_cpu.json") as f:
        result = json.load(f)
    modes = [row["mode"] for row in result["rows"]]
    assert modes[0] == "fp32 (baseline)" and len(modes) == 3
    assert all(row["train_img_s"] > 0 and row["sample_img_s"] > 0 for row in result["rows"])
    assert result["machine"] in r.stdout and "cores" in result["machine"]  # every figure names its machine
    assert result["rows"][0]["train_speedup"] == 1.0  # ratios are against the baseline of the same run


def test_bench_toy_starts():
    # its shortest run takes about a minute: here only that it imports and parses its options
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_toy.py"), "--help"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "--full" in r.stdout, r.stderr[-2000:]
