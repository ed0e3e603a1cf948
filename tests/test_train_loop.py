"""Training end to end on a tiny real DiT: learning, exact resume, Ctrl-C, the loss-spike guard, saving rules."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sidestep.data import DatasetSpec, collate, load_sample
from sidestep.errors import ConfigError, Interrupted, TrainingDiverged
from sidestep.models import load_model, resolve_runtime
from sidestep.objective import flow_matching_loss, noise_like
from sidestep.training import loop as loop_module
from sidestep.training import saving
from sidestep.training.adapters import AdapterPlan, attach_adapter
from sidestep.training.config import SchedulerKind, TrainConfig
from sidestep.training.events import CheckpointSaved, Progress, Started
from sidestep.training.loop import LoopState, SampleOrder, check_loss, lr_factor
from sidestep.training.run import train
from train_support import tiny_setup

RUNTIME = resolve_runtime("cpu", "fp32", False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("train"), samples=4)


def _config(dataset, out, **overrides) -> TrainConfig:
    base = dict(rank=4, lr=1e-3, warmup_steps=0, save_every=0, max_steps=8, dropout=0.1, seed=3)
    return TrainConfig(dataset, out, **{**base, **overrides})


def _losses(events) -> dict[int, float]:
    return {e.step: e.loss for e in events if isinstance(e, Progress)}


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / saving.ADAPTER_WEIGHTS))


def _eval_loss(choice, dataset, adapter_dir=None) -> float:
    """Flow-matching loss on fixed (sample, t, noise) draws: the base model, or base + a saved adapter."""
    model = load_model(choice.entry, RUNTIME).transformer
    if adapter_dir is not None:
        state = saving.load_training_state(adapter_dir)
        attach_adapter(model, AdapterPlan.from_json(state["plan"]))
        saving.load_adapter_weights(model, saving.read_adapter_dir(adapter_dir).tensors)
    spec = DatasetSpec.from_model_config(choice.entry.config)
    gen = torch.Generator().manual_seed(123)
    total = 0.0
    with torch.no_grad():
        for path in sorted(dataset.glob("*.pt")):
            batch = collate([load_sample(path, spec)])
            for t in (0.2, 0.5, 0.8):
                noise = noise_like(batch.target_latents, gen)
                total += float(flow_matching_loss(model, batch, torch.tensor([t]), noise))
    return total


@pytest.mark.slow
def test_loss_decreases_over_30_steps(tiny, tmp_path):
    choice, dataset = tiny
    events = []
    config = _config(dataset, tmp_path / "out", rank=8, lr=1e-2, scheduler="constant", max_steps=30, dropout=0.0,
                     cfg_dropout=0.0)
    outcome = train(config, choice, RUNTIME, events.append)
    assert outcome.steps == 30 and (tmp_path / "out" / "run.json").is_file()
    started = next(e for e in events if isinstance(e, Started))
    assert started.total_steps == 30 and started.steps_per_epoch == 4 and not started.adaptive
    before, after = _eval_loss(choice, dataset), _eval_loss(choice, dataset, outcome.final_dir)
    # Most of a flow-matching loss is irreducible (the noise is unknown); a few percent is real learning here.
    assert after < 0.97 * before, (before, after)


@pytest.mark.slow
def test_resume_continues_exactly(tiny, tmp_path):
    choice, dataset = tiny
    full_events, resumed_events = [], []
    train(_config(dataset, tmp_path / "a", save_every=1), choice, RUNTIME, full_events.append)
    saved = [e.path for e in full_events if isinstance(e, CheckpointSaved) and not e.final]
    # 4 samples, batch 1: one epoch = 4 steps; the last step's resumable state is a checkpoint too (final/ has none)
    assert [p.name for p in saved] == ["step-4", "step-8"]

    train(_config(dataset, tmp_path / "b", resume=str(saved[0])), choice, RUNTIME, resumed_events.append)
    assert next(e for e in resumed_events if isinstance(e, Started)).start_step == 4
    full, resumed = _losses(full_events), _losses(resumed_events)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[s] == full[s] for s in resumed)
    a, b = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ctrl_c_leaves_a_resumable_checkpoint(tiny, tmp_path):
    choice, dataset = tiny

    def interrupt_at_3(event):
        if isinstance(event, Progress) and event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted, match="step 3.*--resume latest"):
        train(_config(dataset, tmp_path / "out"), choice, RUNTIME, interrupt_at_3)
    ckpt = tmp_path / "out" / "checkpoints" / "step-3"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([saving.ADAPTER_CONFIG, saving.ADAPTER_WEIGHTS, saving.STATE_FILE])
    assert not list((tmp_path / "out").rglob("*.partial")) and not (tmp_path / "out" / "final").exists()
    assert saving.load_training_state(ckpt)["step"] == 3

    train(_config(dataset, tmp_path / "out", resume="latest"), choice, RUNTIME)
    train(_config(dataset, tmp_path / "ref"), choice, RUNTIME)
    a, b = _weights(tmp_path / "out" / "final"), _weights(tmp_path / "ref" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    choice, dataset = tiny
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = flow_matching_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(loop_module, "flow_matching_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"NaN at step 6.*step-4.*--lr"):
        train(_config(dataset, tmp_path / "out", save_every=1), choice, RUNTIME)
    good = tmp_path / "out" / "checkpoints" / "step-4"
    assert saving.load_training_state(good)["step"] == 4
    assert all(torch.isfinite(t).all() for t in _weights(good).values())
    assert not (tmp_path / "out" / "final").exists()
    assert not (tmp_path / "out" / "checkpoints" / "step-5").exists()


@pytest.mark.slow
def test_finished_adapter_is_never_silently_replaced(tiny, tmp_path):
    choice, dataset = tiny
    train(_config(dataset, tmp_path / "out", max_steps=1), choice, RUNTIME)
    with pytest.raises(ConfigError, match="final already holds a trained adapter.*--overwrite"):
        train(_config(dataset, tmp_path / "out", max_steps=1), choice, RUNTIME)
    old = _weights(tmp_path / "out" / "final")
    train(_config(dataset, tmp_path / "out", max_steps=1, overwrite=True, seed=9), choice, RUNTIME)
    kept = _weights(tmp_path / "out" / "final.bak")
    assert all(torch.equal(old[k], kept[k]) for k in old)


@pytest.mark.slow
def test_extending_a_finished_run_keeps_the_old_final(tiny, tmp_path):
    choice, dataset = tiny
    train(_config(dataset, tmp_path / "out", max_steps=2), choice, RUNTIME)
    with pytest.raises(ConfigError, match="already has 2 of 2 steps"):
        train(_config(dataset, tmp_path / "out", max_steps=2, resume="latest"), choice, RUNTIME)
    # Resuming into ANOTHER run's folder must not replace that run's adapter.
    train(_config(dataset, tmp_path / "other", max_steps=1), choice, RUNTIME)
    with pytest.raises(ConfigError, match="already holds a trained adapter"):
        train(_config(dataset, tmp_path / "other", max_steps=3, resume=str(tmp_path / "out" / "final")), choice, RUNTIME)
    outcome = train(_config(dataset, tmp_path / "out", max_steps=3, resume="latest"), choice, RUNTIME)
    assert outcome.steps == 3
    assert saving.load_training_state(tmp_path / "out" / "final.bak")["step"] == 2
    assert saving.load_training_state(tmp_path / "out" / "final")["epoch"] == pytest.approx(0.75)


def test_batch_2_times_accumulation_2_trains_like_batch_4_with_crops(tiny, tmp_path, monkeypatch):
    choice, dataset = tiny
    shapes: list[tuple[int, int]] = []

    def recording(model, batch, *args, **kwargs):
        shapes.append(tuple(batch.target_latents.shape[:2]))
        return flow_matching_loss(model, batch, *args, **kwargs)

    monkeypatch.setattr(loop_module, "flow_matching_loss", recording)
    # Crops of 10 frames (every sample is 16-32 long) leave nothing to pad, so the two layouts must agree.
    common = dict(max_latent_length=10, max_steps=None, epochs=2, scheduler="linear", warmup_steps=1, dropout=0.0)
    split, whole = [], []
    train(_config(dataset, tmp_path / "split", batch_size=2, grad_accum=2, **common), choice, RUNTIME, split.append)
    assert shapes == [(2, 10)] * 4  # 4 samples / (2 x 2) = 1 step per epoch, 2 micro-batches each
    shapes.clear()
    train(_config(dataset, tmp_path / "whole", batch_size=4, grad_accum=1, **common), choice, RUNTIME, whole.append)
    assert shapes == [(4, 10)] * 2
    a, b = _losses(split), _losses(whole)
    assert sorted(a) == sorted(b) == [1, 2]
    assert all(a[s] == pytest.approx(b[s], rel=1e-6) for s in a), (a, b)  # measured ~4e-8 (float rounding)
    wa, wb = _weights(tmp_path / "split" / "final"), _weights(tmp_path / "whole" / "final")
    assert wa.keys() == wb.keys()
    # Norm-wise: Adam can blow single near-zero-gradient entries' rounding up; the whole adapter stays equal
    # (measured ~4e-8; keeping only the last micro-batch's gradient gives ~2e-2).
    diff = sum(float((wa[k] - wb[k]).norm()) ** 2 for k in wa) ** 0.5
    assert diff < 1e-5 * sum(float(wa[k].norm()) ** 2 for k in wa) ** 0.5


def test_sample_order_is_seeded_epoch_wise_and_shardable(tiny):
    _, dataset = tiny
    files = tuple(sorted(dataset.glob("*.pt")))
    one = SampleOrder(files, DatasetSpec(encoder_dim=32), batch_size=1, seed=5)
    again = SampleOrder(files, DatasetSpec(encoder_dim=32), batch_size=1, seed=5)
    epoch0 = [one.indices(m)[0] for m in range(4)]
    assert sorted(epoch0) == [0, 1, 2, 3]
    assert [again.indices(m)[0] for m in range(8)] == [one.indices(m)[0] for m in range(8)]
    epochs = {tuple(one.indices(m)[0] for m in range(4 * e, 4 * e + 4)) for e in range(6)}
    assert len(epochs) > 1  # every epoch is reshuffled (six equal orders would be a 1-in-24**5 accident)
    shards = [SampleOrder(files, DatasetSpec(), 1, 5, rank=r, world_size=2) for r in (0, 1)]
    seen = sorted(i for s in shards for m in range(s.micro_per_epoch) for i in s.indices(m))
    assert seen == [0, 1, 2, 3]


def test_crops_are_windows_of_the_sample_drawn_per_sample(tiny):
    _, dataset = tiny
    files = tuple(sorted(dataset.glob("*.pt")))
    order = SampleOrder(files, DatasetSpec(encoder_dim=32), batch_size=2, seed=5, max_length=10)
    starts = set()
    for micro in range(order.micro_per_epoch * 3):
        batch = order.batch(micro, order.generators(micro))
        assert batch.target_latents.shape[1] == 10 and bool(batch.attention_mask.all())
        for row, index in zip(batch.target_latents, order.indices(micro)):
            full = load_sample(files[index]).target_latents
            start = next(s for s in range(full.shape[0] - 9) if torch.equal(full[s : s + 10], row))
            starts.add(start)
    assert len(starts) > 2  # random windows, not always the first frames


def test_lr_schedule_and_spike_guard_are_plain_math():
    assert lr_factor(0, 100, 10, SchedulerKind.COSINE) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, SchedulerKind.COSINE) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10, SchedulerKind.COSINE) == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, SchedulerKind.LINEAR) == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, SchedulerKind.CONSTANT) == 1.0
    cfg = TrainConfig("d", "o", warmup_steps=0, spike_factor=10.0)
    assert check_loss(float("inf"), 1.0, LoopState(step=50, loss_ema=1.0), cfg).startswith("The loss became Inf")
    assert "gradient norm" in check_loss(1.0, float("nan"), LoopState(step=50, loss_ema=1.0), cfg)
    assert "spiked" in check_loss(11.0, 1.0, LoopState(step=50, loss_ema=1.0), cfg)
    assert check_loss(11.0, 1.0, LoopState(step=5, loss_ema=1.0), cfg) is None  # too early to judge
    assert check_loss(9.0, 1.0, LoopState(step=50, loss_ema=1.0), cfg) is None
