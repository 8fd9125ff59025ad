"""Planning a run on the driver: questions as given, one row per question, scenes resolved where workers find them."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from uhr.config import ConfigError
from uhr.pipeline import VqaConfig
from uhr.pipeline.plan import InputError, load_questions, make_plan, questions_from_ask, resolve_scene, scene_uris
from uhr.storage import StorageConfig

from .helpers import config


def test_csv_ids_and_scenes_stay_text(tmp_path):
    # Type inference would read 007 as 7 and 1e3 as 1000.0: two questions would share an id.
    ids = ["007", "7", "0100", "1e3", "1000"]
    table = pa.table({"question_id": ids, "scene": ["001.tif", "1.tif", "a.tif", "b.tif", "c.tif"],
                      "question": ["How many?", "0042", "Where?", "What?", "Why?"]})  # fmt: skip
    pacsv.write_csv(table, tmp_path / "q.csv", pacsv.WriteOptions(quoting_style="none"))
    questions = load_questions(str(tmp_path / "q.csv"), StorageConfig())
    assert questions["question_id"].to_pylist() == ids
    assert questions["scene"].to_pylist()[:2] == ["001.tif", "1.tif"] and questions["question"][1].as_py() == "0042"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    choices=st.lists(st.none() | st.lists(st.text(max_size=12), max_size=4), min_size=1, max_size=6),
    indent=st.none() | st.integers(0, 2),
)
def test_csv_list_cells_read_as_the_lists_they_spell(tmp_path, choices, indent):
    """A CSV's choices and bbox cells are JSON text: quotes, commas, non-ASCII text and a list laid
    out over several lines read back as the lists written; an empty cell is null; integers are floats."""
    n = len(choices)
    boxes = [None if i % 3 == 2 else [i, 0, i + 2, 3.5] for i in range(n)]
    table = pa.table({
        "question_id": [f"q{i}" for i in range(n)], "scene": ["s.tif"] * n, "question": ["Which?"] * n,
        "choices": [None if c is None else json.dumps(c, indent=indent, ensure_ascii=False) for c in choices],
        "bbox": ["" if b is None else json.dumps(b) for b in boxes],
    })  # fmt: skip
    path = tmp_path / "q.csv"
    pacsv.write_csv(table, path)
    questions = load_questions(str(path), StorageConfig())
    assert questions["choices"].to_pylist() == choices
    assert questions["bbox"].to_pylist() == [None if b is None else [float(v) for v in b] for b in boxes]


@pytest.mark.parametrize(
    ("column", "cell", "message"),
    [
        ("choices", '["(A) yes", "(B) no"', r"row 2: choices is not a JSON list"),
        ("choices", '"(A) yes"', r"row 2: choices must be a list"),
        ("choices", '["(A) yes", 2]', r"column choices has values of the wrong type"),
        ("bbox", '["a", 0, 1, 1]', r"column bbox has values of the wrong type"),
        ("bbox", "[0, 0, 4, null]", r"row 2: bbox must be \[x0, y0, x1, y1\].*None"),
        ("bbox", "[0, 0, 4]", r"row 2: bbox must be \[x0, y0, x1, y1\]"),
    ],
)
def test_a_bad_list_cell_in_a_csv_is_named(tmp_path, column, cell, message):
    good = {"choices": '["(A) yes", "(B) no"]', "bbox": "[0, 0, 4, 4]"}
    table = pa.table({
        "question_id": ["a", "b", "c", "d"], "scene": ["s.tif"] * 4, "question": ["Ships?"] * 4,
        column: [good[column], "", cell, good[column]],
    })  # fmt: skip
    pacsv.write_csv(table, tmp_path / "q.csv")
    with pytest.raises(InputError, match=message):
        load_questions(str(tmp_path / "q.csv"), StorageConfig())


def test_a_scene_or_question_given_twice_is_asked_once(caplog):
    with caplog.at_level(logging.WARNING, logger="uhr.pipeline.plan"):
        questions = questions_from_ask(["s3://b/a.tif", "s3://b/b.tif", "s3://b/a.tif"], ["Ships?", "Roads?", "Ships?"])
    ids = questions["question_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 4
    assert make_plan(questions, None, pa.array([], pa.string())).pending == 4
    assert "1 scene(s) given more than once" in caplog.text and "1 question(s) given more than once" in caplog.text


def test_relative_scenes_resolve_against_a_scene_lists_folder(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "scenes.txt").write_text("# two scenes\nscene_0000.tif\n/elsewhere/scene_0001.tif\ns3://b/scene_0002.tif\n")
    assert scene_uris(str(lists / "scenes.txt"), StorageConfig()) == [
        str(lists / "scene_0000.tif"), "/elsewhere/scene_0001.tif", "s3://b/scene_0002.tif"
    ]
    # A questions table's scene names, with --scenes naming a list: the list's folder, not "scenes.txt/...".
    assert resolve_scene("scene_0000.tif", "s3://bucket/lists/scenes.txt") == "s3://bucket/lists/scene_0000.tif"
    assert resolve_scene("scene_0000.tif", "s3://bucket/archive") == "s3://bucket/archive/scene_0000.tif"
    # Relative local names end up absolute, whatever directory the workers run in.
    monkeypatch.chdir(tmp_path)
    assert scene_uris("lists/scenes.txt", StorageConfig())[0] == str(lists / "scene_0000.tif")
    assert resolve_scene("scene_0000.tif", "lists/scenes.txt") == str(lists / "scene_0000.tif")
    assert resolve_scene("archive/scene_0000.tif", None) == str(tmp_path / "archive" / "scene_0000.tif")


@pytest.mark.parametrize(
    "option",
    ["GS_SECRET_ACCESS_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_TOKEN", "GDAL_HTTP_USERPWD", "GDAL_HTTP_HEADERS"],
)
def test_credentials_in_gdal_options_are_refused_without_echoing_them(option):
    value = "Authorization: Bearer uhr-not-a-real-token" if option == "GDAL_HTTP_HEADERS" else "uhr-not-a-real-secret"
    with pytest.raises(ConfigError, match=rf"must not hold credentials \({option}\).*environment") as caught:
        config(storage={"gdal_options": {option: value}})
    assert "not-a-real" not in str(caught.value)
    with pytest.raises(ValueError) as direct:  # built in code, not from the command line
        VqaConfig(storage={"gdal_options": {option: value}})
    assert "not-a-real" not in str(direct.value)
    # Tuning options and file paths are not credentials.
    fine = {"VSI_CACHE_SIZE": "1048576", "GDAL_HTTP_HEADER_FILE": "/etc/gdal/headers", "GDAL_HTTP_HEADERS": "User-Agent: uhr"}
    assert VqaConfig(storage={"gdal_options": fine}).storage.gdal_options == fine


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_multi_image_questions_group_by_their_image_sequence(tmp_path, suffix):
    """A question's extra scenes (CSV: JSON text; JSONL: a list) resolve like its scene, and each
    distinct image sequence is one group, read and encoded once for its questions."""
    rows = [
        {"question_id": "pair-1", "scene": "a.tif", "question": "How many ships arrived?", "extra_scenes": ["b.tif"]},
        {"question_id": "pair-2", "scene": "a.tif", "question": "Which roads are new?", "extra_scenes": ["b.tif"]},
        {"question_id": "reversed", "scene": "b.tif", "question": "How many ships left?", "extra_scenes": ["a.tif"]},
        {"question_id": "alone", "scene": "a.tif", "question": "How many ships?", "extra_scenes": None},
        {"question_id": "remote", "scene": "a.tif", "question": "Changed?", "extra_scenes": ["s3://other/c.tif"]},
    ]
    path = tmp_path / f"q.{suffix}"
    if suffix == "csv":
        table = pa.table({key: [row[key] if key != "extra_scenes" or row[key] is None else json.dumps(row[key])
                                for row in rows] for key in rows[0]})  # fmt: skip
        pacsv.write_csv(table, path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    questions = load_questions(str(path), StorageConfig())
    plan = make_plan(questions, "s3://bucket/scenes", pa.array([], pa.string()))
    groups = [((g["scene"], *g["extra_scenes"]), [q["question_id"] for q in g["questions"]]) for g in plan.groups.to_pylist()]
    assert groups == [  # by image sequence, a sequence after its own first image alone
        (("s3://bucket/scenes/a.tif",), ["alone"]),
        (("s3://bucket/scenes/a.tif", "s3://bucket/scenes/b.tif"), ["pair-1", "pair-2"]),
        (("s3://bucket/scenes/a.tif", "s3://other/c.tif"), ["remote"]),
        (("s3://bucket/scenes/b.tif", "s3://bucket/scenes/a.tif"), ["reversed"]),
    ]
    assert plan.scene_reads == 7 and (plan.total, plan.done) == (5, 0)
    # What the output holds already is left out; questions keep every field the stages need.
    plan = make_plan(questions, "s3://bucket/scenes", pa.array(["pair-1", "alone", "elsewhere"]))
    assert (plan.total, plan.done, plan.pending, plan.scene_reads) == (5, 2, 3, 6)
    first = plan.groups.to_pylist()[0]
    assert first["extra_scenes"] == ["s3://bucket/scenes/b.tif"]
    assert first["questions"] == [
        {"question_id": "pair-2", "question": "Which roads are new?", "choices": None, "bbox": None, "prompt": None}
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "extra_scenes": ["b.tif", ""]}) + "\n")
    with pytest.raises(InputError, match=r"row 0: extra_scenes holds an empty scene"):
        load_questions(str(bad), StorageConfig())


def test_a_scenes_prefix_is_listed_with_the_configured_patterns(tmp_path):
    """A delivery's folder holds browse images and usable-data masks beside the scenes."""
    names = ["a_AnalyticMS_SR.tif", "a_udm2.tif", "a-BROWSE.JPG", "b_AnalyticMS_SR.TIF", "notes.txt"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    everything = scene_uris(str(tmp_path), StorageConfig())
    assert [uri.rsplit("/", 1)[1] for uri in everything] == ["a-BROWSE.JPG", "a_AnalyticMS_SR.tif", "a_udm2.tif", "b_AnalyticMS_SR.TIF"]
    wanted = VqaConfig(scenes=str(tmp_path), ask=["q"], scene_patterns=["*_AnalyticMS_SR*.tif"])
    assert [uri.rsplit("/", 1)[1] for uri in scene_uris(wanted.scenes, StorageConfig(), wanted.scene_patterns)] == [
        "a_AnalyticMS_SR.tif", "b_AnalyticMS_SR.TIF"
    ]
    with pytest.raises(InputError, match=r"no scenes matching \*\.jp2 under"):
        scene_uris(str(tmp_path), StorageConfig(), ["*.jp2"])
