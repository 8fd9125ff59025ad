"""Driver benchmark: `python -m jobs.bench_plan [--questions 1000000] [--done-fraction 0.5]`.

Prints a Markdown table: the time and the driver's memory growth of reading a synthetic questions
table (CSV and Parquet), planning it with part of it done, and making the job's input dataset.
"""

from __future__ import annotations

import argparse

from uhr.bench.plan import PlanBenchConfig, format_report, run_plan_benchmark


def main(argv: list[str] | None = None) -> None:
    defaults = PlanBenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=defaults.questions)
    parser.add_argument("--done-fraction", type=float, default=defaults.done_fraction)
    parser.add_argument("--questions-per-scene", type=int, default=defaults.questions_per_scene)
    parser.add_argument("--multi-image-every", type=int, default=defaults.multi_image_every)
    args = parser.parse_args(argv)
    config = PlanBenchConfig(
        questions=args.questions,
        done_fraction=args.done_fraction,
        questions_per_scene=args.questions_per_scene,
        multi_image_every=args.multi_image_every,
    )
    print(format_report(run_plan_benchmark(config), config))


if __name__ == "__main__":
    main()
