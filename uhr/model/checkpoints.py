"""Loading and saving `UhrForConditionalGeneration` checkpoints; tiny models for tests and demos.

`load_model(path_or_uri)` reads the format from the directory's config.json (never from its name):

* (a) a transformers LLaVA-NeXT directory (`model_type: llava_next`), legacy
  (`language_model.model.*`) or v5 (`model.language_model.*`) key layout;
* (b) a LongVA / GeoLLaVA-8K directory (`model_type: llava_qwen` / `llava_llama`, `mm_*` keys);
  the CLIP config is not stored there and is inferred from the weight shapes;
* (c) our own export (`model_type: uhr`), written by `save_model` / `model.save_pretrained`.

Any of them may sit in object storage (`s3://...`): the directory is first copied to a local cache.
Weights must be safetensors unless `allow_pickle=True`. Nothing is ever fetched from a hub.
(a) and (b) are copied through explicit key-map tables; key sets and shapes are checked before a
single tensor is copied, and the checkpoint keys left unused are listed in the log.

What a checkpoint implies about pruning (GeoLLaVA-8K's clusters per tile, LLaVA-NeXT's `none`)
is returned in `model.config.pruning_defaults`, a partial `PruningConfig`.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fsspec.core import split_protocol
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers import initialization as init

from uhr.cache import creating, default_cache_dir
from uhr.errors import UhrError
from uhr.model.config import UhrConfig
from uhr.model.modeling import UhrForConditionalGeneration
from uhr.model.pruning.none import anyres_max_tokens
from uhr.model.tokenizer import CHATML_TEMPLATE, IMAGE_TOKEN, build_tokenizer
from uhr.storage import StorageConfig, is_remote, redact

logger = logging.getLogger(__name__)


class CheckpointError(UhrError, ValueError):
    """A checkpoint directory cannot be loaded as asked (format, weights, keys, shapes, pickle)."""

    def __init__(self, location: str, reason: str):
        self.location = redact(str(location))
        self.reason = redact(str(reason))
        super().__init__(f"cannot load checkpoint {self.location}: {self.reason}")

    def __reduce__(self):
        return (type(self), (self.location, self.reason))


# ----------------------------------------------------------------------------------------------
# Weight files
# ----------------------------------------------------------------------------------------------

_SAFETENSORS_INDEX = "model.safetensors.index.json"
# What `load_tokenizer` leaves in object storage.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def _is_pickle_weights(name: str) -> bool:
    """A file name of pickled weights (`pytorch_model.bin`, `*.pt`), not the trainer's `training_args.bin`."""
    return name.endswith(_PICKLE_SUFFIXES) and not name.startswith("training_args")


def _index_shards(index: dict[str, Any], location: str, names: set[str]) -> list[str]:
    """The shard file names a safetensors index lists, each a plain `*.safetensors` name beside it
    (a path would read weights from outside the checkpoint), among the directory's `names`."""
    try:
        shards = sorted(set(index["weight_map"].values()))
    except (KeyError, AttributeError, TypeError) as error:
        raise CheckpointError(location, f"{_SAFETENSORS_INDEX} has no weight_map of key -> shard") from error
    for shard in shards:
        if not isinstance(shard, str) or posixpath.basename(shard) != shard or "\\" in shard or shard in (".", ".."):
            raise CheckpointError(location, f"{_SAFETENSORS_INDEX} names a shard outside the checkpoint: {shard!r}")
        if not shard.endswith(".safetensors"):
            raise CheckpointError(location, f"{_SAFETENSORS_INDEX} names a shard that is not safetensors: {shard!r}")
        if shard not in names:
            raise CheckpointError(location, f"{_SAFETENSORS_INDEX} names a shard that is not there: {shard!r}")
    return shards


def _check_one_layout(names: Iterable[str], location: str) -> None:
    """Refuse a directory holding both a single `model.safetensors` and an index: which weights are
    the model's is then ambiguous (transformers reads the one, our key-mapped loads the other)."""
    names = set(names)
    if _SAFETENSORS_INDEX in names and "model.safetensors" in names:
        raise CheckpointError(
            location, f"holds both model.safetensors and {_SAFETENSORS_INDEX} (an export written over another?)"
        )


def _weight_files(directory: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    """(weight files, are they safetensors) of a checkpoint directory."""
    safetensors = _safetensors_files(StorageConfig().filesystem(str(directory)), str(directory))
    if safetensors:
        return [Path(path) for path in safetensors], True
    pickles = sorted(p for p in directory.iterdir() if _is_pickle_weights(p.name))
    if not pickles:
        raise CheckpointError(str(directory), "no weights (*.safetensors, or *.bin / *.pt with allow_pickle=True)")
    if not allow_pickle:
        raise CheckpointError(
            str(directory),
            f"weights are pickle files ({', '.join(p.name for p in pickles)}), which can run code when loaded; "
            "convert them to safetensors or pass allow_pickle=True if you trust their source",
        )
    return pickles, False


class _CheckpointTensors:
    """Lazy read access to the tensors of a checkpoint's weight files, by key."""

    def __init__(self, files: list[Path], safetensors: bool, stack: ExitStack):
        self._where: dict[str, Any] = {}
        found_in: dict[str, Path] = {}
        for file in files:
            if safetensors:
                try:
                    handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                except Exception as error:  # safetensors' own error type; a pickle under a .safetensors name
                    raise CheckpointError(str(file), f"not a safetensors file ({error})") from error
                entries = {key: handle for key in handle.keys()}
            else:
                entries = torch.load(file, map_location="cpu", weights_only=True)
            for key, value in entries.items():
                if key in found_in:  # a stray file beside the checkpoint's would silently win
                    raise CheckpointError(str(file.parent), f"{key!r} is in both {found_in[key].name} and {file.name}")
                found_in[key] = file
                self._where[key] = value

    def keys(self) -> list[str]:
        return sorted(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        source = self._where[key]
        if isinstance(source, torch.Tensor):
            return tuple(source.shape)
        return tuple(source.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        source = self._where[key]
        return source if isinstance(source, torch.Tensor) else source.get_tensor(key)


# ----------------------------------------------------------------------------------------------
# Key-map tables: (pattern on the checkpoint key, replacement giving our key); first match wins.
# ----------------------------------------------------------------------------------------------

LLAVA_NEXT_KEY_MAP: tuple[tuple[str, str], ...] = (
    # CLIP tower; hub checkpoints keep CLIPVisionModel's old `vision_model.` prefix.
    (r"^(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)$", r"vision_tower.\1"),
    (r"^(?:model\.)?multi_modal_projector\.(linear_[12]\.(?:weight|bias))$", r"multi_modal_projector.\1"),
    (r"^(?:model\.)?image_newline$", r"image_newline"),
    # transformers < 4.52 layout (and v5 `save_pretrained`, which writes it back).
    (r"^language_model\.model\.(.+)$", r"language_model.model.\1"),
    (r"^language_model\.lm_head\.(.+)$", r"language_model.lm_head.\1"),
    # transformers >= 4.52 in-memory layout.
    (r"^model\.language_model\.(.+)$", r"language_model.model.\1"),
    (r"^lm_head\.(.+)$", r"language_model.lm_head.\1"),
)

LONGVA_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.+)$", r"vision_tower.\1"),
    (r"^model\.mm_projector\.0\.(weight|bias)$", r"multi_modal_projector.linear_1.\1"),
    (r"^model\.mm_projector\.2\.(weight|bias)$", r"multi_modal_projector.linear_2.\1"),
    # GeoLLaVA-8K's affinity head; the released class holds it beside `model`, not inside it.
    (r"^(?:model\.)?reghead\.(dw\.weight|pw\.weight|pw\.bias)$", r"reghead.\1"),
    (r"^model\.image_newline$", r"image_newline"),
    (r"^model\.((?:embed_tokens|layers|norm)\..+)$", r"language_model.model.\1"),
    (r"^lm_head\.(.+)$", r"language_model.lm_head.\1"),
)

# Checkpoint keys of buffers a model recomputes (old CLIP and Llama checkpoints store them): ignored.
_RECOMPUTED = (r"\.position_ids$", r"\.rotary_emb\.inv_freq$")

# Our parameters no LLaVA checkpoint holds; they keep their initialisation (zero for the
# UHR-BAT positional term) when absent. CLIP's post-layernorm only feeds the pooled output,
# which the model never uses.
_OURS_ONLY = (r"^scale_embedding\.", r"^vision_tower\.post_layernorm\.")


@dataclass
class LoadReport:
    """What a key-mapped load did: copied, left at initialisation, and ignored checkpoint keys."""

    copied: int
    initialised: list[str]
    ignored: list[str]


def _map_key(key: str, table: Iterable[tuple[str, str]]) -> str | None:
    for pattern, replacement in table:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _copy_mapped(
    model: UhrForConditionalGeneration,
    tensors: _CheckpointTensors,
    table: Iterable[tuple[str, str]],
    optional: Iterable[str],
    location: str,
) -> LoadReport:
    """Copy checkpoint tensors into `model` through `table`, after checking keys and shapes.

    `optional` are patterns of our keys the checkpoint may lack (they are then initialised here).
    Tied parameters (an LM head tied to the embeddings) count once.
    """
    table = list(table)
    targets: dict[str, str] = {}
    ignored: list[str] = []
    unplaced: list[str] = []
    for key in tensors.keys():
        target = _map_key(key, table)
        if target is None:
            (ignored if any(re.search(p, key) for p in _RECOMPUTED) else unplaced).append(key)
            continue
        if target in targets:
            raise CheckpointError(location, f"keys {targets[target]!r} and {key!r} both map to {target!r}")
        targets[target] = key

    if unplaced:
        raise CheckpointError(location, f"checkpoint keys the model has no place for: {unplaced[:10]}")
    params = dict(model.named_parameters())  # a tied parameter appears once, under its first name
    buffers = {name for name, _ in model.named_buffers()}
    tied = set(model.state_dict()) - set(params) - buffers
    # Old CLIP checkpoints store `position_ids`; ours computes its buffers itself.
    for name in sorted(set(targets) & buffers):
        ignored.append(targets.pop(name))
    unexpected = sorted(set(targets) - set(params) - tied)
    if unexpected:
        raise CheckpointError(location, f"checkpoint keys map to parameters the model does not have: {unexpected[:10]}")
    optional_patterns = [re.compile(pattern) for pattern in optional]
    missing = sorted(name for name in set(params) - set(targets) if not any(p.match(name) for p in optional_patterns))
    if missing:
        raise CheckpointError(location, f"checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:10]}")
    loaded = sorted(set(targets) & set(params))
    mismatched = [
        f"{targets[name]} {tensors.shape(targets[name])} -> {name} {tuple(params[name].shape)}"
        for name in loaded
        if tensors.shape(targets[name]) != tuple(params[name].shape)
    ]
    if mismatched:
        raise CheckpointError(location, f"shape mismatch: {mismatched[:10]}")
    # Initialise the absent parameters' modules first: a module the checkpoint holds in part (a
    # head without its bias) keeps the tensors copied next.
    initialised = sorted(set(params) - set(targets))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in initialised:
            module_name, _, _ = name.rpartition(".")
            if module_name:
                model._init_weights(modules[module_name])
            else:  # a parameter of the top-level model (image_newline)
                model._init_weights(model)
        for name in loaded:
            params[name].copy_(tensors.get(targets[name]))
    # The checkpoint's copy of a tied parameter (an LM head tied to the embeddings) is not needed.
    ignored.extend(targets[name] for name in sorted(set(targets) & tied))
    model.tie_weights()
    report = LoadReport(copied=len(loaded), initialised=initialised, ignored=sorted(ignored))
    logger.info(
        "loaded %s: %d tensors copied, %d left at initialisation %s, %d checkpoint keys ignored %s",
        redact(location),
        report.copied,
        len(report.initialised),
        report.initialised,
        len(report.ignored),
        report.ignored,
    )
    return report


def _empty_model(config: UhrConfig, dtype: torch.dtype | None) -> UhrForConditionalGeneration:
    """A model whose weights are allocated but not initialised (they are about to be overwritten).

    Tied already, so that a tied LM head is one parameter with the embeddings it shares.
    """
    with init.no_init_weights():
        model = UhrForConditionalGeneration._from_config(config, dtype=dtype or torch.float32)
    model.tie_weights()
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------


def _load_tokenizer(
    directory: Path, location: str, config: PreTrainedConfig, fallback_template: str | None = None
) -> PreTrainedTokenizerBase:
    # `config` spares AutoTokenizer from parsing config.json, which for (b) is no transformers model.
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), config=config, local_files_only=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(location, f"no usable tokenizer in the directory ({error})") from error
    if tokenizer.chat_template is None:
        processor_template = directory / "chat_template.json"
        if processor_template.exists():
            tokenizer.chat_template = json.loads(processor_template.read_text())["chat_template"]
        elif fallback_template is not None:
            tokenizer.chat_template = fallback_template
        else:
            raise CheckpointError(location, "the tokenizer has no chat template")
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        # LLaVA code splices the image in by a sentinel id (-200); we need a real token to find it.
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _checkpoint_tokenizer(directory: Path, location: str, model_type: str | None, config: UhrConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of a checkpoint directory whose format is `model_type` and model config `config`."""
    if model_type in _LONGVA_TEXT_TYPES:
        # LongVA / GeoLLaVA-8K: no transformers model type; the tokenizer reads the LM's config.
        fallback = CHATML_TEMPLATE if model_type == "llava_qwen" else None
        return _load_tokenizer(directory, location, config.text_config, fallback_template=fallback)
    return _load_tokenizer(directory, location, config)


# ----------------------------------------------------------------------------------------------
# (a) transformers LLaVA-NeXT
# ----------------------------------------------------------------------------------------------


def _llava_next_config(raw: dict[str, Any], location: str) -> UhrConfig:
    hf = AutoConfig.for_model(**raw)
    if hf.vision_config.model_type != "clip_vision_model":
        raise CheckpointError(location, f"vision tower {hf.vision_config.model_type!r} is not CLIP")
    if not isinstance(hf.vision_feature_layer, int):
        raise CheckpointError(location, f"multi-layer vision features {hf.vision_feature_layer} are not supported")
    if hf.vision_feature_select_strategy != "default":
        raise CheckpointError(location, f"vision_feature_select_strategy {hf.vision_feature_select_strategy!r} (only 'default': CLS dropped)")
    if not getattr(hf, "multimodal_projector_bias", True):
        raise CheckpointError(location, "a projector without biases is not supported")
    # LLaVA-NeXT's LM head sits beside the LM and is tied by the top-level flag, not the LM's own.
    text_config = copy.deepcopy(hf.text_config)
    text_config.tie_word_embeddings = hf.tie_word_embeddings
    return UhrConfig(
        vision_config=hf.vision_config,
        text_config=text_config,
        vision_feature_layer=hf.vision_feature_layer,
        projector_hidden_act=hf.projector_hidden_act,
        image_token_id=hf.image_token_id,
        image_grid_pinpoints=[list(p) for p in hf.image_grid_pinpoints],
        pruning_defaults=_anyres_defaults(hf.image_grid_pinpoints, hf.vision_config),
    )


def _anyres_defaults(pinpoints: list[list[int]], vision: CLIPVisionConfig) -> dict[str, Any]:
    """`none` with a budget that every scene's LLaVA-NeXT tokens fit (the default budget fits none)."""
    tile = vision.image_size
    return {"strategy": "none", "budget": anyres_max_tokens(pinpoints, tile, tile // vision.patch_size)}


# ----------------------------------------------------------------------------------------------
# (b) LongVA / GeoLLaVA-8K
# ----------------------------------------------------------------------------------------------

_LONGVA_TEXT_TYPES = {"llava_qwen": "qwen2", "llava_llama": "llama"}
_CLIP_PREFIX = "model.vision_tower.vision_tower."
_UNIRES_MAX = re.compile(r"^unires_max(\d+)$")


def _clip_key(tensors: _CheckpointTensors, suffix: str) -> str | None:
    for prefix in (_CLIP_PREFIX + "vision_model.", _CLIP_PREFIX):
        if prefix + suffix in tensors.keys():
            return prefix + suffix
    return None


_OPENAI_CLIP = re.compile(r"clip-vit-(?:base|large)-patch(?:14|16|32)", re.IGNORECASE)
"""Names of OpenAI's CLIP ViT towers (`openai/clip-vit-large-patch14-336`, or a local copy so named)."""


def _infer_clip_config(raw: dict[str, Any], tensors: _CheckpointTensors, location: str) -> CLIPVisionConfig:
    """CLIP vision config from weight shapes; LongVA directories name the tower by hub id only."""
    q_proj = _clip_key(tensors, "encoder.layers.0.self_attn.q_proj.weight")
    if q_proj is None:
        raise CheckpointError(
            location,
            f"no vision tower weights ({_CLIP_PREFIX}*); the checkpoint expects {raw.get('mm_vision_tower')!r} "
            "from a hub, which uhr never contacts: save the full model (tower included) first",
        )
    hidden = tensors.shape(q_proj)[0]
    layer_index = re.compile(re.escape(q_proj.split("encoder.layers.")[0]) + r"encoder\.layers\.(\d+)\.")
    layers = len({m.group(1) for key in tensors.keys() if (m := layer_index.match(key))})
    patch = tensors.shape(_clip_key(tensors, "embeddings.patch_embedding.weight"))[-1]
    positions = tensors.shape(_clip_key(tensors, "embeddings.position_embedding.weight"))[0]
    side = round((positions - 1) ** 0.5)
    if side * side != positions - 1:
        raise CheckpointError(location, f"CLIP position table of {positions} rows is not 1 + a square grid")
    intermediate = tensors.shape(_clip_key(tensors, "encoder.layers.0.mlp.fc1.weight"))[0]
    # The head count and activation are in no weight's shape: known for OpenAI's CLIP ViTs (by hub id
    # or a local copy's name), else they must be declared.
    declared = raw.get("vision_config") or {}
    tower = str(raw.get("mm_vision_tower") or "")
    if "num_attention_heads" not in declared and not _OPENAI_CLIP.search(tower):
        raise CheckpointError(
            location,
            f"vision tower {tower!r} is not an OpenAI CLIP ViT (64-wide heads, quick_gelu), and config.json declares "
            "no vision_config with its num_attention_heads and hidden_act",
        )
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=declared.get("num_attention_heads", hidden // 64),
        hidden_act=declared.get("hidden_act", "quick_gelu"),
        layer_norm_eps=declared.get("layer_norm_eps", 1e-5),
        patch_size=patch,
        image_size=side * patch,
    )


def _longva_config(raw: dict[str, Any], tensors: _CheckpointTensors, location: str) -> UhrConfig:
    text_type = _LONGVA_TEXT_TYPES[raw["model_type"]]
    text_class = type(AutoConfig.for_model(text_type))
    fields = {f.name for f in dataclasses.fields(text_class)} | {"torch_dtype"}
    text_kwargs = {k: v for k, v in raw.items() if k in fields and k not in ("architectures", "transformers_version")}
    # transformers 4.x wrote `rope_theta` / `rope_scaling`; v5 keeps both in `rope_parameters`.
    scaling = dict(raw.get("rope_scaling") or {})
    if "rope_theta" in raw or scaling:
        rope = {"rope_type": scaling.pop("rope_type", scaling.pop("type", "default")), **scaling}
        if "rope_theta" in raw:
            rope["rope_theta"] = raw["rope_theta"]
        text_kwargs["rope_parameters"] = rope
    text_config = AutoConfig.for_model(text_type, **text_kwargs)
    vision_config = _infer_clip_config(raw, tensors, location)

    projector = raw.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise CheckpointError(location, f"mm_projector_type {projector!r} is not supported (only mlp2x_gelu)")
    select_feature = raw.get("mm_vision_select_feature", "patch")
    if select_feature != "patch":
        # 'cls_patch' hands the projector each tile's CLS token too; uhr's visual tokens are patches only.
        raise CheckpointError(location, f"mm_vision_select_feature {select_feature!r} is not supported (only 'patch')")
    tile = vision_config.image_size
    aspect = str(raw.get("image_aspect_ratio", "square"))
    pinpoints = _parse_pinpoints(raw.get("image_grid_pinpoints"), tile, location)
    if aspect.startswith("anyres"):
        if not pinpoints:
            raise CheckpointError(location, f"image_aspect_ratio {aspect!r} without image_grid_pinpoints")
        # LLaVA's own code (LongVA, GeoLLaVA-8K) lists grids as (width, height); ours are (height, width).
        pinpoints = [[int(h), int(w)] for w, h in pinpoints]
    else:
        pinpoints = [[tile, tile]]

    merge = str(raw.get("mm_patch_merge_type", "flat"))
    pruning: dict[str, Any] | None = None
    if match := _UNIRES_MAX.match(merge):
        per_tile = int(match.group(1))
        tiles = [(h // tile) * (w // tile) for h, w in pinpoints]
        pruning = {
            "strategy": "geollava",
            "budget": max(tiles) * per_tile,
            "geollava": {
                "max_tokens_per_tile": per_tile,
                "max_tiles_per_side": max(max(h, w) // tile for h, w in pinpoints),
                "max_tiles": max(tiles),
            },
        }
    elif merge.startswith("spatial_unpad") and aspect.startswith("anyres"):
        pruning = _anyres_defaults(pinpoints, vision_config)
    elif not aspect.startswith("anyres"):
        pruning = {"strategy": "downsample", "scales": [tile]}
    else:
        logger.warning(
            "%s: mm_patch_merge_type %r has no uhr equivalent; the model carries no pruning defaults, so "
            "choose a strategy (pruning.strategy)", redact(location), merge,
        )  # fmt: skip
    return UhrConfig(
        vision_config=vision_config,
        text_config=text_config,
        vision_feature_layer=int(raw.get("mm_vision_select_layer", -2)),
        image_grid_pinpoints=pinpoints,
        pruning_defaults=pruning,
    )


def _parse_pinpoints(value: Any, tile: int, location: str) -> Any:
    """LLaVA's `image_grid_pinpoints` as a list of (width, height) pairs: a list, the string of one
    (training scripts pass it so), or LLaVA-OneVision's range `"(1x1),...,(6x6)"` of tile counts."""
    if not isinstance(value, str):
        return value
    if "x" in value:
        counts = re.findall(r"\((\d+)x(\d+)\)", value)
        if len(counts) < 2:
            raise CheckpointError(location, f"image_grid_pinpoints {value!r} is not a range such as '(1x1),...,(6x6)'")
        (w0, h0), (w1, h1) = (tuple(map(int, pair)) for pair in (counts[0], counts[-1]))
        return [[w * tile, h * tile] for w in range(w0, w1 + 1) for h in range(h0, h1 + 1)]
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError) as error:
        raise CheckpointError(location, f"image_grid_pinpoints {value!r} is not a list of (width, height) pairs") from error


def _longva_optional(raw: dict[str, Any]) -> list[str]:
    optional = list(_OURS_ONLY)
    if not _UNIRES_MAX.match(str(raw.get("mm_patch_merge_type", ""))):
        optional.append(r"^reghead\.")
    if "unpad" not in str(raw.get("mm_patch_merge_type", "")):
        optional.append(r"^image_newline$")
    return optional


# ----------------------------------------------------------------------------------------------
# Remote directories
# ----------------------------------------------------------------------------------------------


_MANIFEST = ".uhr-manifest.json"


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return default_cache_dir() / "checkpoints"


def _fetch_directory(uri: str, storage: StorageConfig, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Copy a remote checkpoint directory to the local cache once; reuse it while the listing is unchanged.

    The cache entry is named by the URI and carries the listing it was copied from (sizes, ETags),
    so a checkpoint rewritten in place is copied again. The loaders of one node take turns (a lock
    beside the entry) and copy into a staging directory renamed into place, so none sees a
    half-written entry and one copy serves them all. An object whose key climbs out of the
    directory (`..`) is refused: it would be written outside the cache.
    """
    fs = storage.filesystem(uri)
    root = uri.rstrip("/")
    try:
        listing = fs.find(root, detail=True)
    except (OSError, ValueError) as error:
        raise CheckpointError(uri, f"cannot list the directory ({error})") from error
    if not listing:
        raise CheckpointError(uri, "no such directory, or it is empty")
    stripped = split_protocol(root)[1]
    sources: dict[str, str] = {}  # relative name -> the listed object
    manifest = {}
    for path, info in sorted(listing.items()):
        relative = posixpath.relpath(path, stripped)
        parts = relative.split("/")
        if posixpath.isabs(relative) or any(part in ("", ".", "..") for part in parts) or "\\" in relative:
            raise CheckpointError(uri, f"object {redact(path)!r} lies outside the checkpoint directory")
        sources[relative] = path
        manifest[relative] = [info.get("size"), str(info.get("ETag") or info.get("mtime") or "")]
    if "config.json" not in manifest:
        raise CheckpointError(uri, "no config.json at the top of the directory")
    cache = _cache_root(cache_dir) / hashlib.sha256(root.encode()).hexdigest()[:32]

    def cached() -> bool:
        manifest_file = cache / _MANIFEST
        return manifest_file.exists() and json.loads(manifest_file.read_text()) == manifest

    if cached():
        return cache
    with creating(cache.parent / f".{cache.name}"):  # its lock file hidden beside the entries
        if cached():  # another loader of this node copied it while this one waited
            return cache
        staging = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".partial-"))
        try:
            for relative, source in sources.items():
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(source, str(target))
            (staging / _MANIFEST).write_text(json.dumps(manifest))
            if cache.exists():  # a stale copy (the checkpoint changed): replace it
                stale = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".stale-"))
                cache.rename(stale / "old")
                staging.rename(cache)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                staging.rename(cache)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("copied %s (%d files) to %s", redact(uri), len(manifest), cache)
    return cache


def _safetensors_header(handle: Any) -> bytes:
    """The JSON header of the safetensors file open at its start in `handle`, as stored (8-byte length first)."""
    (length,) = struct.unpack("<Q", handle.read(8))
    return handle.read(length)


class _HeaderShapes:
    """Tensor keys and shapes of safetensors files, from their headers alone (a few KB per file)."""

    def __init__(self, fs: Any, paths: list[str]):
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in paths:
            with fs.open(path, "rb") as handle:
                header = json.loads(_safetensors_header(handle))
            self._shapes.update({key: tuple(info["shape"]) for key, info in header.items() if key != "__metadata__"})

    def keys(self) -> list[str]:
        return sorted(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]


def load_model_config(path_or_uri: str | os.PathLike[str], *, storage: StorageConfig | None = None) -> UhrConfig:
    """The `UhrConfig` `load_model` builds for a checkpoint, without reading its weights.

    Reads config.json and, for LongVA / GeoLLaVA-8K directories (whose tower config is inferred
    from weight shapes), only the safetensors headers: cheap even for a 7B model in object storage.
    Lets a driver plan reads (tile size, patch grid, pinpoints) without downloading the model.
    """
    location = os.fspath(path_or_uri)
    fs = (storage or StorageConfig()).filesystem(location)
    root = location.rstrip("/")
    try:
        raw = json.loads(fs.cat_file(f"{root}/config.json"))
    except FileNotFoundError as error:
        raise CheckpointError(location, "no config.json") from error
    model_type = raw.get("model_type")
    if model_type == UhrConfig.model_type:
        return UhrConfig.from_dict(raw)
    if model_type == "llava_next":
        return _llava_next_config(raw, location)
    if model_type in _LONGVA_TEXT_TYPES:
        files = _safetensors_files(fs, root)
        if not files:
            raise CheckpointError(location, "no safetensors weights to infer the vision tower from")
        return _longva_config(raw, _HeaderShapes(fs, files), location)
    raise CheckpointError(
        location, f"config.json model_type {model_type!r} is none of 'uhr', 'llava_next', 'llava_qwen', 'llava_llama'"
    )


def _safetensors_files(fs: Any, root: str) -> list[str]:
    """The safetensors weight files of the checkpoint directory `root` on `fs`: its index's shards, else every one."""
    try:
        names = {posixpath.basename(path) for path in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return []
    _check_one_layout(names, root)
    if _SAFETENSORS_INDEX in names:
        index = json.loads(fs.cat_file(f"{root}/{_SAFETENSORS_INDEX}"))
        return [f"{root}/{shard}" for shard in _index_shards(index, root, names)]
    return sorted(f"{root}/{name}" for name in names if name.endswith(".safetensors"))


# Content tags object stores keep per object (S3 and most S3 APIs, GCS, Azure), in fsspec's `info`.
_CONTENT_TAGS = ("ETag", "etag", "md5Hash", "crc32c", "content_md5")
_SAMPLE = 4096
_STRIDE = 16 * 2**20


def weights_fingerprint(path_or_uri: str | os.PathLike[str], *, storage: StorageConfig | None = None) -> str:
    """A sha256 that changes when a checkpoint's weights change, computed without downloading them.

    Covers every weight file, by name and size, and by the object store's content tag (ETag, MD5,
    CRC) where it keeps one; otherwise by samples of the content: a safetensors file's header and
    the first and last 4 KiB of every tensor, any other weight file's 4 KiB at every 16 MiB and its
    end. A few kilobytes a tensor, so a 7B model is fingerprinted in a moment; two checkpoints that
    differ only inside tensors, away from both ends of each, are not told apart. The location is
    not part of it: a moved or copied checkpoint keeps its fingerprint.
    """
    location = os.fspath(path_or_uri)
    fs = (storage or StorageConfig()).filesystem(location)
    root = location.rstrip("/")
    files = _safetensors_files(fs, root) or sorted(
        path for path in fs.ls(root, detail=False) if _is_pickle_weights(posixpath.basename(path))
    )
    if not files:
        raise CheckpointError(location, "no weights (*.safetensors, *.bin, *.pt or *.pth) to fingerprint")
    digest = hashlib.sha256()
    for path in files:
        info = fs.info(path)
        digest.update(f"{posixpath.basename(path)}\0{info['size']}\0".encode())
        tag = next((info[key] for key in _CONTENT_TAGS if info.get(key)), None)
        if tag is not None:
            digest.update(str(tag).encode())
        elif path.endswith(".safetensors"):
            _sample_safetensors(fs, path, digest)
        else:
            for start in [*range(0, info["size"], _STRIDE), max(0, info["size"] - _SAMPLE)]:
                digest.update(fs.cat_file(path, start=start, end=min(start + _SAMPLE, info["size"])))
    return digest.hexdigest()


def _sample_safetensors(fs: Any, path: str, digest: Any) -> None:
    """Feed `digest` a safetensors file's header and the first and last 4 KiB of each tensor's bytes."""
    with fs.open(path, "rb") as handle:
        header = _safetensors_header(handle)
        digest.update(header)
        data = 8 + len(header)
        spans = sorted(tuple(info["data_offsets"]) for key, info in json.loads(header).items() if key != "__metadata__")
        for begin, end in spans:
            for start in dict.fromkeys((begin, max(begin, end - _SAMPLE))):
                handle.seek(data + start)
                digest.update(handle.read(min(_SAMPLE, end - start)))


def load_tokenizer(path_or_uri: str | os.PathLike[str], *, storage: StorageConfig | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model(path_or_uri)` attaches, read without the weights.

    Only the directory's top-level files other than weights are fetched (a 7B checkpoint in object
    storage stays there), so CPU workers tokenise exactly as the model's prompts do.
    """
    location = os.fspath(path_or_uri)
    config = load_model_config(location, storage=storage)
    fs = (storage or StorageConfig()).filesystem(location)
    root = location.rstrip("/")
    model_type = json.loads(fs.cat_file(f"{root}/config.json")).get("model_type")
    if not is_remote(location):
        return _checkpoint_tokenizer(Path(location), location, model_type, config)
    with tempfile.TemporaryDirectory(prefix="uhr-tokenizer-") as local:
        stripped = split_protocol(root)[1]
        for path in fs.find(root):
            relative = posixpath.relpath(path, stripped)
            if "/" not in relative and not relative.endswith(_WEIGHT_SUFFIXES):
                fs.get_file(path, os.path.join(local, relative))
        return _checkpoint_tokenizer(Path(local), location, model_type, config)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name, got {dtype!r}")
    return value


def load_model(
    path_or_uri: str | os.PathLike[str],
    *,
    storage: StorageConfig | None = None,
    allow_pickle: bool = False,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[UhrForConditionalGeneration, PreTrainedTokenizerBase]:
    """Load a checkpoint directory (local path or object-store URI) as (model in eval mode, tokenizer).

    The format comes from config.json's `model_type`: "llava_next", "llava_qwen" / "llava_llama"
    (LongVA, GeoLLaVA-8K) or "uhr". `dtype` defaults to float32 for (a)/(b) and to the saved dtype
    for (c). Remote directories are copied under `cache_dir` (default `checkpoints/` in
    `uhr.cache.default_cache_dir()`). The pruning settings the checkpoint implies are in
    `model.config.pruning_defaults`.
    """
    location = os.fspath(path_or_uri)
    dtype = _as_dtype(dtype)
    if is_remote(location):
        directory = _fetch_directory(location, storage or StorageConfig(), cache_dir)
    else:
        directory = Path(location)
        if not directory.is_dir():
            raise CheckpointError(location, "not a directory")
    config_file = directory / "config.json"
    if not config_file.exists():
        raise CheckpointError(location, "no config.json")
    raw = json.loads(config_file.read_text())
    model_type = raw.get("model_type")
    files, safetensors = _weight_files(directory, allow_pickle)

    if model_type == UhrConfig.model_type:
        model, info = UhrForConditionalGeneration.from_pretrained(
            str(directory), dtype=dtype, local_files_only=True, use_safetensors=safetensors, output_loading_info=True
        )
        # As strict as (a) and (b): an export is the whole model, so any difference is damage.
        kinds = ("missing_keys", "unexpected_keys", "mismatched_keys")
        mismatch = {kind: sorted(map(str, keys))[:10] for kind in kinds if (keys := info.get(kind))}
        if mismatch:
            raise CheckpointError(location, f"weights do not match the model its config describes: {mismatch}")
        tokenizer = _load_tokenizer(directory, location, model.config)
    elif model_type == "llava_next" or model_type in _LONGVA_TEXT_TYPES:
        with ExitStack() as stack:
            tensors = _CheckpointTensors(files, safetensors, stack)
            if model_type == "llava_next":
                config = _llava_next_config(raw, location)
                table, optional = LLAVA_NEXT_KEY_MAP, [*_OURS_ONLY, r"^reghead\."]
            else:
                config = _longva_config(raw, tensors, location)
                table, optional = LONGVA_KEY_MAP, _longva_optional(raw)
            tokenizer = _checkpoint_tokenizer(directory, location, model_type, config)
            config.image_token_id = None  # set from the tokenizer below
            model = _empty_model(config, dtype)
            _copy_mapped(model, tensors, table, optional, location)
    else:
        raise CheckpointError(
            location, f"config.json model_type {model_type!r} is none of 'uhr', 'llava_next', 'llava_qwen', 'llava_llama'"
        )
    if (directory / "generation_config.json").exists():  # the checkpoint's stop tokens, among others
        model.language_model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.attach_tokenizer(tokenizer)
    if device is not None:
        model.to(device)
    return model.eval(), tokenizer


def save_model(
    model: UhrForConditionalGeneration,
    path_or_uri: str | os.PathLike[str],
    *,
    storage: StorageConfig | None = None,
) -> None:
    """Write our export (config.json, model.safetensors, generation_config.json, tokenizer files) to a directory or a URI.

    Weight files an earlier save left there are deleted first: a sharded export under a single-file
    one (or the reverse) would leave two sets of weights, and loaders disagree on which is the model.
    """
    location = os.fspath(path_or_uri)
    fs = (storage or StorageConfig()).filesystem(location)
    root = location.rstrip("/")
    if fs.isdir(root):
        for path in fs.ls(root, detail=False):
            name = posixpath.basename(path)
            if name.endswith(".safetensors") or name == _SAFETENSORS_INDEX or _is_pickle_weights(name):
                fs.rm(path)
    if not is_remote(location):
        model.save_pretrained(location)
        return
    with tempfile.TemporaryDirectory(prefix="uhr-export-") as staging:
        model.save_pretrained(staging)
        for name in sorted(os.listdir(staging)):
            fs.put_file(os.path.join(staging, name), f"{location.rstrip('/')}/{name}")


# ----------------------------------------------------------------------------------------------
# (d) tiny models
# ----------------------------------------------------------------------------------------------

TINY_CORPUS: tuple[str, ...] = (
    "How many ships are in the harbour?",
    "What colour is the roof inside the box?",
    "Is the road flooded after the storm?",
    "Is there a bridge over the river?",
    "How many storage tanks are near the port?",
    "Which direction does the runway point?",
    "Answer with the option's letter from the given choices directly.",
    "A. two B. three C. four D. five",
    "The roof is red. The road is not flooded. There are three ships.",
    "yes no left right north south east west forest water building farmland",
    "The airport has two runways and five airplanes parked at the terminal.",
    "Count the vehicles in the parking lot next to the stadium.",
)
"""Fixed text the tiny tokenizer is trained on."""

_TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 4,
}
_TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
TINY_PINPOINTS: list[list[int]] = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
"""LLaVA-NeXT's default grids scaled to the tiny 32-px tiles."""


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer of `build_tiny_model`: byte-level BPE trained on `TINY_CORPUS`."""
    return build_tokenizer(TINY_CORPUS, vocab_size=384, min_frequency=1)


def build_tiny_model(
    seed: int = 0, text_model: str = "qwen2", **overrides: Any
) -> tuple[UhrForConditionalGeneration, PreTrainedTokenizerBase]:
    """A tiny randomly initialised model and its tokenizer, identical for identical arguments.

    CLIP: hidden 32, 2 layers, 32-px tiles of 4-px patches (8 x 8 tokens per tile). LM (`qwen2` or
    `llama`): hidden 64, 2 layers, 4 query / 2 key-value heads. `overrides` are `UhrConfig` fields;
    `vision_config` / `text_config` dicts are merged into the tiny ones.
    """
    if text_model not in ("qwen2", "llama"):
        raise ValueError(f"text_model must be 'qwen2' or 'llama', got {text_model!r}")
    tokenizer = build_tiny_tokenizer()
    vision = {**_TINY_VISION, **overrides.pop("vision_config", {})}
    text = {
        **_TINY_TEXT,
        "model_type": text_model,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
        **overrides.pop("text_config", {}),
    }
    settings = {"image_grid_pinpoints": TINY_PINPOINTS, "tile_batch_size": 16, **overrides}
    config = UhrConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id, **settings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = UhrForConditionalGeneration(config)
    model.attach_tokenizer(tokenizer)
    return model.eval(), tokenizer


__all__ = [
    "CheckpointError",
    "LLAVA_NEXT_KEY_MAP",
    "LONGVA_KEY_MAP",
    "LoadReport",
    "TINY_CORPUS",
    "TINY_PINPOINTS",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "load_model",
    "save_model",
    "weights_fingerprint",
]
