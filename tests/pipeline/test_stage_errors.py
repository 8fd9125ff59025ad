"""Errors inside the encode actor: one line naming the scene and the reason, credentials masked in rows and logs."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pytest

from uhr.model import load_model_config
from uhr.pipeline.stages import AnswerStage, EncodeStage, read_scene
from uhr.pipeline.vqa import resolve_pruning
from uhr.synth import write_scene

from .helpers import FAKE_SECRET as SECRET
from .helpers import config


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_a_failed_window_read_is_one_line_naming_the_scene_and_the_reason(
    ray_local, model_dir, tmp_path, monkeypatch, caplog, fused
):
    uri = str(tmp_path / f"scenes-{SECRET}" / "a.tif")
    Path(uri).parent.mkdir()
    write_scene(uri, 512, seed=1)
    model_config = load_model_config(str(model_dir))
    run = config(model=str(model_dir), overrides={"pruning.strategy": "c2f", "max_new_tokens": 2})
    run = run.model_copy(update={"pruning": resolve_pruning(run.pruning, model_config)})
    questions = [{"question_id": f"q{i}", "question": "Is there a ship?", "choices": None, "bbox": None, "prompt": None} for i in range(2)]
    scene = read_scene({"scene": uri, "questions": questions}, model_config=model_config, pruning=run.pruning,
                       storage=run.storage, normalize=run.normalize)  # fmt: skip
    assert scene["error"] is None
    # Gone after the read stage: c2f's fine windows, read by Ray tasks when a question selects them, fail.
    Path(uri).unlink()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    stage = EncodeStage(run, str(model_dir), "r", fused=fused)
    with caplog.at_level(logging.ERROR, logger="uhr.pipeline.stages"):
        out = pa.concat_tables(list(stage(pa.Table.from_pylist([scene]))))
        if not fused:  # the error rows ride through the answer stage, which answers nothing for them
            out = AnswerStage(run, str(model_dir), "r")(out)
    rows = out.to_pylist()
    assert sorted(row["question_id"] for row in rows) == ["q0", "q1"]  # one row per question, whatever failed
    masked = uri.replace(SECRET, "***")
    for row in rows:
        assert row["answer"] is None
        assert row["error"].startswith(f"question {row['question_id']}: cannot read scene {masked}: "), row["error"]
        assert "no such file" in row["error"].lower() and "\n" not in row["error"] and "\x1b" not in row["error"]
    # The log keeps the traceback, credentials masked as in the rows.
    assert "selecting tokens for question q0" in caplog.text and masked in caplog.text
    assert SECRET not in caplog.text and not any(SECRET in row["error"] for row in rows)


def test_a_multi_image_group_with_an_unreadable_image_is_error_rows_naming_it(ray_local, model_dir, tmp_path):
    before, after = str(tmp_path / "before.tif"), str(tmp_path / "after.tif")
    write_scene(before, 256, seed=1)
    (tmp_path / "after.tif").write_text("not a raster")
    model_config = load_model_config(str(model_dir))
    run = config(model=str(model_dir), overrides={"pruning.strategy": "downsample", "max_new_tokens": 2})
    run = run.model_copy(update={"pruning": resolve_pruning(run.pruning, model_config)})
    questions = [{"question_id": "q", "question": "How many ships arrived?", "choices": None, "bbox": None, "prompt": None}]
    scene = read_scene({"scene": before, "extra_scenes": [after], "questions": questions}, model_config=model_config,
                       pruning=run.pruning, storage=run.storage, normalize=run.normalize)  # fmt: skip
    assert scene["error"].startswith(f"cannot read scene {after}: not a raster format"), scene["error"]
    assert scene["views"] == [] and scene["extra_images"] == []  # nothing rides along to the actors
    stage = EncodeStage(run, str(model_dir), "r", fused=True)
    (row,) = pa.concat_tables(list(stage(pa.Table.from_pylist([scene])))).to_pylist()
    assert row["answer"] is None and row["error"] == scene["error"]
    assert row["scene"] == before and row["extra_scenes"] == [after]
