"""The driver benchmark measures the job's own planning steps on a table it can check by hand."""

from __future__ import annotations

from uhr.bench.plan import PlanBenchConfig, format_report, questions_table, run_plan_benchmark


def test_the_driver_benchmark_plans_the_table_it_describes():
    config = PlanBenchConfig(questions=400, done_fraction=0.5, questions_per_scene=8, multi_image_every=10)
    table = questions_table(config)
    # 50 scenes; the 40 questions with i % 10 == 1 are on pairs, all of them odd-numbered, so pending.
    assert table.num_rows == 400 and table["scene"][399].as_py() == "scenes/scene_0000049.tif"
    assert sum(extra is not None for extra in table["extra_scenes"].to_pylist()) == 40

    steps = run_plan_benchmark(config)
    assert [step.name for step in steps] == ["load_questions (CSV)", "load_questions (Parquet)", "make_plan", "input_dataset"]
    assert steps[0].result == steps[1].result == "400 rows"
    # Every other question done: 200 pending. Single-image groups: the 50 scenes. Pairs: question i
    # pairs scene i // 8 with later_(i // 80), 40 questions in 40 distinct (scene, later) groups.
    assert steps[2].result == "200 pending in 90 groups"
    assert steps[3].result == "90 blocks"
    assert all(step.seconds > 0 for step in steps)
    assert "| make_plan |" in format_report(steps, config)
