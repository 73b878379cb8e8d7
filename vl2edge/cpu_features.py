"""What this CPU can do that changes which onnxruntime kernels are right for it (no torch, no onnxruntime)."""

from __future__ import annotations

import platform
from pathlib import Path


def u8s8_exact() -> bool:
    """Whether onnxruntime's MatMulInteger u8s8 is exact on this CPU. x86 without VNNI (AVX2 or AVX-512
    alone) multiplies with VPMADDUBSW, whose int16 pair sums saturate past 32767: u8 activations (0..255)
    times int8 weights up to 127 reach 64770. Measured on an AVX2-only AMD EPYC (2026-12-06): a random
    512x256 MatMulInteger off by 22 % of its largest output, the fixtures' int4-experts decoder 13 % off
    torch (rel-L2) against 1.2 % with its 8-bit linears on MatMulNBits; 7-bit weights (onnxruntime's
    `reduce_range`) were exact but 2.7 % off. VNNI (AVX512-VNNI, AVX-VNNI, AMX) and other architectures: exact."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")),
                     "").split()
    except OSError:
        return False
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))
