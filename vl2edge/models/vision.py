"""SigLIP-SO400M vision tower in plain torch (the reference's timm `VisionTransformer`,
built in `deepseek_vl2/models/siglip_vit.py`).

Patch conv (stride = kernel = 14: a 384 tile gives 27x27 patches, the last 6 pixel rows/columns are
never seen), learned position embedding, pre-norm blocks with tanh-GELU MLPs and LayerNorm eps 1e-6,
then the final LayerNorm. No class token, no pooling: the checkpoint's `attn_pool` head is never run
and is not built. Attribute names are the checkpoint's (`vision.blocks.3.attn.qkv.weight`).

Dimension legend: n tiles, N patches per tile, W width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vl2edge.config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, c.width, kernel_size=c.patch_size, stride=c.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # [n, W, g, g] -> [n, N, W]


class Attention(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.heads = c.heads
        self.qkv = nn.Linear(c.width, 3 * c.width)
        self.proj = nn.Linear(c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, N, W = x.shape
        q, k, v = self.qkv(x).view(n, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [n, H, N, hd]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, N, W))


class Mlp(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(c.width, c.mlp_hidden)
        self.fc2 = nn.Linear(c.mlp_hidden, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # SigLIP's tanh-GELU (timm's own uses erf)


class Block(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.width, eps=1e-6)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.width, eps=1e-6)
        self.mlp = Mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTower(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config = c
        self.patch_embed = PatchEmbed(c)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.grid * c.grid, c.width), requires_grad=False)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [n, 3, S, S] -> features [n, N, W] (after the final LayerNorm)."""
        x = self.patch_embed(pixels) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
