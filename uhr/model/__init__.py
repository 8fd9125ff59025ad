"""The UHR multimodal model: assembly, views, pruning-ready parts, checkpoints.

Public API:

* `UhrConfig`, `UhrForConditionalGeneration`, `UhrCausalLMOutput` — the model (`modeling.py`);
* `load_model`, `load_model_config`, `save_model`, `build_tiny_model`, `CheckpointError` — checkpoints;
* `build_tokenizer` — small local ChatML tokenizers;
* `tokenize_conversation` — LLaVA conversations to `input_ids` / `labels` for fine-tuning.
"""

from __future__ import annotations

from uhr.model.checkpoints import (
    CheckpointError,
    build_tiny_model,
    build_tiny_tokenizer,
    load_model,
    load_model_config,
    save_model,
)
from uhr.model.config import UhrConfig
from uhr.model.conversation import tokenize_conversation
from uhr.model.modeling import IGNORE_INDEX, UhrCausalLMOutput, UhrForConditionalGeneration
from uhr.model.tokenizer import build_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "CheckpointError",
    "UhrCausalLMOutput",
    "UhrConfig",
    "UhrForConditionalGeneration",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "build_tokenizer",
    "load_model",
    "load_model_config",
    "save_model",
    "tokenize_conversation",
]
