"""The ``hpc-kernel`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import DamagedState, HpcKernelsError, ProfileError, RelayError
from .launcher import (
    KernelView,
    abandon_resume,
    ensure_relay,
    gone_reason,
    interrupt,
    job_submit_time,
    resume_request,
    kernel_script,
    resolve_request,
    relay_connection_file,
    remove_damaged,
    shutdown,
    submit,
    view,
    view_all,
)
from .oci_archive import DEFAULT_OCI_REFERENCE
from .paths import exposes_private_files, private_paths
from .terminal import shown
from .profiles import (
    KernelRequest,
    Profile,
    RELAY_TRANSPORTS,
    apply_request,
    available_profiles,
    default_profile_name,
    load_profile,
    parse_profile,
    validate_profile,
)
from .python_env import EnvReport
from .slurm import sbatch_test_only
from .state import damaged_kernels, kernel_files, list_records


def _progress(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _workspace(args: argparse.Namespace) -> str | None:
    if args.no_workspace:
        return None
    if args.workspace:
        return str(Path(args.workspace).resolve())
    cwd = str(Path.cwd().resolve())
    if exposes_private_files(cwd, *private_paths()):
        args.workspace_note = (f"not binding {cwd} as the workspace (it holds your home directory); the kernel "
                               "starts in a private /tmp. Use --workspace DIR to bind a project directory.")
        return None
    return cwd


def _say_workspace_note(args: argparse.Namespace) -> None:
    if getattr(args, "workspace_note", None):
        _progress(args.workspace_note)


def _profile_name(args: argparse.Namespace) -> str:
    name = args.profile or default_profile_name()
    if not name:
        known = ", ".join(sorted(available_profiles())) or "none"
        raise HpcKernelsError(f"give --profile NAME (or set HPC_KERNELS_PROFILE); known profiles: {known}")
    return name


def _request(args: argparse.Namespace, profile_name: str) -> KernelRequest:
    return KernelRequest(
        name=args.name or profile_name,
        time=args.time,
        cpus=args.cpus,
        mem=args.mem,
        partition=args.partition,
        gpus=args.gpus,
        image=args.image,
        workspace=_workspace(args),
        workspace_rw=args.rw,
        allocation=None if args.new_job else os.environ.get("SLURM_JOB_ID") or None,
        relay=args.relay,
        time_warning=args.time_warning,
        allow_hosts=tuple(args.allow_host or ()),
        idle_timeout=getattr(args, "idle_timeout", None),
        python_env=python_env_argument(args),
    )


def python_env_argument(args: argparse.Namespace) -> str | None:
    """``--python-env``, absolute (relative to the current directory)."""
    given = getattr(args, "python_env", None)
    return os.path.abspath(os.path.expanduser(given)) if given else None


def cmd_render(args: argparse.Namespace) -> int:
    profile_name = _profile_name(args)
    request = _request(args, profile_name)
    script = kernel_script(resolve_request(profile_name, request), request.name, request.allocation)
    _say_workspace_note(args)
    if args.test_only and request.allocation:
        raise HpcKernelsError(f"inside an allocation (job {request.allocation}) nothing is submitted, so there is "
                              "nothing for sbatch --test-only to judge; use --new-job to test a new job")
    if args.test_only:
        print(sbatch_test_only(script))
    else:
        sys.stdout.write(script)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    if args.resume:
        profile_name, request = resume_request(args.resume, _request(args, args.resume))
        profile_name = args.profile or profile_name
        _progress(f"resuming kernel {args.resume} from {request.restore}")
    else:
        profile_name = _profile_name(args)
        request = _request(args, profile_name)
    record = submit(profile_name, request)
    _say_workspace_note(args)
    if args.no_wait:
        print(record.job_id)
        return 0
    if record.step is not None:
        _progress(f"started kernel {record.name} as a step of job {record.job_id} (your allocation)")
    else:
        _progress(f"submitted job {record.job_id} for kernel {record.name}")
    try:
        connection_file = ensure_relay(record.name, timeout=args.timeout, progress=_progress)
    except KeyboardInterrupt:
        _progress(f"interrupted: ending kernel {record.name}")
        if request.restore:
            abandon_resume(record.name, "interrupted while it started; `hpc-kernel submit --resume` tries again")
        else:
            shutdown(record.name, progress=_progress)
        return 130
    except RelayError as e:  # the kernel is ready but cannot be reached: it would only hold its job
        if request.restore:
            abandon_resume(record.name, f"its relay failed: {str(e).splitlines()[0]}")
        else:
            shutdown(record.name, graceful_timeout=0)
        raise RelayError(f"{e}\nkernel {record.name} was shut down and job {record.job_id} ended; "
                         "`hpc-kernel doctor` tries each transport") from None
    print(connection_file)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from .execute import execute

    code = sys.stdin.read() if args.code == "-" else args.code
    connection_file = ensure_relay(args.name, timeout=args.wait_timeout, progress=_progress)
    since = job_submit_time(args.name)
    return 0 if execute(connection_file, code, timeout=args.timeout, gone=lambda: gone_reason(args.name, since)) else 1


def cmd_connect(args: argparse.Namespace) -> int:
    print(ensure_relay(args.name, timeout=args.timeout, progress=_progress))
    return 0


REQUEUED_MESSAGE = ("Slurm requeued the job (its node failed, or it was preempted): the kernel that ran before is "
                    "gone with its variables; this is a new kernel in the same job")


def _summary(current: KernelView) -> dict[str, object]:
    record, job = current.record, current.job
    files = kernel_files(record.name)
    return {
        "name": record.name,
        "state": current.state,
        "job_id": record.job_id,
        "mode": "on the frontend's node" if record.on_node else "step of your allocation" if record.step else "own job",
        "slurm_state": job.state if job else "(gone)",
        "slurm_reason": job.reason if job else "",
        "node": current.node,
        "profile": record.profile,
        "workspace": record.workspace,
        "workspace_rw": record.workspace_rw,
        "created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created)),
        "connection_file": str(relay_connection_file(files) or ""),
        "log": str(files.log),
        "message": record.message or current.agent.get("message", "") or (REQUEUED_MESSAGE if current.requeued else ""),
        "requeued": current.requeued,
    }


def cmd_list(args: argparse.Namespace) -> int:
    rows = [_summary(current) for current in view_all()]
    damaged = damaged_kernels()
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        columns = ["name", "state", "job_id", "node", "profile", "created"]
        _table(columns, [[str(row[c] or "-") for c in columns] for row in rows])
    elif not damaged:
        print("no kernels", file=sys.stderr)
    for problem in damaged:
        print(f"hpc-kernel: error: {problem}", file=sys.stderr)
    return 1 if damaged else 0


def _table(columns: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def cmd_status(args: argparse.Namespace) -> int:
    summary = _summary(view(args.name))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        width = max(len(k) for k in summary)
        for key, value in summary.items():
            if value not in ("", None):  # the message may quote the kernel's own output
                print(shown(f"{key.replace('_', ' '):<{width}}  {value}", sys.stdout))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    files = kernel_files(args.name)
    if not files.dir.is_dir():
        view(args.name)  # raises KernelNotFound with the list of kernels
    path = files.relay_log if args.relay else files.log
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
            print(shown("\n".join(lines[-args.lines:] if args.lines else lines), sys.stdout))
            while args.follow:
                chunk = f.read()
                if chunk:
                    sys.stdout.write(shown(chunk.decode(errors="replace"), sys.stdout))
                    sys.stdout.flush()
                else:
                    time.sleep(0.5)
    except FileNotFoundError:
        print(f"no log yet: {path}", file=sys.stderr)
    return 0


def cmd_profiles_list(args: argparse.Namespace) -> int:
    rows = []
    for name, path in sorted(available_profiles().items()):
        try:
            profile = parse_profile(path)
            rows.append([name, str(path), profile.get("runtime", "kind"),
                         profile.get("slurm", "partition") or "(default)", profile.description])
        except ProfileError as e:
            rows.append([name, str(path), "-", "-", f"INVALID: {str(e).splitlines()[0]}"])
    _table(["name", "source", "runtime", "partition", "description"], rows)
    return 0


def cmd_profiles_show(args: argparse.Namespace) -> int:
    profile = load_profile(args.name)
    print(f"# profile {profile.name} ({profile.source})")
    if profile.description:
        print(f"description: {json.dumps(profile.description)}")
    for section, values in profile.settings.items():
        print(f"{section}:")
        for key, value in values.items():
            line = f"  {key}: {json.dumps(value)}"
            if args.explain:
                line = f"{line:<60}  # {profile.origins.get(f'{section}.{key}', 'default')}"
            print(line)
    return 0


def cmd_profiles_validate(args: argparse.Namespace) -> int:
    failed = 0
    for file in args.files:
        path = Path(file).resolve()
        try:
            # A profile may extend its neighbours: look beside it first.
            profile = parse_profile(path, first=[path.parent])
            print(f"ok: {file} (runtime {profile.get('runtime', 'kind')}, "
                  f"partition {profile.get('slurm', 'partition') or '(default)'})")
        except ProfileError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def cmd_interrupt(args: argparse.Namespace) -> int:
    _progress(interrupt(args.name))
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from .images import build_image, export_oci, image_definition

    if args.definition:
        if args.source or args.packages:
            raise HpcKernelsError("--definition FILE is the whole recipe: it goes without --from and --package")
        try:
            definition = Path(args.definition).read_text()
        except OSError as e:
            raise HpcKernelsError(f"--definition {args.definition}: {e.strerror}") from None
    else:
        definition = image_definition(args.source, mirror=args.mirror, packages=args.packages or ())
    if args.print_definition:
        sys.stdout.write(definition)
        return 0
    if not args.output:
        raise HpcKernelsError("name the image to build: hpc-kernel image build OUTPUT.sif (or OUTPUT.tar --format oci)")
    if args.format == "oci":
        with tempfile.TemporaryDirectory(prefix="hk-image-") as work:
            sif = Path(work) / "kernel.sif"
            build_image(sif, definition, apptainer=args.apptainer)
            export_oci(sif, Path(args.output), args.name, apptainer=args.apptainer, compressed=args.gzip)
        _progress(f"built {Path(args.output).resolve()} (OCI archive, image {args.name}); "
                  "podman loads it: set runtime.image and runtime.image_archive")
        return 0
    build_image(Path(args.output), definition, apptainer=args.apptainer)
    _progress(f"built {Path(args.output).resolve()}; check it with `hpc-kernel image check {args.output}`")
    return 0


def _oci_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=DEFAULT_OCI_REFERENCE,
                        help=f"the image's name in the archive (default {DEFAULT_OCI_REFERENCE}); runtime.image")
    parser.add_argument("--gzip", action="store_true",
                        help="compress the layer (a smaller archive, a slower first start on each node)")


def cmd_image_export(args: argparse.Namespace) -> int:
    from .images import export_oci

    digest = export_oci(Path(args.image), Path(args.output), args.name, apptainer=args.apptainer,
                        compressed=args.gzip)
    _progress(f"wrote {Path(args.output).resolve()}: image {args.name} ({digest}); "
              f"`podman load --input {args.output}` takes it")
    return 0


def cmd_image_check(args: argparse.Namespace) -> int:
    from .images import archive_reference, check_image, check_podman_image, scratch_podman

    given, apptainer, python = args.image, args.apptainer, "python3"
    # An OCI archive (.tar) given is checked with podman, its image named by the archive.
    archive = Path(given) if given and given.endswith(".tar") else None
    kind, image = ("podman", None) if archive else ("apptainer", given)
    podman: dict[str, object] = {"podman_command": args.podman}
    if args.profile:
        profile = load_profile(args.profile)
        kind = profile.get("runtime", "kind")
        if kind not in ("apptainer", "podman"):
            raise HpcKernelsError(f"profile {args.profile} runs kernels in {kind}, not in an image")
        python = profile.get("kernel", "python") or python
        if kind == "apptainer":
            if archive:
                raise HpcKernelsError(f"{archive} is an OCI archive, for podman; profile {args.profile} runs Apptainer")
            image = image or profile.get("runtime", "image")
            apptainer = profile.get("runtime", "executable") or apptainer
        else:
            podman = dict(profile.section("runtime"))
            if not archive:
                image = image or profile.get("runtime", "image")
                archive = Path(profile.get("runtime", "image_archive") or "") if profile.get("runtime", "image_archive") else None
    if kind == "podman" and archive and not image:
        image = archive_reference(archive)
        if not image:
            raise HpcKernelsError(f"{archive}: not an OCI archive with an image name (its index.json)")
    if not image:
        raise HpcKernelsError("name an image, or a profile with --profile")
    if kind == "podman":
        with scratch_podman(podman) as (argv, env):
            report = check_podman_image(image, argv, archive=archive, env=env, python=python)
    else:
        report = check_image(image, apptainer=apptainer, python=python)
    if args.json:
        print(json.dumps({"image": report.image, "ok": report.ok, "problems": report.problems, **report.info}))
    else:
        for key in ("python", "ipykernel", "zmq", "jupyter_client"):
            if key in report.info:
                print(f"{key:15} {report.info[key] or '(missing)'}")
        for problem in report.problems:
            print(f"problem: {problem}")
        print(f"{image}: {'can run a kernel' if report.ok else 'cannot run a kernel'}")
    return 0 if report.ok else 1


def cmd_kernelspec_install(args: argparse.Namespace) -> int:
    from .kernelspecs import install, kernelspec

    profile_name = _profile_name(args)
    profile = load_profile(profile_name)
    python_env = python_env_argument(args)
    encryption = args.encryption
    if python_env or profile.get("kernel", "python_env"):
        # Refused now, not when a frontend starts it; the kernel's ipykernel decides CurveZMQ.
        report = _checked_env(profile, python_env or profile.get("kernel", "python_env"), args.image)
        if encryption == "auto":
            encryption = "curve" if _takes_curve(profile, report.ipykernel) else "none"
        _progress(f"the kernel will run {report.python} (Python {report.python_version}, ipykernel {report.ipykernel})")
    spec = kernelspec(profile, display_name=args.display_name, interrupt_mode=args.interrupt_mode,
                      launch_timeout=args.launch_timeout, mode=args.mode, encryption=encryption,
                      image=args.image, relay=args.relay, python_env=python_env,
                      provisioner=not args.argv_only)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    where = install(args.name or profile_name, spec, user=args.user, prefix=prefix)
    _progress(f"installed kernelspec {args.name or profile_name} ({spec['display_name']}) in {where}")
    return 0


def _with_image(profile: Profile, image: str | None) -> Profile:
    return apply_request(profile, KernelRequest(name=profile.name, image=image)) if image else profile


def _checked_env(profile: Profile, path: str, image: str | None = None) -> EnvReport:
    """The environment's verdict for ``profile`` (with ``image`` instead of its own); an error if
    it cannot run a kernel."""
    from .launcher import check_python_env

    report = check_python_env(_with_image(profile, image), path)
    if not report.ok:
        raise HpcKernelsError(f"--python-env {path}: cannot run the kernel:\n"
                              + "\n".join(f"  - {problem}" for problem in report.problems))
    return report


def _takes_curve(profile: Profile, ipykernel: str | None) -> bool:
    """The environment's ipykernel takes CurveZMQ keys (bubblewrap only: an image's is not known)."""
    from .kernelspecs import ipykernel_takes_curve

    return profile.get("runtime", "kind") == "bwrap" and ipykernel_takes_curve(ipykernel)


def cmd_env_check(args: argparse.Namespace) -> int:
    from .launcher import check_python_env

    name = args.profile or default_profile_name()
    # Without a profile: the defaults (bubblewrap, the default system paths).
    profile = _with_image(load_profile(name) if name else validate_profile({}, Path("defaults")), args.image)
    report = check_python_env(profile, os.path.abspath(os.path.expanduser(args.path)))
    if args.json:
        print(json.dumps(report.as_dict(), indent=1))
        return 0 if report.ok else 1
    rows = [
        ("environment", f"{report.path}" + (f" ({report.kind})" if report.kind else "")),
        ("python", f"{report.python or '(none)'}" + (f" ({report.python_version})" if report.python_version else "")),
        ("ipykernel", report.ipykernel or "(missing)"),
        ("made from", report.made_from or ""),
        ("needs glibc", report.glibc or ""),
        ("bound (ro)", "\n".join(report.binds)),
    ]
    for key, value in rows:
        if value:
            lines = value.splitlines()
            print(f"{key:12} {lines[0]}")
            for line in lines[1:]:
                print(f"{'':12} {line}")
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"problem: {problem}")
    print(f"{report.path}: {'can run a kernel' if report.ok else 'cannot run a kernel'}"
          f" (profile {profile.name}, {profile.get('runtime', 'kind')})")
    return 0 if report.ok else 1


def cmd_kernelspec_list(args: argparse.Namespace) -> int:
    from .kernelspecs import ours, profile_of

    found = ours()
    if not found:
        print("no hpc-kernels kernelspecs installed")
        return 0
    rows = [[name, str(profile_of(data)), str(data.get("display_name", "")), directory]
            for name, (directory, data) in sorted(found.items())]
    _table(["name", "profile", "display_name", "directory"], rows)
    return 0


def cmd_kernelspec_remove(args: argparse.Namespace) -> int:
    from .kernelspecs import remove

    _progress(f"removed kernelspec {args.name} from {remove(args.name)}")
    return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    names = [r.name for r in list_records()] + [d.kernel for d in damaged_kernels()] if args.all else args.names
    if args.all and not names:
        print("no kernels", file=sys.stderr)
        return 0
    if not names:
        raise HpcKernelsError("name a kernel to shut down, or give --all")
    failed = False
    for name in names:  # one that cannot be shut down does not keep the others running
        try:
            try:
                shutdown(name, progress=_progress)
            except DamagedState:
                remove_damaged(name, progress=_progress)
        except HpcKernelsError as e:
            print(f"hpc-kernel: error: {e}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from .mcp_server import main as serve

    return serve()


def cmd_doctor(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .doctor import format_verdicts, run_doctor

    verdicts = run_doctor(_profile_name(args), args.relay, timeout=args.timeout, progress=_progress)
    if args.json:
        print(json.dumps([asdict(v) for v in verdicts], indent=1))
    else:
        print(format_verdicts(verdicts))
    return 0 if all(v.works for v in verdicts) else 1


def add_resource_arguments(p: argparse.ArgumentParser) -> None:
    """What a job gets and what its sandbox shows, over the profile's values."""
    p.add_argument("--time", "-t", help="time limit, e.g. 2:00:00 (overrides the profile)")
    p.add_argument("--cpus", "-c", type=int, help="CPUs (overrides the profile)")
    p.add_argument("--mem", help="memory, e.g. 4G (overrides the profile)")
    p.add_argument("--partition", help="Slurm partition (overrides the profile)")
    p.add_argument("--gpus", "-g", help="GPUs: N or TYPE:N, 0 for none (overrides the profile)")
    p.add_argument("--image", help="kernel image for the apptainer runtime (overrides the profile)")
    p.add_argument("--workspace", "-w", help="directory bound into the sandbox (default: the current one)")
    p.add_argument("--no-workspace", action="store_true", help="bind no workspace")
    p.add_argument("--rw", action="store_true", help="bind the workspace read-write (default: read-only)")
    p.add_argument("--allow-host", action="append", metavar="HOST[:PORT]",
                   help="let the kernel reach this host over https through the node's proxy (repeatable; "
                        "adds to the profile's runtime.allow_hosts; default port 443)")
    p.add_argument("--time-warning", metavar="DURATION",
                   help="warn in the kernel's output this long before the time limit, e.g. 10m (0: never)")
    p.add_argument("--python-env", metavar="PATH",
                   help="run the kernel with the Python of this venv, uv, conda or pixi environment (it needs "
                        "ipykernel; checked before anything is queued; overrides the profile's kernel.python_env)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpc-kernel",
        description="Sandboxed Jupyter kernels on Slurm compute nodes, reached through a socket relay.",
    )
    parser.add_argument("--version", action="version", version=f"hpc-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_request_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--profile", "-p", help="site profile (default: $HPC_KERNELS_PROFILE, or the site's "
                       "profile named 'default')")
        p.add_argument("--name", "-n", help="a name for the kernel (default: the profile's name)")
        add_resource_arguments(p)
        p.add_argument("--new-job", action="store_true",
                       help="submit a new job even inside an allocation (default there: a step of it)")
        p.add_argument("--relay", choices=RELAY_TRANSPORTS,
                       help="how the relay reaches the kernel: srun, tcp or ssh; one the profile's relay.allow "
                       "names (default: its relay.transport)")

    p = sub.add_parser("submit", help="submit a kernel job and wait until the kernel is ready")
    add_request_arguments(p)
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--idle-timeout", metavar="DURATION",
                   help="hibernate after this long without a cell or a client, e.g. 30m (0: never); "
                        "saves the variables and ends the job")
    p.add_argument("--resume", metavar="NAME",
                   help="start hibernated kernel NAME again on a new job, with its variables")
    p.add_argument("--timeout", type=float, help="give up (and cancel the job) after this many seconds")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("render", help="print the batch script submit would send (nothing is submitted)")
    add_request_arguments(p)
    p.add_argument("--test-only", action="store_true", help="hand it to `sbatch --test-only` and print Slurm's verdict")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("profiles", help="site profiles: list, show, validate")
    profiles = p.add_subparsers(dest="profiles_command", required=True, metavar="SUBCOMMAND")
    q = profiles.add_parser("list", help="every profile on the search path: source, runtime, partition")
    q.set_defaults(func=cmd_profiles_list)
    q = profiles.add_parser("show", help="the fully merged profile")
    q.add_argument("name")
    q.add_argument("--explain", action="store_true", help="say where each value comes from (file:line or default)")
    q.set_defaults(func=cmd_profiles_show)
    q = profiles.add_parser("validate", help="check profile files; exit 1 on any error (for a site's CI)")
    q.add_argument("files", nargs="+", metavar="FILE")
    q.set_defaults(func=cmd_profiles_validate)

    p = sub.add_parser("exec", help="run code in a kernel, streaming its output")
    p.add_argument("name")
    p.add_argument("code", help="Python code, or - to read it from stdin")
    p.add_argument("--timeout", type=float, help="seconds to wait for the code to finish")
    p.add_argument("--wait-timeout", type=float, help="seconds to wait for a kernel that is not ready yet")
    p.set_defaults(func=cmd_exec)

    p = sub.add_parser("connect", help="print the login-side connection file (restarting the relay if needed)")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, help="seconds to wait for a kernel that is not ready yet")
    p.set_defaults(func=cmd_connect)

    p = sub.add_parser("list", help="list your kernels")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("status", help="show one kernel in detail")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="show a kernel job's log (agent and kernel output)")
    p.add_argument("name")
    p.add_argument("--lines", "-n", type=int, default=0, help="only the last N lines")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing as the log grows")
    p.add_argument("--relay", action="store_true", help="show the login-side relay's log instead")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("interrupt", help="interrupt the code a kernel runs (SIGINT to the kernel, through Slurm)")
    p.add_argument("name")
    p.set_defaults(func=cmd_interrupt)

    p = sub.add_parser("image", help="kernel images for the apptainer and podman runtimes: build, export, check")
    images = p.add_subparsers(dest="image_command", required=True, metavar="SUBCOMMAND")
    q = images.add_parser("build", help="build a kernel image (SIF) with Python and ipykernel")
    q.add_argument("output", nargs="?", metavar="OUTPUT.sif")
    q.add_argument("--from", dest="source", metavar="SOURCE",
                   help="a Debian suite (default bookworm), an image path, or a URI like docker://python:3.12-slim")
    q.add_argument("--mirror", default="http://deb.debian.org/debian", help="Debian mirror for a suite")
    q.add_argument("--package", dest="packages", action="append", metavar="PKG",
                   help="another Debian package to install (repeatable)")
    q.add_argument("--definition", metavar="FILE", help="build from this Apptainer definition instead")
    q.add_argument("--print-definition", action="store_true", help="print the definition and build nothing")
    q.add_argument("--apptainer", default="apptainer", help="the apptainer binary (default: on PATH)")
    q.add_argument("--format", choices=("sif", "oci"), default="sif",
                   help="sif (Apptainer, the default) or oci: an OCI archive for the podman runtime")
    _oci_options(q)
    q.set_defaults(func=cmd_image_build)
    q = images.add_parser("export", help="turn an Apptainer image into an OCI archive that podman loads")
    q.add_argument("image", metavar="IMAGE.sif")
    q.add_argument("output", metavar="OUTPUT.tar")
    q.add_argument("--apptainer", default="apptainer", help="the apptainer binary (default: on PATH)")
    _oci_options(q)
    q.set_defaults(func=cmd_image_export)
    q = images.add_parser("check", help="say whether an image can run a kernel (before anyone queues)")
    q.add_argument("image", nargs="?", help="an Apptainer image, or an OCI archive (.tar) for podman")
    q.add_argument("--profile", "-p", help="check this profile's image, with its runtime settings")
    q.add_argument("--apptainer", default="apptainer", help="the apptainer binary (default: on PATH)")
    q.add_argument("--podman", default="podman", help="the podman command for an OCI archive (default: on PATH)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_image_check)

    p = sub.add_parser("kernelspec", help="Jupyter kernelspecs that start these kernels: install, list, remove")
    specs = p.add_subparsers(dest="kernelspec_command", required=True, metavar="SUBCOMMAND")
    q = specs.add_parser("install", help="install a kernelspec for a profile (what JupyterLab & co. list)")
    q.add_argument("--profile", "-p", help="site profile (default: $HPC_KERNELS_PROFILE, or 'default')")
    q.add_argument("--name", "-n", help="the kernelspec's name (default: the profile's)")
    q.add_argument("--display-name", help="what frontends show (default: the profile's kernel.display_name)")
    q.add_argument("--interrupt-mode", default="signal", choices=["signal", "message"],
                   help="signal: SIGINT through Slurm; message: interrupt_request over the relay")
    q.add_argument("--launch-timeout", type=float, help="give up a start (and cancel the job) after S seconds")
    q.add_argument("--image", help="kernel image for an apptainer profile (instead of the profile's)")
    q.add_argument("--relay", choices=RELAY_TRANSPORTS, help="the relay's transport (one of the profile's relay.allow)")
    q.add_argument("--python-env", metavar="PATH",
                   help="run the kernel with the Python of this venv, uv, conda or pixi environment (checked now)")
    q.add_argument("--encryption", default="auto", choices=["auto", "curve", "none"],
                   help="declare CurveZMQ support (frontends then encrypt with transport_encryption=auto); "
                   "auto: when the kernel is known to support it (bubblewrap with ipykernel >= 7.3)")
    q.add_argument("--mode", default="auto", choices=["auto", "job", "node"],
                   help="job: a Slurm job reached through the relay; node: the sandbox on the frontend's own "
                   "node (it runs in a job); auto (default): node inside a job on a compute node, else job")
    q.add_argument("--argv-only", action="store_true",
                   help="name no provisioner: every frontend runs the argv (the bridge). For a Jupyter tool in an "
                   "environment without hpc-kernels (an nbgrader of its own), whose jupyter_client hides a "
                   "kernelspec naming a provisioner it does not have")
    where = q.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for you only (the default without root)")
    where.add_argument("--sys-prefix", action="store_true", help="into this Python environment")
    where.add_argument("--prefix", help="under this prefix (share/jupyter/kernels)")
    q.set_defaults(func=cmd_kernelspec_install)
    q = specs.add_parser("list", help="the installed kernelspecs that use hpc-kernels")
    q.set_defaults(func=cmd_kernelspec_list)
    q = specs.add_parser("remove", help="remove one")
    q.add_argument("name")
    q.set_defaults(func=cmd_kernelspec_remove)

    p = sub.add_parser("env", help="your own Python environments for kernels: check")
    envs = p.add_subparsers(dest="env_command", required=True, metavar="SUBCOMMAND")
    q = envs.add_parser("check", help="say whether a venv, uv, conda or pixi environment can run a kernel, and "
                        "what the sandbox will show of it (exit 1 if it cannot)")
    q.add_argument("path", metavar="PATH")
    q.add_argument("--profile", "-p", help="site profile (default: $HPC_KERNELS_PROFILE, or 'default')")
    q.add_argument("--image", help="with an apptainer profile: try it in this image instead of the profile's")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_env_check)

    from .cli_batch import add_batch_parser

    add_batch_parser(sub)

    from .cli_ood import add_ood_parser

    add_ood_parser(sub)

    p = sub.add_parser("shutdown", help="shut a kernel down: job ended, relay stopped, state removed")
    p.add_argument("names", nargs="*", metavar="name")
    p.add_argument("--all", action="store_true", help="every kernel of yours")
    p.set_defaults(func=cmd_shutdown)

    p = sub.add_parser("mcp", help="serve your kernels to a coding agent: a Model Context Protocol server on stdio")
    p.set_defaults(func=cmd_mcp)

    p = sub.add_parser("doctor", help="try the relay's transports a profile allows on a short test job")
    p.add_argument("--profile", "-p", help="site profile (default: $HPC_KERNELS_PROFILE, or 'default')")
    p.add_argument("--relay", action="append", choices=RELAY_TRANSPORTS, default=[],
                   help="try only this transport (repeatable; default: every one in the profile's relay.allow)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the test kernel (default 300)")
    p.add_argument("--json", action="store_true", help="the verdicts as JSON")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except HpcKernelsError as e:
        print(f"hpc-kernel: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
