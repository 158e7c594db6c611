"""The adversary: kernel code is hostile, and tries to get out of its sandbox.

Each test is an attack written as code in the kernel would write it (with a read-write
workspace, the most a user gives it), followed by what the user does next, asserting that the
attack fails. Each fix's test was seen to succeed against the code before it (the docstring says
what the attack did then), so none passes vacuously; a probe that held before too says so.
docs/security.md lists every attack with its defence.

Cluster tests, as the unprivileged user, for every runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import RELAY_RECORD, hk, make_workspace, run

pytestmark = pytest.mark.cluster


@pytest.fixture
def loot() -> Iterator[Path]:
    """A directory of the user's, outside every workspace and hidden from the sandbox (it is under
    the home directory): what a planted module writes here ran outside the sandbox."""
    path = Path.home() / f"hk-escape-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def rw_workspace() -> Iterator[Path]:
    path = make_workspace()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def payload(loot: Path, label: str) -> str:
    """A module body that, wherever it is imported, records where and by what."""
    if label == "pth":
        return f"import os; open({str(loot)!r} + '/pth-' + str(os.getpid()), 'w').write('pth')\n"
    return textwrap.dedent(f"""
        import os as _os, socket as _socket, sys as _sys
        try:
            with open({str(loot)!r} + "/{label}-" + str(_os.getpid()), "w") as _f:
                _f.write(_socket.gethostname() + " " + " ".join(_sys.argv))
        except OSError:
            pass
        """)


# Modules a process of ours might import from its working directory, were it on sys.path: our
# own package (every "python -m hpc_kernels.X" would import the planted one) and standard
# modules imported late (stringprep, when the egress proxy resolves a name).
PLANTS = {
    "hpc_kernels/__init__.py": "package",
    "hpc_kernels/agent.py": "agent",
    "hpc_kernels/relay.py": "relay",
    "stringprep.py": "stringprep",
    "sitecustomize.py": "sitecustomize",
    "usercustomize.py": "usercustomize",
    "jupyterlab/__init__.py": "jupyterlab",
    "zz-planted.pth": "pth",  # a .pth runs its "import" lines, were the directory a site directory
}


def plant(kernel_name: str, loot: Path) -> None:
    """The kernel writes the modules into its workspace, its working directory."""
    files = {path: payload(loot, label) for path, label in PLANTS.items()}
    code = textwrap.dedent(f"""
        import json, os
        for path, body in json.loads({json.dumps(json.dumps(files))}).items():
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(body)
        # The loot directory is not reachable from here (home is hidden): only code outside can write it.
        try:
            open({str(loot)!r} + "/from-the-sandbox", "w").write("x")
        except OSError as e:
            print("sandbox:", e)
        print(sorted(os.listdir(".")))
        """)
    out = hk("exec", kernel_name, code).stdout
    assert "hpc_kernels" in out and "stringprep.py" in out, out


def escaped(loot: Path) -> list[str]:
    return sorted(f"{p.name}: {p.read_text()}" for p in loot.iterdir())


def hk_in(cwd: Path, *args: str, check: bool = True, env: dict[str, str] | None = None,
          timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``hpc-kernel`` run from ``cwd``, as a user in their project directory runs it."""
    proc = subprocess.run(["hpc-kernel", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"hpc-kernel {' '.join(args)} exited {proc.returncode}\n{proc.stderr}")
    return proc


def test_modules_planted_in_a_writable_workspace_never_run_outside_the_sandbox(
        cluster: None, runtime_profile: str, rw_workspace: Path, loot: Path, tmp_path: Path) -> None:
    """Before the fix, the interrupt step ran ``python -m hpc_kernels.agent`` in the user's
    working directory, the workspace: the kernel's ``hpc_kernels/agent.py`` ran on the node,
    outside the sandbox, with the user's home and network (it wrote ``package-*`` and
    ``agent-*`` here, saying ``c1 ... -m hpc_kernels.agent interrupt``); so did the agent of a
    kernel started inside an allocation, and the node side of a relay started from there.
    Now every process of ours outside the sandbox runs isolated (``python -I``) and in ``/``."""
    ws = rw_workspace
    name = f"esc-{uuid.uuid4().hex[:6]}"
    hk_in(ws, "submit", "--profile", runtime_profile, "--name", name, "--rw")
    second = f"esc2-{uuid.uuid4().hex[:6]}"
    step = f"escs-{uuid.uuid4().hex[:6]}"
    allocation = None
    try:
        plant(name, loot)
        # What a user does next, from the same directory.
        hk_in(ws, "interrupt", name)
        hk_in(ws, "status", name)
        hk_in(ws, "list")
        hk_in(ws, "connect", name)
        hk_in(ws, "exec", name, "print('still here')")
        # The relay is restarted from here (its daemon and the node side's srun).
        state_dir = Path(json.loads(hk("status", name, "--json").stdout)["log"]).parent
        os.kill(int(json.loads((state_dir / RELAY_RECORD).read_text())["pid"]), 9)
        hk_in(ws, "connect", name)
        hk_in(ws, "exec", name, "print('again')")
        # A second kernel submitted from the same directory, and one inside an allocation.
        hk_in(ws, "submit", "--profile", runtime_profile, "--name", second, "--rw")
        hk_in(ws, "exec", second, "print(1)")
        granted = run(["salloc", "--no-shell", "--nodes=1", "--time=10"]).stderr
        allocation = granted.split("Granted job allocation ")[1].split()[0]
        hk_in(ws, "submit", "--profile", runtime_profile, "--name", step, "--rw", env={"SLURM_JOB_ID": allocation})
        hk_in(ws, "interrupt", step, env={"SLURM_JOB_ID": allocation})
        hk_in(ws, "exec", step, "print(2)")
        # A Jupyter frontend started in that directory (as `jupyter lab` is: a script, so the
        # directory is not on its sys.path): interrupt and restart go through the provisioner.
        spec_dir = tmp_path / "jupyter"
        hk("kernelspec", "install", "--profile", runtime_profile, "--name", "esc", "--prefix", str(spec_dir))
        frontend = textwrap.dedent("""
            from jupyter_client.manager import KernelManager
            km = KernelManager(kernel_name="esc")
            km.start_kernel()
            km.interrupt_kernel()
            km.restart_kernel()
            km.shutdown_kernel()
            print("frontend done")
            """)
        (tmp_path / "frontend.py").write_text(frontend)
        proc = subprocess.run([sys.executable, str(tmp_path / "frontend.py")], capture_output=True, text=True,
                              timeout=300, cwd=ws,
                              env={**os.environ, "JUPYTER_PATH": str(spec_dir / "share" / "jupyter")})
        assert "frontend done" in proc.stdout, proc.stderr
    finally:
        for n in (name, second, step):
            hk_in(ws, "shutdown", n, check=False, env={"SLURM_JOB_ID": allocation} if n == step and allocation else None)
        if allocation:
            run(["scancel", allocation], check=False)
    assert escaped(loot) == [], "code the kernel wrote ran outside the sandbox"


@pytest.fixture
def victim(cluster: None, runtime_profile: str) -> Iterator[str]:
    """A kernel of the profile's runtime, its workspace read-write."""
    ws = make_workspace()
    name = f"att-{uuid.uuid4().hex[:6]}"
    hk("submit", "--profile", runtime_profile, "--name", name, "--workspace", str(ws), "--rw")
    yield name
    hk("shutdown", name, check=False)
    shutil.rmtree(ws, ignore_errors=True)


def node_dir_of(name: str) -> str:
    state_dir = Path(json.loads(hk("status", name, "--json").stdout)["log"]).parent
    return json.loads((state_dir / "agent.json").read_text())["node_dir"]


def on_the_node(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """``argv`` as the user, on the kernel's node, outside the sandbox (a step of its job)."""
    status = json.loads(hk("status", name, "--json").stdout)
    return run(["srun", f"--jobid={status['job_id']}", "--overlap", "--chdir=/", *argv], check=False)


def test_no_unix_socket_of_the_node_is_in_the_sandbox(victim: str) -> None:
    """Before the fix, bubblewrap showed the whole node read-only: Slurm's spool directory with
    the job's step sockets (mode 0777: ``c1_<job>.<step>``), which accept STEP_TERMINATE from the
    job's owner, so a notebook could end the other tasks of a grading array; and munge's socket.
    Now the sandbox shows only the system paths (deny by default): the only unix sockets in it
    are the kernel's own."""
    code = textwrap.dedent("""
        import os, stat, sys
        found = []
        for top, dirs, files in os.walk("/"):
            if top in ("/proc", "/sys", "/dev"):
                dirs[:] = []
                continue
            for name in files:
                path = os.path.join(top, name)
                try:
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        found.append(path)
                except OSError:
                    pass
        print("\\n".join(found))
        print("node state:", [p for p in ("/var/lib/hpc-kernels-cluster", "/run/munge", "/var/spool/slurmd")
                              if os.path.exists(p)])
        """)
    out = hk("exec", victim, code, timeout=300).stdout.splitlines()
    sockets = [line for line in out if line.startswith("/")]
    own = node_dir_of(victim) + "/rw/"
    assert sockets and all(s.startswith(own) for s in sockets), sockets
    assert "node state: []" in out, out


def test_the_kernel_cannot_write_what_processes_outside_trust(victim: str) -> None:
    """Before the fix the whole node directory was bound read-write: kernel code rewrote
    ``client/connection.json`` (which a frontend on the node, with the network, reads at its next
    restart) and could forge the relay's client counts. Now only ``rw/`` (its sockets and
    reports) is writable, ``ro/`` (the deadline the agent keeps) is read-only, and the rest is not there."""
    code = textwrap.dedent("""
        import json, os, sys
        import ipykernel.connect
        conn = ipykernel.connect.get_connection_file()
        node_dir = os.path.dirname(os.path.dirname(conn))
        results = {}
        for rel in ("client/connection.json", "clients/999.json", "ro/deadline.json", "ro/evil", "evil"):
            path = os.path.join(node_dir, rel)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write('{"ip": "10.77.7.1", "shell_port": 1}')
                results[rel] = "written"
            except OSError as e:
                results[rel] = type(e).__name__
        print(json.dumps(results))
        """)
    said = json.loads(hk("exec", victim, code).stdout.strip().splitlines()[-1])
    assert said["ro/deadline.json"] != "written" and said["ro/evil"] != "written", said
    node_dir = node_dir_of(victim)
    listing = on_the_node(victim, "find", node_dir, "-maxdepth", "2").stdout.split()
    assert f"{node_dir}/client/connection.json" not in listing, listing
    assert f"{node_dir}/clients/999.json" not in listing and f"{node_dir}/evil" not in listing, listing
    assert "still here" in hk("exec", victim, "print('still here')").stdout


def test_kernel_code_cannot_make_a_user_namespace(victim: str) -> None:
    """Before the fix ``unshare -Ur true`` succeeded inside both runtimes: the whole user-namespace
    attack surface of the node's kernel was open to it. Now bwrap runs with --disable-userns and
    the agent sets user.max_user_namespaces to 0 in an Apptainer sandbox, so that unshare, clone
    and clone3 alike fail."""
    code = textwrap.dedent("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        r = libc.unshare(0x10000000)
        print("unshare:", r, os.strerror(ctypes.get_errno()) if r else "made one")
        pid = os.fork()
        if pid == 0:
            os._exit(1 if libc.unshare(0x10000000) == 0 else 0)  # 1: it made one
        print("child:", os.waitpid(pid, 0)[1] >> 8)
        print("CapEff:", [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0])
        """)
    out = hk("exec", victim, code).stdout
    assert "unshare: -1" in out and "made one" not in out, out
    assert "child: 0" in out, out
    assert "CapEff: 0000000000000000" in out, out


MEMFD_HOG = """
import os, time
fd = os.memfd_create("hog")
for _ in range(600):
    os.write(fd, b"\\x01" * (1 << 20))
print("written", flush=True)
time.sleep(60)
"""

TMPFS_FILL = """
import os
written = 0
try:
    with open("/tmp/fill", "wb") as f:
        for _ in range(600):
            f.write(b"\\x01" * (1 << 20))
            f.flush()
            written += 1
except OSError as e:
    print("stopped:", e.strerror)
print("MiB:", written)
"""


def test_memory_kept_in_a_memfd_or_the_sandboxs_tmp_counts(cluster: None, runtime_profile: str,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the fix, 1.5 GiB written to a memfd from a 1 GiB kernel was accepted (the node's
    Shmem grew, the kernel stayed ready): pages kept in a memfd or a tmpfs are in no process's
    resident size. Now they count: a kernel with a 400 MiB limit that writes 600 MiB into a memfd
    is ended, and exec and status say why."""
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(tmp_path))
    (tmp_path / "limited.yaml").write_text(f"extends: {runtime_profile}\nlimits:\n  memory: 400M\n")
    names = [f"shm-{uuid.uuid4().hex[:6]}", f"shm-{uuid.uuid4().hex[:6]}"]
    try:
        hk("submit", "--profile", "limited", "--name", names[0], "--no-workspace")
        proc = hk("exec", names[0], TMPFS_FILL, check=False, timeout=150)
        if proc.returncode == 0:  # the tmpfs was full first: bubblewrap sizes it to the limit
            assert "stopped:" in proc.stdout and int(proc.stdout.split("MiB:")[1]) <= 400, proc.stdout
        else:  # or the watch ended the kernel
            assert "over the limit of 400.0 MiB (limits.memory)" in proc.stderr, proc.stderr
        hk("submit", "--profile", "limited", "--name", names[1], "--no-workspace")
        proc = hk("exec", names[1], MEMFD_HOG, check=False, timeout=150)
        assert proc.returncode == 1 and "has ended" in proc.stderr, proc.stderr
        assert "over the limit of 400.0 MiB (limits.memory)" in proc.stderr, proc.stderr
        assert "in files in memory: tmpfs, memfd" in proc.stderr, proc.stderr
    finally:
        for name in names:
            hk("shutdown", name, check=False)


def test_the_nodes_abstract_unix_sockets_are_out_of_reach(victim: str) -> None:
    """Abstract unix sockets have no file to hide: they belong to a network namespace. A service
    of the user's on the node listening on one (as X11, D-Bus or a debugger may) cannot be reached
    from the sandbox, which has a network namespace of its own. (An attack beyond the issue's
    list that held before too: a probe that keeps it so, not a fix.)"""
    name = f"hk-escape-{uuid.uuid4().hex[:8]}"
    status = json.loads(hk("status", victim, "--json").stdout)
    listener = subprocess.Popen(
        ["srun", f"--jobid={status['job_id']}", "--overlap", "--chdir=/", "/usr/bin/python3", "-c",
         "import socket, sys, time\n"
         f"s = socket.socket(socket.AF_UNIX); s.bind('\\0{name}'); s.listen(1)\n"
         "print('listening', flush=True)\n"
         "s.settimeout(30)\n"
         "try:\n    s.accept(); print('ACCEPTED', flush=True)\nexcept OSError:\n    pass\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        out = hk("exec", victim, textwrap.dedent(f"""
            import socket
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect("\\0{name}")
                print("connected")
            except OSError as e:
                print("refused:", e.strerror)
            """)).stdout
        assert "refused: Connection refused" in out, out
    finally:
        listener.kill()
        listener.wait()
