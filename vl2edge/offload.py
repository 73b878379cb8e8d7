"""Expert offloading: hot experts in a fixed pool of device slots, cold ones streamed from CPU memory.

Every routed expert of a MoE layer becomes one contiguous byte blob (its gate/up/down weights, float
or packed) in CPU memory (pinned when CUDA is there). Each layer owns `n_slots` device buffers of one
blob each, managed LRU; a miss copies the blob into the least recently used slot not needed by the
current tokens. Before a layer computes its experts it asks the next layer's router which experts the
current hidden state would pick and prefetches them (copies on a side stream, overlapped with
compute). A miss may instead be computed on the CPU from the blob when the cost model says that is
faster than the copy. `OffloadedExperts` implements the experts seam, so the router and the rest of
the model do not change, and every expert computes exactly as resident (same bytes, same math).
Counters: hits, misses, prefetches and how many were used, bytes copied, stall time, CPU fallbacks.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .experts import DenseExperts, Experts, swiglu
from .qlinear import QuantExperts, QuantSpec, dequantize


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
        out = {}
        for name, (off, dtype, shape) in self.items.items():
            n = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            out[name] = buf[off:off + n].view(dtype).view(shape)
        return out


def _expert_tensors(experts: Experts, e: int) -> dict[str, torch.Tensor]:
    if isinstance(experts, DenseExperts):
        return {"gate": experts.gate_proj[e], "up": experts.up_proj[e], "down": experts.down_proj[e]}
    if isinstance(experts, QuantExperts):
        out = {}
        for p in ("gate_proj", "up_proj", "down_proj"):
            for name, t in zip(("qweight", "scales", "qzeros"), getattr(experts, p).row(e)):
                if t is not None:
                    out[f"{p}.{name}"] = t
        return out
    raise TypeError(f"cannot offload {type(experts).__name__}")


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


class OffloadedExperts(Experts):
    """The experts of one MoE layer, stored as CPU blobs, computed from device slots."""

    def __init__(self, experts: Experts, n_slots: int, device, pin: bool | None = None,
                 cost: CostModel | None = None):
        super().__init__()
        self.n_experts, self.device = experts.n_experts, torch.device(device)
        self.spec: QuantSpec | None = getattr(experts, "spec", None)
        self.hidden = experts.hidden if isinstance(experts, QuantExperts) else experts.gate_proj.shape[2]
        self.inter = experts.inter if isinstance(experts, QuantExperts) else experts.gate_proj.shape[1]
        first = _expert_tensors(experts, 0)
        self.layout = Layout(first)
        pin = torch.cuda.is_available() if pin is None else pin
        self.store = torch.empty(self.n_experts, self.layout.nbytes, dtype=torch.uint8, pin_memory=pin)
        for e in range(self.n_experts):
            self.layout.pack({k: v.to("cpu") for k, v in _expert_tensors(experts, e).items()}, self.store[e])
        self.n_slots = max(0, min(n_slots, self.n_experts))
        self.slots = torch.empty(self.n_slots, self.layout.nbytes, dtype=torch.uint8, device=self.device)
        self.lru: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.free = list(range(self.n_slots))
        self.pending: set[int] = set()  # prefetched, not used yet
        self.stats = Counters()
        self.cost = cost or CostModel(enabled=False)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.ready: dict[int, object] = {}  # expert -> CUDA event of its copy
        self.next: OffloadedExperts | None = None  # the following MoE layer, for prefetch
        self.next_gate = None
        self.no_cache = False  # the naive baseline: every use copies the expert again

    def reset(self, n_slots: int, cost: CostModel | None = None, no_cache: bool = False) -> None:
        """Re-plan this layer's slots (benchmarks): empty cache, fresh counters."""
        self.n_slots = max(0, min(n_slots, self.n_experts))
        self.slots = torch.empty(self.n_slots, self.layout.nbytes, dtype=torch.uint8, device=self.device)
        self.lru.clear()
        self.free, self.pending, self.ready = list(range(self.n_slots)), set(), {}
        self.stats, self.no_cache = Counters(), no_cache
        if cost is not None:
            self.cost = cost

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
        e = candidates[0]
        slot = self.lru.pop(e)
        self.pending.discard(e)
        self.ready.pop(e, None)
        return slot

    def _load(self, e: int, slot: int) -> None:
        src = self.store[e]
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                self.slots[slot].copy_(src, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self.ready[e] = ev
        else:
            self.slots[slot].copy_(src)
        self.stats.bytes_copied += self.layout.nbytes
        self.lru[e] = slot

    def acquire(self, e: int, keep: set[int]) -> int | None:
        """The slot holding expert e (copied in if needed), or None when no slot can be freed."""
        if self.no_cache and e in self.lru:
            self.free.append(self.lru.pop(e))
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

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        if self.next is not None and self.next_gate is not None and not self.no_cache:
            self.next.prefetch(self.next.likely(self.next_gate, x))
        self._needed = set(topk_idx.reshape(-1).tolist())
        return super().forward(x, topk_idx, topk_w)

    @staticmethod
    def likely(gate, x: torch.Tensor) -> list[int]:
        """The experts `gate` would choose for these hidden states, most frequent first."""
        idx, _ = gate(x)
        counts = torch.bincount(idx.reshape(-1), minlength=gate.weight.shape[0])
        order = torch.argsort(counts, descending=True, stable=True)
        return [int(e) for e in order[: int((counts > 0).sum())]]

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if e not in self.lru and self.cost.cpu_faster(self.layout.nbytes, rows, 6 * self.hidden * self.inter):
            self.stats.misses += 1
            self.stats.cpu_computed += 1
            return self._compute(self.layout.views(self.store[e]), x.to("cpu")).to(x.device)
        slot = self.acquire(e, getattr(self, "_needed", {e}))
        if slot is None:  # no slot to spare (fewer slots than experts in use): compute from the CPU copy
            self.stats.cpu_computed += 1
            return self._compute(self.layout.views(self.store[e]), x.to("cpu")).to(x.device)
        self._wait(e)
        return self._compute(self.layout.views(self.slots[slot]), x)

    def _compute(self, t: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.spec is None:
            return swiglu(x, t["gate"], t["up"], t["down"])
        D, I = self.hidden, self.inter
        w = [dequantize(self.spec, t[f"{p}.qweight"], t[f"{p}.scales"], t.get(f"{p}.qzeros"), K=K).to(x.dtype)
             for p, K in (("gate_proj", D), ("up_proj", D), ("down_proj", I))]
        return swiglu(x, *w)


# -- planning -----------------------------------------------------------------------------------------------

@dataclass
class Plan:
    budget: int
    non_expert: int
    kv_cache: int
    workspace: int
    expert_bytes: int
    moe_layers: int
    n_experts: int
    slots: int

    @property
    def fraction(self) -> float:
        return self.slots / self.n_experts if self.n_experts else 1.0

    def __str__(self) -> str:
        g = 2**30
        used = self.non_expert + self.kv_cache + self.workspace + self.slots * self.moe_layers * self.expert_bytes
        return (f"placement for a {self.budget / g:.2f} GiB device budget:\n"
                f"  non-expert weights  {self.non_expert / g:7.2f} GiB\n"
                f"  KV cache            {self.kv_cache / g:7.2f} GiB\n"
                f"  workspace           {self.workspace / g:7.2f} GiB\n"
                f"  expert slots        {self.slots}/{self.n_experts} per MoE layer x {self.moe_layers} layers "
                f"({self.fraction:.0%} of experts resident), {self.expert_bytes / 2**20:.1f} MiB each\n"
                f"  total               {used / g:7.2f} GiB")


def parse_bytes(text) -> int:
    """'6GiB', '6 GB', '512MiB', 6e9 -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().replace(" ", "")
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "kib": 2**10, "tb": 10**12, "gb": 10**9, "mb": 10**6,
             "kb": 10**3, "t": 2**40, "g": 2**30, "m": 2**20, "k": 2**10, "b": 1, "": 1}
    num = s.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = s[len(num):].lower()
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value < 0:
        from .errors import InputError

        raise InputError(f"cannot read the memory size {text!r}; write e.g. 6GiB, 1536MiB or 8GB")
    return int(value * units[unit])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def fixed_costs(config, context: int, item: int, batch: int = 1) -> tuple[int, int]:
    """(KV cache bytes for `context` positions, workspace bytes): ten vision tiles through the tower or a
    512-token prefill chunk, plus the allocator's slack."""
    c, v = config.language_config, config.vision_config
    per_pos = (c.kv_lora_rank + c.qk_rope_head_dim) if c.use_mla else 2 * c.num_key_value_heads * c.head_dim
    kv = c.num_hidden_layers * batch * context * per_pos * item
    n = v.grid * v.grid
    workspace = max(10 * n * (3 * v.width + v.mlp_hidden) * item * 2,
                    512 * (c.intermediate_size * 3 + c.hidden_size * 8) * item) + 256 * 2**20
    return kv, workspace


def plan_sizes(config, budget: int, context: int, item: int, non_expert: int, expert_bytes: int) -> Plan:
    """Non-expert weights, KV cache and workspace first; expert slots with the rest (InputError if short)."""
    from .errors import InputError

    c = config.language_config
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    kv, workspace = fixed_costs(config, context, item)
    E = c.n_routed_experts or 0
    fixed = non_expert + kv + workspace
    if budget < fixed:
        raise InputError(f"a {budget / 2**30:.2f} GiB budget cannot hold this model's non-expert part: "
                         f"{non_expert / 2**30:.2f} GiB of weights + {kv / 2**30:.2f} GiB KV cache for {context} "
                         f"positions + {workspace / 2**30:.2f} GiB workspace = {fixed / 2**30:.2f} GiB; give it more "
                         "memory, a shorter context, or quantize (--quant int4-experts)")
    slots = min(E, (budget - fixed) // (moe_layers * expert_bytes)) if moe_layers and expert_bytes else E
    return Plan(budget, non_expert, kv, workspace, expert_bytes, moe_layers, E, int(slots))


def plan_placement(model, budget: int, context: int) -> Plan:
    """The plan for a loaded model, from the bytes its tensors actually take."""
    from .language import MoE

    moes = [layer.mlp for layer in model.language.model.layers if isinstance(layer.mlp, MoE)]
    expert_params = {id(t) for m in moes for t in list(m.experts.parameters()) + list(m.experts.buffers())}
    non_expert = sum(_nbytes(t) for t in list(model.parameters()) + list(model.buffers()) if id(t) not in expert_params)
    expert_bytes = sum(_nbytes(t) for t in _expert_tensors(moes[0].experts, 0).values()) if moes else 0
    item = torch.empty(0, dtype=model.dtype).element_size()
    return plan_sizes(model.config, budget, context, item, non_expert, expert_bytes)


def offload(model, device, plan: Plan, cost: CostModel | None = None, pin: bool | None = None):
    """Replace every MoE layer's experts by OffloadedExperts with `plan.slots` slots on `device`, chain
    the layers for prefetch, and move everything else to `device`. The model must be on the CPU."""
    from .language import MoE

    moes = [layer.mlp for layer in model.language.model.layers if isinstance(layer.mlp, MoE)]
    for m in moes:
        m.experts = OffloadedExperts(m.experts, plan.slots, device, pin=pin, cost=cost)
    for a, b in itertools.pairwise(moes):
        a.experts.next, a.experts.next_gate = b.experts, b.gate
    model.to(device)
    model.plan = plan
    return model


def offload_stats(model) -> dict:
    total = Counters()
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            total = total.add(m.stats)
    return total.as_dict()
