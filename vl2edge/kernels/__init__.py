"""Triton kernels for the CUDA decode path: packed (and float) weights read in place, no host sync.

`vl2edge.kernels.moe` is the routed experts of a decode step; `vl2edge.kernels.linear` the 4/8-bit GEMV for
dense linears; `vl2edge.kernels.dequant` the in-register dequantization both share. `available()` says
whether triton can be imported (CUDA builds of torch bring it on Linux; where it is missing, the callers
fall back to torch ops). Importing the submodules imports triton.
"""

from __future__ import annotations

import functools
import importlib.util


@functools.cache
def available() -> bool:
    """Whether the kernels can run here (triton importable)."""
    return importlib.util.find_spec("triton") is not None
