"""OpenAI-compatible HTTP server: POST /v1/chat/completions (streaming as server-sent events),
GET /v1/models, GET /v1/models/{id}, GET /health, and the built-in chat page at GET / (`ui=False`:
off). FastAPI + uvicorn.

Messages take OpenAI's shape: `content` is a string or a list of `{"type": "text", "text": ...}` and
`{"type": "image_url", "image_url": {"url": ...}}` parts; every image becomes an `<image>` placeholder
where it stands (`developer` messages count as `system`). Images come from `data:` URLs, from files under
`--allowed-root` only, and from http(s) only with `--allow-remote-images`. As many requests run on the model
at once as the pipeline's continuous-batching engine has slots (`--max-batch`; one without it); up to
`max_queue` wait (counted once a request's body is in: a client that stalls mid-body holds no place),
more get 429 with `Retry-After`. A client that disconnects cancels its request: a running generation stops
before its next decode step, a waiting one never starts. Grounding boxes ride along in an extra `vl2edge`
field. Every response carries `x-request-id` (the client's, when it sent a sane one); `cors_origins` turns
on CORS for browser front ends. Needs the `serve` extra (fastapi, uvicorn). Reading and validating a
request into work is vl2edge/chat_request.py (which options are supported, accepted or refused).

Bad requests get OpenAI's error shape (`{"error": {"message", "type", "param", "code"}}`, `code` a string
or null) with a 4xx status, never a 500 or a traceback, and the server keeps serving. Every limit
(`Limits`) is checked before the work it bounds:

- 401: a missing or wrong API key (`Authorization: Bearer KEY`, the scheme in any case; compared in
  constant time; an empty key is refused at start-up).
- 404: an unknown route, or a `model` that is not one of the served names.
- 405: a known route with the wrong method.
- 429: `max_queue` requests already waiting (checked before the body is read), or `max_arriving` (64)
  bodies arriving at once.
- 408: a body that has not arrived whole within `request_timeout_s` (30 s). A streamed answer whose client
  takes no piece of it for `send_timeout_s` (60 s) is cancelled like one whose client hung up.
- 413: a body over `max_request_bytes` (32 MiB): refused from an honest Content-Length before reading,
  counted while it streams in otherwise (chunked, or a Content-Length that lies), so no more is ever
  held; a body with more than `max_json_values` commas and brackets (default 2**18, or twice the text
  budget; each JSON value costs 50-100 bytes of Python objects); an image file or download over
  `max_request_bytes`.
- 400, naming the field (`param`) and the allowed values: a body that is not UTF-8 JSON or that
  `schema.loads` refuses (nesting deeper than 32, integers past 20 digits, NaN/Infinity, `1e400`); a field
  of the wrong type or out of range (`max_completion_tokens`/`max_tokens` in [1, `max_output_tokens`]
  (2048), `temperature` in [0, 2], `top_p` in [0, 1], `seed` a 64-bit integer, penalties in [-2, 2],
  `logit_bias` token ids to [-100, 100], `top_logprobs` in [0, 20], `stop` up to 4 strings of at most 1024
  characters, `stream` a boolean); an unsupported or unknown option (`tools`, `n` > 1, `audio`, ...: code
  `unsupported_parameter`); a `response_format` schema the grammar library cannot compile (its reason); a
  string with a lone surrogate; more messages than the prompt may have tokens; more than
  `max_prompt_chars` characters of text across all messages (default 8 per prompt token, counted before
  tokenizing); more than `max_images` (8) images; an image over `max_image_pixels` (40 M, read from its
  header before decoding) or one that does not decode (any exception from the decoder); a prompt of
  `max_prompt_tokens` tokens or more (default: the model's context); a client that hangs up mid-body.
- 403: a local image outside `--allowed-root` (symlinks resolved), or local images disabled.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import serve_options
from .chat_request import (
    BODY,
    CappedBuffer,
    HTTPError,
    Limits,
    generation_options,
    parse_body,
    refuse_unsupported,
    response_format,
    to_conversation,
)
from .errors import VL2Error

log = logging.getLogger("vl2edge.server")


ROUTE_CODES = {404: "not_found", 405: "method_not_allowed"}
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CANCEL_POLL_S = 0.05  # how often a waiting or running request checks whether its client is still there
UI_PAGE = Path(__file__).with_name("ui.html")
# the page may load nothing from elsewhere: its own inline script and style, images from data: URLs only
UI_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
          "connect-src 'self'; base-uri 'none'; form-action 'none'")


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers=None) -> JSONResponse:
    """OpenAI's error body: message, type, param (the field, or null) and code (a string, or null)."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def refusal(e: Exception) -> JSONResponse:
    if isinstance(e, HTTPError):
        return error_response(e.status, e.message, e.kind, e.param, e.code, e.headers)
    assert isinstance(e, VL2Error)
    return error_response(400, str(e), param=e.param)


class CancellingStream(StreamingResponse):
    """A streamed answer that cancels its generation however the response ends: finished, the client gone
    mid-stream, the client gone before the first byte (then starlette never starts the body at all), or a
    client that stops reading: a piece it has not taken within `send_timeout_s` ends the answer."""

    def __init__(self, content, gen, on_end, send_timeout_s: float, **kw):
        super().__init__(content, **kw)
        self.gen, self.on_end, self.send_timeout_s = gen, on_end, send_timeout_s

    async def __call__(self, scope, receive, send):
        async def send_in_time(message):
            try:
                await asyncio.wait_for(send(message), self.send_timeout_s)
            except TimeoutError:
                raise ClientDisconnect() from None

        try:
            await super().__call__(scope, receive, send_in_time)
        except (ClientDisconnect, OSError):
            pass  # the client is gone or stalled: nothing more can reach it
        finally:
            self.on_end()
            self.gen.cancel()


class RequestIds:
    """ASGI middleware: every response gets `x-request-id`, the client's when it sent a sane one (letters,
    digits, `._:-`, at most 128), else a new one. Pure ASGI, so streaming and disconnects pass through."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}"

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        return await self.app(scope, receive, send_with_id)


# -- bytes with a cap: the request body, a remote image, a local image file ------------------------------

async def read_body(request: Request, cap: int, timeout_s: float) -> bytes:
    """The request body, refused (413) before reading when an honest Content-Length passes `cap`, and while
    streaming when a chunked or lying body does; 400 when the client hangs up before the end, 408 when the
    whole body has not arrived within `timeout_s` (a client that stalls mid-body)."""
    try:
        return await asyncio.wait_for(_read_capped(request, cap), timeout_s)
    except TimeoutError:
        raise HTTPError(408, f"{BODY} did not arrive within {timeout_s:g} s", code="request_timeout") from None


async def _read_capped(request: Request, cap: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        declared = declared.strip()
        if not (declared.isascii() and declared.isdigit()):
            raise HTTPError(400, f"the Content-Length header must be a number of bytes, got {declared[:40]!r}")
        if len(declared) > 20 or int(declared) > cap:
            raise HTTPError(413, f"{BODY} is larger than {cap:,} bytes, the most this server takes")
    buffer = CappedBuffer(cap, BODY)
    try:
        async for chunk in request.stream():
            buffer.add(chunk)
    except ClientDisconnect:
        raise HTTPError(400, "the client closed the connection before sending the whole request body") from None
    return buffer.bytes()


class FifoSlots:
    """`n` places on the model, given in arrival order (a semaphore wakes its waiters in any order, which let
    one request wait 40 s while later ones went first)."""

    def __init__(self, n: int):
        self.free, self.cond = n, threading.Condition()
        self.line: collections.deque[object] = collections.deque()

    def acquire(self, cancelled: Callable[[], bool]) -> bool:
        """Wait for a place, in arrival order; False (out of the line) as soon as `cancelled()` says so."""
        me = object()
        with self.cond:
            self.line.append(me)
            try:
                while not (self.line[0] is me and self.free > 0):
                    if cancelled():
                        return False
                    self.cond.wait(CANCEL_POLL_S)
                self.free -= 1
                return True
            finally:
                self.line.remove(me)
                self.cond.notify_all()

    def release(self) -> None:
        with self.cond:
            self.free += 1
            self.cond.notify_all()


class _Ticket:
    """A request's place in one of the server's counts (`state[key]`: bodies arriving, requests waiting):
    taken on admission, given back exactly once."""

    def __init__(self, state: dict, lock: threading.Lock, key: str):
        self.state, self.lock, self.key, self.held = state, lock, key, True

    def release(self) -> None:
        with self.lock:
            if self.held:
                self.state[self.key] -= 1
                self.held = False


def create_app(pipe, name: str = "vl2edge", api_key: str | None = None, allowed_root=None,
               allow_remote: bool = False, max_queue: int = 16, limits: Limits | None = None,
               aliases: tuple[str, ...] = (), cors_origins: tuple[str, ...] = (), ui: bool = True):
    """The app. `name` is the model id /v1/models reports; a request's `model` may also be one of `aliases`
    (the directory or hub id it was started with); `cors_origins` ("*" for any) enables CORS; `ui` serves
    the chat page (vl2edge/ui.html) at `/`."""
    api_key = serve_options.api_key(api_key)  # the one rule for keys, the command line's too
    limits = (limits or Limits()).resolved(pipe.context_length)
    root = Path(allowed_root).resolve() if allowed_root else None
    names = tuple(dict.fromkeys((name, *aliases)))
    fingerprint = f"vl2edge-{type(pipe.backend).__name__}"
    app = FastAPI(title="vl2edge", docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type", "x-request-id"],
                           expose_headers=["x-request-id"], max_age=600)
    app.add_middleware(RequestIds)
    state = {"waiting": 0, "arriving": 0, "served": 0, "failed": 0, "cancelled": 0, "mean_s": 1.0}
    # answers running at once: one per batch slot of the engine (Pipeline.start_batching), else one
    places = pipe.engine.max_batch if pipe.engine is not None else 1
    model_slots = FifoSlots(places)
    queue_lock = threading.Lock()

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request, exc):  # 404, 405, ...: the same error shape as ours
        return error_response(exc.status_code, str(exc.detail), code=ROUTE_CODES.get(exc.status_code),
                              headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # a bug: logged by uvicorn, never shown to the client
        return error_response(500, "internal server error", "server_error")

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # starlette decodes headers as latin-1: back to the bytes sent; compared before the scheme is looked at
        ok = hmac.compare_digest(given.strip().encode("latin-1"), api_key.encode()) and scheme.lower() == "bearer"
        if not ok:
            raise HTTPError(401, "missing or wrong API key", "authentication_error", code="invalid_api_key")

    def busy(what: str) -> HTTPError:
        # a request's mean time on the model, over the places that serve the line at once
        wait = max(1, math.ceil(state["mean_s"] * (state["waiting"] + 1) / places))
        return HTTPError(429, f"the server is busy ({what}); retry later", "rate_limit_error",
                         code="rate_limit_exceeded", headers={"Retry-After": str(wait)})

    def admit(key: str) -> _Ticket:
        """A place in the queue ("waiting", once the body is in) or among the bodies arriving ("arriving")."""
        with queue_lock:
            if state["waiting"] >= max_queue:  # checked first either way: a full queue reads no body
                raise busy(f"{max_queue} requests waiting")
            if key == "arriving" and state["arriving"] >= limits.max_arriving:
                raise busy(f"{limits.max_arriving} requests arriving")
            state[key] += 1
        return _Ticket(state, queue_lock, key)

    def model_object(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "vl2edge"}

    def prepare(raw: bytes):
        """Everything that can be refused, cheapest first; runs in a worker thread (parsing, images, tokenizer)."""
        body = parse_body(raw, limits)
        model = body.text("model", None, max_len=256)
        if model is not None and model not in names:
            raise HTTPError(404, f"the model {model[:100]!r} does not exist here; this server serves "
                                 f"{', '.join(map(repr, names))}", param="model", code="model_not_found")
        refuse_unsupported(body)
        options = generation_options(body, limits, pipe.vocab_size)
        stream = body.boolean("stream", False)
        usage_chunk = body.sub("stream_options", {}).boolean("include_usage", False)
        if body.has("stream_options") and not stream:
            raise HTTPError(400, "stream_options is only allowed with stream: true", param="stream_options")
        fmt = response_format(body)
        conv, images = to_conversation(body, root, allow_remote, limits)
        inputs = pipe.processor(conv, images)
        tokens, most = inputs.input_ids.shape[1], limits.max_prompt_tokens or pipe.context_length
        if tokens >= most:
            raise HTTPError(400, f"the prompt is {tokens} tokens (images included); this server takes at most "
                                 f"{most - 1}", param="messages")
        return pipe.generation(conv, images, inputs=inputs, response_format=fmt, **options), stream, usage_chunk

    if ui:
        page = UI_PAGE.read_text(encoding="utf-8")

        @app.get("/", include_in_schema=False)
        async def index():
            """The chat page: static, no secrets in it; its API calls carry the key the user types in."""
            return HTMLResponse(page, headers={"content-security-policy": UI_CSP, "cache-control": "no-cache"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "waiting": state["waiting"], "served": state["served"]}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_auth(request)
        except HTTPError as e:
            return refusal(e)
        return {"object": "list", "data": [model_object(name)]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str, request: Request):
        try:
            check_auth(request)
        except HTTPError as e:
            return refusal(e)
        if model_id not in names:
            return error_response(404, f"the model {model_id[:100]!r} does not exist here", param="model",
                                  code="model_not_found")
        return model_object(name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            check_auth(request)
            arriving = admit("arriving")  # before reading the body: a full queue costs no memory
            try:
                raw = await read_body(request, limits.max_request_bytes, limits.request_timeout_s)
            finally:
                arriving.release()
            ticket = admit("waiting")  # a place in the queue only once the body is in: a stalled client holds none
            try:
                gen, stream, usage_chunk = await asyncio.to_thread(prepare, raw)
                del raw
            except BaseException:
                ticket.release()
                raise
        except (HTTPError, VL2Error) as e:
            return refusal(e)
        if stream:
            return stream_answer(gen, ticket, usage_chunk)
        return await answer(request, gen, ticket)

    def extra(res):
        return {"boxes": [b.as_dict() for b in res.boxes], "grounding_problems": res.grounding_problems,
                "timings": res.timings}

    def usage(res):
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
                "total_tokens": res.prompt_tokens + len(res.token_ids),
                "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}  # from the prefix cache

    def run_locked(gen, ticket: _Ticket, each=None):
        """Wait for a place on the model (dropping out if the client has gone), then run `gen`; False when
        cancelled first."""
        try:
            if not model_slots.acquire(lambda: gen.cancelled):
                return False
        finally:
            ticket.release()
        try:
            if gen.cancelled:
                return False
            t0 = time.perf_counter()
            for piece in gen:
                if each is not None:
                    each(piece)
            state["mean_s"] = 0.8 * state["mean_s"] + 0.2 * (time.perf_counter() - t0)
            return True
        finally:
            model_slots.release()

    async def answer(request: Request, gen, ticket: _Ticket):
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        work = asyncio.ensure_future(asyncio.to_thread(run_locked, gen, ticket))
        while not work.done():  # a client that hangs up (a timeout, Ctrl-C) cancels its generation
            await asyncio.wait({work}, timeout=CANCEL_POLL_S)
            if not work.done() and await request.is_disconnected():
                gen.cancel()
        try:
            finished = work.result()
        except VL2Error as e:
            state["failed"] += 1
            return refusal(e)
        if not finished or gen.cancelled:
            state["cancelled"] += 1
            return error_response(499, "the client closed the request", code="cancelled")
        res = gen.result
        state["served"] += 1
        choice = {"index": 0, "message": {"role": "assistant", "content": res.text, "refusal": None},
                  "logprobs": None if res.logprobs is None else {"content": res.logprobs, "refusal": None},
                  "finish_reason": res.finish_reason}
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "system_fingerprint": fingerprint, "choices": [choice], "usage": usage(res), "vl2edge": extra(res)}

    def stream_answer(gen, ticket: _Ticket, usage_chunk: bool) -> StreamingResponse:
        """Server-sent events. The producer starts now and owns the ticket, so a client that leaves before
        the first event still gives its queue place back; one that leaves mid-answer cancels the generation,
        which stops before its next decode step. Usage comes as a last chunk with no choices when the
        request asked for it (`stream_options.include_usage`)."""
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        want_logprobs = gen.options.logprobs is not None

        def put(kind, value):
            if not gen.cancelled:
                loop.call_soon_threadsafe(pieces.put_nowait, (kind, value))

        def produce():
            try:
                if run_locked(gen, ticket, lambda piece: put("piece", (piece, gen.new_logprobs()))):
                    put("done", gen.result)
            except Exception as e:
                if not isinstance(e, VL2Error):
                    log.error("the streamed generation failed", exc_info=e)
                put("error", e)

        def event(choices, **more):
            return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                          "model": name, "system_fingerprint": fingerprint, "choices": choices,
                                          **more}) + "\n\n"

        def chunk(delta, finish=None, logprobs=None):
            lp = {"content": logprobs, "refusal": None} if want_logprobs and logprobs else None
            return event([{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}])

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await pieces.get()
                if kind == "piece":
                    yield chunk({"content": value[0]}, logprobs=value[1])
                elif kind == "done":
                    state["served"] += 1
                    yield chunk({}, value.finish_reason, logprobs=gen.new_logprobs())
                    if usage_chunk:
                        yield event([], usage=usage(value), vl2edge=extra(value))
                    break
                else:
                    state["failed"] += 1
                    failed.append(value)
                    msg = str(value) if isinstance(value, VL2Error) else "internal server error"
                    yield "data: " + json.dumps({"error": {"message": msg, "type": "server_error",
                                                           "param": None, "code": None}}) + "\n\n"
                    break
            yield "data: [DONE]\n\n"

        def ended():
            if gen.result is None and not failed:
                state["cancelled"] += 1

        failed: list = []
        threading.Thread(target=produce, daemon=True).start()
        return CancellingStream(events(), gen, ended, limits.send_timeout_s, media_type="text/event-stream")

    app.state.counters = state
    return app


def serve(pipe, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    import uvicorn

    uvicorn.run(create_app(pipe, **kw), host=host, port=port, log_level="warning")
