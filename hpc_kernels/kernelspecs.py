"""Kernelspecs that start hpc-kernels through the provisioner: what Jupyter frontends list.

``kernelspec(...)`` is pure (the kernel.json data); ``install`` writes it with jupyter_client's
own KernelSpecManager, so it lands where every frontend looks (``--user``, ``--sys-prefix`` or a
``--prefix``).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from .bridge import argv_options
from .errors import HpcKernelsError
from .processes import python_module
from .profiles import KernelRequest, Profile, apply_request, check_kernel_name

PROVISIONER_NAME = "hpc-kernels"
BRIDGE_MODULE = "hpc_kernels.bridge"
INTERRUPT_MODES = ("signal", "message")


MODES = ("auto", "job", "node")


ENCRYPTIONS = ("auto", "curve", "none")
# ipykernel takes CurveZMQ keys from its connection file since 7.3 (and jupyter_client 8.9 gives them).
CURVE_IPYKERNEL = (7, 3)


def kernelspec(profile: Profile, *, display_name: str | None = None, interrupt_mode: str = "signal",
               launch_timeout: float | None = None, mode: str = "auto", encryption: str = "auto",
               python: str = sys.executable, image: str | None = None, relay: str | None = None,
               python_env: str | None = None, provisioner: bool = True) -> dict[str, Any]:
    """The kernel.json of a kernelspec that runs ``profile``'s kernels through the provisioner
    (``image``: an Apptainer image instead of the profile's; ``relay``: a transport of the
    profile's ``relay.allow`` instead of its ``relay.transport``; ``python_env``: the user's own
    Python environment for the kernel, checked by the caller). Without ``provisioner``, it names
    none and every frontend runs its argv (the bridge): jupyter_client hides a kernelspec whose
    provisioner is not installed in its own environment (an nbgrader in an environment of its own)."""
    if interrupt_mode not in INTERRUPT_MODES:
        raise HpcKernelsError(f"--interrupt-mode {interrupt_mode!r}: expected one of {', '.join(INTERRUPT_MODES)}")
    if encryption not in ENCRYPTIONS:
        raise HpcKernelsError(f"--encryption {encryption!r}: expected one of {', '.join(ENCRYPTIONS)}")
    if mode not in MODES:
        raise HpcKernelsError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    config: dict[str, Any] = {"profile": profile.name}
    if image:
        if profile.get("runtime", "kind") != "apptainer":
            raise HpcKernelsError(f"--image: profile {profile.name} runs kernels in {profile.get('runtime', 'kind')}, "
                                  "not in an image")
        config["image"] = image
    if relay:
        apply_request(profile, KernelRequest(name=profile.name, relay=relay))  # refused as submit would refuse it
        config["relay"] = relay
    if python_env:
        config["python_env"] = python_env
    if mode != "auto":
        config["mode"] = mode
    if launch_timeout:
        config["launch_timeout"] = launch_timeout
    metadata: dict[str, Any] = {"debugger": False}
    if provisioner:
        metadata["kernel_provisioner"] = {"provisioner_name": PROVISIONER_NAME, "config": config}
    if encryption == "curve" or (encryption == "auto" and kernel_supports_curve(profile, python)):
        metadata["supported_encryption"] = ["curve"]
    return {
        # Run only by frontends that ignore the provisioner (VS Code, PyCharm, ...): the bridge
        # does the provisioner's work for them.
        "argv": python_module(python, BRIDGE_MODULE, "-f", "{connection_file}", *argv_options(config)),
        "display_name": display_name or profile.get("kernel", "display_name") or f"Python 3 ({profile.name})",
        "language": profile.get("kernel", "language"),
        "interrupt_mode": interrupt_mode,
        "metadata": metadata,
    }


def kernel_supports_curve(profile: Profile, python: str) -> bool:
    """Whether the profile's kernel takes CurveZMQ keys: known only for bubblewrap running this
    very Python (the site's hpc-kernels environment, the same on login and compute nodes). An
    image's ipykernel is unknown here: say so with --encryption curve."""
    kernel_python = profile.get("kernel", "python") or profile.get("paths", "python") or python
    if profile.get("runtime", "kind") != "bwrap" or kernel_python != python:
        return False
    try:
        import ipykernel
    except ImportError:
        return False
    return ipykernel_takes_curve(ipykernel.__version__)


def ipykernel_takes_curve(version: str | None) -> bool:
    """Whether an ipykernel of this version takes CurveZMQ keys from its connection file."""
    return tuple(int(n) for n in re.findall(r"\d+", version or "")[:2]) >= CURVE_IPYKERNEL


def install(name: str, spec: dict[str, Any], *, user: bool = False, prefix: str | None = None) -> str:
    """Install the kernelspec ``name``; returns the directory it went to."""
    from jupyter_client.kernelspec import KernelSpecManager

    check_kernel_name(name)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / name
        source.mkdir()
        (source / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        try:
            return str(KernelSpecManager().install_kernel_spec(str(source), name, user=user, prefix=prefix))
        except OSError as e:
            raise HpcKernelsError(f"cannot install kernelspec {name}: {e}; try --user") from None


def profile_of(spec: dict[str, Any]) -> str | None:
    """The profile of a kernelspec of ours (its provisioner's config, or the bridge's --profile
    in the argv of one without provisioner); None for a kernelspec that is not ours."""
    provisioner = (spec.get("metadata") or {}).get("kernel_provisioner") or {}
    if provisioner.get("provisioner_name") == PROVISIONER_NAME:
        return str((provisioner.get("config") or {}).get("profile", "?"))
    argv = spec.get("argv") or []
    for i, word in enumerate(argv[:-1]):
        if word == "-m" and argv[i + 1] == BRIDGE_MODULE:
            options = argv[i + 2:]
            return str(options[options.index("--profile") + 1]) if "--profile" in options[:-1] else "?"
    return None


def ours() -> dict[str, tuple[str, dict[str, Any]]]:
    """The installed kernelspecs that start hpc-kernels (through the provisioner, or the bridge
    alone): name -> (directory, kernel.json)."""
    from jupyter_client.kernelspec import KernelSpecManager

    found = {}
    for name, directory in KernelSpecManager().find_kernel_specs().items():
        try:
            data = json.loads((Path(directory) / "kernel.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and profile_of(data) is not None:
            found[name] = (directory, data)
    return found


def remove(name: str) -> str:
    from jupyter_client.kernelspec import KernelSpecManager

    if name not in ours():
        raise HpcKernelsError(f"no hpc-kernels kernelspec named {name!r} (see `hpc-kernel kernelspec list`)")
    try:
        return str(KernelSpecManager().remove_kernel_spec(name))
    except OSError as e:
        raise HpcKernelsError(f"cannot remove kernelspec {name}: {e}") from None
