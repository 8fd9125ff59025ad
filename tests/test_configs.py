"""Every shipped job config validates against the job's typed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from uhr.config import load_config
from uhr.pipeline import VqaConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "vqa").glob("*.yaml")), ids=lambda p: p.name)
def test_vqa_configs_validate(path):
    config = load_config(VqaConfig, path)
    assert config.pruning.budget >= sum(config.pruning.scale_budgets or [0])
