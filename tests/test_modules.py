"""Target-module naming: the 11 projections per layer, parsed from ORIGINAL ACE-Step names."""

from __future__ import annotations

import json

import pytest

from sidestep.analysis.modules import (
    PROJECTIONS,
    Category,
    ModuleShape,
    category_of,
    layer_of,
    module_sort_key,
    strip_decoder_prefix,
    suffix_of,
    targetable_modules,
)


def test_projections_are_the_eleven_per_layer_targets_in_reference_order():
    assert PROJECTIONS == (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    )  # fmt: skip


def test_targetable_modules_are_layer_major_and_unique():
    names = targetable_modules(24)
    assert len(names) == 264 == len(set(names))
    assert names[0] == "layers.0.self_attn.q_proj"
    assert names[10] == "layers.0.mlp.down_proj"
    assert names[11] == "layers.1.self_attn.q_proj"
    assert names[-1] == "layers.23.mlp.down_proj"
    assert targetable_modules(0) == []


@pytest.mark.parametrize(
    "name, layer, suffix, category",
    [
        ("layers.0.self_attn.q_proj", 0, "self_attn.q_proj", Category.SELF_ATTN),
        ("layers.1.cross_attn.o_proj", 1, "cross_attn.o_proj", Category.CROSS_ATTN),
        ("layers.11.cross_attn.k_proj", 11, "cross_attn.k_proj", Category.CROSS_ATTN),
        ("layers.23.mlp.down_proj", 23, "mlp.down_proj", Category.MLP),
    ],
)
def test_name_parts(name, layer, suffix, category):
    assert layer_of(name) == layer
    assert suffix_of(name) == suffix
    assert category_of(name) is category


@pytest.mark.parametrize(
    "bad",
    [
        "decoder.layers.0.mlp.up_proj",  # callers strip the prefix first
        "layers.x.mlp.up_proj",
        "layers.0.mlp.foo_proj",
        "layers.0.attn.q_proj",
        "layers.0.self_attn.to_q",  # diffusers name
        "layers.0.self_attn.q_proj.weight",
        "",
    ],
)
def test_bad_names_raise_value_error(bad):
    with pytest.raises(ValueError, match="not an ACE-Step target module name"):
        suffix_of(bad)


def test_strip_decoder_prefix():
    assert strip_decoder_prefix("decoder.layers.3.mlp.up_proj") == "layers.3.mlp.up_proj"
    assert strip_decoder_prefix("layers.3.mlp.up_proj") == "layers.3.mlp.up_proj"


def test_sort_key_is_numeric_by_layer_then_projection():
    names = ["layers.10.self_attn.q_proj", "layers.2.mlp.down_proj", "layers.2.self_attn.q_proj"]
    assert sorted(names, key=module_sort_key) == [
        "layers.2.self_attn.q_proj",
        "layers.2.mlp.down_proj",
        "layers.10.self_attn.q_proj",
    ]
    assert sorted(reversed(targetable_modules(12)), key=module_sort_key) == targetable_modules(12)


def test_lora_params_is_rank_times_in_plus_out():
    shape = ModuleShape("layers.0.mlp.down_proj", in_features=6144, out_features=2048)
    assert shape.lora_params(64) == 64 * 8192 == 524288
    assert shape.lora_params(0) == 0


def test_category_is_a_str_enum():
    assert Category("mlp") is Category.MLP
    assert json.dumps(Category.CROSS_ATTN) == '"cross_attn"'
