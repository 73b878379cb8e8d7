"""Continuous batching (vl2edge/engine.py) on both backends: batched answers equal single answers.

Prompts of different lengths (text and the golden image prompt) run through the engine together, joining
and leaving at different steps; each answer must equal the one `generate` gives that prompt alone (greedy),
on the PyTorch model (MHA and MLA fixtures) and on the ONNX exports (GroupQueryAttention and concatenating
graphs). The slot interface itself is checked step by step against single-row logits.
"""

import json
import threading

import numpy as np
import pytest

from tests import golden
from vl2edge.engine import Engine
from vl2edge.errors import InputError
from vl2edge.export.build import export
from vl2edge.generate import Sequence, generate
from vl2edge.models.loading import load_model
from vl2edge.onnx_backend import OnnxModel, OnnxSlots
from vl2edge.sampling import SamplingParams

CASE = "landscape_1024x768"
LENGTHS = (9, 23, 40, 57)       # prompt prefixes of the golden ids: rows at different positions
NEW = (12, 3, 9, 16)            # and different answer lengths: rows leave at different steps


@pytest.fixture(scope="module")
def torch_models():
    return {v: load_model(golden.model_dir(v), dtype="float32", device="cpu").model for v in ("tiny", "base")}


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine-onnx")
    return {v: OnnxModel(export(golden.model_dir(v), root / v, "float32", vision="float", progress=False), threads=2)
            for v in ("tiny", "base")}


def _prompts(decoder):
    ids = golden.model_args(CASE)[0][0]
    return [decoder.embed(ids[None, :n]) for n in LENGTHS]


def _single(decoder, embeds, new: int, **kw) -> list[int]:
    mask = np.ones((1, embeds.shape[1]), bool)
    return [int(t[0]) for t in generate(decoder, embeds, mask, max_new_tokens=new, eos_id=None, **kw)]


def _batched(decoder, prompts, news, max_batch=3, chunk=16, max_len=128, **kw) -> list[list[int]]:
    engine = Engine(decoder, max_batch=max_batch, max_len=max_len, chunk_size=chunk)
    try:
        tickets = [engine.submit(lambda _start, e=e: e, e.shape[1], Sequence(max_new_tokens=n, eos_id=None, **kw))
                   for e, n in zip(prompts, news)]
        answers = [list(t) for t in tickets]
    finally:
        engine.close()
    assert engine.rows_decoded > engine.steps  # rows really shared steps
    return answers


def _backend(request, torch_models, onnx_models):
    kind, variant = request.param
    return (torch_models if kind == "torch" else onnx_models)[variant]


BACKENDS = [("torch", "tiny"), ("torch", "base"), ("onnx", "tiny"), ("onnx", "base")]


@pytest.fixture(params=BACKENDS, ids=["-".join(b) for b in BACKENDS])
def decoder(request, torch_models, onnx_models):
    return _backend(request, torch_models, onnx_models)


def test_batched_answers_equal_single_answers(decoder):
    """Four prompts, three slots: the fourth joins when the first leaves; every answer is its own."""
    prompts = _prompts(decoder)
    single = [_single(decoder, e, n) for e, n in zip(prompts, NEW)]
    assert _batched(decoder, prompts, NEW) == single


def test_rows_at_different_positions_give_single_row_logits(decoder):
    """The slot interface directly: rows prefilled to different lengths, stepped together, moved."""
    prompts = _prompts(decoder)[:3]
    cache = decoder.new_slots(3, 96)
    refs = []
    for r, e in enumerate(prompts):
        decoder.prefill_row(e, cache, r)
        c = decoder.new_cache(1, 96)
        decoder.prefill(e, c)
        refs.append(c)
    tokens = np.array([5, 17, 29])
    for step in range(3):
        got = decoder.decode_rows(tokens, cache)
        for r in range(3):
            ref = decoder.decode(tokens[r:r + 1], refs[r])
            np.testing.assert_allclose(got[r], ref[0], atol=2e-4 * np.abs(ref).max(), rtol=0, err_msg=f"{step} {r}")
    decoder.move_row(cache, 2, 0)  # row 2 takes row 0's place: it goes on as row 2 did
    got = decoder.decode_rows(tokens[2:3], cache)
    ref = decoder.decode(tokens[2:3], refs[2])
    np.testing.assert_allclose(got[0], ref[0], atol=2e-4 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("variant", ("tiny", "base"))
def test_onnx_slots_grow_and_shrink_with_the_longest_row(onnx_models, variant):
    """The ONNX slot buffers follow the longest row (allocated in steps of 16 here): rows that outgrow them and a
    batch that shrinks them keep giving single-row logits."""
    decoder = onnx_models[variant]
    prompts = [_prompts(decoder)[i] for i in (0, 3)]        # 9 and 57 positions
    cache = OnnxSlots(decoder.cache_layout, decoder.past_names, 2, 128, step=16)
    assert cache.capacity == 16
    refs = []
    for r, e in enumerate(prompts):
        decoder.prefill_row(e, cache, r)
        refs.append(decoder.new_cache(1, 128))
        decoder.prefill(e, refs[-1])
    seq_len = lambda: {b.shape[cache.axis] for b in cache.buffers.values()}  # noqa: E731
    assert cache.capacity == 64 and seq_len() == {64}             # grew past 57, in steps of 16

    def check(rows: int) -> None:
        tokens = np.array([5, 17][:rows])
        got = decoder.decode_rows(tokens, cache)
        for r in range(rows):
            ref = decoder.decode(tokens[r:r + 1], refs[r])
            np.testing.assert_allclose(got[r], ref[0], atol=2e-4 * np.abs(ref).max(), rtol=0)

    for _ in range(8):                                             # row 1 passes 64: the buffers grow again
        check(2)
    assert cache.capacity == 96 and seq_len() == {96}
    decoder.clear_row(cache, 1)                                    # row 0 (17 positions) alone: a quarter will do
    check(1)
    assert cache.capacity == 48 and seq_len() == {48}
    for _ in range(3):
        check(1)


def test_image_prompt_batches_with_text_prompts(torch_models):
    model = torch_models["tiny"]
    args = golden.model_args(CASE)
    image = model.embed(args[0], *args[2:])
    prompts = [image, *_prompts(model)[:2]]
    news = (10, 14, 6)
    single = [_single(model, e, n) for e, n in zip(prompts, news)]
    assert _batched(model, prompts, news, chunk=512, max_len=1500) == single


def test_each_row_keeps_its_own_sampling(decoder):
    """Seeded sampling and a repetition penalty per row: the same draws as alone."""
    prompts = _prompts(decoder)[:3]
    params = [SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(), SamplingParams(repetition_penalty=1.3)]
    ids = golden.model_args(CASE)[0][0]
    single, seqs = [], []
    for e, p, n in zip(prompts, params, LENGTHS):
        single.append(_single(decoder, e, 8, params=p, rng=np.random.default_rng(7), prompt_ids=ids[None, :n]))
        seqs.append(Sequence(max_new_tokens=8, eos_id=None, params=p, rng=np.random.default_rng(7),
                             prompt_ids=ids[:n]))
    engine = Engine(decoder, max_batch=3, max_len=96)
    try:
        assert [list(engine.submit(lambda _start, e=e: e, e.shape[1], s)) for e, s in zip(prompts, seqs)] == single
    finally:
        engine.close()


def test_cancelling_one_row_leaves_the_others_intact(torch_models):
    model = torch_models["tiny"]
    prompts = _prompts(model)[:3]
    single = [_single(model, e, 20) for e in prompts]
    engine = Engine(model, max_batch=3, max_len=96)
    stop = threading.Event()
    try:
        tickets = [engine.submit(lambda _start, e=e: e, e.shape[1], Sequence(max_new_tokens=20, eos_id=None),
                                 cancelled=stop.is_set if i == 1 else None) for i, e in enumerate(prompts)]
        cut = []
        for tok in tickets[1]:
            cut.append(tok)
            if len(cut) == 4:
                stop.set()
        assert 4 <= len(cut) < 20 and cut == single[1][:len(cut)]
        assert [list(tickets[0]), list(tickets[2])] == [single[0], single[2]]
    finally:
        engine.close()


def test_eos_ends_a_row_at_once(torch_models):
    model = torch_models["tiny"]
    e = _prompts(model)[1]
    alone = _single(model, e, 10)
    eos = alone[4]
    engine = Engine(model, max_batch=2, max_len=96)
    try:
        got = list(engine.submit(lambda _start: e, e.shape[1], Sequence(max_new_tokens=10, eos_id=eos)))
    finally:
        engine.close()
    assert got == alone[:alone.index(eos) + 1]


def test_a_failing_prompt_or_step_fails_its_answers_only(torch_models):
    """A prompt whose embedding or prefill fails (a bad image, a broken prompt) ends its own answer with the
    error; the running answers go on and the engine serves the next ones."""
    model = torch_models["tiny"]
    prompts = _prompts(model)[:2]
    alone = _single(model, prompts[1], 6)

    def bad_image(_start):
        raise InputError("cannot read image x.png")

    engine = Engine(model, max_batch=2, max_len=96)
    try:
        bad = engine.submit(bad_image, 30, Sequence(max_new_tokens=6, eos_id=None))
        good = engine.submit(lambda _start: prompts[1], prompts[1].shape[1], Sequence(max_new_tokens=6, eos_id=None))
        with pytest.raises(InputError, match="x.png"):
            list(bad)
        assert list(good) == alone
        T = prompts[1].shape[1]
        running = engine.submit(lambda _start: prompts[1], T, Sequence(max_new_tokens=12, eos_id=None))
        first = next(iter(running))  # running when the broken prompt joins
        broken = engine.submit(lambda _start: prompts[0][:, :, :8], prompts[0].shape[1],
                               Sequence(max_new_tokens=6, eos_id=None))
        with pytest.raises(RuntimeError):  # a wrong-width embedding breaks its prefill, and only its own
            list(broken)
        assert [first, *running] == _single(model, prompts[1], 12)
        again = engine.submit(lambda _start: prompts[1], T, Sequence(max_new_tokens=6, eos_id=None))
        assert list(again) == alone
    finally:
        engine.close()


class FailingConstraint:
    """A grammar that refuses every token from its `at`-th choice on (1: the answer's first token)."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def mask(self, logits):
        self.calls += 1
        if self.calls >= self.at:
            raise InputError(f"no token allowed at choice {self.at}")
        return logits

    def consume(self, token):
        pass


@pytest.mark.parametrize("seed", range(4))
def test_a_row_that_fails_at_any_choice_ends_alone_and_frees_its_place(torch_models, seed):
    """Rows whose choice fails (first token or any later step, random ones) end with their own error while
    the others in the same steps go on; more failures than places never wedge the engine."""
    model = torch_models["tiny"]
    rng = np.random.default_rng(seed)
    prompts = _prompts(model)
    alone = {i: _single(model, prompts[i], 8) for i in (0, 2)}
    engine = Engine(model, max_batch=2, max_len=96, chunk_size=int(rng.integers(4, 40)))
    try:
        tickets = []
        for k in range(5):  # more failing rows than places, between good ones
            at = int(rng.integers(1, 6))
            seq = Sequence(max_new_tokens=8, eos_id=None, constraint=FailingConstraint(at))
            tickets.append((at, engine.submit(lambda _start, e=prompts[k % 4]: e, prompts[k % 4].shape[1], seq)))
            if k % 2:
                i = (0, 2)[k % 4 // 2]
                tickets.append((None, engine.submit(lambda _start, e=prompts[i]: e, prompts[i].shape[1],
                                                    Sequence(max_new_tokens=8, eos_id=None)), i))
        for entry in tickets:
            at, ticket = entry[0], entry[1]
            got: list[int] = []
            if at is None:
                got.extend(ticket)
                assert got == alone[entry[2]]
                continue
            with pytest.raises(InputError, match=f"choice {at}"):
                for tok in ticket:
                    got.append(tok)
            assert len(got) == at - 1
        assert not engine.running and engine.joining is None
        last = engine.submit(lambda _start: prompts[0], prompts[0].shape[1], Sequence(max_new_tokens=8, eos_id=None))
        assert list(last) == alone[0]
    finally:
        engine.close()


def test_a_prompt_longer_than_a_slot_is_refused(torch_models):
    model = torch_models["tiny"]
    engine = Engine(model, max_batch=1, max_len=32)
    try:
        with pytest.raises(InputError, match="a batch slot holds 32"):
            engine.submit(lambda _start: None, 40, Sequence(max_new_tokens=4, eos_id=None))
    finally:
        engine.close()


# -- through the pipeline, the server and the batch command --------------------------------------------------

@pytest.fixture(scope="module")
def batching_pipe():
    import vl2edge

    pipe = vl2edge.load(golden.model_dir("tiny"), device="cpu", dtype="float32")
    yield pipe
    pipe.start_batching(1)  # closes the engine


ASKS = [  # (question, options): each answer has its own length, stop, seed, format and logprobs
    ("Describe the picture.", {"max_new_tokens": 14}),
    ("What is written here?", {"max_new_tokens": 9, "temperature": 0.9, "seed": 11}),
    ("Count the objects.", {"max_new_tokens": 20, "repetition_penalty": 1.2, "logprobs": 2}),
    ("Give JSON.", {"max_new_tokens": 24, "response_format": "json"}),
    ("Name the colours.", {"max_new_tokens": 6, "stop": ["e"]}),
]


def _ask(pipe, question, options, image):
    from vl2edge.structured import JsonFormat

    kw = dict(options)
    if kw.get("response_format") == "json":
        kw["response_format"] = JsonFormat.any_object()
    return pipe.chat([{"role": "user", "content": "<image>\n" + question}], [image], **kw)


def test_concurrent_generations_equal_sequential_ones(batching_pipe):
    """Five answers from five threads through three slots equal the same answers one at a time: text, token
    ids, finish reasons and logprobs, whatever their options."""
    image = golden.conversation("square_384")[1][0]
    pipe = batching_pipe
    pipe.start_batching(1)
    alone = [_ask(pipe, q, o, image) for q, o in ASKS]
    pipe.start_batching(3)
    results: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i, q=q, o=o: results.__setitem__(i, _ask(pipe, q, o, image)))
               for i, (q, o) in enumerate(ASKS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, ref in enumerate(alone):
        got = results[i]
        assert (got.token_ids, got.text, got.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason), ASKS[i]
        if ref.logprobs is not None:
            np.testing.assert_allclose([e["logprob"] for e in got.logprobs], [e["logprob"] for e in ref.logprobs],
                                       atol=1e-3)
    assert pipe.engine.rows_decoded > pipe.engine.steps
    assert alone[4].finish_reason == "stop" or "e" not in alone[4].text


def test_server_answers_concurrent_requests_with_batching(batching_pipe):
    from fastapi.testclient import TestClient

    from vl2edge.server import create_app

    pipe = batching_pipe
    pipe.start_batching(1)
    body = [{"model": "tiny", "max_tokens": n, "messages": [{"role": "user", "content": q}]}
            for q, n in (("Hello there.", 12), ("What is DeepSeek?", 5), ("Tell me more.", 16), ("Why?", 8))]
    client = TestClient(create_app(pipe, name="tiny"))
    alone = [client.post("/v1/chat/completions", json=b).json()["choices"][0]["message"]["content"] for b in body]
    pipe.start_batching(4)
    client = TestClient(create_app(pipe, name="tiny"))
    got: dict[int, str] = {}

    def ask(i):
        got[i] = client.post("/v1/chat/completions", json=body[i]).json()["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(body))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(body))] == alone
    assert pipe.engine.rows_decoded > pipe.engine.steps  # they shared steps


def test_batch_command_batched_writes_the_same_lines_in_order(batching_pipe, tmp_path):
    from vl2edge.batch import run_batch

    pipe = batching_pipe
    images = [golden.REF / "images" / n for n in sorted(p.name for p in (golden.REF / "images").iterdir())][:4]
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    inputs = [str(images[0]), str(tmp_path / "bad.png"), *map(str, images[1:])]
    lines = {}
    for n in (1, 3):
        pipe.start_batching(n)
        run_batch(pipe, inputs, "Describe.", tmp_path / f"o{n}.jsonl", progress=False, max_new_tokens=6)
        lines[n] = [json.loads(x) for x in (tmp_path / f"o{n}.jsonl").read_text().splitlines()]
    strip = [[{k: v for k, v in r.items() if k != "timings"} for r in rows] for rows in lines.values()]
    assert strip[0] == strip[1]
    assert [r["source"] for r in lines[3]] == inputs and "error" in lines[3][1]


def test_server_gives_places_on_the_model_in_arrival_order():
    """Waiters get the model in the order they came, and one that gives up leaves the line."""
    from vl2edge.server import FifoSlots

    slots = FifoSlots(1)
    assert slots.acquire(lambda: False)
    order, started, gone = [], [], threading.Event()

    def wait(i):
        started.append(i)
        if slots.acquire(gone.is_set if i == 2 else (lambda: False)):
            order.append(i)
            slots.release()

    threads = []
    for i in range(6):
        threads.append(threading.Thread(target=wait, args=(i,)))
        threads[-1].start()
        while len(started) <= i or len(slots.line) <= i:  # each is in line before the next comes
            threading.Event().wait(0.005)
    gone.set()  # number 2 gives up while waiting
    while len(slots.line) > 5:
        threading.Event().wait(0.005)
    slots.release()
    for t in threads:
        t.join()
    assert order == [0, 1, 3, 4, 5]
