"""Expert offloading: slot bookkeeping, prefetch, the placement plan, and results equal to resident runs."""

import pytest
import torch

from tests import golden
from vl2edge.errors import InputError
from vl2edge.generate import generate
from vl2edge.models.loading import load_model
from vl2edge.models.offload import CostModel, ExpertStore, OffloadedExperts, offload_stats, plan_placement
from vl2edge.placement import parse_bytes
from vl2edge.quant.format import QuantSpec
from vl2edge.quant.modules import QuantExperts


def _offloaded(experts, n_slots):
    return OffloadedExperts(ExpertStore(experts, pin=False), n_slots, device="cpu")


def test_lru_slots_hits_and_misses(dense):
    off = _offloaded(dense, 3)
    for e in (0, 1, 2):
        assert off.acquire(e, keep={e}) is not None
    assert off.stats.misses == 3 and off.resident() == [0, 1, 2]
    off.acquire(0, keep={0})                          # hit: 0 becomes most recent
    assert off.stats.hits == 1 and off.resident() == [1, 2, 0]
    off.acquire(5, keep={5})                          # evicts the least recently used (1)
    assert off.resident() == [2, 0, 5] and off.stats.misses == 4
    off.acquire(6, keep={6, 2})                       # prefers evicting one the current tokens do not need
    assert off.resident() == [2, 5, 6]
    assert off.stats.bytes_copied == 5 * off.layout.nbytes


def test_slot_contents_are_the_expert(dense):
    off = _offloaded(dense, 2)
    slot = off.acquire(4, keep={4})
    views = off.layout.views(off.slots[slot])
    assert torch.equal(views["gate_proj"], dense.gate_proj[4]) and torch.equal(views["down_proj"], dense.down_proj[4])
    x = torch.randn(3, 16)
    assert torch.equal(off.expert(4, x), dense.expert(4, x))


def test_prefetch_bookkeeping(dense):
    off = _offloaded(dense, 3)
    off.prefetch([7, 3, 1, 0])                        # at most n_slots, in order
    assert off.resident() == [7, 3, 1] and off.stats.prefetched == 3
    off.acquire(3, keep={3})
    off.acquire(2, keep={2})                          # a miss evicts the least recently used prefetch (7)
    assert off.stats.prefetch_used == 1 and off.stats.hits == 1 and off.resident() == [1, 3, 2]
    off.prefetch([1, 3, 2])                           # already resident: nothing copied
    assert off.stats.prefetched == 3
    off.prefetch([5, 1, 3])                           # never evicts one wanted experts for another
    assert set(off.resident()) == {1, 3, 5}
    assert offload_stats(torch.nn.ModuleList([off]))["prefetch_accuracy"] == pytest.approx(1 / 4)


def test_zero_slots_compute_from_cpu_memory(dense):
    off = _offloaded(dense, 0)
    x, idx, w = torch.randn(4, 16), torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]]), torch.rand(4, 2)
    assert torch.equal(off(x, idx, w), dense(x, idx, w)) and off.stats.cpu_computed == 8


def test_cost_model():
    cm = CostModel(link_GBps=25, cpu_GBps=15, cpu_flops=2e11)
    assert not cm.cpu_faster(7_000_000, rows=1, flops_per_row=6 * 1280 * 896)       # decode: copy
    assert not cm.cpu_faster(7_000_000, rows=500, flops_per_row=6 * 1280 * 896)     # prefill: GPU
    assert CostModel(link_GBps=2, cpu_GBps=30).cpu_faster(7_000_000, 1, 6 * 1280 * 896)  # slow link: CPU
    assert not CostModel(link_GBps=2, cpu_GBps=30, enabled=False).cpu_faster(7_000_000, 1, 10)


def test_quantized_experts_offload_identically():
    from vl2edge.models.experts import DenseExperts

    torch.manual_seed(1)
    dense = DenseExperts(6, 64, 32)
    for p in dense.stacks().values():
        p.copy_(torch.randn_like(p))
    q = QuantExperts.from_dense(dense, QuantSpec(4, 32, False))
    x, idx, w = torch.randn(5, 64), torch.tensor([[0, 5], [1, 2], [3, 4], [0, 2], [5, 1]]), torch.rand(5, 2)
    ref = q(x, idx, w)  # the "dequant" kernel: the math the offloaded copy uses
    assert not torch.equal(ref, dense(x, idx, w))  # it really is the quantized model
    assert torch.equal(_offloaded(q, 2)(x, idx, w), ref)


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_offloaded_runs_equal_resident_runs(variant):
    resident = load_model(golden.model_dir(variant), dtype="float32", device="cpu").model
    plan = plan_placement(resident, 10**12, 4096)
    fixed = plan.non_expert + plan.kv_cache + plan.workspace
    args = golden.model_args("landscape_1024x768")
    ref = resident.logits(*args)
    for frac in (0.5, 0.25, 0.125):
        slots = max(1, int(frac * plan.n_experts))
        m, got_plan = load_model(golden.model_dir(variant), dtype="float32", device="cpu",
                                 gpu_memory=fixed + slots * plan.moe_layers * plan.expert_bytes)
        assert got_plan is not None and got_plan.slots == slots
        assert torch.equal(m.logits(*args), ref)
        e = m.embed(args[0], *args[2:])
        toks = [int(t[0]) for t in generate(m, e, args[1], max_new_tokens=8, eos_id=None)]
        assert toks == golden.expected(variant, "landscape_1024x768")["gen_token_ids"].tolist()
        s = offload_stats(m)
        assert s["misses"] > 0 and s["bytes_copied"] > 0 and s["prefetched"] > 0


def test_plan_refuses_a_budget_without_room_for_the_non_expert_part():
    m = load_model(golden.model_dir("small"), dtype="float32", device="cpu").model
    with pytest.raises(InputError, match="cannot hold this model's non-expert part"):
        plan_placement(m, 2**20, 4096)
    p = plan_placement(m, 2**30, 4096)
    assert p.slots == p.n_experts and "100% of experts resident" in str(p)


def test_parse_bytes():
    assert parse_bytes("6GiB") == 6 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("8GB") == 8 * 10**9 and parse_bytes(1234) == 1234 and parse_bytes("1.5g") == int(1.5 * 2**30)
    for bad in ("lots", "-3GiB", "6 parsecs"):
        with pytest.raises(InputError, match="memory size"):
            parse_bytes(bad)


def test_cli_prints_the_plan_and_the_counters(capsys):
    from vl2edge import cli

    cli.main(["run", "--model", str(golden.model_dir("tiny")), "--prompt", "Hello there", "--max-new-tokens", "4",
              "--device", "cpu", "--gpu-memory", "300MiB"])
    err = capsys.readouterr().err
    assert "placement for a 0.29 GiB device budget" in err and "expert slots" in err
    assert "offload:" in err and "hit rate" in err
