"""Running code in a kernel from the command line, with output streamed as it comes."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, TextIO

from jupyter_client import BlockingKernelClient

from .errors import HpcKernelsError

READY_TIMEOUT = 30.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI colour codes (tracebacks carry them)."""
    return _ANSI.sub("", text)


def _plain(text: str, stream: TextIO) -> str:
    """Tracebacks carry ANSI colours; keep them for a terminal, drop them for files and pipes."""
    return text if stream.isatty() else strip_ansi(text)


def print_output(msg: dict[str, Any]) -> None:
    """Show one IOPub message the way a Jupyter console does."""
    kind, content = msg["msg_type"], msg["content"]
    if kind == "stream":
        stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
        stream.write(content.get("text", ""))
        stream.flush()
    elif kind in ("execute_result", "display_data"):
        text = content.get("data", {}).get("text/plain")
        if text is not None:
            print(text, flush=True)
    elif kind == "error":
        sys.stdout.flush()
        print(_plain("\n".join(content.get("traceback") or [f"{content.get('ename')}: {content.get('evalue')}"]),
                     sys.stderr), file=sys.stderr, flush=True)


def execute(connection_file: Path, code: str, *, timeout: float | None = None) -> bool:
    """Run ``code``; print stdout, stderr, results and tracebacks as Jupyter does.

    Returns True when the code ran without raising. Ctrl-C interrupts the code in the kernel
    (an ``interrupt_request``) and the kernel lives on.
    """
    client = BlockingKernelClient()
    client.load_connection_file(str(connection_file))
    client.start_channels()
    try:
        try:
            client.wait_for_ready(timeout=READY_TIMEOUT)
        except RuntimeError as e:
            raise HpcKernelsError(f"the kernel did not answer through {connection_file}: {e}") from None
        try:
            reply = _run(client, code, timeout)
        except KeyboardInterrupt:
            client.control_channel.send(client.session.msg("interrupt_request", {}))
            print("\n(interrupted: sent interrupt_request to the kernel)", file=sys.stderr)
            reply = _run_after_interrupt(client, timeout)
        except TimeoutError:
            raise HpcKernelsError(f"no reply within {timeout} s; the code may still be running") from None
        return bool(reply["content"].get("status") == "ok")
    finally:
        client.stop_channels()


def _run(client: BlockingKernelClient, code: str, timeout: float | None) -> dict[str, Any]:
    return client.execute_interactive(
        code, timeout=timeout, allow_stdin=sys.stdin.isatty(), output_hook=print_output
    )


def _run_after_interrupt(client: BlockingKernelClient, timeout: float | None) -> dict[str, Any]:
    # The execute_reply of the interrupted request is still to come on the shell channel.
    msg: dict[str, Any] = client.get_shell_msg(timeout=timeout or 30)
    while msg["msg_type"] != "execute_reply":
        msg = client.get_shell_msg(timeout=timeout or 30)
    return msg
