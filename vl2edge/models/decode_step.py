"""The decode step with static shapes and no host synchronisation, replayed as a CUDA graph.

`VL2Model.decode` reads routing decisions on the host (`.tolist()` in every MoE layer) and attends over
a cache that grows by one position a step: right for a CPU, sync- and launch-bound on a GPU.
`DecodeStep.run` is the same model function for one new position per row with every shape fixed:

- the cache (`KVCache`) is preallocated for `max_len` positions and attention runs over all of them,
  masked by the cache's key mask (a position not yet written is never marked);
- the write index is a device tensor (`cursor`), so one captured graph serves every position;
- routing stays on the device: the experts run through `Experts.forward_static`, ids as a tensor;
- the logits are those of the new position only.

`StaticDecoder` wraps a `VL2Model` as a generation backend (`vl2edge.generate.Backend`): prompts are
embedded and prefilled eagerly (chunks of any length), then each decode replays a captured CUDA graph
of the step (`graph=True`, CUDA only) or runs the step eagerly. Host work per token: copy the token ids
in, set the cursor, launch, copy the logits out (the one synchronisation a host-side sampler needs).
Caches are kept per batch size and reused (their buffers are what a graph captured), sized up to a
power of two so a longer request re-captures rarely. With offloaded experts the step reads slots through
each layer's device table; after each token the decoder hands the step's routing counts to every
offloaded layer (`OffloadedExperts.rebalance`), which moves its slots toward the hot set.

Dimension legend: B batch, V vocabulary, S allocated cache positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vl2edge.config import VL2Config

from .cache import KVCache
from .experts import Experts
from .language import LanguageModel
from .model import VL2Model
from .offload import OffloadedExperts
from .slot_cache import SlotCache

MIN_POSITIONS = 1024  # smallest cache a StaticDecoder allocates (then powers of two)


class StepCache:
    """The `Cache` protocol over a `KVCache` at a device-side write index (one position per call)."""

    def __init__(self, kv: KVCache, cursor: torch.Tensor):
        self.kv, self.cursor = kv, cursor

    def begin(self, attention_mask: torch.Tensor | None, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert T == 1 and attention_mask is None  # a decode step: one real token per row
        return self.kv.begin_at(self.cursor)

    def commit(self, T: int) -> None:
        """Nothing on the device: the host advances the `KVCache` after the step (`StaticDecoder.decode`)."""

    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv.write_kv_at(layer, self.cursor, k, v)

    def write_latent(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        return self.kv.write_latent_at(layer, self.cursor, latent)


class DecodeStep:
    """One decode position of every row of `cache`: token ids [B, 1] (device) -> float32 logits [B, V].

    `run` reads only device tensors (the ids, `cursor`, the cache), so it compiles as one graph
    (`torch.compile(step.run, fullgraph=True)`) and captures as one CUDA graph. Set `cursor` to the
    cache's length before each call; advance the cache (`KVCache.commit(1)`) after it.
    """

    def __init__(self, language: LanguageModel, cache: KVCache):
        self.language, self.cache = language, cache
        self.cursor = torch.zeros(1, dtype=torch.long, device=cache.key_mask.device)
        self.view = StepCache(cache, self.cursor)

    def run(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language(self.language.embed(ids), self.view, None, last_only=True, static=True)


class GraphedStep:
    """A `DecodeStep` captured once into a CUDA graph; `run` copies the ids in and replays it."""

    def __init__(self, step: DecodeStep, warmup: int = 2):
        cache = step.cache
        self.step = step
        self.ids = torch.zeros(cache.batch, 1, dtype=torch.long, device=step.cursor.device)
        side = torch.cuda.Stream(step.cursor.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: allocator pools, library handles, autotuning
            for _ in range(warmup):
                step.run(self.ids)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step.run(self.ids)
        cache.reset()  # the warm-up wrote position 0 and advanced the positions

    def run(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits


@dataclass
class _Slot:
    """A batch size's cache and its step (graphed when the decoder replays graphs)."""

    cache: KVCache
    step: DecodeStep
    graphed: GraphedStep | None


def allocation(max_len: int, limit: int) -> int:
    """Positions to allocate for a request of `max_len`: a power of two from MIN_POSITIONS, at most `limit`
    (the model's context) unless the request itself is longer."""
    n = MIN_POSITIONS
    while n < max_len:
        n *= 2
    return max(max_len, min(n, limit))


class StaticDecoder:
    """A generation backend over a `VL2Model`: eager prefill, static decode step (graph-replayed on CUDA)."""

    def __init__(self, model: VL2Model, graph: bool = True):
        if graph and model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device (graph=False runs the step eagerly)")
        self.model, self.graph = model, graph
        self._slots: dict[int, _Slot] = {}
        self._offloaded = [m for m in model.modules() if isinstance(m, OffloadedExperts)]

    @property
    def config(self) -> VL2Config:
        return self.model.config

    @staticmethod
    def supports(model: VL2Model) -> bool:
        """Whether every MoE layer's experts have a sync-free decode path where they are (`static_ready`)."""
        return all(m.static_ready for m in model.modules() if isinstance(m, Experts))

    def modules(self):
        """The torch modules it runs (offloading counters are read from them)."""
        return self.model.modules()

    def embed(self, input_ids, images=None, images_seq_mask=None, images_spatial_crop=None) -> torch.Tensor:
        return self.model.embed(input_ids, images, images_seq_mask, images_spatial_crop)

    def use_feature_cache(self, budget: int) -> None:
        self.model.use_feature_cache(budget)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache of at least `max_len` positions for `batch` rows (reused across requests)."""
        slot = self._slots.get(batch)
        if slot is None or slot.cache.max_len < max_len:
            self._slots.pop(batch, None)  # free the smaller one before allocating
            limit = self.config.language_config.max_position_embeddings
            cache = self.model.new_cache(batch, allocation(max_len, limit))
            step = DecodeStep(self.model.language, cache)
            with torch.inference_mode():
                graphed = GraphedStep(step) if self.graph else None
            slot = self._slots[batch] = _Slot(cache, step, graphed)
        slot.cache.reset()
        for m in self._offloaded:  # the warm-up's routings, or a previous request's last step
            m.clear_counts()
        return slot.cache

    def prefill(self, embeds: torch.Tensor, cache: KVCache, attention_mask=None) -> np.ndarray:
        return self.model.prefill(embeds, cache, attention_mask)

    @torch.inference_mode()
    def decode(self, token_ids, cache: KVCache) -> np.ndarray:
        """Feed one token per row [B]; float32 logits of the next position [B, V]."""
        slot = self._slots[cache.batch]
        assert slot.cache is cache  # caches come from new_cache
        if cache.length >= cache.max_len:
            raise ValueError(f"KV cache full: {cache.length + 1} positions needed, {cache.max_len} allocated")
        ids = torch.from_numpy(np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)).to(cache.key_mask.device)
        slot.step.cursor.fill_(cache.length)
        logits = slot.graphed.run(ids) if slot.graphed is not None else slot.step.run(ids)
        cache.commit(1)
        out = logits.cpu().numpy()
        if self._offloaded:
            counts = torch.stack([m.counts for m in self._offloaded]).cpu().numpy()
            for m, c in zip(self._offloaded, counts):
                m.rebalance(c)
        return out

    # the slot interface (continuous batching): the model's eager batched step; the graphed step serves one answer
    def new_slots(self, slots: int, max_len: int) -> SlotCache:
        return self.model.new_slots(slots, max_len)

    def prefill_row(self, embeds: torch.Tensor, cache: SlotCache, row: int) -> np.ndarray:
        return self.model.prefill_row(embeds, cache, row)

    def decode_rows(self, token_ids, cache: SlotCache) -> np.ndarray:
        return self.model.decode_rows(token_ids, cache)

    def move_row(self, cache: SlotCache, src: int, dst: int) -> None:
        self.model.move_row(cache, src, dst)

    def clear_row(self, cache: SlotCache, row: int) -> None:
        self.model.clear_row(cache, row)
