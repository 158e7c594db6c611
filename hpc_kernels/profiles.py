"""Site profiles: YAML files that describe how a kernel job runs on a cluster.

A profile is found by name on a search path (first match wins):

1. each directory in ``$HPC_KERNELS_PROFILE_PATH`` (colon-separated),
2. ``$XDG_CONFIG_HOME/hpc-kernels/profiles`` (usually ``~/.config/hpc-kernels/profiles``),
3. ``/etc/hpc-kernels/profiles``,
4. the profiles shipped with hpc-kernels (``site-configs/``).

Every value is checked before anything is submitted. A mistake is reported with the file, the key
path and what was expected; unknown keys get a did-you-mean.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .egress import parse_allowed
from .errors import HpcKernelsError, ProfileError
from .resources import data_dir
from .runtimes import (DEFAULT_SYSTEM_PATHS, PODMAN_GPU_MODES, PODMAN_STORAGE_MODES, RUNTIME_KINDS,
                       is_image_reference)

# How the relay carries a kernel's stream (hpc_kernels.relay): a job step, mutual-TLS TCP, OpenSSH.
RELAY_TRANSPORTS = ("srun", "tcp", "ssh")

SYSTEM_PROFILE_DIR = Path("/etc/hpc-kernels/profiles")
# The site's settings that belong to no profile (where state lives): paths.state only.
SITE_CONFIG = Path("/etc/hpc-kernels/config.yaml")

_SLURM_TIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?|\d+(:\d{1,2}(:\d{1,2})?)?)$")
_SLURM_MEM = re.compile(r"^\d+[KMGT]?$")
_SLURM_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_SBATCH_OPTION = re.compile(r"^--[A-Za-z][A-Za-z0-9\-]*(=[A-Za-z0-9_.,:=/@%+\-\[\]]*)?$")
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.+/\-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONSTRAINT = re.compile(r"^[A-Za-z0-9_.&|\[\]*:!(),\-]+$")
_BIND = re.compile(r"(/[^:,\s]*)(:(ro|rw))?")  # fullmatch; ',' and ':' would split Apptainer's --bind
_GRES = re.compile(r"^[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-]+)*$")
_GPUS = re.compile(r"^([A-Za-z0-9_.\-]+:)?[1-9][0-9]*$")
_KERNEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,39}$")
_PLACEHOLDERS = {"python", "connection_file"}


class ProfileLoader(yaml.SafeLoader):
    """YAML without YAML 1.1's surprises for a job script: ``2:00:00`` stays a time, not 7200
    (sexagesimal); ``010`` and ``0755`` stay text, not octal; ``3.10`` stays ``3.10``; ``no``,
    ``on`` and ``yes`` stay words. Only ``true``/``false``, ``null``/``~`` and plain decimal
    integers are typed; a number with a point is read where a number is expected."""


ProfileLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ProfileLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
ProfileLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                    list("-+0123456789"))


# ---------------------------------------------------------------------------------------------
# Value checkers: each returns the cleaned value or raises ValueError("<what was expected>").


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    if any(c in value for c in "\n\r\0"):
        raise ValueError("expected a single line (no newline or NUL characters)")
    return value


def _opt(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def optional(value: Any) -> Any:
        return None if value is None else check(value)

    return optional


def _matching(pattern: re.Pattern[str], expected: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        text = _str(value)
        if not pattern.match(text):
            raise ValueError(f"expected {expected}")
        return text

    return check


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def _positive_number(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError("expected a number of seconds greater than 0")
    return float(value)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> float | None:
    """``90``, ``90s``, ``10m``, ``1h30m``, ``2d``, or ``1:30:00`` (h:m:s) / ``10:00`` (m:s), in
    seconds; None if ``text`` is not a duration."""
    value = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    if re.fullmatch(r"(\d+(\.\d+)?[smhd])+", value):
        return float(sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(value)))
    if re.fullmatch(r"\d+(:\d{1,2}){1,2}", value):
        parts = [int(p) for p in value.split(":")]
        return float(sum(p * 60 ** i for i, p in enumerate(reversed(parts))))
    return None


def _duration(value: Any) -> float:
    """A duration (see :func:`duration_seconds`) or a number of seconds; 0 for none."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    seconds = duration_seconds(value) if isinstance(value, str) else None
    if seconds is None:
        raise ValueError("expected a duration such as 10m, 90s, 1h30m or 1:30:00 (0 for none)")
    return seconds


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("expected one of: " + ", ".join(choices))
        return value

    return check


def _list_of(check: Callable[[Any], Any], what: str) -> Callable[[Any], list[Any]]:
    def check_list(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list of {what}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(check(item))
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
        return out

    return check_list


def _abs_path(value: Any) -> str:
    text = _str(value)
    if not text.startswith("/"):
        raise ValueError("expected an absolute path")
    return text


def _node_tmp(value: Any) -> str:
    text = _str(value)
    if not (text.startswith("/") or text.startswith("$")):
        raise ValueError("expected an absolute path, or one starting with an environment variable like $SLURM_TMPDIR")
    return text


def _bind(value: Any) -> str:
    text = _str(value)
    if not _BIND.fullmatch(text) or ".." in text.split("/"):
        raise ValueError("expected an absolute path without ',' or ':', optionally followed by :ro or :rw "
                         "(e.g. /datasets:ro)")
    return text


def _gpus(value: Any) -> str | None:
    """``1``, ``2`` or ``a100:2`` (a GPU type, then how many); 0 or null: no GPU."""
    if value is None or value == 0 or value == "0":
        return None
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else _str(value)
    if not _GPUS.match(text):
        raise ValueError("expected a number of GPUs, optionally after a GPU type: 1, 2 or a100:2 (0 for none)")
    return text


def _gres(value: Any) -> str:
    text = _str(value)
    if not _GRES.match(text) or text.split(":")[0] == "gpu":
        raise ValueError("expected a generic resource other than GPUs, e.g. nvme:10 (GPUs go in slurm.gpus)")
    return text


def _state_path(value: Any) -> str:
    text = _str(value)
    if not (text.startswith("/") or text.startswith("$") or text.startswith("~")):
        raise ValueError("expected an absolute path, which may use $USER or $HOME (e.g. /scratch/$USER/hpc-kernels)")
    return text


def _python_env(value: Any) -> str:
    text = _str(value)
    if not (text.startswith("/") or text.startswith("$") or text.startswith("~")):
        raise ValueError("expected the absolute path of a venv, uv, conda or pixi environment, which may use "
                         "~ or $HOME (e.g. ~/envs/analysis)")
    return text


def _image(value: Any) -> str:
    """An Apptainer image's path or a podman image reference: which one the kind says
    (:func:`_check_image`, once the kind is known)."""
    text = _str(value)
    if any(c.isspace() for c in text) or text.startswith("-"):
        raise ValueError("expected the absolute path of a kernel image (apptainer) or an image reference such as "
                         "localhost/hpc-kernels/kernel:latest (podman), without spaces")
    return text


def _apptainer_image(text: str) -> str | None:
    """Why ``text`` is no Apptainer image path, or None."""
    if not text.startswith("/") or ":" in text:
        return "expected the absolute path of a SIF file or image directory, without spaces or ':'"
    return None


def _podman_image(text: str) -> str | None:
    """Why ``text`` is no podman image reference, or None."""
    if not is_image_reference(text):
        return ("expected an image reference such as localhost/hpc-kernels/kernel:latest (a file goes in "
                "runtime.image_archive)")
    return None


def _archive(value: Any) -> str:
    text = _abs_path(value)
    if any(c.isspace() for c in text) or ":" in text:
        raise ValueError("expected the absolute path of an OCI or docker archive (.tar), without spaces or ':'")
    return text


_COMMAND = re.compile(r"^[A-Za-z0-9_./+\-]+$")


def _allowed_host(value: Any) -> str:
    text = _str(value)
    host, port = parse_allowed(text)
    return f"{host}:{port}"


def _memory_limit(value: Any) -> str:
    """``job`` (the allocation), ``none``, or a Slurm size that tightens the allocation."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else _str(value)
    if text in ("job", "none") or _SLURM_MEM.match(text):
        return text
    raise ValueError("expected job (the job's memory), none, or a size such as 4G or 500M")


def _process_limit(value: Any) -> int | None:
    if value in (None, "none"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 16:
        raise ValueError("expected a whole number of at least 16, or none")
    return value


def _port_range(value: Any) -> list[int]:
    """``20000-20999`` (or one port): where the tcp transport's listener may bind."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else _str(value)
    low, _, high = text.partition("-")
    try:
        ports = [int(low), int(high or low)]
    except ValueError:
        ports = []
    if len(ports) != 2 or not 1024 <= ports[0] <= ports[1] <= 65535:
        raise ValueError("expected a range of unprivileged ports, e.g. 20000-20999")
    return ports


def _ssh_option(value: Any) -> str:
    text = _str(value)
    if not text or text != text.strip():
        raise ValueError("expected an ssh command-line argument without surrounding spaces, e.g. -o or ProxyJump=gw")
    return text


def _kernel_command(value: Any) -> list[str]:
    argv = _list_of(_str, "strings")(value)
    if not argv:
        raise ValueError("expected a non-empty list (the kernel's argv)")
    for arg in argv:
        for name in re.findall(r"\{([^{}]*)\}", arg):
            if name not in _PLACEHOLDERS:
                raise ValueError(
                    f"unknown placeholder {{{name}}} (expected only {{python}} and {{connection_file}})"
                )
    if not any("{connection_file}" in arg for arg in argv):
        raise ValueError("expected the command to pass {connection_file} to the kernel (e.g. -f {connection_file})")
    return argv


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of NAME: value")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _ENV_NAME.match(k):
            raise ValueError(f"{k!r} is not a variable name (expected letters, digits and _, not starting with a digit)")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        out[k] = _str(v) if v != "" else ""
    return out


# ---------------------------------------------------------------------------------------------
# The schema: section -> key -> (checker, default, human description).

_DEFAULT_KERNEL_COMMAND = ["{python}", "-m", "ipykernel_launcher", "-f", "{connection_file}"]

SCHEMA: dict[str, dict[str, tuple[Callable[[Any], Any], Any]]] = {
    "slurm": {
        "partition": (_opt(_matching(_SLURM_NAME, "a partition name (letters, digits, _ . -)")), None),
        "account": (_opt(_matching(_SLURM_NAME, "an account name (letters, digits, _ . -)")), None),
        "qos": (_opt(_matching(_SLURM_NAME, "a QOS name (letters, digits, _ . -)")), None),
        "time": (_matching(_SLURM_TIME, "a Slurm time, e.g. 02:00:00, 2:00 (minutes:seconds) or 1-12:00"), "01:00:00"),
        "cpus": (_positive_int, 1),
        "mem": (_matching(_SLURM_MEM, "a Slurm memory size, e.g. 4G or 500M"), "1G"),
        "constraint": (_opt(_matching(_CONSTRAINT, "a Slurm constraint, e.g. a100 or intel&ib")), None),
        "reservation": (_opt(_matching(_SLURM_NAME, "a reservation name (letters, digits, _ . -)")), None),
        "gpus": (_gpus, None),
        "gres": (_list_of(_gres, "generic resources"), []),
        "extra_options": (_list_of(_matching(_SBATCH_OPTION, "an sbatch long option, e.g. --exclusive or --licenses=matlab:1"), "sbatch options"), []),
        "modules": (_list_of(_matching(_MODULE_NAME, "a module name, e.g. python/3.11"), "module names"), []),
        "environment": (_env, {}),
    },
    "runtime": {
        "kind": (_one_of(*RUNTIME_KINDS), "bwrap"),
        "image": (_opt(_image), None),
        "executable": (_opt(_str), None),
        "image_archive": (_opt(_archive), None),
        "podman_command": (_matching(_COMMAND, "a command name or absolute path, e.g. podman or podman-hpc"), "podman"),
        "podman_oci_runtime": (_opt(_matching(_COMMAND, "an OCI runtime's name or path, e.g. runc or crun")), None),
        "podman_storage": (_one_of(*PODMAN_STORAGE_MODES), "job"),
        "podman_gpus": (_one_of(*PODMAN_GPU_MODES), "cdi"),
        "network": (_one_of("none"), "none"),
        "hide": (_list_of(_abs_path, "absolute paths"), ["/home", "/root", "/run", "/var/tmp", "/srv", "/mnt", "/media"]),
        "binds": (_list_of(_bind, "paths"), []),
        "system_paths": (_list_of(_abs_path, "absolute paths"), list(DEFAULT_SYSTEM_PATHS)),
        "allow_hosts": (_list_of(_allowed_host, "host names"), []),
    },
    "kernel": {
        "command": (_kernel_command, _DEFAULT_KERNEL_COMMAND),
        "python": (_opt(_str), None),
        "python_env": (_opt(_python_env), None),
        "display_name": (_opt(_str), None),
        "language": (_str, "python"),
        "env": (_env, {}),
        "start_timeout": (_positive_number, 60.0),
        "on_node": (_bool, True),
        "time_warning": (_duration, 600.0),
        # limits.idle_timeout for a kernel an agent starts through `hpc-kernel mcp` (0: the profile's)
        "mcp_idle_timeout": (_duration, 3600.0),
    },
    "paths": {
        "node_tmp": (_opt(_node_tmp), None),
        "python": (_opt(_abs_path), None),
        "templates": (_opt(_abs_path), None),
        "state": (_opt(_state_path), None),
    },
    "relay": {
        "transport": (_one_of(*RELAY_TRANSPORTS), "srun"),
        "allow": (_opt(_list_of(_one_of(*RELAY_TRANSPORTS), "relay transports")), None),
        "tcp_ports": (_opt(_port_range), None),
        "ssh_options": (_list_of(_ssh_option, "ssh options"), []),
        "tune_srun_tcp": (_bool, True),
    },
    "workspace": {
        "mode": (_one_of("ro", "rw"), "ro"),
    },
    "limits": {
        "memory": (_memory_limit, "job"),
        "processes": (_process_limit, 1024),
        "idle_timeout": (_duration, 0.0),
    },
}
_TOP_LEVEL = {"description"} | set(SCHEMA)


@dataclass(frozen=True)
class Profile:
    """A validated profile. ``settings[section][key]`` holds every key of SCHEMA, defaults filled in."""

    name: str
    source: Path
    description: str
    settings: Mapping[str, Mapping[str, Any]]
    # "section.key" -> where the value came from: "file:line", "default" or "command line (--flag)"
    origins: Mapping[str, str] = field(default_factory=dict)

    def get(self, section: str, key: str) -> Any:
        return self.settings[section][key]

    def section(self, section: str) -> Mapping[str, Any]:
        return self.settings[section]


@dataclass(frozen=True)
class KernelRequest:
    """What a user asks for at submit time; ``None`` fields take the profile's value."""

    name: str
    time: str | None = None
    cpus: int | None = None
    mem: str | None = None
    partition: str | None = None
    gpus: str | None = None
    image: str | None = None
    workspace: str | None = None
    workspace_rw: bool = False
    allocation: str | None = None  # run as a step of this job (the user's salloc) instead of a new job
    curve: bool = False  # CurveZMQ on the kernel's sockets (the frontend asked, the kernel supports it)
    relay: str | None = None  # one of relay.allow (--relay)
    time_warning: str | None = None  # how long before the time limit the kernel warns (--time-warning)
    allow_hosts: tuple[str, ...] = ()  # added to runtime.allow_hosts (--allow-host)
    idle_timeout: str | None = None  # hibernate after this long without a cell or a client (--idle-timeout)
    restore: str | None = None  # the snapshot of a hibernated kernel to load (submit --resume)
    restore_sha256: str | None = None  # what that snapshot held when it was saved
    python_env: str | None = None  # the user's own Python environment for the kernel (--python-env)


def check_kernel_name(name: str) -> str:
    if not _KERNEL_NAME.match(name or ""):
        raise ProfileError(
            f"kernel name {name!r} is not valid: expected 1-40 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def config_dir() -> Path:
    """The user's hpc-kernels config directory (``$XDG_CONFIG_HOME/hpc-kernels``)."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "hpc-kernels"


def search_path(first: Sequence[Path] = ()) -> list[Path]:
    """Where profiles are looked for, in order; ``first``: directories searched before all others."""
    dirs = [*first, *(Path(p) for p in os.environ.get("HPC_KERNELS_PROFILE_PATH", "").split(":") if p)]
    dirs.append(config_dir() / "profiles")
    dirs.append(SYSTEM_PROFILE_DIR)
    dirs.append(data_dir("site-configs"))
    return dirs


def available_profiles(first: Sequence[Path] = ()) -> dict[str, Path]:
    """Profile name -> the file that defines it (first on the search path wins)."""
    found: dict[str, Path] = {}
    for d in search_path(first):
        if not d.is_dir():
            continue
        for f in sorted(d.glob("*.yaml")) + sorted(d.glob("*.yml")):
            found.setdefault(f.stem, f)
    return found


def find_profile(name: str, first: Sequence[Path] = ()) -> Path:
    profiles = available_profiles(first)
    if name in profiles:
        return profiles[name]
    known = ", ".join(sorted(profiles)) or "(none)"
    hint = difflib.get_close_matches(name, list(profiles), n=1)
    did_you_mean = f" Did you mean {hint[0]!r}?" if hint else ""
    raise ProfileError(
        f"unknown profile {name!r}.{did_you_mean} Known profiles: {known}. "
        f"Searched: {', '.join(str(d) for d in search_path(first))}"
    )


def load_profile(name: str, environ: Mapping[str, str] | None = None) -> Profile:
    """Profile ``name`` as a user gets it: the profile (with what it extends), then the config
    files (the site's, which holds only ``paths.state``, then the user's), then
    ``HPC_KERNELS_<SECTION>_<KEY>`` variables. Command-line flags come last (:func:`apply_request`)."""
    path = find_profile(name)
    data, origins = _resolve(path)
    for config, config_data, config_origins in _config_files():
        data = _deep_merge(data, config_data)
        origins.update(config_origins)
    for (section, key), (variable, value) in environment_overrides(os.environ if environ is None else environ).items():
        if data.get(section) is None:
            data[section] = {}
        if isinstance(data[section], dict):  # else validation reports the broken section itself
            data[section][key] = value
        origins[(section, key)] = f"environment ({variable})"
    return validate_profile(data, path, origins)


def user_config_path() -> Path:
    return config_dir() / "config.yaml"


def _config_files() -> list[tuple[Path, dict[str, Any], Origins]]:
    """The site's config file (only ``paths.state``), then the user's (any profile key, and
    ``paths.state``): each file's data and origins, for the files that exist."""
    out = []
    for config, site in ((SITE_CONFIG, True), (user_config_path(), False)):
        if not config.is_file():
            continue
        data, origins = _read_yaml(config)
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ProfileError(f"{config}:1: expected a mapping of sections, as in a profile")
        for key in ("extends", "description"):
            if key in data:
                raise ProfileError(f"{origins[(key,)]}: {key}: not allowed in a config file")
        if site:
            for section, values in data.items():
                for key in values if isinstance(values, dict) else [None]:
                    if (section, key) != ("paths", "state"):
                        where = origins.get((section, str(key)), origins.get((section,), str(config)))
                        raise ProfileError(f"{where}: {section}{'.' + str(key) if key else ''}: the site config holds "
                                           "only paths.state; profile settings go in a profile")
        out.append((config, data, origins))
    return out


def state_setting(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """Where kernels' state lives, if the site or the user says (``paths.state``): the path with
    ``$USER``, ``$HOME`` and ``~`` expanded, and where it was set. None: the default
    (``$XDG_DATA_HOME/hpc-kernels``). One setting for all profiles, since ``list`` must find
    every kernel whatever profile started it: ``$HPC_KERNELS_PATHS_STATE``, else the user's
    config file, else the site's (``/etc/hpc-kernels/config.yaml``)."""
    environ = os.environ if environ is None else environ
    found: tuple[Any, str] | None = None
    if environ.get(ENVIRONMENT_PREFIX + "PATHS_STATE"):
        found = (environ[ENVIRONMENT_PREFIX + "PATHS_STATE"], f"environment ({ENVIRONMENT_PREFIX}PATHS_STATE)")
    else:
        for config, data, origins in reversed(_config_files()):
            paths = data.get("paths")
            if isinstance(paths, dict) and paths.get("state") is not None:
                found = (paths["state"], origins[("paths", "state")])
                break
    if found is None:
        return None
    value, where = found
    try:
        text = _state_path(value)
    except ValueError as e:
        raise ProfileError(f"{where}: paths.state: {value!r} is not valid: {e}") from None
    expanded = os.path.expanduser(os.path.expandvars(text))
    if "$" in expanded or not expanded.startswith("/"):
        raise ProfileError(f"{where}: paths.state: {text!r} is {expanded!r} here: a variable in it is not set")
    return os.path.normpath(expanded), where


ENVIRONMENT_PREFIX = "HPC_KERNELS_"


def environment_overrides(environ: Mapping[str, str]) -> dict[tuple[str, str], tuple[str, Any]]:
    """``HPC_KERNELS_SLURM_TIME=2:00:00`` -> {("slurm", "time"): (variable, "2:00:00")}.

    Values are read as YAML scalars or flow collections (``4`` is a number, ``[a, b]`` a list).
    Only variables naming a profile section count (HPC_KERNELS_PROFILE and _PROFILE_PATH do not).
    """
    out: dict[tuple[str, str], tuple[str, Any]] = {}
    for variable, raw in environ.items():
        if not variable.startswith(ENVIRONMENT_PREFIX):
            continue
        section, _, key = variable[len(ENVIRONMENT_PREFIX):].lower().partition("_")
        if section not in SCHEMA or not key:
            continue
        default = SCHEMA[section][key][1] if key in SCHEMA[section] else None
        value: Any = raw
        if isinstance(default, (list, dict)):  # a flow collection: [a, b] or {A: b}
            try:
                value = yaml.load(raw, Loader=ProfileLoader)
            except yaml.YAMLError:
                value = raw
        elif isinstance(default, bool):
            value = {"true": True, "false": False}.get(raw.strip().lower(), raw)
        elif isinstance(default, int):
            value = int(raw) if raw.strip().isdigit() else raw
        out[(section, key)] = (variable, value)
    return out


def default_profile_name() -> str | None:
    """``$HPC_KERNELS_PROFILE``, else a profile named ``default`` if the site has one."""
    return os.environ.get("HPC_KERNELS_PROFILE") or ("default" if "default" in available_profiles() else None)


Origins = dict[tuple[str, ...], str]


def _read_yaml(path: Path) -> tuple[Any, Origins]:
    return read_yaml_with_lines(path, ProfileLoader, "profile")


def read_yaml_with_lines(path: Path, loader_class: type[yaml.SafeLoader], what: str, sequences: bool = False,
                         error: type[HpcKernelsError] = ProfileError) -> tuple[Any, Origins]:
    """The file's data, and for every key path the ``file:line`` where its value is written
    (with ``sequences``, list items too, keyed by their index as text). Errors name the file,
    the line and say it is a ``what`` (a profile, a parameter file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"{path}: cannot read {what}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise error(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    finally:
        loader.dispose()
    origins: Origins = {}

    def walk(node: yaml.Node, keys: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                here = (*keys, str(key_node.value))
                origins[here] = f"{path}:{key_node.start_mark.line + 1}"
                walk(value_node, here)
        elif sequences and isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                here = (*keys, str(index))
                origins[here] = f"{path}:{item.start_mark.line + 1}"
                walk(item, here)

    if node is not None:
        walk(node, ())
    return data, origins


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key, recursively; anything else (lists included) in ``top`` replaces."""
    out = dict(base)
    for key, value in top.items():
        if value is None and isinstance(out.get(key), dict):
            continue  # an empty section (every key commented out) changes nothing
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _find_base(name: str, extender: Path, first: Sequence[Path] = ()) -> Path:
    """The profile ``name`` that ``extender`` builds on. A profile that extends its own name
    shadows it: its base is the next one of that name on the search path (a user's ``gpu`` on
    top of the site's ``gpu``)."""
    if name != extender.stem:
        return find_profile(name, first)
    later = False
    for directory in search_path(first):
        for candidate in (directory / f"{name}.yaml", directory / f"{name}.yml"):
            if candidate.is_file():
                if later:
                    return candidate
                if candidate.resolve() == extender.resolve():
                    later = True
    raise ProfileError(f"unknown profile {name!r} further down the search path (a profile that extends its "
                       "own name builds on the next profile of that name)")


def _resolve(path: Path, chain: tuple[Path, ...] = (), first: Sequence[Path] = ()) -> tuple[dict[str, Any], Origins]:
    """The profile at ``path`` with everything it ``extends`` merged under it."""
    if path in chain:
        cycle = " -> ".join(p.stem for p in (*chain, path))
        raise ProfileError(f"{chain[-1]}: extends: profiles extend each other in a cycle: {cycle}")
    data, origins = _read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProfileError(f"{path}:1: expected a mapping of sections ({', '.join(sorted(_TOP_LEVEL))})")
    paths = data.get("paths")
    if isinstance(paths, dict) and "state" in paths:
        raise ProfileError(f"{origins[('paths', 'state')]}: paths.state: not a profile setting: every kernel's "
                           f"state must be found whatever profile started it; set it in {SITE_CONFIG} "
                           "(the site) or ~/.config/hpc-kernels/config.yaml (a user)")
    base_name = data.pop("extends", None)
    if base_name is None:
        return data, origins
    where = origins.get(("extends",), str(path))
    if not isinstance(base_name, str) or not base_name:
        raise ProfileError(f"{where}: extends: {base_name!r} is not valid: expected the name of another profile")
    try:
        base_path = _find_base(base_name, path, first)
    except ProfileError as e:
        raise ProfileError(f"{where}: extends: {e}") from None
    base, base_origins = _resolve(base_path, (*chain, path), first)
    base.pop("description", None)  # a description is the profile's own, never inherited
    merged_origins = {k: v for k, v in base_origins.items() if k[:1] != ("description",)}
    merged_origins.update({k: v for k, v in origins.items() if k != ("extends",)})
    return _deep_merge(base, data), merged_origins


def parse_profile(path: Path, first: Sequence[Path] = ()) -> Profile:
    """The profile in file ``path`` alone (no config files, no environment); the profiles it
    extends are looked for in ``first``, then on the search path."""
    data, origins = _resolve(path, first=first)
    return validate_profile(data, path, origins)


def _unknown_key(where: str, keys: str, key: Any, known: set[str]) -> ProfileError:
    hint = difflib.get_close_matches(str(key), sorted(known), n=1)
    did_you_mean = f" (did you mean {keys}{hint[0]}?)" if hint else ""
    return ProfileError(
        f"{where}: {keys}{key}: unknown key{did_you_mean}; known keys here: {', '.join(sorted(known))}"
    )


def validate_profile(data: Any, path: Path, origins: Origins | None = None) -> Profile:
    """Check every value and fill in defaults. Errors name ``file:line`` of the value at fault
    (which may be in a profile this one extends), the key path and what was expected."""
    origins = origins or {}

    def at(*keys: str) -> str:
        for n in range(len(keys), 0, -1):
            if keys[:n] in origins:
                return origins[keys[:n]]
        return str(path)

    if not isinstance(data, dict):
        raise ProfileError(f"{path}: expected a mapping of sections ({', '.join(sorted(_TOP_LEVEL))})")
    for key in data:
        if key not in _TOP_LEVEL:
            raise _unknown_key(at(str(key)), "", key, _TOP_LEVEL | {"extends"})
    settings: dict[str, dict[str, Any]] = {}
    provenance: dict[str, str] = {}
    for section, keys in SCHEMA.items():
        given = data.get(section) or {}
        if not isinstance(given, dict):
            raise ProfileError(f"{at(section)}: {section}: expected a mapping with keys {', '.join(keys)}")
        for key in given:
            if key not in keys:
                raise _unknown_key(at(section, str(key)), f"{section}.", key, set(keys))
        settings[section] = {}
        for key, (check, default) in keys.items():
            value = given.get(key, default)
            try:
                settings[section][key] = check(value)
            except ValueError as e:
                raise ProfileError(f"{at(section, key)}: {section}.{key}: {value!r} is not valid: {e}") from None
            provenance[f"{section}.{key}"] = at(section, key) if key in given else "default"
    _check_together(settings, at)
    description = data.get("description") or ""
    if not isinstance(description, str):
        raise ProfileError(f"{at('description')}: description: expected a string")
    return Profile(name=path.stem, source=path, description=description, settings=settings, origins=provenance)


def _check_together(settings: Mapping[str, Mapping[str, Any]], at: Callable[..., str]) -> None:
    """Rules that concern more than one key."""
    runtime = settings["runtime"]
    kind = runtime["kind"]
    if kind == "apptainer" and not runtime["image"]:
        raise ProfileError(f"{at('runtime', 'kind')}: runtime.image: required with runtime.kind apptainer "
                           "(the absolute path of a kernel image: see `hpc-kernel image build`)")
    if kind == "podman" and not runtime["image"]:
        raise ProfileError(f"{at('runtime', 'kind')}: runtime.image: required with runtime.kind podman "
                           "(an image reference such as localhost/hpc-kernels/kernel:latest)")
    if kind == "bwrap" and runtime["image"]:
        raise ProfileError(f"{at('runtime', 'image')}: runtime.image: only used with runtime.kind apptainer or "
                           "podman (bubblewrap runs the node's own file system)")
    if runtime["image"]:
        why = _podman_image(runtime["image"]) if kind == "podman" else _apptainer_image(runtime["image"])
        if why:
            raise ProfileError(f"{at('runtime', 'image')}: runtime.image: {runtime['image']!r} is not valid with "
                               f"runtime.kind {kind}: {why}")
    if kind != "podman" and runtime["image_archive"]:
        raise ProfileError(f"{at('runtime', 'image_archive')}: runtime.image_archive: only used with runtime.kind "
                           "podman (Apptainer runs runtime.image itself)")
    if kind == "podman" and runtime["executable"]:
        raise ProfileError(f"{at('runtime', 'executable')}: runtime.executable: not used with runtime.kind podman; "
                           "set runtime.podman_command (podman, podman-hpc or a path)")
    relay = settings["relay"]
    if relay["allow"] is None:
        relay["allow"] = [relay["transport"]]
    elif relay["transport"] not in relay["allow"]:
        raise ProfileError(f"{at('relay', 'transport')}: relay.transport: {relay['transport']} is not in relay.allow "
                           f"({', '.join(relay['allow'])})")
    slurm = settings["slurm"]
    if slurm["gpus"] or slurm["gres"]:
        for option in slurm["extra_options"]:
            if option.startswith(("--gres=", "--gpus")):
                raise ProfileError(f"{at('slurm', 'extra_options')}: slurm.extra_options: {option} together with "
                                   "slurm.gpus or slurm.gres: sbatch would keep only one; use slurm.gpus and slurm.gres")


def apply_request(profile: Profile, request: KernelRequest) -> Profile:
    """The profile with the request's command-line overrides applied and checked like profile values."""
    overrides = {
        ("slurm", "time"): request.time,
        ("slurm", "cpus"): request.cpus,
        ("slurm", "mem"): request.mem,
        ("slurm", "partition"): request.partition,
        ("slurm", "gpus"): request.gpus,
        ("runtime", "image"): request.image,
        ("workspace", "mode"): "rw" if request.workspace_rw else None,
        ("relay", "transport"): request.relay,
        ("kernel", "time_warning"): request.time_warning,
        ("limits", "idle_timeout"): request.idle_timeout,
        ("kernel", "python_env"): request.python_env,
    }
    settings = {section: dict(values) for section, values in profile.settings.items()}
    origins = dict(profile.origins)
    for (section, key), value in overrides.items():
        if value is None:
            continue
        check = SCHEMA[section][key][0]
        flag = {"mode": "--rw", "transport": "--relay"}.get(key, f"--{key.replace('_', '-')}")
        try:
            settings[section][key] = check(value)
        except ValueError as e:
            raise ProfileError(f"{flag}: {value!r} is not valid: {e}") from None
        origins[f"{section}.{key}"] = f"command line ({flag})"
    if request.allow_hosts:
        try:
            added = _list_of(_allowed_host, "host names")(list(request.allow_hosts))
        except ValueError as e:
            raise ProfileError(f"--allow-host: {e}") from None
        settings["runtime"]["allow_hosts"] = list(dict.fromkeys([*settings["runtime"]["allow_hosts"], *added]))
        origins["runtime.allow_hosts"] = "command line (--allow-host)"
    _check_together(settings, lambda *keys: origins.get(".".join(keys), str(profile.source)))
    return replace(profile, settings=settings, origins=origins)
