"""Notebook parameters for batches: parameter files, papermill-style injection, output names.

All pure: data in, data out. A parameter file is YAML::

    grid:            # every combination (cartesian product), in the order written
      alpha: [0.1, 0.2, 0.3]
      seed: [1, 2, 3]
    fixed:           # the same in every task (optional)
      data: /project/data.csv

or ``list:`` (or a top-level list) of explicit parameter sets, each a mapping. Parameters reach
a notebook as papermill puts them there: a code cell tagged ``injected-parameters`` after the
first cell tagged ``parameters`` (or replacing an earlier injected cell; at the top when there
is neither), so notebooks written for papermill run unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import keyword
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import BatchError
from .profiles import Origins, read_yaml_with_lines

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
MAX_NAME_LENGTH = 100
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9.+\-]+")

Parameters = dict[str, Any]


def skip_iri_format_checker() -> None:
    """Importing nbformat imports jsonschema, which with ``rfc3987-syntax`` installed (JupyterLab's
    environments have it) builds dozens of Lark parsers for the ``iri`` formats: about a second
    per process (python-jsonschema/jsonschema#1428). No notebook schema uses those formats, so
    our own short-lived processes (a batch task, the CLI) leave that checker out. Call it before
    nbformat is first imported."""
    if "jsonschema" not in sys.modules:
        sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]


class ParameterLoader(yaml.SafeLoader):
    """YAML 1.2's core types and no more: ``true``/``false``, ``null``, integers and floats
    (``1e-3``, ``.inf``) are typed; ``no``, ``on``, ``1:30`` and dates stay text, as written."""


ParameterLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
                           "tag:yaml.org,2002:timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ParameterLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                      list("tTfF"))
ParameterLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
                                      list("-+0123456789"))
ParameterLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def load_parameter_file(path: Path) -> list[Parameters]:
    """The parameter sets a YAML file describes (see the module's docstring)."""
    data, origins = read_yaml_with_lines(path, ParameterLoader, "parameter file", sequences=True, error=BatchError)
    return parameter_sets(data, origins, str(path))


def parameter_sets(data: Any, origins: Origins, source: str) -> list[Parameters]:
    """``grid`` / ``list`` / ``fixed`` (or a bare list) as a list of parameter sets. Errors name
    ``file:line``, the key and what was expected."""

    def at(*keys: str) -> str:
        for n in range(len(keys), 0, -1):
            if keys[:n] in origins:
                return origins[keys[:n]]
        return source

    if data is None:
        raise BatchError(f"{source}: empty parameter file: expected grid:, list: or fixed:")
    if isinstance(data, list):
        data = {"list": data}
        origins = {("list", *keys): where for keys, where in origins.items()}
    if not isinstance(data, dict):
        raise BatchError(f"{source}: expected a mapping with grid:, list: or fixed:, or a list of parameter sets")
    unknown = sorted(set(map(str, data)) - {"grid", "list", "fixed"})
    if unknown:
        raise BatchError(f"{at(unknown[0])}: {unknown[0]}: unknown key; expected grid:, list: or fixed:")
    if "grid" in data and "list" in data:
        raise BatchError(f"{at('list')}: list: give grid: or list:, not both (grid: makes every combination)")
    fixed = _parameters(data.get("fixed") or {}, lambda *k: at("fixed", *k), "fixed")
    if "grid" in data:
        grid = data["grid"]
        if not isinstance(grid, dict) or not grid:
            raise BatchError(f"{at('grid')}: grid: expected a mapping of parameter names to lists of values")
        axes = []
        for name, values in grid.items():
            _check_name(name, at("grid", str(name)), f"grid.{name}")
            if not isinstance(values, list) or not values:
                raise BatchError(f"{at('grid', str(name))}: grid.{name}: expected a non-empty list of values, got "
                                 f"{values!r} (a value that is the same in every task goes under fixed:)")
            for i, value in enumerate(values):
                _check_value(value, at("grid", str(name), str(i)), f"grid.{name}[{i}]")
            axes.append([(str(name), value) for value in values])
        sets = [dict(combination) for combination in itertools.product(*axes)]
    elif "list" in data:
        items = data["list"]
        if not isinstance(items, list) or not items:
            raise BatchError(f"{at('list')}: list: expected a non-empty list of parameter sets (mappings)")
        sets = [_parameters(item, lambda *k, i=i: at("list", str(i), *k), f"list[{i}]") for i, item in enumerate(items)]
    else:
        sets = [{}]
    for parameters in sets:
        clash = sorted(set(parameters) & set(fixed))
        if clash:
            raise BatchError(f"{at('fixed', clash[0])}: fixed.{clash[0]}: also set by grid: or list:; set it in one place")
    return [{**fixed, **parameters} for parameters in sets]


def _parameters(item: Any, at: Any, what: str) -> Parameters:
    if not isinstance(item, dict):
        raise BatchError(f"{at()}: {what}: expected a mapping of parameter names to values, got {item!r}")
    for name, value in item.items():
        _check_name(name, at(str(name)), f"{what}.{name}")
        _check_value(value, at(str(name)), f"{what}.{name}")
    return {str(name): value for name, value in item.items()}


def _check_name(name: Any, where: str, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise BatchError(f"{where}: {what}: {name!r} is not a valid Python variable name")


def _check_value(value: Any, where: str, what: str) -> None:
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_value(item, where, what)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise BatchError(f"{where}: {what}: mapping keys must be text, got {key!r}")
            _check_value(item, where, what)
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise BatchError(f"{where}: {what}: {value!r} is not text, a number, true/false, null, a list or a mapping")


def parse_assignment(text: str) -> tuple[str, Any]:
    """``--param NAME=VALUE`` from the command line; VALUE is read as YAML (``n=3`` is 3, ``s=abc`` text)."""
    name, sep, raw = text.partition("=")
    if not sep:
        raise BatchError(f"--param {text!r}: expected NAME=VALUE")
    _check_name(name, "--param", name)
    try:
        value = yaml.load(raw, Loader=ParameterLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    _check_value(value, "--param", name)
    return name, value


def python_literal(value: Any) -> str:
    """``value`` as Python source that evaluates to it (papermill's Python translation)."""
    if isinstance(value, float):
        if math.isnan(value):
            return "float('nan')"
        if math.isinf(value):
            return "float('-inf')" if value < 0 else "float('inf')"
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{python_literal(k)}: {python_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    return repr(value)


def injected_source(parameters: Mapping[str, Any]) -> str:
    return "# Parameters\n" + "".join(f"{name} = {python_literal(value)}\n" for name, value in parameters.items())


def _tagged(cell: Mapping[str, Any], tag: str) -> bool:
    return tag in (cell.get("metadata", {}).get("tags") or [])


def inject_parameters(nb: Any, parameters: Mapping[str, Any]) -> Any:
    """A copy of notebook ``nb`` (an nbformat NotebookNode) with ``parameters`` injected the way
    papermill injects them. No parameters: the notebook as it is."""
    import nbformat

    nb = copy.deepcopy(nb)
    if not parameters:
        return nb
    cell = nbformat.v4.new_code_cell(source=injected_source(parameters))
    cell.metadata["tags"] = [INJECTED_TAG]
    injected = next((i for i, c in enumerate(nb.cells) if _tagged(c, INJECTED_TAG)), None)
    declared = next((i for i, c in enumerate(nb.cells) if _tagged(c, PARAMETERS_TAG)), None)
    if injected is not None:
        nb.cells[injected] = cell
    elif declared is not None:
        nb.cells.insert(declared + 1, cell)
    else:
        nb.cells.insert(0, cell)
    nb.metadata.setdefault("papermill", {})["parameters"] = dict(parameters)
    return nb


def _short_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _value_text(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return _short_hash(value)
    return _NAME_UNSAFE.sub("-", str(value)).strip("-") or "-"


def output_name(notebook: Path, parameters: Mapping[str, Any]) -> str:
    """The name of a task's outputs: the notebook's stem and the parameters, ``analysis_alpha=0.1_seed=2``.
    Only letters, digits and ``.+-=_`` (a value with others is shortened); a long name ends in a hash."""
    stem = _NAME_UNSAFE.sub("-", notebook.stem).strip("-") or "notebook"
    name = "_".join([stem, *(f"{key}={_value_text(value)}" for key, value in parameters.items())])
    if len(name) > MAX_NAME_LENGTH:
        name = name[:MAX_NAME_LENGTH - 9] + "-" + _short_hash(str(notebook), parameters)
    return name


def output_names(tasks: Sequence[tuple[Path, Mapping[str, Any]]]) -> list[str]:
    """One distinct output name per (notebook, parameters): names that would collide (two
    notebooks with one stem in different directories, values that read the same) get a hash of
    the whole path and parameters."""
    names = [output_name(notebook, parameters) for notebook, parameters in tasks]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{name[:MAX_NAME_LENGTH - 9]}-{_short_hash(str(notebook.resolve()), parameters)}"
            for name, (notebook, parameters) in zip(names, tasks)]
