"""Scene-read benchmark: `python -m jobs.bench_read [--sizes 8192 32768] [--compress jpeg]`.

Prints a Markdown table: for each synthetic scene served by a local S3 API server, the time and
bytes of `read_view(672)` and of 16 random `read_window(336)` calls, and peak RSS per process.
Scenes are generated once and kept under bench/ in the uhr cache directory (~/.cache/uhr by default).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from uhr.scenes.benchmark import ReadBenchConfig, format_table, run_read_benchmark


def main(argv: list[str] | None = None) -> None:
    defaults = ReadBenchConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(defaults.sizes))
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--compress", choices=["jpeg", "deflate"], default=defaults.compress)
    parser.add_argument("--windows", type=int, default=defaults.windows)
    parser.add_argument("--cache-dir", type=Path, default=defaults.cache_dir)
    parser.add_argument("--no-local", action="store_true", help="skip the local-file comparison rows")
    args = parser.parse_args(argv)
    config = ReadBenchConfig(
        sizes=tuple(args.sizes),
        seed=args.seed,
        compress=args.compress,
        windows=args.windows,
        cache_dir=args.cache_dir,
        local=not args.no_local,
    )
    print(format_table(run_read_benchmark(config), config))


if __name__ == "__main__":
    main()
