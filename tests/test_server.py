"""The OpenAI-compatible server: routes, streaming, images, limits, auth, and the official client."""

import base64
import io
import json
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import vl2edge
from tests import golden
from vl2edge.server import Limits, create_app


@pytest.fixture(scope="module")
def pipe():
    return vl2edge.load(golden.model_dir("tiny"), device="cpu", dtype="float32")


def data_url(img, fmt="PNG"):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(url, text="Describe this image."):
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                        {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def square():
    return Image.open(golden.REF / "images" / "square_384.png").convert("RGB")


@pytest.fixture
def client(pipe, tmp_path):
    return TestClient(create_app(pipe, name="tiny", allowed_root=tmp_path, max_queue=4,
                                 limits=Limits(max_output_tokens=64)))


def test_health_and_models(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_completion_equals_the_pipeline(client, pipe, square):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": [image_message(data_url(square))],
                                                  "max_tokens": 8})
    assert r.status_code == 200
    body = r.json()
    ref = pipe.chat([{"role": "user", "content": "<image>\nDescribe this image."}], [square], max_new_tokens=8)
    assert body["choices"][0]["message"]["content"] == ref.text
    assert body["choices"][0]["finish_reason"] == ref.finish_reason
    cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert body["usage"] == {"prompt_tokens": ref.prompt_tokens, "completion_tokens": 8,
                             "total_tokens": ref.prompt_tokens + 8, "prompt_tokens_details": {"cached_tokens": cached}}
    assert ref.cached_tokens == ref.prompt_tokens - 2  # the server's request left the prompt in the prefix cache
    assert "boxes" in body["vl2edge"] and body["vl2edge"]["timings"]["new_tokens"] == 8


def test_a_resent_conversation_reports_its_cached_tokens_and_answers_the_same(client, square):
    """OpenAI clients resend the whole conversation: the next turn starts from the cached prefix."""
    first = [image_message(data_url(square.rotate(90)), "What is this?")]
    one = client.post("/v1/chat/completions", json={"messages": first, "max_tokens": 6}).json()
    assert one["usage"]["prompt_tokens_details"]["cached_tokens"] < 10  # a new picture: the template's start
    turn = first + [{"role": "assistant", "content": one["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "Say more."}]
    two = client.post("/v1/chat/completions", json={"messages": turn, "max_tokens": 6}).json()
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] >= one["usage"]["prompt_tokens"] - 2
    again = client.post("/v1/chat/completions", json={"messages": turn, "max_tokens": 6}).json()
    assert again["choices"][0]["message"]["content"] == two["choices"][0]["message"]["content"]


def test_streaming_sends_the_same_text(client, square):
    req = {"messages": [image_message(data_url(square))], "max_tokens": 8}
    full = client.post("/v1/chat/completions", json=req).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json=req | {"stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]
    # usage only when asked for, as a last chunk with no choices (OpenAI's stream_options.include_usage)
    with client.stream("POST", "/v1/chat/completions",
                       json=req | {"stream": True, "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_local_images_only_under_the_allowed_root(client, square, tmp_path):
    square.save(tmp_path / "a.png")
    for url in (str(tmp_path / "a.png"), f"file://{tmp_path / 'a.png'}"):
        assert client.post("/v1/chat/completions", json={"messages": [image_message(url)], "max_tokens": 2}
                           ).status_code == 200
    outside = tmp_path.parent / "outside.png"
    square.save(outside)
    r = client.post("/v1/chat/completions", json={"messages": [image_message(str(outside))]})
    assert r.status_code == 403 and "outside the allowed" in r.json()["error"]["message"]


def test_stop_strings_cut_the_answer(client, pipe):
    full = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Tell me"}],
                                                     "max_tokens": 24}).json()["choices"][0]["message"]["content"]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop and stop in full
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Tell me"}],
                                                  "max_tokens": 24, "stop": [stop]}).json()
    assert r["choices"][0]["message"]["content"] == full[:full.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_api_key_and_a_full_queue(pipe):
    app = create_app(pipe, api_key="sekret", max_queue=1)
    c = TestClient(app)
    req = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert c.post("/v1/chat/completions", json=req).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    auth = {"Authorization": "Bearer sekret"}
    assert c.post("/v1/chat/completions", json=req, headers=auth).status_code == 200
    app.state.counters["waiting"] = 1  # one request already waiting: the queue is full
    r = c.post("/v1/chat/completions", json=req, headers=auth)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    app.state.counters["waiting"] = 0
    assert c.post("/v1/chat/completions", json=req, headers=auth).status_code == 200


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_openai_client_against_a_live_server(pipe, square):
    import openai
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, name="tiny", api_key="k"), host="127.0.0.1", port=port,
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
        assert [m.id for m in client.models.list()] == ["tiny"]
        messages = [image_message(data_url(square))]
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6)
        text = r.choices[0].message.content
        assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"
        stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": ""}], max_tokens=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong").models.list()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
