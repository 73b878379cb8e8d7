"""Loading a model directory into a `VL2Model`: the one entry point, `load_model(path, ...)`.

    config -> build on meta -> quantize predicate (swap Linear/experts for packed twins) ->
    sanitize + assign (checkpoint tensors renamed, strict key/shape checks, float tensors quantized in
    row chunks on the way when asked) -> placement (resident, or experts offloaded for a GPU budget) ->
    prepare (each quantized module picks its kernel on its final device)

A float or quantized (`quantization.json`) directory, or a Hugging Face id. Every tensor is assigned
from the memory-mapped checkpoint (one copy in memory, converted to the target dtype on the fly).
"""

from __future__ import annotations

import re
from typing import NamedTuple, TypeVar

import numpy as np
import torch
from torch import nn

from vl2edge.config import VL2Config
from vl2edge.errors import CheckpointError, InputError
from vl2edge.hub import resolve
from vl2edge.placement import Plan, parse_bytes
from vl2edge.quant.format import QuantSpec
from vl2edge.quant.modules import QLinear, QuantExperts
from vl2edge.quant.quantizers import quantize
from vl2edge.quant.recipes import MANIFEST, Recipe, base_name, packed_tensor_shapes, read_manifest
from vl2edge.weights import Checkpoint

from .experts import PROJECTIONS, DenseExperts
from .model import VL2Model
from .offload import CostModel, offload, plan_placement
from .swap import swap_modules

QUANT_CHUNK = 1 << 22  # values quantized per step when quantizing while loading

_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|qweight|scales|qzeros)")


class LoadedModel(NamedTuple):
    model: VL2Model
    plan: Plan | None  # the device placement, when a GPU budget was planned


def sanitize(name: str) -> tuple[str, int | None] | None:
    """Checkpoint tensor -> (model parameter or buffer, row of a stacked one), or None if unused.

    The one rename: routed experts stack into `experts.{gate,up,down}_proj` [E, ...] (packed:
    `experts.gate_proj.qweight` [E, ...]); the vision tower's `attn_pool` head (saved, never run by
    the reference) is not loaded.
    """
    if name.startswith("vision.attn_pool."):
        return None
    m = _EXPERT.fullmatch(name)
    if not m:
        return name, None
    return (f"{m[1]}.{m[3]}" if m[4] == "weight" else f"{m[1]}.{m[3]}.{m[4]}"), int(m[2])


def quantized_twins(specs: dict[str, QuantSpec]):
    """The swap predicate of a recipe: a module -> its packed twin when `specs` names its weights."""

    def replace(name: str, mod: nn.Module) -> nn.Module | None:
        if isinstance(mod, nn.Linear) and f"{name}.weight" in specs:
            # MLA's absorbed attention reads kv_b_proj's weight as a matrix: never an opaque kernel
            return QLinear.from_linear(mod, specs[f"{name}.weight"], needs_weight=name.endswith(".kv_b_proj"))
        if isinstance(mod, DenseExperts):
            found = {specs.get(f"{name}.{e}.{p}.weight") for e in range(mod.n_experts) for p in PROJECTIONS}
            if found == {None}:
                return None
            if len(found) != 1 or None in found:
                raise CheckpointError(f"{name}: every expert of a layer must share one quantization spec")
            return QuantExperts.from_dense(mod, found.pop())
        return None

    return replace


def load_model(path, dtype="auto", device="auto", quant: str | Recipe | None = None, kernel: str = "auto",
               gpu_memory=None, context: int | None = None) -> LoadedModel:
    """Load a float or quantized (`quantization.json`) model directory or Hugging Face id.

    quant: a recipe name (`int4-experts`, `int8`, `int4`) or `Recipe` to quantize a float checkpoint
    while loading, without writing files. kernel: force a quantized kernel (`dequant`, `dense`,
    `int4pack`; default: per device, see `vl2edge.quant.modules.kernel_for`). gpu_memory: a device
    memory budget ("6GiB"); the placement is planned for a KV cache of `context` positions (default:
    the model's maximum) and routed experts that do not fit are offloaded to CPU memory and streamed
    into a fixed pool of device slots (vl2edge/models/offload.py). On CUDA without a budget, the free
    device memory is the budget.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    budget = None
    if gpu_memory is not None:
        budget = parse_bytes(gpu_memory)
    elif device.type == "cuda":
        budget = int(torch.cuda.mem_get_info(device)[0] * 0.95)

    path = resolve(path)
    config = VL2Config.from_pretrained(path)
    stored = read_manifest(path)
    if stored is not None and quant is not None:
        raise InputError(f"{path} is already quantized ({MANIFEST}); drop quant={quant!r}")
    ck = open_checked(path, config, stored)
    recipe = Recipe(quant) if isinstance(quant, str) else quant
    specs = stored if stored is not None else (recipe.specs(config.tensor_shapes()) if recipe else {})

    with torch.device("meta"):
        model = VL2Model(config)
        swap_modules(model, quantized_twins(specs))
    first = device if budget is None else torch.device("cpu")  # offloading starts from CPU memory
    model.load_state_dict(_state(model, ck, dtype, first, None if stored else specs), strict=True, assign=True)
    model.requires_grad_(False)

    plan = None
    if budget is not None:
        plan = plan_placement(model, budget, context or config.language_config.max_position_embeddings)
        if plan.slots < plan.n_experts or gpu_memory is not None:
            offload(model, device, plan.slots, cost=CostModel(enabled=device.type == "cuda"))
        model.to(device)
    _prepare(model, ck, dtype, kernel, release=stored is not None)
    return LoadedModel(model.eval(), plan)


Part = TypeVar("Part", bound=nn.Module)


def load_part(ck: Checkpoint, module: Part, prefix: str, specs: dict[str, QuantSpec],
              dtype: torch.dtype = torch.float32, only: tuple[str, ...] | None = None) -> Part:
    """One part of the model, alone: `module` (built on the meta device; the checkpoint's names below
    `prefix`, e.g. `language.model.layers.3.`) gets its weights from the checkpoint tensors under `prefix`,
    the ones `specs` names quantized on the way (kernel "dequant": the reference computation). Nothing
    else of the checkpoint is read, so a part costs its own weights only (the streaming export). only: the
    tensors read are those under one of these names (a part made of modules from several places)."""
    swap_modules(module, quantized_twins(specs), prefix)
    state = _state(module, ck, dtype, torch.device("cpu"), specs, prefix, only or (prefix,))
    module.load_state_dict(state, strict=True, assign=True)
    module.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, (QLinear, QuantExperts)):
            m.prepare(dtype, "dequant")
    return module.eval()


def open_checked(path, config: VL2Config, stored: dict[str, QuantSpec] | None = None) -> Checkpoint:
    """The checkpoint of `path`, its tensor names, shapes and dtypes checked against `config` (and the
    packed layout `stored`, for a quantized directory) before anything is read."""
    ck = Checkpoint.open(path)
    shapes = config.tensor_shapes()
    expected = packed_tensor_shapes(shapes, stored) if stored else {k: (None, s) for k, s in shapes.items()}
    ck.check_keys(expected, "config.json" + (f" and {MANIFEST}" if stored else ""))
    ck.check_shapes({k: s for k, (_, s) in expected.items()})
    ck.check_dtypes({k: dt for k, (dt, _) in expected.items()})
    return ck


def _state(model: nn.Module, ck: Checkpoint, dtype: torch.dtype, device: torch.device,
           quantize_specs: dict[str, QuantSpec] | None, prefix: str = "",
           only: tuple[str, ...] = ("",)) -> dict[str, torch.Tensor]:
    """The model's state dict from the checkpoint (sanitized names, stacked experts); float tensors named
    in `quantize_specs` are quantized on the way (row chunks), so only their packed form is ever held.
    prefix: `model` is the part of the checkpoint below it; only: the tensors read (by name prefix)."""
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    buffers = {n for n, _ in model.named_buffers()}
    state: dict[str, torch.Tensor] = {}
    for name in ck.where:
        if not name.startswith(only):
            continue
        spec = (quantize_specs or {}).get(name)
        items = _quantized_items(ck, name, spec) if spec else [(name, None)]
        for tname, tensor in items:
            target = sanitize(tname)
            if target is None:
                continue
            pname, row = target[0].removeprefix(prefix), target[1]
            if pname not in targets:
                raise CheckpointError(f"{ck.root}: tensor {tname!r} has no place in the model")
            tdtype = targets[pname].dtype if pname in buffers else dtype
            if row is None:
                state[pname] = ck.torch(tname, dtype=tdtype, device=device) if tensor is None else tensor.to(device)
                continue
            if pname not in state:
                state[pname] = torch.empty(targets[pname].shape, dtype=tdtype, device=device)
            if tensor is None:
                ck.copy_into(tname, state[pname][row])
            else:
                state[pname][row].copy_(tensor)
    left = sorted(set(targets) - set(state))
    if left:
        raise CheckpointError(f"{ck.root}: no weights for {len(left)} tensor(s), e.g. {left[:3]}")
    return state


def _quantized_items(ck: Checkpoint, name: str, spec: QuantSpec) -> list[tuple[str, torch.Tensor]]:
    """Quantize one float checkpoint tensor in row chunks -> [(packed tensor name, tensor)]."""
    N, K = ck.shape(name)
    rows = max(1, QUANT_CHUNK // K)
    parts = [quantize(ck.numpy(name, np.float32, rows=slice(r, r + rows)), spec) for r in range(0, N, rows)]
    ck.release(name)
    return [(f"{base_name(name)}.{k}", torch.from_numpy(np.concatenate([p[k] for p in parts])))
            for k in parts[0]]


def _prepare(model: VL2Model, ck: Checkpoint, dtype: torch.dtype, kernel: str, release: bool) -> None:
    """Each quantized module picks its kernel; with `release`, the mapped packed pages of modules whose
    kernel re-laid the weights out are dropped (they are not read again)."""
    sources: dict[str, list[str]] = {}  # module -> checkpoint tensors it was loaded from
    for name in ck.where:
        target = sanitize(name)
        if target:
            sources.setdefault(target[0].rpartition(".")[0], []).append(name)
    for mname, m in model.named_modules():
        if isinstance(m, (QLinear, QuantExperts)):
            m.prepare(dtype, kernel)
            if release and m.kernel != "dequant":
                for sub in [mname, *(f"{mname}.{c}" for c, _ in m.named_children())]:
                    for name in sources.get(sub, []):
                        ck.release(name)


def resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available to torch")
    return d


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16")
    return names[dtype]
