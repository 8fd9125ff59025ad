"""LLaVA-style conversations to training tensors: chat-templated `input_ids` and answer-only `labels`.

A conversation is the GeoLLaVA-Data / SuperRS-VQA shape:
`[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]`, optionally
opening with `{"from": "system", ...}`. It is rendered with the tokenizer's chat template (ChatML for
ours and Qwen2's; a processor's typed-content template too, `render_chat`), so training sees exactly
the prompts `answer` builds. Labels cover each assistant turn's text and its end-of-turn marker
(`<|im_end|>\\n` in ChatML) and nothing else: LLaVA's `preprocess_qwen` also labels every turn's
`<|im_start|>`, `<|im_end|>` and newline tokens; uhr trains only on what the assistant says.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from uhr.model.modeling import IGNORE_INDEX
from uhr.model.tokenizer import IMAGE_TOKEN, render_chat

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _messages(conversations: list[dict[str, str]]) -> list[dict[str, str]]:
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversation turn {i} must be a dict with 'from' and 'value', got {turn!r}")
        role = _ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"conversation turn {i} has unknown speaker {turn['from']!r} (expected one of {sorted(_ROLES)})")
        if role == "system" and i != 0:
            raise ValueError(f"a system turn may only open the conversation, found one at turn {i}")
        messages.append({"role": role, "content": str(turn["value"])})
    return messages


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[dict[str, str]],
    max_length: int,
    *,
    image_token: str = IMAGE_TOKEN,
    images: int = 1,
) -> dict[str, torch.Tensor]:
    """`{"input_ids": (L,), "labels": (L,)}` long tensors for one conversation, L <= `max_length`.

    The conversation must hold exactly `images` image tokens (in human turns; one per image of the
    record, in order) and end with an assistant turn. Labels are -100 except on assistant text and
    end-of-turn tokens. Longer conversations are cut at `max_length` text tokens (an image token
    counts as one here; it becomes the visual tokens later); the cut must keep every image token
    and some labelled token.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    messages = _messages(conversations)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant ('gpt') turn to learn from")
    occurrences = sum(m["content"].count(image_token) for m in messages)
    in_user_turns = sum(m["content"].count(image_token) for m in messages if m["role"] == "user")
    if occurrences != images or in_user_turns != images:
        expected = "exactly one" if images == 1 else f"{images} (one per image)"
        raise ValueError(f"conversation must hold {expected} {image_token!r}, in human turns; found {occurrences}")

    text = render_chat(tokenizer, messages, image_token=image_token)
    # Character spans of each assistant turn: its rendering minus the prompt that precedes it.
    spans = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True, image_token=image_token))
            end = len(render_chat(tokenizer, messages[: i + 1], image_token=image_token))
            if not text[start:end].lstrip().startswith(message["content"].strip()):
                raise ValueError("the tokenizer's chat template does not render turns as prefixes of each other")
            spans.append((start, end))

    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
    starts = torch.tensor([a for a, _ in encoding["offset_mapping"]], dtype=torch.long)
    labelled = torch.zeros_like(input_ids, dtype=torch.bool)
    for start, end in spans:
        labelled |= (starts >= start) & (starts < end)
    labels = torch.where(labelled, input_ids, torch.full_like(input_ids, IGNORE_INDEX))

    input_ids, labels = input_ids[:max_length], labels[:max_length]
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    if int((input_ids == image_id).sum()) != images:
        raise ValueError(f"max_length {max_length} cuts off an image token (conversation is {len(encoding['input_ids'])} tokens)")
    if not bool((labels != IGNORE_INDEX).any()):
        raise ValueError(f"max_length {max_length} leaves no answer token to learn from")
    return {"input_ids": input_ids, "labels": labels}


__all__ = ["tokenize_conversation"]
