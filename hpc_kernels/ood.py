"""An Open OnDemand "batch connect" app: JupyterLab on a compute node, its kernels sandboxed.

``hpc-kernel ood install DEST`` renders ``templates/ood/`` into the files OnDemand expects
(manifest.yml, form.yml, submit.yml.erb, template/{before,script,after}.sh.erb, view.html.erb,
info.md.erb). The site's profiles go into the form (each option sets the other fields to the
profile's values), into the checks submit.yml.erb makes before OnDemand submits anything, and
into the job script. OnDemand then renders the ERB with each user's choices.

In the job, JupyterLab listens on TCP (OnDemand's proxy speaks TCP) behind a generated
password; its only kernelspec starts the profile's kernel in the sandbox on the same node (the
provisioner's node mode). ``python -m hpc_kernels.ood config`` writes JupyterLab's configuration
there, with the password read from stdin.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import HpcKernelsError
from .launcher import node_python
from .limits import size_bytes
from .profiles import Profile
from .render import template_environment

APP_FILES = ("manifest.yml", "form.yml", "submit.yml.erb", "template/before.sh.erb", "template/script.sh.erb",
             "template/after.sh.erb", "view.html.erb", "info.md.erb")
KERNELSPEC_NAME = "hpc-sandbox"
START_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class PartitionLimits:
    """What one node of a partition offers at most, and the partition's time limit (None: no limit)."""

    max_hours: int | None
    max_cores: int | None
    max_memory_gb: int | None
    max_gpus: int


def hours_of(slurm_time: str) -> float | None:
    """A Slurm time (``90`` minutes, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in hours; None for
    no limit (``infinite``, ``UNLIMITED``) or what is not a time."""
    text = slurm_time.strip()
    if text.lower() in ("infinite", "unlimited", ""):
        return None
    try:
        days = 0
        if "-" in text:
            day, _, text = text.partition("-")
            days = int(day)
            hours, minutes, seconds = ([int(x) for x in text.split(":")] + [0, 0])[:3]
        else:
            parts = [int(x) for x in text.split(":")]
            hours, minutes, seconds = {1: (0, *parts, 0), 2: (0, *parts)}.get(len(parts), tuple(parts[:3]))
    except ValueError:
        return None
    return days * 24 + hours + minutes / 60 + seconds / 3600


def gpu_count(gres: str) -> int:
    """GPUs per node in sinfo's %G (``gpu:a100:4(S:0-1),nvme:1``) or a profile's ``slurm.gpus`` (``a100:2``)."""
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total = max(total, int(parts[-1]))
    return total


def parse_sinfo(stdout: str) -> tuple[dict[str, PartitionLimits], str | None]:
    """``sinfo -h -o '%P|%l|%c|%m|%G'``: one line per partition and node configuration; the
    largest node of each partition counts. Also the default partition (``debug*``), if any."""
    found: dict[str, PartitionLimits] = {}
    default = None
    for line in stdout.splitlines():
        fields = [f.strip() for f in line.split("|")]
        if len(fields) != 5:
            continue
        name, limit, cpus, memory, gres = fields
        if name.endswith("*"):
            name = default = name.rstrip("*")
        hours = hours_of(limit)
        this = PartitionLimits(
            max_hours=None if hours is None else max(1, math.floor(hours)),
            max_cores=int(cpus.rstrip("+")) if cpus.rstrip("+").isdigit() else None,
            max_memory_gb=int(memory.rstrip("+")) // 1024 if memory.rstrip("+").isdigit() else None,
            max_gpus=gpu_count(gres),
        )
        before = found.get(name)
        if before is not None:
            this = PartitionLimits(
                this.max_hours,
                max(filter(None, (before.max_cores, this.max_cores)), default=None),
                max(filter(None, (before.max_memory_gb, this.max_memory_gb)), default=None),
                max(before.max_gpus, this.max_gpus))
        found[name] = this
    return found, default


def partition_limits() -> tuple[dict[str, PartitionLimits], str | None]:
    """The cluster's partitions as sinfo sees them now, and the default one; nothing when Slurm
    cannot be asked (the form's checks then leave partitions alone)."""
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%P|%l|%c|%m|%G"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}, None
    return parse_sinfo(proc.stdout) if proc.returncode == 0 else ({}, None)


def cluster_name() -> str | None:
    """Slurm's ClusterName (what OnDemand's cluster file is usually named after)."""
    try:
        proc = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"^ClusterName\s*=\s*(\S+)", proc.stdout, re.M)
    return match.group(1) if match else None


def memory_gb(slurm_mem: str) -> int:
    """A Slurm memory size in whole GB, rounded down (at least 1)."""
    try:
        return max(1, size_bytes(slurm_mem) >> 30)  # as a node's memory is rounded: never more
    except ValueError:
        return 1


def profile_choice(profile: Profile) -> dict[str, Any]:
    """What the form and the checks need of one profile."""
    slurm = profile.settings["slurm"]
    gpus = str(slurm.get("gpus") or "")
    gpu_type = gpus.rsplit(":", 1)[0] if ":" in gpus else None
    runtime = profile.get("runtime", "kind")
    return {
        "name": profile.name,
        "label": f"{profile.name}: {profile.description}" if profile.description else profile.name,
        "runtime": runtime,
        "apptainer": runtime == "apptainer",
        "image": profile.get("runtime", "image") or "",
        "partition": slurm.get("partition") or "",
        "hours": max(1, math.ceil(hours_of(str(slurm["time"])) or 1)),
        "cores": int(slurm["cpus"]),
        "memory_gb": memory_gb(str(slurm["mem"])),
        "gpus": gpu_count(f"gpu:{gpus}") if gpus else 0,
        "gpu_type": gpu_type,
        "gres": list(slurm.get("gres") or []),
        "account": slurm.get("account"),
        "qos": slurm.get("qos"),
        "constraint": slurm.get("constraint"),
        "reservation": slurm.get("reservation"),
        "extra_options": list(slurm.get("extra_options") or []),
        "modules": list(slurm.get("modules") or []),
        "environment": sorted((slurm.get("environment") or {}).items()),
    }


def ruby(value: Any) -> str:
    """``value`` as a Ruby literal: single-quoted strings (no interpolation), nil, hashes, arrays."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{ruby(str(k))} => {ruby(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(ruby(v) for v in value) + "]"
    raise TypeError(f"no Ruby literal for {value!r}")


_CHECKED = ("runtime", "gpu_type", "gres", "account", "qos", "constraint", "reservation", "extra_options")


def erb_text(text: str) -> str:
    """Text that ERB leaves as it is (``<%`` would start Ruby code)."""
    return text.replace("<%", "<%%")


def app_files(profiles: Sequence[Profile], default: str, *, cluster: str, limits: dict[str, PartitionLimits],
              hpc_kernel: str, python: str, default_partition: str | None = None, portal_url: str = "",
              title: str = "JupyterLab (sandboxed kernels)", template_dir: Path | None = None) -> dict[str, str]:
    """The app's files (relative path -> text) for these profiles; ``default`` is preselected.
    ``portal_url``: the OnDemand portal's origin, the one JupyterLab accepts requests from."""
    if not profiles:
        raise HpcKernelsError("no profiles to offer")
    choices = [profile_choice(p) for p in profiles]
    by_name = {c["name"]: c for c in choices}
    if default not in by_name:
        raise HpcKernelsError(f"--default {default}: not among the profiles offered ({', '.join(by_name)})")
    env = template_environment(template_dir)
    env.filters["ruby"] = ruby
    env.filters["erb_text"] = erb_text
    context = {
        "version": __version__,
        "title": title,
        "cluster": cluster,
        "profiles": choices,
        "default": by_name[default],
        "runtimes": " or ".join(sorted({"bubblewrap" if c["runtime"] == "bwrap" else c["runtime"] for c in choices})),
        "profiles_ruby": ruby({c["name"]: {k: c[k] for k in _CHECKED} for c in choices}),
        "partitions_ruby": ruby({name: asdict(limit) for name, limit in sorted(limits.items())}),
        "default_partition_ruby": ruby(default_partition),
        "portal_url": portal_url,
        "hpc_kernel": hpc_kernel,
        "python": python,
        "kernelspec_name": KERNELSPEC_NAME,
        "start_timeout": START_TIMEOUT_SECONDS,
    }
    return {path: env.get_template(f"ood/{path}.j2").render(**context) for path in APP_FILES}


MARKER = ".hpc-kernels-app"  # in every app `ood install` wrote: the only kind it replaces
EXECUTABLE = {"template/script.sh.erb"}  # OnDemand runs the rendered script.sh as it is (mode kept)


def install(dest: Path, files: dict[str, str]) -> None:
    """Write the app into ``dest`` as a whole: built beside it, then renamed into place. An app
    this command wrote there before is replaced (and put back if that fails); any other
    non-empty directory is refused."""
    dest = dest.absolute()
    if dest.exists() and any(dest.iterdir()) and not (dest / MARKER).exists():
        raise HpcKernelsError(f"{dest} exists and was not written by `hpc-kernel ood install`; choose another "
                              "directory (an app of its own is never replaced)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    old: Path | None = None
    try:
        for path, text in {**files, MARKER: f"hpc-kernels {__version__}\n"}.items():
            target = build / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            os.chmod(target, 0o755 if path in EXECUTABLE else 0o644)
        for directory in (build, build / "template"):
            os.chmod(directory, 0o755)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.rename(dest, old / "app")
        os.rename(build, dest)
    except BaseException:
        if old is not None and not dest.exists():
            os.rename(old / "app", dest)  # the earlier app, back in place
        shutil.rmtree(build, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def default_python(profiles: Sequence[Profile]) -> str:
    """The Python that runs JupyterLab in the job: the profiles' ``paths.python`` (they must agree)."""
    found = {node_python(p) for p in profiles}
    if len(found) > 1:
        raise HpcKernelsError(f"the profiles name different paths.python ({', '.join(sorted(found))}); "
                              "install one app per Python with --profile")
    return found.pop()


# ---------------------------------------------------------------------------------------------
# In the job: JupyterLab's configuration


def content_security_policy(origins: list[str], base_url: str) -> str:
    """What JupyterLab's pages may load and run: its own scripts only, from its static and
    extension paths. Kernel output is HTML that JupyterLab trusts (it ran in this session): an
    inline handler (``<img onerror=...>``), an inline ``<script>`` or a script the kernel wrote
    into the notebook directory (served under ``files/``) would otherwise run on the portal's
    origin, with the user's session. ``'unsafe-eval'``: JupyterLab 4 compiles its settings
    schemas with ``new Function`` (checked in Chromium; it does not start without it); it lets
    running script evaluate strings, not injected markup start script. No image, font or
    connection leaves for another site."""
    scripts = " ".join(f"{origin}{base_url}{path}" for origin in origins for path in ("static/", "lab/extensions/"))
    sockets = " ".join("ws" + origin[len("http"):] for origin in origins if origin.startswith("http"))
    return "; ".join([
        "default-src 'none'",
        f"script-src {scripts} 'unsafe-eval'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob:",
        "media-src 'self' data: blob:",
        "font-src 'self' data:",
        f"connect-src 'self' {sockets}",
        "worker-src 'self' blob:",
        "manifest-src 'self'",
        "frame-src 'self'",
        "base-uri 'none'",
        "object-src 'none'",
        "form-action 'self'",
        "frame-ancestors 'self'",
    ])


def jupyter_config(*, host: str, port: int, root: str, hashed_password: str, kernelspec: str,
                   allow_origin: str = "") -> str:
    """JupyterLab's configuration for one session: TCP on every interface (OnDemand's proxy
    reaches it at host:port) under /node/<host>/<port>/, requests from the portal's origin (none
    but its own when the portal is not known), the password's hash only, no terminals, only the
    sandboxed kernelspec, and a Content-Security-Policy that keeps kernel output from running
    script (:func:`content_security_policy`)."""
    base_url = f"/node/{host}/{port}/"
    origins = [f"http://{host}:{port}", *([allow_origin] if allow_origin not in ("", "*") else [])]
    settings = [
        ("ServerApp.ip", "0.0.0.0"),
        ("ServerApp.port", port),
        ("ServerApp.port_retries", 0),
        ("ServerApp.base_url", base_url),
        ("ServerApp.open_browser", False),
        ("ServerApp.root_dir", root),
        ("ServerApp.terminals_enabled", False),
        ("IdentityProvider.token", ""),
        ("PasswordIdentityProvider.hashed_password", hashed_password),
        # OnDemand's session card posts the password from the dashboard's page, which cannot
        # carry JupyterLab's _xsrf cookie: only the login form skips that check.
        ("IdentityProvider.login_handler_class", "hpc_kernels.ood_jupyter.LoginHandler"),
        # OnDemand's proxy passes the portal's Origin on, with the node's Host.
        ("ServerApp.allow_origin", "" if allow_origin == "*" else allow_origin),
        ("ServerApp.tornado_settings", {"headers": {
            "Content-Security-Policy": content_security_policy(origins, base_url),
            "X-Content-Type-Options": "nosniff"}}),
        ("ServerApp.kernel_spec_manager_class", "hpc_kernels.ood_jupyter.SandboxedKernelSpecManager"),
        ("KernelSpecManager.ensure_native_kernel", False),
        ("KernelSpecManager.allowed_kernelspecs", {kernelspec}),
        ("MappingKernelManager.default_kernel_name", kernelspec),
    ]
    lines = [f"# JupyterLab for one Open OnDemand session (hpc-kernels {__version__})"]
    lines += [f"c.{key} = {value!r}" for key, value in settings]
    return "\n".join(lines) + "\n"


SERVE_GRACE_SECONDS = 30.0


def serve(lab_args: list[str], grace: float = SERVE_GRACE_SECONDS) -> None:
    """Run JupyterLab in this process, ending it for sure once OnDemand's job script (our
    parent) is gone: JupyterLab's own stop on SIGTERM (``setpriv --pdeathsig``, or Slurm's)
    shuts its kernels down, but was seen to hang afterwards, still listening on the node's network
    after its job had ended, where Slurm's proctrack/linuxproc no longer saw it (reparented).
    ``grace`` seconds after the parent is gone, the process exits whatever JupyterLab is doing."""
    import os
    import runpy
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        time.sleep(grace)
        print(f"hpc-kernels: OnDemand's job script is gone and JupyterLab did not stop within {grace:.0f} s: "
              "ending it", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
    sys.argv = ["jupyter-lab", *lab_args]
    runpy.run_module("jupyterlab", run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["serve"]:  # everything after it is JupyterLab's
        serve(args_in[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m hpc_kernels.ood")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run JupyterLab (its arguments follow), ending with OnDemand's job script")
    p = sub.add_parser("config", help="print JupyterLab's configuration; the password comes on stdin")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--kernelspec", default=KERNELSPEC_NAME)
    p.add_argument("--allow-origin", default="", help="the portal's origin, e.g. https://ondemand.example.org "
                   "(without it, only JupyterLab's own origin)")
    args = parser.parse_args(argv)
    password = sys.stdin.read()
    if not password:
        print("no password on stdin", file=sys.stderr)
        return 2
    from jupyter_server.auth import passwd

    sys.stdout.write(jupyter_config(host=args.host, port=args.port, root=args.root,
                                    hashed_password=passwd(password), kernelspec=args.kernelspec,
                                    allow_origin=args.allow_origin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
