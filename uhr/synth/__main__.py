"""Command line: write a synthetic UHR archive.

    python -m uhr.synth --out s3://bucket/synth-test --scenes 4 --size 8192 --seed 0
    python -m uhr.synth --out data/synth-train --scenes 200 --size 1024 --seed 1 --split train
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from uhr.synth.archive import SPLITS, write_archive
from uhr.synth.scene import Compression


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the archive, print what was written (JSON)."""
    parser = argparse.ArgumentParser(prog="python -m uhr.synth", description="Write a synthetic UHR archive.")
    parser.add_argument("--out", required=True, help="archive root: a local directory or s3://bucket/prefix")
    parser.add_argument("--scenes", type=int, required=True, help="number of scenes")
    parser.add_argument("--size", type=int, required=True, help="side of each square scene in pixels")
    parser.add_argument("--seed", type=int, required=True, help="archive seed (>= 0)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="'train' also writes train.jsonl")
    parser.add_argument("--dtype", choices=("uint8", "uint16"), default="uint8")
    parser.add_argument("--bands", type=int, choices=(1, 3, 4), default=3, help="1 pan, 3 RGB, 4 RGB + NIR")
    parser.add_argument("--questions", type=int, default=12, help="questions per scene")
    parser.add_argument("--open-fraction", type=float, default=0.25, help="share of open-answer questions")
    parser.add_argument("--compress", choices=[c.value for c in Compression], default=Compression.DEFLATE.value)
    parser.add_argument(
        "--evidence-window",
        type=int,
        default=None,
        metavar="PX",
        help="'train' only: also train each question with evidence on a window of at least PX pixels around it",
    )
    parser.add_argument(
        "--object-captions",
        type=int,
        default=None,
        metavar="PX",
        help="'train' only: also a conversation per object listing the objects a window of at least PX pixels around it shows",
    )
    parser.add_argument(
        "--no-small-on-whole-scene",
        dest="small_on_whole_scene",
        action="store_false",
        help="'train' only: ask questions about small objects on their evidence window only, not on the whole scene",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        index = write_archive(
            args.out,
            scenes=args.scenes,
            size=args.size,
            seed=args.seed,
            split=args.split,
            dtype=args.dtype,
            bands=args.bands,
            questions_per_scene=args.questions,
            open_fraction=args.open_fraction,
            compress=args.compress,
            evidence_window=args.evidence_window,
            object_captions=args.object_captions,
            small_on_whole_scene=args.small_on_whole_scene,
        )
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(index.to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
