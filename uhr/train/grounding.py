"""Grounding loss: the language model's attention pointed at the question's evidence.

The query-guided strategies choose where to look with the LM's own attention: `c2f` keeps the
tokens its last prompt token attends to most at a middle decoder layer, and zooms under them. The
papers rely on a pretrained LLaVA whose attention already lands on what the question names; a model
trained from scratch (the demo model) has no such attention, and answering alone does not teach it,
because the top-k choice passes no gradient. With `grounding.weight` > 0, every sample whose record
names its evidence `bbox` adds

    weight * -log( sum of attention on the visual tokens whose box overlaps the bbox
                   / sum of attention on all visual tokens )

to the answer loss: the attention `c2f` scores with (`UhrForConditionalGeneration.prompt_attention`,
head-averaged, at `grounding.layer`), trained to put its visual mass on the evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from uhr.model.modeling import UhrForConditionalGeneration, per_image
from uhr.model.pruning.base import PrunedTokens
from uhr.model.pruning.uhr_bat import middle_layer


def grounding_loss(
    model: UhrForConditionalGeneration,
    batch: dict[str, torch.Tensor],
    visual: Sequence[PrunedTokens | Sequence[PrunedTokens]],
    boxes: list[Any],
    layer: int | None,
) -> torch.Tensor | None:
    """Mean over the rows with evidence of -log(share of the visual attention on the evidence); None when no row has any.

    `batch` holds `forward`'s `input_ids`, `attention_mask` and `labels`, `visual` its rows' images;
    `boxes` is each row's evidence in the frame of its (first) image's visual tokens' boxes, or
    None. A row whose tokens do not overlap its evidence (a strategy that pruned it all away) has no
    target and is left out.
    """
    images = per_image(visual)
    masks = {i: row[0].overlapping(bbox) for i, (row, bbox) in enumerate(zip(images, boxes)) if bbox is not None}
    rows = [i for i, mask in masks.items() if bool(mask.any())]
    if not rows:
        return None
    attention = model.prompt_attention(
        batch["input_ids"][rows],
        batch["attention_mask"][rows],
        batch["labels"][rows],
        [images[i] for i in rows],
        layer=middle_layer(model, layer),
    )
    losses = []
    for weights, i in zip(attention, rows):
        on_evidence = weights[masks[i].to(weights.device)].sum()
        losses.append(-(torch.log(on_evidence.clamp_min(1e-12)) - torch.log(weights.sum().clamp_min(1e-12))))
    return torch.stack(losses).mean()


__all__ = ["grounding_loss"]
