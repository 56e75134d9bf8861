"""The machine a benchmark ran on, in words: every figure is named beside it."""
import os
import platform

import torch


def machine():
    """CPU model, cores, the widest vector ISA torch uses (AVX2, AVX512, ...) and whether the CPU
    has bf16 arithmetic (AVX-512 BF16): bf16 autocast is ~2x faster than fp32 with it, ~10x slower without."""
    name, flags = platform.processor() or platform.machine(), set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
        flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    isa = torch.backends.cpu.get_cpu_capability()
    bf16 = ", BF16" if "avx512_bf16" in flags else ""
    return f"{name}, {os.cpu_count()} cores, {isa}{bf16}" + ("" if "512" in isa else ", no AVX-512")
