"""Site profiles: search path, defaults, and errors that name the file, the key and what was expected."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hpc_kernels import profiles
from hpc_kernels.errors import ProfileError
from hpc_kernels.paths import state_root
from hpc_kernels.profiles import (
    KernelRequest,
    apply_request,
    available_profiles,
    check_kernel_name,
    load_profile,
    parse_profile,
)


@pytest.fixture
def profile_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "no-user-config"))
    return tmp_path


def write(profile_dir: Path, name: str, text: str) -> Path:
    path = profile_dir / f"{name}.yaml"
    path.write_text(text)
    return path


def test_shipped_local_profile_loads_with_defaults() -> None:
    profile = load_profile("local")
    assert profile.source.name == "local.yaml"
    assert profile.get("slurm", "partition") == "debug"
    assert profile.get("runtime", "kind") == "bwrap"
    assert profile.get("relay", "transport") == "srun"
    assert "{connection_file}" in " ".join(profile.get("kernel", "command"))
    assert "/home" in profile.get("runtime", "hide")


def test_profile_path_comes_first(profile_dir: Path) -> None:
    write(profile_dir, "local", "slurm:\n  partition: short\n")
    profile = load_profile("local")
    assert profile.source == profile_dir / "local.yaml"
    assert profile.get("slurm", "partition") == "short"
    assert available_profiles()["local"] == profile_dir / "local.yaml"


def test_unknown_profile_lists_the_known_ones(profile_dir: Path) -> None:
    write(profile_dir, "gpu-a100", "{}\n")
    with pytest.raises(ProfileError) as err:
        load_profile("gpu-a10")
    message = str(err.value)
    assert "unknown profile 'gpu-a10'" in message
    assert "Did you mean 'gpu-a100'?" in message
    assert "local" in message and "gpu-a100" in message


def test_bad_time_names_file_key_and_expectation(profile_dir: Path) -> None:
    path = write(profile_dir, "bad", "slurm:\n  time: 2 hours\n")
    with pytest.raises(ProfileError) as err:
        parse_profile(path)
    assert str(err.value).startswith(f"{path}:2: slurm.time: '2 hours' is not valid: expected a Slurm time")


def test_unknown_key_gets_did_you_mean(profile_dir: Path) -> None:
    path = write(profile_dir, "typo", "slurm:\n  partiton: debug\n")
    with pytest.raises(ProfileError) as err:
        parse_profile(path)
    assert f"{path}:2: slurm.partiton: unknown key (did you mean slurm.partition?)" in str(err.value)


def test_unknown_section(profile_dir: Path) -> None:
    path = write(profile_dir, "typo", "runtme:\n  kind: bwrap\n")
    with pytest.raises(ProfileError, match=r"runtme: unknown key \(did you mean runtime\?\)"):
        parse_profile(path)


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ('slurm:\n  partition: "debug\\n#SBATCH --uid=0"\n', "slurm.partition"),
        ("slurm:\n  account: 'a; rm -rf ~'\n", "slurm.account"),
        ("slurm:\n  extra_options: ['--begin=now $(id)']\n", "slurm.extra_options"),
        ("slurm:\n  modules: ['python; curl x']\n", "slurm.modules"),
        ("slurm:\n  cpus: 0\n", "slurm.cpus"),
        ("slurm:\n  mem: lots\n", "slurm.mem"),
        ("kernel:\n  command: [python, -m, ipykernel_launcher]\n", "kernel.command"),
        ("kernel:\n  command: ['{python}', '-f', '{connection_file}', '{secret}']\n", "kernel.command"),
        ("kernel:\n  env: {'BAD NAME': x}\n", "kernel.env"),
        ("runtime:\n  kind: docker\n", "runtime.kind"),
        ("runtime:\n  hide: [relative/path]\n", "runtime.hide"),
        ("workspace:\n  mode: writable\n", "workspace.mode"),
    ],
)
def test_values_that_could_break_the_script_are_refused(profile_dir: Path, yaml_text: str, key: str) -> None:
    path = write(profile_dir, "bad", yaml_text)
    with pytest.raises(ProfileError) as err:
        parse_profile(path)
    assert str(err.value).startswith(f"{path}:2: {key}: ")
    assert "expected" in str(err.value)


def test_yaml_syntax_error_names_the_file(profile_dir: Path) -> None:
    path = write(profile_dir, "broken", "description: x\nslurm:\n  time: [unclosed\n  cpus: 2\n")
    with pytest.raises(ProfileError, match=f"^{path}:4: not valid YAML"):
        parse_profile(path)


def test_request_overrides_only_its_fields() -> None:
    profile = load_profile("local")
    merged = apply_request(profile, KernelRequest(name="k", time="2:00:00", cpus=2, workspace_rw=True))
    assert merged.get("slurm", "time") == "2:00:00"
    assert merged.get("slurm", "cpus") == 2
    assert merged.get("slurm", "mem") == profile.get("slurm", "mem")
    assert merged.get("workspace", "mode") == "rw"
    assert profile.get("slurm", "time") == "01:00:00", "the loaded profile itself is unchanged"


def test_request_overrides_are_validated() -> None:
    with pytest.raises(ProfileError, match=r"^--time: '2 hours' is not valid: expected a Slurm time"):
        apply_request(load_profile("local"), KernelRequest(name="k", time="2 hours"))


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "x" * 41, "über"])
def test_bad_kernel_names(name: str) -> None:
    with pytest.raises(ProfileError):
        check_kernel_name(name)


def test_good_kernel_name() -> None:
    assert check_kernel_name("demo-1.gpu_a") == "demo-1.gpu_a"


def test_error_line_points_at_the_value_deep_in_the_file(profile_dir: Path) -> None:
    path = write(profile_dir, "deep", "description: x\n\nslurm:\n  partition: debug\n  cpus: 2\n  mem: lots\n")
    with pytest.raises(ProfileError, match=f"^{path}:6: slurm.mem: 'lots' is not valid"):
        parse_profile(path)


def test_extends_merges_deeply_and_remembers_where_values_come_from(profile_dir: Path) -> None:
    base = write(profile_dir, "site-base", """
description: the site
slurm:
  account: proj1
  time: "02:00:00"
  modules: [python/3.11, cuda/12]
kernel:
  env: {A: "1", B: "2"}
""")
    gpu = write(profile_dir, "gpu", """
extends: site-base
slurm:
  partition: gpu
  modules: [cuda/12]
kernel:
  env: {B: "3"}
""")
    profile = load_profile("gpu")
    assert profile.source == gpu
    assert profile.get("slurm", "account") == "proj1", "kept from the base"
    assert profile.get("slurm", "partition") == "gpu", "added by the child"
    assert profile.get("slurm", "modules") == ["cuda/12"], "lists are replaced, not appended"
    assert profile.get("kernel", "env") == {"A": "1", "B": "3"}, "mappings merge key by key"
    assert profile.origins["slurm.account"] == f"{base}:4"
    assert profile.origins["slurm.partition"] == f"{gpu}:4"
    assert profile.origins["slurm.cpus"] == "default"
    merged = apply_request(profile, KernelRequest(name="k", cpus=8))
    assert merged.origins["slurm.cpus"] == "command line (--cpus)"


def test_an_error_in_a_base_profile_names_the_base_file(profile_dir: Path) -> None:
    base = write(profile_dir, "base", "slurm:\n  time: forever\n")
    write(profile_dir, "child", "extends: base\nslurm:\n  partition: debug\n")
    with pytest.raises(ProfileError, match=f"^{base}:2: slurm.time: 'forever'"):
        load_profile("child")


def test_extends_cycle_is_an_error(profile_dir: Path) -> None:
    write(profile_dir, "a", "extends: b\n")
    write(profile_dir, "b", "extends: c\n")
    write(profile_dir, "c", "extends: a\n")
    with pytest.raises(ProfileError, match="cycle: a -> b -> c -> a"):
        load_profile("a")


def test_extends_an_unknown_profile(profile_dir: Path) -> None:
    path = write(profile_dir, "child", "description: x\nextends: nosuch\n")
    with pytest.raises(ProfileError, match=f"^{path}:2: extends: unknown profile 'nosuch'"):
        load_profile("child")


def test_default_profile(profile_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_kernels.profiles import default_profile_name

    monkeypatch.delenv("HPC_KERNELS_PROFILE", raising=False)
    assert default_profile_name() is None
    write(profile_dir, "default", "extends: local\n")
    assert default_profile_name() == "default"
    monkeypatch.setenv("HPC_KERNELS_PROFILE", "local")
    assert default_profile_name() == "local"


def test_precedence_profile_then_user_config_then_environment_then_flags(
    profile_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(profile_dir, "site", "slurm:\n  account: site-acct\n  time: '01:00:00'\n  cpus: 2\n  mem: 2G\n")
    config = profile_dir / "no-user-config" / "hpc-kernels" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("slurm:\n  account: my-acct\n  cpus: 3\n")
    environ = {"HPC_KERNELS_SLURM_CPUS": "4", "HPC_KERNELS_SLURM_TIME": "2:00:00",
               "HPC_KERNELS_PROFILE": "ignored", "HPC_KERNELS_PROFILE_PATH": "/ignored"}
    profile = load_profile("site", environ)
    assert profile.get("slurm", "account") == "my-acct"
    assert profile.origins["slurm.account"] == f"{config}:2"
    assert profile.get("slurm", "cpus") == 4
    assert profile.origins["slurm.cpus"] == "environment (HPC_KERNELS_SLURM_CPUS)"
    assert profile.get("slurm", "time") == "2:00:00", "a Slurm time is not read as a sexagesimal number"
    assert profile.get("slurm", "mem") == "2G" and profile.origins["slurm.mem"].endswith("site.yaml:5")
    final = apply_request(profile, KernelRequest(name="k", cpus=8))
    assert final.get("slurm", "cpus") == 8 and final.origins["slurm.cpus"] == "command line (--cpus)"


def test_a_bad_environment_value_names_the_variable(profile_dir: Path) -> None:
    with pytest.raises(ProfileError, match=r"^environment \(HPC_KERNELS_SLURM_CPUS\): slurm.cpus: 'lots'"):
        load_profile("local", {"HPC_KERNELS_SLURM_CPUS": "lots"})
    with pytest.raises(ProfileError, match=r"^environment \(HPC_KERNELS_SLURM_ACCOUT\): slurm.accout: unknown key "
                                           r"\(did you mean slurm.account\?\)"):
        load_profile("local", {"HPC_KERNELS_SLURM_ACCOUT": "x"})


def test_user_config_may_not_extend(profile_dir: Path) -> None:
    config = profile_dir / "no-user-config" / "hpc-kernels" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("slurm: {cpus: 2}\nextends: local\n")
    with pytest.raises(ProfileError, match=f"^{config}:2: extends: not allowed in a config file"):
        load_profile("local", {})


@pytest.mark.parametrize("bind", ["relative", "/a/../etc", "/a:rx", "/a b", "/a,b", "/a:ro\\n"])
def test_bad_binds(profile_dir: Path, bind: str) -> None:
    path = write(profile_dir, "b", f"runtime:\n  binds: [{bind!r}]\n")
    with pytest.raises(ProfileError, match=f"^{path}:2: runtime.binds: "):
        parse_profile(path)


def test_a_bind_of_home_is_refused(profile_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_kernels.errors import HpcKernelsError
    from hpc_kernels.launcher import resolve_request

    monkeypatch.setenv("HOME", str(profile_dir / "home"))
    write(profile_dir, "b", f"extends: local\nruntime:\n  binds: ['{profile_dir / 'home'}:ro']\n")
    with pytest.raises(HpcKernelsError, match="runtime.binds .*b.yaml:3.*: the bind .* would show the kernel your home"):
        resolve_request("b", KernelRequest(name="k"))


def test_yaml_keeps_times_names_and_versions_as_written(profile_dir: Path) -> None:
    path = write(profile_dir, "plain", """
slurm:
  time: 1:30:00
  account: 010
  partition: no
  cpus: 4
  environment: {PY_VER: 3.10, START: 8:30, MASK: 0755, FLAG: on}
kernel:
  start_timeout: 2.5
""")
    profile = parse_profile(path)
    assert profile.get("slurm", "time") == "1:30:00", "not 5400 (YAML 1.1 sexagesimal)"
    assert profile.get("slurm", "account") == "010", "not 8 (octal)"
    assert profile.get("slurm", "partition") == "no", "not False"
    assert profile.get("slurm", "cpus") == 4
    assert profile.get("slurm", "environment") == {"PY_VER": "3.10", "START": "8:30", "MASK": "0755", "FLAG": "on"}
    assert profile.get("kernel", "start_timeout") == 2.5


def test_environment_values_are_read_by_the_type_of_their_key(profile_dir: Path) -> None:
    profile = load_profile("local", {
        "HPC_KERNELS_SLURM_ACCOUNT": "0700", "HPC_KERNELS_SLURM_PARTITION": "no",
        "HPC_KERNELS_KERNEL_DISPLAY_NAME": "Py #2", "HPC_KERNELS_SLURM_CPUS": "4",
        "HPC_KERNELS_SLURM_MODULES": "[gcc/12, python/3.11]", "HPC_KERNELS_RELAY_TUNE_SRUN_TCP": "false",
    })
    assert profile.get("slurm", "account") == "0700"
    assert profile.get("slurm", "partition") == "no"
    assert profile.get("kernel", "display_name") == "Py #2"
    assert profile.get("slurm", "cpus") == 4
    assert profile.get("slurm", "modules") == ["gcc/12", "python/3.11"]
    assert profile.get("relay", "tune_srun_tcp") is False


def test_an_empty_section_changes_nothing(profile_dir: Path) -> None:
    write(profile_dir, "base", "slurm:\n  partition: gpu\n  cpus: 8\n")
    write(profile_dir, "child", "extends: base\nslurm:\n  # partition: debug\n")
    profile = load_profile("child", {})
    assert profile.get("slurm", "partition") == "gpu" and profile.get("slurm", "cpus") == 8


def test_a_broken_section_is_reported_even_with_an_environment_override(profile_dir: Path) -> None:
    path = write(profile_dir, "badsec", "slurm: just-a-string\n")
    with pytest.raises(ProfileError, match=f"^{path}:1: slurm: expected a mapping"):
        load_profile("badsec", {"HPC_KERNELS_SLURM_ACCOUNT": "x"})


def test_description_is_not_inherited(profile_dir: Path) -> None:
    write(profile_dir, "base", "description: the base\n")
    write(profile_dir, "child", "extends: base\n")
    assert load_profile("child", {}).description == ""


def test_a_profile_that_is_not_utf8_is_a_clear_error(profile_dir: Path) -> None:
    path = profile_dir / "latin1.yaml"
    path.write_bytes("description: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ProfileError, match=f"^{path}: not UTF-8 text"):
        parse_profile(path)


def test_a_profile_extending_its_own_name_builds_on_the_next_one(profile_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    user = profile_dir / "user"
    user.mkdir()
    (user / "local.yaml").write_text("extends: local\nslurm:\n  cpus: 2\n")
    monkeypatch.setenv("HPC_KERNELS_PROFILE_PATH", str(user))
    profile = load_profile("local", {})
    assert profile.get("slurm", "cpus") == 2, "the user's own value"
    assert profile.get("slurm", "partition") == "debug", "the shipped local profile underneath"


def test_extending_itself_without_a_profile_below_is_an_error(profile_dir: Path) -> None:
    path = write(profile_dir, "lonely", "description: x\nextends: lonely\n")
    with pytest.raises(ProfileError, match=f"^{path}:2: extends: unknown profile 'lonely' further down"):
        load_profile("lonely", {})


# --- runtimes, images and GPUs ------------------------------------------------------------------


@pytest.mark.parametrize("text, line, message", [
    ("runtime:\n  kind: apptainer\n", 2, "runtime.image: required with runtime.kind apptainer"),
    ("runtime:\n  kind: bwrap\n  image: /i.sif\n", 3, "runtime.image: only used with runtime.kind apptainer"),
    ("runtime:\n  kind: docker\n", 2, "runtime.kind: 'docker' is not valid: expected one of: bwrap, apptainer"),
    ("runtime:\n  kind: apptainer\n  image: 'images/k.sif'\n", 3,
     "runtime.image: 'images/k.sif' is not valid with runtime.kind apptainer: expected the absolute path"),
    ("runtime:\n  kind: podman\n", 2, "runtime.image: required with runtime.kind podman"),
    ("runtime:\n  kind: podman\n  image: /opt/k.tar\n", 3,
     "runtime.image: '/opt/k.tar' is not valid with runtime.kind podman: expected an image reference"),
    ("runtime:\n  kind: podman\n  image: docker://k:1\n", 3,
     "runtime.image: 'docker://k:1' is not valid with runtime.kind podman"),
    ("runtime:\n  kind: apptainer\n  image: /i.sif\n  image_archive: /k.tar\n", 4,
     "runtime.image_archive: only used with runtime.kind podman"),
    ("runtime:\n  kind: podman\n  image: k\n  executable: /usr/bin/podman\n", 4,
     "runtime.executable: not used with runtime.kind podman; set runtime.podman_command"),
    ("runtime:\n  kind: podman\n  image: k\n  image_archive: k.tar\n", 4,
     "runtime.image_archive: 'k.tar' is not valid: expected an absolute path"),
    ("runtime:\n  kind: podman\n  image: k\n  podman_storage: nfs\n", 4,
     "runtime.podman_storage: 'nfs' is not valid: expected one of: node, job, site"),
    ("runtime:\n  kind: podman\n  image: k\n  podman_gpus: all\n", 4,
     "runtime.podman_gpus: 'all' is not valid: expected one of: cdi, podman-hpc, devices"),
    ("runtime:\n  kind: podman\n  image: k\n  podman_command: podman --log-level debug\n", 4,
     "runtime.podman_command: 'podman --log-level debug' is not valid: expected a command name or absolute path"),
    ("runtime:\n  kind: podman\n  image: k\n  podman_oci_runtime: 'runc;id'\n", 4,
     "runtime.podman_oci_runtime: 'runc;id' is not valid: expected an OCI runtime's name or path"),
])
def test_apptainer_needs_an_image_and_bwrap_takes_none(profile_dir: Path, text: str, line: int, message: str) -> None:
    path = write(profile_dir, "r", text)
    with pytest.raises(ProfileError, match=f"^{re.escape(f'{path}:{line}: {message}')}"):
        parse_profile(path)


def test_a_podman_profile_and_its_defaults(profile_dir: Path) -> None:
    path = write(profile_dir, "p", "runtime:\n  kind: podman\n  image: localhost/hpc-kernels/kernel:latest\n"
                                   "  image_archive: /opt/k.oci.tar\n  podman_oci_runtime: runc\n")
    runtime = parse_profile(path).section("runtime")
    assert (runtime["image"], runtime["image_archive"], runtime["podman_oci_runtime"]) == (
        "localhost/hpc-kernels/kernel:latest", "/opt/k.oci.tar", "runc")
    assert (runtime["podman_command"], runtime["podman_storage"], runtime["podman_gpus"]) == ("podman", "job", "cdi")


def test_image_on_the_command_line_is_checked_for_the_profiles_kind(profile_dir: Path) -> None:
    path = write(profile_dir, "p", "runtime:\n  kind: podman\n  image: k\n")
    profile = parse_profile(path)
    assert apply_request(profile, KernelRequest("k", image="other/k:2")).get("runtime", "image") == "other/k:2"
    with pytest.raises(ProfileError, match="runtime.image: '/opt/k.sif' is not valid with runtime.kind podman"):
        apply_request(profile, KernelRequest("k", image="/opt/k.sif"))


@pytest.mark.parametrize("value, expected", [(1, "1"), ("2", "2"), ("a100:2", "a100:2"), (0, None), (None, None)])
def test_gpus_are_a_count_with_an_optional_type(profile_dir: Path, value: object, expected: str | None) -> None:
    path = write(profile_dir, "g", f"slurm:\n  gpus: {'null' if value is None else value}\n")
    assert parse_profile(path).get("slurm", "gpus") == expected


@pytest.mark.parametrize("value", ["-1", "two", "a100:", "a100:0", "gpu:a100:1 --x", "1,2"])
def test_bad_gpu_requests(profile_dir: Path, value: str) -> None:
    path = write(profile_dir, "g", f"slurm:\n  gpus: '{value}'\n")
    with pytest.raises(ProfileError, match=rf"^{path}:2: slurm.gpus: .* expected a number of GPUs"):
        parse_profile(path)


def test_gres_other_than_gpus_and_no_second_gres_option(profile_dir: Path) -> None:
    assert parse_profile(write(profile_dir, "n", "slurm:\n  gres: [nvme:10]\n")).get("slurm", "gres") == ["nvme:10"]
    with pytest.raises(ProfileError, match=r"slurm.gres: .*GPUs go in slurm.gpus"):
        parse_profile(write(profile_dir, "n", "slurm:\n  gres: ['gpu:1']\n"))
    path = write(profile_dir, "n", "slurm:\n  gpus: 1\n  extra_options: ['--gres=nvme:1']\n")
    with pytest.raises(ProfileError, match=rf"^{path}:3: slurm.extra_options: --gres=nvme:1 together with"):
        parse_profile(path)


def test_gpus_and_image_flags_override_the_profile() -> None:
    merged = apply_request(load_profile("local-apptainer"), KernelRequest(name="k", gpus="1", image="/other.sif"))
    assert merged.get("slurm", "gpus") == "1" and merged.origins["slurm.gpus"] == "command line (--gpus)"
    assert merged.get("runtime", "image") == "/other.sif"
    assert apply_request(load_profile("local-gpu"), KernelRequest(name="k", gpus="0")).get("slurm", "gpus") is None
    with pytest.raises(ProfileError, match=r"^--gpus: 'lots' is not valid"):
        apply_request(load_profile("local"), KernelRequest(name="k", gpus="lots"))
    with pytest.raises(ProfileError, match=r"runtime.image: only used with runtime.kind apptainer"):
        apply_request(load_profile("local"), KernelRequest(name="k", image="/other.sif"))


# --- where state lives: paths.state, one setting for all profiles ---------------------------------


@pytest.fixture
def site_config(profile_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = profile_dir / "etc-hpc-kernels-config.yaml"
    monkeypatch.setattr(profiles, "SITE_CONFIG", path)
    monkeypatch.delenv("HPC_KERNELS_PATHS_STATE", raising=False)
    return path


def user_config(profile_dir: Path, text: str) -> Path:
    config = profile_dir / "no-user-config" / "hpc-kernels" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    return config


def test_state_defaults_to_xdg_data_home(site_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", "/data/u")
    assert profiles.state_setting() is None
    assert state_root() == Path("/data/u/hpc-kernels")


def test_state_from_site_then_user_then_environment(site_config: Path, profile_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "alice")
    site_config.write_text("paths:\n  state: /scratch/$USER/hpc-kernels\n")
    assert profiles.state_setting() == ("/scratch/alice/hpc-kernels", f"{site_config}:2")
    assert state_root() == Path("/scratch/alice/hpc-kernels")
    config = user_config(profile_dir, "slurm: {cpus: 2}\npaths: {state: /work/alice/hk}\n")
    assert profiles.state_setting() == ("/work/alice/hk", f"{config}:2")
    monkeypatch.setenv("HPC_KERNELS_PATHS_STATE", "/elsewhere")
    assert profiles.state_setting() == ("/elsewhere", "environment (HPC_KERNELS_PATHS_STATE)")
    shown = load_profile("local")
    assert shown.get("paths", "state") == "/elsewhere", "profiles show tells the same story"


def test_state_is_not_a_profile_setting(site_config: Path, profile_dir: Path) -> None:
    path = write(profile_dir, "mine", "slurm: {cpus: 2}\npaths:\n  state: /scratch/x\n")
    with pytest.raises(ProfileError, match=rf"^{path}:3: paths.state: not a profile setting"):
        parse_profile(path)


def test_the_site_config_holds_only_the_state(site_config: Path) -> None:
    site_config.write_text("paths:\n  state: /scratch/x\nslurm:\n  partition: gpu\n")
    with pytest.raises(ProfileError, match=rf"^{site_config}:4: slurm.partition: the site config holds only paths.state"):
        load_profile("local")


@pytest.mark.parametrize("value, message", [
    ("relative/dir", "expected an absolute path"),
    ("/scratch/$NO_SUCH_VARIABLE_HK/x", "a variable in it is not set"),
])
def test_a_bad_state_setting_names_the_file_and_line(site_config: Path, value: str, message: str) -> None:
    site_config.write_text(f"# site\npaths:\n  state: {value}\n")
    with pytest.raises(ProfileError, match=rf"^{site_config}:3: paths.state: .*{message}"):
        profiles.state_setting()


def test_relay_allow_defaults_to_the_profiles_own_transport(profile_dir: Path) -> None:
    write(profile_dir, "plain", "slurm:\n  partition: debug\n")
    write(profile_dir, "fast", "relay:\n  transport: tcp\n  allow: [tcp, srun]\n  tcp_ports: 20000-20099\n")
    plain, fast = load_profile("plain", {}), load_profile("fast", {})
    assert plain.get("relay", "transport") == "srun" and plain.get("relay", "allow") == ["srun"]
    assert fast.get("relay", "allow") == ["tcp", "srun"] and fast.get("relay", "tcp_ports") == [20000, 20099]


def test_a_relay_transport_outside_relay_allow_is_refused_in_the_profile_and_on_the_command_line(
        profile_dir: Path) -> None:
    path = write(profile_dir, "bad", "relay:\n  transport: ssh\n  allow: [srun, tcp]\n")
    with pytest.raises(ProfileError, match=f"^{path}:2: relay.transport: ssh is not in relay.allow \\(srun, tcp\\)"):
        load_profile("bad", {})
    write(profile_dir, "site", "relay:\n  allow: [srun, tcp]\n")
    site = load_profile("site", {})
    assert apply_request(site, KernelRequest(name="k", relay="tcp")).get("relay", "transport") == "tcp"
    with pytest.raises(ProfileError, match=r"^command line \(--relay\): relay.transport: ssh is not in relay.allow"):
        apply_request(site, KernelRequest(name="k", relay="ssh"))
    with pytest.raises(ProfileError, match=r"^--relay: 'pigeon' is not valid: expected one of: srun, tcp, ssh"):
        apply_request(site, KernelRequest(name="k", relay="pigeon"))


@pytest.mark.parametrize("ports", ["80-90", "30000-20000", "lots", "20000-70000"])
def test_relay_tcp_ports_must_be_an_unprivileged_range(profile_dir: Path, ports: str) -> None:
    path = write(profile_dir, "p", f"relay:\n  allow: [tcp]\n  transport: tcp\n  tcp_ports: {ports}\n")
    with pytest.raises(ProfileError, match=f"^{path}:4: relay.tcp_ports: .* expected a range of unprivileged ports"):
        load_profile("p", {})
