"""Stopping `evaclip run --local`: Ctrl-C or SIGTERM ends every process, publishes nothing.

The end-to-end cases run a small 2-process linear probe, stop it the way a user would and
check that no process of the run survives, no manifest appears and the terminal shows one
line. `supervise` itself is checked with small Python processes that behave like
torchrun and its workers (own sessions, slow or deaf to signals).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from evaclip.storage import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "digits-linear-probe.yaml"


def _images(root: Path) -> None:
    from PIL import Image

    for label in range(3):
        folder = root / str(label)
        folder.mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (80 * label, 20 * i, 0)).save(folder / f"{i}.png")


def _job(tmp_path: Path) -> Path:
    doc = yaml.safe_load(EXAMPLE.read_text())
    _images(tmp_path / "data")
    doc["metadata"]["name"] = "interrupt-me"
    doc["spec"]["data"] = {"train": str(tmp_path / "data"),
                           "validation": str(tmp_path / "data"), "numWorkers": 0}
    doc["spec"]["training"]["epochs"] = 10_000  # the head trains well past the signal
    doc["spec"]["output"] = str(tmp_path / "out")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _workers(run: psutil.Process) -> list[psutil.Process]:
    return [p for p in run.children(recursive=True)
            if "evaclip.trainer.main" in p.cmdline() and "torch.distributed.run" not in p.cmdline()]


@pytest.mark.slow
def test_sigint_to_evaclip_run_leaves_no_process_and_no_manifest(tmp_path: Path) -> None:
    # A Ctrl-C on a terminal is the same case: torchrun and its workers run in sessions
    # of their own, so of the run only `evaclip run` gets the terminal's SIGINT.
    job = _job(tmp_path)
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(stdout, "w") as out, open(stderr, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "evaclip.cli", "run", str(job), "--local", "--nproc", "2",
             "--workdir", str(tmp_path / "work")],
            cwd=tmp_path, stdout=out, stderr=err, env=env, start_new_session=True)
    run = psutil.Process(proc.pid)
    try:
        deadline = time.monotonic() + 120
        while "Joined a gloo process group" not in stdout.read_text():
            assert proc.poll() is None, stdout.read_text() + stderr.read_text()
            assert time.monotonic() < deadline, stdout.read_text()
            time.sleep(0.2)
        everything = run.children(recursive=True)
        assert len(_workers(run)) == 2
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    gone, alive = psutil.wait_procs(everything, timeout=5)
    assert not alive, [p.cmdline() for p in alive]
    assert rc == 130
    printed = stderr.read_text()
    assert printed.strip() == "interrupted", printed
    assert "Traceback" not in stdout.read_text() + printed
    assert "KeyboardInterrupt" not in stdout.read_text() + printed
    time.sleep(1)  # an orphaned rank would publish now
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    # The ranks end without a traceback. Whether they also log "Stopped by SIGINT" depends
    # on whether the signal reached them before or after torchrun's own shutdown, a race
    # on a loaded machine, so the test does not require that line.
    log = (tmp_path / "work" / "torchrun.log").read_text()
    assert "[rank1]: Traceback" not in log and "[rank0]: Traceback" not in log


# --- supervise(): the process tree of torchrun, without torch -------------------------------

TREE = """
import os, signal, subprocess, sys, time
deaf = sys.argv[1] == "deaf"
child = [sys.executable, "-c", "import signal, time\\n"
         + ("signal.signal(signal.SIGINT, signal.SIG_IGN)\\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n" if deaf else "")
         + "time.sleep(600)"]
kids = [subprocess.Popen(child, start_new_session=True) for _ in range(2)]
print(" ".join(str(k.pid) for k in kids), flush=True)
def stop(signum, frame):
    for k in kids:
        k.send_signal(signum)
    sys.exit(1 if deaf else 0)  # deaf: leave the children behind, as a crashed torchrun would
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _start_tree(tmp_path: Path, mode: str, sig: int, grace: float) -> tuple[list[int], Any]:
    import threading

    from evaclip.trainer.launch import supervise

    pids = tmp_path / "pids.txt"
    result: dict[str, Any] = {}

    def run() -> None:
        with open(pids, "w") as out:
            result["value"] = supervise([sys.executable, "-c", TREE, mode], os.environ,
                                        stdout=out, grace=grace, poll=0.1)

    # supervise() takes the signals only in the main thread: send this process the
    # signal from a helper thread instead, once the tree is up.
    def fire() -> None:
        deadline = time.monotonic() + 20
        while not pids.exists() or len(pids.read_text().split()) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # one poll of supervise() has seen the children
        os.kill(os.getpid(), sig)

    threading.Thread(target=fire, daemon=True).start()
    run()
    return [int(p) for p in pids.read_text().split()], result["value"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_is_forwarded_and_the_workers_end(tmp_path: Path, sig: int) -> None:
    children, (rc, interrupted) = _start_tree(tmp_path, "polite", sig, grace=30)
    assert interrupted and rc == 0
    assert not [pid for pid in children if _alive(pid)]


def test_workers_deaf_to_signals_are_killed_after_the_grace_period(tmp_path: Path) -> None:
    started = time.monotonic()
    children, (rc, interrupted) = _start_tree(tmp_path, "deaf", signal.SIGTERM, grace=1)
    assert interrupted and rc == 1
    assert time.monotonic() - started < 15
    # Their parent left them behind; supervise() still ended them.
    assert not [pid for pid in children if _alive(pid)]


# --- what the user is told ---------------------------------------------------------------


def test_the_message_names_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    from evaclip.manifest import parse_resource
    from evaclip.storage import Storage
    from evaclip.trainer.checkpointing import COMPLETE
    from evaclip.trainer.launch import _resume_hint

    from .conftest import manifest

    out = tmp_path / "out"
    resource = parse_resource(manifest(method={"type": "lora"}, output=str(out)))
    storage = Storage(cache_dir=tmp_path / "cache")
    assert _resume_hint(resource, storage, tmp_path / "work") == ""  # nothing saved yet
    for step, complete in ((10, True), (20, True), (30, False)):  # 30: cut short
        folder = out / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / "engine.pt").write_bytes(b"x")
        if complete:
            (folder / COMPLETE).write_text("{}")
    assert _resume_hint(resource, storage, tmp_path / "work") == (
        f"the same command resumes from checkpoint {out}/checkpoints/step-00000020 (step 20)")


def test_cli_prints_interrupted_and_the_hint_and_exits_130(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from evaclip import cli
    from evaclip.trainer import launch

    def stopped(*args: object, **kwargs: object) -> dict:
        raise launch.RunInterrupted("the same command resumes from checkpoint X (step 20)")

    monkeypatch.setattr(launch, "run_local", stopped)
    assert cli.main(["run", "job.yaml", "--local"]) == 130
    assert capsys.readouterr().err == (
        "interrupted; the same command resumes from checkpoint X (step 20)\n")
