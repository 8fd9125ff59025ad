"""Model benchmark: `python -m jobs.bench_model [--strategies ...] [--questions 8] [--repeats 1]`.

Prints Markdown tables: per pruning strategy on a synthetic 8192^2 scene, with a tiny model that has
CLIP's real tile geometry, the dense and kept visual tokens, encode / select / answer times on this
machine and the cost of 8 questions against 1; then the same work priced at real sizes (CLIP
ViT-L/14-336 + Qwen2-7B) in TFLOPs and estimated A100 / H100 seconds, next to published figures,
and uhr-bat's CPU-side k-means timed at the real tower width.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uhr.bench.model import ModelBenchConfig, format_report, run_model_benchmark
from uhr.model.pruning import StrategyName


def main(argv: list[str] | None = None) -> None:
    defaults = ModelBenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=defaults.size)
    parser.add_argument("--scene-seed", type=int, default=defaults.scene_seed)
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=[s.value for s in StrategyName],
        default=[s.value for s in defaults.strategies],
    )
    parser.add_argument("--questions", type=int, default=defaults.questions)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens)
    parser.add_argument("--cache-dir", type=Path, default=defaults.cache_dir)
    args = parser.parse_args(argv)
    config = ModelBenchConfig(
        size=args.size,
        scene_seed=args.scene_seed,
        strategies=args.strategies,
        questions=args.questions,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        prompt_tokens=args.prompt_tokens,
        cache_dir=args.cache_dir,
    )
    print(format_report(run_model_benchmark(config), config))


if __name__ == "__main__":
    main()
