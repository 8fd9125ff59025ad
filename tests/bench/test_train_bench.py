"""The fine-tuning benchmark on its smallest setting (the job runs every strategy), and its sizing arithmetic."""

from __future__ import annotations

import pytest

from uhr.bench.flops import real_model_config
from uhr.bench.train import (
    ADAM_STATE_BYTES,
    ZERO2_RATIO_TARGET,
    SizingConfig,
    TrainBenchConfig,
    format_report,
    part_parameters,
    run_train_benchmark,
    sizing_report,
    trained_parameters,
    zero2_memory,
)
from uhr.train.config import DeepSpeedSettings, OptimizerConfig, PartConfig
from uhr.train.deepspeed_config import load_deepspeed_json


@pytest.mark.slow  # two worker-group starts (DeepSpeed import, gloo, its shm op): 2-6 min on 2 cores
def test_train_benchmark_measures_steady_rates_and_zero2_halves_the_optimizer_state(tmp_path):
    config = TrainBenchConfig(
        strategies=["downsample"], steps=2, batch_size=2, zero0_strategy="downsample", cache_dir=tmp_path
    )
    result = run_train_benchmark(config)
    assert [(r.strategy, r.zero_stage) for r in result.runs] == [("downsample", 2)]
    assert result.zero0 is not None and result.zero0.zero_stage == 0
    for run in (*result.runs, result.zero0):
        summary = run.summary
        assert summary.steps == 2 and summary.samples == [2, 2]
        # Each worker's second step is its steady part: a rate for every rank, and all positive.
        assert len(run.steady_rates) == 2 and all(rate > 0 for rate in run.steady_rates)
        assert all(rate > 0 for rate in summary.samples_per_s)

    zero0, zero2 = result.zero0.summary.optimizer_state_bytes, result.runs[0].summary.optimizer_state_bytes
    assert zero0[0] == zero0[1] > 0  # replicated
    # ZeRO-2's flat partitions cover every trained parameter, each rank about half of them.
    assert sum(zero2) >= ADAM_STATE_BYTES * result.trained_parameters
    assert 0.45 <= result.zero_ratio <= ZERO2_RATIO_TARGET, (zero2, zero0)

    report = format_report(result)
    assert "| downsample | 2 |" in report and "| downsample | 0 |" in report
    assert f"(target <= {ZERO2_RATIO_TARGET}): met" in report
    assert "## Sizing: CLIP ViT-L/14-336 + Qwen2-7B" in report


@pytest.fixture(scope="module")
def real_counts() -> dict[str, int]:
    return part_parameters(real_model_config())


def test_real_sizes_agree_with_the_readme_and_the_cluster_config(real_counts):
    # README "Sizing": CLIP-L tower 304 M, projector ~17 M (+ scale embeddings, affinity head), Qwen2-7B 7.6 B.
    assert real_counts["vision_tower"] == pytest.approx(304e6, rel=0.01)
    assert real_counts["language_model"] == pytest.approx(7.6e9, rel=0.01)
    assert 17e6 <= real_counts["projector"] <= 20e6
    zero_json = load_deepspeed_json(DeepSpeedSettings().config)
    plain = zero2_memory(real_counts, OptimizerConfig(), SizingConfig(gpus=8), False, zero_json)
    offloaded = zero2_memory(real_counts, OptimizerConfig(), SizingConfig(gpus=8), True, zero_json)
    assert plain.weights / 1e9 == pytest.approx(15.9, abs=0.05)  # README: "about 15.9 GB"
    # configs/train/cluster.yaml: "~29 GB per GPU ... (bf16 weights 16 GB, gradient and Adam partitions 13 GB)".
    assert (plain.gradients + plain.master + plain.adam) / 1e9 == pytest.approx(13.4, abs=0.1)
    assert offloaded.total < plain.total and offloaded.gradients == offloaded.adam == 0
    assert offloaded.cpu == pytest.approx(16 * trained_parameters(real_counts, OptimizerConfig()) / 8, rel=1e-6)
    lines = "\n".join(sizing_report(SizingConfig()))
    assert "| ZeRO-2 | 15.9 |" in lines and "| ZeRO-2 + CPU offload | 15.9 |" in lines


def test_model_states_match_deepspeeds_own_zero2_estimator(real_counts, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    everything = sum(real_counts.values())
    all_train = OptimizerConfig(vision_tower=PartConfig(train=True))
    zero_json = load_deepspeed_json(DeepSpeedSettings().config)
    for gpus in (2, 8, 64):
        plain = zero2_memory(real_counts, all_train, SizingConfig(gpus=gpus), False, zero_json)
        offloaded = zero2_memory(real_counts, all_train, SizingConfig(gpus=gpus), True, zero_json)
        states = plain.weights + plain.gradients + plain.master + plain.adam + plain.step_gradients
        _, expected = estimate_zero2_model_states_mem_needs(everything, num_gpus_per_node=gpus, cpu_offload=False)
        assert states == pytest.approx(expected, abs=18)  # partitions rounded up to whole parameters
        _, expected = estimate_zero2_model_states_mem_needs(everything, num_gpus_per_node=gpus, cpu_offload=True)
        assert offloaded.weights == expected
