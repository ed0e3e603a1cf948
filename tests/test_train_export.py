"""Saved adapters load at the trained strength in ACE-Step's peft loader, diffusers and (by its formula) ComfyUI."""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders import AceStepLoraLoaderMixin
from peft import PeftModel
from safetensors import safe_open

from sidestep.errors import ConfigError
from sidestep.models.convert import original_to_diffusers
from sidestep.testing.tiny import build_tiny_transformer, tiny_config
from sidestep.training import saving
from sidestep.training.adapters import AdapterPlan, attach_adapter, flat_plan
from sidestep.training.config import AdapterKind, TrainConfig
from sidestep.training.export import COMFYUI_PREFIX, export_adapter, read_lora
from train_support import forward, original_named

CFG = tiny_config(num_layers=2, hidden=32)
# Per-module ranks and alphas with alpha != 2·rank on some, so a loader that ignores alphas is caught.
ADAPTIVE = {"layers.0.self_attn.q_proj": (4, 12.0), "layers.1.self_attn.o_proj": (2, 2.0),
            "layers.0.cross_attn.k_proj": (6, 3.0), "layers.1.mlp.down_proj": (8, 16.0)}


def _base() -> torch.nn.Module:
    return build_tiny_transformer(CFG, seed=0).requires_grad_(False)


def _trained(plan: AdapterPlan) -> torch.nn.Module:
    """A model with the plan's adapter and random (non-zero) adapter weights, as after training."""
    model = _base()
    attach_adapter(model, plan)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen) + (1.0 if param.dim() == 1 else 0.0))
    return model


def _adaptive_plan() -> AdapterPlan:
    return AdapterPlan(AdapterKind.LORA, {n: r for n, (r, _) in ADAPTIVE.items()},
                       {n: a for n, (_, a) in ADAPTIVE.items()}, 0.0, 4, 8.0, adaptive=True)


def _flat_plan(tmp_path, kind=AdapterKind.LORA) -> AdapterPlan:
    return flat_plan(TrainConfig(tmp_path, tmp_path / "o", rank=4, alpha=3, adapter=kind), 2)


@pytest.fixture
def saved(tmp_path):
    plan = _adaptive_plan()
    model = _trained(plan)
    folder = saving.save_adapter_dir(tmp_path / "final", plan, model)
    return model, folder


@pytest.mark.parametrize("kind", list(AdapterKind))
def test_ace_step_loader_reproduces_outputs(tmp_path, kind):
    plan = _flat_plan(tmp_path, kind)
    model = _trained(plan)
    folder = saving.save_adapter_dir(tmp_path / "final", plan, model)
    decoder = original_named(_base())  # modules named as in ACE-Step: q_proj, o_proj, ...
    peft_model = PeftModel.from_pretrained(decoder, str(folder))
    assert type(peft_model).__name__ == "PeftModelForFeatureExtraction"
    assert torch.allclose(forward(decoder), forward(model), atol=1e-5)
    assert not torch.allclose(forward(_base()), forward(model), atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("kind", list(AdapterKind))
def test_saved_weights_reload_for_resume(tmp_path, kind):
    plan = _flat_plan(tmp_path, kind)
    model = _trained(plan)
    folder = saving.save_adapter_dir(tmp_path / "ckpt", plan, model)
    fresh = _base()
    attach_adapter(fresh, plan)
    saving.load_adapter_weights(fresh, saving.read_adapter_dir(folder).tensors)
    assert torch.equal(forward(fresh), forward(model))


def test_ace_step_file_layout(saved):
    model, folder = saved
    config = saving.read_adapter_dir(folder).config
    assert config["peft_type"] == "LORA" and config["task_type"] == "FEATURE_EXTRACTION"
    assert sorted(config["target_modules"]) == sorted(ADAPTIVE)
    assert config["rank_pattern"] == {n: r for n, (r, _) in ADAPTIVE.items()}
    assert config["alpha_pattern"] == {n: a for n, (_, a) in ADAPTIVE.items()}
    with safe_open(str(folder / saving.ADAPTER_WEIGHTS), framework="pt") as handle:
        keys = set(handle.keys())
    expected = {f"base_model.model.{n}.lora_{ab}.weight" for n in ADAPTIVE for ab in "AB"}
    assert keys == expected  # no `.default.`, no `decoder.`, no alpha tensors


def test_adaptive_adapter_reloads_in_ace_step_loader(saved):
    model, folder = saved
    decoder = original_named(_base())
    PeftModel.from_pretrained(decoder, str(folder))
    assert torch.allclose(forward(decoder), forward(model), atol=1e-5)


def test_diffusers_pipeline_loader_plays_at_trained_strength(saved, tmp_path):
    model, folder = saved
    result = export_adapter(folder, tmp_path / "diffusers", "diffusers")
    assert result.path.name == "pytorch_lora_weights.safetensors" and result.modules == len(ADAPTIVE)

    class TinyPipeline(AceStepLoraLoaderMixin):  # the real mixin AceStepPipeline uses, around a tiny transformer
        hf_device_map = None

        def __init__(self, transformer):
            self.transformer = transformer
            self.components = {"transformer": transformer}

    pipe = TinyPipeline(_base())
    pipe.load_lora_weights(str(tmp_path / "diffusers"))
    assert torch.allclose(forward(pipe.transformer), forward(model), atol=1e-5)

    # The model-level loader reads the header only on its safetensors branch (use_safetensors=True).
    direct = _base()
    direct.load_lora_adapter(str(result.path), prefix="transformer", use_safetensors=True)
    assert torch.allclose(forward(direct), forward(model), atol=1e-5)


def test_comfyui_export_carries_alpha_and_matches_peft_delta(saved, tmp_path):
    model, folder = saved
    path = export_adapter(folder, tmp_path / "lora_comfy.safetensors", "comfyui").path
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    modules = dict(model.named_modules())
    for name, (rank, alpha) in ADAPTIVE.items():
        prefix = COMFYUI_PREFIX + name
        assert tensors[prefix + ".alpha"].item() == alpha
        # ComfyUI: W += (alpha / rank) * up @ down, with rank read from the down weight.
        down, up = tensors[prefix + ".lora_A.weight"], tensors[prefix + ".lora_B.weight"]
        delta = (alpha / down.shape[0]) * up @ down
        peft_delta = modules[original_to_diffusers(name)].get_delta_weight("default")
        assert down.shape[0] == rank and torch.allclose(delta, peft_delta, atol=1e-6)


@pytest.mark.parametrize("first, second", [("comfyui", "peft"), ("diffusers", "peft"), ("comfyui", "diffusers"),
                                           ("diffusers", "comfyui")])
def test_formats_round_trip(saved, tmp_path, first, second):
    _, folder = saved
    original = read_lora(folder)
    step1 = export_adapter(folder, tmp_path / f"one_{first}" / ("x.safetensors" if first != "peft" else ""), first).path
    step2 = export_adapter(step1, tmp_path / f"two_{second}", second).path
    again = read_lora(step2)
    assert again.ranks == original.ranks and again.alphas == original.alphas
    assert all(torch.equal(again.down[n], original.down[n]) and torch.equal(again.up[n], original.up[n])
               for n in original.down)


def test_peft_round_trip_reloads_identically(saved, tmp_path):
    model, folder = saved
    comfy = export_adapter(folder, tmp_path / "c.safetensors", "comfyui").path
    back = export_adapter(comfy, tmp_path / "back", "peft").path
    decoder = original_named(_base())
    PeftModel.from_pretrained(decoder, str(back))
    assert torch.allclose(forward(decoder), forward(model), atol=1e-5)


def test_export_refuses_to_overwrite_and_non_lora(tmp_path, saved):
    _, folder = saved
    export_adapter(folder, tmp_path / "x.safetensors", "comfyui")
    with pytest.raises(ConfigError, match="x.safetensors already exists.*--overwrite"):
        export_adapter(folder, tmp_path / "x.safetensors", "comfyui")
    export_adapter(folder, tmp_path / "x.safetensors", "comfyui", overwrite=True)

    plan = _flat_plan(tmp_path, AdapterKind.DORA)
    dora = saving.save_adapter_dir(tmp_path / "dora", plan, _trained(plan))
    with pytest.raises(ConfigError, match="DoRA adapter.*--format peft"):
        export_adapter(dora, tmp_path / "d.safetensors", "comfyui")
    assert export_adapter(dora, tmp_path / "dora_copy", "peft").modules == 22
