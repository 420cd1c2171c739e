"""Checkpoint publishing, keep-last-K and resume selection on real storage (local and S3)."""

from __future__ import annotations

import json
from pathlib import Path

from evaclip.storage import Storage
from evaclip.trainer.checkpointing import COMPLETE, CheckpointManager, tag_for


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
