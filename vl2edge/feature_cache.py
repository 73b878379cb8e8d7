"""Pictures seen once: the vision tower's features of each tile, kept by a hash of the tile's pixels.

A tile is what the processor made of a picture (a global view or a local tile, normalised pixels); its
features are what the vision tower and projector give it. The same picture in a new conversation, another
question about a page, the same figure in two documents: the tiles hash alike and their features come from
here instead of the tower (`encode`), in every entry point, on both backends (`VL2Model.encode_tiles`,
`OnnxModel.encode_tiles`). Features are kept least recently used first within a byte budget. A hit returns
exactly what the tower computed the first time (the same tensor), so it changes no answer.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any


def _own(t: Any) -> Any:
    """A copy of one tile's rows (a view would keep its whole batch alive): numpy or torch."""
    return t.clone() if hasattr(t, "clone") else t.copy()


class FeatureCache:
    """Tile features within `budget` bytes; safe to use from several threads."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self._kept: OrderedDict[bytes, Any] = OrderedDict()   # least recently used first
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._kept)

    def encode(self, pixels: Sequence[bytes], encode: Callable[[list[int]], Any], stack: Callable[[list], Any]) -> Any:
        """Features of n tiles: `pixels[i]` is tile i's bytes, `encode(indices)` runs the tower on those tiles
        ([len(indices), N', D]), `stack(rows)` joins per-tile features [N', D] into [n, N', D]."""
        keys = [hashlib.blake2b(p, digest_size=16).digest() for p in pixels]
        found: dict[int, Any] = {}
        with self._lock:
            for i, k in enumerate(keys):
                if k in self._kept:
                    self._kept.move_to_end(k)
                    found[i] = self._kept[k]
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        missing = [i for i in range(len(keys)) if i not in found]
        if missing:
            fresh = encode(missing)
            for j, i in enumerate(missing):
                found[i] = _own(fresh[j])
            with self._lock:
                for i in missing:
                    self._keep(keys[i], found[i])
        return stack([found[i] for i in range(len(keys))])

    def _keep(self, key: bytes, features: Any) -> None:
        size = int(features.nbytes)
        if size > self.budget or key in self._kept:
            return
        while self._kept and self.bytes + size > self.budget:
            self.bytes -= int(self._kept.popitem(last=False)[1].nbytes)
        self._kept[key] = features
        self.bytes += size

    def stats(self) -> dict:
        with self._lock:
            return {"tiles": len(self._kept), "bytes": self.bytes, "budget": self.budget, "hits": self.hits,
                    "misses": self.misses}
