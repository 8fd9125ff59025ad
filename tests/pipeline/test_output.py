"""The output dataset on resume: a corrupt part is set aside, a part that cannot be fetched stops the job."""

from __future__ import annotations

import fsspec.implementations.local
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uhr.pipeline import OUTPUT_SCHEMA
from uhr.pipeline.output import OutputError, ResultWriter, drop_rows, read_done
from uhr.storage import StorageConfig
from uhr.testing.waiting import wait_for


def _rows(ids: list[str], run_id: str = "r") -> pa.Table:
    rows = [{"question_id": qid, "scene": "/s.tif", "question": "q", "answer": "A", "run_id": run_id} for qid in ids]
    return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)


def test_a_corrupt_part_is_set_aside_and_an_unreadable_one_stops_the_job(tmp_path):
    storage = StorageConfig()
    writer = ResultWriter(str(tmp_path), "r", storage, rows_per_file=2, flush_interval_s=60)
    writer.write(_rows(["a", "b", "c", "d"]))
    assert writer.rows_written == 4 and sorted(p.name for p in tmp_path.glob("part-*")) == [
        "part-r-00000.parquet", "part-r-00001.parquet"
    ]
    # Cut short by a crash of some other writer: not Parquet, set aside, its questions asked again.
    whole = (tmp_path / "part-r-00001.parquet").read_bytes()
    (tmp_path / "part-r-00001.parquet").write_bytes(whole[: len(whole) // 2])
    assert sorted(read_done(str(tmp_path), storage)["question_id"].to_pylist()) == ["a", "b"]
    assert (tmp_path / "part-r-00001.parquet.unreadable").exists()

    # A part that cannot be fetched at all (an I/O error, as a throttled or unreachable store gives):
    # the job stops naming it, and nothing is renamed or hidden.
    (tmp_path / "part-x-00000.parquet").mkdir()
    with pytest.raises(OutputError, match=r"output part .*part-x-00000\.parquet cannot be read \(IsADirectoryError"):
        read_done(str(tmp_path), storage)
    assert (tmp_path / "part-x-00000.parquet").is_dir() and not (tmp_path / "part-x-00000.parquet.unreadable").exists()
    assert (tmp_path / "part-r-00000.parquet").exists()


def test_a_reused_run_id_numbers_its_parts_on(tmp_path):
    storage = StorageConfig()
    for batch in (["a", "b"], ["c"], ["d", "e"]):
        with ResultWriter(str(tmp_path), "nightly", storage, rows_per_file=100, flush_interval_s=60) as writer:
            writer.write(_rows(batch, "nightly"))
    assert sorted(p.name for p in tmp_path.glob("part-*")) == [f"part-nightly-0000{n}.parquet" for n in range(3)]
    assert sorted(pq.read_table(tmp_path)["question_id"].to_pylist()) == ["a", "b", "c", "d", "e"]


def test_rows_waiting_longer_than_the_flush_interval_are_written_without_a_new_batch(tmp_path):
    with ResultWriter(str(tmp_path), "r", StorageConfig(), rows_per_file=100, flush_interval_s=0.5) as writer:
        writer.write(_rows(["a"]))
        assert writer.rows_written == 0
        wait_for(lambda: writer.rows_written == 1, 10, "the timed flush")
        writer.write(_rows(["b"]))
    assert writer.rows_written == 2 and len(list(tmp_path.glob("part-*.parquet"))) == 2


def test_dropping_error_rows_from_a_part_an_older_uhr_wrote_keeps_the_schema(tmp_path):
    """Parts written before `extra_scenes` existed lack it; resuming over them rewrites such a part
    in today's schema instead of failing the job."""
    rows = _rows(["a", "b"]).to_pylist()
    rows[1].update(answer=None, error="scene /s.tif: unreadable")
    older = pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA).drop_columns(["extra_scenes"])
    pq.write_table(older, tmp_path / "part-old-00000.parquet")
    assert drop_rows(str(tmp_path), StorageConfig(), {"b"}) == 1
    kept = pq.read_table(tmp_path / "part-old-00000.parquet")
    assert kept.schema.remove_metadata() == OUTPUT_SCHEMA
    assert kept["question_id"].to_pylist() == ["a"] and kept["extra_scenes"].to_pylist() == [None]


def test_dropping_rows_rewrites_the_parts_holding_them_and_deletes_a_part_left_empty(tmp_path):
    storage = StorageConfig()
    with ResultWriter(str(tmp_path), "r", storage, rows_per_file=2, flush_interval_s=60) as writer:
        writer.write(_rows(["a", "b", "c", "d", "e"]))
    before = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("part-*")}
    assert drop_rows(str(tmp_path), storage, {"b", "c", "d"}) == 3
    # part 0 held a and b, part 1 only dropped rows, part 2 none of them (left untouched).
    assert sorted(path.name for path in tmp_path.glob("part-*")) == ["part-r-00000.parquet", "part-r-00002.parquet"]
    assert (tmp_path / "part-r-00002.parquet").stat().st_mtime_ns == before["part-r-00002.parquet"]
    assert sorted(read_done(str(tmp_path), storage)["question_id"].to_pylist()) == ["a", "e"]


def test_a_part_whose_columns_cannot_take_uhrs_types_stops_the_job_naming_it(tmp_path):
    """Castable types (int32 token counts) are read as uhr's; a column that cannot be (lists for text)
    stops the resume naming the part and column, and the part is left as it was."""
    castable = _rows(["a"]).set_column(OUTPUT_SCHEMA.get_field_index("tokens_kept"), "tokens_kept", pa.array([7], pa.int32()))
    pq.write_table(castable, tmp_path / "part-int32-00000.parquet")
    assert read_done(str(tmp_path), StorageConfig())["question_id"].to_pylist() == ["a"]

    foreign = _rows(["b"]).set_column(OUTPUT_SCHEMA.get_field_index("error"), "error", pa.array([[1.5]]))
    pq.write_table(foreign, tmp_path / "part-foreign-00000.parquet")
    before = (tmp_path / "part-foreign-00000.parquet").read_bytes()
    with pytest.raises(OutputError, match=r"part-foreign-00000\.parquet: column 'error' is list<element: double>, uhr writes string"):
        read_done(str(tmp_path), StorageConfig())
    with pytest.raises(OutputError, match=r"part-foreign-00000\.parquet: column 'error'"):
        drop_rows(str(tmp_path), StorageConfig(), {"b"})
    assert (tmp_path / "part-foreign-00000.parquet").read_bytes() == before


def test_resume_fetches_only_the_columns_it_needs_from_object_storage(s3_server):
    """A resume reads question ids, errors, choices and images, not the answers and questions beside them,
    and rewrites only the parts holding rows it drops."""
    storage, bucket = s3_server.storage(), s3_server.new_bucket("output")
    output = f"s3://{bucket}/run"
    rng = np.random.default_rng(0)
    rows = _rows([f"q{i:05d}" for i in range(2000)])
    # Incompressible question and answer texts, as long free text is: most of the part's bytes.
    noise = [rng.integers(0, 2**63, 40).tobytes().hex() for _ in range(rows.num_rows)]
    rows = rows.set_column(rows.schema.get_field_index("question"), "question", pa.array(noise))
    rows = rows.set_column(rows.schema.get_field_index("answer"), "answer", pa.array(noise[::-1]))
    with ResultWriter(output, "r", storage, rows_per_file=10_000, flush_interval_s=60) as writer:
        writer.write(rows)
    [part] = s3_server.client.list_objects_v2(Bucket=bucket, Prefix="run/part-")["Contents"]
    with s3_server.measure() as measured:
        done = read_done(output, storage)
    assert sorted(done["question_id"].to_pylist()) == rows["question_id"].to_pylist()
    assert measured.bytes_sent < part["Size"] / 5, (measured.bytes_sent, part["Size"])
    # Retrying error rows rewrites only the parts that hold them: a part without any is not fetched whole.
    with s3_server.measure() as measured:
        assert drop_rows(output, storage, {"q-not-written"}) == 0
    assert measured.bytes_sent < part["Size"] / 5, (measured.bytes_sent, part["Size"])
    assert drop_rows(output, storage, {"q00007"}) == 1 and read_done(output, storage).num_rows == rows.num_rows - 1


def test_a_store_error_while_reading_a_part_stops_the_job_instead_of_setting_it_aside(tmp_path, monkeypatch):
    """A connection reset half-way through a part's column chunks is the store's fault, not the part's."""
    storage = StorageConfig()
    with ResultWriter(str(tmp_path), "r", storage, rows_per_file=10, flush_interval_s=60) as writer:
        writer.write(_rows(["a", "b"]))
    reads = []

    def reset_after_the_footer(self, *args):
        reads.append(args)
        if len(reads) > 1:
            raise ConnectionResetError("connection reset by peer")
        return real_read(self, *args)

    real_read = fsspec.implementations.local.LocalFileOpener.read
    monkeypatch.setattr(fsspec.implementations.local.LocalFileOpener, "read", reset_after_the_footer)
    with pytest.raises(OutputError, match=r"part-r-00000\.parquet cannot be read \(ConnectionResetError"):
        read_done(str(tmp_path), storage)
    assert (tmp_path / "part-r-00000.parquet").exists() and not list(tmp_path.glob("*.unreadable"))
