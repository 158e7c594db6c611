"""The login side of every relay of one user on one login node, in one process.

``python -m hpc_kernels.relay_daemon`` is started on demand by ``hpc-kernel`` (and the
provisioner) and runs detached. It serves each kernel's relay as a task of one event loop
(:func:`hpc_kernels.relay.serve_kernel`), so that a login node carrying many kernels pays for
one Python process per user, not one per kernel (docs/performance.md, "Many kernels").

It is driven over a unix socket, ``relay.sock`` in the user's private runtime directory (0700:
only the user reaches it; the peer's uid is checked as well), one JSON request and one JSON
answer per connection:

* ``{"op": "start", "state_dir": D, "transport": T|null, "record": true}``: the kernel's relay over
  T (default: the kernel's own transport), started unless it runs; answered ``{"ok": true,
  "connection_file": F}`` once it is ready, or ``{"ok": false, "error": why}``. One relay per
  kernel and transport: ``hpc-kernel doctor`` and ``make bench`` run several side by side, with
  ``"record": false`` so that the kernel's ``relay-<host>.json`` keeps naming its own;
* ``{"op": "stop", "state_dir": D, "transport": T|null}``: the kernel's relays (over T only, if
  given) stopped and cleaned up; ``{"ok": true}``;
* ``{"op": "list"}``: ``{"ok": true, "pid": P, "relays": [[D, T], ...]}``.

The daemon holds ``relay.lock`` while it lives, so at most one runs per runtime directory. It
ends a few seconds after its last relay ended, or on SIGTERM (stopping every relay first).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RelayError
from .paths import ensure_private_dir, runtime_root, state_root
from .processes import python_module, unblock_signals
from .relay import launch_transport, serve_kernel
from .state import KernelFiles, state_json

DAEMON_MARKER = "hpc_kernels.relay_daemon"
IDLE_EXIT_SECONDS = 5.0
SOCKET_CHECK_SECONDS = 10.0
REQUEST_READ_SECONDS = 10.0
START_TIMEOUT = 180.0  # longer than the relay's own wait for its node side
SPAWN_TIMEOUT = 15.0


def control_socket(root: Path | None = None) -> Path:
    return (root or runtime_root()) / "relay.sock"


def daemon_log() -> Path:
    """The daemon's own log (not the kernels': each relay writes to its kernel's relay.log)."""
    return state_root() / f"relay-daemon-{socket.gethostname()}.log"


# ---------------------------------------------------------------------------------------------
# The daemon


@dataclass
class _Relay:
    task: asyncio.Task[None]
    transport: str
    ready: asyncio.Future[str]  # READY <connection file> or ERROR <why>
    ending: bool = False  # its stream ended or it is being stopped: its connection file is no use


class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.relays: dict[tuple[str, str], _Relay] = {}  # (state dir, transport) -> its relay
        self.busy = 0  # control connections being answered
        self.done = asyncio.get_running_loop().create_future()
        self.server: asyncio.AbstractServer | None = None
        self.idle_check: asyncio.TimerHandle | None = None
        self.bound: tuple[int, int] | None = None  # the control socket's (device, inode)

    async def serve(self) -> None:
        path = control_socket(self.root)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a dead daemon's: we hold the lock
        old_umask = os.umask(0o077)
        try:
            self.server = await asyncio.start_unix_server(self.answer, path=str(path))
        finally:
            os.umask(old_umask)
        self.bound = _inode(path)
        watch = asyncio.ensure_future(self.watch_control_socket(path))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, lambda: self.done.done() or self.done.set_result(None))
        _say(f"serving on {path}")
        self.when_idle()
        await self.done
        watch.cancel()
        self.close_control()
        await self.stop_all()
        _say("exiting")

    async def watch_control_socket(self, path: Path) -> None:
        """Removed or replaced (the runtime directory was cleaned, say at logout): nobody can
        reach us any more, and our relays' sockets went with it. Stop them all and end."""
        while True:
            await asyncio.sleep(SOCKET_CHECK_SECONDS)
            if _inode(path) != self.bound:
                _say(f"{path} was removed or replaced: stopping every relay")
                self.server = None  # not ours to unlink any more
                if not self.done.done():
                    self.done.set_result(None)
                return

    def close_control(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
            if _inode(control_socket(self.root)) == self.bound:
                with contextlib.suppress(FileNotFoundError):
                    control_socket(self.root).unlink()

    async def stop_all(self) -> None:
        for relay in self.relays.values():
            relay.task.cancel()
        await asyncio.gather(*(r.task for r in self.relays.values()), return_exceptions=True)
        self.relays.clear()

    def when_idle(self) -> None:
        if self.idle_check is not None:
            self.idle_check.cancel()
        self.idle_check = asyncio.get_running_loop().call_later(IDLE_EXIT_SECONDS, self.exit_if_idle)

    def exit_if_idle(self) -> None:
        # No await between the check and closing the socket: no request can slip in between.
        if not self.relays and not self.busy and not self.done.done():
            self.close_control()
            self.done.set_result(None)

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.busy += 1
        try:
            if _peer_uid(writer.get_extra_info("socket")) != os.getuid():
                return
            try:
                request = json.loads(await asyncio.wait_for(reader.readline(), REQUEST_READ_SECONDS))
                reply = await self.handle(request)
            except (ValueError, KeyError, TypeError) as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
            except asyncio.TimeoutError:
                return
            except Exception as e:  # say it, or the client would take us for a daemon on its way out
                _say(f"request failed: {type(e).__name__}: {e}")
                reply = {"ok": False, "error": f"the relay daemon failed: {type(e).__name__}: {e}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()
            self.busy -= 1
            self.when_idle()

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "list":
            return {"ok": True, "pid": os.getpid(), "relays": sorted(self.relays)}
        state_dir = str(request["state_dir"])
        if op == "stop":
            await self.stop(state_dir, request.get("transport"))
            return {"ok": True}
        if op != "start":
            raise ValueError(f"unknown op {op!r}")
        files = KernelFiles(Path(state_dir))
        transport = request.get("transport") or launch_transport(await asyncio.to_thread(state_json, files.launch))
        relay = self.relays.get((state_dir, transport))
        if relay is None or relay.task.done() or relay.ending:
            relay = self.start(files, transport, record=bool(request.get("record", True)))
        line = await asyncio.shield(relay.ready)
        if line.startswith("READY "):
            return {"ok": True, "connection_file": line[6:]}
        return {"ok": False, "error": line.removeprefix("ERROR ")}

    def start(self, files: KernelFiles, transport: str, *, record: bool) -> _Relay:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[str] = loop.create_future()

        def report(line: str) -> None:
            if not ready.done():
                ready.set_result(line)

        extra = {"control": str(control_socket(self.root))} if record else None
        relay: _Relay

        def ending() -> None:
            relay.ending = True

        task = loop.create_task(serve_kernel(files, report, transport, record=extra, ending=ending))
        key = (str(files.dir), transport)
        relay = self.relays[key] = _Relay(task, transport, ready)
        task.add_done_callback(lambda t: self.ended(key, relay, t))
        return relay

    def ended(self, key: tuple[str, str], relay: _Relay, task: asyncio.Task[None]) -> None:
        if not relay.ready.done():
            error = None if task.cancelled() else task.exception()
            relay.ready.set_result(f"ERROR the relay ended before it was ready: {error or 'stopped'}")
        if not task.cancelled() and task.exception() is not None:
            _say(f"relay of {key[0]} ({key[1]}) failed: {type(task.exception()).__name__}: {task.exception()}")
        if self.relays.get(key) is relay:
            del self.relays[key]
        self.when_idle()

    async def stop(self, state_dir: str, transport: str | None) -> None:
        relays = [r for (d, t), r in self.relays.items() if d == state_dir and transport in (None, t)]
        for relay in relays:
            relay.task.cancel()
        for relay in relays:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await relay.task


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _peer_uid(sock: socket.socket | None) -> int | None:
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError):
        return None
    return int(uid)


def _say(message: str) -> None:
    print(f"[hpc-kernels relay daemon {os.getpid()} {time.strftime('%Y-%m-%d %H:%M:%S')}] {message}",
          file=sys.stderr, flush=True)


def _raise_open_files_limit() -> None:
    """Each relay holds about a dozen descriptors (its five listening sockets, its clients'
    connections, srun's pipes): the usual soft limit of 1024 would stop the daemon near 70
    kernels. Take what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def main() -> int:
    unblock_signals()
    _raise_open_files_limit()
    root = ensure_private_dir(runtime_root())
    lock = os.open(root / "relay.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another daemon serves this directory
    async def run() -> None:
        await Daemon(root).serve()

    asyncio.run(run())
    return 0


# ---------------------------------------------------------------------------------------------
# Asking the daemon (hpc-kernel, the provisioner)


def _ask(path: Path, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    """The daemon's answer, or None when no daemon answers at ``path``. Only a daemon of ours is
    believed: the socket's directory must be private to us and the peer must run as us (another
    user who got there first could otherwise hand out a connection file of his kernel)."""
    ensure_private_dir(path.parent)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            if _peer_uid(sock) != os.getuid():
                raise RelayError(f"{path} is served by another user: refusing it")
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return None  # it was closing as we came: ask the next one
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
        return None
    except socket.timeout:
        raise RelayError(f"the relay daemon at {path} did not answer within {timeout:.0f} s") from None
    except OSError as e:
        raise RelayError(f"the relay daemon at {path}: {e}") from None
    try:
        return dict(json.loads(data))
    except ValueError:
        raise RelayError(f"the relay daemon at {path} answered {data[:200]!r}") from None


def _spawn() -> None:
    log = daemon_log()
    ensure_private_dir(log.parent)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        subprocess.Popen(python_module(sys.executable, "hpc_kernels.relay_daemon"), stdin=subprocess.DEVNULL, stdout=fd,
                         stderr=fd, start_new_session=True, close_fds=True, cwd="/")
    finally:
        os.close(fd)


def request(message: dict[str, Any], *, start: bool, timeout: float = START_TIMEOUT) -> dict[str, Any] | None:
    """Send ``message`` to this user's daemon here; with ``start``, start one if none answers.
    Without ``start`` no daemon can answer where the runtime directory does not exist, and it is
    not made (a shutdown on a compute node would leave an empty one in its /tmp)."""
    root = runtime_root()
    if not start and not root.is_dir():
        return None
    path = control_socket(ensure_private_dir(root))
    answer = _ask(path, message, timeout)
    if answer is not None or not start:
        return answer
    deadline = time.monotonic() + SPAWN_TIMEOUT
    spawned = 0.0
    while time.monotonic() < deadline:
        # Again after a while: a daemon that was ending as we spawned ours held the lock then.
        if time.monotonic() - spawned > 1.0:
            _spawn()
            spawned = time.monotonic()
        time.sleep(0.02)
        answer = _ask(path, message, timeout)
        if answer is not None:
            return answer
    raise RelayError(f"the relay daemon did not start within {SPAWN_TIMEOUT:.0f} s; see {daemon_log()}")


def stop_at(control: str | None, state_dir: Path) -> None:
    """Stop the relay of ``state_dir`` in the daemon listening at ``control`` (if it still does)."""
    if control and Path(control).parent.is_dir():
        _ask(Path(control), {"op": "stop", "state_dir": str(state_dir)}, START_TIMEOUT)


if __name__ == "__main__":
    sys.exit(main())
