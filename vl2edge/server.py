"""OpenAI-compatible HTTP server: POST /v1/chat/completions (streaming as server-sent events),
GET /v1/models, GET /health. FastAPI + uvicorn.

Messages take OpenAI's shape: `content` is a string or a list of `{"type": "text", "text": ...}` and
`{"type": "image_url", "image_url": {"url": ...}}` parts; every image becomes an `<image>` placeholder
where it stands. Images come from `data:` URLs, from files under `--allowed-root` only, and from
http(s) only with `--allow-remote-images`. One request runs on the model at a time; up to
`max_queue` wait (counted from the moment a request is admitted, before its body is read), more get 429.
Grounding boxes ride along in an extra `vl2edge` field. Needs the `serve` extra (fastapi, uvicorn).
Reading and validating a request into work is vl2edge/chat_request.py.

Bad requests get a JSON error (`{"error": {"message", "type", "code"}}`) with a 4xx status, never a
500 or a traceback, and the server keeps serving. Every limit (`Limits`) is checked before the work it bounds:

- 401: a missing or wrong API key (compared in constant time; an empty key is refused at start-up).
- 429: `max_queue` requests already admitted (checked before the body is read).
- 413: a body over `max_request_bytes` (32 MiB): refused from an honest Content-Length before reading,
  counted while it streams in otherwise (chunked, or a Content-Length that lies), so no more is ever
  held; a body with more than `max_json_values` commas and brackets (default 2**18, or twice the text
  budget; each JSON value costs 50-100 bytes of Python objects); an image file or download over
  `max_request_bytes`.
- 400, naming the field and the allowed values: a body that is not UTF-8 JSON or that `schema.loads`
  refuses (nesting deeper than 32, integers past 20 digits, NaN/Infinity, `1e400`); a field of the wrong
  type or out of range (`max_tokens` in [1, `max_output_tokens`] (2048), `temperature` in [0, 2], `top_p` in
  (0, 1], `seed` in [0, 2**63), `stop` up to 4 strings of at most 1024 characters, `stream` a boolean,
  `model` a string); a string with a lone surrogate; more messages than the prompt may have tokens; more
  than `max_prompt_chars` characters of text across all messages (default 8 per prompt token, counted
  before tokenizing); more than `max_images` (8) images; an image over `max_image_pixels` (40 M, read
  from its header before decoding) or one that does not decode (any exception from the decoder); a prompt
  of `max_prompt_tokens` tokens or more (default: the model's context); a client that hangs up mid-body.
- 403: a local image outside `--allowed-root` (symlinks resolved), or local images disabled.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .chat_request import BODY, CappedBuffer, HTTPError, Limits, generation_options, parse_body, to_conversation
from .errors import InputError, VL2Error

log = logging.getLogger("vl2edge.server")


def error_response(status: int, message: str, kind: str = "invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status,
                        headers=headers)


# -- bytes with a cap: the request body, a remote image, a local image file ------------------------------

async def read_body(request: Request, cap: int) -> bytes:
    """The request body, refused (413) before reading when an honest Content-Length passes `cap`, and while
    streaming when a chunked or lying body does; 400 when the client hangs up before the end."""
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


class _Ticket:
    """A request's place in the queue: taken on admission, given back exactly once."""

    def __init__(self, state: dict, lock: threading.Lock):
        self.state, self.lock, self.held = state, lock, True

    def release(self) -> None:
        with self.lock:
            if self.held:
                self.state["waiting"] -= 1
                self.held = False


def create_app(pipe, name: str = "vl2edge", api_key: str | None = None, allowed_root=None,
               allow_remote: bool = False, max_queue: int = 16, limits: Limits | None = None):
    if api_key is not None and not api_key.strip():
        raise InputError("refusing an empty API key: it would leave the server open to anyone (an unset shell "
                         "variable?); pass a non-empty key, or none to run without authentication")
    expected_auth = None if api_key is None else f"Bearer {api_key}".encode()
    limits = (limits or Limits()).resolved(pipe.context_length)
    root = Path(allowed_root).resolve() if allowed_root else None
    app = FastAPI(title="vl2edge", docs_url=None, redoc_url=None)
    state = {"waiting": 0, "served": 0, "failed": 0}
    model_lock = threading.Lock()
    queue_lock = threading.Lock()

    @app.exception_handler(StarletteHTTPException)
    async def http_exception(request, exc):  # 404, 405, ...: the same error shape as ours
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # a bug: logged by uvicorn, never shown to the client
        return error_response(500, "internal server error", "server_error")

    def check_auth(request: Request) -> None:
        if expected_auth is None:
            return
        given = request.headers.get("authorization", "").encode("latin-1")  # starlette decodes headers as latin-1
        if not hmac.compare_digest(given, expected_auth):
            raise HTTPError(401, "missing or wrong API key", "authentication_error")

    def admit() -> _Ticket:
        with queue_lock:
            if state["waiting"] >= max_queue:
                raise HTTPError(429, f"the server is busy ({max_queue} requests waiting); retry later",
                                "rate_limit_error")
            state["waiting"] += 1
        return _Ticket(state, queue_lock)

    def prepare(raw: bytes):
        """Everything that can be refused, cheapest first; runs in a worker thread (parsing, images, tokenizer)."""
        body = parse_body(raw, limits)
        options = generation_options(body, limits)
        stream = body.boolean("stream", False)
        body.text("model", "", max_len=256)
        conv, images = to_conversation(body, root, allow_remote, limits)
        inputs = pipe.processor(conv, images)
        tokens, most = inputs.input_ids.shape[1], limits.max_prompt_tokens or pipe.context_length
        if tokens >= most:
            raise HTTPError(400, f"the prompt is {tokens} tokens (images included); this server takes at most "
                                 f"{most - 1}")
        return pipe.generation(conv, images, inputs=inputs, **options), stream

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "waiting": state["waiting"], "served": state["served"]}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_auth(request)
        except HTTPError as e:
            return error_response(e.status, e.message, e.kind)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vl2edge"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            check_auth(request)
            ticket = admit()  # before reading the body: a full queue costs no memory
            try:
                raw = await read_body(request, limits.max_request_bytes)
                gen, stream = await asyncio.to_thread(prepare, raw)
                del raw
            except BaseException:
                ticket.release()
                raise
        except HTTPError as e:
            return error_response(e.status, e.message, e.kind)
        except VL2Error as e:
            return error_response(400, str(e))
        if stream:
            return stream_answer(gen, ticket)
        return await answer(gen, ticket)

    def extra(res):
        return {"boxes": [b.as_dict() for b in res.boxes], "grounding_problems": res.grounding_problems,
                "timings": res.timings}

    def usage(res):
        return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
                "total_tokens": res.prompt_tokens + len(res.token_ids)}

    async def answer(gen, ticket: _Ticket):
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def run():
            with model_lock:
                ticket.release()
                for _ in gen:
                    pass
                return gen.result
        try:
            res = await asyncio.to_thread(run)
        except VL2Error as e:
            state["failed"] += 1
            return error_response(400, str(e))
        state["served"] += 1
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                             "finish_reason": res.finish_reason}],
                "usage": usage(res), "vl2edge": extra(res)}

    def stream_answer(gen, ticket: _Ticket) -> StreamingResponse:
        """Server-sent events. The producer starts now and owns the ticket, so a client that leaves before
        the first event still gives its queue place back; one that leaves mid-answer stops the decoding."""
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()

        def produce():
            try:
                with model_lock:
                    ticket.release()
                    for piece in gen:
                        if gone.is_set():
                            return
                        loop.call_soon_threadsafe(pieces.put_nowait, ("piece", piece))
                loop.call_soon_threadsafe(pieces.put_nowait, ("done", gen.result))
            except Exception as e:
                if not isinstance(e, VL2Error):
                    log.error("the streamed generation failed", exc_info=e)
                if not gone.is_set():
                    loop.call_soon_threadsafe(pieces.put_nowait, ("error", e))

        def chunk(delta, finish=None, **more):
            return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                          "model": name, "choices": [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}], **more}) + "\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    kind, value = await pieces.get()
                    if kind == "piece":
                        yield chunk({"content": value})
                    elif kind == "done":
                        state["served"] += 1
                        yield chunk({}, value.finish_reason, usage=usage(value), vl2edge=extra(value))
                        break
                    else:
                        state["failed"] += 1
                        msg = str(value) if isinstance(value, VL2Error) else "internal server error"
                        yield "data: " + json.dumps({"error": {"message": msg, "type": "server_error"}}) + "\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                gone.set()

        threading.Thread(target=produce, daemon=True).start()
        return StreamingResponse(events(), media_type="text/event-stream")

    app.state.counters = state
    return app


def serve(pipe, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    import uvicorn

    uvicorn.run(create_app(pipe, **kw), host=host, port=port, log_level="warning")
