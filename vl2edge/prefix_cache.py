"""Prompts read once: a bounded store of KV-cache prefixes, found by the longest prefix a new prompt shares.

A prompt's key is its token ids with every image position replaced by a number drawn from a hash of that
image's preprocessed pixels (`prompt_key`), so two pictures that tokenize alike never share a prefix, and the
same picture in a new conversation matches as far as the text before it does. After a prompt is prefilled its
cache positions are copied here (`store`); a later prompt starts from the longest stored prefix it shares
(`match`) and prefills only the rest: a chat's next turn, an OpenAI client resending the conversation, a
second question about the same page. Entries are dropped least recently used first when the byte budget is
reached; an entry that a new one extends is dropped at once (the new one answers everything it did).

What a backend's cache saves (`save(length)`) and restores (`restore(saved, length)`) are copies of its
own tensors: `vl2edge.models.cache.KVCache` / `slot_cache.SlotCache` (torch) and `onnx_backend.OnnxCache` /
`OnnxSlots` (ONNX Runtime) share one layout per backend, so a prefix saved by a single answer seeds a batch
slot and the other way round. A hit changes no answer: the restored positions hold what prefilling them
again computes (tests/test_prefix_cache.py checks greedy answers with and without the cache).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    from .processor import ProcessorOutput

GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": GiB, "gb": GiB, "gib": GiB}


def parse_budget(text: str) -> int:
    """"2GiB", "512MiB", "0" -> bytes (0 turns the cache off)."""
    s = str(text).strip().lower().replace(" ", "")
    number = s.rstrip("abgikm")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not (0 <= value < 2**50) or value != value:
        raise InputError(f"prefix cache size {text!r}: want bytes like 2GiB, 512MiB or 0 (off)")
    return int(value * _UNITS[unit])


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where it cannot be told)."""
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget() -> int:
    """2 GiB, or an eighth of this machine's memory where that is less."""
    total = machine_memory()
    return 2 * GiB if total is None else min(2 * GiB, total // 8)


def check_budget(size: int) -> int:
    """A budget no larger than the machine's memory (a larger one would end in the OOM killer, not here)."""
    total = machine_memory()
    if total is not None and size > total:
        raise InputError(f"prefix cache size {size / GiB:.1f} GiB is more than this machine's memory "
                         f"({total / GiB:.1f} GiB); give less, e.g. 2GiB")
    return size


def prompt_key(inputs: ProcessorOutput, row: int = 0) -> np.ndarray:
    """Row `row`'s key [T] (int64): token ids >= 0; each image's positions one negative number drawn from a
    hash of that image's own tiles (its global view and local tiles, after preprocessing)."""
    key = np.asarray(inputs.input_ids[row], dtype=np.int64).copy()
    where = np.flatnonzero(np.asarray(inputs.images_seq_mask[row], dtype=bool))
    start_token = start_tile = 0
    for i, n in enumerate(inputs.num_image_tokens[row] if where.size else []):
        w, h = (int(v) for v in inputs.images_spatial_crop[row][i])
        tiles = 1 + w * h  # the global view and the local tiles (vl2edge/processor.py: tile_image)
        pixels = np.ascontiguousarray(inputs.images[row][start_tile:start_tile + tiles])
        digest = hashlib.blake2b(pixels.tobytes(), digest_size=8).digest()
        key[where[start_token:start_token + n]] = -1 - (int.from_bytes(digest, "little") >> 2)  # never a token id
        start_token, start_tile = start_token + n, start_tile + tiles
    return key


@dataclass
class Hit:
    length: int        # positions the prompt shares with the entry (restore these, prefill the rest)
    saved: Any         # the entry's tensors (the backend cache's `save` output)


@dataclass
class _Entry:
    key: np.ndarray
    saved: Any
    nbytes: int


def _nbytes(saved: dict) -> int:
    return sum(int(t.nbytes) for t in saved.values())  # numpy arrays and torch tensors alike


class PrefixCache:
    """Stored prefixes within `budget` bytes; safe to use from several threads."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._entries: OrderedDict[int, _Entry] = OrderedDict()   # least recently used first
        self._next = 0
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.cached_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, key: np.ndarray, limit: int) -> Hit | None:
        """The stored prefix sharing the most positions with `key`, at most `limit` of them (a prompt keeps at
        least one position to prefill, for its logits); None when nothing is shared."""
        best, best_len = None, 0
        with self._lock:
            for ident, e in self._entries.items():
                n = min(len(e.key), len(key), limit)
                if n <= best_len:
                    continue
                same = e.key[:n] == key[:n]
                shared = n if same.all() else int(np.argmin(same))
                if shared > best_len:
                    best, best_len = ident, shared
            if best is None:
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            self.hits += 1
            self.cached_tokens += best_len
            return Hit(best_len, self._entries[best].saved)

    def store(self, key: np.ndarray, saved: dict) -> None:
        """Keep `saved` (the cache's positions 0..len(key)-1) under `key`; entries it extends are dropped."""
        nbytes = _nbytes(saved)
        if nbytes > self.budget:
            return
        key = np.asarray(key, dtype=np.int64).copy()
        with self._lock:
            for ident in [i for i, e in self._entries.items()
                          if len(e.key) <= len(key) and np.array_equal(e.key, key[:len(e.key)])]:
                self._drop(ident)
            while self._entries and self.bytes + nbytes > self.budget:
                self._drop(next(iter(self._entries)))
            self._entries[self._next] = _Entry(key, saved, nbytes)
            self._next += 1
            self.bytes += nbytes

    def _drop(self, ident: int) -> None:
        self.bytes -= self._entries.pop(ident).nbytes

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "budget": self.budget, "hits": self.hits,
                    "misses": self.misses, "cached_tokens": self.cached_tokens}
