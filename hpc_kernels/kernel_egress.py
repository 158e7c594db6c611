"""Runs inside the kernel: the bridge from loopback to the node's egress proxy.

The sandbox's network has only a loopback device, and clients speak to an HTTP proxy over TCP.
This listens on 127.0.0.1 (a port of its own choosing) in the kernel's process and carries each
connection to the proxy's unix socket, which the agent bound into the sandbox
(:mod:`hpc_kernels.egress`); it sets ``HTTPS_PROXY``/``HTTP_PROXY`` (both spellings) for the
kernel and what it starts (``!pip install``). Installed by :mod:`hpc_kernels.kernel_startup`;
stands alone (the kernel's Python runs it, not ours).
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _carry(client: socket.socket, socket_path: str) -> None:
    upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        upstream.connect(socket_path)
    except OSError:
        client.close()
        upstream.close()
        return
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def _serve(listener: socket.socket, socket_path: str) -> None:
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_carry, args=(client, socket_path), daemon=True).start()


def install(shell: Any, socket_path: str) -> int:
    """Start the bridge to ``socket_path``; its port (also in the proxy variables)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    for name in PROXY_VARIABLES:
        os.environ[name] = f"http://127.0.0.1:{port}"
    for name in ("NO_PROXY", "no_proxy"):  # servers inside the sandbox are reached directly
        os.environ.setdefault(name, "localhost,127.0.0.1,::1")
    threading.Thread(target=_serve, args=(listener, socket_path), name="hpc-kernels-egress", daemon=True).start()
    return port
