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
