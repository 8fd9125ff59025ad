"""Fine-tuning end to end on a simulated 2-node Ray cluster: ZeRO-2 over gloo, S3 checkpoints, a killed worker.

One run (`killed_run`) carries most checks, because every run costs a worker-group start on this
small machine: two workers (one per node, STRICT_SPREAD) train the tiny model with UHR-BAT pruning
in the loop on a manifest with bad rows, checkpointing to the local S3 server; one worker process
is killed once the first checkpoint is stored, so the group restarts from it. A second run of the
same command with more steps then resumes from the run's storage.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from ray.cluster_utils import Cluster

from uhr.config import ConfigError, merge_trees
from uhr.model import load_model, load_model_config, tokenize_conversation
from uhr.model.pruning import build_strategy
from uhr.model.pruning.config import PruningConfig
from uhr.pipeline.vqa import resolve_pruning
from uhr.scenes import open_scene
from uhr.train import FinetuneConfig, FinetuneSummary, run_finetune
from uhr.train.data import arrow_filesystem, collate
from uhr.train.export import MODEL_STATES
from uhr.testing.waiting import wait_for
from uhr.train.loop import MODEL_PARTS
from uhr.train.resume import CHECKPOINT_TAG, check_resume, checkpoint_settings, latest_checkpoint
from uhr.train.universal import UNIVERSAL_DONE, convert_to_universal

from .conftest import SNAPSHOT, BackgroundRun
from .one_rank import run_one_rank

TRAINER_SLOT = "trainer_slot"
MAX_STEPS = 8


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head (1 CPU) and two worker nodes (2 CPUs and one trainer slot each), after the S3 server,
    so every node's processes reach it."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=2, resources={TRAINER_SLOT: 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield [node.node_id for node in nodes]
    ray.shutdown()
    cluster.shutdown()


def finetune_config(model_dir: Path, manifest: Path, output: str, **fields: Any) -> FinetuneConfig:
    """Two workers pinned one per node, batch 4 (1 x 2 workers x 2 accumulation), a learnable lr."""
    tree = {
        "model": str(model_dir),
        "data": {"manifest": str(manifest), "max_length": 512, "shuffle_buffer": 0},
        "pruning": {"budget": 64},
        "optimizer": {"projector": {"lr": 3e-3}, "language_model": {"lr": 3e-3}, "warmup_ratio": 0.0},
        "scaling": {"num_workers": 2, "resources_per_worker": {TRAINER_SLOT: 1}, "placement_strategy": "STRICT_SPREAD"},
        "batch_size": 4,
        "max_steps": MAX_STEPS,
        "checkpoint_every_steps": 2,
        "output": output,
    }
    return FinetuneConfig.model_validate(merge_trees(tree, fields))


def _train_workers() -> list[psutil.Process]:
    """The training worker processes of this test's cluster (its processes descend from this one)."""
    workers = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline() and process.cmdline()[0].startswith("ray::RayTrainWorker"):
                workers.append(process)
        except psutil.NoSuchProcess:
            continue
    return workers


@pytest.fixture(scope="module")
def killed_run(cluster, s3_server, model_dir, manifest_with_bad_rows) -> tuple[FinetuneConfig, FinetuneSummary, str]:
    """(config, summary, bucket) of the run whose worker was killed after its first checkpoint."""
    manifest, _, _ = manifest_with_bad_rows
    bucket = s3_server.new_bucket("finetune")
    # The grounding loss on, weighted low: the logged loss includes it, and the loss test is about the answers.
    config = finetune_config(model_dir, manifest, f"s3://{bucket}/runs", grounding={"weight": 0.1})
    run = BackgroundRun(config)

    def first_checkpoint() -> bool:
        # Registered, not only uploaded: Ray Train records a checkpoint once every rank has reported it,
        # and a group lost before that rightly restarts from scratch.
        try:
            snapshot = s3_server.client.get_object(Bucket=bucket, Key=f"runs/finetune/{SNAPSHOT}")["Body"].read()
        except s3_server.client.exceptions.NoSuchKey:
            return not run.is_alive()
        return b"checkpoint-00000002" in snapshot or not run.is_alive()

    wait_for(first_checkpoint, 300, "the first checkpoint in object storage")
    workers = _train_workers()
    assert run.is_alive() and len(workers) == 2, "the kill must land while both workers train"
    os.kill(workers[-1].pid, signal.SIGKILL)
    return config, run.summary(), bucket


def test_the_run_survives_a_killed_worker_and_ends_at_the_configured_step(killed_run):
    _, summary, _ = killed_run
    assert summary.steps == summary.total_steps == MAX_STEPS
    assert len(summary.resumed_from) == 1 and summary.resumed_from[0] in (2, 4, 6)
    # The history is the checkpoint's up to the restart, then the restarted group's: each step once.
    assert [step for step, _ in summary.history] == list(range(1, MAX_STEPS + 1))


def test_the_interrupted_epoch_goes_on_where_it_stopped(killed_run, manifest_with_bad_rows):
    _, summary, _ = killed_run
    _, good, _ = manifest_with_bad_rows
    # Each worker holds half the usable rows, one per micro-batch, two micro-batches a step. Had the
    # restart read the interrupted epoch from its start again, it would end an epoch later and the
    # run would finish in an earlier epoch than an uninterrupted one.
    steps_per_epoch = good // 2 // 2
    assert MAX_STEPS > steps_per_epoch > 0
    assert summary.epochs == (MAX_STEPS - 1) // steps_per_epoch


def test_workers_ran_one_per_node(killed_run, cluster):
    _, summary, _ = killed_run
    assert sorted(summary.nodes) == sorted(cluster)
    assert summary.samples[0] == summary.samples[1] > 0  # equal shards: no rank waits on another


def test_loss_goes_down_with_pruning_in_the_loop(killed_run):
    _, summary, _ = killed_run
    losses = summary.losses
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    # 8 steps of 4 questions: a step's loss depends on which questions it drew, and the restart
    # point (so the order) on timing. Runs here ended at 0.78 and 0.81 of the start; a cut
    # gradient would leave the loss where it began.
    assert last < 0.9 * first, losses


def test_the_grounding_loss_is_trained_and_reported_across_the_restart(killed_run):
    _, summary, _ = killed_run
    steps = [step for step, _ in summary.grounding_history]
    # The archive's records name their evidence: a step of 4 samples almost always holds some.
    assert steps == sorted(set(steps)) and len(steps) >= MAX_STEPS // 2, summary.grounding_history
    assert set(steps) <= {step for step, _ in summary.history}
    assert all(0 < value < 20 for _, value in summary.grounding_history)
    assert "grounding loss" in summary.format()


def test_zero2_gives_each_rank_half_of_the_optimizer_state(killed_run, model_dir):
    model, _ = load_model(str(model_dir))
    trained = [p for name, p in model.named_parameters() if not name.startswith(MODEL_PARTS["vision_tower"])]
    adam_bytes = sum(2 * p.numel() * 4 for p in trained)  # exp_avg and exp_avg_sq, float32
    _, summary, _ = killed_run
    per_rank = summary.optimizer_state_bytes
    assert len(per_rank) == 2 and sum(per_rank) >= adam_bytes
    for held in per_rank:  # 1/world each, up to DeepSpeed's alignment padding
        assert abs(held - adam_bytes / 2) <= 0.001 * adam_bytes, (held, adam_bytes)


def test_bad_manifest_rows_are_skipped_and_counted(killed_run, manifest_with_bad_rows):
    _, _, kinds = manifest_with_bad_rows
    _, summary, _ = killed_run
    assert summary.skipped["count"] == sum(kinds.values()) and summary.skipped["by_kind"] == kinds


def test_the_export_serves_the_trained_module_logits(killed_run, s3_server, train_archive):
    """The export, loaded as the VQA job loads models, equals the module DeepSpeed held at the last step."""
    config, summary, bucket = killed_run
    storage = s3_server.storage()
    exported, tokenizer = load_model(summary.export, storage=storage, dtype="float32")
    trained, _ = load_model(str(config.model), dtype="float32")
    states = f"s3://{bucket}/runs/finetune/checkpoint-{MAX_STEPS:08d}/{CHECKPOINT_TAG}/{MODEL_STATES}"
    with storage.filesystem(states).open(states, "rb") as handle:
        module = torch.load(handle, map_location="cpu", weights_only=False)["module"]
    trained.load_state_dict(module)
    base, _ = load_model(str(config.model), dtype="float32")

    pruning = PruningConfig.model_validate(exported.config.pruning_defaults)
    # The export serves with the pruning it was trained with: the model's defaults under the run's settings.
    assert pruning == resolve_pruning(config.pruning, load_model_config(str(config.model)))
    strategy = build_strategy(pruning)
    conversation = [{"from": "human", "value": "<image>\nHow many ships are in the harbour?"}, {"from": "gpt", "value": "3"}]
    batch = collate([{k: v.tolist() for k, v in tokenize_conversation(tokenizer, conversation, 512).items()}], tokenizer.pad_token_id)
    logits = {}
    with torch.no_grad(), open_scene(train_archive.scenes[0]) as scene:
        for name, model in (("exported", exported), ("trained", trained), ("base", base)):
            visual = strategy.select(model, strategy.encode(model, scene), "How many ships are in the harbour?")
            logits[name] = model(**batch, visual=[visual]).logits
    torch.testing.assert_close(logits["exported"], logits["trained"], rtol=0, atol=1e-5)
    assert not torch.allclose(logits["exported"], logits["base"], atol=1e-3), "training must have changed the model"


def test_a_rerun_that_changes_what_the_checkpoint_binds_stops_before_ray_starts(killed_run, s3_server):
    config, _, _ = killed_run
    run_uri = f"{config.output}/{config.name}"
    assert latest_checkpoint(run_uri, config.storage) == f"{run_uri}/checkpoint-{MAX_STEPS:08d}"
    check_resume(run_uri, config.model_copy(update={"max_steps": MAX_STEPS + 2}), 2, config.storage)  # more steps: fine
    changed = merge_trees(
        config.model_dump(mode="json"),
        {"scaling": {"num_workers": 1, "placement_strategy": "PACK"}, "optimizer": {"language_model": {"lr": 1e-3}}},
    )
    with pytest.raises(ConfigError) as error:
        run_finetune(FinetuneConfig.model_validate(changed))
    message = str(error.value)
    assert "optimizer.language_model.lr 0.003 -> 0.001" in message and "--overwrite" in message
    assert "scaling.num_workers" not in message  # ZeRO-2 resumes on another number of workers


UNIVERSAL_LOAD = """
import sys
from pathlib import Path

import deepspeed
import torch

from uhr.train.config import FinetuneConfig
from uhr.train.deepspeed_config import fill_deepspeed_config, load_deepspeed_json
from uhr.train.loop import TrainPlan, build_engine, inner_optimizer
from uhr.train.universal import UNIVERSAL_TAG

root = Path(sys.argv[1])
config = FinetuneConfig.model_validate_json((root / "config.json").read_text())
deepspeed.init_distributed(dist_backend="gloo")
plan = TrainPlan(config, config.model, fill_deepspeed_config(load_deepspeed_json(config.deepspeed.config), config), 10)
engine, model = build_engine(plan, load_universal=True)
_, client_state = engine.load_checkpoint(str(root / "checkpoint"), tag=UNIVERSAL_TAG)
optimizer = inner_optimizer(engine)
torch.save(
    {
        "step": client_state["uhr"]["step"],
        "parameters": {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad},
        "groups": [[optimizer.state[g["params"][0]][key].clone() for key in ("exp_avg", "exp_avg_sq")] for g in optimizer.param_groups],
        "lr_scheduler": engine.lr_scheduler.state_dict(),
    },
    root / "loaded.pt",
)
"""


def test_one_worker_loads_the_universal_form_of_a_two_worker_checkpoint_exactly(killed_run, s3_server, tmp_path):
    """The killed run's last checkpoint (ZeRO-2, two ranks) converted and loaded by one rank holds the
    same master weights, Adam moments (both ranks' partitions joined) and schedule."""
    config, _, bucket = killed_run
    storage = s3_server.storage()
    uri = f"s3://{bucket}/runs/finetune/checkpoint-{MAX_STEPS:08d}"
    check_resume(f"s3://{bucket}/runs/finetune", one_worker(config), 2, storage)  # ZeRO-2: another size passes
    convert_to_universal(uri, storage)
    storage.filesystem(uri).get(uri, str(tmp_path / "checkpoint"), recursive=True)
    (tmp_path / "config.json").write_text(one_worker(config).model_dump_json())
    run_one_rank(UNIVERSAL_LOAD, tmp_path, port=29623)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=False)

    original = tmp_path / "checkpoint" / CHECKPOINT_TAG
    masters = get_fp32_state_dict_from_zero_checkpoint(str(original.parent), tag=CHECKPOINT_TAG, exclude_frozen_parameters=True)
    assert loaded["step"] == MAX_STEPS and sorted(loaded["parameters"]) == sorted(masters)
    for name, value in loaded["parameters"].items():
        torch.testing.assert_close(value, masters[name], rtol=0, atol=0)
    # Each rank's file holds its slice of every group's flat moments: joined in rank order, they are
    # the one rank's flat moments (both zero-padded at the end to their own alignment).
    ranks = [torch.load(original / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False) for rank in (0, 1)]
    states = [rank["optimizer_state_dict"]["base_optimizer_state"]["state"] for rank in ranks]
    assert len(loaded["groups"]) == len(states[0]) > 0
    for group, moments in enumerate(loaded["groups"]):
        for key, value in zip(("exp_avg", "exp_avg_sq"), moments):
            joined = torch.cat([state[group][key] for state in states])
            n = min(value.numel(), joined.numel())
            torch.testing.assert_close(value[:n], joined[:n], rtol=0, atol=0)
            assert not value[n:].any() and not joined[n:].any() and joined.abs().sum() > 0
    model_states = torch.load(original / MODEL_STATES, weights_only=False)
    assert loaded["lr_scheduler"] == model_states["lr_scheduler"]


def test_a_universal_conversion_cut_short_is_done_again(killed_run, s3_server):
    config, _, bucket = killed_run
    storage = s3_server.storage()
    uri = f"s3://{bucket}/runs/finetune/checkpoint-{MAX_STEPS:08d}"
    filesystem, path = arrow_filesystem(uri, storage)
    assert checkpoint_settings(ray.train.Checkpoint(path, filesystem))["scaling.num_workers"] == config.scaling.num_workers == 2
    target = convert_to_universal(uri, storage)
    fs = storage.filesystem(uri)
    fs.rm(f"{target}/{UNIVERSAL_DONE}")
    fs.pipe(f"{target}/zero/left-over", b"from the conversion that was cut short")
    assert convert_to_universal(uri, storage) == target
    fs.invalidate_cache()
    assert fs.exists(f"{target}/{UNIVERSAL_DONE}") and not fs.exists(f"{target}/zero/left-over")
    assert fs.exists(f"{target}/{MODEL_STATES}")


def one_worker(config: FinetuneConfig) -> FinetuneConfig:
    """`config` on one worker, placed anywhere: batch 4 is then 1 x 1 worker x 4 accumulation."""
    return FinetuneConfig.model_validate(
        merge_trees(config.model_dump(mode="json"), {"scaling": {"num_workers": 1, "placement_strategy": "PACK"}})
    )


@pytest.mark.slow  # a second worker-group start (~100 s here); the killed run already resumes from S3
def test_rerunning_on_one_worker_resumes_from_object_storage(killed_run, s3_server):
    """The two-worker run goes on on one worker: its universal checkpoint, the schedule and the
    interrupted epoch's position (8 of its 12 rows, now 8 micro-batches of this worker's, not 4)."""
    config, first, _ = killed_run
    summary = run_finetune(one_worker(config).model_copy(update={"max_steps": MAX_STEPS + 2}))
    assert summary.resumed_from[-1] == MAX_STEPS and summary.steps == MAX_STEPS + 2
    assert summary.history[:MAX_STEPS] == first.history
    assert [step for step, _ in summary.history] == list(range(1, MAX_STEPS + 3))
    assert summary.samples == [8]  # only the two new steps ran, on one worker
    # Step 9 trains the epoch's last 4 rows and step 10 opens the next; read as 4 micro-batches, the
    # position would leave 8 rows, and both steps in the old epoch.
    assert summary.epochs == first.epochs + 1
