"""Preallocated KV cache, created by the generation loop and written at explicit positions.

MHA (Tiny) caches rotated keys and values per layer, [B, KV, S, hd] each. MLA (Small/Base) caches
one latent per layer, [B, S, kv_lora_rank + qk_rope_head_dim]: the normalised compressed KV followed
by the rotated shared rope key (what the reference's cache holds, in one tensor). `key_mask` [B, S]
marks which cached positions are real tokens (left padding is not), and `positions` [B] is the next
RoPE position of each row.

`Cache` is the protocol the attention modules write through: `KVCache` here at run time, and
`vl2edge.export.graphs.GraphCache` (explicit past inputs, present outputs) while tracing the ONNX graph.
`KVCache`'s `*_at` methods are the static decode step's: one position written at a device-tensor index,
attention over every allocated position (`vl2edge.models.decode_step.StepCache` exposes them as a
`Cache`); nothing there reads a device value on the host.
"""

from __future__ import annotations

from typing import Protocol

import torch

from vl2edge.config import LanguageConfig


class Cache(Protocol):
    def begin(self, attention_mask: torch.Tensor | None, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Open T new positions: (position_ids [B, T], attention mask [B, 1, T, S])."""
        ...

    def commit(self, T: int) -> None:
        """Close the positions opened by `begin`."""
        ...

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MHA: store this call's keys/values; return every key/value so far."""
        ...

    def write_latent(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """MLA: store this call's latents; return every latent so far."""
        ...


class KVCache:
    def __init__(self, config: LanguageConfig, batch: int, max_len: int, dtype, device=None):
        L = config.num_hidden_layers
        self.max_len, self.length = max_len, 0
        self.latent: torch.Tensor | None  # MLA
        self.k: torch.Tensor | None  # MHA
        self.v: torch.Tensor | None
        if config.use_mla:
            assert config.kv_lora_rank is not None  # LanguageConfig requires it with MLA
            width = config.kv_lora_rank + config.qk_rope_head_dim
            self.latent = torch.zeros(L, batch, max_len, width, dtype=dtype, device=device)
            self.k = self.v = None
        else:
            assert config.num_key_value_heads is not None  # LanguageConfig fills it from num_attention_heads
            shape = (L, batch, config.num_key_value_heads, max_len, config.head_dim)
            self.k = torch.zeros(shape, dtype=dtype, device=device)
            self.v = torch.zeros(shape, dtype=dtype, device=device)
            self.latent = None
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.key_mask.shape[0]

    def begin(self, attention_mask: torch.Tensor | None, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve T new positions: returns (position_ids [B,T], attention mask [B,1,T,S]).

        Padded query rows may attend to themselves only, so no softmax row is empty.
        """
        B, start, end = self.batch, self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.bool, device=self.key_mask.device)
        am = attention_mask.to(device=self.key_mask.device, dtype=torch.bool)
        self.key_mask[:, start:end] = am
        # RoPE positions count real tokens only (cumsum - 1), as the reference's generate does
        pos = self.positions[:, None] + am.long().cumsum(-1) - 1
        pos = pos.clamp(min=0)
        self.positions += am.long().sum(-1)
        q = torch.arange(start, end, device=am.device)
        s = torch.arange(end, device=am.device)
        allowed = (s[None, :] <= q[:, None]) & self.key_mask[:, None, :end]   # [B, T, S]
        allowed |= s[None, :] == q[:, None]
        return pos, allowed[:, None]

    def commit(self, T: int) -> None:
        self.length += T

    def reset(self) -> None:
        """Empty the cache for a new generation (the buffers, and so any captured graph, stay)."""
        self.length = 0
        self.key_mask.zero_()
        self.positions.zero_()

    def save(self, length: int, row: int = 0) -> dict[str, torch.Tensor]:
        """Copies of row `row`'s first `length` positions, [L, 1, ...] (vl2edge/prefix_cache.py)."""
        if self.latent is not None:
            return {"latent": self.latent[:, row:row + 1, :length].clone()}
        assert self.k is not None and self.v is not None  # an MHA cache
        return {"k": self.k[:, row:row + 1, :, :length].clone(), "v": self.v[:, row:row + 1, :, :length].clone()}

    def write_rows(self, saved: dict[str, torch.Tensor], length: int, row: int) -> None:
        """The first `length` positions of `saved` (a `save` output) into row `row`'s buffers."""
        for name, t in saved.items():
            buf = getattr(self, name)
            if name == "latent":
                buf[:, row:row + 1, :length] = t[:, :, :length]
            else:
                buf[:, row:row + 1, :, :length] = t[:, :, :, :length]

    def restore(self, saved: dict[str, torch.Tensor], length: int) -> None:
        """An empty one-row cache starts with the first `length` positions of `saved` (no padding in them)."""
        if self.batch != 1 or self.length:
            raise ValueError("a prefix is restored into an empty cache of one row")
        self.write_rows(saved, length, 0)
        self.key_mask[0, :length] = True
        self.positions[0] = length
        self.length = length

    def begin_at(self, cursor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Open one position per row at index `cursor` [1] (a device tensor): (position_ids [B, 1],
        attention mask [B, 1, 1, max_len]). Positions never opened stay unmarked, so attending over the
        whole allocation is the same function as attending over the positions so far."""
        self.key_mask.index_fill_(1, cursor, True)
        pos = self.positions[:, None].clone()
        self.positions.add_(1)
        return pos, self.key_mask[:, None, None, :]

    def write_kv_at(self, layer: int, cursor: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MHA: store k, v [B, KV, 1, hd] at index `cursor`; return the whole allocation [B, KV, max_len, hd]."""
        assert self.k is not None and self.v is not None  # an MHA cache
        self.k[layer].index_copy_(2, cursor, k)
        self.v[layer].index_copy_(2, cursor, v)
        return self.k[layer], self.v[layer]

    def write_latent_at(self, layer: int, cursor: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """MLA: store latent [B, 1, C] at index `cursor`; return the whole allocation [B, max_len, C]."""
        assert self.latent is not None  # an MLA cache
        self.latent[layer].index_copy_(1, cursor, latent)
        return self.latent[layer]

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MHA: store k, v [B, KV, T, hd] at the open positions; return all keys/values so far."""
        assert self.k is not None and self.v is not None  # an MHA cache
        start, end = self.length, self.length + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def write_latent(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """MLA: store latent [B, T, C] at the open positions; return all latents so far [B, S, C]."""
        assert self.latent is not None  # an MLA cache
        start, end = self.length, self.length + latent.shape[1]
        self.latent[layer, :, start:end] = latent
        return self.latent[layer, :, :end]
