"""Where uhr keeps what it derives once and reuses: model copies, sample archives, WordNet, benchmark images."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """`$UHR_CACHE_DIR`, else `$XDG_CACHE_HOME/uhr`, else `~/.cache/uhr`."""
    if os.environ.get("UHR_CACHE_DIR"):
        return Path(os.environ["UHR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uhr"
