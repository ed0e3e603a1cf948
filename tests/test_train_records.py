"""What a training run leaves behind on a tiny real DiT: metrics.csv, validation and best/, step checkpoints
with --keep-last, run.json (and rerunning it with --config), presets, and defaults that do not bite."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sidestep.analysis.fisher_map import ADVISED_LR, FisherMap, write_map
from sidestep.data import dataset_hash
from sidestep.errors import ConfigError, Interrupted
from sidestep.models import resolve_runtime
from sidestep.training import saving
from sidestep.training.adapters import MapSummary
from sidestep.training.config import TrainConfig, resolve_auto
from sidestep.training.events import Notice, Progress
from sidestep.training.records import METRICS_FILE, read_metrics, split_validation
from sidestep.training.run import train
from cli_support import run_cli
from train_support import tiny_setup

RUNTIME = resolve_runtime("cpu", "fp32", False)
CLI = ["--device", "cpu", "--precision", "fp32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("records"), samples=4)


def _config(dataset, out, **overrides) -> TrainConfig:
    base = dict(rank=4, lr=1e-3, warmup_steps=0, save_every=0, max_steps=6, dropout=0.1, seed=3)
    return TrainConfig(dataset, out, **{**base, **overrides})


def _steps(out: Path) -> list[int]:
    return [row.step for row in read_metrics(out / METRICS_FILE)]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / saving.ADAPTER_WEIGHTS))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_json(out: Path) -> dict:
    return json.loads((out / "run.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_metrics_rows_are_the_steps_done_after_ctrl_c_and_after_resume(tiny, tmp_path):
    choice, dataset = tiny
    out = tmp_path / "out"

    def ctrl_c_at_3(event):
        if isinstance(event, Progress) and event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train(_config(dataset, out, save_every_steps=2), choice, RUNTIME, ctrl_c_at_3)
    assert _steps(out) == [1, 2, 3]
    header = (out / METRICS_FILE).read_text().splitlines()[0]
    assert header == "step,epoch,loss,loss_ema,lr,grad_norm,seconds,val_loss"
    record = _run_json(out)
    assert record["status"] == "stopped" and record["result"]["steps_done"] == 3

    train(_config(dataset, out, save_every_steps=2, resume="latest"), choice, RUNTIME)
    first = read_metrics(out / METRICS_FILE)
    assert [r.step for r in first] == [1, 2, 3, 4, 5, 6]
    assert all(b.seconds >= a.seconds for a, b in zip(first, first[1:]))  # the clock continues across the resume
    assert _run_json(out)["status"] == "finished" and _run_json(out)["result"]["steps_done"] == 6

    # resuming from an earlier checkpoint drops the rows past it and retrains them exactly
    train(_config(dataset, out, save_every_steps=2, resume=str(out / "checkpoints" / "step-2")), choice, RUNTIME)
    again = read_metrics(out / METRICS_FILE)
    assert [r.step for r in again] == [1, 2, 3, 4, 5, 6]
    assert [r.loss for r in again] == [r.loss for r in first]


def test_val_split_keeps_best_at_the_lowest_logged_validation_loss(tiny, tmp_path):
    choice, dataset = tiny
    out = tmp_path / "out"
    events = []
    train(_config(dataset, out, lr=1e-2, val_split=0.25, val_every=1, save_every_steps=1, dropout=0.0), choice,
          RUNTIME, events.append)
    rows = read_metrics(out / METRICS_FILE)
    assert [r.step for r in rows] == [1, 2, 3, 4, 5, 6] and all(r.val_loss is not None for r in rows)
    assert len({r.val_loss for r in rows}) > 1  # the weights moved, so the held-out loss did
    best = min(rows, key=lambda r: r.val_loss)
    saved = json.loads((out / "best" / "best.json").read_text())
    assert saved["step"] == best.step and saved["val_loss"] == best.val_loss
    assert _same(_weights(out / "best"), _weights(out / "checkpoints" / f"step-{best.step}"))
    record = _run_json(out)
    assert record["result"]["best_val_step"] == best.step and len(record["data"]["validation_files"]) == 1
    assert record["data"]["train_files"] == 3
    # the held-out file never trains: 3 samples per epoch
    assert rows[2].epoch == 1.0


def test_validation_split_is_seeded_by_file():
    files = tuple(Path(f"/d/{i:02d}.pt") for i in range(10))
    train_a, val_a = split_validation(files, 0.2, seed=1)
    assert split_validation(files, 0.2, seed=1) == (train_a, val_a) and len(val_a) == 2
    assert set(train_a) | set(val_a) == set(files) and not set(train_a) & set(val_a)
    assert any(split_validation(files, 0.2, seed=s)[1] != val_a for s in range(2, 6))
    with pytest.raises(ConfigError, match="leaves nothing to train on"):
        split_validation(files[:1], 0.5, seed=0)
    with pytest.raises(ConfigError, match="pass one of them"):
        TrainConfig("/d", "/o", val_split=0.1, val_dir="/v")


def test_keep_last_2_leaves_the_two_newest_complete_checkpoints(tiny, tmp_path):
    choice, dataset = tiny
    out = tmp_path / "out"
    train(_config(dataset, out, save_every_steps=1, keep_last=2), choice, RUNTIME)
    kept = sorted((out / "checkpoints").iterdir(), key=lambda p: p.name)
    assert [p.name for p in kept] == ["step-5", "step-6"]
    for folder in kept:
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            [saving.ADAPTER_CONFIG, saving.ADAPTER_WEIGHTS, saving.STATE_FILE])
        assert "optimizer" in saving.load_training_state(folder)
    # final/ is the adapter without the optimizer; its resumable twin is checkpoints/step-6
    final_state = saving.load_training_state(out / "final")
    assert "optimizer" not in final_state and final_state["step"] == 6
    assert _same(_weights(out / "final"), _weights(out / "checkpoints" / "step-6"))
    assert saving.resolve_resume(out, "latest") == out / "checkpoints" / "step-6"
    assert saving.resolve_resume(out, str(out / "final")) == out / "checkpoints" / "step-6"


def test_an_eight_step_run_with_default_warmup_reaches_the_set_lr(tiny, tmp_path):
    choice, dataset = tiny
    out = tmp_path / "out"
    train(TrainConfig(dataset, out, rank=4, lr=2e-3, save_every=0, max_steps=8), choice, RUNTIME)
    rows = read_metrics(out / METRICS_FILE)
    assert len(rows) == 8 and max(r.lr for r in rows) == pytest.approx(2e-3)
    config = _run_json(out)["config"]
    assert config["warmup_steps"] == 0 and config["lr"] == 2e-3


def test_auto_values_resolve_once_and_warmup_is_clamped():
    base = TrainConfig("/d", "/o")
    resolved = resolve_auto(base, 1000, 10, adaptive=False, is_turbo=False, advised_lr=ADVISED_LR)
    assert (resolved.config.warmup_steps, resolved.config.lr, resolved.config.timestep_mode) == (50, 1e-4, "continuous")
    assert resolve_auto(base, 10_000, 10, False, True, ADVISED_LR).config.warmup_steps == 100
    assert resolve_auto(base, 10, 10, False, True, ADVISED_LR).config.timestep_mode == "discrete"
    mapped = resolve_auto(base, 10, 10, adaptive=True, is_turbo=False, advised_lr=ADVISED_LR)
    assert mapped.config.lr == float(ADVISED_LR) and "advised" in mapped.notices[0]
    long = resolve_auto(TrainConfig("/d", "/o", warmup_steps=500), 120, 10, False, False, ADVISED_LR)
    assert long.config.warmup_steps == 120 and "longer than this run (120 steps)" in long.notices[0]
    again = resolve_auto(resolved.config, 1000, 10, False, False, ADVISED_LR)
    assert again.config == resolved.config and not again.notices  # run.json's config resolves to itself
    validating = resolve_auto(TrainConfig("/d", "/o", val_split=0.1), 100, 7, False, False, ADVISED_LR)
    assert validating.config.val_every == 7  # once per epoch


def test_with_a_map_and_no_lr_the_advised_rate_is_used_and_only_passed_flags_are_listed(tiny, tmp_path):
    choice, dataset = tiny
    ranks = {"layers.0.self_attn.q_proj": 8, "layers.1.mlp.up_proj": 4}
    fmap = FisherMap(rank_pattern=ranks, alpha_pattern={n: 2 * r for n, r in ranks.items()}, model_variant="base",
                     num_hidden_layers=2, dataset_hash=dataset_hash(dataset), base_rank=8)
    write_map(fmap, dataset)
    events = []
    try:
        train(TrainConfig(dataset, tmp_path / "out", max_steps=1, save_every=0), choice, RUNTIME, events.append,
              explicit=frozenset({"max_steps"}))
    finally:
        (dataset / "fisher_map.json").unlink()
    summary = next(e for e in events if isinstance(e, MapSummary))
    assert summary.overrides == ()
    assert any("advised" in e.message for e in events if isinstance(e, Notice))
    assert _run_json(tmp_path / "out")["config"]["lr"] == float(ADVISED_LR)


def test_a_flat_rank_above_a_module_width_is_clamped(tiny, tmp_path):
    choice, dataset = tiny  # hidden 32: every projection is at most 32 wide on one side
    events = []
    train(_config(dataset, tmp_path / "out", rank=48, max_steps=1), choice, RUNTIME, events.append)
    assert any("clamped to min(in, out)" in e.message for e in events if isinstance(e, Notice))
    config = saving.read_adapter_dir(tmp_path / "out" / "final").config
    assert config["rank_pattern"] and max(config["rank_pattern"].values()) <= 32


def test_train_config_run_json_reproduces_the_adapter_bit_for_bit(monkeypatch, capsys, tiny, tmp_path):
    choice, dataset = tiny
    first, second = tmp_path / "first", tmp_path / "second"
    code, _, err = run_cli(monkeypatch, capsys, "train", "--dataset-dir", str(dataset), "--output-dir", str(first),
                           "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", *CLI,
                           "--preset", "quick-test", "--rank", "4", "--max-steps", "3", "--val-split", "0.25",
                           "--dropout", "0.1", "--report-to", "tensorboard")
    assert code == 0, err
    assert "From preset quick-test:" in err and "rank=4" not in err.split("From preset quick-test:")[1].split("\n")[0]
    assert "From the command line:" in err
    assert "step 3/3" in err  # plain progress lines when stderr is not a terminal
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert err.count("TensorBoard is not installed") == 1
    else:
        assert (first / "tensorboard").is_dir()
    record = _run_json(first)
    config = record["config"]
    assert config["rank"] == 4 and config["max_latent_length"] == 250  # the flag wins, the preset fills the rest
    assert Path(config["dataset_dir"]).is_absolute() and Path(config["output_dir"]).is_absolute()
    assert None not in (config["lr"], config["warmup_steps"], config["timestep_mode"], config["alpha"],
                        config["val_every"])
    assert record["runtime"]["device"] == "cpu" and record["runtime"]["dtype"] == "torch.float32"
    assert record["status"] == "finished" and record["result"]["steps_done"] == 3
    assert record["result"]["duration_s"] > 0 and record["result"]["peak_memory"]["host_rss_bytes"] > 0

    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", str(first / "run.json"), "--output-dir",
                           str(second))
    assert code == 0, err
    assert "From run.json:" in err and f"output_dir={second}" in err
    assert _same(_weights(first / "final"), _weights(second / "final"))
    assert _same(_weights(first / "best"), _weights(second / "best"))


def test_a_toml_recipe_and_its_mistakes(monkeypatch, capsys, tiny, tmp_path):
    choice, dataset = tiny
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'dataset-dir = "{dataset}"\ncheckpoint_dir = "{choice.checkpoint_dir}"\nmodel = "base"\n'
                      f'device = "cpu"\nprecision = "fp32"\nrank = 4\nmax_steps = 1\nweight_decay = 0.0\n',
                      encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", str(recipe), "--output-dir", str(tmp_path / "o"))
    assert code == 0, err
    config = _run_json(tmp_path / "o")["config"]
    assert config["rank"] == 4 and config["weight_decay"] == 0.0 and config["max_steps"] == 1
    recipe.write_text("rnak = 4\n", encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", str(recipe))
    assert code == 1 and "unknown option 'rnak'" in err and len(err.strip().splitlines()) == 1
    recipe.write_text("rank = [4\n", encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, "train", "--config", str(recipe))
    assert code == 1 and "not valid TOML" in err and "Traceback" not in err


def test_metrics_csv_survives_a_torn_last_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text("step,epoch,loss,loss_ema,lr,grad_norm,seconds,val_loss\n1,0.25,1.0,1.0,0.001,0.5,1.0,\n2,0.5,1.",
                    encoding="utf-8")
    assert [r.step for r in read_metrics(path)] == [1]
    with open(path, newline="") as fh:
        assert next(csv.reader(fh))[0] == "step"


def test_every_train_option_has_help_and_one_of_the_agreed_panels():
    from dataclasses import fields

    from sidestep.training.config import PANELS

    for f in fields(TrainConfig):
        assert f.metadata.get("help") and f.metadata.get("panel") in PANELS, f.name


def test_tensorboard_reporter_logs_each_row_and_a_missing_extra_is_one_notice(tmp_path, monkeypatch):
    from sidestep.training.config import ReportTo
    from sidestep.training.records import MetricsRow
    from sidestep.training.report import TensorBoardReporter, open_reporter

    class Writer:
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step))

    reporter = TensorBoardReporter(Writer())
    reporter.log(MetricsRow(3, 0.75, 1.0, 1.1, 1e-4, 0.5, 2.0, 0.9))
    assert ("val/loss", 3) in reporter.writer.scalars and ("train/grad_norm", 3) in reporter.writer.scalars
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # import wandb -> ImportError
    assert open_reporter(ReportTo.NONE, tmp_path, {}) == (None, None)
    none, why = open_reporter(ReportTo.WANDB, tmp_path, {})
    assert none is None and "Weights & Biases is not installed" in why and "metrics.csv" in why


def test_analyze_reads_a_recipe_too(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "analyze.json"
    recipe.write_text(json.dumps({"dataset-dir": str(tmp_path / "nowhere"), "runs": 1}), encoding="utf-8")
    code, _, err = run_cli(monkeypatch, capsys, "analyze", "--config", str(recipe))
    assert code == 1 and str(tmp_path / "nowhere") in err  # the file's folder was used
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    recipe.write_text(json.dumps({"epochs": 3}), encoding="utf-8")  # a train option: not one of analyze's
    code, _, err = run_cli(monkeypatch, capsys, "analyze", "--config", str(recipe))
    assert code == 1 and "unknown option 'epochs'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_dataset_read_by_loader_workers_trains_like_one_kept_in_ram(tiny, tmp_path, monkeypatch):
    from sidestep.training import run as run_module

    choice, dataset = tiny
    common = dict(max_latent_length=10, batch_size=2, grad_accum=2, epochs=2, max_steps=None, dropout=0.1)
    train(_config(dataset, tmp_path / "ram", **common), choice, RUNTIME)
    monkeypatch.setattr(run_module, "_CACHE_BYTES", 0)  # as if the dataset were larger than the RAM cache
    seen = []
    real_get = run_module.train_loop.__globals__["MicroBatchFeed"].get

    def spying(self, micro):
        seen.append(self._it is not None)
        return real_get(self, micro)

    monkeypatch.setattr(run_module.train_loop.__globals__["MicroBatchFeed"], "get", spying)

    def ctrl_c_at_1(event):
        if isinstance(event, Progress) and event.step == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):  # the workers are stopped, nothing hangs, the checkpoint resumes
        train(_config(dataset, tmp_path / "workers", **common), choice, RUNTIME, ctrl_c_at_1)
    train(_config(dataset, tmp_path / "workers", resume="latest", **common), choice, RUNTIME)
    assert len(seen) == 4 and all(seen)  # every micro-batch came through the DataLoader
    # crops, CFG dropout, timesteps and noise follow each sample's stream across the worker boundary: bit for bit
    assert _same(_weights(tmp_path / "ram" / "final"), _weights(tmp_path / "workers" / "final"))
