"""Answer questions about every scene of an archive: `python -m jobs.vqa [options] [key=value ...]`.

With no arguments it answers the embedded sample archive (made once in the cache directory) with
the default model and writes `./outputs/vqa`. On a cluster:

    ray job submit --working-dir . -- python -m jobs.vqa --config configs/vqa/cluster.yaml

Examples:

    python -m jobs.vqa --scenes s3://bucket/archive/ --ask "How many ships are in the harbour?"
    python -m jobs.vqa --scenes s3://bucket/archive/ --questions s3://bucket/questions.parquet \\
        --output s3://bucket/answers/ pruning.strategy=c2f pruning.budget=512 encode.num_gpus=1

Every field of `uhr.pipeline.config.VqaConfig` can be set in the YAML file or as `key=value`
(dotted for sections: `pruning.uhr_bat.regions=32`, `encode.max_actors=8`). Re-running the same
command on the same output resumes; `--overwrite` starts afresh.
"""

from __future__ import annotations

import argparse
import logging
import sys

from uhr.cli import run_main
from uhr.config import config_yaml, load_config
from uhr.errors import UhrError
from uhr.pipeline import VqaConfig, run_vqa
from uhr.storage import redact


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.vqa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file with VqaConfig fields")
    parser.add_argument("--scenes", help="scene prefix (dir or s3://...) or a .txt file listing scene URIs")
    parser.add_argument("--questions", help="questions table: .parquet, .jsonl or .csv (question_id, scene, question[, choices, bbox, prompt, extra_scenes])")
    parser.add_argument("--ask", action="append", help="a question for every scene (repeatable; instead of --questions)")
    parser.add_argument("--output", help="output dataset URI (default outputs/vqa)")
    parser.add_argument("--model", help="model directory or URI (default: the bundled default model)")
    parser.add_argument("--overwrite", action="store_true", default=None, help="delete the output's rows and start afresh")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print every VqaConfig key with its value and description (YAML that --config reads back) and exit",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. pruning.budget=512")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse_args(argv)
    try:
        config = load_config(
            VqaConfig,
            args.config,
            args.overrides,
            scenes=args.scenes,
            questions=args.questions,
            ask=args.ask,
            output=args.output,
            model=args.model,
            overwrite=args.overwrite,
        )
        if args.print_config:
            print(config_yaml(config), end="")
            return 0
        summary = run_vqa(config)
    except UhrError as error:  # a bad config or input, storage or checkpoint that cannot be reached
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The rows computed so far are written and counted in the manifest; a rerun resumes.
        print("interrupted: the rows answered so far are written; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary.format())
    return 0 if summary.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
