"""`none`: LLaVA-NeXT anyres tiling with every token, the fidelity anchor.

Exactly what `LlavaNextForConditionalGeneration` feeds its LM: a squashed whole-image thumbnail
tile (g x g tokens), then the anyres grid stitched, cropped of the rows/columns that only see
LLaVA-NeXT's centred padding (`unpad_image`), with `image_newline` after every row.

The only departure is a hard budget: a grid is a candidate only if its token count fits
`config.budget`, so the strategy never hands the LM more than B tokens.

Scenes up to `NoneStrategy.native_read_limit` pixels on their longest side are read at full
resolution and tiled exactly as LLaVA-NeXT's image processor does (bicubic resize, centred black
padding). Larger scenes -- true UHR scenes -- are read as a whole-scene view already at the grid's
size (the source's area-averaging read, COG overviews for a remote scene) instead of holding every
pixel in memory to shrink it afterwards; the token layout is unchanged, the pixels differ by the
resampling filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from transformers.models.llava_next.modeling_llava_next import unpad_image

from uhr.model import tiling
from uhr.model.pruning.base import PrunedTokens, PruningStrategy, SceneEncoding, TokenGrid
from uhr.scenes.source import PixelSource

if TYPE_CHECKING:
    from uhr.model.config import UhrConfig
    from uhr.model.modeling import UhrForConditionalGeneration


def unpadded_shape(width: int, height: int, grid_height: int, grid_width: int) -> tuple[int, int]:
    """(rows, cols) of a `grid_height` x `grid_width` token grid that LLaVA-NeXT keeps for an image.

    Uses transformers' `unpad_image` itself (on an empty tensor) so the rounding is LLaVA-NeXT's.
    """
    kept = unpad_image(torch.empty(0, grid_height, grid_width), (height, width))
    return kept.shape[1], kept.shape[2]


def anyres_token_count(width: int, height: int, pinpoint: tuple[int, int], tile: int, patch_grid: int) -> int:
    """Visual tokens LLaVA-NeXT gives a `width` x `height` image on grid `pinpoint` (height, width).

    Thumbnail g^2, plus the unpadded grid rows x cols, plus one newline token per row.
    """
    rows, cols = unpadded_shape(width, height, pinpoint[0] // tile * patch_grid, pinpoint[1] // tile * patch_grid)
    return patch_grid * patch_grid + rows * (cols + 1)


def anyres_max_tokens(pinpoints: list[list[int]], tile: int, patch_grid: int) -> int:
    """The most visual tokens LLaVA-NeXT gives any image on these grids: thumbnail + the largest grid
    whole (unpadding only removes rows or columns) with one newline per row. A budget that lets
    `none` keep every scene's tokens."""
    cells = [(height // tile * patch_grid, width // tile * patch_grid) for height, width in pinpoints]
    return patch_grid * patch_grid + max(rows * (cols + 1) for rows, cols in cells)


@dataclass
class NoneEncoding(SceneEncoding):
    """`SceneEncoding` of `none`: nothing depends on the question, so the tokens are final here."""

    tokens: PrunedTokens | None = None
    layout: tiling.AnyresLayout | None = None


class NoneStrategy(PruningStrategy):
    """LLaVA-NeXT anyres, all tokens (under a hard budget on the grid choice)."""

    name: ClassVar[str] = "none"
    query_guided: ClassVar[bool] = False
    native_read_limit: ClassVar[int] = 4096
    """Longest scene side (pixels) read at full resolution; 4096 px of RGB is 48 MiB."""

    def pinpoint(self, config: UhrConfig, width: int, height: int) -> tuple[int, int]:
        """The LLaVA-NeXT grid (height, width) for this scene among those whose tokens fit the budget."""
        tile, grid = config.tile_size, config.patch_grid
        counts = {tuple(p): anyres_token_count(width, height, tuple(p), tile, grid) for p in config.image_grid_pinpoints}
        fitting = [p for p, count in counts.items() if count <= self.config.budget]
        if not fitting:
            raise ValueError(
                f"budget {self.config.budget} is below the smallest LLaVA-NeXT token count {min(counts.values())} "
                f"for a {width}x{height} scene (grids {sorted(counts)}); raise the budget or use another strategy"
            )
        return tiling.select_pinpoint(width, height, fitting)

    def _read_side(self, width: int, height: int, layout: tiling.AnyresLayout) -> int:
        """Longest side of the whole-scene view to read: native up to the limit, else the grid's size."""
        native = max(width, height)
        return native if native <= self.native_read_limit else max(layout.resized)

    def views(self, config: UhrConfig, width: int, height: int) -> list[int]:
        layout = tiling.anyres_layout(width, height, self.pinpoint(config, width, height), config.tile_size)
        return [self._read_side(width, height, layout)]

    def encode(self, model: UhrForConditionalGeneration, source: PixelSource) -> NoneEncoding:
        width, height = source.width, source.height
        tile, grid = model.tile_size, model.patch_grid
        layout = tiling.anyres_layout(width, height, self.pinpoint(model.config, width, height), tile)
        image = source.read_view(self._read_side(width, height, layout))
        thumbnail = tiling.resize_bicubic(image, tile, tile)
        tiles = np.concatenate([thumbnail[None], tiling.cut_tiles(tiling.anyres_canvas(image, layout), tile)])
        features, cls = model.encode_tiles(torch.from_numpy(tiles))
        dim = features.shape[-1]
        device = features.device
        grids = [
            TokenGrid(
                scale=0,
                features=features[:1].reshape(1, 1, grid, grid, dim),
                cls=cls[:1].reshape(1, 1, dim),
                box=(0.0, 0.0, float(width), float(height)),
                valid=torch.ones(grid, grid, dtype=torch.bool, device=device),
            ),
            TokenGrid(
                scale=1,
                features=features[1:].reshape(layout.rows, layout.cols, grid, grid, dim),
                cls=cls[1:].reshape(layout.rows, layout.cols, dim),
                box=layout.scene_box(width, height),
                valid=torch.from_numpy(layout.valid_patches(model.config.vision_config.patch_size)).to(device),
            ),
        ]
        tokens = self._pack(model, grids, width, height)
        return NoneEncoding(grids=grids, dense=len(tokens), width=width, height=height, tokens=tokens, layout=layout)

    def select(self, model: UhrForConditionalGeneration, encoding: SceneEncoding, question: str) -> PrunedTokens:
        if not isinstance(encoding, NoneEncoding) or encoding.tokens is None:
            raise TypeError(f"`none` selects from its own NoneEncoding, got {type(encoding).__name__}")
        return encoding.tokens

    @staticmethod
    def _pack(model: UhrForConditionalGeneration, grids: list[TokenGrid], width: int, height: int) -> PrunedTokens:
        """LLaVA-NeXT's `pack_image_features` with provenance: thumbnail, then unpadded rows + newline."""
        thumb, anyres = grids
        grid = thumb.patch_grid
        device = thumb.features.device
        long = {"dtype": torch.long, "device": device}

        # Thumbnail: (g, g, D_v) -> (g*g, D) in raster order.
        thumb_embeds = model.project(thumb.stitched()).reshape(grid * grid, -1)
        thumb_rows, thumb_cols = torch.meshgrid(torch.arange(grid, **long), torch.arange(grid, **long), indexing="ij")
        thumb_boxes = thumb.token_boxes().to(device).reshape(grid * grid, 4)

        # Anyres grid: (H, W, D_v) -> projected (D, H, W) -> LLaVA-NeXT's crop (D, h, w).
        full_h, full_w = anyres.shape
        projected = model.project(anyres.stitched()).permute(2, 0, 1)
        kept = unpad_image(projected, (height, width))
        dim, rows, cols = kept.shape
        top, left = (full_h - rows) // 2, (full_w - cols) // 2
        newline = model.image_newline.to(kept.dtype)[:, None, None].expand(dim, rows, 1)
        grid_embeds = torch.cat([kept, newline], dim=2).flatten(1).transpose(0, 1)  # (rows * (cols + 1), D)

        # Provenance of the (rows, cols + 1) layout; the newline sits one past the row's last column.
        row = (top + torch.arange(rows, **long))[:, None].expand(rows, cols + 1)
        col = (left + torch.arange(cols + 1, **long))[None, :].expand(rows, cols + 1)
        is_newline = col == left + cols
        tile_col = torch.where(is_newline, col - 1, col) // grid
        tile = (row // grid) * anyres.tiles[1] + tile_col
        span = anyres.token_boxes().to(device)[top : top + rows, left : left + max(cols, 1)]  # (rows, >= 1, 4)
        boxes = span[:, :cols]  # (rows, cols, 4)
        row_box = torch.stack([span[:, 0, 0], span[:, 0, 1], span[:, -1, 2], span[:, -1, 3]], dim=-1)  # (rows, 4)
        if cols == 0:
            # A scene thinner than a token keeps only its rows' newlines, as LLaVA-NeXT does; each
            # row then stands for the scene's whole width.
            row_box[:, 0], row_box[:, 2] = 0.0, float(width)
        grid_boxes = torch.cat([boxes, row_box[:, None]], dim=1)

        count = grid * grid + rows * (cols + 1)
        return PrunedTokens(
            embeds=torch.cat([thumb_embeds, grid_embeds]),
            scale=torch.cat([torch.zeros(grid * grid, **long), torch.ones(rows * (cols + 1), **long)]),
            row=torch.cat([thumb_rows.flatten(), row.flatten()]),
            col=torch.cat([thumb_cols.flatten(), col.flatten()]),
            tile=torch.cat([torch.zeros(grid * grid, **long), tile.flatten()]),
            n_source=torch.cat([torch.ones(grid * grid, **long), (~is_newline).long().flatten()]),
            box=torch.cat([thumb_boxes, grid_boxes.reshape(-1, 4)]),
            dense=count,
        )


__all__ = ["NoneEncoding", "NoneStrategy", "anyres_token_count", "unpadded_shape"]
