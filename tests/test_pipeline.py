import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import vl2edge
from tests import golden
from vl2edge.errors import InputError
from vl2edge.pipeline import TextStream
from vl2edge.processor import Processor


@pytest.fixture(scope="module")
def pipe():
    return vl2edge.load(golden.model_dir("small"), device="cpu", dtype="float32")


def test_chat_reproduces_the_reference_generation(pipe):
    conv, images = golden.conversation("landscape_1024x768")
    res = pipe.chat(conv, images, max_new_tokens=8)
    assert res.token_ids == golden.expected("small", "landscape_1024x768")["gen_token_ids"].tolist()
    assert res.text == pipe.processor.decode(res.token_ids) and res.finish_reason == "length"
    assert res.prompt_tokens == 1445 and res.image_sizes == [(1024, 768)]
    t = res.timings
    assert t["new_tokens"] == 8 and 0 < t["embed_s"] <= t["ttft_s"] <= t["total_s"] and t["decode_tok_s"] > 0


def test_stream_yields_the_same_text(pipe):
    conv, images = golden.conversation("square_384")
    pieces = list(pipe.stream(conv, images, max_new_tokens=12))
    assert "".join(pieces) == pipe.chat(conv, images, max_new_tokens=12).text


def test_sampling_is_reproducible_with_a_seed(pipe):
    conv = [{"role": "user", "content": "Tell me a story."}]
    a = pipe.chat(conv, max_new_tokens=10, temperature=1.0, seed=3).token_ids
    b = pipe.chat(conv, max_new_tokens=10, temperature=1.0, seed=3).token_ids
    c = pipe.chat(conv, max_new_tokens=10, temperature=1.0, seed=4).token_ids
    assert a == b and a != c


def test_stops_on_eos(pipe, monkeypatch):
    eos = pipe.processor.eos_id
    real = pipe.backend.decode

    def biased(tok, cache):  # make eos win at the third step
        logits = real(tok, cache)
        if cache.length == first_len + 2:
            logits[:, eos] = 1e9
        return logits
    conv = [{"role": "user", "content": "Hello"}]
    first_len = pipe.processor(conv).input_ids.shape[1]
    monkeypatch.setattr(pipe.backend, "decode", biased)
    res = pipe.chat(conv, max_new_tokens=20)
    assert res.finish_reason == "stop" and len(res.token_ids) == 3 and res.token_ids[-1] == eos
    assert pipe.processor.decode([eos]) not in res.text


def test_prompt_beyond_the_context_is_refused(pipe):
    with pytest.raises(InputError, match="context is 4096"):
        pipe.chat([{"role": "user", "content": "word " * 5000}], max_new_tokens=4)
    with pytest.raises(InputError, match="max_new_tokens"):
        pipe.chat([{"role": "user", "content": "hi"}], max_new_tokens=0)


def test_text_stream_never_splits_a_character():
    proc = Processor.from_pretrained(golden.model_dir("tiny"))
    ids = proc.encode("héllo wörld ✓ ünïcode")
    s = TextStream(proc.decode)
    pieces = [s.push(i) for i in ids] + [s.flush()]
    assert "".join(pieces) == proc.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_hub_ids_resolve_through_the_hugging_face_cache(tmp_path):
    snap = tmp_path / "hub" / "models--deepseek-ai--deepseek-vl2-tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(golden.model_dir("tiny"), snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    script = textwrap.dedent("""
        import vl2edge
        from vl2edge.hub import resolve
        print(resolve("deepseek-ai/deepseek-vl2-tiny"))
        pipe = vl2edge.load("deepseek-ai/deepseek-vl2-tiny", device="cpu")
        print(len(pipe.chat([{"role": "user", "content": "hi"}], max_new_tokens=3).token_ids))
        try:
            resolve("deepseek-ai/deepseek-vl2-small")
        except vl2edge.CheckpointError as e:
            print("ERR", e)
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == str(snap) and lines[1] == "3"
    assert lines[2].startswith("ERR deepseek-ai/deepseek-vl2-small is not a local directory, not in the Hugging "
                               "Face cache") and "hf download" in lines[2]


def test_vl2model_is_exported_lazily():
    assert vl2edge.VL2Model.__name__ == "VL2Model"
    model, plan = vl2edge.load_model(golden.model_dir("tiny"), device="cpu")
    assert isinstance(model, vl2edge.VL2Model) and plan is None
    assert np.asarray(model.logits([[0, 5, 6]]).shape).tolist() == [1, 3, 384]
