"""`visual_importance` equals the attention an eager full forward reports (`output_attentions=True`)."""

from __future__ import annotations

import pytest
import torch

from uhr.model.importance import decoder_attention, resolve_layer

QUESTION = "How many storage tanks are near the port?"


def _eager_reference(model, visual, question, layer, query):
    """Head-averaged attention of the whole LM run eagerly, rows/columns picked by hand."""
    tokenizer = model.tokenizer
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"<image>\n{question}"}], tokenize=False, add_generation_prompt=True
    )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(encoding["input_ids"])
    position = int((ids == tokenizer.image_token_id).nonzero()[0, 0])
    count = visual.shape[0]
    embeds = model.get_input_embeddings()(ids.masked_fill(ids == tokenizer.image_token_id, 0))
    inputs_embeds = torch.cat([embeds[:position], visual, embeds[position + 1 :]])[None]
    model.language_model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model.language_model(inputs_embeds=inputs_embeds, output_attentions=True).attentions
    weights = attentions[layer][0].mean(dim=0)  # (L, L)
    start = text.index(question)
    rows = [
        i + (count - 1 if i > position else 0)
        for i, (a, b) in enumerate(encoding["offset_mapping"])
        if a < start + len(question) and b > start
    ]
    if query == "last":
        return weights[-1, position : position + count]
    return weights[rows][:, position : position + count].mean(dim=0)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_llama_model"])
@pytest.mark.parametrize(("layer", "query"), [(0, "mean"), (-1, "mean"), (-1, "last"), (1, "last")])
def test_visual_importance_equals_eager_attentions(request, tokens_factory, fixture, layer, query):
    model, _ = request.getfixturevalue(fixture)
    visual = tokens_factory(37, model.config.text_config.hidden_size, seed=3).embeds
    assert model.language_model.config._attn_implementation == "sdpa"
    ours = model.visual_importance(visual, QUESTION, layer=layer, query=query)
    expected = _eager_reference(model, visual, QUESTION, layer, query)
    assert ours.shape == (37,)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    # Not a constant: the visual tokens get different shares of the question's attention.
    assert float(ours.std()) > 0


def test_visual_importance_validates_inputs(tiny_model, tokens_factory):
    model, _ = tiny_model
    visual = tokens_factory(5, 64).embeds
    with pytest.raises(ValueError, match="outside a 2-layer"):
        model.visual_importance(visual, QUESTION, layer=2, query="mean")
    with pytest.raises(ValueError, match="query must be"):
        model.visual_importance(visual, QUESTION, layer=0, query="first")
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        model.visual_importance(visual[:, :10], QUESTION, layer=0, query="mean")
    with pytest.raises(ValueError, match="image placeholder"):
        model.visual_importance(visual, "what is <image>?", layer=0, query="mean")


def test_resolve_layer():
    assert resolve_layer(-1, 28) == 27
    assert resolve_layer(0, 28) == 0
    assert resolve_layer(-28, 28) == 0
    with pytest.raises(ValueError):
        resolve_layer(-29, 28)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_llama_model"])
@pytest.mark.parametrize("query", ["mean", "last"])
def test_one_prefix_serves_every_question(request, tokens_factory, fixture, query):
    model, _ = request.getfixturevalue(fixture)
    visual = tokens_factory(29, model.config.text_config.hidden_size, seed=5).embeds
    prefix = model.importance_prefix(visual, layer=-1)
    questions = [QUESTION, "Is there a red plane?", "Which colour is the largest roof, A or B?"]
    shared = [model.prefixed_importance(prefix, q, query=query) for q in questions]
    for question, ours in zip(questions, shared):
        torch.testing.assert_close(ours, _eager_reference(model, visual, question, -1, query), atol=1e-6, rtol=1e-5)
    # The questions are told apart: the prefix was not grown by the earlier ones.
    assert not torch.equal(shared[0], shared[1])
    assert all(key.shape[2] == prefix.decoder.length for key, _ in prefix.decoder.key_values)


def test_activation_checkpointing_in_training_scores_as_inference_does(tiny_model, tokens_factory):
    # Fine-tuning selects tokens with the model in training mode, its layers checkpointed.
    model, _ = tiny_model
    visual = tokens_factory(29, model.config.text_config.hidden_size, seed=5).embeds
    with torch.no_grad():
        expected = model.visual_importance(visual, QUESTION, layer=-1)
        model.train()
        model.activation_checkpointing_enable()
        prefix = model.importance_prefix(visual, layer=-1)
        got = model.visual_importance(visual, QUESTION, layer=-1)
    assert len(prefix.decoder.key_values) == len(model.language_model.get_decoder().layers) - 1
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_prefix_is_checked(tiny_model, tokens_factory):
    model, _ = tiny_model
    visual = tokens_factory(7, 64).embeds
    prefix = model.importance_prefix(visual, layer=0)
    tail = model.get_input_embeddings()(torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match="layer 0"):
        decoder_attention(model.language_model, tail, 1, torch.tensor([prefix.decoder.length]), torch.tensor([0]), prefix.decoder)
    with pytest.raises(ValueError, match="after the"):
        decoder_attention(model.language_model, tail, 0, torch.tensor([1]), torch.tensor([0]), prefix.decoder)
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        model.importance_prefix(visual[:, :10], layer=0)
    with pytest.raises(ValueError, match="query must be"):
        model.prefixed_importance(prefix, QUESTION, query="first")
