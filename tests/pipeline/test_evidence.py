"""The evidence columns: which kept tokens cover a question's bbox, and at what resolution."""

from __future__ import annotations

import torch

from uhr.model.pruning.base import PrunedTokens
from uhr.pipeline.stages import evidence_seen


def _tokens(boxes: list[list[float]]) -> PrunedTokens:
    n = len(boxes)
    index = torch.arange(n)
    return PrunedTokens(
        embeds=torch.zeros(n, 4),
        scale=torch.zeros(n, dtype=torch.long),
        row=index,
        col=index,
        tile=torch.zeros(n, dtype=torch.long),
        n_source=torch.ones(n, dtype=torch.long),
        box=torch.tensor(boxes, dtype=torch.float32),
        dense=n,
    )


def test_finest_overlapping_token_gives_the_resolution():
    tokens = _tokens(
        [
            [0.0, 0.0, 128.0, 128.0],  # coarse token over the whole area
            [32.0, 32.0, 48.0, 48.0],  # 16-px token over the evidence
            [40.0, 40.0, 48.0, 56.0],  # 8 x 16 px: its longest side counts
            [100.0, 100.0, 104.0, 104.0],  # 4-px token elsewhere: not the evidence's
        ]
    )
    assert evidence_seen(tokens, [36.0, 36.0, 44.0, 44.0]) == {"evidence_tokens": 3, "evidence_px": 16.0}


def test_touching_is_not_overlapping_and_no_bbox_gives_nulls():
    tokens = _tokens([[0.0, 0.0, 16.0, 16.0]])
    assert evidence_seen(tokens, [16.0, 0.0, 20.0, 4.0]) == {"evidence_tokens": 0, "evidence_px": None}
    assert evidence_seen(tokens, None) == {"evidence_tokens": None, "evidence_px": None}
