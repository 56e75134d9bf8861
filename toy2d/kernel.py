"""The fused exact-score kernel (score_kernel.c), built on first use.

The torch code in fractal.py is the reference: exact in float64, any device.
For float32 on the CPU, where the toy spends most of its training time, one C
loop that never writes the [N, K] logits to memory is about 2.7x faster
(benchmarks/bench_toy.py). It is
compiled once with the system's C compiler into a cache folder (no code is
ever downloaded or loaded from elsewhere). Where that is not possible, or
MINI_AUTOGUIDE_NO_KERNEL=1 is set, `load()` returns None and fractal.py uses
its torch code.
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "score_kernel.c")
# -ffast-math lets gcc call glibc's vectorised expf; the kernel has no NaN or
# infinity to care for (logits are clamped before exp).
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared"]
_STATE = {}


def _cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "mini_autoguide")


def _build():
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with open(SOURCE, "rb") as f:
        source = f.read()
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):  # -march=native: one build per CPU model
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("model name")), "")
    key = hashlib.sha256(source + " ".join([compiler, *FLAGS, cpu, sys.platform]).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"score_kernel-{key}.so")
    if not os.path.exists(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
        os.close(fd)
        try:
            subprocess.run([compiler, *FLAGS, SOURCE, "-o", tmp, "-lm"], check=True, capture_output=True)
            os.replace(tmp, path)  # atomic: a concurrent build never sees half a file
        except (OSError, subprocess.CalledProcessError):
            os.unlink(tmp)
            return None
    lib = ctypes.CDLL(path)
    lib.gmm_score.restype = None
    return lib


def load():
    """The compiled library, or None where the torch code must serve."""
    if os.environ.get("MINI_AUTOGUIDE_NO_KERNEL", "") not in ("", "0"):
        return None
    if "lib" not in _STATE:
        try:
            _STATE["lib"] = _build()
        except OSError:
            _STATE["lib"] = None
    return _STATE["lib"]


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def score(lib, co, group, x, s, want_score=True):
    """Exact (logp [n], score [n, 2] or None) for float32 CPU x: [n, 2], s = sigma^2: [n].

    co: fractal.py's float32 coefficients. Points are split across
    torch.get_num_threads() threads (ctypes releases the GIL)."""
    x, s = x.contiguous(), s.contiguous()
    n = x.shape[0]
    logp = torch.empty(n, dtype=torch.float32)
    out = torch.empty(n, 2, dtype=torch.float32) if want_score else None
    arrays = [co[k].contiguous() for k in ("abc", "center", "v0", "v1", "vadj", "vv", "logw")]
    blocks = co["v0"].shape[1]

    def run(lo, hi):
        if hi > lo:
            lib.gmm_score(ctypes.c_int(hi - lo), _ptr(x[lo:hi]), _ptr(s[lo:hi]),
                          ctypes.c_int(group), ctypes.c_int(blocks), *map(_ptr, arrays),
                          _ptr(logp[lo:hi]), _ptr(out[lo:hi]) if want_score else None)

    threads = max(1, min(torch.get_num_threads(), n // 256))
    if threads == 1:
        run(0, n)
    else:
        bounds = [n * i // threads for i in range(threads + 1)]
        if _STATE.get("pool_size", 0) < threads:
            _STATE["pool"], _STATE["pool_size"] = ThreadPoolExecutor(threads), threads
        list(_STATE["pool"].map(run, bounds[:-1], bounds[1:]))
    return logp, out
