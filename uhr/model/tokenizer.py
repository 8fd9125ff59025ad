"""Small byte-level BPE tokenizers with a ChatML chat template, trained locally (no hub).

Used by the tests and the demo model: `build_tokenizer(corpus, vocab_size)` returns a
`PreTrainedTokenizerFast` that behaves like Qwen2's for our purposes (byte-level BPE, ChatML turns,
`<|im_end|>` as eos, `<|endoftext|>` as pad) and knows the `<image>` placeholder as one special
token. Save it with `save_pretrained(dir)`, load it with `AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

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


__all__ = ["CHATML_TEMPLATE", "IMAGE_TOKEN", "IM_END", "IM_START", "PAD_TOKEN", "SPECIAL_TOKENS", "build_tokenizer"]
