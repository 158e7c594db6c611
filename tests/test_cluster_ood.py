"""The Open OnDemand app on the real cluster, run as OnDemand would run it.

`hpc-kernel ood install` writes the app (with the cluster's real partitions from sinfo). Real Ruby
renders its ERB with a user's form choices; the job script is OnDemand's basic batch connect
script with OnDemand's own helper functions stood in for (tests/ood_app.py); sbatch submits it
with the options submit.yml.erb gave. JupyterLab comes up on c1, and headless Chromium logs in
through the session card's form (view.html.erb) with the generated password, opens a notebook
with the sandboxed kernel and runs it. OnDemand's reverse proxy is the one part left out: the
browser reaches c1:port directly, under the /node/c1/port/ prefix the proxy would keep.
"""

from __future__ import annotations

import http.cookiejar
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import hk, make_workspace, run
from ood_app import ErbError, render_erb, stage_session, submit_options
from test_cluster_jupyter import CHROMIUM_ARGS, run_all_cells_in_lab

KERNELSPEC = "hpc-sandbox"
PORTAL = "https://ondemand.example.org"


@pytest.fixture(scope="module")
def app(cluster: None) -> Iterator[Path]:
    dest = Path.home() / "ondemand" / "dev" / f"hk-{uuid.uuid4().hex[:6]}"
    hk("ood", "install", str(dest), "--profile", "local", "--profile", "local-apptainer", "--profile", "local-gpu",
       "--portal-url", PORTAL)
    yield dest
    shutil.rmtree(dest, ignore_errors=True)


def form(**changes: str) -> dict[str, str]:
    values = {"profile": "local", "partition_name": "short", "hours": "1", "cores": "2", "memory_gb": "2", "gpus": "0",
              "image": "", "python_env": "", "working_dir": ""}
    values.update(changes)
    return values


@pytest.mark.parametrize(("changes", "message"), [
    ({"hours": "0"}, "hours: \"0\" is not a whole number of 1 or more"),
    ({"profile": "nosuch"}, "profile \"nosuch\" is not one of this site's"),
    ({"profile": "local-gpu", "partition_name": "gpu", "gpus": "2"}, "GPUs: 2 is more than a node of partition gpu has (1)"),
])
def test_bad_form_input_gets_a_message_before_anything_runs(app: Path, changes: dict[str, str], message: str) -> None:
    """The limits come from this cluster's sinfo at install time (gpu has one GPU per node)."""
    before = run(["squeue", "--me", "--noheader", "-o", "%i"]).stdout
    with pytest.raises(ErbError, match="hpc-kernels: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        submit_options(app, form(**changes))
    assert run(["squeue", "--me", "--noheader", "-o", "%i"]).stdout == before


def test_the_form_offers_the_sites_profiles_with_the_clusters_name(app: Path) -> None:
    spec = yaml.safe_load((app / "form.yml").read_text())
    assert spec["cluster"] == run(["scontrol", "show", "config"]).stdout.split("ClusterName")[1].split()[1]
    assert [o[1] for o in spec["attributes"]["profile"]["options"]] == ["local", "local-apptainer", "local-gpu"]


NOTEBOOK_CELLS = [
    "import os, socket\nprint('host:', socket.gethostname())\n"
    "print('gpus:', os.environ.get('CUDA_VISIBLE_DEVICES'), sorted(d for d in os.listdir('/dev') if d.startswith('nvidia')))",
    "try:\n    socket.create_connection(('10.77.7.1', 22), timeout=3)\nexcept OSError as e:\n    print('network:', e)",
]

# Kernel output that tries to run script with the user's session (JupyterLab trusts the outputs of
# cells run in the session): an inline handler, an inline script, and a script the kernel wrote into
# the notebook directory (served under files/; {base} is JupyterLab's base URL). Before the
# Content-Security-Policy all three ran (window.hk was ['script', 'img', 'files-js']).
ATTACK_CELLS = [
    "from IPython.display import HTML, display\n"
    "display(HTML('<img src=x onerror=\"window.hk=(window.hk||[]).concat([\\'img\\'])\">'))",
    "display(HTML(\"<script>window.hk=(window.hk||[]).concat(['script'])</script>\"))",
    "display(HTML('<script src=\"{base}files/evil.js\"></script>'))\nprint('attacks shown')",
]
EVIL_JS = "window.hk = (window.hk || []).concat(['files-js']);"


def wait_for(path: Path, job_id: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        state = run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False).stdout.strip()
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job_id} is {state or 'gone'}:\n" + (
            log.read_text() if log.exists() else "(no log)")
        assert time.monotonic() < deadline, f"no {path.name} within {timeout} s:\n{log.read_text()}"
        time.sleep(0.5)


def post(url: str, data: bytes) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def logged_in(base: str, password: str) -> tuple[urllib.request.OpenerDirector, str]:
    """A client logged in to the session's JupyterLab, and its XSRF token."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(f"{base}/login", timeout=30).read()
    opener.open(urllib.request.Request(f"{base}/login", data=f"password={password}".encode()), timeout=30).read()
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    return opener, xsrf


def start_kernel_as(opener: urllib.request.OpenerDirector, xsrf: str, base: str, name: str, origin: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    request = urllib.request.Request(f"{base}/api/kernels", data=json.dumps({"name": name}).encode(), method="POST",
                                     headers={"X-XSRFToken": xsrf, "Origin": origin, "Content-Type": "application/json"})
    try:
        with opener.open(request, timeout=120) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return int(e.code), {}


SESSIONS = {
    "bwrap": ({"profile": "local", "partition_name": "short"}, "gpus: None []"),
    "apptainer-gpu": ({"profile": "local-gpu", "partition_name": "gpu", "gpus": "1",
                       "image": "/opt/hpc-kernels/images/kernel.sif"}, "gpus: 0 ['nvidia0', 'nvidiactl']"),
}


@pytest.mark.parametrize("variant", sorted(SESSIONS))
def test_a_session_runs_jupyterlab_on_c1_with_sandboxed_kernels(app: Path, variant: str) -> None:
    """Both runtimes: bubblewrap on a CPU partition, and the Apptainer image on the GPU partition
    with one GPU (c1's stand-in device, docs/testing.md), which the kernel sees and no other."""
    from playwright.sync_api import sync_playwright

    ws = make_workspace()
    session = ws / "session"
    lab_config = ws / "lab-config"  # for the test only: lets it drive JupyterLab's own commands
    lab_config.mkdir()
    (lab_config / "jupyter_lab_config.py").write_text("c.LabApp.expose_app_in_browser = True\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNELSPEC, "display_name": KERNELSPEC, "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(source) for source in NOTEBOOK_CELLS]
    nbformat.write(nb, ws / "ood.ipynb")
    job_id = ""
    try:
        choices, gpus_line = SESSIONS[variant]
        sbatch = stage_session(app, form(working_dir=str(ws), **choices), session)
        job_id = run(["sbatch", "--parsable", f"--export=ALL,JUPYTER_CONFIG_PATH={lab_config}", *sbatch]).stdout.strip()
        wait_for(session / "connection.yml", job_id, session / "output.log")
        connection = yaml.safe_load((session / "connection.yml").read_text())
        host, port, password = connection["host"], connection["port"], str(connection["password"])
        assert host == "c1" and len(password) == 24
        assert oct((session / "connection.yml").stat().st_mode & 0o777) == "0o600"
        assert password not in (session / "output.log").read_text()
        assert password not in (session / "jupyter_server_config.py").read_text()  # only its hash
        origin = f"http://{host}:{port}"
        base = f"{origin}/node/{host}/{port}"
        (ws / "evil.js").write_text(EVIL_JS)
        nb.cells += [nbformat.v4.new_code_cell(source.replace("{base}", f"/node/{host}/{port}/"))
                     for source in ATTACK_CELLS]
        nbformat.write(nb, ws / "ood.ipynb")
        assert post(f"{base}/login", b"password=wrong") == 401
        assert post(f"{base}/api/contents/x.txt", b"{}") == 403  # every other POST keeps its XSRF check

        view = render_erb(app / "view.html.erb", {}, {"host": host, "port": port, "password": password})
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.set_content(f'<base href="{origin}/">{view}')  # as on OnDemand's session card
            with page.expect_popup() as opened:
                page.click("button[type=submit]")
            lab = opened.value
            lab.wait_for_url(f"{base}/lab*", timeout=60_000)
            specs = lab.evaluate(f"fetch('{base}/api/kernelspecs').then(r => r.json())")
            lab.goto(f"{base}/lab/tree/ood.ipynb")
            text = run_all_cells_in_lab(lab, until="attacks shown")
            lab.wait_for_timeout(2000)
            ran = lab.evaluate("() => window.hk || []")
            browser.close()
        assert ran == [], f"kernel output ran script in JupyterLab: {ran}"
        assert "host: c1" in text, text
        assert gpus_line in text, text
        assert "network: [Errno 101] Network is unreachable" in text, text
        assert sorted(specs["kernelspecs"]) == [KERNELSPEC], specs  # no unsandboxed kernel on offer
        kernels = json.loads(subprocess.run(["srun", f"--jobid={job_id}", "--overlap", "hpc-kernel", "list", "--json"],
                                            capture_output=True, text=True, timeout=60).stdout)
        assert [k["mode"] for k in kernels] == ["on the frontend's node"]

        # Through OnDemand's proxy the browser's Origin is the portal's while the Host is the node's.
        opener, xsrf = logged_in(base, password)
        status, _ = start_kernel_as(opener, xsrf, base, "python3", PORTAL)
        assert status >= 400, "the node's own, unsandboxed Python must not start"
        assert start_kernel_as(opener, xsrf, base, KERNELSPEC, "https://elsewhere.example.org")[0] >= 400
        status, kernel = start_kernel_as(opener, xsrf, base, KERNELSPEC, PORTAL)
        assert status == 201, status
        opener.open(urllib.request.Request(f"{base}/api/kernels/{kernel['id']}", method="DELETE",
                                           headers={"X-XSRFToken": xsrf, "Origin": PORTAL}), timeout=120).read()
    finally:
        if job_id:
            run(["scancel", job_id], check=False)
            deadline = time.monotonic() + 60
            while run(["squeue", "-h", "-j", job_id], check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        shutil.rmtree(ws, ignore_errors=True)
    left = json.loads(hk("list", "--json").stdout)
    assert left == [], f"the session's kernel outlived its job: {left}"
