"""Resume exactness of the training loop's step counting (`uhr.train.loop.StepCounter`), without DeepSpeed.

The end-to-end run in test_finetune.py resumes with whole steps per epoch; here every shape of
epoch is covered, including epochs whose last micro-batches join the next epoch's first step.
"""

from __future__ import annotations

import copy
from dataclasses import asdict

from hypothesis import given, settings
from hypothesis import strategies as st

from uhr.train.loop import StepCounter, TrainState

Step = tuple[int, tuple[tuple[int, int], ...]]
"""(step number, the (epoch, index) of each micro-batch it trained)."""


def train(state: TrainState, accumulation: int, batches_per_epoch: int, epochs: int, total_steps: int):
    """Drive a `StepCounter` as `train_loop_per_worker` does; ([Step], the state saved at each step)."""
    steps = StepCounter(state, accumulation)
    done: list[Step] = []
    saved: list[dict] = []
    pending: list[tuple[int, int]] = []
    while state.step < total_steps and state.epoch < epochs:
        epoch = state.epoch
        for batch in steps.epoch([(epoch, index) for index in range(batches_per_epoch)]):
            pending.append(batch)
            if not steps.trained():
                continue
            done.append((state.step, tuple(pending)))
            saved.append(copy.deepcopy(asdict(state)))
            pending = []
            if state.step == total_steps:
                break
        if state.step >= total_steps or state.epoch + 1 >= epochs:
            break
        steps.next_epoch()
    return done, saved


@settings(max_examples=300, deadline=None)
@given(
    accumulation=st.integers(1, 4),
    batches_per_epoch=st.integers(1, 9),
    epochs=st.integers(1, 4),
    total_steps=st.integers(1, 12),
)
def test_a_run_resumed_from_any_step_trains_what_the_uninterrupted_run_did(
    accumulation, batches_per_epoch, epochs, total_steps
):
    uninterrupted, saved = train(TrainState(), accumulation, batches_per_epoch, epochs, total_steps)
    for at, checkpoint in enumerate(saved, start=1):
        resumed, _ = train(TrainState(**checkpoint), accumulation, batches_per_epoch, epochs, total_steps)
        assert resumed == uninterrupted[at:], f"resumed from step {at}"


def test_an_epochs_last_micro_batch_joins_the_next_epochs_first_step():
    done, saved = train(TrainState(), accumulation=2, batches_per_epoch=3, epochs=2, total_steps=3)
    assert done == [(1, ((0, 0), (0, 1))), (2, ((0, 2), (1, 0))), (3, ((1, 1), (1, 2)))]
    # At step 2 the second epoch had read one micro-batch, not (2 - 1) steps x 2.
    assert (saved[1]["epoch"], saved[1]["epoch_start"], saved[1]["epoch_batches"]) == (1, 1, 1)
