"""State on disk: private, atomic, locked."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from hpc_kernels import state
from hpc_kernels.agent import AgentError, choose_node_tmp
from hpc_kernels.errors import HpcKernelsError, KernelNotFound
from hpc_kernels.paths import check_socket_path, ensure_private_dir, read_json, write_json


@pytest.fixture(autouse=True)
def data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_are_private_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    assert read_json(path) == {"a": 2} and mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"], "no temporary file left behind"


def test_private_dir_mode_is_fixed_and_symlinks_refused(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    ensure_private_dir(loose)
    assert mode(loose) == 0o700
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(HpcKernelsError, match="not a directory"):
        ensure_private_dir(tmp_path / "link")


def test_record_round_trip_and_listing() -> None:
    files = state.create_kernel_dir("k1")
    assert mode(files.dir) == 0o700 and mode(files.dir.parent) == 0o700
    state.save_record(state.KernelRecord(name="k1", profile="local", status="submitted", job_id="5"))
    assert state.load_record("k1").job_id == "5"
    assert [r.name for r in state.list_records()] == ["k1"]
    with pytest.raises(KernelNotFound, match="no kernel named 'k2' \\(your kernels: k1\\)"):
        state.load_record("k2")


def _bump(path: str, n: int) -> None:
    for _ in range(n):
        with state.locked("counter"):
            value = int(Path(path).read_text())
            Path(path).write_text(str(value + 1))


def test_lock_serialises_processes(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_bump, args=(str(counter), 200)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert counter.read_text() == "800"


def test_socket_path_limit() -> None:
    check_socket_path("/tmp/" + "x" * 100, "socket")
    with pytest.raises(HpcKernelsError, match="107 bytes"):
        check_socket_path("/tmp/" + "x" * 103, "socket")


def test_node_tmp_choice(tmp_path: Path) -> None:
    assert choose_node_tmp(None, {"SLURM_TMPDIR": str(tmp_path), "TMPDIR": "/nonexistent"}) == str(tmp_path)
    assert choose_node_tmp(None, {"TMPDIR": "/nonexistent-login-tmp"}) == "/tmp"
    (tmp_path / "scratch").mkdir()
    assert choose_node_tmp("${BASE}/scratch", {"BASE": str(tmp_path)}) == str(tmp_path / "scratch")
    with pytest.raises(AgentError, match="not set on this node"):
        choose_node_tmp("$UNSET_VAR/x", {})
    with pytest.raises(AgentError, match="not a directory"):
        choose_node_tmp("/nonexistent/x", {})


def test_a_workspace_that_would_expose_home_or_state_is_refused() -> None:
    from hpc_kernels.paths import exposes_private_files

    state = "/home/u/.local/share/hpc-kernels"
    assert exposes_private_files("/home/u", "/home/u", [state]) == "the workspace /home/u would show the kernel your home directory"
    assert exposes_private_files("/home", "/home/u", [state])
    assert exposes_private_files("/", "/home/u", [state])
    assert exposes_private_files("/home/u/.local", "/home/u", [state]) == f"the workspace /home/u/.local would show the kernel {state}"
    assert exposes_private_files("/home/u/project", "/home/u", [state]) is None
    assert exposes_private_files("/home/u2", "/home/u", [state]) is None


def test_private_files_are_found_through_symlinks(tmp_path: Path) -> None:
    from hpc_kernels.paths import exposes_private_files

    real_home = tmp_path / "gpfs" / "home" / "alice"
    (real_home / ".local" / "share" / "hpc-kernels" / "kernels").mkdir(parents=True)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "alice").symlink_to(real_home)
    home = str(tmp_path / "home" / "alice")
    state = f"{home}/.local/share/hpc-kernels"
    assert exposes_private_files(str(tmp_path / "gpfs"), home, [state]), "a parent of the real home"
    assert exposes_private_files(f"{real_home}/.local/share/hpc-kernels/kernels", home, [state]), "inside the state"
    assert exposes_private_files(str(real_home / "project"), home, [state]) is None


@pytest.mark.parametrize("damage", ['{"name": "k2", "job_', "[1, 2]", "\udcff"])
def test_a_damaged_record_is_reported_by_name_and_does_not_hide_the_others(damage: str) -> None:
    from hpc_kernels.errors import DamagedState

    for name in ("k1", "k2", "k3"):
        state.create_kernel_dir(name)
        state.save_record(state.KernelRecord(name=name, profile="local", status="submitted"))
    state.kernel_files("k2").record.write_bytes(damage.encode(errors="surrogateescape"))
    assert [r.name for r in state.list_records()] == ["k1", "k3"]
    [problem] = state.damaged_kernels()
    assert problem.kernel == "k2" and "record.json is damaged" in str(problem)
    with pytest.raises(DamagedState, match="`hpc-kernel shutdown k2` ends its job if one runs and removes it"):
        state.load_record("k2")
    with pytest.raises(KernelNotFound, match=r"your kernels: k1, k3, k2 \(damaged\)"):
        state.load_record("nope")


def test_sweep_removes_only_our_directories_of_ended_jobs(tmp_path: Path) -> None:
    """A node directory (hk-<job>-<8 chars>) of this user whose job has ended goes; a running
    job's, this job's, a link, a file, another name and another user's stay."""
    from hpc_kernels.node_tmp import node_dir_job, sweep_stale_node_dirs

    root = tmp_path / "tmp"
    root.mkdir()
    ended = root / "hk-12-abcd_123"
    (ended / "sub").mkdir(parents=True)
    (ended / "kernel.json").write_text("{}")
    (ended / "sub" / "kernel-1").write_text("")
    running = root / "hk-13-zzzzzzzz"
    running.mkdir()
    own = root / "hk-20-owndir00"
    own.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("keep")
    (root / "hk-14-linktoxx").symlink_to(target)
    (root / "hk-15-afile000").write_text("")
    (root / "hk-16-short").mkdir()
    (root / "hpc-kernels-1001").mkdir()
    (ended / "escape").symlink_to(target)  # a link inside is removed, not followed
    asked: list[list[str]] = []

    def alive(ids: list[str]) -> set[str]:
        asked.append(list(ids))
        return {"13"}

    removed = sweep_stale_node_dirs(root, "20", alive)
    assert removed == [ended]
    assert asked == [["12", "13"]], "Slurm is asked once, about the candidates only"
    assert sorted(p.name for p in root.iterdir()) == [
        "hk-13-zzzzzzzz", "hk-14-linktoxx", "hk-15-afile000", "hk-16-short", "hk-20-owndir00", "hpc-kernels-1001"]
    assert (target / "precious").read_text() == "keep"
    # Another user's directories (owned by us here, so: as if we were someone else) are not touched.
    again = root / "hk-17-other000"
    again.mkdir()
    assert sweep_stale_node_dirs(root, "20", lambda ids: set(), uid=os.getuid() + 1) == []
    assert again.exists()
    assert node_dir_job("hk-17-other000") == "17" and node_dir_job("hk-x-other000") is None


def test_sweep_removes_nothing_when_slurm_cannot_say(tmp_path: Path) -> None:
    from hpc_kernels.errors import SlurmError
    from hpc_kernels.node_tmp import sweep_stale_node_dirs

    (tmp_path / "hk-12-abcdefgh").mkdir()

    def unreachable(ids: list[str]) -> set[str]:
        raise SlurmError("slurm_load_jobs error: Unable to contact slurm controller")

    with pytest.raises(SlurmError):
        sweep_stale_node_dirs(tmp_path, "20", unreachable)
    assert (tmp_path / "hk-12-abcdefgh").exists()


def test_jobs_alive_from_squeue() -> None:
    from hpc_kernels.slurm import parse_jobs_alive

    out = "12|COMPLETED\n13|RUNNING\n14|PENDING\n15|CANCELLED\n16|COMPLETING\n99|RUNNING\n"
    assert parse_jobs_alive(out, ["12", "13", "14", "15", "16", "17"]) == {"13", "14", "16"}


def test_node_tmp_must_be_safe_to_make_a_private_directory_in(tmp_path: Path) -> None:
    """A shared parent without the sticky bit would let another user rename the kernel's
    directory away (and put one of theirs in its place)."""
    from hpc_kernels.agent import check_node_tmp

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(AgentError, match="writable by others without the sticky bit"):
        check_node_tmp(str(shared))
    shared.chmod(0o1777)
    assert check_node_tmp(str(shared)) == str(shared)
    assert check_node_tmp("/tmp") == "/tmp"
    with pytest.raises(AgentError, match="writable by others without the sticky bit"):
        choose_node_tmp(None, {"SLURM_TMPDIR": str(shared.chmod(0o777) or shared)})


def test_untrusted_json_is_read_only_from_a_regular_file_of_ours(tmp_path: Path) -> None:
    """What the sandbox writes (limits.json, hibernation's report) is read without following a
    link, without blocking on a FIFO, and up to a size."""
    from hpc_kernels.paths import read_untrusted_json

    good = tmp_path / "good.json"
    good.write_text('{"nproc": true}')
    assert read_untrusted_json(good) == {"nproc": True}
    secret = tmp_path / "secret.json"
    secret.write_text('{"key": "s3cret"}')
    (tmp_path / "link.json").symlink_to(secret)
    assert read_untrusted_json(tmp_path / "link.json") is None
    os.mkfifo(tmp_path / "fifo.json")
    assert read_untrusted_json(tmp_path / "fifo.json") is None, "and without waiting for a writer"
    (tmp_path / "big.json").write_text('{"x": "' + "a" * 100 + '"}')
    assert read_untrusted_json(tmp_path / "big.json", max_bytes=50) is None
    (tmp_path / "bad.json").write_text("{not json")
    assert read_untrusted_json(tmp_path / "bad.json") is None
    assert read_untrusted_json(tmp_path / "missing.json") is None


def test_a_squatted_runtime_directory_is_passed_by(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user who made /tmp/hpc-kernels-<uid> first (here: something that is not our
    directory) cannot keep us from relaying: the runtime directory moves under the home."""
    import tempfile

    from hpc_kernels.paths import runtime_root

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runtime_root() == tmp_path / f"hpc-kernels-{os.getuid()}"
    (tmp_path / f"hpc-kernels-{os.getuid()}").mkdir()
    assert runtime_root() == tmp_path / f"hpc-kernels-{os.getuid()}", "ours: used"
    (tmp_path / f"hpc-kernels-{os.getuid()}").rmdir()
    (tmp_path / f"hpc-kernels-{os.getuid()}").symlink_to(tmp_path)
    squatted = runtime_root()
    assert squatted.parent == tmp_path / "home" and squatted.name.startswith(".hpc-kernels-run-")
    assert ensure_private_dir(squatted) == squatted
