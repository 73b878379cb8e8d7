"""The server against the clients people use: the official `openai` client (sync, async, streaming) and
LangChain's ChatOpenAI, on a live uvicorn server over the Tiny-like fixture model.

Each point of OpenAI's chat completions contract we claim is checked here: options honoured (max tokens
under either name, penalties, logit_bias, logprobs, seeds, top_p 0, the developer role, usage chunks,
response_format) or refused by name; OpenAI's error shape on every failure, unknown routes and models
included; x-request-id, CORS, Retry-After; and cancellation: a client that goes away frees the model
within a decode step, and a request whose client left while it waited never runs.
"""

import asyncio
import json
import socket
import threading
import time

import httpx
import jsonschema
import openai
import pytest
import uvicorn

import vl2edge
from tests import golden
from vl2edge.server import Limits, create_app

KEY = "k"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe():
    return vl2edge.load(golden.model_dir("tiny"), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def live(pipe):
    """(base url, app) of a running server: served name `tiny`, alias `models/tiny`, CORS for one origin."""
    port = _free_port()
    app = create_app(pipe, name="tiny", api_key=KEY, aliases=("models/tiny",), cors_origins=("http://ui.example",),
                     limits=Limits(max_output_tokens=4096))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live[0] + "/v1", api_key=KEY, max_retries=0)


HI = [{"role": "user", "content": "Describe the weather."}]


def test_max_completion_tokens_is_honoured_and_wins_over_max_tokens(client):
    r = client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=5)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=3, max_tokens=9)
    assert r.usage.completion_tokens == 3


def test_langchain_max_tokens_is_honoured(live):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tiny", base_url=live[0] + "/v1", api_key=KEY, max_tokens=8, temperature=0,
                     max_retries=0)
    msg = llm.invoke("Describe the weather.")
    assert msg.response_metadata["token_usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("option,param", [({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
                                          ({"tool_choice": "required"}, "tool_choice"), ({"n": 2}, "n"),
                                          ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
                                          ({"extra_body": {"frobnicate": 1}}, "frobnicate")])
def test_unsupported_options_are_refused_by_name(client, option, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=2, **option)
    assert e.value.param == param and e.value.code == "unsupported_parameter" and param in e.value.message


def test_penalties_logit_bias_and_defaults(client, pipe):
    base = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6)
    again = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6)
    assert base.choices[0].message.content == again.choices[0].message.content  # default: greedy (documented)
    assert base.system_fingerprint
    forced = pipe.processor.encode("7")[0]
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, logit_bias={str(forced): 100})
    assert r.choices[0].message.content == "7777"
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, logit_bias={str(forced): 100},
                                       frequency_penalty=2.0, presence_penalty=2.0)
    assert r.usage.completion_tokens == 4  # accepted, applied (a +100 bias still wins over 4 of penalty)
    for kw in ({"top_p": 0.0, "temperature": 1.0}, {"seed": -1, "temperature": 1.0}):
        r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=2, **kw)
        assert r.usage.completion_tokens == 2
    dev = [{"role": "developer", "content": "Answer briefly."}, *HI]
    assert client.chat.completions.create(model="tiny", messages=dev, max_tokens=2).choices[0].message.content


def test_logprobs_are_those_of_the_choice(client):
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
    assert "".join(e.token for e in content) == r.choices[0].message.content
    stream = client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, logprobs=True, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_streaming_usage_only_when_asked_as_a_last_chunk_without_choices(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks) and chunks[-1].choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-2].choices[0].finish_reason == "length"


SCHEMA = {"type": "object", "required": ["total", "lines"], "additionalProperties": False,
          "properties": {"total": {"type": "number"}, "lines": {"type": "array", "items": {"type": "string"}}}}


def test_response_format_json_schema_and_json_object(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "receipt", "schema": SCHEMA, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=120, response_format=fmt,
                                       temperature=1.0, seed=3)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=60,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, response_format=bad)
    assert e.value.param == "response_format" and "frobnicate" in e.value.message


def test_models_and_errors_in_openai_shape(client, live):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny" and client.models.retrieve("models/tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    assert client.chat.completions.create(model="models/tiny", messages=HI, max_tokens=1).model == "tiny"
    auth = {"authorization": f"Bearer {KEY}"}
    for method, path, status, code in (("GET", "/v2/nothing", 404, "not_found"),
                                       ("DELETE", "/v1/chat/completions", 405, "method_not_allowed")):
        r = httpx.request(method, live[0] + path, headers=auth)
        err = r.json()["error"]
        assert r.status_code == status and err["code"] == code and set(err) == {"message", "type", "param", "code"}
    r = httpx.post(live[0] + "/v1/chat/completions", headers=auth, json={"messages": HI, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_request_ids_cors_and_retry_after(live, pipe):
    auth = {"authorization": f"Bearer {KEY}"}
    r = httpx.get(live[0] + "/v1/models", headers={**auth, "x-request-id": "trace-42"})
    assert r.headers["x-request-id"] == "trace-42"
    r = httpx.get(live[0] + "/v1/models", headers={**auth, "x-request-id": "bad id;drop"})
    assert r.headers["x-request-id"].startswith("req_")
    pre = httpx.options(live[0] + "/v1/chat/completions", headers={
        "origin": "http://ui.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.example"
    other = httpx.options(live[0] + "/v1/chat/completions", headers={
        "origin": "http://evil.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in other.headers
    from fastapi.testclient import TestClient

    app = create_app(pipe, name="tiny", max_queue=0)
    r = TestClient(app).post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_the_async_client_streams(live):
    async def main():
        client = openai.AsyncOpenAI(base_url=live[0] + "/v1", api_key=KEY, max_retries=0)
        whole = await client.chat.completions.create(model="tiny", messages=HI, max_tokens=6)
        stream = await client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return whole.choices[0].message.content, text

    whole, text = asyncio.run(main())
    assert whole == text and whole


def _long(pipe) -> dict:
    """A request that decodes for seconds: 4000 tokens, eos banned."""
    return {"messages": HI, "max_tokens": 4000, "logit_bias": {str(pipe.processor.eos_id): -100}}


def _next_request_latency(client) -> float:
    t = time.perf_counter()
    client.chat.completions.create(model="tiny", messages=HI, max_tokens=1)
    return time.perf_counter() - t


def test_a_dropped_stream_frees_the_model_within_a_step(client, live, pipe):
    counters = live[1].state.counters
    base = _next_request_latency(client)
    cancelled = counters["cancelled"]
    with httpx.stream("POST", live[0] + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                      json=_long(pipe) | {"stream": True}, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    # the stream is closed here, 4000 tokens short of its end (seconds of decoding)
    assert _next_request_latency(client) < base + 0.5
    assert counters["cancelled"] == cancelled + 1


def test_a_timed_out_request_is_cancelled_and_one_that_left_the_queue_never_runs(client, live, pipe):
    counters = live[1].state.counters
    base = _next_request_latency(client)
    impatient = openai.OpenAI(base_url=live[0] + "/v1", api_key=KEY, max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="tiny", **_long(pipe))
    assert _next_request_latency(client) < base + 0.5  # the abandoned generation stopped
    served = counters["served"]
    holder = httpx.Client(timeout=30)
    with holder.stream("POST", live[0] + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                       json=_long(pipe) | {"stream": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):  # past the role chunk: the model is busy decoding this stream
            next(lines)
        with pytest.raises(openai.APITimeoutError):  # waits in the queue, then its client leaves
            impatient.chat.completions.create(model="tiny", messages=HI, max_tokens=1)
        time.sleep(0.2)
    holder.close()
    time.sleep(0.3)
    assert counters["served"] == served  # neither the stream nor the queued request finished
    assert counters["waiting"] == 0


def test_a_client_gone_before_the_stream_starts_cancels_it(client, live, pipe):
    """The client sends a slow-to-prepare request (a 12-megapixel image) and hangs up before any byte of the
    answer: the generation must never hold the model (starlette never starts such a response's body)."""
    import base64
    import io

    from PIL import Image

    counters = live[1].state.counters
    base = _next_request_latency(client)
    buf = io.BytesIO()
    Image.effect_noise((4000, 3000), 64).convert("RGB").save(buf, "PNG", compress_level=1)
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = json.dumps(_long(pipe) | {"stream": True, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe it."}]}]}).encode()
    served, cancelled = counters["served"], counters["cancelled"]
    host, port = live[0][len("http://"):].split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"authorization: Bearer " + KEY.encode() + b"\r\ncontent-length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
    deadline = time.time() + 20
    while counters["cancelled"] == cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert counters["cancelled"] == cancelled + 1 and counters["served"] == served
    assert _next_request_latency(client) < base + 0.5
