"""Allowlisted egress: a forward proxy on the node, outside the sandbox, for the hosts a profile
lists (``runtime.allow_hosts``, or ``submit --allow-host``).

The sandbox still has no network. The proxy listens on a unix socket in the node-side directory,
which is bound into the sandbox; inside, a bridge in the kernel (:mod:`hpc_kernels.kernel_egress`)
listens on loopback and points ``HTTPS_PROXY``/``HTTP_PROXY`` at itself. The proxy takes only
``CONNECT host:port`` (what clients send for https URLs), opens the connection from the node
when ``host:port`` is on the list, and answers 403 otherwise. Each decision goes to the job log.
Plain-http requests are refused (403): on an allowed port they would be a second way out, and
every package index speaks https.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_PORT = 443
SOCKET_NAME = "egress.sock"
HEAD_LIMIT = 8192
HEAD_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9\-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,62}))*$")


def parse_allowed(entry: str) -> tuple[str, int]:
    """``pypi.org``, ``pypi.org:443``, ``*.pythonhosted.org`` or ``10.0.0.5:8443`` -> (host, port);
    ValueError says what was expected."""
    text = entry.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = text
    try:
        port = int(port_text) if sep else DEFAULT_PORT
    except ValueError:
        port = 0
    if not _HOST.match(host) or not 1 <= port <= 65535:
        raise ValueError("expected a host name or IPv4 address, optionally *. in front (any subdomain) and "
                         ":PORT after (default 443), e.g. pypi.org or *.pythonhosted.org:443")
    return host.lower(), port


def is_allowed(host: str, port: int, rules: Sequence[tuple[str, int]]) -> bool:
    """Whether ``host:port`` matches a rule: the same host (case does not matter), or for
    ``*.domain`` any name below that domain (not the domain itself); and the same port."""
    host = host.lower().rstrip(".")
    for pattern, allowed_port in rules:
        if port != allowed_port:
            continue
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


class ProxyRequestError(ValueError):
    """A request the proxy does not serve; the text is the reason given to the client."""


def parse_connect(head: bytes) -> tuple[str, int]:
    """The target of a ``CONNECT host:port HTTP/1.x`` request head."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ProxyRequestError(f"not an HTTP/1 request: {line[:100]!r}")
    method, target, _ = parts
    if method != "CONNECT":
        raise ProxyRequestError(f"only CONNECT (https) goes through this proxy, not {method[:20]}")
    host, sep, port_text = target.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ProxyRequestError(f"CONNECT needs host:port, not {target[:100]!r}")
    if not _valid_host(host):
        raise ProxyRequestError(f"not a host name or address: {host[:100]!r}")
    return host, int(port_text)


def _valid_host(host: str) -> bool:
    """A DNS name or an IP address, nothing a resolver might read otherwise (spaces, tabs, NUL,
    overlong labels: some C libraries resolved ``10.0.0.1\t.allowed.org`` to 10.0.0.1)."""
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return not host.startswith("*") and bool(_HOST.match(host)) and len(host) <= 253


def response(status: int, reason: str, detail: str = "") -> bytes:
    body = (detail + "\n").encode() if detail else b""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


class EgressProxy:
    """The proxy, in a thread of the node agent with an event loop of its own, for the job's life."""

    def __init__(self, node_dir: Path, rules: Sequence[tuple[str, int]], say: Callable[[str], None]) -> None:
        self.path = node_dir / SOCKET_NAME
        self.rules = list(rules)
        self.say = say
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="egress-proxy", daemon=True)
        self._writers: set[asyncio.StreamWriter] = set()  # open client connections, ended at stop

    def start(self) -> Path:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self.path

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            old = os.umask(0o177)  # the socket: the user only (its directory is 0700 as well)
            try:
                server = self._loop.run_until_complete(asyncio.start_unix_server(self._serve, str(self.path)))
            finally:
                os.umask(old)
        except BaseException as e:  # noqa: BLE001 (handed to start())
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            for writer in list(self._writers):  # wait_closed waits for them (Python >= 3.12)
                writer.transport.abort()
            pending = asyncio.all_tasks(self._loop)
            for task in pending:  # tunnels still piping: ended here, not left to the garbage collector
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception as e:  # noqa: BLE001 (one bad request must not leave a traceback per connection)
            self.say(f"egress: refused: {type(e).__name__}: {e}")
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(OSError):
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        if len(head) > HEAD_LIMIT:
            writer.write(response(431, "Request Header Fields Too Large"))
            return
        try:
            host, port = parse_connect(head)
        except ProxyRequestError as e:
            self.say(f"egress: refused: {e}")
            writer.write(response(403, "Forbidden", f"hpc-kernels: {e}"))
            return
        if not is_allowed(host, port, self.rules):
            self.say(f"egress: refused CONNECT {host}:{port} (not in runtime.allow_hosts)")
            writer.write(response(403, "Forbidden", f"hpc-kernels: {host}:{port} is not in this kernel's "
                                                    "allowed hosts (runtime.allow_hosts, --allow-host)"))
            return
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                                      CONNECT_TIMEOUT)
        except (OSError, asyncio.TimeoutError) as e:
            why = str(e) or type(e).__name__
            self.say(f"egress: allowed CONNECT {host}:{port}, but it failed: {why}")
            writer.write(response(502, "Bad Gateway", f"hpc-kernels: cannot reach {host}:{port}: {why}"))
            return
        self.say(f"egress: allowed CONNECT {host}:{port}")
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            with contextlib.suppress(OSError):
                upstream_writer.close()
