"""The Python API's arguments, checked where they enter (`vl2edge.load`, `Pipeline.generation`,
`Pipeline.start_batching`): a wrong type or an absurd size is an `InputError` naming the argument and
what it takes, never an AttributeError, TypeError or MemoryError from deep inside."""

from __future__ import annotations

import os
from typing import Any

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda")
VISION_GRAPHS = ("float", "int8")
MAX_BATCH = 256          # answers sharing a decode step: far past what one machine serves
MAX_CHUNK = 1 << 20      # prefill positions per step


def _name(v: Any) -> str:
    return type(v).__name__


def integer(v: Any, name: str, lo: int, hi: int, none: bool = False) -> int | None:
    if v is None and none:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InputError(f"{name} must be an integer in [{lo}, {hi}]{' or None' if none else ''}, got {v!r:.60}")
    return v


def choice(v: Any, name: str, allowed: tuple[str, ...], none: bool = False) -> str | None:
    if v is None and none:
        return None
    if not isinstance(v, str) or v not in allowed:
        raise InputError(f"{name} must be one of {', '.join(allowed)}{' or None' if none else ''}, got {v!r:.60}")
    return v


def model_path(v: Any) -> None:
    if not isinstance(v, (str, os.PathLike)) or isinstance(v, bytes):
        raise InputError(f"the model must be a directory path or a Hugging Face id (a string), got {_name(v)}")


def device(v: Any) -> str:
    """auto, cpu, cuda or cuda:N."""
    if isinstance(v, str) and (v in DEVICES or (v.startswith("cuda:") and v[5:].isdigit() and len(v) < 12)):
        return v
    raise InputError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {v!r:.60}")


def load_args(path_or_id: Any, device_: Any, dtype: Any, quant: Any, threads: Any, vision: Any) -> None:
    """`vl2edge.load`'s arguments (gpu_memory is parsed, with its own messages, by vl2edge.placement)."""
    model_path(path_or_id)
    device(device_)
    for value, name in ((dtype, "dtype"), (quant, "quant")):  # unknown names: their loaders' own messages
        if value is not None and not isinstance(value, str):
            raise InputError(f"{name} must be a string or None, got {_name(value)}")
    integer(threads, "threads", 1, 4096, none=True)
    choice(vision, "vision", VISION_GRAPHS, none=True)


def images(v: Any) -> list | None:
    """None, or a list/tuple of images (paths, bytes, PIL images: vl2edge.images.load_image judges each)."""
    if v is None:
        return None
    if not isinstance(v, (list, tuple)):
        hint = " (put one image in a list: images=[...])" if isinstance(v, (str, bytes, os.PathLike)) else ""
        raise InputError(f"images must be a list of paths, bytes or PIL images, got {_name(v)}{hint}")
    return list(v)


def stops(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise InputError(f"stop must be a string or a list of strings, got {_name(v)}")
    return list(v)


def response_format(v: Any):
    from .structured import JsonFormat

    if v is None or isinstance(v, JsonFormat):
        return v
    hint = (": an OpenAI-style dict is the server's; here pass JsonFormat.from_schema(schema) or "
            "JsonFormat.any_object()") if isinstance(v, dict) else ""
    raise InputError(f"response_format must be a vl2edge.structured.JsonFormat or None, got {_name(v)}{hint}")
