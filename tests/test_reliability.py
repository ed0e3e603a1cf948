"""Hostile input and faults through the real entry point: one sentence, non-zero exit, no traceback, nothing lost.

Each bad-input case builds a real broken file (a sample, a map, a checkpoint, a flag) next to a tiny real model,
runs `main()`, and checks the exit code, that stderr is one line without "Traceback", and that every file that
existed before is byte-identical afterwards.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from sidestep.analysis.init_file import INIT_FILENAME, write_init
from sidestep.cli.app import main
from sidestep.cli.failures import describe
from sidestep.data import scan_dataset
from sidestep.data.dataset import sample_files
from sidestep.models import resolve_runtime
from sidestep.models.loading import build_transformer
from sidestep.training import saving
from sidestep.training.adapters import flat_plan, module_shapes
from sidestep.training.config import InitMode, TrainConfig
from sidestep.training.grad_init import resolve_init
from sidestep.training.run import train
from cli_support import run_cli as _main
from train_support import tiny_setup

FAST = ["--device", "cpu", "--precision", "fp32", "--rank", "4", "--warmup-steps", "0", "--save-every", "0"]
REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line(code: int, err: str) -> None:
    assert code != 0, err
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def _ends_in_one_error(code: int, err: str) -> None:
    """A failure after training started: its progress lines, then exactly one error sentence."""
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("Error: ") and sum(line.startswith("Error:") for line in lines) == 1, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("reliability"), samples=2)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A finished 1-step run (final/ with training_state.pt) to copy from."""
    choice, dataset = tiny
    out = tmp_path_factory.mktemp("trained") / "out"
    train(TrainConfig(dataset, out, rank=4, warmup_steps=0, save_every=0, max_steps=1), choice,
          resolve_runtime("cpu", "fp32", False))
    return out


# ---- bad samples ----------------------------------------------------------------------------------


def _first_sample(dataset: Path) -> dict:
    return torch.load(sorted(dataset.glob("*.pt"))[0], weights_only=True)


def _rewrite(dataset: Path, **changes) -> None:
    raw = _first_sample(dataset)
    raw.update(changes)
    torch.save(raw, sorted(dataset.glob("*.pt"))[0])


def _nan_latents(d):
    raw = _first_sample(d)
    _rewrite(d, target_latents=raw["target_latents"].index_fill(0, torch.tensor([1]), float("nan")))


def _inf_mask(d):
    raw = _first_sample(d)
    mask = raw["attention_mask"].float()
    mask[0] = float("inf")
    _rewrite(d, attention_mask=mask)


def _half_mask(d):
    _rewrite(d, attention_mask=torch.full_like(_first_sample(d)["attention_mask"], 0.5, dtype=torch.float32))


def _all_masks_zero(d):
    for path in d.glob("*.pt"):
        raw = torch.load(path, weights_only=True)
        raw["attention_mask"] = torch.zeros_like(raw["attention_mask"])
        torch.save(raw, path)


def _absurd_magnitude(d):
    _rewrite(d, target_latents=_first_sample(d)["target_latents"] * 1e7)


def _empty_condition(d):
    raw = _first_sample(d)
    _rewrite(d, encoder_hidden_states=raw["encoder_hidden_states"][:0], encoder_attention_mask=raw["encoder_attention_mask"][:0])


def _non_utf8_name(d):
    shutil.copy(sorted(d.glob("*.pt"))[0], os.fsdecode(bytes(d) + b"/bad\xff.pt"))


def _bad_twin_metadata(d):
    raw = _first_sample(d)
    tensors = {k: v.contiguous() for k, v in raw.items() if isinstance(v, torch.Tensor)}
    save_file(tensors, str(d / "twin.safetensors"), metadata={"metadata": "{not json"})


SAMPLE_CASES = {
    "nan-latents": (_nan_latents, "'target_latents' contains NaN or Inf"),
    "inf-mask": (_inf_mask, "'attention_mask' contains NaN or Inf"),
    "mask-not-0-1": (_half_mask, "'attention_mask' holds values other than 0 and 1"),
    "all-masks-zero": (_all_masks_zero, "has no usable samples"),
    "absurd-magnitude": (_absurd_magnitude, "far beyond what preprocessing produces"),
    "empty-condition": (_empty_condition, "the condition is empty"),
    "non-utf8-name": (_non_utf8_name, "is not valid UTF-8"),
    "twin-metadata-not-json": (_bad_twin_metadata, "'metadata' header is not valid JSON"),
}


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=list(SAMPLE_CASES))
def test_bad_samples_are_one_sentence(monkeypatch, capsys, tiny, tmp_path, case):
    choice, template = tiny
    dataset = tmp_path / "dataset"
    shutil.copytree(template, dataset)
    make, needle = SAMPLE_CASES[case]
    make(dataset)
    before = _snapshot(tmp_path)
    code, out, err = _main(monkeypatch, capsys, "train", "--dataset-dir", str(dataset), "--output-dir",
                           str(tmp_path / "out"), "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", *FAST)
    _one_line(code, err)
    assert needle in err
    assert _snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_samples_with_nothing_to_learn_are_skipped_and_dot_files_ignored(tiny, tmp_path):
    _, template = tiny
    dataset = tmp_path / "dataset"
    shutil.copytree(template, dataset)
    first = sorted(dataset.glob("*.pt"))[0]
    raw = torch.load(first, weights_only=True)
    raw["attention_mask"] = torch.zeros_like(raw["attention_mask"])
    torch.save(raw, first)
    (dataset / "._x.pt").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork
    (dataset / ".y.123.partial").write_bytes(b"half")
    scan = scan_dataset(dataset)
    assert [p.name for p in scan.files] == [sorted(template.glob("*.pt"))[1].name]
    assert len(scan.problems) == 1 and "all zero" in scan.problems[0]


def test_analysis_outputs_named_freely_are_never_read_as_samples(tiny, tmp_path):
    _, template = tiny
    dataset = tmp_path / "dataset"
    shutil.copytree(template, dataset)
    names = {p.name for p in sample_files(dataset)}
    # `analyze --output mymap.json` writes mymap_init.safetensors beside it
    write_init(dataset / "mymap_init.safetensors", {"layers.0.self_attn.q_proj": torch.eye(4)}, k=4, seed=0)
    (dataset / "mymap.json").write_text("{}")
    assert {p.name for p in sample_files(dataset)} == names


# ---- bad maps ------------------------------------------------------------------------------------


def _map(ranks: dict, alphas: dict | None = None, **extra) -> str:
    return json.dumps({"version": 3, "target_modules": ["self_attn.q_proj"], "rank_pattern": ranks,
                       "alpha_pattern": alphas or {k: 8 for k in ranks}, **extra})


Q0 = "layers.0.self_attn.q_proj"
MAP_CASES = {
    "rank-above-module-width": (_map({Q0: 64}), "rank at most 32"),
    "alpha-infinite": (_map({Q0: 4}, {Q0: 1}).replace('"alpha_pattern": {"layers.0.self_attn.q_proj": 1}',
                                                       '"alpha_pattern": {"layers.0.self_attn.q_proj": Infinity}'),
                       "not a positive number"),
    "rank-huge-integer": (_map({Q0: 4}).replace('": 4}', '": ' + "9" * 5000 + "}"), "fisher_map.json"),
    "module-beyond-layers": (_map({"layers.7.self_attn.q_proj": 4}), "has only 2 layers"),
    "nested-too-deep": ('{"a":' * 100000 + "1" + "}" * 100000, "nested too deeply"),
    "nested-deep-extra": (_map({Q0: 4}, note=json.loads("[" * 40 + "]" * 40)), "nested more than"),
    "init-file-escapes": (_map({Q0: 4}, init={"file": "../../secret.safetensors", "sha256": "0" * 64, "k": 4,
                                              "seed": 0}), "'init.file'"),
}


@pytest.mark.parametrize("case", MAP_CASES, ids=list(MAP_CASES))
def test_bad_maps_are_one_sentence(monkeypatch, capsys, tiny, tmp_path, case):
    choice, template = tiny
    dataset = tmp_path / "dataset"
    shutil.copytree(template, dataset)
    text, needle = MAP_CASES[case]
    (dataset / "fisher_map.json").write_text(text, encoding="utf-8")
    before = _snapshot(tmp_path)
    code, _, err = _main(monkeypatch, capsys, "train", "--dataset-dir", str(dataset), "--output-dir",
                         str(tmp_path / "out"), "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", *FAST)
    _one_line(code, err)
    assert needle in err and "--ignore-fisher-map" in err
    assert _snapshot(tmp_path) == before


# ---- bad checkpoints -----------------------------------------------------------------------------


def _edit_config(model: Path, **changes) -> None:
    path = model / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _nan_weight(model: Path) -> None:
    weights = load_file(str(model / "model.safetensors"))
    key = next(k for k in sorted(weights) if k.startswith("decoder.") and weights[k].is_floating_point())
    weights[key][..., 0] = float("nan")
    save_file(weights, str(model / "model.safetensors"))


CHECKPOINT_CASES = {
    "width-disagrees": (lambda m: _edit_config(m, intermediate_size=48), "config.json describes"),
    "layers-disagree": (lambda m: _edit_config(m, num_hidden_layers=3, layer_types=["full_attention"] * 3),
                        "do not match the ACE-Step DiT"),
    "negative-heads": (lambda m: _edit_config(m, num_attention_heads=-4), "'num_attention_heads' is -4"),
    "non-integer-width": (lambda m: _edit_config(m, hidden_size="32"), "not a whole number"),
    "heads-not-multiple": (lambda m: _edit_config(m, num_key_value_heads=3), "not a multiple"),
    "nan-weights": (_nan_weight, "holds NaN or Inf values"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=list(CHECKPOINT_CASES))
def test_bad_checkpoints_are_one_sentence(monkeypatch, capsys, tiny, tmp_path, case):
    choice, dataset = tiny
    root = tmp_path / "checkpoints"
    shutil.copytree(choice.checkpoint_dir, root)
    make, needle = CHECKPOINT_CASES[case]
    make(root / "acestep-v15-base")
    before = _snapshot(tmp_path)
    code, _, err = _main(monkeypatch, capsys, "train", "--dataset-dir", str(dataset), "--output-dir",
                         str(tmp_path / "out"), "--checkpoint-dir", str(root), "--model", "base", *FAST)
    _one_line(code, err)
    assert needle in err
    assert _snapshot(tmp_path) == before and not (tmp_path / "out" / "final").exists()


# ---- output folders, flags, resume ---------------------------------------------------------------


@pytest.mark.parametrize("where, needle", [("file", "is a file, not a folder"),
                                           ("under-file", "no folder can be made under it")])
def test_output_dir_checked_before_the_model_loads(monkeypatch, capsys, tiny, tmp_path, where, needle):
    choice, dataset = tiny
    (tmp_path / "blocker").write_text("mine")
    out = tmp_path / "blocker" if where == "file" else tmp_path / "blocker" / "out"
    code, _, err = _main(monkeypatch, capsys, "train", "--dataset-dir", str(dataset), "--output-dir", str(out),
                         "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", *FAST)
    _one_line(code, err)
    assert needle in err and (tmp_path / "blocker").read_text() == "mine"


@pytest.mark.parametrize("extra, needle", [
    (["--max-duration", "nan"], "--max-duration nan is not a number"),
    (["--max-duration", "inf"], "--max-duration inf is not a number"),
    ("output-file", "is a file, not a folder"),
], ids=["nan", "inf", "output-file"])
def test_preprocess_flags_checked_before_the_model_loads(monkeypatch, capsys, tiny, tmp_path, extra, needle):
    choice, _ = tiny
    (tmp_path / "audio").mkdir()
    out = tmp_path / "pt"
    if extra == "output-file":
        out.write_text("mine")
        extra = []
    code, _, err = _main(monkeypatch, capsys, "preprocess", "--audio-dir", str(tmp_path / "audio"), "--output",
                         str(out), "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", *extra)
    _one_line(code, err)
    assert needle in err


def test_analyze_refuses_an_output_that_would_be_read_as_a_sample(monkeypatch, capsys, tiny, tmp_path):
    choice, dataset = tiny
    code, _, err = _main(monkeypatch, capsys, "analyze", "--dataset-dir", str(dataset), "--output",
                         str(dataset / "map.pt"), "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base",
                         "--yes", "--device", "cpu")
    _one_line(code, err)
    assert "would be read as one" in err and not (dataset / "map.pt").exists()


def test_resume_refuses_non_finite_weights(monkeypatch, capsys, tiny, trained, tmp_path):
    choice, dataset = tiny
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    latest = out / "checkpoints" / "step-1"  # what --resume latest picks (final/ holds no optimizer state)
    weights = load_file(str(latest / saving.ADAPTER_WEIGHTS))
    key = sorted(weights)[0]
    weights[key] = torch.full_like(weights[key], float("nan"))
    save_file(weights, str(latest / saving.ADAPTER_WEIGHTS), metadata={"format": "pt"})
    before = _snapshot(tmp_path)
    code, _, err = _main(monkeypatch, capsys, "train", "--dataset-dir", str(dataset), "--output-dir", str(out),
                         "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", *FAST,
                         "--resume", "latest", "--max-steps", "2")
    _one_line(code, err)
    assert "holds NaN or Inf values, so this checkpoint cannot be resumed" in err
    assert _snapshot(tmp_path) == before


# ---- a second train into the same folder ---------------------------------------------------------


def test_a_concurrent_train_refuses_and_a_stale_lock_is_reused(monkeypatch, capsys, tiny, tmp_path):
    choice, dataset = tiny
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import filelock, sys, time\n"
                               "lock = filelock.FileLock(sys.argv[1]); lock.acquire(); print('held', flush=True); "
                               "time.sleep(120)", str(out / saving.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = ("train", "--dataset-dir", str(dataset), "--output-dir", str(out), "--checkpoint-dir",
                str(choice.checkpoint_dir), "--model", "base", *FAST, "--max-steps", "1")
        code, _, err = _main(monkeypatch, capsys, *args)
        _one_line(code, err)
        assert "is in use by another `sidestep train`" in err and not (out / "final").exists()
    finally:
        holder.kill()
        holder.wait()
    assert (out / saving.LOCK_FILE).exists()  # left by the killed process: stale
    code, _, err = _main(monkeypatch, capsys, *args)
    assert code == 0, err
    assert (out / "final" / saving.ADAPTER_WEIGHTS).is_file()


# ---- the disk fills up during the final save -----------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)  # a mapped file still open: detach lazily


def _fill(folder: Path, leave: int) -> None:
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(folder / "filler", "wb") as fh:
        try:
            fh.write(b"\0" * max(0, free - leave))
            fh.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


def test_disk_full_during_the_final_save_loses_nothing(monkeypatch, capsys, tiny, trained, small_disk):
    choice, dataset = tiny
    out = small_disk / "out"
    shutil.copytree(trained, out)
    _fill(small_disk, leave=2048)
    before = _snapshot(out)
    code, _, err = _main(monkeypatch, capsys, "train", "--dataset-dir", str(dataset), "--output-dir", str(out),
                         "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", *FAST,
                         "--resume", "latest", "--max-steps", "2")
    _ends_in_one_error(code, err)
    # the last step's resumable checkpoint is written first: the full disk stops it, before final/ is touched
    assert "the disk is full" in err and "training stopped at step 2" in err
    assert f"the last checkpoint {out / 'checkpoints' / 'step-1'} is kept" in err
    after = _snapshot(out)
    # metrics.csv gained the row of the step that was done; nothing else changed, no partial folder is left
    assert after.pop("metrics.csv").startswith(before.pop("metrics.csv")) and after == before
    assert not [p for p in out.rglob(".*") if p.name != saving.LOCK_FILE]


# ---- Ctrl-C between optimizer.step() and the step counter -----------------------------------------


def test_ctrl_c_right_after_the_optimizer_step_never_applies_it_twice(tiny, tmp_path):
    choice, dataset = tiny
    runtime = resolve_runtime("cpu", "fp32", False)
    config = dict(rank=4, lr=1e-3, warmup_steps=0, save_every=0, dropout=0.1, seed=3)
    straight = train(TrainConfig(dataset, tmp_path / "straight", max_steps=4, **config), choice, runtime)

    steps = {"n": 0}

    def ctrl_c_after_third_step(optimizer, args, kwargs):
        steps["n"] += 1
        if steps["n"] == 3:  # the weights have moved; the counter has not yet
            signal.raise_signal(signal.SIGINT)

    handle = register_optimizer_step_post_hook(ctrl_c_after_third_step)
    try:
        with pytest.raises(Exception) as stopped:
            train(TrainConfig(dataset, tmp_path / "cut", max_steps=4, **config), choice, runtime)
    finally:
        handle.remove()
    assert "Interrupted at step 3" in str(stopped.value)
    assert saving.load_training_state(tmp_path / "cut" / "checkpoints" / "step-3")["step"] == 3
    resumed = train(TrainConfig(dataset, tmp_path / "cut", max_steps=4, resume="latest", **config), choice, runtime)
    assert resumed.steps == 4
    a = load_file(str(straight.final_dir / saving.ADAPTER_WEIGHTS))
    b = load_file(str(resumed.final_dir / saving.ADAPTER_WEIGHTS))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- SIGTERM saves a resumable checkpoint like Ctrl-C ---------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(tiny, tmp_path):
    choice, dataset = tiny
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "SIDESTEP_CONFIG_DIR": str(tmp_path / "config")}
    proc = subprocess.Popen([sys.executable, "-m", "sidestep", "train", "--dataset-dir", str(dataset), "--output-dir",
                             str(out), "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base",
                             "--device", "cpu", "--precision", "fp32", "--rank", "4", "--warmup-steps", "0",
                             "--save-every", "1", "--max-steps", "100000"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # a checkpoint per epoch (1 step): wait until the loop is running
            if (out / "checkpoints" / "step-2").is_dir() or proc.poll() is not None:
                break
            subprocess.run(["sleep", "0.1"])
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Interrupted at step" in err and "--resume latest" in err
    step = int(err.split("Interrupted at step ")[1].split(";")[0])
    assert saving.load_training_state(out / "checkpoints" / f"step-{step}")["step"] == step


# ---- foreign failures at the CLI boundary --------------------------------------------------------


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - collecting the real exception to describe
        return err
    raise AssertionError("expected an exception")


FOREIGN = {
    "disk-full": (lambda: OSError(errno.ENOSPC, "No space left on device", "/data/out/final"),
                  "The disk is full (or over quota) while writing /data/out/final"),
    "permission": (lambda: PermissionError(errno.EACCES, "Permission denied", "/data/out"), "Permission denied for /data/out"),
    "cpu-allocator": (lambda: _raised(lambda: torch.empty(1 << 62, dtype=torch.uint8)), "Ran out of memory"),
    "cuda-oom": (lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "--max-latent-length"),
    "numpy-linalg": (lambda: _raised(lambda: np.linalg.inv(np.zeros((2, 2)))), "A matrix decomposition failed"),
    "torch-linalg": (lambda: _raised(lambda: torch.linalg.inv(torch.zeros(2, 2))), "A matrix decomposition failed"),
    "json-recursion": (lambda: _raised(lambda: json.loads("[" * 100000)), "nested too deeply"),
    "json-invalid": (lambda: _raised(lambda: json.loads("{oops")), "not valid JSON"),
    "overflow": (lambda: _raised(lambda: math.exp(1000)), "A number is too large"),
    "torch-save-full-disk": (lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
                             "could not be written"),
}


@pytest.mark.parametrize("case", FOREIGN, ids=list(FOREIGN))
def test_foreign_failures_become_one_sentence(case):
    make, needle = FOREIGN[case]
    message = describe(make())
    assert message is not None and needle in message and "\n" not in message


def test_a_bug_keeps_its_traceback():
    assert describe(ZeroDivisionError("division by zero")) is None


def test_os_error_at_the_boundary_and_sidestep_debug(monkeypatch, capsys, trained, tmp_path):
    (tmp_path / "blocker").write_text("mine")
    dest = tmp_path / "blocker" / "sub" / "lora.safetensors"
    args = ("export", "--format", "comfyui", str(trained), str(dest))
    code, _, err = _main(monkeypatch, capsys, *args)
    _one_line(code, err)
    assert "part of this path is a file" in err and "SIDESTEP_DEBUG=1" in err
    monkeypatch.setenv("SIDESTEP_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["sidestep", *args])
    with pytest.raises(NotADirectoryError):  # the full traceback, for a bug report
        main()


def test_ctrl_c_twice_while_the_checkpoint_is_written_still_completes_it(tiny, tmp_path, monkeypatch):
    choice, dataset = tiny
    runtime = resolve_runtime("cpu", "fp32", False)
    real_save_file = saving.save_file

    def second_ctrl_c_mid_write(*args, **kwargs):  # the user presses Ctrl-C again while the weights are written
        signal.raise_signal(signal.SIGINT)
        return real_save_file(*args, **kwargs)

    def first_ctrl_c(optimizer, args, kwargs):
        monkeypatch.setattr(saving, "save_file", second_ctrl_c_mid_write)
        signal.raise_signal(signal.SIGINT)

    handle = register_optimizer_step_post_hook(first_ctrl_c)
    try:
        with pytest.raises(Exception) as stopped:
            train(TrainConfig(dataset, tmp_path / "out", rank=4, warmup_steps=0, save_every=0, max_steps=4), choice,
                  runtime)
    finally:
        handle.remove()
    assert "Interrupted at step 1" in str(stopped.value)
    step1 = tmp_path / "out" / "checkpoints" / "step-1"
    assert saving.load_training_state(step1)["step"] == 1 and saving.read_adapter_dir(step1).tensors
    assert not [p for p in step1.parent.iterdir() if p.name.startswith(".")]  # no half-written folder beside it


# ---- user JSON that is nested absurdly deep or holds absurd numbers -------------------------------

DEEP = "[" * 100000 + "]" * 100000
HUGE = '{"a": ' + "9" * 5000 + "}"
JSON_FILES = {
    "settings-deep": ("settings", DEEP, "Settings file"),
    "settings-huge-number": ("settings", HUGE, "Settings file"),
    "model-config-deep": ("model-config", DEEP, "cannot read the model config"),
    "dataset-json-deep": ("dataset-json", DEEP, "--dataset-json"),
}


@pytest.mark.parametrize("case", JSON_FILES, ids=list(JSON_FILES))
def test_hostile_json_files_are_one_sentence(monkeypatch, capsys, tiny, tmp_path, case):
    choice, dataset = tiny
    where, text, needle = JSON_FILES[case]
    root = tmp_path / "checkpoints"
    shutil.copytree(choice.checkpoint_dir, root)
    (tmp_path / "audio").mkdir()
    target = {"settings": tmp_path / "config" / "settings.json",
              "model-config": root / "acestep-v15-base" / "config.json",
              "dataset-json": tmp_path / "meta.json"}[where]
    target.parent.mkdir(exist_ok=True)
    target.write_text(text)
    monkeypatch.setenv("SIDESTEP_CONFIG_DIR", str(tmp_path / "config"))
    if where == "dataset-json":
        (tmp_path / "audio" / "song.wav").write_bytes(b"RIFF")  # the JSON is read before any audio is decoded
        args = ["preprocess", "--audio-dir", str(tmp_path / "audio"), "--output", str(tmp_path / "pt"),
                "--dataset-json", str(target), "--checkpoint-dir", str(root), "--model", "base"]
    elif where == "settings":
        args = ["settings", "show"]
    else:
        args = ["train", "--dataset-dir", str(dataset), "--output-dir", str(tmp_path / "out"), "--checkpoint-dir",
                str(root), "--model", "base", *FAST]
    before = _snapshot(tmp_path)
    code, _, err = _main(monkeypatch, capsys, *args)
    _ends_in_one_error(code, err)  # preprocess first says what it is about to do
    assert needle in err
    assert _snapshot(tmp_path) == before


# ---- memory runs out in a training step ----------------------------------------------------------

_OOM_RUN = """
import resource, sys
import torch
from sidestep.cli.app import main
vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (600 << 20), resource.RLIM_INFINITY))  # 600 MiB more than now
sys.argv = ["sidestep", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to bound the address space")
def test_running_out_of_memory_names_the_samples_and_the_flag(tiny, tmp_path):
    choice, template = tiny
    dataset = tmp_path / "dataset"
    shutil.copytree(template, dataset)
    frames = 20000  # attention over 10k tokens needs gigabytes: more than the process may take
    torch.save({"target_latents": torch.randn(frames, 64), "attention_mask": torch.ones(frames),
                "encoder_hidden_states": torch.randn(8, 32), "encoder_attention_mask": torch.ones(8, dtype=torch.bool),
                "context_latents": torch.randn(frames, 128)}, dataset / "long.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "SIDESTEP_CONFIG_DIR": str(tmp_path / "config")}
    done = subprocess.run([sys.executable, "-c", _OOM_RUN, "train", "--dataset-dir", str(dataset), "--output-dir",
                           str(tmp_path / "out"), "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base",
                           *FAST, "--max-steps", "2", "--batch-size", "3"], env=env, capture_output=True, text=True,
                          timeout=300)
    _ends_in_one_error(done.returncode, done.stderr)
    assert "Ran out of cpu memory at step 1" in done.stderr and "long" in done.stderr
    assert "--max-latent-length" in done.stderr and not (tmp_path / "out" / "final").exists()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc to bound the address space")
def test_running_out_of_memory_in_analyze_names_the_sample(tiny, tmp_path):
    choice, template = tiny
    dataset = tmp_path / "dataset"
    shutil.copytree(template, dataset)
    frames = 20000
    torch.save({"target_latents": torch.randn(frames, 64), "attention_mask": torch.ones(frames),
                "encoder_hidden_states": torch.randn(8, 32), "encoder_attention_mask": torch.ones(8, dtype=torch.bool),
                "context_latents": torch.randn(frames, 128)}, dataset / "long.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "SIDESTEP_CONFIG_DIR": str(tmp_path / "config")}
    done = subprocess.run([sys.executable, "-c", _OOM_RUN, "analyze", "--dataset-dir", str(dataset),
                           "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", "--yes", "--runs", "1",
                           "--rank", "8", "--rank-min", "4", "--rank-max", "16", "--device", "cpu",
                           "--precision", "fp32"], env=env, capture_output=True, text=True, timeout=300)
    _ends_in_one_error(done.returncode, done.stderr)
    assert "Ran out of cpu memory analysing long.pt" in done.stderr and "--max-duration" in done.stderr
    assert not (dataset / "fisher_map.json").exists()


def test_an_init_file_larger_than_the_model_could_need_is_never_read(tiny, tmp_path):
    choice, template = tiny
    dataset = tmp_path / "dataset"
    shutil.copytree(template, dataset)
    with open(dataset / INIT_FILENAME, "wb") as fh:
        fh.truncate(1 << 30)  # 1 GiB, sparse: reading it whole is what must not happen
    config = TrainConfig(dataset, tmp_path / "out", rank=4, init="gradient")
    plan = flat_plan(config, 2)
    init = resolve_init(config, plan.ranks, module_shapes(build_transformer(choice.entry.config, "meta")))
    assert init.mode is InitMode.DEFAULT and "more than any init file for this model can be" in init.notice
