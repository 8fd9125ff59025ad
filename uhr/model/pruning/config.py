"""Typed configuration of the pruning strategies (values live in `configs/pruning/*.yaml`)."""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrategyName(str, Enum):
    NONE = "none"
    DOWNSAMPLE = "downsample"
    GEOLLAVA = "geollava"
    UHR_BAT = "uhr-bat"
    C2F = "c2f"


class PartitionMethod(str, Enum):
    KMEANS = "kmeans"
    BIRCH = "birch"


class GeoLlavaConfig(BaseModel):
    """GeoLLaVA-8K background token pruning + anchored token selection."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_tokens_per_tile: int = Field(24, ge=1, description="Clusters kept per tile (MAX_TOKENS; 24 in the released config).")
    pointer_rounds: int = Field(12, ge=1, description="Upper bound on pointer-jumping rounds (root = root[root]).")
    max_tiles_per_side: int = Field(24, ge=1, description="Largest anyres grid side in tiles (24 -> 8064 px with 336 tiles).")
    max_tiles: int = Field(576, ge=1, description="Largest number of tiles of an anyres grid.")


class UhrBatConfig(BaseModel):
    """UHR-BAT query-guided multi-scale importance + region-wise preserve-and-merge."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    regions: int = Field(64, ge=1, description="Regions per scale (k of k-means / BIRCH clusters).")
    partition: PartitionMethod = Field(PartitionMethod.KMEANS, description="How each scale is partitioned into regions.")
    coord_weight: float = Field(1.0, ge=0.0, description="Scale of the normalised (x, y) coordinates appended to L2-normalised features before clustering.")
    importance_layer: int = Field(-1, description="LM layer whose text-to-vision attention gives importance; negative counts from the end, -1 = middle layer.")
    seed: int = Field(0, description="Seed of the clustering, so a scene always gets the same partition.")


class C2FConfig(BaseModel):
    """LRS-VQA coarse-to-fine text-guided tile selection on a dynamic image pyramid."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base_side: int = Field(1008, ge=1, description="Longest side of the coarsest pyramid level (its grid has at most 3x3 tiles of 336).")
    keep_ratio: float = Field(0.25, gt=0.0, le=1.0, description="Fraction of a level's tokens kept to decide which finer tiles to read.")
    pool: int = Field(2, ge=1, description="Average-pool factor applied to each tile's patch grid (2 -> 24x24 becomes 12x12).")
    importance_layer: int = Field(-1, description="LM layer whose attention from the last prompt token gives importance; -1 = middle layer.")


class PruningConfig(BaseModel):
    """Which strategy, and how many visual tokens it may hand to the language model."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    strategy: StrategyName = Field(StrategyName.UHR_BAT, description="Pruning strategy.")
    budget: int = Field(1024, ge=1, description="Hard cap B on visual tokens per question (all scales together).")
    scales: list[int] = Field(
        default_factory=lambda: [672, 1344, 2688, 4032],
        description="Longest sides of the multi-scale views, coarsest first (UHR-BAT, downsample uses the first that fits the budget).",
    )
    scale_budgets: list[int] | None = Field(
        None, description="Per-scale budgets B_s (same length as `scales`, sum <= budget); None splits `budget` in proportion to each scale's dense tokens."
    )
    geollava: GeoLlavaConfig = Field(default_factory=GeoLlavaConfig)
    uhr_bat: UhrBatConfig = Field(default_factory=UhrBatConfig)
    c2f: C2FConfig = Field(default_factory=C2FConfig)

    @model_validator(mode="after")
    def _check_scales(self) -> PruningConfig:
        if not self.scales or sorted(self.scales) != self.scales or len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales must be strictly increasing and non-empty, got {self.scales}")
        if self.scale_budgets is not None:
            if len(self.scale_budgets) != len(self.scales):
                raise ValueError(
                    f"scale_budgets has {len(self.scale_budgets)} entries but scales has {len(self.scales)}"
                )
            if sum(self.scale_budgets) > self.budget:
                raise ValueError(f"sum(scale_budgets)={sum(self.scale_budgets)} exceeds budget={self.budget}")
        return self
