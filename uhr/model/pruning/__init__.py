"""Visual-token pruning strategies: tokens in, at most `budget` tokens out, with provenance.

`STRATEGIES` maps each `StrategyName` to its class; `build_strategy(config)` instantiates the one a
`PruningConfig` names. See `base.py` for the interface and each module for its algorithm.
"""

from __future__ import annotations

from uhr.model.pruning.base import PrunedTokens, PruningStrategy, SceneEncoding, TokenGrid
from uhr.model.pruning.c2f import CoarseToFineStrategy
from uhr.model.pruning.config import PruningConfig, StrategyName
from uhr.model.pruning.downsample import DownsampleStrategy
from uhr.model.pruning.geollava import GeoLlavaStrategy
from uhr.model.pruning.none import NoneStrategy
from uhr.model.pruning.uhr_bat import UhrBatStrategy

STRATEGIES: dict[StrategyName, type[PruningStrategy]] = {
    StrategyName.NONE: NoneStrategy,
    StrategyName.DOWNSAMPLE: DownsampleStrategy,
    StrategyName.GEOLLAVA: GeoLlavaStrategy,
    StrategyName.UHR_BAT: UhrBatStrategy,
    StrategyName.C2F: CoarseToFineStrategy,
}


def build_strategy(config: PruningConfig) -> PruningStrategy:
    """The strategy `config.strategy` names, configured by `config`."""
    return STRATEGIES[StrategyName(config.strategy)](config)


__all__ = [
    "STRATEGIES",
    "CoarseToFineStrategy",
    "DownsampleStrategy",
    "GeoLlavaStrategy",
    "NoneStrategy",
    "PrunedTokens",
    "PruningConfig",
    "PruningStrategy",
    "SceneEncoding",
    "StrategyName",
    "TokenGrid",
    "UhrBatStrategy",
    "build_strategy",
]
