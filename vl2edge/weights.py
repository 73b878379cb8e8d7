"""Checkpoint I/O: lazy, memory-mapped safetensors reading and streaming writing, strict key checks.

Reads a single `model.safetensors` or shards listed in `model.safetensors.index.json` without torch
(numpy views over a copy-on-write memory map; bf16 is widened on request), validates every header
against the file size so a truncated or corrupt file fails with a message instead of a crash, and
writes checkpoints tensor by tensor (optionally chunk by chunk) so nothing large is held in memory.
The safetensors format: 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets}, "__metadata__": {...}}`, then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import schema
from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
# The files of a model directory besides its tensors, which converted copies (quantized, exported) carry along
SIDE_FILES = ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "generation_config.json")
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 * 2**20
MAX_DIMS = 8  # tensor rank
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")

# safetensors dtype -> numpy storage dtype (bf16 and fp8 are stored as raw integers)
STORAGE = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
# user-facing names
DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64",
               "int8": "I8", "uint8": "U8", "int32": "I32", "int64": "I64"}


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round to nearest even, as torch's .to(torch.bfloat16) does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def _header_int(v: Any, what: str, hi: int) -> int:
    """A size or offset of a safetensors header: a JSON integer in [0, hi]. The format writes integers, and
    so does every writer; 4.0 is refused here as the safetensors library refuses it, by every command alike."""
    if isinstance(v, float):
        raise CheckpointError(f"{what} must be an integer, got {v!r} (a corrupt or hand-made header?)")
    return schema.as_int(v, what, 0, hi, CheckpointError)


class SafetensorsFile:
    """One .safetensors file: header parsed and checked on open, data memory-mapped on first use."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            st = self.path.stat()
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the open, a device never end
                raise CheckpointError(f"{self.path} is not a regular file")
            size = st.st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path} is truncated ({size} bytes): not a safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > min(MAX_HEADER, size - 8):
                    raise CheckpointError(f"{self.path} is corrupt or truncated: header length {n} does not fit "
                                          f"in a {size}-byte file")
                raw_header = f.read(n)
        except OSError as err:
            raise CheckpointError(f"cannot read {self.path}: {err.strerror or err}") from None
        try:
            header = schema.Fields(schema.loads(raw_header, f"{self.path}: the header", CheckpointError),
                                   f"{self.path}: the header", CheckpointError)
        except CheckpointError as err:
            raise CheckpointError(f"{err} (a corrupt or truncated file?)") from None
        meta = header.obj.pop("__metadata__", None) or {}
        self.metadata = meta if isinstance(meta, dict) else {}
        self.data_start = 8 + n
        avail = size - self.data_start
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name in header.obj:
            self.entries[name] = self._entry_of(header.sub(name), name, avail, size)
        self._mm = self._buf = None

    def _entry_of(self, e: schema.Fields, name: str, avail: int, size: int) -> tuple[str, tuple[int, ...], int, int]:
        """One header entry, checked: a known dtype, a shape of non-negative integers, offsets that hold
        exactly the tensor's bytes inside the file."""
        dtype = e.text("dtype", max_len=16)
        if dtype not in STORAGE:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}")
        shape = tuple(_header_int(d, f"{e.where}: shape[{i}]", 2**48)
                      for i, d in enumerate(e.array("shape", max_len=MAX_DIMS)))
        offsets = e.array("data_offsets", max_len=2)
        if len(offsets) != 2:
            raise e.fail("data_offsets", "[begin, end]", offsets)
        begin, end = (_header_int(o, f"{e.where}: data_offsets", 2**62) for o in offsets)
        nbytes = math.prod(shape) * np.dtype(STORAGE[dtype]).itemsize
        if not (begin <= end and end - begin == nbytes):
            raise CheckpointError(f"{self.path} is corrupt: tensor {name!r} has {end - begin} bytes for shape "
                                  f"{list(shape)} {dtype}")
        if end > avail:
            raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends at byte {self.data_start + end}"
                                  f" but the file has {size} bytes (an interrupted download?)")
        return dtype, shape, begin, end


    def raw(self, name: str) -> np.ndarray:
        """The stored tensor as a numpy view of the file (bf16/fp8 as raw unsigned integers)."""
        if self._mm is None:
            # copy-on-write: writable views (torch.from_numpy is happy), pages stay file-backed until written
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._buf = np.frombuffer(self._mm, dtype=np.uint8)
        dtype, shape, begin, end = self.entries[name]
        buf = self._buf[self.data_start + begin:self.data_start + end]
        return buf.view(STORAGE[dtype]).reshape(shape)

    def release(self, name: str) -> None:
        """Drop the resident pages of a tensor that was copied out (dtype conversion, stacking), so a
        checkpoint read into another dtype never sits in memory twice. Safe: nothing writes to the map,
        so a later access re-reads the same bytes from the file."""
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        _, _, begin, end = self.entries[name]
        page = mmap.PAGESIZE
        lo = (self.data_start + begin) // page * page
        hi = min(-(-(self.data_start + end) // page) * page, len(self._mm))
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _weight_map(index: Path) -> dict[str, str]:
    """`weight_map` of a shard index: tensor name -> shard file, a plain file name inside the model
    directory (no paths, no `..`: an index must not point outside its directory)."""
    top = schema.load_file(index)
    if not isinstance(top, dict) or not isinstance(top.get("weight_map"), dict):
        raise CheckpointError(f"{index} is corrupt: expected a JSON object with a 'weight_map' object "
                              "(tensor name -> shard file)")
    wm = schema.Fields(top["weight_map"], f"{index}: weight_map", CheckpointError)
    out = {}
    for name in wm.obj:
        shard = wm.text(name, max_len=255)
        if "/" in shard or "\\" in shard or shard in ("", ".", "..") or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{index}: weight_map[{name!r}] = {shard!r} is not a .safetensors file name in "
                                  "the model directory (an index may not point outside it)")
        out[name] = shard
    return out


class TensorFile(Protocol):
    """What a checkpoint reads tensors from: a SafetensorsFile, or a synthetic.GeneratedFile (values made
    when read). entries: name -> (dtype, shape, begin, end)."""

    path: Path
    metadata: dict
    entries: dict[str, tuple[str, tuple[int, ...], int, int]]

    def raw(self, name: str) -> np.ndarray: ...

    def release(self, name: str) -> None: ...


class Checkpoint:
    """All weights of a model directory, read lazily. `numpy(name)` / `torch(name)` return one tensor."""

    def __init__(self, files: dict[str, TensorFile], where: dict[str, str], root: Path):
        self.files, self.where, self.root = files, where, root

    @classmethod
    def open(cls, path) -> Checkpoint:
        root = Path(path)
        if root.is_file():
            f = SafetensorsFile(root)
            return cls({root.name: f}, {k: root.name for k in f.entries}, root.parent)
        if not root.is_dir():
            raise CheckpointError(f"no such model directory: {root}")
        from .synthetic import GENERATED_NAME, GeneratedFile

        if (root / GENERATED_NAME).is_file():
            g = GeneratedFile(root)
            return cls({GENERATED_NAME: g}, {k: GENERATED_NAME for k in g.entries}, root)
        index = root / INDEX_NAME
        if index.is_file():
            weight_map = _weight_map(index)
            missing = sorted({s for s in weight_map.values() if not (root / s).is_file()})
            if missing:
                raise CheckpointError(f"{root}: shard(s) listed in {INDEX_NAME} are missing: {', '.join(missing)}")
            files: dict[str, TensorFile] = {s: SafetensorsFile(root / s) for s in sorted(set(weight_map.values()))}
            for name, shard in weight_map.items():
                if name not in files[shard].entries:
                    raise CheckpointError(f"{root}: {INDEX_NAME} puts {name!r} in {shard}, which does not hold it")
            return cls(files, dict(weight_map), root)
        single = root / SINGLE_NAME
        if single.is_file():
            f = SafetensorsFile(single)
            return cls({SINGLE_NAME: f}, {k: SINGLE_NAME for k in f.entries}, root)
        found = sorted(p.name for p in root.glob("*.safetensors"))
        hint = f" (found {', '.join(found)} but no {INDEX_NAME})" if found else ""
        raise CheckpointError(f"{root} holds no weights: expected {SINGLE_NAME} or {INDEX_NAME}{hint}")

    def keys(self) -> list[str]:
        return list(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def _entry(self, name: str) -> tuple[TensorFile, tuple]:
        try:
            f = self.files[self.where[name]]
        except KeyError:
            raise CheckpointError(f"{self.root}: no tensor named {name!r}") from None
        return f, f.entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1][1]

    def dtype(self, name: str) -> str:
        return self._entry(name)[1][0]

    def nbytes(self) -> int:
        return sum(e[3] - e[2] for f in self.files.values() for e in f.entries.values())

    @property
    def metadata(self) -> dict:
        return next(iter(self.files.values())).metadata if self.files else {}

    def numpy(self, name: str, dtype=None, rows: slice | None = None) -> np.ndarray:
        """One tensor (or a slice of its rows) as numpy; bf16 is widened to float32 (numpy has no bf16)."""
        f, (st, *_) = self._entry(name)
        raw = f.raw(name) if rows is None else f.raw(name)[rows]
        x = bf16_to_f32(raw) if st == "BF16" else raw
        x = x if dtype is None else x.astype(dtype, copy=False)
        if rows is None and not np.shares_memory(x, raw):
            f.release(name)
        return x

    def torch(self, name: str, dtype=None, device=None):
        """One tensor as torch, zero-copy over the memory map when no conversion is asked for."""
        t = self._torch_view(name)
        out = t.to(device=device, dtype=dtype)
        if out.data_ptr() != t.data_ptr():
            self._entry(name)[0].release(name)
        return out

    def release(self, name: str) -> None:
        """Drop the resident pages of a tensor nothing reads any more (see SafetensorsFile.release)."""
        self._entry(name)[0].release(name)

    def copy_into(self, name: str, dst) -> None:
        """dst.copy_(tensor) without leaving the source pages resident."""
        dst.copy_(self._torch_view(name))
        self._entry(name)[0].release(name)

    def _torch_view(self, name: str):
        import torch

        f, (st, *_) = self._entry(name)
        t = torch.from_numpy(f.raw(name))
        if st == "BF16":
            t = t.view(torch.bfloat16)
        elif st.startswith("F8_"):
            t = t.view(torch.float8_e4m3fn if st == "F8_E4M3" else torch.float8_e5m2)
        return t

    def check_keys(self, expected: Iterable[str], what: str = "the model") -> None:
        """The key set must equal `expected`; the error names what is missing and what is unexpected."""
        expected, have = set(expected), set(self.where)
        if expected == have:
            return
        missing, extra = sorted(expected - have), sorted(have - expected)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {', '.join(extra[:5])})")
        raise CheckpointError(f"{self.root}: the checkpoint does not match {what}: {'; '.join(parts)}")

    def check_dtypes(self, expected: dict[str, str | None]) -> None:
        """Each tensor's stored dtype: the named one (packed tensors: U8 / F32), or any float dtype for None.
        A float tensor relabelled I32 (or packed bytes relabelled F32) is refused instead of answering noise."""
        bad = [f"{k}: {self.dtype(k)} (expected {want or 'a float dtype'})" for k, want in expected.items()
               if k in self.where and (self.dtype(k) != want if want else self.dtype(k) not in FLOAT_DTYPES)]
        if bad:
            raise CheckpointError(f"{self.root}: {len(bad)} tensor(s) have the wrong dtype: " + "; ".join(bad[:5]))

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        bad = [f"{k}: file {list(self.shape(k))} vs config {list(v)}" for k, v in expected.items()
               if k in self.where and tuple(self.shape(k)) != tuple(v)]
        if bad:
            raise CheckpointError(f"{self.root}: {len(bad)} tensor shape(s) disagree with config.json: "
                                  + "; ".join(bad[:5]))


# -- writing ----------------------------------------------------------------------------------------------

class SafetensorsWriter:
    """Stream tensors into one file: the header is written first from the specs, data follows in order.

    `write(name, chunk)` may be called several times per tensor (row chunks, C order); `close()`
    checks that every byte promised by the header arrived.
    """

    def __init__(self, path, specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, dict[str, Any]]
        header, off = {}, 0
        for name, (dtype, shape) in specs.items():
            n = math.prod(shape) * np.dtype(STORAGE[dtype]).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
        self.specs, self.ends, self.total = specs, {k: v["data_offsets"][1] for k, v in header.items()
                                                    if k != "__metadata__"}, off
        self._order, self._pos = iter(specs), 0
        self._current: str | None = None
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, chunk: np.ndarray) -> None:
        dtype = self.specs[name][0]
        if name != self._current:
            if self._current is not None and self._pos != self.ends[self._current]:
                raise CheckpointError(f"{self.path}: tensor {self._current!r} is incomplete")
            expected = next(self._order, None)
            if name != expected:
                raise CheckpointError(f"{self.path}: tensors must be written in header order "
                                      f"(expected {expected!r}, got {name!r})")
            self._current = name
        data = np.ascontiguousarray(chunk, dtype=STORAGE[dtype]).tobytes()
        if self._pos + len(data) > self.ends[name]:
            raise CheckpointError(f"{self.path}: too much data for tensor {name!r}")
        self._f.write(data)
        self._pos += len(data)

    def close(self) -> None:
        self._f.close()
        if self._pos != self.total:
            raise CheckpointError(f"{self.path}: wrote {self._pos} of {self.total} data bytes")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._f.close()


def plan_shards(specs: dict[str, tuple[str, tuple[int, ...]]], max_shard_bytes: int) -> list[list[str]]:
    """Split tensors (in order) into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
    shards: list[list[str]]
    cur: list[str]
    shards, cur, size = [], [], 0
    for name, (dtype, shape) in specs.items():
        n = math.prod(shape) * np.dtype(STORAGE[dtype]).itemsize
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    return [*shards, cur] if cur else shards


def write_checkpoint(root, specs: dict[str, tuple[str, tuple[int, ...]]],
                     chunks: Iterable[tuple[str, np.ndarray]], *, max_shard_bytes: int | None = None,
                     metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `chunks` ((name, array) in spec order, several per tensor allowed) as a model checkpoint.

    With `max_shard_bytes`, writes official-style shards `model-00001-of-00000N.safetensors` and the
    index; otherwise one `model.safetensors`. Returns the files written.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if max_shard_bytes is None:
        groups, names = [list(specs)], [SINGLE_NAME]
    else:
        groups = plan_shards(specs, max_shard_bytes)
        names = [f"model-{i + 1:05d}-of-{len(groups):06d}.safetensors" for i in range(len(groups))]
    shard_of = {t: i for i, g in enumerate(groups) for t in g}
    writers: list[SafetensorsWriter | None] = [None] * len(groups)
    it: Iterator = iter(chunks)
    try:
        for name, chunk in it:
            i = shard_of[name]
            writer = writers[i]
            if writer is None:
                prev = writers[i - 1] if i > 0 else None
                if prev is not None:
                    prev.close()
                writer = writers[i] = SafetensorsWriter(root / names[i], {t: specs[t] for t in groups[i]}, metadata)
            writer.write(name, chunk)
        if any(w is None for w in writers):
            raise CheckpointError(f"{root}: not every shard received data")
        last = writers[-1]
        assert last is not None  # every shard was checked just above
        last.close()
    finally:
        for w in writers:
            if w is not None and not w._f.closed:
                w._f.close()
    if max_shard_bytes is not None:
        total = sum(math.prod(s) * np.dtype(STORAGE[d]).itemsize for d, s in specs.values())
        index = {"metadata": {"total_size": total}, "weight_map": {t: names[shard_of[t]] for t in specs}}
        (root / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return [root / n for n in names] + [root / INDEX_NAME]
    return [root / SINGLE_NAME]


def disk_size(path) -> int:
    p = Path(path)
    return sum(os.path.getsize(f) for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
