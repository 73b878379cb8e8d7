"""The Python API checks types where arguments enter (issue 31, round three): every argument of `load`,
`Pipeline.chat/stream/generation` and `start_batching`, given values of every wrong type and absurd
sizes, raises a `VL2Error` that names it, never AttributeError/TypeError/MemoryError; the pipeline answers
normally afterwards."""

import pytest

import vl2edge
from tests import golden
from vl2edge.errors import VL2Error

TINY = golden.model_dir("tiny")
MSG = [{"role": "user", "content": "hi"}]
WRONG = [None, "x", 0, -1, 1.5, float("nan"), [], {}, [1], {"a": 1}, b"x", object(), True, 10**30, 10**9]


@pytest.fixture(scope="module")
def pipe():
    return vl2edge.load(TINY, device="cpu", dtype="float32", backend="torch")


CALLS = {
    "messages": lambda p, v: p.chat(v, max_new_tokens=1),
    "images": lambda p, v: p.chat([{"role": "user", "content": "<image> hi"}], images=v, max_new_tokens=1),
    "max_new_tokens": lambda p, v: p.chat(MSG, max_new_tokens=v),
    "temperature": lambda p, v: p.chat(MSG, max_new_tokens=1, temperature=v),
    "top_p": lambda p, v: p.chat(MSG, max_new_tokens=1, top_p=v),
    "chunk_size": lambda p, v: p.chat(MSG, max_new_tokens=1, chunk_size=v),
    "stop": lambda p, v: p.chat(MSG, max_new_tokens=1, stop=v),
    "response_format": lambda p, v: p.chat(MSG, max_new_tokens=1, response_format=v),
    "logit_bias": lambda p, v: p.chat(MSG, max_new_tokens=1, logit_bias=v),
    "seed": lambda p, v: p.chat(MSG, max_new_tokens=1, seed=v),
    "logprobs": lambda p, v: p.chat(MSG, max_new_tokens=1, logprobs=v),
    "max_batch": lambda p, v: p.start_batching(v),
    "max_len": lambda p, v: p.start_batching(2, v),
    "path_or_id": lambda p, v: vl2edge.load(v),
    "device": lambda p, v: vl2edge.load(TINY, device=v),
    "dtype": lambda p, v: vl2edge.load(TINY, dtype=v, device="cpu"),
    "threads": lambda p, v: vl2edge.load(TINY, threads=v, backend="torch"),
    "gpu_memory": lambda p, v: vl2edge.load(TINY, gpu_memory=v),
    "quant": lambda p, v: vl2edge.load(TINY, quant=v),
    "vision": lambda p, v: vl2edge.load(TINY, vision=v),
}
ACCEPTS_NONE = {"images", "temperature", "stop", "response_format", "logit_bias", "seed", "logprobs", "max_len",
                "dtype", "threads", "gpu_memory", "quant", "vision"}
OPENAI_SHAPED = [[{"role": "user", "content": [{"type": "text", "text": "hi"}]}], [{"role": "user"}],
                 [{"role": 1, "content": "x"}], [["user", "hi"]], "hi", {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("arg", sorted(CALLS))
def test_every_argument_of_every_wrong_type_is_a_vl2error(pipe, arg):
    values = WRONG + (OPENAI_SHAPED if arg == "messages" else [])
    for v in values:
        if v is None and arg in ACCEPTS_NONE:
            continue
        try:
            CALLS[arg](pipe, v)
        except VL2Error:
            continue
        except Exception as e:
            pytest.fail(f"{arg}={v!r:.40}: {type(e).__name__}: {e}")
        finally:
            pipe.start_batching(1)
    assert pipe.chat(MSG, max_new_tokens=2).token_ids  # still answers


MUST_REFUSE = [("max_batch", 10**9), ("max_batch", 0), ("max_len", 10**9), ("max_len", 1), ("chunk_size", 0),
               ("chunk_size", 10**9), ("max_new_tokens", 0), ("images", "a.png"), ("stop", 3), ("threads", 0),
               ("device", "gpu"), ("dtype", "int3"), ("quant", "int2"), ("vision", "int4"), ("path_or_id", b"x")]


@pytest.mark.parametrize("arg,value", MUST_REFUSE, ids=[f"{a}={v!r:.12}" for a, v in MUST_REFUSE])
def test_absurd_sizes_and_unknown_names_are_refused_by_name(pipe, arg, value):
    try:
        with pytest.raises(VL2Error) as err:
            CALLS[arg](pipe, value)
    finally:
        pipe.start_batching(1)
    names = {"path_or_id": "model", "quant": "recipe"}
    assert names.get(arg, arg) in str(err.value) or arg == "images"


def test_an_openai_style_response_format_is_refused_with_the_way_to_build_one(pipe):
    with pytest.raises(VL2Error, match="JsonFormat.from_schema"):
        pipe.chat(MSG, response_format={"type": "json_object"})
    with pytest.raises(VL2Error, match=r"images=\[\.\.\.\]"):
        pipe.chat([{"role": "user", "content": "<image> hi"}], images="a.png")
