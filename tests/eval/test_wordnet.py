"""Offline WordNet 3.0 from Debian's packages, read by NLTK, for LRS-VQA's synonym rule."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import pytest
from nltk.corpus.reader.wordnet import WordNetCorpusReader

from uhr.eval.wordnet import (
    DATABASE_FILES,
    LEXNAMES,
    WordNetMissingError,
    are_synonyms,
    build_corpus,
    lexnames_text,
)

MAN_PAGE = Path("/usr/share/man/man5/lexnames.5WN.gz")


def test_lexnames_match_the_wordnet_man_page() -> None:
    if not MAN_PAGE.exists():
        pytest.skip("wordnet-base's lexnames(5WN) man page is not installed")
    # Table rows of the man page: "NN<TAB>name<TAB>description".
    rows = re.findall(r"^(\d\d)\t(\S+)\s*\t", gzip.decompress(MAN_PAGE.read_bytes()).decode(), flags=re.M)
    assert [(int(number), name) for number, name in rows] == list(enumerate(LEXNAMES))


def test_lexnames_file_has_number_name_and_syntactic_category() -> None:
    lines = lexnames_text().splitlines()
    assert len(lines) == 45
    assert lines[0] == "00\tadj.all\t3"
    assert lines[3] == "03\tnoun.Tops\t1"
    assert lines[29] == "29\tverb.body\t2"
    assert lines[2] == "02\tadv.all\t4"
    assert lines[44] == "44\tadj.ppl\t3"


def test_missing_database_names_the_install_command(tmp_path: Path) -> None:
    empty = tmp_path / "no-wordnet"
    empty.mkdir()
    with pytest.raises(WordNetMissingError, match="apt-get install .*wordnet-base wordnet-sense-index") as info:
        build_corpus(empty, tmp_path / "cache")
    assert "index.sense" in str(info.value)
    assert not (tmp_path / "cache" / "nltk_data" / "corpora" / "wordnet").exists()


def test_build_corpus_is_complete_and_reused(tmp_path: Path, wordnet: WordNetCorpusReader) -> None:
    source = Path(wordnet.root.path)  # a corpus built by the fixture serves as the source
    root = build_corpus(source, tmp_path)
    corpus = root / "corpora" / "wordnet"
    assert sorted(p.name for p in corpus.iterdir()) == sorted((*DATABASE_FILES, "lexnames"))
    assert not any(p.is_symlink() for p in corpus.iterdir())
    stamp = (corpus / "data.noun").stat().st_mtime_ns
    assert build_corpus(Path("/nonexistent"), tmp_path) == root  # complete: the source is not needed
    assert (corpus / "data.noun").stat().st_mtime_ns == stamp


def test_reader_is_wordnet_30(wordnet: WordNetCorpusReader) -> None:
    assert wordnet.get_version() == "3.0"
    assert wordnet.synset("dog.n.01").lexname() == "noun.animal"


@pytest.mark.parametrize(
    ("word1", "word2", "expected"),
    [
        ("grey", "gray", True),
        ("2", "two", True),
        ("one", "1", True),
        ("car", "automobile", True),
        ("cars", "automobile", True),  # NLTK lemmatises
        ("airplane", "aeroplane", True),
        ("ship", "boat", False),  # path similarity 0.33
        ("red", "blue", False),
        ("yes", "no", False),
        ("rural", "urban", False),
        ("gray.", "gray", False),  # no punctuation stripping
        ("small vehicle", "small vehicle", False),  # phrases with spaces are not WordNet lemmas
        ("", "yes", False),
    ],
)
def test_synonym_rule(wordnet: WordNetCorpusReader, word1: str, word2: str, expected: bool) -> None:
    assert are_synonyms(word1, word2, wordnet) is expected
