"""The fine-tuning loss is a mean per label token over each optimizer step, however it is split.

DeepSpeed (ZeRO-2, CPU) trains one step on the same four samples of different answer lengths, as
one micro-batch of 4, two of 2 and four of 1 (gradient accumulation), in a subprocess with one rank
over gloo (`one_rank`). The gradients reaching the optimizer must be the
same, and the step's objective (the micro-batches' shares added up) the model's own per-token loss
over the four samples. A mean of per-micro-batch means, DeepSpeed's default, fails both.
"""

from __future__ import annotations

from .one_rank import run_one_rank

RUN = """
import sys
from pathlib import Path

import deepspeed
import torch

from uhr.model import load_model
from uhr.model.pruning import build_strategy
from uhr.train.config import FinetuneConfig
from uhr.train.data import collate
from uhr.train.deepspeed_config import fill_deepspeed_config, load_deepspeed_json
from uhr.train.loop import TrainPlan, build_engine, inner_optimizer, label_tokens, micro_step, select_tokens
from tests.train.one_rank import tiny_samples

root = Path(sys.argv[1])
_, pruning, samples = tiny_samples(root, questions=8)
samples.sort(key=lambda sample: label_tokens([sample]))
batch = [samples[0], samples[1], samples[-2], samples[-1]]  # the shortest and the longest answers
counts = [label_tokens([sample]) for sample in batch]
assert counts[0] < counts[-1], counts
deepspeed.init_distributed(dist_backend="gloo")


def one_step(micro):
    config = FinetuneConfig(
        model=str(root / "base"), pruning=pruning, batch_size=4, micro_batch_size=micro, scaling={"num_workers": 1},
        max_steps=1,
        # No clipping: clipped to one norm, gradients off by a constant factor would look the same.
        optimizer={"projector": {"lr": 1e-3}, "language_model": {"lr": 1e-3}, "warmup_ratio": 0.0, "grad_clip": 1e9},
    )
    deepspeed_config = fill_deepspeed_config(load_deepspeed_json(config.deepspeed.config), config)
    plan = TrainPlan(config=config, model_uri=str(root / "base"), deepspeed_config=deepspeed_config, total_steps=1)
    engine, _ = build_engine(plan)
    optimizer, gradients = inner_optimizer(engine), []
    step = optimizer.step

    def capture(*args, **kwargs):
        gradients.append(torch.cat([p.grad.flatten().clone() for g in optimizer.param_groups for p in g["params"]]))
        return step(*args, **kwargs)

    optimizer.step = capture
    strategy, tokens = build_strategy(pruning), label_tokens(batch)
    shares = [micro_step(engine, strategy, batch[i : i + micro], config, tokens)[0] for i in range(0, 4, micro)]
    return gradients[0], sum(shares)


# The untrained model's own loss on the four in one batch: cross-entropy averaged over all their label tokens.
untrained = load_model(str(root / "base"), dtype=torch.float32)[0]
with torch.no_grad():
    visual = [select_tokens(untrained, build_strategy(pruning), sample, FinetuneConfig(pruning=pruning)) for sample in batch]
    plain = float(untrained(**collate(batch, untrained.tokenizer.pad_token_id), visual=visual).loss)
whole, objective = one_step(4)
for micro in (2, 1):
    split, split_objective, *_ = one_step(micro)
    print("micro", micro, "gradient difference", float((split - whole).norm() / whole.norm()))
    print("micro", micro, "objective", split_objective, "whole", objective, "plain", plain)
"""


def test_a_step_trains_the_per_token_mean_whatever_its_micro_batches(tmp_path):
    stdout = run_one_rank(RUN, tmp_path, port=29533)
    lines = [line.split() for line in stdout.splitlines() if line.startswith("micro ")]
    differences = [float(words[-1]) for words in lines if words[2] == "gradient"]
    objectives = [[float(words[i]) for i in (3, 5, 7)] for words in lines if words[2] == "objective"]
    assert len(differences) == len(objectives) == 2, stdout
    assert max(differences) < 1e-5, differences
    for split, whole, plain in objectives:
        assert abs(split - plain) < 1e-5 and abs(whole - plain) < 1e-5, (split, whole, plain)
