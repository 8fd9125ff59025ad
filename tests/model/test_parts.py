"""Config validation and the model parts the strategies call (tower, projector, positional term, reghead)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig

from uhr.model import UhrConfig, build_tiny_model
from uhr.model.tiling import clip_normalize


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vision_feature_layer": 0}, "must select an encoder layer"),
        ({"vision_feature_layer": -25}, "must select an encoder layer"),
        ({"vision_feature_layer": "-2"}, "must be an int"),
        ({"projector_type": "linear"}, "projector_type"),
        ({"image_grid_pinpoints": [[336, 500]]}, "multiples of the tile size 336"),
        ({"image_grid_pinpoints": []}, "at least one"),
        ({"num_scales": 0}, "num_scales"),
        ({"tile_batch_size": 0}, "tile_batch_size"),
        ({"image_token": ""}, "image_token"),
        ({"text_config": {"model_type": "clip_vision_model"}}, "not a causal LM"),
        ({"vision_config": {"model_type": "siglip_vision_model"}}, "must be a CLIP"),
        ({"pruning_defaults": {"strategy": "nope"}}, "strategy"),
        ({"visual_feature_layer": -2}, r"unknown field\(s\) \['visual_feature_layer'\]"),
        ({"model_type": "llava"}, "expected 'uhr'"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UhrConfig(**kwargs)


def test_config_defaults_and_roundtrip(tmp_path):
    config = UhrConfig(pruning_defaults={"strategy": "geollava", "geollava": {"max_tokens_per_tile": 24}})
    assert (config.tile_size, config.patch_grid, config.vision_feature_layer) == (336, 24, -2)
    assert config.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, UhrConfig)
    assert loaded.to_json_string(use_diff=True) == config.to_json_string(use_diff=True)
    assert loaded.pruning_defaults == config.pruning_defaults


def test_encode_tiles_is_chunked_and_selects_the_layer(tiny_model):
    model, _ = tiny_model
    tiles = torch.randint(0, 256, (7, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    model.config.tile_batch_size = 3
    features, cls = model.encode_tiles(tiles)
    model.config.tile_batch_size = 64
    whole, whole_cls = model.encode_tiles(tiles)
    assert features.shape == (7, 8, 8, 32) and cls.shape == (7, 32)
    torch.testing.assert_close(features, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(cls, whole_cls, atol=1e-6, rtol=0)
    # hidden_states[-2] of the full tower: CLS first, then the 8 x 8 patches in raster order.
    with torch.no_grad():
        hidden = model.vision_tower(clip_normalize(tiles), output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(cls, hidden[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(features.reshape(7, 64, 32), hidden[:, 1:], atol=1e-6, rtol=0)
    assert model.selected_vision_layer is model.vision_tower.encoder.layers[0]
    assert model.encode_tiles(tiles[:0])[0].shape == (0, 8, 8, 32)
    with pytest.raises(ValueError, match=r"uint8 \(T, 32, 32, 3\)"):
        model.encode_tiles(tiles[:, :16])


def test_selected_layer_follows_config():
    model, _ = build_tiny_model(vision_config={"num_hidden_layers": 4}, vision_feature_layer=2)
    assert model.selected_vision_layer is model.vision_tower.encoder.layers[1]
    tiles = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        features, _ = model.encode_tiles(tiles)
        hidden = model.vision_tower(clip_normalize(tiles), output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(features.reshape(2, 64, 32), hidden[:, 1:], atol=1e-6, rtol=0)


def test_encode_view_pads_and_marks_padding(tiny_model, image_factory):
    model, _ = tiny_model
    view = image_factory(40, 70)
    grid = model.encode_view(view, scale=2, box=(0.0, 0.0, 960.0, 640.0))
    assert grid.tiles == (2, 3) and grid.shape == (16, 24) and grid.scale == 2
    assert grid.cls.shape == (2, 3, 32)
    assert grid.valid.shape == (16, 24)
    assert grid.valid[:10, :18].all() and not grid.valid[10:].any() and not grid.valid[:, 18:].any()
    # Tile (1, 2) is the bottom-right tile of the padded view.
    padded = np.zeros((64, 96, 3), dtype=np.uint8)
    padded[:40, :70] = view
    features, cls = model.encode_tiles(torch.from_numpy(padded[32:64, 64:96][None].copy()))
    torch.testing.assert_close(grid.features[1, 2], features[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grid.cls[1, 2], cls[0], atol=1e-6, rtol=0)


def test_scale_embedding_starts_at_zero_and_interpolates(tiny_model):
    model, _ = tiny_model
    assert float(model.scale_embedding(0, 16, 24).detach().abs().max()) == 0  # untrained: no effect
    with torch.no_grad():
        model.scale_embedding.position.copy_(torch.arange(8.0)[None, None, :].expand(64, 8, 8))  # x ramp
        model.scale_embedding.scale[3] = 1.0
    term = model.scale_embedding(3, 4, 16).detach()
    assert term.shape == (4, 16, 64)
    # Bilinear resampling of an x ramp stays a monotone x ramp, constant along y, shifted by 1.
    assert torch.all(term[:, 1:] >= term[:, :-1])
    torch.testing.assert_close(term[0], term[3])
    assert float(term.min()) == pytest.approx(1.0) and float(term.max()) == pytest.approx(8.0)
    with pytest.raises(ValueError, match="outside the 4 scales"):
        model.scale_embedding(4, 2, 2)


def test_scale_embedding_lays_its_table_over_the_scene_on_a_partly_padded_grid(tiny_model):
    model, _ = tiny_model
    with torch.no_grad():
        model.scale_embedding.position.copy_(torch.arange(8.0)[None, :, None].expand(64, 8, 8))  # y ramp, row i at (i + .5) / 8
        model.scale_embedding.scale.zero_()
    exact = model.scale_embedding(0, 4, 16).detach()
    torch.testing.assert_close(model.scale_embedding(0, 4, 16, (4.0, 16.0)).detach(), exact)
    assert exact[:, 0, 0].tolist() == pytest.approx([0.5, 2.5, 4.5, 6.5])  # rows at 1/8, 3/8, 5/8, 7/8 of the scene
    # The scene is 3.5 rows tall: row r's centre is at (r + .5) / 3.5 of it; the last row's centre is its bottom edge.
    padded = model.scale_embedding(0, 4, 16, (3.5, 16.0)).detach()
    assert padded[:, 0, 0].tolist() == pytest.approx([8 * (r + 0.5) / 3.5 - 0.5 for r in range(3)] + [7.0])
    torch.testing.assert_close(padded[:, 0], padded[:, 15])


def test_reghead_gives_neighbour_probabilities(tiny_model):
    model, _ = tiny_model
    assert float(model.reghead.pw.bias.detach().abs().max()) == 0
    assert model.reghead.dw.bias is None and model.reghead.dw.groups == 32
    features = torch.randn(3, 8, 8, 32)
    probs = model.reghead(features)
    assert probs.shape == (3, 8, 8, 9)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 8, 8))
    torch.testing.assert_close(model.reghead(features[1]), probs[1])
    # A feature map that is constant and zero gives logits = bias = 0: uniform over the 9 offsets.
    torch.testing.assert_close(model.reghead(torch.zeros(8, 8, 32)), torch.full((8, 8, 9), 1 / 9))


def test_project_is_the_mlp2x_gelu(tiny_model):
    model, _ = tiny_model
    x = torch.randn(5, 32)
    p = model.multi_modal_projector
    expected = p.linear_2(torch.nn.functional.gelu(p.linear_1(x)))
    torch.testing.assert_close(model.project(x), expected)
    assert model.project(torch.randn(2, 3, 4, 32)).shape == (2, 3, 4, 64)
