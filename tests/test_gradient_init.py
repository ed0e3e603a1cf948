"""`--init gradient` (docs/algorithm.md §7): the init file analysis writes, and LoRA A started from it in training."""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sidestep.analysis.config import AnalysisConfig
from sidestep.analysis.engine import FisherEngine
from sidestep.analysis.fisher_map import read_map
from sidestep.analysis.init_file import INIT_FILENAME, InitFileError, init_bases, read_init
from sidestep.analysis.modules import targetable_modules
from sidestep.analysis.run import analyze_dataset
from sidestep.cli.app import main
from sidestep.errors import ConfigError
from sidestep.models import load_model, original_to_diffusers, resolve_runtime
from sidestep.training import saving
from sidestep.training.adapters import AdapterPlan, attach_adapter, flat_plan, module_shapes
from sidestep.training.config import AdapterKind, InitMode, TrainConfig
from sidestep.training.events import Notice, Progress
from sidestep.training.export import export_adapter, read_lora
from sidestep.training.grad_init import InitPlan, default_a_norm, resolve_init
from sidestep.training.run import train
from train_support import forward, tiny_setup

RUNTIME = resolve_runtime("cpu", "fp32", False)
SMALL = dict(base_rank=4, rank_min=2, rank_max=8, batches_per_run=3, runs=1, weight_rank=False, probe_steps=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer tiny DiT, its dataset analysed once (map + init file), and the loaded model."""
    choice, dataset = tiny_setup(tmp_path_factory.mktemp("gradinit"), samples=4)
    loaded = load_model(choice.entry, RUNTIME)
    outcome = analyze_dataset(AnalysisConfig(dataset_dir=dataset, **SMALL), choice, RUNTIME,
                              loader=lambda _e, _r: loaded)
    return choice, dataset, loaded, outcome


def _copy_dataset(src: Path, dest: Path, with_map: bool = True, with_init: bool = True) -> Path:
    dest.mkdir(parents=True)
    for path in src.iterdir():
        keep = path.suffix == ".pt" or (with_map and path.name == "fisher_map.json") or \
            (with_init and path.name == INIT_FILENAME)
        if keep:
            (dest / path.name).write_bytes(path.read_bytes())
    return dest


def _train_config(dataset: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(rank=4, lr=1e-3, warmup_steps=0, save_every=0, max_steps=2, dropout=0.0, seed=3, cfg_dropout=0.0,
                init="gradient")
    return TrainConfig(dataset, out, **{**base, **overrides})


# ---- the init file ---------------------------------------------------------------------------------


def test_init_file_keys_shapes_dtype_orthonormal_and_hash(tiny):
    _, dataset, loaded, outcome = tiny
    path = dataset / INIT_FILENAME
    assert outcome.init_path == path and path.is_file()
    ref = read_map(dataset / "fisher_map.json").init
    assert ref is not None and ref.file == INIT_FILENAME and ref.seed == 42 and ref.k == 8 + 16
    assert ref.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    shapes = module_shapes(loaded.transformer)
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["sidestep"])["naming"] == "original"
        keys = set(handle.keys())
    assert keys == set(targetable_modules(loaded.num_layers))  # every targetable module, not just the map's
    bases = read_init(path, ref.sha256, keys)
    for name, basis in bases.items():
        shape = shapes[name]
        assert basis.dtype == torch.float16
        assert tuple(basis.shape) == (min(ref.k, shape.in_features, shape.out_features), shape.in_features)
        gram = basis.double() @ basis.double().t()
        assert torch.allclose(gram, torch.eye(basis.shape[0], dtype=torch.float64), atol=3e-3), name


@pytest.mark.slow
def test_no_init_skips_the_file_and_same_seed_gives_same_file(tiny, tmp_path):
    choice, dataset, loaded, outcome = tiny
    data = _copy_dataset(dataset, tmp_path / "d", with_map=False, with_init=False)
    config = AnalysisConfig(dataset_dir=data, **SMALL)
    again = analyze_dataset(config, choice, RUNTIME, loader=lambda _e, _r: loaded)
    assert again.map.init == outcome.map.init  # same seed, same data -> byte-identical file
    again = analyze_dataset(config, choice, RUNTIME, loader=lambda _e, _r: loaded)
    assert (data / (INIT_FILENAME + ".bak")).read_bytes() == (data / INIT_FILENAME).read_bytes()
    skipped = tmp_path / "e"
    _copy_dataset(dataset, skipped, with_map=False, with_init=False)
    none = analyze_dataset(replace(config, dataset_dir=skipped, write_init=False), choice, RUNTIME,
                           loader=lambda _e, _r: loaded)
    assert none.init_path is None and none.map.init is None and not (skipped / INIT_FILENAME).exists()
    assert "init" not in json.loads((skipped / "fisher_map.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_writing_the_init_adds_no_forward_pass(tiny, tmp_path):
    choice, dataset, loaded, _ = tiny
    counts = []
    for write in (False, True):
        data = _copy_dataset(dataset, tmp_path / str(write), with_map=False, with_init=False)
        calls = []
        handle = loaded.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            # the hook signal alone: the probe's passes (counted in test_analysis_engine) are not the init's
            config = AnalysisConfig(dataset_dir=data, write_init=write, **{**SMALL, "rank_signal": "data"})
            out = analyze_dataset(config, choice, RUNTIME, loader=lambda _e, _r: loaded)
        finally:
            handle.remove()
        assert (out.init_path is not None) == write
        counts.append((len(calls), out.result.total_batches))
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1]


class _OneLinear(torch.nn.Module):
    """A module tree with one target Linear at the original name `layers.0.mlp.up_proj`."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        mlp = torch.nn.Module()
        mlp.up_proj = torch.nn.Linear(in_features, out_features, bias=False)
        block = torch.nn.Module()
        block.mlp = mlp
        self.layers = torch.nn.ModuleList([block])
        self.requires_grad_(False)


def test_stored_basis_spans_a_known_rank3_mean_gradient():
    """Gradients G_i = A_i Vᵀ ± N_i (the noise cancels in the sum): the top 3 rows must span V."""
    n_in, n_out, rank = 48, 40, 3
    gen = torch.Generator().manual_seed(0)
    v, _ = torch.linalg.qr(torch.randn(n_in, rank, generator=gen))
    model = _OneLinear(n_in, n_out)
    weight = model.layers[0].mlp.up_proj.weight
    with FisherEngine(model, ["layers.0.mlp.up_proj"], sketch_k=8, seed=1) as engine:
        for _ in range(3):
            noise = torch.randn(n_out, n_in, generator=gen)
            signal = torch.randn(n_out, rank, generator=gen) @ v.t()
            for grad in (signal + noise, signal - noise):  # d/dW sum(W * grad) = grad
                (weight * grad).sum().backward()
        sketch = engine.sketch[0].clone()
    basis = init_bases({"layers.0.mlp.up_proj": sketch})["layers.0.mlp.up_proj"]
    assert basis.shape == (8, n_in)
    top = basis[:rank].double()
    # sin of the largest principal angle = norm of the part of the rows outside span(V) (rows re-orthonormalised).
    q, _ = torch.linalg.qr(top.t())
    residual = q - v.double() @ (v.double().t() @ q)
    assert torch.linalg.matrix_norm(residual, ord=2) < 1e-3


def test_read_init_errors_name_the_file(tiny, tmp_path):
    _, dataset, _, outcome = tiny
    path = tmp_path / INIT_FILENAME
    with pytest.raises(InitFileError, match="no such file"):
        read_init(path, None)
    path.write_bytes((dataset / INIT_FILENAME).read_bytes())
    with pytest.raises(InitFileError, match="does not match the hash"):
        read_init(path, "0" * 64)
    with pytest.raises(InitFileError, match="has no basis for layers.9.mlp.up_proj"):
        read_init(path, outcome.map.init.sha256, ["layers.9.mlp.up_proj"])
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(InitFileError, match="not a valid safetensors"):
        read_init(path, None)


# ---- training with it ------------------------------------------------------------------------------


def _gradient_model(tiny, kind=AdapterKind.LORA, rank=4):
    choice, dataset, loaded, _ = tiny
    config = _train_config(dataset, dataset.parent / "unused", rank=rank, adapter=kind, ignore_fisher_map=True)
    plan = flat_plan(config, loaded.num_layers)
    init = resolve_init(config, plan.ranks, module_shapes(loaded.transformer))
    assert init.mode is InitMode.GRADIENT and init.notice and init.level == "info"
    model = load_model(choice.entry, RUNTIME).transformer
    attach_adapter(model, plan, init)
    return model, plan, init


@pytest.mark.parametrize("kind", [AdapterKind.LORA, AdapterKind.DORA])
def test_step0_output_is_the_base_output_and_a_is_the_scaled_basis(tiny, kind):
    _, _, loaded, _ = tiny
    model, plan, init = _gradient_model(tiny, kind)
    base, adapted = forward(loaded.transformer), forward(model)
    if kind is AdapterKind.LORA:
        assert torch.equal(base, adapted)
    else:  # DoRA renormalises by ||W + BA|| = ||W||; equal up to rounding
        assert torch.allclose(base, adapted, rtol=0, atol=1e-6)
    modules = dict(model.named_modules())
    for name, rank in plan.ranks.items():
        layer = modules[original_to_diffusers(name)]
        a = layer.lora_A["default"].weight.detach().double()
        assert not layer.lora_B["default"].weight.any()
        assert math.isclose(float(a.norm()), default_a_norm(rank), rel_tol=1e-6)
        rows = init.bases[name][:rank].double()
        # same span as the stored rows (fp16 storage), in the same order
        assert torch.allclose(a / a.norm(dim=1, keepdim=True), rows / rows.norm(dim=1, keepdim=True), atol=2e-3)


def test_scale_matches_peft_default_init_norm(tiny):
    choice, dataset, loaded, _ = tiny
    plan = flat_plan(TrainConfig(dataset, dataset.parent / "o", rank=8), loaded.num_layers)
    ratios = []
    for seed in range(3):
        model = load_model(choice.entry, RUNTIME).transformer
        torch.manual_seed(seed)
        attach_adapter(model, plan)  # peft's kaiming_uniform(a=√5)
        modules = dict(model.named_modules())
        for name in plan.ranks:
            a = modules[original_to_diffusers(name)].lora_A["default"].weight
            ratios.append(float(a.detach().norm()) / default_a_norm(8))
    mean = sum(ratios) / len(ratios)
    assert abs(mean - 1) < 0.02, mean  # E||A||_F ≈ √(r/3); the spread across modules is ~10% per draw


def test_first_step_update_lies_in_the_stored_subspace_and_exports(tiny, tmp_path):
    _, dataset, _, outcome = tiny
    events = []
    out = train(_train_config(dataset, tmp_path / "out", max_steps=1), tiny[0], RUNTIME, events.append)
    assert any(isinstance(e, Notice) and e.level == "info" and "Gradient-aligned init" in e.message for e in events)
    record = json.loads(out.run_json.read_text(encoding="utf-8"))
    assert record["init"]["mode"] == "gradient" and record["init"]["sha256"] == outcome.map.init.sha256
    tensors = saving.read_adapter_dir(out.final_dir).tensors
    bases = read_init(dataset / INIT_FILENAME, None)
    plan = AdapterPlan.from_json(record["adapter"])
    assert plan.adaptive and plan.ranks == outcome.map.rank_pattern  # the map's ranks, no doubling
    checked = 0
    for name, rank in plan.ranks.items():
        a, b = _pair(tensors, name)
        delta = b.double() @ a.double()
        if delta.norm() == 0:
            continue
        q, _ = torch.linalg.qr(bases[name][:rank].double().t())  # in × r
        outside = delta - (delta @ q) @ q.t()
        assert outside.norm() <= 1e-5 * delta.norm(), name
        checked += 1
    assert checked > 0
    comfy = export_adapter(out.final_dir, tmp_path / "x.safetensors", "comfyui")
    assert read_lora(comfy.path).ranks == plan.ranks


def _pair(tensors: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = next(v for k, v in tensors.items() if name in k and "lora_A" in k)
    b = next(v for k, v in tensors.items() if name in k and "lora_B" in k)
    return a, b


@pytest.mark.parametrize("damage, needle", [
    ("hash", "does not match the hash"),
    ("missing", "no such file"),
    ("no-ref", "records no init bases"),
])
def test_stale_or_missing_init_falls_back_with_one_warning(tiny, tmp_path, damage, needle):
    _, dataset, _, _ = tiny
    data = _copy_dataset(dataset, tmp_path / "d")
    if damage == "hash":
        (data / INIT_FILENAME).write_bytes((data / INIT_FILENAME).read_bytes() + b" ")
    elif damage == "missing":
        (data / INIT_FILENAME).unlink()
    else:
        text = json.loads((data / "fisher_map.json").read_text(encoding="utf-8"))
        text.pop("init")
        (data / "fisher_map.json").write_text(json.dumps(text), encoding="utf-8")
    events = []
    out = train(_train_config(data, tmp_path / "out", max_steps=1), tiny[0], RUNTIME, events.append)
    warnings = [e.message for e in events if isinstance(e, Notice) and e.level == "warning"]
    assert len(warnings) == 1 and needle in warnings[0] and "default init" in warnings[0]
    assert "\n" not in warnings[0]
    assert json.loads(out.run_json.read_text(encoding="utf-8"))["init"]["mode"] == "default"


def test_too_few_directions_or_another_model_falls_back(tiny):
    _, dataset, loaded, _ = tiny
    config = _train_config(dataset, dataset.parent / "o", rank=64, ignore_fisher_map=True)
    plan = flat_plan(config, loaded.num_layers)
    init = resolve_init(config, plan.ranks, module_shapes(loaded.transformer))
    assert init.mode is InitMode.DEFAULT and "larger --rank-max" in init.notice
    config = _train_config(dataset, dataset.parent / "o", ignore_fisher_map=True)
    plan = flat_plan(config, loaded.num_layers)
    shapes = {n: replace(s, in_features=s.in_features + 1) for n, s in module_shapes(loaded.transformer).items()}
    init = resolve_init(config, plan.ranks, shapes)
    assert init.mode is InitMode.DEFAULT and "another model" in init.notice


def test_flat_adapter_uses_an_init_file_without_a_map(tiny, tmp_path):
    _, dataset, loaded, _ = tiny
    data = _copy_dataset(dataset, tmp_path / "d", with_map=False)
    config = _train_config(data, tmp_path / "o")
    plan = flat_plan(config, loaded.num_layers)
    init = resolve_init(config, plan.ranks, module_shapes(loaded.transformer))
    assert init.mode is InitMode.GRADIENT and init.sha256 is None and set(init.bases) == set(plan.ranks)


def test_gradient_without_map_or_init_is_an_error(tiny, tmp_path, monkeypatch, capsys):
    choice, dataset, _, _ = tiny
    data = _copy_dataset(dataset, tmp_path / "d", with_map=False, with_init=False)
    monkeypatch.setattr(sys, "argv", ["sidestep", "train", "--dataset-dir", str(data), "--output-dir",
                                      str(tmp_path / "out"), "--checkpoint-dir", str(choice.checkpoint_dir),
                                      "--model", "base", "--device", "cpu", "--precision", "fp32",
                                      "--init", "gradient"])
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert "sidestep analyze --dataset-dir" in err and "--init default" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_lokr_and_loha_refuse_gradient_init(tmp_path, kind):
    with pytest.raises(ConfigError, match=f"does not apply to --adapter {kind}"):
        TrainConfig(tmp_path, tmp_path / "o", adapter=kind, init="gradient")
    plan = AdapterPlan(AdapterKind(kind), {"layers.0.mlp.up_proj": 4}, {"layers.0.mlp.up_proj": 8.0}, 0.0, 4, 8.0)
    with pytest.raises(ConfigError, match="does not apply"):
        attach_adapter(torch.nn.Module(), plan, InitPlan(InitMode.GRADIENT, bases={}))


@pytest.mark.slow
def test_gradient_vs_default_training_loss(tiny, tmp_path):
    """Same data, seed and lr; report both loss curves. Only robust properties are asserted."""
    choice, dataset, _, _ = tiny
    curves = {}
    for init in ("default", "gradient"):
        events = []
        train(_train_config(dataset, tmp_path / init, init=init, max_steps=12, lr=5e-3, scheduler="constant",
                            ignore_fisher_map=True), choice, RUNTIME, events.append)
        curves[init] = [e.loss for e in events if isinstance(e, Progress)]
    print("loss default :", " ".join(f"{x:.4f}" for x in curves["default"]))
    print("loss gradient:", " ".join(f"{x:.4f}" for x in curves["gradient"]))
    assert all(len(c) == 12 and all(math.isfinite(x) for x in c) for c in curves.values())
    # step 0's loss sees the base model in both runs (B = 0), so it is the same number
    assert math.isclose(curves["default"][0], curves["gradient"][0], rel_tol=1e-6)


# ---- wizard ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("present", [True, False])
def test_wizard_offers_gradient_init_when_the_file_is_there(checkpoint_root, dataset_dir, tmp_path, monkeypatch,
                                                            present):
    from sidestep import settings
    from sidestep.wizard import train_flow as tf
    from sidestep.wizard.asker import ScriptedAsker
    from sidestep.wizard.common import Session

    settings.save_settings(settings.Settings(checkpoint_dir=Path(checkpoint_root), first_run_done=True))
    runs = []
    monkeypatch.setattr(tf, "_run", lambda asker, config, answers: runs.append(config))
    if present:
        (dataset_dir / INIT_FILENAME).write_bytes(b"placeholder")  # only its presence decides the question
    init = ["Gradient-aligned"] if present else []
    asker = ScriptedAsker(["", "basic", "", str(dataset_dir), str(tmp_path / "out"), "", "", "2", "", *init, "y", "n", "n"])
    tf.train_flow(asker, Session())
    [config] = runs
    assert config.init is (InitMode.GRADIENT if present else InitMode.DEFAULT)
    assert any(q.message.startswith("Adapter init") for q in asker.asked) is present
