"""Score pruning strategies on a benchmark: `python -m jobs.evaluate --benchmark NAME [--data URI] [key=value ...]`.

The benchmark's questions go through the VQA job (same Ray Data pipeline, strategies and budgets),
each with the benchmark's own prompt, once per strategy and budget of the sweep; the runs are scored
by the benchmark's own rules. Outputs under `--output`: per-item Parquet (`items.parquet`),
`report.json`, `report.md`, `accuracy_vs_tokens.png`, and each run's answers under `runs/`.

Examples:

    python -m jobs.evaluate --benchmark synthetic                       # the embedded sample archive
    python -m jobs.evaluate --benchmark synthetic --data s3://bucket/archive model=s3://bucket/model pruning.budget=256
    python -m jobs.evaluate --benchmark xlrs --data /data/XLRS-Bench-lite --config configs/vqa/uhr-bat-xlrs.yaml
    python -m jobs.evaluate --benchmark lrs-vqa --data /data/LRS_VQA/LRS_VQA_merged.jsonl --output s3://bucket/eval/lrs \\
        encode.num_gpus=1 precision=bfloat16 --sweep strategy=downsample,geollava,uhr-bat,c2f budget=256,1024

Model, storage, pruning, actor pools and generation are the VQA job's settings (`uhr.pipeline.config.VqaConfig`):
a `--config` YAML (the `configs/vqa/*.yaml` presets work as they are) and `key=value` overrides. The
evaluation sets each run's questions and output itself. `--sweep` takes strategy=... and budget=...
(comma-separated); put other overrides before it. `--swap-control` adds an image-blind control: the
first combination again with every item asked about another scene's image. Re-running the same command resumes every run;
`--overwrite` starts afresh.
"""

from __future__ import annotations

import argparse
import logging
import sys

from uhr.cli import run_main
from uhr.config import load_config
from uhr.errors import UhrError
from uhr.eval.benchmarks import BenchmarkFormatError
from uhr.eval.run import BENCHMARK_ALIASES, EvaluateConfig, parse_sweep, run_evaluation
from uhr.pipeline import VqaConfig
from uhr.storage import redact


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--benchmark", required=True, metavar="NAME", help=f"one of {', '.join(BENCHMARK_ALIASES)}")
    parser.add_argument("--data", help="benchmark data URI (default for synthetic: the embedded sample archive)")
    parser.add_argument("--image-root", help="folder relative image paths resolve against (LRS-VQA, MME-RealWorld)")
    parser.add_argument("--image-dir", help="where XLRS-Bench's embedded images are written out")
    parser.add_argument("--mme-prompt", choices=["lrs-vqa", "official"], help="MME-RealWorld prompt (default lrs-vqa)")
    parser.add_argument("--output", help="evaluation output URI (default outputs/eval)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N items")
    parser.add_argument("--overwrite", action="store_true", default=None, help="delete the output and start afresh")
    parser.add_argument(
        "--swap-control",
        action="store_true",
        default=None,
        help="also ask every item with another scene's image (first sweep combination): does the model read the pixels?",
    )
    parser.add_argument("--config", help="YAML file with VqaConfig fields (model, pruning, pools, ...)")
    parser.add_argument("--model", help="model directory or URI (default: the bundled default model)")
    parser.add_argument("--sweep", nargs="+", default=[], metavar="AXIS=V1,V2", help="strategy=a,b and/or budget=n1,n2")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="VqaConfig overrides, e.g. pruning.budget=512")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse_args(argv)
    try:
        vqa = load_config(VqaConfig, args.config, args.overrides, model=args.model)
        config = load_config(
            EvaluateConfig,
            benchmark=args.benchmark,
            data=args.data,
            image_root=args.image_root,
            image_dir=args.image_dir,
            mme_prompt=args.mme_prompt,
            output=args.output,
            limit=args.limit,
            overwrite=args.overwrite,
            swap_control=args.swap_control,
            vqa=vqa,
            **parse_sweep(args.sweep),
        )
        result = run_evaluation(config)
    except (UhrError, BenchmarkFormatError, FileNotFoundError) as error:
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 2
    print(result.format())
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
