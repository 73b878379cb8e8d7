"""Shared fixtures. The tests pin the PyTorch backend for float checkpoints (VL2EDGE_BACKEND=torch; subprocesses
inherit it): what they check is the model, not the CPU default's ONNX cache, which test_export_cache.py tests
with its own cache directory. Caches (exports, optimized onnxruntime graphs) go to a temporary directory.
Without CUDA the Triton kernels run under Triton's interpreter: TRITON_INTERPRET is set here, before any
module (torch._dynamo among them) imports triton, which reads it once."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("VL2EDGE_BACKEND", "torch")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("VL2EDGE_CACHE", tempfile.mkdtemp(prefix="vl2edge-test-cache-"))  # never the user's cache

from vl2edge.models.experts import DenseExperts


@pytest.fixture
def dense():
    """8 random dense experts, hidden 16, intermediate 12."""
    torch.manual_seed(1)
    e = DenseExperts(8, 16, 12)
    for p in (e.gate_proj, e.up_proj, e.down_proj):
        p.copy_(torch.randn_like(p) * 0.3)
    return e
