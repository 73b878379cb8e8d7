"""`vl2edge info`: what a model is and what fits where, from its config alone (no weights are read)."""

from __future__ import annotations

import math

from .config import VL2Config
from .errors import InputError
from .placement import fixed_costs, plan_sizes
from .quant.format import QuantSpec
from .quant.recipes import RECIPES, Recipe, export_block_size

# What the CPU path holds per stored byte (bench/RESULTS.md, 2026-12-02, full-size Tiny int4-experts
# export, `vl2edge run` on a 1024x768 image): the decoder session after its prefill (QMoE's packs carry
# per-block sums beside the weights, the arena the largest chunk's activations) and the int8 vision session.
DECODER_RESIDENT = 1.30
VISION_RESIDENT = 0.90
RUNTIME_BASE = 0.20 * 2**30  # python, numpy, tokenizers and onnxruntime's libraries


def onnx_resident(config: VL2Config, recipe: str, context: int) -> dict[str, int]:
    """What the ONNX Runtime backend holds answering with `context` positions, in bytes: `decoder` and
    `vision` are the export's stored graphs (the embedding table is memory-mapped, only its used rows
    resident; unquantized tensors in float32; the int8 vision graph), `kv` the float32 KV cache, and
    `resident` the estimate of the whole process."""
    lc = config.language_config
    block = export_block_size(lc.hidden_size, lc.expert_width)
    specs = Recipe(recipe, block_size=block).specs(config.tensor_shapes())
    decoder = vision = 0
    for name, shape in config.tensor_shapes().items():
        if name.startswith("vision.attn_pool.") or name == "language.model.embed_tokens.weight":
            continue
        if name.startswith(("vision.", "projector.")):
            int8 = name.startswith("vision.blocks.") and name.endswith(".weight") and len(shape) == 2
            vision += math.prod(shape) * (1 if int8 else 4)
        else:
            spec: QuantSpec | None = specs.get(name)
            if spec is not None and spec.bits == 8 and ".mlp.experts." not in name:
                decoder += math.prod(shape) + shape[0] * 4  # int8 rows + a scale per row (export/ops.py)
            else:
                decoder += spec.nbytes(*shape) if spec else math.prod(shape) * 4
    kv, _ = fixed_costs(config, context, 4)
    resident = int(decoder * DECODER_RESIDENT + vision * VISION_RESIDENT + kv + RUNTIME_BASE)
    return {"decoder": decoder, "vision": vision, "kv": kv, "resident": resident}


def sizes(config: VL2Config, recipe: str | None, float_bytes: int = 2) -> dict:
    """Bytes of the whole checkpoint, its non-expert part, one routed expert, and what a token reads."""
    specs = Recipe(recipe).specs(config.tensor_shapes()) if recipe else {}
    lc = config.language_config
    first_moe = next((i for i in range(lc.num_hidden_layers) if lc.is_moe_layer(i)), None)
    one_expert = f"language.model.layers.{first_moe}.mlp.experts.0."
    total = non_expert = expert = vision = 0
    for name, shape in config.tensor_shapes().items():
        if name.startswith("vision.attn_pool."):
            continue
        spec: QuantSpec | None = specs.get(name)
        n = spec.nbytes(*shape) if spec else math.prod(shape) * float_bytes
        total += n
        if ".mlp.experts." in name:
            expert += n if name.startswith(one_expert) else 0
        else:
            non_expert += n
            if name.startswith(("vision.", "projector.")):
                vision += n
    moe_layers = sum(lc.is_moe_layer(i) for i in range(lc.num_hidden_layers))
    embed = lc.vocab_size * lc.hidden_size * float_bytes
    per_token = non_expert - vision - embed + moe_layers * (lc.num_experts_per_tok or 0) * expert
    return {"total": total, "non_expert": non_expert, "expert": expert, "vision": vision, "per_token": per_token,
            "moe_layers": moe_layers}


def report(config: VL2Config, gpu_memory: int | None = None, ram: int | None = None, context: int | None = None,
           name: str = "") -> str:
    lc, G = config.language_config, 2**30
    ctx = context or lc.max_position_embeddings
    params = config.num_params() - sum(math.prod(s) for n, s in config.tensor_shapes().items()
                                       if n.startswith("vision.attn_pool."))
    base = sizes(config, None, 1)  # bytes at one byte per parameter = parameters
    # active per token: everything but the unchosen experts and the embedding table (one row is read)
    active = params - ((lc.n_routed_experts or 0) - (lc.num_experts_per_tok or 0)) * base["moe_layers"] * \
        base["expert"] - lc.vocab_size * lc.hidden_size
    lines = [f"{name or 'model'}: DeepSeek-VL2, {params / 1e9:.2f}B parameters ({active / 1e9:.2f}B active per "
             f"token), {lc.num_hidden_layers} layers, {'MLA' if lc.use_mla else 'MHA'} attention, "
             f"{lc.n_routed_experts} routed experts (top-{lc.num_experts_per_tok}), "
             f"context {lc.max_position_embeddings}", "",
             "| recipe | checkpoint GiB | read per token GiB | GPU | CPU (ONNX Runtime) RAM |",
             "|---|---|---|---|---|"]
    for recipe in (None, *RECIPES):
        s = sizes(config, recipe, 2)
        gpu = "-"
        if gpu_memory:
            try:
                plan = plan_sizes(config, gpu_memory, ctx, 2, s["non_expert"], s["expert"])
                gpu = "resident" if plan.slots >= plan.n_experts else \
                    f"offloaded: {plan.slots}/{plan.n_experts} experts per layer on the GPU"
            except InputError:
                gpu = "does not fit"
        need = onnx_resident(config, recipe, ctx)["resident"] if recipe else None
        cpu = "-" if need is None else f"~{need / G:.1f} GiB" + ("" if not ram else (" fits" if need <= ram else
                                                                                       " does not fit"))
        lines.append(f"| {recipe or 'bf16'} | {s['total'] / G:.2f} | {s['per_token'] / G:.2f} | {gpu} | {cpu} |")
    lines += ["", f"GPU column: a {gpu_memory / G:.1f} GiB budget, bf16 activations, KV cache for {ctx} positions"
              if gpu_memory else "GPU column: pass --gpu-memory SIZE to plan a GPU placement",
              f"CPU column: the ONNX export answering with {ctx} positions (int8 vision graph, float32 KV "
              "cache), as measured resident per stored byte (estimate; --context sets the positions)"]
    return "\n".join(lines)
