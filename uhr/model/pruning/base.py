"""One interface for every token-pruning strategy.

A strategy turns a scene into at most `budget` visual tokens for the language model, in two steps:

* `encode(model, source)` does the query-independent work once per scene (reading views, running
  the vision tower, background clustering) and returns a `SceneEncoding`;
* `select(model, encoding, question)` does the per-question work (query-guided importance,
  budgeted selection) and returns `PrunedTokens`.

Every question on a scene reuses the same `SceneEncoding` ("encode once, ask many").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from uhr.model.pruning.grouping import cell_boxes
from uhr.scenes.source import PixelSource

if TYPE_CHECKING:
    from uhr.model.config import UhrConfig
    from uhr.model.pruning.config import PruningConfig
    from uhr.model.modeling import UhrForConditionalGeneration


@dataclass
class TokenGrid:
    """Vision-tower features of one pixel view, tile by tile, before the projector.

    The view is cut into `rows x cols` square tiles of the tower's input size; each tile gives a
    `g x g` patch grid (g = image_size // patch_size) plus its CLS token.
    """

    scale: int
    """Index of the view in its strategy's scale list; 0 is the coarsest (UHR-BAT's anchor)."""
    features: torch.Tensor
    """(rows, cols, g, g, D_v) patch features of the tower's selected layer."""
    cls: torch.Tensor
    """(rows, cols, D_v) CLS token of each tile at the same layer."""
    box: tuple[float, float, float, float]
    """(x0, y0, x1, y1) in scene pixels covered by the whole padded tile grid."""
    valid: torch.Tensor
    """(rows * g, cols * g) bool; False on tokens that only see padding beyond the scene edge."""

    @property
    def tiles(self) -> tuple[int, int]:
        return self.features.shape[0], self.features.shape[1]

    @property
    def patch_grid(self) -> int:
        return self.features.shape[2]

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the stitched token grid."""
        rows, cols, g = self.features.shape[0], self.features.shape[1], self.features.shape[2]
        return rows * g, cols * g

    def stitched(self) -> torch.Tensor:
        """(rows * g, cols * g, D_v): the tiles laid out as one token grid in raster order."""
        rows, cols, g, _, dim = self.features.shape
        # (rows, cols, g, g, D) -> (rows, g, cols, g, D) -> (rows * g, cols * g, D)
        return self.features.permute(0, 2, 1, 3, 4).reshape(rows * g, cols * g, dim)

    def token_boxes(self) -> torch.Tensor:
        """(H, W, 4) scene-pixel box (x0, y0, x1, y1) seen by each token of the stitched grid."""
        return cell_boxes(self.box, *self.shape)


@dataclass
class PrunedTokens:
    """At most `budget` visual tokens in the language model's input space, with provenance.

    Provenance is per output token: which scale and stitched-grid cell it comes from, which tile of
    that scale, how many dense tokens it stands for (1 = kept as is, k > 1 = mean of k merged
    tokens, 0 = a structural token such as LLaVA-NeXT's row newline) and the scene-pixel box it
    covers (for a merged token, the bounding box of its members).
    """

    embeds: torch.Tensor
    """(N, D) inputs for the language model, in the order they are placed in the prompt."""
    scale: torch.Tensor
    """(N,) long."""
    row: torch.Tensor
    """(N,) long, row in the stitched grid of that scale (a merged token: its members' centroid)."""
    col: torch.Tensor
    """(N,) long."""
    tile: torch.Tensor
    """(N,) long, raster index of the tile within its scale."""
    n_source: torch.Tensor
    """(N,) long."""
    box: torch.Tensor
    """(N, 4) float scene-pixel box (x0, y0, x1, y1)."""
    dense: int
    """Number of dense visual tokens the selection started from (all scales, no pruning)."""

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def shared_prefix(self, other: PrunedTokens) -> int:
        """How many leading tokens this selection and `other` have in common (equal embeddings).

        All of them for a query-independent strategy's selections of one scene; `c2f`'s share the
        scene thumbnail that precedes each question's own tokens. `answer` prefills them once.
        """
        n = min(len(self), len(other))
        if self.embeds is other.embeds:
            return n
        same = (self.embeds[:n] == other.embeds[:n]).all(dim=1)  # (n,)
        return n if bool(same.all()) else int(same.to(torch.uint8).argmin())

    def overlapping(self, bbox: list[float] | tuple[float, float, float, float]) -> torch.Tensor:
        """(N,) bool: the tokens whose box overlaps the scene-pixel box `bbox` (x0, y0, x1, y1) with positive area."""
        x0, y0, x1, y1 = bbox
        box = self.box
        return (box[:, 0] < x1) & (box[:, 2] > x0) & (box[:, 1] < y1) & (box[:, 3] > y0)

    def per_scale(self) -> dict[int, int]:
        """Kept tokens per scale index."""
        scales, counts = torch.unique(self.scale, return_counts=True)
        return {int(s): int(c) for s, c in zip(scales, counts)}

    @staticmethod
    def concat(parts: list[PrunedTokens], dense: int) -> PrunedTokens:
        """Join selections (e.g. one per scale or per tile) in the given order."""
        return PrunedTokens(
            embeds=torch.cat([p.embeds for p in parts]),
            scale=torch.cat([p.scale for p in parts]),
            row=torch.cat([p.row for p in parts]),
            col=torch.cat([p.col for p in parts]),
            tile=torch.cat([p.tile for p in parts]),
            n_source=torch.cat([p.n_source for p in parts]),
            box=torch.cat([p.box for p in parts]),
            dense=dense,
        )


@dataclass
class SceneEncoding:
    """The query-independent part of a scene, computed once and shared by all its questions.

    Strategies subclass this to keep what their `select` needs (clusters, region partitions,
    a cache of fine tiles already encoded, ...).
    """

    grids: list[TokenGrid]
    dense: int
    """Dense visual tokens this strategy's full-resolution input would have had."""
    width: int
    height: int
    extra: dict[str, Any] = field(default_factory=dict)


class PruningStrategy(ABC):
    """Base class of the five strategies; see `uhr.model.pruning.STRATEGIES`."""

    name: ClassVar[str]
    query_guided: ClassVar[bool] = False

    def __init__(self, config: PruningConfig):
        self.config = config

    def views(self, config: UhrConfig, width: int, height: int) -> list[int]:
        """Longest sides of the whole-scene views `encode` will ask the source for.

        `config` is the model's (tile size, patch grid, pinpoints): `uhr.model.load_model_config`
        gives it without loading weights, so a CPU read stage can fetch the views before the
        accelerator stage. Strategies that read windows on demand (`c2f`) list only their first,
        coarse views.
        """
        return []

    @abstractmethod
    def encode(self, model: UhrForConditionalGeneration, source: PixelSource) -> SceneEncoding:
        """Query-independent work: views, tower features, background structure."""

    @abstractmethod
    def select(
        self, model: UhrForConditionalGeneration, encoding: SceneEncoding, question: str
    ) -> PrunedTokens:
        """Per-question selection; the result never holds more than `config.budget` tokens."""
