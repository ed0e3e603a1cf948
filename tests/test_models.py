import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sidestep.errors import CheckpointError, ConfigError
from sidestep.models import discover_models, find_model, load_model, resolve_runtime
from sidestep.models.convert import (
    diffusers_key_to_original,
    diffusers_to_original,
    original_key_to_diffusers,
    original_to_diffusers,
)
from sidestep.models.discovery import Layout
from sidestep.models.variants import folder_for, variant_from_folder
from sidestep.testing.demo import demo_config
from sidestep.testing.tiny import (
    build_tiny_audio_tokenizers,
    build_tiny_condition_encoder,
    build_tiny_transformer,
    tiny_config,
    write_original_checkpoint,
)

CPU = resolve_runtime("cpu", "fp32", False)


def _inputs(cfg, frames=21, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, frames, 64, generator=gen),
        timestep=torch.tensor([0.4]),
        timestep_r=torch.tensor([0.4]),
        encoder_hidden_states=torch.randn(1, 10, cfg["hidden_size"], generator=gen),
        context_latents=torch.randn(1, frames, 128, generator=gen),
    )


def test_both_layouts_load_and_give_identical_outputs(checkpoint_root, tiny_cfg):
    original = load_model(find_model(checkpoint_root, "base"), CPU)
    diffusers = load_model(find_model(checkpoint_root, "acestep-v15-base-diffusers"), CPU)
    assert original.entry.layout is Layout.ORIGINAL and diffusers.entry.layout is Layout.DIFFUSERS
    with torch.no_grad():
        a = original.transformer(**_inputs(tiny_cfg)).sample
        b = diffusers.transformer(**_inputs(tiny_cfg)).sample
    assert a.shape == (1, 21, 64)
    # same weights, bit for bit; outputs equal up to float summation order of two model instances
    sa, sb = original.transformer.state_dict(), diffusers.transformer.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(original.null_condition_emb, diffusers.null_condition_emb)
    # and the loaded weights are exactly the ones written (not a fresh random init)
    reference = build_tiny_transformer(tiny_cfg, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(reference(**_inputs(tiny_cfg)).sample, a, rtol=1e-5, atol=1e-5)


def test_loaded_model_is_frozen_and_in_requested_dtype(checkpoint_root):
    loaded = load_model(find_model(checkpoint_root, "base"), resolve_runtime("cpu", "bf16", True))
    params = list(loaded.transformer.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in params)
    assert loaded.transformer.gradient_checkpointing
    assert loaded.variant.name == "base" and loaded.num_layers == 4


@pytest.mark.parametrize(
    "original, diffusers",
    [
        ("layers.3.self_attn.q_proj", "layers.3.self_attn.to_q"),
        ("layers.11.cross_attn.o_proj", "layers.11.cross_attn.to_out.0"),
        ("layers.0.self_attn.k_norm.weight", "layers.0.self_attn.norm_k.weight"),
        ("layers.2.mlp.down_proj", "layers.2.mlp.down_proj"),
        ("proj_in.1.weight", "proj_in_conv.weight"),
        ("proj_out.1.bias", "proj_out_conv.bias"),
        ("time_embed_r.time_proj.weight", "time_embed_r.time_proj.weight"),
    ],
)
def test_name_map_both_ways(original, diffusers):
    assert original_to_diffusers(original) == diffusers
    assert diffusers_to_original(diffusers) == original


def test_key_map_round_trips_every_real_key_exactly_once(tiny_cfg):
    keys = list(build_tiny_transformer(tiny_cfg).state_dict())
    originals = [diffusers_key_to_original(k) for k in keys]
    assert len(set(originals)) == len(keys)
    assert all(k.startswith("decoder.") for k in originals)
    assert [original_key_to_diffusers(k) for k in originals] == keys
    assert original_key_to_diffusers("encoder.text_projector.weight") is None
    # no diffusers-only fragment survives in the original names
    assert not any(".to_q." in k or "proj_in_conv" in k or ".to_out.0." in k for k in originals)


def _copy_model(checkpoint_root, tmp_path):
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoint_root / "acestep-v15-base", root / "acestep-v15-base")
    return root, root / "acestep-v15-base" / "model.safetensors"


def test_missing_key_is_named(checkpoint_root, tmp_path):
    root, weights = _copy_model(checkpoint_root, tmp_path)
    tensors = load_file(str(weights))
    del tensors["decoder.layers.1.cross_attn.v_proj.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.cross_attn\.to_v\.weight"):
        load_model(find_model(root, "base"), CPU)


def test_unexpected_key_is_named(checkpoint_root, tmp_path):
    root, weights = _copy_model(checkpoint_root, tmp_path)
    tensors = load_file(str(weights))
    tensors["decoder.layers.0.self_attn.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected.*decoder\.layers\.0\.self_attn\.extra_proj\.weight"):
        load_model(find_model(root, "base"), CPU)


def test_corrupt_weights_file_is_a_checkpoint_error(checkpoint_root, tmp_path):
    root, weights = _copy_model(checkpoint_root, tmp_path)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(find_model(root, "base"), CPU)


def test_diffusers_layout_weights_are_checked_like_the_original(checkpoint_root, tmp_path):
    """from_pretrained reads the diffusers layout; bad values and missing keys are still one CheckpointError."""
    root = tmp_path / "ckpt"
    shutil.copytree(checkpoint_root / "acestep-v15-base-diffusers", root / "acestep-v15-base-diffusers")
    weights = root / "acestep-v15-base-diffusers" / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight holds NaN or Inf"):
        load_model(find_model(root, "acestep-v15-base-diffusers"), CPU)
    del tensors["layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"1 missing \(e\.g\. layers\.1\.mlp\.up_proj\.weight\)"):
        load_model(find_model(root, "acestep-v15-base-diffusers"), CPU)


def test_sharded_original_checkpoint_loads(checkpoint_root, tmp_path, tiny_cfg):
    root, weights = _copy_model(checkpoint_root, tmp_path)
    tensors = load_file(str(weights))
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, str(weights.parent / name))
    weights.unlink()
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (weights.parent / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = load_model(find_model(root, "base"), CPU)
    whole = load_model(find_model(checkpoint_root, "base"), CPU)
    with torch.no_grad():
        torch.testing.assert_close(sharded.transformer(**_inputs(tiny_cfg)).sample,
                                   whole.transformer(**_inputs(tiny_cfg)).sample, rtol=1e-5, atol=1e-5)


def test_discovery_labels_official_and_fine_tunes(tmp_path):
    cfg = tiny_config(num_layers=2, hidden=32)
    write_original_checkpoint(tmp_path, cfg, folder="acestep-v15-turbo")
    write_original_checkpoint(tmp_path, dict(cfg, base_variant="sft"), folder="my-finetune")
    write_original_checkpoint(tmp_path, cfg, folder="mystery")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderOobleck"}))
    (tmp_path / "Qwen3-Embedding-0.6B").mkdir()
    (tmp_path / "Qwen3-Embedding-0.6B" / "config.json").write_text(json.dumps({"hidden_size": 1024, "num_hidden_layers": 28}))
    entries = {e.name: e for e in discover_models(tmp_path)}
    assert set(entries) == {"acestep-v15-turbo", "my-finetune", "mystery"}
    assert entries["acestep-v15-turbo"].official and entries["acestep-v15-turbo"].variant == "turbo"
    assert not entries["my-finetune"].official and entries["my-finetune"].variant == "sft"
    with pytest.raises(ConfigError, match="--base-variant"):
        find_model(tmp_path, "mystery")
    assert find_model(tmp_path, "mystery", base_variant="base").variant == "base"
    with pytest.raises(CheckpointError, match="acestep-v15-base"):
        find_model(tmp_path, "base")


def test_variant_defaults_and_config_override(tmp_path):
    cfg = tiny_config(num_layers=2, hidden=32, timestep_mu=0.3, is_turbo=True)
    write_original_checkpoint(tmp_path, cfg, folder="acestep-v15-turbo")
    loaded = load_model(find_model(tmp_path, "turbo"), CPU)
    assert loaded.variant.is_turbo and loaded.variant.timestep_mu == 0.3 and loaded.variant.timestep_sigma == 1.0
    assert folder_for("xl-sft") == "acestep-v15-xl-sft" and variant_from_folder("acestep-v15-turbo-shift3") == "turbo"
    # a fine-tune that only says `is_turbo` in its config samples like turbo (8 steps, shift 3), and the reverse
    from sidestep.models.variants import resolve_variant

    tuned = resolve_variant(None, {"is_turbo": True})
    assert (tuned.is_turbo, tuned.inference_steps, tuned.shift) == (True, 8, 3.0)
    plain = resolve_variant("turbo", {"is_turbo": False})
    assert (plain.is_turbo, plain.inference_steps, plain.shift) == (False, 50, 1.0)


def test_runtime_auto_and_flags():
    auto = resolve_runtime()
    assert auto.device.type == "cpu" and auto.dtype == torch.float32 and not auto.gradient_checkpointing
    assert "auto" in auto.reason
    assert resolve_runtime("cpu", "fp16", True).dtype == torch.float16
    with pytest.raises(ConfigError, match="--precision"):
        resolve_runtime("cpu", "fp8")
    with pytest.raises(ConfigError, match="CUDA"):
        resolve_runtime("cuda")


def test_demo_checkpoint_holds_the_weights_acestep_expects(tmp_path):
    """Every key and shape ACE-Step 1.5's own model class asks for at the demo's sizes (tests/golden, recorded from
    its `AutoModel.from_pretrained(..., trust_remote_code=True)`), and nothing else."""
    golden = json.loads((Path(__file__).parent / "golden" / "acestep_v15_demo_keys.json").read_text(encoding="utf-8"))
    expected = {}
    for pattern, shape in golden["keys"].items():
        stack = pattern.split(".layers.{i}.")[0] if ".layers.{i}." in pattern else None
        for i in range(golden["layers"][stack] if stack else 1):
            expected[pattern.replace("{i}", str(i))] = shape
    folder = write_original_checkpoint(tmp_path, demo_config())
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        written = {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    assert sorted(set(written) - set(expected)) == [] and sorted(set(expected) - set(written)) == []
    assert {k: v for k, v in written.items() if expected[k] != v} == {}


@pytest.mark.parametrize("turbo", [False, True], ids=["base", "turbo"])
def test_tiny_original_checkpoint_is_faithful(tmp_path, turbo):
    """The demo's checkpoint carries what a real one does: the auto_map and every weight group, strictly loadable."""
    cfg = tiny_config(num_layers=2, hidden=32, is_turbo=turbo, model_version="turbo" if turbo else "base")
    folder = write_original_checkpoint(tmp_path, cfg, folder="acestep-v15-turbo" if turbo else "acestep-v15-base")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    modeling = "modeling_acestep_v15_turbo" if turbo else "modeling_acestep_v15_base"
    assert config["auto_map"] == {"AutoConfig": "configuration_acestep_v15.AceStepConfig",
                                  "AutoModel": f"{modeling}.AceStepConditionGenerationModel"}
    tensors = load_file(str(folder / "model.safetensors"))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        groups.setdefault(prefix, {})[rest] = value
    assert set(groups) == {"decoder", "encoder", "tokenizer", "detokenizer", "null_condition_emb"}
    # Each group loads strictly into its diffusers class after the converter's renames: every key used once.
    modules = {"decoder": build_tiny_transformer(cfg, seed=5), "encoder": build_tiny_condition_encoder(cfg, seed=5),
               **{p.rstrip("."): m for p, m in build_tiny_audio_tokenizers(cfg, seed=5).items()}}
    for name, module in modules.items():
        state = {original_to_diffusers(k): v for k, v in groups[name].items()}
        if name == "encoder":  # diffusers keeps these two inside the condition encoder
            state["null_condition_emb"] = tensors["null_condition_emb"]
            state["silence_latent"] = module.silence_latent
        module.load_state_dict(state, strict=True)
    assert load_model(find_model(tmp_path, "turbo" if turbo else "base"), CPU).variant.is_turbo is turbo

