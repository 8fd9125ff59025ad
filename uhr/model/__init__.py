"""The UHR multimodal model: assembly, views, pruning-ready parts, checkpoints.

Public API:

* `UhrConfig`, `UhrForConditionalGeneration`, `UhrCausalLMOutput` — the model (`modeling.py`);
* `load_model`, `load_model_config`, `load_tokenizer`, `save_model`, `weights_fingerprint`, `build_tiny_model`,
  `CheckpointError` — checkpoints;
* `build_tokenizer` — small local ChatML tokenizers;
* `tokenize_conversation` — LLaVA conversations to `input_ids` / `labels` for fine-tuning.

Names are imported on first use (`uhr._lazy`): `uhr.model.pruning.config` and the other light
modules import without pulling in transformers.
"""

from __future__ import annotations

from uhr._lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "uhr.model.checkpoints",
    "build_tiny_model": "uhr.model.checkpoints",
    "build_tiny_tokenizer": "uhr.model.checkpoints",
    "load_model": "uhr.model.checkpoints",
    "load_model_config": "uhr.model.checkpoints",
    "load_tokenizer": "uhr.model.checkpoints",
    "save_model": "uhr.model.checkpoints",
    "weights_fingerprint": "uhr.model.checkpoints",
    "UhrConfig": "uhr.model.config",
    "tokenize_conversation": "uhr.model.conversation",
    "IGNORE_INDEX": "uhr.model.modeling",
    "UhrCausalLMOutput": "uhr.model.modeling",
    "UhrForConditionalGeneration": "uhr.model.modeling",
    "build_tokenizer": "uhr.model.tokenizer",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
