"""DeepSeek-VL2 in PyTorch: vision tower -> 2x2-merge projector -> tile layout -> language model.

`VL2Model.from_pretrained(dir)` builds the model on the meta device and assigns every tensor from
the memory-mapped checkpoint (one copy in memory, converted to the target dtype on the fly); the key
set must equal the official layout exactly. `logits(...)` is the reference's forward (all positions);
`new_cache` / `prefill` / `decode` are the decoder interface `generate.py` drives.
Reference: `modeling_deepseek_vl_v2.py` (`MlpProjector`, `prepare_inputs_embeds`), research §4, §6.

Dimension legend: B batch, T tokens, n tiles, N vision patches per tile, W vision width, D hidden.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import ProjectorConfig, VL2Config
from .errors import CheckpointError, InputError
from .language import LanguageModel
from .processor import gather_rows, image_layout
from .qlinear import QLinear, QuantExperts, QuantSpec
from .quantize import MANIFEST, Recipe, base_name, packed_tensor_shapes, quantize, read_manifest
from .vision import VisionTower
from .weights import Checkpoint

QUANT_CHUNK = 1 << 22  # values quantized per step when quantizing while loading

_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.(weight|qweight|scales|qzeros)")


def checkpoint_name(name: str) -> tuple[str, int | None] | None:
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


class Projector(nn.Module):
    """`downsample_mlp_gelu`: pad the patch grid bottom/right to a multiple of 2, merge 2x2 cells
    (channel index c*4 + ki*2 + kj, like F.unfold), then Linear -> exact GELU -> ... -> Linear."""

    def __init__(self, c: ProjectorConfig, grid: int):
        super().__init__()
        self.r, self.grid = c.downsample_ratio, grid
        mods: list[nn.Module] = []
        for j, (o, i) in enumerate(c.linear_shapes):
            mods += ([nn.GELU()] if j else []) + [nn.Linear(i, o)]
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, W = x.shape
        g, r = self.grid, self.r
        pad = -g % r
        x = F.pad(x.view(n, g, g, W), (0, 0, 0, pad, 0, pad))            # [n, G, G, W]
        G = g + pad
        x = x.view(n, G // r, r, G // r, r, W).permute(0, 1, 3, 5, 2, 4)   # [n, h, w, W, ki, kj]
        return self.layers(x.reshape(n, (G // r) ** 2, W * r * r))


def _tensor(x, dtype=None, device=None) -> torch.Tensor:
    """numpy arrays, lists or tensors (as the processor returns them) -> a torch tensor."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(device=device, dtype=dtype) if (dtype or device) else t


class VL2Model(nn.Module):
    def __init__(self, config: VL2Config):
        super().__init__()
        self.config = config
        self.vision = VisionTower(config.vision_config)
        self.projector = Projector(config.projector_config, config.vision_config.grid)
        D = config.language_config.hidden_size
        self.image_newline = nn.Parameter(torch.zeros(D), requires_grad=False)
        self.view_seperator = nn.Parameter(torch.zeros(D), requires_grad=False)  # sic: the checkpoint's spelling
        self.language = LanguageModel(config.language_config)

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    # -- loading --------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, dtype="auto", device="auto", quant: str | Recipe | None = None,
                        kernel: str = "auto", gpu_memory=None, context: int | None = None) -> VL2Model:
        """Load a float or quantized (`quantization.json`) model directory.

        quant: a recipe name (`int4-experts`, `int8`, `int4`) or `Recipe` to quantize a float
        checkpoint while loading, without writing files. kernel: force a quantized kernel
        (`dequant`, `dense`, `int4pack`; default: per device, see `vl2edge.qlinear.kernel_for`).
        gpu_memory: a device memory budget ("6GiB"); the placement is planned for a KV cache of `context`
        positions (default: the model's maximum) and routed experts that do not fit are offloaded to
        CPU memory and streamed into a fixed pool of device slots (vl2edge/offload.py). On CUDA without a
        budget, the free device memory is the budget.
        """
        device = resolve_device(device)
        budget = None
        if gpu_memory is not None:
            from .offload import parse_bytes

            budget = parse_bytes(gpu_memory)
        elif device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(device)[0] * 0.95)
        if budget is None:
            return cls._load(path, dtype, device, quant, kernel)
        from .offload import CostModel, offload, plan_placement

        model = cls._load(path, resolve_dtype(dtype, device), torch.device("cpu"), quant, kernel)
        ctx = context or model.config.language_config.max_position_embeddings
        plan = plan_placement(model, budget, ctx)
        if plan.slots >= plan.n_experts and gpu_memory is None:
            model.plan = plan
            return model.to(device)
        return offload(model, device, plan, cost=CostModel(enabled=device.type == "cuda"))

    @classmethod
    def _load(cls, path, dtype, device, quant, kernel) -> VL2Model:
        from .hub import resolve

        path = resolve(path)
        config = VL2Config.from_pretrained(path)
        dtype = resolve_dtype(dtype, device)
        ck = Checkpoint.open(path)
        shapes = config.tensor_shapes()
        stored = read_manifest(path)
        if stored is not None and quant is not None:
            raise InputError(f"{path} is already quantized ({MANIFEST}); drop quant={quant!r}")
        recipe = Recipe(quant) if isinstance(quant, str) else quant
        specs = stored if stored is not None else (recipe.specs(shapes) if recipe else {})
        expected = packed_tensor_shapes(shapes, stored) if stored else {k: (None, s) for k, s in shapes.items()}
        ck.check_keys(expected, "config.json" + (f" and {MANIFEST}" if stored else ""))
        ck.check_shapes({k: s for k, (_, s) in expected.items()})
        with torch.device("meta"):
            model = cls(config)
            model._swap_quantized(specs)
        model.load_checkpoint(ck, dtype=dtype, device=device, quantize_specs=None if stored else specs)
        sources: dict[str, list[str]] = {}  # module -> checkpoint tensors it was loaded from
        for name in ck.where:
            target = checkpoint_name(name)
            if target:
                sources.setdefault(target[0].rpartition(".")[0], []).append(name)
        for mname, m in model.named_modules():
            if isinstance(m, (QLinear, QuantExperts)):
                m.prepare(dtype, kernel)
                if stored and m.kernel != "dequant":  # re-laid out: the mapped packed pages are not read again
                    for sub in [mname, *(f"{mname}.{c}" for c, _ in m.named_children())]:
                        for name in sources.get(sub, []):
                            ck.release(name)
        return model.eval()

    def _swap_quantized(self, specs: dict[str, QuantSpec]) -> None:
        """Replace the Linear / expert modules named in `specs` by their quantized drop-ins (same calls)."""
        for name, spec in specs.items():
            m = re.fullmatch(r"(.*\.mlp)\.experts\.\d+\.\w+\.weight", name)
            if m:
                moe = self.get_submodule(m[1])
                if isinstance(moe.experts, QuantExperts):
                    if moe.experts.spec != spec:
                        raise CheckpointError(f"{name}: every expert of a layer must share one quantization spec")
                    continue
                e = moe.experts
                moe.experts = QuantExperts(e.n_experts, e.gate_proj.shape[2], e.gate_proj.shape[1], spec)
            else:
                parent, _, leaf = base_name(name).rpartition(".")
                lin = getattr(self.get_submodule(parent), leaf)
                # MLA's absorbed attention reads kv_b_proj's weight as a matrix
                setattr(self.get_submodule(parent), leaf, QLinear(lin.in_features, lin.out_features, spec,
                                                                  bias=lin.bias is not None,
                                                                  needs_weight=leaf == "kv_b_proj"))

    def load_checkpoint(self, ck: Checkpoint, dtype, device, quantize_specs: dict | None = None) -> None:
        """Assign every checkpoint tensor to its place; float tensors named in `quantize_specs` are
        quantized on the way (row chunks), so only their packed form is ever held."""
        state = dict(self.named_parameters()) | dict(self.named_buffers())
        buffers = {n for n, _ in self.named_buffers()}
        stacks: dict[str, torch.Tensor] = {}
        for name in ck.where:
            spec = (quantize_specs or {}).get(name)
            items = _quantized_items(ck, name, spec) if spec else [(name, None)]
            for tname, tensor in items:
                target = checkpoint_name(tname)
                if target is None:
                    continue
                pname, row = target
                if pname not in state:
                    raise CheckpointError(f"{ck.root}: tensor {tname!r} has no place in the model")
                tdtype = state[pname].dtype if pname in buffers else dtype
                if row is None:
                    t = ck.torch(tname, dtype=tdtype, device=device) if tensor is None else tensor.to(device)
                    self._assign(pname, t, buffer=pname in buffers)
                    continue
                if pname not in stacks:
                    stacks[pname] = torch.empty(state[pname].shape, dtype=tdtype, device=device)
                if tensor is None:
                    ck.copy_into(tname, stacks[pname][row])
                else:
                    stacks[pname][row].copy_(tensor)
        for pname, t in stacks.items():
            self._assign(pname, t, buffer=pname in buffers)
        left = [n for n, p in list(self.named_parameters()) + list(self.named_buffers()) if p.is_meta]
        if left:
            raise CheckpointError(f"{ck.root}: no weights for {len(left)} tensor(s), e.g. {left[:3]}")

    def _assign(self, pname: str, t: torch.Tensor, buffer: bool = False) -> None:
        mod_name, _, leaf = pname.rpartition(".")
        mod = self.get_submodule(mod_name) if mod_name else self
        if buffer:
            mod._buffers[leaf] = t
        else:
            setattr(mod, leaf, nn.Parameter(t, requires_grad=False))

    # -- images -> token embeddings ---------------------------------------------------------------------

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] pixels -> [n, 196, D] projected features."""
        return self.projector(self.vision(tiles.to(self.dtype)))

    def image_features(self, images, images_spatial_crop) -> list[torch.Tensor]:
        """Per batch row, the image rows in sequence order ([n_image_tokens, D]; empty when none)."""
        images = _tensor(images, device=self.device)
        tiles, rows = image_layout(_tensor(images_spatial_crop).cpu().numpy(), self.config.tokens_per_side,
                                   self.config.global_view_pos,
                                   lambda b, t1, t2: torch.equal(images[b, t1], images[b, t2]))
        D = self.config.language_config.hidden_size
        if not tiles:
            return [torch.empty(0, D, device=self.device, dtype=self.dtype) for _ in rows]
        feats = self.encode_tiles(torch.stack([images[b, t] for b, t in tiles])).reshape(-1, D)
        table = torch.cat([feats, self.image_newline.to(feats.dtype)[None], self.view_seperator.to(feats.dtype)[None]])
        return [table[torch.from_numpy(gather_rows(r, feats.shape[0])).to(self.device)] for r in rows]

    @torch.inference_mode()
    def embed(self, input_ids, images=None, images_seq_mask=None, images_spatial_crop=None) -> torch.Tensor:
        """Token embeddings with image features scattered into the `images_seq_mask` positions."""
        ids = _tensor(input_ids, dtype=torch.long, device=self.device)
        embeds = self.language.embed(ids)
        if images is None or images_spatial_crop is None or not _tensor(images_spatial_crop).any():
            return embeds
        mask = _tensor(images_seq_mask, dtype=torch.bool, device=self.device)
        for b, f in enumerate(self.image_features(images, images_spatial_crop)):
            if int(mask[b].sum()) != f.shape[0]:
                raise InputError(f"row {b}: images_seq_mask marks {int(mask[b].sum())} positions but the images "
                                 f"give {f.shape[0]} feature rows")
            embeds[b, mask[b]] = f.to(embeds.dtype)
        return embeds

    # -- forward --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def logits(self, input_ids, attention_mask=None, images=None, images_seq_mask=None,
               images_spatial_crop=None) -> torch.Tensor:
        """float32 logits [B, T, V] for every position (the reference's forward)."""
        embeds = self.embed(input_ids, images, images_seq_mask, images_spatial_crop)
        B, T = embeds.shape[:2]
        mask = None if attention_mask is None else _tensor(attention_mask, dtype=torch.bool, device=self.device)
        return self.language(embeds, self.new_cache(B, T), mask)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(self.config.language_config, batch, max_len, self.dtype, self.device)

    @torch.inference_mode()
    def prefill(self, embeds: torch.Tensor, cache: KVCache, attention_mask=None) -> np.ndarray:
        """Append a chunk of embeddings [B, T, D] to the cache; float32 logits of its last position [B, V]."""
        mask = None if attention_mask is None else _tensor(attention_mask, dtype=torch.bool, device=self.device)
        return self.language(embeds, cache, mask, last_only=True).cpu().numpy()

    @torch.inference_mode()
    def decode(self, token_ids, cache: KVCache) -> np.ndarray:
        """Feed one token per row [B]; float32 logits of the next position [B, V]."""
        ids = _tensor(np.asarray(token_ids, dtype=np.int64).reshape(-1, 1), device=self.device)
        return self.language(self.language.embed(ids), cache, None, last_only=True).cpu().numpy()


def _quantized_items(ck: Checkpoint, name: str, spec: QuantSpec) -> list[tuple[str, torch.Tensor]]:
    """Quantize one float checkpoint tensor in row chunks -> [(packed tensor name, tensor)]."""
    N, K = ck.shape(name)
    rows = max(1, QUANT_CHUNK // K)
    parts = [quantize(ck.numpy(name, np.float32, rows=slice(r, r + rows)), spec) for r in range(0, N, rows)]
    ck.files[ck.where[name]].release(name)
    return [(f"{base_name(name)}.{k}", torch.from_numpy(np.concatenate([p[k] for p in parts])))
            for k in parts[0]]


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
