"""Offloading under the static decode step: the device-side slot table, routing counts, the hot-set policy.

The step never asks the host which experts are resident; these tests hold it to the resident model's
tokens whatever the slots hold, keep the table equal to the host's slot map after every change, and check
the policy's choices (frequency with recency against LRU) on routing streams built to tell them apart.
"""

import numpy as np
import pytest
import torch

from tests import golden
from vl2edge.generate import generate
from vl2edge.models.decode_step import StaticDecoder
from vl2edge.models.hot_set import HotSet
from vl2edge.models.loading import load_model
from vl2edge.models.offload import Layout, OffloadedExperts, offload, offload_stats

CASE = "landscape_1024x768"


def _tables_agree(model) -> bool:
    layers = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    return bool(layers) and all(int(m.table[e]) == m.lru.get(e, -1) for m in layers for e in range(m.n_experts))


@pytest.mark.parametrize("variant", golden.VARIANTS)
@pytest.mark.parametrize("share", [0.25, 0.0])
def test_offloaded_static_decode_equals_resident(variant, share):
    model = load_model(golden.model_dir(variant), dtype="float32", device="cpu").model
    args = golden.model_args(CASE)
    embeds = model.embed(args[0], *args[2:])
    ref = [int(t[0]) for t in generate(model, embeds, args[1], max_new_tokens=16, eos_id=None)]
    slots = int(model.config.language_config.n_routed_experts * share)
    offload(model, "cpu", slots)
    got = [int(t[0]) for t in generate(StaticDecoder(model, graph=False), embeds, args[1], max_new_tokens=16,
                                       eos_id=None)]
    assert got == ref
    s = offload_stats(model)
    assert s["misses"] > 0 and (s["hits"] > 0) == (slots > 0)
    if slots:
        assert _tables_agree(model)


def test_offloaded_static_decode_of_packed_experts_equals_resident():
    model = load_model(golden.model_dir("small"), dtype="float32", device="cpu", quant="int4-experts",
                       kernel="dequant").model
    args = golden.model_args(CASE)
    embeds = model.embed(args[0], *args[2:])
    resident = StaticDecoder(model, graph=False)
    ref = [int(t[0]) for t in generate(resident, embeds, args[1], max_new_tokens=12, eos_id=None)]
    offload(model, "cpu", 4)
    got = [int(t[0]) for t in generate(StaticDecoder(model, graph=False), embeds, args[1], max_new_tokens=12,
                                       eos_id=None)]
    assert got == ref and _tables_agree(model)


def test_stacked_views_are_each_blobs_views():
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b.qweight": torch.randint(0, 255, (4, 2, 16), generator=g,
                                                                             dtype=torch.uint8)}
    layout = Layout(tensors)
    blobs = torch.zeros(3, layout.nbytes, dtype=torch.uint8)
    for i in range(3):
        layout.pack({k: v + i for k, v in tensors.items()}, blobs[i])
    stacked = layout.stacked_views(blobs)
    for i in range(3):
        for k, v in layout.views(blobs[i]).items():
            assert torch.equal(stacked[k][i], v) and torch.equal(v, tensors[k] + i)


def _stream(hot: HotSet, rows):
    """(routings served from slots, routings) per token of `rows` (each a token's expert ids)."""
    for r in rows:
        counts = np.bincount(r, minlength=hot.n_experts).astype(float)
        served = sum(counts[e] for e in hot.resident)
        admit, evict = hot.observe(counts)
        assert len(hot.resident) <= hot.n_slots and len(evict) <= len(admit)
        yield served, counts.sum()


def _hit_rate(policy, rows, n_experts=16, n_slots=4):
    served, total = np.sum(list(_stream(HotSet(n_experts, n_slots, policy), rows)), axis=0)
    return served / total


def test_frequency_keeps_a_hot_expert_that_recency_drops():
    """Experts 0 and 1 serve every third token; the two tokens between use three one-off experts each. LRU
    has filled its six slots with one-offs by the time 0 and 1 return; decayed frequency keeps them."""
    rng = np.random.default_rng(0)
    rows = [np.array([0, 1]) if i % 3 == 0 else rng.choice(np.arange(2, 64), 3, replace=False) for i in range(300)]
    lfru, lru = _hit_rate("lfru", rows, n_experts=64, n_slots=6), _hit_rate("lru", rows, n_experts=64, n_slots=6)
    assert lfru > lru + 0.15
    hot = HotSet(64, 6, "lfru")
    list(_stream(hot, rows))
    assert {0, 1} <= hot.resident


def test_the_last_tokens_experts_outrank_older_frequent_ones():
    """A token's experts are likely reused by the next: with 4 slots, after a burst of [0..3] and a token
    routed to [8..11], the newest four hold the slots (the bonus), not the older frequent ones."""
    hot = HotSet(16, 4, "lfru")
    for _ in range(3):
        hot.observe(np.bincount([0, 1, 2, 3], minlength=16).astype(float))
    hot.observe(np.bincount([8, 9, 10, 11], minlength=16).astype(float))
    assert hot.resident == {8, 9, 10, 11}


def test_recency_wins_when_the_working_set_moves():
    """A working set that jumps to new experts: both policies follow it within a few tokens."""
    rows = [np.array([0, 1, 2, 3])] * 30 + [np.array([8, 9, 10, 11])] * 30
    for policy in ("lfru", "lru"):
        hot = HotSet(16, 4, policy)
        list(_stream(hot, rows))
        assert hot.resident == {8, 9, 10, 11}, policy


def test_hot_set_limits_swaps_and_fills_free_slots_first():
    hot = HotSet(16, 6, "lfru", max_swaps=2)
    admit, evict = hot.observe(np.bincount([0, 1, 2, 3, 4], minlength=16).astype(float))
    assert admit == [0, 1] and evict == []  # free slots, at most two a token
    hot.sync({0, 1, 2, 3, 4, 5})            # the prefill placed six residents, 5 never routed
    admit, evict = hot.observe(np.bincount([9, 9, 9], minlength=16).astype(float))
    assert admit == [9] and evict == [5]    # the never-routed resident goes first
    with pytest.raises(ValueError, match="policy"):
        HotSet(4, 2, "mru")
