"""Every JSON document vl2edge reads goes through here: parsing with limits, then typed field access.

`loads(text, what)` parses with limits on size, nesting depth and integer length, and refuses
NaN/Infinity and numbers that overflow a float; `load_file(path)` adds a size check before reading.
`Fields(obj, where)` reads one JSON object field by field, each read naming the file and the field
and saying what was expected when the value is missing, of the wrong type or out of range
(`config.json: language_config.num_hidden_layers must be an integer in [1, 1024], got 10000000`).
Errors are `ConfigError` by default (files); the server passes `InputError` for request bodies.
No torch, no third-party schema library: the checks are a handful of types and ranges.
"""

from __future__ import annotations

import json
import math
import os
import stat
from typing import Any

from .errors import ConfigError, VL2Error

MAX_DEPTH = 32          # nesting of objects/arrays (the deepest file we read, tokenizer.json, uses < 10)
MAX_INT_DIGITS = 20     # integers beyond 10^20 are never meaningful in our files or requests
MAX_FILE_BYTES = 64 * 2**20  # a JSON side file (tokenizer.json is ~8 MB)
_MISSING: Any = object()


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer with {len(text)} digits")
    return int(text)


def _float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text} overflows a float")
    return v


def _depth(obj: Any) -> int:
    """Nesting depth, iteratively (no recursion limit to hit)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if d > MAX_DEPTH:
                return d
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def loads(text: str | bytes, what: str, error: type[VL2Error] = ConfigError, max_depth: int = MAX_DEPTH) -> Any:
    """Parse JSON with limits; `what` (a file name, "the request body") starts every error message."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        obj = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise error(f"{what} is not valid UTF-8") from None
    except RecursionError:
        raise error(f"{what} is nested too deeply (more than {max_depth} levels)") from None
    except json.JSONDecodeError as e:
        raise error(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:
        raise error(f"{what} holds a number out of range ({e})") from None
    if _depth(obj) > max_depth:
        raise error(f"{what} is nested too deeply (more than {max_depth} levels)")
    return obj


def read_bounded(path, what: str, max_bytes: int, error: type[VL2Error] = ConfigError) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, read with that bound: a FIFO, a device (/dev/zero),
    a folder or a file that grows while it is read is refused by name instead of blocking or eating memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the open
    except (OSError, ValueError, TypeError) as e:
        raise error(f"cannot read {what}: {getattr(e, 'strerror', None) or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"cannot read {what}: not a regular file")
        if st.st_size > max_bytes:
            raise error(f"{what} is {st.st_size:,} bytes; vl2edge reads at most {max_bytes:,} here")
        try:  # read() sizes its buffer by the request: ask for the file's size (+1 to see it grow), not the cap
            data = f.read(st.st_size + 1)
        except OSError as e:
            raise error(f"cannot read {what}: {e.strerror or e}") from None
    if len(data) > st.st_size:
        raise error(f"{what} grew while it was read (from {st.st_size:,} bytes); vl2edge reads a file that holds still")
    return data


def load_file(path, what: str | None = None, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """A JSON file, parsed with limits; ConfigError (naming the file) when it cannot be read or parsed."""
    what = what or str(path)
    return loads(read_bounded(path, what, max_bytes), what)


def _kind(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


class Fields:
    """Typed reads of one JSON object; every failure names `where` and the field."""

    def __init__(self, obj: Any, where: str, error: type[VL2Error] = ConfigError):
        if not isinstance(obj, dict):
            raise error(f"{where} must be a JSON object, got {_kind(obj)}")
        self.obj, self.where, self.error = obj, where, error

    def _name(self, key: str) -> str:
        return f"{self.where}: {key}"

    def param(self, key: str) -> str:
        """The field's path from the top of the document (`key`, or `messages[0].role` under `messages[0]`)."""
        return key if " " in self.where else f"{self.where}.{key}"

    def has(self, key: str) -> bool:
        return key in self.obj and self.obj[key] is not None

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        if key not in self.obj or self.obj[key] is None:
            if default is _MISSING:
                raise self.error(f"{self._name(key)} is missing", param=self.param(key))
            return default
        return self.obj[key]

    def fail(self, key: str, expected: str, got: Any = _MISSING) -> VL2Error:
        shown = "" if got is _MISSING else f", got {_short(got)}"
        return self.error(f"{self._name(key)} must be {expected}{shown}", param=self.param(key))

    def integer(self, key: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        try:
            return as_int(v, self._name(key), lo, hi, self.error)
        except VL2Error as e:
            raise self.error(str(e), param=self.param(key)) from None

    def number(self, key: str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None,
              positive: bool = False) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and \
            (lo is None or v >= lo) and (hi is None or v <= hi) and (not positive or v > 0)
        if not ok:
            raise self.fail(key, ("a positive number" if positive else "a number") + _range(lo, hi), v)
        return float(v)

    def text(self, key: str, default: Any = _MISSING, max_len: int = 4096) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, str) or len(v) > max_len:
            raise self.fail(key, f"a string of at most {max_len} characters", v)
        check_text(v, self._name(key), self.error)
        return v

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        v = self.raw(key, default)
        if not isinstance(v, bool):
            raise self.fail(key, "true or false", v)
        return v

    def array(self, key: str, default: Any = _MISSING, max_len: int = 1 << 16) -> Any:
        v = self.raw(key, default)
        if v is default and default is not _MISSING:
            return v
        if not isinstance(v, list) or len(v) > max_len:
            raise self.fail(key, f"a list of at most {max_len} items", v)
        return v

    def sub(self, key: str, default: Any = _MISSING) -> Fields:
        v = self.raw(key, {} if default is not _MISSING else _MISSING)
        return Fields(v, self._name(key), self.error)


def as_int(v: Any, what: str, lo: int | None = None, hi: int | None = None,
           error: type[VL2Error] = ConfigError) -> int:
    """`v` as an integer in [lo, hi] (3.0 is 3: some tools write every number as a float)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise error(f"{what} must be an integer{_range(lo, hi)}, got {_short(v)}")
    return v


def check_text(s: str, what: str, error: type[VL2Error]) -> str:
    """A string must be encodable as UTF-8 (lone surrogates, from `\\ud800` or undecodable argv bytes,
    are refused) before it reaches the tokenizer or a file."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{what} is not valid UTF-8 text (it holds an unpaired surrogate or undecodable bytes)") from None
    return s


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."
