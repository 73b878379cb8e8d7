"""The device placement plan (how many expert slots fit a GPU budget) and memory sizes; no torch.

`plan_sizes` takes the bytes of the model's parts (measured from a loaded model by
`vl2edge.models.offload.plan_placement`, or computed from the config by `vl2edge.info`) and puts the
non-expert weights, the KV cache for the context and a workspace first, then as many expert slots per
MoE layer as fit. `parse_bytes` reads the sizes users type ("6GiB").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import VL2Config
from .errors import InputError


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
    """'6GiB', '6 GB', '512MiB', 6e9 -> bytes: a positive, finite size of at most 1 EiB."""
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "kib": 2**10, "tb": 10**12, "gb": 10**9, "mb": 10**6,
             "kb": 10**3, "t": 2**40, "g": 2**30, "m": 2**20, "k": 2**10, "b": 1, "": 1}
    value, unit = -1.0, "?"
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    elif isinstance(text, str) and len(text) <= 64:
        s = text.strip().replace(" ", "")
        num = s.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
        unit = s[len(num):].lower()
        try:
            value = float(num)
        except ValueError:
            value = -1.0
    if unit not in units or not math.isfinite(value) or value <= 0 or value * units[unit] > 2**60:
        raise InputError(f"cannot read the memory size {str(text)[:64]!r}; write a positive size such as 6GiB, "
                         "1536MiB or 8GB")
    return int(value * units[unit])


def fixed_costs(config: VL2Config, context: int, item: int, batch: int = 1) -> tuple[int, int]:
    """(KV cache bytes for `context` positions, workspace bytes): ten vision tiles through the tower or a
    512-token prefill chunk, plus the allocator's slack."""
    c, v = config.language_config, config.vision_config
    if c.use_mla:
        assert c.kv_lora_rank is not None  # LanguageConfig requires it with MLA
        per_pos = c.kv_lora_rank + c.qk_rope_head_dim
    else:
        assert c.num_key_value_heads is not None  # LanguageConfig fills it from num_attention_heads
        per_pos = 2 * c.num_key_value_heads * c.head_dim
    kv = c.num_hidden_layers * batch * context * per_pos * item
    n = v.grid * v.grid
    workspace = max(10 * n * (3 * v.width + v.mlp_hidden) * item * 2,
                    512 * (c.intermediate_size * 3 + c.hidden_size * 8) * item) + 256 * 2**20
    return kv, workspace


def plan_sizes(config: VL2Config, budget: int, context: int, item: int, non_expert: int, expert_bytes: int) -> Plan:
    """Non-expert weights, KV cache and workspace first; expert slots with the rest (InputError if short)."""
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
