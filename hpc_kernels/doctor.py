"""``hpc-kernel doctor``: which relay transports work for a profile, tried on one short test job.

One kernel is submitted with the profile (its agent also listens for the tcp transport when tcp
is to be tried). Then, one after the other, a login-side relay over each transport is started
against it and a Jupyter client does ``kernel_info`` and a few executes through it. Each
transport gets a verdict: works (with its round trip), or the reason it does not (the relay's
own error: ssh's "Permission denied", a refused TLS handshake, a firewall's timeout). The kernel
is shut down at the end, whatever happened.
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import launcher, relay_daemon
from .errors import HpcKernelsError
from .profiles import KernelRequest, load_profile
from .state import kernel_files

ROUND_TRIPS = 20
CLIENT_TIMEOUT = 30.0


@dataclass(frozen=True)
class TransportVerdict:
    transport: str
    works: bool
    detail: str  # the reason it does not work, or what was measured
    round_trip_ms: float | None = None


def transports_to_try(allowed: Sequence[str], asked: Sequence[str]) -> list[str]:
    """The transports asked for (all the profile allows when none were), each once; asking for
    one the profile does not allow is an error."""
    refused = [t for t in asked if t not in allowed]
    if refused:
        raise HpcKernelsError(f"--relay {', '.join(refused)}: the profile allows only {', '.join(allowed)} "
                              "(relay.allow)")
    return list(dict.fromkeys(asked or allowed))


def try_transport(name: str, transport: str) -> TransportVerdict:
    """Start a relay over ``transport`` to kernel ``name`` (ready), talk to the kernel through
    it, stop it."""
    from jupyter_client import BlockingKernelClient

    files = kernel_files(name)
    try:
        connection_file = launcher.start_relay(files, transport, record=False)
    except HpcKernelsError as e:
        return TransportVerdict(transport, False, str(e))
    client = BlockingKernelClient()
    try:
        client.load_connection_file(str(connection_file))
        client.start_channels()
        client.wait_for_ready(timeout=CLIENT_TIMEOUT)
        samples = []
        for _ in range(ROUND_TRIPS):
            started = time.perf_counter()
            reply = client.execute_interactive("pass", timeout=CLIENT_TIMEOUT, output_hook=lambda _: None)
            samples.append(time.perf_counter() - started)
            if reply["content"]["status"] != "ok":
                return TransportVerdict(transport, False, f"the kernel answered {reply['content']['status']}")
        median = statistics.median(samples) * 1000
        return TransportVerdict(transport, True, f"execute round trip {median:.1f} ms (median of {ROUND_TRIPS})",
                                median)
    except (RuntimeError, TimeoutError) as e:  # jupyter_client's "Kernel didn't respond", a lost reply
        return TransportVerdict(transport, False, f"the relay started but the kernel did not answer through it: {e}")
    finally:
        client.stop_channels()
        relay_daemon.request({"op": "stop", "state_dir": str(files.dir), "transport": transport}, start=False)


def run_doctor(profile_name: str, asked: Sequence[str] = (), *, timeout: float = 300.0,
               progress: Callable[[str], None] = lambda _: None) -> list[TransportVerdict]:
    """Submit one test kernel with ``profile_name`` and try each transport on it."""
    profile = load_profile(profile_name)
    transports = transports_to_try(profile.get("relay", "allow"), asked)
    name = f"doctor-{uuid.uuid4().hex[:8]}"
    request = KernelRequest(name=name, time="10:00", relay=profile.get("relay", "transport"))
    record = launcher.submit(profile_name, request, listen_tcp="tcp" in transports)
    try:
        progress(f"submitted test job {record.job_id} ({profile_name}); waiting for its kernel")
        try:
            record = launcher.wait_until_ready(name, timeout=timeout, progress=progress)
        except HpcKernelsError as e:
            return [TransportVerdict(t, False, f"not tried: the test kernel did not start: {e}") for t in transports]
        progress(f"kernel ready on {launcher.view(name).node}; trying {', '.join(transports)}")
        verdicts = []
        for transport in transports:
            verdicts.append(try_transport(name, transport))
            progress(f"{transport}: {'works' if verdicts[-1].works else 'does not work'}")
        return verdicts
    finally:
        launcher.shutdown(name, graceful_timeout=0)


def format_verdicts(verdicts: Sequence[TransportVerdict]) -> str:
    width = max(len(v.transport) for v in verdicts)
    lines = []
    for v in verdicts:
        head = f"{v.transport:<{width}}  {'works' if v.works else 'FAILS'}  "
        detail = v.detail.splitlines() or [""]
        lines.append(head + detail[0])
        lines.extend(" " * len(head) + line for line in detail[1:])
    return "\n".join(lines)
