"""Small files in each benchmark's published layout, with real images: shared by the loader tests and
the evaluation job's tests.

XLRS-Bench lite as `datasets` writes it (Arrow streams under `train/`, or Parquet) with embedded
PNG/JPEG images; LRS-VQA's `LRS_VQA/LRS_VQA_merged.jsonl` with a GeoTIFF and a PNG; MME-RealWorld's
JSON list with PNGs; a synthetic archive's `questions.parquet` with one GeoTIFF scene.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
from PIL import Image
from affine import Affine


def png_bytes(width: int, height: int, value: int) -> bytes:
    """A flat-grey RGB PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(width: int, height: int, value: int) -> bytes:
    """A flat-grey RGB JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_geotiff(path: Path, width: int = 16, height: int = 12) -> None:
    """A georeferenced 3-band uint8 GeoTIFF (0.5 m pixels, UTM 33N) with a ramp of values."""
    path.parent.mkdir(parents=True, exist_ok=True)
    transform = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 4500000.0)  # 0.5 m pixels, UTM 33N
    profile = dict(
        driver="GTiff", width=width, height=height, count=3, dtype="uint8", crs="EPSG:32633", transform=transform
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.arange(3 * height * width, dtype=np.uint8).reshape(3, height, width))


# --- XLRS-Bench lite --------------------------------------------------------------------------

_XLRS_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
XLRS_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),
        ("image", pa.list_(_XLRS_IMAGE)),
        ("question", pa.string()),
        ("multi-choice options", pa.list_(pa.string())),
        ("answer", pa.string()),
        ("category", pa.string()),
        ("l2-category", pa.string()),
    ]
)
OPTIONS = ["(A) 1", "(B) 2", "(C) 3", "(D) 4"]
XLRS_ROWS = [
    {
        "index": 7,
        "image": [{"bytes": png_bytes(12, 8, 10), "path": "P0007.png"}],
        "question": "How many ships are in the harbour?",
        "multi-choice options": OPTIONS,
        "answer": "B",
        "category": "Counting/Overall counting",
        "l2-category": "Counting/Overall counting",
    },
    {
        "index": 8,
        "image": [{"bytes": jpeg_bytes(16, 16, 50), "path": None}],
        "question": "Which land-use types does the image show?",
        "multi-choice options": ["(A) residential", "(B) industrial", "(C) farmland", "(D) forest"],
        "answer": "AC",
        "category": "Land use classification/Overall Land use classification",
        "l2-category": "Land use classification/Overall Land use classification",
    },
    {
        "index": 9,
        "image": [{"bytes": png_bytes(10, 10, 0), "path": "t1.png"}, {"bytes": png_bytes(10, 10, 255), "path": "t2.png"}],
        "question": "How many buildings were built between the two images?",
        "multi-choice options": OPTIONS,
        "answer": "C",
        "category": "Counting/Counting with changing detection",
        "l2-category": "Counting/Counting with changing detection",
    },
]


def write_xlrs_save_to_disk(root: Path, rows: list[dict] = XLRS_ROWS) -> Path:
    """The `datasets.save_to_disk` layout of XLRS-Bench-lite: Arrow IPC streams under `train/`."""
    split = root / "train"
    split.mkdir(parents=True)
    table = pa.Table.from_pylist(rows, schema=XLRS_SCHEMA)
    for k, part in enumerate((table.slice(0, 2), table.slice(2))):
        with pa.OSFile(str(split / f"data-0000{k}-of-00002.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(part, max_chunksize=1)
    (split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00002.arrow"}]}))
    (split / "dataset_info.json").write_text(json.dumps({"features": {}}))
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    return root


def write_xlrs_parquet(path: Path, rows: list[dict] = XLRS_ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=XLRS_SCHEMA), path)
    return path


# --- LRS-VQA ----------------------------------------------------------------------------------

LRS_RECORDS = [
    {
        "question_id": "FAIR_12",
        "image": "LRS_VQA/image/101.tif",
        "category": "object color",
        "text": "What is the color of the ship at the top left?\nAnswer the question using a single word or phrase.",
        "ground_truth": "gray",
        "image_size": [16, 12],
        "hbox": [1, 2, 5, 6],
        "rbox": [1, 2, 5, 2, 5, 6, 1, 6],
        "abs_size": 16,
        "size_bin": "small",
    },
    {
        "question_id": "GLH-Bridge_3",
        "image": "LRS_VQA/image/202.png",
        "category": "count",
        "text": "How many bridges are there?\nAnswer the question using a single word or phrase.",
        "ground_truth": "2",
        "image_size": [16, 12],
    },
    {
        "question_id": "STAR_5",
        "image": "LRS_VQA/image/101.tif",
        "category": "rural or urban",
        "text": "Is this a rural or urban area?\nAnswer the question using a single word or phrase.",
        "ground_truth": "",
        "image_size": [16, 12],
    },
]


def write_lrs_vqa(root: Path, records: list[dict] = LRS_RECORDS) -> Path:
    """`<root>/LRS_VQA/LRS_VQA_merged.jsonl` with images under `<root>/LRS_VQA/image/`."""
    write_geotiff(root / "LRS_VQA" / "image" / "101.tif")
    Image.new("RGB", (16, 12), (9, 9, 9)).save(root / "LRS_VQA" / "image" / "202.png")
    path = root / "LRS_VQA" / "LRS_VQA_merged.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + "\n")
    return path


# --- MME-RealWorld ----------------------------------------------------------------------------

MME_OPTIONS = ["(A) Red", "(B) Yellow", "(C) Gray", "(D) White", "(E) The image does not feature the roof."]
MME_RECORDS = [
    {
        "Question_id": "perception/remote_sensing/color/0001",
        "Question Type": "Multiple Choice",
        "Image": "remote_sensing/03553_Toronto.png",
        "Text": "What color is the roof of the square building in the upper left?",
        "Answer choices": MME_OPTIONS,
        "Ground truth": "D",
        "Task": "Perception",
        "Subtask": "Remote Sensing",
        "Category": "color",
        "Dataset": "dota_v2",
    },
    {
        "Question_id": "perception/remote_sensing/count/0002",
        "Question Type": "Multiple Choice",
        "Image": "remote_sensing/00001.png",
        "Text": "How many planes are on the apron?",
        "Answer choices": ["(A) 3", "(B) 4", "(C) 5", "(D) 6", "(E) None of the above"],
        "Ground truth": "A",
        "Task": "Perception",
        "Subtask": "Remote Sensing",
        "Category": "Count",
        "Dataset": "dota_v2",
    },
    {
        "Question_id": "perception/monitoring/Vehicle/counting/0310",
        "Image": "monitoring_images/9999998_00382_d_0000334.jpg",
        "Text": "What is the number of buses in the image?",
        "Answer choices": ["(A) 13", "(B) 90", "(C) 77", "(D) 6", "(E) The image does not feature the buses"],
        "Ground truth": "E",
        "Task": "Perception",
        "Subtask": "Monitoring",
        "Category": "Vehicle/counting",
    },
]


def write_mme(root: Path, records: list[dict] = MME_RECORDS) -> Path:
    (root / "remote_sensing").mkdir(parents=True)
    for name in ("03553_Toronto.png", "00001.png"):
        Image.new("RGB", (20, 10), (200, 200, 200)).save(root / "remote_sensing" / name)
    path = root / "MME_RealWorld.json"
    path.write_text(json.dumps(records, indent=1))
    return path


# --- synthetic --------------------------------------------------------------------------------

SYNTH_ROWS = [
    {
        "question_id": "s0000-q00",
        "scene": "scenes/scene_0000.tif",
        "question": "How many ships are inside the box [10, 20, 300, 400]?",
        "choices": ["(A) 2", "(B) 3", "(C) 4", "(D) 5"],
        "answer": "C",
        "answer_text": "4",
        "category": "regional counting",
        "bbox": [10.0, 20.0, 300.0, 400.0],
        "object_size_px": None,
        "small": False,
        "form": "mc",
        "seed": 3,
    },
    {
        "question_id": "s0000-q01",
        "scene": "scenes/scene_0000.tif",
        "question": "What colour is the car inside the box [50, 60, 70, 80]?",
        "choices": [],
        "answer": "red",
        "answer_text": "red",
        "category": "object colour",
        "bbox": [50.0, 60.0, 70.0, 80.0],
        "object_size_px": 14.0,
        "small": True,
        "form": "open",
        "seed": 3,
    },
]


def write_synthetic(root: Path, rows: list[dict] = SYNTH_ROWS) -> Path:
    write_geotiff(root / "scenes" / "scene_0000.tif")
    pq.write_table(pa.Table.from_pylist(rows), root / "questions.parquet")
    return root
