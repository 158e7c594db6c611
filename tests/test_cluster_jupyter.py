"""Jupyter frontends start these kernels through a kernelspec and the provisioner (real
jupyter_client, real nbclient, real cluster), for both sandbox runtimes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import RELAY_RECORD, hk, run
from jupyter_client import KernelManager
from nbclient import NotebookClient
from test_cluster_lifecycle import STATE_ROOT, squeue_ids


@pytest.fixture
def jupyter_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Kernelspecs of this test only: JUPYTER_DATA_DIR for `--user`, here and in hpc-kernel."""
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jupyter-data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("JUPYTER_PATH", "")
    return tmp_path


@pytest.fixture
def kernelspec(jupyter_dirs: Path, runtime_profile: str) -> Iterator[str]:
    name = f"hk-{runtime_profile}"
    proc = hk("kernelspec", "install", "--profile", runtime_profile, "--name", name, "--user")
    assert f"installed kernelspec {name}" in proc.stderr
    yield name
    hk("kernelspec", "remove", name, check=False)


@pytest.fixture
def flavour_kernelspec(jupyter_dirs: Path, flavour: tuple[str, str]) -> Iterator[str]:
    """A kernelspec per runtime and relay transport (``kernelspec install --relay``)."""
    profile, relay = flavour
    name = f"hk-{profile}-{relay}"
    hk("kernelspec", "install", "--profile", profile, "--relay", relay, "--name", name, "--user")
    yield name
    hk("kernelspec", "remove", name, check=False)


def execute(km: KernelManager, code: str, timeout: float = 60) -> str:
    client = km.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        out: list[str] = []
        reply = client.execute_interactive(code, timeout=timeout, output_hook=lambda m: out.append(
            m["content"].get("text", "")) if m["msg_type"] == "stream" else None)
        assert reply["content"]["status"] in ("ok", "error")
        return "".join(out)
    finally:
        client.stop_channels()


def interrupt_a_busy_loop(km: KernelManager) -> str:
    """Start `while True: pass`, interrupt it as the frontend would, return the error's name."""
    client = km.client()
    client.start_channels()
    try:
        msg_id = client.execute("while True: pass")
        time.sleep(2)
        km.interrupt_kernel()
        reply = client.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id
        return str(reply["content"].get("ename"))
    finally:
        client.stop_channels()


def test_kernelspec_install_list_remove(jupyter_dirs: Path) -> None:
    hk("kernelspec", "install", "-p", "local-gpu", "--name", "gpu-test", "--display-name", "Python (GPU test)",
       "--user")
    spec = json.loads((jupyter_dirs / "jupyter-data" / "kernels" / "gpu-test" / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"] == {"provisioner_name": "hpc-kernels",
                                                      "config": {"profile": "local-gpu"}}
    assert spec["display_name"] == "Python (GPU test)" and spec["interrupt_mode"] == "signal"
    listing = hk("kernelspec", "list").stdout
    assert "gpu-test" in listing and "local-gpu" in listing
    assert "gpu-test" in run(["jupyter", "kernelspec", "list"]).stdout, "jupyter itself sees it"
    hk("kernelspec", "remove", "gpu-test")
    assert "gpu-test" not in hk("kernelspec", "list").stdout
    missing = hk("kernelspec", "remove", "gpu-test", check=False)
    assert missing.returncode == 1 and "no hpc-kernels kernelspec named 'gpu-test'" in missing.stderr


def test_a_kernel_manager_runs_interrupts_restarts_and_shuts_down(flavour_kernelspec: str, workspace: Path) -> None:
    """What every frontend does, through jupyter_client's own KernelManager and our provisioner,
    for each runtime and relay transport: a restart in the job keeps the relay (for tcp, the
    agent's listener) and the frontend's sockets."""
    km = KernelManager(kernel_name=flavour_kernelspec)
    km.start_kernel(cwd=str(workspace))
    try:
        name = km.provisioner.name
        relay = json.loads(hk("status", name, "--json").stdout)
        assert json.loads((Path(str(relay["log"])).parent / RELAY_RECORD).read_text())["transport"] == \
            flavour_kernelspec.rsplit("-", 1)[1]
        job_id = json.loads(hk("status", name, "--json").stdout)["job_id"]
        assert execute(km, "import socket, os; print(socket.gethostname(), os.getcwd())").split() == [
            json.loads(hk("status", name, "--json").stdout)["node"], str(workspace)]
        assert km.is_alive()

        # Interrupt (signal mode, as the kernelspec says): a busy loop stops, the kernel lives on.
        execute(km, "kept = 1")
        assert interrupt_a_busy_loop(km) == "KeyboardInterrupt"
        assert execute(km, "print(kept)").strip() == "1"

        # Restart: a new kernel process in the same job, with a fresh namespace.
        km.restart_kernel()
        assert json.loads(hk("status", name, "--json").stdout)["job_id"] == job_id, "no new job"
        assert "NameError" in execute(km, "try:\n    kept\nexcept NameError as e:\n    print('NameError')")
        assert km.is_alive()

        # A forced restart (jupyter_client kills the process, without saying it is a restart).
        execute(km, "kept = 2")
        km.restart_kernel(now=True)
        assert json.loads(hk("status", name, "--json").stdout)["job_id"] == job_id, "still no new job"
        assert "NameError" in execute(km, "try:\n    kept\nexcept NameError as e:\n    print('NameError')")
    finally:
        km.shutdown_kernel()
    assert job_id not in squeue_ids()
    assert not (STATE_ROOT / name).exists()


def test_nbclient_executes_a_notebook_on_the_cluster(kernelspec: str, workspace: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import socket; host = socket.gethostname(); print(host)"),
                nbformat.v4.new_code_cell("try:\n    socket.create_connection(('10.77.7.1', 22), timeout=3)\n"
                                          "except OSError as e:\n    print(e)")]
    before = squeue_ids()
    NotebookClient(nb, kernel_name=kernelspec, timeout=120, resources={"metadata": {"path": str(workspace)}}).execute()
    outputs = [cell.outputs[0]["text"].strip() for cell in nb.cells]
    assert outputs[0] in ("c1", "c2") and "Network is unreachable" in outputs[1]
    assert squeue_ids() <= before, "the job ended with the notebook"


def test_a_start_that_times_out_cancels_the_job(jupyter_dirs: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that cannot start in time: the frontend gets the pending reason, and no job is left."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "later.yaml").write_text("slurm: {partition: down}\n")  # State=DOWN on the test cluster
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(profiles))
    hk("kernelspec", "install", "-p", "later", "--name", "later", "--launch-timeout", "4", "--user")
    before = squeue_ids()
    km = KernelManager(kernel_name="later")
    started = time.monotonic()
    with pytest.raises(Exception, match=r"was not ready within 4 s; it was cancelled") as caught:
        km.start_kernel()
    assert "reason PartitionDown" in str(caught.value), str(caught.value)
    assert time.monotonic() - started < 60
    assert squeue_ids() <= before
    assert not km.provisioner or not km.provisioner.has_process


# --- jupyter_server: what JupyterLab talks to ----------------------------------------------------


@contextlib.contextmanager
def jupyter_app(command: list[str], workspace: Path, log_path: Path) -> Iterator[tuple[str, str]]:
    """A real Jupyter server application (``jupyter server``, JupyterLab) on loopback with a token;
    yields (base URL, token) once it answers, and stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = uuid.uuid4().hex
    with open(log_path, "w") as log:
        app = subprocess.Popen([*command, "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
                                f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={workspace}"],
                               stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    api(base, token, "GET", "/api/status")
                    break
                except OSError:
                    assert app.poll() is None and time.monotonic() < deadline, log_path.read_text()
                    time.sleep(0.3)
            yield base, token
        finally:
            app.terminate()
            app.wait(30)


@pytest.fixture
def jupyter_server(kernelspec: str, workspace: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real jupyter_server with our kernelspec: what JupyterLab talks to."""
    with jupyter_app(["jupyter", "server"], workspace, tmp_path / "server.log") as app:
        yield app


def api(base: str, token: str, method: str, path: str, body: dict | None = None, timeout: float = 300) -> dict:  # type: ignore[type-arg]
    request = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        text = response.read()
    return json.loads(text) if text else {}


async def run_cell(base: str, token: str, kernel_id: str, code: str, *, interrupt_after: float | None = None) -> dict:  # type: ignore[type-arg]
    """Execute ``code`` over the kernel's websocket, as JupyterLab does: its stdout and reply."""
    from tornado.websocket import websocket_connect

    ws_url = base.replace("http", "ws") + f"/api/kernels/{kernel_id}/channels?token={token}"
    conn = await websocket_connect(ws_url)
    msg_id = uuid.uuid4().hex
    conn.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell",
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    if interrupt_after is not None:
        await asyncio.sleep(interrupt_after)
        await asyncio.to_thread(api, base, token, "POST", f"/api/kernels/{kernel_id}/interrupt")
    out, reply, idle = "", None, False
    while reply is None or not idle:  # shell and iopub are not ordered with each other
        raw = await asyncio.wait_for(conn.read_message(), 120)
        assert raw is not None, "the websocket closed"
        msg = json.loads(raw)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out += msg["content"]["text"]
        elif msg["msg_type"] == "execute_reply":
            reply = msg["content"]
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            idle = True
    conn.close()
    return {"stdout": out, **reply}


def test_jupyter_server_starts_runs_interrupts_restarts_and_shuts_down(jupyter_server: tuple[str, str],
                                                                       kernelspec: str) -> None:
    base, token = jupyter_server
    before = squeue_ids()
    kernel = api(base, token, "POST", "/api/kernels", {"name": kernelspec})
    kernel_id = kernel["id"]
    try:
        assert kernel["execution_state"] in ("starting", "idle")
        ours = [r for r in json.loads(hk("list", "--json").stdout) if r["name"].startswith("jupyter-")]
        assert len(ours) == 1 and ours[0]["state"] == "ready"
        job_id = ours[0]["job_id"]

        first = asyncio.run(run_cell(base, token, kernel_id, "import socket; x = 1; print(socket.gethostname())"))
        assert first["status"] == "ok" and first["stdout"].strip() == ours[0]["node"]
        looped = asyncio.run(run_cell(base, token, kernel_id, "while True: pass", interrupt_after=2))
        assert looped["status"] == "error" and looped["ename"] == "KeyboardInterrupt"
        assert asyncio.run(run_cell(base, token, kernel_id, "print(x)"))["stdout"].strip() == "1"

        api(base, token, "POST", f"/api/kernels/{kernel_id}/restart")
        assert json.loads(hk("status", ours[0]["name"], "--json").stdout)["job_id"] == job_id, "same job"
        fresh = asyncio.run(run_cell(base, token, kernel_id, "print('x' in globals())"))
        assert fresh["stdout"].strip() == "False", f"a restart clears the namespace: {fresh}"
    finally:
        api(base, token, "DELETE", f"/api/kernels/{kernel_id}")
    assert squeue_ids() <= before, "DELETE ends the job"
    assert not [r for r in json.loads(hk("list", "--json").stdout) if r["name"].startswith("jupyter-")]


def test_papermill_runs_a_parametrised_notebook(kernelspec: str, workspace: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("n = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("import socket; print(socket.gethostname(), n * 7)")]
    nb.metadata["kernelspec"] = {"name": kernelspec, "display_name": kernelspec, "language": "python"}
    source, result = workspace / "in.ipynb", workspace / "out.ipynb"
    nbformat.write(nb, source)
    run([sys.executable, "-m", "papermill", str(source), str(result), "-p", "n", "6", "-k", kernelspec, "--cwd", str(workspace)],
        timeout=300)
    out = nbformat.read(result, as_version=4).cells[-1].outputs[0]["text"].split()
    assert out[0] in ("c1", "c2") and out[1] == "42"


def test_a_kernel_whose_job_ended_is_not_resubmitted(kernelspec: str) -> None:
    """The job is cancelled under the frontend (as a time limit or a node failure would end it):
    the kernel is reported dead, and a restart (what jupyter_client's restarter does next) fails
    with Slurm's account of the job instead of submitting a new one."""
    km = KernelManager(kernel_name=kernelspec)
    km.start_kernel()
    name = km.provisioner.name
    job_id = json.loads(hk("status", name, "--json").stdout)["job_id"]
    try:
        run(["scancel", job_id])
        deadline = time.monotonic() + 60
        while km.is_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not km.is_alive()
        before = squeue_ids()
        with pytest.raises(Exception, match="did not come back from the restart") as caught:
            km.restart_kernel(now=True)
        assert "CANCELLED" in str(caught.value), str(caught.value)
        assert squeue_ids() <= before, "no new job behind the user's back"
    finally:
        km.shutdown_kernel(now=True)
    assert not (STATE_ROOT / name).exists()


# --- a frontend that runs in a job: the kernel starts on its node (no job, no relay) --------------

IN_JOB_SCRIPT = r"""
import json, os, subprocess, sys
import nbformat
from jupyter_client import KernelManager
from nbclient import NotebookClient

spec, workspace, out = sys.argv[1:4]
result = {"job": os.environ["SLURM_JOB_ID"], "node": os.environ["SLURMD_NODENAME"]}
km = KernelManager(kernel_name=spec)
km.start_kernel(cwd=workspace)
name = result["name"] = km.provisioner.name
result["status"] = json.loads(subprocess.run(["hpc-kernel", "status", name, "--json"], capture_output=True,
                                             text=True, check=True).stdout)
result["connection_file"] = km.connection_file
result["kernel_ip"] = km.ip
client = km.client()
client.start_channels()
client.wait_for_ready(60)
def run(code):
    out = []
    client.execute_interactive(code, timeout=60, output_hook=lambda m: out.append(m["content"].get("text", ""))
                               if m["msg_type"] == "stream" else None)
    return "".join(out).strip()
result["hostname"] = run("import socket; x = 1; print(socket.gethostname())")
result["network"] = run("try:\n    socket.create_connection(('10.77.7.1', 22), timeout=3)\nexcept OSError as e:\n    print(e)")
client.stop_channels()
km.restart_kernel()
client = km.client()
client.start_channels()
client.wait_for_ready(60)
result["after_restart"] = run("print('x' in globals())")
client.stop_channels()
km.shutdown_kernel()
result["left_after_shutdown"] = subprocess.run(["hpc-kernel", "list"], capture_output=True, text=True).stdout
nb = nbformat.v4.new_notebook()
nb.cells = [nbformat.v4.new_code_cell("import socket; print(socket.gethostname())")]
NotebookClient(nb, kernel_name=spec, timeout=60).execute()
result["notebook"] = nb.cells[0].outputs[0]["text"].strip()
json.dump(result, open(out, "w"))
"""


def test_a_frontend_inside_a_job_starts_the_kernel_on_its_own_node(runtime_profile: str, workspace: Path) -> None:
    """As under Open OnDemand or a batch job: the frontend runs in a job on c1, and the kernel
    starts in the sandbox right there, without a new job, a step or the relay."""
    data = workspace / "jupyter-data"
    env = {"JUPYTER_DATA_DIR": str(data), "JUPYTER_PATH": ""}
    hk("kernelspec", "install", "-p", runtime_profile, "--name", "onnode", "--user", env=env)
    script, out = workspace / "in_job.py", workspace / "result.json"
    script.write_text(IN_JOB_SCRIPT)
    before = squeue_ids()
    run(["sbatch", "--wait", "--nodelist=c1", "--time=5", f"--output={workspace / 'job.out'}",
         f"--export=ALL,JUPYTER_DATA_DIR={data},JUPYTER_PATH=",
         "--wrap", f"{sys.executable} {script} onnode {workspace} {out}"], timeout=300)
    assert out.exists(), (workspace / "job.out").read_text()
    result = json.loads(out.read_text())
    status = result["status"]
    assert status["mode"] == "on the frontend's node" and status["job_id"] == result["job"]
    assert result["hostname"] == result["node"] == "c1"
    assert "Network is unreachable" in result["network"]
    assert result["kernel_ip"].startswith("/tmp/hk-"), "the kernel's own sockets on the node, not a relay"
    assert result["after_restart"] == "False"
    assert result["name"] not in result["left_after_shutdown"]
    assert result["notebook"] == "c1"
    assert squeue_ids() <= before, "no job of ours is left (the frontend's own job has ended)"


# --- a real browser: JupyterLab in headless Chromium --------------------------------------------

CHROMIUM_ARGS = ["--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def run_all_cells_in_lab(page: Any, until: str) -> str:
    """In JupyterLab (started with expose_app_in_browser) showing a notebook: wait until the
    kernel that opening the notebook started is idle, run every cell with Lab's own run-all
    command (as the toolbar does), wait for ``until`` on the page; the outputs' text."""
    page.wait_for_function("window.jupyterapp && document.querySelector('.jp-Notebook')", timeout=90_000)
    page.wait_for_function("""() => {
        const w = window.jupyterapp.shell.currentWidget;
        return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel
            && w.sessionContext.session.kernel.status === 'idle';
    }""", timeout=120_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_selector(f"text={until}", timeout=120_000)
    return "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())


def test_jupyterlab_in_a_browser_runs_cells_on_the_compute_node(kernelspec: str, workspace: Path,
                                                                 tmp_path: Path) -> None:
    """Headless Chromium (Debian's) opens JupyterLab on a notebook that names our kernelspec:
    JupyterLab starts the sandboxed kernel through the provisioner, the cells run (Lab's own
    run-all command, as the toolbar button does), and the page shows the node's name and the
    sandbox's "Network is unreachable"."""
    from playwright.sync_api import sync_playwright

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": kernelspec, "display_name": kernelspec, "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("import socket\nprint('host:', socket.gethostname())"),
                nbformat.v4.new_code_cell("try:\n    socket.create_connection(('10.77.7.1', 22), timeout=3)\n"
                                          "except OSError as e:\n    print('network:', e)")]
    nbformat.write(nb, workspace / "browser.ipynb")
    before = squeue_ids()
    lab = [sys.executable, "-m", "jupyterlab", "--LabApp.expose_app_in_browser=True"]
    with jupyter_app(lab, workspace, tmp_path / "lab.log") as (base, token):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"{base}/lab/tree/browser.ipynb?token={token}")
            text = run_all_cells_in_lab(page, until="Network is unreachable")
            browser.close()
    assert "host: c1" in text or "host: c2" in text, text
    assert "network: [Errno 101] Network is unreachable" in text, text
    assert squeue_ids() <= before, "closing JupyterLab shut the kernel down and ended its job"


PLAIN_CLIENT = r"""
import json, os, sys
from jupyter_client import BlockingKernelClient
client = BlockingKernelClient()
client.load_connection_info(json.loads(sys.argv[1]))
client.start_channels()
try:
    client.wait_for_ready(timeout=8)
    print("answered", flush=True)
except RuntimeError:
    print("no answer", flush=True)
os._exit(0)  # not waiting on sockets stuck in a handshake
"""


def test_curve_encryption_end_to_end_where_the_kernel_supports_it(jupyter_dirs: Path, workspace: Path) -> None:
    """transport_encryption=auto: the bubblewrap kernel (ipykernel 7.4) declares CurveZMQ, gets
    keys, and a client without them gets no answer through the relay. The Apptainer image's
    ipykernel 6.17 does not, and its kernelspec does not claim it."""

    hk("kernelspec", "install", "-p", "local", "--name", "curve", "--user")
    hk("kernelspec", "install", "-p", "local-apptainer", "--name", "image", "--user")
    kernels = jupyter_dirs / "jupyter-data" / "kernels"
    assert json.loads((kernels / "curve" / "kernel.json").read_text())["metadata"]["supported_encryption"] == ["curve"]
    assert "supported_encryption" not in json.loads((kernels / "image" / "kernel.json").read_text())["metadata"]
    km = KernelManager(kernel_name="curve", transport_encryption="auto")
    km.start_kernel(cwd=str(workspace))
    try:
        info = km.get_connection_info()
        assert info.get("curve_publickey") and info.get("curve_secretkey")
        assert execute(km, "print(6 * 7)").strip() == "42"
        # In a process of its own: a ZeroMQ client stuck in a failed CurveZMQ handshake has
        # been seen to hang its process's shutdown of the channels.
        plain = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in info.items() if not k.startswith("curve_")}
        proc = subprocess.run([sys.executable, "-c", PLAIN_CLIENT, json.dumps(plain)], capture_output=True, text=True,
                              timeout=120)
        assert proc.stdout.strip() == "no answer", proc.stdout + proc.stderr
    finally:
        km.shutdown_kernel()


def test_message_mode_interrupt_and_the_frontends_own_connection_file(jupyter_dirs: Path, workspace: Path) -> None:
    """`--interrupt-mode message`: the interrupt is an interrupt_request over the relay. The
    frontend's own connection file is written and removed by jupyter_client as for a local kernel."""
    hk("kernelspec", "install", "-p", "local", "--name", "msg", "--interrupt-mode", "message", "--user")
    km = KernelManager(kernel_name="msg")
    km.start_kernel(cwd=str(workspace))
    try:
        assert Path(km.connection_file).is_file(), "jupyter_client writes its own connection file as usual"
        assert interrupt_a_busy_loop(km) == "KeyboardInterrupt"
    finally:
        km.shutdown_kernel()
    assert not Path(km.connection_file).exists()


def test_waiting_in_the_queue_is_not_a_startup_timeout(jupyter_dirs: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that waits ~8 s in the queue (--begin) under nbclient's startup_timeout of 2 s: the
    notebook runs, because the provisioner returns only once the kernel is ready; meanwhile the
    frontend's log shows the pending reason, then the node."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "soon.yaml").write_text('extends: local\nslurm: {extra_options: ["--begin=now+8"]}\n')
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(profiles))
    hk("kernelspec", "install", "-p", "soon", "--name", "soon", "--user")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print('ran')")]
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    km = KernelManager(kernel_name="soon")
    km.log.addHandler(handler)
    km.log.setLevel(logging.INFO)
    started = time.monotonic()
    try:
        NotebookClient(nb, km=km, timeout=60, startup_timeout=2).execute()
    finally:
        km.shutdown_kernel()  # nbclient leaves a kernel manager it was given alone
    assert nb.cells[0].outputs[0]["text"].strip() == "ran"
    assert time.monotonic() - started > 5, "the job did wait in the queue"
    assert any("PENDING (BeginTime)" in line for line in said), said
    assert any("kernel ready on c" in line for line in said), said


def test_a_start_given_up_while_pending_cancels_the_job(jupyter_dirs: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A frontend that gives up a start (its start task is cancelled while the job is queued on
    the DOWN partition): the job is cancelled and nothing of the kernel is left."""
    from jupyter_client import AsyncKernelManager

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "never.yaml").write_text("extends: local\nslurm: {partition: down}\n")
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(profiles))
    hk("kernelspec", "install", "-p", "never", "--name", "never", "--user")
    before = squeue_ids()

    async def start_then_give_up() -> str | None:
        km = AsyncKernelManager(kernel_name="never")
        task = asyncio.ensure_future(km.start_kernel())
        await asyncio.sleep(4)
        name = km.provisioner.name if km.provisioner else None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return name

    name = asyncio.run(start_then_give_up())
    assert name
    deadline = time.monotonic() + 30
    while (squeue_ids() - before or (STATE_ROOT / name).exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not squeue_ids() - before, "the queued job was cancelled"
    assert not (STATE_ROOT / name).exists()
