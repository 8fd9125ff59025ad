"""Configuration of the UHR multimodal model (`UhrConfig`, `model_type = "uhr"`).

Like `LlavaNextConfig`, it nests a CLIP `vision_config` and a causal-LM `text_config` and adds what
joins them: which tower layer feeds the projector, the projector, the image placeholder, the
LLaVA-NeXT anyres pinpoints, and the UHR-BAT / GeoLLaVA parts (scale-embedding table, affinity
head). Defaults match a LLaVA-NeXT / LongVA checkpoint (CLIP ViT-L/14-336, penultimate layer,
`mlp2x_gelu`).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# LLaVA-NeXT's default anyres grids, (height, width) in pixels, for 336-px tiles.
LLAVA_NEXT_PINPOINTS: list[list[int]] = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

PROJECTOR_TYPES = ("mlp2x_gelu",)

# Keys `PreTrainedConfig.__post_init__` consumes or that transformers writes into every
# config.json; anything else that reaches `UhrConfig` is a typo or a foreign config.
_BASE_CONFIG_KWARGS = frozenset(
    {
        "torch_dtype",
        "num_labels",
        "name_or_path",
        "_name_or_path",
        "_commit_hash",
        "output_attentions",
        "attn_implementation",
        "experts_implementation",
        "_attn_implementation_autoset",
        "use_cache",
    }
)


@strict
class UhrConfig(PreTrainedConfig):
    r"""Configuration of [`UhrForConditionalGeneration`].

    vision_config (`dict` or `CLIPVisionConfig`, *optional*):
        The CLIP vision tower. Defaults to CLIP ViT-L/14-336 (hidden 1024, 24 layers, 336-px tiles,
        14-px patches: a 24 x 24 patch grid per tile).
    text_config (`dict` or a causal-LM config, *optional*):
        The language model; any `model_type` transformers can build with `AutoModelForCausalLM`
        (Qwen2 and Llama are tested). Defaults to Qwen2.
    vision_feature_layer (`int`, *optional*, defaults to -2):
        Index into the tower's hidden states whose patch (and CLS) features feed the projector;
        negative counts from the end (-2 = penultimate layer, as LLaVA / LongVA / GeoLLaVA-8K).
        0 (the embeddings) is not an encoder layer and is rejected.
    projector_type (`str`, *optional*, defaults to `"mlp2x_gelu"`):
        Vision-to-LM projector: Linear(D_v, D) -> GELU -> Linear(D, D). The only type supported.
    projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
        Activation between the projector's two linear layers.
    image_token (`str`, *optional*, defaults to `"<image>"`):
        The placeholder in prompts that the visual tokens replace.
    image_token_id (`int`, *optional*):
        Its id in the tokenizer; set when a model is built with its tokenizer.
    image_grid_pinpoints (`list[list[int]]`, *optional*):
        LLaVA-NeXT anyres grids as (height, width) pixels, each a multiple of the tile size.
        Defaults to LLaVA-NeXT's five grids of up to 2 x 2 tiles.
    num_scales (`int`, *optional*, defaults to 4):
        Rows of the UHR-BAT per-scale embedding table (one per multi-scale view).
    tile_batch_size (`int`, *optional*, defaults to 64):
        Tiles per vision-tower call; bounds activation memory on big scenes.
    pruning_defaults (`dict`, *optional*):
        Pruning settings a checkpoint implies (e.g. GeoLLaVA-8K's clusters per tile), as a partial
        `uhr.model.pruning.config.PruningConfig` (validated here); callers merge them under their
        own explicit settings. None when the checkpoint implies nothing.
    """

    model_type = "uhr"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="clip_vision_model",
            init_kwargs={
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "image_size": 336,
                "patch_size": 14,
                "projection_dim": 768,
            },
        ),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -2
    projector_type: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    image_token: str = "<image>"
    image_token_id: int | None = None
    image_grid_pinpoints: list | None = None
    num_scales: int = 4
    tile_batch_size: int = 64
    pruning_defaults: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any):
        model_type = kwargs.pop("model_type", self.model_type)
        if model_type != self.model_type:
            raise ValueError(f"UhrConfig got model_type {model_type!r}, expected {self.model_type!r}")
        unknown = sorted(key for key in kwargs if key not in _BASE_CONFIG_KWARGS and not key.startswith("_"))
        if unknown:
            raise ValueError(f"UhrConfig got unknown field(s) {unknown}")
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [list(p) for p in LLAVA_NEXT_PINPOINTS]
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        for name in ("vision_feature_layer", "num_scales", "tile_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
        vision, text = self.vision_config, self.text_config
        if vision.model_type != "clip_vision_model":
            raise ValueError(f"vision_config must be a CLIP vision config, got model_type {vision.model_type!r}")
        if text.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(f"text_config model_type {text.model_type!r} is not a causal LM transformers can build")
        if vision.image_size % vision.patch_size:
            raise ValueError(f"vision image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}")
        layers = vision.num_hidden_layers
        if not (-layers <= self.vision_feature_layer <= layers) or self.vision_feature_layer == 0:
            raise ValueError(
                f"vision_feature_layer must select an encoder layer output in [-{layers}, -1] or [1, {layers}], "
                f"got {self.vision_feature_layer}"
            )
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if not self.image_token:
            raise ValueError("image_token must be a non-empty string")
        tile = vision.image_size
        pinpoints = self.image_grid_pinpoints
        if not pinpoints:
            raise ValueError("image_grid_pinpoints must list at least one (height, width) grid")
        for pinpoint in pinpoints:
            if (
                len(pinpoint) != 2
                or any(not isinstance(side, int) or side <= 0 or side % tile for side in pinpoint)
            ):
                raise ValueError(
                    f"each image_grid_pinpoints entry must be (height, width) in positive multiples of the "
                    f"tile size {tile}, got {pinpoint}"
                )
        if self.num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {self.num_scales}")
        if self.tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be >= 1, got {self.tile_batch_size}")
        if self.pruning_defaults is not None:
            from uhr.model.pruning.config import PruningConfig

            PruningConfig.model_validate(self.pruning_defaults)

    @property
    def tile_size(self) -> int:
        """Pixel side of one tower input tile."""
        return self.vision_config.image_size

    @property
    def patch_grid(self) -> int:
        """Patch tokens per tile side (g)."""
        return self.vision_config.image_size // self.vision_config.patch_size


# So `AutoConfig` / `AutoTokenizer.from_pretrained(export_dir)` recognise our exports.
AutoConfig.register(UhrConfig.model_type, UhrConfig, exist_ok=True)

__all__ = ["LLAVA_NEXT_PINPOINTS", "UhrConfig"]
