"""The DeepSpeed JSON: found from any working directory, its "auto" fields filled from the run config."""

from __future__ import annotations

import re

import pytest

from uhr.config import ConfigError
from uhr.train import FinetuneConfig
from uhr.train.deepspeed_config import fill_deepspeed_config, load_deepspeed_json


def test_the_default_json_loads_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = FinetuneConfig(batch_size=8, micro_batch_size=2)
    filled = fill_deepspeed_config(load_deepspeed_json(config.deepspeed.config), config, source="default")
    assert filled["zero_optimization"]["stage"] == 2
    assert filled["train_micro_batch_size_per_gpu"] == 2 and filled["train_batch_size"] == 8
    assert "auto" not in str(filled)


def test_a_missing_json_names_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="cannot read DeepSpeed config configs/train/nothing.json"):
        load_deepspeed_json("configs/train/nothing.json")


@pytest.mark.parametrize(
    ("fixed", "message"),
    [
        ({"fp16": {"enabled": True}}, "fp16.enabled=True disagrees with the run config's deepspeed.precision (False)"),
        ({"gradient_clipping": 0.5}, "gradient_clipping=0.5 disagrees with the run config's optimizer.grad_clip (1.0)"),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.1}}},
            "optimizer.params.weight_decay=0.1 disagrees with the run config's optimizer.weight_decay (0.0)",
        ),
        ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu=4 disagrees with the run config's micro_batch_size (2)"),
    ],
)
def test_a_fixed_value_the_run_config_owns_must_agree_with_it(fixed, message):
    config = FinetuneConfig(batch_size=8, micro_batch_size=2, optimizer={"grad_clip": 1.0})
    raw = {**load_deepspeed_json(config.deepspeed.config), **fixed}
    with pytest.raises(ConfigError, match=re.escape(message)):
        fill_deepspeed_config(raw, config)


def test_what_the_run_config_owns_is_written_where_the_json_leaves_it_out():
    # DeepSpeed's defaults for these (no clipping, float32, its Adam's own betas) would otherwise win.
    config = FinetuneConfig(
        batch_size=8, micro_batch_size=2, scaling={"use_gpu": True}, deepspeed={"precision": "bfloat16"},
        optimizer={"grad_clip": 0.7, "weight_decay": 0.05, "betas": (0.9, 0.95)},
    )  # fmt: skip
    raw = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}, "zero_optimization": {"stage": 2}}
    filled = fill_deepspeed_config(raw, config)
    assert filled["bf16"] == {"enabled": True} and filled["fp16"] == {"enabled": False}
    assert filled["gradient_clipping"] == 0.7 and filled["train_batch_size"] == 8
    assert filled["optimizer"]["params"] == {"lr": 1e-5, "betas": [0.9, 0.95], "eps": config.optimizer.eps, "weight_decay": 0.05}


@pytest.mark.parametrize("stage", [0, 1])
def test_deepspeed_zero_stage_replaces_the_stage_the_json_fixes(stage):
    # The default JSON fixes stage 2 (no "auto"), so only the override can set another.
    config = FinetuneConfig(batch_size=8, micro_batch_size=2, deepspeed={"zero_stage": stage})
    raw = load_deepspeed_json(config.deepspeed.config)
    assert raw["zero_optimization"]["stage"] == 2
    assert fill_deepspeed_config(raw, config)["zero_optimization"]["stage"] == stage


def test_a_json_enabling_bf16_on_a_cpu_run_is_refused_up_front():
    # The precision check below it would refuse it too, but as a disagreement with deepspeed.precision:
    # this one names the cause, a CPU run.
    config = FinetuneConfig(batch_size=8, micro_batch_size=2)
    raw = {**load_deepspeed_json(config.deepspeed.config), "bf16": {"enabled": True}}
    with pytest.raises(ConfigError, match=re.escape("bf16 is enabled but the run trains on CPUs (scaling.use_gpu=false)")):
        fill_deepspeed_config(raw, config, source="bf16.json")
