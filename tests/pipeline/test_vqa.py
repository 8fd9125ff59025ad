"""The VQA job end to end on a local Ray: S3 in, GeoParquet out, every strategy, bad inputs as rows."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import shapely
import torch
import transformers.configuration_utils

import uhr.pipeline.vqa

from jobs.vqa import main
from uhr.cli import run_main
from uhr.model import build_tiny_model, load_model, load_model_config, save_model
from uhr.model.pruning import build_strategy
from uhr.pipeline import MANIFEST_NAME, OUTPUT_SCHEMA, VqaConfig, run_vqa
from uhr.pipeline.plan import InputError, question_id
from uhr.pipeline.vqa import _check_resumable, answer_settings, resolve_pruning
from uhr.scenes import open_scene
from uhr.synth import write_scene

from .helpers import config, read_manifest, read_rows, scored_by_hand


@pytest.mark.parametrize("strategy", ["none", "downsample", "geollava", "uhr-bat", "c2f"])
def test_every_strategy_from_object_storage_to_geoparquet(ray_local, s3_server, s3_archive, model_dir, strategy):
    storage = s3_server.storage()
    output = f"{s3_archive}-answers/{strategy}"
    summary = run_vqa(
        config(
            questions=f"{s3_archive}/questions.parquet",
            scenes=s3_archive,
            output=output,
            model=str(model_dir),
            overrides={"pruning.strategy": strategy, "max_new_tokens": 4},
        )
    )
    questions = pq.read_table(storage.filesystem(s3_archive).open(f"{s3_archive}/questions.parquet", "rb"))
    rows = read_rows(output, storage)

    assert summary.status == "completed" and summary.rows == questions.num_rows == rows.num_rows
    assert sorted(rows["question_id"].to_pylist()) == sorted(questions["question_id"].to_pylist())
    assert rows.schema.remove_metadata() == OUTPUT_SCHEMA
    assert rows["error"].null_count == rows.num_rows, rows["error"].to_pylist()
    budget = rows["budget"][0].as_py()
    for row in rows.to_pylist():
        assert row["strategy"] == strategy and row["model"] == str(model_dir)
        assert row["answer"] is not None
        assert (row["choice"] is not None) == bool(row["choices"])
        assert 0 < row["tokens_kept"] <= budget and row["tokens_kept"] <= row["tokens_dense"]
        assert sum(row["tokens_per_scale"]) == row["tokens_kept"]
        if row["bbox"] is None:
            assert row["evidence_tokens"] is None and row["evidence_px"] is None
        else:
            assert 0 <= row["evidence_tokens"] <= row["tokens_kept"]
            assert (row["evidence_px"] is None) == (row["evidence_tokens"] == 0)
        assert row["bytes_read"] > 0 and row["read_ms"] > 0 and row["encode_ms"] > 0 and row["answer_ms"] > 0
        footprint = shapely.from_wkb(row["footprint"])
        assert footprint.is_valid and -180 <= footprint.bounds[0] <= footprint.bounds[2] <= 180
    assert any(row["evidence_tokens"] for row in rows.to_pylist())  # the archive's questions name evidence
    # GeoParquet: the footprint column is declared, so GeoPandas / DuckDB / QGIS read it as geometry.
    geo = json.loads(rows.schema.metadata[b"geo"])
    assert geo["primary_column"] == "footprint" and geo["columns"]["footprint"]["encoding"] == "WKB"
    if strategy != "c2f":
        # One read per scene, shared by its questions: their bytes add up to no more than the objects.
        # (c2f reads windows per question, in CPU tasks that each open the object: more on tiny scenes.)
        scenes = storage.filesystem(s3_archive).find(f"{s3_archive}/scenes", detail=True)
        assert sum(rows["bytes_read"].to_pylist()) <= sum(info["size"] for info in scenes.values()) * 1.05
    # The summary scores the multiple-choice rows against the questions' `answer` column (same letter set).
    scored, correct = scored_by_hand(rows, questions)
    assert scored and (summary.scored, summary.correct) == (scored, correct)
    assert f"({summary.correct}/{summary.scored} multiple-choice" in summary.format()
    manifest = read_manifest(output, storage)
    assert manifest["status"] == "complete" and manifest["counts"] == {"questions": rows.num_rows, "rows": rows.num_rows, "runs": 1}
    assert manifest["config"]["pruning"]["strategy"] == strategy and manifest["versions"]["ray"].startswith("2.60")


def test_ask_every_scene_with_stable_ids_and_resume_skips_done(ray_local, archive, model_dir, tmp_path):
    asks = ["How many ships are in the harbour?", "Is there a bridge?"]
    run = config(scenes=str(Path(archive.root) / "scenes"), ask=asks, output=str(tmp_path / "out"), model=str(model_dir),
                 overrides={"max_new_tokens": 2})
    first = run_vqa(run)
    rows = read_rows(str(tmp_path / "out"))
    expected = {question_id(scene, text) for scene in archive.scenes for text in asks}
    assert first.rows == len(expected) == rows.num_rows
    assert set(rows["question_id"].to_pylist()) == expected and set(rows["scene"].to_pylist()) == set(archive.scenes)
    assert first.scored == 0 and "accuracy" not in first.format()  # --ask questions have no reference
    # The same command again finds everything done: no new rows, one more run in the manifest.
    second = run_vqa(run)
    assert (second.rows, second.skipped) == (0, len(expected))
    assert read_rows(str(tmp_path / "out")).num_rows == len(expected)
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["counts"]["runs"] == 2 and manifest["status"] == "complete"
    # Other answer settings on the same output would mix two kinds of answers: refused before any work.
    with pytest.raises(InputError, match=r"other settings \(max_new_tokens changed\).*--overwrite"):
        run_vqa(run.model_copy(update={"max_new_tokens": 3}))
    assert read_manifest(str(tmp_path / "out"))["counts"]["runs"] == 2
    # So would a retrained model of the same architecture; a copy of the same checkpoint is the same model.
    retrained, _ = load_model(model_dir)
    with torch.no_grad():
        retrained.language_model.lm_head.weight[3, 5] += 1.0
    save_model(retrained, tmp_path / "retrained")
    with pytest.raises(InputError, match=r"other settings \(model_weights changed\)"):
        run_vqa(run.model_copy(update={"model": str(tmp_path / "retrained")}))
    shutil.copytree(model_dir, tmp_path / "copied")
    assert run_vqa(run.model_copy(update={"model": str(tmp_path / "copied")})).skipped == len(expected)
    assert read_manifest(str(tmp_path / "out"))["counts"]["runs"] == 3
    # An output made before the weights were recorded is not held to them (nothing to compare with).
    manifest_path = tmp_path / "out" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest["answer_settings"]["model_weights"]
    manifest_path.write_text(json.dumps(manifest))
    assert run_vqa(run.model_copy(update={"model": str(tmp_path / "retrained")})).skipped == len(expected)
    # --overwrite starts afresh.
    third = run_vqa(run.model_copy(update={"overwrite": True}))
    assert third.rows == len(expected) and read_manifest(str(tmp_path / "out"))["counts"]["runs"] == 1


def test_settings_read_back_from_a_manifest_match_an_unchanged_rerun(monkeypatch):
    model, _ = build_tiny_model(seed=0)
    config = VqaConfig(normalize={"nodata": "nan"})  # float scenes' nodata: NaN never equals itself
    recorded = json.loads(json.dumps(answer_settings(config, model.config, "weights")))  # as _run.json holds them
    # transformers stamps its own version into every config dump; an upgrade changes no answer setting.
    monkeypatch.setattr(transformers.configuration_utils, "__version__", "99.0.0")
    assert model.config.to_dict()["transformers_version"] == "99.0.0"
    _check_resumable("out", recorded, answer_settings(config, model.config, "weights"))
    # Each setting that decides an answer refuses the resume, naming itself.
    for changed, other in [
        ("normalize", VqaConfig(normalize={"nodata": 0})),
        ("pruning", VqaConfig(normalize={"nodata": "nan"}, pruning={"budget": 512})),
        ("pruning", VqaConfig(normalize={"nodata": "nan"}, pruning={"strategy": "c2f"})),
        ("precision", VqaConfig(normalize={"nodata": "nan"}, precision="bfloat16")),
        ("max_new_tokens", VqaConfig(normalize={"nodata": "nan"}, max_new_tokens=8)),
    ]:
        with pytest.raises(InputError, match=rf"\({changed} changed\)"):
            _check_resumable("out", recorded, answer_settings(other, model.config, "weights"))
    with pytest.raises(InputError, match=r"\(model_weights changed\)"):
        _check_resumable("out", recorded, answer_settings(config, model.config, "retrained"))


def zero_width_tiff(path: Path) -> Path:
    """A TIFF whose header declares an image 0 pixels wide (GDAL cannot write one)."""
    entries = [(256, 4, 1, 0), (257, 4, 1, 16), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, 16), (279, 4, 1, 0)]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    path.write_bytes(b"II" + struct.pack("<HI", 42, 8) + ifd)
    return path


def test_bad_scenes_become_error_rows_and_odd_layouts_are_answered(ray_local, model_dir, tmp_path):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_scene(str(scenes / "pan_uint16.tif"), 256, seed=1, dtype="uint16", bands=1)
    write_scene(str(scenes / "rgbn.tif"), (320, 200), seed=2, bands=4)
    good = write_scene(str(tmp_path / "whole.tif"), 512, seed=3)
    assert good.objects is not None
    whole = (tmp_path / "whole.tif").read_bytes()
    (scenes / "truncated.tif").write_bytes(whole[: len(whole) // 3])
    (scenes / "notes.tif").write_text("this is not a raster\n" * 50)
    (scenes / "empty.tif").write_bytes(b"")
    zero_width_tiff(scenes / "zero_width.tif")
    expected_errors = {
        "truncated.tif": "corrupt or truncated",
        "notes.tif": "not a raster",
        "empty.tif": "empty object",
        "zero_width.tif": "zero scanline size",
        "missing.tif": "no such file",
    }
    names = ["pan_uint16.tif", "rgbn.tif", *expected_errors]
    questions = pa.table(
        {
            "question_id": [f"q{i}" for i in range(len(names))],
            "scene": names,
            "question": ["What is in the image?"] * len(names),
            "choices": [json.dumps(["(A) water", "(B) forest"])] * len(names),
        }
    )
    pacsv.write_csv(questions, tmp_path / "questions.csv")
    summary = run_vqa(
        config(questions=str(tmp_path / "questions.csv"), scenes=str(scenes), output=str(tmp_path / "out"),
               model=str(model_dir), overrides={"max_new_tokens": 2})
    )
    rows = {row["scene"].rsplit("/", 1)[-1]: row for row in read_rows(str(tmp_path / "out")).to_pylist()}
    assert summary.status == "completed" and len(rows) == len(names) == summary.rows
    assert (summary.answered, summary.errors) == (2, len(expected_errors))
    for name in ("pan_uint16.tif", "rgbn.tif"):
        assert rows[name]["error"] is None and rows[name]["answer"] is not None and rows[name]["choices"] == ["(A) water", "(B) forest"]
    for name, reason in expected_errors.items():
        row = rows[name]
        assert row["answer"] is None and row["error"] is not None
        assert name in row["error"] and reason in row["error"], row["error"]


def test_bad_config_or_questions_stop_before_any_work(tmp_path, capsys):
    assert main(["--questions", str(tmp_path / "nowhere.parquet"), "--output", str(tmp_path / "out")]) == 2
    assert f"questions file {tmp_path / 'nowhere.parquet'} does not exist" in capsys.readouterr().err
    (tmp_path / "q.jsonl").write_text('{"question_id": "a", "scene": "s.tif"}\n')
    assert main(["--questions", str(tmp_path / "q.jsonl")]) == 2
    assert "lacks column(s) question" in capsys.readouterr().err
    for box in ("[0, 0, 0, 5]", "[0, 0, 5]", "[0, 0, NaN, 5]"):  # no area, three numbers, not a number
        (tmp_path / "q.jsonl").write_text(f'{{"question_id": "a", "scene": "s.tif", "question": "q", "bbox": {box}}}\n')
        assert main(["--questions", str(tmp_path / "q.jsonl")]) == 2
        assert "row 0: bbox must be [x0, y0, x1, y1]" in capsys.readouterr().err
    assert main(["pruning.budgett=5"]) == 2
    assert "pruning.budgett: Extra inputs are not permitted" in capsys.readouterr().err
    assert main(["pruning.strategy=sparse"]) == 2
    assert "pruning.strategy" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("encode: [1, 2]\n")
    assert main(["--config", str(tmp_path / "bad.yaml")]) == 2
    assert f"invalid VqaConfig in {tmp_path / 'bad.yaml'}: encode" in capsys.readouterr().err
    # Storage or a model that cannot be reached: the message, no traceback.
    assert main(["--scenes", str(tmp_path / "no-archive"), "--ask", "x?", "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: storage error at {tmp_path / 'no-archive'}")
    assert main(["--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot load checkpoint {tmp_path / 'no-model'}")
    assert not (tmp_path / "out").exists()


def test_an_unhandled_error_prints_its_traceback_without_credentials(capsys):
    def failing() -> int:
        try:
            raise FileNotFoundError("https://x/model?X-Amz-Signature=uhr-not-a-real-signature/config.json")
        except FileNotFoundError as error:
            raise RuntimeError("cannot load the model") from error

    assert run_main(failing) == 1
    printed = capsys.readouterr().err
    assert "Traceback" in printed and "RuntimeError: cannot load the model" in printed
    assert "X-Amz-Signature=***" in printed and "uhr-not-a-real-signature" not in printed


def test_split_stages_and_shared_input_blocks_answer_like_fused(ray_local, archive, model_dir, tmp_path, monkeypatch):
    common = {"questions": archive.questions_parquet, "scenes": archive.root, "model": str(model_dir)}
    fused = run_vqa(config(output=str(tmp_path / "fused"), overrides={"max_new_tokens": 3}, **common))
    # The split run also cuts its scene groups into 2 input blocks, as an archive of more groups than
    # MAX_INPUT_BLOCKS is: each read task then reads several scenes.
    monkeypatch.setattr(uhr.pipeline.vqa, "MAX_INPUT_BLOCKS", 2)
    assert archive.n_scenes > 2
    # Two actor pools and the read tasks must fit this 2-CPU Ray together.
    halves = {"encode.num_cpus": 0.5, "answer.num_cpus": 0.5}
    split = run_vqa(config(output=str(tmp_path / "split"), overrides={"max_new_tokens": 3, "fused": False, **halves}, **common))
    assert fused.rows == split.rows > 0
    by_id = lambda table: {r["question_id"]: r for r in table.to_pylist()}  # noqa: E731
    a, b = by_id(read_rows(str(tmp_path / "fused"))), by_id(read_rows(str(tmp_path / "split")))
    for qid, row in a.items():
        assert row["answer"] == b[qid]["answer"] and row["tokens_per_scale"] == b[qid]["tokens_per_scale"]
    assert np.isclose(sum(r["tokens_kept"] for r in a.values()), sum(r["tokens_kept"] for r in b.values()))
    assert fsspec.filesystem("file").exists(str(tmp_path / "split" / MANIFEST_NAME))


@pytest.mark.parametrize("fused", [True, False])
def test_multi_image_questions_are_asked_of_every_image(ray_local, archive, model_dir, tmp_path, fused):
    """A question with extra scenes (a bi-temporal pair) is answered from all its images, in order,
    each pruned as a scene of its own: the rows equal the model's answers given the images directly.

    One encode batch holds pairs of 8-bit scenes and a pair of 16-bit ones (whose extra image carries
    a stretch): their read rows must join into one Arrow batch."""
    first, second = (os.path.join(archive.root, scene) for scene in archive.scenes[:2])
    deep = [str(tmp_path / f"uint16-{i}.tif") for i in range(2)]
    for i, uri in enumerate(deep):
        write_scene(uri, 256, seed=40 + i, dtype="uint16")
    asked = [("pair", first, [second]), ("reversed", second, [first]), ("alone", first, None), ("pair-2", first, [second]),
             ("uint16", deep[0], [deep[1]])]  # fmt: skip
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"question_id": qid, "scene": scene, "question": "How many ships?", "extra_scenes": extra}) + "\n"
                for qid, scene, extra in asked)  # fmt: skip
    )
    overrides = {"max_new_tokens": 6, "pruning.strategy": "uhr-bat", "pruning.budget": 48, "encode.batch_size": 8}
    if not fused:
        overrides.update({"fused": False, "encode.num_cpus": 0.5, "answer.num_cpus": 0.5})
    run = config(questions=str(questions), output=str(tmp_path / "out"), model=str(model_dir), overrides=overrides)
    summary = run_vqa(run)
    rows = {row["question_id"]: row for row in read_rows(str(tmp_path / "out")).to_pylist()}
    assert summary.rows == len(asked) and all(row["error"] is None for row in rows.values())
    assert summary.scenes == 7  # each group reads its images: the pairs both ways, the 16-bit pair, the lone scene

    model, _ = load_model(model_dir)
    strategy = build_strategy(resolve_pruning(run.pruning, load_model_config(model_dir)))
    for qid, scene, extra in asked:
        tokens = []
        for uri in [scene, *(extra or [])]:
            with open_scene(uri) as source, torch.inference_mode():
                tokens.append(strategy.select(model, strategy.encode(model, source), "How many ships?"))
        row = rows[qid]
        assert row["extra_scenes"] == extra and row["scene"] == scene
        assert row["answer"] == model.answer([tokens], ["How many ships?"], max_new_tokens=6)[0], qid
        assert row["tokens_kept"] == sum(len(t) for t in tokens) and row["tokens_dense"] == sum(t.dense for t in tokens)
        assert sum(row["tokens_per_scale"]) == row["tokens_kept"]
    assert rows["pair"]["tokens_kept"] > rows["alone"]["tokens_kept"]
