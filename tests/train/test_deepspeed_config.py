"""The DeepSpeed JSON: found from any working directory, its "auto" fields filled from the run config."""

from __future__ import annotations

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
