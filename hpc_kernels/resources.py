"""Finding the files shipped beside the code: job templates and the site profiles.

Installed, they live inside the package (``hpc_kernels/templates``, ``hpc_kernels/site_configs``,
mapped there by pyproject.toml); in a source checkout, at the top of the repository.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_INSTALLED_NAMES = {"templates": "templates", "site-configs": "site_configs"}


def data_dir(name: str) -> Path:
    installed = _PACKAGE / _INSTALLED_NAMES[name]
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / name
