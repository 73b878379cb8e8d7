"""The prefix cache (vl2edge/prefix_cache.py): a hit changes no answer, a changed image or turn never hits.

On the golden fixtures (Tiny-like MHA and Base-like MLA), PyTorch and ONNX Runtime (GroupQueryAttention and
concatenating graphs): a follow-up turn, and the same picture in a new conversation, answer exactly as a
pipeline without the cache does, alone and joining a running batch; the hit skips the vision tower; the
budget holds under a stream of distinct prompts.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests import golden
from vl2edge.errors import InputError
from vl2edge.export.build import export
from vl2edge.pipeline import load
from vl2edge.prefix_cache import PrefixCache, parse_budget, prompt_key

QUESTION = "<image>\nWhat is in this picture?"
NEW = 10


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """Per (backend, variant): a pipeline with the cache and one without."""
    root = tmp_path_factory.mktemp("prefix")
    out = {}
    for v in ("tiny", "base"):
        onnx_dir = export(golden.model_dir(v), root / v, "float32", vision="float", progress=False)
        for kind in ("torch", "onnx"):
            def make(kind=kind, v=v, onnx_dir=onnx_dir):
                if kind == "torch":
                    return load(golden.model_dir(v), backend="torch", dtype="float32", device="cpu")
                return load(onnx_dir, threads=2)
            out[kind, v] = (make(), make())
            out[kind, v][0].use_prefix_cache("256MiB")
            out[kind, v][1].use_prefix_cache(0)
    return out


CASES = [(k, v) for k in ("torch", "onnx") for v in ("tiny", "base")]


def _picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (300, 420, 3), dtype=np.uint8))


def _ask(pipe, messages, images):
    r = pipe.chat(messages, images, max_new_tokens=NEW)
    return r.token_ids, r.cached_tokens


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_a_follow_up_and_a_new_conversation_answer_as_without_the_cache(pipes, case):
    cached, plain = pipes[case]
    picture = _picture(1)
    first = [{"role": "user", "content": QUESTION}]
    ids, hit = _ask(cached, first, [picture])
    assert hit == 0 and ids == _ask(plain, first, [picture])[0]
    answer = cached.processor.decode(ids)
    follow = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And the colours?"}]
    ids2, hit2 = _ask(cached, follow, [picture])
    T1 = cached.processor(first, [picture]).input_ids.shape[1]
    assert hit2 >= T1 - 2  # the whole first prompt (but the two positions a prompt always prefills)
    assert ids2 == _ask(plain, follow, [picture])[0]
    other = [{"role": "user", "content": "<image>\nDescribe it in one word."}]
    ids3, hit3 = _ask(cached, other, [picture])  # the same picture, another question: the image is cached
    n_image = int(cached.processor(other, [picture]).images_seq_mask[0].sum())
    assert hit3 > n_image and ids3 == _ask(plain, other, [picture])[0]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_rows_joining_a_running_batch_take_their_cached_prefix(pipes, case):
    import threading

    cached, plain = pipes[case]
    picture = _picture(2)
    base = [{"role": "user", "content": QUESTION}]  # nothing stored yet: each joiner finds what those before stored
    questions = ["Is it a photo?", "How many colours?", "What is on the left?", "Name one shape."]
    asks = [base + [{"role": "assistant", "content": "A picture."}, {"role": "user", "content": q}]
            for q in questions]
    want = [_ask(plain, m, [picture])[0] for m in asks]
    cached.start_batching(2)
    try:
        got: list = [None] * len(asks)

        def one(i):
            got[i] = _ask(cached, asks[i], [picture])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        cached.start_batching(1)
    assert [g[0] for g in got] == want
    n_image = int(cached.processor(asks[0], [picture]).images_seq_mask[0].sum())
    assert sorted(g[1] > n_image for g in got) == [False, True, True, True]  # the first to join read the picture


def test_a_changed_image_or_earlier_turn_never_hits_past_the_change(pipes):
    cached, _ = pipes["onnx", "tiny"]
    proc = cached.processor
    a = proc([{"role": "user", "content": QUESTION}], [_picture(3)])
    b = proc([{"role": "user", "content": QUESTION}], [_picture(4)])
    ka, kb = prompt_key(a), prompt_key(b)
    first_image = int(np.argmax(a.images_seq_mask[0]))
    assert (ka[:first_image] == kb[:first_image]).all() and ka[first_image] != kb[first_image]
    assert (ka[~a.images_seq_mask[0]] >= 0).all() and (ka[a.images_seq_mask[0]] < 0).all()
    one_pixel = np.asarray(_picture(3)).copy()
    one_pixel[0, 0] ^= 1
    c = proc([{"role": "user", "content": QUESTION}], [Image.fromarray(one_pixel)])
    assert prompt_key(c)[first_image] != ka[first_image]
    store = PrefixCache(1 << 30)
    store.store(ka, {"x": np.zeros(4)})
    assert store.match(kb, len(kb)).length == first_image  # up to the image, not into it
    turn = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Bye."}]
    changed = [dict(m) for m in turn]
    changed[1]["content"] = "Hi!"
    kt, kc = prompt_key(proc(turn, [])), prompt_key(proc(changed, []))
    store.store(kt, {"x": np.zeros(4)})
    split = int(np.argmin(kt[:len(kc)] == kc[:len(kt)]))
    assert split > 0 and store.match(kc, len(kc)).length == split


def test_a_hit_on_the_image_skips_the_vision_tower(pipes, monkeypatch):
    cached, _ = pipes["onnx", "base"]
    calls = []
    real = cached.backend.encode_tiles
    monkeypatch.setattr(cached.backend, "encode_tiles", lambda px, *a: calls.append(len(px)) or real(px, *a))
    picture = _picture(5)
    cached.chat([{"role": "user", "content": QUESTION}], [picture], max_new_tokens=2)
    assert len(calls) == 1
    r = cached.chat([{"role": "user", "content": QUESTION + " Be brief."}], [picture], max_new_tokens=2)
    assert len(calls) == 1 and r.cached_tokens > 0


def test_the_budget_holds_under_a_stream_of_distinct_prompts(pipes):
    cached, _ = pipes["torch", "tiny"]

    def ask(i: int) -> list[dict]:
        messages = [{"role": "user", "content": f"Tell me about the number {i * 7919}, please."}]
        cached.chat(messages, max_new_tokens=1)
        return messages

    try:
        cached.use_prefix_cache("256MiB")
        ask(0)
        entry = cached.prefix_cache.bytes
        cached.use_prefix_cache(int(3.5 * entry * 4 / 3))  # three quarters for prefixes: room for three prompts
        store = cached.prefix_cache
        for i in range(1, 13):
            last = ask(i)
            assert store.bytes <= store.budget and len(store) <= 3
        assert len(store) == 3
        key = prompt_key(cached.processor(last, []))
        assert store.match(key, len(key)).length == len(key)  # the newest is kept, the oldest dropped
        assert store.match(prompt_key(cached.processor([{"role": "user", "content": "Tell me about the number 7919, "
                                                        "please."}], [])), 10**6).length < len(key)
    finally:
        cached.use_prefix_cache("256MiB")


def test_budget_sizes_parse_and_bad_ones_are_refused():
    assert parse_budget("2GiB") == 2 << 30 and parse_budget("512MiB") == 512 << 20 and parse_budget("0") == 0
    assert parse_budget("1.5g") == 3 << 29
    for bad in ("", "lots", "-1GiB", "2TiB", "nanGiB", "1e300"):
        with pytest.raises(InputError):
            parse_budget(bad)


def test_a_budget_beyond_the_machine_is_refused_before_loading(capsys):
    from vl2edge import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--model", str(golden.model_dir("tiny")), "--prompt", "hi", "--prefix-cache", "999999GiB"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "more than this machine's memory" in err and err.count("\n") == 1, err


# -- the tile feature cache (vl2edge/feature_cache.py) ---------------------------------------------------

def _tower_runs(pipe, monkeypatch) -> list:
    """Counts the vision tower's runs (tiles per run) of `pipe`'s backend."""
    runs: list = []
    backend = pipe.backend
    if hasattr(backend, "_run_vision"):
        real = backend._run_vision
        monkeypatch.setattr(backend, "_run_vision", lambda px, b: runs.append(len(px)) or real(px, b))
    else:
        real_tower = backend.vision.forward
        monkeypatch.setattr(backend.vision, "forward", lambda x: runs.append(len(x)) or real_tower(x))
    return runs


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_the_same_picture_after_other_words_skips_the_tower_and_answers_the_same(pipes, case, monkeypatch):
    cached, plain = pipes[case]
    picture = _picture(6)
    runs = _tower_runs(cached, monkeypatch)
    cached.chat([{"role": "user", "content": QUESTION}], [picture], max_new_tokens=2)
    tiles = sum(runs)
    assert tiles >= 2  # a global view and local tiles
    other = [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": QUESTION}]
    r = cached.chat(other, [picture], max_new_tokens=NEW)
    assert r.cached_tokens < 5 and sum(runs) == tiles  # the prefix stops at the system prompt; the tiles are kept
    assert r.token_ids == plain.chat(other, [picture], max_new_tokens=NEW).token_ids
    cached.chat(other, [_picture(7)], max_new_tokens=1)
    assert sum(runs) > tiles  # a new picture runs the tower


def test_tile_features_stay_within_their_budget():
    from vl2edge.feature_cache import FeatureCache

    store = FeatureCache(10 * 4 * 6 * 4)  # ten tiles of [4, 6] float32 features
    tiles = [bytes([i]) * 12 for i in range(30)]
    calls: list = []

    def encode(idx):
        calls.append(list(idx))
        return np.stack([np.full((4, 6), i, np.float32) for i in idx])

    for start in range(0, 30, 3):
        out = store.encode(tiles[start:start + 3], lambda idx, s=start: encode([s + i for i in idx]), np.stack)
        assert out.shape == (3, 4, 6) and (out[:, 0, 0] == np.arange(start, start + 3)).all()
        assert store.bytes <= store.budget and len(store) <= 10
    again = store.encode(tiles[27:30] + tiles[0:1], lambda idx: encode([[27, 28, 29, 0][i] for i in idx]), np.stack)
    assert calls[-1] == [0] and (again[:, 0, 0] == [27, 28, 29, 0]).all()  # the newest kept, the oldest recomputed


def test_training_never_reads_the_feature_cache():
    import torch

    from vl2edge.models.loading import load_model

    model = load_model(golden.model_dir("tiny"), dtype="float32", device="cpu").model
    model.use_feature_cache(1 << 24)
    tiles = torch.randn(2, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)
    with torch.inference_mode():
        first = model.encode_tiles(tiles)
    assert model.features is not None and len(model.features) == 2
    model.requires_grad_(True)
    out = model.encode_tiles(tiles)  # grad on: computed, with a graph, not the stored tensors
    assert out.requires_grad and torch.allclose(out, first, atol=1e-5)


def test_the_static_decode_step_starts_from_a_cached_prefix_too():
    """The CUDA path's backend (`StaticDecoder`; eager here, the graph needs a GPU) restores prefixes into
    its reused cache and answers as without them."""
    from vl2edge.models.decode_step import StaticDecoder
    from vl2edge.models.loading import load_model
    from vl2edge.pipeline import Pipeline

    plain = load(golden.model_dir("tiny"), backend="torch", dtype="float32", device="cpu", prefix_cache=0)
    model = load_model(golden.model_dir("tiny"), dtype="float32", device="cpu").model
    static = Pipeline(plain.processor, StaticDecoder(model, graph=False), plain.context_length)
    static.use_prefix_cache("64MiB")
    assert static.prefix_cache is not None and model.features is not None
    picture = _picture(8)
    first = [{"role": "user", "content": QUESTION}]
    r1 = static.chat(first, [picture], max_new_tokens=NEW)
    turn = first + [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "More?"}]
    r2 = static.chat(turn, [picture], max_new_tokens=NEW)
    assert r2.cached_tokens >= r1.prompt_tokens - 2
    assert r2.token_ids == plain.chat(turn, [picture], max_new_tokens=NEW).token_ids
