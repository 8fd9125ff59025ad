"""Whole archives: files, tables, training conversations, the command line, S3, bounded memory."""

from __future__ import annotations

import hashlib
import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.windows import Window

from uhr.synth import SceneTruth, cached_archive, generate_questions, plan_scene, scene_seed, write_archive
from uhr.synth.archive import CAPTION_PROMPT, GENERATOR_VERSION, QUESTIONS_SCHEMA, _training_records, window_around
from uhr.synth.objects import PALETTE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_archive(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("train")
    return root, write_archive(str(root), scenes=2, size=512, seed=4, split="train", questions_per_scene=8)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_archive_holds_scenes_tables_and_truth(train_archive) -> None:
    root, index = train_archive
    assert index.n_scenes == 2 and index.n_questions == 16
    assert index.scenes == [str(root / "scenes" / f"scene_{k:04d}.tif") for k in range(2)]
    table = pq.read_table(index.questions_parquet)
    assert table.schema.equals(QUESTIONS_SCHEMA)
    rows = table.to_pylist()
    assert rows == read_jsonl(Path(index.questions_jsonl))
    assert len({row["question_id"] for row in rows}) == len(rows) == 16
    truth = json.loads(Path(index.truth_json).read_text())
    assert truth["split"] == "train" and set(truth["scenes"]) == {"scenes/scene_0000.tif", "scenes/scene_0001.tif"}
    for row in rows:
        # Scene paths are relative to the archive root and name a real COG whose seed the row carries.
        scene_truth = SceneTruth.from_dict(truth["scenes"][row["scene"]])
        assert row["seed"] == scene_truth.seed
        with rasterio.open(root / row["scene"]) as src:
            assert (src.width, src.height) == scene_truth.size
    assert {truth["scenes"][s]["seed"] for s in truth["scenes"]} == {scene_seed(4, "train", k) for k in range(2)}
    assert not list(root.glob(".uhr-synth-*"))  # no staging left behind


def test_train_split_writes_llava_conversations(train_archive) -> None:
    root, index = train_archive
    rows = {row["question_id"]: row for row in read_jsonl(Path(index.questions_jsonl))}
    conversations = read_jsonl(Path(index.train_jsonl))
    assert len(conversations) == len(rows)
    for item in conversations:
        row = rows[item["id"]]
        assert item["image"] == row["scene"] and (root / item["image"]).exists()
        human, gpt = item["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        assert human["value"].startswith("<image>\n" + row["question"])
        assert gpt["value"] == row["answer"]
        if row["form"] == "mc":
            assert "The choices are listed below:\n" + "\n".join(row["choices"]) in human["value"]
            assert human["value"].endswith("The answer is:") and gpt["value"] in "ABCD"
        else:
            assert human["value"].endswith("Answer the question using a single word or phrase.")


def test_evidence_windows_add_a_conversation_on_a_window_around_each_evidence(tmp_path, train_archive) -> None:
    _, plain = train_archive
    index = write_archive(
        str(tmp_path), scenes=2, size=512, seed=4, split="train", questions_per_scene=8, evidence_window=96
    )
    rows = {row["question_id"]: row for row in read_jsonl(Path(index.questions_jsonl))}
    records = read_jsonl(Path(index.train_jsonl))
    whole, windowed = [r for r in records if "window" not in r], [r for r in records if "window" in r]
    assert whole == read_jsonl(Path(plain.train_jsonl))
    assert sorted(r["id"] for r in windowed) == sorted(f"{q}@window" for q, row in rows.items() if row["bbox"])
    assert windowed, "the archive asked nothing with evidence"
    for before, record in zip(records, records[1:]):  # each window record follows its question's record
        assert "window" not in before or "window" not in record
        if "window" in record:
            assert before["id"] + "@window" == record["id"]
    for record in records:  # the evidence box rides along, in scene pixels, for the grounding loss
        assert record.get("bbox") == rows[record["id"].removesuffix("@window")]["bbox"]
    boxes = re.compile(r"\[(\d+), (\d+), (\d+), (\d+)\]")
    for record in windowed:
        row = rows[record["id"].removesuffix("@window")]
        col, line, width, height = record["window"]
        x0, y0, x1, y1 = row["bbox"]
        assert width == height >= 96 and 0 <= col and 0 <= line and col + width <= 512 and line + height <= 512
        assert col <= x0 and line <= y0 and x1 <= col + width and y1 <= line + height
        # The same conversation, a region it names rewritten in the window's frame and held whole by it.
        (asked, answer), (scene_asked, scene_answer) = record["conversations"], next(
            r for r in whole if r["id"] == row["question_id"]
        )["conversations"]
        assert answer == scene_answer and boxes.sub("", asked["value"]) == boxes.sub("", scene_asked["value"])
        for shown, named in zip(boxes.findall(asked["value"]), boxes.findall(scene_asked["value"])):
            a0, b0, a1, b1 = map(int, named)
            assert list(map(int, shown)) == [a0 - col, b0 - line, a1 - col, b1 - line]
            assert 0 <= a0 - col and 0 <= b0 - line and a1 - col <= width and b1 - line <= height


def test_object_captions_name_what_a_window_around_each_object_shows(tmp_path, train_archive) -> None:
    _, plain = train_archive
    index = write_archive(
        str(tmp_path), scenes=2, size=512, seed=4, split="train", questions_per_scene=8, object_captions=64
    )
    records = read_jsonl(Path(index.train_jsonl))
    captions = [r for r in records if r["id"].endswith("@caption")]
    assert [r for r in records if not r["id"].endswith("@caption")] == read_jsonl(Path(plain.train_jsonl))
    truth = json.loads(Path(index.truth_json).read_text())["scenes"]
    # One per object, each after its scene's questions.
    assert [r["id"] for r in captions] == [
        f"{Path(scene).stem}_obj{obj['id']:03d}@caption" for scene in sorted(truth) for obj in truth[scene]["objects"]
    ]
    assert len(captions) > 4
    first_of_second = next(k for k, r in enumerate(records) if r["image"] == "scenes/scene_0001.tif")
    assert records[first_of_second - 1]["id"].startswith("scene_0000_obj")
    for record in captions:
        scene = SceneTruth.from_dict(truth[record["image"]])
        obj = next(o for o in scene.objects if record["id"] == f"{Path(record['image']).stem}_obj{o.id:03d}@caption")
        col, row, side, _ = record["window"]
        assert record["window"] == window_around(list(obj.bbox), 512, 64) and side >= 64
        human, gpt = record["conversations"]
        assert human == {"from": "human", "value": "<image>\n" + CAPTION_PROMPT} and "bbox" not in record
        named = gpt["value"].split(", ")
        inside = [o for o in scene.objects
                  if o.bbox[0] >= col and o.bbox[1] >= row and o.bbox[2] <= col + side and o.bbox[3] <= row + side]
        assert f"{obj.colour} {obj.cls.value}" in named
        assert named == [f"{o.colour} {o.cls.value}" for o in sorted(inside, key=lambda o: (o.centre[1], o.centre[0]))]
        # Every colour the caption names is painted in the window's pixels.
        with rasterio.open(tmp_path / record["image"]) as src:
            pixels = src.read(window=Window(col, row, side, side)).transpose(1, 2, 0)
        for colour in {o.colour for o in inside}:
            assert (pixels == PALETTE[colour]).all(axis=-1).any(), (record["id"], colour)


def test_object_captions_of_a_one_band_scene_name_classes_only(tmp_path) -> None:
    index = write_archive(
        str(tmp_path), scenes=1, size=512, seed=4, split="train", bands=1, questions_per_scene=4, object_captions=64
    )
    captions = [r["conversations"][1]["value"] for r in read_jsonl(Path(index.train_jsonl)) if r["id"].endswith("@caption")]
    classes = {"ship", "car", "plane", "storage tank"}
    assert captions and all(set(caption.split(", ")) <= classes for caption in captions)


def test_a_window_around_evidence_is_square_inside_the_scene_and_centred_where_it_can_be() -> None:
    assert window_around([100, 100, 120, 110], 512, 64) == [78, 73, 64, 64]
    assert window_around([100, 100, 300, 150], 512, 64) == [75, 0, 250, 250]
    assert window_around([0, 490, 10, 512], 512, 64) == [0, 448, 64, 64]
    assert window_around([0, 0, 500, 510], 512, 64) == [0, 0, 512, 512]


def test_test_split_has_no_conversations_and_other_scenes(tmp_path, train_archive) -> None:
    _, train = train_archive
    index = write_archive(str(tmp_path), scenes=1, size=512, seed=4, split="test", questions_per_scene=4)
    assert index.train_jsonl is None and not (tmp_path / "train.jsonl").exists()
    assert scene_seed(4, "test", 0) != scene_seed(4, "train", 0)
    with rasterio.open(index.scenes[0]) as test_scene, rasterio.open(train.scenes[0]) as train_scene:
        assert not np.array_equal(test_scene.read(), train_scene.read())


def test_small_object_questions_can_be_asked_on_their_windows_only(tmp_path, train_archive) -> None:
    _, plain = train_archive
    index = write_archive(
        str(tmp_path), scenes=2, size=512, seed=4, split="train", questions_per_scene=8, evidence_window=96,
        small_on_whole_scene=False,
    )  # fmt: skip
    rows = {row["question_id"]: row for row in read_jsonl(Path(index.questions_jsonl))}
    assert {row["small"] for row in rows.values()} == {True, False}, "the archive needs both kinds of question"
    records = read_jsonl(Path(index.train_jsonl))
    whole, windowed = [r for r in records if "window" not in r], [r for r in records if "window" in r]
    # The same questions and scenes as without the option; only the small ones' whole-scene records go.
    assert whole == [r for r in read_jsonl(Path(plain.train_jsonl)) if not rows[r["id"]]["small"]]
    assert sorted(r["id"] for r in windowed) == sorted(f"{q}@window" for q, row in rows.items() if row["bbox"])


def test_archive_arguments_are_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="split"):
        write_archive(str(tmp_path), scenes=1, size=256, seed=0, split="val")
    with pytest.raises(ValueError, match="scenes"):
        write_archive(str(tmp_path), scenes=0, size=256, seed=0)
    with pytest.raises(ValueError, match="evidence_window needs split 'train'"):
        write_archive(str(tmp_path), scenes=1, size=256, seed=0, split="test", evidence_window=64)
    with pytest.raises(ValueError, match="object_captions needs split 'train' and a side >= 1, got 0"):
        write_archive(str(tmp_path), scenes=1, size=256, seed=0, split="train", object_captions=0)
    with pytest.raises(ValueError, match="small_on_whole_scene=False needs split 'train', got 'test'"):
        write_archive(str(tmp_path), scenes=1, size=256, seed=0, split="test", small_on_whole_scene=False)


def test_command_line_writes_an_archive_and_reports_it(tmp_path) -> None:
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "uhr.synth", "--out", str(out), "--scenes", "1", "--size", "384", "--seed", "9",
               "--split", "train", "--dtype", "uint16", "--bands", "4", "--questions", "5", "--object-captions", "64",
               "--evidence-window", "64", "--no-small-on-whole-scene"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["n_scenes"] == 1 and report["n_questions"] == 5 and report["train_jsonl"] == str(out / "train.jsonl")
    with rasterio.open(out / "scenes" / "scene_0000.tif") as src:
        assert (src.count, src.dtypes[0]) == (4, "uint16")
    objects = json.loads((out / "truth.json").read_text())["scenes"]["scenes/scene_0000.tif"]["objects"]
    records = read_jsonl(out / "train.jsonl")
    assert sum(r["id"].endswith("@caption") for r in records) == len(objects)
    small = {row["question_id"] for row in read_jsonl(out / "questions.jsonl") if row["small"]}
    assert not small & {r["id"] for r in records}  # asked on their windows only
    refused = subprocess.run([*command[:9], "--seed", "-3"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert refused.returncode == 2 and "seed must be a non-negative integer" in refused.stderr


def test_archive_is_written_to_s3(s3_server) -> None:
    bucket = s3_server.new_bucket("synth")
    storage = s3_server.storage()
    root = f"s3://{bucket}/archives/test"
    index = write_archive(root, scenes=1, size=512, seed=2, storage=storage, questions_per_scene=4)
    listing = s3_server.client.list_objects_v2(Bucket=bucket, Prefix="archives/test/")
    keys = sorted(item["Key"] for item in listing["Contents"])
    assert keys == [f"archives/test/{name}" for name in
                    ("questions.jsonl", "questions.parquet", "scenes/scene_0000.tif", "truth.json")]
    assert index.scenes == [f"{root}/scenes/scene_0000.tif"]
    # The scene is a COG that GDAL reads in place; the table reads through s3fs.
    with rasterio.Env(**storage.gdal_env()), rasterio.open(f"/vsis3/{bucket}/archives/test/scenes/scene_0000.tif") as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and src.overviews(1) == [2]
        overview = src.read(out_shape=(3, 256, 256))
    assert overview.std() > 0
    filesystem = storage.filesystem(root)
    with filesystem.open(index.questions_parquet, "rb") as handle:
        assert pq.read_table(handle).num_rows == index.n_questions == 4


def peak_growth_mb(out: Path, size: int) -> float:
    """Peak RSS above the post-import baseline of a fresh process writing one `size`^2 scene.

    The peak is the kernel's VmHWM of the process's own memory map: `ru_maxrss` would carry
    over the RSS of the (large) pytest process that forked it.
    """
    script = textwrap.dedent(
        f"""
        import psutil
        from uhr.synth import write_scene
        base = psutil.Process().memory_info().rss
        write_scene({str(out)!r}, {size}, 1)
        with open("/proc/self/status") as status:
            peak_kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        print((peak_kb * 1024 - base) / 2**20)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stderr
    return float(result.stdout)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for the peak RSS")
def test_memory_stays_bounded_while_writing(tmp_path) -> None:
    # 4096^2 RGB is 48 MiB as uint8 and 192 MiB as float32: neither may be held whole.
    assert peak_growth_mb(tmp_path / "scene.tif", 4096) < 100


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for the peak RSS")
def test_memory_stays_bounded_for_a_16k_scene(tmp_path) -> None:
    # 16384^2 RGB is 768 MiB as uint8; the writer keeps to the same bound as for 4096^2.
    assert peak_growth_mb(tmp_path / "scene.tif", 16384) < 100
    with rasterio.open(tmp_path / "scene.tif") as src:
        assert src.overviews(1) == [2, 4, 8, 16, 32, 64]
    assert os.path.getsize(tmp_path / "scene.tif") > 0


def test_cached_archive_is_written_once_and_then_read_from_its_index(tmp_path):
    root = tmp_path / "cached"
    first = cached_archive(root, scenes=1, size=256, seed=3, questions_per_scene=2)
    written = {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}
    again = cached_archive(root, scenes=1, size=256, seed=3, questions_per_scene=2)
    assert again == first and first.n_scenes == 1 and first.n_questions == 2
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()} == written
    # Written by another generator version (or before versions were recorded): written again.
    index = root / "index.json"
    index.write_text(json.dumps(first.to_dict()))
    (root / "stale.txt").write_text("from an older generator")
    third = cached_archive(root, scenes=1, size=256, seed=3, questions_per_scene=2)
    assert third == first and not (root / "stale.txt").exists()
    assert json.loads(index.read_text())["generator"] == GENERATOR_VERSION
    # Other settings on the same root: the archive they ask for, not the cached one.
    other = cached_archive(root, scenes=2, size=256, seed=3, questions_per_scene=2)
    assert other.n_scenes == 2


# What generator GENERATOR_VERSION writes for a few planned scenes (questions and training records):
# a change to it must come with a new version, or cached archives (the sample, the demo's splits)
# keep what the old generator wrote.
GENERATED_DIGEST = {7: "0a94c933d5ec84589953de8fa8cd920877937489d9967a8c6d9dc517cb68dbed"}


def test_a_change_to_what_the_generator_writes_comes_with_a_new_version() -> None:
    digest = hashlib.sha256()
    for seed in range(3):
        truth = plan_scene(1024, seed)
        for referents, order in (("region", "shuffled"), ("scene", "fixed")):
            asked = generate_questions(truth, f"scenes/s{seed}.tif", 12, open_fraction=0.3, referents=referents, option_order=order)
            records = _training_records(asked, truth, f"scenes/s{seed}.tif", 1024, 64, 64, True)
            digest.update(json.dumps([q.to_row() for q in asked] + records, sort_keys=True).encode())
    assert GENERATED_DIGEST == {GENERATOR_VERSION: digest.hexdigest()}, (
        "what the generator writes changed: bump GENERATOR_VERSION and record the new digest here"
    )
