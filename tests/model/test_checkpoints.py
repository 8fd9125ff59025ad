"""Loading (b) LongVA / GeoLLaVA-8K and (c) our own export gives the in-memory model back.

(a) LLaVA-NeXT directories are covered by `test_llava_next_fidelity.py`. Checkpoints are written
here the way their producers write them (explicit key layouts, config.json as the training code
stores it) and loaded through `load_model`, the path a real checkpoint takes.
"""

from __future__ import annotations

import copy
import json
import logging
import pickle
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from uhr.model import (
    CheckpointError,
    build_tiny_model,
    load_model,
    load_model_config,
    load_tokenizer,
    save_model,
    weights_fingerprint,
)
from uhr.model.pruning.config import PruningConfig

PROMPT_QUESTION = "Is there a bridge over the river?"


def _outputs(model, tokens_factory, image_factory):
    """Everything a strategy or the answer path reads from a model, on fixed inputs."""
    tiles = torch.from_numpy(np.stack([image_factory(32, 32, seed=s) for s in range(3)]))
    with torch.no_grad():
        features, cls = model.encode_tiles(tiles)
        visual = tokens_factory(12, model.config.text_config.hidden_size, seed=5)
        ids, _, _ = model._prompt(PROMPT_QUESTION)
        logits = model(input_ids=torch.tensor([ids]), visual=[visual]).logits
        return {
            "features": features,
            "cls": cls,
            "projected": model.project(features),
            "reghead": model.reghead(features),
            "newline": model.image_newline,
            "scale": model.scale_embedding(1, 5, 7),
            "logits": logits,
        }


def _assert_same(a, b, keys=None):
    for key in keys or a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


# ---------------------------------------------------------------------------------------------
# (c) our export
# ---------------------------------------------------------------------------------------------


def test_own_export_roundtrip(tmp_path, tiny_model, tokens_factory, image_factory):
    model, tokenizer = tiny_model
    with torch.no_grad():
        model.scale_embedding.scale[1] += 0.5  # trained-looking values survive too
    save_model(model, tmp_path / "export")
    files = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert not any(name.endswith((".bin", ".pt")) for name in files)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "uhr"

    loaded, loaded_tokenizer = load_model(tmp_path / "export")
    assert not loaded.training
    for part in ("vision_config", "text_config"):
        saved, original = loaded.config.to_dict()[part], model.config.to_dict()[part]
        assert {k: v for k, v in saved.items() if k != "dtype"} == {k: v for k, v in original.items() if k != "dtype"}
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    _assert_same(_outputs(model, tokens_factory, image_factory), _outputs(loaded, tokens_factory, image_factory))
    visual = [tokens_factory(7, 64, seed=9)]
    assert loaded.answer(visual, [PROMPT_QUESTION], max_new_tokens=5) == model.answer(
        visual, [PROMPT_QUESTION], max_new_tokens=5
    )


def test_own_export_with_missing_or_stray_weights_is_refused(tmp_path, tiny_model):
    model, _ = tiny_model
    save_model(model, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    damaged = {k: v for k, v in state.items() if not k.startswith("multi_modal_projector.linear_2.")}
    save_file(damaged, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing_keys.*multi_modal_projector.linear_2.bias"):
        load_model(tmp_path)
    save_file({**state, "stray.weight": torch.zeros(3)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected_keys.*stray.weight"):
        load_model(tmp_path)


def test_own_export_dtype_and_pickle_opt_in(tmp_path, tiny_model, tokens_factory, image_factory):
    model, _ = tiny_model
    save_model(model, tmp_path)
    half, _ = load_model(tmp_path, dtype="bfloat16")
    assert half.dtype == torch.bfloat16 and half.language_model.dtype == torch.bfloat16

    state = load_file(str(tmp_path / "model.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pickle files \(pytorch_model.bin\).*allow_pickle=True"):
        load_model(tmp_path)
    loaded, _ = load_model(tmp_path, allow_pickle=True)
    _assert_same(_outputs(model, tokens_factory, image_factory), _outputs(loaded, tokens_factory, image_factory))


def test_own_export_from_object_storage(tmp_path, s3_server, tiny_model, tokens_factory, image_factory, config_geometry):
    model, _ = tiny_model
    bucket = s3_server.new_bucket("models")
    uri = f"s3://{bucket}/runs/tiny/export"
    save_model(model, uri, storage=s3_server.storage())
    cache = tmp_path / "cache"
    loaded, _ = load_model(uri, storage=s3_server.storage(), cache_dir=cache)
    _assert_same(_outputs(model, tokens_factory, image_factory), _outputs(loaded, tokens_factory, image_factory))
    weights = (cache / next(p.name for p in cache.iterdir() if not p.name.startswith(".")) / "model.safetensors").stat().st_size
    # A second load finds the cached copy: it lists the directory but downloads nothing.
    with s3_server.measure() as measured:
        load_model(uri, storage=s3_server.storage(), cache_dir=cache)
    assert measured.bytes_sent < weights / 10
    # A checkpoint rewritten in place is copied again.
    retrained, _ = build_tiny_model(seed=3)
    save_model(retrained, uri, storage=s3_server.storage())
    reloaded, _ = load_model(uri, storage=s3_server.storage(), cache_dir=cache)
    _assert_same(_outputs(retrained, tokens_factory, image_factory), _outputs(reloaded, tokens_factory, image_factory))
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 1
    # The driver's view of the model (read geometry) costs config.json only, not the weights.
    with s3_server.measure() as measured:
        config = load_model_config(uri, storage=s3_server.storage())
    assert config_geometry(config) == config_geometry(reloaded.config)
    assert measured.bytes_sent < weights / 10
    with pytest.raises(CheckpointError, match="no such directory"):
        load_model(f"s3://{bucket}/runs/missing", storage=s3_server.storage(), cache_dir=cache)


def test_weights_fingerprint_follows_the_weights_not_the_place(tmp_path, s3_server, tiny_model):
    model, _ = tiny_model
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained.language_model.lm_head.weight[3, 5] += 1.0  # one weight of one tensor
    save_model(model, tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first = weights_fingerprint(tmp_path / "a")
    assert weights_fingerprint(tmp_path / "b") == first  # copied or moved: the same model
    save_model(retrained, tmp_path / "a")  # retrained and written over the old one
    assert weights_fingerprint(tmp_path / "a") != first
    # Pickle weights are sampled too.
    state = load_file(str(tmp_path / "b" / "model.safetensors"))
    (tmp_path / "b" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "b" / "pytorch_model.bin")
    pickled = weights_fingerprint(tmp_path / "b")
    state["language_model.lm_head.weight"][3, 5] += 1.0
    torch.save(state, tmp_path / "b" / "pytorch_model.bin")
    assert weights_fingerprint(tmp_path / "b") not in (pickled, first)
    # In object storage, by the store's content tag: nothing is downloaded.
    storage = s3_server.storage()
    uri = f"s3://{s3_server.new_bucket('fingerprints')}/export"
    save_model(model, uri, storage=storage)
    with s3_server.measure() as measured:
        remote = weights_fingerprint(uri, storage=storage)
    assert measured.bytes_sent < 10_000
    save_model(retrained, uri, storage=storage)
    assert weights_fingerprint(uri, storage=storage) != remote
    (tmp_path / "c").mkdir()
    with pytest.raises(CheckpointError, match="no weights"):
        weights_fingerprint(tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# (b) LongVA / GeoLLaVA-8K
# ---------------------------------------------------------------------------------------------

# Our parameter names -> the LongVA layout (the reverse of `LONGVA_KEY_MAP`, written out).
def _longva_key(name: str, merge_type: str) -> str | None:
    if name.startswith("vision_tower."):
        return "model.vision_tower.vision_tower.vision_model." + name.removeprefix("vision_tower.")
    if name.startswith("multi_modal_projector.linear_1."):
        return "model.mm_projector.0." + name.rsplit(".", 1)[1]
    if name.startswith("multi_modal_projector.linear_2."):
        return "model.mm_projector.2." + name.rsplit(".", 1)[1]
    if name.startswith("language_model.model."):
        return "model." + name.removeprefix("language_model.model.")
    if name.startswith("language_model.lm_head."):
        return "lm_head." + name.removeprefix("language_model.lm_head.")
    if name == "image_newline":
        return "model.image_newline" if "unpad" in merge_type else None
    if name.startswith("reghead."):
        return name if merge_type.startswith("unires_max") else None
    return None  # scale_embedding: not part of LongVA


def _write_longva(model, tokenizer, directory, *, merge_type: str, text_type: str, pinpoints, heads_in_config: bool):
    directory.mkdir(parents=True, exist_ok=True)
    text = model.config.text_config
    raw = {
        "architectures": ["LlavaQwenForCausalLM" if text_type == "qwen2" else "LlavaLlamaForCausalLM"],
        "model_type": "llava_qwen" if text_type == "qwen2" else "llava_llama",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": text.rope_parameters["rope_theta"],
        "rope_scaling": None,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "pad_token_id": text.pad_token_id,
        "eos_token_id": text.eos_token_id,
        "torch_dtype": "float32",
        "transformers_version": "4.40.0.dev0",
        "use_cache": True,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": model.config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": merge_type,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model",
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": pinpoints,
        "tokenizer_model_max_length": 32768,
        "tokenizer_padding_side": "right",
        "use_mm_proj": True,
    }
    if text_type == "qwen2":
        raw.update({"sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 28})
    if heads_in_config:
        raw["vision_config"] = {"num_attention_heads": model.config.vision_config.num_attention_heads}
    (directory / "config.json").write_text(json.dumps(raw, indent=2))
    state = {}
    for name, tensor in model.state_dict().items():
        key = _longva_key(name, merge_type)
        if key is not None:
            state[key] = tensor.contiguous()
    state["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(65)[None]
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)


def test_geollava_checkpoint(tmp_path, tokens_factory, image_factory, caplog, config_geometry):
    model, tokenizer = build_tiny_model(seed=1)
    pinpoints = str([(32, 64), (64, 32), (64, 64), (32, 96), (96, 96)])  # as the training script passes it
    _write_longva(
        model, tokenizer, tmp_path, merge_type="unires_max6", text_type="qwen2", pinpoints=pinpoints, heads_in_config=True
    )
    with caplog.at_level(logging.INFO, logger="uhr.model.checkpoints"):
        loaded, _ = load_model(tmp_path)
    assert "position_ids" in caplog.text  # ignored keys are listed
    vision = loaded.config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.patch_size, vision.image_size) == (32, 2, 4, 32)
    assert vision.intermediate_size == 64 and vision.num_attention_heads == 4
    # LongVA's (width, height) pairs, as (height, width).
    assert loaded.config.image_grid_pinpoints == [[64, 32], [32, 64], [64, 64], [96, 32], [96, 96]]
    defaults = PruningConfig.model_validate(loaded.config.pruning_defaults)
    assert defaults.strategy.value == "geollava"
    assert defaults.geollava.max_tokens_per_tile == 6
    assert (defaults.geollava.max_tiles_per_side, defaults.geollava.max_tiles, defaults.budget) == (3, 9, 54)
    # Read from config.json and the safetensors headers alone, the config is the loader's.
    assert config_geometry(load_model_config(tmp_path)) == config_geometry(loaded.config)
    expected, got = _outputs(model, tokens_factory, image_factory), _outputs(loaded, tokens_factory, image_factory)
    # scale_embedding is ours only (zero-initialised); image_newline is not in a unires checkpoint.
    _assert_same(expected, got, ["features", "cls", "projected", "reghead", "logits"])
    assert float(got["scale"].abs().max()) == 0


def test_longva_llama_checkpoint_infers_heads_from_width(tmp_path, tokens_factory, image_factory):
    model, tokenizer = build_tiny_model(
        seed=2, text_model="llama", vision_config={"hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 96}
    )
    _write_longva(
        model,
        tokenizer,
        tmp_path,
        merge_type="spatial_unpad",
        text_type="llama",
        pinpoints=[[32, 64], [64, 32], [64, 64]],
        heads_in_config=False,
    )
    loaded, _ = load_model(tmp_path)
    assert loaded.config.vision_config.num_attention_heads == 2  # 128 / 64
    assert loaded.config.text_config.model_type == "llama"
    assert loaded.config.pruning_defaults == {"strategy": "none", "budget": 64 + 16 * 17}
    _assert_same(
        _outputs(model, tokens_factory, image_factory),
        _outputs(loaded, tokens_factory, image_factory),
        ["features", "cls", "projected", "newline", "logits"],
    )


def test_pinpoints_given_as_a_range_of_tile_counts(tmp_path):
    model, tokenizer = build_tiny_model(seed=0)
    _write_longva(model, tokenizer, tmp_path, merge_type="spatial_unpad", text_type="qwen2",
                  pinpoints="(1x1),...,(2x3)", heads_in_config=True)  # fmt: skip
    # LLaVA-OneVision's form: every (width, height) count from the first to the last, times the tile.
    expected = [[h * 32, w * 32] for w in (1, 2) for h in (1, 2, 3)]
    assert load_model_config(tmp_path).image_grid_pinpoints == expected
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "image_grid_pinpoints": "[(32, 64), (64"}))
    with pytest.raises(CheckpointError, match="is not a list of \\(width, height\\) pairs"):
        load_model_config(tmp_path)


def test_longva_checkpoint_errors(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    kwargs = {"merge_type": "unires_max24", "text_type": "qwen2", "pinpoints": [[32, 64]], "heads_in_config": True}
    _write_longva(model, tokenizer, tmp_path / "ok", **kwargs)

    state = load_file(str(tmp_path / "ok" / "model.safetensors"))
    missing = {k: v for k, v in state.items() if not k.startswith("model.layers.1.mlp")}
    (tmp_path / "missing").mkdir()
    save_file(missing, str(tmp_path / "missing" / "model.safetensors"))
    (tmp_path / "missing" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    tokenizer.save_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"lacks 3 parameter\(s\).*language_model.model.layers.1.mlp"):
        load_model(tmp_path / "missing")

    wrong = dict(state)
    wrong["model.mm_projector.2.weight"] = torch.zeros(64, 32)
    save_file(wrong, str(tmp_path / "ok" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*model.mm_projector.2.weight \(64, 32\)"):
        load_model(tmp_path / "ok")

    config_text = (tmp_path / "ok" / "config.json").read_text()
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**json.loads(config_text), "mm_vision_select_feature": "cls_patch"}))
    with pytest.raises(CheckpointError, match="mm_vision_select_feature 'cls_patch' is not supported"):
        load_model(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(config_text)

    # A tower whose heads and activation no weight shape tells, named as no OpenAI CLIP is, and not declared.
    raw = json.loads(config_text)
    (tmp_path / "ok" / "config.json").write_text(
        json.dumps({**raw, "mm_vision_tower": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "vision_config": {}})
    )
    with pytest.raises(CheckpointError, match="not an OpenAI CLIP ViT.*num_attention_heads and hidden_act"):
        load_model(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(config_text)

    no_tower = {k: v for k, v in state.items() if "vision_tower" not in k}
    save_file(no_tower, str(tmp_path / "ok" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="openai/clip-vit-large-patch14-336.*never contacts"):
        load_model(tmp_path / "ok")

    raw = json.loads((tmp_path / "ok" / "config.json").read_text())
    raw["model_type"] = "llava_mistral"
    (tmp_path / "ok" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="model_type 'llava_mistral'"):
        load_model(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "absent")


def test_weights_come_only_from_the_checkpoints_own_files(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    kwargs = {"merge_type": "unires_max24", "text_type": "qwen2", "pinpoints": [[32, 64]], "heads_in_config": True}
    directory = tmp_path / "ckpt"
    _write_longva(model, tokenizer, directory, **kwargs)
    state = load_file(str(directory / "model.safetensors"))
    vision = {k: v for k, v in state.items() if "vision_tower" in k}

    # An index naming a shard by a path: weights from outside the directory.
    save_file(vision, str(tmp_path / "outside.safetensors"))
    save_file({k: v for k, v in state.items() if k not in vision}, str(directory / "rest.safetensors"))
    (directory / "model.safetensors").unlink()
    for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        weight_map = {**{k: shard for k in vision}, **{k: "rest.safetensors" for k in state if k not in vision}}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match="names a shard outside the checkpoint"):
            load_model(directory)
        with pytest.raises(CheckpointError, match="names a shard outside the checkpoint"):
            weights_fingerprint(directory)
    # A shard the index names that is missing, or pickled: stopped at the index, naming the shard.
    for shard, problem in (("gone.safetensors", "that is not there"), ("rest.bin", "that is not safetensors")):
        weight_map = {**{k: shard for k in vision}, **{k: "rest.safetensors" for k in state if k not in vision}}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=rf"names a shard {problem}: '{shard}'"):
            load_model(directory)
    (directory / "model.safetensors.index.json").unlink()

    # A stray file holding keys the checkpoint's file holds too: which are the model's?
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"is in both model.safetensors and rest.safetensors"):
        load_model(directory)
    (directory / "rest.safetensors").unlink()

    # A key no part of the model takes (a third projector layer) stops the load, as the README says.
    save_file({**state, "model.mm_projector.4.weight": torch.zeros(3)}, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no place for: \['model.mm_projector.4.weight'\]"):
        load_model(directory)


def test_a_module_the_checkpoint_holds_in_part_keeps_what_it_holds(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    _write_longva(model, tokenizer, tmp_path, merge_type="spatial_unpad", text_type="qwen2", pinpoints=[[32, 64]],
                  heads_in_config=True)  # fmt: skip
    state = load_file(str(tmp_path / "model.safetensors"))
    head = {"model.reghead.dw.weight": model.reghead.dw.weight, "model.reghead.pw.weight": model.reghead.pw.weight}
    save_file({**state, **{k: v.detach().contiguous() for k, v in head.items()}}, str(tmp_path / "model.safetensors"))
    loaded, _ = load_model(tmp_path)  # the head's bias is absent: it is initialised, its weights are the checkpoint's
    assert torch.equal(loaded.reghead.pw.weight, model.reghead.pw.weight)
    assert torch.equal(loaded.reghead.dw.weight, model.reghead.dw.weight)


def test_an_export_written_over_another_leaves_one_set_of_weights(tmp_path, tiny_model):
    model, _ = tiny_model
    retrained, _ = build_tiny_model(seed=3)
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # a sharded export, as large models get
    assert (tmp_path / "model.safetensors.index.json").exists()
    save_model(retrained, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*.safetensors*")) == ["model.safetensors"]
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.multi_modal_projector.linear_1.weight, retrained.multi_modal_projector.linear_1.weight)
    # Both layouts at once (written by something else) are refused rather than guessed between.
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="holds both model.safetensors and model.safetensors.index.json"):
        load_model(tmp_path)


def test_a_remote_checkpoint_cannot_write_outside_the_cache(tmp_path, s3_server, tiny_model):
    model, _ = tiny_model
    bucket = s3_server.new_bucket("hostile")
    uri = f"s3://{bucket}/a/b/ckpt"
    save_model(model, uri, storage=s3_server.storage())
    s3_server.client.put_object(Bucket=bucket, Key="a/b/ckpt/../../../escaped.txt", Body=b"x")
    cache = tmp_path / "deep" / "er" / "cache"
    with pytest.raises(CheckpointError, match="lies outside the checkpoint directory"):
        load_model(uri, storage=s3_server.storage(), cache_dir=cache)
    assert not list(tmp_path.rglob("escaped.txt"))


# ---------------------------------------------------------------------------------------------
# (d) tiny models
# ---------------------------------------------------------------------------------------------


def test_build_tiny_model_is_deterministic():
    a, _ = build_tiny_model(seed=0)
    b, _ = build_tiny_model(seed=0)
    c, _ = build_tiny_model(seed=1)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    assert not torch.equal(a.multi_modal_projector.linear_1.weight, c.multi_modal_projector.linear_1.weight)
    llama, _ = build_tiny_model(seed=0, text_model="llama", num_scales=2, tile_batch_size=3)
    assert llama.config.text_config.model_type == "llama"
    assert (llama.config.num_scales, llama.config.tile_batch_size) == (2, 3)
    with pytest.raises(ValueError, match="text_model"):
        build_tiny_model(text_model="gpt2")


# ---------------------------------------------------------------------------------------------
# Refusals and side effects the tests above do not reach
# ---------------------------------------------------------------------------------------------


def _longva_state(model, tokenizer, directory, merge_type="unires_max24"):
    _write_longva(model, tokenizer, directory, merge_type=merge_type, text_type="qwen2", pinpoints=[[32, 64]],
                  heads_in_config=True)  # fmt: skip
    return load_file(str(directory / "model.safetensors"))


def test_checkpoint_keys_for_parameters_the_model_lacks_are_refused(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    state = _longva_state(model, tokenizer, tmp_path)
    # A third LM layer in a two-layer model: the key has a place in the table, not in the model.
    extra = {**state, "model.layers.99.mlp.up_proj.weight": torch.zeros(128, 64)}
    save_file(extra, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"parameters the model does not have.*layers.99.mlp.up_proj"):
        load_model(tmp_path)


def test_two_checkpoint_keys_for_one_parameter_are_refused(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    state = _longva_state(model, tokenizer, tmp_path)
    # The affinity head stored both beside `model` (released GeoLLaVA-8K) and inside it: which one is the model's?
    assert "reghead.pw.bias" in state
    save_file({**state, "model.reghead.pw.bias": torch.zeros_like(state["reghead.pw.bias"])},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"'model.reghead.pw.bias' and 'reghead.pw.bias' both map to 'reghead.pw.bias'"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("merge_type", "dropped", "lacked"),
    [
        ("unires_max24", "reghead.", "reghead.pw.bias"),  # GeoLLaVA-8K without its affinity head
        ("spatial_unpad", "model.image_newline", "image_newline"),  # LongVA without its row separator
    ],
)
def test_a_checkpoint_lacking_what_its_merge_type_uses_is_refused(tmp_path, tiny_model, merge_type, dropped, lacked):
    model, tokenizer = tiny_model
    state = _longva_state(model, tokenizer, tmp_path, merge_type=merge_type)
    assert any(k.startswith(dropped) for k in state)
    save_file({k: v for k, v in state.items() if not k.startswith(dropped)}, str(tmp_path / "model.safetensors"))
    # Left at initialisation, the model would run but answer from a random head / separator.
    with pytest.raises(CheckpointError, match=rf"lacks.*'{re.escape(lacked)}'"):
        load_model(tmp_path)


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path, tiny_model):
    model, _ = tiny_model
    save_model(model, tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    saved = json.loads(config_file.read_text())
    saved.pop("pad_token")
    config_file.write_text(json.dumps(saved))
    _, tokenizer = load_model(tmp_path)
    # Batched prompts are padded; LLaVA checkpoints often ship no pad token.
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_load_tokenizer_from_object_storage_leaves_the_weights_there(s3_server, tiny_model):
    model, tokenizer = tiny_model
    storage = s3_server.storage()
    uri = f"s3://{s3_server.new_bucket('tokenizer')}/export"
    save_model(model, uri, storage=storage)
    weights = s3_server.client.head_object(Bucket=uri.split("/")[2], Key="export/model.safetensors")["ContentLength"]
    with s3_server.measure() as measured:
        remote = load_tokenizer(uri, storage=storage)
    assert remote.get_vocab() == tokenizer.get_vocab()
    assert measured.bytes_sent < weights / 10  # config, tokenizer files and the safetensors header only


def test_save_model_keeps_the_trainers_training_args(tmp_path, tiny_model):
    model, _ = tiny_model
    (tmp_path / "training_args.bin").write_bytes(b"trainer state")
    (tmp_path / "pytorch_model.bin").write_bytes(b"old weights")
    save_model(model, tmp_path)
    # Old weights go (two sets would be ambiguous); the trainer's record of the run is no weights.
    assert not (tmp_path / "pytorch_model.bin").exists()
    assert (tmp_path / "training_args.bin").read_bytes() == b"trainer state"


class _Payload:
    """Pickles as a call that writes a marker file: what a hostile .bin runs when fully unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (shutil.copyfile, (__file__, self.marker))


def test_allow_pickle_still_refuses_pickled_code(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    state = _longva_state(model, tokenizer, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({**state, "lm_head.weight": _Payload(marker)}, tmp_path / "pytorch_model.bin")
    # allow_pickle permits pickled tensors, not arbitrary objects: torch's weights-only unpickler.
    with pytest.raises(pickle.UnpicklingError):
        load_model(tmp_path, allow_pickle=True)
    assert not marker.exists()
