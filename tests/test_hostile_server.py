"""Hostile requests against the server, round two: bodies that stream past the size cap, prompts too long to
tokenize, JSON that breaks parsers or types, empty API keys, clients that hang up, images that break the
decoder, and a property test over random JSON-ish bodies. Every one gets a JSON error with a 4xx status that
names the problem, never a 500, the server keeps serving, and memory stays bounded."""

import asyncio
import base64
import io
import json
import os
import random
import select
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import vl2edge
from tests import golden
from tests.test_hostile import _png_bomb
from vl2edge.errors import InputError
from vl2edge.server import Limits, create_app, serve

CAP = 12 * 2**20
LIMITS = Limits(max_request_bytes=CAP, max_images=2, max_output_tokens=4, max_image_pixels=1_000_000)
HI = [{"role": "user", "content": "hi"}]
OK = {"messages": HI, "max_tokens": 1}


@pytest.fixture(scope="module")
def pipe():
    return vl2edge.load(golden.model_dir("tiny"), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    d = tmp_path_factory.mktemp("allowed")
    Image.new("RGB", (16, 16), "blue").save(d / "a.png")
    (d / "sub").mkdir()
    return d


@pytest.fixture(scope="module")
def app(pipe, root):
    return create_app(pipe, name="tiny", allowed_root=root, limits=LIMITS)


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), "red").save(buf, "PNG")
    return buf.getvalue()


def b64(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def req(**kw) -> dict:
    return {"messages": HI, "max_tokens": 2} | kw


def parts(*items) -> dict:
    return {"messages": [{"role": "user", "content": list(items)}], "max_tokens": 2}


def image(url) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def with_field(key: str, literal: str) -> bytes:
    """A body whose `key` holds a literal json.dumps cannot write (a 5000-digit integer, 1e400)."""
    return json.dumps(req()).replace('"max_tokens": 2', f'"max_tokens": 2, "{key}": {literal}').encode()


def assert_error(r, status: int, fragment: str):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"], err["message"]
    assert "Traceback" not in r.text and "param" in err  # OpenAI's shape: code a string or null, param named
    assert err["code"] is None or isinstance(err["code"], str)


def assert_serving(client):
    r = client.post("/v1/chat/completions", json=OK)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


NESTED_40 = '{"messages": ' + "[" * 40 + "]" * 40 + "}"
SIZE_CASES = [  # (id, body, extra headers, status, fragment)
    ("content-length-not-a-number", b"{}", {"content-length": "12abc"}, 400, "Content-Length header"),
    ("content-length-30-digits", b"{}", {"content-length": "9" * 30}, 413, "larger than 12,582,912 bytes"),
    ("content-length-over-cap", b"{}", {"content-length": str(CAP + 1)}, 413, "larger than 12,582,912 bytes"),
    ("body-over-cap", b" " * (CAP + 1), {}, 413, "larger than 12,582,912 bytes"),
    ("json-values-bomb", b"[" + b"[]," * 300_000 + b"[]]", {}, 413, "262,144 JSON values"),
    ("objects-bomb", b'{"messages": [' + b"{}," * 300_000 + b"{}]}", {}, 413, "262,144 JSON values"),
]
CASES = [  # (id, body, status, fragment)
    # prompts too long to tokenize: refused by characters first
    ("10MB-text", req(messages=[{"role": "user", "content": "a" * 10_000_000}]), 400, "more than 32,768 characters"),
    ("text-over-budget-across-messages", req(messages=[{"role": "user", "content": "a" * 20_000},
                                                       {"role": "assistant", "content": "b" * 13_000}]),
     400, "more than 32,768 characters"),
    ("text-over-budget-across-parts", parts(*[{"type": "text", "text": "c" * 1000}] * 40), 400,
     "more than 32,768 characters"),
    ("more-messages-than-tokens", req(messages=HI * 5000), 400, "messages must be a non-empty list of at most 4096"),
    # JSON that breaks parsers
    ("nesting-bomb", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("nested-40-deep", NESTED_40.encode(), 400, "nested too deeply"),
    ("int-past-python-digit-limit", with_field("max_tokens", "9" * 5000), 400,
     "max_tokens must be an integer in [1, 4], got <an integer of 5000 digits>"),
    ("seed-past-python-digit-limit", with_field("seed", "9" * 5000), 400,
     "seed must be an integer in [-9223372036854775808, "),
    ("huge-int-inside-messages", b'{"messages": [{"role": "user", "content": ' + b"7" * 30 + b"}]}", 400,
     "number out of range"),
    ("nan-inside-messages", b'{"messages": [{"role": "user", "content": NaN}]}', 400, "number out of range"),
    ("temperature-nan", req(temperature=float("nan")), 400, "temperature must be a number in [0.0, 2.0]"),
    ("temperature-1e400", with_field("temperature", "1e400"), 400, "temperature must be a number in [0.0, 2.0]"),
    ("top-p-infinity", req(top_p=float("inf")), 400, "top_p must be a number in [0.0, 1.0]"),
    ("top-p-minus-infinity", req(top_p=float("-inf")), 400, "top_p must be a number in [0.0, 1.0]"),
    ("invalid-utf8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "not valid UTF-8"),
    ("utf16-with-bom", json.dumps(OK).encode("utf-16"), 400, "not valid UTF-8"),
    ("empty-body", b"", 400, "not valid JSON"),
    ("trailing-garbage", b'{"messages": []} x', 400, "not valid JSON"),
    ("top-level-string", b'"hi"', 400, "must be a JSON object, got a string"),
    # numbers out of range, with the allowed range
    ("max-tokens-1e30", req(max_tokens=10**30), 400, "max_tokens must be an integer in [1, 4]"),
    ("max-tokens-2**64", req(max_tokens=2**64), 400, "max_tokens must be an integer in [1, 4]"),
    ("max-tokens-negative", req(max_tokens=-5), 400, "max_tokens must be an integer in [1, 4]"),
    ("seed-1e30", req(seed=10**30), 400, "seed must be an integer in [-9223372036854775808, 18446744073709551615]"),
    ("seed-2**64", req(seed=2**64), 400, "seed must be an integer in [-9223372036854775808, 18446744073709551615]"),
    # fields of the wrong type
    ("max-tokens-string", req(max_tokens="8"), 400, "max_tokens must be an integer"),
    ("max-tokens-boolean", req(max_tokens=True), 400, "max_tokens must be an integer"),
    ("max-tokens-fraction", req(max_tokens=2.5), 400, "max_tokens must be an integer"),
    ("seed-boolean", req(seed=False), 400, "seed must be an integer"),
    ("temperature-string", req(temperature="hot"), 400, "temperature must be a number"),
    ("stream-string", req(stream="yes"), 400, "stream must be true or false"),
    ("model-number", req(model=5), 400, "model must be a string"),
    ("stop-object", req(stop={"a": 1}), 400, "stop must be a string or a list of up to 4 strings"),
    ("stop-five-strings", req(stop=["a", "b", "c", "d", "e"]), 400, "stop must be a string or a list of up to 4"),
    ("stop-too-long", req(stop=["s" * 2000]), 400, "of at most 1024 characters"),
    # OpenAI's options: malformed, out of range, or refused by name
    ("logit-bias-a-list", req(logit_bias=[1, 2]), 400, "logit_bias must be an object"),
    ("logit-bias-word-key", req(logit_bias={"hello": 5}), 400, "'hello' is not a token id"),
    ("logit-bias-past-vocab", req(logit_bias={"99999999": 5}), 400, "is not a token id"),
    ("logit-bias-huge-value", req(logit_bias={"3": 1e3}), 400, "must be a number in [-100, 100]"),
    ("logit-bias-nan", req(logit_bias={"3": float("nan")}), 400, "number out of range"),
    ("top-logprobs-21", req(logprobs=True, top_logprobs=21), 400, "top_logprobs must be an integer in [0, 20]"),
    ("top-logprobs-alone", req(top_logprobs=2), 400, "top_logprobs needs logprobs"),
    ("penalty-too-big", req(frequency_penalty=3), 400, "frequency_penalty must be a number in [-2.0, 2.0]"),
    ("n-zero", req(n=0), 400, "n must be an integer"),
    ("n-three", req(n=3), 400, "one choice per request"),
    ("tools-an-object", req(tools={"a": 1}), 400, "tool calls are not supported"),
    ("unknown-field", req(frobnicate=True), 400, "unrecognized request argument: frobnicate"),
    ("functions", req(functions=[{"name": "f"}]), 400, "function calling is not supported"),
    ("stream-options-without-stream", req(stream_options={"include_usage": True}), 400, "only allowed with stream"),
    ("stream-options-a-list", req(stream=True, stream_options=[1]), 400, "must be a JSON object"),
    ("response-format-a-string", req(response_format="json"), 400, "response_format must be a JSON object"),
    ("response-format-unknown-type", req(response_format={"type": "yaml"}), 400, "type must be text, json_object"),
    ("json-schema-not-an-object", req(response_format={"type": "json_schema", "json_schema": {"schema": [1]}}), 400,
     "must be a JSON object"),
    ("json-schema-bad-type", req(response_format={"type": "json_schema", "json_schema": {"schema": {"type": 7}}}), 400,
     "cannot be compiled"),
    ("model-unknown", req(model="gpt-4o"), 404, "does not exist here"),
    ("messages-an-object", {"messages": {"role": "user", "content": "hi"}}, 400, "messages must be a non-empty list"),
    ("message-a-list", {"messages": [["user", "hi"]]}, 400, "messages[0] must be a JSON object, got a list"),
    ("role-a-list", {"messages": [{"role": ["user"], "content": "hi"}]}, 400, "messages[0]: role must be one of"),
    ("role-missing", {"messages": [{"content": "hi"}]}, 400, "messages[0]: role must be one of"),
    ("content-an-object", {"messages": [{"role": "user", "content": {"text": "hi"}}]}, 400,
     "messages[0]: content must be a string or a list of parts"),
    ("part-a-string", parts("hi"), 400, "messages[0].content[0] must be a JSON object, got a string"),
    ("text-a-list", parts({"type": "text", "text": ["hi"]}), 400, "messages[0].content[0]: text must be a string"),
    ("type-an-object", parts({"type": {"x": 1}}), 400, "unsupported content part type"),
    ("url-a-number", parts({"type": "image_url", "image_url": {"url": 5}}), 400,
     "content[0].image_url: url must be a url string"),
    ("image-url-a-list", parts({"type": "image_url", "image_url": ["x"]}), 400, "image_url must be a url string"),
    # lone surrogates never reach the tokenizer
    ("surrogate-in-content", req(messages=[{"role": "user", "content": "hi \ud800"}]), 400,
     "messages[0]: content is not valid UTF-8 text"),
    ("surrogate-in-text-part", parts({"type": "text", "text": "\udfff"}), 400,
     "messages[0].content[0]: text is not valid UTF-8 text"),
    ("surrogate-in-stop", req(stop=["\ud800"]), 400, "stop is not valid UTF-8 text"),
    ("surrogate-in-url", parts(image("{root}/\ud800.png")), 400, "url is not valid UTF-8 text"),
    # <image> smuggled in as text
    ("image-tag-split-across-parts", parts({"type": "text", "text": "<ima"}, {"type": "text", "text": "ge>"}), 400,
     "may not contain <image>"),
    ("image-tag-in-system-message", req(messages=[{"role": "system", "content": "<image>"}, *HI]), 400,
     "may not contain <image>"),
    # images that break the decoder or the pixel budget
    ("image-not-an-image", parts(image(b64(b"GIF89a not really"))), 400, "cannot read"),
    ("image-truncated", parts(image(b64(png(64, 64)[:60]))), 400, "cannot read"),
    ("image-over-pixel-limit", parts(image(b64(png(1001, 1000)))), 400, "over 1,000,000 pixels"),
    ("image-decompression-bomb", parts(image(b64(_png_bomb()))), 400, "too large"),
    ("image-path-with-nul", parts(image("{root}/a\u0000.png")), 400, "bad image path"),
    ("image-path-a-directory", parts(image("{root}/sub")), 400, "image not found"),
]


@pytest.mark.parametrize("body,headers,status,fragment", [c[1:] for c in SIZE_CASES], ids=[c[0] for c in SIZE_CASES])
def test_size_limits(client, body, headers, status, fragment):
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"} | headers)
    assert_error(r, status, fragment)
    assert_serving(client)


@pytest.mark.parametrize("body,status,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_bodies(client, root, body, status, fragment):
    raw = body if isinstance(body, bytes) else json.dumps(body).replace("{root}", str(root)).encode()
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, status, fragment)
    assert_serving(client)


def test_the_corpus_is_large_enough():
    assert len(SIZE_CASES) + len(CASES) >= 35


def test_a_long_text_is_refused_before_the_tokenizer(client, pipe, monkeypatch):
    def no_tokenizing(*a, **k):
        raise AssertionError("the tokenizer ran on a prompt over the character limit")
    monkeypatch.setattr(type(pipe.processor), "encode", no_tokenizing)
    t0 = time.perf_counter()
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 2_000_000}]})
    assert_error(r, 400, "characters of text")
    assert time.perf_counter() - t0 < 2


def test_image_size_is_read_from_the_header_before_decoding(client, monkeypatch):
    monkeypatch.setattr("vl2edge.chat_request.load_image", lambda raw: pytest.fail("decoded an image over the limit"))
    assert_error(client.post("/v1/chat/completions", json=parts(image(b64(png(2000, 2000))))), 400, "too large")


@pytest.mark.parametrize("exc", [TypeError, NotImplementedError, AttributeError, ValueError, MemoryError, KeyError,
                                 IndexError, ZeroDivisionError])
def test_any_decoder_exception_is_a_bad_image(client, monkeypatch, exc):
    def broken(*a, **k):
        raise exc("a fuzzed file broke the decoder")
    request = parts(image(b64(png(8, 8))))
    with monkeypatch.context() as m:  # Pillow raising, through whatever vl2edge.processor.load_image makes of it
        m.setattr(Image, "open", broken)
        assert_error(client.post("/v1/chat/completions", json=request), 400, "messages[0].content[0]: cannot read")
    with monkeypatch.context() as m:  # load_image itself letting a decoder's exception through
        m.setattr("vl2edge.chat_request.load_image", broken)
        assert_error(client.post("/v1/chat/completions", json=request), 400,
                     f"messages[0].content[0]: cannot read the image ({exc.__name__}")
    assert_serving(client)


def test_fuzzed_image_files_never_500(client):
    rng = random.Random(7)
    seeds = []
    for fmt in ("PNG", "GIF", "BMP", "TIFF", "JPEG", "ICO", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (24, 20), "green").save(buf, fmt)
        seeds.append(buf.getvalue())
    for n in range(36):
        raw = bytearray(seeds[n % len(seeds)])
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        r = client.post("/v1/chat/completions", json=parts(image(b64(bytes(raw)))) | {"max_tokens": 1})
        assert r.status_code in (200, 400), r.text
    assert_serving(client)


def test_routes_that_do_not_exist_get_the_same_error_shape(client):
    assert_error(client.get("/v1/chat/completions"), 405, "Method Not Allowed")
    assert_error(client.post("/v1/nothing", json=OK), 404, "Not Found")


# -- remote images (no network: addresses that fail before any traffic leaves) --------------------------------

@pytest.mark.parametrize("url", ["http://[::1", "http://exa mple.com/x.png", "http://127.0.0.1:1/x.png",
                                 "https://127.0.0.1:99999/x.png", "http://%zz/x.png"])
def test_unfetchable_remote_images(pipe, url):
    c = TestClient(create_app(pipe, allow_remote=True, limits=LIMITS))
    assert_error(c.post("/v1/chat/completions", json=parts(image(url))), 400, "cannot fetch")


# -- API keys -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["", " ", "\t\n"])
def test_an_empty_api_key_is_refused_at_start_up(pipe, key):
    with pytest.raises(InputError, match="empty API key"):
        create_app(pipe, api_key=key)
    with pytest.raises(InputError, match="empty API key"):
        serve(pipe, port=0, api_key=key)


@pytest.mark.parametrize("header", [None, b"", b"Bearer", b"Bearer ", b"sekret", b"Bearer sekre", b"Bearer sekrett",
                                    b"Basic sekret", b"Bearer \xff\xfe\x00", "Bearer sékret".encode()])
def test_wrong_api_keys(pipe, monkeypatch, header):
    compared = []
    real = vl2edge.server.hmac.compare_digest
    monkeypatch.setattr(vl2edge.server.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    c = TestClient(create_app(pipe, api_key="sekret", limits=LIMITS))
    headers = {} if header is None else {"authorization": header}
    assert_error(c.post("/v1/chat/completions", json=OK, headers=headers), 401, "API key")
    assert_error(c.get("/v1/models", headers=headers), 401, "API key")
    assert compared and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in compared)


@pytest.mark.parametrize("scheme", [b"Bearer", b"bearer", b"BEARER"])
def test_the_auth_scheme_is_case_insensitive(pipe, scheme):
    c = TestClient(create_app(pipe, api_key="sekret", limits=LIMITS))
    assert c.get("/v1/models", headers={"authorization": scheme + b" sekret"}).status_code == 200


def test_a_non_ascii_api_key_works(pipe):
    c = TestClient(create_app(pipe, api_key="sékret", limits=LIMITS))
    assert c.get("/v1/models", headers={"authorization": "Bearer sékret".encode()}).status_code == 200
    assert TestClient(create_app(pipe, api_key=None)).get("/v1/models").status_code == 200  # None: no auth


# -- bodies that stream: counted while they arrive (the app driven directly, so every byte is accounted) ------

def asgi_post(app, chunks, headers=(), disconnect_after=None, path="/v1/chat/completions"):
    """POST to the ASGI app; -> (status, body, bytes the app pulled). After `disconnect_after` chunks the client
    hangs up."""
    pulled, sent = [0], {"status": None, "body": b""}
    chunks = iter(chunks)
    count = [0]

    async def receive():
        if disconnect_after is not None and count[0] >= disconnect_after:
            return {"type": "http.disconnect"}
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        count[0] += 1
        pulled[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), *headers], "client": ("127.0.0.1", 9),
             "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    return sent["status"], json.loads(sent["body"]) if sent["body"] else None, pulled[0]


MiB = 2**20


def test_a_chunked_200MB_body_is_refused_after_the_cap(app, client):
    status, body, pulled = asgi_post(app, (b"x" * MiB for _ in range(200)))
    assert status == 413 and "larger than 12,582,912 bytes" in body["error"]["message"]
    assert pulled <= CAP + MiB  # stopped reading one chunk past the cap, not after 200 MB
    assert_serving(client)


def test_a_lying_content_length_is_not_trusted(app):
    status, _, pulled = asgi_post(app, (b"x" * MiB for _ in range(200)), headers=[(b"content-length", b"10")])
    assert status == 413 and pulled <= CAP + MiB


def test_an_honest_content_length_over_the_cap_is_refused_before_reading(app):
    status, _, pulled = asgi_post(app, (b"x" * MiB for _ in range(200)),
                                  headers=[(b"content-length", str(200 * MiB).encode())])
    assert status == 413 and pulled == 0


def test_a_full_queue_is_refused_before_reading(app):
    app.state.counters["waiting"] = 16
    try:
        status, body, pulled = asgi_post(app, (b"x" * MiB for _ in range(20)))
    finally:
        app.state.counters["waiting"] = 0
    assert status == 429 and pulled == 0 and "busy" in body["error"]["message"]


def test_a_client_that_hangs_up_mid_body(app, client):
    status, body, _ = asgi_post(app, [b'{"messages": [', b'{"role": "user"'], disconnect_after=1)
    assert status == 400 and "closed the connection" in body["error"]["message"]
    assert app.state.counters["waiting"] == 0
    assert_serving(client)


def test_a_client_that_leaves_a_stream_gives_its_queue_place_back(app, client):
    with client.stream("POST", "/v1/chat/completions", json=OK | {"stream": True, "max_tokens": 4}) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.time() + 10
    while app.state.counters["waiting"] and time.time() < deadline:
        time.sleep(0.02)
    assert app.state.counters["waiting"] == 0
    assert_serving(client)


# -- a live server: memory stays bounded while a client streams 200 MB ---------------------------------------

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def live(app, caplog):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, log_level="info"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=10)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info], caplog.text


def test_a_live_server_answers_413_early_with_bounded_memory(live):
    before, peak, sent = _rss(), 0, 0
    with socket.create_connection(("127.0.0.1", live), timeout=10) as c:
        c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % MiB + b"x" * MiB + b"\r\n"
        while sent < 200 * MiB and not select.select([c], [], [], 0)[0]:
            c.sendall(chunk)
            sent += MiB
            peak = max(peak, _rss() - before)
        head = c.recv(65536)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert sent < 100 * MiB  # answered while the client was still sending
    assert peak < 64 * MiB, f"RSS grew by {peak / MiB:.0f} MiB"


def test_a_live_server_survives_clients_that_hang_up(live):
    for head in (b"Content-Length: 5000\r\n\r\n{\"messages\": [", b"Transfer-Encoding: chunked\r\n\r\n10\r\n{\"mess"):
        with socket.create_connection(("127.0.0.1", live), timeout=10) as c:
            c.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + head)
    time.sleep(0.3)
    import httpx
    r = httpx.post(f"http://127.0.0.1:{live}/v1/chat/completions", json=OK, timeout=30)
    assert r.status_code == 200


# -- property: no JSON-ish body gets a 5xx -------------------------------------------------------------------

NAMES = ["model", "messages", "role", "content", "type", "text", "image_url", "url", "max_tokens", "temperature",
         "top_p", "seed", "stop", "stream"]
WORDS = ["user", "system", "assistant", "text", "image_url", "<image>", "", "hi", "{root}/a.png", "{root}/sub",
         "file:///etc/passwd", "data:image/png;base64,AAAA", b64(png(8, 8)), "http://127.0.0.1:1/x.png"]
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.sampled_from(WORDS)
           | st.text(st.characters() | st.characters(categories=["Cs"]), max_size=12))  # Cs: lone surrogates
anything = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                        | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=4), kids, max_size=5),
                        max_leaves=16)


def mostly(valid, junk=anything):
    """`valid` nine times in ten: junk everywhere at once would stop every request at its first field."""
    return st.integers(0, 9).flatmap(lambda k: junk if k == 0 else valid)


words = st.text(st.sampled_from("ab <>|\ud800\n"), max_size=12) | st.sampled_from(WORDS)
part = st.one_of(
    st.fixed_dictionaries({"type": mostly(st.just("text")), "text": mostly(words)}),
    st.fixed_dictionaries({"type": mostly(st.just("image_url")),
                           "image_url": mostly(st.fixed_dictionaries({"url": mostly(st.sampled_from(WORDS))}))}))
message = st.fixed_dictionaries({"role": mostly(st.sampled_from(["user", "user", "system", "assistant"])),
                                 "content": mostly(words | st.lists(part, min_size=1, max_size=3))})
options = {"model": mostly(st.just("tiny")), "max_tokens": mostly(st.integers(1, 2)),
           "temperature": mostly(st.floats(0, 2)), "top_p": mostly(st.floats(0.1, 1)),
           "seed": mostly(st.integers(0, 2**63 - 1)), "stop": mostly(st.lists(words, max_size=4) | words),
           "stream": mostly(st.booleans())}
request_body = mostly(st.fixed_dictionaries({"messages": mostly(st.lists(message, min_size=1, max_size=3))},
                                            optional=options))


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=request_body, ascii_only=st.booleans())
def test_no_json_ish_body_gets_a_5xx(client, root, body, ascii_only):
    text = json.dumps(body, ensure_ascii=ascii_only).replace("{root}", str(root))
    r = client.post("/v1/chat/completions", content=text.encode("utf-8", "surrogatepass"),
                    headers={"content-type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


# -- clients that stall: a body that never finishes arriving, an answer nobody reads -----------------------

SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
         "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
         "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 9),
         "server": ("127.0.0.1", 80)}


async def _call(app, body: bytes, stall_after: int | None = None, read_events: int | None = None) -> dict:
    """One request: its body sent in 7-byte pieces, the client going silent after `stall_after` of them; the
    response read until `read_events` body messages (then the client stops reading). -> status, body, events."""
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
    got = {"status": None, "body": b"", "events": 0}
    sent = [0]

    async def receive():
        if pieces and sent[0] == stall_after:
            await asyncio.sleep(3600)  # silent: neither more body nor a hang-up
        if pieces:
            sent[0] += 1
            return {"type": "http.request", "body": pieces.pop(0), "more_body": bool(pieces)}
        await asyncio.sleep(3600)  # the body is in; the connection stays open
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            got["status"] = message["status"]
        elif message["type"] == "http.response.body":
            if read_events is not None and got["events"] >= read_events:
                await asyncio.sleep(3600)  # the client stopped reading: the socket's buffer is full
            got["events"] += 1
            got["body"] += message.get("body", b"")

    await asyncio.wait_for(app(dict(SCOPE), receive, send), 30)
    return got


@pytest.mark.parametrize("seed", range(3))
def test_stalled_bodies_get_408_and_hold_no_queue_place(pipe, seed):
    """More stalled clients than queue places, stalling at random points of their bodies: each gets 408 once
    its time is up, none ever counts as waiting, and a normal request meanwhile is answered."""
    rng = random.Random(seed)
    app = create_app(pipe, max_queue=2, limits=Limits(request_timeout_s=1.0, max_output_tokens=4))
    body = json.dumps(OK).encode()

    async def scenario():
        stalled = [asyncio.ensure_future(_call(app, body, stall_after=rng.randrange(0, len(body) // 7)))
                   for _ in range(5)]
        await asyncio.sleep(0.2)
        assert app.state.counters["waiting"] == 0 and app.state.counters["arriving"] == 5
        normal = await _call(app, body)
        return normal, await asyncio.gather(*stalled)

    normal, stalled = asyncio.run(scenario())
    assert normal["status"] == 200 and json.loads(normal["body"])["usage"]["completion_tokens"] == 1
    for got in stalled:
        assert got["status"] == 408 and "did not arrive within 1 s" in json.loads(got["body"])["error"]["message"]
    assert app.state.counters["waiting"] == app.state.counters["arriving"] == 0


def test_too_many_bodies_arriving_at_once_get_429(pipe):
    app = create_app(pipe, limits=Limits(request_timeout_s=0.5, max_arriving=2))
    body = json.dumps(OK).encode()

    async def scenario():
        slow = [asyncio.ensure_future(_call(app, body, stall_after=1)) for _ in range(2)]
        await asyncio.sleep(0.1)
        third = await _call(app, body, stall_after=1)
        return third, await asyncio.gather(*slow)

    third, slow = asyncio.run(scenario())
    assert third["status"] == 429 and "2 requests arriving" in json.loads(third["body"])["error"]["message"]
    assert [g["status"] for g in slow] == [408, 408]


def test_a_stream_nobody_reads_is_cancelled_and_frees_its_place(pipe):
    """A streaming client that stops reading after the first event: its answer ends after send_timeout_s, its
    place on the model comes back and the next request is served."""
    app = create_app(pipe, max_queue=1, limits=Limits(send_timeout_s=0.5, max_output_tokens=64))
    body = json.dumps(req(stream=True, max_tokens=64)).encode()

    async def scenario():
        t0 = time.perf_counter()
        stuck = await _call(app, body, read_events=1)
        took = time.perf_counter() - t0
        return stuck, took, await _call(app, json.dumps(OK).encode())

    stuck, took, after = asyncio.run(scenario())
    assert stuck["status"] == 200 and stuck["events"] == 1 and took < 10  # the response ended, unread
    assert after["status"] == 200 and app.state.counters["waiting"] == 0  # its place came back


def _local(root, name: str) -> dict:
    return parts({"type": "text", "text": "what?"}, image(str(root / name)))


@pytest.mark.parametrize("name", ["x" * 300 + ".png", "a.png/inside", ("d" * 250 + "/") * 20 + "a.png", "sub",
                                  "fifo", "zero"])
def test_every_os_error_on_a_local_image_path_is_a_4xx(client, root, name):
    """Over-long names, paths through a file, folders, FIFOs, devices under --allowed-root: the client's error."""
    if name == "fifo" and not (root / "fifo").exists():
        os.mkfifo(root / "fifo")
    if name == "zero" and not (root / "zero").exists():
        (root / "zero").symlink_to("/dev/zero")
    r = client.post("/v1/chat/completions", json=_local(root, name))
    assert 400 <= r.status_code < 500, r.text
    assert_serving(client)


def test_a_png_named_pdf_is_read_as_the_picture_it_is(client, root):
    (root / "picture.pdf").write_bytes(png(16, 16))
    r = client.post("/v1/chat/completions", json=_local(root, "picture.pdf"))
    assert r.status_code == 200, r.text
