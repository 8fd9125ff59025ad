"""Fine-tuning benchmark: `python -m jobs.bench_train [--strategies ...] [--steps 4] [--batch-size 4]`.

Prints Markdown tables: per pruning strategy, samples/s per worker when `run_finetune` trains the
tiny model of the training tests (or `--model`) on the synthetic training split with 2 workers on
a local Ray (DeepSpeed ZeRO-2 over gloo), steady state after each worker's first optimizer step;
the optimizer state each rank holds under ZeRO-2 against ZeRO-0; then the per-GPU memory of
CLIP ViT-L/14-336 + Qwen2-7B under ZeRO-2 on 8 GPUs, with and without CPU optimizer offload, with
its calculation. Checkpoints and exports go under bench/train-runs/ and the tiny model under
bench/models/ in the uhr cache directory (~/.cache/uhr by default), replaced on each run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uhr.bench.train import TrainBenchConfig, format_report, run_train_benchmark
from uhr.model.pruning import StrategyName


def main(argv: list[str] | None = None) -> None:
    defaults = TrainBenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=[s.value for s in StrategyName],
        default=[s.value for s in defaults.strategies],
    )
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch per step")
    parser.add_argument("--num-workers", type=int, default=defaults.num_workers)
    parser.add_argument(
        "--zero0-strategy",
        choices=[s.value for s in StrategyName],
        default=None,
        help="strategy of the ZeRO-0 comparison run (default: the model's default strategy)",
    )
    parser.add_argument("--model", help="model to fine-tune (default: the tiny model, saved once in the cache dir)")
    parser.add_argument("--gpus", type=int, default=defaults.sizing.gpus, help="GPUs of the real-size estimate")
    parser.add_argument("--cache-dir", type=Path, default=defaults.cache_dir)
    args = parser.parse_args(argv)
    config = TrainBenchConfig(
        strategies=args.strategies,
        steps=args.steps,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        model=args.model,
        zero0_strategy=args.zero0_strategy,
        sizing={"gpus": args.gpus},
        cache_dir=args.cache_dir,
    )
    print(format_report(run_train_benchmark(config)))


if __name__ == "__main__":
    main()
