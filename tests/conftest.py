import pytest
import torch

from vl2edge.models.experts import DenseExperts


@pytest.fixture
def dense():
    """8 random dense experts, hidden 16, intermediate 12."""
    torch.manual_seed(1)
    e = DenseExperts(8, 16, 12)
    for p in (e.gate_proj, e.up_proj, e.down_proj):
        p.copy_(torch.randn_like(p) * 0.3)
    return e
