"""benchmarks/gpu_check.sh --dry-run: the GPU check's code end to end on the CPU, tiny preset."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bf16 keeps 8 significant bits: each rounding is off by at most 2^-9 relative, 2^-9 / sqrt(3) RMS.
# The tiny network has ~20 layers on its longest path; with magnitudes held at 1 by construction
# their independent roundings add in quadrature: RMS ~ sqrt(20) 2^-9 / sqrt(3) ~ 0.005 of the output.
# We allow 4x that for the RMS, and 6 standard deviations of it for the largest of the ~500 entries.
BF16_RMS = 4 * math.sqrt(20) * 2.0 ** -9 / math.sqrt(3)
BF16_MAX = 6 * BF16_RMS


def test_dry_run_writes_a_complete_result(tmp_path):
    out = tmp_path / "image_gpu.json"
    real = os.path.join(ROOT, "benchmarks", "results", "image_gpu.json")
    before = os.stat(real).st_mtime_ns if os.path.exists(real) else None
    env = dict(os.environ, PYTHON=sys.executable)
    # A budget far above the seconds it needs: a loaded machine must not skip phases for time.
    done = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run", "--out", str(out),
                           "--budget-s", "400"], env=env, capture_output=True, text=True, timeout=460)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["torch"] and r["presets"] == {"xs": "tiny", "s": "tiny"}
    assert len(r["train"]) == 8 and {(t["precision"], t["compiled"]) for t in r["train"]} == {
        (p, c) for p in ("bf16", "fp16") for c in (False, True)}
    for t in r["train"]:
        if t["compiled"]:
            assert t["status"] == "skipped" and "--compile" in t["reason"]
        elif t["precision"] == "fp16" and t["status"] == "skipped":
            assert "fp16" in t["reason"]   # this torch cannot do fp16 + GradScaler on the CPU: said why
        else:
            assert t["status"] == "ok", t
            assert t["img_per_s"] > 0 and t["timed_steps"] >= 1 and t["all_finite"]
            assert math.isfinite(t["first_loss"]) and math.isfinite(t["last_loss"])
    s = r["sampling"]
    assert s["status"] == "ok" and s["img_per_s"] > 0 and s["finite"] and s["method"] == "autoguidance"
    a = r["bf16_vs_fp32"]
    assert a["status"] == "ok" and 0 < a["rms_rel"] < BF16_RMS and a["max_abs_rel"] < BF16_MAX, a
    o = r["fp16_overflow"]
    if o["status"] == "skipped":
        assert "fp16" in o["reason"]
    else:   # the overflowing step skipped, bit for bit, and the scale halved
        assert o["status"] == "ok" and o["state_unchanged"] and o["scale_halved"], o
    assert (os.stat(real).st_mtime_ns if os.path.exists(real) else None) == before   # never the real results


def test_help():
    env = dict(os.environ, PYTHON=sys.executable)
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    done = subprocess.run(["bash", script, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--dry-run" in done.stdout
