"""CUDA checks (marker `gpu`, left out of the default run; `pytest -m gpu` on a machine with a GPU).

On CUDA the offloaded experts take the paths the CPU tests cannot reach: pinned blobs, copies on a side
stream, events, the cost model's CPU fallback. These tests hold them to the resident model's answers.
"""

import numpy as np
import pytest
import torch

from tests import golden
from vl2edge.generate import generate
from vl2edge.models.loading import load_model
from vl2edge.models.offload import offload_stats, plan_placement

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_offloaded_equals_resident_on_cuda(variant):
    resident = load_model(golden.model_dir(variant), dtype="float32", device="cuda").model
    args = golden.model_args("landscape_1024x768")
    ref = resident.logits(*args).cpu()
    plan = plan_placement(resident, 10**12, 4096)
    fixed = plan.non_expert + plan.kv_cache + plan.workspace
    slots = max(1, plan.n_experts // 4)
    m, got_plan = load_model(golden.model_dir(variant), dtype="float32", device="cuda",
                             gpu_memory=fixed + slots * plan.moe_layers * plan.expert_bytes)
    assert got_plan is not None and got_plan.slots == slots
    torch.testing.assert_close(m.logits(*args).cpu(), ref, rtol=0, atol=1e-5)
    e = m.embed(args[0], *args[2:])
    toks = [int(t[0]) for t in generate(m, e, args[1], max_new_tokens=8, eos_id=None)]
    assert toks == golden.expected(variant, "landscape_1024x768")["gen_token_ids"].tolist()
    s = offload_stats(m)
    assert s["misses"] > 0 and s["prefetched"] > 0


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_bf16_on_cuda_tracks_the_float32_reference(variant):
    m = load_model(golden.model_dir(variant), dtype="bfloat16", device="cuda").model
    exp = golden.expected(variant, "square_384")
    got = m.logits(*golden.model_args("square_384"))[0].cpu().numpy()[exp["prefill_rows"]]
    ref = exp["prefill_logits_rows"]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


@pytest.mark.parametrize("variant", golden.VARIANTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_graph_replay_equals_the_eager_step(variant, dtype):
    """The captured CUDA graph of the static step against the same step run eagerly, token for token."""
    from vl2edge.models.decode_step import StaticDecoder

    m = load_model(golden.model_dir(variant), dtype=dtype, device="cuda").model
    args = golden.model_args("landscape_1024x768")
    e = m.embed(args[0], *args[2:])
    eager = list(generate(StaticDecoder(m, graph=False), e, args[1], max_new_tokens=16, eos_id=None))
    graphed = StaticDecoder(m, graph=True)
    for _ in range(2):  # the second request replays the graph captured for the first
        assert list(map(int, np.concatenate(list(generate(graphed, e, args[1], max_new_tokens=16, eos_id=None))))) \
            == list(map(int, np.concatenate(eager)))
    if dtype == "float32":
        exp = golden.expected(variant, "landscape_1024x768")["gen_token_ids"].tolist()
        assert list(map(int, np.concatenate(eager)))[:len(exp)] == exp


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_offloaded_graph_equals_resident_on_cuda(variant):
    """25 % of the experts in slots, the rest read in place from pinned memory by the kernel, hot set moving."""
    from vl2edge.models.decode_step import StaticDecoder
    from vl2edge.models.offload import offload

    m = load_model(golden.model_dir(variant), dtype="float32", device="cpu").model
    args = golden.model_args("landscape_1024x768")
    e = m.embed(args[0], *args[2:])
    ref = [int(t[0]) for t in generate(m, e, args[1], max_new_tokens=16, eos_id=None)]
    offload(m, "cuda", max(1, m.config.language_config.n_routed_experts // 4))
    got = [int(t[0]) for t in generate(StaticDecoder(m, graph=True), m.embed(args[0], *args[2:]), args[1],
                                       max_new_tokens=16, eos_id=None)]
    assert got == ref
    s = offload_stats(m)
    assert s["hits"] > 0 and s["misses"] > 0 and s["bytes_copied"] > 0


def test_int4_experts_graph_equals_eager_on_cuda():
    """Packed experts: the Triton kernel in the graph against the per-call dequantization path."""
    from vl2edge.models.decode_step import StaticDecoder

    m = load_model(golden.model_dir("small"), dtype="bfloat16", device="cuda", quant="int4-experts").model
    args = golden.model_args("landscape_1024x768")
    e = m.embed(args[0], *args[2:])
    ref = m.logits(*args)[0, -1].float().cpu()
    dec = StaticDecoder(m, graph=True)
    eager = [int(t[0]) for t in generate(m, e, args[1], max_new_tokens=12, eos_id=None)]
    got = [int(t[0]) for t in generate(dec, e, args[1], max_new_tokens=12, eos_id=None)]
    margin = torch.topk(ref, 2).values
    if float(margin[0] - margin[1]) > 0.05:  # greedy-identical where the first token's margin allows
        assert got[0] == eager[0]
    assert np.mean(np.array(got) == np.array(eager)) >= 0.75


def test_evicting_an_expert_whose_copy_is_in_flight_leaves_the_table_right():
    """Prefetch, then evict before the copies can have finished, many times: the device table must end equal to
    the host's slot map (an eviction that overtook its copy's table write would leave a stale slot)."""
    from vl2edge.models.experts import DenseExperts
    from vl2edge.models.offload import ExpertStore, OffloadedExperts

    g = torch.Generator().manual_seed(0)
    dense = DenseExperts(16, 1024, 2048)
    for p in dense.parameters():
        p.copy_(torch.randn(p.shape, generator=g))
    off = OffloadedExperts(ExpertStore(dense), 4, "cuda")
    rng = np.random.default_rng(0)
    for _ in range(200):
        off.prefetch([int(e) for e in rng.choice(16, 4, replace=False)])
        e = int(rng.integers(16))
        off.acquire(e, keep={e})
    torch.cuda.synchronize()
    assert [int(v) for v in off.table.cpu()] == [off.lru.get(e, -1) for e in range(16)]


def test_a_qlinear_of_partial_blocks_decodes_on_cuda():
    """in_features not a whole number of blocks (Tiny's dense 6848 at block 128): the GEMV cannot read it, the
    layer must fall back to dequantizing, not fail."""
    from vl2edge.quant.format import QuantSpec, dequantize
    from vl2edge.quant.modules import QLinear

    lin = torch.nn.Linear(6848, 256, bias=False)
    q = QLinear.from_linear(lin, QuantSpec(4, 128)).to("cuda")
    q.prepare(torch.bfloat16)
    x = torch.randn(1, 6848, device="cuda", dtype=torch.bfloat16)
    p = q.packed()
    ref = x.float() @ dequantize(q.spec, p["qweight"], p["scales"], None, K=6848).T
    torch.testing.assert_close(q(x).float(), ref, rtol=2e-2, atol=2e-2)
