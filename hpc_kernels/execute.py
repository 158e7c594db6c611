"""Running code in a kernel from the command line, with output streamed as it comes."""

from __future__ import annotations

import getpass
import queue
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jupyter_client import BlockingKernelClient

from .errors import HpcKernelsError
from .terminal import plain, shown

READY_TIMEOUT = 30.0
def print_output(msg: dict[str, Any]) -> None:
    """Show one IOPub message the way a Jupyter console does."""
    kind, content = msg["msg_type"], msg["content"]
    if kind == "stream":
        stream = sys.stderr if content.get("name") == "stderr" else sys.stdout
        stream.write(shown(content.get("text", ""), stream))
        stream.flush()
    elif kind in ("execute_result", "display_data"):
        text = content.get("data", {}).get("text/plain")
        if text is not None:
            print(shown(text, sys.stdout), flush=True)
    elif kind == "error":
        sys.stdout.flush()
        print(plain("\n".join(content.get("traceback") or [f"{content.get('ename')}: {content.get('evalue')}"]),
                     sys.stderr), file=sys.stderr, flush=True)


GONE_CHECK_SECONDS = 2.0


def _never_gone() -> str | None:
    return None


def execute(connection_file: Path, code: str, *, timeout: float | None = None,
            gone: Callable[[], str | None] = _never_gone) -> bool:
    """Run ``code``; print stdout, stderr, results and tracebacks as Jupyter does.

    Returns True when the code ran without raising. Ctrl-C interrupts the code in the kernel
    (an ``interrupt_request``) and the kernel lives on. While it waits, ``gone`` is asked every
    few seconds whether the kernel is still there: its answer (why not) ends the wait, instead
    of a wait for a reply that will never come.
    """
    client = BlockingKernelClient()
    client.load_connection_file(str(connection_file))
    client.start_channels()
    try:
        try:
            client.wait_for_ready(timeout=READY_TIMEOUT)
        except RuntimeError as e:
            raise HpcKernelsError(gone() or f"the kernel did not answer through {connection_file}: {e}") from None
        try:
            msg_id = client.execute(code, allow_stdin=sys.stdin.isatty())
            reply = wait_for_reply(client, msg_id, timeout, gone)
        except KeyboardInterrupt:
            client.control_channel.send(client.session.msg("interrupt_request", {}))
            print("\n(interrupted: sent interrupt_request to the kernel)", file=sys.stderr)
            reply = wait_for_reply(client, msg_id, timeout, gone)
        except TimeoutError:
            raise HpcKernelsError(f"no reply within {timeout} s; the code may still be running") from None
        return bool(reply["content"].get("status") == "ok")
    finally:
        client.stop_channels()


def wait_for_reply(client: BlockingKernelClient, msg_id: str, timeout: float | None,
                   gone: Callable[[], str | None] = _never_gone,
                   on_output: Callable[[dict[str, Any]], None] = print_output) -> dict[str, Any]:
    """Hand each IOPub message of request ``msg_id`` to ``on_output`` as it comes (default: show
    it), answer its input requests, and return its execute_reply once the kernel is idle again.
    TimeoutError after ``timeout`` s; HpcKernelsError with ``gone``'s answer if the kernel went."""
    deadline = None if timeout is None else time.monotonic() + timeout
    next_check = time.monotonic() + GONE_CHECK_SECONDS
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
        _answer_input_requests(client, msg_id)
        try:
            msg = client.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            if time.monotonic() >= next_check:
                why = gone()
                if why:
                    raise HpcKernelsError(why)
                next_check = time.monotonic() + GONE_CHECK_SECONDS
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
            break
        on_output(msg)
    while True:
        reply: dict[str, Any] = client.get_shell_msg(timeout=READY_TIMEOUT)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def _answer_input_requests(client: BlockingKernelClient, msg_id: str) -> None:
    """``input()`` and ``getpass()`` in the code, answered from the terminal."""
    while True:
        try:
            request = client.get_stdin_msg(timeout=0)
        except queue.Empty:
            return
        if request["msg_type"] != "input_request" or request["parent_header"].get("msg_id") != msg_id:
            continue
        content = request["content"]
        try:
            value = getpass.getpass(content.get("prompt", "")) if content.get("password") else input(content.get("prompt", ""))
        except EOFError:
            value = ""
        client.input(value)
