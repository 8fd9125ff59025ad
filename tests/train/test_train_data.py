"""Manifests -> prepared samples on a real local Ray: views, labels, bad rows skipped and counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from uhr.config import ConfigError
from uhr.model import IGNORE_INDEX, load_model, load_model_config, tokenize_conversation
from uhr.model.pruning import build_strategy
from uhr.model.pruning.config import PruningConfig
from uhr.pipeline.vqa import resolve_pruning
from uhr.scenes import Box, NormalizeConfig, WindowSource, open_scene
from uhr.storage import StorageConfig
from uhr.train import FinetuneConfig
from uhr.train.data import (
    PreparedSource,
    SkipLedger,
    build_training_dataset,
    collate,
    default_image_root,
    image_uri,
    load_tokenizer,
    prepare_sample,
    question_text,
)
from uhr.train.loop import select_tokens

from .conftest import SIGNATURE

STORAGE = StorageConfig()
NORMALIZE = NormalizeConfig()


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """A local Ray for this module, started after the S3 server so its workers reach it."""
    ray.init(address="local", num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def _prepare(manifest: str, model_dir: Path, strategy: str = "uhr-bat", storage: StorageConfig = STORAGE, **kwargs):
    model_config = load_model_config(str(model_dir))
    pruning = resolve_pruning(PruningConfig(strategy=strategy), model_config)
    ledger = SkipLedger.remote()
    dataset = build_training_dataset(
        manifest,
        kwargs.pop("image_root", default_image_root(manifest)),
        tokenizer=load_tokenizer(str(model_dir), storage),
        model_config=model_config,
        pruning=pruning,
        max_length=kwargs.pop("max_length", 512),
        storage=storage,
        normalize=NORMALIZE,
        ledger=ledger,
    )
    rows = sorted(dataset.take_all(), key=lambda row: row["id"])
    return rows, ray.get(ledger.summary.remote(examples=100)), pruning, model_config


def test_samples_carry_the_strategy_views_and_answer_only_labels(ray_local, model_dir, train_archive):
    rows, skipped, pruning, model_config = _prepare(train_archive.train_jsonl, model_dir)
    records = {r["id"]: r for r in map(json.loads, Path(train_archive.train_jsonl).read_text().splitlines())}
    _, tokenizer = load_model(str(model_dir))

    assert skipped["count"] == 0 and sorted(row["id"] for row in rows) == sorted(records)
    strategy = build_strategy(pruning)
    for row in rows:
        record = records[row["id"]]
        expected = tokenize_conversation(tokenizer, record["conversations"], 512)
        assert row["input_ids"] == expected["input_ids"].tolist() and row["labels"] == expected["labels"].tolist()
        answer = tokenizer(record["conversations"][1]["value"], add_special_tokens=False)["input_ids"]
        labelled = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert labelled[: len(answer)] == answer and len(labelled) == len(answer) + 2  # + <|im_end|>\n
        assert row["question"] == record["conversations"][0]["value"].replace("<image>", "").strip()
        assert row["bbox"] == record.get("bbox")  # the whole image: the scene's own frame
        with open_scene(row["image"]) as scene:
            sides = strategy.views(model_config, scene.width, scene.height)
            assert (row["width"], row["height"]) == (scene.width, scene.height)
            assert row["window"] == [0, 0, scene.width, scene.height]
            assert [max(shape[:2]) for shape in row["view_shapes"]] == sides
            for data, shape, side in zip(row["views"], row["view_shapes"], sides):
                np.testing.assert_array_equal(np.frombuffer(data, np.uint8).reshape(shape), scene.read_view(side))


@pytest.fixture(scope="module")
def windowed_manifest(train_archive, tmp_path_factory) -> tuple[str, dict[str, Box]]:
    """Two records of the archive again, each on a window of its image (one touching the bottom-right corner).

    The first names evidence straddling its window's left edge, the second none.
    """
    records = [json.loads(line) for line in Path(train_archive.train_jsonl).read_text().splitlines()][:2]
    with open_scene(str(Path(train_archive.root) / records[1]["image"])) as scene:
        corner = Box(scene.width - 70, scene.height - 40, 70, 40)
    boxes = {"w0": Box(10, 20, 96, 64), "w1": corner}
    evidence = {"w0": [0, 30, 40, 50.5], "w1": None}
    path = tmp_path_factory.mktemp("windowed") / "train.jsonl"
    lines = [
        json.dumps(
            {
                **record,
                "id": key,
                "image": str(Path(train_archive.root) / record["image"]),
                "window": list(vars(box).values()),
                "bbox": evidence[key],
            }
        )
        for key, record, box in zip(boxes, records, boxes.values())
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path), boxes


@pytest.mark.parametrize("strategy", ["uhr-bat", "c2f"])
def test_a_record_with_a_window_trains_on_that_region_as_a_scene(ray_local, model_dir, windowed_manifest, strategy):
    """The views are the window's, and the worker's source selects what the window itself would give."""
    manifest, boxes = windowed_manifest
    rows, skipped, pruning, model_config = _prepare(manifest, model_dir, strategy=strategy)
    model, _ = load_model(str(model_dir))
    selector = build_strategy(pruning)
    assert skipped["count"] == 0 and [row["id"] for row in rows] == list(boxes)
    for row in rows:
        box = boxes[row["id"]]
        assert row["window"] == [box.col_off, box.row_off, box.width, box.height]
        assert (row["width"], row["height"]) == (box.width, box.height)
        # In the window's pixels, clipped to it
        assert row["bbox"] == {"w0": [0.0, 10.0, 30.0, 30.5], "w1": None}[row["id"]]
        with open_scene(row["image"]) as scene, torch.no_grad():
            window = WindowSource(scene, box)
            sides = selector.views(model_config, box.width, box.height)
            assert [max(shape[:2]) for shape in row["view_shapes"]] == sides
            for data, shape, side in zip(row["views"], row["view_shapes"], sides):
                np.testing.assert_array_equal(np.frombuffer(data, np.uint8).reshape(shape), window.read_view(side))
            direct = selector.select(model, selector.encode(model, window), row["question"])
            with PreparedSource(row, STORAGE, NORMALIZE) as source:
                prepared = selector.select(model, selector.encode(model, source), row["question"])
        torch.testing.assert_close(prepared.embeds, direct.embeds)
        assert torch.equal(prepared.scale, direct.scale) and torch.equal(prepared.n_source, direct.n_source)


def test_a_multi_image_record_prepares_and_trains_every_image(ray_local, model_dir, train_archive, tmp_path):
    """An image pair (one `<image>` per image, in order) beside single-image records: each image's
    views are its own (a window applies to both), the worker selects each image's tokens as the
    image itself gives them, and the loss reaches both; a pair with a placeholder or an image
    missing is skipped, naming which."""
    records = [json.loads(line) for line in Path(train_archive.train_jsonl).read_text().splitlines()]
    first, second = records[0]["image"], records[4]["image"]
    assert first != second
    answer = {"from": "gpt", "value": "two new ships"}
    pair = [{"from": "human", "value": "<image> <image>\nWhat changed in the harbour?"}, answer]
    rows_in = [
        records[1],
        {"id": "pair", "image": [first, second], "conversations": pair},
        {"id": "pair-window", "image": [first, second], "conversations": pair, "window": [16, 32, 128, 96], "bbox": [20, 40, 30, 50]},
        {"id": "pair-one-placeholder", "image": [first, second], "conversations": [{"from": "human", "value": "<image>\nWhat changed?"}, answer]},
        {"id": "pair-missing", "image": [first, "scenes/does_not_exist.tif"], "conversations": pair},
        {"id": "pair-not-paths", "image": [first, 3], "conversations": pair},
    ]
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in rows_in) + "\n")
    rows, skipped, pruning, model_config = _prepare(str(manifest), model_dir, image_root=train_archive.root)

    assert [row["id"] for row in rows] == ["pair", "pair-window", records[1]["id"]]
    assert skipped["by_kind"] == {"conversation": 1, "image": 1, "fields": 1}
    reasons = dict(skipped["examples"])
    assert "2 (one per image)" in reasons["pair-one-placeholder"] and "image 2 of 2" in reasons["pair-missing"]
    single, pair_row, windowed = rows[2], rows[0], rows[1]
    assert single["extra_images"] == []
    selector = build_strategy(pruning)
    model, _ = load_model(str(model_dir))
    for row, box in ((pair_row, None), (windowed, Box(16, 32, 128, 96))):
        assert len(row["extra_images"]) == 1 and row["question"] == "What changed in the harbour?"
        images = [row, row["extra_images"][0]]
        assert [Path(image["image"]).name for image in images] == [Path(first).name, Path(second).name]
        for image in images:
            with open_scene(image["image"]) as scene:
                source = scene if box is None else WindowSource(scene, box)
                expected_window = [0, 0, scene.width, scene.height] if box is None else list(vars(box).values())
                assert image["window"] == expected_window and (image["width"], image["height"]) == (source.width, source.height)
                sides = selector.views(model_config, source.width, source.height)
                for data, shape, side in zip(image["views"], image["view_shapes"], sides, strict=True):
                    np.testing.assert_array_equal(np.frombuffer(data, np.uint8).reshape(shape), source.read_view(side))
                with torch.no_grad():
                    direct = selector.select(model, selector.encode(model, source), row["question"])
            with PreparedSource(image, STORAGE, NORMALIZE) as prepared_source, torch.no_grad():
                prepared = selector.select(model, selector.encode(model, prepared_source), row["question"])
            torch.testing.assert_close(prepared.embeds, direct.embeds)
    assert windowed["bbox"] == [4.0, 8.0, 14.0, 18.0]  # in the (first) window's pixels

    model.train()
    visual = select_tokens(model, selector, pair_row, FinetuneConfig(pruning=pruning))
    assert len(visual) == 2
    loss = model(**collate([pair_row], model.tokenizer.pad_token_id), visual=[visual]).loss
    loss.backward()
    assert torch.isfinite(loss) and float(model.multi_modal_projector.linear_1.weight.grad.abs().sum()) > 0


def test_bad_rows_are_skipped_counted_and_named(ray_local, model_dir, manifest_with_bad_rows):
    manifest, good, kinds = manifest_with_bad_rows
    rows, skipped, _, _ = _prepare(str(manifest), model_dir)

    assert len(rows) == good
    assert skipped["count"] == sum(kinds.values()) and skipped["by_kind"] == kinds
    reasons = dict(skipped["examples"])
    assert "bad-speaker" in reasons and "robot" in reasons["bad-speaker"]
    assert "[0, 0, 64]" in reasons["window-not-a-box"] and "positive size" in reasons["window-of-no-size"]
    assert "is not inside the" in reasons["window-past-the-image"]
    assert SIGNATURE not in repr(skipped) and any("X-Amz-Signature=***" in key for key in reasons)


def test_a_bbox_that_is_not_finite_is_skipped_as_a_bad_bbox(model_dir, train_archive, caplog):
    """NaN and Infinity (what json.dumps writes, json.loads reads back) are no pixel coordinates."""
    good = json.loads(Path(train_archive.train_jsonl).read_text().splitlines()[0])
    model_config = load_model_config(str(model_dir))
    settings = dict(
        tokenizer=load_tokenizer(str(model_dir), STORAGE),
        model_config=model_config,
        pruning=resolve_pruning(PruningConfig(strategy="uhr-bat"), model_config),
        image_root=train_archive.root,
        max_length=512,
        storage=STORAGE,
        normalize=NORMALIZE,
    )
    assert len(prepare_sample({"record": json.dumps(good)}, **settings)) == 1
    for key, bbox in (("bbox-nan", [float("nan"), 0, 5, 5]), ("bbox-inf", [0, 0, float("inf"), 5])):
        caplog.clear()
        assert prepare_sample({"record": json.dumps({**good, "id": key, "bbox": bbox})}, **settings) == []
        assert f"skipping sample {key}: bbox: must be [x0, y0, x1, y1]" in caplog.text


def test_a_json_list_manifest_reads_like_jsonl_and_a_non_list_is_counted(ray_local, model_dir, train_archive, tmp_path):
    records = [json.loads(line) for line in Path(train_archive.train_jsonl).read_text().splitlines()]
    as_list = tmp_path / "train.json"
    as_list.write_text(json.dumps(records))
    rows, skipped, _, _ = _prepare(str(as_list), model_dir, image_root=train_archive.root)
    jsonl_rows, _, _, _ = _prepare(train_archive.train_jsonl, model_dir)
    assert skipped["count"] == 0
    assert [(r["id"], r["input_ids"], r["views"]) for r in rows] == [(r["id"], r["input_ids"], r["views"]) for r in jsonl_rows]

    not_a_list = tmp_path / "object.json"
    not_a_list.write_text(json.dumps({"data": records}))
    rows, skipped, _, _ = _prepare(str(not_a_list), model_dir, image_root=train_archive.root)
    assert rows == [] and skipped["count"] == 1 and skipped["by_kind"] == {"manifest": 1}


def test_a_too_short_length_limit_skips_rather_than_trains_on_no_answer(ray_local, model_dir, train_archive):
    rows, skipped, _, _ = _prepare(train_archive.train_jsonl, model_dir, max_length=24)
    assert rows == [] and skipped["count"] == 12 and skipped["by_kind"] == {"conversation": 12}


def test_manifest_and_images_from_object_storage(ray_local, s3_server, model_dir, train_archive):
    bucket = s3_server.new_bucket("train-data")
    root = Path(train_archive.root)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3_server.client.upload_file(str(path), bucket, f"archive/{path.relative_to(root)}")
    for path in sorted(model_dir.iterdir()):
        s3_server.client.upload_file(str(path), bucket, f"model/{path.name}")
    storage = s3_server.storage()
    model_uri = f"s3://{bucket}/model"
    assert load_tokenizer(model_uri, storage).get_vocab() == load_tokenizer(str(model_dir), storage).get_vocab()

    remote, skipped, _, _ = _prepare(f"s3://{bucket}/archive/train.jsonl", model_dir, storage=storage)
    local, _, _, _ = _prepare(train_archive.train_jsonl, model_dir)
    assert skipped["count"] == 0
    assert [r["image"] for r in remote] == [f"s3://{bucket}/archive/{Path(r['image']).relative_to(root)}" for r in local]
    assert [(r["input_ids"], r["views"]) for r in remote] == [(r["input_ids"], r["views"]) for r in local]


def test_missing_or_unknown_manifests_are_config_errors(ray_local, model_dir, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        _prepare(str(tmp_path / "absent.jsonl"), model_dir)
    (tmp_path / "train.csv").write_text("id,image\n")
    with pytest.raises(ConfigError, match=r"\.json .* or \.jsonl"):
        _prepare(str(tmp_path / "train.csv"), model_dir)


@pytest.mark.parametrize("strategy", ["uhr-bat", "c2f", "geollava"])
def test_prepared_source_gives_the_strategy_what_the_scene_gives(ray_local, model_dir, train_archive, strategy):
    """The worker's source (prefetched views, other reads from the scene) selects the same tokens."""
    rows, _, pruning, _ = _prepare(train_archive.train_jsonl, model_dir, strategy=strategy)
    model, _ = load_model(str(model_dir))
    selector = build_strategy(pruning)
    row = rows[0]
    with torch.no_grad():
        with PreparedSource(row, STORAGE, NORMALIZE) as source:
            prepared = selector.select(model, selector.encode(model, source), row["question"])
        with open_scene(row["image"]) as scene:
            direct = selector.select(model, selector.encode(model, scene), row["question"])
    torch.testing.assert_close(prepared.embeds, direct.embeds)
    assert torch.equal(prepared.scale, direct.scale) and torch.equal(prepared.n_source, direct.n_source)


def test_collate_pads_right_and_masks_padding():
    samples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}]
    batch = collate(samples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="empty"):
        collate([], 0)


def test_image_paths_and_questions():
    assert image_uri("scenes/a.tif", "s3://b/archive") == "s3://b/archive/scenes/a.tif"
    assert image_uri("scenes/a.tif", "/data/archive") == "/data/archive/scenes/a.tif"
    assert image_uri("s3://other/a.tif", "/data") == "s3://other/a.tif"
    assert image_uri("/abs/a.tif", "s3://b") == "/abs/a.tif"
    # Object-store keys are literal: a relative path is normalised before it is joined.
    assert image_uri("./scenes/../scenes/a.tif", "s3://b/archive") == "s3://b/archive/scenes/a.tif"
    assert default_image_root("s3://b/x/train.jsonl") == "s3://b/x"
    turns = [{"from": "human", "value": "<image>\nHow many ships?"}, {"from": "gpt", "value": "3"}]
    assert question_text(turns, "<image>") == "How many ships?"
