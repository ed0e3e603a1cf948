"""fisher_map.json: golden files both ways, validation errors, backups, and the ranks peft actually builds."""

from __future__ import annotations

import dataclasses
import json
import random
from enum import Enum
from pathlib import Path

import pytest

from sidestep.analysis.allocate import RankBudget, allocate_ranks
from sidestep.analysis.fisher_map import (
    MAP_FILENAME,
    Convergence,
    FisherMap,
    InitRef,
    ModuleEntry,
    RunConvergence,
    SampleCoverage,
    TimestepParams,
    ToolInfo,
    concentration_summary,
    concentrations,
    from_json_dict,
    read_map,
    to_json_dict,
    write_map,
)
from sidestep.analysis.fisher_map import _Decoder
from sidestep.analysis.modules import PROJECTIONS, ModuleShape, suffix_of, targetable_modules
from sidestep.analysis.report import concentration_sentence
from sidestep.errors import MapError

GOLDEN = Path(__file__).parent / "golden"
V2 = GOLDEN / "sidestep_v2_fisher_map.json"
V3 = GOLDEN / "sidestep_v3_fisher_map.json"


def v3_map(created_at: str = "2026-01-02T03:04:05+00:00") -> FisherMap:
    """A complete map of ours for a 2-layer model; its JSON is pinned in tests/golden."""
    scores = {name: 1e-7 * (1 + (7 * i) % 22) for i, name in enumerate(targetable_modules(2))}
    chosen = sorted(scores, key=lambda n: -scores[n])[:12]
    alloc = allocate_ranks({n: scores[n] for n in chosen}, {n: ModuleShape(n, 64, 64) for n in chosen}, RankBudget())
    return FisherMap(
        rank_pattern=alloc.ranks,
        alpha_pattern=alloc.alphas,
        modules=tuple(
            ModuleEntry(n, scores[n], scores[n] / 10, effective_rank=40 + i, assigned_rank=alloc.ranks[n], data_rank=5 + i)
            for i, n in enumerate(chosen)
        ),
        excluded_modules=tuple(n for n in scores if n not in alloc.ranks),
        model_variant="base",
        timestep_params=TimestepParams(mu=-0.4, sigma=1.0, data_proportion=0.5),
        num_runs=2,
        batches_per_run=12,
        total_batches=23,
        base_rank=64,
        rank_min=16,
        rank_max=128,
        dataset_hash="0123456789ab",
        sample_coverage=(
            SampleCoverage(0, 2, 3, 2 / 3, ("a.pt", "b.pt")),
            SampleCoverage(1, 2, 3, 2 / 3, ("c.pt", "a.pt")),
        ),
        num_hidden_layers=2,
        created_at=created_at,
        tool=ToolInfo("sidestep", "0.1.0"),
        seed=0,
        rank_signal="fisher",
        budget_mode="median",
        rank_step=8,
        alpha_ratio=2.0,
        trainable_params=alloc.trainable_params,
        flat_equivalent_params=alloc.flat_equivalent_params,
        convergence=Convergence((RunConvergence(0, 12, 0.991, True), RunConvergence(1, 11, 0.985, True)), 0.97),
        low_confidence_modules=(chosen[-1],),
        content_hash="sha256:feedface",
        report="fisher_map.png",
        init=InitRef("fisher_init.safetensors", "ab" * 32, 144, 0),
    )


def _without_created_at(text: str) -> list[str]:
    return [line for line in text.splitlines() if '"created_at"' not in line]


# ---- golden files ---------------------------------------------------------------------------------


def test_v3_golden_is_reproduced_byte_for_byte(tmp_path):
    assert write_map(v3_map(), tmp_path / MAP_FILENAME) is None
    assert (tmp_path / MAP_FILENAME).read_bytes() == V3.read_bytes()


def test_v3_write_differs_only_in_created_at(tmp_path):
    write_map(v3_map(created_at=""), tmp_path)  # a folder means <folder>/fisher_map.json
    written = (tmp_path / MAP_FILENAME).read_text(encoding="utf-8")
    assert _without_created_at(written) == _without_created_at(V3.read_text(encoding="utf-8"))
    assert json.loads(written)["created_at"].endswith("+00:00")


def test_v3_golden_reads_back_equal():
    assert read_map(V3) == v3_map()


def test_v3_layout_matches_the_reference():
    data = json.loads(V3.read_text(encoding="utf-8"))
    assert data["version"] == 3
    assert list(data)[:18] == [
        "version", "model_variant", "timestep_focus", "timestep_range", "timestep_params", "num_runs",
        "batches_per_run", "total_batches", "base_rank", "rank_budget", "dataset_hash", "target_modules",
        "rank_pattern", "alpha_pattern", "modules", "excluded_modules", "sample_coverage", "num_hidden_layers",
    ]  # fmt: skip
    assert all(m["name"].startswith("decoder.layers.") for m in data["modules"])
    assert all(k.startswith("layers.") for k in data["rank_pattern"])
    scores = [m["fisher_score"] for m in data["modules"]]
    assert scores == sorted(scores, reverse=True)
    assert data["target_modules"] == [p for p in PROJECTIONS if any(k.endswith(p) for k in data["rank_pattern"])]
    assert data["rank_budget"] == {"min": 16, "max": 128}
    assert sorted(data["rank_pattern"].values())[len(data["rank_pattern"]) // 2] == 64


def test_reference_v2_map_is_read():
    fmap = read_map(V2)
    assert fmap.version == 2 and fmap.num_hidden_layers == 2 and fmap.model_variant == "base"
    assert fmap.rank_of("layers.1.mlp.down_proj") == 96
    assert fmap.rank_of("decoder.layers.1.mlp.down_proj") == 96
    assert fmap.alpha_of("layers.1.cross_attn.k_proj") == 32
    assert fmap.rank_of("layers.0.mlp.down_proj") is None  # excluded
    assert fmap.modules[0].name == "layers.1.mlp.down_proj" and fmap.modules[0].category == "mlp"
    assert fmap.target_modules == json.loads(V2.read_text(encoding="utf-8"))["target_modules"]
    assert (fmap.rank_min, fmap.rank_max, fmap.base_rank) == (16, 128, 64)
    assert fmap.timestep_params == TimestepParams(-0.4, 1.0, 0.5)
    assert fmap.sample_coverage[1].selected_files == ("song_c.pt", "song_a.pt", "song_d.pt", "song_b.pt")
    # our additions are absent from the reference's map and default to "unknown"
    assert fmap.seed is None and fmap.convergence is None and fmap.init is None and fmap.extra == {}


def test_reference_v2_map_survives_a_rewrite(tmp_path):
    fmap = read_map(V2)
    write_map(fmap, tmp_path / MAP_FILENAME)
    again = read_map(tmp_path / MAP_FILENAME)
    assert again.created_at  # stamped by write_map
    assert again == dataclasses.replace(fmap, version=3, created_at=again.created_at)
    data = json.loads((tmp_path / MAP_FILENAME).read_text(encoding="utf-8"))
    reference = json.loads(V2.read_text(encoding="utf-8"))
    for key in ("rank_pattern", "alpha_pattern", "target_modules", "sample_coverage", "timestep_params"):
        assert data[key] == reference[key], key
    assert [m["name"] for m in data["modules"]] == [m["name"] for m in reference["modules"]]


def test_json_is_independent_of_construction_order():
    fmap = v3_map()
    shuffled = dataclasses.replace(
        fmap,
        rank_pattern=dict(reversed(list(fmap.rank_pattern.items()))),
        alpha_pattern=dict(reversed(list(fmap.alpha_pattern.items()))),
        modules=tuple(reversed(fmap.modules)),
        excluded_modules=tuple(reversed(fmap.excluded_modules)),
    )
    assert json.dumps(to_json_dict(shuffled)) == json.dumps(to_json_dict(fmap))


# ---- writing --------------------------------------------------------------------------------------


def test_overwrite_keeps_a_backup(tmp_path):
    path = tmp_path / MAP_FILENAME
    assert write_map(read_map(V2), path) is None
    first = path.read_bytes()
    backup = write_map(v3_map(), path)
    assert backup == tmp_path / "fisher_map.json.bak"
    assert backup.read_bytes() == first
    assert path.read_bytes() == V3.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fisher_map.json", "fisher_map.json.bak"]


def test_concentration_reads_the_probes_loss_fall_and_tolerates_a_field_without_losses():
    probe = {"top10_share": 0.5, "spread_evenly": False, "loss_before": 0.5, "loss_probed": 0.4,
             "per_module": {"layers.0.mlp.up_proj": {"loss_share": 0.1, "score": 1e-4}}}
    need = {"top10_share": 0.9, "spread_evenly": False,
            "per_module": {"layers.0.mlp.up_proj": {"need": 1.0, "noise": 2.0, "need_per_param": 1e-3}}}
    found = concentrations(dataclasses.replace(v3_map(), extra={"probe": probe, "need": need}))
    assert found["probe"].loss_fall == pytest.approx(0.2) and found["need"].loss_fall is None
    assert concentration_sentence(found["probe"]).startswith("The probe lowered the model's loss on this data by 20.0%.")
    assert "lowered" not in concentration_sentence(found["need"])
    for broken in ({"loss_before": 0.0}, {"loss_probed": "nan"}, {"loss_before": None}):
        c = concentration_summary(dataclasses.replace(v3_map(), extra={"probe": probe | broken}))
        assert c is not None and c.top10_share == 0.5 and c.loss_fall is None, broken
    without = {k: v for k, v in probe.items() if not k.startswith("loss_")}  # a probe field with no losses: no fall
    assert concentration_summary(dataclasses.replace(v3_map(), extra={"probe": without})).loss_fall is None


def test_unknown_fields_are_kept_aside_and_written_back(tmp_path):
    data = json.loads(V2.read_text(encoding="utf-8"))
    data["future_field"] = {"x": [1, 2]}
    data["modules"][0]["future_entry_field"] = 1
    fmap = from_json_dict(data, Path("m.json"))
    assert fmap.extra == {"future_field": {"x": [1, 2]}}
    assert to_json_dict(fmap)["future_field"] == {"x": [1, 2]}
    assert list(to_json_dict(fmap))[-1] == "future_field"


# ---- malformed maps -------------------------------------------------------------------------------


def _v2() -> dict:
    return json.loads(V2.read_text(encoding="utf-8"))


def _edit(fn):
    def make() -> str:
        data = _v2()
        fn(data)
        return json.dumps(data)

    return make


def _set(path: str, value):
    def fn(data):
        *parents, last = path.split("/")
        for key in parents:
            data = data[int(key)] if isinstance(data, list) else data[key]
        data[int(last) if isinstance(data, list) else last] = value

    return _edit(fn)


def _drop(key: str):
    return _edit(lambda data: data.pop(key))


BAD_MAPS = [
    ("not json", lambda: "{not json", "not valid JSON"),
    ("not utf-8", lambda: b"\xff\xfe{}", "cannot be read"),
    ("empty", lambda: "", "not valid JSON"),
    ("a list", lambda: "[1, 2]", "JSON list, not an object"),
    ("no target_modules", _drop("target_modules"), "'target_modules'"),
    ("no rank_pattern", _drop("rank_pattern"), "'rank_pattern'"),
    ("no alpha_pattern", _drop("alpha_pattern"), "'alpha_pattern'"),
    ("rank_pattern a list", _set("rank_pattern", [1]), "'rank_pattern' must be an object"),
    ("target_modules a string", _set("target_modules", "q_proj"), "'target_modules' must be a list"),
    ("target not a module", _set("target_modules/0", "to_q"), "'target_modules[0]' holds 'to_q'"),
    ("version 4", _set("version", 4), "version 4"),
    ("version 0", _set("version", 0), "version 0"),
    ("version a string", _set("version", "2"), "'version' must be an integer"),
    ("rank zero", _set("rank_pattern/layers.1.mlp.down_proj", 0), "not a positive integer"),
    ("rank negative", _set("rank_pattern/layers.1.mlp.down_proj", -8), "not a positive integer"),
    ("rank fractional", _set("rank_pattern/layers.1.mlp.down_proj", 16.5), "not a positive integer"),
    ("rank a string", _set("rank_pattern/layers.1.mlp.down_proj", "16"), "not a positive integer"),
    ("rank a bool", _set("rank_pattern/layers.1.mlp.down_proj", True), "not a positive integer"),
    ("alpha zero", _set("alpha_pattern/layers.1.mlp.down_proj", 0), "not a positive number"),
    ("alpha key missing", _edit(lambda d: d["alpha_pattern"].pop("layers.1.mlp.down_proj")), "different modules"),
    ("bad module key", _set("rank_pattern/layers.0.attn.q", 8), "'layers.0.attn.q'"),
    ("num_runs a string", _set("num_runs", "2"), "'num_runs' must be an integer"),
    ("timestep_range short", _set("timestep_range", [0.0]), "'timestep_range' must be two numbers"),
    ("rank_budget min", _set("rank_budget/min", "16"), "'rank_budget.min'"),
    ("timestep_params partial", _edit(lambda d: d["timestep_params"].pop("sigma")), "lacks 'sigma'"),
    ("module not an object", _set("modules/0", "decoder.layers.0.mlp.up_proj"), "'modules[0]' must be an object"),
    ("module score a string", _set("modules/0/fisher_score", "big"), "fisher_score"),
    ("coverage run missing", _edit(lambda d: d["sample_coverage"][0].pop("run")), "lacks 'run'"),
    ("coverage files not strings", _set("sample_coverage/0/selected_files", [1]), "selected_files"),
]


@pytest.mark.parametrize("label, content, expected", BAD_MAPS, ids=[c[0] for c in BAD_MAPS])
def test_malformed_map_is_one_sentence_naming_the_file(tmp_path, label, content, expected):
    path = tmp_path / MAP_FILENAME
    text = content()
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    with pytest.raises(MapError) as info:
        read_map(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert message.endswith("; delete it or pass --ignore-fisher-map.")
    assert "\n" not in message


NESTED_BAD = [
    ("convergence/runs/1/batches", "many", "'convergence.runs[1].batches' must be an integer, not 'many'"),
    ("convergence/runs/0/final_spearman", [0.9], "'convergence.runs[0].final_spearman' must be a number, not [0.9]"),
    ("tool/version", 1, "'tool.version' must be a string, not 1"),
    ("init/k", "4", "'init.k' must be an integer, not '4'"),
    ("init/file", "../x.safetensors", "'init.file' holds '../x.safetensors', not a file name beside the map"),
    ("modules/2/data_rank", 1.5, "'modules[2].data_rank' must be an integer, not 1.5"),
    ("timestep_params/mu", 10**400, "'timestep_params.mu' must be a number"),
]


@pytest.mark.parametrize("path, value, expected", NESTED_BAD, ids=[c[0] for c in NESTED_BAD])
def test_a_wrong_type_deep_in_the_map_names_its_field_path(path, value, expected):
    data = _v2()
    data["convergence"] = {"runs": [{"run": 0, "batches": 12, "final_spearman": 0.99}, {"run": 1, "batches": 11}]}
    data["tool"] = {"name": "sidestep", "version": "0.1.0"}
    data["init"] = {"file": "fisher_init.safetensors", "sha256": "ab" * 32, "k": 4, "seed": 0}
    assert from_json_dict(data, Path("m.json")).convergence.runs[1].batches == 11  # the valid form reads
    *parents, last = path.split("/")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(last) if isinstance(node, list) else last] = value
    with pytest.raises(MapError) as info:
        from_json_dict(data, Path("m.json"))
    message = str(info.value)
    assert message.startswith(f"m.json: {expected}") and message.endswith("; delete it or pass --ignore-fisher-map.")
    assert "\n" not in message


class _Focus(str, Enum):
    TEXTURE = "texture"


@dataclasses.dataclass(frozen=True)
class _Span:
    focus: _Focus
    bounds: tuple[float, float]
    named: dict[str, TimestepParams] = dataclasses.field(default_factory=dict)


def test_the_reader_follows_the_field_types_of_any_record():
    """Enums, fixed tuples and dicts of records read by their type hints alone (the map's future fields)."""
    read = _Decoder(Path("m.json")).value
    span = read({"focus": "texture", "bounds": [0, 1], "named": {"a": {"mu": 0, "sigma": 1, "data_proportion": 0.5}}},
                _Span, "span")
    assert span == _Span(_Focus.TEXTURE, (0.0, 1.0), {"a": TimestepParams(0.0, 1.0, 0.5)})
    with pytest.raises(MapError, match=r"'span.focus' must be one of 'texture', not 'loud'"):
        read({"focus": "loud", "bounds": [0, 1]}, _Span, "span")
    with pytest.raises(MapError, match=r"'span.named\[a\]' lacks 'sigma'"):
        read({"focus": "texture", "bounds": [0, 1], "named": {"a": {"mu": 0, "data_proportion": 0}}}, _Span, "span")


def test_missing_map_says_how_to_make_one(tmp_path):
    with pytest.raises(MapError, match="no such file; run `sidestep analyze` first"):
        read_map(tmp_path / MAP_FILENAME)


def test_version_1_without_version_field_is_accepted():
    data = _v2()
    del data["version"]
    assert from_json_dict(data, Path("old.json")).version == 1


# ---- peft sees the map's ranks --------------------------------------------------------------------

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")


class _Group(torch.nn.Module):
    def __init__(self, names: list[str]) -> None:
        super().__init__()
        for name in names:
            self.add_module(name, torch.nn.Linear(4, 4, bias=False))


class _Layer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for group in ("self_attn", "cross_attn", "mlp"):
            self.add_module(group, _Group([p.split(".")[1] for p in PROJECTIONS if p.startswith(group + ".")]))


class _TinyDit(torch.nn.Module):
    """ORIGINAL names (`layers.N.self_attn.q_proj`, ...) on 4×4 Linears: only the naming matters here."""

    def __init__(self, num_layers: int = 24) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer() for _ in range(num_layers))


def _peft_map() -> FisherMap:
    """24 layers, ranks chosen so that layers 1/11 and 2/21 differ in every projection."""
    names = targetable_modules(24)
    ranks = {n: 8 * (1 + (int(n.split(".")[1]) * 11 + PROJECTIONS.index(suffix_of(n))) % 16) for n in names}
    rng = random.Random(0)
    excluded = sorted(rng.sample([n for n in names if n.split(".")[1] not in ("1", "11", "2", "21")], 60))
    ranks = {n: r for n, r in ranks.items() if n not in excluded}
    return from_json_dict(
        to_json_dict(FisherMap(ranks, {n: 2 * r for n, r in ranks.items()}, excluded_modules=tuple(excluded))), Path("m")
    )


def _assert_adapted_as_mapped(model: torch.nn.Module, fmap: FisherMap) -> None:
    seen = set()
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        seen.add(name)
        rank = fmap.rank_of(name)
        assert module.lora_A["default"].weight.shape[0] == rank, name
        assert module.lora_B["default"].weight.shape[1] == rank, name
        assert module.scaling["default"] == pytest.approx(fmap.alpha_of(name) / rank), name
    assert seen == set(fmap.rank_pattern)


def test_map_ranks_reach_peft_with_full_names():
    fmap = _peft_map()
    for a, b in (("1", "11"), ("2", "21")):
        for p in PROJECTIONS:
            assert fmap.rank_of(f"layers.{a}.{p}") != fmap.rank_of(f"layers.{b}.{p}")
    config = peft.LoraConfig(
        r=64, lora_alpha=128, target_modules=fmap.adapted_modules,
        rank_pattern=fmap.rank_pattern, alpha_pattern=fmap.alpha_pattern,
    )  # fmt: skip
    _assert_adapted_as_mapped(peft.inject_adapter_in_model(config, _TinyDit()), fmap)


def test_map_ranks_reach_peft_with_suffixes_and_exclusions():
    fmap = _peft_map()
    config = peft.LoraConfig(
        r=64, lora_alpha=128, target_modules=fmap.target_modules, exclude_modules=list(fmap.excluded_modules),
        rank_pattern=fmap.rank_pattern, alpha_pattern=fmap.alpha_pattern,
    )  # fmt: skip
    _assert_adapted_as_mapped(peft.inject_adapter_in_model(config, _TinyDit()), fmap)


def test_preview_of_a_probe_map_shows_what_set_its_ranks(capsys):
    from sidestep.analysis.report import build_preview
    from sidestep.display.analysis import print_preview

    fisher_map = v3_map()
    adapted = sorted(fisher_map.rank_pattern)
    left_out = fisher_map.excluded_modules[0]
    shares = {adapted[0]: 0.03, adapted[1]: 0.05, left_out: 0.06, adapted[2]: -0.01}  # of a fall of 0.1
    probe = {"top10_share": 0.5, "spread_evenly": False, "loss_before": 0.5, "loss_probed": 0.4,
             "per_module": {n: {"loss_share": v, "score": 1e-4} for n, v in shares.items()}}
    probe_map = dataclasses.replace(fisher_map, rank_signal="probe", extra={"probe": probe})
    preview = build_preview(probe_map)
    assert preview.probe_set_ranks and preview.ranked_by == "the probe's loss fall"
    assert [m.name for m in preview.top] == [left_out, adapted[1], adapted[0], adapted[2]]
    assert [m.share for m in preview.top] == pytest.approx([0.6, 0.5, 0.3, -0.1])
    assert preview.top[0].rank is None and preview.top[1].rank == fisher_map.rank_pattern[adapted[1]]
    print_preview(preview)
    err = " ".join(capsys.readouterr().err.split())
    assert "Top 4 modules by their share of the probe's loss fall" in err and "60.0%" in err
    assert "Fisher runs (the probe set the ranks" in err and "low-confidence" not in err

    # The same field on a map that Fisher sized, or a probe field from before the path attribution (no
    # loss_share): the Fisher scores set the ranks, and the preview says so with its warnings.
    old = {**probe, "per_module": {n: {"loss_rise": v, "score": 1e-4} for n, v in shares.items()}}
    for other in (dataclasses.replace(probe_map, rank_signal="fisher"), dataclasses.replace(probe_map, extra={"probe": old})):
        preview = build_preview(other)
        assert not preview.probe_set_ranks and preview.top[0].fisher == max(m.fisher_score for m in fisher_map.modules)
        print_preview(preview)
        err = " ".join(capsys.readouterr().err.split())
        assert "Top 5 modules by Fisher score" in err and "Convergence: run 0" in err and "1 low-confidence" in err


def test_a_need_maps_top_modules_are_ranked_by_their_share_of_the_need():
    from sidestep.analysis.report import build_preview

    fisher_map = v3_map()
    names = sorted(fisher_map.rank_pattern)[:3]
    need = {"top10_share": 0.5, "spread_evenly": False,
            "per_module": {n: {"need": v, "noise": 1.0, "need_per_param": v} for n, v in zip(names, (1.0, 3.0, -2.0))}}
    preview = build_preview(dataclasses.replace(fisher_map, rank_signal="need", extra={"need": need}))
    assert preview.ranked_by == "the need" and not preview.probe_set_ranks  # the sketches set it: warnings stay
    assert [(m.name, m.share) for m in preview.top] == [(names[1], 0.75), (names[0], 0.25), (names[2], 0.0)]
