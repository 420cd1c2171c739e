"""A `model.weights` URI with nothing under it fails first: before any image is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from evaclip import cli
from evaclip.errors import UserError
from evaclip.render import CONFIG_ENV, trainer_config_json
from evaclip.s3server import EmbeddedS3
from evaclip.trainer.context import check_weights

from .conftest import manifest


def test_weights_that_exist_pass(s3: EmbeddedS3, bucket: str, tmp_path: Path) -> None:
    storage = s3.storage(cache_dir=tmp_path / "cache")
    s3.client().put_object(Bucket=bucket, Key="w/tower.pt", Body=b"x")
    s3.client().put_object(Bucket=bucket, Key="hf/model.safetensors", Body=b"x")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "model.safetensors").write_bytes(b"x")
    for uri in (f"s3://{bucket}/w/tower.pt", f"s3://{bucket}/hf", f"s3://{bucket}/hf/",
                str(tmp_path / "local"), str(tmp_path / "local" / "model.safetensors"), None):
        check_weights(storage, uri)


def test_weights_with_nothing_under_them_are_named(s3: EmbeddedS3, bucket: str,
                                                   tmp_path: Path) -> None:
    storage = s3.storage(cache_dir=tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    for uri in (f"s3://{bucket}/nope.pt", f"s3://{bucket}/no/prefix/", str(tmp_path / "empty"),
                str(tmp_path / "missing.pt")):
        with pytest.raises(UserError) as err:
            check_weights(storage, uri)
        assert str(err.value) == f"model.weights: nothing is stored under {uri}; check the URI"


def _images(root: Path) -> None:
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / label / f"{i}.png")


def test_the_trainer_checks_the_weights_before_fetching_data(
        s3: EmbeddedS3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from evaclip.trainer.main import main

    _images(tmp_path / "data")
    s3.storage(cache_dir=tmp_path / "up").upload_tree(tmp_path / "data", f"s3://{bucket}/train")
    doc = manifest(model={"weights": f"s3://{bucket}/weights/nope.pt"},
                   data={"train": f"s3://{bucket}/train"}, output=f"s3://{bucket}/out")
    from evaclip.manifest import parse_resource

    config = tmp_path / "config.json"
    config.write_text(trainer_config_json(parse_resource(doc)))
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setenv("EVACLIP_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("EVACLIP_ERROR_FILE", str(tmp_path / "error.txt"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert main() == 1
    weights = f"s3://{bucket}/weights/nope.pt"
    expected = f"model.weights: nothing is stored under {weights}; check the URI"
    assert (tmp_path / "error.txt").read_text().strip() == expected
    assert capsys.readouterr().err.strip() == f"error: {expected}"
    assert list((tmp_path / "work").rglob("*.png")) == []  # not one image fetched


@pytest.mark.slow
def test_evaclip_run_checks_the_weights_before_starting(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    _images(tmp_path / "data")
    doc = manifest(model={"weights": "s3://evaclip-demo/weights/nope.pt"},
                   data={"train": "s3://evaclip-demo/digits/train"},
                   output="s3://evaclip-demo/runs/weights-check")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(json.loads(json.dumps(doc))))
    rc = cli.main(["run", str(job), "--local", "--workdir", str(tmp_path / "work"),
                   "--stage", f"{tmp_path / 'data'}=s3://evaclip-demo/digits/train"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip().splitlines()[-1] == (
        "error: model.weights: nothing is stored under s3://evaclip-demo/weights/nope.pt; "
        "check the URI")
    assert not (tmp_path / "work" / "config.json").exists()  # torchrun never started
