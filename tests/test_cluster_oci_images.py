"""Kernel images for podman, for real, as the test user: the cluster's OCI archive passes `image
check`, an archive made with `image export` from an image without ipykernel fails it and says
why, and `image build --format oci` gives an archive podman loads and runs. Each check loads the
archive into scratch storage of its own and leaves nothing: not in the user's own podman
storage, not in tmp."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from conftest import hk

IMAGES = Path("/opt/hpc-kernels/images")


def scratch_processes(tmp: Path) -> list[int]:
    """This user's processes started for a scratch storage (rootless podman's pause process)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == os.getuid() and \
                    f"XDG_RUNTIME_DIR={tmp}/hk-image-check-".encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def leftovers() -> tuple[list[str], list[str], list[int]]:
    own = Path.home() / ".local" / "share" / "containers"
    tmp = Path(os.environ.get("TMPDIR") or tempfile.gettempdir())
    return (sorted(p.name for p in own.rglob("*")) if own.exists() else [],
            sorted(p.name for p in tmp.iterdir() if p.name.startswith(("hk-image-check-", "hk-export-", "hk-image-"))),
            scratch_processes(tmp))


def test_image_check_of_a_podman_profile_and_of_an_archive_without_ipykernel(cluster: None) -> None:
    before = leftovers()
    report = json.loads(hk("image", "check", "--profile", "local-podman", "--json", timeout=300).stdout)
    assert report["ok"] is True and report["image"] == "localhost/hpc-kernels/kernel:latest"
    assert report["ipykernel"] and report["python"].startswith("3.")
    out = Path.home() / "hk-test-images" / f"no-ipykernel-{uuid.uuid4().hex[:6]}.tar"
    try:
        hk("image", "export", str(IMAGES / "no-ipykernel"), str(out), "--name", "localhost/test/broken:1", timeout=300)
        bad = hk("image", "check", str(out), "--profile", "local-podman", check=False, timeout=300)
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "problem: ipykernel cannot be imported (ModuleNotFoundError" in bad.stdout
        assert "localhost/test/broken:1: cannot run a kernel" in bad.stdout
        # The profile's image is not what the archive holds: said, not run.
        wrong = hk("image", "check", "--profile", "local-podman", "--json", check=False, timeout=300,
                   env={"HPC_KERNELS_RUNTIME_IMAGE_ARCHIVE": str(out)})
        assert wrong.returncode == 1
        assert "holds localhost/test/broken:1, not localhost/hpc-kernels/kernel:latest" in wrong.stdout
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    assert leftovers() == before
    assert before[2] == [], "no scratch storage's process left"


def test_image_build_format_oci_gives_an_archive_podman_runs(cluster: None) -> None:
    out = Path.home() / "hk-test-images" / f"derived-{uuid.uuid4().hex[:6]}.tar"
    before = leftovers()
    try:
        proc = hk("image", "build", str(out), "--format", "oci", "--from", str(IMAGES / "kernel.sif"),
                  "--name", "localhost/test/derived:2", timeout=900)
        assert "OCI archive, image localhost/test/derived:2" in proc.stderr + proc.stdout
        assert sorted(p.name for p in out.parent.iterdir()) == [out.name], "only the archive, no partial file"
        report = json.loads(hk("image", "check", str(out), "--profile", "local-podman", "--json", timeout=300).stdout)
        assert report["ok"] is True and report["image"] == "localhost/test/derived:2"
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    assert leftovers() == before
