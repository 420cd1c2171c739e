"""Checkpoints in every published layout load exactly, strictly and memory-mapped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eva_reference import (
    FAMILIES,
    reference_eva,
    to_eva_clip,
    to_hugging_face,
    write_eva_clip_pt,
    write_hf_dir,
    write_remote_code_dir,
)
from safetensors.torch import save_file

from evaclip.errors import UserError
from evaclip.models import build_tower, load_weights, save_weights


def images(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def assert_same_outputs(tower, reference) -> None:
    x = images()
    with torch.no_grad():
        got, want = tower(x), reference(x)
    assert got.shape == (3, 128)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def write_layout(layout: str, name: str, model, tmp: Path) -> tuple[Path, str]:
    if layout == "evaClip":
        return write_eva_clip_pt(model, tmp / "eva_clip.pt"), "auto"
    if layout in ("hf-safetensors", "hf-bin"):
        kind = layout.removeprefix("hf-")
        return write_hf_dir(model, tmp / "hf", kind=kind), "auto"
    if layout == "safetensors":
        sd = {"trunk." + k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(sd, str(tmp / "tower.safetensors"))
        return tmp / "tower.safetensors", "safetensors"
    if layout == "safetensors-visual":
        sd = {k: v.contiguous() for k, v in to_eva_clip(model.state_dict()).items()}
        save_file(sd, str(tmp / "visual.safetensors"))
        return tmp / "visual.safetensors", "auto"
    raise AssertionError(layout)


LAYOUTS = ["evaClip", "hf-safetensors", "hf-bin", "safetensors", "safetensors-visual"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_layout_matches_reference(name: str, layout: str, tmp_path: Path) -> None:
    reference = reference_eva(name)
    path, fmt = write_layout(layout, name, reference, tmp_path)
    tower = build_tower(name)
    load_weights(tower, path, format=fmt)
    assert all(p.dtype == torch.float32 and not p.is_meta for p in tower.parameters())
    assert_same_outputs(tower.eval(), reference)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_weights_round_trip(name: str, tmp_path: Path) -> None:
    first = build_tower(name, device="cpu", seed=3)
    path = save_weights(first, tmp_path / "out" / "tower.safetensors")
    again = build_tower(name)
    load_weights(again, path)
    x = images()
    with torch.no_grad():
        assert torch.equal(first(x), again(x))


def _pt(tmp_path: Path, edit) -> Path:
    sd = to_eva_clip(reference_eva("eva02-clip-e14-tiny").state_dict())
    edit(sd)
    torch.save(sd, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda sd: sd.pop("visual.blocks.2.mlp.fc1.weight"),
         ["1 missing", "blocks.2.mlp.fc1.weight"]),
        (lambda sd: sd.update({"visual.blocks.0.attn.extra_scale": torch.ones(3)}),
         ["1 unexpected", "blocks.0.attn.extra_scale"]),
        (lambda sd: sd.update({"visual.head.weight": torch.zeros(64, 192)}),
         ["1 with wrong shape", "head.weight (64, 192) vs (128, 192)"]),
        (lambda sd: sd.update({"visual.blocks.1.attn.k_bias": torch.ones(192)}),
         ["unexpected", "blocks.1.attn.k_bias"]),
    ],
    ids=["missing", "unexpected", "shape", "nonzero-k-bias"],
)
def test_mismatch_fails_naming_the_key(tmp_path: Path, edit, words) -> None:
    tower = build_tower("eva02-clip-e14-tiny")
    with pytest.raises(UserError) as err:
        load_weights(tower, _pt(tmp_path, edit))
    for word in words:
        assert word in str(err.value)
    assert "\n" not in str(err.value)
    assert all(p.is_meta for p in tower.parameters()), "nothing may be partly loaded"


def test_wrong_preset_names_counts(tmp_path: Path) -> None:
    path = write_eva_clip_pt(reference_eva("eva-clip-18b-tiny"), tmp_path / "x.pt")
    with pytest.raises(UserError, match=r"missing: .*q_bias.*\(\+\d+ more\)"):
        load_weights(build_tower("eva02-clip-e14-tiny"), path)


def _mapped_region_of(path: Path) -> list[tuple[int, int]]:
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path.resolve())):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                spans.append((lo, hi))
    return spans


@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_fp16_stays_fp16_and_is_memory_mapped(kind: str, tmp_path: Path) -> None:
    reference = reference_eva("eva02-clip-e14-tiny")
    sd = {k: v.half().contiguous() for k, v in reference.state_dict().items()}
    path = tmp_path / f"half.{kind}"
    if kind == "pt":
        torch.save({"visual." + k: v for k, v in sd.items()}, path)
    else:
        save_file(sd, str(path))
    tower = build_tower("eva02-clip-e14-tiny")
    load_weights(tower, path)
    assert {p.dtype for p in tower.parameters()} == {torch.float16}
    spans = _mapped_region_of(path)
    assert spans, "the checkpoint file is not mapped"
    for p in tower.parameters():
        assert any(lo <= p.data_ptr() < hi for lo, hi in spans), "parameter was copied"
    with torch.no_grad():
        x = images()
        got = tower(x.half()).float()
        want = reference_eva("eva02-clip-e14-tiny")(x)
    torch.testing.assert_close(got, want, rtol=0, atol=5e-2)


def test_dtype_argument_casts(tmp_path: Path) -> None:
    reference = reference_eva("eva-clip-18b-tiny")
    save_file({k: v.half().contiguous() for k, v in reference.state_dict().items()},
              str(tmp_path / "half.safetensors"))
    tower = build_tower("eva-clip-18b-tiny")
    load_weights(tower, tmp_path / "half.safetensors", dtype=torch.float32)
    assert {p.dtype for p in tower.parameters()} == {torch.float32}


def test_remote_code_only_repo_is_refused(tmp_path: Path) -> None:
    root = write_remote_code_dir(reference_eva("eva-clip-18b-tiny"), tmp_path / "repo")
    tower = build_tower("eva-clip-18b-tiny")
    with pytest.raises(UserError, match="set model.trustRemoteCode: true"):
        load_weights(tower, root)
    assert all(p.is_meta for p in tower.parameters())


def test_remote_code_repo_loads_when_trusted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    reference = reference_eva("eva02-clip-e14-tiny")
    root = write_remote_code_dir(reference, tmp_path / "repo")
    tower = build_tower("eva02-clip-e14-tiny")
    load_weights(tower, root, trust_remote_code=True)
    assert_same_outputs(tower.eval(), reference)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module", "model_ema"])
def test_wrapped_eva_clip_checkpoints(wrapper: str, tmp_path: Path) -> None:
    reference = reference_eva("eva-clip-8b-tiny")
    sd = to_eva_clip(reference.state_dict())
    torch.save({wrapper: sd, "optimizer": {"step": 10}}, tmp_path / "w.bin")
    tower = build_tower("eva-clip-8b-tiny")
    load_weights(tower, tmp_path / "w.bin", format="evaClip")
    assert_same_outputs(tower.eval(), reference)


@pytest.mark.parametrize("single", ["model.safetensors", "pytorch_model.bin"])
def test_hf_single_file_directory(single: str, tmp_path: Path) -> None:
    reference = reference_eva("eva-clip-18b-tiny")
    root = tmp_path / "hf"
    root.mkdir()
    sd = {k: v.contiguous() for k, v in to_hugging_face(reference.state_dict()).items()}
    if single.endswith(".safetensors"):
        save_file(sd, str(root / single))
    else:
        torch.save(sd, root / single)
    tower = build_tower("eva-clip-18b-tiny")
    load_weights(tower, root, format="huggingFace")
    assert_same_outputs(tower.eval(), reference)


class _NotATensor:
    pass


def test_pickles_with_code_and_legacy_files_are_refused(tmp_path: Path) -> None:
    torch.save({"visual.cls_token": torch.zeros(1), "extra": _NotATensor()}, tmp_path / "a.pt")
    with pytest.raises(UserError, match="refused for safety"):
        load_weights(build_tower("eva-clip-18b-tiny"), tmp_path / "a.pt")
    torch.save({"visual.cls_token": torch.zeros(1)}, tmp_path / "b.pt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(UserError, match="legacy torch.save format"):
        load_weights(build_tower("eva-clip-18b-tiny"), tmp_path / "b.pt")


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "none.pt", "does not exist"),
        (lambda d: (d / "w.npz").write_bytes(b"x") and d / "w.npz", "model.format"),
        (lambda d: (d / "w.safetensors").write_bytes(b"garbage") and d / "w.safetensors",
         "not a readable safetensors"),
        (lambda d: (d / "e").mkdir() or d / "e", "has none of"),
    ],
    ids=["missing", "unknown-suffix", "corrupt", "empty-dir"],
)
def test_bad_paths_are_user_errors(tmp_path: Path, setup, message: str) -> None:
    with pytest.raises(UserError, match=message):
        load_weights(build_tower("eva-clip-18b-tiny"), setup(tmp_path))


def test_hf_index_naming_a_missing_shard(tmp_path: Path) -> None:
    root = write_hf_dir(reference_eva("eva-clip-8b-tiny"), tmp_path / "hf")
    (root / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(UserError, match="model-00002-of-00003.safetensors"):
        load_weights(build_tower("eva-clip-8b-tiny"), root)


def test_load_from_s3_through_the_node_cache(tmp_path: Path) -> None:
    """An s3:// Hugging Face prefix and an s3:// .pt object load through Storage's cache."""
    from evaclip.s3server import EmbeddedS3

    reference = reference_eva("eva02-clip-b16-tiny")
    root = write_hf_dir(reference, tmp_path / "hf", kind="safetensors", shards=2)
    pt = write_eva_clip_pt(reference, tmp_path / "eva.pt")
    with EmbeddedS3(buckets=["weights"]) as s3:
        storage = s3.storage(cache_dir=tmp_path / "cache")
        storage.upload_tree(root, "s3://weights/hf/b16")
        storage.upload_file(pt, "s3://weights/eva/b16.pt")
        for uri in ("s3://weights/hf/b16", "s3://weights/eva/b16.pt"):
            tower = build_tower("eva02-clip-b16-tiny")
            load_weights(tower, uri, storage=storage)
            assert_same_outputs(tower.eval(), reference)
        with pytest.raises(UserError, match="model.weights"):
            load_weights(build_tower("eva02-clip-b16-tiny"), "s3://weights/none.pt",
                         storage=storage)
    cached = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(cached) == 2
