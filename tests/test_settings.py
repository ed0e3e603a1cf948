"""Settings file, precedence (flag > env > file > default) and the `sidestep settings` commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from sidestep import settings
from sidestep.errors import ConfigError, SettingsError
from sidestep.settings import Settings


@pytest.fixture
def cfg_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty config dir and no SIDESTEP_* variables leaking in from the developer's shell."""
    for name in [*settings.ENV_VARS.values(), "SIDESTEP_DEBUG"]:
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "config"
    monkeypatch.setenv("SIDESTEP_CONFIG_DIR", str(folder))
    return folder


def _write_raw(cfg_dir: Path, text: str) -> Path:
    cfg_dir.mkdir(parents=True, exist_ok=True)
    path = cfg_dir / "settings.json"
    path.write_text(text, encoding="utf-8")
    return path


# ---- library -------------------------------------------------------------------------------------------------


def test_missing_file_gives_defaults_and_path_follows_env(cfg_dir):
    assert settings.settings_path() == cfg_dir / "settings.json"
    assert settings.config_dir() == cfg_dir
    assert settings.load_settings() == Settings()
    assert not (cfg_dir / "settings.json").exists()


def test_every_field_has_help():
    assert all(f.metadata.get("help") for f in fields(Settings))


def test_checkpoint_dir_precedence_flag_env_file_default(cfg_dir, tmp_path, monkeypatch):
    assert settings.resolve("checkpoint_dir", None) == settings.Resolved(None, "default")
    settings.set_value("checkpoint_dir", str(tmp_path / "from_file"))
    assert settings.resolve("checkpoint_dir", None) == settings.Resolved(tmp_path / "from_file", "settings file")
    monkeypatch.setenv("SIDESTEP_CHECKPOINT_DIR", str(tmp_path / "from_env"))
    assert settings.resolve("checkpoint_dir", None) == settings.Resolved(
        tmp_path / "from_env", "env SIDESTEP_CHECKPOINT_DIR"
    )
    found = settings.resolve("checkpoint_dir", tmp_path / "from_flag")
    assert found == settings.Resolved(tmp_path / "from_flag", "--checkpoint-dir")


def test_model_precedence_flag_env_file_default(cfg_dir, monkeypatch):
    assert settings.resolve("model", None) == settings.Resolved("base", "default")
    settings.set_value("model", "sft")
    assert settings.resolve("model", None) == settings.Resolved("sft", "settings file")
    monkeypatch.setenv("SIDESTEP_MODEL", "xl-base")
    assert settings.resolve("model", None) == settings.Resolved("xl-base", "env SIDESTEP_MODEL")
    assert settings.resolve("model", "turbo") == settings.Resolved("turbo", "--model")
    monkeypatch.setenv("SIDESTEP_MODEL", "")  # an empty variable counts as unset
    assert settings.resolve("model", None).source == "settings file"


def test_bad_env_value_names_the_variable(cfg_dir, monkeypatch):
    monkeypatch.setenv("SIDESTEP_DEVICE", "gpu")
    with pytest.raises(ConfigError, match="SIDESTEP_DEVICE.*auto, cpu, cuda, cuda:N or mps"):
        settings.resolve("device", None)
    with pytest.raises(ConfigError, match="--precision 'fp8'"):
        settings.resolve("precision", "fp8")


@pytest.mark.parametrize(
    "key, raw, expected",
    [
        ("first_run_done", "yes", True),
        ("first_run_done", "1", True),
        ("first_run_done", "False", False),
        ("first_run_done", "no", False),
        ("device", "CUDA:1", "cuda:1"),
        ("device", "none", None),
        ("precision", "bf16", "bf16"),
        ("model", "acestep-v15-turbo", "acestep-v15-turbo"),
    ],
)
def test_set_value_converts(cfg_dir, key, raw, expected):
    assert getattr(settings.set_value(key, raw), key) == expected
    assert getattr(settings.load_settings(), key) == expected


def test_set_value_expands_home(cfg_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert settings.set_value("checkpoint_dir", "~/ckpts").checkpoint_dir == tmp_path / "ckpts"
    stored = json.loads((cfg_dir / "settings.json").read_text())
    assert stored["checkpoint_dir"] == str(tmp_path / "ckpts")


@pytest.mark.parametrize(
    "key, raw, match",
    [
        ("first_run_done", "maybe", "true/false"),
        ("model", "../etc", "variant or folder name"),
        ("model", "none", "Cannot clear model"),
        ("device", "gpu", "cuda:N"),
        ("precision", "fp8", "bf16"),
    ],
)
def test_set_value_rejects_bad_values(cfg_dir, key, raw, match):
    with pytest.raises(ConfigError, match=match):
        settings.set_value(key, raw)
    assert not (cfg_dir / "settings.json").exists()


def test_unknown_key_lists_valid_keys(cfg_dir):
    with pytest.raises(ConfigError) as info:
        settings.set_value("modle", "turbo")
    assert str(info.value) == (
        "Unknown setting 'modle'; valid keys are checkpoint_dir, model, device, precision, first_run_done."
    )


CORRUPT = [
    ("bad json", '{"model": "turbo",'),
    ("not an object", '["model"]'),
    ("wrong type", '{"first_run_done": "yes"}'),
    ("unknown key", '{"modle": "turbo"}'),
    ("bad value", '{"device": "gpu"}'),
    ("newer version", '{"version": 99}'),
]


@pytest.mark.parametrize("label, text", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_file_is_reported_and_never_overwritten(cfg_dir, label, text):
    path = _write_raw(cfg_dir, text)
    with pytest.raises(SettingsError) as info:
        settings.load_settings()
    message = str(info.value)
    assert str(path) in message and "sidestep settings reset" in message and "\n" not in message
    with pytest.raises(SettingsError):
        settings.save_settings(Settings(model="turbo"))
    with pytest.raises(SettingsError):
        settings.set_value("model", "turbo")
    assert path.read_text(encoding="utf-8") == text


def test_reset_moves_corrupt_file_to_bak(cfg_dir):
    path = _write_raw(cfg_dir, "{oops")
    backup = settings.reset_settings()
    assert backup == cfg_dir / "settings.json.bak"
    assert backup.read_text(encoding="utf-8") == "{oops"
    assert settings.load_settings() == Settings()
    assert json.loads(path.read_text())["model"] == "base"


def test_settings_validates_at_construction():
    with pytest.raises(ConfigError, match="Settings.device"):
        Settings(device="gpu")
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        Settings(checkpoint_dir="not/a/Path")  # type: ignore[arg-type]


def test_require_checkpoint_dir(cfg_dir, tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as info:
        settings.require_checkpoint_dir(None)
    assert str(info.value) == (
        "No checkpoint folder given: pass --checkpoint-dir or run `sidestep settings set checkpoint_dir PATH`."
    )
    monkeypatch.setenv("SIDESTEP_CHECKPOINT_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"from env SIDESTEP_CHECKPOINT_DIR\) does not exist"):
        settings.require_checkpoint_dir(None)
    assert settings.require_checkpoint_dir(tmp_path) == settings.Resolved(tmp_path, "--checkpoint-dir")


# ---- CLI -----------------------------------------------------------------------------------------------------


def _invoke(*args: str):
    from typer.testing import CliRunner

    from sidestep.cli.app import app

    return CliRunner().invoke(app, list(args))


def _run_cli(cfg_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """The real entry point (`main()` turns SidestepError into one red line), with real exit codes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDESTEP_")}
    env["SIDESTEP_CONFIG_DIR"] = str(cfg_dir)
    return subprocess.run(
        [sys.executable, "-m", "sidestep", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_set_then_show_round_trip(cfg_dir, checkpoint_root):
    tmp_path = checkpoint_root
    assert _invoke("settings", "set", "model", "turbo").exit_code == 0  # no folder yet: only the spelling is checked
    assert _invoke("settings", "set", "checkpoint_dir", str(tmp_path)).exit_code == 0
    result = _invoke("settings", "show", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["settings_file"] == str(cfg_dir / "settings.json")
    assert shown["settings"]["model"] == {"value": "turbo", "source": "settings file"}
    assert shown["settings"]["checkpoint_dir"] == {"value": str(tmp_path), "source": "settings file"}
    assert shown["settings"]["device"] == {"value": None, "source": "default"}
    table = _invoke("settings", "show")
    assert table.exit_code == 0 and "turbo" in table.stdout and "settings file" in table.stdout


def test_cli_path_prints_the_path(cfg_dir):
    result = _invoke("settings", "path")
    assert result.exit_code == 0
    assert result.stdout.strip() == str(cfg_dir / "settings.json")


def test_cli_reset_keeps_bak(cfg_dir):
    assert _invoke("settings", "set", "model", "sft").exit_code == 0
    before = (cfg_dir / "settings.json").read_bytes()
    assert _invoke("settings", "reset").exit_code == 0
    assert (cfg_dir / "settings.json.bak").read_bytes() == before
    assert settings.load_settings() == Settings()


def test_cli_corrupt_file_is_one_line_exit_1_and_untouched(cfg_dir):
    path = _write_raw(cfg_dir, '{"model": ')
    before = path.read_bytes()
    for args in (["settings", "show"], ["settings", "set", "model", "turbo"]):
        proc = _run_cli(cfg_dir, *args)
        assert proc.returncode == 1, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert str(path) in proc.stderr and "sidestep settings reset" in proc.stderr
        assert path.read_bytes() == before


def test_cli_unknown_key_is_one_sentence(cfg_dir):
    proc = _run_cli(cfg_dir, "settings", "set", "colour", "red")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "valid keys are checkpoint_dir, model, device, precision, first_run_done." in proc.stderr
    assert not (cfg_dir / "settings.json").exists()


def _cli(monkeypatch, capsys, *args: str):
    """In-process `sidestep ARGS` through the real entry point (exit code and one-line errors as a user sees them)."""
    from types import SimpleNamespace

    from cli_support import run_cli

    code, out, err = run_cli(monkeypatch, capsys, *args)
    return SimpleNamespace(code=code, out=out, err=err)


def test_cli_set_checkpoint_dir_checks_the_folder_as_the_wizard_does(cfg_dir, tmp_path, checkpoint_root, monkeypatch, capsys):
    for folder, needle in ((tmp_path / "missing", "does not exist or is not a folder"),
                           (tmp_path, "No ACE-Step model folder (e.g. acestep-v15-base/) found in")):
        proc = _cli(monkeypatch, capsys, "settings", "set", "checkpoint_dir", str(folder))
        assert proc.code == 1 and needle in proc.err, proc.err
        assert len(proc.err.strip().splitlines()) == 1 and "Traceback" not in proc.err
        assert not (cfg_dir / "settings.json").exists()  # nothing saved
    proc = _cli(monkeypatch, capsys, "settings", "set", "checkpoint_dir", str(checkpoint_root))
    assert proc.code == 0 and "Models found: acestep-v15-base" in proc.err, proc.err
    stored = json.loads((cfg_dir / "settings.json").read_text())
    assert stored["checkpoint_dir"] == str(checkpoint_root) and stored["first_run_done"] is True  # setup done


def test_cli_set_model_must_be_in_the_checkpoint_folder_and_lists_those_found(cfg_dir, checkpoint_root, monkeypatch, capsys):
    assert _cli(monkeypatch, capsys, "settings", "set", "checkpoint_dir", str(checkpoint_root)).code == 0
    proc = _cli(monkeypatch, capsys, "settings", "set", "model", "xl-turbo")
    assert proc.code == 1 and len(proc.err.strip().splitlines()) == 1, proc.err
    assert "No model 'xl-turbo'" in proc.err and "models found: acestep-v15-base" in proc.err
    assert json.loads((cfg_dir / "settings.json").read_text())["model"] == "base"  # unchanged
    assert _cli(monkeypatch, capsys, "settings", "set", "model", "base").code == 0
