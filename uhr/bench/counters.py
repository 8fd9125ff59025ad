"""Count what a strategy asks of the model, with forward hooks (the model itself is unchanged).

`WorkCounter(model)` hooks the vision tower's patch embedding (tiles), the projector (token rows) and
the language model's input embedding and rotary embedding (importance passes: a pass embeds its
text ids, then runs the decoder over text + visual positions, so visual = positions - text + 1 for
the one image placeholder the visual tokens replace). Counts go to the phase opened with
`counter.phase(name)`. Generation is not run inside a phase (its embeddings and decode steps are no
importance passes): the caller records each answer's visual tokens with `record_answers`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from uhr.bench.flops import Workload
from uhr.model import UhrForConditionalGeneration


class WorkCounter:
    """Per-phase `Workload` of one model; use as a context manager to remove the hooks at the end."""

    def __init__(self, model: UhrForConditionalGeneration):
        self.phases: dict[str, Workload] = {}
        self._phase: str | None = None
        self._texts: list[int] = []
        self._positions: list[int] = []
        decoder = model.language_model.get_decoder()
        hooks: list[tuple[nn.Module, Any]] = [
            (model.vision_tower.embeddings, self._on_tiles),
            (model.multi_modal_projector, self._on_projected),
            (model.get_input_embeddings(), self._on_text),
            (decoder.rotary_emb, self._on_positions),
        ]
        self._handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]

    def __enter__(self) -> WorkCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()

    @contextmanager
    def phase(self, name: str) -> Iterator[Workload]:
        """Count into `self.phases[name]` (created empty, or added to) while the block runs."""
        if self._phase is not None:
            raise RuntimeError(f"phase {name!r} opened inside phase {self._phase!r}")
        workload = self.phases.setdefault(name, Workload())
        self._phase, self._texts, self._positions = name, [], []
        try:
            yield workload
        finally:
            self._phase = None
        # Each importance pass embeds its text once, then runs the decoder once over all positions.
        if len(self._texts) != len(self._positions):
            raise RuntimeError(
                f"phase {name!r}: {len(self._texts)} text embeddings but {len(self._positions)} decoder passes; "
                "the model's importance path no longer pairs them, so passes cannot be counted"
            )
        workload.importance.extend(positions - text + 1 for text, positions in zip(self._texts, self._positions))

    def record_answers(self, name: str, visual: list[int]) -> None:
        """Add answers over `visual` tokens each to phase `name`."""
        self.phases.setdefault(name, Workload()).answers.extend(visual)

    def _current(self) -> Workload | None:
        return None if self._phase is None else self.phases[self._phase]

    def _on_tiles(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        workload = self._current()
        if workload is not None:
            workload.tiles += args[0].shape[0]  # pixel_values (t, 3, S, S)

    def _on_projected(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        workload = self._current()
        if workload is not None:
            features = args[0]
            workload.projected += features.numel() // features.shape[-1]

    def _on_text(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self._phase is not None:
            self._texts.append(args[0].numel())

    def _on_positions(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if self._phase is not None:
            self._positions.append(args[0].shape[1])  # hidden states (1, L, D)


__all__ = ["WorkCounter"]
