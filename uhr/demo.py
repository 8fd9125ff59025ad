"""The demo model: the data it is trained and judged on, and the untrained model `jobs.finetune` starts from.

`python -m uhr.demo` writes, under `outputs/demo/` (or `--root`):

    train/      synthetic training split (scenes, questions, train.jsonl): `TRAIN` settings
    test/       synthetic held-out benchmark, other scenes of another seed: `TEST` settings
    init/       the untrained model: a byte-level BPE tokenizer trained on the training prompts and
                answers, a small CLIP tower and a small Qwen2 LM (`DEMO_VISION`, `DEMO_TEXT`)

and prints the benchmark's image-blind baselines (`blind_baselines`), what a model must beat to
show that it reads the pixels.

Then `python -m jobs.finetune --config configs/train/demo.yaml` trains `init/` on `train/` and
exports the result; the shipped copy lives in `uhr/assets/demo-model/`
(`uhr.pipeline.defaults.DEMO_MODEL_DIR`, the default model of the jobs).
Everything is deterministic from the constants below.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.feature_extraction import DictVectorizer

from uhr.model import save_model
from uhr.model.config import UhrConfig
from uhr.model.modeling import UhrForConditionalGeneration
from uhr.model.tokenizer import build_tokenizer
from uhr.synth import ArchiveIndex, cached_archive

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class ArchiveSettings:
    """How one synthetic split of the demo is written (`uhr.synth.write_archive` arguments)."""

    scenes: int
    size: int
    seed: int
    split: str
    questions_per_scene: int
    open_fraction: float
    referents: str
    option_order: str
    evidence_window: int | None = None
    object_captions: int | None = None
    small_on_whole_scene: bool = True


# Training and test use different seeds (and splits), so they share no scene. Objects are named by
# what makes them unique in the scene, not by pixel boxes, and options come in a fixed order per
# category: a model trained from scratch in an hour learns what the pixels show, but neither to
# read coordinates nor to match an option's text to its letter (it answers one fixed letter when
# asked XLRS's shuffled region questions). The benchmark is multiple choice, scored by the letter;
# training also asks a share of the questions open, so the answer words are learnt as well.
# Each question with evidence is asked a second time on a window around it (at least 64 px, the
# side of the downsampled view, so small evidence is seen at full resolution): on the whole-scene
# view alone a 32-px object is 2 px and the model learns to answer from the question's words.
# Each object is also captioned on a 64-px window around it ("yellow ship, red car"): the questions
# name a colour in a yes or a letter, too sparse a signal for a tower learning colour from scratch.
TRAIN = ArchiveSettings(
    scenes=192, size=1024, seed=101, split="train", questions_per_scene=20, open_fraction=0.3,
    referents="scene", option_order="fixed", evidence_window=64, object_captions=64,
)
TEST = ArchiveSettings(
    scenes=32, size=1024, seed=202, split="test", questions_per_scene=16, open_fraction=0.0,
    referents="scene", option_order="fixed",
)

TOKENIZER_VOCAB = 1024
MODEL_SEED = 0
# 32-px tiles of 4-px patches (8 x 8 tokens a tile), as the tiny tower of the tests, a bit wider.
DEMO_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 4,
}
DEMO_TEXT = {
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
# LLaVA-NeXT's default grids scaled to 32-px tiles.
DEMO_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
# Scales for 1024-px scenes: a 64-px anchor (16 x 16 tokens) up to a quarter of the resolution
# (16 px a token, 4x finer than downsample's 64-px view at budget 256; the tower costs 5x less
# than with a 512-px scale); c2f starts from 128 px and zooms to full resolution.
DEMO_PRUNING_DEFAULTS = {
    "strategy": "uhr-bat",
    "budget": 256,
    "scales": [64, 128, 256],
    "c2f": {"base_side": 128},
    "uhr_bat": {"regions": 16},
}


def write_split(root: Path, settings: ArchiveSettings) -> ArchiveIndex:
    """Write one split under `root` (once: an existing `index.json` is reused)."""
    return cached_archive(root, **asdict(settings))


def training_corpus(train_jsonl: Path) -> list[str]:
    """Every prompt and answer of a training manifest: what the demo tokenizer is trained on."""
    texts: list[str] = []
    with open(train_jsonl, encoding="utf-8") as handle:
        for line in handle:
            texts.extend(turn["value"].replace("<image>", "") for turn in json.loads(line)["conversations"])
    return texts


def build_demo_model(corpus: list[str], *, seed: int = MODEL_SEED) -> UhrForConditionalGeneration:
    """The untrained demo model with its tokenizer attached (trained on `corpus`), identical for identical inputs."""
    tokenizer = build_tokenizer(corpus, vocab_size=TOKENIZER_VOCAB)
    text = {
        **DEMO_TEXT,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    config = UhrConfig(
        vision_config=dict(DEMO_VISION),
        text_config=text,
        image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=DEMO_PINPOINTS,
        tile_batch_size=64,
        pruning_defaults=DEMO_PRUNING_DEFAULTS,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UhrForConditionalGeneration(config)
    model.attach_tokenizer(tokenizer)
    return model.eval()


def prepare(root: Path) -> dict[str, str]:
    """Write the training split, the held-out benchmark and the untrained model under `root`."""
    train = write_split(root / "train", TRAIN)
    test = write_split(root / "test", TEST)
    init = root / "init"
    untrained_model(init, training_corpus(Path(train.train_jsonl)))
    return {"train": str(Path(train.train_jsonl)), "test": test.root, "init": str(init)}


def untrained_model(init: Path, corpus: list[str]) -> None:
    """Save `build_demo_model(corpus)` to `init`, unless it holds the model of this very corpus and
    architecture already.

    The tokenizer is trained on the corpus, so a model saved for another training split (older
    settings or generator) or other architecture constants is built again rather than reused.
    """
    architecture = json.dumps([DEMO_VISION, DEMO_TEXT, DEMO_PINPOINTS, DEMO_PRUNING_DEFAULTS, TOKENIZER_VOCAB], sort_keys=True)
    stamp = {
        "corpus_sha256": hashlib.sha256("\0".join(corpus).encode()).hexdigest(),
        "architecture_sha256": hashlib.sha256(architecture.encode()).hexdigest(),
        "seed": MODEL_SEED,
    }
    built_from = init / "built_from.json"
    if built_from.exists() and json.loads(built_from.read_text()) == stamp:
        return
    if init.exists():
        logger.info("building the untrained demo model again at %s: its training corpus or architecture changed", init)
        shutil.rmtree(init)
    save_model(build_demo_model(corpus), init)
    built_from.write_text(json.dumps(stamp))
    logger.info("saved the untrained demo model to %s", init)


def blind_baselines(train: list[dict], test: list[dict]) -> dict[str, dict[str, float]]:
    """What answering without the image scores on `test`'s multiple-choice questions, overall and on small objects.

    `chance`: the expected accuracy of a uniform guess (1 / options). `prior`: always the letter the
    training questions of the same category most often have. `text`: the letter the training
    questions with the same wording and options most often have (the category's prior for a wording
    never seen): what a model that memorises the text alone scores. `learned`: a gradient-boosted
    classifier fitted on the training questions' words, option texts and count-option spacing,
    predicting the letter: what a model can learn from the text alone where it generalises across
    wordings (it is how a review found the count options and presence wordings of an earlier
    generator pointing at their answers). Questions are rows of an archive's `questions.jsonl`.
    """
    letters: dict[str, Counter] = defaultdict(Counter)
    by_text: dict[tuple[str, tuple[str, ...]], Counter] = defaultdict(Counter)
    for question in train:
        if question["choices"]:
            letters[question["category"]][question["answer"]] += 1
            by_text[question["question"], tuple(question["choices"])][question["answer"]] += 1

    def prior(question: dict) -> str | None:
        counts = letters.get(question["category"])
        return counts.most_common(1)[0][0] if counts else None

    def text(question: dict) -> str | None:
        counts = by_text.get((question["question"], tuple(question["choices"])))
        return counts.most_common(1)[0][0] if counts else prior(question)

    asked = [q for q in test if q["choices"]]
    learned = _text_classifier([q for q in train if q["choices"]])
    guesses = learned(asked) if learned and asked else [None] * len(asked)
    report = {}
    for subset in ("overall", "small"):
        rows = [(q, guess) for q, guess in zip(asked, guesses) if subset == "overall" or q["small"]]
        if not rows:
            continue
        report[subset] = {
            "questions": len(rows),
            "chance": sum(1 / len(q["choices"]) for q, _ in rows) / len(rows),
            "prior": sum(q["answer"] == prior(q) for q, _ in rows) / len(rows),
            "text": sum(q["answer"] == text(q) for q, _ in rows) / len(rows),
            "learned": sum(q["answer"] == guess for q, guess in rows) / len(rows),
        }
    return report


def _text_features(question: dict) -> dict[str, float]:
    """What an image-blind model sees of a multiple-choice question: its words, its options and, for
    counts, their values and spacing."""
    features = {f"category={question['category']}": 1.0}
    features.update((f"word={word}", 1.0) for word in re.findall(r"[a-z]+", question["question"].lower()))
    options = [choice[4:] for choice in question["choices"]]
    features.update((f"option{k}={text}", 1.0) for k, text in enumerate(options))
    if all(text.isdigit() for text in options):
        values = [int(text) for text in options]
        features.update((f"value{k}", float(v)) for k, v in enumerate(values))
        features.update((f"gap{k}", float(b - a)) for k, (a, b) in enumerate(zip(values, values[1:])))
    return features


def _text_classifier(train: list[dict]) -> Callable[[list[dict]], list[str]] | None:
    """A letter predictor fitted on `train`'s multiple-choice questions (None with fewer than two answers)."""
    if len({q["answer"] for q in train}) < 2:
        return None
    vectorizer = DictVectorizer(sparse=False)
    features = vectorizer.fit_transform([_text_features(q) for q in train])
    # A leaf holds at least 20 questions: a rule must hold for many of them to count.
    classifier = HistGradientBoostingClassifier(min_samples_leaf=20, random_state=0).fit(features, [q["answer"] for q in train])
    return lambda questions: list(classifier.predict(vectorizer.transform([_text_features(q) for q in questions])))


def _questions(root: Path) -> list[dict]:
    with open(root / "questions.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def main(argv: list[str] | None = None) -> int:
    """Command line: prepare the demo's data and untrained model; print where they are and the benchmark's blind baselines (JSON)."""
    parser = argparse.ArgumentParser(prog="python -m uhr.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="outputs/demo", help="directory for train/, test/ and init/ (default outputs/demo)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    root = Path(args.root)
    paths = prepare(root)
    baselines = blind_baselines(_questions(root / "train"), _questions(root / "test"))
    print(json.dumps({**paths, "blind_baselines": baselines}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
