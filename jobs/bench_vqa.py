"""VQA job benchmark: `python -m jobs.bench_vqa [--scenes 4] [--questions 4] [--strategies ...] [--no-rss]`.

Prints Markdown tables: `run_vqa` against a local S3 server on synthetic 8192^2 scenes, per strategy
(throughput, visual tokens, bytes read over object bytes, Ray Data's operator times and stage
overlap), a naive baseline on the same work, and the peak RSS of the Ray
worker processes on one 32768^2 scene; then each figure against its target. Scenes and the tiny
model are generated once and kept under bench/ in the uhr cache directory (~/.cache/uhr by default).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uhr.bench.vqa import VqaBenchConfig, format_report, run_vqa_benchmark
from uhr.model.pruning import StrategyName

STRATEGIES = [s.value for s in StrategyName]


def main(argv: list[str] | None = None) -> None:
    defaults = VqaBenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=defaults.scenes)
    parser.add_argument("--questions", type=int, default=defaults.questions, help="questions per scene")
    parser.add_argument("--size", type=int, default=defaults.size)
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=[s.value for s in defaults.strategies])
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--num-cpus", type=int, default=defaults.num_cpus, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--baseline-side", type=int, default=defaults.baseline_side)
    parser.add_argument("--no-baseline", action="store_true", help="skip the naive baseline")
    parser.add_argument("--rss-size", type=int, default=defaults.rss_size)
    parser.add_argument(
        "--rss-strategies", nargs="+", choices=STRATEGIES, default=[s.value for s in defaults.rss_strategies]
    )
    parser.add_argument("--no-rss", action="store_true", help="skip the worker-memory runs on the large scene")
    parser.add_argument("--cache-dir", type=Path, default=defaults.cache_dir)
    args = parser.parse_args(argv)
    config = VqaBenchConfig(
        scenes=args.scenes,
        questions=args.questions,
        size=args.size,
        strategies=args.strategies,
        max_new_tokens=args.max_new_tokens,
        num_cpus=args.num_cpus,
        baseline=not args.no_baseline,
        baseline_side=args.baseline_side,
        rss_size=None if args.no_rss else args.rss_size,
        rss_strategies=args.rss_strategies,
        cache_dir=args.cache_dir,
    )
    print(format_report(run_vqa_benchmark(config)))


if __name__ == "__main__":
    main()
