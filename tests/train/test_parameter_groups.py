"""Optimizer groups: one per training part with its lr; with weight decay, biases and norms undecayed."""

from __future__ import annotations

from uhr.model import build_tiny_model
from uhr.train.config import OptimizerConfig
from uhr.train.loop import model_part, parameter_groups


def test_groups_follow_the_parts_and_leave_frozen_ones_out():
    model, _ = build_tiny_model(seed=0)
    groups = parameter_groups(model, OptimizerConfig(projector={"lr": 2e-3}, language_model={"lr": 1e-3}))
    assert [(g["name"], g["lr"]) for g in groups] == [("projector", 2e-3), ("language_model", 1e-3)]
    assert all("weight_decay" not in g for g in groups)  # DeepSpeed's optimizer setting applies
    assert not any(p.requires_grad for n, p in model.named_parameters() if model_part(n) == "vision_tower")
    trainable = {id(p) for _, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable


def test_with_weight_decay_biases_and_norms_are_not_decayed():
    model, _ = build_tiny_model(seed=0)
    config = OptimizerConfig(weight_decay=0.1, vision_tower={"train": True, "lr": 1e-5})
    groups = {g["name"]: g for g in parameter_groups(model, config)}
    assert list(groups) == [
        "vision_tower", "vision_tower.no_decay", "projector", "projector.no_decay", "language_model", "language_model.no_decay"
    ]  # fmt: skip
    for name, group in groups.items():
        part = name.removesuffix(".no_decay")
        assert group["lr"] == getattr(config, part).lr
        if name.endswith(".no_decay"):
            assert group["weight_decay"] == 0.0 and all(p.ndim < 2 for p in group["params"])
        else:
            assert "weight_decay" not in group and all(p.ndim >= 2 for p in group["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)] for g in groups.values() if g["name"].endswith(".no_decay") for p in g["params"]}
    assert any(n.endswith(".bias") for n in undecayed) and any("norm" in n for n in undecayed)
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))
