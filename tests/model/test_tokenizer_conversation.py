"""Local ChatML tokenizers and LLaVA conversations to (input_ids, labels)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from uhr.model import IGNORE_INDEX, build_tiny_tokenizer, build_tokenizer, tokenize_conversation
from uhr.model.tokenizer import render_chat

# A processor template in llava-hf's style: typed content parts, the image placeholder written by the template.
TYPED_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def test_build_tokenizer_roundtrip(tmp_path):
    tokenizer = build_tokenizer(["the harbour has three ships", "the roof is red"] * 3, vocab_size=300)
    assert [tokenizer.pad_token, tokenizer.eos_token, tokenizer.image_token] == ["<|endoftext|>", "<|im_end|>", "<image>"]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]) == [0, 1, 2, 3]
    assert tokenizer.padding_side == "left"
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "<|im_start|>user\n<image>\nhow many ships?<|im_end|>\n"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.image_token_id == 3 and loaded.chat_template == tokenizer.chat_template
    assert loaded.decode(loaded("the roof is Röd 42")["input_ids"]) == "the roof is Röd 42"  # byte-level: lossless
    # Deterministic: the same corpus gives the same vocabulary.
    assert build_tiny_tokenizer().get_vocab() == build_tiny_tokenizer().get_vocab()
    with pytest.raises(ValueError, match="at least 260"):
        build_tokenizer(["x"], vocab_size=100)
    with pytest.raises(ValueError, match="empty"):
        build_tokenizer([], vocab_size=300)


def test_chat_template_is_qwen2_chatml():
    tokenizer = build_tiny_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nHow many?"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nHow many?<|im_end|>\n<|im_start|>assistant\n"
    )


def _labelled_text(tokenizer, row):
    return tokenizer.decode(row["input_ids"][row["labels"] != IGNORE_INDEX])


def test_tokenize_conversation_labels_only_answers():
    tokenizer = build_tiny_tokenizer()
    conversation = [
        {"from": "human", "value": "<image>\nHow many ships are in the harbour?"},
        {"from": "gpt", "value": "three"},
        {"from": "human", "value": "Is the road flooded?"},
        {"from": "gpt", "value": "no"},
    ]
    row = tokenize_conversation(tokenizer, conversation, max_length=512)
    assert row["input_ids"].dtype == torch.long and row["input_ids"].shape == row["labels"].shape
    assert int((row["input_ids"] == tokenizer.image_token_id).sum()) == 1
    assert _labelled_text(tokenizer, row) == "three<|im_end|>\nno<|im_end|>\n"
    text = tokenizer.apply_chat_template(
        [{"role": m, "content": c["value"]} for m, c in zip(["user", "assistant"] * 2, conversation)], tokenize=False
    )
    assert tokenizer.decode(row["input_ids"]) == text
    # Labels equal the ids where set.
    kept = row["labels"] != IGNORE_INDEX
    assert torch.equal(row["labels"][kept], row["input_ids"][kept])
    # An answer written with leading whitespace, as some manifests hold them, is learnt all the same.
    spaced = [conversation[0], {"from": "gpt", "value": " (B) three"}]
    assert _labelled_text(tokenizer, tokenize_conversation(tokenizer, spaced, max_length=512)) == " (B) three<|im_end|>\n"


def test_tokenize_conversation_truncation_and_errors():
    tokenizer = build_tiny_tokenizer()
    conversation = [{"from": "human", "value": "<image>\nWhat colour is the roof?"}, {"from": "gpt", "value": "red"}]
    full = tokenize_conversation(tokenizer, conversation, max_length=512)
    cut = tokenize_conversation(tokenizer, conversation, max_length=len(full["input_ids"]) - 1)
    assert torch.equal(cut["input_ids"], full["input_ids"][:-1])
    with pytest.raises(ValueError, match="no answer token"):
        tokenize_conversation(tokenizer, conversation, max_length=len(full["input_ids"]) - 4)
    with pytest.raises(ValueError, match="cuts off an image token"):
        tokenize_conversation(tokenizer, conversation, max_length=5)
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        tokenize_conversation(tokenizer, [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], 64)
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        tokenize_conversation(
            tokenizer, [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}], 64
        )
    with pytest.raises(ValueError, match="exactly one '<image>'"):  # an image token in the answer
        tokenize_conversation(tokenizer, [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}], 64)
    with pytest.raises(ValueError, match="no assistant"):
        tokenize_conversation(tokenizer, [{"from": "human", "value": "<image>\nhi"}], 64)
    with pytest.raises(ValueError, match="unknown speaker 'bot'"):
        tokenize_conversation(tokenizer, [{"from": "bot", "value": "<image>"}], 64)
    with pytest.raises(ValueError, match="system turn may only open"):
        tokenize_conversation(
            tokenizer,
            [{"from": "human", "value": "<image>"}, {"from": "system", "value": "s"}, {"from": "gpt", "value": "x"}],
            64,
        )
    system = tokenize_conversation(
        tokenizer,
        [{"from": "system", "value": "Be brief."}, *conversation],
        512,
    )
    assert tokenizer.decode(system["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert _labelled_text(tokenizer, system) == "red<|im_end|>\n"


def test_processor_templates_get_typed_content():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TYPED_TEMPLATE
    user = {"role": "user", "content": "<image>\nHow many ships?"}
    # Given the string, the template renders nothing of it; given parts, the image and the question.
    assert tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True) == "USER: ASSISTANT:"
    assert render_chat(tokenizer, [user], add_generation_prompt=True) == "USER: <image>\nHow many ships? ASSISTANT:"
    conversation = [{"from": "human", "value": "<image>\nHow many ships?"}, {"from": "gpt", "value": "three"}]
    row = tokenize_conversation(tokenizer, conversation, max_length=512)
    assert int((row["input_ids"] == tokenizer.image_token_id).sum()) == 1
    assert _labelled_text(tokenizer, row).strip() == "three"
    tokenizer.chat_template = "{% for message in messages %}{{ message['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match="renders neither string nor typed"):
        render_chat(tokenizer, [user])


def test_processor_templates_lay_out_several_images_themselves():
    """A multi-image prompt (`<image> <image>\n` + question) reaches a processor template as image
    parts, then the question: no stray text part between the images."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TYPED_TEMPLATE
    user = {"role": "user", "content": "<image> <image>\nHow many ships arrived?"}
    assert render_chat(tokenizer, [user], add_generation_prompt=True) == "USER: <image>\n<image>\nHow many ships arrived? ASSISTANT:"


def test_a_multi_image_conversation_holds_one_image_token_per_image():
    """An image pair's record (XLRS-Bench's bi-temporal items), written as `answer` prompts a pair:
    the placeholders joined by spaces, then the question."""
    model_tokenizer = build_tiny_tokenizer()
    pair = [{"from": "human", "value": "<image> <image>\nWhich buildings are new?"}, {"from": "gpt", "value": "the school"}]
    row = tokenize_conversation(model_tokenizer, pair, max_length=512, images=2)
    image_id = model_tokenizer.convert_tokens_to_ids("<image>")
    assert int((row["input_ids"] == image_id).sum()) == 2
    assert _labelled_text(model_tokenizer, row) == "the school<|im_end|>\n"
    with pytest.raises(ValueError, match=r"2 \(one per image\) '<image>', in human turns; found 1"):
        tokenize_conversation(model_tokenizer, [{"from": "human", "value": "<image>\nhi"}, pair[1]], 64, images=2)
    with pytest.raises(ValueError, match="cuts off an image token"):
        first_image = row["input_ids"].tolist().index(image_id)
        tokenize_conversation(model_tokenizer, pair, max_length=first_image + 2, images=2)
