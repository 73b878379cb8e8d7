"""`vl2edge info`: what a model is and what fits where, from its config alone (no weights are read)."""

from __future__ import annotations

import math

from .config import VL2Config
from .errors import InputError
from .placement import fixed_costs, plan_sizes
from .quant.format import QuantSpec
from .quant.recipes import RECIPES, Recipe

# onnxruntime keeps MatMulNBits' prepacked copies next to the weights: 2.66 GB resident for 1.94 GB of
# decoder weights measured on full-size Tiny int4-experts (bench/RESULTS.md, 2026-11-28)
ORT_OVERHEAD = 2.66 / 1.94


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
        kv, work = fixed_costs(config, ctx, 4)
        onnx = s["total"] + (s["non_expert"] - s["vision"]) if recipe else None  # float parts are fp32 in ONNX
        need = (onnx * ORT_OVERHEAD + kv + work) if onnx else None
        cpu = "-" if need is None else f"~{need / G:.1f} GiB" + ("" if not ram else (" fits" if need <= ram else
                                                                                       " does not fit"))
        lines.append(f"| {recipe or 'bf16'} | {s['total'] / G:.2f} | {s['per_token'] / G:.2f} | {gpu} | {cpu} |")
    lines += ["", f"GPU column: a {gpu_memory / G:.1f} GiB budget, bf16 activations, KV cache for {ctx} positions"
              if gpu_memory else "GPU column: pass --gpu-memory SIZE to plan a GPU placement",
              "CPU column: the ONNX export's weights (float parts in float32) with onnxruntime's prepacking "
              "overhead, the KV cache and a vision/prefill workspace (estimate)"]
    return "\n".join(lines)
