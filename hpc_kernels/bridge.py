"""The kernel process for frontends that run a kernelspec's ``argv`` themselves.

VS Code, PyCharm, emacs-jupyter, and jupyter_client in an environment without hpc-kernels ignore
``metadata.kernel_provisioner``: they write a connection file (their own ports or ipc paths, their
own key), start the kernelspec's argv with it, signal it (SIGINT to interrupt, SIGTERM to stop) and
wait for it to exit. The bridge does for them what the provisioner does for the others:

- it submits the kernel with the frontend's key (the frontend chose it) and waits through the
  queue, saying each change on stderr, which frontends show in their kernel log;
- it binds the frontend's five endpoints and forwards them, message by message, to the relay's
  login-side sockets (libzmq's proxy, in C, one thread per channel);
- SIGINT becomes ``hpc-kernel interrupt``; a shutdown_request on the control channel tells the
  agent whether a restart follows, so that a restart keeps the job;
- it ends the job when the frontend shuts the kernel down, sends SIGTERM, or dies.

The bridge claims its kernel as the provisioner does (:mod:`hpc_kernels.frontend_watch`): if it is
killed (SIGKILL: jupyter_client's forced shutdown and restart), the kernel ends CLAIM_SECONDS later
unless the frontend's next bridge has taken it over meanwhile (a restart).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import frontend_watch, launcher
from .errors import HpcKernelsError, KernelNotFound
from .paths import frontend_workspace, read_json, write_json
from .processes import parent_variable, watch_parent
from .profiles import KernelRequest
from .protocol import SOCKET_NAMES
from .state import kernel_files, state_json

CHANNELS = SOCKET_NAMES  # Jupyter's five channels
SIGNATURE_SCHEME = "hmac-sha256"  # what the kernel's agent signs with (relay.connection_info)
DELIMITER = b"<IDS|MSG>"
POLL_SECONDS = 1.0
# How long a restarted kernel may take to be ready again, and how long a kernel outlives a bridge
# that did not end it, for the frontend's next bridge to take it over.
RESTART_TIMEOUT = 180.0
CLAIM_SECONDS = 15.0
RESTART_EXIT_SECONDS = 3.0
INTERRUPT_DEBOUNCE_SECONDS = 0.3
# What a frontend sends the argv's process group: taken by a thread of the bridge (_take_signals).
SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} hpc-kernels: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Connection files and names (pure)


@dataclass(frozen=True)
class Connection:
    """Where a Jupyter connection file says the five channels are, and how messages are signed."""

    transport: str
    ip: str
    ports: dict[str, int]
    key: str
    curve_public: str | None = None
    curve_secret: str | None = None

    def endpoint(self, channel: str) -> str:
        port = self.ports[channel]
        return f"tcp://{self.ip}:{port}" if self.transport == "tcp" else f"ipc://{self.ip}-{port}"


def parse_connection(info: dict[str, Any], where: str) -> Connection:
    """A frontend's connection file, checked: every port, a key, a signature scheme the kernel uses."""
    def bad(what: str) -> HpcKernelsError:
        return HpcKernelsError(f"connection file {where}: {what}")

    transport = info.get("transport", "tcp")
    if transport not in ("tcp", "ipc"):
        raise bad(f"transport {transport!r}: expected tcp or ipc")
    ip = info.get("ip")
    if not isinstance(ip, str) or not ip:
        raise bad("no ip")
    ports = {}
    for channel in CHANNELS:
        port = info.get(f"{channel}_port")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise bad(f"{channel}_port {port!r}: expected a port number the frontend chose")
        ports[channel] = port
    key = info.get("key")
    if not isinstance(key, str) or not key or not key.isprintable() or any(c.isspace() for c in key):
        raise bad("no usable key: a kernel on a shared cluster signs every message, and the frontend "
                  "chooses the key (a non-empty string without spaces)")
    scheme = info.get("signature_scheme", SIGNATURE_SCHEME)
    if scheme != SIGNATURE_SCHEME:
        raise bad(f"signature_scheme {scheme!r}: hpc-kernels kernels sign with {SIGNATURE_SCHEME}")
    return Connection(transport=transport, ip=ip, ports=ports, key=key,
                      curve_public=info.get("curve_publickey"), curve_secret=info.get("curve_secretkey"))


def read_connection(path: str | Path) -> Connection:
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise HpcKernelsError(f"cannot read the connection file {path}: {e}") from None
    if not isinstance(info, dict):
        raise HpcKernelsError(f"connection file {path}: expected a JSON object")
    return parse_connection(info, str(path))


def bridge_name(key: str) -> str:
    """The kernel's hpc-kernels name, the same for every bridge a frontend starts for one kernel
    (its restarts keep the key): not the key itself, which must not show in `squeue`."""
    return "argv-" + hashlib.sha256(b"hpc-kernels bridge\0" + key.encode()).hexdigest()[:12]


def shutdown_request(frames: list[bytes], key: bytes) -> bool | None:
    """For a message on the control channel: None unless it is a shutdown_request signed with
    ``key``; else whether it asks for a restart. (Anyone on the login node may connect to a tcp
    port of the frontend's choosing: an unsigned request is the kernel's to refuse, and ours to ignore.)"""
    try:
        at = frames.index(DELIMITER)
        signature, header, parent, metadata, content = frames[at + 1:at + 6]
    except ValueError:
        return None
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (header, parent, metadata, content):
        mac.update(part)
    if not hmac.compare_digest(mac.hexdigest().encode(), signature):
        return None
    try:
        if json.loads(header).get("msg_type") != "shutdown_request":
            return None
        return bool(json.loads(content).get("restart"))
    except (ValueError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------
# Forwarding: one libzmq proxy per channel


class Forwarder:
    """The frontend's five endpoints, bound as soon as the bridge starts (a frontend may wait for
    its ports to be taken before it says anything), then each forwarded to the kernel's (the
    relay's login-side sockets) once it is ready. Shell and stdin share one routing id toward the
    kernel, which sends input requests on stdin to the identity its shell request came from."""

    SOCKET_TYPES = {"shell": ("ROUTER", "DEALER"), "control": ("ROUTER", "DEALER"), "stdin": ("ROUTER", "DEALER"),
                    "hb": ("ROUTER", "DEALER"), "iopub": ("XPUB", "XSUB")}

    def __init__(self, frontend: Connection, on_control: Callable[[list[bytes]], None]):
        import zmq

        self.zmq = zmq
        self.context = zmq.Context()
        self.on_control = on_control
        self.threads: list[threading.Thread] = []
        self.controls: list[Any] = []
        self.closed = threading.Event()
        self.fronts: dict[str, Any] = {}
        try:
            for channel in CHANNELS:
                front = self.fronts[channel] = self.context.socket(getattr(zmq, self.SOCKET_TYPES[channel][0]))
                front.linger = 0
                if frontend.curve_secret:
                    front.curve_secretkey = frontend.curve_secret.encode()
                    front.curve_server = True
                if channel == "iopub":
                    front.xpub_verbose = True  # every client's subscription reaches the kernel (its welcome)
                front.bind(frontend.endpoint(channel))
        except zmq.ZMQError as e:
            self.context.destroy(linger=0)
            raise HpcKernelsError(f"cannot listen on the frontend's {channel} endpoint "
                                  f"{frontend.endpoint(channel)}: {e}") from None

    def connect(self, kernel: Connection) -> None:
        """Forward each channel to the kernel's endpoints."""
        zmq = self.zmq
        routing_id = os.urandom(8)
        for channel in CHANNELS:
            back = self.context.socket(getattr(zmq, self.SOCKET_TYPES[channel][1]))
            back.linger = 0
            if kernel.curve_public:
                back.curve_serverkey = kernel.curve_public.encode()
                back.curve_publickey, back.curve_secretkey = zmq.curve_keypair()
            if channel in ("shell", "stdin"):
                back.routing_id = routing_id
            back.connect(kernel.endpoint(channel))
            self._start(channel, self.fronts[channel], back)

    def _start(self, channel: str, front: Any, back: Any) -> None:
        zmq = self.zmq
        control_address = f"inproc://control-{channel}"
        steer = self.context.socket(zmq.PAIR)
        steer.bind(control_address)
        self.controls.append(steer)
        capture_address = f"inproc://capture-{channel}"
        capture = None
        if channel == "control":
            # A copy of each message, dropped rather than waited for if the watch falls behind.
            capture = self.context.socket(zmq.SUB)
            capture.setsockopt(zmq.SUBSCRIBE, b"")
            capture.bind(capture_address)

        def run() -> None:
            listen = self.context.socket(zmq.PAIR)
            listen.connect(control_address)
            copy = None
            if capture is not None:
                copy = self.context.socket(zmq.PUB)
                copy.connect(capture_address)
            try:
                zmq.proxy_steerable(front, back, copy, listen)
            except zmq.ContextTerminated:
                pass
            for sock in (front, back, listen, copy):
                if sock is not None:
                    sock.close(0)

        thread = threading.Thread(target=run, name=f"forward-{channel}", daemon=True)
        thread.start()
        self.threads.append(thread)
        if capture is not None:
            watch = threading.Thread(target=self._watch_control, args=(capture,), name="control-watch", daemon=True)
            watch.start()
            self.threads.append(watch)

    def _watch_control(self, capture: Any) -> None:
        try:
            while not self.closed.is_set():
                if capture.poll(200):
                    frames = capture.recv_multipart()
                    try:
                        self.on_control(frames)
                    except Exception as e:  # the forwarding goes on whatever the watch makes of a message
                        _say(f"control channel watch: {e!r}")
        finally:
            capture.close(0)

    def close(self) -> None:
        self.closed.set()
        for steer in self.controls:
            with contextlib.suppress(self.zmq.ZMQError):
                steer.send(b"TERMINATE", self.zmq.NOBLOCK)
        for thread in self.threads:
            thread.join(timeout=2)
        for steer in self.controls:
            steer.close(0)
        if not self.threads:  # never connected: the bound sockets are ours to close
            for front in self.fronts.values():
                front.close(0)
        self.context.destroy(linger=0)


def _bridge_file(name: str) -> Path:
    """Where a bridge that hands its kernel on for a restart says from which kernel process."""
    return kernel_files(name).dir / "bridge.json"


# ---------------------------------------------------------------------------------------------
# The bridge


class Bridge:
    def __init__(self, name: str, frontend: Connection, forwarder: Forwarder):
        self.name = name
        self.frontend = frontend
        self.forwarder = forwarder
        self.wake = threading.Event()
        self.stop: str | None = None  # why the bridge ends
        self.restart: bool | None = None  # None: no shutdown_request seen
        self.generation = 0
        self.serving = False

    def on_control(self, frames: list[bytes]) -> None:
        restart = shutdown_request(frames, self.frontend.key.encode())
        if restart is None or self.restart is not None:
            return
        self.restart = restart
        try:
            if restart:
                write_json(_bridge_file(self.name), {"restart_from": self.generation})
                launcher.request_restart(self.name)
            else:
                launcher.expect_shutdown(self.name)
        except OSError as e:
            _say(f"could not pass the frontend's shutdown request on: {e}")
        self.wake.set()

    def on_signal(self, signum: int) -> None:
        """A signal from the frontend (taken by the signal thread)."""
        if signum == signal.SIGINT:
            threading.Thread(target=self._interrupt, daemon=True).start()
        else:
            self.stop = self.stop or f"signal {signal.Signals(signum).name}"
            self.wake.set()

    def _interrupt(self) -> None:
        # jupyter_client interrupts a kernel just before it asks it to shut down or restart: an
        # interrupt followed at once by a shutdown_request is not passed on.
        time.sleep(INTERRUPT_DEBOUNCE_SECONDS)
        if self.restart is not None:
            return
        try:
            launcher.interrupt(self.name)
        except HpcKernelsError as e:
            _say(f"interrupt: {e}")

    def on_frontend_gone(self) -> None:
        self.stop = "the frontend that started this kernel is gone"
        self.restart = False
        self.wake.set()

    def serve(self, kernel_connection: Path) -> int:
        """Forward until the kernel ends, restarts or is shut down; returns the exit code."""
        self.generation = launcher.kernel_generation(self.name)
        self.forwarder.on_control = self.on_control
        self.forwarder.connect(read_connection(kernel_connection))
        self.serving = True
        _say(f"kernel {self.name} ready: forwarding the frontend's {self.frontend.transport} endpoints "
             f"to it through the relay")
        return self._follow()

    def _follow(self) -> int:
        restart_seen = None
        while True:
            # Quick once the frontend asked for a shutdown: it waits only seconds for us to exit.
            self.wake.wait(POLL_SECONDS if self.restart is None else 0.2)
            self.wake.clear()
            if self.stop is not None and not self.restart:
                _say(f"{self.stop}: shutting kernel {self.name} down")
                return self.end(0)
            if self.restart:
                restart_seen = restart_seen or time.monotonic()
                if self.stop is not None or self._restarted() or time.monotonic() - restart_seen > RESTART_EXIT_SECONDS:
                    _say(f"kernel {self.name} restarts in its job; the frontend's next start takes it over")
                    return 0
                continue
            try:
                gone = launcher.gone_reason(self.name)
            except HpcKernelsError as e:  # Slurm did not answer this time: not a reason to end it
                _say(f"cannot tell whether kernel {self.name} runs: {e}")
                continue
            if gone is not None:
                if self.restart is None:
                    _say(gone)
                return self.end(0 if self.restart is False else 1)

    def _restarted(self) -> bool:
        with contextlib.suppress(HpcKernelsError):
            current = launcher.view(self.name)
            return current.agent.get("generation", 0) > self.generation or current.agent_state != "ready"
        return True

    def end(self, code: int) -> int:
        """End the job (the kernel had its shutdown_request, or is not to have one), stop the relay,
        remove the kernel's state."""
        try:
            launcher.shutdown(self.name, graceful_timeout=0, progress=_say)
        except KernelNotFound:
            pass
        except HpcKernelsError as e:
            _say(f"shutting kernel {self.name} down: {e}")
            return 1
        return code


def _can_take_over(name: str) -> bool:
    """Whether kernel ``name`` is there for this bridge to take over (the frontend restarts it): a
    live kernel whose previous bridge is gone. One that is ending is waited for."""
    files = kernel_files(name)
    if not files.record.exists():
        return False
    claim = state_json(frontend_watch.claim_file(files))
    if frontend_watch.owner_alive(claim):
        raise HpcKernelsError(f"kernel {name} is already served by another bridge (pid {claim.get('pid')}) for this "
                              "connection file's key")
    try:
        current = launcher.view(name)
    except KernelNotFound:
        return False
    if current.job_alive and current.agent_state not in ("ended", "failed") and not claim.get("ending") \
            and not current.record.on_node:
        return True
    deadline = time.monotonic() + RESTART_TIMEOUT
    while files.record.exists() and launcher.gone_reason(name) is None:  # its watcher is ending it
        if time.monotonic() > deadline:
            raise HpcKernelsError(f"kernel {name} is still being ended after {RESTART_TIMEOUT:.0f} s")
        time.sleep(POLL_SECONDS)
    return False


def _take_over(name: str) -> None:
    """Claim kernel ``name`` for this bridge and wait for its restarted kernel process."""
    frontend_watch.claim(name, CLAIM_SECONDS)
    handed_on = read_json(_bridge_file(name)) or {}
    with contextlib.suppress(FileNotFoundError):
        _bridge_file(name).unlink()
    if "restart_from" in handed_on:
        generation = int(handed_on["restart_from"])
    else:
        # The previous bridge was killed (a forced restart): a fresh kernel process in the same job.
        generation = launcher.kernel_generation(name)
        launcher.restart_now(name)
    _say(f"kernel {name} restarts in its job (restart {generation + 1})")
    launcher.wait_for_generation(name, generation + 1, timeout=RESTART_TIMEOUT)


def run(args: argparse.Namespace) -> int:
    frontend = read_connection(args.connection_file)
    name = args.name or bridge_name(frontend.key)
    # Blocked before any thread starts (libzmq's too), so that every thread inherits the block.
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        forwarder = Forwarder(frontend, lambda frames: None)
        try:
            return _start_and_serve(args, name, frontend, forwarder)
        finally:
            forwarder.close()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _start_and_serve(args: argparse.Namespace, name: str, frontend: Connection, forwarder: Forwarder) -> int:
    bridge: Bridge | None = None

    def on_signal(signum: int) -> None:
        if bridge is not None and bridge.serving:
            bridge.on_signal(signum)
        elif signum != signal.SIGINT:
            # Until the kernel is ready, SIGTERM/SIGHUP (the frontend gave up, or its startup
            # timeout) and the frontend's death end the start; an interrupt has nothing to do.
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGUSR2)

    signal.signal(signal.SIGUSR2, signal.default_int_handler)  # KeyboardInterrupt, even in a sleep
    _take_signals(on_signal)
    watch_parent(parent_variable(os.getppid()),
                 lambda: bridge.on_frontend_gone() if bridge is not None and bridge.serving
                 else on_signal(signal.SIGTERM))
    taking_over = _can_take_over(name)  # raises if another bridge serves it: that one is left alone
    try:
        if taking_over:
            _take_over(name)
        else:
            request = KernelRequest(name=name, workspace=_workspace(args.workspace), workspace_rw=args.rw,
                                    image=args.image, relay=args.relay, python_env=args.python_env,
                                    curve=bool(frontend.curve_secret))
            on_node = launcher.starts_on_node(args.profile, args.mode)
            start = launcher.start_on_node if on_node else launcher.submit
            record = start(args.profile, request, key=frontend.key)
            if not on_node:  # an on-node agent already ends with us (HPC_KERNELS_PARENT)
                frontend_watch.claim(name, CLAIM_SECONDS)
            _say(f"{'starting on this node' if on_node else f'submitted job {record.job_id}'}: kernel {name} "
                 f"(profile {args.profile})")
            launcher.wait_until_ready(name, timeout=args.launch_timeout or None, progress=_say)
        connection = launcher.ensure_relay(name, progress=_say)
        bridge = Bridge(name, frontend, forwarder)
    except (KeyboardInterrupt, HpcKernelsError) as e:
        # A start that failed or was given up: nothing of it may stay behind (submit itself
        # removes what it made if it was interrupted).
        _say(str(e) if isinstance(e, HpcKernelsError) else "stopped before the kernel was ready")
        with contextlib.suppress(HpcKernelsError):
            launcher.shutdown(name, graceful_timeout=0, progress=_say)
        return 1
    return bridge.serve(connection)


def _take_signals(handle: Callable[[int], None]) -> None:
    """SIGINT, SIGTERM and SIGHUP, blocked in every thread and taken by one of their own.

    jupyter_client signals the argv's whole process group (``killpg``): a SIGINT meant for the
    kernel would otherwise also end the scontrol or scancel the bridge runs at that moment. With
    the signals blocked, children inherit the block; our own daemons unblock them
    (:func:`processes.unblock_signals`)."""
    def take() -> None:
        while True:
            handle(signal.sigwait(SIGNALS))

    threading.Thread(target=take, name="signals", daemon=True).start()


def _workspace(asked: str | None) -> str | None:
    """The configured workspace, else the frontend's working directory, unless that would show the
    kernel the user's home (a frontend started in ~): then none, as `hpc-kernel submit` does."""
    if asked:
        return asked
    workspace, why = frontend_workspace(os.getcwd())
    if why:
        _say(f"no workspace bound: {why}")
    return workspace


def argv_options(config: dict[str, Any]) -> list[str]:
    """The bridge's options for a kernelspec's provisioner config (the same settings, for
    frontends that run the argv)."""
    options = ["--profile", str(config["profile"])]
    for key in ("image", "relay", "mode", "python_env", "launch_timeout", "workspace"):
        if config.get(key):
            options += [f"--{key.replace('_', '-')}", str(config[key])]
    if config.get("workspace_rw"):
        options.append("--rw")
    return options


def parser() -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(prog="python -m hpc_kernels.bridge", description=__doc__.splitlines()[0])
    parse.add_argument("-f", dest="connection_file", help="the connection file the frontend wrote")
    parse.add_argument("--profile", help="the hpc-kernels profile")
    parse.add_argument("--name", help="the kernel's hpc-kernels name (default: argv-<hash of the key>)")
    parse.add_argument("--image")
    parse.add_argument("--relay")
    parse.add_argument("--python-env")
    parse.add_argument("--workspace")
    parse.add_argument("--rw", action="store_true")
    parse.add_argument("--mode", choices=("auto", "job", "node"), default="auto")
    parse.add_argument("--launch-timeout", type=float, default=0.0)
    return parse


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.connection_file or not args.profile:
        parser().error("-f CONNECTION_FILE and --profile are required")
    try:
        return run(args)
    except HpcKernelsError as e:
        _say(str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
