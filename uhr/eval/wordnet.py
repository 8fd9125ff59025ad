"""Offline WordNet 3.0 for the LRS-VQA synonym rule, read by NLTK from the Debian packages.

LRS-VQA counts an answer as correct when some WordNet synset of the truth and some synset of the
answer have path similarity > 0.8 (NLTK's WordNet 3.0). Nothing may be downloaded at run time, so
the database comes from Debian's `wordnet-base` and `wordnet-sense-index` packages, which install
WordNet 3.0 in `/usr/share/wordnet`. NLTK's reader needs three things that directory lacks:

* a `lexnames` file (number, lexicographer file name, syntactic category 1-4, tab-separated) —
  written here from `LEXNAMES`, the table of the lexnames(5WN) man page;
* a corpus root inside one of NLTK's data directories (`nltk.data.path`): NLTK refuses others;
* regular files, not symlinks to elsewhere: NLTK refuses paths that leave the corpus root.

So `build_corpus` copies the database into `<cache>/nltk_data/corpora/wordnet/` once (about
33 MB) and `load_wordnet` registers `<cache>/nltk_data` with NLTK and reads it (a few seconds).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import nltk
from nltk.corpus.reader.wordnet import WordNetCorpusReader

from uhr.cache import default_cache_dir

DEFAULT_SOURCE_DIR = Path("/usr/share/wordnet")
INSTALL_COMMAND = "apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index"
WORDNET_VERSION = "3.0"
# LRS-VQA's threshold: > 0.8 path similarity means the two synsets are the same one.
SYNONYM_PATH_SIMILARITY = 0.8

# The 45 lexicographer files of WordNet 3.0, in file-number order (lexnames(5WN)).
LEXNAMES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
)  # fmt: skip
# The third lexnames column: the syntactic category, also the prefix of the file name.
_SYNTACTIC_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

# What NLTK's reader opens, apart from `lexnames` (written here); `index.sense` is the one file
# that comes from `wordnet-sense-index`, all others from `wordnet-base`.
DATABASE_FILES: tuple[str, ...] = tuple(name for name in WordNetCorpusReader._FILES if name != "lexnames")


class WordNetMissingError(FileNotFoundError):
    """The WordNet database is not installed where uhr looks for it."""


def lexnames_text() -> str:
    """The `lexnames` file NLTK expects: "NN<TAB>name<TAB>category" per line."""
    return "".join(
        f"{number:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split('.')[0]]}\n" for number, name in enumerate(LEXNAMES)
    )


def _check_source(source_dir: Path) -> None:
    missing = [name for name in DATABASE_FILES if not (source_dir / name).is_file()]
    if missing:
        raise WordNetMissingError(
            f"WordNet {WORDNET_VERSION} is not installed in {source_dir} (missing: {', '.join(missing)}). "
            f"The LRS-VQA scorer needs it offline; install it with `{INSTALL_COMMAND}` "
            "(as root, after `apt-get update`), or pass the directory that holds the database."
        )


def build_corpus(source_dir: Path = DEFAULT_SOURCE_DIR, cache_dir: Path | None = None) -> Path:
    """Make `<cache_dir>/nltk_data/corpora/wordnet/` from `source_dir`; return `<cache_dir>/nltk_data`.

    Copies the database files and writes `lexnames`, once: a complete corpus directory is reused.
    The directory is assembled beside its final place and renamed into it, so concurrent workers
    never see half a corpus. Raises `WordNetMissingError` (with the install command) when the
    database is not in `source_dir`.
    """
    source_dir = Path(source_dir)
    data_root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "nltk_data"
    corpus_dir = data_root / "corpora" / "wordnet"
    wanted = (*DATABASE_FILES, "lexnames")
    if all((corpus_dir / name).is_file() for name in wanted):
        return data_root
    _check_source(source_dir)
    corpus_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".wordnet-", dir=corpus_dir.parent))
    try:
        for name in DATABASE_FILES:
            # copyfile, not copy2: the copies belong to this user with default permissions,
            # which NLTK requires of the files it reads.
            shutil.copyfile(source_dir / name, staging / name)
        (staging / "lexnames").write_text(lexnames_text(), encoding="utf-8")
        staging.chmod(0o755)
        if corpus_dir.exists():
            shutil.rmtree(corpus_dir)  # an incomplete corpus left by an interrupted build
        os.replace(staging, corpus_dir)
    except OSError:
        if all((corpus_dir / name).is_file() for name in wanted):
            return data_root  # another process finished the same build first
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return data_root


@functools.lru_cache(maxsize=4)
def load_wordnet(source_dir: Path = DEFAULT_SOURCE_DIR, cache_dir: Path | None = None) -> WordNetCorpusReader:
    """NLTK's WordNet 3.0 reader over the offline database (built by `build_corpus`; cached per process)."""
    data_root = build_corpus(Path(source_dir), cache_dir)
    if str(data_root) not in nltk.data.path:
        nltk.data.path.append(str(data_root))
    with warnings.catch_warnings():
        # "The multilingual functions are not available": no Open Multilingual Wordnet, by design.
        warnings.simplefilter("ignore", UserWarning)
        reader = WordNetCorpusReader(str(data_root / "corpora" / "wordnet"), None)
    version = reader.get_version()
    if version != WORDNET_VERSION:
        raise ValueError(
            f"LRS-VQA is scored with WordNet {WORDNET_VERSION}, but {source_dir} holds WordNet {version}"
        )
    return reader


def are_synonyms(word1: str, word2: str, wordnet: WordNetCorpusReader) -> bool:
    """True iff some synset of `word1` and some synset of `word2` have path similarity > 0.8.

    Words are looked up as given (NLTK lower-cases and lemmatises them: "gray"/"grey",
    "2"/"two", "cars"/"automobile" match; "ship"/"boat" do not). Text WordNet does not know,
    such as "" or multi-word phrases with spaces, has no synsets and matches nothing.
    """
    synsets2 = wordnet.synsets(word2)
    for synset1 in wordnet.synsets(word1):
        for synset2 in synsets2:
            similarity = synset1.path_similarity(synset2)
            if similarity is not None and similarity > SYNONYM_PATH_SIMILARITY:
                return True
    return False
