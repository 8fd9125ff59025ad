"""Text-to-vision attention of the language model, the importance signal of UHR-BAT and c2f.

`decoder_attention` runs a decoder-only LM (Llama / Qwen2 family layout: `model.layers[i].self_attn`
with `q_proj`/`k_proj`, `model.rotary_emb`) up to one layer and recomputes that layer's attention
probabilities explicitly from its q/k projections, rotary embedding, grouped-query heads and causal
(or sliding-window) mask. It therefore gives the same weights as an eager forward with
`output_attentions=True` whatever attention kernel the model was loaded with (sdpa and flash
kernels never materialise the probabilities), and skips every layer after the one asked for.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn
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


def decoder_attention(
    language_model: nn.Module,
    inputs_embeds: torch.Tensor,
    layer: int,
    queries: torch.Tensor,
    keys: torch.Tensor,
) -> torch.Tensor:
    """Head-averaged attention probabilities of decoder layer `layer` for one unpadded sequence.

    inputs_embeds: `(1, L, D)`; queries: `(Q,)` and keys: `(K,)` long positions in [0, L).
    Returns `(Q, K)` float32: row q is the softmax over all L positions (causal) of query q,
    averaged over heads, restricted to the `keys` columns. Differentiable: scoring calls it under
    `torch.no_grad()`, the fine-tuning job's grounding loss with gradients.
    """
    if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1:
        raise ValueError(f"inputs_embeds must be (1, L, D), got {tuple(inputs_embeds.shape)}")
    decoder = language_model.get_decoder()
    config = decoder.config
    index = resolve_layer(layer, config.num_hidden_layers)
    length = inputs_embeds.shape[1]
    position_ids = torch.arange(length, device=inputs_embeds.device)[None]
    mask_kwargs = {
        "config": config,
        "inputs_embeds": inputs_embeds,
        "attention_mask": None,
        "past_key_values": None,
        "position_ids": position_ids,
    }
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    masks = {"full_attention": create_causal_mask(**mask_kwargs)}
    if "sliding_attention" in layer_types[:index]:
        masks["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)

    hidden = inputs_embeds
    position_embeddings = decoder.rotary_emb(hidden, position_ids)
    for i, decoder_layer in enumerate(decoder.layers[:index]):
        hidden = decoder_layer(
            hidden,
            attention_mask=masks[layer_types[i]],
            position_ids=position_ids,
            past_key_values=None,
            use_cache=False,
            position_embeddings=position_embeddings,
        )

    target = decoder.layers[index]
    attention = target.self_attn
    head_dim = attention.head_dim
    states = target.input_layernorm(hidden)
    # (1, L, H * hd) -> (1, H, L, hd); key/value heads may be fewer (grouped-query attention)
    q = attention.q_proj(states).view(1, length, -1, head_dim)
    k = attention.k_proj(states).view(1, length, -1, head_dim)
    if hasattr(attention, "q_norm"):  # Qwen3-style per-head norms before rotary
        q, k = attention.q_norm(q), attention.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = _rotary(attention)(q, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (1, H, L, hd)

    scores = torch.matmul(q[:, :, queries].float(), k.float().transpose(-1, -2)) * attention.scaling  # (1, H, Q, L)
    positions = torch.arange(length, device=inputs_embeds.device)
    allowed = positions[None, :] <= queries[:, None]  # (Q, L) causal
    window = getattr(attention, "sliding_window", None)
    if window is not None and layer_types[index] == "sliding_attention":
        allowed &= queries[:, None] - positions[None, :] < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(dim=-1).mean(dim=1)[0]  # (Q, L)
    return probs[:, keys]


__all__ = ["decoder_attention", "resolve_layer"]
