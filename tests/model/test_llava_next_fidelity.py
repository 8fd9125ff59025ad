"""The anchor: with `none`, our model is transformers' `LlavaNextForConditionalGeneration`.

A tiny LLaVA-NeXT is built from a config with a fixed seed, saved as a transformers directory (both
key layouts), loaded through `load_model` (format (a)), and fed the same image and prompt: our
`none` tokens through our `forward` / `answer` against the LLaVA-NeXT processor + model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from tests.model.test_tokenizer_conversation import TYPED_TEMPLATE
from uhr.model import build_tiny_tokenizer, load_model, load_model_config, save_model
from uhr.model.checkpoints import TINY_PINPOINTS, _TINY_TEXT, _TINY_VISION
from uhr.model.pruning.config import PruningConfig
from uhr.model.pruning.none import NoneStrategy, anyres_token_count
from uhr.model.tiling import anyres_canvas, anyres_layout, clip_normalize, cut_tiles, resize_bicubic, select_pinpoint
from uhr.scenes.source import ArraySource

QUESTION = "How many ships are in the harbour?"


def _llava_next(text_model: str, tokenizer, seed: int = 0, **tie) -> LlavaNextForConditionalGeneration:
    """`tie`: `tie_word_embeddings` (the top-level flag, which decides) and `text_tie` (the LM config's)."""
    text = {
        **_TINY_TEXT,
        "tie_word_embeddings": tie.get("text_tie", False),
        "model_type": text_model,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = LlavaNextConfig(
        vision_config={**_TINY_VISION, "model_type": "clip_vision_model"},
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=TINY_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=tie.get("tie_word_embeddings", False),
    )
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(config).eval()


def _processor(tokenizer) -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": _TINY_VISION["image_size"]},
        crop_size={"height": _TINY_VISION["image_size"], "width": _TINY_VISION["image_size"]},
        image_grid_pinpoints=TINY_PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=_TINY_VISION["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by "default" (as llava-hf processors)
    )


def _save(reference: LlavaNextForConditionalGeneration, tokenizer, directory, layout: str) -> None:
    if layout == "save_pretrained":  # what transformers writes: `language_model.model.*` keys
        reference.save_pretrained(directory)
    else:  # the in-memory v5 layout `model.language_model.*`, as some exports store it
        reference.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in reference.state_dict().items()}
        assert any(k.startswith("model.language_model.") for k in state)
        save_file(state, str(directory / "model.safetensors"))
    tokenizer.save_pretrained(directory)


@pytest.mark.parametrize(
    ("text_model", "layout", "size"),
    [
        ("qwen2", "save_pretrained", (45, 70)),  # landscape: 32x64 grid, rows cropped
        ("llama", "v5_keys", (70, 45)),  # portrait: 64x32 grid, columns cropped
        ("qwen2", "v5_keys", (60, 60)),  # square: 64x64 grid, nothing cropped
        ("llama", "save_pretrained", (300, 2)),  # thinner than a token: every column cropped, newlines kept
    ],
)
def test_none_reproduces_llava_next(tmp_path, image_factory, config_geometry, text_model, layout, size):
    tokenizer = build_tiny_tokenizer()
    reference = _llava_next(text_model, tokenizer)
    _save(reference, tokenizer, tmp_path, layout)
    model, loaded_tokenizer = load_model(tmp_path)
    # Budget for every scene: thumbnail 8 x 8 + the 64 x 64 grid's 16 rows of 16 tokens and a newline.
    assert model.config.pruning_defaults == {"strategy": "none", "budget": 64 + 16 * 17}
    assert config_geometry(load_model_config(tmp_path)) == config_geometry(model.config)

    image = image_factory(*size, seed=1)
    processor = _processor(tokenizer)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{QUESTION}"}], tokenize=False, add_generation_prompt=True
    )
    inputs = processor(images=image, text=prompt, return_tensors="pt")

    # Pixels: our anyres tiles, normalised, are the processor's.
    height, width = size
    pinpoint = select_pinpoint(width, height, TINY_PINPOINTS)
    layout_ = anyres_layout(width, height, pinpoint, 32)
    tiles = np.concatenate([resize_bicubic(image, 32, 32)[None], cut_tiles(anyres_canvas(image, layout_), 32)])
    expected = inputs["pixel_values"][0][: len(tiles)]
    torch.testing.assert_close(clip_normalize(torch.from_numpy(tiles)), expected, atol=1e-6, rtol=0)

    strategy = NoneStrategy(PruningConfig(strategy="none", budget=10_000))
    tokens = strategy.select(model, strategy.encode(model, ArraySource(image)), QUESTION)
    image_tokens = int((inputs["input_ids"] == tokenizer.image_token_id).sum())
    assert len(tokens) == image_tokens == anyres_token_count(width, height, pinpoint, 32, 8)

    with torch.no_grad():
        ref_logits = reference(**inputs).logits
        ids = loaded_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ours = model(input_ids=ids, visual=[tokens]).logits
    assert ours.shape == ref_logits.shape
    torch.testing.assert_close(ours, ref_logits, atol=1e-4, rtol=0)

    generated = reference.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    assert len(generated) >= 4
    expected_text = tokenizer.decode(generated, skip_special_tokens=True).strip()
    assert model.answer([tokens], [QUESTION], max_new_tokens=8) == [expected_text]


def test_two_images_answer_as_llava_next(tmp_path, image_factory):
    """A multi-image question (XLRS-Bench's bi-temporal pairs): each image gets its own placeholder,
    written as lmms-eval writes them for LLaVA models, and its own anyres tokens; LLaVA-NeXT given
    both images and that prompt generates what `answer` does."""
    tokenizer = build_tiny_tokenizer()
    reference = _llava_next("qwen2", tokenizer)
    _save(reference, tokenizer, tmp_path, "save_pretrained")
    model, _ = load_model(tmp_path)
    before, after = image_factory(45, 70, seed=1), image_factory(60, 60, seed=2)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<image> <image>\n{QUESTION}"}], tokenize=False, add_generation_prompt=True
    )
    inputs = _processor(tokenizer)(images=[before, after], text=prompt, return_tensors="pt")

    strategy = NoneStrategy(PruningConfig(strategy="none", budget=10_000))
    tokens = [strategy.select(model, strategy.encode(model, ArraySource(image)), QUESTION) for image in (before, after)]
    assert sum(len(t) for t in tokens) == int((inputs["input_ids"] == tokenizer.image_token_id).sum())

    generated = reference.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    expected = tokenizer.decode(generated, skip_special_tokens=True).strip()
    assert model.answer([tokens], [QUESTION], max_new_tokens=8) == [expected]
    # The order of the images is part of the question.
    assert model.answer([tokens[::-1]], [QUESTION], max_new_tokens=8) != [expected]


@pytest.mark.parametrize(
    ("top", "text_tie"),
    [
        (True, True),  # tied: save_pretrained leaves the LM head out of the checkpoint
        (False, True),  # the LM's own flag says tied, the top-level one (which decides) says not: a head of its own
    ],
)
def test_lm_head_tying_follows_llava_next(tmp_path, top, text_tie):
    tokenizer = build_tiny_tokenizer()
    reference = _llava_next("qwen2", tokenizer, tie_word_embeddings=top, text_tie=text_tie)
    assert (reference.lm_head.weight is reference.get_input_embeddings().weight) == top
    _save(reference, tokenizer, tmp_path, "save_pretrained")
    model, _ = load_model(tmp_path)
    head, embeddings = model.language_model.lm_head.weight, model.get_input_embeddings().weight
    assert (head is embeddings) == top
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_a_processor_chat_template_answers(tmp_path, tokens_factory):
    """llava-hf repositories keep their template in the processor's chat_template.json, in typed parts."""
    tokenizer = build_tiny_tokenizer()
    reference = _llava_next("llama", tokenizer)
    tokenizer.chat_template = None
    _save(reference, tokenizer, tmp_path, "save_pretrained")
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": TYPED_TEMPLATE}))
    model, loaded_tokenizer = load_model(tmp_path)
    assert loaded_tokenizer.chat_template == TYPED_TEMPLATE
    ids, (position,), question_tokens = model._prompt(QUESTION)
    assert ids[position] == model.config.image_token_id
    assert loaded_tokenizer.decode([ids[t] for t in question_tokens]).strip() == QUESTION
    visual = tokens_factory(6, model.config.text_config.hidden_size)
    assert len(model.answer([visual], [QUESTION], max_new_tokens=3)) == 1
    assert model.visual_importance(visual.embeds, QUESTION, layer=0).shape == (6,)


def test_answers_stop_at_the_checkpoints_own_stop_tokens(tmp_path):
    tokenizer = build_tiny_tokenizer()
    _save(_llava_next("qwen2", tokenizer), tokenizer, tmp_path, "save_pretrained")
    end_of_turn, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_turn, end_of_text]}))
    model, loaded_tokenizer = load_model(tmp_path)
    assert loaded_tokenizer.eos_token_id == end_of_turn
    assert model.stop_token_ids() == [end_of_turn, end_of_text]
    # Our export (what fine-tuning writes and the VQA job loads) keeps them.
    save_model(model, tmp_path / "export")
    exported, _ = load_model(tmp_path / "export")
    assert exported.stop_token_ids() == [end_of_turn, end_of_text]


def test_token_count_matches_processor_for_large_scenes():
    """Scenes larger than any grid are read at the grid's size; the token layout stays LLaVA-NeXT's."""
    tokenizer = build_tiny_tokenizer()
    processor = _processor(tokenizer)
    for height, width in [(300, 517), (611, 200), (256, 256)]:
        pinpoint = select_pinpoint(width, height, TINY_PINPOINTS)
        count = processor._get_number_of_features(height, width, 32, 32) - 1  # minus CLS, "default"
        assert anyres_token_count(width, height, pinpoint, 32, 8) == count
