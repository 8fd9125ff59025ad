"""The `none` strategy: hard budget on the grid choice, provenance, encode once / ask many, big scenes."""

from __future__ import annotations

import pytest
import torch

from uhr.model.pruning.base import SceneEncoding
from uhr.model.pruning.config import PruningConfig
from uhr.model.pruning.none import NoneEncoding, NoneStrategy, anyres_token_count
from uhr.model.tiling import anyres_layout, select_pinpoint
from uhr.scenes.source import ArraySource


def _strategy(budget: int) -> NoneStrategy:
    return NoneStrategy(PruningConfig(strategy="none", budget=budget))


class RecordingSource(ArraySource):
    """An ArraySource that remembers the view sides it was asked for."""

    def __init__(self, image):
        super().__init__(image)
        self.sides: list[int] = []

    def read_view(self, max_side: int):
        self.sides.append(max_side)
        return super().read_view(max_side)


def test_budget_restricts_the_grid(tiny_model, image_factory):
    model, _ = tiny_model
    width, height = 70, 45
    counts = {tuple(p): anyres_token_count(width, height, tuple(p), 32, 8) for p in model.config.image_grid_pinpoints}
    best = select_pinpoint(width, height, model.config.image_grid_pinpoints)
    assert _strategy(10_000).pinpoint(model.config, width, height) == best == (64, 64)
    # One token short of the best grid: LLaVA-NeXT's choice among the grids that still fit.
    fitting = [list(p) for p, n in counts.items() if n <= counts[best] - 1]
    assert _strategy(counts[best] - 1).pinpoint(model.config, width, height) == select_pinpoint(width, height, fitting)
    source = ArraySource(image_factory(height, width))
    tokens = _strategy(counts[best] - 1).encode(model, source).tokens
    assert len(tokens) <= counts[best] - 1
    smallest = min(counts.values())
    with pytest.raises(ValueError, match=rf"budget {smallest - 1} is below the smallest LLaVA-NeXT token count {smallest}"):
        _strategy(smallest - 1).encode(model, source)


@pytest.mark.parametrize("size", [(45, 70), (70, 45), (33, 33), (10, 90)])
def test_provenance(tiny_model, image_factory, size):
    model, _ = tiny_model
    height, width = size
    encoding = _strategy(10_000).encode(model, ArraySource(image_factory(height, width)))
    assert isinstance(encoding, NoneEncoding)
    tokens = encoding.tokens
    n = len(tokens)
    assert encoding.dense == tokens.dense == n
    assert tokens.embeds.shape == (n, 64)
    for field in (tokens.scale, tokens.row, tokens.col, tokens.tile, tokens.n_source):
        assert field.shape == (n,) and field.dtype == torch.long
    thumb = tokens.scale == 0
    assert int(thumb.sum()) == 64 and bool(thumb[:64].all())  # thumbnail first
    assert tokens.per_scale() == {0: 64, 1: n - 64}
    newline = tokens.n_source == 0
    assert not bool(newline[:64].any())
    grid = encoding.grids[1]
    rows = int(newline.sum())
    # Newlines close every row: rows x (cols + 1) after the thumbnail.
    cols = (n - 64) // rows - 1
    assert rows * (cols + 1) == n - 64
    assert bool(newline[64:].reshape(rows, cols + 1)[:, -1].all())
    assert not bool(newline[64:].reshape(rows, cols + 1)[:, :-1].any())
    torch.testing.assert_close(tokens.embeds[newline], model.image_newline.detach().expand(rows, -1))
    assert int(tokens.n_source.sum()) == 64 + rows * cols
    # Rows/cols/tiles index the stitched grid; kept tokens are those LLaVA-NeXT keeps.
    assert int(tokens.row[64:].max()) < grid.shape[0] and int(tokens.col[64:][~newline[64:]].max()) < grid.shape[1]
    assert int(tokens.tile.max()) < grid.tiles[0] * grid.tiles[1]
    kept = ~newline & ~thumb
    kept_rows, kept_cols = tokens.row[kept], tokens.col[kept]
    assert bool(grid.valid[kept_rows, kept_cols].all())
    # Boxes of kept tokens overlap the scene; the thumbnail tiles the scene exactly.
    boxes = tokens.box[kept]
    assert bool(((boxes[:, 2] > 0) & (boxes[:, 0] < width) & (boxes[:, 3] > 0) & (boxes[:, 1] < height)).all())
    thumb_boxes = tokens.box[thumb]
    assert float(thumb_boxes[:, 0].min()) == 0 and float(thumb_boxes[:, 2].max()) == pytest.approx(width)
    assert float(thumb_boxes[:, 1].min()) == 0 and float(thumb_boxes[:, 3].max()) == pytest.approx(height)


def test_encode_once_ask_many(tiny_model, image_factory):
    model, _ = tiny_model
    strategy = _strategy(10_000)
    source = RecordingSource(image_factory(45, 70))
    encoding = strategy.encode(model, source)
    first = strategy.select(model, encoding, "How many ships?")
    second = strategy.select(model, encoding, "Is the road flooded?")
    assert first is second
    assert source.sides == [70] == strategy.views(model.config, 70, 45)
    with pytest.raises(TypeError, match="NoneEncoding"):
        strategy.select(model, SceneEncoding(grids=[], dense=0, width=1, height=1), "q")


def test_large_scene_is_read_at_the_grid_size(tiny_model, image_factory, monkeypatch):
    model, _ = tiny_model
    monkeypatch.setattr(NoneStrategy, "native_read_limit", 100)
    height, width = 150, 260
    strategy = _strategy(10_000)
    source = RecordingSource(image_factory(height, width))
    tokens = strategy.select(model, strategy.encode(model, source), "q")
    pinpoint = select_pinpoint(width, height, model.config.image_grid_pinpoints)
    layout = anyres_layout(width, height, pinpoint, 32)
    assert source.sides == [max(layout.resized)] == strategy.views(model.config, width, height)
    assert len(tokens) == anyres_token_count(width, height, pinpoint, 32, 8)
