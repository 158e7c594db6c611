"""nbgrader (the real one, from PyPI) autogrades a small course's submissions in sandboxed kernels
on the compute nodes, through a kernelspec from ``hpc-kernel kernelspec install``.

One course (an assignment with a solution cell and an autograder-tests cell worth 2 points), two
students: one correct, one hostile (it tries the network, the home directory, a write into its
workspace, then loops forever). ``nbgrader generate_assignment``, then ``nbgrader autograde`` with
``--ExecutePreprocessor.kernel_name``; the grades are read back from nbgrader's gradebook.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
from conftest import RUNTIME_PROFILES, hk, run
from test_cluster_lifecycle import squeue_ids

ASSIGNMENT = "ps1"
COURSE_ID = "hk101"
GOOD, HOSTILE = "good-student", "hostile-student"
POINTS = 2
CELL_TIMEOUT = 10  # seconds: the hostile student's infinite loop costs this much
# An address on the cluster network that the login node reaches: the controller, slurmctld's port.
CONTROLLER = ("10.77.7.1", 6817)
WHEELS = Path("/var/cache/hpc-kernels/wheels")
SITE_BIN = Path(sys.executable).parent  # the site venv: nbgrader (the test extra) and its alembic


def nbgrader_cell(source: str, grade_id: str, *, solution: bool = False, grade: bool = False,
                  points: int = 0) -> nbformat.NotebookNode:
    meta = {"grade": grade, "grade_id": grade_id, "locked": not solution, "schema_version": 3,
            "solution": solution, "task": False}
    if grade:
        meta["points"] = points
    return nbformat.v4.new_code_cell(source, metadata={"nbgrader": meta})


SOURCE_CELLS: list[tuple[str, str, dict[str, Any]]] = [
    # The instructor's (locked: autograde puts it back as written): where the kernel ran.
    ("host", "import socket\nprint('host:', socket.gethostname())", {}),
    ("add", "def add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n    ### END SOLUTION", {"solution": True}),
    ("test_add", "assert add(1, 2) == 3\nassert add(-4, 4) == 0", {"grade": True, "points": POINTS}),
]

GOOD_ANSWER = "def add(a, b):\n    return a + b\n"

HOSTILE_ANSWER = """\
import os, socket
try:
    socket.create_connection({controller!r}, timeout=5)
    print("network: connected")
except OSError as e:
    print("network:", e)
for path in {paths!r}:
    try:
        print("read:", path, os.listdir(path) if os.path.isdir(path) else open(path).read())
    except OSError as e:
        print("read:", path, type(e).__name__)
try:
    with open("planted.py", "w") as f:
        f.write("print('planted')")
    print("workspace: written")
except OSError as e:
    print("workspace:", e)
while True:
    pass
def add(a, b):
    return a + b
"""


@dataclass
class Course:
    root: Path
    secret: Path
    token: str

    def notebook(self, student: str, kind: str = "autograded") -> nbformat.NotebookNode:
        return nbformat.read(self.root / kind / student / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", as_version=4)


def make_course(root: Path, secret: Path, token: str) -> Course:
    """nbgrader's course directory: its config, the assignment's source notebook."""
    root.mkdir(parents=True)
    (root / "nbgrader_config.py").write_text(
        f"c = get_config()\nc.CourseDirectory.course_id = {COURSE_ID!r}\nc.CourseDirectory.root = {str(root)!r}\n")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbgrader_cell(source, grade_id, **flags) for grade_id, source, flags in SOURCE_CELLS]
    (root / "source" / ASSIGNMENT).mkdir(parents=True)
    nbformat.write(nb, root / "source" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb")
    return Course(root, secret, token)


def out_of_reach(course: Course) -> list[Path]:
    """What the hostile submission tries to read: the home's secrets, the course's gradebook and
    hidden source, the other student's submission."""
    return [course.secret, Path.home() / ".ssh", course.root / "gradebook.db",
            course.root / "source" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", course.root / "submitted" / GOOD]


def submit(course: Course, student: str, answer: str) -> None:
    """A student's submission: the released notebook with their answer in the solution cell."""
    nb = nbformat.read(course.root / "release" / ASSIGNMENT / f"{ASSIGNMENT}.ipynb", as_version=4)
    (cell,) = [c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == "add"]
    assert "NotImplementedError" in cell.source, "generate_assignment cleared the solution"
    cell.source = answer
    where = course.root / "submitted" / student / ASSIGNMENT
    where.mkdir(parents=True)
    nbformat.write(nb, where / f"{ASSIGNMENT}.ipynb")


def nbgrader(bin_dir: Path, course: Course, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """nbgrader of the environment ``bin_dir``, in the course directory, with that bin first on
    PATH, as an instructor runs it (nbgrader runs ``alembic`` from PATH for its gradebook)."""
    path = f"{bin_dir}:{os.environ['PATH']}"
    assert shutil.which("nbgrader", path=path) == str(bin_dir / "nbgrader")
    return subprocess.run(["nbgrader", *args], cwd=course.root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env, "PATH": path})


@pytest.fixture
def course(cluster: None) -> Iterator[Course]:
    """A course on the shared file system (home), and a secret in the test user's home that no
    student's code may read."""
    token = uuid.uuid4().hex
    secret = Path.home() / f".hk-nbgrader-secret-{token[:8]}"
    secret.write_text(token)
    base = Path.home() / "hk-test-workspaces" / f"nbgrader-{token[:8]}"
    try:
        yield make_course(base / "course", secret, token)
    finally:
        secret.unlink()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def jupyter_env(tmp_path: Path) -> dict[str, str]:
    """Jupyter's directories of this test only: the user's real kernelspecs stay as they were."""
    return {"JUPYTER_PATH": str(tmp_path / "prefix" / "share" / "jupyter"),
            "JUPYTER_DATA_DIR": str(tmp_path / "jupyter-data"),
            "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
            "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config")}


def install_kernelspec(profile: str, prefix: Path, *options: str) -> str:
    name = f"grader-{profile}"
    proc = hk("kernelspec", "install", "--profile", profile, "--name", name, "--prefix", str(prefix), *options)
    assert f"installed kernelspec {name}" in proc.stderr
    assert (prefix / "share" / "jupyter" / "kernels" / name / "kernel.json").is_file()
    return name


def autograde_the_course(bin_dir: Path, course: Course, kernel_name: str, env: dict[str, str],
                         *options: str) -> str:
    """generate_assignment, the two submissions, autograde; returns autograde's log."""
    before_jobs = squeue_ids()
    before_kernels = {row["name"] for row in json.loads(hk("list", "--json").stdout)}
    with socket.create_connection(CONTROLLER, timeout=5):
        pass  # the login node reaches it: the sandbox's failure below is the sandbox's doing
    proc = nbgrader(bin_dir, course, "generate_assignment", ASSIGNMENT, env=env)
    assert proc.returncode == 0, proc.stderr
    submit(course, GOOD, GOOD_ANSWER)
    submit(course, HOSTILE, HOSTILE_ANSWER.format(controller=CONTROLLER, paths=list(map(str, out_of_reach(course)))))
    proc = nbgrader(bin_dir, course, "autograde", ASSIGNMENT, f"--ExecutePreprocessor.kernel_name={kernel_name}",
                    f"--ExecutePreprocessor.timeout={CELL_TIMEOUT}", *options, env=env)
    assert proc.returncode == 0, f"autograde exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    assert squeue_ids() <= before_jobs, "a grading job was left in the queue"
    after_kernels = {row["name"] for row in json.loads(hk("list", "--json").stdout)}
    assert after_kernels <= before_kernels, f"kernels left: {after_kernels - before_kernels}"
    return proc.stderr


def outputs(cell: nbformat.NotebookNode) -> tuple[str, list[str]]:
    """A cell's stream text and the names of its errors."""
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    return text, [o.ename for o in cell.outputs if o.output_type == "error"]


def check_the_grades(course: Course) -> None:
    from nbgrader.api import Gradebook

    gradebook = Gradebook(f"sqlite:///{course.root / 'gradebook.db'}", course_id=COURSE_ID)
    try:
        assert gradebook.find_submission(ASSIGNMENT, GOOD).score == POINTS
        assert gradebook.find_grade("test_add", ASSIGNMENT, ASSIGNMENT, GOOD).auto_score == POINTS
        assert gradebook.find_submission(ASSIGNMENT, HOSTILE).score == 0
        assert gradebook.find_grade("test_add", ASSIGNMENT, ASSIGNMENT, HOSTILE).auto_score == 0
    finally:
        gradebook.close()

    # The executed notebooks: each ran on a compute node.
    cells = {student: {c.metadata["nbgrader"]["grade_id"]: c for c in course.notebook(student).cells}
             for student in (GOOD, HOSTILE)}
    for student in (GOOD, HOSTILE):
        host, errors = outputs(cells[student]["host"])
        assert host.split() in (["host:", "c1"], ["host:", "c2"]) and not errors, (student, host, errors)
    assert outputs(cells[GOOD]["add"]) == ("", []) and outputs(cells[GOOD]["test_add"]) == ("", [])

    # The hostile one: no network, no home, a read-only workspace, stopped by the cell timeout.
    text, errors = outputs(cells[HOSTILE]["add"])
    assert "network: [Errno 101] Network is unreachable" in text, text
    for path in out_of_reach(course):
        assert path.exists() and f"read: {path} FileNotFoundError" in text, text
    assert "workspace: [Errno 30] Read-only file system" in text, text
    assert "CellTimeoutError" in errors, errors
    assert outputs(cells[HOSTILE]["test_add"])[1] == ["NameError"], "add was never defined"
    assert course.token not in (course.root / "autograded" / HOSTILE / ASSIGNMENT / f"{ASSIGNMENT}.ipynb").read_text()
    assert not (course.root / "autograded" / HOSTILE / ASSIGNMENT / "planted.py").exists()


def test_nbgrader_autogrades_submissions_in_sandboxed_kernels(runtime_profile: str, course: Course,
                                                              jupyter_env: dict[str, str], tmp_path: Path) -> None:
    """nbgrader from the site venv (the `nbgrader` extra), the kernelspec installed under a prefix."""
    name = install_kernelspec(runtime_profile, tmp_path / "prefix")
    autograde_the_course(SITE_BIN, course, name, jupyter_env)
    check_the_grades(course)


@pytest.fixture(scope="module")
def other_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv of the system Python with nbgrader and not hpc-kernels (offline, from the wheel
    cache that `make install` fills from cluster/test-wheels.txt); its bin directory. Removed
    afterwards (about 200 MB)."""
    venv = tmp_path_factory.mktemp("other-env") / "venv"
    try:
        yield make_other_env(venv)
    finally:
        shutil.rmtree(venv, ignore_errors=True)


def make_other_env(venv: Path) -> Path:
    run(["/usr/bin/python3", "-m", "venv", str(venv)])
    run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index",
         "--find-links", str(WHEELS), "nbgrader"], timeout=600)
    probe = run([str(venv / "bin" / "python"), "-I", "-c", "import hpc_kernels"], check=False)
    assert probe.returncode != 0 and "No module named 'hpc_kernels'" in probe.stderr, "the env must lack hpc-kernels"
    return venv / "bin"


def test_nbgrader_from_another_environment(other_env: Path, course: Course, jupyter_env: dict[str, str],
                                           tmp_path: Path) -> None:
    """nbgrader installed in an environment of its own, as instructors often have it. Its
    jupyter_client hides a kernelspec naming a provisioner it does not have (checked first), so
    the kernelspec is installed --argv-only: nbgrader runs its argv, the bridge, from the site's
    Python. The bridge's start counts against nbgrader's startup timeout (the queue included):
    raised, as docs/nbgrader.md says to."""
    name = install_kernelspec(RUNTIME_PROFILES["bwrap"], tmp_path / "hidden")
    hidden = run([str(other_env / "python"), "-c", "from jupyter_client.kernelspec import KernelSpecManager\n"
                  f"KernelSpecManager().get_kernel_spec({name!r})"], check=False,
                 env={**jupyter_env, "JUPYTER_PATH": str(tmp_path / "hidden" / "share" / "jupyter")})
    assert hidden.returncode == 1 and f"NoSuchKernel: No such kernel named {name}" in hidden.stderr, hidden.stderr

    name = install_kernelspec(RUNTIME_PROFILES["bwrap"], tmp_path / "prefix", "--argv-only")
    spec = json.loads((tmp_path / "prefix" / "share" / "jupyter" / "kernels" / name / "kernel.json").read_text())
    assert "kernel_provisioner" not in spec["metadata"]
    assert Path(spec["argv"][0]).parent == SITE_BIN and spec["argv"][1:4] == ["-I", "-m", "hpc_kernels.bridge"], \
        "the site's Python runs it"
    autograde_the_course(other_env, course, name, jupyter_env, "--ExecutePreprocessor.startup_timeout=300")
    check_the_grades(course)
