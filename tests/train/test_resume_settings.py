"""A resume is refused before Ray starts when the config changes what its checkpoint binds it to.

Each checkpoint carries `resume_settings` (`RESUME_FILE`); `check_resume` compares the newest one's
with the re-run's. Every bound setting must be compared (a changed one otherwise fails on every worker
or silently trains with the checkpoint's values), and what a resume takes from the new config must not.
Under ZeRO-1/2 the number of workers and the micro-batch size may change: `check_resume` then names
the checkpoint to convert to DeepSpeed's universal form when the workers changed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import ray

from uhr.config import ConfigError, merge_trees
from uhr.storage import StorageConfig
from uhr.train import FinetuneConfig, run_finetune
from uhr.train.deepspeed_config import fill_deepspeed_config
from uhr.train.resume import RESUME_FILE, check_resume, checkpoint_settings, latest_checkpoint, resume_settings

# Two workers accumulating two micro-batches of 2; on GPUs, so the precision (bfloat16 by default) can change.
# Each part spelled out in full: a part given in part takes PartConfig's defaults for the rest, not the optimizer's.
BASE: dict[str, Any] = {
    "batch_size": 8, "micro_batch_size": 2, "scaling": {"num_workers": 2, "use_gpu": True},
    "optimizer": {
        "vision_tower": {"train": False, "lr": 1e-5}, "projector": {"train": True, "lr": 5e-5},
        "language_model": {"train": True, "lr": 1e-5},
    },
}  # fmt: skip
STAGE = 2


def write_checkpoint(run: Path, step: int, config: FinetuneConfig, stage: int = STAGE) -> Path:
    directory = run / f"checkpoint-{step:08d}"
    directory.mkdir(parents=True)
    (directory / RESUME_FILE).write_text(json.dumps(resume_settings(config, stage)))
    return directory


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("deepspeed.precision", {"deepspeed": {"precision": "float32"}}),
        ("optimizer.weight_decay", {"optimizer": {"weight_decay": 0.1}}),
        ("optimizer.betas", {"optimizer": {"betas": (0.9, 0.95)}}),
        ("optimizer.eps", {"optimizer": {"eps": 1e-6}}),
        ("optimizer.vision_tower.train", {"optimizer": {"vision_tower": {"train": True}}}),
        ("optimizer.vision_tower.lr", {"optimizer": {"vision_tower": {"lr": 2e-6}}}),
        ("optimizer.projector.train", {"optimizer": {"projector": {"train": False}}}),
        ("optimizer.projector.lr", {"optimizer": {"projector": {"lr": 1e-4}}}),
        ("optimizer.language_model.train", {"optimizer": {"language_model": {"train": False}}}),
        ("optimizer.language_model.lr", {"optimizer": {"language_model": {"lr": 5e-6}}}),
    ],
)
def test_changing_a_bound_setting_refuses_the_resume_naming_it(tmp_path, key, change):
    write_checkpoint(tmp_path, 10, FinetuneConfig(**BASE))
    with pytest.raises(ConfigError, match=re.escape(f"other settings: {key} ")) as refused:
        check_resume(str(tmp_path), FinetuneConfig(**merge_trees(BASE, change)), STAGE, StorageConfig())
    assert "; " not in str(refused.value), str(refused.value)  # that setting alone


@pytest.mark.parametrize(
    "change",
    [
        {"scaling": {"num_workers": 4}},
        {"scaling": {"num_workers": 1}, "micro_batch_size": 4},
        {"scaling": {"num_workers": 4, "min_workers": 1}, "micro_batch_size": 1, "batch_size": 24},
        {"micro_batch_size": 1},  # the same partitions; only the epoch position is re-counted
    ],
)
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_and_2_resume_on_other_workers_from_the_universal_form(tmp_path, change, stage):
    write_checkpoint(tmp_path, 10, FinetuneConfig(**BASE), stage=stage)
    check_resume(str(tmp_path), FinetuneConfig(**merge_trees(BASE, change)), stage, StorageConfig())
    with pytest.raises(ConfigError, match=re.escape("other settings: optimizer.eps")) as refused:  # the rest still binds
        check_resume(str(tmp_path), FinetuneConfig(**merge_trees(BASE, {**change, "optimizer": {"eps": 1e-6}})), stage, StorageConfig())
    assert "; " not in str(refused.value), str(refused.value)


@pytest.mark.parametrize(
    ("key", "change"),
    [("scaling.num_workers", {"scaling": {"num_workers": 4}}), ("micro_batch_size", {"micro_batch_size": 1})],
)
def test_without_zero_partitions_the_workers_and_micro_batch_bind(tmp_path, key, change):
    # Stage 0 has no universal conversion here; its resume keeps its shape.
    write_checkpoint(tmp_path, 10, FinetuneConfig(**BASE), stage=0)
    with pytest.raises(ConfigError, match=re.escape(f"other settings: {key} ")) as refused:
        check_resume(str(tmp_path), FinetuneConfig(**merge_trees(BASE, change)), 0, StorageConfig())
    assert "needs ZeRO stage 1 or 2" in str(refused.value)
    with pytest.raises(ConfigError) as refused:  # the hint only where it applies
        check_resume(str(tmp_path), FinetuneConfig(**merge_trees(BASE, {"optimizer": {"eps": 1e-6}})), 0, StorageConfig())
    assert "ZeRO stage" not in str(refused.value)


def test_changing_the_zero_stage_refuses_the_resume_naming_it(tmp_path):
    # The stage comes from the filled DeepSpeed JSON, not from the run config: its partitions would not load.
    write_checkpoint(tmp_path, 10, FinetuneConfig(**BASE), stage=2)
    with pytest.raises(ConfigError, match=re.escape("other settings: deepspeed.zero_stage 2 -> 1")):
        check_resume(str(tmp_path), FinetuneConfig(**BASE), 1, StorageConfig())


@pytest.mark.parametrize(
    "change",
    [
        {"max_steps": 500},
        {"optimizer": {"warmup_ratio": 0.2}},
        {"optimizer": {"grad_clip": 0.5}},
        {"data": {"manifest": "s3://bucket/more.jsonl", "max_length": 512}},
        {"max_steps": 500, "optimizer": {"warmup_ratio": 0.2, "grad_clip": 0.5}, "data": {"manifest": "more.jsonl"}},
    ],
)
def test_what_a_resume_takes_from_the_new_config_may_change(tmp_path, change):
    write_checkpoint(tmp_path, 10, FinetuneConfig(**BASE))
    check_resume(str(tmp_path), FinetuneConfig(**merge_trees(BASE, change)), STAGE, StorageConfig())


def test_only_the_newest_checkpoint_binds_the_resume(tmp_path):
    older = FinetuneConfig(**merge_trees(BASE, {"optimizer": {"eps": 1e-6}}))
    write_checkpoint(tmp_path, 9, older)
    write_checkpoint(tmp_path, 10, FinetuneConfig(**BASE))
    check_resume(str(tmp_path), FinetuneConfig(**BASE), STAGE, StorageConfig())
    with pytest.raises(ConfigError, match="checkpoint-00000010"):
        check_resume(str(tmp_path), older, STAGE, StorageConfig())


def test_nothing_to_check_without_a_checkpoint_or_its_settings(tmp_path):
    changed = FinetuneConfig(**merge_trees(BASE, {"micro_batch_size": 1}))
    check_resume(str(tmp_path / "never-ran"), changed, STAGE, StorageConfig())
    (tmp_path / "checkpoint-00000010").mkdir()  # written before checkpoints carried their settings
    check_resume(str(tmp_path), changed, STAGE, StorageConfig())
    assert checkpoint_settings(ray.train.Checkpoint(str(tmp_path / "checkpoint-00000010"))) == {}
    written = write_checkpoint(tmp_path, 11, FinetuneConfig(**BASE))
    assert checkpoint_settings(ray.train.Checkpoint(str(written))) == resume_settings(FinetuneConfig(**BASE), STAGE)


def test_the_latest_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    assert latest_checkpoint(str(tmp_path / "never-ran"), StorageConfig()) is None
    assert latest_checkpoint(str(tmp_path), StorageConfig()) is None
    # Past 8 digits the zero-padded names no longer sort by step; a name without a step is no checkpoint.
    for name in ("checkpoint-00000010", "checkpoint-100000000", "checkpoint-99999999", "checkpoint-00000009", "checkpoint-tmp"):
        (tmp_path / name).mkdir()
    assert latest_checkpoint(str(tmp_path), StorageConfig()) == str(tmp_path / "checkpoint-100000000")


def test_an_elastic_group_keeps_the_global_batch_at_every_size_it_may_take():
    # Batch 8 of micro-batches of 2 suits 2 and 4 workers, not 3.
    with pytest.raises(ValueError, match=r"micro_batch_size x num_workers = 2 x 3 \(every group size"):
        FinetuneConfig(**merge_trees(BASE, {"scaling": {"num_workers": 4, "min_workers": 2}}))
    config = FinetuneConfig(**merge_trees(BASE, {"scaling": {"num_workers": 4, "min_workers": 2}, "micro_batch_size": 1, "batch_size": 12}))
    assert config.elastic and list(config.worker_counts) == [2, 3, 4]
    group = config.for_workers(3)
    assert (group.scaling.num_workers, group.scaling.min_workers, group.gradient_accumulation_steps) == (3, None, 4)
    assert resume_settings(group, STAGE)["scaling.num_workers"] == 3  # a checkpoint records the group that wrote it
    with pytest.raises(ValueError, match=r"a group of 5 workers is outside scaling's \[2, 3, 4\]"):
        config.for_workers(5)
    with pytest.raises(ValueError, match="min_workers=5 exceeds scaling.num_workers=4"):
        FinetuneConfig(**merge_trees(BASE, {"scaling": {"num_workers": 4, "min_workers": 5}}))
    fixed = FinetuneConfig(**BASE)
    assert not fixed.elastic and list(fixed.worker_counts) == [2]


def test_elastic_training_without_zero_partitions_stops_before_ray_starts(model_dir, train_archive, tmp_path):
    config = FinetuneConfig(
        model=str(model_dir), data={"manifest": train_archive.train_jsonl}, output=str(tmp_path), batch_size=4,
        scaling={"num_workers": 2, "min_workers": 1}, deepspeed={"zero_stage": 0},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="elastic training \\(scaling.min_workers\\) needs ZeRO stage 1 or 2, got 0"):
        run_finetune(config)
    assert not ray.is_initialized()


def test_a_deepspeed_json_fixing_one_group_sizes_batch_arithmetic_stops_an_elastic_run(model_dir, train_archive, tmp_path):
    fixed = json.loads((Path(__file__).parents[2] / "configs/train/zero2.json").read_text())
    fixed["gradient_accumulation_steps"] = 2  # right for 2 workers of micro-batch 1, wrong for 1
    (tmp_path / "fixed.json").write_text(json.dumps(fixed))
    config = FinetuneConfig(
        model=str(model_dir), data={"manifest": train_archive.train_jsonl}, output=str(tmp_path), batch_size=4,
        scaling={"num_workers": 2, "min_workers": 1}, deepspeed={"config": str(tmp_path / "fixed.json")},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"\(a group of 1 workers\): gradient_accumulation_steps=2 disagrees"):
        run_finetune(config)
    assert fill_deepspeed_config(fixed, config.for_workers(2))["gradient_accumulation_steps"] == 2  # it suits a group of 2
