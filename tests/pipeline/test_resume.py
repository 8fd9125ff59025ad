"""Reruns, interruptions and what the driver hands on: every question ends with one row, none is lost."""

from __future__ import annotations

import _thread
import json
import logging
import re
import shutil
import signal
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from uhr.pipeline import MANIFEST_NAME, run_vqa
from uhr.synth import write_archive

from .helpers import FAKE_SECRET as SECRET
from .helpers import config, read_manifest, read_rows


def test_a_rerun_with_a_fixed_run_id_asks_error_rows_again_and_loses_none(ray_local, model_dir, tmp_path):
    archive = write_archive(str(tmp_path / "archive"), scenes=2, size=256, seed=3, questions_per_scene=3)
    output = str(tmp_path / "out")
    run = config(questions=archive.questions_parquet, scenes=archive.root, output=output, model=str(model_dir),
                 overrides={"max_new_tokens": 2, "run_id": "nightly"})  # fmt: skip
    # A scene not there yet (an upload in progress, a throttled store): its questions become error rows.
    late = Path(archive.scenes[1])
    late.rename(tmp_path / "late.tif")
    first = run_vqa(run)
    assert (first.answered, first.errors) == (3, 3)
    answered_first = {r["question_id"]: r["answer"] for r in read_rows(output).to_pylist() if r["error"] is None}

    (tmp_path / "late.tif").rename(late)
    second = run_vqa(run)
    assert (second.skipped, second.retried, second.rows, second.errors) == (3, 3, 3, 0)
    assert "3 already done (3 earlier rows asked again)" in second.format()
    rows = read_rows(output)
    # One row per question, the first run's answers kept (its part was not overwritten by the
    # second run's, though both are run "nightly"), the late scene's questions answered.
    assert rows.num_rows == 6 and len(set(rows["question_id"].to_pylist())) == 6 and rows["error"].null_count == 6
    assert {r["question_id"]: r["answer"] for r in rows.to_pylist() if r["question_id"] in answered_first} == answered_first
    assert sorted(p.name for p in Path(output).glob("part-*")) == ["part-nightly-00000.parquet", "part-nightly-00001.parquet"]
    manifest = read_manifest(output)
    assert manifest["status"] == "complete" and manifest["counts"] == {"questions": 6, "rows": 6, "runs": 2}


def test_an_interrupted_run_writes_the_rows_it_computed(ray_local, model_dir, tmp_path, caplog):
    # Enough questions that answering goes on for seconds after the first rows: the interruption
    # reaches the driver's main thread only when it next runs Python, and must land part way.
    archive = write_archive(str(tmp_path / "archive"), scenes=18, size=256, seed=8, questions_per_scene=2)
    total = pq.read_metadata(archive.questions_parquet).num_rows
    output = tmp_path / "out"
    # Rows stay buffered (no full file, no flush due) until the interruption.
    run = config(questions=archive.questions_parquet, scenes=archive.root, output=str(output), model=str(model_dir),
                 overrides={"max_new_tokens": 48, "answer.batch_size": 1, "rows_per_file": 1000,
                            "flush_interval_s": 600, "status_interval_s": 0.2})  # fmt: skip
    first_rows, running = threading.Event(), threading.Event()
    running.set()

    class FirstRows(logging.Handler):
        """Sees the status lines on the job's own logger, whatever handlers the root logger has by now."""

        def emit(self, record: logging.LogRecord) -> None:
            if re.search(rf"\[uhr\] [1-9]\d*/{total} rows", record.getMessage()):
                first_rows.set()

    def ctrl_c_after_the_first_rows() -> None:
        first_rows.wait(timeout=300)
        if running.is_set():
            _thread.interrupt_main()  # as Ctrl-C does: KeyboardInterrupt in the driver's main thread

    status_logger = logging.getLogger("uhr.pipeline.vqa")
    handler = FirstRows(level=logging.INFO)
    status_logger.addHandler(handler)
    # `interrupt_main` runs the process's SIGINT handler: make it Python's own, as in a fresh driver,
    # whatever ran earlier in this process installed (Ray Train's trainer installs one and keeps it).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=ctrl_c_after_the_first_rows, daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="uhr.pipeline.vqa"), pytest.raises(KeyboardInterrupt):
            watcher.start()
            try:
                run_vqa(run)
            finally:
                running.clear()
                first_rows.set()  # the watcher stops waiting once the run has ended either way
    finally:
        signal.signal(signal.SIGINT, previous)
        status_logger.removeHandler(handler)
    watcher.join()
    written = read_rows(str(output)).num_rows
    manifest = read_manifest(str(output))
    assert 0 < written < total, "the interruption must land part way"
    assert manifest["runs"][-1]["status"] == "interrupted" and manifest["runs"][-1]["rows"] == written
    assert manifest["counts"]["rows"] == written and manifest["status"] == "incomplete"


def test_relative_paths_reach_the_workers_and_secrets_stay_out_of_manifest_and_rows(ray_local, model_dir, tmp_path, monkeypatch):
    here = tmp_path / "here"
    write_archive(str(here / "archive"), scenes=1, size=256, seed=4, questions_per_scene=2)
    shutil.copytree(model_dir, here / f"models-{SECRET}" / "tiny")
    # The workers of the package's Ray run where pytest started, as a cluster's run where it was started.
    monkeypatch.chdir(here)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    summary = run_vqa(config(questions="archive/questions.parquet", scenes="archive", output="out",
                             model=f"models-{SECRET}/tiny", overrides={"max_new_tokens": 2}))  # fmt: skip
    rows = read_rows(str(here / "out"))
    assert (summary.answered, summary.errors) == (2, 0), rows["error"].to_pylist()
    manifest = read_manifest(str(here / "out"))
    assert manifest["config"]["scenes"] == str(here / "archive") and manifest["config"]["output"] == str(here / "out")
    assert manifest["config"]["model"] == str(here / "models-***" / "tiny")
    assert SECRET not in (here / "out" / MANIFEST_NAME).read_text()
    assert set(rows["model"].to_pylist()) == {str(here / "models-***" / "tiny")}


def test_a_signed_scene_url_is_masked_in_its_rows(ray_local, model_dir, tmp_path):
    signature = "uhr-not-a-real-signature"
    signed = f"http://127.0.0.1:1/archive/scene.tif?X-Amz-Signature={signature}"  # nothing listens there
    scenes = tmp_path / "scenes.txt"
    scenes.write_text(signed + "\n")
    summary = run_vqa(config(scenes=str(scenes), ask=["Is there a bridge?"], output=str(tmp_path / "out"),
                             model=str(model_dir), overrides={"max_new_tokens": 2}))  # fmt: skip
    rows = read_rows(str(tmp_path / "out"))
    assert summary.errors == rows.num_rows == 1
    assert rows["scene"].to_pylist() == [signed.replace(signature, "***")]
    # The error names the scene, then (after a colon, not eaten by a second redaction) why it failed.
    assert rows["error"][0].as_py().startswith(f"cannot read scene {signed.replace(signature, '***')}: ")
    assert signature not in (tmp_path / "out" / MANIFEST_NAME).read_text()


def test_a_question_answered_from_fewer_images_than_it_now_has_is_asked_again(ray_local, archive, model_dir, tmp_path):
    """An older uhr answered multi-image questions from their first image and wrote no `extra_scenes`
    column: a resume asks such a question again with all its images and keeps the other rows."""
    first, second = (str(Path(archive.root) / scene) for scene in archive.scenes[:2])
    questions, output = tmp_path / "questions.jsonl", str(tmp_path / "out")

    def ask(extra: list[str] | None) -> None:
        rows = [("pair", "How many ships?", extra), ("alone", "Is there a road?", None)]
        questions.write_text("".join(json.dumps({"question_id": q, "scene": first, "question": text, "extra_scenes": e}) + "\n"
                                     for q, text, e in rows))  # fmt: skip

    run = config(questions=str(questions), output=output, model=str(model_dir),
                 overrides={"max_new_tokens": 2, "pruning.strategy": "downsample"})  # fmt: skip
    ask(None)
    assert run_vqa(run).rows == 2
    for part in Path(output).glob("part-*.parquet"):  # as an older uhr wrote them
        pq.write_table(pq.read_table(part).drop_columns(["extra_scenes"]), part)
    alone = next(r for r in read_rows(output).to_pylist() if r["question_id"] == "alone")

    ask([second])
    again = run_vqa(run)
    assert (again.rows, again.skipped, again.retried) == (1, 1, 1)
    rows = {r["question_id"]: r for r in read_rows(output).to_pylist()}
    assert len(rows) == 2 and rows["alone"] == {**alone, "extra_scenes": None}
    assert rows["pair"]["extra_scenes"] == [second] and rows["pair"]["tokens_kept"] == 2 * alone["tokens_kept"]
    assert not list(Path(output).glob("*.unreadable"))
    # Nothing more to do: the answered pair counts as done.
    assert run_vqa(run).rows == 0
