"""Small byte-level BPE tokenizers with a ChatML chat template, trained locally (no hub).

Used by the tests and the demo model: `build_tokenizer(corpus, vocab_size)` returns a
`PreTrainedTokenizerFast` that behaves like Qwen2's for our purposes (byte-level BPE, ChatML turns,
`<|im_end|>` as eos, `<|endoftext|>` as pad) and knows the `<image>` placeholder as one special
token. Save it with `save_pretrained(dir)`, load it with `AutoTokenizer.from_pretrained(dir)`.

`render_chat` renders messages through any checkpoint's chat template, ours or a processor's.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END, IMAGE_TOKEN)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2's ChatML template: a default system turn unless the conversation starts with one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(
    corpus: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    model_max_length: int = 32768,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `corpus` with the special tokens and ChatML template.

    `vocab_size` counts the 256 byte symbols and the 4 special tokens (ids 0..3: pad, im_start,
    im_end, image); training is deterministic for a given corpus. Left padding, for generation.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (bytes + special tokens), got {vocab_size}")
    texts = [text for text in corpus if text]
    if not texts:
        raise ValueError("corpus is empty")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHATML_TEMPLATE,
        padding_side="left",
        model_max_length=model_max_length,
    )


def _typed_parts(content: str, image_token: str) -> list[dict[str, str]]:
    """The typed parts a processor template takes: `<image>` + newline + Q -> an image part, then a
    text part Q; `<image> <image>\n` + Q -> two image parts, then Q (the template lays out the images)."""
    parts: list[dict[str, str]] = []
    pieces = content.split(image_token)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            piece = piece.removeprefix("\n")  # processor templates write "<image>\n" themselves
        if piece and not (piece.isspace() and i < len(pieces) - 1):
            parts.append({"type": "text", "text": piece})
    return parts


def _renders_all(text: str, messages: list[dict[str, str]], image_token: str) -> bool:
    """Whether `text` holds each message's text and as many image tokens as the messages."""
    images = sum(m["content"].count(image_token) for m in messages)
    pieces = (piece.strip() for m in messages for piece in m["content"].split(image_token))
    return text.count(image_token) == images and all(piece in text for piece in pieces)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool = False,
    image_token: str = IMAGE_TOKEN,
) -> str:
    """`messages` (string contents, the image written as `image_token`) through the tokenizer's chat template.

    Text templates (ChatML: ours, Qwen2's, LongVA's) take each content as one string. Processor
    templates (llava-hf's `chat_template.json`) take lists of typed parts and write the image
    placeholder themselves; given a string they render nothing of it, so the messages are handed to
    them as parts. Raises ValueError when neither form renders every message's text and image.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if _renders_all(text, messages, image_token):
        return text
    typed = [{"role": m["role"], "content": _typed_parts(m["content"], image_token)} for m in messages]
    text = tokenizer.apply_chat_template(typed, tokenize=False, add_generation_prompt=add_generation_prompt)
    if _renders_all(text, messages, image_token):
        return text
    raise ValueError(
        f"the tokenizer's chat template renders neither string nor typed message contents with their text and "
        f"{image_token!r}; got {text!r}"
    )


__all__ = [
    "CHATML_TEMPLATE",
    "IMAGE_TOKEN",
    "IM_END",
    "IM_START",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "build_tokenizer",
    "render_chat",
]
