"""The static decode step (vl2edge/models/decode_step.py): one graph, no host synchronisation, same answers.

What a CUDA graph needs is proven here on the CPU: the step compiles as one graph with zero graph breaks
and no recompilation across positions (`torch._dynamo` counters), never reads a device value on the
host, and its logits and tokens equal the eager model's on the Tiny-, Small- and Base-like fixtures.
Graph replay itself is checked on a GPU (tests/test_gpu.py).
"""

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from tests import golden
from vl2edge.generate import generate
from vl2edge.models import decode_step
from vl2edge.models.decode_step import MIN_POSITIONS, DecodeStep, StaticDecoder, allocation
from vl2edge.models.experts import DenseExperts
from vl2edge.models.loading import load_model
from vl2edge.quant.format import QuantSpec
from vl2edge.quant.modules import QuantExperts

CASE = "landscape_1024x768"
STEPS = 32


def _model(variant):
    return load_model(golden.model_dir(variant), dtype="float32", device="cpu").model


def _prompt(model):
    args = golden.model_args(CASE)
    return model.embed(args[0], *args[2:]), args[1]


def _eager_run(model, embeds, mask, tokens):
    """Logits of each decode step of the reference path (VL2Model.decode) fed `tokens`."""
    cache = model.new_cache(1, mask.shape[1] + len(tokens) + 1)
    model.prefill(embeds, cache, mask)
    return [model.decode([t], cache) for t in tokens]


@pytest.mark.parametrize("variant,backend", [("tiny", "inductor"), ("small", "aot_eager"), ("base", "aot_eager")])
def test_step_compiles_to_one_graph_and_matches_eager(variant, backend):
    model = _model(variant)
    embeds, mask = _prompt(model)
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, model.config.language_config.vocab_size, STEPS)]
    ref = _eager_run(model, embeds, mask, tokens)
    cache = model.new_cache(1, 2 * MIN_POSITIONS)
    model.prefill(embeds, cache, mask)
    step = DecodeStep(model.language, cache)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(step.run, fullgraph=True, backend=backend)
    with torch.no_grad():
        for i, t in enumerate(tokens):
            step.cursor.fill_(cache.length)
            got = compiled(torch.tensor([[t]])).numpy()
            cache.commit(1)
            np.testing.assert_allclose(got, ref[i], rtol=0, atol=2e-4 * np.abs(ref[i]).max(), err_msg=f"step {i}")
            assert got.argmax() == ref[i].argmax()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1  # every position replays the same graph: no recompilation


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_static_decoder_generates_the_reference_tokens(variant):
    model = _model(variant)
    embeds, mask = _prompt(model)
    dec = StaticDecoder(model, graph=False)
    exp = golden.expected(variant, CASE)["gen_token_ids"].tolist()
    for _ in range(2):  # the second request reuses the first one's cache: it must start empty
        got = [int(t[0]) for t in generate(dec, embeds, mask, max_new_tokens=len(exp), eos_id=None)]
        assert got == exp


def test_static_decoder_rows_at_different_positions_equal_single_rows():
    """Two prompts of different lengths, left-padded into one batch: each row's tokens are its own."""
    model = _model("small")
    ids = golden.model_args(CASE)[0][0]
    short, long_ = ids[:40], ids[:57]
    single = []
    for p in (short, long_):
        e = model.embed(p[None])
        single.append([int(t[0]) for t in generate(model, e, np.ones((1, len(p)), bool), max_new_tokens=12,
                                                   eos_id=None)])
    batch = np.zeros((2, len(long_)), np.int64)
    mask = np.zeros((2, len(long_)), bool)
    batch[0, -len(short):], mask[0, -len(short):] = short, True
    batch[1], mask[1] = long_, True
    toks = list(generate(StaticDecoder(model, graph=False), model.embed(batch), mask, max_new_tokens=12,
                         eos_id=None))
    assert [[int(t[r]) for t in toks] for r in range(2)] == single


def test_step_never_reads_device_values_on_the_host(monkeypatch):
    """The reference path reads routing on the host (it must fail here); the static step must not."""
    model = _model("base")
    embeds, mask = _prompt(model)
    cache = model.new_cache(1, 2 * MIN_POSITIONS)
    model.prefill(embeds, cache, mask)
    step = DecodeStep(model.language, cache)

    def refuse(*_a, **_k):
        raise AssertionError("host synchronisation")

    for name in ("tolist", "item", "__bool__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.no_grad():
        step.cursor.fill_(cache.length)
        out = step.run(torch.tensor([[3]]))
        with pytest.raises(AssertionError, match="host synchronisation"):
            model.language(model.language.embed(torch.tensor([[3]])), cache, None, last_only=True)
    monkeypatch.undo()
    assert out.shape == (1, model.config.language_config.vocab_size) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("kernel", ["dequant", "dense"])
@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_quantized_experts_static_path_equals_the_per_pair_path(kernel, bits, symmetric):
    g = torch.Generator().manual_seed(bits * 10 + symmetric)
    E, D, I, T, A = 8, 64, 32, 2, 3
    dense = DenseExperts(E, D, I)
    for p in dense.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    q = QuantExperts.from_dense(dense, QuantSpec(bits=bits, block_size=32, symmetric=symmetric))
    q.prepare(torch.float32, kernel=kernel)
    x = torch.randn(T, D, generator=g)
    idx = torch.tensor([[1, 5, 1], [7, 0, 3]])  # a repeated expert within one token's top-k
    w = torch.rand(T, A, generator=g)
    torch.testing.assert_close(q.forward_static(x, idx, w), q(x, idx, w), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dense.forward_static(x, idx, w), dense(x, idx, w), rtol=1e-5, atol=1e-6)


def test_int4pack_experts_refuse_the_static_path():
    dense = DenseExperts(4, 64, 32)
    torch.nn.init.normal_(dense.gate_proj), torch.nn.init.normal_(dense.up_proj), torch.nn.init.normal_(dense.down_proj)
    q = QuantExperts.from_dense(dense, QuantSpec(bits=4, block_size=32))
    q.prepare(torch.bfloat16, kernel="int4pack")
    with pytest.raises(NotImplementedError, match="int4pack"):
        q.forward_static(torch.zeros(1, 64), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
    assert not q.static_ready


def test_supports_names_the_layouts_without_a_static_path():
    assert StaticDecoder.supports(_model("tiny"))
    model = load_model(golden.model_dir("tiny"), dtype="bfloat16", device="cpu", quant="int4-experts").model
    assert not StaticDecoder.supports(model)  # the CPU int4 kernel: pipeline.load keeps the eager decode


def test_cache_allocation_and_full_cache(monkeypatch):
    assert allocation(10, 4096) == MIN_POSITIONS
    assert allocation(MIN_POSITIONS + 1, 4096) == 2 * MIN_POSITIONS
    assert allocation(3000, 4096) == 4096 and allocation(3000, 2500) == 3000  # never below the request
    model = _model("tiny")
    dec = StaticDecoder(model, graph=False)
    first = dec.new_cache(1, 10)
    assert dec.new_cache(1, 20) is first and dec.new_cache(1, MIN_POSITIONS + 1) is not first
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model, graph=True)
    monkeypatch.setattr(decode_step, "MIN_POSITIONS", 4)
    small = dec.new_cache(2, 3)
    assert small.max_len == 4
    for _ in range(small.max_len):
        dec.decode([1, 2], small)
    with pytest.raises(ValueError, match="KV cache full"):
        dec.decode([1, 2], small)
