"""Idle hibernation's parts that need no cluster (the whole of it runs on the cluster in
test_cluster_lifecycle.py)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import types
from pathlib import Path

from hpc_kernels.hibernation import idle_since, shell_clients, snapshot_dir, write_clients
from hpc_kernels.kernel_hibernate import restore, snapshot, user_variables
from hpc_kernels.paths import write_json
from hpc_kernels.processes import identity


def test_only_the_users_own_names_are_saved() -> None:
    hidden = {"In": [], "exit": object()}
    ns = {"In": hidden["In"], "exit": object(), "_": 1, "_i3": "x", "x": 1}
    assert user_variables(ns, hidden) == {"exit": ns["exit"], "x": 1}  # a rebound hidden name is the user's


def test_snapshot_and_restore() -> None:
    def cell_function() -> int:
        return 1

    cell_function.__module__ = "__main__"
    cell_class = type("CellClass", (), {"__module__": "__main__"})
    saved, unsaved = snapshot({"x": 41, "data": {"a": [1, 2]}, "os": os, "lock": threading.Lock(),
                               "f": cell_function, "C": cell_class, "path": Path("/tmp")})
    assert set(saved["values"]) == {"x", "data", "path"} and saved["modules"] == {"os": "os"}
    assert unsaved["f"].startswith("a function defined in a cell") and unsaved["C"].startswith("a class")
    assert unsaved["lock"].startswith("cannot be pickled: TypeError")

    ns: dict[str, object] = {}
    saved["values"]["gone"] = pickle.dumps(types.SimpleNamespace(a=1)).replace(b"types", b"typez")
    saved["modules"]["nomod"] = "no_such_module_anywhere"
    restored, failed = restore(ns, pickle.loads(pickle.dumps(saved)))
    assert ns["x"] == 41 and ns["data"] == {"a": [1, 2]} and ns["os"] is os and ns["path"] == Path("/tmp")
    assert set(restored) == {"x", "data", "os", "path"}
    assert failed["gone"].startswith("cannot be unpickled here") and failed["nomod"].startswith("import no_such_module")


def test_idle_since() -> None:
    assert idle_since({"busy": True, "last": 100.0}, 50.0) is None
    assert idle_since({"busy": False, "last": 100.0}, 150.0) == 150.0  # a client left later
    assert idle_since({"busy": False, "last": 100.0}, 50.0) == 100.0
    assert idle_since({}, 50.0) == 50.0


def test_clients_are_counted_over_node_sides_that_still_run(tmp_path: Path) -> None:
    """A node side is a process with hpc_kernels.relay in its command line, as recorded."""
    (tmp_path / "clients").mkdir()
    node_side = subprocess.Popen([sys.executable, "-c", "import time  # hpc_kernels.relay\ntime.sleep(30)"])
    ended = subprocess.Popen([sys.executable, "-c", "pass  # hpc_kernels.relay"])
    ended.wait()
    try:
        write_json(tmp_path / "clients" / f"{node_side.pid}.json", {**identity(node_side.pid), "shell": 2})
        write_json(tmp_path / "clients" / f"{ended.pid}.json", {**identity(ended.pid), "shell": 5})  # died
        write_json(tmp_path / "clients" / "reused.json", {**identity(os.getpid()), "shell": 7})  # another program
        (tmp_path / "clients" / "junk.txt").write_text("x")
        assert shell_clients(tmp_path) == 2
        write_clients(tmp_path, 3)  # what a node side writes of itself
        assert json.loads((tmp_path / "clients" / f"{os.getpid()}.json").read_text())["shell"] == 3
        assert shell_clients(tmp_path / "nowhere") == 0
    finally:
        node_side.kill()
        node_side.wait()


def test_the_snapshot_goes_to_the_workspace_else_the_state_root(tmp_path: Path) -> None:
    workspace = tmp_path / "ws"
    workspace.mkdir()
    state_root = tmp_path / "state"
    here = snapshot_dir(str(workspace), state_root, "k")
    assert here == workspace / ".hpc-kernels-hibernated" / "k" and here.stat().st_mode & 0o777 == 0o700
    assert snapshot_dir(None, state_root, "k") == state_root / "hibernated" / "k"
    if os.getuid() != 0:  # root writes anywhere
        workspace.chmod(0o500)
        assert snapshot_dir(str(workspace), state_root, "j") == state_root / "hibernated" / "j"


class FakeShell:
    """What Hibernation uses of IPython's shell: the namespaces (and events, unused here)."""

    def __init__(self, user_ns: dict[str, object], hidden: dict[str, object]) -> None:
        self.user_ns = user_ns
        self.user_ns_hidden = hidden


def test_restored_names_are_saved_again_before_any_cell_unhides_them(tmp_path: Path) -> None:
    """IPython hides what the startup files left in the namespace, restored variables included,
    until the first cell: a resumed kernel that hibernates at once must still save them."""
    from hpc_kernels.kernel_hibernate import REPORT, Hibernation

    x, history = [41], ["x = [41]"]
    hibernation = Hibernation(FakeShell({"x": x, "In": history}, {"x": x, "In": history}), str(tmp_path))
    hibernation.restored = ["x"]
    hibernation.save()
    assert json.loads((tmp_path / REPORT).read_text())["saved"] == ["x"]
    hibernation.busy = True
    hibernation.save()
    assert json.loads((tmp_path / REPORT).read_text()) == {"error": "RuntimeError: a cell is running"}


def test_a_failed_save_is_not_tried_again_at_once(tmp_path: Path) -> None:
    from hpc_kernels.hibernation import IdleWatch

    said: list[str] = []

    def no_room() -> Path:
        raise OSError(28, "No space left on device")

    watch = IdleWatch(tmp_path, tmp_path, 1, no_room, lambda: 0, lambda *a: None, said.append)
    (tmp_path / "hibernate.json").write_text('{"saved": []}')  # as if the kernel had answered
    before = watch.last_client
    watch.save = lambda since: no_room() and False  # type: ignore[method-assign]
    assert watch.try_save(0.0) is False
    assert said[-1] == "not hibernating: OSError: [Errno 28] No space left on device"
    assert watch.last_client >= before and not (tmp_path / "hibernate.json").exists()
