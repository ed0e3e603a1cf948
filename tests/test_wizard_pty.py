"""The real wizard in a pseudo-terminal (pexpect): keys in, screens out, files on disk checked.

One session walks the whole user journey on the tiny demo model: first-run setup → Preprocess audio →
"Run Preprocessing++ now?" → go-back → the map is written → Ctrl-C at a prompt (back to the menu) →
Ctrl-C at the menu (quit).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from sidestep.testing.demo import DEMO_MODEL  # noqa: E402
from sidestep.testing.tiny import tiny_config, write_original_checkpoint  # noqa: E402
from sidestep.testing.tiny_audio import setup_demo_audio  # noqa: E402

SIDESTEP = Path(sys.executable).with_name("sidestep")
TIMEOUT = 180  # generous: the machine running the suite may be busy
UP, DOWN, ENTER, CTRL_C = "\x1b[A", "\x1b[B", "\r", "\x03"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CODES = r"(?:\x1b\[[0-9;?]*[ -/]*[@-~]|\s)*"  # escape codes and spaces between two visible things


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The demo checkpoint (model, VAE, text encoder) and three short songs; preprocessing is the wizard's job."""
    root = tmp_path_factory.mktemp("demo")
    cfg = tiny_config(num_layers=4, hidden=64)
    write_original_checkpoint(root / "checkpoints", cfg, seed=0)
    audio = setup_demo_audio(root, count=3, text_hidden_dim=cfg["text_hidden_dim"], seed=0)
    return {"root": root, "checkpoints": root / "checkpoints", "audio": audio}


def _spawn(config_dir: Path) -> "pexpect.spawn":
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDESTEP_")}
    env.update(SIDESTEP_CONFIG_DIR=str(config_dir), SIDESTEP_DEVICE="cpu", TERM="xterm", COLUMNS="120", LINES="40",
               PROMPT_TOOLKIT_NO_CPR="1", OMP_NUM_THREADS="2")
    return pexpect.spawn(str(SIDESTEP), [], env=env, dimensions=(40, 120), encoding="utf-8", timeout=TIMEOUT)


class Screen:
    """Wait for a prompt, then type; keeps the plain text seen so far for assertions."""

    def __init__(self, child: "pexpect.spawn") -> None:
        self.child = child
        self.seen = ""

    def wait(self, pattern: str) -> str:
        self.child.expect(pattern)
        chunk = _ANSI.sub("", self.child.before + self.child.after)
        self.seen += chunk
        return chunk

    def answer(self, pattern: str, keys: str) -> str:
        chunk = self.wait(pattern)
        self.child.send(keys)
        return chunk


@pytest.mark.slow

def _start_preprocessing_plus_plus(s: "Screen", dataset_dir) -> None:
    """Main menu → Preprocessing++ on `dataset_dir` with ranks 8 (4..16), every other answer the default."""
    s.answer("What do you want to do", ENTER)  # Preprocessing++ is the first entry
    s.answer("Load defaults from a preset", ENTER)
    s.answer("Which model", ENTER)
    s.answer("Dataset folder", str(dataset_dir) + ENTER)
    s.answer("Timestep focus", ENTER)
    s.answer("Rank budget", ENTER)
    s.answer("Base rank", "8" + ENTER)
    s.answer("Smallest rank", "4" + ENTER)
    s.answer("Largest rank", "16" + ENTER)

def test_full_journey_preprocess_then_preprocessing_plus_plus(demo, tmp_path):
    config_dir, dataset = tmp_path / "config", tmp_path / "tensors"
    child = _spawn(config_dir)
    s = Screen(child)
    try:
        # First run: checkpoint folder and default model, then the menu.
        s.answer("Checkpoint folder", str(demo["checkpoints"]) + ENTER)
        s.answer("Default model", ENTER)
        s.answer("What do you want to do", UP + ENTER)  # the pointer starts on Preprocessing++; Up = Preprocess
        # Preprocess audio.
        s.answer("Audio folder", str(demo["audio"]) + ENTER)
        s.answer("Output folder", str(dataset) + ENTER)
        s.answer("Dataset JSON", ENTER)
        s.answer(r"Start preprocessing\?", "y")
        s.answer(r"Run Preprocessing\+\+ on this dataset now\?", "y")
        # Preprocessing++ with the new dataset pre-filled; go back once at a choice and once at a number.
        s.answer("Load defaults from a preset", ENTER)
        s.answer("Which model", ENTER)
        s.answer("Dataset folder", ENTER)
        s.answer("Timestep focus", DOWN + ENTER)  # texture
        s.answer("Rank budget", DOWN + ENTER)  # flat: the size of a rank-8 LoRA on every target
        s.answer("Base rank", "b" + ENTER)
        s.wait("Rank budget")  # back here: the pointer is on the previous answer
        assert "» flat" in s.answer("← Back", ENTER)
        s.answer("Base rank", "8" + ENTER)
        s.answer("Smallest rank", "b" + ENTER)
        s.wait("Base rank")  # back again: the previous 8 is the default, shown in grey; Enter keeps it
        s.answer(r"b = back\)" + _CODES + "8", ENTER)
        s.answer("Smallest rank", "4" + ENTER)
        s.answer("Largest rank", "16" + ENTER)
        summary = s.answer(r"Run Preprocessing\+\+ now\?", "y")
        assert "Preprocessing++ — about to run" in summary and "Estimated time" in summary
        assert "flat: the parameters of a rank-8 LoRA" in " ".join(summary.split()) and "texture" in summary
        s.answer(r"Save fisher_map\.json\?", "y")
        s.answer(r"Train now with this map\?", "n")
        # Ctrl-C at a prompt goes back to the menu; Ctrl-C at the menu quits.
        s.answer("What do you want to do", DOWN + ENTER)  # Preprocessing++ -> Train
        s.answer("Load defaults from a preset", CTRL_C)
        s.answer("What do you want to do", CTRL_C)
        s.wait("Bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, s.seen[-2000:]
    assert "Cancelled; back to the main menu" in s.seen
    stored = json.loads((config_dir / "settings.json").read_text())
    assert stored["first_run_done"] is True and Path(stored["checkpoint_dir"]) == demo["checkpoints"]
    assert stored["model"] == DEMO_MODEL
    assert len(list(dataset.glob("*.pt"))) == 3
    fmap = json.loads((dataset / "fisher_map.json").read_text())
    assert fmap["timestep_focus"] == "texture" and fmap["budget_mode"] == "flat"
    assert all(4 <= r <= 16 for r in fmap["rank_pattern"].values())


@pytest.mark.slow
def test_turbo_refusal_in_the_terminal_writes_nothing(demo, tmp_path, tiny_cfg, dataset_dir):
    root = tmp_path / "ckpt"
    write_original_checkpoint(root, {**tiny_cfg, "is_turbo": True}, seed=0, folder="acestep-v15-turbo")
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "settings.json").write_text(json.dumps(
        {"version": 1, "checkpoint_dir": str(root), "model": "turbo", "first_run_done": True}))
    child = _spawn(config_dir)
    s = Screen(child)
    try:
        _start_preprocessing_plus_plus(s, dataset_dir)
        warning = s.answer(r"Analyse it anyway\?", "n")
        assert "turbo model" in warning
        s.answer("What do you want to do", CTRL_C)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "Nothing was written" in s.seen
    assert not (dataset_dir / "fisher_map.json").exists()


def test_refuses_without_a_terminal(tmp_path):
    env = {**os.environ, "SIDESTEP_CONFIG_DIR": str(tmp_path)}
    for args in ([], ["wizard"]):
        done = subprocess.run([str(SIDESTEP), *args], capture_output=True, text=True,
                              env=env, timeout=TIMEOUT, input="")
        assert done.returncode == 1
        assert "needs an interactive terminal" in done.stderr and "sidestep analyze" in done.stderr
        assert done.stdout == ""


@pytest.mark.slow
def test_chain_preprocessing_plus_plus_then_train_then_export(demo, tmp_path, dataset_dir):
    """Issue 15's chain on the demo model: PP++ → "Train now?" (preset and model carried) → train → Export,
    with a lone `b` after a rejected answer on the way."""
    for extra in sorted(dataset_dir.glob("*.pt"))[2:]:
        extra.unlink()  # two songs: one short epoch
    config_dir, out, loras = tmp_path / "config", tmp_path / "my-run", tmp_path / "loras"
    config_dir.mkdir()
    (config_dir / "settings.json").write_text(json.dumps(
        {"version": 1, "checkpoint_dir": str(demo["checkpoints"]), "model": "base", "first_run_done": True}))
    child = _spawn(config_dir)
    s = Screen(child)
    try:
        _start_preprocessing_plus_plus(s, dataset_dir)
        s.answer(r"Run Preprocessing\+\+ now\?", "y")
        s.answer(r"Save fisher_map\.json\?", "y")
        s.answer(r"Train now with this map\?", "y")
        handed_over = s.answer("How much do you want to set", ENTER)  # no preset or model question before it
        assert "From Preprocessing++: model" in handed_over and "Load defaults" not in handed_over
        s.answer("Dataset folder", ENTER)  # carried over as the default
        s.answer("Use it", ENTER)
        s.answer("Output folder for the adapter", str(out) + ENTER)
        s.answer("Learning rate", ENTER)
        s.answer("Epochs", "x" + ENTER)  # rejected ...
        s.answer("not a whole number", "b" + ENTER)  # ... then a lone b still goes back
        s.answer("Learning rate", ENTER)
        s.answer("Epochs", "1" + ENTER)
        s.answer("Listen while training", ENTER)
        s.answer("Adapter init", ENTER)
        s.answer(r"Start training\?", "y")
        trained = s.answer(r"Save these choices as a preset\?", "n")
        assert "Loading the model" in trained and "Trained 2 steps" in trained
        s.answer(r"Export the adapter for ComfyUI, diffusers or peft now\?", "y")
        s.answer("Trained adapter", ENTER)  # this run's output folder
        s.answer("Export for which loader", ENTER)  # comfyui
        s.answer("Destination folder", str(loras) + ENTER)
        s.wait("Exported")
        s.answer("What do you want to do", CTRL_C)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, s.seen[-3000:]
    assert (dataset_dir / "fisher_map.json").is_file() and (out / "final").is_dir()
    exported = loras / "my-run.safetensors"
    assert exported.is_file() and (exported.stat().st_mode & 0o777) == 0o644
    from safetensors import safe_open

    with safe_open(str(exported), framework="pt") as handle:
        header = handle.metadata()
    assert json.loads(header["ss_network_args"])["adaptive"] and header["ss_steps"] == "2"
