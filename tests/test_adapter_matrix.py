"""Every adapter kind through every stage: attach, train, save, resume, export (or a clear refusal).

One case table, in the style of peft's `TEST_CASES` lists: a row per kind says what its weights are called in
the saved file, what `peft_type` its config names, and whether it converts to the ComfyUI/diffusers LoRA files.
Each stage is a test parametrised over the table, so a kind that breaks one stage shows up as one red cell.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from peft import PeftModel

from sidestep.errors import ConfigError
from sidestep.models import load_model, resolve_runtime
from sidestep.testing.tiny import build_tiny_transformer, tiny_config
from sidestep.training import saving
from sidestep.training.adapters import ADAPTER_PARAM_MARKERS, AdapterPlan, attach_adapter, flat_plan
from sidestep.training.config import AdapterKind, TrainConfig
from sidestep.training.events import CheckpointSaved, Progress
from sidestep.training.export import export_adapter
from sidestep.training.run import train
from train_support import forward, original_named, tiny_setup


@dataclass(frozen=True)
class Case:
    kind: AdapterKind
    peft_type: str
    weights: tuple[str, ...]  # parameter-name suffixes every adapted module carries in the saved file
    lora_file: bool  # exports to the ComfyUI / diffusers LoRA files (else refused with one sentence)
    refusal: str = ""


CASES = [
    Case(AdapterKind.LORA, "LORA", ("lora_A.weight", "lora_B.weight"), True),
    Case(AdapterKind.DORA, "LORA", ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"), False, "DoRA"),
    Case(AdapterKind.LOKR, "LOKR", ("lokr_w1", "lokr_w2"), False, "LOKR"),
    Case(AdapterKind.LOHA, "LOHA", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), False, "LOHA"),
]
IDS = [c.kind.value for c in CASES]
RUNTIME = resolve_runtime("cpu", "fp32", False)
TARGETS = "self-attn,mlp"
LAYERS = 2


def _plan(tmp_path, case: Case) -> AdapterPlan:
    return flat_plan(TrainConfig(tmp_path, tmp_path / "o", rank=4, alpha=8, adapter=case.kind,
                                 target_modules=TARGETS), LAYERS)


def _modules(keys) -> set[str]:
    return {k.removeprefix(saving.PEFT_PREFIX).split(".lora_")[0].split(".hada_")[0].split(".lokr_")[0]
            for k in keys}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("matrix"), num_layers=LAYERS, samples=2)


def _base(case: Case) -> dict:
    return dict(rank=4, alpha=8, adapter=case.kind, target_modules=TARGETS, lr=5e-3, warmup_steps=0, max_steps=4,
                seed=3, dropout=0.1)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Per kind: a 4-step run with a resumable checkpoint after epoch 1 (2 samples)."""
    choice, dataset = tiny
    out = {}
    for case in CASES:
        root = tmp_path_factory.mktemp(case.kind.value)
        events: list = []
        train(TrainConfig(dataset, root / "full", save_every=1, **_base(case)), choice, RUNTIME, events.append)
        out[case.kind] = (root, events)
    return out


@pytest.fixture(scope="module")
def resumed(tiny, runs):
    """Per kind: the run above resumed from its checkpoint into a second folder."""
    choice, dataset = tiny
    out = {}
    for case in CASES:
        root, events = runs[case.kind]
        checkpoint = next(e.path for e in events if isinstance(e, CheckpointSaved) and not e.final)
        again: list = []
        train(TrainConfig(dataset, root / "resumed", resume=str(checkpoint), **_base(case)), choice, RUNTIME,
              again.append)
        out[case.kind] = again
    return out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_attach_trains_only_the_adapter_on_every_target(tmp_path, case):
    plan = _plan(tmp_path, case)
    model = build_tiny_transformer(tiny_config(num_layers=LAYERS, hidden=32)).requires_grad_(False)
    trainable = attach_adapter(model, plan)
    named = dict(model.named_parameters())
    grads = {n for n, p in named.items() if p.requires_grad}
    assert trainable == sum(named[n].numel() for n in grads) > 0
    assert all(any(m in n for m in ADAPTER_PARAM_MARKERS) for n in grads)  # no base weight trains
    assert all(named[n].dtype == torch.float32 for n in grads)
    assert len(_modules(saving.adapter_tensors(model))) == len(plan.ranks) == 7 * LAYERS
    assert torch.equal(forward(model), forward(build_tiny_transformer(tiny_config(num_layers=LAYERS, hidden=32))))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_train_changes_the_output_with_finite_losses(tiny, runs, case):
    choice, _ = tiny
    root, full = runs[case.kind]
    losses = [e.loss for e in full if isinstance(e, Progress)]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    model = load_model(choice.entry, RUNTIME).transformer
    before = forward(model)
    state = saving.load_training_state(root / "full" / "final")
    attach_adapter(model, AdapterPlan.from_json(state["plan"]))
    saving.load_adapter_weights(model, saving.read_adapter_dir(root / "full" / "final").tensors)
    assert not torch.allclose(forward(model.eval()), before, atol=1e-4)  # the trained adapter is not a no-op


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_save_writes_the_ace_step_layout_that_peft_loads(tiny, runs, case):
    choice, _ = tiny
    root, _ = runs[case.kind]
    files = saving.read_adapter_dir(root / "full" / "final")
    assert files.config["peft_type"] == case.peft_type and files.config["task_type"] == "FEATURE_EXTRACTION"
    assert bool(files.config.get("use_dora")) is (case.kind is AdapterKind.DORA)
    keys = set(files.tensors)
    assert all(k.startswith(saving.PEFT_PREFIX) and ".default" not in k and "decoder." not in k for k in keys)
    modules = _modules(keys)
    assert len(modules) == 7 * LAYERS
    assert keys == {f"{saving.PEFT_PREFIX}{m}.{w}" for m in modules for w in case.weights}
    # ACE-Step's own loader: peft on the original-named decoder reproduces our adapted model.
    ours = load_model(choice.entry, RUNTIME).transformer
    state = saving.load_training_state(root / "full" / "final")
    attach_adapter(ours, AdapterPlan.from_json(state["plan"]))
    saving.load_adapter_weights(ours, files.tensors)
    decoder = original_named(load_model(choice.entry, RUNTIME).transformer)
    PeftModel.from_pretrained(decoder, str(root / "full" / "final"))
    assert torch.allclose(forward(decoder.eval()), forward(ours.eval()), atol=1e-5)  # eval: no adapter dropout


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_resume_continues_exactly(runs, resumed, case):
    root, full = runs[case.kind]
    whole = {e.step: e.loss for e in full if isinstance(e, Progress)}
    rest = {e.step: e.loss for e in resumed[case.kind] if isinstance(e, Progress)}
    assert sorted(rest) == [3, 4] and all(rest[s] == whole[s] for s in rest)
    a = saving.read_adapter_dir(root / "full" / "final").tensors
    b = saving.read_adapter_dir(root / "resumed" / "final").tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_export_converts_or_refuses_in_one_sentence(runs, tmp_path, case):
    root, _ = runs[case.kind]
    final = root / "full" / "final"
    assert export_adapter(final, tmp_path / "peft", "peft").modules == 7 * LAYERS  # every kind copies as peft
    for fmt in ("comfyui", "diffusers"):
        dest = tmp_path / f"{fmt}.safetensors"
        if case.lora_file:
            assert export_adapter(final, dest, fmt).modules == 7 * LAYERS
        else:
            with pytest.raises(ConfigError, match=rf"{case.refusal} adapter; only plain LoRA.*--format peft"):
                export_adapter(final, dest, fmt)
            assert not dest.exists()  # nothing half-written
