"""OpenAI-compatible HTTP server: POST /v1/chat/completions (streaming as server-sent events),
GET /v1/models, GET /health. FastAPI + uvicorn.

Messages take OpenAI's shape: `content` is a string or a list of `{"type": "text", "text": ...}` and
`{"type": "image_url", "image_url": {"url": ...}}` parts; every image becomes an `<image>` placeholder
where it stands. Images come from `data:` URLs, from files under `--allowed-root` only, and from
http(s) only with `--allow-remote-images`. One request runs on the model at a time; up to
`max_queue` wait, more get 429. Bad requests get a JSON error with a 4xx status, never a traceback,
and the server keeps serving. Grounding boxes ride along in an extra `vl2edge` field.
Needs the `serve` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .errors import InputError, VL2Error
from .processor import load_image


@dataclass
class Limits:
    max_request_bytes: int = 32 * 2**20
    max_image_pixels: int = 40_000_000
    max_images: int = 8
    max_output_tokens: int = 2048
    max_prompt_tokens: int | None = None  # default: the model's context
    remote_timeout_s: float = 10.0


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _image_bytes(url: str, allowed_root: Path | None, allow_remote: bool, limits: Limits) -> bytes:
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or ";base64" not in head:
            raise HTTPError(400, "a data URL must be data:<type>;base64,<data>")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPError(400, "the data URL's base64 payload is invalid") from None
        return raw
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise HTTPError(400, "remote images are disabled on this server (start it with --allow-remote-images)")
        import httpx

        try:
            with httpx.stream("GET", url, timeout=limits.remote_timeout_s, follow_redirects=True) as r:
                r.raise_for_status()
                chunks, size = [], 0
                for c in r.iter_bytes():
                    size += len(c)
                    if size > limits.max_request_bytes:
                        raise HTTPError(413, f"the image at {url} is larger than {limits.max_request_bytes} bytes")
                    chunks.append(c)
                return b"".join(chunks)
        except httpx.HTTPError as e:
            raise HTTPError(400, f"cannot fetch {url}: {e}") from None
    path = url[len("file://"):] if url.startswith("file://") else url
    if allowed_root is None:
        raise HTTPError(403, "local image files are disabled on this server (start it with --allowed-root DIR)")
    try:
        p = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):
        raise HTTPError(400, f"bad image path {path!r}") from None
    if not p.is_relative_to(allowed_root):
        raise HTTPError(403, f"{path} is outside the allowed image directory")
    if not p.is_file():
        raise HTTPError(400, f"image not found: {path}")
    if p.stat().st_size > limits.max_request_bytes:
        raise HTTPError(413, f"{path} is larger than {limits.max_request_bytes} bytes")
    return p.read_bytes()


def to_conversation(messages, allowed_root, allow_remote, limits: Limits) -> tuple[list[dict], list]:
    """OpenAI messages -> (our conversation, PIL images in placeholder order)."""
    from PIL import Image

    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "messages must be a non-empty list")
    images: list[Image.Image]
    conv, images = [], []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise HTTPError(400, "each message needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise HTTPError(400, "message content must be a string or a list of parts")
        text = ""
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if "<image>" in part["text"]:
                    raise HTTPError(400, "text may not contain <image>; send images as image_url parts")
                text += part["text"]
            elif kind == "image_url":
                if m["role"] != "user":
                    raise HTTPError(400, "only user messages may carry images")
                iu = part.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                if not isinstance(url, str):
                    raise HTTPError(400, "image_url needs a url string")
                if len(images) >= limits.max_images:
                    raise HTTPError(400, f"at most {limits.max_images} images per request")
                raw = _image_bytes(url, allowed_root, allow_remote, limits)
                old = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
                try:
                    images.append(load_image(raw))
                except InputError as e:
                    raise HTTPError(400, str(e)) from None
                finally:
                    Image.MAX_IMAGE_PIXELS = old
                if images[-1].width * images[-1].height > limits.max_image_pixels:
                    raise HTTPError(413, f"an image has more than {limits.max_image_pixels} pixels")
                text += "<image>\n"
            else:
                raise HTTPError(400, f"unsupported content part {str(part)[:60]}")
        conv.append({"role": m["role"], "content": text})
    return conv, images


def _number(body, key, default, lo, hi, kind=float):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
        raise HTTPError(400, f"{key} must be a number")
    if not lo <= v <= hi:
        raise HTTPError(400, f"{key} must be between {lo} and {hi}")
    return kind(v)


def create_app(pipe, name: str = "vl2edge", api_key: str | None = None, allowed_root=None,
               allow_remote: bool = False, max_queue: int = 16, limits: Limits | None = None):
    limits = limits or Limits()
    root = Path(allowed_root).resolve() if allowed_root else None
    app = FastAPI(title="vl2edge", docs_url=None, redoc_url=None)
    state = {"waiting": 0, "served": 0, "failed": 0}
    model_lock = threading.Lock()
    queue_lock = threading.Lock()

    def error(status: int, message: str, kind: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)

    @app.exception_handler(Exception)
    async def unexpected(request, exc):  # a bug: logged by uvicorn, never shown to the client
        return error(500, "internal server error", "server_error")

    def check_auth(request: Request):
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise HTTPError(401, "missing or wrong API key", "authentication_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "waiting": state["waiting"], "served": state["served"]}

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            check_auth(request)
        except HTTPError as e:
            return error(e.status, e.message, e.kind)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vl2edge"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        try:
            check_auth(request)
            size = int(request.headers.get("content-length") or 0)
            if size > limits.max_request_bytes:
                raise HTTPError(413, f"request body over {limits.max_request_bytes} bytes")
            raw = await request.body()
            if len(raw) > limits.max_request_bytes:
                raise HTTPError(413, f"request body over {limits.max_request_bytes} bytes")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise HTTPError(400, "the request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise HTTPError(400, "the request body must be a JSON object")
            conv, images = await asyncio.to_thread(to_conversation, body.get("messages"), root, allow_remote, limits)
            cap = limits.max_output_tokens
            kw = {"max_new_tokens": _number(body, "max_tokens", min(512, cap), 1, cap, int),
                  "temperature": _number(body, "temperature", 0.0, 0.0, 2.0),
                  "top_p": _number(body, "top_p", 1.0, 1e-6, 1.0),
                  "seed": None if body.get("seed") is None else _number(body, "seed", 0, 0, 2**63 - 1, int),
                  "stop": body.get("stop")}
            stop = kw["stop"]
            if stop is not None and not isinstance(stop, str) and not (
                    isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop)):
                raise HTTPError(400, "stop must be a string or a list of up to 4 strings")
            inputs = await asyncio.to_thread(pipe.processor, conv, images)
            limit = limits.max_prompt_tokens or pipe.context_length
            if inputs.input_ids.shape[1] >= limit:
                raise HTTPError(400, f"the prompt is {inputs.input_ids.shape[1]} tokens (images included); "
                                     f"this server takes at most {limit - 1}")
            with queue_lock:
                if state["waiting"] >= max_queue:
                    raise HTTPError(429, f"the server is busy ({max_queue} requests waiting); retry later",
                                    "rate_limit_error")
                state["waiting"] += 1
        except HTTPError as e:
            return error(e.status, e.message, e.kind)
        except VL2Error as e:
            return error(400, str(e))
        try:
            gen = pipe.generation(conv, images, inputs=inputs, **kw)
        except VL2Error as e:
            state["waiting"] -= 1
            return error(400, str(e))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def extra(res):
            return {"boxes": [b.as_dict() for b in res.boxes], "grounding_problems": res.grounding_problems,
                    "timings": res.timings}

        def usage(res):
            return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.token_ids),
                    "total_tokens": res.prompt_tokens + len(res.token_ids)}

        if not body.get("stream"):
            def run():
                with model_lock:
                    state["waiting"] -= 1
                    for _ in gen:
                        pass
                    return gen.result
            try:
                res = await asyncio.to_thread(run)
            except VL2Error as e:
                state["failed"] += 1
                return error(400, str(e))
            state["served"] += 1
            return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                                 "finish_reason": res.finish_reason}],
                    "usage": usage(res), "vl2edge": extra(res)}

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()

        def produce():
            try:
                with model_lock:
                    state["waiting"] -= 1
                    for piece in gen:
                        loop.call_soon_threadsafe(pieces.put_nowait, ("piece", piece))
                loop.call_soon_threadsafe(pieces.put_nowait, ("done", gen.result))
            except Exception as e:
                loop.call_soon_threadsafe(pieces.put_nowait, ("error", e))

        def chunk(delta, finish=None, **more):
            return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                          "model": name, "choices": [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}], **more}) + "\n\n"

        async def events():
            threading.Thread(target=produce, daemon=True).start()
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
        return StreamingResponse(events(), media_type="text/event-stream")

    app.state.counters = state
    return app


def serve(pipe, host: str = "127.0.0.1", port: int = 8000, **kw) -> None:
    import uvicorn

    uvicorn.run(create_app(pipe, **kw), host=host, port=port, log_level="warning")
