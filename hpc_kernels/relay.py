"""The socket relay: the kernel's five unix sockets on the compute node, reachable on the login node.

Two processes speak the protocol of :mod:`hpc_kernels.protocol` over one byte stream:

* the **login side** (``python -m hpc_kernels.relay login STATE_DIR``, a daemon started by
  ``hpc-kernel``) listens on five unix sockets in a private directory on the login node and writes a
  connection file pointing at them. It starts the transport, an ``srun --overlap`` step inside the
  kernel's job, and every client connection becomes a channel of the stream;
* the **node side** (``python -m hpc_kernels.relay node NODE_DIR``, the srun step) connects each
  channel to the kernel's own socket in the node-side directory.

The stream carries raw bytes of each connection (ZMTP, for ZeroMQ), so the relay never parses,
decrypts or signs Jupyter messages and never needs the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import sys
import tty
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import protocol as p
from .paths import check_socket_path, ensure_private_dir, read_json, runtime_root, write_json
from .slurm import srun_into_job
from .state import KernelFiles

STREAM_READ_SIZE = 256 * 1024
HELLO_TIMEOUT = 60.0

Connector = Callable[[int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class _Channel:
    def __init__(self, channel_id: int) -> None:
        self.id = channel_id
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.credit = p.INITIAL_WINDOW
        self.credit_available = asyncio.Event()
        self.credit_available.set()
        self.incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = asyncio.get_running_loop().create_future()


class Multiplexer:
    """Carries any number of local stream connections over one stream, with per-channel credit."""

    def __init__(
        self,
        stream_reader: asyncio.StreamReader,
        stream_writer: asyncio.StreamWriter,
        connector: Connector | None = None,
    ) -> None:
        self._reader = stream_reader
        self._writer = stream_writer
        self._connector = connector
        self._decoder = p.FrameDecoder()
        self._channels: dict[int, _Channel] = {}
        self._next_id = 1

    # -- the stream ---------------------------------------------------------------------------

    async def run(self, initial: bytes = b"") -> None:
        """Dispatch frames until the stream ends; then close every channel."""
        try:
            data = initial
            while True:
                for frame in self._decoder.feed(data):
                    self._dispatch(frame)
                data = await self._reader.read(STREAM_READ_SIZE)
                if not data:
                    break
        finally:
            for channel in list(self._channels.values()):
                self._close(channel, notify=False)

    def _send(self, data: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(data)

    def _dispatch(self, frame: p.Frame) -> None:
        if frame.type is p.FrameType.OPEN:
            self._accept_open(frame)
            return
        channel = self._channels.get(frame.channel)
        if channel is None:
            return  # a late frame for a channel already closed here
        if frame.type is p.FrameType.DATA:
            channel.incoming.put_nowait(frame.payload)
        elif frame.type is p.FrameType.CREDIT:
            channel.credit += p.decode_credit(frame.payload)
            channel.credit_available.set()
        elif frame.type is p.FrameType.CLOSE:
            channel.incoming.put_nowait(None)
        else:
            raise p.ProtocolError(f"unexpected {frame.type.name} frame on channel {frame.channel}")

    # -- channels -----------------------------------------------------------------------------

    async def attach(self, index: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Login side: carry a new local connection to kernel socket ``index``; return when it ends."""
        channel = _Channel(self._next_id)
        self._next_id += 1
        self._channels[channel.id] = channel
        self._send(p.encode(p.FrameType.OPEN, channel.id, bytes([index])))
        self._start(channel, reader, writer)
        await channel.closed

    def _accept_open(self, frame: p.Frame) -> None:
        if self._connector is None or len(frame.payload) != 1 or frame.channel in self._channels:
            raise p.ProtocolError(f"unexpected OPEN frame on channel {frame.channel}")
        channel = _Channel(frame.channel)
        self._channels[channel.id] = channel
        channel.tasks.append(asyncio.ensure_future(self._connect(channel, frame.payload[0])))

    async def _connect(self, channel: _Channel, index: int) -> None:
        assert self._connector is not None
        try:
            reader, writer = await self._connector(index)
        except OSError as e:
            self._close(channel, notify=True, reason=f"cannot connect to kernel socket {index}: {e}")
            return
        if channel.id in self._channels:
            self._start(channel, reader, writer)
        else:
            writer.close()

    def _start(self, channel: _Channel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel.reader, channel.writer = reader, writer
        channel.tasks += [
            asyncio.ensure_future(self._local_to_stream(channel)),
            asyncio.ensure_future(self._stream_to_local(channel)),
        ]

    async def _local_to_stream(self, channel: _Channel) -> None:
        assert channel.reader is not None
        try:
            while True:
                while channel.credit <= 0:
                    channel.credit_available.clear()
                    await channel.credit_available.wait()
                data = await channel.reader.read(min(p.MAX_PAYLOAD, channel.credit))
                if not data:
                    break
                channel.credit -= len(data)
                self._send(p.encode(p.FrameType.DATA, channel.id, data))
                await self._writer.drain()
        except OSError:
            pass
        self._close(channel, notify=True)

    async def _stream_to_local(self, channel: _Channel) -> None:
        assert channel.writer is not None
        try:
            while (payload := await channel.incoming.get()) is not None:
                channel.writer.write(payload)
                await channel.writer.drain()
                self._send(p.encode_credit(channel.id, len(payload)))
        except OSError:
            self._close(channel, notify=True)
            return
        self._close(channel, notify=False)

    def _close(self, channel: _Channel, *, notify: bool, reason: str = "") -> None:
        if self._channels.pop(channel.id, None) is None:
            return
        if notify:
            self._send(p.encode(p.FrameType.CLOSE, channel.id, reason.encode()))
        if channel.writer is not None:
            channel.writer.close()
        current = asyncio.current_task()
        for task in channel.tasks:
            if task is not current:
                task.cancel()
        if not channel.closed.done():
            channel.closed.set_result(None)


# ---------------------------------------------------------------------------------------------
# Connection files


def connection_info(socket_base: str, key: str) -> dict[str, object]:
    """A Jupyter connection file for the five sockets ``<socket_base>-1`` .. ``-5`` over IPC."""
    info: dict[str, object] = {f"{name}_port": i + 1 for i, name in enumerate(p.SOCKET_NAMES)}
    info.update(ip=socket_base, key=key, transport="ipc", signature_scheme="hmac-sha256", kernel_name="")
    return info


def socket_paths(socket_base: str) -> list[str]:
    return [f"{socket_base}-{i + 1}" for i in range(len(p.SOCKET_NAMES))]


# ---------------------------------------------------------------------------------------------
# The node side: the srun step inside the kernel's job


async def _stdio_streams() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STREAM_READ_SIZE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", 0))
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(1, "wb", 0))
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return reader, writer


def _make_raw(fd: int) -> None:
    # srun -u gives the task a pty for stdout; without raw mode it would turn \n into \r\n.
    if os.isatty(fd):
        tty.setraw(fd)


async def _serve_node(node_dir: Path) -> int:
    sockets = socket_paths(str(node_dir / "kernel"))
    reader, writer = await _stdio_streams()
    missing = [s for s in sockets if not os.path.exists(s)]
    if missing:
        writer.write(p.encode_error(f"kernel sockets missing on {socket.gethostname()}: {', '.join(missing)}"))
        await writer.drain()
        return 1

    async def connect(index: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_unix_connection(sockets[index], limit=STREAM_READ_SIZE)

    writer.write(p.encode_hello({"node": socket.gethostname()}))
    await writer.drain()
    await Multiplexer(reader, writer, connect).run()
    return 0


def node_main(node_dir: str) -> int:
    _make_raw(0)
    _make_raw(1)
    return asyncio.run(_serve_node(Path(node_dir)))


# ---------------------------------------------------------------------------------------------
# The login side: a daemon per kernel


def login_dir_for(name: str) -> Path:
    return runtime_root() / name


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


async def _read_hello(reader: asyncio.StreamReader) -> bytes:
    """Wait for MAGIC + HELLO from the node side; return any bytes read past it."""
    buffer = b""
    while True:
        data = await reader.read(STREAM_READ_SIZE)
        if not data:
            raise p.ProtocolError(f"the node side ended before it said hello{': ' + buffer[-400:].decode(errors='replace') if buffer else ''}")
        buffer += data
        start = buffer.find(p.MAGIC)
        if start < 0:
            continue
        frames_start = start + len(p.MAGIC)
        if len(buffer) - frames_start < p.HEADER.size:
            continue
        kind, _, length = p.HEADER.unpack_from(buffer, frames_start)
        end = frames_start + p.HEADER.size + length
        if len(buffer) < end:
            continue
        payload = buffer[frames_start + p.HEADER.size:end]
        if kind == p.FrameType.ERROR:
            raise p.ProtocolError(payload.decode(errors="replace"))
        if kind != p.FrameType.HELLO:
            raise p.ProtocolError(f"expected HELLO, got frame type {kind}")
        return buffer[end:]


async def _serve_login(files: KernelFiles, ready: Callable[[str], None]) -> int:
    record = read_json(files.record) or {}
    agent = read_json(files.agent) or {}
    launch = read_json(files.launch) or {}
    key = files.key.read_text().strip()
    login_dir = login_dir_for(files.name)
    ensure_private_dir(login_dir.parent)
    shutil.rmtree(login_dir, ignore_errors=True)
    login_dir.mkdir(mode=0o700)
    base = str(login_dir / "kernel")
    for path in socket_paths(base):
        check_socket_path(path, "login-side socket")

    argv = srun_into_job(record["job_id"], [launch["python"], "-m", "hpc_kernels.relay", "node", agent["node_dir"]])
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None, limit=STREAM_READ_SIZE
    )
    assert proc.stdout is not None and proc.stdin is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    servers: list[asyncio.AbstractServer] = []
    try:
        try:
            rest = await asyncio.wait_for(_read_hello(proc.stdout), HELLO_TIMEOUT)
        except (p.ProtocolError, asyncio.TimeoutError) as e:
            ready(f"ERROR relay to {agent.get('node')} failed: {e or 'no answer within %d s' % HELLO_TIMEOUT}")
            return 1
        mux = Multiplexer(proc.stdout, proc.stdin)

        def handler(index: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
            async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                if _peer_uid(writer) != os.getuid():
                    writer.close()
                    return
                await mux.attach(index, reader, writer)

            return accept

        old_umask = os.umask(0o077)
        try:
            for index, path in enumerate(socket_paths(base)):
                servers.append(await asyncio.start_unix_server(handler(index), path=path, limit=STREAM_READ_SIZE))
        finally:
            os.umask(old_umask)
        connection_file = login_dir / "connection.json"
        write_json(connection_file, connection_info(base, key))
        write_json(files.relay, {"pid": os.getpid(), "connection_file": str(connection_file), "login_dir": str(login_dir)})
        ready(f"READY {connection_file}")
        run = asyncio.ensure_future(mux.run(rest))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([run, stopped], return_when=asyncio.FIRST_COMPLETED)
        for task in (run, stopped):
            task.cancel()
        print(f"relay for {files.name}: {'stopped' if stop.is_set() else 'the job step ended'}", file=sys.stderr)
        return 0
    finally:
        for server in servers:
            server.close()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        shutil.rmtree(login_dir, ignore_errors=True)
        relay = read_json(files.relay)
        if relay and relay.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                files.relay.unlink()


def login_main(state_dir: str) -> int:
    """Run the login-side relay; report READY/ERROR on stdout once, then detach stdout."""
    files = KernelFiles(Path(state_dir))
    reported = False

    def ready(line: str) -> None:
        nonlocal reported
        if reported:
            return
        reported = True
        print(line, flush=True)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    try:
        return asyncio.run(_serve_login(files, ready))
    except Exception as e:  # reported to the waiting command, then the traceback goes to relay.log
        ready(f"ERROR relay failed: {type(e).__name__}: {e}")
        raise


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "node":
        return node_main(args[1])
    if len(args) == 2 and args[0] == "login":
        return login_main(args[1])
    print("usage: python -m hpc_kernels.relay {node NODE_DIR | login STATE_DIR}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
