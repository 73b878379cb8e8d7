"""The image-token layout: which tile feature (or newline / separator row) every image token takes.

One numpy function shared by both backends (the torch model and the ONNX Runtime sessions), so the
2D tile tag is implemented once. Reference: `deepseek_vl2/models/modeling_deepseek_vl_v2.py`,
`DeepseekVLV2ForCausalLM.prepare_inputs_embeds` (the `tile_tag == "2D"` branch).

Dimension legend: B batch rows, N images per row, n patches per tile side after the 2x2 merge (14),
w/h tiles across/down of an image's local grid.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

NEWLINE, SEPARATOR = -1, -2


def image_layout(crops, n: int, global_view_pos: str = "head",
                 same_tile: Callable[[int, int, int], bool] | None = None) -> tuple[list[tuple[int, int]], list]:
    """Where every image token's feature comes from (the model side of the 2D tile tag).

    crops: images_spatial_crop [B, N, 2] ([w_tiles, h_tiles], [0, 0] = no more images in the row).
    same_tile(b, t1, t2) -> bool, optional: lets a single-tile image whose local tile is its global
    view (pixel-identical) be encoded once.
    Returns (tiles, rows): tiles = [(b, t)], the pixel tiles to run through the vision tower, in
    order; rows[b] = int64 array with one entry per image token of row b: k * n*n + p for patch p of
    tiles[k], NEWLINE or SEPARATOR. Per image: global view rows each followed by a newline, the
    separator, then the stitched local grid with a newline after each row (global last when
    global_view_pos == "tail").
    """
    tiles: list[tuple[int, int]]
    tiles, rows, nn_ = [], [], n * n
    grid = np.arange(nn_).reshape(n, n)
    for b, row in enumerate(np.asarray(crops).tolist()):
        t, parts = 0, []
        for w, h in row:
            if w == 0 or h == 0:
                break
            ids = list(range(len(tiles), len(tiles) + 1 + w * h))
            tiles += [(b, t + j) for j in range(1 + w * h)]
            if w * h == 1 and same_tile is not None and same_tile(b, t, t + 1):
                tiles.pop()
                ids[1] = ids[0]
            glob = np.concatenate([ids[0] * nn_ + grid, np.full((n, 1), NEWLINE)], axis=1).reshape(-1)
            # local tiles row-major: [(th tw), (n n)] -> [(th n), (tw n)]
            local = (np.asarray(ids[1:]).reshape(h, w)[:, None, :, None] * nn_ + grid[None, :, None, :])
            local = np.concatenate([local.reshape(h * n, w * n), np.full((h * n, 1), NEWLINE)], axis=1).reshape(-1)
            sep = np.array([SEPARATOR])
            parts += [glob, sep, local] if global_view_pos == "head" else [local, sep, glob]
            t += 1 + w * h
        rows.append(np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64))
    return tiles, rows


def gather_rows(index: np.ndarray, n_features: int) -> np.ndarray:
    """Map NEWLINE/SEPARATOR to the rows appended after the n_features tile features."""
    return np.where(index >= 0, index, n_features - 1 - index)
