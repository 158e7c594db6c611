"""Runs inside the kernel: its side of idle hibernation (see :mod:`hpc_kernels.hibernation`).

- It writes ``activity.json`` in the node-side directory when a cell starts and ends, so the
  agent knows when a cell last ran.
- When the agent asks (``hibernate.request``), it pickles the user's variables, each on its own,
  into ``hibernate.pickle`` and says in ``hibernate.json`` what was saved and what was not
  (modules are saved by name and imported again; functions and classes defined in cells cannot
  be pickled by reference, and some objects cannot be pickled at all).
- At the start of a resumed kernel, it loads ``restore.pickle`` into the user's namespace and
  says at the first cell what came back and what did not.

Installed by :mod:`hpc_kernels.kernel_startup`; stands alone (the kernel's Python runs it).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
import threading
import time
import types
from typing import Any

ACTIVITY = "activity.json"
REQUEST = "hibernate.request"
SNAPSHOT = "hibernate.pickle"
REPORT = "hibernate.json"
RESTORE = "restore.pickle"
RESTORED = "restored.json"
POLL_SECONDS = 1.0


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def user_variables(user_ns: dict[str, Any], hidden: dict[str, Any]) -> dict[str, Any]:
    """The user's own names, as ``%who`` shows them: no ``_`` names, nothing IPython put there."""
    return {name: value for name, value in user_ns.items()
            if not name.startswith("_") and not (name in hidden and hidden[name] is value)}


def snapshot(variables: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(what to pickle: ``{"values": {name: pickled bytes}, "modules": {name: module name}}``,
    ``{name: why it is not saved}``)."""
    values: dict[str, bytes] = {}
    modules: dict[str, str] = {}
    unsaved: dict[str, str] = {}
    for name, value in variables.items():
        if isinstance(value, types.ModuleType):
            modules[name] = value.__name__
            continue
        if isinstance(value, (types.FunctionType, type)) and getattr(value, "__module__", None) == "__main__":
            unsaved[name] = f"a {'class' if isinstance(value, type) else 'function'} defined in a cell: run its cell again"
            continue
        try:
            values[name] = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 (anything a __reduce__ may raise)
            unsaved[name] = f"cannot be pickled: {type(e).__name__}: {e}"[:200]
    return {"values": values, "modules": modules}, unsaved


def restore(user_ns: dict[str, Any], saved: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Put ``saved`` (see :func:`snapshot`) back; the names restored, and why others were not."""
    restored: list[str] = []
    failed: dict[str, str] = {}
    for name, module in saved.get("modules", {}).items():
        try:
            user_ns[name] = importlib.import_module(module)
            restored.append(name)
        except Exception as e:  # noqa: BLE001
            failed[name] = f"import {module} failed: {type(e).__name__}: {e}"[:200]
    for name, data in saved.get("values", {}).items():
        try:
            user_ns[name] = pickle.loads(data)
            restored.append(name)
        except Exception as e:  # noqa: BLE001 (a class that is gone, a module the new kernel lacks)
            failed[name] = f"cannot be unpickled here: {type(e).__name__}: {e}"[:200]
    return restored, failed


def _names(names: Any) -> str:
    return ", ".join(sorted(names)) or "none"


class Hibernation:
    def __init__(self, shell: Any, node_dir: str) -> None:
        self.shell = shell
        self.node_dir = node_dir
        self.pending: str | None = None  # said at the start of the next cell
        self.busy = False
        # IPython hides every name the startup files leave in the namespace from %who (and from
        # the next hibernation): the restored ones are the user's, shown again at the first cell.
        self.restored: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.node_dir, name)

    def start(self) -> None:
        self.resume()
        self.mark_activity()
        self.shell.events.register("pre_run_cell", self.pre_run_cell)
        self.shell.events.register("post_run_cell", self.post_run_cell)
        threading.Thread(target=self.watch, name="hpc-kernels-hibernate", daemon=True).start()

    def mark_activity(self) -> None:
        _write_atomically(self.path(ACTIVITY), json.dumps({"busy": self.busy, "last": time.time()}).encode())

    def pre_run_cell(self, *_: Any) -> None:
        self.busy = True
        self.mark_activity()
        for name in self.restored:
            self.shell.user_ns_hidden.pop(name, None)
        self.restored = []
        pending, self.pending = self.pending, None
        if pending:
            sys.stderr.write(pending)
            sys.stderr.flush()

    def post_run_cell(self, *_: Any) -> None:
        self.busy = False
        self.mark_activity()

    def resume(self) -> None:
        try:
            with open(self.path(RESTORE), "rb") as f:
                saved = pickle.load(f)
        except FileNotFoundError:
            return
        restored, failed = restore(self.shell.user_ns, saved.get("namespace", {}))
        self.restored = restored
        os.unlink(self.path(RESTORE))  # a restart in this job starts empty, as a restart does
        unsaved = saved.get("unsaved", {})
        _write_atomically(self.path(RESTORED), json.dumps({"restored": restored, "failed": failed}).encode())
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(saved.get("time", 0)))
        lines = [f"\n[hpc-kernels] Resumed: the variables of the kernel that hibernated at {when} are back: "
                 f"{_names(restored)}."]
        for name, why in sorted({**unsaved, **failed}.items()):
            lines.append(f"  not restored: {name}: {why}")
        self.pending = "\n".join(lines) + "\n"

    def watch(self) -> None:
        while True:
            while not os.path.exists(self.path(REQUEST)):
                time.sleep(POLL_SECONDS)
            self.save()
            try:
                os.unlink(self.path(REQUEST))
            except FileNotFoundError:
                pass

    def save(self) -> None:
        """The variables into SNAPSHOT, and always a REPORT: what was saved, or the error."""
        try:
            if self.busy:
                raise RuntimeError("a cell is running")
            namespace_now = dict(list(self.shell.user_ns.items()))
            variables = user_variables(namespace_now, dict(self.shell.user_ns_hidden))
            # Restored, and still hidden by IPython if no cell has run since: the user's all the same.
            variables.update({name: namespace_now[name] for name in self.restored if name in namespace_now})
            namespace, unsaved = snapshot(variables)
            data = pickle.dumps({"namespace": namespace, "unsaved": unsaved, "time": time.time()},
                                protocol=pickle.HIGHEST_PROTOCOL)
            _write_atomically(self.path(SNAPSHOT), data)
            report: dict[str, Any] = {"saved": sorted([*namespace["values"], *namespace["modules"]]),
                                      "unsaved": unsaved, "bytes": len(data)}
        except Exception as e:  # noqa: BLE001 (said to the agent, which goes on watching)
            report = {"error": f"{type(e).__name__}: {e}"[:300]}
        _write_atomically(self.path(REPORT), json.dumps(report).encode())


def install(shell: Any, node_dir: str) -> Hibernation:
    hibernation = Hibernation(shell, node_dir)
    hibernation.start()
    return hibernation
