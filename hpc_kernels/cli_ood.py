"""``hpc-kernel ood``: the Open OnDemand app."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .cli import _progress
from .errors import HpcKernelsError
from .profiles import (
    SYSTEM_PROFILE_DIR,
    available_profiles,
    default_profile_name,
    load_profile,
)
from .resources import data_dir


def _site_profiles() -> list[str]:
    """Without --profile: the site's own profiles (not the examples shipped with hpc-kernels)."""
    shipped = data_dir("site-configs").resolve()
    return [name for name, path in sorted(available_profiles().items()) if path.resolve().parent != shipped]


def _hpc_kernel(python: str | None) -> str:
    """The nodes' hpc-kernel: beside --python, else beside the Python running this."""
    if python:
        return str(Path(python).parent / "hpc-kernel")
    beside = Path(sys.executable).parent / "hpc-kernel"
    return str(beside) if beside.exists() else str(Path(sys.argv[0]).resolve())


def cmd_install(args: argparse.Namespace) -> int:
    from .ood import app_files, cluster_name, default_python, install, partition_limits

    names = list(dict.fromkeys(args.profiles or _site_profiles()))
    if not names:
        raise HpcKernelsError(f"no site profiles found (in {SYSTEM_PROFILE_DIR} or $HPC_KERNELS_PROFILE_PATH); "
                              "name the profiles to offer with --profile (repeatable)")
    profiles = [load_profile(name) for name in names]
    default = args.default or (default_profile_name() if default_profile_name() in names else names[0])
    cluster = args.cluster or cluster_name()
    if not cluster:
        raise HpcKernelsError("Slurm did not say its ClusterName: give --cluster (the name of OnDemand's cluster file)")
    limits, default_partition = partition_limits()
    if not limits:
        _progress("sinfo did not answer: the form will not check partitions, hours, cores, memory or GPUs")
    if not args.portal_url:
        raise HpcKernelsError("give --portal-url (the OnDemand portal's URL, e.g. https://ondemand.example.org): "
                              "behind OnDemand's proxy the browser's requests come from the portal's origin, and "
                              "JupyterLab accepts requests from that origin only, and loads scripts from it only")
    files = app_files(profiles, default, cluster=cluster, limits=limits, default_partition=default_partition,
                      hpc_kernel=args.hpc_kernel or _hpc_kernel(args.python),
                      python=args.python or default_python(profiles), portal_url=_origin(args.portal_url),
                      title=args.title)
    if args.print:
        for path, text in files.items():
            print(f"==> {path} <==\n{text}")
        return 0
    if not args.dest:
        raise HpcKernelsError("name the app's directory: hpc-kernel ood install DEST "
                              "(e.g. /var/www/ood/apps/sys/hpc_jupyter, or ~/ondemand/dev/hpc_jupyter)")
    install(Path(args.dest), files)
    _progress(f"installed the OnDemand app in {Path(args.dest).absolute()} for cluster {cluster}, profiles "
              f"{', '.join(names)} (default {default})")
    return 0


def _origin(url: str | None) -> str:
    """``https://ondemand.example.org/pun/sys/dashboard`` -> ``https://ondemand.example.org``."""
    if not url:
        return ""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HpcKernelsError(f"--portal-url {url!r}: expected the portal's URL, e.g. https://ondemand.example.org")
    return f"{parts.scheme}://{parts.netloc}"


def add_ood_parser(sub: Any) -> None:
    p = sub.add_parser("ood", help="the Open OnDemand app: JupyterLab on a node, kernels sandboxed")
    commands = p.add_subparsers(dest="ood_command", required=True, metavar="SUBCOMMAND")
    q = commands.add_parser("install", help="write the app for this site (system or a user's dev directory)")
    q.add_argument("dest", nargs="?", metavar="DEST")
    q.add_argument("--profile", "-p", dest="profiles", action="append", metavar="P",
                   help="a profile to offer (repeatable; default: every site profile)")
    q.add_argument("--default", help="the profile preselected in the form (default: the site's default)")
    q.add_argument("--cluster", help="OnDemand's cluster name (default: Slurm's ClusterName)")
    q.add_argument("--title", default="JupyterLab (sandboxed kernels)", help="the app's name in OnDemand")
    q.add_argument("--python", help="the Python with JupyterLab and hpc-kernels on the nodes "
                   "(default: the profiles' paths.python)")
    q.add_argument("--hpc-kernel", help="the hpc-kernel command on the nodes (default: beside --python)")
    q.add_argument("--portal-url", help="the OnDemand portal's URL (required): JupyterLab accepts requests from "
                   "its origin only, and loads scripts from it only")
    q.add_argument("--print", action="store_true", help="print the files instead of writing them")
    q.set_defaults(func=cmd_install)
