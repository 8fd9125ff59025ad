"""The UHR multimodal model: CLIP tower, `mlp2x_gelu` projector, causal LM, pruning-ready parts.

Read top to bottom: output dataclass, projector, UHR-BAT scale-specific positional term,
GeoLLaVA-8K affinity head, pre-trained base, then `UhrForConditionalGeneration` with its vision
path (`encode_tiles`, `encode_view`, `project`), its prompt path (chat template with the image
placeholder expanded into visual embeddings) and its two entry points, `answer` (batched greedy
generation) and `forward` (logits and the loss, for fine-tuning with pruning in the loop).

Shapes: T tiles of S x S pixels; g = S // patch patch tokens per tile side; D_v tower width; D LM
width; N visual tokens handed to the LM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput

from uhr.model import tiling
from uhr.model.config import UhrConfig
from uhr.model.importance import DecoderPrefix, decoder_attention, decoder_prefix
from uhr.model.pruning.base import PrunedTokens, TokenGrid
from uhr.model.tokenizer import render_chat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""Label of positions the loss skips (visual tokens, prompt, padding)."""


@dataclass
class UhrCausalLMOutput(ModelOutput):
    """Output of `UhrForConditionalGeneration.forward` on the expanded sequence (image token -> N rows).

    loss: `(1,)` next-token cross-entropy over labelled positions, when `labels` were given.
    logits: `(B, L, vocab)`, L = the longest row after expansion (rows right-padded).
    attention_mask: `(B, L)` of the expanded, right-padded rows.
    labels: `(B, L)` expanded labels (-100 on visual tokens and padding), when `labels` were given.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass
class ImportancePrefix:
    """Visual tokens in the importance prompt, run through the LM once for every question on them."""

    head: list[int]
    """Chat-template token ids before the image slot."""
    count: int
    """N, the visual tokens in the image slot."""
    decoder: DecoderPrefix
    """The LM's keys and values over head + visual tokens, up to the scoring layer."""


class UhrMultiModalProjector(nn.Module):
    """`mlp2x_gelu`: (..., D_v) -> Linear -> GELU -> Linear -> (..., D), as LLaVA-NeXT's projector."""

    def __init__(self, config: UhrConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.hidden_size, config.text_config.hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text_config.hidden_size, config.text_config.hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class UhrScaleEmbedding(nn.Module):
    """UHR-BAT's scale-specific positional term in LM space.

    A learned base 2D position table (D, g, g) spans the scene; it is bilinearly interpolated to a
    scale's valid token grid (H, W) and a learned per-scale vector (D,) is added. Both start at
    zero so an untrained model is unchanged by the term.
    """

    def __init__(self, num_scales: int, grid: int, dim: int):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(dim, grid, grid))
        self.scale = nn.Parameter(torch.zeros(num_scales, dim))

    def forward(
        self, scale: int, height: int, width: int, extent: tuple[float, float] | None = None
    ) -> torch.Tensor:
        """(H, W, D) positional term for scale index `scale` on an `height` x `width` token grid.

        `extent` is the scene's (height, width) in tokens of this grid, when the grid's last row or
        column sees only part of a token's worth of scene (a view that is no whole number of
        patches): the table is then laid over the scene rather than over the whole grid, so a
        scene location gets the same term at every scale. None: the grid spans the scene exactly.
        """
        if not 0 <= scale < self.scale.shape[0]:
            raise ValueError(f"scale index {scale} outside the {self.scale.shape[0]} scales of the embedding table")
        if height <= 0 or width <= 0:
            raise ValueError(f"token grid must be non-empty, got {height}x{width}")
        if extent is None or extent == (height, width):
            # (1, D, g, g) -> (1, D, H, W) -> (H, W, D)
            position = F.interpolate(self.position[None], size=(height, width), mode="bilinear", align_corners=False)
            return position[0].permute(1, 2, 0) + self.scale[scale]
        # Token centres as fractions of the scene, in grid_sample's [-1, 1] (half-pixel centres, as above).
        device = self.position.device
        y = (torch.arange(height, device=device) + 0.5) / extent[0] * 2 - 1
        x = (torch.arange(width, device=device) + 0.5) / extent[1] * 2 - 1
        where = torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1).to(self.position.dtype)  # (H, W, 2) as (x, y)
        position = F.grid_sample(self.position[None], where[None], mode="bilinear", padding_mode="border", align_corners=False)
        return position[0].permute(1, 2, 0) + self.scale[scale]


class UhrAffinityHead(nn.Module):
    """GeoLLaVA-8K's affinity head (`reghead`): which of its 3 x 3 neighbours each token belongs with.

    Depthwise 3 x 3 conv (no bias) on the D_v tower channels, then a 1 x 1 conv to 9 logits (bias
    zero-initialised), softmax over the 9 neighbour offsets in row-major (dy, dx) order,
    dy, dx in {-1, 0, 1}.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.pw = nn.Conv2d(dim, 9, kernel_size=1, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(..., g, g, D_v) tower features -> (..., g, g, 9) neighbour probabilities."""
        lead, (height, width, dim) = features.shape[:-3], features.shape[-3:]
        # (..., g, g, D_v) -> (B, D_v, g, g)
        x = features.reshape(-1, height, width, dim).permute(0, 3, 1, 2)
        logits = self.pw(self.dw(x))  # (B, 9, g, g)
        return logits.permute(0, 2, 3, 1).softmax(dim=-1).reshape(*lead, height, width, 9)


class UhrPreTrainedModel(PreTrainedModel):
    config: UhrConfig
    config_class = UhrConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, UhrScaleEmbedding):
            init.zeros_(module.position)
            init.zeros_(module.scale)
        elif isinstance(module, UhrForConditionalGeneration):
            init.normal_(module.image_newline, mean=0.0, std=1 / math.sqrt(self.config.text_config.hidden_size))


class UhrForConditionalGeneration(UhrPreTrainedModel):
    """CLIP tower + `mlp2x_gelu` projector + causal LM, with the parts the pruning strategies use.

    Submodules: `vision_tower` (CLIPVisionModel), `multi_modal_projector`, `language_model`
    (AutoModelForCausalLM), `image_newline` (D,), `scale_embedding` (UHR-BAT), `reghead`
    (GeoLLaVA-8K). The tokenizer rides along (`attach_tokenizer`) because `answer` and
    `visual_importance` build prompts from plain questions; `save_pretrained` writes it too.
    """

    def __init__(self, config: UhrConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = UhrMultiModalProjector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.scale_embedding = UhrScaleEmbedding(config.num_scales, config.patch_grid, config.text_config.hidden_size)
        self.reghead = UhrAffinityHead(config.vision_config.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self.post_init()

    # -- plumbing ------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def attach_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Use `tokenizer` for prompts; it must know `config.image_token` as one token."""
        image_id = tokenizer.convert_tokens_to_ids(self.config.image_token)
        if image_id is None or image_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no token for the image placeholder {self.config.image_token!r}")
        if self.config.image_token_id is not None and image_id != self.config.image_token_id:
            raise ValueError(
                f"tokenizer maps {self.config.image_token!r} to id {image_id}, the model expects {self.config.image_token_id}"
            )
        if tokenizer.chat_template is None:
            raise ValueError("tokenizer has no chat template; prompts are built with it")
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer needs a pad token and an eos token for batched generation")
        self.config.image_token_id = image_id
        self._tokenizer = tokenizer

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise RuntimeError("no tokenizer attached: load the model with uhr.model.load_model or call attach_tokenizer")
        return self._tokenizer

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        """Our export: config.json + model.safetensors + the LM's generation_config.json (its stop
        tokens among others) (+ the attached tokenizer's files)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.language_model.generation_config.save_pretrained(save_directory)
        if self._tokenizer is not None:
            self._tokenizer.save_pretrained(save_directory)

    # -- vision path ---------------------------------------------------------------------------

    @property
    def tile_size(self) -> int:
        """Pixel side S of one tower input tile."""
        return self.config.tile_size

    @property
    def patch_grid(self) -> int:
        """Patch tokens g per tile side."""
        return self.config.patch_grid

    @property
    def _selected_depth(self) -> int:
        """How many encoder layers run to reach `vision_feature_layer` (hidden_states[k] follows layer k)."""
        layer = self.config.vision_feature_layer
        return layer if layer > 0 else self.config.vision_config.num_hidden_layers + 1 + layer

    @property
    def selected_vision_layer(self) -> nn.Module:
        """The CLIP encoder layer whose output is the selected feature (GeoLLaVA reads its q/v_proj)."""
        return self.vision_tower.encoder.layers[self._selected_depth - 1]

    def _tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(t, 3, S, S) normalised pixels -> (t, 1 + g*g, D_v) selected-layer states, CLS first.

        Runs only the layers up to the selected one: the later ones would be discarded.
        """
        tower = self.vision_tower
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
        for layer in tower.encoder.layers[: self._selected_depth]:
            hidden = layer(hidden, None)
        return hidden

    def encode_tiles(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (T, S, S, 3) tiles -> (features (T, g, g, D_v), cls (T, D_v)) of the selected layer.

        CLIP-normalised here, run `tile_batch_size` tiles at a time; differentiable when grad is on.
        """
        size, grid = self.tile_size, self.patch_grid
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tuple(tiles.shape[1:]) != (size, size, 3):
            raise ValueError(f"tiles must be uint8 (T, {size}, {size}, 3), got {tiles.dtype} {tuple(tiles.shape)}")
        dim = self.config.vision_config.hidden_size
        device, dtype = self.vision_tower.device, self.vision_tower.dtype
        if tiles.shape[0] == 0:
            return torch.zeros(0, grid, grid, dim, device=device, dtype=dtype), torch.zeros(0, dim, device=device, dtype=dtype)
        features, cls = [], []
        for chunk in tiles.split(self.config.tile_batch_size):
            pixel_values = tiling.clip_normalize(chunk.to(device, non_blocking=True)).to(dtype)
            hidden = self._tower_features(pixel_values)  # (t, 1 + g*g, D_v)
            cls.append(hidden[:, 0])
            features.append(hidden[:, 1:].reshape(-1, grid, grid, dim))
        return torch.cat(features), torch.cat(cls)

    def encode_view(self, view: np.ndarray, scale: int, box: tiling.Box) -> TokenGrid:
        """Encode an (H, W, 3) uint8 view padded bottom/right to whole tiles, tiles in raster order.

        `box` is the scene-pixel box the padded tile grid covers; tokens that see only padding are
        marked invalid.
        """
        padded = tiling.pad_to_tiles(view, self.tile_size)
        rows, cols = padded.shape[0] // self.tile_size, padded.shape[1] // self.tile_size
        features, cls = self.encode_tiles(torch.from_numpy(tiling.cut_tiles(padded, self.tile_size)))
        grid, dim = self.patch_grid, features.shape[-1]
        patch = self.config.vision_config.patch_size
        valid = tiling.valid_patches(view.shape[0], view.shape[1], rows, cols, grid, patch)
        return TokenGrid(
            scale=scale,
            features=features.reshape(rows, cols, grid, grid, dim),
            cls=cls.reshape(rows, cols, dim),
            box=tuple(float(v) for v in box),
            valid=torch.from_numpy(valid).to(features.device),
        )

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., D_v) tower features -> (..., D) LM inputs through the `mlp2x_gelu` projector."""
        return self.multi_modal_projector(features)

    # -- prompt path ---------------------------------------------------------------------------

    def _prompt(self, question: str, images: int = 1) -> tuple[list[int], list[int], list[int]]:
        """Chat-template prompt for one question with `images` image placeholders before it.

        Several images are written as lmms-eval writes them for LLaVA models: the placeholders
        joined by spaces, then a newline and the question. Returns (token ids, indices of the image
        tokens in order, indices of the question's own tokens).
        """
        tokenizer, image_token = self.tokenizer, self.config.image_token
        if image_token in question:
            raise ValueError(f"question must not contain the image placeholder {image_token!r}: {question!r}")
        if images < 1:
            raise ValueError(f"a prompt needs at least one image, got {images}")
        messages = [{"role": "user", "content": " ".join([image_token] * images) + f"\n{question}"}]
        text = render_chat(tokenizer, messages, add_generation_prompt=True, image_token=image_token)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        image_positions = [i for i, token in enumerate(ids) if token == self.config.image_token_id]
        if len(image_positions) != images:
            raise ValueError(f"prompt holds {len(image_positions)} image tokens, expected {images}: {text!r}")
        start = text.index(question, text.rindex(image_token) + len(image_token))
        end = start + len(question)
        question_tokens = [i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a < end and b > start]
        return ids, image_positions, question_tokens

    def _embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """LM input embeddings of `input_ids`; image tokens (replaced later) may lie past the LM vocabulary."""
        return self.get_input_embeddings()(input_ids.masked_fill(input_ids == self.config.image_token_id, 0))

    def _splice(self, input_ids: torch.Tensor, positions: list[int], visual: list[torch.Tensor]) -> torch.Tensor:
        """(L,) ids with image tokens at `positions`, one (N_k, D) visual per position -> (L - K + sum N_k, D) LM inputs."""
        embeds = self._embed_text(input_ids)
        return _replace_at(embeds, positions, [tokens.to(embeds.device, embeds.dtype) for tokens in visual])

    def _check_visual(self, visual: PrunedTokens) -> None:
        dim = self.config.text_config.hidden_size
        if visual.embeds.ndim != 2 or visual.embeds.shape[1] != dim:
            raise ValueError(f"visual embeds must be (N, {dim}), got {tuple(visual.embeds.shape)}")

    # -- entry points --------------------------------------------------------------------------

    def answer(
        self, visual: Sequence[PrunedTokens | Sequence[PrunedTokens]], questions: list[str], *, max_new_tokens: int = 64
    ) -> list[str]:
        """Greedy answers, one per (visual tokens, question) pair.

        A question's visual input is one image's tokens or, for a multi-image question (XLRS-Bench's
        bi-temporal pairs), a sequence of them, one per image in order: each image gets its own
        placeholder, written as lmms-eval writes them for LLaVA models (joined by spaces, then a
        newline and the question).

        Greedy, not sampled, whatever the checkpoint's generation config says; its other settings
        (stop tokens, a repetition penalty, suppressed tokens) apply, as they do in transformers'
        `generate` and so in the evaluations the checkpoints' authors published.

        Questions whose (first) image's visual tokens begin alike share one prefill of the prompt up
        to the end of the common part: its key/value cache is computed once and copied to each of
        them. A query-independent strategy gives every question on a scene the same tokens, so the
        scene's image is read by the LM once, not once per question; `c2f` puts the scene's
        thumbnail before each question's own fine tokens, so the thumbnail is. The rest of each
        prompt is prefilled per question, left-padded in one batch, as are the questions that share
        nothing. Returns only the new text, special tokens removed, stripped.
        """
        if len(visual) != len(questions):
            raise ValueError(f"got {len(visual)} visual inputs for {len(questions)} questions")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not questions:
            return []
        images = per_image(visual)
        device = self.get_input_embeddings().weight.device
        generation_config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.stop_token_ids(),
        )
        answers: list[str] = [""] * len(questions)
        with torch.inference_mode():
            prompts = []
            for tokens, question in zip(images, questions):
                for image in tokens:
                    self._check_visual(image)
                ids, positions, _ = self._prompt(question, images=len(tokens))
                prompts.append((torch.tensor(ids, device=device), positions))
            embeds = [[image.embeds for image in tokens] for tokens in images]
            alone: list[int] = []
            for group, shared in _shared_prefix_groups([tokens[0] for tokens in images], prompts):
                if len(group) == 1:
                    alone.extend(group)
                    continue
                ids, (first, *_) = prompts[group[0]]
                prefix = self._splice(ids[: first + 1], [first], [embeds[group[0]][0][:shared]])  # (P, D)
                cache = self.language_model(inputs_embeds=prefix[None], use_cache=True, logits_to_keep=1).past_key_values
                cache.batch_repeat_interleave(len(group))
                # Each suffix: the rest of the first image's tokens, then the prompt after its slot.
                suffixes = []
                for i in group:
                    suffix_ids, positions = prompts[i][0][first:], [p - first for p in prompts[i][1]]
                    suffixes.append(self._splice(suffix_ids, positions, [embeds[i][0][shared:], *embeds[i][1:]]))
                texts = self._generate([prefix] * len(group), suffixes, generation_config, cache)
                for i, text in zip(group, texts):
                    answers[i] = text
            if alone:
                rows = [self._splice(prompts[i][0], prompts[i][1], embeds[i]) for i in alone]
                empty = rows[0][:0]
                for i, text in zip(alone, self._generate([empty] * len(rows), rows, generation_config, None)):
                    answers[i] = text
        return answers

    def stop_token_ids(self) -> list[int]:
        """Tokens that end an answer: the tokenizer's end of sequence and the checkpoint's own stop
        tokens (its generation config's `eos_token_id`, e.g. Qwen2's `<|im_end|>` and
        `<|endoftext|>`), so an answer ends with its turn whichever of them the model emits."""
        configured = self.language_model.generation_config.eos_token_id
        configured = [] if configured is None else [configured] if isinstance(configured, int) else list(configured)
        ids = [self.tokenizer.eos_token_id, *configured]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def _generate(
        self,
        prefixes: list[torch.Tensor],
        suffixes: list[torch.Tensor],
        generation_config: GenerationConfig,
        cache: Cache | None,
    ) -> list[str]:
        """Greedy generation for rows `prefix + suffix` of LM input embeddings, the suffixes left-padded.

        Prefixes are all one length; `cache`, when given, holds their keys and values, so only the
        suffixes are prefilled. Padding sits between prefix and suffix, masked out: the position ids
        that `generate` derives from the attention mask skip it.
        """
        device = suffixes[0].device
        length = max(suffix.shape[0] for suffix in suffixes)
        pad = self.get_input_embeddings()(torch.tensor([self.tokenizer.pad_token_id], device=device))[0]
        inputs_embeds = torch.stack(
            [torch.cat([prefix, pad.expand(length - suffix.shape[0], -1), suffix]) for prefix, suffix in zip(prefixes, suffixes)]
        )
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=device)
        for row, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
            attention_mask[row, prefix.shape[0] : prefix.shape[0] + length - suffix.shape[0]] = 0
        # With inputs_embeds only, generate returns just the new tokens.
        generated = self.language_model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, past_key_values=cache, generation_config=generation_config
        )
        return [text.strip() for text in self.tokenizer.batch_decode(generated, skip_special_tokens=True)]

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        visual: Sequence[PrunedTokens | Sequence[PrunedTokens]] | None = None,
        **kwargs: Any,
    ) -> UhrCausalLMOutput:
        """Logits (and the loss with `labels`) with each row's image tokens expanded into its visual tokens.

        input_ids: `(B, L)`, as many image tokens per row as that row has images when `visual` is
            given (none otherwise); padding (attention_mask 0) may be on either side and is dropped
            before expansion.
        labels: `(B, L)`, -100 where no loss is wanted; visual positions get -100.
        visual: `B` entries, each one image's selection or, for a multi-image row, a sequence of
            them in placeholder order (as `answer` takes them); an image token becomes its
            selection's embeddings, through which gradients reach the projector and the tower (kept
            and merged tokens alike).
        Rows are re-padded on the right after expansion; extra kwargs go to the language model.
        """
        image_id = self.config.image_token_id
        if image_id is None:
            raise RuntimeError("config.image_token_id is unset; attach a tokenizer first")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        counts = ((input_ids == image_id) & attention_mask.bool()).sum(dim=1)
        if visual is None:
            if counts.any():
                raise ValueError(f"Image features and image tokens do not match: tokens: {int(counts.sum())}, features: 0")
            inputs: dict[str, Any] = {"input_ids": input_ids}
            mask, expanded_labels = attention_mask, labels
        else:
            inputs_embeds, mask, expanded_labels = self._expand(input_ids, attention_mask, labels, visual, counts)
            inputs = {"inputs_embeds": inputs_embeds}
        out = self.language_model(**inputs, attention_mask=mask, labels=expanded_labels, **kwargs)
        return UhrCausalLMOutput(
            loss=out.loss,
            logits=out.logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            attention_mask=mask,
            labels=expanded_labels,
        )

    def _expand(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None,
        visual: Sequence[PrunedTokens | Sequence[PrunedTokens]],
        counts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Each row's image tokens replaced by their visual tokens, padding dropped, rows re-padded on the right.

        Returns (B, L', D) inputs_embeds, (B, L') attention mask and (B, L') labels (-100 on visual
        positions and padding), or None without labels.
        """
        images = per_image(visual)
        if len(images) != input_ids.shape[0] or counts.tolist() != [len(row) for row in images]:
            raise ValueError(
                "Image features and image tokens do not match: "
                f"image tokens per row {counts.tolist()}, images per row {[len(row) for row in images]}"
            )
        rows, row_labels = [], []
        for i, tokens in enumerate(images):
            for image in tokens:
                self._check_visual(image)
            keep = attention_mask[i].bool()
            ids = input_ids[i][keep]
            positions = (ids == self.config.image_token_id).nonzero()[:, 0].tolist()
            rows.append(self._splice(ids, positions, [image.embeds for image in tokens]))  # (L_i', D)
            if labels is not None:
                fills = [labels.new_full((len(image),), IGNORE_INDEX) for image in tokens]
                row_labels.append(_replace_at(labels[i][keep], positions, fills))
        length = max(row.shape[0] for row in rows)
        inputs_embeds = torch.stack([F.pad(row, (0, 0, 0, length - row.shape[0])) for row in rows])
        mask = torch.stack(
            [torch.arange(length, device=input_ids.device) < row.shape[0] for row in rows]
        ).to(attention_mask.dtype)
        expanded_labels = None
        if labels is not None:
            expanded_labels = torch.stack([F.pad(lab, (0, length - lab.shape[0]), value=IGNORE_INDEX) for lab in row_labels])
        return inputs_embeds, mask, expanded_labels

    def importance_prefix(self, visual_embeds: torch.Tensor, *, layer: int) -> ImportancePrefix:
        """The question-independent start of every importance prompt over `visual_embeds` (N, D).

        The prompt puts the image before the question, so the chat template's head and the visual
        tokens are run through the LM once; `prefixed_importance` then runs only each question's
        own tokens over them. A strategy keeps this with a scene's encoding, so scoring the visual
        tokens costs the LM a pass over them once per scene instead of once per question.
        """
        ids, (position,), _ = self._prompt("")
        return self._importance_prefix(ids[:position], visual_embeds, layer)

    def _importance_prefix(self, head: list[int], visual_embeds: torch.Tensor, layer: int) -> ImportancePrefix:
        if visual_embeds.ndim != 2 or visual_embeds.shape[1] != self.config.text_config.hidden_size:
            raise ValueError(f"visual_embeds must be (N, {self.config.text_config.hidden_size}), got {tuple(visual_embeds.shape)}")
        device = self.get_input_embeddings().weight.device
        with torch.no_grad():
            # The head with the image token, spliced: the sequence `visual_importance` would run.
            ids = torch.tensor([*head, self.config.image_token_id], device=device)
            inputs_embeds = self._splice(ids, [len(head)], [visual_embeds])[None]
            decoder = decoder_prefix(self.language_model, inputs_embeds, layer)
        return ImportancePrefix(head=head, count=visual_embeds.shape[0], decoder=decoder)

    def prefixed_importance(
        self, prefix: ImportancePrefix, question: str, *, query: Literal["mean", "last"] = "mean"
    ) -> torch.Tensor:
        """(N,) head-averaged attention from `question` to the prefix's N visual tokens.

        Equals `visual_importance` over the same visual tokens at the prefix's layer; see there for `query`.
        """
        ids, (position,), question_tokens = self._prompt(question)
        if ids[:position] != prefix.head:
            raise ValueError(f"the chat template's text before the image depends on the question {question!r}; no prefix to share")
        return self._attention_to_prefix(prefix, question, ids, position, question_tokens, query)

    def _attention_to_prefix(
        self,
        prefix: ImportancePrefix,
        question: str,
        ids: list[int],
        position: int,
        question_tokens: list[int],
        query: Literal["mean", "last"],
    ) -> torch.Tensor:
        """(N,) attention from the prompt `ids` (image slot at `position`, from `_prompt`) to the prefix's visual tokens."""
        if query not in ("mean", "last"):
            raise ValueError(f"query must be 'mean' or 'last', got {query!r}")
        device = self.get_input_embeddings().weight.device
        count = prefix.count
        with torch.no_grad():
            tail = self._embed_text(torch.tensor(ids[position + 1 :], device=device))[None]  # (1, T, D)
            length = position + count + tail.shape[1]
            if query == "mean":
                if not question_tokens:
                    raise ValueError(f"question {question!r} has no tokens to attend from")
                # After the image slot (where the question lies), positions move by N - 1 once it is expanded.
                queries = torch.tensor([t + count - 1 for t in question_tokens], device=device)
            else:
                queries = torch.tensor([length - 1], device=device)
            keys = torch.arange(position, position + count, device=device)
            weights = decoder_attention(self.language_model, tail, prefix.decoder.layer, queries, keys, prefix.decoder)
        return weights.mean(dim=0) if query == "mean" else weights[0]

    def visual_importance(
        self,
        visual_embeds: torch.Tensor,
        question: str,
        *,
        layer: int,
        query: Literal["mean", "last"] = "mean",
    ) -> torch.Tensor:
        """(N,) head-averaged attention from the question to N visual tokens at decoder layer `layer`.

        The prompt is built exactly as `answer` builds it, with `visual_embeds` (N, D) in the image
        slot. "mean": attention rows of the question's own tokens, averaged (UHR-BAT eq. 2);
        "last": the row of the last prompt token (LRS-VQA's Region Focus target). `layer` < 0
        counts from the end. Only the layers up to `layer` run. For many questions on the same
        visual tokens, `importance_prefix` once and `prefixed_importance` per question cost less.
        """
        ids, (position,), question_tokens = self._prompt(question)
        prefix = self._importance_prefix(ids[:position], visual_embeds, layer)
        return self._attention_to_prefix(prefix, question, ids, position, question_tokens, query)

    def prompt_attention(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        labels: torch.LongTensor,
        visual: Sequence[PrunedTokens | Sequence[PrunedTokens]],
        *,
        layer: int,
    ) -> list[torch.Tensor]:
        """Per training row, `(N_i,)` attention of its last prompt token to the N_i visual tokens of
        its (first) image at decoder layer `layer`.

        The rows are `forward`'s (same arguments); a row's prompt ends where its first labelled token
        starts, so the query is the token `answer` would generate from: this is the head-averaged
        attention `visual_importance(query="last")` scores with (c2f's Region Focus target), computed
        with gradients so that a loss can train it.
        """
        image_id = self.config.image_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        counts = ((input_ids == image_id) & attention_mask.bool()).sum(dim=1)
        images = per_image(visual)
        inputs_embeds, mask, expanded_labels = self._expand(input_ids, attention_mask, labels, images, counts)
        attention = []
        for i, (tokens, *_) in enumerate(images):
            length = int(mask[i].sum())
            answer = (expanded_labels[i, :length] != IGNORE_INDEX).nonzero()
            if answer.numel() == 0 or int(answer[0, 0]) == 0:
                raise ValueError(f"row {i} has no prompt before a labelled token to attend from")
            ids = input_ids[i][attention_mask[i].bool()]
            position = int((ids == image_id).nonzero()[0, 0])
            queries = answer[:1, 0] - 1
            keys = torch.arange(position, position + len(tokens), device=inputs_embeds.device)
            weights = decoder_attention(self.language_model, inputs_embeds[i : i + 1, :length], layer, queries, keys)
            attention.append(weights[0])
        return attention


def per_image(visual: Sequence[PrunedTokens | Sequence[PrunedTokens]]) -> list[list[PrunedTokens]]:
    """Each row's visual input as a list of its images' selections (one image given alone becomes a list of one)."""
    return [[item] if isinstance(item, PrunedTokens) else list(item) for item in visual]


def _replace_at(sequence: torch.Tensor, positions: list[int], inserts: list[torch.Tensor]) -> torch.Tensor:
    """`sequence` (L, ...) with its entry at each of `positions` (ascending) replaced by the matching
    insert (N_k, ...): (L - K + sum N_k, ...)."""
    parts, start = [], 0
    for position, insert in zip(positions, inserts, strict=True):
        parts += [sequence[start:position], insert]
        start = position + 1
    return torch.cat([*parts, sequence[start:]])


def _shared_prefix_groups(
    visual: list[PrunedTokens], prompts: list[tuple[torch.Tensor, list[int]]]
) -> list[tuple[list[int], int]]:
    """Questions grouped by identical prompt head and leading visual tokens of their first image, in
    first-seen order (`visual`: each question's first image; `prompts`: ids and image positions).

    Each group comes with how many leading visual tokens all its members share (at least one for a
    group of several; a lone question's count is its own length).
    """
    groups: list[tuple[list[int], int]] = []
    for i, (tokens, (ids, (position, *_))) in enumerate(zip(visual, prompts)):
        for g, (group, shared) in enumerate(groups):
            other, (other_ids, (other_position, *_)) = visual[group[0]], prompts[group[0]]
            if position != other_position or not torch.equal(ids[:position], other_ids[:position]):
                continue
            common = min(shared, tokens.shared_prefix(other))
            if common:
                groups[g] = (group + [i], common)
                break
        else:
            groups.append(([i], len(tokens)))
    return groups


__all__ = [
    "IGNORE_INDEX",
    "ImportancePrefix",
    "UhrAffinityHead",
    "UhrCausalLMOutput",
    "UhrForConditionalGeneration",
    "UhrMultiModalProjector",
    "UhrPreTrainedModel",
    "UhrScaleEmbedding",
    "per_image",
]
