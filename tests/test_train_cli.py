"""`sidestep train` / `sidestep export` through the real entry point: output, --json, one-line errors."""

from __future__ import annotations

import json

import pytest

from sidestep.analysis.fisher_map import FisherMap, write_map
from sidestep.data import dataset_hash
from sidestep.training import saving
from train_support import tiny_setup
from cli_support import run_cli as _main

FAST = ["--device", "cpu", "--precision", "fp32", "--rank", "4", "--warmup-steps", "0", "--save-every", "0"]
MAP_RANKS = {"layers.0.self_attn.q_proj": 8, "layers.1.cross_attn.v_proj": 4, "layers.1.mlp.up_proj": 12}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("cli"), samples=2)


def _train(monkeypatch, capsys, tiny, out, *extra):
    choice, dataset = tiny
    return _main(monkeypatch, capsys, "train", "--dataset-dir", str(dataset), "--output-dir", str(out),
                 "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", *FAST, *extra)


def test_train_with_map_reports_it_and_saves_its_ranks(monkeypatch, capsys, tiny, tmp_path):
    _, dataset = tiny
    fmap = FisherMap(rank_pattern=MAP_RANKS, alpha_pattern={n: 2 * r for n, r in MAP_RANKS.items()},
                     model_variant="base", num_hidden_layers=2, dataset_hash=dataset_hash(dataset), base_rank=8)
    write_map(fmap, dataset)
    try:
        code, out, err = _train(monkeypatch, capsys, tiny, tmp_path / "out", "--max-steps", "2", "--json")
    finally:
        (dataset / "fisher_map.json").unlink()
    assert code == 0, err
    result = json.loads(out)
    assert result["adaptive"] and result["steps"] == 2 and result["modules"] == 3
    assert "Preprocessing++ map detected" in err and "not used: --rank 4" in err
    assert "timesteps continuous" in err
    assert "mlp 1/6" in err and "Trainable parameters" in err
    config = saving.read_adapter_dir(tmp_path / "out" / "final").config
    assert config["rank_pattern"] == MAP_RANKS
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["adapter"]["adaptive"] and run["config"]["rank"] == 4 and run["runtime"]["device"] == "cpu"


def test_train_flat_prints_progress_and_final_path(monkeypatch, capsys, tiny, tmp_path):
    code, out, err = _train(monkeypatch, capsys, tiny, tmp_path / "out", "--max-steps", "2")
    assert code == 0, err
    assert out == "" and "Preprocessing++" not in err
    assert "Trained 2 steps" in err and str(tmp_path / "out" / "final") in err


@pytest.mark.parametrize("extra, needle", [
    (["--rank", "0"], "--rank must be a whole number >= 1"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--adapter", "ia3"], "--adapter 'ia3' is not one of lora|dora|lokr|loha"),
    (["--optimizer", "adamw8bit"], "needs bitsandbytes"),
    (["--init", "gradient"], "--init gradient needs the init bases"),
    (["--timestep-mode", "fast"], "--timestep-mode 'fast'"),
    (["--target-modules", "qkv"], "--target-modules 'qkv' matches no module"),
    (["--resume", "latest"], "--resume latest: no checkpoint"),
], ids=["rank", "dropout", "adapter", "adamw8bit", "init", "timestep-mode", "targets", "resume"])
def test_bad_flags_are_one_line_exit_1(monkeypatch, capsys, tiny, tmp_path, extra, needle):
    if "adamw8bit" in extra and __import__("importlib").util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    code, out, err = _train(monkeypatch, capsys, tiny, tmp_path / "out", *extra)
    assert code == 1 and out == ""
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert needle in err


def test_missing_required_flags_and_broken_map(monkeypatch, capsys, tiny, tmp_path):
    code, _, err = _main(monkeypatch, capsys, "train", "--output-dir", str(tmp_path))
    assert code == 1 and "--dataset-dir is required" in err and len(err.strip().splitlines()) == 1
    _, dataset = tiny
    (dataset / "fisher_map.json").write_text("[1, 2", encoding="utf-8")
    try:
        code, _, err = _train(monkeypatch, capsys, tiny, tmp_path / "out")
    finally:
        (dataset / "fisher_map.json").unlink()
    assert code == 1 and "fisher_map.json" in err and "--ignore-fisher-map" in err
    assert "Traceback" not in err


def test_export_cli(monkeypatch, capsys, tiny, tmp_path):
    assert _train(monkeypatch, capsys, tiny, tmp_path / "out", "--max-steps", "1")[0] == 0
    code, _, err = _main(monkeypatch, capsys, "export", str(tmp_path / "out"), str(tmp_path / "c.safetensors"))
    assert code == 1 and "--format is missing" in err and len(err.strip().splitlines()) == 1
    code, out, err = _main(monkeypatch, capsys, "export", "--format", "comfyui", "--json", str(tmp_path / "out"),
                           str(tmp_path / "c.safetensors"))
    assert code == 0, err
    assert json.loads(out) == {"path": str(tmp_path / "c.safetensors"), "format": "comfyui", "modules": 22}
    code, _, err = _main(monkeypatch, capsys, "export", "--format", "diffusers", str(tmp_path / "nope"), str(tmp_path / "d"))
    assert code == 1 and "does not exist" in err and "Traceback" not in err
