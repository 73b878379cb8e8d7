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
from .vision import VisionTower
from .weights import Checkpoint

_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def checkpoint_name(name: str) -> tuple[str, int | None] | None:
    """Checkpoint tensor -> (model parameter, row of a stacked parameter), or None if unused.

    The one rename: routed experts stack into `experts.{gate,up,down}_proj` [E, ...]; the vision
    tower's `attn_pool` head (saved, never run by the reference) is not loaded.
    """
    if name.startswith("vision.attn_pool."):
        return None
    m = _EXPERT.fullmatch(name)
    return (f"{m[1]}.{m[3]}", int(m[2])) if m else (name, None)


class Projector(nn.Module):
    """`downsample_mlp_gelu`: pad the patch grid bottom/right to a multiple of 2, merge 2x2 cells
    (channel index c*4 + ki*2 + kj, like F.unfold), then Linear -> exact GELU -> ... -> Linear."""

    def __init__(self, c: ProjectorConfig):
        super().__init__()
        self.r = c.downsample_ratio
        mods: list[nn.Module] = []
        for j, (o, i) in enumerate(c.linear_shapes):
            mods += ([nn.GELU()] if j else []) + [nn.Linear(i, o)]
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, N, W = x.shape
        g, r = round(N ** 0.5), self.r
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
        self.projector = Projector(config.projector_config)
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
    def from_pretrained(cls, path, dtype="auto", device="auto") -> VL2Model:
        from .hub import resolve

        path = resolve(path)
        config = VL2Config.from_pretrained(path)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        ck = Checkpoint.open(path)
        shapes = config.tensor_shapes()
        ck.check_keys(shapes, "config.json")
        ck.check_shapes(shapes)
        with torch.device("meta"):
            model = cls(config)
        model.load_checkpoint(ck, dtype=dtype, device=device)
        return model.eval()

    def load_checkpoint(self, ck: Checkpoint, dtype, device) -> None:
        params = dict(self.named_parameters())
        stacks: dict[str, torch.Tensor] = {}
        for name in ck.where:
            target = checkpoint_name(name)
            if target is None:
                continue
            pname, row = target
            if pname not in params:
                raise CheckpointError(f"{ck.root}: tensor {name!r} has no place in the model")
            if row is None:
                self._assign(pname, ck.torch(name, dtype=dtype, device=device))
            else:
                if pname not in stacks:
                    stacks[pname] = torch.empty(params[pname].shape, dtype=dtype, device=device)
                ck.copy_into(name, stacks[pname][row])
        for pname, t in stacks.items():
            self._assign(pname, t)
        left = [n for n, p in self.named_parameters() if p.is_meta]
        if left:
            raise CheckpointError(f"{ck.root}: no weights for {len(left)} parameter(s), e.g. {left[:3]}")

    def _assign(self, pname: str, t: torch.Tensor) -> None:
        mod_name, _, leaf = pname.rpartition(".")
        mod = self.get_submodule(mod_name) if mod_name else self
        setattr(mod, leaf, nn.Parameter(t, requires_grad=False))

    # -- images -> token embeddings ---------------------------------------------------------------------

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] pixels -> [n, 196, D] projected features."""
        return self.projector(self.vision(tiles.to(self.dtype)))

    def image_features(self, images, images_spatial_crop) -> list[torch.Tensor]:
        """Per batch row, the image rows in sequence order ([n_image_tokens, D]; empty when none)."""
        images, crops = _tensor(images, device=self.device), _tensor(images_spatial_crop).tolist()
        tiles, layout = [], []  # layout: per row, per image (w_tiles, h_tiles, tile indices)
        for b, row in enumerate(crops):
            t, imgs = 0, []
            for w, h in row:
                if w == 0 or h == 0:
                    break
                idx = list(range(len(tiles), len(tiles) + 1 + w * h))
                tiles += [images[b, t + j] for j in range(1 + w * h)]
                if w * h == 1 and torch.equal(tiles[-2], tiles[-1]):
                    idx[1] = idx[0]  # a single-tile image's local view is its global view: encode it once
                imgs.append((w, h, idx))
                t += 1 + w * h
            layout.append(imgs)
        if not tiles:
            return [torch.empty(0, self.config.language_config.hidden_size, device=self.device)] * len(crops)
        used = sorted({i for imgs in layout for *_, idx in imgs for i in idx})
        feats = self.encode_tiles(torch.stack([tiles[i] for i in used]))
        pos = {i: k for k, i in enumerate(used)}
        return [torch.cat([self._arrange(feats, w, h, [pos[i] for i in idx]) for w, h, idx in imgs])
                if imgs else feats.new_empty(0, feats.shape[-1]) for imgs in layout]

    def _arrange(self, feats: torch.Tensor, w: int, h: int, idx: list[int]) -> torch.Tensor:
        """One image's rows: global view (a newline after each row), separator, local grid (newline per row)."""
        n = round(feats.shape[1] ** 0.5)
        D = feats.shape[-1]
        nl = self.image_newline.to(feats.dtype)
        glob = torch.cat([feats[idx[0]].view(n, n, D), nl.expand(n, 1, D)], dim=1).reshape(-1, D)
        # [(th tw), (n n), D] -> [(th n), (tw n), D]
        local = feats[idx[1:]].view(h, w, n, n, D).permute(0, 2, 1, 3, 4).reshape(h * n, w * n, D)
        local = torch.cat([local, nl.expand(h * n, 1, D)], dim=1).reshape(-1, D)
        sep = self.view_seperator.to(feats.dtype)[None]
        parts = [glob, sep, local] if self.config.global_view_pos == "head" else [local, sep, glob]
        return torch.cat(parts)

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
