"""What the jobs' command lines share: an error no job handles still leaves no credential on the screen."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from uhr.storage import redact


def run_main(main: Callable[[], int]) -> int:
    """Run a job's `main` and return its exit code.

    An exception `main` lets through (a bug, a worker's failure) prints its traceback with
    credentials masked, since a signed URL or key may sit in any message of the chain, and gives
    exit code 1. Ctrl-C is left to `main` and Python.
    """
    try:
        return main()
    except Exception as error:
        print(redact("".join(traceback.format_exception(error))), file=sys.stderr, end="")
        return 1


__all__ = ["run_main"]
