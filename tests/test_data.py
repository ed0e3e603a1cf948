import hashlib
import pytest
import torch
from safetensors.torch import save_file

from sidestep.data import DatasetSpec, collate, content_hash, dataset_hash, load_sample, scan_dataset
from sidestep.errors import DatasetError


def _edit(folder, name, change):
    path = folder / name
    sample = torch.load(path, weights_only=True)
    change(sample)
    torch.save(sample, path)


def _drop(key):
    return lambda s: s.pop(key)


def _poison(key):
    return lambda s: s[key].view(-1).__setitem__(3, float("nan"))


def _set(key, value):
    return lambda s: s.__setitem__(key, value)


BAD_SAMPLES = [
    ("missing target_latents", _drop("target_latents"), "missing key 'target_latents'"),
    ("staging file", _drop("encoder_hidden_states"), "staging"),
    ("nan latents", _poison("target_latents"), "NaN or Inf"),
    ("inf context", lambda s: s["context_latents"].view(-1).__setitem__(0, float("inf")), "NaN or Inf"),
    ("latent width 65", _set("target_latents", torch.zeros(50, 65)), "65 wide, expected 64"),
    ("context width", _set("context_latents", torch.zeros(50, 64)), "'context_latents' is 64 wide"),
    ("rank 3", _set("target_latents", torch.zeros(1, 50, 64)), "expected 2 dimensions"),
    ("int latents", _set("encoder_hidden_states", torch.zeros(24, 64, dtype=torch.int64)), "floating-point"),
    ("length mismatch", _set("context_latents", torch.zeros(3, 128)), "lengths differ"),
    ("encoder mask rows", _set("encoder_attention_mask", torch.ones(5, dtype=torch.bool)), "encoder_attention_mask 5"),
    ("not a tensor", _set("attention_mask", [1, 1, 1]), "not a tensor"),
]


@pytest.mark.parametrize("label, corrupt, message", BAD_SAMPLES, ids=[c[0] for c in BAD_SAMPLES])
def test_bad_sample_is_one_sentence_naming_the_file(dataset_dir, label, corrupt, message):
    _edit(dataset_dir, "song_03.pt", corrupt)
    with pytest.raises(DatasetError) as err:
        scan_dataset(dataset_dir)
    text = str(err.value)
    assert text.startswith("song_03.pt: ") and message in text and "\n" not in text


def test_corrupt_and_non_dict_files(dataset_dir):
    (dataset_dir / "song_01.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(DatasetError, match=r"^song_01\.pt: cannot read this \.pt file"):
        scan_dataset(dataset_dir)
    torch.save(torch.zeros(3), dataset_dir / "song_01.pt")
    with pytest.raises(DatasetError, match=r"^song_01\.pt: expected a dict of tensors, found Tensor"):
        scan_dataset(dataset_dir)


def test_truncated_file(dataset_dir):
    path = dataset_dir / "song_02.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError, match=r"^song_02\.pt: cannot read"):
        scan_dataset(dataset_dir)


def test_pickled_code_is_refused(dataset_dir):
    # weights_only=True: a .pt that would run code on load is rejected, not executed
    import fractions
    torch.save({"x": fractions.Fraction(1, 3)}, dataset_dir / "song_04.pt")
    with pytest.raises(DatasetError, match=r"^song_04\.pt: cannot read"):
        scan_dataset(dataset_dir)


def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="has no .pt files"):
        scan_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_skip_bad_reports_and_continues(dataset_dir):
    _edit(dataset_dir, "song_00.pt", _poison("target_latents"))
    (dataset_dir / "song_05.pt").write_bytes(b"junk")
    scan = scan_dataset(dataset_dir, skip_bad=True)
    assert [p.name for p in scan.files] == ["song_01.pt", "song_02.pt", "song_03.pt", "song_04.pt"]
    assert len(scan.problems) == 2 and scan.problems[0].startswith("song_00.pt")


def test_encoder_width_must_match_model_and_be_consistent(dataset_dir):
    with pytest.raises(DatasetError, match="the model expects 2048"):
        scan_dataset(dataset_dir, DatasetSpec(encoder_dim=2048))
    _edit(dataset_dir, "song_02.pt", _set("encoder_hidden_states", torch.zeros(24, 32)))
    with pytest.raises(DatasetError, match="32 wide but song_00.pt is 64"):
        scan_dataset(dataset_dir)


def test_extra_keys_and_metadata_kept(dataset_dir):
    _edit(dataset_dir, "song_00.pt", _set("lyric_token_ids", torch.arange(4)))
    sample = load_sample(dataset_dir / "song_00.pt")
    assert torch.equal(sample.extra["lyric_token_ids"], torch.arange(4))
    assert sample.metadata["caption"] == "synthetic song 0"


def test_safetensors_twin_is_accepted(dataset_dir):
    sample = torch.load(dataset_dir / "song_00.pt", weights_only=True)
    meta = sample.pop("metadata")
    (dataset_dir / "song_00.pt").unlink()
    import json
    save_file({k: v.contiguous() for k, v in sample.items()}, str(dataset_dir / "song_00.safetensors"),
              metadata={"metadata": json.dumps(meta)})
    scan = scan_dataset(dataset_dir)
    assert scan.files[0].name == "song_00.safetensors"
    assert load_sample(scan.files[0]).metadata["caption"] == "synthetic song 0"


def test_interrupted_tmp_files_are_ignored(dataset_dir):
    (dataset_dir / "song_99.tmp.pt").write_bytes(b"partial")
    assert len(scan_dataset(dataset_dir).files) == 6


def test_dataset_hash_matches_reference_definition(dataset_dir):
    files = sorted(dataset_dir.glob("*.pt"))
    text = "|".join(f"{p.name}:{p.stat().st_size}" for p in files)
    assert dataset_hash(dataset_dir) == hashlib.md5(text.encode()).hexdigest()[:12]
    before = content_hash(files)
    _edit(dataset_dir, "song_01.pt", lambda s: s["target_latents"].mul_(2))
    assert content_hash(files) != before


def test_collate_pads_and_stacks(dataset_dir):
    samples = [load_sample(p) for p in sorted(dataset_dir.glob("*.pt"))[:3]]
    batch = collate(samples)
    t_max = max(s.length for s in samples)
    assert batch.target_latents.shape == (3, t_max, 64) and batch.context_latents.shape == (3, t_max, 128)
    assert batch.attention_mask.sum(dim=1).tolist() == [s.length for s in samples]
    assert batch.encoder_attention_mask.dtype == torch.bool
