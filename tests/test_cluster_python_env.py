"""``--python-env``: a user's own Python environment as the kernel's Python, on the real cluster.

Three real environments, made once for the module under the test user's home (shared with the
nodes), each with ipykernel from the tests' wheel cache (cluster/test-wheels.txt, offline) and a
small package that only it has (a wheel made here):

- ``venv``: ``/usr/bin/python3 -m venv``, its own pip;
- ``home-venv``: a venv made from a Python under the home directory (Debian's python3.11 binary,
  statically linked with libpython, and a copy of /usr/lib/python3.11): the sandbox must show
  that Python's directory too, which it does not show otherwise;
- ``uv``: ``uv venv`` and ``uv pip install --offline``.

Each runs a cell on a compute node, in bubblewrap and in the Apptainer image (Debian 12, as the
login node: its C library runs these interpreters), that imports its own package. Bad
environments are refused before anything is queued. conda and pixi cannot be installed here
(only PyPI, Debian and npm are reachable): their detection is unit-tested on directory layouts
(tests/test_python_env.py), never run for real.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sys
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from conftest import hk, run, start_kernel
from test_cluster_lifecycle import squeue_ids

WHEELS = Path("/var/cache/hpc-kernels/wheels")
SYSTEM_PYTHON = "/usr/bin/python3"
VENV_BIN = Path(sys.executable).parent  # the site venv: uv comes with the test extra


def python_of(env: Path) -> str:
    return str(env / "bin" / "python")


def tiny_wheel(directory: Path, module: str) -> Path:
    """A pure-Python wheel of one module, ``module.WHO == module``: what only one environment has."""
    dist = f"{module}-1.0"
    files = {
        f"{module}/__init__.py": f"WHO = {module!r}\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hpc-kernels-tests\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n",
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode().rstrip('=')},"
        f"{len(text.encode())}\n" for name, text in files.items()) + f"{dist}.dist-info/RECORD,,\n"
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in {**files, f"{dist}.dist-info/RECORD": record}.items():
            wheel.writestr(name, text)
    return path


@dataclass(frozen=True)
class Envs:
    root: Path
    paths: dict[str, Path]  # kind of test -> environment
    home_python: Path  # the Python under the home directory the home-venv is made from
    bare: Path  # a uv environment without ipykernel


def uv(*args: str) -> None:
    run(["uv", *args], env={"PATH": f"{VENV_BIN}:{os.environ['PATH']}", "UV_NO_CONFIG": "1"}, timeout=300)


@pytest.fixture(scope="module")
def envs(cluster: None) -> Iterator[Envs]:
    assert any(WHEELS.glob("ipykernel-*.whl")), f"no ipykernel wheel in {WHEELS}: run `make install`"
    root = Path.home() / "hk-test-envs" / uuid.uuid4().hex[:8]
    root.mkdir(parents=True)
    offline = ["--offline", "--no-index", "--find-links", str(WHEELS), "--cache-dir", str(root / "uv-cache")]
    try:
        # A venv of the system Python, with its own pip.
        venv = root / "venv"
        run([SYSTEM_PYTHON, "-m", "venv", str(venv)], timeout=120)
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
             "--find-links", str(WHEELS), "ipykernel", str(tiny_wheel(root, "only_in_venv"))], timeout=300)
        # A Python under the home directory: Debian's binary (libpython linked in) and its library.
        home_python = root / "py311"
        (home_python / "bin").mkdir(parents=True)
        shutil.copy2(os.path.realpath(SYSTEM_PYTHON), home_python / "bin" / "python3.11")
        shutil.copytree("/usr/lib/python3.11", home_python / "lib" / "python3.11", symlinks=True)
        found = run([str(home_python / "bin" / "python3.11"), "-I", "-c",
                     "import os, sys; print(sys.prefix, os.__file__)"])
        assert found.stdout.split() == [str(home_python), f"{home_python}/lib/python3.11/os.py"], found.stdout
        home_venv = root / "home-venv"
        run([str(home_python / "bin" / "python3.11"), "-m", "venv", "--without-pip", str(home_venv)], timeout=120)
        uv("pip", "install", "--python", str(home_venv / "bin" / "python"), *offline, "ipykernel",
           str(tiny_wheel(root, "only_in_home_venv")))
        # uv's own environment.
        uv_env = root / "uv"
        uv("venv", "--python", SYSTEM_PYTHON, "--no-python-downloads", str(uv_env),
           "--cache-dir", str(root / "uv-cache"))
        uv("pip", "install", "--python", str(uv_env / "bin" / "python"), *offline, "ipykernel",
           str(tiny_wheel(root, "only_in_uv")))
        bare = root / "bare"
        uv("venv", "--python", SYSTEM_PYTHON, "--no-python-downloads", str(bare), "--cache-dir", str(root / "uv-cache"))
        yield Envs(root, {"venv": venv, "home-venv": home_venv, "uv": uv_env}, home_python, bare)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check(path: Path | str, *extra: str) -> tuple[int, dict[str, object]]:
    proc = hk("env", "check", str(path), "--json", *extra, check=False)
    return proc.returncode, json.loads(proc.stdout)


def test_env_check_tells_each_kind_and_what_the_sandbox_shows(envs: Envs) -> None:
    kinds = {"venv": "venv", "home-venv": "venv", "uv": "uv"}
    for name, path in envs.paths.items():
        code, report = check(path, "--profile", "local")
        assert code == 0 and report["ok"], report
        assert report["kind"] == kinds[name] and report["python"] == python_of(path), report
        assert report["ipykernel"] and report["python_version"] == "3.11.2", report
    # The system Python's venvs need only themselves (/usr is a system path); the other one its Python's directory.
    assert check(envs.paths["venv"], "--profile", "local")[1]["binds"] == [str(envs.paths["venv"])]
    report = check(envs.paths["home-venv"], "--profile", "local")[1]
    assert report["binds"] == [str(envs.paths["home-venv"]), str(envs.home_python)], report
    assert report["made_from"] == f"{envs.home_python}/bin"
    # The text form, and the image tried for an Apptainer profile.
    text = hk("env", "check", str(envs.paths["uv"]), "--profile", "local-apptainer").stdout
    assert "ipykernel" in text and "runs in the image" in text and "can run a kernel" in text, text


KERNEL_PROBE = """
import json, sys, socket, importlib
module = importlib.import_module(MODULE)
try:
    import hpc_kernels
    site = True
except ImportError:
    site = False
print(json.dumps({"who": module.WHO, "executable": sys.executable, "base_prefix": sys.base_prefix,
                  "node": socket.gethostname(), "site_package_seen": site}))
"""


@pytest.mark.parametrize("env_name", ["venv", "home-venv", "uv"])
def test_a_cell_imports_what_only_the_environment_has(envs: Envs, runtime_profile: str, env_name: str) -> None:
    path = envs.paths[env_name]
    kernel = start_kernel(None, "--python-env", str(path), prefix="env", profile=runtime_profile)
    try:
        module = {"venv": "only_in_venv", "home-venv": "only_in_home_venv", "uv": "only_in_uv"}[env_name]
        out = kernel.exec(f"MODULE = {module!r}\n" + KERNEL_PROBE).stdout.strip().splitlines()[-1]
        found = json.loads(out)
        assert found["who"] == module and found["node"] in ("c1", "c2"), found
        assert found["executable"] == python_of(path), found
        assert not found["site_package_seen"], "the site's packages leaked into the user's environment"
        if env_name == "home-venv":  # its standard library came from the Python under the home directory
            assert found["base_prefix"] == str(envs.home_python), found
        # The in-sandbox startup files (time warning, limits) ran under the environment's IPython.
        log = hk("logs", kernel.name).stdout
        assert "failed at kernel start" not in log, log
        assert kernel.exec("print(len(get_ipython().events.callbacks['pre_run_cell']))").stdout.strip() != "0"
    finally:
        hk("shutdown", kernel.name)


def refused(*args: str) -> str:
    """A submit that must fail before anything is queued: its message; no job and no kernel left."""
    name = f"bad-{uuid.uuid4().hex[:6]}"
    before = squeue_ids()
    where = [] if "--workspace" in args else ["--no-workspace"]
    proc = hk("submit", "--profile", "local", "--name", name, *where, *args, check=False, timeout=120)
    if proc.returncode == 0:
        hk("shutdown", name)
    assert proc.returncode == 1, proc
    assert squeue_ids() == before, "a job was submitted"
    assert name not in hk("list").stdout + hk("list").stderr
    return proc.stderr


def test_bad_environments_are_refused_before_anything_is_queued(envs: Envs, tmp_path: Path) -> None:
    missing = envs.root / "nosuch"
    assert f"{missing} does not exist" in refused("--python-env", str(missing))
    said = refused("--python-env", str(envs.bare))
    assert "ipykernel cannot be imported" in said
    assert f"uv pip install --python {python_of(envs.bare)} ipykernel" in said
    said = refused("--python-env", str(Path.home()))
    assert "would show the kernel your home directory" in said, said
    assert "not a Python environment" in refused("--python-env", str(envs.home_python))
    # /tmp is each node's own here (docs/testing.md): an environment there is not seen by the nodes.
    local = tmp_path / "env"
    shutil.copytree(envs.paths["uv"], local, symlinks=True)
    assert "which each node has of its own" in refused("--python-env", str(local))
    # An environment the kernel could write (inside its --rw workspace): its Python runs outside the sandbox.
    said = refused("--python-env", str(envs.paths["uv"]), "--workspace", str(envs.root), "--rw")
    assert "which the kernel may write" in said, said
    # The same verdicts from `env check`, exit 1.
    code, report = check(envs.bare)
    assert code == 1 and not report["ok"] and report["kind"] == "uv"


def test_a_batch_and_a_kernelspec_use_the_environment(envs: Envs, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    env = envs.paths["uv"]
    ws = envs.root / "batch"
    ws.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import only_in_uv, sys; print(only_in_uv.WHO, sys.executable)")]
    nbformat.write(nb, str(ws / "nb.ipynb"))
    name = hk("batch", "submit", str(ws / "nb.ipynb"), "--profile", "local", "--out", str(ws / "out"),
              "--workspace", str(ws), "--python-env", str(env)).stdout.strip()
    assert hk("batch", "status", name, "--watch", check=False, timeout=300).returncode == 0, \
        hk("batch", "results", name, "-v").stdout
    [record] = json.loads(hk("batch", "results", name, "--json").stdout)
    done = nbformat.read(record["output"], as_version=4)
    assert done.cells[0].outputs[0]["text"].strip() == f"only_in_uv {python_of(env)}"
    # A bad environment: refused by `batch submit` and `kernelspec install`, nothing left.
    proc = hk("batch", "submit", str(ws / "nb.ipynb"), "--profile", "local", "--out", str(ws / "out2"),
              "--python-env", str(envs.bare), check=False)
    assert proc.returncode == 1 and "ipykernel cannot be imported" in proc.stderr and not (ws / "out2").exists()
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.setenv("JUPYTER_PATH", "")
    proc = hk("kernelspec", "install", "-p", "local", "--name", "bare", "--user", "--python-env", str(envs.bare),
              check=False)
    assert proc.returncode == 1 and "ipykernel cannot be imported" in proc.stderr
    assert not (tmp_path / "jupyter-data" / "kernels" / "bare").exists()
    # A kernelspec of the environment, started by jupyter_client through the provisioner.
    hk("kernelspec", "install", "-p", "local", "--name", "uvenv", "--user", "--python-env", str(env))
    spec = json.loads((tmp_path / "jupyter-data" / "kernels" / "uvenv" / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"]["python_env"] == str(env)
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="uvenv")
    km.start_kernel(cwd=str(ws))
    try:
        client = km.client()
        client.start_channels()
        client.wait_for_ready(timeout=120)
        out: list[str] = []
        client.execute_interactive("import only_in_uv; print(only_in_uv.WHO)", timeout=60,
                                   output_hook=lambda m: out.append(m["content"].get("text", "")))
        client.stop_channels()
        assert "".join(out).strip() == "only_in_uv"
    finally:
        km.shutdown_kernel()
