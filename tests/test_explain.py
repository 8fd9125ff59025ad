"""The explanation figure: kept tokens drawn over the real scene view, nothing drawn elsewhere."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from PIL import Image

from jobs.explain import main
from uhr.config import load_config
from uhr.explain import (
    LEGEND_WIDTH,
    TITLE_LINE_HEIGHT,
    TITLE_PADDING,
    ExplainConfig,
    Explanation,
    explain,
    explain_images,
    render_explanation,
    run_explain,
    _title_lines,
    scale_colour,
)
from uhr.model import load_model
from uhr.model.pruning import PrunedTokens
from uhr.model.pruning.config import PruningConfig
from uhr.pipeline.stages import question_prompt
from uhr.scenes import open_scene

WIDTH, HEIGHT = 320, 240
QUESTION = "How many ships are in the harbour?"


@pytest.fixture(scope="module")
def model(model_dir: Path):
    return load_model(model_dir)[0]


def _grey_scene(path: Path, width: int, height: int, seed: int) -> str:
    """A grey GeoTIFF of 16-px blocks of seeded random levels: no pixel has a tab10 colour."""
    rng = np.random.default_rng(seed)
    levels = rng.integers(30, 226, size=(height // 16, width // 16), dtype=np.uint8)
    grey = np.kron(levels, np.ones((16, 16), np.uint8))
    profile = dict(
        driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs="EPSG:32633",
        transform=Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4500000.0),
    )  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.stack([grey] * 3))
    return str(path)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _grey_scene(tmp_path_factory.mktemp("scene") / "grey.tif", WIDTH, HEIGHT, seed=3)


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _view_region(png: bytes, explanation: Explanation, origin: tuple[int, int]) -> np.ndarray:
    """The PNG's pixels over the view, (h, w, 3) like the view itself."""
    h, w = explanation.view.shape[:2]
    x, y = origin
    return _pixels(png)[y : y + h, x : x + w]


def _subset(explanation: Explanation, keep: np.ndarray) -> Explanation:
    """The same explanation with only the tokens at `keep`."""
    t, index = explanation.tokens, keep.tolist()
    tokens = PrunedTokens(
        embeds=t.embeds[index], scale=t.scale[index], row=t.row[index], col=t.col[index], tile=t.tile[index],
        n_source=t.n_source[index], box=t.box[index], dense=t.dense,
    )  # fmt: skip
    return Explanation(**{**explanation.__dict__, "tokens": tokens})


def _near_any(boxes: np.ndarray, shape: tuple[int, int], margin: int) -> np.ndarray:
    """(h, w) bool: pixels within `margin` of any box (box edges are antialiased and outlined)."""
    mask = np.zeros(shape, bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, int(y0) - margin) : int(np.ceil(y1)) + margin, max(0, int(x0) - margin) : int(np.ceil(x1)) + margin] = True
    return mask


def test_kept_tokens_drawn_over_the_scene_view_and_nothing_else(model, scene) -> None:
    # c2f without its thumbnail keeps a few pooled tokens of one pyramid level: a small, well-defined area.
    pruning = PruningConfig(strategy="c2f", budget=24, c2f={"global_view": False})
    with open_scene(scene) as source:
        explanation = explain(model, source, QUESTION, pruning, scene=scene, view_side=WIDTH, max_new_tokens=2)
        plain = source.read_view(WIDTH)
    tokens = explanation.tokens
    assert 0 < len(tokens) <= 24 and (tokens.n_source == 4).all()  # 2x2-pooled: merged tokens, outlined
    assert explanation.view.shape == (HEIGHT, WIDTH, 3) and np.array_equal(explanation.view, plain)
    assert explanation.answer is not None and explanation.prompt == QUESTION

    figure = render_explanation(explanation)
    image = Image.open(io.BytesIO(figure.png))
    # 3 title lines (question, counts, answer) above the view; the legend panel right of it.
    assert figure.view_origin == (0, TITLE_PADDING + 3 * TITLE_LINE_HEIGHT)
    assert image.size == figure.size == (WIDTH + LEGEND_WIDTH, HEIGHT + figure.view_origin[1])

    drawn = _view_region(figure.png, explanation, figure.view_origin)
    boxes = explanation.view_boxes()
    changed = np.abs(drawn - plain.astype(int)).sum(axis=2)
    for x0, y0, x1, y1 in boxes:
        assert changed[int((y0 + y1) / 2), int((x0 + x1) / 2)] > 0, "a kept token's box is not filled"
        # The outline of a merged token is stronger than its light fill.
        border = changed[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))]
        assert border.max() > changed[int((y0 + y1) / 2), int((x0 + x1) / 2)]
    far = ~_near_any(boxes, plain.shape[:2], margin=3)
    assert far.mean() > 0.5, "the test needs most of the scene away from kept tokens"
    assert (changed[far] == 0).all(), "pixels away from every kept token must show the plain scene"
    # The fill is the token's scale colour: over grey, the colour's dominant channel rises most.
    colour = np.array(Image.new("RGB", (1, 1), scale_colour(int(tokens.scale[0]))).getpixel((0, 0)))
    x0, y0, x1, y1 = boxes[0]
    centre = (int((y0 + y1) / 2), int((x0 + x1) / 2))
    shift = drawn[centre] - plain[centre].astype(int)
    assert np.argmax(shift) == np.argmax(colour - plain[centre].astype(int))


def test_filler_tokens_are_not_drawn(model, scene) -> None:
    # GeoLLaVA-8K's empty cluster slots become zero-feature filler tokens (n_source 0), as released.
    pruning = PruningConfig(strategy="geollava", budget=512, geollava={"max_tokens_per_tile": 40})
    with open_scene(scene) as source:
        explanation = explain(model, source, QUESTION, pruning, view_side=WIDTH, answer=False)
    n_source = explanation.tokens.n_source.numpy()
    fillers, clusters = np.flatnonzero(n_source == 0), np.flatnonzero(n_source >= 1)
    assert fillers.size and clusters.size, "the scene should leave some tiles with fewer clusters than slots"
    assert explanation.answer is None and np.array_equal(explanation.drawn, clusters)

    only_fillers = _subset(explanation, fillers)
    figure = render_explanation(only_fillers)
    assert np.array_equal(_view_region(figure.png, only_fillers, figure.view_origin), explanation.view.astype(int))
    only_clusters = _subset(explanation, clusters)
    figure = render_explanation(only_clusters)
    assert not np.array_equal(_view_region(figure.png, only_clusters, figure.view_origin), explanation.view.astype(int))


def test_job_writes_the_figure(model_dir, scene, tmp_path, capsys) -> None:
    out = tmp_path / "figures" / "ships.png"
    code = main(
        [
            "--scene", scene, "--question", QUESTION, "--strategy", "uhr-bat", "--budget", "32",
            "--model", str(model_dir), "--out", str(out), "max_new_tokens=2", "pruning.uhr_bat.regions=4",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "uhr-bat @ 32:" in printed and str(out) in printed
    image = Image.open(out)
    assert image.format == "PNG" and image.size[0] == WIDTH + LEGEND_WIDTH  # views never exceed the scene
    # The same figure through the library, from the same config.
    config = load_config(
        ExplainConfig, scene=scene, question=QUESTION, model=str(model_dir), out=str(tmp_path / "again.png"),
        overrides=["pruning.strategy=uhr-bat", "pruning.budget=32", "max_new_tokens=2", "pruning.uhr_bat.regions=4"],
    )  # fmt: skip
    [(explanation, figure)] = run_explain(config)
    assert image.size == figure.size and 0 < len(explanation.tokens) <= 32
    assert len(explanation.tokens.per_scale()) > 1  # tokens from several of UHR-BAT's views


def test_a_question_on_two_images_draws_each_with_the_tokens_it_alone_gives(model, model_dir, scene, tmp_path, capsys) -> None:
    """A bi-temporal pair: each image is pruned on its own (as the VQA job does), so its tokens are
    those it gives asked alone; one answer from both; one PNG per image, titled with its place."""
    later = _grey_scene(tmp_path / "later.tif", 256, 192, seed=4)
    out = tmp_path / "pair.png"
    code = main(
        [
            "--scene", scene, "--extra-scene", later, "--question", QUESTION, "--strategy", "uhr-bat", "--budget", "32",
            "--model", str(model_dir), "--out", str(out), "max_new_tokens=2", "pruning.uhr_bat.regions=4",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "image 1 of 2, uhr-bat @ 32:" in printed and "image 2 of 2, uhr-bat @ 32:" in printed
    assert f"figure: {out}" in printed and f"figure: {tmp_path / 'pair-2.png'}" in printed and printed.count("answer:") == 1
    assert Image.open(out).size[0] == WIDTH + LEGEND_WIDTH and Image.open(tmp_path / "pair-2.png").size[0] == 256 + LEGEND_WIDTH

    pruning = PruningConfig(strategy="uhr-bat", budget=32, uhr_bat={"regions": 4})
    with open_scene(scene) as first, open_scene(later) as second:
        pair = explain_images(model, [first, second], QUESTION, pruning, scenes=[scene, later], max_new_tokens=2)
        alone = explain(model, second, QUESTION, pruning, answer=False)
        assert [e.image for e in pair] == [1, 2] and {e.images for e in pair} == {2} and pair[0].answer == pair[1].answer
        torch.testing.assert_close(pair[1].tokens.embeds, alone.tokens.embeds)
        torch.testing.assert_close(pair[1].tokens.box, alone.tokens.box)
        expected = model.answer([[pair[0].tokens, alone.tokens]], [pair[0].prompt], max_new_tokens=2)[0]
    assert pair[0].answer == expected


def test_a_multiple_choice_question_is_asked_and_titled_with_its_options(model, scene) -> None:
    """The prompt is the VQA job's for a row with choices, and the figure's question line shows them,
    so a letter answer can be read against them."""
    choices = ["(A) yes", "(B) no"]
    question = "Is there a ship in the image?"
    pruning = PruningConfig(strategy="downsample", budget=64)
    with open_scene(scene) as source:
        explanation = explain(model, source, question, pruning, choices=choices, answer=False)
    assert explanation.prompt == question_prompt({"question": question, "choices": choices})
    assert explanation.prompt != question and explanation.choices == choices
    assert _title_lines(explanation, 200)[0] == "Q: Is there a ship in the image? (A) yes (B) no"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--scene", "{missing}", "--question", QUESTION], "no such file"),
        (["--scene", "{scene}", "--question", QUESTION, "--strategy", "none", "--budget", "8"], "budget 8 is below"),
        (["--scene", "{scene}", "--question", QUESTION, "--strategy", "zoom"], "pruning.strategy"),
        (["--scene", "{scene}"], "question"),
    ],
)
def test_job_rejects_bad_input_in_one_line(model_dir, scene, tmp_path, capsys, arguments, message) -> None:
    filled = [a.format(scene=scene, missing=tmp_path / "missing.tif") for a in arguments]
    code = main([*filled, "--model", str(model_dir), "--out", str(tmp_path / "x.png")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and message in last
    assert not (tmp_path / "x.png").exists()
