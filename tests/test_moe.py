"""The router's branches and the experts seam, checked against their definitions."""

import pytest
import torch

from vl2edge.models import experts as experts_mod
from vl2edge.models.experts import DenseExperts
from vl2edge.models.language import MoEGate
from vl2edge.presets import tiny


def _gate(**lm):
    c = tiny("mla-noaux").replace(language_config=lm).language_config
    g = MoEGate(c)
    torch.manual_seed(0)
    g.weight.copy_(torch.randn_like(g.weight))
    if hasattr(g, "e_score_correction_bias"):
        g.e_score_correction_bias.copy_(torch.randn_like(g.e_score_correction_bias) * 0.3)
    return g, c


def test_softmax_greedy_weights_are_the_top_probabilities():
    g, c = _gate(topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0)
    x = torch.randn(50, c.hidden_size)
    idx, w = g(x)
    p = torch.softmax(x @ g.weight.T, -1)
    assert torch.equal(idx.sort(-1).values, p.topk(c.num_experts_per_tok, -1).indices.sort(-1).values)
    assert torch.allclose(w, p.gather(1, idx), atol=1e-6)


def test_noaux_tc_selects_with_bias_and_weights_without_it():
    g, c = _gate()
    x = torch.randn(200, c.hidden_size)
    idx, w = g(x)
    s = torch.sigmoid(x @ g.weight.T)
    choice = s + g.e_score_correction_bias
    per_group = c.n_routed_experts // c.n_group
    for t in range(x.shape[0]):
        groups = choice[t].view(c.n_group, per_group).topk(2, -1).values.sum(-1).topk(c.topk_group).indices
        allowed = torch.cat([torch.arange(gi * per_group, (gi + 1) * per_group) for gi in groups.tolist()])
        best = allowed[choice[t, allowed].topk(c.num_experts_per_tok).indices]
        assert set(idx[t].tolist()) == set(best.tolist())
    expect = s.gather(1, idx)
    expect = expect / expect.sum(-1, keepdim=True) * c.routed_scaling_factor
    assert torch.allclose(w, expect, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.full((x.shape[0],), 2.0), atol=1e-5)


def test_group_limited_greedy_stays_in_the_best_groups():
    g, c = _gate(topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
                 routed_scaling_factor=1.0)
    x = torch.randn(100, c.hidden_size)
    idx, w = g(x)
    p = torch.softmax(x @ g.weight.T, -1)
    per_group = c.n_routed_experts // c.n_group
    best_groups = p.view(-1, c.n_group, per_group).max(-1).values.topk(c.topk_group, -1).indices
    assert all(set((idx[t] // per_group).tolist()) <= set(best_groups[t].tolist()) for t in range(len(x)))
    assert torch.allclose(w, p.gather(1, idx), atol=1e-6)


def _naive(e, x, idx, w):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            k = int(idx[t, j])
            h = torch.nn.functional.silu(x[t] @ e.gate_proj[k].T) * (x[t] @ e.up_proj[k].T)
            out[t] += w[t, j] * (h @ e.down_proj[k].T)
    return out


@pytest.mark.parametrize("T", [1, 3, 40])
def test_experts_dispatch_equals_the_per_token_definition(dense, T):
    x = torch.randn(T, 16)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(T)])
    w = torch.rand(T, 3)
    assert torch.allclose(dense(x, idx, w), _naive(dense, x, idx, w), atol=1e-5)


def test_decode_and_prefill_paths_agree_and_touch_only_active_experts(dense, monkeypatch):
    x = torch.randn(5, 16)
    idx = torch.tensor([[0, 2, 5]] * 5)
    w = torch.rand(5, 3)
    calls = []
    real = DenseExperts.expert
    monkeypatch.setattr(DenseExperts, "expert", lambda self, k, h: calls.append(k) or real(self, k, h))
    grouped = dense(x, idx, w)  # 15 pairs: the decode path
    assert set(calls) == {0, 2, 5}
    calls.clear()
    monkeypatch.setattr(experts_mod, "DECODE_MAX_ROWS", 0)
    assert torch.allclose(dense(x, idx, w), grouped, atol=1e-6)
    assert sorted(calls) == [0, 2, 5]  # prefill: each active expert runs once on its rows
