"""FLOP and GPU-time model of the UHR model at real sizes, for sizing GPUs.

What a strategy asks of the model (`Workload`: tiles through the vision tower, tokens through the
projector, LM importance passes, answers) is measured on the tiny benchmark model, whose tiles have
the real geometry, and priced here with the dimensions of a real model (`real_model_config()`:
CLIP ViT-L/14-336 + Qwen2-7B).

FLOPs count a multiply-add as 2 and only the matrix products: layer norms, softmax, activations,
biases and rotary embeddings are well under 1% at these sizes. Attention is counted in full
(4 L^2 x width per layer for L positions attending to L), as torch's `FlopCounterMode` and the papers
count it; a causal kernel that skips the masked half does less.

* Vision tower, one S x S tile, patch p, g = S / p, T = g^2 + 1 tokens (with CLS), width d, MLP
  width f, n layers run (up to the selected one):
  `2 * 3 p^2 d * g^2` (patch embedding) `+ n * (2 * (4 d^2 + 2 d f) * T + 4 T^2 d)`.
* Projector (`mlp2x_gelu`), per token: `2 * (d D + D^2)`.
* LM decoder layer, q new positions attending to k (k = q in a prefill), width D, h heads of size e,
  h_kv key/value heads, gated MLP of width F: `2 * (2 D h e + 2 D h_kv e + 3 D F) * q + 4 q k h e`.
  LM head: `2 D V` per generated token.
* Importance pass (UHR-BAT, c2f) at decoder layer m over L positions: m full layers plus layer m's
  query/key projections.
* Answer over L = N visual + P text positions, A answer tokens: prefill of all layers and the LM
  head for the first token, then A - 1 decode steps of one position over L + i. With a shared
  visual prefix (the same N tokens for every question of a scene, as `none`, `downsample` and
  `geollava` give), the N positions are prefilled once per scene and each question prefills only
  its P positions over N + P.

GPU time: compute-bound work (tower, projector, prefills) takes FLOPs / (peak x `mfu`); a decode
step of a small batch is bound by reading the LM weights (once per batch) and each row's KV cache,
bytes / (bandwidth x `mbu`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field
from transformers import PreTrainedConfig

from uhr.model.config import UhrConfig
from uhr.model.importance import resolve_layer

QWEN2_7B_TEXT_CONFIG: dict[str, object] = {
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}
"""Qwen2-7B's published `config.json` dimensions (the LM of LongVA / GeoLLaVA-8K)."""


def real_model_config() -> UhrConfig:
    """The real model's configuration, no weights: `UhrConfig`'s default tower (CLIP ViT-L/14-336,
    penultimate layer) and Qwen2-7B."""
    return UhrConfig(text_config=dict(QWEN2_7B_TEXT_CONFIG))


class GpuSpec(BaseModel):
    """Peak figures of one accelerator (vendor datasheet, dense bf16)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Accelerator name as printed in reports.")
    peak_tflops: float = Field(gt=0, description="Dense bf16 tensor-core peak, TFLOP/s (no sparsity).")
    memory_tb_s: float = Field(gt=0, description="HBM bandwidth, TB/s.")


A100 = GpuSpec(name="A100-SXM4-80GB", peak_tflops=312.0, memory_tb_s=2.039)
H100 = GpuSpec(name="H100-SXM5-80GB", peak_tflops=989.0, memory_tb_s=3.35)


class Utilisation(BaseModel):
    """How much of a GPU's peak the time estimates assume is reached."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mfu: float = Field(0.4, gt=0, le=1, description="Fraction of peak FLOP/s in compute-bound work (tower, prefill).")
    mbu: float = Field(0.7, gt=0, le=1, description="Fraction of peak memory bandwidth in batch-1 decode steps.")
    bytes_per_param: int = Field(2, ge=1, description="Bytes per weight and per KV-cache value (2: bf16).")


# ----------------------------------------------------------------------------------------------
# FLOPs of the model's parts
# ----------------------------------------------------------------------------------------------


def tower_depth(config: UhrConfig) -> int:
    """Encoder layers run to reach `vision_feature_layer` (the later ones are skipped)."""
    layer = config.vision_feature_layer
    return layer if layer > 0 else config.vision_config.num_hidden_layers + 1 + layer


def vision_tile_flops(config: UhrConfig) -> int:
    """FLOPs of one tile through the patch embedding and the tower up to its selected layer."""
    vision = config.vision_config
    patch, width, mlp = vision.patch_size, vision.hidden_size, vision.intermediate_size
    patches = (vision.image_size // patch) ** 2
    tokens = patches + 1
    embedding = 2 * 3 * patch * patch * width * patches
    layer = 2 * (4 * width * width + 2 * width * mlp) * tokens + 4 * tokens * tokens * width
    return embedding + tower_depth(config) * layer


def projector_flops(config: UhrConfig, tokens: int) -> int:
    """FLOPs of `tokens` rows through the `mlp2x_gelu` projector."""
    vision_width, width = config.vision_config.hidden_size, config.text_config.hidden_size
    return 2 * (vision_width * width + width * width) * tokens


@dataclass(frozen=True)
class _LmDims:
    width: int
    heads: int
    head_dim: int
    kv_heads: int
    mlp: int
    vocab: int
    layers: int

    @staticmethod
    def of(text: PreTrainedConfig) -> _LmDims:
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return _LmDims(
            width=text.hidden_size,
            heads=heads,
            head_dim=head_dim,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            mlp=text.intermediate_size,
            vocab=text.vocab_size,
            layers=text.num_hidden_layers,
        )

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's matrices (attention q, k, v, o and the gated MLP)."""
        attention = 2 * self.width * self.heads * self.head_dim + 2 * self.width * self.kv_heads * self.head_dim
        return attention + 3 * self.width * self.mlp

    def layer_flops(self, new: int, positions: int) -> int:
        """One decoder layer: `new` positions attending to `positions` (including themselves)."""
        return 2 * self.layer_params * new + 4 * new * positions * self.heads * self.head_dim

    @property
    def head_flops(self) -> int:
        return 2 * self.width * self.vocab


def lm_prefill_flops(text: PreTrainedConfig, positions: int, layers: int | None = None) -> int:
    """A prefill of `positions` through `layers` decoder layers (all by default), no LM head."""
    dims = _LmDims.of(text)
    return (dims.layers if layers is None else layers) * dims.layer_flops(positions, positions)


def importance_flops(config: UhrConfig, positions: int, layer: int | None, past: int = 0) -> int:
    """An importance pass of `positions` new positions over `past` cached ones: the layers before
    `layer` (None: the middle one, as the strategies default) and that layer's query/key projections."""
    dims = _LmDims.of(config.text_config)
    index = resolve_layer(dims.layers // 2 if layer is None else layer, dims.layers)
    query_key = 2 * (dims.width * dims.heads * dims.head_dim + dims.width * dims.kv_heads * dims.head_dim) * positions
    return index * dims.layer_flops(positions, past + positions) + query_key


def answer_flops(config: UhrConfig, positions: int, answer_tokens: int, cached: int = 0) -> tuple[int, int]:
    """(prefill, decode) FLOPs of answering over `positions`, of which `cached` are already in the KV
    cache, with `answer_tokens` generated tokens."""
    if not 0 <= cached < positions:
        raise ValueError(f"cached positions must be in [0, {positions}), got {cached}")
    dims = _LmDims.of(config.text_config)
    prefill = dims.layers * dims.layer_flops(positions - cached, positions) + dims.head_flops
    decode = sum(dims.layers * dims.layer_flops(1, positions + i) + dims.head_flops for i in range(1, answer_tokens))
    return prefill, decode


def lm_weight_bytes(config: UhrConfig, bytes_per_param: int) -> int:
    """Bytes of LM weights a decode step reads (decoder layers, final norm skipped, LM head)."""
    dims = _LmDims.of(config.text_config)
    return (dims.layers * dims.layer_params + dims.width * dims.vocab) * bytes_per_param


def kv_cache_bytes(config: UhrConfig, positions: int, bytes_per_param: int) -> int:
    """Bytes of keys and values a decode step reads for `positions` cached positions."""
    dims = _LmDims.of(config.text_config)
    return 2 * dims.layers * dims.kv_heads * dims.head_dim * positions * bytes_per_param


# ----------------------------------------------------------------------------------------------
# A strategy's workload, priced
# ----------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """What one phase of a strategy asked of the model; model-size independent."""

    tiles: int = 0
    """Tiles through the vision tower."""
    projected: int = 0
    """Token rows through the projector."""
    importance: list[int] = field(default_factory=list)
    """Visual tokens of each importance prefix: an LM pass over visual tokens that questions are then
    scored against (once per scene when a scene's questions share them)."""
    importance_questions: list[int] = field(default_factory=list)
    """For each question scored against a prefix, the prefix's visual tokens (the question's text,
    added when priced, runs over them)."""
    answers: list[int] = field(default_factory=list)
    """Visual tokens of each answered question."""

    def __add__(self, other: Workload) -> Workload:
        return Workload(
            tiles=self.tiles + other.tiles,
            projected=self.projected + other.projected,
            importance=self.importance + other.importance,
            importance_questions=self.importance_questions + other.importance_questions,
            answers=self.answers + other.answers,
        )


@dataclass(frozen=True)
class Cost:
    """FLOPs of a workload and what they take on one GPU."""

    tower: float
    projector: float
    importance: float
    prefill: float
    decode: float
    compute_s: float
    """Tower, projector, importance passes and prefills at `mfu`."""
    decode_s: float
    """Decode steps at batch 1, memory-bound."""

    @property
    def flops(self) -> float:
        return self.tower + self.projector + self.importance + self.prefill + self.decode

    @property
    def seconds(self) -> float:
        return self.compute_s + self.decode_s


def price(
    workload: Workload,
    config: UhrConfig,
    gpu: GpuSpec,
    utilisation: Utilisation,
    *,
    prompt_tokens: int,
    answer_tokens: int,
    answer_batch: int = 1,
    importance_layer: int | None = None,
    shared_visual: int = 0,
) -> Cost:
    """FLOPs and GPU seconds of `workload` on the model `config` describes.

    `prompt_tokens` text positions (chat template and question) run over each scored question's
    importance prefix (the prefix itself is priced over its visual tokens alone) and join every
    answer's visual tokens; each answer generates `answer_tokens` tokens, decoded in batches of
    `answer_batch` answers (a decode step reads the weights once for the whole batch).
    `shared_visual`: the answers' first `shared_visual` visual tokens are the same (all of them for a
    query-independent strategy, the scene thumbnail for `c2f`), prefilled once as `answer` does.
    """
    if workload.answers and not 0 <= shared_visual <= min(workload.answers):
        raise ValueError(
            f"shared visual tokens must be in [0, {min(workload.answers)}] (the fewest any answer has), got {shared_visual}"
        )
    if answer_batch < 1:
        raise ValueError(f"answer_batch must be >= 1, got {answer_batch}")
    tower = workload.tiles * vision_tile_flops(config)
    projector = projector_flops(config, workload.projected)
    importance = sum(importance_flops(config, visual, importance_layer) for visual in workload.importance) + sum(
        importance_flops(config, prompt_tokens, importance_layer, past=visual) for visual in workload.importance_questions
    )
    prefill = decode = 0
    if shared_visual and workload.answers:
        prefill += lm_prefill_flops(config.text_config, shared_visual)
    for visual in workload.answers:
        first, rest = answer_flops(config, visual + prompt_tokens, answer_tokens, cached=shared_visual)
        prefill += first
        decode += rest
    rate = gpu.peak_tflops * 1e12 * utilisation.mfu
    decode_s = sum(
        _decode_seconds(
            config, gpu, utilisation, [v + prompt_tokens for v in workload.answers[i : i + answer_batch]], answer_tokens
        )
        for i in range(0, len(workload.answers), answer_batch)
    )
    return Cost(
        tower=tower,
        projector=projector,
        importance=importance,
        prefill=prefill,
        decode=decode,
        compute_s=(tower + projector + importance + prefill) / rate,
        decode_s=decode_s,
    )


def _decode_seconds(
    config: UhrConfig, gpu: GpuSpec, utilisation: Utilisation, positions: list[int], answer_tokens: int
) -> float:
    """Decode steps of one batch of answers over `positions` each: per step, the weights once and every
    row's KV cache read at `mbu`, or the batch's FLOPs at `mfu`, whichever takes longer."""
    dims = _LmDims.of(config.text_config)
    bandwidth = gpu.memory_tb_s * 1e12 * utilisation.mbu
    rate = gpu.peak_tflops * 1e12 * utilisation.mfu
    weights = lm_weight_bytes(config, utilisation.bytes_per_param)
    seconds = 0.0
    for i in range(1, answer_tokens):
        step_bytes = weights + sum(kv_cache_bytes(config, p + i, utilisation.bytes_per_param) for p in positions)
        step_flops = sum(dims.layers * dims.layer_flops(1, p + i) + dims.head_flops for p in positions)
        seconds += max(step_bytes / bandwidth, step_flops / rate)
    return seconds


__all__ = [
    "A100",
    "H100",
    "QWEN2_7B_TEXT_CONFIG",
    "Cost",
    "GpuSpec",
    "Utilisation",
    "Workload",
    "answer_flops",
    "importance_flops",
    "kv_cache_bytes",
    "lm_prefill_flops",
    "lm_weight_bytes",
    "price",
    "projector_flops",
    "real_model_config",
    "tower_depth",
    "vision_tile_flops",
]
