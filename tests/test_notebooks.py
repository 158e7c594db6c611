"""Parameter files, papermill-style injection and output names (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from hpc_kernels.errors import BatchError
from hpc_kernels.notebooks import (
    INJECTED_TAG,
    inject_parameters,
    load_parameter_file,
    output_name,
    output_names,
    parse_assignment,
    python_literal,
)


def params_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_grid_is_every_combination_in_the_order_written(tmp_path: Path) -> None:
    sets = load_parameter_file(params_file(tmp_path, """
grid:
  alpha: [0.1, 0.2, 0.3]
  seed: [1, 2]
fixed:
  data: /project/data.csv
"""))
    assert sets == [{"data": "/project/data.csv", "alpha": a, "seed": s} for a in (0.1, 0.2, 0.3) for s in (1, 2)]


def test_list_and_a_bare_list_give_explicit_sets(tmp_path: Path) -> None:
    explicit = [{"n": 1, "name": "a"}, {"n": 2, "name": "b"}]
    assert load_parameter_file(params_file(tmp_path, "list:\n  - {n: 1, name: a}\n  - {n: 2, name: b}\n")) == explicit
    assert load_parameter_file(params_file(tmp_path, "- {n: 1, name: a}\n- {n: 2, name: b}\n")) == explicit
    assert load_parameter_file(params_file(tmp_path, "fixed: {n: 3}\n")) == [{"n": 3}]


def test_values_keep_the_type_they_are_written_with(tmp_path: Path) -> None:
    [values] = load_parameter_file(params_file(tmp_path, """
fixed:
  a: 1e-3
  b: no
  c: 1:30
  d: 2024-01-01
  e: true
  f: null
  g: [1, two]
  h: {k: .inf}
  i: "7"
"""))
    assert values == {"a": 0.001, "b": "no", "c": "1:30", "d": "2024-01-01", "e": True, "f": None,
                      "g": [1, "two"], "h": {"k": float("inf")}, "i": "7"}


@pytest.mark.parametrize(("text", "expected"), [
    ("grid:\n  alpha: 0.1\n", "params.yaml:2: grid.alpha: expected a non-empty list of values"),
    ("grid:\n  alpha: [1]\nlist:\n  - {a: 1}\n", "params.yaml:3: list: give grid: or list:, not both"),
    ("grids:\n  alpha: [1]\n", "params.yaml:1: grids: unknown key"),
    ("grid:\n  2alpha: [1]\n", "params.yaml:2: grid.2alpha: '2alpha' is not a valid Python variable name"),
    ("grid:\n  class: [1]\n", "params.yaml:2: grid.class: 'class' is not a valid Python variable name"),
    ("list:\n  - {a: 1}\n  - 5\n", "params.yaml:3: list[1]: expected a mapping"),
    ("grid:\n  a: [1]\nfixed:\n  a: 2\n", "params.yaml:4: fixed.a: also set by grid: or list:"),
    ("grid: [\n", "params.yaml:2: not valid YAML"),
    ("", "params.yaml: empty parameter file"),
    ("fixed:\n  a: !!binary aGk=\n", "params.yaml:2: fixed.a: b'hi' is not text, a number"),
])
def test_mistakes_name_the_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(BatchError) as caught:
        load_parameter_file(params_file(tmp_path, text))
    assert expected in str(caught.value).replace(str(tmp_path) + "/", "")


def test_command_line_assignments_read_values_as_yaml() -> None:
    assert parse_assignment("n=3") == ("n", 3)
    assert parse_assignment("s=abc") == ("s", "abc")
    assert parse_assignment("xs=[1, 2]") == ("xs", [1, 2])
    assert parse_assignment("empty=") == ("empty", "")
    with pytest.raises(BatchError, match="expected NAME=VALUE"):
        parse_assignment("novalue")


def papermill_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# title"),
                nbformat.v4.new_code_cell("alpha = 0\nname = 'x'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("result = alpha * 2")]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    return nb


VALUES = {"alpha": 0.5, "name": "it's \"quoted\"", "flags": [True, None], "nested": {"k": [1, 2.5]},
          "big": float("inf"), "nan": float("nan")}


def namespace_of(source: str) -> dict[str, object]:
    scope: dict[str, object] = {}
    exec(source, scope)
    scope.pop("__builtins__")
    return scope


def test_injection_matches_papermill(tmp_path: Path) -> None:
    """The same cell, in the same place, with the same tag and values as papermill's own
    parameterize_notebook (papermill is installed with the test extras) on the same file."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    path = tmp_path / "nb.ipynb"
    nbformat.write(papermill_notebook(), str(path))
    ours = inject_parameters(nbformat.read(str(path), as_version=4), VALUES)
    theirs = parameterize_notebook(load_notebook_node(str(path)), VALUES)
    assert [c.metadata.get("tags") or [] for c in ours.cells] == [c.metadata.get("tags") or [] for c in theirs.cells]
    assert ours.cells[2].metadata["tags"] == [INJECTED_TAG]
    mine, papers = namespace_of(ours.cells[2].source), namespace_of(theirs.cells[2].source)
    assert repr(mine) == repr(papers)  # repr: nan != nan
    assert ours.metadata.papermill["parameters"] == theirs.metadata.papermill["parameters"]


def test_injection_replaces_an_earlier_injected_cell_and_goes_first_without_a_parameters_cell() -> None:
    once = inject_parameters(papermill_notebook(), {"alpha": 1})
    twice = inject_parameters(once, {"alpha": 2})
    assert len(twice.cells) == len(once.cells) == 4
    assert namespace_of(twice.cells[2].source) == {"alpha": 2}
    bare = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(alpha)")])
    injected = inject_parameters(bare, {"alpha": 3})
    assert injected.cells[0].metadata["tags"] == [INJECTED_TAG] and len(bare.cells) == 1  # a copy
    assert inject_parameters(bare, {}).cells == bare.cells


def test_python_literal_round_trips() -> None:
    for value in (0.1, -3, "a\nb", [1, "x", None], {"a": {"b": False}}, 1e300):
        assert eval(python_literal(value)) == value  # noqa: S307 - our own literal


def test_output_names_carry_the_parameters_and_stay_distinct() -> None:
    assert output_name(Path("/p/analysis.ipynb"), {"alpha": 0.1, "seed": 2}) == "analysis_alpha=0.1_seed=2"
    assert output_name(Path("/p/a b.ipynb"), {"s": "x/y z"}) == "a-b_s=x-y-z"
    long = output_name(Path("/p/nb.ipynb"), {"text": "x" * 300})
    assert len(long) <= 100
    names = output_names([(Path("/a/hw.ipynb"), {}), (Path("/b/hw.ipynb"), {}), (Path("/c/other.ipynb"), {}),
                          (Path("/c/n.ipynb"), {"s": "a b"}), (Path("/c/n.ipynb"), {"s": "a-b"})])
    assert len(set(names)) == 5
    assert names[2] == "other" and names[0].startswith("hw-") and names[3].startswith("n_s=a-b-")
