"""`jobs.evaluate` end to end on a local Ray with the tiny model: every benchmark layout, sweeps, resume."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from benchmark_layouts import write_lrs_vqa, write_mme, write_xlrs_save_to_disk
from jobs.evaluate import main
from uhr.eval.benchmarks import BenchmarkSpec, load_benchmark
from uhr.eval.report import REPORT_JSON, REPORT_MD, REPORT_PLOT
from uhr.eval.run import (
    ITEMS_NAME,
    QUESTIONS_NAME,
    SETTINGS_NAME,
    SWAPPED_QUESTIONS_NAME,
    EvalRun,
    EvaluateConfig,
    _prepare_output,
    parse_sweep,
    plan_runs,
    swap_effect,
    swapped_scenes,
)
from uhr.config import ConfigError
from uhr.model import load_model, load_model_config, save_model
from uhr.pipeline import VqaConfig
from uhr.pipeline.defaults import sample_archive
from uhr.pipeline.output import MANIFEST_NAME
from uhr.storage import StorageConfig
from uhr.synth import ArchiveIndex, write_archive

# Short replies and no periodic status lines: the tests check files, not the tiny model's words.
FAST = ["max_new_tokens=2", "status_interval_s=600"]


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """uhr's cache (WordNet, extracted XLRS images, the sample archive) in a fresh folder."""
    path = tmp_path_factory.mktemp("uhr-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UHR_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def ray_local(s3_server, cache_dir) -> Iterator[None]:
    """One local Ray for the module, started after the S3 server so its workers reach it."""
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> ArchiveIndex:
    """Two 256-px synthetic scenes with 3 questions each."""
    return write_archive(str(tmp_path_factory.mktemp("archive")), scenes=2, size=256, seed=5, questions_per_scene=3)


def _read_json(fs, uri: str) -> dict:
    with fs.open(uri, "rt") as handle:
        return json.load(handle)


def _read_parquet(fs, uri: str) -> pa.Table:
    """A Parquet file, or every part file of a folder (the VQA job's output)."""
    paths = sorted(fs.glob(f"{uri}/part-*.parquet")) if fs.isdir(uri) else [uri]
    tables = []
    for path in paths:
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables)


def _check_report(fs, output: str, benchmark: str, items: int, runs: list[str]) -> dict:
    """The report files of a finished evaluation: every run answered every item; returns report.json."""
    report = _read_json(fs, f"{output}/{REPORT_JSON}")
    assert report["benchmarks"] == [benchmark] and report["evaluation"]["items"] == items
    assert sorted(report["evaluation"]["runs"]) == sorted(runs)
    assert sorted(f"{r['strategy']}-b{r['budget']}" for r in report["runs"]) == sorted(runs)
    for run in report["runs"]:
        assert (run["items"], run["answered"], run["errors"], run["missing"]) == (items, items, 0, 0)
        assert 0 < run["mean_tokens_kept"] <= run["budget"] and run["headline"]["value"] is not None
    assert [t["rows"] for t in report["throughput"]] == [items] * len(runs)
    assert all(t["questions_per_s"] > 0 and t["wall_s"] > 0 for t in report["throughput"])
    markdown = fs.cat(f"{output}/{REPORT_MD}").decode()
    assert f"## {benchmark}" in markdown and "## Throughput" in markdown and "questions/s" in markdown
    with fs.open(f"{output}/{REPORT_PLOT}", "rb") as handle:
        assert Image.open(handle).format == "PNG"
    # One row per (run, item), scored: the report's headline is what the per-item rows add up to.
    judged = _read_parquet(fs, f"{output}/{ITEMS_NAME}")
    assert judged.num_rows == items * len(runs) and judged["reply"].null_count == 0
    for run in report["runs"]:
        mine = [r for r in judged.to_pylist() if (r["strategy"], r["budget"]) == (run["strategy"], run["budget"])]
        if benchmark in ("xlrs-lite", "synthetic"):  # headline = correct / items
            assert run["headline"]["value"] == pytest.approx(sum(r["correct"] for r in mine) / items)
    return report


@pytest.mark.parametrize("benchmark", ["xlrs", "lrs-vqa", "mme-rw-rs"])
def test_each_published_layout_through_the_job(ray_local, s3_server, model_dir, tmp_path, benchmark) -> None:
    storage: StorageConfig = s3_server.storage()
    if benchmark == "xlrs":
        # In object storage, data and output alike: the extracted images go under the output for the workers.
        bucket = s3_server.new_bucket("xlrs")
        write_xlrs_save_to_disk(tmp_path / "xlrs")
        storage.filesystem(f"s3://{bucket}").put(str(tmp_path / "xlrs"), f"s3://{bucket}/XLRS-Bench-lite", recursive=True)
        data, output, name = f"s3://{bucket}/XLRS-Bench-lite", f"s3://{bucket}/eval", "xlrs-lite"
    elif benchmark == "lrs-vqa":
        data, output, name = str(write_lrs_vqa(tmp_path / "lrs")), str(tmp_path / "eval"), "lrs-vqa"
    else:
        data, output, name = str(write_mme(tmp_path / "mme")), str(tmp_path / "eval"), "mme-realworld-rs"

    code = main(["--benchmark", benchmark, "--data", data, "--output", output, "--model", str(model_dir), *FAST])
    assert code == 0
    fs = storage.filesystem(output)
    items = load_benchmark(BenchmarkSpec(name=name, uri=data, image_dir=f"{output}/images"), storage)
    report = _check_report(fs, output, name, items.num_rows, ["uhr-bat-b256"])  # the model's default pruning

    # The VQA job got each benchmark's own prompt, verbatim, and every image of every item, in order.
    questions = _read_parquet(fs, f"{output}/{QUESTIONS_NAME}").to_pylist()
    assert [q["prompt"] for q in questions] == items.column("prompt").to_pylist()
    assert [[q["scene"], *(q["extra_scenes"] or [])] for q in questions] == items.column("images").to_pylist()
    if name == "xlrs-lite":
        assert all(q["scene"].startswith(f"s3://{bucket}/eval/images/") for q in questions)
        assert report["evaluation"]["multi_image_items"] == 1  # item 9: two images, both asked
        assert "asked of all of them" in fs.cat(f"{output}/{REPORT_MD}").decode()
    # What the job answered is what was scored.
    answers = _read_parquet(fs, f"{output}/runs/uhr-bat-b256")
    judged = _read_parquet(fs, f"{output}/{ITEMS_NAME}")
    assert dict(zip(answers["question_id"].to_pylist(), answers["answer"].to_pylist())) == dict(
        zip(judged["question_id"].to_pylist(), judged["reply"].to_pylist())
    )


def test_synthetic_sweep_resumes_and_guards_its_settings(ray_local, model_dir, archive, tmp_path, capsys) -> None:
    output = str(tmp_path / "eval")
    model = tmp_path / "model"  # a copy of its own: retrained in place at the end
    shutil.copytree(model_dir, model)
    command = ["--benchmark", "synthetic", "--data", archive.root, "--output", output, "--model", str(model), *FAST]
    sweep = ["--sweep", "strategy=downsample,c2f", "budget=64"]
    runs = ["downsample-b64", "c2f-b64"]
    assert main([*command, *sweep]) == 0
    fs = StorageConfig().filesystem(output)
    first = _check_report(fs, output, "synthetic", archive.n_questions, runs)
    assert sorted(p.name for p in (tmp_path / "eval" / "runs").iterdir()) == sorted(runs)
    # The items' evidence boxes went with the questions: each run says how often it resolved them.
    questions = pq.read_table(f"{output}/{QUESTIONS_NAME}").to_pylist()
    assert any(r["bbox"] for r in questions)
    assert all(0.0 <= run["evidence_resolved"] <= 1.0 for run in first["runs"])

    # The same command again: every run finds its answers, nothing is asked twice, the report holds.
    capsys.readouterr()
    assert main([*command, *sweep]) == 0
    assert "downsample-b64" in capsys.readouterr().out
    second = _check_report(fs, output, "synthetic", archive.n_questions, runs)
    assert second["throughput"] == first["throughput"] and second["runs"] == first["runs"]
    for run in runs:
        manifest = _read_json(fs, f"{output}/runs/{run}/{MANIFEST_NAME}")
        assert [entry["rows"] for entry in manifest["runs"]] == [archive.n_questions, 0]

    # Other settings would mix answers of two configurations: refused, naming what changed.
    assert main([*command[:-2], "max_new_tokens=3", "status_interval_s=600", *sweep]) == 2
    assert "max_new_tokens was 2, now 3" in capsys.readouterr().err
    # A subset of the items is scored from the answers already there.
    assert main([*command, "--limit", "2", *sweep]) == 0
    limited = _read_json(fs, f"{output}/{REPORT_JSON}")
    assert (limited["evaluation"]["items"], limited["evaluation"]["items_published"]) == (2, archive.n_questions)
    assert {run["items"] for run in limited["runs"]} == {2}
    # A copy of the model elsewhere is the same model: the evaluation resumes with nothing to ask.
    shutil.copytree(model, tmp_path / "moved")
    assert main([*command[:-3], str(tmp_path / "moved"), *FAST, *sweep]) == 0
    for run in runs:
        assert _read_json(fs, f"{output}/runs/{run}/{MANIFEST_NAME}")["runs"][-1]["rows"] == 0
    # A model retrained where the old one was is another model: refused, though its path is the same.
    retrained, _ = load_model(model)
    with torch.no_grad():
        retrained.language_model.lm_head.weight[3, 5] += 1.0
    save_model(retrained, model)
    assert main([*command, *sweep]) == 2
    assert "model_weights was" in capsys.readouterr().err


def test_swap_control_asks_every_item_about_another_scene(ray_local, model_dir, archive, tmp_path, capsys) -> None:
    output = str(tmp_path / "eval")
    command = ["--benchmark", "synthetic", "--data", archive.root, "--output", output, "--model", str(model_dir), *FAST]
    assert main([*command, "--swap-control", "--sweep", "strategy=downsample,c2f", "budget=64"]) == 0
    fs = StorageConfig().filesystem(output)
    runs = ["downsample-b64", "c2f-b64", "downsample+swapped-b64"]
    report = _check_report(fs, output, "synthetic", archive.n_questions, runs)
    own = pq.read_table(f"{output}/{QUESTIONS_NAME}").to_pylist()
    swapped = pq.read_table(f"{output}/{SWAPPED_QUESTIONS_NAME}").to_pylist()
    # Same questions, each on the other of the archive's two scenes.
    assert [(r["question_id"], r["prompt"]) for r in own] == [(r["question_id"], r["prompt"]) for r in swapped]
    assert not any(r["bbox"] for r in swapped)  # the evidence is not in the other scene
    assert all(a["scene"] != b["scene"] and {a["scene"], b["scene"]} == {r["scene"] for r in own} for a, b in zip(own, swapped))
    answered = _read_parquet(fs, f"{output}/runs/downsample+swapped-b64")
    assert sorted(answered["question_id"].to_pylist()) == sorted(r["question_id"] for r in own)
    # The control's figures are what the per-item rows say.
    judged = _read_parquet(fs, f"{output}/{ITEMS_NAME}").to_pylist()
    predictions = {(r["strategy"], r["question_id"]): r["prediction"] for r in judged}
    changed = [predictions[("downsample", q)] != predictions[("downsample+swapped", q)] for q in (r["question_id"] for r in own)]
    control = report["evaluation"]["swap_control"]
    assert (control["run"], control["compared_with"], control["items"]) == ("downsample+swapped-b64", "downsample-b64", len(own))
    assert control["changed"] == pytest.approx(sum(changed) / len(changed))
    assert "## Swap control" in fs.cat(f"{output}/{REPORT_MD}").decode()
    assert "swap control downsample+swapped-b64" in capsys.readouterr().out
    # A smaller --limit asks its items about the scenes the full pairing gave them (one item alone
    # has one scene: the pairing is made before the limit).
    assert main([*command, "--swap-control", "--sweep", "strategy=downsample", "budget=64", "--limit", "1"]) == 0
    assert pq.read_table(f"{output}/{SWAPPED_QUESTIONS_NAME}").to_pylist() == swapped[:1]


def test_the_swap_control_compares_only_items_answered_in_both_runs() -> None:
    run = EvalRun("downsample", 64, "out", VqaConfig(), swapped=True)
    rows = [  # (strategy, question_id, status, prediction, correct)
        ("downsample", "q1", "answered", "A", True), ("downsample+swapped", "q1", "answered", "B", False),
        ("downsample", "q2", "answered", "C", True), ("downsample+swapped", "q2", "answered", "C", True),
        ("downsample", "q3", "error", None, False), ("downsample+swapped", "q3", "answered", "D", False),
    ]  # fmt: skip
    judged = pa.Table.from_pylist(
        [{"strategy": s, "budget": 64, "question_id": q, "category": "count", "status": st, "prediction": p, "correct": c}
         for s, q, st, p, c in rows]  # fmt: skip
    )
    effect = swap_effect(judged, run)
    assert (effect["items"], effect["items_not_answered_in_both"], effect["changed"]) == (2, 1, 0.5)


def test_swapped_scenes_never_keep_an_image_of_their_own() -> None:
    assert swapped_scenes([("b",), ("a",), ("c",), ("a",)]) == {("a",): ("b",), ("b",): ("c",), ("c",): ("a",)}
    with pytest.raises(ConfigError, match=r"for the item\(s\) on a, another item on 1 image\(s\)"):
        swapped_scenes([("a",), ("a",)])
    # A pair gets another pair, skipping one that shares an image with it; single images rotate apart.
    pairs = [("a", "b"), ("b", "c"), ("d", "e"), ("x",), ("y",)]
    assert swapped_scenes(pairs) == {
        ("a", "b"): ("d", "e"), ("b", "c"): ("d", "e"), ("d", "e"): ("a", "b"), ("x",): ("y",), ("y",): ("x",)
    }  # fmt: skip
    with pytest.raises(ConfigError, match="on a, b, another item on 2 image"):
        swapped_scenes([("a", "b"), ("b", "c"), ("x",), ("y",)])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--benchmark", "vqav2", "--data", "x"], "unknown benchmark 'vqav2'"),
        (["--benchmark", "lrs-vqa"], "benchmark lrs-vqa needs `data`"),
        (["--benchmark", "lrs-vqa", "--data", "{tmp}/nowhere.jsonl"], "LRS-VQA question file not found"),
        (["--benchmark", "synthetic", "--sweep", "regions=4,8"], "sweep strategy=a,b"),
        (["--benchmark", "synthetic", "--sweep", "strategy=zoom"], "strategies.0"),
        (["--benchmark", "synthetic", "--sweep", "budget=0"], "budgets must be positive"),
        (["--benchmark", "synthetic", "--data", "{tmp}/nowhere"], "synthetic questions not found"),
    ],
)
def test_bad_input_stops_before_any_run(model_dir, tmp_path, capsys, arguments, message) -> None:
    filled = [argument.format(tmp=tmp_path) for argument in arguments]
    assert main([*filled, "--output", str(tmp_path / "eval"), "--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "eval" / "runs").exists()


def test_sweep_plans_one_run_per_combination(model_dir) -> None:
    assert parse_sweep(["strategy=downsample, c2f", "pruning.budget=256,1024"]) == {
        "strategies": ["downsample", "c2f"],
        "budgets": ["256", "1024"],
    }
    with pytest.raises(ConfigError, match="already swept"):
        parse_sweep(["budget=1", "pruning.budget=2"])
    config = EvaluateConfig(
        benchmark="synthetic", output="s3://bucket/eval", strategies=["downsample", "uhr-bat"], budgets=[256, 1024]
    )
    runs = plan_runs(config, load_model_config(model_dir), "s3://bucket/eval/questions.parquet")
    assert [run.label for run in runs] == ["downsample-b256", "downsample-b1024", "uhr-bat-b256", "uhr-bat-b1024"]
    for run in runs:
        assert run.output == f"s3://bucket/eval/runs/{run.label}" == run.config.output
        assert run.config.questions == "s3://bucket/eval/questions.parquet"
        assert (run.config.pruning.strategy.value, run.config.pruning.budget) == (run.strategy, run.budget)
    # Budgets that per-scale budgets cannot fit are refused before anything runs, naming the combination.
    fixed = EvaluateConfig(
        benchmark="synthetic", budgets=[256, 1024], vqa={"pruning": {"scale_budgets": [100, 100, 100, 400]}}
    )
    with pytest.raises(ConfigError, match="budget=256: pruning: .*exceeds budget=256"):
        plan_runs(fixed, load_model_config(model_dir), "q.parquet")


@pytest.mark.slow
def test_embedded_sample_archive_by_default(ray_local, tmp_path) -> None:
    """No --data for synthetic: the sample archive `make run` answers, with the default model."""
    output = str(tmp_path / "eval")
    assert main(["--benchmark", "synthetic", "--output", output, *FAST]) == 0
    report = json.loads((tmp_path / "eval" / REPORT_JSON).read_text())
    assert report["evaluation"]["data"] == sample_archive().root
    assert report["runs"][0]["answered"] == report["evaluation"]["items"] > 0


def test_overwrite_clears_every_file_an_evaluation_wrote(tmp_path) -> None:
    """Including the swap control's questions: a rerun without the control must not leave them behind."""
    output = tmp_path / "eval"
    (output / "runs" / "downsample-b64").mkdir(parents=True)
    for name in (ITEMS_NAME, QUESTIONS_NAME, SWAPPED_QUESTIONS_NAME, REPORT_JSON, REPORT_MD, REPORT_PLOT):
        (output / name).write_text("from the earlier evaluation")
    _prepare_output(EvaluateConfig(benchmark="synthetic", output=str(output), overwrite=True), {"model": "m"}, StorageConfig())
    assert sorted(path.name for path in output.iterdir()) == [SETTINGS_NAME]
