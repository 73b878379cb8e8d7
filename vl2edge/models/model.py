"""DeepSeek-VL2 in PyTorch: vision tower -> 2x2-merge projector -> tile layout -> language model.

Modules and the forward/decoder interface only (loading is `vl2edge.models.loading.load_model`).
`logits(...)` is the reference's forward (all positions); `new_cache` / `prefill` / `decode` are the
decoder interface `vl2edge.generate` drives, `new_slots` / `prefill_row` / `decode_rows` / `move_row` /
`clear_row` the slot interface of the continuous-batching engine (`vl2edge.engine`).
Reference: `deepseek_vl2/models/modeling_deepseek_vl_v2.py` (`MlpProjector`,
`DeepseekVLV2ForCausalLM.prepare_inputs_embeds`).

Dimension legend: B batch, T tokens, n tiles, N vision patches per tile, W vision width, D hidden.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vl2edge.config import ProjectorConfig, VL2Config
from vl2edge.errors import InputError
from vl2edge.feature_cache import FeatureCache
from vl2edge.layout import gather_rows, image_layout

from .cache import KVCache
from .language import LanguageModel
from .slot_cache import SlotCache
from .vision import VisionTower


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
        self.features: FeatureCache | None = None  # use_feature_cache

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    # -- images -> token embeddings ---------------------------------------------------------------------

    def use_feature_cache(self, budget: int) -> None:
        """Keep the tiles' features within `budget` bytes when answering (vl2edge/feature_cache.py); 0: off."""
        self.features = FeatureCache(budget) if budget > 0 else None

    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] pixels -> [n, 196, D] projected features (tiles seen before: from the feature cache)."""
        if self.features is None or torch.is_grad_enabled():  # training never reads the cache
            return self.projector(self.vision(tiles.to(self.dtype)))
        host = tiles.detach().to("cpu", torch.float32).contiguous().numpy()
        return self.features.encode([t.tobytes() for t in host],
                                    lambda i: self.projector(self.vision(tiles[i].to(self.dtype))), torch.stack)

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

    # -- the slot interface (continuous batching) ------------------------------------------------------

    def new_slots(self, slots: int, max_len: int) -> SlotCache:
        return SlotCache(self.config.language_config, slots, max_len, self.dtype, self.device)

    @torch.inference_mode()
    def prefill_row(self, embeds: torch.Tensor, cache: SlotCache, row: int) -> np.ndarray:
        """Append a chunk [1, T, D] to row `row`; float32 logits of its last position [1, V]."""
        return self.language(_tensor(embeds, device=self.device), cache.chunk(row), None,
                             last_only=True).cpu().numpy()

    @torch.inference_mode()
    def decode_rows(self, token_ids, cache: SlotCache) -> np.ndarray:
        """One token for each of rows 0..R-1 [R], each at its own position; float32 logits [R, V]."""
        ids = _tensor(np.asarray(token_ids, dtype=np.int64).reshape(-1, 1), device=self.device)
        return self.language(self.language.embed(ids), cache.step(ids.shape[0]), None, last_only=True).cpu().numpy()

    def move_row(self, cache: SlotCache, src: int, dst: int) -> None:
        cache.move(src, dst)

    def clear_row(self, cache: SlotCache, row: int) -> None:
        cache.clear(row)
