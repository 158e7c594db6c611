"""The Open OnDemand app's files, rendered as OnDemand renders them: the YAML parsed, the ERB
run by real Ruby (Debian's ruby) with the context OnDemand gives it, for several form choices.
No cluster: the partitions' limits are given here as sinfo reports the test cluster's."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ood_app import ErbError, render_erb, submit_options

from hpc_kernels.errors import HpcKernelsError
from hpc_kernels.ood import APP_FILES, MARKER, app_files, install, jupyter_config, memory_gb, parse_sinfo, ruby
from hpc_kernels.profiles import load_profile

SINFO = ("debug*|infinite|16|96000|(null)\nshort|1:00:00|16|96000|(null)\n"
         "interactive|7-00:00:00|16|96000|(null)\ngpu|1-00:00:00|16|96000|gpu:standin:1\n")
PROFILES = ["local", "local-apptainer", "local-gpu"]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert shutil.which("ruby"), "ruby is not installed: run `make setup`"
    dest = tmp_path_factory.mktemp("ood") / "hpc_jupyter"
    limits, default_partition = parse_sinfo(SINFO)
    files = app_files([load_profile(p) for p in [*PROFILES, "generic-bwrap"]], "local", cluster="hk", limits=limits,
                      default_partition=default_partition, hpc_kernel="/opt/hpc-kernels/venv/bin/hpc-kernel",
                      python="/opt/hpc-kernels/venv/bin/python", portal_url="https://ood.example.org")
    install(dest, files)
    return dest


def form(**changes: str) -> dict[str, str]:
    values = {"profile": "local", "partition_name": "debug", "hours": "2", "cores": "4", "memory_gb": "8", "gpus": "0",
              "image": "", "python_env": "", "working_dir": ""}
    values.update(changes)
    return values


def test_the_app_has_the_files_and_fields_ondemand_requires(app: Path) -> None:
    assert sorted(str(p.relative_to(app)) for p in app.rglob("*") if p.is_file()) == sorted([*APP_FILES, MARKER])
    modes = {str(p.relative_to(app)): p.stat().st_mode & 0o777 for p in app.rglob("*") if p.is_file()}
    assert modes.pop("template/script.sh.erb") == 0o755  # OnDemand runs the rendered copy, mode kept
    assert set(modes.values()) == {0o644}
    manifest = yaml.safe_load((app / "manifest.yml").read_text())
    assert manifest["role"] == "batch_connect" and manifest["name"] and manifest["category"] == "Interactive Apps"
    spec = yaml.safe_load((app / "form.yml").read_text())
    assert spec["cluster"] == "hk"
    assert set(spec["form"]) == set(spec["attributes"])
    options = spec["attributes"]["profile"]["options"]
    assert [o[1] for o in options] == [*PROFILES, "generic-bwrap"] and spec["attributes"]["profile"]["value"] == "local"
    gpu = dict(kv for item in options[2][2:] for kv in item.items())
    assert gpu["data-set-partition-name"] == "gpu" and gpu["data-set-gpus"] == 1
    assert {"data-hide-image": True} in options[0] and {"data-hide-image": True} not in options[1]
    assert spec["attributes"]["hours"]["min"] == 1


def test_submit_options_follow_the_form(app: Path) -> None:
    native = submit_options(app, form())["script"]["native"]
    assert native == ["--partition=debug", "--time=2:00:00", "--nodes=1", "--ntasks=1", "--cpus-per-task=4",
                      "--mem=8G"]
    native = submit_options(app, form(profile="local-gpu", partition_name="gpu", gpus="1",
                                      image="/opt/hpc-kernels/images/kernel.sif"))["script"]["native"]
    assert "--gres=gpu:1" in native and "--partition=gpu" in native
    # A profile without a partition: the cluster's default, checked against its limits.
    native = submit_options(app, form(profile="generic-bwrap", partition_name=""))["script"]["native"]
    assert not [o for o in native if o.startswith("--partition")]
    with pytest.raises(ErbError, match=r"GPUs: 1 is more than a node of partition debug \(the default\) has \(0\)"):
        submit_options(app, form(profile="generic-bwrap", partition_name="", gpus="1"))


@pytest.mark.parametrize(("changes", "message"), [
    ({"hours": "0"}, "hours: \"0\" is not a whole number of 1 or more"),
    ({"hours": "2.5"}, "hours: \"2.5\" is not a whole number"),
    ({"profile": "nosuch"}, "profile \"nosuch\" is not one of this site's (local, local-apptainer, local-gpu, generic-bwrap)"),
    ({"partition_name": "gpu", "gpus": "2"}, "GPUs: 2 is more than a node of partition gpu has (1)"),
    ({"gpus": "1"}, "GPUs: 1 is more than a node of partition debug has (0)"),
    ({"partition_name": "short", "hours": "3"}, "hours: 3 is more than partition short allows (1)"),
    ({"cores": "32"}, "CPU cores: 32 is more than a node of partition debug has (16)"),
    ({"partition_name": "nosuch"}, "partition nosuch is not one of this cluster's"),
    ({"partition_name": "debug; rm -rf ~"}, "is not a partition name"),
    ({"image": "/x.sif"}, "profile local runs kernels in bwrap, not in an image"),
    ({"profile": "local-apptainer", "image": "relative.sif"}, "is not an absolute path"),
    ({"working_dir": "$(reboot)"}, "notebook directory"),
    ({"python_env": "envs/mine"}, "Python environment: \"envs/mine\" is not an absolute path"),
])
def test_bad_form_input_stops_the_submission_with_a_message(app: Path, changes: dict[str, str], message: str) -> None:
    with pytest.raises(ErbError) as caught:
        submit_options(app, form(**changes))
    assert message in str(caught.value) and "hpc-kernels:" in str(caught.value)


def test_job_scripts_are_valid_bash_and_quote_what_the_user_typed(app: Path, tmp_path: Path) -> None:
    weird = "/home/u/my notebooks/it's"
    for name in ("before.sh", "script.sh", "after.sh"):
        text = render_erb(app / "template" / f"{name}.erb",
                          form(profile="local-apptainer", image="/img/k.sif", working_dir=weird))
        path = tmp_path / name
        path.write_text(text)
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, text
    script = (tmp_path / "script.sh").read_text()
    assert "--profile local-apptainer --mode node" in script and "--image /img/k.sif" in script
    assert "--python-env" not in script  # none chosen: the profile's Python
    with_env = render_erb(app / "template" / "script.sh.erb", form(python_env=weird))
    assert "--python-env /home/u/my\\ notebooks/it\\'s\n" in with_env
    assert "cd /\nexec setpriv --pdeathsig TERM /opt/hpc-kernels/venv/bin/python -m hpc_kernels.ood serve" in script
    before = (tmp_path / "before.sh").read_text()
    assert "notebook_root=/home/u/my\\ notebooks/it\\'s" in before
    assert "password" not in before.split("| ", 1)[1].split("\n")[0]  # stdin only: not on the command line


def test_the_view_posts_the_password_to_jupyterlab_through_the_proxy(app: Path) -> None:
    before = render_erb(app / "template" / "before.sh.erb", form())
    assert "--allow-origin https://ood.example.org" in before
    html = render_erb(app / "view.html.erb", {}, {"host": "c1", "port": 4242, "password": "s3cret"})
    assert 'action="/node/c1/4242/login?next=%2Fnode%2Fc1%2F4242%2Flab"' in html
    assert 'name="password" value="s3cret"' in html and 'method="post"' in html
    assert "Job 77" in render_erb(app / "info.md.erb", {}, {"job_id": "77"})


def test_jupyter_config_allows_only_the_sandboxed_kernel() -> None:
    from traitlets.config import Config

    c = Config()
    exec(jupyter_config(host="c1", port=4242, root="/home/u/it's", hashed_password="argon2:x", kernelspec="hpc-sandbox"),
         {"c": c})
    config = {f"{s}.{k}": v for s, values in c.items() for k, v in values.items()}
    assert config["ServerApp.allow_origin"] == "", "only its own origin (ood install passes --portal-url's)"
    csp = config["ServerApp.tornado_settings"]["headers"]["Content-Security-Policy"]
    directives = dict(d.split(" ", 1) for d in csp.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == ("http://c1:4242/node/c1/4242/static/ http://c1:4242/node/c1/4242/lab/extensions/ "
                                        "'unsafe-eval'"), "no inline script, no script from files/ (kernel-written)"
    assert directives["object-src"] == "'none'" and directives["base-uri"] == "'none'"
    assert "'unsafe-inline'" not in directives["script-src"]
    exec(jupyter_config(host="c1", port=4242, root="/r", hashed_password="x", kernelspec="k",
                        allow_origin="https://ood.example.org"), {"c": (c := Config())})
    portal = {f"{s}.{k}": v for s, values in c.items() for k, v in values.items()}
    assert portal["ServerApp.allow_origin"] == "https://ood.example.org"
    assert "https://ood.example.org/node/c1/4242/static/" in \
        portal["ServerApp.tornado_settings"]["headers"]["Content-Security-Policy"]
    assert config["ServerApp.kernel_spec_manager_class"] == "hpc_kernels.ood_jupyter.SandboxedKernelSpecManager"
    assert config["ServerApp.base_url"] == "/node/c1/4242/" and config["ServerApp.root_dir"] == "/home/u/it's"
    assert config["KernelSpecManager.allowed_kernelspecs"] == {"hpc-sandbox"}
    assert config["KernelSpecManager.ensure_native_kernel"] is False
    assert config["ServerApp.terminals_enabled"] is False and config["IdentityProvider.token"] == ""
    assert config["PasswordIdentityProvider.hashed_password"] == "argon2:x"


def test_sizes_from_profiles_never_exceed_what_a_node_has() -> None:
    limits, default = parse_sinfo(SINFO)
    assert default == "debug" and limits["gpu"].max_gpus == 1 and limits["short"].max_hours == 1
    assert memory_gb("96000M") == limits["debug"].max_memory_gb == 93
    assert memory_gb("500M") == 1 and memory_gb("16G") == 16


def test_ruby_literals_do_not_interpolate() -> None:
    assert ruby({"a": ["x#{1}", None, 3, True]}) == "{ 'a' => ['x#{1}', nil, 3, true] }"
    assert ruby("it's \\") == "'it\\'s \\\\'"


def test_install_replaces_only_an_app_it_wrote(app: Path, tmp_path: Path) -> None:
    for name, content in (("other", "precious.txt"), ("someone-elses-app", "manifest.yml")):
        other = tmp_path / name
        other.mkdir()
        (other / content).write_text("keep")
        with pytest.raises(HpcKernelsError, match="was not written by `hpc-kernel ood install`"):
            install(other, {"manifest.yml": "x"})
        assert (other / content).read_text() == "keep"
    install(app, {path: (app / path).read_text() for path in APP_FILES})
    assert not [p for p in app.parent.iterdir() if p.name.startswith(".")]


def test_the_form_checks_the_python_environment_before_anything_is_queued(tmp_path: Path) -> None:
    """submit.yml.erb runs `hpc-kernel env check` (here: this source tree's) and stops the submission
    with its problems; an environment it accepts passes."""
    hpc_kernel = tmp_path / "hpc-kernel"
    hpc_kernel.write_text(f"#!/bin/sh\nexec env PYTHONPATH={Path(__file__).resolve().parent.parent} "
                          f"{sys.executable} -m hpc_kernels.cli \"$@\"\n")
    hpc_kernel.chmod(0o755)
    limits, default_partition = parse_sinfo(SINFO)
    files = app_files([load_profile("local")], "local", cluster="hk", limits=limits,
                      default_partition=default_partition, hpc_kernel=str(hpc_kernel), python=sys.executable,
                      portal_url="https://ood.example.org")
    install(tmp_path / "app", files)
    with pytest.raises(ErbError, match=f"Python environment {tmp_path}/nosuch: {tmp_path}/nosuch does not exist"):
        submit_options(tmp_path / "app", form(python_env=f"{tmp_path}/nosuch"))
    with pytest.raises(ErbError, match="is not a Python environment"):
        submit_options(tmp_path / "app", form(python_env="/usr"))
