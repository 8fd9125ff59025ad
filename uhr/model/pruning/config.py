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

    max_tokens_per_tile: int = Field(
        24, ge=1, description="Clusters kept per tile (MAX_TOKENS; 24 in the released config)."
    )
    pointer_rounds: int = Field(12, ge=1, description="Upper bound on pointer-jumping rounds (root = root[root]).")
    max_tiles_per_side: int = Field(
        147, ge=1, description="Largest anyres grid side in tiles (147 in the released list: 3 x 147 tiles, 49,392 px)."
    )
    max_tiles: int = Field(576, ge=2, description="Largest number of tiles of an anyres grid (grids have 2..max_tiles tiles).")
    max_aspect: int = Field(
        49, ge=1, description="Largest ratio of a grid's long side to its short side, in tiles (49 in the released list)."
    )
    fill_empty_slots: bool = Field(
        True,
        description=(
            "A tile with fewer clusters than max_tokens_per_tile emits zero-feature filler tokens in the empty "
            "slots, as the released model does (it was trained with them); False drops them."
        ),
    )
    chunk_tiles: int = Field(
        64, ge=1, description="Tiles encoded and clustered together; bounds the tower features held at once."
    )


class UhrBatConfig(BaseModel):
    """UHR-BAT query-guided multi-scale importance + region-wise preserve-and-merge."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    regions: int = Field(
        64, ge=1, description="Regions per scale (k of k-means / BIRCH; fewer when a scale has fewer distinct tokens)."
    )
    partition: PartitionMethod = Field(PartitionMethod.KMEANS, description="How each scale is partitioned into regions.")
    coord_weight: float = Field(
        1.0,
        ge=0.0,
        description="Scale of the normalised (x, y) coordinates appended to L2-normalised features before clustering.",
    )
    importance_layer: int | None = Field(
        None,
        description=(
            "LM layer whose text-to-vision attention gives importance; negative counts from the end; "
            "None = the middle layer (num_layers // 2)."
        ),
    )
    reserve_regions: bool = Field(
        True,
        description=(
            "Reserve the top token of each of a scale's first min(R_s, B_s) regions before cutting its candidate "
            "sequence to B_s, so every region that fits keeps a token (section 3.3); False cuts the sequence plainly, "
            "as Algorithm 1 writes it, and the first regions may take the whole budget."
        ),
    )
    seed: int = Field(0, description="Seed of the clustering, so a scene always gets the same partition.")
    kmeans_max_iter: int = Field(100, ge=1, description="Lloyd iterations of k-means (MiniBatch k-means: passes over the data).")
    minibatch_above: int = Field(
        16384, ge=1, description="Scales with more tokens than this use MiniBatchKMeans instead of full k-means."
    )
    minibatch_size: int = Field(4096, ge=1, description="Batch size of MiniBatchKMeans.")
    birch_threshold: float = Field(0.5, gt=0.0, description="BIRCH subcluster radius in the clustering embedding space.")


class C2FConfig(BaseModel):
    """LRS-VQA coarse-to-fine text-guided tile selection on a dynamic image pyramid."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    base_side: int = Field(
        1008, ge=1, description="Longest side of the coarsest pyramid level (its grid has at most 3x3 tiles of 336)."
    )
    keep_ratio: float = Field(
        0.25,
        gt=0.0,
        le=1.0,
        description="Fraction of a level's tokens kept, both to choose the finer tiles to read and as the final selection.",
    )
    pool: int = Field(
        2, ge=1, description="Average-pool factor of each tile's patch grid (2: 24x24 -> 12x12); must divide the patch grid."
    )
    importance_layer: int | None = Field(
        None,
        description=(
            "LM layer whose attention from the last prompt token gives importance; negative counts from the end; "
            "None = the middle layer."
        ),
    )
    global_view: bool = Field(
        True, description="Prepend the global thumbnail (the scene at one tile's longest side, aspect kept) as LRS-VQA does."
    )
    max_cached_tiles: int = Field(
        4096, ge=0, description="Fine tiles a scene's encoding keeps for later questions (least recently used dropped)."
    )
    global_max_fraction: float = Field(
        0.75,
        gt=0.0,
        lt=1.0,
        description="Largest share of the budget the thumbnail's g*g tokens may take; beyond it they are average-pooled to fit.",
    )


class PruningConfig(BaseModel):
    """Which strategy, and how many visual tokens it may hand to the language model."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    strategy: StrategyName = Field(StrategyName.UHR_BAT, description="Pruning strategy.")
    budget: int = Field(1024, ge=1, description="Hard cap B on visual tokens per question (all scales together).")
    scales: list[int] = Field(
        default_factory=lambda: [672, 1344, 2688, 4032],
        description=(
            "Longest sides of the UHR-BAT multi-scale views, coarsest (the anchor) first. Sides beyond the scene's "
            "own longest side are clamped to it and merged (no upsampling)."
        ),
    )
    scale_budgets: list[int] | None = Field(
        None,
        description=(
            "Per-scale budgets B_s (same length as `scales`, sum <= budget). None allocates them: every scale first "
            "gets one token per region, the rest of the budget is split in proportion to each scale's tokens "
            "(so finer scales get more; a share beyond a scale's tokens goes to the others); if the regions alone exceed "
            "the budget, the whole budget is split that way."
        ),
    )
    geollava: GeoLlavaConfig = Field(default_factory=GeoLlavaConfig)
    uhr_bat: UhrBatConfig = Field(default_factory=UhrBatConfig)
    c2f: C2FConfig = Field(default_factory=C2FConfig)

    @model_validator(mode="after")
    def _check_scales(self) -> PruningConfig:
        if not self.scales or sorted(self.scales) != self.scales or len(set(self.scales)) != len(self.scales):
            raise ValueError(f"scales must be strictly increasing and non-empty, got {self.scales}")
        if self.scales[0] < 1:
            raise ValueError(f"scales must be positive, got {self.scales}")
        if self.scale_budgets is not None:
            if len(self.scale_budgets) != len(self.scales):
                raise ValueError(
                    f"scale_budgets has {len(self.scale_budgets)} entries but scales has {len(self.scales)}"
                )
            if any(b < 0 for b in self.scale_budgets):
                raise ValueError(f"scale_budgets must be non-negative, got {self.scale_budgets}")
            if sum(self.scale_budgets) > self.budget:
                raise ValueError(f"sum(scale_budgets)={sum(self.scale_budgets)} exceeds budget={self.budget}")
        return self
