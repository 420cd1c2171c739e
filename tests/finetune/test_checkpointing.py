"""Checkpoint publishing, keep-last-K and resume selection on real storage (local and S3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evaclip.errors import UserError
from evaclip.spec import EvaClipFinetune
from evaclip.storage import Storage
from evaclip.trainer.checkpointing import COMPLETE, CheckpointManager, job_settings, tag_for


class FileWritingEngine:
    """Writes and reads checkpoint files the way DeepSpeed's engine does, in one process."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, str]] = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest,
                        exclude_frozen_parameters):
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mp_rank_00_model_states.pt").write_text(json.dumps(client_state))
        (folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * 64)

    def load_checkpoint(self, load_dir, tag, load_module_strict):
        state = json.loads((Path(load_dir) / tag / "mp_rank_00_model_states.pt").read_text())
        self.loaded.append((load_dir, tag))
        return str(Path(load_dir) / tag), state


def _manager(tmp_path, output, keep_last=2) -> CheckpointManager:
    return CheckpointManager(Storage(), output, tmp_path / "work", keep_last=keep_last,
                             barrier=lambda: None)


def test_keeps_last_k_and_marks_complete_last(tmp_path) -> None:
    output = str(tmp_path / "out")
    manager = _manager(tmp_path, output)
    engine = FileWritingEngine()
    for step in (10, 20, 30):
        manager.save(engine, step, {"step": step, "epoch": 0})
    assert manager.complete_steps() == [20, 30]
    folder = Path(output) / "checkpoints" / tag_for(30)
    assert sorted(p.name for p in folder.iterdir()) == [
        COMPLETE, "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    ]
    assert not (Path(output) / "checkpoints" / tag_for(10)).exists()
    # The local copy is gone once published.
    assert not (tmp_path / "work" / tag_for(30)).exists()


def test_incomplete_checkpoint_is_ignored_and_later_pruned(tmp_path) -> None:
    output = str(tmp_path / "out")
    manager = _manager(tmp_path, output)
    engine = FileWritingEngine()
    manager.save(engine, 10, {"step": 10, "epoch": 0})
    # A save killed before COMPLETE: files present, marker missing, newer step.
    broken = Path(output) / "checkpoints" / tag_for(15)
    broken.mkdir(parents=True)
    (broken / "mp_rank_00_model_states.pt").write_text(json.dumps({"step": 15}))
    assert manager.latest() == 10
    state = manager.restore(engine)
    assert state["step"] == 10 and engine.loaded[-1][1] == tag_for(10)
    manager.save(engine, 20, {"step": 20, "epoch": 1})
    assert not broken.exists()
    assert manager.complete_steps() == [10, 20]


def test_no_checkpoint_restores_nothing(tmp_path) -> None:
    manager = _manager(tmp_path, str(tmp_path / "out"))
    assert manager.latest() is None
    assert manager.restore(FileWritingEngine()) is None


def test_round_trip_through_s3(tmp_path, s3_storage) -> None:
    storage, bucket_uri = s3_storage
    manager = CheckpointManager(storage, f"{bucket_uri}/job", tmp_path / "work", keep_last=1,
                                barrier=lambda: None)
    engine = FileWritingEngine()
    manager.save(engine, 5, {"step": 5, "epoch": 0, "batch_in_epoch": 3})
    manager.save(engine, 7, {"step": 7, "epoch": 0, "batch_in_epoch": 5})
    assert manager.complete_steps() == [7]
    keys = [o.relpath for o in storage.list(f"{bucket_uri}/job/checkpoints")]
    assert all(k.startswith(tag_for(7)) for k in keys) and f"{tag_for(7)}/{COMPLETE}" in keys
    state = manager.restore(engine)
    assert state == {"step": 7, "epoch": 0, "batch_in_epoch": 5}


# --- the job fingerprint: a checkpoint is resumed only by the job that wrote it -----------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _job_manager(tmp_path, output, spec, world_size=2) -> CheckpointManager:
    return CheckpointManager(Storage(), output, tmp_path / "work", keep_last=2,
                             job=job_settings(spec, world_size), barrier=lambda: None)


def _spec(example: str, **changes):
    """The spec of an example manifest with `changes` ({"training.learningRate": ...})."""
    raw = yaml.safe_load((EXAMPLES / example).read_text())
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = raw["spec"]
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return EvaClipFinetune.model_validate(raw).spec


def test_same_job_resumes_its_own_checkpoint_again_and_again(tmp_path) -> None:
    output = str(tmp_path / "out")
    spec = _spec("digits-lora.yaml")
    engine = FileWritingEngine()
    _job_manager(tmp_path, output, spec).save(engine, 12, {"step": 12, "epoch": 1})
    # A rerun of the same spec (after a finished run, say) keeps resuming, as often as
    # it is run; settings that do not change the math may differ.
    same = _spec("digits-lora.yaml", suspend=False, **{
        "checkpoint.everySteps": 3, "data.numWorkers": 0, "resources.gpuMemoryGib": 40})
    for _ in range(2):
        manager = _job_manager(tmp_path, output, same)
        assert manager.check_job() == 12
        assert manager.restore(engine)["step"] == 12


@pytest.mark.parametrize("changes", [
    {"training.learningRate": 0.5},
    {"data.train": "s3://other-bucket/train/"},
    {"method.lora.rank": 4},
    {"deepspeed.zeroStage": 3},
    {"model.precision": "bf16"},
])
def test_checkpoint_of_a_different_job_is_refused_naming_output(tmp_path, changes) -> None:
    output = str(tmp_path / "out")
    engine = FileWritingEngine()
    _job_manager(tmp_path, output, _spec("digits-lora.yaml")).save(engine, 12, {"step": 12})
    other = _job_manager(tmp_path, output, _spec("digits-lora.yaml", **changes))
    with pytest.raises(UserError) as err:
        other.restore(engine)
    message = str(err.value)
    assert "\n" not in message and message.startswith("spec.output: ")
    assert "holds checkpoints of a different job" in message
    assert next(iter(changes)).split(".")[-1] in message  # names what differs
    assert "new URI" in message and f"{output}/checkpoints/" in message
    assert engine.loaded == []  # refused before anything was loaded


def test_other_method_and_world_size_are_different_jobs(tmp_path) -> None:
    output = str(tmp_path / "out")
    engine = FileWritingEngine()
    _job_manager(tmp_path, output, _spec("digits-lora.yaml")).save(engine, 5, {"step": 5})
    for manager in (_job_manager(tmp_path, output, _spec("digits-partial.yaml")),
                    _job_manager(tmp_path, output, _spec("digits-lora.yaml"), world_size=4)):
        with pytest.raises(UserError, match="holds checkpoints of a different job"):
            manager.check_job()


def test_checkpoint_without_a_fingerprint_is_refused(tmp_path) -> None:
    output = str(tmp_path / "out")
    engine = FileWritingEngine()
    _manager(tmp_path, output).save(engine, 5, {"step": 5})  # records no job settings
    with pytest.raises(UserError, match=r"^spec\.output: .*different job.*do not record"):
        _job_manager(tmp_path, output, _spec("digits-lora.yaml")).check_job()
