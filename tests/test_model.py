"""Parity with the official reference (golden fixtures), and the model's internal consistency."""

import numpy as np
import pytest
import torch

from tests import golden
from vl2edge.errors import CheckpointError
from vl2edge.generate import generate, prefill
from vl2edge.models.language import MLAttention
from vl2edge.models.loading import load_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def models():
    return {v: load_model(golden.model_dir(v), dtype="float32", device="cpu").model for v in golden.VARIANTS}


@pytest.mark.parametrize("variant", golden.VARIANTS)
@pytest.mark.parametrize("case", golden.CASES)
def test_prefill_logits_and_routing_match_the_reference(models, variant, case):
    m, exp = models[variant], golden.expected(variant, case)
    with golden.routing(m) as routed:
        logits = m.logits(*golden.model_args(case))[0].numpy()
    np.testing.assert_allclose(logits[exp["prefill_rows"]], exp["prefill_logits_rows"], rtol=0, atol=ATOL)
    assert routed
    for i, (idx, _) in routed.items():
        order = idx.argsort(dim=-1)
        got = idx.gather(1, order).numpy()
        np.testing.assert_array_equal(got, exp[f"routing.layer{i}.topk_idx"])  # the reference stores them sorted


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_vision_projector_and_embeddings_match(models, variant):
    m, exp = models[variant], golden.expected(variant, "square_384")
    ids, _, images, seq_mask, crop = golden.model_args("square_384")
    with torch.inference_mode():
        feats = m.vision(torch.from_numpy(images[0, :2]))
        proj = m.projector(feats)
    np.testing.assert_allclose(feats.numpy(), exp["vision_features"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(proj.numpy(), exp["projector_features"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(m.embed(ids, images, seq_mask, crop).numpy(), exp["inputs_embeds"], rtol=0, atol=ATOL)
    text = golden.processor_outputs("text_only")
    np.testing.assert_allclose(m.embed(text["input_ids"], text["images"], text["images_seq_mask"],
                                       text["images_spatial_crop"]).numpy(),
                               golden.expected(variant, "text_only")["inputs_embeds"], rtol=0, atol=0)


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_routing_weights_match(models, variant):
    m, exp = models[variant], golden.expected(variant, "portrait_360x1000")
    with golden.routing(m) as captured:
        m.logits(*golden.model_args("portrait_360x1000"))
    assert captured
    for i, (idx, w) in captured.items():
        order = idx.argsort(dim=-1)
        np.testing.assert_allclose(w.gather(1, order).numpy(), exp[f"routing.layer{i}.topk_weight"], atol=1e-5)


@pytest.mark.parametrize("variant", golden.VARIANTS)
@pytest.mark.parametrize("case", golden.CASES)
def test_greedy_generation_matches_the_reference(models, variant, case):
    m, exp = models[variant], golden.expected(variant, case)
    ids, att, images, seq_mask, crop = golden.model_args(case)
    embeds = m.embed(ids, images, seq_mask, crop)
    rec = golden.Recorder(m)
    toks = [int(t[0]) for t in generate(rec, embeds, att, max_new_tokens=8, eos_id=None, chunk_size=300)]
    assert toks == exp["gen_token_ids"].tolist()
    # the last prefill chunk gives step 0's logits, then 7 decode steps
    np.testing.assert_allclose(np.concatenate(rec.steps[-8:]), exp["gen_logits"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_cached_decode_equals_full_recompute(models, variant):
    m = models[variant]
    ids, att, images, seq_mask, crop = golden.model_args("landscape_1024x768")
    new = golden.expected(variant, "landscape_1024x768")["gen_token_ids"]
    full_ids = np.concatenate([ids, new[None]], axis=1)
    full = m.logits(full_ids, np.ones_like(full_ids, bool), images,
                    np.concatenate([seq_mask, np.zeros((1, 8), bool)], 1), crop)[0].numpy()
    cache = m.new_cache(1, full_ids.shape[1])
    step = [m.prefill(m.embed(ids, images, seq_mask, crop), cache, att)]
    step += [m.decode(np.array([t]), cache) for t in new[:-1]]
    np.testing.assert_allclose(np.concatenate(step), full[-9:-1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_chunked_prefill_equals_one_shot(models, variant):
    m = models[variant]
    ids, att, images, seq_mask, crop = golden.model_args("multi3_two_turns")
    embeds = m.embed(ids, images, seq_mask, crop)
    one = prefill(m, embeds, att, m.new_cache(1, ids.shape[1]), chunk_size=10_000)
    for chunk in (1000, 257, 31):
        np.testing.assert_allclose(prefill(m, embeds, att, m.new_cache(1, ids.shape[1]), chunk_size=chunk), one,
                                   rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant", golden.VARIANTS)
def test_left_padded_batch_equals_single_runs(models, variant):
    from vl2edge.processor import Processor

    m, proc = models[variant], Processor.from_pretrained(golden.model_dir(variant))
    outs = [proc(*golden.conversation(c)) for c in ("portrait_360x1000", "text_only")]
    batch = proc.collate(outs)
    blog = m.logits(batch.input_ids, batch.attention_mask, batch.images, batch.images_seq_mask,
                    batch.images_spatial_crop).numpy()
    T = batch.input_ids.shape[1]
    for b, o in enumerate(outs):
        single = m.logits(o.input_ids, o.attention_mask, o.images, o.images_seq_mask, o.images_spatial_crop)[0]
        np.testing.assert_allclose(blog[b, T - len(o):], single.numpy(), rtol=0, atol=ATOL)

    def run(inp):
        e = m.embed(inp.input_ids, inp.images, inp.images_seq_mask, inp.images_spatial_crop)
        return np.stack(list(generate(m, e, inp.attention_mask, max_new_tokens=6, eos_id=None)), axis=1)
    together = run(batch)
    for b, o in enumerate(outs):
        assert together[b].tolist() == run(o)[0].tolist()


def test_mla_absorbed_and_expanded_attention_agree(models, monkeypatch):
    m = models["base"]
    args = golden.model_args("portrait_360x1000")
    expanded = m.logits(*args)
    monkeypatch.setattr(MLAttention, "EXPAND_MIN_T", 10**9)
    absorbed = m.logits(*args)
    assert torch.allclose(expanded, absorbed, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["tiny", "base"])
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.1), ("float16", 0.05)])
def test_half_precision_tracks_float32(models, variant, dtype, tol):
    half = load_model(golden.model_dir(variant), dtype=dtype, device="cpu").model
    assert half.language.model.layers[1].mlp.experts.gate_proj.dtype == getattr(torch, dtype)
    args = golden.model_args("square_384")
    ref, got = models[variant].logits(*args)[0], half.logits(*args)[0]
    assert got.dtype == torch.float32
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < tol
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_loading_is_strict(tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(golden.model_dir("tiny"), tmp_path / "m")
    f = tmp_path / "m" / "model.safetensors"
    sd = load_file(f)
    del sd["language.model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"missing \(e.g. language.model.layers.1.mlp.experts.5.up_proj"):
        load_model(tmp_path / "m", device="cpu")
    sd["language.model.layers.1.mlp.experts.5.up_proj.weight"] = np.zeros((32, 65), np.float32)
    save_file(sd, f)
    with pytest.raises(CheckpointError, match=r"experts.5.up_proj.weight: file \[32, 65\] vs config \[32, 64\]"):
        load_model(tmp_path / "m", device="cpu")


def test_checkpoint_loads_once_and_without_attn_pool(models):
    m = models["tiny"]
    names = {n for n, _ in m.named_parameters()}
    assert not any("attn_pool" in n for n in names)
    assert all(not p.is_meta and not p.requires_grad for p in m.parameters())
    assert m.language.model.layers[1].mlp.experts.down_proj.shape == (8, 64, 32)
