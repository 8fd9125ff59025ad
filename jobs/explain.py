"""Show what the model looked at: `python -m jobs.explain --scene URI --question TEXT [options] [key=value ...]`.

Runs one pruning strategy on one scene for one question, as the VQA job would, and writes a PNG: the
scene with every kept visual token's box filled in its scale's colour (merged tokens outlined with
the box of their members), a legend with the tokens per scale and the kept/dense counts, and the
question and the model's answer in the title. With `--extra-scene` (repeatable) the question is
asked of several images in order, as the VQA job asks a question with `extra_scenes`: each image is
pruned on its own and gets its own PNG (`--out pair.png` writes pair.png and pair-2.png).

Examples:

    python -m jobs.explain --scene s3://bucket/archive/scene.tif --question "How many ships are in the harbour?" \\
        --strategy uhr-bat --budget 1024 --out ships.png
    python -m jobs.explain --scene scene.tif --question "Is the road flooded?" --strategy c2f \\
        --model /models/longva pruning.c2f.keep_ratio=0.1 view_side=2048
    python -m jobs.explain --scene before.tif --extra-scene after.tif --choice "(A) 1" --choice "(B) 2" \\
        --question "How many new buildings appeared?" --out change.png

Every field of `uhr.explain.ExplainConfig` can be set in a `--config` YAML or as `key=value` (dotted
for sections: `pruning.uhr_bat.regions=32`).
"""

from __future__ import annotations

import argparse
import sys

from uhr.cli import run_main
from uhr.config import load_config
from uhr.errors import UhrError
from uhr.explain import ExplainConfig, describe, run_explain
from uhr.storage import redact


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.explain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML file with ExplainConfig fields")
    parser.add_argument("--scene", help="scene URI (local path or s3://...)")
    parser.add_argument(
        "--extra-scene", action="append", dest="extra_scenes", help="a further image of the question, in order (repeatable)"
    )
    parser.add_argument("--question", help="the question")
    parser.add_argument("--choice", action="append", dest="choices", help="a lettered option '(A) ...' (repeatable)")
    parser.add_argument("--strategy", help="pruning strategy: none, downsample, geollava, uhr-bat or c2f")
    parser.add_argument("--budget", type=int, help="visual-token budget")
    parser.add_argument("--model", help="model directory or URI (default: the bundled default model)")
    parser.add_argument("--out", help="PNG path or URI (default explain.png)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. pruning.c2f.keep_ratio=0.1")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(
            ExplainConfig,
            args.config,
            args.overrides,
            scene=args.scene,
            extra_scenes=args.extra_scenes,
            question=args.question,
            choices=args.choices,
            model=args.model,
            out=args.out,
            pruning={"strategy": args.strategy, "budget": args.budget},
        )
        drawn = run_explain(config)
    except (UhrError, ValueError, FileNotFoundError) as error:
        # Bad input (a missing scene, a budget the strategy cannot meet, ...): one line, no traceback.
        print(f"error: {redact(str(error))}", file=sys.stderr)
        return 2
    print(describe([explanation for explanation, _ in drawn], config.out))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
