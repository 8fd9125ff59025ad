"""Every shipped job config validates against the job's typed config."""

from __future__ import annotations

from pathlib import Path

import pytest

from uhr.config import load_config
from uhr.pipeline import VqaConfig
from uhr.train import FinetuneConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "vqa").glob("*.yaml")), ids=lambda p: p.name)
def test_vqa_configs_validate(path):
    config = load_config(VqaConfig, path)
    assert config.pruning.budget >= sum(config.pruning.scale_budgets or [0])


def test_unset_options_leave_the_yaml_values_at_any_depth(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {manifest: m.jsonl, max_length: 99}\nname: from-yaml\n")
    config = load_config(FinetuneConfig, path, ["max_steps=3"], name=None, data={"manifest": None, "image_root": None})
    assert (config.data.manifest, config.data.max_length, config.name, config.max_steps) == ("m.jsonl", 99, "from-yaml", 3)
    given = load_config(FinetuneConfig, path, data={"manifest": "x.jsonl", "image_root": None})
    assert (given.data.manifest, given.data.max_length, given.data.image_root) == ("x.jsonl", 99, None)
