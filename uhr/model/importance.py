"""Text-to-vision attention of the language model, the importance signal of UHR-BAT and c2f.

`decoder_attention` runs a decoder-only LM (Llama / Qwen2 family layout: `model.layers[i].self_attn`
with `q_proj`/`k_proj`, `model.rotary_emb`) up to one layer and recomputes that layer's attention
probabilities explicitly from its q/k projections, rotary embedding, grouped-query heads and causal
(or sliding-window) mask. It therefore gives the same weights as an eager forward with
`output_attentions=True` whatever attention kernel the model was loaded with (sdpa and flash
kernels never materialise the probabilities), and skips every layer after the one asked for.

A prompt's head that many prompts share (the chat template and a scene's visual tokens, before each
question) can be run once: `decoder_prefix` keeps its keys and values, and `decoder_attention`
given that prefix runs only the rest of a prompt over them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


def resolve_layer(layer: int, num_layers: int) -> int:
    """Index in [0, num_layers) of `layer`; negative values count from the end."""
    index = layer + num_layers if layer < 0 else layer
    if not 0 <= index < num_layers:
        raise ValueError(f"decoder layer {layer} is outside a {num_layers}-layer language model")
    return index


def _rotary(attention: nn.Module):
    """The `apply_rotary_pos_emb` of the attention module's own modeling file."""
    module = importlib.import_module(type(attention).__module__)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if apply is None:
        raise TypeError(f"{type(attention).__name__} has no apply_rotary_pos_emb beside it; unsupported LM layout")
    return apply


@dataclass
class DecoderPrefix:
    """The first `length` positions of prompts run once through the layers below `layer`."""

    layer: int
    """Index of the decoder layer whose attention is asked for."""
    length: int
    key_values: list[tuple[torch.Tensor, torch.Tensor]]
    """(1, H_kv, length, hd) keys and values of each layer in [0, layer) over the prefix positions."""
    keys: torch.Tensor
    """(1, H_kv, length, hd) keys of layer `layer` over the prefix, rotary applied."""


def _layer_types(config) -> list[str]:
    return getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers


def _run_below(
    decoder: nn.Module, inputs_embeds: torch.Tensor, index: int, cache: DynamicCache | None, offset: int
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Hidden states entering layer `index` of `inputs_embeds` (1, L, D) at positions offset..offset+L-1.

    With `cache` (holding the `offset` positions before), each layer attends to them too and appends
    the new keys and values to it. Returns the hidden states and the rotary (cos, sin) of the positions.
    """
    config = decoder.config
    length = inputs_embeds.shape[1]
    position_ids = torch.arange(offset, offset + length, device=inputs_embeds.device)[None]
    mask_kwargs = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": None,
        "past_key_values": cache,
        "position_ids": position_ids,
    }
    layer_types = _layer_types(config)
    masks = {"full_attention": create_causal_mask(**mask_kwargs)}
    if "sliding_attention" in layer_types[:index]:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
    hidden = inputs_embeds
    position_embeddings = decoder.rotary_emb(hidden, position_ids)
    with _cache_kept(decoder.layers[:index], cache is not None):
        for i, decoder_layer in enumerate(decoder.layers[:index]):
            hidden = decoder_layer(
                hidden,
                attention_mask=masks[layer_types[i]],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=position_embeddings,
            )
    return hidden, position_embeddings


@contextmanager
def _cache_kept(layers: Iterable[nn.Module], keep: bool) -> Iterator[None]:
    """With `keep`, `layers` run without activation checkpointing, which drops a layer's cache in
    training mode (fine-tuning with `activation_checkpointing`): the question would then score the
    image without having attended to it in any layer below."""
    layers = list(layers) if keep else []
    saved = [getattr(layer, "gradient_checkpointing", False) for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            layer.gradient_checkpointing = value


def _query_key(
    attention: nn.Module, states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, H, L, hd) queries and (1, H_kv, L, hd) keys of normed `states` (1, L, D), rotary applied."""
    head_dim = attention.head_dim
    length = states.shape[1]
    # (1, L, H * hd) -> (1, H, L, hd); key/value heads may be fewer (grouped-query attention)
    q = attention.q_proj(states).view(1, length, -1, head_dim)
    k = attention.k_proj(states).view(1, length, -1, head_dim)
    if hasattr(attention, "q_norm"):  # Qwen3-style per-head norms before rotary
        q, k = attention.q_norm(q), attention.k_norm(k)
    cos, sin = position_embeddings
    return _rotary(attention)(q.transpose(1, 2), k.transpose(1, 2), cos, sin)


def decoder_prefix(language_model: nn.Module, inputs_embeds: torch.Tensor, layer: int) -> DecoderPrefix:
    """Run the shared head `inputs_embeds` (1, P, D) of later prompts once, up to decoder layer `layer`."""
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError(f"inputs_embeds must be (1, P, D), got {tuple(inputs_embeds.shape)}")
    decoder = language_model.get_decoder()
    index = resolve_layer(layer, decoder.config.num_hidden_layers)
    cache = DynamicCache()
    hidden, position_embeddings = _run_below(decoder, inputs_embeds, index, cache, 0)
    target = decoder.layers[index]
    _, keys = _query_key(target.self_attn, target.input_layernorm(hidden), position_embeddings)
    key_values = [(cached.keys, cached.values) for cached in cache.layers[:index]]
    return DecoderPrefix(layer=index, length=inputs_embeds.shape[1], key_values=key_values, keys=keys)


def decoder_attention(
    language_model: nn.Module,
    inputs_embeds: torch.Tensor,
    layer: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
    prefix: DecoderPrefix | None = None,
) -> torch.Tensor:
    """Head-averaged attention probabilities of decoder layer `layer` for one unpadded sequence.

    inputs_embeds: `(1, L, D)`, the whole sequence, or with `prefix` the part after its P positions;
    queries: `(Q,)` and keys: `(K,)` long positions in the whole sequence, [0, P + L) (queries at
    P or later). Returns `(Q, K)` float32: row q is the softmax over all positions (causal) of query
    q, averaged over heads, restricted to the `keys` columns. Differentiable: scoring calls it under
    `torch.no_grad()`, the fine-tuning job's grounding loss with gradients. The prefix is left as it
    was: the layers append the new positions to a cache of their own.
    """
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError(f"inputs_embeds must be (1, L, D), got {tuple(inputs_embeds.shape)}")
    decoder = language_model.get_decoder()
    config = decoder.config
    index = resolve_layer(layer, config.num_hidden_layers)
    offset, cache = 0, None
    if prefix is not None:
        if prefix.layer != index:
            raise ValueError(f"the prefix was run up to decoder layer {prefix.layer}, attention of layer {index} asked for")
        offset = prefix.length
        if int(queries.min()) < offset:
            raise ValueError(f"queries must lie after the {offset}-position prefix, got position {int(queries.min())}")
        cache = DynamicCache()
        for i, (key, value) in enumerate(prefix.key_values):
            cache.update(key, value, i)
    length = offset + inputs_embeds.shape[1]
    hidden, position_embeddings = _run_below(decoder, inputs_embeds, index, cache, offset)

    target = decoder.layers[index]
    attention = target.self_attn
    q, k = _query_key(attention, target.input_layernorm(hidden), position_embeddings)
    if prefix is not None:
        k = torch.cat([prefix.keys, k], dim=2)  # (1, H_kv, P + L_new, hd)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (1, H, length, hd)

    # (1, H, Q, hd) x (1, H, hd, length) -> (1, H, Q, length)
    scores = torch.matmul(q[:, :, queries - offset].float(), k.float().transpose(-1, -2)) * attention.scaling
    positions = torch.arange(length, device=inputs_embeds.device)
    allowed = positions[None, :] <= queries[:, None]  # (Q, length) causal
    window = getattr(attention, "sliding_window", None)
    if window is not None and _layer_types(config)[index] == "sliding_attention":
        allowed &= queries[:, None] - positions[None, :] < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1).mean(dim=1)[0]  # (Q, length)
    return probs[:, keys]


__all__ = ["DecoderPrefix", "decoder_attention", "decoder_prefix", "resolve_layer"]
