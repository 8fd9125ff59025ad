"""Every shipped job config validates against the job's typed config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs import finetune as finetune_job
from jobs import vqa as vqa_job
from uhr.config import config_yaml, load_config
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


@pytest.mark.parametrize(
    ("cls", "path", "overrides"),
    [
        (VqaConfig, None, []),
        (VqaConfig, CONFIGS / "vqa" / "cluster.yaml", ["pruning.budget=512", "storage.gdal_options={VSI_CACHE: 'TRUE'}"]),
        (VqaConfig, CONFIGS / "vqa" / "uhr-bat-xlrs.yaml", []),
        (FinetuneConfig, CONFIGS / "train" / "cluster.yaml", ["optimizer.betas=[0.9, 0.95]"]),
    ],
    ids=["vqa-default", "vqa-cluster", "vqa-uhr-bat-xlrs", "train-cluster"],
)
def test_a_printed_config_reads_back_as_the_same_config(tmp_path, cls, path, overrides):
    config = load_config(cls, path, overrides)
    printed = config_yaml(config)
    (tmp_path / "printed.yaml").write_text(printed)
    again = load_config(cls, tmp_path / "printed.yaml")
    assert again == config
    # Unset pruning keys stay unset, so the model's own pruning defaults still apply to them.
    assert again.pruning.model_fields_set == config.pruning.model_fields_set
    # Every key is there, given or commented out, under its description.
    keys = {line.removeprefix("# ").split(":")[0] for line in printed.splitlines() if re.match(r"(# )?\w+:( |$)", line)}
    assert set(cls.model_fields) <= keys
    assert "# Hard cap B on visual tokens per question" in printed


def test_print_config_prints_and_starts_nothing(capsys):
    secret = "s3://uhr-not-a-real-user:uhr-not-a-real-password@bucket/model"
    assert vqa_job.main(["--print-config", "--model", secret, "pruning.strategy=c2f"]) == 0
    printed = capsys.readouterr().out
    assert "\npruning:\n" in printed and "\n  strategy: c2f\n" in printed and "\n  # budget: 1024\n" in printed
    assert "not-a-real" not in printed and "model: 's3://***@bucket/model'" in printed
    assert finetune_job.main(["--print-config", "max_steps=7"]) == 0
    assert "\nmax_steps: 7\n" in capsys.readouterr().out
