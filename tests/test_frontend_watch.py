"""The watch that ends a kernel once the frontend process that holds it is gone
(hpc_kernels.frontend_watch), with real processes on this machine. The kernels here have a
record and no job, so that their shutdown needs no Slurm; tests/test_cluster_server_restart.py
runs the same watch against real jobs and a real Jupyter server."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hpc_kernels import frontend_watch
from hpc_kernels.errors import HpcKernelsError, KernelNotFound
from hpc_kernels.frontend_watch import claim, claim_file, next_step, watch
from hpc_kernels.paths import read_json, write_json
from hpc_kernels.processes import identity
from hpc_kernels.state import KernelRecord, create_kernel_dir, kernel_files, save_record


@pytest.fixture(autouse=True)
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HPC_KERNELS_PATHS_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    return tmp_path / "state"


def a_kernel(name: str) -> None:
    create_kernel_dir(name)
    save_record(KernelRecord(name=name, profile="local", status="ready"))


def a_process() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def test_the_next_step_follows_the_claim_and_its_owner() -> None:
    mine = {"token": "t1", "grace": 20.0}
    assert next_step(mine, "t1", alive=True, gone_for=None) == "watch"
    assert next_step(mine, "t1", alive=False, gone_for=19.9) == "watch"
    assert next_step(mine, "t1", alive=False, gone_for=20.0) == "end"
    assert next_step({**mine, "token": "t2"}, "t1", alive=False, gone_for=60) == "leave", "taken over"
    assert next_step({}, "t1", alive=False, gone_for=60) == "leave", "no claim: nothing to end"
    assert next_step({**mine, "ending": True}, "t1", alive=False, gone_for=60) == "leave"


def test_a_grace_period_must_be_positive() -> None:
    a_kernel("k")
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(HpcKernelsError, match="orphan_timeout"):
            claim("k", bad, start=False)


def test_a_kernel_ends_once_its_frontend_is_gone_unless_another_took_it_over() -> None:
    a_kernel("left")
    a_kernel("adopted")
    frontend = a_process()
    tokens = {name: claim(name, 1.0, owner=identity(frontend.pid), start=False) for name in ("left", "adopted")}
    why: dict[str, str] = {}
    watchers = [threading.Thread(target=lambda n=name: why.__setitem__(n, watch(kernel_files(n), tokens[n],
                                                                                 check_seconds=0.1)))
                for name in tokens]
    for w in watchers:
        w.start()
    time.sleep(1.5)
    assert all(w.is_alive() for w in watchers), "a live frontend keeps its kernels"

    claim("adopted", 30.0, start=False)  # this test's process takes it over
    frontend.kill()
    frontend.wait()
    started = time.monotonic()
    for w in watchers:
        w.join(15)
    assert not any(w.is_alive() for w in watchers)
    assert why == {"left": "shut kernel left down: its frontend had gone",
                   "adopted": "another frontend took the kernel over"}
    assert time.monotonic() - started >= 1.0, "not before the grace period"
    assert not kernel_files("left").dir.exists(), "shut down: its state is removed"
    assert kernel_files("adopted").record.exists()
    assert read_json(claim_file(kernel_files("adopted")))["pid"] == identity()["pid"]


def test_the_watch_leaves_when_the_kernel_is_shut_down_by_someone_else() -> None:
    a_kernel("k")
    frontend = a_process()
    try:
        token = claim("k", 30.0, owner=identity(frontend.pid), start=False)
        why: list[str] = []
        w = threading.Thread(target=lambda: why.append(watch(kernel_files("k"), token, check_seconds=0.1)))
        w.start()
        time.sleep(0.3)
        from hpc_kernels import launcher

        launcher.shutdown("k")
        w.join(5)
        assert why == ["the kernel was shut down"]
    finally:
        frontend.kill()
        frontend.wait()


def test_a_kernel_being_ended_cannot_be_claimed_and_a_gone_one_neither() -> None:
    a_kernel("k")
    files = kernel_files("k")
    write_json(claim_file(files), {"token": "t", "ending": True})
    with pytest.raises(HpcKernelsError, match="is being shut down"):
        claim("k", 20.0, start=False)
    with pytest.raises(KernelNotFound):
        claim("nothing", 20.0, start=False)


def test_the_watcher_refuses_a_directory_that_is_not_a_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    assert frontend_watch.main(["/etc", "token"]) == 2
    assert "is not a kernel's state directory" in capsys.readouterr().err
    assert frontend_watch.main([]) == 2
