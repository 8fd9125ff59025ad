"""The shipped demo model: its files, loading it as the jobs do, and answering scenes through the VQA stages.

The scenes are fresh synthetic ones (the sample archive's first scene, and a small archive of
another seed than the demo's training and benchmark splits), answered by the VQA job's own read and
encode stages (`read_scene`, `EncodeStage`), the code its Ray actors run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from uhr.demo import DEMO_PRUNING_DEFAULTS, TEST, TRAIN, blind_baselines, untrained_model
from uhr.model import load_model, load_model_config
from uhr.model.modeling import UhrForConditionalGeneration
from uhr.model.pruning.config import PruningConfig
from uhr.pipeline.config import VqaConfig
from uhr.pipeline.defaults import DEMO_MODEL_DIR, SAMPLE_QUESTIONS, SAMPLE_SEED, SAMPLE_SIZE, default_model
from uhr.pipeline.stages import EncodeStage, read_scene
from uhr.pipeline.vqa import resolve_pruning
from uhr.scenes.normalize import NormalizeConfig
from uhr.storage import StorageConfig
from uhr.synth import write_archive
from uhr.synth.questions import LETTERS

MAX_WEIGHT_BYTES = 25 * 2**20
TRAINING_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "train" / "demo.yaml"
# A seed neither the demo's training split nor its benchmark uses.
FRESH_SEED = 303


def _answer_archive(root: Path, strategy: str, budget: int) -> list[dict]:
    """Every question of the archive under `root`, answered through the VQA job's read and encode stages."""
    questions = [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines()]
    model_uri = default_model()
    model_config = load_model_config(model_uri)
    config = VqaConfig(model=model_uri, pruning=resolve_pruning(PruningConfig(strategy=strategy, budget=budget), model_config))
    stage = EncodeStage(config, model_uri, run_id="test", fused=True)
    rows: list[dict] = []
    for scene in sorted({q["scene"] for q in questions}):
        asked = [
            {"question_id": q["question_id"], "question": q["question"], "choices": q["choices"], "bbox": q["bbox"], "prompt": None}
            for q in questions
            if q["scene"] == scene
        ]
        read = read_scene(
            {"scene": str(root / scene), "questions": asked},
            model_config=model_config,
            pruning=config.pruning,
            storage=StorageConfig(),
            normalize=NormalizeConfig(),
        )
        for table in stage(pa.Table.from_pylist([read])):
            rows.extend(table.to_pylist())
    truth = {q["question_id"]: q["answer"] for q in questions}
    return [{**row, "truth": truth[row["question_id"]]} for row in rows]


def test_shipped_files_and_size() -> None:
    assert default_model() == str(DEMO_MODEL_DIR)
    names = {path.name for path in DEMO_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not names & {"pytorch_model.bin", "model.bin"}, "weights must ship as safetensors only"
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size <= MAX_WEIGHT_BYTES


def test_loads_through_load_model() -> None:
    model, tokenizer = load_model(default_model())
    assert isinstance(model, UhrForConditionalGeneration)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert tokenizer.convert_tokens_to_ids(model.config.image_token) == model.config.image_token_id
    assert model.tile_size == 32
    # It carries the pruning settings it was trained with: the demo's, under its training config's.
    training = yaml.safe_load(TRAINING_CONFIG.read_text())["pruning"]
    trained = resolve_pruning(PruningConfig(), model.config)
    assert trained.model_dump(mode="json", include=set(DEMO_PRUNING_DEFAULTS)) == PruningConfig(
        **{**DEMO_PRUNING_DEFAULTS, **training}
    ).model_dump(mode="json", include=set(DEMO_PRUNING_DEFAULTS))
    for strategy in ("downsample", "geollava", "uhr-bat", "c2f"):
        assert resolve_pruning(PruningConfig(strategy=strategy), model.config).strategy.value == strategy


@pytest.mark.slow
def test_answers_the_sample_archive(tmp_path: Path) -> None:
    """The sample archive's first scene (same seed, split, size and questions as `make run`): every
    multiple-choice question gets one of its letters."""
    write_archive(str(tmp_path), scenes=1, size=SAMPLE_SIZE, seed=SAMPLE_SEED, split="test", **SAMPLE_QUESTIONS)
    rows = _answer_archive(tmp_path, "uhr-bat", 256)
    assert len(rows) == SAMPLE_QUESTIONS["questions_per_scene"] and all(row["error"] is None for row in rows)
    for row in rows:
        letters = LETTERS[: len(row["choices"])]
        assert row["choice"] is not None and row["choice"] in letters, f"{row['question_id']}: {row['answer']!r}"


# c2f reads its fine windows with Ray tasks, as in the job: starting a local Ray makes it slow.
@pytest.mark.parametrize("strategy", ["downsample", "geollava", "uhr-bat", pytest.param("c2f", marks=pytest.mark.slow)])
def test_answers_fresh_scenes_with_a_choice(tmp_path: Path, strategy: str) -> None:
    """A scene of its training size it never saw (another seed than its splits): every reply is a letter.

    With the strategy it was trained with, the letter is one of the question's options; with the
    others its token layout differs from training and it may name a letter of another category's
    options (geollava answered "E" to a four-option question), which the README's card reports.
    """
    assert FRESH_SEED not in (TRAIN.seed, TEST.seed)
    write_archive(
        str(tmp_path), scenes=1, size=TEST.size, seed=FRESH_SEED, split="test", questions_per_scene=12,
        open_fraction=0.0, referents=TEST.referents, option_order=TEST.option_order,
    )
    rows = _answer_archive(tmp_path, strategy, 256)
    assert len(rows) == 12 and all(row["error"] is None for row in rows)
    trained = strategy == yaml.safe_load(TRAINING_CONFIG.read_text())["pruning"]["strategy"]
    for row in rows:
        letters = LETTERS[: len(row["choices"])] if trained else LETTERS
        assert row["choice"] is not None and row["choice"] in letters, f"{row['question_id']}: {row['answer']!r}"


def test_blind_baselines_by_hand() -> None:
    def question(category: str, answer: str, options: int, small: bool = False, text: str = "q") -> dict:
        choices = [f"({c}) x" for c in "ABCDE"[:options]]
        return {"category": category, "question": text, "answer": answer, "choices": choices, "small": small}

    car, tank = "Is there a car?", "Is there a tank?"
    train = [question("presence", "B", 2, text=tank), question("presence", "B", 2, text=tank),
             question("presence", "A", 2, text=car), question("colour", "C", 4)]  # fmt: skip
    train.append({"category": "colour", "question": "q", "answer": "red", "choices": [], "small": False})  # open
    test = [question("presence", "B", 2, small=True, text=tank), question("presence", "A", 2, text=car),
            question("colour", "C", 4, small=True), question("colour", "D", 4), question("counting", "A", 4)]  # fmt: skip
    report = blind_baselines(train, test)
    # prior letters: presence B, colour C, counting none (never asked in training); the car's wording says A.
    # Four training questions are too few for a 20-question leaf: the classifier says the majority letter, B.
    assert report["overall"] == {
        "questions": 5, "chance": pytest.approx((0.5 + 0.5 + 0.25 * 3) / 5), "prior": 2 / 5, "text": 3 / 5, "learned": 1 / 5
    }  # fmt: skip
    assert report["small"] == {"questions": 2, "chance": pytest.approx(0.375), "prior": 1.0, "text": 1.0, "learned": 0.5}


def test_the_learned_blind_bar_generalises_a_wording_rule_the_text_bar_cannot() -> None:
    """Class words decide presence answers in training; test questions use colours training never named."""

    def question(colour: str, cls: str) -> dict:
        answer = "A" if cls == "car" else "B"
        return {"category": "presence", "question": f"Is there a {colour} {cls} in the image?", "answer": answer,
                "choices": ["(A) yes", "(B) no"], "small": False}  # fmt: skip

    train = [question(colour, cls) for colour in ("red", "blue", "white") for cls in ("car", "tank") for _ in range(20)]
    test = [question(colour, cls) for colour in ("green", "orange") for cls in ("car", "tank")]
    report = blind_baselines(train, test)["overall"]
    assert report["text"] == report["prior"] == 0.5 and report["learned"] == 1.0


def test_the_untrained_model_is_built_again_when_its_corpus_changes(tmp_path: Path) -> None:
    corpus = ["Is there a red car in the image? yes", "What is the color of the ship in the image? blue"] * 8
    init = tmp_path / "init"
    untrained_model(init, corpus)
    weights = init / "model.safetensors"
    built = weights.stat().st_mtime_ns
    untrained_model(init, corpus)
    assert weights.stat().st_mtime_ns == built

    (init / "stale.txt").write_text("left by an older build")
    untrained_model(init, [*corpus, "How many planes are there in the image? 3"])
    assert weights.stat().st_mtime_ns != built and not (init / "stale.txt").exists()
    model, tokenizer = load_model(str(init))
    assert model.config.text_config.vocab_size == len(tokenizer)
