"""The continuous-batching cache of the PyTorch model: `slots` rows, each at its own position.

The buffers are a `KVCache`'s ([L, slots, KV, max_len, hd] keys and values for MHA, [L, slots, max_len, C]
latents for MLA); `lengths` counts each row's positions (host integers). One forward sees the cache through a
view that implements `vl2edge.models.cache.Cache`:
- `RowChunk`: a prompt chunk of T positions appended to one row (causal attention over that row's positions);
- `RowsStep`: one new token for each of rows 0..R-1, written at each row's own position; a row attends to its
  own positions only (the keys past its length are masked), so rows at different positions share the step.

Dimension legend: L layers, R running rows, T new positions, KV key/value heads, S positions attended,
hd head dim, C latent width.
"""

from __future__ import annotations

import torch

from vl2edge.config import LanguageConfig

from .cache import KVCache


class SlotCache:
    def __init__(self, config: LanguageConfig, slots: int, max_len: int, dtype, device=None):
        self.buffers = KVCache(config, slots, max_len, dtype, device)
        self.max_len, self.device = max_len, device
        self.lengths = [0] * slots

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def chunk(self, row: int) -> RowChunk:
        return RowChunk(self, row)

    def step(self, rows: int) -> RowsStep:
        return RowsStep(self, rows)

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s positions become row `dst`'s (the first `lengths[src]` of them are copied)."""
        n, b = self.lengths[src], self.buffers
        for t in (b.k, b.v):
            if t is not None:
                t[:, dst, :, :n] = t[:, src, :, :n]
        if b.latent is not None:
            b.latent[:, dst, :n] = b.latent[:, src, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def clear(self, row: int) -> None:
        self.lengths[row] = 0

    def save_row(self, row: int, length: int) -> dict[str, torch.Tensor]:
        """Copies of row `row`'s first `length` positions (vl2edge/prefix_cache.py; `KVCache.save`'s layout)."""
        return self.buffers.save(length, row)

    def restore_row(self, row: int, saved: dict[str, torch.Tensor], length: int) -> None:
        """Empty row `row` starts with the first `length` positions of `saved`."""
        self.buffers.write_rows(saved, length, row)
        self.lengths[row] = length

    def reserve(self, row: int, T: int) -> int:
        """The first of T new positions of `row`; refuses a row that would outgrow its slot."""
        n = self.lengths[row]
        if n + T > self.max_len:
            raise ValueError(f"slot full: {n + T} positions needed, {self.max_len} allocated")
        return n


class RowChunk:
    """`Cache` for a prompt chunk [1, T, D] appended to row `row`."""

    def __init__(self, cache: SlotCache, row: int):
        self.cache, self.row, self.start = cache, row, cache.lengths[row]

    def begin(self, attention_mask, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.start = self.cache.reserve(self.row, T)
        q = torch.arange(n, n + T, device=self.cache.device)
        s = torch.arange(n + T, device=self.cache.device)
        return q[None], (s[None, :] <= q[:, None])[None, None]          # [1, T], [1, 1, T, n+T]

    def commit(self, T: int) -> None:
        self.cache.lengths[self.row] += T

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, r, n = self.cache.buffers, self.row, self.start
        assert b.k is not None and b.v is not None  # an MHA cache
        end = n + k.shape[2]
        b.k[layer, r:r + 1, :, n:end] = k
        b.v[layer, r:r + 1, :, n:end] = v
        return b.k[layer, r:r + 1, :, :end], b.v[layer, r:r + 1, :, :end]

    def write_latent(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        b, r, n = self.cache.buffers, self.row, self.start
        assert b.latent is not None  # an MLA cache
        end = n + latent.shape[1]
        b.latent[layer, r:r + 1, n:end] = latent
        return b.latent[layer, r:r + 1, :end]


class RowsStep:
    """`Cache` for one token per running row (rows 0..R-1), each written at its row's own position."""

    def __init__(self, cache: SlotCache, rows: int):
        self.cache, self.R = cache, rows
        for r in range(rows):
            cache.reserve(r, 1)
        self.n = torch.tensor(cache.lengths[:rows], device=cache.device)   # [R] each row's new position
        self.rows = torch.arange(rows, device=cache.device)
        self.S = max(cache.lengths[:rows]) + 1

    def begin(self, attention_mask, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert T == 1  # a decode step
        s = torch.arange(self.S, device=self.cache.device)
        return self.n[:, None], (s[None, :] <= self.n[:, None])[:, None, None]   # [R, 1], [R, 1, 1, S]

    def commit(self, T: int) -> None:
        for r in range(self.R):
            self.cache.lengths[r] += 1

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, R = self.cache.buffers, self.R
        assert b.k is not None and b.v is not None  # an MHA cache
        b.k[layer, self.rows, :, self.n] = k[:, :, 0]                       # [R, KV, hd] at (row, n[row])
        b.v[layer, self.rows, :, self.n] = v[:, :, 0]
        return b.k[layer, :R, :, :self.S], b.v[layer, :R, :, :self.S]

    def write_latent(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        b, R = self.cache.buffers, self.R
        assert b.latent is not None  # an MLA cache
        b.latent[layer, self.rows, self.n] = latent[:, 0]                   # [R, C] at (row, n[row])
        return b.latent[layer, :R, :self.S]
