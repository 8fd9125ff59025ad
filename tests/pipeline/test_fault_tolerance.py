"""The VQA job survives what production throws at it: a killed driver, a killed actor."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.util.state import list_actors

from uhr.pipeline import run_vqa
from uhr.pipeline.vqa import unseen_rows
from uhr.synth import write_archive
from uhr.testing.waiting import wait_for

from .helpers import config, read_manifest, read_rows, scored_by_hand

REPO = Path(__file__).resolve().parents[2]


def _parts(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


def test_rerun_after_the_driver_is_killed_writes_every_row_once(ray_local, model_dir, tmp_path):
    """The killed run is the job as users start it on one machine: a fresh local Ray of this 2-core
    machine, split stages with their default CPUs. The two pools' actors hold 2 CPUs for their
    lifetime, so the job must ask Ray for more, or no read runs and no answer ever comes. The rerun
    (fused, in this process's Ray) resumes it: resuming does not depend on how stages were laid out."""
    # Enough scenes, and long enough answers, for the kill to land part way.
    archive = write_archive(str(tmp_path / "archive"), scenes=6, size=512, seed=9, questions_per_scene=4)
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "jobs.vqa",
        "--questions", archive.questions_parquet, "--scenes", archive.root,
        "--output", str(output), "--model", str(model_dir),
        "rows_per_file=1", "max_new_tokens=48", "answer.batch_size=1", "fused=false",
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    # The driver and the local Ray it starts share a process group: kill -9 the whole job.
    job = subprocess.Popen(command, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _parts(output) or job.poll() is not None, 240, "the first answers")
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    done = sum(pq.read_metadata(part).num_rows for part in _parts(output))
    total = pq.read_metadata(archive.questions_parquet).num_rows
    assert 0 < done < total, "the driver must be killed part way"

    summary = run_vqa(config(questions=archive.questions_parquet, scenes=archive.root, output=str(output),
                             model=str(model_dir), overrides={"max_new_tokens": 48}))
    rows = read_rows(str(output))
    assert summary.skipped == done and summary.rows == total - done
    assert rows.num_rows == total and len(set(rows["question_id"].to_pylist())) == total
    # The accuracy covers every row of the output, the killed run's as well as this one's.
    assert (summary.scored, summary.correct) == scored_by_hand(rows, pq.read_table(archive.questions_parquet))
    assert f"({summary.correct}/{summary.scored} multiple-choice" in summary.format()
    assert "earlier runs' rows included" in summary.format()
    manifest = read_manifest(str(output))
    assert [run["status"] for run in manifest["runs"]] == ["interrupted", "completed"]
    assert manifest["status"] == "complete"


def test_a_killed_encode_actor_is_replaced_and_every_row_written_once(ray_local, model_dir, tmp_path):
    # Long enough answers, one question at a time, for the kill to land part way even on a quiet machine.
    archive = write_archive(str(tmp_path / "archive"), scenes=6, size=512, seed=11, questions_per_scene=4)
    output = tmp_path / "out"
    run = config(questions=archive.questions_parquet, scenes=archive.root, output=str(output), model=str(model_dir),
                 overrides={"max_new_tokens": 48, "rows_per_file": 1, "answer.batch_size": 1})
    result = {}
    worker = threading.Thread(target=lambda: result.update(summary=run_vqa(run)))
    worker.start()

    def encode_actor():
        # This test's Ray by address: other Rays may run on the machine.
        actors = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], detail=True)
        return next((a for a in actors if "EncodeStage" in a.class_name and a.pid), None)

    wait_for(lambda: (encode_actor() is not None and _parts(output)) or not worker.is_alive(), 240, "a working encode actor")
    total = pq.read_metadata(archive.questions_parquet).num_rows
    victim = encode_actor()
    assert worker.is_alive() and victim is not None and len(_parts(output)) < total, "the kill must land part way"
    psutil.Process(victim.pid).kill()
    worker.join(timeout=300)
    assert not worker.is_alive()

    summary = result["summary"]
    rows = read_rows(str(output))
    assert summary.status == "completed" and rows.num_rows == total == summary.rows
    assert len(set(rows["question_id"].to_pylist())) == total and rows["error"].null_count == total
    assert not psutil.pid_exists(victim.pid)


def test_rows_a_retried_task_sends_again_are_written_once():
    """Whether Ray resends a dead attempt's rows in the kill test above is up to Ray; the driver's
    filter is what keeps each question to one row, so it is checked on such streams directly."""
    written: set[str] = set()
    first = pa.table({"question_id": ["a", "b", "a"], "answer": ["1", "2", "1 again"]})
    retry = pa.table({"question_id": ["b", "c"], "answer": ["2 again", "3"]})
    assert unseen_rows(first, written).to_pydict() == {"question_id": ["a", "b"], "answer": ["1", "2"]}
    assert unseen_rows(retry, written).to_pydict() == {"question_id": ["c"], "answer": ["3"]}
    assert unseen_rows(retry, written).num_rows == 0 and written == {"a", "b", "c"}
