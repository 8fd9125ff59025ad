"""Visual-token pruning strategies: tokens in, at most `budget` tokens out, with provenance.

`STRATEGIES` maps each `StrategyName` to its class; `build_strategy(config)` instantiates the one a
`PruningConfig` names. See `base.py` for the interface and each module for its algorithm. Names are
imported on first use (`uhr._lazy`), so the light `config` module imports without torch.
"""

from __future__ import annotations

from uhr._lazy import lazy_exports

_EXPORTS = {
    "STRATEGIES": "uhr.model.pruning.registry",
    "build_strategy": "uhr.model.pruning.registry",
    "CoarseToFineStrategy": "uhr.model.pruning.c2f",
    "DownsampleStrategy": "uhr.model.pruning.downsample",
    "GeoLlavaStrategy": "uhr.model.pruning.geollava",
    "NoneStrategy": "uhr.model.pruning.none",
    "UhrBatStrategy": "uhr.model.pruning.uhr_bat",
    "PrunedTokens": "uhr.model.pruning.base",
    "PruningStrategy": "uhr.model.pruning.base",
    "SceneEncoding": "uhr.model.pruning.base",
    "TokenGrid": "uhr.model.pruning.base",
    "PruningConfig": "uhr.model.pruning.config",
    "StrategyName": "uhr.model.pruning.config",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
