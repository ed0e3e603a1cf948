"""Adapter plans: flat from flags, Adaptive Rank from fisher_map.json, staleness warnings, peft's name matching."""

from __future__ import annotations

import json

import pytest
import torch

from sidestep.analysis.fisher_map import FisherMap, write_map
from sidestep.analysis.modules import targetable_modules
from sidestep.data import dataset_hash
from sidestep.errors import ConfigError, MapError
from sidestep.models.convert import diffusers_to_original
from sidestep.testing.tiny import build_tiny_transformer, tiny_config, write_dataset
from sidestep.training.adapters import attach_adapter, module_shapes, plan_adapter, resolve_targets, summarize
from sidestep.training.config import TrainConfig


def _ranks_in_model(model: torch.nn.Module) -> dict[str, int]:
    """Original module name -> rank of its injected LoRA, read from the lora_A weight shapes."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            out[diffusers_to_original(name)] = module.lora_A["default"].weight.shape[0]
    return out


def _scale_of(model: torch.nn.Module, original: str) -> float:
    from sidestep.models.convert import original_to_diffusers

    return dict(model.named_modules())[original_to_diffusers(original)].scaling["default"]


def _map(num_layers: int, ranks: dict[str, int], **fields) -> FisherMap:
    return FisherMap(rank_pattern=ranks, alpha_pattern={n: 2 * r for n, r in ranks.items()},
                     model_variant=fields.pop("model_variant", "base"), num_hidden_layers=num_layers,
                     base_rank=8, **fields)


@pytest.fixture
def ds(tmp_path):
    write_dataset(tmp_path / "ds", count=2, encoder_width=32, lengths=(8, 12), encoder_length=4)
    return tmp_path / "ds"


def test_map_ranks_reach_peft_on_24_layers(ds, tmp_path):
    # Layers 1 vs 11 vs 21 and 2 vs 12 vs 22 share prefixes: each must get exactly its own rank.
    ranks = {"layers.1.self_attn.q_proj": 4, "layers.11.self_attn.q_proj": 12, "layers.21.self_attn.q_proj": 20,
             "layers.2.mlp.down_proj": 6, "layers.12.mlp.down_proj": 10, "layers.22.mlp.down_proj": 14,
             "layers.2.cross_attn.o_proj": 2, "layers.20.cross_attn.o_proj": 16}
    fmap = _map(24, ranks, dataset_hash=dataset_hash(ds))
    write_map(fmap, ds)
    plan = plan_adapter(TrainConfig(ds, tmp_path / "o", rank=64), "base", False, 24)
    assert plan.adaptive and plan.notices == ()
    model = build_tiny_transformer(tiny_config(num_layers=24, hidden=32)).requires_grad_(False)
    trainable = attach_adapter(model, plan)
    assert _ranks_in_model(model) == ranks
    shapes = module_shapes(model)
    assert trainable == sum(shapes[n].lora_params(r) for n, r in ranks.items())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for name, rank in ranks.items():  # alpha 2·rank everywhere -> scale 2
        assert _scale_of(model, name) == pytest.approx(2.0)
    summary = summarize(plan, shapes, trainable, plan.base_rank)
    assert summary.per_category == {"self_attn": (3, 96), "cross_attn": (2, 96), "mlp": (3, 72)}
    assert sum(summary.rank_histogram.values()) == len(ranks)
    assert summary.flat_params == sum(s.lora_params(8) for s in shapes.values())
    # only the flags the user set are listed as replaced by the map (a library call: those differing from defaults)
    assert summary.overrides == ()
    passed = plan_adapter(TrainConfig(ds, tmp_path / "o", rank=64), "base", False, 24,
                          explicit=frozenset({"rank", "target_modules"}))
    assert passed.overrides == ("--rank 64", "--target-modules self_attn,cross_attn,mlp")
    changed = plan_adapter(TrainConfig(ds, tmp_path / "o", rank=32), "base", False, 24)
    assert changed.overrides == ("--rank 32",)


def test_ignore_fisher_map_gives_flat_ranks(ds, tmp_path):
    write_map(_map(2, {"layers.0.mlp.up_proj": 8}), ds)
    plan = plan_adapter(TrainConfig(ds, tmp_path / "o", rank=4, ignore_fisher_map=True), "base", False, 2)
    assert not plan.adaptive
    model = build_tiny_transformer(tiny_config(num_layers=2, hidden=32)).requires_grad_(False)
    attach_adapter(model, plan)
    assert _ranks_in_model(model) == dict.fromkeys(targetable_modules(2), 4)


def test_adapter_weights_train_in_fp32_on_a_bf16_model(ds, tmp_path):
    plan = plan_adapter(TrainConfig(ds, tmp_path / "o", rank=4, ignore_fisher_map=True), "base", False, 2)
    model = build_tiny_transformer(tiny_config(num_layers=2, hidden=32)).to(torch.bfloat16).requires_grad_(False)
    attach_adapter(model, plan)
    dtypes = {p.requires_grad: set() for p in model.parameters()}
    for p in model.parameters():
        dtypes[p.requires_grad].add(p.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}


@pytest.mark.parametrize("change, needle", [
    ({"model_variant": "turbo"}, "made for the turbo model"),
    ({"num_hidden_layers": 24}, "24-layer model"),
    ({"dataset_hash": "0123456789ab"}, "changed since"),
], ids=["variant", "layers", "dataset"])
def test_stale_map_warns_and_continues(ds, tmp_path, change, needle):
    fields = {"dataset_hash": dataset_hash(ds), **change}
    layers = fields.pop("num_hidden_layers", 2)
    write_map(_map(layers, {"layers.0.mlp.up_proj": 8}, **fields), ds)
    plan = plan_adapter(TrainConfig(ds, tmp_path / "o"), "base", False, 2)
    assert plan.adaptive
    assert len(plan.notices) == 1 and needle in plan.notices[0]


def test_turbo_with_map_gets_fragility_advice(ds, tmp_path):
    write_map(_map(2, {"layers.0.mlp.up_proj": 8}, model_variant="turbo", dataset_hash=dataset_hash(ds)), ds)
    plan = plan_adapter(TrainConfig(ds, tmp_path / "o"), "turbo", True, 2)
    assert len(plan.notices) == 1
    assert "5e-5" in plan.notices[0] and "--ignore-fisher-map" in plan.notices[0] and "base" in plan.notices[0]


def test_unparseable_map_names_file_and_flag(ds, tmp_path):
    (ds / "fisher_map.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(MapError, match="fisher_map.json.*--ignore-fisher-map"):
        plan_adapter(TrainConfig(ds, tmp_path / "o"), "base", False, 2)
    # ... and the flag really gets around it.
    assert not plan_adapter(TrainConfig(ds, tmp_path / "o", ignore_fisher_map=True), "base", False, 2).adaptive


def test_map_beyond_model_layers_is_an_error(ds, tmp_path):
    (ds / "fisher_map.json").write_text(json.dumps({"target_modules": ["mlp.up_proj"],
                                                    "rank_pattern": {"layers.5.mlp.up_proj": 8},
                                                    "alpha_pattern": {"layers.5.mlp.up_proj": 16}}), encoding="utf-8")
    with pytest.raises(MapError, match="only 2 layers"):
        plan_adapter(TrainConfig(ds, tmp_path / "o"), "base", False, 2)


def test_target_modules_groups_and_names():
    assert resolve_targets(("mlp",), 2) == [n for n in targetable_modules(2) if ".mlp." in n]
    assert resolve_targets(("to_q",), 2) == ["layers.0.self_attn.q_proj", "layers.0.cross_attn.q_proj",
                                             "layers.1.self_attn.q_proj", "layers.1.cross_attn.q_proj"]
    assert resolve_targets(("cross_attn.o_proj", "layers.1.mlp.up_proj"), 2) == [
        "layers.0.cross_attn.o_proj", "layers.1.cross_attn.o_proj", "layers.1.mlp.up_proj"]
    with pytest.raises(ConfigError, match="--target-modules 'qkv'"):
        resolve_targets(("qkv",), 2)
