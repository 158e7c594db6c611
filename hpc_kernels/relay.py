"""The socket relay: the kernel's five unix sockets on the compute node, reachable on the login node.

Two sides speak the protocol of :mod:`hpc_kernels.protocol` over one byte stream:

* the **login side** (:func:`serve_kernel`, a task of the user's relay daemon,
  :mod:`hpc_kernels.relay_daemon`) listens on five unix sockets in a private directory on the
  login node and writes a connection file pointing at them; every client connection becomes a
  channel of the stream;
* the **node side** connects each channel to the kernel's own socket in the node-side directory.

The stream has three transports (``relay.transport``): ``srun``, an ``srun --overlap`` step in the
kernel's job running ``python -m hpc_kernels.relay node NODE_DIR``, its stdio the stream; ``ssh``,
the same node side started through OpenSSH; ``tcp``, a mutual-TLS listener that the node agent
runs in a thread (:class:`NodeListener`, :mod:`hpc_kernels.tls`).

The stream carries raw bytes of each connection (ZMTP, for ZeroMQ), so the relay never parses,
decrypts or signs Jupyter messages and never needs the key.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import random
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
import tty
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from . import protocol as p
from .errors import RelayError, SlurmError
from .hibernation import SHELL, clients_file, counts_clients, write_clients
from .multiplexer import LocalEnd, Multiplexer, StreamEnd
from .node_tmp import kernel_socket_base
from .paths import (
    check_socket_path,
    ensure_private_dir,
    read_json,
    runtime_root,
    write_json,
)
from .processes import identity, python_module
from .slurm import NODE_STEP_ENVIRONMENT, job_info, srun_into_job
from .state import KernelFiles, kernel_lives, state_json
from .tls import NODE_NAME, CredentialFiles, login_context, node_context

HELLO_TIMEOUT = 60.0
MAX_PENDING_HANDSHAKES = 64  # connections to a tcp node side not yet through their TLS handshake


# ---------------------------------------------------------------------------------------------
# Connection files


def connection_info(socket_base: str, key: str, curve: Mapping[str, str] | None = None) -> dict[str, object]:
    """A Jupyter connection file for the five sockets ``<socket_base>-1`` .. ``-5`` over IPC;
    with ``curve`` (``{"public": ..., "secret": ...}``), the kernel's CurveZMQ keys too."""
    info: dict[str, object] = {f"{name}_port": i + 1 for i, name in enumerate(p.SOCKET_NAMES)}
    info.update(ip=socket_base, key=key, transport="ipc", signature_scheme="hmac-sha256", kernel_name="")
    if curve:
        info.update(curve_publickey=curve["public"], curve_secretkey=curve["secret"])
    return info


def socket_paths(socket_base: str) -> list[str]:
    return [f"{socket_base}-{i + 1}" for i in range(len(p.SOCKET_NAMES))]


# ---------------------------------------------------------------------------------------------
# The node side: the srun step inside the kernel's job


def _make_raw(fd: int) -> None:
    # srun -u gives the task a pty for stdout; without raw mode it would turn \n into \r\n.
    if os.isatty(fd):
        tty.setraw(fd)


async def _connect_kernel_socket(factory: Callable[[], LocalEnd], path: str) -> None:
    """Connect to one of the kernel's sockets, which lie where the sandbox can write: only to a
    socket of ours, never through a link the kernel put there (this process runs outside the
    sandbox, and would otherwise carry a client's traffic to any unix socket of the node)."""
    info = os.lstat(path)
    if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
        raise OSError(f"{path} is not a socket of ours")
    await asyncio.get_running_loop().create_unix_connection(factory, path)


async def _serve_node(node_dir: Path) -> int:
    loop = asyncio.get_running_loop()
    sockets = socket_paths(str(kernel_socket_base(node_dir)))
    out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(1, "wb", 0))
    missing = [s for s in sockets if not os.path.exists(s)]
    if missing:
        out.write(p.encode_error(f"kernel sockets missing on {socket.gethostname()}: {', '.join(missing)}"))
        out.close()
        return 1

    async def connect(index: int, factory: Callable[[], LocalEnd]) -> None:
        await _connect_kernel_socket(factory, sockets[index])  # IndexError: answered with CLOSE

    out.write(p.encode_hello({"node": socket.gethostname()}))
    stream = StreamEnd(lambda _: Multiplexer(out.write, connect))
    await loop.connect_read_pipe(lambda: stream, os.fdopen(0, "rb", 0))
    assert stream.mux is not None
    gone = asyncio.ensure_future(_removed(node_dir))
    # Clients are counted only for a kernel that may hibernate (its agent made the directory).
    clients = asyncio.ensure_future(_report_clients(stream.mux, node_dir)) if counts_clients(node_dir) else None
    await asyncio.wait([stream.mux.ended, gone], return_when=asyncio.FIRST_COMPLETED)
    if clients is not None:
        clients.cancel()
        with contextlib.suppress(FileNotFoundError):
            clients_file(node_dir, os.getpid()).unlink()
    if gone.done():  # the kernel ended: a session that outlives the job (ssh) must not hold the stream
        print(f"relay node side: {node_dir} on {socket.gethostname()} was removed (the kernel ended); "
              "ending the stream", file=sys.stderr, flush=True)
        out.close()
    gone.cancel()
    return 0


NODE_DIR_POLL_SECONDS = 2.0
CLIENTS_POLL_SECONDS = 1.0


async def _report_clients(mux: Multiplexer, node_dir: Path) -> None:
    """Tell the agent how many clients this stream carries (for idle hibernation)."""
    said = None
    while True:
        count = mux.open_on(SHELL)
        if count != said:
            with contextlib.suppress(OSError):  # the directory is gone: the kernel ended
                await asyncio.to_thread(write_clients, node_dir, count)
            said = count
        await asyncio.sleep(CLIENTS_POLL_SECONDS)


async def _removed(node_dir: Path) -> None:
    """Returns once the agent has removed the kernel's node-side directory (at the kernel's end)."""
    while node_dir.is_dir():
        await asyncio.sleep(NODE_DIR_POLL_SECONDS)


def _tune_tcp(transport: asyncio.BaseTransport) -> None:
    """Small writes go out at once (the relay batches frames itself, see docs/performance.md),
    and a peer that vanished without a word (a crashed node) is noticed within about a minute."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


async def serve_node_tcp(node_dir: Path, credentials: CredentialFiles, *, host: str = "",
                         ports: Sequence[int] = (0,),
                         connections: set[asyncio.BaseTransport] | None = None) -> asyncio.AbstractServer:
    """The tcp transport's node side: a TLS listener (mutual: see :mod:`hpc_kernels.tls`) whose
    every connection is one relay stream to the kernel's sockets in ``node_dir``, as the srun
    step's stdio is. A peer without the kernel's login certificate is refused in the handshake.
    At most MAX_PENDING_HANDSHAKES connections may be in their handshake at once (each for
    HELLO_TIMEOUT at most): the port is open to every user of the network, who could otherwise
    hold connections open until the agent runs out of file descriptors.
    It binds the first free port of ``ports`` (0: any); its connections are added to
    ``connections``, so that whoever stops the server can end them too."""
    loop = asyncio.get_running_loop()
    sockets = socket_paths(str(kernel_socket_base(node_dir)))
    context = node_context(credentials)

    async def connect(index: int, factory: Callable[[], LocalEnd]) -> None:
        await _connect_kernel_socket(factory, sockets[index])

    def stream(transport: asyncio.BaseTransport) -> Multiplexer:
        _tune_tcp(transport)
        if connections is not None:
            connections.add(transport)
        write = transport.write  # type: ignore[attr-defined]
        write(p.encode_hello({"node": socket.gethostname(), "transport": "tcp"}))
        return Multiplexer(write, connect)

    pending = 0
    upgrades: set[asyncio.Task[None]] = set()

    async def upgrade(raw: asyncio.BaseTransport) -> None:
        nonlocal pending
        end = StreamEnd(stream)
        try:
            tls = await loop.start_tls(raw, end, context, server_side=True,  # type: ignore[arg-type]
                                       ssl_handshake_timeout=HELLO_TIMEOUT)
        except (OSError, asyncio.TimeoutError, ssl.SSLError):
            raw.abort()  # type: ignore[attr-defined]
            return
        finally:
            pending -= 1
        if tls is None:
            raw.abort()  # type: ignore[attr-defined]
            return
        end.connection_made(tls)

    class Handshake(asyncio.Protocol):
        """A connection before its TLS handshake (start_tls then takes it over)."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nonlocal pending
            if pending >= MAX_PENDING_HANDSHAKES:
                transport.abort()  # type: ignore[attr-defined]
                return
            pending += 1
            transport.pause_reading()  # type: ignore[attr-defined]  # the ClientHello is start_tls's
            task = asyncio.ensure_future(upgrade(transport))
            upgrades.add(task)
            task.add_done_callback(upgrades.discard)

    error: OSError | None = None
    for port in ports:
        try:
            listening = _listening_socket(host, port)
        except OSError as e:  # in use: the next one
            error = e
            continue
        return await loop.create_server(Handshake, sock=listening)
    raise OSError(f"no free port for the relay in {ports[0]}-{ports[-1]} (relay.tcp_ports): {error}")


def _listening_socket(host: str, port: int) -> socket.socket:
    """One socket on one port: without a host, IPv6 and IPv4 at once where the node has IPv6
    (asyncio would open one socket per address family, each on its own port for port 0)."""
    if host or not socket.has_dualstack_ipv6():
        return socket.create_server((host or "0.0.0.0", port), reuse_port=False)
    return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)


def listener_ports(port_range: Sequence[int] | None) -> list[int]:
    """The ports to try, in a random order so that kernels starting together rarely collide."""
    if not port_range:
        return [0]
    ports = list(range(port_range[0], port_range[1] + 1))
    random.shuffle(ports)
    return ports


class NodeListener:
    """The tcp transport's node side, run by the node agent in a thread of its own for as long
    as the job lives (kernel restarts included: the sockets keep their paths)."""

    def __init__(self, node_dir: Path, credentials: CredentialFiles, port_range: Sequence[int] | None) -> None:
        self._args = (node_dir, credentials, listener_ports(port_range))
        self._loop = asyncio.new_event_loop()
        self._started: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name="relay-tcp", daemon=True)
        self._connections: set[asyncio.BaseTransport] = weakref.WeakSet()  # type: ignore[assignment]

    def shell_clients(self) -> int:
        """Clients carried by this listener's streams now (for idle hibernation), counted on the
        listener's own loop (its connections change there). A stopped listener counts none; one
        that does not answer counts as carrying a client (better awake than hibernated wrongly)."""
        async def count() -> int:
            total = 0
            for transport in list(self._connections):
                mux = getattr(transport.get_protocol(), "mux", None)
                if mux is not None and not transport.is_closing():
                    total += mux.open_on(SHELL)
            return total

        if not self._thread.is_alive():
            return 0
        try:
            return asyncio.run_coroutine_threadsafe(count(), self._loop).result(timeout=5)
        except (concurrent.futures.TimeoutError, RuntimeError):
            return 1

    def start(self) -> int:
        """Listen; the port. Raises what binding or reading the credentials raised."""
        self._thread.start()
        return self._started.result()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        node_dir, credentials, ports = self._args
        try:
            server = self._loop.run_until_complete(serve_node_tcp(node_dir, credentials, ports=ports,
                                                                  connections=self._connections))
        except BaseException as e:  # noqa: BLE001 (handed to start())
            self._started.set_exception(e)
            return
        self._started.set_result(server.sockets[0].getsockname()[1])
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for connection in list(self._connections):  # wait_closed waits for them (Python >= 3.12)
                connection.abort()  # type: ignore[attr-defined]
            self._loop.run_until_complete(server.wait_closed())

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


async def connect_login_tcp(host: str, port: int, credentials: CredentialFiles) -> tuple[asyncio.BaseTransport, Multiplexer]:
    """The tcp transport's login side: a TLS connection to the node side, its transport and
    multiplexer (whose HELLO is still to come). Raises ssl.SSLError (refused either way) or
    OSError (unreachable)."""
    loop = asyncio.get_running_loop()

    def stream(transport: asyncio.BaseTransport) -> Multiplexer:
        _tune_tcp(transport)
        return Multiplexer(transport.write, expect_hello=True)  # type: ignore[attr-defined]

    transport, end = await asyncio.wait_for(
        loop.create_connection(lambda: StreamEnd(stream), host, port, ssl=login_context(credentials),
                               server_hostname=NODE_NAME, ssl_handshake_timeout=HELLO_TIMEOUT),
        HELLO_TIMEOUT)
    assert end.mux is not None
    return transport, end.mux


def node_main(node_dir: str) -> int:
    _make_raw(0)
    _make_raw(1)
    return asyncio.run(_serve_node(Path(node_dir)))


# ---------------------------------------------------------------------------------------------
# The login side: a daemon per kernel


# Kernel names never contain "+", so "<name>+<random>" belongs to exactly one kernel.
LOGIN_DIR_SEPARATOR = "+"
SRUN_STOP_SECONDS = 5.0


def make_login_dir(name: str) -> Path:
    """A fresh private directory for one relay's sockets (one per relay, so a relay that ends
    late can never remove the sockets of the one that replaced it)."""
    root = ensure_private_dir(runtime_root())
    return Path(tempfile.mkdtemp(prefix=f"{name}{LOGIN_DIR_SEPARATOR}", dir=root))


def login_dirs_of(name: str) -> list[Path]:
    root = runtime_root()
    if not root.is_dir():
        return []
    return [d for d in root.iterdir() if d.name.rpartition(LOGIN_DIR_SEPARATOR)[0] == name]


def tcp_tuning_library() -> Path | None:
    """The shim that sets TCP_NODELAY/TCP_QUICKACK on srun's stdio sockets, if it was built."""
    found = sorted(Path(__file__).parent.glob("_srun_tcp_tune*.so"))
    return found[0] if found else None


# What srun would take as options from its environment: a relay daemon first started inside an
# allocation (salloc -c 16) must not pass that allocation's shape to every later kernel's step.
_SLURM_INPUT_PREFIXES = ("SLURM_", "SALLOC_", "SBATCH_", "SRUN_")


def step_environment(env: Mapping[str, str], *, tune_tcp: bool) -> dict[str, str]:
    """The environment of srun (or ssh): ours without Slurm's input variables (SLURM_CONF
    stays), with the TCP tuning shim preloaded when asked for and built.

    Without the shim, Slurm's stdio forwarding meets Nagle's algorithm and delayed ACKs: see
    hpc_kernels/_native/srun_tcp_tune.c and docs/performance.md.
    """
    out = {k: v for k, v in env.items() if not k.startswith(_SLURM_INPUT_PREFIXES) or k == "SLURM_CONF"}
    library = tcp_tuning_library() if tune_tcp else None
    if library is not None:
        out["LD_PRELOAD"] = " ".join(filter(None, [str(library), env.get("LD_PRELOAD", "")]))
    elif tune_tcp:
        print("relay: the TCP tuning shim was not built; expect 40 ms stalls", file=sys.stderr)
    return out


# A node that died without a word (no FIN) is noticed within about a minute, not never.
SSH_KEEPALIVE = ["-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]


def ssh_argv(node: str, remote: Sequence[str], options: Sequence[str] = ()) -> list[str]:
    """OpenSSH to ``node`` running ``remote`` there, its stdio a clean byte stream: no pty (-T),
    never a password prompt (BatchMode, first: ssh keeps the first value of an option), the
    site's ``relay.ssh_options``, then our keepalive (which the site's may override)."""
    return ["ssh", "-T", "-o", "BatchMode=yes", *options, *SSH_KEEPALIVE, "--", node, shlex.join(remote)]


class _Step(asyncio.SubprocessProtocol):
    """The process carrying the stream (srun, or ssh): its stdin and stdout are the two directions."""

    def __init__(self) -> None:
        self.mux: Multiplexer | None = None
        self.transport: asyncio.BaseTransport
        self.exited = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        stdin = transport.get_pipe_transport(0)  # type: ignore[attr-defined]
        self.mux = Multiplexer(stdin.write, expect_hello=True)

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1 and self.mux is not None and not self.mux.feed(data):
            with contextlib.suppress(ProcessLookupError):
                self.transport.terminate()  # type: ignore[attr-defined]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1 and self.mux is not None:
            self.mux.stream_ended()

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


Stream = tuple[Multiplexer, Callable[[], Awaitable[None]]]  # the stream, and how to close it


def step_command(transport: str, *, job_id: str, agent: Mapping[str, Any], python: str,
                 ssh_options: Sequence[str] = ()) -> list[str]:
    """The command whose stdio carries the stream: the node side as a step of the kernel's own
    job (srun), or through OpenSSH to the kernel's node (ssh)."""
    remote = python_module(python, "hpc_kernels.relay", "node", agent["node_dir"])
    if transport == "ssh":
        return ssh_argv(agent["node"], remote, ssh_options)
    return srun_into_job(job_id, remote, export=NODE_STEP_ENVIRONMENT, node=agent.get("slurm_node"))


async def _open_step(argv: list[str], *, tune_tcp: bool, stderr: int | None) -> Stream:
    loop = asyncio.get_running_loop()
    transport, step = await loop.subprocess_exec(
        _Step, *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        env=step_environment(os.environ, tune_tcp=tune_tcp),
    )
    assert step.mux is not None
    return step.mux, partial(_stop_step, transport, step)


async def _open_tcp(agent: Mapping[str, Any], files: KernelFiles) -> Stream:
    listener = agent.get("tcp") or {}
    if not listener.get("port"):
        raise RelayError("the kernel's agent has no tcp listener (the kernel was not started with the tcp transport)")
    try:
        transport, mux = await connect_login_tcp(listener["host"], int(listener["port"]), CredentialFiles(files.dir))
    except asyncio.TimeoutError:
        raise RelayError(f"tcp {listener['host']}:{listener['port']}: no TLS handshake within {HELLO_TIMEOUT:.0f} s") from None
    except OSError as e:  # ssl.SSLError included
        raise RelayError(f"tcp {listener['host']}:{listener['port']}: {e}") from None

    async def close() -> None:
        transport.close()

    return mux, close


@dataclass(frozen=True)
class _KernelView:
    """What a relay reads of its kernel's state (on the shared file system: read off the loop)."""

    job_id: str | None
    own_job: bool  # the kernel's own job (not a step of the user's allocation)
    agent: Mapping[str, Any]
    launch: Mapping[str, Any]
    key: str
    curve: Mapping[str, str] | None


def _read_kernel(files: KernelFiles) -> _KernelView:
    record = read_json(files.record) or {}
    return _KernelView(job_id=record.get("job_id"), own_job=record.get("step") is None, agent=state_json(files.agent),
                       launch=read_json(files.launch) or {}, key=files.key.read_text().strip(),
                       curve=read_json(files.curve))


# A stream that ends while the kernel lives (an srun step killed, a connection cut) is opened
# again: for this long, with waits growing from RECONNECT_FIRST_WAIT up to RECONNECT_MAX_WAIT.
RECONNECT_SECONDS = 60.0
RECONNECT_FIRST_WAIT = 0.2
RECONNECT_MAX_WAIT = 5.0


async def _open_stream(files: KernelFiles, kernel: _KernelView, transport_name: str, log: int) -> Stream:
    """The stream to the node side over ``transport_name``, its HELLO received; RelayError says why not."""
    settings = kernel.launch.get("relay") or {}
    close: Callable[[], Awaitable[None]] | None = None
    try:
        if transport_name == "tcp":
            mux, close = await _open_tcp(kernel.agent, files)
        else:
            argv = step_command(transport_name, job_id=str(kernel.job_id), agent=kernel.agent,
                                python=kernel.launch["python"], ssh_options=settings.get("ssh_options", []))
            # OpenSSH sets TCP_NODELAY itself; Slurm's stdio forwarding needs the shim
            tune = transport_name == "srun" and kernel.launch.get("tune_srun_tcp", True)
            mux, close = await _open_step(argv, tune_tcp=tune, stderr=log)
        try:
            await asyncio.wait_for(asyncio.shield(mux.hello), HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            raise RelayError(f"the node side did not answer within {HELLO_TIMEOUT:.0f} s") from None
        except RelayError:
            raise
        except Exception as e:  # the node side's ERROR frame, or the stream ended first
            raise RelayError(str(e)) from None
    except BaseException:
        if close is not None:
            await close()
        raise
    return mux, close


def launch_transport(launch: Mapping[str, Any]) -> str:
    """The transport a kernel was started with (launch.json); srun for kernels from before there
    was a choice."""
    return str((launch.get("relay") or {}).get("transport") or "srun")


async def serve_kernel(files: KernelFiles, ready: Callable[[str], None], transport_name: str | None = None, *,
                       record: Mapping[str, Any] | None = None, ending: Callable[[], None] = lambda: None) -> None:
    """The login side of one kernel's relay, until the kernel is gone or this task is cancelled.

    Opens the stream over the kernel's transport (or ``transport_name``), waits for the node
    side's HELLO, then listens on five unix sockets in a private directory and writes their
    connection file, and with ``record`` (None: not), ``relay-<host>.json`` with ``record`` in it (the
    relay ``hpc-kernel connect`` finds). ``ready`` is called once, with ``READY <connection
    file>`` or ``ERROR <why>``; ``ending`` as soon as the relay is on its way out (its
    connection file is no use any more).

    When the stream ends while the kernel lives (its agent says so), the stream is opened again
    and the listening sockets stay: clients see their connections close and reconnect, as
    ZeroMQ does by itself, and the kernel keeps its state. Everything the relay made is removed
    when it ends, even if it is cancelled again meanwhile. What it has to say goes to the
    kernel's relay log."""
    log = await asyncio.to_thread(os.open, files.relay_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    login_dir: Path | None = None
    servers: list[asyncio.AbstractServer] = []
    current: list[Stream] = []  # the stream now (ended, between two); replaced when opened again

    try:
        kernel = await asyncio.to_thread(_read_kernel, files)
        transport_name = transport_name or launch_transport(kernel.launch)
        node = kernel.agent.get("node")
        login_dir = make_login_dir(files.name)
        base = str(login_dir / "kernel")
        for path in socket_paths(base):
            check_socket_path(path, "login-side socket")
        try:
            current.append(await _open_stream(files, kernel, transport_name, log))
        except RelayError as e:
            ready(f"ERROR relay ({transport_name}) to {node} (job {kernel.job_id}) failed: {e}")
            return
        for index, path in enumerate(socket_paths(base)):
            # login_dir is 0700 already; the socket itself is made 0600 before anyone may connect
            server = await asyncio.get_running_loop().create_unix_server(
                lambda index=index: current[0][0].local_end(index), path=path)  # type: ignore[misc]
            os.chmod(path, 0o600)
            servers.append(server)
        connection_file = login_dir / "connection.json"
        await asyncio.to_thread(write_json, connection_file, connection_info(base, kernel.key, kernel.curve))
        if record is not None:
            await asyncio.to_thread(write_json, files.relay, {
                **identity(), **record, "connection_file": str(connection_file), "login_dir": str(login_dir),
                "transport": transport_name})
        ready(f"READY {connection_file}")
        _log_line(log, f"relay ({transport_name}) to {node} ready")
        while True:
            await current[0][0].ended
            _log_line(log, f"relay ({transport_name}): the stream ended")
            await current[0][1]()  # new clients are turned away meanwhile: they retry
            stream = await _reopen(files, transport_name, log)
            if stream is None:
                return
            current[0] = stream
    except asyncio.CancelledError:
        _log_line(log, f"relay ({transport_name}): stopped")
        raise
    finally:
        ending()
        close = current[0][1] if current else None
        cleanup = asyncio.ensure_future(_clean_up(files, log, login_dir, servers, close))
        while not cleanup.done():  # a second cancel must not cut the clean-up short
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(cleanup)


async def _reopen(files: KernelFiles, transport_name: str, log: int) -> Stream | None:
    """The stream opened again while the kernel lives; None once it is gone or cannot be
    reached for RECONNECT_SECONDS."""
    deadline = time.monotonic() + RECONNECT_SECONDS
    wait = RECONNECT_FIRST_WAIT
    while True:
        try:
            kernel = await asyncio.to_thread(_read_kernel, files)
        except FileNotFoundError as e:  # the key, removed when the kernel ended or was shut down
            _log_line(log, f"relay ({transport_name}): the kernel is gone ({e.filename} was removed); ending")
            return None
        if not kernel_lives(kernel.agent):
            _log_line(log, f"relay ({transport_name}): the kernel is {kernel.agent.get('state', 'gone')}; ending")
            return None
        try:
            stream = await _open_stream(files, kernel, transport_name, log)
        except RelayError as e:
            if time.monotonic() + wait > deadline:
                waiting = await asyncio.to_thread(_job_still_coming, kernel)
                if waiting is None:
                    _log_line(log, f"relay ({transport_name}): giving up after {RECONNECT_SECONDS:.0f} s: {e}")
                    return None
                _log_line(log, f"relay ({transport_name}): {waiting}; waiting for its kernel")
                deadline = time.monotonic() + RECONNECT_SECONDS
            _log_line(log, f"relay ({transport_name}): cannot reconnect yet ({e}); again in {wait:.1f} s")
            await asyncio.sleep(wait)
            wait = min(wait * 2, RECONNECT_MAX_WAIT)
            continue
        _log_line(log, f"relay ({transport_name}): reconnected to {kernel.agent.get('node')}")
        return stream


def _job_still_coming(kernel: _KernelView) -> str | None:
    """Why a relay that cannot reach its kernel should go on trying: the kernel's own job is
    still in Slurm's queue, as when Slurm requeued it after its node failed (for minutes), and
    will start a new kernel. None: it will not."""
    if not kernel.own_job or not kernel.job_id:
        return None
    try:
        job = job_info(kernel.job_id)
    except SlurmError:
        return None
    if job is None or job.finished:
        return None
    return f"job {kernel.job_id} is {job.state}" + (f" ({job.reason})" if job.reason else "")


async def _clean_up(files: KernelFiles, log: int, login_dir: Path | None, servers: list[asyncio.AbstractServer],
                    close: Callable[[], Awaitable[None]] | None) -> None:
    try:
        for server in servers:
            server.close()
        if close is not None:
            await close()
        if login_dir is not None:
            await asyncio.to_thread(_forget, files, login_dir)
    finally:
        os.close(log)


def _forget(files: KernelFiles, login_dir: Path) -> None:
    """Remove the relay's directory, and this login node's relay record if it names this relay (and no later one)."""
    shutil.rmtree(login_dir, ignore_errors=True)
    relay = read_json(files.relay)
    if relay and relay.get("pid") == os.getpid() and relay.get("login_dir") == str(login_dir):
        with contextlib.suppress(FileNotFoundError):
            files.relay.unlink()


def _log_line(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, f"[hpc-kernels relay {time.strftime('%H:%M:%S')}] {message}\n".encode())


async def _stop_step(transport: asyncio.BaseTransport, step: _Step) -> None:
    if transport.get_returncode() is None:  # type: ignore[attr-defined]
        with contextlib.suppress(ProcessLookupError):
            transport.terminate()  # type: ignore[attr-defined]
        try:
            await asyncio.wait_for(asyncio.shield(step.exited), SRUN_STOP_SECONDS)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                transport.kill()  # type: ignore[attr-defined]
            await step.exited
    transport.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "node":
        return node_main(args[1])
    print("usage: python -m hpc_kernels.relay node NODE_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
