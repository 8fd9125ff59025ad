"""Where uhr keeps what it derives once and reuses: model copies, sample archives, WordNet, benchmark images."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def default_cache_dir() -> Path:
    """`$UHR_CACHE_DIR`, else `$XDG_CACHE_HOME/uhr`, else `~/.cache/uhr`."""
    if os.environ.get("UHR_CACHE_DIR"):
        return Path(os.environ["UHR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uhr"


@contextmanager
def creating(path: Path) -> Iterator[None]:
    """Serialise the processes that create `path` in the cache (two jobs started at once must not
    write it twice): an exclusive lock on `<path>.lock` for the duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
