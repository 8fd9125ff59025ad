"""The strategy registry: `StrategyName` -> class, and `build_strategy(config)`."""

from __future__ import annotations

from uhr.model.pruning.base import PruningStrategy
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
