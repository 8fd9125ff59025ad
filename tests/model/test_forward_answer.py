"""`forward` (expansion, loss, gradients through the vision path) and batched `answer`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uhr.model import IGNORE_INDEX, tokenize_conversation
from uhr.model.modeling import _shared_prefix_groups
from uhr.model.pruning import PrunedTokens, build_strategy
from uhr.model.pruning.config import PruningConfig
from uhr.model.pruning.none import NoneStrategy
from uhr.scenes.source import ArraySource


def _batch(tokenizer, samples, max_length=256):
    """Right-padded (input_ids, attention_mask, labels) for a list of LLaVA conversations."""
    rows = [tokenize_conversation(tokenizer, conversation, max_length) for conversation in samples]
    length = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n], labels[i, :n], mask[i, :n] = row["input_ids"], row["labels"], 1
    return input_ids, mask, labels


CONVERSATIONS = [
    [{"from": "human", "value": "<image>\nHow many ships are in the harbour?"}, {"from": "gpt", "value": "three"}],
    [{"from": "human", "value": "<image>\nIs the road flooded after the storm?"}, {"from": "gpt", "value": "no"}],
]


def test_loss_decreases_with_none_in_the_loop(tiny_model, image_factory):
    model, tokenizer = tiny_model
    model.train()
    strategy = NoneStrategy(PruningConfig(strategy="none", budget=4096))
    sources = [ArraySource(image_factory(50, 40, seed=0)), ArraySource(image_factory(30, 70, seed=1))]
    input_ids, mask, labels = _batch(tokenizer, CONVERSATIONS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    losses = []
    for step in range(6):
        visual = [strategy.select(model, strategy.encode(model, source), "") for source in sources]
        out = model(input_ids=input_ids, attention_mask=mask, labels=labels, visual=visual)
        optimizer.zero_grad()
        out.loss.backward()
        if step == 0:
            # Gradients reach the projector, the newline and the tower through the visual tokens.
            for name in (
                "multi_modal_projector.linear_1.weight",
                "image_newline",
                "vision_tower.encoder.layers.0.mlp.fc1.weight",
                "vision_tower.embeddings.patch_embedding.weight",
            ):
                grad = dict(model.named_parameters())[name].grad
                assert grad is not None and float(grad.abs().sum()) > 0, name
            # Layers past the selected one never run.
            assert model.vision_tower.encoder.layers[1].mlp.fc1.weight.grad is None
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.7 * losses[0], losses
    # Expanded labels: -100 on every visual position.
    assert int((out.labels != IGNORE_INDEX).sum()) == int((labels != IGNORE_INDEX).sum())
    assert out.logits.shape[1] == int(mask.sum(dim=1).max()) - 1 + max(len(v) for v in visual)


def test_forward_padding_side_does_not_matter(tiny_model, tokens_factory):
    model, tokenizer = tiny_model
    input_ids, mask, labels = _batch(tokenizer, CONVERSATIONS)
    visual = [tokens_factory(11, 64, seed=0), tokens_factory(17, 64, seed=1)]
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=mask, labels=labels, visual=visual)
        for i in range(2):
            n = int(mask[i].sum())
            # The same row left-padded by 3 pads.
            left_ids = torch.cat([torch.full((3,), tokenizer.pad_token_id), input_ids[i, :n]])[None]
            left_mask = torch.cat([torch.zeros(3, dtype=torch.long), torch.ones(n, dtype=torch.long)])[None]
            alone = model(input_ids=left_ids, attention_mask=left_mask, visual=[visual[i]])
            length = n - 1 + len(visual[i])
            torch.testing.assert_close(batched.logits[i, :length], alone.logits[0, :length], atol=1e-5, rtol=1e-5)
            assert int(batched.attention_mask[i].sum()) == length


def test_forward_rejects_mismatched_image_tokens(tiny_model, tokens_factory):
    model, tokenizer = tiny_model
    input_ids, mask, _ = _batch(tokenizer, CONVERSATIONS)
    visual = tokens_factory(4, 64)
    with pytest.raises(ValueError, match=r"image tokens per row \[1, 1\], images per row \[1\]"):
        model(input_ids=input_ids, attention_mask=mask, visual=[visual])
    doubled = input_ids.clone()
    doubled[0, 1] = tokenizer.image_token_id
    with pytest.raises(ValueError, match=r"image tokens per row \[2, 1\], images per row \[1, 1\]"):
        model(input_ids=doubled, attention_mask=mask, visual=[visual, visual])
    with pytest.raises(ValueError, match=r"image tokens per row \[1, 1\], images per row \[2, 1\]"):
        model(input_ids=input_ids, attention_mask=mask, visual=[[visual, visual], visual])
    with pytest.raises(ValueError, match="tokens: 2, features: 0"):
        model(input_ids=input_ids, attention_mask=mask)


def test_forward_expands_each_image_of_a_multi_image_row_in_place(tiny_model, tokens_factory):
    """A two-image row (XLRS-Bench's bi-temporal pairs, as `answer` prompts them) is the LM run on its
    text embeddings with each image token replaced by that image's tokens, in order; labels keep to
    the text, gradients reach both images, and the last prompt position predicts `answer`'s first token."""
    model, tokenizer = tiny_model
    before, after = tokens_factory(7, 64, seed=11), tokens_factory(5, 64, seed=12)
    for image in (before, after):
        image.embeds.requires_grad_(True)
    question = "Which buildings are new?"
    ids, (first, second), _ = model._prompt(question, images=2)
    input_ids = torch.tensor(ids)[None]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[0, -3:] = input_ids[0, -3:]
    out = model(input_ids=input_ids, labels=labels, visual=[[before, after]])

    text = model.get_input_embeddings()(input_ids[0].masked_fill(input_ids[0] == tokenizer.image_token_id, 0))
    by_hand = torch.cat([text[:first], before.embeds, text[first + 1 : second], after.embeds, text[second + 1 :]])
    expected = model.language_model(inputs_embeds=by_hand[None]).logits
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6)
    assert out.labels[0].tolist() == [IGNORE_INDEX] * (len(ids) - 3 + 7 + 5 - 2) + ids[-3:]
    out.loss.backward()
    assert float(before.embeds.grad.abs().sum()) > 0 and float(after.embeds.grad.abs().sum()) > 0
    with torch.no_grad():
        predicted = model(input_ids=input_ids, visual=[[before, after]]).logits[0, -1].argmax()
        first_token = model.answer([[before, after]], [question], max_new_tokens=1)[0]
    assert tokenizer.decode([int(predicted)], skip_special_tokens=True).strip() == first_token


def test_answer_batched_equals_one_by_one(tiny_model, tokens_factory):
    model, _ = tiny_model
    visual = [tokens_factory(9, 64, seed=0), tokens_factory(25, 64, seed=1), tokens_factory(3, 64, seed=2)]
    questions = ["How many ships?", "What colour is the roof inside the box?", "Is there a bridge over the river?"]
    batched = model.answer(visual, questions, max_new_tokens=6)
    single = [model.answer([v], [q], max_new_tokens=6)[0] for v, q in zip(visual, questions)]
    assert batched == single
    assert all(isinstance(text, str) for text in batched)
    assert any(batched)
    assert model.answer([], []) == []
    with pytest.raises(ValueError, match="2 visual inputs for 1 questions"):
        model.answer(visual[:2], questions[:1])


def test_questions_sharing_visual_tokens_answer_as_one_by_one(tiny_model, tokens_factory):
    """One prefill of the shared image prefix, copied per question (and a question with other tokens
    batched beside them), gives each question the answer it gets alone."""
    model, _ = tiny_model
    scene, other = tokens_factory(40, 64, seed=3), tokens_factory(12, 64, seed=4)
    # The same tokens as another object, as the split stages rebuild them from a payload.
    copy = type(scene)(**{name: value.clone() if torch.is_tensor(value) else value for name, value in vars(scene).items()})
    questions = ["How many ships?", "Is there a bridge over the river?", "What is in the box?", "Which road is flooded?", "Any planes?"]
    visual = [scene, scene, other, copy, scene]
    together = model.answer(visual, questions, max_new_tokens=8)
    single = [model.answer([v], [q], max_new_tokens=8)[0] for v, q in zip(visual, questions)]
    assert together == single
    assert len(set(single)) > 1, "the questions must get different answers for this check to mean anything"


def test_questions_sharing_leading_visual_tokens_answer_as_one_by_one(tiny_model, tokens_factory):
    """c2f's layout: one scene thumbnail, then each question's own fine tokens (or none). The
    thumbnail is prefilled once for all of them, and each answer is the one it gets alone."""
    model, _ = tiny_model
    thumbnail = tokens_factory(8, 64, seed=1)
    tails = [tokens_factory(count, 64, seed=seed) for count, seed in ((10, 2), (16, 3), (10, 4))]
    visual = [PrunedTokens.concat([thumbnail, tail], dense=100) for tail in tails] + [thumbnail]
    questions = ["How many ships?", "Is there a bridge over the river?", "What is in the box?", "Any planes?"]
    ids = [model._prompt(q) for q in questions]
    assert _shared_prefix_groups(visual, [(torch.tensor(i), p) for i, p, _ in ids]) == [([0, 1, 2, 3], 8)]
    together = model.answer(visual, questions, max_new_tokens=8)
    single = [model.answer([v], [q], max_new_tokens=8)[0] for v, q in zip(visual, questions)]
    assert together == single
    assert len(set(single)) > 1, "the questions must get different answers for this check to mean anything"


def test_a_group_shares_only_what_all_its_questions_have_in_common(tiny_model, tokens_factory):
    """A third question sharing more with the first than the second does must not widen the group's
    shared prefix: the second would be answered over the first's tokens."""
    model, _ = tiny_model
    head, middle = tokens_factory(3, 64, seed=5), tokens_factory(7, 64, seed=6)
    tails = [tokens_factory(6, 64, seed=seed) for seed in (7, 8, 9)]
    visual = [
        PrunedTokens.concat([head, middle, tails[0]], dense=100),
        PrunedTokens.concat([head, tails[1]], dense=100),  # 3 tokens in common with the first
        PrunedTokens.concat([head, middle, tails[2]], dense=100),  # 10 in common with the first
    ]
    questions = ["How many ships?", "Is there a bridge over the river?", "What is in the box?"]
    ids = [model._prompt(q) for q in questions]
    assert _shared_prefix_groups(visual, [(torch.tensor(i), p) for i, p, _ in ids]) == [([0, 1, 2], 3)]
    together = model.answer(visual, questions, max_new_tokens=8)
    assert together == [model.answer([v], [q], max_new_tokens=8)[0] for v, q in zip(visual, questions)]


def test_multi_image_questions_answer_as_one_by_one(tiny_model, tokens_factory):
    """Questions on the same image pair share the prefill of the first image; a single-image
    question on that first image shares it too; each gets the answer it gets alone."""
    model, _ = tiny_model
    before, after, other = (tokens_factory(count, 64, seed=seed) for count, seed in ((40, 3), (12, 4), (9, 7)))
    visual = [[before, after], [before, after], before, [before, other], [after, before]]
    questions = ["How many ships?", "Is there a bridge over the river?", "How many ships?", "What is in the box?", "Any planes?"]
    firsts = [v[0] if isinstance(v, list) else v for v in visual]
    prompts = [model._prompt(q, images=len(v) if isinstance(v, list) else 1) for v, q in zip(visual, questions)]
    assert _shared_prefix_groups(firsts, [(torch.tensor(i), p) for i, p, _ in prompts]) == [([0, 1, 2, 3], 40), ([4], 12)]
    together = model.answer(visual, questions, max_new_tokens=8)
    single = [model.answer([v], [q], max_new_tokens=8)[0] for v, q in zip(visual, questions)]
    assert together == single
    assert len(set(single)) > 1, "the questions must get different answers for this check to mean anything"
    ids, positions, question_tokens = model._prompt(questions[0], images=2)
    assert [ids[p] for p in positions] == [model.config.image_token_id] * 2
    assert model.tokenizer.decode([ids[t] for t in question_tokens]).strip() == questions[0]
    with pytest.raises(ValueError, match="at least one image"):
        model.answer([[]], ["x"])


def test_answer_needs_a_tokenizer(tiny_model, tokens_factory):
    model, _ = tiny_model
    model._tokenizer = None
    with pytest.raises(RuntimeError, match="no tokenizer attached"):
        model.answer([tokens_factory(2, 64)], ["x"])


@pytest.mark.parametrize("strategy_name", ["downsample", "uhr-bat"])
def test_training_learns_an_answer_only_the_pixels_give(tiny_model, strategy_name):
    """Same question, two images, two answers: the loss can only fall below chance (ln 2 on the
    differing token) if what the model learns flows from the pixels through the visual tokens."""
    model, tokenizer = tiny_model
    model.train()
    strategy = build_strategy(PruningConfig(strategy=strategy_name, budget=16, scales=[32, 64]))
    rng = np.random.default_rng(0)
    scenes = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    question = "What colour is the scene?"
    samples = []
    for answer, rgb in scenes.items():
        image = np.clip(np.array(rgb) + rng.integers(-20, 21, size=(64, 64, 3)), 0, 255).astype(np.uint8)
        samples.append((ArraySource(image), [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]))
    input_ids, mask, labels = _batch(tokenizer, [conversation for _, conversation in samples])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        visual = [strategy.select(model, strategy.encode(model, source), question) for source, _ in samples]
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels, visual=visual).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        visual = [strategy.select(model, strategy.encode(model, source), question) for source, _ in samples]
        swapped = model(input_ids=input_ids, attention_mask=mask, labels=labels, visual=visual[::-1]).loss
        answers = model.answer(visual, [question, question], max_new_tokens=4)
    trained = loss.item()
    assert answers == list(scenes), (answers, trained)
    assert swapped.item() > trained + 0.5, "swapping the images must hurt: the answers come from the pixels"
