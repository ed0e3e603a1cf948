"""Data parallelism: real 2-process runs on CPU with gloo, launched like users do (`torchrun -m sidestep ...`).

Every launched process runs a sitecustomize (below) that logs each file it creates, renames or removes under
the test folder, with its RANK: that is how "only process 0 writes" and "each file written once" are checked.
The 1-process references run inside pytest on the same tiny model, dataset and seed.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sidestep import distributed
from sidestep.analysis.config import AnalysisConfig
from sidestep.analysis.fisher_map import read_map
from sidestep.analysis.run import analyze_dataset
from sidestep.data import DatasetSpec
from sidestep.data.preprocess import PreprocessConfig, preprocess_audio
from sidestep.errors import ConfigError
from sidestep.models import resolve_runtime
from sidestep.testing.tiny_audio import write_audio_clips, write_preprocess_components
from sidestep.training import saving
from sidestep.training.config import TrainConfig
from sidestep.training.events import Progress
from sidestep.training.loop import SampleOrder
from sidestep.training.run import train
from train_support import tiny_setup

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

CPU = resolve_runtime("cpu", "fp32", False)
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
TRAIN = dict(rank=4, lr=1e-3, warmup_steps=0, seed=3, max_steps=4, save_every=1)  # 4 samples, batch 1
ANALYZE = dict(seed=2, runs=2, batches_per_run=7, convergence_patience=1, base_rank=8, rank_min=4, rank_max=16,
               probe_steps=3)

WATCHER = '''
import builtins, io, os
_dir, _log, _rank = os.environ.get("SIDESTEP_TEST_WATCH"), os.environ.get("SIDESTEP_TEST_WATCH_LOG"), os.environ.get("RANK")
if _dir and _log and _rank is not None:
    _open = io.open
    def _note(op, path):
        path = os.path.abspath(os.fspath(path))
        if path.startswith(_dir):
            with _open(_log, "a") as fh:
                fh.write(f"{_rank} {op} {path}\\n")
    def _opener(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            _note("open", file)
        return _open(file, mode, *args, **kwargs)
    builtins.open = io.open = _opener
    def _wrap(name, target):
        original = getattr(os, name)
        def call(*args, **kwargs):
            _note(name, args[target])
            return original(*args, **kwargs)
        setattr(os, name, call)
    for _name, _target in (("replace", 1), ("rename", 1), ("mkdir", 0), ("unlink", 0), ("rmdir", 0)):
        _wrap(_name, _target)
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny checkpoint root (model + VAE + text encoder), a 4-sample dataset, and a watcher for launched processes."""
    root = tmp_path_factory.mktemp("dist")
    choice, dataset = tiny_setup(root, samples=4)
    write_preprocess_components(root / "checkpoints", text_hidden_dim=choice.entry.config["text_hidden_dim"])
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(WATCHER)
    return choice, dataset, site


def _env(site: Path, watch: Path, log: Path, timeout: float) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "SIDESTEP_TEST_WATCH": str(watch), "SIDESTEP_TEST_WATCH_LOG": str(log),
            "SIDESTEP_DIST_TIMEOUT": str(timeout), "OMP_NUM_THREADS": "1"}


def _torchrun(tiny, watch: Path, *args: str) -> tuple[int, dict[int, tuple[str, str]], list[tuple[str, str, str]]]:
    """`torchrun --nproc_per_node 2 -m sidestep ARGS` -> (exit code, {rank: (stdout, stderr)}, file events)."""
    choice, _, site = tiny
    logs, events = watch.parent / f"{watch.name}-logs", watch.parent / f"{watch.name}-events.txt"
    common = ["--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", "--device", "cpu", "--precision", "fp32"]
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "--log-dir", str(logs), "--redirects", "3",
           "-m", "sidestep", *args, *common]
    proc = subprocess.run(cmd, env=_env(site, watch, events, 60), capture_output=True, text=True, timeout=240)
    streams = {}
    for rank in (0, 1):
        folder = next(logs.glob(f"*/attempt_0/{rank}"))
        streams[rank] = ((folder / "stdout.log").read_text(), (folder / "stderr.log").read_text())
    lines = events.read_text().splitlines() if events.exists() else []
    assert proc.returncode == 0, (streams, proc.stderr[-3000:])
    return proc.returncode, streams, [tuple(line.split(" ", 2)) for line in lines]


def _only_rank0_wrote(streams, events) -> None:
    assert streams[1] == ("", ""), streams[1]  # process 1 stayed silent
    assert events and {rank for rank, _, _ in events} == {"0"}, [e for e in events if e[0] != "0"]
    assert not [p for _, _, p in events if p.endswith(".partial") and Path(p).exists()]


# ---- train ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_two_processes_equal_one_with_grad_accum_and_resume_on_one(tiny, tmp_path):
    choice, dataset, _ = tiny
    out2 = tmp_path / "two"
    prompts = tmp_path / "prompts.json"  # written before the watched run; samples render on process 0 only
    prompts.write_text(json.dumps([{"name": "probe", "prompt": "a calm tone", "duration": 0.4}]))
    _, streams, events = _torchrun(tiny, tmp_path, "train", "--dataset-dir", str(dataset), "--output-dir", str(out2),
                                   "--rank", "4", "--lr", "1e-3", "--warmup-steps", "0", "--seed", "3",
                                   "--max-steps", "4", "--save-every", "1", "--sample-every", "2", "--sample-steps", "1",
                                   "--sample-prompts", str(prompts), "--json")
    _only_rank0_wrote(streams, events)
    assert sorted(p.name for p in (out2 / "samples").iterdir()) == ["step-0", "step-2", "step-4"]
    stdout, stderr = streams[0]
    assert json.loads(stdout)["steps"] == 4  # one JSON document: nothing interleaved
    assert stderr.count("effective batch 2 (batch × grad-accum × 2 processes)") == 1
    # step-2 (an epoch) and step-4 (the last step's resumable state; final/ holds no optimizer state)
    assert stderr.count("Checkpoint saved") == 2 and stderr.count("Final adapter saved") == 1
    replaced = [p for _, op, p in events if op == "replace"]
    records = [p for p in replaced if p == str(out2 / "run.json")]
    assert len(records) == 2  # run.json: "running" at the start, the outcome at the end
    replaced = [p for p in replaced if p not in records]
    assert len(replaced) == len(set(replaced))  # every other file renamed into place once

    # 1 process × grad-accum 2 sees the same micro-batches with the same draws; only the order in which the two
    # gradients are summed differs (fp32 rounding, ~1e-7 relative per step), so 1e-5 is a generous bound.
    ref_events = []
    ref = train(TrainConfig(dataset, tmp_path / "one", grad_accum=2, **TRAIN), choice, CPU, ref_events.append)
    one, two = _weights(ref.final_dir), _weights(out2 / "final")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)

    # the 2-process checkpoint at step 2 resumes in 1 process (grad-accum 2) on the same loss curve
    resumed_events = []
    train(TrainConfig(dataset, tmp_path / "resumed", grad_accum=2, resume=str(out2 / "checkpoints" / "step-2"),
                      **TRAIN), choice, CPU, resumed_events.append)
    curve, resumed = _losses(ref_events), _losses(resumed_events)
    assert sorted(resumed) == [3, 4]
    for step, loss in resumed.items():
        assert loss == pytest.approx(curve[step], rel=1e-5)
    for key, value in _weights(tmp_path / "resumed" / "final").items():
        torch.testing.assert_close(value, one[key], rtol=1e-5, atol=1e-6)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / saving.ADAPTER_WEIGHTS))


def _losses(events) -> dict[int, float]:
    return {e.step: e.loss for e in events if isinstance(e, Progress)}


# ---- analyze ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_analyze_two_processes_write_the_one_process_map(tiny, tmp_path):
    choice, dataset, _ = tiny
    two = tmp_path / "two.json"
    flags = ["--seed", "2", "--runs", "2", "--batches-per-run", "7", "--convergence-patience", "1",
             "--rank", "8", "--rank-min", "4", "--rank-max", "16", "--probe-steps", "3"]
    _, streams, events = _torchrun(tiny, tmp_path, "analyze", "--dataset-dir", str(dataset), "--output", str(two),
                                   "--yes", "--json", *flags)
    _only_rank0_wrote(streams, events)
    assert json.loads(streams[0][0])["saved"] is True

    one = analyze_dataset(AnalysisConfig(dataset, output=tmp_path / "one.json", **ANALYZE), choice, CPU).map
    got = read_map(two)
    assert got.rank_pattern == one.rank_pattern and got.alpha_pattern == one.alpha_pattern
    assert got.convergence == one.convergence and got.total_batches == one.total_batches
    # patience 1 makes both runs converge after batch 3, inside a round of 2: the later batch must be dropped
    assert [r.batches for r in one.convergence.runs] == [3, 3]
    # ... from the need's sums too (process 1's batch 4 is undone before they are added up)
    assert got.extra["need"]["top10_share"] == pytest.approx(one.extra["need"]["top10_share"], rel=1e-4)
    for name, entry in one.extra["need"]["per_module"].items():
        assert got.extra["need"]["per_module"][name]["need"] == pytest.approx(entry["need"], rel=1e-3, abs=1e-12)
    # the default map is sized by the probe, whose work the processes share (same seed, same answer)
    assert got.rank_signal == "probe"
    for name, entry in one.extra["probe"]["per_module"].items():  # equal up to float summation order
        assert got.extra["probe"]["per_module"][name]["score"] == pytest.approx(entry["score"], rel=1e-3, abs=1e-9)
    ours = {m.name: m for m in got.modules}
    for m in one.modules:
        assert ours[m.name].fisher_score == pytest.approx(m.fisher_score, rel=1e-5)
        assert ours[m.name].data_rank == m.data_rank


PROBE_WORKER = """
import json, sys
from pathlib import Path
from sidestep import distributed
from sidestep.analysis.modules import targetable_modules
from sidestep.analysis.probe import ProbeSettings, measure_probe
from sidestep.data import DatasetSpec, scan_dataset
from sidestep.models import find_model, load_model, resolve_runtime
with distributed.session() as ctx:
    loaded = load_model(find_model(Path(sys.argv[1]), "base"), resolve_runtime("cpu", "fp32", False))
    passes = []
    loaded.transformer.register_forward_pre_hook(lambda *_: passes.append(1))
    spec = DatasetSpec.from_model_config(loaded.entry.config)
    files = list(scan_dataset(Path(sys.argv[2]), spec).files)
    result = measure_probe(loaded, targetable_modules(loaded.num_layers), files, spec,
                           ProbeSettings(steps=4, rank=4, lr=1e-2), seed=5)
    print(json.dumps({"rank": ctx.rank, "passes": len(passes), "share": result.share,
                      "before": result.loss_before, "probed": result.loss_probed}))
"""


def test_the_probe_is_split_between_the_processes_and_gives_the_one_process_result(tiny, tmp_path):
    choice, dataset, site = tiny
    script = tmp_path / "probe_worker.py"
    script.write_text(PROBE_WORKER)
    args = [str(script), str(choice.checkpoint_dir), str(dataset)]
    env = _env(site, tmp_path / "unwatched", tmp_path / "events.txt", 60)
    one = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr[-3000:]
    reference = json.loads(one.stdout.strip().splitlines()[-1])
    two = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *args], env=env, capture_output=True,
                         text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    results = sorted((json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")),
                     key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    # each process ran half of the probe's forward passes (training samples, evaluation, attribution), and
    # together all of them: the work is dealt out, not repeated
    assert [r["passes"] for r in results] == [reference["passes"] // 2] * 2, (reference["passes"], results)
    for got in results:  # the same answer on every process, equal to one process's up to summation order
        assert got["before"] == pytest.approx(reference["before"], rel=1e-6)
        assert got["probed"] == pytest.approx(reference["probed"], rel=1e-4)
        for name, share in reference["share"].items():
            assert got["share"][name] == pytest.approx(share, rel=1e-3, abs=1e-9), name
    assert results[0]["share"] == results[1]["share"]


# ---- preprocess -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_preprocess_two_processes_write_each_file_once(tiny, tmp_path):
    choice, _, _ = tiny
    audio = tmp_path / "audio"
    write_audio_clips(audio, [(f"{c}.wav", k, 0.4, 48000, 2) for c, k in zip("abc", ("tone", "chord", "noise"))], seed=1)
    (audio / "d_bad.wav").write_bytes(b"RIFF not audio")
    out = tmp_path / "two"
    _, streams, events = _torchrun(tiny, tmp_path, "preprocess", "--audio-dir", str(audio), "--output", str(out),
                                   "--json")
    assert streams[1] == ("", "")
    summary = json.loads(streams[0][0])
    assert [f["source"] for f in summary["files"]] == ["a.wav", "b.wav", "c.wav", "d_bad.wav"]
    assert (summary["done"], summary["failed"]) == (3, 1)
    placed = [(rank, Path(p).name) for rank, op, p in events if op == "replace" and p.endswith(".pt")]
    assert sorted(name for _, name in placed) == ["a.pt", "b.pt", "c.pt"]  # each written once ...
    assert {name: rank for rank, name in placed} == {"a.pt": "0", "b.pt": "1", "c.pt": "0"}  # ... by its owner

    ref = tmp_path / "one"
    preprocess_audio(PreprocessConfig(audio, ref, choice.checkpoint_dir, runtime=CPU))
    for name in ("a.pt", "b.pt", "c.pt"):
        mine, theirs = torch.load(out / name, weights_only=True), torch.load(ref / name, weights_only=True)
        for key in ("target_latents", "encoder_hidden_states", "context_latents"):
            torch.testing.assert_close(mine[key], theirs[key])


# ---- failure ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_process_stops_the_other_within_the_timeout(tiny, tmp_path):
    """Launched without torchrun (whose agent would kill the survivor itself), so sidestep's own path is tested."""
    choice, dataset, site = tiny
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, timeout = tmp_path / "out", 10
    args = [sys.executable, "-m", "sidestep", "train", "--dataset-dir", str(dataset), "--output-dir", str(out),
            "--checkpoint-dir", str(choice.checkpoint_dir), "--model", "base", "--device", "cpu", "--precision", "fp32",
            "--rank", "4", "--max-steps", "100000", "--save-every", "1"]
    env = _env(site, tmp_path, tmp_path / "events.txt", timeout)
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in (0, 1)]
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in procs[0].stderr], daemon=True).start()
        seen = ""
        while "Checkpoint saved" not in seen:  # mid-run: a checkpoint is written and steps go on
            seen += lines.get(timeout=120)
        procs[1].kill()
        killed = time.monotonic()
        code = procs[0].wait(timeout=timeout + 30)
        waited = time.monotonic() - killed
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    rest = ""
    while not lines.empty():
        rest += lines.get()
    assert code == 1 and waited < timeout + 15, (code, waited)
    errors = [line for line in rest.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: Process 1 of 2: another process stopped or a collective timed out after 10 s; "
                      "nothing half-written was left."], rest
    assert not list(out.rglob("*.partial")) and (out / "checkpoints" / "step-2" / saving.STATE_FILE).is_file()


# ---- in-process: the single-process path and the pure parts ------------------------------------------------


def test_one_process_needs_no_launcher_and_every_helper_is_a_no_op():
    ctx = distributed.current()
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    x = torch.ones(3)
    assert distributed.all_reduce_sum(x) is x and distributed.all_gather_tensor(x).shape == (1, 3)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1} and distributed.all_gather_objects(2) == [2]
    assert distributed.shard([1, 2, 3]) == [1, 2, 3] and distributed.run_on_main(lambda: 7) == 7
    assert distributed.average_gradients([torch.nn.Parameter(torch.ones(2))], 1.5) == (1.5,)
    distributed.barrier()


@pytest.mark.parametrize("env, word", [({"WORLD_SIZE": "two"}, "WORLD_SIZE"), ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK"),
                                       ({"SIDESTEP_DIST_TIMEOUT": "0"}, "SIDESTEP_DIST_TIMEOUT")])
def test_bad_launcher_environment_is_one_sentence(env, word):
    with pytest.raises(ConfigError, match=word) as err:
        distributed.context_from_env(env)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_context_reads_the_launcher_variables_and_shards():
    ctx = distributed.context_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "1", "SIDESTEP_DIST_TIMEOUT": "5"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.timeout_s, ctx.is_main) == (2, 4, 1, 5.0, False)
    assert ctx.device(torch.device("cuda")) == torch.device("cuda", 1) and ctx.device(CPU.device) == CPU.device


def test_processes_times_grad_accum_is_layout_independent(tiny):
    """2 processes × grad-accum 1 and 1 process × grad-accum 2 run the same micro-batches with the same seeds."""
    _, dataset, _ = tiny
    files = tuple(sorted(dataset.glob("*.pt")))
    spec = DatasetSpec(encoder_dim=32)
    single = SampleOrder(files, spec, batch_size=1, seed=5)
    shards = [SampleOrder(files, spec, batch_size=1, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for step in range(6):  # three epochs
        one = {(single.global_micro(2 * step + k), tuple(single.indices(2 * step + k))) for k in (0, 1)}
        two = {(s.global_micro(step), tuple(s.indices(step))) for s in shards}
        assert one == two
    odd = [SampleOrder(files[:3], spec, 1, 5, rank=r, world_size=2) for r in (0, 1)]  # 3 samples: padded to 4
    assert odd[0].micro_per_epoch == odd[1].micro_per_epoch == 2
    assert sorted(set(i for s in odd for m in range(2) for i in s.indices(m))) == [0, 1, 2]
