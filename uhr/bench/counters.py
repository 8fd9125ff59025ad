"""Count what a strategy asks of the model, with forward hooks (the model itself is unchanged).

`WorkCounter(model)` hooks the vision tower's patch embedding (tiles), the projector (token rows) and
the language model's input embedding and rotary embedding (importance passes). Scoring runs the LM
in two kinds of pass, each embedding its text ids and then running the decoder over its positions:
a prefix (the template's head and the image placeholder, replaced by the visual tokens, from
position 0: visual = positions - text + 1) and a question (its text only, from the position where
a prefix ends: it is scored against that prefix's visual tokens). Counts go to the phase opened with
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
        self._positions: list[tuple[int, int]] = []
        self._prefixes: dict[int, int] = {}
        """Length of each prefix seen so far -> its visual tokens (a prefix may serve later phases)."""
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
        # Each importance pass embeds its text once, then runs the decoder once over its positions.
        if len(self._texts) != len(self._positions):
            raise RuntimeError(
                f"phase {name!r}: {len(self._texts)} text embeddings but {len(self._positions)} decoder passes; "
                "the model's importance path no longer pairs them, so passes cannot be counted"
            )
        for text, (positions, start) in zip(self._texts, self._positions):
            if start == 0:
                self._prefixes[positions] = positions - text + 1
                workload.importance.append(positions - text + 1)
            elif start in self._prefixes:
                workload.importance_questions.append(self._prefixes[start])
            else:
                raise RuntimeError(f"phase {name!r}: a question pass continues a {start}-position prefix this counter never saw")

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
            hidden, position_ids = args[0], args[1]  # (1, L, D), (1, L)
            self._positions.append((hidden.shape[1], int(position_ids[0, 0])))


__all__ = ["WorkCounter"]
