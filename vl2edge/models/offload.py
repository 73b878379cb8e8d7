"""Expert offloading: hot experts in a fixed pool of device slots, cold ones streamed from CPU memory.

Every routed expert of a MoE layer becomes one contiguous byte blob (its gate/up/down weights, float
or packed) in CPU memory (pinned when CUDA is there): the layer's `ExpertStore`, built once. An
`OffloadedExperts` owns `n_slots` device buffers of one blob each over a store, managed LRU; a miss
copies the blob into the least recently used slot not needed by the current tokens. Before a layer
computes its experts it asks the next layer's router which experts the current hidden state would pick
and prefetches them (copies on a side stream, overlapped with compute). A miss may instead be computed
on the CPU from the blob when the cost model says that is faster than the copy. `OffloadedExperts`
implements the experts seam with the source's declared format (hidden, inter, spec and the base
class's `compute`), so the router and the rest of the model do not change and every expert computes
exactly as resident (same bytes, same math).
Counters: hits, misses, prefetches and how many were used, bytes copied, stall time, CPU fallbacks.

The static decode step (`vl2edge.models.decode_step`) reads the slots through a device-side table
(expert -> slot, -1 when not resident) and never asks the host: a resident expert is read from its slot,
any other in place from the store (pinned host memory, read over the bus by the CUDA kernel; on the CPU a
gather). The step also counts each expert's routings on the device; between tokens `rebalance` reads those
counts (with the logits, one synchronisation per token), lets the hot-set policy (`hot_set.HotSet`:
routing frequency with decay and recency, or LRU) pick which experts to copy into slots, and copies them
on the side stream. Table writes are ordered so that a step never reads a slot being overwritten: an
evicted expert's entry is cleared on the compute stream before the copy, which waits for it, and a new
entry is set on the copy stream after its copy.

`offload(model, device, slots)` swaps every MoE layer's experts; an offloaded model is re-planned
from its stores without repacking.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from vl2edge.kernels import available as kernels_available
from vl2edge.placement import Plan, plan_sizes
from vl2edge.quant.format import whole_blocks

from .experts import Experts
from .hot_set import HotSet
from .language import MoE, MoEGate
from .model import VL2Model
from .swap import swap_modules


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    bytes_copied: int = 0
    stall_s: float = 0.0
    cpu_computed: int = 0

    def add(self, o: Counters) -> Counters:
        return Counters(*(getattr(self, f) + getattr(o, f) for f in self.__dataclass_fields__))

    def as_dict(self) -> dict:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        lookups = self.hits + self.misses
        d["hit_rate"] = self.hits / lookups if lookups else None
        d["prefetch_accuracy"] = self.prefetch_used / self.prefetched if self.prefetched else None
        return d


class Layout:
    """How one expert's tensors sit in its blob: name -> (byte offset, dtype, shape)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.items, off = {}, 0
        for name, t in tensors.items():
            off = -(-off // 16) * 16  # 16-byte aligned views
            self.items[name] = (off, t.dtype, tuple(t.shape))
            off += t.numel() * t.element_size()
        self.nbytes = -(-off // 16) * 16

    def pack(self, tensors: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        for name, t in tensors.items():
            off = self.items[name][0]
            out[off:off + t.numel() * t.element_size()].copy_(t.contiguous().view(-1).view(torch.uint8))

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        """One blob [nbytes] -> its tensors (views)."""
        return {name: t[0] for name, t in self.stacked_views(buf[None]).items()}

    def stacked_views(self, bufs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Blobs [n, nbytes] -> each tensor of every blob, [n, *shape] (strided views, nothing copied)."""
        out = {}
        for name, (off, dtype, shape) in self.items.items():
            n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            out[name] = bufs[:, off:off + n].view(dtype).view(bufs.shape[0], *shape)
        return out


@dataclass
class CostModel:
    """Decides whether a missing expert is computed on the CPU instead of copied: bytes / bandwidths."""

    link_GBps: float = 20.0      # host -> device copy bandwidth (PCIe 4 x16 ~ 25)
    cpu_GBps: float = 15.0       # CPU memory read bandwidth for the expert's weights
    cpu_flops: float = 2e11      # CPU matmul throughput
    enabled: bool = True

    def cpu_faster(self, nbytes: int, rows: int, flops_per_row: int) -> bool:
        copy = nbytes / (self.link_GBps * 1e9)
        cpu = max(nbytes / (self.cpu_GBps * 1e9), rows * flops_per_row / self.cpu_flops)
        return self.enabled and cpu < copy



class ExpertStore:
    """The experts of one MoE layer as CPU blobs [E, nbytes], and their format (hidden, inter, spec)."""

    def __init__(self, experts: Experts, pin: bool | None = None):
        self.n_experts, self.hidden, self.inter, self.spec = experts.n_experts, experts.hidden, experts.inter, \
            experts.spec
        self.layout = Layout(experts.expert_tensors(0))
        pin = torch.cuda.is_available() if pin is None else pin
        self.blobs = torch.empty(self.n_experts, self.layout.nbytes, dtype=torch.uint8, pin_memory=pin)
        for e in range(self.n_experts):
            self.layout.pack({k: v.to("cpu") for k, v in experts.expert_tensors(e).items()}, self.blobs[e])


@dataclass(frozen=True)
class Prefetch:
    """What a layer prefetches for: the next MoE layer's experts and the router that picks them."""

    experts: OffloadedExperts
    gate: MoEGate


class OffloadedExperts(Experts):
    """The experts of one MoE layer, stored as CPU blobs, computed from device slots."""

    def __init__(self, store: ExpertStore, n_slots: int, device, cost: CostModel | None = None,
                 prefetch: Prefetch | None = None, policy: str = "lfru"):
        super().__init__(store.n_experts, store.hidden, store.inter, store.spec)
        self.store, self.layout, self.device = store, store.layout, torch.device(device)
        self.n_slots = max(0, min(n_slots, self.n_experts))
        self.slots = torch.empty(self.n_slots, self.layout.nbytes, dtype=torch.uint8, device=self.device)
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.free = list(range(self.n_slots))
        self.pending: set[int] = set()  # prefetched, not used yet
        self.needed: set[int] = set()   # experts the tokens of the current call use
        self.stats = Counters()
        self.cost = cost or CostModel(enabled=False)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ready: dict[int, torch.cuda.Event] = {}  # expert -> CUDA event of its copy
        self.next = prefetch
        self.table = torch.full((self.n_experts,), -1, dtype=torch.long, device=self.device)  # expert -> slot
        self.counts = torch.zeros(self.n_experts, dtype=torch.float32, device=self.device)  # static-step routings
        self.hot = HotSet(self.n_experts, self.n_slots, policy)

    # -- slot management --------------------------------------------------------------------------------

    def resident(self) -> list[int]:
        return list(self.lru)

    def _victim(self, keep: set[int], protect: int | None = None, strict: bool = False) -> int | None:
        """A free slot, else the least recently used expert's: first among those not in `keep` (still
        wanted), then (unless `strict`) any but `protect` (the one being loaded or computed)."""
        if self.free:
            return self.free.pop()
        candidates = [e for e in self.lru if e not in keep]
        if not candidates and not strict:
            candidates = [e for e in self.lru if e != protect]
        if not candidates:
            return None
        return self.evict(candidates[0])

    def evict(self, e: int) -> int:
        """Drop expert e from its slot; returns the slot (now unowned)."""
        slot = self.lru.pop(e)
        self.pending.discard(e)
        copied = self.ready.pop(e, None)
        if copied is not None:  # its copy (and the table write after it) may still be in flight: order the
            torch.cuda.current_stream(self.device).wait_event(copied)  # clearing after it, never before
        self.table[e] = -1  # on the compute stream: later steps read e from the store
        return slot

    def _load(self, e: int, slot: int) -> None:
        src = self.store.blobs[e]
        if self.stream is not None:
            # the copy waits for the compute stream's work so far: steps still reading this slot's previous
            # expert, and the table write that retired it
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.slots[slot].copy_(src, non_blocking=True)
                self.table[e] = slot
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self.ready[e] = ev
        else:
            self.slots[slot].copy_(src)
            self.table[e] = slot
        self.stats.bytes_copied += self.layout.nbytes
        self.lru[e] = slot

    def acquire(self, e: int, keep: set[int]) -> int | None:
        """The slot holding expert e (copied in if needed), or None when no slot can be freed."""
        if e in self.lru:
            self.stats.hits += 1
            self.lru.move_to_end(e)
            if e in self.pending:
                self.pending.discard(e)
                self.stats.prefetch_used += 1
            return self.lru[e]
        self.stats.misses += 1
        slot = self._victim(keep, protect=e)
        if slot is None:
            return None
        t = time.perf_counter()
        self._load(e, slot)
        self._wait(e)
        self.stats.stall_s += time.perf_counter() - t
        return slot

    def _wait(self, e: int) -> None:
        ev = self.ready.pop(e, None)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)

    def prefetch(self, experts: list[int], limit: int | None = None) -> None:
        """Start copying up to `limit` (default: the slot count) of these experts that are not resident,
        in order, never evicting one of them for another."""
        wanted = experts[: self.n_slots if limit is None else limit]
        for e in wanted:
            if e in self.lru:
                continue
            slot = self._victim(keep=set(wanted), strict=True)
            if slot is None:
                return
            self._load(e, slot)
            self.pending.add(e)
            self.stats.prefetched += 1

    def upcoming(self, e: int) -> None:
        if e not in self.lru and self.n_slots > 1:  # double buffering: copy the next while this one computes
            self.prefetch([e], limit=1)

    # -- the experts seam -------------------------------------------------------------------------------

    def expert_tensors(self, e: int) -> dict[str, torch.Tensor]:
        return self.layout.views(self.store.blobs[e])

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        if self.next is not None:
            self.next.experts.prefetch(likely(self.next.gate, x))
        self.needed = set(topk_idx.reshape(-1).tolist())
        return super().forward(x, topk_idx, topk_w)

    # -- the static decode step ------------------------------------------------------------------------

    @property
    def static_ready(self) -> bool:
        """On CUDA the static step reads these experts with the kernel (triton; whole quant blocks)."""
        return self.device.type != "cuda" or (kernels_available() and whole_blocks(self.spec, self.hidden,
                                                                                     self.inter))

    def forward_static(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        """Sync-free: residents from their slots by the table, the rest in place from the store."""
        flat = topk_idx.reshape(-1)
        self.counts.index_add_(0, flat, torch.ones_like(flat, dtype=self.counts.dtype))
        if x.is_cuda:
            if not self.static_ready:
                raise NotImplementedError("offloaded experts of partial quant blocks have no CUDA static path")
            from vl2edge.kernels.moe import moe_offloaded

            return moe_offloaded(x, topk_idx, topk_w, self.table, self.layout.stacked_views(self.slots),
                                 self.layout.stacked_views(self.store.blobs), self.spec)
        return super().forward_static(x, topk_idx, topk_w)

    def gathered_weights(self, idx: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
        """(CPU) each pair's tensors from its slot when the table has one, else from the store."""
        host = {k: t[idx] for k, t in self.layout.stacked_views(self.store.blobs).items()}
        if self.n_slots:
            slot = self.table[idx]
            hit = slot >= 0
            slots = self.layout.stacked_views(self.slots)
            host = {k: torch.where(hit.view(-1, *[1] * (t.dim() - 1)), slots[k][slot.clamp(min=0)], t)
                    for k, t in host.items()}
        return self.stacked_weights(host, dtype)

    def clear_counts(self) -> None:
        self.counts.zero_()

    def rebalance(self, counts) -> None:
        """After a static step, with its routing counts [E] (numpy, read by the caller with the logits):
        count hits (routings the table served from a slot) and misses, then copy in what the hot set admits."""
        live = [e for e in self.lru if e not in self.ready or self.ready[e].query()]
        served = float(counts[live].sum()) if live else 0.0
        self.stats.hits += int(served)
        self.stats.misses += int(counts.sum() - served)
        self.clear_counts()
        self.hot.sync(set(self.lru))
        admit, evict = self.hot.observe(counts)
        for i, e in enumerate(admit):
            slot = self.evict(evict[i]) if i < len(evict) else self.free.pop()
            self._load(e, slot)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if e not in self.lru and self.cost.cpu_faster(self.layout.nbytes, rows, 6 * self.hidden * self.inter):
            self.stats.misses += 1
            self.stats.cpu_computed += 1
            return self.compute(self.expert_tensors(e), x.to("cpu")).to(x.device)
        slot = self.acquire(e, self.needed or {e})
        if slot is None:  # no slot to spare (fewer slots than experts in use): compute from the CPU copy
            self.stats.cpu_computed += 1
            return self.compute(self.expert_tensors(e), x.to("cpu")).to(x.device)
        self._wait(e)
        return self.compute(self.layout.views(self.slots[slot]), x)


def likely(gate: MoEGate, x: torch.Tensor) -> list[int]:
    """The experts `gate` would choose for these hidden states, most frequent first."""
    idx, _ = gate(x)
    counts = torch.bincount(idx.reshape(-1), minlength=gate.weight.shape[0])
    order = torch.argsort(counts, descending=True, stable=True)
    return [int(e) for e in order[: int((counts > 0).sum())]]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_placement(model: VL2Model, budget: int, context: int) -> Plan:
    """The plan for a loaded model, from the bytes its tensors actually take."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    expert_params = {id(t) for m in moes for t in list(m.experts.parameters()) + list(m.experts.buffers())}
    non_expert = sum(_nbytes(t) for t in list(model.parameters()) + list(model.buffers()) if id(t) not in expert_params)
    expert_bytes = sum(_nbytes(t) for t in moes[0].experts.expert_tensors(0).values()) if moes else 0
    item = torch.empty(0, dtype=model.dtype).element_size()
    return plan_sizes(model.config, budget, context, item, non_expert, expert_bytes)


def offload(model: VL2Model, device, slots: int, cost: CostModel | None = None, pin: bool | None = None,
            prefetch: bool = True, kind: type[OffloadedExperts] = OffloadedExperts, policy: str = "lfru") -> VL2Model:
    """Replace every MoE layer's experts by `kind` (OffloadedExperts) with `slots` device slots each on
    `device`, chained for next-layer prefetch, and move everything else to `device`. The model must be
    on the CPU; an offloaded model is re-planned from its stores."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    stores = [m.experts.store if isinstance(m.experts, OffloadedExperts) else ExpertStore(m.experts, pin)
              for m in moes]
    replaced: dict[int, OffloadedExperts] = {}
    nxt: Prefetch | None = None
    for moe, store in zip(reversed(moes), reversed(stores)):
        off = kind(store, slots, device, cost, nxt if prefetch else None, policy)
        replaced[id(moe.experts)] = off
        nxt = Prefetch(off, moe.gate)
    swap_modules(model, lambda name, m: replaced.get(id(m)))
    return model.to(device)


def offload_stats(model: torch.nn.Module) -> dict:
    total = Counters()
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            total = total.add(m.stats)
    return total.as_dict()
