"""Fixtures of the evaluation tests."""

from __future__ import annotations

import pytest
from nltk.corpus.reader.wordnet import WordNetCorpusReader

from uhr.eval.wordnet import DEFAULT_SOURCE_DIR, load_wordnet


@pytest.fixture(scope="session")
def wordnet(tmp_path_factory: pytest.TempPathFactory) -> WordNetCorpusReader:
    """WordNet 3.0 from the Debian packages, built into a session cache (a few seconds, once)."""
    return load_wordnet(DEFAULT_SOURCE_DIR, tmp_path_factory.mktemp("uhr-cache"))
