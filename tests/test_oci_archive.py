"""OCI archives for the podman runtime (hpc_kernels/oci_archive.py) and the podman side of
``hpc-kernel image`` (pure parts; one real ``podman load`` of a tiny archive, when podman is
installed, shows podman takes what we write). The kernel image itself is exported, loaded and
checked on the cluster (test_cluster_oci_images.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from hpc_kernels.images import (archive_reference, is_image_reference, podman_check_argv, scratch_podman)
from hpc_kernels.oci_archive import LAYER_GZIP, LAYER_TAR, REF_NAME, oci_architecture, write_oci_archive

REFERENCE = "localhost/hpc-kernels/test:1"


def tiny_root(path: Path) -> Path:
    (path / "usr" / "bin").mkdir(parents=True)
    (path / "usr" / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    os.chmod(path / "usr" / "bin" / "tool", 0o755)
    (path / "bin").symlink_to("usr/bin")
    os.link(path / "usr" / "bin" / "tool", path / "usr" / "bin" / "tool2")
    (path / ".singularity.d" / "env").mkdir(parents=True)
    (path / ".singularity.d" / "env" / "90-environment.sh").write_text("export X=1\n")
    (path / "environment").symlink_to(".singularity.d/env/90-environment.sh")
    return path


def read_layout(archive: Path) -> tuple[dict, dict, dict, bytes]:  # type: ignore[type-arg]
    with tarfile.open(archive) as tar:
        def blob(digest: str) -> bytes:
            member = tar.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            assert member is not None
            return member.read()
        assert json.loads(tar.extractfile("oci-layout").read()) == {"imageLayoutVersion": "1.0.0"}  # type: ignore[union-attr]
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        entry = index["manifests"][0]
        manifest_bytes = blob(entry["digest"])
        assert len(manifest_bytes) == entry["size"]
        assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == entry["digest"]
        manifest = json.loads(manifest_bytes)
        config_bytes = blob(manifest["config"]["digest"])
        assert "sha256:" + hashlib.sha256(config_bytes).hexdigest() == manifest["config"]["digest"]
        layer = blob(manifest["layers"][0]["digest"])
        assert "sha256:" + hashlib.sha256(layer).hexdigest() == manifest["layers"][0]["digest"]
        assert len(layer) == manifest["layers"][0]["size"]
        return index, manifest, json.loads(config_bytes), layer


@pytest.mark.parametrize("compressed", [False, True])
def test_archive_is_a_valid_oci_layout_of_the_root(tmp_path: Path, compressed: bool) -> None:
    out = tmp_path / "out" / "image.tar"
    digest = write_oci_archive(tiny_root(tmp_path / "root"), out, REFERENCE, compressed=compressed)
    index, manifest, config, layer = read_layout(out)
    assert index["manifests"][0]["digest"] == digest
    assert index["manifests"][0]["annotations"] == {REF_NAME: REFERENCE}
    assert manifest["layers"][0]["mediaType"] == (LAYER_GZIP if compressed else LAYER_TAR)
    plain = gzip.decompress(layer) if compressed else layer
    assert config["rootfs"]["diff_ids"] == ["sha256:" + hashlib.sha256(plain).hexdigest()]
    assert config["architecture"] == oci_architecture() and config["os"] == "linux"
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert not any(name.startswith((".singularity.d", "environment")) for name in members), "Apptainer's own files stay out"
    assert {(m.uid, m.gid, m.uname) for m in members.values()} == {(0, 0, "root")}
    assert members["bin"].issym() and members["bin"].linkname == "usr/bin"
    assert members["usr/bin/tool"].mode & 0o777 == 0o755
    links = [m for m in members.values() if m.islnk()]
    assert len(links) == 1 and {links[0].name, links[0].linkname} == {"usr/bin/tool", "usr/bin/tool2"}
    assert os.stat(out).st_mode & 0o777 == 0o644
    assert sorted(p.name for p in out.parent.iterdir()) == ["image.tar"], "nothing else left beside it"


def test_a_directory_that_is_no_root_file_system_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    with pytest.raises(ValueError, match="no usr/"):
        write_oci_archive(tmp_path / "root", tmp_path / "out" / "image.tar", REFERENCE)
    assert not (tmp_path / "out" / "image.tar").exists()


def test_archive_reference(tmp_path: Path) -> None:
    out = tmp_path / "image.tar"
    write_oci_archive(tiny_root(tmp_path / "root"), out, REFERENCE)
    assert archive_reference(out) == REFERENCE
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    assert archive_reference(tmp_path / "junk.tar") is None
    assert archive_reference(tmp_path / "missing.tar") is None


@pytest.mark.parametrize("text, ok", [
    ("localhost/hpc-kernels/kernel:latest", True), ("docker.io/library/python:3.12-slim", True),
    ("registry.example.org:5000/team/kernel@sha256:" + "a" * 64, True), ("kernel", True),
    ("--privileged", False), ("docker://python:3.12", False), ("kernel latest", False), ("Kernel", False),
    ("", False), ("a;b", False),
])
def test_image_references(text: str, ok: bool) -> None:
    assert is_image_reference(text) is ok


def test_the_check_runs_the_image_isolated_as_a_kernel_would() -> None:
    argv = podman_check_argv(["podman", "--root", "/r"], REFERENCE)
    assert argv[:4] == ["podman", "--root", "/r", "run"]
    joined = " ".join(argv)
    for flag in ("--rm", "--pull never", "--network none", "--userns keep-id", "--cap-drop ALL",
                 "--security-opt no-new-privileges", "--read-only"):
        assert flag in joined
    assert argv.index(REFERENCE) > argv.index("--read-only") and argv[argv.index(REFERENCE) + 1] == "python3"


@pytest.mark.skipif(shutil.which("podman") is None, reason="podman is not installed (cluster/packages.txt has it)")
def test_podman_loads_what_we_write_into_scratch_storage_and_nothing_stays(tmp_path: Path) -> None:
    out = tmp_path / "image.tar"
    write_oci_archive(tiny_root(tmp_path / "root"), out, REFERENCE)
    with scratch_podman({"podman_command": "podman", "podman_oci_runtime": "runc"}) as (argv, env):
        work = Path(argv[argv.index("--root") + 1]).parent
        loaded = subprocess.run([*argv, "load", "--input", str(out)], capture_output=True, text=True, env=env,
                                timeout=120)
        assert loaded.returncode == 0, loaded.stderr
        assert REFERENCE in loaded.stdout
        listed = subprocess.run([*argv, "image", "inspect", REFERENCE], capture_output=True, text=True, env=env,
                                timeout=60)
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)[0]["Architecture"] == oci_architecture()
    assert not work.exists(), "the scratch storage is removed"
    assert not processes_with(f"XDG_RUNTIME_DIR={work}/".encode()), "rootless podman's pause process is gone too"


def processes_with(variable: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and variable in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found
