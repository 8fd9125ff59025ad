"""Loaders on small files in each benchmark's published layout (written by `benchmark_layouts`, real images)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from PIL import Image

from benchmark_layouts import (
    LRS_RECORDS,
    MME_OPTIONS,
    MME_RECORDS,
    OPTIONS,
    SYNTH_ROWS,
    XLRS_ROWS,
    XLRS_SCHEMA,
    write_lrs_vqa,
    write_mme,
    write_synthetic,
    write_xlrs_parquet,
    write_xlrs_save_to_disk,
)
from uhr.eval.benchmarks import (
    ITEM_SCHEMA,
    Benchmark,
    BenchmarkFormatError,
    BenchmarkSpec,
    MmePromptStyle,
    load_benchmark,
    load_lrs_vqa,
    load_mme_realworld_rs,
    load_synthetic,
    load_xlrs_lite,
    lrs_vqa_subset,
)
from uhr.storage import StorageConfig
from uhr.synth.archive import write_archive


def _content_name(data: bytes, suffix: str) -> str:
    return hashlib.sha256(data).hexdigest()[:24] + suffix


def test_xlrs_from_save_to_disk_folder(tmp_path: Path) -> None:
    items = load_xlrs_lite(str(write_xlrs_save_to_disk(tmp_path / "XLRS-Bench-lite")), image_dir=str(tmp_path / "img"))
    assert items.schema == ITEM_SCHEMA
    rows = items.to_pylist()
    assert [r["question_id"] for r in rows] == ["7", "8", "9"]
    assert {r["source"] for r in rows} == {"xlrs-lite"}
    assert {r["form"] for r in rows} == {"mc"}

    single, multi_answer, multi_image = rows
    # Images are written out in their published bytes, named by them, with the format's suffix.
    assert single["images"] == [str(tmp_path / "img" / _content_name(XLRS_ROWS[0]["image"][0]["bytes"], ".png"))]
    assert Path(single["images"][0]).read_bytes() == XLRS_ROWS[0]["image"][0]["bytes"]
    assert multi_answer["images"] == [str(tmp_path / "img" / _content_name(XLRS_ROWS[1]["image"][0]["bytes"], ".jpg"))]
    assert Image.open(multi_answer["images"][0]).size == (16, 16)
    # Multi-image items keep every image; the pipeline reads images[0].
    assert multi_image["images"] == [
        str(tmp_path / "img" / _content_name(image["bytes"], ".png")) for image in XLRS_ROWS[2]["image"]
    ]
    assert np.asarray(Image.open(multi_image["images"][1]))[0, 0, 0] == 255
    assert [json.loads(r["meta"])["n_images"] for r in rows] == [1, 1, 2]
    assert json.loads(single["meta"])["l2-category"] == "Counting/Overall counting"

    assert single["answer"] == "B" and multi_answer["answer"] == "AC"
    assert single["choices"] == OPTIONS
    assert single["prompt"] == (
        "How many ships are in the harbour?The choices are listed below:\n(A) 1\n(B) 2\n(C) 3\n(D) 4\n"
        "\nSelect the best answer for the multiple-choice question based on the image. Only respond with the "
        "letter corresponding to the correct answer (A, B, C, D).\nThe answer is:"
    )
    assert multi_answer["prompt"].endswith(
        "(D) forest\n\nSelect the best answer(s) for the multiple-choice question based on the image. There may "
        "be more than one correct option. Only respond with the letter(s) corresponding to the correct answer(s) "
        "(A, B, C, D), with multiple choices separated by spaces.The answer(s) is(are):"
    )


def test_xlrs_from_parquet_matches_arrow_and_reuses_written_images(tmp_path: Path) -> None:
    from_arrow = load_xlrs_lite(str(write_xlrs_save_to_disk(tmp_path / "arrow")), image_dir=str(tmp_path / "img"))
    image = Path(from_arrow.column("images")[0][0].as_py())
    stamp = image.stat().st_mtime_ns
    parquet = write_xlrs_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    from_parquet = load_xlrs_lite(str(tmp_path / "hub"), image_dir=str(tmp_path / "img"))
    assert from_parquet.equals(from_arrow)
    assert image.stat().st_mtime_ns == stamp  # already there with the same size: not rewritten
    assert load_xlrs_lite(str(parquet), image_dir=str(tmp_path / "img")).equals(from_arrow)


def test_xlrs_rewrites_a_truncated_image_left_by_an_interrupted_extraction(tmp_path: Path) -> None:
    data = XLRS_ROWS[0]["image"][0]["bytes"]
    image = tmp_path / "img" / _content_name(data, ".png")
    image.parent.mkdir()
    image.write_bytes(data[: len(data) // 2])  # the right name, half the bytes
    parquet = write_xlrs_parquet(tmp_path / "xlrs.parquet", [XLRS_ROWS[0]])
    items = load_xlrs_lite(str(parquet), image_dir=str(tmp_path / "img"))
    assert items.column("images").to_pylist() == [[str(image)]]
    assert image.read_bytes() == data


def test_xlrs_images_stored_as_paths_resolve_against_the_data_folder(tmp_path: Path) -> None:
    row = dict(XLRS_ROWS[0], image=[{"bytes": None, "path": "images/P0007.png"}])
    parquet = write_xlrs_parquet(tmp_path / "xlrs.parquet", [row])
    items = load_xlrs_lite(str(parquet), image_dir=str(tmp_path / "img"))
    assert items.column("images").to_pylist() == [[str(tmp_path / "images" / "P0007.png")]]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"category": "Counting/Ship counting"}, "unknown XLRS-Bench category 'Counting/Ship counting'"),
        ({"multi-choice options": ["A) 1", "(B) 2"]}, "should start with '\\(A\\)'"),
        ({"image": []}, "'image' must be a non-empty list"),
        ({"image": [{"bytes": None, "path": None}]}, "image 0 has neither bytes nor a path"),
        ({"image": [{"bytes": b"GIF89a....", "path": None}]}, "not PNG, JPEG, TIFF or WebP"),
    ],
)
def test_xlrs_rejects_bad_items_naming_the_item(tmp_path: Path, change: dict, message: str) -> None:
    parquet = write_xlrs_parquet(tmp_path / "xlrs.parquet", [dict(XLRS_ROWS[0], **change)])
    with pytest.raises(BenchmarkFormatError, match=f"item 7: .*{message}"):
        load_xlrs_lite(str(parquet), image_dir=str(tmp_path / "img"))


def test_xlrs_rejects_missing_columns_and_duplicate_ids(tmp_path: Path) -> None:
    table = pa.Table.from_pylist(XLRS_ROWS, schema=XLRS_SCHEMA).drop_columns(["l2-category"])
    pq.write_table(table, tmp_path / "no-l2.parquet")
    with pytest.raises(BenchmarkFormatError, match="missing column\\(s\\) 'l2-category'"):
        load_xlrs_lite(str(tmp_path / "no-l2.parquet"), image_dir=str(tmp_path / "img"))
    as_paths = table.append_column("l2-category", pa.array(["x"] * 3)).set_column(
        1, "image", pa.array([["a.png"], ["b.png"], ["c.png"]])
    )
    pq.write_table(as_paths, tmp_path / "strings.parquet")
    with pytest.raises(BenchmarkFormatError, match="column 'image' must be a list of \\{bytes, path\\} images"):
        load_xlrs_lite(str(tmp_path / "strings.parquet"), image_dir=str(tmp_path / "img"))
    duplicated = write_xlrs_parquet(tmp_path / "dup.parquet", [XLRS_ROWS[0], XLRS_ROWS[0]])
    with pytest.raises(BenchmarkFormatError, match="duplicate question ids \\['7'\\]"):
        load_xlrs_lite(str(duplicated), image_dir=str(tmp_path / "img"))
    with pytest.raises(FileNotFoundError, match="XLRS-Bench data not found"):
        load_xlrs_lite(str(tmp_path / "nowhere"), image_dir=str(tmp_path / "img"))


def test_lrs_vqa_published_layout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items = load_lrs_vqa(str(write_lrs_vqa(tmp_path)))
    assert items.schema == ITEM_SCHEMA
    rows = items.to_pylist()
    # The item without a ground truth is skipped, as LRS-VQA's scorer does, and said so.
    assert [r["question_id"] for r in rows] == ["FAIR_12", "GLH-Bridge_3"]
    assert "skipped 1 item(s) without ground_truth or category" in caplog.text
    color, count = rows
    assert color["images"] == [str(tmp_path / "LRS_VQA" / "image" / "101.tif")]
    with rasterio.open(color["images"][0]) as src:
        assert (src.width, src.height) == (16, 12)
    assert color["prompt"] == LRS_RECORDS[0]["text"] + "\n"
    assert color["question"] == LRS_RECORDS[0]["text"]
    assert (color["form"], color["choices"], color["answer"]) == ("open", [], "gray")
    assert (color["subset"], count["subset"]) == ("FAIR", "GLH-Bridge")
    assert color["bbox"] == [1.0, 2.0, 5.0, 6.0] and count["bbox"] is None
    assert json.loads(color["meta"]) == {
        "image_size": [16, 12], "rbox": [1, 2, 5, 2, 5, 6, 1, 6], "abs_size": 16, "size_bin": "small"
    }


@pytest.mark.parametrize("category", ["", None])
def test_lrs_vqa_skips_items_without_a_category(tmp_path: Path, caplog: pytest.LogCaptureFixture, category) -> None:
    records = [LRS_RECORDS[0], dict(LRS_RECORDS[1], category=category)]
    items = load_lrs_vqa(str(write_lrs_vqa(tmp_path, records)))
    assert items.column("question_id").to_pylist() == ["FAIR_12"]
    assert "skipped 1 item(s) without ground_truth or category" in caplog.text


def test_lrs_vqa_refuses_an_id_given_twice(tmp_path: Path) -> None:
    # Caught at load, naming the file: two answers to one id could not be told apart in the report.
    path = write_lrs_vqa(tmp_path, [LRS_RECORDS[0], dict(LRS_RECORDS[1], question_id=LRS_RECORDS[0]["question_id"])])
    with pytest.raises(BenchmarkFormatError, match=rf"{re.escape(str(path))}: duplicate question ids"):
        load_lrs_vqa(str(path))


def test_lrs_vqa_subset_is_the_id_before_the_first_underscore(tmp_path: Path) -> None:
    assert lrs_vqa_subset("DOTA_v2_123") == "DOTA"
    assert lrs_vqa_subset("GLH-Bridge_3") == "GLH-Bridge"
    items = load_lrs_vqa(str(write_lrs_vqa(tmp_path, [dict(LRS_RECORDS[0], question_id="DOTA_v2_123")])))
    assert items.column("subset").to_pylist() == ["DOTA"]


def test_lrs_vqa_image_root_and_bad_lines(tmp_path: Path) -> None:
    path = write_lrs_vqa(tmp_path)
    items = load_lrs_vqa(str(path), image_root="s3://bucket/lrs")
    assert items.column("images")[0].as_py() == ["s3://bucket/lrs/LRS_VQA/image/101.tif"]
    path.write_text(json.dumps(LRS_RECORDS[0]) + "\n{not json\n")
    with pytest.raises(BenchmarkFormatError, match="LRS_VQA_merged.jsonl line 2: not JSON"):
        load_lrs_vqa(str(path))
    path.write_text(json.dumps({k: v for k, v in LRS_RECORDS[0].items() if k != "text"}) + "\n")
    with pytest.raises(BenchmarkFormatError, match="line 1: missing field\\(s\\) 'text'"):
        load_lrs_vqa(str(path))
    path.write_text(json.dumps(dict(LRS_RECORDS[0], ground_truth=2)) + "\n")
    with pytest.raises(BenchmarkFormatError, match="'ground_truth' must be a string, got int 2"):
        load_lrs_vqa(str(path))


def test_mme_realworld_remote_sensing_split(tmp_path: Path) -> None:
    items = load_mme_realworld_rs(str(write_mme(tmp_path)))
    assert items.schema == ITEM_SCHEMA
    rows = items.to_pylist()
    assert [r["question_id"] for r in rows] == [
        "perception/remote_sensing/color/0001", "perception/remote_sensing/count/0002"
    ]
    color, count = rows
    assert color["images"] == [str(tmp_path / "remote_sensing" / "03553_Toronto.png")]
    assert Path(color["images"][0]).is_file()
    assert (color["category"], count["category"]) == ("color", "count")  # lower-cased, as scored
    assert (color["answer"], color["choices"], color["form"]) == ("D", MME_OPTIONS, "mc")
    assert color["prompt"] == (
        "What color is the roof of the square building in the upper left? The choices are listed below: \n\n"
        "(A) Red\n(B) Yellow\n(C) Gray\n(D) White\n(E) The image does not feature the roof.\n"
        "Select the best answer to the above multiple-choice question based on the image. "
        "Respond with only the letter (A, B, C, D, or E) of the correct option."
    )
    assert json.loads(color["meta"])["Dataset"] == "dota_v2"


def test_mme_realworld_official_prompt(tmp_path: Path) -> None:
    items = load_mme_realworld_rs(str(write_mme(tmp_path)), prompt_style=MmePromptStyle.OFFICIAL)
    assert items.column("prompt")[0].as_py() == (
        "What color is the roof of the square building in the upper left? The choices are listed below: \n"
        "(A) Red\n(B) Yellow\n(C) Gray\n(D) White\n(E) The image does not feature the roof.\n"
        "Select the best answer to the above multiple-choice question based on the image. "
        "Respond with only the letter (A, B, C, D, or E) of the correct option.\nThe best answer is:"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"Ground truth": "AB"}, "'Ground truth' must be one option letter, got 'AB'"),
        ({"Ground truth": "F"}, "'Ground truth' must be one option letter"),
        ({"Answer choices": "(A) Red"}, "'Answer choices' must be a non-empty list"),
        # A letter the item's own options do not reach, and more options than letters.
        ({"Answer choices": ["(A) Red", "(B) Blue"], "Ground truth": "D"}, "'Ground truth' must be one option letter, got 'D'"),
        ({"Answer choices": [*MME_OPTIONS[:5], "(F) Grey"]}, "'Answer choices' has 6 options, at most 5 allowed"),
    ],
)
def test_mme_realworld_rejects_bad_items(tmp_path: Path, change: dict, message: str) -> None:
    path = write_mme(tmp_path, [dict(MME_RECORDS[0], **change)])
    with pytest.raises(BenchmarkFormatError, match=f"item 0: {message}"):
        load_mme_realworld_rs(str(path))


def test_mme_realworld_without_remote_sensing_items(tmp_path: Path) -> None:
    with pytest.raises(BenchmarkFormatError, match="no questions with Subtask == 'Remote Sensing'"):
        load_mme_realworld_rs(str(write_mme(tmp_path, MME_RECORDS[2:])))


def test_synthetic_archive(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "archive")
    items = load_synthetic(str(root))
    assert items.equals(load_synthetic(str(root / "questions.parquet")))
    mc, open_ = items.to_pylist()
    assert mc["images"] == [str(root / "scenes" / "scene_0000.tif")] and Path(mc["images"][0]).is_file()
    assert mc["prompt"] == (
        "How many ships are inside the box [10, 20, 300, 400]?The choices are listed below:\n"
        "(A) 2\n(B) 3\n(C) 4\n(D) 5\n"
        "\nSelect the best answer for the multiple-choice question based on the image. Only respond with the "
        "letter corresponding to the correct answer (A, B, C, D).\nThe answer is:"
    )
    assert open_["prompt"] == (
        "What colour is the car inside the box [50, 60, 70, 80]?\nAnswer the question using a single word or phrase."
    )
    assert (mc["form"], open_["form"], open_["choices"]) == ("mc", "open", [])
    # No object behind the question: its size, and so small/large, is unknown.
    assert (mc["small"], open_["small"], open_["object_size_px"]) == (None, True, 14.0)
    assert open_["bbox"] == [50.0, 60.0, 70.0, 80.0]
    assert json.loads(mc["meta"]) == {"answer_text": "4", "seed": 3}


def test_synthetic_archive_written_by_uhr_synth(tmp_path: Path) -> None:
    index = write_archive(str(tmp_path / "archive"), scenes=1, size=512, seed=5, split="train", questions_per_scene=8)
    items = load_synthetic(index.root)
    assert items.num_rows == index.n_questions
    questions = pq.read_table(index.questions_parquet).to_pylist()
    for item, question in zip(items.to_pylist(), questions, strict=True):
        assert item["question_id"] == question["question_id"]
        assert item["images"] == [str(tmp_path / "archive" / question["scene"])]
        assert Path(item["images"][0]).is_file()
        for name in ("answer", "form", "category"):
            assert item[name] == question[name]
        assert item["small"] == (None if question["object_size_px"] is None else question["small"])
    # The model is evaluated on exactly the prompts it was trained on.
    conversations = [json.loads(line) for line in Path(index.train_jsonl).read_text().splitlines()]
    prompts = dict(zip(items.column("question_id").to_pylist(), items.column("prompt").to_pylist(), strict=True))
    assert {c["id"]: c["conversations"][0]["value"] for c in conversations} == {
        qid: "<image>\n" + prompt for qid, prompt in prompts.items()
    }


def test_synthetic_rejects_unknown_form(tmp_path: Path) -> None:
    root = write_synthetic(tmp_path, [dict(SYNTH_ROWS[0], form="yes-no")])
    with pytest.raises(BenchmarkFormatError, match="question s0000-q00: 'form' must be 'mc' or 'open'"):
        load_synthetic(str(root))


def test_load_benchmark_dispatches_on_the_spec(tmp_path: Path) -> None:
    spec = BenchmarkSpec(name="lrs-vqa", uri=str(write_lrs_vqa(tmp_path / "lrs")))
    assert spec.name is Benchmark.LRS_VQA
    assert load_benchmark(spec).equals(load_lrs_vqa(spec.uri))
    mme = BenchmarkSpec(name="mme-realworld-rs", uri=str(write_mme(tmp_path / "mme")), mme_prompt="official")
    assert load_benchmark(mme).column("prompt")[0].as_py().endswith("\nThe best answer is:")
    with pytest.raises(ValueError, match="name"):
        BenchmarkSpec(name="vqav2", uri="x")


# --- object storage ---------------------------------------------------------------------------


def test_benchmarks_in_object_storage(s3_server, tmp_path: Path) -> None:
    storage: StorageConfig = s3_server.storage()
    bucket = s3_server.new_bucket("bench")
    fs = storage.filesystem(f"s3://{bucket}")

    lrs = write_lrs_vqa(tmp_path / "lrs")
    fs.put(str(tmp_path / "lrs" / "LRS_VQA"), f"s3://{bucket}/lrs/LRS_VQA", recursive=True)
    items = load_lrs_vqa(f"s3://{bucket}/lrs/LRS_VQA/{lrs.name}", storage=storage)
    assert items.column("images")[0].as_py() == [f"s3://{bucket}/lrs/LRS_VQA/image/101.tif"]
    assert fs.exists(items.column("images")[0].as_py()[0])

    # XLRS read from the store, its images written back to the store.
    write_xlrs_save_to_disk(tmp_path / "xlrs")
    fs.put(str(tmp_path / "xlrs"), f"s3://{bucket}/xlrs", recursive=True)
    items = load_xlrs_lite(f"s3://{bucket}/xlrs", image_dir=f"s3://{bucket}/xlrs-images", storage=storage)
    assert items.column("question_id").to_pylist() == ["7", "8", "9"]
    first = items.column("images")[0].as_py()[0]
    assert first == f"s3://{bucket}/xlrs-images/{_content_name(XLRS_ROWS[0]['image'][0]['bytes'], '.png')}"
    assert fs.cat(first) == XLRS_ROWS[0]["image"][0]["bytes"]
