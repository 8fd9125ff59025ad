"""Fine-tune the model the VQA job serves, pruning in the loop: `python -m jobs.finetune [options] [key=value ...]`.

With no arguments it trains the default tiny model on the synthetic training split (made once in
the cache directory) with 2 workers on a local Ray, DeepSpeed ZeRO-2 over gloo, and writes
checkpoints and the final export under `./outputs/finetune/`. Serve the export with
`python -m jobs.vqa model=<export>`. On a cluster:

    ray job submit --working-dir . -- python -m jobs.finetune --config configs/train/cluster.yaml

Examples:

    python -m jobs.finetune --manifest s3://bucket/geollava/train.jsonl --model s3://bucket/models/base \\
        --output s3://bucket/runs scaling.num_workers=8 scaling.use_gpu=true deepspeed.offload_optimizer=true
    python -m jobs.finetune max_steps=20 pruning.strategy=geollava optimizer.vision_tower.train=true

Every field of `uhr.train.config.FinetuneConfig` can be set in the YAML file or as `key=value`
(dotted for sections: `optimizer.projector.lr=2e-5`, `data.max_length=4096`). Re-running the same
command resumes from the run's latest checkpoint; `--overwrite` starts afresh.
"""

from __future__ import annotations

import argparse
import logging
import sys

from uhr.cli import run_main
from uhr.config import config_yaml, load_config
from uhr.errors import UhrError
from uhr.storage import redact
from uhr.train import FinetuneConfig, run_finetune


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file with FinetuneConfig fields")
    parser.add_argument("--manifest", help="LLaVA conversation manifest: .json or .jsonl (local or s3://)")
    parser.add_argument("--image-root", help="prefix relative image paths resolve against (default: the manifest's directory)")
    parser.add_argument("--model", help="model to start from (default: the bundled default model)")
    parser.add_argument("--output", help="run storage for checkpoints (default outputs/finetune)")
    parser.add_argument("--export", help="where the final model goes (default <output>/<name>/export)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="delete the run's checkpoints and start afresh")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print every FinetuneConfig key with its value and description (YAML that --config reads back) and exit",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. max_steps=100")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse_args(argv)
    try:
        config = load_config(
            FinetuneConfig,
            args.config,
            args.overrides,
            data={"manifest": args.manifest, "image_root": args.image_root},
            model=args.model,
            output=args.output,
            export=args.export,
            overwrite=args.overwrite,
        )
        if args.print_config:
            print(config_yaml(config), end="")
            return 0
        summary = run_finetune(config)
    except UhrError as error:  # a bad config or input, storage or checkpoint that cannot be reached
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
