"""The evaluation job: a benchmark answered through the VQA job per strategy and budget, then scored.

`run_evaluation(EvaluateConfig(...))` loads the benchmark (`uhr.eval.benchmarks`), hands its
questions to the archive-wide VQA job (`uhr.pipeline.run_vqa`: same Ray Data pipeline, actor pools,
strategies and budgets) once per combination of the sweep, scores every run by the benchmark's own
rules (`uhr.eval.scoring`) and writes the report. Each question is asked with the benchmark's own
prompt template (the item's `prompt`, used verbatim by the VQA job); multiple-choice replies are
scored by the benchmark's rule on the raw reply. Items published with several images (XLRS-Bench's
bi-temporal change counting) are asked of all of them, in order, as lmms-eval asks them (see
`uhr.eval.benchmarks`); the report counts them.

Layout under `output`:

    _evaluation.json              what the answers depend on (benchmark, data, model, pruning,
                                  prompts, generation); a rerun with other settings is refused
    questions.parquet             the VQA job's questions table: scene = first image, extra_scenes =
                                  the others, prompt = the benchmark's template
    runs/<strategy>-b<budget>/    one VQA job output per combination (answer parts + `_run.json`),
                                  so re-running the same command resumes every combination
    items.parquet                 one row per (run, item): the item, the reply, what the scorer
                                  compared and whether it was right
    report.json, report.md, accuracy_vs_tokens.png
    images/                       XLRS-Bench's embedded images, when the output is in object
                                  storage (cluster workers read them from there)

Throughput (questions/s, scenes/s) comes from the VQA runs' own summaries in their manifests:
rows written over wall time, summed over every invocation that wrote rows, so a resumed run reports
the rate of the work actually done rather than the near-zero time of a run that found all done.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from uhr.config import ConfigError, merge_trees
from uhr.eval.benchmarks import Benchmark, BenchmarkSpec, MmePromptStyle, load_benchmark
from uhr.eval.report import REPORT_JSON, REPORT_MD, REPORT_PLOT, Report, _pct, evaluate, join_answers, write_report
from uhr.eval.scoring import judge
from uhr.eval.wordnet import load_wordnet
from uhr.model import load_model_config, weights_fingerprint
from uhr.model.config import UhrConfig
from uhr.model.pruning.config import StrategyName
from uhr.pipeline.config import VqaConfig
from uhr.pipeline.defaults import default_model, sample_archive
from uhr.pipeline.output import PART_GLOB, RunManifest
from uhr.pipeline.plan import is_proper_box
from uhr.pipeline.vqa import RunSummary, connect_ray, required_cpus, resolve_pruning, run_vqa, same_setting
from uhr.storage import StorageConfig, absolute_uri, is_remote, join_uri, redact, uri_protocol

logger = logging.getLogger(__name__)

SETTINGS_NAME = "_evaluation.json"
QUESTIONS_NAME = "questions.parquet"
SWAPPED_QUESTIONS_NAME = "questions_swapped.parquet"
ITEMS_NAME = "items.parquet"
RUNS_DIR = "runs"

BENCHMARK_ALIASES: dict[str, Benchmark] = {
    "xlrs": Benchmark.XLRS_LITE,
    "mme-rw-rs": Benchmark.MME_REALWORLD_RS,
    **{benchmark.value: benchmark for benchmark in Benchmark},
}
"""Names `--benchmark` accepts: the issue's short names and `Benchmark` values."""

SWEEP_AXES: dict[str, str] = {
    "strategy": "strategies",
    "pruning.strategy": "strategies",
    "budget": "budgets",
    "pruning.budget": "budgets",
}
"""`--sweep` keys and the `EvaluateConfig` field each one fills."""

# VqaConfig fields the evaluation sets for every run itself.
_RUN_FIELDS = ("questions", "scenes", "ask", "output", "overwrite", "run_id")
# VqaConfig fields that decide what the model answers (the rest only decide where and how fast).
_ANSWER_FIELDS = ("normalize", "precision", "max_new_tokens")


class EvaluateConfig(BaseModel):
    """Everything `python -m jobs.evaluate` needs; `vqa` is the VQA job's config (model, pools, ...)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    benchmark: Benchmark = Field(
        description="Benchmark: xlrs (XLRS-Bench lite), lrs-vqa, mme-rw-rs (MME-RealWorld-RS) or synthetic."
    )
    data: str | None = Field(
        None,
        description="Benchmark data (local path or object-store URI): XLRS data file or dataset folder, LRS-VQA "
        "JSONL, MME-RealWorld JSON, synthetic archive root. None: the embedded sample archive (synthetic only).",
    )
    image_root: str | None = Field(
        None, description="Folder relative image paths resolve against (LRS-VQA, MME-RealWorld); None: the published layout's."
    )
    image_dir: str | None = Field(
        None,
        description="Where XLRS-Bench's embedded images are written; None: `<output>/images` when the output is in "
        "object storage (cluster workers must read them), else uhr's cache folder.",
    )
    mme_prompt: MmePromptStyle = Field(MmePromptStyle.LRS_VQA, description="Which published MME-RealWorld prompt to build.")
    output: str = Field("outputs/eval", description="Evaluation output URI (local or s3://). Re-running on it resumes.")
    strategies: list[StrategyName] = Field(
        default_factory=list, description="Pruning strategies to sweep; empty: the VQA config's `pruning.strategy`."
    )
    budgets: list[int] = Field(
        default_factory=list, description="Visual-token budgets to sweep; empty: the VQA config's `pruning.budget`."
    )
    limit: int | None = Field(None, ge=1, description="Evaluate only the first `limit` items, in the benchmark's order.")
    overwrite: bool = Field(False, description="Delete what `output` holds (runs, items, reports) and start afresh.")
    swap_control: bool = Field(
        False,
        description="Also answer every item with another scene's image (the first sweep combination; each scene's "
        "items get the next scene in sorted order): an image-blind control. The report gives its accuracy and the "
        "share of predictions the swap changed; a model that reads the pixels changes many.",
    )
    vqa: VqaConfig = Field(default_factory=VqaConfig, description="Model, storage, pruning, actor pools, generation.")

    @field_validator("benchmark", mode="before")
    @classmethod
    def _benchmark_alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.lower() not in BENCHMARK_ALIASES:
                raise ValueError(f"unknown benchmark {value!r}; choose one of {', '.join(BENCHMARK_ALIASES)}")
            return BENCHMARK_ALIASES[value.lower()]
        return value

    @model_validator(mode="after")
    def _check(self) -> EvaluateConfig:
        if self.data is None and self.benchmark != Benchmark.SYNTHETIC:
            raise ValueError(f"benchmark {self.benchmark.value} needs `data` (only synthetic has an embedded sample)")
        for name in ("strategies", "budgets"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {[getattr(v, 'value', v) for v in values]}")
        if any(budget < 1 for budget in self.budgets):
            raise ValueError(f"budgets must be positive, got {self.budgets}")
        return self


def parse_sweep(items: list[str]) -> dict[str, list[str]]:
    """`["strategy=downsample,c2f", "budget=256,1024"]` -> {"strategies": [...], "budgets": [...]}.

    Raises `ConfigError` for an item that is not `axis=v1,v2,...`, an axis other than strategy or
    budget (other settings are plain `key=value` overrides), or an axis given twice.
    """
    sweep: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in SWEEP_AXES:
            raise ConfigError(
                f"--sweep {item!r}: sweep strategy=a,b,... and/or budget=n1,n2,...; other key=value overrides "
                "go before --sweep"
            )
        field = SWEEP_AXES[key]
        if field in sweep:
            raise ConfigError(f"--sweep {item!r}: {field} are already swept")
        values = [value.strip() for value in raw.split(",") if value.strip()]
        if not values:
            raise ConfigError(f"--sweep {item!r}: no values")
        sweep[field] = values
    return sweep


# ---------------------------------------------------------------------------------------------
# Planning: data, questions and one VQA config per combination.


@dataclass(frozen=True)
class EvalRun:
    """One combination of the sweep: the VQA job's config and where its answers go."""

    strategy: str
    budget: int
    output: str
    config: VqaConfig
    swapped: bool = False

    @property
    def label(self) -> str:
        return run_label(self.strategy, self.budget, self.swapped)

    @property
    def report_strategy(self) -> str:
        """The strategy name its answers are scored under: the swap control is a run of its own."""
        return f"{self.strategy}{SWAPPED_SUFFIX}" if self.swapped else self.strategy


SWAPPED_SUFFIX = "+swapped"
"""Marks the swap control's runs: in their folder name and in the strategy they are reported under."""


def run_label(strategy: str, budget: int, swapped: bool = False) -> str:
    """The folder of a run under `<output>/runs/`: "<strategy>-b<budget>", "<strategy>+swapped-b<budget>" for the
    swap control."""
    return f"{strategy}{SWAPPED_SUFFIX if swapped else ''}-b{budget}"


def benchmark_spec(config: EvaluateConfig) -> BenchmarkSpec:
    """What `load_benchmark` reads: the given data, or the embedded sample archive for synthetic."""
    image_dir = config.image_dir
    if image_dir is None and config.benchmark == Benchmark.XLRS_LITE and is_remote(config.output):
        image_dir = join_uri(config.output, "images")
    return BenchmarkSpec(
        name=config.benchmark,
        uri=config.data if config.data is not None else sample_archive().root,
        image_root=config.image_root,
        image_dir=image_dir,
        mme_prompt=config.mme_prompt,
    )


def swapped_scenes(sequences: list[tuple[str, ...]]) -> dict[tuple[str, ...], tuple[str, ...]]:
    """Each distinct image sequence (one image, or a multi-image item's) -> the next one in sorted
    order with as many images and none of its own (the last wraps to the first): no item keeps an
    image of its own, and a pair stays a pair.

    Raises `ConfigError` naming the sequence when no other sequence can stand in for it.
    """
    distinct = sorted(set(sequences))
    swapped = {}
    for sequence in distinct:
        peers = [other for other in distinct if len(other) == len(sequence)]
        i = peers.index(sequence)
        stand_in = next((other for other in peers[i + 1 :] + peers[:i] if not set(other) & set(sequence)), None)
        if stand_in is None:
            raise ConfigError(
                f"the swap control needs, for the item(s) on {redact(', '.join(sequence))}, another item on "
                f"{len(sequence)} image(s) sharing none of theirs; there is none"
            )
        swapped[sequence] = stand_in
    return swapped


def questions_table(items: pa.Table, swap: bool = False) -> pa.Table:
    """The VQA job's questions for `items`: scene = the first image, extra_scenes = the others (null
    for one image), prompt = the benchmark's template.

    `swap`: every item is asked about another item's images (`swapped_scenes`), its text unchanged
    and without its bbox (the evidence is not in that image). An item's bbox goes with it when it is
    a proper box, so the answers say how the kept tokens covered the evidence.
    """
    rows = items.select(["question_id", "images", "question", "choices", "prompt", "bbox"]).to_pylist()
    images = [tuple(absolute_uri(image) for image in row["images"]) for row in rows]  # workers run in other directories
    if swap:
        others = swapped_scenes(images)
        images = [others[item] for item in images]
    return pa.table(
        {
            "question_id": [row["question_id"] for row in rows],
            "scene": [item[0] for item in images],
            "extra_scenes": pa.array([list(item[1:]) or None for item in images], pa.list_(pa.string())),
            "question": [row["question"] for row in rows],
            "choices": pa.array([row["choices"] or None for row in rows], pa.list_(pa.string())),
            "prompt": [row["prompt"] for row in rows],
            "bbox": pa.array(
                [row["bbox"] if row["bbox"] and not swap and is_proper_box(row["bbox"]) else None for row in rows],
                pa.list_(pa.float64()),
            ),
        }
    )


def _vqa_tree(vqa: VqaConfig) -> dict[str, Any]:
    """The fields the user set, without those the evaluation sets per run (warned about when given)."""
    given = [name for name in _RUN_FIELDS if name in vqa.model_fields_set]
    if given:
        logger.warning("evaluation: ignoring %s of the VQA config: the evaluation sets them per run", ", ".join(given))
    tree = vqa.model_dump(mode="json", exclude_unset=True)
    return {key: value for key, value in tree.items() if key not in _RUN_FIELDS}


def plan_runs(
    config: EvaluateConfig, model_config: UhrConfig, questions_uri: str, swapped_questions_uri: str | None = None
) -> list[EvalRun]:
    """One VQA config per (strategy, budget) of the sweep, validated before any run starts.

    An axis that is not swept takes the VQA config's value; the model's pruning defaults apply
    under what the user set (`resolve_pruning`), so each run's folder names the strategy and budget
    it really runs with. With `config.swap_control`, a last run repeats the first combination on
    `swapped_questions_uri`. Raises `ConfigError` naming the combination when one is invalid (e.g.
    `scale_budgets` that do not fit a swept budget).
    """
    base = _vqa_tree(config.vqa)
    runs: list[EvalRun] = []
    for strategy, budget in product(config.strategies or [None], config.budgets or [None]):
        pruning: dict[str, Any] = {}
        if strategy is not None:
            pruning["strategy"] = strategy.value
        if budget is not None:
            pruning["budget"] = budget
        tree = merge_trees(base, {"pruning": pruning, "questions": questions_uri})
        try:
            vqa = VqaConfig.model_validate(tree)
            resolved = resolve_pruning(vqa.pruning, model_config)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
            combination = f"strategy={strategy and strategy.value} budget={budget}"
            raise ConfigError(f"sweep combination {combination}: {problems}") from error
        output = join_uri(config.output, RUNS_DIR, run_label(resolved.strategy.value, resolved.budget))
        run_config = vqa.model_copy(update={"output": output})
        runs.append(EvalRun(resolved.strategy.value, resolved.budget, output, run_config))
    labels = [run.label for run in runs]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"sweep combinations resolve to the same run twice: {labels}")
    if config.swap_control:
        if swapped_questions_uri is None:
            raise ValueError("swap_control needs the swapped questions' URI")
        first = runs[0]
        output = join_uri(config.output, RUNS_DIR, run_label(first.strategy, first.budget, swapped=True))
        control = first.config.model_copy(update={"output": output, "questions": swapped_questions_uri})
        runs.append(EvalRun(first.strategy, first.budget, output, control, swapped=True))
    return runs


def answer_settings(
    config: EvaluateConfig, spec: BenchmarkSpec, model_uri: str, model_config: UhrConfig
) -> dict[str, Any]:
    """What the answers of every run depend on, apart from the swept strategy and budget.

    The model counts by its weights (`weights_fingerprint`), not its path, as in a VQA run's
    settings. Pruning settings are recorded as the runs use them: the model's defaults under the
    user's.
    """
    vqa = config.vqa.model_dump(mode="json")
    resolved = resolve_pruning(config.vqa.pruning, model_config).model_dump(mode="json")
    pruning = {key: value for key, value in resolved.items() if key not in ("strategy", "budget")}
    return {
        "benchmark": spec.name.value,
        "data": redact(spec.uri),
        "image_root": spec.image_root and redact(spec.image_root),
        "mme_prompt": spec.mme_prompt.value,
        "model_weights": weights_fingerprint(model_uri, storage=config.vqa.storage),
        "pruning": pruning,
        **{name: vqa[name] for name in _ANSWER_FIELDS},
    }


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    found = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif not same_setting(a, b):
            found.append(f"{prefix}{key} was {a!r}, now {b!r}")
    return found


def _prepare_output(config: EvaluateConfig, settings: dict[str, Any], storage: StorageConfig) -> None:
    """Clear the output for `overwrite`, refuse one holding answers to other settings, record ours."""
    fs = storage.filesystem(config.output)
    settings_uri = join_uri(config.output, SETTINGS_NAME)
    if config.overwrite:
        for name in (RUNS_DIR, ITEMS_NAME, QUESTIONS_NAME, SWAPPED_QUESTIONS_NAME, REPORT_JSON, REPORT_MD, REPORT_PLOT, SETTINGS_NAME):
            uri = join_uri(config.output, name)
            if fs.exists(uri):
                fs.rm(uri, recursive=True)
    elif fs.exists(settings_uri):
        with fs.open(settings_uri, "rt") as handle:
            earlier = json.load(handle)
        # Only what both record is compared: a setting added or retired since an older evaluation is not held against it.
        common = settings.keys() & earlier.keys()
        differences = _differences({key: earlier[key] for key in common}, {key: settings[key] for key in common})
        if differences:
            raise ConfigError(
                f"{redact(config.output)} holds an evaluation with other settings ({'; '.join(differences)}); "
                "use --overwrite to replace it or another --output"
            )
    if uri_protocol(config.output) is None:
        fs.makedirs(config.output, exist_ok=True)
    with fs.open(settings_uri, "wt") as handle:
        json.dump(settings, handle, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Reading the runs back.


def read_answers(output: str, storage: StorageConfig, strategy: str | None = None) -> pa.Table:
    """The answer columns `uhr.eval.report` needs, from every part of one VQA run's output.

    `strategy` replaces the rows' strategy (the swap control is reported as a strategy of its own).
    """
    fs = storage.filesystem(output)
    if is_remote(output):
        fs.invalidate_cache()
    columns = ["question_id", "answer", "error", "strategy", "budget", "tokens_kept", "tokens_dense"]
    columns += ["evidence_tokens", "evidence_px"]
    tables = []
    for path in sorted(fs.glob(join_uri(output, PART_GLOB))):
        with fs.open(path, "rb") as handle:
            part = pq.ParquetFile(handle)
            # Parts written before the evidence columns existed lack them; the report then leaves them out.
            tables.append(part.read(columns=[name for name in columns if name in part.schema_arrow.names]))
    if not tables:
        raise ValueError(f"no answer rows under {redact(output)}")
    table = pa.concat_tables(tables, promote_options="default")
    if strategy is not None:
        index = table.schema.get_field_index("strategy")
        table = table.set_column(index, "strategy", pa.array([strategy] * table.num_rows, pa.string()))
    return table


@dataclass(frozen=True)
class RunThroughput:
    """Rows written and wall time of one run's VQA invocations (those that wrote rows)."""

    strategy: str
    budget: int
    output: str
    rows: int
    scenes: int
    wall_s: float

    @property
    def questions_per_s(self) -> float | None:
        return self.rows / self.wall_s if self.wall_s > 0 and self.rows else None

    @property
    def scenes_per_s(self) -> float | None:
        return self.scenes / self.wall_s if self.wall_s > 0 and self.scenes else None

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "output": redact(self.output),
            "questions_per_s": self.questions_per_s,
            "scenes_per_s": self.scenes_per_s,
        }


def run_throughput(run: EvalRun, storage: StorageConfig) -> RunThroughput:
    """Throughput of `run` from its manifest's run history (each entry is a `RunSummary`)."""
    history = [entry for entry in RunManifest.load(run.output, storage).data["runs"] if entry.get("rows")]
    return RunThroughput(
        strategy=run.report_strategy,
        budget=run.budget,
        output=run.output,
        rows=sum(int(entry["rows"]) for entry in history),
        scenes=sum(int(entry.get("scenes") or 0) for entry in history),
        wall_s=sum(float(entry.get("wall_s") or 0.0) for entry in history),
    )


def judged_items(items: pa.Table, answers: pa.Table, wordnet: WordNetCorpusReader | None = None) -> pa.Table:
    """One row per (run, item): `strategy`, `budget`, the item, its reply, status, prediction, correct."""
    tables = []
    for (strategy, budget), joined in join_answers(items, answers).items():
        judged = judge(joined, wordnet)
        tables.append(
            judged.add_column(0, "strategy", pa.array([strategy] * judged.num_rows, pa.string())).add_column(
                1, "budget", pa.array([budget] * judged.num_rows, pa.int64())
            )
        )
    return pa.concat_tables(tables)


# ---------------------------------------------------------------------------------------------
# Writing the report.


def swap_effect(judged: pa.Table, run: EvalRun) -> dict[str, Any]:
    """How the swap control's predictions differ from those of the run it repeats with each item's own scene.

    `judged` is `judged_items`' table. Returns the share of items whose prediction changed (overall
    and per category) and both runs' accuracy: an image-blind model changes none.
    """
    rows = judged.select(["strategy", "budget", "question_id", "category", "status", "prediction", "correct"]).to_pylist()
    own = {r["question_id"]: r for r in rows if (r["strategy"], r["budget"]) == (run.strategy, run.budget)}
    swapped = {r["question_id"]: r for r in rows if (r["strategy"], r["budget"]) == (run.report_strategy, run.budget)}
    # Only items answered in both runs: a read error is no changed prediction.
    common = own.keys() & swapped.keys()
    ids = sorted(q for q in common if own[q]["status"] == swapped[q]["status"] == "answered")
    by_category: dict[str, list[bool]] = defaultdict(list)
    for qid in ids:
        by_category[own[qid]["category"] or "—"].append(own[qid]["prediction"] != swapped[qid]["prediction"])
    changed = [flag for flags in by_category.values() for flag in flags]
    return {
        "run": run.label,
        "compared_with": run_label(run.strategy, run.budget),
        "items": len(ids),
        "items_not_answered_in_both": len(common) - len(ids),
        "changed": sum(changed) / len(changed) if changed else None,
        "changed_by_category": {name: sum(flags) / len(flags) for name, flags in sorted(by_category.items())},
        "accuracy_own_scene": sum(own[q]["correct"] for q in ids) / len(ids) if ids else None,
        "accuracy_swapped_scene": sum(swapped[q]["correct"] for q in ids) / len(ids) if ids else None,
    }


def swap_markdown(effect: dict[str, Any]) -> str:
    """The swap-control section of `report.md`."""
    lines = [
        "## Swap control",
        "",
        f"Every item asked again with another scene's image (`{effect['run']}`), against the same run with its own "
        f"scene (`{effect['compared_with']}`), {effect['items']} items. A model that reads the pixels changes many "
        "predictions; an image-blind one changes none, whatever its accuracy.",
        "",
        f"- predictions changed by the swap: {_pct(effect['changed'])}%",
        f"- accuracy with its own scene / a swapped scene: {_pct(effect['accuracy_own_scene'])}% / "
        f"{_pct(effect['accuracy_swapped_scene'])}%",
        "",
        "| category | changed % |",
        "|---|---|",
        *(f"| {name} | {_pct(value)} |" for name, value in effect["changed_by_category"].items()),
    ]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def throughput_markdown(throughput: list[RunThroughput]) -> str:
    """The throughput section of `report.md`."""
    lines = [
        "## Throughput",
        "",
        "From the VQA runs' summaries: rows written over wall time (Ray start-up, model loading, reads, encoding and "
        "answering included), summed over the invocations that wrote rows.",
        "",
        "| strategy | budget | questions | scenes | wall s | questions/s | scenes/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in throughput:
        lines.append(
            f"| {run.strategy} | {run.budget} | {run.rows} | {run.scenes} | {run.wall_s:.1f} | "
            f"{_fmt(run.questions_per_s)} | {_fmt(run.scenes_per_s)} |"
        )
    return "\n".join(lines) + "\n"


def evaluation_markdown(header: dict[str, Any]) -> str:
    """The section of `report.md` that says what was evaluated and how."""
    lines = ["## Evaluation", ""]
    lines.append(f"- benchmark: `{header['benchmark']}` from `{header['data']}`")
    limited = f" (the first {header['limit']} of {header['items_published']})" if header["limit"] else ""
    lines.append(f"- items: {header['items']}{limited}")
    lines.append(f"- model: `{header['model']}`")
    lines.append(f"- runs: {', '.join(f'`{label}`' for label in header['runs'])}")
    lines.append(
        "- prompts: each benchmark's own template, used verbatim; replies scored by the benchmark's own rule on the "
        "raw reply"
    )
    return "\n".join(lines) + "\n"


def write_evaluation_report(
    report: Report, throughput: list[RunThroughput], header: dict[str, Any], output: str, storage: StorageConfig
) -> dict[str, str]:
    """`report.json`, `report.md` and `accuracy_vs_tokens.png` under `output`, with the evaluation's
    settings, throughput and (when run) the swap control beside the scores; returns their URIs."""
    extra = [evaluation_markdown(header)]
    if header.get("swap_control"):
        extra.append(swap_markdown(header["swap_control"]))
    return write_report(
        report,
        output,
        storage,
        json_extra={"evaluation": header, "throughput": [run.to_dict() for run in throughput]},
        markdown_extra=(*extra, throughput_markdown(throughput)),
    )


def _write_parquet(table: pa.Table, uri: str, storage: StorageConfig) -> None:
    with storage.filesystem(uri).open(uri, "wb") as handle:
        pq.write_table(table, handle)


# ---------------------------------------------------------------------------------------------
# The job.


@dataclass
class EvaluationResult:
    """What an evaluation did: the VQA runs of this invocation, the scores and the files written."""

    output: str
    summaries: list[RunSummary]
    report: Report
    throughput: list[RunThroughput]
    files: dict[str, str]
    swap_control: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        return "completed" if all(summary.status == "completed" for summary in self.summaries) else "failed"

    def format(self) -> str:
        lines = [f"evaluation: {self.status}"]
        for result in self.report.runs:
            value = result.score.headline
            headline = "—" if value is None else f"{100 * value:.1f}%"
            kept = "—" if result.mean_tokens_kept is None else f"{result.mean_tokens_kept:.1f}"
            lines.append(
                f"  {result.source} {result.label}: {result.score.headline_name} {headline} "
                f"({result.answered}/{result.items} answered, {result.errors} errors), {kept} kept tokens"
            )
        for run in self.throughput:
            lines.append(f"  {run_label(run.strategy, run.budget)}: {_fmt(run.questions_per_s)} questions/s")
        control = self.swap_control
        if control is not None:
            lines.append(
                f"  swap control {control['run']}: {_pct(control['changed'])}% of predictions changed with another "
                f"scene's image (accuracy {_pct(control['accuracy_own_scene'])}% -> {_pct(control['accuracy_swapped_scene'])}%)"
            )
        lines += [f"  {name:<24} {redact(uri)}" for name, uri in self.files.items()]
        return "\n".join(lines)


def run_evaluation(config: EvaluateConfig, wordnet: WordNetCorpusReader | None = None) -> EvaluationResult:
    """Answer the benchmark with every run of the sweep, score the runs and write the outputs.

    Inputs, the sweep and the output's earlier settings are checked before any run starts
    (`ConfigError`, `BenchmarkFormatError`, `FileNotFoundError`). Re-running the same command
    resumes each run where it stopped. `wordnet` (for open answers) defaults to `load_wordnet()`.
    """
    config = config.model_copy(update={"output": absolute_uri(config.output)})  # `file://` spelled as a path
    storage = config.vqa.storage
    spec = benchmark_spec(config)
    items = load_benchmark(spec, storage)
    published = items.num_rows
    # Built from every published item, then limited like the items: a question is asked about the
    # same other scene whatever the limit, so answers of runs with other limits never mix two pairings.
    swapped_questions = questions_table(items, swap=True) if config.swap_control else None
    if config.limit is not None:
        items = items.slice(0, config.limit)
        swapped_questions = None if swapped_questions is None else swapped_questions.slice(0, config.limit)
    if items.num_rows == 0:
        raise ConfigError(f"benchmark {spec.name.value} at {redact(spec.uri)} has no items")
    if wordnet is None and "open" in items.column("form").to_pylist():
        wordnet = load_wordnet()  # a missing WordNet stops the job now, not after every run has answered
    model_uri = config.vqa.model or default_model()
    model_config = load_model_config(model_uri, storage=storage)
    questions_uri = join_uri(config.output, QUESTIONS_NAME)
    swapped_uri = join_uri(config.output, SWAPPED_QUESTIONS_NAME)
    # Every run loads the same model, the default one included.
    pinned = config.model_copy(update={"vqa": config.vqa.model_copy(update={"model": model_uri})})
    runs = plan_runs(pinned, model_config, questions_uri, swapped_uri)
    settings = answer_settings(config, spec, model_uri, model_config)
    _prepare_output(config, settings, storage)
    _write_parquet(questions_table(items), questions_uri, storage)
    if swapped_questions is not None:
        _write_parquet(swapped_questions, swapped_uri, storage)
    logger.info(
        "evaluating %s (%d items) with %d run(s): %s",
        spec.name.value, items.num_rows, len(runs), ", ".join(run.label for run in runs),
    )  # fmt: skip

    # Ray started before the first run: its start-up would otherwise count in that run's throughput only.
    connect_ray(min_cpus=max(required_cpus(run.config) for run in runs))
    summaries = []
    for run in runs:
        logger.info("run %s -> %s", run.label, redact(run.output))
        summary = run_vqa(run.config)
        logger.info(summary.format())
        summaries.append(summary)

    # Answers to items beyond `limit` (from an earlier, larger evaluation) are not scored.
    ids = items.column("question_id")
    tables = [read_answers(run.output, storage, run.report_strategy if run.swapped else None) for run in runs]
    # Schemas promoted: a run made before a column was added to the output lacks it.
    answers = pa.concat_tables(
        [table.filter(pc.is_in(table["question_id"], value_set=ids)) for table in tables], promote_options="default"
    )
    report = evaluate(items, answers, wordnet)
    judged = judged_items(items, answers, wordnet)
    images = pa.array([[redact(uri) for uri in row] for row in judged.column("images").to_pylist()], pa.list_(pa.string()))
    judged = judged.set_column(judged.schema.get_field_index("images"), "images", images)  # a signed URL's credentials
    _write_parquet(judged, join_uri(config.output, ITEMS_NAME), storage)
    throughput = [run_throughput(run, storage) for run in runs]
    header = {
        "benchmark": spec.name.value,
        "data": redact(spec.uri),
        "items": items.num_rows,
        "items_published": published,
        "limit": config.limit,
        "model": redact(model_uri),
        "runs": [run.label for run in runs],
        "prompt": spec.mme_prompt.value if spec.name == Benchmark.MME_REALWORLD_RS else f"{spec.name.value}'s own",
        "multi_image_items": sum(len(images) > 1 for images in items.column("images").to_pylist()),
        "settings": settings,
        "swap_control": next((swap_effect(judged, run) for run in runs if run.swapped), None),
    }
    files = write_evaluation_report(report, throughput, header, config.output, storage)
    files[ITEMS_NAME] = join_uri(config.output, ITEMS_NAME)
    return EvaluationResult(config.output, summaries, report, throughput, files, header["swap_control"])
