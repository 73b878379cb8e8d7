"""The OpenAI chat request, from bytes to work: the body parsed with limits and validated field by field
into a conversation, its images (data URLs, allowed local files, remote URLs when enabled; fetched and
decoded within caps) and generation options. Every problem is an `HTTPError` with a 4xx status and a
message naming the field; the statuses and limits are listed in vl2edge/server.py.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .images import load_image
from .sampling import MAX_BIAS
from .schema import Fields, check_text, loads

BODY = "the request body"
ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system
# The request fields: what is supported, what is accepted and has no effect here (OpenAI bookkeeping), and
# what is refused with a 400 that names it. Anything else is refused as unrecognized, as OpenAI does.
SUPPORTED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
             "stream", "stream_options", "n", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs",
             "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls", "modalities")
NO_EFFECT = ("user", "metadata", "store", "service_tier")
REFUSED = {"functions": "function calling", "function_call": "function calling", "audio": "audio output",
           "prediction": "predicted outputs", "web_search_options": "web search",
           "reasoning_effort": "reasoning effort (not a reasoning model)", "verbosity": "verbosity"}
MAX_LOGIT_BIAS = 300
CHARS_PER_TOKEN = 8      # the default text budget per prompt token (English text averages about 4 characters a token)
MIN_JSON_VALUES = 2**18  # the default bound on a body's JSON values, raised with the text budget
MAX_STOP_STRINGS, MAX_STOP_CHARS = 4, 1024


@dataclass
class Limits:
    """What one request may hold; each is checked before the work it bounds (see the module docstring)."""

    max_request_bytes: int = 32 * 2**20
    max_json_values: int | None = None     # commas + '[' + '{' in the body; default max(2**18, 2 * max_prompt_chars)
    max_image_pixels: int = 40_000_000
    max_images: int = 8
    max_output_tokens: int = 2048
    max_prompt_tokens: int | None = None   # default: the model's context
    max_prompt_chars: int | None = None    # characters of text across all messages; default CHARS_PER_TOKEN per token
    remote_timeout_s: float = 10.0
    request_timeout_s: float = 30.0        # for the whole body to arrive (408 after)
    send_timeout_s: float = 60.0           # for the client to take each piece of the answer (then it is cancelled)
    max_arriving: int = 64                 # bodies arriving at once (429 past it), each held <= request_timeout_s

    def resolved(self, context_length: int) -> Limits:
        """These limits with the model-dependent defaults filled in."""
        tokens = self.max_prompt_tokens or context_length
        chars = self.max_prompt_chars or CHARS_PER_TOKEN * tokens
        return dataclasses.replace(self, max_prompt_tokens=tokens, max_prompt_chars=chars,
                                   max_json_values=self.max_json_values or max(MIN_JSON_VALUES, 2 * chars))


class HTTPError(Exception):
    """A refusal in OpenAI's error shape: status, message, type, the parameter it is about, a string code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


class CappedBuffer:
    """Collects chunks and raises 413 as soon as their total passes `cap`: never holds more than cap + one chunk."""

    def __init__(self, cap: int, what: str):
        self.cap, self.what, self.size = cap, what, 0
        self.chunks: list[bytes] = []

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.cap:
            self.chunks.clear()
            raise HTTPError(413, f"{self.what} is larger than {self.cap:,} bytes, the most this server takes")
        self.chunks.append(chunk)

    def extend(self, chunks: Iterable[bytes]) -> bytes:
        for chunk in chunks:
            self.add(chunk)
        return self.bytes()

    def bytes(self) -> bytes:
        return b"".join(self.chunks)


# -- the JSON body ------------------------------------------------------------------------------------------

class _Unparsable(str):
    """An integer past Python's digit limit, kept as text so that the typed read of its field can say so."""

    def __repr__(self) -> str:
        return f"<an integer of {len(self.lstrip('-'))} digits>"


def _int_or_text(digits: str) -> int | str:
    try:
        return int(digits)
    except ValueError:
        return _Unparsable(digits)


def _top_level_numbers(raw: bytes) -> dict:
    """The top-level fields holding numbers, parsed as leniently as Python can (NaN, inf, 10**30 kept).
    Only read after `schema.loads` refused the body, so that a refused number in a field we know
    (max_tokens, seed, temperature, top_p) is reported with the field's name and its allowed range."""
    try:
        obj = json.loads(raw.decode("utf-8"), parse_int=_int_or_text)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(v, (int, float, _Unparsable)) and not isinstance(v, bool)}


def parse_body(raw: bytes, limits: Limits) -> Fields:
    """The body as typed fields: 413 past `max_json_values`, 400 for anything `schema.loads` refuses."""
    values, most = raw.count(b",") + raw.count(b"[") + raw.count(b"{"), limits.max_json_values or MIN_JSON_VALUES
    if values > most:  # each value costs ~50-100 bytes of Python objects: 32 MiB of "[]," would cost 1.6 GB
        raise HTTPError(413, f"{BODY} holds {values:,} commas and brackets; this server parses at most "
                             f"{most:,} JSON values per request")
    try:
        return Fields(loads(raw, BODY, error=InputError), BODY, InputError)
    except InputError:
        numbers = _top_level_numbers(raw)
        if numbers:
            generation_options(Fields(numbers, BODY, InputError), limits)  # raises, naming the field and its range
        raise


def refuse_unsupported(body: Fields) -> None:
    """400, naming the field, for every option this server would otherwise ignore."""
    for key in body.obj:
        if key in REFUSED:
            raise HTTPError(400, f"{key}: {REFUSED[key]} is not supported by this server", param=key,
                            code="unsupported_parameter")
        if key not in SUPPORTED and key not in NO_EFFECT:
            raise HTTPError(400, f"unrecognized request argument: {str(key)[:80]}", param=str(key)[:80],
                            code="unsupported_parameter")
    if body.raw("tools", []) != []:
        raise HTTPError(400, "tools: tool calls are not supported by this server", param="tools",
                        code="unsupported_parameter")
    if body.raw("tool_choice", "none") not in ("none", "auto"):
        raise HTTPError(400, "tool_choice: tool calls are not supported by this server", param="tool_choice",
                        code="unsupported_parameter")
    if body.raw("modalities", ["text"]) != ["text"]:
        raise HTTPError(400, 'modalities: this server answers in text only (["text"])', param="modalities",
                        code="unsupported_parameter")
    if body.integer("n", 1, lo=1) != 1:
        raise HTTPError(400, "n: this server returns one choice per request (n = 1)", param="n",
                        code="unsupported_parameter")


def generation_options(body: Fields, limits: Limits, vocab_size: int | None = None) -> dict:
    """The sampling fields, checked: the keyword arguments of `Pipeline.generation` (`max_completion_tokens`
    wins over the deprecated `max_tokens`; `top_logprobs` needs `logprobs`)."""
    cap = limits.max_output_tokens
    key = "max_completion_tokens" if body.has("max_completion_tokens") else "max_tokens"
    options = {"max_new_tokens": body.integer(key, min(512, cap), lo=1, hi=cap),
               "temperature": body.number("temperature", 0.0, lo=0.0, hi=2.0),
               "top_p": body.number("top_p", 1.0, lo=0.0, hi=1.0),
               "seed": body.integer("seed", None, lo=-2**63, hi=2**64 - 1),
               "frequency_penalty": body.number("frequency_penalty", 0.0, lo=-2.0, hi=2.0),
               "presence_penalty": body.number("presence_penalty", 0.0, lo=-2.0, hi=2.0),
               "stop": _stop_strings(body), "logit_bias": _logit_bias(body, vocab_size)}
    if body.boolean("logprobs", False):
        options["logprobs"] = body.integer("top_logprobs", 0, lo=0, hi=20)
    elif body.has("top_logprobs"):
        raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return options


def _logit_bias(body: Fields, vocab_size: int | None) -> dict[int, float] | None:
    bias = body.raw("logit_bias", None)
    if bias is None:
        return None
    top = vocab_size - 1 if vocab_size else None
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise body.fail("logit_bias", f"an object of at most {MAX_LOGIT_BIAS} token ids mapped to numbers", bias)
    out = {}
    for k, v in bias.items():
        if not (k.isascii() and k.isdigit() and len(k) < 12 and (top is None or int(k) <= top)):
            raise HTTPError(400, f"logit_bias: {k[:40]!r} is not a token id (0..{top})", param="logit_bias")
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and -MAX_BIAS <= v <= MAX_BIAS):
            raise HTTPError(400, f"logit_bias[{k}] must be a number in [-{MAX_BIAS}, {MAX_BIAS}], got {str(v)[:40]}",
                            param="logit_bias")
        out[int(k)] = float(v)
    return out


def response_format(body: Fields):
    """`response_format` as a compiled `vl2edge.structured.JsonFormat` (None for text); a schema the grammar
    library cannot compile is a 400 with its reason."""
    from .structured import JsonFormat

    value = body.raw("response_format", None)
    if value is None:
        return None
    fmt = Fields(value, "response_format", InputError)
    kind = fmt.raw("type", None)
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return JsonFormat.any_object()
        if kind == "json_schema":
            spec = fmt.sub("json_schema")
            return JsonFormat.from_schema(spec.raw("schema", {"type": "object"}), spec.text("name", "json_schema"))
    except InputError as e:
        raise HTTPError(400, f"response_format: {e}", param="response_format") from None
    raise HTTPError(400, f"response_format: type must be text, json_object or json_schema, got {str(kind)[:40]!r}",
                    param="response_format.type")


def _stop_strings(body: Fields) -> list[str] | None:
    stop = body.raw("stop", None)
    if stop is None:
        return None
    items = [stop] if isinstance(stop, str) else stop
    if not (isinstance(items, list) and len(items) <= MAX_STOP_STRINGS
            and all(isinstance(s, str) and len(s) <= MAX_STOP_CHARS for s in items)):
        raise body.fail("stop", f"a string or a list of up to {MAX_STOP_STRINGS} strings of at most "
                                f"{MAX_STOP_CHARS} characters", stop)
    for s in items:
        check_text(s, f"{BODY}: stop", InputError)
    return items


# -- messages and images ------------------------------------------------------------------------------------

def _image_bytes(url: str, allowed_root: Path | None, allow_remote: bool, limits: Limits) -> bytes:
    if url.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or ";base64" not in head:
            raise HTTPError(400, "a data URL must be data:<type>;base64,<data>")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPError(400, "the data URL's base64 payload is invalid") from None
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise HTTPError(400, "remote images are disabled on this server (start it with --allow-remote-images)")
        return _download(url, limits)
    path = url[len("file://"):] if url.startswith("file://") else url
    if allowed_root is None:
        raise HTTPError(403, "local image files are disabled on this server (start it with --allowed-root DIR)")
    try:
        p = Path(path).resolve()
        inside = p.is_relative_to(allowed_root)
    except (OSError, RuntimeError, ValueError):
        raise HTTPError(400, f"bad image path {path[:200]!r}") from None
    if not inside:
        raise HTTPError(403, f"{path[:200]} is outside the allowed image directory")
    try:
        found = p.is_file()  # a name too long or a path through a file raises here: the client's error
    except (OSError, ValueError) as e:
        raise HTTPError(400, f"bad image path {path[:200]!r}: {getattr(e, 'strerror', None) or e}") from None
    if not found:
        raise HTTPError(400, f"image not found (or not a regular file): {path[:200]}")
    try:
        with p.open("rb") as f:  # read one byte past the cap: a file that grows while we read is still bounded
            return CappedBuffer(limits.max_request_bytes, path[:200]).extend([f.read(limits.max_request_bytes + 1)])
    except OSError as e:
        raise HTTPError(400, f"cannot read {path[:200]}: {e.strerror or e}") from None


def _download(url: str, limits: Limits) -> bytes:
    import httpx

    deadline = time.monotonic() + limits.remote_timeout_s
    shown = url[:200]

    def chunks(response) -> Iterable[bytes]:
        for c in response.iter_bytes():
            if time.monotonic() > deadline:
                raise HTTPError(400, f"fetching {shown} took longer than {limits.remote_timeout_s} s")
            yield c

    try:
        with httpx.stream("GET", url, timeout=limits.remote_timeout_s, follow_redirects=True) as r:
            r.raise_for_status()
            return CappedBuffer(limits.max_request_bytes, f"the image at {shown}").extend(chunks(r))
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, ValueError) as e:
        raise HTTPError(400, f"cannot fetch {shown}: {e}") from None


def decode_image(raw: bytes, where: str, limits: Limits):
    """A PIL RGB image, its size checked from the header before decoding. Any exception from the decoder is a
    bad image (400): fuzzed files make Pillow raise TypeError, NotImplementedError, AttributeError, ..."""
    from PIL import Image

    too_large = f"{where}: the image is too large (over {limits.max_image_pixels:,} pixels, this server's limit)"
    try:
        with Image.open(io.BytesIO(raw)) as head:
            pixels = head.width * head.height
    except Image.DecompressionBombError:
        raise HTTPError(400, too_large) from None
    except Exception:
        pixels = 0  # not even a header: load_image says why
    if pixels > limits.max_image_pixels:
        raise HTTPError(400, too_large)
    try:
        img = load_image(raw)
    except Image.DecompressionBombError:
        raise HTTPError(400, too_large) from None
    except InputError as e:
        raise HTTPError(400, f"{where}: {e}") from None
    except Exception as e:
        raise HTTPError(400, f"{where}: cannot read the image ({type(e).__name__}: {str(e)[:200]})") from None
    if img.width * img.height > limits.max_image_pixels:  # formats whose header size is not the decoded size
        raise HTTPError(400, too_large)
    return img


class _TextBudget:
    """Counts the prompt's characters across messages and refuses the request before the tokenizer sees it."""

    def __init__(self, limits: Limits):
        self.cap, self.tokens, self.used = limits.max_prompt_chars, limits.max_prompt_tokens, 0

    def take(self, fields: Fields, key: str) -> str:
        text = fields.raw(key)
        if not isinstance(text, str):
            raise fields.fail(key, "a string", text)
        self.used += len(text)
        if self.cap is not None and self.used > self.cap:
            raise InputError(f"the messages hold more than {self.cap:,} characters of text, the most this server "
                             f"takes (its prompt limit is {self.tokens} tokens)")
        return check_text(text, f"{fields.where}: {key}", InputError)


def to_conversation(body: Fields, allowed_root: Path | None, allow_remote: bool,
                    limits: Limits) -> tuple[list[dict], list]:
    """The request's OpenAI messages -> (our conversation, PIL images in placeholder order)."""
    most = limits.max_prompt_tokens or 1 << 16  # every message adds at least one token to the prompt
    messages = body.raw("messages", None)
    if not isinstance(messages, list) or not 0 < len(messages) <= most:
        raise body.fail("messages", f"a non-empty list of at most {most} messages", messages)
    budget = _TextBudget(limits)
    conv: list[dict] = []
    images: list = []
    for i, m in enumerate(messages):
        msg = Fields(m, f"messages[{i}]", InputError)
        role = msg.raw("role", None)
        if role not in ROLES:
            raise msg.fail("role", "one of system, developer, user, assistant", role)
        role = "system" if role == "developer" else role
        content = msg.raw("content", None)
        if isinstance(content, str):
            text, placed = budget.take(msg, "content"), 0
        elif isinstance(content, list):
            text, placed = "", 0
            for j, p in enumerate(content):
                part = Fields(p, f"messages[{i}].content[{j}]", InputError)
                kind = part.raw("type", None)
                if kind == "text":
                    text += budget.take(part, "text")
                elif kind == "image_url":
                    if role != "user":
                        raise InputError(f"{part.where}: only user messages may carry images")
                    if len(images) >= limits.max_images:
                        raise InputError(f"{part.where}: at most {limits.max_images} images per request")
                    raw = _image_bytes(_image_url(part), allowed_root, allow_remote, limits)
                    images.append(decode_image(raw, part.where, limits))
                    text, placed = text + "<image>\n", placed + 1
                else:
                    raise InputError(f"{part.where}: unsupported content part type {kind!r:.60}; "
                                     "expected text or image_url")
        else:
            raise msg.fail("content", "a string or a list of parts", content)
        if text.count("<image>") != placed:
            raise InputError(f"messages[{i}]: text may not contain <image>; send images as image_url parts")
        conv.append({"role": role, "content": text})
    return conv, images


def _image_url(part: Fields) -> str:
    value = part.raw("image_url", None)
    holder, key = (Fields(value, f"{part.where}.image_url", InputError), "url") if isinstance(value, dict) \
        else (part, "image_url")
    url = holder.raw(key, None)
    if not isinstance(url, str):
        raise holder.fail(key, "a url string", url)
    return check_text(url, f"{holder.where}: {key}", InputError)


# -- the app ------------------------------------------------------------------------------------------------
