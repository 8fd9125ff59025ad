"""The grounding loss trains the attention c2f scores with, on the rows `forward` trains on."""

from __future__ import annotations

import pytest
import torch

from uhr.model import build_tiny_model, tokenize_conversation
from uhr.model.pruning.base import PrunedTokens
from uhr.model.pruning.grouping import cell_boxes
from uhr.train.data import collate
from uhr.model.importance import decoder_attention
from uhr.model.pruning.uhr_bat import middle_layer
from uhr.train.grounding import grounding_loss

QUESTIONS = ["Is there a red ship in the image?", "What colour is the storage tank next to the harbour in the north?"]


def grid_tokens(side: int, cell: float, dim: int, seed: int) -> PrunedTokens:
    """A side x side grid of random visual tokens, each seeing a `cell`-px square of the scene."""
    generator = torch.Generator().manual_seed(seed)
    count = side * side
    rows, cols = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    return PrunedTokens(
        embeds=torch.randn(count, dim, generator=generator),
        scale=torch.zeros(count, dtype=torch.long),
        row=rows,
        col=cols,
        tile=torch.zeros(count, dtype=torch.long),
        n_source=torch.ones(count, dtype=torch.long),
        box=cell_boxes((0.0, 0.0, side * cell, side * cell), side, side).reshape(-1, 4),
        dense=count,
    )


def training_batch(tokenizer, questions: list[str]) -> dict[str, torch.Tensor]:
    samples = [
        tokenize_conversation(tokenizer, [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": "B"}], 512)
        for q in questions
    ]
    return collate([{key: value.tolist() for key, value in sample.items()} for sample in samples], tokenizer.pad_token_id)


@pytest.mark.parametrize("layer", [0, 1, -1])
def test_prompt_attention_is_the_last_prompt_tokens_attention_that_c2f_scores_with(layer):
    model, tokenizer = build_tiny_model(seed=0, text_model="qwen2")
    dim = model.config.text_config.hidden_size
    visual = [grid_tokens(3, 8.0, dim, seed=1), grid_tokens(4, 8.0, dim, seed=2)]
    batch = training_batch(tokenizer, QUESTIONS)  # rows of different lengths: the first is padded
    assert int(batch["attention_mask"][0].sum()) < batch["attention_mask"].shape[1]
    with torch.no_grad():
        ours = model.prompt_attention(batch["input_ids"], batch["attention_mask"], batch["labels"], visual, layer=layer)
        for weights, tokens, question in zip(ours, visual, QUESTIONS):
            expected = model.visual_importance(tokens.embeds, question, layer=layer, query="last")
            torch.testing.assert_close(weights, expected, atol=1e-6, rtol=1e-5)


def test_evidence_tokens_are_those_whose_box_overlaps_it():
    tokens = grid_tokens(4, 8.0, 8, seed=0)  # cells [0, 8), [8, 16), ... on each axis
    mask = tokens.overlapping([9.0, 0.0, 17.0, 7.5]).reshape(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0, 1:3] = True  # columns 1 and 2 of the first row; touching an edge is not overlapping
    assert torch.equal(mask, expected)
    assert not tokens.overlapping([32.0, 0.0, 40.0, 8.0]).any()


def test_the_loss_moves_attention_onto_the_evidence_and_leaves_rows_without_any_out():
    torch.manual_seed(0)
    model, tokenizer = build_tiny_model(seed=0, text_model="qwen2")
    model.train()
    dim = model.config.text_config.hidden_size
    visual = [grid_tokens(4, 8.0, dim, seed=1), grid_tokens(4, 8.0, dim, seed=2)]
    for tokens in visual:
        tokens.embeds.requires_grad_(True)
    boxes = [[16.0, 16.0, 24.0, 24.0], None]  # one cell of the first row's 16; the second row has no evidence
    batch = training_batch(tokenizer, QUESTIONS)
    layer = 1

    def share() -> float:
        with torch.no_grad():
            weights = model.prompt_attention(batch["input_ids"][:1], batch["attention_mask"][:1], batch["labels"][:1], visual[:1], layer=layer)[0]
        return float(weights[visual[0].overlapping(boxes[0])].sum() / weights.sum())

    before = share()
    loss = grounding_loss(model, batch, visual, boxes, layer)
    assert loss is not None and float(loss.detach()) == pytest.approx(-torch.log(torch.tensor(before)).item(), rel=1e-4)
    loss.backward()
    # The gradient reaches the visual tokens themselves (and through them the projector and tower).
    assert visual[0].embeds.grad is not None and visual[0].embeds.grad.abs().sum() > 0
    assert visual[1].embeds.grad is None

    optimizer = torch.optim.Adam(model.language_model.parameters(), lr=1e-2)
    for _ in range(30):
        optimizer.zero_grad()
        grounding_loss(model, batch, visual, boxes, layer).backward()
        optimizer.step()
    assert before < 0.15 and share() > 0.6, (before, share())
    assert grounding_loss(model, batch, visual, [None, None], layer) is None
    # Evidence no kept token overlaps (a strategy pruned it away) gives no target either.
    assert grounding_loss(model, batch, visual, [[100.0, 100.0, 110.0, 110.0], None], layer) is None


def test_a_pair_row_attends_from_its_last_prompt_token_to_its_first_image():
    """A multi-image row's grounding target is its first image (where its `bbox` lies): the attention
    of the last prompt token, over the whole expanded row, on the first image's tokens."""
    model, tokenizer = build_tiny_model(seed=0, text_model="qwen2")
    dim = model.config.text_config.hidden_size
    before, after = grid_tokens(3, 8.0, dim, seed=3), grid_tokens(2, 8.0, dim, seed=4)
    conversation = [{"from": "human", "value": "<image> <image>\nWhat changed?"}, {"from": "gpt", "value": "B"}]
    sample = tokenize_conversation(tokenizer, conversation, 512, images=2)
    batch = collate([{key: value.tolist() for key, value in sample.items()}], tokenizer.pad_token_id)
    layer = 1
    with torch.no_grad():
        (ours,) = model.prompt_attention(batch["input_ids"], batch["attention_mask"], batch["labels"], [[before, after]], layer=layer)
        ids = batch["input_ids"][0]
        first, second = (ids == tokenizer.image_token_id).nonzero()[:, 0].tolist()
        text = model.get_input_embeddings()(ids.masked_fill(ids == tokenizer.image_token_id, 0))
        row = torch.cat([text[:first], before.embeds, text[first + 1 : second], after.embeds, text[second + 1 :]])
        answer_at = int((batch["labels"][0] != -100).nonzero()[0, 0]) + len(before) + len(after) - 2
        expected = decoder_attention(
            model.language_model, row[None], middle_layer(model, layer),
            torch.tensor([answer_at - 1]), torch.arange(first, first + len(before)),
        )[0]  # fmt: skip
    torch.testing.assert_close(ours, expected)
    assert grounding_loss(model, batch, [[before, after]], [[0.0, 0.0, 8.0, 8.0]], layer) is not None
