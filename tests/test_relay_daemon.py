"""The login side of a relay and the relay daemon, on this machine: a kernel of the tcp transport
stood in for by real echo sockets behind the real TLS listener (no cluster, no mocks of ours).

The cluster tests run the daemon against real kernels (test_cluster_relay.py); these check what
is hard to provoke there: what a relay writes and removes, a second cancel during its clean-up,
and the daemon's requests."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import pytest
from test_multiplexer import echo_server

from hpc_kernels.node_tmp import kernel_socket_base
from hpc_kernels.paths import write_json, write_private_file
from hpc_kernels.relay import serve_kernel, serve_node_tcp, socket_paths
from hpc_kernels.state import KernelFiles
from hpc_kernels.tls import CredentialFiles, make_credentials, write_credentials


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path


def fake_kernel(tmp_path: Path, port: int, node_dir: Path) -> KernelFiles:
    """A kernel's state directory as submit and the agent leave it, for a tcp kernel on 127.0.0.1."""
    files = KernelFiles(tmp_path / "data" / "hpc-kernels" / "kernels" / "k1")
    files.dir.mkdir(parents=True, mode=0o700)
    write_json(files.record, {"name": "k1", "job_id": "42"})
    write_json(files.launch, {"python": sys.executable, "relay": {"transport": "tcp"}})
    write_json(files.agent, {"state": "ready", "node": "here", "node_dir": str(node_dir),
                             "tcp": {"host": "127.0.0.1", "port": port}})
    write_private_file(files.key, "k" * 64 + "\n")
    write_credentials(CredentialFiles(files.dir), make_credentials("k1"))
    return files


class TcpKernel:
    """A kernel of the tcp transport as the login side sees it: its state directory, and behind
    the real TLS listener, echo servers standing in for its five sockets."""

    files: KernelFiles

    async def start(self, tmp_path: Path) -> TcpKernel:
        node_dir = tmp_path / "node"
        (node_dir / "rw").mkdir(parents=True)
        self.sockets = [await echo_server(Path(p)) for p in socket_paths(str(kernel_socket_base(node_dir)))]
        self.files = fake_kernel(tmp_path, 0, node_dir)
        self.connections: set[asyncio.BaseTransport] = set()
        self.listener = await serve_node_tcp(node_dir, CredentialFiles(self.files.dir), host="127.0.0.1",
                                             connections=self.connections)
        agent = json.loads(self.files.agent.read_text())
        agent["tcp"]["port"] = self.listener.sockets[0].getsockname()[1]
        write_json(self.files.agent, agent)
        return self

    def close(self) -> None:
        self.listener.close()
        for server in self.sockets:
            server.close()


def test_a_relay_records_itself_only_when_asked_and_removes_everything_it_made(env: Path) -> None:
    async def scenario() -> None:
        kernel = await TcpKernel().start(env)
        files = kernel.files
        for record in ({"control": "/run/x/relay.sock"}, None):
            said: list[str] = []
            task = asyncio.ensure_future(serve_kernel(files, said.append, record=record))
            while not said:
                await asyncio.sleep(0.01)
            assert said[0].startswith("READY "), said
            connection_file = Path(said[0][6:])
            login_dir = connection_file.parent
            reader, writer = await asyncio.open_unix_connection(json.loads(connection_file.read_text())["ip"] + "-3")
            writer.write(b"through the relay")
            assert await reader.readexactly(17) == b"through the relay"
            if record is None:
                assert not files.relay.exists(), "an unrecorded relay leaves relay.json alone"
            else:
                written = json.loads(files.relay.read_text())
                assert written["control"] == "/run/x/relay.sock" and written["login_dir"] == str(login_dir)
                assert written["pid"] == os.getpid() and written["transport"] == "tcp"
            writer.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert not login_dir.exists() and not files.relay.exists()
        kernel.close()

    asyncio.run(scenario())


def test_a_second_cancel_does_not_cut_a_relays_clean_up_short(env: Path) -> None:
    """Stopped, then stopped again while it waits for its transport to close (a stop followed by
    the daemon's SIGTERM): its directory, relay.json and log descriptor still go."""
    async def scenario() -> None:
        kernel = await TcpKernel().start(env)
        files = kernel.files
        fds_before = len(os.listdir("/proc/self/fd"))
        said: list[str] = []
        task = asyncio.ensure_future(serve_kernel(files, said.append, record={}))
        while not said:
            await asyncio.sleep(0.01)
        login_dir = Path(said[0][6:]).parent
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert not login_dir.exists() and not files.relay.exists()
        kernel.close()
        await asyncio.sleep(0.1)
        assert len(os.listdir("/proc/self/fd")) <= fds_before

    asyncio.run(scenario())


def test_a_cut_stream_is_opened_again_while_the_kernel_lives_and_not_after(env: Path) -> None:
    """The TLS connection is cut under a connected client (as a dropped network would): the
    client's connection closes, a new one through the same login-side socket works, and the
    relay lives on. Once the agent says the kernel ended, a cut ends the relay and its files."""
    async def echo_through(path: str, data: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(data)
        got = await reader.readexactly(len(data))
        writer.close()
        return got

    async def scenario() -> None:
        kernel = await TcpKernel().start(env)
        said: list[str] = []
        task = asyncio.ensure_future(serve_kernel(kernel.files, said.append, record={}))
        while not said:
            await asyncio.sleep(0.01)
        socket_path = json.loads(Path(said[0][6:]).read_text())["ip"] + "-1"
        reader, writer = await asyncio.open_unix_connection(socket_path)
        writer.write(b"before")
        assert await reader.readexactly(6) == b"before"
        for connection in list(kernel.connections):
            connection.abort()  # the stream is cut
        assert await asyncio.wait_for(reader.read(), 5) == b"", "the client's connection closes"
        deadline = time.monotonic() + 10
        while True:
            try:
                assert await echo_through(socket_path, b"after") == b"after"
                break
            except (ConnectionError, asyncio.IncompleteReadError):
                assert time.monotonic() < deadline, "no new stream within 10 s"
                await asyncio.sleep(0.1)
        assert not task.done()
        assert "reconnected" in kernel.files.relay_log.read_text()

        agent = json.loads(kernel.files.agent.read_text())
        write_json(kernel.files.agent, {**agent, "state": "ended"})
        for connection in list(kernel.connections):
            connection.abort()
        await asyncio.wait_for(task, 10)
        assert not Path(said[0][6:]).exists() and not kernel.files.relay.exists()
        assert "the kernel is ended; ending" in kernel.files.relay_log.read_text()
        kernel.close()

    asyncio.run(scenario())


def ask(message: dict[str, object]) -> dict[str, object] | None:
    from hpc_kernels import relay_daemon

    return relay_daemon.request(message, start=True, timeout=30)


def test_the_daemon_starts_lists_and_stops_relays_and_refuses_a_bad_request(env: Path) -> None:
    """A real daemon process (started on demand, as hpc-kernel starts it)."""
    from hpc_kernels import relay_daemon

    async def node() -> None:
        kernel = await TcpKernel().start(env)
        files = kernel.files
        loop = asyncio.get_running_loop()
        answer = await loop.run_in_executor(None, ask, {"op": "start", "state_dir": str(files.dir)})
        assert answer and answer["ok"], answer
        connection_file = Path(str(answer["connection_file"]))
        again = await loop.run_in_executor(None, ask, {"op": "start", "state_dir": str(files.dir)})
        assert again == answer, "a running relay is handed out, not started twice"
        listing = await loop.run_in_executor(None, ask, {"op": "list"})
        assert listing and listing["relays"] == [[str(files.dir), "tcp"]]
        assert json.loads(files.relay.read_text())["control"] == str(relay_daemon.control_socket())
        bad = await loop.run_in_executor(None, ask, {"op": "dance"})
        assert bad == {"ok": False, "error": "bad request: 'state_dir'"}
        stopped = await loop.run_in_executor(None, ask, {"op": "stop", "state_dir": str(files.dir)})
        assert stopped == {"ok": True}
        assert not connection_file.exists() and not files.relay.exists()
        pid = listing["pid"]
        os.kill(int(pid), 15)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while relay_daemon.control_socket().exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not relay_daemon.control_socket().exists(), "SIGTERM: it ends and removes its socket"
        kernel.close()

    asyncio.run(node())


def test_a_control_socket_in_a_directory_we_do_not_own_is_not_trusted(env: Path) -> None:
    """Another user's runtime directory (test_cluster_security.py squats one as hk-bob) or, here,
    a symlink planted where ours should be: no request goes there, no daemon is started."""
    from hpc_kernels.errors import HpcKernelsError

    elsewhere = env / "elsewhere"
    elsewhere.mkdir()
    (Path(os.environ["XDG_RUNTIME_DIR"]) / "hpc-kernels").symlink_to(elsewhere)
    with pytest.raises(HpcKernelsError, match="is not a directory; refusing to use it"):
        ask({"op": "list"})
    assert list(elsewhere.iterdir()) == []


def test_the_node_side_connects_only_to_a_socket_of_ours_not_through_a_link(tmp_path: Path) -> None:
    """The kernel's sockets lie where the sandbox can write: a link put there in place of one must
    not make the node side (outside the sandbox) carry a client to another unix socket."""
    import asyncio

    from hpc_kernels.relay import _connect_kernel_socket

    async def main() -> None:
        other = await asyncio.start_unix_server(lambda r, w: None, path=str(tmp_path / "someone-elses.sock"))
        (tmp_path / "kernel-1").symlink_to(tmp_path / "someone-elses.sock")
        (tmp_path / "kernel-2").write_text("")
        for name in ("kernel-1", "kernel-2"):
            with pytest.raises(OSError, match="is not a socket of ours"):
                await _connect_kernel_socket(asyncio.Protocol, str(tmp_path / name))
        await _connect_kernel_socket(asyncio.Protocol, str(tmp_path / "someone-elses.sock"))  # a real one: fine
        other.close()

    asyncio.run(main())
