"""An OCI image archive from a root file system directory, for the podman runtime.

``podman load`` takes an OCI archive: a tar of an OCI image layout (``oci-layout``, ``index.json``,
``blobs/sha256/...``). The project's kernel image is an Apptainer SIF; ``apptainer build
--sandbox`` unpacks it into a directory, and :func:`write_oci_archive` turns that directory
into a one-layer OCI image named ``reference``. Nothing here needs podman, root or a registry,
so an admin makes the archive on a login node and podman on the nodes loads it (air-gapped
sites load images the same way).

Every file of the layer belongs to root in the image (an unprivileged ``apptainer build
--sandbox`` leaves them the builder's); modes, links and times are kept.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
# The project's kernel image under podman (hpc-kernel image build --format oci, image export).
DEFAULT_OCI_REFERENCE = "localhost/hpc-kernels/kernel:latest"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Python's platform.machine() -> OCI (GOARCH) architecture names.
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le",
                  "s390x": "s390x", "riscv64": "riscv64"}
# Apptainer's own files in an unpacked image: its runscript machinery, of no use to podman.
APPTAINER_ENTRIES = (".singularity.d", "singularity", "environment", ".exec", ".run", ".shell", ".test")


def oci_architecture(machine: str | None = None) -> str:
    machine = machine or platform.machine()
    return _ARCHITECTURES.get(machine, machine)


def image_config(diff_id: str, *, architecture: str, created: str, env: Mapping[str, str] | None = None,
                 ) -> dict[str, Any]:
    """Pure: the image's configuration for one layer whose uncompressed digest is ``diff_id``."""
    variables = {"PATH": DEFAULT_PATH, **(env or {})}
    return {
        "created": created,
        "architecture": architecture,
        "os": "linux",
        "config": {"Env": [f"{k}={v}" for k, v in variables.items()], "Cmd": ["python3"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "hpc-kernel image export"}],
    }


def manifest(config: tuple[str, int], layer: tuple[str, int], *, compressed: bool) -> dict[str, Any]:
    """Pure: the image manifest, given (digest, size) of the config and the layer blobs."""
    return {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": LAYER_GZIP if compressed else LAYER_TAR, "digest": layer[0], "size": layer[1]}],
    }


def index(manifest_blob: tuple[str, int], reference: str) -> dict[str, Any]:
    """Pure: the layout's index, naming the one manifest ``reference`` (what ``podman load`` tags)."""
    return {
        "schemaVersion": 2,
        "manifests": [{"mediaType": MANIFEST, "digest": manifest_blob[0], "size": manifest_blob[1],
                       "annotations": {REF_NAME: reference}}],
    }


class _Hashing:
    """A write-only file that counts and hashes what passes through it."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.sha256, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256.hexdigest()}"


def _as_root(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE):
        return None  # sockets, fifos and devices: nothing a kernel image needs
    top = info.name.split("/", 1)[0]
    if top in APPTAINER_ENTRIES:
        return None
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def _write_layer(root: Path, blob: Path, *, compressed: bool) -> tuple[str, tuple[str, int]]:
    """The layer blob of ``root``: (diff_id, (digest, size))."""
    with blob.open("wb") as raw:
        stored = _Hashing(raw)
        packed: Any = gzip.GzipFile(fileobj=stored, mode="wb", compresslevel=1, mtime=0) if compressed else stored
        plain = _Hashing(packed)
        with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for entry in sorted(os.listdir(root)):
                tar.add(root / entry, arcname=entry, filter=_as_root)
        if compressed:
            packed.close()
    return plain.digest, (stored.digest, stored.size)


def _blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


def write_oci_archive(root: Path, output: Path, reference: str, *, compressed: bool = False,
                      architecture: str | None = None) -> str:
    """Write ``root`` as a one-layer OCI archive at ``output`` (atomically: only a complete
    archive appears there); return the manifest's digest. Uncompressed by default: loading is
    then a copy, and the layer is larger but starts faster."""
    if not (root / "usr").is_dir():
        raise ValueError(f"{root} does not look like a root file system (no usr/)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".hk-oci-", dir=output.parent) as work:
        layout = Path(work) / "layout"
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        layer_file = blobs / "layer.partial"
        diff_id, layer = _write_layer(root, layer_file, compressed=compressed)
        layer_file.rename(blobs / layer[0].removeprefix("sha256:"))
        created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        config = _blob(blobs, _json(image_config(diff_id, architecture=architecture or oci_architecture(),
                                                 created=created)))
        manifest_blob = _blob(blobs, _json(manifest(config, layer, compressed=compressed)))
        (layout / "oci-layout").write_bytes(_json({"imageLayoutVersion": "1.0.0"}))
        (layout / "index.json").write_bytes(_json(index(manifest_blob, reference)))
        partial = Path(work) / "archive.tar"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            for entry in ("oci-layout", "index.json", "blobs"):
                tar.add(layout / entry, arcname=entry)
        shutil.rmtree(layout)
        os.chmod(partial, 0o644)
        os.replace(partial, output)
    return manifest_blob[0]


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
