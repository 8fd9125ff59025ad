"""What the model looked at: a scene with the visual tokens a pruning strategy kept for one question.

`explain(model, source, question, pruning)` runs a strategy on one scene and question exactly as the
VQA job does (encode, select with the job's prompt, answer) and keeps the tokens' provenance;
`explain_images` does the same for a question on several images (a bi-temporal pair), each pruned
on its own and all of them given to the model together, as the VQA job asks such questions;
`render_explanation` draws it the way the pruning papers' figures do: the whole-scene view, each
kept token's scene-pixel box filled semi-transparently in its scale's colour, merged tokens
(`n_source` > 1) also outlined with the box of their members, structural and filler tokens
(`n_source` == 0: LLaVA-NeXT row newlines, GeoLLaVA-8K's empty cluster slots) left out, a legend with
the tokens per scale and the kept/dense counts, the question (and the answer) in the title.
`run_explain(ExplainConfig(...))` does all of it from URIs and writes the PNG, one per image.

The figure is laid out in whole pixels: the view is drawn unresampled (one figure pixel per view
pixel) below a title band and left of a legend panel, so a figure pixel can be traced to a view pixel
(`ExplanationFigure.view_origin`).
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from pydantic import BaseModel, ConfigDict, Field

from uhr.model import load_model
from uhr.model.pruning import PrunedTokens, build_strategy
from uhr.model.pruning.config import PruningConfig
from uhr.pipeline.config import Precision
from uhr.pipeline.defaults import default_model
from uhr.pipeline.stages import question_prompt
from uhr.pipeline.vqa import resolve_pruning
from uhr.scenes import open_scene
from uhr.scenes.normalize import NormalizeConfig
from uhr.scenes.source import PixelSource
from uhr.storage import StorageConfig, redact, uri_protocol

if TYPE_CHECKING:
    from uhr.model.modeling import UhrForConditionalGeneration

DPI = 128
"""Figure resolution; a power of two, so pixel sizes divided by it are exact inches."""
LEGEND_WIDTH = 330
"""Width in pixels of the legend panel right of the view."""
FONT_SIZE = 8.0
LINE_SPACING = 1.4
TITLE_LINE_HEIGHT = math.ceil(FONT_SIZE / 72 * DPI * LINE_SPACING)
"""Pixels per title line: the font size in pixels times matplotlib's line spacing."""
TITLE_PADDING = 14
# One legend entry's height in pixels (matplotlib's default label spacing, 0.5 em, with the text).
LEGEND_LINE_HEIGHT = math.ceil(FONT_SIZE / 72 * DPI * 1.7)
"""Pixels of the title band above and below its lines."""
FILL_ALPHA = 0.4
MERGED_FILL_ALPHA = 0.15
"""A merged token's box bounds members it averages: a lighter fill says the detail there is summarised."""
# Matplotlib's tab10 colours, one per scale index (coarse first); they repeat beyond ten scales.
SCALE_COLOURS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip


class ExplainConfig(BaseModel):
    """Everything `python -m jobs.explain` needs. Every field can be set in YAML or as `key=value`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    scene: str = Field(description="Scene URI (local path or object store), any raster `uhr.scenes` reads.")
    extra_scenes: list[str] = Field(
        default_factory=list,
        description="Further images of the question, in order (a bi-temporal pair's later image): each is pruned "
        "on its own and all are given to the model, as the VQA job asks such questions; one PNG per image.",
    )
    question: str = Field(min_length=1, description="The question, as a user would ask it.")
    choices: list[str] = Field(
        default_factory=list, description="Lettered options '(A) ...'; with them the prompt is the VQA job's XLRS layout."
    )
    out: str = Field(
        "explain.png",
        description="Where the PNG goes (local path or object-store URI); image k > 1 of a question goes beside it "
        "with '-k' before the suffix (explain-2.png).",
    )
    model: str | None = Field(None, description="Model directory or object-store URI; None: the default model.")
    pruning: PruningConfig = Field(default_factory=PruningConfig, description="Strategy and token budget.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object-store endpoint and GDAL tuning.")
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig, description="Bands, stretch and nodata handling.")
    precision: Precision = Field(Precision.FP32, description="Model weights and activations.")
    device: str = Field("auto", description="Torch device ('cpu', 'cuda', 'cuda:1'); 'auto': CUDA when available.")
    view_side: int = Field(
        1024, ge=16, description="Longest side in pixels of the scene view drawn (never more than the scene's own)."
    )
    answer: bool = Field(True, description="Also generate the model's answer and show it in the title.")
    max_new_tokens: int = Field(64, ge=1, description="Greedy generation limit of the answer.")


@dataclass
class Explanation:
    """One question on one scene: the tokens the strategy kept, and the view to draw them on."""

    scene: str
    question: str
    choices: list[str]
    """The lettered options the prompt lays out (empty for an open question)."""
    prompt: str
    strategy: str
    budget: int
    width: int
    height: int
    """Scene size in pixels (the frame of `tokens.box`)."""
    view: np.ndarray
    """(h, w, 3) uint8 whole-scene view, aspect kept."""
    tokens: PrunedTokens
    answer: str | None
    image: int = 1
    """Which of the question's images this is, from 1."""
    images: int = 1
    """How many images the question was asked of."""

    @property
    def place(self) -> str:
        """"image k of n, " for an image of a multi-image question, else ""."""
        return f"image {self.image} of {self.images}, " if self.images > 1 else ""

    @property
    def drawn(self) -> np.ndarray:
        """Indices of the tokens drawn: those that stand for scene pixels (n_source >= 1)."""
        return np.flatnonzero(self.tokens.n_source.cpu().numpy() >= 1)

    def view_boxes(self) -> np.ndarray:
        """(N, 4) float token boxes in view pixels, clipped to the scene."""
        boxes = self.tokens.box.detach().double().cpu().numpy().copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, self.width) * self.view.shape[1] / self.width
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, self.height) * self.view.shape[0] / self.height
        return boxes


def explain(
    model: UhrForConditionalGeneration,
    source: PixelSource,
    question: str,
    pruning: PruningConfig,
    *,
    choices: list[str] | None = None,
    scene: str = "",
    view_side: int = 1024,
    answer: bool = True,
    max_new_tokens: int = 64,
) -> Explanation:
    """Run `pruning`'s strategy on `source` for `question` as the VQA job does, keeping what it kept.

    The prompt is the VQA job's (`uhr.pipeline.stages.question_prompt`): the question, or XLRS's
    layout when `choices` are given. `pruning` applies under the model's own pruning defaults.
    """
    return explain_images(
        model, [source], question, pruning, choices=choices, scenes=[scene], view_side=view_side, answer=answer,
        max_new_tokens=max_new_tokens,
    )[0]  # fmt: skip


def explain_images(
    model: UhrForConditionalGeneration,
    sources: Sequence[PixelSource],
    question: str,
    pruning: PruningConfig,
    *,
    choices: list[str] | None = None,
    scenes: Sequence[str] = (),
    view_side: int = 1024,
    answer: bool = True,
    max_new_tokens: int = 64,
) -> list[Explanation]:
    """`explain` for a question asked of several images, in order: each image is encoded and pruned
    on its own (the budget is per image) and the model answers from all of them together, as the
    VQA job answers a question with `extra_scenes`. One Explanation per image, sharing the answer."""
    if not sources:
        raise ValueError("explain_images needs at least one image")
    pruning = resolve_pruning(pruning, model.config)
    strategy = build_strategy(pruning)
    prompt = question_prompt({"question": question, "choices": choices or None})
    with torch.inference_mode():
        tokens = [strategy.select(model, strategy.encode(model, source), prompt) for source in sources]
    reply = model.answer([tokens], [prompt], max_new_tokens=max_new_tokens)[0] if answer else None
    names = list(scenes) + [""] * (len(sources) - len(scenes))
    return [
        Explanation(
            scene=name,
            question=question,
            choices=list(choices or []),
            prompt=prompt,
            strategy=pruning.strategy.value,
            budget=pruning.budget,
            width=source.width,
            height=source.height,
            view=np.ascontiguousarray(source.read_view(min(view_side, max(source.width, source.height)))),
            tokens=kept,
            answer=reply,
            image=index,
            images=len(sources),
        )
        for index, (source, kept, name) in enumerate(zip(sources, tokens, names), start=1)
    ]


# ---------------------------------------------------------------------------------------------
# Drawing.


@dataclass(frozen=True)
class ExplanationFigure:
    """The rendered PNG and where the view sits in it."""

    png: bytes
    size: tuple[int, int]
    """(width, height) of the PNG in pixels."""
    view_origin: tuple[int, int]
    """(x, y) PNG pixel of the view's top-left pixel; view pixel (i, j) is PNG pixel (x + j, y + i)."""


def scale_colour(scale: int) -> str:
    """The colour of a scale index in every explanation figure."""
    return SCALE_COLOURS[scale % len(SCALE_COLOURS)]


def _title_lines(explanation: Explanation, chars: int) -> list[str]:
    tokens = explanation.tokens
    kept, dense = len(tokens), tokens.dense
    share = f" ({100 * kept / dense:.1f}%)" if dense else ""
    lines = textwrap.wrap(" ".join(["Q:", explanation.question, *explanation.choices]), chars)
    lines.append(f"{explanation.place}{explanation.strategy}, budget {explanation.budget}: {kept} of {dense} visual tokens kept{share}")
    if explanation.answer is not None:
        lines += textwrap.wrap(f"A: {explanation.answer!r}", chars, max_lines=3, placeholder=" ...")
    return lines


def _legend_handles(explanation: Explanation) -> list[Patch | Line2D]:
    """Per scale: colour, tokens drawn, merged ones and the typical token side; then the outline key."""
    tokens = explanation.tokens
    scales = tokens.scale.cpu().numpy()
    n_source = tokens.n_source.cpu().numpy()
    boxes = tokens.box.detach().double().cpu().numpy()
    sides = np.sqrt(np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0))
    handles: list[Patch | Line2D] = []
    for scale in sorted(set(scales[n_source >= 1].tolist())):
        members = (scales == scale) & (n_source >= 1)
        merged = int(((scales == scale) & (n_source > 1)).sum())
        label = f"scale {scale}: {int(members.sum())} tokens, ~{np.median(sides[members]):.0f} px"
        if merged:
            label += f" ({merged} merged)"
        handles.append(Patch(facecolor=scale_colour(scale), alpha=FILL_ALPHA, label=label))
    if (n_source > 1).any():
        # Drawn as they are: a pale fill, outlined in the scale's own colour (grey stands for any).
        handles.append(
            Patch(
                facecolor=(0.5, 0.5, 0.5, MERGED_FILL_ALPHA),
                edgecolor="grey",
                linewidth=0.8,
                label="merged: box of its members",
            )
        )
    hidden = int((n_source == 0).sum())
    if hidden:
        handles.append(Line2D([], [], linestyle="none", label=f"{hidden} filler/newline tokens not drawn"))
    handles.append(Line2D([], [], linestyle="none", label=f"kept {len(tokens)} / dense {tokens.dense}"))
    return handles


def render_explanation(explanation: Explanation) -> ExplanationFigure:
    """Draw `explanation` (see the module docstring) as a PNG; its size depends only on the view,
    the title and the legend (a view shorter than the legend leaves room below it)."""
    view_h, view_w = explanation.view.shape[:2]
    width = view_w + LEGEND_WIDTH
    chars = max(24, int(width / (FONT_SIZE * DPI / 72 * 0.6)))
    lines = _title_lines(explanation, chars)
    title_h = TITLE_LINE_HEIGHT * len(lines) + TITLE_PADDING
    handles = _legend_handles(explanation)
    body_h = max(view_h, LEGEND_LINE_HEIGHT * (len(handles) + 1) + TITLE_PADDING)  # + 1: the legend's title
    height = body_h + title_h

    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    # The view unresampled at the top-left below the title (figimage offsets count from the bottom).
    figure.figimage(explanation.view, xo=0, yo=body_h - view_h, origin="upper", zorder=0)
    ax = figure.add_axes((0, (body_h - view_h) / height, view_w / width, view_h / height), frameon=False, zorder=1)
    ax.set_axis_off()
    ax.set_xlim(0, view_w)
    ax.set_ylim(view_h, 0)

    tokens = explanation.tokens
    boxes = explanation.view_boxes()
    scales = tokens.scale.cpu().numpy()
    n_source = tokens.n_source.cpu().numpy()
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    # Coarse scales first, large boxes before small ones within a scale, so fine detail stays on top.
    for i in sorted(explanation.drawn.tolist(), key=lambda k: (scales[k], -areas[k])):
        x0, y0, x1, y1 = boxes[i]
        if x1 <= x0 or y1 <= y0:
            continue
        colour = scale_colour(int(scales[i]))
        merged = n_source[i] > 1
        alpha = MERGED_FILL_ALPHA if merged else FILL_ALPHA
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=colour, alpha=alpha, linewidth=0))
        if merged:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="none", edgecolor=colour, linewidth=0.8))

    top = 1 - TITLE_PADDING / 2 / height
    figure.text(6 / width, top, "\n".join(lines), fontsize=FONT_SIZE, va="top", ha="left", linespacing=LINE_SPACING)
    figure.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=((view_w + 6) / width, body_h / height),
        fontsize=FONT_SIZE - 1,
        frameon=False,
        title="visual tokens by scale",
        title_fontsize=FONT_SIZE,
        alignment="left",
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    # figimage's yo counts from the bottom: the view spans rows [title_h, title_h + view_h) of the PNG.
    return ExplanationFigure(png=buffer.getvalue(), size=(width, height), view_origin=(0, title_h))


def write_png(png: bytes, out: str, storage: StorageConfig | None = None) -> None:
    """Write PNG bytes to a local path or an object-store URI (local parent folders are made)."""
    fs = (storage or StorageConfig()).filesystem(out)
    if uri_protocol(out) is None and os.path.dirname(out):
        fs.makedirs(os.path.dirname(out), exist_ok=True)
    with fs.open(out, "wb") as handle:
        handle.write(png)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def figure_path(out: str, image: int) -> str:
    """Where image `image` (from 1) of a question goes: `out` itself for the first, `out` with '-k'
    before its suffix for the k-th."""
    if image == 1:
        return out
    stem, suffix = os.path.splitext(out)
    return f"{stem}-{image}{suffix}"


def run_explain(config: ExplainConfig) -> list[tuple[Explanation, ExplanationFigure]]:
    """Open the scenes, load the model, explain the question, write a PNG per image; return them.

    The scenes are opened first: one that cannot be read fails before the model loads.
    """
    uris = [config.scene, *config.extra_scenes]
    with ExitStack() as stack:
        sources = [
            stack.enter_context(open_scene(uri, storage=config.storage, normalize=config.normalize)) for uri in uris
        ]
        model, _ = load_model(
            config.model or default_model(), storage=config.storage, dtype=config.precision.value,
            device=_device(config.device),
        )  # fmt: skip
        explanations = explain_images(
            model,
            sources,
            config.question,
            config.pruning,
            choices=config.choices,
            scenes=[redact(uri) for uri in uris],
            view_side=config.view_side,
            answer=config.answer,
            max_new_tokens=config.max_new_tokens,
        )
    drawn = []
    for explanation in explanations:
        figure = render_explanation(explanation)
        write_png(figure.png, figure_path(config.out, explanation.image), config.storage)
        drawn.append((explanation, figure))
    return drawn


def describe(explanations: Sequence[Explanation], out: str) -> str:
    """The lines `jobs.explain` prints: per image the tokens kept and where its figure went
    (`figure_path(out, image)`), then the answer."""
    lines = []
    for explanation in explanations:
        tokens = explanation.tokens
        per_scale = ", ".join(f"scale {s}: {n}" for s, n in sorted(tokens.per_scale().items()))
        lines += [
            f"{explanation.place}{explanation.strategy} @ {explanation.budget}: {len(tokens)} of {tokens.dense} visual tokens kept "
            f"({per_scale})",
            f"figure: {redact(figure_path(out, explanation.image))}",
        ]
    answer = explanations[0].answer if explanations else None
    if answer is not None:
        lines.append(f"answer: {answer!r}")
    return "\n".join(lines)
