"""The export of a bf16 run: the trained parts from DeepSpeed's float32 masters, the frozen parts as they were.

DeepSpeed (ZeRO-2, bf16, CPU) trains the tiny model for a few micro-steps in a subprocess, one
rank over gloo (`one_rank`); the
checkpoint it writes is exported as the fine-tuning job does and compared with the masters.
"""

from __future__ import annotations

from pathlib import Path

from .one_rank import run_one_rank

RUN = """
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from uhr.model import load_model
from uhr.model.pruning import build_strategy
from uhr.storage import StorageConfig
from uhr.train.config import FinetuneConfig
from uhr.train.deepspeed_config import fill_deepspeed_config, load_deepspeed_json
from uhr.train.export import export_model
from uhr.train.loop import TrainPlan, build_engine, label_tokens, micro_step
from uhr.train.resume import CHECKPOINT_TAG
from tests.train.one_rank import tiny_samples

root = Path(sys.argv[1])
model, pruning, samples = tiny_samples(root, questions=2)
storage = StorageConfig()
config = FinetuneConfig(
    model=str(root / "base"), pruning=pruning, batch_size=1, scaling={"num_workers": 1}, max_steps=2,
    optimizer={"projector": {"lr": 1e-2}, "language_model": {"lr": 1e-2}, "warmup_ratio": 0.0},
)
deepspeed_config = fill_deepspeed_config(load_deepspeed_json(config.deepspeed.config), config)
deepspeed_config["bf16"] = {"enabled": True}
deepspeed.init_distributed(dist_backend="gloo")
engine, _ = build_engine(TrainPlan(config=config, model_uri=str(root / "base"), deepspeed_config=deepspeed_config, total_steps=2))
strategy = build_strategy(pruning)
for sample in samples[:2]:
    micro_step(engine, strategy, [sample], config, label_tokens([sample]))
engine.save_checkpoint(str(root / "checkpoint"), tag=CHECKPOINT_TAG)
export_model(str(root / "checkpoint"), str(root / "base"), str(root / "export"), storage, pruning)

exported = dict(load_model(str(root / "export"), dtype=torch.float32)[0].named_parameters())
masters = get_fp32_state_dict_from_zero_checkpoint(str(root / "checkpoint"), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)
base = dict(model.named_parameters())
assert masters and not any(name.startswith("vision_tower.") for name in masters)  # the tower is frozen
for name, parameter in exported.items():
    expected = masters[name] if name in masters else base[name]
    assert torch.equal(parameter, expected.float()), name
print("trained", len(masters), "frozen", len(exported) - len(masters))
"""


def test_a_bf16_run_exports_its_float32_masters_and_untouched_frozen_parts(tmp_path: Path):
    stdout = run_one_rank(RUN, tmp_path, port=29531)
    trained, frozen = (int(word) for word in stdout.split()[-3::2])
    assert trained > 0 and frozen > 0
