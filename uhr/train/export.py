"""A training checkpoint -> one consolidated model in the project's export format (`uhr.model.save_model`).

The DeepSpeed checkpoint keeps the module's weights (in the training precision) in
`mp_rank_00_model_states.pt` and, under ZeRO-1/2, the float32 master weights of the trained
parameters partitioned over `[bf16_]zero_pp_rank_*_optim_states.pt` (DeepSpeed prefixes them in a
bf16 run). The export takes the trained parameters from the float32 masters (DeepSpeed's own
`zero_to_fp32` merges the partitions) and every other tensor from the module state, except that a
tensor the module holds below float32 and the masters lack (a frozen part or a buffer of a bf16
run, never changed by training) is the float32 original of the model training started from. So a
bf16 run exports its exact master weights and untouched originals, and a float32 run exports
exactly what it trained. The result loads with `uhr.model.load_model`, as the
VQA job does, and carries the pruning settings it was trained with as its `pruning_defaults`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import ray
import torch

from uhr.model import UhrConfig, load_model, save_model
from uhr.model.modeling import UhrForConditionalGeneration
from uhr.model.pruning.config import PruningConfig
from uhr.storage import StorageConfig, redact
from uhr.train.resume import CHECKPOINT_TAG

logger = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"


def consolidated_state_dict(
    checkpoint_dir: str | Path, tag: str = CHECKPOINT_TAG, base: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the trained module, float32, from a (merged) DeepSpeed checkpoint directory.

    `base`, the float32 state of the model training started from, gives the tensors the masters
    lack that the module state holds below float32 (see the module docstring).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory = Path(checkpoint_dir) / tag
    model_states = directory / MODEL_STATES
    if not model_states.exists():
        raise FileNotFoundError(f"{checkpoint_dir} holds no DeepSpeed model states ({tag}/{MODEL_STATES})")
    # Our own checkpoints hold DeepSpeed's bookkeeping objects besides tensors: not weights-only.
    module = torch.load(model_states, map_location="cpu", weights_only=False)["module"]
    masters: dict[str, torch.Tensor] = {}
    if any(directory.glob("*zero_pp_rank_*_optim_states.pt")):
        masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, exclude_frozen_parameters=True)
        unknown = sorted(set(masters) - set(module))
        if unknown:
            raise ValueError(f"ZeRO master weights for parameters the module lacks: {unknown[:5]}")
    state = {}
    for name in list(module):  # each training-precision tensor freed once its float32 copy exists
        tensor = module.pop(name)
        if name in masters:
            state[name] = masters.pop(name).float()
        elif base is not None and name in base and tensor.is_floating_point() and tensor.element_size() < 4:
            state[name] = base[name].float()
        else:
            state[name] = tensor.float() if tensor.is_floating_point() else tensor
    return state


def export_model(
    checkpoint_dir: str | Path,
    base_model: str,
    export_uri: str,
    storage: StorageConfig,
    pruning: PruningConfig | None = None,
) -> str:
    """Write the checkpoint's model to `export_uri` (directory or object-store URI); returns it.

    `base_model` gives the architecture and tokenizer (the model training started from); every
    weight is replaced, and a key or shape mismatch is an error. `pruning` becomes the export's
    `pruning_defaults`.
    """
    model, _ = load_model(base_model, storage=storage, dtype=torch.float32)
    model.load_state_dict(consolidated_state_dict(checkpoint_dir, base=model.state_dict()), strict=True)
    if pruning is not None:
        model.config.pruning_defaults = pruning.model_dump(mode="json")
    save_model(model, export_uri, storage=storage)
    logger.info("exported %s to %s", redact(str(checkpoint_dir)), redact(export_uri))
    return export_uri


def export_memory_bytes(config: UhrConfig) -> int:
    """Memory the export reserves: the model's parameters in float32 three times (the base model it
    loads, the consolidated state, the master weights being merged into it) plus 2 GiB of headroom,
    so Ray places it on a node that holds it (about 97 GB for a 7B model) rather than a small one."""
    with torch.device("meta"):  # shapes only, no memory
        parameters = sum(p.numel() for p in UhrForConditionalGeneration(config).parameters())
    return 3 * 4 * parameters + (2 << 30)


@ray.remote(num_cpus=1)
def export_task(
    checkpoint: ray.train.Checkpoint,
    base_model: str,
    export_uri: str,
    storage: StorageConfig,
    pruning: PruningConfig | None = None,
) -> str:
    """`export_model` in a Ray task, so a cluster's head node never holds the full model."""
    with checkpoint.as_directory() as directory:
        return export_model(directory, base_model, export_uri, storage, pruning)


__all__ = ["MODEL_STATES", "consolidated_state_dict", "export_memory_bytes", "export_model", "export_task"]
