"""The toy's two C kernels, built on first use.

score_kernel.c: the fractal's exact log-density and score. The torch code in
fractal.py is the reference: exact in float64, any device. For float32 on the
CPU, where the toy spends much of its training time, one C loop that never
writes the [N, K] logits to memory is several times faster (benchmarks/bench_toy.py).

mlp_kernel.c: the toy MLP's score and its weight gradient (model.py's _Score),
a tile of points at a time, for float32 and float64 on the CPU; built once per
network width. _Score's torch code is the fallback, autograd the reference.

Both are compiled once with the system's C compiler into a cache folder (no
code is ever downloaded or loaded from elsewhere) and run on torch's threads
(ctypes releases the GIL); benchmarks/bench_toy.py times them against the
torch code. Where compiling is not possible, or MINI_AUTOGUIDE_NO_KERNEL=1 is
set, `load()` and `load_mlp()` return None and the torch code runs.
"""
import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "score_kernel.c")
# -ffast-math lets gcc call glibc's vectorised expf; the kernel has no NaN or
# infinity to care for (logits are clamped before exp).
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared"]
_STATE = {}
_LOCAL = threading.local()


def _cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "mini_autoguide")


def _build(source_path, defines=()):
    """Compile source_path (with -D defines) into the cache once; the loaded library or None."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with open(source_path, "rb") as f:
        source = f.read()
    cpu = ""
    if os.path.exists("/proc/cpuinfo"):  # -march=native: one build per CPU model
        with open("/proc/cpuinfo") as f:
            cpu = next((line for line in f if line.startswith("model name")), "")
    flags = [*FLAGS, *(f"-D{d}" for d in defines)]
    key = hashlib.sha256(source + " ".join([compiler, *flags, cpu, sys.platform]).encode()).hexdigest()[:16]
    name = os.path.splitext(os.path.basename(source_path))[0]
    path = os.path.join(_cache_dir(), f"{name}-{key}.so")
    if not os.path.exists(path):
        os.makedirs(_cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, source_path, "-o", tmp, "-lm"], check=True, capture_output=True)
            os.replace(tmp, path)  # atomic: a concurrent build never sees half a file
        except (OSError, subprocess.CalledProcessError):
            os.unlink(tmp)
            return None
    return ctypes.CDLL(path)


def _disabled():
    return os.environ.get("MINI_AUTOGUIDE_NO_KERNEL", "") not in ("", "0")


def load():
    """The compiled exact-score library, or None where the torch code must serve."""
    if _disabled():
        return None
    if "lib" not in _STATE:
        try:
            _STATE["lib"] = _build(SOURCE)
        except OSError:
            _STATE["lib"] = None
    return _STATE["lib"]


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def score(lib, co, group, x, s, want_score=True):
    """Exact (logp [n], score [n, 2] or None) for float32 CPU x: [n, 2], s = sigma^2: [n].

    co: fractal.py's float32 coefficients. Points are split across threads (`_split`)."""
    x, s = x.contiguous(), s.contiguous()
    n = x.shape[0]
    logp = torch.empty(n, dtype=torch.float32)
    out = torch.empty(n, 2, dtype=torch.float32) if want_score else None
    if "kernel" not in co:
        co["kernel"] = _padded(co)
    arrays = co["kernel"]
    blocks = arrays[2].shape[1]

    def run(_, lo, hi):
        if hi > lo:
            lib.gmm_score(ctypes.c_int(hi - lo), _ptr(x[lo:hi]), _ptr(s[lo:hi]),
                          ctypes.c_int(group), ctypes.c_int(blocks), *map(_ptr, arrays),
                          _ptr(logp[lo:hi]), _ptr(out[lo:hi]) if want_score else None)

    _split(run, n)
    return logp, out


def _padded(co):
    """The coefficients with the number of groups padded to a multiple of 8,
    so that the kernel's loops run in whole vectors. A padding group has a
    harmless covariance (identity) and log-weight -1e30: its logits sit far
    below the clamp at -80, and e^-80 is nothing next to the peak's e^0."""
    blocks = co["v0"].shape[1]
    extra = -blocks % 8

    def pad(t, fill):   # [..., blocks] -> [..., blocks + extra]
        return torch.cat([t, t.new_full((*t.shape[:-1], extra), fill)], -1).contiguous()
    abc = torch.cat([co["abc"], torch.tensor([[1.0], [0.0], [1.0]], dtype=co["abc"].dtype).expand(3, extra)], 1)
    center = pad(co["center"].t(), 0.0).t()
    return [abc.contiguous(), center.contiguous()] + [pad(co[k], 0.0) for k in ("v0", "v1", "vadj", "vv")] + \
        [pad(co["logw"], -1e30)]


def threads_to_use():
    """The kernels' threads: torch's, what `cores_to_kernels` lent them, or 1
    in a worker or idle thread."""
    return max(1, getattr(_LOCAL, "threads", None) or _STATE.get("threads") or torch.get_num_threads())


def worker_thread():
    """Initializer of a ThreadPoolExecutor whose threads work side by side,
    one core each: their kernels run on the thread alone."""
    _LOCAL.threads = 1


def idle_thread():
    """Initializer of a ThreadPoolExecutor for work done in the gaps of the
    main work (train.py's next batches): its kernels run on the thread alone,
    and it runs only where a core would otherwise idle (Linux's SCHED_IDLE;
    elsewhere at normal priority)."""
    worker_thread()
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass


@contextlib.contextmanager
def cores_to_kernels(enabled=True):
    """Within: torch runs on one thread and the kernels on torch's threads.

    After each parallel op torch's OpenMP threads spin, waiting for more work,
    on the very cores the kernels' threads are about to use; with the heavy
    work in the kernels, what torch has left (small tensors) runs as fast on
    one thread. Where no kernel serves (or not enabled), nothing changes."""
    if not enabled or load() is None or "threads" in _STATE:
        yield
        return
    threads = torch.get_num_threads()
    _STATE["threads"] = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        del _STATE["threads"]


def _split(run, n, min_rows=256):
    """run(index, lo, hi) over threads_to_use() row ranges, in parallel
    (ctypes releases the GIL); returns the number of ranges."""
    threads = max(1, min(threads_to_use(), n // min_rows))
    if threads == 1:
        run(0, 0, n)
        return 1
    bounds = [n * i // threads for i in range(threads + 1)]
    if _STATE.get("pool_size", 0) < threads:
        _STATE["pool"], _STATE["pool_size"] = ThreadPoolExecutor(threads), threads
    list(_STATE["pool"].map(run, range(threads), bounds[:-1], bounds[1:]))
    return threads


# ---- the toy MLP's score (mlp_kernel.c) ------------------------------------------
MLP_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mlp_kernel.c")
_REAL = {torch.float32: "float", torch.float64: "double"}


def load_mlp(width, dtype):
    """The MLP kernel compiled for this width and dtype, or None (torch serves)."""
    if _disabled() or dtype not in _REAL or width % 8:
        return None
    key = ("mlp", width, dtype)
    if key not in _STATE:
        try:
            _STATE[key] = _build(MLP_SOURCE, [f"WIDTH={width}", f"REAL={_REAL[dtype]}"])
        except OSError:
            _STATE[key] = None
    return _STATE[key]


def mlp_score(lib, x, sigma, gain, sigma_data, w0, w, save):
    """model.py's _Score forward in C. x: [N, 2], sigma: [N], w0: [n, 4],
    w: [L, n, n], all contiguous, one dtype, on the CPU. Returns the score
    [N, 2] and, when save, the pre-activations h [L+1, N, n] and a [L, N, n]."""
    n, L, width = x.shape[0], w.shape[0], w0.shape[0]
    real = ctypes.c_double if x.dtype == torch.float64 else ctypes.c_float
    score = torch.empty_like(x)
    hs = torch.empty(L + 1, n, width, dtype=x.dtype) if save else None
    alphas = torch.empty(L, n, width, dtype=x.dtype) if save else None

    def run(_, lo, hi):
        lib.mlp_forward(lo, hi, n, L, _ptr(x), _ptr(sigma), real(gain), real(sigma_data), _ptr(w0), _ptr(w),
                        _ptr(score), _ptr(hs) if save else None, _ptr(alphas) if save else None)
    _split(run, n)
    return score, hs, alphas


def mlp_score_backward(lib, x, sigma, gain, sigma_data, w0, w, hs, alphas, e):
    """model.py's _Score backward in C: (dLoss/dw0, dLoss/dw, dLoss/dgain) for
    e = dLoss/dscore [N, 2], given mlp_score's saved h and a."""
    n, L, width = x.shape[0], w.shape[0], w0.shape[0]
    real = ctypes.c_double if x.dtype == torch.float64 else ctypes.c_float
    # One accumulator per thread, each small enough that torch fills and adds it
    # on one thread: a parallel torch op leaves its OpenMP threads spinning on
    # the cores the kernel's threads are about to use.
    acc = [(torch.zeros(width, 4, dtype=x.dtype), torch.zeros(L, width, width, dtype=x.dtype),
            torch.zeros(1, dtype=x.dtype)) for _ in range(threads_to_use())]

    def run(t, lo, hi):
        g0, g, gg = acc[t]
        lib.mlp_backward(lo, hi, n, L, _ptr(x), _ptr(sigma), real(gain), real(sigma_data), _ptr(w0), _ptr(w),
                         _ptr(hs), _ptr(alphas), _ptr(e), _ptr(g0), _ptr(g), _ptr(gg))
    used = _split(run, n)
    g0, g, gg = acc[0]
    for more in acc[1:used]:
        g0, g, gg = g0 + more[0], g + more[1], gg + more[2]
    return g0, g, gg[0]
